"""A real browser for the web client's tests and benchmark: Debian's chromium (make install-browser) driven by
Playwright for Python."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import Browser, Playwright, sync_playwright

CHROMIUM = Path(os.environ.get("BLINK_CHROMIUM", "/usr/bin/chromium"))
# headless, as root in a sandbox with no network: no GPU, no sandbox, none of Chrome's background connections
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextmanager
def chromium() -> Iterator[tuple[Playwright, Browser]]:
    """A headless chromium; AssertionError (saying how to install it) when CHROMIUM is not there."""
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `make install-browser` installs Debian's chromium"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield pw, browser
        finally:
            browser.close()
