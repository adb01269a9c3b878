"""The Train tab in a real browser against the fake CometAPI: launch, restart the app, see it finish."""
from __future__ import annotations

import re
import threading

import pytest
from playwright.sync_api import expect

from services.config import Secret
from services.storage.datasets import DatasetStores
from services.storage.jobs import JobStore
from tests import imagefactory as fx
from tests.browser import chromium, click_launch, running_app, wait_for_train_dataset
from tests.conftest import FAKE_COMETAPI_KEY

pytestmark = pytest.mark.browser


def _open_train_tab(page, url: str) -> None:
    page.goto(url)
    page.get_by_role("tab", name="2 · Train").click()
    page.locator("#train-launch").wait_for()


def test_launch_restart_and_see_it_finish(settings, fake_cometapi, tmp_path):
    settings = settings.with_(cometapi_base_url=fake_cometapi.url, cometapi_key=Secret(FAKE_COMETAPI_KEY))
    store = DatasetStores(settings)("local")
    name = store.create("mug").name
    store.add_files(name, fx.good_set(tmp_path / "g", count=6, size=(800, 800)))
    store.set_trigger_word(name, "MUG")
    fake_cometapi.finetune_pending_polls = 10**6  # held pending until the test lets it finish

    with chromium() as browser:
        # First run: the tracker looks once, then not for a minute, so the job is still pending at restart.
        with running_app(settings, track_interval=60) as url:
            page = browser.new_page()
            _open_train_tab(page, url)
            assert "CometAPI is configured" in page.locator("#train-banner").inner_text()
            wait_for_train_dataset(page)
            page.get_by_label("product").check()
            name_box = page.locator("#train-name textarea, #train-name input").first
            expect(name_box).to_have_value("mug-product", timeout=10_000)  # the mode's presets have landed
            name_box.fill("mug-v1")
            click_launch(page)
            jobs = page.locator("#train-jobs [role=gridcell]")
            jobs.filter(has_text="mug-v1").first.wait_for()
            assert "ready" not in " ".join(jobs.all_inner_texts())
            page.close()

        assert len(fake_cometapi.requests("/flux/v1/finetune")) == 1
        # Second run over the same data dir: tracking resumes and the job finishes.
        with running_app(settings, track_interval=0.5) as url:
            page = browser.new_page()
            _open_train_tab(page, url)
            cells = page.locator("#train-jobs [role=gridcell]")
            cells.filter(has_text="mug-v1").first.wait_for(timeout=15_000)
            assert "ready" not in " ".join(cells.all_inner_texts())
            # Tracked again after the restart: it finishes while the page watches, and the page says so.
            [job] = JobStore.from_settings(settings).list("local")
            fake_cometapi.release(job.remote_id)
            cells.filter(has_text="ready").first.wait_for(timeout=30_000)
            page.get_by_text("Fine-tune 'mug-v1' is ready").wait_for(timeout=10_000)
            cells.filter(has_text="mug-v1").first.click()
            detail = page.locator("#train-job-detail")
            detail.get_by_text("finetune_id").wait_for()
            assert "mode=product" in detail.inner_text()
        assert len(fake_cometapi.requests("/flux/v1/finetune")) == 1


def test_unavailable_endpoint_shows_banner_and_error(settings, fake_cometapi, tmp_path):
    settings = settings.with_(cometapi_base_url=fake_cometapi.url, cometapi_key=Secret(FAKE_COMETAPI_KEY))
    store = DatasetStores(settings)("local")
    name = store.create("mug").name
    store.add_files(name, fx.good_set(tmp_path / "g", count=5, size=(640, 640)))
    fake_cometapi.finetune_unavailable = "html"
    with chromium() as browser, running_app(settings) as url:
        page = browser.new_page()
        _open_train_tab(page, url)
        wait_for_train_dataset(page)
        page.locator("#train-name textarea, #train-name input").first.fill("mug-v1")
        assert "temporarily unavailable" in click_launch(page, expect="Launch failed")
        assert "Local engine" in page.locator("#train-banner").inner_text()
        cells = page.locator("#train-jobs [role=gridcell]")
        assert "failed" in " ".join(cells.all_inner_texts())


def test_no_key_banner(settings):
    with chromium() as browser, running_app(settings) as url:
        page = browser.new_page()
        _open_train_tab(page, url)
        # With no key the local engine is the default; CometAPI says what it is missing.
        page.locator("#train-banner").get_by_text("Local engine").wait_for(timeout=15_000)
        page.locator("#train-provider").get_by_label("CometAPI").check()
        page.locator("#train-banner").get_by_text("No CometAPI key is set").wait_for(timeout=15_000)


def test_local_job_cancel_then_resume(settings, tmp_path, monkeypatch):
    """The local engine in the browser: cancel keeps the checkpoint, resume finishes from it.

    Also the race that once froze this page: a poll that read the jobs before Resume and answered
    after it. A barrier holds one poll between its read and its reply while Resume runs; its late
    reply must not switch polling off, or the page never shows the job finish."""
    pytest.importorskip("diffusers")
    import components.train_tab as train_tab

    store = DatasetStores(settings)("local")
    name = store.create("cup").name
    store.add_files(name, fx.good_set(tmp_path / "g", count=5, size=(640, 480)))
    armed, held, release = threading.Event(), threading.Event(), threading.Event()
    real_queue_markdown = train_tab.queue_markdown

    def queue_markdown(*args):  # called by a poll after it has read the jobs, before it replies
        if armed.is_set() and not held.is_set():
            held.set()
            release.wait(60)
        return real_queue_markdown(*args)

    monkeypatch.setattr(train_tab, "queue_markdown", queue_markdown)
    with chromium() as browser, running_app(settings, track_interval=0.5) as url:
        try:
            page = browser.new_page()
            _open_train_tab(page, url)
            page.locator("#train-banner").get_by_text("Local engine").wait_for(timeout=15_000)
            expect(page.locator("#train-dataset input")).to_have_value(re.compile("cup"), timeout=15_000)
            wait_for_train_dataset(page)
            iterations = page.locator("#train-iterations input[type=number]")
            iterations.fill("600")
            iterations.press("Enter")
            click_launch(page)
            cells = page.locator("#train-jobs [role=gridcell]")
            # Past the first steps (before them there is no checkpoint, and Resume says so).
            # In the first half, so that the cancel lands well before the end even on a slow machine.
            cells.filter(has_text=re.compile(r"^\s*([1-9]|[1-4]\d)%\s*$")).first.wait_for(timeout=60_000)
            # The line over the table names the job that holds the engine (everyone else's waits for it).
            page.locator("#train-queue").get_by_text(
                re.compile(r"Local engine: busy with 'cup-\w+' \(step \d+ of 600\)")).wait_for(timeout=15_000)
            page.click("#train-cancel")
            cells.filter(has_text="cancelled").first.wait_for(timeout=30_000)
            armed.set()
            assert held.wait(60), "no poll came while the job was cancelled"  # it has read: 'cancelled'
            page.click("#train-resume")
            page.get_by_text("Resuming").first.wait_for(timeout=60_000)
            release.set()  # the stale poll answers now, after Resume did
            cells.filter(has_text="ready").first.wait_for(timeout=240_000)
            assert "100%" in " ".join(cells.all_inner_texts())
            page.locator("#train-queue").get_by_text("Local engine: idle.").wait_for(timeout=15_000)
        finally:
            release.set()


def test_user_text_is_shown_as_text_never_as_html(settings, fake_cometapi, tmp_path):
    """A fine-tune name is echoed in a toast, the launch line and the job details: as text, never markup."""
    settings = settings.with_(cometapi_base_url=fake_cometapi.url, cometapi_key=Secret(FAKE_COMETAPI_KEY))
    store = DatasetStores(settings)("local")
    name = store.create("mug").name
    store.add_files(name, fx.good_set(tmp_path / "g", count=5, size=(640, 640)))
    hostile = 'mug <img src=x id=pwned onerror="window.pwned=1"><b>bold</b>'
    with chromium() as browser, running_app(settings) as url:
        page = browser.new_page()
        _open_train_tab(page, url)
        wait_for_train_dataset(page)
        page.locator("#train-name textarea, #train-name input").first.fill(hostile)
        click_launch(page)
        page.get_by_text(f"Launched {hostile}.").wait_for(timeout=15_000)  # the toast, word for word
        assert hostile in page.locator("#train-launch-result").inner_text()
        assert hostile in page.locator("#train-job-detail").inner_text()
        assert page.locator("#pwned").count() == 0 and page.locator("b", has_text="bold").count() == 0
        assert page.evaluate("window.pwned") is None


def test_a_failed_publish_clears_the_token_box(settings):
    """The Hugging Face token is used once and cleared on every outcome, a failure included."""
    token = "hf_FAKEtoken0123456789abcdefSECRET"
    with chromium() as browser, running_app(settings) as url:
        page = browser.new_page()
        _open_train_tab(page, url)
        page.locator("#train-publish-box").get_by_text("Publish a local LoRA").click()
        box = page.locator("#train-publish-token input")
        box.fill(token)
        page.locator("#train-publish-repo textarea, #train-publish-repo input").first.fill("me/my-lora")
        page.click("#train-publish")  # no job selected: it fails
        page.locator("#train-publish-result").get_by_text("Publish failed: No job is selected.").wait_for(
            timeout=15_000)
        expect(box).to_have_value("")
        assert token not in page.content()


def test_a_selected_job_shows_only_the_controls_its_provider_offers(settings, fake_cometapi):
    """A CometAPI job reports no loss or samples and can't be resumed, published or exported from here:
    picking it hides the plot, the gallery, Resume, the publish box and the LoRA downloads; picking a
    ready local job shows them again."""
    settings = settings.with_(cometapi_base_url=fake_cometapi.url, cometapi_key=Secret(FAKE_COMETAPI_KEY))
    jobs = JobStore.from_settings(settings)
    for provider, name in (("cometapi", "mug-hosted"), ("local", "mug-local")):
        job = jobs.create("local", provider, "finetune", name, "mug", "h", {"trigger_word": "MUG"})
        jobs.update("local", job.id, remote_id=f"{provider}-1", status="ready", result={"finetune_id": f"{provider}-1"})
    jobs.close()
    controls = ("#train-loss", "#train-samples", "#train-resume", "#train-publish-box", "#train-export-box")
    with chromium() as browser, running_app(settings) as url:
        page = browser.new_page()
        _open_train_tab(page, url)
        cells = page.locator("#train-jobs [role=gridcell]")
        for name, visible in (("mug-hosted", False), ("mug-local", True), ("mug-hosted", False)):
            cells.filter(has_text=name).first.click()
            page.locator("#train-job-detail").get_by_text(name).wait_for(timeout=15_000)
            for control in controls:
                if visible:
                    expect(page.locator(control)).to_be_visible(timeout=15_000)
                else:
                    expect(page.locator(control)).to_be_hidden(timeout=15_000)
