"""The console's deployments page in real Chromium against a real r1serve, with a real replica process
serving the real default model (one replica, to keep the machine's two cores for the model).

Signed in with the admin key: create a deployment from the template picker, watch its replica become
READY and its logs arrive over the follow stream, copy the endpoint URL (the clipboard's text), call it
with httpx and get an answer (and with the page's curl), extend, a refused scale shows the API's message, a chatty log stays capped
in the DOM, stop, and the URL then answers 404. A user key sees no deployments page. Any CSP violation,
console error, page error or dialog fails the test (tests/browser.py).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from browser import browser, open_tab, screenshots, sign_in  # noqa: F401 - fixtures
from conftest import DEFAULT_MODEL, LiveServer

pytestmark = pytest.mark.slow

ADMIN = "sk-admin-console-deploy-7a6b5c4d"
_WAIT_MS = 600_000  # a replica loads the real model on 2 shared cores: generous, never asserted on
_LOG_CAP = 400  # deployments.js keeps this many log lines


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    env = {"R1SERVE_ADMIN_KEY": ADMIN, "R1SERVE_N_THREADS": "1", "R1SERVE_DEPLOYMENT_PRICE_PER_HOUR": "0.5"}
    live = LiveServer(tmp_path_factory.mktemp("console-deployments"), "console-deployments", env, ("--parallel", "2"))
    try:
        live.wait_ready()
        yield live
    finally:
        live.stop()


def _admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


def _chat(endpoint: str) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}  # no model, as Nosana's
    return httpx.post(f"{endpoint}/chat/completions", json=body, headers=_admin(), timeout=600)


def test_create_watch_copy_call_stop(browser: object, server: LiveServer, screenshots: Path) -> None:
    url = server.url
    tab = open_tab(browser, url)
    page = tab.page
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)  # type: ignore[attr-defined]
    sign_in(tab, url, ADMIN)
    page.click("#top nav >> text=Deployments")  # type: ignore[attr-defined]
    page.wait_for_url(f"{url}/console/deployments")  # type: ignore[attr-defined]
    page.locator("body[data-loaded]").wait_for()  # type: ignore[attr-defined]
    assert page.locator("#list-empty").is_visible()  # type: ignore[attr-defined]

    # The picker holds the templates the server knows; the default model's weights are here.
    page.locator(f'#dep-template option[value="{DEFAULT_MODEL}"]').wait_for(state="attached")  # type: ignore[attr-defined]
    options = page.locator("#dep-template option").evaluate_all("os => os.map(o => o.value)")  # type: ignore[attr-defined]
    assert "deepseek-r1-distill-qwen-1.5b" in options
    page.select_option("#dep-template", DEFAULT_MODEL)  # type: ignore[attr-defined]

    # A bad name: the API's own message, and nothing created.
    page.fill("#dep-name", "Not_A_Name")  # type: ignore[attr-defined]
    page.click("#create-submit")  # type: ignore[attr-defined]
    page.locator("#create-error").filter(has_text="name must be 1-63 lower-case").wait_for()  # type: ignore[attr-defined]
    tab.errors = [e for e in tab.errors if "400" not in e]  # the refused create, logged by the browser

    page.fill("#dep-name", "console-r1")  # type: ignore[attr-defined]
    page.fill("#dep-replicas", "1")  # type: ignore[attr-defined]
    page.select_option("#dep-strategy", "SIMPLE")  # type: ignore[attr-defined]
    page.fill("#dep-timeout", "30")  # type: ignore[attr-defined]
    page.click("#create-submit")  # type: ignore[attr-defined]
    page.wait_for_url(f"{url}/console/deployments#console-r1")  # type: ignore[attr-defined]

    # The start as it happens: the replica's state in the detail, and its own output in the live logs.
    detail = page.locator('#detail[data-name="console-r1"]')  # type: ignore[attr-defined]
    detail.wait_for()
    page.locator('#logs li[data-source="supervisor"]', has_text="CREATED").first.wait_for()  # type: ignore[attr-defined]
    page.locator('#replicas-table tr[data-replica="replica-0"][data-status="READY"]').wait_for(timeout=_WAIT_MS)  # type: ignore[attr-defined]
    page.locator('#logs li[data-source="replica-0"]', has_text="Uvicorn running").first.wait_for(timeout=_WAIT_MS)  # type: ignore[attr-defined]
    page.locator('#detail[data-status="RUNNING"]').wait_for(timeout=_WAIT_MS)  # type: ignore[attr-defined]
    row = page.locator('#deployments-table tr[data-name="console-r1"][data-status="RUNNING"]')  # type: ignore[attr-defined]
    row.wait_for()
    assert row.locator('[data-field="ready"]').inner_text() == "1 / 1"
    assert row.locator('[data-field="strategy"]').inner_text() == "SIMPLE"
    assert row.locator('[data-field="left"]').inner_text().endswith(" min")
    assert row.locator('[data-field="cost"]').inner_text().startswith("$")
    assert "$0.5 per replica-hour" in page.locator("#detail-summary").inner_text()  # type: ignore[attr-defined]
    page.screenshot(path=str(screenshots / "console-deployments.png"), full_page=True)  # type: ignore[attr-defined]

    # Copy the endpoint URL: the clipboard holds exactly the URL the button carries.
    endpoint = f"{url}/deployments/console-r1/v1"
    button = row.locator("button.copy-url")
    assert button.get_attribute("data-url") == endpoint
    button.click()
    row.locator("button.copy-url", has_text="Copied").wait_for()
    copied = page.evaluate("navigator.clipboard.readText()")  # type: ignore[attr-defined]
    assert copied == endpoint
    answer = _chat(copied)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "console-r1" and answer.json()["choices"][0]["message"]["content"]
    page.locator('#replicas-table tr[data-replica="replica-0"] td[data-field="requests"]', has_text="1").wait_for()  # type: ignore[attr-defined]

    # The ready-to-paste curl names $R1SERVE_API_KEY, not the key, and answers.
    page.click("#curl-panel summary")  # type: ignore[attr-defined]
    snippet = page.locator("#detail-curl").inner_text()  # type: ignore[attr-defined]
    assert "$R1SERVE_API_KEY" in snippet and ADMIN not in snippet and f"{endpoint}/chat/completions" in snippet
    env = {"PATH": "/usr/bin:/bin", "R1SERVE_API_KEY": ADMIN}
    ran = subprocess.run(["bash", "-c", snippet], capture_output=True, text=True, timeout=600, env=env)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["choices"][0]["message"]["content"], ran.stdout

    # The logs of one source: the view follows again with replica=, and shows nothing else.
    page.select_option("#logs-source", "replica-0")  # type: ignore[attr-defined]
    page.locator('#logs[data-source="replica-0"] li', has_text="Uvicorn running").first.wait_for()  # type: ignore[attr-defined]
    assert set(page.locator("#logs li").evaluate_all("ls => ls.map(l => l.dataset.source)")) == {"replica-0"}  # type: ignore[attr-defined]
    page.select_option("#logs-source", "")  # type: ignore[attr-defined]
    page.locator('#logs[data-source=""] li[data-source="supervisor"]').first.wait_for()  # type: ignore[attr-defined]

    # Extend by the buttons; a scale beyond the server's maximum shows the API's message, changes nothing.
    page.fill("#extend-minutes", "15")  # type: ignore[attr-defined]
    page.click("#op-extend")  # type: ignore[attr-defined]
    page.locator("#detail-summary", has_text="timeout 45 min").wait_for()  # type: ignore[attr-defined]
    page.locator('#events-table tr[data-reason="EXTENDED"]').wait_for(state="attached")  # type: ignore[attr-defined]
    page.fill("#scale-replicas", "99")  # type: ignore[attr-defined]
    page.click("#op-scale")  # type: ignore[attr-defined]
    page.locator("#detail-error", has_text="replicas must be between 0 and").wait_for()  # type: ignore[attr-defined]
    tab.errors = [e for e in tab.errors if "400" not in e]

    # A chatty log: more lines than the view keeps. The newest arrive, the DOM holds the cap, no more.
    chatter = _LOG_CAP + 60
    with httpx.Client(base_url=url, headers=_admin(), timeout=60) as client:
        for _ in range(chatter):
            client.post("/v1/deployments/console-r1/extend", json={"minutes": 1}).raise_for_status()
    last = f"timeout {45 + chatter - 1:g} -> {45 + chatter:g} minutes"
    page.locator("#logs li", has_text=last).wait_for()  # type: ignore[attr-defined]
    assert page.locator("#logs li").count() == _LOG_CAP  # type: ignore[attr-defined]
    # Readable on a phone, in the dark.
    page.set_viewport_size({"width": 375, "height": 800})  # type: ignore[attr-defined]
    page.emulate_media(color_scheme="dark")  # type: ignore[attr-defined]
    page.screenshot(path=str(screenshots / "console-deployments-375-dark.png"), full_page=True)  # type: ignore[attr-defined]
    page.set_viewport_size({"width": 1280, "height": 900})  # type: ignore[attr-defined]
    page.emulate_media(color_scheme="light")  # type: ignore[attr-defined]

    # Stop: the deployment and its replica are STOPPED, and the copied URL answers 404 saying so.
    page.click("#op-stop")  # type: ignore[attr-defined]
    page.locator('#detail[data-status="STOPPED"]').wait_for(timeout=_WAIT_MS)  # type: ignore[attr-defined]
    page.locator('#replicas-table tr[data-replica="replica-0"][data-status="STOPPED"]').wait_for()  # type: ignore[attr-defined]
    page.locator('#deployments-table tr[data-name="console-r1"][data-status="STOPPED"]').wait_for()  # type: ignore[attr-defined]
    page.locator('#logs li[data-source="supervisor"]', has_text="STOPPED").first.wait_for()  # type: ignore[attr-defined]
    assert page.locator("#op-stop").is_disabled() and page.locator("#op-start").is_enabled()  # type: ignore[attr-defined]
    gone = _chat(copied)
    assert gone.status_code == 404 and "stopped" in gone.json()["error"]["message"]
    assert gone.json()["error"]["code"] == "deployment_stopped"
    page.screenshot(path=str(screenshots / "console-deployments-stopped.png"), full_page=True)  # type: ignore[attr-defined]
    tab.assert_clean()


def test_a_user_key_sees_no_deployments_page(browser: object, server: LiveServer) -> None:
    created = httpx.post(f"{server.url}/v1/admin/keys", json={"name": "console-user"}, headers=_admin(), timeout=30)
    assert created.status_code == 200, created.text
    tab = open_tab(browser, server.url, width=375, height=800)
    sign_in(tab, server.url, created.json()["key"])
    assert "Deployments" not in tab.page.locator("#top nav a").all_inner_texts()  # type: ignore[attr-defined]
    denied = tab.page.goto(f"{server.url}/console/deployments")  # type: ignore[attr-defined]
    assert denied.status == 403
    assert "needs an admin API key" in tab.page.locator("#denied").inner_text()  # type: ignore[attr-defined]
    # And the API says no to the same key's management calls.
    body = {"name": "nope", "template": DEFAULT_MODEL, "replicas": 0}
    refused = httpx.post(
        f"{server.url}/v1/deployments", json=body, headers={"Authorization": f"Bearer {created.json()['key']}"}
    )
    assert refused.status_code == 403
    tab.errors = [e for e in tab.errors if "403" not in e]  # the refused page, logged by the browser
    tab.assert_clean()
