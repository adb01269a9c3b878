"""Flow-matching LoRA training of a FLUX transformer, with cached latents and text embeddings.

Both families train here: FLUX.1 and FLUX.2 [klein]; what differs between them (encoders,
latent packing, position ids, the transformer call, LoRA targets) is in ``families``.

The speed lever: every training image goes through the VAE and every caption through the
text encoders exactly once, before the first step (what diffusers' ``train_dreambooth_lora_flux.py``
does with ``--cache_latents`` and fixed instance prompts). The text encoders (T5-XXL alone is
~9 GB in bf16, FLUX.2 [klein]'s Qwen3 4-8B) and the VAE encoder are then freed, so each step is
the transformer alone.
Latents are cached as the VAE posterior (mean and std), and a fresh latent is drawn from it every
step, so caching changes nothing about what is trained.

Images are grouped into aspect-ratio buckets (about ``resolution``² pixels each, sides a multiple
of the bucket step) so nothing is squashed; a batch always comes from one bucket.

Checkpoints (LoRA weights + optimizer state + step + RNG state) are written every
``checkpoint_every`` steps and when cancelled; ``Trainer.run(resume=True)`` continues from the
latest one exactly where it stopped. torch, diffusers and peft are imported lazily.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.storage import atomic
from services.errors import InputError, ProviderError
from services.engine import memory, quiet_libraries
from services.engine.attention import backends as attention_backends, training_attention
from services.engine.card import LORA_FILE, model_card
from services.engine.config import TrainConfig, resolve_family
from services.engine.data import Example, bucket_sizes, fit, pick_bucket, read_dataset_zip, to_pixels
from services.engine.families import FLUX1_LORA_TARGETS, TextEmbeds, adapter

log = logging.getLogger("flux_studio.local_engine")

LORA_TARGETS = FLUX1_LORA_TARGETS  # FLUX.1's; each family names its own (families.py)
# Captions are encoded this many at a time: T5-XXL's activations for 200 captions of 512 tokens in
# one batch would take several GB beside the model (services.engine.memory counts one chunk).
CAPTION_CHUNK = 4
# In the name of every parameter peft adds (lora_A, lora_B, ...), and of no base weight.
LORA_PARAMETER_MARK = "lora_"
# What a run says while ``prepare()`` loads the model and caches the dataset (before the first step).
PREPARING_MESSAGE = "Preparing: encoding the images and captions once…"


def pick_device(device: str | None = None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


PRECISIONS = ("bf16", "fp32")


def check_precision(precision: str) -> str:
    """``precision`` normalised ("" = from the device), or InputError."""
    precision = (precision or "").strip().lower()
    if precision and precision not in PRECISIONS:
        raise InputError(f"There is no precision called {precision!r}.", hint=f"Use one of {', '.join(PRECISIONS)}.")
    return precision


def train_dtype(device: str, precision: str = ""):
    """The dtype the model is held and computes in: ``precision`` ("bf16" / "fp32"), else bf16 on a CUDA
    GPU that has it and fp32 everywhere else."""
    import torch

    precision = check_precision(precision)
    if precision:
        return torch.bfloat16 if precision == "bf16" else torch.float32
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class DivergedError(ProviderError):
    """The loss or the LoRA gradients stopped being finite numbers; the message says when and what to try."""


def divergence(step: int, what: str, value: float, *, first: bool, resumed: bool, cfg: TrainConfig) -> DivergedError:
    """The diagnosis of a non-finite ``what`` (the loss, or a LoRA gradient) at ``step``.

    The first step of a fresh run comes before any update, so the learning rate cannot be the cause
    there: the model's forward or backward pass itself gives the NaN/inf (on GPUs, an attention kernel
    or the precision). Later, with finite steps behind it, too large an update is the usual cause."""
    if first and not resumed:
        return DivergedError(
            f"The {what} is {value} at step {step}, the first step, before any weight was updated: the learning "
            "rate is not the cause; the model's forward or backward pass gives it on this machine.",
            hint='Try the math attention kernel ("attention": "math"), another memory preset ("memory_preset"), '
                 'or full precision ("precision": "fp32"); if it persists, the base model or its dtype is at fault.')
    if first:
        return DivergedError(
            f"The {what} is {value} at step {step}, the first step after resuming from the checkpoint.",
            hint='The checkpoint may hold diverged weights: resume from an earlier one, or train again with a lower '
                 f'learning rate (now {cfg.learning_rate:g}); "attention": "math" or "precision": "fp32" rule out '
                 "the kernels.")
    return DivergedError(
        f"The {what} became {value} at step {step}; the steps before it were finite.",
        hint=f"Lower the learning rate (now {cfg.learning_rate:g}), e.g. to a third.")


# A pipeline for a run: (config, dtype, quantization_config or None) -> a diffusers FLUX pipeline. The default
# loads ``cfg.model_path``; the GPU benchmark builds real-size models in memory instead.
PipelineFactory = Callable[[TrainConfig, object, object], object]


def load_pipeline(cfg: TrainConfig, dtype, quantization_config):
    """The product's pipeline: ``from_pretrained`` on the config's folder, the transformer quantised if asked."""
    kwargs = {"quantization_config": quantization_config} if quantization_config is not None else {}
    return adapter(cfg.family).pipeline_class().from_pretrained(cfg.model_path, dtype=dtype, **kwargs)


# --------------------------------------------------------------------------- config / callbacks


@dataclass
class Callbacks:
    on_step: Callable[[int, int, float, float | None], None] | None = None  # step, total, loss, eta_s
    on_sample: Callable[[int, Path], None] | None = None
    on_checkpoint: Callable[[int, Path], None] | None = None
    cancel: threading.Event | None = None


@dataclass
class TrainResult:
    state: str  # "ready" | "cancelled"
    step: int
    total: int
    losses: list[float] = field(default_factory=list)
    lora_path: Path | None = None
    checkpoint: Path | None = None
    samples: list[Path] = field(default_factory=list)
    seconds: float = 0.0


# --------------------------------------------------------------------------- the trainer


@dataclass
class CachedExample:
    bucket: tuple[int, int]
    mean: object  # packed latent posterior mean, (1, tokens, channels), normalised the family's way
    std: object
    embeds: TextEmbeds
    caption: str

    @property
    def prompt_embeds(self):  # (1, seq, dim)
        return self.embeds.prompt_embeds

    @property
    def pooled(self):  # (1, dim); None for FLUX.2
        return self.embeds.pooled


class Trainer:
    """One LoRA training run. ``prepare()`` then ``run()``; ``step_plain`` is the uncached baseline."""

    def __init__(self, cfg: TrainConfig, zip_path: Path, job_dir: Path, *,
                 pipeline_factory: PipelineFactory | None = None) -> None:
        cfg.family = resolve_family(cfg)
        check_precision(cfg.precision)  # refused now, not after the model is loaded
        attention_backends(cfg.attention)
        self.cfg = cfg
        self.pipeline_factory = pipeline_factory or load_pipeline
        self.zip_path = Path(zip_path)
        self.job_dir = Path(job_dir)
        self.samples_dir = self.job_dir / "samples"
        self.ckpt_dir = self.job_dir / "checkpoints"
        self.out_dir = self.job_dir / "output"
        self.family = adapter(cfg.family)
        self.pipe = None
        self.transformer = None
        self.examples: list[Example] = []
        self.cache: list[CachedExample] = []
        self.text_ids = None
        self.img_ids: dict[tuple[int, int], object] = {}
        self.sample_embeds: TextEmbeds | None = None
        self.negative_embeds: TextEmbeds | None = None  # the empty prompt (FLUX.2's guidance pass)
        self.optimizer = None
        self.params: list = []
        self.losses: list[float] = []
        self.preset = None  # a memory.MemoryPreset on CUDA, set by load()
        self.encode_device: str | None = None  # where the text encoders run (the CPU on small GPUs)
        self._step = 0  # the 0-based step being trained
        self._first_step = 1  # the 1-based number of the first step this process trains (its preflight)

    # ---------------------------------------------------------------- setup

    def load(self) -> None:
        quiet_libraries()
        import torch

        self.device = pick_device(self.cfg.device)
        self.dtype = train_dtype(self.device, self.cfg.precision)
        torch.manual_seed(self.cfg.seed)
        self.examples = read_dataset_zip(self.zip_path, self.cfg.trigger_word)
        self.apply_memory_preset()
        pipe = self.pipeline_factory(self.cfg, self.dtype, memory.pipeline_quantization_config(self.preset))
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.vae_scale = pipe.vae_scale_factor
        self.buckets = bucket_sizes(self.cfg.resolution, self.cfg.bucket_step)
        for m in (pipe.vae, *self.text_encoders(), pipe.transformer):
            m.requires_grad_(False)
            m.eval()

    def text_encoders(self) -> list:
        return [getattr(self.pipe, name) for name in self.family.text_encoder_names]

    def add_lora(self) -> None:
        import torch
        from peft import LoraConfig

        targets = self.family.lora_targets(self.transformer)
        torch.manual_seed(self.cfg.seed)
        self.transformer.add_adapter(LoraConfig(
            r=self.cfg.rank, lora_alpha=self.cfg.rank, init_lora_weights="gaussian", target_modules=targets,
        ))
        if not getattr(self.transformer, "is_quantized", False):  # bitsandbytes already put it on the GPU
            self.transformer.to(self.device)
        # Trainable LoRA weights in fp32 even when the frozen model is bf16 (stable AdamW updates).
        self.named_params = [(n, p) for n, p in self.transformer.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        for p in self.params:
            p.data = p.data.float()
        # diffusers reports a model's dtype as its first floating-point parameter's. In a quantised
        # transformer the base weights are uint8 (NF4), so that would be a LoRA weight: fp32. The
        # pipelines take it at its word when sampling (the latents become fp32, the bf16 VAE refuses them).
        # The LoRA weights are kept in fp32 on purpose, which is what this attribute says to diffusers.
        keep = list(getattr(self.transformer, "_keep_in_fp32_modules", None) or [])
        self.transformer._keep_in_fp32_modules = [*keep, LORA_PARAMETER_MARK]
        if self.cfg.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.transformer.train()
        self.optimizer = memory.make_optimizer(self.params, self.preset, self.cfg.learning_rate)

    def encode_prompts(self, prompts: list[str]) -> list[TextEmbeds]:
        """The embeddings of each prompt, on the training device (encoded on ``encode_device``: the small
        memory presets keep the text encoders on the CPU)."""
        import torch

        encode_on = self.encode_device or self.device
        with torch.no_grad():
            embeds, text_ids = self.family.encode_prompts(self.pipe, prompts, encode_on, self.cfg.max_sequence_length)
        self.text_ids = text_ids.to(self.device)
        return [TextEmbeds(e.prompt_embeds.to(self.device), None if e.pooled is None else e.pooled.to(self.device))
                for e in embeds]

    def encode_captions(self, captions: list[str]) -> list:
        """``encode_prompts`` a few captions at a time (CAPTION_CHUNK), so the batch never costs GBs."""
        out: list = []
        for i in range(0, len(captions), CAPTION_CHUNK):
            out += self.encode_prompts(captions[i:i + CAPTION_CHUNK])
        return out

    def encode_image(self, img, bucket: tuple[int, int]):
        """The VAE posterior of one image, normalised and packed into tokens: (mean, std)."""
        import torch

        with torch.no_grad():
            return self.family.encode_image(self.pipe, to_pixels(fit(img, bucket), self.device, self.pipe.vae.dtype))

    def latent_ids(self, bucket: tuple[int, int]):
        if bucket not in self.img_ids:
            self.img_ids[bucket] = self.family.latent_ids(self.pipe, bucket, self.device, self.dtype)
        return self.img_ids[bucket]

    def sample_prompt(self) -> str:
        return self.cfg.sample_prompt or self.examples[0].caption

    def sample_size(self) -> tuple[int, int]:
        if self.cfg.sample_size:
            return self.cfg.sample_size
        img = self.examples[0].image
        return pick_bucket(img.width, img.height, self.buckets)

    def prepare(self, *, cache: bool = True) -> None:
        """Load, add LoRA, and (``cache``) encode every image and caption once, then free the encoders."""
        import torch

        self.load()
        pipe = self.pipe
        for encoder in self.text_encoders():
            encoder.to(self.encode_device or self.device)
        captions = list(dict.fromkeys([e.caption for e in self.examples] + [self.sample_prompt()]))
        embeds = dict(zip(captions, self.encode_captions(captions)))
        self.sample_embeds = embeds[self.sample_prompt()]
        if self.cfg.family != "flux1":  # classifier-free guidance needs the empty prompt once the encoders are gone
            self.negative_embeds = self.encode_prompts([""])[0]
        pipe.vae.to(self.device)
        self.cache = []
        for ex in self.examples:
            bucket = pick_bucket(ex.image.width, ex.image.height, self.buckets)
            mean, std = self.encode_image(ex.image, bucket) if cache else (None, None)
            self.cache.append(CachedExample(bucket, mean, std, embeds[ex.caption], ex.caption))
        if cache:
            self.free_encoders()
        self.add_lora()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def apply_memory_preset(self) -> None:
        """Pick the memory preset (none on the CPU); it may cap the resolution and force checkpointing."""
        self.preset = memory.resolve_preset(self.cfg.memory_preset, self.device)
        self.encode_device = "cpu" if self.preset is not None and self.preset.encoders_on_cpu else self.device
        if self.preset is None:
            return
        resolution = memory.training_resolution(self.preset, self.cfg.resolution)
        if resolution != self.cfg.resolution:
            log.info("Memory preset %s: training at %d px instead of %d", self.preset.name, resolution,
                     self.cfg.resolution)
        self.cfg.resolution = resolution  # so the model card says what was trained
        self.cfg.gradient_checkpointing = memory.checkpointing_for(self.preset, self.cfg.gradient_checkpointing)

    def free_encoders(self) -> None:
        """Drop the text encoders and the VAE encoder: only the transformer and VAE decoder are left."""
        import gc

        import torch

        for name in self.family.text_encoder_names:
            setattr(self.pipe, name, None)
        self.pipe.vae.encoder = None
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- steps

    def batch_indices(self, step: int) -> list[int]:
        """The examples of 0-based ``step``: a per-epoch shuffle, batches from one bucket, resumable."""
        import torch

        bs = max(1, self.cfg.batch_size)
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, c in enumerate(self.cache):
            by_bucket.setdefault(c.bucket, []).append(i)
        batches_per_epoch = sum(math.ceil(len(v) / bs) for v in by_bucket.values())
        epoch, pos = divmod(step, batches_per_epoch)
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        batches: list[list[int]] = []
        for bucket in sorted(by_bucket):
            idx = by_bucket[bucket]
            order = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            batches += [order[k:k + bs] for k in range(0, len(order), bs)]
        perm = torch.randperm(len(batches), generator=g).tolist()
        return batches[perm[pos]]

    def flow_loss(self, latents, embeds: list[TextEmbeds], img_ids, gen):
        """One flow-matching loss: x_t = (1 - s) x0 + s noise, the model predicts noise - x0."""
        import torch

        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=gen, device="cpu").to(self.device, latents.dtype)
        sigmas = torch.rand((b,), generator=gen, device="cpu").to(self.device, latents.dtype)
        s = sigmas.view(b, 1, 1)
        noisy = (1.0 - s) * latents + s * noise
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.cfg.guidance, device=self.device, dtype=torch.float32)
        pred = self.family.predict(self.transformer, noisy, sigmas, embeds, self.text_ids, img_ids, guidance,
                                   self.dtype)
        target = noise - latents
        return torch.mean((pred.float() - target.float()) ** 2)

    def _optimise(self, loss, preflight: bool = False) -> float:
        """Backward, clip, update; returns the loss. ``preflight``: check the loss and every LoRA gradient
        are finite before the update, and raise the diagnosis (``divergence``) if not."""
        import torch

        if preflight:
            value = float(loss.detach())
            if not math.isfinite(value):
                raise self._diverged("loss", value)
        loss.backward()
        if preflight:
            self.check_gradients()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def check_gradients(self) -> None:
        """A DivergedError naming the first LoRA weight whose gradient is not finite (one sync for all)."""
        import torch

        grads = [(n, p.grad) for n, p in self.named_params if p.grad is not None]
        if not grads:
            return
        finite = torch.stack([torch.isfinite(g).all() for _, g in grads]).cpu()
        if bool(finite.all()):
            return
        bad = [(n, g) for (n, g), ok in zip(grads, finite.tolist()) if not ok]
        name, grad = bad[0]
        value = grad[~torch.isfinite(grad)].flatten()[0].item()
        raise self._diverged(f"gradient of {len(bad)} of {len(grads)} LoRA weights (first {name})", value)

    def _diverged(self, what: str, value: float) -> DivergedError:
        step = self._step + 1
        return divergence(step, what, value, first=step == self._first_step, resumed=self._first_step > 1,
                          cfg=self.cfg)

    def step_cached(self, step: int, gen) -> float:
        """One step from the cache: draw latents from the cached posteriors, no encoder runs."""
        import torch

        items = [self.cache[i] for i in self.batch_indices(step)]
        mean = torch.cat([c.mean for c in items])
        std = torch.cat([c.std for c in items])
        eps = torch.randn(mean.shape, generator=gen, device="cpu").to(self.device, mean.dtype)
        latents = (mean + std * eps).float()
        return self._learn(step, latents, [c.embeds for c in items], items[0].bucket, gen)

    def step_plain(self, step: int, gen) -> float:
        """The baseline: re-encode this batch's images (VAE) and captions (text encoders) every step."""
        import torch

        idx = self.batch_indices(step)
        items = [self.cache[i] for i in idx]
        with torch.no_grad():
            enc = self.encode_prompts([c.caption for c in items])
            packed = [self.encode_image(self.examples[i].image, self.cache[i].bucket) for i in idx]
        mean = torch.cat([m for m, _ in packed])
        std = torch.cat([s for _, s in packed])
        eps = torch.randn(mean.shape, generator=gen, device="cpu").to(self.device, mean.dtype)
        latents = (mean + std * eps).float()
        return self._learn(step, latents, enc, items[0].bucket, gen)

    def _learn(self, step: int, latents, embeds, bucket: tuple[int, int], gen) -> float:
        """The flow-matching loss of ``latents`` and its update, under the training attention kernels
        (forward, backward and any recomputation); the first step this process trains is preflighted."""
        self._step = step
        with training_attention(self.cfg.attention):
            loss = self.flow_loss(latents, embeds, self.latent_ids(bucket), gen)
            return self._optimise(loss, preflight=step + 1 == self._first_step)

    # ---------------------------------------------------------------- samples, checkpoints, output

    def sample(self, step: int) -> Path:
        import torch

        w, h = self.sample_size()
        vae = self.pipe.vae
        # The pipelines make their latents in the prompt embeddings' dtype and keep the scheduler's output
        # in the transformer output's dtype; neither need be the VAE's (a quantised transformer with fp32
        # LoRA weights gives fp32). So: embeddings in the dtype and on the device the transformer computes
        # in, and the latents brought back to the VAE's dtype after every step.
        on = next(p.device for p in self.transformer.parameters())
        embeds = {k: v.to(on, self.dtype) for k, v in
                  self.family.sample_kwargs(self.sample_embeds, self.negative_embeds).items()}

        def latents_for_the_vae(pipe, i, t, tensors: dict) -> dict:
            return {"latents": tensors["latents"].to(vae.dtype)}

        self.transformer.eval()
        try:
            gen = torch.Generator(device="cpu").manual_seed(self.cfg.sample_seed)
            image = self.pipe(
                **embeds, width=w, height=h,
                num_inference_steps=self.cfg.sample_steps, guidance_scale=self.cfg.sample_guidance,
                max_sequence_length=self.cfg.max_sequence_length, generator=gen,
                callback_on_step_end=latents_for_the_vae, callback_on_step_end_tensor_inputs=["latents"],
            ).images[0]
        finally:
            self.transformer.train()
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        path = self.samples_dir / f"step_{step:06d}.png"
        with atomic.replacing(path) as tmp:
            image.save(tmp, "PNG")
        return path

    def lora_state_dict(self) -> dict:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(self.transformer).items()}

    def save_checkpoint(self, step: int, gen) -> Path:
        """LoRA weights + optimizer + step + RNG, written to a temp folder then renamed; older ones removed."""
        import torch
        from safetensors.torch import save_file

        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        final = self.ckpt_dir / f"step_{step:06d}"
        tmp = self.ckpt_dir / f".tmp-step_{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(self.lora_state_dict(), str(tmp / "lora.safetensors"))
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"generator": gen.get_state(), "torch": torch.get_rng_state()}, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({
            "step": step, "total": self.cfg.steps, "losses": self.losses, "seed": self.cfg.seed,
            "rank": self.cfg.rank, "learning_rate": self.cfg.learning_rate, "saved_at": time.time(),
        }))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self.ckpt_dir.glob("step_*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path, gen) -> int:
        import torch
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = json.loads((path / "trainer_state.json").read_text())
        sd = load_file(str(path / "lora.safetensors"), device=str(self.device))
        result = set_peft_model_state_dict(self.transformer, sd, adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"checkpoint does not match the model ({len(unexpected)} unexpected keys)")
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True))
        rng = torch.load(path / "rng.pt", weights_only=True)
        gen.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        self.losses = list(state.get("losses", []))
        return int(state["step"])

    def save_lora(self, samples: list[Path]) -> Path:
        tmp = self.job_dir / ".output.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        config = self.transformer.peft_config["default"]
        metadata = None
        try:
            metadata = config.to_dict()
            metadata = json.loads(json.dumps(metadata, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
        except Exception:
            metadata = None
        kwargs = {"transformer_lora_adapter_metadata": metadata} if metadata else {}
        self.family.pipeline_class().save_lora_weights(tmp, transformer_lora_layers=self.lora_state_dict(), **kwargs)
        shown = []
        if samples:
            (tmp / "samples").mkdir()
            for p in samples[-4:]:
                shutil.copy2(p, tmp / "samples" / p.name)
                shown.append(f"samples/{p.name}")
        (tmp / "README.md").write_text(model_card(self.cfg, len(self.examples), shown, self.losses), encoding="utf-8")
        shutil.rmtree(self.out_dir, ignore_errors=True)
        os.replace(tmp, self.out_dir)
        return self.out_dir / LORA_FILE

    # ---------------------------------------------------------------- the loop

    def run(self, callbacks: Callbacks | None = None, *, resume: bool = False) -> TrainResult:
        import torch

        cb = callbacks or Callbacks()
        started = time.monotonic()
        if self.pipe is None:
            self.prepare()
        gen = torch.Generator(device="cpu").manual_seed(self.cfg.seed)
        step = 0
        if resume:
            ckpt = latest_checkpoint(self.ckpt_dir)
            if ckpt is None:
                raise InputError("There is no checkpoint to resume from.", hint="Launch the fine-tune again.")
            step = self.load_checkpoint(ckpt, gen)
        self._first_step = step + 1
        total = self.cfg.steps
        samples = sorted(self.samples_dir.glob("step_*.png")) if resume else []
        durations: list[float] = []
        last_ckpt: Path | None = latest_checkpoint(self.ckpt_dir) if resume else None
        while step < total:
            if cb.cancel is not None and cb.cancel.is_set():
                last_ckpt = self.save_checkpoint(step, gen)
                if cb.on_checkpoint:
                    cb.on_checkpoint(step, last_ckpt)
                return TrainResult("cancelled", step, total, self.losses, None, last_ckpt, samples,
                                   time.monotonic() - started)
            t0 = time.monotonic()
            loss = self.step_cached(step, gen)
            step += 1
            self.losses.append(loss)
            durations.append(time.monotonic() - t0)
            recent = durations[-20:]
            eta = (sum(recent) / len(recent)) * (total - step)
            if not math.isfinite(loss):
                raise self._diverged("loss", loss)
            if cb.on_step:
                cb.on_step(step, total, loss, eta)
            if self.cfg.sample_every and step % self.cfg.sample_every == 0 and step < total:
                samples.append(self.sample(step))
                if cb.on_sample:
                    cb.on_sample(step, samples[-1])
            if self.cfg.checkpoint_every and step % self.cfg.checkpoint_every == 0 and step < total:
                last_ckpt = self.save_checkpoint(step, gen)
                if cb.on_checkpoint:
                    cb.on_checkpoint(step, last_ckpt)
        samples.append(self.sample(step))
        if cb.on_sample:
            cb.on_sample(step, samples[-1])
        lora = self.save_lora(samples)
        return TrainResult("ready", step, total, self.losses, lora, last_ckpt, samples, time.monotonic() - started)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint (incomplete ones are still named ``.tmp-*``)."""
    found = sorted(p for p in Path(ckpt_dir).glob("step_*") if (p / "trainer_state.json").is_file())
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    return int(json.loads((path / "trainer_state.json").read_text())["step"])
