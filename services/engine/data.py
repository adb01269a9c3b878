"""The training data: the zip the app exports read back (images and captions, the trigger word put
in), aspect-ratio buckets, and an image as the tensor the VAE takes."""
from __future__ import annotations

import io
import logging
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from services.errors import InputError

log = logging.getLogger("flux_studio.local_engine")

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
# Aspect ratios offered as buckets (w/h).
BUCKET_RATIOS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16)
MAX_DATASET_IMAGES = 200


@dataclass
class Example:
    name: str
    image: object  # PIL.Image (RGB)
    caption: str


def with_trigger(caption: str, trigger: str) -> str:
    from services.storage.captions import contains_trigger  # the app's one rule for trigger words

    caption = " ".join(caption.split())
    if not trigger:
        return caption
    if not caption:
        return trigger
    return caption if contains_trigger(caption, trigger) else f"{trigger}, {caption}"


def read_dataset_zip(zip_path: Path, trigger: str) -> list[Example]:
    """Images and same-name .txt captions from the training zip the app exports."""
    from PIL import Image, ImageOps

    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"The training zip can't be read ({exc}).", hint="Export the dataset again.") from None
    with zf:
        names = [i.filename for i in zf.infolist() if not i.is_dir()]
        usable = [n for n in names if not any(p.startswith((".", "__MACOSX")) for p in PurePosixPath(n).parts)]
        captions = {str(PurePosixPath(n).with_suffix("")): n for n in usable if n.lower().endswith(".txt")}
        out: list[Example] = []
        for n in sorted(usable):
            p = PurePosixPath(n)
            if p.suffix.lower() not in IMAGE_EXTS:
                continue
            try:
                with Image.open(io.BytesIO(zf.read(n))) as im:
                    img = ImageOps.exif_transpose(im).convert("RGB")
            except Exception:
                log.warning("Skipping %s: not a readable image", n)
                continue
            cap_name = captions.get(str(p.with_suffix("")))
            caption = zf.read(cap_name).decode("utf-8", "replace") if cap_name else ""
            out.append(Example(n, img, with_trigger(caption, trigger)))
            if len(out) >= MAX_DATASET_IMAGES:
                break
    if not out:
        raise InputError("The training zip has no usable images.",
                         hint="Add images to the dataset and export it again.")
    return out


def bucket_sizes(resolution: int, step: int) -> list[tuple[int, int]]:
    """(w, h) buckets of about ``resolution``² pixels, sides multiples of ``step``."""
    area = resolution * resolution
    out: list[tuple[int, int]] = []
    for r in BUCKET_RATIOS:
        w = max(step, round(math.sqrt(area * r) / step) * step)
        h = max(step, round(math.sqrt(area / r) / step) * step)
        if (w, h) not in out:
            out.append((w, h))
    return out


def pick_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


def fit(img, size: tuple[int, int]):
    """Scale to cover ``size`` and centre-crop to it."""
    from PIL import Image

    w, h = size
    scale = max(w / img.width, h / img.height)
    nw, nh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    left, top = (nw - w) // 2, (nh - h) // 2
    return img.crop((left, top, left + w, top + h))


def to_pixels(img, device, dtype):
    """PIL RGB -> tensor (1, 3, h, w) in [-1, 1]."""
    import numpy as np
    import torch

    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    return (arr / 127.5 - 1.0).unsqueeze(0).to(device=device, dtype=dtype)
