"""Tiny, randomly initialised FLUX pipelines built in code: no download, no weights.

Two of them, one per family the engine trains:

* FLUX.1: the real architecture (CLIP + T5 text encoders, a FLUX transformer, a KL VAE, the
  flow-matching scheduler) at toy sizes, following diffusers' own test components
  (``tests/pipelines/flux/test_pipeline_flux.py``, ``get_dummy_components``).
* FLUX.2 [klein]: a Qwen3 text encoder (28 layers, so the pipeline's default hidden-state taps
  9, 18 and 27 exist), a FLUX.2 transformer and the FLUX.2 VAE (with its latent batch-norm
  statistics), after ``tests/pipelines/flux2/test_pipeline_flux2_klein.py``.

Their images are noise; they exist so the whole train -> sample -> checkpoint -> LoRA -> compare
workflow runs anywhere, on a CPU, in seconds, through the very same ``from_pretrained`` call a
real model uses. Every tokenizer is built from a vocabulary written here, never downloaded.

``ensure_tiny_model(folder, family)`` writes one once with ``save_pretrained`` (built in a
temporary folder, then renamed into place, so a crash never leaves half a model behind).
"""
from __future__ import annotations

import os
import shutil
import string
import tempfile
import threading
from pathlib import Path

SEED = 0
# Bumped whenever the architecture or tokenizers change, so an old copy is rebuilt.
VERSION = "1"
FLUX2_VERSION = "flux2-1"
MARKER = "tiny-flux.version"
# Resolution knobs the engine uses for these models (their VAEs do not downsample).
TRAIN_RESOLUTION = 64
MAX_SEQUENCE_LENGTH = 32
# The Qwen chat template alone takes ~25 tokens of the FLUX.2 prompt.
FLUX2_MAX_SEQUENCE_LENGTH = 64
QWEN_HIDDEN = 16
QWEN_LAYERS = 28
DEFAULT_STEPS = 4
MAX_GENERATE_SIDE = 128

_LOCK = threading.Lock()

# Words the T5 tokenizer knows whole; everything else falls back to single characters.
_WORDS = (
    "a an the of on in at with and or to for by from is are this that photo picture image portrait style "
    "man woman person people dog cat bird car house tree sky sea beach city street room table chair "
    "red green blue yellow black white orange purple pink brown gray grey dark light bright "
    "small big large tiny old new young happy sunny night day morning evening "
    "standing sitting walking running holding wearing looking smiling close up view background "
    "ball grass sand water wall floor window door shirt hat glasses hair face hand product bottle cup "
    "painting drawing sketch watercolor oil digital art render 3d cinematic studio lighting tok"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_tokenizer():
    """A byte-level BPE CLIP tokenizer over single bytes (one token per character), built in code."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    """A Unigram T5 tokenizer over common words, letters, digits and punctuation, built in code."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    seen = {p for p, _ in pieces}
    for w in _WORDS:
        piece = "▁" + w
        if piece not in seen:
            pieces.append((piece, -4.0))
            seen.add(piece)
    for ch in string.ascii_letters + string.digits + string.punctuation:
        for piece in (ch, "▁" + ch):
            if piece not in seen:
                pieces.append((piece, -8.0))
                seen.add(piece)
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


# Qwen3's chat template, reduced to what Flux2KleinPipeline asks of it (one user turn, no thinking).
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def qwen_tokenizer():
    """A byte-level BPE Qwen2 tokenizer (one token per byte) with Qwen's special tokens and chat template."""
    from transformers import Qwen2TokenizerFast

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        vocab[token] = len(vocab)
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=512, extra_special_tokens=["<|im_start|>", "<think>", "</think>"])
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def build_tiny_flux2_pipeline():
    """The tiny FLUX.2 [klein] pipeline in memory, identical on every call (fixed seeds)."""
    from services.engine import quiet_libraries

    quiet_libraries()
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = qwen_tokenizer()
    torch.manual_seed(SEED)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=QWEN_HIDDEN, intermediate_size=32, num_hidden_layers=QWEN_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    ))
    torch.manual_seed(SEED)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,  # the VAE's one latent channel, patchified 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * QWEN_HIDDEN,  # three hidden-state taps, stacked
        timestep_guidance_channels=32,
        axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=False,  # like [klein] base: real classifier-free guidance
    )
    torch.manual_seed(SEED)
    vae = AutoencoderKLFlux2(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    # Non-trivial latent statistics, so the batch-norm (de)normalisation is really exercised.
    vae.bn.running_mean.fill_(0.1)
    vae.bn.running_var.fill_(2.0)
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=transformer)


def build_tiny_pipeline():
    """The tiny FLUX.1 pipeline in memory, identical on every call (fixed seeds)."""
    from services.engine import quiet_libraries

    quiet_libraries()
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = clip_tokenizer()
    tokenizer_2 = t5_tokenizer()

    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=len(tokenizer),
        hidden_act="gelu",
        projection_dim=32,
        max_position_embeddings=77,
    ))
    torch.manual_seed(SEED)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=5,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id,
    ))
    torch.manual_seed(SEED)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    scheduler = FlowMatchEulerDiscreteScheduler()
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )


def is_tiny_model(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def ensure_tiny_model(folder: Path, family: str = "flux1") -> Path:
    """Write the tiny model of ``family`` ("flux1" or "flux2") to ``folder`` once (atomically); returns ``folder``."""
    folder = Path(folder)
    marker = folder / MARKER
    version, build = (VERSION, build_tiny_pipeline) if family == "flux1" else (FLUX2_VERSION, build_tiny_flux2_pipeline)
    with _LOCK:
        if marker.is_file() and marker.read_text().strip() == version:
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            build().save_pretrained(tmp, safe_serialization=True)
            (tmp / MARKER).write_text(version + "\n")
            if folder.exists():  # an older version (or a broken leftover): replace it
                old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
                os.replace(folder, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder
