"""A run's files, pushed to a Hub model repo as it trains: what a training on another machine
(Hugging Face Jobs) leaves where the studio can see it.

The repo's layout mirrors the run's folder, so a progress line's path (``samples/step_000050.png``,
``checkpoints/step_000050``) names the file on the repo as well:

* each sample goes to ``samples/<name>``;
* each checkpoint goes to ``checkpoints/step_XXXXXX/``, and the older ones there are deleted in the
  same commit (only the latest is needed to resume);
* the finished output (the LoRA weights, the model card, its samples) goes to the repo's root.

A sample or checkpoint that cannot be pushed after a few tries is reported and skipped: the run goes
on, and the next one replaces it. The final push failing is an error. The token is a ``Secret``,
revealed only to build the ``HfApi`` client, and scrubbed from every message.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.config import Secret
from services.errors import InputError
from services.engine.hub import scrub, upload_error, validate_repo_id

PUSH_TRIES = 3
PUSH_BACKOFF_S = 5.0  # before the 2nd try; doubled before each further one
# What a resume fetches from the repo into the run's folder.
RESUME_PATTERNS = ["checkpoints/*", "samples/*"]
COMMIT_PREFIX = "FLUX Finetune Studio"


@dataclass
class RepoPusher:
    """Uploads a run's samples, checkpoints and output to ``repo_id`` (``api``: an ``HfApi``)."""

    repo_id: str
    api: object
    token: Secret = field(default_factory=lambda: Secret(""))  # only to scrub messages
    warn: Callable[[str], None] = lambda message: None
    tries: int = PUSH_TRIES
    backoff_s: float | None = None  # None: PUSH_BACKOFF_S

    @classmethod
    def connect(cls, repo_id: str, token: Secret, warn: Callable[[str], None]) -> RepoPusher:
        from huggingface_hub import HfApi

        if not token:
            raise InputError("--push-to needs a Hugging Face token.",
                             hint="Set HF_TOKEN to a token with write access to the repo.")
        return cls(validate_repo_id(repo_id), HfApi(token=token.reveal()), token=token, warn=warn)

    def create_repo(self) -> None:
        """The repo exists (a private one is created if not); an error otherwise, before any training."""
        self._attempt("create the repo", lambda: self.api.create_repo(
            self.repo_id, repo_type="model", private=True, exist_ok=True))

    def pull_for_resume(self, job_dir: Path) -> None:
        """The repo's checkpoints and samples into ``job_dir``: what a resume on a fresh machine needs."""
        self._attempt("download the checkpoint", lambda: self.api.snapshot_download(
            self.repo_id, repo_type="model", local_dir=str(job_dir), allow_patterns=RESUME_PATTERNS))

    def push_sample(self, path: Path) -> bool:
        """``path`` to ``samples/<name>``; False (and a warning) when it could not be pushed."""
        return self._try(f"the sample {path.name}", lambda: self.api.upload_file(
            path_or_fileobj=str(path), path_in_repo=f"samples/{path.name}", repo_id=self.repo_id,
            repo_type="model", commit_message=f"{COMMIT_PREFIX}: sample {path.stem}"))

    def push_checkpoint(self, folder: Path) -> bool:
        """The checkpoint ``folder`` to ``checkpoints/<name>/``, deleting the older ones in the same
        commit; False (and a warning) when it could not be pushed."""
        # Uploaded from the checkpoints folder, so that the deletion reaches the sibling checkpoints
        # (upload_folder's delete_patterns are relative to path_in_repo); what is added is never deleted.
        return self._try(f"the checkpoint {folder.name}", lambda: self.api.upload_folder(
            repo_id=self.repo_id, repo_type="model", folder_path=str(folder.parent), path_in_repo="checkpoints",
            allow_patterns=[f"{folder.name}/*"], delete_patterns=["step_*"],
            commit_message=f"{COMMIT_PREFIX}: checkpoint {folder.name}"))

    def push_output(self, folder: Path) -> None:
        """The finished output (LoRA, model card, samples) to the repo's root; an error when it fails."""
        self._attempt("upload the LoRA", lambda: self.api.upload_folder(
            repo_id=self.repo_id, repo_type="model", folder_path=str(folder), path_in_repo="",
            commit_message=f"{COMMIT_PREFIX}: the trained LoRA"))

    # ---------------------------------------------------------------- retries

    def _try(self, what: str, call: Callable[[], object]) -> bool:
        try:
            self._attempt(f"push {what}", call)
        except Exception as exc:  # a missed sample or checkpoint is not worth the run
            self.warn(f"Could not push {what} to {self.repo_id}; going on. {exc}")
            return False
        return True

    def _attempt(self, what: str, call: Callable[[], object]) -> object:
        """``call()``, tried ``tries`` times; the last failure as a ProviderError without the token."""
        secret = self.token.reveal()
        delay = PUSH_BACKOFF_S if self.backoff_s is None else self.backoff_s
        for attempt in range(1, self.tries + 1):
            try:
                return call()
            except Exception as exc:
                if attempt == self.tries:
                    raise upload_error(exc, self.repo_id, secret) from None
                self.warn(f"Could not {what} (try {attempt} of {self.tries}): "
                          f"{scrub(str(exc), secret) or type(exc).__name__}. Trying again.")
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")
