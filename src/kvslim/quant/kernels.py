"""A small compiled kernel for attention from packed codes (``lut_kernel.c``), with a pure-PyTorch fallback.

:func:`lut_score` and :func:`lut_mix` compute, for codes that map to floats through a table and a per-token scale per
block of ``blk`` channels (``x~[t, j] = lut[code[t, j]] * scale[t, j // blk]``), the scores ``q . x~`` and the mixes
``sum_t w_t x~_t`` without forming ``x~`` in memory: 16 codes at a time are unpacked and looked up in registers
(AVX-512 where the CPU has it, a portable C loop elsewhere). TurboQuant (in its rotated basis), FP8 and KIVI all
reduce to this (see their ``score_f32`` / ``mix_f32``). :func:`paged_attend` is the vLLM plugin's whole attention
step over a paged pool of packed rows (scores, causal softmax and mix of every head of a batch of requests, the
pages read in place through the block table), for TurboQuant-MSE and FP8 rows.

The C source ships with the package and is compiled once per machine with the system C compiler (``$CC``, else
``cc``; ``-O3 -march=native``) into ``<kvslim cache>/kernels/``, keyed by a hash of the source, the compiler and the
CPU flags, then loaded with :mod:`ctypes`. A machine without a C compiler (or with ``KVSLIM_KERNELS=0`` in the
environment) gets ``None`` from :func:`library`, and the codecs run their PyTorch paths instead (the same sums,
slower: they materialise the looked-up values block by block).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["available", "bucket_count", "kth_largest", "library", "lookup_mix", "lookup_score", "lut_mix", "lut_score",
           "bind", "paged_attend", "table_mix", "table_score"]

_SOURCE = Path(__file__).with_name("lut_kernel.c")
_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")
_FALLBACK_FLAGS = ("-O3", "-shared", "-fPIC")
_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_long


def _cpu_key() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile(cc: str, src: str, out: Path) -> bool:
    for flags in (_FLAGS, _FALLBACK_FLAGS):
        with tempfile.TemporaryDirectory() as tmp:
            tmp_out = Path(tmp) / out.name
            r = subprocess.run([cc, *flags, "-o", str(tmp_out), src, "-lm"], capture_output=True, timeout=120)
            if r.returncode == 0:
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(tmp_out), out.with_suffix(".tmp"))
                os.replace(out.with_suffix(".tmp"), out)
                return True
    return False


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel library, building it on first use; ``None`` without a C compiler or when disabled."""
    if os.environ.get("KVSLIM_KERNELS", "1") == "0":
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    from ..paths import cache_dir

    src = _SOURCE.read_bytes()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256(src + version + _cpu_key().encode() + " ".join(_FLAGS).encode()).hexdigest()[:16]
    path = cache_dir() / "kernels" / f"lut_{key}.so"
    try:
        if not path.exists() and not _compile(cc, str(_SOURCE), path):
            return None
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError):
        return None
    return bind(lib)


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the argument and return types of the kernel library's functions (on a library loaded elsewhere too:
    the tests load a portable build of the same source)."""
    lib.kv_score.argtypes = [_I, _I, _I, _I, _I, _P, _P, _L, _I, _P, _L, _I, _P, _L, _I, _I, _P]
    lib.kv_mix.argtypes = [_I, _I, _I, _I, _I, _P, _P, _P, _L, _I, _P, _L, _I, _I, _P]
    lib.kv_score.restype = lib.kv_mix.restype = None
    lib.kv_has_simd.restype = _I
    lib.kv_kth_largest.argtypes = [_I, _I, _P, _L, _I, _P]
    lib.kv_kth_largest.restype = None
    lib.kv_bucket.argtypes = [_L, _P, _I, _P, _P]
    lib.kv_bucket.restype = None
    lib.kv_paged_attend.argtypes = [_I, _P, _P, _P, _P, _L, _P, _L, _L, _I, _L, _I, _I, _I, _I, _P, _I, _I, _I, _I, _I,
                                    _I, _I, _P, _L, ctypes.c_float, _P, _L]
    lib.kv_paged_attend.restype = _I
    return lib


def available() -> bool:
    """True when the compiled kernel can be used (on CPU tensors)."""
    return library() is not None


def _rows(codes: torch.Tensor) -> torch.Tensor:
    """``codes [*L, T, nb]`` as ``[H, T, nb]`` with unit strides on the last two axes (a view when possible)."""
    t, nb = codes.shape[-2:]
    c = codes.reshape(-1, t, nb)
    if c.stride(-1) != 1 or c.stride(-2) != nb:
        c = c.contiguous()
    return c


def _scale(scale: torch.Tensor | None, h: int, t: int) -> torch.Tensor | None:
    if scale is None:
        return None
    return scale.to(torch.float32).reshape(h, t, scale.shape[-1]).contiguous()


def _f32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous float32 tensor (itself when it already is one: no call on a decode step's hot path)."""
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    return x if x.is_contiguous() else x.contiguous()


def _ptr(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def lut_score(q: torch.Tensor, codes: torch.Tensor, bits: int, lut: torch.Tensor, d: int,
              scale: torch.Tensor | None = None, blk: int = 0, qgroup: int = 0) -> torch.Tensor:
    """Scores ``[*L, G, T]`` float32 of queries ``q [*L, G, d]`` (or ``[*L, nq, G, d]``: query set ``t // qgroup``
    scores token ``t``) against codes ``uint8 [*L, T, nbytes]`` (``bits`` per code), table ``lut`` float32 and
    per-token ``scale [*L, T, nblk]`` (None: 1) per ``blk`` channels. Uses the compiled kernel (call only when
    :func:`available`)."""
    lib = library()
    lead, (t, nb) = codes.shape[:-2], codes.shape[-2:]
    c = _rows(codes)
    h = c.shape[0]
    g = q.shape[-2]
    qf = _f32(q).reshape(h, -1, g, d)
    sc = _scale(scale, h, t)
    nblk = 1 if sc is None else sc.shape[-1]
    out = torch.empty(h, g, t, dtype=torch.float32)
    lut = _f32(lut)
    if t and h:
        lib.kv_score(h, g, t, d, bits, lut.data_ptr(), qf.data_ptr(), qf.stride(0), qgroup or max(t, 1),
                     c.data_ptr(), c.stride(0), nb, _ptr(sc), 0 if sc is None else sc.stride(0), nblk, blk or d,
                     out.data_ptr())  # fmt: skip
    return out.reshape(*lead, g, t)


def lut_mix(w: torch.Tensor, codes: torch.Tensor, bits: int, lut: torch.Tensor, d: int,
            scale: torch.Tensor | None = None, blk: int = 0) -> torch.Tensor:
    """Mixes ``[*L, G, d]`` float32: weights ``w [*L, G, T]`` over the vectors that ``codes [*L, T, nbytes]``,
    ``lut`` and ``scale`` describe (see :func:`lut_score`)."""
    lib = library()
    lead, (t, nb) = codes.shape[:-2], codes.shape[-2:]
    c = _rows(codes)
    h = c.shape[0]
    g = w.shape[-2]
    wf = _f32(w).reshape(h, g, t)
    sc = _scale(scale, h, t)
    nblk = 1 if sc is None else sc.shape[-1]
    lut = _f32(lut)
    if not (t and h):
        return torch.zeros(*lead, g, d, dtype=torch.float32)
    out = torch.empty(h, g, d, dtype=torch.float32)
    lib.kv_mix(h, g, t, d, bits, lut.data_ptr(), wf.data_ptr(), c.data_ptr(), c.stride(0), nb, _ptr(sc),
               0 if sc is None else sc.stride(0), nblk, blk or d, out.data_ptr())  # fmt: skip
    return out.reshape(*lead, g, d)


def paged_attend(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                 query_start_loc: torch.Tensor, reqs: torch.Tensor, groups: int, bits: int, lut: torch.Tensor,
                 nbytes: int, kind: int, scale_offset: int, nblk: int, blk: int, value_offset: int, sm_scale: float,
                 out: torch.Tensor, e4m3: bool = False) -> None:
    """Causal attention of the query rows of requests ``reqs`` (int32) over packed rows read in place through the
    block table (``kv_paged_attend`` in ``lut_kernel.c``): ``q`` / ``out`` float32 ``[T, Hkv * groups, d]`` (rows
    contiguous; ``q`` in the codec's basis, ``out`` left in it), ``cache`` uint8 ``[blocks, Hkv, block_size, cell]``
    (unit stride on the cell's bytes), ``block_table`` ``[reqs, max blocks]`` and ``seq_lens`` / ``query_start_loc``
    int32. A cell is ``[key row | value row]`` from byte 0 and ``value_offset``; a row is ``nbytes`` codes of
    ``bits`` bits through ``lut`` and, at ``scale_offset``, its scale (``kind`` 0 none, 1 one fp16 per token, 2
    ``nblk`` fp32 per ``blk`` channels). ``e4m3``: 8-bit codes that are FP8 e4m3 bytes (``lut`` their 256 values),
    converted arithmetically by the AVX-512 path. Call only when :func:`available`."""
    lib = library()
    t, hq, d = q.shape
    hkv = cache.shape[1]
    if (q.dtype != torch.float32 or out.dtype != torch.float32 or q.stride(2) != 1 or q.stride(1) != d
            or out.stride(2) != 1 or out.stride(1) != d or cache.dtype != torch.uint8 or cache.stride(3) != 1
            or hq != hkv * groups):
        raise ValueError("paged_attend: q/out float32 [T, H, d] with contiguous rows, cache uint8 with unit byte stride")
    bt = block_table if block_table.dtype == torch.int32 else block_table.to(torch.int32)
    if bt.stride(-1) != 1:
        bt = bt.contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    qsl = query_start_loc.to(torch.int32).contiguous()
    reqs = reqs.to(torch.int32).contiguous()
    lut = _f32(lut)
    rc = lib.kv_paged_attend(reqs.numel(), reqs.data_ptr(), qsl.data_ptr(), lens.data_ptr(), bt.data_ptr(),
                             bt.stride(0), cache.data_ptr(), cache.stride(0), cache.stride(1), cache.shape[2],
                             cache.stride(2), hkv, groups, d, bits, lut.data_ptr(), int(e4m3), nbytes, kind, scale_offset, nblk,
                             blk, value_offset, q.data_ptr(), q.stride(0), float(sm_scale), out.data_ptr(),
                             out.stride(0))  # fmt: skip
    if rc != 0:
        raise MemoryError("paged_attend: the kernel could not allocate its scratch buffers")


# ---- the same sums in PyTorch (fallback without a compiler; the tests' reference for the kernel) ----------------
_BLOCK = 1024


def _values(codes: torch.Tensor, bits: int, lut: torch.Tensor, d: int, scale: torch.Tensor | None,
            blk: int) -> torch.Tensor:
    from .packing import unpack_bits

    x = lut.to(torch.float32)[unpack_bits(codes, bits, d).long()]
    if scale is not None:
        x = x * scale.to(torch.float32).repeat_interleave(blk or d, dim=-1)[..., :d]
    return x


def table_score(q: torch.Tensor, codes: torch.Tensor, bits: int, lut: torch.Tensor, d: int,
                scale: torch.Tensor | None = None, blk: int = 0, qgroup: int = 0) -> torch.Tensor:
    """:func:`lut_score` in PyTorch: the looked-up values of ``_BLOCK`` tokens at a time, then a matmul."""
    t = codes.shape[-2]
    qf = q.to(torch.float32)
    if qgroup:
        qf = qf.repeat_interleave(qgroup, dim=-3)[..., :t, :, :]  # [*L, T, G, d]
    parts = []
    for a in range(0, t, _BLOCK):
        e = min(t, a + _BLOCK)
        x = _values(codes[..., a:e, :], bits, lut, d, None if scale is None else scale[..., a:e, :], blk)
        if qgroup:
            parts.append(torch.einsum("...tgd,...td->...gt", qf[..., a:e, :, :], x))
        else:
            parts.append(qf @ x.transpose(-1, -2))
    if not parts:
        return torch.zeros(*codes.shape[:-2], q.shape[-2], 0)
    return torch.cat(parts, dim=-1)


def table_mix(w: torch.Tensor, codes: torch.Tensor, bits: int, lut: torch.Tensor, d: int,
              scale: torch.Tensor | None = None, blk: int = 0) -> torch.Tensor:
    """:func:`lut_mix` in PyTorch (blocks of ``_BLOCK`` tokens)."""
    t = codes.shape[-2]
    wf = w.to(torch.float32)
    out = torch.zeros(*codes.shape[:-2], w.shape[-2], d, dtype=torch.float32)
    for a in range(0, t, _BLOCK):
        e = min(t, a + _BLOCK)
        x = _values(codes[..., a:e, :], bits, lut, d, None if scale is None else scale[..., a:e, :], blk)
        out = out + wf[..., a:e] @ x
    return out


def lookup_score(q: torch.Tensor, codes: torch.Tensor, bits: int, lut: torch.Tensor, d: int,
                 scale: torch.Tensor | None = None, blk: int = 0, qgroup: int = 0) -> torch.Tensor:
    """:func:`lut_score` where the kernel runs (CPU tensors, leading axes of ``q`` equal to those of ``codes``),
    else :func:`table_score`."""
    if _kernel_ok(q, codes, 3 if qgroup else 2):
        return lut_score(q, codes, bits, lut, d, scale, blk, qgroup)
    return table_score(q, codes, bits, lut, d, scale, blk, qgroup)


def lookup_mix(w: torch.Tensor, codes: torch.Tensor, bits: int, lut: torch.Tensor, d: int,
               scale: torch.Tensor | None = None, blk: int = 0) -> torch.Tensor:
    """:func:`lut_mix` where the kernel runs, else :func:`table_mix`."""
    if _kernel_ok(w, codes, 2):
        return lut_mix(w, codes, bits, lut, d, scale, blk)
    return table_mix(w, codes, bits, lut, d, scale, blk)


def _kernel_ok(x: torch.Tensor, codes: torch.Tensor, tail: int) -> bool:
    return (x.device.type == "cpu" and codes.device.type == "cpu" and x.shape[:-tail] == codes.shape[:-2]
            and available())  # fmt: skip


def kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest value along the last axis, ``[..., 1]`` (``1 <= k <= x.shape[-1]``): a quickselect in
    the compiled kernel for float32 CPU tensors, else ``torch.topk``. ``x >= kth_largest(x, k)`` is the top-k mask
    (all tied values at the threshold included)."""
    n = x.shape[-1]
    if x.dtype != torch.float32 or x.device.type != "cpu" or not available() or not x.numel():
        return x.topk(k, dim=-1).values[..., -1:]
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], dtype=torch.float32)
    library().kv_kth_largest(rows.shape[0], n, rows.data_ptr(), rows.stride(0), k, out.data_ptr())
    return out.reshape(*x.shape[:-1], 1)


def bucket_count(y: torch.Tensor, thresholds: list[float]) -> torch.Tensor | None:
    """``uint8`` counts of the ``thresholds`` (at most 255, rounded to float32) each value of ``y`` exceeds, in the
    compiled kernel; None where it does not run (not a float32 CPU tensor, or no kernel): the caller compares in
    PyTorch."""
    if y.dtype != torch.float32 or y.device.type != "cpu" or len(thresholds) > 255 or not available():
        return None
    yc = y if y.is_contiguous() else y.contiguous()
    thr = torch.tensor(thresholds, dtype=torch.float32)
    out = torch.empty(y.shape, dtype=torch.uint8)
    if yc.numel():
        library().kv_bucket(yc.numel(), yc.data_ptr(), thr.numel(), thr.data_ptr(), out.data_ptr())
    return out
