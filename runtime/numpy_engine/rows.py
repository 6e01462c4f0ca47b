"""The numpy engine's per-call adapter factors: their validation (:func:`check_rows`) and how a linear applies
them (:func:`_lin`), every row of a batch computed exactly as that row alone.

A linear computes ``x Wᵀ`` plus, per call (``forward(lora=)``):

- ``(A [in, r], B [r, out])`` shared by every row: ``(x A) B``;
- ``(A [n, in, r], B [n, r, out])``, the slot contract shared with the onnxruntime graphs: row b
  uses slice b, ranks zero-padded to one r;
- a :class:`RowLoRA` (built from :class:`edgeadapt.runtime.row_lora.PerRow`): each row its own factors at its
  own rank (see there why that matters);
- ``(A, B, in, out, bias)``: scale / bias terms (DoRA, IA3, lora_bias; edgeadapt.formats.delta_kinds.LiveTerms).

Exact by construction: with per-row factors every product runs as one BLAS call per row block at the block's own
shape — the call that row makes alone — so which kernel OpenBLAS picks (``OPENBLAS_CORETYPE``) cannot make a
row in a batch differ from the row alone: one [nb·seq, in] call picks its tiling by its M, and rows at different
offsets of a tile were summed in another order (up to 1.3e-6 on a toy model's logits under the Haswell kernel).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from edgeadapt.errors import AdapterMismatchError, collect
from edgeadapt.runtime.numpy_engine.weights import _Lazy
from edgeadapt.runtime.row_lora import PerRow

_F32 = np.float32


# ---------------------------------------------------------------- per-row factors
class RowLoRA:
    """One linear's factors for a batch of n rows, each row at its own rank: ``per_row[b]`` is
    (A [in, r_b], B [r_b, out]) (weights already folded into B) or None (no change on row b).

    Why not the padded slot form: zero-padding a row's rank to the batch's widest moves BLAS to
    another kernel and summation order, so a row's (x A) B in the batch differed from the same row
    run alone (~1e-7 relative per layer, amplified to 2.5e-5 on the logits of a toy model). Here the
    rows of one rank are stacked into one batched matmul, which numpy runs slice by slice at the
    slice's own shapes: each row's term is bit-identical to its 2-D ``(x A) B`` run alone. Built once
    per request (the factors are copied into the stacks), validated here in full."""

    __slots__ = ("n", "n_in", "n_out", "groups")

    def __init__(self, per_row: Sequence[tuple[np.ndarray, np.ndarray] | None], n_in: int, n_out: int,
                 label: str = "factors"):
        problems: list[str] = []
        by_rank: dict[int, list[int]] = {}
        for row, f in enumerate(per_row):
            if f is None:
                continue
            a, b = f
            r = a.shape[1] if isinstance(a, np.ndarray) and a.ndim == 2 else 0
            if not (r and isinstance(b, np.ndarray) and a.dtype == b.dtype == _F32 and a.shape[0] == n_in
                    and b.shape == (r, n_out)):
                problems.append(f"row {row}: expected float32 A [{n_in}, r] and B [r, {n_out}] with r ≥ 1, found "
                                f"{getattr(a, 'dtype', type(a).__name__)} {list(getattr(a, 'shape', ()))} and "
                                f"{getattr(b, 'dtype', type(b).__name__)} {list(getattr(b, 'shape', ()))}")
            elif not (np.isfinite(a).all() and np.isfinite(b).all()):
                problems.append(f"row {row}: expected finite values, found NaN/inf")
            else:
                by_rank.setdefault(r, []).append(row)
        collect(problems, AdapterMismatchError, f"per-row {label} do not fit:")
        self.n, self.n_in, self.n_out = len(per_row), n_in, n_out
        self.groups: list[tuple[np.ndarray | None, np.ndarray, np.ndarray]] = []  # (rows or None = all, A, B)
        for r, rows in sorted(by_rank.items()):
            a = np.stack([per_row[i][0] for i in rows])  # [k, in, r]
            b = np.stack([per_row[i][1] for i in rows])  # [k, r, out]
            self.groups.append((None if rows == list(range(self.n)) else np.asarray(rows, np.intp), a, b))

    def add_to(self, y: np.ndarray, x: np.ndarray) -> None:
        """y [n·seq, out] += per row (x A) B, x [n·seq, in]. y may be a column slice (a view is written)."""
        x3 = x.reshape(self.n, -1, x.shape[1])  # [n, seq, in]
        y3 = y.reshape(self.n, -1, y.shape[1])  # splitting the row axis: always a view of y
        for rows, a, b in self.groups:
            if rows is None:
                y3 += np.matmul(np.matmul(x3, a), b)
            else:
                y3[rows] += np.matmul(np.matmul(x3[rows], a), b)


def _has_terms(rows: Any) -> bool:
    """A per-call entry with scale / bias terms: (A, B, in, out, bias)."""
    return type(rows) is tuple and len(rows) == 5


# ---------------------------------------------------------------- apply
def _mm(x: np.ndarray, w: np.ndarray, nb: int) -> np.ndarray:
    """x [nb·seq, in] @ w [in, out] as nb matmuls of [seq, in] (numpy runs a stacked matmul slice by
    slice): each batch row gets the BLAS call it gets alone. One [nb·seq, in] call picks its kernel
    and tiling by its M, so a row's sums ran in another order than alone (OpenBLAS, x @ Wᵀ on a
    transposed view: ~1e-7 relative). For decode (seq 1) the slices are matrix-vector products,
    which were also faster than one small-M product on the transposed view."""
    if nb == 1:
        return x @ w
    return np.matmul(x.reshape(nb, -1, x.shape[1]), w).reshape(x.shape[0], w.shape[1])


def _low_rank(x: np.ndarray, a: np.ndarray, b: np.ndarray, nb: int) -> np.ndarray:
    """(x A) B for A [in, r], B [r, out] shared by the nb rows of x [nb·seq, in], each row as it runs alone."""
    return _mm(_mm(x, a, nb), b, nb)


def _lin(x: np.ndarray, w: Any, live: Any, rows: Any = None, nb: int = 1, head: bool = False) -> np.ndarray:
    """x [N, in] -> [N, out]; ``w`` is an fp32 [in, out] array (any strides) or a _Lazy; ``live``
    the engine's fused (Aᵀ, Bᵀ); ``rows`` this call's per-row factors (see :func:`_add_rows`), or
    (A, B, in, out, bias) with scale / bias terms (see :func:`_lin_terms`). ``head``: x @ w as one
    call, for the output head of a batch without per-call factors (nb matrix-vector passes over a
    vocabulary-sized weight cost more than they save there); with per-call factors the caller passes
    head=False and the head too runs row block by row block, as each row alone."""
    if _has_terms(rows):
        return _lin_terms(x, w, live, rows, nb)
    y = w.matmul(x, nb) if type(w) is _Lazy else _mm(x, w, 1 if head else nb)
    if live is not None:
        y += _low_rank(x, *live, nb)
    if rows is not None:
        _add_rows(y, x, rows, nb)
    return y


def _lin_terms(x: np.ndarray, w: Any, live: Any, rows: tuple, nb: int) -> np.ndarray:
    """``out ⊙ ((x ⊙ in) @ W) + live + (x A) B + bias`` (DoRA, IA3, lora_bias; see edgeadapt.formats.delta_kinds.LiveTerms).
    Each term is None, shared ([d]; A [in, r]) or per row ([nb, d]; A [nb, in, r])."""
    a, b, s_in, s_out, bias = rows
    xin = x if s_in is None else _per_row(x, s_in, nb, np.multiply)
    y = w.matmul(xin, nb) if type(w) is _Lazy else _mm(xin, w, nb)
    if s_out is not None:
        y = _per_row(y, s_out, nb, np.multiply)
    if live is not None:
        y += _low_rank(x, *live, nb)
    if a is not None:
        _add_rows(y, x, (a, b), nb)
    return y if bias is None else _per_row(y, bias, nb, np.add)


def _per_row(x: np.ndarray, v: np.ndarray, nb: int, op: Any) -> np.ndarray:
    """op(x [N, d], v) with v [d] for every row, or [nb, d] for the nb rows of the batch (N = nb·seq)."""
    if v.ndim == 1:
        return op(x, v)
    return op(x.reshape(nb, -1, x.shape[1]), v[:, None, :]).reshape(x.shape)


def _add_rows(y: np.ndarray, x: np.ndarray, f: Any, nb: int) -> None:
    """y [N, out] += (x A) B, N = nb·seq. ``f`` = (A [in, r], B [r, out]) shared by every row,
    (A [nb, in, r], B [nb, r, out]) with row b of the batch using slice b (batched matmul), or a :class:`RowLoRA`."""
    if type(f) is RowLoRA:
        f.add_to(y, x)
        return
    a, b = f
    if a.ndim == 2:
        y += _low_rank(x, a, b, nb)
    else:
        y += np.matmul(np.matmul(x.reshape(nb, -1, x.shape[1]), a), b).reshape(y.shape)  # [nb, seq, out]


# ---------------------------------------------------------------- validate
def check_rows(lora: Any, batch: int, shapes: dict[str, tuple[int, int]], unknown: Callable[[Any, list[str]], None]
               ) -> dict[str, Any]:
    """Validate :meth:`forward`'s ``lora`` (every problem named at once) without copying.

    Returns name -> (A, B): 2-D [in, r] / [r, out] when shared by the batch (n = 1), else 3-D
    [batch, in, r] / [batch, r, out]; a :class:`RowLoRA` as given (validated when built; a
    :class:`~edgeadapt.runtime.row_lora.PerRow` becomes one, once). Rank-0
    entries (an ONNX-style empty default) are dropped."""
    if not isinstance(lora, dict):
        raise AdapterMismatchError(f"lora: expected a dict {{gguf linear name: (A [n, in, r], B [n, r, out])}}, "
                                   f"found {type(lora).__name__}")
    problems: list[str] = []
    out_f: dict[str, Any] = {}
    ns = "1" if batch == 1 else f"1 or {batch}"
    for name, f in lora.items():
        if name not in shapes:
            unknown(name, problems)
            continue
        o, i = shapes[name]
        if type(f) is PerRow:  # stacked and validated once, on the request's first step
            if f.engine_form is None and (f.n_in, f.n_out) == (i, o):
                f.engine_form = RowLoRA(f.rows, f.n_in, f.n_out, f.label)
            f = f.engine_form or RowLoRA(f.rows, f.n_in, f.n_out, f.label)
        if type(f) is RowLoRA:
            if (f.n, f.n_in, f.n_out) != (batch, i, o):
                problems.append(f"{name}: expected per-row factors of {batch} rows, {i} in, {o} out, found "
                                f"{f.n} rows, {f.n_in} in, {f.n_out} out")
            elif f.groups:
                out_f[name] = f
            continue
        if isinstance(f, (tuple, list)) and len(f) == 5:  # (A, B, in, out, bias): scale / bias terms
            t = _check_terms(name, f, batch, i, o, problems)
            if t is not None:
                out_f[name] = t
            continue
        if not (isinstance(f, (tuple, list)) and len(f) == 2):
            problems.append(f"{name}: expected a pair (A [n, {i}, r], B [n, r, {o}]), found {type(f).__name__}")
            continue
        a, b = f
        bad = False
        for label, t, want in (("A", a, f"[n, {i}, r]"), ("B", b, f"[n, r, {o}]")):
            if not isinstance(t, np.ndarray) or t.dtype != _F32 or t.ndim != 3:
                problems.append(f"{name}.{label}: expected float32 {want} with n = {ns}, found "
                                f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', ()))}")
                bad = True
        if bad:
            continue
        n, r = a.shape[0], a.shape[2]
        if n not in (1, batch) or a.shape[1] != i or b.shape != (n, r, o):
            problems.append(f"{name}: expected A [n, {i}, r] and B [n, r, {o}] with n = {ns} and one r, "
                            f"found A {list(a.shape)} and B {list(b.shape)}")
            continue
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            which = " and ".join(lb for lb, t in (("A", a), ("B", b)) if not np.isfinite(t).all())
            problems.append(f"{name}: expected finite values, found NaN/inf in {which}")
            continue
        if r:
            out_f[name] = (a[0], b[0]) if n == 1 else (a, b)
    collect(problems, AdapterMismatchError, f"per-row adapter factors do not fit this base and batch of {batch} "
            "(nothing was computed):")
    return out_f


def _check_terms(name: str, f: Any, batch: int, i: int, o: int, problems: list[str]) -> tuple | None:
    """One (A, B, in [n, in], out [n, out], bias [n, out]) entry, any term None (A and B together)."""
    a, b, *rest = f
    ns = "1" if batch == 1 else f"1 or {batch}"
    ok = True
    n_seen = set()
    if (a is None) != (b is None):
        problems.append(f"{name}: A and B must both be given or both be None")
        return None
    if a is not None:
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype == _F32
                and a.ndim == b.ndim == 3 and a.shape[1] == i and b.shape == (a.shape[0], a.shape[2], o)):
            problems.append(f"{name}: expected A [n, {i}, r] and B [n, r, {o}] float32 with n = {ns}, found "
                            f"{list(getattr(a, 'shape', ()))} and {list(getattr(b, 'shape', ()))}")
            ok = False
        else:
            n_seen.add(a.shape[0])
    for label, t, d in zip(("in", "out", "bias"), rest, (i, o, o)):
        if t is None:
            continue
        if not (isinstance(t, np.ndarray) and t.dtype == _F32 and t.ndim == 2 and t.shape[1] == d):
            problems.append(f"{name}.{label}: expected float32 [n, {d}] with n = {ns}, found "
                            f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', ()))}")
            ok = False
        else:
            n_seen.add(t.shape[0])
    if ok and (not n_seen <= {1, batch} or len(n_seen) > 1):
        problems.append(f"{name}: every term must have n = {ns} rows (one n for all), found {sorted(n_seen)}")
        ok = False
    if ok and not all(np.isfinite(t).all() for t in f if t is not None):
        problems.append(f"{name}: expected finite values, found NaN/inf")
        ok = False
    if not ok:
        return None
    n = n_seen.pop() if n_seen else 1
    if a is not None and a.shape[2] == 0:
        a = b = None
    if n == 1:
        return (None if a is None else a[0], None if b is None else b[0], *(None if t is None else t[0] for t in rest))
    return (a, b, *rest)


