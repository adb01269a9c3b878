"""Ids that name their own folder: ``<kind>-<tag>``, or ``<kind>-o<owner token>-<tag>`` for a hosted visitor's.

The token is the name of the visitor's folder (``storage.owners.owner_dir``), so the folder of a job or an
imported LoRA is found from its id alone (``<data_dir>/owners/<token>/<subfolder>/<id>``), and the local
owner's live under the provider's own root. ``new`` makes ids from the same pieces ``pattern`` checks, so
every id made is one that is found again (a visitor's job id once outgrew its check, and each of their jobs
read as unknown while it trained).
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from services.config import Settings
from services.storage.owners import LOCAL_OWNER, owner_dir

TAG = r"[A-Za-z0-9_-]{1,64}"
_TAG_RE = re.compile(TAG)


@dataclass(frozen=True)
class OwnedIds:
    kind: str  # "local" (a training job), "lora" (an imported LoRA)
    subfolder: str  # under a visitor's owner folder
    tag: str = TAG  # what follows the owner token
    pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", re.compile(rf"{self.kind}-(?:o(?P<owner>[0-9a-f]{{32}})-)?{self.tag}"))

    def matches(self, ref: str | None) -> bool:
        return bool(self.pattern.fullmatch(ref or ""))

    def new(self, settings: Settings, owner: str | None, tag: str = "") -> str:
        """A new id for ``owner``: ``tag`` when it is a valid one (a job's own tag), else a random one."""
        suffix = tag if tag and _TAG_RE.fullmatch(tag) else uuid.uuid4().hex[:16]
        if owner and owner != LOCAL_OWNER:
            return f"{self.kind}-o{owner_dir(settings, owner).name}-{suffix}"
        return f"{self.kind}-{suffix}"

    def folder(self, settings: Settings, root: Path, ref: str) -> Path:
        """Where ``ref``'s folder is (or goes): under ``root`` for the local owner, else the visitor's own."""
        valid = self.pattern.fullmatch(ref or "")
        if valid and valid["owner"]:
            return Path(settings.data_dir) / "owners" / valid["owner"] / self.subfolder / ref
        return root / ref
