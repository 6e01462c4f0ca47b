"""runtime.scheduler: prompts waiting together are prefilled in one turn (numpy: in one left-padded forward), and
each step's tokens reach many asyncio streams at once — each request still gets exactly what it gets alone.

Reference: each request run alone with batching off (the decode loop of runtime.model). fp32: greedy tokens
identical and every step's logits within 1e-5 (the first step's logits are the batched prefill's), on numpy and
onnxruntime — 2e-5 for numpy under OpenBLAS's Haswell kernels (OPENBLAS_CORETYPE=Haswell), where a prompt's
rows inside a taller left-padded matrix round differently (~1e-6 in its keys, up to 1.5e-5 on a logit a few steps
later); int4 on onnxruntime: bit for bit (its graphs take right-padded rows, and each prompt is prefilled at batch
1, as alone); a prompt prefilled after a kept start: the tolerance test_scheduler states for MatMulNBits.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from edgeadapt.runtime.sampling import Sampler
from edgeadapt.runtime.scheduler import scheduler_of
from edgeadapt.runtime.streams import astream_tokens
from test_scheduler import Recording, _alone, _IdsTokenizer, _model, int4_base  # noqa: F401  (int4_base: a fixture)

# prompts of different lengths (left-padded together), each with its own set; the last is longer than the chunk
# below, so it is prefilled alone, in chunks, beside the batched ones
PROMPTS = [
    ([5, 6, 7, 8], 14, None, 0),
    ([9, 10, 11], 16, "a", 0),
    ([12] * 11, 12, "b", 0),
    ([3, 4], 15, {"a": 0.7, "b": 0.3}, 0),
    ([40, 41, 42, 43, 44, 45], 10, "a", 0),
    (list(range(20, 44)), 9, "b", 0),
]


def _close(ref, got, tol):
    if tol == 1e-5 and os.environ.get("OPENBLAS_CORETYPE", "").lower() == "haswell":
        tol = 2e-5
    for k, ((rt, rl), (gt, gl)) in enumerate(zip(ref, got)):
        assert gt == rt, f"request {k}: tokens differ"
        for step, (a, b) in enumerate(zip(rl, gl)):
            np.testing.assert_allclose(b, a, atol=tol, rtol=0, err_msg=f"request {k}, step {step}")


def _all_at_once(m, reqs):
    """Every request waits for its prefill at once: a first request holds the worker (its prefill forward waits
    for the turn lock this thread holds) while the others queue. The first is not part of the result."""
    sched = scheduler_of(m)
    out: list = [None] * len(reqs)

    def go(k):
        ids, n, ad, _ = reqs[k]
        s = Recording(temperature=0.0, seed=k)
        out[k] = (m.generate_ids(ids, n, s, adapter=ad), s.seen)

    with sched.turn:
        queued = sched.turn._next
        first = threading.Thread(target=m.generate_ids, args=([1], 2))
        first.start()
        while sched.turn._next == queued:  # the worker took the first request and waits for the turn
            threading.Event().wait(0.001)
        threads = [threading.Thread(target=go, args=(k,)) for k in range(len(reqs))]
        for t in threads:
            t.start()
        while len(sched._pending) < len(reqs):
            threading.Event().wait(0.001)
    for t in threads + [first]:
        t.join(120)
    return out


@pytest.mark.parametrize("engine,weights", [("numpy", "fp32"), ("ort", "fp32"), ("ort", "int4")])
def test_prompts_waiting_together_share_one_prefill(tiny, int4_base, engine, weights):
    m = _model(tiny, int4_base, engine, mode="live", weights=weights)
    ref = _alone(m, PROMPTS)
    sched = scheduler_of(m)
    sched.prefill_chunk = 16
    try:
        prefills0 = sched.prefills
        got = _all_at_once(m, PROMPTS)
    finally:
        sched.prefill_chunk = 128
    _close(ref, got, 1e-5 if weights == "fp32" else 0)
    assert [len(t) for t, _ in got] == [len(t) for t, _ in ref]
    if m._engine.pads_right:  # onnxruntime: each prompt at batch 1 (its keys and logits exactly its alone ones)
        assert sched.peak_prefill == 1
        # the first request's, five short prompts one by one in one turn, two chunks of the long prompt
        assert sched.prefills - prefills0 == 8
    else:
        assert sched.peak_prefill == 5  # the five short prompts in one forward; the long one alone
        # the first request's, one batched forward, two chunks of the long prompt (24 tokens, chunks of 16)
        assert sched.prefills - prefills0 == 4
    assert sched.active == 0


def test_prefill_budget_splits_a_crowd(tiny, int4_base):
    """At most prefill_tokens padded tokens per prefill forward: more prompts take more turns."""
    m = _model(tiny, int4_base, "numpy", mode="live")
    reqs = [([7 + k] * 6, 4, "ab"[k % 2], 0) for k in range(6)]
    ref = _alone(m, reqs)
    sched = scheduler_of(m)
    sched.prefill_tokens = 12  # two prompts of 6 per forward
    try:
        p0 = sched.prefills
        got = _all_at_once(m, reqs)
    finally:
        sched.prefill_tokens = 512
    _close(ref, got, 1e-5)
    assert sched.prefills - p0 == 4 and sched.peak_prefill == 2


def test_async_streams_each_get_their_own_tokens(tiny, int4_base):
    """Many asyncio streams on one loop: each step's tokens are handed to the loop together, and every stream gets
    exactly its own tokens, in order; a stream closed part way frees its row."""
    m = _model(tiny, int4_base, "numpy", mode="live")
    reqs = [([5 + k, 6 + k, 7 + k], 12 + k, [None, "a", "b", {"a": 0.5, "b": 0.5}][k % 4], 0) for k in range(12)]
    ref = _alone(m, reqs)
    assert len({tuple(t) for t, _ in ref}) > 6

    async def one(k, stop=None):
        ids, n, ad, _ = reqs[k]
        got, batches = [], 0
        it = astream_tokens(m, ids, n, Sampler(), ad)
        async for toks in it:
            got += toks
            batches += 1
            if stop is not None and len(got) >= stop:
                await it.aclose()
                break
        return got

    class Counting(ThreadPoolExecutor):
        calls = 0

        def submit(self, *a, **kw):
            Counting.calls += 1
            return super().submit(*a, **kw)

    async def main():
        asyncio.get_running_loop().set_default_executor(Counting(4))
        outs = await asyncio.gather(*(one(k, 3 if k == 5 else None) for k in range(len(reqs))))
        text = await m.agenerate([1, 2, 3], 9, adapters=["a"])  # Model.agenerate: the same path, text
        return outs, text

    m._tokenizer = _IdsTokenizer()
    outs, text = asyncio.run(main())
    assert Counting.calls == len(reqs) + 1  # one executor hop per request (its admission), none per token
    m.batching = False
    assert text == "".join(f"{t} " for t in m.generate_ids([1, 2, 3], 9, adapter="a"))
    m.batching = True
    for k, (got, (want, _)) in enumerate(zip(outs, ref)):
        assert got == (want[:len(got)] if k == 5 else want), f"stream {k}"
    assert len(outs[5]) >= 3
    sched = scheduler_of(m)
    for _ in range(2000):  # the closed stream's row leaves at the worker's next turn
        if sched.active == 0:
            break
        threading.Event().wait(0.005)
    assert sched.active == 0 and sched.peak > 1


def test_stacked_plan_equals_the_whole_batch_plan(tiny, int4_base):
    """A batch's plan stacked from each set's one-row plan: row b holds exactly its set's one-row factors (in the
    engine's slot form; zeros past its rank), and every row's change x·A·B is what the model's plan for those rows
    at once gives."""
    from edgeadapt.runtime.row_lora import PerRow

    sets = [{"a": 1.0}, {}, {"a": 0.7, "b": 0.3}, {"b": 1.0}]
    rng = np.random.default_rng(0)
    for engine in ("numpy", "ort"):
        m = _model(tiny, int4_base, engine, mode="live")
        sched = scheduler_of(m)
        rows = []
        for s in sets:
            r = type("R", (), {})()
            r.row_set = s
            rows.append(r)
        got = sched.plans.stacked(sets)
        whole = m._engine.slot_form(m._live_plan(sets))  # onnxruntime: q|k|v and gate|up grouped
        singles = [m._engine.slot_form(m._live_plan([s])) if s else {} for s in sets]
        assert sorted(got) == sorted(whole)
        for t in whole:
            per_row = got[t].rows if isinstance(got[t], PerRow) else [(got[t][0][b], got[t][1][b]) for b in range(4)]
            for b, (one, pr) in enumerate(zip(singles, per_row)):
                if t not in one:
                    assert pr is None or not pr[0].any(), f"{engine} {t} row {b}: factors where its set has none"
                    continue
                a1, b1 = one[t][0][0], one[t][1][0]
                # A [in, k·r]: k parts (onnxruntime's group slots with their weights' B side by side, B [1, r, Σout]),
                # each padded on its own; B [..., r, out]
                r, R = b1.shape[-2], pr[1].shape[-2]
                k = a1.shape[1] // r
                parts = pr[0].reshape(pr[0].shape[0], k, R)
                np.testing.assert_array_equal(parts[:, :, :r], a1.reshape(a1.shape[0], k, r))
                np.testing.assert_array_equal(pr[1][..., :r, :], b1)
                assert not parts[:, :, r:].any() and not pr[1][..., r:, :].any()
                if not isinstance(whole[t], PerRow):
                    x = rng.standard_normal(a1.shape[0]).astype(np.float32)
                    np.testing.assert_allclose(_change(x, *pr), _change(x, whole[t][0][b], whole[t][1][b]), atol=1e-5)


def _change(x, a, b):
    """x·A·B of one row's slot; a group slot with its weights' B side by side: every part's u_j·B (the graph then
    keeps weight j's columns of part j)."""
    if b.ndim == 2:
        return x @ a @ b
    return (x @ a).reshape(-1, b.shape[-2]) @ b[0]


def test_row_buffers_write_only_rows_whose_set_changed():
    """The decode batch's plan buffers: each row's views hold exactly its set's factors (zeros past its rank and in
    slots its set lacks); a row whose set is already in place is not written; a prefill's rows go after the batch's
    without touching them."""
    from edgeadapt.runtime.row_lora import RowBuffers

    rng = np.random.default_rng(1)

    def single(r, slots=("q", "v")):
        return {t: (rng.standard_normal((1, 8, r)).astype(np.float32), rng.standard_normal((1, r, 6)).astype(np.float32))
                for t in slots}

    sets = {"a": single(4), "b": single(2, ("q",)), "c": single(4, ("v",))}
    buf = RowBuffers()

    def check(plan, names, start=0):
        for k, name in enumerate(names):
            one = sets[name]
            for t, (A, B) in plan.items():
                if t in one:
                    r = one[t][0].shape[2]
                    np.testing.assert_array_equal(A[k, :, :r], one[t][0][0])
                    np.testing.assert_array_equal(B[k, :r], one[t][1][0])
                    assert not A[k, :, r:].any() and not B[k, r:].any()
                else:
                    assert not A[k].any() and not B[k].any(), f"row {start + k} ({name}): {t} should be zero"

    names = ["a", "b", "a"]
    check(buf.plan(names, [sets[n] for n in names], 16), names)
    assert buf.writes == 3
    names2 = ["a", "c", "a", "b"]  # rows 0 and 2 keep their set: not written
    check(buf.plan(names2, [sets[n] for n in names2], 16), names2)
    assert buf.writes == 3 + 2
    batch = buf.plan(names2, [sets[n] for n in names2], 16)
    before = {t: (A.copy(), B.copy()) for t, (A, B) in batch.items()}
    pre = buf.plan(["b", "c"], [sets["b"], sets["c"]], 16, start=4)  # a prefill after the batch's 4 rows
    check(pre, ["b", "c"], 4)
    for t, (A, B) in batch.items():
        np.testing.assert_array_equal(A, before[t][0])
        np.testing.assert_array_equal(B, before[t][1])
    names3 = ["a", "c", "a", "b", "b", "c"]  # the prefilled rows join where they were prefilled
    w = buf.writes
    check(buf.plan(names3, [sets[n] for n in names3], 16), names3)
    assert buf.writes == w


@pytest.mark.parametrize("engine,weights", [("numpy", "fp32"), ("ort", "fp32"), ("ort", "int4")])
def test_prompts_sharing_a_start_reuse_its_keys(tiny, int4_base, engine, weights):
    """A prompt that starts like the last prompt of its adapter set (a chat template's system part) is prefilled
    after that prompt's kept keys / values: the same greedy tokens as alone, logits within 1e-4."""
    m = _model(tiny, int4_base, engine, mode="live", weights=weights)
    start = [30, 31, 32, 33, 34, 35, 36]
    reqs = [(start + [40, 41], 10, "a", 0), (start + [50], 12, "b", 0), (start + [60, 61, 62], 9, "a", 0),
            (start + [70, 71], 11, "b", 0), (start[:5] + [90, 91], 8, "a", 0), (start + [40, 41], 10, "a", 0),
            ([30, 31, 99], 7, "a", 0)]
    ref = _alone(m, reqs)
    sched = scheduler_of(m)
    sched.prefix_min = 5
    try:
        hits0 = sched.prefix_hits
        got = [_all_at_once(m, reqs[:2])]  # the first prompt of each set: nothing kept yet
        got += [_all_at_once(m, reqs[2:])]
    finally:
        sched.prefix_min = 0
    got = got[0] + got[1]
    # the kept start came out of another prompt's forward, and the rest attends to it in a second one: float32 sums
    # in another order. Measured here 1.4e-5 on both engines a few steps later; with other prompt tokens up to 6.2e-5
    # on onnxruntime fp32 (with either group slot layout of onnx_graphs.fast). Not the 1e-5 of a request alone,
    # which is why docs/SERVING.md states this bound for prompt starts reused
    _close(ref, got, 1e-4 if weights == "fp32" else 5e-2)
    # the 2nd, 4th, 5th (its first 5 tokens) and 6th (all but its last token) reuse a start; the 7th shares 2 tokens
    assert sched.prefix_hits - hits0 == 4
    assert sched.active == 0
    # by default no prompt start is reused: a request's answer is then its alone answer (within 1e-5 on float)
    assert sched._prefix_min == 0
