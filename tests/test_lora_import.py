"""Your LoRA everywhere, through ``Studio`` on the tiny models: a fine-tune exported for ComfyUI, a LoRA made
elsewhere imported and compared like a fine-tune made here, from a file or a Hub repo, and every bad file
refused with why before anything is rendered, leaving nothing loaded."""
from __future__ import annotations

from pathlib import Path
from unittest.mock import create_autospec

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from services.caller import Caller  # noqa: E402
from services.config import Secret, Settings  # noqa: E402
from services.engine import infer, lora_formats as lf  # noqa: E402
from services.engine.card import LORA_FILE  # noqa: E402
from services.engine.models import FLUX1, FLUX2, TINY_FLUX1, TINY_FLUX2  # noqa: E402
from services.errors import InputError  # noqa: E402
from services.providers.base import TrainRequest  # noqa: E402
from services.providers.huggingface.provider import HuggingFaceProvider  # noqa: E402
from services.providers.local.base_models import LocalOptions  # noqa: E402
from services.providers.local.provider import LocalProvider  # noqa: E402
from services.storage.owners import LOCAL_OWNER  # noqa: E402
from services.studio import Studio  # noqa: E402
from tests.imagefactory import training_zip  # noqa: E402
from tests.tiny_finetune import studio, trained  # noqa: E402,F401 (fixtures)
from tests.test_lora_formats import fake_hub, hf_job_repo, info, make_lora  # noqa: E402

PROMPT = "TOK, a red ball"
SEED = 5
HF_TOKEN = "hf_FAKEvisitor0123456789abcdefSECRET"
HF_REPO = "alice/flux-studio-cup-v1"


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def compare(studio: Studio, finetune, strength: float, caller: Caller | None = None):
    pair = studio.compare(finetune, PROMPT, seed=SEED, strength=strength, width=64, height=64, output_format="png",
                          caller=caller)
    assert pair.base.status == "ok", pair.base.error
    return pair


def adapters_loaded() -> set[str]:
    """Every adapter name any cached pipeline holds (its own record and peft's, together)."""
    names: set[str] = set()
    for entry in list(infer._PIPES.values()):
        names |= lf.adapters_of(entry.pipe) | set(entry.adapters)
    return names


# --------------------------------------------------------------------------- export, and the round trip


def test_export_for_comfyui_then_import_renders_the_fine_tunes_image(studio, trained):
    _, job_id, remote_id = trained
    exported = studio.export_lora(job_id, "comfyui")
    output = studio.providers["local"].folders.lora_path(remote_id).parent
    assert exported == output / "TOK-flux1-comfyui.safetensors"
    keys = list(load_file(str(exported)))
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    with safe_open(str(exported), "pt") as f:
        assert f.metadata()["trigger_word"] == "TOK" and f.metadata()["steps"] == "30"
    stamp = exported.stat().st_mtime_ns
    assert studio.export_lora("cup-v1", "comfyui") == exported and exported.stat().st_mtime_ns == stamp  # reused
    card = (output / "README.md").read_text()
    assert "`TOK-flux1-comfyui.safetensors`" in card and "file is made on demand" not in card
    assert "TOK-flux1-diffusers.safetensors" not in card  # only the files written are listed
    diffusers_file = studio.export_lora(job_id, "diffusers")
    assert "`TOK-flux1-diffusers.safetensors`" in (output / "README.md").read_text()
    assert all(k.startswith("transformer.") for k in load_file(str(diffusers_file)))

    lora = studio.import_lora(exported, name="cup from comfy")
    assert (lora.family, lora.layout, lora.base_model, lora.trigger_word) == (FLUX1, "kohya", TINY_FLUX1, "TOK")
    assert lora.source == exported.name
    picker = studio.ready_finetunes()
    assert [t.finetune_id for t in picker] == [remote_id, lora.id] and picker[1].imported
    assert "imported FLUX.1 LoRA" in picker[1].label

    for strength in (0.7, 1.0):
        ours, theirs = compare(studio, job_id, strength), compare(studio, lora, strength)
        np.testing.assert_array_equal(pixels(theirs.base.path), pixels(ours.base.path))
        np.testing.assert_allclose(pixels(theirs.tuned.path), pixels(ours.tuned.path), atol=1)
        assert np.abs(pixels(ours.tuned.path) - pixels(ours.base.path)).mean() > 1.0  # the LoRA does change it
    zero = compare(studio, lora.id, 0.0)
    np.testing.assert_array_equal(pixels(zero.tuned.path), pixels(zero.base.path))
    grid = studio.grid("cup from comfy", [PROMPT], [0.0, 0.7], seed=SEED, width=64, height=64, output_format="png")
    assert grid.failed == 0 and grid.result.columns == ["base", "strength 0", "strength 0.7"]


def test_a_flux2_lora_renders_on_the_tiny_flux2_model_and_exports_back_to_diffusers(studio, tmp_path):
    """The configured model is the tiny FLUX.1: a FLUX.2 [klein] LoRA renders on the tiny FLUX.2."""
    src = make_lora(FLUX2, tmp_path / "made")
    bfl = lf.export_lora(src, tmp_path, lf.COMFYUI, info(FLUX2))
    lora = studio.import_lora_file(bfl)
    assert (lora.family, lora.layout, lora.base_model, lora.name) == (FLUX2, "bfl", TINY_FLUX2, bfl.stem)
    zero, full = compare(studio, lora, 0.0), compare(studio, lora, 1.0)
    np.testing.assert_array_equal(pixels(zero.tuned.path), pixels(zero.base.path))
    assert np.abs(pixels(full.tuned.path) - pixels(full.base.path)).mean() > 1.0
    back = studio.export_lora(lora.id, "diffusers")  # an imported BFL file, to diffusers' names
    sd, ours = load_file(str(back)), load_file(str(src))
    assert set(sd) == set(ours)
    for key in ours:
        torch.testing.assert_close(sd[key], ours[key])


def test_a_hugging_face_jobs_lora_exports_once_its_repo_is_imported(studio, trained, tmp_path, monkeypatch):
    import huggingface_hub

    lora = make_lora(FLUX1, tmp_path / "made")
    api = fake_hub(lora, tmp_path / "cache")
    made = []
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: made.append(token) or api)
    job = studio.jobs.create(LOCAL_OWNER, "huggingface", "finetune", "cup-hf", "cups", "h", {"trigger_word": "TOK"})
    studio.jobs.update(LOCAL_OWNER, job.id, remote_id="alice/fs-abc", status="ready",
                       result={"finetune_id": HF_REPO})
    try:
        with pytest.raises(InputError, match="trained on Hugging Face; its LoRA is in .* not on this machine"):
            studio.export_lora("cup-hf", "comfyui")
        progress = []
        imported = studio.import_lora(HF_REPO, caller=Caller(LOCAL_OWNER, hf_token=Secret(HF_TOKEN)),
                                      on_progress=lambda done, total: progress.append((done, total)))
        assert made == [HF_TOKEN]  # the caller's own sign-in
        assert api.hf_hub_download.call_args.args[:2] == (HF_REPO, LORA_FILE)  # not the checkpoint's file
        assert progress and progress[-1][0] == progress[-1][1] == lora.stat().st_size
        assert (imported.source, imported.name, imported.family) == (HF_REPO, "flux-studio-cup-v1", FLUX1)
        exported = studio.export_lora("cup-hf", "comfyui")
        assert exported.parent == studio.providers["local"].imports.export_dir(imported.id)
        assert all(k.startswith("lora_unet_") for k in load_file(str(exported)))
    finally:
        studio.jobs.mark_deleted(LOCAL_OWNER, job.id)


def test_hub_import_uses_hf_token_locally_and_the_visitors_sign_in_only_when_hosted(tmp_path, monkeypatch):
    import huggingface_hub

    lora = make_lora(FLUX1, tmp_path / "made")
    made = []
    owners_token = "hf_OWNERtoken0123456789abcdefSECRET"
    apis = {hosted: fake_hub(lora, tmp_path / f"cache-{hosted}") for hosted in (False, True)}  # a cache each
    for hosted in (False, True):
        monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None, api=apis[hosted]: made.append(token) or api)
        settings = Settings(data_dir=tmp_path / f"data-{hosted}", workers=2, hosted=hosted,
                            hf_token=Secret(owners_token))
        with Studio(settings, providers={"local": LocalProvider(settings)}, background=False) as studio:
            if hosted:
                with pytest.raises(InputError, match="needs your own Hugging Face sign-in"):
                    studio.import_lora_repo(HF_REPO, caller=Caller("visitor-a"))
                assert made == [owners_token]  # from the first round only: nothing was asked of the Hub
                got = studio.import_lora_repo(HF_REPO, caller=Caller("visitor-a", hf_token=Secret(HF_TOKEN)))
                assert made[-1] == HF_TOKEN
                assert [x.id for x in studio.imported_loras(caller=Caller("visitor-a"))] == [got.id]
                assert studio.imported_loras(caller=Caller("visitor-b")) == []
                with pytest.raises(InputError, match="is not one of your fine-tunes"):
                    studio.compare(got.id, PROMPT, caller=Caller("visitor-b"))
            else:
                studio.import_lora_repo(HF_REPO)
                assert made == [owners_token]
    monkeypatch.undo()


# --------------------------------------------------------------------------- bad input


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what its refusal says)."""
    good = make_lora(FLUX1, tmp_path / "good")
    out: dict[str, tuple[Path, str]] = {}
    not_lora = tmp_path / "model.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(32, 32)}, str(not_lora))
    out["not a LoRA"] = (not_lora, "is not a LoRA")
    sdxl = tmp_path / "sdxl.safetensors"
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{stem}.lora_down.weight": torch.zeros(4, 640), f"{stem}.lora_up.weight": torch.zeros(640, 4),
               f"{stem}.alpha": torch.tensor(4.0)}, str(sdxl))
    out["SDXL"] = (sdxl, "Stable Diffusion")
    wider = tmp_path / "flux1-dev-size.safetensors"  # FLUX.1 [dev]'s width, 3072: not the tiny model's 32
    sd = {}
    for part in ("to_q", "to_k", "to_v"):
        sd[f"transformer.single_transformer_blocks.0.attn.{part}.lora_A.weight"] = torch.ones(1, 3072)
        sd[f"transformer.single_transformer_blocks.0.attn.{part}.lora_B.weight"] = torch.ones(3072, 1)
    save_file(sd, str(wider))
    out["shape mismatch"] = (wider, "3072 -> 3072; this model's layer is 32 -> 32")
    ranks = tmp_path / "ranks.safetensors"
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(4, 32),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(32, 8)}, str(ranks))
    out["rank mismatch"] = (ranks, "share a rank")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    out["truncated"] = (cut, "cut short")
    pickle = tmp_path / "lora.ckpt"
    pickle.write_bytes(b"\x80\x04anything")
    out["pickle"] = (pickle, "pickle")
    disguised = tmp_path / "disguised.safetensors"  # a torch.save zip under the safetensors name
    disguised.write_bytes(b"PK\x03\x04" + b"\x00" * 200)
    out["disguised pickle"] = (disguised, "pickle")
    return out


def test_each_bad_file_is_refused_with_why_and_nothing_is_kept_or_loaded(studio, trained, tmp_path, monkeypatch):
    _, job_id, _ = trained
    before = compare(studio, job_id, 0.7)
    loaded = adapters_loaded()

    def never(*args, **kwargs):
        raise AssertionError("a pickle was unpickled")

    monkeypatch.setattr(torch, "load", never)
    imports_root = studio.settings.data_dir / "loras"
    for what, (path, says) in _bad_files(tmp_path).items():
        with pytest.raises(InputError) as refused:
            studio.import_lora_file(path)
        assert says in refused.value.user_message(), (what, refused.value.user_message())
    assert studio.imported_loras() == []
    assert not imports_root.exists() or list(imports_root.iterdir()) == []  # no copy, no temp folder left
    monkeypatch.undo()
    assert adapters_loaded() == loaded  # the checks loaded nothing into any pipeline
    after = compare(studio, job_id, 0.7)
    np.testing.assert_array_equal(pixels(after.tuned.path), pixels(before.tuned.path))
    np.testing.assert_array_equal(pixels(after.base.path), pixels(before.base.path))


def test_the_size_cap_refuses_before_a_byte_is_copied(studio, tmp_path, monkeypatch):
    lora = make_lora(FLUX1, tmp_path / "made")
    monkeypatch.setattr(lf, "MAX_LORA_BYTES", lora.stat().st_size - 1)
    copied = []
    monkeypatch.setattr("services.providers.local.imports._copy_capped", lambda *a: copied.append(a))
    with pytest.raises(InputError, match="accepted up to"):
        studio.import_lora_file(lora)
    assert copied == []


def test_a_base_model_of_another_family_is_refused(studio, tmp_path):
    flux2 = make_lora(FLUX2, tmp_path / "made")
    with pytest.raises(InputError, match=r"The LoRA is for FLUX.2 \[klein\]; tiny random FLUX.1 .* is a FLUX.1 model"):
        studio.import_lora_file(flux2, base_model=TINY_FLUX1)
    with pytest.raises(InputError, match="is not a base model the local engine offers"):
        studio.import_lora_file(flux2, base_model="/etc")
    assert studio.import_lora_file(flux2, base_model=TINY_FLUX2).base_model == TINY_FLUX2


def test_a_render_that_fails_leaves_the_pipeline_as_it_was(studio, trained, tmp_path):
    """A kept file damaged after its import: the tuned image fails with why, and afterwards the fine-tune
    renders exactly as before and strength 0 is exactly the base image."""
    _, job_id, _ = trained
    before = compare(studio, job_id, 0.7)
    lora = studio.import_lora_file(make_lora(FLUX1, tmp_path / "made", seed=4))
    kept = studio.providers["local"].imports.lora_path(lora.id)
    kept.write_bytes(kept.read_bytes()[:-64])
    broken = studio.compare(lora.id, PROMPT, seed=SEED, strength=0.7, width=64, height=64, output_format="png")
    assert broken.tuned.status == "error" and "cut short" in broken.tuned.error
    assert infer.adapter_name(lora.id) not in adapters_loaded()
    after = compare(studio, job_id, 0.7)
    np.testing.assert_array_equal(pixels(after.tuned.path), pixels(before.tuned.path))
    zero = compare(studio, job_id, 0.0)
    np.testing.assert_array_equal(pixels(zero.tuned.path), pixels(zero.base.path))
    np.testing.assert_array_equal(pixels(zero.base.path), pixels(before.base.path))


def test_export_refuses_an_unknown_format_and_what_is_not_the_callers(studio, trained):
    _, job_id, _ = trained
    from typing import get_args

    from services.providers.base import ExportFormat

    assert set(get_args(ExportFormat)) == set(lf.EXPORT_FORMATS)  # the API's type and the engine agree
    with pytest.raises(InputError, match="no export format 'kohya'"):
        studio.export_lora(job_id, "kohya")
    with pytest.raises(InputError, match="No job|not one of your|was not found|is not"):
        studio.export_lora(job_id, "comfyui", caller=Caller("someone-else"))


# --------------------------------------------------------------------------- the HTTP / MCP API


def test_the_api_exports_a_fine_tune_and_imports_and_compares_a_lora(settings, tmp_path, monkeypatch):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from services.storage.jobs import JobStore
    from tests.browser import running_app

    local = LocalProvider(settings, steps_per_sample=30, checkpoint_every=30)
    request = TrainRequest(name="cup-v1", mode="product", trigger_word="TOK", iterations=30, learning_rate=1e-2,
                           lora_rank=16, options=LocalOptions())
    remote_id = local.submit(training_zip(tmp_path / "ds.zip"), request, tag="apijob")
    assert local.join(remote_id, 120) and local.status(remote_id).state == "ready"
    local.close()
    jobs = JobStore.from_settings(settings)
    job = jobs.create(LOCAL_OWNER, "local", "finetune", "cup-v1", "cups", "h", request.record())
    jobs.update(LOCAL_OWNER, job.id, remote_id=remote_id, status="ready", result={"finetune_id": remote_id})
    jobs.close()
    pickle = tmp_path / "lora.ckpt"
    pickle.write_bytes(b"\x80\x04anything")

    with running_app(settings) as url:
        client = Client(url, verbose=False)
        try:
            exported = Path(client.predict("cup-v1", "comfyui", api_name="/export_lora"))
            assert exported.name == "TOK-flux1-comfyui.safetensors"
            assert all(k.startswith("lora_unet_") for k in load_file(str(exported)))
            imported = client.predict(handle_file(str(exported)), "", "from comfy", "", api_name="/import_lora")
            assert (imported["name"], imported["family"], imported["layout"]) == ("from comfy", "FLUX.1", "kohya")
            assert client.predict(api_name="/list_loras") == [imported]
            base, tuned, details = client.predict(imported["id"], PROMPT, SEED, 0.7, 64, 64, api_name="/compare")
            assert details["tuned"]["status"] == "ok" and Path(base).is_file() and Path(tuned).is_file()
            for args, says in (((handle_file(str(pickle)), "", "", ""), "never loaded"),
                               ((None, "", "", ""), "No LoRA was given"),
                               ((handle_file(str(exported)), "alice/x", "", ""), "Both a file and a repo")):
                with pytest.raises(AppError, match=says):
                    client.predict(*args, api_name="/import_lora")
            with pytest.raises(AppError, match="kohya is not in the list of choices"):
                client.predict("cup-v1", "kohya", api_name="/export_lora")
        finally:
            client.close()
