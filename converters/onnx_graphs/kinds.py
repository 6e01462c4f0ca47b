"""``model_kinds.onnx``: the live graph for adapter kinds that scale or shift a layer (DoRA, IA3, lora_bias).

The same fused decoder over the same ``model.onnx.data`` as ``model_lora.onnx`` (its contract in
:mod:`edgeadapt.converters.onnx_graphs.graph`), with three more optional inputs per linear weight W:

  lora.<W>.in    float32 [lora_rows, 1, in]   default ones    scales the layer's input to W
  lora.<W>.out   float32 [lora_rows, 1, out]  default ones    scales the base product
  lora.<W>.bias  float32 [lora_rows, 1, out]  default zeros   added to the output

so that the layer computes ``out ⊙ ((x ⊙ in) @ W) + (x @ a) @ b + bias`` (then W's own bias, if the
architecture has one). lora_rows is 1 or batch, as for a and b. The LoRA-only graphs stay as they
are (their cost is the project's live-LoRA budget); the runtime loads this one lazily, only while an
adapter that needs these slots is active. Every input has a default, so nothing fed = the bare base.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeadapt.formats.arch import ArchConfig

from edgeadapt.converters.onnx_graphs.fast import _F32Linears, fused_decoder, save_fused
from edgeadapt.converters.onnx_graphs.ops import _G, lora_input_names

KINDS_FILE = "model_kinds.onnx"


def kind_input_names(weight: str) -> tuple[str, str, str]:
    """Graph inputs of the scale / bias slots beside ``weight``: in [n, 1, in], out [n, 1, out], bias [n, 1, out]."""
    return f"lora.{weight}.in", f"lora.{weight}.out", f"lora.{weight}.bias"


class _KindLinears(_F32Linears):
    """float32 linears with LoRA, input-scale, output-scale and bias slots."""

    def group(self, g: _G, x: str, i: int, parts: tuple[str, ...]) -> list[str]:
        out = []
        for p in parts:
            w = f"blk.{i}.{p}.weight"
            out.append(self._bias(g, self._kind_slot(g, x, w), f"blk.{i}.{p}"))
        return out

    def _kind_slot(self, g: _G, x: str, w: str) -> str:
        s_in, s_out, bias = kind_input_names(w)
        y = g.op("Mul", g.op("MatMul", g.op("Mul", x, s_in), w), s_out)  # out ⊙ ((x ⊙ in) @ W)
        a, b = lora_input_names(w)
        y = g.op("Add", y, g.op("MatMul", g.op("MatMul", x, a), b))  # + (x @ A) @ B
        return g.op("Add", y, bias)

    def head(self, g: _G, x: str) -> None:
        if self.cfg.tied_embeddings:
            super().head(g, x)
        else:
            g.op("Identity", self._kind_slot(g, x, "output.weight"), out="logits")


def save_kinds_graph(cfg: ArchConfig, inits: list[TensorProto], out_dir: Path) -> Path:
    """Write ``model_kinds.onnx`` over the initializers already written for model.onnx."""
    linear = cfg.linear_shapes()
    graph = fused_decoder(cfg, _KindLinears(cfg, linear), inits, f"edgeadapt_{cfg.arch}_kinds")
    f32 = TensorProto.FLOAT
    for w, (o, i) in linear.items():
        s_in, s_out, bias = kind_input_names(w)
        for name, fill, n in ((s_in, 1.0, i), (s_out, 1.0, o), (bias, 0.0, o)):
            graph.initializer.append(onnx.numpy_helper.from_array(np.full((1, 1, n), fill, np.float32), name))
            graph.input.append(helper.make_tensor_value_info(name, f32, None, doc_string=f"float32 [lora_rows, 1, {n}]"))
    path = Path(out_dir) / KINDS_FILE
    save_fused(graph, path)
    return path
