"""Base vs tuned and grids, against the fake CometAPI over loopback HTTP."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from components import compare_tab
from services import compare as cmp
from services.providers.cometapi.client import CometAPIClient
from services.providers.cometapi.provider import CometAPIProvider
from services.providers.local.provider import LocalProvider
from services.config import Secret
from services.errors import InputError
from services.providers.base import GenerateRequest
from services.storage.results import ResultStore
from tests.conftest import FAKE_COMETAPI_KEY

OWNER = "local"
ULTRA = "flux-pro-1.1-ultra-finetuned"


def _provider(fake) -> CometAPIProvider:
    return CometAPIProvider(
        lambda: CometAPIClient(fake.url, Secret(FAKE_COMETAPI_KEY), poll_initial=0.05, poll_max=0.1, sleep=time.sleep),
        has_key=True,
    )


@pytest.fixture
def results(settings) -> ResultStore:
    return ResultStore(settings)


def _req(**kw) -> GenerateRequest:
    return GenerateRequest(**{**dict(prompt="a photo of TOK mug on a table", seed=1234, strength=1.2), **kw})


def test_pair_uses_same_prompt_and_seed_and_the_matching_base(settings, fake_cometapi, results):
    fake_cometapi.pending_polls = 1
    finetune = fake_cometapi.add_finetune(trigger_word="TOK")
    pair = cmp.compare_pair(_provider(fake_cometapi), _req(), finetune_id=finetune, tuned_model=ULTRA,
                            out_dir=results.out_dir(OWNER), owner=OWNER, results=results)
    assert pair.base.status == pair.tuned.status == "ok"
    base_req = fake_cometapi.requests("/flux/v1/flux-pro-1.1-ultra")
    tuned_req = fake_cometapi.requests("/flux/v1/flux-pro-1.1-ultra-finetuned")
    assert len(base_req) == len(tuned_req) == 1
    assert base_req[0].json["prompt"] == tuned_req[0].json["prompt"] == _req().prompt
    assert base_req[0].json["seed"] == tuned_req[0].json["seed"] == 1234
    assert tuned_req[0].json["finetune_id"] == finetune and tuned_req[0].json["finetune_strength"] == 1.2
    assert pair.base.seed == pair.tuned.seed == 1234
    for cell in (pair.base, pair.tuned):
        with Image.open(cell.path) as im:
            assert im.width > 0
        assert cell.path.is_relative_to(results.out_dir(OWNER))


def test_flux_pro_finetuned_compares_against_flux_pro(settings, fake_cometapi, results):
    fake_cometapi.pending_polls = 0
    finetune = fake_cometapi.add_finetune()
    pair = cmp.compare_pair(_provider(fake_cometapi), _req(steps=30, guidance=3.0), finetune_id=finetune,
                            tuned_model="flux-pro-finetuned", out_dir=results.out_dir(OWNER), owner=OWNER,
                            results=results)
    assert pair.base.model == "flux-pro-1.1" and pair.tuned.model == "flux-pro-finetuned"
    [sent] = fake_cometapi.requests("/flux/v1/flux-pro-finetuned")
    assert sent.json["steps"] == 30 and sent.json["guidance"] == 3.0 and "aspect_ratio" not in sent.json


class _Meeting:
    """A provider whose generations wait for each other at a barrier before going on to the real one:
    two that run one after the other never meet, and the first fails when the barrier gives up."""

    def __init__(self, inner, parties: int) -> None:
        self._inner = inner
        self.barrier = threading.Barrier(parties, timeout=60)  # a failure's bound, never reached when they meet

    def generate(self, request, out_dir, *, finetune=None, model=None):
        self.barrier.wait()
        return self._inner.generate(request, out_dir, finetune=finetune, model=model)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_pair_runs_concurrently(settings, fake_cometapi, results):
    """Base and tuned are generated at once: both calls are inside the provider together."""
    fake_cometapi.pending_polls = 0
    finetune = fake_cometapi.add_finetune()
    meeting = _Meeting(_provider(fake_cometapi), parties=2)
    pair = cmp.compare_pair(meeting, _req(), finetune_id=finetune, tuned_model=ULTRA,
                            out_dir=results.out_dir(OWNER), owner=OWNER, results=results)
    assert (pair.base.status, pair.tuned.status) == ("ok", "ok"), (pair.base.error, pair.tuned.error)
    assert not meeting.barrier.broken
    assert len(fake_cometapi.requests("/flux/v1/flux-pro-1.1-ultra")) == 1
    assert len(fake_cometapi.requests("/flux/v1/flux-pro-1.1-ultra-finetuned")) == 1


def test_moderated_tuned_image_keeps_the_base_image(settings, fake_cometapi, results):
    fake_cometapi.pending_polls = 0
    finetune = fake_cometapi.add_finetune()
    pair = cmp.compare_pair(_provider(fake_cometapi), _req(seed=fake_cometapi.content_moderation_seed),
                            finetune_id=finetune, tuned_model=ULTRA, out_dir=results.out_dir(OWNER), owner=OWNER,
                            results=results)
    assert pair.base.status == "moderated" and pair.tuned.status == "moderated"
    assert "safety" in pair.tuned.error.lower() or "moderat" in pair.tuned.error.lower()
    recorded = results.list(OWNER)
    assert {r.status for r in recorded} == {"moderated"} and len(recorded) == 2


def test_a_failed_base_image_shows_its_reason_in_its_panel_at_the_tuned_images_size(settings, fake_cometapi,
                                                                                  results):
    """The base panel was left empty (a placeholder of another height), its reason only in the text
    below: it now holds the reason, drawn at the size of the tuned image, and both panels name the
    fine-tune's provider."""
    fake_cometapi.pending_polls = 0
    finetune = fake_cometapi.add_finetune()
    fake_cometapi.fail_next("/flux/v1/flux-pro-1.1-ultra", 422, json={"detail": [
        {"loc": ["body", "prompt"], "msg": "base prompt refused"}]})
    provider = _provider(fake_cometapi)
    pair = cmp.compare_pair(provider, _req(), finetune_id=finetune, tuned_model=ULTRA,
                            out_dir=results.out_dir(OWNER), owner=OWNER, results=results)
    assert pair.base.status == "error" and pair.tuned.status == "ok"
    base, tuned = compare_tab.pair_panels(pair, provider, _req())
    assert base["label"] == "Base model · CometAPI · error" and tuned["label"] == "Fine-tune · CometAPI"
    with Image.open(pair.tuned.path) as im:
        assert base["value"].size == im.size
    assert len(set(base["value"].getdata())) > 2  # drawn on, not a blank tile
    assert Path(tuned["value"]).read_bytes() == pair.tuned.path.read_bytes()
    both_failed = cmp.PairResult(pair.group_id, pair.base, pair.base, 0.0)
    assert compare_tab.pair_panels(both_failed, provider, _req(width=512, height=384))[1]["value"].size == (512, 384)


def test_the_tuned_model_choice_and_the_panels_follow_the_fine_tunes_provider(settings):
    """A local fine-tune was shown under 'Tuned model (CometAPI)': the choice shows only where the
    provider offers several models, and the panels name the provider."""
    choice, base, tuned = compare_tab.provider_views(LocalProvider(settings))
    assert (choice["visible"], base["label"], tuned["label"]) == (False, "Base model · Local engine",
                                                                  "Fine-tune · Local engine")
    choice, _, tuned = compare_tab.provider_views(CometAPIProvider(lambda: None, has_key=True))
    assert choice["visible"] and tuned["label"] == "Fine-tune · CometAPI"


def test_grid_fills_every_cell_and_isolates_failures(settings, fake_cometapi, results):
    fake_cometapi.pending_polls = 1
    finetune = fake_cometapi.add_finetune()
    prompts = ["TOK mug on a desk", "TOK mug, explode"]  # the fake fails prompts with 'explode'
    seen, lock = [], threading.Lock()

    def on_cell(cell, progress):
        with lock:
            seen.append((cell.row, cell.col, progress.done, progress.total))

    grid = cmp.run_grid(_provider(fake_cometapi), prompts, [0.6, 1.2], _req(), finetune_id=finetune,
                        tuned_model=ULTRA, include_base=True, max_concurrency=3, on_cell=on_cell,
                        out_dir=results.out_dir(OWNER), owner=OWNER, results=results)
    assert grid.columns == ["base", "strength 0.6", "strength 1.2"]
    assert [[c.status for c in row] for row in grid.cells] == [["ok"] * 3, ["error"] * 3]
    assert all("crashed" in c.error for c in grid.cells[1])
    assert sorted(d for _, _, d, _ in seen) == [1, 2, 3, 4, 5, 6] and {t for *_, t in seen} == {6}
    assert sorted((r, c) for r, c, *_ in seen) == [(r, c) for r in range(2) for c in range(3)]
    assert [c.strength for c in grid.cells[0]] == [None, 0.6, 1.2]
    assert {c.seed for c in grid.cells[0]} == {1234}
    strengths = [r.json.get("finetune_strength") for r in fake_cometapi.requests("/flux/v1/flux-pro-1.1-ultra-finetuned")]
    assert sorted(strengths) == [0.6, 0.6, 1.2, 1.2]
    assert grid.failed == 3 and len(results.list(OWNER)) == 6


def test_grid_concurrency_is_bounded(settings, fake_cometapi, results):
    fake_cometapi.pending_polls = 0
    fake_cometapi.set_latency("/flux/v1/flux-pro-1.1-ultra-finetuned", 0.3)
    finetune = fake_cometapi.add_finetune()
    active, peak, lock = 0, 0, threading.Lock()
    provider = _provider(fake_cometapi)
    real = provider.generate

    def counting(*a, **kw):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        try:
            return real(*a, **kw)
        finally:
            with lock:
                active -= 1

    provider.generate = counting  # type: ignore[method-assign]
    grid = cmp.run_grid(provider, ["a TOK", "b TOK"], [0.5, 1.0, 1.5], _req(), finetune_id=finetune,
                        tuned_model=ULTRA, include_base=False, max_concurrency=2,
                        out_dir=results.out_dir(OWNER), owner=OWNER, results=results)
    assert peak == 2 and grid.failed == 0


def test_bad_grid_input_is_refused_before_any_call(settings, fake_cometapi, results):
    finetune = fake_cometapi.add_finetune()
    provider = _provider(fake_cometapi)
    kw = dict(finetune_id=finetune, tuned_model=ULTRA, out_dir=results.out_dir(OWNER), owner=OWNER, results=results)
    with pytest.raises(InputError, match="no prompts"):
        cmp.run_grid(provider, ["  "], [1.0], _req(), **kw)
    with pytest.raises(InputError, match="out of range"):
        cmp.run_grid(provider, ["x"], [2.5], _req(), **kw)
    with pytest.raises(InputError, match="limit is"):
        cmp.run_grid(provider, [f"p{i}" for i in range(20)], [0.5, 1, 1.5], _req(), **kw)
    with pytest.raises(InputError, match="not a CometAPI fine-tune model"):
        cmp.compare_pair(provider, _req(), finetune_id=finetune, tuned_model="flux-dev",
                         out_dir=results.out_dir(OWNER), owner=OWNER)
    with pytest.raises(InputError, match="No fine-tune"):
        cmp.compare_pair(provider, _req(), finetune_id=" ", out_dir=results.out_dir(OWNER), owner=OWNER)
    assert fake_cometapi.requests("/flux/v1/flux-pro-1.1-ultra") == []


def test_contact_sheet_has_a_cell_per_result(settings, fake_cometapi, results, tmp_path):
    fake_cometapi.pending_polls = 0
    finetune = fake_cometapi.add_finetune()
    grid = cmp.run_grid(_provider(fake_cometapi), ["TOK one", "TOK explode"], [1.0], _req(), finetune_id=finetune,
                        tuned_model=ULTRA, out_dir=results.out_dir(OWNER), owner=OWNER, results=results)
    path = cmp.contact_sheet(grid, tmp_path / "sheet.png", cell=128, label_width=100)
    with Image.open(path) as sheet:
        assert sheet.format == "PNG"
        assert sheet.size == (100 + 2 * (128 + 8) + 8, 36 + 2 * (128 + 8) + 8)
        rgb = sheet.convert("RGB")
        # Row 2 failed: its cells are drawn as grey boxes with a red outline, not left blank.
        failed_cell = rgb.getpixel((100 + 8 + 128 - 4, 36 + 136 + 64))  # right margin, clear of text
        assert failed_cell == (238, 238, 238)
        ok_cell = rgb.getpixel((100 + 8 + 64, 36 + 64))
        assert ok_cell != (255, 255, 255)


def test_history_survives_a_restart_and_is_owner_scoped(settings, fake_cometapi, results):
    fake_cometapi.pending_polls = 0
    finetune = fake_cometapi.add_finetune()
    cmp.compare_pair(_provider(fake_cometapi), _req(), finetune_id=finetune, tuned_model=ULTRA,
                     out_dir=results.out_dir(OWNER), owner=OWNER, results=results)
    again = ResultStore(settings)  # a new process over the same data dir
    records = again.list(OWNER)
    assert len(records) == 2 and {r.finetune_id for r in records} == {None, finetune}
    tuned = next(r for r in records if r.finetune_id)
    assert tuned.strength == 1.2 and tuned.seed == 1234 and tuned.params["strength"] == 1.2
    assert all(again.path_for(OWNER, r).exists() for r in records)
    assert again.list("user-someoneelse") == []
    # A torn last line (crash mid-write) loses only that line.
    with open(again.out_dir(OWNER) / "index.jsonl", "a") as fh:
        fh.write('{"id": "trunc')
    assert len(again.list(OWNER)) == 2


def test_random_seed_is_in_range():
    seeds = {cmp.random_seed() for _ in range(50)}
    assert len(seeds) > 40 and all(0 <= s < 2**31 for s in seeds)


def test_a_cancelled_grid_starts_no_more_cells(tmp_path):
    """A grid whose page went away stops paying: cells not started yet are never sent."""
    import threading

    from services.compare import run_grid
    from services.providers.base import GeneratedImage, GenerateRequest, ProviderBase

    started, cancel = [], threading.Event()

    class Slow(ProviderBase):
        key, label = "cometapi", "CometAPI"

        def generate(self, request, out_dir, *, finetune=None, model=None):
            started.append(request.prompt)
            if len(started) == 1:
                cancel.set()  # the page goes away while the first cell renders
            path = Path(out_dir) / f"{len(started)}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"png")
            return GeneratedImage(path=path, model=model or "m", seed=request.seed, latency_s=0.0)

    grid = run_grid(Slow(), [f"p{i}" for i in range(6)], [1.0], GenerateRequest(prompt="x"), finetune_id="ft",
                    max_concurrency=1, out_dir=tmp_path, owner="local", cancel=cancel)
    assert len(started) == 1  # 12 cells planned, one paid for
    assert [c.status for row in grid.cells for c in row] == ["ok"]  # the one started finished


def test_history_from_an_earlier_versions_index_file_is_imported_once(settings):
    import json

    store = ResultStore(settings)
    legacy = store.out_dir(OWNER) / "index.jsonl"
    lines = [json.dumps({"id": f"r{i}", "group_id": "g", "created_at": 1000.0 + i, "provider": "cometapi",
                         "model": "m", "seed": i, "prompt": f"p{i}"}) for i in range(3)]
    legacy.write_text("\n".join(lines) + '\n{"id": "tor', encoding="utf-8")
    assert [r.id for r in store.list(OWNER)] == ["r2", "r1", "r0"]  # newest first; the torn line skipped
    assert not legacy.exists() and legacy.with_name("index.jsonl.imported").exists()
    assert [r.id for r in ResultStore(settings).list(OWNER)] == ["r2", "r1", "r0"]  # once, not twice
    assert ResultStore(settings).list("user-someoneelse") == []
