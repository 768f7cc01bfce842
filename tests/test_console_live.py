"""The console in real Chromium against a real r1serve with the real default model: /docs (Swagger UI from
the package's own files, no network) and the playground at /.

The browser reaches nothing but the server (tests/browser.py aborts every other request and the tests
assert none was tried); any CSP violation, console error, page error or dialog fails a test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from browser import Tab, open_tab

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
