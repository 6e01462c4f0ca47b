"""export-base for encoders: a BERT-family HF / sentence-transformers folder -> a base folder
(model.onnx with adapter slots, model.gguf with llama.cpp's "bert" names, tokenizer.json, manifest)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.formats.encoder_arch import EncoderConfig
from edgeadapt.formats.fingerprint import fingerprint as weights_fingerprint
from edgeadapt.formats.manifest import BaseManifest


def write_encoder_gguf(cfg: EncoderConfig, weights: dict[str, np.ndarray], path: Path, fingerprint: str) -> None:
    """F32 tensors under llama.cpp's bert names and its bert hyper-parameter keys (no vocabulary:
    the tokenizer travels as tokenizer.json)."""
    import gguf

    w = gguf.GGUFWriter(str(path), cfg.arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_layer_norm_eps(cfg.ln_eps)
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN if cfg.pooling == "mean" else gguf.PoolingType.CLS)
    w.add_token_type_count(cfg.type_vocab_size)
    w.add_string("edgeadapt.base.fingerprint", fingerprint)
    for name in cfg.tensor_shapes():
        w.add_tensor(name, np.ascontiguousarray(weights[name], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def export_encoder(source: Path, out: Path, *, onnx: bool = True, progress: Any = None) -> BaseManifest:
    from edgeadapt.converters.hf_encoder import encoder_from_hf_folder
    from edgeadapt.converters.onnx_graphs.encoder import build_encoder_onnx

    source, out = Path(source), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, weights = encoder_from_hf_folder(source, progress)
    fp = weights_fingerprint(weights)
    tensors: dict[str, dict[str, Any]] = {n: {} for n in weights}
    files: dict[str, str] = {}
    if onnx:
        for n, e in build_encoder_onnx(cfg, weights, out, progress).items():
            tensors[n]["onnx"] = e
        files["onnx"] = "model.onnx"
    write_encoder_gguf(cfg, weights, out / "model.gguf", fp)
    files["gguf"] = "model.gguf"
    special: dict[str, Any] = {}
    if (source / "tokenizer.json").is_file():
        shutil.copy(source / "tokenizer.json", out / "tokenizer.json")
        files["tokenizer"] = "tokenizer.json"
    manifest = BaseManifest(root=out, arch=cfg, fingerprint=fp, files=files, tensors=tensors, gguf_type="F32",
                            special_tokens=special, source={"kind": "hf", "name": source.name, "family": "encoder"})
    manifest.save()
    return manifest
