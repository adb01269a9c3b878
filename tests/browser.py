"""Helpers for browser tests: run the app on loopback, drive Debian's chromium with Playwright."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextlib.contextmanager
def running_app(settings, **create_kwargs) -> Iterator[str]:
    """Start the real app on a free loopback port and yield its URL."""
    import app as app_module

    demo = app_module.create_app(settings, **create_kwargs)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **app_module.launch_options(settings))
    try:
        yield url
    finally:
        demo.studio_tracker.stop()
        demo.close()


@contextlib.contextmanager
def chromium() -> Iterator["object"]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make test`, which installs Debian's chromium.")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()
