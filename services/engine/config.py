"""A training run's configuration (what the worker writes to a job's config.json and reads back)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    model_path: str
    steps: int
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
    family: str = "flux1"  # "flux1" | "flux2" (models.FAMILIES): which pipeline and adapter
    base_model: str = ""  # the base model's spec (a models.REGISTRY key, a Hub id or a folder)
    device: str | None = None
    memory_preset: str = ""  # services.engine.memory.PRESETS name; "" = from the GPU (none on the CPU)


def config_from_json(d: dict) -> TrainConfig:
    d = dict(d)
    if d.get("sample_size"):
        d["sample_size"] = tuple(d["sample_size"])
    known = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in d.items() if k in known})
