"""First and second load time of each embedded model, into a fresh kvslim cache.

The first load dequantises the GGUF file with transformers and writes the safetensors cache; the second reads it.

    python bench/load_times.py                      # both embedded models
    python bench/load_times.py --models smollm2-135m

Prints a table, then one JSON line; writes results/load_times.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m", help="comma-separated embedded model names")
    args = ap.parse_args()
    os.environ["KVSLIM_CACHE"] = tempfile.mkdtemp(prefix="kvslim-load-")  # before kvslim reads it
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from kvslim.models import load

    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            load(name)
            times.append(time.perf_counter() - t0)
        rows.append({"model": name, "first_s": round(times[0], 2), "second_s": round(times[1], 2)})
    print(f"{'model':<16}{'first load s':>14}{'second load s':>15}")
    for r in rows:
        print(f"{r['model']:<16}{r['first_s']:>14.2f}{r['second_s']:>15.2f}")
    out = Path("results") / "load_times.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(json.dumps({"bench": "load_times", "rows": rows}))


if __name__ == "__main__":
    main()
