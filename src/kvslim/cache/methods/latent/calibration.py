"""Low-rank bases for latent (MLA-like) layers, calibrated on natural text and cached on disk.

For each global layer and KV head, the basis ``U [d, r]`` spans the top-``r`` eigenvectors of the uncentred
second moment of that head's *pre-RoPE* keys (resp. values) over calibration text from ``pydoc_data.topics``
(DeepSeek-V2 report sec. 2.1.2 learns such a down-projection; here it is fitted, training-free, as PCA). A token is
stored as ``U^T k_pre`` (``r`` numbers) and expanded at attention time as ``rope(U c, pos)``. With ``r = d`` the
basis is orthogonal and the layer is lossless up to float rounding.

Bases are saved under ``kvslim.paths.cache_dir() / "latent"``, keyed by a fingerprint of the model (config and
weight statistics), the rank and the calibration length.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from ....hf_config import read, text_config
from ....paths import cache_dir
from ...rope import inv_freq_for_layer, rotate

__all__ = ["calibration_ids", "latent_bases"]


def _calibration_text(min_chars: int) -> str:
    from pydoc_data.topics import topics

    parts: list[str] = []
    total = 0
    for key in sorted(topics):
        parts.append(topics[key])
        total += len(topics[key])
        if total >= min_chars:
            break
    return "\n".join(parts)


def calibration_ids(model: Any, n_tokens: int, tokenizer: Any = None) -> torch.Tensor:
    """``[1, n_tokens]`` token ids of pydoc text; bytes modulo the vocabulary when no tokenizer is available."""
    text = _calibration_text(n_tokens * 8)
    if tokenizer is None:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model.config._name_or_path, local_files_only=True)
        except Exception:  # no tokenizer next to the weights (e.g. a random test model)
            tokenizer = None
    if tokenizer is not None:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :n_tokens]
    else:
        vocab = text_config(model.config).vocab_size
        ids = torch.tensor(list(text.encode("utf-8")[:n_tokens]), dtype=torch.long)[None] % vocab
    return ids


def _fingerprint(model: Any, rank: int, ids: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(text_config(model.config).to_dict(), sort_keys=True, default=str).encode())
    for name, p in list(model.named_parameters())[:8]:
        h.update(name.encode())
        h.update(repr((tuple(p.shape), float(p.detach().float().sum()), float(p.detach().float().abs().max()))).encode())
    h.update(f"r={rank}".encode())
    h.update(ids.numpy().tobytes())
    return h.hexdigest()[:20]


def _basis(x: torch.Tensor, rank: int) -> torch.Tensor:
    """``x [h, n, d]`` -> ``[h, d, rank]`` top eigenvectors of ``x^T x`` per head."""
    cov = torch.einsum("hnd,hne->hde", x.double(), x.double())
    _evals, evecs = torch.linalg.eigh(cov)  # ascending
    return evecs.flip(-1)[..., :rank].float().contiguous()


def latent_bases(
    model: Any, layers: list[int], layer_types: list[str], rank: int, n_tokens: int, tokenizer: Any = None,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (Uk [h, d, r], Uv [h, d, r])}`` for the given layers (float32), from the disk cache or computed."""
    from transformers import DynamicCache

    n_tokens = min(n_tokens, read(model.config).max_context or n_tokens)
    ids = calibration_ids(model, n_tokens, tokenizer)
    path = cache_dir() / "latent" / f"{_fingerprint(model, rank, ids)}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        if all(i in saved for i in layers):
            return {i: saved[i] for i in layers}
    dc = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids.to(model.device), cache=dc, use_cache=True)
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    pos = torch.arange(ids.shape[1])[None]
    for i in layers:
        k, v = dc.layers[i].keys.float().cpu(), dc.layers[i].values.float().cpu()  # [1, h, n, d]
        inv = inv_freq_for_layer(model, layer_types[i])
        k_pre = rotate(k, -pos[:, -k.shape[2]:], inv) if inv is not None else k
        out[i] = (_basis(k_pre[0], rank), _basis(v[0], rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out
