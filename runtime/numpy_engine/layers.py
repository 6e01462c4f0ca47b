"""The numpy forward pass of the decoder families beyond llama / qwen2 / qwen3 / smollm3: Gemma 3 and GPT-2.

Device-side, like :mod:`edgeadapt.runtime.numpy_engine.engine` (numpy only): the engine validates the
call and holds the weights, this module runs the blocks the architecture card describes —

  embedding  token_embd[ids] · embed_scale  (+ position_embd[position_ids] when learned_pos)
  block i    h = norm(x, attn_norm)                      RMS, or LayerNorm with bias ("layer")
             q, k, v = h Wqᵀ, h Wkᵀ, h Wvᵀ (+ biases)   or one attn_qkv split in three
             q, k = rms(q, attn_q_norm), rms(k, attn_k_norm) per head   (qk_norm)
             q, k = rope(q), rope(k) at the layer's frequencies (cfg.rope_inv_freq)
             a = softmax(q kᵀ · scale + mask) v, mask = causal ∧ attention_mask ∧ window(i)
             x += post_attention_norm(a Woᵀ + b)         (post_norms; else x += a Woᵀ + b)
             h = norm(x, ffn_norm); f = act(h Wgᵀ)·(h Wuᵀ) (gated) or act(h Wuᵀ + b)
             x += post_ffw_norm(f Wdᵀ + b)
  head       logits = norm(x, output_norm) Wᵀ, then c·tanh(logits / c) when final_softcap is set

A query at absolute position p sees key j iff j ≤ p, attention_mask[b, j] == 1 and, on a windowed
layer, p - j < sliding_window (Hugging Face's and llama.cpp's sliding window).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeadapt.runtime.numpy_engine.ops import _attend, _rmsnorm, _ro, _rope
from edgeadapt.runtime.numpy_engine.rows import _lin

_F32 = np.float32
_GELU_C = _F32(np.sqrt(2.0 / np.pi))


# ---------------------------------------------------------------- pieces
def _layernorm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: np.float32) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    d = x - mu
    var = np.add.reduce(d * d, axis=-1, keepdims=True)
    var /= _F32(x.shape[-1])
    var += eps
    np.sqrt(var, out=var)
    d /= var
    d *= w
    d += b
    return d


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), in place on ``x``'s copy."""
    t = x * x
    t *= _F32(0.044715) * x
    t += x
    t *= _GELU_C
    np.tanh(t, out=t)
    t += _F32(1)
    t *= x
    t *= _F32(0.5)
    return t


class _Arch:
    """Per-engine constants of the card, made once (the engine keeps one)."""

    def __init__(self, eng: Any):
        cfg = eng.cfg
        self.norm_bias = cfg.linear_bias
        self.pos = eng._src["position_embd.weight"].full() if cfg.learned_pos else None
        self.ropes = {}  # local rope (Gemma 3's windowed layers)? -> inv_freq [hd/2] (cfg.rope_inv_freq)
        if cfg.rope != "none":
            for i in range(cfg.n_layers):
                key = cfg.local_rope(i)
                if key not in self.ropes:
                    self.ropes[key] = cfg.rope_inv_freq(i)


def _norm(eng: Any, x: np.ndarray, name: str, eps: np.float32) -> np.ndarray:
    w = eng._norm[f"{name}.weight"]
    if eng.cfg.norm == "layer":
        return _layernorm(x, w, eng._norm[f"{name}.bias"], eps)
    return _rmsnorm(x, w, eps)


def _linear(eng: Any, i: int, kind: str, x: np.ndarray, rows: dict, B: int) -> np.ndarray:
    w, live = eng._layers[i][kind]
    y = _lin(x, w, live, rows.get(f"blk.{i}.{kind}.weight") if rows else None, B)
    bias = eng._norm.get(f"blk.{i}.{kind}.bias")
    if bias is not None:
        y += bias
    return y


# ---------------------------------------------------------------- forward
def forward_blocks(eng: Any, ids: np.ndarray, am: np.ndarray, pos: np.ndarray, past: Any, past_len: int,
                   rows: dict, embed: np.ndarray | None = None, head: Any = None) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """The engine's forward for the families of this module (arguments already validated). ``embed``
    [batch or 1, seq or 1, dim] is added to the looked-up embedding rows (before Gemma's √dim scale)."""
    cfg = eng.cfg
    aux = getattr(eng, "_arch_aux", None)
    if aux is None:
        aux = eng._arch_aux = _Arch(eng)
    B, S = ids.shape
    T = past_len + S
    N = B * S
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    qd, kvd = cfg.q_dim, cfg.kv_dim
    eps = _F32(cfg.rms_eps)
    half = hd // 2
    scale = _F32(cfg.scale)

    x = eng._embed(ids.reshape(-1))  # [N, D]
    if embed is not None:
        e = np.asarray(embed, _F32)
        if e.ndim != 3 or e.shape[0] not in (1, B) or e.shape[1] not in (1, S) or e.shape[2] != cfg.dim:
            raise ValueError(f"embed: expected float32 [{B} or 1, {S} or 1, {cfg.dim}], found {list(e.shape)}")
        x = (x.reshape(B, S, cfg.dim) + e).reshape(N, cfg.dim)
    if cfg.embed_scale != 1.0:
        x *= _F32(cfg.embed_scale)
    if aux.pos is not None:
        if pos.size and (pos.min() < 0 or pos.max() >= cfg.context_length):
            raise ValueError(f"position_ids: expected positions in [0, {cfg.context_length}), found "
                             f"{pos.min()}..{pos.max()}")
        x += aux.pos[pos.reshape(-1)]
    # rope tables of the full-attention and the local layers: cos/sin [B, S, 1, half]
    tables = {}
    for key, inv in aux.ropes.items():
        ang = pos.astype(_F32)[:, :, None] * inv
        tables[key] = (np.cos(ang)[:, :, None, :], np.sin(ang)[:, :, None, :])
    # masks [B, 1, 1, S, T] per window size (None: full attention)
    q_abs = past_len + np.arange(S)
    k_abs = np.arange(T)
    base_ok = (k_abs[None, :] <= q_abs[:, None])[None] & (am[:, None, :] == 1)  # [B, S, T]
    masks: dict[int | None, tuple[np.ndarray, np.ndarray | None]] = {}
    for i in range(cfg.n_layers):
        w = cfg.window(i)
        if w in masks:
            continue
        ok = base_ok if w is None else base_ok & ((q_abs[:, None] - k_abs[None, :]) < w)[None]
        bias = np.where(ok, _F32(0), np.finfo(_F32).min).astype(_F32)[:, None, None]
        seen = ok.any(axis=-1)  # a query that sees no key (a pad row) gets a zero attention output
        masks[w] = (bias, None if seen.all() else seen.astype(_F32)[:, None, None, :, None])
    bufs = eng._kv_buffers(past, B, past_len, T)

    with np.errstate(over="ignore"):
        for i in range(cfg.n_layers):
            p = f"blk.{i}"
            h = _norm(eng, x, f"{p}.attn_norm", eps)
            if cfg.fused_qkv:
                y = _linear(eng, i, "attn_qkv", h, rows, B)
                q, k, v = y[:, :qd], y[:, qd:qd + kvd], y[:, qd + kvd:]
            else:
                q, k, v = (_linear(eng, i, kind, h, rows, B) for kind in ("attn_q", "attn_k", "attn_v"))
                if cfg.qkv_bias:
                    q += eng._norm[f"{p}.attn_q.bias"]
                    k += eng._norm[f"{p}.attn_k.bias"]
                    v += eng._norm[f"{p}.attn_v.bias"]
            q = q.reshape(B, S, H, hd)
            k = k.reshape(B, S, KV, hd)
            if cfg.qk_norm:
                q = _rmsnorm(q, eng._norm[f"{p}.attn_q_norm.weight"], eps)
                k = _rmsnorm(k, eng._norm[f"{p}.attn_k_norm.weight"], eps)
            kb, vb = bufs[i]
            qr = np.empty((B, H, S, hd), _F32)
            if cfg.rope == "none":
                qr[...] = q.transpose(0, 2, 1, 3)
                kb[:, :, past_len:T] = k.transpose(0, 2, 1, 3)
            else:
                cos, sin = tables[cfg.local_rope(i)]
                neox = cfg.rope == "neox"
                _rope(q, qr.transpose(0, 2, 1, 3), cos, sin, half, neox)
                _rope(k, kb[:, :, past_len:T].transpose(0, 2, 1, 3), cos, sin, half, neox)
            vb[:, :, past_len:T] = v.reshape(B, S, KV, hd).transpose(0, 2, 1, 3)
            bias, keep = masks[cfg.window(i)]
            o = _attend(qr, kb[:, :, :T], vb[:, :, :T], scale, bias, keep)  # [N, H*hd]
            a = _linear(eng, i, "attn_output", o, rows, B)
            if cfg.post_norms:
                a = _norm(eng, a, f"{p}.post_attention_norm", eps)
            x = x + a
            h = _norm(eng, x, f"{p}.ffn_norm", eps)
            u = _linear(eng, i, "ffn_up", h, rows, B)
            if cfg.gated_ffn:
                f = _act(cfg.act, _linear(eng, i, "ffn_gate", h, rows, B))
                f *= u
            else:
                f = _act(cfg.act, u)
            d = _linear(eng, i, "ffn_down", f, rows, B)
            if cfg.post_norms:
                d = _norm(eng, d, f"{p}.post_ffw_norm", eps)
            x += d
        h = _norm(eng, x, "output_norm", eps)
        logits = _lin(h, *eng._head, rows.get(eng._head_name) if rows else None, B, head=not rows).reshape(B, S, -1)
        if head is not None:  # a live change of some head rows, before any softcap
            from edgeadapt.runtime.numpy_engine.ops import add_head_delta

            add_head_delta(logits, h, head)
        if cfg.final_softcap:
            c = _F32(cfg.final_softcap)
            logits /= c
            np.tanh(logits, out=logits)
            logits *= c

    present = [(_ro(kb[:, :, :T]), _ro(vb[:, :, :T])) for kb, vb in bufs]
    st = eng._tls.kv
    st["len"], st["present"] = T, present
    return logits, present


def _act(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "gelu_tanh":
        return _gelu_tanh(x)
    e = np.negative(x)  # silu
    np.exp(e, out=e)
    e += _F32(1)
    return x / e

