"""Compression recipes: what each layer of a stock model keeps in its KV cache, and in which storage format.

A recipe is ``STRUCTURE[:key=value,...][+CODEC]``, for example::

    full                      every token exact (a DynamicCache equivalent)
    window:w=256,sinks=4      StreamingLLM: the first 4 tokens and the last 256 (older ones are dropped)
    blocks:m=4,k=32,w=128     CSA-like: tokens leaving the window pooled 4 to 1, top-32 blocks per query
    heavy:m=64,w=128          HCA-like: pooled 64 to 1, every entry attended
    v4                        CSA and HCA layers alternating (DeepSeek V4 style), window 128 + 4 sinks
    latent:r=64               MLA-like: keys and values stored as r-dim projections on a calibrated basis
    v4+tq3                    any structure, entries stored with a kvslim.quant codec

``full_first=n`` (any structure) keeps the first n global (full-attention) layers exact. Named presets (``list_recipes()``) are
recipe strings under a short name. ``parse_recipe`` validates everything it can without a model; ``kvslim.make_cache``
checks what needs the model (head dim vs rank, codec availability) before allocating anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInput

__all__ = [
    "CODECS",
    "KINDS",
    "PRESETS",
    "LayerSpec",
    "Recipe",
    "list_recipes",
    "parse_recipe",
]

# storage codecs: name -> description. "none" stores in the model's own dtype (lossless).
CODECS: dict[str, str] = {
    "none": "model dtype, lossless",
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "fp8": "e4m3 codes + one fp32 scale per 128 values (kvslim.quant)",
    "fp4": "e2m1 codes + ue8m0 scale per 32 values (kvslim.quant)",
    "tq1": "TurboQuant-MSE 1 bit (kvslim.quant)",
    "tq2": "TurboQuant-MSE 2 bits (kvslim.quant)",
    "tq2.5": "TurboQuant-MSE 2.5 bits, outlier channels at 3 (kvslim.quant)",
    "tq3": "TurboQuant-MSE 3 bits (kvslim.quant)",
    "tq3.5": "TurboQuant-MSE 3.5 bits, outlier channels at 4 (kvslim.quant)",
    "tq4": "TurboQuant-MSE 4 bits (kvslim.quant)",
    "tqprod2": "TurboQuant-prod 2 bits: 1-bit MSE + 1-bit QJL residual sketch (kvslim.quant)",
    "tqprod3": "TurboQuant-prod 3 bits (kvslim.quant)",
    "tqprod4": "TurboQuant-prod 4 bits (kvslim.quant)",
    "kivi2": "KIVI 2 bits, keys per channel, values per token (kvslim.quant)",
    "kivi4": "KIVI 4 bits (kvslim.quant)",
}

POOLS = ("mean", "norm", "attn")

# parameter: (type, default, one-line meaning)
_COMMON: dict[str, tuple[type, Any, str]] = {
    "full_first": (int, 0, "keep the first n global (full-attention) layers exact"),
}
_WQ = {"wq": (int, 0, "1: the exact window is stored through the codec too (as V4 does); 0: kept 16-bit")}
_WINDOW = {"w": (int, 256, "exact recent tokens"), "sinks": (int, 4, "exact first tokens"), **_WQ}
_BLOCKS = {
    "m": (int, 4, "tokens pooled into one entry"),
    "k": (int, 32, "blocks attended per query (0 = all)"),
    "w": (int, 128, "exact recent tokens"),
    "sinks": (int, 4, "exact first tokens"),
    "overlap": (int, 0, "extra earlier tokens pooled into each entry"),
    "pool": (str, "mean", "pooling weights: mean | norm (key-norm softmax) | attn (observed attention)"),
    **_WQ,
}
_HEAVY = {
    "m": (int, 64, "tokens pooled into one entry"),
    "w": (int, 128, "exact recent tokens"),
    "sinks": (int, 4, "exact first tokens"),
    "pool": (str, "mean", "pooling weights: mean | norm | attn"),
    **_WQ,
}
_V4 = {
    "m": (int, 4, "CSA layers: tokens pooled into one entry"),
    "k": (int, 32, "CSA layers: blocks attended per query"),
    "overlap": (int, 4, "CSA layers: extra earlier tokens pooled (V4 pools 8 at stride 4)"),
    "hm": (int, 64, "HCA layers: tokens pooled into one entry"),
    "w": (int, 128, "exact recent tokens (every compressed layer)"),
    "sinks": (int, 4, "exact first tokens"),
    "pool": (str, "mean", "pooling weights: mean | norm | attn"),
    **_WQ,
}
_RECALL = {
    "m": (int, 32, "tokens per block (one summary each)"),
    "k": (int, 8, "blocks fetched from the cold tier per query and KV head (0 = all: lossless)"),
    "w": (int, 128, "exact recent tokens"),
    "sinks": (int, 4, "exact first tokens"),
    "summary": (str, "bbox", "block summary: mean | bbox (Quest min/max bound) | reps (r representative keys)"),
    "r": (int, 2, "reps: representative keys per block"),
    "nbr": (int, 0, "neighbour blocks fetched on each side of a selected block"),
    "gqa": (str, "max", "combine a KV group's query heads: max | sum"),
    "store": (str, "ram", "cold tier: ram | disk (memory-mapped files)"),
    "cold": (str, "none", "codec of the cold tier: none (exact) | fp16 | bf16 | fp8 | fp4 | tq1..tq4"),
    "dir": (str, "", "disk: folder for the cold files (default: a temporary folder, removed with the cache)"),
    "prefill": (str, "dense", "prefill attention: dense (exact, cold read in chunks) | select (top-k per query)"),
}
_LATENT = {"r": (int, 64, "latent rank per KV head (<= head dim)"), "calib": (int, 2048, "calibration tokens")}

# kind -> (one-line description, parameters)
KINDS: dict[str, tuple[str, dict[str, tuple[type, Any, str]]]] = {
    "full": ("every token exact (DynamicCache equivalent)", {}),
    "window": ("StreamingLLM window + attention sinks; older tokens dropped", _WINDOW),
    "blocks": ("CSA-like: tokens leaving the window pooled m:1, top-k blocks per query", _BLOCKS),
    "heavy": ("HCA-like: tokens leaving the window pooled m:1, all entries attended", _HEAVY),
    "v4": ("DeepSeek-V4-like interleave: CSA and HCA layers alternate over the global layers", _V4),
    "latent": ("MLA-like low-rank keys/values on a basis calibrated on pydoc_data.topics", _LATENT),
    "recall": ("tiered: block summaries + window hot, exact tokens cold, top-k blocks fetched per query", _RECALL),
}

# named presets: name -> (recipe text, description)
PRESETS: dict[str, tuple[str, str]] = {
    "stream": ("window:w=256,sinks=4", "StreamingLLM: 4 sinks + 256 recent tokens"),
    "csa": ("blocks:m=4,k=32,w=128", "CSA-like 4:1 pooling with top-32 block selection"),
    "hca": ("heavy:m=64,w=128", "HCA-like 64:1 pooling, dense over entries"),
    "v4-fp8": ("v4+fp8", "V4 interleave with FP8 entries (DeepSeek's production format)"),
    "v4-tq3": ("v4+tq3", "V4 interleave with 3-bit TurboQuant entries"),
    "latent32": ("latent:r=32", "rank-32 latent keys and values (half of SmolLM2's head dim, 1/8 of Gemma 3's)"),
    "full-kivi2": ("full+kivi2", "every token kept, KIVI 2-bit"),
    "recall": ("recall+fp8", "tiered: FP8 bbox summaries per 32 tokens + 128-token window hot, exact tokens cold, top-8 blocks"),
}


@dataclass(frozen=True)
class LayerSpec:
    """What one cache layer does. ``window=None`` means unbounded (nothing leaves the exact region).

    mode: ``exact`` (tokens kept, maybe windowed/dropped), ``blocks`` (pooled entries), ``latent`` (low-rank).
    ``sliding`` is the model's own local window (Gemma 3 local layers), always kept exact as the model expects.
    """

    mode: str = "exact"
    window: int | None = None
    sinks: int = 0
    block: int = 1
    topk: int = 0
    overlap: int = 0
    pool: str = "mean"
    rank: int = 0
    codec: str = "none"
    sliding: int | None = None
    label: str = "full"
    window_codec: str = ""  # storage of the exact window when it differs from ``codec`` ("" = same)
    options: tuple[tuple[str, Any], ...] = ()  # every parameter of the recipe, for kinds that read more


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. ``params`` holds every parameter of ``kind`` (defaults filled in)."""

    kind: str
    params: tuple[tuple[str, Any], ...] = ()
    codec: str = "none"
    full_first: int = 0
    text: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidInput(f"unknown recipe {self.kind!r}; known: {', '.join([*KINDS, *PRESETS])}")
        if self.codec not in CODECS:
            raise InvalidInput(f"unknown storage codec {self.codec!r}; known: {', '.join(CODECS)}")
        spec = KINDS[self.kind][1]
        p = dict(self.params)
        for key in p:
            if key not in spec:
                raise InvalidInput(f"recipe {self.kind!r} has no parameter {key!r}; valid keys: {_valid_keys(self.kind)}")
        for key, (_typ, default, _doc) in spec.items():
            p.setdefault(key, default)
        object.__setattr__(self, "params", tuple(sorted(p.items())))
        if self.full_first < 0:
            raise InvalidInput(f"full_first must be >= 0, got {self.full_first}")
        for key in ("m", "hm", "r", "calib"):
            if key in p and p[key] <= 0:
                raise InvalidInput(f"{self.kind}: {key} must be positive, got {p[key]}")
        for key in ("w",):
            if key in p and p[key] < 1:
                raise InvalidInput(f"{self.kind}: w (window) must be at least 1, got {p[key]}")
        for key in ("k", "sinks", "overlap"):
            if key in p and p[key] < 0:
                raise InvalidInput(f"{self.kind}: {key} must be >= 0, got {p[key]}")
        if "wq" in p and p["wq"] not in (0, 1):
            raise InvalidInput(f"{self.kind}: wq must be 0 or 1, got {p['wq']}")
        if "pool" in p and p["pool"] not in POOLS:
            raise InvalidInput(f"{self.kind}: pool must be one of {', '.join(POOLS)}, got {p['pool']!r}")
        if self.kind == "recall":
            _check_recall(p)

    def get(self, key: str) -> Any:
        return dict(self.params)[key]

    def __str__(self) -> str:
        defaults = {k: d for k, (_t, d, _doc) in KINDS[self.kind][1].items()}
        parts = [f"{k}={v}" for k, v in self.params if defaults.get(k) != v]
        if self.full_first:
            parts.append(f"full_first={self.full_first}")
        text = self.kind + (":" + ",".join(parts) if parts else "")
        return text + (f"+{self.codec}" if self.codec != "none" else "")

    def layer_specs(self, layer_types: list[str], sliding_window: int | None) -> list[LayerSpec]:
        """One ``LayerSpec`` per model layer. Local (sliding) layers keep their native window exactly: in the model
        dtype with codec ``none``, else in 16 bits (their size is bounded by the window; quantizing them costs Gemma 3
        270M far more accuracy than it saves memory at long context). The first ``full_first`` global layers are exact (for models without local layers: the first
        ``full_first`` layers); the structure applies to the remaining global layers."""
        p = dict(self.params)
        # the exact window of a compressed layer: 16-bit unless wq=1 (lossless recipes keep the model dtype)
        wcodec = "" if (self.codec == "none" or p.get("wq")) else "fp16"
        specs: list[LayerSpec] = []
        n_global = 0  # compressed global layers so far (v4 alternates on it)
        n_seen_global = 0
        for i, lt in enumerate(layer_types):
            if lt in ("sliding_attention", "chunked_attention"):
                local_codec = "none" if self.codec == "none" else "fp16"
                specs.append(LayerSpec(window=sliding_window, sliding=sliding_window, codec=local_codec, label="local"))
                continue
            if lt != "full_attention":
                raise InvalidInput(f"layer {i} has type {lt!r}, which kvslim caches do not support (full/sliding only)")
            if n_seen_global < self.full_first or self.kind == "full":
                n_seen_global += 1
                specs.append(LayerSpec(codec=self.codec, label="full"))
                continue
            n_seen_global += 1
            if self.kind == "window":
                specs.append(
                    LayerSpec(window=p["w"], sinks=p["sinks"], codec=self.codec, window_codec=wcodec, label="window")
                )
            elif self.kind in ("blocks", "heavy"):
                specs.append(
                    LayerSpec(
                        mode="blocks", window=p["w"], sinks=p["sinks"], block=p["m"], topk=p.get("k", 0),
                        overlap=p.get("overlap", 0), pool=p["pool"], codec=self.codec, label=self.kind,
                        window_codec=wcodec,
                    )
                )
            elif self.kind == "v4":
                csa = n_global % 2 == 0
                specs.append(
                    LayerSpec(
                        mode="blocks", window=p["w"], sinks=p["sinks"], block=p["m"] if csa else p["hm"],
                        topk=p["k"] if csa else 0, overlap=p["overlap"] if csa else 0, pool=p["pool"],
                        codec=self.codec, label="csa" if csa else "hca", window_codec=wcodec,
                    )
                )
            elif self.kind == "recall":
                specs.append(
                    LayerSpec(
                        mode="recall", window=p["w"], sinks=p["sinks"], block=p["m"], topk=p["k"], codec=self.codec,
                        label="recall", window_codec=wcodec, options=tuple(p.items()),
                    )
                )
            else:  # latent
                specs.append(LayerSpec(mode="latent", rank=p["r"], codec=self.codec, label="latent"))
            n_global += 1
        return specs


def _check_recall(p: dict[str, Any]) -> None:
    from .cache.cold import COLD_STORES
    from .cache.summaries import GQA_MODES, SUMMARIES

    choices = {"summary": SUMMARIES, "gqa": GQA_MODES, "store": COLD_STORES, "prefill": ("dense", "select")}
    for key, allowed in choices.items():
        if p[key] not in allowed:
            raise InvalidInput(f"recall: {key} must be one of {', '.join(allowed)}, got {p[key]!r}")
    if p["r"] < 1:
        raise InvalidInput(f"recall: r must be at least 1, got {p['r']}")
    if p["cold"] not in CODECS or p["cold"].startswith("kivi") or p["cold"] in ("tq2.5", "tq3.5"):
        raise InvalidInput(f"recall: cold codec must be none, fp16, bf16, fp8, fp4, tq1..tq4 or tqprod2..4, got {p['cold']!r}")
    if p["dir"] and p["store"] != "disk":
        raise InvalidInput("recall: dir= names the folder of the disk store; add store=disk")


def _valid_keys(kind: str) -> str:
    return ", ".join([*KINDS[kind][1], *_COMMON]) or "full_first"


def _convert(kind: str, key: str, raw: str) -> Any:
    typ = KINDS[kind][1][key][0] if key in KINDS[kind][1] else _COMMON[key][0]
    if typ is int:
        try:
            return int(raw)
        except ValueError:
            raise InvalidInput(f"{kind}: {key} must be an integer, got {raw!r}") from None
    return raw


def parse_recipe(text: str | Recipe) -> Recipe:
    """Parse ``STRUCTURE[:key=value,...][+CODEC]`` or a preset name into a validated :class:`Recipe`.

    Raises ``InvalidInput`` naming the bad token and listing what is valid there.
    """
    if isinstance(text, Recipe):
        return text
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput("empty recipe: give e.g. 'full', 'window:w=256,sinks=4' or 'v4+tq3' (see `kvslim recipes`)")
    raw = text.strip()
    if raw in PRESETS:
        return parse_recipe(PRESETS[raw][0])
    structure, plus, codec = raw.partition("+")
    codec = codec.strip() if plus else "none"
    if plus and not codec:
        raise InvalidInput(f"recipe {raw!r} ends with '+': name a codec ({', '.join(CODECS)})")
    if codec not in CODECS:
        raise InvalidInput(f"unknown storage codec {codec!r} in {raw!r}; valid codecs: {', '.join(CODECS)}")
    name, colon, arg_text = structure.partition(":")
    name = name.strip()
    if name in PRESETS and not colon:
        base = parse_recipe(PRESETS[name][0])
        return Recipe(base.kind, base.params, codec if plus else base.codec, base.full_first, text=raw)
    if name not in KINDS:
        raise InvalidInput(f"unknown recipe {name!r} in {raw!r}; valid names: {', '.join([*KINDS, *PRESETS])}")
    params: dict[str, Any] = {}
    full_first = 0
    if colon:
        if not arg_text.strip():
            raise InvalidInput(f"recipe {raw!r} has ':' but no parameters; valid keys: {_valid_keys(name)}")
        for token in arg_text.split(","):
            key, eq, value = (s.strip() for s in token.partition("="))
            if not eq or not key or not value:
                raise InvalidInput(f"bad token {token.strip()!r} in {raw!r}: expected key=value; valid keys: {_valid_keys(name)}")
            if key not in KINDS[name][1] and key not in _COMMON:
                raise InvalidInput(f"unknown key {key!r} in {raw!r}; valid keys for {name}: {_valid_keys(name)}")
            if key in params or (key == "full_first" and full_first):
                raise InvalidInput(f"key {key!r} given twice in {raw!r}")
            if key == "full_first":
                full_first = _convert(name, key, value)
            else:
                params[key] = _convert(name, key, value)
    return Recipe(name, tuple(params.items()), codec, full_first, text=raw)


def list_recipes() -> list[dict[str, Any]]:
    """Every recipe kind and preset: ``{"name", "description", "parameters", "recipe"}`` (parameters as
    ``{key: "default - meaning"}``), then the codecs as ``+name`` entries."""
    out: list[dict[str, Any]] = []
    for kind, (desc, spec) in KINDS.items():
        params = {k: f"{d} - {doc}" for k, (_t, d, doc) in {**spec, **_COMMON}.items()}
        out.append({"name": kind, "description": desc, "parameters": params, "recipe": kind})
    for name, (text, desc) in PRESETS.items():
        out.append({"name": name, "description": desc, "parameters": {}, "recipe": text})
    for name, desc in CODECS.items():
        if name != "none":
            out.append({"name": f"+{name}", "description": f"storage codec: {desc}", "parameters": {}, "recipe": f"full+{name}"})
    return out
