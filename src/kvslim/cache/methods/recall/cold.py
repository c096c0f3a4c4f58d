"""The cold tier: exact (or codec-packed) K/V rows of tokens that left a cache's hot memory, fetched by index.

A :class:`ColdTier` belongs to one cache and owns its folder; it hands out :class:`ColdStream` s, one per layer and
role (keys, values). A stream stores vectors ``x [b, h, n, d]`` as *rows*: the bytes of one token of one head, all
packed fields of the codec side by side (``none`` = the model dtype, lossless; ``fp16``/``bf16``/``fp8``/``fp4``/
``tq*`` from ``kvslim.quant``). Rows are kept token-major, ``[n, b, h, R]`` bytes, so appending writes one
contiguous run, in

* ``ram``: a uint8 tensor on the CPU (pinned when the cache computes on a GPU), grown by 1.5x;
* ``disk``: a file ``<folder>/<name>-<unique>.cold`` reserved in steps (``posix_fallocate``, so a full disk is reported when
  space is reserved, never as a crash on a mapped page), written with ``pwrite`` and read through ``mmap``.

``fetch(idx [b, h, k])`` decodes just those rows; ``read(start, stop)`` a run of tokens (dense reading, chunk by
chunk). Bytes are counted, not estimated: ``nbytes()`` = rows stored x row bytes, ``reserved_nbytes()`` the
capacity held, ``fetched_bytes`` / ``read_bytes`` the row bytes gathered so far.

Faults raise :class:`~kvslim.errors.ColdTierError` naming the file: the file deleted or truncated under a live
cache (checked with ``fstat`` before every read), its bytes changed under a live cache (every row has a checksum,
kept in process memory, 4 bytes per row, and checked on every fetch and read: bytes that happen to decode to finite
values would otherwise give a wrong answer), the disk full or a file-size limit hit while reserving or writing. A folder that is missing or not writable is refused up front with ``InvalidInput``. The default folder is
a fresh temporary one, ``$TMPDIR/kvslim-cold-<pid>-<random>`` (``tempfile.gettempdir()``), removed when the tier is
closed or collected (``weakref.finalize``); in a folder the user names only the tier's own files
(``<layer>.<k|v>-<pid>-<random>.cold``) are removed. A process killed outright (``kill -9``) removes nothing, so the
first disk tier of every process removes what dead processes left: ``kvslim-cold-<pid>-*`` folders in the temporary
folder, and ``*-<pid>-*.cold`` files in the user's folder, whose ``<pid>`` is no running process
(:func:`remove_stale`).
"""

from __future__ import annotations

import copy
import mmap
import os
import shutil
import tempfile
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ....errors import ColdTierError, InvalidInput
from ...storage import make_storage_codec

__all__ = ["COLD_STORES", "ColdStream", "ColdTier", "check_cold_codec", "check_folder", "cold_codecs", "remove_stale"]

COLD_STORES = ("ram", "disk")
_RESERVE_TOKENS = 256  # smallest growth step (tokens)
_SUM_MOD = 2**31 - 1  # row checksums: a weighted byte sum modulo this prime
_SUM_ROWS = 16384  # rows summed per pass (bounds the int64 work tensor)
_SUM_WEIGHTS: dict[int, torch.Tensor] = {}


def row_sums(rows: torch.Tensor) -> torch.Tensor:
    """Checksums ``[...]`` (int32) of rows ``[..., R]`` uint8: ``sum_i w_i byte_i mod (2^31 - 1)`` with fixed random
    weights in ``[1, 2^31 - 1)``. A change of any one byte always changes it (the modulus is prime); random bytes
    match with probability about ``2^-31``."""
    r = rows.shape[-1]
    w = _SUM_WEIGHTS.get(r)
    if w is None:
        w = _SUM_WEIGHTS[r] = torch.randint(1, _SUM_MOD, (r,), generator=torch.Generator().manual_seed(r))
    flat = rows.reshape(-1, r)
    out = torch.empty(flat.shape[0], dtype=torch.int32)
    exact = r < 2**14  # in float64 every product (< 2^39) and partial sum (< 2^53) is an exact integer, in any order
    for a in range(0, flat.shape[0], _SUM_ROWS):
        part = flat[a : a + _SUM_ROWS]
        total = part.double() @ w.double() if exact else ((part.to(torch.int64) * w).sum(-1) % _SUM_MOD).double()
        out[a : a + _SUM_ROWS] = torch.fmod(total, _SUM_MOD).to(torch.int32)
    return out.reshape(rows.shape[:-1])


def cold_codecs() -> tuple[str, ...]:
    """Codec names a cold tier can store: ``none`` and every per-token, uncalibrated K/V format."""
    from ....formats import REGISTRY, codec_formats

    ok = [n for n in codec_formats("gqa") if not (REGISTRY[n].append_only or REGISTRY[n].calibrated or REGISTRY[n].per_role)]
    return ("none", *ok)


def check_cold_codec(name: str, dim: int) -> Any:
    """The codec for cold rows of dim ``dim``; refuses codecs whose rows are not independent per token."""
    if name not in cold_codecs():
        raise InvalidInput(
            f"cold codec {name!r} is not one a cold tier can hold (its rows must be independent per token); "
            f"use one of {', '.join(cold_codecs())}"
        )
    return make_storage_codec(name, dim, role="key")


def check_folder(folder: Path) -> Path:
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise InvalidInput(f"cold folder {folder} does not exist: create it or leave the folder unset (a temp folder)")
    if not folder.is_dir():
        raise InvalidInput(f"cold folder {folder} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".kvslim-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InvalidInput(f"cold folder {folder} is not writable ({e.strerror})") from None
    return folder


_PREFIX = "kvslim-cold-"
_CLEANED: set[str] = set()  # folders this process has swept for dead processes' leftovers


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _pid_of(name: str, prefix: str) -> int | None:
    """The pid in ``<prefix><pid>-<random>...`` (None for names without one, e.g. from older kvslim versions)."""
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split("-", 1)[0]
    return int(head) if head.isdigit() and "-" in name[len(prefix):] else None


def remove_stale(folder: str | Path | None = None) -> list[Path]:
    """Remove cold leftovers of processes that are no longer running: ``kvslim-cold-<pid>-*`` folders in the
    temporary folder (``folder`` None), or ``*-<pid>-*.cold`` files in a user's ``folder``. Returns what was removed.
    Names without a pid (older kvslim versions) and other users' entries are left alone. The pid is checked in this
    machine's process table: a temporary folder shared with another machine or container is not swept safely."""
    removed: list[Path] = []
    base = Path(folder) if folder is not None else Path(tempfile.gettempdir())
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for e in entries:
        if folder is None:
            pid = _pid_of(e.name, _PREFIX) if e.is_dir(follow_symlinks=False) else None
        else:
            stem = e.name.rsplit(".", 1)[0]
            parts = stem.split("-")
            pid = int(parts[-2]) if e.name.endswith(".cold") and len(parts) >= 3 and parts[-2].isdigit() else None
        if pid is None or _alive(pid):
            continue
        try:
            if e.stat(follow_symlinks=False).st_uid != os.getuid():  # only this user's leftovers
                continue
        except OSError:
            continue
        try:
            shutil.rmtree(e.path) if folder is None else os.unlink(e.path)
            removed.append(Path(e.path))
        except OSError:  # another process removed it first, or it is not ours to remove
            pass
    return removed


def _sweep_once(folder: Path | None) -> None:
    key = str(folder) if folder is not None else ""
    if key not in _CLEANED:
        _CLEANED.add(key)
        remove_stale(folder)


class ColdTier:
    """The cold storage of one cache: ``store`` ``ram`` or ``disk``; ``folder`` (disk) the user's folder or None."""

    def __init__(self, store: str = "ram", folder: str | Path | None = None) -> None:
        if store not in COLD_STORES:
            raise InvalidInput(f"cold store must be one of {', '.join(COLD_STORES)}, got {store!r}")
        if folder is not None and store != "disk":
            raise InvalidInput("a cold folder is only used with the disk store (cold=disk)")
        self.store = store
        self.streams: list[ColdStream] = []
        self.folder: Path | None = None
        self._finalizer = None
        if store == "disk":
            if folder is None:
                _sweep_once(None)
                self.folder = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))
                self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.folder), True)
            else:
                self.folder = check_folder(Path(folder))
                _sweep_once(self.folder)

    def __deepcopy__(self, memo: dict) -> ColdTier:
        """A copy with its own files (in a new temporary folder, or beside these in the user's folder)."""
        user = self.folder if self._finalizer is None else None
        new = ColdTier(self.store, user)
        memo[id(self)] = new
        return new

    def stream(self, name: str, codec: Any, out_dtype: torch.dtype, device: torch.device) -> ColdStream:
        s = ColdStream(self, name, codec, out_dtype, device)
        self.streams.append(s)
        return s

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.streams)

    def close(self) -> None:
        """Release every stream (files removed, the temporary folder too)."""
        for s in self.streams:
            s.close()
        self.streams = []
        if self._finalizer is not None:
            self._finalizer()


class _File:
    """The OS resources of one disk stream, closed by a finalizer that does not keep the stream alive."""

    def __init__(self, folder: Path, stem: str) -> None:
        try:  # a unique name: several caches may share the user's folder
            self.fd, name = tempfile.mkstemp(dir=folder, prefix=f"{stem}-{os.getpid()}-", suffix=".cold")
        except OSError as e:
            raise ColdTierError(f"cannot create a cold file in {folder} ({e.strerror})") from None
        self.path = Path(name)
        self.map: mmap.mmap | None = None
        self.view: np.ndarray | None = None

    def close(self) -> None:
        self.view = None
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # a caller still holds a view; the map goes with it
                pass
            self.map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class ColdStream:
    """Rows of one layer and role. Shapes: ``append(x [b, h, n, d])``, ``fetch(idx [b, h, k]) -> [b, h, k, d]``."""

    def __init__(self, tier: ColdTier, name: str, codec: Any, out_dtype: torch.dtype, device: torch.device) -> None:
        self.tier, self.name, self.codec = tier, name, codec
        self.out_dtype, self.device = out_dtype, torch.device(device)
        self.n = 0
        self.cap = 0
        self.layout: list[tuple[str, torch.dtype, int]] | None = None  # (field, dtype, bytes per row)
        self.template: Any = None  # a packed value giving codec / dtype for decoding (None: a plain tensor)
        self.row_bytes = 0
        self.bh: tuple[int, int] = (0, 0)
        self.fetched_bytes = 0
        self.read_bytes = 0
        self.rows: torch.Tensor | None = None  # ram: [cap, b, h, R] uint8
        self.sums: torch.Tensor | None = None  # [cap, b, h] int32: the checksum of every row (row_sums)
        self.file: _File | None = None
        self.closed = False
        self._finalizer = None
        if tier.store == "disk":
            self.file = _File(tier.folder, name)
            self._finalizer = weakref.finalize(self, self.file.close)

    def __deepcopy__(self, memo: dict) -> ColdStream:
        self._check()  # a closed stream holds nothing to copy
        tier = copy.deepcopy(self.tier, memo)
        new = tier.stream(self.name, copy.deepcopy(self.codec, memo), self.out_dtype, self.device)
        memo[id(self)] = new
        new.layout, new.template, new.row_bytes, new.bh = self.layout, self.template, self.row_bytes, self.bh
        new.fetched_bytes, new.read_bytes = self.fetched_bytes, self.read_bytes
        if self.n:
            self._check()
            new._grow(self.n)
            if new.file is None:
                new.rows[: self.n] = self.rows[: self.n]
            else:
                new._write(np.ascontiguousarray(self.file.view[: self.n]).tobytes(), 0)
            new.sums[: self.n] = self.sums[: self.n]
            new.n = self.n
        return new

    @property
    def path(self) -> Path | None:
        return self.file.path if self.file is not None else None

    # ---- rows <-> packed -------------------------------------------------------------------------------------
    def _to_rows(self, x: torch.Tensor) -> torch.Tensor:
        p = self.codec.encode(x)
        fields = {"": p} if isinstance(p, torch.Tensor) else p.fields
        if self.layout is None:
            self.template = None if isinstance(p, torch.Tensor) else p
            self.layout = [(k, f.dtype, f.shape[-1] * f.element_size()) for k, f in fields.items()]
            self.row_bytes = sum(w for _k, _dt, w in self.layout)
            self.bh = (x.shape[0], x.shape[1])
        parts = [f.contiguous().view(torch.uint8) for f in fields.values()]
        rows = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # [b, h, n, R]
        return rows.permute(2, 0, 1, 3).contiguous().cpu()  # [n, b, h, R]

    def _from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows [b, h, k, R]`` uint8 -> decoded ``[b, h, k, d]`` on the compute device."""
        rows = rows.to(self.device, non_blocking=True)
        fields, at = {}, 0
        for k, dt, w in self.layout:
            fields[k] = rows[..., at : at + w].contiguous().view(dt)
            at += w
        if self.template is None:
            return fields[""].to(self.out_dtype)
        b, h, n = rows.shape[:3]
        packed = replace(self.template, fields=fields, shape=(b, h, n, self.template.shape[-1]))
        return self.codec.decode(packed).to(self.out_dtype)

    # ---- storage ---------------------------------------------------------------------------------------------
    def _grow(self, need: int) -> None:
        if need <= self.cap:
            return
        cap = max(need, int(self.cap * 1.5), _RESERVE_TOKENS)
        b, h = self.bh
        sums = torch.zeros(cap, b, h, dtype=torch.int32)
        if self.sums is not None:
            sums[: self.n] = self.sums[: self.n]
        self.sums = sums
        if self.file is None:
            pin = self.device.type == "cuda"
            rows = torch.empty(cap, b, h, self.row_bytes, dtype=torch.uint8, pin_memory=pin)
            if self.rows is not None:
                rows[: self.n] = self.rows[: self.n]
            self.rows = rows
        else:
            f = self.file
            total = cap * b * h * self.row_bytes
            try:
                os.posix_fallocate(f.fd, 0, total)
            except OSError as e:
                if e.errno in (95, 22):  # EOPNOTSUPP / EINVAL: the filesystem cannot reserve; extend instead
                    os.ftruncate(f.fd, total)
                else:
                    raise ColdTierError(f"cold file {f.path}: cannot reserve {total:,} bytes ({e.strerror})") from None
            f.view = None
            if f.map is not None:
                try:
                    f.map.close()
                except BufferError:
                    pass
            f.map = mmap.mmap(f.fd, total, access=mmap.ACCESS_READ)
            f.view = np.frombuffer(f.map, dtype=np.uint8).reshape(cap, b, h, self.row_bytes)
        self.cap = cap

    def append(self, x: torch.Tensor) -> None:
        """Store ``x [b, h, n, d]`` after the rows already held."""
        self._check()
        if x.shape[2] == 0:
            return
        rows = self._to_rows(x)
        if (x.shape[0], x.shape[1]) != self.bh:
            raise InvalidInput(f"cold stream {self.name}: batch/heads {tuple(x.shape[:2])} differ from {self.bh}")
        self._check()
        n_new = rows.shape[0]
        self._grow(self.n + n_new)
        if self.file is None:
            self.rows[self.n : self.n + n_new] = rows
        else:
            self._write(rows.numpy().tobytes(), self.n * rows[0].numel())
        self.sums[self.n : self.n + n_new] = row_sums(rows)
        self.n += n_new

    def _write(self, data: bytes, offset: int) -> None:
        f = self.file
        try:
            written = os.pwrite(f.fd, data, offset)
        except OSError as e:
            raise ColdTierError(f"cold file {f.path}: write failed ({e.strerror})") from None
        if written != len(data):
            raise ColdTierError(f"cold file {f.path}: short write ({written} of {len(data)} bytes)")

    def _check(self) -> None:
        """Refuse a closed stream, and a file deleted or truncated under the live cache."""
        if self.closed:
            where = f"cold file {self.file.path}" if self.file is not None else f"cold stream {self.name}"
            raise ColdTierError(f"{where} was released by cache.close(): the cache cannot be used after close; "
                                "build a new one")  # fmt: skip
        f = self.file
        if f is None:
            return
        if f.fd < 0:
            raise ColdTierError(f"cold file {f.path} is closed (the cache was closed)")
        st = os.fstat(f.fd)
        if st.st_nlink == 0:
            raise ColdTierError(f"cold file {f.path} was deleted while the cache was live; rebuild the cache")
        need = self.n * self.bh[0] * self.bh[1] * self.row_bytes
        if st.st_size < max(need, 1 if self.n else 0):
            raise ColdTierError(
                f"cold file {f.path} was truncated to {st.st_size:,} bytes while the cache holds {need:,}; rebuild the cache"
            )

    def fetch(self, idx: torch.Tensor) -> torch.Tensor:
        """Decode rows ``idx [b, h, k]`` (token indices, per batch row and KV head) -> ``[b, h, k, d]``."""
        b, h, k = idx.shape
        self._check()
        if self.n == 0 or k == 0:
            raise InvalidInput(f"cold stream {self.name}: nothing to fetch ({self.n} rows held, {k} asked)")
        ic = idx.to("cpu", torch.long)
        if int(ic.max()) >= self.n or int(ic.min()) < 0:
            raise InvalidInput(f"cold stream {self.name}: row index out of range 0..{self.n - 1}")
        bi = torch.arange(b)[:, None, None].expand(b, h, k)
        hi = torch.arange(h)[None, :, None].expand(b, h, k)
        if self.file is None:
            rows = self.rows[ic, bi, hi]  # [b, h, k, R]
        else:
            rows = torch.from_numpy(self.file.view[ic.numpy(), bi.numpy(), hi.numpy()])
        self._verify(rows, self.sums[ic, bi, hi], ic)
        self.fetched_bytes += rows.numel()
        return self._from_rows(rows)

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Decode every row of tokens ``[start, stop)`` -> ``[b, h, stop-start, d]``."""
        self._check()
        if not 0 <= start <= stop <= self.n:
            raise InvalidInput(f"cold stream {self.name}: bad token range [{start}, {stop}) of {self.n}")
        if self.file is None:
            rows = self.rows[start:stop]
        else:
            rows = torch.from_numpy(np.array(self.file.view[start:stop]))
        tokens = torch.arange(start, stop)[:, None, None].expand(rows.shape[:3])
        self._verify(rows, self.sums[start:stop], tokens)
        self.read_bytes += rows.numel()
        return self._from_rows(rows.permute(1, 2, 0, 3))

    def select_batch(self, fn: Any) -> None:
        """Apply a batch reordering ``fn`` (on axis 0 of ``[b, ...]``) to every stored row."""
        if self.n == 0:
            return
        x = self.read(0, self.n)
        self.read_bytes -= self.n * self.bh[0] * self.bh[1] * self.row_bytes
        x = fn(x)
        self.n, self.cap, self.layout, self.rows, self.sums = 0, 0, None, None, None
        if self.file is not None:
            os.ftruncate(self.file.fd, 0)
        self.append(x)

    def _verify(self, rows: torch.Tensor, want: torch.Tensor, tokens: torch.Tensor) -> None:
        """Refuse rows ``[..., R]`` whose checksums differ from ``want`` (their token indices: ``tokens``)."""
        bad = row_sums(rows) != want
        if bool(bad.any()):
            first = int(tokens[bad][0])
            where = f"cold file {self.file.path}" if self.file is not None else f"cold stream {self.name} (RAM)"
            raise ColdTierError(f"{where}: {int(bad.sum())} of {bad.numel()} rows read fail their checksum (first "
                                f"at token {first}): its bytes were changed under the live cache; rebuild the cache")  # fmt: skip

    def nbytes(self) -> int:
        """Bytes of the rows stored (the cold tier's data)."""
        return self.n * self.bh[0] * self.bh[1] * self.row_bytes

    def reserved_nbytes(self) -> int:
        """Bytes of the capacity held (RAM tensor or reserved file space)."""
        return self.cap * self.bh[0] * self.bh[1] * self.row_bytes

    def close(self) -> None:
        """Release the rows (RAM) or the file (disk); the stream then holds nothing and refuses every use."""
        self.rows = None
        self.n = self.cap = 0
        self.closed = True
        if self._finalizer is not None:
            self._finalizer()
