"""Turning one uploaded file into one training image.

The fast path matters: phone photos are 12+ MP and the training service caps images at
1 MP, so most of the decoded pixels would be thrown away. JPEGs are decoded with Pillow's
draft mode (libjpeg's DCT scaling decodes at 1/2, 1/4 or 1/8 size directly), and the
remaining reduction uses ``reducing_gap`` so Pillow does a cheap integer ``reduce`` first
and only the last step with LANCZOS. This module runs in a pool of threads (Pillow releases
the GIL while decoding and resampling), so everything here is a plain function over
bytes/paths with no shared mutable state.
"""
from __future__ import annotations

import hashlib
import io
import math
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

# Formats the training service takes, plus GIF which we convert (first frame).
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
ACCEPTED_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif")
JPEG_QUALITY = 92

_SRGB = None

# We refuse oversized images ourselves (``max_source_pixels``, checked before decoding), so
# Pillow's own warning between 89 MP and 179 MP is noise. Set once at import: changing
# warning filters per call is process-wide and races between threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class Source:
    """Where the bytes of an upload live: a file on disk (zip entries are extracted first).

    Passing the location (not the bytes) to a worker keeps memory flat: each worker
    reads and decodes one image at a time.
    """

    display_name: str  # what the user recognises: "photo.jpg" or "shoot.zip:folder/photo.jpg"
    path: str

    def read_bytes(self) -> bytes:
        return Path(self.path).read_bytes()


@dataclass(frozen=True)
class Prepared:
    """The outcome for one source: either ``ok`` with the written file, or a reason."""

    source: str
    ok: bool
    reason: str = ""
    file: str = ""  # final file name inside the dataset's images dir
    width: int = 0
    height: int = 0
    original_width: int = 0
    original_height: int = 0
    sha256: str = ""
    source_bytes: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)


class ImageRejected(Exception):
    """A file that cannot become a training image; the message is the per-file reason."""


def target_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest size with the same aspect ratio and at most ``max_pixels``; never upscales."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    new_w = max(1, int(width * scale))
    new_h = max(1, int(height * scale))
    # Rounding can land one pixel over the cap; trim the longer side.
    while new_w * new_h > max_pixels:
        if new_w >= new_h:
            new_w -= 1
        else:
            new_h -= 1
    return new_w, new_h


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _srgb_profile():
    global _SRGB
    if _SRGB is None:
        _SRGB = ImageCms.createProfile("sRGB")
    return _SRGB


def _identify_unsupported(data: bytes) -> str:
    """A reason for bytes Pillow could not open as an accepted format."""
    try:
        with Image.open(io.BytesIO(data)) as other:
            fmt = other.format or "unknown"
        return f"unsupported image format {fmt}; use JPG, PNG or WebP"
    except Exception:
        return "not a readable image: the content is corrupt or not JPG, PNG or WebP, whatever the file name says"


def _to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
    """Any mode → 8-bit RGB, transparency flattened on white, colour profiles honoured."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow's plain convert clips 16-bit values at 255 (a white image); scale instead.
        notes.append("16-bit image converted to 8-bit")
        img = img.convert("I") if mode != "I" else img
        lo, hi = img.getextrema()
        span = max(1, hi - lo) if hi > 255 else 255
        offset = lo if hi > 255 else 0
        img = img.point(lambda v: (v - offset) * 255.0 / span).convert("L")
        mode = "L"
    elif mode == "F":
        img = img.convert("L")
        mode = "L"

    icc = img.info.get("icc_profile")
    if icc and mode in ("RGB", "RGBA", "CMYK", "L", "LA"):
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            out_mode = "RGBA" if mode in ("RGBA", "LA") else "RGB"
            if mode == "LA":
                img = img.convert("RGBA")
                mode = "RGBA"
            if ImageCms.getProfileName(src).strip().lower().startswith("srgb") and mode == out_mode:
                pass  # already sRGB; converting would only cost time
            else:
                if mode == "CMYK":
                    notes.append("CMYK converted to RGB")
                img = ImageCms.profileToProfile(img, src, _srgb_profile(), outputMode=out_mode)
                mode = img.mode
        except Exception:
            # A broken profile should not cost the user the image; fall back to a plain convert.
            notes.append("colour profile unreadable; converted without it")

    if mode == "CMYK":
        notes.append("CMYK converted to RGB")
        return img.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            notes.append("transparency flattened on white")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def prepare_image(
    source: Source,
    out_dir: str,
    out_stem: str,
    *,
    max_pixels: int,
    max_source_pixels: int,
) -> Prepared:
    """Decode, orient, convert, downscale and save one image. Never raises for bad input."""
    try:
        data = source.read_bytes()
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
        return Prepared(source.display_name, False, f"could not be read ({exc.__class__.__name__})")
    except RuntimeError as exc:  # encrypted zip entry
        return Prepared(source.display_name, False, f"could not be read ({exc})")
    try:
        return _prepare_bytes(
            data, source.display_name, Path(out_dir), out_stem,
            max_pixels=max_pixels, max_source_pixels=max_source_pixels,
        )
    except ImageRejected as exc:
        return Prepared(source.display_name, False, str(exc))


def _prepare_bytes(
    data: bytes,
    name: str,
    out_dir: Path,
    out_stem: str,
    *,
    max_pixels: int,
    max_source_pixels: int,
) -> Prepared:
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    notes: list[str] = []
    digest = sha256_of(data)
    try:
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise ImageRejected(_identify_unsupported(data)) from None
    except Image.DecompressionBombError:
        # Pillow's own hard stop (twice its MAX_IMAGE_PIXELS) applies whatever our limit says.
        pillow_limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else max_source_pixels
        raise ImageRejected(
            f"image is too large to open safely (over {min(max_source_pixels, pillow_limit):,} pixels)"
        ) from None
    except Exception as exc:
        raise ImageRejected(f"corrupt image ({exc.__class__.__name__})") from None

    with img:
        fmt = img.format or ""
        orig_w, orig_h = img.size
        if orig_w * orig_h > max_source_pixels:
            raise ImageRejected(
                f"image is too large to open safely ({orig_w}x{orig_h} = {orig_w * orig_h:,} pixels; "
                f"the limit is {max_source_pixels:,})"
            )
        frames = getattr(img, "n_frames", 1)
        if frames > 1:
            notes.append(f"animated ({frames} frames): used the first frame")
        goal_w, goal_h = target_size(orig_w, orig_h, max_pixels)
        if fmt == "JPEG" and (goal_w, goal_h) != (orig_w, orig_h):
            # DCT-domain downscale during decode: never smaller than the goal size.
            img.draft("RGB", (goal_w, goal_h))
        try:
            img.load()
        except Image.DecompressionBombError:
            raise ImageRejected("image is too large to open safely") from None
        except Exception as exc:
            raise ImageRejected(f"corrupt or truncated image ({exc.__class__.__name__}: {exc})") from None
        stored_size = img.size
        try:
            # In place: the copy exif_transpose makes otherwise costs ~5% of the whole pipeline.
            ImageOps.exif_transpose(img, in_place=True)
        except Exception:
            notes.append("EXIF orientation unreadable; kept as stored")
        if img.size != stored_size:
            notes.append("rotated per EXIF orientation")
        rgb = _to_rgb(img, notes)
        # Orientation may have swapped the axes; the pixel cap is orientation-free.
        goal = target_size(*_swap_if(rgb.size, orig_w, orig_h), max_pixels)
        if rgb.size != goal:
            rgb = rgb.resize(goal, Image.Resampling.LANCZOS, reducing_gap=3.0)
            notes.append(f"downscaled from {_oriented_dims(rgb.size, orig_w, orig_h)} to {goal[0]}x{goal[1]}")
        out_ext = ".png" if fmt in ("PNG", "GIF") else ".jpg"
        out_dir.mkdir(parents=True, exist_ok=True)
        out_path = out_dir / f"{out_stem}{out_ext}"
        tmp_path = out_path.with_name(out_path.name + ".part")
        if out_ext == ".png":
            rgb.save(tmp_path, "PNG", optimize=False, compress_level=6)
        else:
            # No optimize=True: it runs single-threaded and costs ~5% of wall time for <1% smaller files.
            rgb.save(tmp_path, "JPEG", quality=JPEG_QUALITY)
        tmp_path.replace(out_path)
        if fmt == "GIF":
            notes.append("GIF converted to PNG")
        elif fmt == "WEBP":
            notes.append("WebP converted to JPG")
        return Prepared(
            source=name,
            ok=True,
            file=out_path.name,
            width=rgb.width,
            height=rgb.height,
            original_width=orig_w,
            original_height=orig_h,
            sha256=digest,
            source_bytes=len(data),
            notes=tuple(notes),
        )


def _swap_if(size: tuple[int, int], orig_w: int, orig_h: int) -> tuple[int, int]:
    """Original dimensions in the orientation of ``size`` (EXIF rotation may swap them)."""
    w, h = size
    if (w >= h) == (orig_w >= orig_h):
        return orig_w, orig_h
    return orig_h, orig_w


def _oriented_dims(size: tuple[int, int], orig_w: int, orig_h: int) -> str:
    w, h = _swap_if(size, orig_w, orig_h)
    return f"{w}x{h}"
