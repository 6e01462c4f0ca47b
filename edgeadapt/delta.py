"""The delta file: one adapter, pinned to one base, in llama.cpp's GGUF LoRA layout.

Spec (mirrored in docs/FORMAT.md). A delta file is a GGUF v3 file (tensor data aligned to
``general.alignment``, default 32) that

- MUST set ``general.type = "adapter"`` and ``general.architecture`` to the base's GGUF architecture;
- MUST set ``adapter.type = "lora"`` when every factor is F32, F16 or Q8_0, so llama.cpp loads it as a
  LoRA adapter, and ``"edgeadapt-int8-lora"`` / ``"edgeadapt-int4-lora"`` for grouped-integer
  factors, which llama.cpp refuses by name instead of misreading;
- MUST set ``adapter.lora.alpha = 0``: every per-module scale (alpha/r, alpha/√r for rsLoRA,
  rank_pattern / alpha_pattern) is folded into ``lora_b``, and llama.cpp applies a LoRA with
  alpha 0 at exactly the user's scale — so llama.cpp computes what the training library computed;
- MUST set ``edgeadapt.format = "edgeadapt.delta"`` and ``edgeadapt.format_version`` (uint32, 2);
- MUST set ``edgeadapt.base.fingerprint`` to the fingerprint of the base it was made for
  (:mod:`edgeadapt.fingerprint`); a runtime MUST refuse it on any other base;
- MUST set ``edgeadapt.adapter.name`` (string), ``edgeadapt.adapter.version`` (uint32; it only goes
  up between releases of one adapter, and a store refuses an older one unless asked to roll back)
  and ``edgeadapt.adapter.kind`` (``"lora"``);
- MUST set ``edgeadapt.quant`` (string) to how the factors are stored: ``F32``, ``F16``, ``Q8_0``,
  ``int8`` or ``int4``; for int8 / int4 also ``edgeadapt.quant.group_size`` (uint32 G, even, 2…4096);
- holds, for each adapted linear weight ``W`` of the base (GGUF name ``<w>``), the factors of
  ``ΔW = B @ A`` (float32 [out, in]), each ``<w>`` once with both factors of one rank r ≥ 1:

  - F32 / F16 / Q8_0: ``<w>.lora_a`` = A [r, in] and ``<w>.lora_b`` = B [out, r] (numpy order; ggml
    ``ne`` is reversed) of that GGUF type; a Q8_0 file stores a factor whose last dimension is not a
    multiple of 32 as F16 (llama.cpp's rule);
  - int8 / int4, rank-major: ``<w>.lora_a`` holds A [r, in] and ``<w>.lora_b`` holds Bᵀ [r, out] as
    GGUF I8 tensors — int8: one code in -127…127 per value, shape [r, n]; int4: two codes per byte
    (low nibble first, each stored as code + 8 in 0…15), shape [r, n/2], n even. Each row is cut
    into groups of G values (the last group may be shorter); ``<w>.lora_a.scale`` /
    ``<w>.lora_b.scale`` [r, ⌈n/G⌉], F32 or F16, hold each group's scale: value = code × scale;

  the rows of B for ``attn_q`` / ``attn_k`` of "norm"-rope architectures are permuted as the base's
  rows are;
- MUST set ``edgeadapt.integrity`` to a 71-byte string ``sha256:<hex>``: sha256 of the tag
  ``edgeadapt-delta-v2\\0`` and every byte of the file, with the 71 bytes of this value read as
  zero bytes. It covers header, metadata, tensor infos, padding and data; a reader MUST check it;
- MUST set ``edgeadapt.signature`` to a 153-byte string: ``unsigned`` padded with spaces, or
  ``ed25519:<key id>:<signature>`` (16 + 128 lowercase hex): an Ed25519 signature of the tag
  ``edgeadapt-delta-sig-v1\\0`` followed by the sha256 of the file with the integrity and the
  signature values both read as zero bytes, made by the key whose sha256 starts with the key id.
  Signing fills this slot in place and then recomputes the integrity, so no byte moves;
- MAY set ``edgeadapt.source`` (what it was converted from), ``edgeadapt.adapter.description``,
  ``general.name``. Readers MUST ignore keys they do not know.

Version 1 (edgeadapt 0.1) files are still read: F32 / F16 factors, no ``edgeadapt.quant`` or
signature, and ``edgeadapt.integrity`` is the sha256 of the canonical encoding of every other
key/value (sorted by key) and every tensor's name, type, shape and bytes in file order. They are
signed by re-writing them as version 2.

Readers validate the whole file before anything is used and never trust a size: every count,
string, array, dimension and tensor extent is checked against the bytes present before anything is
allocated (at most 65,536 tensors and 4,096 keys); tensor data MUST lie in the data section,
aligned and without overlap; duplicate names, unknown types, wrong dtypes or shapes, unpaired
factors and NaN/Inf values (after dequantization) are refused, naming every problem at once.
This module imports only numpy, gguf and the standard library: it is used on devices.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import gguf
import numpy as np

from .arch import ArchConfig
from .errors import AdapterMismatchError, FormatError, IntegrityError, UnsupportedError, collect

MAGIC = "edgeadapt.delta"
VERSION = 2
READS = (1, 2)

# ---- keys (gguf's own constants where gguf has them)
K_TYPE = gguf.Keys.General.TYPE
K_ARCH = gguf.Keys.General.ARCHITECTURE
K_ALIGNMENT = gguf.Keys.General.ALIGNMENT
K_ADAPTER_TYPE = gguf.Keys.Adapter.TYPE
K_ALPHA = gguf.Keys.Adapter.LORA_ALPHA
K_FORMAT = "edgeadapt.format"
K_VERSION = "edgeadapt.format_version"
K_FINGERPRINT = "edgeadapt.base.fingerprint"
K_NAME = "edgeadapt.adapter.name"
K_ADAPTER_VERSION = "edgeadapt.adapter.version"
K_KIND = "edgeadapt.adapter.kind"
K_SOURCE = "edgeadapt.source"
K_DESCRIPTION = "edgeadapt.adapter.description"
K_QUANT = "edgeadapt.quant"
K_GROUP = "edgeadapt.quant.group_size"
K_INTEGRITY = "edgeadapt.integrity"
K_SIGNATURE = "edgeadapt.signature"
REQUIRED = {K_TYPE: "STRING", K_ARCH: "STRING", K_ADAPTER_TYPE: "STRING", K_FORMAT: "STRING", K_VERSION: "UINT32",
            K_FINGERPRINT: "STRING", K_NAME: "STRING", K_ADAPTER_VERSION: "UINT32", K_KIND: "STRING",
            K_INTEGRITY: "STRING"}
REQUIRED_V2 = {K_QUANT: "STRING", K_SIGNATURE: "STRING"}

# ---- storage types: quant -> (adapter.type, GGUF factor types allowed)
_T = gguf.GGMLQuantizationType
QUANTS: dict[str, tuple[str, tuple[Any, ...]]] = {
    "F32": ("lora", (_T.F32,)),
    "F16": ("lora", (_T.F16,)),
    "Q8_0": ("lora", (_T.Q8_0, _T.F16)),  # F16 where the last dim is not a multiple of 32 (llama.cpp)
    "int8": ("edgeadapt-int8-lora", (_T.I8,)),
    "int4": ("edgeadapt-int4-lora", (_T.I8,)),
}
BITS = {"int8": 8, "int4": 4}
SCALE_TYPES = (_T.F32, _T.F16)
ROLES = {".lora_a": ("a", False), ".lora_b": ("b", False), ".lora_a.scale": ("a", True), ".lora_b.scale": ("b", True)}
FACTOR_SUFFIXES = (".lora_a", ".lora_b")

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


@dataclass
class LoraDelta:
    """A loaded LoRA delta: ``factors[w] = (A [r, in], B [out, r])`` in float32, scale folded into B."""

    name: str
    version: int
    arch: str
    fingerprint: str
    factors: dict[str, tuple[np.ndarray, np.ndarray]]
    source: str = ""
    description: str = ""
    path: str | None = None
    metadata: dict[str, object] = field(default_factory=dict)
    quant: str = "F32"  # how the factors were stored (they are float32 here)
    format_version: int = VERSION
    integrity: str = ""
    signature: str = ""  # "ed25519:<key id>:<hex>" or "" when unsigned
    signed_digest: bytes | None = None  # what a signature signs (version 2 files only)
    kind = "lora"
    mergeable = True

    # ---- the adapter protocol
    @property
    def targets(self) -> list[str]:
        return list(self.factors)

    def delta(self, target: str) -> np.ndarray:
        """ΔW for one target, float32 [out, in]."""
        a, b = self.factors[target]
        return b @ a  # [out, r] @ [r, in]

    def live_factors(self, target: str) -> tuple[np.ndarray, np.ndarray]:
        return self.factors[target]

    @property
    def ranks(self) -> set[int]:
        return {a.shape[0] for a, _ in self.factors.values()}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.factors.values())

    def check_base(self, cfg: ArchConfig, fingerprint: str) -> None:
        """Refuse, naming every mismatch at once, if this delta was not made for that base."""
        problems = []
        if self.fingerprint != fingerprint:
            problems.append(f"base fingerprint: the adapter was made for {self.fingerprint}, this base is {fingerprint}")
        if self.arch != cfg.arch:
            problems.append(f"architecture: expected {cfg.arch!r}, found {self.arch!r}")
        shapes = cfg.linear_shapes()
        for w, (a, b) in self.factors.items():
            if w not in shapes:
                problems.append(f"{w}: not a linear weight of this base")
                continue
            out, inp = shapes[w]
            if a.shape[1] != inp or b.shape[0] != out:
                problems.append(f"{w}: expected lora_a [r, {inp}] and lora_b [{out}, r], "
                                f"found {list(a.shape)} and {list(b.shape)}")
        collect(problems, AdapterMismatchError,
                f"adapter {self.name!r} ({self.path or 'in memory'}) does not fit this base:")


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


# ---- grouped integer factors: rows [r, n] cut into groups of G along n
def quantize_rows(x: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 [r, n] -> (int8 codes [r, n] or packed int4 [r, n/2], scales [r, ⌈n/G⌉]: float16, or
    float32 when a scale is outside float16's normal range)."""
    r, n = x.shape
    ng = -(-n // group)
    pad = np.zeros((r, ng * group), np.float32)
    pad[:, :n] = x
    g = pad.reshape(r, ng, group)
    if bits == 8:
        d = np.abs(g).max(-1) / np.float32(127)
    else:  # the signed extreme maps to -8, as ggml's Q4_0 does: all 16 levels are used
        ext = np.take_along_axis(g, np.abs(g).argmax(-1)[..., None], -1)[..., 0]
        d = ext / np.float32(-8)
    d = _scale_dtype(d)
    inv = np.divide(1, d, out=np.zeros_like(d, dtype=np.float32), where=d != 0).astype(np.float32)
    lo, hi = (-127, 127) if bits == 8 else (-8, 7)
    q = np.clip(np.rint(g * inv[..., None]), lo, hi).astype(np.int8).reshape(r, ng * group)[:, :n]
    if bits == 4:
        u = (q + 8).astype(np.uint8)
        q = (u[:, 0::2] | (u[:, 1::2] << 4)).view(np.int8)
    return np.ascontiguousarray(q), d


def _scale_dtype(d: np.ndarray) -> np.ndarray:
    """Scales as float16 when every non-zero one is a normal float16, else float32."""
    a = np.abs(d[d != 0])
    if a.size == 0 or (a.min() >= 2.0 ** -14 and a.max() <= 65504):
        return d.astype(np.float16)
    return d.astype(np.float32)


def dequantize_rows(codes: np.ndarray, scales: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Inverse of :func:`quantize_rows`: float32 [r, n]."""
    if bits == 4:
        u = codes.view(np.uint8)
        q = np.empty((u.shape[0], u.shape[1] * 2), np.int8)
        q[:, 0::2], q[:, 1::2] = u & 15, u >> 4
        q -= 8
    else:
        q = codes
    n = q.shape[1]
    s = np.repeat(scales.astype(np.float32), group, axis=1)[:, :n]
    return q.astype(np.float32) * s


def _encode(w: str, a: np.ndarray, b: np.ndarray, quant: str, group: int) -> list[tuple[str, np.ndarray, Any]]:
    """One target's factors as (tensor name, array, raw GGUF type or None) in file order."""
    if quant in ("F32", "F16"):
        dt = np.float32 if quant == "F32" else np.float16
        return [(w + ".lora_a", np.ascontiguousarray(a, dt), None), (w + ".lora_b", np.ascontiguousarray(b, dt), None)]
    if quant == "Q8_0":
        out = []
        for suffix, x in ((".lora_a", a), (".lora_b", b)):
            if x.shape[1] % 32 == 0:
                out.append((w + suffix, gguf.quants.quantize(np.ascontiguousarray(x, np.float32), _T.Q8_0), _T.Q8_0))
            else:
                out.append((w + suffix, np.ascontiguousarray(x, np.float16), None))
        return out
    bits = BITS[quant]
    out = []
    for suffix, x in ((".lora_a", a), (".lora_b", b.T)):  # rank-major: A [r, in], Bᵀ [r, out]
        codes, scales = quantize_rows(np.asarray(x, np.float32), bits, group)
        out += [(w + suffix, codes, None), (w + suffix + ".scale", scales, None)]
    return out


# ---- writer
def write_delta(path: str | os.PathLike, *, arch: str, fingerprint: str, name: str, version: int,
                factors: dict[str, tuple[np.ndarray, np.ndarray]], source: str = "", description: str = "",
                dtype: str = "F32", group_size: int = 32) -> None:
    """Write a LoRA delta file; ``factors[w] = (A [r, in], B [out, r])`` with the scale already in B.

    ``dtype``: how factors are stored — F32, F16, Q8_0 (llama.cpp reads these three), int8 or int4
    (edgeadapt only; per-group scales, ``group_size`` values per group)."""
    if dtype not in QUANTS:
        raise UnsupportedError(f"delta dtype {dtype!r} is not supported; choose one of {', '.join(QUANTS)}")
    problems = []
    if dtype in BITS and (group_size < 2 or group_size > 4096 or group_size % 2):
        problems.append(f"group size must be even and in 2…4096, found {group_size}")
    if not 0 <= int(version) < 2 ** 32:
        problems.append(f"version must fit in uint32, found {version}")
    for w, (a, b) in factors.items():
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
            problems.append(f"{w}: lora_a {list(a.shape)} and lora_b {list(b.shape)} do not share a rank")
        elif not (np.isfinite(a).all() and np.isfinite(b).all()):
            problems.append(f"{w}: factors hold NaN or Inf")
        elif dtype == "int4" and (a.shape[1] % 2 or b.shape[0] % 2):
            problems.append(f"{w}: int4 packs two values per byte and needs even in/out sizes, found "
                            f"[{b.shape[0]}, {a.shape[1]}]; use int8")
    if not factors:
        problems.append("no factors")
    collect(problems, FormatError, f"cannot write delta {name!r}:")
    tensors = [t for w in factors for t in _encode(w, *factors[w], dtype, group_size)]
    kv: list[tuple[str, str, object]] = [
        (K_TYPE, "STRING", "adapter"), (K_ADAPTER_TYPE, "STRING", QUANTS[dtype][0]), (K_ALPHA, "FLOAT32", 0.0),
        (K_FORMAT, "STRING", MAGIC), (K_VERSION, "UINT32", VERSION), (K_FINGERPRINT, "STRING", fingerprint),
        (K_NAME, "STRING", name), (K_ADAPTER_VERSION, "UINT32", int(version)), (K_KIND, "STRING", "lora"),
        (K_QUANT, "STRING", dtype)]
    if dtype in BITS:
        kv.append((K_GROUP, "UINT32", int(group_size)))
    kv += [(K_SOURCE, "STRING", source), (K_DESCRIPTION, "STRING", description), ("general.name", "STRING", name),
           (K_SIGNATURE, "STRING", UNSIGNED), (K_INTEGRITY, "STRING", "sha256:" + "0" * 64)]
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)  # writes general.architecture itself
    for key, vtype, value in kv:
        writer.add_key_value(key, value, gguf.GGUFValueType[vtype])
    for n, t, raw in tensors:
        writer.add_tensor(n, t, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = with_signature(tmp.read_bytes(), UNSIGNED, str(tmp))  # fills in the integrity
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- reader
def read_delta(path: str | os.PathLike) -> LoraDelta:
    """Read and fully validate a delta file. Raises a :class:`FormatError` subclass on any defect."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such delta file")
    return delta_from_bytes(path.read_bytes(), path)


def delta_from_bytes(data: bytes, path: str | os.PathLike | None = None) -> LoraDelta:
    """:func:`read_delta` of a file's bytes already in memory (``path``, if any, names it in messages)."""
    where = Path(path) if path is not None else Path("<bytes>")
    buf = memoryview(data)
    c = parse_gguf(buf, str(where))
    f = c.fields
    problems = [f"missing key {k!r}" if k not in f else f"key {k!r}: expected {t}, found {f[k].vtype}"
                for k, t in REQUIRED.items() if k not in f or f[k].vtype != t]
    if K_ALPHA in f and f[K_ALPHA].vtype != "FLOAT32":
        problems.append(f"key {K_ALPHA!r}: expected FLOAT32, found {f[K_ALPHA].vtype}")
    collect(problems, FormatError, f"{where}: not an edgeadapt delta file:")
    v = {k: x.value for k, x in f.items()}
    if v[K_FORMAT] != MAGIC or v[K_TYPE] != "adapter":
        raise FormatError(f"{where}: expected {K_FORMAT}={MAGIC!r} and general.type='adapter'; "
                          f"found {v[K_FORMAT]!r}, {v[K_TYPE]!r}")
    if v[K_VERSION] not in READS:
        raise UnsupportedError(f"{where}: delta format version {v[K_VERSION]}; this edgeadapt reads versions "
                               f"{list(READS)} — upgrade edgeadapt")
    if v[K_KIND] != "lora":
        raise UnsupportedError(f"{where}: adapter kind {v[K_KIND]!r} is not supported by this version")
    if float(v.get(K_ALPHA, 0.0)) != 0.0:
        raise FormatError(f"{where}: expected {K_ALPHA} = 0 (scales folded into lora_b), found {v[K_ALPHA]}")
    if v[K_VERSION] == 1:
        quant, group, signature, signed = _check_v1(where, buf, c), 0, "", None
        allowed: tuple[Any, ...] = (_T.F32, _T.F16)
    else:
        quant, group, signature, signed = _check_v2(where, buf, c)
        allowed = QUANTS[quant][1]
    factors = _factors(where, buf, c, allowed, quant, group)
    return LoraDelta(name=v[K_NAME], version=int(v[K_ADAPTER_VERSION]), arch=v[K_ARCH], fingerprint=v[K_FINGERPRINT],
                     factors=factors, source=str(v.get(K_SOURCE, "")), description=str(v.get(K_DESCRIPTION, "")),
                     path=None if path is None else str(path), metadata=v, quant=quant, format_version=int(v[K_VERSION]),
                     integrity=v[K_INTEGRITY], signature=signature, signed_digest=signed)


def _integrity_error(path: Path, said: str, got: str) -> IntegrityError:
    return IntegrityError(f"{path}: integrity check failed: the file says {said}, its contents hash to {got}; "
                          "the file was changed or damaged after it was written — download it again")


def _check_v2(path: Path, buf: memoryview, c: _Container) -> tuple[str, int, str, bytes]:
    f = c.fields
    problems = [f"missing key {k!r}" if k not in f else f"key {k!r}: expected {t}, found {f[k].vtype}"
                for k, t in REQUIRED_V2.items() if k not in f or f[k].vtype != t]
    collect(problems, FormatError, f"{path}: not an edgeadapt delta file:")
    integ, sig = _slots(c, str(path))
    said = f[K_INTEGRITY].value
    got = "sha256:" + _hash_zeroed(buf, [integ], INTEGRITY_TAG).hex()
    if not _INTEGRITY_RE.fullmatch(said) or said != got:
        raise _integrity_error(path, said, got)
    quant, slot = f[K_QUANT].value, f[K_SIGNATURE].value
    if quant not in QUANTS:
        raise UnsupportedError(f"{path}: factor storage {quant!r} is not one this edgeadapt reads ({', '.join(QUANTS)})")
    if f[K_ADAPTER_TYPE].value != QUANTS[quant][0]:
        raise FormatError(f"{path}: expected adapter.type {QUANTS[quant][0]!r} for {quant} factors, "
                          f"found {f[K_ADAPTER_TYPE].value!r}")
    group = 0
    if quant in BITS:
        g = f.get(K_GROUP)
        if g is None or g.vtype != "UINT32" or not 2 <= g.value <= 4096 or g.value % 2:
            raise FormatError(f"{path}: {quant} factors need {K_GROUP} (uint32, even, 2…4096), "
                              f"found {'nothing' if g is None else repr(g.value)}")
        group = g.value
    if slot != UNSIGNED and not _SIGNATURE_RE.fullmatch(slot):
        raise FormatError(f"{path}: {K_SIGNATURE} must be 'unsigned' or 'ed25519:<16 hex>:<128 hex>', found {slot[:40]!r}…")
    return quant, group, "" if slot == UNSIGNED else slot, _hash_zeroed(buf, [integ, sig], b"")


def _check_v1(path: Path, buf: memoryview, c: _Container) -> str:
    if c.fields[K_ADAPTER_TYPE].value != "lora":
        raise FormatError(f"{path}: expected adapter.type 'lora', found {c.fields[K_ADAPTER_TYPE].value!r}")
    records = [(t.name, t.ttype.name, t.shape, buf[t.start:t.start + t.nbytes]) for t in c.tensors]
    kv = [(k, x.vtype, x.value) for k, x in c.fields.items()]
    try:
        got = _digest_v1(kv, records)
    except ValueError as e:  # json refuses NaN-free encodings of odd values; the file is not one we wrote
        raise FormatError(f"{path}: metadata cannot be encoded for the version-1 digest: {e}") from None
    if got != c.fields[K_INTEGRITY].value:
        raise _integrity_error(path, c.fields[K_INTEGRITY].value, got)
    types = {t.ttype for t in c.tensors}
    return "F16" if types == {_T.F16} else "F32"


def _array(buf: memoryview, t: _Tensor) -> np.ndarray:
    if t.ttype in (_T.F32, _T.F16, _T.I8):
        dt = {_T.F32: "<f4", _T.F16: "<f2", _T.I8: "i1"}[t.ttype]
        return np.frombuffer(buf, dtype=dt, count=math.prod(t.shape), offset=t.start).reshape(t.shape)
    raw = np.frombuffer(buf, dtype=np.uint8, count=t.nbytes, offset=t.start).reshape(t.shape[0], -1)
    return gguf.quants.dequantize(raw, t.ttype).reshape(t.shape)


def _factors(path: Path, buf: memoryview, c: _Container, allowed: tuple[Any, ...], quant: str, group: int
             ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    parts: dict[str, dict[tuple[str, bool], _Tensor]] = {}
    problems = []
    suffixes = sorted(ROLES, key=len, reverse=True)
    for t in c.tensors:
        suffix = next((s for s in suffixes if t.name.endswith(s)), "")
        role = ROLES.get(suffix)
        if role is None or (role[1] and quant not in BITS):
            problems.append(f"{t.name}: expected a name ending in .lora_a or .lora_b"
                            + (" (or .scale)" if quant in BITS else ""))
            continue
        want = SCALE_TYPES if role[1] else allowed
        if t.ttype not in want:
            problems.append(f"{t.name}: expected type {' or '.join(x.name for x in want)} for {quant} factors, "
                            f"found {t.ttype.name}")
            continue
        if len(t.shape) != 2:
            problems.append(f"{t.name}: expected a 2-D tensor, found shape {list(t.shape)}")
            continue
        parts.setdefault(t.name[: -len(suffix)], {})[role] = t
    collect(problems, FormatError, f"{path}: bad tensors:")
    need = {("a", False), ("b", False)} | ({("a", True), ("b", True)} if quant in BITS else set())
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for w in sorted(parts):
        p = parts[w]
        if set(p) != need:
            problems.append(f"{w}: expected {', '.join(sorted(map(_role_name, need)))}; "
                            f"found {', '.join(sorted(map(_role_name, p)))}")
            continue
        try:
            if quant in BITS:
                a, b = _decode_int(buf, p, BITS[quant], group)
            else:
                a, b = (_array(buf, p[r, False]).astype(np.float32) for r in ("a", "b"))
        except FormatError as e:
            problems.append(f"{w}: {e}")
            continue
        if a.shape[0] != b.shape[1]:
            problems.append(f"{w}: lora_a {list(a.shape)} and lora_b {list(b.shape)} do not share a rank")
            continue
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            problems.append(f"{w}: factors hold NaN or Inf")
            continue
        factors[w] = (np.ascontiguousarray(a), np.ascontiguousarray(b))
    if not parts:
        problems.append("no lora_a / lora_b tensors")
    collect(problems, FormatError, f"{path}: bad tensors:")
    return factors


def _role_name(role: tuple[str, bool]) -> str:
    return f"lora_{role[0]}" + (".scale" if role[1] else "")


def _decode_int(buf: memoryview, p: dict[tuple[str, bool], _Tensor], bits: int, group: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Rank-major codes and scales -> (A [r, in], B [out, r]) float32."""
    out = []
    for role in ("a", "b"):
        codes, scales = _array(buf, p[role, False]), _array(buf, p[role, True])
        r, n = codes.shape[0], codes.shape[1] * (2 if bits == 4 else 1)
        ng = -(-n // group)
        if scales.shape != (r, ng):
            raise FormatError(f"lora_{role}.scale: expected [{r}, {ng}] for {r}×{n} values in groups of {group}, "
                              f"found {list(scales.shape)}")
        if bits == 8 and (codes == -128).any():
            raise FormatError(f"lora_{role}: int8 codes must lie in -127…127, found -128")
        out.append(dequantize_rows(codes, scales, bits, group))
    return out[0], np.ascontiguousarray(out[1].T)
