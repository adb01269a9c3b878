"""A LoRA in the key layouts other tools read, and any FLUX LoRA read back for the local engine.

Three layouts name the same weights:

* ``diffusers``: PEFT keys on diffusers' module names, ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``
  (what the trainer saves; ``load_lora_weights`` reads it);
* ``bfl``: the original Black Forest Labs module names, ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``
  (ai-toolkit's FLUX.2 files; what ComfyUI and BFL's FLUX.2 LoRA inference take);
* ``kohya``: the same names flattened, ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` plus
  ``.alpha`` (kohya sd-scripts, FluxGym, musubi; what ComfyUI and Forge load for FLUX.1).

BFL's model fuses what diffusers keeps apart: a double-stream block's q, k and v are one ``qkv``
projection, and FLUX.1's single-stream ``linear1`` is q, k, v and the MLP's input. LoRAs on the
separate parts become one LoRA on the fused layer, exactly: the down matrices stacked (rank = the sum
of the parts' ranks), the up matrices block-diagonal, with zero rows for a part that has no LoRA. Its
delta, up @ down, is then the parts' deltas one above the other, bit for bit. Reading goes the other
way: each part keeps the columns of the up matrix that are non-zero in its rows (all of them for a
dense fused LoRA another trainer made), which is exact too.

Strength: every file written here has scale 1 (each module's alpha/rank scale is multiplied into its up
matrix; kohya's ``alpha`` is written equal to the rank; BFL files have no alpha, which ComfyUI reads as
1), so strength 0.7 is the same image in diffusers, ComfyUI and Forge. Files read in are brought to
scale 1 the same way (kohya/BFL ``.alpha`` keys, diffusers' ``lora_adapter_metadata``).

A file is checked from its header alone before a byte of tensor data is read: the suffix (pickles,
``.ckpt``/``.pt``/``.bin``, are never opened), a size cap, truncation, that it is a LoRA, that it is a
FLUX.1 or FLUX.2 [klein] one and which. torch and safetensors' torch part are imported lazily.
"""
from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from services.config import APP_NAME, APP_VERSION, Secret
from services.errors import InputError
from services.engine.card import COMFYUI, DIFFUSERS, LORA_FILE, export_filename
from services.engine.models import FLUX1, FLUX2
from services.storage import atomic

EXPORT_FORMATS = (DIFFUSERS, COMFYUI)
# The key layout each export format is written in, per family.
LAYOUTS = {DIFFUSERS: {FLUX1: "diffusers", FLUX2: "diffusers"}, COMFYUI: {FLUX1: "kohya", FLUX2: "bfl"}}
SUFFIX = ".safetensors"  # the only kind of file read
# Formats that unpickle (and so may run code) when opened: refused by name, never read.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# The largest LoRA file accepted (upload, Hub download, local file): a FLUX.1 LoRA on every layer at
# rank 128 in bf16 is about 1.3 GB; the checked-in trainer's rank-16 attention LoRA is ~40 MB.
MAX_LORA_BYTES = 1536 * 2**20
# safetensors' own limit on the JSON header.
MAX_HEADER_BYTES = 100 * 2**20
FAMILY_LABELS = {FLUX1: "FLUX.1", FLUX2: "FLUX.2 [klein]"}
# The most blocks each family has (FLUX.1 [dev]/[schnell]: 19 + 38; [klein] 9B: 8 + 24, 4B: 5 + 20).
MAX_BLOCKS = {FLUX1: (19, 38), FLUX2: (8, 24)}
_ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' safetensors metadata key for the PEFT config


# --------------------------------------------------------------------------- the module maps


@dataclass(frozen=True)
class Target:
    """One BFL module and the diffusers modules it is made of (several when fused), in row order."""

    bfl: str
    parts: tuple[str, ...]
    swap: bool = False  # BFL's final modulation is (shift, scale), diffusers' (scale, shift)
    # How a part's output width follows from the module's input width h, for parts with no LoRA.
    widths: tuple[int, ...] = ()
    # (out, in) of this module as multiples of h where the two families differ: tells them apart.
    ratio: tuple[float, float] | None = None

    def width(self, i: int, h: int) -> int:
        return (self.widths[i] if self.widths else 1) * h


_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_ADD_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")


def _double(family: str, i: int) -> list[Target]:
    b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
    common = [
        Target(f"{b}.img_attn.qkv", tuple(f"{d}.{p}" for p in _QKV)),
        Target(f"{b}.txt_attn.qkv", tuple(f"{d}.{p}" for p in _ADD_QKV)),
        Target(f"{b}.img_attn.proj", (f"{d}.attn.to_out.0",)),
        Target(f"{b}.txt_attn.proj", (f"{d}.attn.to_add_out",)),
    ]
    if family == FLUX1:  # GELU MLP (4h), one modulation per stream and block
        return common + [
            Target(f"{b}.img_mlp.0", (f"{d}.ff.net.0.proj",), ratio=(4, 1)),
            Target(f"{b}.img_mlp.2", (f"{d}.ff.net.2",), ratio=(1, 4)),
            Target(f"{b}.txt_mlp.0", (f"{d}.ff_context.net.0.proj",), ratio=(4, 1)),
            Target(f"{b}.txt_mlp.2", (f"{d}.ff_context.net.2",), ratio=(1, 4)),
            Target(f"{b}.img_mod.lin", (f"{d}.norm1.linear",)),
            Target(f"{b}.txt_mod.lin", (f"{d}.norm1_context.linear",)),
        ]
    return common + [  # SwiGLU MLP: 2 x 3h in, 3h out
        Target(f"{b}.img_mlp.0", (f"{d}.ff.linear_in",), ratio=(6, 1)),
        Target(f"{b}.img_mlp.2", (f"{d}.ff.linear_out",), ratio=(1, 3)),
        Target(f"{b}.txt_mlp.0", (f"{d}.ff_context.linear_in",), ratio=(6, 1)),
        Target(f"{b}.txt_mlp.2", (f"{d}.ff_context.linear_out",), ratio=(1, 3)),
    ]


def _single(family: str, i: int) -> list[Target]:
    b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
    if family == FLUX1:
        return [
            Target(f"{b}.linear1", (*(f"{d}.{p}" for p in _QKV), f"{d}.proj_mlp"), widths=(1, 1, 1, 4), ratio=(7, 1)),
            Target(f"{b}.linear2", (f"{d}.proj_out",), ratio=(1, 5)),
            Target(f"{b}.modulation.lin", (f"{d}.norm.linear",)),
        ]
    return [
        Target(f"{b}.linear1", (f"{d}.attn.to_qkv_mlp_proj",), ratio=(9, 1)),
        Target(f"{b}.linear2", (f"{d}.attn.to_out",), ratio=(1, 4)),
    ]


def _globals(family: str) -> list[Target]:
    emb = "time_text_embed" if family == FLUX1 else "time_guidance_embed"
    targets = [
        Target("img_in", ("x_embedder",)),
        Target("txt_in", ("context_embedder",)),
        Target("time_in.in_layer", (f"{emb}.timestep_embedder.linear_1",)),
        Target("time_in.out_layer", (f"{emb}.timestep_embedder.linear_2",)),
        Target("guidance_in.in_layer", (f"{emb}.guidance_embedder.linear_1",)),
        Target("guidance_in.out_layer", (f"{emb}.guidance_embedder.linear_2",)),
        Target("final_layer.linear", ("proj_out",)),
        Target("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True),
    ]
    if family == FLUX1:
        return targets + [Target("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
                          Target("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",))]
    return targets + [Target(f"{m}.lin", (f"{m}.linear",)) for m in
                      ("single_stream_modulation", "double_stream_modulation_img", "double_stream_modulation_txt")]


def targets(family: str, n_double: int, n_single: int) -> list[Target]:
    """Every BFL module of ``family`` with ``n_double`` / ``n_single`` blocks that a LoRA may change."""
    out = _globals(family)
    for i in range(n_double):
        out += _double(family, i)
    for i in range(n_single):
        out += _single(family, i)
    return out


def kohya_name(bfl: str) -> str:
    return "lora_unet_" + bfl.replace(".", "_")


# --------------------------------------------------------------------------- reading a file's header


@dataclass(frozen=True)
class LoraInfo:
    """What a LoRA file is, from its header: its layout, family (None: its keys fit both), rank."""

    path: Path
    layout: str  # "diffusers" | "kohya" | "bfl"
    family: str | None
    families: tuple[str, ...]  # every family its keys and shapes fit
    rank: int  # the largest rank of its modules
    modules: int
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return " or ".join(FAMILY_LABELS[f] for f in self.families)


def _refuse(path: Path, what: str, hint: str) -> InputError:
    return InputError(f"{path.name} {what}", hint=hint)


def read_header(path: Path, *, max_bytes: int = MAX_LORA_BYTES) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensors (name -> dtype, shape, offsets) and metadata of a .safetensors file, checked
    before any tensor data is read: the suffix, the size cap, that it is whole."""
    path = Path(path)
    suffix = path.suffix.lower()
    convert = "Convert it to .safetensors (kohya's and ComfyUI's tools can), or use a .safetensors copy."
    if suffix in PICKLE_SUFFIXES:
        raise _refuse(path, "is a pickle file, which can run code when opened: it is never loaded.", convert)
    if suffix != SUFFIX:
        raise _refuse(path, f"is not a .safetensors file ({suffix or 'no suffix'}).",
                      "Pick the LoRA's .safetensors file.")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise _refuse(path, f"is {size / 2**20:.0f} MB; LoRA files are accepted up to "
                                f"{max_bytes / 2**20:.0f} MB.", "Use a smaller LoRA (a lower rank).")
        with path.open("rb") as f:
            head = f.read(9)
            # A safetensors header is its length (8 bytes) then JSON; torch.save writes a zip, or a raw pickle.
            if head[8:9] != b"{" and (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
                raise _refuse(path, "is a pickle (a PyTorch .pt/.ckpt file renamed), which can run code when "
                                    "opened: it is never loaded.", convert)
            if len(head) < 9:
                raise _refuse(path, f"is cut short ({size} bytes): there is no safetensors header.",
                              "Download or upload it again.")
            (n,) = struct.unpack("<Q", head[:8])
            if n > MAX_HEADER_BYTES:
                raise _refuse(path, "is not a safetensors file (its first bytes are no header).",
                              "Pick the LoRA's .safetensors file.")
            if n > size - 8:
                raise _refuse(path, f"is cut short: its header alone should be {n} bytes, the file has {size - 8}.",
                              "Download or upload it again.")
            raw = head[8:] + f.read(max(n - 1, 0))
    except OSError as exc:
        raise _refuse(path, f"cannot be read ({exc.strerror or exc}).", "Check the file.") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        metadata = header.pop("__metadata__", None) or {}
        tensors = {k: {"dtype": v["dtype"], "shape": [int(d) for d in v["shape"]],
                       "offsets": [int(o) for o in v["data_offsets"]]} for k, v in header.items()}
        metadata = {str(k): str(v) for k, v in dict(metadata).items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise _refuse(path, "is not a safetensors file (its header is not readable).",
                      "Pick the LoRA's .safetensors file; if it is one, download it again.") from None
    data = size - 8 - n
    end = max((t["offsets"][1] for t in tensors.values()), default=0)
    if end > data:
        raise _refuse(path, f"is cut short: it holds {data} of the {end} bytes of weights its header lists.",
                      "The download or upload was interrupted: fetch it again.")
    return tensors, metadata


_LORA_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_down.weight": "down",
                  ".lora_up.weight": "up", ".alpha": "alpha"}
_NOT_LORA = {"lokr_": "a LyCORIS LoKr", "hada_": "a LyCORIS LoHa", "dora_scale": "a DoRA",
             ".diff": "a weight-difference"}
_SD_MARKERS = ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block")
_TE_CLIP = re.compile(r"^lora_te1?_text_model_encoder_layers_(\d+)_(self_attn_(?:q|k|v|out)_proj|mlp_fc[12])$")


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, kind in _LORA_SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    return None


@dataclass
class _Module:
    """One LoRA module of a file, in its own layout's naming."""

    name: str
    down: str = ""  # the tensor keys
    up: str = ""
    alpha: str = ""


def _modules(path: Path, keys: list[str]) -> dict[str, _Module]:
    mods: dict[str, _Module] = {}
    odd: list[str] = []
    for key in keys:
        split = _split_key(key)
        if split is None:
            odd.append(key)
            continue
        name, kind = split
        setattr(mods.setdefault(name, _Module(name)), kind, key)
    for marker, what in _NOT_LORA.items():
        if any(marker in k for k in keys):
            raise _refuse(path, f"is {what} file, not a LoRA; the local engine applies plain LoRAs only.",
                          "Use a plain LoRA (lora_A/lora_B or lora_down/lora_up weights).")
    if not any(m.down or m.up for m in mods.values()):
        sample = ", ".join(sorted(keys)[:3]) or "nothing"
        raise _refuse(path, f"is not a LoRA: none of its {len(keys)} tensors ({sample}, ...) is a LoRA weight "
                            "(lora_A/lora_B or lora_down/lora_up).",
                      "A full model or another kind of file was picked: pick the LoRA's .safetensors file.")
    if odd:
        raise _refuse(path, f"has tensors that belong to no LoRA module: {', '.join(sorted(odd)[:3])}.",
                      "It is not a plain LoRA the local engine can apply.")
    broken = sorted(m.name for m in mods.values() if not (m.down and m.up))
    if broken:
        raise _refuse(path, f"is incomplete: {broken[0]} has only half of its LoRA weights.",
                      "The file is damaged or was cut: fetch it again.")
    return mods


def _layout(path: Path, names: list[str]) -> str:
    if all(n.startswith("lora_") for n in names):
        return "kohya"
    if all(n.startswith("diffusion_model.") for n in names):
        return "bfl"
    if all(n.startswith(("transformer.", "text_encoder.", "base_model.model.", "transformer_blocks.",
                         "single_transformer_blocks.")) for n in names):
        return "diffusers"
    raise _refuse(path, f"mixes key layouts, or uses one the app does not know ({sorted(names)[0]}).",
                  "Use a LoRA saved by diffusers, kohya / FluxGym / musubi, ai-toolkit or ComfyUI.")


def _other_model(path: Path, names: list[str]) -> None:
    """A clearer message than 'unknown keys' for the LoRAs people most often pick by mistake."""
    if any(marker in n for n in names for marker in _SD_MARKERS) or any(n.startswith("unet.") for n in names):
        raise _refuse(path, "is a LoRA for Stable Diffusion (SD 1.x / SDXL, U-Net keys), not for FLUX.",
                      "Pick a FLUX.1 or FLUX.2 [klein] LoRA.")
    if any("joint_blocks" in n for n in names):
        raise _refuse(path, "is a LoRA for Stable Diffusion 3, not for FLUX.", "Pick a FLUX.1 or FLUX.2 [klein] LoRA.")


def _shape(tensors: dict[str, dict], key: str) -> list[int]:
    return tensors[key]["shape"]


def _fits(target: Target, down: list[int], up: list[int]) -> bool:
    """Whether a module of these shapes can be ``target`` (only where the families' shapes differ)."""
    if target.ratio is None:
        return True
    out_mult, in_mult = target.ratio
    h_in, out = down[1], up[0]
    return out * in_mult == h_in * out_mult


def _block_counts(names: list[str]) -> tuple[int, int]:
    doubles = [int(m.group(1)) for n in names if (m := re.search(r"double_blocks[._](\d+)[._]", n))]
    doubles += [int(m.group(1)) for n in names if (m := re.search(r"(?<!single_)transformer_blocks\.(\d+)\.", n))]
    singles = [int(m.group(1)) for n in names if (m := re.search(r"single_(?:transformer_)?blocks[._](\d+)[._]", n))]
    return max(doubles, default=-1) + 1, max(singles, default=-1) + 1


@dataclass
class _Plan:
    """How a file's modules become diffusers modules: for each of its modules, the target it is."""

    info: LoraInfo
    modules: dict[str, _Module]
    by_target: dict[str, tuple[Target | None, str]]  # file module -> (its BFL target, or None: a diffusers name)


def _diffusers_name(name: str) -> str:
    if name.startswith("base_model.model."):
        return "transformer." + name[len("base_model.model."):]
    if name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
        return "transformer." + name
    return name


def _te_name(path: Path, name: str) -> str:
    """A kohya CLIP-L module's diffusers name (FLUX.1's first text encoder; T5 and Qwen are refused)."""
    match = _TE_CLIP.match(name)
    if match is None:
        raise _refuse(path, f"changes a text encoder the local engine does not apply LoRAs to ({name}).",
                      "Use a LoRA that changes the transformer (and, for FLUX.1, CLIP-L) only.")
    part = match.group(2).replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
    return f"text_encoder.text_model.encoder.layers.{match.group(1)}.{part}"


def _te_fits(path: Path, name: str) -> bool:
    """A CLIP-L (FLUX.1's first text encoder) LoRA module; InputError for another text encoder's."""
    if name.startswith("text_encoder."):
        return True
    if name.startswith("lora_te"):
        _te_name(path, name)
        return True
    return False


def plan(path: Path, *, family: str | None = None, max_bytes: int = MAX_LORA_BYTES) -> _Plan:
    """Check ``path`` from its header and map each of its modules to a model layer. ``family``: the
    model it is meant for, which settles a file whose keys fit both families."""
    path = Path(path)
    tensors, metadata = read_header(path, max_bytes=max_bytes)
    if not tensors:
        raise _refuse(path, "holds no tensors: it is not a LoRA.", "Pick the LoRA's .safetensors file.")
    mods = _modules(path, list(tensors))
    names = list(mods)
    _other_model(path, names)
    layout = _layout(path, names)
    n_double, n_single = _block_counts(names)
    shapes = {}
    for m in mods.values():
        down, up = _shape(tensors, m.down), _shape(tensors, m.up)
        if len(down) != 2 or len(up) != 2 or down[0] != up[1]:
            raise _refuse(path, f"has a broken module {m.name}: its down {down} and up {up} matrices do not "
                                "share a rank.", "The file is damaged: fetch it again.")
        shapes[m.name] = (down, up)
    fits: dict[str, dict[str, tuple[Target | None, str]]] = {}
    for fam in (FLUX1, FLUX2):
        table = targets(fam, n_double, n_single)
        if layout == "diffusers":  # a fused module's parts are layers of their own there
            by_key = {"transformer." + part: t for t in table for part in t.parts}
        else:
            by_key = {kohya_name(t.bfl) if layout == "kohya" else "diffusion_model." + t.bfl: t for t in table}
        mapping: dict[str, tuple[Target | None, str]] = {}
        for name, (down, up) in shapes.items():
            key = _diffusers_name(name) if layout == "diffusers" else name
            if _te_fits(path, name):
                if fam == FLUX1:
                    mapping[name] = (None, name)
            elif key in by_key and ((layout == "diffusers" and len(by_key[key].parts) > 1)
                                    or _fits(by_key[key], down, up)):
                mapping[name] = (None, key) if layout == "diffusers" else (by_key[key], name)
        fits[fam] = mapping
    families = tuple(f for f in (FLUX1, FLUX2) if len(fits[f]) == len(mods))
    if not families:
        best = max((FLUX1, FLUX2), key=lambda f: len(fits[f]))
        unknown = sorted(set(mods) - set(fits[best]))
        raise _refuse(path, f"is not a LoRA for FLUX.1 or FLUX.2 [klein]: {len(unknown)} of its modules "
                            f"({', '.join(unknown[:2])}) match neither model's layers.",
                      "Pick a LoRA made for the base model you render with.")
    fitting = tuple(f for f in families if n_double <= MAX_BLOCKS[f][0] and n_single <= MAX_BLOCKS[f][1])
    if not fitting:
        raise _refuse(path, f"is for a model with {n_double} double-stream and {n_single} single-stream blocks, "
                            "more than FLUX.1 (19 + 38) or FLUX.2 [klein] (8 + 24) has.",
                      "Pick a LoRA made for FLUX.1 or FLUX.2 [klein].")
    rank = max(down[0] for down, _ in shapes.values())
    info = LoraInfo(path, layout, fitting[0] if len(fitting) == 1 else None, fitting, rank, len(mods), metadata)
    if family is not None and family not in fitting:
        raise _refuse(path, f"is a LoRA for {info.label}; the model it would be applied to is "
                            f"{FAMILY_LABELS[family]}.", f"Pick a {FAMILY_LABELS[family]} LoRA, or that base model.")
    return _Plan(info, mods, fits[family or fitting[0]])


def inspect_lora(path: Path, *, max_bytes: int = MAX_LORA_BYTES) -> LoraInfo:
    """What ``path`` is, from its header alone (no tensor is read); InputError if it is no FLUX LoRA."""
    return plan(path, max_bytes=max_bytes).info


def recognise(path: Path, *, max_bytes: int = MAX_LORA_BYTES) -> str:
    """The family (FLUX1 / FLUX2) ``path`` is a LoRA for; InputError when it is none, or cannot be told."""
    info = inspect_lora(path, max_bytes=max_bytes)
    if info.family is None:
        raise _refuse(Path(path), "changes only attention layers FLUX.1 and FLUX.2 [klein] both have, with the "
                                  "same shapes: which model it is for cannot be told from the file.",
                      "Pick the base model it was trained on; it is checked against that model's layers.")
    return info.family


# --------------------------------------------------------------------------- reading the weights


def _scales(metadata: dict[str, str]) -> Callable[[str, int], float]:
    """diffusers' PEFT config in the metadata, as ``scale(module name, rank)``; 1 without one."""
    try:
        config = json.loads(metadata.get(_ADAPTER_METADATA) or "{}")
    except ValueError:
        config = {}
    config = {k.split(".", 1)[1] if k.startswith("transformer.") else k: v for k, v in config.items()}
    alpha = config.get("lora_alpha")
    patterns = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))

    def scale(name: str, rank: int) -> float:
        a = alpha
        for pattern, value in patterns.items():
            if re.match(rf"(.*\.)?({pattern})$", name.removeprefix("transformer.")):
                a = value
        if a is None:
            return 1.0
        return float(a) / (rank ** 0.5 if rslora else rank)

    return scale


def read_lora(path: Path, *, family: str | None = None, max_bytes: int = MAX_LORA_BYTES) -> tuple[LoraInfo, dict]:
    """``path``'s weights as {diffusers module name: (down, up)} at scale 1 (what ``load_lora_weights``
    reads with no alphas), with its ``LoraInfo``. ``family`` settles a file whose keys fit both."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = plan(path, family=family, max_bytes=max_bytes)
    info = p.info
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _refuse(Path(path), f"cannot be read as safetensors ({exc}).", "Fetch it again.") from None
    scale = _scales(info.metadata)
    out: dict[str, tuple] = {}
    for name, m in p.modules.items():
        down, up = sd[m.down].float(), sd[m.up].float()
        rank = down.shape[0]
        if m.alpha:
            up = up * (float(sd[m.alpha].float().item()) / rank)
        target, dname = p.by_target[name]
        if target is None:
            if dname.startswith("lora_te"):
                dname = _te_name(Path(path), dname)
            elif not m.alpha:
                up = up * scale(dname, rank)
            _add(out, dname, down, up, path)
            continue
        if target.swap:
            up = _swap_halves(up)
        h = down.shape[1]
        widths = [target.width(i, h) for i in range(len(target.parts))] if len(target.parts) > 1 else [up.shape[0]]
        if sum(widths) != up.shape[0]:
            raise _refuse(Path(path), f"has {name} with {up.shape[0]} outputs; {FAMILY_LABELS[info.family or FLUX1]}'s "
                                      f"has {sum(widths)} for this width.", "The LoRA is for another model.")
        row = 0
        for part, width in zip(target.parts, widths):
            rows = up[row:row + width]
            row += width
            cols = rows.abs().sum(dim=0).nonzero().flatten()
            if len(target.parts) > 1 and cols.numel() == 0:
                continue  # this part has no LoRA: its rows of the fused up matrix are zero
            if len(target.parts) > 1:
                _add(out, "transformer." + part, down[cols].contiguous(), rows[:, cols].contiguous(), path)
            else:
                _add(out, "transformer." + part, down, rows, path)
    if not out:
        raise _refuse(Path(path), "has only zero weights: it would change nothing.", "Pick a trained LoRA.")
    return info, out


def _add(out: dict, name: str, down, up, path) -> None:
    if name in out:
        raise _refuse(Path(path), f"has two LoRAs for the same layer ({name}).", "The file is not a valid LoRA.")
    out[name] = (down, up)


def _swap_halves(up):
    import torch

    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


# --------------------------------------------------------------------------- writing other layouts


def _peft(modules: dict) -> dict:
    out = {}
    for name, (down, up) in modules.items():
        out[f"{name}.lora_A.weight"] = down
        out[f"{name}.lora_B.weight"] = up
    return out


def fuse(modules: dict, family: str) -> dict[str, tuple]:
    """{BFL module: (down, up)} for diffusers modules {name: (down, up)} at scale 1: a fused BFL module
    gets its parts' down matrices stacked and their up matrices block-diagonal (zero rows for a part
    without a LoRA), so up @ down is the parts' deltas stacked, exactly."""
    import torch

    n_double, n_single = _block_counts(list(modules))
    left = dict(modules)
    out: dict[str, tuple] = {}
    for target in targets(family, n_double, n_single):
        names = ["transformer." + p for p in target.parts]
        present = [n for n in names if n in left]
        if not present:
            continue
        parts = [left.pop(n) if n in left else None for n in names]
        h = next(p[0].shape[1] for p in parts if p is not None)
        widths = [p[1].shape[0] if p is not None else target.width(i, h) for i, p in enumerate(parts)]
        given = [p for p in parts if p is not None]
        down = torch.cat([d for d, _ in given], dim=0)
        up = torch.zeros(sum(widths), down.shape[0], dtype=given[0][1].dtype)
        row = col = 0
        for p, width in zip(parts, widths):
            if p is not None:
                up[row:row + width, col:col + p[1].shape[1]] = p[1]
                col += p[1].shape[1]
            row += width
        out[target.bfl] = (down, _swap_halves(up) if target.swap else up)
    if left:
        raise InputError(f"This LoRA changes layers the {FAMILY_LABELS[family]} ComfyUI format has no name for: "
                         f"{', '.join(sorted(left)[:3])}.", hint="Use the diffusers file for it.")
    return out


def to_layout(modules: dict, family: str, layout: str) -> dict:
    """A state dict in ``layout`` ("diffusers", "kohya", "bfl") for diffusers modules at scale 1."""
    import torch

    if layout == "diffusers":
        return _peft(modules)
    out = {}
    for bfl, (down, up) in fuse(modules, family).items():
        if layout == "bfl":  # no alpha: ComfyUI and BFL read that as scale 1; diffusers refuses one here
            out[f"diffusion_model.{bfl}.lora_A.weight"] = down.contiguous()
            out[f"diffusion_model.{bfl}.lora_B.weight"] = up.contiguous()
        else:  # kohya: scale = alpha / rank, so alpha = rank is scale 1
            key = kohya_name(bfl)
            out[f"{key}.lora_down.weight"] = down.contiguous()
            out[f"{key}.lora_up.weight"] = up.contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


# --------------------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportInfo:
    """What an exported file's metadata says about the LoRA."""

    family: str
    base_model: str = ""
    trigger_word: str = ""
    rank: int = 0
    steps: int = 0

    @classmethod
    def from_config(cls, cfg) -> ExportInfo:
        """From a run's ``TrainConfig``."""
        return cls(family=cfg.family, base_model=cfg.base_model_id or cfg.base_model or cfg.base_model_label,
                   trigger_word=cfg.trigger_word, rank=cfg.rank, steps=cfg.steps)


def export_metadata(info: ExportInfo, layout: str, alpha: str) -> dict[str, str]:
    return {
        "format": "pt", "software": f"{APP_NAME} {APP_VERSION}", "app_name": APP_NAME, "app_version": APP_VERSION,
        "base_model": info.base_model, "base_model_family": FAMILY_LABELS[info.family],
        "trigger_word": info.trigger_word, "rank": str(info.rank), "alpha": alpha, "steps": str(info.steps),
        "key_layout": layout,
    }


def check_format(fmt: str) -> str:
    """``fmt`` if it is an export format (``EXPORT_FORMATS``), else InputError naming them."""
    if fmt not in EXPORT_FORMATS:
        raise InputError(f"There is no export format {str(fmt)[:40]!r}.",
                         hint=f"Pick one of {', '.join(EXPORT_FORMATS)}.")
    return fmt


def export_lora(src: Path, dest_dir: Path, fmt: str, info: ExportInfo) -> Path:
    """Write the LoRA file ``src`` (the trainer's diffusers file) in ``fmt`` under ``dest_dir``, atomically."""
    from safetensors.torch import load_file, save_file

    check_format(fmt)
    src = Path(src)
    layout = LAYOUTS[fmt][info.family]
    dest = Path(dest_dir) / export_filename(fmt, info.family, info.trigger_word)
    source, modules = read_lora(src, family=info.family)  # the same checks as any LoRA
    if layout == "diffusers" and source.layout == "diffusers":  # the file as it is (dtype, PEFT config)
        tensors = load_file(str(src))
        _, metadata = read_header(src)
        metadata = {**metadata, **export_metadata(info, layout, alpha="as lora_adapter_metadata says")}
    else:  # another layout, or an imported kohya / BFL file brought to diffusers' names
        dtype = next(v for k, v in load_file(str(src)).items() if not k.endswith(".alpha")).dtype
        tensors = {k: v if k.endswith(".alpha") else v.to(dtype)
                   for k, v in to_layout(modules, info.family, layout).items()}
        metadata = export_metadata(info, layout, alpha="each module's rank (scale 1)")
    with atomic.replacing(dest) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return dest


# --------------------------------------------------------------------------- loading into a pipeline


def check_against(modules: dict, pipe) -> None:
    """InputError unless every module of the LoRA is a layer of ``pipe`` with the LoRA's shapes."""
    for name, (down, up) in modules.items():
        rest = name.partition(".")[2]
        layer = _layer(pipe, name)
        layer = getattr(layer, "base_layer", layer)  # already wrapped by another adapter
        if layer is None or not hasattr(layer, "in_features"):
            raise InputError(f"The LoRA has weights for {rest}, a layer this model does not have.",
                             hint="It was made for another model (a bigger one, or another family): pick the "
                                  "base model it was trained on.")
        if (layer.in_features, layer.out_features) != (down.shape[1], up.shape[0]):
            raise InputError(f"The LoRA's {rest} is {down.shape[1]} -> {up.shape[0]}; this model's layer is "
                             f"{layer.in_features} -> {layer.out_features}.",
                             hint="It was made for another model size: pick the base model it was trained on.")


def check_against_config(modules: dict, transformer_config: Path) -> None:
    """``check_against`` without loading the model: its transformer is built empty (on torch's meta device,
    no memory) from its ``config.json``. Text-encoder modules are left to the load, which checks them."""
    import diffusers
    import torch

    config = json.loads(Path(transformer_config).read_text(encoding="utf-8"))
    with torch.device("meta"):
        transformer = getattr(diffusers, config["_class_name"]).from_config(config)
    check_against({k: v for k, v in modules.items() if k.startswith("transformer.")},
                  SimpleNamespace(transformer=transformer))


def adapters_of(pipe) -> set[str]:
    found: set[str] = set()
    for names in pipe.get_list_adapters().values():
        found.update(names)
    return found


def unload(pipe, adapter_name: str) -> None:
    """Remove every trace of ``adapter_name`` from ``pipe`` (also of a load that failed half way)."""
    if adapter_name in adapters_of(pipe):
        pipe.delete_adapters([adapter_name])
    for component in ("transformer", "text_encoder"):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for module in model.modules():
            if adapter_name in getattr(module, "lora_A", {}):
                module.delete_adapter(adapter_name)
        config = getattr(model, "peft_config", None)
        if config and adapter_name in config:
            del config[adapter_name]


def load_into(pipe, path: Path, adapter_name: str, *, family: str | None = None) -> LoraInfo:
    """Load the LoRA file ``path`` (any layout) into ``pipe`` as ``adapter_name``, after checking it.

    Every check runs before the pipeline is touched; if loading still fails, nothing of it is left."""
    info, modules = read_lora(path, family=family)
    check_against(modules, pipe)
    try:
        pipe.load_lora_weights(_peft(modules), adapter_name=adapter_name)
        missing = [n for n in modules if adapter_name not in getattr(_layer(pipe, n), "lora_A", None) or {}]
        if missing:
            raise InputError(f"{len(missing)} of the LoRA's layers were not loaded ({missing[0]}).",
                             hint="The LoRA does not fit this model.")
    except InputError:
        unload(pipe, adapter_name)
        raise
    except Exception as exc:
        unload(pipe, adapter_name)
        raise InputError(f"{Path(path).name} could not be applied to the model: {exc}.",
                         hint="Pick a LoRA made for this base model.") from exc
    return info


def _layer(pipe, name: str):
    """The pipeline's layer a LoRA module name means, or None."""
    component, _, rest = name.partition(".")
    model = getattr(pipe, component, None)
    # transformers 5 dropped CLIPTextModel's inner ``text_model``; LoRA files (and diffusers) still name it.
    for candidate in (rest, rest.removeprefix("text_model.")):
        try:
            return model.get_submodule(candidate) if model is not None else None
        except AttributeError:
            continue
    return None


# --------------------------------------------------------------------------- files in a folder / a Hub repo


def pick_lora_file(names: list[str], where: str, filename: str | None = None) -> str:
    """The LoRA among a folder's or repo's files: ``filename`` if given, else the trainer's
    pytorch_lora_weights.safetensors, else the only .safetensors at the top (sub-folders, such as a
    Hugging Face job's checkpoints/, are not looked in)."""
    top = sorted(n for n in names if "/" not in n and n.lower().endswith(SUFFIX))
    if filename:
        if filename not in names:
            raise InputError(f"{where} has no file {filename}.",
                             hint=f"Its .safetensors files: {', '.join(top) or 'none'}.")
        return filename
    if LORA_FILE in top:
        return LORA_FILE
    if len(top) == 1:
        return top[0]
    if not top:
        pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
        extra = " (its .bin/.pt files are pickles, which are never loaded)" if pickles else ""
        raise InputError(f"{where} has no .safetensors LoRA file at its top level{extra}.",
                         hint="Pick a repo or folder that holds the LoRA as .safetensors.")
    raise InputError(f"{where} holds several .safetensors files: {', '.join(top[:6])}.",
                     hint="Name the one to use.")


def find_lora_file(folder: Path, filename: str | None = None) -> Path:
    """The LoRA file in a downloaded repo or a folder (see ``pick_lora_file``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder.", hint="Pick the folder that holds the LoRA.")
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return folder / pick_lora_file(names, str(folder), filename)


def download_lora(repo_id: str, *, token: Secret | None = None, cache_dir: Path | None = None,
                  on_progress: Callable[[int, int], None] | None = None, filename: str | None = None,
                  max_bytes: int = MAX_LORA_BYTES, api=None) -> Path:
    """The LoRA file of the Hub model repo ``repo_id``, downloaded into the Hugging Face cache (with
    ``token`` for a gated or private one; progress as ``on_progress(done, total)`` bytes); checked
    with ``inspect_lora`` before it is returned. ``api``: an ``HfApi`` (made from the token if None)."""
    from services.engine.download import _Progress
    from services.engine.hub import validate_repo_id

    repo_id = validate_repo_id(repo_id)
    secret = token.reveal() if isinstance(token, Secret) else ""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=secret or None)
    try:
        info = api.model_info(repo_id, files_metadata=True)
    except Exception as exc:
        raise _hub_error(exc, repo_id, secret) from None
    sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    name = pick_lora_file(list(sizes), repo_id, filename)
    if sizes.get(name, 0) > max_bytes:
        raise InputError(f"{repo_id}'s {name} is {sizes[name] / 2**20:.0f} MB; LoRA files are accepted up to "
                         f"{max_bytes / 2**20:.0f} MB.", hint="Use a smaller LoRA (a lower rank).")
    progress = _Progress(sizes.get(name, 0), on_progress) if on_progress else None
    try:
        found = api.hf_hub_download(repo_id, name, revision=info.sha, cache_dir=cache_dir, token=secret or None,
                                    tqdm_class=progress.bar_class() if progress else None)
    except Exception as exc:
        raise _hub_error(exc, repo_id, secret) from None
    if progress:
        progress.finish()
    inspect_lora(Path(found), max_bytes=max_bytes)
    return Path(found)


def _hub_error(exc: BaseException, repo_id: str, secret: str):
    """A Hub failure fetching a LoRA, as the error the app shows (never with the token in it)."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from services.engine.download import hub_error
    from services.engine.hub import HUB_URL

    if isinstance(exc, GatedRepoError):
        return InputError(f"{repo_id} is gated: its licence must be accepted on the Hub first.",
                          hint=f"Accept it at {HUB_URL}/{repo_id} with the account you signed in with.")
    if isinstance(exc, RepositoryNotFoundError):
        who = "your sign-in cannot see it" if secret else "you are not signed in"
        return InputError(f"There is no model {repo_id} on the Hugging Face Hub (or it is private and {who}).",
                          hint="Check the repo id, or sign in with an account that can see it.")
    return hub_error(exc, repo_id, secret)
