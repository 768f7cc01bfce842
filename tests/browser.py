"""Real Chromium (Debian's ``/usr/bin/chromium``) driven by Playwright, for the console's tests.

The browser is cut off from everything but the server under test: every request to another origin is
aborted and recorded, so a test can assert that none was attempted. Dialogs, page errors, console errors
and Content-Security-Policy violations are recorded too; :meth:`Tab.assert_clean` fails on any of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

CHROMIUM = os.environ.get("R1SERVE_TEST_CHROMIUM", "/usr/bin/chromium")
_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-default-apps", "--disable-extensions",
]  # fmt: skip

# Runs in every page before its own scripts (Playwright injects it past the page's CSP).
_WATCH_CSP = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolations.push(e.violatedDirective + " " + e.blockedURI);
});
"""


@dataclass
class Tab:
    page: object  # playwright.sync_api.Page (typed loosely: playwright is a test extra)
    origin: str
    foreign_requests: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        violations = self.page.evaluate("window.__cspViolations")  # type: ignore[attr-defined]
        assert violations == [], f"CSP violations: {violations}"
        assert self.errors == [], f"console or page errors: {self.errors}"
        assert self.dialogs == [], f"dialogs opened: {self.dialogs}"
        assert self.foreign_requests == [], f"requests left the origin: {self.foreign_requests}"


def chromium_available() -> bool:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return False
    return Path(CHROMIUM).exists()


# Per module: Playwright's sync API keeps an event loop running while the browser is open, and async tests
# (pytest-asyncio) cannot run beside it, so browser tests sit in modules of their own and close it after.
@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not chromium_available():
        # A failure, not a skip: the test set-up installs both, and a skipped browser test proves nothing.
        pytest.fail(f"needs the playwright package and {CHROMIUM} (scripts/install-test-services.sh)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tests save their screenshots (printed, so that a run's artefacts can be found)."""
    path = Path(os.environ.get("R1SERVE_TEST_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    path.mkdir(parents=True, exist_ok=True)
    print(f"console screenshots: {path}")
    return path


def open_tab(browser: object, origin: str, *, width: int = 1280, height: int = 900, dark: bool = False) -> Tab:
    """A fresh context (no cookies, no cache) whose only reachable host is ``origin``."""
    context = browser.new_context(  # type: ignore[attr-defined]
        viewport={"width": width, "height": height}, color_scheme="dark" if dark else "light"
    )
    page = context.new_page()
    tab = Tab(page, origin)
    allowed = urlsplit(origin).netloc

    def route(r: object) -> None:
        url = r.request.url  # type: ignore[attr-defined]
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob") or parts.netloc == allowed:
            r.continue_()  # type: ignore[attr-defined]
        else:
            tab.foreign_requests.append(url)
            r.abort()  # type: ignore[attr-defined]

    context.route("**/*", route)
    context.add_init_script(_WATCH_CSP)
    page.on("dialog", lambda d: (tab.dialogs.append(d.message), d.dismiss()))
    page.on("pageerror", lambda e: tab.errors.append(f"pageerror: {e}"))
    page.on("console", lambda m: tab.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    return tab


def sign_in(tab: Tab, url: str, key: str) -> None:
    """Sign in by keyboard, as a user would: the key field has the focus, type, Enter."""
    page = tab.page
    page.goto(f"{url}/console/signin")  # type: ignore[attr-defined]
    page.locator("#signin-key:focus").wait_for()  # type: ignore[attr-defined]
    page.keyboard.type(key)  # type: ignore[attr-defined]
    page.keyboard.press("Enter")  # type: ignore[attr-defined]
    page.wait_for_url(f"{url}/")  # type: ignore[attr-defined]
    page.locator("#sign-out").wait_for()  # type: ignore[attr-defined]
