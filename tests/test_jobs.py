"""Tests for services.storage.jobs.JobStore: persistence, owner isolation, validation, threads."""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from services.config import Secret, Settings
from services.errors import JobError
from services.storage.database import SCHEMA_VERSION
from services.storage.jobs import TERMINAL_STATUSES, Job, JobStore


class FakeClock:
    """A clock that moves forward one second per reading, so orderings are deterministic."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.now += 1.0
            return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "jobs.sqlite3"


@pytest.fixture
def store(db_path: Path, clock: FakeClock):
    s = JobStore(db_path, clock=clock)
    yield s
    s.close()


def _new(store: JobStore, owner: str = "alice", name: str = "job", **params) -> Job:
    return store.create(owner, "cometapi", "finetune", name, "cats", "abc123", params or {"steps": 1000})


# --------------------------------------------------------------------------- round trip


def test_create_get_list_update_round_trip(store: JobStore) -> None:
    job = _new(store, name="first", steps=1000, trigger_word="TOK", nested={"lr": 1e-4})
    assert len(job.id) == 32 and job.status == "submitting" and job.is_active
    assert job.created_at == job.updated_at and job.finished_at is None and job.remote_id is None

    got = store.get("alice", job.id)
    assert got == job
    assert got.params == {"steps": 1000, "trigger_word": "TOK", "nested": {"lr": 1e-4}}

    second = _new(store, name="second")
    assert [j.name for j in store.list("alice")] == ["second", "first"]  # newest first
    assert [j.name for j in store.list("alice", limit=1)] == ["second"]

    updated = store.update("alice", job.id, status="running", progress=0.25, eta_s=120, message="Training")
    assert updated.status == "running" and updated.progress == 0.25 and updated.eta_s == 120.0
    assert updated.started_at is not None and updated.updated_at > job.updated_at
    assert store.get("alice", job.id) == updated

    store.set_remote_id("alice", job.id, "ft-remote-1")
    assert store.find_by_remote("alice", "cometapi", "ft-remote-1").id == job.id
    assert store.find_by_remote("alice", "cometapi", "nope") is None
    assert store.find_by_remote("alice", "local", "ft-remote-1") is None

    done = store.update("alice", job.id, status="ready", progress=1.0, result={"finetune_id": "ft-remote-1"})
    assert done.result == {"finetune_id": "ft-remote-1"} and not done.is_active
    assert done.elapsed_s == done.finished_at - done.started_at

    store.mark_deleted("alice", second.id)
    assert [j.id for j in store.list("alice")] == [job.id]
    assert {j.id for j in store.list("alice", include_deleted=True)} == {job.id, second.id}
    assert store.get("alice", second.id).status == "deleted"


def test_from_settings_uses_data_dir(tmp_path: Path) -> None:
    with JobStore.from_settings(Settings(data_dir=tmp_path / "d")) as s:
        assert s.path == tmp_path / "d" / "jobs.sqlite3"
        _new(s)
    assert (tmp_path / "d" / "jobs.sqlite3").exists()


def test_missing_job_raises_job_error(store: JobStore) -> None:
    with pytest.raises(JobError, match="not found"):
        store.get("alice", "does-not-exist")
    with pytest.raises(JobError):
        store.update("alice", "does-not-exist", message="x")


# --------------------------------------------------------------------------- owner isolation


def test_owner_isolation(store: JobStore) -> None:
    a = _new(store, "alice")
    store.set_remote_id("alice", a.id, "r-1")
    store.record_event("alice", a.id, "loss", {"step": 1, "loss": 0.5})

    with pytest.raises(JobError):
        store.get("bob", a.id)
    with pytest.raises(JobError):
        store.update("bob", a.id, status="cancelled")
    with pytest.raises(JobError):
        store.mark_deleted("bob", a.id)
    with pytest.raises(JobError):
        store.set_remote_id("bob", a.id, "r-evil")
    with pytest.raises(JobError):
        store.record_event("bob", a.id, "loss", {"step": 2})
    with pytest.raises(JobError):
        store.events("bob", a.id)
    assert store.list("bob", include_deleted=True) == []
    assert store.active_jobs("bob") == []
    assert store.find_by_remote("bob", "cometapi", "r-1") is None

    # Nothing bob tried changed alice's job.
    still = store.get("alice", a.id)
    assert still.status == "submitting" and still.remote_id == "r-1"
    assert len(store.events("alice", a.id)) == 1


def test_owner_is_required(store: JobStore) -> None:
    for bad in ("", "   ", None):
        with pytest.raises(JobError, match="owner"):
            store.create(bad, "cometapi", "finetune", "n", "d", "h", {})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- restart


def test_active_jobs_survive_restart(db_path: Path, clock: FakeClock) -> None:
    s1 = JobStore(db_path, clock=clock)
    running = _new(s1, "alice", name="running")
    s1.update("alice", running.id, status="running", progress=0.5)
    pending = _new(s1, "bob", name="pending")
    s1.update("bob", pending.id, status="pending")
    done = _new(s1, "alice", name="done")
    s1.update("alice", done.id, status="failed", error="boom")
    s1.close()
    with pytest.raises(JobError, match="closed"):
        s1.list("alice")

    s2 = JobStore(db_path, clock=clock)
    try:
        assert {j.name for j in s2.list("alice")} == {"running", "done"}
        assert [j.id for j in s2.active_jobs()] == [running.id, pending.id]  # oldest first, all owners
        assert [j.id for j in s2.active_jobs("alice")] == [running.id]
        assert s2.get("alice", running.id).progress == 0.5
        assert s2.get("alice", done.id).error == "boom"
        version = sqlite3.connect(db_path).execute("PRAGMA user_version").fetchone()[0]
        assert version == SCHEMA_VERSION
    finally:
        s2.close()


def test_newer_schema_is_refused(db_path: Path) -> None:
    JobStore(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(JobError, match="newer version"):
        JobStore(db_path)


# --------------------------------------------------------------------------- status rules


@pytest.mark.parametrize("status", sorted(TERMINAL_STATUSES))
def test_terminal_status_sets_finished_at(store: JobStore, status: str) -> None:
    job = _new(store)
    store.update("alice", job.id, status="running")
    finished = store.update("alice", job.id, status=status)
    assert finished.finished_at == finished.updated_at and finished.is_terminal
    # A later terminal change (ready -> deleted) keeps the first finish time.
    again = store.update("alice", job.id, status="deleted")
    assert again.finished_at == finished.finished_at


def test_back_to_active_clears_finished_at(store: JobStore) -> None:
    job = _new(store)
    store.update("alice", job.id, status="failed")
    retried = store.update("alice", job.id, status="pending")
    assert retried.finished_at is None and retried.is_active


@pytest.mark.parametrize(
    "fields",
    [
        {"status": "done"},
        {"status": None},
        {"progress": 1.5},
        {"progress": -0.1},
        {"progress": "half"},
        {"eta_s": -1},
        {"id": "x"},
        {"owner": "bob"},
        {"created_at": 0.0},
        {"colour": "red"},
        {"params": ["not", "a", "dict"]},
        {"result": {"bad": object()}},
        {"kind": "dance"},
    ],
)
def test_invalid_updates_rejected(store: JobStore, fields: dict) -> None:
    job = _new(store)
    with pytest.raises((JobError, TypeError)):
        store.update("alice", job.id, **fields)
    assert store.get("alice", job.id) == job  # nothing half-written


def test_invalid_kind_rejected_on_create(store: JobStore) -> None:
    with pytest.raises(JobError, match="kind"):
        store.create("alice", "cometapi", "dance", "n", "d", "h", {})


# --------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    "params",
    [
        {"api_key": "x"},
        {"API_KEY": "x"},
        {"Authorization": "Bearer x"},
        {"x-api-key": "x"},
        {"token": "x"},
        {"password": "x"},
        {"secret": "x"},
        {"key": "x"},
        {"client_secret": "x"},
        {"cometapi_api_key": "x"},
        {"nested": {"deeper": {"Token": "x"}}},
        {"headers": [{"authorization": "x"}]},
        {"note": "sk-abcdefghijklmnopqrstuvwxyz012345"},
        {"k": Secret("x")},
    ],
)
def test_secrets_rejected(store: JobStore, params: dict) -> None:
    with pytest.raises(JobError, match="credential|API key|Secret"):
        store.create("alice", "cometapi", "finetune", "n", "d", "h", params)
    job = _new(store)
    with pytest.raises(JobError):
        store.update("alice", job.id, params=params)
    with pytest.raises(JobError):
        store.update("alice", job.id, result=params)
    with pytest.raises(JobError):
        store.record_event("alice", job.id, "log", params)
    assert store.get("alice", job.id).params == {"steps": 1000}
    assert store.events("alice", job.id) == []


def test_harmless_params_allowed(store: JobStore) -> None:
    params = {"keyword": "x", "trigger_word": "TOK", "max_tokens": 300, "caption": "a sk-ish cat on a mat"}
    job = store.create("alice", "cometapi", "finetune", "n", "d", "h", params)
    assert store.get("alice", job.id).params == params


def test_secret_error_message_does_not_echo_value(store: JobStore) -> None:
    with pytest.raises(JobError) as info:
        store.create("alice", "cometapi", "finetune", "n", "d", "h", {"api_key": "sk-supersecretvalue1234567"})
    assert "supersecret" not in str(info.value)


# --------------------------------------------------------------------------- events


def test_events_round_trip(store: JobStore) -> None:
    job = _new(store)
    for step in range(3):
        store.record_event("alice", job.id, "loss", {"step": step, "loss": 1.0 / (step + 1)})
    store.record_event("alice", job.id, "sample", {"step": 2, "path": "samples/2.png"})

    every = store.events("alice", job.id)
    assert [e["kind"] for e in every] == ["loss", "loss", "loss", "sample"]
    assert [e["data"]["step"] for e in store.events("alice", job.id, kind="loss")] == [0, 1, 2]
    assert store.events("alice", job.id, kind="sample")[0]["data"] == {"step": 2, "path": "samples/2.png"}
    assert all(isinstance(e["ts"], float) for e in every)
    assert every == sorted(every, key=lambda e: e["ts"])
    with pytest.raises(JobError):
        store.record_event("alice", "missing", "loss", {})


# --------------------------------------------------------------------------- concurrency & sqlite


def test_concurrent_writes_from_threads(db_path: Path) -> None:
    store = JobStore(db_path)  # real clock: many threads
    threads_n, updates_n = 8, 50
    shared = _new(store, "alice", name="shared")
    errors: list[BaseException] = []
    created: dict[int, str] = {}
    start = threading.Barrier(threads_n)

    def worker(t: int) -> None:
        try:
            start.wait()
            owner = f"user{t}"
            job = _new(store, owner, name=f"t{t}")
            created[t] = job.id
            for i in range(updates_n):
                store.update(owner, job.id, status="running", progress=(i + 1) / updates_n, message=f"step {i}")
                store.record_event(owner, job.id, "loss", {"step": i})
                store.update("alice", shared.id, message=f"t{t}-{i}")
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    try:
        assert errors == []
        assert len(created) == threads_n
        for t, job_id in created.items():
            job = store.get(f"user{t}", job_id)
            assert job.progress == 1.0 and job.message == f"step {updates_n - 1}"
            assert [e["data"]["step"] for e in store.events(f"user{t}", job_id)] == list(range(updates_n))
        assert store.get("alice", shared.id).message.endswith(f"-{updates_n - 1}")
        assert len(store.active_jobs()) == threads_n + 1
    finally:
        store.close()


def test_wal_mode_is_on(store: JobStore, db_path: Path) -> None:
    assert store.journal_mode() == "wal"
    # WAL is a property of the file, so a fresh outside connection sees it too.
    assert sqlite3.connect(db_path).execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"


def test_store_module_does_not_import_gradio() -> None:
    import ast
    import services.storage.jobs as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(n.split(".")[0] == "gradio" for n in names)


def test_a_database_kept_off_the_data_dir_is_copied_there_and_restored_from_it(tmp_path):
    """On a Space the data dir is a bucket mount, where SQLite (WAL) is unsafe: the database lives on
    local disk, is copied to the data dir with SQLite's backup API, and a fresh disk starts from it."""
    import threading

    from services.storage.database import DatabaseBackup

    settings = Settings(data_dir=tmp_path / "bucket", db_dir=tmp_path / "local-disk")
    store = JobStore.from_settings(settings)
    assert store.path == tmp_path / "local-disk" / "jobs.sqlite3"
    job = store.create("ann", "local", "finetune", "cup-v1", "cup", "h", {})
    # Copies taken while another thread writes are consistent databases.
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            store.record_event("ann", job.id, "step", {"step": i})
            i += 1

    thread = threading.Thread(target=writer, name="test-writer")
    thread.start()
    try:
        for _ in range(5):
            store.backup_to(settings.db_backup_path)
            with sqlite3.connect(settings.db_backup_path) as copy:
                assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        stop.set()
        thread.join(30)
    backup = DatabaseBackup(store, settings.db_backup_path, every_s=3600).start()
    store.update("ann", job.id, status="ready")
    backup.stop()  # the final copy on shutdown has the last change
    store.close()

    (tmp_path / "local-disk" / "jobs.sqlite3").unlink()  # a restart on a fresh disk
    for leftover in (tmp_path / "local-disk").glob("jobs.sqlite3-*"):
        leftover.unlink()
    restored = JobStore.from_settings(settings)
    assert restored.get("ann", job.id).status == "ready"
    assert not list(settings.data_dir.glob("jobs.sqlite3-wal"))  # no WAL files on the mount
    restored.close()
