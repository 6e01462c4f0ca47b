"""``genai_config.json``: the base folder as an onnxruntime-genai model, with our adapters.

onnxruntime-genai runs a folder that holds a decoder graph and a ``genai_config.json`` describing
its inputs. Ours describes ``model_lora.onnx`` — the fp32 graph whose LoRA slots default to empty —
so the same folder serves both runtimes::

    import onnxruntime_genai as og
    model = og.Model("base/")                       # runs model_lora.onnx
    adapters = og.Adapters(model)
    adapters.load("billing.onnx_adapter", "billing")  # edgeadapt export-adapter --format onnx_adapter
    gen = og.Generator(model, og.GeneratorParams(model))
    gen.set_active_adapter(adapters, "billing")

Decoder families only (the encoder folders have no generation loop). The graph takes the kv cache
as ``past.<i>.key`` [batch, kv_heads, past, head_dim] and returns ``present.<i>.key``, masks from
``attention_mask`` and rotates by ``position_ids`` — the names genai's decoder-only loop feeds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeadapt.formats.arch import ArchConfig

GENAI_CONFIG = "genai_config.json"


def genai_config(cfg: ArchConfig, graph: str = "model_lora.onnx", *, threads: int | None = None,
                 max_length: int | None = None) -> dict[str, Any]:
    """The ``genai_config.json`` content for ``graph`` (a file of the base folder) of a decoder base."""
    eos = list(cfg.eos_token_ids) or [cfg.pad_token_id or 0]
    session: dict[str, Any] = {"log_id": "edgeadapt", "provider_options": []}
    if threads:
        session["intra_op_num_threads"] = int(threads)
    n = cfg.n_layers
    return {
        "model": {
            "type": "llama",  # genai's generic decoder-only loop; the graph itself carries the family
            "context_length": cfg.context_length,
            "vocab_size": cfg.vocab_size,
            "bos_token_id": cfg.bos_token_id if cfg.bos_token_id is not None else eos[0],
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": cfg.pad_token_id if cfg.pad_token_id is not None else eos[0],
            "decoder": {
                "session_options": session,
                "filename": graph,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.dim,
                "num_attention_heads": cfg.n_heads,
                "num_hidden_layers": n,
                "num_key_value_heads": cfg.n_kv_heads,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past.%d.key",
                           "past_value_names": "past.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": max_length or cfg.context_length,
                   "past_present_share_buffer": False},
    }


def write_genai_config(out: Path, cfg: ArchConfig, graph: str = "model_lora.onnx") -> str:
    """Write ``out/genai_config.json`` for ``graph``; returns its relative path (a manifest ``files`` entry)."""
    (Path(out) / GENAI_CONFIG).write_text(json.dumps(genai_config(cfg, graph), indent=1) + "\n")
    return GENAI_CONFIG
