"""Hostile model output in the playground, in real Chromium (no model: see below).

Browser tests live in modules of their own, with no async tests: Playwright's sync API runs an event loop
while its browser is open, and pytest-asyncio cannot start one beside it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from browser import browser, open_tab, screenshots  # noqa: F401 - fixtures
from fake_upstream import FakeUpstream, Reply

# ----------------------------------------------------------------------------- hostile model output, in Chromium
# The exact bytes must be hostile, which no real model can be made to write on demand: a real
# `r1serve serve --upstream` fronts a fake upstream on loopback (tests/fake_upstream.py) that streams them,
# split into 5-character chunks so that every tag arrives in pieces.

HOSTILE = (
    "<img src=x onerror=alert(1)> <script>alert(2)</script> ![pixel](https://evil.example/p.png) "
    '<img src="https://evil.example/i.png"> <a href="javascript:alert(3)">link</a> '
    '<svg onload=alert(4)></svg> <iframe src="https://evil.example/"></iframe> '
    '<link rel=stylesheet href="https://evil.example/s.css"> <style>body{display:none}</style>'
)


@contextmanager
def _hostile_server(tmp_path: Path) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    reply = Reply(fields=[("reasoning_content", "Thinking: " + HOSTILE), ("content", HOSTILE)])
    upstream = FakeUpstream(default=reply)
    asyncio.run_coroutine_threadsafe(upstream.start(), loop).result(30)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if not k.startswith("R1SERVE_")}
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - the server's whole life
    proc = subprocess.Popen(
        [sys.executable, "-m", "r1serve", "serve", "--upstream", upstream.base_url, "--port", str(port),
         "--reasoning-dialect", "reasoning_content"],
        cwd=tmp_path, env={**base, "R1SERVE_DATA_DIR": str(tmp_path / "data")},
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        asyncio.run_coroutine_threadsafe(upstream.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_hostile_model_output_renders_as_inert_text(browser: object, tmp_path: Path, screenshots: Path) -> None:
    with _hostile_server(tmp_path) as url:
        tab = open_tab(browser, url)
        page = tab.page
        page.goto(url)  # type: ignore[attr-defined]
        page.wait_for_function("document.querySelector('#model').options.length > 0")  # type: ignore[attr-defined]
        page.fill("#prompt", "Say something dangerous.")  # type: ignore[attr-defined]
        page.click("#send")  # type: ignore[attr-defined]
        message = page.locator('li.msg.assistant[data-state="done"]')  # type: ignore[attr-defined]
        message.wait_for(timeout=60_000)
        # Every byte arrived and is shown as text; nothing became an element.
        assert message.locator(".answer").text_content() == HOSTILE
        assert message.locator(".reasoning-text").text_content() == "Thinking: " + HOSTILE
        for tag in ("img", "script", "svg", "iframe", "a", "link", "style"):
            assert page.locator(f"#messages {tag}").count() == 0, tag  # type: ignore[attr-defined]
        assert page.locator("body").is_visible()  # type: ignore[attr-defined]
        message.locator("details.reasoning summary").click()  # open the panel: its text is inert too
        page.screenshot(path=str(screenshots / "playground-hostile-output.png"))  # type: ignore[attr-defined]
        tab.assert_clean()  # no dialog, no request beyond the origin, no CSP violation, no console error
