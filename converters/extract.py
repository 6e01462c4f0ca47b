"""extract: a fully fine-tuned model -> a low-rank delta file pinned to its base.

For every adaptable linear weight, ΔW = W_ft − W_base (float32, canonical layout) is truncated by
SVD: ΔW ≈ U_k S_k V_kᵀ, stored balanced as B = U_k √S_k [out, k], A = √S_k V_kᵀ [k, in]. The rank is
fixed (``rank``) or the smallest keeping a share of ΔW's energy Σσ² (``energy``), optionally
capped (``max_rank``). Weights with ΔW = 0 are left out; changes a LoRA delta cannot carry
(embeddings, norms) are reported, not silently dropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeadapt.formats.arch import ArchConfig
from edgeadapt.formats.delta import LoraDelta, read_delta, write_delta
from edgeadapt.errors import AdapterMismatchError, FormatError, UnsupportedError, collect
from edgeadapt.formats.manifest import BaseManifest, read_manifest

from edgeadapt.converters.merge import base_weights

Progress = Callable[[str, int, int], None]


@dataclass
class Extracted:
    path: Path
    delta: LoraDelta  # as written and read back (dequantized)
    ranks: dict[str, int]  # per target
    energy: dict[str, float]  # share of Σσ² kept, per target
    dense: dict[str, np.ndarray]  # the exact ΔW per target (the reference for the error report)
    untouched: list[str] = field(default_factory=list)  # linear weights with ΔW = 0
    not_carried: list[tuple[str, float]] = field(default_factory=list)  # (tensor, max |Δ|) outside the delta


class DenseDelta(LoraDelta):
    """The exact ΔW of a fine-tune, shaped as an adapter the runtime can apply (the report's reference)."""

    live = False  # dense: it only merges (its zero factors must never run live as if they were the change)

    def __init__(self, name: str, arch: str, fingerprint: str, dense: dict[str, np.ndarray]):
        z = np.zeros((1, 1), np.float32)
        super().__init__(name=name, version=0, arch=arch, fingerprint=fingerprint,
                         factors={t: (np.broadcast_to(z, (1, d.shape[1])), np.broadcast_to(z, (d.shape[0], 1)))
                                  for t, d in dense.items()})
        self.dense = dense

    def delta(self, target: str) -> np.ndarray:
        return self.dense[target]

    def live_factors(self, target: str) -> tuple[np.ndarray, np.ndarray]:
        raise UnsupportedError("the exact delta of a fine-tune is dense; load the base with mode='merge'")


def finetuned_weights(source: str | os.PathLike, progress: Progress | None = None) -> tuple[ArchConfig, dict[str, np.ndarray]]:
    """A fine-tuned model: Hugging Face folder, .gguf file, or edgeadapt base folder -> (card, canonical fp32)."""
    from edgeadapt.converters.hf import from_gguf_file, from_hf_folder

    source = Path(source)
    if source.is_file() and source.suffix == ".gguf":
        return from_gguf_file(source, progress)
    if (source / "manifest.json").is_file():
        man = read_manifest(source)
        return man.arch, base_weights(man).weights
    return from_hf_folder(source, progress)


def choose_rank(s: np.ndarray, rank: int | None, energy: float | None, max_rank: int | None) -> int:
    """The rank to keep from singular values ``s`` (descending)."""
    if rank is not None:
        k = rank
    else:
        e = np.cumsum(s.astype(np.float64) ** 2)
        k = int(np.searchsorted(e, energy * e[-1] * (1 - 1e-12))) + 1 if e[-1] > 0 else 1
    return max(1, min(k, len(s), max_rank or len(s)))


def extract_delta(finetuned: str | os.PathLike, base: str | os.PathLike | BaseManifest, out: str | os.PathLike, *,
                  rank: int | None = None, energy: float | None = None, max_rank: int | None = None,
                  name: str | None = None, version: int = 1, dtype: str = "F32", description: str = "",
                  progress: Progress | None = None) -> Extracted:
    """Write the truncated-SVD delta of ``finetuned`` against ``base``; returns what was kept and lost."""
    if (rank is None) == (energy is None):
        raise FormatError("extract needs exactly one of rank (an integer ≥ 1) or energy (a share in (0, 1])")
    if rank is not None and rank < 1 or energy is not None and not 0 < energy <= 1:
        raise FormatError(f"extract: rank must be ≥ 1 and energy in (0, 1]; found rank={rank}, energy={energy}")
    man = base if isinstance(base, BaseManifest) else read_manifest(base)
    cfg, ft = finetuned_weights(finetuned, progress)
    problems = [f"{k}: base {getattr(man.arch, k)!r}, fine-tuned {getattr(cfg, k)!r}"
                for k in ("arch", "n_layers", "dim", "ffn_dim", "n_heads", "n_kv_heads", "head_dim", "vocab_size",
                          "tied_embeddings") if getattr(man.arch, k) != getattr(cfg, k)]
    collect(problems, AdapterMismatchError, f"{finetuned} is not a fine-tune of the base {man.root}:")
    base_w = base_weights(man).weights
    linear = man.arch.linear_shapes()
    factors, ranks, kept, dense, untouched = {}, {}, {}, {}, []
    names = [n for n in linear if n in ft]
    for i, n in enumerate(names):
        d = (ft[n].astype(np.float32) - base_w[n]).astype(np.float32)  # [out, in]
        if not d.any():
            untouched.append(n)
            continue
        u, s, vt = np.linalg.svd(d, full_matrices=False)  # u [out, m], s [m], vt [m, in]
        k = choose_rank(s, rank, energy, max_rank)
        root = np.sqrt(s[:k]).astype(np.float32)
        factors[n] = (np.ascontiguousarray(root[:, None] * vt[:k]), np.ascontiguousarray(u[:, :k] * root[None, :]))
        ranks[n] = k
        kept[n] = float((s[:k].astype(np.float64) ** 2).sum() / max((s.astype(np.float64) ** 2).sum(), 1e-300))
        dense[n] = d
        if progress:
            progress("svd", i + 1, len(names))
    if not factors:
        raise FormatError(f"{finetuned}: no linear weight differs from the base; there is nothing to extract")
    not_carried = [(n, float(np.abs(ft[n] - base_w[n]).max())) for n in sorted(ft)
                   if n not in linear and n in base_w and not np.array_equal(ft[n], base_w[n])]
    out = Path(out)
    rank_text = f"rank={rank}" if rank is not None else f"energy={energy}" + (f" max_rank={max_rank}" if max_rank else "")
    write_delta(out, arch=man.arch.arch, fingerprint=man.fingerprint, name=name or Path(finetuned).name,
                version=version, factors=factors, dtype=dtype, description=description,
                source=f"extracted by truncated SVD from the fine-tune {Path(finetuned).name} ({rank_text}, "
                       f"ranks {min(ranks.values())}…{max(ranks.values())}, {len(factors)} targets)")
    return Extracted(out, read_delta(out), ranks, kept, dense, untouched, not_carried)


def extract_report(result: Extracted, base: str | os.PathLike, *, engine: str = "auto", prompts: Any = None,
                   n_new: int = 24) -> Any:
    """The extracted delta vs the exact ΔW of every changed linear weight, on the model's outputs."""
    from edgeadapt.converters.quant_report import compare_deltas

    d = result.delta
    ref = DenseDelta("__exact__", d.arch, d.fingerprint, result.dense)
    rep = compare_deltas(base, ref, d, engine=engine, label=f"extracted delta ({d.quant}, ranks {min(result.ranks.values())}…"
                         f"{max(result.ranks.values())})", against="the full fine-tune's linear-weight deltas",
                         prompts=prompts, n_new=n_new)
    rep.size = result.path.stat().st_size
    return rep
