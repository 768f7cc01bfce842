"""Logging for the server: one line per record with the time, level, logger and request id, and the
access log (a line per HTTP request) written in batches.

Every value logged (a record's arguments, the access line's path) has its control characters escaped
(:func:`escape_controls`): a client could otherwise add forged lines, or terminal escapes, to the log
with a percent-encoded newline in a path or a key name.

The request id lives here (``request_id_var``) rather than in the API layer because every layer's
log lines carry it: the engine's, the gateway's and the accounts' too.
"""

from __future__ import annotations

import logging
import threading
import time
from contextvars import ContextVar
from typing import Any, TextIO

request_id_var: ContextVar[str] = ContextVar("r1serve_request_id", default="-")


def escape_controls(text: str) -> str:
    """``text`` with each non-printable character (newlines, ESC, ...) written as its escape (``\\n``)."""
    if text.isprintable():  # the usual case, checked in C
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class RequestIdFilter(logging.Filter):
    """Adds ``%(request_id)s`` to every record (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


# The access log: a line per request, so the one logger whose lines are worth batching.
ACCESS_LOGGER = "r1serve.access"
access_log = logging.getLogger(ACCESS_LOGGER)
_root = logging.getLogger()
# The handler configure_logging installed, while it is still the only place access lines can go.
_installed: BatchedStreamHandler | None = None


def log_access(method: str, path: str, status: int, seconds: float) -> None:
    """The request's access line (INFO on ``r1serve.access``).

    With the set-up :func:`configure_logging` makes (its handler alone on the root logger, nothing
    added to the access logger), the line goes straight into the handler's batch: the same text, built
    from the same format, without a LogRecord and the logging module's passes over it, which were most
    of a line's cost (a line per request). Any other set-up gets the line through the logger."""
    handler = _installed
    if handler is not None and _only_destination(handler):
        if access_log.isEnabledFor(logging.INFO):
            # %-formatting: what the logging module's own format does with these arguments.
            handler.add_access_line("%s %s %d %.0fms" % (method, escape_controls(path), status, seconds * 1000))  # noqa: UP031
        return
    access_log.info("%s %s %d %.0fms", method, path, status, seconds * 1000)  # escaped by the formatter


def _only_destination(handler: BatchedStreamHandler) -> bool:
    """Whether a record of the access logger would reach ``handler`` and nothing else, unfiltered."""
    if access_log.filters or len(_root.handlers) != 1 or _root.handlers[0] is not handler:
        return False
    logger: logging.Logger | None = access_log
    while logger is not _root and logger is not None:  # the loggers a record propagates through
        if logger.handlers or not logger.propagate:
            return False
        logger = logger.parent
    return handler.takes_access_lines()


class BatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes the access log's lines in batches instead of one write (a system
    call) each.

    Written one by one, an access line cost 7.9 us to a file and 10.1 us to a pipe here; batched, 5.6 us
    (formatting, mostly). Only INFO lines of ``r1serve.access`` wait, for at most ``FLUSH_EVERY`` seconds
    (a daemon thread writes them) or until ``MAX_PENDING`` are waiting. Every other line is written at
    once, after what waits, so the order of lines is kept and the server's own messages (start-up,
    warnings, uvicorn's "Shutting down") are never late: whatever stops the server, the access lines of
    the requests it finished have been written before its last message."""

    FLUSH_EVERY = 0.5
    MAX_PENDING = 512

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_periodically, name="r1serve-log-flush", daemon=True)
        self._flusher.start()

    def emit(self, record: logging.LogRecord) -> None:
        # Called with the handler's lock held (Handler.handle).
        try:
            self._pending.append(self.format(record))
            if (
                record.name != ACCESS_LOGGER
                or record.levelno != logging.INFO
                or len(self._pending) >= self.MAX_PENDING
                or self._stop.is_set()  # closed: no timer any more
            ):
                self.flush()
        except Exception:
            self.handleError(record)

    def takes_access_lines(self) -> bool:
        """Whether :meth:`add_access_line` renders what ``emit`` would: INFO passes the handler's level,
        and its formatter and filter are still the ones :func:`configure_logging` gave it."""
        formatter = self.formatter
        return (
            self.level <= logging.INFO
            and isinstance(formatter, _Formatter)
            and len(self.filters) == 1
            and isinstance(self.filters[0], RequestIdFilter)
        )

    def add_access_line(self, message: str) -> None:
        """An access line, formatted as a record of it would be (see :func:`log_access`)."""
        level = logging.getLevelName(logging.INFO)
        line = self.formatter.line(time.time(), level, ACCESS_LOGGER, request_id_var.get(), message)  # type: ignore[union-attr]
        with self.lock:  # type: ignore[union-attr]
            self._pending.append(line)
            if len(self._pending) >= self.MAX_PENDING or self._stop.is_set():
                try:
                    self.flush()
                except Exception:
                    # A broken stream: these lines are lost, as a failed emit loses its record; the
                    # request that logged must not fail for it.
                    pass

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._pending:
                # Taken before the write: a stream that fails loses these lines (as a failed emit loses
                # its record) rather than failing again on every later line.
                lines, self._pending = self._pending, []
                self.stream.write(self.terminator.join(lines) + self.terminator)
            if self.stream and hasattr(self.stream, "flush"):
                self.stream.flush()

    def close(self) -> None:
        self._stop.set()
        try:
            self.flush()
        finally:
            super().close()

    def _flush_periodically(self) -> None:
        while not self._stop.wait(self.FLUSH_EVERY):
            if self._pending:
                try:
                    self.flush()
                except Exception:
                    # A broken stream (a closed pipe): its lines are lost, as they would be one at a time;
                    # later ones are tried again.
                    pass


class _Formatter(logging.Formatter):
    """Renders the time once per second rather than once per line (an access line per request)."""

    def __init__(self, fmt: str, datefmt: str) -> None:
        super().__init__(fmt, datefmt)
        self._datefmt = datefmt
        # One tuple, replaced whole: threads formatting at the same time never pair a second with
        # another second's text.
        self._stamp: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        # The whole message, after its arguments are in (a tuple, a mapping, or text put in by the
        # caller): whatever a client managed to get into it stays on one line.
        message = record.getMessage()
        if not message.isprintable():
            record = logging.makeLogRecord({**record.__dict__, "msg": escape_controls(message), "args": None})
        return super().format(record)

    def formatException(self, ei: Any) -> str:  # noqa: N802
        # A traceback is many lines by nature, and its last names the exception with its message,
        # which may carry a client's text: every line indented (no line of it can pass for a log line,
        # which starts with the time) and its control characters escaped.
        return "\n".join("  " + escape_controls(line) for line in super().formatException(ei).splitlines())

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return "\n".join("  " + escape_controls(line) for line in stack_info.splitlines())

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return self._time(record.created)

    def _time(self, created: float) -> str:
        second = int(created)
        stamp = self._stamp
        if stamp[0] != second:
            stamp = self._stamp = (second, time.strftime(self._datefmt, self.converter(created)))
        return stamp[1]

    def line(self, created: float, level: str, name: str, request_id: str, message: str) -> str:
        """The line ``format`` gives a record with these fields (a message without a traceback)."""
        fields = {"asctime": self._time(created), "levelname": level, "name": name, "request_id": request_id,
                  "message": message}  # fmt: skip
        return self._fmt % fields  # type: ignore[operator]


def configure_logging(level: str = "info") -> None:
    """Console logging for the server, request id included; uvicorn's loggers share the handler."""
    # Per-record work nothing here prints (the format has no file, line, thread or process): the
    # logging HOWTO's "Optimization" settings. Finding the caller walks the stack on every record.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BatchedStreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(_Formatter("%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, BatchedStreamHandler):
            old.close()  # an earlier call's: stops its flusher thread
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    global _installed
    _installed = handler
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
