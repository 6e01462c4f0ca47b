"""runtime.scheduler: concurrent requests on one Model share one decode batch, and each gets what it gets alone.

Reference: the same request run alone with batching off (the decode loop of runtime.model, which the engine
tests check against transformers / PEFT). Greedy tokens must be identical and every step's logits within 1e-5,
on numpy and onnxruntime (fp32 and int4 weights), for rows with no adapter, one adapter, a weighted stack, of
different prompt lengths and token limits, started at staggered steps, with streams closed part way. On
onnxruntime's int4 graph (MatMulNBits quantizes its inputs to int8, so a 1e-7 change can move a logit by 1e-2)
the batch keeps each row's keys at [0, len) and GroupQueryAttention reads each row's own length: every logit is
bit for bit the alone one; a graph exported without that (no right-padding property) keeps the left-padded batch.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import numpy as np
import pytest

import edgeadapt
from edgeadapt.runtime.sampling import Sampler
from edgeadapt.runtime.scheduler import QueueFullError, scheduler_of

# (prompt ids, max new tokens, adapter set, start after this many batch steps)
REQUESTS = [
    ([5, 6, 7, 8], 20, None, 0),
    ([9, 10, 11], 24, "a", 0),
    ([12] * 11, 16, "b", 2),
    ([3, 4], 22, {"a": 0.7, "b": 0.3}, 3),
    ([40, 41, 42, 43, 44, 45], 12, "a", 5),
    ([77], 18, None, 7),
]


class Recording(Sampler):
    """A sampler that keeps the logits it was given, one [1, vocab] row per step."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.seen: list[np.ndarray] = []

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        self.seen.append(np.array(logits, np.float32))
        return super().__call__(logits)


@pytest.fixture(scope="module")
def int4_base(tiny, tmp_path_factory):
    from edgeadapt.converters.export_base import export_base

    out = tmp_path_factory.mktemp("sched") / "base"
    export_base(tiny["root"] / "hf", out, gguf_type="F32", onnx_weights=("fp32", "int4"))
    return out


def _model(tiny, base, engine, **kw):
    m = edgeadapt.load(base, engine=engine, **kw)
    m.add_adapter(str(tiny["a"]), name="a")
    m.add_adapter(str(tiny["b"]), name="b")
    return m


def _alone(m, reqs, temperature=0.0):
    m.batching = False
    try:
        out = []
        for k, (ids, n, ad, _) in enumerate(reqs):
            s = Recording(temperature=temperature, seed=k)
            out.append((m.generate_ids(ids, n, s, adapter=ad), s.seen))
        return out
    finally:
        m.batching = True


def _until(ready, timeout=30.0):
    """Wait until ``ready()`` (``timeout`` seconds at most); what it last returned."""
    deadline = time.monotonic() + timeout
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.0002)
    return ready()


def _hold(sched, point, ready):
    """Hold the worker before each call of its method ``point`` until ``ready()`` (30 s at most): requests then
    meet the batch where a test puts them, however loaded the host is. Undo with ``del sched.<point>``."""
    call = getattr(sched, point)

    def held(*a, **kw):
        _until(ready)
        return call(*a, **kw)
    setattr(sched, point, held)


def _rows_of(sched, tag):
    """Each submitted request's row under ``tag()`` (the submitting thread's tag); undo with ``del sched.submit``."""
    submit, rows = sched.submit, {}

    def tagged(*a, **kw):
        row = submit(*a, **kw)
        rows[tag()] = row
        return row
    sched.submit = tagged
    return rows


def _run_all(threads, timeout):
    """Start every thread, then wait for each (``timeout`` seconds at most)."""
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)


def _together(m, reqs, temperature=0.0, close_after=None):
    """Every request in its own thread, sent once the batch has run its number of steps (or the requests before
    it have ended); the worker runs that step only once the request is in its queue, so the request joins the
    running batch at that step on any host."""
    sched = scheduler_of(m)
    base = sched.steps
    out: list = [None] * len(reqs)
    errors: list = []
    local = threading.local()
    rows = _rows_of(sched, lambda: local.k)
    _hold(sched, "_step", lambda: all(k in rows or out[k] is not None for k, r in enumerate(reqs)
                                      if r[3] <= sched.steps - base))

    def go(k):
        local.k = k
        ids, n, ad, after = reqs[k]
        while sched.steps < base + after and any(o is None for o in out[:k]):
            threading.Event().wait(0.001)
        s = Recording(temperature=temperature, seed=k)
        try:
            if close_after is not None and k in close_after:
                gen = m._steps([ids], n, s, m._plan(None if ad is None else [ad], 1),
                               None if ad is None else m._normalise(ad))
                got = []
                for step in gen:
                    got += [t for _, t in step]
                    if len(got) == close_after[k]:
                        gen.close()
                        break
                out[k] = (got, s.seen)
            else:
                out[k] = (m.generate_ids(ids, n, s, adapter=ad), s.seen)
        except BaseException as e:  # surfaced below
            errors.append(e)
            out[k] = ([], [])

    threads = [threading.Thread(target=go, args=(k,)) for k in range(len(reqs))]
    try:
        _run_all(threads, 120)
    finally:
        del sched._step, sched.submit
    assert not errors, errors
    return out


def _check(ref, got, tol=2e-5):
    """Tokens identical, each step's logits within ``tol`` times the step's logit scale (max |logit|, at least 1:
    float32 products rounded in another order differ in proportion to their size); 0: bit for bit. The default
    is the numpy engine's: OpenBLAS's Haswell kernels round a row's products in a batch up to 1.2e-5 away from
    the row alone (docs/SERVING.md); onnxruntime fp32 is held to 1e-5."""
    for k, ((rt, rl), (gt, gl)) in enumerate(zip(ref, got)):
        assert gt == rt[:len(gt)], f"request {k}: tokens differ"
        for step, (a, b) in enumerate(zip(rl, gl)):
            if tol == 0:
                np.testing.assert_array_equal(b, a, err_msg=f"request {k}, step {step}")
            else:
                scale = max(1.0, float(np.abs(a).max()))
                np.testing.assert_allclose(b, a, atol=tol * scale, rtol=0, err_msg=f"request {k}, step {step}")


@pytest.mark.parametrize("engine,weights", [("numpy", "fp32"), ("ort", "fp32"), ("ort", "int4")])
def test_concurrent_requests_equal_alone(tiny, int4_base, engine, weights):
    m = _model(tiny, int4_base, engine, mode="live", weights=weights)
    ref = _alone(m, REQUESTS)
    assert len({tuple(t) for t, _ in ref}) == len(ref)  # the adapters make a difference
    sched = scheduler_of(m)
    steps0 = sched.steps
    got = _together(m, REQUESTS)
    # onnxruntime int4: bit for bit (see test_int4_rows_bit_for_bit); fp32 within 1e-5, numpy's default (2e-5)
    _check(ref, got, 0 if weights == "int4" else 1e-5 if engine == "ort" else 2e-5)
    assert [len(t) for t, _ in got] == [len(t) for t, _ in ref]
    decoded = sum(max(len(t) - 1, 0) for t, _ in ref)
    assert sched.steps - steps0 < decoded  # rows shared steps
    assert sched.peak > 1
    assert sched.active == 0


# different prompt lengths, each its own adapter set; limits that make rows leave while others run and join
ROWS = [
    ([5, 6, 7, 8, 9, 10, 11], 14, "a", 0),
    ([9, 10], 6, "b", 0),
    ([12] * 13, 18, None, 1),
    ([3, 4, 5], 9, {"a": 0.7, "b": 0.3}, 2),
    ([40, 41, 42, 43, 44], 16, "a", 4),
    ([77, 78, 79, 80], 5, "b", 6),
    ([60] * 9, 12, None, 9),
]


@pytest.mark.parametrize("mode", ["staggered", "together"])
def test_int4_rows_bit_for_bit(tiny, int4_base, mode):
    """int4 on onnxruntime: requests of different lengths and adapters, joining at different steps (or waiting for
    their prefill together), rows leaving while others run: each gets its alone tokens and its alone logits, bit for
    bit — the batch keeps each row's keys at [0, len), and each prompt is prefilled as it is alone."""
    from test_scheduler_prefill import _all_at_once

    m = _model(tiny, int4_base, "ort", mode="live", weights="int4")
    assert m._engine.pads_right
    ref = _alone(m, ROWS)
    assert len({tuple(t) for t, _ in ref}) == len(ref)
    sched = scheduler_of(m)
    steps0, rebuilds0, joined0 = sched.steps, sched.rebuilds, sched.joined
    got = _together(m, ROWS) if mode == "staggered" else _all_at_once(m, ROWS)
    _check(ref, got, 0)
    assert [len(t) for t, _ in got] == [len(t) for t, _ in ref]
    assert sched.steps - steps0 < sum(len(t) - 1 for t, _ in ref)  # rows shared steps
    # rows joined a running batch: in place (into a slot of a row that left, or after the last) or by a rebuild
    assert sched.rebuilds - rebuilds0 + sched.joined - joined0 >= (3 if mode == "staggered" else 1)
    assert mode == "together" or sched.joined > joined0
    assert sched.active == 0


@pytest.mark.parametrize("engine,weights", [("ort", "fp32"), ("ort", "int4"), ("numpy", "fp32")])
def test_a_request_alone_decodes_on_its_prefill_cache(tiny, int4_base, engine, weights):
    """A request that finds the batch empty starts it on its own prefill's cache (onnxruntime's in-place KVCache)
    instead of copying its keys into a new one, whether its prompt was prefilled whole or in chunks: the same
    tokens and logits, bit for bit, as alone, and no rebuild. The numpy engine's caches are rebuilt as before."""
    m = _model(tiny, int4_base, engine, mode="live", weights=weights)
    reqs = [r[:3] + (0,) for r in REQUESTS]
    ref = _alone(m, reqs)
    sched = scheduler_of(m)
    for chunk in (128, 4):  # 4: prompts over 4 tokens are prefilled alone, in chunks
        sched.prefill_chunk = chunk
        adopted0, rebuilds0 = sched.adopted, sched.rebuilds
        got = []
        for k, (ids, n, ad, _) in enumerate(reqs):  # one at a time: each finds the batch empty
            s = Recording(temperature=0.0, seed=k)
            got.append((m.generate_ids(ids, n, s, adapter=ad), s.seen))
        _check(ref, got, 0 if engine == "ort" else 2e-5)
        if engine == "ort":
            assert sched.adopted - adopted0 == len(reqs) and sched.rebuilds == rebuilds0
        else:
            assert sched.adopted == adopted0 and sched.rebuilds - rebuilds0 == len(reqs)
    assert sched.active == 0


@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_rows_join_the_running_batch_in_place(tiny, int4_base, weights):
    """Two clients each sending requests one after another, beside a longer one (onnxruntime): a row that arrives
    while others run takes the slot of a row that left (or goes after the last), a slot left empty takes the last
    row, and only those rows' keys are copied — the cache is made once, not for every arrival, no step runs a row
    that left, and the cache's width follows the longest running row, so a batch that never empties keeps the
    cache it started with. Every request: its alone tokens and logits (int4 bit for bit, fp32 within 1e-5)."""
    m = _model(tiny, int4_base, "ort", mode="live", weights=weights)
    sets = [None, "a", "b", {"a": 0.7, "b": 0.3}]
    rng = np.random.default_rng(3)
    chains = [[(list(rng.integers(3, 200, 2 + (k + c) % 5)), 4 + (k + c) % 4, sets[(k + 2 * c) % 4], 0)
               for k in range(24)] for c in range(2)]
    first = ([50] * 12, 8, "a", 0)
    ref = _alone(m, [first] + chains[0] + chains[1])
    sched = scheduler_of(m)
    rebuilds0, joined0 = sched.rebuilds, sched.joined
    got: dict = {}
    widest, running, idle = [0], threading.Event(), []
    step = sched._step

    def counted_step():  # rows of each step that had already left (a slot idling, masked)
        idle.append(sum(r.dead or r.cancelled or r.count >= r.max_new for r in sched._rows))
        step()
    sched._step = counted_step

    local, done = threading.local(), set()
    rows = _rows_of(sched, lambda: local.key)

    def ask(key, reqs):
        local.key = key
        for k, (ids, n, ad, _) in enumerate(reqs):
            s = Recording(temperature=0.0, seed=k)
            got[key, k] = (m.generate_ids(ids, n, s, adapter=ad), s.seen)
        done.add(key)

    def watch():
        while running.is_set():
            widest[0] = max(widest[0], getattr(sched._past, "capacity", 0))
            time.sleep(0.0005)

    running.set()
    threads = [threading.Thread(target=ask, args=("first", [first]))]
    threads += [threading.Thread(target=ask, args=(c, chain)) for c, chain in enumerate(chains)]
    threads.append(threading.Thread(target=watch))
    threads[0].start()
    while sched.steps == 0:
        time.sleep(0.001)
    # each turn of the worker waits for both clients' next requests: a client's next request arrives while its
    # last one's slot is still there to take, however slowly the host wakes the client
    _hold(sched, "_prefill_turn", lambda: all(c in done or (c in rows and not rows[c].ended) for c in range(2)))
    for t in threads[1:]:
        t.start()
    for t in threads[:-1]:
        t.join(120)
    running.clear()
    threads[-1].join()
    del sched._step, sched._prefill_turn, sched.submit
    order = [("first", 0)] + [(c, k) for c in range(2) for k in range(24)]
    _check(ref, [got[o] for o in order], 0 if weights == "int4" else 1e-5)
    # the cache is made once, when the clients' first requests join the first one's (its own prefill's cache, with
    # no room for more rows); every later arrival takes a slot in place (46 of 48)
    assert sched.rebuilds - rebuilds0 == 1 and sched.joined - joined0 >= 46
    assert len(idle) > 50 and not any(idle)  # a row that left gave its slot to a new row, or to the last row
    # 48 requests over ~150 steps: a mask that only grew would have doubled the cache's 128 keys
    assert 0 < widest[0] <= 128
    assert sched.active == 0


def test_merged_rows_join_the_running_batch_in_place(tiny, int4_base):
    """Merge mode (onnxruntime, fp32: merging needs float weights): requests under the merged set arrive while a
    longer one decodes (its sampler holds the worker until they wait in the queue); the first makes the batch's
    cache, the next two take slots of it in place (their rows share the merged weights: no adapter set to place).
    Each gets its alone tokens and logits within 1e-5."""
    m = _model(tiny, int4_base, "ort", mode="merge", weights="fp32")
    m.use("a")
    assert m._merged
    reqs = [([50] * 6, 30, None), ([9, 10, 11], 20, None), ([3, 4], 8, None), ([77], 5, None)]
    ref = _alone(m, [(ids, n, ad, 0) for ids, n, ad in reqs])
    sched = scheduler_of(m)
    gates = {3: (threading.Event(), threading.Event()), 8: (threading.Event(), threading.Event())}  # (there, go)

    class Gated(Recording):
        def __call__(self, logits):
            if len(self.seen) in gates:  # row 0's sampler holds the worker here until requests wait in the queue
                there, go = gates[len(self.seen)]
                there.set()
                assert go.wait(30)
            return super().__call__(logits)

    got: dict = {}

    def ask(k):
        ids, n, ad = reqs[k]
        s = (Gated if k == 0 else Recording)(temperature=0.0, seed=k)
        try:
            got[k] = (m.generate_ids(ids, n, s, adapter=ad), s.seen)
        except BaseException as e:  # surfaced below
            got[k] = e

    joined0 = sched.joined
    threads = [threading.Thread(target=ask, args=(k,)) for k in range(len(reqs))]
    threads[0].start()
    for (there, go), new in zip(gates.values(), (threads[1:2], threads[2:])):
        assert there.wait(30), got
        for t in new:
            t.start()
        assert _until(lambda: len(sched._pending) >= len(new))
        go.set()
    for t in threads:
        t.join(60)
    assert all(isinstance(got.get(k), tuple) for k in range(len(reqs))), got
    _check(ref, [got[k] for k in range(len(reqs))], 1e-5)
    assert sched.joined - joined0 == 2  # the last two, in place, beside rows 0 and 1
    assert sched.active == 0


def test_room_for_rows_not_yet_written_takes_no_memory():
    """The in-place cache's buffers (session.mapped_zeros): with SmolLM2's layout and room for 16 rows of 192 keys
    (142 MB), writing 2 rows × 100 keys maps about what was written (9 MB), not the room."""
    pytest.importorskip("onnxruntime")
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("resident memory is read from /proc (Linux)")
    from edgeadapt.runtime.ort_engine.session import mapped_zeros

    def resident() -> float:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = resident()
    a = mapped_zeros((60, 16, 3, 192, 64))
    assert a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
    assert a[0, 0, 0, 0, 0] == a[-1, -1, -1, -1, -1] == 0  # (reading every page would map them all)
    a[:, :2, :, :100] = 1.0
    grew = resident() - before
    assert grew < 2 * 60 * 2 * 3 * 100 * 64 * 4 + (4 << 20), grew / 1e6


def test_graph_without_right_padding_keeps_left_padded_batches(tiny, int4_base, tmp_path):
    """A base folder exported before its graphs took right-padded rows (no edgeadapt.right_padded property): the
    scheduler keeps its left-padded batch there — the same tokens as alone, logits within MatMulNBits' int8 rounding
    (a row's padding moves them, ~1e-2)."""
    import shutil

    import onnx

    old = tmp_path / "base"
    shutil.copytree(int4_base, old)
    for f in old.glob("model_int4*.onnx"):
        model = onnx.load(str(f), load_external_data=False)
        props = [p for p in model.metadata_props if p.key != "edgeadapt.right_padded"]
        assert len(props) < len(model.metadata_props)
        del model.metadata_props[:]
        model.metadata_props.extend(props)
        onnx.save(model, str(f))
    m = _model(tiny, old, "ort", mode="live", weights="int4")
    assert not m._engine.pads_right
    ref = _alone(m, REQUESTS)
    got = _together(m, REQUESTS)
    _check(ref, got, 5e-2)
    assert scheduler_of(m).peak > 1 and not scheduler_of(m)._right


def test_sampling_seeds_and_auto_mode(tiny, int4_base):
    """Temperature sampling with a seed per request: the same draws as alone; auto mode (the active set shared)."""
    m = _model(tiny, int4_base, "numpy")
    m.use("b")
    reqs = [(ids, n, None if ad is None else ad, after) for ids, n, ad, after in REQUESTS]
    ref = _alone(m, reqs, temperature=0.9)
    got = _together(m, reqs, temperature=0.9)
    _check(ref, got)


def test_streams_closed_part_way_leave_the_batch(tiny, int4_base):
    m = _model(tiny, int4_base, "numpy", mode="live")
    ref = _alone(m, REQUESTS)
    got = _together(m, REQUESTS, close_after={1: 3, 3: 1, 4: 5})
    assert [len(got[k][0]) for k in (1, 3, 4)] == [3, 1, 5]
    _check(ref, got)
    assert scheduler_of(m).active == 0


def test_queue_full_and_merge_waits(tiny, int4_base):
    m = _model(tiny, int4_base, "numpy", mode="merge")
    sched = scheduler_of(m)
    sched.max_rows, sched.max_waiting = 1, 0
    try:
        gen = m._steps([[5, 6, 7]], 30, Sampler(), None)
        first = next(gen)
        with pytest.raises(QueueFullError, match="running and 0 waiting"):
            m.generate_ids([8, 9], 4)
        # a merge (use() in merge mode) waits for the running row, which keeps its own weights
        done = threading.Event()
        with sched.turn:  # the worker cannot step: the row stays in the batch
            t = threading.Thread(target=lambda: (m.use("a"), done.set()))
            t.start()
            assert not done.wait(0.3)
        rest = [tok for step in gen for _, tok in step]
        t.join(30)
        assert done.is_set() and m.active == {"a": 1.0}
        m.use(None)
        m.batching = False
        assert [first[0][1]] + rest == m.generate_ids([5, 6, 7], 30)
    finally:
        sched.max_rows, sched.max_waiting = 16, 64


@pytest.mark.parametrize("engine", ["numpy", "ort"])
def test_a_failure_in_the_worker_reaches_every_row_it_holds(tiny, int4_base, engine):
    """An error in the worker's own code after a prefill ran (here: keeping a prompt's keys) reaches every request
    the worker held — the batch's rows, rows joining it, rows whose prefill was under way — as that error; none
    waits forever for a token, every slot comes back, and the requests after it run as alone."""
    m = _model(tiny, int4_base, engine, mode="live")
    sched = scheduler_of(m)
    reqs = REQUESTS[:4]
    ref = _alone(m, reqs)
    keep, calls = sched._keep_prefix, []

    def failing(r, layers, b):
        calls.append(r)
        if len(calls) == 2:
            raise RuntimeError("keeping a prompt's keys failed")
        keep(r, layers, b)

    sched._keep_prefix = failing
    out: dict = {}

    def go(k):
        ids, n, ad, _ = reqs[k]
        try:
            out[k] = m.generate_ids(ids, n, adapter=ad)
        except RuntimeError as e:
            out[k] = e

    threads = [threading.Thread(target=go, args=(k,)) for k in range(len(reqs))]
    try:
        _run_all(threads, 60)
        assert not any(t.is_alive() for t in threads), "a request waits for a row the worker dropped"
    finally:
        del sched._keep_prefix
    failed = [k for k, o in out.items() if isinstance(o, RuntimeError)]
    assert failed and all("keeping a prompt's keys failed" in str(out[k]) for k in failed)
    assert all(out[k] == ref[k][0] for k in out if k not in failed)
    assert sched.active == 0
    _check(ref, _together(m, reqs), 1e-5 if engine == "ort" else 2e-5)
    assert sched.active == 0


def test_agenerate_joins_and_cancels(tiny, int4_base):
    m = _model(tiny, int4_base, "numpy", mode="live")
    ref = _alone(m, REQUESTS[:3])

    async def main():
        others_done = asyncio.Event()

        async def ids_of(ids, n, ad):
            pieces = []
            stream = m.agenerate(ids, n, stream=True, adapters=None if ad is None else [ad])
            try:
                async for p in stream:
                    pieces.append(p)
                    await others_done.wait()  # still reading when it is cancelled, however fast the worker runs
            finally:
                await stream.aclose()  # what contextlib.aclosing does: closing the stream drops its row
            return pieces

        task = asyncio.ensure_future(ids_of([1, 2, 3], 100, "a"))
        await asyncio.sleep(0)
        outs = await asyncio.gather(*(m.agenerate(ids, n, adapters=None if ad is None else [ad])
                                      for ids, n, ad, _ in REQUESTS[:3]))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        others_done.set()
        return outs

    m._tokenizer = _IdsTokenizer()
    outs = asyncio.run(main())
    assert outs == [_IdsTokenizer().decode(t) for t, _ in ref]
    sched, end = scheduler_of(m), time.monotonic() + 30
    while sched.active and time.monotonic() < end:  # a cancelled row is released by the worker, at its next turn
        time.sleep(0.01)
    assert sched.active == 0, f"expected the cancelled stream's row released, found {sched.active} still held"


class _IdsTokenizer:
    """Token ids as text ("5 6 7 "), so agenerate can run on a base without a tokenizer."""

    chat_template = None

    def decode(self, ids):
        return "".join(f"{i} " for i in ids)
