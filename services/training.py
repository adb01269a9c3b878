"""Launching fine-tunes and tracking them until they are ready, through any provider.

Two rules keep a user's money and work safe:

* The job row is written *before* anything is sent, tagged with our job id, and the tag
  travels with the submission (in the fine-tune's name). If the app dies or the network
  drops mid-submit, the tracker looks the tag up on the provider instead of submitting
  again, so a restart never creates a second paid job.
* Tracking runs in a background thread over every unfinished job of every owner, so a job
  finishes and is recorded even when no browser is open, and after a restart.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.config import THREAD_PREFIX
from services.storage.datasets import DatasetStore
from services.errors import (
    AuthError,
    EndpointUnavailableError,
    InputError,
    JobError,
    NetworkError,
    ProviderError,
    RateLimitedError,
    ServerError,
    StudioError,
    TaskNotFoundError,
    WaitTimeoutError,
)
from services.storage.jobs import ACTIVE_STATUSES, Job, JobStore
from services.providers import registry
from services.providers.base import Credentials, Provider, ProgressFn, TrainRequest, TrainStatus, job_tag

log = logging.getLogger("flux_studio.training")

# Failures after which the provider may still have received the submission.
_AMBIGUOUS = (NetworkError, ServerError, WaitTimeoutError)
# Failures worth another look on the next tick rather than failing the job.
_TRANSIENT = (NetworkError, ServerError, RateLimitedError, WaitTimeoutError)
RECONCILE_GIVE_UP_S = 600.0
# A job's params say it was launched with a visitor's own key (the key itself is never stored).
OWN_KEY = "launched_with_own_key"
# States the user may resume a job from; every other terminal state is final.
RESUMABLE = frozenset({"interrupted", "cancelled"})


@dataclass(frozen=True)
class Transition:
    """A job that changed state during a tracking pass (for toasts)."""

    job: Job
    previous: str


class TrainingService:
    def __init__(
        self,
        jobs: JobStore,
        providers: dict[str, Provider],
        datasets_for: Callable[[str], DatasetStore],
        *,
        clock: Callable[[], float] = time.time,
        max_images: dict[str, int] | None = None,
        max_active: dict[str, int] | None = None,
    ) -> None:
        """``max_active``: provider key -> how many jobs one owner may have queued or running there
        (hosted: the local engine is one GPU shared by every visitor)."""
        self.jobs = jobs
        self.providers = providers
        self.datasets_for = datasets_for
        self._clock = clock
        self._max_images = max_images or {}
        self._max_active = max_active or {}
        # Jobs whose submit() runs in this process right now: the launch, not the tracker, says how
        # it went (a tracker would look them up by tag on every tick, and fail them after a while).
        self._uploading: set[str] = set()
        self._lock = threading.Lock()
        self._launching = threading.Lock()
        # Provider key -> a problem worth a banner (e.g. the fine-tune endpoint is switched off).
        self.notices: dict[str, str] = {}
        # Job id -> the provider (with a visitor's own key) that launched it; memory only, by design.
        self._job_providers: dict[str, Provider] = {}
        # Job id -> {step: loss} already in the job store, for jobs being tracked (each poll adds only news).
        self._loss_points: dict[str, dict[int, float]] = {}

    # ------------------------------------------------------------ launching

    def provider(self, key: str) -> Provider:
        try:
            return self.providers[key]
        except KeyError:
            raise InputError(f"Unknown provider '{key}'.", hint=f"Pick one of: {', '.join(self.providers)}.") from None

    def launch(
        self,
        owner: str,
        provider_key: str,
        dataset_name: str,
        request: TrainRequest,
        *,
        on_upload: ProgressFn | None = None,
        provider: Provider | None = None,
        charge: Callable[[], None] | None = None,
    ) -> Job:
        """Validate, export, charge, record, submit. Returns the job, pending or failed.

        ``provider`` overrides the app-wide one (a hosted visitor's own key); it is kept in
        memory only, to track this job for as long as the process lives. ``charge`` pays for the
        submission (the shared key's budget, ``ProviderAccess.resolve``): made once every check has
        passed, just before the job is recorded and sent, so a refused launch costs nothing.
        """
        request.validate()
        provider = provider or self.provider(provider_key)
        ready, why = provider.readiness()
        if not ready:
            raise InputError(why)
        provider.check_request(request)  # provider-specific fields (the local engine's base model), before any job row
        if not dataset_name:
            raise InputError("No dataset is selected.", hint="Pick a saved dataset (make one on the Dataset tab).")
        self._check_room(owner, provider)  # early, before the export: a refusal costs no work either
        store = self.datasets_for(owner)
        ds = store.open(dataset_name)
        limit = self._max_images.get(provider_key)
        if not ds.items:
            raise InputError(f"Dataset '{ds.name}' has no images.", hint="Add images on the Dataset tab first.")
        if limit and len(ds.items) > limit:
            raise InputError(
                f"Dataset '{ds.name}' has {len(ds.items)} images; {provider.label} takes at most {limit}.",
                hint="Remove some on the Dataset tab, or train with the local engine.",
            )
        export = store.export_zip(ds.name)
        own_key = provider is not self.providers.get(provider.key)
        # The count and the new row under one lock: launches at once (a script's burst) would each
        # count the same jobs, and all fit.
        with self._launching:
            self._check_room(owner, provider)
            if charge is not None:
                charge()
            job = self.jobs.create(
                owner, provider.key, "finetune", request.name.strip(), ds.name, ds.content_hash(),
                params={**request.record(), "images": len(ds.items), "zip_bytes": export.size_bytes,
                        **({OWN_KEY: True} if own_key else {})},
            )
        if own_key:
            self._job_providers[job.id] = provider
        self.jobs.update(owner, job.id, message=f"Uploading {export.size_bytes / 2**20:.1f} MB to {provider.label}…")
        self._uploading.add(job.id)
        try:
            remote_id = provider.submit(export.path, request, tag=job.id, on_upload=on_upload, owner=owner)
        except _AMBIGUOUS as exc:
            # It may have arrived: keep the job "submitting" and let the tracker look it up by tag.
            return self.jobs.update(
                owner, job.id, message=f"Not sure {provider.label} received it; checking before anything is re-sent. {exc.user_message()}"
            )
        except StudioError as exc:
            if isinstance(exc, EndpointUnavailableError):
                self.notices[provider.key] = exc.user_message()
            self.jobs.update(owner, job.id, status="failed", error=exc.user_message(), message="Launch failed.")
            raise
        finally:
            self._uploading.discard(job.id)
        self.notices.pop(provider.key, None)
        return self.jobs.update(
            owner, job.id, status="pending", remote_id=remote_id, progress=0.0,
            message=f"Submitted to {provider.label}; waiting for it to start.",
        )

    def _check_room(self, owner: str, provider: Provider) -> None:
        """Refuse a launch past ``max_active``: the jobs one owner may have queued or running there."""
        cap = self._max_active.get(provider.key)
        if cap and sum(1 for j in self.jobs.active_jobs(owner) if j.provider == provider.key) >= cap:
            raise InputError(f"You already have {cap} job(s) queued or running on {provider.label}, the most one "
                             "visitor may have at once.", hint="Wait for one to finish, or cancel one, then launch.")

    # ------------------------------------------------------------ tracking

    def track_once(self, owner: str | None = None) -> list[Transition]:
        """Ask the providers about every unfinished job (of ``owner``, or everyone's)."""
        changed: list[Transition] = []
        with self._lock:  # one pass at a time, whoever calls
            for job in self.jobs.active_jobs(owner):
                before = job.status
                try:
                    after = self._track(job)
                except Exception:  # one bad job must not stop the others being tracked
                    log.exception("Tracking job %s failed", job.id)
                    continue
                if after.status != before:
                    changed.append(Transition(after, before))
                if not after.is_active:
                    self._job_providers.pop(after.id, None)
                    self._loss_points.pop(after.id, None)
        return changed

    def adopt(self, owner: str, provider: Provider) -> None:
        """Track ``owner``'s unfinished jobs on ``provider`` with it (a visitor entered their key again)."""
        for job in self.jobs.active_jobs(owner):
            if job.provider == provider.key:
                self._job_providers[job.id] = provider

    def _tracked(self, job: Job, **fields) -> Job:
        """A tracker's write: only while the job is still active, so a poll that started before the
        user cancelled or deleted it cannot bring it back; returns the job as stored either way."""
        return self.jobs.transition(job.owner, job.id, ACTIVE_STATUSES, **fields) or self.jobs.get(job.owner, job.id)

    def _provider_for(self, job: Job) -> Provider | None:
        """The provider that may act on ``job``: for a job launched with a visitor's own key, that
        key's provider only (never the app's shared one, whose account does not have it)."""
        if job.params.get(OWN_KEY):
            return self._job_providers.get(job.id)
        return self._job_providers.get(job.id) or self.providers.get(job.provider)

    def _track(self, job: Job) -> Job:
        if job.id in self._uploading:
            return job
        provider = self._provider_for(job)
        if provider is None and job.params.get(OWN_KEY):
            waiting = _credentials(job).waiting
            if job.message != waiting:
                return self._tracked(job, message=waiting)
            return job
        if provider is None:
            return self._tracked(job, message=f"Provider '{job.provider}' is not configured in this app; "
                                    "tracking resumes when it is.")
        ready, why = provider.readiness()
        if not ready:
            return self._tracked(job, message=f"Tracking paused: {why}")
        if not job.remote_id:
            return self._reconcile(job, provider)
        try:
            status = provider.status(job.remote_id)
        except _TRANSIENT as exc:
            return self._tracked(job, message=f"Could not check the job just now; will retry. ({exc.message})")
        except TaskNotFoundError:
            return self._tracked(job, status="failed", error=(
                f"{provider.label} no longer knows this job ({job.remote_id}). It may have expired or been deleted."))
        except EndpointUnavailableError as exc:
            self.notices[provider.key] = exc.user_message()
            return self._tracked(job, message=exc.user_message())
        except AuthError as exc:
            # The credentials expired or were revoked (a visitor's sign-in lasts hours; a job may last
            # longer): the job itself goes on remotely, so it waits for working ones instead of failing.
            if job.params.get(OWN_KEY):
                self._job_providers.pop(job.id, None)
            return self._tracked(job, message=f"Tracking paused: {exc.user_message()}")
        except ProviderError as exc:
            return self._tracked(job, status="failed", error=exc.user_message())
        return self._apply(job, status)

    def _apply(self, job: Job, status: TrainStatus) -> Job:
        state = status.state
        if state == "failed" and status.result.get("resumable"):
            state = "interrupted"  # stopped by a restart, with a checkpoint to resume from
        fields: dict = {"status": state, "message": status.message or _default_message(status)}
        if status.progress is not None:
            fields["progress"] = max(0.0, min(1.0, status.progress))
        if status.eta_s is not None:
            fields["eta_s"] = max(0.0, status.eta_s)
        if status.state == "ready":
            fields["progress"] = 1.0
            fields["result"] = {**job.result, **status.result}
        if state == "failed":
            fields["error"] = status.message or "The provider reported an error without details."
        if status.losses:
            self._record_losses(job, status.losses)
        if status.samples or (not status.losses and (status.step is not None or status.loss is not None)):
            self.jobs.record_event(job.owner, job.id, "step", {
                "step": status.step, "loss": None if status.losses else status.loss, "samples": list(status.samples),
            })
        return self._tracked(job, **fields)

    def _record_losses(self, job: Job, losses: tuple[tuple[int, float], ...]) -> None:
        """Store the points of the provider's loss curve that the job store has not got yet.

        A point is new when its step is, or when its value changed: a run resumed from an earlier
        checkpoint trains the steps after it again, and the plot keeps the latest value per step."""
        known = self._loss_points.get(job.id)
        if known is None:
            known = {int(e["data"]["step"]): e["data"]["loss"] for e in self.jobs.events(job.owner, job.id, "step")
                     if e["data"].get("loss") is not None and e["data"].get("step") is not None}
            self._loss_points[job.id] = known
        fresh = [{"step": int(st), "loss": float(v)} for st, v in losses if known.get(int(st)) != float(v)]
        if fresh:
            self.jobs.record_events(job.owner, job.id, "step", fresh)
            known.update((p["step"], p["loss"]) for p in fresh)

    def _reconcile(self, job: Job, provider: Provider) -> Job:
        """A job with no remote id: find it by tag, or decide it never arrived."""
        try:
            remote_id = provider.find_by_tag(job.id)
        except ProviderError as exc:
            return self._tracked(job, message=f"Checking whether the submission arrived… ({exc.message})")
        if remote_id:
            return self._tracked(job, status="pending", remote_id=remote_id,
                                    message="Found the submission on the service; tracking it.")
        if self._clock() - job.created_at > RECONCILE_GIVE_UP_S:
            return self._tracked(job, status="failed", error=(
                f"{provider.label} has no job tagged {job_tag(job.id)}, so the submission never arrived. "
                "It is safe to launch again."))
        return self._tracked(job, message="Checking whether the submission arrived…")

    def resume_on_start(self) -> list[Job]:
        """Called once when the app starts: every unfinished job, for logs and a first pass."""
        active = self.jobs.active_jobs(None)
        if active:
            log.info("Resuming tracking of %d unfinished job(s)", len(active))
        return active

    # ------------------------------------------------------------ managing

    def cancel(self, owner: str, job_id: str) -> Job:
        job = self.jobs.get(owner, job_id)
        if not job.is_active:
            raise InputError(f"'{job.name}' is not running.", hint="Only pending or running jobs can be cancelled.")
        provider = self._provider_for(job)
        if provider is None and job.params.get(OWN_KEY):
            own = _credentials(job)
            raise JobError(f"'{job.name}' was launched with your own {own.name}, which this app no longer holds.",
                           hint=f"{own.give_again}, then cancel it.")
        if job.remote_id and provider is not None:
            try:
                provider.cancel(job.remote_id)
            except ProviderError as exc:
                raise JobError(f"Could not cancel '{job.name}': {exc.message}", hint="Try again in a moment.") from None
        cancelled = self.jobs.transition(owner, job_id, ACTIVE_STATUSES, status="cancelled", message="Cancelled by you.")
        if cancelled is None:  # it finished (or failed) in the meantime
            job = self.jobs.get(owner, job_id)
            raise InputError(f"'{job.name}' is {job.status} already.", hint="Nothing was cancelled.")
        return cancelled

    def resume(self, owner: str, job_id: str) -> Job:
        job = self.jobs.get(owner, job_id)
        provider = self._provider_for(job)
        if not provider.can_resume or not job.remote_id:
            raise InputError(f"{job.provider} jobs can't be resumed.", hint="Launch a new fine-tune instead.")
        if job.status not in RESUMABLE:
            raise InputError(f"'{job.name}' is {job.status}; only interrupted or cancelled jobs can be resumed.")
        try:
            provider.resume(job.remote_id)
        except ProviderError as exc:
            raise JobError(f"Could not resume '{job.name}': {exc.message}",
                           hint=exc.hint or "Try again, or launch it again.") from None
        resumed = self.jobs.transition(owner, job_id, RESUMABLE, status="running", error="",
                                       message="Resuming from the last checkpoint…")
        return resumed or self.jobs.get(owner, job_id)

    def close(self) -> None:
        """Stop what the providers run in this process (local trainings stop at a checkpoint)."""
        for provider in self.providers.values():
            provider.close()

    def delete(self, owner: str, job_id: str) -> Job:
        job = self.jobs.get(owner, job_id)
        provider = self._provider_for(job)
        if provider is None and job.params.get(OWN_KEY) and job.remote_id:
            own = _credentials(job)
            raise JobError(f"'{job.name}' was launched with your own {own.name}, which this app no longer holds, "
                           "so it can't be deleted there.", hint=f"{own.give_again}, then delete it.")
        if job.remote_id and provider is not None:
            try:
                if job.is_active:
                    provider.cancel(job.remote_id)
                provider.delete(job.remote_id)
            except TaskNotFoundError:
                pass  # already gone remotely: deleting locally is what the user wants
            except ProviderError as exc:
                raise JobError(f"Could not delete '{job.name}' on {provider.label}: {exc.message}",
                               hint="Nothing was changed here; try again in a moment.") from None
        return self.jobs.mark_deleted(owner, job_id)


# A provider not in the registry (a stand-in) that was given a visitor's own credentials anyway.
SOME_CREDENTIALS = Credentials(name="credentials", give_again="Give them again at the top of the page",
                               waiting="Waiting for your credentials: the app keeps them in memory only. Give them "
                                       "again at the top of the page to go on tracking this job.")


def _credentials(job: Job) -> Credentials:
    """How a job launched with a visitor's own credentials names them (its provider says)."""
    credentials = registry.credentials(job.provider)
    return credentials if credentials.kind != "none" else SOME_CREDENTIALS


def _default_message(status: TrainStatus) -> str:
    return {
        "pending": "Queued at the provider.",
        "running": "Training…",
        "ready": "Ready: use it on the Compare tab.",
        "failed": "Failed.",
        "cancelled": "Cancelled.",
    }.get(status.state, status.state)


class Tracker:
    """A daemon thread that calls ``track_once`` every ``interval`` seconds until stopped.

    One polls per job database in a process: two apps over one data dir (a notebook that builds
    the app twice) would otherwise ask the providers about every job twice. A second tracker for
    the same database waits on standby and takes over when the polling one stops."""

    _registry_lock = threading.Lock()
    _by_db: dict[str, list["Tracker"]] = {}  # database path -> trackers, the polling one first

    def __init__(self, service: TrainingService, interval: float = 3.0) -> None:
        self.service = service
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._db = str(Path(service.jobs.path).resolve())
        self._started = False

    @property
    def polling(self) -> bool:
        return self._thread is not None

    def start(self) -> "Tracker":
        with Tracker._registry_lock:
            if self._started:
                return self
            self._started = True
            line = Tracker._by_db.setdefault(self._db, [])
            line.append(self)
            if line[0] is self:
                self._spawn()
        return self

    def _spawn(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"{THREAD_PREFIX}job-tracker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.service.track_once()
            except Exception:
                log.exception("Tracking pass failed")
            self._stop.wait(self.interval)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop polling and wait for a pass in progress to finish (it may be waiting on a slow provider);
        a tracker on standby for the same database takes over."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("The job tracker did not stop within %.0f s", timeout)
            self._thread = None
        with Tracker._registry_lock:
            line = Tracker._by_db.get(self._db, [])
            if self in line:
                was_polling = line[0] is self
                line.remove(self)
                if was_polling and line:
                    line[0]._spawn()
                if not line:
                    Tracker._by_db.pop(self._db, None)
