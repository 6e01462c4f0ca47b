"""Fused decoder graphs on onnxruntime's contrib operators, and the quantized bases built on them.

Inputs, outputs and LoRA slots are exactly those of ``model_lora.onnx`` (the contract in
:mod:`edgeadapt.converters.onnx_graphs.graph`): input_ids, attention_mask (left or right padding), position_ids,
past.{i}.key/value -> logits, present.{i}.key/value = concat(past, new) on axis 2, and the
optional inputs lora.<W>.a [n, in, r] / lora.<W>.b [n, r, out] (n = 1 or batch, scale in b,
empty defaults). What changes is how a layer is computed (com.microsoft, onnxruntime >= 1.22):

  SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization  RMS norm (+ the residual add); Qwen3's
                     q/k norm is a SimplifiedLayerNormalization over q viewed as [B,S,heads,head_dim]
  RotaryEmbedding    rope on q and k at the given position_ids (any left padding)
  GroupQueryAttention  causal GQA over past + new keys, each row over its own keys (seqlens_k: the
                     index of its last 1 in attention_mask), padding masked by an attention_bias
                     built once from attention_mask; rotary off (done above, so positions stay
                     the caller's); onnxruntime refuses seq > 1 with a past when batch > 1 —
                     the engine feeds such a call one token at a time
  MatMulNBits        the quantized linear layers (int4 / int8 files, see quant.py), q|k|v and
                     gate|up fused into one product each; the LoRA slot of each weight is added
                     to its slice of the fused output, in float32, beside the quantized weight

Quantized files (``build_quant_onnx``): ``model_int4.onnx`` / ``model_int8.onnx``, each with its
own data file ``<name>.data``. Their LoRA slots have NO default: every lora.<W>.a/b MUST be fed
(rank 0 — [n, in, 0] and [n, 0, out] — for an idle slot), because onnxruntime's IOBinding, which
lets GroupQueryAttention update the kv cache in place, cannot bind an input that has an initializer. Linear weights are llama.cpp Q4_1 (int4) or Q8_0 (int8) blocks
(bit for bit from a GGUF source of that type); the embedding and the output head are Q8_0 (an 8-bit
MatMulNBits over the same bytes when tied). The embedding rows of the tokens are the input ``embed.rows``
(float32 [B, S, dim]), which the runtime reads from the data file where the ``edgeadapt.embed_rows`` property
says (EMBED_ROWS_PROP; graphs exported before it gather them in-graph with GatherBlockQuantized). Norms,
biases and rope tables stay float32. There is nothing to override: adapters run live only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeadapt.formats.arch import ArchConfig
from edgeadapt.converters.hf import check_complete
from edgeadapt.errors import UnsupportedError

from edgeadapt.converters.onnx_graphs.ops import (NEG, OPSET, Progress, _DataWriter, _G, _io, add_embed_delta,
                                                  add_head_delta, lora_input_names, rope_tables)
from edgeadapt.converters.onnx_graphs.quant import BLOCK, QWeight, quantize

FUSED_ARCHES = frozenset({"llama", "qwen2", "qwen3", "smollm3"})  # the families this fused graph expresses
MS = "com.microsoft"
SLOT_GROUPS = "edgeadapt.slot_groups"  # model property: JSON {slot: [weights]} of grouped slots
# model property "1": GroupQueryAttention gets each row's own key count from attention_mask (its last 1), so the
# graph also takes RIGHT-padded rows (each row's keys at [0, len)); fused graphs exported before it lack it and take
# left-padded rows only
RIGHT_PADDED = "edgeadapt.right_padded"
SLOT_GROUP_B = "edgeadapt.slot_groups.b"  # model property: how a group slot's b is laid out (CHUNKED, SIDE_BY_SIDE;
SIDE_BY_SIDE = "side_by_side"  # absent: block-diagonal, what grouped graphs exported before either take)
CHUNKED = "chunked"
# the int4 / int8 graphs' embedding: the runtime reads each token's Q8_0 row from the data file and feeds the float32
# rows as the input EMBED_ROWS [B, S, dim] — a lookup through onnxruntime's memory map of the file made every 2 MB
# region of the table a token falls in resident (the page cache's large folios). The property (JSON) says where:
# {"file", "data": {"name", "offset"} (uint8 [vocab, dim], q + 128), "scales": {"name", "offset", "type"} ([vocab,
# dim/block]), "vocab", "dim", "block"}; graphs exported before it gather the rows in-graph (GatherBlockQuantized)
EMBED_ROWS, EMBED_ROWS_PROP = "embed.rows", "edgeadapt.embed_rows"
# the output head's rows per MatMulNBits: onnxruntime prepacks the graph's weights in the order of its nodes and
# unmaps each original once packed; the head comes last, and a 28 MB head (SmolLM2's tied Q8_0 table) read whole
# while every other packed weight is resident was the session build's peak (+27 MB). In parts of 8,192 rows (views
# of the same bytes in the data file) only one part's original is mapped at a time
HEAD_ROWS = 8192
QUANT_FILES = {"int4": "model_int4.onnx", "int8": "model_int8.onnx"}
ACCURACY_LEVEL = 4  # MatMulNBits: quantize activations to int8 per block, as llama.cpp's 4-bit dot products do
GROUPS = (("attn_q", "attn_k", "attn_v"), ("attn_output",), ("ffn_gate", "ffn_up"), ("ffn_down",))
Source = Callable[[str], "tuple[gguf.GGMLQuantizationType, np.ndarray] | None"]  # GGUF name -> (type, raw blocks)


def group_chunks(sizes: list[int]) -> list[int]:
    """A CHUNKED group slot's chunks: its outputs cut into pieces of gcd(sizes), each the index of its weight."""
    g = math.gcd(*sizes)
    return [j for j, o in enumerate(sizes) for _ in range(o // g)]


def _group_name(parts: tuple[str, ...]) -> str:
    return {("attn_q", "attn_k", "attn_v"): "attn_qkv", ("ffn_gate", "ffn_up"): "ffn_gate_up"}.get(parts, parts[0])


# ---- linear layers: float32 (one MatMul per weight, overridable) or quantized (one MatMulNBits per group)
class _Linears:
    """``grouped``: one slot per group of weights that read the same input (q|k|v, gate|up), added to the fused
    product before its split: fewer slot operators than one slot per weight, which is what idle and active slots
    cost per token. A = [A_q | A_k | A_v], each weight's A [in, r] at the group's rank r (the largest of its
    weights'; zero columns pad a smaller one), and B the weights' B over that rank without block-diagonal zeros, in
    chunks (CHUNKED): the group's Σout columns cut into C chunks of g = gcd of its weights' outputs (q|k|v of a
    GQA model: q in H/KV chunks, k and v one each; gate|up: two), B [n, 1, C, r, g]. u = x·A viewed [.., k, 1, r],
    each chunk takes its weight's u (a Gather over k, left out where C = k), and u_c·B_c [.., C, 1, g] read as
    [.., Σout] is every weight's x·A_j·B_j at its columns: no product is computed that is thrown away.
    ``group_b = SIDE_BY_SIDE`` writes the form before it: B [n, 1, r, Σout], u·B [.., k, Σout] for every part and
    weight j's columns of row j gathered (k times the products, then a copy). The groups are saved as the
    SLOT_GROUPS model property and the layout as SLOT_GROUP_B; the runtime builds the group arrays from per-weight
    factors. ``group_b = None`` writes the block-diagonal B of the graphs exported before both (A = [A_q | A_k |
    A_v] with the ranks side by side, B [n, Σr, Σout]). The runtime reads all three."""

    group_b: str | None = CHUNKED

    def __init__(self, cfg: ArchConfig, slots: dict[str, tuple[int, int]] | None, grouped: bool = False):
        self.cfg, self.slots = cfg, dict(slots or {})
        self.groups: dict[str, list[str]] = {}
        for i in range(cfg.n_layers) if self.slots and grouped else ():
            for parts in GROUPS:
                ws = [f"blk.{i}.{p}.weight" for p in parts]
                if len(parts) > 1 and all(w in self.slots for w in ws):
                    name = f"blk.{i}.{_group_name(parts)}"
                    self.groups[name] = ws
                    shapes = [self.slots.pop(w) for w in ws]
                    self.slots[name] = (sum(o for o, _ in shapes), shapes[0][1])

    def props(self) -> dict[str, str] | None:
        if not self.groups:
            return None
        return {SLOT_GROUPS: json.dumps(self.groups), **({SLOT_GROUP_B: self.group_b} if self.group_b else {})}

    def _split(self, g: _G, x: str, y: str, i: int, parts: tuple[str, ...]) -> list[str]:
        """The fused product y of a group -> + its group slot -> one output per weight (+ per-weight slots)."""
        prefix = f"blk.{i}.{_group_name(parts)}"
        sizes = [self.cfg.linear_shapes()[f"blk.{i}.{p}.weight"][0] for p in parts]
        if prefix in self.groups:
            y = self._group_slot(g, x, y, prefix, sizes) if self.group_b else self._slot(g, x, y, prefix)
        ys = g.ops("Split", y, g.const(sizes), n_out=len(parts), axis=-1) if len(parts) > 1 else [y]
        return [self._slot(g, x, yp, f"blk.{i}.{p}.weight") for yp, p in zip(ys, parts)]

    def _group_slot(self, g: _G, x: str, y: str, group: str, sizes: list[int]) -> str:
        """y [B,S,Σout] + each weight's x·A_j·B_j at its columns, from a = [A_1 | … | A_k] [n, in, k·r] and b in
        chunks [n, 1, C, r, g] (CHUNKED) or side by side [n, 1, r, Σout]."""
        a, b = lora_input_names(group)
        k, total = len(sizes), sum(sizes)
        if self.group_b == CHUNKED:
            part = group_chunks(sizes)  # chunk c -> the part whose columns it holds
            u = g.op("Reshape", g.op("MatMul", x, a), g.const([0, 0, k, 1, -1]))  # [B,S,k,1,r]
            if len(part) != k:
                u = g.op("Gather", u, g.const(np.array(part, np.int64)), axis=2)  # [B,S,C,1,r]
            p = g.op("Reshape", g.op("MatMul", u, b), g.const([0, 0, total]))  # [B,S,C,1,g] -> [B,S,Σout]
            return g.op("Add", y, p)
        u = g.op("Reshape", g.op("MatMul", x, a), g.const([0, 0, k, -1]))  # [B,S,k·r] -> [B,S,k,r]
        p = g.op("Reshape", g.op("MatMul", u, b), g.const([0, 0, k * total]))  # [B,S,k,Σout] -> [B,S,k·Σout]
        cols = np.concatenate([j * total + np.arange(o0, o0 + o) for j, (o0, o) in  # row j, weight j's columns
                               enumerate(zip(np.cumsum([0] + sizes[:-1]), sizes))])
        return g.op("Add", y, g.op("Gather", p, g.const(cols), axis=2))  # [B,S,Σout]

    def _slot(self, g: _G, x: str, y: str, weight: str) -> str:
        if weight not in self.slots:
            return y
        a, b = lora_input_names(weight)  # + (x @ A) @ B, A [n,in,r], B [n,r,out]
        return g.op("Add", y, g.op("MatMul", g.op("MatMul", x, a), b))

    def _bias(self, g: _G, y: str, prefix: str) -> str:
        biased = self.cfg.qkv_bias and prefix.split(".")[-1] in ("attn_q", "attn_k", "attn_v")
        return g.op("Add", y, f"{prefix}.bias") if biased else y


class _F32Linears(_Linears):
    """Weights are the GGUF-named [in, out] initializers of model.onnx.data, each fed to its MatMul — or, with
    ``grouped``, q|k|v and gate|up concatenated in the graph (onnxruntime folds the Concat of initializers
    once, at load) into one product per group, with grouped slots. A session of a grouped graph cannot take
    weight overrides (they would feed the folded Concat, which no longer reads them): merges run on model.onnx."""

    def group(self, g: _G, x: str, i: int, parts: tuple[str, ...]) -> list[str]:
        if len(parts) > 1 and f"blk.{i}.{_group_name(parts)}" in self.groups:
            w = g.op("Concat", *[f"blk.{i}.{p}.weight" for p in parts], axis=1)
            ys = self._split(g, x, g.op("MatMul", x, w), i, parts)
            return [self._bias(g, y, f"blk.{i}.{p}") for y, p in zip(ys, parts)]
        out = []
        for p in parts:
            w = f"blk.{i}.{p}.weight"
            out.append(self._bias(g, self._slot(g, x, g.op("MatMul", x, w), w), f"blk.{i}.{p}"))
        return out

    def embed(self, g: _G) -> str:
        return g.op("Gather", "token_embd.weight", "input_ids", axis=0)

    def head(self, g: _G, x: str) -> None:
        if self.cfg.tied_embeddings:  # Gemm(transB=1) over the embedding: no copy, no Transpose
            x2 = g.op("Reshape", x, g.const([-1, self.cfg.dim]))
            bs = g.op("Slice", g.op("Shape", x), g.const([0]), g.const([2]))  # [B, S] of x (logits.from slices S)
            y2 = g.op("Gemm", x2, "token_embd.weight", transB=1)
            g.op("Reshape", y2, g.op("Concat", bs, g.const([self.cfg.vocab_size]), axis=0), out="logits")
        else:
            g.op("Identity", self._slot(g, x, g.op("MatMul", x, "output.weight"), "output.weight"), out="logits")


class _QLinears(_Linears):
    """Initializers <group>.qweight / .scales / .offsets / .bias written by build_quant_onnx. ``rows``: where the
    Q8_0 embedding lies in the data file (the EMBED_ROWS property); the graph then takes the prompt's embedding rows
    as the input ``embed.rows``, which the runtime reads from that file, instead of gathering them in-graph."""

    def __init__(self, cfg: ArchConfig, slots, meta: dict[str, QWeight], accuracy_level: int,
                 rows: dict | None = None):
        super().__init__(cfg, slots, grouped=True)
        self.meta, self.acc, self.rows = meta, accuracy_level, rows
        self.inputs: list[onnx.ValueInfoProto] = []  # graph inputs beside the decoder's own (embed.rows)

    def props(self) -> dict[str, str] | None:
        props = {**(super().props() or {}), **({EMBED_ROWS_PROP: json.dumps(self.rows)} if self.rows else {})}
        return props or None

    def _matmul(self, g: _G, x: str, prefix: str, bias: bool = False) -> str:
        q = self.meta[prefix]
        n, k = q.shape
        ins = [x, f"{prefix}.qweight", f"{prefix}.scales"] + (["", "", f"{prefix}.bias"] if bias else [])
        y = g.op("MatMulNBits", *ins, domain=MS, K=k, N=n, bits=q.bits, block_size=BLOCK, accuracy_level=self.acc)
        if q.offsets is not None:  # + blocksum(x) @ offsets: Q4_1's per-block minimum, exactly
            sums = g.op("ReduceSum", g.op("Reshape", x, g.const([0, 0, k // BLOCK, BLOCK])), g.const([-1]), keepdims=0)
            y = g.op("Add", y, g.op("MatMul", sums, f"{prefix}.offsets"))  # [B,S,K/32] @ [K/32,N]
        return y

    def group(self, g: _G, x: str, i: int, parts: tuple[str, ...]) -> list[str]:
        y = self._matmul(g, x, f"blk.{i}.{_group_name(parts)}", bias=self.cfg.qkv_bias and parts[0] == "attn_q")
        return self._split(g, x, y, i, parts)

    def embed(self, g: _G) -> str:  # Q8_0 rows, dequantized as gathered: (q - 128)·d
        if self.rows is not None:  # read by the runtime from the data file (see EMBED_ROWS_PROP)
            self.inputs = [helper.make_tensor_value_info(EMBED_ROWS, TensorProto.FLOAT, ["batch", "seq", self.cfg.dim])]
            return EMBED_ROWS
        return g.op("GatherBlockQuantized", "token_embd.data", "input_ids", "token_embd.scales", domain=MS,
                    bits=8, block_size=BLOCK, gather_axis=0, quantize_axis=1)

    def head(self, g: _G, x: str) -> None:
        prefix = "token_embd" if self.cfg.tied_embeddings else "output"
        parts = sorted((p for p in self.meta if p.startswith(prefix + ".part")), key=lambda p: int(p.rsplit("part", 1)[1]))
        # the head in parts over its rows (HEAD_ROWS), their logits side by side: the same products, column by column
        y = g.op("Concat", *[self._matmul(g, x, p) for p in parts], axis=-1) if parts else self._matmul(g, x, prefix)
        if prefix == "output" and "output.weight" in self.slots:
            y = self._slot(g, x, y, "output.weight")
        g.op("Identity", y, out="logits")


# ---- the decoder
def _gqa_mask(g: _G, window: int | None = None) -> tuple[str, str, str]:
    """(attention_bias [B,1,S,T] float: 0 or NEG, seqlens_k [B] int32, total_sequence_length int32 scalar).
    seqlens_k[b] is the index of row b's last 1 in attention_mask: the row's own key count − 1. GroupQueryAttention
    reads keys [0, seqlens_k[b]] of row b and writes its new keys at seqlens_k[b] − S + 1, so one graph takes both
    layouts of a batch: LEFT-padded rows (every row's last token at T−1: seqlens_k = T−1, pads masked by the bias)
    and RIGHT-padded rows (row b's keys at [0, len_b), pads after them never read — the RIGHT_PADDED property):
    each row then sums over exactly the keys it has alone, so its output is its alone output bit for bit."""
    ids_shape, mask_shape = g.op("Shape", "input_ids"), g.op("Shape", "attention_mask")
    b = g.op("Slice", ids_shape, g.const([0]), g.const([1]))  # [1]
    s = g.op("Slice", ids_shape, g.const([1]), g.const([2]))
    t = g.op("Slice", mask_shape, g.const([1]), g.const([2]))
    total = g.op("Cast", g.op("Squeeze", t, g.const([0])), to=TensorProto.INT32)
    last = g.op("ArgMax", "attention_mask", axis=1, keepdims=0, select_last_index=1)  # [B] int64: each row's last 1
    seqlens = g.op("Cast", last, to=TensorProto.INT32)
    bias = g.op("Where", g.op("Equal", "attention_mask", g.const(1)), g.const(0.0, np.float32), g.const(NEG, np.float32))
    bias = g.op("Expand", g.op("Unsqueeze", bias, g.const([1, 2])), g.op("Concat", b, g.const([1]), s, t, axis=0))
    if window is not None:  # sliding window (Mistral): query at cache index q masks keys j with q - j >= window
        t0, s0 = g.op("Squeeze", t, g.const([0])), g.op("Squeeze", s, g.const([0]))
        # row b's query s sits at cache index last[b] - S + 1 + s (T - S + s for left-padded rows)
        q_off = g.op("Range", g.op("Sub", g.const(1), s0), g.const(1), g.const(1))  # [S]: s - S + 1
        q_pos = g.op("Add", g.op("Unsqueeze", last, g.const([1])), q_off)  # [B,S]
        q_pos = g.op("Unsqueeze", q_pos, g.const([1, 3]))  # [B,1,S,1]
        k_pos = g.op("Range", g.const(0), t0, g.const(1))  # [T]
        far = g.op("GreaterOrEqual", g.op("Sub", q_pos, k_pos), g.const(window))  # [B,1,S,T]
        bias = g.op("Where", far, g.const(NEG, np.float32), bias)  # [B,1,S,T]
    return bias, seqlens, total


def fused_decoder(cfg: ArchConfig, lin: _Linears, inits: list[TensorProto], name: str, *,
                  slot_defaults: bool = True, resid: Any = None, logits_from: bool = False) -> onnx.GraphProto:
    """``resid(g, i, position, y, x) -> x'``, when given, replaces the residual add x + y of block i at
    "attn" and "ffn" (the bottleneck slots of bottleneck.py); the norm after it is then its own node.
    ``logits_from``: + a required input ``logits.from`` int64 [1], the first position the head computes logits
    for — [0] every position, [-1] the last (a prefill that only samples: SmolLM2, 69 tokens: 13.6 MB of logits
    not made, and the head's product on one row instead of 69)."""
    g = _G()
    g.inits += inits
    eps = float(cfg.rms_eps)
    interleaved = int(cfg.rope == "norm")  # "norm": adjacent pairs; "neox": halves
    bias, seqlens, total = _gqa_mask(g, cfg.sliding_window)
    x, embed_in = add_embed_delta(g, lin.embed(g), cfg.dim)  # [B,S,dim] + per-token embedding change
    h = g.op("SimplifiedLayerNormalization", x, "blk.0.attn_norm.weight", axis=-1, epsilon=eps, stash_type=1)
    for i in range(cfg.n_layers):
        # ---- attention
        q, k, v = lin.group(g, h, i, GROUPS[0])  # [B,S,H*hd], [B,S,KV*hd], [B,S,KV*hd]
        if cfg.qk_norm:  # Qwen3: RMS norm over each head of q and k (a [..., heads, head_dim] view), before rope
            q, k = (_head_norm(g, t, f"blk.{i}.attn_{c}_norm.weight", n, cfg.head_dim, eps)
                    for t, c, n in ((q, "q", cfg.n_heads), (k, "k", cfg.n_kv_heads)))
        if cfg.uses_rope(i):  # not on SmolLM3's NoPE layers
            q = g.op("RotaryEmbedding", q, "position_ids", "rope.cos", "rope.sin", domain=MS, interleaved=interleaved)
            k = g.op("RotaryEmbedding", k, "position_ids", "rope.cos", "rope.sin", domain=MS, interleaved=interleaved)
        o = f"attn_{i}"
        g.nodes.append(helper.make_node(
            "GroupQueryAttention", [q, k, v, f"past.{i}.key", f"past.{i}.value", seqlens, total, "", "", "", bias],
            [o, f"present.{i}.key", f"present.{i}.value"], name=f"gqa_{i}", domain=MS,
            num_heads=cfg.n_heads, kv_num_heads=cfg.n_kv_heads, do_rotary=0))  # [B,S,H*hd], kv [B,KV,T,hd]
        (a,) = lin.group(g, o, i, GROUPS[1])
        h, x = _skip_norm(g, a, x, f"blk.{i}.ffn_norm.weight", eps, resid and (lambda y, r: resid(g, i, "attn", y, r)))
        # ---- mlp
        gate, up = lin.group(g, h, i, GROUPS[2])  # [B,S,ffn] each
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)  # silu(gate) * up
        (m,) = lin.group(g, act, i, GROUPS[3])
        nxt = f"blk.{i + 1}.attn_norm.weight" if i + 1 < cfg.n_layers else "output_norm.weight"
        h, x = _skip_norm(g, m, x, nxt, eps, resid and (lambda y, r: resid(g, i, "ffn", y, r)))
    if logits_from:  # h [B,S,dim] -> [B,S',dim], S' = the positions from logits.from on
        h = g.op("Slice", h, LOGITS_FROM, g.const([2 ** 62]), g.const([1]))
    lin.head(g, h)
    inputs, outputs = _io(cfg, lin.slots, g, slot_defaults)
    if logits_from:
        inputs.append(helper.make_tensor_value_info(LOGITS_FROM, TensorProto.INT64, [1]))
    if lin.slots:  # graphs that serve adapters (not the bare base): + a live change of some head rows
        head_in, head_out = add_head_delta(g, h, cfg.dim)
        inputs, outputs = inputs + head_in, outputs + head_out
    return helper.make_graph(g.nodes, name, inputs + [embed_in] + getattr(lin, "inputs", []), outputs,
                             initializer=g.inits)


LOGITS_FROM = "logits.from"  # graph input: the first position the head computes logits for


def _head_norm(g: _G, x: str, w: str, heads: int, hd: int, eps: float) -> str:
    """x [B,S,heads*hd] -> RMS norm of each head with w [hd] -> [B,S,heads*hd]."""
    y = g.op("SimplifiedLayerNormalization", g.op("Reshape", x, g.const([0, 0, heads, hd])), w, axis=-1,
             epsilon=eps, stash_type=1)
    return g.op("Reshape", y, g.const([0, 0, heads * hd]))


def _skip_norm(g: _G, y: str, x: str, w: str, eps: float, add: Any = None) -> tuple[str, str]:
    if add is not None:  # the residual add made by the caller, then the norm alone
        s = add(y, x)
        return g.op("SimplifiedLayerNormalization", s, w, axis=-1, epsilon=eps, stash_type=1), s
    g._n += 1
    h, s = f"norm_{g._n}", f"resid_{g._n}"
    g.nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [y, x, w], [h, "", "", s],
                                    name=f"n{g._n}_SkipSLN", domain=MS, epsilon=eps))
    return h, s


def save_fused(graph: onnx.GraphProto, path: Path, props: dict[str, str] | None = None) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="edgeadapt")
    model.ir_version = 8
    # the runtime reads these: GroupQueryAttention takes seq > 1 after a past only at batch 1; each row's key count
    # comes from its attention_mask, so batches may be right-padded (see _gqa_mask)
    helper.set_model_props(model, {"edgeadapt.attention": "GroupQueryAttention", RIGHT_PADDED: "1", **(props or {})})
    onnx.save_model(model, str(path))


# ---- quantized bases
def quantize_base(cfg: ArchConfig, weights: dict[str, np.ndarray], kind: str, source: Source | None = None,
                  progress: Progress | None = None) -> dict[str, QWeight]:
    """Every linear group of the ``kind`` graph (plus token_embd / output as Q8_0), keyed by initializer prefix."""
    src = source or (lambda name: None)
    out: dict[str, QWeight] = {}
    for i in range(cfg.n_layers):
        for parts in GROUPS:
            names = [f"blk.{i}.{p}.weight" for p in parts]
            out[f"blk.{i}.{_group_name(parts)}"] = QWeight.concat([quantize(kind, weights.get(n), src(n)) for n in names])
        if progress:
            progress(f"quantize {kind}", i + 1, cfg.n_layers)
    out["token_embd"] = quantize("int8", weights.get("token_embd.weight"), src("token_embd.weight"))
    if not cfg.tied_embeddings:
        out["output"] = quantize("int8", weights.get("output.weight"), src("output.weight"))
    return out


def build_quant_onnx(cfg: ArchConfig, weights: dict[str, np.ndarray], out_dir: Path, kind: str, *,
                     source: Source | None = None, progress: Progress | None = None, slots: bool = True,
                     accuracy_level: int = ACCURACY_LEVEL, embed_rows: bool = True,
                     head_rows: int | None = HEAD_ROWS) -> dict:
    """Write ``model_<kind>.onnx`` + its data file; returns {"file", "data", "exact", "quantized"}: how many
    weight groups were repacked bit for bit from ``source`` and how many were quantized from float32.
    ``embed_rows``: the graphs take the embedding rows as an input (EMBED_ROWS); False writes the in-graph lookup
    of the graphs exported before it (which the runtime still runs). ``head_rows``: the output head's rows per
    MatMulNBits (HEAD_ROWS; None: one product, as graphs exported before)."""
    if cfg.arch not in FUSED_ARCHES:
        raise UnsupportedError(f"quantized ONNX ({kind}) is not supported for the {cfg.arch} architecture yet "
                               f"(only {sorted(FUSED_ARCHES)}); export fp32 ONNX, or run model.gguf on the numpy engine")
    check_complete(cfg, weights)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    q = quantize_base(cfg, weights, kind, source, progress)
    path = out_dir / QUANT_FILES[kind]
    writer = _DataWriter(path.with_name(path.name + ".data"))
    inits: list[TensorProto] = []
    meta = dict(q)
    head = "token_embd" if cfg.tied_embeddings else "output"
    try:
        for prefix, w in q.items():
            data, scales = writer.add(f"{prefix}.qweight", w.blocks), writer.add(f"{prefix}.scales", w.scales)
            inits += [data, scales]  # blocks uint8 [N, K/32, blob]
            if w.offsets is not None:
                inits.append(writer.add(f"{prefix}.offsets", w.offsets))
            if prefix == head and head_rows and w.shape[0] > head_rows and w.offsets is None:
                for j, r0 in enumerate(range(0, w.shape[0], head_rows)):  # the head in parts: views of its bytes
                    part = QWeight(w.bits, w.blocks[r0:r0 + head_rows], w.scales[r0:r0 + head_rows], None, w.exact)
                    meta[f"{prefix}.part{j}"] = part
                    inits += [_DataWriter.part(f"{prefix}.part{j}.{n}", t, r0 * a[0].nbytes, a[r0:r0 + head_rows].shape)
                              for n, t, a in (("qweight", data, w.blocks), ("scales", scales, w.scales))]
                if prefix != "token_embd":  # nothing reads the whole head then (the embedding's rows are token_embd's)
                    inits.remove(data), inits.remove(scales)
            if prefix == "token_embd" and not embed_rows:  # the [vocab, dim] table GatherBlockQuantized reads
                inits.append(_DataWriter.alias("token_embd.data", data, (cfg.vocab_size, cfg.dim)))
        for name in cfg.tensor_shapes():
            if name.endswith("_norm.weight"):
                inits.append(writer.add(name, np.asarray(weights[name], np.float32)))
        if cfg.qkv_bias:
            for i in range(cfg.n_layers):
                b = np.concatenate([weights[f"blk.{i}.attn_{p}.bias"] for p in "qkv"]).astype(np.float32)
                inits.append(writer.add(f"blk.{i}.attn_qkv.bias", b))
        cos, sin = rope_tables(cfg)
        inits += [writer.add("rope.cos", cos), writer.add("rope.sin", sin)]
    finally:
        writer.close()
    rows = _rows_spec(cfg, inits) if embed_rows else None
    lin = _QLinears(cfg, cfg.linear_shapes() if slots else None, meta, accuracy_level, rows)
    # slots without defaults: onnxruntime's IOBinding cannot bind an input that has an initializer, and the
    # engine binds every slot (idle ones to rank-0 arrays) so that the kv cache is updated in place
    save_fused(fused_decoder(cfg, lin, inits, f"edgeadapt_{cfg.arch}_{kind}", slot_defaults=False, logits_from=True),
               path, lin.props())
    info = {"file": path.name, "data": path.name + ".data"}
    if slots:  # the same weights without slots: the bare base at full speed (the runtime switches at first use)
        plain = path.with_name(path.stem + "_base.onnx")
        bare = _QLinears(cfg, None, meta, accuracy_level, rows)
        save_fused(fused_decoder(cfg, bare, inits, f"edgeadapt_{cfg.arch}_{kind}_base", logits_from=True), plain,
                   bare.props())
        info["base_file"] = plain.name
    exact = sum(w.exact for p, w in q.items())
    return {**info, "exact": exact, "quantized": len(q) - exact}


def _rows_spec(cfg: ArchConfig, inits: list[TensorProto]) -> dict:
    """Where the Q8_0 embedding's bytes lie in the data file (EMBED_ROWS_PROP)."""
    where = {t.name: {e.key: e.value for e in t.external_data} for t in inits if t.name.startswith("token_embd.")}
    data, scales = where["token_embd.qweight"], where["token_embd.scales"]
    return {"file": data["location"], "data": {"name": "token_embd.qweight", "offset": int(data["offset"])},
            "scales": {"name": "token_embd.scales", "offset": int(scales["offset"]), "type": "float32"},
            "vocab": cfg.vocab_size, "dim": cfg.dim, "block": BLOCK}


def gguf_source(reader: "gguf.GGUFReader") -> Source:
    """Raw blocks of a GGUF's tensors, by name, for :func:`build_quant_onnx` (rows = ggml's last dim)."""
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str):
        t = tensors.get(name)
        return None if t is None else (t.tensor_type, t.data)  # quantized types: uint8 [rows, row bytes]

    return get
