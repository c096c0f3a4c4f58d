"""Model files checked before they are trusted: GGUF headers, and the manifest of a dequantised cache folder.

* :func:`check_gguf` reads a GGUF file's header without parsing tensors: magic ``GGUF``, a supported version, every
  metadata entry and tensor record inside the file, and the tensor data ending within the file size (a truncated
  download or copy is caught here, not as a numpy error deep in transformers). ``quick=True`` checks only the
  magic, version and minimum size (cheap enough for every load).
* A dequantised cache folder holds ``kvslim-files.json``: the size and CRC-32 of every file in it, written when the
  folder is built. :func:`verify_folder` recomputes them (about 0.25 s per 500 MB) and says what differs, so a
  truncated or damaged cache is rebuilt instead of loading garbage.
"""

from __future__ import annotations

import json
import mmap
import struct
import zlib
from pathlib import Path

from .errors import InvalidInput

__all__ = ["MANIFEST", "check_gguf", "verify_folder", "write_manifest"]

MANIFEST = "kvslim-files.json"
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY = 8, 9
_MAX_COUNT = 1 << 32  # more tensors / entries than this is a damaged header, not a model


class _Truncated(Exception):
    pass


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _Truncated
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise _Truncated
        self.pos += n

    def string(self) -> bytes:
        n = self.take("<Q")
        self.skip(n)
        return bytes(self.buf[self.pos - n : self.pos])

    def value(self, kind: int) -> int | None:
        """Skip one value of GGUF type ``kind``; returns it when it is an unsigned 32-bit int (alignment)."""
        if kind in _SCALAR:
            if kind == 4:
                return self.take("<I")
            self.skip(_SCALAR[kind])
        elif kind == _STRING:
            self.skip(self.take("<Q"))
        elif kind == _ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if item in _SCALAR:
                self.skip(_SCALAR[item] * count)
            else:
                for _ in range(count):
                    self.value(item)
        else:
            raise ValueError(f"unknown metadata value type {kind}")
        return None


def check_gguf(path: Path, quick: bool = False) -> None:
    """Raise ``InvalidInput`` naming ``path`` unless it is a complete GGUF file (see the module docstring)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InvalidInput(f"{path} cannot be read: {exc.strerror or exc}") from None
    if size == 0:
        raise InvalidInput(f"{path} is empty (0 bytes): not a GGUF model file")
    with path.open("rb") as fh:
        head = fh.read(24)
        if head[:4] != b"GGUF":
            raise InvalidInput(f"{path} is not a GGUF file (it starts with {head[:4]!r}, not b'GGUF')")
        if len(head) < 24:
            raise InvalidInput(f"{path} is truncated: {size} bytes, shorter than a GGUF header")
        version = struct.unpack_from("<I", head, 4)[0]
        if version not in (2, 3):
            raise InvalidInput(f"{path}: GGUF version {version} is not supported (versions 2 and 3 are)")
        if quick:
            return
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            end = _data_end(_Reader(buf), path)
    if end > size:
        raise InvalidInput(f"{path} is truncated: its tensors need {end:,} bytes but the file has {size:,}")


def _data_end(r: _Reader, path: Path) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    r.pos = 8
    try:
        n_tensors, n_kv = r.take("<Q"), r.take("<Q")
        if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
            raise InvalidInput(f"{path}: damaged GGUF header ({n_tensors} tensors, {n_kv} metadata entries)")
        alignment = 32
        for _ in range(n_kv):
            key = r.string()
            v = r.value(r.take("<I"))
            if key == b"general.alignment" and v:
                alignment = v
        last = 0
        for _ in range(n_tensors):
            r.string()
            dims = r.take("<I")
            if dims > 8:
                raise InvalidInput(f"{path}: damaged GGUF tensor record ({dims} dimensions)")
            n = 1
            for _ in range(dims):
                n *= r.take("<Q")
            kind, offset = r.take("<I"), r.take("<Q")
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise InvalidInput(f"{path}: unknown GGUF tensor type {kind}") from None
            last = max(last, offset + n // block * type_size)
    except _Truncated:
        raise InvalidInput(f"{path} is truncated: it ends inside its GGUF header") from None
    except ValueError as exc:
        raise InvalidInput(f"{path}: damaged GGUF header ({exc})") from None
    start = -(-r.pos // alignment) * alignment
    return start + last


def _crc32(path: Path) -> str:
    crc = 0
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def write_manifest(folder: Path) -> None:
    """Record the size and CRC-32 of every file of ``folder`` in ``folder/kvslim-files.json``."""
    files = {p.name: {"size": p.stat().st_size, "crc32": _crc32(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}  # fmt: skip
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": 1, "files": files}, indent=1) + "\n")
    tmp.replace(folder / MANIFEST)


def verify_folder(folder: Path) -> str | None:
    """What is wrong with ``folder`` against its manifest (None: all files match; ``"no manifest"``: never
    recorded, e.g. built by an older kvslim)."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
        files = data["files"]
        items = [(str(k), int(v["size"]), str(v["crc32"])) for k, v in files.items()]
    except FileNotFoundError:
        return "no manifest"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is damaged"
    for name, size, crc in items:
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != size:
            return f"{name} is {p.stat().st_size:,} bytes, {size:,} expected"
        if _crc32(p) != crc:
            return f"{name} does not match its checksum"
    return None
