"""Shared by the vLLM engine tests (test_engine.py, test_recall_engine.py): the engine process's environment, one
offline engine run in a fresh process (:mod:`kvslim.vllm.run`), and the prompts (a shared prefix, so the second batch
hits the prefix cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["BATCHES", "PREFIX", "engine_env", "run_engine"]

PREFIX = (
    "The lighthouse keeper wrote in his log every evening. He noted the wind, the colour of the sea, the ships that "
    "passed and the birds that rested on the gallery rail. Over forty years the log grew to nineteen volumes. "
) * 5
BATCHES = [
    [PREFIX + "On the last page of the final volume he wrote:"],
    [PREFIX + "The first volume begins with the words", PREFIX + "Visitors who read the log were surprised that",
     "List three colours of the sea:"],
]


def engine_env() -> dict[str, str]:
    """This process's environment without a kvslim selection (each spec names its own), one engine thread."""
    env = dict(os.environ)
    for k in ("KVSLIM_VLLM_FORMAT", "KVSLIM_VLLM_COLD_BYTES"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="nobind", TOKENIZERS_PARALLELISM="false")
    return env


def run_engine(spec: dict, tmp_path: Path, name: str, timeout: int = 900) -> dict:
    """Run one offline engine configuration (:mod:`kvslim.vllm.run`) in a fresh process: its result dict, with the
    process's output under ``log``."""
    spec_file, out_file = tmp_path / f"{name}.json", tmp_path / f"{name}.out.json"
    spec_file.write_text(json.dumps(spec))
    r = subprocess.run([sys.executable, "-m", "kvslim.vllm.run", str(spec_file), str(out_file)], env=engine_env(),
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"engine run {name} failed ({r.returncode}):\n" + r.stderr[-4000:])
    out = json.loads(out_file.read_text())
    out["log"] = r.stdout + r.stderr
    return out
