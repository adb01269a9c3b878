"""The app's database: one SQLite file (``jobs.sqlite3``) shared by every thread.

It holds the jobs, their events and every generated image's record (services.storage.jobs and
services.storage.results ask the questions; this module opens the file, keeps its schema and
copies it).

Design notes (the *why*):

* Gradio runs handlers on many threads. Each thread gets its own connection (sqlite3
  connections must not be shared without care), WAL lets readers run while one writer writes,
  and ``busy_timeout`` makes a writer wait for the lock instead of failing.
* Writes use ``BEGIN IMMEDIATE``: a read-then-write transaction that starts deferred can fail
  with SQLITE_BUSY at once (no waiting) when another thread committed in between.
* The schema is versioned with ``PRAGMA user_version``; add a function to ``_MIGRATIONS``
  to add a column later, never edit an old one.
"""
from __future__ import annotations

import builtins
import logging
import shutil
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from services.config import THREAD_PREFIX, Settings
from services.errors import JobError
from services.storage import atomic

log = logging.getLogger("flux_studio.jobs")

DB_FILENAME = "jobs.sqlite3"
_BUSY_TIMEOUT_MS = 10_000

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


# --------------------------------------------------------------------------- the file


def database_path(settings: Settings) -> Path:
    """Where the app's database is. With ``db_dir`` set (a Space), it lives on local disk; a fresh
    disk starts from the last copy in the data dir (see ``DatabaseBackup``)."""
    path = Path(settings.db_path)
    backup = settings.db_backup_path
    if backup is not None and not path.exists() and backup.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(backup, path)
    return path


class Transaction:
    """``with db.write() as conn:`` = one atomic BEGIN IMMEDIATE ... COMMIT."""

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


class Database:
    """One SQLite file: a connection per thread, write transactions, the schema brought up to date."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._conns: builtins.list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._migrate(self.connection())

    def connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        if self._closed:
            raise JobError("The job store is closed.")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves (see Transaction).
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

    def write(self) -> Transaction:
        return Transaction(self.connection())

    def _migrate(self, conn: sqlite3.Connection) -> None:
        with Transaction(conn):
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
        """Close every thread's connection. The database cannot be used afterwards."""
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
        self._local = threading.local()

    def journal_mode(self) -> str:
        return str(self.connection().execute("PRAGMA journal_mode").fetchone()[0]).lower()

    def backup_to(self, target: Path) -> None:
        """A consistent copy of the whole database at ``target``, written atomically (SQLite's
        online backup: safe while other threads write)."""
        with atomic.replacing(target) as tmp:
            dst = sqlite3.connect(str(tmp))
            try:
                self.connection().backup(dst)
            finally:
                dst.close()


# --------------------------------------------------------------------------- the copy


class BacksUp(Protocol):
    def backup_to(self, target: Path) -> None: ...


class DatabaseBackup:
    """Copies the database to the data dir every ``every_s`` seconds and once more on ``stop``.

    For a database kept off a bucket mount (``Settings.db_dir``): a restart on a fresh disk loses
    at most the changes of the last ``every_s`` seconds."""

    def __init__(self, jobs: BacksUp, target: Path, every_s: float) -> None:
        self.jobs = jobs
        self.target = Path(target)
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> DatabaseBackup:
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
