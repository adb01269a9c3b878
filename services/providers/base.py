"""The provider interface the tabs use, whoever trains and generates.

A provider trains a fine-tune from a dataset zip and generates images with a base model
or a fine-tune. CometAPI (``services.providers.cometapi.provider``) is one; the local diffusers
engine is another. The tabs only ever see the types in this module.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, Protocol, TypeVar, get_args, runtime_checkable

from services.config import Secret, Settings
from services.errors import InputError
from services.storage.captions import is_trigger_word

Mode = Literal["character", "product", "style", "general"]  # typed API parameters (components/api.py)
# What ``Studio.export_lora`` writes: services.engine.lora_formats.EXPORT_FORMATS, as a typed API parameter.
ExportFormat = Literal["comfyui", "diffusers"]
MODES: tuple[str, ...] = get_args(Mode)
FINETUNE_TYPES = ("lora", "full")
PRIORITIES = ("speed", "quality", "high_res_only")
LORA_RANKS = (16, 32)
ITERATIONS_RANGE = (100, 1000)
LEARNING_RATE_RANGE = (1e-6, 5e-3)
STRENGTH_RANGE = (0.0, 2.0)  # how strongly a fine-tune is applied when generating with it
OUTPUT_FORMATS = ("jpeg", "png")
ASPECT_RATIOS = ("21:9", "16:9", "3:2", "4:3", "1:1", "3:4", "2:3", "9:16", "9:21")

# Per-mode starting points. They follow the hosted service's defaults (300 iterations,
# rank 32) and common practice: styles need more steps and benefit from a lower rank.
PRESETS: dict[str, dict] = {
    "character": {"iterations": 300, "lora_rank": 32, "finetune_type": "lora", "priority": "quality", "captioning": True},
    "product": {"iterations": 300, "lora_rank": 32, "finetune_type": "lora", "priority": "quality", "captioning": True},
    "style": {"iterations": 500, "lora_rank": 16, "finetune_type": "lora", "priority": "quality", "captioning": True},
    "general": {"iterations": 300, "lora_rank": 32, "finetune_type": "full", "priority": "quality", "captioning": True},
}

ProgressFn = Callable[[int, int], None]


# A job's tag: sent with its fine-tune to a provider, so that after a restart or a dropped
# connection the job is found there by it instead of being uploaded twice.
def job_tag(job_id: str) -> str:
    return f"fs-{job_id[:12]}"


def remote_comment(name: str, job_id: str) -> str:
    """The fine-tune name sent to the provider: the user's name plus our tag for recovery."""
    return f"{name.strip()} [{job_tag(job_id)}]"


O = TypeVar("O", bound="TrainOptions")


@dataclass(frozen=True)
class TrainOptions:
    """A provider's own training settings, beyond the common ones of ``TrainRequest``. A provider that
    takes some declares a subclass with them (``ProviderInfo.options``); this empty one takes none."""

    @classmethod
    def of(cls: type[O], request: "TrainRequest") -> O:
        """The request's options as this type; its defaults where the request carries another provider's."""
        return request.options if isinstance(request.options, cls) else cls()

    @classmethod
    def from_values(cls: type[O], values: dict) -> O:
        """The fields of this type found in ``values``; an empty value (None, "") means the field's default,
        the others (another provider's settings) are left out."""
        given = {f.name: values[f.name] for f in fields(cls) if values.get(f.name) not in (None, "")}
        return cls(**given)


@dataclass(frozen=True)
class TrainRequest:
    name: str
    mode: str
    trigger_word: str = "TOK"
    iterations: int = 300
    learning_rate: float | None = None
    lora_rank: int = 32
    finetune_type: str = "lora"
    priority: str = "quality"
    captioning: bool = True
    # The chosen provider's own settings (the local engine's base model, Hugging Face's hardware, ...):
    # a record of that provider's options type (``ProviderInfo.options``); the empty one for none.
    options: TrainOptions = field(default_factory=TrainOptions)

    def problems(self) -> dict[str, str]:
        """Every field that is wrong, with what to do, before anything is sent."""
        p: dict[str, str] = {}
        if not self.name.strip():
            p["name"] = "Give the fine-tune a name so you can find it later."
        elif len(self.name) > 100:
            p["name"] = "Keep the name under 100 characters."
        return {**p, **self.settings_problems()}

    def settings_problems(self) -> dict[str, str]:
        """What is wrong with the training settings (all but the name): the one rule, which the
        CometAPI client also applies to what it sends, keyed by the contract's field names."""
        p: dict[str, str] = {}
        if self.mode not in MODES:
            p["mode"] = f"Pick one of {', '.join(MODES)}."
        if not is_trigger_word(str(self.trigger_word or "")):
            p["trigger_word"] = "Use 1-40 letters, digits, _ or -, no spaces (for example TOK)."
        lo, hi = ITERATIONS_RANGE
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or not lo <= self.iterations <= hi:
            p["iterations"] = f"Iterations must be a whole number from {lo} to {hi}."
        if self.learning_rate is not None:
            lo_lr, hi_lr = LEARNING_RATE_RANGE
            lr = self.learning_rate
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lo_lr <= lr <= hi_lr:
                p["learning_rate"] = f"Learning rate must be between {lo_lr:g} and {hi_lr:g}, or empty for the default."
        if self.lora_rank not in LORA_RANKS:
            p["lora_rank"] = "LoRA rank must be 16 or 32."
        if self.finetune_type not in FINETUNE_TYPES:
            p["finetune_type"] = "Fine-tune type must be lora or full."
        if self.priority not in PRIORITIES:
            p["priority"] = f"Priority must be one of {', '.join(PRIORITIES)}."
        return p

    def validate(self) -> "TrainRequest":
        problems = self.problems()
        if problems:
            lines = "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in problems.items())
            raise InputError(f"Some settings need fixing before launch. {lines}")
        return self

    def record(self) -> dict:
        """The request as a job row's params: the common settings and the provider's own, in one flat dict."""
        common = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        return {**common, **asdict(self.options)}

    def effective_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-4 if self.finetune_type == "lora" else 1e-5


@dataclass(frozen=True)
class TrainStatus:
    """What a provider says about a training job right now."""

    state: str  # "pending" | "running" | "ready" | "failed" | "cancelled" | "interrupted" (resumable)
    progress: float | None = None  # 0..1 when the provider says
    eta_s: float | None = None
    step: int | None = None
    loss: float | None = None
    message: str = ""
    samples: tuple[str, ...] = ()  # local image paths
    result: dict = field(default_factory=dict)  # e.g. {"finetune_id": ...} or {"lora_path": ...}
    # Every (step, loss) the provider knows, oldest first, where it keeps a history (the local engine);
    # ``loss`` alone is the latest value, which a tracker polling every few seconds would undersample.
    losses: tuple[tuple[int, float], ...] = ()

    @property
    def terminal(self) -> bool:
        return self.state in ("ready", "failed", "cancelled", "interrupted")


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    seed: int = 42
    width: int = 1024
    height: int = 768
    aspect_ratio: str = "16:9"
    steps: int | None = None
    guidance: float | None = None
    safety_tolerance: int = 2
    output_format: str = "jpeg"
    strength: float = 1.2  # fine-tune strength; ignored by base models


@dataclass(frozen=True)
class GeneratedImage:
    path: Path
    model: str
    seed: int
    latency_s: float
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ImportedLora:
    """A LoRA file made elsewhere (another trainer, the Hub, a Hugging Face job), kept for one owner so that
    Compare renders it against a base model of its family like a fine-tune made here."""

    id: str  # its fine-tune id (``Target.finetune_id``)
    name: str
    family: str  # services.engine.models.FLUX1 / FLUX2
    family_label: str  # "FLUX.1", "FLUX.2 [klein]"
    base_model: str  # the base model spec it is rendered on
    base_model_label: str
    layout: str  # the file's key layout: "diffusers", "kohya" or "bfl"
    rank: int
    source: str  # the file name it came as, or the Hub repo (``owner/name``)
    trigger_word: str = ""  # from the file's metadata, when it says
    created_at: float = 0.0


@dataclass(frozen=True)
class HardwareOption:
    """A machine a provider can train on (Hugging Face Jobs' flavours), with its price, shown before launch."""

    name: str  # the provider's id for it, e.g. "a100-large"
    label: str  # e.g. "Nvidia A100 · 80 GB"
    usd_per_hour: float
    fits: bool  # whether the fine-tune fits its memory
    note: str = ""  # why it does not fit, or what it trains with (a memory preset)


@dataclass(frozen=True)
class CostEstimate:
    """What a training is expected to take and cost on the picked hardware, before launch."""

    hardware: str
    seconds: float
    usd: float
    summary: str  # one line for people, e.g. "about 24 min on Nvidia A100, about $1.00"


@dataclass(frozen=True)
class Holder:
    """Who has a provider's training slot now (for the Train tab: which job everyone else waits for)."""

    remote_id: str
    step: int | None
    total: int | None
    cancelling: bool
    waiting: int  # jobs queued behind it


CredentialKind = Literal["none", "own_key", "sign_in"]


@dataclass(frozen=True)
class Credentials:
    """What a visitor may bring to use a provider on their own account, and what the app says about it.

    ``own_key``: a key pasted at the top of the page (``Caller.cometapi_key``), used wherever it is given;
    ``sign_in``: the visitor's Hugging Face sign-in (``Caller.hf_token``), theirs only when hosted (locally
    the app-wide provider already runs on the owner's own account); ``none``: nothing of the visitor's."""

    kind: CredentialKind = "none"
    name: str = ""  # "your own <name>"
    give_again: str = ""  # what to do to hand them back
    waiting: str = ""  # a job's message while it waits for them (the app keeps them in memory only)
    own_banner: str = ""  # the Train tab's line while the visitor's own are in use ({label}: the provider's)
    hosted_missing: str = ""  # hosted, what to do when the app-wide provider can't be used ("": its readiness says)
    shared_budget: bool = False  # hosted, the app-wide provider's paid calls are charged to the shared-key budget
    foreign_id: str = ""  # hosted, refusing a fine-tune id that is not the visitor's ({id}), without their own
    foreign_id_hint: str = ""


NO_CREDENTIALS = Credentials()


@dataclass(frozen=True)
class ProviderInfo:
    """A provider describing itself to the app: what the registry (``services.providers.registry``)
    holds for it, so that nothing outside ``services/providers`` tests a provider's name."""

    key: str  # stored in job rows
    label: str
    make: Callable[[Settings], "Provider"]  # -> the app-wide provider
    credentials: Credentials = NO_CREDENTIALS
    with_credentials: Callable[[Settings, Secret], "Provider"] | None = None  # one on the visitor's own
    # Whether a bare fine-tune id is one of its own; None: it takes the ids no other provider claims.
    owns_finetune_id: Callable[[str], bool] | None = None
    options: type[TrainOptions] = TrainOptions  # its own request fields
    choices: frozenset[str] = frozenset()  # which of them the Train tab shows
    may_be_default: Callable[[Settings], bool] = lambda settings: True  # may it be picked for you
    hosted_job_cap: Callable[[Settings], int] | None = None  # jobs one visitor may have active, hosted

    def __post_init__(self) -> None:
        unknown = self.choices - {f.name for f in fields(self.options)}
        if unknown:
            raise ValueError(f"{self.key}: the Train tab can't show {sorted(unknown)}: not fields of {self.options}")


@dataclass(frozen=True)
class TrainChoices:
    """What the Train tab shows for one provider beyond the common settings."""

    fields: frozenset[str]  # ``ProviderInfo.choices``
    base_models: tuple[tuple[str, str], ...] = ()  # (label, value) for the base-model picker
    default_base_model: str | None = None
    memory_presets: tuple[tuple[str, str], ...] = ()  # (label, value), "" = picked from the GPU


@runtime_checkable
class Provider(Protocol):
    """What the tabs and workflows need from a provider.

    Every provider implements the first part. The second, its capabilities, has a default here that
    says "not offered" (or does nothing): a provider subclasses ``ProviderBase`` to inherit them and
    overrides those it offers. The tabs and workflows ask these members, never ``hasattr``."""

    key: str  # short id stored in job rows: "cometapi", "local"
    label: str  # shown to people

    def readiness(self) -> tuple[bool, str]:
        """(usable, message): message explains what is missing when not usable."""

    def submit(self, zip_path: Path, request: TrainRequest, *, tag: str, on_upload: ProgressFn | None = None,
               owner: str | None = None) -> str:
        """Start training; returns the provider's id. ``tag`` is our job id, stored remotely when possible;
        ``owner`` is whose job it is (the local engine keeps a hosted visitor's files in their folder)."""

    def status(self, remote_id: str) -> TrainStatus: ...

    def list_remote(self) -> list[str]: ...

    def find_by_tag(self, tag: str) -> str | None:
        """The remote id of a job submitted with ``tag``, if the provider can tell (restart recovery)."""

    def cancel(self, remote_id: str) -> None: ...

    def delete(self, remote_id: str) -> None: ...

    def generate(self, request: GenerateRequest, out_dir: Path, *, finetune: str | None = None,
                 model: str | None = None) -> GeneratedImage:
        """Generate one image and save it under ``out_dir`` at once (provider URLs expire)."""

    # ------------------------------------------------------------ capabilities (defaults: not offered)

    max_images: int = 0  # the most training images a dataset may have for it (0: it says nothing)
    can_resume: bool = False  # keeps checkpoints: ``resume`` continues a cancelled or interrupted job
    can_publish: bool = False  # ``publish`` uploads a finished fine-tune to a Hugging Face model repo
    picks_base_model: bool = False  # trains on a base model picked per job: ``model_choices`` lists them
    queues_training: bool = False  # trains one job at a time here: ``training_now`` names the one training
    model_label: str = ""  # the model it runs, for the Train tab's banner ("": nothing to add)
    picks_hardware: bool = False  # trains on hardware picked per job, at a price: ``hardware_options``, ``estimate``
    reports_steps: bool = False  # reports loss and sample images while it trains (the Train tab's plot and gallery)
    picks_tuned_model: bool = False  # generates with a fine-tune on one of several models, picked per comparison
    can_export: bool = False  # ``export_lora`` writes a ready fine-tune's LoRA for other tools (ComfyUI, diffusers)
    imports_loras: bool = False  # renders LoRA files made elsewhere: ``import_lora``, ``imported_loras``

    def check_request(self, request: TrainRequest) -> None:
        """Refuse a request's provider-specific fields (InputError) before any job is recorded."""

    def resume(self, remote_id: str) -> None:
        """Continue a cancelled or interrupted job from its last checkpoint (``can_resume``)."""
        raise InputError(f"{self.label} jobs can't be resumed.", hint="Launch a new fine-tune instead.")

    def publish(self, remote_id: str, repo_id: str, token: Secret, private: bool = True) -> str:
        """Upload a finished fine-tune to a Hub model repo; returns its URL (``can_publish``)."""
        raise InputError(f"{self.label} fine-tunes can't be published from here.")

    def export_lora(self, finetune_id: str, fmt: str) -> Path:
        """The fine-tune's LoRA as a file in ``fmt`` (``services.engine.lora_formats.EXPORT_FORMATS``), written
        once beside its output and reused (``can_export``)."""
        raise InputError(f"{self.label} fine-tunes can't be exported from here.")

    def import_lora(self, path: Path, *, owner: str, name: str = "", base_model: str | None = None,
                    source: str = "") -> ImportedLora:
        """Check the LoRA file ``path`` and keep a copy for ``owner``, to render on a base model of its family
        (``imports_loras``); ``base_model`` (a spec) settles which one, else it follows from the family."""
        raise InputError(f"{self.label} can't render LoRA files made elsewhere.",
                         hint="Import it on the local engine.")

    def imported_loras(self, owner: str) -> list[ImportedLora]:
        """``owner``'s imported LoRAs, newest first (``imports_loras``)."""
        return []

    def delete_imported(self, lora_id: str) -> None:
        """Forget an imported LoRA and remove its files (``imports_loras``)."""
        raise InputError(f"{self.label} keeps no imported LoRAs.")

    def model_choices(self) -> list[tuple[str, str]]:
        """(label, value) pairs for the Train tab's base-model picker (``picks_base_model``)."""
        return []

    def default_model_choice(self) -> str | None:
        """The picker's value to start with (``picks_base_model``)."""
        return None

    def memory_plan(self, request: TrainRequest):
        """The memory preset, estimated peak and GPU a request trains with here (``engine.memory.MemoryPlan``),
        where it trains on this machine's GPU; None elsewhere. InputError for a base model it does not offer."""
        return None

    def memory_choices(self) -> list[tuple[str, str]]:
        """(label, value) pairs for the Train tab's memory-preset picker, where it trains on this machine's GPU."""
        return []

    def tuned_models(self) -> list[str]:
        """The models a fine-tune of it can be generated with, where there are several to pick from."""
        return []

    def hardware_options(self, request: TrainRequest) -> list[HardwareOption]:
        """The machines it can train ``request`` on, cheapest first (``picks_hardware``)."""
        return []

    def estimate(self, request: TrainRequest) -> CostEstimate | None:
        """Time and cost of ``request`` on ``request.hardware`` (``picks_hardware``); None where free or unknown."""
        return None

    def strength_fixed(self, finetune_id: str) -> str:
        """Why a fine-tune can only be applied at full strength here ("" when the strength can be set):
        a strength sweep then belongs on an engine that sets it."""
        return ""

    def training_now(self) -> Holder | None:
        """The job that holds the training slot, None when idle (``queues_training``)."""
        return None

    def compare_models(self, tuned_model: str | None) -> tuple[str | None, str | None]:
        """(base, tuned) model names for a side-by-side comparison, for providers with several models;
        (None, None) where one pipeline makes both."""
        return None, None

    def base_model_of(self, finetune_id: str) -> str | None:
        """The base model a fine-tune was trained on, where each has its own (what its Compare base
        image must use); None where the provider can't tell."""
        return None

    def is_tiny_model(self, spec: str | None) -> bool:
        """Whether a base model (None: the default one) is a tiny test model, whose images are noise."""
        return False

    def close(self) -> None:
        """Release what it holds (a pooled client, runs in this process)."""


class ProviderBase(Provider):
    """What a provider class inherits: the protocol's capability defaults (a class that names a
    protocol as its base gets its members), to override for each capability it offers."""
