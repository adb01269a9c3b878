"""The Compare tab in a real browser against the fake CometAPI: a pair, a 2x3 grid, history after restart."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from services.config import Secret
from services.storage.jobs import JobStore
from tests.browser import chromium, running_app
from tests.conftest import FAKE_COMETAPI_KEY

pytestmark = pytest.mark.browser


def _ready_job(settings, finetune_id: str) -> None:
    jobs = JobStore.from_settings(settings)
    job = jobs.create("local", "cometapi", "finetune", "mug-v1", "mug", "h", {"trigger_word": "MUG"})
    jobs.update("local", job.id, remote_id=finetune_id, status="ready", result={"finetune_id": finetune_id})
    jobs.close()


def _open_compare(page, url: str) -> None:
    page.goto(url)
    page.get_by_role("tab", name="3 · Compare").click()
    page.locator("#compare-go").wait_for()


def test_pair_grid_and_history_after_restart(settings, fake_cometapi):
    settings = settings.with_(cometapi_base_url=fake_cometapi.url, cometapi_key=Secret(FAKE_COMETAPI_KEY))
    fake_cometapi.pending_polls = 1
    finetune = fake_cometapi.add_finetune(trigger_word="MUG")
    _ready_job(settings, finetune)

    with chromium() as browser:
        with running_app(settings) as url:
            page = browser.new_page()
            _open_compare(page, url)
            # The ready fine-tune is picked, and the prompt box reminds of its trigger word.
            expect(page.locator("#compare-finetune input")).to_have_value(re.compile("mug-v1"), timeout=10_000)
            page.get_by_text("Use the trigger word “MUG”").wait_for(timeout=10_000)
            page.locator("#compare-prompt textarea").fill("a photo of MUG on a marble table")
            page.click("#compare-go")
            info = page.locator("#compare-pair-info")
            info.get_by_text("both ran at once").wait_for(timeout=30_000)
            assert "flux-pro-1.1-ultra" in info.inner_text() and "seed 42" in info.inner_text()
            page.locator("#compare-base img").wait_for()
            page.locator("#compare-tuned img").wait_for()

            # A 2x3 grid: base + two strengths; the second prompt fails on the fake ('explode').
            page.locator("#grid-prompts textarea").fill("MUG on a desk\nMUG explode")
            page.locator("#grid-strengths textarea, #grid-strengths input").first.fill("0.8, 1.4")
            page.click("#grid-go")
            grid_info = page.locator("#grid-info")
            grid_info.get_by_text("wall time").wait_for(timeout=60_000)
            assert "2 prompt(s) × 3 column(s)" in grid_info.inner_text()
            assert "3 cell(s) failed" in grid_info.inner_text()
            assert page.locator("#grid-gallery img").count() == 6
            page.click("#grid-sheet")
            page.locator("#grid-sheet-file").get_by_text("contact-sheet").wait_for(timeout=15_000)
            page.close()

        tuned_calls = fake_cometapi.requests("/flux/v1/flux-pro-1.1-ultra-finetuned")
        assert sorted(r.json["finetune_strength"] for r in tuned_calls) == [0.8, 0.8, 1.2, 1.4, 1.4]

        # After a restart the history still shows every image that was made (2 + 3 ok cells).
        with running_app(settings) as url:
            page = browser.new_page()
            _open_compare(page, url)
            history = page.locator("#compare-history img")
            history.nth(4).wait_for(timeout=15_000)
            assert history.count() == 5


def test_a_failed_base_image_keeps_its_panel_with_the_reason(settings, fake_cometapi):
    """When the base image fails, its panel shows the reason, as tall as the tuned image's panel, and
    both panels name the fine-tune's provider."""
    settings = settings.with_(cometapi_base_url=fake_cometapi.url, cometapi_key=Secret(FAKE_COMETAPI_KEY))
    fake_cometapi.pending_polls = 0
    finetune = fake_cometapi.add_finetune(trigger_word="MUG")
    _ready_job(settings, finetune)
    fake_cometapi.fail_next("/flux/v1/flux-pro-1.1-ultra", 422, json={"detail": [
        {"loc": ["body", "prompt"], "msg": "base prompt refused"}]})
    with chromium() as browser, running_app(settings) as url:
        page = browser.new_page()
        _open_compare(page, url)
        expect(page.locator("#compare-finetune input")).to_have_value(re.compile("mug-v1"), timeout=10_000)
        page.locator("#compare-tuned").get_by_text("Fine-tune · CometAPI").wait_for(timeout=10_000)
        page.locator("#compare-prompt textarea").fill("a photo of MUG")
        page.click("#compare-go")
        page.locator("#compare-pair-info").get_by_text("base prompt refused").wait_for(timeout=30_000)
        base, tuned = page.locator("#compare-base img"), page.locator("#compare-tuned img")
        base.wait_for(timeout=10_000)
        tuned.wait_for(timeout=10_000)
        assert "Base model · CometAPI · error" in page.locator("#compare-base").inner_text()
        expect(base).to_have_js_property("complete", True)
        expect(tuned).to_have_js_property("complete", True)
        assert (base.evaluate("i => [i.naturalWidth, i.naturalHeight]")
                == tuned.evaluate("i => [i.naturalWidth, i.naturalHeight]"))
        assert base.bounding_box()["height"] == pytest.approx(tuned.bounding_box()["height"], abs=1)
