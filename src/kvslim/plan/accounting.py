"""The planner: bytes stored and read, FLOPs per token and per prefill, and what fits in memory, as pure functions.

Conventions (all functions):

* ``n`` is the context: the tokens visible to the current query, itself included. At context n a full-attention
  layer stores n tokens, a sliding layer min(n, window), a V4 layer min(n, 128) window entries plus n // m
  compressed entries (those whose window has closed), a DSA / CSA layer also one indexer key per token / entry.
* Bytes follow the byte contract of :mod:`kvslim.formats` per cached component (``KVFormat``: ``kv`` and
  ``index``); V4 compressor state is fp32 and counted per request (``include_state``). Per-codec constants
  (rotations, codebooks) are not counted: codecs report them once per layer as ``state_nbytes()``.
* FLOPs: a multiply-add is 2 FLOPs. Decode FLOPs per token = 2 x active weight parameters (attention projections,
  active + shared experts, router, output head) + attention core over the entries attended + indexer scoring over
  every indexer key. MLA decode is counted in absorbed MQA mode, MLA prefill in MHA mode. Norms, biases, RoPE,
  softmax, top-k selection, compressor pooling and V4's hyper-connection mixing are not counted (each well under
  1 % of the total for the presets).
* Sizes are per sequence (batch 1) unless ``batch`` says otherwise; GiB = 2^30 bytes.

:func:`expected_cache_bytes` is the hook that checks real caches against this arithmetic (see its docstring).
"""

from __future__ import annotations

from typing import Any

from ..errors import ContextTooLong, InvalidInput
from ..formats import KVFormat, parse_kv_format, vectors_nbytes, weight_bytes_per_param
from .spec import ArchSpec, GQALayer, MLALayer, Stream, V4Layer

__all__ = [
    "GiB",
    "bytes_per_token",
    "check_cache",
    "check_context",
    "decode_flops",
    "decode_read_bytes",
    "expected_cache_bytes",
    "expected_layer_bytes",
    "fit",
    "kv_breakdown",
    "kv_bytes",
    "layer_format",
    "parse_bytes",
    "parse_contexts",
    "prefill_flops",
]

GiB = 1 << 30


def _fmt(fmt: KVFormat | str) -> KVFormat:
    return fmt if isinstance(fmt, KVFormat) else parse_kv_format(fmt)


def layer_format(layer: Any, component: str, fmt: KVFormat | str) -> str:
    """The storage format name of ``component`` ("kv" or "index") of ``layer`` under ``fmt``.

    ``production`` resolves to ``fp8_ds_mla`` + fp8 indexer for MLA/DSA, ``fp8_ds_v4`` + fp4 indexer for V4 and bf16
    elsewhere. The DeepSeek layouts fit only their own layer kinds, and KIVI only layers with separate K and V."""
    f = _fmt(fmt)
    if f.production:
        if isinstance(layer, MLALayer):
            return "fp8_ds_mla" if component == "kv" else "fp8"
        if isinstance(layer, V4Layer):
            return "fp8_ds_v4" if component == "kv" else "fp4"
        return "bf16"
    name = f.kv if component == "kv" else f.index
    if component == "kv":
        if name == "fp8_ds_mla" and not isinstance(layer, MLALayer):
            raise InvalidInput(f"fp8_ds_mla is DeepSeek V3/V3.2's MLA layout; a {layer.kind} layer cannot use it")
        if name == "fp8_ds_v4" and not isinstance(layer, V4Layer):
            raise InvalidInput(f"fp8_ds_v4 is DeepSeek V4's entry layout; a {layer.kind} layer cannot use it")
        if name.startswith("kivi") and not isinstance(layer, GQALayer):
            raise InvalidInput(f"KIVI stores keys and values differently; a {layer.kind} layer caches shared entries")
    elif name in ("fp8_ds_mla", "fp8_ds_v4"):
        raise InvalidInput(f"{name} is a main-cache layout, not an indexer-key format")
    return name


def _stream_bytes(layer: Any, s: Stream, fmt: KVFormat | str) -> int:
    return s.heads * vectors_nbytes(layer_format(layer, s.component, fmt), s.dim, s.count, s.role)


def kv_breakdown(spec: ArchSpec, n: int, fmt: KVFormat | str = "bf16", batch: int = 1) -> dict[str, int]:
    """Bytes stored at context ``n`` by component: ``kv`` (window + full/compressed entries), ``index`` (indexer keys)
    and ``state`` (fp32 compressor state), for ``batch`` sequences."""
    out = {"kv": 0, "index": 0, "state": 0}
    for layer in spec.layers:
        for s in layer.streams(n):
            out[s.component] += _stream_bytes(layer, s, fmt)
        out["state"] += 4 * layer.state_floats()
    return {k: v * batch for k, v in out.items()}


def kv_bytes(spec: ArchSpec, n: int, fmt: KVFormat | str = "bf16", include_state: bool = True, batch: int = 1) -> int:
    """Total KV-cache bytes at context ``n`` (see :func:`kv_breakdown`)."""
    b = kv_breakdown(spec, n, fmt, batch)
    return b["kv"] + b["index"] + (b["state"] if include_state else 0)


def bytes_per_token(spec: ArchSpec, n: int, fmt: KVFormat | str = "bf16",
                    per_layer: bool = False) -> float | list[float]:  # fmt: skip
    """KV bytes per token at context ``n`` (total / n, state included), for the model or (``per_layer``) per layer."""
    if per_layer:
        return [expected_layer_bytes(layer, n, fmt) / n for layer in spec.layers]
    return kv_bytes(spec, n, fmt) / n


def decode_read_bytes(spec: ArchSpec, n: int, fmt: KVFormat | str = "bf16") -> int:
    """KV bytes one decode step reads at context ``n``: every stored entry for full / sliding / MLA / HCA layers; for
    DSA the top-k latents plus every indexer key; for CSA the window, the top-k entries and every indexer key."""
    total = 0
    for layer in spec.layers:
        att = layer.attended(n)
        for s in layer.streams(n):
            if isinstance(layer, MLALayer) and s.component == "kv":
                s = s._replace(count=att["kv"])
            elif isinstance(layer, V4Layer) and s.name == "compressed":
                s = s._replace(count=att["kv"] - min(n, layer.window))
            total += _stream_bytes(layer, s, fmt)
    return total


def decode_flops(spec: ArchSpec, n: int) -> dict[str, int]:
    """FLOPs of one decoded token at context ``n``: ``projections`` (2 x active params), ``attention`` (core over
    the attended entries), ``indexer`` (scoring every indexer key) and their ``total``."""
    proj = 2 * spec.active_params()
    core = sum(layer.core_flops(n, absorbed=True) for layer in spec.layers)
    index = sum(layer.indexer_flops(n) for layer in spec.layers)
    return {"projections": proj, "attention": core, "indexer": index, "total": proj + core + index}


def prefill_flops(spec: ArchSpec, n_tokens: int) -> dict[str, int]:
    """FLOPs of a causal prefill of ``n_tokens``: projections for every token plus, summed over positions 1..N,
    the attention core (MLA in MHA mode) and indexer scoring; ``attention`` includes the indexer here."""
    proj = 2 * spec.active_params() * n_tokens
    core = sum(layer.core_flops_sum(n_tokens) for layer in spec.layers)
    return {"projections": proj, "attention": core, "total": proj + core}


def fit(spec: ArchSpec, n: int, memory_bytes: int, fmt: KVFormat | str = "bf16",
        weights_format: str = "bf16") -> dict[str, Any]:  # fmt: skip
    """How many sequences of context ``n`` fit in ``memory_bytes`` next to the weights (activations, fragmentation
    and framework overheads not counted). Weights = all weight-matrix parameters x bytes per parameter."""
    weights = int(spec.total_params() * weight_bytes_per_param(weights_format))
    per_seq = kv_bytes(spec, n, fmt)
    free = memory_bytes - weights
    return {
        "weights_bytes": weights,
        "kv_bytes_per_sequence": per_seq,
        "free_bytes": free,
        "sequences": max(0, free // per_seq) if per_seq else 0,
    }


def check_context(spec: ArchSpec, n: int, allow_beyond_max: bool = False) -> int:
    """``n`` if it is a usable context for ``spec``; zero/negative contexts and (unless allowed) contexts above the
    model's maximum raise."""
    if n <= 0:
        raise InvalidInput(f"context must be a positive number of tokens, got {n}")
    if n > spec.max_context and not allow_beyond_max:
        raise ContextTooLong(
            f"context {n:,} is above {spec.name}'s maximum of {spec.max_context:,} tokens; "
            "pass --allow-beyond-max to plan it anyway"
        )
    return n


def parse_contexts(text: str) -> list[int]:
    """``"1M,128k,8k"`` -> [1048576, 131072, 8192]: k = 2^10 tokens, M = 2^20 tokens (1M = 1,048,576, as DeepSeek's
    1M context); plain integers are token counts. Exact (see :mod:`kvslim.units`): zero, negative, fractional
    (``0.8005k``) or beyond-int64 values raise ``InvalidInput``."""
    from ..units import parse_counts

    return parse_counts(text, "context")


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}  # fmt: skip


def parse_bytes(text: str) -> int:
    """``"141GiB"`` -> 151397597184; units B, KB/MB/GB/TB (10^3k) and KiB/MiB/GiB/TiB (2^10k); exact (a size that
    is not a whole number of bytes, e.g. ``0.1B``, or beyond int64 raises ``InvalidInput``)."""
    from ..units import check_int, parse_exact

    value = parse_exact(text, {"": 1, **_UNITS}, "bad memory size", "141GiB, 80GB or 24000000000", "a size")
    return check_int(value, f"memory size {text.strip()!r}")


_HF_SLIDING_COUNTER_BYTES = 8  # DynamicSlidingWindowLayer holds `_sliding_window_tensor`, an int64 scalar


def expected_layer_bytes(layer: Any, n_tokens: int, fmt: KVFormat | str = "fp32", batch: int = 1,
                         layout: str = "plan") -> int:  # fmt: skip
    """Bytes one cache layer should hold after ``n_tokens`` tokens.

    ``layout="plan"``: the planner's own accounting (streams + compressor state), the number a kvslim cache layer's
    ``nbytes()`` minus its ``state_nbytes()`` must equal. ``layout="hf"``: transformers' ``DynamicCache`` for a
    stock GQA layer, measured in transformers 5.24: a full layer keeps all n tokens; ``DynamicSlidingWindowLayer``
    keeps the last ``window - 1`` tokens (the current token makes the window) plus one int64 counter tensor."""
    if layout == "plan":
        return batch * (sum(_stream_bytes(layer, s, fmt) for s in layer.streams(n_tokens)) + 4 * layer.state_floats())
    if layout != "hf":
        raise InvalidInput(f"layout must be 'plan' or 'hf', got {layout!r}")
    if not isinstance(layer, GQALayer) or layer.sinks:
        raise InvalidInput(f"the 'hf' layout models plain DynamicCache layers only, not {layer.kind}")
    if layer.window is None:
        return batch * sum(_stream_bytes(layer, s, fmt) for s in layer.streams(n_tokens))
    kept = GQALayer(layer.n_heads, layer.n_kv_heads, layer.head_dim, layer.v_head_dim, layer.window - 1)
    return batch * sum(_stream_bytes(kept, s, fmt) for s in kept.streams(n_tokens)) + _HF_SLIDING_COUNTER_BYTES


def expected_cache_bytes(spec: ArchSpec, n_tokens: int, fmt: KVFormat | str = "fp32", batch: int = 1,
                         layout: str = "hf") -> int:  # fmt: skip
    """Bytes a whole cache should hold after a prefill of ``n_tokens``: the hook that checks caches against the
    planner. ``kvslim.memory.cache_nbytes(DynamicCache after the prefill)`` equals
    ``expected_cache_bytes(from_config(model.config), n, fmt=<model dtype>)``; a kvslim cache built from a spec
    equals it with ``layout="plan"`` (after subtracting codec ``state_nbytes()``)."""
    return sum(expected_layer_bytes(layer, n_tokens, fmt, batch, layout) for layer in spec.layers)


def check_cache(cache: Any, spec: ArchSpec, n_tokens: int, fmt: KVFormat | str = "fp32", batch: int = 1,
                layout: str = "hf") -> list[tuple[int, int, int]]:  # fmt: skip
    """Per cache layer ``(index, measured, expected)`` for every layer whose bytes differ from the planner's (empty
    when the cache agrees). Measured = ``kvslim.memory.layer_nbytes`` minus the layer's ``state_nbytes()`` (codec
    constants) when it has one; expected = :func:`expected_layer_bytes`. A test asserts ``check_cache(...) == []``."""
    from ..memory import layer_nbytes

    layers = list(getattr(cache, "layers", []))
    if len(layers) != spec.n_layers:
        raise InvalidInput(f"the cache has {len(layers)} layers but the spec {spec.n_layers}")
    out = []
    for i, (held, layer) in enumerate(zip(layers, spec.layers, strict=True)):
        state = getattr(held, "state_nbytes", None)
        measured = layer_nbytes(held) - (int(state()) if callable(state) else 0)
        expected = expected_layer_bytes(layer, n_tokens, fmt, batch, layout)
        if measured != expected:
            out.append((i, measured, expected))
    return out
