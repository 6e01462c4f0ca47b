"""Per-call adapter factors as the model driver assembles them for the engines (:func:`slot_inputs`): one adapter
set per row of a batch, ranks concatenated, weights folded in; scale / bias terms accumulated (:func:`add_terms`).

Device-side (numpy only), shared by both engines: the onnxruntime engine runs the padded slot form
(A [n, in, r], B [n, r, out]); an engine that declares ``row_lora`` gets a :class:`PerRow` (each row at its own
rank), which the numpy engine runs exactly as each row alone (:mod:`edgeadapt.runtime.numpy_engine.rows`).

The plans of the scheduler's batches (:class:`BatchPlans`, :mod:`runtime.scheduler`):

- Each set's one-row plan is made once (:meth:`BatchPlans.single`), plain LoRA factors in the engine's slot form
  (:meth:`Engine.slot_form`: on onnxruntime q|k|v and gate|up grouped, so the engine does not group them again per
  batch).
- The decode batch's plan lives in buffers that outlast a batch (:class:`RowBuffers`): A [capacity, in, R] and
  B [capacity, R, out] per slot, the batch running views of their first rows. When rows join or leave only the
  rows whose set changed are written (SmolLM2-135M with rank-16 LoRAs on every linear layer: ~29 MB per row), and
  the scheduler places a joining row where a row of the same set was, which writes nothing.
- A prefill's rows are written into the same buffers, after the running batch's rows: where they stay when they
  join it. Rows that need more than plain factors (sequence parts, bottleneck slots, scale / bias terms) get the
  plan the model makes for those rows at once; engines that take per-row factors as they are (``row_lora``: the
  numpy engine) get them stacked (:func:`stack_rows`: references, no copy).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

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


def _put(A: np.ndarray, B: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """One row's slot factors into a row of rank R: a [in, k·r], b [..., r, out] -> A [in, k·R], B [..., R, out],
    zeros past rank r. k = 1 for one weight's slot; an onnxruntime group slot with its weights' B side by side has
    A = [A_1 | … | A_k], each of the group's rank (session.slot_arrays), so each part is padded on its own."""
    R, r = B.shape[-2], b.shape[-2]
    k = A.shape[-1] // max(R, 1)
    parts, row = A.reshape(A.shape[0], k, R), a.reshape(a.shape[0], k, r)
    parts[:, :, :r], parts[:, :, r:] = row, 0
    B[..., :r, :], B[..., r:, :] = b, 0


def _layout(a: np.ndarray, b: np.ndarray) -> tuple[int, int, tuple[int, ...], int]:
    """(in, parts of A, B's axes between rows and rank, out) of a slot's (A [n, in, k·r], B [n, ..., r, out])."""
    return a.shape[1], a.shape[2] // max(b.shape[-2], 1), b.shape[1:-2], b.shape[-1]


def stack_rows(rows: list[dict[str, tuple[np.ndarray, np.ndarray]] | None], row_lora: bool) -> dict[str, Any]:
    """A batch's plan from one-row plans of plain factors ({target: (A [1, in, r], B [1, r, out])}, or an engine's
    slot form of them, None for a row on the bare base), as :func:`slot_inputs` makes it for those rows at once: a
    :class:`PerRow` per target (``row_lora``), else the padded slot form A [n, in, R], B [n, R, out] (zeros past a
    row's rank; :func:`_put`)."""
    out: dict[str, Any] = {}
    for t in sorted({t for r in rows if r for t in r}):
        parts = [r.get(t) if r else None for r in rows]
        some = next(p for p in parts if p is not None)
        n_in, k, lead, n_out = _layout(*some)
        if row_lora:
            out[t] = PerRow([None if p is None else (p[0][0], p[1][0]) for p in parts], n_in, n_out, f"factors of {t}")
            continue
        R = max(p[1].shape[-2] for p in parts if p is not None)
        if all(p is not None and p[1].shape[-2] == R for p in parts):
            out[t] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
            continue
        A = np.zeros((len(rows), n_in, k * R), _F32)
        B = np.zeros((len(rows), *lead, R, n_out), _F32)
        for i, p in enumerate(parts):
            if p is not None:
                _put(A[i], B[i], p[0][0], p[1][0])
        out[t] = (A, B)
    return out


# ---- the scheduler's batches (runtime.scheduler): one set per row, plans kept across batches
def _plain(p: Any) -> bool:
    """A one-row plan of plain factors only (or None: the bare base)."""
    return p is None or type(p) is dict and all(len(v) == 2 for v in p.values())


class RowBuffers:
    """Per slot, A [capacity, in, R] and B [capacity, R, out] (an engine's slot layout: see :func:`_put`);
    ``keys[b]``: the set whose factors row b holds."""

    def __init__(self) -> None:
        self.arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.keys: list[Any] = []  # per row: its set's key
        self.targets: list[set[str]] = []  # per row: the slots its set fills (the others are zero)
        self.cap = 0
        self.writes = 0  # rows written (a counter for tests and benchmarks)

    def plan(self, keys: Sequence[Any], singles: Sequence[dict | None], max_rows: int, start: int = 0
             ) -> dict[str, tuple]:
        """Views of rows [start, start + len(keys)) holding these sets' factors (rows outside are not touched: the
        running batch's, while a prefill's rows are written after them)."""
        n = start + len(keys)
        need: dict[str, tuple] = {}  # slot -> (R, (in, parts of A, B's middle axes, out))
        for p in singles:
            for t, (a, b) in (p or {}).items():
                need[t] = (max(b.shape[-2], need[t][0] if t in need else 0), _layout(a, b))
        if n > self.cap or any(t not in self.arrays or self.arrays[t][1].shape[-2] < r for t, (r, _) in need.items()):
            # new buffers, every row written again; max_rows rows at once: untouched rows take no memory (zeroed pages
            # are mapped when first written), and a batch that grows within them keeps its rows in place
            cap = max(n, max_rows, 2 * self.cap if n > self.cap else self.cap)
            shapes = {t: (B.shape[-2], _layout(A, B)) for t, (A, B) in self.arrays.items()}
            for t, (r, lay) in need.items():
                shapes[t] = (max(r, shapes[t][0] if t in shapes else 0), lay)
            self.arrays = {t: (np.zeros((cap, i, k * r), np.float32), np.zeros((cap, *lead, r, o), np.float32))
                           for t, (r, (i, k, lead, o)) in shapes.items()}
            self.keys, self.targets, self.cap = [], [], cap
        while len(self.keys) < start:  # rows never written: zeros
            self.keys.append(None)
            self.targets.append(set())
        for b, (key, p) in enumerate(zip(keys, singles), start):
            if b < len(self.keys) and self.keys[b] == key:
                continue
            old = self.targets[b] if b < len(self.targets) else set()
            for t in old - set(p or ()):
                A, B = self.arrays[t]
                A[b], B[b] = 0, 0
            for t, (a, bb) in (p or {}).items():
                A, B = self.arrays[t]
                _put(A[b], B[b], a[0], bb[0])
            if b < len(self.keys):
                self.keys[b], self.targets[b] = key, set(p or ())
            else:
                self.keys.append(key)
                self.targets.append(set(p or ()))
            self.writes += 1
        return {t: (A[start:n], B[start:n]) for t, (A, B) in self.arrays.items() if t in need}


class BatchPlans:
    """One model's one-row plans, its decode batch's buffers, and the whole plans of the batches that need them."""

    def __init__(self, model: Any) -> None:
        self.m = model
        self._singles: dict[tuple, Any] = {}
        self._whole: dict[tuple, Any] = {}  # a mix of sets -> the model's plan for it (non-plain sets; few)
        self.buffers = RowBuffers()

    def key(self, s: Mapping[str, float]) -> tuple:
        return tuple(sorted((n, w, id(self.m.adapters.get(n))) for n, w in s.items()))

    def single(self, s: Mapping[str, float]) -> Any:
        """The one-row plan of set ``s`` (None: the bare base), made once per set; plain factors in the engine's
        slot form."""
        key = self.key(s)
        if key not in self._singles:
            if len(self._singles) >= 64:
                self._singles.clear()
            plan = self.m._live_plan([s]) if s else None
            if plan and _plain(plan):
                self.m._slots_ready()
                plan = self.m._engine.slot_form(plan)
            self._singles[key] = plan
        return self._singles[key]

    def _whole_plan(self, sets: list[Mapping[str, float]]) -> Any:
        key = tuple(self.key(s) for s in sets)
        if key not in self._whole:
            if len(self._whole) >= 4:
                self._whole.clear()
            self._whole[key] = self.m._live_plan(sets) if any(key) else None
        return self._whole[key]

    def stacked(self, sets: list[Mapping[str, float]]) -> Any:
        """The plan of rows with these sets, for one forward (a prefill): a new array per slot."""
        singles = [self.single(s) for s in sets]
        if not any(singles):
            plan = None
        elif len(sets) == 1:
            plan = singles[0]
        elif all(_plain(p) for p in singles):
            plan = stack_rows(singles, self.m._engine.row_lora)
        else:
            plan = self._whole_plan(sets)
        if plan:
            self.m._slots_ready()
        return plan

    def prefill(self, sets: list[Mapping[str, float]], after: int, max_rows: int) -> Any:
        """A prefill's plan: its rows' factors written into the buffers after the running batch's ``after`` rows
        (where the rows then stay when they join), else :meth:`stacked`."""
        singles = [self.single(s) for s in sets]
        if not any(singles) or self.m._engine.row_lora or not all(_plain(p) for p in singles):
            return self.stacked(sets)
        if after + len(sets) > max(self.buffers.cap, max_rows):  # no room after the batch's rows: new arrays
            return self.stacked(sets)
        if len(sets) == 1 and not after:  # one row alone runs its set's own plan: no second copy (issue #17)
            return self.stacked(sets)
        self.m._slots_ready()
        return self.buffers.plan([self.key(s) for s in sets], singles, max_rows, start=after)

    def order(self, rows: list[Any]) -> list[Any]:
        """The rows in the order their batch runs them: where the buffers hold a row's set already, it goes there."""
        if self.m._engine.row_lora or not self.buffers.keys:
            return rows
        pool, out = list(rows), [None] * len(rows)
        for b, key in enumerate(self.buffers.keys[:len(rows)]):
            hit = next((r for r in pool if self.key(r.row_set) == key), None)
            if hit is not None:
                out[b] = hit
                pool.remove(hit)
        rest = iter(pool)
        return [r if r is not None else next(rest) for r in out]

    def decode(self, rows: list[Any], max_rows: int) -> Any:
        """The decode batch's plan: views of the buffers, rewritten where a row's set changed."""
        sets = [r.row_set for r in rows]
        singles = [self.single(s) for s in sets]
        if not any(singles):
            return None
        if self.m._engine.row_lora or not all(_plain(p) for p in singles) or len(sets) == 1:
            return self.stacked(sets)  # one row alone: its set's own plan, nothing copied into the buffers
        self.m._slots_ready()
        return self.buffers.plan([self.key(s) for s in sets], singles, max_rows)
