"""The local engine's base models: the registry, the picker's server-side check, and FLUX.2 [klein]
trained and compared end to end on its tiny random model (CPU, seconds)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from services.storage.datasets import DatasetStores
from services.errors import InputError
from services.storage.jobs import JobStore
from services.engine import models
from services.providers.base import GenerateRequest, TrainRequest
from services.providers.local.base_models import LocalOptions
from services.training import TrainingService
from tests import imagefactory as fx

OWNER = "local"


def folder_with(tmp_path: Path, name: str, index: dict | None) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    if index is not None:
        (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_the_registry_names_real_hub_models_and_tells_a_folders_family(tmp_path):
    dev, schnell = models.resolve("black-forest-labs/FLUX.1-dev"), models.resolve("flux1-schnell")
    assert (dev.key, dev.family, dev.gated, dev.pipeline_class) == ("flux1-dev", "flux1", True, "FluxPipeline")
    assert (schnell.repo_id, schnell.gated, schnell.sample_steps, schnell.max_sequence_length) == \
        ("black-forest-labs/FLUX.1-schnell", False, 4, 256)
    klein = models.resolve("flux2-klein-base-4b")
    assert (klein.repo_id, klein.family, klein.pipeline_class, klein.gated) == \
        ("black-forest-labs/FLUX.2-klein-base-4B", "flux2", "Flux2KleinPipeline", False)
    assert models.resolve("flux2-klein-base-9b").gated and all(m.download_bytes > 10**10 for m in models.REGISTRY
                                                                if m.repo_id)
    assert models.resolve("").key == models.resolve("tiny").key == "tiny-flux1"  # FLUX_LOCAL_MODEL left empty

    one = folder_with(tmp_path, "my-flux", {"_class_name": "FluxPipeline"})
    two = folder_with(tmp_path, "my-klein", {"_class_name": "Flux2KleinPipeline", "is_distilled": True})
    assert (models.resolve(str(one)).family, models.resolve(str(one)).path) == ("flux1", str(one))
    local_klein = models.resolve(str(two))
    assert (local_klein.family, local_klein.pipeline_class, local_klein.repo_id) == ("flux2", "Flux2KleinPipeline", "")
    assert (local_klein.sample_steps, local_klein.sample_guidance) == (4, 1.0)  # step-distilled: 4 steps, no CFG
    with pytest.raises(InputError, match="Flux2Pipeline pipeline"):  # FLUX.2 [dev] is not trained here
        models.resolve(str(folder_with(tmp_path, "dev2", {"_class_name": "Flux2Pipeline"})))
    with pytest.raises(InputError, match="no readable model_index.json"):
        models.resolve(str(folder_with(tmp_path, "empty", None)))
    with pytest.raises(InputError, match="is not a folder"):
        models.resolve(str(tmp_path / "missing"))
    assert models.resolve("someone/flux2-klein-style").family == "flux2"  # unlisted, not cached: its name says


def test_the_picker_offers_the_registry_and_flux_local_model_and_refuses_anything_else(settings, tmp_path):
    from services.providers.local.provider import LocalProvider

    folder = folder_with(tmp_path, "studio-klein", {"_class_name": "Flux2KleinPipeline"})
    values = [v for _, v in models.choices(str(folder))]
    assert values[0] == str(folder) and {"flux1-dev", "flux2-klein-base-4b", "tiny-flux2-klein"} <= set(values)
    assert models.check_choice(None, str(folder)) == str(folder)  # nothing picked: FLUX_LOCAL_MODEL
    assert models.check_choice("black-forest-labs/FLUX.1-dev", "") == "flux1-dev"
    assert models.default_choice("black-forest-labs/FLUX.1-schnell") == "flux1-schnell"
    other = folder_with(tmp_path, "elsewhere", {"_class_name": "FluxPipeline"})
    with pytest.raises(InputError, match="not a base model the local engine offers"):
        models.check_choice(str(other), str(folder))  # a real folder, but not the configured one

    stores = DatasetStores(settings)
    store = stores(OWNER)
    name = store.create("mug").name
    store.add_files(name, fx.good_set(tmp_path / "g", count=2, size=(256, 256)))
    service = TrainingService(JobStore(settings.data_dir / "jobs.sqlite3"), {"local": LocalProvider(settings)}, stores)
    request = TrainRequest(name="mug", mode="product", trigger_word="TOK", iterations=100, lora_rank=16,
                           options=LocalOptions(base_model="/etc"))
    with pytest.raises(InputError, match="'/etc' is not a base model") as err:
        service.launch(OWNER, "local", name, request)
    assert "tiny-flux2-klein" in err.value.user_message()  # the hint lists what may be picked
    assert service.jobs.list(OWNER) == []  # refused before any job was recorded or any file copied
    assert not (settings.data_dir / "local_jobs").exists()


# ---------------------------------------------------------------- FLUX.2 [klein], tiny

@pytest.fixture(scope="module")
def torch():
    """torch, where the optional extra (requirements-local.txt) is installed; the test is skipped elsewhere."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    return pytest.importorskip("torch")


def test_the_tiny_klein_builds_once_offline_and_loads_through_from_pretrained(torch, tmp_path):
    from diffusers import Flux2KleinPipeline

    from services.engine import tiny

    folder = tiny.ensure_tiny_model(tmp_path / "tiny-flux2-klein", "flux2")
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert tiny.ensure_tiny_model(folder, "flux2") == folder  # already there: not rebuilt
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp
    assert models.resolve(str(folder)).key == "tiny-flux2-klein"  # the family from its model_index.json
    loaded = Flux2KleinPipeline.from_pretrained(folder)
    built = tiny.build_tiny_flux2_pipeline()
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(loaded, name).state_dict(), getattr(built, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "TOK, a red ball"}], tokenize=False,
                                                add_generation_prompt=True, enable_thinking=False)
    ids = loaded.tokenizer(text).input_ids
    assert loaded.tokenizer.decode(ids) == text and loaded.tokenizer.convert_tokens_to_ids("<|im_start|>") == ids[0]
    out = loaded(prompt="TOK, a red ball", width=64, height=48, num_inference_steps=2,
                 max_sequence_length=tiny.FLUX2_MAX_SEQUENCE_LENGTH, output_type="np",
                 generator=torch.Generator().manual_seed(3)).images[0]
    assert out.shape == (48, 64, 3)


def pixels(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_klein_trains_a_lora_and_compare_uses_its_base_model(torch, settings, tmp_path):
    """A job picks the tiny FLUX.2 [klein] while the engine's default stays the tiny FLUX.1."""
    from services import compare as cmp
    from services.providers.local.provider import LocalProvider
    from tests.test_local_engine import make_zip

    provider = LocalProvider(settings, steps_per_sample=0, checkpoint_every=0)
    assert provider.default_model_choice() == "tiny-flux1"
    request = TrainRequest(name="klein", mode="character", trigger_word="TOK", iterations=20, learning_rate=1e-2,
                           lora_rank=16, options=LocalOptions(base_model="tiny-flux2-klein"))
    remote_id = provider.submit(make_zip(tmp_path / "ds.zip"), request, tag="klein")
    try:
        assert provider.join(remote_id, 120)
    finally:
        provider.close()
    status = provider.status(remote_id)
    assert status.state == "ready" and status.step == 20, status.message
    job = settings.data_dir / "local_jobs" / remote_id
    config = json.loads((job / "config.json").read_text())
    assert (config["family"], config["base_model"], config["max_sequence_length"]) == ("flux2", "tiny-flux2-klein", 64)
    assert provider.base_model_of(remote_id) == "tiny-flux2-klein"
    assert (settings.data_dir / "models" / "tiny-flux2-klein" / "model_index.json").is_file()
    card = (job / "output" / "README.md").read_text()
    assert "from diffusers import Flux2KleinPipeline" in card and "| base_model | tiny-flux2-klein |" in card
    assert "- flux2-klein" in card
    losses = [v for _, v in status.losses]
    assert len(losses) == 20 and sum(losses[-5:]) < sum(losses[:5])  # it learned something

    assert cmp.models_for(provider, None, remote_id) == ("tiny-flux2-klein", "tiny-flux2-klein")
    req = GenerateRequest(prompt="TOK, a red ball", seed=11, width=1024, height=768, output_format="png", strength=1.0)
    out = tmp_path / "results"
    pair = cmp.compare_pair(provider, req, finetune_id=remote_id, out_dir=out, owner=OWNER)
    assert pair.base.status == pair.tuned.status == "ok", (pair.base.error, pair.tuned.error)
    base, tuned = pixels(pair.base.path), pixels(pair.tuned.path)
    assert base.shape == tuned.shape == (96, 128, 3)  # 4:3 kept, scaled for the tiny model
    assert abs(tuned - base).mean() > 1.0  # strength 1: the LoRA changes the image
    zero = cmp.compare_pair(provider, replace(req, strength=0.0), finetune_id=remote_id, out_dir=out, owner=OWNER)
    assert abs(pixels(zero.tuned.path) - base).max() <= 1  # strength 0: the base image
    # The base image is the klein's (its defaults: 4 steps, guidance 4), not the engine's default model's.
    klein_base = provider.generate(req, out, model="tiny-flux2-klein")
    assert klein_base.params["model_path"].startswith("tiny random FLUX.2 [klein]")
    assert klein_base.params["guidance"] == 4.0 and klein_base.params["steps"] == 4
    assert (pixels(klein_base.path) == base).all()


def test_the_train_tab_sends_the_picked_base_model_and_the_server_checks_it(torch, settings, tmp_path):
    """Through the app's API, as a script (or the page) would: an unlisted model is refused with the
    reason, before anything is recorded; a listed one reaches the job's training configuration."""
    from gradio_client import Client, handle_file

    from tests.browser import running_app

    photos = fx.good_set(tmp_path / "g", count=2, size=(256, 256))
    with running_app(settings) as url:
        client = Client(url, verbose=False)
        try:
            client.predict("cups", [handle_file(str(p)) for p in photos], api_name="/add_images")
            with pytest.raises(Exception, match="not a base model the local engine offers"):
                client.predict("cups", "cup", "local", "product", base_model="/etc", api_name="/launch_finetune")
            assert client.predict(api_name="/list_jobs") == []
            job = client.predict("cups", "cup", "local", "product", iterations=100, base_model="tiny-flux2-klein",
                                 api_name="/launch_finetune")
            assert job["status"] in ("pending", "running"), job
        finally:
            client.close()
    (config,) = (settings.data_dir / "local_jobs").glob("*/config.json")
    assert json.loads(config.read_text())["family"] == "flux2"


def _service_on_a_gpu(settings, monkeypatch, gb: float):
    """The training service with the local engine on a (pretend) CUDA GPU of ``gb`` GB."""
    from services.engine import memory
    from services.providers.local.provider import LocalProvider

    monkeypatch.setattr(memory, "detect_gpu", lambda index=0: memory.GpuMemory("Test GPU", gb, None))
    local = LocalProvider(settings.with_(local_model="black-forest-labs/FLUX.1-dev"), device="cuda")
    jobs = JobStore.from_settings(settings)
    return TrainingService(jobs, {"local": local}, DatasetStores(settings)), local, jobs


def test_a_training_that_would_not_fit_the_gpu_is_refused_before_launch(settings, tmp_path, monkeypatch):
    """bf16 FLUX.1 [dev] needs about 25 GB: on a 16 GB card it is refused at launch, naming what fits, and
    nothing is recorded; Auto picks the 16 GB preset, whose estimate the Train tab shows."""
    from components.train_tab import memory_summary
    from services.studio import Studio

    service, local, jobs = _service_on_a_gpu(settings, monkeypatch, 16.0)
    try:
        store = DatasetStores(settings)("local")
        store.create("cups")
        store.add_files("cups", fx.good_set(tmp_path / "g", count=2, size=(256, 256)))
        request = TrainRequest(name="cup", mode="product", lora_rank=16,
                               options=LocalOptions(base_model="flux1-dev", memory_preset="bf16"))
        with pytest.raises(InputError, match=r"needs about 2\d\.\d GB.*16\.0 GB") as refused:
            service.launch("local", "local", "cups", request)
        assert "16gb" in refused.value.hint or "16 GB" in refused.value.hint
        assert jobs.list("local") == [] and not (settings.data_dir / "local_jobs").exists()
        with Studio(settings, providers={"local": local}, background=False) as studio:  # what the Train tab asks
            auto = memory_summary(studio, "local", "flux1-dev", "", 16, "quality", "auto")
            assert auto.startswith("Memory preset 16 GB") and "(fits)" in auto and "Test GPU has 16.0 GB" in auto
            assert "does NOT fit" in memory_summary(studio, "local", "flux1-dev", "bf16", 16, "quality", "auto")
            assert memory_summary(studio, "local", "tiny-flux2-klein", "", 16, "quality", "auto").startswith(
                "No CUDA GPU")
    finally:
        local.close()
        jobs.close()


def test_a_hub_model_is_fetched_into_the_hf_cache_with_the_token_and_progress_shown(settings, monkeypatch):
    """The worker resolves a Hub base model through download.fetch_base_model (mocked: no network),
    with HF_TOKEN and a progress callback that the job's message shows."""
    from services.config import Secret
    from services.engine import download
    from services.providers.local.provider import LocalProvider

    calls = []

    def fetch(model, *, token=None, cache_dir=None, on_progress=None):
        calls.append((model, token.reveal() if token else ""))
        if on_progress:
            on_progress(3 * 2**30, 12 * 2**30)
        return Path("/cache/snapshots/abc")

    monkeypatch.setattr(download, "fetch_base_model", fetch)
    local = LocalProvider(settings.with_(hf_token=Secret("hf_secret_token")))
    try:
        seen = []
        path = local.base_models.folder("flux1-dev", on_progress=lambda done, total: seen.append((done, total)))
        assert path == "/cache/snapshots/abc" and seen == [(3 * 2**30, 12 * 2**30)]
        assert calls == [("black-forest-labs/FLUX.1-dev", "hf_secret_token")]
        assert local.base_models.folder("tiny-flux2-klein").endswith("tiny-flux2-klein") and len(calls) == 1
    finally:
        local.close()


def test_a_hosted_visitor_cannot_make_the_server_download_another_base_model(settings):
    from services.providers.local.provider import LocalProvider

    local = LocalProvider(settings.with_(hosted=True))
    try:
        with pytest.raises(InputError, match="trains on tiny FLUX.1.* only|trains on .* only"):
            local.check_request(TrainRequest(name="x", mode="product", options=LocalOptions(base_model="flux1-dev")))
        local.check_request(TrainRequest(name="x", mode="product", options=LocalOptions(base_model="tiny-flux2-klein")))  # fine
    finally:
        local.close()
