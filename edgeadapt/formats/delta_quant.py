"""Grouped integer storage of LoRA factors (int8 / int4 delta files; spec in :mod:`edgeadapt.formats.delta`).

numpy, gguf and stdlib only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeadapt.formats.delta_container import _T, _Tensor, _array
from edgeadapt.errors import FormatError

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
