"""llama.cpp's CPU roundings, patched onto edgeadapt's numpy engine: which of them decide the greedy tokens.

A measuring aid for bench/greedy.py, not a runtime feature. ``install(parts)`` swaps module functions
of :mod:`edgeadapt.runtime.numpy_engine.engine` / :mod:`edgeadapt.runtime.numpy_engine.weights` for versions that round
as ggml's x86 CPU backend does (AVX2 kernels, llama.cpp as llama-cpp-python 0.3.36 ships it), and
returns the function that puts the originals back. The engine must be loaded with
``dequantize="lazy"`` so that every linear stays in its GGUF blocks. Parts:

  act   activations of a Q4_1 product quantized to Q8_1 (per 32: d = amax/127 stored as fp16,
        q = round-half-even(x·127/amax), s = fp16(d·Σq)); y = Σ_b d4·d8·(q4·q8) + m4·s8.
        Of a Q8_0 product (the tied output head): Q8_0 the same way, y = Σ_b d_w·d_x·(q_w·q_x)
  kv    the f16 kv cache and f16 attention operands: K, V, q (converted for the f16 dot) and the
        softmax weights (converted for the product with V) rounded to fp16, sums in fp32
  norm  RMS norm with the sum of squares in double, as ggml_compute_forward_rms_norm

Not copied: rope's angle table (ggml multiplies theta by theta_scale step by step), ggml's expf.
"""

from __future__ import annotations

from typing import Callable

import gguf
import numpy as np

from edgeadapt.runtime.numpy_engine import engine as engine_numpy, weights as ggml_weights

_F32 = np.float32
_T = gguf.GGMLQuantizationType
PARTS = ("act", "kv", "norm")


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(_F32)


def quantize_q8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [N, K] -> q [N, nb, 32] (integers as float32), d [N, nb] (fp16-rounded), s [N, nb] = fp16(d·Σq)."""
    xb = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(xb).max(-1)  # [N, nb]
    d = amax / _F32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, _F32(127) / amax, _F32(0)).astype(_F32)
    q = np.rint(xb * inv[..., None])  # _mm256_round_ps(_MM_ROUND_NEAREST): half to even
    return q, _fp16(d), _fp16(d * q.sum(-1))


class _Blocks:
    """A Q4_1 / Q8_0 weight [out, in] as integer quants [nb, 32, out] and per-block d (m) [out, nb]."""

    def __init__(self, src) -> None:
        out, k = src.shape
        nb = k // 32
        raw = src.data.reshape(out, nb, -1)
        self.d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(_F32)
        if src.qtype == _T.Q4_1:
            self.m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(_F32)
            qs = raw[..., 4:]
            q = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=-1).astype(_F32)  # [out, nb, 32]
        else:  # Q8_0
            self.m = None
            q = raw[..., 2:].copy().view(np.int8).astype(_F32)
        self.q = np.ascontiguousarray(q.transpose(1, 2, 0))  # [nb, 32, out]

    def matmul(self, x: np.ndarray) -> np.ndarray:
        q8, d8, s8 = quantize_q8(x)
        isum = np.matmul(q8.transpose(1, 0, 2), self.q)  # [nb, N, out], exact integers
        dd = self.d.T[:, None, :] * d8.T[:, :, None]  # [nb, N, out] = d_w · d_x
        y = np.einsum("bno,bno->no", dd, isum)
        if self.m is not None:
            y += s8 @ self.m.T
        return y.astype(_F32)


def _attend_f16(qr, K, V, scale, bias, keep):
    B, H, S, hd = qr.shape
    KV, T = K.shape[1], K.shape[2]
    G = H // KV
    sc = np.matmul(_fp16(qr).reshape(B, KV, G * S, hd), _fp16(K).transpose(0, 1, 3, 2))  # [B, KV, G*S, T]
    sc *= scale
    sc5 = sc.reshape(B, KV, G, S, T)
    sc5 += bias
    sc -= sc.max(axis=-1, keepdims=True)
    np.exp(sc, out=sc)
    sc /= sc.sum(axis=-1, keepdims=True, dtype=np.float64).astype(_F32)
    if keep is not None:
        sc5 *= keep
    o = np.matmul(_fp16(sc), _fp16(V))  # [B, KV, G*S, hd]
    return o.reshape(B, H, S, hd).transpose(0, 2, 1, 3).reshape(B * S, H * hd)


def _rmsnorm_f64(x, w, eps):
    mean = (np.add.reduce(x.astype(np.float64) ** 2, axis=-1, keepdims=True) / x.shape[-1]).astype(_F32)
    scale = _F32(1) / np.sqrt(mean + eps)
    return (x * scale) * w


def install(parts: tuple[str, ...] = PARTS) -> Callable[[], None]:
    """Patch the numpy engine; returns the undo."""
    bad = set(parts) - set(PARTS)
    if bad:
        raise ValueError(f"unknown parts {sorted(bad)}; known: {PARTS}")
    saved = [(engine_numpy, "_attend", engine_numpy._attend), (engine_numpy, "_rmsnorm", engine_numpy._rmsnorm),
             (ggml_weights._Lazy, "matmul", ggml_weights._Lazy.matmul)]
    if "act" in parts:
        plain, cache = ggml_weights._Lazy.matmul, {}

        def matmul(self, x):
            if self.src.qtype not in (_T.Q4_1, _T.Q8_0):
                return plain(self, x)
            b = cache.get(id(self.src))
            if b is None:
                b = cache[id(self.src)] = _Blocks(self.src)
            return b.matmul(x)
        ggml_weights._Lazy.matmul = matmul
    if "kv" in parts:
        engine_numpy._attend = _attend_f16
    if "norm" in parts:
        engine_numpy._rmsnorm = _rmsnorm_f64

    def undo() -> None:
        for obj, name, f in saved:
            setattr(obj, name, f)
    return undo
