"""A fine-tune on Hugging Face Jobs: its names, labels, and what a job's stage and log lines say.

One fine-tune is one *remote id*, ``hf-job:<namespace>/<tag>`` (``tag`` = ``job_tag(job id)``), stable
across resumes: every HF job started for it (the first, and one per resume) carries the label
``flux-studio-tag=<tag>``, and the newest of them is the one that counts. Its result is a private model
repo, ``<namespace>/flux-lora-<slug of the name>-<tag>``: that repo id is the fine-tune id Compare uses.
Its inputs (dataset zip, config, code bundle) sit in the private dataset repo
``<namespace>/flux-studio-data`` under ``jobs/<tag>/``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from services.errors import TaskNotFoundError
from services.providers.base import TrainStatus
from services.engine.events import RunLog
from services.engine.hub import HUB_URL

TAG_LABEL = "flux-studio-tag"
REPO_LABEL = "flux-studio-repo"  # the model repo's name (no namespace: label values stay [a-z0-9-])
ATTEMPT_LABEL = "flux-studio-attempt"  # 2, 3, ... on the jobs a resume starts
DATA_REPO = "flux-studio-data"
REMOTE_PREFIX = "hf-job:"
MODEL_PREFIX = "flux-lora-"
SLUG_MAX = 40
SAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
TAIL_LINES = 4  # log lines shown when a job fails without saying why
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class Names:
    """Every name one fine-tune has on the Hub."""

    namespace: str
    tag: str  # job_tag(our job id)
    repo_name: str  # the model repo's name

    @property
    def remote_id(self) -> str:
        return f"{REMOTE_PREFIX}{self.namespace}/{self.tag}"

    @property
    def model_repo(self) -> str:
        return f"{self.namespace}/{self.repo_name}"

    @property
    def data_repo(self) -> str:
        return f"{self.namespace}/{DATA_REPO}"

    @property
    def prefix(self) -> str:
        return f"jobs/{self.tag}"

    def labels(self, attempt: int = 1) -> dict[str, str]:
        labels = {TAG_LABEL: self.tag, REPO_LABEL: self.repo_name}
        return {**labels, ATTEMPT_LABEL: str(attempt)} if attempt > 1 else labels


def slug(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s[:SLUG_MAX].rstrip("-")


def model_repo_name(name: str, tag: str) -> str:
    return f"{MODEL_PREFIX}{slug(name) + '-' if slug(name) else ''}{tag}"


def parse_remote_id(remote_id: str) -> tuple[str, str]:
    """(namespace, tag) of a remote id; TaskNotFoundError for anything else."""
    rest = remote_id[len(REMOTE_PREFIX):] if remote_id.startswith(REMOTE_PREFIX) else ""
    namespace, _, tag = rest.partition("/")
    if not namespace or not tag or "/" in tag:
        raise TaskNotFoundError(f"{remote_id[:80]!r} is not a Hugging Face job of this app.")
    return namespace, tag


def is_finetune_id(ref: str) -> bool:
    """Whether a bare fine-tune id is a Hub model repo (``owner/name``): what this provider's fine-tunes are."""
    return bool(_REPO_ID_RE.match(ref or ""))


def repo_url(repo_id: str) -> str:
    return f"{HUB_URL}/{repo_id}"


def newest(jobs: list) -> object | None:
    """The newest of the jobs one fine-tune has had (a resume starts a new one)."""
    if not jobs:
        return None
    return max(jobs, key=lambda j: (j.created_at.timestamp() if j.created_at else 0.0,
                                    int((j.labels or {}).get(ATTEMPT_LABEL, "1") or 1)))


def stage_of(job) -> str:
    stage = job.status.stage
    return str(getattr(stage, "value", stage)).upper()


def sample_path_ok(path: str) -> bool:
    """A sample's path as a job printed it: relative, inside the repo, an image (never ``..``)."""
    p = PurePosixPath(path)
    return bool(path) and not p.is_absolute() and ".." not in p.parts and p.suffix.lower() in SAMPLE_SUFFIXES


def other_lines(lines: list[str], events_of) -> list[str]:
    """The log's lines that are not progress lines, stripped, non-empty."""
    return [ln.strip() for ln in lines if ln.strip() and events_of(ln) is None]


def train_status(job, log: RunLog, *, names: Names, samples: tuple[str, ...], tail: list[str]) -> TrainStatus:
    """What one HF job's stage and progress lines say, in the tabs' terms. ``samples`` are local paths,
    newest first; ``tail`` the last lines the job printed besides progress (for a failure's message)."""
    stage = stage_of(job)
    total = log.total
    progress = log.step / total if total else None
    common = {"step": log.step or None, "loss": log.loss, "samples": samples, "losses": log.loss_points}
    resumable = {"resumable": log.checkpoint_step is not None}
    if stage == "SCHEDULING":
        return TrainStatus("pending", progress=progress or 0.0, **common,
                           message=f"Waiting for a {job.flavor or 'GPU'} machine on Hugging Face Jobs.")
    if stage == "RUNNING":
        if log.done == "ready":
            message = "Finishing: uploading the LoRA and its model card."
        elif log.message or not log.step:
            message = log.message or f"Starting on {job.flavor or 'the machine'}: installing the trainer…"
        else:
            message = f"Training: step {log.step} of {total}"
        return TrainStatus("running", progress=progress, eta_s=log.eta_s, message=message, **common)
    if stage == "COMPLETED" and log.done == "ready":
        return TrainStatus("ready", progress=1.0, **common, message="Ready: use it on the Compare tab.",
                           result={"finetune_id": names.model_repo, "repo_url": repo_url(names.model_repo)})
    if stage == "CANCELED" or (stage == "COMPLETED" and log.done == "cancelled"):
        return TrainStatus("cancelled", progress=progress, **common, result=resumable,
                           message="Cancelled." + (f" Its checkpoint at step {log.checkpoint_step} is kept in "
                                                   f"{names.model_repo}; resume it any time."
                                                   if log.checkpoint_step is not None else ""))
    if stage in ("COMPLETED", "ERROR"):
        why = (job.status.message or "").strip() or log.error or " | ".join(tail[-TAIL_LINES:]) \
            or "it stopped without saying why"
        where = f" Its last checkpoint (step {log.checkpoint_step}) is kept: resume it from there." \
            if log.checkpoint_step is not None else ""
        return TrainStatus("failed", progress=progress, **common, result=resumable,
                           message=f"The Hugging Face job failed: {why[:400]}.{where}")
    raise TaskNotFoundError(f"Hugging Face has no job for {names.remote_id} any more ({stage.lower()}).")
