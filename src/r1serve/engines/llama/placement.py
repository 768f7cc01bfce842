"""Slot placement: which llama.cpp sequence (slot) a request gets, and what of its prompt it finds cached.

Each slot is a seq id with its own KV stream. A slot keeps the tokens its cells hold after its request
finishes, for the next prompt that starts with them. This module decides where a new sequence goes, which
cached prefix it reuses (in place, or copied from another slot), what is saved before it is overwritten,
and when running sequences move to close a gap in the block of running seq ids.

It owns the slots and their token bookkeeping, and changes the cache only through the two llama.cpp calls
it is given (``seq_rm`` and ``seq_cp``, as ``llama_memory_seq_rm`` / ``llama_memory_seq_cp`` bound to a
context's memory), so it runs without a model (tests/test_placement.py). It must not import llama_cpp.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Copying a cached prefix from another slot copies that slot's whole KV stream (llama.cpp copies across
# streams whole or not at all). A 4,096-cell stream copies in the time of 1.3 prompt tokens, on the 0.5B
# and on the 1.5B (bench/engine/copycost.py); a copy is made when it saves at least
# per_seq / CELLS_PER_TOKEN tokens, a margin of about 3x.
CELLS_PER_TOKEN = 1024
# A gap in the running seq ids is closed when it is still there this many steps after it opened (a client
# sending requests back to back fills it sooner, at no cost).
GAP_STEPS = 2

# seq_rm(seq_id, p0, p1): drop a sequence's cells in [p0, p1), p1 = -1 for the end.
SeqRm = Callable[[int, int, int], object]
# seq_cp(src, dst, p0, p1): copy src's cells to dst; across streams always whole (p0 = p1 = -1).
SeqCp = Callable[[int, int, int, int], object]


@dataclass(eq=False)
class Slot:
    """A llama.cpp sequence id and the tokens its KV cells currently hold (kept for prefix reuse)."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    last_used: float = 0.0
    busy: bool = False
    # The cache scope of the request that wrote the tokens: only a request of the same scope reuses them.
    scope: object = None


class Placement:
    """The slots of one context, and every decision about what their KV streams hold.

    ``on_copy`` is called once per stream copy (a metric). ``clock`` stamps a released slot's
    ``last_used``.
    """

    def __init__(
        self,
        n_slots: int,
        per_seq: int,
        *,
        seq_rm: SeqRm,
        seq_cp: SeqCp,
        on_copy: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.slots = [Slot(seq_id=i) for i in range(n_slots)]
        # Each stream holds per_seq cells, and a slot never holds more than per_seq tokens.
        self.copy_pays_from = max(1, per_seq // CELLS_PER_TOKEN)
        self._seq_rm = seq_rm
        self._seq_cp = seq_cp
        self._on_copy = on_copy
        self._clock = clock
        self._gap_steps = 0  # steps the running seq ids have had a gap

    def assign(
        self, prompt: list[int], free: list[Slot], *, scoring: bool = False, scope: object = None
    ) -> tuple[Slot, int]:
        """Give a new sequence a free slot and as much of its prompt from the KV cache as any slot of its
        ``scope`` holds.

        Returns the slot, now busy, and how many of the prompt's tokens its cells hold: those are not
        computed again. ``scoring``: the prompt is scored and reuses nothing. ``scope`` (compared with
        ``==``; the engine passes the request's cache scope and salt): tokens that a sequence of another
        scope wrote are never reused, so how much of a prompt is found cached (reported to the client as
        cached_tokens, and visible in how fast it is answered) says nothing about other scopes' prompts.
        Other scopes' slots are still taken, saved and overwritten as any slot, by recency alone.

        The slot must be next to a running one (``adjacent``). Among those allowed, one is reused in
        place when its own cache is the best match there and most of what it holds is kept; otherwise
        the sequence takes an empty one, else the least recently used. A longer prefix cached in another
        slot (busy ones included) is then copied in, when it saves enough tokens to pay for copying that
        slot's whole stream. When most of what the slot held is not kept, it is first saved to an idle
        slot (``save``): which slot a sequence gets depends on seq ids, not on what is cached, and
        another conversation should not be lost for it while older ones are kept.
        """

        def common(slot: Slot) -> int:
            n = 0
            for a, b in zip(slot.tokens, prompt, strict=False):
                if a != b:
                    break
                n += 1
            return n

        # A prompt being scored needs the logits of every position: no cached prefix can give them.
        matches = {slot.seq_id: 0 if scoring or slot.scope != scope else common(slot) for slot in self.slots}
        donor = max(self.slots, key=lambda s: (matches[s.seq_id], s.last_used))
        longest = matches[donor.seq_id]
        allowed = self.adjacent(free)
        own = max(matches[s.seq_id] for s in allowed)
        in_place = [s for s in allowed if matches[s.seq_id] == own and own * 2 >= len(s.tokens)] if own else []
        if in_place:
            best = max(in_place, key=lambda s: s.last_used)
        else:
            empty = [s for s in allowed if not s.tokens]
            best = empty[0] if empty else min(allowed, key=lambda s: s.last_used)
        # At least the last prompt token is decoded again: its logits give the first sample.
        usable = len(prompt) - 1
        keep = min(matches[best.seq_id], usable)
        copy = min(longest, usable) - keep >= self.copy_pays_from
        if keep * 2 < len(best.tokens):
            self.save(best, exclude=donor)
        if copy:
            self.copy(donor, best)
            keep = min(longest, usable)
        self.cut(best, keep)
        best.busy = True
        best.scope = scope  # what it kept is its scope's (or nothing), and what it writes will be
        return best, keep

    def adjacent(self, free: list[Slot]) -> list[Slot]:
        """The free slots a new sequence may take without adding a run of consecutive running seq ids:
        those next to a running one, the ones that join two runs first, then those inside a gap (which
        otherwise a move will close); any slot when nothing runs."""
        busy = {s.seq_id for s in self.slots if s.busy}
        if not busy:
            return free
        lo, hi = min(busy), max(busy)
        nearby = [s for s in free if s.seq_id - 1 in busy or s.seq_id + 1 in busy]
        joining = [s for s in nearby if s.seq_id - 1 in busy and s.seq_id + 1 in busy]
        inside = [s for s in nearby if lo < s.seq_id < hi]
        return joining or inside or nearby

    def close_gaps(self, running: list[Slot]) -> list[tuple[Slot, Slot]]:
        """Move running sequences into the gaps that finished ones left in the block of running seq ids.

        ``running`` holds the slots of the sequences still running; called once per step. Returns the
        moves made, (from, to) in order, for the caller to point its sequences at their new slots.

        Each run of consecutive ids costs a pass over the weights every step; a move copies a stream or
        two once, each in about the time of one prompt token. Admission takes a slot inside a gap first,
        so a gap is only closed when no request has filled it for GAP_STEPS steps. The sequence at the
        top of the block moves into the lowest gap, whose finished conversation is saved first."""
        by_id = {s.seq_id: s for s in running}
        ids = sorted(by_id)
        if len(ids) < 2 or ids[-1] - ids[0] + 1 == len(ids):
            self._gap_steps = 0
            return []
        self._gap_steps += 1
        if self._gap_steps < GAP_STEPS:
            return []
        moves: list[tuple[Slot, Slot]] = []
        while len(by_id) > 1:
            ids = sorted(by_id)
            if ids[-1] - ids[0] + 1 == len(ids):
                break
            gap = self.slots[next(i for i in range(ids[0], ids[-1]) if i not in by_id)]
            src = by_id.pop(ids[-1])
            assert not gap.busy
            self.save(gap)
            self.copy(src, gap)
            gap.busy = True
            moves.append((src, gap))
            # What it leaves behind is a prefix of what the sequence goes on writing in its new slot.
            src.busy = False
            self.cut(src, 0)
            by_id[gap.seq_id] = gap
        return moves

    def release(self, slot: Slot, keep: int | None = None) -> None:
        """The slot's sequence is done: the slot is free, and keeps its cache (the first ``keep`` tokens
        of it when given) for the prompts to come."""
        slot.busy = False
        slot.last_used = self._clock()
        if keep is not None:
            self.cut(slot, keep)

    def save(self, slot: Slot, exclude: Slot | None = None) -> None:
        """Copy an idle slot's cache to another idle slot, an empty one or else the least recently used,
        if that one holds nothing more recent: the slot is about to be reused or overwritten. Among empty
        slots, the one farthest from the running ones, which new sequences take last."""
        if not slot.tokens:
            return
        idle = [s for s in self.slots if not s.busy and s is not slot and s is not exclude]
        if not idle:
            return
        empty = [s for s in idle if not s.tokens]
        if empty:
            busy = [s.seq_id for s in self.slots if s.busy] or [slot.seq_id]
            victim = max(empty, key=lambda s: min(abs(s.seq_id - b) for b in busy))
        else:
            victim = min(idle, key=lambda s: s.last_used)
        if victim.tokens and victim.last_used >= slot.last_used:
            return
        self.copy(slot, victim)
        victim.last_used = slot.last_used

    def cut(self, slot: Slot, keep: int) -> None:
        """Drop a slot's cached tokens from position ``keep`` on."""
        self._seq_rm(slot.seq_id, keep, -1)
        slot.tokens = slot.tokens[:keep]

    def copy(self, src: Slot, dst: Slot) -> None:
        """Replace dst's cache with src's. llama.cpp copies streams whole (or not at all), in the next
        decode, in the order asked: later copies and removals see the earlier ones done."""
        self._seq_cp(src.seq_id, dst.seq_id, -1, -1)
        dst.tokens = list(src.tokens)
        dst.scope = src.scope
        if self._on_copy is not None:
            self._on_copy()
