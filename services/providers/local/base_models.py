"""The base models the local engine trains on and generates with, and a job's training configuration.

The registry itself (keys, labels, families, sizes) is ``engine.models``; this is the engine's
view of it: the configured default (``FLUX_LOCAL_MODEL``), what a request may pick, whether the
GPU can hold the training, where the model's files are, and the configuration a job is written with.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.config import Settings
from services.errors import InputError, StudioError
from services.providers.base import ProgressFn, TrainOptions, TrainRequest
from services.engine import models

TINY_LABEL = models.BY_KEY[models.TINY_FLUX1].label


@dataclass(frozen=True)
class EngineOptions(TrainOptions):
    """The trainer's own settings (``services.engine``), wherever it runs: this machine or a Hugging Face job."""

    # Recompute activations in the backward pass (much less GPU memory, slower steps).
    # None = automatic: on for real models, off for the tiny test model.
    gradient_checkpointing: bool | None = None
    memory_preset: str = ""  # a services.engine.memory preset name ("" = picked from the GPU)


@dataclass(frozen=True)
class LocalOptions(EngineOptions):
    """The local engine's: the trainer's, and the base model to train on (a key of services.engine.models,
    or the configured FLUX_LOCAL_MODEL); None = the engine's default."""

    base_model: str | None = None


class BaseModels:
    """Which base model a local job uses, whether it fits, and where its files are."""

    def __init__(self, settings: Settings, model: str | None = None, *, resolution: int | None = None,
                 device: str | None = None) -> None:
        self.settings = settings
        self.model = (settings.local_model if model is None else model).strip()
        self.resolution = resolution  # None: from the model and the request's priority
        self.device = device

    @property
    def is_tiny(self) -> bool:
        """Whether the default model (``FLUX_LOCAL_MODEL``) is the tiny FLUX.1 test model."""
        return self.model in ("", "tiny", models.TINY_FLUX1)

    @property
    def label(self) -> str:
        if self.is_tiny:
            return TINY_LABEL
        listed = models.BY_KEY.get(models.default_choice(self.model))
        return listed.label if listed else self.model

    def choices(self) -> list[tuple[str, str]]:
        """(label, value) pairs for the Train tab's base-model picker."""
        return models.choices(self.model)

    def default_choice(self) -> str:
        return models.default_choice(self.model)

    def check_request_model(self, request: TrainRequest) -> str:
        """The spec of the request's base model, if this engine offers it (InputError otherwise).
        Hosted, a visitor may not make the server download another multi-GB model: only the configured
        one (or a tiny test model)."""
        return self.check_model(LocalOptions.of(request).base_model)

    def check_model(self, choice: str | None, doing: str = "trains") -> str:
        """The spec of a picked base model (None: the configured one), if this engine offers it; hosted,
        only the configured one or a tiny test model (never another multi-GB download for a visitor)."""
        spec = models.check_choice(choice, self.model)
        configured = models.default_choice(self.model)
        if self.settings.hosted and spec != configured and not models.resolve(spec).tiny:
            raise InputError(f"This hosted app {doing} on {models.resolve(configured).label} only.",
                             hint="Run the studio on your own machine to pick another base model.")
        return spec

    def for_lora(self, families: tuple[str, ...], choice: str | None = None) -> str:
        """The base model an imported LoRA for one of ``families`` renders on: ``choice`` if given (of its
        family); else the configured one (``FLUX_LOCAL_MODEL``) if it is of that family; else, where the
        configured one is a tiny test model, the tiny model of the LoRA's family; else (not hosted) the
        registry's default of the family (``models.FAMILY_DEFAULTS``, downloaded on first use)."""
        from services.engine.lora_formats import FAMILY_LABELS

        wanted = " or ".join(FAMILY_LABELS[f] for f in families)
        if (choice or "").strip():
            spec = self.check_model(choice, "renders")
            base = models.resolve(spec)
            if base.family not in families:
                raise InputError(f"The LoRA is for {wanted}; {base.label} is a {FAMILY_LABELS[base.family]} model.",
                                 hint="Pick a base model of the LoRA's family, or leave it empty to have it picked.")
            return spec
        configured = models.default_choice(self.model)
        base = models.resolve(configured)
        if base.family in families:
            return configured
        family = families[0]
        if base.tiny:
            return models.TINY_FLUX1 if family == models.FLUX1 else models.TINY_FLUX2
        if self.settings.hosted:
            raise InputError(f"The LoRA is for {wanted}; this hosted app renders with {base.label} only.",
                             hint=f"Import a {FAMILY_LABELS[base.family]} LoRA.")
        return models.FAMILY_DEFAULTS[family].key

    def transformer_config(self, spec: str) -> Path | None:
        """The base model's transformer/config.json where it is on this machine (a tiny model is built for
        it; a Hub model only if its download is in the HF cache already); None otherwise."""
        base = models.resolve(spec)
        if base.tiny or base.path:
            found = Path(self.folder(spec)) / "transformer" / "config.json"
            return found if found.is_file() else None
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base.repo_id, "transformer/config.json")
        except (ImportError, OSError, ValueError):  # a cache problem: the load checks it instead
            return None
        return Path(cached) if isinstance(cached, str) else None

    def memory_plan(self, request: TrainRequest):
        """The memory preset, its estimated peak and the GPU, for the Train tab and the launch check;
        InputError for a base model this engine does not offer."""
        from services.engine import memory

        base = models.resolve(self.check_request_model(request))
        if base.tiny or not base.transformer_params:
            return memory.MemoryPlan(None, None, None)  # the tiny models fit anywhere; unknown ones can't be told
        options = EngineOptions.of(request)
        checkpointing = True if options.gradient_checkpointing is None else bool(options.gradient_checkpointing)
        return memory.plan_memory(base.family, base.transformer_params, self._resolution(request, base),
                                  request.lora_rank, preset_name=options.memory_preset,
                                  gradient_checkpointing=checkpointing, device=None if self.device is None
                                  else ("cuda" if self.device.startswith("cuda") else "cpu"))

    def is_tiny_model(self, spec: str | None) -> bool:
        try:
            return models.resolve(self.model if spec is None else spec).tiny
        except StudioError:
            return False

    def label_of(self, spec: str) -> str:
        try:
            return models.resolve(spec).label
        except StudioError:
            return spec

    def folder(self, model: str | None = None, on_progress: ProgressFn | None = None) -> str:
        """The folder ``from_pretrained`` gets: a tiny model is built on first use, a Hub model is
        downloaded into the HF cache (reused; disk space checked first), a folder is used as is."""
        return models.folder_of(self.model if model is None else model, data_dir=self.settings.data_dir,
                                token=self.settings.hf_token, on_progress=on_progress)

    def _resolution(self, request: TrainRequest, base: models.BaseModel) -> int:
        from services.engine import tiny as tiny_consts  # no torch import: constants only

        if base.tiny:
            return self.resolution or tiny_consts.TRAIN_RESOLUTION
        return self.resolution or (1024 if request.priority == "high_res_only" else 512)

    def job_config(self, request: TrainRequest, base_model: str, *, steps_per_sample: int | None,
                   checkpoint_every: int | None) -> dict:
        """config.json for a new job: engine.train.TrainConfig's fields, plus ``_model`` and
        ``_finetune_type`` for the worker. ``None`` intervals: from the number of steps."""
        base = models.resolve(base_model)
        tiny = base.tiny
        options = EngineOptions.of(request)
        steps = request.iterations
        sample_every = steps_per_sample if steps_per_sample is not None else max(10, steps // 5)
        ckpt_every = checkpoint_every if checkpoint_every is not None else max(10, steps // 10)
        return {
            "model_path": "",  # resolved by the worker (the tiny model is built there)
            "steps": steps,
            "learning_rate": request.effective_learning_rate() if request.finetune_type == "lora"
            else (request.learning_rate or 1e-4),
            "rank": request.lora_rank,
            "trigger_word": request.trigger_word,
            "resolution": self._resolution(request, base),
            "bucket_step": 16 if tiny else 64,
            "batch_size": 1,
            "seed": 0,
            "guidance": 1.0,
            "max_sequence_length": base.max_sequence_length,
            "gradient_checkpointing": (not tiny) if options.gradient_checkpointing is None
            else bool(options.gradient_checkpointing),
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
            "memory_preset": "none" if tiny else options.memory_preset,
            "_model": base_model,
            "_finetune_type": request.finetune_type,
        }
