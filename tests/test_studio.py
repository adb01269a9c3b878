"""The one implementation of each step, called directly with a Caller: launch, cancel, job lookup,
compare, grid (cells through ``on_cell``), and a visitor's Hugging Face sign-in reaching the provider
through the HTTP/MCP API (against the fake CometAPI over loopback HTTP, and a fake Hub)."""
from __future__ import annotations

import time
import threading

import gradio as gr
import pytest
from starlette.requests import Request

from services.access import ProviderAccess
from services.caller import Caller
from services.config import Secret
from services.errors import InputError, RateLimitedError
from services.providers import registry
from services.studio import Studio
from tests import imagefactory as fx
from tests.conftest import FAKE_COMETAPI_KEY


@pytest.fixture
def comet_settings(settings, fake_cometapi):
    fake_cometapi.pending_polls = 0
    return settings.with_(cometapi_base_url=fake_cometapi.url, cometapi_key=Secret(FAKE_COMETAPI_KEY))


@pytest.fixture
def studio(comet_settings):
    with Studio(comet_settings, background=False) as s:
        yield s


def _dataset(studio: Studio, caller: Caller, tmp_path, name: str = "mugs") -> str:
    handle = studio.dataset(name, caller=caller).add(*fx.good_set(tmp_path / name, count=2, size=(320, 240)))
    handle.set_trigger_word("MUGX")
    return handle.name


def test_a_caller_repr_shows_no_secret():
    caller = Caller("ann", Secret("sk-visitor-key-123"), Secret("hf_visitor_token_456"), "10.0.0.1")
    assert "sk-visitor" not in repr(caller) and "hf_visitor" not in repr(caller) and "ann" in repr(caller)


def test_launch_cancel_and_lookup_are_the_callers_own(studio, fake_cometapi, tmp_path):
    ann, bob = Caller("ann"), Caller("bob")
    ds = _dataset(studio, ann, tmp_path)
    job = studio.launch(ds, "mug-v1", mode="product", iterations=100, caller=ann)
    assert job.job.provider == "cometapi" and job.job.remote_id and job.job.owner == "ann"
    assert job.job.params["trigger_word"] == "MUGX"  # the dataset's
    assert [j.id for j in studio.list_jobs(caller=ann)] == [job.id] and studio.list_jobs(caller=bob) == []
    for ref in (job.id, job.job.remote_id, "mug-v1", job.id[:8]):  # the table's 8 characters too
        assert studio.job(ref, caller=ann).id == job.id
    with pytest.raises(InputError, match="No job of yours"):
        studio.job(job.id[:4], caller=ann)  # too short to name one
    with pytest.raises(InputError, match="No job of yours"):
        studio.job(job.id, caller=bob)
    with pytest.raises(InputError, match="No job of yours"):
        studio.cancel(job.id, caller=bob)
    cancelled = studio.cancel(job.id[:8], caller=ann)
    assert cancelled.status == "cancelled"
    assert [r.json["finetune_id"] for r in fake_cometapi.requests("/flux/v1/delete_finetune")] == [job.job.remote_id]


def test_a_job_prefix_shared_by_two_jobs_names_neither(studio, tmp_path, monkeypatch):
    import types
    import uuid

    ids = iter([uuid.UUID("abcdef12" + "0" * 24), uuid.UUID("abcdef99" + "0" * 24)])
    monkeypatch.setattr("services.storage.jobs.uuid", types.SimpleNamespace(uuid4=lambda: next(ids)))
    ann = Caller("ann")
    ds = _dataset(studio, ann, tmp_path)
    first, second = studio.launch(ds, "one", caller=ann), studio.launch(ds, "two", caller=ann)
    with pytest.raises(InputError, match="starts the ids of 2 of your jobs"):
        studio.job("abcdef", caller=ann)
    assert studio.job("abcdef12", caller=ann).id == first.id and studio.job("abcdef99", caller=ann).id == second.id


def test_hosted_launch_is_checked_before_it_is_charged_and_then_charged_once(comet_settings, tmp_path):
    settings = comet_settings.with_(hosted=True, shared_key_limit=1)
    with Studio(settings, background=False) as studio:
        ann = Caller("ann", client_address="10.0.0.1")
        ds = _dataset(studio, ann, tmp_path)
        assert studio.calls_left("cometapi", ann) == 1
        with pytest.raises(InputError, match="name"):
            studio.launch(ds, "", caller=ann)  # refused before the budget is touched
        assert studio.calls_left("cometapi", ann) == 1
        studio.launch(ds, "mug-v1", caller=ann)
        assert studio.calls_left("cometapi", ann) == 0
        with pytest.raises(RateLimitedError):
            studio.launch(ds, "mug-v2", caller=ann)
        own = Caller("ann", cometapi_key=Secret(FAKE_COMETAPI_KEY), client_address="10.0.0.1")
        assert studio.calls_left("cometapi", own) is None  # their own key: nothing is counted
        assert studio.launch(ds, "mug-v3", caller=own).job.params["launched_with_own_key"] is True


def test_compare_with_a_caller(studio, fake_cometapi):
    finetune = fake_cometapi.add_finetune()
    pair = studio.compare(finetune, " a photo of TOK ", seed=7, strength=1.1, caller=Caller("ann"))
    assert pair.base.status == pair.tuned.status == "ok" and pair.request.prompt == "a photo of TOK"
    assert pair.calls_left is None and not pair.tiny and pair.strength_fixed == ""
    sent = fake_cometapi.requests("/flux/v1/flux-pro-1.1-ultra-finetuned")
    assert [r.json["finetune_strength"] for r in sent] == [1.1] and sent[0].json["seed"] == 7
    with pytest.raises(InputError, match="The prompt is empty"):
        studio.compare(finetune, "  ", caller=Caller("ann"))


def test_hosted_compare_of_an_id_from_elsewhere_needs_the_callers_own_key(comet_settings, fake_cometapi):
    finetune = fake_cometapi.add_finetune()
    with Studio(comet_settings.with_(hosted=True), background=False) as studio:
        with pytest.raises(InputError, match="works only with your own key"):
            studio.compare(finetune, "TOK", caller=Caller("ann"))
        assert fake_cometapi.requests("/flux/v1/flux-pro-1.1-ultra") == []
        own = Caller("ann", cometapi_key=Secret(FAKE_COMETAPI_KEY))
        assert studio.compare(finetune, "TOK", caller=own).tuned.status == "ok"


def test_grid_streams_each_cell_through_on_cell(studio, fake_cometapi):
    finetune = fake_cometapi.add_finetune()
    seen, lock = [], threading.Lock()

    def on_cell(cell, progress):
        with lock:
            seen.append(((cell.row, cell.col), progress.done, progress.total))

    grid = studio.grid(finetune, ["TOK one", "TOK two"], [0.5, 1.5], include_base=True, seed=3, on_cell=on_cell,
                       caller=Caller("ann"))
    assert sorted(cell for cell, _, _ in seen) == [(r, c) for r in range(2) for c in range(3)]
    assert sorted(done for _, done, _ in seen) == list(range(1, 7)) and {t for _, _, t in seen} == {6}
    assert grid.failed == 0 and grid.result.columns == ["base", "strength 0.5", "strength 1.5"]


def test_a_grid_stops_starting_cells_once_cancelled(studio, fake_cometapi):
    finetune = fake_cometapi.add_finetune()
    cancel = threading.Event()
    cancel.set()  # the page went away before anything started
    grid = studio.grid(finetune, ["TOK one", "TOK two"], [1.0], include_base=False, cancel=cancel,
                       caller=Caller("ann"))
    assert fake_cometapi.requests("/flux/v1/flux-pro-1.1-ultra-finetuned") == []
    assert sum(len(row) for row in grid.result.cells) == 0


def test_the_providers_describe_themselves():
    assert [i.key for i in registry.REGISTERED] == ["cometapi", "local", "huggingface"]
    assert registry.guess_provider("local-abc", ["cometapi", "local"]) == "local"
    assert registry.choices("local") == {"base_model", "memory_preset", "gradient_checkpointing"}
    assert registry.choices("huggingface") == {"hardware", "gradient_checkpointing"}
    assert registry.choices("cometapi") == frozenset()
    options = registry.train_options("cometapi", base_model="flux1-dev", hardware="a100-large")
    assert type(options).__name__ == "TrainOptions"  # another provider's settings are left out
    local = registry.train_options("local", base_model="", memory_preset="16gb", hardware="a100-large")
    assert (local.base_model, local.memory_preset) == (None, "16gb") and not hasattr(local, "hardware")


def test_the_banner_and_choices_come_from_studio(comet_settings, tmp_path):
    with Studio(comet_settings.with_(hosted=True), background=False) as studio:
        shared = studio.banner("cometapi", Caller("ann"))
        assert shared.startswith("✅ CometAPI: using this app's shared key") and "20 left for you this hour" in shared
        assert studio.banner("cometapi", Caller("ann", cometapi_key=Secret("sk-x"))) == \
            "✅ CometAPI: using your own key for this session."
        assert "Sign in with Hugging Face" in studio.banner("huggingface", Caller("ann"))
        assert studio.banner("huggingface", Caller("ann", hf_token=Secret("hf_x"))).startswith(
            "✅ Hugging Face: on your own Hugging Face account")
        choices = studio.train_choices("local")
        assert "base_model" in choices.fields and choices.default_base_model == "tiny-flux1"
        assert ("Auto (from the GPU)", "") in choices.memory_presets
        assert studio.tuned_models() == ["flux-pro-1.1-ultra-finetuned", "flux-pro-finetuned"]


def _signed_in(token: str) -> gr.Request:
    """A request carrying the session Gradio's OAuth callback leaves after "Sign in with Hugging Face"."""
    session = {"oauth_info": {"userinfo": {"preferred_username": "ann-hf", "name": "Ann"},
                              "access_token": token, "expires_at": time.time() + 3600}}
    return gr.Request(request=Request({"type": "http", "headers": [], "session": session,
                                       "client": ("10.0.0.9", 1234)}))


def _endpoint(demo: gr.Blocks, name: str):
    return next(fn.fn for fn in demo.fns.values() if fn.api_name == name)


def test_the_apis_caller_brings_the_visitors_hugging_face_sign_in(settings, tmp_path):
    """Hosted, the API's launch runs on the signed-in visitor's own Hugging Face account: their sign-in
    reaches ProviderAccess through Studio (it never did: the app-wide provider answered "sign in")."""
    from components import api
    from services.providers.huggingface.provider import HuggingFaceProvider
    from tests.fake_hf import TOKEN, Hub

    settings = settings.with_(hosted=True, hf_token=Secret(TOKEN))
    hub = Hub(tmp_path)
    made: list[Secret] = []

    def visitors_own(token: Secret) -> HuggingFaceProvider:
        made.append(token)
        return HuggingFaceProvider(settings, token=token, api=hub.api, log_every_s=0)

    with Studio(settings, background=False) as studio:
        studio.access = ProviderAccess(settings, studio.providers, {"huggingface": visitors_own})
        with gr.Blocks() as demo:
            api.build(studio)
        request = _signed_in("hf_oauth_ann_visitor_token")
        owner = "hf-ann-hf"
        studio.dataset("cup", caller=Caller(owner)).add(*fx.good_set(tmp_path / "g", count=3, size=(640, 640)))
        job = _endpoint(demo, "launch_finetune")("cup", "cup-hf", "huggingface", request=request)
        assert job["provider"] == "huggingface" and job["status"] == "pending", job
        assert made == [Secret("hf_oauth_ann_visitor_token")]  # the visitor's token, never the owner's TOKEN
        assert studio.jobs.get(owner, job["id"]).params["launched_with_own_key"] is True
        assert hub.api.run_uv_job.call_count == 1
        # Not signed in: the app-wide provider answers, which never spends the owner's token.
        from components.identity import VISITOR_COOKIE
        from services.storage import visitors

        cookie = visitors.mint(settings)
        studio.dataset("cup", caller=Caller(visitors.owner_of(settings, cookie))).add(
            *fx.good_set(tmp_path / "h", count=3, size=(640, 640)))
        anonymous = gr.Request(cookies={VISITOR_COOKIE: cookie})
        with pytest.raises(Exception, match="Sign in with Hugging Face"):
            _endpoint(demo, "launch_finetune")("cup", "cup-hf2", "huggingface", request=anonymous)
        assert hub.api.run_uv_job.call_count == 1


def test_the_memory_check_for_the_train_tab(settings, monkeypatch):
    """On a (pretend) 16 GB GPU: Auto picks the 16 GB preset for FLUX.1 [dev]; bf16 does not fit; the tiny
    model needs no preset; a provider that does not train here says nothing."""
    from services.engine import memory
    from services.providers.local.provider import LocalProvider

    monkeypatch.setattr(memory, "detect_gpu", lambda index=0: memory.GpuMemory("Test GPU", 16.0, None))
    local = LocalProvider(settings.with_(local_model="black-forest-labs/FLUX.1-dev"), device="cuda")
    with Studio(settings, providers={"local": local}, background=False) as studio:
        auto, problem = studio.memory_check("local", base_model="flux1-dev", lora_rank=16)
        assert auto.startswith("Memory preset 16 GB") and "Test GPU has 16.0 GB" in auto and problem == ""
        summary, problem = studio.memory_check("local", base_model="flux1-dev", memory_preset="bf16", lora_rank=16)
        assert "(does NOT fit)" in summary and "needs about 25" in problem and "16 GB preset" in problem
        assert studio.memory_check("local", base_model="tiny-flux2-klein")[0].startswith("No CUDA GPU")
        _, refused = studio.memory_check("local", base_model="/etc")
        assert "'/etc' is not a base model" in refused
