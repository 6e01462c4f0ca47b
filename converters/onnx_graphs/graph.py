"""Build the ONNX graph of a llama-family decoder straight from canonical weights (no tracing).

The top of this room: :func:`build_onnx` picks the builders (the plain-operator graph of :mod:`.arch`,
the fused graphs of :mod:`.fast`, the scale / bias slots of :mod:`.kinds`, the bottleneck slots of
:mod:`.bottleneck`), which build on the blocks of :mod:`.ops`; none of them imports this module.

Files written by :func:`build_onnx` into ``out_dir``
  model.onnx         the decoder (opset 17 + com.microsoft 1: the fused operators of
                     :mod:`edgeadapt.converters.onnx_graphs.fast`; ``fused=False`` writes the same decoder
                     from default-domain operators only — the reference the fused one is tested against)
  model_lora.onnx    the same decoder over the same weights with a LoRA slot beside every linear
                     layer (see "LoRA slots" below)
  model_live.onnx    the runtime's live graph: the same slots without defaults, q|k|v and gate|up
                     grouped (see "Grouped slots" below)
  weight_sums.onnx   a tiny check model over the same initializers (see "weight_sums" below)
  model.onnx.data    the ONE external data file of both; every model weight in it is a plain
                     little-endian float32 array at the offset the returned table gives

model.onnx contract (a spec the runtime relies on)
  inputs   input_ids       int64   [batch, seq]
           attention_mask  int64   [batch, total]   total = past + seq; 1 = real token, 0 = pad
                                                    (batches are LEFT padded; see "Right padding")
           position_ids    int64   [batch, seq]     rope positions, 0 <= p < cfg.context_length
           past.{i}.key    float32 [batch, n_kv_heads, past, head_dim]  i < n_layers; past may be 0
           past.{i}.value  float32 [batch, n_kv_heads, past, head_dim]
  outputs  logits          float32 [batch, seq, vocab]
           present.{i}.key float32 [batch, n_kv_heads, total, head_dim]  = concat(past, new), axis 2
           present.{i}.value                     (or, when past and present are bound to one buffer of
                                                 capacity >= total, that buffer updated in place:
                                                 GroupQueryAttention's shared-buffer mode)
  Query s (absolute position past+s) attends key j iff j <= past+s and attention_mask[b, j] == 1;
  fully masked rows (pad queries) give finite, meaningless logits, never NaN.
  Right padding (the fused graphs with the model property edgeadapt.right_padded = "1"): row b's
  keys are its first last_b + 1 positions, last_b = the index of its last 1 in attention_mask; its
  S new tokens are the last S of those (their keys written at last_b - S + 1 .. last_b, the pads
  after them never read), so a row sums over exactly the keys it has alone. Left-padded rows have
  last_b = total - 1: the contract above, unchanged. A pad query after a row's real keys (last
  column 0) would have its key written over the row's last real one: feed its own column as 1 (the
  runtime does, one new token at a time), so its key lands in its column, masked for later queries.
  Queries of a right-padded row after its last 1 give meaningless values.

Initializers (names are the GGUF names; overridable with SessionOptions.add_initializer)
  token_embd.weight            [vocab, dim]  as-is; Gather, and Gemm(transB=1) for tied logits
  blk.{i}.attn_q.weight, ...   [in, out]     linear weights TRANSPOSED from canonical [out, in],
  output.weight (if untied)    [in, out]     each the direct input of a MatMul (no node between)
  *_norm.weight, blk.{i}.attn_{q,k,v}.bias   as-is (q/k rows permuted for "norm" rope, as canonical;
                               attn_{q,k}_norm.weight [head_dim]: Qwen3's RMS norm per head before rope)
  rope.cos, rope.sin           [context_length, head_dim/2]  helpers, not model weights

LoRA slots (model_lora.onnx): extra optional inputs, two per weight W of cfg.linear_shapes()
           lora.<W>.a      float32 [lora_rows, in, r]   default: empty [1, in, 0]
           lora.<W>.b      float32 [lora_rows, r, out]  default: empty [1, 0, out]
  and the layer computes x @ W + (x @ a) @ b (scale folded into b). lora_rows is 1 (every row
  alike) or batch (row b uses a[b], b[b]: per-row adapters in one pass); r is free per weight, so
  one session takes any rank, stacked adapters concatenate ranks, and nothing fed = the bare base.
  The names are onnxruntime LoraAdapter parameter names: a .onnx_adapter holding them works
  with RunOptions.add_active_adapter on this graph.

Grouped slots (model_live.onnx, model_int4.onnx, model_int8.onnx): the linear layers that read one
input are one product — q|k|v and gate|up — with ONE slot per group, lora.blk.{i}.attn_qkv.a/b and
lora.blk.{i}.ffn_gate_up.a/b, whose change is [x a_q b_q | x a_k b_k | x a_v b_v]. The model property
edgeadapt.slot_groups lists them ({slot: [weights]}); edgeadapt.slot_groups.b says how a and b hold the
weights' factors:
           "side_by_side"  a = [a_q | a_k | a_v]  float32 [lora_rows, in, k·r]   each weight's a at the
                                                  group's rank r (zero columns pad a smaller rank)
                           b = [b_q | b_k | b_v]  float32 [lora_rows, 1, r, Σout]  the weights' b side by
                                                  side over r (zero rows pad a smaller rank)
                           the graph views x·a as [.., k, r], multiplies by b ([.., k, Σout]) and gathers
                           weight j's columns of row j: no block-diagonal zeros are stored or bound
           absent          (graphs exported before issue #17's third pass) a = [a_q | a_k | a_v] with the
                           ranks side by side [lora_rows, in, Σr], b block-diagonal [lora_rows, Σr, Σout]
  Four slots a layer instead of seven: per token, slot operators cost more than their arithmetic.
  Nothing is fed with a default: every slot is bound (rank 0 when idle: a [1, in, 0] and b [1, 1, 0, Σout]
  or [1, 0, Σout]).
model_live.onnx fuses the float weights with a Concat of initializers that onnxruntime folds at
load, so its weights are NOT overridable (an override would feed the folded Concat): merges run on
model.onnx. In the quantized bases the linear weights are MatMulNBits blocks: nothing to override.

weight_sums.onnx contract
  no input to feed (``reduce_axes`` is an overridable initializer: leave it alone);
  output weight_sums float32 [n_linear]: the sum of each weight of cfg.linear_shapes(), in that
  order, over the same initializer names, so a session given the same add_initializer overrides
  shows whether they took effect.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeadapt.formats.arch import ArchConfig
from edgeadapt.kinds.bottleneck import DECODER_ARCHES
from edgeadapt.converters.hf import check_complete

from edgeadapt.converters.onnx_graphs.arch import decoder, rope_initializers
from edgeadapt.converters.onnx_graphs.bottleneck import save_bottleneck_graph
from edgeadapt.converters.onnx_graphs.fast import FUSED_ARCHES, _F32Linears, fused_decoder, save_fused
from edgeadapt.converters.onnx_graphs.kinds import save_kinds_graph
from edgeadapt.converters.onnx_graphs.ops import (NEG, Progress, _DataWriter, _G, _linear, _rms_norm, _rope, _save,
                                                  _weight_table, add_embed_delta, lora_input_names)

DATA_FILE = "model.onnx.data"
VERIFY_FILE = "weight_sums.onnx"
LORA_FILE = "model_lora.onnx"
LIVE_FILE = "model_live.onnx"  # grouped slots without defaults: the runtime's in-place kv cache binds it


def _attention(g: _G, cfg: ArchConfig, i: int, x: str, cos: str, sin: str, mask: str) -> str:
    H, KV, hd, p = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, f"blk.{i}"
    q, k = _linear(g, x, f"{p}.attn_q", cfg.qkv_bias), _linear(g, x, f"{p}.attn_k", cfg.qkv_bias)
    if cfg.qk_norm:  # Qwen3: RMS norm over each head of q and k, before rope
        q, k = (g.op("Reshape", _rms_norm(g, g.op("Reshape", t, g.const([0, 0, n, hd])), f"{p}.attn_{c}_norm.weight",
                                          cfg.rms_eps), g.const([0, 0, n * hd])) for t, n, c in ((q, H, "q"), (k, KV, "k")))
    if cfg.uses_rope(i):
        q = _rope(g, q, cos, sin, cfg, H)  # [B,S,H,hd]
        k = _rope(g, k, cos, sin, cfg, KV)  # [B,S,KV,hd]
    else:  # a NoPE layer (SmolLM3): q and k as they are
        q, k = g.op("Reshape", q, g.const([0, 0, H, hd])), g.op("Reshape", k, g.const([0, 0, KV, hd]))
    v = g.op("Reshape", _linear(g, x, f"{p}.attn_v", cfg.qkv_bias), g.const([0, 0, KV, hd]))
    q = g.op("Transpose", q, perm=[0, 2, 1, 3])  # [B,H,S,hd]
    k = g.op("Concat", f"past.{i}.key", g.op("Transpose", k, perm=[0, 2, 1, 3]), axis=2,
             out=f"present.{i}.key")  # [B,KV,T,hd]
    v = g.op("Concat", f"past.{i}.value", g.op("Transpose", v, perm=[0, 2, 1, 3]), axis=2,
             out=f"present.{i}.value")  # [B,KV,T,hd]
    # grouped-query attention without repeating kv: query head h = kv*G + g uses kv head h // G,
    # so [B,H,S,hd] viewed as [B,KV,G*S,hd] lines each group up with its kv head.
    qg = g.op("Reshape", q, g.const([0, KV, -1, hd]))  # [B,KV,G*S,hd]
    s = g.op("MatMul", qg, g.op("Transpose", k, perm=[0, 1, 3, 2]))  # [B,KV,G*S,T]
    s = g.op("Mul", s, g.const(1.0 / np.sqrt(hd), np.float32))
    s = g.op("Reshape", s, g.const([0, H, -1, 0]))  # [B,H,S,T]
    s = g.op("Where", mask, s, g.const(NEG, np.float32))  # mask [B,1,S,T]
    pr = g.op("Reshape", g.op("Softmax", s, axis=-1), g.const([0, KV, -1, 0]))  # [B,KV,G*S,T]
    o = g.op("Reshape", g.op("MatMul", pr, v), g.const([0, H, -1, hd]))  # [B,H,S,hd]
    o = g.op("Reshape", g.op("Transpose", o, perm=[0, 2, 1, 3]), g.const([0, 0, H * hd]))  # [B,S,H*hd]
    return _linear(g, o, f"{p}.attn_output")  # [B,S,dim]


def _mlp(g: _G, i: int, x: str) -> str:
    gate = _linear(g, x, f"blk.{i}.ffn_gate")  # [B,S,ffn]
    act = g.op("Mul", gate, g.op("Sigmoid", gate))  # silu
    return _linear(g, g.op("Mul", act, _linear(g, x, f"blk.{i}.ffn_up")), f"blk.{i}.ffn_down")  # [B,S,dim]


def _mask(g: _G, window: int | None = None) -> str:
    """bool [B,1,S,T]: key j visible to query s iff j <= past+s and attention_mask[b,j] == 1 (and, with a
    sliding ``window``, past+s - j < window: Mistral)."""
    zero, one = g.const(0), g.const(1)
    S = g.op("Gather", g.op("Shape", "input_ids"), one, axis=0)  # scalar
    T = g.op("Gather", g.op("Shape", "attention_mask"), one, axis=0)  # scalar
    q_pos = g.op("Range", g.op("Sub", T, S), T, one)  # [S] absolute positions past..total-1
    k_pos = g.op("Range", zero, T, one)  # [T]
    causal = g.op("LessOrEqual", g.op("Unsqueeze", k_pos, g.const([0])),
                  g.op("Unsqueeze", q_pos, g.const([1])))  # [S,T]
    real = g.op("Unsqueeze", g.op("Equal", "attention_mask", one), g.const([1, 2]))  # [B,1,1,T]
    if window is not None:
        near = g.op("Less", g.op("Sub", g.op("Unsqueeze", q_pos, g.const([1])), g.op("Unsqueeze", k_pos, g.const([0]))),
                    g.const(window))  # [S,T]
        causal = g.op("And", causal, near)
    return g.op("And", causal, real)  # [B,1,S,T]


# ---- weight_sums: a separate tiny model, so the decoder pays nothing for it
# Measured (onnxruntime 1.31, SmolLM2-sized graph): a ReduceSum fed straight by a weight is
# constant-folded with the ORIGINAL weight, so it ignores add_initializer overrides; a ReduceSum that
# cannot be folded runs on every step (onnxruntime never prunes to the requested outputs), and
# even behind an If it keeps every weight's unpacked original alive next to MatMul's prepacked copy
# (+407 MB = +59% RSS on SmolLM2 size). So the sums live in ``weight_sums.onnx``: same initializer names, same bytes of
# model.onnx.data (nothing copied), one ReduceSum each. Its ``reduce_axes`` input is an overridable
# initializer (default: empty = all axes), which is what stops onnxruntime from folding the sums.
def _write_verify_model(cfg: ArchConfig, weight_protos: dict[str, TensorProto], out_dir: Path) -> None:
    g = _G()
    names = list(cfg.linear_shapes())
    g.inits += [weight_protos[n] for n in names]
    g.inits.append(onnx.numpy_helper.from_array(np.zeros(0, np.int64), "reduce_axes"))
    sums = [g.op("Reshape", g.op("ReduceSum", n, "reduce_axes", keepdims=1), g.const([1])) for n in names]
    g.op("Concat", *sums, axis=0, out="weight_sums")  # [n_linear]
    graph = helper.make_graph(
        g.nodes, "edgeadapt_weight_sums",
        [helper.make_tensor_value_info("reduce_axes", TensorProto.INT64, [0])],
        [helper.make_tensor_value_info("weight_sums", TensorProto.FLOAT, [len(names)])], initializer=g.inits)
    _save(graph, out_dir / VERIFY_FILE)


# ---- the public builder
def build_onnx(cfg: ArchConfig, weights: dict[str, np.ndarray], out_dir: Path, *,
               progress: Progress | None = None, slots: bool = True, fused: bool = True) -> dict:
    """Write ``model.onnx``, ``weight_sums.onnx`` (and, with ``slots``, ``model_lora.onnx``) and
    their one data file ``model.onnx.data`` into ``out_dir``; return the weight table (see
    :func:`_weight_table`). ``progress(step, done, total)`` is called per layer and after saving."""
    check_complete(cfg, weights)  # names and shapes, with a readable error
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    linear = cfg.linear_shapes()
    protos: dict[str, TensorProto] = {}
    writer = _DataWriter(out_dir / DATA_FILE)
    try:  # every weight written once, in layer order; linear: canonical [out,in] -> [in,out]
        names = list(cfg.tensor_shapes())
        for k, name in enumerate(names):
            w = np.asarray(weights[name], dtype=np.float32)
            protos[name] = writer.add(name, w.T if name in linear else w)
            if progress and name.endswith("ffn_down.weight"):
                progress("write weights", int(name.split(".")[1]) + 1, cfg.n_layers)
        for name, table in rope_initializers(cfg).items():
            protos[name] = writer.add(name, table)
    finally:
        writer.close()
    if cfg.arch not in FUSED_ARCHES:  # Gemma 3, GPT-2: the plain-operator graph (see onnx_graphs.arch)
        inits = list(protos.values())
        _save(decoder(cfg, inits, None), out_dir / "model.onnx")
        if slots:
            _save(decoder(cfg, inits, linear), out_dir / LORA_FILE)
    elif fused:
        inits = list(protos.values())
        save_fused(fused_decoder(cfg, _F32Linears(cfg, None), inits, f"edgeadapt_{cfg.arch}"), out_dir / "model.onnx")
        if slots:
            save_fused(fused_decoder(cfg, _F32Linears(cfg, linear), inits, f"edgeadapt_{cfg.arch}_lora"),
                       out_dir / LORA_FILE)
            # the runtime's live graph: every slot required (rank 0 = idle; onnxruntime's IOBinding cannot bind an
            # input that has a default, and binding is what keeps the kv cache in place between tokens), q|k|v and
            # gate|up fused with one slot per group (see fast._Linears): 4 slots a layer instead of 7
            live = _F32Linears(cfg, linear, grouped=True)
            save_fused(fused_decoder(cfg, live, inits, f"edgeadapt_{cfg.arch}_live", slot_defaults=False,
                                     logits_from=True), out_dir / LIVE_FILE, live.props())
            save_kinds_graph(cfg, inits, out_dir)  # scale / bias slots (DoRA, IA3, lora_bias): the runtime loads it lazily
            if cfg.arch in DECODER_ARCHES:  # + bottleneck slots (AdapterHub's Llama / Mistral), loaded lazily too
                save_bottleneck_graph(cfg, inits, out_dir)
    else:
        _save(_decoder(cfg, protos, None), out_dir / "model.onnx")
        if slots:
            _save(_decoder(cfg, protos, linear), out_dir / LORA_FILE)
    _write_verify_model(cfg, protos, out_dir)
    if progress:
        progress("save", 1, 1)
    return _weight_table(out_dir, {n: "in_out" if n in linear else "as_is" for n in cfg.tensor_shapes()})


def _decoder(cfg: ArchConfig, protos: dict[str, TensorProto], slots: dict[str, tuple[int, int]] | None
             ) -> onnx.GraphProto:
    """The decoder graph over the written weights; with ``slots``, a LoRA slot beside each of them."""
    g = _G()
    g.slots = slots
    g.inits += list(protos.values())
    # ---- embeddings, rope angles for these positions, mask
    x, embed_in = add_embed_delta(g, g.op("Gather", "token_embd.weight", "input_ids", axis=0), cfg.dim)  # [B,S,dim]
    pair_axis = [2, 4] if cfg.rope == "norm" else [2, 3]  # [B,S,hd/2] -> [B,S,1,hd/2,1] | [B,S,1,1,hd/2]
    cos_t = g.op("Unsqueeze", g.op("Gather", "rope.cos", "position_ids", axis=0), g.const(pair_axis))
    sin_t = g.op("Unsqueeze", g.op("Gather", "rope.sin", "position_ids", axis=0), g.const(pair_axis))
    mask = _mask(g, cfg.sliding_window)
    # ---- decoder blocks
    for i in range(cfg.n_layers):
        h = _rms_norm(g, x, f"blk.{i}.attn_norm.weight", cfg.rms_eps)
        x = g.op("Add", x, _attention(g, cfg, i, h, cos_t, sin_t, mask))
        h = _rms_norm(g, x, f"blk.{i}.ffn_norm.weight", cfg.rms_eps)
        x = g.op("Add", x, _mlp(g, i, h))  # [B,S,dim]
    # ---- head
    x = _rms_norm(g, x, "output_norm.weight", cfg.rms_eps)
    if cfg.tied_embeddings:  # logits = x @ token_embd^T via Gemm(transB=1): no copy, no Transpose
        x2 = g.op("Reshape", x, g.const([-1, cfg.dim]))  # [B*S,dim]
        y2 = g.op("Gemm", x2, "token_embd.weight", transB=1)  # [B*S,vocab]
        bs = g.op("Slice", g.op("Shape", "input_ids"), g.const([0]), g.const([2]))  # [2] = (B,S)
        g.op("Reshape", y2, g.op("Concat", bs, g.const([cfg.vocab_size]), axis=0), out="logits")
    else:
        _linear(g, x, "output", out="logits")  # [B,S,vocab]
    # ---- inputs / outputs
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    kv_in = ["batch", cfg.n_kv_heads, "past", cfg.head_dim]
    kv_out = ["batch", cfg.n_kv_heads, "total", cfg.head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", i64, ["batch", "total"]),
              helper.make_tensor_value_info("position_ids", i64, ["batch", "seq"]), embed_in]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "seq", cfg.vocab_size])]
    for i in range(cfg.n_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past.{i}.{kind}", f32, kv_in))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, kv_out))
    for k, (name, (out, inp)) in enumerate((slots or {}).items()):
        a, b = lora_input_names(name)
        # empty defaults (rank 0): the slotted graph runs the bare base when nothing is fed
        g.inits += [onnx.numpy_helper.from_array(np.zeros((1, inp, 0), np.float32), a),
                    onnx.numpy_helper.from_array(np.zeros((1, 0, out), np.float32), b)]
        inputs += [helper.make_tensor_value_info(a, f32, ["lora_rows", inp, f"rank_{k}"]),
                   helper.make_tensor_value_info(b, f32, ["lora_rows", f"rank_{k}", out])]
    return helper.make_graph(g.nodes, f"edgeadapt_{cfg.arch}{'_lora' if slots else ''}", inputs, outputs,
                             initializer=g.inits)
