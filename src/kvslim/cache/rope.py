"""Rotary position embedding helpers for re-anchoring pooled keys (RoFormer, arXiv:2104.09864, eq. 34).

Stock Llama/Gemma attention rotates keys with the ``rotate_half`` convention: for positions ``p`` and inverse
frequencies ``f`` (``[R/2]``, ``R`` = rotated dims), ``k' = k*cos(p f) + rotate_half(k)*sin(p f)`` on the first ``R``
dims. RoPE is orthogonal, so ``rotate(k', -p)`` recovers the pre-RoPE key exactly, and a pooled pre-RoPE key can be
rotated to any (fractional) anchor position. Index letters: b batch, h KV head, n token/entry, d head dim.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["inv_freq_for_layer", "rotate"]


def inv_freq_for_layer(model: Any, layer_type: str) -> torch.Tensor | None:
    """The float32 inverse frequencies ``[R/2]`` the model uses for ``layer_type``, or None when it has no RoPE.

    Reads the model's own rotary module: Gemma 3 keeps ``{layer_type}_inv_freq`` buffers, Llama-family models one
    ``inv_freq``.
    """
    base = getattr(model, "model", model)
    rot = getattr(base, "rotary_emb", None)
    if rot is None:
        return None
    inv = getattr(rot, f"{layer_type}_inv_freq", None)
    if inv is None:
        inv = getattr(rot, "inv_freq", None)
    return None if inv is None else inv.detach().float().clone()


def rotate(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [b, h, n, d]`` by positions ``pos [b, n]`` (float or int; negative undoes a rotation).

    Only the first ``R = 2*len(inv_freq)`` dims are rotated (partial rotary keeps the rest); computed in float32,
    returned in ``x.dtype``.
    """
    r = 2 * inv_freq.shape[0]
    xf = x.float()
    freqs = pos.float()[..., None] * inv_freq.to(x.device)  # [b, n, r/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [b, 1, n, r]
    cos, sin = emb.cos(), emb.sin()
    xr = xf[..., :r]
    half = r // 2
    rot_half = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    out = xr * cos + rot_half * sin
    if r < x.shape[-1]:
        out = torch.cat([out, xf[..., r:]], dim=-1)
    return out.to(x.dtype)
