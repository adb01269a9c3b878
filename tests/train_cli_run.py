"""Running the trainer's command line (``engine.cli``) for real, on the tiny FLUX.1 model.

``run_cli(tmp_path)`` writes a small dataset zip and the config the local worker would write for
the tiny model, runs ``python -m services.engine.cli`` as a subprocess (offline)
and returns its stdout lines: the progress lines a Hugging Face job prints. The session fixture
``cli_run_lines`` (tests/conftest.py) runs it once, so other tests can replay the same lines.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from services.config import Settings
from services.providers.base import TrainRequest
from services.providers.local.base_models import BaseModels
from services.engine import events, models
from tests.imagefactory import training_zip

ROOT = Path(__file__).resolve().parent.parent
CLI_MODULE = "services.engine.cli"
CLI_TIMEOUT_S = 300.0


@dataclass
class CliRun:
    lines: list[str]  # stdout, one entry a line
    returncode: int
    out_dir: Path
    stderr: str = ""
    seconds: float = 0.0

    @property
    def log(self) -> events.RunLog:
        return events.parse(self.lines)


def tiny_config(steps: int, *, sample_every: int, checkpoint_every: int) -> dict:
    """The config.json the local worker writes for a job on the tiny FLUX.1 model (on the CPU)."""
    request = TrainRequest(name="cli test", mode="character", trigger_word="TOK", iterations=steps,
                           learning_rate=1e-2, lora_rank=4)
    base = BaseModels(Settings(), models.TINY_FLUX1, device="cpu")
    return base.job_config(request, models.TINY_FLUX1, steps_per_sample=sample_every,
                           checkpoint_every=checkpoint_every)


def cli_args(config: Path, dataset: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(config), "--dataset", str(dataset), "--out", str(out_dir), *extra]


def write_inputs(tmp_path: Path, steps: int, *, sample_every: int = 3, checkpoint_every: int = 3,
                 config: dict | None = None) -> tuple[Path, Path]:
    """(config.json, dataset.zip) in ``tmp_path``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = config if config is not None else tiny_config(steps, sample_every=sample_every,
                                                        checkpoint_every=checkpoint_every)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(cfg), encoding="utf-8")
    return config_path, training_zip(tmp_path / "dataset.zip")


def run_cli(tmp_path: Path, steps: int = 6, *, sample_every: int = 3, checkpoint_every: int = 3,
            extra_args: tuple[str, ...] = (), config: dict | None = None, dataset: Path | None = None,
            env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT_S) -> CliRun:
    """Run the CLI once in a subprocess on the tiny model; ``out_dir`` is ``tmp_path / "job"``.

    The tiny model is built under ``FLUX_STUDIO_DATA_DIR`` (the test session's, so once a session)."""
    config_path, zip_path = write_inputs(tmp_path, steps, sample_every=sample_every,
                                         checkpoint_every=checkpoint_every, config=config)
    out_dir = tmp_path / "job"
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    environ.setdefault("FLUX_STUDIO_DATA_DIR", str(tmp_path / "data"))
    environ.update(env or {})
    args = cli_args(config_path, dataset if dataset is not None else zip_path, out_dir, *extra_args)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", CLI_MODULE, *args], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=timeout)
    return CliRun(proc.stdout.splitlines(), proc.returncode, out_dir, proc.stderr, time.monotonic() - started)
