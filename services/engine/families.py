"""What differs between FLUX.1 and FLUX.2 [klein] in training and sampling, one adapter per family.

The trainer and the generator are written once; everything family-specific goes through
``adapter(family)``: the pipeline class, prompt encoding, how VAE latents are normalised and
packed into tokens, their position ids, the transformer call, the modules LoRA goes on, and
the pipeline arguments for a sample from cached embeddings. torch / diffusers are imported
lazily, inside the methods.

FLUX.1 (``FluxPipeline``): CLIP (pooled) + T5 embeddings; latents shifted/scaled, packed in 2x2
patches; 3-axis position ids; the guidance value is an embedding input ([dev]).
FLUX.2 [klein] (``Flux2KleinPipeline``): Qwen3 hidden states of three layers, stacked; latents
patchified 2x2, then normalised with the VAE's batch-norm statistics; 4-axis (T, H, W, L)
position ids; classifier-free guidance in two passes (so a sample from cached embeddings also
needs the empty prompt's). Both are trained with the same flow-matching objective: the model
sees ``(1 - s) x0 + s noise`` at timestep ``s`` and predicts ``noise - x0``, as diffusers'
``train_dreambooth_lora_flux.py`` and ``train_dreambooth_lora_flux2_klein.py`` do.
"""
from __future__ import annotations

from typing import NamedTuple

from services.engine.models import FLUX1, FLUX2

# Attention projections LoRA is put on (double-stream blocks also have the add_* context ones).
FLUX1_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# FLUX.2 adds the single-stream blocks' fused projections: QKV + MLP in, attention + MLP out.
FLUX2_LORA_TARGETS = FLUX1_LORA_TARGETS + ("to_qkv_mlp_proj",)


class TextEmbeds(NamedTuple):
    """One prompt's cached encoder output: FLUX.1 has a pooled vector as well, FLUX.2 none."""

    prompt_embeds: object  # (1, seq, dim)
    pooled: object | None = None  # (1, dim)


def _suffix_targets(transformer, suffixes: tuple[str, ...]) -> list[str]:
    names = {n for n, _ in transformer.named_modules()}
    return [t for t in suffixes if any(n == t or n.endswith("." + t) for n in names)]


class Flux1:
    family = FLUX1
    text_encoder_names = ("text_encoder", "text_encoder_2")

    def pipeline_class(self):
        from diffusers import FluxPipeline

        return FluxPipeline

    def lora_targets(self, transformer) -> list[str]:
        return _suffix_targets(transformer, FLUX1_LORA_TARGETS)

    def encode_prompts(self, pipe, prompts: list[str], device, max_sequence_length: int):
        """([TextEmbeds] per prompt, the text position ids every batch shares)."""
        pe, pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=None, device=device,
                                                  max_sequence_length=max_sequence_length)
        return [TextEmbeds(pe[i:i + 1], pooled[i:i + 1]) for i in range(len(prompts))], text_ids

    def encode_image(self, pipe, pixels):
        """The VAE posterior of a (1, 3, h, w) image, shifted/scaled and packed: (mean, std) tokens."""
        vae = pipe.vae
        dist = vae.encode(pixels).latent_dist
        sf, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
        mean = (dist.mean - shift) * sf
        std = dist.std * sf
        b, c, h, w = mean.shape
        return pipe._pack_latents(mean, b, c, h, w), pipe._pack_latents(std, b, c, h, w)

    def latent_ids(self, pipe, bucket: tuple[int, int], device, dtype):
        w, h = bucket
        lh, lw = h // pipe.vae_scale_factor, w // pipe.vae_scale_factor
        return pipe._prepare_latent_image_ids(1, lh // 2, lw // 2, device, dtype)

    def predict(self, transformer, noisy, sigmas, embeds: list[TextEmbeds], text_ids, img_ids, guidance, dtype):
        import torch

        return transformer(
            hidden_states=noisy.to(dtype),
            timestep=sigmas.to(dtype),
            guidance=guidance,
            pooled_projections=torch.cat([e.pooled for e in embeds]).to(dtype),
            encoder_hidden_states=torch.cat([e.prompt_embeds for e in embeds]).to(dtype),
            txt_ids=text_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]

    def sample_kwargs(self, embeds: TextEmbeds, negative: TextEmbeds | None) -> dict:
        return {"prompt_embeds": embeds.prompt_embeds, "pooled_prompt_embeds": embeds.pooled}


class Flux2:
    family = FLUX2
    text_encoder_names = ("text_encoder",)

    def pipeline_class(self):
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline

    def lora_targets(self, transformer) -> list[str]:
        import torch

        # A single-stream block's attn.to_out is a Linear, a double-stream block's a ModuleList
        # (whose to_out.0 is already a target): name the single-stream ones in full.
        single = [n for n, m in transformer.named_modules()
                  if n.startswith("single_transformer_blocks.") and n.endswith(".attn.to_out")
                  and isinstance(m, torch.nn.Linear)]
        return _suffix_targets(transformer, FLUX2_LORA_TARGETS) + single

    def encode_prompts(self, pipe, prompts: list[str], device, max_sequence_length: int):
        pe, text_ids = pipe.encode_prompt(prompts, device=device, max_sequence_length=max_sequence_length)
        # Every prompt is padded to the same length, so one row of ids serves any batch.
        return [TextEmbeds(pe[i:i + 1]) for i in range(len(prompts))], text_ids[:1]

    def encode_image(self, pipe, pixels):
        """Posterior mean/std, patchified 2x2 and normalised by the VAE's batch-norm stats, as tokens."""
        import torch

        vae = pipe.vae
        dist = vae.encode(pixels).latent_dist
        mean, std = pipe._patchify_latents(dist.mean), pipe._patchify_latents(dist.std)
        bn_mean = vae.bn.running_mean.view(1, -1, 1, 1).to(mean.device, mean.dtype)
        bn_var = vae.bn.running_var.view(1, -1, 1, 1)
        bn_std = torch.sqrt(bn_var + vae.config.batch_norm_eps).to(mean.device, mean.dtype)
        return pipe._pack_latents((mean - bn_mean) / bn_std), pipe._pack_latents(std / bn_std)

    def latent_ids(self, pipe, bucket: tuple[int, int], device, dtype):
        import torch

        w, h = bucket
        lh, lw = h // pipe.vae_scale_factor, w // pipe.vae_scale_factor
        return pipe._prepare_latent_ids(torch.zeros(1, 1, lh // 2, lw // 2)).to(device)

    def predict(self, transformer, noisy, sigmas, embeds: list[TextEmbeds], text_ids, img_ids, guidance, dtype):
        import torch

        pred = transformer(
            hidden_states=noisy.to(dtype),
            timestep=sigmas.to(dtype),
            guidance=guidance,
            encoder_hidden_states=torch.cat([e.prompt_embeds for e in embeds]).to(dtype),
            txt_ids=text_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return pred[:, : noisy.shape[1]]

    def sample_kwargs(self, embeds: TextEmbeds, negative: TextEmbeds | None) -> dict:
        kwargs = {"prompt_embeds": embeds.prompt_embeds}
        if negative is not None:  # the encoders are gone by then: the empty prompt was cached too
            kwargs["negative_prompt_embeds"] = negative.prompt_embeds
        return kwargs


_ADAPTERS = {FLUX1: Flux1(), FLUX2: Flux2()}


def adapter(family: str) -> Flux1 | Flux2:
    try:
        return _ADAPTERS[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}") from None
