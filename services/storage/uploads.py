"""Uploads → candidate images and captions, then prepared training images.

An upload is any mix of image files, caption files (``<stem>.txt``) and zips of both. Collecting
sorts it out and streams zip entries to disk under the caps in ``Settings`` (size, entry count,
inflation ratio, total inflated size), so a hostile zip costs neither memory nor disk; preparing
turns each candidate into a training image on a pool of threads. Nothing here raises for a bad
file: each one comes back as a ``FileMessage`` saying why it was left out.
"""
from __future__ import annotations

import codecs
import re
import unicodedata
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from services.config import THREAD_PREFIX, Settings
from services.storage.captions import caption_too_long
from services.storage.images import Prepared, Source, prepare_image

ProgressFn = Callable[[int, int, str], None]

MAX_CAPTION_BYTES = 64 * 1024
_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class FileMessage:
    source: str
    message: str


def human_mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


# ---------------------------------------------------------------- names


MAX_NAME_LEN = 64  # a file or dataset name, as safe_name makes it


def safe_name(raw: str, *, fallback: str = "image", max_len: int = MAX_NAME_LEN) -> str:
    """ASCII, filesystem- and zip-safe version of a user-supplied name.

    Accents are folded (``café`` → ``cafe``); anything else outside ``[A-Za-z0-9._-]``
    becomes ``_``. A name with nothing usable left (all CJK, say) gets ``fallback``.
    """
    folded = unicodedata.normalize("NFKD", raw)
    folded = "".join(c for c in folded if not unicodedata.combining(c))
    cleaned = _NAME_RE.sub("_", folded).strip("._-")
    cleaned = re.sub(r"_+", "_", cleaned)[:max_len].strip("._-")
    return cleaned or fallback


# ---------------------------------------------------------------- reading zips and caption files


def _decode_zip_name(info: zipfile.ZipInfo) -> str:
    """Zip names without the UTF-8 flag are cp437 by spec, but many tools write UTF-8 anyway."""
    if info.flag_bits & 0x800:
        return info.filename
    try:
        return info.filename.encode("cp437").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return info.filename


def _unsafe_zip_path(name: str) -> bool:
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return True
    parts = re.split(r"[\\/]+", name)
    return any(p == ".." for p in parts)


def _is_hidden_or_metadata(name: str) -> bool:
    parts = [p for p in re.split(r"[\\/]+", name) if p]
    return any(p == "__MACOSX" or p.startswith(".") for p in parts) or (parts and parts[-1] in {"Thumbs.db", "desktop.ini"})


def _read_caption(data: bytes) -> str:
    """A caption file's text: UTF-8 (with or without a BOM), UTF-16 only when its BOM says so,
    else Windows-1252/Latin-1. Trying UTF-16 without a BOM would accept any even-length bytes
    and turn ``caf\xe9`` into CJK."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = data.decode("utf-16", errors="replace")
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            try:
                text = data.decode("cp1252")
            except UnicodeDecodeError:  # the five bytes cp1252 leaves undefined
                text = data.decode("latin-1")
    return " ".join(text.split())


# ---------------------------------------------------------------- collecting sources


@dataclass
class Candidate:
    source: Source
    group: str  # folder key used to pair captions: "<upload>|<folder>"
    stem: str


@dataclass
class Collected:
    candidates: list[Candidate] = field(default_factory=list)
    captions: dict[tuple[str, str], str] = field(default_factory=dict)
    caption_sources: dict[tuple[str, str], str] = field(default_factory=dict)
    rejected: list[FileMessage] = field(default_factory=list)
    skipped: list[FileMessage] = field(default_factory=list)

    def add_caption(self, key: tuple[str, str], label: str, text: str) -> None:
        """A caption file's text, paired by ``key`` (group, stem); one too long is refused with its reason
        (its image is still added, uncaptioned)."""
        too_long = caption_too_long(text)
        if too_long:
            self.rejected.append(FileMessage(label, f"the caption is {too_long}; left out (its image is added "
                                                    "without it): shorten it, then type it in the captions table"))
            return
        self.captions[key] = text
        self.caption_sources[key] = label


def collect(paths: Sequence[Path], original_names: Sequence[str], settings: Settings,
            unzip_dir: Path) -> Collected:
    """Sort the upload into images and captions. Zip entries are extracted once, streamed into
    ``unzip_dir`` under caps, so that no worker re-opens a zip and nothing is held whole in memory."""
    out = Collected()
    for path, shown in zip(paths, original_names):
        try:
            size = path.stat().st_size
        except OSError:
            out.rejected.append(FileMessage(shown, "the upload could not be found; upload it again"))
            continue
        ext = Path(shown).suffix.lower()
        if ext == ".zip" or (size and ext not in (".txt",) and zipfile.is_zipfile(path)):
            _collect_zip(path, shown, size, settings, out, unzip_dir)
            continue
        if _is_hidden_or_metadata(shown):
            out.skipped.append(FileMessage(shown, "hidden or system file"))
            continue
        stem = Path(shown).stem
        if ext == ".txt":
            if size > MAX_CAPTION_BYTES:
                out.rejected.append(FileMessage(shown, f"caption file is too large ({size:,} bytes)"))
                continue
            out.add_caption(("upload|", stem), shown, _read_caption(path.read_bytes()))
            continue
        if size == 0:
            out.rejected.append(FileMessage(shown, "empty file (0 bytes)"))
            continue
        out.candidates.append(Candidate(Source(shown, str(path)), "upload|", stem))
    return out


def _collect_zip(path: Path, shown: str, size: int, settings: Settings, out: Collected, unzip_dir: Path) -> None:
    if size == 0:
        out.rejected.append(FileMessage(shown, "empty zip (0 bytes)"))
        return
    if size > settings.max_zip_bytes:
        out.rejected.append(FileMessage(
            shown,
            f"zip is {human_mb(size)}, over the {human_mb(settings.max_zip_bytes)} limit; "
            "split it into smaller zips or upload the images directly",
        ))
        return
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        out.rejected.append(FileMessage(shown, "not a valid zip (corrupt or truncated); re-create it and upload again"))
        return
    with zf:
        entries = [info for info in zf.infolist() if not info.is_dir()]
        if len(entries) > settings.max_zip_entries:
            out.rejected.append(FileMessage(shown, (
                f"the zip holds {len(entries):,} files, over the limit of {settings.max_zip_entries:,}; "
                "a training set needs a few dozen images: zip only those")))
            return
        unzip_dir.mkdir(parents=True, exist_ok=True)
        inflated = 0
        for number, info in enumerate(entries):
            name = _decode_zip_name(info)
            label = f"{shown}:{name}"
            if _unsafe_zip_path(name):
                out.rejected.append(FileMessage(label, "unsafe path in zip (absolute or '..'); skipped"))
                continue
            if _is_hidden_or_metadata(name):
                out.skipped.append(FileMessage(label, "hidden or macOS metadata file"))
                continue
            if info.flag_bits & 0x1:
                out.rejected.append(FileMessage(label, "encrypted zip entry; zip it again without a password"))
                continue
            if info.compress_size and info.file_size > settings.max_zip_ratio * info.compress_size:
                out.rejected.append(FileMessage(label, (
                    f"it inflates {info.file_size // info.compress_size:,} times over, far more than any photo "
                    "(a zip bomb?); skipped")))
                continue
            pure = PurePosixPath(name.replace("\\", "/"))
            group = f"{shown}|{pure.parent}"
            is_caption = pure.suffix.lower() == ".txt"
            limit = MAX_CAPTION_BYTES if is_caption else settings.max_zip_entry_bytes
            if info.file_size > limit:
                what = "caption file" if is_caption else "file"
                out.rejected.append(FileMessage(label, f"{what} is too large ({info.file_size:,} bytes)"))
                continue
            if info.file_size == 0 and not is_caption:
                out.rejected.append(FileMessage(label, "empty file (0 bytes)"))
                continue
            dest = unzip_dir / f"{number:05d}{pure.suffix.lower()[:8]}"
            try:
                written = _extract(zf, info, dest, min(limit, settings.max_unzipped_bytes - inflated))
            except (zipfile.BadZipFile, OSError, EOFError, ValueError):
                out.rejected.append(FileMessage(label, "corrupt zip entry; re-create the zip and upload again"))
                continue
            if written is None:
                dest.unlink(missing_ok=True)
                out.rejected.append(FileMessage(label, (
                    f"the zip expands to more than {human_mb(settings.max_unzipped_bytes)}, or this entry is "
                    "bigger than it says; this and the remaining entries were not read")))
                return
            inflated += written
            if is_caption:
                out.add_caption((group, pure.stem), label, _read_caption(dest.read_bytes()))
                dest.unlink()
                continue
            out.candidates.append(Candidate(Source(label, str(dest)), group, pure.stem))


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, limit: int) -> int | None:
    """Stream one entry to ``dest``; the bytes written, or None past ``limit`` (headers can lie)."""
    written = 0
    with zf.open(info) as src, open(dest, "wb") as out:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > limit:
                return None
            out.write(chunk)
    return written


# ---------------------------------------------------------------- preparing


def unique_stems(candidates: list[Candidate], taken: set[str]) -> list[str]:
    stems = []
    used = {s.lower() for s in taken}
    for c in candidates:
        base = safe_name(c.stem)
        stem, n = base, 2
        while stem.lower() in used:
            stem, n = f"{base}-{n}", n + 1
        used.add(stem.lower())
        stems.append(stem)
    return stems


def free_name(file: str, taken: set[str]) -> str:
    """``file``, or ``stem-N.ext`` if its stem is taken (captions pair by stem, so stems must be unique)."""
    stem, ext = Path(file).stem, Path(file).suffix
    taken_stems = {Path(t).stem.lower() for t in taken}
    candidate, n = stem, 2
    while candidate.lower() in taken_stems:
        candidate, n = f"{stem}-{n}", n + 1
    return candidate + ext


def prepare_all(
    jobs: list[tuple[Source, str]],
    out_dir: Path,
    settings: Settings,
    progress: ProgressFn | None = None,
) -> list[Prepared]:
    """Prepare many images with a pool of workers; results in input order.

    Threads, not processes: Pillow releases the GIL while decoding, resampling and
    encoding, so threads use every core without pickling or process start-up (see
    benchmarks/dataset_prep.py). Each worker holds one image at a time.
    """
    total = len(jobs)
    results: list[Prepared | None] = [None] * total
    max_pixels = int(settings.target_megapixels * 1_000_000)

    def run(i: int) -> tuple[int, Prepared]:
        src, stem = jobs[i]
        return i, prepare_image(src, str(out_dir), stem, max_pixels=max_pixels, max_source_pixels=settings.max_image_pixels)

    workers = max(1, min(settings.worker_count, total))
    done = 0
    if progress:
        progress(0, total, "Preparing images")
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{THREAD_PREFIX}prep") as pool:
        for fut in as_completed([pool.submit(run, i) for i in range(total)]):
            i, res = fut.result()
            results[i] = res
            done += 1
            if progress:
                progress(done, total, f"Prepared {res.source}")
    return [r for r in results if r is not None]
