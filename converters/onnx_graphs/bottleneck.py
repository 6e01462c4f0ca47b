"""``model_bottleneck.onnx``: the live graph for bottleneck adapters on a llama-family decoder.

The fused decoder of ``model_kinds.onnx`` (LoRA, input / output scale and bias slots per linear
weight, :mod:`edgeadapt.converters.onnx_graphs.kinds`) over the same ``model.onnx.data``, with the two
residual adds of every block i replaced by a bottleneck slot at position p ∈ {attn, ffn}:

  x = x + y    ->   x = bottleneck(h = y, t = x)       (y: o_proj output, or the MLP's down_proj output)

with the slot formula of :mod:`edgeadapt.kinds.slots` and the block's LayerNorm taken as the
identity — AdapterHub's Llama / Mistral call the adapter layer with ``layer_norm=None``:

  bn.<i>.<p>.ctrl [rows, 1, 18]; .down [rows, dim, m]; .down_bias [rows, 1, m]; .up [rows, m, dim];
  .up_bias [rows, 1, dim]; .ln_before.weight / .bias, .ln_after.weight / .bias [rows, 1, dim]

rows is 1 or batch. Every input has a default (width m = 0, ctrl r_L = 1): nothing fed = the bare
base. The activation is chosen in-graph by the one-hot part of ctrl. The LoRA-only graphs are left
as they are; the runtime builds this session only while a bottleneck adapter is active.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeadapt.formats.arch import ArchConfig
from edgeadapt.kinds.slots import ACTS, C, POSITIONS, bn_defaults, bn_name

from edgeadapt.converters.onnx_graphs.encoder import _act, _ln_rows
from edgeadapt.converters.onnx_graphs.fast import fused_decoder, save_fused
from edgeadapt.converters.onnx_graphs.graph import _G
from edgeadapt.converters.onnx_graphs.kinds import _KindLinears, kind_input_names

BOTTLENECK_FILE = "model_bottleneck.onnx"


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


def save_bottleneck_graph(cfg: ArchConfig, inits: list[TensorProto], out_dir: Path) -> Path:
    """Write ``model_bottleneck.onnx`` over the initializers already written for model.onnx."""
    linear = cfg.linear_shapes()
    consts: dict[str, str] = {}

    def resid(g: _G, i: int, p: str, y: str, x: str) -> str:
        if not consts:  # the adapter LayerNorms' unit weight / zero bias, once per graph
            consts["ones"] = g.const(np.ones(cfg.dim, np.float32), np.float32)
            consts["zeros"] = g.const(np.zeros(cfg.dim, np.float32), np.float32)
        return bottleneck_nodes(g, i, p, y, x, consts["ones"], consts["zeros"])

    graph = fused_decoder(cfg, _KindLinears(cfg, linear), inits, f"edgeadapt_{cfg.arch}_bottleneck", resid=resid)
    f32 = TensorProto.FLOAT
    extra: list[tuple[str, np.ndarray, str]] = []
    for w, (o, i) in linear.items():
        for name, fill, n in zip(kind_input_names(w), (1.0, 1.0, 0.0), (i, o, o)):
            extra.append((name, np.full((1, 1, n), fill, np.float32), f"float32 [lora_rows, 1, {n}]"))
    idle = bn_defaults(cfg.dim)
    for i in range(cfg.n_layers):
        for p in POSITIONS:
            for part, a in idle.items():
                extra.append((bn_name(i, p, part), a, f"float32 [rows, {', '.join(map(str, a.shape[1:]))}]"
                              .replace(", 0]", ", m]").replace("[rows, 0,", "[rows, m,")))
    for name, a, doc in extra:
        graph.initializer.append(onnx.numpy_helper.from_array(a, name))
        graph.input.append(helper.make_tensor_value_info(name, f32, None, doc_string=doc))
    path = Path(out_dir) / BOTTLENECK_FILE
    save_fused(graph, path)
    return path
