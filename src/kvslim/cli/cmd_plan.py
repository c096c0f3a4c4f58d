"""``kvslim plan``: KV bytes, read bytes and FLOPs per token for a model at given contexts, against a baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from ..formats import FORMATS
from ._common import console, fmt_bytes, one_line_errors, print_json

DEFAULT_LADDER = (1 << 12, 1 << 15, 1 << 17, 1 << 20)  # 4k, 32k, 128k, 1M


def _ctx_label(n: int) -> str:
    if n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n % (1 << 10) == 0:
        return f"{n >> 10}k"
    return f"{n:,}"


def _row(spec: Any, n: int, fmt: Any, base: dict[str, Any] | None) -> dict[str, Any]:
    from ..plan.accounting import decode_flops, decode_read_bytes, kv_breakdown

    parts = kv_breakdown(spec, n, fmt)
    kv = sum(parts.values())
    flops = decode_flops(spec, n)
    row: dict[str, Any] = {
        "model": spec.name,
        "context": n,
        "kv_bytes": kv,
        "kv_breakdown": parts,
        "bytes_per_token": kv / n,
        "read_bytes": decode_read_bytes(spec, n, fmt),
        "decode_flops": flops["total"],
        "decode_flops_breakdown": flops,
    }
    if base is not None:
        row["kv_ratio"] = kv / base["kv_bytes"]
        row["flops_ratio"] = flops["total"] / base["decode_flops"]
    return row


def _plot(path: Path, specs: list[Any], contexts: list[int], fmt: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plan.accounting import GiB, kv_bytes

    lo, hi = min(1024, min(contexts)), max(contexts)
    grid = sorted({int(lo * (hi / lo) ** (i / 60)) for i in range(61)} | set(contexts))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for spec in specs:
        line = ax.plot(grid, [kv_bytes(spec, n, fmt) / GiB for n in grid], label=spec.name)[0]
        ax.scatter(contexts, [kv_bytes(spec, n, fmt) / GiB for n in contexts], color=line.get_color(), s=14)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("KV cache per sequence (GiB)")
    ax.set_title(f"KV cache vs context ({fmt})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _recipes(spec: Any, recipes: list[str], context: str | None, dtype: str, allow: bool, as_json: bool,
             tiers: dict[str, Any]) -> None:  # fmt: skip
    """The recipe table; ``tiers``: ``gpu`` (a GPU for the decode-step time), ``memory`` / ``host`` (for --fit)."""
    from ..cache.recipe import parse_recipe
    from ..plan.accounting import GiB, check_context, parse_contexts
    from ..plan.tiers import fit_tiers, step_time, tier_price

    parsed = {str(r): r for r in map(parse_recipe, ["full", *recipes])}  # parsed once; spellings of one recipe: one
    names = list(parsed.values())
    contexts = parse_contexts(context) if context else [n for n in DEFAULT_LADDER if n < spec.max_context] + [spec.max_context]
    for n in contexts:
        check_context(spec, n, allow)
    gpu, memory, wf = tiers.get("gpu"), tiers.get("memory"), tiers["weights_format"]
    rows = [{"model": spec.name, "context": n, **tier_price(spec, r, n, dtype)} for n in contexts for r in names]
    for r in rows:
        if memory is not None:
            r["fit"] = fit_tiers(spec, r, memory, tiers.get("host"), wf)
        if gpu is not None:  # one step of the sequences that fit (or of one sequence)
            r["step"] = step_time(spec, r, max(1, r["fit"]["sequences"]) if "fit" in r else 1, gpu, wf)
    if as_json:
        print_json({"model": spec.name, "dtype": dtype, "contexts": contexts, "rows": rows,
                    **{k: v for k, v in tiers.items() if k != "gpu"}, "gpu": gpu and gpu.name})  # fmt: skip
        return
    out = console if console.is_terminal else Console(width=200)  # piped: the tier columns need the room
    out.print(f"[bold]{spec.name}[/]: {spec.n_layers} layers ({spec.kinds_summary()}), model dtype {dtype}", highlight=False)
    cold = any(r["cold"] for r in rows)
    for n in contexts:
        table = Table(title=f"context {_ctx_label(n)} ({n:,} tokens), recipes priced per sequence", padding=(0, 1))
        cols = ["recipe", "KV MiB", "B/token", "read/step", "GFLOP/tok", "vs stock KV"]
        cols += ["cold MiB", "fetched/step"] if cold else []
        cols += ["seqs fit", "limit"] if memory is not None else []
        cols += ["step ms (serial / overlapped)"] if gpu is not None else []
        for c in cols:
            table.add_column(c, justify="left" if c == "recipe" else "right", no_wrap=True)
        for r in (r for r in rows if r["context"] == n):
            cells = [r["recipe"], f"{r['kv_bytes'] / (GiB >> 10):,.2f}", f"{r['kv_bytes'] / n:,.0f}",
                     fmt_bytes(r["read_bytes"]), f"{r['decode_flops'] / 1e9:,.3f}", f"{r['kv_ratio']:.1%}"]  # fmt: skip
            if cold:
                cells += [f"{r['cold'] / (GiB >> 10):,.2f}", fmt_bytes(r["fetched"])]
            if memory is not None:
                cells += [f"{r['fit']['sequences']:,}", r["fit"]["limit"]]
            if gpu is not None:
                t = r["step"]
                cells += [f"{t['batch']} seqs: {1e3 * t['serial_s']:,.1f} / {1e3 * t['overlapped_s']:,.1f}"]
            table.add_row(*cells)
        out.print(table)
    out.print("[dim]KV = bytes the cache's tensors hold in GPU memory (the hot tier; codec constants aside), the number "
              "nbytes() measures; read/step = bytes one decode step reads from it; cold = bytes held off the GPU "
              "(host RAM or disk), fetched/step = cold bytes one decode step copies in; FLOPs = 2 x active params + "
              "attention core[/]")  # fmt: skip
    if memory is not None:
        host = tiers.get("host")
        out.print(f"[dim]fit: {fmt_bytes(memory)} minus {wf} weights for the hot tiers; cold tiers in "
                  f"{fmt_bytes(host) + ' of host memory' if host is not None else 'host memory (not limited: --host)'}; "
                  "activations and runtime overheads not counted[/]")  # fmt: skip
    if gpu is not None:
        out.print(f"[dim]step: assumed {gpu.describe()}; HBM bytes = {wf} weights (active params) once + every "
                  "sequence's read/step, link bytes = every sequence's fetched/step; serial = HBM + link time (no "
                  "overlap), overlapped = the larger[/]")  # fmt: skip


def _tier_options(gpu: str | None, do_fit: bool, memory: str | None, host: str | None, wf: str) -> dict[str, Any]:
    from ..errors import InvalidInput
    from ..formats import weight_bytes_per_param
    from ..plan.accounting import parse_bytes
    from ..plan.tiers import get_gpu

    g = get_gpu(gpu) if gpu is not None else None
    weight_bytes_per_param(wf)  # validates the name
    if memory is not None and not do_fit:
        raise InvalidInput("--memory is only used with --fit")
    if do_fit and memory is None and g is None:
        raise InvalidInput("--fit needs --memory (e.g. --memory 141GiB) or --gpu")
    mem = parse_bytes(memory) if memory is not None else (g.memory if do_fit and g is not None else None)
    return {"gpu": g, "memory": mem, "host": parse_bytes(host) if host is not None else None, "weights_format": wf}


def plot_suffixes() -> tuple[str, ...]:
    """File extensions matplotlib can write (``.png``, ``.pdf``, ``.svg``, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return tuple(f".{k}" for k in FigureCanvasBase.get_supported_filetypes())


def register(app: typer.Typer) -> None:
    @app.command("plan")
    @one_line_errors
    def plan_cmd(
        model: str = typer.Argument(..., help="Preset name (listed above) or a config.json path / model folder."),
        baseline: str | None = typer.Option(None, "--baseline", "-b", help="Model to compare against: adds KV and FLOPs ratios."),
        context: str | None = typer.Option(
            None, "--context", "-c",
            help="Comma-separated contexts in tokens; k = 1024, M = 2^20 = 1,048,576 (e.g. 1M,128k,8k). "
            "Default: 4k, 32k, 128k, 1M up to the smallest maximum context of the models.",
        ),
        kv_format: str = typer.Option(
            "bf16", "--kv-format", "-f",
            help=f"Storage format (kvslim.formats): one name for every component ({', '.join(FORMATS)}), "
            "'production' (V3.2: 656 B FP8 MLA + FP8 indexer; V4: 584 B entries + FP4 indexer; others bf16), or per "
            "component: kv=fp8_ds_v4,index=fp4.",
        ),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object (rows: model, context, kv_bytes, decode_flops, ...)."),
        plot: Path | None = typer.Option(
            None, "--plot", help="Also draw KV GiB against context (log-log) to this image file (.png, .pdf, .svg, ...)."
        ),
        do_fit: bool = typer.Option(False, "--fit", help="Say how many sequences of each context fit in --memory next to the weights."),
        memory: str | None = typer.Option(
            None, "--memory", help="Device memory for --fit, e.g. 141GiB (2^30 B) or 80GB (10^9 B); a whole number of bytes."
        ),
        weights_format: str = typer.Option("bf16", "--weights-format", help="Weight storage for --fit: bf16, fp16, fp32, fp8 or fp4 (with block scales)."),
        allow_beyond_max: bool = typer.Option(False, "--allow-beyond-max", help="Plan contexts above a model's maximum context."),
        recipe: list[str] | None = typer.Option(
            None, "--recipe", "-r",
            help="Price a kvslim recipe on the model (repeatable; METHOD[:key=value,...][+CODEC], see `kvslim recipes`): "
            "bytes stored, bytes read per decode step and decode FLOPs, beside `full`; --kv-format is then the "
            "model's dtype.",
        ),
        gpu: str | None = typer.Option(
            None, "--gpu", help="With --recipe: estimate the decode-step time on this GPU (h200, h100, a100) from its "
            "memory bandwidth and host link (the assumed figures are printed); with --fit, its memory is the default "
            "--memory.",
        ),
        host: str | None = typer.Option(
            None, "--host", help="With --recipe --fit: host memory for the cold tiers, e.g. 256GiB (default: not limited)."
        ),
    ) -> None:
        """Plan KV-cache memory and decode cost: per context, KV GiB per sequence, bytes per token, bytes read
        per decode step and decode GFLOPs per token (a multiply-add = 2 FLOPs), with ratios to --baseline.

        Presets: deepseek-v3, deepseek-v3.2, deepseek-v4-flash, deepseek-v4-pro, llama-3.1-8b, llama-3.1-70b,
        qwen2.5-7b, gemma3-270m, smollm2-135m."""
        from ..errors import InvalidInput
        from ..formats import parse_kv_format, weight_bytes_per_param
        from ..paths import check_output_file
        from ..plan.accounting import GiB, check_context, fit, parse_bytes, parse_contexts
        from ..plan.presets import resolve_spec

        if plot is not None:  # before any work: a plot path that cannot be written is refused first
            check_output_file(plot, "--plot", plot_suffixes())
        spec = resolve_spec(model)
        if (gpu is not None or host is not None) and not recipe:
            raise InvalidInput("--gpu and --host price tiered recipes: give --recipe")
        if host is not None and not do_fit:
            raise InvalidInput("--host is only used with --fit")
        if recipe:
            if baseline or plot is not None:
                raise InvalidInput("--recipe prices recipes on one model; it does not combine with --baseline or --plot")
            tiers = _tier_options(gpu, do_fit, memory, host, weights_format)
            _recipes(spec, recipe, context, kv_format, allow_beyond_max, as_json, tiers)
            return
        base = resolve_spec(baseline) if baseline else None
        specs = [spec] + ([base] if base is not None else [])
        fmt = parse_kv_format(kv_format)
        if do_fit and memory is None:
            raise InvalidInput("--fit needs --memory, e.g. --memory 141GiB")
        if memory is not None and not do_fit:
            raise InvalidInput("--memory is only used with --fit")
        mem = parse_bytes(memory) if memory is not None else None
        if do_fit:
            weight_bytes_per_param(weights_format)  # validates the name
        if context is None:
            top = min(s.max_context for s in specs)
            contexts = [n for n in DEFAULT_LADDER if n < top] + [top]
        else:
            contexts = parse_contexts(context)
        for s in specs:
            for n in contexts:
                check_context(s, n, allow_beyond_max)

        rows: list[dict[str, Any]] = []
        for n in contexts:
            base_row = _row(base, n, fmt, None) if base is not None else None
            for s in specs:
                row = base_row if s is base else _row(s, n, fmt, base_row)
                if s is base and base_row is not None:
                    row = {**base_row, "kv_ratio": 1.0, "flops_ratio": 1.0}
                if mem is not None:
                    row["fit"] = fit(s, n, mem, fmt, weights_format)
                rows.append(row)
        if plot is not None:
            _plot(plot, specs, contexts, fmt)

        if as_json:
            out: dict[str, Any] = {"model": spec.name, "baseline": base.name if base else None,
                                   "kv_format": str(fmt), "contexts": contexts, "rows": rows}  # fmt: skip
            if mem is not None:
                out["memory_bytes"], out["weights_format"] = mem, weights_format
            if plot is not None:
                out["plot"] = str(plot)
            print_json(out)
            return
        out_console = console if console.is_terminal else Console(width=150)  # piped: don't squeeze to 80 columns
        for s in specs:
            out_console.print(f"[bold]{s.name}[/]: {s.n_layers} layers ({s.kinds_summary()}); "
                          f"{s.total_params() / 1e9:.1f}B params, {s.active_params() / 1e9:.1f}B active", highlight=False)  # fmt: skip
        for n in contexts:
            table = Table(title=f"context {_ctx_label(n)} ({n:,} tokens), KV format {fmt}", padding=(0, 1))
            cols = ["model", "KV GiB", "B/token", "read/step", "GFLOP/tok"]
            if base is not None:
                cols += ["KV ratio", "FLOP ratio"]
            if mem is not None:
                cols += ["weights", "seqs fit"]
            for c in cols:
                table.add_column(c, justify="left" if c == "model" else "right", no_wrap=True)
            for r in (r for r in rows if r["context"] == n):
                cells = [r["model"], f"{r['kv_bytes'] / GiB:.3f}", f"{r['bytes_per_token']:,.0f}",
                         fmt_bytes(r["read_bytes"]), f"{r['decode_flops'] / 1e9:,.1f}"]  # fmt: skip
                if base is not None:
                    cells += [f"{r['kv_ratio']:.1%}", f"{r['flops_ratio']:.1%}"]
                if mem is not None:
                    f = r["fit"]
                    fits = f"{f['sequences']:,}" if f["free_bytes"] > 0 else "weights don't fit"
                    cells += [fmt_bytes(f["weights_bytes"]), fits]
                table.add_row(*cells)
            out_console.print(table)
        if any(layer.state_floats() for sp in specs for layer in sp.layers):
            out_console.print("[dim]KV includes the V4 compressors' fp32 state (constant per sequence); "
                              "read/step = KV bytes one decode step reads[/]")  # fmt: skip
        if mem is not None:
            out_console.print(f"[dim]fit: {fmt_bytes(mem)} minus {weights_format} weights; activations and runtime "
                          "overheads not counted[/]")  # fmt: skip
        if plot is not None:
            out_console.print(f"[dim]plot written to {plot}[/]")
