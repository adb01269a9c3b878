"""The pages' handlers called directly, as Gradio would call them but without a browser or a server:
each builds its caller from the request (None: the local owner) and asks ``Studio`` for the step. The
launch and compare forms are handed over as Gradio hands them (one dict keyed by component), built
from the page's own defaults with ``Form.filled``. Against the fake CometAPI over loopback HTTP."""
from __future__ import annotations

import gradio as gr
import pytest

from components.compare_tab import ComparePage
from components.dataset_tab import DatasetPage
from components.train_tab import TrainPage, jobs_frame
from services.config import Secret
from services.studio import Studio
from tests import imagefactory as fx
from tests.conftest import FAKE_COMETAPI_KEY


class Progress:
    """Stands in for gr.Progress: records what the handler reports."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, progress, desc=None, **_):
        self.calls.append((progress, desc))


@pytest.fixture
def studio(settings, fake_cometapi):
    fake_cometapi.pending_polls = 0
    settings = settings.with_(cometapi_base_url=fake_cometapi.url, cometapi_key=Secret(FAKE_COMETAPI_KEY))
    with Studio(settings, background=False) as s:
        yield s


def build_pages(studio):
    """The Train and Compare pages over ``studio``, built as the app builds them (no server, no browser)."""
    with gr.Blocks():
        session_key = gr.State(None)
        train = TrainPage(studio, session_key)
        compare = ComparePage(studio, studio.placeholder_tile(), session_key)
    return train, compare


@pytest.fixture
def pages(studio):
    return build_pages(studio)


def _mugs(studio: Studio, tmp_path) -> str:
    handle = studio.dataset("mugs").add(*fx.good_set(tmp_path / "mugs", count=2, size=(320, 240)))
    return handle.set_trigger_word("MUGX").name


def _launch_form(train: TrainPage, **values) -> dict:
    defaults = dict(provider="cometapi", dataset="mugs", name="mug-v1", mode="product", trigger="MUGX", iterations=100)
    return train.form.filled(train.seen, train.session_key, **{**defaults, **values})


def test_launch_from_the_train_page(studio, pages, fake_cometapi, tmp_path):
    train, _ = pages
    _mugs(studio, tmp_path)
    progress = Progress()
    message, frame, detail, selected, timer, seen, banner = train.on_launch(_launch_form(train), None, progress)
    (job,) = studio.list_jobs()
    assert message.startswith("🚀 Launched **mug-v1** on cometapi") and selected == job.id
    assert frame["job"].tolist() == [job.id[:8]] and seen == {job.id: job.status} and "mug-v1" in detail
    assert banner == studio.banner("cometapi")
    assert progress.calls[0] == (0, "Exporting dataset")
    (sent,) = fake_cometapi.requests("/flux/v1/finetune")
    assert sent.json["trigger_word"] == "MUGX" and sent.json["iterations"] == 100


def test_a_launch_form_with_a_mistake_is_refused_before_anything_is_sent(studio, pages, fake_cometapi, tmp_path):
    """As the page always did: a learning rate that is not a number, and an empty trigger word (a script
    gets the dataset's; the form says what to fix)."""
    train, _ = pages
    _mugs(studio, tmp_path)
    with pytest.raises(gr.Error, match="is not a number"):
        train.on_launch(_launch_form(train, learning_rate="fast"), None, Progress())
    with pytest.raises(gr.Error, match="need fixing.*trigger word"):
        train.on_launch(_launch_form(train, trigger="  "), None, Progress())
    assert studio.list_jobs() == [] and fake_cometapi.requests("/flux/v1/finetune") == []


def test_cancel_and_select_from_the_train_page(studio, pages, fake_cometapi, tmp_path):
    train, _ = pages
    _mugs(studio, tmp_path)
    job = studio.launch("mugs", "mug-v1", provider="cometapi", iterations=100)
    with pytest.raises(gr.Error, match="No job is selected"):
        train.on_cancel(None, None)
    table = jobs_frame(studio.list_jobs())  # as the page shows it: 8 characters of each id
    picked, detail, *_ = train.on_select(table, gr.SelectData(None, {"index": [0, 1], "value": "mug-v1"}), None)
    assert picked == job.id and "mug-v1" in detail
    frame, detail = train.on_cancel(picked, None)
    assert studio.job(job.id).status == "cancelled" and frame["status"].tolist() == ["cancelled"]
    assert "**Status:** cancelled" in detail
    assert [r.json["finetune_id"] for r in fake_cometapi.requests("/flux/v1/delete_finetune")] == [job.job.remote_id]


def test_compare_from_the_compare_page(studio, pages, fake_cometapi):
    _, compare = pages
    finetune = fake_cometapi.add_finetune()
    data = compare.form.filled(compare.session_key, pasted=finetune, prompt=" a photo of TOK ", seed=7, strength=1.1)
    base, tuned, info, history = compare.on_compare(data, None)
    assert base["value"] and tuned["value"] and base["label"].startswith("Base model · CometAPI")
    assert "Same prompt, seed 7." in info and "at strength 1.1" in info and "wall time" in info
    assert "Shared key" not in info  # not hosted: nothing is counted
    assert len(history) == 2
    sent = fake_cometapi.requests("/flux/v1/flux-pro-1.1-ultra-finetuned")
    assert [r.json["finetune_strength"] for r in sent] == [1.1] and sent[0].json["prompt"] == "a photo of TOK"
    with pytest.raises(gr.Error, match="No fine-tune is selected"):
        compare.on_compare(compare.form.filled(compare.session_key, prompt="a photo of TOK"), None)


def test_a_grid_streams_its_cells_from_the_compare_page(studio, pages, fake_cometapi):
    _, compare = pages
    finetune = fake_cometapi.add_finetune()
    data = compare.grid_form.filled(compare.session_key, pasted=finetune, prompts="TOK one\n\nTOK two",
                                    strengths="0.5, 1.5", include_base=True, seed=3)
    progress = Progress()
    replies = list(compare.on_grid(data, None, progress))
    *streamed, (cells, summary, grid, history) = replies
    assert len(cells) == 6 and grid.failed == 0 and len(history) == 6
    assert [c.split(" · ")[1] for _, c in cells[:3]] == ["base", "strength 0.5", "strength 1.5"]
    assert summary.startswith("2 prompt(s) × 3 column(s), seed 3, wall time")
    assert all(text.endswith("cells done…") for _, text, *_ in streamed)
    assert progress.calls == [((n, 6), f"{n} of 6 cells") for n in sorted({n for (n, _), _ in progress.calls})]
    assert sorted(r.json["finetune_strength"] for r in fake_cometapi.requests("/flux/v1/flux-pro-1.1-ultra-finetuned")) \
        == [0.5, 0.5, 1.5, 1.5]
    sheet = compare.on_sheet(grid)
    assert sheet.endswith(".png")
    with pytest.raises(gr.Error, match="no grid yet"):
        compare.on_sheet(None)


def test_the_dataset_page_names_a_new_dataset_after_an_uploaded_zip(studio, tmp_path):
    """With no dataset picked, an upload makes one, named after the zip; a second of that name is another."""
    with gr.Blocks():
        page = DatasetPage(studio, gr.State(None))
    upload = fx.training_zip(tmp_path / "cups.zip", count=2)
    picker, cleared, report, gallery, table, warnings, trigger, *_ = page.on_add([str(upload)], None, Progress())
    assert picker["value"] == "cups" and picker["choices"] == ["cups"] and cleared is None
    assert "2" in report and len(gallery) == 2 and len(table) == 2
    again = page.on_add([str(upload)], None, Progress())[0]
    assert again["value"] == "cups-2" and sorted(studio.list_datasets()) == ["cups", "cups-2"]
    gallery, table, warnings, trigger = page.on_trigger_first("CUPX", "cups", None)
    assert trigger == "CUPX" and all(c.startswith("CUPX") for c in table["caption"])
