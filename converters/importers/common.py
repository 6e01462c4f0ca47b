"""What every importer shares: the check against the base card, and the record of what was asserted.

A file from another tool carries no base fingerprint. An importer checks what it can — the
architecture, every target's name and shape, the layer count, the rank — against the base
folder's card, collects every mismatch and raises once; the delta it writes is pinned to that base
with ``edgeadapt.base.asserted_by`` saying the importer asserted the base, it did not prove it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.formats.arch import ArchConfig

K_ASSERTED = "edgeadapt.base.asserted_by"
EMBED = "token_embd.weight"
_BLOCK = re.compile(r"blk\.(\d+)\.")


@dataclass
class Imported:
    """What an importer read, in our canonical layout, before it is written.

    ``factors[w] = (A [r, in], B [out, r])`` with every scale folded into B and the rows of q/k B in the
    base's (llama.cpp's) order; ``embed`` = (A [r, vocab], B [dim, r]) for a LoRA on the token embedding;
    ``dora[w] = {"lora_a", "lora_b", "dora_m"}`` in the training library's row order (DoRA)."""

    fmt: str  # what the file is, for messages and the record: "llama.cpp LoRA GGUF", …
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    embed: tuple[np.ndarray, np.ndarray] | None = None
    dora: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # facts read from the file, for the record

    @property
    def targets(self) -> list[str]:
        return sorted(self.factors) + sorted(self.dora) + ([EMBED] if self.embed is not None else [])


def layer_problem(cfg: ArchConfig, target: str) -> str | None:
    """A block index the base does not have, named with the base's layer count."""
    m = _BLOCK.match(target)
    if m and int(m.group(1)) >= cfg.n_layers:
        return f"{target}: layer {m.group(1)}, but the base has {cfg.n_layers} layers (blk.0…blk.{cfg.n_layers - 1})"
    return None


def target_problems(cfg: ArchConfig, target: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> list[str]:
    """Problems of one LoRA target against the base: its name, its layer, the shapes of A [r, in] and B [out, r]."""
    bad = layer_problem(cfg, target)
    if bad:
        return [bad]
    if target == EMBED:
        want = (cfg.dim, cfg.vocab_size)  # ΔE [vocab, dim] as (B [dim, r] @ A [r, vocab])ᵀ
    else:
        linear = cfg.linear_shapes()
        if target not in linear:
            tied = " (the head is tied to token_embd)" if target == "output.weight" and cfg.tied_embeddings else ""
            return [f"{target}: not an adaptable linear weight of this {cfg.arch} base{tied}"]
        want = linear[target]
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1] or a_shape[0] < 1:
        return [f"{target}: expected A [r, in] and B [out, r] of one rank r, found A {list(a_shape)}, "
                f"B {list(b_shape)}"]
    if (b_shape[0], a_shape[1]) != tuple(want):
        return [f"{target}: expected [out, in] = {list(want)} for this base, found the change as "
                f"[{b_shape[0]}, {a_shape[1]}] (rank {a_shape[0]})"]
    return []


def module_target(cfg: ArchConfig, module: str, problems: list[str]) -> str | None:
    """The GGUF name of a Hugging Face module path (``model.layers.3.self_attn.q_proj``), or None with the
    problem named: a layer the base does not have, or a module no weight of the base has."""
    from edgeadapt.formats.names import gguf_name

    target = gguf_name(cfg, module + ".weight")
    if target is None:
        m = re.search(r"layers\.(\d+)\.", module)
        if m and int(m.group(1)) >= cfg.n_layers:
            problems.append(f"{module}: layer {m.group(1)}, but the base has {cfg.n_layers} layers "
                            f"(0…{cfg.n_layers - 1})")
        else:
            problems.append(f"{module}: no weight of a {cfg.arch} base has this name")
    return target


def arch_problem(cfg: ArchConfig, found: Any, where: str) -> list[str]:
    if found != cfg.arch:
        return [f"architecture: the base is {cfg.arch!r}, {where} says {found!r}"]
    return []


def finite_problems(name: str, *arrays: np.ndarray) -> list[str]:
    return [] if all(np.isfinite(x).all() for x in arrays) else [f"{name}: holds NaN or Inf"]


def record(imp: Imported, source: Path, cfg: ArchConfig) -> str:
    """The ``edgeadapt.base.asserted_by`` value: what was imported and what was checked."""
    layers = sorted({int(m.group(1)) for t in imp.targets if (m := _BLOCK.match(t))})
    notes = "; ".join(imp.notes)
    return (f"edgeadapt import-adapter from a {imp.fmt} ({source.name}{'; ' + notes if notes else ''}): "
            f"checked architecture {cfg.arch}, {len(imp.targets)} targets' names and shapes, layers "
            f"{layers[0] if layers else '-'}…{layers[-1] if layers else '-'} of {cfg.n_layers}; "
            f"the base identity is asserted by the importer, not proven by a fingerprint")
