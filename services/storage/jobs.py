"""The job store: every fine-tune (and later, generation) job the app knows about.

Jobs live in the app's database (services.storage.database), so they survive restarts: at start
the app calls ``active_jobs()`` and resumes tracking whatever was still running.

Design notes (the *why*):

* Every query that reads or changes a job takes ``owner`` and puts it in the WHERE clause.
  One person must never see or change another's job, even with a guessed job id.
* ``params`` / ``result`` are JSON and must never hold an API key; see
  services.storage.secrets_guard.

Nothing here imports gradio.
"""
from __future__ import annotations

import builtins
import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.config import Settings
from services.errors import JobError
from services.storage.database import Database, database_path
from services.storage.secrets_guard import reject_secrets

__all__ = [
    "ACTIVE_STATUSES",
    "JOB_KINDS",
    "STATUSES",
    "TERMINAL_STATUSES",
    "Job",
    "JobStore",
]

# --------------------------------------------------------------------------- statuses

STATUSES: frozenset[str] = frozenset(
    {"submitting", "pending", "running", "ready", "failed", "cancelled", "deleted", "interrupted"}
)
# Still moving: a poller should keep watching these.
ACTIVE_STATUSES: frozenset[str] = frozenset({"submitting", "pending", "running"})
# Done, one way or another. "interrupted" = the app stopped while a job it ran itself (local
# engine) was running and it cannot be resumed; it is final for that run.
TERMINAL_STATUSES: frozenset[str] = STATUSES - ACTIVE_STATUSES
JOB_KINDS: frozenset[str] = frozenset({"finetune", "generate"})

_MAX_LIST_LIMIT = 10_000

_JSON_COLUMNS: frozenset[str] = frozenset({"params", "result"})

# --------------------------------------------------------------------------- the record


@dataclass
class Job:
    id: str
    owner: str
    provider: str
    kind: str
    name: str
    dataset_name: str
    dataset_hash: str
    params: dict[str, Any] = field(default_factory=dict)
    status: str = "submitting"
    remote_id: str | None = None
    progress: float | None = None
    eta_s: float | None = None
    message: str = ""
    error: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def elapsed_at(self, now: float) -> float:
        """Seconds from start (or creation, if it never started) to finish (or ``now``)."""
        start = self.started_at if self.started_at is not None else self.created_at
        end = self.finished_at if self.finished_at is not None else now
        return max(0.0, end - start)

    @property
    def elapsed_s(self) -> float:
        return self.elapsed_at(time.time())


# --------------------------------------------------------------------------- columns


def _to_json(value: Any, column: str) -> str:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise JobError(f"Job {column} must be a dict, got {type(value).__name__}.")
    reject_secrets(value, column)
    try:
        # allow_nan=False: NaN/Infinity are not JSON and would break other readers of the file.
        return json.dumps(dict(value), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise JobError(f"Job {column} cannot be saved as JSON: {exc}") from None


# --------------------------------------------------------------------------- columns


_COLUMNS: tuple[str, ...] = (
    "id",
    "owner",
    "provider",
    "remote_id",
    "kind",
    "name",
    "dataset_name",
    "dataset_hash",
    "params",
    "status",
    "progress",
    "eta_s",
    "message",
    "error",
    "result",
    "created_at",
    "updated_at",
    "started_at",
    "finished_at",
)
# Columns update() may change: id, owner and created_at are fixed for life; updated_at is ours.
_UPDATABLE: frozenset[str] = frozenset(_COLUMNS) - {"id", "owner", "created_at", "updated_at"}
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM jobs"


def _row_to_job(row: sqlite3.Row) -> Job:
    data = {name: row[name] for name in _COLUMNS}
    data["params"] = json.loads(data["params"] or "{}")
    data["result"] = json.loads(data["result"] or "{}")
    return Job(**data)


# --------------------------------------------------------------------------- validation


def _check_owner(owner: str) -> str:
    # An empty owner would silently pool every anonymous job together; make callers choose.
    if not isinstance(owner, str) or not owner.strip():
        raise JobError("A job owner is required.", hint="Pass the signed-in user name (or 'local').")
    return owner


def _check_status(status: Any) -> str:
    if status not in STATUSES:
        raise JobError(f"Unknown job status {status!r}.", hint=f"Use one of: {', '.join(sorted(STATUSES))}.")
    return status


def _check_kind(kind: Any) -> str:
    if kind not in JOB_KINDS:
        raise JobError(f"Unknown job kind {kind!r}.", hint=f"Use one of: {', '.join(sorted(JOB_KINDS))}.")
    return kind


def _check_optional_number(name: str, value: Any, *, lo: float | None = None, hi: float | None = None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise JobError(f"Job {name} must be a number or None, got {value!r}.")
    value = float(value)
    if value != value or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise JobError(f"Job {name} must be between {lo} and {hi}, got {value!r}.")
    return value


def _clean_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Validate update() fields and turn them into column values."""
    unknown = set(fields) - _UPDATABLE
    if unknown:
        raise JobError(f"Cannot update job field(s): {', '.join(sorted(unknown))}.")
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if name in _JSON_COLUMNS:
            out[name] = _to_json(value, name)
        elif name == "status":
            out[name] = _check_status(value)
        elif name == "kind":
            out[name] = _check_kind(value)
        elif name == "progress":
            out[name] = _check_optional_number(name, value, lo=0.0, hi=1.0)
        elif name == "eta_s":
            out[name] = _check_optional_number(name, value, lo=0.0)
        elif name in {"started_at", "finished_at"}:
            out[name] = _check_optional_number(name, value)
        elif name == "remote_id":
            out[name] = None if value is None else str(value)
        else:  # plain text columns
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise JobError(f"Job {name} must be text, got {type(value).__name__}.")
            out[name] = value
    return out


# --------------------------------------------------------------------------- the store


class JobStore:
    """Owner-scoped, thread-safe persistent store of jobs and their events."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.db = Database(path)
        self.path = self.db.path
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Callable[[], float] = time.time) -> JobStore:
        """The app's database. With ``db_dir`` set (a Space), it lives on local disk; a fresh disk
        starts from the last copy in the data dir (see ``DatabaseBackup``)."""
        return cls(database_path(settings), clock=clock)

    def backup_to(self, target: Path) -> None:
        """A consistent copy of the whole database at ``target`` (see ``Database.backup_to``)."""
        self.db.backup_to(target)

    def close(self) -> None:
        """Close every thread's connection. The store cannot be used afterwards."""
        self.db.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def journal_mode(self) -> str:
        return self.db.journal_mode()

    # ------------------------------------------------------------------ jobs

    def create(
        self,
        owner: str,
        provider: str,
        kind: str,
        name: str,
        dataset_name: str,
        dataset_hash: str,
        params: Mapping[str, Any] | None = None,
    ) -> Job:
        """Record a new job in status "submitting" (before the provider is called)."""
        _check_owner(owner)
        _check_kind(kind)
        if not isinstance(provider, str) or not provider.strip():
            raise JobError("A job needs a provider name.")
        params_json = _to_json(params or {}, "params")
        now = self._clock()
        job = Job(
            id=uuid.uuid4().hex,
            owner=owner,
            provider=provider,
            kind=kind,
            name=name or "",
            dataset_name=dataset_name or "",
            dataset_hash=dataset_hash or "",
            params=json.loads(params_json),
            status="submitting",
            created_at=now,
            updated_at=now,
        )
        values = {c: getattr(job, c) for c in _COLUMNS}
        values["params"] = params_json
        values["result"] = "{}"
        with self.db.write() as conn:
            conn.execute(
                f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join(':' + c for c in _COLUMNS)})",
                values,
            )
        return job

    def _get(self, conn: sqlite3.Connection, owner: str, job_id: str) -> Job:
        row = conn.execute(f"{_SELECT} WHERE owner = ? AND id = ?", (owner, job_id)).fetchone()
        if row is None:
            # Same message whether the job is missing or someone else's: no probing for ids.
            raise JobError(f"Job {job_id!r} was not found.", hint="It may have been removed; refresh the job list.")
        return _row_to_job(row)

    def get(self, owner: str, job_id: str) -> Job:
        _check_owner(owner)
        return self._get(self.db.connection(), owner, job_id)

    def list(self, owner: str, *, include_deleted: bool = False, limit: int = 200) -> builtins.list[Job]:
        """The owner's jobs, newest first."""
        _check_owner(owner)
        limit = max(1, min(int(limit), _MAX_LIST_LIMIT))
        sql = f"{_SELECT} WHERE owner = ?"
        args: builtins.list[Any] = [owner]
        if not include_deleted:
            sql += " AND status != 'deleted'"
        # rowid breaks ties between jobs created in the same clock tick, newest first.
        sql += " ORDER BY created_at DESC, rowid DESC LIMIT ?"
        args.append(limit)
        return [_row_to_job(r) for r in self.db.connection().execute(sql, args)]

    def update(self, owner: str, job_id: str, **fields: Any) -> Job:
        """Change some columns of one job atomically and return the job as now stored.

        Bumps updated_at; sets started_at the first time status becomes "running" and
        finished_at the first time it becomes terminal (unless given explicitly); clears
        finished_at if a job goes back to an active status (a retry).
        """
        _check_owner(owner)
        values = _clean_fields(fields)
        with self.db.write() as conn:
            return self._update_in(conn, owner, job_id, values)

    def _update_in(self, conn: sqlite3.Connection, owner: str, job_id: str, values: dict[str, Any]) -> Job:
        """The body of ``update``, inside a write transaction the caller holds."""
        now = self._clock()
        current = self._get(conn, owner, job_id)
        status = values.get("status")
        if status is not None:
            if status == "running" and current.started_at is None and "started_at" not in values:
                values["started_at"] = now
            if status in TERMINAL_STATUSES and "finished_at" not in values:
                if current.finished_at is None:
                    values["finished_at"] = now
            elif status in ACTIVE_STATUSES and "finished_at" not in values:
                values["finished_at"] = None
        values["updated_at"] = now
        assignments = ", ".join(f"{c} = :{c}" for c in values)  # column names come from _UPDATABLE only
        conn.execute(
            f"UPDATE jobs SET {assignments} WHERE owner = :__owner AND id = :__id",
            {**values, "__owner": owner, "__id": job_id},
        )
        return self._get(conn, owner, job_id)

    def transition(self, owner: str, job_id: str, only_from: Iterable[str], **fields: Any) -> Job | None:
        """``update``, but only while the job's status is one of ``only_from`` (compare-and-set, in
        one transaction); None, writing nothing, when it has moved on.

        Why: a tracker poll reads a job, asks the provider, then writes. If the user cancelled or
        deleted the job in between, a plain update would bring it back with a stale status."""
        allowed = frozenset(only_from)
        _check_owner(owner)
        values = _clean_fields(fields)
        with self.db.write() as conn:
            if self._get(conn, owner, job_id).status not in allowed:
                return None
            return self._update_in(conn, owner, job_id, values)

    def set_remote_id(self, owner: str, job_id: str, remote_id: str) -> Job:
        if not remote_id:
            raise JobError("A remote id cannot be empty.")
        return self.update(owner, job_id, remote_id=str(remote_id))

    def mark_deleted(self, owner: str, job_id: str) -> Job:
        """Hide a job from the default list. The row (and its events) stay for the record."""
        return self.update(owner, job_id, status="deleted")

    def active_jobs(self, owner: str | None = None) -> builtins.list[Job]:
        """Jobs still moving, oldest first. ``owner=None`` means every owner: only for the
        app's own start-up resume, never for a user-facing view."""
        placeholders = ", ".join("?" for _ in ACTIVE_STATUSES)
        sql = f"{_SELECT} WHERE status IN ({placeholders})"
        args: builtins.list[Any] = sorted(ACTIVE_STATUSES)
        if owner is not None:
            _check_owner(owner)
            sql += " AND owner = ?"
            args.append(owner)
        sql += " ORDER BY created_at ASC, rowid ASC"
        return [_row_to_job(r) for r in self.db.connection().execute(sql, args)]

    def find_by_remote(self, owner: str, provider: str, remote_id: str) -> Job | None:
        _check_owner(owner)
        row = self.db.connection().execute(
            f"{_SELECT} WHERE owner = ? AND provider = ? AND remote_id = ? ORDER BY created_at DESC, rowid DESC LIMIT 1",
            (owner, provider, remote_id),
        ).fetchone()
        return None if row is None else _row_to_job(row)

    # ------------------------------------------------------------------ results

    def add_results(self, owner: str, rows: Iterable[tuple[str, float, str]]) -> None:
        """Store ``(id, created_at, record JSON)`` rows; a row whose id is there already is kept as is."""
        _check_owner(owner)
        with self.db.write() as conn:
            conn.executemany("INSERT OR IGNORE INTO results (owner, id, created_at, record) VALUES (?, ?, ?, ?)",
                             [(owner, rid, created, record) for rid, created, record in rows])

    def list_results(self, owner: str, limit: int = 100) -> builtins.list[str]:
        """The owner's result records (JSON), newest first."""
        _check_owner(owner)
        rows = self.db.connection().execute(
            "SELECT record FROM results WHERE owner = ? ORDER BY created_at DESC, rowid DESC LIMIT ?",
            (owner, max(0, min(int(limit), _MAX_LIST_LIMIT))))
        return [r[0] for r in rows]

    # ------------------------------------------------------------------ events

    def record_event(self, owner: str, job_id: str, kind: str, data: Mapping[str, Any] | None = None) -> None:
        """Append one event (a loss value, a sample image path, a log line) to a job."""
        self.record_events(owner, job_id, kind, [data or {}])

    def record_events(self, owner: str, job_id: str, kind: str, items: Iterable[Mapping[str, Any]]) -> None:
        """Append many events of one kind in one transaction (a stretch of a loss curve)."""
        _check_owner(owner)
        if not isinstance(kind, str) or not kind.strip():
            raise JobError("An event needs a kind.")
        rows = [_to_json(data or {}, "event data") for data in items]
        with self.db.write() as conn:
            self._get(conn, owner, job_id)
            now = self._clock()
            conn.executemany(
                "INSERT INTO job_events (job_id, owner, ts, kind, data) VALUES (?, ?, ?, ?, ?)",
                [(job_id, owner, now, kind, data_json) for data_json in rows],
            )

    def events(self, owner: str, job_id: str, kind: str | None = None) -> builtins.list[dict[str, Any]]:
        """A job's events in the order recorded: ``[{"ts", "kind", "data"}, ...]``."""
        _check_owner(owner)
        conn = self.db.connection()
        self._get(conn, owner, job_id)
        sql = "SELECT ts, kind, data FROM job_events WHERE owner = ? AND job_id = ?"
        args: builtins.list[Any] = [owner, job_id]
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        sql += " ORDER BY seq ASC"
        return [{"ts": r["ts"], "kind": r["kind"], "data": json.loads(r["data"])} for r in conn.execute(sql, args)]

