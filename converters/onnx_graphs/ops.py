"""The building blocks every ONNX graph builder of this room shares (the bottom layer: it imports no builder).

- ``_G``: a thin helper around onnx.helper that names every intermediate; ``_DataWriter``: weights go to
  the external data file as they are made, never into one protobuf; ``_save`` / ``_weight_table``;
- rope tables, RMS norm, rope, the linear layer with its LoRA slot, the ``embed.delta`` / ``head.delta``
  inputs, the decoder's inputs and outputs (``_io``), the names of LoRA slots;
- the adapter LayerNorm, the named activations and the bottleneck slot formula of
  :mod:`edgeadapt.kinds.slots`, shared by the encoder graph and the decoder's ``model_bottleneck.onnx``.

The contracts these blocks serve are in :mod:`edgeadapt.converters.onnx_graphs.graph` (decoders) and
:mod:`edgeadapt.converters.onnx_graphs.encoder` (encoders).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeadapt.formats.arch import ArchConfig
from edgeadapt.kinds.slots import ACTS, ADAPTER_LN_EPS, C, bn_name

Progress = Callable[[str, int, int], None]

OPSET = 17
NEG = float(np.finfo(np.float32).min)  # masked score: "minus infinity" that keeps softmax finite
_ALIGN_BIG, _ALIGN_SMALL, _BIG = 65536, 64, 1 << 20  # offset alignment in the data file


# ---- rope tables (exactly transformers' float32 arithmetic)
def rope_tables(cfg: ArchConfig, inv_freq: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [context_length, head_dim/2] of angle pos * inv_freq, all float32; ``inv_freq`` [head_dim/2]
    defaults to the full-attention layers' (cfg.rope_inv_freq: base, linear factor, Llama 3.x divisors)."""
    inv_freq = cfg.rope_inv_freq() if inv_freq is None else inv_freq
    pos = np.arange(cfg.context_length, dtype=np.float32)[:, None]  # [ctx, 1]
    ang = (pos * inv_freq[None, :]).astype(np.float32)  # [ctx, hd/2]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


# ---- external data writer: tensors go to the file as they are made, never into one protobuf
class _DataWriter:
    def __init__(self, path: Path):
        self.f, self.offset, self.location = open(path, "wb"), 0, path.name

    def add(self, name: str, a: np.ndarray) -> TensorProto:
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))  # ONNX data is little-endian
        align = _ALIGN_BIG if a.nbytes >= _BIG else _ALIGN_SMALL
        pad = -self.offset % align
        self.f.write(b"\0" * pad)
        self.offset += pad
        a.tofile(self.f)
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(a.dtype), dims=a.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(self.offset)), ("length", str(a.nbytes))):
            t.external_data.add(key=k, value=v)
        self.offset += a.nbytes
        return t

    @staticmethod
    def alias(name: str, t: TensorProto, shape: tuple[int, ...]) -> TensorProto:
        """The bytes of an initializer already written, under another name and shape (no second copy)."""
        a = TensorProto(name=name, data_type=t.data_type, dims=shape, data_location=TensorProto.EXTERNAL)
        a.external_data.extend(t.external_data)
        return a

    @staticmethod
    def part(name: str, t: TensorProto, start: int, shape: tuple[int, ...]) -> TensorProto:
        """Bytes [start, start + size) of an initializer already written, as an initializer of its own (no copy)."""
        ext = {e.key: e.value for e in t.external_data}
        length = int(np.prod(shape)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        if start + length > int(ext["length"]):
            raise ValueError(f"{name}: bytes [{start}, {start + length}) lie outside {t.name} ({ext['length']} bytes)")
        a = TensorProto(name=name, data_type=t.data_type, dims=shape, data_location=TensorProto.EXTERNAL)
        for k, v in (("location", ext["location"]), ("offset", str(int(ext["offset"]) + start)), ("length", str(length))):
            a.external_data.add(key=k, value=v)
        return a

    def close(self) -> None:
        self.f.close()


# ---- graph builder: a thin helper around onnx.helper that names every intermediate
class _G:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self._n = 0
        self._consts: dict[tuple, str] = {}
        self.slots: dict[str, tuple[int, int]] | None = None  # weight -> (out, in) for the slotted graph

    def op(self, op: str, *inputs: str, out: str | None = None, **attrs) -> str:
        self._n += 1
        name = out or f"{op.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op, list(inputs), [name], name=f"n{self._n}_{op}", **attrs))
        return name

    def ops(self, op: str, *inputs: str, n_out: int, **attrs) -> list[str]:
        self._n += 1
        outs = [f"{op.lower()}_{self._n}_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=f"n{self._n}_{op}", **attrs))
        return outs

    def const(self, value, dtype=np.int64) -> str:
        a = np.asarray(value, dtype=dtype)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self._consts:
            name = f"const_{len(self._consts)}"
            self.inits.append(onnx.numpy_helper.from_array(a, name))
            self._consts[key] = name
        return self._consts[key]


# ---- building blocks (x is [batch, seq, dim] unless said otherwise)
def _rms_norm(g: _G, x: str, w: str, eps: float) -> str:
    # the Pow/ReduceMean/Add/Sqrt/Div/Mul pattern onnxruntime fuses into SimplifiedLayerNorm
    var = g.op("ReduceMean", g.op("Pow", x, g.const(2.0, np.float32)), axes=[-1], keepdims=1)  # [B,S,1]
    return g.op("Mul", g.op("Div", x, g.op("Sqrt", g.op("Add", var, g.const(eps, np.float32)))), w)


def _rope(g: _G, x: str, cos: str, sin: str, cfg: ArchConfig, n_heads: int) -> str:
    """x [B,S,n_heads*hd] -> rotated [B,S,n_heads,hd]. cos/sin are [B,S,1,*] broadcastable pairs."""
    hd = cfg.head_dim
    # "norm": adjacent pairs (x[2i], x[2i+1]); "neox": halves (x[i], x[i+hd/2])
    pairs = [0, 0, n_heads, hd // 2, 2] if cfg.rope == "norm" else [0, 0, n_heads, 2, hd // 2]
    axis = 4 if cfg.rope == "norm" else 3
    a, b = g.ops("Split", g.op("Reshape", x, g.const(pairs)), n_out=2, axis=axis)  # [B,S,H,hd/2,1] each (norm)
    ra = g.op("Sub", g.op("Mul", a, cos), g.op("Mul", b, sin))  # a cos - b sin
    rb = g.op("Add", g.op("Mul", b, cos), g.op("Mul", a, sin))  # b cos + a sin
    return g.op("Reshape", g.op("Concat", ra, rb, axis=axis), g.const([0, 0, n_heads, hd]))  # [B,S,H,hd]


def _linear(g: _G, x: str, prefix: str, bias: bool = False, out: str | None = None) -> str:
    name = f"{prefix}.weight"
    y = g.op("MatMul", x, name, out=None if (bias or g.slots is not None) else out)  # weight is [in, out]
    if g.slots is not None and name in g.slots:  # LoRA slot: + (x @ A) @ B, A [n,in,r], B [n,r,out], n in {1, batch}
        a, b = lora_input_names(name)
        y = g.op("Add", y, g.op("MatMul", g.op("MatMul", x, a), b), out=None if bias else out)
    return g.op("Add", y, f"{prefix}.bias", out=out) if bias else y


EMBED_DELTA = "embed.delta"  # graph input: per-token embedding change, added after the lookup


def add_embed_delta(g: _G, x: str, dim: int) -> tuple[str, onnx.ValueInfoProto]:
    """x [B,S,dim] + ``embed.delta`` (float32 [B or 1, S or 1, dim], default zeros [1,1,dim]): the runtime feeds
    the change of just the ids in the batch (embedding LoRA, trainable tokens, virtual tokens). The embedding
    table itself is untouched, so a head tied to it keeps reading the base. Costs one broadcast add."""
    g.inits.append(onnx.numpy_helper.from_array(np.zeros((1, 1, dim), np.float32), EMBED_DELTA))
    info = helper.make_tensor_value_info(EMBED_DELTA, TensorProto.FLOAT, None, doc_string=f"float32 [batch, seq, {dim}]")
    return g.op("Add", x, EMBED_DELTA), info


HEAD_DELTA, HEAD_LOGITS = "head.delta", "head.logits"  # a live change of some rows of the output head: input, output


def add_head_delta(g: _G, h: str, dim: int) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """(inputs, outputs): ``head.delta`` float32 [B or 1, k, dim] (default k = 0) in, ``head.logits`` = h[b, s] @
    delta[b]ᵀ [B, S, k] out, which the runtime adds to ``logits[b, s, ids]`` for the k head rows it changes. ``h``
    is the normed hidden state the head reads; a tied head changes without touching the embedding. The head
    itself writes ``logits`` (into the caller's buffer when bound): adding the change in-graph made a second
    [B, S, vocab] tensor at every prefill (13.6 MB for a 69-token SmolLM2 prompt)."""
    g.inits.append(onnx.numpy_helper.from_array(np.zeros((1, 0, dim), np.float32), HEAD_DELTA))
    g.op("MatMul", h, g.op("Transpose", HEAD_DELTA, perm=[0, 2, 1]), out=HEAD_LOGITS)  # [B,S,k]
    return ([helper.make_tensor_value_info(HEAD_DELTA, TensorProto.FLOAT, None, doc_string=f"float32 [batch, k, {dim}]")],
            [helper.make_tensor_value_info(HEAD_LOGITS, TensorProto.FLOAT, ["batch", "seq", "k"])])


def lora_input_names(weight: str) -> tuple[str, str]:
    """Graph inputs of the LoRA slot beside ``weight``: A [n, in, r] and B [n, r, out] (scale in B)."""
    return f"lora.{weight}.a", f"lora.{weight}.b"


# ---- the decoder's inputs and outputs (past / present per layer, LoRA slots)
def _io(cfg: ArchConfig, slots: dict[str, tuple[int, int]], g: _G, defaults: bool) -> tuple[list, list]:
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    kv_in, kv_out = ["batch", cfg.n_kv_heads, "past", cfg.head_dim], ["batch", cfg.n_kv_heads, "total", cfg.head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", i64, ["batch", "total"]),
              helper.make_tensor_value_info("position_ids", i64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "seq", cfg.vocab_size])]
    for i in range(cfg.n_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past.{i}.{kind}", f32, kv_in))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, kv_out))
    for name, (out, inp) in slots.items():
        a, b = lora_input_names(name)
        if defaults:  # empty (rank 0): nothing fed = the bare base; onnxruntime's LoraAdapter needs them
            g.inits += [onnx.numpy_helper.from_array(np.zeros((1, inp, 0), np.float32), a),
                        onnx.numpy_helper.from_array(np.zeros((1, 0, out), np.float32), b)]
        # no declared shape: 420 inputs with symbolic dims cost onnxruntime ~1 s of session creation (measured
        # 1.3 s -> 0.4 s on SmolLM2-135M int4); the shapes are in the doc strings and checked by the kernels
        inputs += [helper.make_tensor_value_info(a, f32, None, doc_string=f"float32 [lora_rows, {inp}, r]"),
                   helper.make_tensor_value_info(b, f32, None, doc_string=f"float32 [lora_rows, r, {out}]")]
    return inputs, outputs


# ---- saving, and the manifest table read back from what was written
def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgeadapt")
    model.ir_version = 8  # opset 17 needs IR >= 8; keep it low for older device runtimes
    onnx.save_model(model, str(path))  # weights are already external: the protobuf stays small


def _weight_table(out_dir: Path, layouts: dict[str, str]) -> dict:
    """``{gguf_name: {"onnx": initializer name, "layout": "in_out" (stored transposed) | "as_is",
    "file": "model.onnx.data", "offset": bytes, "length": bytes, "dtype": "float32",
    "shape": shape as stored}}`` for every model weight (not the rope helpers), taken from the
    external-data records of the model.onnx just written: np.memmap(file, "<f4", "r", offset,
    shape) is the initializer."""
    model = onnx.load(str(out_dir / "model.onnx"), load_external_data=False)
    table = {}
    for t in model.graph.initializer:
        if t.name not in layouts:
            continue
        ext = {e.key: e.value for e in t.external_data}
        assert t.data_location == TensorProto.EXTERNAL and t.data_type == TensorProto.FLOAT, t.name
        table[t.name] = {"onnx": t.name, "layout": layouts[t.name], "file": ext["location"],
                         "offset": int(ext["offset"]), "length": int(ext["length"]),
                         "dtype": "float32", "shape": [int(d) for d in t.dims]}
    return table


# ---- adapter slots: LayerNorm with per-row weights, named activations, the bottleneck formula
def _ln(g: _G, x: str, w: str, b: str, eps: float) -> str:
    return g.op("LayerNormalization", x, w, b, axis=-1, epsilon=eps)


def _ln_rows(g: _G, x: str, w: str, b: str, ones: str, zeros: str) -> str:
    """LayerNorm whose weight/bias are per-row slots [rows, 1, dim] (Mul/Add broadcast)."""
    return g.op("Add", g.op("Mul", _ln(g, x, ones, zeros, ADAPTER_LN_EPS), w), b)


def _act(g: _G, name: str, z: str) -> str:
    f = lambda v: g.const(v, np.float32)  # noqa: E731
    if name == "relu":
        return g.op("Relu", z)
    if name == "silu":
        return g.op("Mul", z, g.op("Sigmoid", z))
    if name == "gelu":  # 0.5·x·(1 + erf(x/√2)), transformers' exact GELU
        return g.op("Mul", g.op("Mul", z, f(0.5)), g.op("Add", f(1.0), g.op("Erf", g.op("Div", z, f(np.sqrt(2.0))))))
    if name == "gelu_new":
        inner = g.op("Mul", f(np.sqrt(2.0 / np.pi)), g.op("Add", z, g.op("Mul", f(0.044715), g.op("Pow", z, f(3.0)))))
        return g.op("Mul", g.op("Mul", z, f(0.5)), g.op("Add", f(1.0), g.op("Tanh", inner)))
    if name == "tanh":
        return g.op("Tanh", z)
    if name == "sigmoid":
        return g.op("Sigmoid", z)
    if name == "leakyrelu":
        return g.op("LeakyRelu", z, alpha=0.01)
    return g.op("Identity", z)


def _gelu_tanh(g: _G, z: str) -> str:
    """0.5·z·(1 + tanh(a)) written as z·sigmoid(2a), a = √(2/π)·(z + 0.044715·z³): the same function, in a form
    onnxruntime's FastGeluFusion leaves alone (it rewires the Tanh form of this slot into an invalid graph,
    "Node input … is not a graph input", onnxruntime 1.31)."""
    f = lambda v: g.const(v, np.float32)  # noqa: E731
    cube = g.op("Mul", g.op("Mul", z, z), z)
    a2 = g.op("Mul", f(2.0 * np.sqrt(2.0 / np.pi)), g.op("Add", z, g.op("Mul", f(0.044715), cube)))
    return g.op("Mul", z, g.op("Sigmoid", a2))


def bottleneck_nodes(g: _G, i: int, p: str, h: str, t: str, ones: str, zeros: str, ln: Any = None) -> str:
    """The slot formula of :mod:`edgeadapt.kinds.slots` at block i, position p; ``ln(name) -> name`` the
    block's LayerNorm (an encoder), or None: LN = identity (a pre-norm decoder)."""
    ln = ln or (lambda v: v)
    n = lambda part: bn_name(i, p, part)  # noqa: E731
    one = g.const(1.0, np.float32)
    ctrl = n("ctrl")
    k = lambda key: g.op("Slice", ctrl, g.const([C[key]]), g.const([C[key] + 1]), g.const([-1]))  # noqa: E731 [rows,1,1]
    blend = lambda c, a, b: g.op("Add", g.op("Mul", c, a), g.op("Mul", g.op("Sub", one, c), b))  # noqa: E731
    s = g.op("Add", h, t)
    L = ln(s)
    x0 = g.op("Add", g.op("Add", g.op("Mul", k("x_h"), h), g.op("Mul", k("x_t"), t)), g.op("Mul", k("x_L"), L))
    r = g.op("Add", g.op("Add", g.op("Mul", k("r_h"), h), g.op("Mul", k("r_s"), s)), g.op("Mul", k("r_L"), L))
    x = blend(k("ln_before"), _ln_rows(g, x0, n("ln_before.weight"), n("ln_before.bias"), ones, zeros), x0)
    z = g.op("Add", g.op("MatMul", x, n("down")), n("down_bias"))  # [B,S,m]
    a = None
    for name in ACTS:
        term = g.op("Mul", k(f"act_{name}"), _gelu_tanh(g, z) if name == "gelu_new" else _act(g, name, z))
        a = term if a is None else g.op("Add", a, term)
    u = g.op("Add", g.op("MatMul", a, n("up")), n("up_bias"))  # [B,S,dim]
    arb = k("arb")
    pre = g.op("Add", u, g.op("Mul", arb, r))
    post = blend(k("ln_after"), _ln_rows(g, pre, n("ln_after.weight"), n("ln_after.bias"), ones, zeros), pre)
    out = g.op("Add", post, g.op("Mul", g.op("Sub", one, arb), r))
    return blend(k("ln_out"), ln(g.op("Add", out, t)), out)
