"""Hostile model output and a long markdown stream in the playground, in real Chromium (no model: see below).

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


# The answer is markdown: what markdown makes of it is checked too (code highlighted, a table, emphasis).
MARKDOWN = "**bold** and `code`\n\n```python\ndef f(x):\n    return x + 1\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"


# A model group whose first target refuses connections: one failure opens its circuit (no retries, no
# health checks to close it), and the request fails over to the fake.
_GROUP = """
[gateway]
retries = 0
health_interval = 0
breaker_threshold = 1
breaker_cooldown = 600

[providers.dead]
preset = "vllm"
base_url = "http://127.0.0.1:{dead}/v1"
model = "fake-r1"

[providers.fake]
preset = "vllm"
base_url = "{fake}"
model = "fake-r1"
dialect = "reasoning_content"

[[routes]]
name = "deepseek-r1"
policy = "priority"
default = true
targets = [{{ provider = "dead" }}, {{ provider = "fake", priority = 1 }}]
"""


@contextmanager
def _fronted_fake(tmp_path: Path, reply: Reply, *, group_with_dead_target: bool = False) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    upstream = FakeUpstream(default=reply)
    asyncio.run_coroutine_threadsafe(upstream.start(), loop).result(30)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if not k.startswith("R1SERVE_")}
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - the server's whole life
    source = ["--upstream", upstream.base_url, "--reasoning-dialect", "reasoning_content"]
    if group_with_dead_target:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]  # closed again: connecting there is refused
        (tmp_path / "providers.toml").write_text(_GROUP.format(dead=dead, fake=upstream.base_url))
        source = ["--providers-file", str(tmp_path / "providers.toml")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "r1serve", "serve", *source, "--port", str(port)],
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
    reply = Reply(fields=[("reasoning_content", "Thinking: " + HOSTILE), ("content", MARKDOWN + HOSTILE)])
    with _fronted_fake(tmp_path, reply) as url:
        tab = open_tab(browser, url)
        page = tab.page
        page.goto(url)  # type: ignore[attr-defined]
        page.wait_for_function("document.querySelector('#model').options.length > 0")  # type: ignore[attr-defined]
        page.fill("#prompt", "Say something dangerous.")  # type: ignore[attr-defined]
        page.click("#send")  # type: ignore[attr-defined]
        message = page.locator('li.msg.assistant[data-state="done"]')  # type: ignore[attr-defined]
        message.wait_for(timeout=60_000)
        # The markdown is rendered: emphasis, a highlighted code block, a table.
        answer = message.locator(".answer")
        assert answer.locator("strong").inner_text() == "bold"
        assert answer.locator("pre code.language-python .hljs-keyword").first.inner_text() == "def"
        assert answer.locator("table td").all_inner_texts() == ["1", "2"]
        # The raw HTML the model wrote is shown as the text it is; the markdown image is a note, not a load.
        shown = answer.text_content()
        for raw in (
            "<img src=x onerror=alert(1)>",
            "<script>alert(2)</script>",
            "<svg onload=alert(4)></svg>",
            '<iframe src="https://evil.example/"></iframe>',
            "<style>body{display:none}</style>",
        ):
            assert raw in shown, raw
        assert "[image: pixel] https://evil.example/p.png" in shown
        assert message.locator(".reasoning-text").text_content() == "Thinking: " + HOSTILE
        for tag in ("img", "script", "svg", "iframe", "link", "style", "form", "input"):
            assert page.locator(f"#messages {tag}").count() == 0, tag  # type: ignore[attr-defined]
        # The only links are the ones markdown made from bare addresses: never javascript:, never a referrer.
        for link in page.locator("#messages .answer a").all():  # type: ignore[attr-defined]
            assert link.get_attribute("href").startswith("https://evil.example/")
            assert link.get_attribute("rel") == "noopener noreferrer"
        assert page.locator("body").is_visible()  # type: ignore[attr-defined]
        message.locator("details.reasoning summary").click()  # open the panel: its text is inert too
        page.screenshot(path=str(screenshots / "playground-hostile-output.png"))  # type: ignore[attr-defined]
        tab.assert_clean()  # no dialog, no request beyond the origin, no CSP violation, no console error


# ----------------------------------------------------------------------------- a long stream stays responsive

# A markdown answer of 4,000 chunks (one token each, as a model streams), with code blocks all along so that
# every re-render parses and highlights a growing document.
_LINE = "Step {i}: add `x{i}` to the **total**.\n\n```python\ntotal += x{i}  # running sum\n```\n\n"
_LONG = "".join(_LINE.format(i=i) for i in range(120))

# Counts animation frames and, at each one, the renders the message has done so far (data-renders), and the
# long tasks the page had (PerformanceObserver), so the test can tell renders per frame without timing.
_WATCH_FRAMES = """
window.__frames = [];
window.__longTasks = [];
new PerformanceObserver((list) => {
  for (const e of list.getEntries()) window.__longTasks.push(Math.round(e.duration));
}).observe({entryTypes: ["longtask"]});
(function tick() {
  const msg = document.querySelector("li.msg.assistant");
  window.__frames.push(msg ? Number(msg.dataset.renders || 0) : 0);
  requestAnimationFrame(tick);
})();
"""


def test_a_long_markdown_stream_renders_at_most_once_per_frame(
    browser: object, tmp_path: Path, screenshots: Path
) -> None:
    chunk = max(1, len(_LONG) // 4000)
    reply = Reply(fields=[("content", _LONG)], chunk=chunk, chunk_delay=0.001)
    with _fronted_fake(tmp_path, reply) as url:
        tab = open_tab(browser, url)
        page = tab.page
        page.goto(url)  # type: ignore[attr-defined]
        page.wait_for_function("document.querySelector('#model').options.length > 0")  # type: ignore[attr-defined]
        page.evaluate(_WATCH_FRAMES)  # type: ignore[attr-defined]
        page.fill("#prompt", "Sum them up, step by step.")  # type: ignore[attr-defined]
        page.click("#send")  # type: ignore[attr-defined]
        message = page.locator('li.msg.assistant[data-state="done"]')  # type: ignore[attr-defined]
        message.wait_for(timeout=120_000)
        page.evaluate("new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")  # type: ignore[attr-defined]
        frames = page.evaluate("window.__frames")  # type: ignore[attr-defined]
        chunks = int(message.get_attribute("data-chunks"))
        renders = int(message.get_attribute("data-renders"))
        print(
            f"chunks={chunks} renders={renders} frames={len(frames)} long tasks={page.evaluate('window.__longTasks')}"
        )  # type: ignore[attr-defined]
        assert chunks >= 3900  # the stream really was some 4,000 deltas
        # Between two frames, at most one render (the final one, after the stream ended, may share a frame
        # with the last scheduled one): the page never re-renders per delta.
        steps = [b - a for a, b in zip(frames, frames[1:], strict=False)]
        assert max(steps) <= 2 and sum(1 for s in steps if s == 2) <= 1, steps
        assert renders < chunks / 4
        # Everything arrived and was rendered: all 120 code blocks, highlighted.
        assert message.locator(".answer pre code.language-python").count() == 120
        assert message.locator(".answer").inner_text().rstrip().endswith("total += x119  # running sum")
        page.screenshot(path=str(screenshots / "playground-long-markdown.png"))  # type: ignore[attr-defined]
        tab.assert_clean()


# ----------------------------------------------------------------------------- models, upstreams and circuits


def test_models_page_shows_a_group_with_an_open_circuit(browser: object, tmp_path: Path, screenshots: Path) -> None:
    with _fronted_fake(tmp_path, Reply(), group_with_dead_target=True) as url:
        # One request: the dead target fails (its circuit opens), the fake answers.
        body = {"model": "deepseek-r1", "messages": [{"role": "user", "content": "hi"}]}
        answered = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert answered.status_code == 200, answered.text
        tab = open_tab(browser, url)
        page = tab.page
        page.goto(f"{url}/console/models")  # type: ignore[attr-defined]
        page.locator("body[data-loaded]").wait_for()  # type: ignore[attr-defined]
        models = page.locator("#models-table").inner_text()  # type: ignore[attr-defined]
        assert "deepseek-r1" in models and "deepseek-reasoner" in models
        rows = page.locator("#health-table tbody tr").all_inner_texts()  # type: ignore[attr-defined]
        assert rows[0].startswith("deepseek-r1") and "group (priority)" in rows[0]
        dead = next(r for r in rows if "dead" in r)
        fake = next(r for r in rows if "fake" in r)
        assert "open" in dead.split("\t") and "down" in dead.split("\t"), dead
        assert "closed" in fake.split("\t") and "ok" in fake.split("\t"), fake
        # An open server shows no upstream addresses or error text to a caller without an admin key.
        assert "127.0.0.1" not in page.locator("#health-table").inner_text()  # type: ignore[attr-defined]
        page.screenshot(path=str(screenshots / "console-models-circuits.png"), full_page=True)  # type: ignore[attr-defined]
        tab.assert_clean()
