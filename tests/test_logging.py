"""The server's log set-up: request ids on every line; access lines written in batches, in order, never
late behind the server's own messages and never lost on shutdown."""

from __future__ import annotations

import io
import logging
import re
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator

import pytest

from r1serve.api.context import scope_header
from r1serve.logs import (
    ACCESS_LOGGER,
    BatchedStreamHandler,
    RequestIdFilter,
    _Formatter,
    configure_logging,
    log_access,
    request_id_var,
)


@pytest.fixture
def attach() -> Iterator[Callable[[logging.Handler], None]]:
    """Route the access logger and one other logger to a handler only, for the test."""
    loggers = [logging.getLogger(ACCESS_LOGGER), logging.getLogger("r1serve.test")]
    saved = [(lg.handlers[:], lg.propagate, lg.level) for lg in loggers]

    def attach(handler: logging.Handler) -> None:
        for lg in loggers:
            lg.handlers[:] = [handler]
            lg.propagate = False
            lg.setLevel(logging.INFO)

    yield attach
    for lg, (handlers, propagate, level) in zip(loggers, saved, strict=False):
        lg.handlers[:], lg.propagate = handlers, propagate
        lg.setLevel(level)


def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


access = logging.getLogger(ACCESS_LOGGER)
other = logging.getLogger("r1serve.test")


@pytest.fixture
def batched(attach: Callable[[logging.Handler], None]) -> Iterator[tuple[BatchedStreamHandler, io.StringIO]]:
    """A BatchedStreamHandler writing to a StringIO, attached to the test loggers, closed afterwards."""
    stream = io.StringIO()
    handler = BatchedStreamHandler(stream)
    attach(handler)
    try:
        yield handler, stream
    finally:
        handler.close()


def test_access_lines_are_batched_then_written_by_the_timer(
    batched: tuple[BatchedStreamHandler, io.StringIO],
) -> None:
    handler, stream = batched
    access.info("one")
    access.info("two")
    assert stream.getvalue() == ""  # held: no write per line
    assert _wait_for(lambda: stream.getvalue() == "one\ntwo\n", timeout=10 * handler.FLUSH_EVERY)


@pytest.mark.parametrize("level", [logging.INFO, logging.WARNING])
def test_any_other_line_goes_out_at_once_after_what_was_held(
    batched: tuple[BatchedStreamHandler, io.StringIO], level: int
) -> None:
    _, stream = batched
    access.info("request 1")
    other.log(level, "Shutting down")
    assert stream.getvalue() == "request 1\nShutting down\n"
    access.warning("an access line at WARNING")
    assert stream.getvalue().endswith("an access line at WARNING\n")


def test_a_full_batch_is_written_without_waiting(batched: tuple[BatchedStreamHandler, io.StringIO]) -> None:
    handler, stream = batched
    for i in range(handler.MAX_PENDING):
        access.info("line %d", i)
    assert stream.getvalue().count("\n") == handler.MAX_PENDING


def test_close_and_logging_shutdown_write_what_is_pending(attach: Callable[[logging.Handler], None]) -> None:
    stream = io.StringIO()
    handler = BatchedStreamHandler(stream)
    attach(handler)
    access.info("last words")
    handler.close()
    assert stream.getvalue() == "last words\n"
    access.info("after close")  # no timer any more: written at once
    assert stream.getvalue() == "last words\nafter close\n"

    stream2 = io.StringIO()
    handler2 = BatchedStreamHandler(stream2)
    attach(handler2)
    access.info("at exit")
    logging.shutdown([weakref.ref(handler2)])  # what the interpreter runs at exit
    assert stream2.getvalue() == "at exit\n"


class _FailsOnce(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def write(self, text: str) -> int:
        if not self.failed:
            self.failed = True
            raise OSError("disk full")
        return super().write(text)


def test_the_timer_survives_a_failed_write(attach: Callable[[logging.Handler], None]) -> None:
    stream = _FailsOnce()
    handler = BatchedStreamHandler(stream)
    attach(handler)
    try:
        access.info("lost with the failed write")
        assert _wait_for(lambda: stream.failed, timeout=10 * handler.FLUSH_EVERY)
        access.info("written later")
        assert _wait_for(lambda: stream.getvalue() == "written later\n", timeout=10 * handler.FLUSH_EVERY)
    finally:
        handler.close()


def test_the_time_stamp_follows_the_clock() -> None:
    formatter = _Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    first = logging.LogRecord("x", logging.INFO, "", 0, "a", None, None)
    second = logging.LogRecord("x", logging.INFO, "", 0, "b", None, None)
    first.created = 3600.2
    second.created = 3601.9
    assert formatter.format(first).split()[0] != formatter.format(second).split()[0]
    again = logging.LogRecord("x", logging.INFO, "", 0, "c", None, None)
    again.created = 3601.1
    expected = time.strftime("%H:%M:%S", time.localtime(3601))
    assert formatter.format(again) == f"{expected} c"


def test_configure_logging_stamps_the_request_id(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for flag in ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing"):
        monkeypatch.setattr(logging, flag, getattr(logging, flag))  # restored after the test
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        configure_logging("info")
        handler = root.handlers[0]
        assert isinstance(handler, BatchedStreamHandler)
        assert any(isinstance(f, RequestIdFilter) for f in handler.filters)
        token = request_id_var.set("req_abc")
        try:
            access.info("POST /v1/chat/completions 200 3ms")
        finally:
            request_id_var.reset(token)
        handler.flush()
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert re.fullmatch(
            r"\d\d:\d\d:\d\d INFO    r1serve.access \[req_abc\] POST /v1/chat/completions 200 3ms", line
        )
    finally:
        for h in root.handlers:
            if h not in saved_handlers:
                h.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


_KILLED_BY_SIGTERM = """
import logging, os, signal, time
from r1serve.logs import configure_logging, log_access
configure_logging("info")
log_access("GET", "/v1/models", 200, 0.001)
logging.getLogger("uvicorn.error").info("Shutting down")
os.kill(os.getpid(), signal.SIGTERM)  # what uvicorn does after its shutdown: no exit hooks run
time.sleep(5)
"""


def test_a_server_killed_by_sigterm_has_written_its_access_lines() -> None:
    """``docker stop``: uvicorn logs "Shutting down", shuts down, then dies of the re-raised SIGTERM,
    long before the flush timer: that line must write the access lines held before it."""
    done = subprocess.run([sys.executable, "-c", _KILLED_BY_SIGTERM], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGTERM
    lines = done.stderr.splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == ["GET /v1/models 200 1ms", "Shutting down"], done.stderr


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch) -> Iterator[BatchedStreamHandler]:
    """configure_logging's set-up, writing to a StringIO; everything restored after the test. Tests call
    :func:`_alone` first: pytest adds its own capturing handlers to the root logger for the test's body."""
    for flag in ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing"):
        monkeypatch.setattr(logging, flag, getattr(logging, flag))
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    configure_logging("info")
    handler = root.handlers[0]
    assert isinstance(handler, BatchedStreamHandler)
    handler.setStream(io.StringIO())
    try:
        yield handler
    finally:
        handler.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def _alone(handler: BatchedStreamHandler) -> None:
    logging.getLogger().handlers[:] = [handler]


def _written(handler: BatchedStreamHandler) -> list[str]:
    handler.flush()
    return handler.stream.getvalue().splitlines()  # type: ignore[attr-defined,no-any-return]


def _no_logging_module(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(record: logging.LogRecord) -> None:
        raise AssertionError("the line went through the logging module")

    monkeypatch.setattr(access, "handle", refuse)


def test_log_access_writes_the_line_the_logger_writes(
    configured: BatchedStreamHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    _alone(configured)
    token = request_id_var.set("req_same")
    try:
        with monkeypatch.context() as patch:
            _no_logging_module(patch)  # the direct path, for this line only
            log_access("POST", "/v1/chat/completions", 201, 0.0034)
        access.info("%s %s %d %.0fms", "POST", "/v1/chat/completions", 201, 3.4)
    finally:
        request_id_var.reset(token)
    direct, through_logging = _written(configured)
    # The same text but for the clock, which may have ticked between the two lines.
    assert direct.split(" ", 1)[1] == through_logging.split(" ", 1)[1]
    assert direct.split(" ", 1)[1] == "INFO    r1serve.access [req_same] POST /v1/chat/completions 201 3ms"
    assert re.fullmatch(r"\d\d:\d\d:\d\d", direct.split(" ", 1)[0])


@pytest.mark.parametrize("where", ["root", "parent", "access", "parent-no-propagate"])
def test_log_access_goes_through_logging_once_the_set_up_changes(configured: BatchedStreamHandler, where: str) -> None:
    _alone(configured)
    extra = io.StringIO()
    extra_handler = logging.StreamHandler(extra)
    logger = {"root": logging.getLogger(), "parent": logging.getLogger("r1serve"), "access": access,
              "parent-no-propagate": logging.getLogger("r1serve")}[where]  # fmt: skip
    logger.addHandler(extra_handler)  # another destination: it must get the line too
    if where == "parent-no-propagate":
        logger.propagate = False
    try:
        log_access("GET", "/health", 200, 0.0)
    finally:
        logger.removeHandler(extra_handler)
        logger.propagate = True
    assert extra.getvalue() == "GET /health 200 0ms\n"
    assert len(_written(configured)) == (0 if where == "parent-no-propagate" else 1)


def test_log_access_follows_the_access_loggers_level(configured: BatchedStreamHandler) -> None:
    _alone(configured)
    access.setLevel(logging.WARNING)  # access lines turned off
    try:
        log_access("GET", "/health", 200, 0.0)
    finally:
        access.setLevel(logging.NOTSET)
    log_access("GET", "/v1/models", 200, 0.0)
    assert [line.split("] ", 1)[1] for line in _written(configured)] == ["GET /v1/models 200 0ms"]


def test_a_broken_stream_does_not_fail_the_request(configured: BatchedStreamHandler) -> None:
    _alone(configured)

    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError

    configured.setStream(Broken())
    for _ in range(BatchedStreamHandler.MAX_PENDING):  # a full batch is written from log_access
        log_access("GET", "/health", 200, 0.0)
    configured.setStream(io.StringIO())
    log_access("GET", "/v1/models", 200, 0.0)  # the handler goes on with a working stream
    assert [line.split("] ", 1)[1] for line in _written(configured)] == ["GET /v1/models 200 0ms"]


def test_scope_header_reads_the_first_value_and_caches_per_scope() -> None:
    scope: dict[str, object] = {
        "headers": [(b"x-request-id", b"one"), (b"authorization", b"Bearer k"), (b"x-request-id", b"two")]
    }
    assert scope_header(scope, b"x-request-id") == b"one"
    assert scope_header(scope, b"authorization") == b"Bearer k"
    assert scope_header(scope, b"content-length") is None
    assert "r1serve.headers" in scope  # built once, kept for the request's other lookups
    scope["headers"] = [(b"x-request-id", b"three")]  # a middleware replaced them
    assert scope_header(scope, b"x-request-id") == b"three"
    assert scope_header({"headers": []}, b"x-request-id") is None


def test_client_text_cannot_forge_lines_through_mappings_messages_or_exceptions() -> None:
    formatter = _Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    forged = "x\n06:47:00 INFO forged\x1b[31m"

    def render(msg: str, args: object = None, exc: bool = False) -> str:
        exc_info = None
        if exc:
            try:
                raise ValueError(forged)
            except ValueError:
                exc_info = sys.exc_info()
        record = logging.LogRecord("r1serve.test", logging.ERROR, "", 0, msg, args, exc_info)  # type: ignore[arg-type]
        return formatter.format(record)

    for text in (render("user %(name)s", ({"name": forged},)), render(f"user {forged}"), render("%s", (forged,)),
                 render("failed", exc=True)):  # fmt: skip
        lines = text.splitlines()
        assert not [line for line in lines if line.startswith("06:47:00")], lines
        assert "\x1b" not in text and "\\x1b[31m" in text
    assert render("failed", exc=True).splitlines()[1].startswith("  Traceback")
