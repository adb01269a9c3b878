"""The local engine's trainer as a command: what a Hugging Face job runs, reporting in JSON lines.

    python -m services.engine.cli --config config.json --dataset dataset.zip \\
        --out job/ [--resume] [--push-to owner/repo]

``--config`` is the local worker's config.json (``TrainConfig``'s fields; ``_model`` names the base
model: a registry key, a Hub id or a folder, resolved exactly as the worker does, with
``FLUX_STUDIO_DATA_DIR`` and ``HF_TOKEN`` from the environment). ``model_path`` and ``family`` may be
left out: the folder is where ``_model`` was fetched or built, the family is what its
``model_index.json`` names (``config.resolve_family``). ``--out`` is the run's folder
(samples/, checkpoints/, output/). Progress goes to stdout as ``engine.events`` lines; anything else
(libraries' warnings, a traceback) goes to stderr.

``--push-to`` pushes each sample and checkpoint to that Hub model repo before its line is printed,
and the finished LoRA at the end (``engine.push``). How often is the config's ``sample_every`` and
``checkpoint_every``: there is no separate push interval. ``--resume`` goes on from the latest
checkpoint in ``--out`` (fetched from the repo first, with ``--push-to``).

SIGTERM or SIGINT stops the run at a checkpoint (pushed), then ``done`` says "cancelled" and the exit
status is 0; a second one stops it at once. Any failure prints an ``error`` line and exits with 1.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from services.config import Secret, Settings
from services.errors import InputError
from services.engine import events
from services.engine.card import LORA_FILE
from services.engine.hub import redact, validate_repo_id
from services.engine.push import RepoPusher

DOWNLOAD_REPORT_EVERY_S = 2.0  # at most one download line this often: a job's log stays readable


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.engine.cli",
                                     description="Train a FLUX LoRA, reporting progress as JSON lines.")
    parser.add_argument("--config", type=Path, required=True, help="the run's config.json (TrainConfig's fields)")
    parser.add_argument("--dataset", type=Path, required=True, help="the dataset zip (images and .txt captions)")
    parser.add_argument("--out", type=Path, required=True, help="the run's folder: samples/, checkpoints/, output/")
    parser.add_argument("--resume", action="store_true", help="go on from the latest checkpoint in --out")
    parser.add_argument("--push-to", default="", metavar="REPO_ID",
                        help="a Hub model repo for samples, checkpoints and the LoRA (token: HF_TOKEN)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, *, api=None, cancel: threading.Event | None = None) -> int:
    """Run the command; returns the exit status. ``api`` (an ``HfApi``) is for tests."""
    args = parse_args(argv)
    token = Secret(os.environ.get("HF_TOKEN"))
    cancel = cancel or threading.Event()
    restore = _stop_on_signals(cancel)
    try:
        state = train(args, token, cancel, api=api)
    except Exception as exc:
        print(redact(traceback.format_exc(), token.reveal()), file=sys.stderr, flush=True)
        events.emit("error", message=error_message(exc, token))
        return 1
    finally:
        restore()
    return 0 if state in ("ready", "cancelled") else 1


def train(args: argparse.Namespace, token: Secret, cancel: threading.Event, *, api=None) -> str:
    """One training run, reported as progress lines; returns the state it ended in."""
    from services.engine.config import config_from_json
    from services.engine.models import folder_of
    from services.engine.download import progress_message
    from services.engine.train import (
        PREPARING_MESSAGE, Callbacks, Trainer, checkpoint_step, latest_checkpoint,
    )

    raw = read_config(args.config)
    if not args.dataset.is_file():
        raise InputError(f"The dataset {args.dataset} does not exist.", hint="Pass the dataset zip with --dataset.")
    cfg = config_from_json(raw)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    pusher = _pusher(args.push_to, token, api)
    if pusher is not None:
        pusher.create_repo()
    resumed_from = 0
    if args.resume:
        if pusher is not None:
            events.emit("phase", message=f"Fetching the last checkpoint from {pusher.repo_id}…")
            pusher.pull_for_resume(out)
        ckpt = latest_checkpoint(out / "checkpoints")
        if ckpt is None:
            raise InputError("There is no checkpoint to resume from.", hint="Launch the fine-tune again.")
        resumed_from = checkpoint_step(ckpt)
    events.emit("start", total=cfg.steps, resumed_from=resumed_from)

    last_report = [0.0]

    def downloading(done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - last_report[0] >= DOWNLOAD_REPORT_EVERY_S:
            last_report[0] = now
            events.emit("phase", message=progress_message(done, total))

    spec = raw.get("_model") or cfg.base_model or cfg.model_path or None
    settings = Settings.from_env()
    cfg.model_path = folder_of(spec, data_dir=settings.data_dir, token=settings.hf_token, on_progress=downloading)
    events.emit("phase", message=PREPARING_MESSAGE)
    trainer = Trainer(cfg, args.dataset, out)
    trainer.prepare()

    def on_step(step: int, total: int, loss: float, eta_s: float | None) -> None:
        events.emit("step", step=step, total=total, loss=loss, eta_s=None if eta_s is None else round(eta_s, 1))

    def on_sample(step: int, path: Path) -> None:
        if pusher is not None:
            pusher.push_sample(path)
        events.emit("sample", step=step, path=f"samples/{path.name}")

    def on_checkpoint(step: int, path: Path) -> None:
        if pusher is not None:
            pusher.push_checkpoint(path)
        events.emit("checkpoint", step=step, path=f"checkpoints/{path.name}")

    result = trainer.run(Callbacks(on_step, on_sample, on_checkpoint, cancel), resume=args.resume)
    if result.state == "ready":
        if pusher is not None:
            events.emit("phase", message=f"Uploading the LoRA to {pusher.repo_id}…")
            pusher.push_output(out / "output")
        events.emit("done", state="ready", step=result.step, lora=LORA_FILE)
    else:
        events.emit("done", state=result.state, step=result.step)
    return result.state


def read_config(path: Path) -> dict:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"The config {path} does not exist.",
                         hint="Pass the run's config.json with --config.") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"The config {path} is not readable JSON ({exc}).",
                         hint="Write TrainConfig's fields as one JSON object.") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("steps"), int) or raw["steps"] < 1:
        raise InputError(f"The config {path} has no number of steps.", hint='Set "steps" to a whole number above 0.')
    return raw


def _pusher(repo_id: str, token: Secret, api) -> RepoPusher | None:
    if not repo_id:
        return None

    def warn(message: str) -> None:
        events.emit("phase", message=message)

    if api is None:
        return RepoPusher.connect(repo_id, token, warn)
    return RepoPusher(validate_repo_id(repo_id), api, token=token, warn=warn)


def _stop_on_signals(cancel: threading.Event):
    """SIGTERM / SIGINT set ``cancel`` (the trainer stops at a checkpoint); a second one acts as usual.
    Returns what puts the previous handlers back. Only the main thread may install handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    stops = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.getsignal(sig) for sig in stops}

    def stop(signum, frame) -> None:
        cancel.set()  # nothing printed here: a handler may interrupt a print in progress
        for sig in stops:
            signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)

    for sig in stops:
        signal.signal(sig, stop)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def error_message(exc: BaseException, token: Secret) -> str:
    """What the ``error`` line says: the error's type and text, without the token."""
    return redact(f"{type(exc).__name__}: {exc}", token.reveal())[:500]


if __name__ == "__main__":
    sys.exit(main())
