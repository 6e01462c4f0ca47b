"""GGUF files, read strictly: the one reader of base models and delta files on the device.

The reader checks every count, length, dimension and offset against the bytes present before
anything is allocated, so a truncated or lying file is refused with a :class:`FormatError` naming
the file, what was expected and what was found — never another exception, a hang or a huge
allocation. What it accepts:

- magic ``GGUF``; version 2 or 3, little-endian (another version, or a big-endian file, is an
  :class:`UnsupportedError`);
- at most ``max_tensors`` tensors (default 65,536) and ``max_kv`` metadata keys (default 4,096),
  and no more than the file could hold (a tensor info takes 24 bytes at the least, a key/value 12);
- keys of at most 65,536 bytes, unique; values of the types GGUF defines; arrays of arrays at
  most, never deeper; strings valid UTF-8;
- ``general.alignment``, when present, a uint32 power of two up to 65,536 (default 32);
- tensor names of at most 1,024 bytes, unique; 1 to 4 dimensions, each ≥ 1, the first a whole
  number of blocks of the tensor type; a type gguf knows; an offset aligned to the alignment;
  the data inside the file; no two tensors overlapping.

``max_items`` steps over metadata arrays longer than that many items (a base file's vocabulary and
merges: SmolLM2's whole file parses in ~0.02 s so, ~4 s through ``gguf.GGUFReader``): their
bytes are still bounds-checked (every string length of a string array) but not decoded; the field
keeps only its item count. Tensors are read-only views of the buffer — a memmap for
:func:`open_gguf` — in their stored form. numpy, gguf and stdlib only.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.errors import FormatError, UnsupportedError
from edgeadapt.formats.gguf_constants import C

_T = C.GGMLQuantizationType
K_ALIGNMENT = C.Keys.General.ALIGNMENT

# ---- limits
MAX_TENSORS = 1 << 16  # a 100-layer model with every linear adapted needs ~1,400
MAX_KV = 1 << 12
MAX_KEY = 1 << 16
MAX_NAME = 1 << 10
MAX_DEPTH = 2  # arrays of arrays at most
SMALL_ARRAY = 1024  # open_gguf's default max_items: longer metadata arrays are stepped over
_VERSIONS = (2, 3)

_SCALARS = {"UINT8": "<B", "INT8": "<b", "UINT16": "<H", "INT16": "<h", "UINT32": "<I", "INT32": "<i",
            "FLOAT32": "<f", "BOOL": "<?", "UINT64": "<Q", "INT64": "<q", "FLOAT64": "<d"}
_VTYPES = {int(v): v.name for v in C.GGUFValueType}
# tensor types viewed as numpy items; every other type is viewed as rows of blocks (uint8)
_ITEMS = {_T.F32: "<f4", _T.F16: "<f2", _T.F64: "<f8", _T.I8: "i1", _T.I16: "<i2", _T.I32: "<i4", _T.I64: "<i8"}


# ---- what a file holds
class Field:
    """One metadata value: ``vtype`` the gguf.GGUFValueType name ("ARRAY" for arrays), ``value``
    (a list for arrays; None for an array stepped over), ``count`` (items of an array, else 1),
    ``span`` the byte range of a string's payload (of the whole value otherwise).
    ``contents()`` and ``data`` behave as gguf.GGUFReader's fields do."""

    __slots__ = ("vtype", "value", "count", "span")

    def __init__(self, vtype: str, value: Any, count: int, span: tuple[int, int]):
        self.vtype, self.value, self.count, self.span = vtype, value, count, span

    def contents(self) -> Any:
        return self.value

    @property
    def data(self) -> Any:
        return self.value if isinstance(self.value, list) else range(self.count)

    def __repr__(self) -> str:
        return f"Field({self.vtype}, {self.value!r:.60}, count={self.count}, span={self.span})"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ttype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (ggml ne reversed)
    start: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFFile:
    """``fields`` {key: Field}; ``tensors`` in file order; ``data`` the bytes as a uint8 array
    (an ``np.memmap`` from :func:`open_gguf`); ``where`` names the file in messages."""

    fields: dict[str, Field]
    tensors: list[TensorInfo]
    data_start: int
    alignment: int
    version: int
    data: np.ndarray
    where: str

    def view(self, t: TensorInfo) -> np.ndarray:
        """``t`` as stored, without a copy: see :func:`tensor_view`."""
        return tensor_view(self.data, t)


def tensor_view(buf: Any, t: TensorInfo) -> np.ndarray:
    """A read-only view of ``t`` in ``buf`` (bytes, memoryview or uint8 array): F32/F16/F64 and the
    integer types as numpy items in ``t.shape``; block types (quantized, BF16) as uint8 rows of
    blocks, ``t.shape[:-1] + (bytes per row,)`` — what gguf.quants.dequantize takes."""
    item = _ITEMS.get(t.ttype)
    if item is not None:
        return np.frombuffer(buf, dtype=item, count=math.prod(t.shape), offset=t.start).reshape(t.shape)
    return np.frombuffer(buf, dtype=np.uint8, count=t.nbytes, offset=t.start).reshape(*t.shape[:-1], -1)


# ---- the parser
class _Cursor:
    def __init__(self, buf: memoryview, where: str, max_items: int | None):
        self.buf, self.pos, self.where, self.max_items = buf, 0, where, max_items

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > len(self.buf) - self.pos:
            raise FormatError(f"{self.where}: expected {n} bytes of {what} at byte {self.pos}, "
                              f"found {len(self.buf) - self.pos} (truncated file or a lying size)")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, cap: int | None = None) -> tuple[str, tuple[int, int]]:
        n = self.scalar("<Q", f"the length of {what}")
        if cap is not None and n > cap:
            raise FormatError(f"{self.where}: {what} claims {n} bytes; at most {cap} are allowed")
        start = self.pos
        raw = self.take(n, what)
        try:
            return bytes(raw).decode("utf-8"), (start, start + n)
        except UnicodeDecodeError as e:
            raise FormatError(f"{self.where}: {what} at byte {start} is not UTF-8 ({e.reason})") from None

    def vtype(self, what: str) -> str:
        code = self.scalar("<I", f"the type of {what}")
        name = _VTYPES.get(code)
        if name is None:
            raise FormatError(f"{self.where}: {what} has value type {code}, which GGUF does not define")
        return name

    def value(self, name: str, what: str, depth: int = 0) -> tuple[Any, int]:
        """(value, item count) of a value of type ``name``; an array over max_items is (None, count)."""
        if name == "STRING":
            return self.string(what)[0], 1
        if name != "ARRAY":
            return self.scalar(_SCALARS[name], what), 1
        if depth >= MAX_DEPTH:
            raise FormatError(f"{self.where}: {what} nests arrays deeper than {MAX_DEPTH}")
        iname = self.vtype(f"the items of {what}")
        n = self.scalar("<Q", f"the item count of {what}")
        least = 8 if iname in ("STRING", "ARRAY") else struct.calcsize(_SCALARS[iname])
        if n * least > len(self.buf) - self.pos:
            raise FormatError(f"{self.where}: {what} claims {n} items; only {len(self.buf) - self.pos} bytes are left")
        keep = self.max_items is None or n <= self.max_items
        if iname in _SCALARS:
            raw = self.take(n * least, what)
            return (np.frombuffer(raw, dtype=_SCALARS[iname]).tolist() if keep else None), n
        if iname == "STRING" and not keep:
            self._skip_strings(n, what)
            return None, n
        items = [self.value(iname, f"{what}[{i}]", depth + 1)[0] for i in range(n)]
        return (items if keep else None), n

    def _skip_strings(self, n: int, what: str) -> None:
        """Step over ``n`` length-prefixed strings, bounds-checking each length (the hot loop of a
        vocabulary: no method calls, no decoding)."""
        buf, pos, size, unpack = self.buf, self.pos, len(self.buf), struct.Struct("<Q").unpack_from
        for i in range(n):
            if pos + 8 > size:
                self.pos = pos
                self.take(8, f"the length of {what}[{i}]")  # raises
            k = unpack(buf, pos)[0]
            if k > size - pos - 8:
                self.pos = pos + 8
                self.take(k, f"{what}[{i}]")  # raises
            pos += 8 + k
        self.pos = pos


def parse_gguf(buf: Any, where: str, *, max_items: int | None = None, max_tensors: int = MAX_TENSORS,
               max_kv: int = MAX_KV, size: int | None = None) -> GGUFFile:
    """Parse the header, metadata and tensor infos of the GGUF bytes ``buf`` (bytes, memoryview or
    uint8 array), checking every size against them; ``where`` names the file in messages. ``size``: the
    file's size when ``buf`` holds only its beginning (a private copy of the header; tensor extents are
    checked against the file, the header must lie within ``buf``)."""
    mv = memoryview(buf).cast("B") if not isinstance(buf, np.ndarray) else memoryview(buf.reshape(-1).view(np.uint8))
    cur = _Cursor(mv, where, max_items)
    magic = bytes(cur.take(4, "the GGUF magic"))
    if magic != b"GGUF":
        raise FormatError(f"{where}: expected GGUF magic b'GGUF', found {magic!r}")
    version = cur.scalar("<I", "the GGUF version")
    if version not in _VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        kind = f"a big-endian file (version {swapped})" if swapped in _VERSIONS else "an unknown version"
        raise UnsupportedError(f"{where}: GGUF version {version}, {kind}; this reader takes little-endian "
                               f"versions {' and '.join(map(str, _VERSIONS))}")
    n_tensors, n_kv = cur.scalar("<Q", "the tensor count"), cur.scalar("<Q", "the key count")
    size = len(mv) if size is None else size
    if n_tensors > max_tensors or n_tensors * 24 > size:
        raise FormatError(f"{where}: header claims {n_tensors} tensors; a {size}-byte file holds at most "
                          f"{min(max_tensors, size // 24)}")
    if n_kv > max_kv or n_kv * 12 > size:
        raise FormatError(f"{where}: header claims {n_kv} metadata keys; a {size}-byte file holds at most "
                          f"{min(max_kv, size // 12)}")
    fields: dict[str, Field] = {}
    for i in range(n_kv):
        key = cur.string(f"key #{i}", MAX_KEY)[0]
        if key in fields:
            raise FormatError(f"{where}: metadata key {key!r} appears twice")
        vname = cur.vtype(f"the value of {key!r}")
        start = cur.pos
        value, count = cur.value(vname, f"the value of {key!r}")
        span = (start + 8, cur.pos) if vname == "STRING" else (start, cur.pos)
        fields[key] = Field(vname, value, count, span)
    align = 32
    if K_ALIGNMENT in fields:
        a = fields[K_ALIGNMENT]
        if a.vtype != "UINT32" or a.value < 1 or a.value > 1 << 16 or a.value & (a.value - 1):
            raise FormatError(f"{where}: {K_ALIGNMENT} must be a uint32 power of two up to 65536, "
                              f"found {a.vtype} {a.value!r}")
        align = a.value
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"the name of tensor #{i}", MAX_NAME)[0]
        n_dims = cur.scalar("<I", f"the dimension count of {name!r}")
        if not 1 <= n_dims <= 4:
            raise FormatError(f"{where}: tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to 4")
        ne = [cur.scalar("<Q", f"a dimension of {name!r}") for _ in range(n_dims)]
        ttype = cur.scalar("<I", f"the type of {name!r}")
        offset = cur.scalar("<Q", f"the offset of {name!r}")
        infos.append((name, ne, ttype, offset))
    data_start = -(-cur.pos // align) * align
    tensors, seen = [], set()
    for name, ne, ttype, offset in infos:
        if name in seen:
            raise FormatError(f"{where}: tensor name {name!r} appears twice")
        seen.add(name)
        try:
            t = _T(ttype)
            block, tsize = C.GGML_QUANT_SIZES[t]
        except (ValueError, KeyError):
            raise FormatError(f"{where}: tensor {name!r} has type id {ttype}, which this reader does not know") from None
        if min(ne) < 1 or ne[0] % block:
            raise FormatError(f"{where}: tensor {name!r} has dimensions {ne}; each must be ≥ 1 and the first a "
                              f"multiple of {block} for {t.name}")
        nbytes = math.prod(ne) // block * tsize
        if offset % align or data_start + offset + nbytes > size:
            raise FormatError(f"{where}: tensor {name!r} claims bytes {offset}…{offset + nbytes} of the data section; "
                              f"expected an offset aligned to {align} inside the {max(0, size - data_start)} bytes present")
        tensors.append(TensorInfo(name, t, tuple(reversed(ne)), data_start + offset, nbytes))
    by_start = sorted(tensors, key=lambda t: t.start)
    for prev, nxt in zip(by_start, by_start[1:]):
        if prev.start + prev.nbytes > nxt.start:
            raise FormatError(f"{where}: tensors {prev.name!r} and {nxt.name!r} overlap")
    data = buf if isinstance(buf, np.ndarray) else np.frombuffer(mv, dtype=np.uint8)
    return GGUFFile(fields, tensors, data_start, align, version, data, where)


def open_gguf(path: str | os.PathLike[str], *, max_items: int | None = SMALL_ARRAY, max_tensors: int = MAX_TENSORS,
              max_kv: int = MAX_KV) -> GGUFFile:
    """:func:`parse_gguf` of a file, memmapped read-only: tensor views read pages only when used."""
    path = Path(path)
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    except (OSError, ValueError) as e:
        raise FormatError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from None
    return parse_gguf(data, str(path), max_items=max_items, max_tensors=max_tensors, max_kv=max_kv)
