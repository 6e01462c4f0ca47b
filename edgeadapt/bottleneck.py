"""Bottleneck adapters (AdapterHub ``seq_bn`` / Pfeiffer, ``double_seq_bn`` / Houlsby, ``par``):
non-linear, so never merged — they run live in the slots of :mod:`edgeadapt.encoder_slots`.

Per adapted (block i, position p ∈ {attn, ffn}), in AdapterHub's orientation:
  down [m, dim], down_bias [m], up [dim, m], up_bias [dim] (AdapterHub's scaling folded into up
  and up_bias: a float, or "learned" [1] / "channel" [dim]), optional ln_before / ln_after
  (weight, bias) [dim], and the placement (how the adapter meets the block's residual and LayerNorm)
  as the 0/1 control vector of the slot formula, derived from AdapterHub's options:

| option | effect on the control vector |
|---|---|
| is_parallel (``par``) | x = t (the block input), r = h, adapter residual after ln_after |
| original_ln_before | x = LN(h + t) (else h) |
| residual_before_ln: True / "post_add" / False | r = h / h + t / x |
| ln_before, ln_after, adapter_residual_before_ln, original_ln_after | their flags |
| non_linearity | the one-hot activation (relu, swish/silu, gelu, gelu_new, tanh, sigmoid, leakyrelu, identity) |

This module imports only numpy: it is used on devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .encoder_slots import ACTS, C, CTRL
from .errors import AdapterMismatchError, UnsupportedError, collect

_ACT_ALIASES = {"relu": "relu", "swish": "silu", "silu": "silu", "gelu": "gelu", "gelu_new": "gelu_new",
                "gelu_pytorch_tanh": "gelu_new", "tanh": "tanh", "sigmoid": "sigmoid", "leakyrelu": "leakyrelu",
                "linear": "identity", "identity": "identity", None: "identity"}


def placement(opts: dict[str, Any]) -> np.ndarray:
    """AdapterHub's placement options -> the control vector (float32 [len(CTRL)])."""
    act = opts.get("non_linearity")
    act = act.lower() if isinstance(act, str) else act
    if act not in _ACT_ALIASES:
        raise UnsupportedError(f"bottleneck non_linearity {act!r} is not supported; supported: "
                               f"{sorted(k for k in _ACT_ALIASES if k)}")
    c = np.zeros(len(CTRL), np.float32)
    if opts.get("is_parallel"):
        c[C["x_t"]] = c[C["r_h"]] = 1
    else:
        olb, rbl = bool(opts.get("original_ln_before")), opts.get("residual_before_ln", True)
        c[C["x_L" if olb else "x_h"]] = 1
        if rbl is True:
            c[C["r_h"]] = 1
        elif rbl == "post_add":
            if not olb:
                raise UnsupportedError("bottleneck residual_before_ln='post_add' needs original_ln_before=True "
                                       "(AdapterHub has no residual otherwise)")
            c[C["r_s"]] = 1
        elif rbl is False:
            c[C["r_L" if olb else "r_h"]] = 1
        else:
            raise UnsupportedError(f"bottleneck residual_before_ln {rbl!r} is not supported: expected true, false or 'post_add'")
        c[C["arb"]] = float(bool(opts.get("adapter_residual_before_ln")))
    c[C["ln_before"]] = float(bool(opts.get("ln_before")))
    c[C["ln_after"]] = float(bool(opts.get("ln_after")))
    c[C["ln_out"]] = float(bool(opts.get("original_ln_after", True)))
    c[C[f"act_{_ACT_ALIASES[act]}"]] = 1
    assert _ACT_ALIASES[act] in ACTS
    return c


@dataclass
class BottleneckAdapter:
    name: str
    version: int
    arch: str
    fingerprint: str
    ctrl: np.ndarray  # [len(CTRL)] float32, see placement()
    params: dict[tuple[int, str], dict[str, np.ndarray]]  # (block, "attn"|"ffn") -> down, down_bias, up, up_bias, [ln_*]
    config: dict[str, Any] = field(default_factory=dict)  # the AdapterHub options it came from
    source: str = ""
    path: str | None = None
    kind = "bottleneck"
    mergeable = False

    @property
    def targets(self) -> list[str]:
        return [f"blk.{i}.{p}" for i, p in self.params]

    def slot(self, i: int, p: str, weight: float = 1.0) -> dict[str, np.ndarray] | None:
        """Slot arrays for one row ([dim, m] / [m, dim] / [1, ·] orientation of the graph), or None."""
        q = self.params.get((i, p))
        if q is None:
            return None
        w = np.float32(weight)
        d = q["up"].shape[0]
        one, zero = np.ones((1, d), np.float32), np.zeros((1, d), np.float32)
        out = {"ctrl": self.ctrl[None], "down": q["down"].T, "down_bias": q["down_bias"][None],
               "up": q["up"].T * w, "up_bias": q["up_bias"][None] * w}
        for ln in ("ln_before", "ln_after"):
            out[f"{ln}.weight"] = q[f"{ln}.weight"][None] if f"{ln}.weight" in q else one
            out[f"{ln}.bias"] = q[f"{ln}.bias"][None] if f"{ln}.bias" in q else zero
        return out

    def check_base(self, cfg: Any, fingerprint: str) -> None:
        problems = []
        if self.fingerprint != fingerprint:
            problems.append(f"base fingerprint: the adapter was made for {self.fingerprint}, this base is {fingerprint}")
        if self.arch != cfg.arch:
            problems.append(f"architecture: expected {cfg.arch!r}, found {self.arch!r}")
        if getattr(cfg, "family", None) != "encoder":
            problems.append("bottleneck adapters run in the slots of an encoder base; this base is a decoder")
        for (i, p), q in self.params.items():
            if not 0 <= i < cfg.n_layers:
                problems.append(f"blk.{i}.{p}: the base has {cfg.n_layers} blocks")
            m = q["down"].shape[0]
            want = {"down": (m, cfg.dim), "down_bias": (m,), "up": (cfg.dim, m), "up_bias": (cfg.dim,)}
            for k, s in want.items():
                if tuple(q[k].shape) != s:
                    problems.append(f"blk.{i}.{p}.{k}: expected shape {list(s)}, found {list(q[k].shape)}")
        collect(problems, AdapterMismatchError, f"bottleneck adapter {self.name!r} does not fit this base:")
