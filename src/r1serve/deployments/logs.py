"""A deployment's log: every line of its replicas' stdout and stderr and of its supervisor, with a
time, kept in a ring buffer for the API and appended to one file per replica.

A child's output is read in chunks, never with ``readline`` (whose 64 KiB limit raised on a longer
line, ended the pump, and left the child blocked on a full pipe): a line longer than ``MAX_LINE``
characters is cut into pieces, each but the last marked ``continues`` (and ``" [continues]"`` in the
file). The files are written by a thread of their own, so the event loop never waits on the disk.

Followers (``GET /v1/deployments/{id}/logs?follow=true``) wait on an asyncio event that is replaced
at each new line: a line is never delivered twice, and one written while a follower was busy is
found by its sequence number on the next read.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import datetime as dt
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("r1serve.deployments")

MAX_LINE = 8192  # characters; a longer line is stored in pieces of this size
_CHUNK = 65536  # bytes read from a child's pipe at a time
SPLIT_MARK = " [continues]"


@dataclass(frozen=True)
class LogLine:
    seq: int
    time: dt.datetime
    source: str  # "replica-0", ..., or "supervisor"
    text: str
    continues: bool = False  # a piece of an over-long line: the next piece of this source goes on with it

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": iso(self.time),
            "source": self.source,
            "line": self.text,
            "continues": self.continues,
        }


def iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class DeploymentLog:
    def __init__(self, directory: Path, capacity: int = 5000) -> None:
        self.directory = directory
        self._lines: deque[LogLine] = deque(maxlen=capacity)
        self._seq = 0
        self._writer = FileWriter(directory)
        self._new = asyncio.Event()

    def write(self, source: str, text: str, *, continues: bool = False) -> LogLine:
        self._seq += 1
        line = LogLine(self._seq, now(), source, text.rstrip("\r\n"), continues)
        self._lines.append(line)
        self._writer.put(source, f"{iso(line.time)} {line.text}{SPLIT_MARK if continues else ''}\n")
        # Wake the followers and give the next ones a fresh event to wait on.
        self._new.set()
        self._new = asyncio.Event()
        return line

    @property
    def last_seq(self) -> int:
        return self._seq

    def lines(
        self, *, source: str | None = None, since: dt.datetime | None = None, after: int = 0, limit: int | None = None
    ) -> list[LogLine]:
        out = [
            line
            for line in self._lines
            if line.seq > after and (source is None or line.source == source) and (since is None or line.time >= since)
        ]
        return out[-limit:] if limit else out

    async def follow(
        self, *, source: str | None = None, since: dt.datetime | None = None, tail: int | None = None
    ) -> AsyncIterator[LogLine]:
        """The matching lines so far (the last ``tail``), then every new one as it is written."""
        backlog = self.lines(source=source, since=since, limit=tail)
        after = backlog[-1].seq if backlog else self._seq
        for line in backlog:
            yield line
        while True:
            new = self._new
            fresh = self.lines(source=source, after=after)
            if not fresh:
                await new.wait()
                continue
            for line in fresh:
                after = line.seq
                yield line

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every line written so far is in its file (blocking: tests and shutdown)."""
        self._writer.flush(timeout)

    def close(self) -> None:
        self._writer.close()


class FileWriter:
    """Appends text to ``DIRECTORY/SOURCE.log`` on a thread of its own, in batches: whatever queued
    up while the last batch was written goes out in one write and one flush per file.

    The thread starts at the first line and ends at :meth:`close`; a line put after that starts a
    new one (a deployment started again after r1serve closed its log still gets its file).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._queue: queue.SimpleQueue[tuple[str, str] | threading.Event | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def put(self, source: str, text: str) -> None:
        self._queue.put((source, text))
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=f"log-writer:{self.directory.name}", daemon=True)
            self._thread.start()

    def flush(self, timeout: float) -> None:
        if self._thread is None or not self._thread.is_alive():
            return
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self._queue.put(None)
        thread.join(timeout)

    def _run(self) -> None:
        files: dict[str, IO[str]] = {}
        try:
            while True:
                batch = [self._queue.get()]
                with contextlib.suppress(queue.Empty):
                    while len(batch) < 1000:
                        batch.append(self._queue.get_nowait())
                stop, flushed = False, []
                touched: set[str] = set()
                for item in batch:
                    if item is None:
                        stop = True
                    elif isinstance(item, threading.Event):
                        flushed.append(item)
                    else:
                        source, text = item
                        self._file(files, source).write(text)
                        touched.add(source)
                for source in touched:
                    files[source].flush()
                for event in flushed:
                    event.set()
                if stop:
                    return
        except OSError:
            # A full or vanished disk must not take the deployment down: the ring buffer still has it.
            log.exception("writing the deployment log under %s failed", self.directory)
        finally:
            for file in files.values():
                with contextlib.suppress(OSError):
                    file.close()

    def _file(self, files: dict[str, IO[str]], source: str) -> IO[str]:
        file = files.get(source)
        if file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            file = files[source] = open(self.directory / f"{source}.log", "a", encoding="utf-8")  # noqa: SIM115
        return file


class LineSplitter:
    """Bytes of a child's output in, whole lines out; a line over ``limit`` characters comes out in
    pieces (``continues`` on all but the last). UTF-8 is decoded incrementally, so a character cut
    between two reads is not mangled."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def feed(self, data: bytes, *, final: bool = False) -> list[tuple[str, bool]]:
        text = self._pending + self._decoder.decode(data, final)
        out: list[tuple[str, bool]] = []
        start = 0
        while True:
            end = text.find("\n", start)
            if end < 0:
                break
            self._cut(text[start:end], out)
            start = end + 1
        rest = text[start:]
        # A line without its end yet: its full pieces go out now (memory stays bounded), the rest waits.
        while len(rest) > self.limit:
            out.append((rest[: self.limit], True))
            rest = rest[self.limit :]
        if final and rest:
            out.append((rest, False))
            rest = ""
        self._pending = rest
        return out

    def _cut(self, line: str, out: list[tuple[str, bool]]) -> None:
        while len(line) > self.limit:
            out.append((line[: self.limit], True))
            line = line[self.limit :]
        out.append((line, False))


async def pump(stream: asyncio.StreamReader, log_: DeploymentLog, source: str) -> None:
    """Copy a child's output into the log until it closes the pipe, whatever the line lengths."""
    splitter = LineSplitter()
    while True:
        data = await stream.read(_CHUNK)
        for text, continues in splitter.feed(data, final=not data):
            log_.write(source, text, continues=continues)
        if not data:
            return
