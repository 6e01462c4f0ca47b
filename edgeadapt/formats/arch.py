"""The architecture card of a base model, and the canonical weight layout.

Canonical layout (used by every export, delta file and engine):
- tensor names are llama.cpp's GGUF names (``blk.3.attn_q.weight``), from gguf's own name map;
- a linear weight is float32 ``[out, in]`` (torch / PEFT orientation, numpy view of a GGUF tensor);
- for architectures whose llama.cpp rope is the "normal" (adjacent-pair) kind, the rows of
  ``attn_q`` and ``attn_k`` are permuted exactly as llama.cpp's converter does, so the GGUF
  file, the ONNX graph and every delta share one layout and nothing is re-permuted at run time;
- norm weights are stored as the norm multiplies by them: Gemma's ``(1 + w)`` is folded in, as
  llama.cpp's converter folds it, so every engine computes ``x̂ · w``;
- GPT-2's Conv1D weights (``[in, out]`` in Hugging Face) are transposed to ``[out, in]``, and its
  fused ``c_attn`` is the single linear ``attn_qkv`` (q | k | v rows), as llama.cpp stores it.

Families (``ArchConfig.arch`` = the GGUF architecture):
  llama   Llama, SmolLM2, Mistral (a sliding window, when set, on every layer); Llama 3.x rope
          scaling ("llama3") as per-frequency divisors ``rope_freqs``, llama.cpp's rope_freqs.weight
  qwen2   Qwen2 / Qwen2.5 (q/k/v biases, "neox" rope)
  qwen3   Qwen3 dense decoders: Qwen2's layout without the q/k/v biases, an RMS norm over each head
          of q and k before rope (plain ``w``), head_dim given by the config (q_dim may differ from dim)
  gemma3  Gemma 3 text decoder: (1+w) RMS norms, √dim-scaled embeddings, GELU-tanh gated FFN,
          q/k RMS norm per head, post-attention / post-FFN norms, query_pre_attn_scalar,
          sliding-window layers with their own rope base, linear rope scaling on the global
          layers, tied head, optional final logit softcapping
  smollm3 SmolLM3: the llama layout ("norm" rope, q/k permuted, tied head) with NoPE layers: every
          4th layer (``nope_layers``, llama.cpp's fixed no_rope_layer_step 4) applies no rope at all
  gpt2    GPT-2: LayerNorm with bias, learned positions, fused qkv, GELU-tanh FFN, biases
          on every linear, tied head
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgeadapt.errors import FormatError, UnsupportedError

# HF ``model_type`` -> (GGUF architecture, rope kind, q/k/v bias)
# rope kind "norm" = llama.cpp LLAMA_ROPE_TYPE_NORM (adjacent pairs, rows permuted at conversion),
# "neox" = halves (HF's rotate_half), rows kept as in HF; "none" = no rope (learned positions).
HF_MODEL_TYPES: dict[str, tuple[str, str, bool]] = {
    "llama": ("llama", "norm", False),  # Llama 2/3, SmolLM2, TinyLlama
    "mistral": ("llama", "norm", False),  # llama.cpp converts Mistral as llama
    "qwen2": ("qwen2", "neox", True),  # Qwen2 / Qwen2.5: biases on q, k, v
    "qwen3": ("qwen3", "neox", False),  # Qwen3ForCausalLM: no biases, q/k RMS norm per head
    "smollm3": ("smollm3", "norm", False),  # SmolLM3ForCausalLM: llama with NoPE layers (llama.cpp permutes q/k)
    "gemma3_text": ("gemma3", "neox", False),  # Gemma3ForCausalLM (the text decoder of Gemma 3)
    "gpt2": ("gpt2", "none", False),  # GPT2LMHeadModel
}
GGUF_ARCHES: dict[str, tuple[str, bool]] = {"llama": ("norm", False), "qwen2": ("neox", True), "qwen3": ("neox", False),
                                            "smollm3": ("norm", False), "gemma3": ("neox", False),
                                            "gpt2": ("none", False)}
# architectures whose Hugging Face linear layers are Conv1D ([in, out]; PEFT's fan_in_fan_out)
CONV1D_ARCHES = frozenset({"gpt2"})
GEMMA3_SWA_PATTERN = 6  # llama.cpp's gemma3 default: every 6th layer is global, the others windowed
SMOLLM3_NOPE_STEP = 4  # llama.cpp's smollm3: layer i applies no rope when (i + 1) % 4 == 0 (no GGUF key sets it)


def smollm3_nope_layers(n_layers: int) -> list[int]:
    """The layers llama.cpp's smollm3 graph runs without rope (its n_no_rope_layer_step, fixed at 4)."""
    return [i for i in range(n_layers) if (i + 1) % SMOLLM3_NOPE_STEP == 0]


@dataclass(frozen=True)
class ArchConfig:
    arch: str  # GGUF architecture name: "llama" | "qwen2" | "qwen3" | "smollm3" | "gemma3" | "gpt2"
    n_layers: int
    dim: int
    ffn_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int = 2048
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5  # the norm epsilon (LayerNorm's too, for "layer" norms)
    rope: str = "norm"  # "norm" (adjacent pairs, q/k permuted) | "neox" (halves) | "none"
    qkv_bias: bool = False
    tied_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    # ---- per-family features (the defaults are the llama family's)
    norm: str = "rms"  # "rms" | "layer" (LayerNorm with a bias, GPT-2)
    act: str = "silu"  # FFN activation: "silu" | "gelu_tanh"
    gated_ffn: bool = True  # down(act(gate)·up); False: down(act(up)) (GPT-2)
    fused_qkv: bool = False  # one attn_qkv linear, rows q | k | v (GPT-2)
    linear_bias: bool = False  # every block linear and every norm has a bias (GPT-2)
    qk_norm: bool = False  # RMS norm over each head of q and k, before rope (Qwen3, Gemma 3)
    post_norms: bool = False  # post_attention_norm / post_ffw_norm before each residual add (Gemma 3)
    learned_pos: bool = False  # position_embd [context_length, dim] added to the embedding (GPT-2)
    embed_scale: float = 1.0  # token embeddings are multiplied by this (Gemma: √dim)
    attn_scale: float | None = None  # attention logit scale; None = 1/√head_dim
    rope_scale: float = 1.0  # linear rope scaling factor (angle = pos/factor · inv_freq), full-attention layers
    rope_freqs: list[float] | None = None  # Llama 3.x rope scaling: inv_freq[i] is divided by rope_freqs[i]
    #                                        ([head_dim/2], llama.cpp's rope_freqs.weight), full-attention layers
    rope_theta_swa: float | None = None  # rope base of the sliding-window layers (None: rope_theta)
    sliding_window: int | None = None  # on windowed layers a query sees keys at distance < this
    swa_layers: list[int] | None = None  # the windowed layers (None: all, when sliding_window is set)
    final_softcap: float | None = None  # logits = c·tanh(logits / c)
    nope_layers: list[int] | None = None  # layers that apply no rope to q and k (SmolLM3's NoPE layers)

    # ---- derived
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def scale(self) -> float:
        """The attention logit scale."""
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (None: full attention)."""
        if self.sliding_window is None or (self.swa_layers is not None and layer not in self.swa_layers):
            return None
        return self.sliding_window

    def uses_rope(self, layer: int) -> bool:
        """Whether ``layer`` rotates q and k (False without rope, and on the NoPE layers)."""
        return self.rope != "none" and (self.nope_layers is None or layer not in self.nope_layers)

    def local_rope(self, layer: int) -> bool:
        """Whether ``layer`` is a windowed layer with its own rope base (Gemma 3's local layers)."""
        return self.rope_theta_swa is not None and self.window(layer) is not None

    def rope_inv_freq(self, layer: int | None = None) -> np.ndarray:
        """float32 [head_dim/2]: the rope frequencies of ``layer`` (None: a full-attention layer) in
        transformers' float32 arithmetic, theta^(-2i/head_dim), divided by the layer's linear factor and,
        on the layers that use rope_theta, by ``rope_freqs[i]`` (Llama 3.x scaling, as llama.cpp divides
        by rope_freqs.weight)."""
        local = layer is not None and self.local_rope(layer)
        theta, factor = (self.rope_theta_swa, 1.0) if local else (self.rope_theta, self.rope_scale)
        inv = rope_inv_freq(self.head_dim, theta, factor)
        if self.rope_freqs is not None and not local:
            inv = (inv / np.asarray(self.rope_freqs, np.float32)).astype(np.float32)
        return inv

    def block_linears(self) -> tuple[str, ...]:
        """The linear kinds of one block (GGUF names without ``blk.i.`` / ``.weight``)."""
        attn = ("attn_qkv",) if self.fused_qkv else ("attn_q", "attn_k", "attn_v")
        ffn = ("ffn_gate", "ffn_up", "ffn_down") if self.gated_ffn else ("ffn_up", "ffn_down")
        return attn + ("attn_output",) + ffn

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Every adaptable linear weight: GGUF name -> (out, in)."""
        d, f, q, kv = self.dim, self.ffn_dim, self.q_dim, self.kv_dim
        all_kinds = {"attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_qkv": (q + 2 * kv, d),
                     "attn_output": (d, q), "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}
        per_block = {k: all_kinds[k] for k in self.block_linears()}
        shapes = {f"blk.{i}.{k}.weight": s for i in range(self.n_layers) for k, s in per_block.items()}
        if not self.tied_embeddings:
            shapes["output.weight"] = (self.vocab_size, d)
        return shapes

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the base in canonical layout."""
        d = self.dim
        shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (self.vocab_size, d),
                                              "output_norm.weight": (d,)}
        if self.learned_pos:
            shapes["position_embd.weight"] = (self.context_length, d)
        if self.linear_bias:
            shapes["output_norm.bias"] = (d,)
        linear = self.linear_shapes()
        shapes.update(linear)
        for i in range(self.n_layers):
            p = f"blk.{i}"
            norms = ["attn_norm", "ffn_norm"] + (["post_attention_norm", "post_ffw_norm"] if self.post_norms else [])
            for n in norms:
                shapes[f"{p}.{n}.weight"] = (d,)
                if self.linear_bias:
                    shapes[f"{p}.{n}.bias"] = (d,)
            if self.qk_norm:
                shapes[f"{p}.attn_q_norm.weight"] = (self.head_dim,)
                shapes[f"{p}.attn_k_norm.weight"] = (self.head_dim,)
            if self.qkv_bias:
                shapes[f"{p}.attn_q.bias"] = (self.q_dim,)
                shapes[f"{p}.attn_k.bias"] = (self.kv_dim,)
                shapes[f"{p}.attn_v.bias"] = (self.kv_dim,)
            if self.linear_bias:
                for k in self.block_linears():
                    shapes[f"{p}.{k}.bias"] = (linear[f"{p}.{k}.weight"][0],)
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
            hint = " (export the text decoder, Gemma3ForCausalLM)" if mt == "gemma3" else ""
            raise UnsupportedError(f"model_type {mt!r} is not supported yet{hint}; supported: {sorted(HF_MODEL_TYPES)}")
        if mt == "gpt2":
            return _from_hf_gpt2(g)
        arch, rope, bias = HF_MODEL_TYPES[mt]
        n_heads = g["num_attention_heads"]
        head_dim = g.get("head_dim") or g["hidden_size"] // n_heads
        if mt not in ("gemma3_text", "qwen3") and head_dim * n_heads != g["hidden_size"]:
            raise UnsupportedError(f"head_dim {head_dim} × heads {n_heads} != hidden_size {g['hidden_size']}")
        if mt in ("llama", "mistral") and g.get("attention_bias") or g.get("mlp_bias"):
            raise UnsupportedError("attention_bias / mlp_bias on a llama model is not supported yet")
        eos = g.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        common = dict(arch=arch, n_layers=g["num_hidden_layers"], dim=g["hidden_size"],
                      ffn_dim=g["intermediate_size"], n_heads=n_heads,
                      n_kv_heads=g.get("num_key_value_heads") or n_heads, head_dim=head_dim,
                      vocab_size=g["vocab_size"], context_length=g.get("max_position_embeddings", 2048),
                      rms_eps=float(g.get("rms_norm_eps", 1e-6)), rope=rope, qkv_bias=bias,
                      tied_embeddings=bool(g.get("tie_word_embeddings", mt == "gemma3_text")),
                      bos_token_id=g.get("bos_token_id"), eos_token_ids=eos, pad_token_id=g.get("pad_token_id"))
        if mt == "gemma3_text":
            return _from_hf_gemma3(g, common)
        if mt == "qwen3":
            return _from_hf_qwen3(g, common)
        if mt == "smollm3":
            return _from_hf_smollm3(g, common)
        rp = _rope_params(g, None)
        freqs = None
        if (rp.get("rope_type", rp.get("type")) or "") == "llama3":  # Llama 3.1 / 3.2 / 3.3
            if arch != "llama":  # llama.cpp reads rope_freqs.weight in its llama graph only
                raise UnsupportedError(f"{mt}: rope_scaling {rp!r} (llama3) is supported on the llama family only")
            theta = float(rp.get("rope_theta", g.get("rope_theta") or 10000.0))
            scale, freqs = 1.0, llama3_rope_freqs(rp, theta, head_dim)
        else:
            theta, scale = _rope_of(rp, g.get("rope_theta"), 10000.0)
        window = g.get("sliding_window") if g.get("use_sliding_window", True) else None
        types = set(g.get("layer_types") or [])  # Qwen2: windowed from layer max_window_layers on
        if window is not None and types == {"full_attention"}:
            window = None
        elif window is not None and len(types) > 1:
            raise UnsupportedError(f"{mt}: sliding_window on some layers only (layer_types {g['layer_types']!r}, "
                                   f"max_window_layers {g.get('max_window_layers')!r}) is not supported; "
                                   "the window is supported on every layer or none")
        if window is not None and (not isinstance(window, int) or window < 1):
            raise UnsupportedError(f"sliding_window {window!r}: expected a positive integer or null")
        return cls(**common, rope_theta=theta, rope_scale=scale, rope_freqs=freqs, sliding_window=window)

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
        head_dim = int(get(f"{arch}.attention.key_length", get(f"{arch}.rope.dimension_count", dim // n_heads)))
        v_dim = int(get(f"{arch}.attention.value_length", head_dim))
        if v_dim != head_dim:
            raise UnsupportedError(f"GGUF {arch}: attention.value_length {v_dim} != key_length {head_dim} is not supported")
        rope_dims = int(get(f"{arch}.rope.dimension_count", head_dim))
        if rope != "none" and rope_dims != head_dim:
            raise UnsupportedError(f"GGUF {arch}: partial rope (rope.dimension_count {rope_dims} of head_dim "
                                   f"{head_dim}) is not supported")
        eos = get("tokenizer.ggml.eos_token_id", None)
        eot = get("tokenizer.ggml.eot_token_id", None)
        eos_ids = [int(x) for x in (eos, eot) if x is not None]
        bos = get("tokenizer.ggml.bos_token_id", None)
        pad = get("tokenizer.ggml.padding_token_id", None)
        n_layers = int(get(f"{arch}.block_count"))
        scaling = get(f"{arch}.rope.scaling.type", "none")
        if scaling not in ("none", "", "linear"):
            raise UnsupportedError(f"GGUF rope scaling {scaling!r} is not supported yet (plain or linear rope only)")
        factor = float(get(f"{arch}.rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0
        window = get(f"{arch}.attention.sliding_window", None)
        softcap = get(f"{arch}.final_logit_softcapping", None)
        kw: dict[str, Any] = dict(
            rope_theta=float(get(f"{arch}.rope.freq_base", 10000.0)), rope_scale=factor,
            rope_freqs=_gguf_rope_freqs(reader, arch, head_dim),
            rms_eps=float(get(f"{arch}.attention.layer_norm_rms_epsilon",
                              get(f"{arch}.attention.layer_norm_epsilon", 1e-5))),
            sliding_window=None if window is None else int(window),
            final_softcap=None if softcap is None else float(softcap))
        if arch == "gemma3":
            pattern = get(f"{arch}.attention.sliding_window_pattern", GEMMA3_SWA_PATTERN)
            swa = ([i for i, w in enumerate(pattern) if w] if isinstance(pattern, list)
                   else [i for i in range(n_layers) if i % int(pattern) < int(pattern) - 1])
            # llama.cpp's gemma3: 1/√head_dim, except the 27B (62 layers): 1/√(dim/heads)
            default_scale = (dim // n_heads) ** -0.5 if n_layers == 62 else head_dim ** -0.5
            kw.update(norm="rms", act="gelu_tanh", qk_norm=True, post_norms=True, embed_scale=float(dim ** 0.5),
                      attn_scale=float(get(f"{arch}.attention.scale", default_scale)),
                      rope_theta_swa=float(get(f"{arch}.rope.freq_base_swa", 10000.0)), swa_layers=swa)
        elif arch == "qwen3":
            if window is not None:  # llama.cpp's qwen3 has no sliding window: a file that sets one is not ours
                raise UnsupportedError(f"GGUF qwen3 with {arch}.attention.sliding_window = {window} is not supported "
                                       "(Qwen3 runs full attention on every layer)")
            kw.update(qk_norm=True)
        elif arch == "smollm3":
            if window is not None:  # llama.cpp's smollm3 has no sliding window
                raise UnsupportedError(f"GGUF smollm3 with {arch}.attention.sliding_window = {window} is not supported "
                                       "(llama.cpp's smollm3 runs full attention on every layer)")
            kw.update(nope_layers=smollm3_nope_layers(n_layers))
        elif arch == "gpt2":
            kw.update(norm="layer", act="gelu_tanh", gated_ffn=False, fused_qkv=True, linear_bias=True,
                      learned_pos=True)
        return cls(arch=arch, n_layers=n_layers, dim=dim,
                   ffn_dim=int(get(f"{arch}.feed_forward_length")), n_heads=n_heads,
                   n_kv_heads=int(get(f"{arch}.attention.head_count_kv", n_heads)), head_dim=head_dim,
                   vocab_size=int(vocab), context_length=int(get(f"{arch}.context_length", 2048)), rope=rope,
                   qkv_bias=bias, tied_embeddings="output.weight" not in names,
                   bos_token_id=None if bos is None else int(bos), eos_token_ids=eos_ids,
                   pad_token_id=None if pad is None else int(pad), **kw)


def _gguf_rope_freqs(reader: Any, arch: str, head_dim: int) -> list[float] | None:
    """The per-frequency rope divisors of a GGUF (llama.cpp's rope_freqs.weight, Llama 3.x), checked."""
    from edgeadapt.formats.gguf_constants import C
    from edgeadapt.formats.names import ROPE_FREQS as name

    t = next((t for t in reader.tensors if t.name == name), None)
    if t is None:
        return None
    if arch != "llama":
        raise UnsupportedError(f"GGUF {arch} with {name} (per-frequency rope scaling) is not supported "
                               "(Llama 3.x rope scaling on the llama family only)")
    strict = hasattr(reader, "view")  # edgeadapt.formats.gguf_file's reader, else gguf.GGUFReader
    ttype, shape = (t.ttype if strict else t.tensor_type), [int(x) for x in t.shape]
    if ttype != C.GGMLQuantizationType.F32 or shape != [head_dim // 2]:
        raise FormatError(f"GGUF {name}: expected F32 [{head_dim // 2}] (head_dim / 2), found "
                          f"{C.GGMLQuantizationType(ttype).name} {shape}")
    freqs = np.asarray(reader.view(t) if strict else t.data, np.float32).reshape(-1)
    if not (np.isfinite(freqs).all() and (freqs > 0).all()):
        raise FormatError(f"GGUF {name}: expected positive finite divisors, found {freqs.tolist()}")
    return [float(x) for x in freqs]


# ---- validation of a card read from a manifest (hostile until checked)
_FEATURES: dict[str, tuple] = {"rope": ("norm", "neox", "none"), "norm": ("rms", "layer"), "act": ("silu", "gelu_tanh")}
_FLAGS = ("gated_ffn", "fused_qkv", "linear_bias", "qk_norm", "post_norms", "learned_pos")


def check_features(d: dict[str, Any], problems: list[str]) -> None:
    """Append to ``problems`` what is wrong with the per-family fields of a card dict."""
    for key, allowed in _FEATURES.items():
        if key in d and d[key] not in allowed:
            problems.append(f"arch.{key}: expected one of {list(allowed)}, found {d[key]!r}")
    for key in _FLAGS:
        if key in d and not isinstance(d[key], bool):
            problems.append(f"arch.{key}: expected true or false, found {d[key]!r}")

    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0

    for key, optional in (("embed_scale", False), ("rope_scale", False), ("attn_scale", True),
                          ("rope_theta_swa", True), ("final_softcap", True)):
        if key in d and not (optional and d[key] is None) and not number(d[key]):
            problems.append(f"arch.{key}: expected a positive finite number{' or null' if optional else ''}, "
                            f"found {d[key]!r}")
    freqs, hd = d.get("rope_freqs"), d.get("head_dim")
    if freqs is not None:
        half = hd // 2 if isinstance(hd, int) and not isinstance(hd, bool) else None
        if not (isinstance(freqs, list) and len(freqs) == half and all(number(x) for x in freqs)):
            problems.append(f"arch.rope_freqs: expected null or a list of head_dim/2 = {half} positive finite numbers, "
                            f"found {freqs!r}"[:300])
        elif d.get("arch") != "llama" or d.get("rope", "norm") == "none":
            problems.append(f"arch.rope_freqs: Llama 3.x rope scaling is for the llama family with rope, found arch "
                            f"{d.get('arch')!r}, rope {d.get('rope', 'norm')!r}")
    nope, n = d.get("nope_layers"), d.get("n_layers")
    if d.get("arch") == "smollm3":  # the GGUF cannot say otherwise: llama.cpp fixes the NoPE layers
        want = smollm3_nope_layers(n) if isinstance(n, int) and not isinstance(n, bool) and 0 < n < 1 << 16 else None
        if nope != want:
            problems.append(f"arch.nope_layers: expected {want} for smollm3 (every {SMOLLM3_NOPE_STEP}th layer, "
                            f"as llama.cpp runs it), found {nope!r}"[:300])
    elif nope is not None:
        problems.append(f"arch.nope_layers: NoPE layers are a smollm3 feature, found {nope!r} on arch "
                        f"{d.get('arch')!r}"[:300])
    w = d.get("sliding_window")
    if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1):
        problems.append(f"arch.sliding_window: expected a positive integer or null, found {w!r}")
    layers = d.get("swa_layers")
    n = d.get("n_layers")
    if layers is not None and not (isinstance(layers, list) and all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < (n if isinstance(n, int) else 0) for i in layers)):
        problems.append(f"arch.swa_layers: expected a list of layer indices below n_layers or null, found {layers!r}")


# ---- Hugging Face config readers of the non-llama families
def _rope_params(g: dict[str, Any], layer_type: str | None) -> dict[str, Any]:
    """The rope parameters of a config: transformers ≥ 5 keeps them in ``rope_parameters`` (per layer
    type for Gemma 3), older versions in ``rope_theta`` / ``rope_scaling``."""
    rp = g.get("rope_parameters") or {}
    if layer_type is not None and isinstance(rp.get(layer_type), dict):
        rp = rp[layer_type]
    elif layer_type is not None and any(isinstance(v, dict) for v in rp.values()):
        rp = {}
    if not rp and g.get("rope_scaling"):
        rp = dict(g["rope_scaling"])
    return rp


def _rope_of(rp: dict[str, Any], theta: Any, default: float) -> tuple[float, float]:
    """(base, linear factor) of one set of rope parameters; anything but default / linear is refused."""
    kind = rp.get("rope_type", rp.get("type", "default")) or "default"
    if kind not in ("default", "linear"):
        raise UnsupportedError(f"rope_scaling {rp!r} is not supported yet (plain or linear rope; llama3 on the "
                               "llama family)")
    base = rp.get("rope_theta", theta if theta is not None else default)
    return float(base), float(rp.get("factor", 1.0)) if kind == "linear" else 1.0


def _from_hf_gemma3(g: dict[str, Any], common: dict[str, Any]) -> ArchConfig:
    if g.get("attn_logit_softcapping"):
        raise UnsupportedError(f"gemma3: attn_logit_softcapping={g['attn_logit_softcapping']!r} is not supported yet")
    act = g.get("hidden_activation") or g.get("hidden_act")
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise UnsupportedError(f"gemma3: hidden_activation {act!r} is not supported (gelu_pytorch_tanh only)")
    n = common["n_layers"]
    types = g.get("layer_types")
    if not types:
        pattern = g.get("sliding_window_pattern") or g.get("_sliding_window_pattern") or GEMMA3_SWA_PATTERN
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    if len(types) != n or set(types) - {"full_attention", "sliding_attention"}:
        raise UnsupportedError(f"gemma3: layer_types {types!r}: expected {n} of full_attention / sliding_attention")
    theta, scale = _rope_of(_rope_params(g, "full_attention"), g.get("rope_theta"), 1_000_000.0)
    local = _rope_params(g, "sliding_attention") if isinstance((g.get("rope_parameters") or {}).get(
        "sliding_attention"), dict) else {"rope_theta": g.get("rope_local_base_freq", 10000.0)}
    theta_swa, scale_swa = _rope_of(local, None, 10000.0)
    if scale_swa != 1.0:
        raise UnsupportedError(f"gemma3: rope scaling on the sliding-window layers ({local!r}) is not supported")
    softcap = g.get("final_logit_softcapping")
    return ArchConfig(**common, rope_theta=theta, rope_scale=scale, norm="rms", act="gelu_tanh", qk_norm=True,
                      post_norms=True, embed_scale=float(g["hidden_size"] ** 0.5),
                      attn_scale=float(g.get("query_pre_attn_scalar") or common["head_dim"]) ** -0.5,
                      rope_theta_swa=theta_swa, sliding_window=g.get("sliding_window"),
                      swa_layers=[i for i, t in enumerate(types) if t == "sliding_attention"],
                      final_softcap=None if softcap is None else float(softcap))


def _from_hf_qwen3(g: dict[str, Any], common: dict[str, Any]) -> ArchConfig:
    """Qwen3: full attention everywhere, no biases, SiLU; what else a config can switch on is refused by name."""
    problems = []
    if g.get("attention_bias"):
        problems.append(f"attention_bias={g['attention_bias']!r} is not supported (Qwen3 has no q/k/v/o biases)")
    types = g.get("layer_types") or []
    if g.get("use_sliding_window") or "sliding_attention" in types:
        problems.append(f"use_sliding_window={g.get('use_sliding_window')!r} (layer_types {types!r}) is not supported: "
                        "llama.cpp's qwen3 runs full attention on every layer")
    if set(types) - {"full_attention", "sliding_attention"}:
        problems.append(f"layer_types {types!r}: expected full_attention only")
    act = g.get("hidden_act", "silu")
    if act != "silu":
        problems.append(f"hidden_act {act!r} is not supported (silu only)")
    if problems:
        raise UnsupportedError("qwen3: " + "; ".join(problems))
    theta, scale = _rope_of(_rope_params(g, None), g.get("rope_theta"), 10000.0)
    return ArchConfig(**common, rope_theta=theta, rope_scale=scale, qk_norm=True)


def _from_hf_smollm3(g: dict[str, Any], common: dict[str, Any]) -> ArchConfig:
    """SmolLM3: llama with NoPE layers. llama.cpp fixes those at every 4th layer, so any other
    ``no_rope_layers`` is refused by name, as is what its smollm3 graph does not run."""
    problems = []
    for key in ("attention_bias", "mlp_bias"):
        if g.get(key):
            problems.append(f"{key}={g[key]!r} is not supported")
    types = g.get("layer_types") or []
    if g.get("use_sliding_window") or set(types) - {"full_attention"}:
        problems.append(f"use_sliding_window={g.get('use_sliding_window')!r} (layer_types {types!r}) is not supported: "
                        "llama.cpp's smollm3 runs full attention on every layer")
    act = g.get("hidden_act", "silu")
    if act != "silu":
        problems.append(f"hidden_act {act!r} is not supported (silu only)")
    n = common["n_layers"]
    flags = g.get("no_rope_layers")
    if flags is None:
        step = g.get("no_rope_layer_interval", SMOLLM3_NOPE_STEP)
        flags = [int((i + 1) % step != 0) for i in range(n)] if isinstance(step, int) and step > 0 else None
    nope = ([i for i, f in enumerate(flags[:n]) if not f]
            if isinstance(flags, list) and len(flags) >= n and all(f in (0, 1) for f in flags) else None)
    if nope != smollm3_nope_layers(n):
        problems.append(f"no_rope_layers {flags!r} (no_rope_layer_interval {g.get('no_rope_layer_interval')!r}) "
                        f"is not supported: llama.cpp's smollm3 skips rope on every {SMOLLM3_NOPE_STEP}th layer "
                        f"exactly (layers {smollm3_nope_layers(n)})"[:400])
    if problems:
        raise UnsupportedError("smollm3: " + "; ".join(problems))
    rp = _rope_params(g, None)
    if (rp.get("rope_type", rp.get("type")) or "") == "llama3":  # llama.cpp's smollm3 graph reads no rope_freqs
        raise UnsupportedError(f"smollm3: rope_scaling {rp!r} (llama3) is not supported (plain or linear rope)")
    theta, scale = _rope_of(rp, g.get("rope_theta"), 10000.0)
    return ArchConfig(**common, rope_theta=theta, rope_scale=scale, nope_layers=nope)


def _from_hf_gpt2(g: dict[str, Any]) -> ArchConfig:
    problems = [f"{k}={g[k]!r} is not supported" for k, ok in (("scale_attn_by_inverse_layer_idx", False),
                                                                 ("reorder_and_upcast_attn", False),
                                                                 ("scale_attn_weights", True)) if k in g and g[k] != ok]
    act = g.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function {act!r} is not supported (gelu_new only)")
    if problems:
        raise UnsupportedError("gpt2: " + "; ".join(problems))
    dim, n_heads = g["n_embd"], g["n_head"]
    eos = g.get("eos_token_id")
    return ArchConfig(arch="gpt2", n_layers=g["n_layer"], dim=dim, ffn_dim=g.get("n_inner") or 4 * dim,
                      n_heads=n_heads, n_kv_heads=n_heads, head_dim=dim // n_heads, vocab_size=g["vocab_size"],
                      context_length=g.get("n_positions", 1024), rms_eps=float(g.get("layer_norm_epsilon", 1e-5)),
                      rope="none", tied_embeddings=bool(g.get("tie_word_embeddings", True)),
                      bos_token_id=g.get("bos_token_id"), eos_token_ids=[] if eos is None else [eos],
                      pad_token_id=g.get("pad_token_id"), norm="layer", act="gelu_tanh", gated_ffn=False,
                      fused_qkv=True, linear_bias=True, learned_pos=True)


# ---- rope frequencies
def rope_inv_freq(head_dim: int, theta: float, factor: float = 1.0) -> np.ndarray:
    """float32 [head_dim/2]: 1 / theta^(2i/head_dim) as transformers computes it (float32 exponents, the power
    rounded to float32, a float32 reciprocal: torch's bits but for ~0.5% one ulp off, where a float32 power
    is ~13% off), divided by a linear scaling ``factor``."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)  # [hd/2]
    inv = (np.float32(1.0) / (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)).astype(np.float32)
    return (inv / np.float32(factor)).astype(np.float32) if factor != 1.0 else inv


LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def llama3_rope_freqs(rp: dict[str, Any], theta: float, head_dim: int) -> list[float]:
    """The per-frequency divisors of Llama 3.x rope scaling ([head_dim/2], float32 values), computed as
    llama.cpp's converter writes rope_freqs.weight; ``inv_freq / divisor`` is transformers' llama3 inv_freq:
    wavelengths under original_max / high_freq_factor keep their frequency, those over original_max /
    low_freq_factor are divided by ``factor``, those between are interpolated smoothly."""
    missing = [k for k in LLAMA3_KEYS if not isinstance(rp.get(k), (int, float)) or isinstance(rp.get(k), bool)]
    if missing:
        raise UnsupportedError(f"rope_scaling {rp!r}: llama3 rope needs numbers for {list(LLAMA3_KEYS)}; "
                               f"missing or not a number: {missing}")
    factor, low, high, old = (float(rp[k]) for k in LLAMA3_KEYS)
    if not (math.isfinite(factor) and factor > 0 and 0 < low < high and math.isfinite(high) and old > 0):
        raise UnsupportedError(f"rope_scaling {rp!r}: llama3 rope needs factor > 0, 0 < low_freq_factor < "
                               "high_freq_factor and original_max_position_embeddings > 0")
    f32 = np.float32
    inv = rope_inv_freq(head_dim, theta)  # [hd/2]
    wavelen = (f32(2 * math.pi) / inv).astype(f32)
    smooth = ((f32(old) / wavelen - f32(low)) / f32(high - low)).astype(f32)
    medium = (f32(1) / ((f32(1) - smooth) / f32(factor) + smooth)).astype(f32)
    out = np.where(wavelen < f32(old / high), f32(1), np.where(wavelen > f32(old / low), f32(factor), medium))
    return [float(x) for x in out.astype(f32)]


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
