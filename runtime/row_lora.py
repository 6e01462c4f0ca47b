"""Per-call adapter factors as the model driver assembles them for the engines (:func:`slot_inputs`): one adapter
set per row of a batch, ranks concatenated, weights folded in; scale / bias terms accumulated (:func:`add_terms`).

Device-side (numpy only), shared by both engines: the onnxruntime engine runs the padded slot form
(A [n, in, r], B [n, r, out]); an engine that declares ``row_lora`` gets a :class:`PerRow` (each row at its own
rank), which the numpy engine runs exactly as each row alone (:mod:`edgeadapt.runtime.numpy_engine.rows`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from edgeadapt.errors import UnsupportedError

_F32 = np.float32


class PerRow:
    """One linear's factors for a batch of n rows, each row at its own rank: ``rows[b]`` is (A [in, r_b],
    B [r_b, out]) (weights already folded into B) or None (no change on row b). ``engine_form``: what the engine
    made of it on first use (the numpy engine's stacked, validated RowLoRA), kept for the request's later steps."""

    __slots__ = ("rows", "n_in", "n_out", "label", "engine_form")

    def __init__(self, rows: Sequence[tuple[np.ndarray, np.ndarray] | None], n_in: int, n_out: int,
                 label: str = "factors"):
        self.rows, self.n_in, self.n_out, self.label = list(rows), n_in, n_out, label
        self.engine_form: Any = None


def cat(arrays: list[np.ndarray], axis: int) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=axis)


def add_terms(acc: list, terms: tuple, w: float, target: str, name: str) -> None:
    """Accumulate one adapter's (in, out, bias) terms of one row with weight w, as their merged changes add:
    scales 1 + Σ w (s − 1), bias Σ w·b. An input and an output scale on one layer do not compose exactly live."""
    for k, v in enumerate(terms):
        if v is None:
            continue
        step = np.float32(w) * (v - np.float32(1)) if k < 2 else np.float32(w) * v
        acc[k] = (np.float32(1) + step if k < 2 else step) if acc[k] is None else acc[k] + step
    if acc[0] is not None and acc[1] is not None:
        raise UnsupportedError(f"{target}: an input scale and an output scale on one layer (adapter {name!r} with "
                               "another) do not stack exactly live; use() them to merge, or serve them apart")


def slot_inputs(per_row: list[dict[str, tuple[list[np.ndarray], list[np.ndarray]]]], extras: dict[str, list[list]],
                shapes: dict[str, tuple[int, int]], row_lora: bool) -> dict[str, Any]:
    """Per target, what the engine runs for one set per row: ``per_row[i][target]`` = (the row's Aᵀ list, its Bᵀ
    list, weights folded in; ranks concatenate), ``extras[target][i]`` = the row's [in, out, bias] scale / bias
    terms. One row with one adapter: its own arrays, no copy. Several rows: a :class:`PerRow` (``row_lora``, the
    numpy engine: bit-identical to each row alone), else the padded slot form A [n, in, r], B [n, r, out]."""
    out: dict[str, Any] = {}
    for t in sorted({t for row in per_row for t in row}):
        n_out, n_in = shapes[t]
        ranks = [sum(a.shape[1] for a in row[t][0]) if t in row else 0 for row in per_row]
        if len(per_row) == 1 and len(per_row[0][t][0]) == 1:  # one adapter: its arrays, no copy
            a, b = per_row[0][t][0][0], per_row[0][t][1][0]
            out[t] = (a[None], b[None])
        elif len(per_row) > 1 and t not in extras and row_lora:  # each row at its own rank, as it runs alone
            out[t] = PerRow([(cat(row[t][0], 1), cat(row[t][1], 0)) if ranks[i] else None
                             for i, row in enumerate(per_row)], n_in, n_out, f"factors of {t}")
        else:
            A = np.zeros((len(per_row), n_in, max(ranks)), np.float32)
            B = np.zeros((len(per_row), max(ranks), n_out), np.float32)
            for i, row in enumerate(per_row):
                if ranks[i]:
                    A[i, :, : ranks[i]] = np.concatenate(row[t][0], axis=1)
                    B[i, : ranks[i]] = np.concatenate(row[t][1], axis=0)
            out[t] = (A, B)
        if t in extras:  # per row: identity where a row has no such term
            cols = []
            for k, (fill, n) in enumerate(((1.0, n_in), (1.0, n_out), (0.0, n_out))):
                vals = [r[k] for r in extras[t]]
                if all(v is None for v in vals):
                    cols.append(None)
                elif len(vals) == 1:
                    cols.append(vals[0][None].astype(np.float32))
                else:
                    cols.append(np.stack([np.full(n, fill, np.float32) if v is None else v for v in vals]).astype(np.float32))
            out[t] = (*out[t], *cols)
    return out


def stack_rows(rows: list[dict[str, tuple[np.ndarray, np.ndarray]] | None], row_lora: bool) -> dict[str, Any]:
    """A batch's plan from one-row plans of plain factors ({target: (A [1, in, r], B [1, r, out])}, None for a row
    on the bare base), as :func:`slot_inputs` makes it for those rows at once: a :class:`PerRow` per target
    (``row_lora``), else the padded slot form A [n, in, R], B [n, R, out] (zeros past a row's rank)."""
    out: dict[str, Any] = {}
    for t in sorted({t for r in rows if r for t in r}):
        parts = [r.get(t) if r else None for r in rows]
        some = next(p for p in parts if p is not None)
        n_in, n_out = some[0].shape[1], some[1].shape[2]
        if row_lora:
            out[t] = PerRow([None if p is None else (p[0][0], p[1][0]) for p in parts], n_in, n_out, f"factors of {t}")
            continue
        R = max(p[0].shape[2] for p in parts if p is not None)
        if all(p is not None and p[0].shape[2] == R for p in parts):
            out[t] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
            continue
        A = np.zeros((len(rows), n_in, R), _F32)
        B = np.zeros((len(rows), R, n_out), _F32)
        for i, p in enumerate(parts):
            if p is not None:
                A[i, :, :p[0].shape[2]], B[i, :p[0].shape[2]] = p[0][0], p[1][0]
        out[t] = (A, B)
    return out
