"""Test images made in code: good photos and every kind of bad input the Dataset tab must survive.

``python -m tests.imagefactory OUT_DIR`` writes the whole set, for trying the app by hand.
"""
from __future__ import annotations

import io
import random
import struct
import sys
import zipfile
import zlib
from pathlib import Path

from PIL import Image, ImageDraw


def photo(width: int = 1600, height: int = 1200, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: gradients and shapes so JPEG sizes are realistic."""
    rng = random.Random(seed)
    img = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    tint = Image.new("RGB", (width, height), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    img = Image.blend(img, tint, 0.5)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randrange(20, max(21, min(width, height) // 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    noise = Image.effect_noise((width, height), 24).convert("RGB")
    return Image.blend(img, noise, 0.15)


def jpeg_bytes(img: Image.Image, quality: int = 90, exif_orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    kwargs = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    img.save(buf, "JPEG", quality=quality, **kwargs)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A tiny PNG whose header claims a huge size: decoding it would need gigabytes."""
    data = bytearray(png_bytes(Image.new("RGB", (8, 8))))
    # IHDR starts at byte 8: length(4) type(4) width(4) height(4) ... crc(4)
    struct.pack_into(">II", data, 16, width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    struct.pack_into(">I", data, 29, crc)
    return bytes(data)


def animated(fmt: str, frames: int = 3) -> bytes:
    imgs = [Image.new("RGB", (640, 640), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)][:frames]]
    buf = io.BytesIO()
    imgs[0].save(buf, fmt, save_all=True, append_images=imgs[1:], duration=100, loop=0)
    return buf.getvalue()


def sixteen_bit_png() -> bytes:
    img = Image.linear_gradient("L").resize((700, 600)).convert("I")
    img = img.point(lambda v: v * 257)  # full 16-bit range
    buf = io.BytesIO()
    img.convert("I;16").save(buf, "PNG")
    return buf.getvalue()


def cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    photo(900, 700, seed=7).convert("CMYK").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)
            zf.writestr(info, data)
    return buf.getvalue()


def good_set(out: Path, count: int = 6, size: tuple[int, int] = (1600, 1200)) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        p = out / f"photo_{i:02d}.jpg"
        p.write_bytes(jpeg_bytes(photo(*size, seed=i)))
        paths.append(p)
    return paths


# A tiny training set: small photos of several aspect ratios, with captions (one with the trigger word).
TRAINING_CAPTIONS = ["a red ball on green grass", "TOK, a blue cup on a table", "a small dog in the city",
                     "a cat on the beach"]
TRAINING_SIZES = [(160, 120), (120, 160), (128, 128), (200, 112)]


def training_zip(path: Path, count: int = 4) -> Path:
    """A few small photos with same-name captions, as the Dataset tab exports them (for the tiny models)."""
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(count):
            zf.writestr(f"img_{i}.jpg", jpeg_bytes(photo(*TRAINING_SIZES[i % 4], seed=i)))
            zf.writestr(f"img_{i}.txt", TRAINING_CAPTIONS[i % 4])
    return path


def bad_set(out: Path) -> dict[str, Path]:
    """Every bad input from the Dataset issue, by a short key. Loose files plus zips."""
    out.mkdir(parents=True, exist_ok=True)
    good = jpeg_bytes(photo(1024, 768, seed=1))
    files: dict[str, bytes] = {
        "corrupt": ("corrupt.jpg", good[:200] + bytes(random.Random(3).randrange(256) for _ in range(3000))),
        "truncated": ("truncated.jpg", good[: len(good) // 2]),
        "not_image": ("notes.jpg", b"This is a shopping list, not a photo.\n" * 20),
        "zero": ("empty.jpg", b""),
        "bomb": ("bomb.png", bomb_png()),
        "unicode": ("café_日本.jpg", jpeg_bytes(photo(800, 800, seed=2))),
        "cmyk": ("cmyk.jpg", cmyk_jpeg()),
        "sixteen": ("depth16.png", sixteen_bit_png()),
        "gif": ("anim.gif", animated("GIF")),
        "webp": ("anim.webp", animated("WEBP")),
        "bmp": ("old.bmp", _bmp()),
        "rotated": ("rotated.jpg", jpeg_bytes(photo(1200, 800, seed=4), exif_orientation=6)),
        "rgba": ("logo.png", png_bytes(Image.new("RGBA", (700, 700), (0, 0, 255, 80)))),
    }
    paths = {}
    for key, (name, data) in files.items():
        p = out / name
        p.write_bytes(data)
        paths[key] = p
    twin = jpeg_bytes(photo(900, 700, seed=9))
    paths["zip_tricky"] = out / "tricky.zip"
    paths["zip_tricky"].write_bytes(zip_bytes({
        "../escape.jpg": jpeg_bytes(photo(600, 600, seed=5)),
        "/abs/evil.jpg": jpeg_bytes(photo(600, 600, seed=6)),
        "__MACOSX/._a.jpg": b"\x00\x05\x16\x07 resource fork",
        "set/.DS_Store": b"\x00\x00\x00\x01Bud1",
        "set/.hidden.jpg": jpeg_bytes(photo(600, 600, seed=8)),
        "a/img.jpg": twin,
        "a/img.txt": "a red ball on grass".encode(),
        "b/img.jpg": jpeg_bytes(photo(900, 700, seed=10)),
        "b/img.txt": "a blue ball on sand".encode(),
        "c/img.jpg": twin,  # exact duplicate of a/img.jpg
        "ünï/façade.jpg": jpeg_bytes(photo(900, 700, seed=11)),
        "orphan.txt": b"no image for me",
    }))
    return paths


def _bmp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (600, 600), (10, 200, 10)).save(buf, "BMP")
    return buf.getvalue()


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "sample-inputs")
    good_set(target / "good")
    bad_set(target / "bad")
    print(f"Wrote sample inputs to {target}/good and {target}/bad")
