"""The Hugging Face provider against HfApi and InferenceClient mocked at the method level (autospec),
answering with huggingface_hub's own records (JobInfo, JobHardwareInfo, ModelInfo). Nothing is sent."""
from __future__ import annotations

import io
import json
import sys
import zipfile
from pathlib import Path
from unittest.mock import create_autospec, patch

import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import GatedRepoError
from huggingface_hub.hf_api import ModelInfo
from PIL import Image

from services.config import Secret, Settings
from services.errors import AuthError, InputError, InsufficientCreditsError, NotServedError, TaskNotFoundError
from services.providers.base import GenerateRequest, TrainRequest, job_tag
from services.providers.huggingface import hardware, job_script, jobs, package
from services.providers.huggingface.hub import HOSTED_SIGN_IN, LOCAL_NO_TOKEN
from services.providers.huggingface.provider import HuggingFaceOptions
from services.providers.huggingface.provider import HuggingFaceProvider
from services.engine import events
from services.storage.datasets import DatasetStores
from services.storage.jobs import JobStore
from services.targets import guess_provider
from services.training import TrainingService
from tests import imagefactory as fx
from tests.fake_hf import JOB_ID, NS, REMOTE, REPO, TAG, TOKEN, Hub, _content, _http_error


@pytest.fixture
def hub(tmp_path) -> Hub:
    return Hub(tmp_path)


@pytest.fixture
def hf_settings(settings) -> Settings:
    return settings.with_(hf_token=Secret(""), hf_inference_provider="auto")


def _provider(settings: Settings, hub: Hub, factory=None, token: str | None = TOKEN) -> HuggingFaceProvider:
    return HuggingFaceProvider(settings, token=Secret(token) if token is not None else None, api=hub.api,
                               inference_factory=factory, log_every_s=0)


def _req(hardware: str = "", **kw) -> TrainRequest:
    base = dict(name="mug-v1", mode="product", trigger_word="MUG", iterations=300, lora_rank=16)
    return TrainRequest(**{**base, **kw}, options=HuggingFaceOptions(hardware=hardware))


@pytest.fixture
def zip_path(tmp_path) -> Path:
    path = tmp_path / "mug.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.jpg", b"jpeg bytes")
    return path


# --------------------------------------------------------------------------- a job from launch to ready


def test_a_job_goes_from_scheduling_to_ready_with_progress_losses_and_samples(hf_settings, hub, zip_path):
    provider = _provider(hf_settings, hub)
    uploads = []
    remote = provider.submit(zip_path, _req(hardware="a100-large"), tag=JOB_ID,
                             on_upload=lambda done, total: uploads.append((done, total)))
    assert remote == REMOTE and uploads[-1][0] == uploads[-1][1] > 0

    # The inputs went to the user's private dataset repo, the result goes to a private model repo.
    repos = {c.args[0]: c.kwargs for c in hub.api.create_repo.call_args_list}
    assert repos[f"{NS}/flux-studio-data"] == {"repo_type": "dataset", "private": True, "exist_ok": True}
    assert repos[REPO] == {"repo_type": "model", "private": True, "exist_ok": True}
    [commit] = hub.api.create_commit.call_args_list
    ops = {op.path_in_repo: op for op in commit.args[1]}
    assert set(ops) == {f"jobs/{TAG}/dataset.zip", f"jobs/{TAG}/config.json", f"jobs/{TAG}/code.zip"}
    config = json.loads(_content(ops[f"jobs/{TAG}/config.json"]))
    assert config["steps"] == 300 and config["trigger_word"] == "MUG" and config["base_model"] == "flux1-dev"
    assert config["checkpoint_every"] == config["sample_every"] == hf_settings.hf_checkpoint_every
    assert config["memory_preset"] == "bf16"  # what an 80 GB A100 trains with
    assert _content(ops[f"jobs/{TAG}/dataset.zip"]) == zip_path.read_bytes()
    with zipfile.ZipFile(io.BytesIO(_content(ops[f"jobs/{TAG}/code.zip"]))) as zf:
        assert "services/engine/events.py" in zf.namelist()

    spec = hub.specs[hub.only_job]
    assert Path(spec["script"]).name == "job_script.py" and Path(spec["script"]).is_file()
    assert spec["script_args"] == ["--data-repo", f"{NS}/flux-studio-data", "--prefix", f"jobs/{TAG}",
                                   "--model-repo", REPO]
    assert spec["flavor"] == "a100-large" and spec["timeout"] == hf_settings.hf_job_timeout
    assert spec["labels"][jobs.TAG_LABEL] == TAG and spec["labels"][jobs.REPO_LABEL] == REPO.split("/")[1]
    assert spec["secrets"] == {"HF_TOKEN": TOKEN}
    assert "torch>=2.4" in spec["dependencies"] and "huggingface-hub>=1.0" in spec["dependencies"]
    assert "bitsandbytes" not in spec["dependencies"]  # bf16 on an A100

    job_id = hub.only_job
    st = provider.status(remote)
    assert st.state == "pending" and st.message == "Waiting for a a100-large machine on Hugging Face Jobs."

    hub.stage[job_id] = ("RUNNING", None)
    hub.say(job_id, "Installed 84 packages in 40s", events.line("start", total=300, resumed_from=0),
            events.line("phase", message="Downloading FLUX.1 [dev]"))
    st = provider.status(remote)
    assert st.state == "running" and st.message == "Downloading FLUX.1 [dev]" and st.samples == ()
    assert hub.api.fetch_job_logs.call_args.kwargs["follow"] is False

    hub.repo_files[f"{REPO}/samples/step_000100.png"] = b"png-100"
    hub.say(job_id, *[events.line("step", step=s, total=300, loss=1.0 / s, eta_s=600 - 2 * s) for s in (1, 50, 100)],
            events.line("sample", step=100, path="samples/step_000100.png"),
            events.line("checkpoint", step=100, path="checkpoints/step_000100"))
    st = provider.status(remote)
    assert st.state == "running" and st.step == 100 and st.progress == pytest.approx(100 / 300)
    assert st.message == "Training: step 100 of 300" and st.eta_s == 400 and st.loss == pytest.approx(0.01)
    assert st.losses == ((1, 1.0), (50, 0.02), (100, 0.01))
    local = Path(hf_settings.data_dir) / "hf_jobs" / TAG / "samples" / "step_000100.png"
    assert st.samples == (str(local),) and local.read_bytes() == b"png-100"

    hub.repo_files[f"{REPO}/samples/step_000200.png"] = b"png-200"
    hub.say(job_id, events.line("step", step=200, total=300, loss=0.005, eta_s=200),
            events.line("sample", step=200, path="samples/step_000200.png"))
    st = provider.status(remote)
    assert st.samples == (str(local.with_name("step_000200.png")), str(local))  # newest first
    assert [c.args[1] for c in hub.api.hf_hub_download.call_args_list] == \
        ["samples/step_000100.png", "samples/step_000200.png"]  # each sample downloaded once

    hub.say(job_id, events.line("step", step=300, total=300, loss=0.004, eta_s=0),
            events.line("done", state="ready", step=300, lora="pytorch_lora_weights.safetensors"))
    assert provider.status(remote).message.startswith("Finishing")  # still uploading
    hub.stage[job_id] = ("COMPLETED", None)
    st = provider.status(remote)
    assert st.state == "ready" and st.progress == 1.0
    assert st.result == {"finetune_id": REPO, "repo_url": f"https://huggingface.co/{REPO}"}
    provider.status(remote)
    assert hub.api.fetch_job_logs.call_count == 5  # none while scheduling; a finished job's logs are read once
    assert guess_provider(st.result["finetune_id"], ["cometapi", "local", "huggingface"]) == "huggingface"


@pytest.mark.parametrize("hf_message, lines, shown", [
    ("Job timeout", [], "Job timeout"),
    (None, [events.line("error", message="CUDA out of memory at step 3")], "CUDA out of memory at step 3"),
    (None, ["Traceback (most recent call last):", "ModuleNotFoundError: No module named 'peft'"],
     "ModuleNotFoundError: No module named 'peft'"),
])
def test_a_failed_job_says_why(hf_settings, hub, zip_path, hf_message, lines, shown):
    provider = _provider(hf_settings, hub)
    remote = provider.submit(zip_path, _req(hardware="a100-large"), tag=JOB_ID)
    hub.stage[hub.only_job] = ("ERROR", hf_message)
    hub.say(hub.only_job, *lines)
    st = provider.status(remote)
    assert st.state == "failed" and shown in st.message and st.result == {"resumable": False}


def test_a_job_that_completes_without_its_done_line_failed(hf_settings, hub, zip_path):
    provider = _provider(hf_settings, hub)
    remote = provider.submit(zip_path, _req(hardware="a100-large"), tag=JOB_ID)
    hub.stage[hub.only_job] = ("COMPLETED", None)
    hub.say(hub.only_job, events.line("step", step=3, total=300, loss=0.5), "Killed")
    st = provider.status(remote)
    assert st.state == "failed" and "Killed" in st.message


def test_a_deleted_job_is_not_found(hf_settings, hub, zip_path):
    provider = _provider(hf_settings, hub)
    remote = provider.submit(zip_path, _req(hardware="a100-large"), tag=JOB_ID)
    hub.stage[hub.only_job] = ("DELETED", None)
    with pytest.raises(TaskNotFoundError):
        provider.status(remote)
    with pytest.raises(TaskNotFoundError):
        _provider(hf_settings, hub).status(f"hf-job:{NS}/fs-unknown00000")


# --------------------------------------------------------------------------- cancel and resume


def test_cancel_keeps_the_checkpoint_and_resume_starts_a_new_job_with_the_same_tag(hf_settings, hub, zip_path):
    provider = _provider(hf_settings, hub)
    remote = provider.submit(zip_path, _req(hardware="a10g-large"), tag=JOB_ID)
    first = hub.only_job
    assert "bitsandbytes" in hub.specs[first]["dependencies"]  # 24 GB: the NF4 preset
    hub.stage[first] = ("RUNNING", None)
    hub.say(first, events.line("step", step=100, total=300, loss=0.1),
            events.line("checkpoint", step=100, path="checkpoints/step_000100"))
    provider.cancel(remote)
    assert hub.api.cancel_job.call_args.kwargs == {"job_id": first, "namespace": NS}
    st = provider.status(remote)
    assert st.state == "cancelled" and st.result == {"resumable": True} and "step 100" in st.message

    provider.resume(remote)
    assert hub.api.run_uv_job.call_count == 2
    second = list(hub.specs)[1]
    spec = hub.specs[second]
    assert spec["script_args"][-1] == "--resume" and spec["flavor"] == "a10g-large"
    assert spec["labels"][jobs.TAG_LABEL] == TAG and spec["labels"][jobs.ATTEMPT_LABEL] == "2"
    assert "bitsandbytes" in spec["dependencies"]
    hub.stage[second] = ("RUNNING", None)
    hub.say(second, events.line("start", total=300, resumed_from=100),
            events.line("step", step=101, total=300, loss=0.09))
    st = provider.status(remote)
    assert st.state == "running" and st.step == 101
    # A fresh provider (a restart) finds the newest attempt by its label too.
    assert _provider(hf_settings, hub).status(remote).step == 101


def test_a_job_cancelled_before_its_first_checkpoint_is_not_resumable(hf_settings, hub, zip_path):
    provider = _provider(hf_settings, hub)
    remote = provider.submit(zip_path, _req(hardware="a100-large"), tag=JOB_ID)
    provider.cancel(remote)
    assert provider.status(remote).result == {"resumable": False}
    provider.delete(remote)  # already stopped: nothing else to cancel, and the repos are kept
    assert hub.api.cancel_job.call_count == 1
    assert not hub.api.delete_repo.called


# --------------------------------------------------------------------------- a restart in the middle of a launch


@pytest.fixture
def dataset(settings, tmp_path) -> str:
    store = DatasetStores(settings)("local")
    name = store.create("mug").name
    store.add_files(name, fx.good_set(tmp_path / "g", count=4, size=(640, 640)))
    store.set_trigger_word(name, "MUG")
    return name


def test_a_launch_cut_off_after_the_job_started_is_found_by_its_label_not_started_twice(hf_settings, hub, dataset):
    db = hf_settings.data_dir / "jobs.sqlite3"
    service = TrainingService(JobStore(db), {"huggingface": _provider(hf_settings, hub)}, DatasetStores(hf_settings))
    hub.fail_after_run = ConnectionError("connection reset by peer")
    job = service.launch("local", "huggingface", dataset, _req(hardware="l40sx1"))
    assert job.status == "submitting" and not job.remote_id and "Not sure" in job.message
    assert hub.api.run_uv_job.call_count == 1
    hub.fail_after_run = None

    # The app restarts: a new provider and service over the same job database.
    restarted = TrainingService(JobStore(db), {"huggingface": _provider(hf_settings, hub)},
                                DatasetStores(hf_settings))
    restarted.track_once()
    found = restarted.jobs.get("local", job.id)
    assert found.status == "pending" and found.remote_id == f"hf-job:{NS}/{job_tag(job.id)}"
    hub.stage[hub.only_job] = ("RUNNING", None)
    hub.say(hub.only_job, events.line("step", step=10, total=300, loss=0.3))
    restarted.track_once()
    assert restarted.jobs.get("local", job.id).status == "running"
    assert hub.api.run_uv_job.call_count == 1  # never a second paid job

    # A retried submit with the same tag returns the job it finds, too.
    again = _provider(hf_settings, hub).submit(Path(__file__), _req(), tag=job.id)
    assert again == found.remote_id and hub.api.run_uv_job.call_count == 1


# --------------------------------------------------------------------------- tokens and rights


def test_no_token_locally_says_how_to_get_one(hf_settings, hub):
    with patch("huggingface_hub.get_token", return_value=None):
        provider = HuggingFaceProvider(hf_settings, api=hub.api)
    assert provider.readiness() == (False, LOCAL_NO_TOKEN)
    assert provider.hardware_options(_req()) == [] and provider.estimate(_req()) is None
    with pytest.raises(AuthError, match="No Hugging Face token"):
        provider.submit(Path(__file__), _req(), tag=JOB_ID)
    assert not hub.api.method_calls


def test_locally_the_saved_login_is_used(hf_settings, hub):
    with patch("huggingface_hub.get_token", return_value=TOKEN):
        assert HuggingFaceProvider(hf_settings, api=hub.api).readiness() == (True, "")


def test_hosted_the_app_wide_provider_never_uses_the_owners_token(settings, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hosted = Settings.from_env({"HF_TOKEN": TOKEN, "SPACE_ID": "owner/studio",
                                "FLUX_STUDIO_DATA_DIR": str(settings.data_dir)})
    assert hosted.hosted and hosted.hf_token
    with patch("huggingface_hub.get_token", return_value=TOKEN):
        shared = HuggingFaceProvider(hosted, api=hub.api)
    assert shared.readiness() == (False, HOSTED_SIGN_IN)
    with pytest.raises(AuthError, match="Sign in with Hugging Face"):
        shared.generate(GenerateRequest(prompt="a mug"), settings.data_dir)
    assert not hub.api.method_calls
    visitor = HuggingFaceProvider(hosted, token=Secret("hf_visitor_oauth_token"), api=hub.api)
    assert visitor.readiness() == (True, "")


def test_a_token_without_the_jobs_right_is_told_which_right(hf_settings, hub, zip_path):
    hub.api.run_uv_job.side_effect = _http_error(403, f"token {TOKEN} lacks job.write")
    with pytest.raises(AuthError) as err:
        _provider(hf_settings, hub).submit(zip_path, _req(hardware="a100-large"), tag=JOB_ID)
    assert "Jobs" in err.value.message and "settings/tokens" in err.value.hint
    assert TOKEN not in str(err.value)


def test_a_token_without_write_access_to_repos_is_told_so(hf_settings, hub, zip_path):
    hub.api.create_repo.side_effect = _http_error(403, "You don't have the rights to create a dataset")
    with pytest.raises(AuthError, match="write to your repositories"):
        _provider(hf_settings, hub).submit(zip_path, _req(hardware="a100-large"), tag=JOB_ID)
    assert not hub.api.run_uv_job.called


def test_an_account_without_credits_is_sent_to_billing(hf_settings, hub, zip_path):
    hub.api.run_uv_job.side_effect = _http_error(402, "Payment required")
    with pytest.raises(InsufficientCreditsError) as err:
        _provider(hf_settings, hub).submit(zip_path, _req(hardware="a100-large"), tag=JOB_ID)
    assert "https://huggingface.co/settings/billing" in err.value.hint


def test_a_base_model_licence_not_accepted_is_refused_before_any_upload(hf_settings, hub, zip_path):
    hub.api.auth_check.side_effect = _http_error(403, "gated", cls=GatedRepoError)
    with pytest.raises(AuthError) as err:
        _provider(hf_settings, hub).submit(zip_path, _req(hardware="a100-large"), tag=JOB_ID)
    assert "black-forest-labs/FLUX.1-dev" in err.value.hint
    assert not hub.api.create_commit.called and not hub.api.run_uv_job.called


def test_the_token_never_appears_outside_the_jobs_secrets(hf_settings, hub, zip_path):
    provider = _provider(hf_settings, hub)
    remote = provider.submit(zip_path, _req(hardware="a100-large"), tag=JOB_ID)
    hub.stage[hub.only_job] = ("ERROR", None)
    hub.say(hub.only_job, f"huggingface_hub.errors: 401 for token {TOKEN}")
    st = provider.status(remote)
    spec = dict(hub.specs[hub.only_job])
    assert spec.pop("secrets") == {"HF_TOKEN": TOKEN}
    assert TOKEN not in json.dumps(spec) and not spec.get("env")
    for op in hub.api.create_commit.call_args.args[1]:
        assert TOKEN.encode() not in _content(op)
    assert TOKEN not in st.message and "********" in st.message
    assert TOKEN not in str(provider) and TOKEN not in repr(provider)


# --------------------------------------------------------------------------- generating


def _info(repo: str, **providers) -> ModelInfo:
    mapping = {name: {"providerId": f"{name}/flux-lora", "status": status, "task": "text-to-image",
                      "adapter": "lora", "adapterWeightsPath": "pytorch_lora_weights.safetensors"}
               for name, status in providers.items()}
    return ModelInfo(id=repo, inferenceProviderMapping=mapping)


class Router:
    """InferenceClient instances made by the provider's factory, autospec'd, each drawing a small image."""

    def __init__(self) -> None:
        self.made: list[tuple[str, str]] = []
        self.client = create_autospec(InferenceClient, instance=True)
        self.client.text_to_image.side_effect = lambda prompt, **kw: Image.new("RGB", (64, 48), (200, 40, 40))

    def __call__(self, provider: str, token: str):
        self.made.append((provider, token))
        return self.client


def test_an_adapter_no_provider_serves_is_refused_with_what_to_do(hf_settings, hub, tmp_path):
    hub.api.model_info.return_value = _info(REPO)  # private: no mapping
    router = Router()
    provider = _provider(hf_settings, hub, router)
    with pytest.raises(NotServedError) as err:
        provider.generate(GenerateRequest(prompt="MUG on a desk"), tmp_path, finetune=REPO)
    assert "not served by any" in err.value.message and "public" in err.value.hint and "local engine" in err.value.hint
    assert hub.api.model_info.call_args.kwargs["expand"] == ["inferenceProviderMapping"]
    assert not router.client.text_to_image.called
    assert "not served" in provider.strength_fixed(REPO)


def test_replicate_applies_the_requested_strength(hf_settings, hub, tmp_path):
    hub.api.model_info.return_value = _info(REPO, replicate="live", **{"fal-ai": "error"})
    router = Router()
    provider = _provider(hf_settings, hub, router)
    assert provider.strength_fixed(REPO) == ""
    image = provider.generate(GenerateRequest(prompt="MUG on a desk", seed=7, strength=0.6, output_format="png"),
                              tmp_path, finetune=REPO)
    call = router.client.text_to_image.call_args
    assert call.kwargs["model"] == REPO and call.kwargs["extra_body"] == {"lora_scale": 0.6}
    assert call.kwargs["seed"] == 7 and router.made == [("replicate", TOKEN)]
    assert image.params["finetune_strength"] == 0.6 and image.params["provider"] == "replicate"
    assert image.path.parent == tmp_path and Image.open(image.path).format == "PNG"
    assert TOKEN not in json.dumps(image.params)


def test_fal_applies_a_lora_at_full_strength_and_says_so(hf_settings, hub, tmp_path):
    hub.api.model_info.return_value = _info(REPO, **{"fal-ai": "live"})
    router = Router()
    provider = _provider(hf_settings, hub, router)
    assert "full strength" in provider.strength_fixed(REPO)
    image = provider.generate(GenerateRequest(prompt="MUG", strength=0.6), tmp_path, finetune=REPO)
    assert router.client.text_to_image.call_args.kwargs["extra_body"] is None
    assert image.params["finetune_strength"] == 1.0 and image.params["strength_requested"] == 0.6
    assert Image.open(image.path).format == "JPEG"


def test_a_configured_provider_that_does_not_serve_the_adapter_is_named(hf_settings, hub, tmp_path):
    hub.api.model_info.return_value = _info(REPO, **{"fal-ai": "live"})
    provider = _provider(hf_settings.with_(hf_inference_provider="replicate"), hub, Router())
    with pytest.raises(NotServedError, match="not served by replicate.*only by fal-ai"):
        provider.generate(GenerateRequest(prompt="MUG"), tmp_path, finetune=REPO)


def test_the_base_model_is_generated_on_the_configured_provider(hf_settings, hub, tmp_path):
    router = Router()
    provider = _provider(hf_settings, hub, router)
    assert provider.compare_models(None) == ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-dev")
    image = provider.generate(GenerateRequest(prompt="a mug", width=1024, height=768), tmp_path)
    call = router.client.text_to_image.call_args
    assert call.kwargs["model"] == "black-forest-labs/FLUX.1-dev" and call.kwargs["extra_body"] is None
    assert call.kwargs["width"] == 1024 and router.made == [("auto", TOKEN)]
    assert image.model == "black-forest-labs/FLUX.1-dev" and "finetune_strength" not in image.params
    assert not hub.api.model_info.called


def test_an_inference_refusal_names_the_inference_right(hf_settings, hub, tmp_path):
    router = Router()
    router.client.text_to_image.side_effect = _http_error(403, "forbidden")
    with pytest.raises(AuthError, match="Inference Providers"):
        _provider(hf_settings, hub, router).generate(GenerateRequest(prompt="a mug"), tmp_path)


# --------------------------------------------------------------------------- hardware and cost


def test_hardware_options_are_single_gpu_flavours_fitting_first_cheapest_first(hf_settings, hub):
    provider = _provider(hf_settings, hub)
    opts = provider.hardware_options(_req())
    assert [o.name for o in opts] == ["l40sx1", "l4x1", "a100-large", "h200", "a10g-large", "t4-small", "a10g-small"]
    by = {o.name: o for o in opts}
    assert [o.fits for o in opts] == [True] * 5 + [False] * 2
    assert "bf16" in by["t4-small"].note and "RAM" in by["a10g-small"].note
    assert by["a100-large"].usd_per_hour == pytest.approx(2.50) and "bf16" in by["a100-large"].note
    assert "24 GB preset" in by["l4x1"].note
    provider.hardware_options(_req(iterations=500))
    assert hub.api.list_jobs_hardware.call_count == 1  # cached


def test_estimates_for_300_steps(hf_settings, hub):
    provider = _provider(hf_settings, hub)
    # setup 180 s install + 34 GB / 200 MB/s + 120 s load = 470 s; 44.7 TFLOP a step at 512 px; 3 samples of
    # 20 half-steps; bf16 MFU 15 %, NF4 x0.65.
    expected = {"a100-large": (470 + 300 * 44.7 / (312 * 0.15) + 3 * 20 * 22.35 / (312 * 0.15), 2.50),
                "l40sx1": (470 + 300 * 44.7 / (362 * 0.15) + 3 * 20 * 22.35 / (362 * 0.15), 1.80),
                "a10g-large": (470 + (300 * 44.7 + 3 * 20 * 22.35) / (70 * 0.15 * 0.65), 1.50)}
    for name, (seconds, per_hour) in expected.items():
        est = provider.estimate(_req(hardware=name))
        assert est.hardware == name and est.seconds == pytest.approx(seconds, rel=1e-6)
        assert est.usd == pytest.approx(seconds / 3600 * per_hour, rel=1e-6)
    a100 = provider.estimate(_req(hardware="a100-large"))
    assert a100.summary == "about 13 min on Nvidia A100 (a100-large, $2.50/h): about $0.55"
    assert provider.estimate(_req()).hardware == "l40sx1"  # the cheapest that fits
    assert provider.estimate(_req(priority="high_res_only", hardware="a100-large")).seconds > a100.seconds


def test_a_machine_that_does_not_fit_or_does_not_exist_is_refused_before_launch(hf_settings, hub):
    provider = _provider(hf_settings, hub)
    with pytest.raises(InputError, match="does not fit"):
        provider.check_request(_req(hardware="t4-small"))
    with pytest.raises(InputError, match="not a single-GPU machine"):
        provider.check_request(_req(hardware="a100x4"))
    provider.check_request(_req(hardware="l4x1"))
    assert provider.estimate(_req(hardware="t4-small")) is None


def test_flops_between_the_measured_resolutions_follow_the_token_count():
    assert hardware.flops_per_step("flux1-dev", 512) == 44.7e12
    mid = hardware.flops_per_step("flux1-dev", 768)
    assert 44.7e12 < mid < 163.9e12
    assert hardware.flops_per_step("unknown", 512) is None


# --------------------------------------------------------------------------- what a job is sent


def test_job_dependencies_come_from_the_requirement_files():
    deps = package.job_dependencies(quantised=False)
    local = package.requirement_lines(package.ROOT / "requirements-local.txt")
    assert deps[:len(local)] == local and {package.requirement_name(d) for d in deps} >= {
        "torch", "diffusers", "peft", "huggingface-hub", "pillow"}
    assert "gradio" not in {package.requirement_name(d) for d in deps}
    assert package.job_dependencies(quantised=True)[-1] == "bitsandbytes"


def test_the_bootstrap_fetches_its_inputs_and_runs_the_trainer_with_push_to(tmp_path, monkeypatch):
    files = {"code.zip": package.code_bundle(), "config.json": b"{}", "dataset.zip": b"zip"}

    def download(repo, filename, *, repo_type=None, local_dir=None):
        assert repo == f"{NS}/flux-studio-data" and repo_type == "dataset"
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(files[filename.rsplit("/", 1)[1]])
        return str(target)

    monkeypatch.setattr(job_script, "WORK", tmp_path / "work")
    monkeypatch.setattr(sys, "path", list(sys.path))
    with patch("huggingface_hub.hf_hub_download", side_effect=download), \
            patch("os.execve") as run:
        job_script.main(["--data-repo", f"{NS}/flux-studio-data", "--prefix", f"jobs/{TAG}",
                         "--model-repo", REPO, "--resume"])
    path, cmd, env = run.call_args.args
    assert path == cmd[0] == sys.executable  # the trainer replaces the bootstrap: SIGTERM reaches it
    assert cmd[1:3] == ["-m", "services.engine.cli"]
    assert cmd[cmd.index("--push-to") + 1] == REPO and cmd[-1] == "--resume"
    assert Path(cmd[cmd.index("--config") + 1]).read_bytes() == b"{}"
    assert str(tmp_path / "work" / "code") in env["PYTHONPATH"]
    assert (tmp_path / "work" / "code" / "services" / "engine" / "events.py").is_file()


def test_names_and_ids():
    names = jobs.Names(NS, TAG, jobs.model_repo_name("Mug v1 — Ünïcode!", TAG))
    assert names.remote_id == REMOTE and jobs.parse_remote_id(REMOTE) == (NS, TAG)
    assert names.model_repo == f"{NS}/flux-lora-mug-v1-n-code-{TAG}"
    with pytest.raises(TaskNotFoundError):
        jobs.parse_remote_id("local-abc")
    assert not jobs.sample_path_ok("../../etc/passwd.png") and not jobs.sample_path_ok("/tmp/x.png")
    assert jobs.sample_path_ok("samples/step_000050.png")
    keys = ["cometapi", "local", "huggingface"]
    assert guess_provider("local-abc", keys) == "local" and guess_provider("9f0c1e2a", keys) == "cometapi"
    assert guess_provider(REPO, ["cometapi"]) == "cometapi"  # not configured: the first one


def test_a_running_jobs_log_is_read_at_most_every_few_seconds(hf_settings, hub, zip_path):
    """Reading a log without following waits on HF's log service; the tracker polls every few seconds."""
    now = [1000.0]
    provider = HuggingFaceProvider(hf_settings, token=Secret(TOKEN), api=hub.api, clock=lambda: now[0])
    remote = provider.submit(zip_path, _req(hardware="a100-large"), tag=JOB_ID)
    job_id = hub.only_job
    hub.stage[job_id] = ("RUNNING", None)
    hub.say(job_id, events.line("step", step=1, total=300, loss=0.5, eta_s=60.0))
    assert provider.status(remote).step == 1
    hub.say(job_id, events.line("step", step=2, total=300, loss=0.4, eta_s=59.0))
    now[0] += 5.0
    assert provider.status(remote).step == 1 and hub.api.fetch_job_logs.call_count == 1  # the log read 5 s ago
    now[0] += 5.0
    assert provider.status(remote).step == 2 and hub.api.fetch_job_logs.call_count == 2
    hub.stage[job_id] = ("COMPLETED", None)
    hub.say(job_id, events.line("done", state="ready", step=300, lora="pytorch_lora_weights.safetensors"))
    assert provider.status(remote).state == "ready"  # a finished job is read at once, however recent the last read
