"""Which tiered layer a lost needle cell needs: rerun one cell with one `recall` layer's parameters overridden.

Builds the prompt of one cell (task, length, depth, seed, as ``kvslim niah`` does), prefills it into a cache of
RECIPE (in 512-token chunks, like the Gemma grid), greedily decodes the answer and prints it, once per override
``LAYER:key=value,...`` (e.g. ``5:k=0,pin=0,span=1``: every block in layer 5, the other layers as RECIPE; ``-`` runs
RECIPE unchanged). With each run it prints the asked needle's tokens with the block each lies in and, per tiered layer, the blocks pinned after the prefill and the blocks
holding the asked needle's tokens. A diagnostic, not a recipe: the override is applied to the layer objects of one
cache. Used for the "span=2" section of docs/recall.md:

    python bench/recall_layer_probe.py --model gemma3-270m --task distractor --length 8000 --depth 0.5 --seed 0 \\
        --recipe "recall:k=16,pin=4+fp8" - 5:k=0,pin=0 11:k=0,pin=0 17:k=0,pin=0 5:k=128,pin=0
"""

from __future__ import annotations

import argparse
import dataclasses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="+", help="LAYER:key=value,... or - (RECIPE unchanged)")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--task", default="distractor")
    ap.add_argument("--length", type=int, default=8000)
    ap.add_argument("--depth", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipe", default="recall-fp8")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk (0: one call)")
    args = ap.parse_args()

    import torch

    from kvslim.cache import make_cache
    from kvslim.cache.methods.recall.recall import RecallLayer, RecallParams
    from kvslim.errors import InvalidInput
    from kvslim.eval.harness.engine import PrefillPlan, eos_ids, greedy, prefill
    from kvslim.eval.harness.loading import load_pair
    from kvslim.eval.tasks.base import get_task

    def parse(text: str) -> tuple[int | None, dict]:
        if text == "-":
            return None, {}
        layer, _, kv = text.partition(":")
        fields = {f.name: f.type for f in dataclasses.fields(RecallParams)}
        out = {}
        for item in filter(None, kv.split(",")):
            key, _, val = item.partition("=")
            if key not in fields:
                raise SystemExit(f"error: {key!r} is not a recall parameter ({', '.join(fields)})")
            out[key] = int(val) if val.lstrip("-").isdigit() else val
        if not layer.isdigit():
            raise SystemExit(f"error: {text!r}: write LAYER:key=value,... (LAYER a layer index) or -")
        return int(layer), out

    plans = [(o, *parse(o)) for o in args.overrides]
    torch.set_num_threads(1)
    model, tok = load_pair(args.model)
    p = get_task(args.task).build(tok, args.length, args.depth, args.seed)
    print(f"answers {p.answers}; needles at {p.needle_positions}; {len(p.ids)} tokens")
    for text, layer, kw in plans:
        try:
            cache = make_cache(model, args.recipe)
        except InvalidInput as e:
            raise SystemExit(f"error: {e}") from None
        tiered = [x for x in cache.layers if isinstance(x, RecallLayer)]
        if layer is not None:
            hit = [x for x in tiered if x.ctx.index == layer]
            if not hit:
                raise SystemExit(f"error: layer {layer} is not tiered; tiered: {[x.ctx.index for x in tiered]}")
            hit[0].spec = dataclasses.replace(hit[0].spec, p=dataclasses.replace(hit[0].spec.p, **kw))
        pre = prefill(model, p.ids, cache, plan=PrefillPlan(chunk=args.chunk))
        out = greedy(model, pre, p.max_new_tokens, eos_ids(tok, model))
        print(f"{text}: {tok.decode(out, skip_special_tokens=True)[:24]!r}")
        asked = [(pos, ids) for pos, ids in zip(p.needle_positions, p.needle_ids, strict=True)
                 if any(a in tok.decode(ids) for a in p.answers)]
        if tiered:
            x = tiered[0]
            for pos, ids in asked:  # the asked needle's tokens with the block each lies in
                print("   asked needle: " + " ".join(f"{tok.decode([i])!r}@{(pos + j - x.spec.sinks) // x.m}"
                                                      for j, i in enumerate(ids)))
        for x in tiered:
            needle = sorted({(t - x.spec.sinks) // x.m for t in p.needle_positions})
            pins = x.pinned[0].tolist() if x.spec.p.pin and hasattr(x, "pinned") else "-"
            print(f"   layer {x.ctx.index}: pinned {pins}; needles' first blocks {needle}")
        cache.close()


if __name__ == "__main__":
    main()
