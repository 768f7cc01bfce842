"""The deployment log without a model: a real child that writes a 200 KiB line, then goes on writing,
is drained to the end (no pump death, no child blocked on a full pipe); pieces are marked; the files
are written off the event loop and hold every line."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from r1serve.deployments.logs import MAX_LINE, SPLIT_MARK, DeploymentLog, LineSplitter, pump

BIG = 200 * 1024

# The child: one 200 KiB line, then 2000 short ones (far more than a pipe's 64 KiB if nobody reads),
# then a last line; it exits 0 only if every write went through.
CHILD = f"""
import sys
sys.stdout.write("x" * {BIG} + "\\n")
for i in range(2000):
    sys.stdout.write(f"line {{i}} " + "y" * 60 + "\\n")
sys.stdout.write("still serving\\n")
sys.stdout.flush()
"""


async def _run_child(log: DeploymentLog) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    assert proc.stdout is not None
    await pump(proc.stdout, log, "replica-0")
    return await proc.wait()


def test_a_200_kib_line_is_split_and_the_child_keeps_going(tmp_path: Path) -> None:
    async def main() -> tuple[int, DeploymentLog]:
        log = DeploymentLog(tmp_path / "dep", capacity=10_000)
        return await _run_child(log), log

    code, log = asyncio.run(main())
    assert code == 0
    lines = log.lines(source="replica-0")
    pieces = [line for line in lines if set(line.text) == {"x"}]
    assert "".join(p.text for p in pieces) == "x" * BIG
    assert all(len(p.text) <= MAX_LINE for p in pieces)
    assert [p.continues for p in pieces] == [True] * (len(pieces) - 1) + [False]
    assert [line.text for line in lines if line.text.startswith("line ")] == [
        f"line {i} " + "y" * 60 for i in range(2000)
    ]
    assert lines[-1].text == "still serving" and not lines[-1].continues
    assert lines[0].as_dict()["continues"] is True

    log.flush()
    log.close()
    file_lines = (tmp_path / "dep" / "replica-0.log").read_text().splitlines()
    assert len(file_lines) == len(lines)
    assert file_lines[0].endswith(SPLIT_MARK) and not file_lines[len(pieces) - 1].endswith(SPLIT_MARK)
    assert file_lines[-1].endswith(" still serving")


def test_the_splitter_keeps_utf8_and_line_ends_across_reads() -> None:
    splitter = LineSplitter(limit=4)
    data = "héllo wörld\nab\n€".encode()
    out: list[tuple[str, bool]] = []
    for i in range(len(data)):  # one byte at a time: characters and line ends cut everywhere
        out += splitter.feed(data[i : i + 1])
    out += splitter.feed(b"", final=True)
    assert out == [("héll", True), ("o wö", True), ("rld", False), ("ab", False), ("€", False)]
    assert "".join(text for text, _ in out[:3]) == "héllo wörld"


def test_the_log_file_is_written_by_another_thread_and_reopens_after_close(tmp_path: Path) -> None:
    log = DeploymentLog(tmp_path / "dep")
    log.write("supervisor", "one")
    log.close()
    log.write("supervisor", "two")  # after close: a new writer thread appends
    log.flush()
    log.close()
    texts = [line.split(" ", 1)[1] for line in (tmp_path / "dep" / "supervisor.log").read_text().splitlines()]
    assert texts == ["one", "two"]
