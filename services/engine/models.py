"""The base models the local engine trains and generates with: one registry, no torch import.

A base model is named by a *spec*, the string a job records and the Train tab's picker sends:
a registry key (``flux1-dev``, ``flux2-klein-base-4b``, ``tiny-flux1``, ...), or the value of
``FLUX_LOCAL_MODEL`` (a Hub id or a local diffusers folder; empty = the tiny FLUX.1 test model).
``resolve(spec)`` turns any spec into a ``BaseModel``; ``check_choice`` is the server-side check
of a picked one (only the registry and the configured ``FLUX_LOCAL_MODEL`` are allowed, so a
visitor can't make the server load an arbitrary folder or repository).

A local folder's family comes from its ``model_index.json`` (``_class_name``): ``FluxPipeline``
is FLUX.1, ``Flux2KleinPipeline`` is FLUX.2 [klein].
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from services.errors import InputError

FLUX1 = "flux1"
FLUX2 = "flux2"
FAMILIES = (FLUX1, FLUX2)
# The diffusers pipeline class of each family (Flux2Pipeline, FLUX.2 [dev], is not supported).
PIPELINE_CLASSES = {"FluxPipeline": FLUX1, "Flux2KleinPipeline": FLUX2}

TINY_FLUX1 = "tiny-flux1"
TINY_FLUX2 = "tiny-flux2-klein"
LOCAL = "local"
# Where the tiny models are built, under the data dir.
TINY_FOLDERS = {TINY_FLUX1: "models/tiny-flux", TINY_FLUX2: "models/tiny-flux2-klein"}
TINY_NOTE = "test model: images are noise; it proves the workflow, not quality"
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
GB = 10**9


@dataclass(frozen=True)
class BaseModel:
    key: str
    label: str
    family: str  # FLUX1 | FLUX2
    repo_id: str = ""  # a Hub repository, "" for local folders and the tiny models
    gated: bool = False  # the Hub asks for a licence to be accepted (and a token) before download
    download_bytes: int = 0  # about how much a download of its diffusers folders is
    sample_steps: int = 28  # default inference steps
    sample_guidance: float = 3.5
    # FLUX.1 [dev]: guidance is an embedding input (one pass); otherwise, FLUX.2 [klein] base runs
    # classifier-free guidance (two passes) and schnell none at all.
    guidance_distilled: bool = False
    max_sequence_length: int = 512
    pipeline_class: str = "FluxPipeline"
    tiny: bool = False
    path: str = ""  # a local folder (set for folder specs)
    # The transformer's parameter count at its published configuration (benchmarks/local_train_gpu.py
    # counts 11.9e9, 3.88e9 and 9.08e9): what the memory estimate scales with. 0 = unknown.
    transformer_params: float = 0.0

    @property
    def source(self) -> str:
        """What ``from_pretrained`` gets (the tiny models' folder is known only to the provider)."""
        return self.path or self.repo_id


def _tiny(key: str, family: str) -> BaseModel:
    from services.engine import tiny  # constants only, no torch

    name = "FLUX.1" if family == FLUX1 else "FLUX.2 [klein]"
    return BaseModel(
        key=key, label=f"tiny random {name} ({TINY_NOTE})", family=family,
        sample_steps=tiny.DEFAULT_STEPS, sample_guidance=3.5 if family == FLUX1 else 4.0,
        max_sequence_length=tiny.MAX_SEQUENCE_LENGTH if family == FLUX1 else tiny.FLUX2_MAX_SEQUENCE_LENGTH,
        pipeline_class=pipeline_of(family), tiny=True,
    )


def pipeline_of(family: str) -> str:
    """The diffusers pipeline class name of a family."""
    return next(cls for cls, fam in PIPELINE_CLASSES.items() if fam == family)


# Sizes: the diffusers folders' safetensors in bf16 (transformer + text encoders + VAE), rounded.
REGISTRY: tuple[BaseModel, ...] = (
    BaseModel("flux1-dev", "FLUX.1 [dev]", FLUX1, "black-forest-labs/FLUX.1-dev", gated=True,
              download_bytes=34 * GB, sample_steps=28, sample_guidance=3.5, guidance_distilled=True, transformer_params=11.9e9),
    BaseModel("flux1-schnell", "FLUX.1 [schnell]", FLUX1, "black-forest-labs/FLUX.1-schnell",
              download_bytes=34 * GB, sample_steps=4, sample_guidance=0.0, max_sequence_length=256, transformer_params=11.9e9),
    # The undistilled [klein] "base" checkpoints are the ones BFL names for fine-tuning and LoRA
    # training (the step-distilled FLUX.2-klein-4B/-9B are for 4-step inference).
    BaseModel("flux2-klein-base-4b", "FLUX.2 [klein] base 4B", FLUX2, "black-forest-labs/FLUX.2-klein-base-4B",
              download_bytes=16 * GB, sample_steps=50, sample_guidance=4.0, pipeline_class="Flux2KleinPipeline", transformer_params=3.88e9),
    BaseModel("flux2-klein-base-9b", "FLUX.2 [klein] base 9B", FLUX2, "black-forest-labs/FLUX.2-klein-base-9B",
              gated=True, download_bytes=35 * GB, sample_steps=50, sample_guidance=4.0,
              pipeline_class="Flux2KleinPipeline", transformer_params=9.08e9),
    _tiny(TINY_FLUX1, FLUX1),
    _tiny(TINY_FLUX2, FLUX2),
)
BY_KEY = {m.key: m for m in REGISTRY}
# What a folder or an unlisted Hub id of each family starts from.
FAMILY_DEFAULTS = {FLUX1: BY_KEY["flux1-dev"], FLUX2: BY_KEY["flux2-klein-base-4b"]}


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or not _HUB_ID_RE.match(spec)


def family_of_folder(folder: Path) -> str:
    """FLUX1 or FLUX2 from a diffusers folder's model_index.json; InputError for anything else."""
    index = Path(folder).expanduser() / "model_index.json"
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        raise InputError(f"{folder} is not a diffusers pipeline folder (no readable model_index.json).",
                         hint="Point FLUX_LOCAL_MODEL at a folder saved with save_pretrained, or at a Hub id.",
                         ) from None
    family = PIPELINE_CLASSES.get(class_name)
    if family is None:
        raise InputError(f"{folder} holds a {class_name or 'unnamed'} pipeline; the local engine trains "
                         f"{' and '.join(PIPELINE_CLASSES)} models.",
                         hint="Use a FLUX.1 or FLUX.2 [klein] diffusers folder.")
    return family


def _distilled(folder: Path) -> bool:
    try:
        return bool(json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8")).get("is_distilled"))
    except (OSError, ValueError, AttributeError):
        return False


def _custom(spec: str, family: str, *, label: str, repo_id: str = "", path: str = "",
            distilled: bool = False) -> BaseModel:
    """An unlisted folder or Hub id: the family's defaults, adjusted for distilled checkpoints."""
    base = FAMILY_DEFAULTS[family]
    steps, guidance, seq = base.sample_steps, base.sample_guidance, base.max_sequence_length
    if family == FLUX1 and "schnell" in spec.lower():
        schnell = BY_KEY["flux1-schnell"]
        steps, guidance, seq = schnell.sample_steps, schnell.sample_guidance, schnell.max_sequence_length
    elif family == FLUX2 and distilled:  # a step-distilled [klein]: 4 steps, no guidance
        steps, guidance = 4, 1.0
    return replace(base, key=spec, label=label, repo_id=repo_id, path=path, gated=False, download_bytes=0,
                   sample_steps=steps, sample_guidance=guidance, max_sequence_length=seq,
                   guidance_distilled=family == FLUX1 and "schnell" not in spec.lower())


def from_folder(folder: str | Path) -> BaseModel:
    """The model in a local diffusers folder (a tiny test model built by the app is recognised)."""
    from services.engine import tiny

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise InputError(f"{folder} is not a folder.",
                         hint="Point FLUX_LOCAL_MODEL at a diffusers FLUX folder or a Hub id such as "
                              "black-forest-labs/FLUX.1-dev.")
    family = family_of_folder(path)
    if tiny.is_tiny_model(path):
        return replace(BY_KEY[TINY_FLUX1 if family == FLUX1 else TINY_FLUX2], path=str(path))
    return _custom(str(folder), family, label=f"local folder {path.name} ({pipeline_of(family)})",
                   path=str(path), distilled=_distilled(path))


def _cached_family(repo_id: str) -> str | None:
    """The family of an unlisted Hub model whose model_index.json is already in the local cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "model_index.json")
    except (ImportError, OSError, ValueError):  # a cache problem only loses the shortcut
        return None
    if isinstance(cached, str):
        try:
            return family_of_folder(Path(cached).parent)
        except InputError:
            return None
    return None


def resolve(spec: str | None) -> BaseModel:
    """The base model a spec names: "" or "tiny" (tiny FLUX.1), a registry key, a Hub id, or a folder."""
    spec = (spec or "").strip()
    if spec in ("", "tiny"):
        return BY_KEY[TINY_FLUX1]
    if spec in BY_KEY:
        return BY_KEY[spec]
    listed = next((m for m in REGISTRY if m.repo_id and m.repo_id.lower() == spec.lower()), None)
    if listed is not None:
        return listed
    if _looks_like_path(spec) or Path(spec).expanduser().is_dir():
        return from_folder(spec)
    # An unlisted Hub id: its cached model_index.json says the family; failing that, its name.
    family = _cached_family(spec) or (FLUX2 if re.search(r"flux\.?2|klein", spec, re.IGNORECASE) else FLUX1)
    return _custom(spec, family, label=spec, repo_id=spec)


def default_choice(configured: str) -> str:
    """The picker's default: the registry key for ``FLUX_LOCAL_MODEL`` when it is listed, else the spec itself."""
    configured = (configured or "").strip()
    if configured in ("", "tiny"):
        return TINY_FLUX1
    listed = next((m for m in REGISTRY if m.repo_id and m.repo_id.lower() == configured.lower()), None)
    return listed.key if listed else configured


def choices(configured: str) -> list[tuple[str, str]]:
    """(label, value) pairs for the Train tab's picker: ``FLUX_LOCAL_MODEL`` first when it is not listed."""
    out = [(m.label, m.key) for m in REGISTRY]
    default = default_choice(configured)
    if default not in BY_KEY:
        try:
            label = resolve(default).label
        except InputError:
            label = f"{default} (not usable: see the banner)"
        out.insert(0, (f"{label} (FLUX_LOCAL_MODEL)", default))
    return out


def check_choice(choice: str | None, configured: str) -> str:
    """The picked model's spec, or InputError: only the listed models and ``FLUX_LOCAL_MODEL`` may be used."""
    choice = (choice or "").strip()
    if not choice:
        return default_choice(configured)
    allowed = [value for _, value in choices(configured)]
    if choice in allowed:
        return choice
    by_repo = next((m.key for m in REGISTRY if m.repo_id and m.repo_id.lower() == choice.lower()), None)
    if by_repo:
        return by_repo
    raise InputError(f"{choice[:120]!r} is not a base model the local engine offers.",
                     hint=f"Pick one of: {', '.join(allowed)} (a folder of your own goes in FLUX_LOCAL_MODEL).")


def folder_of(spec: str | None, *, data_dir: str | Path, token=None, on_progress=None) -> str:
    """The folder ``from_pretrained`` gets for a spec: a tiny model is built on first use under
    ``data_dir``, a Hub model is downloaded into the HF cache (reused; disk space checked first), a
    folder is used as is. ``token`` is a ``services.config.Secret`` (or None)."""
    base = resolve(spec)
    if base.tiny and not base.path:
        from services.engine.tiny import ensure_tiny_model

        return str(ensure_tiny_model(Path(data_dir) / TINY_FOLDERS[base.key], base.family))
    from services.engine.download import fetch_base_model

    return str(fetch_base_model(base.source, token=token, on_progress=on_progress))
