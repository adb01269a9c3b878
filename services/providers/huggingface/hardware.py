"""Which Hugging Face Jobs machines a fine-tune fits on, and what it is expected to take and cost there.

The catalogue is ``HfApi.list_jobs_hardware`` (names, GPUs, prices), cached for ``CATALOGUE_TTL_S``.
Whether a training fits is the local engine's own memory estimate (``engine.memory``) for the GPU's
memory, with the preset it would pick there. The time is

    setup (install + base-model download + loading, stated constants)
    + iterations x FLOPs per step / (the GPU's peak dense bf16 FLOP/s x an assumed MFU)
    + the samples pushed during training,

and the cost is that time at the flavour's price. Every figure here is stated with its source;
the MFU is an assumption until ``benchmarks/local_train_gpu.py`` has measured it on these GPUs.
"""
from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.providers.base import CostEstimate, HardwareOption
from services.engine import memory

# Peak dense bf16 tensor throughput, TFLOP/s without sparsity, by JobAccelerator.model. NVIDIA datasheets:
# L4 242 and L40S 733 "with sparsity" (halved here), A100 312, H100 SXM / H200 989 (the figures
# benchmarks/local_train_gpu.py uses). The A10G has no public NVIDIA datasheet: 70 is the figure quoted for
# AWS's part (the A10's datasheet says 125); the lower one, so its estimate errs long and dear.
PEAK_BF16_TFLOPS: dict[str, float] = {"A10G": 70.0, "L4": 121.0, "L40S": 362.0, "A100": 312.0,
                                      "H100": 989.0, "H200": 989.0}
# GPUs without bf16 tensor cores (Turing): the trainer's bf16 model would crawl or fail there.
NO_BF16 = frozenset({"T4"})
# Model FLOPs of one LoRA step (forward + backward, rank 16; rank 32 adds well under 1 %), counted exactly by
# benchmarks/local_train_gpu.py on the meta device (benchmarks/README-gpu.md), by base model (engine.models'
# keys) and resolution.
FLOPS_PER_STEP: dict[str, dict[int, float]] = {
    "flux1-dev": {512: 44.7e12, 1024: 163.9e12},
    "flux1-schnell": {512: 44.7e12, 1024: 163.9e12},  # the same transformer
    "flux2-klein-base-4b": {512: 21.1e12, 1024: 76.3e12},
    "flux2-klein-base-9b": {512: 46.7e12, 1024: 162.4e12},
}
# Assumed model-FLOPs utilisation of a step, recomputation under gradient checkpointing not counted.
# bf16 at 1024 px: the benchmark's H100 target (>= 35 % without checkpointing) less the ~1/3 more work that
# checkpointing recomputes, ~25 %; at 512 px the sequence is short and the per-block modulation weighs more:
# 15 % (the benchmark's 512 px target, 0.6 s/step on an H100, is 7.5 %, a ceiling, not a forecast).
MFU_BF16: dict[int, float] = {512: 0.15, 1024: 0.25}
# NF4 weights are dequantised at every matmul. HF's FLUX QLoRA write-up trains NF4 at 512x768 in ~3.5 s/step on
# an RTX 4090 (about 65 TFLOP a step at 165 TFLOP/s peak: ~11 % MFU), ~2/3 of the bf16 figure above.
QUANTISED_MFU_FACTOR = 0.65
# Setup before the first step: `uv run` installs torch, diffusers & co. (~3 GB of wheels), the base model is
# downloaded inside HF's network, then loaded and the captions encoded. Assumptions, not measurements.
INSTALL_S = 180.0
DOWNLOAD_BYTES_PER_S = 200e6
LOAD_AND_CACHE_S = 120.0
# The host RAM the trainer needs to load FLUX.1's components (T5-XXL alone is 9.5 GB in bf16, and a
# transformer shard is ~10 GB while it is quantised or moved): a 15 GB machine is refused.
MIN_RAM_GB = 24.0
CATALOGUE_TTL_S = 600.0
PER_HOUR = {"second": 3600.0, "minute": 60.0, "hour": 1.0}


@dataclass(frozen=True)
class Machine:
    """One single-GPU flavour from the catalogue."""

    name: str
    label: str
    gpu: str  # the accelerator's model, e.g. "A100"
    vram_gb: float  # one GPU's nominal memory
    ram_gb: float
    usd_per_hour: float


@dataclass(frozen=True)
class Workload:
    """What a training asks of a machine (from the request and the base model)."""

    model: str  # the base model's engine.models key
    family: str
    transformer_params: float
    download_bytes: int
    resolution: int
    rank: int
    iterations: int
    samples: int  # images generated (and pushed) during training
    sample_steps: int
    memory_preset: str  # "" = the one the GPU's memory picks


def _gb(text: str | None) -> float:
    match = re.search(r"([\d.]+)\s*(GB|GiB|TB)?", str(text or ""))
    if not match:
        return 0.0
    value = float(match.group(1))
    return value * 1024 if (match.group(2) or "").upper() == "TB" else value


def machines(hardware: list) -> list[Machine]:
    """The single-GPU flavours of ``list_jobs_hardware``'s answer. A multi-GPU flavour is left out: the
    trainer uses one GPU, and the others would be billed for nothing."""
    out = []
    for hw in hardware:
        acc = getattr(hw, "accelerator", None)
        if acc is None or str(getattr(acc, "type", "gpu")).lower() != "gpu":
            continue
        try:
            quantity = int(str(acc.quantity).strip() or "1")
        except ValueError:
            continue
        if quantity != 1:
            continue
        per_hour = float(hw.unit_cost_usd) * PER_HOUR.get(str(hw.unit_label).lower().rstrip("s"), 0.0)
        if per_hour <= 0:
            continue
        vram = _gb(acc.vram)
        label = f"{acc.manufacturer} {acc.model} · {vram:g} GB".strip()
        out.append(Machine(hw.name, label, str(acc.model).upper(), vram, _gb(hw.ram), per_hour))
    return out


def fit(machine: Machine, work: Workload) -> tuple[bool, memory.MemoryPreset | None, str]:
    """(fits, the memory preset it trains with, a note: why not, or the preset)."""
    if machine.gpu in NO_BF16:
        return False, None, f"the {machine.gpu} has no bf16 support"
    if machine.ram_gb and machine.ram_gb < MIN_RAM_GB:
        return False, None, f"{machine.ram_gb:g} GB of RAM is too little to load the base model"
    usable = machine.vram_gb * memory.NOMINAL_TO_USABLE
    preset = memory.preset_named(work.memory_preset) if work.memory_preset else memory.pick_preset(usable)
    estimate = memory.estimate_training_memory(work.family, work.transformer_params, preset, work.resolution,
                                               work.rank, gradient_checkpointing=True)
    if estimate.peak_gb > usable:
        return False, preset, f"needs about {estimate.peak_gb:.0f} GB with the {preset.label} preset"
    return True, preset, f"{preset.label} preset, about {estimate.peak_gb:.0f} GB"


def flops_per_step(model: str, resolution: int) -> float | None:
    """Counted FLOPs at 512 and 1024 px; at another size, linear in the image's token count."""
    table = FLOPS_PER_STEP.get(model)
    if not table:
        return None
    if resolution in table:
        return table[resolution]
    (r0, f0), (r1, f1) = sorted(table.items())
    t0, t1, t = (r0 / 16) ** 2, (r1 / 16) ** 2, (resolution / 16) ** 2
    return f0 + (f1 - f0) * (t - t0) / (t1 - t0)


def mfu(resolution: int, quantised: bool) -> float:
    base = MFU_BF16[min(MFU_BF16, key=lambda r: abs(r - resolution))]
    return base * (QUANTISED_MFU_FACTOR if quantised else 1.0)


def setup_seconds(work: Workload) -> float:
    return INSTALL_S + work.download_bytes / DOWNLOAD_BYTES_PER_S + LOAD_AND_CACHE_S


def seconds(machine: Machine, work: Workload, preset: memory.MemoryPreset | None) -> float | None:
    """Expected wall time of the job on ``machine``; None where this GPU's speed is not known."""
    peak = PEAK_BF16_TFLOPS.get(machine.gpu)
    step = flops_per_step(work.model, work.resolution)
    if peak is None or step is None:
        return None
    rate = peak * 1e12 * mfu(work.resolution, bool(preset and preset.quantized))
    # A sample is ``sample_steps`` forward passes, each about half a training step (which is ~2 forwards).
    sampling = work.samples * work.sample_steps * step / 2
    return setup_seconds(work) + (work.iterations * step + sampling) / rate


def duration(s: float) -> str:
    minutes = max(1, round(s / 60))
    return f"{minutes} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def cost_estimate(machine: Machine, work: Workload, preset: memory.MemoryPreset | None) -> CostEstimate | None:
    s = seconds(machine, work, preset)
    if s is None:
        return None
    usd = s / 3600 * machine.usd_per_hour
    gpu = machine.label.split(" · ")[0]
    return CostEstimate(machine.name, s, usd, f"about {duration(s)} on {gpu} ({machine.name}, "
                                              f"${machine.usd_per_hour:.2f}/h): about ${usd:.2f}")


def options(catalogue: list[Machine], work: Workload) -> list[HardwareOption]:
    """Every single-GPU machine, those that fit first, then by what this training would cost there
    (by the hour where its speed is unknown): a faster card often costs less in all."""
    rows = []
    for m in catalogue:
        fits, preset, note = fit(m, work)
        est = cost_estimate(m, work, preset) if fits else None
        total = est.usd if est else float("inf")
        rows.append(((not fits, total, m.usd_per_hour), HardwareOption(m.name, m.label, m.usd_per_hour, fits, note)))
    return [opt for _, opt in sorted(rows, key=lambda r: r[0])]


class Catalogue:
    """``list_jobs_hardware`` as ``Machine``s, fetched at most once per ``ttl`` seconds."""

    def __init__(self, fetch: Callable[[], list], *, ttl: float = CATALOGUE_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Machine]] | None = None

    def get(self) -> list[Machine]:
        with self._lock:
            if self._cached and self._clock() - self._cached[0] < self._ttl:
                return self._cached[1]
        found = machines(list(self._fetch()))
        with self._lock:
            self._cached = (self._clock(), found)
        return found
