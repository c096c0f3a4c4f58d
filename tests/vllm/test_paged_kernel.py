"""kvslim's paged kernel (``kv_paged_attend`` in ``lut_kernel.c``, through :func:`kvslim.vllm.layout.paged_attention`)
against the pure-torch reference: the codec's decode of every request's rows + causal SDPA in float32.

One step of a batch of requests of different lengths (1 token, a whole block, a block + 1, ...) over shuffled
blocks, with decodes, short prefill chunks (their causal limits inside the kernel) and GQA groups; for tq4 (the
AVX-512 "wide" 4-bit path, and the natural-order path at d = 48), tq3, tq2, tq1, fp8 (one and two scale blocks),
and a head size that is no multiple of 16 (the portable loop inside the AVX-512 build). The portable C build
(compiled without ``-march=native``) is checked against the same reference, and with no kernel at all
(``KVSLIM_KERNELS=0``: :func:`kvslim.quant.kernels.library` gives None) the torch path still gives the reference.
Tolerances, not exact sums: the kernel adds in another order than SDPA, and the reference's own rounding depends
on ``ATEN_CPU_CAPABILITY``.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch

from kvslim.quant import kernels
from kvslim.vllm.layout import RowLayout, paged_attention, paged_kernel_ok, write_slots

BS = 16
LENS = [1, 16, 17, 33, 50, 7]
NEWS = [1, 1, 3, 1, 16, 0]  # query rows this step (the last request: none)

needs_kernel = pytest.mark.skipif(not kernels.available(),
                                  reason="kvslim's kernel is not available (no C compiler, or KVSLIM_KERNELS=0)")


def _pool(fmt: str, d: int, hkv: int, seed: int = 0):
    """A pool of shuffled blocks holding every request's keys/values as packed rows, and the decoded K/V."""
    torch.manual_seed(seed)
    layout = RowLayout(fmt, d)
    nblocks = sum(-(-n // BS) for n in LENS) + 5
    cache = torch.zeros(nblocks, hkv, BS, 2 * layout.row_bytes, dtype=torch.uint8)
    perm = torch.randperm(nblocks)
    table = torch.zeros(len(LENS), 5, dtype=torch.int32)  # unused entries 0, as in vLLM's block table
    at = 0
    for i, n in enumerate(LENS):
        need = -(-n // BS)
        table[i, :need] = perm[at:at + need].to(torch.int32)
        at += need
    keys = [torch.randn(n, hkv, d) * 2 for n in LENS]
    vals = [torch.randn(n, hkv, d) for n in LENS]
    for i, n in enumerate(LENS):
        pos = torch.arange(n)
        write_slots(cache, layout, keys[i], vals[i], table[i, pos // BS].long() * BS + pos % BS)
    codec = layout.codec
    dk = [codec.decode(codec.encode(k.transpose(0, 1))).transpose(0, 1) for k in keys]
    dv = [codec.decode(codec.encode(v.transpose(0, 1))).transpose(0, 1) for v in vals]
    return layout, cache, table, dk, dv


def _reference(q, k, v, n, scale):
    """Causal attention of the n query rows q [n, Hq, d] (the newest of k's L tokens) over k, v [L, Hkv, d]."""
    hq, hkv, length = q.shape[1], k.shape[1], k.shape[0]
    kx = k.repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
    vx = v.repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
    mask = torch.arange(length)[None, :] <= torch.arange(length - n, length)[:, None]
    o = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), kx, vx, attn_mask=mask, scale=scale)
    return o.transpose(0, 1)


def _check(fmt, d, hkv, group, dtype=torch.float32, expect_kernel=True, monkeypatch=None):
    layout, cache, table, dk, dv = _pool(fmt, d, hkv)
    qsl = torch.tensor([0, *torch.tensor(NEWS).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), hkv * group, d).to(dtype)
    out = torch.full_like(q, 7.0)
    calls = []
    if monkeypatch is not None:
        real = kernels.paged_attend
        monkeypatch.setattr(kernels, "paged_attend", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    paged_attention(q, cache, layout, table, torch.tensor(LENS, dtype=torch.int32), qsl, d ** -0.5, out=out,
                    from_codes=True)
    if monkeypatch is not None:
        assert len(calls) == (1 if expect_kernel else 0)
    for i, n in enumerate(NEWS):
        if n == 0:
            continue
        rows = slice(int(qsl[i]), int(qsl[i + 1]))
        ref = _reference(q[rows].to(torch.float32), dk[i], dv[i], n, d ** -0.5)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out[rows].to(torch.float32), ref, rtol=tol, atol=tol)


@needs_kernel
@pytest.mark.parametrize("fmt, d", [("tq4", 64), ("tq4", 48), ("tq4", 40), ("tq3", 64), ("tq2", 64), ("tq1", 64),
                                    ("fp8", 64), ("fp8", 256), ("fp8", 40)])
def test_paged_kernel_equals_decode_then_sdpa(fmt, d, monkeypatch):
    """GQA 3 query heads per KV head: a 16-row chunk has 48 query vectors per KV head (several register blocks)."""
    _check(fmt, d, hkv=2, group=3, monkeypatch=monkeypatch)


@needs_kernel
@pytest.mark.parametrize("group", [1, 8])
def test_paged_kernel_groups_and_bf16_queries(group, monkeypatch):
    _check("tq4", 64, hkv=3, group=group, monkeypatch=monkeypatch)
    _check("tq4", 64, hkv=1, group=group, dtype=torch.bfloat16)


def _portable_library(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    out = tmp_path / "lut_portable.so"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(kernels._SOURCE), "-lm"], check=True,
                   capture_output=True)
    return kernels.bind(ctypes.CDLL(str(out)))


@pytest.mark.parametrize("fmt", ["tq4", "tq3", "fp8"])
def test_portable_c_path_equals_decode_then_sdpa(fmt, tmp_path, monkeypatch):
    """The same source built for any x86-64 / other CPU (no AVX-512): its scalar loops give the reference too."""
    lib = _portable_library(tmp_path)
    assert lib.kv_has_simd() == 0 or not kernels.library().kv_has_simd()  # built without -march=native
    monkeypatch.setattr(kernels, "library", lambda: lib)
    _check(fmt, 64, hkv=2, group=3, monkeypatch=monkeypatch)


@pytest.mark.parametrize("fmt", ["tq4", "fp8"])
def test_without_the_kernel_the_torch_path_gives_the_reference(fmt, monkeypatch):
    """``KVSLIM_KERNELS=0`` (or no compiler): no paged kernel; the codecs' torch score / mix run instead."""
    monkeypatch.setattr(kernels, "library", lambda: None)
    layout = RowLayout(fmt, 64)
    assert not paged_kernel_ok(layout, torch.zeros(1, 1, BS, 2 * layout.row_bytes, dtype=torch.uint8))
    _check(fmt, 64, hkv=2, group=3, expect_kernel=False, monkeypatch=monkeypatch)


@needs_kernel
def test_long_chunk_beside_kernel_requests_and_rows_left_alone(monkeypatch):
    """A chunk longer than FROM_CODES_MAX_QUERIES decodes its rows (SDPA) in the same step as the kernel's requests;
    a request with query rows but length 0 (what tiered recall passes for requests it attended itself) keeps its
    output rows untouched."""
    monkeypatch.setattr("kvslim.vllm.layout.FROM_CODES_MAX_QUERIES", 8)  # the 16-row chunk takes the SDPA path
    layout, cache, table, dk, dv = _pool("tq4", 64, 2)
    news = [1, 1, 3, 1, 16, 1]
    lens = list(LENS)
    lens[5] = 0
    qsl = torch.tensor([0, *torch.tensor(news).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), 6, 64)
    out = torch.full_like(q, 7.0)
    paged_attention(q, cache, layout, table, torch.tensor(lens, dtype=torch.int32), qsl, 0.125, out=out,
                    from_codes=True)
    for i, n in enumerate(news[:5]):
        rows = slice(int(qsl[i]), int(qsl[i + 1]))
        torch.testing.assert_close(out[rows], _reference(q[rows], dk[i], dv[i], n, 0.125), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[int(qsl[5]):], torch.full_like(out[int(qsl[5]):], 7.0))
