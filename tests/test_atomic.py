"""The atomic-write helper: a process killed mid-write leaves the old file or the new one, never a
torn one. A child rewrites one file in a loop with two different contents and says so after each
write; it is killed (SIGKILL) after a random number of them, while the next write is under way,
many times, and the file is checked after each kill."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from services.storage import atomic

ROOT = Path(__file__).resolve().parent.parent
SIZE = 4 * 2**20  # big enough that a kill lands mid-write often
WRITER = f"""
import sys
from services.storage import atomic
target = sys.argv[1]
a, b = b"a" * {SIZE}, b"b" * {SIZE}
i = 0
while True:
    atomic.write_bytes(target, b if i % 2 else a)
    print(i, flush=True)  # one whole version is on disk; the next write starts at once
    i += 1
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_a_write_killed_at_any_moment_leaves_one_whole_version(tmp_path):
    target, rng = tmp_path / "state.bin", random.Random(7)
    for round_ in range(12):
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], cwd=ROOT, stdout=subprocess.PIPE,
                                 text=True)
        try:
            for _ in range(1 + rng.randrange(4)):  # a random number of whole writes, then kill it
                assert child.stdout.readline(), "the writer died on its own"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(30)
            child.stdout.close()
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
