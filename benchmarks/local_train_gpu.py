"""What does LoRA training cost at real size, as the product runs it: FLUX.1-dev and FLUX.2 [klein] 4B / 9B,
per memory preset and resolution?

Run::

    python -m benchmarks.local_train_gpu [--models flux1,klein,klein9b] [--presets bf16,24gb,16gb,12gb]
        [--resolutions 512,1024] [--steps 10] [--warmup 3] [--images 6] [--sample-steps 20]
        [--peak-tflops 989] [--json results.json] [--in-process]

What is timed is the product's own training: ``services.engine.train.Trainer`` (``prepare()`` then
``run()``), with the config the local worker writes for a real model (rank 16, batch 1, gradient
checkpointing as the Train tab's "auto" sets it, the memory preset named ``memory_preset``, one sample
at the end). Only where the pipeline comes from differs: no weights are downloaded, since a model's
cost does not depend on its weights. The Trainer's ``pipeline_factory`` seam gets a pipeline built in
memory, every module created directly on the GPU in bf16 (no fp32 copy in CPU RAM), at the published
configurations with random init; for a quantising preset the factory quantises the transformer to
NF4 as the preset's ``quantization_config`` says (bitsandbytes' ``Linear4bit``, what
``from_pretrained`` would load), and the rest of the preset (8-bit AdamW, checkpointing, text
encoders on the CPU, the resolution cap) is the Trainer's own doing.

* FLUX.1-dev (``FluxPipeline``): ``FluxTransformer2DModel`` with 19 double + 38 single blocks, 24 heads
  x 128, in_channels 64, joint_attention_dim 4096, pooled 768, guidance_embeds, rope (16, 56, 56)
  (black-forest-labs/FLUX.1-dev ``transformer/config.json``); CLIP ViT-L/14's text tower (12 layers,
  768 wide, vocab 49408) and the T5-XXL v1.1 encoder (24 layers, d_model 4096, d_ff 10240, 64 heads,
  gated GELU, vocab 32128); the 16-channel KL VAE (128/256/512/512, 2 layers a block, scaling 0.3611,
  shift 0.1159); the flow-matching scheduler with dynamic shifting.
* FLUX.2 [klein] 4B / 9B (``Flux2KleinPipeline``): ``Flux2Transformer2DModel`` with 5 double + 20 single
  blocks, 24 heads (4B) / 8 + 24, 32 heads (9B), x 128, in_channels 128, mlp_ratio 3, rope
  (32, 32, 32, 32) theta 2000, no guidance embedding, joint_attention_dim 3 x the text encoder's width;
  Qwen3-4B (36 layers, 2560 wide, 32 heads / 8 KV, head_dim 128, tied embeddings) / Qwen3-8B (36 layers,
  4096 wide, untied); the FLUX.2 VAE (``AutoencoderKLFlux2``'s defaults: 32 latent channels, 128/256/512/512).
  Sources: black-forest-labs/FLUX.2-klein-4B and -9B ``transformer/config.json`` and Qwen's
  ``config.json`` (the Hub is not reachable from here; the numbers are those files' as reproduced in
  public loaders; ``test_published_configs_have_the_published_sizes`` checks the parameter counts).
* Tokenizers: the ones ``services/engine/tiny.py`` builds in code (their ids fit the real vocabularies;
  every caption is padded to 512 tokens, as with the real ones).

Reported per (model, preset, resolution), each row in its own process on CUDA (``--in-process`` to
turn that off), so a CUDA error that poisons the process loses only its own row:

* ``s/step``: median of the step times after ``--warmup`` (the time between ``Trainer.run``'s
  ``on_step`` calls: each ends with the loss read back, so the GPU is synchronised).
* ``peak GiB``: ``torch.cuda.max_memory_allocated`` over the training steps (reset after ``prepare``);
  ``prep GiB`` over ``prepare`` after the model was built (caching).
* ``build s``: making the pipeline in memory (what a download + load stands in for); ``prepare s``:
  the rest of ``prepare`` (caching latents and embeddings, adding the LoRA); ``sample s``: the sample
  image ``run`` makes at the end (``--sample-steps`` steps).
* ``MFU``: model FLOPs of one step's forward + backward, counted exactly with
  ``torch.utils.flop_counter.FlopCounterMode`` by running the Trainer's own ``flow_loss`` on a copy of
  the transformer (with the same LoRA) on the meta device, at the run's shapes (recomputation under
  gradient checkpointing not counted, the usual MFU definition), / s/step / the GPU's dense bf16 peak
  (H100 SXM and H200: 989 TFLOP/s; ``--peak-tflops`` overrides).
* A row that fails records its own first error: type, message and innermost frame; the cleanup after
  it is guarded, so an error there (a CUDA error surfacing late) is recorded beside it, never instead.

Without a CUDA GPU it says so and runs the tiny models of both families on the CPU, through the same
code (no memory preset: the trainer refuses them on the CPU), so CI exercises it.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

SKIP_LINE = "No CUDA GPU: skipping the real-size benchmark"
LORA_RANK = 16
LEARNING_RATE = 1e-4
CPU_PRESET = "none"  # the only one the trainer runs on the CPU
TINY_STEPS, TINY_WARMUP, TINY_SAMPLE_STEPS = 3, 1, 2
ROW_TIMEOUT_S = 1800  # one isolated row; a hung one is recorded as such
ROOT = Path(__file__).resolve().parent.parent

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


# --------------------------------------------------------------------------- the models, built in memory


FLUX1_TRANSFORMER = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                     "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                     "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
_KLEIN = {"patch_size": 1, "in_channels": 128, "attention_head_dim": 128, "timestep_guidance_channels": 256,
          "mlp_ratio": 3.0, "axes_dims_rope": (32, 32, 32, 32), "rope_theta": 2000, "eps": 1e-6,
          "guidance_embeds": False}
KLEIN_4B_TRANSFORMER = {**_KLEIN, "num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24,
                        "joint_attention_dim": 3 * 2560}
KLEIN_9B_TRANSFORMER = {**_KLEIN, "num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32,
                        "joint_attention_dim": 3 * 4096}
QWEN3_4B = {"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True}
QWEN3_8B = {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False}
# FLUX.1-dev's scheduler_config.json (FLUX.2 [klein] uses the same shifting).
SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
             "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}


def _flux1_dev():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from services.engine.tiny import clip_tokenizer, t5_tokenizer

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    t5 = T5EncoderModel(T5Config(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, layer_norm_epsilon=1e-6, pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=tokenizer_2.pad_token_id))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=clip,
                        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2,
                        transformer=FluxTransformer2DModel(**FLUX1_TRANSFORMER))


def _klein(transformer_config: dict, qwen: dict):
    def build():
        from diffusers import (
            AutoencoderKLFlux2,
            FlowMatchEulerDiscreteScheduler,
            Flux2KleinPipeline,
            Flux2Transformer2DModel,
        )
        from transformers import Qwen3Config, Qwen3ForCausalLM

        from services.engine.tiny import qwen_tokenizer

        tokenizer = qwen_tokenizer()
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=151936, max_position_embeddings=40960, rope_theta=1_000_000, rms_norm_eps=1e-6,
            bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **qwen))
        return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=AutoencoderKLFlux2(),
                                  text_encoder=text_encoder, tokenizer=tokenizer,
                                  transformer=Flux2Transformer2DModel(**transformer_config))
    return build


def _tiny(family: str):
    def build():
        from services.engine import tiny

        return tiny.build_tiny_pipeline() if family == "flux1" else tiny.build_tiny_flux2_pipeline()
    return build


@dataclass(frozen=True)
class ModelSpec:
    key: str
    label: str
    family: str  # "flux1" | "flux2"
    build: Callable[[], object]  # the pipeline; called under build_on(device, dtype)
    transformer_config: dict
    text_tokens: int = 512  # max_sequence_length
    bucket_step: int = 64
    sample_guidance: float = 3.5


MODELS = {s.key: s for s in (
    ModelSpec("flux1", "FLUX.1-dev", "flux1", _flux1_dev, FLUX1_TRANSFORMER),
    ModelSpec("klein", "FLUX.2-klein-4B", "flux2", _klein(KLEIN_4B_TRANSFORMER, QWEN3_4B), KLEIN_4B_TRANSFORMER,
              sample_guidance=4.0),
    ModelSpec("klein9b", "FLUX.2-klein-9B", "flux2", _klein(KLEIN_9B_TRANSFORMER, QWEN3_8B), KLEIN_9B_TRANSFORMER,
              sample_guidance=4.0),
)}


def _tiny_specs() -> dict[str, ModelSpec]:
    from services.engine import tiny

    return {
        "tiny-flux1": ModelSpec("tiny-flux1", "FLUX.1 (tiny)", "flux1", _tiny("flux1"), {},
                                text_tokens=tiny.MAX_SEQUENCE_LENGTH, bucket_step=16),
        "tiny-klein": ModelSpec("tiny-klein", "FLUX.2-klein (tiny)", "flux2", _tiny("flux2"), {},
                                text_tokens=tiny.FLUX2_MAX_SEQUENCE_LENGTH, bucket_step=16, sample_guidance=4.0),
    }


def spec_named(key: str) -> ModelSpec:
    return MODELS.get(key) or _tiny_specs()[key]


def build_on(build: Callable[[], object], device: str, dtype):
    """``build()`` with every parameter created on ``device`` in ``dtype`` (never an fp32 copy first:
    FLUX.1's 12B transformer in fp32 would be 48 GB)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            return build()
    finally:
        torch.set_default_dtype(previous)


def quantize_nf4(model, device: str, bnb_config) -> int:
    """Every Linear of ``model`` becomes the bitsandbytes ``Linear4bit`` that ``from_pretrained`` loads for
    ``bnb_config`` (a diffusers ``BitsAndBytesConfig``), quantised from the in-memory weights one layer at a
    time (one bf16 layer extra at most). Returns how many layers were swapped."""
    import bitsandbytes as bnb
    import torch

    storage = bnb_config.bnb_4bit_quant_storage
    storage = getattr(torch, storage) if isinstance(storage, str) else storage
    swapped = 0
    # Not the Linears themselves: a list holding them would keep every bf16 weight alive to the end.
    parents = [m for m in model.modules() if not isinstance(m, torch.nn.Linear)]
    for parent in parents:
        for name, lin in list(parent.named_children()):
            if type(lin) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=bnb_config.bnb_4bit_compute_dtype,
                                  compress_statistics=bnb_config.bnb_4bit_use_double_quant,
                                  quant_type=bnb_config.bnb_4bit_quant_type, quant_storage=storage, device="meta")
            q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False,
                                         quant_type=bnb_config.bnb_4bit_quant_type,
                                         compress_statistics=bnb_config.bnb_4bit_use_double_quant,
                                         quant_storage=storage).to(device)
            if lin.bias is not None:
                q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
            setattr(parent, name, q.requires_grad_(False))
            swapped += 1
    return swapped


def in_memory_factory(build: Callable[[], object], device: str, on_built: Callable[[], None] | None = None):
    """A ``Trainer`` pipeline factory: ``build()`` on ``device`` in the trainer's dtype, the transformer
    quantised as the preset's ``quantization_config`` asks (what ``from_pretrained`` would do)."""
    def factory(cfg, dtype, quantization_config):
        pipe = build_on(build, device, dtype)
        if quantization_config is not None:
            bnb_config = quantization_config.quant_mapping["transformer"]
            quantize_nf4(pipe.transformer, device, bnb_config)
            free_memory(device)  # the bf16 weights the NF4 ones replaced
        if on_built is not None:
            on_built()
        return pipe
    return factory


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


def step_flops(trainer) -> int:
    """Forward + backward FLOPs of one of ``trainer``'s steps: its own ``flow_loss`` on a copy of its
    transformer (same class, config and LoRA) on the meta device, with the cached batch's shapes. Shapes
    only: no memory, no recomputation, whatever the GPU or the quantisation. (On meta, attention
    decomposes into matmuls the counter counts, as it counts CUDA's fused kernels; on the CPU it misses them.)"""
    import torch

    from services.engine.families import TextEmbeds
    from services.engine.train import Trainer

    meta = Trainer(replace(trainer.cfg, gradient_checkpointing=False), trainer.zip_path, trainer.job_dir)
    meta.device, meta.dtype, meta.preset = "meta", trainer.dtype, None
    config = {k: v for k, v in trainer.transformer.config.items()
              if not k.startswith("_") and k != "quantization_config"}
    meta.transformer = build_on(lambda: type(trainer.transformer).from_config(config), "meta", trainer.dtype)
    meta.transformer.requires_grad_(False)
    meta.add_lora()

    def on_meta(t):
        return None if t is None else torch.empty(t.shape, dtype=t.dtype, device="meta")

    c = trainer.cache[0]
    meta.text_ids = on_meta(trainer.text_ids)
    embeds = [TextEmbeds(on_meta(c.prompt_embeds), on_meta(c.pooled))]
    latents = torch.empty(c.mean.shape, dtype=torch.float32, device="meta")
    img_ids = on_meta(trainer.latent_ids(c.bucket))
    gen = torch.Generator().manual_seed(0)
    return count_flops(lambda: meta.flow_loss(latents, embeds, img_ids, gen).backward())


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device: str) -> int | None:
    """Most bytes the CUDA caching allocator handed out since the last reset; None off CUDA."""
    import torch

    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


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


def dataset_zip(path: Path, count: int, resolution: int) -> Path:
    """``count`` square photos of ``resolution`` px (one bucket) with distinct captions."""
    from tests.imagefactory import TRAINING_CAPTIONS, jpeg_bytes, photo

    with zipfile.ZipFile(path, "w") as zf:
        for i in range(count):
            zf.writestr(f"img_{i:03d}.jpg", jpeg_bytes(photo(resolution, resolution, seed=i)))
            zf.writestr(f"img_{i:03d}.txt", f"TOK, {TRAINING_CAPTIONS[i % len(TRAINING_CAPTIONS)]} number {i}")
    return path


# --------------------------------------------------------------------------- one row


@dataclass
class Row:
    model: str
    model_label: str
    preset: str
    resolution: int  # asked for
    status: str = "ok"  # "ok", "oom" or "error"
    error: str = ""  # the row's first error: its type
    message: str = ""  # ... its message (first lines)
    where: str = ""  # ... its innermost frame, "file:line in function"
    cleanup_error: str = ""  # an error while freeing memory after the row (never replaces ``error``)
    trained_resolution: int | None = None  # after the preset's cap
    device: str = ""
    dtype: str = ""
    checkpointing: bool | None = None
    image_tokens: int | None = None
    text_tokens: int | None = None
    s_per_step: float | None = None
    step_times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None  # over the training steps
    prepare_peak_bytes: int | None = None  # over prepare(), after the model was built
    build_s: float | None = None
    prepare_s: float | None = None
    sample_s: float | None = None
    flops: int | None = None
    mfu: float | None = None
    losses: list[float] = field(default_factory=list)
    lora_mb: float | None = None

    def fail(self, exc: BaseException) -> None:
        """Record ``exc`` as the row's error, unless it already has one (the first is the cause)."""
        if self.error:
            return
        self.status, self.error, self.message, self.where = describe(exc)


def describe(exc: BaseException) -> tuple[str, str, str, str]:
    """(status, type, message, innermost frame) of an exception."""
    import torch

    message = " ".join(str(exc).strip().splitlines()[:3])[:400]
    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    if frames:
        f = frames[-1]
        try:
            name = os.path.relpath(f.filename, ROOT) if f.filename.startswith(str(ROOT)) else f.filename
        except ValueError:
            name = f.filename
        where = f"{name}:{f.lineno} in {f.name}"
    # bitsandbytes' kernels report running out as a plain RuntimeError.
    oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in message.lower()
    return ("oom" if oom else "error"), type(exc).__name__, message, where


@dataclass(frozen=True)
class Plan:
    steps: int
    warmup: int
    images: int
    sample_steps: int
    device: str
    peak_tflops: float | None


def row_config(spec: ModelSpec, preset: str, resolution: int, plan: Plan):
    """The config the local worker would write for this model (services.providers.local.base_models)."""
    from services.engine.config import TrainConfig

    real = spec.key in MODELS
    return TrainConfig(
        steps=plan.warmup + plan.steps, family=spec.family, base_model=spec.key, base_model_label=spec.label,
        learning_rate=LEARNING_RATE, rank=LORA_RANK, resolution=resolution, bucket_step=spec.bucket_step,
        max_sequence_length=spec.text_tokens, gradient_checkpointing=real, sample_every=0, checkpoint_every=0,
        sample_steps=plan.sample_steps, sample_guidance=spec.sample_guidance, device=plan.device,
        memory_preset=preset)


def measure(spec: ModelSpec, preset: str, resolution: int, plan: Plan, work: Path, *,
            factory: Callable | None = None) -> Row:
    """One row: ``Trainer.prepare()`` + ``Trainer.run()`` for (model, preset, resolution), timed."""
    from services.engine.train import Callbacks, Trainer, train_dtype

    device = plan.device
    row = Row(spec.key, spec.label, preset, resolution, device=device,
              dtype=str(train_dtype(device)).removeprefix("torch."))
    trainer = None
    try:
        work.mkdir(parents=True, exist_ok=True)
        zip_path = dataset_zip(work / "dataset.zip", plan.images, resolution)
        built: dict[str, float] = {}

        def on_built() -> None:
            built["at"] = time.perf_counter()
            reset_peak(device)

        cfg = row_config(spec, preset, resolution, plan)
        trainer = Trainer(cfg, zip_path, work / "job",
                          pipeline_factory=factory or in_memory_factory(spec.build, device, on_built))
        t0 = time.perf_counter()
        trainer.prepare()
        t1 = time.perf_counter()
        row.build_s = built.get("at", t0) - t0
        row.prepare_s = t1 - built.get("at", t0)
        row.prepare_peak_bytes = peak_bytes(device)
        row.trained_resolution, row.checkpointing = cfg.resolution, cfg.gradient_checkpointing
        c = trainer.cache[0]
        row.image_tokens, row.text_tokens = int(c.mean.shape[1]), int(c.prompt_embeds.shape[1])

        stamps: list[float] = []
        sampled: list[float] = []
        training_peak: list[int | None] = []

        def on_step(step: int, total: int, loss: float, eta_s) -> None:
            stamps.append(time.perf_counter())
            if step == total:
                training_peak.append(peak_bytes(device))

        def on_sample(step: int, path: Path) -> None:
            sampled.append(time.perf_counter())

        reset_peak(device)
        started = time.perf_counter()
        result = trainer.run(Callbacks(on_step=on_step, on_sample=on_sample))
        times = [b - a for a, b in zip([started, *stamps], stamps)]
        row.step_times = times
        row.s_per_step = statistics.median(times[plan.warmup:] or times)
        row.peak_bytes = training_peak[0] if training_peak else None
        row.sample_s = sampled[-1] - stamps[-1] if sampled and stamps else None
        row.losses = list(result.losses)
        row.lora_mb = result.lora_path.stat().st_size / 1e6 if result.lora_path else None
        try:
            row.flops = step_flops(trainer)
        except Exception as exc:  # noqa: BLE001 - no FLOP count only means no MFU
            row.message = f"FLOP count failed: {describe(exc)[1]}: {describe(exc)[2]}"
        if row.flops and plan.peak_tflops and row.s_per_step:
            row.mfu = mfu(row.flops, row.s_per_step, plan.peak_tflops)
    except Exception as exc:  # noqa: BLE001 - one failed row must not lose the others
        row.fail(exc)
        if row.peak_bytes is None:
            try:
                row.peak_bytes = peak_bytes(device)
            except Exception:  # noqa: BLE001 - a poisoned CUDA context: the row's own error says why
                pass
    finally:
        # Guarded: after a CUDA error, freeing memory raises too, and must not mask the row's own error.
        try:
            del trainer
            free_memory(device)
        except Exception as exc:  # noqa: BLE001
            _, kind, message, where = describe(exc)
            row.cleanup_error = f"{kind}: {message} ({where})"
            if row.status == "ok":
                row.status, row.error, row.message, row.where = "error", kind, f"in cleanup: {message}", where
    return row


def measure_isolated(spec: ModelSpec, preset: str, resolution: int, plan: Plan, work: Path) -> Row:
    """``measure`` in a child process: a CUDA error (which poisons its process) loses only this row."""
    out = work / "row.json"
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.local_train_gpu", "--row", f"{spec.key}:{preset}:{resolution}",
           "--row-json", str(out), "--steps", str(plan.steps), "--warmup", str(plan.warmup),
           "--images", str(plan.images), "--sample-steps", str(plan.sample_steps), "--device", plan.device]
    if plan.peak_tflops:
        cmd += ["--peak-tflops", str(plan.peak_tflops)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=ROW_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return Row(spec.key, spec.label, preset, resolution, status="error", error="TimeoutExpired",
                   message=f"the row's process ran over {ROW_TIMEOUT_S} s", device=plan.device)
    if out.is_file():
        return row_from_json(json.loads(out.read_text()))
    tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]
    return Row(spec.key, spec.label, preset, resolution, status="error", error=f"exit status {proc.returncode}",
               message=" | ".join(tail)[:400] or "the row's process wrote nothing", device=plan.device)


def row_from_json(d: dict) -> Row:
    known = {f.name for f in fields(Row)}
    return Row(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------- the whole table


@dataclass
class Target:
    name: str
    verdict: str  # "PASS", "FAIL" or "not run"
    detail: str


def evaluate_targets(rows: list[Row], real_size: bool) -> list[Target]:
    """The FLUX.1-dev targets (set for an H100), from the rows measured."""
    names = (f"FLUX.1 bf16 LoRA at 512 px <= {TARGET_BF16_512_S} s/step",
             f"FLUX.1 NF4 LoRA peak at 512 px <= {TARGET_NF4_512_GIB:.0f} GiB",
             f"FLUX.1 bf16 LoRA at 1024 px >= {TARGET_BF16_1024_MFU:.0%} MFU")
    if not real_size:
        return [Target(n, "not run", "no CUDA GPU (tiny models only)") for n in names]

    def ok(presets: tuple[str, ...], res: int) -> list[Row]:
        return [r for r in rows if r.model == "flux1" and r.preset in presets and r.resolution == res
                and r.status == "ok"]

    targets = []
    fast = ok(("bf16",), 512)
    if fast:
        best = min(fast, key=lambda r: r.s_per_step)
        targets.append(Target(names[0], "PASS" if best.s_per_step <= TARGET_BF16_512_S else "FAIL",
                              f"{best.s_per_step:.3f} s/step"))
    else:
        targets.append(Target(names[0], "not run", "no FLUX.1 bf16 row at 512 px"))
    small = [r for r in ok(("24gb", "16gb", "12gb"), 512) if r.peak_bytes is not None]
    if small:
        best = min(small, key=lambda r: r.peak_bytes)
        peak = best.peak_bytes / 2**30
        targets.append(Target(names[1], "PASS" if peak <= TARGET_NF4_512_GIB else "FAIL",
                              f"{peak:.1f} GiB ({best.preset})"))
    else:
        targets.append(Target(names[1], "not run", "no FLUX.1 NF4 row at 512 px"))
    busy = [r for r in ok(("bf16",), 1024) if r.mfu is not None]
    if busy:
        best = max(busy, key=lambda r: r.mfu)
        targets.append(Target(names[2], "PASS" if best.mfu >= TARGET_BF16_1024_MFU else "FAIL", f"{best.mfu:.1%}"))
    else:
        targets.append(Target(names[2], "not run", "no FLUX.1 bf16 row at 1024 px with an MFU"))
    return targets


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(rows: list[Row]) -> str:
    """A Markdown table, ready to paste into a note."""
    head = ("| model | preset | res | tokens img+txt | ckpt | s/step | peak GiB | prep GiB | build s | prepare s "
            "| sample s | FLOP/step | MFU | note |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        res = f"{r.resolution}" + (f" ({r.trained_resolution})" if r.trained_resolution not in (None, r.resolution)
                                    else "")
        tokens = f"{r.image_tokens}+{r.text_tokens}" if r.image_tokens is not None else "-"
        ckpt = "-" if r.checkpointing is None else ("yes" if r.checkpointing else "no")
        if r.status == "ok":
            last = r.losses[-1] if r.losses else None
            note = f"loss {last:.3g}" if last is not None else ""
            note += f"; {r.message}" if r.message else ""
        else:
            note = f"{r.status}: {r.error}: {r.message}" + (f" @ {r.where}" if r.where else "")
        if r.cleanup_error:
            note += f"; cleanup: {r.cleanup_error}"
        note = note.replace("|", "/")
        lines.append(f"| {r.model_label} | {r.preset} | {res} | {tokens} | {ckpt} | {_num(r.s_per_step, '.3f')} "
                     f"| {gib(r.peak_bytes)} | {gib(r.prepare_peak_bytes)} | {_num(r.build_s, '.1f')} "
                     f"| {_num(r.prepare_s, '.1f')} | {_num(r.sample_s, '.1f')} | {fmt_flops(r.flops)} "
                     f"| {_num(r.mfu, '.1%')} | {note} |")
    return "\n".join(lines)


def environment(device: str, peak_tflops: float | None) -> dict:
    import diffusers
    import peft
    import torch

    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    return {"device": device, "device_name": name, "peak_bf16_tflops": peak_tflops, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "peft": peft.__version__, "python": platform.python_version()}


def tiny_resolution(resolution: int) -> int:
    """The toy resolution standing in for ``resolution``: 1/16 of it (512 -> 32 px)."""
    return max(16, resolution // 256 * 16)


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
    from services.engine.memory import PRESETS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)} (default all)")
    ap.add_argument("--presets", default=",".join(PRESETS), help=f"comma list of {', '.join(PRESETS)} (default all)")
    ap.add_argument("--resolutions", default="512,1024", help="square training resolutions in px (default 512,1024)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps; the median is reported (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="steps before the timed ones (default 3)")
    ap.add_argument("--images", type=int, default=6, help="training images (default 6)")
    ap.add_argument("--sample-steps", type=int, default=20, help="inference steps of the sample (default 20)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the GPU's dense bf16 peak for MFU (default: from its name; H100 SXM / H200 989)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda where there is one)")
    ap.add_argument("--in-process", action="store_true",
                    help="run every row in this process (default on CUDA: one child process a row)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this path")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)  # model:preset:resolution, for one child
    ap.add_argument("--row-json", type=Path, default=None, help=argparse.SUPPRESS)
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
        if res <= 0 or res % 16:
            ap.error(f"resolution {res} must be a positive multiple of 16")
    if args.steps < 1 or args.warmup < 0 or args.images < 1 or args.sample_steps < 1:
        ap.error("--steps, --images and --sample-steps must be >= 1 and --warmup >= 0")
    return args


def run_all(specs: list[ModelSpec], presets: list[str], resolutions: list[int], plan: Plan, *,
            isolate: bool, work: Path) -> list[Row]:
    rows: list[Row] = []
    for spec in specs:
        for preset in presets:
            for res in resolutions:
                print(f"{spec.label} / {preset} / {res} px ...", flush=True)
                where = work / f"{spec.key}-{preset}-{res}"
                row = (measure_isolated if isolate else measure)(spec, preset, res, plan, where)
                said = (f"ok, {row.s_per_step:.3f} s/step, peak {gib(row.peak_bytes)} GiB" if row.status == "ok"
                        else f"{row.status}: {row.error}: {row.message} @ {row.where}")
                print(f"  {said}", flush=True)
                rows.append(row)
    return rows


def _child(args: argparse.Namespace) -> int:
    """One row (``--row``), written to ``--row-json``: what ``measure_isolated`` starts."""
    model, preset, res = args.row.split(":")
    plan = Plan(args.steps, args.warmup, args.images, args.sample_steps, args.device or "cuda", args.peak_tflops)
    with tempfile.TemporaryDirectory(prefix="flux-bench-row-") as work:
        row = measure(spec_named(model), preset, int(res), plan, Path(work))
    args.row_json.write_text(json.dumps(jsonable(asdict(row)), allow_nan=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from services.engine import quiet_libraries

    quiet_libraries()
    import torch

    if args.row:
        return _child(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    real_size = device.startswith("cuda")
    if real_size:
        specs = [MODELS[m] for m in args.models]
        presets, resolutions = args.presets, args.resolutions
        plan = Plan(args.steps, args.warmup, args.images, args.sample_steps, device,
                    args.peak_tflops or peak_tflops_for(torch.cuda.get_device_name()))
    else:
        print(SKIP_LINE)
        print("Running the tiny models of both families on the CPU instead (same code, small shapes, no preset).")
        specs = list(_tiny_specs().values())  # both families, whatever --models says: this is CI's check
        presets = [CPU_PRESET]
        resolutions = sorted({tiny_resolution(r) for r in args.resolutions})
        plan = Plan(min(args.steps, TINY_STEPS), min(args.warmup, TINY_WARMUP), min(args.images, 2),
                    min(args.sample_steps, TINY_SAMPLE_STEPS), device, args.peak_tflops)
    isolate = real_size and not args.in_process
    env = environment(device, plan.peak_tflops)
    print(f"Device: {env['device_name']} ({device}); peak bf16 {plan.peak_tflops or 'unknown'} TFLOP/s; "
          f"torch {env['torch']}, diffusers {env['diffusers']}, peft {env['peft']}")
    print(f"Trainer.run, rank-{LORA_RANK} LoRA, batch 1, {plan.images} images, {plan.warmup} warm-up + {plan.steps} "
          f"timed steps (median), a {plan.sample_steps}-step sample; resolutions {resolutions}; "
          f"{'one process a row' if isolate else 'in this process'}", flush=True)

    # Toy matmuls run fastest on one thread, and do not slow down when other jobs share the cores.
    threads = torch.get_num_threads()
    if not real_size:
        torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="flux-bench-") as work:
            rows = run_all(specs, presets, resolutions, plan, isolate=isolate, work=Path(work))
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
