"""The live plans of the scheduler's batches (:mod:`runtime.scheduler`): one adapter set per row.

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
  numpy engine) get them stacked (:func:`runtime.row_lora.stack_rows`: references, no copy).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from edgeadapt.runtime.row_lora import stack_rows


def _plain(p: Any) -> bool:
    """A one-row plan of plain factors only (or None: the bare base)."""
    return p is None or type(p) is dict and all(len(v) == 2 for v in p.values())


class RowBuffers:
    """Per slot, A [capacity, in, R] and B [capacity, R, out]; ``keys[b]``: the set whose factors row b holds."""

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
        need: dict[str, tuple[int, int, int]] = {}  # slot -> (in, R, out)
        for p in singles:
            for t, (a, b) in (p or {}).items():
                need[t] = (a.shape[1], max(a.shape[2], need[t][1] if t in need else 0), b.shape[2])
        if n > self.cap or any(t not in self.arrays or self.arrays[t][0].shape[2] < r for t, (_, r, _) in need.items()):
            # new buffers, every row written again; max_rows rows at once: untouched rows take no memory (zeroed pages
            # are mapped when first written), and a batch that grows within them keeps its rows in place
            cap = max(n, max_rows, 2 * self.cap if n > self.cap else self.cap)
            shapes = {t: (A.shape[1], A.shape[2], B.shape[2]) for t, (A, B) in self.arrays.items()}
            for t, (i, r, o) in need.items():
                shapes[t] = (i, max(r, shapes.get(t, (0, 0, 0))[1]), o)
            self.arrays = {t: (np.zeros((cap, i, r), np.float32), np.zeros((cap, r, o), np.float32))
                           for t, (i, r, o) in shapes.items()}
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
                r = a.shape[2]
                A[b, :, :r], B[b, :r] = a[0], bb[0]
                if r < A.shape[2]:
                    A[b, :, r:], B[b, r:] = 0, 0
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
        if self.m._engine.row_lora or not all(_plain(p) for p in singles):
            return self.stacked(sets)
        self.m._slots_ready()
        return self.buffers.plan([self.key(s) for s in sets], singles, max_rows)
