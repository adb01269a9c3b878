"""The local training and inference engine (diffusers + peft), behind ``services.providers.local.provider``.

Every module here imports torch / diffusers lazily, inside functions, so that importing the
package costs nothing where the optional extra (``requirements-local.txt``) is not installed.
"""

from __future__ import annotations

import os


def quiet_libraries() -> None:
    """No progress bars or chatty warnings from diffusers / transformers in the app's logs."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # pragma: no cover - logging knobs are best effort
        pass


def release_gpu_memory() -> None:
    """Hand cached CUDA memory back once big objects were dropped (nothing to do without CUDA)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - the extra is not installed
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
