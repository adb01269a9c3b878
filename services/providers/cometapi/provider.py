"""CometAPI as a ``Provider``: maps the tabs' requests onto ``CometAPIClient`` calls."""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from services.config import Secret, Settings
from services.errors import InputError, TaskNotFoundError
from services.providers.base import (Credentials, GeneratedImage, GenerateRequest, ProgressFn, ProviderBase,
                                     ProviderInfo, TrainRequest, TrainStatus, job_tag, remote_comment)
from services.providers.cometapi.client import CometAPIClient
from services.providers.cometapi.images import BASE_FOR
from services.providers.cometapi.tasks import TaskResult, TaskStatus

DEFAULT_TUNED_MODEL = "flux-pro-1.1-ultra-finetuned"
# How many recent fine-tunes to inspect when looking a lost submission up by tag.
RECONCILE_SCAN = 25


class CometAPIProvider(ProviderBase):
    """No resume (no checkpoints), no publishing from here, no base-model picker; several models to
    compare (``compare_models``)."""

    key = "cometapi"
    label = "CometAPI"
    max_images = 20
    picks_tuned_model = True

    def __init__(self, client_factory: Callable[[], CometAPIClient], *, has_key: bool) -> None:
        self._client_factory = client_factory
        self._has_key = has_key
        self._pooled: CometAPIClient | None = None
        self._pool_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, key: Secret | None = None, **client_kw) -> "CometAPIProvider":
        key = key if key is not None else settings.cometapi_key
        return cls(lambda: CometAPIClient(settings.cometapi_base_url, key, **client_kw), has_key=bool(key))

    @contextlib.contextmanager
    def _client(self) -> Iterator[CometAPIClient]:
        """The provider's one client (httpx.Client is thread-safe): its pooled connections are
        reused across polls and calls instead of paying a TLS handshake each time."""
        with self._pool_lock:
            if self._pooled is None:
                self._pooled = self._client_factory()
            client = self._pooled
        yield client

    def close(self) -> None:
        with self._pool_lock:
            client, self._pooled = self._pooled, None
        if client is not None:
            client.close()

    # ------------------------------------------------------------ Provider

    def readiness(self) -> tuple[bool, str]:
        if not self._has_key:
            return False, ("No CometAPI key is set. Set COMETAPI_KEY before starting the app "
                           "(or use the local engine, which needs no key).")
        return True, ""

    def submit(self, zip_path: Path, request: TrainRequest, *, tag: str, on_upload: ProgressFn | None = None,
               owner: str | None = None) -> str:
        with self._client() as client:
            return client.finetunes.submit(
                zip_path,
                comment=remote_comment(request.name, tag),
                mode=request.mode,
                trigger_word=request.trigger_word,
                iterations=request.iterations,
                learning_rate=request.learning_rate,
                captioning=request.captioning,
                priority=request.priority,
                finetune_type=request.finetune_type,
                lora_rank=request.lora_rank,
                on_upload_progress=on_upload,
            )

    def status(self, remote_id: str) -> TrainStatus:
        with self._client() as client:
            result = client.tasks.get(remote_id)
        return _train_status(result)

    def list_remote(self) -> list[str]:
        with self._client() as client:
            return client.finetunes.list_ids()

    def find_by_tag(self, tag: str) -> str | None:
        marker = f"[{job_tag(tag)}]"
        with self._client() as client:
            ids = client.finetunes.list_ids()
            for finetune_id in reversed(ids[-RECONCILE_SCAN:]):  # newest are last in practice
                try:
                    details = client.finetunes.details(finetune_id)
                except TaskNotFoundError:
                    continue
                if details.comment and marker in details.comment:
                    return finetune_id
        return None

    def cancel(self, remote_id: str) -> None:
        # The contract has no cancel: deleting the fine-tune is the only way to stop it.
        self.delete(remote_id)

    def delete(self, remote_id: str) -> None:
        with self._client() as client:
            client.finetunes.delete(remote_id)

    def tuned_models(self) -> list[str]:
        return list(BASE_FOR)  # flux-pro-1.1-ultra-finetuned, flux-pro-finetuned

    def compare_models(self, tuned_model: str | None) -> tuple[str, str]:
        """(base, tuned) model names for a side-by-side comparison."""
        tuned = tuned_model or DEFAULT_TUNED_MODEL
        if tuned not in BASE_FOR:
            raise InputError(f"'{tuned}' is not a CometAPI fine-tune model.", hint=f"Use one of: {', '.join(BASE_FOR)}.")
        return BASE_FOR[tuned], tuned

    def generate(self, request: GenerateRequest, out_dir: Path, *, finetune: str | None = None,
                 model: str | None = None) -> GeneratedImage:
        used = model or (DEFAULT_TUNED_MODEL if finetune else BASE_FOR[DEFAULT_TUNED_MODEL])
        params = generation_params(used, request)
        started = time.monotonic()
        with self._client() as client:
            if finetune:
                task_id = client.images.generate_finetuned(used, finetune, request.strength, **params)
            else:
                task_id = client.images.generate(used, **params)
            result = client.tasks.wait(task_id)
            ext = "png" if request.output_format == "png" else "jpg"
            out_dir.mkdir(parents=True, exist_ok=True)
            path = client.images.download_to(result.sample_url, out_dir / f"{task_id}.{ext}")
        seed = result.seed if result.seed is not None else request.seed
        return GeneratedImage(path=Path(path), model=used, seed=seed, latency_s=time.monotonic() - started,
                              params={**params, **({"finetune_id": finetune, "finetune_strength": request.strength} if finetune else {})})


def generation_params(model: str, request: GenerateRequest) -> dict:
    """The body fields a model takes: ultra models take an aspect ratio, others a size."""
    params: dict = {
        "prompt": request.prompt,
        "seed": request.seed,
        "safety_tolerance": request.safety_tolerance,
        "output_format": request.output_format,
    }
    if "ultra" in model:
        params["aspect_ratio"] = request.aspect_ratio
    else:
        params["width"], params["height"] = request.width, request.height
        if request.steps is not None:
            params["steps"] = request.steps
        if request.guidance is not None:
            params["guidance"] = request.guidance
    return params


def _train_status(result: TaskResult) -> TrainStatus:
    if result.status == TaskStatus.READY:
        return TrainStatus("ready", progress=1.0, message="Ready: use it on the Compare tab.",
                           result={"finetune_id": result.id})
    if result.status == TaskStatus.PENDING:
        fraction = result.progress_fraction
        state = "running" if fraction else "pending"
        return TrainStatus(state, progress=fraction, message="Training…" if fraction else "Queued at CometAPI.")
    if result.status == TaskStatus.NOT_FOUND:
        raise TaskNotFoundError(f"CometAPI does not know the fine-tune {result.id}.")
    if result.status in (TaskStatus.REQUEST_MODERATED, TaskStatus.CONTENT_MODERATED):
        return TrainStatus("failed", message=f"CometAPI's safety filter stopped this fine-tune ({result.status}). "
                                             "Check the dataset for images or captions it may refuse.")
    if result.status == TaskStatus.ERROR:
        return TrainStatus("failed", message=f"CometAPI reported an error: {result.message or 'no details given'}.")
    return TrainStatus("pending", message=f"CometAPI says '{result.status}'.")



OWN_KEY = Credentials(
    kind="own_key", name="CometAPI key", give_again="Enter your key again at the top of the page",
    waiting=("Waiting for your CometAPI key: this job was launched with it, and the app no longer holds it (keys are "
             "kept in memory only). Enter it again at the top of the page to go on tracking it."),
    own_banner="✅ {label}: using your own key for this session.",
    hosted_missing=("Enter your CometAPI key at the top of the page (kept for this session only), or use the local "
                    "engine."),
    shared_budget=True,
    foreign_id=("No CometAPI key of your own is set, and a fine-tune id that is not one of yours works only with your "
                "own key."),
    foreign_id_hint="Enter your key at the top of the page, or pick one of your ready fine-tunes.",
)

INFO = ProviderInfo(
    key=CometAPIProvider.key, label=CometAPIProvider.label,
    make=CometAPIProvider.from_settings,
    credentials=OWN_KEY,
    with_credentials=lambda settings, key: CometAPIProvider.from_settings(settings, key=key),
    owns_finetune_id=None,  # its ids have no shape of their own: it takes those no other provider claims
    may_be_default=lambda settings: bool(settings.cometapi_key),  # the default with the owner's key
)
