"""What a Hugging Face job is sent: the project's code, its packages, and the bootstrap that runs it.

The job runs ``job_script.py`` (stdlib + huggingface_hub) under ``uv run`` with ``job_dependencies()``;
the script fetches the code bundle, the dataset and the config from the user's dataset repo and runs
the trainer's command line (``services.engine.cli``) with ``--push-to``.
"""
from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import services

ROOT = Path(services.__file__).resolve().parent.parent
JOB_SCRIPT = Path(__file__).resolve().with_name("job_script.py")
# The packages a job installs: the local engine's (requirements-local.txt), and these from the app's
# requirements.txt, one source for each version bound.
FROM_APP_REQUIREMENTS = ("huggingface-hub", "pillow")
# The quantised memory presets load the base model with bitsandbytes (not in requirements-local.txt:
# it needs CUDA, which a job always has).
BITSANDBYTES = "bitsandbytes"
# Files of the bundle: the services package's Python sources, nothing else (no data, no caches).
BUNDLE_PACKAGE = "services"
# A fixed timestamp, so that the same sources make the same bytes.
ZIP_TIME = (2020, 1, 1, 0, 0, 0)


def requirement_lines(path: Path) -> list[str]:
    out = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def requirement_name(line: str) -> str:
    return re.split(r"[<>=!~\[;\s]", line, maxsplit=1)[0].lower().replace("_", "-")


def job_dependencies(*, quantised: bool, root: Path = ROOT) -> list[str]:
    deps = requirement_lines(root / "requirements-local.txt")
    deps += [r for r in requirement_lines(root / "requirements.txt") if requirement_name(r) in FROM_APP_REQUIREMENTS]
    if quantised:
        deps.append(BITSANDBYTES)
    return deps


def code_bundle(root: Path = ROOT) -> bytes:
    """A zip of ``services/**/*.py``, paths relative to ``root`` (so ``services`` imports from its top)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted((root / BUNDLE_PACKAGE).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            info = zipfile.ZipInfo(path.relative_to(root).as_posix(), ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    return buf.getvalue()


def script_args(data_repo: str, prefix: str, model_repo: str, *, resume: bool) -> list[str]:
    """The bootstrap's arguments (job_script.py parses them)."""
    args = ["--data-repo", data_repo, "--prefix", prefix, "--model-repo", model_repo]
    return [*args, "--resume"] if resume else args
