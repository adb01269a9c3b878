"""Your LoRA everywhere, in a real browser on the tiny FLUX.1 model: the Train tab's downloads give files the
other tools read, and the Compare tab imports a LoRA file made elsewhere and renders it beside the base model."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from services.engine import lora_formats as lf  # noqa: E402
from services.engine.models import FLUX1  # noqa: E402
from services.providers.base import TrainRequest  # noqa: E402
from services.providers.local.base_models import LocalOptions  # noqa: E402
from services.providers.local.provider import LocalProvider  # noqa: E402
from services.storage.jobs import JobStore  # noqa: E402
from services.storage.owners import LOCAL_OWNER  # noqa: E402
from tests.browser import chromium, running_app, upload_files  # noqa: E402
from tests.imagefactory import training_zip  # noqa: E402
from tests.test_lora_formats import info, make_lora  # noqa: E402

pytestmark = pytest.mark.browser


def _ready_local_job(settings, tmp_path: Path, name: str) -> None:
    """A ready fine-tune on the tiny model (30 steps), recorded as Studio.launch records it."""
    local = LocalProvider(settings, steps_per_sample=30, checkpoint_every=30)
    try:
        request = TrainRequest(name=name, mode="product", trigger_word="TOK", iterations=30, learning_rate=1e-2,
                               lora_rank=16, options=LocalOptions())
        remote_id = local.submit(training_zip(tmp_path / "ds.zip"), request, tag="browserjob")
        assert local.join(remote_id, 120) and local.status(remote_id).state == "ready"
    finally:
        local.close()
    jobs = JobStore.from_settings(settings)
    job = jobs.create(LOCAL_OWNER, "local", "finetune", name, "cups", "h", request.record())
    jobs.update(LOCAL_OWNER, job.id, remote_id=remote_id, status="ready", result={"finetune_id": remote_id})
    jobs.close()


def _download(page, button: str, filename: str, into: Path) -> Path:
    """Click ``button``, wait for the file it makes to be offered, and download it as a person would."""
    page.click(button)
    link = page.locator(f'#train-export-file a[download="{filename}"]')
    link.wait_for(timeout=60_000)
    with page.expect_download(timeout=30_000) as download:
        link.click()
    saved = into / download.value.suggested_filename
    download.value.save_as(saved)
    return saved


def test_the_train_tabs_downloads_give_the_files_other_tools_read(settings, tmp_path):
    _ready_local_job(settings, tmp_path, "cup-v1")
    with chromium() as browser, running_app(settings) as url:
        page = browser.new_page()
        page.goto(url)
        page.get_by_role("tab", name="2 · Train").click()
        page.locator("#train-jobs [role=gridcell]").filter(has_text="cup-v1").first.click()
        page.locator("#train-job-detail").get_by_role("heading", name="cup-v1").wait_for(timeout=15_000)
        expect(page.locator("#train-export-box")).to_be_visible(timeout=15_000)
        assert "ComfyUI / Forge" in page.locator("#train-export-box").inner_text()

        comfy = _download(page, "#train-export-comfyui", "TOK-flux1-comfyui.safetensors", tmp_path)
        assert comfy.name == "TOK-flux1-comfyui.safetensors"
        keys = list(load_file(str(comfy)))
        assert keys and all(k.startswith("lora_unet_") for k in keys)
        diffusers = _download(page, "#train-export-diffusers", "TOK-flux1-diffusers.safetensors", tmp_path)
        keys = list(load_file(str(diffusers)))
        assert keys and all(k.startswith("transformer.") for k in keys)


def test_compare_renders_an_imported_lora_beside_the_base_model(settings, tmp_path):
    kohya = lf.export_lora(make_lora(FLUX1, tmp_path / "made"), tmp_path, lf.COMFYUI, info(FLUX1))
    with chromium() as browser, running_app(settings) as url:
        page = browser.new_page()
        page.goto(url)
        page.get_by_role("tab", name="3 · Compare").click()
        page.locator("#compare-go").wait_for()
        page.locator("#compare-import-box").get_by_text("Use any LoRA").click()
        upload_files(page, "compare-import-file", [kohya])
        page.locator("#compare-import-name textarea, #compare-import-name input").first.fill("ball from comfy")
        page.click("#compare-import-go")
        summary = page.locator("#compare-import-info")
        summary.get_by_text("Imported").wait_for(timeout=60_000)
        assert "a FLUX.1 LoRA, kohya keys, rank" in summary.inner_text()
        expect(page.locator("#compare-finetune input")).to_have_value(
            re.compile(r"ball from comfy · imported FLUX\.1 LoRA"), timeout=15_000)
        page.get_by_text("Use the trigger word “TOK”").wait_for(timeout=15_000)

        page.locator("#compare-prompt textarea").fill("TOK, a red ball")
        page.click("#compare-go")
        info_line = page.locator("#compare-pair-info")
        info_line.get_by_text("wall time").wait_for(timeout=120_000)
        assert "local tuned" in info_line.inner_text() and "tiny test model" in info_line.inner_text()
        for panel in ("#compare-base img", "#compare-tuned img"):
            image = page.locator(panel)
            image.wait_for(timeout=15_000)
            expect(image).to_have_js_property("complete", True)
            assert image.evaluate("i => i.naturalWidth") > 0
        assert "error" not in page.locator("#compare-tuned").inner_text()
