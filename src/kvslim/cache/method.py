"""The method registry: a compression method is a :class:`Method` subclass registered under its recipe name.

A method file (``kvslim/cache/methods/<name>.py``) holds

* its parameter dataclass (a :class:`Params` subclass whose fields are made with :func:`param`: default, one-line
  meaning, range; ``__post_init__`` refuses bad values with a one-line ``InvalidInput``);
* its :class:`Method` subclass, decorated with :func:`register`: the recipe name, a one-line summary, flags the
  contract test reads (``lossless`` parameter sets, lossy ``examples``, ``chunk_invariant``, ``exactness``), its
  per-model checks (:meth:`Method.check`) and its per-layer schedule (:meth:`Method.global_spec`);
* its per-layer spec (a :class:`~kvslim.cache.base.LayerSpec` subclass) and cache-layer class (a
  :class:`~kvslim.cache.base.BaseLayer` subclass), whose ``predict`` gives the bytes and FLOPs the planner prices.

The registry holds classes, not instances: ``get_method(name)(params, codec)`` makes a configured method. This module
imports nothing heavy; :func:`methods` imports the built-in method package (named in :data:`PACKAGES`) on first use.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import InvalidInput
from ..hf_config import LOCAL_TYPES

__all__ = ["INT64_MAX", "LOSSLESS_CONTEXT", "PACKAGES", "Method", "ModelShape", "Params", "get_method", "methods",
           "param", "register"]  # fmt: skip

INT64_MAX = 2**63 - 1
LOSSLESS_CONTEXT = 256  # a method's ``lossless`` parameter sets are lossless for contexts below this many tokens
_REGISTRY: dict[str, type[Method]] = {}
# Packages whose import registers methods (each method file calls :func:`register`), imported by name on first use:
# the registry sits below the methods and never imports them as code. The built-ins are one package.
PACKAGES: list[str] = ["kvslim.cache.methods"]


def param(default: Any, meaning: str, *, lo: int | None = None, choices: tuple | None = None,
          message: str = "") -> Any:  # fmt: skip
    """A parameter field: ``default``, its one-line ``meaning``, an int lower bound ``lo`` or allowed ``choices``;
    ``message`` replaces the default range message (``{key}``/``{value}`` are filled in)."""
    return field(default=default, metadata={"meaning": meaning, "lo": lo, "choices": choices, "message": message})


@dataclass(frozen=True)
class Params:
    """Base of every method's parameters: checks every field against its :func:`param` metadata. Ints must be
    ints that fit in int64; ``lo`` bounds them below; ``choices`` lists the allowed values."""

    method: ClassVar[str] = ""
    #: Defaults that changed after records were written, as they were: ``{key: earlier default}``. Canonical recipe
    #: strings (what results stores and reports key rows by) omit a parameter only when it equals its *recorded*
    #: default, so a preset's string and every stored row keep their meaning when a default changes.
    recorded: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_value(self.method, f.name, getattr(self, f.name), f.default, f.metadata)

    @classmethod
    def spec(cls) -> dict[str, tuple[type, Any, str]]:
        """``{key: (type, default, meaning)}`` in declaration order."""
        return {f.name: (type(f.default), f.default, f.metadata.get("meaning", "")) for f in dataclasses.fields(cls)}

    @classmethod
    def record_defaults(cls) -> dict[str, Any]:
        """``{key: default}`` as canonical strings omit them: the defaults, the :attr:`recorded` ones where a
        default changed."""
        return {f.name: cls.recorded.get(f.name, f.default) for f in dataclasses.fields(cls)}


def check_value(method: str, key: str, value: Any, default: Any, md: Any) -> None:
    where = f"{method}: " if method else ""
    if isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidInput(f"{where}{key} must be an integer, got {value!r}")
        if not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise InvalidInput(f"{where}{key}={value} does not fit in a 64-bit integer")
    elif isinstance(default, str) and not isinstance(value, str):
        raise InvalidInput(f"{where}{key} must be a string, got {value!r}")
    lo, choices, msg = md.get("lo"), md.get("choices"), md.get("message")
    bad = (lo is not None and value < lo) or (choices is not None and value not in choices)
    if not bad:
        return
    if msg:
        raise InvalidInput(where + msg.format(key=key, value=value))
    if choices is not None:
        allowed = " or ".join(map(str, choices)) if len(choices) == 2 else "one of " + ", ".join(map(str, choices))
        raise InvalidInput(f"{where}{key} must be {allowed}, got {value!r}")
    raise InvalidInput(f"{where}{key} must be {'positive' if lo == 1 else f'>= {lo}'}, got {value}")


@dataclass(frozen=True)
class ModelShape:
    """What a method needs to know about a model: per-layer types (transformers' names), heads, head dim, the local
    window, the storage format of its dtype (what codec ``none`` stores) and whether it has RoPE."""

    layer_types: tuple[str, ...]
    heads: int
    kv_heads: int
    head_dim: int
    sliding_window: int | None = None
    dtype: str = "fp32"
    has_rope: bool = True
    name: str = ""

    @classmethod
    def from_model(cls, model: Any) -> ModelShape:
        """From a loaded transformers model (config facts, parameter dtype, its rotary module)."""
        from ..hf_config import read
        from .rope import inv_freq_for_layer

        f = read(model.config)
        dtype = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}.get(str(model.dtype), "fp32")
        rope = all(inv_freq_for_layer(model, t) is not None for t in set(f.layer_types))
        return cls(f.layer_types, f.heads, f.kv_heads, f.head_dim, f.sliding_window, dtype, rope, f.model_type)


class Method:
    """A configured compression method: ``Method(params, codec)``; subclasses are registered with :func:`register`.

    Class attributes: ``name``, ``summary`` (one line), ``Params``; for the contract test ``lossless`` (parameter
    sets under which the method is lossless below ``LOSSLESS_CONTEXT`` tokens), ``examples`` (small lossy settings
    for the tiny test models), ``chunk_invariant`` (one-shot == chunked == token-by-token prefill), ``exactness``
    (``"tokens"``: the lossless set is token-identical to ``DynamicCache``; ``"float"``: equal up to float rounding);
    ``needs_rope`` (pools or projects pre-RoPE keys); ``shares_context_prefill`` (a first forward call attends over
    every new token at model precision whatever the parameters, and compresses only after it: two such recipes
    compute the same context prefill, so the harness records it once and replays it into the others
    (:mod:`kvslim.eval.harness.share`, checking every layer's output); its layer class declares the same flag).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params
    lossless: ClassVar[tuple[dict[str, Any], ...]] = ({},)
    examples: ClassVar[tuple[dict[str, Any], ...]] = ()
    chunk_invariant: ClassVar[bool] = True
    exactness: ClassVar[str] = "tokens"
    needs_rope: ClassVar[bool] = False
    # the family package a method belongs to ("evict": the field's eviction baselines, "recall", "latent"; empty
    # for a stand-alone method): benchmarks and reports read it instead of keeping lists of method names
    family: ClassVar[str] = ""
    shares_context_prefill: ClassVar[bool] = False

    def __init__(self, params: Params | None = None, codec: str = "none") -> None:
        self.params = params if params is not None else self.Params()
        self.codec = codec

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params}, codec={self.codec!r})"

    @classmethod
    def lossless_params(cls, shape: ModelShape) -> list[dict[str, Any]]:
        """The lossless parameter sets for ``shape`` (a method whose set depends on the model overrides this)."""
        return [dict(p) for p in cls.lossless]

    def check(self, shape: ModelShape) -> list[str]:
        """Reasons this method cannot run on ``shape`` (empty when it can)."""
        if self.needs_rope and not shape.has_rope:
            return [f"{self.name} pools or projects pre-RoPE keys, but the model has no rotary embedding"]
        return []

    @property
    def min_prefill_chunk(self) -> int:
        """The fewest tokens per forward call over which ``chunk_invariant`` holds: 1, or 2 where the method has a
        ``prefill=dense`` parameter (recall), whose dense prefill treats a one-token call as a decode step (it
        selects blocks), so one-token chunks compute something else than one call."""
        return 2 if getattr(self.params, "prefill", None) == "dense" else 1

    def window_codec(self) -> str:
        """Storage of a compressed layer's exact window: 16-bit unless ``wq=1`` (lossless recipes keep the dtype)."""
        return "" if (self.codec == "none" or getattr(self.params, "wq", 0)) else "fp16"

    def global_spec(self, index: int) -> Any:
        """The spec of the ``index``-th compressed global layer (0-based, after the ``full_first`` exact ones)."""
        raise NotImplementedError

    def layer_specs(self, layer_types: list[str] | tuple[str, ...], sliding_window: int | None,
                    full_first: int = 0) -> list[Any]:  # fmt: skip
        """One spec per model layer. Local (sliding) layers keep their native window exactly: in the model dtype
        with codec ``none``, else in 16 bits (bounded by the window; quantizing them costs Gemma 3 270M far more
        accuracy than it saves memory at long context). The first ``full_first`` global layers are exact; the
        method applies to the remaining global layers."""
        from .base import LayerSpec

        specs: list[Any] = []
        n_global = 0
        for i, lt in enumerate(layer_types):
            if lt in LOCAL_TYPES:
                local = "none" if self.codec == "none" else "fp16"
                specs.append(LayerSpec(window=sliding_window, sliding=sliding_window, codec=local, label="local"))
                continue
            if lt != "full_attention":
                raise InvalidInput(f"layer {i} has type {lt!r}, which kvslim caches do not support (full/sliding only)")
            if n_global < full_first:
                specs.append(LayerSpec(codec=self.codec, label="full"))
            else:
                specs.append(self.global_spec(n_global - full_first))
            n_global += 1
        return specs

    def prepare(self, model: Any, specs: list[Any], tokenizer: Any = None) -> dict[int, dict[str, Any]]:
        """Per-layer extras computed from the model before the cache is built (latent: calibrated bases)."""
        return {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` the method of recipe name ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise InvalidInput(f"method name {cls.name!r} is empty or registered twice")
    cls.Params.method = cls.name
    _REGISTRY[cls.name] = cls
    return cls


def methods() -> dict[str, type[Method]]:
    """Every registered method by recipe name (the packages of :data:`PACKAGES` are imported on first use)."""
    for package in PACKAGES:
        importlib.import_module(package)
    return dict(_REGISTRY)


def get_method(name: str) -> type[Method] | None:
    return methods().get(name)
