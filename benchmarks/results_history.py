"""How long does the Compare tab's history take to load with 10,000 results on record?

Run::

    python -m benchmarks.results_history [--results 10000] [--repeat 20]

In one process, over the same 10,000 records of one owner, times the history refresh (the 60
newest records):

* baseline: the earlier ``results/index.jsonl``, which every refresh read whole, parsed, sorted;
* ours: ``ResultStore.list`` over the ``results`` table (indexed by owner and time).

The last line reads ``RESULT refresh_jsonl_ms=... refresh_sqlite_ms=... speedup=...x``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from services.config import Settings
from services.storage.results import ResultRecord, ResultStore

OWNER = "local"


def _records(n: int) -> list[ResultRecord]:
    return [ResultRecord(id=f"r{i:06d}", group_id=f"g{i // 6}", created_at=1_700_000_000.0 + i,
                         provider="cometapi", model="flux-pro-1.1-ultra-finetuned", seed=i,
                         prompt=f"a photo of TOK number {i} on a marble table, soft light", finetune_id="ft-1",
                         strength=1.2, file=f"g{i // 6}/cell-{i}.jpg", latency_s=1.5, params={"width": 1024})
            for i in range(n)]


def _jsonl_refresh(path: Path, limit: int) -> list[ResultRecord]:
    """What a refresh cost before: the whole index file read, parsed and sorted."""
    records = [ResultRecord.from_json(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines()]
    records.sort(key=lambda r: r.created_at, reverse=True)
    return records[:limit]


def _time(fn, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    records = _records(args.results)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp) / "data")
        store = ResultStore(settings)
        store.jobs.add_results(OWNER, [(r.id, r.created_at, json.dumps(asdict(r))) for r in records])
        legacy = Path(tmp) / "index.jsonl"
        legacy.write_text("".join(json.dumps(asdict(r)) + "\n" for r in records), encoding="utf-8")
        assert [r.id for r in store.list(OWNER, 60)] == [r.id for r in _jsonl_refresh(legacy, 60)]
        old = _time(lambda: _jsonl_refresh(legacy, 60), args.repeat)
        new = _time(lambda: store.list(OWNER, 60), args.repeat)
        store.jobs.close()
    print(f"{args.results:,} results, 60 shown: index.jsonl {old * 1000:.1f} ms, SQLite {new * 1000:.2f} ms")
    print(f"RESULT refresh_jsonl_ms={old * 1000:.1f} refresh_sqlite_ms={new * 1000:.2f} speedup={old / new:.0f}x")


if __name__ == "__main__":
    main()
