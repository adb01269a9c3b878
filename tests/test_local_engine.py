"""The local engine end to end on the tiny random FLUX model (CPU, a few seconds per training).

Skipped where the optional extra (requirements-local.txt) is not installed.
"""
from __future__ import annotations

import importlib.util
import json
import re
import threading
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from PIL import Image  # noqa: E402

from services.config import Secret, Settings  # noqa: E402
from services.errors import AuthError, EngineUnavailableError, ProviderError  # noqa: E402
from services.engine import tiny  # noqa: E402
from services.engine.train import Trainer, TrainConfig  # noqa: E402
from services.providers.local.folders import read_losses  # noqa: E402
from services.providers.local.provider import WAITING, LocalProvider  # noqa: E402
from services.providers.local.queue import SLOT, TrainingSlot  # noqa: E402
from services.providers.local.base_models import LocalOptions
from services.providers.base import GenerateRequest, Provider, TrainRequest  # noqa: E402
from tests.imagefactory import training_zip as make_zip  # noqa: E402

HF_TOKEN = "hf_FAKEtoken0123456789abcdefSECRET"


def request(iterations: int = 30, gradient_checkpointing: bool | None = None, **kw) -> TrainRequest:
    return TrainRequest(name="tiny test", mode="character", trigger_word="TOK", iterations=iterations,
                        learning_rate=kw.pop("learning_rate", 1e-2), lora_rank=16,
                        options=LocalOptions(gradient_checkpointing=gradient_checkpointing), **kw)


def wait_terminal(provider: LocalProvider, remote_id: str, timeout: float = 60.0):
    assert provider.join(remote_id, timeout), "the local job did not finish in time"
    return provider.status(remote_id)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.fixture
def steps_done(monkeypatch):
    """``steps_done(remote_id, n)`` blocks until that job's trainer has finished ``n`` steps: each
    step signals, so a test waits for the event itself, not on a polling clock."""
    done: dict[str, int] = {}
    changed = threading.Condition()
    original = Trainer.step_cached

    def counting(self, step, gen):
        loss = original(self, step, gen)
        with changed:
            done[self.job_dir.name] = step + 1
            changed.notify_all()
        return loss

    monkeypatch.setattr(Trainer, "step_cached", counting)

    def wait(remote_id: str, n: int, timeout: float = 60.0) -> None:
        with changed:
            assert changed.wait_for(lambda: done.get(remote_id, 0) >= n, timeout), \
                f"{remote_id} reached step {done.get(remote_id, 0)} of the {n} waited for"

    return wait


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished tiny LoRA job shared by the generation / publishing tests (same layout as ``settings``)."""
    root = tmp_path_factory.mktemp("local-engine")
    settings = Settings(data_dir=root / "data", workers=2)
    provider = LocalProvider(settings, steps_per_sample=10, checkpoint_every=10)
    remote_id = provider.submit(make_zip(root / "ds.zip"), request(30), tag="job1")
    status = wait_terminal(provider, remote_id)
    assert status.state == "ready", status.message
    return provider, remote_id, status, settings


def test_tiny_model_builds_once_and_loads_through_from_pretrained(tmp_path):
    from diffusers import FluxPipeline

    folder = tiny.ensure_tiny_model(tmp_path / "tiny-flux")
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert tiny.ensure_tiny_model(folder) == folder  # already there: not rebuilt
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind

    loaded = FluxPipeline.from_pretrained(folder)
    built = tiny.build_tiny_pipeline()
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(loaded, name).state_dict(), getattr(built, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name  # deterministic build
    ids = loaded.tokenizer_2("TOK, a red ball").input_ids
    assert ids[-1] == loaded.tokenizer_2.eos_token_id and loaded.tokenizer_2.unk_token_id not in ids

    def run(pipe):
        return pipe("TOK, a red ball", width=64, height=48, num_inference_steps=2, max_sequence_length=32,
                    output_type="np", generator=torch.Generator().manual_seed(3)).images[0]

    out = run(loaded)
    assert out.shape == (48, 64, 3)
    np.testing.assert_allclose(out, run(built), atol=1e-6)


def test_training_lowers_the_loss_and_the_lora_round_trips(tmp_path):
    from diffusers import FluxPipeline

    model = tiny.ensure_tiny_model(tmp_path / "tiny-flux")
    cfg = TrainConfig(model_path=str(model), steps=40, learning_rate=1e-2, rank=16, resolution=64, bucket_step=16,
                      max_sequence_length=tiny.MAX_SEQUENCE_LENGTH, sample_steps=2, device="cpu")
    trainer = Trainer(cfg, make_zip(tmp_path / "ds.zip"), tmp_path / "job")
    trainer.prepare()
    assert trainer.pipe.text_encoder is None and trainer.pipe.text_encoder_2 is None  # freed after caching
    assert {c.bucket for c in trainer.cache} == {(80, 48), (48, 80), (64, 64)}  # aspect buckets, not squashed

    def eval_loss() -> float:  # fixed noise and timesteps: a low-variance measure of the fit
        g, losses = torch.Generator().manual_seed(7), []
        with torch.no_grad():
            for c in trainer.cache:
                for s in (0.2, 0.5, 0.8):
                    noise = torch.randn(c.mean.shape, generator=g)
                    pred = trainer.transformer(
                        hidden_states=(1 - s) * c.mean + s * noise, timestep=torch.tensor([s]),
                        pooled_projections=c.pooled, encoder_hidden_states=c.prompt_embeds, txt_ids=trainer.text_ids,
                        img_ids=trainer.latent_ids(c.bucket), return_dict=False)[0]
                    losses.append(torch.mean((pred - (noise - c.mean)) ** 2).item())
        return sum(losses) / len(losses)

    before = eval_loss()
    result = trainer.run()
    assert result.state == "ready" and result.step == 40 and len(result.losses) == 40
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-10:])
    assert last < 0.95 * first, (first, last)
    after = eval_loss()
    assert after < 0.8 * before, (before, after)

    # The saved LoRA, loaded into a fresh pipeline, reproduces the trained model's output exactly.
    pe, pooled = trainer.sample_embeds

    def run(pipe):
        return pipe(prompt_embeds=pe, pooled_prompt_embeds=pooled, width=64, height=64, num_inference_steps=2,
                    output_type="np", generator=torch.Generator().manual_seed(5)).images[0]

    trainer.transformer.eval()
    trained_out = run(trainer.pipe)
    fresh = FluxPipeline.from_pretrained(model)
    plain_out = run(fresh)
    assert result.lora_path.name == "pytorch_lora_weights.safetensors"
    fresh.load_lora_weights(str(result.lora_path.parent))
    np.testing.assert_allclose(run(fresh), trained_out, atol=1e-5)
    assert np.abs(plain_out - trained_out).max() > 1e-3  # and the LoRA does change the output
    card = (result.lora_path.parent / "README.md").read_text()
    assert card.startswith("---\n") and "- lora\n- flux\n- diffusers" in card and "instance_prompt: TOK" in card


def test_provider_trains_and_base_vs_tuned_differ_only_by_the_lora(trained, tmp_path):
    provider, remote_id, status, settings = trained
    assert isinstance(provider, Provider) and provider.key == "local" and provider.max_images == 50
    assert provider.is_tiny and "tiny random FLUX" in provider.model_label
    assert status.step == 30 and status.progress == 1.0
    assert status.result == {"lora_path": status.result["lora_path"], "finetune_id": remote_id}
    assert Path(status.result["lora_path"]).is_file()
    assert len(status.samples) == 3 and all(Path(s).is_file() for s in status.samples)
    assert status.samples[0].endswith("step_000030.png")  # latest first
    assert provider.list_remote() == [remote_id] and provider.find_by_tag("job1") == remote_id
    state = json.loads((settings.data_dir / "local_jobs" / remote_id / "state.json").read_text())
    assert state["state"] == "ready" and state["step"] == 30
    # The whole loss curve, one point per step, kept on disk (a poll every few seconds would see a handful).
    assert [s for s, _ in status.losses] == list(range(1, 31)) and all(0 < v < 10 for _, v in status.losses)
    assert read_losses(settings.data_dir / "local_jobs" / remote_id) == status.losses

    def gen(finetune=None, strength=1.0):
        req = GenerateRequest(prompt="TOK, a red ball", seed=11, width=1024, height=768, output_format="png",
                              strength=strength)
        return provider.generate(req, tmp_path, finetune=finetune)

    base = gen()
    assert base.model == "local base" and base.path.is_file() and base.path.parent == tmp_path
    assert (base.params["width"], base.params["height"]) == (128, 96)  # 4:3 kept, scaled for the tiny model
    assert base.params["steps"] == tiny.DEFAULT_STEPS and base.params["guidance"] == 3.5
    zero = gen(remote_id, 0.0)
    full = gen(remote_id, 1.0)
    assert zero.model == full.model == "local tuned" and full.params["strength"] == 1.0
    assert full.params["finetune_id"] == remote_id
    np.testing.assert_allclose(pixels(zero.path), pixels(base.path), atol=1)  # strength 0 = the base model
    assert np.abs(pixels(full.path) - pixels(base.path)).mean() > 1.0  # strength 1: a different image
    np.testing.assert_array_equal(pixels(gen().path), pixels(base.path))  # base again: adapter really off
    jpeg = provider.generate(GenerateRequest(prompt="TOK", seed=1, output_format="jpeg"), tmp_path)
    assert jpeg.path.suffix == ".jpg"


def test_second_job_waits_and_cancel_keeps_a_checkpoint(settings, tmp_path, steps_done):
    provider = LocalProvider(settings, steps_per_sample=0, checkpoint_every=5)
    zip_path = make_zip(tmp_path / "ds.zip")
    first = provider.submit(zip_path, request(400), tag="first")
    second = provider.submit(zip_path, request(30), tag="second")
    queued = provider.status(second)
    assert queued.state == "pending" and queued.message == WAITING
    provider.cancel(second)  # still queued: dropped at once
    assert provider.status(second).state == "cancelled"

    steps_done(first, 7)
    provider.cancel(first)
    status = wait_terminal(provider, first)
    assert status.state == "cancelled" and status.result == {"resumable": True}
    assert 7 <= status.step < 400 and "checkpoint is kept" in status.message
    ckpts = sorted((settings.data_dir / "local_jobs" / first / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == [f"step_{status.step:06d}"]  # saved at the cancel; older ones pruned
    saved = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert saved["step"] == status.step and len(saved["losses"]) == status.step
    assert {p.name for p in ckpts[0].iterdir()} >= {"lora.safetensors", "optimizer.pt", "rng.pt"}

    provider.delete(first)
    assert first not in provider.list_remote() and not (settings.data_dir / "local_jobs" / first).exists()


class _Crash(BaseException):
    """Stands in for the process dying mid-step (not an Exception, so nothing records it)."""


def test_restart_mid_run_is_resumable_from_the_checkpoint(settings, tmp_path, monkeypatch):
    original = Trainer.step_cached
    calls: list[int] = []

    def crashing_step(self, step, gen):
        if step == 12:
            raise _Crash()
        return original(self, step, gen)

    monkeypatch.setattr(Trainer, "step_cached", crashing_step)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the "dead process" is expected
    before = LocalProvider(settings, steps_per_sample=0, checkpoint_every=5)
    remote_id = before.submit(make_zip(tmp_path / "ds.zip"), request(20), tag="restart")
    assert before.join(remote_id, 60)
    state = json.loads((settings.data_dir / "local_jobs" / remote_id / "state.json").read_text())
    assert state["state"] == "running"  # what a killed process leaves behind

    def counting_step(self, step, gen):
        calls.append(step)
        return original(self, step, gen)

    monkeypatch.setattr(Trainer, "step_cached", counting_step)
    after = LocalProvider(settings, steps_per_sample=0, checkpoint_every=5)  # the app started again
    status = after.status(remote_id)
    assert status.state == "failed" and status.result == {"resumable": True}
    before_crash = status.losses
    assert [s for s, _ in before_crash][:10] == list(range(1, 11))
    # the last step recorded (state.json is written at most once a second, and at every checkpoint)
    assert re.match(r"Interrupted by a restart at step 1[0-2] of 20\. Resume it from the last checkpoint\.$",
                    status.message), status.message
    after.resume(remote_id)
    done = wait_terminal(after, remote_id)
    assert done.state == "ready" and done.step == 20, done.message
    assert calls == list(range(10, 20))  # continued from the checkpoint at step 10, not from 0
    # The curve goes on from the checkpoint: steps 1-10 as trained before the crash, 11-20 from the new run.
    assert [s for s, _ in done.losses] == list(range(1, 21)) and done.losses[:10] == before_crash[:10]
    state = json.loads((settings.data_dir / "local_jobs" / remote_id / "state.json").read_text())
    assert state["resumed_from"] == 10
    assert Path(done.result["lora_path"]).is_file()
    with pytest.raises(ProviderError, match="already finished"):
        after.resume(remote_id)


def test_readiness_explains_a_missing_torch(settings, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    provider = LocalProvider(settings)
    ok, why = provider.readiness()
    assert not ok and why == ("The local engine needs torch and diffusers: run `pip install -r requirements-local.txt` "
                              "(make run does it).")
    with pytest.raises(EngineUnavailableError):
        provider.submit(Path("missing.zip"), request(), tag="x")
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert provider.readiness() == (True, "")
    assert LocalProvider(settings, model="/no/such/flux").readiness()[0] is False


def test_publish_uploads_the_lora_and_never_stores_the_token(trained, monkeypatch):
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    provider, remote_id, _, settings = trained
    calls: dict = {}

    def create_repo(self, repo_id, **kw):
        calls["create"] = (repo_id, kw, self.token)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        calls["upload"] = (kw, sorted(p.name for p in Path(kw["folder_path"]).rglob("*")))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    url = provider.publish(remote_id, "someone/tiny-lora", Secret(HF_TOKEN), private=True)
    assert url == "https://huggingface.co/someone/tiny-lora"
    repo, kw, token_used = calls["create"]
    assert repo == "someone/tiny-lora" and kw["private"] is True and kw["exist_ok"] is True
    assert token_used == HF_TOKEN  # handed to the client, and only there
    uploaded, files = calls["upload"]
    assert uploaded["repo_id"] == "someone/tiny-lora"
    assert {"pytorch_lora_weights.safetensors", "README.md"} <= set(files)

    def refused(self, **kw):
        raise HfHubHTTPError(f"401 Unauthorized for token {HF_TOKEN}", response=httpx.Response(
            401, request=httpx.Request("POST", "https://huggingface.co/api/repos/create")))

    monkeypatch.setattr(HfApi, "upload_folder", refused)
    with pytest.raises(AuthError) as err:
        provider.publish(remote_id, "someone/tiny-lora", Secret(HF_TOKEN))
    assert HF_TOKEN not in str(err.value)
    with pytest.raises(Exception, match="not a Hub repository name"):
        provider.publish(remote_id, "no slash here", Secret(HF_TOKEN))

    secret = HF_TOKEN.encode()
    leaks = [p for p in settings.data_dir.rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert leaks == []


def test_gradient_checkpointing_is_an_option_and_trains(settings, tmp_path, monkeypatch):
    from diffusers import FluxTransformer2DModel

    enabled: list[bool] = []
    original = FluxTransformer2DModel.enable_gradient_checkpointing

    def spy(self, *a, **kw):
        original(self, *a, **kw)
        enabled.append(self.is_gradient_checkpointing)

    monkeypatch.setattr(FluxTransformer2DModel, "enable_gradient_checkpointing", spy)
    provider = LocalProvider(settings, steps_per_sample=0, checkpoint_every=0)
    zip_path = make_zip(tmp_path / "ds.zip")
    auto = provider.submit(zip_path, request(3), tag="auto")
    forced = provider.submit(zip_path, request(3, gradient_checkpointing=True), tag="forced")
    for remote_id in (auto, forced):
        assert wait_terminal(provider, remote_id).state == "ready"
    config = {rid: json.loads((settings.data_dir / "local_jobs" / rid / "config.json").read_text())
              for rid in (auto, forced)}
    assert config[auto]["gradient_checkpointing"] is False  # auto: off for the tiny model
    assert config[forced]["gradient_checkpointing"] is True
    assert config[auto]["memory_preset"] == "none"  # the tiny model gets no memory preset, even on a GPU
    assert enabled == [True]  # switched on in the model for the forced job only, and it still trained




def test_cancelling_a_stuck_job_frees_the_engine_for_the_next(settings, tmp_path, monkeypatch):
    """A run that hangs where no step checks its cancel flag (a stalled download) must not block
    every other local job for ever: once cancelled and past the grace period, the next job evicts it."""
    now = [0.0]
    slot = TrainingSlot(clock=lambda: now[0], grace_s=30.0)
    stalled, release = threading.Event(), threading.Event()
    original = Trainer.prepare

    def prepare(self, *a, **kw):
        if self.job_dir.name.endswith("stuck"):
            stalled.set()
            assert release.wait(60)
        return original(self, *a, **kw)

    monkeypatch.setattr(Trainer, "prepare", prepare)
    provider = LocalProvider(settings, steps_per_sample=0, checkpoint_every=0, slot=slot)
    zip_path = make_zip(tmp_path / "ds.zip")
    stuck = provider.submit(zip_path, request(5), tag="stuck")
    assert stalled.wait(60)
    waiting = provider.submit(zip_path, request(3), tag="next")
    assert provider.status(waiting).message == WAITING
    holder = provider.training_now()  # what the Train tab shows: who everyone waits for
    assert (holder.remote_id, holder.cancelling, holder.waiting) == (stuck, False, 1)

    provider.cancel(stuck)
    assert provider.training_now().cancelling and provider.status(waiting).state == "pending"
    now[0] += 30.0  # the grace period is over
    slot.wake()
    done = wait_terminal(provider, waiting)
    assert done.state == "ready" and done.step == 3, done.message
    evicted = provider.status(stuck)
    assert evicted.state == "cancelled" and "did not stop within 30 s" in evicted.message
    with pytest.raises(ProviderError, match="stuck"):
        provider.resume(stuck)  # its thread may still write into the folder

    state_file = settings.data_dir / "local_jobs" / stuck / "state.json"
    before = state_file.read_bytes()
    release.set()  # the stalled run comes back to life...
    assert provider.join(stuck, 60)
    assert state_file.read_bytes() == before  # ...and writes nothing over what the user was told
    assert slot.holder() is None


def test_closing_the_provider_stops_its_runs_and_keeps_them_for_the_next_start(settings, tmp_path, steps_done):
    provider = LocalProvider(settings, steps_per_sample=0, checkpoint_every=0)
    zip_path = make_zip(tmp_path / "ds.zip")
    running = provider.submit(zip_path, request(1000), tag="running")
    queued = provider.submit(zip_path, request(3), tag="queued")
    steps_done(running, 3)
    provider.close()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("studio-local-train")]
    assert SLOT.holder() is None
    state = json.loads((settings.data_dir / "local_jobs" / running / "state.json").read_text())
    assert state["state"] == "running" and "when the app closed" in state["message"]

    after = LocalProvider(settings, steps_per_sample=0, checkpoint_every=0)  # the app started again
    interrupted = after.status(running)
    assert interrupted.state == "failed" and interrupted.result == {"resumable": True}
    assert interrupted.message.startswith(f"Interrupted by a restart at step {state['step']} of 1000.")
    assert after.status(queued).state == "pending"  # never started: the first look queues it again...
    assert wait_terminal(after, queued).state == "ready"  # ...and it trains


def test_closing_the_app_stops_its_tracker_and_local_training(settings, tmp_path, steps_done):
    import app as app_module

    demo = app_module.create_app(settings, track_interval=0.05)
    local = demo.studio.providers["local"]
    remote_id = local.submit(make_zip(tmp_path / "ds.zip"), request(1000), tag="app-job")
    steps_done(remote_id, 2)
    assert {t.name for t in threading.enumerate()} >= {"studio-job-tracker", f"studio-local-train-{remote_id}"}
    demo.close()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("studio-")]  # joined, not left behind
    assert SLOT.holder() is None and local.status(remote_id).result == {"resumable": True}


def test_delete_waits_for_the_run_to_stop_and_never_hides_a_failure(settings, tmp_path, monkeypatch):
    stalled, release = threading.Event(), threading.Event()
    original = Trainer.prepare

    def prepare(self, *a, **kw):
        stalled.set()
        assert release.wait(60)
        return original(self, *a, **kw)

    monkeypatch.setattr(Trainer, "prepare", prepare)
    provider = LocalProvider(settings, steps_per_sample=0, checkpoint_every=0)
    remote_id = provider.submit(make_zip(tmp_path / "ds.zip"), request(3), tag="del")
    folder = settings.data_dir / "local_jobs" / remote_id
    assert stalled.wait(60)
    with pytest.raises(ProviderError, match="did not stop within 0 s, so its folder was kept"):
        provider.delete(remote_id, wait_s=0.05)
    assert folder.is_dir() and remote_id in provider.list_remote()
    release.set()  # it comes back, sees its cancel, and stops
    provider.delete(remote_id)  # waits for the thread, then removes the folder
    assert not folder.exists() and provider.join(remote_id, 0)


def test_loading_one_model_does_not_block_generation_with_another(monkeypatch):
    """Loading can be a multi-GB download: it once held the lock every generation needs."""
    from services.engine import infer

    loading, release = threading.Event(), threading.Event()
    loaded: list[str] = []

    def slow_load(model_path, device):
        loaded.append(model_path)
        if model_path == "big/model":
            loading.set()
            assert release.wait(30)
        return infer._Entry(pipe=object())

    monkeypatch.setattr(infer, "_load", slow_load)
    monkeypatch.setattr(infer, "_PIPES", {})
    monkeypatch.setattr(infer, "_LOADING", {})
    results: dict = {}
    big = threading.Thread(target=lambda: results.update(big=infer.get_pipeline("big/model", "cpu")), name="test-big")
    again = threading.Thread(target=lambda: results.update(again=infer.get_pipeline("big/model", "cpu")),
                             name="test-again")
    big.start()
    try:
        assert loading.wait(30)
        again.start()  # a second user of the loading model waits for that load, and does not load twice
        small = infer.get_pipeline("small/model", "cpu")  # another model: not blocked by the big download
        assert loaded == ["big/model", "small/model"] and small is not None
    finally:
        release.set()
        big.join(30)
        again.join(30)
    assert results["big"] is results["again"] and loaded.count("big/model") == 1


def test_a_compare_while_the_gpu_trains_is_refused_with_a_reason(settings, trained, tmp_path):
    """On a GPU, generating during a training would load a second copy of the model."""
    from services.errors import EngineUnavailableError
    from services.providers.local.queue import GpuGate

    provider, remote_id, _, _ = trained
    gpu = GpuGate()
    busy = LocalProvider(provider.settings, device="cuda", gpu=gpu)
    with gpu.for_training("local-other"):
        with pytest.raises(EngineUnavailableError, match="GPU is training local job local-other"):
            busy.generate(GenerateRequest(prompt="TOK"), tmp_path, finetune=remote_id)


def test_a_hosted_visitors_local_job_lives_in_their_own_folder(settings, tmp_path):
    from services.storage.owners import owner_dir

    hosted = settings.with_(hosted=True)
    provider = LocalProvider(hosted, steps_per_sample=0, checkpoint_every=0)
    remote_id = provider.submit(make_zip(tmp_path / "ds.zip"), request(3), tag="visitor-job", owner="visitor-abc")
    token = owner_dir(hosted, "visitor-abc").name
    folder = hosted.data_dir / "owners" / token / "local_jobs" / remote_id
    assert remote_id == f"local-o{token}-visitor-job" and (folder / "dataset.zip").is_file()
    assert not (hosted.data_dir / "local_jobs").exists()  # nothing of theirs in a shared folder
    assert wait_terminal(provider, remote_id).state == "ready"
    assert (folder / "output" / "pytorch_lora_weights.safetensors").is_file()
    after = LocalProvider(hosted)  # a restart finds it by the job's tag, wherever it lives
    assert after.find_by_tag("visitor-job") == remote_id and remote_id in after.list_remote()
    after.delete(remote_id)
    assert not folder.exists()


# --------------------------------------------------------------------------- what a real GPU found (issue 21)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: tiny.ensure_tiny_model(root / family, family) for family in ("flux1", "flux2")}


def tiny_trainer(tmp_path: Path, folder: Path | None, family: str = "flux1", **kw) -> Trainer:
    seq = tiny.MAX_SEQUENCE_LENGTH if family == "flux1" else tiny.FLUX2_MAX_SEQUENCE_LENGTH
    settings = dict(steps=3, learning_rate=1e-3, rank=4, resolution=64, bucket_step=16, max_sequence_length=seq,
                    sample_steps=1, device="cpu")
    settings.update(kw)
    cfg = TrainConfig(model_path=str(folder) if folder else "", family="" if folder else family, **settings)
    return Trainer(cfg, make_zip(tmp_path / "ds.zip"), tmp_path / "job")


def sdpa_state() -> tuple[bool, bool, bool, bool]:
    """(cuDNN, flash, memory-efficient, math): which attention kernels torch may pick right now."""
    b = torch.backends.cuda
    return b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled()


@pytest.mark.parametrize(("attention", "inside"), [("", (False, True, True, True)),
                                                   ("math", (False, False, False, True))])
def test_a_training_step_runs_without_cudnn_attention_forward_backward_and_recompute(tiny_models, tmp_path,
                                                                                      attention, inside):
    trainer = tiny_trainer(tmp_path, tiny_models["flux1"], steps=2, gradient_checkpointing=True, attention=attention)
    trainer.prepare()
    before = sdpa_state()
    assert before[0] is True  # torch's default: cuDNN attention allowed (what failed on the H200)
    seen: list[tuple[str, tuple]] = []
    block = trainer.transformer.transformer_blocks[0]

    def on_block(module, args):
        if module.training:  # not the sample's inference passes
            seen.append(("block forward" if torch.is_grad_enabled() else "no-grad", sdpa_state()))

    def on_output(module, args, output):
        if module.training:
            output[0].register_hook(lambda grad: seen.append(("backward", sdpa_state())))

    block.register_forward_pre_hook(on_block)
    trainer.transformer.register_forward_hook(on_output)
    result = trainer.run()

    assert result.state == "ready"
    # Per step: the block's forward, the transformer's backward, and the block's recomputation in it.
    assert [kind for kind, _ in seen].count("backward") == 2 and len(seen) == 6
    assert {state for _, state in seen} == {inside}
    assert sdpa_state() == before  # the choice is only in force around the steps


def poison_loss_at(monkeypatch, step: int) -> None:
    """The loss of the ``step``-th training step (1-based) becomes NaN."""
    real, calls = Trainer.flow_loss, [0]

    def flow_loss(self, *args, **kwargs):
        calls[0] += 1
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if calls[0] == step else loss

    monkeypatch.setattr(Trainer, "flow_loss", flow_loss)


def lora_snapshot(trainer: Trainer) -> list:
    return [p.detach().clone() for p in trainer.params]


def test_a_nan_loss_at_step_1_is_diagnosed_before_any_update_and_not_blamed_on_the_learning_rate(
        tiny_models, tmp_path, monkeypatch):
    from services.engine.train import DivergedError

    trainer = tiny_trainer(tmp_path, tiny_models["flux1"])
    trainer.prepare()
    weights = lora_snapshot(trainer)
    poison_loss_at(monkeypatch, 1)
    with pytest.raises(DivergedError) as err:
        trainer.run()
    text = str(err.value)
    assert "The loss is nan at step 1, the first step, before any weight was updated" in text
    assert "the learning rate is not the cause" in text and "Lower the learning rate" not in text
    assert '"attention": "math"' in err.value.hint and '"precision": "fp32"' in err.value.hint
    assert all(torch.equal(a, b) for a, b in zip(weights, lora_snapshot(trainer)))  # the preflight stopped it
    assert trainer.losses == []


def test_a_nan_loss_at_a_later_step_names_it_and_says_to_lower_the_learning_rate(tiny_models, tmp_path,
                                                                                  monkeypatch):
    from services.engine.train import DivergedError

    trainer = tiny_trainer(tmp_path, tiny_models["flux1"], steps=5)
    poison_loss_at(monkeypatch, 3)
    with pytest.raises(DivergedError) as err:
        trainer.run()
    assert "The loss became nan at step 3; the steps before it were finite." in str(err.value)
    assert err.value.hint == "Lower the learning rate (now 0.001), e.g. to a third."
    assert len(trainer.losses) == 3 and all(np.isfinite(trainer.losses[:2]))


def test_non_finite_lora_gradients_at_step_1_are_caught_before_the_update(tiny_models, tmp_path):
    from services.engine.train import DivergedError

    trainer = tiny_trainer(tmp_path, tiny_models["flux2"], family="flux2")
    trainer.prepare()
    name, param = trainer.named_params[3]
    param.register_hook(lambda grad: torch.full_like(grad, float("inf")))  # a finite loss, an inf gradient
    weights = lora_snapshot(trainer)
    with pytest.raises(DivergedError) as err:
        trainer.run()
    assert f"The gradient of 1 of {len(trainer.params)} LoRA weights (first {name}) is inf at step 1" in str(err.value)
    assert "the learning rate is not the cause" in str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(weights, lora_snapshot(trainer)))


def test_the_family_comes_from_the_base_model_when_the_config_names_none(tiny_models, tmp_path):
    from services.engine.config import resolve_family
    from services.errors import InputError

    def family(**kw) -> str:
        return resolve_family(TrainConfig(steps=1, **kw))

    assert family(base_model="tiny-flux2-klein") == "flux2" and family(base_model="flux1-dev") == "flux1"
    assert family(base_model="black-forest-labs/FLUX.2-klein-base-4B") == "flux2"  # a Hub id
    assert family(model_path=str(tiny_models["flux2"])) == "flux2"  # a folder's model_index.json
    assert family(model_path=str(tiny_models["flux1"]), base_model="tiny-flux2-klein") == "flux1"  # what loads
    assert family(family="flux2", base_model="flux1-dev") == "flux2"  # named: as named
    with pytest.raises(InputError, match="names no base model"):
        family()
    # A klein folder and no family: the klein pipeline loads it (it was FluxPipeline, which refused it).
    trainer = tiny_trainer(tmp_path, tiny_models["flux2"], family="flux2")
    trainer.load()
    assert type(trainer.pipe).__name__ == "Flux2KleinPipeline" and trainer.cfg.family == "flux2"


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_the_sample_keeps_the_latents_in_the_vaes_dtype_whatever_the_transformer_returns(
        tiny_models, tmp_path, monkeypatch, family):
    trainer = tiny_trainer(tmp_path, tiny_models[family], family=family, precision="bf16")
    trainer.prepare()
    assert trainer.pipe.vae.dtype == torch.bfloat16
    real_forward = trainer.transformer.forward

    def forward(*args, **kwargs):  # as a quantised transformer with fp32 LoRA weights did on the GPU
        out = real_forward(*args, **kwargs)
        return (out[0].float(), *out[1:])

    monkeypatch.setattr(trainer.transformer, "forward", forward)
    path = trainer.sample(1)
    with Image.open(path) as image:
        assert image.size == trainer.sample_size()


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_every_quantised_preset_trains_and_makes_its_samples(tmp_path, monkeypatch, family):
    bnb = pytest.importorskip("bitsandbytes")  # its CPU backend quantises to NF4 here as CUDA does there
    from benchmarks.local_train_gpu import _tiny, in_memory_factory
    from services.engine import memory

    # bitsandbytes repacks NF4 weights for its AVX512-bf16 inference kernel on CPUs that have one, which
    # needs a layer at least one quantisation block (64) wide; the tiny models' are 4 to 48 wide.
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False)
    # The GPU presets, on the CPU: the trainer refuses them here; bitsandbytes does not.
    monkeypatch.setattr(memory, "resolve_preset", lambda name, device, gpu=None: memory.PRESETS[name])
    for preset in ("24gb", "16gb", "12gb"):
        seq = tiny.MAX_SEQUENCE_LENGTH if family == "flux1" else tiny.FLUX2_MAX_SEQUENCE_LENGTH
        cfg = TrainConfig(family=family, steps=2, learning_rate=1e-3, rank=4, resolution=64, bucket_step=16,
                          max_sequence_length=seq, sample_steps=1, device="cpu", precision="bf16",
                          memory_preset=preset)
        trainer = Trainer(cfg, make_zip(tmp_path / f"{preset}.zip"), tmp_path / preset,
                          pipeline_factory=in_memory_factory(_tiny(family), "cpu"))
        result = trainer.run()
        assert result.state == "ready" and len(result.samples) == 1 and result.samples[0].is_file(), preset
        assert isinstance(trainer.transformer.transformer_blocks[0].attn.to_q.base_layer, bnb.nn.Linear4bit)
        assert type(trainer.optimizer).__name__ == "AdamW8bit" and trainer.cfg.gradient_checkpointing
        # What the pipelines read as the transformer's dtype: its own weights', not the fp32 LoRA's.
        assert trainer.transformer.dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 for p in trainer.params)
        assert result.lora_path.is_file()


def test_a_misspelt_attention_or_precision_is_refused_before_anything_loads(tmp_path):
    from services.errors import InputError

    with pytest.raises(InputError, match="no attention setting called 'cudnn'") as err:
        Trainer(TrainConfig(steps=1, family="flux1", attention="cudnn"), tmp_path / "d.zip", tmp_path / "job")
    assert "auto, math" in err.value.hint
    with pytest.raises(InputError, match="no precision called 'fp16'"):
        Trainer(TrainConfig(steps=1, family="flux1", precision="fp16"), tmp_path / "d.zip", tmp_path / "job")
