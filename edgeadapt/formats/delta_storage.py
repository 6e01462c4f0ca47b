"""How a delta file stores its factors, and what a reader checks: the metadata keys (gguf's own constants where
gguf has them) and the keys each version requires, the storage types and the factor tensors' roles, grouped
integer storage of factors (int8 / int4), and the checks of a file's metadata, integrity digest and factor tensors
that :func:`edgeadapt.formats.delta.delta_from_bytes` runs. The format itself is specified in
``edgeadapt.formats.delta``, which re-exports these names.

This module imports only numpy, gguf and the standard library: it is used on devices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.formats.delta_container import (INTEGRITY_TAG, UNSIGNED, _INTEGRITY_RE, _SIGNATURE_RE, _Container, _T,
                                               _Tensor, _array, _digest_v1, _hash_zeroed, _slots)
from edgeadapt.formats.delta_kinds import KIND_QUANTS
from edgeadapt.formats.gguf_constants import C
from edgeadapt.errors import FormatError, IntegrityError, UnsupportedError, collect

MAGIC = "edgeadapt.delta"
VERSION = 2
READS = (1, 2)

# ---- keys (gguf's own constants where gguf has them)
K_TYPE = C.Keys.General.TYPE
K_ARCH = C.Keys.General.ARCHITECTURE
K_ALIGNMENT = C.Keys.General.ALIGNMENT
K_ADAPTER_TYPE = C.Keys.Adapter.TYPE
K_ALPHA = C.Keys.Adapter.LORA_ALPHA
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
QUANTS: dict[str, tuple[str, tuple[Any, ...]]] = {
    "F32": ("lora", (_T.F32,)),
    "F16": ("lora", (_T.F16,)),
    "Q8_0": ("lora", (_T.Q8_0, _T.F16)),  # F16 where the last dim is not a multiple of 32 (llama.cpp)
    "int8": ("edgeadapt-int8-lora", (_T.I8,)),
    "int4": ("edgeadapt-int4-lora", (_T.I8,)),
}
SCALE_TYPES = (_T.F32, _T.F16)
ROLES = {".lora_a": ("a", False), ".lora_b": ("b", False), ".lora_a.scale": ("a", True), ".lora_b.scale": ("b", True)}
FACTOR_SUFFIXES = (".lora_a", ".lora_b")
BIAS_SUFFIX = ".lora_bias"


def _lora_type(quant: str, bias: bool) -> str:
    t = QUANTS[quant][0]
    return "edgeadapt-lora-bias" if bias and t == "lora" else t


def _integrity_error(path: Path, said: str, got: str) -> IntegrityError:
    return IntegrityError(f"{path}: integrity check failed: the file says {said}, its contents hash to {got}; "
                          "the file was changed or damaged after it was written — download it again")


def _check_v2(path: Path, buf: memoryview, c: _Container, kind: str) -> tuple[str, int, str, bytes]:
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
    reads = QUANTS if kind == "lora" else KIND_QUANTS
    if quant not in reads:
        raise UnsupportedError(f"{path}: {kind} storage {quant!r} is not one this edgeadapt reads ({', '.join(reads)})")
    if kind == "lora":
        bias = any(t.name.endswith(BIAS_SUFFIX) for t in c.tensors)
        want = _lora_type(quant, bias)
        what = f"{quant} factors" + (" with bias changes" if bias else "")
    else:
        want, what = f"edgeadapt-{kind}", f"kind {kind!r}"
    if f[K_ADAPTER_TYPE].value != want:
        raise FormatError(f"{path}: expected adapter.type {want!r} for {what}, found {f[K_ADAPTER_TYPE].value!r}")
    group = 0
    if kind == "lora" and quant in BITS:
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


def _factors(path: Path, buf: memoryview, c: _Container, allowed: tuple[Any, ...], quant: str, group: int
             ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    parts: dict[str, dict[tuple[str, bool], _Tensor]] = {}
    problems = []
    suffixes = sorted(ROLES, key=len, reverse=True)
    bias_t: dict[str, _Tensor] = {}
    for t in c.tensors:
        if t.name.endswith(BIAS_SUFFIX):
            if t.ttype != _T.F32 or len(t.shape) != 1:
                problems.append(f"{t.name}: expected a 1-D F32 tensor, found {t.ttype.name} {list(t.shape)}")
            else:
                bias_t[t.name[: -len(BIAS_SUFFIX)]] = t
            continue
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
                a, b = (_array(buf, p[r, False]).astype(np.float32, copy=False) for r in ("a", "b"))
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
    biases: dict[str, np.ndarray] = {}
    for w, t in sorted(bias_t.items()):
        d = _array(buf, t).astype(np.float32)
        if w not in parts:
            problems.append(f"{w}{BIAS_SUFFIX}: a bias change without lora_a / lora_b")
        elif w in factors and d.shape != (factors[w][1].shape[0],):
            problems.append(f"{w}{BIAS_SUFFIX}: expected [{factors[w][1].shape[0]}] (the rows of lora_b), "
                            f"found {list(d.shape)}")
        elif not np.isfinite(d).all():
            problems.append(f"{w}{BIAS_SUFFIX}: holds NaN or Inf")
        else:
            biases[w] = np.ascontiguousarray(d)
    collect(problems, FormatError, f"{path}: bad tensors:")
    return factors, biases


# ---- grouped integer storage (int8 / int4)
BITS = {"int8": 8, "int4": 4}


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
        import gguf  # the package's quants (writing only)

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
