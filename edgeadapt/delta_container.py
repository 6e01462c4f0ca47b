"""The GGUF container of delta files, read strictly, and its integrity and signature slots.

Shared by every adapter kind (:mod:`edgeadapt.delta`, :mod:`edgeadapt.delta_kinds`): the parser
checks every count, string, array, dimension and tensor extent against the bytes present before
anything is allocated; the slots are the fixed-length ``edgeadapt.integrity`` /
``edgeadapt.signature`` strings whose bytes are hashed as zeros. numpy, gguf and stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any, Iterable

import gguf
import numpy as np

from .errors import FormatError, collect

K_ALIGNMENT = gguf.Keys.General.ALIGNMENT
K_INTEGRITY = "edgeadapt.integrity"
K_SIGNATURE = "edgeadapt.signature"
_T = gguf.GGMLQuantizationType

# ---- limits and slots
MAX_TENSORS = 1 << 16  # a 100-layer model with every linear adapted needs ~1,400
MAX_KV = 1 << 12
MAX_KEY = 1 << 16
MAX_DEPTH = 2  # arrays of arrays at most
INTEGRITY_TAG = b"edgeadapt-delta-v2\0"
SIGNATURE_TAG = b"edgeadapt-delta-sig-v1\0"
INTEGRITY_LEN = 71  # "sha256:" + 64 hex
SIGNATURE_LEN = 153  # "ed25519:" + 16 hex + ":" + 128 hex
UNSIGNED = "unsigned".ljust(SIGNATURE_LEN)
_INTEGRITY_RE = re.compile(r"sha256:[0-9a-f]{64}")
_SIGNATURE_RE = re.compile(r"ed25519:([0-9a-f]{16}):([0-9a-f]{128})")



# ---- the GGUF container, parsed strictly: nothing is allocated before its bytes are known to exist
@dataclass
class _Field:
    vtype: str  # gguf.GGUFValueType name of the value ("ARRAY" for arrays)
    value: Any
    span: tuple[int, int]  # byte range of a string value's payload (of the whole value otherwise)


@dataclass
class _Tensor:
    name: str
    ttype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (ggml ne reversed)
    start: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class _Container:
    fields: dict[str, _Field]
    tensors: list[_Tensor]
    data_start: int


_SCALARS = {"UINT8": "<B", "INT8": "<b", "UINT16": "<H", "INT16": "<h", "UINT32": "<I", "INT32": "<i",
            "FLOAT32": "<f", "BOOL": "<?", "UINT64": "<Q", "INT64": "<q", "FLOAT64": "<d"}


class _Cursor:
    def __init__(self, buf: memoryview, where: str):
        self.buf, self.pos, self.where = buf, 0, where

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

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        name = _vtype_name(vtype, self.where, what)
        if name == "STRING":
            return self.string(what)[0]
        if name != "ARRAY":
            return self.scalar(_SCALARS[name], what)
        if depth >= MAX_DEPTH:
            raise FormatError(f"{self.where}: {what} nests arrays deeper than {MAX_DEPTH}")
        itype = self.scalar("<I", f"the item type of {what}")
        n = self.scalar("<Q", f"the item count of {what}")
        iname = _vtype_name(itype, self.where, what)
        least = 8 if iname in ("STRING", "ARRAY") else struct.calcsize(_SCALARS[iname])
        if n * least > len(self.buf) - self.pos:
            raise FormatError(f"{self.where}: {what} claims {n} items; only {len(self.buf) - self.pos} bytes are left")
        if iname in _SCALARS:
            dt = np.dtype(_SCALARS[iname])
            return np.frombuffer(self.take(n * dt.itemsize, what), dtype=dt).tolist()
        return [self.value(itype, f"{what}[{i}]", depth + 1) for i in range(n)]


def _vtype_name(vtype: int, where: str, what: str) -> str:
    try:
        return gguf.GGUFValueType(vtype).name
    except ValueError:
        raise FormatError(f"{where}: {what} has value type {vtype}, which GGUF does not define") from None


def parse_gguf(buf: bytes | memoryview, where: str) -> _Container:
    """Parse a GGUF v3 header, metadata and tensor infos, checking every size against ``buf``."""
    cur = _Cursor(memoryview(buf), where)
    magic = bytes(cur.take(4, "the GGUF magic"))
    if magic != b"GGUF":
        raise FormatError(f"{where}: expected GGUF magic b'GGUF', found {magic!r}")
    version = cur.scalar("<I", "the GGUF version")
    if version != 3:
        raise FormatError(f"{where}: expected GGUF version 3, found {version}")
    n_tensors, n_kv = cur.scalar("<Q", "the tensor count"), cur.scalar("<Q", "the key count")
    size = len(buf)
    if n_tensors > MAX_TENSORS or n_tensors * 24 > size:
        raise FormatError(f"{where}: header claims {n_tensors} tensors; a {size}-byte file holds at most "
                          f"{min(MAX_TENSORS, size // 24)}")
    if n_kv > MAX_KV or n_kv * 12 > size:
        raise FormatError(f"{where}: header claims {n_kv} metadata keys; a {size}-byte file holds at most "
                          f"{min(MAX_KV, size // 12)}")
    fields: dict[str, _Field] = {}
    for i in range(n_kv):
        key = cur.string(f"key #{i}", MAX_KEY)[0]
        if key in fields:
            raise FormatError(f"{where}: metadata key {key!r} appears twice")
        vtype = cur.scalar("<I", f"the type of {key!r}")
        start = cur.pos
        val = cur.value(vtype, f"the value of {key!r}")
        vname = gguf.GGUFValueType(vtype).name
        span = (start + 8, cur.pos) if vname == "STRING" else (start, cur.pos)
        fields[key] = _Field(vname, val, span)
    align = 32
    if K_ALIGNMENT in fields:
        a = fields[K_ALIGNMENT]
        if a.vtype != "UINT32" or a.value < 1 or a.value > 1 << 16 or a.value & (a.value - 1):
            raise FormatError(f"{where}: {K_ALIGNMENT} must be a uint32 power of two up to 65536, found {a.vtype} {a.value!r}")
        align = a.value
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"the name of tensor #{i}", 1024)[0]
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
            block, tsize = gguf.GGML_QUANT_SIZES[t]
        except (ValueError, KeyError):
            raise FormatError(f"{where}: tensor {name!r} has type id {ttype}, which this reader does not know") from None
        if min(ne) < 1 or ne[0] % block:
            raise FormatError(f"{where}: tensor {name!r} has dimensions {ne}; each must be ≥ 1 and the first a "
                              f"multiple of {block} for {t.name}")
        nbytes = math.prod(ne) // block * tsize
        if offset % align or data_start + offset + nbytes > size:
            raise FormatError(f"{where}: tensor {name!r} claims bytes {offset}…{offset + nbytes} of the data section; "
                              f"expected an offset aligned to {align} inside the {max(0, size - data_start)} bytes present")
        tensors.append(_Tensor(name, t, tuple(reversed(ne)), data_start + offset, nbytes))
    by_start = sorted(tensors, key=lambda t: t.start)
    for prev, nxt in zip(by_start, by_start[1:]):
        if prev.start + prev.nbytes > nxt.start:
            raise FormatError(f"{where}: tensors {prev.name!r} and {nxt.name!r} overlap")
    return _Container(fields, tensors, data_start)


# ---- integrity and signature slots (version 2)
def _hash_zeroed(buf: memoryview, spans: Iterable[tuple[int, int]], tag: bytes) -> bytes:
    h, pos = hashlib.sha256(tag), 0
    for s, e in sorted(spans):
        h.update(buf[pos:s])
        h.update(bytes(e - s))
        pos = e
    h.update(buf[pos:])
    return h.digest()


def _slots(c: _Container, where: str) -> tuple[tuple[int, int], tuple[int, int]]:
    problems = []
    for key, n in ((K_INTEGRITY, INTEGRITY_LEN), (K_SIGNATURE, SIGNATURE_LEN)):
        f = c.fields.get(key)
        if f is None or f.vtype != "STRING" or f.span[1] - f.span[0] != n:
            found = "nothing" if f is None else f"a {f.vtype} of {f.span[1] - f.span[0]} bytes"
            problems.append(f"{key}: expected a string of exactly {n} bytes, found {found}")
    collect(problems, FormatError, f"{where}: not a version-2 delta file:")
    return c.fields[K_INTEGRITY].span, c.fields[K_SIGNATURE].span


def signature_message(data: bytes, where: str = "delta file") -> tuple[str, bytes]:
    """(the signature slot as stored, the digest a signature signs) of version-2 delta bytes."""
    buf = memoryview(data)
    integ, sig = _slots(parse_gguf(buf, where), where)
    return bytes(buf[sig[0]:sig[1]]).decode("ascii", "replace"), _hash_zeroed(buf, [integ, sig], b"")


def with_signature(data: bytes, slot: str, where: str = "delta file") -> bytes:
    """The same file with the signature slot set to ``slot`` and the integrity recomputed."""
    if len(slot) != SIGNATURE_LEN or not (slot == UNSIGNED or _SIGNATURE_RE.fullmatch(slot)):
        raise FormatError(f"signature slot must be {SIGNATURE_LEN} bytes 'ed25519:<16 hex>:<128 hex>' or unsigned")
    out = bytearray(data)
    integ, sig = _slots(parse_gguf(memoryview(out), where), where)
    out[sig[0]:sig[1]] = slot.encode("ascii")
    out[integ[0]:integ[1]] = ("sha256:" + _hash_zeroed(memoryview(out), [integ], INTEGRITY_TAG).hex()).encode()
    return bytes(out)


# ---- version-1 integrity (canonical encoding of metadata and tensors)
def _digest_v1(kv: Iterable[tuple[str, str, object]], tensors: Iterable[tuple[str, str, tuple, memoryview]]) -> str:
    h = hashlib.sha256(b"edgeadapt-delta-v1\0")
    for key, vtype, value in sorted(kv, key=lambda x: x[0]):
        if key.startswith("GGUF.") or key == K_INTEGRITY:
            continue
        h.update(json.dumps([key, vtype, value], sort_keys=True).encode() + b"\0")
    for name, ttype, shape, data in tensors:
        h.update(json.dumps([name, ttype, list(shape)]).encode() + b"\0")
        h.update(data)
    return "sha256:" + h.hexdigest()



# ---- tensor data
def _array(buf: memoryview, t: _Tensor) -> np.ndarray:
    if t.ttype in (_T.F32, _T.F16, _T.I8):
        dt = {_T.F32: "<f4", _T.F16: "<f2", _T.I8: "i1"}[t.ttype]
        return np.frombuffer(buf, dtype=dt, count=math.prod(t.shape), offset=t.start).reshape(t.shape)
    raw = np.frombuffer(buf, dtype=np.uint8, count=t.nbytes, offset=t.start).reshape(t.shape[0], -1)
    return gguf.quants.dequantize(raw, t.ttype).reshape(t.shape)


