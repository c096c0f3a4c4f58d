"""The planner for tiered caches (``recall``): hot / cold / fetched bytes, a GPU decode-step time, and what fits.

The bytes are the recipe's price (:func:`kvslim.plan.pricing.price_recipe`: the layer classes' ``predict``, what
``nbytes()`` and ``tier_nbytes()`` measure, codec constants aside), so any recipe can be priced; a one-tier recipe
has no cold tier and fetches nothing. Per sequence at context ``n``:

* **hot** = ``kv_bytes`` (GPU memory): for ``recall`` the sinks, the exact window and one summary per block;
* **cold** (host RAM or disk): the K/V of every token that left the window, in the ``cold`` codec;
* **read**: the bytes one decode step reads from GPU memory (every hot byte, and the fetched tokens once copied in);
* **fetched**: the cold bytes one decode step copies over the host link (the top-``k`` blocks per KV head).

:func:`step_time` turns them into seconds for one GPU and ``batch`` sequences: HBM bytes (the weights' active
parameters once per step + every sequence's read bytes) over the GPU's memory bandwidth, fetched bytes over its host
link, both serial (no overlap, an upper bound) and overlapped (the larger of the two, a lower bound).
:func:`fit_tiers` counts the sequences whose hot tier fits in GPU memory next to the weights and whose cold tier fits
in the host memory given. The bandwidths are assumptions (:data:`GPUS`), stated in every result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import InvalidInput
from ..formats import weight_bytes_per_param
from .accounting import GiB
from .spec import ArchSpec

__all__ = ["GPU", "GPUS", "fit_tiers", "get_gpu", "step_time", "tier_price"]




@dataclass(frozen=True)
class GPU:
    """One GPU for the planner: memory, its bandwidth, and the host link the cold tier is fetched over."""

    name: str
    memory: int  # bytes
    hbm_bw: float  # bytes/s
    link: str
    link_bw: float  # bytes/s, host -> device, effective

    def describe(self) -> str:
        return (f"{self.name}: {self.memory / GiB:g} GiB at {self.hbm_bw / 1e12:g} TB/s; {self.link} at "
                f"{self.link_bw / 1e9:g} GB/s effective host->device")  # fmt: skip


# vendor figures for memory size and bandwidth; the link at about 85 % of its raw rate (PCIe 5.0 x16: 64 GB/s raw)
GPUS: dict[str, GPU] = {
    "h200": GPU("H200 (HBM3e)", 141 * GiB, 4.8e12, "PCIe 5.0 x16", 55e9),
    "h100": GPU("H100 SXM (HBM3)", 80 * GiB, 3.35e12, "PCIe 5.0 x16", 55e9),
    "a100": GPU("A100 SXM 80GB (HBM2e)", 80 * GiB, 2.039e12, "PCIe 4.0 x16", 27e9),
}


def get_gpu(name: str) -> GPU:
    gpu = GPUS.get(name.lower())
    if gpu is None:
        raise InvalidInput(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return gpu


def tier_price(arch: ArchSpec, recipe: Any, n: int, dtype: str = "bf16") -> dict[str, Any]:
    """:func:`~kvslim.plan.pricing.price_recipe` plus ``hot``, ``cold`` and ``fetched`` bytes per sequence (the
    sums of the layers' predictions; 0 for layers without a cold tier). ``recipe``: a string or a parsed
    :class:`~kvslim.cache.recipe.Recipe`."""
    from .pricing import price_recipe

    p = price_recipe(arch, recipe, n, dtype)
    p["hot"] = p["kv_bytes"]
    p["cold"] = sum(layer.get("cold", 0) for layer in p["layers"])
    p["fetched"] = sum(layer.get("fetched", 0) for layer in p["layers"])
    return p


def step_time(arch: ArchSpec, price: dict[str, Any], batch: int, gpu: GPU, weights_format: str = "bf16") -> dict[str, Any]:
    """Seconds of one decode step of ``batch`` sequences priced by :func:`tier_price` on ``gpu``."""
    if batch < 1:
        raise InvalidInput(f"a decode step needs at least one sequence, got {batch}")
    weights = arch.active_params() * weight_bytes_per_param(weights_format)
    hbm, link = weights + batch * price["read_bytes"], batch * price["fetched"]
    t_hbm, t_link = hbm / gpu.hbm_bw, link / gpu.link_bw
    return {"batch": batch, "hbm_bytes": int(hbm), "link_bytes": int(link), "hbm_s": t_hbm, "link_s": t_link,
            "serial_s": t_hbm + t_link, "overlapped_s": max(t_hbm, t_link),
            "assumed": {**asdict(gpu), "weights_format": weights_format}}  # fmt: skip


def fit_tiers(arch: ArchSpec, price: dict[str, Any], memory: int, host: int | None = None,
              weights_format: str = "bf16") -> dict[str, Any]:  # fmt: skip
    """Sequences whose hot tier fits in ``memory`` next to the weights and whose cold tier fits in ``host`` bytes
    (None: host memory not limited; ``host_needed`` says how much the sequences would take). ``limit`` names the
    memory that runs out first."""
    weights = int(arch.total_params() * weight_bytes_per_param(weights_format))
    hot, cold = price["hot"], price["cold"]
    by_hbm = max(0, (memory - weights) // hot) if hot else 0
    by_host = host // cold if cold and host is not None else None
    seqs = by_hbm if by_host is None else min(by_hbm, by_host)
    return {"weights_bytes": weights, "hot_per_sequence": hot, "cold_per_sequence": cold, "by_hbm": int(by_hbm),
            "by_host": by_host, "sequences": int(seqs), "host_needed": int(seqs * cold),
            "limit": "hbm" if by_host is None or by_hbm <= by_host else "host"}  # fmt: skip
