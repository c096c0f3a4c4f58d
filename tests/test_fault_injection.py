"""Issue 15, fault injection: a tiny-model grid run in subprocesses, SIGKILLed at random points, then two writers
started at once on the same folder, then a final run. Afterwards every cell is present exactly once and every line of
results.jsonl is a valid record. Bounded to about a minute (tiny model; the time goes into process start-up)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import kvslim
from kvslim.eval.harness.store import ResultStore

SRC = str(Path(kvslim.__file__).resolve().parents[1])  # the kvslim under test, for subprocesses
GRID = ["-m", "tiny-llama", "-l", "500,700", "-d", "0,0.25,0.5,0.75,1", "-r", "full,window:w=64", "--threads", "1"]
CELLS = 2 * 5 * 2


def _start(out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.Popen([sys.executable, "-m", "kvslim", "niah", *GRID, "-o", str(out), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _lines(out: Path) -> int:
    p = out / "results.jsonl"
    return p.read_bytes().count(b"\n") if p.is_file() else 0


def test_sigkill_at_random_points_and_two_writers_lose_and_double_nothing(tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    out = tmp_path / "run"
    deadline = time.monotonic() + 150
    kills = 0
    for _ in range(2):  # start, wait for progress, kill at a random moment of the writing
        before = _lines(out)
        proc = _start(out)
        while proc.poll() is None and _lines(out) <= before and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.25))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=60)
        if _lines(out) >= CELLS:
            break
    a, b = _start(out), _start(out)  # two writers at once: one writes, the other is refused (or finds it done)
    results = [(p.wait(timeout=120), p.communicate()[1].decode()) for p in (a, b)]
    for code, err in results:
        assert code == 0 or (code == 2 and "being written by another kvslim run" in err), (seed, code, err)
        assert "Traceback" not in err, (seed, err)
    final = _start(out)
    code = final.wait(timeout=120)
    stdout, stderr = final.communicate()
    assert code == 0 and "Traceback" not in stderr.decode(), (seed, stderr)
    assert json.loads(stdout.decode().strip().splitlines()[-1])["ran"] == 0, (seed, stdout)
    found = ResultStore(out).read()
    keys = [(r["recipe"], r["length"], r["depth"]) for r in found.records]
    assert found.bad == [] and found.duplicates == [], (seed, found.bad, found.duplicates)
    assert len(keys) == CELLS == len(set(keys)), seed
    assert (out / "results.jsonl").read_bytes().count(b"\n") == CELLS, seed  # not a line more on disk
    assert kills >= 1, seed  # the kills did happen (the grid is long enough to be caught mid-run)
