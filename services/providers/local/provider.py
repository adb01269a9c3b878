"""The local diffusers engine as a ``Provider``: LoRA training and generation on this machine.

The adapter between the tabs' requests and the engine's parts: a job's folder on disk
(``folders.JobFolders``), its run (``worker.Worker``: one training at a time, in launch order) and the
base models (``base_models.BaseModels``). If the app stops mid-run, ``status`` reports the job as
failed but resumable from its last checkpoint, and ``resume`` continues it from there.

torch / diffusers are imported lazily (only in the worker and in ``generate``), so importing
this module is instant and works where the optional extra is not installed.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import threading
from pathlib import Path

from services.config import Secret, Settings
from services.errors import EngineUnavailableError, InputError, ProviderError, StudioError
from services.providers.base import (GeneratedImage, GenerateRequest, Holder, ImportedLora, ProgressFn, ProviderBase,
                                     ProviderInfo, TrainRequest, TrainStatus)
from services.providers.local.base_models import BaseModels, LocalOptions
from services.engine import memory, models
from services.storage import atomic
from services.providers.local.folders import JobFolders
from services.providers.local.imports import LoraImports, is_import_id
from services.providers.local.queue import GPU, SLOT, GpuBusyError, GpuGate, TrainingSlot
from services.providers.local.worker import CLOSE_WAIT_S, DELETE_WAIT_S, Worker

log = logging.getLogger("flux_studio.local")

REQUIRED_MODULES = ("torch", "diffusers", "transformers", "peft", "safetensors")
INSTALL_HINT = ("The local engine needs torch and diffusers: run `pip install -r requirements-local.txt` "
                "(make run does it).")
WAITING = "Waiting for the running local job"
README = "README.md"  # the model card beside a job's LoRA

_EXPORT_LOCKS: dict[str, threading.Lock] = {}
_EXPORT_LOCKS_LOCK = threading.Lock()


def _export_lock(dest: Path) -> threading.Lock:
    """One lock an export file: two requests for it write it once, the second reuses it."""
    with _EXPORT_LOCKS_LOCK:
        return _EXPORT_LOCKS.setdefault(str(dest.resolve()), threading.Lock())


class LocalProvider(ProviderBase):
    key = "local"
    label = "Local engine"
    max_images = 50
    can_resume = True
    can_publish = True
    picks_base_model = True
    queues_training = True
    reports_steps = True
    can_export = True
    imports_loras = True

    def __init__(self, settings: Settings, *, model: str | None = None, steps_per_sample: int | None = None,
                 checkpoint_every: int | None = None, resolution: int | None = None,
                 device: str | None = None, slot: TrainingSlot | None = None, gpu: GpuGate | None = None) -> None:
        self.settings = settings
        self.steps_per_sample = steps_per_sample
        self.checkpoint_every = checkpoint_every
        self.device = device
        self.gpu = gpu or GPU
        self.base_models = BaseModels(settings, model, resolution=resolution, device=device)
        self.folders = JobFolders(settings)
        self.imports = LoraImports(settings)
        self.worker = Worker(self.folders, self.base_models, slot=slot or SLOT, gpu=self.gpu)

    # ------------------------------------------------------------ base models

    @property
    def model(self) -> str:
        return self.base_models.model

    @property
    def is_tiny(self) -> bool:
        """Whether the default model (``FLUX_LOCAL_MODEL``) is the tiny FLUX.1 test model."""
        return self.base_models.is_tiny

    @property
    def model_label(self) -> str:
        return self.base_models.label

    def model_choices(self) -> list[tuple[str, str]]:
        return self.base_models.choices()

    def default_model_choice(self) -> str:
        return self.base_models.default_choice()

    def memory_choices(self) -> list[tuple[str, str]]:
        return [("Auto (from the GPU)", "")] + [(p.label, name) for name, p in memory.PRESETS.items()]

    def check_request(self, request: TrainRequest) -> None:
        """Refuse, before any job is recorded, a base model this engine does not offer, or a training
        this GPU's memory can't hold (never found out as an out-of-memory error halfway through)."""
        self.memory_plan(request).check()

    def memory_plan(self, request: TrainRequest):
        """The request's memory preset, estimated peak and GPU; InputError for a base model not offered."""
        return self.base_models.memory_plan(request)

    def base_model_of(self, finetune_id: str) -> str | None:
        """The base model a local fine-tune was trained on, or an imported LoRA renders on (what its Compare
        base image must use)."""
        try:
            if is_import_id(finetune_id):
                return self.imports.get(finetune_id).base_model
            return self.folders.read_state(finetune_id).get("model", self.model)
        except StudioError:
            return None

    def is_tiny_model(self, spec: str | None) -> bool:
        return self.base_models.is_tiny_model(spec)

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
        base_model = models.check_choice(LocalOptions.of(request).base_model, self.model)
        remote_id = self.folders.new_id(tag, owner)
        with self.folders.lock:
            existing = self.find_by_tag(tag) if tag else None
            if existing:  # submitted already (a retry after a restart): never train twice
                return existing
            config = self.base_models.job_config(request, base_model, steps_per_sample=self.steps_per_sample,
                                                 checkpoint_every=self.checkpoint_every)
            self.folders.create(remote_id, zip_path, config, {
                "tag": tag, "name": request.name, "state": "pending", "step": 0, "total": request.iterations,
                "loss": None, "eta_s": None, "message": "Queued.", "samples": [], "model": base_model,
            }, on_upload)
            self.worker.enqueue(remote_id, resume=False)
        return remote_id

    def status(self, remote_id: str) -> TrainStatus:
        job = self.folders.existing(remote_id)
        with self.folders.lock:  # the run and the state together: a worker finishing in between can't be missed
            run = self.worker.run_of(remote_id)
            live = dict(run.live) if run else None
            losses = tuple(run.losses) if run else ()
            queued = bool(run) and not run.started
            state = self.folders.read_state(remote_id)
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
        losses = self.folders.losses(remote_id)
        s = state.get("state")
        ckpt = self.folders.checkpoint(remote_id)
        if s in ("pending", "running"):  # no worker here: the process that ran it has stopped
            if s == "pending" and ckpt is None and step == 0:
                self.worker.enqueue(remote_id, resume=False)  # it never started: just queue it again
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
                               result={"lora_path": str(self.folders.lora_path(remote_id)), "finetune_id": remote_id})
        if s == "cancelled":
            return TrainStatus("cancelled", progress=step / total if total else None, step=step, loss=loss,
                               samples=samples, losses=losses, message=state.get("message") or "Cancelled.",
                               result={"resumable": ckpt is not None})
        return TrainStatus("failed", step=step or None, loss=loss, samples=samples, losses=losses,
                           message=state.get("message") or "The local training failed.",
                           result={"resumable": False})

    def list_remote(self) -> list[str]:
        """Every local job on this data dir, every owner's (for the app's own restart recovery)."""
        return self.folders.ids()

    def find_by_tag(self, tag: str) -> str | None:
        return self.folders.find_by_tag(tag)

    def cancel(self, remote_id: str) -> None:
        self.folders.existing(remote_id)
        with self.folders.lock:
            if self.worker.cancel(remote_id):
                return
            state = self.folders.read_state(remote_id).get("state")
            if state in ("pending", "running"):  # interrupted by a restart
                self.folders.update_state(remote_id, state="cancelled",
                                          message="Cancelled. The last checkpoint is kept; resume it any time.")

    def resume(self, remote_id: str) -> None:
        """Continue a cancelled or interrupted job from its last checkpoint."""
        self._require_ready()
        self.folders.existing(remote_id)
        self.worker.resume(remote_id)

    def join(self, remote_id: str, timeout: float | None = None) -> bool:
        """Wait until the job's worker thread has finished here; True when it has (or there is none)."""
        return self.worker.join(remote_id, timeout)

    def training_now(self) -> Holder | None:
        return self.worker.training_now()

    def close(self, timeout: float = CLOSE_WAIT_S) -> None:
        """Stop the runs this provider started (they stay resumable) and wait for their threads."""
        self.worker.close(timeout)

    def delete(self, remote_id: str, *, wait_s: float = DELETE_WAIT_S) -> None:
        """Stop the job's run, wait for its thread, then remove its folder; raises (keeping the
        folder) when the run does not stop in time or the folder can't be removed."""
        self.folders.existing(remote_id)
        self.worker.stop(remote_id, wait_s)
        _drop_adapter(remote_id)
        self.folders.remove(remote_id)

    def generate(self, request: GenerateRequest, out_dir: Path, *, finetune: str | None = None,
                 model: str | None = None) -> GeneratedImage:
        self._require_ready()
        if not request.prompt or not request.prompt.strip():
            raise InputError("Type a prompt first.")
        lora = None
        if finetune and is_import_id(finetune):
            lora = self.imports.lora_path(finetune)
            base = model if model is not None else self.imports.get(finetune).base_model
        elif finetune:
            st = self.status(finetune)
            if st.state != "ready":
                raise InputError(f"The local fine-tune {finetune} is {st.state}, not ready.",
                                 hint="Wait for it to finish, or pick another.")
            lora = Path(st.result["lora_path"])
            base = model if model is not None else self.folders.read_state(finetune).get("model", self.model)
        else:
            base = self.model if model is None else model
        from services.engine import infer

        try:
            model_path = self.base_models.folder(base)
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
        params = {**params, "model_path": self.base_models.label_of(base)}
        if finetune:
            params.update({"finetune_id": finetune, "finetune_strength": request.strength})
        return GeneratedImage(path=path, model="local tuned" if finetune else "local base", seed=request.seed,
                              latency_s=params.pop("latency_s"), params=params)

    # ------------------------------------------------------------ LoRA files in and out

    def export_lora(self, finetune_id: str, fmt: str) -> Path:
        """A ready job's LoRA (or an imported one) in ``fmt``, written once beside it (the job's output
        folder, where its model card then lists it) and reused until the LoRA changes."""
        from services.engine import lora_formats as lf
        from services.engine.card import export_filename, with_files
        from services.engine.config import config_from_json, resolve_family

        lf.check_format(fmt)
        if is_import_id(finetune_id):
            record = self.imports.get(finetune_id)
            src, dest_dir = self.imports.lora_path(finetune_id), self.imports.export_dir(finetune_id)
            base = models.resolve(record.base_model)
            info = lf.ExportInfo(family=record.family, base_model=base.repo_id or base.label,
                                 trigger_word=record.trigger_word, rank=record.rank)
        else:
            st = self.status(finetune_id)
            if st.state != "ready":
                raise InputError(f"The local fine-tune {finetune_id} is {st.state}; only finished ones can be "
                                 "exported.", hint="Wait until it is ready.")
            src = self.folders.lora_path(finetune_id)
            dest_dir = src.parent
            cfg = config_from_json(self.folders.read_config(finetune_id))
            cfg.family = resolve_family(cfg)
            info = lf.ExportInfo.from_config(cfg)
        dest = dest_dir / export_filename(fmt, info.family, info.trigger_word)
        with _export_lock(dest):
            if dest.is_file() and dest.stat().st_mtime_ns >= src.stat().st_mtime_ns:
                return dest
            lf.export_lora(src, dest_dir, fmt, info)
            card = dest_dir / README
            if card.is_file():  # the card lists the files the folder holds now
                written = [f for f in lf.EXPORT_FORMATS
                           if (dest_dir / export_filename(f, info.family, info.trigger_word)).is_file()]
                atomic.write_text(card, with_files(card.read_text(encoding="utf-8"), info.family,
                                                   info.trigger_word, written))
        return dest

    def import_lora(self, path: Path, *, owner: str, name: str = "", base_model: str | None = None,
                    source: str = "") -> ImportedLora:
        """Keep a LoRA file made elsewhere for ``owner``. Checked before a byte is copied (its name: never a
        pickle; the size cap; its header: a FLUX LoRA, which family) and again, whole, on the copy (every
        weight read, each layer's shape against the base model's transformer, built empty from its config),
        so a file that can't be rendered is refused here with why, never half-way through a Compare."""
        from services.engine import lora_formats as lf

        path = Path(path)
        self._require_ready()
        # The header only (suffix, size cap, pickle, cut short, a FLUX LoRA of which family): nothing is loaded yet.
        families = lf.inspect_lora(path, max_bytes=lf.MAX_LORA_BYTES).families
        spec = self.base_models.for_lora(families, base_model)
        base = models.resolve(spec)

        def check(copy: Path) -> ImportedLora:
            info, modules = lf.read_lora(copy, family=base.family, max_bytes=lf.MAX_LORA_BYTES)
            config = self.base_models.transformer_config(spec)
            if config is not None:  # else (a Hub model not downloaded yet) the first render checks it
                lf.check_against_config(modules, config)
            label = lf.FAMILY_LABELS[base.family]
            return ImportedLora(id="", name=(name or "").strip()[:100] or path.stem[:100], family=base.family,
                                family_label=label, base_model=spec, base_model_label=base.label,
                                layout=info.layout, rank=info.rank, source=(source or path.name)[:300],
                                trigger_word=str(info.metadata.get("trigger_word", ""))[:40])

        return self.imports.add(owner, path, check, max_bytes=lf.MAX_LORA_BYTES)

    def imported_loras(self, owner: str) -> list[ImportedLora]:
        return self.imports.list(owner)

    def delete_imported(self, lora_id: str) -> None:
        self.imports.existing(lora_id)
        _drop_adapter(lora_id)
        self.imports.remove(lora_id)

    def publish(self, remote_id: str, repo_id: str, token: Secret, private: bool = True) -> str:
        """Upload the finished LoRA (weights, model card, samples) to a Hub model repo; returns its URL."""
        st = self.status(remote_id)
        if st.state != "ready":
            raise InputError(f"The local fine-tune is {st.state}; only finished ones can be published.")
        from services.engine.hub import publish_lora

        url = publish_lora(self.folders.existing(remote_id) / "output", repo_id, token, private=private)
        self.folders.update_state(remote_id, hub_url=url)
        return url


def is_finetune_id(ref: str) -> bool:
    """Local runs are named "local-…" (``folders.JobFolders.new_id``), imported LoRAs "lora-…"
    (``imports.LoraImports.new_id``)."""
    return ref.startswith("local-") or is_import_id(ref)


INFO = ProviderInfo(
    key=LocalProvider.key, label=LocalProvider.label,
    make=LocalProvider,  # cheap: torch and diffusers load on first use
    owns_finetune_id=is_finetune_id,
    options=LocalOptions, choices=frozenset({"base_model", "memory_preset", "gradient_checkpointing"}),
    # Hosted, the engine is one GPU shared by every visitor.
    hosted_job_cap=lambda settings: settings.visitor_max_local_jobs,
)


def _drop_adapter(ref: str) -> None:
    """Unload a deleted job's or import's LoRA from the inference pipeline, where one can be loaded at all."""
    try:
        from services.engine import infer
    except ImportError:  # the engine is not installed: no adapter can be loaded
        return
    infer.drop_adapter(ref)
