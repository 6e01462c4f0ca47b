"""Base weights in their stored GGUF types: dequantization and x Wᵀ straight from the blocks.

:class:`_Src` is one tensor of a memmapped base file (see :mod:`edgeadapt.formats.gguf_file`) in its stored
type; :class:`_Lazy` a linear kept that way and used slab by slab. The kernels for F16 / Q8_0 /
Q4_0 / Q4_1 give bit for bit what ``gguf.quants.dequantize`` gives; every other type goes through
gguf (imported only then). numpy and gguf only; nothing is computed at import time.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from edgeadapt.formats.gguf_constants import C
from edgeadapt.formats.gguf_file import TensorInfo

_T = C.GGMLQuantizationType
_F32 = np.float32

# one lazily dequantized slab is at most this many bytes of fp32 (bounds the scratch memory of "lazy")
_LAZY_CHUNK_BYTES = 4 << 20

# ---- dequantization
# Fast paths for the common row-block types; each gives bit for bit what gguf.quants.dequantize
# gives (same float32 operations), without gguf's 16-row split/concatenate round trip.
def _deq_f16(rows: np.ndarray) -> np.ndarray:
    return rows.astype(_F32)


def _deq_q8_0(rows: np.ndarray) -> np.ndarray:
    n = rows.shape[0]
    b = rows.reshape(n, -1, 34)
    d = b[..., :2].view(np.float16).astype(_F32)  # [n, nb, 1]
    return (b[..., 2:].view(np.int8) * d).reshape(n, -1)


def _nibbles(b: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Low nibbles then high nibbles of each block's 16 bytes, as float32 [n, nb, 32]."""
    out = np.empty((b.shape[0], b.shape[1], 2, 16), _F32)
    out[..., 0, :] = qs & np.uint8(15)
    out[..., 1, :] = qs >> np.uint8(4)
    return out.reshape(b.shape[0], b.shape[1], 32)


def _deq_q4_0(rows: np.ndarray) -> np.ndarray:
    n = rows.shape[0]
    b = rows.reshape(n, -1, 18)
    d = b[..., :2].view(np.float16).astype(_F32)  # [n, nb, 1]
    out = _nibbles(b, b[..., 2:])
    out -= _F32(8)
    out *= d
    return out.reshape(n, -1)


def _deq_q4_1(rows: np.ndarray) -> np.ndarray:
    n = rows.shape[0]
    b = rows.reshape(n, -1, 20)
    d = b[..., :2].view(np.float16).astype(_F32)
    m = b[..., 2:4].view(np.float16).astype(_F32)
    out = _nibbles(b, b[..., 4:])
    out *= d
    out += m
    return out.reshape(n, -1)


_FAST_DEQ: dict[Any, Callable[[np.ndarray], np.ndarray]] = {
    _T.F16: _deq_f16, _T.Q8_0: _deq_q8_0, _T.Q4_0: _deq_q4_0, _T.Q4_1: _deq_q4_1}


def _dequantizer(qtype: Any) -> Callable[[np.ndarray], np.ndarray]:
    """rows of stored blocks [n, bytes] (or [n, in] for F16/BF16) -> float32 [n, in]."""
    fast = _FAST_DEQ.get(qtype)
    if fast is not None:
        return fast
    import gguf  # the package's quants: every other block type

    return lambda rows: gguf.quants.dequantize(rows, qtype)


# ---- one tensor of the file
class _Src:
    """One tensor of the file: memmapped, in its stored type."""

    __slots__ = ("name", "qtype", "shape", "data", "deq", "offset", "nbytes")

    def __init__(self, t: TensorInfo, data: np.ndarray):
        """``data``: the stored view of ``t`` (:meth:`edgeadapt.formats.gguf_file.GGUFFile.view`), no copy."""
        self.name = t.name
        self.offset, self.nbytes = t.start, t.nbytes
        self.qtype = t.ttype
        self.shape = t.shape  # canonical [out, in]
        self.data = data
        self.deq = None if self.qtype == _T.F32 else _dequantizer(self.qtype)

    @property
    def fp32_bytes(self) -> int:
        return int(np.prod(self.shape)) * 4

    def rows(self, idx: Any) -> np.ndarray:
        """Dequantized rows (any index numpy takes on the first axis) of a 2-D tensor."""
        r = self.data[idx]
        return r if self.deq is None else self.deq(r)

    def full(self) -> np.ndarray:
        """The whole tensor as float32 canonical: a view for F32, else a fresh array."""
        if self.deq is None:
            return self.data.reshape(self.shape)
        if len(self.shape) == 1:
            return self.deq(self.data.reshape(1, -1)).reshape(self.shape)
        out = np.empty(self.shape, _F32)
        step = max(1, _LAZY_CHUNK_BYTES // (4 * self.shape[1]))
        for r0 in range(0, self.shape[0], step):
            out[r0:r0 + step] = self.deq(self.data[r0:r0 + step])
        return out

    def fill_t(self, out: np.ndarray) -> None:
        """Write the tensor transposed ([in, out]) into ``out`` (any strides), slab by slab, so no
        full-size temporary is made."""
        step = max(1, _LAZY_CHUNK_BYTES // (4 * self.shape[1]))
        for r0 in range(0, self.shape[0], step):
            out[:, r0:r0 + step] = self.rows(slice(r0, r0 + step)).T


# ---- x Wᵀ straight from the blocks
# For a few rows of x (decode), W = d·q (+ m) is never materialised: per 32-wide block b,
# y = Σ_b d_b (q_b · x_b) + Σ_b m_b Σ x_b. The integer quants are widened to float32 in long
# contiguous passes (no per-block inner loops: numpy's broadcasting over 32-wide blocks costs
# ~15 ns per block per operation, which dominated the dequantize-then-matmul path) and the
# block dot products are one stacked matmul. Q4_0: m = -8·d.
_MATVEC_MAX_ROWS = 8  # above this many rows of x, dequantize + one GEMM is faster


def _nibble_planes(u32: np.ndarray, r: int, nb: int) -> np.ndarray:
    """4-bit quants of [r, nb, 4] uint32 words (16 bytes per block) -> float32 [2, r, nb, 16]:
    plane 0 the low nibbles (elements 0..15 of each block), plane 1 the high ones (16..31)."""
    q = np.empty((2, r, nb, 16), _F32)
    q[0] = (u32 & np.uint32(0x0F0F0F0F)).view(np.uint8).reshape(r, nb, 16)
    u32 >>= np.uint32(4)
    u32 &= np.uint32(0x0F0F0F0F)
    q[1] = u32.view(np.uint8).reshape(r, nb, 16)
    return q


def _mv_q4(x: np.ndarray, q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    """x [N, in], nibble planes q [2, r, nb, 16], d / m [r, nb] float32 -> [N, r]."""
    N, nb = x.shape[0], q.shape[2]
    xv = x.reshape(N, nb, 2, 16).transpose(2, 1, 3, 0)  # [2, nb, 16, N]
    p = np.matmul(q.transpose(0, 2, 1, 3), xv)  # [2, nb, r, N] block dot products
    p[0] += p[1]
    y = np.einsum("brn,rb->nr", p[0], d)
    if m is not None:
        y += x.reshape(N, nb, 32).sum(axis=-1) @ m.T
    return y


def _mv_q4_1(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    r, nb = rows.shape[0], rows.shape[1] // 20
    b = rows.reshape(r, nb, 20)
    d = b[..., 0:2].view(np.float16)[..., 0].astype(_F32)
    m = b[..., 2:4].view(np.float16)[..., 0].astype(_F32)
    u32 = np.ascontiguousarray(rows.view(np.uint32).reshape(r, nb, 5)[..., 1:])
    return _mv_q4(x, _nibble_planes(u32, r, nb), d, m)


def _mv_q4_0(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    r, nb = rows.shape[0], rows.shape[1] // 18
    d = rows.reshape(r, nb, 18)[..., 0:2].view(np.float16)[..., 0].astype(_F32)
    u32 = np.ascontiguousarray(rows.view(np.uint16).reshape(r, nb, 9)[..., 1:]).view(np.uint32)
    return _mv_q4(x, _nibble_planes(u32, r, nb), d, d * _F32(-8))


def _mv_q8_0(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    r, nb = rows.shape[0], rows.shape[1] // 34
    N = x.shape[0]
    d = rows.reshape(r, nb, 34)[..., 0:2].view(np.float16)[..., 0].astype(_F32)
    q = np.ascontiguousarray(rows.view(np.uint16).reshape(r, nb, 17)[..., 1:]).view(np.int8).astype(_F32)  # [r, nb, 32]
    p = np.matmul(q.transpose(1, 0, 2), x.reshape(N, nb, 32).transpose(1, 2, 0))  # [nb, r, N]
    return np.einsum("brn,rb->nr", p, d)


_FAST_MV: dict[Any, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    _T.Q4_0: _mv_q4_0, _T.Q4_1: _mv_q4_1, _T.Q8_0: _mv_q8_0}


class _Lazy:
    """A linear kept in its stored (quantized / F16) form; used slab by slab at each use: for a
    few rows of x straight from the blocks (Q4_0 / Q4_1 / Q8_0), else dequantized then multiplied."""

    __slots__ = ("src", "out", "step", "mv")

    def __init__(self, src: _Src):
        self.src = src
        self.out, inn = src.shape
        self.step = max(1, _LAZY_CHUNK_BYTES // (4 * inn))
        self.mv = _FAST_MV.get(src.qtype)

    def matmul(self, x: np.ndarray, nb: int = 1) -> np.ndarray:
        """x [N, in] @ Wᵀ -> [N, out]. ``nb`` > 1: x is nb row blocks of a batch, each computed by the path and
        call shapes it gets alone (a slab dequantized once serves every block), so a row's result does not
        depend on the batch."""
        y = np.empty((x.shape[0], self.out), _F32)
        data, deq, step = self.src.data, self.src.deq, self.step
        blocks = [(b, b + x.shape[0] // nb) for b in range(0, x.shape[0], x.shape[0] // nb)] if nb > 1 else [(0, None)]
        if self.mv is not None and x.shape[0] // nb <= _MATVEC_MAX_ROWS:
            mv = self.mv
            for r0 in range(0, self.out, step):
                for b0, b1 in blocks:
                    y[b0:b1, r0:r0 + step] = mv(x[b0:b1], data[r0:r0 + step])
            return y
        for r0 in range(0, self.out, step):
            wt = deq(data[r0:r0 + step]).T
            for b0, b1 in blocks:
                np.matmul(x[b0:b1], wt, out=y[b0:b1, r0:r0 + step])
        return y
