"""Tensor names: Hugging Face module names -> llama.cpp GGUF names, through gguf's own map."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Protocol

from edgeadapt.formats.gguf_constants import C


class _Card(Protocol):  # what a name map needs of an architecture card (edgeadapt.formats.arch.ArchConfig)
    arch: str
    n_layers: int


_ARCH_BY_NAME = {name: arch for arch, name in C.MODEL_ARCH_NAMES.items()}
ROPE_FREQS = C.TENSOR_NAMES[C.MODEL_TENSOR.ROPE_FREQS] + ".weight"  # Llama 3.x rope divisors [head_dim/2]


@lru_cache(maxsize=16)
def _tensor_map(arch: str, n_layers: int) -> Any:  # a gguf.TensorNameMap
    import gguf  # the package's name map (converting, importing)

    return gguf.get_tensor_name_map(_ARCH_BY_NAME[arch], n_layers)


def gguf_name(cfg: _Card, hf_name: str) -> str | None:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``.

    Also accepts a module name without suffix (``…q_proj`` -> ``blk.3.attn_q``).
    Returns None for a name gguf does not map (e.g. rotary caches).
    """
    return _tensor_map(cfg.arch, cfg.n_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))


def module_of(name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``blk.3.attn_q``."""
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
