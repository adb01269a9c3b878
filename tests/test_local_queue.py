"""The local engine's training slot: one run at a time, in line order, and a stuck holder evicted.

Deterministic: a fake clock decides when a grace period is over, ``try_acquire`` takes one look
without waiting, and threads meet at events; no test waits for real time to pass."""
from __future__ import annotations

import threading

import pytest

from services.providers.local.queue import Run, TrainingSlot

WAIT_S = 10.0  # an upper bound for a thread to reach a point it will reach at once


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def slot(clock) -> TrainingSlot:
    return TrainingSlot(clock=clock, grace_s=30.0)


def _waiter(slot: TrainingSlot, run: Run, got: list, on_evict=lambda r: None) -> threading.Thread:
    """A thread that waits for the slot the way a run's worker does; ``got`` records the outcome."""

    def work() -> None:
        got.append((run.remote_id, slot.acquire(run, on_evict)))

    slot.join_line(run)
    thread = threading.Thread(target=work, name="test-slot-waiter")
    thread.start()
    return thread


def test_runs_take_the_slot_in_line_order(slot):
    a, b, c = Run("a"), Run("b"), Run("c")
    for run in (a, b, c):
        slot.join_line(run)
    assert slot.acquire(a, lambda r: None) is True
    assert slot.holder().remote_id == "a" and slot.holder().waiting == 2
    assert (slot.position(b), slot.position(c)) == (1, 2)
    got: list = []
    t_c = threading.Thread(target=lambda: got.append(("c", slot.acquire(c, lambda r: None))))
    t_c.start()  # c is second in line: it must not jump b, even when the slot frees
    slot.release(a)
    assert slot.acquire(b, lambda r: None) is True
    assert got == [] and slot.holder().remote_id == "b"
    slot.release(b)
    t_c.join(WAIT_S)
    assert got == [("c", True)] and slot.holder().remote_id == "c"
    slot.release(c)
    assert slot.holder() is None


def test_a_cancelled_waiter_leaves_the_line(slot):
    holder, waiting = Run("holder"), Run("waiting")
    slot.join_line(holder)
    assert slot.acquire(holder, lambda r: None)
    got: list = []
    thread = _waiter(slot, waiting, got)
    slot.cancel(waiting)
    thread.join(WAIT_S)
    assert got == [("waiting", False)] and slot.position(waiting) is None
    assert slot.holder().remote_id == "holder" and slot.holder().waiting == 0


def test_a_cancelled_holder_keeps_the_slot_for_the_grace_period_then_is_evicted(slot, clock):
    stuck, next_ = Run("stuck"), Run("next")
    slot.join_line(stuck)
    assert slot.acquire(stuck, lambda r: None)
    evicted: list[str] = []
    slot.join_line(next_)

    slot.cancel(stuck)
    assert slot.holder().cancelling
    clock.now += 29.0  # not yet
    assert slot.try_acquire(next_, evicted.append) is None
    assert slot.holder().remote_id == "stuck" and not stuck.evicted and evicted == []
    slot.cancel(stuck)  # pressing Cancel again does not restart the grace period
    clock.now += 1.0
    assert slot.try_acquire(next_, lambda r: evicted.append(r.remote_id)) is True
    assert evicted == ["stuck"] and stuck.evicted and stuck.silenced
    assert slot.holder().remote_id == "next"
    slot.release(stuck)  # the stuck run finally returns: it must not free the new holder's slot
    assert slot.holder().remote_id == "next"
    slot.release(next_)
    assert slot.holder() is None


def test_a_waiting_run_evicts_the_overdue_holder_by_itself(slot, clock):
    """The blocking path: a waiter looks again once the clock has moved and it is woken."""
    stuck, next_ = Run("stuck"), Run("next")
    slot.join_line(stuck)
    assert slot.acquire(stuck, lambda r: None)
    evicted: list[str] = []
    got: list = []
    thread = _waiter(slot, next_, got, on_evict=lambda r: evicted.append(r.remote_id))
    slot.cancel(stuck)
    clock.now += 30.0
    slot.wake()
    thread.join(WAIT_S)
    assert got == [("next", True)] and evicted == ["stuck"]
    slot.release(next_)


def test_a_holder_that_is_not_cancelled_is_never_evicted(slot, clock):
    busy, next_ = Run("busy"), Run("next")
    slot.join_line(busy)
    assert slot.acquire(busy, lambda r: None)
    slot.join_line(next_)
    clock.now += 10_000
    assert slot.try_acquire(next_, lambda r: None) is None
    assert slot.holder().remote_id == "busy" and not busy.evicted
    slot.release(busy)
    assert slot.try_acquire(next_, lambda r: None) is True
    slot.release(next_)


def test_the_gpu_is_never_shared_by_a_training_and_a_generation():
    from services.providers.local.queue import GpuBusyError, GpuGate

    gate = GpuGate()
    generating, finish = threading.Event(), threading.Event()
    order: list[str] = []

    def generation():
        with gate.for_inference():
            generating.set()
            assert finish.wait(WAIT_S)
            order.append("generation done")

    def training():
        with gate.for_training("local-job"):
            order.append("training holds the gpu")

    g = threading.Thread(target=generation, name="test-gen")
    g.start()
    assert generating.wait(WAIT_S)
    t = threading.Thread(target=training, name="test-train")
    t.start()  # waits for the generation in progress...
    with pytest.raises(GpuBusyError):  # ...and from now on new generations are refused, not queued for hours
        with gate.for_inference():
            pass
    finish.set()
    g.join(WAIT_S)
    t.join(WAIT_S)
    assert order == ["generation done", "training holds the gpu"] and gate.training is None
    with gate.for_inference():  # free again once the training is over
        pass
