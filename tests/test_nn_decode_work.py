"""The work of one kvslim V4 decode step grows only with what the layer reads, checked by counting FLOPs.

``torch.utils.flop_counter`` counts the matmul FLOPs of a call, deterministically (no timing). Between two contexts
N1 < N2 (same phase of every compression window, so the step closes no window in either) a decode step of kvslim's
layer must differ by exactly the scoring of the extra indexer keys (CSA: ``2 (H_I d_I + H_I)`` per key) or the
attention over the extra HCA entries (``2 * 2 H d`` per entry), and not at all for SWA, where transformers'
CSA layer also attends to every extra compressed entry behind its mask.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kvslim.nn import from_transformers
from kvslim.nn.hf_reference import hf_attention, hf_v4_cache, hf_v4_step, tiny_v4_config

KINDS = {"swa": "sliding_attention", "csa": "compressed_sparse_attention", "hca": "heavily_compressed_attention"}
M_CSA, M_HCA = 4, 8


def flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def decode_flops(kind: str, n: int) -> tuple[int, int]:
    """FLOPs of decode step n+1 after an n-token prefill: (kvslim, transformers), same weights and inputs."""
    cfg = tiny_v4_config(KINDS[kind], sliding_window=8, index_topk=4,
                         compress_rates={KINDS["csa"]: M_CSA, KINDS["hca"]: M_HCA})
    hf = hf_attention(cfg, seed=5)
    ours = from_transformers(hf)
    x = torch.randn(1, n + 1, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    state = ours.new_state()
    ours(x[:, :n], state)
    cache = hf_v4_cache(cfg)
    hf_v4_step([hf], x[:, :n], cache, 0)
    return flops(ours, x[:, n:], state), flops(hf_v4_step, [hf], x[:, n:], cache, n)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_decode_flops_grow_only_with_what_is_read(kind: str) -> None:
    n1, n2 = 64, 320  # both multiples of m and m': the decode step closes no window
    (ours1, hf1), (ours2, hf2) = decode_flops(kind, n1), decode_flops(kind, n2)
    cfg = tiny_v4_config(KINDS[kind])
    h, d, hi, di = cfg.num_attention_heads, cfg.head_dim, cfg.index_n_heads, cfg.index_head_dim
    expected = {
        "swa": 0,
        "csa": 2 * (hi * di + hi) * (n2 - n1) // M_CSA,  # indexer: [H_I, d_I] x [d_I, N/m] + head sum
        "hca": 2 * 2 * h * d * (n2 - n1) // M_HCA,  # logits and values over every HCA entry
    }[kind]
    assert ours2 - ours1 == expected
    if kind == "csa":  # transformers scores the same keys and also attends to every entry (masked), not the top-k
        assert hf2 - hf1 >= 2 * hi * di * (n2 - n1) // M_CSA + 2 * 2 * h * d * (n2 - n1) // M_CSA
    assert ours1 > 0 and hf1 > 0
