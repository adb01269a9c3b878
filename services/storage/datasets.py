"""Datasets on disk: the records, the checks before training, and the store (import, captions, export).

Layout under the data dir::

    datasets/<name>/dataset.json     captions, trigger word and per-image metadata
    datasets/<name>/images/<file>    prepared images (RGB, <= 1 MP)
    datasets/<name>/export/<name>.zip  the last exported training zip

``dataset.json`` is replaced atomically on every change, so a crash never leaves a
half-written manifest, and nothing a user added is lost by a failed import. Turning an upload
into images and captions is services.storage.uploads; caption text rules are
services.storage.captions.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.config import Settings
from services.errors import DatasetError, InputError
from services.storage import atomic
from services.storage.captions import check_caption_lengths, contains_trigger, validate_trigger_word
from services.storage.images import Prepared, sha256_of
from services.storage.uploads import (
    MAX_NAME_LEN,
    Collected,
    FileMessage,
    ProgressFn,
    collect,
    free_name,
    human_mb,
    prepare_all,
    safe_name,
    unique_stems,
)

MANIFEST = "dataset.json"


# ---------------------------------------------------------------- records


@dataclass
class DatasetItem:
    file: str
    caption: str = ""
    width: int = 0
    height: int = 0
    notes: str = ""
    sha256: str = ""
    source: str = ""
    source_bytes: int = 0


@dataclass
class Dataset:
    name: str
    path: Path
    trigger_word: str = ""
    items: list[DatasetItem] = field(default_factory=list)
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def images_dir(self) -> Path:
        return self.path / "images"

    def image_path(self, file: str) -> Path:
        return self.images_dir / file

    def item(self, file: str) -> DatasetItem:
        for it in self.items:
            if it.file == file:
                return it
        raise DatasetError(f"'{file}' is not in dataset '{self.name}'.", hint="Refresh the page and try again.")

    def content_hash(self) -> str:
        """Identifies exactly what would be trained on: images, captions and trigger word."""
        parts = [self.trigger_word] + [f"{i.file}\0{i.sha256}\0{i.caption}" for i in self.items]
        return sha256_of("\n".join(parts).encode("utf-8"))

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "trigger_word": self.trigger_word,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "items": [asdict(i) for i in self.items],
        }


REPORT_FILES = 50  # files an import report names; the others are counted, so the report stays small


@dataclass
class ImportReport:
    added: list[DatasetItem] = field(default_factory=list)
    rejected: list[FileMessage] = field(default_factory=list)  # could not be used, with why
    skipped: list[FileMessage] = field(default_factory=list)  # left out on purpose (metadata, duplicates)
    notes: list[FileMessage] = field(default_factory=list)  # used, with something worth knowing
    captions_paired: int = 0

    def lines(self) -> list[str]:
        """A summary, then one line per file left out or worth a note: the first ``REPORT_FILES``,
        and how many more (a zip of thousands of long names would otherwise echo every one)."""
        out = [f"Added {len(self.added)} image(s)" + (f", {self.captions_paired} with captions." if self.captions_paired else ".")]
        files = ([("Rejected", m) for m in self.rejected] + [("Skipped", m) for m in self.skipped]
                 + [("Note", m) for m in self.notes])
        out += [f"{kind} {_shortened(m.source)}: {m.message}" for kind, m in files[:REPORT_FILES]]
        if len(files) > REPORT_FILES:
            out.append(f"…and {len(files) - REPORT_FILES} more file(s) rejected, skipped or noted.")
        return out


def _shortened(source: str, keep: int = 4 * MAX_NAME_LEN) -> str:
    """A name as a report quotes it: a zip entry's name may run to 64 KiB."""
    return source if len(source) <= keep else f"{source[:keep // 2]}…{source[-keep // 2:]}"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    size_bytes: int
    image_count: int
    caption_count: int
    source_bytes: int


# ---------------------------------------------------------------- checks


def dataset_warnings(ds: Dataset, settings: Settings) -> list[str]:
    """Everything worth fixing before training, as short sentences."""
    out: list[str] = []
    n = len(ds.items)
    if n == 0:
        return ["The dataset is empty. Upload images or a .zip to start."]
    if n < settings.recommended_min_images:
        out.append(f"Only {n} image(s): {settings.recommended_min_images} or more are recommended for a good fine-tune.")
    if n > settings.max_images:
        out.append(
            f"{n} images: the hosted service takes at most {settings.max_images}. "
            "Remove some, or train with the local engine."
        )
    small = [i.file for i in ds.items if min(i.width, i.height) < settings.min_short_side]
    if small:
        out.append(f"{len(small)} image(s) under {settings.min_short_side} px on the short side: {_few(small)}. "
                   "Use larger photos if you have them.")
    empty = [i.file for i in ds.items if not i.caption.strip()]
    if empty:
        out.append(f"{len(empty)} empty caption(s): {_few(empty)}. Add captions or use auto-captions.")
    if ds.trigger_word:
        missing = [i.file for i in ds.items if i.caption.strip() and not contains_trigger(i.caption, ds.trigger_word)]
        if missing:
            out.append(f"{len(missing)} caption(s) without the trigger word '{ds.trigger_word}': {_few(missing)}. "
                       "Use 'Put trigger word first'.")
    else:
        out.append("No trigger word set. Pick a short unique word (such as TOK) that will stand for your subject.")
    return out


def _few(names: list[str], k: int = 3) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


# ---------------------------------------------------------------- the store


class DatasetStore:
    """All datasets of one owner under one root folder."""

    def __init__(self, root: Path, settings: Settings, *, clock: Callable[[], float] = time.time,
                 quota: bool = False) -> None:
        """``quota``: a hosted visitor's store, held to ``visitor_max_datasets`` and ``visitor_max_bytes``."""
        self.root = Path(root)
        self.settings = settings
        self.quota = quota
        self._clock = clock
        self._lock = threading.RLock()

    def stored_bytes(self) -> int:
        """Everything this owner keeps here: images, exports, staging."""
        if not self.root.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def _check_room(self, adding: int) -> None:
        if not self.quota:
            return
        used, cap = self.stored_bytes(), self.settings.visitor_max_bytes
        if used + adding > cap:
            raise InputError(
                f"Your datasets use {human_mb(used)} of the {human_mb(cap)} one visitor may keep here, and this "
                f"upload is {human_mb(adding)}.", hint="Delete a dataset or some images first, or upload fewer files.")

    # -- paths and manifest

    def _dir(self, name: str) -> Path:
        if not name or safe_name(name, fallback="") != name:
            raise DatasetError(f"'{name}' is not a valid dataset name.", hint="Pick a dataset from the list.")
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise DatasetError(f"'{name}' is not a valid dataset name.", hint="Pick a dataset from the list.")
        return path

    def _write(self, ds: Dataset) -> None:
        ds.updated_at = self._clock()
        atomic.write_json(ds.path / MANIFEST, ds.to_json(), ensure_ascii=False, indent=1)

    def list_names(self) -> list[str]:
        """Saved datasets, most recently changed first."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            manifest = child / MANIFEST
            if manifest.is_file():
                found.append((manifest.stat().st_mtime, child.name))
        return [name for _, name in sorted(found, reverse=True)]

    def exists(self, name: str) -> bool:
        try:
            return (self._dir(name) / MANIFEST).is_file()
        except DatasetError:
            return False

    def create(self, name: str) -> Dataset:
        base = safe_name(name, fallback="dataset")
        with self._lock:
            cap = self.settings.visitor_max_datasets
            if self.quota and len(self.list_names()) >= cap:
                raise InputError(f"You have {cap} datasets, the most one visitor may keep here.",
                                 hint="Delete one you no longer need (Delete dataset, on the Dataset tab) first.")
            candidate, n = base, 2
            while self.exists(candidate):  # the suffix fits within the longest valid name
                suffix = f"-{n}"
                candidate, n = safe_name(base[:MAX_NAME_LEN - len(suffix)], fallback="dataset") + suffix, n + 1
            now = self._clock()
            ds = Dataset(name=candidate, path=self._dir(candidate), created_at=now, updated_at=now)
            ds.images_dir.mkdir(parents=True, exist_ok=True)
            self._write(ds)
            return ds

    def open(self, name: str) -> Dataset:
        path = self._dir(name)
        manifest = path / MANIFEST
        try:
            raw = json.loads(manifest.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DatasetError(f"Dataset '{name}' was not found.", hint="Pick one from the list or create a new one.") from None
        except (OSError, ValueError) as exc:
            raise DatasetError(
                f"Dataset '{name}' has an unreadable {MANIFEST} ({exc.__class__.__name__}).",
                hint=f"Its images are still in {path / 'images'}; create a new dataset and upload them again.",
            ) from None
        known = DatasetItem.__dataclass_fields__
        items = [DatasetItem(**{k: v for k, v in it.items() if k in known}) for it in raw.get("items", [])]
        return Dataset(
            name=name,
            path=path,
            trigger_word=raw.get("trigger_word", ""),
            items=items,
            created_at=raw.get("created_at", 0.0),
            updated_at=raw.get("updated_at", 0.0),
        )

    def delete(self, name: str) -> None:
        path = self._dir(name)
        with self._lock:
            if not (path / MANIFEST).is_file():
                raise DatasetError(f"Dataset '{name}' was not found.", hint="Refresh the list: it may be gone already.")
            shutil.rmtree(path)

    # -- importing

    def add_files(
        self,
        name: str,
        paths: Sequence[Path | str],
        original_names: Sequence[str] | None = None,
        progress: ProgressFn | None = None,
    ) -> tuple[Dataset, ImportReport]:
        """Add uploaded images, caption files and zips to a dataset; never raises for a bad file."""
        if not paths:
            raise InputError("No files were uploaded.", hint="Choose images (JPG, PNG, WebP) or a .zip, then try again.")
        paths = [Path(p) for p in paths]
        names = list(original_names) if original_names else [p.name for p in paths]
        total_size = sum(p.stat().st_size for p in paths if p.exists())
        if total_size > self.settings.max_upload_bytes:
            raise InputError(
                f"The upload is {human_mb(total_size)}, over the {human_mb(self.settings.max_upload_bytes)} limit.",
                hint="Upload fewer files at a time.",
            )
        self._check_room(total_size)
        # Decoding takes seconds for a big upload: do it outside the store lock, in a staging
        # dir of its own, so captions can be edited and other imports run meanwhile.
        ds = self.open(name)
        staging = ds.path / f".staging-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True, exist_ok=True)
        try:
            collected = collect(paths, names, self.settings, staging / "unzipped")
            report = ImportReport(rejected=collected.rejected, skipped=collected.skipped)
            stems = unique_stems(collected.candidates, {Path(i.file).stem for i in ds.items})
            results = prepare_all(
                [(c.source, s) for c, s in zip(collected.candidates, stems)], staging, self.settings, progress
            )
            with self._lock:
                ds = self.open(name)  # may have changed while we were decoding
                self._merge(ds, collected, stems, results, staging, report)
                self._write(ds)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if not collected.candidates and not report.rejected and not report.skipped:
            report.rejected.append(FileMessage("upload", "no images found; upload JPG, PNG or WebP files or a .zip of them"))
        return ds, report

    def _merge(
        self,
        ds: Dataset,
        collected: Collected,
        stems: list[str],
        results: list[Prepared],
        staging: Path,
        report: ImportReport,
    ) -> None:
        seen = {i.sha256: i.file for i in ds.items}
        used_captions: set[tuple[str, str]] = set()
        ds.images_dir.mkdir(parents=True, exist_ok=True)
        for cand, stem, res in zip(collected.candidates, stems, results):
            if not res.ok:
                report.rejected.append(FileMessage(res.source, res.reason))
                continue
            if res.sha256 in seen:
                (staging / res.file).unlink(missing_ok=True)
                report.skipped.append(FileMessage(res.source, f"exact duplicate of {seen[res.sha256]}; dropped"))
                continue
            final = free_name(res.file, {i.file for i in ds.items})  # another import may have taken it
            os.replace(staging / res.file, ds.images_dir / final)
            seen[res.sha256] = final
            notes = list(res.notes)
            if stem != cand.stem or final != res.file:
                notes.append(f"saved as {final} (name sanitised or already taken)")
            key = (cand.group, cand.stem)
            caption = collected.captions.get(key, "")
            if key in collected.captions:
                used_captions.add(key)
                report.captions_paired += 1
            item = DatasetItem(
                file=final,
                caption=caption,
                width=res.width,
                height=res.height,
                notes="; ".join(notes),
                sha256=res.sha256,
                source=res.source,
                source_bytes=res.source_bytes,
            )
            ds.items.append(item)
            report.added.append(item)
            if notes:
                report.notes.append(FileMessage(res.source, "; ".join(notes)))
        for key, label in collected.caption_sources.items():
            if key not in used_captions:
                report.skipped.append(FileMessage(label, "caption file with no matching image"))

    # -- editing

    def set_captions(self, name: str, captions: dict[str, str]) -> Dataset:
        """Save captions by file name; names not in the dataset are ignored. One too long: none is saved."""
        with self._lock:
            ds = self.open(name)
            new = {i.file: " ".join(str(captions[i.file] or "").split()) for i in ds.items if i.file in captions}
            return self._save_captions(ds, new)

    def map_captions(self, name: str, fn: Callable[[str], str]) -> Dataset:
        """Apply an edit to every caption; one it would make too long: none is changed."""
        with self._lock:
            ds = self.open(name)
            return self._save_captions(ds, {i.file: fn(i.caption) for i in ds.items})

    def _save_captions(self, ds: Dataset, captions: dict[str, str]) -> Dataset:
        check_caption_lengths(captions)
        for item in ds.items:
            if item.file in captions:
                item.caption = captions[item.file]
        self._write(ds)
        return ds

    def set_trigger_word(self, name: str, word: str) -> Dataset:
        word = validate_trigger_word(word)
        with self._lock:
            ds = self.open(name)
            ds.trigger_word = word
            self._write(ds)
            return ds

    def remove_images(self, name: str, files: Iterable[str]) -> Dataset:
        drop = set(files)
        with self._lock:
            ds = self.open(name)
            keep = [i for i in ds.items if i.file not in drop]
            if len(keep) == len(ds.items):
                raise InputError("No image was selected to remove.", hint="Click an image in the gallery first.")
            ds.items = keep
            self._write(ds)  # manifest first: a crash after this leaves an orphan file, not a broken entry
            for f in drop:
                (ds.images_dir / f).unlink(missing_ok=True)
            return ds

    # -- export

    def export_zip(self, name: str) -> ExportResult:
        """Write the training zip (image + same-name .txt caption) and return where it is."""
        with self._lock:
            ds = self.open(name)
            if not ds.items:
                raise InputError("The dataset has no images to export.", hint="Upload images first.")
            out_dir = ds.path / "export"
            out_dir.mkdir(parents=True, exist_ok=True)
            out = out_dir / f"{ds.name}.zip"
            captions = 0
            with atomic.replacing(out) as tmp, zipfile.ZipFile(tmp, "w") as zf:
                for item in ds.items:
                    src = ds.image_path(item.file)
                    if not src.is_file():
                        raise DatasetError(
                            f"Image {item.file} is missing from the dataset folder.",
                            hint="Remove it from the dataset or upload it again.",
                        )
                    # Images are already compressed; deflating them only costs time.
                    zf.write(src, item.file, compress_type=zipfile.ZIP_STORED)
                    if item.caption.strip():
                        zf.writestr(f"{Path(item.file).stem}.txt", item.caption.strip(), compress_type=zipfile.ZIP_DEFLATED)
                        captions += 1
            return ExportResult(
                path=out,
                size_bytes=out.stat().st_size,
                image_count=len(ds.items),
                caption_count=captions,
                source_bytes=sum(i.source_bytes for i in ds.items),
            )


MAX_OPEN_STORES = 4096  # one per recent owner; a store is only a folder and a lock


class DatasetStores:
    """One ``DatasetStore`` per owner, so every request for an owner shares the same lock.

    The local owner keeps the plain ``datasets/`` layout; hosted visitors each get
    ``owners/<unguessable token>/datasets/`` (see services.storage.owners), so one visitor can never
    list, open or download another's.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stores: dict[str, DatasetStore] = {}
        self._lock = threading.Lock()

    def root_for(self, owner: str) -> Path:
        from services.storage.owners import owner_dir

        if not owner:
            raise DatasetError("This session has no identity.", hint="Reload the page.")
        return owner_dir(self.settings, owner) / "datasets"

    def __call__(self, owner: str) -> DatasetStore:
        with self._lock:
            store = self._stores.pop(owner, None)
            if store is None:
                from services.storage.owners import LOCAL_OWNER

                store = DatasetStore(self.root_for(owner), self.settings,
                                     quota=self.settings.hosted and owner != LOCAL_OWNER)
            self._stores[owner] = store  # most recently used last: the oldest goes past MAX_OPEN_STORES
            while len(self._stores) > MAX_OPEN_STORES:
                self._stores.pop(next(iter(self._stores)))
            return store
