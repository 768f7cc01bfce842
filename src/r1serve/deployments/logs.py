"""A deployment's log: every line of its replicas' stdout and stderr and of its supervisor, with a
time, kept in a ring buffer for the API and appended to one file per replica.

Followers (``GET /v1/deployments/{id}/logs?follow=true``) wait on an asyncio event that is replaced
at each new line: a line is never delivered twice, and one written while a follower was busy is
found by its sequence number on the next read.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


@dataclass(frozen=True)
class LogLine:
    seq: int
    time: dt.datetime
    source: str  # "replica-0", ..., or "supervisor"
    text: str

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": iso(self.time), "source": self.source, "line": self.text}


def iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class DeploymentLog:
    def __init__(self, directory: Path, capacity: int = 5000) -> None:
        self.directory = directory
        self._lines: deque[LogLine] = deque(maxlen=capacity)
        self._seq = 0
        self._files: dict[str, IO[str]] = {}
        self._new = asyncio.Event()

    def write(self, source: str, text: str) -> LogLine:
        self._seq += 1
        line = LogLine(self._seq, now(), source, text.rstrip("\r\n"))
        self._lines.append(line)
        file = self._files.get(source)
        if file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            file = self._files[source] = open(self.directory / f"{source}.log", "a", encoding="utf-8")  # noqa: SIM115
        file.write(f"{iso(line.time)} {line.text}\n")
        file.flush()
        # Wake the followers and give the next ones a fresh event to wait on.
        self._new.set()
        self._new = asyncio.Event()
        return line

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

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()
