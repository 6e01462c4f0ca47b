"""Build the ONNX graph of an encoder (BERT family) straight from canonical weights (no tracing).

model.onnx contract (opset 17, default-domain operators only)
  inputs   input_ids       int64   [batch, seq]
           attention_mask  int64   [batch, seq]   1 = real token, 0 = pad (either side)
           token_type_ids  int64   [batch, seq]
           + every slot of :mod:`edgeadapt.kinds.slots` (optional: each has its default as an
             initializer of the same name, so the bare graph runs the base unchanged)
  outputs  hidden_states   float32 [batch, seq, dim]   the last layer's token states
           logits          float32 [batch, n_labels]   only for a sequence classifier
                                                       (pooler: tanh(cls @ h[:, 0]), then cls.output)
  Positions are 0…seq-1 for every row (as transformers' BERT); a pad key gets the score
  float32 min, so a pad never changes a real token's state.

Initializers: linear weights ``blk.i.<w>.weight`` stored TRANSPOSED [in, out] (the direct input of
a MatMul); everything else as canonical. All weights live in ``model.onnx.data``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeadapt.formats.encoder_arch import EncoderConfig
from edgeadapt.kinds.slots import NORMS, defaults, ia3_name, lora_names

from edgeadapt.converters.onnx_graphs.ops import NEG, OPSET, _act, _DataWriter, _G, _ln, _weight_table, bottleneck_nodes

DATA_FILE = "model.onnx.data"


class _Enc:
    def __init__(self, cfg: EncoderConfig):
        self.cfg, self.g = cfg, _G()
        d = cfg.dim
        self.ones = self.g.const(np.ones(d, np.float32), np.float32)
        self.zeros = self.g.const(np.zeros(d, np.float32), np.float32)

    def linear(self, x: str, w: str) -> str:
        g = self.g
        base = g.op("Add", g.op("MatMul", x, w), w[: -len("weight")] + "bias")
        a, b = lora_names(w)
        return g.op("Mul", g.op("Add", base, g.op("MatMul", g.op("MatMul", x, a), b)), ia3_name(w))

    def bottleneck(self, i: int, p: str, h: str, t: str) -> str:
        norm = f"blk.{i}.{NORMS[p]}"
        return bottleneck_nodes(self.g, i, p, h, t, self.ones, self.zeros,
                                lambda v: _ln(self.g, v, f"{norm}.weight", f"{norm}.bias", self.cfg.ln_eps))

    def build(self) -> tuple[list, list]:
        cfg, g = self.cfg, self.g
        d, H, hd = cfg.dim, cfg.n_heads, cfg.head_dim
        seq = g.op("Gather", g.op("Shape", "input_ids"), g.const(1), axis=0)
        pos = g.op("Range", g.const(0), seq, g.const(1))  # [S]
        e = g.op("Add", g.op("Add", g.op("Gather", "token_embd.weight", "input_ids"),
                              g.op("Gather", "position_embd.weight", pos)),
                 g.op("Gather", "token_types.weight", "token_type_ids"))
        x = _ln(g, e, "token_embd_norm.weight", "token_embd_norm.bias", cfg.ln_eps)
        keep = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=TensorProto.BOOL), g.const([1, 2]))  # [B,1,1,S]
        bias = g.op("Where", keep, g.const(0.0, np.float32), g.const(NEG, np.float32))
        heads = g.const([0, 0, H, hd])
        for i in range(cfg.n_layers):
            def split(y: str) -> str:  # [B,S,d] -> [B,H,S,hd]
                return g.op("Transpose", g.op("Reshape", y, heads), perm=[0, 2, 1, 3])
            q, k, v = (split(self.linear(x, f"blk.{i}.{w}.weight")) for w in ("attn_q", "attn_k", "attn_v"))
            scores = g.op("Add", g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])),
                                      g.const(1.0 / np.sqrt(hd), np.float32)), bias)
            ctx = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)  # [B,H,S,hd]
            ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3]), g.const([0, 0, d]))
            x = self.bottleneck(i, "attn", self.linear(ctx, f"blk.{i}.attn_output.weight"), x)
            up = _act(g, cfg.act if cfg.act != "gelu_pytorch_tanh" else "gelu_new",
                      self.linear(x, f"blk.{i}.ffn_up.weight"))
            x = self.bottleneck(i, "ffn", self.linear(up, f"blk.{i}.ffn_down.weight"), x)
        g.op("Identity", x, out="hidden_states")
        outputs = [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, ["batch", "seq", d])]
        if cfg.n_labels:
            first = g.op("Gather", x, g.const(0), axis=1)  # [B, d]
            pooled = g.op("Tanh", g.op("Gemm", first, "cls.weight", "cls.bias", transB=1))
            g.op("Gemm", pooled, "cls.output.weight", "cls.output.bias", transB=1, out="logits")
            outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", cfg.n_labels]))
        return outputs, self.slot_inputs()

    def slot_inputs(self) -> list:
        """Each slot as an optional input: its default is an initializer of the same name; a zero-sized
        dim (rank r, bottleneck width m) is a free symbol shared by the slot's parts."""
        ins = []
        for name, a in defaults(self.cfg).items():
            group = name.rsplit(".", 1)[0] if name.startswith("lora.") else ".".join(name.split(".")[:3])
            dims = ["rows"] + [f"{group}:r" if n == 0 else n for n in a.shape[1:]]
            ins.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
            self.g.inits.append(onnx.numpy_helper.from_array(a, name))
        return ins


def build_encoder_onnx(cfg: EncoderConfig, weights: dict[str, np.ndarray], out_dir: Path, progress=None) -> dict:
    """Write ``model.onnx`` + ``model.onnx.data`` into ``out_dir``; return the manifest's weight table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    linear = cfg.linear_shapes()
    writer = _DataWriter(out_dir / DATA_FILE)
    protos = []
    try:
        for name in cfg.tensor_shapes():
            w = np.asarray(weights[name], np.float32)
            protos.append(writer.add(name, w.T if name in linear else w))
    finally:
        writer.close()
    enc = _Enc(cfg)
    outputs, slots = enc.build()
    i64 = TensorProto.INT64
    inputs = [helper.make_tensor_value_info(n, i64, ["batch", "seq"]) for n in ("input_ids", "attention_mask",
                                                                               "token_type_ids")] + slots
    graph = helper.make_graph(enc.g.nodes, f"edgeadapt_{cfg.arch}_encoder", inputs, outputs,
                              initializer=protos + enc.g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgeadapt")
    model.ir_version = 8
    onnx.save_model(model, str(out_dir / "model.onnx"))
    if progress:
        progress("save", 1, 1)
    return _weight_table(out_dir, {n: "in_out" if n in linear else "as_is" for n in cfg.tensor_shapes()})
