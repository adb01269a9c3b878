"""The local diffusers engine as a ``Provider``: LoRA training and generation on this machine.

Jobs live in ``<data_dir>/local_jobs/<remote_id>/`` (hosted, a visitor's in their own folder:
``<data_dir>/owners/<token>/local_jobs/<remote_id>/``, the token being part of the id)::

    dataset.zip        the training zip, copied at submission
    config.json        the training configuration (TrainConfig)
    state.json         state, step, loss, samples, ... (written atomically: services.storage.atomic)
    samples/           sample images every N steps (fixed seed, so they show the LoRA learning)
    checkpoints/       the latest checkpoint: LoRA + optimizer + step + RNG
    output/            pytorch_lora_weights.safetensors, README.md (model card), samples/

One training runs at a time (per process); further jobs wait in line for the training slot
(``services.providers.local.queue``). Each run has a daemon thread. ``close()`` stops this provider's runs
at a checkpoint; if the app stops mid-run, ``status`` reports the job as failed but resumable
from its last checkpoint, and ``resume`` continues it from there.

torch / diffusers are imported lazily (only in the worker and in ``generate``), so importing
this module is instant and works where the optional extra is not installed.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from pathlib import Path

from services.storage import atomic
from services.config import THREAD_PREFIX, Secret, Settings
from services.errors import (
    EngineUnavailableError,
    InputError,
    ProviderError,
    StudioError,
    TaskNotFoundError,
)
from services.providers.local.engine import models, release_gpu_memory
from services.storage.owners import LOCAL_OWNER, owner_dir
from services.providers.local.queue import GPU, SLOT, GpuBusyError, GpuGate, Holder, Run, TrainingSlot
from services.providers.base import GeneratedImage, GenerateRequest, ProgressFn, TrainRequest, TrainStatus

log = logging.getLogger("flux_studio.local")

REQUIRED_MODULES = ("torch", "diffusers", "transformers", "peft", "safetensors")
INSTALL_HINT = ("The local engine needs torch and diffusers: run `pip install -r requirements-local.txt` "
                "(make run does it).")
TINY_LABEL = models.BY_KEY[models.TINY_FLUX1].label
WAITING = "Waiting for the running local job"
_TAG_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ID_RE = re.compile(r"^local-[A-Za-z0-9_-]{1,64}$")
# A hosted visitor's job: its id carries the visitor's folder token, so the folder is found from
# the id alone: <data_dir>/owners/<token>/local_jobs/<id>. Checked before _ID_RE.
_OWNED_ID_RE = re.compile(r"^local-o([0-9a-f]{32})-[A-Za-z0-9_-]{1,64}$")
_STATE_WRITE_EVERY_S = 1.0

class _Engine:
    """The runs of one jobs folder, shared by every LocalProvider on it in this process."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.active: dict[str, Run] = {}  # queued or running
        self.evicted: dict[str, Run] = {}  # gave the slot up by force; their threads may still be alive


_ENGINES: dict[str, _Engine] = {}
_ENGINES_LOCK = threading.Lock()


def _engine_for(root: Path) -> _Engine:
    with _ENGINES_LOCK:
        return _ENGINES.setdefault(str(root.resolve()), _Engine())


LOSSES_FILE = "losses.csv"


def read_losses(job: Path) -> tuple[tuple[int, float], ...]:
    """A job's loss curve from losses.csv: one value per step (the latest), in step order.

    A torn last line (a crash mid-write) is skipped."""
    by_step: dict[int, float] = {}
    try:
        text = (Path(job) / LOSSES_FILE).read_text(encoding="utf-8")
    except OSError:
        return ()
    for line in text.splitlines():
        step, _, value = line.partition(",")
        try:
            by_step[int(step)] = float(value)
        except ValueError:
            continue
    return tuple(sorted(by_step.items()))


def loss_lines(points) -> list[str]:
    """losses.csv lines: ``step,loss`` with the float's repr, so reading it back gives the same value."""
    return [f"{st},{v!r}\n" for st, v in points]


def write_losses(job: Path, points) -> None:
    atomic.write_text(Path(job) / LOSSES_FILE, "".join(loss_lines(points)))


RESUME_WAIT_S = 60.0  # how long Resume waits for a just-cancelled run to write its checkpoint
CLOSE_WAIT_S = 30.0  # how long close() waits for this provider's runs to stop at a checkpoint
DELETE_WAIT_S = 120.0  # how long delete() waits for a running job to stop before removing its folder


class LocalProvider:
    key = "local"
    label = "Local engine"
    max_images = 50

    def __init__(self, settings: Settings, *, model: str | None = None, steps_per_sample: int | None = None,
                 checkpoint_every: int | None = None, resolution: int | None = None,
                 device: str | None = None, slot: TrainingSlot | None = None, gpu: GpuGate | None = None) -> None:
        self.settings = settings
        self.slot = slot or SLOT
        self.gpu = gpu or GPU
        self.model = (settings.local_model if model is None else model).strip()
        self.steps_per_sample = steps_per_sample
        self.checkpoint_every = checkpoint_every
        self.resolution = resolution
        self.device = device
        self.root = Path(settings.data_dir) / "local_jobs"
        self._engine = _engine_for(self.root)
        self._lock = self._engine.lock
        self._active = self._engine.active

    # ------------------------------------------------------------ model

    @property
    def is_tiny(self) -> bool:
        """Whether the default model (``FLUX_LOCAL_MODEL``) is the tiny FLUX.1 test model."""
        return self.model in ("", "tiny", models.TINY_FLUX1)

    @property
    def model_label(self) -> str:
        if self.is_tiny:
            return TINY_LABEL
        listed = models.BY_KEY.get(models.default_choice(self.model))
        return listed.label if listed else self.model

    @property
    def tiny_model_dir(self) -> Path:
        return self._tiny_dir(models.TINY_FLUX1)

    def _tiny_dir(self, key: str) -> Path:
        return Path(self.settings.data_dir) / models.TINY_FOLDERS[key]

    def model_choices(self) -> list[tuple[str, str]]:
        """(label, value) pairs for the Train tab's base-model picker."""
        return models.choices(self.model)

    def default_model_choice(self) -> str:
        return models.default_choice(self.model)

    def check_request(self, request: TrainRequest) -> None:
        """Refuse, before any job is recorded, a base model this engine does not offer, or a training
        this GPU's memory can't hold (never found out as an out-of-memory error halfway through)."""
        self.memory_plan(request, self.check_request_model(request)).check()

    def check_request_model(self, request: TrainRequest) -> str:
        """The spec of the request's base model, if this engine offers it (InputError otherwise).
        Hosted, a visitor may not make the server download another multi-GB model: only the configured
        one (or a tiny test model)."""
        spec = models.check_choice(request.base_model, self.model)
        configured = models.default_choice(self.model)
        if self.settings.hosted and spec != configured and not models.resolve(spec).tiny:
            raise InputError(f"This hosted app trains on {models.resolve(configured).label} only.",
                             hint="Run the studio on your own machine to pick another base model.")
        return spec

    def memory_plan(self, request: TrainRequest, spec: str | None = None):
        """The memory preset, its estimated peak and the GPU, for the Train tab and the launch check."""
        from services.providers.local.engine import memory

        base = models.resolve(spec or request.base_model or self.model)
        if base.tiny or not base.transformer_params:
            return memory.MemoryPlan(None, None, None)  # the tiny models fit anywhere; unknown ones can't be told
        checkpointing = True if request.gradient_checkpointing is None else bool(request.gradient_checkpointing)
        return memory.plan_memory(base.family, base.transformer_params, self._resolution(request, base),
                                  request.lora_rank, preset_name=request.memory_preset,
                                  gradient_checkpointing=checkpointing, device=None if self.device is None
                                  else ("cuda" if self.device.startswith("cuda") else "cpu"))

    def base_model_of(self, finetune_id: str) -> str | None:
        """The base model a local fine-tune was trained on (what its Compare base image must use)."""
        try:
            return self._read_state(finetune_id).get("model", self.model)
        except StudioError:
            return None

    def is_tiny_model(self, spec: str | None) -> bool:
        try:
            return models.resolve(self.model if spec is None else spec).tiny
        except StudioError:
            return False

    def _model_path(self, model: str | None = None, on_progress=None) -> str:
        """The folder ``from_pretrained`` gets: a tiny model is built on first use, a Hub model is
        downloaded into the HF cache (reused; disk space checked first), a folder is used as is."""
        base = models.resolve(self.model if model is None else model)
        if base.tiny and not base.path:
            from services.providers.local.engine.tiny import ensure_tiny_model

            return str(ensure_tiny_model(self._tiny_dir(base.key), base.family))
        from services.providers.local.engine.download import fetch_base_model

        return str(fetch_base_model(base.source, token=self.settings.hf_token, on_progress=on_progress))

    # ------------------------------------------------------------ Provider

    def readiness(self) -> tuple[bool, str]:
        missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            return False, INSTALL_HINT
        if not self.is_tiny:
            looks_local = self.model.startswith((".", "/", "~")) or self.model.count("/") != 1
            if looks_local and not Path(self.model).expanduser().is_dir():
                return False, (f"FLUX_LOCAL_MODEL is {self.model!r}, which is not a folder. Point it at a "
                               "diffusers FLUX folder or a Hub id such as black-forest-labs/FLUX.1-dev.")
        return True, ""

    def _require_ready(self) -> None:
        ok, why = self.readiness()
        if not ok:
            raise EngineUnavailableError(why)

    def submit(self, zip_path: Path, request: TrainRequest, *, tag: str, on_upload: ProgressFn | None = None,
               owner: str | None = None) -> str:
        """Queue a training. A hosted visitor's job (``owner``) lives in that visitor's own folder."""
        self._require_ready()
        zip_path = Path(zip_path)
        if not zip_path.is_file():
            raise InputError("The training zip is missing.", hint="Export the dataset again.")
        if not isinstance(request.iterations, int) or request.iterations < 1:
            raise InputError("Iterations must be a whole number of at least 1.")
        base_model = models.check_choice(request.base_model, self.model)
        suffix = tag if tag and _TAG_RE.match(tag) else uuid.uuid4().hex[:16]
        remote_id = f"local-{suffix}"
        if owner and owner != LOCAL_OWNER:
            remote_id = f"local-o{owner_dir(self.settings, owner).name}-{suffix}"
        with self._lock:
            existing = self.find_by_tag(tag) if tag else None
            if existing:  # submitted already (a retry after a restart): never train twice
                return existing
            job = self._folder(remote_id)
            tmp = job.with_name(f".{remote_id}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            total = zip_path.stat().st_size
            with open(zip_path, "rb") as src, open(tmp / "dataset.zip", "wb") as dst:
                done = 0
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    done += len(chunk)
                    if on_upload:
                        on_upload(done, total)
            _write_json(tmp / "config.json", self._config(request, base_model))
            now = time.time()
            _write_json(tmp / "state.json", {
                "remote_id": remote_id, "tag": tag, "name": request.name, "state": "pending", "step": 0,
                "total": request.iterations, "loss": None, "eta_s": None, "message": "Queued.",
                "samples": [], "model": base_model, "created_at": now, "updated_at": now,
            })
            os.replace(tmp, job)
            self._enqueue(remote_id, resume=False)
        return remote_id

    def status(self, remote_id: str) -> TrainStatus:
        job = self._job_dir(remote_id)
        with self._lock:  # the run and the state together: a worker finishing in between can't be missed
            run = self._active.get(remote_id)
            live = dict(run.live) if run else None
            losses = tuple(run.losses) if run else ()
            queued = bool(run) and not run.started
            state = self._read_state(remote_id)
        samples = tuple(str(job / s) for s in reversed(state.get("samples", [])))
        step, total = int(state.get("step") or 0), int(state.get("total") or 0)
        loss = state.get("loss")
        if run is not None:
            if queued:
                return TrainStatus("pending", progress=step / total if total and step else 0.0, step=step or None,
                                   loss=loss, message=WAITING, samples=samples)
            step = live.get("step", step)
            loss = live.get("loss", loss)
            if live.get("samples") is not None:
                samples = tuple(str(job / s) for s in reversed(live["samples"]))
            return TrainStatus("running", progress=step / total if total else None, eta_s=live.get("eta_s"),
                               step=step, loss=loss, message=live.get("message", "Training…"), samples=samples,
                               losses=losses)
        losses = read_losses(job)
        s = state.get("state")
        ckpt = self._checkpoint(remote_id)
        if s in ("pending", "running"):  # no worker here: the process that ran it has stopped
            if s == "pending" and ckpt is None and step == 0:
                self._enqueue(remote_id, resume=False)  # it never started: just queue it again
                return TrainStatus("pending", progress=0.0, message=WAITING)
            if ckpt is not None:
                return TrainStatus("failed", progress=step / total if total else None, step=step, loss=loss,
                                   samples=samples, result={"resumable": True}, losses=losses,
                                   message=f"Interrupted by a restart at step {step} of {total}. "
                                           "Resume it from the last checkpoint.")
            return TrainStatus("failed", step=step, loss=loss, samples=samples, result={"resumable": False},
                               losses=losses,
                               message=f"Interrupted by a restart at step {step} of {total}, before its first "
                                       "checkpoint. Launch it again.")
        if s == "ready":
            return TrainStatus("ready", progress=1.0, step=step, loss=loss, samples=samples, losses=losses,
                               message=state.get("message") or "Ready: use it on the Compare tab.",
                               result={"lora_path": str(job / "output" / _lora_file()), "finetune_id": remote_id})
        if s == "cancelled":
            return TrainStatus("cancelled", progress=step / total if total else None, step=step, loss=loss,
                               samples=samples, losses=losses, message=state.get("message") or "Cancelled.",
                               result={"resumable": ckpt is not None})
        return TrainStatus("failed", step=step or None, loss=loss, samples=samples, losses=losses,
                           message=state.get("message") or "The local training failed.",
                           result={"resumable": False})

    def list_remote(self) -> list[str]:
        """Every local job on this data dir, every owner's (for the app's own restart recovery)."""
        roots = [self.root, *Path(self.settings.data_dir).glob("owners/*/local_jobs")]
        jobs = []
        for d in (d for root in roots if root.is_dir() for d in root.iterdir()):
            if d.is_dir() and _ID_RE.match(d.name) and (d / "state.json").is_file():
                try:
                    created = float(json.loads((d / "state.json").read_text()).get("created_at") or 0)
                except (OSError, ValueError):
                    created = 0.0
                jobs.append((created, d.name))
        return [name for _, name in sorted(jobs)]

    def find_by_tag(self, tag: str) -> str | None:
        if not tag:
            return None
        for remote_id in self.list_remote():
            try:
                if self._read_state(remote_id).get("tag") == tag:
                    return remote_id
            except StudioError:
                continue
        return None

    def cancel(self, remote_id: str) -> None:
        self._job_dir(remote_id)
        with self._lock:
            run = self._active.get(remote_id)
            if run is not None:
                self.slot.cancel(run)  # a queued run leaves the line; a running one stops at its next step
                if not run.started:
                    self._active.pop(remote_id, None)
                    self._update_state(remote_id, state="cancelled", message="Cancelled before it started.")
                else:
                    run.live["message"] = "Cancelling: saving a checkpoint…"
                return
            state = self._read_state(remote_id).get("state")
            if state in ("pending", "running"):  # interrupted by a restart
                self._update_state(remote_id, state="cancelled",
                                   message="Cancelled. The last checkpoint is kept; resume it any time.")

    def resume(self, remote_id: str) -> None:
        """Continue a cancelled or interrupted job from its last checkpoint."""
        self._require_ready()
        self._job_dir(remote_id)
        with self._lock:
            run = self._active.get(remote_id)
        if run is not None and run.cancel.is_set():
            # Cancelled a moment ago: the worker is still writing its checkpoint. Wait for it.
            run.done.wait(RESUME_WAIT_S)
        with self._lock:
            if remote_id in self._active:
                raise ProviderError("This local job is still running or stopping.",
                                    hint="Wait a few seconds and press Resume again.")
            stuck = self._engine.evicted.get(remote_id)
            if stuck is not None and not stuck.done.is_set():
                raise ProviderError("The earlier run of this job is stuck and may still write to its folder.",
                                    hint="Restart the app, then resume it.")
            state = self._read_state(remote_id)
            if state.get("state") == "ready":
                raise ProviderError("This local job has already finished.", hint="Use it on the Compare tab.")
            if self._checkpoint(remote_id) is None:
                raise ProviderError("This local job has no checkpoint to resume from.",
                                    hint="Launch the fine-tune again.")
            self._update_state(remote_id, state="pending", message="Resuming from the last checkpoint…")
            self._enqueue(remote_id, resume=True)

    def join(self, remote_id: str, timeout: float | None = None) -> bool:
        """Wait until the job's worker thread has finished here; True when it has (or there is none)."""
        with self._lock:
            run = self._active.get(remote_id) or self._engine.evicted.get(remote_id)
        return True if run is None else run.done.wait(timeout)

    def training_now(self) -> Holder | None:
        """The local job that holds the training slot in this process (whichever provider started it)."""
        return self.slot.holder()

    def close(self, timeout: float = CLOSE_WAIT_S) -> None:
        """Stop the runs this provider started and wait for their threads (the app is closing).

        A running job stops at a checkpoint and stays resumable, exactly as after a restart; a queued
        one stays queued for the next start. Afterwards nothing of this provider writes any more."""
        with self._lock:
            mine = [r for r in self._active.values() if r.owner is self]
            for run in mine:
                run.closing = True
                self.slot.cancel(run)
                if not run.started:
                    self._active.pop(run.remote_id, None)
        deadline = time.monotonic() + timeout
        for run in mine:
            if run.thread is not None:
                run.thread.join(max(0.0, deadline - time.monotonic()))
            if not run.done.is_set():  # stuck: let it go, silenced, and free the slot for others
                log.warning("Local job %s did not stop within %.0f s of closing; leaving it", run.remote_id, timeout)
                run.evicted = True
                self.slot.release(run)
                self._let_go(run)

    def delete(self, remote_id: str, *, wait_s: float = DELETE_WAIT_S) -> None:
        """Stop the job's run, wait for its thread, then remove its folder; raises (keeping the
        folder) when the run does not stop in time or the folder can't be removed."""
        job = self._job_dir(remote_id)
        with self._lock:
            run = self._active.get(remote_id) or self._engine.evicted.get(remote_id)
            if run is not None:
                run.deleted = True  # from now on it writes nothing into the folder
            running = remote_id in self._active
        if run is not None:
            if running:
                self.cancel(remote_id)
            if not run.done.wait(wait_s):
                run.deleted = False  # still ours: it may go on writing its state
                raise ProviderError(f"Local job {remote_id} did not stop within {wait_s:.0f} s, so its folder was "
                                    "kept.", hint="Try again in a minute, or restart the app and delete it then.")
        try:
            from services.providers.local.engine import infer
        except ImportError:  # the engine is not installed: no adapter can be loaded
            infer = None
        if infer is not None:
            infer.drop_adapter(remote_id)
        try:
            shutil.rmtree(job)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ProviderError(f"Could not remove the folder of local job {remote_id}: {exc.strerror}.",
                                hint="Check the data folder's permissions, then delete it again.") from None

    def generate(self, request: GenerateRequest, out_dir: Path, *, finetune: str | None = None,
                 model: str | None = None) -> GeneratedImage:
        self._require_ready()
        if not request.prompt or not request.prompt.strip():
            raise InputError("Type a prompt first.")
        lora = None
        if finetune:
            st = self.status(finetune)
            if st.state != "ready":
                raise InputError(f"The local fine-tune {finetune} is {st.state}, not ready.",
                                 hint="Wait for it to finish, or pick another.")
            lora = Path(st.result["lora_path"])
            base = model if model is not None else self._read_state(finetune).get("model", self.model)
        else:
            base = self.model if model is None else model
        from services.providers.local.engine import infer

        try:
            model_path = self._model_path(base)
            with self.gpu.for_inference() if infer.pick_device(self.device).startswith("cuda") \
                    else contextlib.nullcontext():
                path, params = infer.generate(
                    model_path, Path(out_dir), prompt=request.prompt, seed=request.seed, width=request.width,
                    height=request.height, steps=request.steps, guidance=request.guidance,
                    output_format=request.output_format, lora_path=lora, finetune_id=finetune,
                    strength=request.strength, device=self.device)
        except GpuBusyError as busy:
            raise EngineUnavailableError(
                f"The GPU is training local job {busy}; a generation now would need a second copy of the model "
                "in its memory.", hint="Try again when the training is done, or cancel it on the Train tab.") from None
        except StudioError:
            raise
        except Exception as exc:
            log.exception("Local generation failed")
            raise ProviderError(f"The local engine could not generate the image: {type(exc).__name__}: {exc}"[:400],
                                hint="Check the model and the memory available.") from None
        params = {**params, "model_path": _model_label(base)}
        if finetune:
            params.update({"finetune_id": finetune, "finetune_strength": request.strength})
        return GeneratedImage(path=path, model="local tuned" if finetune else "local base", seed=request.seed,
                              latency_s=params.pop("latency_s"), params=params)

    def publish(self, remote_id: str, repo_id: str, token: Secret, private: bool = True) -> str:
        """Upload the finished LoRA (weights, model card, samples) to a Hub model repo; returns its URL."""
        st = self.status(remote_id)
        if st.state != "ready":
            raise InputError(f"The local fine-tune is {st.state}; only finished ones can be published.")
        from services.providers.local.engine.hub import publish_lora

        url = publish_lora(self._job_dir(remote_id) / "output", repo_id, token, private=private)
        self._update_state(remote_id, hub_url=url)
        return url

    # ------------------------------------------------------------ internals

    def _resolution(self, request: TrainRequest, base: "models.BaseModel") -> int:
        from services.providers.local.engine import tiny as tiny_consts  # no torch import: constants only

        if base.tiny:
            return self.resolution or tiny_consts.TRAIN_RESOLUTION
        return self.resolution or (1024 if request.priority == "high_res_only" else 512)

    def _config(self, request: TrainRequest, base_model: str) -> dict:
        base = models.resolve(base_model)
        tiny = base.tiny
        steps = request.iterations
        resolution = self._resolution(request, base)
        sample_every = self.steps_per_sample if self.steps_per_sample is not None else max(10, steps // 5)
        ckpt_every = self.checkpoint_every if self.checkpoint_every is not None else max(10, steps // 10)
        return {
            "model_path": "",  # resolved by the worker (the tiny model is built there)
            "steps": steps,
            "learning_rate": request.effective_learning_rate() if request.finetune_type == "lora"
            else (request.learning_rate or 1e-4),
            "rank": request.lora_rank,
            "trigger_word": request.trigger_word,
            "resolution": resolution,
            "bucket_step": 16 if tiny else 64,
            "batch_size": 1,
            "seed": 0,
            "guidance": 1.0,
            "max_sequence_length": base.max_sequence_length,
            "gradient_checkpointing": (not tiny) if request.gradient_checkpointing is None
            else bool(request.gradient_checkpointing),
            "sample_every": sample_every,
            "checkpoint_every": ckpt_every,
            "sample_prompt": "",
            "sample_seed": 42,
            # Samples during training: a few steps fewer than a real generation's default.
            "sample_steps": 2 if tiny else min(base.sample_steps, 20),
            "sample_guidance": base.sample_guidance,
            "sample_size": None,
            "base_model_label": base.label,
            "base_model_id": base.repo_id,
            "family": base.family,
            "base_model": base_model,
            "device": self.device,
            # The tiny models need no memory preset on any GPU (and must not need bitsandbytes);
            # "" lets the trainer pick one from the GPU for a real model.
            "memory_preset": "none" if tiny else request.memory_preset,
            "_model": base_model,
            "_finetune_type": request.finetune_type,
        }

    def _folder(self, remote_id: str) -> Path:
        """Where a job's folder is (or goes): the local owner's jobs folder, or a visitor's own."""
        owned = _OWNED_ID_RE.match(remote_id)
        if owned:
            return Path(self.settings.data_dir) / "owners" / owned.group(1) / "local_jobs" / remote_id
        return self.root / remote_id

    def _job_dir(self, remote_id: str) -> Path:
        if not remote_id or not _ID_RE.match(remote_id):
            raise TaskNotFoundError(f"{remote_id!r} is not a local job id.")
        job = self._folder(remote_id)
        if not (job / "state.json").is_file():
            raise TaskNotFoundError(f"The local engine has no job {remote_id} (deleted?).")
        return job

    def _read_state(self, remote_id: str) -> dict:
        job = self._job_dir(remote_id)
        try:
            return json.loads((job / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ProviderError(f"The state of local job {remote_id} can't be read ({exc}).") from None

    def _update_state(self, remote_id: str, **changes) -> None:
        with self._lock:
            job = self._folder(remote_id)
            if not (job / "state.json").is_file():
                return  # deleted meanwhile
            state = json.loads((job / "state.json").read_text(encoding="utf-8"))
            state.update(changes, updated_at=time.time())
            _write_json(job / "state.json", state)

    def _save_losses(self, run: Run) -> None:
        """Append the steps not yet on disk to losses.csv, so the curve survives a restart."""
        with self._lock:
            fresh = run.losses[run.losses_saved:]
            run.losses_saved = len(run.losses)
        if fresh and not run.silenced:
            job = self._folder(run.remote_id)
            try:
                if job.is_dir():
                    with open(job / LOSSES_FILE, "a", encoding="utf-8") as f:
                        f.writelines(loss_lines(fresh))
            except OSError as exc:  # the curve is a nicety: never fail a training run over it
                log.warning("Could not save the loss curve of %s: %s", run.remote_id, exc)

    def _checkpoint(self, remote_id: str) -> Path | None:
        ckpts = self._folder(remote_id) / "checkpoints"
        if not ckpts.is_dir():
            return None
        found = sorted(p for p in ckpts.glob("step_*") if (p / "trainer_state.json").is_file())
        return found[-1] if found else None

    def _enqueue(self, remote_id: str, *, resume: bool) -> None:
        with self._lock:
            if remote_id in self._active:
                return
            run = Run(remote_id, resume=resume, owner=self)
            self._active[remote_id] = run
            self.slot.join_line(run)
            run.thread = threading.Thread(target=self._work, args=(run,), name=f"{THREAD_PREFIX}local-train-{remote_id}",
                                          daemon=True)
            run.thread.start()

    def _work(self, run: Run) -> None:
        """A run's thread: wait for the slot, train, free the memory, hand the slot on."""
        rid = run.remote_id
        trainer = None
        try:
            if not self.slot.acquire(run, _evict):
                return  # cancelled (or the app closed) while it waited: cancel()/close() said so
            with self._lock:
                if run.cancel.is_set() or self._active.get(rid) is not run:
                    return
                run.started = True
                run.live = {"message": "Preparing: encoding the images and captions once…"}
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
            with self._lock:
                if self._active.get(rid) is run:
                    self._active.pop(rid)
            run.done.set()

    def _on_evicted(self, run: Run) -> None:
        """``run`` was cancelled but did not stop within the grace period, and a job waits for the slot."""
        log.warning("Local job %s did not stop within %.0f s of its cancel; the next job takes the engine",
                    run.remote_id, self.slot.grace_s)
        with self._lock:
            self._let_go(run)
            if not run.deleted:
                self._update_state(run.remote_id, state="cancelled", eta_s=None, message=(
                    f"Cancelled. The run did not stop within {self.slot.grace_s:.0f} s, so the engine moved on to "
                    "the next job. Restart the app to resume it from its last checkpoint."))

    def _let_go(self, run: Run) -> None:
        """Stop counting ``run`` as this job's run; its thread, maybe still alive, is remembered so
        that Resume can refuse while it might still write."""
        with self._lock:
            if self._active.get(run.remote_id) is run:
                self._active.pop(run.remote_id)
            self._engine.evicted[run.remote_id] = run

    def _update_run_state(self, run: Run, **changes) -> None:
        """The worker's writes: none once the run was deleted or evicted."""
        with self._lock:
            if not run.silenced:
                self._update_state(run.remote_id, **changes)

    def _train(self, run: Run):
        from services.providers.local.engine import infer
        from services.providers.local.engine.train import config_from_json, pick_device

        rid = run.remote_id
        job = self._folder(rid)
        raw = json.loads((job / "config.json").read_text(encoding="utf-8"))
        cfg = config_from_json(raw)

        def downloading(done: int, total: int) -> None:
            run.live["message"] = f"Downloading the base model: {done / 2**30:.1f} of {total / 2**30:.1f} GB…"

        cfg.model_path = self._model_path(raw.get("_model", self.model), on_progress=downloading)
        if cfg.device is None and self.device:
            cfg.device = self.device
        on_gpu = pick_device(cfg.device).startswith("cuda")
        # One GPU: no generation runs while this trains (it would load a second copy of the model).
        with self.gpu.for_training(rid) if on_gpu else contextlib.nullcontext():
            if on_gpu:
                infer.clear_cache()  # make room for the training copy of the model
            return self._run_trainer(run, cfg, raw, job)

    def _run_trainer(self, run: Run, cfg, raw: dict, job: Path):
        from services.providers.local.engine.train import Callbacks, Trainer

        rid = run.remote_id
        trainer = Trainer(cfg, job / "dataset.zip", job)
        trainer.prepare()
        if run.cancel.is_set() and not run.resume and self._checkpoint(rid) is None:
            # Stopped while preparing: nothing trained yet, nothing to keep. If the app is closing,
            # it stays queued, and the next start trains it from the beginning.
            if run.closing:
                self._update_run_state(run, state="pending", step=0, message="Queued.")
            else:
                self._update_run_state(run, state="cancelled", message="Cancelled before the first step.")
            return trainer
        samples = [f"samples/{p.name}" for p in sorted((job / "samples").glob("step_*.png"))] if run.resume else []
        lora_note = " (the local engine trains LoRAs only)" if raw.get("_finetune_type") == "full" else ""

        def on_step(step: int, total: int, loss: float, eta_s: float | None) -> None:
            if run.silenced:
                return
            msg = run.live.get("message", "")
            if not msg.startswith("Cancelling"):
                msg = f"Training{lora_note}: step {step} of {total}"
            with self._lock:
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
            from services.providers.local.engine.train import checkpoint_step, latest_checkpoint

            ckpt = latest_checkpoint(job / "checkpoints")
            run.live.update(step=checkpoint_step(ckpt) if ckpt else 0, samples=list(samples))
            # The curve goes on from the checkpoint: steps trained after it were thrown away.
            kept = [(st, v) for st, v in read_losses(job) if st <= run.live["step"]]
            write_losses(job, kept)
            run.losses, run.losses_saved = kept, len(kept)
            self._update_run_state(run, resumed_from=run.live["step"])
        result = trainer.run(Callbacks(on_step, on_sample, on_checkpoint, run.cancel), resume=run.resume)
        self._save_losses(run)  # before the state turns final: from then on status() reads the file
        if result.state == "ready":
            self._update_run_state(run, state="ready", step=result.step, total=result.total,
                                   loss=result.losses[-1] if result.losses else None, eta_s=0, samples=samples,
                                   lora_path=f"output/{_lora_file()}", train_seconds=round(result.seconds, 2),
                                   message="Ready: use it on the Compare tab.")
        elif run.closing:  # left as "running" with its checkpoint: the next start offers to resume it
            self._update_run_state(run, step=result.step, eta_s=None, samples=samples,
                                   message=f"Stopped at step {result.step} of {result.total} when the app closed.")
        else:
            self._update_run_state(run, state="cancelled", step=result.step, eta_s=None, samples=samples,
                                   loss=result.losses[-1] if result.losses else None,
                                   message=f"Cancelled at step {result.step} of {result.total}. The checkpoint is "
                                           "kept; resume it any time.")
        return trainer


def _model_label(spec: str) -> str:
    try:
        return models.resolve(spec).label
    except StudioError:
        return spec


def _evict(run: Run) -> None:
    run.owner._on_evicted(run)


def _lora_file() -> str:
    return "pytorch_lora_weights.safetensors"


def _write_json(path: Path, data: dict) -> None:
    atomic.write_json(path, data, indent=1, default=str)
