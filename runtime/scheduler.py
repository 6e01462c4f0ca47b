"""Continuous batching: concurrent single-prompt requests on one Model share one decode batch per step.

Every ``generate()`` / ``generate_ids()`` of one prompt (from threads, or ``Model.agenerate`` from asyncio)
runs here when ``Model.batching`` is on (the default):

- the caller's thread reads the request's state under the model's read lock (:meth:`Model._request`), waits
  for a row (at most ``max_rows`` requests run at once; ``max_waiting`` more may wait for one, a further one is
  refused with :class:`QueueFullError`), runs the prompt's prefill alone, in chunks of ``prefill_chunk``
  tokens, and samples the first token;
- the row then joins the decode batch that this module's worker thread runs: one forward per step for every
  running row, each row with its own adapter set (per-row factors, :mod:`runtime.row_lora`), sampler, seed and
  token limit; a row leaves at EOS, at its limit, or when its caller stops reading (a closed stream);
- every forward (a decode step or a prefill chunk) takes its turn in one first-come lock, so a prompt being
  prefilled delays the running rows by one chunk at a time, and the two cores are never split between forwards.

Weights: each request holds its read lock until its row has left the batch, so a merge (``use()`` in merge mode,
an auto-mode merge) waits for every running row and never lands under one. While weights are merged only
requests of the merged (active) set run — as one shared plan; otherwise every row runs beside the pure base
with its own set, which is what a request alone runs: greedy tokens are the same, logits agree to ~1e-7 (on
onnxruntime's int4 graph a batched row's logits move by ~1e-2 — MatMulNBits quantizes its inputs — and greedy
answers can diverge: docs/SERVING.md).

KV cache: the batch's keys / values are one left-padded cache [rows, kv_heads, T, head_dim] per layer, each
row right-aligned (its last token at T-1), updated in place by the engine while the rows stay the same (numpy:
the engine's own buffers; onnxruntime's fused graph: a KVCache bound by IOBinding). When rows join — at
most once per step, all joins of that step together — the cache is rebuilt: the kept rows' windows and the new
rows' prefill caches are copied into a new one as long as the longest row. Cost: one copy of the running rows'
caches per step where rows join, nothing on the steps in between. Rows that only leave stay in place, masked,
until they are as many as the running rows (then the next update rebuilds).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from typing import Any, AsyncIterator, Iterator, Mapping, Sequence

import numpy as np

from edgeadapt.errors import EdgeAdaptError

_END = object()
_LOCK = threading.Lock()  # creates one scheduler per model


class QueueFullError(EdgeAdaptError, RuntimeError):
    """The model already runs ``max_rows`` requests and ``max_waiting`` more wait for a row."""


def scheduler_of(model: Any) -> "Scheduler":
    s = model.__dict__.get("_scheduler")
    if s is None:
        with _LOCK:
            s = model.__dict__.get("_scheduler")
            if s is None:
                s = model.__dict__["_scheduler"] = Scheduler(model)
    return s


class _TurnLock:
    """A first-come, first-served mutex: a decode step and a prefill chunk waiting together run in order."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next, self._serving = 0, 0

    def __enter__(self) -> None:
        with self._cond:
            me, self._next = self._next, self._next + 1
            while self._serving != me:
                self._cond.wait()

    def __exit__(self, *exc: Any) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


class _Row:
    """One request in the batch: its state, its output queue, and the lease (read lock) it runs under."""

    def __init__(self, max_new: int, sampler: Any) -> None:
        self.max_new, self.sampler = max_new, sampler
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.lease = contextlib.ExitStack()
        self.key: Any = None  # ("rows",) or ("merged", plan id): rows of one key share a batch
        self.row_set: dict[str, float] | None = None  # rows: the adapter set ({name: weight}) this row runs
        self.plan: Any = None  # merged: the shared plan
        self.kv: Any = None  # the prefill's cache until the row is copied into the batch
        self.mask0: np.ndarray | None = None  # the prefill's mask [length]; every later token is real
        self.length = 0  # keys this row has in the cache
        self.pos = 0  # position of the next token
        self.last = 0  # the token fed at the next step
        self.count = 0  # tokens delivered
        self.cancelled = False
        self.dead = False  # left, but its slot stays in the batch (masked) until the next rebuild
        self.left = threading.Event()
        self._released = False
        self._on_release: Any = None
        self._once = threading.Lock()

    def release(self) -> None:
        """Drop the read lock and the row slot (idempotent; any thread)."""
        with self._once:
            if self._released:
                return
            self._released = True
        self.lease.close()
        if self._on_release is not None:
            self._on_release()
        self.left.set()


class Scheduler:
    """One model's decode batch and its worker thread (started on demand, gone when idle)."""

    max_rows = 16  # requests running at once (prefill + decode)
    max_waiting = 64  # requests waiting for a row beyond that; one more is refused (QueueFullError)
    prefill_chunk = 128  # prompt tokens per forward while other rows run

    def __init__(self, model: Any) -> None:
        self.m = model
        self.turn = _TurnLock()
        self._cond = threading.Condition()
        self._running = 0  # requests holding a row slot
        self._waiting = 0
        self._joining: list[_Row] = []
        self._thread: threading.Thread | None = None
        # batch state, worker thread only
        self._rows: list[_Row] = []
        self._past: Any = None
        self._mask = np.zeros((0, 0), np.int64)
        self._plan: Any = None
        self._plans: dict[tuple, Any] = {}
        self.steps = 0  # decode steps run (a counter for tests and benchmarks)
        self.rebuilds = 0  # cache rebuilds (steps where rows joined or left)
        self.peak = 0  # the most rows one step has run
        self.cancelled = 0  # rows whose reader stopped before their end

    @property
    def active(self) -> int:
        """Requests holding a row (prefilling or decoding)."""
        return self._running

    # ---- the caller's side
    def _admit(self, row: _Row) -> None:
        with self._cond:
            if self._running >= self.max_rows:
                if self._waiting >= self.max_waiting:
                    raise QueueFullError(f"expected at most {self.max_rows} running and {self.max_waiting} waiting "
                                         f"requests, found {self._running} running and {self._waiting} waiting; "
                                         "retry later, or raise Scheduler.max_waiting")
                self._waiting += 1
                try:
                    while self._running >= self.max_rows:
                        self._cond.wait()
                finally:
                    self._waiting -= 1
            self._running += 1
        row._on_release = self._free

    def _free(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()

    def run(self, ids: Sequence[int], max_new: int, sampler: Any, plan: Any, own: Mapping[str, float] | None
            ) -> Iterator[list[tuple[int, int]]]:
        """One request, as ``Model._steps`` yields it: [(0, token)] per token. ``plan``: the request's own plan
        (``own`` its set) or None (the active set)."""
        m = self.m
        if max_new <= 0:
            return
        x = m._check_ids([list(ids)])
        if plan is None and self._running == 0:
            m._maybe_auto_merge()  # only when idle: a merge would otherwise wait for every running row
        row = _Row(max_new, sampler)
        self._admit(row)
        joined = False
        try:
            plan = row.lease.enter_context(m._request(plan))
            if own is not None:
                row.key, row.row_set = ("rows",), dict(own)
            elif m._merged:
                row.key, row.plan = ("merged", id(plan)), plan
            else:  # live (or nothing active): the active set beside the pure base, as a row of its own
                row.row_set = dict(m.active)
                row.key = ("rows",)
                key = tuple(sorted(row.row_set.items()))
                plan = (m._set_plans.get(key) or m._live_plan([row.row_set])) if row.row_set else None
            t = self._prefill(row, x, plan)
            eos = set(m.config.eos_token_ids)
            if t in eos:
                return
            row.count = 1
            if row.key[0] == "merged" or row.row_set == m.active:
                m._stable_tokens += 1  # auto mode counts every token of the active set, as the loop alone does
            if row.count < max_new:
                row.last = t
                with self._cond:
                    self._joining.append(row)
                    self._start()
                    self._cond.notify_all()
                joined = True
            yield [(0, t)]
            if not joined:
                return
            while True:
                item = row.out.get()
                if item is _END:  # the worker computes nothing more for this row: its lease may go now
                    row.left.set()
                    return
                if isinstance(item, BaseException):
                    raise item
                yield [(0, item)]
        finally:
            if joined and not row.left.is_set():
                row.cancelled = True  # the reader stopped: the worker drops the row at its next step
                with self._cond:
                    self._cond.notify_all()
                row.left.wait()
            row.release()

    def _prefill(self, row: _Row, x: np.ndarray, plan: Any) -> int:
        m = self.m
        S = x.shape[1]
        mask = np.ones_like(x)
        pos = np.arange(S, dtype=np.int64)[None]
        past, mask, pos = m._seq.past(plan, mask, pos)  # a KV prefix (prompt / prefix tuning), if any
        P = mask.shape[1] - S
        for a in range(0, S, max(1, self.prefill_chunk)):
            b = min(S, a + max(1, self.prefill_chunk))
            with self.turn:
                logits, past = m._forward(x[:, a:b], mask[:, :P + b], pos[:, a:b], past, plan)
        row.kv, row.mask0, row.length = past, mask[0], mask.shape[1]
        row.pos = int(pos[0, -1]) + 1
        return int(row.sampler(logits[:, -1])[0])

    # ---- the worker
    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="edgeadapt-scheduler", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._joining and not self._rows:
                    if not self._cond.wait(timeout=5.0) and not self._joining:
                        self._thread = None  # idle: the next request starts a new worker
                        self._past = None
                        return
                joins, self._joining = self._joining, []
            try:
                self._update(joins)
                if self._rows:
                    self._step()
            except BaseException as e:  # the engine failed: every row gets the error, the batch starts over
                failed = self._rows + [j for j in joins if j not in self._rows]
                with self._cond:
                    self._joining = [j for j in self._joining if j not in failed]
                for r in failed:
                    r.out.put(e)
                    r.release()
                self._rows, self._past, self._plan = [], None, None

    def _update(self, joins: list[_Row]) -> None:
        """Rows that finished or were cancelled leave, rows of the batch's kind join. Joins rebuild the cache;
        rows that only leave stay in it, masked, until they are as many as the running ones (then a rebuild)."""
        live = [r for r in self._rows if not r.dead]
        keep = [r for r in live if not (r.cancelled or r.count >= r.max_new)]
        gone = [r for r in live if r not in keep] + [j for j in joins if j.cancelled]
        self.cancelled += sum(r.cancelled and r.count < r.max_new for r in gone)
        joins = [j for j in joins if not j.cancelled]
        key = keep[0].key if keep else (joins[0].key if joins else None)
        now = [j for j in joins if j.key == key]
        with self._cond:  # rows of another kind wait until this batch has drained (no merge lands under it)
            self._joining[:0] = [j for j in joins if j.key != key]
        if not gone and not now:
            return
        rows = keep + now
        dead = len(self._rows) - len(live)
        if keep and not now and dead + len(gone) <= len(keep):  # no copy this step: their slots idle, masked
            for r in gone:
                r.dead = True
        elif rows:
            self._rebuild(keep, now)
        else:
            self._rows, self._past, self._plan = [], None, None
        for r in gone:
            r.release()

    def _rebuild(self, keep: list[_Row], new: list[_Row]) -> None:
        m = self.m
        rows = keep + new
        T = max(r.length for r in rows)
        cfg = m.config
        shape = (len(rows), cfg.n_kv_heads, T, cfg.head_dim)
        layers = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(cfg.n_layers)]
        mask = np.zeros((len(rows), T), np.int64)
        old = m._engine.cache_layers(self._past) if keep else None
        for b, r in enumerate(rows):
            if r in new:
                src, i = m._engine.cache_layers(r.kv), 0
                mask[b, T - r.length:T - r.length + len(r.mask0)] = r.mask0
                mask[b, T - r.length + len(r.mask0):] = 1
            else:
                src, i = old, self._rows.index(r)
                mask[b, T - r.length:] = self._mask[i, self._mask.shape[1] - r.length:]
            L = r.length
            for (K, V), (k, v, n) in zip(layers, src):
                K[b, :, T - L:] = k[i, :, n - L:n]
                V[b, :, T - L:] = v[i, :, n - L:n]
        for r in new:
            r.kv = None
        self._rows, self._mask = rows, mask
        self.peak = max(self.peak, len(rows))
        key = rows[0].key
        if key[0] == "merged":
            self._plan = rows[0].plan
        else:
            sets = tuple(tuple(sorted((n, w, id(m.adapters.get(n))) for n, w in r.row_set.items())) for r in rows)
            plan = self._plans.get(sets)
            if plan is None:
                plan = m._live_plan([r.row_set for r in rows]) if any(sets) else None
                if len(self._plans) >= 32:
                    self._plans.clear()
                self._plans[sets] = plan
            if plan:
                m._slots_ready()
            self._plan = plan
        self._past = m._engine.cache_from(layers, self._plan)
        self.rebuilds += 1

    def _step(self) -> None:
        m = self.m
        rows = self._rows
        x = np.array([[r.last] for r in rows], np.int64)
        pos = np.array([[r.pos] for r in rows], np.int64)
        self._mask = np.concatenate([self._mask, np.array([[0 if r.dead else 1] for r in rows], np.int64)], axis=1)
        with self.turn:
            logits, self._past = m._forward(x, self._mask, pos, self._past, self._plan)
        self.steps += 1
        eos = set(m.config.eos_token_ids)
        delivered = 0
        for b, r in enumerate(rows):
            r.length += 1
            r.pos += 1
            if r.cancelled or r.dead:
                continue
            t = int(r.sampler(logits[b:b + 1, -1])[0])
            if t in eos:
                r.count = r.max_new  # leaves at the next update
                r.out.put(_END)
                continue
            r.count += 1
            r.last = t
            r.out.put(t)
            delivered += 1
            if r.count >= r.max_new:
                r.out.put(_END)
        if all(r.dead or r.key[0] == "merged" or r.row_set == m.active for r in rows):
            m._stable_tokens += delivered  # auto mode: the active set has run alone this step
        else:  # a mixed batch: no set has run alone
            m._stable_tokens = 0


# ---- token streams, asyncio
def stream_tokens(model: Any, ids: Sequence[int], max_new: int, sampler: Any, adapter: Any = None) -> Iterator[int]:
    """Generated token ids of one prompt, as they come (EOS excluded), with ``adapter`` (a name, ``{name: weight}``)
    as its own set, or the active set when None; closing the iterator frees the row."""
    own = None if adapter is None else model._normalise(adapter)
    plan = model._plan(None if adapter is None else [adapter], 1)
    for step in model._steps([list(ids)], max_new, sampler, plan, own):
        for _, t in step:
            yield t


async def aiterate(make: Any) -> AsyncIterator[Any]:
    """An async iterator over the sync iterator ``make()`` returns, each ``next`` in the event loop's executor;
    closing it (or cancelling its task) closes the sync one there, which frees a request's row."""
    loop = asyncio.get_running_loop()
    it = await loop.run_in_executor(None, lambda: iter(make()))
    lock = threading.Lock()  # next() and close() never overlap (a cancelled await may leave a next() running)

    def step() -> Any:
        with lock:
            return next(it, _END)

    def close() -> None:
        with lock:
            getattr(it, "close", lambda: None)()

    try:
        while True:
            item = await loop.run_in_executor(None, step)
            if item is _END:
                return
            yield item
    finally:
        await asyncio.shield(loop.run_in_executor(None, close))


def agenerate(model: Any, prompt: Any, max_new_tokens: int = 64, *, stream: bool = False, **kw: Any) -> Any:
    """``Model.agenerate``: the text (an awaitable), or with ``stream=True`` an async iterator of pieces. The
    request runs in the scheduler like a thread's; cancelling the task (or closing the iterator) frees its row."""
    pieces = aiterate(lambda: model.generate(prompt, max_new_tokens, stream=True, **kw))
    if stream:
        return pieces

    async def text() -> str:
        return "".join([p async for p in pieces])
    return text()
