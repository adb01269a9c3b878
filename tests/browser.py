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
def launched(settings, **create_kwargs) -> Iterator[tuple["object", str]]:
    """Start the real app on a free loopback port and yield ``(demo, url)``."""
    import app as app_module

    demo = app_module.create_app(settings, **create_kwargs)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **app_module.launch_options(settings))
    try:
        yield demo, url
    finally:
        demo.close()  # also stops its tracker and local trainings


@contextlib.contextmanager
def running_app(settings, **create_kwargs) -> Iterator[str]:
    """Start the real app on a free loopback port and yield its URL."""
    with launched(settings, **create_kwargs) as (_, url):
        yield url


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


def wait_for_train_dataset(page, timeout: float = 15_000) -> None:
    """The Train tab has picked its dataset and filled in the fields that follow from it.

    Filling the form before this races the dataset handler, which writes the name and trigger word.
    """
    page.locator("#train-dataset-info").get_by_text("image(s)").wait_for(timeout=timeout)


def click_launch(page, expect: str = "Launched", timeout: float = 30_000) -> str:
    """Click Launch and return the result text; fail with that text when it is not ``expect``."""
    import re

    page.click("#train-launch")
    result = page.locator("#train-launch-result")
    result.get_by_text(re.compile("Launched|Launch failed|⏳")).first.wait_for(timeout=timeout)
    text = result.inner_text()
    assert expect in text, f"expected {expect!r} after Launch, the page says: {text!r}"
    return text


def upload_files(page, elem_id: str, paths) -> None:
    """Put files in a gr.File and wait until every one has reached the server (one preview row each);
    an event fired before that would see only some of them."""
    from playwright.sync_api import expect

    paths = [str(p) for p in paths]
    page.locator(f"#{elem_id} input[type=file]").set_input_files(paths)
    expect(page.locator(f"#{elem_id} tr.file")).to_have_count(len(paths), timeout=60_000)


def client_owner(settings, client) -> str:
    """The owner a gradio_client Client is, hosted: from the visitor cookie the server minted for it."""
    from components.identity import VISITOR_COOKIE
    from services.storage import visitors

    owner = visitors.owner_of(settings, client.cookies.get(VISITOR_COOKIE))
    assert owner, f"the server minted no visitor cookie for this client: {client.cookies}"
    return owner
