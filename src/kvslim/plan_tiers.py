"""The planner for tiered caches (``recall``): hot / cold / fetched bytes, a GPU decode-step time, and what fits.

Conventions follow :mod:`kvslim.plan` (``n`` = context including the current query, bytes from the byte contract
of :mod:`kvslim.formats`, batch 1 unless stated). For a full-attention GQA layer under ``recall`` with sinks ``S``,
window ``W``, block ``m``, ``k`` blocks per KV head and ``nbr`` neighbours:

* blocks out of the window ``nb = max(0, (n - W - S) // m)``; exact window ``n - S - nb*m`` tokens;
* **hot** (GPU memory): sinks + window K/V in ``window_fmt``, ``v`` summary vectors per block per KV head in
  ``summary_fmt`` (``v`` = 1 mean, 2 bbox, r reps);
* **cold** (host RAM or disk): the K/V of the ``nb*m`` tokens that left the window, in ``cold_fmt``;
* per decode step the attention **reads** every hot byte (scoring reads all summaries) and **fetches**
  ``min(nb, k (2 nbr + 1)) * m`` tokens per KV head from the cold tier.

Sliding layers (Gemma 3 local) stay as the model was trained: hot, window K/V in ``window_fmt``. MLA / V4 layers
are refused. Side tensors of a real cache (validity masks, positions) are not counted here: they are below 1 % of
the hot bytes at m >= 16 and are in ``cache.nbytes()``.

:func:`decode_step_time` turns bytes into seconds for one GPU: HBM bytes (weights once per step + every
sequence's hot bytes) over ``hbm_bw``, fetched bytes over ``link_bw``, both serial (no overlap, an upper bound) and
overlapped (the larger of the two, a lower bound). Defaults: H200 HBM3e 4.8 TB/s; PCIe 5.0 x16 at about 55 GB/s
effective host-to-device (64 GB/s raw). These are assumptions, stated in every result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import InvalidInput
from .formats import check_format, vectors_nbytes, weight_bytes_per_param
from .spec import ArchSpec, GQALayer

__all__ = ["H200_HBM_BW", "PCIE5_X16_BW", "RecallPlan", "decode_step_time", "fit_tiered", "recall_bytes"]

H200_HBM_BW = 4.8e12  # bytes/s, H200 HBM3e (NVIDIA spec)
PCIE5_X16_BW = 55e9  # bytes/s, PCIe 5.0 x16 host->device, effective (64 GB/s raw)


@dataclass(frozen=True)
class RecallPlan:
    """Parameters of a ``recall`` cache for the planner (defaults = the ``recall`` preset)."""

    m: int = 32
    k: int = 8
    w: int = 128
    sinks: int = 4
    summary: str = "bbox"
    r: int = 2
    nbr: int = 0
    summary_fmt: str = "fp8"
    window_fmt: str = "bf16"
    cold_fmt: str = "bf16"

    def __post_init__(self) -> None:
        for f in (self.summary_fmt, self.window_fmt, self.cold_fmt):
            check_format(f)
        if min(self.m, self.k, self.w) < 1 or self.sinks < 0 or self.nbr < 0:
            raise InvalidInput(f"recall plan needs m, k, w >= 1 and sinks, nbr >= 0: {self}")
        if self.summary not in ("mean", "bbox", "reps"):
            raise InvalidInput(f"summary must be mean, bbox or reps, got {self.summary!r}")

    @property
    def vectors(self) -> int:
        return {"mean": 1, "bbox": 2, "reps": self.r}[self.summary]


def _kv(fmt: str, layer: GQALayer, tokens: int) -> int:
    return layer.n_kv_heads * (
        vectors_nbytes(fmt, layer.head_dim, tokens, "key") + vectors_nbytes(fmt, layer.dv, tokens, "value")
    )


def recall_bytes(spec: ArchSpec, n: int, p: RecallPlan | None = None, batch: int = 1) -> dict[str, Any]:
    """Per ``batch`` sequences at context ``n``: ``hot``, ``cold``, ``hot_read`` and ``fetched`` bytes per decode
    step, ``fetched_tokens`` per KV head per global layer, and ``full16`` (a 16-bit full cache) for comparison."""
    p = p or RecallPlan()
    hot = cold = fetched = full16 = 0
    tokens = 0
    for layer in spec.layers:
        if not isinstance(layer, GQALayer):
            raise InvalidInput(f"recall plans GQA/MHA/MQA layers only, not {layer.kind}")
        full16 += _kv("bf16", layer, layer.stored_tokens(n))
        if layer.window is not None:  # a sliding layer: kept as trained
            hot += _kv(p.window_fmt, layer, layer.stored_tokens(n))
            continue
        nb = max(0, (n - p.w - p.sinks) // p.m)
        exact = n - nb * p.m
        hot += _kv(p.window_fmt, layer, exact)
        hot += layer.n_kv_heads * vectors_nbytes(p.summary_fmt, layer.head_dim, nb * p.vectors, "key")
        cold += _kv(p.cold_fmt, layer, nb * p.m)
        tokens = min(nb, p.k * (2 * p.nbr + 1)) * p.m
        fetched += _kv(p.cold_fmt, layer, tokens)
    out = {"hot": hot, "cold": cold, "hot_read": hot, "fetched": fetched, "full16": full16}
    out = {k: v * batch for k, v in out.items()}
    out["fetched_tokens"] = tokens
    out["fetched_share"] = tokens / n
    out["plan"] = asdict(p)
    return out


def decode_step_time(spec: ArchSpec, n: int, batch: int, p: RecallPlan | None = None, *,
                     hbm_bw: float = H200_HBM_BW, link_bw: float = PCIE5_X16_BW,
                     weights_format: str = "bf16", cache: str = "recall", fmt: str = "bf16") -> dict[str, Any]:  # fmt: skip
    """Seconds of one decode step for ``batch`` sequences: weights + hot bytes over HBM, fetched bytes over the host
    link. ``cache="full"``: a plain cache in ``fmt`` held in HBM (nothing fetched)."""
    weights = spec.active_params() * weight_bytes_per_param(weights_format)
    if cache == "recall":
        b = recall_bytes(spec, n, p, batch)
        hbm, link = weights + b["hot_read"], b["fetched"]
    elif cache == "full":
        from .plan import decode_read_bytes

        hbm, link = weights + batch * decode_read_bytes(spec, n, fmt), 0
    else:
        raise InvalidInput(f"cache must be 'recall' or 'full', got {cache!r}")
    t_hbm, t_link = hbm / hbm_bw, link / link_bw
    return {
        "hbm_bytes": int(hbm), "link_bytes": int(link), "hbm_s": t_hbm, "link_s": t_link,
        "serial_s": t_hbm + t_link, "overlapped_s": max(t_hbm, t_link),
        "assumed": {"hbm_bw": hbm_bw, "link_bw": link_bw, "weights_format": weights_format},
    }


def fit_tiered(spec: ArchSpec, n: int, hbm_bytes: int, host_bytes: int, p: RecallPlan | None = None,
               weights_format: str = "bf16") -> dict[str, Any]:  # fmt: skip
    """Sequences of context ``n`` that fit with the hot tier in ``hbm_bytes`` (next to the weights) and the cold
    tier in ``host_bytes``; ``limit`` says which memory runs out first."""
    weights = int(spec.total_params() * weight_bytes_per_param(weights_format))
    b = recall_bytes(spec, n, p)
    by_hbm = max(0, (hbm_bytes - weights) // b["hot"]) if b["hot"] else 0
    by_host = host_bytes // b["cold"] if b["cold"] else by_hbm
    return {
        "weights_bytes": weights, "hot_per_sequence": b["hot"], "cold_per_sequence": b["cold"],
        "by_hbm": int(by_hbm), "by_host": int(by_host), "sequences": int(min(by_hbm, by_host)),
        "limit": "hbm" if by_hbm <= by_host else "host",
    }
