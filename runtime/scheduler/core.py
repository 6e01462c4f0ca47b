"""The scheduler: admission (rows, a bounded queue), the worker thread, and the decode batch — its rows, cache and
one forward per step. Prefill turns: :mod:`.prefill`. What it does as a whole: the package's docstring."""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from edgeadapt.errors import EdgeAdaptError
from edgeadapt.runtime.row_lora import BatchPlans
from edgeadapt.runtime.rwlock import TurnLock
from edgeadapt.runtime.scheduler.prefill import Prefills
from edgeadapt.runtime.scheduler.rows import _END, _Row

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


class Scheduler(Prefills):
    """One model's decode batch and its worker thread (started on demand, gone when idle)."""

    max_rows = 16  # requests running at once (prefill + decode)
    max_waiting = 64  # requests waiting for a row beyond that; one more is refused (QueueFullError)
    prefill_chunk = 128  # prompt tokens per forward of a prompt prefilled alone; longer prompts are prefilled alone
    prefill_tokens = 512  # padded prompt tokens (rows × longest) per batched prefill forward
    # where the batch cannot change in place (numpy; graphs without right padding), rows that left stay in it,
    # masked, while (rows left) × (steps the batch may still run) is at most this; beyond it the batch is rebuilt
    # without them (SmolLM2-135M int4, 8 rows: a rebuild ~25 ms, a masked row ~2.5 ms per step)
    idle_row_steps = 16
    # a prompt starting with at least this many tokens of the last prompt of its adapter set (a chat template's
    # system part, a shared instruction) reuses their keys / values and prefills only the rest; 0 (the default):
    # never. Opt-in, because a prompt prefilled in two pieces is no longer exactly its alone prompt: on float
    # arithmetic its logits move by float32 rounding (the rest attends to the kept keys in a second forward:
    # SmolLM2-135M fp32 ~2.5e-5, the tiny test models up to 6e-5 with some tokens, over the 1e-5 a batched request
    # keeps from its alone answer); on an engine that quantizes its matmuls' inputs (int4 / int8 on onnxruntime) by
    # ~0.8 (an adapter's float products round otherwise at another row count, and the next layer's int8 inputs
    # magnify it; the bare base's pieces of two or more tokens are bit for bit, a last piece of one token is not)
    prefix_min: int | None = 0
    prefix_sets = 8  # sets whose last prompt is kept (SmolLM2-135M: 46 KB per token, ≤ 128 tokens each)

    def __init__(self, model: Any) -> None:
        self.m = model
        self._eos = set(model.config.eos_token_ids)
        self.turn = TurnLock()
        self._cond = threading.Condition()
        self._running = 0  # requests holding a row slot
        self._waiting = 0
        self._pending: list[_Row] = []  # admitted, waiting for (or in) their prefill
        # rows a prefill took from _pending and not yet finished — prefilling, joining or in the batch — in the order
        # taken (worker thread only): what an error in the worker reaches
        self._held: dict[_Row, None] = {}
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
        self.joined = 0  # rows that joined the running batch in place (no rebuild)
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
            except BaseException as e:  # the engine failed: every row it holds gets the error, the batch starts over
                failed = list(self._held)
                self._rows, self._past, self._plan, self._joining = [], None, None, []
                for r in failed:
                    self._finish(r, e)
            self._flush()

    def _finish(self, r: _Row, item: Any = _END) -> None:
        """The row gets nothing more: its reader learns (_END or the error) and releases the row when it reads it
        (a slot is held, and a merge waits, until then); a reader that already left: released here."""
        self._held.pop(r, None)
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

    # ---- the decode batch
    def _update(self, joins: list[_Row]) -> None:
        """Rows that finished or were cancelled leave, rows of the batch's kind join: in place where the engine's
        cache allows (:meth:`_in_place`); elsewhere joins rebuild the cache, and rows that only leave stay in it,
        masked, while they would cost less than a rebuild (``idle_row_steps``)."""
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
        if (keep or now) and self._in_place(keep, now):
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

    def _in_place(self, keep: list[_Row], new: list[_Row]) -> bool:
        """The batch changes in place, where the engine's cache holds rows up to a capacity, each row's keys at
        [0, len) (onnxruntime's in-place cache, right-padded): a new row takes the slot of a row that left (one whose
        factors the buffers hold already first), else goes after the last; slots still empty then take the last
        rows. Only the new and the moved rows' keys are copied, the mask narrows to the longest row, and no slot
        idles. False: the caller keeps idle rows or rebuilds the batch."""
        m = self.m
        if not (self._right and self._rows and (not new or self._rows[0].key == new[0].key)):
            return False
        rows: list[Any] = [r if r in keep else None for r in self._rows]  # None: a slot free to take
        held = self.plans.buffers.keys
        for r in new:  # merged rows share one plan: any free slot; a row of a set: where the buffers hold it
            free = [b for b, x in enumerate(rows) if x is None]
            key = self.plans.key(r.row_set) if r.key[0] == "rows" else None
            b = next((b for b in free if key and b < len(held) and held[b] == key), free[0] if free else len(rows))
            rows[b:b + 1] = [r]
        while None in rows:  # the last row fills the first free slot
            last = rows.pop()
            if last is not None:
                rows[rows.index(None)] = last
        if not rows:
            return False
        plan = rows[0].plan if rows[0].key[0] == "merged" else self.plans.decode(rows, self.max_rows)
        if not m._engine.reserve_rows(self._past, len(rows), T := max(r.length for r in rows), plan):
            return False
        layers = m._engine.cache_layers(self._past)
        mask = np.zeros((len(rows), T), np.int64)
        for b, r in enumerate(rows):  # a moved row goes to a slot a row left: its own slot is not written before
            self._place(layers, layers, mask, b, r, True)
        for r in new:
            r.kv = r.cache = None
        self._rows, self._mask, self._plan = rows, mask, plan
        self.peak = max(self.peak, len(rows))
        self.joined += len(new)
        return True

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
        made = None if own is not None else m._engine.blank_cache(len(rows), T, plan, rows=self.max_rows)
        shape = (len(rows), cfg.n_kv_heads, T, cfg.head_dim)
        layers = made[1] if made else [] if own is not None else [
            (np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(cfg.n_layers)]
        mask = np.zeros((len(rows), T), np.int64)
        for b, r in enumerate(rows):
            self._place(layers, old, mask, b, r, right)
        for r in new:
            r.kv = r.cache = None
        self._rows, self._mask, self._right = rows, mask, right
        self.peak = max(self.peak, len(rows))
        self._plan = plan
        self._past = own if own is not None else made[0] if made else m._engine.cache_from(layers, plan)
        self.adopted += own is not None
        self.rebuilds += own is None

    def _place(self, layers: list, old: Any, mask: np.ndarray, b: int, r: _Row, right: bool) -> None:
        """Row r's keys into row b of ``layers`` ((keys, values, ...) per layer) and its mask row b: a joining row's
        from its prefill's cache (its last len positions), a kept row's from its row in ``old`` (the running
        batch's layers; nothing to copy where that is the same row of the same cache); at [0, len) where ``right``,
        else at [T − len, T)."""
        L, T = r.length, mask.shape[1]
        a = 0 if right else T - L  # where its keys go
        if r.kv is not None:
            src, i = r.kv
            mask[b, a:a + len(r.mask0)] = r.mask0
            mask[b, a + len(r.mask0):a + L] = 1
            windows = [(k[i, :, n - L:n], v[i, :, n - L:n]) for k, v, n in src]
        else:
            i = self._rows.index(r)
            w = 0 if self._right else self._mask.shape[1] - L
            mask[b, a:a + L] = self._mask[i, w:w + L]
            if layers is old and i == b and w == a:
                return
            windows = [(k[i, :, w:w + L], v[i, :, w:w + L]) for k, v, *_ in old]
        for (K, V, *_), (k, v) in zip(layers, windows):
            K[b, :, a:a + L] = k
            V[b, :, a:a + L] = v

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
