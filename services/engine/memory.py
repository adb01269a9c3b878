"""Memory presets for LoRA training at real scale, and an estimate of the peak GPU memory they need.

A preset says how the base model is held (bf16, or quantised by bitsandbytes), which optimizer
runs, whether gradient checkpointing is forced on, where the text encoders run while captions are
cached, and the largest training resolution. ``resolve_preset`` picks one from the GPU's memory
(or by name); ``estimate_training_memory`` says how much it needs; ``check_fits`` refuses a launch
that would not fit, before anything is loaded, so that it is never found out as an OOM halfway.

Sizes are GiB (2**30 bytes), written "GB" as torch and nvidia-smi users read them.

The estimate (documented in ``estimate_training_memory``) was calibrated on published anchors for
FLUX.1-dev (11.9 B transformer parameters), checked in tests/test_memory.py:
  * Hugging Face, "(LoRA) Fine-Tuning FLUX.1-dev on Consumer Hardware" (2025): 512 px, rank 4,
    8-bit AdamW, gradient checkpointing, cached latents: NF4 QLoRA peaks at ~9 GB, bf16 LoRA ~26 GB.
  * SimpleTuner's FLUX quickstart, rank 16 (512 and 1024 px buckets, gradient checkpointing; taken
    at 1024 px): ~30 GB unquantised, ~18 GB int8, ~13 GB int4, ~9 GB NF4.
Both measured training with the embeddings cached beforehand, so they are compared with the
training phase. SimpleTuner's int4 (13 GB) and NF4 (9 GB) differ by 4 GB for the same bits per
weight, so no single model meets both closely; this one is within 19 % of every anchor.

torch, bitsandbytes and diffusers are imported lazily, inside the functions that need them.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

from services.errors import InputError

log = logging.getLogger("flux_studio.local_engine")

GIB = 2**30

# Bytes per transformer parameter as stored on the GPU. NF4: 4 bits plus one fp32 absmax per
# 64-weight block (bitsandbytes' default), 0.5 + 4/64 ≈ 0.56. int8: one byte, per-row scales are noise.
WEIGHT_BYTES = {"bf16": 2.0, "int8": 1.0, "nf4": 0.56}
# Trainable LoRA parameters are fp32 (weights 4 B + grads 4 B) and AdamW keeps two fp32 moments (8 B).
# 8-bit AdamW keeps 2 B instead, but the estimate always counts 8 B: at rank 32 the difference is
# under 0.2 GB, and it keeps the estimate right when make_optimizer falls back to torch's AdamW.
LORA_BYTES_PER_PARAM = 4 + 4 + 8
# Activations kept for backward, in bytes per sequence token per transformer parameter. With
# gradient checkpointing each block keeps its input (one hidden-size tensor) plus one block's
# recomputation at a time: fitted to the anchors above. Without it a block keeps ~25 hidden-size
# tensors (q, k, v, attention output, MLP in/out, norms, LoRA inputs): 16x, from counting the
# tensors, not from an anchor.
ACTIVATION_BYTES_CHECKPOINTED = 4.0e-5
ACTIVATION_BYTES_FULL = 16 * ACTIVATION_BYTES_CHECKPOINTED
# The fixed part: CUDA context, cuBLAS workspace, allocator fragmentation, VAE decoder, small buffers.
OVERHEAD_GB = 2.0
# VAE encode/decode activations of one image, per megapixel (bf16, untiled): counted for the
# caching phase and for the sample images made during training.
VAE_GB_PER_MEGAPIXEL = 2.5
VAE_PARAMS = 84e6
# Image tokens: the VAE downsamples 8x and the transformer packs 2x2 latent patches.
PIXELS_PER_TOKEN_SIDE = 16
# A card's usable memory is a little under its nominal size (a 24 GB card shows ~23.6 GB).
NOMINAL_TO_USABLE = 0.9
# Lower training resolutions check_fits suggests, largest first.
FALLBACK_RESOLUTIONS = (768, 512, 384)


@dataclass(frozen=True)
class Family:
    """What the estimate needs to know about a model family beyond its parameter count."""

    name: str
    text_tokens: int  # text sequence length during training (max_sequence_length)
    text_encoder_params: float  # what sits on the GPU while captions are encoded (if it does)
    # LoRA parameters per rank per transformer parameter, for the attention targets in train.py:
    # FLUX.1-dev has 19 double blocks x 8 and 38 single blocks x 3 projections of 3072 -> 3072,
    # so (152 + 114) x 6144 = 1.634 M per rank (rank 4 on q/k/v/out only gives HF's 4.67 M).
    lora_params_per_rank_per_param: float


_FLUX1_LORA = 1.634e6 / 11.9e9
FAMILIES = {
    # T5-XXL encoder (4.76 B) + CLIP-L (0.12 B).
    "flux1": Family("flux1", text_tokens=512, text_encoder_params=4.88e9, lora_params_per_rank_per_param=_FLUX1_LORA),
    # FLUX.2 [klein] 4B: a Qwen3 4B text encoder; the LoRA share is taken as FLUX.1's (under 3 % of the total).
    "flux2": Family("flux2", text_tokens=512, text_encoder_params=4.02e9, lora_params_per_rank_per_param=_FLUX1_LORA),
}


@dataclass(frozen=True)
class MemoryPreset:
    name: str
    label: str
    nominal_gb: int  # the card size it is for; auto-picked from NOMINAL_TO_USABLE x this
    weights: str  # a WEIGHT_BYTES key
    optimizer: str  # "adamw" | "adamw8bit"
    # True forces it on; None leaves the job's own setting (the Train tab's "auto" is on for real models).
    gradient_checkpointing: bool | None
    # The text encoders run on the CPU while captions are cached: a quantised transformer is on the
    # GPU from the moment it is loaded, and T5-XXL (9 GB in bf16) would not fit beside it.
    encoders_on_cpu: bool
    max_resolution: int | None
    summary: str

    @property
    def quantized(self) -> bool:
        return self.weights != "bf16"


# Largest first. Every quantised preset uses bitsandbytes (NF4 weights, 8-bit AdamW): one package to
# install, and NF4 QLoRA is the recipe the anchors above measured. int8 would fit 24 GB too, but
# bitsandbytes' int8 matmul is several times slower to train through, and torchao's int8 support in
# peft has broken across releases; WEIGHT_BYTES and quantization_config still know "int8".
PRESETS: dict[str, MemoryPreset] = {p.name: p for p in (
    MemoryPreset("bf16", "bf16 (48 GB)", 48, "bf16", "adamw", None, False, None,
                 "full bf16 model, AdamW"),
    MemoryPreset("24gb", "24 GB", 24, "nf4", "adamw8bit", True, False, None,
                 "4-bit NF4 base model, 8-bit AdamW, gradient checkpointing"),
    MemoryPreset("16gb", "16 GB", 16, "nf4", "adamw8bit", True, True, None,
                 "4-bit NF4 base model, 8-bit AdamW, gradient checkpointing, text encoders on the CPU"),
    MemoryPreset("12gb", "12 GB", 12, "nf4", "adamw8bit", True, True, 512,
                 "4-bit NF4 base model, 8-bit AdamW, gradient checkpointing, text encoders on the CPU, "
                 "at most 512 px"),
)}
SMALLEST = list(PRESETS.values())[-1]
NO_PRESET = "none"  # TrainConfig.memory_preset for a model that needs none (the tiny test model)


# --------------------------------------------------------------------------- the GPU


@dataclass(frozen=True)
class GpuMemory:
    name: str
    total_gb: float
    free_gb: float | None  # only where CUDA is already initialised (asking creates a context)


def detect_gpu(index: int = 0) -> GpuMemory | None:
    """The CUDA GPU's memory, or None without one (or without torch)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(index)
    free = None
    if torch.cuda.is_initialized():
        free = torch.cuda.mem_get_info(index)[0] / GIB
    return GpuMemory(props.name, props.total_memory / GIB, free)


def pick_preset(gpu_gb: float) -> MemoryPreset:
    """The largest preset meant for this much memory; the smallest one below that (check_fits decides)."""
    for preset in PRESETS.values():
        if gpu_gb >= preset.nominal_gb * NOMINAL_TO_USABLE:
            return preset
    return SMALLEST


def preset_named(name: str) -> MemoryPreset:
    key = (name or "").strip().lower().replace(" ", "")
    if key in PRESETS:
        return PRESETS[key]
    raise InputError(f"There is no memory preset called {name!r}.",
                     hint=f"Use one of {', '.join(PRESETS)}, or leave it empty to pick from the GPU.")


def resolve_preset(name: str, device: str, gpu: GpuMemory | None = None) -> MemoryPreset | None:
    """The preset a training on ``device`` uses: ``name``, or (empty / "auto") the GPU's size.

    None on the CPU, and for "none" (the tiny test model, which needs no saving on any GPU):
    presets are about GPU memory, and bitsandbytes needs CUDA.
    """
    name = (name or "").strip()
    if name.lower() == NO_PRESET:
        return None
    if not str(device).startswith("cuda"):
        if name and name.lower() != "auto":
            raise InputError(f"The memory preset {name!r} is for CUDA GPUs; this machine trains on the CPU.",
                             hint="Leave the memory preset empty.")
        return None
    if name and name.lower() != "auto":
        return preset_named(name)
    gpu = gpu or detect_gpu()
    return pick_preset(gpu.total_gb) if gpu else None


def training_resolution(preset: MemoryPreset | None, requested: int) -> int:
    if preset is None or preset.max_resolution is None:
        return requested
    return min(requested, preset.max_resolution)


def checkpointing_for(preset: MemoryPreset | None, requested: bool) -> bool:
    """Gradient checkpointing as the preset forces it, else as the job asked."""
    if preset is None or preset.gradient_checkpointing is None:
        return requested
    return preset.gradient_checkpointing


# --------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak GPU memory of one training, by phase (GB). ``peak_gb`` is what must fit."""

    preset: str
    family: str
    transformer_params: float
    resolution: int  # after the preset's cap
    rank: int
    batch: int
    gradient_checkpointing: bool
    text_tokens: int
    weights_gb: float
    lora_gb: float
    activations_gb: float
    overhead_gb: float
    caching_gb: float  # while images and captions are encoded, before the first step
    sampling_gb: float  # while a sample image is made between steps

    @property
    def training_gb(self) -> float:
        return self.weights_gb + self.lora_gb + self.activations_gb + self.overhead_gb

    @property
    def peak_gb(self) -> float:
        return max(self.training_gb, self.caching_gb, self.sampling_gb)


def family_of(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise InputError(f"Unknown model family {name!r}.", hint=f"Use one of {', '.join(FAMILIES)}.") from None


def _preset(preset: MemoryPreset | str | None) -> MemoryPreset:
    if preset is None:
        return PRESETS["bf16"]
    return preset if isinstance(preset, MemoryPreset) else preset_named(preset)


def estimate_training_memory(family: str, transformer_params: float, preset: MemoryPreset | str | None,
                             resolution: int, rank: int, batch: int = 1, *, gradient_checkpointing: bool = True,
                             text_tokens: int | None = None) -> MemoryEstimate:
    """Peak GPU memory (GB) of LoRA training with ``preset`` (None: the bf16 one).

    training = weights + LoRA + activations + overhead, where
      weights      = params x WEIGHT_BYTES[preset.weights]
      LoRA         = rank x family.lora_params_per_rank_per_param x params x 16 B (fp32 weight, grad, AdamW)
      activations  = batch x ((resolution/16)^2 + text tokens) x params x ACTIVATION_BYTES_* (with/without
                     gradient checkpointing)
      overhead     = OVERHEAD_GB
    caching  = overhead + the quantised transformer (bitsandbytes puts it on the GPU as it loads) + the
               text encoders unless the preset runs them on the CPU + the VAE and one image's encode
    sampling = overhead + weights + LoRA + one image's VAE decode (the step's activations are freed)
    """
    p = _preset(preset)
    fam = family_of(family)
    params = float(transformer_params)
    res = training_resolution(p, int(resolution))
    ckpt = checkpointing_for(p, gradient_checkpointing)
    tokens_per_image = (res / PIXELS_PER_TOKEN_SIDE) ** 2 + (fam.text_tokens if text_tokens is None else text_tokens)
    weights = params * WEIGHT_BYTES[p.weights] / GIB
    lora = rank * fam.lora_params_per_rank_per_param * params * LORA_BYTES_PER_PARAM / GIB
    per_token = ACTIVATION_BYTES_CHECKPOINTED if ckpt else ACTIVATION_BYTES_FULL
    activations = max(1, batch) * tokens_per_image * params * per_token / GIB
    vae_image = VAE_GB_PER_MEGAPIXEL * res * res / 1e6
    vae_weights = VAE_PARAMS * 2 / GIB
    caching = (OVERHEAD_GB + (weights if p.quantized else 0.0) + vae_weights + vae_image
               + (0.0 if p.encoders_on_cpu else fam.text_encoder_params * 2 / GIB))
    sampling = OVERHEAD_GB + weights + lora + vae_image
    return MemoryEstimate(
        preset=p.name, family=fam.name, transformer_params=params, resolution=res, rank=rank, batch=max(1, batch),
        gradient_checkpointing=ckpt, text_tokens=fam.text_tokens if text_tokens is None else text_tokens,
        weights_gb=weights, lora_gb=lora, activations_gb=activations, overhead_gb=OVERHEAD_GB,
        caching_gb=caching, sampling_gb=sampling,
    )


def _again(estimate: MemoryEstimate, preset: MemoryPreset, resolution: int | None = None) -> MemoryEstimate:
    return estimate_training_memory(
        estimate.family, estimate.transformer_params, preset, resolution or estimate.resolution, estimate.rank,
        estimate.batch, gradient_checkpointing=estimate.gradient_checkpointing, text_tokens=estimate.text_tokens)


def check_fits(preset: MemoryPreset | str | None, estimate: MemoryEstimate, gpu_gb: float | None) -> None:
    """Refuse, before anything is loaded, a training that would not fit in ``gpu_gb`` (None: no GPU, no check).

    The hint names what would fit: a smaller preset at the same resolution, or this preset at a lower one.
    """
    if gpu_gb is None or estimate.peak_gb <= gpu_gb:
        return
    p = _preset(preset)
    names = list(PRESETS)
    smaller = [PRESETS[n] for n in names[names.index(p.name) + 1:]] if p.name in PRESETS else []
    options: list[str] = []
    for other in smaller:
        if _again(estimate, other).peak_gb <= gpu_gb:
            options.append(f"pick the {other.label} preset")
            break
    lower = [r for r in FALLBACK_RESOLUTIONS if r < estimate.resolution]
    for res in lower:
        if _again(estimate, p, res).peak_gb <= gpu_gb:
            options.append(f"lower the resolution to {res} px")
            break
    message = (f"The {p.label} memory preset needs about {estimate.peak_gb:.1f} GB at {estimate.resolution} px; "
               f"your GPU has {gpu_gb:.1f} GB.")
    if options:
        hint = " or ".join(options) + "."
        hint = hint[0].upper() + hint[1:]
    else:
        least = _again(estimate, SMALLEST, min([estimate.resolution, *FALLBACK_RESOLUTIONS]))
        hint = (f"Even the {SMALLEST.label} preset at {least.resolution} px needs about {least.peak_gb:.1f} GB: "
                "train on a GPU with more memory.")
    raise InputError(message, hint=hint)


@dataclass(frozen=True)
class MemoryPlan:
    """What the Train tab shows before a launch: the preset, its estimate, and the GPU."""

    preset: MemoryPreset | None  # None: no CUDA GPU (the CPU trains the tiny model only)
    estimate: MemoryEstimate | None
    gpu: GpuMemory | None

    def summary(self) -> str:
        if self.preset is None or self.estimate is None or self.gpu is None:
            return "No CUDA GPU: memory presets do not apply."
        e = self.estimate
        fits = "fits" if e.peak_gb <= self.gpu.total_gb else "does NOT fit"
        return (f"Memory preset {self.preset.label}: {self.preset.summary}. About {e.peak_gb:.1f} GB at "
                f"{e.resolution} px, rank {e.rank}; {self.gpu.name} has {self.gpu.total_gb:.1f} GB ({fits}).")

    def check(self) -> None:
        if self.preset is not None and self.estimate is not None and self.gpu is not None:
            check_fits(self.preset, self.estimate, self.gpu.total_gb)


def plan_memory(family: str, transformer_params: float, resolution: int, rank: int, batch: int = 1, *,
                preset_name: str = "", gradient_checkpointing: bool = True,
                gpu: GpuMemory | None = None, device: str | None = None) -> MemoryPlan:
    """Preset + estimate for this GPU (detected unless given). ``device`` "cpu" forces the no-GPU plan."""
    if gpu is None and device != "cpu":
        gpu = detect_gpu()
    if device is None:
        device = "cuda" if gpu is not None else "cpu"
    preset = resolve_preset(preset_name, device, gpu)
    if preset is None or gpu is None:
        return MemoryPlan(None, None, gpu)
    estimate = estimate_training_memory(family, transformer_params, preset, resolution, rank, batch,
                                        gradient_checkpointing=gradient_checkpointing)
    return MemoryPlan(preset, estimate, gpu)


# --------------------------------------------------------------------------- what the trainer calls


def _require(package: str, preset: MemoryPreset, what: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise InputError(f"The {preset.label} memory preset {what} with {package}, which is not installed.",
                         hint=f"Install it (pip install {package}; it needs a CUDA GPU), or pick a preset "
                              "for a GPU with more memory.")


def quantization_config(preset: MemoryPreset | None):
    """The diffusers quantization config for the transformer (None: keep it bf16).

    Refuses before anything loads when the preset needs bitsandbytes and it is missing: training in
    bf16 instead would run out of memory later, which is exactly what the preset is there to avoid.
    """
    if preset is None or not preset.quantized:
        return None
    if preset.weights not in ("nf4", "int8"):
        raise InputError(f"The {preset.label} preset asks for {preset.weights!r} weights, which are not supported.")
    _require("bitsandbytes", preset, f"loads the model in {preset.weights.upper()}")
    import torch
    from diffusers import BitsAndBytesConfig

    if preset.weights == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def pipeline_quantization_config(preset: MemoryPreset | None):
    """``quantization_config=`` for ``<Pipeline>.from_pretrained``: only the transformer is quantised
    (the text encoders are used once and freed), for any FLUX pipeline class."""
    config = quantization_config(preset)
    if config is None:
        return None
    from diffusers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(quant_mapping={"transformer": config})


def make_optimizer(params, preset: MemoryPreset | None, lr: float):
    """AdamW for the LoRA parameters: bitsandbytes' 8-bit one when the preset asks and it is installed.

    Falling back to torch's AdamW is safe (unlike quantisation): the estimate already counts fp32
    optimizer states, and for LoRA weights the difference is a fraction of a GB.
    """
    import torch

    kwargs = {"lr": lr, "betas": (0.9, 0.999), "weight_decay": 1e-4, "eps": 1e-8}
    if preset is not None and preset.optimizer == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is not None:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, **kwargs)
        log.warning("bitsandbytes is not installed: training with torch's AdamW instead of 8-bit AdamW")
    return torch.optim.AdamW(params, **kwargs)

