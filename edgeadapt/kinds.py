"""Adapter kinds beyond plain LoRA, with one protocol the merge driver stays generic over.

Every kind holds its own small parameters and computes, per target weight, the float32 change
``ΔW`` of the canonical [out, in] base weight from the immutable base ``W`` (``delta(target, W)``).
Kinds whose change depends on the base (DoRA's norm, IA3's scaling) say ``needs_base = True``.
Parameters are kept in the training library's (HF) row order; a change to a q/k weight of a
"norm"-rope base is computed in that order and its rows permuted once, as llama.cpp's converter
permutes the base — so row-structured parameters (magnitudes, scalings, Kronecker factors) are
never permuted piecemeal. The math is PEFT's (``tuners/*/layer.py``), in float32:

| kind | parameters per target | ΔW |
|---|---|---|
| DoRA | A [r,in], s·B [out,r], m [out] | m/‖W+s·BA‖_row ⊙ (W+s·BA) − W |
| IA3 (output) | l [out] | (l−1) ⊙_row W |
| IA3 (input, feed-forward) | l [in] | W ⊙_col (l−1) |
| LoHa | w1a [out,r], w1b [r,in], w2a, w2b; s = alpha/r | s·(w1a@w1b) ⊙ (w2a@w2b) |
| LoKr | w1 [a,b] (or w1a@w1b), w2 [c,d] (or w2a@w2b); s = alpha/r | s·kron(w1, w2) |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .arch import ArchConfig, permute_qk, qk_heads, unpermute_qk
from .errors import AdapterMismatchError, collect


@dataclass
class KindAdapter:
    """Common fields and checks; subclasses implement :meth:`_delta_hf`."""

    name: str
    version: int
    arch: str
    fingerprint: str
    params: dict[str, dict[str, Any]]  # target -> parameters (HF row order)
    heads: dict[str, int] = field(default_factory=dict)  # target -> heads to permute over (q/k of norm rope)
    source: str = ""
    path: str | None = None
    kind = "kind"
    mergeable = True
    needs_base = False

    @property
    def targets(self) -> list[str]:
        return list(self.params)

    def delta(self, target: str, base: np.ndarray | None = None) -> np.ndarray:
        """ΔW (float32, canonical [out, in]) of one target, from the immutable base weight."""
        h = self.heads.get(target)
        w_hf = None
        if self.needs_base:
            if base is None:
                raise AdapterMismatchError(f"{self.kind} adapter {self.name!r} needs the base weight of {target}")
            w_hf = unpermute_qk(base, h) if h else base
        d = np.asarray(self._delta_hf(self.params[target], w_hf), dtype=np.float32)
        return permute_qk(d, h) if h else d

    def _delta_hf(self, p: dict[str, Any], w: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def _shape(self, p: dict[str, Any]) -> tuple[int, int]:
        raise NotImplementedError

    def check_base(self, cfg: ArchConfig, fingerprint: str) -> None:
        problems = []
        if self.fingerprint != fingerprint:
            problems.append(f"base fingerprint: the adapter was made for {self.fingerprint}, this base is {fingerprint}")
        if self.arch != cfg.arch:
            problems.append(f"architecture: expected {cfg.arch!r}, found {self.arch!r}")
        shapes = cfg.linear_shapes()
        for t, p in self.params.items():
            if t not in shapes:
                problems.append(f"{t}: not a linear weight of this base")
            elif self._shape(p) != shapes[t]:
                problems.append(f"{t}: expected a change of shape {list(shapes[t])}, the {self.kind} parameters "
                                f"make {list(self._shape(p))}")
        collect(problems, AdapterMismatchError, f"{self.kind} adapter {self.name!r} does not fit this base:")


class DoraAdapter(KindAdapter):
    kind, needs_base = "dora", True

    def _shape(self, p):
        return (p["b"].shape[0], p["a"].shape[1])

    def _delta_hf(self, p, w):
        v = w + p["b"] @ p["a"]  # [out, in]; scale already in b
        norm = np.linalg.norm(v.astype(np.float64), axis=1).astype(np.float32)  # [out]
        return (p["m"] / norm)[:, None] * v - w


class Ia3Adapter(KindAdapter):
    kind, needs_base = "ia3", True

    def _shape(self, p):
        return tuple(p["shape"])

    def _delta_hf(self, p, w):
        l = p["l"] - np.float32(1)
        return w * l[:, None] if p["axis"] == "out" else w * l[None, :]


class LohaAdapter(KindAdapter):
    kind = "loha"

    def _shape(self, p):
        return (p["w1a"].shape[0], p["w1b"].shape[1])

    def _delta_hf(self, p, w):
        return np.float32(p["scale"]) * (p["w1a"] @ p["w1b"]) * (p["w2a"] @ p["w2b"])


class LokrAdapter(KindAdapter):
    kind = "lokr"

    @staticmethod
    def _factor(p, k):
        return p[k] if k in p else p[k + "a"] @ p[k + "b"]

    def _shape(self, p):
        w1, w2 = self._factor(p, "w1"), self._factor(p, "w2")
        return (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1])

    def _delta_hf(self, p, w):
        return np.float32(p["scale"]) * np.kron(self._factor(p, "w1"), self._factor(p, "w2"))


KINDS = {c.kind: c for c in (DoraAdapter, Ia3Adapter, LohaAdapter, LokrAdapter)}


def heads_for(cfg: ArchConfig, targets) -> dict[str, int]:
    return {t: h for t in targets if (h := qk_heads(cfg, t))}
