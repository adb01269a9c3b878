"""Launching and tracking fine-tunes through CometAPI, against the fake over loopback HTTP."""
from __future__ import annotations

import pytest

from services.providers.cometapi.provider import CometAPIProvider
from services.config import Secret
from services.storage.datasets import DatasetStores
from services.errors import EndpointUnavailableError, InputError, JobError
from services.storage.jobs import JobStore
from services.providers.base import ProviderBase, TrainRequest, job_tag
from services.training import RECONCILE_GIVE_UP_S, TrainingService
from tests import imagefactory as fx
from tests.conftest import FAKE_COMETAPI_KEY

OWNER = "local"


def _provider(fake, key: str = FAKE_COMETAPI_KEY) -> CometAPIProvider:
    return CometAPIProvider(lambda: _client(fake, key), has_key=bool(key))


def _client(fake, key):
    from services.providers.cometapi.client import CometAPIClient

    return CometAPIClient(fake.url, Secret(key), sleep=lambda s: None, rand=lambda: 0.5)


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _service(settings, fake, clock=None, key: str = FAKE_COMETAPI_KEY) -> TrainingService:
    clock = clock or Clock()
    return TrainingService(
        JobStore(settings.data_dir / "jobs.sqlite3", clock=clock),
        {"cometapi": _provider(fake, key)},
        DatasetStores(settings),
        clock=clock,
        max_images={"cometapi": 20},
    )


@pytest.fixture
def dataset(settings, tmp_path) -> str:
    stores = DatasetStores(settings)
    store = stores(OWNER)
    name = store.create("mug").name
    store.add_files(name, fx.good_set(tmp_path / "g", count=6, size=(800, 800)))
    store.set_trigger_word(name, "MUG")
    return name


def _req(**kw) -> TrainRequest:
    base = dict(name="mug-v1", mode="product", trigger_word="MUG", iterations=300, finetune_type="lora", lora_rank=16)
    return TrainRequest(**{**base, **kw})


def test_launch_then_track_until_ready(settings, fake_cometapi, dataset):
    fake_cometapi.finetune_pending_polls = 2
    service = _service(settings, fake_cometapi)
    uploads = []
    job = service.launch(OWNER, "cometapi", dataset, _req(), on_upload=lambda s, t: uploads.append((s, t)))
    assert job.status == "pending" and job.remote_id
    assert uploads and uploads[-1][0] == uploads[-1][1]  # the progress bar reaches 100%
    sent = fake_cometapi.requests("/flux/v1/finetune")
    assert len(sent) == 1
    body = sent[0].json
    assert body["mode"] == "product" and body["trigger_word"] == "MUG" and body["lora_rank"] == 16
    assert f"[{job_tag(job.id)}]" in body["finetune_comment"]
    statuses = []
    for _ in range(6):
        service.track_once()
        statuses.append(service.jobs.get(OWNER, job.id).status)
        if statuses[-1] == "ready":
            break
    assert statuses[-1] == "ready"
    done = service.jobs.get(OWNER, job.id)
    assert done.result["finetune_id"] == job.remote_id
    assert done.progress == 1.0 and done.finished_at is not None


def test_restart_mid_job_resumes_without_resubmitting(settings, fake_cometapi, dataset):
    fake_cometapi.finetune_pending_polls = 3
    first = _service(settings, fake_cometapi)
    job = first.launch(OWNER, "cometapi", dataset, _req())
    first.track_once()
    first.jobs.close()  # the app stops
    second = _service(settings, fake_cometapi)  # the app starts again over the same data dir
    assert [j.id for j in second.resume_on_start()] == [job.id]
    for _ in range(6):
        second.track_once()
    assert second.jobs.get(OWNER, job.id).status == "ready"
    assert len(fake_cometapi.requests("/flux/v1/finetune")) == 1


def test_lost_answer_on_submit_is_found_by_tag_not_resent(settings, fake_cometapi, dataset):
    # The server gets the upload, but the connection drops before the answer arrives.
    fake_cometapi.reset_next("/flux/v1/finetune")
    service = _service(settings, fake_cometapi)
    job = service.launch(OWNER, "cometapi", dataset, _req())
    assert job.status == "submitting" and job.remote_id is None
    assert "Not sure CometAPI received it" in job.message
    service.track_once()
    found = service.jobs.get(OWNER, job.id)
    assert found.status == "pending" and found.remote_id
    assert len(fake_cometapi.requests("/flux/v1/finetune")) == 1


def test_submission_that_never_arrived_fails_after_grace_period(settings, fake_cometapi, dataset):
    fake_cometapi.fail_next("/flux/v1/finetune", status=503)
    clock = Clock()
    service = _service(settings, fake_cometapi, clock)
    job = service.launch(OWNER, "cometapi", dataset, _req())
    assert job.status == "submitting"
    service.track_once()
    assert service.jobs.get(OWNER, job.id).status == "submitting"
    clock.t += RECONCILE_GIVE_UP_S + 1
    service.track_once()
    failed = service.jobs.get(OWNER, job.id)
    assert failed.status == "failed" and "safe to launch again" in failed.error


@pytest.mark.parametrize("mode", ["404", "301", "html"])
def test_finetune_unavailable_is_said_plainly(settings, fake_cometapi, dataset, mode):
    fake_cometapi.finetune_unavailable = mode
    service = _service(settings, fake_cometapi)
    with pytest.raises(EndpointUnavailableError, match="temporarily unavailable"):
        service.launch(OWNER, "cometapi", dataset, _req())
    assert "Local engine" in service.notices["cometapi"]
    [job] = service.jobs.list(OWNER)
    assert job.status == "failed" and "unavailable" in job.error


def test_client_side_validation_sends_nothing(settings, fake_cometapi, dataset):
    service = _service(settings, fake_cometapi)
    for bad in (dict(iterations=50), dict(lora_rank=8), dict(trigger_word="two words"), dict(name=" "),
                dict(learning_rate=1.0), dict(mode="anime"), dict(priority="fast"), dict(finetune_type="half")):
        with pytest.raises(InputError, match="need fixing"):
            service.launch(OWNER, "cometapi", dataset, _req(**bad))
    assert fake_cometapi.requests("/flux/v1/finetune") == []
    assert service.jobs.list(OWNER) == []


def test_no_key_is_refused_before_anything(settings, fake_cometapi, dataset):
    service = _service(settings, fake_cometapi, key="")
    with pytest.raises(InputError, match="No CometAPI key"):
        service.launch(OWNER, "cometapi", dataset, _req())
    assert fake_cometapi.requests() == []


def test_too_many_images_for_the_service(settings, fake_cometapi, tmp_path):
    store = DatasetStores(settings)(OWNER)
    name = store.create("big").name
    store.add_files(name, fx.good_set(tmp_path / "g", count=21, size=(300, 300)))
    with pytest.raises(InputError, match="at most 20"):
        _service(settings, fake_cometapi).launch(OWNER, "cometapi", name, _req())


def test_polling_faults_keep_tracking(settings, fake_cometapi, dataset):
    fake_cometapi.finetune_pending_polls = 1
    service = _service(settings, fake_cometapi)
    job = service.launch(OWNER, "cometapi", dataset, _req())
    # More failures than the client's own retries: the job keeps its state and a message.
    fake_cometapi.fail_next("/flux/v1/get_result", status=503, times=10)
    service.track_once()
    held = service.jobs.get(OWNER, job.id)
    assert held.status == "pending" and "will retry" in held.message
    fake_cometapi.clear_faults()
    for _ in range(4):
        service.track_once()
    assert service.jobs.get(OWNER, job.id).status == "ready"


def test_remote_error_and_unknown_job_fail_with_reason(settings, fake_cometapi, dataset):
    service = _service(settings, fake_cometapi)
    a = service.launch(OWNER, "cometapi", dataset, _req(name="a"))
    b = service.launch(OWNER, "cometapi", dataset, _req(name="b"))
    fake_cometapi.set_status(a.remote_id, "Error", "GPU fell over")
    fake_cometapi.set_status(b.remote_id, "Task not found")
    changes = service.track_once()
    assert {t.job.id for t in changes} == {a.id, b.id}
    assert "GPU fell over" in service.jobs.get(OWNER, a.id).error
    assert "no longer knows" in service.jobs.get(OWNER, b.id).error


def test_delete_removes_remote_and_hides_locally(settings, fake_cometapi, dataset):
    fake_cometapi.finetune_pending_polls = 0
    service = _service(settings, fake_cometapi)
    job = service.launch(OWNER, "cometapi", dataset, _req())
    service.track_once()
    service.delete(OWNER, job.id)
    assert fake_cometapi.finetune(job.remote_id) is None
    assert service.jobs.list(OWNER) == []


def test_other_owner_sees_nothing(settings, fake_cometapi, dataset):
    service = _service(settings, fake_cometapi)
    job = service.launch(OWNER, "cometapi", dataset, _req())
    assert service.jobs.list("session-someoneelse") == []
    with pytest.raises(Exception):
        service.delete("session-someoneelse", job.id)
    assert service.jobs.get(OWNER, job.id).status == "pending"


def test_key_is_nowhere_on_disk_or_in_records(settings, fake_cometapi, dataset, caplog):
    caplog.set_level("DEBUG")
    fake_cometapi.finetune_pending_polls = 1
    service = _service(settings, fake_cometapi)
    job = service.launch(OWNER, "cometapi", dataset, _req())
    fake_cometapi.fail_next("/flux/v1/get_result", status=503, times=2)
    for _ in range(4):
        service.track_once()
    service.jobs.close()
    key = FAKE_COMETAPI_KEY.encode()
    for path in settings.data_dir.rglob("*"):
        if path.is_file():
            assert key not in path.read_bytes(), path
    assert FAKE_COMETAPI_KEY not in caplog.text
    assert FAKE_COMETAPI_KEY not in repr(service.providers["cometapi"]._client())
    assert job.remote_id and FAKE_COMETAPI_KEY not in repr(job)


def test_visitor_key_tracks_in_memory_only_and_can_be_adopted_again(settings, fake_cometapi, dataset):
    fake_cometapi.finetune_pending_polls = 2
    shared_without_key = _service(settings, fake_cometapi, key="")  # hosted app with no owner key
    visitor = _provider(fake_cometapi)
    job = shared_without_key.launch(OWNER, "cometapi", dataset, _req(), provider=visitor)
    assert job.status == "pending"
    shared_without_key.track_once()
    assert shared_without_key.jobs.get(OWNER, job.id).progress is not None
    shared_without_key.jobs.close()

    # After a restart the visitor's key is gone (never written anywhere): tracking waits for it.
    restarted = _service(settings, fake_cometapi, key="")
    restarted.track_once()
    paused = restarted.jobs.get(OWNER, job.id)
    assert paused.status == "pending" and paused.message.startswith("Waiting for your CometAPI key")
    restarted.adopt(OWNER, _provider(fake_cometapi))
    for _ in range(4):
        restarted.track_once()
    assert restarted.jobs.get(OWNER, job.id).status == "ready"
    assert restarted._job_providers == {}


def test_cancel_stops_the_remote_job_and_keeps_the_record(settings, fake_cometapi, dataset):
    fake_cometapi.finetune_pending_polls = 5
    service = _service(settings, fake_cometapi)
    job = service.launch(OWNER, "cometapi", dataset, _req())
    cancelled = service.cancel(OWNER, job.id)
    assert cancelled.status == "cancelled"
    assert fake_cometapi.finetune(job.remote_id) is None  # CometAPI's only stop is a delete
    assert [j.id for j in service.jobs.list(OWNER)] == [job.id]
    with pytest.raises(InputError, match="not running"):
        service.cancel(OWNER, job.id)
    with pytest.raises(InputError, match="can't be resumed"):
        service.resume(OWNER, job.id)  # CometAPI keeps no checkpoints


class _Resumable(ProviderBase):
    """A provider with checkpoints: the first status after a 'restart' says it was interrupted."""

    key, label, max_images, can_resume = "ckpt", "Checkpointing engine", 20, True

    def __init__(self) -> None:
        self.state, self.resumed = "running", 0

    def readiness(self):
        return True, ""

    def submit(self, zip_path, request, *, tag, on_upload=None, owner=None):
        return f"ckpt-{tag}"

    def status(self, remote_id):
        from services.providers.base import TrainStatus

        if self.state == "interrupted":
            return TrainStatus("failed", message="Interrupted at step 3.", result={"resumable": True})
        return TrainStatus(self.state, progress=0.5 if self.state == "running" else 1.0, step=3, loss=0.25)

    def resume(self, remote_id):
        self.resumed += 1
        self.state = "running"

    def cancel(self, remote_id):
        self.state = "cancelled"

    def find_by_tag(self, tag):
        return None

    def list_remote(self):
        return []

    def delete(self, remote_id):
        pass


def test_interrupted_job_can_be_resumed(settings, dataset):
    engine = _Resumable()
    service = TrainingService(JobStore(settings.data_dir / "jobs.sqlite3"), {"ckpt": engine},
                              DatasetStores(settings), max_images={"ckpt": 20})
    job = service.launch(OWNER, "ckpt", dataset, _req())
    service.track_once()
    assert service.jobs.get(OWNER, job.id).status == "running"
    [event] = service.jobs.events(OWNER, job.id, "step")[:1]
    assert event["data"]["loss"] == 0.25 and event["data"]["step"] == 3
    engine.state = "interrupted"
    service.track_once()
    interrupted = service.jobs.get(OWNER, job.id)
    assert interrupted.status == "interrupted" and not interrupted.error
    resumed = service.resume(OWNER, job.id)
    assert resumed.status == "running" and engine.resumed == 1
    engine.state = "ready"
    service.track_once()
    assert service.jobs.get(OWNER, job.id).status == "ready"
    with pytest.raises(InputError, match="only interrupted or cancelled"):
        service.resume(OWNER, job.id)


class _Curve(_Resumable):
    """A provider that keeps its whole loss curve, as the local engine does."""

    def __init__(self) -> None:
        super().__init__()
        self.curve: list[tuple[int, float]] = []

    def status(self, remote_id):
        from services.providers.base import TrainStatus

        step, loss = self.curve[-1] if self.curve else (None, None)
        return TrainStatus(self.state, step=step, loss=loss, losses=tuple(self.curve))


def _loss_points(service, job_id):
    return [(e["data"]["step"], e["data"]["loss"]) for e in service.jobs.events(OWNER, job_id, "step")
            if e["data"].get("loss") is not None]


def test_a_providers_loss_curve_is_stored_whole_once_and_survives_a_restart(settings, dataset):
    from components.train_tab import RAW, loss_frame

    engine = _Curve()
    store = JobStore(settings.data_dir / "jobs.sqlite3")
    service = TrainingService(store, {"ckpt": engine}, DatasetStores(settings), max_images={"ckpt": 20})
    job = service.launch(OWNER, "ckpt", dataset, _req())
    engine.curve = [(s, 1.0 / s) for s in range(1, 8)]  # 7 steps between two polls: all of them are kept
    service.track_once()
    service.track_once()  # nothing new: nothing recorded twice
    assert _loss_points(service, job.id) == [(s, 1.0 / s) for s in range(1, 8)]

    # A restart (a new service over the same store) goes on from what is stored.
    service = TrainingService(JobStore(settings.data_dir / "jobs.sqlite3"), {"ckpt": engine},
                              DatasetStores(settings), max_images={"ckpt": 20})
    engine.curve += [(8, 0.1), (9, 0.09)]
    service.track_once()
    assert [s for s, _ in _loss_points(service, job.id)] == list(range(1, 10))

    # Resumed from a checkpoint at step 5: steps 6.. are trained again, and the plot shows the new values.
    engine.curve = engine.curve[:5] + [(6, 0.5), (7, 0.4)]
    service.track_once()
    engine.curve += [(8, 0.3), (9, 0.2), (10, 0.1)]
    service.track_once()
    frame = loss_frame(service.jobs.events(OWNER, job.id, "step"))
    frame = frame[frame["series"] == RAW]
    assert list(frame["step"]) == list(range(1, 11))
    assert list(frame["loss"])[5:] == [0.5, 0.4, 0.3, 0.2, 0.1]


def test_a_visitor_may_have_only_so_many_jobs_moving_on_a_capped_provider(settings, fake_cometapi, dataset):
    fake_cometapi.finetune_pending_polls = 10**6
    service = _service(settings, fake_cometapi)
    service._max_active = {"cometapi": 2}
    for i in range(2):
        assert service.launch(OWNER, "cometapi", dataset, _req(name=f"v{i}")).status == "pending"
    before = len(fake_cometapi.requests("/flux/v1/finetune"))
    with pytest.raises(InputError, match="already have 2 job"):
        service.launch(OWNER, "cometapi", dataset, _req(name="v3"))
    assert len(fake_cometapi.requests("/flux/v1/finetune")) == before  # refused before anything was sent
    [first, *_] = service.jobs.active_jobs(OWNER)
    service.cancel(OWNER, first.id)
    assert service.launch(OWNER, "cometapi", dataset, _req(name="v3")).status == "pending"


@pytest.mark.parametrize("user_action", ["cancel", "delete"])
def test_a_poll_that_read_before_a_cancel_or_delete_cannot_undo_it(settings, fake_cometapi, dataset, user_action):
    """A barrier holds a tracker poll between its read (the job is active, the provider says pending)
    and its write, while the user cancels or deletes the job: the poll's stale write must not land."""
    import threading

    fake_cometapi.finetune_pending_polls = 10**6
    service = _service(settings, fake_cometapi)
    job = service.launch(OWNER, "cometapi", dataset, _req())
    provider = service.providers["cometapi"]
    in_poll, release = threading.Event(), threading.Event()
    real_status = provider.status

    def held_status(remote_id):
        status = real_status(remote_id)
        in_poll.set()
        assert release.wait(30)
        return status

    provider.status = held_status
    poll = threading.Thread(target=service.track_once, name="test-poll")
    poll.start()
    try:
        assert in_poll.wait(30)
        getattr(service, user_action)(OWNER, job.id)
    finally:
        release.set()
        poll.join(30)
    expected = "cancelled" if user_action == "cancel" else "deleted"
    assert service.jobs.get(OWNER, job.id).status == expected
    assert all(j.id != job.id for j in service.jobs.active_jobs(OWNER))  # and it is not tracked again


def test_cancel_does_not_turn_a_finished_job_into_a_cancelled_one(settings, fake_cometapi, dataset):
    service = _service(settings, fake_cometapi)
    job = service.launch(OWNER, "cometapi", dataset, _req())
    service.jobs.update(OWNER, job.id, status="ready")  # the tracker got there first
    with pytest.raises(InputError, match="is ready already|is not running"):
        service.cancel(OWNER, job.id)
    assert service.jobs.get(OWNER, job.id).status == "ready"


def test_the_tracker_leaves_a_job_alone_while_its_upload_runs_here(settings, fake_cometapi, dataset):
    """A slow upload once got a list call and up to 25 detail calls per tick, and after 10 minutes was
    marked failed ("safe to launch again") while still uploading."""
    import threading

    clock = Clock()
    service = _service(settings, fake_cometapi, clock=clock)
    provider = service.providers["cometapi"]
    uploading, release = threading.Event(), threading.Event()
    real_submit = provider.submit

    def slow_submit(*a, **kw):
        uploading.set()
        assert release.wait(30)
        return real_submit(*a, **kw)

    provider.submit = slow_submit
    launched: list = []
    launch = threading.Thread(target=lambda: launched.append(service.launch(OWNER, "cometapi", dataset, _req())),
                              name="test-launch")
    launch.start()
    try:
        assert uploading.wait(30)
        before = len(fake_cometapi.requests())
        clock.t += RECONCILE_GIVE_UP_S + 60  # long past the give-up time
        assert service.track_once() == []
        [job] = service.jobs.active_jobs(OWNER)
        assert job.status == "submitting" and len(fake_cometapi.requests()) == before  # not a single call
    finally:
        release.set()
        launch.join(30)
    assert launched[0].status == "pending" and launched[0].remote_id


def test_a_rate_limited_launch_is_sent_again_and_leaves_no_failed_row(settings, fake_cometapi, dataset):
    fake_cometapi.fail_next("/flux/v1/finetune", 429, headers={"Retry-After": "1"})
    service = _service(settings, fake_cometapi)
    job = service.launch(OWNER, "cometapi", dataset, _req())
    assert job.status == "pending" and job.remote_id
    assert len(fake_cometapi.requests("/flux/v1/finetune")) == 2
    assert [j.status for j in service.jobs.list(OWNER)] == ["pending"]


def test_a_job_on_a_visitors_own_key_never_falls_back_to_the_shared_key(settings, fake_cometapi, dataset):
    """With the owner's shared key configured, a restart once made the tracker poll a visitor's job
    with that key, get 'not found', and mark it failed ('safe to launch again'): paid twice."""
    fake_cometapi.finetune_pending_polls = 2
    shared = _service(settings, fake_cometapi, key="sk-the-owners-shared-key-0000000")  # another account
    job = shared.launch(OWNER, "cometapi", dataset, _req(), provider=_provider(fake_cometapi))
    assert job.params["launched_with_own_key"] is True and "sk-" not in str(job.params)
    shared.jobs.close()

    restarted = _service(settings, fake_cometapi, key="sk-the-owners-shared-key-0000000")  # the key is gone
    before = len(fake_cometapi.requests())
    for _ in range(3):
        restarted.track_once()
    waiting = restarted.jobs.get(OWNER, job.id)
    assert waiting.status == "pending" and waiting.message.startswith("Waiting for your CometAPI key")
    assert len(fake_cometapi.requests()) == before  # not one call on the shared key
    with pytest.raises(JobError, match="launched with your own CometAPI key"):
        restarted.delete(OWNER, job.id)  # would leave the remote fine-tune running: refused, not swallowed
    with pytest.raises(JobError, match="Enter your key again"):
        restarted.cancel(OWNER, job.id)
    assert restarted.jobs.get(OWNER, job.id).status == "pending"

    restarted.adopt(OWNER, _provider(fake_cometapi))  # the visitor enters the key again
    for _ in range(4):
        restarted.track_once()
    assert restarted.jobs.get(OWNER, job.id).status == "ready"


def test_polls_reuse_one_pooled_connection(settings, fake_cometapi, dataset):
    """Each call once built its own client and paid a new connection (a TLS handshake on the real
    service); the provider now keeps one pooled client, so polls share one kept-alive connection."""
    fake_cometapi.finetune_pending_polls = 10**6
    provider = CometAPIProvider.from_settings(settings.with_(cometapi_base_url=fake_cometapi.url,
                                                             cometapi_key=Secret(FAKE_COMETAPI_KEY)),
                                              sleep=lambda s: None)
    service = TrainingService(JobStore(settings.data_dir / "jobs.sqlite3"), {"cometapi": provider},
                              DatasetStores(settings))
    service.launch(OWNER, "cometapi", dataset, _req())
    for _ in range(5):
        service.track_once()
    polls = [r for r in fake_cometapi.requests() if r.method == "GET"]
    provider.close()
    assert len(polls) >= 5 and len({r.extra["client_port"] for r in polls}) == 1


class _Expiring(_Resumable):
    """A provider on a visitor's own sign-in that expires while the job runs on."""

    key, label = "huggingface", "Hugging Face"

    def __init__(self) -> None:
        super().__init__()
        self.expired, self.asked = False, 0

    def status(self, remote_id):
        from services.errors import AuthError

        self.asked += 1
        if self.expired:
            raise AuthError("Hugging Face refused the token (401): it has expired.", hint="Sign in again.")
        return super().status(remote_id)


def test_expired_credentials_pause_tracking_instead_of_failing_a_job_that_runs_on(settings, dataset):
    shared = _Expiring()  # the app-wide provider: hosted, no token of its own
    service = TrainingService(JobStore(settings.data_dir / "jobs.sqlite3"), {"huggingface": shared},
                              DatasetStores(settings))
    visitor = _Expiring()
    job = service.launch(OWNER, "huggingface", dataset, _req(), provider=visitor)
    service.track_once()
    assert service.jobs.get(OWNER, job.id).status == "running"
    visitor.expired = True
    service.track_once()
    paused = service.jobs.get(OWNER, job.id)
    assert paused.status == "running" and paused.message.startswith("Tracking paused: Hugging Face refused")
    service.track_once()  # the expired provider was let go: the job waits for the visitor to sign in again
    assert service.jobs.get(OWNER, job.id).message.startswith("Waiting for you to sign in with Hugging Face")
    assert shared.asked == 0  # the app-wide provider (the Space owner's account) was never asked
    again = _Expiring()
    again.state = "ready"
    service.adopt(OWNER, again)
    service.track_once()
    assert service.jobs.get(OWNER, job.id).status == "ready"
