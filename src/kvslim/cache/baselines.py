"""The eviction baselines as :class:`~kvslim.cache.evict.Policy` objects, and a cache of them for a stock model.

======================  ==========  =======================================================================
name                    when        keeps (per layer and KV head)
======================  ==========  =======================================================================
``streaming``           continuous  ``sinks`` first tokens + the most recent (StreamingLLM, Xiao et al. 2023)
``snapkv``              one-shot    the observation window (last ``window`` prompt tokens) + the tokens those
                                    queries attend to most, pooled (Li et al. 2024)
``tova``                continuous  the tokens the current query attends to most, averaged over the layer's heads
                                    (Oren et al. 2024)
``h2o``                 continuous  accumulated attention ("heavy hitters") + ``recent`` x budget recent tokens
                                    (Zhang et al. 2023)
``knorm``               one-shot    the keys of lowest L2 norm (Devoto et al. 2024)
======================  ==========  =======================================================================

Text form: ``NAME[:key=value,...][+CODEC]``, e.g. ``tova:keep=0.5``, ``snapkv:keep=0.25,window=32+tq4``;
``keep`` is the keep ratio in (0, 1] (1: lossless), ``budget`` a fixed token budget instead.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from ..errors import InvalidInput
from .evict import EvictLayer, Policy
from .scores import causal_probs, keep_budget, key_norm_scores, snapkv_scores, tova_scores

__all__ = ["BASELINES", "H2O", "KeyNorm", "SnapKV", "Streaming", "TOVA", "make_evict_cache", "parse_baseline"]


@dataclass(frozen=True)
class Streaming(Policy):
    sinks: int = 4
    continuous = True

    def protect(self, budget: int) -> tuple[int, int]:
        return self.sinks, budget  # everything after the sinks goes to the most recent tokens

    def scores(self, q, k, held, scaling, softcap, acc):
        return torch.zeros(k.shape[:3], device=k.device)


@dataclass(frozen=True)
class SnapKV(Policy):
    window: int = 32
    kernel: int = 7
    pool: str = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise InvalidInput(f"snapkv: window (observation window) must be at least 1, got {self.window}")
        snapkv_scores(torch.zeros(1, 1, 1, 1, 1), self.kernel, self.pool)  # refuses a bad kernel / pooling

    def check_prompt(self, n: int) -> None:
        keep_budget(n, self.ratio, self.budget)
        if self.window > n:
            raise InvalidInput(f"snapkv: observation window {self.window} is longer than the {n}-token prompt; "
                               f"use window <= {n}")

    def protect(self, budget: int) -> tuple[int, int]:
        return 0, self.window

    def scores(self, q, k, held, scaling, softcap, acc):
        w = self.window
        n = k.shape[2]
        probs = causal_probs(q[:, :, -w:], k, scaling, softcap, first=n - w)
        return snapkv_scores(probs, self.kernel, self.pool)


@dataclass(frozen=True)
class TOVA(Policy):
    per_head: int = 0
    continuous = True

    def scores(self, q, k, held, scaling, softcap, acc):
        n = k.shape[2]
        probs = causal_probs(q[:, :, -1:], k, scaling, softcap, first=n - 1)
        return tova_scores(probs, per_head=bool(self.per_head))


@dataclass(frozen=True)
class H2O(Policy):
    recent: float = 0.5
    continuous = True
    accumulates = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.recent < 1:
            raise InvalidInput(f"h2o: recent (share of the budget kept as recent tokens) must be in [0, 1), got {self.recent}")

    def protect(self, budget: int) -> tuple[int, int]:
        return 0, round(self.recent * budget)

    def scores(self, q, k, held, scaling, softcap, acc):
        return acc


@dataclass(frozen=True)
class KeyNorm(Policy):
    def scores(self, q, k, held, scaling, softcap, acc):
        return key_norm_scores(k)


BASELINES: dict[str, type[Policy]] = {"streaming": Streaming, "snapkv": SnapKV, "tova": TOVA, "h2o": H2O, "knorm": KeyNorm}


def parse_baseline(text: str) -> tuple[Policy, str]:
    """``(policy, codec)`` from ``NAME[:key=value,...][+CODEC]``; bad names and keys are refused naming the valid ones."""
    from ..recipe import CODECS

    structure, plus, codec = text.strip().partition("+")
    codec = codec if plus else "none"
    if codec not in CODECS:
        raise InvalidInput(f"unknown storage codec {codec!r} in {text!r}; valid codecs: {', '.join(CODECS)}")
    name, _colon, args = structure.partition(":")
    if name not in BASELINES:
        raise InvalidInput(f"unknown eviction method {name!r}; known: {', '.join(BASELINES)}")
    cls = BASELINES[name]
    types = {f.name: f.type for f in fields(cls)}
    kw: dict[str, Any] = {}
    for token in filter(None, args.split(",")):
        key, _eq, value = token.partition("=")
        key = {"keep": "ratio"}.get(key.strip(), key.strip())
        if key not in types:
            raise InvalidInput(f"{name} has no parameter {key!r}; valid keys: keep, {', '.join(k for k in types if k != 'ratio')}")
        conv = {"float": float, "int": int, "str": str}[str(types[key])]
        try:
            kw[key] = conv(value)
        except ValueError:
            raise InvalidInput(f"{name}: {key} must be a {types[key]}, got {value!r}") from None
    return cls(**kw), codec


def make_evict_cache(model: Any, text: str, seed: int = 0) -> Any:
    """A kvslim cache for ``model``: eviction on the global (full-attention) layers, the model's own window kept
    exact on sliding layers (as every kvslim recipe does); switches the model to the ``kvslim`` attention."""
    from ..recipe import LayerSpec, parse_recipe
    from .attention import ATTN_NAME, current_attn, ensure_registered, switch_attention
    from .build import KvslimCache, _layer_types, _text_config
    from .layer import KvslimLayer
    from .storage import make_storage_codec

    policy, codec = parse_baseline(text)
    cfg = _text_config(model)
    window = getattr(cfg, "sliding_window", None)
    pool: dict[tuple, Any] = {}

    def factory(name: str) -> Any:
        def make(dim: int, role: str) -> Any:
            key = (name, dim, role if name.startswith("kivi") else "")
            if key not in pool:
                pool[key] = make_storage_codec(name, dim, seed, role=role)
            return pool[key]

        return make

    layers: list[Any] = []
    for lt in _layer_types(cfg):
        if lt in ("sliding_attention", "chunked_attention"):
            spec = LayerSpec(window=window, sliding=window, codec="none" if codec == "none" else "fp16", label="local")
            layers.append(KvslimLayer(spec, factory(spec.codec), None))
        else:
            layers.append(EvictLayer(policy, factory(codec)))
    ensure_registered()
    previous = current_attn(model)
    switch_attention(model, ATTN_NAME)
    return KvslimCache(layers, parse_recipe("full+" + codec if codec != "none" else "full"), model,
                       previous if previous != ATTN_NAME else "sdpa")
