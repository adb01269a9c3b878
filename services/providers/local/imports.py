"""LoRA files made elsewhere, kept for the local engine to render: one folder an import, found from its id.

An import lives in ``<data_dir>/loras/<id>/`` (hosted, a visitor's in their own folder:
``<data_dir>/owners/<token>/loras/<id>/``, the token being part of the id, as for local jobs)::

    lora.safetensors   the file as it came, checked (services.engine.lora_formats) before it was kept
    lora.json          what it is: ``services.providers.base.ImportedLora``'s fields
    export/            the files ``export_lora`` wrote from it

A folder is written whole (a temp folder renamed into place), so a crash never leaves half an import
that lists. Nothing here imports torch.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

from services.config import Settings
from services.errors import InputError, ProviderError, TaskNotFoundError
from services.providers.base import ImportedLora
from services.storage import atomic
from services.providers.local.ids import OwnedIds
from services.storage.owners import owner_dir

LORA_NAME = "lora.safetensors"
INFO_NAME = "lora.json"
EXPORT_DIR = "export"
FOLDER = "loras"
IMPORT_IDS = OwnedIds("lora", FOLDER, tag=r"[0-9a-f]{16}")
_COPY_CHUNK = 1 << 20


def is_import_id(ref: str) -> bool:
    """Whether ``ref`` has the shape of an imported LoRA's id (``new_id``)."""
    return IMPORT_IDS.matches(ref)


class LoraImports:
    """The imported LoRAs on one data dir: ids, folders, records."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = Path(settings.data_dir) / FOLDER

    def new_id(self, owner: str) -> str:
        return IMPORT_IDS.new(self.settings, owner)

    def folder(self, lora_id: str) -> Path:
        return IMPORT_IDS.folder(self.settings, self.root, lora_id)

    def existing(self, lora_id: str) -> Path:
        if not is_import_id(lora_id):
            raise TaskNotFoundError(f"{lora_id!r} is not an imported LoRA's id.")
        folder = self.folder(lora_id)
        if not (folder / INFO_NAME).is_file():
            raise TaskNotFoundError(f"There is no imported LoRA {lora_id} (deleted?).",
                                    hint="Import the LoRA again.")
        return folder

    def lora_path(self, lora_id: str) -> Path:
        return self.existing(lora_id) / LORA_NAME

    def export_dir(self, lora_id: str) -> Path:
        return self.existing(lora_id) / EXPORT_DIR

    def get(self, lora_id: str) -> ImportedLora:
        folder = self.existing(lora_id)
        try:
            data = json.loads((folder / INFO_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ProviderError(f"The record of imported LoRA {lora_id} can't be read ({exc}).",
                                hint="Import the LoRA again.") from None
        known = {f.name for f in fields(ImportedLora)}
        return ImportedLora(**{k: v for k, v in data.items() if k in known})

    def list(self, owner: str) -> list[ImportedLora]:
        """``owner``'s imports, newest first (folders that are not whole imports are left out)."""
        root = owner_dir(self.settings, owner) / FOLDER
        found = []
        if root.is_dir():
            for d in root.iterdir():
                if is_import_id(d.name) and self.folder(d.name) == d and (d / INFO_NAME).is_file():
                    try:
                        found.append(self.get(d.name))
                    except ProviderError:
                        continue
        return sorted(found, key=lambda r: r.created_at, reverse=True)

    def add(self, owner: str, src: Path, check: Callable[[Path], ImportedLora], *, max_bytes: int) -> ImportedLora:
        """Copy ``src`` into a new import of ``owner`` (at most ``max_bytes``), run ``check`` on the copy (it
        raises for a file that can't be used, or returns the record with any id), then put the folder in
        place whole. Nothing is kept when the copy or the check fails."""
        lora_id = self.new_id(owner)
        folder = self.folder(lora_id)
        tmp = folder.with_name(f".{lora_id}.tmp")
        tmp.mkdir(parents=True)
        try:
            _copy_capped(Path(src), tmp / LORA_NAME, max_bytes)
            record = check(tmp / LORA_NAME)
            record = ImportedLora(**{**asdict(record), "id": lora_id, "created_at": time.time()})
            atomic.write_json(tmp / INFO_NAME, asdict(record), indent=1)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return record

    def remove(self, lora_id: str) -> None:
        folder = self.existing(lora_id)
        try:
            shutil.rmtree(folder)
        except OSError as exc:
            raise ProviderError(f"Could not remove the imported LoRA {lora_id}: {exc.strerror}.",
                                hint="Check the data folder's permissions, then delete it again.") from None


def _copy_capped(src: Path, dest: Path, max_bytes: int) -> None:
    """Copy ``src`` to ``dest``, refusing (before the cap is passed) a file that grew past ``max_bytes``."""
    done = 0
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        while chunk := fin.read(_COPY_CHUNK):
            done += len(chunk)
            if done > max_bytes:
                raise InputError(f"{src.name} is over {max_bytes / 2**20:.0f} MB, the largest LoRA accepted.",
                                 hint="Use a smaller LoRA (a lower rank).")
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
