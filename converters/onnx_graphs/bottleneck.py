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

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeadapt.formats.arch import ArchConfig
from edgeadapt.kinds.slots import POSITIONS, bn_defaults, bn_name

from edgeadapt.converters.onnx_graphs.fast import fused_decoder, save_fused
from edgeadapt.converters.onnx_graphs.kinds import _KindLinears, kind_input_names
from edgeadapt.converters.onnx_graphs.ops import _G, bottleneck_nodes

BOTTLENECK_FILE = "model_bottleneck.onnx"


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
