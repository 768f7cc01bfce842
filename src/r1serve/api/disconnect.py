"""Client disconnects: the one mechanism that stops a generation whose client hung up.

A :class:`Watch` cancels the request's own task when ``http.disconnect`` arrives before the response
is complete, whether the request is waiting for a whole answer, for a stream's first delta, or
mid-stream. The cancellation closes the engine stream (and so the generation) on its way out, and
the hot path (api/hotpaths.py) settles the meter as cancelled.

The watcher (a task waiting on ``receive``, cancelled at the end) costs a request more CPU than its
routing and metering together, and most gateway requests are over within milliseconds, before a
hang-up could save anything. So it starts only for requests still running after ``WATCH_AFTER``
seconds (see :class:`_Pending`); one that has already disconnected by then is seen at once.
"""

from __future__ import annotations

import asyncio
import weakref

from starlette.types import Receive

# A request still running this long (up to twice this long) gets its disconnect watcher.
WATCH_AFTER = 0.1


class Watch:
    """Cancels the current task when the client disconnects before ``done`` is set."""

    __slots__ = ("disconnected", "done", "task", "watcher", "receive", "pending")

    def __init__(self, receive: Receive) -> None:
        self.disconnected = False
        self.done = False
        self.task = asyncio.current_task()
        self.receive = receive
        self.watcher: asyncio.Task[None] | None = None
        loop = asyncio.get_running_loop()
        pending = _pending.get(loop)
        if pending is None:
            pending = _pending[loop] = _Pending()
        self.pending = pending
        pending.add(self)

    def start(self) -> None:
        if not self.done and self.watcher is None:
            self.watcher = asyncio.get_running_loop().create_task(self._watch(self.receive))

    async def _watch(self, receive: Receive) -> None:
        # The body has been read: the next message can only be http.disconnect (servers also send it
        # once the response is complete, which is what ``done`` is for: it is set before the last
        # message of the response is sent).
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self.done and self.task is not None:
            self.disconnected = True
            self.task.cancel()

    def stop(self) -> None:
        self.done = True
        self.pending.discard(self)
        if self.watcher is not None:
            self.watcher.cancel()
            # The cancelled watcher keeps its CancelledError, whose traceback holds the watcher's frame,
            # which holds this object: without these lines every watched request would leave a reference
            # cycle through both tasks and everything their frames reference, for the garbage collector
            # to find (it was ~10% of a busy server's CPU).
            self.watcher = None
        self.task = None


class _Pending:
    """An event loop's watches whose watcher has not started, in two generations: every ``WATCH_AFTER``
    seconds the older one gets its watchers and the younger one becomes the older. One timer per loop,
    running while any request is pending, instead of one per request."""

    def __init__(self) -> None:
        # No reference to the loop: it is this object's key in the weak dictionary below.
        self.timer: asyncio.TimerHandle | None = None
        self.young: set[Watch] = set()
        self.old: set[Watch] = set()

    def add(self, watch: Watch) -> None:
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(WATCH_AFTER, self._tick)
        self.young.add(watch)

    def discard(self, watch: Watch) -> None:
        self.young.discard(watch)
        self.old.discard(watch)

    def _tick(self) -> None:
        due, self.old, self.young = self.old, self.young, set()
        for watch in due:
            watch.start()
        self.timer = asyncio.get_running_loop().call_later(WATCH_AFTER, self._tick) if self.old else None


# Per event loop (tests run apps on several, a TestClient in a thread of its own).
_pending: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pending] = weakref.WeakKeyDictionary()
