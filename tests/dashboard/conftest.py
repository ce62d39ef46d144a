"""A real chromium, driven by Playwright, for the dashboard tests.

The set-up path installs Debian's chromium (``make test`` → ``browser``); Playwright's own browser
download is not used.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    path = os.environ.get("SPLITSERVE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install -y chromium)")
    return path


@pytest.fixture(scope="package")
def browser() -> Iterator[object]:
    # Package scope: playwright's sync API keeps an event loop running in this thread while it is open, and later
    # tests that call asyncio.run() must not find it there.
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class PageProblems:
    """Console errors and uncaught exceptions of a page, as they happen."""

    def __init__(self, page) -> None:
        self.messages: list[str] = []
        page.on(
            "console",
            lambda message: self.messages.append(f"console: {message.text}") if message.type == "error" else None,
        )
        page.on("pageerror", lambda error: self.messages.append(f"uncaught: {error}"))


# The page tries the feed without a token first (a router without admin auth needs none): against one with admin
# auth, that try's 403 is the browser's console line, not a problem of the page's.
TOKENLESS_TRY = "console: Failed to load resource: the server responded with a status of 403 (Forbidden)"


def give_token(page, token: str, problems: PageProblems | None = None) -> None:
    """Types the admin token into the page's field and submits it, once its try without one ended: the page shows
    nothing without it. ``problems``: the page's, if not ``page.problems``."""
    settled = "['no admin token', 'token refused', 'live'].includes(document.querySelector('#connection').textContent)"
    page.wait_for_function(f"() => {settled}")
    problems = problems or getattr(page, "problems", None)
    if problems is not None and TOKENLESS_TRY in problems.messages:
        problems.messages.remove(TOKENLESS_TRY)
    page.fill("#admin-token", token)
    page.press("#admin-token", "Enter")
