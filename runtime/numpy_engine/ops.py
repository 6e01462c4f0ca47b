"""The numpy engine's kernels: RMS norm, rotary embedding, grouped-query attention, the live head-row
change, and the BLAS thread count. Plain numpy, float32, nothing computed at import time."""

from __future__ import annotations

from typing import Any

import numpy as np

_F32 = np.float32


def _ro(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v


# ---------------------------------------------------------------- BLAS threads
_BLAS_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
                 "openblas_set_num_threads")


def set_blas_threads(n: int) -> bool:
    """Set the thread count of every OpenBLAS loaded in the process — numpy's, and e.g. scipy's,
    which ships its own — like OPENBLAS_NUM_THREADS at start-up. False when none was found (not
    Linux, or numpy's BLAS is not OpenBLAS)."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
    except OSError:
        return False
    done = False
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        setter = next((getattr(lib, fn) for fn in _BLAS_SETTERS if hasattr(lib, fn)), None)
        if setter is not None:
            setter(int(n))
            done = True
    return done


def add_head_delta(logits: np.ndarray, h: np.ndarray, head: tuple[np.ndarray, np.ndarray]) -> None:
    """logits [B, S, V] += at columns ids: h [B·S, D] @ delta[b]ᵀ (delta [B or 1, k, D])."""
    ids, d = np.asarray(head[0], np.int64), np.asarray(head[1], _F32)
    B, S, _ = logits.shape
    if d.ndim != 3 or d.shape[0] not in (1, B) or d.shape[1:] != (len(ids), h.shape[-1]):
        raise ValueError(f"head: expected ids [k] and delta float32 [{B} or 1, k, {h.shape[-1]}], found ids "
                         f"{list(ids.shape)} and delta {list(d.shape)}")
    if len(ids):
        logits[:, :, ids] += np.matmul(h.reshape(B, S, -1), d.transpose(0, 2, 1))


def _rmsnorm(x: np.ndarray, w: np.ndarray, eps: np.float32) -> np.ndarray:
    ms = np.add.reduce(x * x, axis=-1, keepdims=True)
    ms /= _F32(x.shape[-1])
    ms += eps
    np.sqrt(ms, out=ms)
    np.divide(_F32(1), ms, out=ms)
    return (x * ms) * w


def _attend(qr: np.ndarray, K: np.ndarray, V: np.ndarray, scale: Any, bias: np.ndarray, keep: np.ndarray | None
            ) -> np.ndarray:
    """Grouped-query attention: qr [B, H, S, hd] (roped), K / V [B, KV, T, hd], additive ``bias`` [B, 1, 1, S, T],
    ``keep`` (zeros the rows of queries that see no key) or None -> [B*S, H*hd]. Query head h uses kv head h // G."""
    B, H, S, hd = qr.shape
    KV, T = K.shape[1], K.shape[2]
    G = H // KV
    sc = np.matmul(qr.reshape(B, KV, G * S, hd), K.transpose(0, 1, 3, 2))  # [B, KV, G*S, T]
    sc *= scale
    sc5 = sc.reshape(B, KV, G, S, T)
    sc5 += bias
    sc -= sc.max(axis=-1, keepdims=True)
    np.exp(sc, out=sc)
    sc /= sc.sum(axis=-1, keepdims=True)
    if keep is not None:
        sc5 *= keep
    o = np.matmul(sc, V)  # [B, KV, G*S, hd]
    return o.reshape(B, H, S, hd).transpose(0, 2, 1, 3).reshape(B * S, H * hd)


def _rope(x: np.ndarray, out: np.ndarray, cos: np.ndarray, sin: np.ndarray, half: int, neox: bool) -> None:
    """Rotate ``x`` [B, S, heads, hd] into ``out`` (same shape, any strides)."""
    if neox:  # halves (HF rotate_half)
        x0, x1 = x[..., :half], x[..., half:]
        o0, o1 = out[..., :half], out[..., half:]
    else:  # adjacent pairs (llama.cpp "normal" rope; rows were permuted at conversion)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        o0, o1 = out[..., 0::2], out[..., 1::2]
    np.multiply(x0, cos, out=o0)
    o0 -= x1 * sin
    np.multiply(x1, cos, out=o1)
    o1 += x0 * sin
