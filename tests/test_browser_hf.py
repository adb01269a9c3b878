"""The Train tab in a real browser on the Hugging Face provider: prices before launch, then the job's
log, the very lines a real run of the trainer's command line printed (``cli_run``), replayed through
a mocked HfApi, become the page's progress, loss plot, samples and "ready"."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from services.config import Secret
from services.providers.huggingface.provider import HuggingFaceProvider
from services.engine import events
from services.providers.local.provider import LocalProvider
from services.storage.datasets import DatasetStores
from tests import imagefactory as fx
from tests.browser import chromium, click_launch, launched, wait_for_train_dataset
from tests.fake_hf import NS, TOKEN, Hub

pytestmark = pytest.mark.browser


def test_a_hugging_face_job_is_priced_launched_and_followed_from_its_log(settings, tmp_path, cli_run):
    settings = settings.with_(hf_token=Secret(TOKEN))
    store = DatasetStores(settings)("local")
    name = store.create("mug").name
    store.add_files(name, fx.good_set(tmp_path / "g", count=5, size=(640, 640)))
    store.set_trigger_word(name, "MUG")
    hub = Hub(tmp_path)
    providers = {"local": LocalProvider(settings),
                 "huggingface": HuggingFaceProvider(settings, api=hub.api, log_every_s=0)}
    lines = list(cli_run.lines)
    first_checkpoint = next(i for i, ln in enumerate(lines) if (events.event_of(ln) or {}).get(events.KEY)
                            == "checkpoint")

    with chromium() as browser, launched(settings, providers=providers, track_interval=0.3) as (_, url):
        page = browser.new_page()
        page.goto(url)
        page.get_by_role("tab", name="2 · Train").click()
        page.locator("#train-launch").wait_for()
        wait_for_train_dataset(page)
        page.locator("#train-provider").get_by_text("Hugging Face").click()
        # Before launch: which machine, its price per hour, and what the steps should take and cost.
        info = page.locator("#train-hardware-info")
        info.get_by_text(re.compile(r"Estimate: about .* \$\d+\.\d\d")).wait_for(timeout=15_000)
        assert "l40sx1" in info.inner_text()  # the cheapest machine that fits FLUX.1-dev, by total cost
        assert "Hugging Face" in page.locator("#train-banner").inner_text()
        page.locator("#train-name textarea, #train-name input").first.fill("mug-hf")
        click_launch(page)

        [job_id] = hub.specs
        spec = hub.specs[job_id]
        assert spec["flavor"] == "l40sx1" and spec["secrets"] == {"HF_TOKEN": TOKEN}
        repo = f"{NS}/{spec['labels']['flux-studio-repo']}"
        for path in events.parse(lines).samples:  # what the run pushed to its model repo
            hub.repo_files[f"{repo}/{path}"] = (cli_run.out_dir / path).read_bytes()

        # Running: the log so far, up to the first checkpoint (step 3 of 6).
        hub.stage[job_id] = ("RUNNING", None)
        hub.logs[job_id] = ["Installed 87 packages in 2.1s", *lines[:first_checkpoint + 1]]
        cells = page.locator("#train-jobs [role=gridcell]")
        cells.filter(has_text="50%").first.wait_for(timeout=20_000)
        expect(page.locator("#train-samples img")).not_to_have_count(0, timeout=20_000)
        page.locator("#train-loss canvas, #train-loss svg").first.wait_for(timeout=20_000)
        expect(page.locator("#train-job-detail")).to_contain_text("step 3 of 6", timeout=20_000)

        # The rest of the log, and the job completes: the page says it is ready, with its repo.
        hub.logs[job_id] = ["Installed 87 packages in 2.1s", *lines]
        hub.stage[job_id] = ("COMPLETED", None)
        cells.filter(has_text="ready").first.wait_for(timeout=20_000)
        page.get_by_text("Fine-tune 'mug-hf' is ready").wait_for(timeout=10_000)
        expect(page.locator("#train-job-detail")).to_contain_text(repo, timeout=10_000)
        expect(page.locator("#train-samples img")).to_have_count(len(events.parse(lines).samples))
        assert TOKEN not in page.content()
    assert hub.api.run_uv_job.call_count == 1
