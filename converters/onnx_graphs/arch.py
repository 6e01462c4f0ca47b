"""The decoder graph of the families beyond llama / qwen2 / qwen3 / smollm3 (Gemma 3, GPT-2), from default-domain
operators only (opset 17).

Same contract as :mod:`edgeadapt.converters.onnx_graphs.graph` (inputs, outputs, LoRA slots, initializer
names and layouts, weight_sums). The fused com.microsoft graph of :mod:`.fast` is not used
for these: its SimplifiedLayerNormalization / RotaryEmbedding / GroupQueryAttention chain has no
place for GPT-2's LayerNorm with bias and learned positions, nor for Gemma 3's per-layer windows
with two rope bases, so model.onnx and model_lora.onnx are written from plain operators here.
The blocks are those of :mod:`edgeadapt.runtime.numpy_engine.layers` (the numpy engine's), operator for operator.

Extra initializers: ``rope_swa.cos`` / ``rope_swa.sin`` [context_length, head_dim/2] (the rope
of the sliding-window layers, when their base differs).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeadapt.formats.arch import ArchConfig, rope_inv_freq

from edgeadapt.converters.onnx_graphs.ops import NEG, _G, _io, _linear, _rms_norm, _rope, rope_tables


def rope_initializers(cfg: ArchConfig) -> dict[str, np.ndarray]:
    """The rope tables a graph of ``cfg`` reads: name -> float32 [context_length, head_dim/2]."""
    if cfg.rope == "none":
        return {}
    out: dict[str, np.ndarray] = {}
    out["rope.cos"], out["rope.sin"] = rope_tables(cfg)
    if cfg.rope_theta_swa is not None and cfg.sliding_window is not None:
        out["rope_swa.cos"], out["rope_swa.sin"] = rope_tables(cfg, rope_inv_freq(cfg.head_dim, cfg.rope_theta_swa))
    return out


def _table(cfg: ArchConfig, i: int) -> str:
    return "rope_swa" if cfg.local_rope(i) else "rope"


def _norm(g: _G, cfg: ArchConfig, x: str, name: str) -> str:
    if cfg.norm == "layer":
        return g.op("LayerNormalization", x, f"{name}.weight", f"{name}.bias", axis=-1, epsilon=float(cfg.rms_eps))
    return _rms_norm(g, x, f"{name}.weight", cfg.rms_eps)


def _gelu_tanh(g: _G, x: str) -> str:
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) (opset 17 has no Gelu)."""
    x3 = g.op("Mul", g.op("Mul", g.op("Mul", x, x), x), g.const(0.044715, np.float32))
    t = g.op("Tanh", g.op("Mul", g.op("Add", x, x3), g.const(np.sqrt(2.0 / np.pi), np.float32)))
    return g.op("Mul", g.op("Mul", x, g.const(0.5, np.float32)), g.op("Add", t, g.const(1.0, np.float32)))


def _act(g: _G, cfg: ArchConfig, x: str) -> str:
    return _gelu_tanh(g, x) if cfg.act == "gelu_tanh" else g.op("Mul", x, g.op("Sigmoid", x))


def _masks(g: _G, cfg: ArchConfig) -> dict[int | None, str]:
    """bool [B,1,S,T] per window size: key j visible to query s iff j <= past+s, attention_mask[b,j] == 1
    and, with a window w, past+s - j < w."""
    zero, one = g.const(0), g.const(1)
    S = g.op("Gather", g.op("Shape", "input_ids"), one, axis=0)
    T = g.op("Gather", g.op("Shape", "attention_mask"), one, axis=0)
    q_pos = g.op("Unsqueeze", g.op("Range", g.op("Sub", T, S), T, one), g.const([1]))  # [S,1]
    k_pos = g.op("Unsqueeze", g.op("Range", zero, T, one), g.const([0]))  # [1,T]
    real = g.op("Unsqueeze", g.op("Equal", "attention_mask", one), g.const([1, 2]))  # [B,1,1,T]
    full = g.op("And", g.op("LessOrEqual", k_pos, q_pos), real)  # [B,1,S,T]
    out: dict[int | None, str] = {None: full}
    for i in range(cfg.n_layers):
        w = cfg.window(i)
        if w not in out:
            near = g.op("Less", g.op("Sub", q_pos, k_pos), g.const(w))  # [S,T]
            out[w] = g.op("And", full, near)
    return out


def _attention(g: _G, cfg: ArchConfig, i: int, x: str, ropes: dict[str, tuple[str, str]], mask: str) -> str:
    H, KV, hd, p = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, f"blk.{i}"
    if cfg.fused_qkv:
        qkv = _linear(g, x, f"{p}.attn_qkv", cfg.linear_bias)
        q, k, v = g.ops("Split", qkv, g.const([cfg.q_dim, cfg.kv_dim, cfg.kv_dim]), n_out=3, axis=-1)
    else:
        bias = cfg.qkv_bias or cfg.linear_bias
        q, k, v = (_linear(g, x, f"{p}.{n}", bias) for n in ("attn_q", "attn_k", "attn_v"))
    q = g.op("Reshape", q, g.const([0, 0, H, hd]))  # [B,S,H,hd]
    k = g.op("Reshape", k, g.const([0, 0, KV, hd]))
    v = g.op("Reshape", v, g.const([0, 0, KV, hd]))
    if cfg.qk_norm:
        q = _rms_norm(g, q, f"{p}.attn_q_norm.weight", cfg.rms_eps)
        k = _rms_norm(g, k, f"{p}.attn_k_norm.weight", cfg.rms_eps)
    if cfg.rope != "none":
        cos, sin = ropes[_table(cfg, i)]
        q = _rope(g, g.op("Reshape", q, g.const([0, 0, H * hd])), cos, sin, cfg, H)
        k = _rope(g, g.op("Reshape", k, g.const([0, 0, KV * hd])), cos, sin, cfg, KV)
    q = g.op("Transpose", q, perm=[0, 2, 1, 3])  # [B,H,S,hd]
    k = g.op("Concat", f"past.{i}.key", g.op("Transpose", k, perm=[0, 2, 1, 3]), axis=2, out=f"present.{i}.key")
    v = g.op("Concat", f"past.{i}.value", g.op("Transpose", v, perm=[0, 2, 1, 3]), axis=2, out=f"present.{i}.value")
    qg = g.op("Reshape", q, g.const([0, KV, -1, hd]))  # [B,KV,G*S,hd]: query head h uses kv head h // G
    s = g.op("MatMul", qg, g.op("Transpose", k, perm=[0, 1, 3, 2]))  # [B,KV,G*S,T]
    s = g.op("Mul", s, g.const(cfg.scale, np.float32))
    s = g.op("Reshape", s, g.const([0, H, -1, 0]))  # [B,H,S,T]
    s = g.op("Where", mask, s, g.const(NEG, np.float32))
    pr = g.op("Reshape", g.op("Softmax", s, axis=-1), g.const([0, KV, -1, 0]))
    o = g.op("Reshape", g.op("MatMul", pr, v), g.const([0, H, -1, hd]))  # [B,H,S,hd]
    o = g.op("Reshape", g.op("Transpose", o, perm=[0, 2, 1, 3]), g.const([0, 0, H * hd]))  # [B,S,H*hd]
    return _linear(g, o, f"{p}.attn_output", cfg.linear_bias)


def _mlp(g: _G, cfg: ArchConfig, i: int, x: str) -> str:
    p = f"blk.{i}"
    up = _linear(g, x, f"{p}.ffn_up", cfg.linear_bias)
    f = g.op("Mul", _act(g, cfg, _linear(g, x, f"{p}.ffn_gate", cfg.linear_bias)), up) if cfg.gated_ffn else _act(g, cfg, up)
    return _linear(g, f, f"{p}.ffn_down", cfg.linear_bias)


def decoder(cfg: ArchConfig, inits: list[TensorProto], slots: dict[str, tuple[int, int]] | None) -> onnx.GraphProto:
    """The decoder over the written initializers; with ``slots``, a LoRA slot beside each linear weight."""
    g = _G()
    g.slots = slots
    g.inits += inits
    # ---- embeddings, rope angles for these positions, masks
    x = g.op("Gather", "token_embd.weight", "input_ids", axis=0)  # [B,S,dim]
    if cfg.embed_scale != 1.0:
        x = g.op("Mul", x, g.const(cfg.embed_scale, np.float32))
    if cfg.learned_pos:
        x = g.op("Add", x, g.op("Gather", "position_embd.weight", "position_ids", axis=0))
    ropes: dict[str, tuple[str, str]] = {}
    if cfg.rope != "none":
        pair_axis = g.const([2, 4] if cfg.rope == "norm" else [2, 3])
        for t in sorted({_table(cfg, i) for i in range(cfg.n_layers)}):
            ropes[t] = tuple(g.op("Unsqueeze", g.op("Gather", f"{t}.{f}", "position_ids", axis=0), pair_axis)
                             for f in ("cos", "sin"))
    masks = _masks(g, cfg)
    # ---- decoder blocks
    for i in range(cfg.n_layers):
        p = f"blk.{i}"
        a = _attention(g, cfg, i, _norm(g, cfg, x, f"{p}.attn_norm"), ropes, masks[cfg.window(i)])
        if cfg.post_norms:
            a = _norm(g, cfg, a, f"{p}.post_attention_norm")
        x = g.op("Add", x, a)
        m = _mlp(g, cfg, i, _norm(g, cfg, x, f"{p}.ffn_norm"))
        if cfg.post_norms:
            m = _norm(g, cfg, m, f"{p}.post_ffw_norm")
        x = g.op("Add", x, m)  # [B,S,dim]
    # ---- head
    x = _norm(g, cfg, x, "output_norm")
    if cfg.tied_embeddings:  # logits = x @ token_embd^T via Gemm(transB=1): no copy, no Transpose
        y2 = g.op("Gemm", g.op("Reshape", x, g.const([-1, cfg.dim])), "token_embd.weight", transB=1)
        bs = g.op("Slice", g.op("Shape", "input_ids"), g.const([0]), g.const([2]))
        y = g.op("Reshape", y2, g.op("Concat", bs, g.const([cfg.vocab_size]), axis=0))
    else:
        y = _linear(g, x, "output")
    if cfg.final_softcap:
        c = g.const(cfg.final_softcap, np.float32)
        y = g.op("Mul", g.op("Tanh", g.op("Div", y, c)), c)
    g.op("Identity", y, out="logits")
    inputs, outputs = _io(cfg, slots or {}, g, True)
    return helper.make_graph(g.nodes, f"edgeadapt_{cfg.arch}{'_lora' if slots else ''}", inputs, outputs,
                             initializer=g.inits)


__all__ = ["decoder", "rope_initializers"]
