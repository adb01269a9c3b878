"""The local engine's runs: a thread a job, that waits its turn, trains, and reports each step.

One training runs at a time (per process); further jobs wait in line for the training slot
(``services.providers.local.queue``). ``Worker.close()`` stops its runs at a checkpoint; if the app
stops mid-run, the job's state still says "running" and the provider reports it as interrupted,
resumable from its last checkpoint.

torch / diffusers are imported lazily, in the run's thread.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.config import THREAD_PREFIX
from services.errors import ProviderError, StudioError
from services.providers.local.base_models import BaseModels
from services.engine import release_gpu_memory
from services.engine.download import progress_message
from services.engine.train import LORA_FILE, PREPARING_MESSAGE, checkpoint_step
from services.providers.local.folders import JobFolders
from services.providers.local.queue import GpuGate, Holder, Run, TrainingSlot

log = logging.getLogger("flux_studio.local")

RESUME_WAIT_S = 60.0  # how long Resume waits for a just-cancelled run to write its checkpoint
CLOSE_WAIT_S = 30.0  # how long close() waits for this worker's runs to stop at a checkpoint
DELETE_WAIT_S = 120.0  # how long a delete waits for a running job to stop before its folder goes
_STATE_WRITE_EVERY_S = 1.0


@dataclass(eq=False)
class Runs:
    """The runs of one jobs folder, shared by every worker on it in this process."""

    lock: threading.RLock  # the folders' lock: a job's run and its state change together
    active: dict[str, Run] = field(default_factory=dict)  # queued or running
    evicted: dict[str, Run] = field(default_factory=dict)  # gave the slot up by force; threads may live on


_RUNS: dict[str, Runs] = {}
_RUNS_LOCK = threading.Lock()


def _runs_for(folders: JobFolders) -> Runs:
    with _RUNS_LOCK:
        return _RUNS.setdefault(str(folders.root.resolve()), Runs(folders.lock))


class Worker:
    """Runs local trainings: each job's thread waits for the training slot, trains with the engine and
    writes its progress into the job's folder; cancel, resume, stop and close act on those threads."""

    def __init__(self, folders: JobFolders, base_models: BaseModels, *, slot: TrainingSlot, gpu: GpuGate) -> None:
        self.folders = folders
        self.base_models = base_models
        self.slot = slot
        self.gpu = gpu
        self.runs = _runs_for(folders)
        self.lock = self.runs.lock

    def run_of(self, remote_id: str) -> Run | None:
        """The job's queued or running run in this process (hold ``lock`` to read it with the state)."""
        return self.runs.active.get(remote_id)

    def training_now(self) -> Holder | None:
        """The local job that holds the training slot in this process (whichever worker started it)."""
        return self.slot.holder()

    def enqueue(self, remote_id: str, *, resume: bool) -> None:
        with self.lock:
            if remote_id in self.runs.active:
                return
            run = Run(remote_id, resume=resume, owner=self)
            self.runs.active[remote_id] = run
            self.slot.join_line(run)
            run.thread = threading.Thread(target=self._work, args=(run,), daemon=True,
                                          name=f"{THREAD_PREFIX}local-train-{remote_id}")
            run.thread.start()

    def cancel(self, remote_id: str) -> bool:
        """Stop the job's run: a queued one leaves the line, a running one stops at its next step with a
        checkpoint. False when it has no run here."""
        with self.lock:
            run = self.runs.active.get(remote_id)
            if run is None:
                return False
            self.slot.cancel(run)
            if not run.started:
                self.runs.active.pop(remote_id, None)
                self.folders.update_state(remote_id, state="cancelled", message="Cancelled before it started.")
            else:
                run.live["message"] = "Cancelling: saving a checkpoint…"
            return True

    def resume(self, remote_id: str) -> None:
        """Queue a cancelled or interrupted job again, to go on from its last checkpoint."""
        with self.lock:
            run = self.runs.active.get(remote_id)
        if run is not None and run.cancel.is_set():
            # Cancelled a moment ago: the worker is still writing its checkpoint. Wait for it.
            run.done.wait(RESUME_WAIT_S)
        with self.lock:
            if remote_id in self.runs.active:
                raise ProviderError("This local job is still running or stopping.",
                                    hint="Wait a few seconds and press Resume again.")
            stuck = self.runs.evicted.get(remote_id)
            if stuck is not None and not stuck.done.is_set():
                raise ProviderError("The earlier run of this job is stuck and may still write to its folder.",
                                    hint="Restart the app, then resume it.")
            if self.folders.read_state(remote_id).get("state") == "ready":
                raise ProviderError("This local job has already finished.", hint="Use it on the Compare tab.")
            if self.folders.checkpoint(remote_id) is None:
                raise ProviderError("This local job has no checkpoint to resume from.",
                                    hint="Launch the fine-tune again.")
            self.folders.update_state(remote_id, state="pending", message="Resuming from the last checkpoint…")
            self.enqueue(remote_id, resume=True)

    def stop(self, remote_id: str, wait_s: float = DELETE_WAIT_S) -> None:
        """Stop the job's run for good (its folder is going): from now on it writes nothing. Raises
        ProviderError, the run writing again, when it does not stop within ``wait_s``."""
        with self.lock:
            run = self.runs.active.get(remote_id) or self.runs.evicted.get(remote_id)
            if run is not None:
                run.deleted = True
            running = remote_id in self.runs.active
        if run is None:
            return
        if running:
            self.cancel(remote_id)
        if not run.done.wait(wait_s):
            run.deleted = False  # still ours: it may go on writing its state
            raise ProviderError(f"Local job {remote_id} did not stop within {wait_s:.0f} s, so its folder was "
                                "kept.", hint="Try again in a minute, or restart the app and delete it then.")

    def join(self, remote_id: str, timeout: float | None = None) -> bool:
        """Wait until the job's thread has finished here; True when it has (or there is none)."""
        with self.lock:
            run = self.runs.active.get(remote_id) or self.runs.evicted.get(remote_id)
        return True if run is None else run.done.wait(timeout)

    def close(self, timeout: float = CLOSE_WAIT_S) -> None:
        """Stop the runs this worker started and wait for their threads (the app is closing).

        A running job stops at a checkpoint and stays resumable, exactly as after a restart; a queued
        one stays queued for the next start. Afterwards nothing of this worker writes any more."""
        with self.lock:
            mine = [r for r in self.runs.active.values() if r.owner is self]
            for run in mine:
                run.closing = True
                self.slot.cancel(run)
                if not run.started:
                    self.runs.active.pop(run.remote_id, None)
        deadline = time.monotonic() + timeout
        for run in mine:
            if run.thread is not None:
                run.thread.join(max(0.0, deadline - time.monotonic()))
            if not run.done.is_set():  # stuck: let it go, silenced, and free the slot for others
                log.warning("Local job %s did not stop within %.0f s of closing; leaving it", run.remote_id, timeout)
                run.evicted = True
                self.slot.release(run)
                self._let_go(run)

    # ------------------------------------------------------------ a run's thread

    def _work(self, run: Run) -> None:
        """A run's thread: wait for the slot, train, free the memory, hand the slot on."""
        rid = run.remote_id
        trainer = None
        try:
            if not self.slot.acquire(run, _evict):
                return  # cancelled (or the app closed) while it waited: cancel()/close() said so
            with self.lock:
                if run.cancel.is_set() or self.runs.active.get(rid) is not run:
                    return
                run.started = True
                run.live = {"message": PREPARING_MESSAGE}
            self._update_run_state(run, state="running", message=run.live["message"], error="")
            trainer = self._train(run)
        except Exception as exc:  # any failure ends this job only
            log.exception("Local training %s failed", rid)
            self._save_losses(run)
            msg = exc.user_message() if isinstance(exc, StudioError) else f"{type(exc).__name__}: {exc}"
            self._update_run_state(run, state="failed", message=f"The local training failed: {msg}"[:500], eta_s=None)
        finally:
            # Free the memory before the next job may load its model (one GPU), then hand the slot on.
            del trainer
            gc.collect()
            release_gpu_memory()
            self.slot.release(run)
            with self.lock:
                if self.runs.active.get(rid) is run:
                    self.runs.active.pop(rid)
            run.done.set()

    def _train(self, run: Run):
        from services.engine import infer
        from services.engine.config import config_from_json
        from services.engine.train import pick_device

        rid = run.remote_id
        raw = self.folders.read_config(rid)
        cfg = config_from_json(raw)

        def downloading(done: int, total: int) -> None:
            run.live["message"] = progress_message(done, total)

        cfg.model_path = self.base_models.folder(raw.get("_model", self.base_models.model), on_progress=downloading)
        if cfg.device is None and self.base_models.device:
            cfg.device = self.base_models.device
        on_gpu = pick_device(cfg.device).startswith("cuda")
        # One GPU: no generation runs while this trains (it would load a second copy of the model).
        with self.gpu.for_training(rid) if on_gpu else contextlib.nullcontext():
            if on_gpu:
                infer.clear_cache()  # make room for the training copy of the model
            return self._run_trainer(run, cfg, raw)

    def _run_trainer(self, run: Run, cfg, raw: dict):
        from services.engine.train import Callbacks, Trainer

        rid = run.remote_id
        job = self.folders.folder(rid)
        trainer = Trainer(cfg, job / "dataset.zip", job)
        trainer.prepare()
        if run.cancel.is_set() and not run.resume and self.folders.checkpoint(rid) is None:
            # Stopped while preparing: nothing trained yet, nothing to keep. If the app is closing,
            # it stays queued, and the next start trains it from the beginning.
            if run.closing:
                self._update_run_state(run, state="pending", step=0, message="Queued.")
            else:
                self._update_run_state(run, state="cancelled", message="Cancelled before the first step.")
            return trainer
        samples = self.folders.samples(rid) if run.resume else []
        lora_note = " (the local engine trains LoRAs only)" if raw.get("_finetune_type") == "full" else ""

        def on_step(step: int, total: int, loss: float, eta_s: float | None) -> None:
            if run.silenced:
                return
            msg = run.live.get("message", "")
            if not msg.startswith("Cancelling"):
                msg = f"Training{lora_note}: step {step} of {total}"
            with self.lock:
                run.live.update(step=step, total=total, loss=loss, eta_s=eta_s, message=msg)
                run.losses.append((step, float(loss)))
            now = time.monotonic()
            if now - run.last_write >= _STATE_WRITE_EVERY_S or step == total:
                run.last_write = now
                self._save_losses(run)
                self._update_run_state(run, state="running", step=step, loss=loss, eta_s=eta_s, message=msg)

        def on_sample(step: int, path: Path) -> None:
            samples.append(f"samples/{path.name}")
            run.live["samples"] = list(samples)
            self._update_run_state(run, samples=list(samples))

        def on_checkpoint(step: int, path: Path) -> None:
            self._save_losses(run)
            self._update_run_state(run, checkpoint_step=step, step=step, loss=run.live.get("loss"))

        if run.resume:
            ckpt = self.folders.checkpoint(rid)
            run.live.update(step=checkpoint_step(ckpt) if ckpt else 0, samples=list(samples))
            # The curve goes on from the checkpoint: steps trained after it were thrown away.
            kept = self.folders.keep_losses_until(rid, run.live["step"])
            run.losses, run.losses_saved = kept, len(kept)
            self._update_run_state(run, resumed_from=run.live["step"])
        result = trainer.run(Callbacks(on_step, on_sample, on_checkpoint, run.cancel), resume=run.resume)
        self._save_losses(run)  # before the state turns final: from then on status() reads the file
        self._finish(run, result, samples)
        return trainer

    def _finish(self, run: Run, result, samples: list[str]) -> None:
        """The run's last state: ready, stopped by the app closing (resumable), or cancelled."""
        last_loss = result.losses[-1] if result.losses else None
        if result.state == "ready":
            self._update_run_state(run, state="ready", step=result.step, total=result.total, loss=last_loss, eta_s=0,
                                   samples=samples, lora_path=f"output/{LORA_FILE}",
                                   train_seconds=round(result.seconds, 2), message="Ready: use it on the Compare tab.")
        elif run.closing:  # left as "running" with its checkpoint: the next start offers to resume it
            self._update_run_state(run, step=result.step, eta_s=None, samples=samples,
                                   message=f"Stopped at step {result.step} of {result.total} when the app closed.")
        else:
            self._update_run_state(run, state="cancelled", step=result.step, eta_s=None, samples=samples,
                                   loss=last_loss,
                                   message=f"Cancelled at step {result.step} of {result.total}. The checkpoint is "
                                           "kept; resume it any time.")

    def _save_losses(self, run: Run) -> None:
        """Append the steps not yet on disk to losses.csv, so the curve survives a restart."""
        with self.lock:
            fresh = run.losses[run.losses_saved:]
            run.losses_saved = len(run.losses)
        if fresh and not run.silenced:
            try:
                self.folders.append_losses(run.remote_id, fresh)
            except OSError as exc:  # the curve is a nicety: never fail a training run over it
                log.warning("Could not save the loss curve of %s: %s", run.remote_id, exc)

    def _update_run_state(self, run: Run, **changes) -> None:
        """The run's writes: none once the run was deleted or evicted."""
        with self.lock:
            if not run.silenced:
                self.folders.update_state(run.remote_id, **changes)

    def _on_evicted(self, run: Run) -> None:
        """``run`` was cancelled but did not stop within the grace period, and a job waits for the slot."""
        log.warning("Local job %s did not stop within %.0f s of its cancel; the next job takes the engine",
                    run.remote_id, self.slot.grace_s)
        with self.lock:
            self._let_go(run)
            if not run.deleted:
                self.folders.update_state(run.remote_id, state="cancelled", eta_s=None, message=(
                    f"Cancelled. The run did not stop within {self.slot.grace_s:.0f} s, so the engine moved on to "
                    "the next job. Restart the app to resume it from its last checkpoint."))

    def _let_go(self, run: Run) -> None:
        """Stop counting ``run`` as its job's run; its thread, maybe still alive, is remembered so
        that Resume can refuse while it might still write."""
        with self.lock:
            if self.runs.active.get(run.remote_id) is run:
                self.runs.active.pop(run.remote_id)
            self.runs.evicted[run.remote_id] = run


def _evict(run: Run) -> None:
    """The slot's eviction callback: the overdue holder's own worker (maybe another data dir's) lets it go."""
    run.owner._on_evicted(run)
