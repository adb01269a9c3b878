"""Which fine-tunes an owner may generate with: their own ready jobs, found by id or name."""
from __future__ import annotations

from dataclasses import dataclass

from services.config import Settings
from services.errors import InputError
from services.providers.huggingface.jobs import is_finetune_id as is_hf_finetune_id
from services.storage.jobs import JobStore


@dataclass(frozen=True)
class Target:
    """What to compare: a provider and its fine-tune reference, plus the trigger word if known."""

    provider_key: str
    finetune_id: str
    trigger: str = ""
    label: str = ""
    job_id: str = ""
    name: str = ""


def ready_targets(jobs: JobStore, owner: str) -> list[Target]:
    """``owner``'s ready fine-tunes, newest first."""
    out = []
    for j in jobs.list(owner):
        if j.status != "ready":
            continue
        ref = j.result.get("finetune_id") or j.remote_id or ""
        if ref:
            trigger = j.params.get("trigger_word", "")
            out.append(Target(j.provider, ref, trigger, f"{j.name} · {j.provider} · {ref[:10]}", j.id, j.name))
    return out


def guess_provider(finetune_id: str, provider_keys: list[str]) -> str:
    """The provider a bare fine-tune id belongs to: local runs are named "local-…", Hugging Face
    fine-tunes are model repos ("owner/name"), anything else is a CometAPI id."""
    if finetune_id.startswith("local-"):
        wanted = "local"
    elif is_hf_finetune_id(finetune_id):
        wanted = "huggingface"
    else:
        wanted = "cometapi"
    return wanted if wanted in provider_keys else provider_keys[0]


def find_target(ref: str, jobs: JobStore, owner: str, provider_keys: list[str]) -> Target:
    """The fine-tune ``ref`` names: one of ``owner``'s ready jobs by job id, fine-tune id or name
    (the newest of that name), else a bare fine-tune id (``authorize_target`` decides if it may be used)."""
    ref = (ref or "").strip()
    if not ref:
        raise InputError("No fine-tune is given.", hint="Name one of your ready fine-tunes, or give a fine-tune id.")
    mine = ready_targets(jobs, owner)
    for t in mine:
        if ref in (t.job_id, t.finetune_id):
            return t
    for t in mine:
        if ref == t.name:
            return t
    return Target(guess_provider(ref, provider_keys), ref)


def authorize_target(target: Target, jobs: JobStore, owner: str, settings: Settings, own_key: bool) -> Target:
    """The target, if this visitor may use it: one of their own ready fine-tunes, or, hosted, a
    CometAPI id from elsewhere only with their own key (never another visitor's local LoRA, and
    never on the app's shared key). Checked before anything is charged or sent."""
    for mine in ready_targets(jobs, owner):
        if (mine.provider_key, mine.finetune_id) == (target.provider_key, target.finetune_id):
            return mine
    if not settings.hosted:
        return target  # one person's app: an id from a notebook or another install is theirs
    if target.provider_key in ("cometapi", "huggingface") and own_key:
        return target  # their key or sign-in, their account: the service decides what it may use
    if target.provider_key == "huggingface":
        raise InputError(f"{target.finetune_id[:80]} is not one of your fine-tunes.",
                         hint="Sign in with Hugging Face at the top of the page to use a LoRA repo of yours, or "
                              "pick one of your ready fine-tunes.")
    if target.provider_key == "cometapi":
        raise InputError("No CometAPI key of your own is set, and a fine-tune id that is not one of yours "
                         "works only with your own key.",
                         hint="Enter your key at the top of the page, or pick one of your ready fine-tunes.")
    raise InputError(f"{target.finetune_id[:40]} is not one of your fine-tunes.",
                     hint="Pick one of your ready fine-tunes, or train one on the Train tab.")
