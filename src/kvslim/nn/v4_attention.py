"""DeepSeek-V4 attention layer (paper §2.3; transformers ``DeepseekV4Attention``) with an incremental state.

Per token t (shapes for B batch, H heads, head dim d, rope dims r, window W):
- query: ``q_a_proj`` -> RMSNorm (= q_residual) -> ``q_b_proj`` -> per-head unweighted RMSNorm -> RoPE on the
  trailing r dims -> [B, S, H, d];
- one shared K=V vector per token: ``kv_proj`` -> RMSNorm -> RoPE -> [B, S, d] (multi-query, K and V the same);
- attention over: the last W tokens (window, t itself included), plus the compressed entries (HCA: every closed
  entry; CSA: the indexer's top-k closed entries, gathered), plus one learnable sink logit per head that only adds
  to the softmax denominator;
- the output's rope dims are rotated back by -t (V carries RoPE), then the grouped low-rank output projection:
  heads split into ``o_groups`` groups, each projected to ``o_lora_rank`` (``o_a_proj``), then ``o_b_proj``.

:class:`V4State` holds what decode needs: a ring buffer of the last W K=V vectors (slot = position mod W), the
compressor state (entries, open-window buffer, overlap carry) and, for CSA, the indexer's keys. One code path
serves prefill (queries in blocks of ``query_chunk``) and decode (S = 1); per decoded token the work is
O(W + k + N/m') attention plus O(N/m) indexer scoring — nothing as wide as the context is built.
"""

from __future__ import annotations

import torch
from torch import nn

from kvslim.errors import InvalidInput
from kvslim.nn._common import RMSNorm, Rotary, rope_interleaved
from kvslim.nn.storage import RowCodec
from kvslim.nn.v4_compressor import Compressor, CompressorState
from kvslim.nn.v4_config import V4Config
from kvslim.nn.v4_indexer import Indexer

__all__ = ["V4Attention", "V4State"]


# state storage -> (K=V row format, indexer key format) of kvslim.formats; "float" keeps the module's dtype
STORAGES: dict[str, tuple[str, str] | None] = {"float": None, "v4": ("fp8_ds_v4", "fp4")}


class V4State:
    """Decode state of one V4 layer for one batch of sequences (all at the same position).

    ``storage="float"`` keeps rows in the module's dtype; ``storage="v4"`` stores window and compressed K=V rows
    as FP8 e4m3 NoPE dims (ue8m0 block-64 scales) + bf16 RoPE dims and indexer keys as FP4 e2m1 (ue8m0 block-32
    scales), in packed uint8 rows (:mod:`kvslim.nn.storage`). Attention then always reads the stored (decoded) rows,
    also for the tokens of the current call, as the V4 reference's quant-dequant simulation does.
    """

    def __init__(self, storage: str = "float") -> None:
        if storage not in STORAGES:
            raise InvalidInput(f"V4 state storage must be one of {tuple(STORAGES)}, got {storage!r}")
        self.storage = storage
        self.seen = 0
        self.win_kv: torch.Tensor | None = None  # [B, W, d] (or packed [B, W, bytes]) ring, slot = position % W
        self.win_pos: torch.Tensor | None = None  # [W] position in each slot, -1 = empty
        self.kv_codec = None
        self.compressor = CompressorState()
        self.indexer = CompressorState()

    def _setup(self, config: V4Config) -> None:
        formats = STORAGES[self.storage]
        if formats is not None and self.kv_codec is None:
            kv_fmt, index_fmt = formats
            self.kv_codec = RowCodec(kv_fmt, config.head_dim, rope_dim=config.rope_dim)
            self.compressor = CompressorState(self.kv_codec)
            self.indexer = CompressorState(RowCodec(index_fmt, config.index_head_dim))

    def nbytes(self) -> int:
        """Bytes held: window ring + compressed entries + indexer keys + compressor buffers and carries."""
        win = 0 if self.win_kv is None else self.win_kv.numel() * self.win_kv.element_size()
        return win + self.compressor.nbytes() + self.indexer.nbytes()

    def reserved_nbytes(self) -> int:
        """Bytes allocated: as :meth:`nbytes`, with the entry stores' capacity (at most twice their rows)."""
        win = 0 if self.win_kv is None else self.win_kv.numel() * self.win_kv.element_size()
        return win + self.compressor.reserved_nbytes() + self.indexer.reserved_nbytes()


class V4Attention(nn.Module):
    """One V4 attention layer; parameter names follow transformers so weights load one to one."""

    def __init__(self, config: V4Config, main_rotary: Rotary | None = None, compress_rotary: Rotary | None = None):
        super().__init__()
        config.validate()
        self.config = c = config
        self.scaling = c.head_dim**-0.5
        main_rotary = main_rotary or Rotary.default(c.rope_dim, c.rope_theta)
        compress_rotary = compress_rotary or Rotary.default(c.rope_dim, c.compress_rope_theta)
        self.rotary = main_rotary if c.kind == "swa" else compress_rotary
        self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(c.q_lora_rank, c.eps, cast_after_weight=True)
        self.q_b_proj = nn.Linear(c.q_lora_rank, c.num_heads * c.head_dim, bias=False)
        self.q_b_norm = RMSNorm(c.head_dim, c.eps, weighted=False)
        self.kv_proj = nn.Linear(c.hidden_size, c.head_dim, bias=False)
        self.kv_norm = RMSNorm(c.head_dim, c.eps, cast_after_weight=True)
        group_in = c.num_heads * c.head_dim // c.o_groups
        self.o_a_proj = nn.Linear(group_in, c.o_groups * c.o_lora_rank, bias=False)
        self.o_b_proj = nn.Linear(c.o_groups * c.o_lora_rank, c.hidden_size, bias=False)
        self.sinks = nn.Parameter(torch.zeros(c.num_heads))
        self.compressor = None
        self.indexer = None
        if c.kind != "swa":
            self.compressor = Compressor(c.hidden_size, c.head_dim, c.compress_rate, overlap=c.kind == "csa",
                                         rotary=compress_rotary, eps=c.eps)
        if c.kind == "csa":
            self.indexer = Indexer(c.hidden_size, c.q_lora_rank, c.index_n_heads, c.index_head_dim, c.index_topk,
                                   c.compress_rate, compress_rotary, c.eps)

    def new_state(self, storage: str = "float") -> V4State:
        """An empty decode state; ``storage`` is ``"float"`` or ``"v4"`` (packed FP8 / BF16 / FP4 rows)."""
        return V4State(storage)

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor, state: V4State | None = None) -> torch.Tensor:
        """``hidden`` [B, S, D] at positions ``state.seen ..`` (0 without a state) -> output [B, S, D].

        With a ``state`` the call continues it (prefill, chunked prefill or one decode step) and updates it.
        """
        c = self.config
        state = state if state is not None else V4State()
        if state.seen == 0:
            state._setup(c)
        b, s, _ = hidden.shape
        if s == 0:
            return hidden.new_zeros((b, 0, c.hidden_size))
        if s > c.prefill_chunk:  # bounded memory: queries of at most prefill_chunk tokens at a time
            return torch.cat([self.forward(hidden[:, i : i + c.prefill_chunk], state)
                              for i in range(0, s, c.prefill_chunk)], 1)
        positions = torch.arange(state.seen, state.seen + s, device=hidden.device)
        cos, sin = self.rotary.cos_sin(positions)  # [S, r/2]

        q_res = self.q_a_norm(self.q_a_proj(hidden))
        q = self.q_b_norm(self.q_b_proj(q_res).view(b, s, c.num_heads, c.head_dim))
        q = rope_interleaved(q, cos[:, None], sin[:, None])  # [B, S, H, d]
        kv = rope_interleaved(self.kv_norm(self.kv_proj(hidden)), cos, sin)  # [B, S, d]
        kv_stored = kv
        if state.kv_codec is not None:  # attend to exactly what is stored
            kv_stored = state.kv_codec.encode(kv)
            kv = state.kv_codec.decode(kv_stored).to(kv.dtype)

        entries = None
        picks = None
        if self.compressor is not None:
            self.compressor.update(hidden, state.compressor)
        if self.indexer is not None:
            picks = self.indexer.select(hidden, q_res, cos, sin, positions, state.indexer, c.query_chunk)  # [B, S, k']

        if self.compressor is not None and picks is None:  # HCA reads every entry: O(N / m')
            entries = state.compressor.read_all(b, c.head_dim).to(q.dtype)
        if state.win_kv is None:
            state.win_kv = kv_stored.new_zeros((b, c.window, kv_stored.shape[-1]))
            state.win_pos = torch.full((c.window,), -1, dtype=torch.long)
        if s == 1:  # decode: the ring, after taking this token, is exactly the window
            self._push_window(kv_stored, positions, state)
            out = self._decode_attend(q[:, 0], state, entries, picks).unsqueeze(1)
        else:
            out = torch.empty_like(q)
            for c0 in range(0, s, c.query_chunk):
                c1 = min(s, c0 + c.query_chunk)
                out[:, c0:c1] = self._attend(q[:, c0:c1], positions[c0:c1], kv, positions, state, entries,
                                             None if picks is None else picks[:, c0:c1])
            self._push_window(kv_stored, positions, state)
        state.seen += s

        out = rope_interleaved(out, cos[:, None], -sin[:, None])  # undo RoPE carried by V
        grouped = out.reshape(b, s, c.o_groups, -1)
        w = self.o_a_proj.weight.view(c.o_groups, c.o_lora_rank, -1)
        grouped = torch.einsum("bsgi,gri->bsgr", grouped, w).reshape(b, s, -1)
        return self.o_b_proj(grouped)

    def _attend(self, q: torch.Tensor, qpos: torch.Tensor, kv: torch.Tensor, kvpos: torch.Tensor, state: V4State,
                entries: torch.Tensor | None, picks: torch.Tensor | None) -> torch.Tensor:
        """Attention of a block of queries q [B, C, H, d] at positions ``qpos`` -> [B, C, H, d]."""
        c = self.config
        lo = max(0, int(qpos[0]) - c.window + 1 - int(kvpos[0]))
        hi = int(qpos[-1]) - int(kvpos[0]) + 1
        ring = state.win_kv if state.kv_codec is None else state.kv_codec.decode(state.win_kv).to(kv.dtype)
        keys = torch.cat((ring, kv[:, lo:hi]), 1)  # ring (older tokens) + this call's tokens
        kpos = torch.cat((state.win_pos, kvpos[lo:hi]))
        allowed = (kpos[None] <= qpos[:, None]) & (kpos[None] > qpos[:, None] - c.window) & (kpos[None] >= 0)
        logits = [torch.einsum("bshd,bkd->bhsk", q, keys) * self.scaling
                  + torch.zeros(allowed.shape, dtype=q.dtype).masked_fill(~allowed, float("-inf"))]
        values = [keys]
        if entries is not None and entries.shape[1] and picks is None:  # HCA: dense over closed entries
            n_vis = int(qpos[-1] + 1) // c.compress_rate
            ent = entries[:, :n_vis]
            vis = torch.arange(n_vis)[None] < ((qpos + 1) // c.compress_rate)[:, None]
            logits.append(torch.einsum("bshd,bnd->bhsn", q, ent) * self.scaling
                          + torch.zeros(vis.shape, dtype=q.dtype).masked_fill(~vis, float("-inf")))
            values.append(ent)
        sel = None
        if picks is not None and picks.shape[-1]:  # CSA: gather the top-k entries of each query
            sel = state.compressor.gather(picks).to(q.dtype)  # [B, C, k, d]
            bias = torch.zeros(picks.shape, dtype=q.dtype).masked_fill(picks < 0, float("-inf"))
            logits.append(torch.einsum("bshd,bskd->bhsk", q, sel) * self.scaling + bias[:, None])
        sinks = self.sinks.view(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[1], 1).to(q.dtype)
        allv = torch.cat([*logits, sinks], -1)
        allv = allv - allv.max(dim=-1, keepdim=True).values
        probs = torch.softmax(allv, dim=-1)
        widths = [t.shape[-1] for t in logits]
        parts = torch.split(probs[..., :-1], widths, dim=-1)
        out = torch.einsum("bhsk,bkd->bshd", parts[0], values[0])
        if len(values) > 1:
            out = out + torch.einsum("bhsn,bnd->bshd", parts[1], values[1])
        if sel is not None:
            out = out + torch.einsum("bhsk,bskd->bshd", parts[-1], sel)
        return out

    def _decode_attend(self, q: torch.Tensor, state: V4State, entries: torch.Tensor | None,
                       picks: torch.Tensor | None) -> torch.Tensor:
        """One query per sequence q [B, H, d] -> [B, H, d]: W window rows + k gathered (CSA) or N/m' (HCA) entries."""
        ring = state.win_kv if state.kv_codec is None else state.kv_codec.decode(state.win_kv).to(q.dtype)
        logits = [torch.bmm(q, ring.transpose(1, 2)).mul_(self.scaling)]  # [B, H, W]
        if state.seen + 1 < ring.shape[1]:  # ring not full yet: empty slots
            logits[0].masked_fill_((state.win_pos < 0).view(1, 1, -1), float("-inf"))
        values = [ring]
        if entries is not None and entries.shape[1]:  # HCA: every entry is closed at decode time
            logits.append(torch.bmm(q, entries.transpose(1, 2)).mul_(self.scaling))
            values.append(entries)
        if picks is not None and picks.shape[-1]:
            sel = state.compressor.gather(picks)[:, 0].to(q.dtype)  # [B, k, d], a real gather
            lg = torch.bmm(q, sel.transpose(1, 2)).mul_(self.scaling)
            logits.append(lg.masked_fill_((picks[:, 0] < 0).unsqueeze(1), float("-inf")))
            values.append(sel)
        sinks = self.sinks.to(q.dtype).view(1, -1, 1).expand(q.shape[0], -1, 1)
        probs = torch.softmax(torch.cat([*logits, sinks], -1), dim=-1)
        out = None
        start = 0
        for lg, v in zip(logits, values, strict=True):
            part = torch.bmm(probs[..., start : start + lg.shape[-1]], v)
            out = part if out is None else out + part
            start += lg.shape[-1]
        return out

    @staticmethod
    def _push_window(kv: torch.Tensor, positions: torch.Tensor, state: V4State) -> None:
        w = state.win_kv.shape[1]
        if kv.shape[1] == 1:
            slot = state.seen % w  # positions[0] == state.seen
            state.win_kv[:, slot] = kv[:, 0]
            state.win_pos[slot] = state.seen
            return
        kv, positions = kv[:, -w:], positions[-w:]
        slots = positions % w
        state.win_kv[:, slots] = kv
        state.win_pos[slots] = positions
