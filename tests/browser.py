"""Open a local HTML page in real headless Chromium with the network cut off.

One helper for every test whose product is a page (clean's contact sheet, the report, DVC's
plots page): it loads the file, records every request the page makes, refuses any that leaves
the file system, waits for the page to settle and takes a screenshot. Tests then assert on the
rendered DOM (image sizes, table rows) and on the list of refused requests.

Uses Debian's ``chromium`` (installed by ``.ci/run``) through Playwright's Python client; the
browser Playwright would download is never used.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
# Flags from this machine's notes: without the background-networking ones Chromium tries to
# reach Google's hosts at start; every connection is refused here anyway.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def chromium_path() -> str:
    for path in CHROMIUM_CANDIDATES:
        if Path(path).exists():
            return path
    found = shutil.which("chromium")
    if found:
        return found
    pytest.fail("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")


@dataclass
class Page:
    """What a test can assert on after the page rendered."""

    screenshot: Path
    external_requests: list[str] = field(default_factory=list)
    local_requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    evaluate: Callable[[str], Any] = lambda js: None


def open_page(html: Path, screenshot: Path, check: Callable[["Page"], None],
              width: int = 1280, height: int = 900, wait_ms: int = 300) -> Page:
    """Render ``html`` offline, screenshot it, and run ``check(page)`` while it is open.

    Every request whose URL is not ``file:``, ``data:`` or ``blob:`` is aborted and listed in
    ``external_requests``, so a test asserts ``not page.external_requests``.
    """
    from playwright.sync_api import sync_playwright

    html = Path(html).resolve()
    result = Page(screenshot=Path(screenshot))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": width, "height": height}, offline=True)
            page = context.new_page()

            def route(r):
                url = r.request.url
                if url.startswith(("file:", "data:", "blob:", "about:")):
                    result.local_requests.append(url)
                    r.continue_()
                else:
                    result.external_requests.append(url)
                    r.abort()

            page.route("**/*", route)
            page.on("console", lambda m: result.console_errors.append(m.text) if m.type == "error" else None)
            page.goto(html.as_uri(), wait_until="load")
            page.wait_for_timeout(wait_ms)
            page.screenshot(path=str(result.screenshot), full_page=True)
            result.evaluate = page.evaluate
            check(result)
        finally:
            browser.close()
    return result
