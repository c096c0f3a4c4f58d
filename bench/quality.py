"""Next-token loss on natural text per recipe, side by side with the full cache (a quick quality check).

For each model: ``--tokens`` tokens of ``pydoc_data.topics`` text; prefill the first ``--prefix`` tokens in one
shot, then feed the rest one token at a time (so the compressed path is the decode path) and report the mean
cross-entropy (nats) of the tokens after the prefix, and its difference to ``full``. Prints a table, then one JSON
line; writes ``results/quality.json``::

    python bench/quality.py --models smollm2-135m,gemma3-270m --recipes full,v4+tq3,v4+tq4,v4+fp8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def nll(model, ids: torch.Tensor, recipe: str, prefix: int) -> float:
    from kvslim.cache import make_cache

    cache = make_cache(model, recipe)
    with torch.inference_mode():
        logits = [model(ids[:, :prefix], cache=cache, logits_to_keep=1).logits]
        for t in range(prefix, ids.shape[1] - 1):
            logits.append(model(ids[:, t : t + 1], cache=cache).logits)
    lg = torch.cat(logits, 1)[0].float()
    return torch.nn.functional.cross_entropy(lg, ids[0, prefix:]).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--recipes", default="full,stream,csa,hca,v4,v4+fp8,v4+tq4,v4+tq3,latent32")
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--prefix", type=int, default=300)
    ap.add_argument("--out", default="results/quality.json")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from kvslim.cache.methods.latent.calibration import _calibration_text
    from kvslim.models import load

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if "full" not in recipes:
        recipes.insert(0, "full")
    rows = []
    print(f"{'model':14} {'recipe':22} {'nll':>7} {'vs full':>8}", flush=True)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model, tok = load(name)
        ids = tok(_calibration_text(args.tokens * 8), return_tensors="pt")["input_ids"][:, : args.tokens]
        base = None
        for r in recipes:
            v = nll(model, ids, r, args.prefix)
            base = v if r == "full" else base
            row = {"model": name, "recipe": r, "nll": round(v, 4), "delta_vs_full": round(v - base, 4) if base else 0.0}
            rows.append(row)
            print(f"{name:14} {r:22} {v:7.3f} {row['delta_vs_full']:+8.3f}", flush=True)
    result = {"bench": "quality", "tokens": args.tokens, "prefix": args.prefix, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
