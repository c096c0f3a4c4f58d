"""Quantization codecs with real packed storage: TurboQuant (MSE, prod, 2.5/3.5-bit splits), KIVI, FP8, FP4.

Entry point: :func:`make_codec` (``kvslim.quant.registry``). Every codec has ``encode(x [..., T, d]) -> Packed``,
``decode(Packed) -> [..., T, d]``, ``nbytes(Packed)`` (exact bytes held), ``state_nbytes()`` (shared constants),
``score(q, Packed)``, ``cat([...])``, ``lossless``, ``bits_per_value``. See ``docs/quant.md`` for byte layouts.
"""

from __future__ import annotations

from kvslim.quant.base import Codec, Packed
from kvslim.quant.kivi import KiviCodec, KiviStore, kivi_store_nbytes
from kvslim.quant.registry import CODEC_NAMES, bytes_per_vector, make_codec

__all__ = [
    "CODEC_NAMES", "Codec", "KiviCodec", "KiviStore", "Packed", "bytes_per_vector", "kivi_store_nbytes", "make_codec",
]
