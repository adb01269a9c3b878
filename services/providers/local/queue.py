"""The local engine's queue: one training at a time in this process (one GPU), in launch order.

Every queued or running local job is a ``Run`` with a thread of its own. The thread first waits
its turn for the ``TrainingSlot``, trains, then hands the slot to the next in line.

Why a slot that can be taken back: a run can hang where no step loop ever checks its cancel
flag (a stalled model download, a driver that never returns). Python can't kill a thread, so
without this one stuck job would block every other local job for ever. Cancelling the holder
starts a grace period; once it is over, the next job in line *evicts* the holder: the slot is
theirs, the stuck run is marked evicted, and the provider writes nothing more for it.

Nothing here imports torch: waiting is cheap and works where the engine is not installed.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from services.providers.base import Holder

# How long a cancelled run may keep the slot while it saves its checkpoint and stops.
CANCEL_GRACE_S = 30.0
# How often a waiting run looks at the clock again while the holder is cancelling (a notify wakes it sooner).
_RECHECK_S = 1.0


@dataclass(eq=False)
class Run:
    """A local job queued or running in this process."""

    remote_id: str
    resume: bool = False
    owner: object = None  # the worker that started it (services.providers.local.worker): closing it stops it
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)  # the worker thread has finished
    started: bool = False  # holds the slot (or held it)
    deleted: bool = False  # its folder is going away: write nothing
    closing: bool = False  # the app is closing: stop, keep it resumable after a restart
    evicted: bool = False  # gave the slot up by force: write nothing
    cancel_at: float | None = None  # slot clock time of the cancel
    thread: threading.Thread | None = None
    live: dict = field(default_factory=dict)
    last_write: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)  # this run's whole curve
    losses_saved: int = 0  # how many of ``losses`` are in losses.csv already

    @property
    def silenced(self) -> bool:
        """True when this run must not write its job's state any more."""
        return self.deleted or self.evicted


class TrainingSlot:
    """A FIFO lock for one training at a time, that a cancelled holder loses after a grace period."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, grace_s: float = CANCEL_GRACE_S) -> None:
        self.clock = clock
        self.grace_s = grace_s
        self._cond = threading.Condition()
        self._line: deque[Run] = deque()
        self._holder: Run | None = None

    def join_line(self, run: Run) -> None:
        with self._cond:
            if run not in self._line and run is not self._holder:
                self._line.append(run)

    def acquire(self, run: Run, on_evict: Callable[[Run], None]) -> bool:
        """Wait until ``run`` is first in line and the slot is free; False if it was cancelled meanwhile.

        A holder cancelled more than ``grace_s`` ago is evicted on the way: ``on_evict(holder)`` runs
        here, outside the slot's lock, so that it may take the provider's locks."""
        while True:
            with self._cond:
                outcome, evicted = self._look(run)
                if outcome is None and evicted is None:
                    holder = self._holder
                    self._cond.wait(_RECHECK_S if holder is not None and holder.cancel_at is not None else None)
                    continue
            if evicted is None:
                return bool(outcome)
            on_evict(evicted)
            self.wake()

    def try_acquire(self, run: Run, on_evict: Callable[[Run], None]) -> bool | None:
        """``acquire`` without the waiting: True (``run`` holds the slot now), False (cancelled), or
        None (it would wait). Evicts an overdue holder the same way."""
        while True:
            with self._cond:
                outcome, evicted = self._look(run)
            if evicted is None:
                return outcome
            on_evict(evicted)
            self.wake()

    def _look(self, run: Run) -> tuple[bool | None, Run | None]:
        """One look at the slot for ``run``, with the lock held: (True/False/None as in
        ``try_acquire``, the holder this look evicted, if any)."""
        if run.cancel.is_set():
            self._leave(run)
            return False, None
        holder = self._holder
        if holder is not None and holder.cancel_at is not None and self.clock() - holder.cancel_at >= self.grace_s:
            holder.evicted = True
            self._holder = None
            return None, holder
        if holder is None and self._line and self._line[0] is run:
            self._line.popleft()
            self._holder = run
            return True, None
        return None, None

    def release(self, run: Run) -> None:
        with self._cond:
            self._leave(run)
            self._cond.notify_all()

    def cancel(self, run: Run) -> None:
        """Ask ``run`` to stop; its grace period starts now (a later cancel does not restart it)."""
        with self._cond:
            if run.cancel_at is None:
                run.cancel_at = self.clock()
            run.cancel.set()
            self._cond.notify_all()

    def wake(self) -> None:
        """Make every waiting run look again (after a fake clock moved, in tests)."""
        with self._cond:
            self._cond.notify_all()

    def holder(self) -> Holder | None:
        with self._cond:
            run = self._holder
            if run is None:
                return None
            return Holder(run.remote_id, run.live.get("step"), run.live.get("total"), run.cancel.is_set(),
                          len(self._line))

    def position(self, run: Run) -> int | None:
        """1 for the next in line, None when not waiting."""
        with self._cond:
            try:
                return self._line.index(run) + 1
            except ValueError:
                return None

    def _leave(self, run: Run) -> None:
        if self._holder is run:
            self._holder = None
        try:
            self._line.remove(run)
        except ValueError:
            pass


class GpuBusyError(RuntimeError):
    """Generation was asked for while a training holds the GPU."""


class GpuGate:
    """One GPU: a training and a generation never hold it at once, so a Compare run during
    training never loads a second copy of the model (which would not fit, or would fail the run).

    Generations take turns with each other; a training waits for the generation in progress,
    then holds the GPU for its whole run, and a generation asked for meanwhile is refused at once
    (waiting hours for a training to end would look like a hang)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = threading.Lock()
        self.training: str | None = None  # the remote id of the training that holds the GPU

    @contextlib.contextmanager
    def for_training(self, remote_id: str) -> Iterator[None]:
        with self._state:
            self.training = remote_id
        try:
            with self._lock:
                yield
        finally:
            with self._state:
                self.training = None

    @contextlib.contextmanager
    def for_inference(self) -> Iterator[None]:
        with self._state:
            if self.training is not None:
                raise GpuBusyError(self.training)
        with self._lock:
            yield


# One GPU per process: every local provider, whatever its data dir, waits for the same slot.
SLOT = TrainingSlot()
GPU = GpuGate()
