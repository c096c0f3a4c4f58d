"""Native DeepSeek attention: MLA (V3), DSA (V3.2) and V4 (SWA / CSA / HCA) as ``nn.Module``s with their caches.

Each module loads its weights from transformers' own attention module (:func:`from_transformers`) and equals it
numerically; decode keeps only what the mechanism needs (latents, windows, compressed entries, indexer keys) and
gathers the entries it reads. Names are re-exported lazily: ``import kvslim.nn`` imports nothing heavy.
"""

from __future__ import annotations

from kvslim._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "MLA": "kvslim.nn.mla",
    "MLAConfig": "kvslim.nn.mla",
    "MLACache": "kvslim.nn.mla",
    "DSA": "kvslim.nn.dsa",
    "DSAConfig": "kvslim.nn.dsa",
    "DSACache": "kvslim.nn.dsa",
    "DSAIndexer": "kvslim.nn.dsa",
    "V4Attention": "kvslim.nn.v4_attention",
    "V4State": "kvslim.nn.v4_attention",
    "V4Config": "kvslim.nn.v4_config",
    "Compressor": "kvslim.nn.v4_compressor",
    "CompressorState": "kvslim.nn.v4_compressor",
    "Indexer": "kvslim.nn.v4_indexer",
    "from_transformers": "kvslim.nn.loading",
    "use_native_attention": "kvslim.nn.v4_model",
    "NativeV4Attention": "kvslim.nn.v4_model",
    "V4NativeCache": "kvslim.nn.v4_model",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports("kvslim.nn", _EXPORTS, globals())
