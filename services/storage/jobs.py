"""The job store: every fine-tune (and later, generation) job the app knows about.

Jobs live in one SQLite file, ``<data_dir>/jobs.sqlite3``, so they survive restarts: at start
the app calls ``active_jobs()`` and resumes tracking whatever was still running.

Design notes (the *why*):

* Every query that reads or changes a job takes ``owner`` and puts it in the WHERE clause.
  One person must never see or change another's job, even with a guessed job id.
* Gradio runs handlers on many threads. Each thread gets its own connection (sqlite3
  connections must not be shared without care), WAL lets readers run while one writer writes,
  and ``busy_timeout`` makes a writer wait for the lock instead of failing.
* Writes use ``BEGIN IMMEDIATE``: a read-then-write transaction that starts deferred can fail
  with SQLITE_BUSY at once (no waiting) when another thread committed in between.
* ``params`` / ``result`` are JSON and must never hold an API key; see ``_reject_secrets``.
* The schema is versioned with ``PRAGMA user_version``; add a function to ``_MIGRATIONS``
  to add a column later, never edit an old one.

Nothing here imports gradio.
"""
from __future__ import annotations

import builtins
import logging
import json
import re
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from services.storage import atomic
from services.config import THREAD_PREFIX, Secret, Settings
from services.errors import JobError


log = logging.getLogger("flux_studio.jobs")

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

DB_FILENAME = "jobs.sqlite3"
_BUSY_TIMEOUT_MS = 10_000
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


# --------------------------------------------------------------------------- secrets guard

# Key names that mean "a credential". Compared after lower-casing and turning "-"/" " into "_",
# so "X-API-Key" and "Authorization" are caught. Exact names, plus a few suffixes, because a
# plain substring test ("key" in name) would refuse harmless params such as "keyword".
_SECRET_NAMES: frozenset[str] = frozenset(
    {
        "api_key",
        "apikey",
        "key",
        "token",
        "access_token",
        "refresh_token",
        "auth_token",
        "bearer_token",
        "id_token",
        "hf_token",
        "authorization",
        "auth",
        "bearer",
        "password",
        "passwd",
        "secret",
        "client_secret",
        "private_key",
        "secret_key",
        "cookie",
    }
)
_SECRET_SUFFIXES: tuple[str, ...] = ("_api_key", "_apikey", "_secret", "_password", "_secret_key", "_private_key")
# Values that look like a bearer key (CometAPI / OpenAI style "sk-..."). A caption or prompt has
# spaces, so this does not fire on ordinary text.
_SECRET_VALUE = re.compile(r"^(?:Bearer\s+)?sk-[A-Za-z0-9_\-]{16,}$")


def _normalise_key(key: str) -> str:
    return re.sub(r"[\s\-.]+", "_", key.strip().lower())


def _is_secret_key(key: str) -> bool:
    norm = _normalise_key(key)
    return norm in _SECRET_NAMES or norm.endswith(_SECRET_SUFFIXES)


def _reject_secrets(value: Any, where: str, path: str = "") -> None:
    """Raise JobError if ``value`` (nested dicts/lists) holds anything that looks like a secret.

    Defence in depth: callers should never pass keys here, but a job row is shown in the UI and
    kept on disk, so a slip must fail loudly instead of persisting a credential.
    """
    if isinstance(value, Mapping):
        for k, v in value.items():
            here = f"{path}.{k}" if path else str(k)
            if _is_secret_key(str(k)):
                raise JobError(
                    f"Refusing to store {where} field {here!r}: it looks like a credential.",
                    hint="API keys are never saved with a job; pass them only to the provider client.",
                )
            _reject_secrets(v, where, here)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _reject_secrets(v, where, f"{path}[{i}]")
    elif isinstance(value, str) and _SECRET_VALUE.match(value.strip()):
        raise JobError(
            f"Refusing to store {where} field {path or '(value)'!r}: the value looks like an API key.",
            hint="API keys are never saved with a job.",
        )
    elif isinstance(value, Secret):
        raise JobError(f"Refusing to store {where} field {path!r}: it is a Secret.")


def _to_json(value: Any, column: str) -> str:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise JobError(f"Job {column} must be a dict, got {type(value).__name__}.")
    _reject_secrets(value, column)
    try:
        # allow_nan=False: NaN/Infinity are not JSON and would break other readers of the file.
        return json.dumps(dict(value), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise JobError(f"Job {column} cannot be saved as JSON: {exc}") from None


# --------------------------------------------------------------------------- schema


def _migrate_to_1(conn: sqlite3.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE jobs (
            id            TEXT PRIMARY KEY,
            owner         TEXT NOT NULL,
            provider      TEXT NOT NULL,
            remote_id     TEXT,
            kind          TEXT NOT NULL,
            name          TEXT NOT NULL DEFAULT '',
            dataset_name  TEXT NOT NULL DEFAULT '',
            dataset_hash  TEXT NOT NULL DEFAULT '',
            params        TEXT NOT NULL DEFAULT '{}',
            status        TEXT NOT NULL,
            progress      REAL,
            eta_s         REAL,
            message       TEXT NOT NULL DEFAULT '',
            error         TEXT NOT NULL DEFAULT '',
            result        TEXT NOT NULL DEFAULT '{}',
            created_at    REAL NOT NULL,
            updated_at    REAL NOT NULL,
            started_at    REAL,
            finished_at   REAL
        )
        """
    )
    conn.execute("CREATE INDEX jobs_owner_created ON jobs(owner, created_at DESC)")
    conn.execute("CREATE INDEX jobs_status ON jobs(status)")
    conn.execute("CREATE INDEX jobs_remote ON jobs(owner, provider, remote_id)")
    # owner is repeated on events so event queries are owner-scoped without a join.
    conn.execute(
        """
        CREATE TABLE job_events (
            seq     INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id  TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
            owner   TEXT NOT NULL,
            ts      REAL NOT NULL,
            kind    TEXT NOT NULL,
            data    TEXT NOT NULL DEFAULT '{}'
        )
        """
    )
    conn.execute("CREATE INDEX job_events_job ON job_events(owner, job_id, kind, seq)")


# Index i migrates user_version i -> i + 1. Append only.
def _migrate_to_2(conn: sqlite3.Connection) -> None:
    # Every generated image's record (services.storage.results), one row each, read newest first per owner.
    conn.execute(
        """
        CREATE TABLE results (
            owner       TEXT NOT NULL,
            id          TEXT NOT NULL,
            created_at  REAL NOT NULL,
            record      TEXT NOT NULL,
            PRIMARY KEY (owner, id)
        )
        """
    )
    conn.execute("CREATE INDEX results_owner_created ON results(owner, created_at DESC)")


_MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_migrate_to_1, _migrate_to_2]
SCHEMA_VERSION = len(_MIGRATIONS)

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
        self.path = Path(path)
        self._clock = clock
        self._local = threading.local()
        self._conns: builtins.list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._migrate(self._conn())

    @classmethod
    def from_settings(cls, settings: "Settings", *, clock: Callable[[], float] = time.time) -> "JobStore":
        """The app's database. With ``db_dir`` set (a Space), it lives on local disk; a fresh disk
        starts from the last copy in the data dir (see ``DatabaseBackup``)."""
        path = Path(settings.db_path)
        backup = settings.db_backup_path
        if backup is not None and not path.exists() and backup.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(backup, path)
        return cls(path, clock=clock)

    def backup_to(self, target: Path) -> None:
        """A consistent copy of the whole database at ``target``, written atomically (SQLite's
        online backup: safe while other threads write)."""
        with atomic.replacing(target) as tmp:
            dst = sqlite3.connect(str(tmp))
            try:
                self._conn().backup(dst)
            finally:
                dst.close()

    # ------------------------------------------------------------------ connections

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise JobError("The job store is closed.")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves (see _write).
            # check_same_thread=False only so close() may close every thread's connection from
            # one thread; in use, each connection is touched by its own thread alone.
            conn = sqlite3.connect(
                str(self.path),
                timeout=_BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL is safe in WAL mode (no corruption; at worst the last commit is lost on power cut).
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    class _Txn:
        """``with store._write() as conn:`` = one atomic BEGIN IMMEDIATE ... COMMIT."""

        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type, exc, tb) -> None:
            if exc_type is None:
                self.conn.execute("COMMIT")
            else:
                self.conn.execute("ROLLBACK")

    def _write(self) -> "JobStore._Txn":
        return JobStore._Txn(self._conn())

    def _migrate(self, conn: sqlite3.Connection) -> None:
        with JobStore._Txn(conn):
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JobError(
                    f"{self.path} was written by a newer version of the app (schema {version}, "
                    f"this one knows {SCHEMA_VERSION}).",
                    hint="Update the app, or point FLUX_STUDIO_DATA_DIR elsewhere.",
                )
            for step in range(version, SCHEMA_VERSION):
                _MIGRATIONS[step](conn)
                # PRAGMA takes no parameters; the value is our own int.
                conn.execute(f"PRAGMA user_version = {step + 1}")

    def close(self) -> None:
        """Close every thread's connection. The store cannot be used afterwards."""
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
        self._local = threading.local()

    def __enter__(self) -> "JobStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def journal_mode(self) -> str:
        return str(self._conn().execute("PRAGMA journal_mode").fetchone()[0]).lower()

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
        with self._write() as conn:
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
        return self._get(self._conn(), owner, job_id)

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
        return [_row_to_job(r) for r in self._conn().execute(sql, args)]

    def update(self, owner: str, job_id: str, **fields: Any) -> Job:
        """Change some columns of one job atomically and return the job as now stored.

        Bumps updated_at; sets started_at the first time status becomes "running" and
        finished_at the first time it becomes terminal (unless given explicitly); clears
        finished_at if a job goes back to an active status (a retry).
        """
        _check_owner(owner)
        values = _clean_fields(fields)
        with self._write() as conn:
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
        with self._write() as conn:
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
        return [_row_to_job(r) for r in self._conn().execute(sql, args)]

    def find_by_remote(self, owner: str, provider: str, remote_id: str) -> Job | None:
        _check_owner(owner)
        row = self._conn().execute(
            f"{_SELECT} WHERE owner = ? AND provider = ? AND remote_id = ? ORDER BY created_at DESC, rowid DESC LIMIT 1",
            (owner, provider, remote_id),
        ).fetchone()
        return None if row is None else _row_to_job(row)

    # ------------------------------------------------------------------ results

    def add_results(self, owner: str, rows: Iterable[tuple[str, float, str]]) -> None:
        """Store ``(id, created_at, record JSON)`` rows; a row whose id is there already is kept as is."""
        _check_owner(owner)
        with self._write() as conn:
            conn.executemany("INSERT OR IGNORE INTO results (owner, id, created_at, record) VALUES (?, ?, ?, ?)",
                             [(owner, rid, created, record) for rid, created, record in rows])

    def list_results(self, owner: str, limit: int = 100) -> builtins.list[str]:
        """The owner's result records (JSON), newest first."""
        _check_owner(owner)
        rows = self._conn().execute(
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
        with self._write() as conn:
            self._get(conn, owner, job_id)
            now = self._clock()
            conn.executemany(
                "INSERT INTO job_events (job_id, owner, ts, kind, data) VALUES (?, ?, ?, ?, ?)",
                [(job_id, owner, now, kind, data_json) for data_json in rows],
            )

    def events(self, owner: str, job_id: str, kind: str | None = None) -> builtins.list[dict[str, Any]]:
        """A job's events in the order recorded: ``[{"ts", "kind", "data"}, ...]``."""
        _check_owner(owner)
        conn = self._conn()
        self._get(conn, owner, job_id)
        sql = "SELECT ts, kind, data FROM job_events WHERE owner = ? AND job_id = ?"
        args: builtins.list[Any] = [owner, job_id]
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        sql += " ORDER BY seq ASC"
        return [{"ts": r["ts"], "kind": r["kind"], "data": json.loads(r["data"])} for r in conn.execute(sql, args)]


class DatabaseBackup:
    """Copies the database to the data dir every ``every_s`` seconds and once more on ``stop``.

    For a database kept off a bucket mount (``Settings.db_dir``): a restart on a fresh disk loses
    at most the changes of the last ``every_s`` seconds."""

    def __init__(self, jobs: JobStore, target: Path, every_s: float) -> None:
        self.jobs = jobs
        self.target = Path(target)
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "DatabaseBackup":

        self._thread = threading.Thread(target=self._run, name=f"{THREAD_PREFIX}db-backup", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._copy()

    def _copy(self) -> None:
        try:
            self.jobs.backup_to(self.target)
        except Exception:  # the next round tries again; the local database is intact
            log.exception("Copying the database to %s failed", self.target)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
            self._thread = None
        self._copy()
