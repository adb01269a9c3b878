"""How does the hosted app hold up under many visitors and hostile uploads? Ratios against a quiet app.

Run::

    python -m benchmarks.load [--sessions 20] [--render 0.5] [--probes 20]

Starts the real app (hosted) and the fake CometAPI on loopback, the fake taking ``--render``
seconds per image, and measures in one process:

* ``/list_jobs`` (the cheap call the Train tab polls) on a quiet app, as the baseline, then while
  ``--sessions`` visitors each compare base and tuned at once: its p95 under load over its p95 when
  quiet (shown: the app, the fake and the clients share the machine's cores and one GIL), and over
  the wall time of the compares (target: under 0.5x; were it queued behind them, about 1x);
* one compare alone, as the baseline, then the wall time of all the sessions' compares at once,
  over what they would take one after the other (target: under 0.5x: the app runs several at once);
* refusing a 5,000-entry zip (over the entry cap) against listing its central directory with
  ``zipfile`` (target: under 3x: the refusal reads the directory only, no entry).

It is a benchmark, not a test: it prints ``TARGET MISSED`` next to a missed target and exits 0.
The last line reads ``RESULT list_jobs_p95_loaded_vs_quiet=8.11x list_jobs_p95_vs_compares=0.48x
compares_vs_serial=0.28x zip_refusal_vs_listing=1.09x`` (2 shared cores).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import zipfile
from pathlib import Path

from gradio_client import Client

from services.config import Secret, Settings
from services.storage.datasets import DatasetStore
from services.storage.jobs import JobStore
from tests.browser import client_owner, launched
from tests.fake_cometapi import FakeCometAPI

KEY = "bench-key"
RENDER_ROUTES = ("/flux/v1/flux-pro-1.1-ultra", "/flux/v1/flux-pro-1.1-ultra-finetuned")
ZIP_ENTRIES = 5000


def _p95(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=20)[-1] if len(samples) >= 2 else samples[0]


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def app_under_load(sessions: int, render_s: float, probes: int) -> dict[str, float]:
    with FakeCometAPI(api_key=KEY, pending_polls=0) as fake, tempfile.TemporaryDirectory() as tmp:
        for route in RENDER_ROUTES:
            fake.set_latency(route, render_s)
        finetune = fake.add_finetune()
        settings = Settings(data_dir=Path(tmp) / "data").with_(
            cometapi_base_url=fake.url, cometapi_key=Secret(KEY), hosted=True, shared_key_limit=10 * sessions)
        fields = ["a photo of TOK", 5, 1.0, 1024, 768]
        with launched(settings) as (_demo, url):
            clients = [Client(url, verbose=False) for _ in range(sessions + 1)]
            try:
                probe, visitors = clients[0], clients[1:]
                jobs = JobStore.from_settings(settings)
                for client in visitors:  # each compares a ready fine-tune of their own
                    owner = client_owner(settings, client)
                    job = jobs.create(owner, "cometapi", "finetune", "mine", "ds", "h", {})
                    jobs.update(owner, job.id, remote_id=finetune, status="ready", result={"finetune_id": finetune})
                jobs.close()

                quiet = [_timed(lambda: probe.predict(api_name="/list_jobs")) for _ in range(probes)]
                alone = _timed(lambda: visitors[0].predict(finetune, *fields, api_name="/compare"))

                loaded: list[float] = []
                stop = threading.Event()

                def probing() -> None:
                    while not stop.is_set():
                        loaded.append(_timed(lambda: probe.predict(api_name="/list_jobs")))

                threads = [threading.Thread(target=c.predict, args=(finetune, *fields), kwargs={"api_name": "/compare"})
                           for c in visitors]
                prober = threading.Thread(target=probing)
                prober.start()
                started = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - started
                stop.set()
                prober.join()
            finally:
                for c in clients:
                    c.close()
    print(f"/list_jobs p95: quiet {_p95(quiet) * 1000:.0f} ms over {len(quiet)} calls, "
          f"under load {_p95(loaded) * 1000:.0f} ms over {len(loaded)} calls")
    print(f"compare: alone {alone:.2f} s; {sessions} at once {wall:.2f} s (one after the other: ~{alone * sessions:.1f} s)")
    return {"list_jobs_p95_loaded_vs_quiet": _p95(loaded) / _p95(quiet), "list_jobs_p95_vs_compares": _p95(loaded) / wall,
            "compares_vs_serial": wall / (alone * sessions)}


def zip_refusal() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "many.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for i in range(ZIP_ENTRIES):
                zf.writestr(f"f{i}.jpg", b"x")
        settings = Settings(data_dir=Path(tmp) / "data")
        store = DatasetStore(settings.datasets_dir, settings)
        name = store.create("s").name
        listing = min(_timed(lambda: zipfile.ZipFile(path).infolist()) for _ in range(5))
        refusal = min(_timed(lambda: store.add_files(name, [path])) for _ in range(5))
    print(f"{ZIP_ENTRIES:,}-entry zip: listed in {listing * 1000:.1f} ms, refused in {refusal * 1000:.1f} ms")
    return {"zip_refusal_vs_listing": refusal / listing}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--render", type=float, default=0.5, help="seconds the fake takes per image")
    ap.add_argument("--probes", type=int, default=20, help="/list_jobs calls on the quiet app")
    args = ap.parse_args()
    ratios = {**app_under_load(args.sessions, args.render, args.probes), **zip_refusal()}
    targets = {"list_jobs_p95_vs_compares": 0.5, "compares_vs_serial": 0.5, "zip_refusal_vs_listing": 3.0}
    print("RESULT " + " ".join(f"{k}={v:.2f}x" + ("" if v < targets.get(k, float("inf"))
                                                  else f" TARGET MISSED (< {targets[k]:g}x)")
                               for k, v in ratios.items()))


if __name__ == "__main__":
    main()
