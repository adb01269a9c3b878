"""The trainer's progress lines: one JSON object a line on stdout, how a run elsewhere reports.

The trainer's command line (``engine.cli``) prints them; a provider that runs it on another
machine (Hugging Face Jobs) reads them back from the job's logs with ``parse`` and shows the same
progress, loss curve and samples as a run in this process. Every line carries the key ``KEY``, so
whatever else the job prints (pip, warnings, tracebacks) never reads as progress.

Kinds and their fields:

* ``start``: total, resumed_from (0 for a fresh run)
* ``phase``: message (what it is doing before the first step: installing, downloading, caching)
* ``step``: step, total, loss, eta_s
* ``sample``: step, path (where the image is, relative to the run's output: the repo, on a job)
* ``checkpoint``: step, path (likewise)
* ``done``: state ("ready" | "cancelled"), step, lora (the weights file's path, when ready)
* ``error``: message
"""
from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TextIO

KEY = "flux_studio"
KINDS = ("start", "phase", "step", "sample", "checkpoint", "done", "error")


def line(kind: str, **fields) -> str:
    """One progress line (no newline)."""
    if kind not in KINDS:
        raise ValueError(f"unknown progress event {kind!r}")
    return json.dumps({KEY: kind, **fields}, separators=(",", ":"), allow_nan=False)


def emit(kind: str, stream: TextIO | None = None, **fields) -> None:
    """Print one progress line and flush it: a job's log shows it at once."""
    print(line(kind, **fields), file=stream or sys.stdout, flush=True)


@dataclass
class RunLog:
    """What a run's progress lines say so far."""

    total: int | None = None
    resumed_from: int = 0
    step: int = 0
    loss: float | None = None
    eta_s: float | None = None
    message: str = ""  # the latest phase
    losses: dict[int, float] = field(default_factory=dict)  # step -> latest loss (a resume trains steps again)
    samples: list[str] = field(default_factory=list)  # oldest first, no repeats
    checkpoint_step: int | None = None
    checkpoint_path: str = ""
    done: str = ""  # "ready" | "cancelled" once the run said so
    lora: str = ""
    error: str = ""

    @property
    def loss_points(self) -> tuple[tuple[int, float], ...]:
        return tuple(sorted(self.losses.items()))


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def event_of(text: str) -> dict | None:
    """The event a log line holds, or None for any other line (anything a job prints besides)."""
    text = text.strip()
    start = text.find("{")
    if start < 0:
        return None
    try:  # a log service may put a timestamp before the JSON
        data = json.loads(text[start:])
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get(KEY) not in KINDS:
        return None
    return data


def apply(log: RunLog, event: dict) -> RunLog:
    """Fold one event into ``log``; a malformed field is ignored, never fatal."""
    kind = event[KEY]
    if kind == "start":
        total = _number(event.get("total"))
        log.total = int(total) if total else log.total
        log.resumed_from = int(_number(event.get("resumed_from")) or 0)
        log.step = max(log.step, log.resumed_from) if log.resumed_from else log.step
    elif kind == "phase":
        log.message = str(event.get("message", ""))[:300]
    elif kind == "step":
        step = _number(event.get("step"))
        if step is None:
            return log
        log.step = int(step)
        total = _number(event.get("total"))
        log.total = int(total) if total else log.total
        loss = _number(event.get("loss"))
        if loss is not None:
            log.loss = loss
            log.losses[log.step] = loss
        log.eta_s = _number(event.get("eta_s"))
        log.message = ""
    elif kind == "sample":
        path = str(event.get("path", ""))
        if path and path not in log.samples:
            log.samples.append(path)
    elif kind == "checkpoint":
        step = _number(event.get("step"))
        if step is not None:
            log.checkpoint_step = int(step)
            log.checkpoint_path = str(event.get("path", ""))
    elif kind == "done":
        log.done = str(event.get("state", ""))
        log.message = ""  # the last phase (uploading the LoRA) is over
        log.lora = str(event.get("lora", "") or "")
        step = _number(event.get("step"))
        log.step = int(step) if step is not None else log.step
    elif kind == "error":
        log.error = str(event.get("message", ""))[:500]
    return log


def parse(lines: Iterable[str]) -> RunLog:
    """Everything a run's log says so far, from its lines in order."""
    log = RunLog()
    for text in lines:
        event = event_of(text)
        if event is not None:
            apply(log, event)
    return log
