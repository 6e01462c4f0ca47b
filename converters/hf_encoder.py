"""Read an encoder (BERT family) from a Hugging Face / sentence-transformers folder or an in-memory
transformers model into the canonical layout of :mod:`edgeadapt.formats.encoder_arch`."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edgeadapt.formats.encoder_arch import HF_ENCODER_TYPES, EncoderConfig
from edgeadapt.errors import FormatError, UnsupportedError, collect

# The sequence-classification head, in llama.cpp's names for its ranking head (not in gguf's
# BERT name map): the pooler (dense + tanh on the first token) and the classifier on top of it.
_HEAD = {"pooler.dense": gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.CLS],
         "classifier": gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.CLS_OUT]}
_SKIP = ("embeddings.position_ids",)
_PREFIXES = ("bert.", "model.")


def is_encoder_folder(folder: Path) -> bool:
    cfg = Path(folder) / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") in HF_ENCODER_TYPES


@lru_cache(maxsize=8)
def _name_map(n_layers: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layers)


def strip_prefix(hf_name: str) -> str:
    for p in _PREFIXES:
        if hf_name.startswith(p):
            return hf_name[len(p):]
    return hf_name


def encoder_gguf_name(cfg: EncoderConfig, hf_name: str) -> str | None:
    """``bert.encoder.layer.3.attention.self.query.weight`` -> ``blk.3.attn_q.weight`` (also module names)."""
    hf_name = strip_prefix(hf_name)
    for module, gname in _HEAD.items():
        if hf_name == module or hf_name.startswith(module + "."):
            return gname + hf_name[len(module):]
    return _name_map(cfg.n_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))


def canonical_encoder(cfg: EncoderConfig, state: dict[str, Any]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    problems = []
    for hf, t in state.items():
        if strip_prefix(hf) in _SKIP:
            continue
        name = encoder_gguf_name(cfg, hf)
        if name is None:
            problems.append(f"{hf}: no GGUF name in llama.cpp's bert map")
            continue
        if name.startswith("cls") and not cfg.n_labels:
            continue  # a pooler without a classifier (plain BertModel): embeddings do not use it
        out[name] = np.ascontiguousarray(t.detach().cpu().float().numpy() if hasattr(t, "detach") else t, np.float32)
    collect(problems, UnsupportedError, "encoder weights this converter cannot place:")
    expected = cfg.tensor_shapes()
    problems = [f"{n}: expected shape {list(s)}, found {'nothing' if n not in out else list(out[n].shape)}"
                for n, s in expected.items() if n not in out or tuple(out[n].shape) != s]
    problems += [f"{n}: unexpected tensor of shape {list(out[n].shape)}" for n in out if n not in expected]
    collect(problems, FormatError, f"encoder weights do not match the {cfg.arch} architecture card:")
    return out


def _pooling(folder: Path) -> dict[str, Any]:
    """sentence-transformers' modules.json / 1_Pooling / sentence_bert_config.json, when present."""
    over: dict[str, Any] = {}
    mods = folder / "modules.json"
    if not mods.is_file():
        return over
    types = {m.get("type", "").rsplit(".", 1)[-1]: m for m in json.loads(mods.read_text())}
    over["normalize"] = "Normalize" in types
    if "Pooling" in types:
        pc = json.loads((folder / types["Pooling"].get("path", "1_Pooling") / "config.json").read_text())
        modes = [k for k in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens") if pc.get(f"pooling_mode_{k}")]
        if modes not in (["mean_tokens"], ["cls_token"]):
            raise UnsupportedError(f"sentence-transformers pooling {modes} is not supported; supported: mean_tokens, cls_token")
        over["pooling"] = "mean" if modes == ["mean_tokens"] else "cls"
    sb = folder / "sentence_bert_config.json"
    if sb.is_file():
        msl = json.loads(sb.read_text()).get("max_seq_length")
        if isinstance(msl, int):
            over["max_seq_length"] = msl
    return over


def encoder_from_hf_folder(folder: Path, progress=None) -> tuple[EncoderConfig, dict[str, np.ndarray]]:
    from safetensors import safe_open  # host side only

    folder = Path(folder)
    g = json.loads((folder / "config.json").read_text())
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{folder} holds no *.safetensors weights (pickled .bin weights are not read)")
    state: dict[str, Any] = {}
    for i, f in enumerate(files):
        with safe_open(str(f), framework="np") as sf:
            for k in sf.keys():
                state[k] = sf.get_tensor(k)
        if progress:
            progress("read weights", i + 1, len(files))
    with_head = any(strip_prefix(k).startswith("classifier.") for k in state)
    cfg = EncoderConfig.from_hf(g, with_head=with_head)
    over = _pooling(folder)
    over.setdefault("max_seq_length", cfg.context_length)
    cfg = EncoderConfig.from_dict({**cfg.to_dict(), **over})
    return cfg, canonical_encoder(cfg, state)


def encoder_from_transformers(model: Any) -> tuple[EncoderConfig, dict[str, np.ndarray]]:
    state = model.state_dict()
    with_head = any(strip_prefix(k).startswith("classifier.") for k in state)
    cfg = EncoderConfig.from_hf(model.config, with_head=with_head)
    return cfg, canonical_encoder(cfg, state)
