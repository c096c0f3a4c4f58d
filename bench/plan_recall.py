"""On paper: Llama-3.1-8B at 128k on one 141 GiB GPU, a tiered ``recall`` cache against full 16-bit and full+tq4.

Hot tier in HBM, cold tier in host RAM (``--host``, default 2 TiB: a DGX H200 node's 2 TB shared by 8 GPUs would be
256 GiB each, also printed). Decode-step time from :func:`kvslim.plan_tiers.decode_step_time` (H200 HBM3e
4.8 TB/s, PCIe 5.0 x16 ~55 GB/s effective; serial = no overlap of HBM and link, overlapped = the larger).
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json

from kvslim.plan import GiB, fit
from kvslim.plan_tiers import RecallPlan, decode_step_time, fit_tiered
from kvslim.presets import get_preset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--hbm", type=float, default=141, help="GPU memory, GiB")
    ap.add_argument("--host", default="256,2048", help="host RAM for the cold tier, GiB (comma-separated)")
    args = ap.parse_args()
    spec, n, hbm = get_preset(args.model), args.context, int(args.hbm * GiB)
    rows = []
    for fmt in ("bf16", "tq4"):
        f = fit(spec, n, hbm, fmt)
        b = int(f["sequences"])
        t = decode_step_time(spec, n, max(1, b), cache="full", fmt=fmt)
        rows.append({"cache": f"full {fmt}", "host_gib": 0, "sequences": b, "limit": "hbm",
                     "hot_gib_per_seq": f["kv_bytes_per_sequence"] / GiB, "cold_gib_per_seq": 0.0,
                     "step_ms_serial": 1e3 * t["serial_s"], "step_ms_overlapped": 1e3 * t["overlapped_s"]})  # fmt: skip
    for cold in ("bf16", "fp8"):
        p = RecallPlan(cold_fmt=cold)
        for host in [float(x) for x in args.host.split(",")]:
            f = fit_tiered(spec, n, hbm, int(host * GiB), p)
            b = f["sequences"]
            t = decode_step_time(spec, n, max(1, b), p)
            rows.append({"cache": f"recall (cold {cold})", "host_gib": host, "sequences": b, "limit": f["limit"],
                         "hot_gib_per_seq": f["hot_per_sequence"] / GiB, "cold_gib_per_seq": f["cold_per_sequence"] / GiB,
                         "step_ms_serial": 1e3 * t["serial_s"], "step_ms_overlapped": 1e3 * t["overlapped_s"]})  # fmt: skip
    print(f"{args.model} at {n} tokens, {args.hbm:g} GiB HBM (H200 HBM3e 4.8 TB/s, PCIe 5.0 x16 55 GB/s effective)")
    print(f"{'cache':22} {'host GiB':>8} {'seqs':>5} {'limit':>5} {'hot GiB/seq':>11} {'cold GiB/seq':>12} "
          f"{'step ms (serial / overlapped)':>30}")  # fmt: skip
    for r in rows:
        print(f"{r['cache']:22} {r['host_gib']:8g} {r['sequences']:5d} {r['limit']:>5} {r['hot_gib_per_seq']:11.3f} "
              f"{r['cold_gib_per_seq']:12.3f} {r['step_ms_serial']:14.1f} / {r['step_ms_overlapped']:.1f}")  # fmt: skip
    print(json.dumps({"bench": "plan_recall", "model": args.model, "context": n, "rows": rows}))


if __name__ == "__main__":
    main()
