"""The studio as a library: the whole workflow for notebooks and scripts, without the pages.

It is the same object graph the app runs on (same data dir, job store, providers and rules), so a
job launched here shows on the Train tab and the other way round. In a notebook::

    from services.studio import Studio

    studio = Studio()                                   # settings from the environment
    ds = studio.dataset("my-cup").add("photos/")        # a folder, a .zip or image files
    ds.set_trigger_word("CUPX").trigger_first()
    job = studio.launch(ds, "cup-v1", iterations=100)   # the default provider: local engine or CometAPI
    job.wait()                                          # a progress bar until it is ready
    pair = studio.compare(job, "a photo of CUPX cup on a desk")
    pair.images()                                       # (base, tuned) as PIL images
    grid = studio.grid(job, ["CUPX cup on a beach", "CUPX cup in snow"], strengths=[0.6, 1.0])
    grid.contact_sheet()                                # one labelled PIL image
    studio.close()                                      # stops tracking and local training (resumable)

``create_app(studio=studio)`` puts the pages on top of the same studio. Every method takes an
``owner``: a notebook or script is the one local owner; the app passes each hosted visitor's.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from services import compare as cmp
from services.access import ProviderAccess
from services.caller import Caller
from services.captioning import Captioner, CaptionReport, images_to_caption
from services.providers import registry
from services.providers.cometapi.client import CometAPIClient
from services.config import Secret, Settings
from services.storage.datasets import Dataset, DatasetStore, DatasetStores, ExportResult, ImportReport
from services.storage.captions import add_affixes, find_replace, trigger_first
from services.errors import InputError, StudioError
from services.targets import Target, authorize_target, find_target, imported_target, ready_targets
from services.storage import atomic
from services.storage.database import DatabaseBackup
from services.storage.jobs import Job, JobStore
from services.storage.owners import LOCAL_OWNER, installation_secret, sweep_empty
from services.providers.base import (PRESETS, GenerateRequest, Holder, ImportedLora, Provider, ProgressFn,
                                     TrainChoices, TrainRequest)
from services.storage.results import ResultStore
# Handed on to the pages (components/ import services through this module, the caller and base.py's
# types): the records Studio hands out and the rules a page shows before it asks Studio for anything.
from services.captioning import CAPTION_MODES  # noqa: F401
from services.compare import (STRENGTH_RANGE, CellResult, GridResult, PairResult, failure_card,  # noqa: F401
                              parse_strengths, plan_grid, random_seed)
from services.storage.datasets import dataset_warnings  # noqa: F401
from services.storage.results import ResultRecord  # noqa: F401
from services.training import Tracker, TrainingService

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".zip", ".txt"})
# The shortest start of a job id that names a job (the Train tab's table shows 8 characters).
MIN_ID_PREFIX = 6


def default_providers(settings: Settings) -> dict[str, Provider]:
    """Every registered provider; the first is the default: CometAPI with a key, else the local engine.
    Hugging Face comes last: it spends money on the account whose token it runs with, so it is never
    picked for you (each says so: ``ProviderInfo.may_be_default``)."""
    return registry.build(settings)


def files_in(paths: Iterable[Path | str]) -> list[Path]:
    """Files to import: each file as given, and a folder's images, zips and captions (recursively,
    hidden files left out), in a stable order."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                          and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            out.append(path)
        else:
            raise InputError(f"{path} does not exist.", hint="Give a folder, a .zip or image files.")
    if not out:
        raise InputError("No images were found there.", hint="Give a folder with JPG, PNG or WebP images, or a .zip.")
    return out


class Studio:
    """Datasets, fine-tunes and comparisons over one data dir; the app's pages sit on top of one.

    ``background`` (default True) resumes interrupted local jobs, tracks unfinished jobs every
    ``track_interval`` seconds and keeps the database copy (when the database lives elsewhere).
    Use it as a context manager, or call ``close()``.
    """

    def __init__(self, settings: Settings | None = None, *, providers: dict[str, Provider] | None = None,
                 track_interval: float = 3.0, background: bool = True, owner: str = LOCAL_OWNER) -> None:
        self.settings = settings = settings or Settings.from_env()
        if settings.hosted:
            installation_secret(settings)  # a lost secret stops here, not on each visitor's request
            sweep_empty(settings)  # owner folders that calls which never wrote once left behind
        self.owner = owner
        self.datasets = DatasetStores(settings)
        self.providers = providers if providers is not None else default_providers(settings)
        self.jobs = JobStore.from_settings(settings)  # one database: jobs, their events, generated images
        self.training = TrainingService(
            self.jobs, self.providers, self.datasets,
            max_images={key: p.max_images for key, p in self.providers.items()},
            max_active=registry.hosted_job_caps(settings, self.providers) if settings.hosted else None,
        )
        self.access = ProviderAccess(settings, self.providers, registry.own_makers(settings, self.providers))
        self.results = ResultStore(settings, jobs=self.jobs)
        self.tracker: Tracker | None = None
        self.backup: DatabaseBackup | None = None
        self._track_interval = track_interval
        if background:
            self.start()

    @property
    def default_provider(self) -> str:
        return next(iter(self.providers))

    def caller(self, caller: Caller | None = None, owner: str | None = None, key: Secret | None = None,
               address: str = "") -> Caller:
        """Who a call is for: ``caller`` as given, else one made of the older keywords (``owner``, ``key``:
        their own CometAPI key, ``address``), else this studio's owner with the environment's settings."""
        if caller is not None:
            return caller
        return Caller(owner or self.owner, key or None, None, address or None)

    def start(self) -> "Studio":
        """Resume interrupted local jobs and start tracking; called by ``__init__`` unless ``background=False``."""
        if self.tracker is None:
            self.training.resume_on_start()
            self.tracker = Tracker(self.training, interval=self._track_interval).start()
            if self.settings.db_backup_path is not None:
                self.backup = DatabaseBackup(self.jobs, self.settings.db_backup_path,
                                             self.settings.db_backup_every_s).start()
        return self

    def close(self) -> None:
        """Stop tracking, take a last database copy, stop local training at a checkpoint (it resumes on
        the next start) and close the providers' connections. Safe to call twice."""
        if self.tracker is not None:
            self.tracker.stop()
        if self.backup is not None:  # after the tracker's last write: the copy has it
            self.backup.stop()
            self.backup = None
        self.training.close()
        self.access.close()

    def __enter__(self) -> "Studio":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ datasets

    def store(self, owner: str | None = None) -> DatasetStore:
        return self.datasets(owner or self.owner)

    def list_datasets(self, owner: str | None = None, *, caller: Caller | None = None) -> list[str]:
        """The names of the caller's datasets."""
        return self.store(self.caller(caller, owner).owner).list_names()

    def dataset(self, name: str, *, create: bool = True, owner: str | None = None,
                caller: Caller | None = None) -> "DatasetHandle":
        """A dataset by name; made (empty) when it doesn't exist yet and ``create`` is true."""
        owner = self.caller(caller, owner).owner
        if not (name or "").strip():
            raise InputError("No dataset name was given.", hint="Name one of your datasets, or a new one.")
        store = self.store(owner)
        if not store.exists(name):
            if not create:
                store.open(name)  # raises "was not found", with a hint
            name = store.create(name).name
        return DatasetHandle(self, name, owner)

    def new_dataset(self, name: str, *, caller: Caller | None = None) -> "DatasetHandle":
        """A new, empty dataset called ``name``, or ``name-2`` (and so on) where the caller has one of that name."""
        owner = self.caller(caller).owner
        return DatasetHandle(self, self.store(owner).create(name).name, owner)

    def captioner(self, key: Secret | None, owner: str, address: str, images: int) -> Captioner | None:
        """The visitor's own key, else the shared one, charged one paid call per image when hosted;
        None when there is no key at all."""
        settings = self.settings
        if key:
            return Captioner(lambda: CometAPIClient(settings.cometapi_base_url, key), settings.caption_model,
                             settings.caption_concurrency)
        if not settings.cometapi_key:
            return None
        if settings.hosted:
            self.access.budget.charge(owner, address, images)
        return Captioner(lambda: CometAPIClient.from_settings(settings), settings.caption_model,
                         settings.caption_concurrency)

    def auto_caption(self, dataset: str, *, mode: str = "general", only_empty: bool = True, owner: str | None = None,
                     key: Secret | None = None, address: str = "", progress: ProgressFn | None = None,
                     caller: Caller | None = None) -> CaptionReport:
        """Caption the dataset's images with a vision model through CometAPI (needs a key)."""
        caller = self.caller(caller, owner, key, address)
        store = self.store(caller.owner)
        images = len(images_to_caption(store.open(dataset), only_empty))  # one paid call each
        captioner = self.captioner(caller.cometapi_key, caller.owner, caller.address, images)
        if captioner is None:
            raise InputError("Auto-captioning needs a CometAPI key.",
                             hint="Set COMETAPI_KEY and restart, or write the captions yourself.")
        return captioner.caption_dataset(store, dataset, mode=mode, only_empty=only_empty, progress=progress)

    # ------------------------------------------------------------ providers, as a caller sees them

    def provider_for(self, provider_key: str, caller: Caller | None = None) -> Provider:
        """The provider the caller's requests go to: on their own key or sign-in where it takes them,
        else the app-wide one (nothing is charged for asking)."""
        caller = self.caller(caller)
        own = self.access.own_provider(provider_key, caller.secret_for(registry.credentials(provider_key)))
        return own or self.training.provider(provider_key)

    def adopt(self, caller: Caller) -> None:
        """Track the caller's unfinished jobs on their own key or sign-in again (after a restart the app
        held neither): call it when a visitor signs in, enters a key, or opens the page."""
        for key in self.providers:
            own = self.access.own_provider(key, caller.secret_for(registry.credentials(key)))
            if own is not None:
                self.training.adopt(caller.owner, own)

    def calls_left(self, provider_key: str, caller: Caller | None = None) -> int | None:
        """Hosted, on a provider whose app-wide paid calls are budgeted and without the caller's own key:
        how many the caller may still make this hour; None where nothing is counted."""
        caller = self.caller(caller)
        credentials = registry.credentials(provider_key)
        if not (self.settings.hosted and credentials.shared_budget) or caller.secret_for(credentials):
            return None
        return self.access.budget.remaining(caller.owner, caller.address)

    def banner(self, provider_key: str, caller: Caller | None = None) -> str:
        """The line over the Train tab: whether the provider can be used, and on whose account."""
        caller = self.caller(caller)
        provider = self.providers.get(provider_key)
        if provider is None:
            return ""
        credentials = registry.credentials(provider_key)
        secret = caller.secret_for(credentials)
        own_banner = credentials.own_banner.format(label=provider.label)
        if credentials.kind == "sign_in" and self.access.own_provider(provider_key, secret) is not None:
            return own_banner
        own_key = credentials.kind == "own_key" and secret is not None
        hosted = self.settings.hosted
        notice = self.training.notices.get(provider_key)
        ready, why = (True, "") if own_key else provider.readiness()
        if not ready:
            if hosted and credentials.hosted_missing:
                why = credentials.hosted_missing
            return f"⚠️ **{provider.label} can't be used yet.** {why}"
        if notice:
            return f"⚠️ **{provider.label}: {notice}**"
        if own_key:
            return own_banner
        if hosted and credentials.shared_budget:
            left = self.access.budget.remaining(caller.owner, caller.address)
            return (f"✅ {provider.label}: using this app's shared key, limited to {self.settings.shared_key_limit} "
                    f"paid calls per hour per visitor. {left} left for you this hour. Enter your own key at the top "
                    "for more.")
        if provider.model_label:  # the local engine says which model it runs (the tiny one makes noise, by design)
            return f"✅ {provider.label}: {provider.model_label}"
        return f"✅ {provider.label} is configured."

    def train_choices(self, provider_key: str) -> TrainChoices:
        """What the Train tab shows for a provider beyond the common settings, with its pickers' values."""
        provider = self.training.provider(provider_key)
        return TrainChoices(registry.choices(provider_key), tuple(provider.model_choices()),
                            provider.default_model_choice(), tuple(provider.memory_choices()))

    def memory_check(self, provider_key: str, **values) -> tuple[str, str]:
        """(the memory preset, its estimated peak and the GPU; why the training would not fit or the base
        model can't be used) for the Train tab's settings ``values`` (``train_request``'s), where the provider
        trains on this machine's GPU; ("", "") elsewhere."""
        provider = self.training.provider(provider_key)
        options = registry.train_options(provider_key, **{k: values.pop(k, None) for k in
                                                          ("base_model", "memory_preset", "hardware",
                                                           "gradient_checkpointing")})
        request = TrainRequest(name="-", mode="general", lora_rank=int(values.get("lora_rank") or 32),
                               priority=values.get("priority") or "quality", options=options)
        try:
            plan = provider.memory_plan(request)
        except StudioError as exc:
            return "", exc.user_message()
        if plan is None:
            return "", ""
        if plan.preset is not None:
            try:
                plan.check()
            except StudioError as exc:
                return plan.summary(), exc.user_message()
        return plan.summary(), ""

    def generated(self, *, limit: int = 60, caller: Caller | None = None) -> list[tuple[Path, ResultRecord]]:
        """The caller's images generated here that came out, newest first, with their settings."""
        owner = self.caller(caller).owner
        found = ((self.results.path_for(owner, r), r) for r in self.results.list(owner, limit=limit) if r.status == "ok")
        return [(path, r) for path, r in found if path is not None]

    def placeholder_tile(self) -> Path:
        """A light grey tile a page shows in grid cells that are still rendering (in the data dir: pages
        serve a copy of it)."""
        path = self.settings.data_dir / ".assets" / "pending.png"
        if not path.exists():
            with atomic.replacing(path) as tmp:
                Image.new("RGB", (64, 64), (236, 236, 240)).save(tmp, "PNG")
        return path

    def tuned_models(self) -> list[str]:
        """The models a fine-tune can be generated with, where a provider offers several (the Compare tab)."""
        return [m for p in self.providers.values() for m in p.tuned_models()]

    def training_slots(self, caller: Caller | None = None) -> list["TrainingSlot"]:
        """Each provider that trains one job at a time here: which job holds it (the caller's own, if it is)."""
        caller = self.caller(caller)
        slots = []
        for key, provider in self.providers.items():
            if provider.queues_training:
                holder = provider.training_now()
                mine = holder and self.jobs.find_by_remote(caller.owner, key, holder.remote_id)
                slots.append(TrainingSlot(provider.label, holder, mine or None))
        return slots

    # ------------------------------------------------------------ training

    def train_request(self, name: str, *, provider: str | None = None, mode: str = "general", trigger_word: str = "",
                      iterations: int | None = None, learning_rate: float | None = None, lora_rank: int | None = None,
                      finetune_type: str | None = None, priority: str | None = None, captioning: bool | None = None,
                      gradient_checkpointing: bool | None = None, base_model: str | None = None,
                      memory_preset: str = "", hardware: str = "") -> TrainRequest:
        """A validated request: what is not given comes from the mode's defaults (``PRESETS``); the
        provider-specific settings go to ``provider``'s own options (those it does not take are left out)."""
        preset = PRESETS.get(mode, PRESETS["general"])

        def pick(value, key: str):
            return preset[key] if value is None else value

        options = registry.train_options(provider or self.default_provider, base_model=base_model,
                                         memory_preset=memory_preset, hardware=hardware,
                                         gradient_checkpointing=gradient_checkpointing)
        return TrainRequest(
            name=(name or "").strip(), mode=mode, trigger_word=(trigger_word or "").strip(),
            iterations=pick(iterations, "iterations"), learning_rate=learning_rate,
            lora_rank=pick(lora_rank, "lora_rank"), finetune_type=pick(finetune_type, "finetune_type"),
            priority=pick(priority, "priority"), captioning=pick(captioning, "captioning"), options=options,
        ).validate()

    def launch(self, dataset: "str | DatasetHandle", name: str, *, provider: str | None = None, mode: str = "general",
               trigger_word: str = "", owner: str | None = None, key: Secret | None = None, address: str = "",
               on_upload: ProgressFn | None = None, caller: Caller | None = None, **settings) -> "JobHandle":
        """Start a fine-tune of ``dataset`` called ``name`` and return its job at once (``.wait()`` for it).

        ``provider``: "local", "cometapi" or "huggingface" (default: the app's default; Hugging Face runs on
        HF_TOKEN's account, which pays, or a hosted visitor's sign-in: ``hardware`` names a Jobs flavour, e.g.
        "a100-large", empty for the cheapest that fits; ``studio.providers["huggingface"].estimate(request)``
        prices it first). ``trigger_word`` defaults to the dataset's. Further settings (``iterations``,
        ``learning_rate``, ``lora_rank``, ``finetune_type``, ``priority``, ``captioning``,
        ``gradient_checkpointing``) default to the mode's; ``base_model`` (local engine: a key of
        ``services.engine.models``, e.g. "flux1-dev", "flux2-klein-base-4b") defaults to ``FLUX_LOCAL_MODEL``,
        ``memory_preset`` (local engine) to the one the GPU picks. The request is checked before anything is
        charged; hosted, a launch on the shared key costs one paid call."""
        caller = self.caller(caller, owner, key, address)
        dataset_name = dataset.name if isinstance(dataset, DatasetHandle) else str(dataset or "")
        if dataset_name and not trigger_word:
            trigger_word = self.store(caller.owner).open(dataset_name).trigger_word or "TOK"
        provider_key = provider or self.default_provider
        request = self.train_request(name, provider=provider_key, mode=mode, trigger_word=trigger_word, **settings)
        chosen, charge = self.access.resolve(provider_key, caller.owner, caller.cometapi_key, cost=1,
                                             address=caller.address, hf_token=caller.hf_token)
        job = self.training.launch(caller.owner, provider_key, dataset_name, request, on_upload=on_upload,
                                   provider=chosen, charge=charge)
        return JobHandle(self, job, caller.owner)

    def list_jobs(self, owner: str | None = None, *, caller: Caller | None = None) -> list[Job]:
        """The caller's jobs, newest first."""
        return self.jobs.list(self.caller(caller, owner).owner)

    def job(self, ref: "str | JobHandle", owner: str | None = None, *, caller: Caller | None = None) -> "JobHandle":
        """One of the caller's jobs by id, fine-tune id, name (the newest of that name) or the start of its
        id (at least ``MIN_ID_PREFIX`` characters, as the Train tab's table shows it)."""
        if isinstance(ref, JobHandle):
            return ref
        owner = self.caller(caller, owner).owner
        ref = (ref or "").strip()
        jobs = self.jobs.list(owner) if ref else []
        found = next((j for j in jobs if ref in (j.id, j.remote_id)), None) \
            or next((j for j in jobs if j.name == ref), None)
        if found is None and len(ref) >= MIN_ID_PREFIX:
            starting = [j for j in jobs if j.id.startswith(ref)]
            if len(starting) > 1:
                raise InputError(f"'{ref}' starts the ids of {len(starting)} of your jobs.",
                                 hint="Give more of the id, or the job's name.")
            found = starting[0] if starting else None
        if found is None:
            raise InputError(f"No job of yours is called or numbered '{ref[:60]}'.",
                             hint="List your jobs to see their names and ids.")
        return JobHandle(self, found, owner)

    def refresh(self, job_id: str, owner: str | None = None) -> Job:
        """The job as it is now: asks its provider unless the tracker is already polling it."""
        owner = owner or self.owner
        if self.tracker is None or not self.tracker.polling:
            self.training.track_once(owner)
        return self.jobs.get(owner, job_id)

    def cancel(self, ref: "str | JobHandle", *, caller: Caller | None = None) -> Job:
        """Cancel one of the caller's queued or running jobs (a resumable provider keeps its last checkpoint)."""
        return self.job(ref, caller=caller).cancel()

    def resume(self, ref: "str | JobHandle", *, caller: Caller | None = None) -> Job:
        """Continue one of the caller's interrupted or cancelled jobs from its last checkpoint."""
        return self.job(ref, caller=caller).resume()

    def delete(self, ref: "str | JobHandle", *, caller: Caller | None = None) -> Job:
        """Delete one of the caller's jobs (a finished fine-tune on its provider too)."""
        handle = self.job(ref, caller=caller)
        return self.training.delete(handle.owner, handle.id)

    def publish(self, ref: "str | JobHandle", repo_id: str, token: Secret, *, private: bool = True,
                caller: Caller | None = None) -> str:
        """Upload a ready fine-tune of a provider that publishes (the local engine) to a Hub model repo with
        ``token`` (used for this upload only); returns the repo's URL."""
        job = self.job(ref, caller=caller).job
        provider = self.providers.get(job.provider)
        if provider is None or not provider.can_publish:
            raise InputError(f"'{job.name}' was trained on {job.provider}; only local LoRAs can be published from here.")
        if job.status != "ready" or not job.remote_id:
            raise InputError(f"'{job.name}' is {job.status}.", hint="Publish it once it is ready.")
        if not token:
            raise InputError("The token is empty.", hint="Paste a Hugging Face token with write access.")
        return provider.publish(job.remote_id, (repo_id or "").strip(), token, private=bool(private))

    # ------------------------------------------------------------ comparing

    def ready_finetunes(self, caller: Caller | None = None) -> list[Target]:
        """The caller's ready fine-tunes, newest first, then their imported LoRAs (``Target.imported``),
        newest first: the Compare tab's picker."""
        owner = self.caller(caller).owner
        return ready_targets(self.jobs, owner, self._imported_targets(owner))

    def target(self, finetune: "str | JobHandle | ImportedLora", owner: str | None = None, key: Secret | None = None,
               *, caller: Caller | None = None) -> Target:
        """The fine-tune to generate with, if the caller may: one of theirs (or an imported LoRA of theirs)
        by job id, fine-tune id or name, or (hosted) an id from elsewhere on a provider that takes their own
        key or sign-in, with them."""
        caller = self.caller(caller, owner, key)
        if isinstance(finetune, (JobHandle, ImportedLora)):
            finetune = finetune.id
        imported = self._imported_targets(caller.owner)
        found = find_target(str(finetune), self.jobs, caller.owner, list(self.providers), imported)
        if not found.job_id and not found.imported:
            job = next((j for j in self.jobs.list(caller.owner) if finetune in (j.id, j.name, j.remote_id)), None)
            if job is not None:  # one of theirs, not ready: say so rather than "not one of yours"
                raise InputError(f"Fine-tune '{job.name}' is {job.status}, not ready.",
                                 hint="Wait until it is ready, then compare.")
        own = caller.secret_for(registry.credentials(found.provider_key)) is not None
        return authorize_target(found, self.jobs, caller.owner, self.settings, own, imported)

    def compare(self, finetune: "str | JobHandle | ImportedLora", prompt: str, *, seed: int = 42, strength: float = 1.0,
                width: int = 1024, height: int = 768, aspect_ratio: str = "1:1", steps: int | None = None,
                guidance: float | None = None, safety_tolerance: int = 2, output_format: str = "jpeg",
                tuned_model: str | None = None, owner: str | None = None, key: Secret | None = None,
                address: str = "", caller: Caller | None = None) -> "Comparison":
        """The base model and the fine-tune with the same prompt and seed, side by side.

        ``steps``/``guidance`` default to the model's own. The local engine rounds the size to what the
        model takes (the tiny test model makes small images). Hosted, on the shared key, it costs two paid calls."""
        caller = self.caller(caller, owner, key, address)
        target = self.target(finetune, caller=caller)
        request = self.generate_request(prompt, seed=seed, strength=strength, width=width, height=height,
                                        aspect_ratio=aspect_ratio, steps=steps, guidance=guidance,
                                        safety_tolerance=safety_tolerance, output_format=output_format)
        provider = self.access.for_caller(target.provider_key, caller, cost=2)
        pair = cmp.compare_pair(provider, request, finetune_id=target.finetune_id, tuned_model=tuned_model,
                                out_dir=self.results.out_dir(caller.owner), owner=caller.owner, results=self.results)
        return Comparison(pair, target, request,
                          tiny=provider.is_tiny_model(provider.base_model_of(target.finetune_id)),
                          strength_fixed=provider.strength_fixed(target.finetune_id),
                          calls_left=self.calls_left(target.provider_key, caller))

    def grid(self, finetune: "str | JobHandle | ImportedLora", prompts: Sequence[str], strengths: Sequence[float] = (0.6, 0.9, 1.2),
             *, include_base: bool = True, seed: int = 42, width: int = 1024, height: int = 768,
             aspect_ratio: str = "1:1", steps: int | None = None, guidance: float | None = None,
             safety_tolerance: int = 2, output_format: str = "jpeg", tuned_model: str | None = None,
             owner: str | None = None, key: Secret | None = None, address: str = "",
             on_cell: Callable[[cmp.CellResult, cmp.GridProgress], None] | None = None,
             cancel: threading.Event | None = None, max_concurrency: int = 4,
             caller: Caller | None = None) -> "Grid":
        """Rows = prompts, columns = the base model (optional) and each strength; one seed for all.

        ``on_cell`` is called (from worker threads) as each cell finishes; once ``cancel`` is set no further
        cell is started (nobody would see it, and each is paid for). Checked whole before anything is
        charged: hosted, on the shared key, each cell costs one paid call."""
        caller = self.caller(caller, owner, key, address)
        target = self.target(finetune, caller=caller)
        lines, columns = cmp.plan_grid(list(prompts), list(strengths), include_base, target.finetune_id)
        template = self.generate_request(lines[0], seed=seed, strength=1.0, width=width, height=height,
                                         aspect_ratio=aspect_ratio, steps=steps, guidance=guidance,
                                         safety_tolerance=safety_tolerance, output_format=output_format)
        provider = self.access.for_caller(target.provider_key, caller, cost=len(lines) * len(columns))
        result = cmp.run_grid(provider, lines, list(strengths), template, finetune_id=target.finetune_id,
                              tuned_model=tuned_model, include_base=include_base, max_concurrency=max_concurrency,
                              on_cell=on_cell, out_dir=self.results.out_dir(caller.owner), owner=caller.owner,
                              results=self.results, cancel=cancel)
        return Grid(result, self.results.contact_sheet_path(caller.owner, result.group_id),
                    calls_left=self.calls_left(target.provider_key, caller))

    # ------------------------------------------------------------ LoRA files in and out

    def export_lora(self, finetune: "str | JobHandle | ImportedLora", format: str = "comfyui", *,
                    caller: Caller | None = None) -> Path:
        """A ready fine-tune of the caller's own (or an imported LoRA) as a file for another tool: ``format``
        "comfyui" (FLUX.1: kohya ``lora_unet_*`` keys for ComfyUI and Forge; FLUX.2 [klein]: BFL
        ``diffusion_model.*`` keys for ComfyUI and BFL's inference) or "diffusers" (PEFT keys, with the base
        model and trigger word in its metadata). Written once beside the LoRA (a local job's output folder,
        whose model card then lists it) and reused. A Hugging Face job's LoRA is exported once it is on this
        machine: import its repo first (``import_lora``)."""
        from services.engine.lora_formats import check_format

        caller = self.caller(caller)
        check_format(format)
        target = self.target(finetune, caller=caller)
        if not (target.job_id or target.imported):
            raise InputError(f"{target.finetune_id[:80]} is not one of your fine-tunes.",
                             hint="Export one of your ready fine-tunes (or a LoRA you imported).")
        provider = self.providers.get(target.provider_key)
        if provider is not None and provider.can_export:
            return provider.export_lora(target.finetune_id, format)
        copy = next((lora for lora in self.imported_loras(caller=caller) if lora.source == target.finetune_id), None)
        if copy is not None:  # trained elsewhere, and its LoRA was imported here
            return self._lora_keeper().export_lora(copy.id, format)
        where = provider.label if provider is not None else target.provider_key
        raise InputError(f"'{target.name or target.finetune_id[:80]}' was trained on {where}; its LoRA is in "
                         f"{target.finetune_id[:80]}, not on this machine.",
                         hint=f"Import it first (Compare tab, or studio.import_lora({target.finetune_id[:80]!r})), "
                              "then export it.")

    def import_lora(self, source: "str | Path", *, name: str = "", base_model: str | None = None,
                    filename: str | None = None, caller: Caller | None = None,
                    on_progress: ProgressFn | None = None) -> ImportedLora:
        """Make a LoRA from elsewhere something Compare renders (base vs tuned, grids, strength sweeps on the
        local engine): ``source`` is a ``.safetensors`` file on this machine (diffusers, kohya / FluxGym /
        musubi or ComfyUI / BFL keys), or a Hub model repo ``owner/name`` holding one (a Hugging Face job's
        too; see ``import_lora_repo``). See ``import_lora_file`` for the checks and the base model."""
        path = Path(str(source)).expanduser()
        if isinstance(source, Path) or path.is_file():
            return self.import_lora_file(path, name=name, base_model=base_model, caller=caller)
        return self.import_lora_repo(str(source), name=name, base_model=base_model, filename=filename,
                                     caller=caller, on_progress=on_progress)

    def import_lora_from(self, file: "str | Path | None" = None, repo: str = "", *, name: str = "",
                         base_model: str | None = None, caller: Caller | None = None,
                         on_progress: ProgressFn | None = None) -> ImportedLora:
        """One of an uploaded ``file`` or a Hub ``repo`` (the Compare tab's and the HTTP API's form): both, or
        neither, is refused with what to do."""
        repo = (repo or "").strip()
        if file and repo:
            raise InputError("Both a file and a repo were given.", hint="Send one of them.")
        if file:
            return self.import_lora_file(file, name=name, base_model=base_model, caller=caller)
        if repo:
            return self.import_lora_repo(repo, name=name, base_model=base_model, caller=caller,
                                         on_progress=on_progress)
        raise InputError("No LoRA was given.", hint="Send its .safetensors file, or a Hub repo (owner/name).")

    def import_lora_file(self, path: "str | Path", *, name: str = "", base_model: str | None = None,
                         caller: Caller | None = None) -> ImportedLora:
        """Keep the LoRA file ``path`` for the caller, checked first (only ``.safetensors``, never a pickle;
        at most ``lora_formats.MAX_LORA_BYTES``; its header says it is a FLUX.1 or FLUX.2 [klein] LoRA; every
        layer fits the base model), each refusal saying why. ``base_model``: a local engine base model of the
        LoRA's family; empty: ``FLUX_LOCAL_MODEL`` if it is of that family, else (where that is the tiny test
        model) the tiny model of the LoRA's family, else the family's default (not hosted)."""
        caller = self.caller(caller)
        path = Path(path)
        if not path.is_file():
            raise InputError(f"There is no file {path.name or path}.", hint="Pick the LoRA's .safetensors file.")
        keeper = self._lora_keeper()
        return keeper.import_lora(path, owner=caller.owner, name=name, base_model=base_model, source=path.name)

    def import_lora_repo(self, repo_id: str, *, name: str = "", base_model: str | None = None,
                         filename: str | None = None, caller: Caller | None = None,
                         on_progress: ProgressFn | None = None) -> ImportedLora:
        """Download the LoRA of the Hub model repo ``repo_id`` (``filename``, else its
        pytorch_lora_weights.safetensors, else its only top-level .safetensors) into the Hugging Face cache,
        with progress as ``on_progress(done, total)`` bytes, and keep it as ``import_lora_file`` does. It is
        fetched with the caller's own Hugging Face sign-in (a gated or private repo needs one that can see
        it); not hosted, without one, with HF_TOKEN. Hosted, never on the app's account: a visitor must sign in."""
        from services.engine import lora_formats

        caller = self.caller(caller)
        token = caller.hf_token
        if not token:
            if self.settings.hosted:
                raise InputError("Importing a LoRA from the Hugging Face Hub needs your own Hugging Face sign-in.",
                                 hint="Sign in with Hugging Face at the top of the page, or upload the "
                                      ".safetensors file instead.")
            token = self.settings.hf_token or None
        keeper = self._lora_keeper()
        path = lora_formats.download_lora(repo_id, token=token, on_progress=on_progress, filename=filename or None)
        repo_id = repo_id.strip()
        return keeper.import_lora(path, owner=caller.owner, name=name or repo_id.rsplit("/", 1)[-1],
                                  base_model=base_model, source=repo_id)

    def imported_loras(self, *, caller: Caller | None = None) -> list[ImportedLora]:
        """The caller's imported LoRAs, newest first."""
        owner = self.caller(caller).owner
        return [lora for p in self.providers.values() if p.imports_loras for lora in p.imported_loras(owner)]

    def delete_imported(self, lora: "str | ImportedLora", *, caller: Caller | None = None) -> None:
        """Forget one of the caller's imported LoRAs (by id or name) and remove its files."""
        ref = lora.id if isinstance(lora, ImportedLora) else str(lora or "").strip()
        mine = self.imported_loras(caller=caller)
        found = next((x for x in mine if x.id == ref), None) or next((x for x in mine if x.name == ref), None)
        if found is None:
            raise InputError(f"No imported LoRA of yours is called or numbered '{ref[:60]}'.",
                             hint="List your imported LoRAs to see their names and ids.")
        self._lora_keeper().delete_imported(found.id)

    def _lora_keeper(self) -> Provider:
        """The provider that renders imported LoRAs (the local engine)."""
        keeper = next((p for p in self.providers.values() if p.imports_loras), None)
        if keeper is None:
            raise InputError("Rendering a LoRA made elsewhere needs the local engine, which this app does not run.",
                             hint="Run the studio with the local engine (requirements-local.txt).")
        ready, why = keeper.readiness()
        if not ready:
            raise InputError(f"{keeper.label} can't render imported LoRAs yet. {why}")
        return keeper

    def _imported_targets(self, owner: str) -> list[Target]:
        return [imported_target(key, lora) for key, p in self.providers.items() if p.imports_loras
                for lora in p.imported_loras(owner)]

    @staticmethod
    def generate_request(prompt: str, *, seed: int, strength: float, width: int, height: int, aspect_ratio: str,
                         steps: int | None, guidance: float | None, safety_tolerance: int = 2,
                         output_format: str = "jpeg") -> GenerateRequest:
        """The one rule for a generation's settings, wherever they come from."""
        if not (prompt or "").strip():
            raise InputError("The prompt is empty.", hint="Describe the picture, with the trigger word.")
        return GenerateRequest(prompt=prompt.strip(), seed=int(seed or 0), width=int(width), height=int(height),
                               aspect_ratio=aspect_ratio, steps=None if steps is None else int(steps),
                               guidance=None if guidance is None else float(guidance),
                               safety_tolerance=int(safety_tolerance), output_format=output_format,
                               strength=cmp.check_strength(float(strength)))


@dataclass(frozen=True)
class TrainingSlot:
    """A provider that trains one job at a time here, and the job that holds it (None: idle)."""

    label: str
    holder: Holder | None
    mine: Job | None  # the holder, when it is the caller's own job


@dataclass
class DatasetHandle:
    """One dataset; each method saves at once and returns the handle, so calls chain."""

    studio: Studio
    name: str
    owner: str
    last_report: ImportReport | None = field(default=None, repr=False)

    @property
    def _store(self) -> DatasetStore:
        return self.studio.store(self.owner)

    def info(self) -> Dataset:
        """The dataset as saved: items (file, caption, size), trigger word, folder."""
        return self._store.open(self.name)

    def __len__(self) -> int:
        return len(self.info().items)

    @property
    def trigger_word(self) -> str:
        return self.info().trigger_word

    @property
    def captions(self) -> dict[str, str]:
        """File name -> caption."""
        return {item.file: item.caption for item in self.info().items}

    def add(self, *paths: Path | str, progress: ProgressFn | None = None) -> "DatasetHandle":
        """Add a folder (recursively), zips (with same-name .txt captions) or image files. Files that
        can't be used are reported in ``last_report``, never raised; the others are added."""
        _, self.last_report = self._store.add_files(self.name, files_in(paths), progress=progress)
        return self

    def set_trigger_word(self, word: str) -> "DatasetHandle":
        self._store.set_trigger_word(self.name, word)
        return self

    def set_captions(self, captions: dict[str, str]) -> "DatasetHandle":
        """Set the captions of the files named (file name -> caption); the others keep theirs."""
        self._store.set_captions(self.name, captions)
        return self

    def caption_all(self, caption: str, *, only_empty: bool = True) -> "DatasetHandle":
        """One caption for every image (or only those without one); ``{trigger}`` is the trigger word."""
        text = caption.replace("{trigger}", self.trigger_word or "TOK")
        self._store.map_captions(self.name, lambda c: text if (not only_empty or not c.strip()) else c)
        return self

    def trigger_first(self) -> "DatasetHandle":
        """Put the trigger word first in every caption (added where it is missing)."""
        word = self.trigger_word
        if not word:
            raise InputError("The dataset has no trigger word.", hint="Call set_trigger_word('TOK') first.")
        self._store.map_captions(self.name, lambda c: trigger_first(c, word))
        return self

    def find_replace(self, find: str, replace: str) -> "DatasetHandle":
        if not find:
            raise InputError("Nothing to find.", hint="Give the text to replace.")
        self._store.map_captions(self.name, lambda c: find_replace(c, find, replace))
        return self

    def add_affixes(self, prefix: str = "", suffix: str = "") -> "DatasetHandle":
        self._store.map_captions(self.name, lambda c: add_affixes(c, prefix, suffix))
        return self

    def clear_captions(self) -> "DatasetHandle":
        self._store.map_captions(self.name, lambda c: "")
        return self

    def auto_caption(self, mode: str = "general", *, only_empty: bool = True, caller: Caller | None = None,
                     progress: ProgressFn | None = None) -> CaptionReport:
        """Caption with a vision model through CometAPI (needs ``COMETAPI_KEY``, or the caller's own key)."""
        return self.studio.auto_caption(self.name, mode=mode, only_empty=only_empty, progress=progress,
                                        caller=caller or Caller(self.owner))

    def remove(self, *files: str) -> "DatasetHandle":
        self._store.remove_images(self.name, files)
        return self

    def export_zip(self) -> ExportResult:
        """The training zip (images and same-name captions), as providers receive it."""
        return self._store.export_zip(self.name)

    def delete(self) -> None:
        self._store.delete(self.name)


@dataclass
class JobHandle:
    """One training job; ``job`` is the record as last read (``refresh()`` reads it again)."""

    studio: Studio
    job: Job
    owner: str

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def status(self) -> str:
        return self.job.status

    def refresh(self) -> Job:
        self.job = self.studio.refresh(self.job.id, self.owner)
        return self.job

    def wait(self, timeout: float | None = None, *, poll_s: float = 1.0, progress: bool = True) -> Job:
        """Wait until the job is ready (returned), with a progress bar in a notebook (``tqdm.auto``).

        Raises a ``StudioError`` saying why when it fails or is cancelled, and ``TimeoutError`` after
        ``timeout`` seconds (the job goes on)."""
        from tqdm.auto import tqdm

        deadline = None if timeout is None else time.monotonic() + timeout
        bar = tqdm(total=100, desc=self.job.name, unit="%", disable=not progress, leave=True)
        try:
            while True:
                job = self.refresh()
                bar.n = round(100 * (job.progress or 0.0))
                bar.set_postfix_str((job.message or job.status)[:60], refresh=False)
                bar.refresh()
                if job.status == "ready":
                    bar.n = 100
                    bar.refresh()
                    return job
                if not job.is_active:
                    raise StudioError(f"Fine-tune '{job.name}' is {job.status}: {job.error or job.message}",
                                      hint="Resume it (local engine) or launch it again.")
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"'{job.name}' is still {job.status} after {timeout:g} s; it goes on.")
                time.sleep(poll_s)
        finally:
            bar.close()

    def cancel(self) -> Job:
        self.job = self.studio.training.cancel(self.owner, self.job.id)
        return self.job

    def resume(self) -> Job:
        """Continue an interrupted or cancelled local job from its last checkpoint."""
        self.job = self.studio.training.resume(self.owner, self.job.id)
        return self.job

    def losses(self) -> list[tuple[int, float]]:
        """(step, loss) for each training step recorded so far (the local engine reports every step)."""
        points = [e["data"] for e in self.studio.jobs.events(self.owner, self.job.id, "step")]
        return [(int(p["step"]), float(p["loss"])) for p in points
                if p.get("loss") is not None and p.get("step") is not None]


@dataclass
class Comparison:
    """The base and tuned images of one comparison (paths on disk, with their settings)."""

    pair: cmp.PairResult
    target: Target
    request: GenerateRequest | None = None
    tiny: bool = False  # the fine-tune's base model is a tiny test model: its images are noise, by design
    strength_fixed: str = ""  # why the provider applies this fine-tune at full strength only ("": it sets it)
    calls_left: int | None = None  # hosted, on the shared key: the caller's paid calls left this hour

    @property
    def base(self) -> cmp.CellResult:
        return self.pair.base

    @property
    def tuned(self) -> cmp.CellResult:
        return self.pair.tuned

    def images(self) -> tuple[Image.Image | None, Image.Image | None]:
        """(base, tuned) as PIL images; None for one that failed (its ``.error`` says why)."""
        return _open(self.base), _open(self.tuned)


@dataclass
class Grid:
    """A finished grid; ``contact_sheet()`` draws it as one labelled image (and saves it as PNG)."""

    result: cmp.GridResult
    sheet_path: Path
    calls_left: int | None = None  # hosted, on the shared key: the caller's paid calls left this hour

    @property
    def failed(self) -> int:
        return self.result.failed

    def save_contact_sheet(self) -> Path:
        """Draw the contact sheet into ``sheet_path`` (PNG) and return that path."""
        return cmp.contact_sheet(self.result, self.sheet_path)

    def contact_sheet(self) -> Image.Image:
        with Image.open(self.save_contact_sheet()) as im:
            return im.copy()


def _open(cell: cmp.CellResult) -> Image.Image | None:
    if cell.status != "ok" or not cell.path:
        return None
    with Image.open(cell.path) as im:
        return im.copy()
