"""The server's log set-up: request ids on every line, access lines written in batches but never lost."""

from __future__ import annotations

import io
import logging
import re
import time

import pytest

from r1serve.api.context import BatchedStreamHandler, RequestIdFilter, _Formatter, configure_logging, request_id_var


def _logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"r1serve.test.{id(handler)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def _wait_for(predicate: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_info_lines_are_batched_then_flushed_by_the_timer() -> None:
    stream = io.StringIO()
    handler = BatchedStreamHandler(stream)
    try:
        log = _logger(handler)
        log.info("one")
        log.info("two")
        assert stream.getvalue() == ""  # held: no write per line
        assert _wait_for(lambda: stream.getvalue() == "one\ntwo\n", timeout=5 * handler.FLUSH_EVERY)
    finally:
        handler.close()


def test_a_warning_goes_out_at_once_after_what_was_held() -> None:
    stream = io.StringIO()
    handler = BatchedStreamHandler(stream)
    try:
        log = _logger(handler)
        log.info("before")
        log.warning("trouble")
        assert stream.getvalue() == "before\ntrouble\n"
    finally:
        handler.close()


def test_a_full_batch_is_written_without_waiting() -> None:
    stream = io.StringIO()
    handler = BatchedStreamHandler(stream)
    try:
        log = _logger(handler)
        for i in range(handler.MAX_PENDING):
            log.info("line %d", i)
        assert stream.getvalue().count("\n") == handler.MAX_PENDING
    finally:
        handler.close()


def test_close_and_logging_shutdown_write_what_is_pending() -> None:
    stream = io.StringIO()
    handler = BatchedStreamHandler(stream)
    _logger(handler).info("last words")
    handler.close()
    assert stream.getvalue() == "last words\n"

    stream2 = io.StringIO()
    handler2 = BatchedStreamHandler(stream2)
    _logger(handler2).info("at exit")
    logging.shutdown([logging.weakref.ref(handler2)])  # what the interpreter runs at exit
    assert stream2.getvalue() == "at exit\n"


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


def test_configure_logging_stamps_the_request_id(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        configure_logging("info")
        handler = root.handlers[0]
        assert isinstance(handler, BatchedStreamHandler)
        assert any(isinstance(f, RequestIdFilter) for f in handler.filters)
        token = request_id_var.set("req_abc")
        try:
            logging.getLogger("r1serve.access").info("POST /v1/chat/completions 200 3ms")
        finally:
            request_id_var.reset(token)
        handler.flush()
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert re.fullmatch(r"\d\d:\d\d:\d\d INFO    r1serve.access \[req_abc\] POST /v1/chat/completions 200 3ms", line)
    finally:
        for h in root.handlers:
            if h not in saved_handlers:
                h.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
