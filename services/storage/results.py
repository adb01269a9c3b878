"""Every generated image, saved locally and recorded with the parameters that made it.

Provider URLs expire within minutes, so generation code saves the file at once; this store
keeps the record. Each owner has ``<owner dir>/results/`` holding the images (one folder per
compare or grid run); the records live in the app's database (``results`` table, indexed by
owner and time), so a history refresh reads the newest few rows instead of a whole file
(benchmarks/results_history.py). An ``index.jsonl`` left by an earlier version is imported on
first use and renamed ``index.jsonl.imported``; a torn last line in it is skipped.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.config import Settings
from services.storage.jobs import JobStore
from services.storage.owners import owner_dir

log = logging.getLogger(__name__)

INDEX = "index.jsonl"  # the file earlier versions kept records in
RESULT_STATUSES = ("ok", "moderated", "error")


@dataclass(frozen=True)
class ResultRecord:
    id: str
    group_id: str  # one compare pair or grid run
    created_at: float
    provider: str
    model: str
    seed: int
    prompt: str
    status: str = "ok"  # "ok" | "moderated" | "error"
    finetune_id: str | None = None  # None for a base-model image
    strength: float | None = None
    file: str = ""  # relative to the owner's results folder; empty when nothing was made
    latency_s: float = 0.0
    error: str = ""
    params: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict) -> "ResultRecord":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class ResultStore:
    """Owner-scoped records of generated images."""

    def __init__(self, settings: Settings, clock=time.time, jobs: JobStore | None = None) -> None:
        self.settings = settings
        self.jobs = jobs or JobStore.from_settings(settings)
        self._clock = clock
        self._lock = threading.Lock()

    def _dir(self, owner: str) -> Path:
        return owner_dir(self.settings, owner) / "results"

    def out_dir(self, owner: str) -> Path:
        """Where ``owner``'s images are written, made for a write only: reading makes no folder (every
        cookie-less call is an owner of its own, and each once left an empty folder behind)."""
        path = self._dir(owner)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def contact_sheet_path(self, owner: str, group_id: str) -> Path:
        """Where a grid's contact sheet is saved: beside the owner's images, named by the grid's group."""
        return self.out_dir(owner) / f"contact-sheet-{group_id}.png"

    def new_group(self) -> str:
        return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]

    def add(self, owner: str, **fields) -> ResultRecord:
        """Record one result; ``file`` may be an absolute path inside the owner's folder."""
        base = self.out_dir(owner)
        file = fields.pop("file", "") or ""
        if file:
            file = str(Path(file).resolve().relative_to(base.resolve()))
        record = ResultRecord(id=uuid.uuid4().hex, created_at=self._clock(), file=file, **fields)
        self.jobs.add_results(owner, [(record.id, record.created_at, json.dumps(asdict(record), ensure_ascii=False))])
        return record

    def list(self, owner: str, limit: int = 100) -> list[ResultRecord]:
        """Newest first."""
        self._import_legacy(owner)
        records = []
        for raw in self.jobs.list_results(owner, limit):
            try:
                records.append(ResultRecord.from_json(json.loads(raw)))
            except (ValueError, TypeError):
                log.warning("Skipping an unreadable result record of %s", owner)
        return records

    def _import_legacy(self, owner: str) -> None:
        path = self._dir(owner) / INDEX
        if not path.exists():
            return
        with self._lock:
            if not path.exists():  # another thread imported it meanwhile
                return
            rows = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = ResultRecord.from_json(json.loads(line))
                except (ValueError, TypeError):
                    log.warning("Skipping an unreadable line in %s", path)  # a torn write; the rest is fine
                    continue
                rows.append((record.id, record.created_at, json.dumps(asdict(record), ensure_ascii=False)))
            self.jobs.add_results(owner, rows)  # idempotent: a crash before the rename imports nothing twice
            os.replace(path, path.with_name(INDEX + ".imported"))

    def path_for(self, owner: str, record: ResultRecord) -> Path | None:
        if not record.file:
            return None
        base = self._dir(owner).resolve()
        path = (base / record.file).resolve()
        if not path.is_relative_to(base):  # a hand-edited record must not reach outside
            return None
        return path
