"""The architecture card of a base model, and the canonical weight layout.

Canonical layout (used by every export, delta file and engine):
- tensor names are llama.cpp's GGUF names (``blk.3.attn_q.weight``), from gguf's own name map;
- a linear weight is float32 ``[out, in]`` (torch / PEFT orientation, numpy view of a GGUF tensor);
- for architectures whose llama.cpp rope is the "normal" (adjacent-pair) kind, the rows of
  ``attn_q`` and ``attn_k`` are permuted exactly as llama.cpp's converter does, so the GGUF
  file, the ONNX graph and every delta share one layout and nothing is re-permuted at run time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .errors import FormatError, UnsupportedError

# HF ``model_type`` -> (GGUF architecture, rope kind, q/k/v bias)
# rope kind "norm" = llama.cpp LLAMA_ROPE_TYPE_NORM (adjacent pairs, rows permuted at conversion),
# "neox" = halves (HF's rotate_half), rows kept as in HF.
HF_MODEL_TYPES: dict[str, tuple[str, str, bool]] = {
    "llama": ("llama", "norm", False),  # Llama 2/3, SmolLM2, TinyLlama
    "mistral": ("llama", "norm", False),  # llama.cpp converts Mistral as llama
    "qwen2": ("qwen2", "neox", True),  # Qwen2 / Qwen2.5: biases on q, k, v
}
GGUF_ARCHES: dict[str, tuple[str, bool]] = {"llama": ("norm", False), "qwen2": ("neox", True)}


@dataclass(frozen=True)
class ArchConfig:
    arch: str  # GGUF architecture name: "llama" | "qwen2"
    n_layers: int
    dim: int
    ffn_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int = 2048
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    rope: str = "norm"  # "norm" (adjacent pairs, q/k permuted) | "neox" (halves)
    qkv_bias: bool = False
    tied_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    # ---- derived
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Every adaptable linear weight: GGUF name -> (out, in)."""
        d, f, q, kv = self.dim, self.ffn_dim, self.q_dim, self.kv_dim
        per_block = {"attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, q),
                     "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}
        shapes = {f"blk.{i}.{k}.weight": s for i in range(self.n_layers) for k, s in per_block.items()}
        if not self.tied_embeddings:
            shapes["output.weight"] = (self.vocab_size, d)
        return shapes

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the base in canonical layout."""
        shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (self.vocab_size, self.dim),
                                              "output_norm.weight": (self.dim,)}
        shapes.update(self.linear_shapes())
        for i in range(self.n_layers):
            shapes[f"blk.{i}.attn_norm.weight"] = (self.dim,)
            shapes[f"blk.{i}.ffn_norm.weight"] = (self.dim,)
            if self.qkv_bias:
                shapes[f"blk.{i}.attn_q.bias"] = (self.q_dim,)
                shapes[f"blk.{i}.attn_k.bias"] = (self.kv_dim,)
                shapes[f"blk.{i}.attn_v.bias"] = (self.kv_dim,)
        return shapes

    # ---- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ArchConfig":
        known = {f for f in cls.__dataclass_fields__}
        missing = [f for f in ("arch", "n_layers", "dim", "ffn_dim", "n_heads", "n_kv_heads",
                               "head_dim", "vocab_size") if f not in d]
        if missing:
            raise FormatError(f"architecture card lacks {missing}; found keys {sorted(d)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_hf(cls, cfg: Any) -> "ArchConfig":
        """From a transformers config object (or its dict)."""
        g = cfg if isinstance(cfg, dict) else cfg.to_dict()
        mt = g.get("model_type")
        if mt not in HF_MODEL_TYPES:
            raise UnsupportedError(f"model_type {mt!r} is not supported yet; supported: {sorted(HF_MODEL_TYPES)}")
        arch, rope, bias = HF_MODEL_TYPES[mt]
        if g.get("rope_scaling"):
            raise UnsupportedError(f"rope_scaling {g['rope_scaling']!r} is not supported yet (plain rope only)")
        n_heads = g["num_attention_heads"]
        head_dim = g.get("head_dim") or g["hidden_size"] // n_heads
        if head_dim * n_heads != g["hidden_size"]:
            raise UnsupportedError(f"head_dim {head_dim} × heads {n_heads} != hidden_size {g['hidden_size']}")
        if mt == "llama" and g.get("attention_bias") or g.get("mlp_bias"):
            raise UnsupportedError("attention_bias / mlp_bias on a llama model is not supported yet")
        eos = g.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        theta = g.get("rope_theta")
        if theta is None:  # newer transformers keep it in rope_parameters
            theta = (g.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(arch=arch, n_layers=g["num_hidden_layers"], dim=g["hidden_size"],
                   ffn_dim=g["intermediate_size"], n_heads=n_heads,
                   n_kv_heads=g.get("num_key_value_heads") or n_heads, head_dim=head_dim,
                   vocab_size=g["vocab_size"], context_length=g.get("max_position_embeddings", 2048),
                   rope_theta=float(theta), rms_eps=float(g.get("rms_norm_eps", 1e-6)), rope=rope,
                   qkv_bias=bias, tied_embeddings=bool(g.get("tie_word_embeddings", False)),
                   bos_token_id=g.get("bos_token_id"), eos_token_ids=eos, pad_token_id=g.get("pad_token_id"))

    @classmethod
    def from_gguf(cls, reader: Any) -> "ArchConfig":
        """From a ``gguf.GGUFReader`` of a base model file."""
        f = reader.fields

        def get(key: str, default: Any = KeyError) -> Any:
            if key in f:
                return f[key].contents()
            if default is KeyError:
                raise FormatError(f"GGUF base lacks the key {key!r}")
            return default

        arch = get("general.architecture")
        if arch not in GGUF_ARCHES:
            raise UnsupportedError(f"GGUF architecture {arch!r} is not supported yet; supported: {sorted(GGUF_ARCHES)}")
        rope, bias = GGUF_ARCHES[arch]
        dim = int(get(f"{arch}.embedding_length"))
        n_heads = int(get(f"{arch}.attention.head_count"))
        names = {t.name for t in reader.tensors}
        vocab = get(f"{arch}.vocab_size", None)
        if vocab is None:
            vocab = len(f["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in f else None
        head_dim = int(get(f"{arch}.rope.dimension_count", dim // n_heads))
        eos = get("tokenizer.ggml.eos_token_id", None)
        eot = get("tokenizer.ggml.eot_token_id", None)
        eos_ids = [int(x) for x in (eos, eot) if x is not None]
        bos = get("tokenizer.ggml.bos_token_id", None)
        pad = get("tokenizer.ggml.padding_token_id", None)
        return cls(arch=arch, n_layers=int(get(f"{arch}.block_count")), dim=dim,
                   ffn_dim=int(get(f"{arch}.feed_forward_length")), n_heads=n_heads,
                   n_kv_heads=int(get(f"{arch}.attention.head_count_kv", n_heads)), head_dim=head_dim,
                   vocab_size=int(vocab), context_length=int(get(f"{arch}.context_length", 2048)),
                   rope_theta=float(get(f"{arch}.rope.freq_base", 10000.0)),
                   rms_eps=float(get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)), rope=rope,
                   qkv_bias=bias, tied_embeddings="output.weight" not in names,
                   bos_token_id=None if bos is None else int(bos), eos_token_ids=eos_ids,
                   pad_token_id=None if pad is None else int(pad))


# ---- llama.cpp's q/k row permutation (its converter's LlamaModel.permute)
def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF half-split rotary rows -> llama.cpp adjacent-pair rows. ``w`` is [out, ...]; rows move."""
    out = w.shape[0]
    return w.reshape(n_heads, 2, out // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_heads(cfg: ArchConfig, gguf_name: str) -> int | None:
    """How many heads to permute a tensor's rows over, or None when it is not permuted."""
    if cfg.rope != "norm":
        return None
    if ".attn_q." in gguf_name:
        return cfg.n_heads
    if ".attn_k." in gguf_name:
        return cfg.n_kv_heads
    return None
