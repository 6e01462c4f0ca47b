"""The architecture card of an encoder base (BERT family: BERT, MiniLM, sentence-transformers).

Canonical layout, as for decoders (:mod:`edgeadapt.formats.arch`): llama.cpp's GGUF names for its "bert"
architecture, from gguf's own name map; linear weights float32 ``[out, in]`` (torch orientation);
biases and LayerNorm weights as-is. Per block ``i``:

| GGUF name | shape | Hugging Face module |
|---|---|---|
| blk.i.attn_q / attn_k / attn_v .weight, .bias | [dim, dim], [dim] | attention.self.query / key / value |
| blk.i.attn_output .weight, .bias | [dim, dim], [dim] | attention.output.dense |
| blk.i.attn_output_norm .weight, .bias | [dim] | attention.output.LayerNorm |
| blk.i.ffn_up .weight, .bias | [ffn, dim], [ffn] | intermediate.dense |
| blk.i.ffn_down .weight, .bias | [dim, ffn], [dim] | output.dense |
| blk.i.layer_output_norm .weight, .bias | [dim] | output.LayerNorm |

plus ``token_embd`` [vocab, dim], ``position_embd`` [ctx, dim], ``token_types`` [types, dim],
``token_embd_norm`` (.weight/.bias [dim]) and, for a sequence classifier, ``cls`` (the pooler:
[dim, dim] + tanh) and ``cls.output`` (the classifier: [n_labels, dim]) — llama.cpp's names for
its ranking head. The card says ``family = "encoder"``: the base manifest marks an encoder so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from edgeadapt.errors import FormatError, UnsupportedError

FAMILY = "encoder"
# HF model_type -> GGUF architecture
HF_ENCODER_TYPES = {"bert": "bert"}
ENCODER_ARCHES = ("bert",)
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
POOLINGS = ("mean", "cls")
_BLOCK_LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class EncoderConfig:
    arch: str  # GGUF architecture: "bert"
    n_layers: int
    dim: int
    ffn_dim: int
    n_heads: int
    head_dim: int
    vocab_size: int
    context_length: int = 512
    type_vocab_size: int = 2
    ln_eps: float = 1e-12
    act: str = "gelu"
    n_labels: int = 0  # 0: no classification head
    labels: list[str] = field(default_factory=list)
    problem_type: str | None = None
    pad_token_id: int | None = 0
    pooling: str = "mean"  # how embed() pools token states: "mean" (masked) | "cls"
    normalize: bool = True  # embed() returns unit vectors (sentence-transformers' Normalize)
    max_seq_length: int = 512  # embed() / classify() truncate texts to this many tokens
    family: str = FAMILY
    rope: ClassVar[str] = "none"  # absolute positions: no q/k row permutation
    tied_embeddings: ClassVar[bool] = False

    # ---- derived
    @property
    def n_kv_heads(self) -> int:
        return self.n_heads

    @property
    def eos_token_ids(self) -> list[int]:
        return []

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Every adaptable linear weight: GGUF name -> (out, in)."""
        d, f = self.dim, self.ffn_dim
        per = {"attn_q": (d, d), "attn_k": (d, d), "attn_v": (d, d), "attn_output": (d, d),
               "ffn_up": (f, d), "ffn_down": (d, f)}
        return {f"blk.{i}.{k}.weight": per[k] for i in range(self.n_layers) for k in _BLOCK_LINEAR}

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        d = self.dim
        shapes: dict[str, tuple[int, ...]] = {
            "token_embd.weight": (self.vocab_size, d), "position_embd.weight": (self.context_length, d),
            "token_types.weight": (self.type_vocab_size, d), "token_embd_norm.weight": (d,),
            "token_embd_norm.bias": (d,)}
        for name, (out, inp) in self.linear_shapes().items():
            shapes[name] = (out, inp)
            shapes[name[: -len("weight")] + "bias"] = (out,)
        for i in range(self.n_layers):
            for norm in ("attn_output_norm", "layer_output_norm"):
                shapes[f"blk.{i}.{norm}.weight"] = (d,)
                shapes[f"blk.{i}.{norm}.bias"] = (d,)
        if self.n_labels:
            shapes.update({"cls.weight": (d, d), "cls.bias": (d,), "cls.output.weight": (self.n_labels, d),
                           "cls.output.bias": (self.n_labels,)})
        return shapes

    # ---- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderConfig":
        known = set(cls.__dataclass_fields__)
        missing = [f for f in ("arch", "n_layers", "dim", "ffn_dim", "n_heads", "head_dim", "vocab_size") if f not in d]
        if missing:
            raise FormatError(f"encoder architecture card lacks {missing}; found keys {sorted(d)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_hf(cls, cfg: Any, *, with_head: bool = False) -> "EncoderConfig":
        g = cfg if isinstance(cfg, dict) else cfg.to_dict()
        mt = g.get("model_type")
        if mt not in HF_ENCODER_TYPES:
            raise UnsupportedError(f"encoder model_type {mt!r} is not supported yet; supported: {sorted(HF_ENCODER_TYPES)}")
        act = g.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise UnsupportedError(f"hidden_act {act!r} of this encoder is not supported; supported: {ACTIVATIONS}")
        pet = g.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise UnsupportedError(f"position_embedding_type {pet!r} is not supported (absolute only)")
        n_heads = g["num_attention_heads"]
        if g["hidden_size"] % n_heads:
            raise UnsupportedError(f"hidden_size {g['hidden_size']} is not a multiple of {n_heads} heads")
        id2label = g.get("id2label") or {}
        n_labels = len(id2label) if with_head else 0
        labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n_labels)]
        return cls(arch=HF_ENCODER_TYPES[mt], n_layers=g["num_hidden_layers"], dim=g["hidden_size"],
                   ffn_dim=g["intermediate_size"], n_heads=n_heads, head_dim=g["hidden_size"] // n_heads,
                   vocab_size=g["vocab_size"], context_length=g.get("max_position_embeddings", 512),
                   type_vocab_size=g.get("type_vocab_size", 2), ln_eps=float(g.get("layer_norm_eps", 1e-12)),
                   act=act, n_labels=n_labels, labels=labels, problem_type=g.get("problem_type"),
                   pad_token_id=g.get("pad_token_id"))


def is_encoder_card(d: Any) -> bool:
    return isinstance(d, dict) and d.get("family") == FAMILY


def check_encoder_card(d: dict[str, Any], problems: list[str]) -> None:
    """Validate an encoder card read from a manifest, appending every problem found."""
    if d.get("arch") not in ENCODER_ARCHES:
        problems.append(f"arch.arch: expected one of {list(ENCODER_ARCHES)} for an encoder, found {d.get('arch')!r}")
    for key, lo, hi in (("n_layers", 1, 4096), ("dim", 1, 1 << 17), ("ffn_dim", 1, 1 << 20), ("n_heads", 1, 4096),
                        ("head_dim", 1, 1 << 14), ("vocab_size", 1, 1 << 24), ("context_length", 1, 1 << 20),
                        ("type_vocab_size", 1, 1 << 16), ("n_labels", 0, 1 << 20)):
        v = d.get(key, lo)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            problems.append(f"arch.{key}: expected an integer in {lo}…{hi}, found {v!r}")
    if not problems and d["n_heads"] * d["head_dim"] != d["dim"]:
        problems.append(f"arch: n_heads {d['n_heads']} × head_dim {d['head_dim']} != dim {d['dim']}")
    if d.get("act", "gelu") not in ACTIVATIONS:
        problems.append(f"arch.act: expected one of {ACTIVATIONS}, found {d.get('act')!r}")
    eps = d.get("ln_eps", 1e-12)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 <= eps < 1:
        problems.append(f"arch.ln_eps: expected a number in [0, 1), found {eps!r}")
    if d.get("pooling", "mean") not in POOLINGS:
        problems.append(f"arch.pooling: expected one of {POOLINGS}, found {d.get('pooling')!r}")
    labels = d.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        problems.append(f"arch.labels: expected a list of strings, found {labels!r}")
