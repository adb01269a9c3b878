"""The Dataset tab in a real browser: bad inputs and a photo set in, clean dataset out."""
from __future__ import annotations

import re
import zipfile

import pytest

from services.storage.datasets import DatasetStore
from tests import imagefactory as fx
from tests.browser import chromium, running_app, upload_files

pytestmark = pytest.mark.browser


def _cell(page, row: int, col: int):
    return page.locator(f'#dataset-table [data-testid="cell-{row}-{col}"]')


def _edit_caption(page, row: int, text: str, saved_shows: str) -> None:
    """Type a caption into the table, and wait until the gallery (redrawn from disk) shows it saved."""
    _cell(page, row, 1).dblclick()
    # Into the cell's editor once it is there: keys sent before it has focus go nowhere or append.
    editor = _cell(page, row, 1).locator("textarea, input").first
    editor.wait_for(timeout=10_000)
    editor.fill(text)
    editor.press("Enter")
    page.locator("#dataset-gallery").get_by_text(saved_shows).first.wait_for(timeout=15_000)


def test_dataset_tab_end_to_end(settings, tmp_path):
    good = fx.good_set(tmp_path / "good", count=6, size=(1600, 1200))
    bad = fx.bad_set(tmp_path / "bad")
    uploads = [str(p) for p in good] + [str(bad[k]) for k in ("not_image", "zero", "bomb", "truncated", "zip_tricky", "cmyk")]

    with chromium() as browser:
        with running_app(settings) as url:
            page = browser.new_page()
            page.goto(url)
            upload_files(page, "dataset-upload", uploads)
            page.click("#dataset-add")
            report = page.locator("#dataset-report")
            report.get_by_text("Added 10 image(s)").wait_for(timeout=60_000)
            text = report.inner_text()
            # Every bad file has its own reason, and the page keeps working.
            assert "notes.jpg: not a readable image" in text
            assert "empty.jpg: empty file (0 bytes)" in text
            assert "bomb.png: image is too large to open safely" in text
            assert "truncated.jpg: corrupt or truncated image" in text
            assert "tricky.zip:../escape.jpg: unsafe path" in text
            assert "tricky.zip:c/img.jpg: exact duplicate of img.jpg" in text
            assert page.locator("#dataset-gallery img").count() >= 10

            # Trigger word first, then edit one caption by hand in the table.
            page.fill("#dataset-trigger textarea, #dataset-trigger input", "TOK")
            page.click("#dataset-trigger-first")
            _cell(page, 0, 1).get_by_text("TOK").wait_for(timeout=15_000)
            _edit_caption(page, 0, "TOK, a product photo on white", saved_shows="a product photo on white")

            page.click("#dataset-export")
            info = page.locator("#dataset-export-info")
            info.get_by_text("images").wait_for(timeout=30_000)
            assert re.search(r"10 images, 10 captions, [\d.]+ (KB|MB)", info.inner_text())

            name = page.locator("#dataset-picker input").input_value()
            store = DatasetStore(settings.datasets_dir, settings)
            ds = store.open(name)
            assert ds.trigger_word == "TOK"
            assert ds.items[0].caption == "TOK, a product photo on white"
            assert all(i.caption.startswith("TOK") for i in ds.items)
            with zipfile.ZipFile(ds.path / "export" / f"{name}.zip") as zf:
                assert len([n for n in zf.namelist() if n.endswith(".txt")]) == 10

        # Restart: a new app over the same data dir reopens the dataset with its captions.
        with running_app(settings) as url:
            page = browser.new_page()
            page.goto(url)
            page.click("#dataset-picker input")
            page.get_by_role("option", name=name).click()
            _cell(page, 0, 1).get_by_text("a product photo on white").wait_for(timeout=15_000)
            assert "10 image(s), 10 captioned" in page.locator("#dataset-warnings").inner_text()


def test_editing_one_caption_in_a_stale_table_writes_that_caption_only(settings, tmp_path):
    """An auto-caption run saves captions while the page still shows the old, empty ones; the person
    then edits one cell. Only that caption is written: the run's captions stay."""
    from services.storage.datasets import DatasetStores

    store = DatasetStores(settings)("local")
    name = store.create("set").name
    ds, _ = store.add_files(name, fx.good_set(tmp_path / "g", count=3, size=(640, 640)))
    files = [i.file for i in ds.items]
    with chromium() as browser, running_app(settings) as url:
        page = browser.new_page()
        page.goto(url)
        page.locator("#dataset-picker input").click()
        page.get_by_role("option", name=name).click()
        _cell(page, 2, 0).get_by_text(files[2]).wait_for(timeout=15_000)  # the table, captions empty
        # Meanwhile an auto-caption run (another event, another tab) saves two captions.
        store.set_captions(name, {files[1]: "TOK, auto one", files[2]: "TOK, auto two"})
        _edit_caption(page, 0, "TOK, typed by hand", saved_shows="typed by hand")
    saved = {i.file: i.caption for i in store.open(name).items}
    assert saved == {files[0]: "TOK, typed by hand", files[1]: "TOK, auto one", files[2]: "TOK, auto two"}
