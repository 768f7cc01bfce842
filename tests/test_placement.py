"""Slot placement (engines/llama/placement.py) against a fake KV cache: no model, no llama.cpp.

The fake records every seq_rm / seq_cp call and applies it to per-stream cell lists the way llama.cpp
does (removal from a position to the end, whole-stream copies, in call order), so each test checks the
calls made and that the slots' token bookkeeping matches what the cache would hold.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from r1serve.engines.llama.placement import CELLS_PER_TOKEN, GAP_STEPS, Placement, Slot

PER_SEQ = 8 * CELLS_PER_TOKEN  # a copy pays from 8 saved tokens
NOW = 100.0


class FakeCache:
    """KV streams as lists of tokens, one per seq id; the two llama.cpp calls placement makes."""

    def __init__(self, n_slots: int) -> None:
        self.cells: dict[int, list[int]] = {i: [] for i in range(n_slots)}
        self.calls: list[tuple[object, ...]] = []
        self.copies = 0
        self.placement: Placement | None = None

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        assert p1 == -1, "placement always drops to the end of the stream"
        self.calls.append(("rm", seq_id, p0))
        del self.cells[seq_id][p0:]
        return True

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        assert (p0, p1) == (-1, -1), "llama.cpp copies across streams whole"
        assert self.placement is not None and not self.placement.slots[dst].busy, "overwrote a running stream"
        self.calls.append(("cp", src, dst))
        self.cells[dst] = list(self.cells[src])

    def count_copy(self) -> None:
        self.copies += 1


def _make(n_slots: int = 4) -> tuple[Placement, FakeCache]:
    cache = FakeCache(n_slots)
    placement = Placement(
        n_slots, PER_SEQ, seq_rm=cache.seq_rm, seq_cp=cache.seq_cp, on_copy=cache.count_copy, clock=lambda: NOW
    )
    cache.placement = placement
    return placement, cache


def _hold(placement: Placement, cache: FakeCache, seq_id: int, tokens: list[int], *, last_used: float = 0.0,
          busy: bool = False) -> Slot:  # fmt: skip
    """A slot whose stream holds ``tokens`` (as if decoded there), possibly still running."""
    slot = placement.slots[seq_id]
    slot.tokens = list(tokens)
    cache.cells[seq_id] = list(tokens)
    slot.last_used = last_used
    slot.busy = busy
    return slot


def _free(placement: Placement) -> list[Slot]:
    return [s for s in placement.slots if not s.busy]


def _consistent(placement: Placement, cache: FakeCache) -> None:
    for slot in placement.slots:
        assert slot.tokens == cache.cells[slot.seq_id], f"slot {slot.seq_id}'s bookkeeping is off"


def _tokens(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


A, B, C, Q = _tokens(1000, 30), _tokens(2000, 30), _tokens(3000, 30), _tokens(4000, 30)


def test_copy_threshold_follows_the_stream_size() -> None:
    assert _make()[0].copy_pays_from == PER_SEQ // 1024 == 8
    small = Placement(1, 512, seq_rm=lambda *a: None, seq_cp=lambda *a: None)
    assert small.copy_pays_from == 1


# ----------------------------------------------------------------- prefix reuse


def test_a_prefix_in_the_requests_own_slot_is_reused_in_place() -> None:
    placement, cache = _make()
    _hold(placement, cache, 2, A, last_used=1.0)  # the previous turn of this conversation
    slot, keep = placement.assign(A + [1, 2, 3], _free(placement))
    assert slot.seq_id == 2 and slot.busy
    assert keep == len(A)
    assert cache.calls == [("rm", 2, len(A))]  # nothing copied
    assert cache.copies == 0
    _consistent(placement, cache)


def test_a_slot_keeping_half_of_what_it_holds_is_reused_in_place_without_saving() -> None:
    placement, cache = _make()
    _hold(placement, cache, 1, A + B[:20], last_used=1.0)
    slot, keep = placement.assign(A + C, _free(placement))
    assert (slot.seq_id, keep) == (1, 30)
    assert cache.calls == [("rm", 1, 30)]
    assert slot.tokens == A
    _consistent(placement, cache)


def test_of_equal_matches_in_place_the_most_recently_used_slot_is_taken() -> None:
    placement, cache = _make()
    _hold(placement, cache, 0, A, last_used=1.0)
    _hold(placement, cache, 2, A, last_used=2.0)
    slot, keep = placement.assign(A + [1], _free(placement))
    assert (slot.seq_id, keep) == (2, len(A))
    assert cache.calls == [("rm", 2, len(A))]


def test_a_slot_that_would_keep_less_than_half_is_not_reused_in_place() -> None:
    placement, cache = _make()
    _hold(placement, cache, 0, A[:10] + B, last_used=1.0)  # shares only 10 of its 40 tokens
    slot, keep = placement.assign(A + C, _free(placement))
    assert slot.seq_id == 1  # an empty slot instead: slot 0's conversation is kept whole
    assert keep == 10  # its shared prefix copied over
    assert cache.calls == [("cp", 0, 1), ("rm", 1, 10)]
    assert cache.cells[0] == A[:10] + B
    _consistent(placement, cache)


def test_an_empty_slot_is_taken_before_the_least_recently_used() -> None:
    placement, cache = _make(2)
    _hold(placement, cache, 0, B, last_used=1.0)
    _hold(placement, cache, 1, [], last_used=5.0)  # emptied (a failed batch) after B was last used
    slot, keep = placement.assign(Q, _free(placement))
    assert (slot.seq_id, keep) == (1, 0)
    assert cache.calls == [("rm", 1, 0)]
    assert cache.cells[0] == B


def test_the_last_prompt_token_is_always_recomputed() -> None:
    placement, cache = _make()
    _hold(placement, cache, 0, A)
    slot, keep = placement.assign(list(A), _free(placement))  # the whole prompt is cached
    assert (slot.seq_id, keep) == (0, len(A) - 1)
    assert cache.calls == [("rm", 0, len(A) - 1)]
    assert slot.tokens == A[:-1]
    _consistent(placement, cache)


def test_the_last_prompt_token_is_recomputed_after_a_copy_too() -> None:
    placement, cache = _make()
    _hold(placement, cache, 1, A, busy=True)
    _hold(placement, cache, 3, B + [7, 7])
    slot, keep = placement.assign(list(B), _free(placement))
    assert slot.seq_id in (0, 2)
    assert keep == len(B) - 1
    assert cache.calls == [("cp", 3, slot.seq_id), ("rm", slot.seq_id, len(B) - 1)]
    _consistent(placement, cache)


@pytest.mark.parametrize(("shared", "copied"), [(7, False), (8, True), (20, True)])
def test_a_prefix_in_another_slot_is_copied_only_when_it_saves_per_seq_over_1024_tokens(
    shared: int, copied: bool
) -> None:
    placement, cache = _make()
    _hold(placement, cache, 1, C, last_used=5.0, busy=True)  # running: the new one goes to 0 or 2
    _hold(placement, cache, 3, A[:shared] + B, last_used=1.0)
    prompt = A
    slot, keep = placement.assign(prompt, _free(placement))
    assert slot.seq_id == 0  # next to the running slot 1, and empty
    if copied:
        assert keep == shared
        assert cache.calls == [("cp", 3, 0), ("rm", 0, shared)]
        assert cache.copies == 1
        assert slot.tokens == A[:shared]
    else:
        assert keep == 0
        assert cache.calls == [("rm", 0, 0)]
        assert cache.copies == 0
    assert cache.cells[3] == A[:shared] + B  # the donor keeps its cache
    _consistent(placement, cache)


def test_a_running_slot_can_be_the_donor() -> None:
    placement, cache = _make()
    _hold(placement, cache, 1, A[:20] + C, last_used=5.0, busy=True)  # a request with the same system prompt
    slot, keep = placement.assign(A, _free(placement))
    assert (slot.seq_id, keep) == (0, 20)
    assert cache.calls == [("cp", 1, 0), ("rm", 0, 20)]
    assert placement.slots[1].tokens == A[:20] + C and placement.slots[1].busy
    _consistent(placement, cache)


def test_a_longer_prefix_elsewhere_is_copied_over_a_shorter_one_in_place() -> None:
    placement, cache = _make()
    _hold(placement, cache, 0, A[:5], last_used=1.0)
    _hold(placement, cache, 1, A + B, last_used=2.0, busy=True)
    slot, keep = placement.assign(A + C, _free(placement))
    assert slot.seq_id == 0  # in place: the best match next to the running slot
    assert keep == len(A)  # but its 5 tokens grow to the 30 copied from slot 1
    assert cache.calls == [("cp", 1, 0), ("rm", 0, len(A))]
    _consistent(placement, cache)


def test_scoring_prompts_get_no_cached_prefix() -> None:
    placement, cache = _make()
    _hold(placement, cache, 0, A, last_used=1.0)
    _hold(placement, cache, 2, A[:20], last_used=2.0)
    slot, keep = placement.assign(A + [1], _free(placement), scoring=True)
    assert keep == 0
    assert slot.seq_id == 1  # not the slot holding the prompt: an empty one
    assert cache.calls == [("rm", 1, 0)]  # nothing copied
    assert cache.cells[0] == A and cache.cells[2] == A[:20]
    _consistent(placement, cache)


# ----------------------------------------------------------------- saving what a slot held


def test_a_slot_about_to_lose_its_cells_is_saved_to_the_empty_slot_farthest_from_running_ones() -> None:
    placement, cache = _make(6)
    _hold(placement, cache, 2, C, last_used=5.0, busy=True)
    _hold(placement, cache, 1, A, last_used=1.0)
    _hold(placement, cache, 3, B, last_used=3.0)
    # Slots 0, 4 and 5 are empty; the new prompt shares nothing; slots 1 and 3 are the ones next to 2.
    slot, keep = placement.assign(Q, _free(placement))
    assert (slot.seq_id, keep) == (1, 0)  # the less recently used of the two
    assert cache.calls == [("cp", 1, 5), ("rm", 1, 0)]  # 5: farthest from the running slot 2
    assert placement.slots[5].tokens == A and placement.slots[5].last_used == 1.0
    assert placement.slots[3].tokens == B
    _consistent(placement, cache)


def test_without_an_empty_slot_the_least_recently_used_is_overwritten_when_older() -> None:
    placement, cache = _make()
    _hold(placement, cache, 1, C, last_used=4.0, busy=True)
    _hold(placement, cache, 0, A, last_used=2.0)
    _hold(placement, cache, 2, B, last_used=3.0)
    _hold(placement, cache, 3, Q, last_used=1.0)  # the oldest conversation
    slot, keep = placement.assign(_tokens(5000, 10), _free(placement))
    assert (slot.seq_id, keep) == (0, 0)
    assert cache.calls == [("cp", 0, 3), ("rm", 0, 0)]  # A saved over Q, the oldest
    assert placement.slots[3].tokens == A and placement.slots[3].last_used == 2.0
    assert placement.slots[2].tokens == B
    _consistent(placement, cache)


def test_the_slot_is_not_saved_over_a_newer_conversation() -> None:
    placement, cache = _make()
    _hold(placement, cache, 1, C, last_used=4.0, busy=True)
    _hold(placement, cache, 0, A, last_used=1.0)  # the oldest: it is the one lost
    _hold(placement, cache, 2, B, last_used=3.0)
    _hold(placement, cache, 3, Q, last_used=2.0)
    slot, _ = placement.assign(_tokens(5000, 10), _free(placement))
    assert slot.seq_id == 0
    assert cache.calls == [("rm", 0, 0)]
    assert placement.slots[3].tokens == Q and placement.slots[2].tokens == B
    _consistent(placement, cache)


def test_the_donor_is_not_overwritten_by_the_save() -> None:
    placement, cache = _make()
    _hold(placement, cache, 1, C, last_used=5.0, busy=True)
    _hold(placement, cache, 0, B, last_used=1.0)  # the slot the new sequence takes (next to 1, older than 2)
    _hold(placement, cache, 2, Q, last_used=3.0)
    _hold(placement, cache, 3, A[:20] + Q, last_used=0.5)  # the donor, and the least recently used slot
    slot, keep = placement.assign(A, _free(placement))
    assert (slot.seq_id, keep) == (0, 20)
    # B would be saved over the least recently used slot, but that holds the prefix being copied.
    assert cache.calls == [("cp", 3, 0), ("rm", 0, 20)]
    assert cache.cells[3] == A[:20] + Q
    _consistent(placement, cache)


# ----------------------------------------------------------------- adjacency


def test_with_nothing_running_any_slot_may_be_taken() -> None:
    placement, cache = _make(6)
    _hold(placement, cache, 5, A, last_used=1.0)
    assert placement.adjacent(_free(placement)) == placement.slots
    slot, keep = placement.assign(A + [1], _free(placement))
    assert (slot.seq_id, keep) == (5, len(A))
    _consistent(placement, cache)


def test_a_new_sequence_takes_a_slot_next_to_a_running_one_and_the_prefix_is_copied_there() -> None:
    placement, cache = _make(6)
    _hold(placement, cache, 2, C, last_used=3.0, busy=True)
    _hold(placement, cache, 5, A, last_used=1.0)  # its own previous turn, far from the running block
    assert [s.seq_id for s in placement.adjacent(_free(placement))] == [1, 3]
    slot, keep = placement.assign(A + [1], _free(placement))
    assert (slot.seq_id, keep) == (1, len(A))
    assert cache.calls == [("cp", 5, 1), ("rm", 1, len(A))]
    _consistent(placement, cache)


def test_a_slot_joining_two_runs_comes_first() -> None:
    placement, cache = _make(6)
    _hold(placement, cache, 1, A, busy=True)
    _hold(placement, cache, 3, B, busy=True)
    assert [s.seq_id for s in placement.adjacent(_free(placement))] == [2]
    slot, _ = placement.assign(Q, _free(placement))
    assert slot.seq_id == 2


def test_joining_two_runs_comes_before_any_other_slot_inside_the_block() -> None:
    placement, cache = _make(8)
    for i in (0, 2, 5):
        _hold(placement, cache, i, _tokens(100 * i, 5), busy=True)
    _hold(placement, cache, 1, A, last_used=1.0)
    # 1 joins the runs 0 and 2; 3 and 4 are inside the block too, and empty; so are 6 and 7, outside.
    assert [s.seq_id for s in placement.adjacent(_free(placement))] == [1]
    slot, _ = placement.assign(Q, _free(placement))
    assert slot.seq_id == 1
    assert cache.calls == [("cp", 1, 7), ("rm", 1, 0)]  # A saved to the empty slot farthest from 0, 2, 5
    _consistent(placement, cache)


def test_then_a_slot_inside_a_gap() -> None:
    placement, cache = _make(6)
    _hold(placement, cache, 0, A, busy=True)
    _hold(placement, cache, 3, B, busy=True)
    assert [s.seq_id for s in placement.adjacent(_free(placement))] == [1, 2]  # not 4
    _hold(placement, cache, 4, Q, last_used=1.0)  # a cached prefix right next to the block still loses
    slot, keep = placement.assign(Q + [1], _free(placement))
    assert slot.seq_id == 1
    assert keep == len(Q)  # copied from slot 4
    assert cache.calls == [("cp", 4, 1), ("rm", 1, len(Q))]
    _consistent(placement, cache)


# ----------------------------------------------------------------- closing gaps


def test_a_gap_lasting_two_steps_is_closed_by_moving_the_top_sequence_into_it() -> None:
    assert GAP_STEPS == 2
    placement, cache = _make()
    s0 = _hold(placement, cache, 0, A, busy=True)
    s1 = _hold(placement, cache, 1, B, busy=True)
    s2 = _hold(placement, cache, 2, C, busy=True)
    placement.release(s1)  # the middle sequence finished: its conversation stays cached
    assert not s1.busy and s1.tokens == B and s1.last_used == NOW
    assert placement.close_gaps([s0, s2]) == []  # first step with the gap: left for a new request
    assert cache.calls == []
    assert placement.close_gaps([s0, s2]) == [(s2, s1)]
    # The finished conversation is saved to the empty slot first, then the top stream moves down.
    assert cache.calls == [("cp", 1, 3), ("cp", 2, 1), ("rm", 2, 0)]
    assert s1.busy and s1.tokens == C
    assert not s2.busy and s2.tokens == []
    assert placement.slots[3].tokens == B
    assert cache.copies == 2
    _consistent(placement, cache)


def test_a_gap_filled_in_time_is_not_closed() -> None:
    placement, cache = _make()
    s0 = _hold(placement, cache, 0, A, busy=True)
    s1 = _hold(placement, cache, 1, B)
    s2 = _hold(placement, cache, 2, C, busy=True)
    assert placement.close_gaps([s0, s2]) == []
    s1.busy = True  # a new request took the gap
    assert placement.close_gaps([s0, s1, s2]) == []
    s1.busy = False  # and finished: the count starts again
    assert placement.close_gaps([s0, s2]) == []
    assert cache.calls == []


def test_several_gaps_are_closed_top_down_in_one_step() -> None:
    placement, cache = _make(6)
    s0 = _hold(placement, cache, 0, A, busy=True)
    s3 = _hold(placement, cache, 3, B, busy=True)
    s5 = _hold(placement, cache, 5, C, busy=True)
    placement.close_gaps([s0, s3, s5])
    moves = placement.close_gaps([s0, s3, s5])
    s1, s2 = placement.slots[1], placement.slots[2]
    assert moves == [(s5, s1), (s3, s2)]
    assert cache.calls == [("cp", 5, 1), ("rm", 5, 0), ("cp", 3, 2), ("rm", 3, 0)]
    assert [s.seq_id for s in placement.slots if s.busy] == [0, 1, 2]
    assert (s1.tokens, s2.tokens) == (C, B)
    _consistent(placement, cache)


def test_one_running_sequence_never_moves() -> None:
    placement, cache = _make()
    s3 = _hold(placement, cache, 3, A, busy=True)
    for _ in range(5):
        assert placement.close_gaps([s3]) == []
    assert cache.calls == []


# ----------------------------------------------------------------- release


def test_release_keeps_the_cache_or_cuts_it_to_the_prompt() -> None:
    placement, cache = _make()
    slot = _hold(placement, cache, 0, A + B, busy=True)
    placement.release(slot)
    assert cache.calls == [] and slot.tokens == A + B and not slot.busy and slot.last_used == NOW
    r1 = _hold(placement, cache, 1, A + B, busy=True)  # an R1 answer: only its prompt A is reused
    placement.release(r1, len(A))
    assert cache.calls == [("rm", 1, len(A))] and r1.tokens == A and not r1.busy
    # The next turn sends the answer back without its reasoning: the prompt matches in full, in place.
    again, keep = placement.assign(A + C, [r1])
    assert (again, keep) == (r1, len(A))
    _consistent(placement, cache)


def test_placement_imports_without_llama_cpp() -> None:
    import r1serve

    src = str(Path(r1serve.__file__).parent.parent)
    code = "import sys, r1serve.engines.llama.placement; assert 'llama_cpp' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": src}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
