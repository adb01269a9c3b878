"""A training run's configuration (what the worker writes to a job's config.json and reads back)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    steps: int
    # The folder from_pretrained loads; "" until the command line or the worker resolves the base
    # model's spec (``base_model`` / a config's ``_model``) to one.
    model_path: str = ""
    learning_rate: float = 1e-4
    rank: int = 16
    trigger_word: str = "TOK"
    resolution: int = 512
    bucket_step: int = 64
    batch_size: int = 1
    seed: int = 0
    guidance: float = 1.0  # guidance-embedding value during training (guidance-distilled models)
    max_sequence_length: int = 512
    gradient_checkpointing: bool = False
    sample_every: int = 0  # 0 = only at the end
    checkpoint_every: int = 0  # 0 = only when cancelled
    sample_prompt: str = ""  # empty = the first caption
    sample_seed: int = 42
    sample_steps: int = 28
    sample_guidance: float = 3.5
    sample_size: tuple[int, int] | None = None  # (w, h); None = the first image's bucket
    base_model_label: str = ""  # for the model card
    base_model_id: str = ""  # a Hub repo id for the model card's base_model ("" = none)
    family: str = ""  # "flux1" | "flux2" (models.FAMILIES); "" = from the base model (resolve_family)
    base_model: str = ""  # the base model's spec (a models.REGISTRY key, a Hub id or a folder)
    device: str | None = None
    memory_preset: str = ""  # services.engine.memory.PRESETS name; "" = from the GPU (none on the CPU)
    attention: str = ""  # services.engine.attention.CHOICES key; "" = every kernel but cuDNN's
    precision: str = ""  # "bf16" | "fp32"; "" = bf16 on a CUDA GPU that has it, else fp32 (train.train_dtype)


def config_from_json(d: dict) -> TrainConfig:
    d = dict(d)
    if d.get("sample_size"):
        d["sample_size"] = tuple(d["sample_size"])
    known = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in d.items() if k in known})


def resolve_family(cfg: TrainConfig) -> str:
    """The config's model family: as it names it, else from its base model (a registry key, a Hub id, or a
    folder's model_index.json, as ``models.resolve`` reads them). ``model_path`` (the folder that is
    loaded) is asked first: it is what ``from_pretrained`` will see."""
    if cfg.family:
        return cfg.family
    from services.engine import models
    from services.errors import InputError

    spec = cfg.model_path or cfg.base_model
    if not spec:
        raise InputError("The config names no base model.",
                         hint='Set "_model" (a registry key such as flux1-dev, a Hub id or a folder) or "family".')
    return models.resolve(spec).family
