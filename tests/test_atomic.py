"""The atomic-write helper: a process killed mid-write leaves the old file or the new one, never a
torn one. A child rewrites one file in a loop with two different contents; it is killed (SIGKILL)
at a random moment, many times, and the file is checked after each kill."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services import atomic

ROOT = Path(__file__).resolve().parent.parent
SIZE = 4 * 2**20  # big enough that a kill lands mid-write often
WRITER = f"""
import sys
from services import atomic
target, ready = sys.argv[1], sys.argv[2]
a, b = b"a" * {SIZE}, b"b" * {SIZE}
atomic.write_bytes(target, a)
open(ready, "w").close()
i = 0
while True:
    atomic.write_bytes(target, b if i % 2 else a)
    i += 1
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_a_write_killed_at_any_moment_leaves_one_whole_version(tmp_path):
    target, rng = tmp_path / "state.bin", random.Random(7)
    for round_ in range(12):
        ready = tmp_path / f"ready-{round_}"
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(ready)], cwd=ROOT)
        try:
            deadline = time.monotonic() + 60
            while not ready.exists():  # the first whole version is on disk
                assert time.monotonic() < deadline and child.poll() is None
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.3))  # then kill it at a random point of its loop
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(30)
        data = target.read_bytes()
        assert len(data) == SIZE and data in (b"a" * SIZE, b"b" * SIZE), (round_, len(data), data[:1], data[-1:])
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".state.bin.")]
    assert all(name.endswith(".tmp") for name in leftovers)  # a killed write's temp file, never the target


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp_file(tmp_path):
    target = tmp_path / "keep.json"
    atomic.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic.replacing(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == '{"v": 1}' and [p.name for p in tmp_path.iterdir()] == ["keep.json"]
    atomic.write_text(target, "secret", mode=0o600)
    assert oct(target.stat().st_mode & 0o777) == "0o600"
