"""A trained LoRA's model card: the front matter the Hub reads (base model, tags, widget) and how to use it,
and the names of the LoRA's files (the trainer's, and the exports ``lora_formats`` writes)."""
from __future__ import annotations

import re
from collections.abc import Sequence

from services.errors import InputError
from services.engine.config import TrainConfig
from services.engine.models import FLUX2

LORA_FILE = "pytorch_lora_weights.safetensors"
# The export formats (services.engine.lora_formats): diffusers keys, and what ComfyUI loads.
DIFFUSERS, COMFYUI = "diffusers", "comfyui"


def export_filename(fmt: str, family: str, trigger_word: str = "") -> str:
    """An exported file's name: the trigger word, the family and the format (what a ComfyUI user sees
    in the LoRA picker, so not a generic name two LoRAs would share)."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", trigger_word).strip("-")[:40] or "lora"
    return f"{slug}-{'flux2-klein' if family == FLUX2 else 'flux1'}-{fmt}.safetensors"


def model_card(cfg: TrainConfig, image_count: int, samples: list[str], losses: list[float]) -> str:
    """A Hugging Face model card: front matter (base_model, tags) and how to use the LoRA."""
    from services.engine import models

    try:
        base_model = models.resolve(cfg.base_model or cfg.base_model_id or cfg.model_path)
    except InputError:  # a folder moved since: the family's defaults will do for the snippet
        base_model = models.FAMILY_DEFAULTS[cfg.family]
    pipeline_class = models.pipeline_of(cfg.family)
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=cfg.base_model_id or None, library_name="diffusers", pipeline_tag="text-to-image",
        instance_prompt=cfg.trigger_word,
        tags=["lora", "flux", "diffusers", "text-to-image", "flux-finetune-studio",
              *(["flux2-klein"] if cfg.family == models.FLUX2 else [])],
        widget=[{"text": cfg.sample_prompt or cfg.trigger_word, "output": {"url": s}} for s in samples[-1:]] or None,
    )
    base = cfg.base_model_label or cfg.base_model_id or cfg.model_path
    load_id = cfg.base_model_id or "<path to the base model>"
    params = {
        "base_model": cfg.base_model or base,
        "steps": cfg.steps, "learning_rate": cfg.learning_rate, "lora_rank": cfg.rank, "lora_alpha": cfg.rank,
        "resolution": cfg.resolution, "batch_size": cfg.batch_size, "seed": cfg.seed,
        "training_images": image_count,
        "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 5) if losses else None,
    }
    body = [
        "",
        f"# {'FLUX.2 [klein]' if cfg.family == models.FLUX2 else 'FLUX'} LoRA: {cfg.trigger_word}",
        "",
        f"A LoRA for **{base}**, trained with FLUX Finetune Studio's local engine "
        "(flow matching, LoRA on the transformer's attention projections).",
        "",
        f"Use the trigger word **`{cfg.trigger_word}`** in your prompt.",
        "",
        "## Parameters",
        "",
        "| parameter | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in params.items()],
        "",
    ]
    body += files_section(cfg.family, cfg.trigger_word)
    if samples:
        body += ["## Samples", "", *[f"![sample]({s})" for s in samples], ""]
    body += [
        "## Use it with diffusers",
        "",
        "```python",
        "import torch",
        f"from diffusers import {pipeline_class}",
        "",
        f"pipe = {pipeline_class}.from_pretrained({load_id!r}, torch_dtype=torch.bfloat16).to('cuda')",
        f"pipe.load_lora_weights('<this repo or folder>', weight_name={LORA_FILE!r})",
        f"image = pipe(prompt={(cfg.trigger_word + ', a photo')!r}, num_inference_steps={base_model.sample_steps}, "
        f"guidance_scale={base_model.sample_guidance:g}).images[0]",
        "```",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(body)))


def files_section(family: str, trigger_word: str, exported: Sequence[str] | None = None) -> list[str]:
    """The card's "which file is for which tool" table (the exports are made by ``lora_formats``).

    ``exported``: the export formats written beside the LoRA so far, each listed as a file of the folder;
    None (a fresh training's card) lists the ComfyUI file as one made on demand."""
    from services.engine import models

    comfy = export_filename(COMFYUI, family, trigger_word)
    if family == models.FLUX2:
        comfy_keys = "the original BFL keys (`diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`)"
        comfy_tools = "ComfyUI (*LoraLoaderModelOnly*, from `models/loras`) and BFL's FLUX.2 LoRA inference"
    else:
        comfy_keys = "kohya keys (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` + `.alpha`)"
        comfy_tools = "ComfyUI (*LoraLoaderModelOnly*, from `models/loras`), Forge and kohya's tools"
    rows = {
        DIFFUSERS: f"| `{export_filename(DIFFUSERS, family, trigger_word)}` | diffusers / PEFT, with the base model and "
                   "trigger word in its metadata | diffusers `load_lora_weights` |",
        COMFYUI: f"| `{comfy}` | {comfy_keys}, q/k/v fused | {comfy_tools} |",
    }
    shown = [COMFYUI] if exported is None else [f for f in (DIFFUSERS, COMFYUI) if f in exported]
    if exported is None:
        note = (f"The `{comfy}` file is made on demand (Train tab, or the Python API's `export_lora`). Both hold the "
                "same weights exactly, at scale 1 (alpha = rank), so a strength means the same in every tool.")
    else:
        note = ("Every file holds the same weights exactly, at scale 1 (alpha = rank), so a strength means the same "
                "in every tool. Other formats are made on demand (Train tab, or the Python API's `export_lora`).")
    return [
        "## Files",
        "",
        "| file | keys | load it in |",
        "|---|---|---|",
        f"| `{LORA_FILE}` | diffusers / PEFT (`transformer.…lora_A.weight`) | diffusers `load_lora_weights`, "
        "FLUX Finetune Studio's Compare |",
        *[rows[f] for f in shown],
        "",
        note,
        "",
    ]


def with_files(card: str, family: str, trigger_word: str, exported: Sequence[str]) -> str:
    """``card`` (a model card's text) with its Files section listing the exports written (``files_section``);
    a card without one gets it at the end."""
    section = "\n".join(files_section(family, trigger_word, exported)) + "\n"
    match = re.search(r"^## Files\n.*?(?=^## |\Z)", card, flags=re.MULTILINE | re.DOTALL)
    if match is None:
        return card.rstrip("\n") + "\n\n" + section
    return card[:match.start()] + section + card[match.end():]
