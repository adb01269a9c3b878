"""Pure helpers of the Train tab: the loss plot's data, the samples gallery, polling, the engine line."""
from __future__ import annotations

from components.train_tab import (LINGER_SECONDS, RAW, SMOOTHED, job_controls, job_markdown, keep_polling,
                                  loss_frame, queue_markdown, sample_items)
from services.providers.cometapi.provider import CometAPIProvider
from services.providers.huggingface.provider import HuggingFaceProvider
from services.providers.local.provider import LocalProvider
from services.storage.jobs import Job, JobStore
from services.providers.base import Holder, ProviderBase
from services.caller import Caller
from services.studio import Studio


def _event(step, loss=None, samples=()):
    return {"ts": 0, "kind": "step", "data": {"step": step, "loss": loss, "samples": list(samples)}}


def test_loss_frame_is_numeric_sorted_and_one_point_per_step():
    frame = loss_frame([_event(20, "0.5"), _event(10, 0.9), _event(20, 0.4), _event(30), _event(None, 0.1)])
    raw = frame[frame["series"] == RAW]
    assert raw["step"].tolist() == [10, 20] and raw["loss"].tolist() == [0.9, 0.4]
    assert frame["loss"].dtype.kind == "f"
    empty = loss_frame([])
    assert empty.empty and empty["loss"].dtype.kind == "f" and empty["step"].dtype.kind == "i"


def test_loss_frame_adds_a_debiased_smoothed_line():
    frame = loss_frame([_event(s, 1.0 if s % 2 else 3.0) for s in range(1, 201)])
    smooth = frame[frame["series"] == SMOOTHED]["loss"].tolist()
    assert smooth[0] == 1.0  # debiased: the first point is the first value, not 0.1 of it
    assert 1.9 < smooth[-1] < 2.1  # the zig-zag between 1 and 3 smooths to its mean
    assert max(abs(a - b) for a, b in zip(smooth[150:], smooth[151:])) < 0.25  # and is calm


def test_sample_items_once_each_with_the_step_first_seen():
    events = [_event(10, samples=["a.png"]), _event(12, samples=["a.png"]), _event(20, samples=["a.png", "b.png"])]
    assert sample_items(events) == [("a.png", "step 10"), ("b.png", "step 20")]
    many = [_event(i, samples=[f"{j}.png" for j in range(i + 1)]) for i in range(30)]
    assert [p for p, _ in sample_items(many, limit=3)] == ["27.png", "28.png", "29.png"]


def test_the_suggested_name_follows_dataset_and_mode_but_never_replaces_a_typed_one():
    from components.train_tab import suggest_name

    assert suggest_name("mug", "product", "") == "mug-product"
    assert suggest_name("mug", "style", "mug-product") == "mug-style"  # still our suggestion: follows
    assert suggest_name("cup", "style", "mug-style") == "cup-style"
    assert suggest_name("mug", "style", "mug-v1") == {"__type__": "update"}  # the user's own: kept
    assert suggest_name(None, "style", "") == {"__type__": "update"}


def _job(status: str, updated_at: float) -> Job:
    return Job(id="j", owner="o", provider="local", kind="finetune", name="n", dataset_name="d", dataset_hash="h",
               status=status, updated_at=updated_at)


def test_polling_goes_on_while_a_job_moves_and_a_moment_after_the_last_change():
    now = 10_000.0
    assert keep_polling([_job("running", now - 3600)], now)
    # A tick that read the jobs just before a Resume sees a job cancelled a moment ago: it must not
    # switch the timer off, or its late reply would stop the page for good while the job trains.
    assert keep_polling([_job("cancelled", now - 2)], now)
    assert not keep_polling([_job("cancelled", now - LINGER_SECONDS - 1), _job("ready", now - 600)], now)
    assert not keep_polling([], now)


class _Engine(ProviderBase):
    key, label, queues_training = "local", "Local engine", True

    def __init__(self, holder):
        self.holder = holder

    def training_now(self):
        return self.holder


def test_the_engine_line_names_the_job_that_holds_the_engine_only_to_its_owner(settings):
    engine = _Engine(Holder("local-abc", step=120, total=600, cancelling=False, waiting=1))
    studio = Studio(settings, providers={"local": engine}, background=False)
    jobs = studio.jobs
    mine = jobs.create("ann", "local", "finetune", "cup-v1", "cup", "h", {})
    jobs.update("ann", mine.id, status="running", remote_id="local-abc")

    def line(owner: str, owned: list[Job]) -> str:
        return queue_markdown(studio.training_slots(Caller(owner)), owned)

    ann = line("ann", jobs.list("ann"))
    assert ann == ("1 job(s), 1 queued or running. Local engine: busy with 'cup-v1' (step 120 of 600); "
                   "1 job(s) wait for it, cancel it to start the next.")
    bob = line("bob", [])
    assert bob == "No jobs yet. Local engine: busy with a job that is not in your list (step 120 of 600); " \
                  "1 job(s) wait for it."
    assert "cup" not in bob
    engine.holder = Holder("local-abc", step=121, total=600, cancelling=True, waiting=0)
    assert line("ann", []).endswith("busy with 'cup-v1' (stopping).")
    engine.holder = None
    assert line("ann", []) == "No jobs yet. Local engine: idle."
    studio.close()


def test_only_a_moving_job_shows_an_eta(tmp_path):
    jobs = JobStore(tmp_path / "jobs.sqlite3")
    job = jobs.create("ann", "local", "finetune", "cup-v1", "cup", "h", {})
    running = jobs.update("ann", job.id, status="running", progress=0.99, eta_s=1.0)
    assert "**ETA:** 0:01" in job_markdown(running)
    ready = jobs.update("ann", job.id, status="ready", progress=1.0)  # the last estimate stays on the record
    assert ready.eta_s == 1.0 and "ETA" not in job_markdown(ready)
    jobs.close()


def test_the_selected_jobs_controls_are_what_its_provider_offers(settings):
    """Plot and samples, Resume, Publish, the LoRA downloads: shown for a job whose provider offers them
    (the downloads once it is ready), hidden for one whose provider doesn't (a CometAPI job had an empty
    plot, an empty gallery, and Resume and Publish buttons that could only fail); all shown while no job
    is selected, the downloads where a provider of the app exports."""
    def shown(updates):
        return tuple(u["visible"] for u in updates)

    comet = CometAPIProvider(lambda: None, has_key=True)
    assert shown(job_controls(comet)) == shown(job_controls(comet, ready=True)) == (False, False, False, False)
    assert shown(job_controls(HuggingFaceProvider(settings), ready=True)) == (True, True, False, False)
    assert shown(job_controls(LocalProvider(settings), ready=True)) == (True, True, True, True)
    assert shown(job_controls(LocalProvider(settings))) == (True, True, True, False)  # not ready: nothing to export
    assert shown(job_controls(None, ready=True)) == (False, False, False, False)  # a provider this app no longer has
    assert shown(job_controls(None, selected=False)) == (True, True, True, True)
    assert shown(job_controls(None, selected=False, exports=False)) == (True, True, True, False)
