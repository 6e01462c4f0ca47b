"""Bottleneck adapters (AdapterHub ``seq_bn`` / Pfeiffer, ``double_seq_bn`` / Houlsby, ``par``):
non-linear, so never merged — they run live in the slots of :mod:`edgeadapt.kinds.slots`.

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

Delta file (kind ``bottleneck``, :mod:`edgeadapt.formats.delta_kinds`). Targets are not base tensors:
``blk.<i>.bn_attn`` (after the attention sub-layer) and ``blk.<i>.bn_ffn`` (after the FFN). Per
target the file MUST hold ``down`` [m, dim], ``down_bias`` [m], ``up`` [dim, m] (scaling folded in),
``up_bias`` [dim], and ``ln_before_w`` / ``ln_before_b`` [dim] exactly when ``ln_before`` is set,
``ln_after_w`` / ``ln_after_b`` [dim] exactly when ``ln_after`` is set; one m per target (m ≥ 1).
Keys (all REQUIRED):

| key | type | values |
|---|---|---|
| ``edgeadapt.bottleneck.input`` | string | ``h`` (sub-layer output), ``t`` (block input: parallel), ``norm`` (LN(h + t)) |
| ``edgeadapt.bottleneck.residual`` | string | ``h``, ``sum`` (h + t), ``norm`` (LN(h + t)) |
| ``edgeadapt.bottleneck.activation`` | string | one of :data:`edgeadapt.kinds.slots.ACTS` |
| ``edgeadapt.bottleneck.ln_before``, ``.ln_after``, ``.residual_before_ln_after``, ``.original_ln_after`` | bool | the flags ``ln_before``, ``ln_after``, ``arb``, ``ln_out`` of the slot formula |

On a llama-family decoder (:data:`DECODER_ARCHES`) the same targets sit at the block's two residual
adds (after the attention output projection, after the MLP) and the slot formula runs with the
block's LayerNorm taken as the identity, as AdapterHub's Llama / Mistral do (``layer_norm=None``).

This module imports only numpy: it is used on devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from edgeadapt.formats.delta_kinds import KindAdapter, register_kind
from edgeadapt.kinds.slots import ACTS, C, CTRL, POSITIONS
from edgeadapt.errors import FormatError, UnsupportedError

_ACT_ALIASES = {"relu": "relu", "swish": "silu", "silu": "silu", "gelu": "gelu", "gelu_new": "gelu_new",
                "gelu_pytorch_tanh": "gelu_new", "tanh": "tanh", "sigmoid": "sigmoid", "leakyrelu": "leakyrelu",
                "linear": "identity", "identity": "identity", None: "identity"}
K = "edgeadapt.bottleneck."
# decoder architectures with bottleneck slots: pre-norm blocks x += attn(norm(x)); x += mlp(norm(x)), where
# AdapterHub's Llama / Mistral call the adapter at both residual adds with no LayerNorm (LN = identity)
DECODER_ARCHES = ("llama", "qwen2")
# file key -> (control entries by value) for the two choices, and the four flags
_CHOICES = {"input": {"h": "x_h", "t": "x_t", "norm": "x_L"}, "residual": {"h": "r_h", "sum": "r_s", "norm": "r_L"}}
_FLAGS = {"ln_before": "ln_before", "ln_after": "ln_after", "residual_before_ln_after": "arb",
          "original_ln_after": "ln_out"}
_LN_PARAMS = {"ln_before": ("ln_before_w", "ln_before_b"), "ln_after": ("ln_after_w", "ln_after_b")}


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
    return c


def ctrl_to_meta(c: np.ndarray) -> list[tuple[str, str, Any]]:
    """The control vector as the file's ``edgeadapt.bottleneck.*`` keys."""
    out: list[tuple[str, str, Any]] = []
    for key, opts in _CHOICES.items():
        on = [v for v, e in opts.items() if c[C[e]]]
        if len(on) != 1:
            raise FormatError(f"bottleneck control vector: expected one {key} choice, found {on}")
        out.append((K + key, "STRING", on[0]))
    acts = [a for a in ACTS if c[C[f"act_{a}"]]]
    if len(acts) != 1:
        raise FormatError(f"bottleneck control vector: expected one activation, found {acts}")
    out.append((K + "activation", "STRING", acts[0]))
    out += [(K + key, "BOOL", bool(c[C[e]])) for key, e in _FLAGS.items()]
    return out


def ctrl_from_meta(meta: dict[str, Any], where: str) -> np.ndarray:
    """``edgeadapt.bottleneck.*`` keys -> the control vector; every problem named at once."""
    c, problems = np.zeros(len(CTRL), np.float32), []
    for key, opts in _CHOICES.items():
        v = meta.get(K + key)
        if v not in opts:
            problems.append(f"{K + key}: expected one of {', '.join(opts)}, found {'nothing' if v is None else repr(v)}")
        else:
            c[C[opts[v]]] = 1
    act = meta.get(K + "activation")
    if act not in ACTS:
        problems.append(f"{K}activation: expected one of {', '.join(ACTS)}, found {'nothing' if act is None else repr(act)}")
    else:
        c[C[f"act_{act}"]] = 1
    for key, e in _FLAGS.items():
        v = meta.get(K + key)
        if not isinstance(v, bool):
            problems.append(f"{K + key}: expected a bool, found {'nothing' if v is None else repr(v)}")
        else:
            c[C[e]] = float(v)
    if problems:
        raise FormatError(f"{where}: bad bottleneck placement:\n  " + "\n  ".join(problems))
    return c


def target_name(i: int, p: str) -> str:
    return f"blk.{i}.bn_{p}"


def parse_target(t: str) -> tuple[int, str] | None:
    parts = t.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2][3:] in POSITIONS \
            and parts[2].startswith("bn_"):
        return int(parts[1]), parts[2][3:]
    return None


@register_kind
@dataclass
class BottleneckAdapter(KindAdapter):
    """``params[blk.<i>.bn_<p>]`` = down, down_bias, up, up_bias (+ the adapter's LayerNorms);
    ``ctrl`` the placement (see :func:`placement`). Live only."""

    ctrl: np.ndarray | None = None  # [len(CTRL)] float32
    config: dict[str, Any] | None = None  # the AdapterHub options it came from (not stored in the file)
    kind: ClassVar[str] = "bottleneck"
    mergeable: ClassVar[bool] = False
    live: ClassVar[bool] = True
    PARAMS: ClassVar[dict[str, tuple[int, ...]]] = {"down": (2,), "down_bias": (1,), "up": (2,), "up_bias": (1,),
                                                    "ln_before_w": (1,), "ln_before_b": (1,), "ln_after_w": (1,),
                                                    "ln_after_b": (1,)}

    def __post_init__(self) -> None:
        if self.ctrl is None or np.shape(self.ctrl) != (len(CTRL),):
            raise FormatError(f"bottleneck adapter {self.name!r}: expected a control vector of {len(CTRL)} values")
        self.ctrl = np.asarray(self.ctrl, np.float32)
        problems = []
        for t, p in sorted(self.params.items()):
            problems += [f"{t}: {x}" for x in self._param_problems(p, self.ctrl)]
        if problems:
            raise FormatError(f"bottleneck adapter {self.name!r} ({self.path or 'in memory'}): bad parameters:\n  "
                              + "\n  ".join(problems[:20]))

    # ---- the delta-file protocol
    def to_metadata(self) -> list[tuple[str, str, Any]]:
        return ctrl_to_meta(self.ctrl)

    @classmethod
    def from_tensors(cls, meta: dict[str, Any], tensors: dict[str, dict[str, np.ndarray]], **fields: Any
                     ) -> "BottleneckAdapter":
        where = fields.get("path") or "<bytes>"
        ctrl = ctrl_from_meta(meta, where)
        problems = []
        for t in sorted(tensors):
            problems += [f"{t}: {p}" for p in cls._param_problems(tensors[t], ctrl)]
        if problems:
            raise FormatError(f"{where}: bad bottleneck parameters:\n  " + "\n  ".join(problems[:20]))
        return cls(params=tensors, ctrl=ctrl, **fields)

    @classmethod
    def _param_problems(cls, p: dict[str, np.ndarray], ctrl: np.ndarray | None = None) -> list[str]:
        want = {"down", "down_bias", "up", "up_bias"}
        if ctrl is not None:
            for flag, names in _LN_PARAMS.items():
                if ctrl[C[flag]]:
                    want |= set(names)
        if set(p) != want:
            return [f"expected {', '.join(sorted(want))}; found {', '.join(sorted(p))}"]
        m, d = p["down"].shape
        shapes = {"down": (m, d), "down_bias": (m,), "up": (d, m), "up_bias": (d,),
                  **{n: (d,) for n in p if n.startswith("ln_")}}
        bad = [f"{n} {list(p[n].shape)}" for n, s in shapes.items() if p[n].shape != s]
        if bad or m < 1:
            return [f"expected down [m, dim], down_bias [m], up [dim, m], up_bias [dim], LayerNorms [dim] "
                    f"with m ≥ 1; found {', '.join(bad) or 'm = 0'}"]
        return []

    def base_shape(self, target: str) -> None:
        return None  # targets are block positions, checked in _extra_problems

    def _extra_problems(self, cfg: Any) -> list[str]:
        problems = []
        if getattr(cfg, "family", None) != "encoder" and cfg.arch not in DECODER_ARCHES:
            problems.append(f"bottleneck adapters run in the slots of an encoder base or a llama-family decoder "
                            f"({', '.join(DECODER_ARCHES)}); this base is a {cfg.arch!r} decoder, whose blocks have "
                            "no bottleneck slots")
        for t, q in self.params.items():
            ip = parse_target(t)
            if ip is None:
                problems.append(f"{t}: expected blk.<i>.bn_attn or blk.<i>.bn_ffn")
            elif not 0 <= ip[0] < cfg.n_layers:
                problems.append(f"{t}: the base has {cfg.n_layers} blocks")
            elif q["up"].shape[0] != cfg.dim:
                problems.append(f"{t}: the base's width is {cfg.dim}, the adapter's {q['up'].shape[0]}")
        return problems

    def delta(self, target: str, base: np.ndarray | None = None) -> np.ndarray:
        raise UnsupportedError(f"bottleneck adapter {self.name!r} is non-linear: it cannot be merged, only run live")

    def live_terms(self, target: str, base: np.ndarray | None = None) -> None:
        return None  # not a linear-layer term: it runs in the block slots

    # ---- slots
    def positions(self) -> list[tuple[int, str]]:
        return [ip for t in self.params if (ip := parse_target(t)) is not None]

    def slot(self, i: int, p: str, weight: float = 1.0) -> dict[str, np.ndarray] | None:
        """Slot arrays for one row ([dim, m] / [m, dim] / [1, ·] orientation of the graph), or None."""
        q = self.params.get(target_name(i, p))
        if q is None:
            return None
        w = np.float32(weight)
        d = q["up"].shape[0]
        one, zero = np.ones((1, d), np.float32), np.zeros((1, d), np.float32)
        out = {"ctrl": self.ctrl[None], "down": q["down"].T, "down_bias": q["down_bias"][None],
               "up": q["up"].T * w, "up_bias": q["up_bias"][None] * w}
        for ln, (wn, bn) in _LN_PARAMS.items():
            out[f"{ln}.weight"] = q[wn][None] if wn in q else one
            out[f"{ln}.bias"] = q[bn][None] if bn in q else zero
        return out
