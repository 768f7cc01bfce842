"""The console in real Chromium against a real r1serve with the real default model: /docs (Swagger UI from
the package's own files, no network) and the playground at /.

The browser reaches nothing but the server (tests/browser.py aborts every other request and the tests
assert none was tried); any CSP violation, console error, page error or dialog fails a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from browser import Tab, browser, open_tab, screenshots  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

_WAIT_MS = 300_000  # the real model on 2 shared cores: generous, never asserted on


def test_docs_render_offline_and_try_it_out_answers(browser: object, server_url: str, screenshots: Path) -> None:
    tab: Tab = open_tab(browser, server_url)
    page = tab.page
    page.goto(f"{server_url}/docs")  # type: ignore[attr-defined]
    operation = page.locator("#operations-default-deepseek_chat_deepseek_chat_post")  # type: ignore[attr-defined]
    operation.wait_for()
    assert page.locator(".opblock").count() >= 4  # type: ignore[attr-defined]
    assert page.get_by_text("/v1/chat/completions").first.is_visible()  # type: ignore[attr-defined]
    page.screenshot(path=str(screenshots / "docs.png"), full_page=False)  # type: ignore[attr-defined]

    operation.locator(".opblock-summary").click()
    operation.get_by_role("button", name="Try it out").click()
    body = operation.locator("textarea.body-param__text")
    body.fill('{"prompt": "Say hello.", "max_tokens": 16}')
    operation.get_by_role("button", name="Execute").click()
    status = operation.locator(".live-responses-table tr.response .response-col_status").first
    status.wait_for(timeout=_WAIT_MS)
    assert status.inner_text().strip().startswith("200")
    answer = operation.locator(".live-responses-table tr.response .response-col_description pre").first.inner_text()
    assert '"choices"' in answer and '"chat.completion"' in answer
    page.screenshot(path=str(screenshots / "docs-executed.png"), full_page=False)  # type: ignore[attr-defined]
    tab.assert_clean()


# ----------------------------------------------------------------------------- the playground

# Records every state the reasoning panel and the answer go through, from the DOM's own mutations, so a
# test can tell that the panel was open while the reasoning streamed without racing the model.
_WATCH_PANEL = """
window.__panel = [];
new MutationObserver(() => {
  const msg = document.querySelector("li.msg.assistant:last-child");
  if (!msg) return;
  const details = msg.querySelector("details.reasoning");
  window.__panel.push({
    open: details.open,
    reasoning: msg.querySelector(".reasoning-text").textContent.length,
    answer: msg.querySelector(".answer").textContent.length,
  });
}).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
"""


def _settle(page: object) -> None:
    # The model list has arrived and the picker holds the served model.
    page.wait_for_function("document.querySelector('#model').options.length > 0")  # type: ignore[attr-defined]


def _ask(page: object, text: str) -> object:
    page.fill("#prompt", text)  # type: ignore[attr-defined]
    page.press("#prompt", "Enter")  # type: ignore[attr-defined]
    count = page.locator("li.msg.assistant").count()  # type: ignore[attr-defined]
    return page.locator("li.msg.assistant").nth(count - 1)  # type: ignore[attr-defined]


def _stat(message: object, name: str) -> str:
    return message.locator(f'[data-stat="{name}"] dd').inner_text()  # type: ignore[attr-defined,no-any-return]


def test_chat_streams_reasoning_into_a_panel_that_closes_when_the_answer_starts(
    browser: object, reasoning_server_url: str, screenshots: Path
) -> None:
    tab = open_tab(browser, reasoning_server_url)
    page = tab.page
    page.goto(reasoning_server_url)  # type: ignore[attr-defined]
    _settle(page)
    page.fill("#temperature", "0")  # type: ignore[attr-defined]
    page.fill("#max_tokens", "48")  # type: ignore[attr-defined]
    page.fill("#max_reasoning_tokens", "12")  # type: ignore[attr-defined]
    page.evaluate(_WATCH_PANEL)  # type: ignore[attr-defined]
    requests: list[dict[str, object]] = []
    page.on("request", lambda r: requests.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)  # type: ignore[attr-defined]

    with page.expect_response(lambda r: r.url.endswith("/chat/completions")) as streamed:  # type: ignore[attr-defined]
        first = _ask(page, "Why is the sky blue?")
    page.locator('li.msg.assistant[data-state="done"]').first.wait_for(timeout=_WAIT_MS)  # type: ignore[attr-defined]
    states = page.evaluate("window.__panel")  # type: ignore[attr-defined]
    assert any(s["open"] and s["reasoning"] > 0 and s["answer"] == 0 for s in states), "never open while thinking"
    assert any(not s["open"] and s["answer"] > 0 for s in states)
    details = first.locator("details.reasoning")  # type: ignore[attr-defined]
    assert details.get_attribute("open") is None
    summary = details.locator("summary").inner_text()
    assert summary.startswith("Thought for ") and " s · " in summary and summary.endswith("cut by the thinking budget")
    reasoning_tokens = int(_stat(first, "reasoning_tokens"))
    assert reasoning_tokens >= 12 and f"· {reasoning_tokens} tokens" in summary
    assert int(_stat(first, "prompt_tokens")) > 0 and int(_stat(first, "answer_tokens")) > 0
    assert _stat(first, "ttft").endswith(" ms") and float(_stat(first, "tokens_per_s")) > 0
    assert _stat(first, "request_id")
    answer = first.locator(".answer").inner_text()  # type: ignore[attr-defined]  # rendered markdown
    reasoning = details.locator(".reasoning-text").text_content()
    assert answer.strip() and reasoning.strip()
    # The answer's source, as streamed: what the next turn must send back.
    events = [json.loads(line[5:]) for line in streamed.value.text().splitlines() if line.startswith("data: {")]
    source = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    page.screenshot(path=str(screenshots / "playground.png"))  # type: ignore[attr-defined]

    # The second turn sends the first answer back, exactly (the small model's answer may well repeat
    # some of its reasoning, so equality, not absence, is what shows the reasoning was left out).
    _ask(page, "And at sunset?")
    page.locator('li.msg.assistant[data-state="done"]').nth(1).wait_for(timeout=_WAIT_MS)  # type: ignore[attr-defined]
    history = requests[1]["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]  # type: ignore[index]
    assert history[1]["content"] == source and source.strip()  # type: ignore[index]
    assert all(set(m) == {"role", "content"} for m in history)  # type: ignore[union-attr]
    tab.assert_clean()


def _running(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("r1serve_engine_requests_running{")
    )


def test_stop_ends_the_stream_and_frees_its_sequence(
    browser: object, reasoning_server_url: str, screenshots: Path
) -> None:
    tab = open_tab(browser, reasoning_server_url, width=375, height=800, dark=True)
    page = tab.page
    page.goto(reasoning_server_url)  # type: ignore[attr-defined]
    _settle(page)
    page.fill("#max_tokens", "3000")  # type: ignore[attr-defined]
    message = _ask(page, "Write a very long essay about the history of astronomy.")
    message.locator(".reasoning-text").filter(has_text=" ").wait_for(timeout=_WAIT_MS)  # type: ignore[attr-defined]
    assert _running(reasoning_server_url) >= 1
    page.click("#stop")  # type: ignore[attr-defined]
    page.locator('li.msg.assistant[data-state="done"]').wait_for()  # type: ignore[attr-defined]
    assert message.locator(".note").inner_text() == "stopped"  # type: ignore[attr-defined]
    assert page.locator("#send").is_enabled()  # type: ignore[attr-defined]
    page.screenshot(path=str(screenshots / "playground-375-dark.png"), full_page=True)  # type: ignore[attr-defined]
    # The server notices the closed connection and frees the sequence (waits, never a timed assert).
    deadline = time.monotonic() + 120
    while _running(reasoning_server_url) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _running(reasoning_server_url) == 0
    tab.assert_clean()


def test_keyed_server_takes_a_key_kept_in_memory_only(
    browser: object, auth_server_url: str, api_keys: tuple[str, ...], screenshots: Path
) -> None:
    tab = open_tab(browser, auth_server_url)
    page = tab.page
    page.goto(auth_server_url)  # type: ignore[attr-defined]
    page.get_by_text("This server needs an API key").wait_for()  # type: ignore[attr-defined]
    # The 401 the page asked for is expected here; the browser logs it as a failed resource.
    tab.errors = [e for e in tab.errors if "401" not in e]
    page.fill("#api-key", api_keys[0])  # type: ignore[attr-defined]
    page.press("#api-key", "Tab")  # type: ignore[attr-defined]
    _settle(page)
    page.fill("#max_tokens", "8")  # type: ignore[attr-defined]
    message = _ask(page, "Hello, it's me")
    page.locator('li.msg.assistant[data-state="done"]').wait_for(timeout=_WAIT_MS)  # type: ignore[attr-defined]
    assert message.locator(".error").count() == 0  # type: ignore[attr-defined]
    assert int(_stat(message, "prompt_tokens")) > 0
    # "Copy as curl / Python" reproduce the request with $R1SERVE_API_KEY for the key: run them.
    for kind, argv in (("curl", ["bash", "-c"]), ("python", [sys.executable, "-c"])):
        message.locator(f'button[data-copy="{kind}"]').click()  # type: ignore[attr-defined]
        snippet = message.locator(f'pre.snippet[data-kind="{kind}"]').text_content()  # type: ignore[attr-defined]
        assert "$R1SERVE_API_KEY" in snippet if kind == "curl" else 'os.environ["R1SERVE_API_KEY"]' in snippet
        assert api_keys[0] not in snippet
        env = {**os.environ, "R1SERVE_API_KEY": api_keys[0]}
        ran = subprocess.run([*argv, snippet], capture_output=True, text=True, timeout=300, env=env)
        assert ran.returncode == 0, ran.stderr
        assert "data: [DONE]" in ran.stdout and "chat.completion.chunk" in ran.stdout, ran.stdout[-500:]
    page.screenshot(path=str(screenshots / "playground-keyed-copy-as-python.png"), full_page=True)  # type: ignore[attr-defined]
    # Nowhere a script (or the next page) could read it back: no cookie, no storage.
    assert page.context.cookies() == []  # type: ignore[attr-defined]
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0  # type: ignore[attr-defined]
    assert api_keys[0] not in page.evaluate("document.cookie")  # type: ignore[attr-defined]
    page.reload()  # type: ignore[attr-defined]
    page.get_by_text("This server needs an API key").wait_for()  # type: ignore[attr-defined]
    assert page.input_value("#api-key") == ""  # type: ignore[attr-defined]
    tab.errors = [e for e in tab.errors if "401" not in e]
    tab.assert_clean()
