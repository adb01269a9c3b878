"""How fast, how lean and how small is dataset preparation on big phone photos?

Run::

    python -m benchmarks.dataset_prep [--count 100] [--megapixels 12] [--workdir DIR]
                                      [--repeat 3] [--compare-pool] [--keep]

It writes ``--count`` synthetic photo-like JPEGs (4000x3000 at 12 MP, quality 90, every
file with distinct bytes) to a work folder, then measures, each in a fresh child process
so that ``ru_maxrss`` is an honest peak RSS for that pipeline alone:

* naive: the plain Pillow pipeline, sequential, in one process: ``Image.open`` ->
  ``convert("RGB")`` -> ``resize(target_size(...), LANCZOS)`` -> ``save(JPEG, quality=92)``.
* ours: the real app path, ``DatasetStore.add_files`` (``prepare_all``: thread pool,
  JPEG draft mode, ``reducing_gap``) followed by ``DatasetStore.export_zip``.

Targets: ours >= 3x faster than naive, ours peak RSS < 500 MB, exported zip <= 15% of
the originals. The last line reads
``RESULT speedup=5.12x peak_rss_ours=210MB peak_rss_naive=180MB zip_ratio=7.9%``.
It is a benchmark, not a test: it exits 0 when a target is missed and says
``TARGET MISSED`` next to that target.

``--compare-pool`` adds a second experiment: ours with ``Settings(workers=1)``, with the
default worker count (threads), and with a process-pool variant of ``prepare_all`` that
lives only in this file (it calls ``services.storage.images.prepare_image`` in a
``ProcessPoolExecutor``), to tell whether threads or processes serve this machine better.

Times are the best of ``--repeat`` runs (naive and ours interleaved; medians are shown
too), and each run reports how much CPU the rest of the machine used meanwhile, so a
noisy measurement shows itself. Image generation is not timed. ``--workdir DIR`` keeps
the generated images in DIR and reuses them on a later run with the same ``--megapixels``
and the same or a smaller ``--count``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageStat

ROOT = Path(__file__).resolve().parents[1]
GEN_VERSION = 1  # bump when the generator changes, so cached images are made again
SRC_DIR = "src"
PREFIX = "bench_"
RESULT_TAG = "PHASE_RESULT "

TARGET_SPEEDUP = 3.0
TARGET_RSS_MB = 500.0
TARGET_ZIP_RATIO = 0.15
NAIVE_QUALITY = 92
MB = 2**20


# ---------------------------------------------------------------- synthetic photos


def _size_for(megapixels: float) -> tuple[int, int]:
    """4:3 landscape of about ``megapixels``: 12 -> 4000x3000."""
    w = round(math.sqrt(megapixels * 1_000_000 * 4 / 3))
    return w, round(w * 3 / 4)


def _rand_color(rng: random.Random, lo: int = 0, hi: int = 255) -> tuple[int, int, int]:
    return (rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(lo, hi))


def _base_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A soft 'scene': sky/ground gradient, a light spot, blurred shapes, texture, sharp details.

    Built at 1/4 size and upscaled (soft edges, cheap), then sharp details at full size so
    the JPEG has the high-frequency content a real photo has.
    """
    rng = random.Random(seed)
    w, h = size
    small = (max(64, w // 4), max(48, h // 4))
    grad = Image.linear_gradient("L").resize(small, Image.Resampling.BILINEAR)
    img = Image.composite(
        Image.new("RGB", small, _rand_color(rng, 20, 140)), Image.new("RGB", small, _rand_color(rng, 90, 250)), grad
    )
    # A light source: part of a radial gradient, off-centre.
    rad = Image.radial_gradient("L").resize((small[0] * 2, small[1] * 2), Image.Resampling.BILINEAR)
    ox, oy = rng.randint(0, small[0]), rng.randint(0, small[1])
    rad = rad.crop((ox, oy, ox + small[0], oy + small[1]))
    img = Image.composite(img, Image.new("RGB", small, _rand_color(rng, 180, 255)), rad)
    # Objects: translucent and opaque shapes.
    overlay = Image.new("RGBA", small, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for _ in range(rng.randint(30, 45)):
        x0, y0 = rng.randint(-small[0] // 5, small[0]), rng.randint(-small[1] // 5, small[1])
        x1, y1 = x0 + rng.randint(small[0] // 30, small[0] // 3), y0 + rng.randint(small[1] // 30, small[1] // 3)
        fill = _rand_color(rng) + (rng.randint(90, 255),)
        kind = rng.random()
        if kind < 0.4:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif kind < 0.7:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            pts = [(rng.randint(x0, x1), rng.randint(y0, y1)) for _ in range(rng.randint(3, 6))]
            draw.polygon(pts, fill=fill)
    img = Image.alpha_composite(img.convert("RGBA"), overlay).convert("RGB")
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    # Mid-frequency texture (foliage, fabric): noise at 1/4 size, upscaled with the scene.
    tex = Image.effect_noise(small, 14)
    img = ImageChops.add(img, Image.merge("RGB", (tex, tex, tex)), 1.0, -128)
    img = img.resize(size, Image.Resampling.BICUBIC)
    # Sharp details at full size: edges, thin lines, small bright spots.
    draw = ImageDraw.Draw(img)
    for _ in range(400):
        x, y = rng.randint(0, w), rng.randint(0, h)
        s = rng.randint(4, 60)
        kind = rng.random()
        if kind < 0.4:
            draw.line((x, y, x + rng.randint(-300, 300), y + rng.randint(-300, 300)), fill=_rand_color(rng), width=rng.randint(1, 4))
        elif kind < 0.8:
            draw.rectangle((x, y, x + s, y + s // 2), fill=_rand_color(rng))
        else:
            draw.ellipse((x, y, x + s, y + s), outline=_rand_color(rng), width=2)
    return img


def _noise_field(seed: int, size: tuple[int, int]) -> Image.Image:
    """Sensor-like noise centred on 128: mostly luma, a little chroma."""
    # Image.effect_noise draws from C rand(); fields differ from call to call, seed unused.
    luma = Image.effect_noise(size, 5.0)
    chroma = Image.effect_noise(size, 2.0)
    return Image.merge("RGB", (luma, ImageChops.add(luma, chroma, 1.0, -128), luma))


def _write_one(i: int, base: Image.Image, noise: Image.Image, path: Path) -> tuple[int, str]:
    rng = random.Random(10_000 + i)
    w, h = base.size
    img = ImageChops.offset(base, rng.randint(0, w - 1), rng.randint(0, h - 1))
    img = ImageChops.add(img, ImageChops.offset(noise, rng.randint(0, w - 1), rng.randint(0, h - 1)), 1.0, -128)
    draw = ImageDraw.Draw(img)
    for _ in range(3):  # something unique to this file
        x, y = rng.randint(0, w - 200), rng.randint(0, h - 200)
        draw.ellipse((x, y, x + rng.randint(40, 200), y + rng.randint(40, 200)), fill=_rand_color(rng))
    exif = Image.Exif()
    exif[0x0112] = 1  # Orientation: normal
    exif[0x010F] = "BenchCam"  # Make
    exif[0x0110] = f"Synthetic {i}"  # Model
    img.save(path, "JPEG", quality=90, exif=exif.tobytes())
    return path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()


def ensure_images(workdir: Path, count: int, megapixels: float) -> list[Path]:
    """Generate ``count`` distinct JPEGs under ``workdir/src``, or reuse the first ``count`` there."""
    src = workdir / SRC_DIR
    size = _size_for(megapixels)
    want = {"version": GEN_VERSION, "count": count, "size": list(size)}
    marker = src / "manifest.json"
    paths = list_images(workdir, count)
    if marker.is_file():
        have = json.loads(marker.read_text())
        if (have.get("version"), have.get("size")) == (GEN_VERSION, list(size)) and have.get("count", 0) >= count \
                and all(p.is_file() for p in paths):
            print(f"Reusing {count} of the {have['count']} images in {src}")
            return paths
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    t0 = time.perf_counter()
    n_bases = min(4, count)
    print(f"Generating {count} synthetic {size[0]}x{size[1]} JPEGs in {src} (not timed) ...", flush=True)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        bases = list(pool.map(lambda s: _base_image(s, size), range(n_bases)))
        noises = list(pool.map(lambda s: _noise_field(s, size), range(min(3, count))))
        futs = [
            pool.submit(_write_one, i, bases[i % n_bases], noises[(i // n_bases) % len(noises)], paths[i])
            for i in range(count)
        ]
        out = [f.result() for f in futs]
    digests = {d for _, d in out}
    if len(digests) != count:
        raise SystemExit(f"generator bug: {count - len(digests)} duplicate file(s)")
    marker.write_text(json.dumps(want))
    sizes = [s for s, _ in out]
    print(
        f"  done in {time.perf_counter() - t0:.1f}s: {sum(sizes) / MB:.1f} MB in all, "
        f"{min(sizes) / MB:.2f}-{max(sizes) / MB:.2f} MB each (mean {statistics.mean(sizes) / MB:.2f} MB)",
        flush=True,
    )
    return paths


def list_images(workdir: Path, count: int) -> list[Path]:
    return [workdir / SRC_DIR / f"{PREFIX}{i:04d}.jpg" for i in range(count)]


# ---------------------------------------------------------------- child phases


def _proc_status_kb(field: str) -> int:
    """A ``/proc/self/status`` memory figure in KiB (0 where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _rss_now_kb() -> int:
    return _proc_status_kb("VmRSS")


def _peaks() -> dict:
    """Peak RSS of this process: ``ru_maxrss`` (the figure reported) and VmHWM (a cross-check).

    Linux carries ``ru_maxrss`` over fork+exec, so a child can inherit its parent's RSS as a
    floor; the driver keeps itself small (images are generated in a child of their own) so
    that floor stays far below every pipeline's own peak. VmHWM belongs to the exec'd
    image only, so the two agree when all is well.
    """
    return {
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "vm_hwm_kb": _proc_status_kb("VmHWM"),
    }


def _cpu_s(who: int) -> float:
    ru = resource.getrusage(who)
    return ru.ru_utime + ru.ru_stime


def phase_naive(workdir: Path, count: int, out_dir: Path) -> dict:
    from services.config import Settings
    from services.storage.images import target_size

    max_pixels = int(Settings().target_megapixels * 1_000_000)
    paths = list_images(workdir, count)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    baseline = _rss_now_kb()
    cpu0 = _cpu_s(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for p in paths:
        with Image.open(p) as im:
            rgb = im.convert("RGB")
            goal = target_size(rgb.width, rgb.height, max_pixels)
            if goal != rgb.size:
                rgb = rgb.resize(goal, Image.Resampling.LANCZOS)
            rgb.save(out_dir / f"{p.stem}.jpg", "JPEG", quality=NAIVE_QUALITY)
    seconds = time.perf_counter() - t0
    return {
        "phase": "naive",
        "seconds": seconds,
        "cpu_s": _cpu_s(resource.RUSAGE_SELF) - cpu0,
        "baseline_rss_kb": baseline,
        **_peaks(),
        "children_peak_rss_kb": 0,
        "n_in": len(paths),
        "n_ok": len(list(out_dir.glob("*.jpg"))),
        "out_bytes": sum(f.stat().st_size for f in out_dir.glob("*.jpg")),
        "source_bytes": sum(p.stat().st_size for p in paths),
        "out_dir": str(out_dir),
    }


def prepare_all_processes(jobs, out_dir, settings, progress=None):
    """``services.storage.uploads.prepare_all`` with a ProcessPoolExecutor instead of threads.

    Same contract (results in input order); exists only for the --compare-pool experiment.
    """
    from services.storage.images import prepare_image

    total = len(jobs)
    results = [None] * total
    max_pixels = int(settings.target_megapixels * 1_000_000)
    workers = max(1, min(settings.worker_count, total))
    done = 0
    if progress:
        progress(0, total, "Preparing images")
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futs = {
            pool.submit(
                prepare_image, src, str(out_dir), stem,
                max_pixels=max_pixels, max_source_pixels=settings.max_image_pixels,
            ): i
            for i, (src, stem) in enumerate(jobs)
        }
        for fut in as_completed(futs):
            res = fut.result()
            results[futs[fut]] = res
            done += 1
            if progress:
                progress(done, total, f"Prepared {res.source}")
    return [r for r in results if r is not None]


def phase_ours(workdir: Path, count: int, data_dir: Path, workers: int, pool: str) -> dict:
    import services.storage.datasets as sd
    from services.config import Settings

    if pool == "processes":
        sd.prepare_all = prepare_all_processes  # add_files looks the name up at call time
    paths = list_images(workdir, count)
    if data_dir.exists():
        shutil.rmtree(data_dir)
    settings = Settings(data_dir=data_dir, workers=workers)
    source_bytes = sum(p.stat().st_size for p in paths)
    raised_limit = False
    if source_bytes > settings.max_upload_bytes:
        # The app refuses one upload this big; the benchmark is about speed, so lift it.
        settings = settings.with_(max_upload_bytes=source_bytes + MB)
        raised_limit = True
    store = sd.DatasetStore(settings.datasets_dir, settings)
    ds = store.create("bench")
    baseline = _rss_now_kb()
    cpu0 = _cpu_s(resource.RUSAGE_SELF) + _cpu_s(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    ds, report = store.add_files(ds.name, paths)
    t1 = time.perf_counter()
    export = store.export_zip(ds.name)
    t2 = time.perf_counter()
    return {
        "phase": "ours",
        "pool": pool,
        "workers": max(1, min(settings.worker_count, len(paths))),
        "start_method": multiprocessing.get_start_method() if pool == "processes" else "",
        "seconds": t2 - t0,
        "add_s": t1 - t0,
        "export_s": t2 - t1,
        "cpu_s": _cpu_s(resource.RUSAGE_SELF) + _cpu_s(resource.RUSAGE_CHILDREN) - cpu0,
        "baseline_rss_kb": baseline,
        **_peaks(),
        "children_peak_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
        "n_in": len(paths),
        "n_ok": len(report.added),
        "rejected": [f"{m.source}: {m.message}" for m in report.rejected],
        "skipped": [f"{m.source}: {m.message}" for m in report.skipped],
        "out_bytes": sum(ds.image_path(i.file).stat().st_size for i in ds.items),
        "zip_bytes": export.size_bytes,
        "zip_path": str(export.path),
        "source_bytes": source_bytes,
        "export_source_bytes": export.source_bytes,
        "out_dir": str(ds.images_dir),
        "raised_upload_limit": raised_limit,
    }


# ---------------------------------------------------------------- driver


def run_child(args: argparse.Namespace, phase: str, *extra: str, echo: bool = False) -> dict:
    """Run one phase in a fresh interpreter; return its result dict (its other output is echoed if asked)."""
    cmd = [
        sys.executable, "-m", "benchmarks.dataset_prep", "--phase", phase,
        "--workdir", str(args.workdir), "--count", str(args.count), *extra,
    ]
    busy0, kids0 = _busy_cpu_s(), _cpu_s(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        if line.startswith(RESULT_TAG):
            lines.append(line)
        elif echo:
            print(line, end="", flush=True)
        else:
            lines.append(line)
    err = proc.stderr.read()
    rc = proc.wait()
    # CPU the rest of the machine used meanwhile: all busy CPU time minus the child's own.
    other_cpu_s = max(0.0, (_busy_cpu_s() - busy0) - (_cpu_s(resource.RUSAGE_CHILDREN) - kids0))
    results = [ln for ln in lines if ln.startswith(RESULT_TAG)]
    if rc != 0 or not results:
        sys.stderr.write("".join(ln for ln in lines if not ln.startswith(RESULT_TAG)) + err)
        raise SystemExit(f"child phase {phase} {' '.join(extra)} failed (exit {rc})")
    if err.strip():
        sys.stderr.write(err)
    res = json.loads(results[-1][len(RESULT_TAG):])
    res["other_cpu_s"] = other_cpu_s
    return res


def _busy_cpu_s() -> float:
    """Machine-wide non-idle CPU seconds so far, from /proc/stat (0 where there is none)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def _summarise(runs: list[dict]) -> dict:
    """The fastest run's times (best of N, as timeit does: other work on the machine only ever
    adds time); the worst peak RSS over all runs."""
    best = min(runs, key=lambda r: r["seconds"])
    out = dict(runs[-1])
    for k in ("seconds", "cpu_s", "add_s", "export_s", "other_cpu_s"):
        if k in best:
            out[k] = best[k]
    out["median_seconds"] = statistics.median(r["seconds"] for r in runs)
    for k in ("peak_rss_kb", "vm_hwm_kb", "children_peak_rss_kb", "baseline_rss_kb"):
        out[k] = max(r[k] for r in runs)
    out["all_seconds"] = [r["seconds"] for r in runs]
    out["all_other_cpu_s"] = [r["other_cpu_s"] for r in runs]
    return out


def _psnr(a_path: Path, b_path: Path) -> float | None:
    with Image.open(a_path) as a, Image.open(b_path) as b:
        if a.size != b.size:
            return None
        stat = ImageStat.Stat(ImageChops.difference(a.convert("RGB"), b.convert("RGB")))
        mse = sum(stat.sum2) / (3 * a.width * a.height)
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def _mb(kb: int) -> float:
    return kb / 1024


def _mark(ok: bool) -> str:
    return "ok" if ok else "TARGET MISSED"


def _check_ours(r: dict) -> None:
    if r["n_ok"] != r["n_in"] or r.get("rejected") or r.get("skipped"):
        print(f"WARNING: ours added {r['n_ok']} of {r['n_in']} images")
        for line in (r.get("rejected") or [])[:5] + (r.get("skipped") or [])[:5]:
            print(f"  {line}")


def main_compare(args: argparse.Namespace) -> None:
    n = args.count
    configs = [("threads", 1), ("threads", 0), ("processes", 0)]
    print()
    runs: list[list[dict]] = [[] for _ in configs]
    for k in range(args.repeat):  # round-robin, so a burst of other work hits every variant alike
        print(f"Pool run {k + 1}/{args.repeat}: " + ", ".join(f"{p} w={w or 'default'}" for p, w in configs), flush=True)
        for j, (pool, workers) in enumerate(configs):
            tag = args.workdir / f"pool-{pool}-{workers}"
            runs[j].append(run_child(args, "ours", "--pool", pool, "--workers", str(workers), "--out", str(tag)))
            shutil.rmtree(tag, ignore_errors=True)
    results = [_summarise(r) for r in runs]
    for r in results:
        _check_ours(r)
    base = results[0]["seconds"]
    print()
    print(f"Pool comparison: ours (add_files + export_zip), {n} images, {os.cpu_count()} CPU core(s), "
          f"best of {args.repeat} interleaved run(s)")
    head = (f"{'variant':<30}{'workers':>8}{'wall s':>9}{'median':>8}{'img/s':>8}{'vs w=1':>8}{'CPU s':>8}"
            f"{'cores':>7}{'other':>7}{'peak RSS':>11}{'worker peak':>13}")
    print(head)
    print("-" * len(head))
    for r in results:
        name = f"{r['pool']}" + (f" ({r['start_method']})" if r["start_method"] else "")
        if r["workers"] == 1 and r["pool"] == "threads":
            name = "threads, Settings(workers=1)"
        child = f"{_mb(r['children_peak_rss_kb']):.0f} MB" if r["pool"] == "processes" else "-"
        print(
            f"{name:<30}{r['workers']:>8}{r['seconds']:>9.2f}{r['median_seconds']:>8.2f}{n / r['seconds']:>8.1f}"
            f"{base / r['seconds']:>7.2f}x{r['cpu_s']:>8.1f}{r['cpu_s'] / r['seconds']:>7.2f}{r['other_cpu_s']:>7.1f}"
            f"{_mb(r['peak_rss_kb']):>8.0f} MB{child:>13}"
        )
    procs = results[2]
    print("  cores = CPU s / wall s; other = CPU s used by the rest of the machine during that run")
    print("  peak RSS = the benchmark child (the app process); worker peak = the largest single pool worker")
    print(f"  (RUSAGE_CHILDREN); processes total is at most {_mb(procs['peak_rss_kb']):.0f} + "
          f"{procs['workers']} x {_mb(procs['children_peak_rss_kb']):.0f} MB, less the pages shared after fork.")
    thr, prc = results[1], results[2]
    best = "threads" if thr["seconds"] <= prc["seconds"] else "processes"
    diff = abs(thr["seconds"] - prc["seconds"]) / min(thr["seconds"], prc["seconds"]) * 100
    print(
        f"POOL threads_w1={results[0]['seconds']:.2f}s threads_w{thr['workers']}={thr['seconds']:.2f}s "
        f"processes_w{prc['workers']}={prc['seconds']:.2f}s best={best} (by {diff:.1f}%)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=100, help="number of synthetic photos (default 100)")
    ap.add_argument("--megapixels", type=float, default=12.0, help="size of each photo (default 12 -> 4000x3000)")
    ap.add_argument("--workdir", type=Path, help="work folder (default: a temp folder, removed at the end)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per pipeline, interleaved; the best is reported (default 3)")
    ap.add_argument("--compare-pool", action="store_true", help="also compare workers=1, threads and processes")
    ap.add_argument("--keep", action="store_true", help="keep the temp work folder")
    ap.add_argument("--phase", choices=["generate", "naive", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--pool", choices=["threads", "processes"], default="threads", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.count < 1 or args.repeat < 1:
        ap.error("--count and --repeat must be at least 1")

    if args.phase:  # child process: run one pipeline, print one result line
        if args.phase == "generate":
            paths = ensure_images(args.workdir, args.count, args.megapixels)
            res = {"phase": "generate", "source_bytes": sum(p.stat().st_size for p in paths)}
        elif args.phase == "naive":
            res = phase_naive(args.workdir, args.count, args.out)
        else:
            res = phase_ours(args.workdir, args.count, args.out, args.workers, args.pool)
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0

    temp = args.workdir is None
    if temp:
        args.workdir = Path(tempfile.mkdtemp(prefix="flux-bench-"))
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        # In a child of its own: generating holds ~0.5 GB, and Linux would pass this process's
        # peak RSS on to every pipeline child as a floor of its ru_maxrss.
        run_child(args, "generate", "--megapixels", str(args.megapixels), echo=True)
        naive_out, ours_data = args.workdir / "naive-out", args.workdir / "ours-data"
        naive_runs, ours_runs = [], []
        for k in range(args.repeat):
            print(f"Run {k + 1}/{args.repeat}: naive ...", flush=True)
            naive_runs.append(run_child(args, "naive", "--out", str(naive_out)))
            print(f"Run {k + 1}/{args.repeat}: ours ...", flush=True)
            ours_runs.append(run_child(args, "ours", "--out", str(ours_data)))
        naive, ours = _summarise(naive_runs), _summarise(ours_runs)
        _check_ours(ours)

        # Sanity: same output sizes, and ours looks like naive (both are q92 JPEGs of a LANCZOS downscale).
        psnrs = []
        for p in sorted(Path(naive["out_dir"]).glob("*.jpg"))[:5]:
            q = Path(ours["out_dir"]) / p.name
            if q.is_file():
                psnrs.append(_psnr(p, q))

        n = args.count
        src_bytes = naive["source_bytes"]
        speedup = naive["seconds"] / ours["seconds"]
        zip_ratio = ours["zip_bytes"] / src_bytes
        rss_ours, rss_naive = _mb(ours["peak_rss_kb"]), _mb(naive["peak_rss_kb"])
        mp = _size_for(args.megapixels)

        print()
        print(f"Dataset preparation: {n} JPEGs of {mp[0]}x{mp[1]}, {src_bytes / MB:.1f} MB in all; "
              f"{os.cpu_count()} CPU core(s); best of {args.repeat} interleaved run(s); MB = MiB")
        head = (f"{'pipeline':<28}{'wall s':>8}{'median':>8}{'img/s':>7}{'CPU s':>7}{'other':>7}{'peak RSS':>10}"
                f"{'(VmHWM)':>9}{'RSS before':>12}{'output':>10}")
        print(head)
        print("-" * len(head))
        for label, r, out_bytes in (("naive Pillow (sequential)", naive, naive["out_bytes"]),
                                    ("ours add_files+export_zip", ours, ours["zip_bytes"])):
            print(f"{label:<28}{r['seconds']:>8.2f}{r['median_seconds']:>8.2f}{n / r['seconds']:>7.1f}"
                  f"{r['cpu_s']:>7.1f}{r['other_cpu_s']:>7.1f}{_mb(r['peak_rss_kb']):>7.0f} MB"
                  f"{_mb(r['vm_hwm_kb']):>6.0f} MB{_mb(r['baseline_rss_kb']):>9.0f} MB{out_bytes / MB:>7.1f} MB")
        print("  wall s / CPU s: the pipeline only, in its own child process (interpreter start and imports")
        print("  excluded), fastest run; other: CPU s the rest of the machine used during that run (noise);")
        print("  peak RSS: ru_maxrss of that child at its end; output: naive's JPEGs, ours' exported zip")
        print(f"  ours: add_files {ours['add_s']:.2f}s + export_zip {ours['export_s']:.2f}s, "
              f"{ours['workers']} thread worker(s), {ours['n_ok']}/{ours['n_in']} images added")
        if args.repeat > 1:
            print(f"  all wall times: naive {[round(s, 2) for s in naive['all_seconds']]}, "
                  f"ours {[round(s, 2) for s in ours['all_seconds']]}; other CPU s: naive "
                  f"{[round(s, 1) for s in naive['all_other_cpu_s']]}, ours {[round(s, 1) for s in ours['all_other_cpu_s']]}")
            print(f"  speedup on medians: {naive['median_seconds'] / ours['median_seconds']:.2f}x")
        if psnrs:
            shown = ", ".join("size differs" if v is None else f"{v:.1f}" for v in psnrs)
            print(f"  ours vs naive output, first {len(psnrs)} images: PSNR {shown} dB "
                  f"(both lossy q{NAIVE_QUALITY}; > 35 dB is visually the same)")
        if ours.get("raised_upload_limit"):
            print(f"  note: {src_bytes / MB:.0f} MB is over the app's upload limit "
                  f"(Settings.max_upload_bytes); the benchmark raised it for this run")
        if ours["export_source_bytes"] != src_bytes:
            print(f"  note: export_zip reports source_bytes={ours['export_source_bytes']}, files total {src_bytes}")
        print()
        print("Targets")
        print(f"  speedup naive/ours  {speedup:6.2f}x   (>= {TARGET_SPEEDUP:.0f}x)      {_mark(speedup >= TARGET_SPEEDUP)}")
        print(f"  peak RSS ours       {rss_ours:6.0f} MB  (< {TARGET_RSS_MB:.0f} MB)    {_mark(rss_ours < TARGET_RSS_MB)}")
        print(f"  zip / originals     {zip_ratio * 100:6.1f}%   (<= {TARGET_ZIP_RATIO * 100:.0f}%)     "
              f"{_mark(zip_ratio <= TARGET_ZIP_RATIO)}")

        if args.compare_pool:
            main_compare(args)

        print()
        print(f"RESULT speedup={speedup:.2f}x peak_rss_ours={rss_ours:.0f}MB "
              f"peak_rss_naive={rss_naive:.0f}MB zip_ratio={zip_ratio * 100:.1f}%")
    finally:
        for sub in ("naive-out", "ours-data"):
            shutil.rmtree(args.workdir / sub, ignore_errors=True)
        if temp and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
        elif temp:
            print(f"(kept {args.workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
