"""The vLLM attention backend that keeps K/V in kvslim packed formats (imported by vLLM through the plugin only).

Page layout (``customize_spec``): the spec's dtype becomes ``uint8`` and each (head, token) cell of a page holds
``state_content_bytes = 2 * row_bytes`` bytes, ``[key row | value row]`` of :class:`~kvslim.vllm.layout.RowLayout`,
so vLLM's own KV sizing (and its "KV cache size: N tokens" line) counts the format's bytes per token. vLLM owns the
slots: ``do_kv_cache_update`` encodes the step's new K/V with the kvslim codec and writes them at ``slot_mapping``;
``forward`` reads every request's rows through its block table and attends in float32
(:func:`~kvslim.vllm.layout.paged_attention`): on CPU, TurboQuant-MSE and fp8 rows of decodes and short chunks go
to one call per layer of kvslim's paged kernel (``kv_paged_attend``: it walks the block table in place, no gather),
other codecs that attend from codes score and mix from gathered rows; the rest (and every format on another device,
or with ``KVSLIM_VLLM_DECODE=1``) decode the rows with the codec and run SDPA in pure torch. Chunked prefill, prefix-cache hits, batches
and preemption need nothing else: they only change which slots and blocks vLLM hands over.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadata,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from kvslim.errors import InvalidInput

from . import selected_format
from .layout import RowLayout, paged_attention, write_slots

__all__ = ["KvslimAttentionBackend", "KvslimAttentionImpl", "KvslimMetadata", "KvslimMetadataBuilder"]

_LAYOUTS: dict[tuple[str, int], RowLayout] = {}


def layout_for(head_size: int) -> RowLayout:
    """The row layout of this process's selected format at ``head_size`` (one per process, shared by layers)."""
    fmt = selected_format()
    if fmt is None:
        raise InvalidInput("kvslim's vLLM backend is active but no kvslim format is selected")
    key = (fmt, head_size)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = RowLayout(fmt, head_size)
    return _LAYOUTS[key]


class KvslimAttentionBackend(AttentionBackend):
    """Decoder attention over kvslim packed pages."""

    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "KVSLIM"

    @staticmethod
    def get_impl_cls() -> type[KvslimAttentionImpl]:
        return KvslimAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KvslimMetadataBuilder]:
        return KvslimMetadataBuilder

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        try:
            cls._check_head_size(head_size)
        except InvalidInput:
            return False
        return True

    @classmethod
    def _check_head_size(cls, head_size: int) -> None:
        """Raise ``InvalidInput`` where the selected format cannot store ``head_size``."""
        layout_for(head_size)

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """Pages of ``uint8`` cells of :meth:`_cell_bytes` per (KV head, token)."""
        if spec.state_content_bytes is not None:
            return spec
        if spec.head_size_v != spec.head_size:
            raise InvalidInput(f"kvslim: keys of {spec.head_size} and values of {spec.head_size_v} channels differ")
        return replace(spec, dtype=torch.uint8, state_content_bytes=cls._cell_bytes(spec))

    @classmethod
    def _cell_bytes(cls, spec: AttentionSpec) -> int:
        """Bytes per (KV head, token) of a page: one packed ``[key row | value row]``."""
        return 2 * layout_for(spec.head_size).row_bytes


@dataclass
class KvslimMetadata(AttentionMetadata):
    num_actual_tokens: int
    query_start_loc: torch.Tensor  # [reqs + 1], on the CPU
    seq_lens: torch.Tensor  # [reqs], on the CPU
    block_table: torch.Tensor  # [reqs, max blocks]
    slot_mapping: torch.Tensor  # [tokens]


class KvslimMetadataBuilder(AttentionMetadataBuilder[KvslimMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KvslimMetadata:
        m = common_attn_metadata
        n = m.num_reqs
        return KvslimMetadata(
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc=m.query_start_loc_cpu[: n + 1],
            seq_lens=m.seq_lens[:n].cpu(),
            block_table=m.block_table_tensor[:n],
            slot_mapping=m.slot_mapping,
        )


class KvslimAttentionImpl(AttentionImpl[KvslimMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None, **unused) -> None:
        fmt = selected_format()
        for what, bad in (("ALiBi", alibi_slopes is not None), ("a sliding window", sliding_window is not None),
                          ("logit soft-capping", bool(logits_soft_cap)), ("attention sinks", sinks is not None),
                          (f"attention type {attn_type}", attn_type != AttentionType.DECODER),
                          (f"kv_cache_dtype {kv_cache_dtype}", kv_cache_dtype != "auto")):
            if bad:
                raise InvalidInput(f"kvslim format {fmt!r}: the vLLM plugin does not support {what} yet")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.layout = self._row_layout(head_size)
        # TurboQuant / fp8 score and mix from the codes (kvslim's compiled lookup kernel on CPU); KVSLIM_VLLM_DECODE=1
        # decodes the rows to float first (the pure-torch reference path, any device)
        self.from_codes = os.environ.get("KVSLIM_VLLM_DECODE", "0") != "1"

    def _row_layout(self, head_size: int) -> RowLayout | None:
        return layout_for(head_size)

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if kv_cache.numel() == 0:
            return
        self.layout.to(kv_cache.device)
        write_slots(kv_cache, self.layout, key, value, slot_mapping)

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: KvslimMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None
                ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("kvslim's vLLM backend does not fuse output quantization")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        n = attn_metadata.num_actual_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        self.layout.to(kv_cache.device)
        paged_attention(q, kv_cache, self.layout, attn_metadata.block_table, attn_metadata.seq_lens,
                        attn_metadata.query_start_loc, self.scale, out=out,
                        from_codes=self.from_codes and kv_cache.device.type == "cpu")
        return output
