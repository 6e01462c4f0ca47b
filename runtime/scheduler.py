"""Continuous batching: concurrent single-prompt requests on one Model share one decode batch per step.

Every ``generate()`` / ``generate_ids()`` of one prompt (from threads, or ``Model.agenerate`` from asyncio)
runs here when ``Model.batching`` is on (the default):

- the caller reads the request's state under the model's read lock (:meth:`Model._request`) and waits for a
  row: at most ``max_rows`` requests run at once, ``max_waiting`` more may wait, a further one is refused with
  :class:`QueueFullError`;
- everything else runs in this module's worker thread, one forward at a time: prefills and decode steps
  alternate. Prompts of up to ``prefill_chunk`` tokens waiting together are prefilled in one turn (at most
  ``prefill_tokens`` padded tokens): at batch 1 each where the engine takes right-padded rows (``pads_right``:
  onnxruntime's fused graphs), exactly as alone; elsewhere in one left-padded forward, each row with its own
  adapter set. A longer prompt (or one with a KV prefix) is prefilled alone, one chunk per turn. A prompt that
  starts with at least ``prefix_min`` tokens of the last prompt of its set reuses their kept keys / values;
- the rows then join the decode batch: one forward per step for every running row, each with its own adapter
  set (per-row factors, :mod:`runtime.row_lora`), sampler, seed and token limit; a row leaves at EOS, at its
  limit, or when its caller stops reading (a closed stream, a cancelled task). Each step's tokens go out once:
  through a thread's queue, or one ``call_soon_threadsafe`` per event loop for all its rows.

Weights: each request holds its read lock until its row has left the batch, so a merge waits for every running
row and never lands under one. While weights are merged only requests of the merged (active) set run, as one
shared plan; otherwise every row runs beside the pure base with its own set, as it runs alone: greedy tokens
the same, logits within ~1e-7 on numpy, bit for bit on onnxruntime's fused graphs (int4 included, where
MatMulNBits quantizes its inputs: docs/SERVING.md). Each set's one-row factors are made once
(:class:`runtime.row_lora.BatchPlans`); a joining row overwrites only the buffer rows whose set changed.

KV cache: one [rows, kv_heads, T, head_dim] per layer, updated in place while the rows stay (onnxruntime's fused
graph: a KVCache bound by IOBinding). Where the engine ``pads_right`` each row's keys are at [0, len) and
GroupQueryAttention writes its new one after them: its sums run over exactly its alone keys; elsewhere the cache
is left-padded. When rows join (all joins of a step together) the cache is rebuilt as long as the longest row:
the kept rows' windows and the new rows' prefill caches are copied straight into onnxruntime's new in-place
cache (else into arrays for the engine). A row that finds the batch empty decodes on its prefill's own cache:
no copy. Rows that only leave stay, masked, while that costs less than a rebuild (``idle_row_steps``).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from edgeadapt.errors import EdgeAdaptError
from edgeadapt.runtime.row_lora import BatchPlans
from edgeadapt.runtime.rwlock import TurnLock

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


def _push_all(items: list[tuple[Any, Any]]) -> None:
    """On an event loop: each (sink, item) of one step (runtime.streams.LoopSink)."""
    for sink, item in items:
        sink.push(item)


class _Row:
    """One request in the batch: its state, its output (a queue, or a LoopSink), and the lease (read lock)."""

    def __init__(self, ids: np.ndarray, max_new: int, sampler: Any, sink: Any) -> None:
        self.ids, self.max_new, self.sampler, self.sink = ids, max_new, sampler, sink
        self.lease = contextlib.ExitStack()
        self.key: Any = None  # ("rows",) or ("merged", plan id): rows of one key share a batch
        self.row_set: dict[str, float] | None = None  # rows: the adapter set ({name: weight}) this row runs
        self.plan: Any = None  # merged: the shared plan; rows: the plan it was admitted with (a KV prefix, alone)
        self.alone = False  # prefilled alone in chunks (a long prompt, a KV prefix)
        self.done = 0  # prompt tokens prefilled so far (alone)
        self.pos_all: np.ndarray | None = None  # the prompt's positions (alone)
        self.kv: Any = None  # (cache layers, row index) of its prefill until the row is copied into the batch
        self.cache: Any = None  # its batch-1 prefill's own cache (keys at [0, length)): a batch it starts decodes on it
        self.mask0: np.ndarray | None = None  # the prefill's mask [length]; every later token is real
        self.length = 0  # keys this row has in the cache
        self.pos = 0  # position of the next token
        self.last = 0  # the token fed at the next step
        self.count = 0  # tokens delivered
        self.cancelled = False
        self.ended = False  # its reader got (or gets) its last item
        self.dead = False  # left, but its slot stays in the batch (masked) until the next rebuild
        self.left = threading.Event()
        self._released = False
        self._on_release: Any = None
        self._once = threading.Lock()
        self._state = threading.Lock()  # ended / cancelled: whoever sees both releases the row

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
    prefill_chunk = 128  # prompt tokens per forward of a prompt prefilled alone; longer prompts are prefilled alone
    prefill_tokens = 512  # padded prompt tokens (rows × longest) per batched prefill forward
    # rows that left stay in the batch, masked, while (rows left) × (steps the batch may still run) is at most
    # this; beyond it the batch is rebuilt without them (SmolLM2-135M int4, 8 rows: a rebuild ~25 ms, a masked
    # row ~2.5 ms per step)
    idle_row_steps = 16
    # a prompt starting with at least this many tokens of the last prompt of its adapter set (a chat template's
    # system part, a shared instruction) reuses their keys / values and prefills only the rest; 0: never. None:
    # 16 on float arithmetic, 0 on an engine that quantizes its matmuls' inputs (int4 / int8 on onnxruntime),
    # where a prompt prefilled in two pieces would no longer give m.generate's answer (its logits move by ~0.8: an
    # adapter's float products round otherwise at another row count, and the next layer's int8 inputs magnify it;
    # the bare base's pieces of two or more tokens are bit for bit, a last piece of one token is not)
    prefix_min: int | None = None
    prefix_sets = 8  # sets whose last prompt is kept (SmolLM2-135M: 46 KB per token, ≤ 128 tokens each)

    def __init__(self, model: Any) -> None:
        self.m = model
        self._eos = set(model.config.eos_token_ids)
        self.turn = TurnLock()
        self._cond = threading.Condition()
        self._running = 0  # requests holding a row slot
        self._waiting = 0
        self._pending: list[_Row] = []  # admitted, waiting for (or in) their prefill
        self._joining: list[_Row] = []  # prefilled, waiting to join the batch
        self._thread: threading.Thread | None = None
        # batch state, worker thread only
        self._rows: list[_Row] = []
        self._past: Any = None
        self._mask = np.zeros((0, 0), np.int64)
        self._right = False  # a right-padded batch, each row's keys at [0, len) (Engine.pads_right); else left-padded
        self._plan: Any = None
        self.plans = BatchPlans(model)
        self._out: list[tuple[_Row, Any]] = []  # this turn's deliveries
        self.steps = 0  # decode steps run (a counter for tests and benchmarks)
        self.prefills = 0  # prefill forwards run
        self.rebuilds = 0  # cache rebuilds (steps where rows joined or left)
        self.adopted = 0  # batches started by one row on its prefill's own cache (no rebuild)
        self.peak = 0  # the most rows one step has run
        self.peak_prefill = 0  # the most prompts one prefill forward has run
        self.prefix_hits = 0  # prompts prefilled after kept keys / values of their start
        self._prefixes: dict[tuple, tuple[np.ndarray, list]] = {}  # set key -> (prompt ids, its (k, v) per layer)
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

    def submit(self, ids: Sequence[int], max_new: int, sampler: Any, plan: Any, own: Mapping[str, float] | None,
               sink: Any) -> _Row:
        """Admit one request (blocks while the rows are full) and hand it to the worker; its tokens, then _END
        (or an exception), arrive in ``sink`` (a SimpleQueue, or a runtime.streams.LoopSink). ``plan``: its own plan
        (``own`` its set) or None (the active set)."""
        m = self.m
        x = np.asarray(m._check_ids([list(ids)])[0], np.int64)
        if plan is None and self._running == 0:
            m._maybe_auto_merge()  # only when idle: a merge would otherwise wait for every running row
        row = _Row(x, max_new, sampler, sink)
        self._admit(row)
        try:
            plan = row.lease.enter_context(m._request(plan))
            if own is not None:
                row.key, row.row_set, row.plan = ("rows",), dict(own), plan
            elif m._merged:
                row.key, row.plan = ("merged", id(plan)), plan
            else:  # live (or nothing active): the active set beside the pure base, as a row of its own
                row.key, row.row_set, row.plan = ("rows",), dict(m.active), plan
            mask, pos = np.ones((1, len(x)), np.int64), np.arange(len(x), dtype=np.int64)[None]
            row.alone = len(x) > self.prefill_chunk or m._seq.past(row.plan, mask, pos)[0] is not None
        except BaseException:
            row.release()
            raise
        with self._cond:
            self._pending.append(row)
            self._start()
            self._cond.notify_all()
        return row

    def cancel(self, row: _Row, wait: bool) -> None:
        """The reader stopped (or read the end): a row that has ended is released now, any other is dropped by
        the worker at its next turn (``wait``: until it has)."""
        if row.left.is_set():
            return
        with row._state:
            row.cancelled, ended = True, row.ended
        if ended:
            row.release()
            return
        with self._cond:
            self._start()
            self._cond.notify_all()
        if wait:
            row.left.wait()

    def run(self, ids: Sequence[int], max_new: int, sampler: Any, plan: Any, own: Mapping[str, float] | None
            ) -> Iterator[list[tuple[int, int]]]:
        """One request, as ``Model._steps`` yields it: [(0, token)] per token."""
        if max_new <= 0:
            return
        sink: queue.SimpleQueue = queue.SimpleQueue()
        row = self.submit(ids, max_new, sampler, plan, own, sink)
        try:
            while True:
                item = sink.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield [(0, item)]
        finally:
            self.cancel(row, wait=True)

    # ---- the worker
    def _start(self) -> None:  # under self._cond
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="edgeadapt-scheduler", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._joining and not self._rows:
                    if not self._cond.wait(timeout=5.0) and not self._pending and not self._joining:
                        self._thread = None  # idle: the next request starts a new worker
                        self._past = None
                        return
            try:
                self._prefill_turn()
                joins, self._joining = self._joining, []
                self._update(joins)
                if self._rows:
                    self._step()
            except BaseException as e:  # the engine failed: every row gets the error, the batch starts over
                failed = self._rows + [j for j in self._joining if j not in self._rows]
                self._rows, self._past, self._plan, self._joining = [], None, None, []
                for r in failed:
                    self._finish(r, e)
            self._flush()

    def _finish(self, r: _Row, item: Any = _END) -> None:
        """The row gets nothing more: its reader learns (_END or the error) and releases the row when it reads it
        (a slot is held, and a merge waits, until then); a reader that already left: released here."""
        with r._state:
            first, gone = not r.ended, r.cancelled
            r.ended = True
        if first:
            self._out.append((r, item))
        if gone:
            r.release()

    def _flush(self) -> None:
        """This turn's tokens: into each thread's queue, and to each event loop in one call."""
        out, self._out = self._out, []
        loops: dict[Any, list[tuple[_Row, Any]]] = {}
        for r, item in out:
            loop = getattr(r.sink, "loop", None)  # an asyncio request's LoopSink (runtime.streams)
            if loop is not None:
                loops.setdefault(loop, []).append((r, item))
            else:
                r.sink.put(item)
        for loop, items in loops.items():
            try:
                loop.call_soon_threadsafe(_push_all, [(r.sink, item) for r, item in items])
            except RuntimeError:  # the loop is closed: nobody reads these rows any more
                for r, _ in items:
                    self.cancel(r, wait=False)

    def _deliver(self, r: _Row, t: int) -> bool:
        """A sampled token of row r: EOS ends it (False: nothing delivered), the limit ends it after this token."""
        if t in self._eos:
            r.count = r.max_new
            self._finish(r)
            return False
        r.count += 1
        r.last = t
        self._out.append((r, t))
        if r.count >= r.max_new:
            self._finish(r)
        return True

    # ---- prefills
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
        with self._cond:
            self._pending = [r for r in self._pending if r not in rows]

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
        if self.prefix_min is not None:
            return self.prefix_min
        return 0 if self.m._engine.quantizes_inputs else 16

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

    # ---- the decode batch
    def _update(self, joins: list[_Row]) -> None:
        """Rows that finished or were cancelled leave, rows of the batch's kind join. Joins rebuild the cache;
        rows that only leave stay in it, masked, while they would cost less than a rebuild (``idle_row_steps``)."""
        live = [r for r in self._rows if not r.dead]
        keep = [r for r in live if not (r.cancelled or r.count >= r.max_new)]
        gone = [r for r in live if r not in keep] + [j for j in joins if j.cancelled]
        self.cancelled += sum(r.cancelled and r.count < r.max_new for r in gone)
        joins = [j for j in joins if not j.cancelled]
        key = keep[0].key if keep else (joins[0].key if joins else None)
        now = [j for j in joins if j.key == key]
        self._joining[:0] = [j for j in joins if j.key != key]  # (none: prefills take the batch's kind only)
        for r in gone:
            r.kv = r.cache = None
            self._finish(r)  # released here if its reader left, else by its reader at _END
        if not gone and not now:
            return
        dead = len(self._rows) - len(live) + len(gone)
        left = max((r.max_new - r.count for r in keep), default=0)  # steps the batch may still run
        if keep and not now and dead * left <= self.idle_row_steps:  # no copy: their slots idle, masked
            for r in gone:
                r.dead = True
        elif keep or now:
            self._rebuild(keep, now)
        else:
            self._rows, self._past, self._plan = [], None, None

    def _rebuild(self, keep: list[_Row], new: list[_Row]) -> None:
        """A new cache for these rows: each row's keys at [0, len) where the engine takes right-padded rows
        (``pads_right``: its sums then run over exactly its own keys, as alone), else at [T − len, T)."""
        m = self.m
        rows = keep + new
        if rows[0].key[0] != "merged":
            rows = self.plans.order(rows)  # a row goes where the plan's buffers hold its set already
        plan = rows[0].plan if rows[0].key[0] == "merged" else self.plans.decode(rows, self.max_rows)
        T = max(r.length for r in rows)
        right = m._engine.pads_right
        cfg = m.config
        old = m._engine.cache_layers(self._past) if keep else None
        # one row that starts the batch decodes on its prefill's own cache; else onnxruntime's in-place cache is
        # made blank and the keys go straight in, or arrays are filled for the engine's cache_from
        own = m._engine.adopt_cache(new[0].cache, plan, T) if not keep and len(new) == 1 and new[0].cache else None
        made = None if own is not None else m._engine.blank_cache(len(rows), T, plan)
        shape = (len(rows), cfg.n_kv_heads, T, cfg.head_dim)
        layers = made[1] if made else [] if own is not None else [
            (np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(cfg.n_layers)]
        mask = np.zeros((len(rows), T), np.int64)
        for b, r in enumerate(rows):
            L = r.length
            a = 0 if right else T - L  # where its keys go
            if r.kv is not None:  # joining: its prefill's cache, the row's keys its last L positions
                src, i = r.kv
                mask[b, a:a + len(r.mask0)] = r.mask0
                mask[b, a + len(r.mask0):a + L] = 1
                windows = [(k[i, :, n - L:n], v[i, :, n - L:n]) for k, v, n in src]
            else:  # kept: where the running batch holds it
                i = self._rows.index(r)
                w = 0 if self._right else self._mask.shape[1] - L
                mask[b, a:a + L] = self._mask[i, w:w + L]
                windows = [(k[i, :, w:w + L], v[i, :, w:w + L]) for k, v, _ in old]
            for (K, V), (k, v) in zip(layers, windows):
                K[b, :, a:a + L] = k
                V[b, :, a:a + L] = v
        for r in new:
            r.kv = r.cache = None
        self._rows, self._mask, self._right = rows, mask, right
        self.peak = max(self.peak, len(rows))
        self._plan = plan
        self._past = own if own is not None else made[0] if made else m._engine.cache_from(layers, plan)
        self.adopted += own is not None
        self.rebuilds += own is None

    def _step(self) -> None:
        m = self.m
        rows = self._rows
        x = np.array([[r.last] for r in rows], np.int64)
        pos = np.array([[r.pos] for r in rows], np.int64)
        self._mask = np.concatenate([self._mask, np.zeros((len(rows), 1), np.int64)], axis=1)
        for b, r in enumerate(rows):  # the new token's key: after the row's own keys (right-padded), else at the end
            if not r.dead:
                self._mask[b, r.length if self._right else -1] = 1
        with self.turn:
            logits, self._past = m._forward(x, self._mask, pos, self._past, self._plan)
        self.steps += 1
        delivered = 0
        for b, r in enumerate(rows):
            r.length += 1
            r.pos += 1
            if r.cancelled or r.dead or r.count >= r.max_new:
                continue
            delivered += self._deliver(r, int(r.sampler(logits[b:b + 1, -1])[0]))
        if all(r.dead or r.key[0] == "merged" or r.row_set == m.active for r in rows):
            m._stable_tokens += delivered  # auto mode: the active set has run alone this step
        else:  # a mixed batch: no set has run alone
            m._stable_tokens = 0
