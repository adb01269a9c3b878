"""The local engine's jobs on disk: one folder a job, found from its id alone.

A job lives in ``<data_dir>/local_jobs/<remote_id>/`` (hosted, a visitor's in their own folder:
``<data_dir>/owners/<token>/local_jobs/<remote_id>/``, the token being part of the id)::

    dataset.zip        the training zip, copied at submission
    config.json        the training configuration (engine.train.TrainConfig's fields)
    state.json         state, step, loss, samples, ... (written atomically: services.storage.atomic)
    losses.csv         the loss curve, ``step,loss`` a line, appended as the run goes
    samples/           sample images every N steps (fixed seed, so they show the LoRA learning)
    checkpoints/       the latest checkpoint: LoRA + optimizer + step + RNG
    output/            pytorch_lora_weights.safetensors, README.md (model card), samples/

Nothing here imports torch.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from services.config import Settings
from services.errors import ProviderError, StudioError, TaskNotFoundError
from services.providers.base import ProgressFn
from services.engine.train import LORA_FILE, latest_checkpoint
from services.storage import atomic
from services.providers.local.ids import OwnedIds

LOSSES_FILE = "losses.csv"
# A job's id names its folder (ids.OwnedIds): <data_dir>/owners/<token>/local_jobs/<id> for a visitor's.
JOB_IDS = OwnedIds("local", "local_jobs")

LossPoints = Iterable[tuple[int, float]]


def read_losses(job: Path) -> tuple[tuple[int, float], ...]:
    """A job's loss curve from losses.csv: one value per step (the latest), in step order.

    A torn last line (a crash mid-write) is skipped."""
    by_step: dict[int, float] = {}
    try:
        text = (Path(job) / LOSSES_FILE).read_text(encoding="utf-8")
    except OSError:
        return ()
    for line in text.splitlines():
        step, _, value = line.partition(",")
        try:
            by_step[int(step)] = float(value)
        except ValueError:
            continue
    return tuple(sorted(by_step.items()))


def _loss_lines(points: LossPoints) -> list[str]:
    """losses.csv lines: ``step,loss`` with the float's repr, so reading it back gives the same value."""
    return [f"{st},{v!r}\n" for st, v in points]


def _write_json(path: Path, data: dict) -> None:
    atomic.write_json(path, data, indent=1, default=str)


_LOCKS: dict[str, threading.RLock] = {}
_LOCKS_LOCK = threading.Lock()


def _lock_for(root: Path) -> threading.RLock:
    with _LOCKS_LOCK:
        return _LOCKS.setdefault(str(root.resolve()), threading.RLock())


class JobFolders:
    """The folders of the local jobs on one data dir: ids, paths, and each job's files.

    ``lock``, one per data dir in this process, guards every read-modify-write of a state.json; the
    worker takes it for its runs too, so that a job's run and its state are read together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = Path(settings.data_dir) / "local_jobs"
        self.lock = _lock_for(self.root)

    # ------------------------------------------------------------ ids and paths

    def new_id(self, tag: str, owner: str | None) -> str:
        """A new job's id: ``local-<tag>``, or ``local-o<owner folder>-<tag>`` for a hosted visitor's."""
        return JOB_IDS.new(self.settings, owner, tag)

    def folder(self, remote_id: str) -> Path:
        """Where a job's folder is (or goes): the local owner's jobs folder, or a visitor's own."""
        return JOB_IDS.folder(self.settings, self.root, remote_id)

    def existing(self, remote_id: str) -> Path:
        """The folder of a job that exists (TaskNotFoundError otherwise)."""
        if not remote_id or not JOB_IDS.matches(remote_id):
            raise TaskNotFoundError(f"{remote_id!r} is not a local job id.")
        job = self.folder(remote_id)
        if not (job / "state.json").is_file():
            raise TaskNotFoundError(f"The local engine has no job {remote_id} (deleted?).")
        return job

    def lora_path(self, remote_id: str) -> Path:
        return self.folder(remote_id) / "output" / LORA_FILE

    def ids(self) -> list[str]:
        """Every job on this data dir, every owner's, oldest first."""
        roots = [self.root, *Path(self.settings.data_dir).glob("owners/*/local_jobs")]
        jobs = []
        for d in (d for root in roots if root.is_dir() for d in root.iterdir()):
            if d.is_dir() and JOB_IDS.matches(d.name) and self.folder(d.name) == d and (d / "state.json").is_file():
                try:
                    created = float(json.loads((d / "state.json").read_text()).get("created_at") or 0)
                except (OSError, ValueError):
                    created = 0.0
                jobs.append((created, d.name))
        return [name for _, name in sorted(jobs)]

    def find_by_tag(self, tag: str) -> str | None:
        if not tag:
            return None
        for remote_id in self.ids():
            try:
                if self.read_state(remote_id).get("tag") == tag:
                    return remote_id
            except StudioError:
                continue
        return None

    # ------------------------------------------------------------ a job's files

    def create(self, remote_id: str, zip_path: Path, config: dict, state: dict,
               on_upload: ProgressFn | None = None) -> None:
        """Write a new job's folder whole (in a temp folder renamed into place): the zip, its
        configuration and its first state."""
        job = self.folder(remote_id)
        tmp = job.with_name(f".{remote_id}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        total = zip_path.stat().st_size
        with open(zip_path, "rb") as src, open(tmp / "dataset.zip", "wb") as dst:
            done = 0
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                done += len(chunk)
                if on_upload:
                    on_upload(done, total)
        _write_json(tmp / "config.json", config)
        now = time.time()
        _write_json(tmp / "state.json", {"remote_id": remote_id, **state, "created_at": now, "updated_at": now})
        os.replace(tmp, job)

    def read_state(self, remote_id: str) -> dict:
        job = self.existing(remote_id)
        try:
            return json.loads((job / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ProviderError(f"The state of local job {remote_id} can't be read ({exc}).") from None

    def update_state(self, remote_id: str, **changes) -> None:
        with self.lock:
            job = self.folder(remote_id)
            if not (job / "state.json").is_file():
                return  # deleted meanwhile
            state = json.loads((job / "state.json").read_text(encoding="utf-8"))
            state.update(changes, updated_at=time.time())
            _write_json(job / "state.json", state)

    def read_config(self, remote_id: str) -> dict:
        return json.loads((self.folder(remote_id) / "config.json").read_text(encoding="utf-8"))

    def checkpoint(self, remote_id: str) -> Path | None:
        """The job's newest complete checkpoint, if it has one."""
        return latest_checkpoint(self.folder(remote_id) / "checkpoints")

    def samples(self, remote_id: str) -> list[str]:
        """The sample images on disk, as state.json names them (``samples/step_*.png``), oldest first."""
        return [f"samples/{p.name}" for p in sorted((self.folder(remote_id) / "samples").glob("step_*.png"))]

    def losses(self, remote_id: str) -> tuple[tuple[int, float], ...]:
        return read_losses(self.folder(remote_id))

    def append_losses(self, remote_id: str, points: LossPoints) -> None:
        """Add points to the job's losses.csv (nothing once its folder is gone); OSError when it can't."""
        job = self.folder(remote_id)
        if job.is_dir():
            with open(job / LOSSES_FILE, "a", encoding="utf-8") as f:
                f.writelines(_loss_lines(points))

    def keep_losses_until(self, remote_id: str, step: int) -> list[tuple[int, float]]:
        """Drop the points after ``step`` (trained after the checkpoint a resume goes on from); the rest."""
        kept = [(st, v) for st, v in self.losses(remote_id) if st <= step]
        atomic.write_text(self.folder(remote_id) / LOSSES_FILE, "".join(_loss_lines(kept)))
        return kept

    def remove(self, remote_id: str) -> None:
        try:
            shutil.rmtree(self.folder(remote_id))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ProviderError(f"Could not remove the folder of local job {remote_id}: {exc.strerror}.",
                                hint="Check the data folder's permissions, then delete it again.") from None

