"""Every generated image, saved locally and recorded with the parameters that made it.

Provider URLs expire within minutes, so generation code saves the file at once; this store
keeps the record. Each owner has ``<owner dir>/results/`` holding the images (one folder per
compare or grid run) and ``index.jsonl``, one JSON record per line. Append-only JSON lines
survive a crash mid-write (a torn last line is skipped on read) and need no schema.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.config import Settings
from services.owners import owner_dir

log = logging.getLogger(__name__)

INDEX = "index.jsonl"
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

    def __init__(self, settings: Settings, clock=time.time) -> None:
        self.settings = settings
        self._clock = clock
        self._lock = threading.Lock()

    def out_dir(self, owner: str) -> Path:
        path = owner_dir(self.settings, owner) / "results"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def new_group(self) -> str:
        return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]

    def add(self, owner: str, **fields) -> ResultRecord:
        """Record one result; ``file`` may be an absolute path inside the owner's folder."""
        base = self.out_dir(owner)
        file = fields.pop("file", "") or ""
        if file:
            file = str(Path(file).resolve().relative_to(base.resolve()))
        record = ResultRecord(id=uuid.uuid4().hex, created_at=self._clock(), file=file, **fields)
        line = json.dumps(asdict(record), ensure_ascii=False)
        with self._lock, open(base / INDEX, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
        return record

    def list(self, owner: str, limit: int = 100) -> list[ResultRecord]:
        """Newest first."""
        path = self.out_dir(owner) / INDEX
        if not path.exists():
            return []
        records = []
        with self._lock:
            lines = path.read_text(encoding="utf-8").splitlines()
        for line in lines:
            try:
                records.append(ResultRecord.from_json(json.loads(line)))
            except (ValueError, TypeError):
                log.warning("Skipping an unreadable line in %s", path)  # a torn write; the rest is fine
        records.sort(key=lambda r: r.created_at, reverse=True)
        return records[:limit]

    def path_for(self, owner: str, record: ResultRecord) -> Path | None:
        if not record.file:
            return None
        base = self.out_dir(owner).resolve()
        path = (base / record.file).resolve()
        if not path.is_relative_to(base):  # a hand-edited index must not reach outside
            return None
        return path
