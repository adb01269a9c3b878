"""What does a LoRA step cost at real size: FLUX.1-dev and FLUX.2 [klein], per memory preset?

Run::

    python -m benchmarks.local_train_gpu [--models flux1,klein] [--presets bf16,bf16+ckpt,nf4,int8]
        [--resolutions 512,1024] [--steps 20] [--warmup 5] [--peak-tflops 989] [--json results.json]

No weights are downloaded: a model's cost does not depend on its weights, so each transformer
is built at its published configuration with random init, directly on the GPU in bf16 (no
fp32 copy in CPU RAM), and fed random inputs of the real shapes:

* FLUX.1-dev (``FluxTransformer2DModel``): 19 double-stream + 38 single-stream blocks, 24 heads
  x 128 (hidden 3072), in_channels 64, joint_attention_dim 4096, pooled_projection_dim 768,
  guidance_embeds True, axes_dims_rope (16, 56, 56): black-forest-labs/FLUX.1-dev
  ``transformer/config.json``. Cached text: T5-XXL, 512 tokens x 4096, plus CLIP pooled 768.
* FLUX.2 [klein] 4B (``Flux2Transformer2DModel``, key ``klein``): 5 double + 20 single blocks,
  24 heads x 128 (hidden 3072), in_channels 128, joint_attention_dim 7680, mlp_ratio 3,
  axes_dims_rope (32, 32, 32, 32), rope_theta 2000, guidance_embeds False; and klein 9B (key
  ``klein9b``): 8 double + 24 single blocks, 32 heads x 128, joint_attention_dim 12288.
  Source: black-forest-labs/FLUX.2-klein-4B and -9B ``transformer/config.json`` (the Hub is not
  reachable from here; the numbers are those files' as reproduced, identically, in
  DiffSynth-Studio's ``model_configs.py`` and other public loaders). Cached text: Qwen3-4B
  (hidden 2560) / Qwen3-8B (hidden 4096), the hidden states of layers (9, 18, 27) stacked, so
  512 tokens x 3 * hidden = 7680 / 12288 (``Flux2KleinPipeline._get_qwen3_prompt_embeds``,
  ``max_sequence_length=512``); no pooled vector.
* Latents, both families: the VAE downsamples 8x and 2x2 latent patches are packed into one
  token, so a res x res image is (res/16)^2 tokens; FLUX.1 tokens have 16 x 4 = 64 channels,
  FLUX.2 tokens 32 x 4 = 128. Position ids come from the pipelines' own helpers
  (``FluxPipeline._prepare_latent_image_ids``, zeros for FLUX.1's text;
  ``Flux2KleinPipeline._prepare_latent_ids`` / ``_prepare_text_ids``).

Each step is the local engine's (``services/engine/train.py``): rank-16 LoRA on the
attention projections (``LORA_TARGETS``; FLUX.2's single-stream blocks fuse q, k, v with the
MLP input into ``to_qkv_mlp_proj``, so that projection is added there), LoRA weights in fp32
over the bf16 base, batch 1, flow-matching loss, clip-grad 1.0, AdamW. Presets:

* ``bf16``: the plain bf16 base;        ``bf16+ckpt``: the same with gradient checkpointing;
* ``nf4``: bitsandbytes 4-bit NF4 base (the ``Linear4bit`` layers diffusers' ``BitsAndBytesConfig``
  loads, built in memory), with gradient checkpointing, as the QLoRA anchors use it;
* ``int8``: torchao int8 weight-only base, with gradient checkpointing.

Reported per (model, preset, resolution): s/step = median of ``--steps`` steps after ``--warmup``
(``torch.cuda.synchronize`` around each); peak memory = ``torch.cuda.max_memory_allocated``
from right after the model is set up (reset per resolution, the model freed between presets),
so it holds the weights, LoRA, optimiser state and the step's activations; FLOP/step = the
model FLOPs of one step's forward + backward, counted exactly with
``torch.utils.flop_counter.FlopCounterMode`` on the full model built on the meta device (shapes
only: no memory, the same count whether or not the step fits on the GPU). Recomputation under
checkpointing is not counted (the usual MFU definition), so a ``+ckpt`` row shows a lower MFU
for the same useful work. With LoRA the frozen weights get no gradient, so a step is ~2x the
forward's matmul FLOPs, not the 3x of full training; and FLUX.1's per-block modulation (3.2B of
its 11.9B parameters) sees one vector, not every token: FLUX.1-dev counts 44.7 TFLOP/step at
512 px and 163.9 at 1024 px, not 6 * N * tokens. MFU = FLOP/step / s/step / the GPU's peak dense
bf16 throughput (H100 SXM and H200: 989 TFLOP/s; ``--peak-tflops`` overrides).

Without a CUDA GPU it says so and runs tiny configurations of both families on the CPU, a few
steps each, through the same code, so CI exercises it.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

SKIP_LINE = "No CUDA GPU: skipping the real-size benchmark"
# VAE /8, then 2x2 latent patches packed into one token (FLUX.1 and FLUX.2 alike).
PIXELS_PER_TOKEN = 16
LORA_RANK = 16
# FLUX.2 single-stream blocks have no separate q/k/v: they sit in this fused projection.
FLUX2_EXTRA_LORA_TARGETS = ("to_qkv_mlp_proj",)
GUIDANCE = 1.0  # guidance-embedding value for guidance-distilled FLUX.1 (as TrainConfig.guidance)
LEARNING_RATE = 1e-4
TINY_STEPS, TINY_WARMUP = 3, 1

# Peak dense bf16 tensor throughput (TFLOP/s, no sparsity), matched in order against
# torch.cuda.get_device_name(): more specific names first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),  # same chip as the H100 SXM, more memory
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("4090", 165.2),
)

TARGET_BF16_512_S = 0.6
TARGET_NF4_512_GIB = 10.0
TARGET_BF16_1024_MFU = 0.35

ANCHORS = (
    ("HF 'FLUX QLoRA' write-up (FLUX.1-dev LoRA): NF4 peaks at ~9 GB; 700 steps at 512x768 take ~41 min on "
     "an RTX 4090 (~3.5 s/step); bf16 LoRA needs ~26 GB; H100 with FP8: 700 steps ~20 min (~1.7 s/step) at 36.6 GB."),
    "SimpleTuner FLUX quickstart, rank-16 LoRA: ~30 GB unquantised, 18 GB int8, 13 GB int4, 9 GB NF4.",
)


# --------------------------------------------------------------------------- models, presets, records


@dataclass(frozen=True)
class ModelSpec:
    key: str
    label: str
    family: str  # "flux1" (FluxTransformer2DModel) or "flux2" (Flux2Transformer2DModel)
    config: dict
    text_tokens: int
    pooled_dim: int | None  # FLUX.1's CLIP pooled vector; FLUX.2 has none

    @property
    def token_channels(self) -> int:
        return self.config["in_channels"]

    @property
    def text_dim(self) -> int:
        return self.config["joint_attention_dim"]

    def with_blocks(self, double: int, single: int) -> ModelSpec:
        return replace(self, config={**self.config, "num_layers": double, "num_single_layers": single})


FLUX1_DEV = ModelSpec(
    key="flux1", label="FLUX.1-dev", family="flux1", text_tokens=512, pooled_dim=768,
    config={"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
            "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)},
)
_KLEIN = {"patch_size": 1, "in_channels": 128, "attention_head_dim": 128, "timestep_guidance_channels": 256,
          "mlp_ratio": 3.0, "axes_dims_rope": (32, 32, 32, 32), "rope_theta": 2000, "eps": 1e-6,
          "guidance_embeds": False}
KLEIN_4B = ModelSpec(
    key="klein", label="FLUX.2-klein-4B", family="flux2", text_tokens=512, pooled_dim=None,
    config={**_KLEIN, "num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24,
            "joint_attention_dim": 3 * 2560},
)
KLEIN_9B = ModelSpec(
    key="klein9b", label="FLUX.2-klein-9B", family="flux2", text_tokens=512, pooled_dim=None,
    config={**_KLEIN, "num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32,
            "joint_attention_dim": 3 * 4096},
)
# Toy sizes of the same classes (services/engine/tiny.py's FLUX.1; FLUX.2 likewise).
TINY = {
    "flux1": ModelSpec(
        key="flux1", label="FLUX.1 (tiny)", family="flux1", text_tokens=8, pooled_dim=32,
        config={"patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1,
                "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
                "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": (4, 4, 8)},
    ),
    "flux2": ModelSpec(
        key="klein", label="FLUX.2-klein (tiny)", family="flux2", text_tokens=8, pooled_dim=None,
        config={"patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1,
                "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 16,
                "timestep_guidance_channels": 32, "axes_dims_rope": (4, 4, 4, 4), "guidance_embeds": False},
    ),
}
MODELS = {s.key: s for s in (FLUX1_DEV, KLEIN_4B, KLEIN_9B)}


@dataclass(frozen=True)
class Preset:
    name: str
    quant: str | None  # None, "nf4" (bitsandbytes) or "int8" (torchao)
    checkpointing: bool


PRESETS = {p.name: p for p in (
    Preset("bf16", None, False),
    Preset("bf16+ckpt", None, True),
    Preset("nf4", "nf4", True),
    Preset("int8", "int8", True),
)}


@dataclass
class Row:
    model: str
    model_label: str
    preset: str
    resolution: int
    status: str  # "ok", "skipped", "oom" or "error"
    note: str = ""
    device: str = ""
    dtype: str = ""
    checkpointing: bool = False
    image_tokens: int = 0
    text_tokens: int = 0
    s_per_step: float | None = None
    step_times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    setup_bytes: int | None = None
    flops: int | None = None
    mfu: float | None = None
    loss: float | None = None


@dataclass
class Target:
    name: str
    verdict: str  # "PASS", "FAIL" or "not run"
    detail: str


@dataclass
class Batch:
    latents: object
    prompt_embeds: object
    pooled: object
    img_ids: object
    txt_ids: object


# --------------------------------------------------------------------------- measuring


def peak_tflops_for(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU named like ``torch.cuda.get_device_name()``; None if unknown."""
    for needle, tflops in PEAK_BF16_TFLOPS:
        if needle.lower() in device_name.lower():
            return tflops
    return None


def mfu(flops_per_step: float, seconds_per_step: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the hardware's peak."""
    return flops_per_step / seconds_per_step / (peak_tflops * 1e12)


def count_flops(fn) -> int:
    """FLOPs of the matrix work ``fn()`` does (forward and, if it calls backward, backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def reset_peak_memory(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes(device: str) -> int | None:
    """Most bytes the CUDA caching allocator handed out since the last reset; None off CUDA."""
    import torch

    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


def allocated_bytes(device: str) -> int | None:
    import torch

    return torch.cuda.memory_allocated() if device.startswith("cuda") else None


def free_memory(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.1f}"


def fmt_flops(n: int | None) -> str:
    """FLOPs in T (real models) or M (toys), so both read at a glance."""
    if not n:
        return "-"
    return f"{n / 1e12:.1f} T" if n >= 1e11 else f"{n / 1e6:.2f} M"


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- building


def transformer_class(spec: ModelSpec):
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

    return FluxTransformer2DModel if spec.family == "flux1" else Flux2Transformer2DModel


def build_transformer(spec: ModelSpec, device: str, dtype):
    """The transformer with random init, its parameters created on ``device`` in ``dtype``
    (never an fp32 copy first: 12B parameters in fp32 would be 48 GB)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = transformer_class(spec)(**spec.config)
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    model.eval()
    return model


def _swap_linears(model, make) -> int:
    import torch

    swapped = 0
    # Not the Linears themselves: a list holding them would keep every bf16 weight alive to the end.
    parents = [m for m in model.modules() if not isinstance(m, torch.nn.Linear)]
    for parent in parents:
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, make(child))
                swapped += 1
    return swapped


def quantize_nf4(model, device: str, dtype) -> int:
    """Every Linear becomes the bitsandbytes ``Linear4bit`` (NF4) diffusers' ``BitsAndBytesConfig``
    loads, quantized here from the in-memory weights, layer by layer (one bf16 layer at a time
    extra). Returns how many layers were swapped."""
    import bitsandbytes as bnb
    import torch
    from diffusers import BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    storage = cfg.bnb_4bit_quant_storage
    storage = getattr(torch, storage) if isinstance(storage, str) else storage

    def make(lin):
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=cfg.bnb_4bit_compute_dtype,
                              compress_statistics=cfg.bnb_4bit_use_double_quant,
                              quant_type=cfg.bnb_4bit_quant_type, quant_storage=storage, device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type=cfg.bnb_4bit_quant_type,
                                     compress_statistics=cfg.bnb_4bit_use_double_quant,
                                     quant_storage=storage).to(device)
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
        return q.requires_grad_(False)

    return _swap_linears(model, make)


def quantize_int8(model) -> int:
    """torchao int8 weight-only on every Linear (what diffusers' ``TorchAoConfig("int8wo")`` applies)."""
    import torch
    from torchao.quantization import quantize_

    try:
        from torchao.quantization import Int8WeightOnlyConfig as config
    except ImportError:  # torchao < 0.10 spells it as a function
        from torchao.quantization import int8_weight_only as config
    quantize_(model, config())
    return sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))


def lora_targets(model, family: str) -> list[str]:
    """The engine's LoRA target names (plus FLUX.2's fused projection) that exist in ``model``."""
    from services.engine.train import LORA_TARGETS

    wanted = LORA_TARGETS + (FLUX2_EXTRA_LORA_TARGETS if family == "flux2" else ())
    names = {n for n, _ in model.named_modules()}
    return [t for t in wanted if any(n == t or n.endswith("." + t) for n in names)]


def add_lora(model, spec: ModelSpec, checkpointing: bool):
    """Rank-16 LoRA as ``Trainer.add_lora`` does it; returns (trainable params, AdamW)."""
    import torch
    from peft import LoraConfig

    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                 target_modules=lora_targets(model, spec.family)))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    return params, optimizer


def make_batch(spec: ModelSpec, resolution: int, device: str, dtype) -> Batch:
    """Random cached latents and text embeddings of the real shapes, ids as the pipelines make them."""
    import torch

    side = resolution // PIXELS_PER_TOKEN
    g = torch.Generator().manual_seed(resolution)
    latents = torch.randn((1, side * side, spec.token_channels), generator=g).to(device, dtype)
    prompt_embeds = torch.randn((1, spec.text_tokens, spec.text_dim), generator=g)
    pooled = None
    if spec.family == "flux1":
        from diffusers import FluxPipeline

        pooled = torch.randn((1, spec.pooled_dim), generator=g).to(device, dtype)
        img_ids = FluxPipeline._prepare_latent_image_ids(1, side, side, device, dtype)
        txt_ids = torch.zeros(spec.text_tokens, 3).to(device, dtype)  # FluxPipeline.encode_prompt's
    else:
        from diffusers import Flux2KleinPipeline

        img_ids = Flux2KleinPipeline._prepare_latent_ids(torch.empty(1, 1, side, side)).to(device)
        txt_ids = Flux2KleinPipeline._prepare_text_ids(prompt_embeds).to(device)
    return Batch(latents, prompt_embeds.to(device, dtype), pooled, img_ids, txt_ids)


# --------------------------------------------------------------------------- the step


def flow_loss(model, spec: ModelSpec, batch: Batch, gen, device: str, dtype):
    """``Trainer.flow_loss``: x_t = (1 - s) x0 + s noise, the model predicts noise - x0."""
    import torch

    x0 = batch.latents
    noise = torch.randn(x0.shape, generator=gen).to(device, x0.dtype)
    sigmas = torch.rand((1,), generator=gen).to(device, x0.dtype)
    s = sigmas.view(1, 1, 1)
    noisy = (1.0 - s) * x0 + s * noise
    guidance = None
    if spec.config.get("guidance_embeds"):
        guidance = torch.full((1,), GUIDANCE, device=device, dtype=torch.float32)
    kwargs = {"hidden_states": noisy.to(dtype), "timestep": sigmas.to(dtype), "guidance": guidance,
              "encoder_hidden_states": batch.prompt_embeds, "txt_ids": batch.txt_ids, "img_ids": batch.img_ids,
              "return_dict": False}
    if spec.family == "flux1":
        kwargs["pooled_projections"] = batch.pooled
    pred = model(**kwargs)[0]
    return torch.mean((pred.float() - (noise - x0).float()) ** 2)


def train_step(model, spec: ModelSpec, batch: Batch, params, optimizer, gen, device: str, dtype) -> float:
    """One optimiser step (``Trainer._optimise``); returns the loss."""
    import torch

    loss = flow_loss(model, spec, batch, gen, device, dtype)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def model_flops(spec: ModelSpec, resolution: int, dtype) -> int:
    """Exact forward + backward FLOPs of one LoRA step on ``spec`` at ``resolution``, counted on the
    meta device: shapes only, so no memory and no recompute, whatever the GPU. (It also counts
    attention, which the counter misses on the CPU: it has no formula for the CPU's fused SDPA
    kernel, while on meta SDPA decomposes into matmuls it does count, as it counts CUDA's kernels.)"""
    import torch

    model = build_transformer(spec, "meta", dtype)
    add_lora(model, spec, checkpointing=False)
    batch = make_batch(spec, resolution, "meta", dtype)
    gen = torch.Generator().manual_seed(0)
    return count_flops(lambda: flow_loss(model, spec, batch, gen, "meta", dtype).backward())


# --------------------------------------------------------------------------- running


def unavailable(preset: Preset) -> str | None:
    """Why ``preset`` cannot run here (its library is missing), or None."""
    import importlib.util

    lib = {"nf4": "bitsandbytes", "int8": "torchao"}.get(preset.quant or "")
    if lib and importlib.util.find_spec(lib) is None:
        return f"skipped: {lib} not installed"
    return None


def _failure(exc: BaseException) -> tuple[str, str]:
    import torch

    # bitsandbytes' kernels report running out as a plain RuntimeError.
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "oom", "out of GPU memory"
    first = (str(exc).strip().splitlines() or [""])[0][:160]
    return "error", f"{type(exc).__name__}: {first}"


def run_preset(spec: ModelSpec, preset: Preset, resolutions: list[int], *, steps: int, warmup: int,
               device: str, dtype, flops: dict[int, int], peak_tflops: float | None) -> list[Row]:
    """Build ``spec`` for ``preset`` once, time every resolution on it, then free it."""
    import torch

    def row(res: int, status: str, note: str = "", **kw) -> Row:
        side = res // PIXELS_PER_TOKEN
        return Row(model=spec.key, model_label=spec.label, preset=preset.name, resolution=res, status=status,
                   note=note, device=device, dtype=str(dtype).removeprefix("torch."),
                   checkpointing=preset.checkpointing, image_tokens=side * side, text_tokens=spec.text_tokens,
                   flops=flops.get(res), **kw)

    why = unavailable(preset)
    if why:
        return [row(res, "skipped", why) for res in resolutions]
    model = None
    try:
        model = build_transformer(spec, device, dtype)
        if preset.quant == "nf4":
            quantize_nf4(model, device, dtype)
        elif preset.quant == "int8":
            quantize_int8(model)
        params, optimizer = add_lora(model, spec, preset.checkpointing)
        free_memory(device)  # the bf16 weights a quantisation replaced
    except Exception as exc:  # noqa: BLE001 - an OOM, or a library that does not take this model: a row says so
        status, note = _failure(exc)
        del model
        free_memory(device)
        return [row(res, status, f"setup: {note}") for res in resolutions]
    rows: list[Row] = []
    for res in resolutions:
        batch = None
        try:
            reset_peak_memory(device)
            setup = allocated_bytes(device)
            batch = make_batch(spec, res, device, dtype)
            gen = torch.Generator().manual_seed(1234)
            for _ in range(warmup):
                train_step(model, spec, batch, params, optimizer, gen, device, dtype)
            times, losses = [], []
            for _ in range(steps):
                synchronize(device)
                t0 = time.perf_counter()
                losses.append(train_step(model, spec, batch, params, optimizer, gen, device, dtype))
                synchronize(device)
                times.append(time.perf_counter() - t0)
            sps = statistics.median(times)
            f = flops.get(res)
            rows.append(row(res, "ok", s_per_step=sps, step_times=times, peak_bytes=peak_memory_bytes(device),
                            setup_bytes=setup, loss=losses[-1],
                            mfu=mfu(f, sps, peak_tflops) if f and peak_tflops else None))
        except Exception as exc:  # noqa: BLE001 - one failed (model, preset, res) must not lose the others
            status, note = _failure(exc)
            rows.append(row(res, status, note, peak_bytes=peak_memory_bytes(device)))
            optimizer.zero_grad(set_to_none=True)
        finally:
            del batch
            free_memory(device)
    del model, params, optimizer
    free_memory(device)
    return rows


def evaluate_targets(rows: list[Row], real_size: bool) -> list[Target]:
    """The FLUX.1-dev targets (set for an H100), from the rows measured."""
    names = (f"FLUX.1 bf16 LoRA at 512 px <= {TARGET_BF16_512_S} s/step",
             f"FLUX.1 NF4 LoRA peak at 512 px <= {TARGET_NF4_512_GIB:.0f} GiB",
             f"FLUX.1 bf16 LoRA at 1024 px >= {TARGET_BF16_1024_MFU:.0%} MFU")
    if not real_size:
        return [Target(n, "not run", "no CUDA GPU (tiny models only)") for n in names]

    def ok(preset_names: tuple[str, ...], res: int) -> list[Row]:
        return [r for r in rows if r.model == "flux1" and r.preset in preset_names and r.resolution == res
                and r.status == "ok"]

    targets = []
    fast = ok(("bf16", "bf16+ckpt"), 512)
    if fast:
        best = min(fast, key=lambda r: r.s_per_step)
        targets.append(Target(names[0], "PASS" if best.s_per_step <= TARGET_BF16_512_S else "FAIL",
                              f"{best.s_per_step:.3f} s/step ({best.preset})"))
    else:
        targets.append(Target(names[0], "not run", "no FLUX.1 bf16 row at 512 px"))
    small = ok(("nf4",), 512)
    if small and small[0].peak_bytes is not None:
        peak = small[0].peak_bytes / 2**30
        targets.append(Target(names[1], "PASS" if peak <= TARGET_NF4_512_GIB else "FAIL", f"{peak:.1f} GiB"))
    else:
        targets.append(Target(names[1], "not run", "no FLUX.1 nf4 row at 512 px"))
    busy = [r for r in ok(("bf16", "bf16+ckpt"), 1024) if r.mfu is not None]
    if busy:
        best = max(busy, key=lambda r: r.mfu)
        targets.append(Target(names[2], "PASS" if best.mfu >= TARGET_BF16_1024_MFU else "FAIL",
                              f"{best.mfu:.1%} ({best.preset})"))
    else:
        targets.append(Target(names[2], "not run", "no FLUX.1 bf16 row at 1024 px with an MFU"))
    return targets


# --------------------------------------------------------------------------- reporting


def format_table(rows: list[Row]) -> str:
    """A Markdown table, ready to paste into a note."""
    head = ("| model | preset | res | tokens img+txt | dtype | ckpt | s/step | peak GiB | setup GiB | FLOP/step "
            "| MFU | note |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        sps = f"{r.s_per_step:.3f}" if r.s_per_step is not None else "-"
        note = r.note if r.status != "ok" else (f"loss {r.loss:.3g}" if r.loss is not None else "")
        lines.append(f"| {r.model_label} | {r.preset} | {r.resolution} | {r.image_tokens}+{r.text_tokens} | {r.dtype} "
                     f"| {'yes' if r.checkpointing else 'no'} | {sps} | {gib(r.peak_bytes)} | {gib(r.setup_bytes)} "
                     f"| {fmt_flops(r.flops)} | {f'{r.mfu:.1%}' if r.mfu is not None else '-'} | {note} |")
    return "\n".join(lines)


def environment(device: str, peak_tflops: float | None) -> dict:
    import diffusers
    import peft
    import torch

    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    return {"device": device, "device_name": name, "peak_bf16_tflops": peak_tflops, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "peft": peft.__version__, "python": platform.python_version()}


def tiny_resolution(resolution: int) -> int:
    """The toy resolution standing in for ``resolution``: 1/16 of it (512 -> 32 px, 2x2 tokens)."""
    return max(PIXELS_PER_TOKEN, resolution // PIXELS_PER_TOKEN**2 * PIXELS_PER_TOKEN)


def jsonable(obj):
    """``obj`` with non-finite floats (a diverged loss) as None, so the file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="flux1,klein", help=f"comma list of {', '.join(MODELS)} (default flux1,klein)")
    ap.add_argument("--presets", default=",".join(PRESETS), help=f"comma list of {', '.join(PRESETS)} (default all)")
    ap.add_argument("--resolutions", default="512,1024", help="square training resolutions in px (default 512,1024)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps; the median is reported (default 20)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the GPU's dense bf16 peak for MFU (default: from its name; H100 SXM / H200 989)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this path")
    args = ap.parse_args(argv)
    args.models = _csv(args.models)
    args.presets = _csv(args.presets)
    args.resolutions = [int(r) for r in _csv(args.resolutions)]
    for name in args.models:
        if name not in MODELS:
            ap.error(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
    for name in args.presets:
        if name not in PRESETS:
            ap.error(f"unknown preset {name!r}: choose from {', '.join(PRESETS)}")
    for res in args.resolutions:
        if res <= 0 or res % PIXELS_PER_TOKEN:
            ap.error(f"resolution {res} must be a positive multiple of {PIXELS_PER_TOKEN}")
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    return args


def run_all(specs: list[ModelSpec], presets: list[str], resolutions: list[int], *, steps: int, warmup: int,
            device: str, dtype, peak_tflops: float | None) -> list[Row]:
    rows: list[Row] = []
    for spec in specs:
        flops: dict[int, int] = {}
        for res in resolutions:
            try:
                flops[res] = model_flops(spec, res, dtype)
            except Exception as exc:  # noqa: BLE001 - no FLOPs only means no MFU for those rows
                print(f"  {spec.label} {res} px: FLOP count failed ({_failure(exc)[1]})", flush=True)
        for name in presets:
            print(f"{spec.label} / {name} ...", flush=True)
            got = run_preset(spec, PRESETS[name], resolutions, steps=steps, warmup=warmup, device=device,
                             dtype=dtype, flops=flops, peak_tflops=peak_tflops)
            for r in got:
                said = f"ok, {r.s_per_step:.3f} s/step, peak {gib(r.peak_bytes)} GiB" if r.status == "ok" else r.note
                print(f"  {r.resolution} px: {said}", flush=True)
            rows += got
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from services.engine import quiet_libraries

    quiet_libraries()
    import torch

    real_size = torch.cuda.is_available()
    if real_size:
        device, dtype = "cuda", torch.bfloat16
        specs = [MODELS[m] for m in args.models]
        resolutions, steps, warmup = args.resolutions, args.steps, args.warmup
        peak = args.peak_tflops or peak_tflops_for(torch.cuda.get_device_name())
    else:
        print(SKIP_LINE)
        print("Running the tiny configurations of both families on the CPU instead (same code, small shapes).")
        from services.engine.train import train_dtype

        device, dtype = "cpu", train_dtype("cpu")
        specs = list(TINY.values())  # both families, whatever --models says: this is CI's check
        resolutions = sorted({tiny_resolution(r) for r in args.resolutions})
        steps, warmup = min(args.steps, TINY_STEPS), min(args.warmup, TINY_WARMUP)
        peak = args.peak_tflops
    env = environment(device, peak)
    print(f"Device: {env['device_name']} ({device}); peak bf16 {peak or 'unknown'} TFLOP/s; torch {env['torch']}, "
          f"diffusers {env['diffusers']}, peft {env['peft']}")
    print(f"Rank-{LORA_RANK} LoRA, batch 1, {warmup} warm-up + {steps} timed steps (median), "
          f"resolutions {resolutions}", flush=True)

    # Toy matmuls run fastest on one thread, and do not slow down when other jobs share the cores.
    threads = torch.get_num_threads()
    if not real_size:
        torch.set_num_threads(1)
    try:
        rows = run_all(specs, args.presets, resolutions, steps=steps, warmup=warmup, device=device, dtype=dtype,
                       peak_tflops=peak)
    finally:
        torch.set_num_threads(threads)

    targets = evaluate_targets(rows, real_size)
    print()
    print(format_table(rows))
    print()
    print("Anchors (published figures, other hardware and settings):")
    for a in ANCHORS:
        print(f"- {a}")
    print()
    print("Targets (FLUX.1-dev, set for an H100):")
    for t in targets:
        print(f"- {t.verdict}: {t.name} ({t.detail})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {"environment": env, "rows": [asdict(r) for r in rows], "targets": [asdict(t) for t in targets],
               "anchors": list(ANCHORS)}
        args.json.write_text(json.dumps(jsonable(doc), indent=2, allow_nan=False))
        print(f"\nResults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
