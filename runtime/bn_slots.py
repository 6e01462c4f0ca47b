"""Bottleneck adapters (AdapterHub) in the blocks of a llama-family decoder, live on both engines.

AdapterHub's Llama / Mistral call the adapter at the two residual adds of every block — after the
attention output projection and after the MLP — with ``layer_norm=None``, so each add x + y becomes
the slot formula of :mod:`edgeadapt.kinds.slots` with LN = identity (h = y, t = x).

A request carries the slot inputs ``{bn.<i>.<p>.<part>: array [rows, …]}`` (rows 1 or batch; widths
zero-padded per position; a row without an adapter there gets the idle slot, which is exactly x + y)
in :class:`BnPlan`, beside its LoRA factors. The numpy engine calls :func:`residual_add` at the two
adds; onnxruntime feeds them to ``model_bottleneck.onnx``. One bottleneck adapter per block position
and row: AdapterHub's ``Stack`` (each adapter's pre-forward on the previous one's output, only the
last one's post-forward) has no form in one slot, so two in one row are refused by name.
numpy only: used on devices.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from edgeadapt.kinds.bottleneck import DECODER_ARCHES
from edgeadapt.kinds.slots import BN_PARTS, POSITIONS, bn_feeds, bn_name, bottleneck
from edgeadapt.errors import AdapterMismatchError, UnsupportedError

from edgeadapt.runtime.seq import Plan

Feeds = dict[str, np.ndarray]


class BnPlan(Plan):
    """A :class:`~edgeadapt.runtime.seq.Plan` that also carries bottleneck slot inputs (``bn``)."""

    bn: Feeds | None = None

    def __bool__(self) -> bool:
        return super().__bool__() or bool(self.bn)


def is_bottleneck(adapter: Any) -> bool:
    return adapter.kind == "bottleneck"


def feeds(adapters: Mapping[str, Any], rows: Sequence[Mapping[str, float]], dim: int) -> Feeds | None:
    """Slot inputs for one set per row (one entry = every row alike); None when no row has a bottleneck.
    A row's weight scales the adapter's up projection (as the encoder does)."""
    per: dict[tuple[int, str], list[dict[str, np.ndarray] | None]] = {}
    for r, want in enumerate(rows):
        for name, w in want.items():
            a = adapters[name]
            if not is_bottleneck(a):
                continue
            for i, p in a.positions():
                slot = per.setdefault((i, p), [None] * len(rows))
                if slot[r] is not None:
                    raise UnsupportedError(f"two bottleneck adapters at blk.{i}.{p} in one row ({sorted(want)}): "
                                           "stacking bottleneck adapters (AdapterHub's Stack) is not supported")
                slot[r] = a.slot(i, p, w)
    return bn_feeds(dim, per) if per else None


def attach(plan: Any, bn: Feeds | None) -> Any:
    """``plan`` (a live-factor dict or a Plan) with ``bn`` added; ``plan`` itself when there is none."""
    if not bn:
        return plan
    out = BnPlan(plan)
    if isinstance(plan, Plan):  # the sequence parts ride along (a tied head's rows too)
        out.embed, out.prefix, out.head = plan.embed, plan.prefix, plan.head
    out.bn = bn
    return out


def check(cfg: Any, bn: Mapping[str, Any], batch: int) -> Feeds:
    """Validate slot inputs against the base and the batch; every problem named at once."""
    if cfg.arch not in DECODER_ARCHES:
        raise UnsupportedError(f"bottleneck slots exist in llama-family blocks ({', '.join(DECODER_ARCHES)}); "
                               f"this base is {cfg.arch!r}")
    known = {bn_name(i, p, part) for i in range(cfg.n_layers) for p in POSITIONS for part in BN_PARTS}
    problems = [f"{k}: not a slot of this base (bn.<block < {cfg.n_layers}>.<attn|ffn>.<part>)"
                for k in bn if k not in known]
    out: Feeds = {}
    for k, v in bn.items():
        a = np.asarray(v)
        if k in known and (a.dtype != np.float32 or a.ndim != 3 or a.shape[0] not in (1, batch)):
            problems.append(f"{k}: expected float32 [1 or {batch}, …], found {a.dtype} {list(a.shape)}")
        out[k] = a
    for k in [k for k in out if k.endswith(".ctrl")]:
        missing = [part for part in BN_PARTS if k[: -len("ctrl")] + part not in out]
        if missing:
            problems.append(f"{k[:-5]}: missing parts {missing}")
    if problems:
        raise AdapterMismatchError("bottleneck slot inputs do not fit this base:\n  " + "\n  ".join(problems[:20]))
    return out


def residual_add(bn: Feeds, i: int, p: str, y: np.ndarray, x: np.ndarray, batch: int) -> np.ndarray:
    """Block i's residual add at position p: x + y, or the bottleneck slot there (y, x [N, dim], N = batch·seq)."""
    if bn_name(i, p, "ctrl") not in bn:
        return x + y
    d = x.shape[-1]
    s = {part: bn[bn_name(i, p, part)] for part in BN_PARTS}
    out = bottleneck(y.reshape(batch, -1, d), x.reshape(batch, -1, d), None, None, 0.0, s)
    return np.ascontiguousarray(out.reshape(-1, d), dtype=np.float32)
