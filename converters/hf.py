"""Read a base model (Hugging Face folder, in-memory transformers model, or GGUF) into the
canonical layout of :mod:`edgeadapt.formats.arch`: GGUF names, float32 ``[out, in]``, q/k permuted
for "norm"-rope architectures, Conv1D weights (GPT-2) transposed, Gemma's norm weights shifted
by one (``1 + w``, as llama.cpp's converter stores them)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeadapt.formats.arch import CONV1D_ARCHES, ArchConfig, permute_qk, qk_heads
from edgeadapt.errors import FormatError, UnsupportedError, collect
from edgeadapt.formats.names import gguf_name

Progress = Callable[[str, int, int], None]


def canonical_from_state_dict(cfg: ArchConfig, state: dict[str, Any]) -> dict[str, np.ndarray]:
    """HF state dict (torch tensors or arrays) -> canonical float32 tensors, checked against ``cfg``."""
    out: dict[str, np.ndarray] = {}
    linear = cfg.linear_shapes() if cfg.arch in CONV1D_ARCHES else {}
    for hf, t in state.items():
        if "rotary_emb" in hf or hf.endswith((".attn.bias", ".attn.masked_bias")):  # rope / GPT-2 mask buffers
            continue
        name = gguf_name(cfg, hf)
        if name is None:
            raise UnsupportedError(f"tensor {hf!r} has no GGUF name for architecture {cfg.arch!r}")
        a = t.detach().to("cpu").float().numpy() if hasattr(t, "detach") else np.asarray(t, np.float32)
        if name in linear:  # Conv1D: [in, out] -> [out, in]
            a = a.T
        elif cfg.arch == "gemma3" and name.endswith("norm.weight"):  # Gemma3RMSNorm multiplies by (1 + w)
            a = np.float32(1.0) + a
        heads = qk_heads(cfg, name)
        out[name] = np.ascontiguousarray(permute_qk(a, heads) if heads else a, dtype=np.float32)
    if cfg.tied_embeddings:
        out.pop("output.weight", None)
    check_complete(cfg, out)
    return out


def check_complete(cfg: ArchConfig, weights: dict[str, np.ndarray]) -> None:
    expected = cfg.tensor_shapes()
    problems = [f"{n}: expected shape {s}, found {'nothing' if n not in weights else weights[n].shape}"
                for n, s in expected.items() if n not in weights or tuple(weights[n].shape) != s]
    problems += [f"{n}: unexpected tensor of shape {weights[n].shape}" for n in weights if n not in expected]
    collect(problems, FormatError, f"base weights do not match the {cfg.arch} architecture card:")


def from_transformers(model: Any) -> tuple[ArchConfig, dict[str, np.ndarray]]:
    """An in-memory ``*ForCausalLM`` -> (card, canonical weights)."""
    cfg = ArchConfig.from_hf(model.config)
    return cfg, canonical_from_state_dict(cfg, model.state_dict())


def _with_generation_eos(cfg: ArchConfig, folder: Path) -> ArchConfig:
    """transformers' generate stops at generation_config.json's eos ids (Qwen3, Llama 3 instruct models list
    several there, config.json one): the card carries the union, config.json's first."""
    gen = folder / "generation_config.json"
    try:
        eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    except (ValueError, AttributeError) as e:
        raise FormatError(f"{gen}: not a JSON object ({e})") from e
    eos = [] if eos is None else [eos] if isinstance(eos, int) else eos
    if not isinstance(eos, list) or not all(isinstance(i, int) and 0 <= i < cfg.vocab_size for i in eos):
        raise FormatError(f"{gen}: eos_token_id must be token ids below {cfg.vocab_size}, found {eos!r}")
    extra = [i for i in eos if i not in cfg.eos_token_ids]
    return replace(cfg, eos_token_ids=list(cfg.eos_token_ids) + extra) if extra else cfg


def from_hf_folder(folder: Path, progress: Progress | None = None) -> tuple[ArchConfig, dict[str, np.ndarray]]:
    """A Hugging Face model folder (config.json + *.safetensors) -> (card, canonical weights)."""
    from safetensors import safe_open  # host side only

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FormatError(f"{folder} is not a Hugging Face model folder: expected config.json, found {sorted(p.name for p in folder.iterdir())}")
    cfg = _with_generation_eos(ArchConfig.from_hf(json.loads(cfg_path.read_text())), folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{folder} holds no *.safetensors weights (pickled .bin weights are not read)")
    state: dict[str, Any] = {}
    for i, f in enumerate(files):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                state[k] = sf.get_tensor(k)
        if progress:
            progress("read weights", i + 1, len(files))
    if "lm_head.weight" not in state and not cfg.tied_embeddings:
        raise FormatError(f"{folder}: untied model without lm_head.weight")
    return cfg, canonical_from_state_dict(cfg, state)


def from_gguf_file(path: Path, progress: Progress | None = None) -> tuple[ArchConfig, dict[str, np.ndarray]]:
    """A llama.cpp GGUF base (any type gguf can dequantize) -> (card, canonical float32 weights)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises many kinds on a bad file
        raise FormatError(f"{path} is not a readable GGUF file: {e}") from e
    cfg = ArchConfig.from_gguf(reader)
    out: dict[str, np.ndarray] = {}
    n = len(reader.tensors)
    for i, t in enumerate(reader.tensors):
        if t.name.startswith("rope_"):
            continue
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = np.ascontiguousarray(a.reshape(tuple(int(x) for x in reversed(t.shape))), dtype=np.float32)
        if progress and (i + 1) % 16 == 0 or i + 1 == n:
            progress and progress("dequantize", i + 1, n)
    check_complete(cfg, out)
    return cfg, out
