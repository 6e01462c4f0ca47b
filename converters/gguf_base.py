"""Write the base model as a GGUF file llama.cpp loads.

From a GGUF source the source's metadata (tokenizer, chat template, hparams) is carried over;
from a Hugging Face folder the hparams are written from the architecture card and a GPT-2 BPE
tokenizer is taken with gguf's own vocab readers (llama.cpp's pre-tokenizer named from its split
regex, see LLAMA_CPP_PRE). A card with Llama 3.x rope scaling adds ``rope_freqs.weight`` (F32
[head_dim/2], the per-frequency divisors llama.cpp's converter writes). Tensor types: F32, F16, Q8_0 (1-D tensors
stay F32, and tensors whose rows are not a multiple of the block size fall back to F16, as
llama.cpp's converter does), or ``source`` to keep a GGUF source's tensors bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from edgeadapt.formats.arch import ArchConfig
from edgeadapt.errors import UnsupportedError
from edgeadapt.formats.names import ROPE_FREQS

QTYPES = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
          "Q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
              "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
KEY_FINGERPRINT = "edgeadapt.base.fingerprint"
_NOT_COPIED = {"general.file_type", "general.alignment", KEY_FINGERPRINT}
# tokenizer.json's Split regex -> llama.cpp's pre-tokenizer name (tokenizer.ggml.pre; llama.cpp's converter finds
# the same name by hashing a tokenization); a tokenizer.json written from a GGUF (gguf_tokenizer: llama.cpp's own
# regexes) is named back. Anything else is written as "default".
LLAMA_CPP_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",  # Qwen2, Qwen2.5, Qwen3: one digit per piece
}


def _tensor_type(name: str, a: np.ndarray, qtype: str) -> gguf.GGMLQuantizationType:
    if a.ndim == 1 or qtype == "F32":
        return gguf.GGMLQuantizationType.F32
    t = QTYPES[qtype]
    block = gguf.GGML_QUANT_SIZES[t][0]
    return t if a.shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _copy_fields(writer: gguf.GGUFWriter, reader: gguf.GGUFReader) -> None:
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in _NOT_COPIED or key == gguf.Keys.General.ARCHITECTURE:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def _hf_fields(writer: gguf.GGUFWriter, cfg: ArchConfig, tokenizer_dir: Path | None) -> None:
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    if cfg.norm == "layer":
        writer.add_layer_norm_eps(cfg.rms_eps)
    else:
        writer.add_layer_norm_rms_eps(cfg.rms_eps)
    if cfg.rope != "none":
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_rope_dimension_count(cfg.head_dim)
        if cfg.rope_scale != 1.0:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(cfg.rope_scale)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.head_dim * cfg.n_heads != cfg.dim:  # llama.cpp derives head_dim from dim / heads otherwise
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    if cfg.sliding_window is not None:
        writer.add_sliding_window(cfg.sliding_window)
        if cfg.swa_layers is not None:  # per layer: true = windowed (llama.cpp's swa_layers)
            writer.add_sliding_window_pattern([i in cfg.swa_layers for i in range(cfg.n_layers)])
    if cfg.rope_theta_swa is not None:
        writer.add_key_value(gguf.Keys.Rope.FREQ_BASE_SWA.format(arch=cfg.arch), cfg.rope_theta_swa,
                             gguf.GGUFValueType.FLOAT32)
    if cfg.attn_scale is not None:
        writer.add_attention_scale(cfg.attn_scale)
    if cfg.final_softcap is not None:
        writer.add_final_logit_softcapping(cfg.final_softcap)
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file():
        try:
            vocab = gguf.vocab.BpeVocab(tokenizer_dir)
        except (FileNotFoundError, ValueError) as e:
            raise UnsupportedError(f"tokenizer in {tokenizer_dir} is not a GPT-2 BPE tokenizer ({e}); "
                                   "convert the base to GGUF with llama.cpp and export from that file") from e
        tokens, types = [], []
        for text, _score, ttype in vocab.all_tokens():
            tokens.append(text)
            types.append(ttype)
        tokens += [f"[PAD{i}]".encode() for i in range(cfg.vocab_size - len(tokens))]
        types += [gguf.TokenType.UNUSED] * (cfg.vocab_size - len(types))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_bpe_pre(tokenizer_dir / "tokenizer.json"))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.vocab.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=cfg.vocab_size).add_to_gguf(writer)
    else:
        writer.add_tokenizer_model("none")  # no vocabulary: llama.cpp then loads the model for token ids in, logits out
        for key, val in (("bos", cfg.bos_token_id), ("eos", cfg.eos_token_ids[0] if cfg.eos_token_ids else None)):
            if val is not None:
                getattr(writer, f"add_{key}_token_id")(val)


def _bpe_pre(path: Path) -> str:
    """llama.cpp's name for the pre-tokenizer of a tokenizer.json ("default" for one not in LLAMA_CPP_PRE)."""
    import json

    try:
        pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    except (OSError, ValueError):
        return "default"
    parts = (pre.get("pretokenizers") or [pre]) if isinstance(pre, dict) else []
    regexes = [(p.get("pattern") or {}).get("Regex") for p in parts if isinstance(p, dict) and p.get("type") == "Split"]
    from edgeadapt.converters.gguf_tokenizer import pre_name

    return pre_name(tuple(regexes)) or next((LLAMA_CPP_PRE[r] for r in regexes if r in LLAMA_CPP_PRE), "default")


def write_base_gguf(cfg: ArchConfig, weights: dict[str, np.ndarray], path: Path, *, qtype: str = "F32",
                    fingerprint: str, source: gguf.GGUFReader | None = None, tokenizer_dir: Path | None = None,
                    progress: Callable[[str, int, int], None] | None = None) -> None:
    if qtype not in QTYPES and qtype != "source":
        raise UnsupportedError(f"GGUF type {qtype!r} is not supported; choose one of {sorted(QTYPES)} or 'source'")
    if qtype == "source" and source is None:
        raise UnsupportedError("GGUF type 'source' needs a GGUF source file")
    writer = gguf.GGUFWriter(str(path), cfg.arch)
    if source is not None:
        _copy_fields(writer, source)
    else:
        _hf_fields(writer, cfg, tokenizer_dir)
    if qtype != "source":
        writer.add_file_type(FILE_TYPES[qtype])
    writer.add_string(KEY_FINGERPRINT, fingerprint)

    if qtype == "source":
        for t in source.tensors:  # bytes as they are, shapes in ggml order
            writer.add_tensor(t.name, t.data, raw_shape=tuple(int(x) for x in reversed(t.shape))
                              if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
                              else t.data.shape, raw_dtype=t.tensor_type)
    else:
        if cfg.rope_freqs is not None:  # Llama 3.x rope scaling: llama.cpp divides each frequency by these
            weights = {**weights, ROPE_FREQS: np.asarray(cfg.rope_freqs, np.float32)}
        names = sorted(weights, key=_order)
        for i, name in enumerate(names):
            a = weights[name]
            t = _tensor_type(name, a, qtype)
            if t == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
            elif t == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(name, a.astype(np.float16))
            else:
                writer.add_tensor(name, gguf.quants.quantize(a, t), raw_dtype=t)
            if progress and ((i + 1) % 8 == 0 or i + 1 == len(names)):
                progress(f"quantize to {qtype}", i + 1, len(names))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _order(name: str) -> tuple[int, str]:
    """token_embd first, blocks in numeric order, output last — llama.cpp's usual order."""
    if name.startswith("blk."):
        i, rest = name[4:].split(".", 1)
        return (1 + int(i), rest)
    return (0, name) if name.startswith("token_embd") else (10**9, name)
