"""export-base: a Hugging Face folder or a GGUF file -> a base folder (ONNX + GGUF + manifest)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from edgeadapt.errors import UnsupportedError
from edgeadapt.formats.fingerprint import fingerprint as weights_fingerprint
from edgeadapt.formats.manifest import BaseManifest

from edgeadapt.converters.gguf_tokenizer import tokenizer_from_gguf
from edgeadapt.converters.hf import from_gguf_file, from_hf_folder

Progress = Callable[[str, int, int], None]


def _tokenizer_from_hf(src: Path, out: Path) -> tuple[str | None, dict[str, Any]]:
    if not (src / "tokenizer.json").is_file():
        return None, {}
    from transformers import AutoTokenizer

    shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
    tok = AutoTokenizer.from_pretrained(str(src))
    return getattr(tok, "chat_template", None), _special(tok)


def _special(tok: Any) -> dict[str, Any]:
    return {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "add_bos": bool(getattr(tok, "add_bos_token", False)),
            "add_eos": bool(getattr(tok, "add_eos_token", False)), "rules": "transformers"}  # the folder's own tokenizer


def export_base(source: str | Path, out: str | Path, *, gguf_type: str = "F32", onnx: bool = True,
                onnx_weights: tuple[str, ...] = ("fp32",), progress: Progress | None = None) -> BaseManifest:
    """Export ``source`` (HF folder or .gguf) to ``out``; returns the written manifest.

    ``onnx_weights``: which ONNX graphs to write — "fp32" (model.onnx, model_lora.onnx, weight_sums.onnx),
    "int4" (model_int4.onnx: llama.cpp Q4_1 blocks), "int8" (model_int8.onnx: Q8_0 blocks); a GGUF
    source's blocks of that type are copied bit for bit, anything else is quantized from float32."""
    import gguf

    from edgeadapt.converters.onnx_graphs.genai import write_genai_config
    from edgeadapt.converters.gguf_base import write_base_gguf
    from edgeadapt.converters.onnx_graphs.graph import build_onnx

    source, out = Path(source), Path(out)
    from edgeadapt.converters.hf_encoder import is_encoder_folder
    if source.is_dir() and is_encoder_folder(source):  # BERT family: its own graph, card and slots
        from edgeadapt.converters.export_encoder import export_encoder
        return export_encoder(source, out, onnx=onnx, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    reader = None
    if source.is_file() and source.suffix == ".gguf":
        cfg, weights = from_gguf_file(source, progress)
        reader = gguf.GGUFReader(str(source))
        kind = "gguf"
    else:
        cfg, weights = from_hf_folder(source, progress)
        kind = "hf"
    fp = weights_fingerprint(weights)
    if progress:
        progress("fingerprint", 1, 1)
    tensors: dict[str, dict[str, Any]] = {n: {} for n in weights}
    files: dict[str, str] = {}
    unknown = sorted(set(onnx_weights) - {"fp32", "int4", "int8"})
    if unknown:
        raise UnsupportedError(f"onnx_weights {unknown} unknown: expected any of fp32, int4, int8")
    if onnx and "fp32" in onnx_weights:
        table = build_onnx(cfg, weights, out, progress=progress)
        for n, e in table.items():
            tensors.setdefault(n, {})["onnx"] = e
        files["onnx"] = "model.onnx"
        files["onnx_lora"] = "model_lora.onnx"  # the same weights with LoRA slots (live mode)
        if (out / "model_live.onnx").is_file():
            files["onnx_live"] = "model_live.onnx"  # the same, slots without defaults (the runtime's live graph)
        if (out / "model_kinds.onnx").is_file():
            files["onnx_kinds"] = "model_kinds.onnx"  # the same, with scale / bias slots (DoRA, IA3, lora_bias)
        if (out / "model_bottleneck.onnx").is_file():
            files["onnx_bottleneck"] = "model_bottleneck.onnx"  # model_kinds + bottleneck slots (AdapterHub)
        files["onnx_check"] = "weight_sums.onnx"  # verifies initializer overrides (merge mode)
        files["genai"] = write_genai_config(out, cfg)  # the folder as an onnxruntime-genai model
    for qkind in ("int4", "int8"):
        if onnx and qkind in onnx_weights:  # the quantized bases, adapters live beside them
            from edgeadapt.converters.onnx_graphs.fast import build_quant_onnx, gguf_source

            info = build_quant_onnx(cfg, weights, out, qkind, source=gguf_source(reader) if reader else None,
                                    progress=progress)
            files[f"onnx_{qkind}"] = info["file"]
            if "base_file" in info:
                files[f"onnx_{qkind}_base"] = info["base_file"]  # no slots: the bare base at full speed
    write_base_gguf(cfg, weights, out / "model.gguf", qtype=gguf_type, fingerprint=fp, source=reader,
                    tokenizer_dir=None if reader is not None else source, progress=progress)
    files["gguf"] = "model.gguf"
    chat, special = (tokenizer_from_gguf(source, out, reader) if kind == "gguf" else _tokenizer_from_hf(source, out))
    if (out / "tokenizer.json").is_file():
        files["tokenizer"] = "tokenizer.json"
    if kind == "hf" and (source / "config.json").is_file():
        hf_cfg = json.loads((source / "config.json").read_text())
        for i in ("bos_token_id", "eos_token_id"):
            special.setdefault(i, hf_cfg.get(i))
    manifest = BaseManifest(root=out, arch=cfg, fingerprint=fp, files=files, tensors=tensors, gguf_type=gguf_type,
                            chat_template=chat, special_tokens=special,
                            source={"kind": kind, "name": source.name})
    manifest.save()
    return manifest
