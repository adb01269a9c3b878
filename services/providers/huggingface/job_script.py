"""The bootstrap a Hugging Face job runs (``uv run job_script.py --data-repo ... --prefix ... --model-repo ...``).

Standalone on purpose: stdlib and huggingface_hub only, no import of the project until its code is
fetched. It downloads the code bundle, the dataset zip and the config from the user's dataset repo,
puts the bundle on the path and runs the trainer's command line with ``--push-to`` (samples,
checkpoints and the finished LoRA go to the model repo). The token comes from the job's secret
HF_TOKEN, which huggingface_hub and the trainer read from the environment.
"""
from __future__ import annotations

import argparse
import os
import sys
import zipfile
from pathlib import Path

CODE, DATASET, CONFIG = "code.zip", "dataset.zip", "config.json"
WORK = Path(os.environ.get("FLUX_STUDIO_JOB_DIR", "/tmp/flux-studio"))
CLI = "services.engine.cli"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-repo", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--model-repo", required=True)
    p.add_argument("--resume", action="store_true")
    return p.parse_args(argv)


def fetch(repo: str, prefix: str, name: str, into: Path) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, f"{prefix}/{name}", repo_type="dataset", local_dir=str(into)))


def command(args: argparse.Namespace, config: Path, dataset: Path, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", CLI, "--config", str(config), "--dataset", str(dataset), "--out", str(out),
           "--push-to", args.model_repo]
    return [*cmd, "--resume"] if args.resume else cmd


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    inputs, code = WORK / "inputs", WORK / "code"
    print(f"Fetching the code from {args.data_repo}/{args.prefix}", flush=True)
    with zipfile.ZipFile(fetch(args.data_repo, args.prefix, CODE, inputs)) as zf:
        zf.extractall(code)
    sys.path.insert(0, str(code))
    from services.engine import events

    events.emit("phase", message="Downloading the dataset")
    config = fetch(args.data_repo, args.prefix, CONFIG, inputs)
    dataset = fetch(args.data_repo, args.prefix, DATASET, inputs)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    # The trainer takes this process's place: HF stops a job with SIGTERM to it, which the trainer turns
    # into a checkpoint pushed to the repo (a child process would never hear the signal).
    cmd = command(args, config, dataset, WORK / "out")
    os.execve(cmd[0], cmd, env)
    return 1  # not reached: execve returns only by raising


if __name__ == "__main__":
    sys.exit(main())
