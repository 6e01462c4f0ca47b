"""The GGUF container of delta files and its integrity and signature slots.

Shared by every adapter kind (:mod:`edgeadapt.formats.delta`, :mod:`edgeadapt.formats.delta_kinds`): the container
is read by the strict parser of :mod:`edgeadapt.formats.gguf_file` (every count, string, array, dimension
and tensor extent checked against the bytes present before anything is allocated; every array
read); the slots are the fixed-length ``edgeadapt.integrity`` / ``edgeadapt.signature`` strings
whose bytes are hashed as zeros. numpy, gguf and stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Iterable

import numpy as np

from edgeadapt.errors import FormatError, collect
from edgeadapt.formats.gguf_file import K_ALIGNMENT, MAX_DEPTH, MAX_KEY, MAX_KV, MAX_TENSORS, tensor_view  # noqa: F401
from edgeadapt.formats.gguf_file import GGUFFile as _Container
from edgeadapt.formats.gguf_file import TensorInfo as _Tensor
from edgeadapt.formats.gguf_file import parse_gguf  # noqa: F401
from edgeadapt.formats.gguf_constants import C

K_INTEGRITY = "edgeadapt.integrity"
K_SIGNATURE = "edgeadapt.signature"
_T = C.GGMLQuantizationType

# ---- slots
INTEGRITY_TAG = b"edgeadapt-delta-v2\0"
SIGNATURE_TAG = b"edgeadapt-delta-sig-v1\0"
INTEGRITY_LEN = 71  # "sha256:" + 64 hex
SIGNATURE_LEN = 153  # "ed25519:" + 16 hex + ":" + 128 hex
UNSIGNED = "unsigned".ljust(SIGNATURE_LEN)
_INTEGRITY_RE = re.compile(r"sha256:[0-9a-f]{64}")
_SIGNATURE_RE = re.compile(r"ed25519:([0-9a-f]{16}):([0-9a-f]{128})")


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
    """``t`` as numbers: a view for F32 / F16 / I8, else dequantized by gguf (float32)."""
    v = tensor_view(buf, t)
    if v.dtype != np.uint8:
        return v
    import gguf  # the package's quants, for the block types

    return gguf.quants.dequantize(v.reshape(t.shape[0], -1), t.ttype).reshape(t.shape)
