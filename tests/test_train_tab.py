"""Pure helpers of the Train tab: the loss plot's data and the samples gallery."""
from __future__ import annotations

from components.train_tab import RAW, SMOOTHED, loss_frame, sample_items


def _event(step, loss=None, samples=()):
    return {"ts": 0, "kind": "step", "data": {"step": step, "loss": loss, "samples": list(samples)}}


def test_loss_frame_is_numeric_sorted_and_one_point_per_step():
    frame = loss_frame([_event(20, "0.5"), _event(10, 0.9), _event(20, 0.4), _event(30), _event(None, 0.1)])
    raw = frame[frame["series"] == RAW]
    assert raw["step"].tolist() == [10, 20] and raw["loss"].tolist() == [0.9, 0.4]
    assert frame["loss"].dtype.kind == "f"
    empty = loss_frame([])
    assert empty.empty and empty["loss"].dtype.kind == "f" and empty["step"].dtype.kind == "i"


def test_loss_frame_adds_a_debiased_smoothed_line():
    frame = loss_frame([_event(s, 1.0 if s % 2 else 3.0) for s in range(1, 201)])
    smooth = frame[frame["series"] == SMOOTHED]["loss"].tolist()
    assert smooth[0] == 1.0  # debiased: the first point is the first value, not 0.1 of it
    assert 1.9 < smooth[-1] < 2.1  # the zig-zag between 1 and 3 smooths to its mean
    assert max(abs(a - b) for a, b in zip(smooth[150:], smooth[151:])) < 0.25  # and is calm


def test_sample_items_once_each_with_the_step_first_seen():
    events = [_event(10, samples=["a.png"]), _event(12, samples=["a.png"]), _event(20, samples=["a.png", "b.png"])]
    assert sample_items(events) == [("a.png", "step 10"), ("b.png", "step 20")]
    many = [_event(i, samples=[f"{j}.png" for j in range(i + 1)]) for i in range(30)]
    assert [p for p, _ in sample_items(many, limit=3)] == ["27.png", "28.png", "29.png"]


def test_the_suggested_name_follows_dataset_and_mode_but_never_replaces_a_typed_one():
    from components.train_tab import suggest_name

    assert suggest_name("mug", "product", "") == "mug-product"
    assert suggest_name("mug", "style", "mug-product") == "mug-style"  # still our suggestion: follows
    assert suggest_name("cup", "style", "mug-style") == "cup-style"
    assert suggest_name("mug", "style", "mug-v1") == {"__type__": "update"}  # the user's own: kept
    assert suggest_name(None, "style", "") == {"__type__": "update"}
