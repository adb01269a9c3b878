"""The dataset service: processing rules, every bad input, captions, persistence, export."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from services.config import Settings
from services.storage.captions import add_affixes, find_replace, trigger_first, validate_trigger_word
from services.storage.datasets import REPORT_FILES, DatasetStore, dataset_warnings
from services.storage.uploads import MAX_NAME_LEN, safe_name
from services.errors import DatasetError, InputError
from services.storage.images import target_size
from tests import imagefactory as fx


def _messages(report, kind: str) -> dict[str, str]:
    return {m.source: m.message for m in getattr(report, kind)}


def _files_under(root: Path) -> set[Path]:
    return {p.resolve() for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- processing rules


def test_target_size_caps_pixels_keeps_aspect_never_upscales():
    assert target_size(800, 600, 1_000_000) == (800, 600)
    w, h = target_size(4000, 3000, 1_000_000)
    assert w * h <= 1_000_000 and w * h > 990_000
    assert abs(w / h - 4 / 3) < 0.01
    w, h = target_size(1000, 8000, 1_000_000)
    assert w * h <= 1_000_000 and abs(h / w - 8) < 0.05


def test_large_jpeg_downscaled_to_one_megapixel(store, tmp_path):
    src = tmp_path / "big.jpg"
    src.write_bytes(fx.jpeg_bytes(fx.photo(4032, 3024)))
    ds, report = store.add_files(store.create("s").name, [src])
    item = ds.items[0]
    assert item.width * item.height <= 1_000_000
    assert item.width * item.height > 950_000
    assert abs(item.width / item.height - 4032 / 3024) < 0.01
    with Image.open(ds.image_path(item.file)) as img:
        assert img.size == (item.width, item.height) and img.mode == "RGB"
    assert "downscaled from 4032x3024" in item.notes


def test_small_image_not_upscaled(store, tmp_path):
    src = tmp_path / "small.jpg"
    src.write_bytes(fx.jpeg_bytes(fx.photo(300, 200)))
    ds, _ = store.add_files(store.create("s").name, [src])
    assert (ds.items[0].width, ds.items[0].height) == (300, 200)


def test_exif_orientation_applied(store, tmp_path):
    src = tmp_path / "rot.jpg"
    src.write_bytes(fx.jpeg_bytes(fx.photo(1200, 800), exif_orientation=6))  # 90° clockwise
    ds, _ = store.add_files(store.create("s").name, [src])
    assert (ds.items[0].width, ds.items[0].height) == (800, 1200)
    assert "rotated per EXIF" in ds.items[0].notes


def test_transparency_flattened_on_white(store, tmp_path):
    src = tmp_path / "logo.png"
    img = Image.new("RGBA", (600, 600), (0, 0, 0, 0))
    img.paste((255, 0, 0, 255), (200, 200, 400, 400))
    img.save(src)
    ds, _ = store.add_files(store.create("s").name, [src])
    with Image.open(ds.image_path(ds.items[0].file)) as out:
        assert out.mode == "RGB"
        assert out.getpixel((10, 10)) == (255, 255, 255)
        assert out.getpixel((300, 300)) == (255, 0, 0)


def test_exact_duplicates_dropped_with_note(store, tmp_path):
    data = fx.jpeg_bytes(fx.photo(800, 600))
    (tmp_path / "a.jpg").write_bytes(data)
    (tmp_path / "copy_of_a.jpg").write_bytes(data)
    name = store.create("s").name
    ds, report = store.add_files(name, [tmp_path / "a.jpg", tmp_path / "copy_of_a.jpg"])
    assert [i.file for i in ds.items] == ["a.jpg"]
    assert "duplicate of a.jpg" in _messages(report, "skipped")["copy_of_a.jpg"]
    # Uploading it again later is also caught.
    ds, report = store.add_files(name, [tmp_path / "copy_of_a.jpg"])
    assert len(ds.items) == 1 and report.skipped


def test_same_name_captions_pair_up_and_names_kept(store, tmp_path):
    (tmp_path / "dog 1.jpg").write_bytes(fx.jpeg_bytes(fx.photo(700, 700, seed=1)))
    (tmp_path / "dog 1.txt").write_text("TOK dog on a sofa\n")
    ds, report = store.add_files(store.create("s").name, [tmp_path / "dog 1.jpg", tmp_path / "dog 1.txt"])
    assert ds.items[0].file == "dog_1.jpg"
    assert ds.items[0].caption == "TOK dog on a sofa"
    assert report.captions_paired == 1


# ---------------------------------------------------------------- bad input, one test each


@pytest.fixture
def bad(tmp_path) -> dict[str, Path]:
    return fx.bad_set(tmp_path / "bad")


def _add_one(store, path: Path):
    return store.add_files(store.create("s").name, [path])


def test_corrupt_image_rejected(store, bad):
    ds, report = _add_one(store, bad["corrupt"])
    assert ds.items == []
    assert "corrupt" in _messages(report, "rejected")["corrupt.jpg"]


def test_truncated_image_rejected(store, bad):
    ds, report = _add_one(store, bad["truncated"])
    assert ds.items == []
    assert "truncated" in _messages(report, "rejected")["truncated.jpg"]


def test_non_image_renamed_jpg_rejected(store, bad):
    ds, report = _add_one(store, bad["not_image"])
    assert ds.items == []
    assert "not a readable image" in _messages(report, "rejected")["notes.jpg"]


def test_zero_byte_file_rejected(store, bad):
    ds, report = _add_one(store, bad["zero"])
    assert _messages(report, "rejected")["empty.jpg"] == "empty file (0 bytes)"


def test_decompression_bomb_refused_before_decoding(store, bad):
    ds, report = _add_one(store, bad["bomb"])
    assert ds.items == []
    assert "too large to open safely" in _messages(report, "rejected")["bomb.png"]


def test_big_but_allowed_image_is_not_called_a_bomb(store):
    # 90 MP is over Pillow's warning threshold but under our 120 MP limit: the header is fine,
    # the (fake) pixel data is not, so the reason must be corruption, not size.
    path = store.root.parent / "big.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(fx.bomb_png(10_000, 9_000))
    ds, report = _add_one(store, path)
    reason = _messages(report, "rejected")["big.png"]
    assert "too large" not in reason and "corrupt" in reason


def test_own_pixel_limit_applies(tmp_path):
    settings = Settings(data_dir=tmp_path / "d", max_image_pixels=1_000_000)
    store = DatasetStore(settings.datasets_dir, settings)
    path = tmp_path / "a.jpg"
    path.write_bytes(fx.jpeg_bytes(fx.photo(1200, 1000)))
    ds, report = store.add_files(store.create("s").name, [path])
    assert "1200x1000 = 1,200,000 pixels; the limit is 1,000,000" in _messages(report, "rejected")["a.jpg"]


def test_unsupported_format_named(store, bad):
    ds, report = _add_one(store, bad["bmp"])
    assert "unsupported image format BMP" in _messages(report, "rejected")["old.bmp"]


def test_unicode_name_sanitised(store, bad):
    ds, report = _add_one(store, bad["unicode"])
    assert ds.items[0].file == "cafe.jpg"
    assert ds.items[0].source == "café_日本.jpg"


def test_all_non_latin_name_gets_fallback(store, tmp_path):
    p = tmp_path / "日本.jpg"
    p.write_bytes(fx.jpeg_bytes(fx.photo(600, 600)))
    ds, _ = _add_one(store, p)
    assert ds.items[0].file == "image.jpg"


def test_cmyk_converted(store, bad):
    ds, _ = _add_one(store, bad["cmyk"])
    with Image.open(ds.image_path(ds.items[0].file)) as img:
        assert img.mode == "RGB"
    assert "CMYK" in ds.items[0].notes


def test_sixteen_bit_scaled_not_clipped(store, bad):
    ds, _ = _add_one(store, bad["sixteen"])
    with Image.open(ds.image_path(ds.items[0].file)) as img:
        assert img.mode == "RGB"
        lo, hi = img.convert("L").getextrema()
        # A naive convert clips 16-bit values to 255: an all-white picture.
        assert lo < 30 and hi > 220
    assert "16-bit" in ds.items[0].notes


@pytest.mark.parametrize("key,name", [("gif", "anim.gif"), ("webp", "anim.webp")])
def test_animated_first_frame_with_note(store, bad, key, name):
    ds, _ = _add_one(store, bad[key])
    item = ds.items[0]
    assert "animated (3 frames): used the first frame" in item.notes
    with Image.open(ds.image_path(item.file)) as img:
        r, g, b = img.convert("RGB").getpixel((320, 320))
        assert r > 200 and g < 60 and b < 60  # the first frame is red


def test_empty_upload_refused(store):
    with pytest.raises(InputError, match="No files were uploaded"):
        store.add_files(store.create("s").name, [])


def test_zip_over_size_limit_refused(tmp_path, bad):
    settings = Settings(data_dir=tmp_path / "d", max_zip_bytes=1024)
    store = DatasetStore(settings.datasets_dir, settings)
    ds, report = store.add_files(store.create("s").name, [bad["zip_tricky"]])
    assert ds.items == []
    assert "over the" in _messages(report, "rejected")["tricky.zip"]


def test_zip_bomb_stops_reading(tmp_path):
    # The ratio check would refuse this entry first; switched off, the running total stops it.
    settings = Settings(data_dir=tmp_path / "d", max_unzipped_bytes=2 * 2**20, max_zip_ratio=10**6)
    store = DatasetStore(settings.datasets_dir, settings)
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("huge.jpg", b"\0" * (8 * 2**20))
    ds, report = store.add_files(store.create("s").name, [z])
    assert ds.items == []
    assert "expands to more than" in " ".join(m.message for m in report.rejected)


def test_corrupt_zip_rejected(store, tmp_path):
    z = tmp_path / "broken.zip"
    z.write_bytes(b"PK\x03\x04 this is not really a zip")
    ds, report = _add_one(store, z)
    assert "not a valid zip" in _messages(report, "rejected")["broken.zip"]


def test_tricky_zip(store, bad, settings, tmp_path):
    before = _files_under(tmp_path)
    ds, report = _add_one(store, bad["zip_tricky"])
    rejected, skipped = _messages(report, "rejected"), _messages(report, "skipped")
    # Path traversal entries are refused, and nothing is written outside the data dir.
    assert "unsafe path" in rejected["tricky.zip:../escape.jpg"]
    assert "unsafe path" in rejected["tricky.zip:/abs/evil.jpg"]
    new_files = _files_under(tmp_path) - before
    data_dir = settings.data_dir.resolve()
    assert new_files and all(p.is_relative_to(data_dir) for p in new_files)
    assert not (tmp_path / "bad" / "escape.jpg").exists()
    # macOS metadata and hidden files are skipped quietly with a reason.
    assert "macOS metadata" in skipped["tricky.zip:__MACOSX/._a.jpg"]
    assert "tricky.zip:set/.DS_Store" in skipped and "tricky.zip:set/.hidden.jpg" in skipped
    # Same name in two folders: both kept under unique names, each with its own caption.
    captions = {i.file: i.caption for i in ds.items}
    assert captions["img.jpg"] == "a red ball on grass"
    assert captions["img-2.jpg"] == "a blue ball on sand"
    # c/img.jpg has the same bytes as a/img.jpg.
    assert "duplicate of img.jpg" in skipped["tricky.zip:c/img.jpg"]
    # Unicode folder and file names inside the zip.
    assert "facade.jpg" in captions
    assert "no matching image" in skipped["tricky.zip:orphan.txt"]
    assert sorted(captions) == ["facade.jpg", "img-2.jpg", "img.jpg"]


def test_whole_bad_set_at_once_keeps_the_good(store, bad):
    ds, report = store.add_files(store.create("s").name, list(bad.values()))
    assert len(ds.items) == 10  # 7 loose + 3 from the zip (its duplicate dropped)
    assert len(report.rejected) == 8
    for item in ds.items:
        with Image.open(ds.image_path(item.file)) as img:
            img.load()
            assert img.mode == "RGB" and img.width * img.height <= 1_000_000


def test_failed_import_loses_nothing(store, tmp_path):
    good = fx.good_set(tmp_path / "g", count=2, size=(640, 480))
    name = store.create("s").name
    store.add_files(name, good)
    store.set_captions(name, {"photo_00.jpg": "keep me"})
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"junk")
    ds, report = store.add_files(name, [junk])
    assert [i.file for i in ds.items] == ["photo_00.jpg", "photo_01.jpg"]
    assert ds.items[0].caption == "keep me"
    assert not list(ds.path.glob(".staging*"))


# ---------------------------------------------------------------- captions and checks


def test_trigger_first_is_idempotent_and_moves_word():
    assert trigger_first("a photo of TOK on a bike", "TOK") == "TOK, a photo of on a bike"
    assert trigger_first("TOK, a man", "TOK") == "TOK, a man"
    assert trigger_first("", "TOK") == "TOK"
    assert trigger_first("TOKEN ring", "TOK") == "TOK, TOKEN ring"
    once = trigger_first("red car", "TOK")
    assert trigger_first(once, "TOK") == once == "TOK, red car"


def test_find_replace_and_affixes():
    assert find_replace("a red car", "red", "blue") == "a blue car"
    assert find_replace("a red car", "", "x") == "a red car"
    assert add_affixes("car", "photo of ", ", 4k") == "photo of car, 4k"
    assert add_affixes("photo of car, 4k", "photo of ", ", 4k") == "photo of car, 4k"


@pytest.mark.parametrize("word", ["", "two words", "x" * 41, "bad!"])
def test_trigger_word_validation(word):
    with pytest.raises(InputError):
        validate_trigger_word(word)


def test_warnings_cover_every_rule(store, tmp_path, settings):
    paths = fx.good_set(tmp_path / "g", count=3, size=(640, 400))
    name = store.create("s").name
    ds, _ = store.add_files(name, paths)
    store.set_trigger_word(name, "TOK")
    ds = store.set_captions(name, {"photo_00.jpg": "TOK, a cup", "photo_01.jpg": "a cup"})
    text = " ".join(dataset_warnings(ds, settings))
    assert "Only 3 image(s)" in text
    assert "under 512 px" in text
    assert "1 empty caption" in text and "photo_02.jpg" in text
    assert "without the trigger word 'TOK': photo_01.jpg" in text
    many = Settings(data_dir=settings.data_dir, max_images=2)
    assert any("at most 2" in w for w in dataset_warnings(ds, many))


def test_no_warnings_for_a_good_set(store, tmp_path, settings):
    name = store.create("s").name
    ds, _ = store.add_files(name, fx.good_set(tmp_path / "g", count=6, size=(800, 800)))
    store.set_trigger_word(name, "TOK")
    ds = store.map_captions(name, lambda c: trigger_first("a mug", "TOK"))
    assert dataset_warnings(ds, settings) == []


# ---------------------------------------------------------------- persistence and export


def test_reopen_after_restart(settings, tmp_path):
    store = DatasetStore(settings.datasets_dir, settings)
    name = store.create("Product shots").name
    store.add_files(name, fx.good_set(tmp_path / "g", count=2, size=(640, 480)))
    store.set_trigger_word(name, "MUG")
    store.set_captions(name, {"photo_01.jpg": "MUG on a desk"})
    again = DatasetStore(settings.datasets_dir, settings)  # a new process would build this
    assert again.list_names() == ["Product_shots"]
    ds = again.open("Product_shots")
    assert ds.trigger_word == "MUG"
    assert {i.file: i.caption for i in ds.items} == {"photo_00.jpg": "", "photo_01.jpg": "MUG on a desk"}
    manifest = json.loads((ds.path / "dataset.json").read_text())
    assert manifest["items"][1]["caption"] == "MUG on a desk"


def test_dataset_names_cannot_escape(store):
    for bad_name in ["../x", "/etc", "a/b", ".."]:
        with pytest.raises(DatasetError):
            store.open(bad_name)
    assert safe_name("../../etc/passwd") == "etc_passwd"
    assert store.create("../../evil").path.resolve().is_relative_to(store.root.resolve())


def test_create_never_overwrites(store):
    assert store.create("a").name == "a"
    assert store.create("a").name == "a-2"


def test_create_numbers_a_longest_name_within_the_limit(store):
    """A taken 64-character name is numbered by shortening it, not by growing past the limit
    (that made '…-2 is not a valid dataset name')."""
    longest = "a" * MAX_NAME_LEN
    assert store.create(longest).name == longest
    second, third = store.create(longest).name, store.create(longest + " and more").name
    assert (second, third) == ("a" * (MAX_NAME_LEN - 2) + "-2", "a" * (MAX_NAME_LEN - 2) + "-3")
    assert [store.open(n).name for n in (second, third)] == [second, third]


def test_import_report_names_a_few_files_and_counts_the_rest(store, tmp_path):
    """A zip of many long names: the report names the first REPORT_FILES, shortened, and counts the
    others, instead of echoing every name (12 MB for a zip of 5,000)."""
    z = tmp_path / "long.zip"
    names = [f"{i:03d}_" + "n" * 2000 + ".jpg" for i in range(300)]
    with zipfile.ZipFile(z, "w") as zf:
        for name in names:
            zf.writestr(name, b"")  # empty: each one is rejected, with its name
    _, report = store.add_files(store.create("s").name, [z])
    assert len(report.rejected) == 300  # the record keeps every file
    lines = report.lines()
    assert len(lines) == 1 + REPORT_FILES + 1
    assert lines[1].startswith("Rejected long.zip:000_nnn") and lines[1].endswith("nnn.jpg: empty file (0 bytes)")
    assert lines[-1] == f"…and {300 - REPORT_FILES} more file(s) rejected, skipped or noted."
    assert sum(map(len, lines)) < 20 * 1024


def test_remove_image(store, tmp_path):
    name = store.create("s").name
    ds, _ = store.add_files(name, fx.good_set(tmp_path / "g", count=2, size=(640, 480)))
    ds = store.remove_images(name, ["photo_00.jpg"])
    assert [i.file for i in ds.items] == ["photo_01.jpg"]
    assert not (ds.images_dir / "photo_00.jpg").exists()
    with pytest.raises(InputError):
        store.remove_images(name, ["nope.jpg"])


def test_export_zip_pairs_captions(store, tmp_path):
    name = store.create("s").name
    store.add_files(name, fx.good_set(tmp_path / "g", count=3, size=(2000, 1500)))
    store.set_captions(name, {"photo_00.jpg": "TOK, one", "photo_02.jpg": "TOK, three"})
    result = store.export_zip(name)
    with zipfile.ZipFile(result.path) as zf:
        names = sorted(zf.namelist())
        assert names == ["photo_00.jpg", "photo_00.txt", "photo_01.jpg", "photo_02.jpg", "photo_02.txt"]
        assert zf.read("photo_02.txt").decode() == "TOK, three"
        assert zf.testzip() is None
    assert result.image_count == 3 and result.caption_count == 2
    assert result.size_bytes == result.path.stat().st_size
    assert result.size_bytes < result.source_bytes


def test_export_empty_dataset_refused(store):
    with pytest.raises(InputError, match="no images"):
        store.export_zip(store.create("s").name)


def test_concurrent_imports_never_clobber_each_other(store, tmp_path):
    import threading

    name = store.create("s").name
    a = tmp_path / "a"
    b = tmp_path / "b"
    fx.good_set(a, count=3, size=(500, 500))
    fx.good_set(b, count=3, size=(500, 500))  # same file names, different pixels
    threads = [threading.Thread(target=store.add_files, args=(name, sorted(d.iterdir()))) for d in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ds = store.open(name)
    assert len(ds.items) == 6 and len({i.file for i in ds.items}) == 6
    assert sorted(p.name for p in ds.images_dir.iterdir()) == sorted(i.file for i in ds.items)


def test_hosted_owners_get_separate_unguessable_roots(settings):
    from services.storage.datasets import DatasetStores

    stores = DatasetStores(settings)
    alice, bob, local = stores("user-alice"), stores("user-bob"), stores("local")
    alice.create("mine")
    assert bob.list_names() == [] and local.list_names() == []
    assert alice.root != bob.root and "alice" not in str(alice.root)
    assert alice.root.is_relative_to(settings.data_dir / "owners")
    assert local.root == settings.datasets_dir
    assert stores("user-alice") is alice  # one store (and lock) per owner
    # The token is stable across restarts (the secret is kept in the data dir, mode 0600).
    assert DatasetStores(settings)("user-alice").root == alice.root
    assert oct((settings.data_dir / ".owner-secret").stat().st_mode & 0o777) == "0o600"


def _zip_of_one_byte_files(path: Path, count: int) -> tuple[Path, DatasetStore]:
    """A zip of ``count`` one-byte "images", and a fresh store to import it into."""
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(count):
            zf.writestr(f"f{i}.jpg", b"x")
    settings = Settings(data_dir=path.parent / "d")
    return path, DatasetStore(settings.datasets_dir, settings)


def test_a_zip_with_thousands_of_entries_is_refused_at_once(tmp_path, monkeypatch):
    """Each entry once cost a re-read of the whole zip: 5,000 entries took minutes of CPU. It is refused
    from the central directory alone: no entry is read. (Its speed: benchmarks/load.py.)"""
    z, store = _zip_of_one_byte_files(tmp_path / "many.zip", 5000)
    read: list[str] = []
    real_open = zipfile.ZipFile.open

    def reading(self, name, *a, **kw):
        read.append(str(getattr(name, "filename", name)))
        return real_open(self, name, *a, **kw)

    monkeypatch.setattr(zipfile.ZipFile, "open", reading)
    ds, report = store.add_files(store.create("s").name, [z])
    assert ds.items == [] and "holds 5,000 files, over the limit of 1,000" in _messages(report, "rejected")["many.zip"]
    assert read == []
    few, _ = _zip_of_one_byte_files(tmp_path / "few.zip", 3)
    store.add_files(store.create("t").name, [few])
    assert set(read) == {"f0.jpg", "f1.jpg", "f2.jpg"}  # the control: a zip under the cap is read entry by entry


def test_a_zip_under_the_entry_cap_is_opened_once(tmp_path, monkeypatch):
    z, store = _zip_of_one_byte_files(tmp_path / "some.zip", 300)
    opened: list[str] = []
    real = zipfile.ZipFile.__init__

    def counting(self, file, *a, **kw):
        opened.append(str(file))
        real(self, file, *a, **kw)

    monkeypatch.setattr(zipfile.ZipFile, "__init__", counting)
    ds, report = store.add_files(store.create("s").name, [z])
    assert ds.items == [] and len(report.rejected) == 300  # one-byte "images": each refused with a reason
    assert opened.count(str(z)) == 1


BOMB_SCRIPT = """
import re, sys, zipfile
from pathlib import Path
from services.config import Settings
from services.storage.datasets import DatasetStore

tmp = Path(sys.argv[1])
bomb = tmp / "bomb.zip"
with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
    for name in ("a.png", "b.png"):
        with zf.open(name, "w", force_zip64=True) as entry:
            zero = bytes(1 << 20)
            for _ in range(1024):
                entry.write(zero)
settings = Settings(data_dir=tmp / "d")
store = DatasetStore(settings.datasets_dir, settings)
ds, report = store.add_files(store.create("s").name, [bomb])
# This process's own peak (ru_maxrss would include the forking parent's).
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
print(bomb.stat().st_size, len(ds.items), peak_kb // 1024)
for m in report.rejected:
    print(m.source, "|", m.message)
"""


def test_a_zip_bomb_is_refused_without_the_process_growing(tmp_path):
    """Two 1 GiB entries of zeros in a 2 MiB zip: refused by their ratio, never inflated."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, str(tmp_path)], cwd=root, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    head, *rejected = out.stdout.strip().splitlines()
    zip_bytes, items, peak_mb = map(int, head.split())
    assert zip_bytes < 4 * 2**20 and items == 0
    assert len(rejected) == 2 and all("zip bomb" in line for line in rejected), rejected
    assert peak_mb < 300, peak_mb
    print(f"zip bomb ({zip_bytes / 2**20:.1f} MiB, 2 GiB inflated) refused; peak RSS {peak_mb} MB")


def test_a_hosted_visitor_is_held_to_a_dataset_count_and_a_byte_quota(tmp_path):
    from services.storage.datasets import DatasetStores

    settings = Settings(data_dir=tmp_path / "d", hosted=True, visitor_max_datasets=2, visitor_max_bytes=400_000)
    visitor = DatasetStores(settings)("visitor-abc")
    first = visitor.create("one").name
    visitor.create("two")
    with pytest.raises(InputError, match="You have 2 datasets"):
        visitor.create("three")
    photos = [tmp_path / f"p{i}.jpg" for i in range(3)]
    for i, p in enumerate(photos):
        p.write_bytes(fx.jpeg_bytes(fx.photo(640, 480, seed=i)))
    visitor.add_files(first, photos[:1])
    used = visitor.stored_bytes()
    assert 0 < used < 400_000
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * (400_000 - used + 1))
    with pytest.raises(InputError, match="of the 0.4 MB one visitor may keep"):
        visitor.add_files(first, [big])
    visitor.delete("two")
    visitor.create("three")  # room again
    with pytest.raises(DatasetError, match="was not found"):
        DatasetStores(settings)("visitor-other").delete(first)  # another visitor's name: not theirs to delete
    assert first in visitor.list_names()
    # The local owner (not hosted) has no such caps.
    assert not DatasetStores(settings.with_(hosted=False))("local").quota


def test_caption_files_in_every_common_encoding_read_as_written(store, tmp_path):
    text = "café crème, naïve TOK"
    encodings = {"utf8.txt": text.encode("utf-8"), "bom.txt": text.encode("utf-8-sig"),
                 "latin1.txt": text.encode("latin-1"), "cp1252.txt": (text + " – 5€").encode("cp1252"),
                 "utf16.txt": text.encode("utf-16"), "even.txt": b"caf\xe9"}  # 4 bytes: not UTF-16
    files = []
    for i, (name, data) in enumerate(encodings.items()):
        img = tmp_path / f"{Path(name).stem}.jpg"
        img.write_bytes(fx.jpeg_bytes(fx.photo(640, 640, seed=i)))
        cap = tmp_path / name
        cap.write_bytes(data)
        files += [img, cap]
    ds, _ = store.add_files(store.create("enc").name, files)
    captions = {Path(i.file).stem: i.caption for i in ds.items}
    assert captions == {"utf8": text, "bom": text, "latin1": text, "cp1252": text + " – 5€", "utf16": text,
                        "even": "café"}


# ---------------------------------------------------------------- caption length


def test_a_caption_past_the_cap_is_refused_by_name_and_nothing_is_saved(store, tmp_path):
    """Captions of 1 to 100 MB were once taken through the API; every read of the dataset then took minutes."""
    from services.storage.captions import MAX_CAPTION_CHARS

    photos = fx.good_set(tmp_path / "g", count=2, size=(640, 640))
    name = store.create("s").name
    ds, _ = store.add_files(name, photos)
    a, b = (i.file for i in ds.items)
    store.set_captions(name, {a: "TOK, a mug", b: "TOK, a cup"})
    longest = "x" * MAX_CAPTION_CHARS
    with pytest.raises(InputError, match=rf"at most 3,000 characters; too long: {b} \(3,001 characters\)"):
        store.set_captions(name, {a: "TOK, changed", b: longest + "y"})
    assert [i.caption for i in store.open(name).items] == ["TOK, a mug", "TOK, a cup"]  # neither was saved
    with pytest.raises(InputError, match="too long"):  # an edit to every caption is held to the same rule
        store.map_captions(name, lambda c: add_affixes(c, "", " " + longest))
    assert [i.caption for i in store.open(name).items] == ["TOK, a mug", "TOK, a cup"]
    assert store.set_captions(name, {a: longest}).items[0].caption == longest  # the cap itself is allowed


def test_an_imported_caption_past_the_cap_is_left_out_with_its_reason_and_its_image_kept(store, tmp_path):
    from services.storage.captions import MAX_CAPTION_CHARS

    long_text = "a photo of TOK " * (MAX_CAPTION_CHARS // 10)
    shoot = tmp_path / "shoot.zip"
    shoot.write_bytes(fx.zip_bytes({
        "long.jpg": fx.jpeg_bytes(fx.photo(700, 700, seed=1)), "long.txt": long_text.encode(),
        "short.jpg": fx.jpeg_bytes(fx.photo(700, 700, seed=2)), "short.txt": b"TOK on a bench"}))
    (tmp_path / "loose.jpg").write_bytes(fx.jpeg_bytes(fx.photo(700, 700, seed=3)))
    (tmp_path / "loose.txt").write_text(long_text)
    ds, report = store.add_files(store.create("s").name, [shoot, tmp_path / "loose.jpg", tmp_path / "loose.txt"])
    captions = {i.file: i.caption for i in ds.items}
    assert captions == {"long.jpg": "", "short.jpg": "TOK on a bench", "loose.jpg": ""}  # every image kept
    rejected = _messages(report, "rejected")
    assert set(rejected) == {"shoot.zip:long.txt", "loose.txt"}
    assert all(f"over the {MAX_CAPTION_CHARS:,} a caption may have" in m for m in rejected.values())
    assert report.captions_paired == 1
