"""Block-quantized linear weights for onnxruntime's ``MatMulNBits`` (com.microsoft), from llama.cpp blocks.

A weight W [N=out, K=in] is stored the way llama.cpp stores it: blocks of 32 values along K.

  int4 = llama.cpp Q4_1   W[n, 32b+j] = d[n,b]·q + m[n,b]        q in 0..15
  int8 = llama.cpp Q8_0   W[n, 32b+j] = d[n,b]·q                 q in -128..127

``MatMulNBits`` computes x @ ((q - zp)·scale)ᵀ with zp = 2^(bits-1) when no zero point is given
(its fast kernels: a float or per-block zero point is 2.5–250× slower here, measured). So

  int4: blocks = q packed two per byte (low nibble first), scales = d, zp 8, and the remainder
        m + 8d goes to ``offsets`` [K/32, N]: W·x = MatMulNBits(x) + blocksum(x) @ offsets,
        where blocksum(x)[b] = Σ_j x[32b+j]. Exact for Q4_1 (and Q4_0, whose offsets are 0).
  int8: blocks = q + 128 (uint8), scales = d, zp 128. Exact for Q8_0; no offsets.

A source tensor already in that type (a GGUF's Q4_1 / Q4_0 / Q8_0 blocks) is repacked bit for bit;
anything else is dequantized to float32 and quantized with gguf-py's reference quantizer, which
is llama.cpp's own algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from edgeadapt.errors import UnsupportedError

Q = gguf.GGMLQuantizationType
BLOCK = 32
KINDS = {"int4": (4, Q.Q4_1), "int8": (8, Q.Q8_0)}  # graph weight kind -> (bits, llama.cpp type it stores)
_EXACT = {"int4": (Q.Q4_1, Q.Q4_0), "int8": (Q.Q8_0,)}  # source types repacked without loss


@dataclass
class QWeight:
    """One linear weight as MatMulNBits takes it (see the module docstring)."""

    bits: int
    blocks: np.ndarray  # uint8 [N, K/32, 32*bits/8]
    scales: np.ndarray  # float32 [N, K/32]
    offsets: np.ndarray | None  # float32 [K/32, N] (int4 only; None when all zero)
    exact: bool = False  # repacked from the source's own blocks, nothing re-quantized

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks.shape[0], self.blocks.shape[1] * BLOCK

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]: the weight the graph computes with."""
        q = unpack(self.blocks, self.bits).astype(np.float32) - np.float32(1 << (self.bits - 1))  # [N, K/32, 32]
        w = q * self.scales[:, :, None]
        if self.offsets is not None:
            w = w + self.offsets.T[:, :, None]
        return w.reshape(self.shape).astype(np.float32)

    @staticmethod
    def concat(parts: list["QWeight"]) -> "QWeight":
        """Stack along N (fused q|k|v or gate|up): same K, same bits."""
        offs = None
        if any(p.offsets is not None for p in parts):
            offs = np.concatenate([p.offsets if p.offsets is not None else np.zeros((p.blocks.shape[1], p.shape[0]),
                                   np.float32) for p in parts], axis=1)
        return QWeight(parts[0].bits, np.concatenate([p.blocks for p in parts]),
                       np.concatenate([p.scales for p in parts]), offs, all(p.exact for p in parts))


def unpack(blocks: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [N, nb, blob] -> quantized values uint8 [N, nb, 32]."""
    if bits == 8:
        return blocks
    lo, hi = blocks & 0x0F, blocks >> 4
    return np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], BLOCK)  # value 2i low nibble, 2i+1 high


def _pack4(q: np.ndarray) -> np.ndarray:
    """values uint8 [N, nb, 32] in 0..15 -> MatMulNBits bytes [N, nb, 16]: q[2i] | q[2i+1] << 4."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _from_blocks(kind: str, qtype: Q, raw: np.ndarray, n: int, k: int) -> QWeight:
    """llama.cpp blocks uint8 [N, K/32 * type_size] -> QWeight, bit for bit."""
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // BLOCK, size)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [N, nb]
    if qtype == Q.Q8_0:
        q = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)  # [N, nb, 32]
        return QWeight(8, np.ascontiguousarray(q), d, None, exact=True)
    if qtype == Q.Q4_1:
        m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = b[..., 4:]
    else:  # Q4_0: d·(q - 8), no minimum
        m, qs = None, b[..., 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # llama.cpp: q[j] low nibble, q[j+16] high nibble of byte j
    offsets = None if m is None else np.ascontiguousarray((m + np.float32(8) * d).T)  # [nb, N]
    return QWeight(4, _pack4(q), d, offsets, exact=True)


def quantize(kind: str, w: np.ndarray | None, source: tuple[Q, np.ndarray] | None = None) -> QWeight:
    """A weight [N, K] for the ``kind`` graph ("int4" | "int8"): from ``source`` = (llama.cpp type,
    raw blocks [N, bytes]) when that type is stored exactly, else from the float32 ``w``."""
    bits, qtype = KINDS[kind]
    shape = tuple(w.shape) if w is not None else None
    if source is not None and source[0] in _EXACT[kind]:
        n = source[1].shape[0]
        k = source[1].shape[-1] // gguf.GGML_QUANT_SIZES[source[0]][1] * BLOCK
        return _from_blocks(kind, source[0], source[1], n, k)
    if w is None:
        raise UnsupportedError(f"{kind}: no float weights to quantize and source type {source and source[0].name} "
                               "is not stored exactly")
    if w.ndim != 2 or shape[1] % BLOCK:
        raise UnsupportedError(f"{kind} weights need an input dimension that is a multiple of {BLOCK}; found "
                               f"shape {list(shape)}: export this base with fp32 ONNX weights only")
    raw = gguf.quants.quantize(np.ascontiguousarray(w, np.float32), qtype)  # [N, K/32 * size]
    q = _from_blocks(kind, qtype, raw, shape[0], shape[1])
    q.exact = False
    return q
