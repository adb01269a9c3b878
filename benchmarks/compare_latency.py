"""Does base-vs-tuned take as long as the slower image, not the sum? And how fast is a grid?

Run::

    python -m benchmarks.compare_latency [--base-latency 1.0] [--tuned-latency 1.5] [--repeat 3]

Starts the fake CometAPI on loopback, injects a fixed server latency per model route (the
time a real service takes to render), and times in one process:

* serial: base, then tuned (what a naive handler does), as the baseline;
* ours: ``services.compare.compare_pair`` (both at once);
* a 2x4 grid (8 cells, ``max_concurrency=4``) vs the same cells one by one.

Target: pair wall time <= slower image's latency + 10%. Prints ratios; the last line reads
``RESULT pair_over_slower=1.03 pair_vs_serial=0.61x grid_vs_serial=0.27x``.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from services import compare as cmp
from services.providers.cometapi.client import CometAPIClient
from services.providers.cometapi.provider import CometAPIProvider
from services.config import Secret
from services.providers.base import GenerateRequest
from tests.fake_cometapi import FakeCometAPI

KEY = "bench-key"
BASE, TUNED = "flux-pro-1.1-ultra", "flux-pro-1.1-ultra-finetuned"


def _provider(url: str) -> CometAPIProvider:
    # Polling like the app does (first poll after poll_initial); latency sits in the submit call.
    return CometAPIProvider(lambda: CometAPIClient(url, Secret(KEY), poll_initial=0.05, poll_max=0.2), has_key=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-latency", type=float, default=1.0)
    ap.add_argument("--tuned-latency", type=float, default=1.5)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    with FakeCometAPI(api_key=KEY, pending_polls=0) as fake, tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        fake.set_latency(f"/flux/v1/{BASE}", args.base_latency)
        fake.set_latency(f"/flux/v1/{TUNED}", args.tuned_latency)
        finetune = fake.add_finetune()
        provider = _provider(fake.url)
        req = GenerateRequest(prompt="a photo of TOK", seed=7, strength=1.2)

        serial, pair, slower = [], [], []
        for _ in range(args.repeat):
            t0 = time.monotonic()
            provider.generate(req, out / "serial", model=BASE)
            t1 = time.monotonic()
            provider.generate(req, out / "serial", finetune=finetune, model=TUNED)
            t2 = time.monotonic()
            serial.append(t2 - t0)
            slower.append(max(t1 - t0, t2 - t1))  # the slower image, each run alone
            result = cmp.compare_pair(provider, req, finetune_id=finetune, tuned_model=TUNED, out_dir=out, owner="local")
            pair.append(result.wall_s)

        prompts, strengths = ["a photo of TOK", "TOK in the snow"], [0.6, 0.9, 1.2]
        t0 = time.monotonic()
        for p in prompts:
            provider.generate(GenerateRequest(prompt=p, seed=7), out / "serial", model=BASE)
            for s in strengths:
                provider.generate(GenerateRequest(prompt=p, seed=7, strength=s), out / "serial", finetune=finetune, model=TUNED)
        grid_serial = time.monotonic() - t0
        grid = cmp.run_grid(provider, prompts, strengths, req, finetune_id=finetune, tuned_model=TUNED,
                            include_base=True, max_concurrency=4, out_dir=out, owner="local")

    med = statistics.median
    pair_over_slower = med(p / s for p, s in zip(pair, slower))
    print(f"injected latency: base {args.base_latency:.2f}s, tuned {args.tuned_latency:.2f}s; {args.repeat} repeats")
    print(f"serial pair   median {med(serial):.3f}s")
    print(f"ours (pair)   median {med(pair):.3f}s  (slower image alone: median {med(slower):.3f}s)")
    print(f"grid 2x4      serial {grid_serial:.3f}s  ours {grid.wall_s:.3f}s  ({grid.failed} failed)")
    verdict = "" if pair_over_slower <= 1.10 else "  TARGET MISSED (<= 1.10)"
    print(f"RESULT pair_over_slower={pair_over_slower:.2f}{verdict} pair_vs_serial={med(pair) / med(serial):.2f}x "
          f"grid_vs_serial={grid.wall_s / grid_serial:.2f}x")


if __name__ == "__main__":
    main()
