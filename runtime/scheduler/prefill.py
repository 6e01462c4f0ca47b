"""Prefill turns of the scheduler (:class:`edgeadapt.runtime.scheduler.core.Scheduler`): the waiting short prompts
of the batch's kind together, or the next chunk of a prompt prefilled alone; a prompt that starts with a kept
prompt start of its adapter set prefills only the rest. Each prefilled row then waits to join the decode batch."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeadapt.runtime.scheduler.rows import _Row


class Prefills:
    """The prefill half of :class:`~edgeadapt.runtime.scheduler.core.Scheduler` (its state and settings)."""

    def _prefill_turn(self) -> None:
        """One prefill forward, if a prompt waits: the next chunk of the oldest prompt that runs alone, or the
        waiting short prompts of the batch's kind together."""
        with self._cond:
            gone = [r for r in self._pending if r.cancelled]
            self._pending = [r for r in self._pending if not r.cancelled]
            pending = list(self._pending)
        for r in gone:
            self.cancelled += 1
            self._finish(r)
        if not pending:
            return
        key = self._rows[0].key if any(not r.dead for r in self._rows) else None
        ok = [r for r in pending if key is None or r.key == key]  # another kind waits until the batch drains
        if not ok:
            return
        if ok[0].alone:
            return self._prefill_alone(ok[0])
        key, group, hits, width, spent = ok[0].key, [], [], 0, 0
        right = self.m._engine.pads_right  # each prompt prefilled at batch 1, as alone (see _rebuild)
        for r in ok:  # within prefill_tokens: a prompt whose start is cached costs its rest, the others the padding
            if r.alone or r.key != key:
                continue
            n, kept = self._reusable(r)
            if n or right:
                cost = len(r.ids) - n
            else:
                cost = max(width, len(r.ids)) * (len(group) + 1) - width * len(group)
            if (group or hits) and spent + cost > self.prefill_tokens:
                continue
            spent += cost
            if n:
                hits.append((r, n, kept))
            else:
                group.append(r)
                width = max(width, len(r.ids))
        for k, (r, n, kept) in enumerate(hits):
            self._prefill_rest(r, n, kept, k)
        if group and right:  # batch 1 each: a row's keys and logits are then exactly its alone ones
            for k, r in enumerate(group):
                self._prefill_rest(r, 0, None, len(hits) + k)
        elif group:
            self._prefill_group(group, len(hits))

    def _taken(self, rows: list[_Row]) -> None:
        """Rows out of the queue: the worker holds them until they finish (an error then reaches them too)."""
        with self._cond:
            self._pending = [r for r in self._pending if r not in rows]
        self._held.update(dict.fromkeys(rows))

    def _prefill_alone(self, row: _Row) -> None:
        m = self.m
        S = len(row.ids)
        if row.done == 0:
            mask = np.ones((1, S), np.int64)
            pos = np.arange(S, dtype=np.int64)[None]
            row.kv, row.mask0, row.pos_all = m._seq.past(row.plan, mask, pos)  # a KV prefix, if any
        P = row.mask0.shape[1] - S
        a, b = row.done, min(S, row.done + max(1, self.prefill_chunk))
        plan = self._prefill_plan([row])
        try:
            with self.turn:
                logits, row.kv = m._forward(row.ids[None, a:b], row.mask0[:, :P + b], row.pos_all[:, a:b], row.kv, plan)
        except BaseException as e:
            self._taken([row])
            self._finish(row, e)
            return
        self.prefills += 1
        row.done = b
        if b < S:
            return
        self._taken([row])
        row.cache = row.kv
        row.kv, row.mask0, row.length = (m._engine.cache_layers(row.kv), 0), row.mask0[0], row.mask0.shape[1]
        row.pos = int(row.pos_all[0, -1]) + 1
        self._first(row, logits[:, -1])

    # ---- prompt starts kept per adapter set
    @property
    def _prefix_min(self) -> int:
        return self.prefix_min or 0

    def _reusable(self, r: _Row) -> tuple[int, Any]:
        """How many of the row's first prompt tokens have their keys / values kept (0: fewer than prefix_min), and
        the kept entry they are in (a later prefill of the set replaces the entry, never changes it)."""
        kept = self._prefixes.get(self.plans.key(r.row_set)) if r.key[0] == "rows" and self._prefix_min else None
        if kept is None:
            return 0, None
        ids = kept[0]
        n = min(len(ids), len(r.ids) - 1)
        diff = np.flatnonzero(ids[:n] != r.ids[:n])
        n = int(diff[0]) if len(diff) else n
        return (n, kept) if n >= self._prefix_min else (0, None)

    def _keep_prefix(self, r: _Row, layers: list, b: int) -> None:
        """Keep row b's prompt keys / values (from a prefill's cache) for later prompts of its set."""
        if r.key[0] != "rows" or not self._prefix_min:
            return
        S = len(r.ids)
        kv = [(k[b:b + 1, :, n - S:n].copy(), v[b:b + 1, :, n - S:n].copy()) for k, v, n in layers]
        key = self.plans.key(r.row_set)
        self._prefixes.pop(key, None)
        if len(self._prefixes) >= self.prefix_sets:
            self._prefixes.pop(next(iter(self._prefixes)))  # the set kept longest ago
        self._prefixes[key] = (r.ids.copy(), kv)

    def _prefill_rest(self, r: _Row, n: int, kept: Any, offset: int) -> None:
        """A prompt whose first n tokens' keys / values are kept: the rest in one forward after them (batch 1);
        n = 0: the whole prompt at batch 1, as the request alone runs it."""
        m = self.m
        self._taken([r])
        S = len(r.ids)
        past = None
        if n:
            past = [(np.ascontiguousarray(k[:, :, :n]), np.ascontiguousarray(v[:, :, :n])) for k, v in kept[1]]
        try:
            plan = self._prefill_plan([r], offset)
            with self.turn:
                logits, past = m._forward(r.ids[None, n:], np.ones((1, S), np.int64),
                                          np.arange(n, S, dtype=np.int64)[None], past, plan)
        except BaseException as e:
            self._finish(r, e)
            return
        self.prefills += 1
        self.prefix_hits += n > 0
        self.peak_prefill = max(self.peak_prefill, 1)
        layers = m._engine.cache_layers(past)
        r.kv, r.mask0, r.length, r.pos, r.cache = (layers, 0), np.ones(S, np.int64), S, S, past
        self._keep_prefix(r, layers, 0)
        self._first(r, logits[:, -1])

    def _prefill_group(self, rows: list[_Row], offset: int = 0) -> None:
        """Prompts together in one left-padded forward, each row with its own plan — as generate([...]) runs."""
        m = self.m
        self._taken(rows)
        S = max(len(r.ids) for r in rows)
        x = np.zeros((len(rows), S), np.int64)
        mask = np.zeros((len(rows), S), np.int64)
        for b, r in enumerate(rows):
            x[b, S - len(r.ids):], mask[b, S - len(r.ids):] = r.ids, 1
        pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
        try:
            plan = self._prefill_plan(rows, offset)
            with self.turn:
                logits, past = m._forward(x, mask, pos, None, plan)
        except BaseException as e:
            for r in rows:
                self._finish(r, e)
            return
        self.prefills += 1
        self.peak_prefill = max(self.peak_prefill, len(rows))
        layers = m._engine.cache_layers(past)
        for b, r in enumerate(rows):
            r.kv, r.mask0, r.length, r.pos = (layers, b), np.ones(len(r.ids), np.int64), len(r.ids), len(r.ids)
            r.cache = past if len(rows) == 1 and S == len(r.ids) else None
            self._keep_prefix(r, layers, b)
            self._first(r, logits[b:b + 1, -1])

    def _first(self, r: _Row, logits: np.ndarray) -> None:
        """The prefill's token: the row's first; it joins the batch unless that ended it."""
        m = self.m
        if self._deliver(r, int(r.sampler(logits)[0])) and (r.key[0] == "merged" or r.row_set == m.active):
            m._stable_tokens += 1  # auto mode counts every token of the active set, as the loop alone does
        if r.count < r.max_new:
            self._joining.append(r)
        else:
            r.kv = r.cache = None

    def _prefill_plan(self, rows: list[_Row], offset: int = 0) -> Any:
        if rows[0].key[0] == "merged" or rows[0].alone:
            return rows[0].plan  # the shared plan; a row alone: its plan as made for it (a KV prefix runs with it)
        # the rows' factors go after the running batch's (whose forward has them bound), or from the first row when
        # none of its rows runs any more (it is rebuilt before its next step): where rows of their sets were
        running = any(not (r.dead or r.cancelled or r.count >= r.max_new) for r in self._rows)
        return self.plans.prefill([r.row_set for r in rows], (len(self._rows) if running else 0) + offset,
                                  self.max_rows)
