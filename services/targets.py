"""Which fine-tunes an owner may generate with: their own ready jobs and imported LoRAs, found by id or name."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.config import Settings
from services.errors import InputError
from services.providers import registry
from services.providers.base import ImportedLora
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
    imported: bool = False  # a LoRA file made elsewhere (``Studio.import_lora``), not a job of this app


def imported_target(provider_key: str, lora: ImportedLora) -> Target:
    """An imported LoRA as something to compare, on the provider that keeps it."""
    return Target(provider_key, lora.id, lora.trigger_word,
                  f"{lora.name} · imported {lora.family_label} LoRA · {lora.id[-8:]}", "", lora.name, True)


def ready_targets(jobs: JobStore, owner: str, imported: Sequence[Target] = ()) -> list[Target]:
    """``owner``'s ready fine-tunes, newest first, then ``imported`` (their imported LoRAs)."""
    out = []
    for j in jobs.list(owner):
        if j.status != "ready":
            continue
        ref = j.result.get("finetune_id") or j.remote_id or ""
        if ref:
            trigger = j.params.get("trigger_word", "")
            out.append(Target(j.provider, ref, trigger, f"{j.name} · {j.provider} · {ref[:10]}", j.id, j.name))
    return out + list(imported)


def guess_provider(finetune_id: str, provider_keys: list[str]) -> str:
    """The provider a bare fine-tune id belongs to (each says which ids are its own)."""
    return registry.guess_provider(finetune_id, provider_keys)


def find_target(ref: str, jobs: JobStore, owner: str, provider_keys: list[str],
                imported: Sequence[Target] = ()) -> Target:
    """The fine-tune ``ref`` names: one of ``owner``'s ready jobs (or ``imported`` LoRAs) by job id, fine-tune
    id or name (the newest of that name), else a bare fine-tune id (``authorize_target`` decides if it may
    be used)."""
    ref = (ref or "").strip()
    if not ref:
        raise InputError("No fine-tune is given.", hint="Name one of your ready fine-tunes, or give a fine-tune id.")
    mine = ready_targets(jobs, owner, imported)
    for t in mine:
        if ref in (t.job_id, t.finetune_id):
            return t
    for t in mine:
        if ref == t.name:
            return t
    return Target(guess_provider(ref, provider_keys), ref)


def authorize_target(target: Target, jobs: JobStore, owner: str, settings: Settings, own_key: bool,
                     imported: Sequence[Target] = ()) -> Target:
    """The target, if this visitor may use it: one of their own ready fine-tunes, or, hosted, an id from
    elsewhere only on a provider that takes the visitor's own credentials, and only with them (``own_key``:
    never another visitor's local LoRA, never on the app's shared key). Checked before anything is charged
    or sent. ``imported``: the owner's imported LoRAs, theirs as their jobs are."""
    for mine in ready_targets(jobs, owner, imported):
        if (mine.provider_key, mine.finetune_id) == (target.provider_key, target.finetune_id):
            return mine
    if not settings.hosted:
        return target  # one person's app: an id from a notebook or another install is theirs
    credentials = registry.credentials(target.provider_key)
    if credentials.kind != "none":
        if own_key:
            return target  # their key or sign-in, their account: the service decides what it may use
        raise InputError(credentials.foreign_id.format(id=target.finetune_id[:80]), hint=credentials.foreign_id_hint)
    raise InputError(f"{target.finetune_id[:40]} is not one of your fine-tunes.",
                     hint="Pick one of your ready fine-tunes, or train one on the Train tab.")
