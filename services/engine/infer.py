"""Image generation with a local FLUX pipeline (FLUX.1 or FLUX.2 [klein]), with or without a trained LoRA.

Pipelines are loaded once per (model path, device) and cached; each has a lock, so one
generation runs on it at a time and the adapter state (which LoRA, at what strength) can't
change under a running call. A base image and a tuned image made with the same prompt, seed,
size, steps and guidance differ only by the LoRA: base disables every adapter, tuned activates
exactly one with ``set_adapters([name], [strength])``. The pipeline class and the defaults
(steps, guidance, prompt length) come from the model's registry entry (``models.resolve``).
"""
from __future__ import annotations

import re
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from services.storage import atomic
from services.engine import lora_formats, models, release_gpu_memory, tiny
from services.engine.families import adapter
from services.engine.train import pick_device, quiet_libraries, train_dtype

MAX_ADAPTERS = 4  # LoRAs kept loaded per pipeline; the least recently used is dropped
REAL_MAX_SIDE = 2048
REAL_MIN_SIDE = 256


@dataclass
class _Entry:
    pipe: object
    lock: threading.Lock = field(default_factory=threading.Lock)
    adapters: OrderedDict = field(default_factory=OrderedDict)  # name -> (lora path, mtime)
    model: models.BaseModel = field(default_factory=lambda: models.BY_KEY[models.TINY_FLUX1])

    @property
    def is_tiny(self) -> bool:
        return self.model.tiny


_PIPES: dict[tuple[str, str], _Entry] = {}
_PIPES_LOCK = threading.Lock()  # guards the two dicts only; never held while a model loads
_LOADING: dict[tuple[str, str], threading.Lock] = {}  # one per model: a multi-GB load blocks only its own users


def get_pipeline(model_path: str, device: str | None = None) -> _Entry:
    """The cached pipeline for ``model_path`` on ``device``, loaded on first use."""
    quiet_libraries()
    device = pick_device(device)
    key = (str(model_path), device)
    with _PIPES_LOCK:
        entry = _PIPES.get(key)
        if entry is not None:
            return entry
        loading = _LOADING.setdefault(key, threading.Lock())
    with loading:
        with _PIPES_LOCK:
            entry = _PIPES.get(key)
        if entry is None:  # the first caller loads; the others waited above and find it
            entry = _load(model_path, device)
            with _PIPES_LOCK:
                _PIPES[key] = entry
    return entry


def _load(model_path: str, device: str) -> _Entry:
    model = models.resolve(str(model_path))
    pipe = adapter(model.family).pipeline_class().from_pretrained(str(model_path), dtype=train_dtype(device))
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return _Entry(pipe, model=model)


def clear_cache() -> None:
    """Forget every cached pipeline (frees the memory once no generation holds one)."""
    with _PIPES_LOCK:
        _PIPES.clear()
    release_gpu_memory()


def drop_adapter(finetune_id: str) -> None:
    """Unload a fine-tune's LoRA from every cached pipeline (it was deleted)."""
    name = adapter_name(finetune_id)
    with _PIPES_LOCK:
        entries = list(_PIPES.values())
    for entry in entries:
        with entry.lock:
            if name in entry.adapters:
                entry.pipe.delete_adapters([name])
                entry.adapters.pop(name, None)


def round_size(width: int, height: int, multiple: int, *, max_side: int, min_side: int) -> tuple[int, int]:
    """Scale (keeping the aspect ratio) so the sides fit [min_side, max_side], then round to ``multiple``."""
    width, height = max(1, int(width)), max(1, int(height))
    scale = 1.0
    if max(width, height) > max_side:
        scale = max_side / max(width, height)
    elif min(width, height) < min_side:
        scale = min(min_side / min(width, height), max_side / max(width, height))
    cap = max(multiple, max_side // multiple * multiple)
    w = min(cap, max(multiple, round(width * scale / multiple) * multiple))
    h = min(cap, max(multiple, round(height * scale / multiple) * multiple))
    return w, h


def adapter_name(finetune_id: str) -> str:
    return "ft_" + re.sub(r"[^A-Za-z0-9_]", "_", finetune_id)[:60]


def _activate(entry: _Entry, lora_path: Path | None, name: str | None, strength: float) -> None:
    pipe = entry.pipe
    if lora_path is None:
        if entry.adapters:
            pipe.disable_lora()
        return
    mtime = lora_path.stat().st_mtime_ns
    known = entry.adapters.get(name)
    if known is not None and known != (str(lora_path), mtime):  # retrained since: reload it
        pipe.delete_adapters([name])
        entry.adapters.pop(name)
        known = None
    if known is None:
        while len(entry.adapters) >= MAX_ADAPTERS:
            old, _ = entry.adapters.popitem(last=False)
            pipe.delete_adapters([old])
        # Any layout (diffusers, kohya, BFL), checked against this model first; nothing is left on failure.
        lora_formats.load_into(pipe, lora_path, name, family=entry.model.family)
        entry.adapters[name] = (str(lora_path), mtime)
    entry.adapters.move_to_end(name)
    pipe.enable_lora()
    pipe.set_adapters([name], [float(strength)])


def generate(model_path: str, out_dir: Path, *, prompt: str, seed: int, width: int, height: int,
             steps: int | None = None, guidance: float | None = None, output_format: str = "png",
             lora_path: Path | None = None, finetune_id: str | None = None, strength: float = 1.0,
             device: str | None = None) -> tuple[Path, dict]:
    """Generate one image, save it under ``out_dir`` at once; returns (path, the parameters used)."""
    import torch

    entry = get_pipeline(model_path, device)
    pipe, model = entry.pipe, entry.model
    multiple = pipe.vae_scale_factor * 2
    if model.tiny:
        w, h = round_size(width, height, multiple, max_side=tiny.MAX_GENERATE_SIDE, min_side=multiple * 8)
    else:
        w, h = round_size(width, height, multiple, max_side=REAL_MAX_SIDE, min_side=REAL_MIN_SIDE)
    steps = steps or model.sample_steps
    max_seq = model.max_sequence_length
    if guidance is None:
        guidance = model.sample_guidance
    steps = max(1, min(int(steps), 100))
    started = time.monotonic()
    with entry.lock:
        _activate(entry, Path(lora_path) if lora_path else None,
                  adapter_name(finetune_id or str(lora_path)) if lora_path else None, strength)
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        image = pipe(prompt=prompt, width=w, height=h, num_inference_steps=steps, guidance_scale=float(guidance),
                     max_sequence_length=max_seq, generator=gen).images[0]
    latency = time.monotonic() - started
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jpeg = output_format in ("jpeg", "jpg")
    path = out_dir / f"local-{uuid.uuid4().hex[:12]}.{'jpg' if jpeg else 'png'}"
    with atomic.replacing(path) as tmp:
        if jpeg:
            image.convert("RGB").save(tmp, "JPEG", quality=95)
        else:
            image.save(tmp, "PNG")
    params = {"prompt": prompt, "seed": int(seed), "width": w, "height": h, "steps": steps,
              "guidance": float(guidance), "output_format": "jpeg" if jpeg else "png", "latency_s": latency}
    if lora_path:
        params["strength"] = float(strength)
    return path, params
