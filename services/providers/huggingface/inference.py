"""Generating through Hugging Face Inference Providers: the base model, or a fine-tune's LoRA repo.

A LoRA is served only where an inference provider maps it (``model_info(expand=["inferenceProviderMapping"])``):
providers serve public LoRA repos whose base model they run (FLUX.1-dev). How strongly it is applied
depends on who serves it: huggingface_hub's Replicate task passes the request's ``extra_body`` into
Replicate's input, where ``lora_scale`` sets the strength; its fal-ai task writes ``loras`` itself with
``scale: 1`` after ``extra_body`` is merged, so fal applies a LoRA at full strength whatever is asked.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from services.errors import NotServedError
from services.providers.base import GeneratedImage, GenerateRequest

TASK = "text-to-image"
SETS_STRENGTH = frozenset({"replicate"})  # providers whose LoRA strength extra_body sets
STRENGTH_FIELD = "lora_scale"  # Replicate's flux-dev-lora input


@dataclass(frozen=True)
class Serving:
    """Who serves a model repo for text-to-image, and whether the strength can be set there."""

    provider: str
    provider_id: str

    @property
    def sets_strength(self) -> bool:
        return self.provider in SETS_STRENGTH


def live_mappings(info) -> list:
    return [m for m in (getattr(info, "inference_provider_mapping", None) or [])
            if m.status == "live" and m.task == TASK]


def serving(info, repo_id: str, wanted: str, base_model: str) -> Serving:
    """The provider that will serve ``repo_id`` (``wanted``, or the first live one for "auto");
    NotServedError, with what to do, where none does."""
    live = live_mappings(info)
    if wanted and wanted != "auto":
        chosen = [m for m in live if m.provider == wanted]
        if not chosen and live:
            raise NotServedError(
                f"{repo_id} is not served by {wanted} (FLUX_HF_INFERENCE_PROVIDER), only by "
                f"{', '.join(sorted({m.provider for m in live}))}.",
                hint="Set FLUX_HF_INFERENCE_PROVIDER=auto (or one of those), or render it with the local engine.")
        live = chosen
    if not live:
        raise NotServedError(
            f"The adapter {repo_id} is not served by any Hugging Face inference provider.",
            hint=f"Providers serve only public LoRAs whose base model is {base_model}: make the repo public "
                 "on the Hub (its settings page) and wait a few minutes, or render it with the local engine "
                 "(publish/download the LoRA and generate locally).")
    return Serving(live[0].provider, live[0].provider_id)


def strength_reason(serve: Serving) -> str:
    if serve.sets_strength:
        return ""
    return (f"{serve.provider} applies a LoRA at full strength through Hugging Face (huggingface_hub sends "
            "scale 1), so a strength sweep would show the same image: use "
            "FLUX_HF_INFERENCE_PROVIDER=replicate where it serves the adapter, or the local engine.")


def text_to_image(client, request: GenerateRequest, out_dir: Path, *, model: str, provider: str,
                  finetune: str | None, strength: float | None) -> GeneratedImage:
    """One image from ``client`` (an ``InferenceClient`` for ``provider``), saved at once under ``out_dir``."""
    extra = {STRENGTH_FIELD: strength} if finetune and strength is not None else None
    started = time.monotonic()
    image = client.text_to_image(request.prompt, model=model, width=request.width, height=request.height,
                                 num_inference_steps=request.steps, guidance_scale=request.guidance,
                                 seed=request.seed, extra_body=extra)
    latency = time.monotonic() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    png = request.output_format == "png"
    path = out_dir / f"hf-{uuid.uuid4().hex[:12]}.{'png' if png else 'jpg'}"
    if png:
        image.save(path, format="PNG")
    else:
        image.convert("RGB").save(path, format="JPEG", quality=95)
    params = {"model": model, "provider": provider, "prompt": request.prompt, "seed": request.seed,
              "width": request.width, "height": request.height, "steps": request.steps,
              "guidance": request.guidance, "output_format": request.output_format}
    if finetune:
        # The strength the provider actually applied (fal: always 1.0, whatever was asked).
        params.update({"finetune_id": finetune, "finetune_strength": 1.0 if strength is None else strength,
                       "strength_requested": request.strength})
    return GeneratedImage(path=path, model=model, seed=request.seed, latency_s=latency, params=params)
