"""The console's sign-in and dashboard in real Chromium against a real r1serve with the real default model.

The server starts with one key, ``R1SERVE_ADMIN_KEY`` (an admin). In the browser: sign in with it (by
keyboard); chat in the playground through the session; create a user key on the keys page (shown once),
use it with curl; see both requests in the usage charts; models and health; sign out (the old cookie is
then refused by the server); sign in with the user key (no admin pages); revoke it in the UI (curl then
gets a 401). Every page is screenshotted, light and dark, 1280 and 375 px wide.

The browser reaches nothing but the server; any CSP violation, console error, page error or dialog fails
a test (tests/browser.py).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest
from browser import browser, open_tab, screenshots  # noqa: F401 - fixtures
from browser import sign_in as _sign_in_by_keyboard

pytestmark = pytest.mark.slow

_WAIT_MS = 300_000  # the real model on 2 shared cores: generous, never asserted on
_COOKIE = "r1serve_session"


def _curl_chat(url: str, key: str) -> subprocess.CompletedProcess[str]:
    body = json.dumps({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8})
    return subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", f"{url}/v1/chat/completions", "-H", "Content-Type: application/json",
         "-H", f"Authorization: Bearer {key}", "-d", body],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _nav(page: object) -> list[str]:
    return page.locator("#top nav a").all_inner_texts()  # type: ignore[attr-defined,no-any-return]


def test_sign_in_dashboard_keys_usage_and_sign_out(
    browser: object, admin_server_url: str, admin_key: str, screenshots: Path
) -> None:
    url = admin_server_url
    tab = open_tab(browser, url)
    page = tab.page

    # Signed out, a dashboard page sends the browser to the sign-in page.
    page.goto(f"{url}/console/usage")  # type: ignore[attr-defined]
    page.wait_for_url(f"{url}/console/signin")  # type: ignore[attr-defined]
    page.screenshot(path=str(screenshots / "console-signin.png"))  # type: ignore[attr-defined]
    # A wrong key: the server's words, no session.
    page.fill("#signin-key", "r1-wrong-key-000000000000")  # type: ignore[attr-defined]
    page.click("#signin-submit")  # type: ignore[attr-defined]
    page.locator("#signin-error").filter(has_text="Incorrect API key").wait_for()  # type: ignore[attr-defined]
    tab.errors = [e for e in tab.errors if "401" not in e]  # the refused sign-in, logged by the browser

    _sign_in_by_keyboard(tab, url, admin_key)
    (cookie,) = page.context.cookies()  # type: ignore[attr-defined]
    assert cookie["name"] == _COOKIE and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert admin_key not in cookie["value"] and admin_key[-8:] not in cookie["value"]
    assert page.evaluate("document.cookie") == ""  # type: ignore[attr-defined]  # no script can read it
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0  # type: ignore[attr-defined]
    assert _nav(page) == ["Playground", "Usage", "Keys", "Models", "Deployments", "API docs"]

    # The playground works through the session: no key in the page.
    page.locator("#model option").first.wait_for(state="attached")  # type: ignore[attr-defined]  # no wait_for_function: its polling evals, which the CSP refuses
    page.fill("#max_tokens", "8")  # type: ignore[attr-defined]
    page.fill("#prompt", "Hello there")  # type: ignore[attr-defined]
    page.press("#prompt", "Enter")  # type: ignore[attr-defined]
    message = page.locator('li.msg.assistant[data-state="done"]')  # type: ignore[attr-defined]
    message.wait_for(timeout=_WAIT_MS)
    assert message.locator(".error").count() == 0
    assert int(message.locator('[data-stat="prompt_tokens"] dd').inner_text()) > 0
    page.screenshot(path=str(screenshots / "console-playground-signed-in.png"))  # type: ignore[attr-defined]
    # "Copy as curl" from a signed-in console still needs a key outside the browser: $R1SERVE_API_KEY.
    message.locator('button[data-copy="curl"]').click()
    snippet = message.locator('pre.snippet[data-kind="curl"]').text_content()
    assert "$R1SERVE_API_KEY" in snippet and admin_key not in snippet
    env = {"PATH": "/usr/bin:/bin", "R1SERVE_API_KEY": admin_key}
    ran = subprocess.run(["bash", "-c", snippet], capture_output=True, text=True, timeout=300, env=env)
    assert ran.returncode == 0 and "data: [DONE]" in ran.stdout, ran.stdout[-300:] + ran.stderr

    # Keys: create one with a scope and limits; it is shown once.
    page.click("#top nav >> text=Keys")  # type: ignore[attr-defined]
    page.wait_for_url(f"{url}/console/keys")  # type: ignore[attr-defined]
    page.locator("#keys-table table").wait_for()  # type: ignore[attr-defined]
    page.fill("#key-name", "ui-user")  # type: ignore[attr-defined]
    page.fill("#key-rpm", "100")  # type: ignore[attr-defined]
    page.fill("#key-budget", "5")  # type: ignore[attr-defined]
    page.click("#create-submit")  # type: ignore[attr-defined]
    page.locator("#new-key:not([hidden])").wait_for()  # type: ignore[attr-defined]
    user_key = page.locator("#new-key-value").inner_text().strip()  # type: ignore[attr-defined]
    assert user_key.startswith("r1-")
    row = page.locator('#keys-table tr[data-state="active"]', has_text="ui-user")  # type: ignore[attr-defined]
    row.wait_for()
    assert "100 req/min" in row.inner_text() and "$5 / total" in row.inner_text()
    assert user_key not in row.inner_text()  # the list shows the prefix only
    page.screenshot(path=str(screenshots / "console-keys-created.png"), full_page=True)  # type: ignore[attr-defined]
    page.click("#dismiss-key")  # type: ignore[attr-defined]
    assert user_key not in page.content()  # type: ignore[attr-defined]
    page.reload()  # type: ignore[attr-defined]
    page.locator("#keys-table table").wait_for()  # type: ignore[attr-defined]
    assert user_key not in page.content()  # type: ignore[attr-defined]  # shown once: never again

    # The key made in the UI works with curl.
    ran = _curl_chat(url, user_key)
    assert ran.returncode == 0 and ran.stdout.rstrip().endswith("\n200"), ran.stdout[-300:]
    assert '"chat.completion"' in ran.stdout

    # Usage: both requests (the playground's through the admin session, curl's with the new key).
    page.click("#top nav >> text=Usage")  # type: ignore[attr-defined]
    page.wait_for_url(f"{url}/console/usage")  # type: ignore[attr-defined]
    page.locator("body[data-loaded]").wait_for()  # type: ignore[attr-defined]
    by_key = page.locator('table[data-by="key"]')  # type: ignore[attr-defined]
    user_row = by_key.locator("tr", has_text="ui-user")
    assert user_row.locator('[data-field="requests"]').inner_text() == "1"
    assert int(by_key.locator("tr", has_text="admin").locator('[data-field="requests"]').inner_text()) >= 1
    by_model = page.locator('table[data-by="model"] tbody tr')  # type: ignore[attr-defined]
    assert by_model.count() == 1
    assert int(by_model.locator('[data-field="requests"]').inner_text()) >= 2
    assert int(by_model.locator('[data-field="prompt_tokens"]').inner_text().replace(",", "")) > 0
    assert page.locator("#chart-model svg.bars rect").count() >= 1  # type: ignore[attr-defined]
    assert page.locator("#chart-key svg.bars rect").count() >= 2  # type: ignore[attr-defined]
    # By keyboard: the first Tab reaches the skip link, the next ones the navigation, in order.
    page.keyboard.press("Tab")  # type: ignore[attr-defined]
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"  # type: ignore[attr-defined]
    page.keyboard.press("Tab")  # type: ignore[attr-defined]
    assert page.evaluate("document.activeElement.textContent") == "Playground"  # type: ignore[attr-defined]
    page.focus("#metric")  # type: ignore[attr-defined]
    page.keyboard.press("ArrowDown")  # type: ignore[attr-defined]  # a native select: keys change the chart
    assert page.input_value("#metric") == "prompt_tokens"  # type: ignore[attr-defined]
    page.select_option("#metric", "answer_tokens")  # type: ignore[attr-defined]
    page.screenshot(path=str(screenshots / "console-usage.png"), full_page=True)  # type: ignore[attr-defined]

    # Models and upstreams with their health.
    page.click("#top nav >> text=Models")  # type: ignore[attr-defined]
    page.locator("body[data-loaded]").wait_for()  # type: ignore[attr-defined]
    assert page.locator("#models-table td", has_text="deepseek-reasoner").count() >= 1  # type: ignore[attr-defined]
    assert "ok" in page.locator("#health-table").inner_text()  # type: ignore[attr-defined]
    page.screenshot(path=str(screenshots / "console-models.png"), full_page=True)  # type: ignore[attr-defined]

    # Sign out: the server ends the session, so the old cookie is worth nothing even if replayed.
    page.click("#sign-out")  # type: ignore[attr-defined]
    page.wait_for_url(f"{url}/console/signin")  # type: ignore[attr-defined]
    assert page.context.cookies() == []  # type: ignore[attr-defined]
    replay = httpx.get(
        f"{url}/v1/models", headers={"X-R1serve-Console": "1", "Cookie": f"{_COOKIE}={cookie['value']}"}, timeout=30
    )
    assert replay.status_code == 401 and replay.json()["error"]["code"] == "session_expired"
    tab.assert_clean()

    # A user key: no admin pages, in the navigation or by address.
    user = open_tab(browser, url, width=375, height=800, dark=True)
    _sign_in_by_keyboard(user, url, user_key)
    assert _nav(user.page) == ["Playground", "Usage", "Models", "API docs"]
    user.page.screenshot(path=str(screenshots / "console-playground-375-dark.png"), full_page=True)  # type: ignore[attr-defined]
    user.page.goto(f"{url}/console/usage")  # type: ignore[attr-defined]
    user.page.locator("body[data-loaded]").wait_for()  # type: ignore[attr-defined]
    # Its own usage only.
    assert user.page.locator('table[data-by="key"] tbody tr').all_inner_texts()[0].startswith("ui-user")  # type: ignore[attr-defined]
    assert user.page.locator('table[data-by="key"] tbody tr').count() == 1  # type: ignore[attr-defined]
    user.page.screenshot(path=str(screenshots / "console-usage-375-dark.png"), full_page=True)  # type: ignore[attr-defined]
    denied = user.page.goto(f"{url}/console/keys")  # type: ignore[attr-defined]
    assert denied.status == 403
    assert "needs an admin API key" in user.page.locator("#denied").inner_text()  # type: ignore[attr-defined]
    user.page.screenshot(path=str(screenshots / "console-denied-375-dark.png"))  # type: ignore[attr-defined]
    user.errors = [e for e in user.errors if "403" not in e]  # the refused page, logged by the browser
    user.assert_clean()

    # The admin revokes the key in the UI: curl with it is refused, and its console session ends.
    _sign_in_by_keyboard(tab, url, admin_key)
    page.goto(f"{url}/console/keys")  # type: ignore[attr-defined]
    page.locator('#keys-table tr[data-state="active"]', has_text="ui-user").get_by_role(
        "button", name="Revoke ui-user"
    ).click()  # type: ignore[attr-defined]
    page.locator('#keys-table tr[data-state="revoked"]', has_text="ui-user").wait_for()  # type: ignore[attr-defined]
    page.screenshot(path=str(screenshots / "console-keys.png"), full_page=True)  # type: ignore[attr-defined]
    assert _curl_chat(url, user_key).stdout.rstrip().endswith("\n401")
    user.page.goto(f"{url}/console/usage")  # type: ignore[attr-defined]
    user.page.wait_for_url(f"{url}/console/signin")  # type: ignore[attr-defined]
    tab.assert_clean()


# An attacker's page on the same site (127.0.0.1, another port: SameSite=Strict still sends the cookie
# there) tries to spend with the signed-in browser's session: a form post, a no-cors fetch with the cookie,
# and a fetch that sets the console's header (which needs a CORS pre-flight this server never grants).
_ATTACK = """<!doctype html><html><body>
<form id="f" method="POST" action="{url}/deepseek_chat"><input name="prompt" value="spend"></form>
<script>
window.__done = (async () => {{
  const body = JSON.stringify({{messages: [{{role: "user", content: "spend"}}], max_tokens: 4}});
  try {{ await fetch("{url}/v1/chat/completions", {{method: "POST", mode: "no-cors", credentials: "include",
    headers: {{"Content-Type": "text/plain"}}, body}}); }} catch (e) {{}}
  try {{ await fetch("{url}/v1/chat/completions", {{method: "POST", credentials: "include",
    headers: {{"Content-Type": "application/json", "X-R1serve-Console": "1"}}, body}}); }} catch (e) {{}}
  return true;
}})();
</script></body></html>"""


def _requests_so_far(url: str, admin_key: str) -> int:
    usage = httpx.get(f"{url}/v1/admin/usage", headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)
    return int(usage.json()["totals"]["requests"])


def test_a_same_site_page_cannot_spend_with_the_session(browser: object, admin_server_url: str, admin_key: str) -> None:
    url = admin_server_url
    tab = open_tab(browser, url)
    _sign_in_by_keyboard(tab, url, admin_key)
    before = _requests_so_far(url, admin_key)
    page = tab.page
    attacker = "http://127.0.0.1:9/attack.html"  # same site as the server, another origin
    page.route(attacker, lambda r: r.fulfill(status=200, content_type="text/html", body=_ATTACK.format(url=url)))  # type: ignore[attr-defined]
    page.goto(attacker)  # type: ignore[attr-defined]
    page.evaluate("window.__done")  # type: ignore[attr-defined]
    with page.expect_navigation():  # type: ignore[attr-defined]
        page.evaluate("document.getElementById('f').submit()")  # type: ignore[attr-defined]
    refused = page.locator("body").inner_text()  # type: ignore[attr-defined]
    assert '"error"' in refused and "origin" in refused.lower(), refused
    # Nothing was generated or billed on the session's key, and the session itself still works.
    assert _requests_so_far(url, admin_key) == before
    page.goto(f"{url}/console/usage")  # type: ignore[attr-defined]
    page.locator("body[data-loaded]").wait_for()  # type: ignore[attr-defined]
