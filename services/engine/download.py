"""Fetching a FLUX base model from the Hugging Face Hub into huggingface_hub's own cache.

``fetch_base_model(model, token=..., on_progress=...)`` returns a folder ``<Pipeline>.from_pretrained``
loads without the network:

* a local folder (FLUX_LOCAL_MODEL pointing at one) is used as it is, never downloaded;
* a Hub id is looked up (``HfApi.model_info`` with file sizes), and only what a diffusers pipeline
  loads is fetched: ``model_index.json`` and the component folders, not the single-file checkpoints
  beside them (FLUX.1-dev's root holds a second 23 GB copy of the transformer);
* files already in the cache are not fetched again, and a complete snapshot is returned at once;
* the disk holding the cache must have room for what is missing, checked before the first byte;
* progress is reported as ``on_progress(done_bytes, total_bytes)`` of what is missing;
* a gated repo, a missing one, a refused token or no network each end in an error that says what
  to do. Without the network, a snapshot cached earlier is still used.

The cache is huggingface_hub's (``HF_HUB_CACHE`` / ``HF_HOME``), shared with every other tool, unless
a ``cache_dir`` is passed. The token is a ``Secret``: revealed only to the Hub client, never logged
nor put in a message.
"""
from __future__ import annotations

import glob
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from services.config import Secret
from services.errors import InputError, NetworkError, ProviderError, RateLimitedError, ServerError
from services.engine.hub import HUB_URL, scrub, status_of, transport_errors, validate_repo_id

log = logging.getLogger("flux_studio.local_engine")

ProgressFn = Callable[[int, int], None]

PIPELINE_INDEX = "model_index.json"
# Room left free on top of what is downloaded: the cache's metadata, and the rest of the system.
DISK_HEADROOM_BYTES = 1 * 2**30
# Weight formats diffusers skips when a folder also has safetensors.
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".onnx_data", ".gguf")
# Precision variants (``diffusion_pytorch_model.fp16.safetensors``) diffusers loads only when asked.
VARIANTS = ("fp16", "bf16", "fp32", "fp8", "int8")


@dataclass(frozen=True)
class DownloadPlan:
    repo_id: str
    revision: str  # the commit the files come from
    files: tuple[str, ...]
    total_bytes: int
    missing_bytes: int  # not in the cache yet
    cache_dir: Path


def progress_message(done: int, total: int) -> str:
    """What a run says while its base model downloads (the worker's status, the CLI's phase line)."""
    return f"Downloading the base model: {done / 2**30:.1f} of {total / 2**30:.1f} GB…"


def gb(n: int) -> str:
    return f"{n / 2**30:.1f} GB"


# --------------------------------------------------------------------------- local folders


def looks_local(model: str) -> bool:
    """A path rather than a Hub id: it exists, starts like a path, or is not ``owner/name``."""
    return Path(model).expanduser().exists() or model.startswith((".", "/", "~")) or model.count("/") != 1


def local_model_folder(model: str) -> Path:
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise InputError(f"FLUX_LOCAL_MODEL is {model!r}, which is not a folder.",
                         hint="Point it at a downloaded diffusers FLUX pipeline folder, or at a Hub id "
                              "like black-forest-labs/FLUX.1-dev.")
    if not (folder / PIPELINE_INDEX).is_file():
        raise InputError(f"{folder} has no {PIPELINE_INDEX}, so it is not a diffusers pipeline folder.",
                         hint="Download the whole pipeline (hf download <repo> --local-dir <folder>) and point "
                              "FLUX_LOCAL_MODEL at that folder.")
    return folder


# --------------------------------------------------------------------------- what to fetch


def pipeline_files(sizes: dict[str, int]) -> dict[str, int]:
    """The files a diffusers pipeline loads, out of a repo's ``{path: size}``.

    ``model_index.json`` and every file in a component folder, less other weight formats and
    precision variants where the folder has plain safetensors.
    """
    if PIPELINE_INDEX not in sizes:
        return {}
    by_folder: dict[str, list[str]] = {}
    for path in sizes:
        parts = PurePosixPath(path).parts
        if len(parts) >= 2 and not any(p.startswith(".") for p in parts):
            by_folder.setdefault(parts[0], []).append(path)
    keep = {PIPELINE_INDEX: sizes[PIPELINE_INDEX]}
    for paths in by_folder.values():
        plain = [p for p in paths if p.endswith(".safetensors") and not _variant(p)]
        for p in paths:
            if plain and (p.endswith(OTHER_WEIGHTS) or _variant(p)):
                continue
            keep[p] = sizes[p]
    return keep


def _variant(path: str) -> bool:
    name = PurePosixPath(path).name
    return any(f".{v}." in name or f".{v}-" in name for v in VARIANTS)


def _cached(repo_id: str, filename: str, revision: str, cache_dir: Path | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    return Path(found) if isinstance(found, str) else None


def hub_cache_dir(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def plan_download(repo_id: str, token: Secret, *, cache_dir: Path | None = None) -> DownloadPlan:
    """What fetching ``repo_id`` takes: its pipeline files, their size, and how much is not cached yet.

    Raises the user-facing errors (gated, not found, no network) as ``fetch_base_model`` does.
    """
    from huggingface_hub import HfApi

    repo_id = validate_repo_id(repo_id)
    secret = token.reveal() if isinstance(token, Secret) else ""
    api = HfApi(token=secret or None)
    try:
        info = api.model_info(repo_id, files_metadata=True)
        if info.gated:  # the file list is public; whether this account may download is not
            api.auth_check(repo_id)
    except Exception as exc:
        raise hub_error(exc, repo_id, secret) from None
    sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    files = pipeline_files(sizes)
    if not files:
        raise InputError(f"{repo_id} has no {PIPELINE_INDEX}: it is not a diffusers pipeline.",
                         hint="Use a diffusers FLUX repository such as black-forest-labs/FLUX.1-dev.")
    missing = sum(size for f, size in files.items() if _cached(repo_id, f, info.sha, cache_dir) is None)
    return DownloadPlan(repo_id, info.sha, tuple(sorted(files)), sum(files.values()), missing,
                        hub_cache_dir(cache_dir))


# --------------------------------------------------------------------------- disk space


def free_bytes(path: Path) -> int:
    """Free space on the disk ``path`` is (or will be) on: its nearest existing parent's."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_disk_space(plan: DownloadPlan) -> None:
    if plan.missing_bytes == 0:
        return
    free = free_bytes(plan.cache_dir)
    if free < plan.missing_bytes + DISK_HEADROOM_BYTES:
        cached = plan.total_bytes - plan.missing_bytes
        already = f" ({gb(cached)} of it is cached already)" if cached else ""
        raise InputError(
            f"Downloading {plan.repo_id} needs {gb(plan.missing_bytes)} more disk space{already}, plus "
            f"{gb(DISK_HEADROOM_BYTES)} to spare; {plan.cache_dir} has {gb(free)} free.",
            hint="Free some space, set HF_HUB_CACHE (or HF_HOME) to a bigger disk, or point "
                 "FLUX_LOCAL_MODEL at a folder with the model downloaded.")


# --------------------------------------------------------------------------- progress


class _Progress:
    """Turns huggingface_hub's progress bars into ``on_progress(done_bytes, total_bytes)`` calls.

    ``snapshot_download(tqdm_class=...)`` makes several bars from the class: files fetched, and (from
    huggingface_hub 1.1) bytes in one or two aggregate bars ("Downloading bytes" from the network,
    "Reconstructing" to disk; unit "B"). Done is the furthest byte bar, capped at the plan's total;
    with no byte bar, the share of files fetched. Bars are updated from download threads.
    """

    def __init__(self, total: int, on_progress: ProgressFn) -> None:
        self.total = total
        self.on_progress = on_progress
        self.lock = threading.Lock()
        self.bars: list[_Bar] = []
        self.reported = -1

    def bar_class(self) -> type:
        progress = self

        class Bar(_Bar):
            tracker = progress

        return Bar

    def add(self, bar: _Bar, n: float) -> None:
        """``bar`` moved by ``n``. Counted and reported under one lock: bars are shared by download
        threads, and two of them must never report out of order."""
        with self.lock:
            bar.n += n
            byte_bars = [b for b in self.bars if b.unit == "B"]
            if byte_bars:
                done = max(b.n for b in byte_bars)
            else:
                files = [b for b in self.bars if b.total]
                done = self.total * files[0].n / files[0].total if files else 0
            done = int(min(max(done, 0), self.total))
            if done > self.reported:
                self.reported = done
                self.on_progress(done, self.total)

    def finish(self) -> None:
        with self.lock:
            if self.reported < self.total:
                self.reported = self.total
                self.on_progress(self.total, self.total)


class _Bar:
    """Just enough of tqdm's interface for huggingface_hub's bars; it draws nothing."""

    tracker: _Progress

    def __init__(self, iterable=None, *args, **kwargs) -> None:
        self.iterable = iterable
        self.unit = kwargs.get("unit", "it")
        self.total = kwargs.get("total") or 0
        self.n = kwargs.get("initial") or 0
        self.desc = kwargs.get("desc", "")
        initial, self.n = self.n, 0
        with self.tracker.lock:
            self.tracker.bars.append(self)
        self.tracker.add(self, initial)

    def __iter__(self):
        for item in self.iterable or ():
            yield item
            self.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float | None = 1) -> None:
        self.tracker.add(self, n or 0)

    @property
    def format_dict(self) -> dict:
        return {"n": self.n, "total": self.total, "rate": None}

    def close(self) -> None:
        pass

    def refresh(self, *args, **kwargs) -> None:
        pass

    def set_description(self, desc: str = "", *args, **kwargs) -> None:
        self.desc = desc

    set_description_str = set_description

    def set_postfix_str(self, *args, **kwargs) -> None:
        pass

    set_postfix = set_postfix_str

    def __getattr__(self, name: str):
        # A tqdm method a later huggingface_hub calls that this does not know: a progress display
        # must never break a 30 GB download.
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


# --------------------------------------------------------------------------- fetching


def fetch_base_model(model: str, *, token: Secret | None = None, cache_dir: Path | None = None,
                     on_progress: ProgressFn | None = None) -> Path:
    """A local folder holding the diffusers pipeline ``model`` (a folder, or a Hub id to fetch)."""
    import huggingface_hub

    model = (model or "").strip()
    if not model:
        raise InputError("No base model is set.", hint="Set FLUX_LOCAL_MODEL to a Hub id or a folder.")
    if looks_local(model):
        return local_model_folder(model)
    token = token if isinstance(token, Secret) else Secret("")
    secret = token.reveal()
    try:
        plan = plan_download(model, token, cache_dir=cache_dir)
    except NetworkError:
        cached = _cached_snapshot(model, cache_dir)
        if cached is None:
            raise
        log.info("The Hub cannot be reached: using the cached %s", model)
        return cached
    index = _cached(plan.repo_id, PIPELINE_INDEX, plan.revision, cache_dir)
    if plan.missing_bytes == 0 and index is not None:
        return index.parent  # the snapshot folder: everything is cached
    check_disk_space(plan)
    log.info("Downloading %s: %s of %s to fetch", plan.repo_id, gb(plan.missing_bytes), gb(plan.total_bytes))
    progress = _Progress(plan.missing_bytes, on_progress) if on_progress else None
    try:
        folder = huggingface_hub.snapshot_download(
            plan.repo_id, revision=plan.revision, cache_dir=cache_dir, token=secret or None,
            allow_patterns=[glob.escape(f) for f in plan.files],
            tqdm_class=progress.bar_class() if progress else None,
        )
    except Exception as exc:
        raise hub_error(exc, plan.repo_id, secret) from None
    if progress:
        progress.finish()
    return Path(folder)


def _cached_snapshot(repo_id: str, cache_dir: Path | None) -> Path | None:
    """The complete snapshot cached earlier, when the Hub cannot be asked."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return folder if (folder / PIPELINE_INDEX).is_file() else None


# --------------------------------------------------------------------------- errors


def hub_error(exc: BaseException, repo_id: str, secret: str) -> ProviderError | InputError:
    """A Hub failure as the error the app shows; never with the token in it."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = f"{HUB_URL}/{repo_id}"
    code = status_of(exc)
    if isinstance(exc, GatedRepoError) or (code == 403 and isinstance(exc, HfHubHTTPError)):
        who = ("the account HF_TOKEN belongs to has not been granted access yet"
               if secret else "no HF_TOKEN is set")
        return InputError(
            f"{repo_id} is gated: its licence must be accepted on the Hub before it can be downloaded ({who}).",
            hint=f"Accept it at {url} while signed in, create a read token at {HUB_URL}/settings/tokens, "
                 "set HF_TOKEN to it and restart the app.")
    if code == 401 and secret and not isinstance(exc, RepositoryNotFoundError):
        return InputError("The Hugging Face Hub refused HF_TOKEN (401): it is wrong or was revoked.",
                          hint=f"Create a new read token at {HUB_URL}/settings/tokens and set HF_TOKEN to it.")
    if isinstance(exc, RepositoryNotFoundError):
        private = "HF_TOKEN cannot see it" if secret else "no HF_TOKEN is set"
        return InputError(f"There is no model {repo_id} on the Hugging Face Hub (or it is private and {private}).",
                          hint=f"Check FLUX_LOCAL_MODEL: a Hub id such as black-forest-labs/FLUX.1-dev "
                               f"(see {url}), or a folder.")
    if isinstance(exc, RevisionNotFoundError):
        return InputError(f"{repo_id} has no such revision.", hint="Check the model id.")
    network = (OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError, *transport_errors())
    if isinstance(exc, network):
        return NetworkError(f"The Hugging Face Hub cannot be reached to download {repo_id}, and it is not in "
                            "the cache.",
                            hint="Check the connection (and HF_HUB_OFFLINE), or point FLUX_LOCAL_MODEL at a "
                                 "folder with the model downloaded.")
    if code == 429:
        return RateLimitedError("The Hugging Face Hub is rate limiting downloads.", hint="Try again in a few minutes.")
    if code is not None and code >= 500:
        return ServerError(f"The Hugging Face Hub failed ({code}) while downloading {repo_id}.",
                           hint="Try again in a few minutes.")
    if isinstance(exc, OSError) and not isinstance(exc, HfHubHTTPError):
        return InputError(f"Writing {repo_id} to the cache failed: {scrub(str(exc), secret)}.",
                          hint="Check the disk (space, permissions) of HF_HUB_CACHE.")
    detail = scrub(str(exc), secret) or type(exc).__name__
    return ProviderError(f"Downloading {repo_id} failed: {detail}.", hint="Try again.")
