"""The LoRA downloads of the Train page and the "Use any LoRA" box of the Compare page, their handlers called
directly (as in tests/test_pages.py: no browser, no server), over a studio on the tiny FLUX.1 model with one
ready local fine-tune."""
from __future__ import annotations

import gradio as gr
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402

from components.compare_tab import HUB_INFO_HOSTED, ComparePage  # noqa: E402
from components.train_tab import TrainPage, jobs_frame  # noqa: E402
from services.config import Settings  # noqa: E402
from services.engine import lora_formats as lf  # noqa: E402
from services.engine.models import FLUX1, TINY_FLUX1  # noqa: E402
from services.providers.local.provider import LocalProvider  # noqa: E402
from services.storage.owners import LOCAL_OWNER  # noqa: E402
from services.studio import Studio  # noqa: E402
from tests.tiny_finetune import studio, trained  # noqa: E402,F401 (fixtures)
from tests.test_lora_formats import fake_hub, info, make_lora  # noqa: E402
from tests.test_pages import Progress, build_pages  # noqa: E402

HF_REPO = "alice/flux-studio-cup-v1"


@pytest.fixture
def pages(studio):
    return build_pages(studio)


def _select(train: TrainPage, studio: Studio, name: str):
    """Click the job ``name`` in the table: (selected id, export box update, export file)."""
    table = jobs_frame(studio.list_jobs())
    row = table["name"].tolist().index(name)
    picked, detail, *views = train.on_select(table, gr.SelectData(None, {"index": [row, 1], "value": name}), None)
    assert name in detail
    *_, export_box, export_file = views
    return picked, export_box, export_file


def test_the_train_page_downloads_the_selected_fine_tune_for_each_tool(studio, pages, trained):
    train, _ = pages
    _, job_id, _ = trained
    picked, box, file = _select(train, studio, "cup-v1")
    assert picked == job_id and box["visible"] is True and file is None
    comfy = train.on_export_comfyui(picked, None)
    assert comfy.endswith("TOK-flux1-comfyui.safetensors")
    keys = list(load_file(comfy))
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    diffusers = train.on_export_diffusers(picked, None)
    assert diffusers.endswith("TOK-flux1-diffusers.safetensors")
    assert all(k.startswith("transformer.") for k in load_file(diffusers))
    assert str(studio.settings.data_dir) not in comfy + diffusers  # served from Gradio's cache, never the data dir
    with pytest.raises(gr.Error, match="No job is selected"):
        train.on_export_comfyui(None, None)


def test_the_train_page_offers_no_download_where_the_provider_does_not_export(studio, pages):
    """A Hugging Face job's LoRA is on the Hub, not here: no buttons; one that is not ready: none either,
    and a click that arrives anyway (a page drawn before) says why."""
    train, _ = pages
    hf = studio.jobs.create(LOCAL_OWNER, "huggingface", "finetune", "cup-hf", "cups", "h", {"trigger_word": "TOK"})
    studio.jobs.update(LOCAL_OWNER, hf.id, remote_id="alice/fs-abc", status="ready", result={"finetune_id": HF_REPO})
    running = studio.jobs.create(LOCAL_OWNER, "local", "finetune", "cup-running", "cups", "h", {"trigger_word": "TOK"})
    studio.jobs.update(LOCAL_OWNER, running.id, remote_id="l-running", status="running")
    try:
        picked, box, _ = _select(train, studio, "cup-hf")
        assert box["visible"] is False
        with pytest.raises(gr.Error, match="not on this machine.*Import it first"):
            train.on_export_comfyui(picked, None)
        picked, box, _ = _select(train, studio, "cup-running")
        assert box["visible"] is False
        with pytest.raises(gr.Error, match="is running, not ready"):
            train.on_export_diffusers(picked, None)
    finally:
        for job in (hf, running):
            studio.jobs.mark_deleted(LOCAL_OWNER, job.id)


def test_the_compare_page_imports_a_file_picks_it_renders_it_and_deletes_it(studio, pages, trained, tmp_path):
    _, compare = pages
    _, job_id, _ = trained
    kohya = lf.export_lora(make_lora(FLUX1, tmp_path / "made"), tmp_path, lf.COMFYUI, info(FLUX1))
    picker, summary, cleared = compare.on_import(str(kohya), "  ", " from comfy ", None, Progress())
    (lora,) = studio.imported_loras()
    assert (lora.name, lora.layout, lora.base_model) == ("from comfy", "kohya", TINY_FLUX1)
    assert picker["value"] == lora.id and cleared is None
    assert [v for _, v in picker["choices"]] == [job_id, lora.id]  # the fine-tunes made here first
    assert "from comfy · imported FLUX.1 LoRA" in picker["choices"][1][0]
    assert picker["info"] == "1 ready fine-tune(s) of yours, newest first, then 1 LoRA(s) you imported."
    assert "a FLUX.1 LoRA, kohya keys, rank" in summary and f"`{TINY_FLUX1}`" in summary
    assert "trigger word is `TOK`" in summary
    reloaded, _ = compare.on_load(None)  # the tab opened again: the import is still there, by its id
    assert [v for _, v in reloaded["choices"]] == [job_id, lora.id]
    hint, *_ = compare.on_pick(lora.id, None)
    assert hint["info"] == "Use the trigger word “TOK” so the fine-tune knows what to draw."

    data = compare.form.filled(compare.session_key, finetune=picker["value"], prompt="TOK, a red ball", seed=5,
                               strength=0.7, width=64, height=64, steps=2, fmt="png")
    base, tuned, pair_info, _ = compare.on_compare(data, None)
    assert base["value"] and tuned["value"] and "at strength 0.7" in pair_info

    with pytest.raises(gr.Error, match="not a LoRA you imported"):
        compare.on_delete_import(job_id, None)
    picker, said = compare.on_delete_import(lora.id, None)
    assert studio.imported_loras() == [] and [v for _, v in picker["choices"]] == [job_id]
    assert picker["value"] == job_id and "from comfy" in said


def test_the_compare_page_says_what_is_wrong_with_an_import_and_keeps_nothing(studio, pages, tmp_path):
    _, compare = pages
    lora = make_lora(FLUX1, tmp_path / "made")
    pickle = tmp_path / "lora.ckpt"
    pickle.write_bytes(b"\x80\x04anything")
    for args, says in (((str(lora), HF_REPO), "Both a file and a repo"), ((None, " "), "No LoRA was given"),
                       ((str(pickle), ""), "pickle")):
        with pytest.raises(gr.Error, match=says):
            compare.on_import(*args, "", None, Progress())
    assert studio.imported_loras() == []


def test_the_compare_page_imports_a_hub_repo_with_download_progress(studio, pages, tmp_path, monkeypatch):
    import huggingface_hub

    _, compare = pages
    lora = make_lora(FLUX1, tmp_path / "made")
    api = fake_hub(lora, tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: api)
    progress = Progress()
    picker, summary, _ = compare.on_import(None, f" {HF_REPO} ", "", None, progress)
    (imported,) = studio.imported_loras()
    assert (imported.source, imported.name, picker["value"]) == (HF_REPO, "flux-studio-cup-v1", imported.id)
    assert f"from `{HF_REPO}`" in summary
    size = lora.stat().st_size
    downloads = [(p, d) for p, d in progress.calls if d.startswith("Downloading the LoRA")]
    assert downloads and downloads[-1][0] == (size, size)


def test_hosted_the_hub_route_asks_for_the_visitors_own_sign_in(tmp_path, monkeypatch):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: asked.append(token))
    settings = Settings(data_dir=tmp_path / "data", workers=2, hosted=True)
    with Studio(settings, providers={"local": LocalProvider(settings)}, background=False) as studio:
        with gr.Blocks():
            compare = ComparePage(studio, studio.placeholder_tile(), gr.State(None))
        assert compare.import_repo.info == HUB_INFO_HOSTED and "Sign in with Hugging Face" in HUB_INFO_HOSTED
        with pytest.raises(gr.Error, match="needs your own Hugging Face sign-in.*Sign in with Hugging Face"):
            compare.on_import(None, HF_REPO, "", None, Progress())
    assert asked == []  # nothing was asked of the Hub
