"""The built-in adapter kinds beyond plain LoRA (PEFT's DoRA, IA3, LoHa, LoKr), on the protocol of
:mod:`edgeadapt.formats.delta_kinds`.

Parameters are stored as the training library keeps them, in float32, with each per-module scale
folded into one tensor (exact: every formula below is linear in that tensor), and in the training
library's (HF) row order: a change to a q/k weight of a "norm"-rope base is computed in that order
and its rows permuted once (``edgeadapt.qk_heads``), as llama.cpp's converter permutes the base — so
row-structured parameters (magnitudes, scalings, Kronecker factors) are never permuted piecemeal.
The math is PEFT's (``tuners/*/layer.py``), in float32. W is the immutable base weight [out, in].

| kind | parameters per target (file names) | ΔW (merge) | live |
|---|---|---|---|
| ``dora`` | ``lora_a`` A [r,in], ``lora_b`` s·B [out,r], ``dora_m`` m [out] | g ⊙_row (W+s·BA) − W, g = m/‖W+s·BA‖_row | out_scale g, factors A, g ⊙_row s·B (g computed once from the base) |
| ``ia3`` (output) | ``ia3_out`` l [out] | (l−1) ⊙_row W | out_scale l |
| ``ia3`` (input: PEFT ``feedforward_modules``) | ``ia3_in`` l [in] | W ⊙_col (l−1) | in_scale l |
| ``loha`` | ``hada_w1a`` s·w1a [out,r1], ``hada_w1b`` [r1,in], ``hada_w2a`` [out,r2], ``hada_w2b`` [r2,in] | (s·w1a@w1b) ⊙ (w2a@w2b) | exact factors of rank r1·r2 (Khatri–Rao), or ΔW itself when that is not smaller |
| ``lokr`` | ``lokr_w1`` s·w1 [a,b] or ``lokr_w1a`` s·w1a [a,k] + ``lokr_w1b`` [k,b]; ``lokr_w2`` [c,d] or ``lokr_w2a`` [c,k] + ``lokr_w2b`` [k,d] | kron(w1, w2) | exact factors kron(P1,P2) @ kron(Q1,Q2), or ΔW itself when that is not smaller |

s is alpha/r (DoRA: alpha/√r for rsLoRA), per module from PEFT's ``rank_pattern`` / ``alpha_pattern``.
Every kind here is mergeable and runs live; DoRA's merge and live form need the unquantized base
(its norm), IA3's merge needs the base (IA3 live does not).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from edgeadapt.formats.delta_kinds import KindAdapter, LiveTerms, register_kind


def _dense_or(a: np.ndarray, b: np.ndarray, delta: np.ndarray) -> LiveTerms:
    """Factors (A [k, in], B [out, k]) when k < min(out, in), else ΔW itself against an identity."""
    out, inp = delta.shape
    k = a.shape[0]
    if k < min(out, inp):
        return LiveTerms(a=a, b=b)
    if inp <= out:
        return LiveTerms(a=np.eye(inp, dtype=np.float32), b=delta)
    return LiveTerms(a=delta, b=np.eye(out, dtype=np.float32))


def _shape_of(p: dict[str, np.ndarray], name: str) -> tuple[int, ...]:
    return tuple(p[name].shape) if name in p else ()


@register_kind
class DoraAdapter(KindAdapter):
    kind, needs_base = "dora", True
    PARAMS: ClassVar[dict[str, tuple[int, ...]]] = {"lora_a": (2,), "lora_b": (2,), "dora_m": (1,)}

    @classmethod
    def _param_problems(cls, p):
        if set(p) != set(cls.PARAMS):
            return [f"expected lora_a, lora_b and dora_m; found {', '.join(sorted(p))}"]
        a, b, m = p["lora_a"], p["lora_b"], p["dora_m"]
        if a.shape[0] != b.shape[1] or m.shape != (b.shape[0],):
            return [f"expected lora_a [r, in], lora_b [out, r], dora_m [out]; found {list(a.shape)}, "
                    f"{list(b.shape)}, {list(m.shape)}"]
        return []

    def base_shape(self, target):
        p = self.params[target]
        return (p["lora_b"].shape[0], p["lora_a"].shape[1])

    def _gain(self, p, w):
        v = w + p["lora_b"] @ p["lora_a"]  # [out, in]; scale already in lora_b
        norm = np.linalg.norm(v.astype(np.float64), axis=1).astype(np.float32)  # [out]
        return v, (p["dora_m"] / norm).astype(np.float32)

    def _delta_hf(self, p, w):
        v, g = self._gain(p, w)
        return g[:, None] * v - w

    def _live_hf(self, p, w):
        _, g = self._gain(p, w)
        return LiveTerms(a=p["lora_a"], b=g[:, None] * p["lora_b"], out_scale=g)


@register_kind
class Ia3Adapter(KindAdapter):
    kind, needs_base = "ia3", True
    PARAMS: ClassVar[dict[str, tuple[int, ...]]] = {"ia3_out": (1,), "ia3_in": (1,)}

    @classmethod
    def _param_problems(cls, p):
        if len(p) != 1:
            return [f"expected one of ia3_out [out] (scales outputs) or ia3_in [in] (scales inputs); "
                    f"found {', '.join(sorted(p))}"]
        return []

    def base_shape(self, target):
        p = self.params[target]
        return (p["ia3_out"].shape[0], None) if "ia3_out" in p else (None, p["ia3_in"].shape[0])

    def _extra_problems(self, cfg):
        biased = [t for t, p in self.params.items() if "ia3_out" in p and cfg.qkv_bias
                  and t.split(".")[-2] in ("attn_q", "attn_k", "attn_v")]
        return [f"{t}: ia3 output scaling of a linear with a bias (PEFT scales the bias too) is not supported yet"
                for t in biased]

    def _delta_hf(self, p, w):
        if "ia3_out" in p:
            return w * (p["ia3_out"] - np.float32(1))[:, None]
        return w * (p["ia3_in"] - np.float32(1))[None, :]

    def _live_hf(self, p, w):
        return LiveTerms(out_scale=p["ia3_out"]) if "ia3_out" in p else LiveTerms(in_scale=p["ia3_in"])


@register_kind
class LohaAdapter(KindAdapter):
    kind = "loha"
    PARAMS: ClassVar[dict[str, tuple[int, ...]]] = {"hada_w1a": (2,), "hada_w1b": (2,), "hada_w2a": (2,),
                                                    "hada_w2b": (2,)}

    @classmethod
    def _param_problems(cls, p):
        if set(p) != set(cls.PARAMS):
            return [f"expected hada_w1a, hada_w1b, hada_w2a, hada_w2b; found {', '.join(sorted(p))}"]
        w1a, w1b, w2a, w2b = (p[k] for k in cls.PARAMS)
        if w1a.shape[1] != w1b.shape[0] or w2a.shape[1] != w2b.shape[0] or w1a.shape[0] != w2a.shape[0] \
                or w1b.shape[1] != w2b.shape[1]:
            return [f"expected w1a [out, r1], w1b [r1, in], w2a [out, r2], w2b [r2, in]; found "
                    f"{', '.join(str(list(p[k].shape)) for k in cls.PARAMS)}"]
        return []

    def base_shape(self, target):
        p = self.params[target]
        return (p["hada_w1a"].shape[0], p["hada_w1b"].shape[1])

    def _delta_hf(self, p, w):
        return (p["hada_w1a"] @ p["hada_w1b"]) * (p["hada_w2a"] @ p["hada_w2b"])

    def _live_hf(self, p, w):
        # (w1a w1b) ⊙ (w2a w2b) = Σ_ij (w1a[:, i] ⊙ w2a[:, j]) (w1b[i] ⊙ w2b[j])ᵀ: rank ≤ r1·r2, exactly
        w1a, w1b, w2a, w2b = (p[k] for k in self.PARAMS)
        out, inp = w1a.shape[0], w1b.shape[1]
        b = (w1a[:, :, None] * w2a[:, None, :]).reshape(out, -1)  # [out, r1·r2]
        a = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, inp)  # [r1·r2, in]
        return _dense_or(a, b, self._delta_hf(p, w) if a.shape[0] >= min(out, inp) else np.empty((out, inp)))


@register_kind
class LokrAdapter(KindAdapter):
    kind = "lokr"
    PARAMS: ClassVar[dict[str, tuple[int, ...]]] = {"lokr_w1": (2,), "lokr_w1a": (2,), "lokr_w1b": (2,),
                                                    "lokr_w2": (2,), "lokr_w2a": (2,), "lokr_w2b": (2,)}

    @classmethod
    def _param_problems(cls, p):
        problems = []
        for f in ("lokr_w1", "lokr_w2"):
            full, pair = f in p, (f + "a" in p, f + "b" in p)
            if full == any(pair) or pair[0] != pair[1]:
                problems.append(f"expected {f} or both {f}a and {f}b; found {', '.join(sorted(p))}")
            elif not full and p[f + "a"].shape[1] != p[f + "b"].shape[0]:
                problems.append(f"{f}a {list(p[f + 'a'].shape)} and {f}b {list(p[f + 'b'].shape)} do not share a rank")
        return problems

    @staticmethod
    def _factor(p, k):
        return p[k] if k in p else p[k + "a"] @ p[k + "b"]

    @staticmethod
    def _pq(p, k):
        """(P, Q) with P @ Q = the factor, of inner size ≤ its rank bound."""
        if k + "a" in p:
            return p[k + "a"], p[k + "b"]
        w = p[k]
        return (np.eye(w.shape[0], dtype=np.float32), w) if w.shape[0] <= w.shape[1] else (w, np.eye(w.shape[1], dtype=np.float32))

    def base_shape(self, target):
        p = self.params[target]
        s1, s2 = (self._pq(p, k) for k in ("lokr_w1", "lokr_w2"))
        return (s1[0].shape[0] * s2[0].shape[0], s1[1].shape[1] * s2[1].shape[1])

    def _delta_hf(self, p, w):
        return np.kron(self._factor(p, "lokr_w1"), self._factor(p, "lokr_w2"))

    def _live_hf(self, p, w):
        (p1, q1), (p2, q2) = self._pq(p, "lokr_w1"), self._pq(p, "lokr_w2")
        b, a = np.kron(p1, p2), np.kron(q1, q2)  # kron(P1 Q1, P2 Q2) = kron(P1, P2) kron(Q1, Q2)
        out, inp = b.shape[0], a.shape[1]
        return _dense_or(a, b, self._delta_hf(p, w) if a.shape[0] >= min(out, inp) else np.empty((out, inp)))


KINDS = {c.kind: c for c in (DoraAdapter, Ia3Adapter, LohaAdapter, LokrAdapter)}
