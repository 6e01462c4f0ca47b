"""Live adapters: per-row adapters in one batch, strengths, stacking, thread-safe swaps,
onnxruntime's own LoraAdapter mechanism on our slotted graph, and .onnx_adapter files."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import edgeadapt
from edgeadapt.formats.delta import read_delta
from edgeadapt.errors import AdapterMismatchError
from edgeadapt.runtime.sampling import Sampler

from conftest import ENGINES, torch_logits


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.param


def test_per_row_batch_equals_each_row_alone(tiny, ids, engine):
    m = edgeadapt.load(tiny["base"], engine=engine, mode="live")
    m.add_adapter(tiny["a"], name="a")
    m.add_adapter(tiny["b"], name="b")
    rows = ids + [ids[0], ids[1]]
    per_row = ["a", "b", None, {"a": 0.5, "b": 2.0}]
    got = m.logits(rows, adapters=per_row)
    # bit-identical on both engines (ranks 8 / 4 / 8+4: numpy runs each row at its own rank, and its
    # layer matmuls slice by slice, as the row alone)
    for i, spec in enumerate(per_row):
        m.use(spec)
        np.testing.assert_array_equal(got[i], m.logits([rows[i]])[0])
    m.use(None)
    np.testing.assert_allclose(got[2], torch_logits(tiny["model"], [rows[2]])[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[0], torch_logits(tiny["peft_a"], [rows[0]])[0], atol=1e-4, rtol=0)


def test_per_row_left_padded_batch_equals_each_row_alone(tiny, engine):
    """Rows of 9, 5, 7 and 3 tokens, left-padded to 9, with adapters of ranks 8 (v 4, down 6), 4, none, 8+4."""
    m = edgeadapt.load(tiny["base"], engine=engine, mode="live")
    m.add_adapter(tiny["a"], name="a")
    m.add_adapter(tiny["b"], name="b")
    rng = np.random.default_rng(3)
    rows = [rng.integers(3, 256, size=n).tolist() for n in (9, 5, 7, 3)]
    per_row = ["a", "b", None, {"a": 0.5, "b": 2.0}]
    width = max(map(len, rows))
    ids = [[0] * (width - len(r)) + r for r in rows]
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    got = m.logits(ids, mask, adapters=per_row)
    # padded keys and a longer matmul change summation order in the base only: ~1e-6 here
    for i, spec in enumerate(per_row):
        m.use(spec)
        np.testing.assert_allclose(got[i][width - len(rows[i]):], m.logits([rows[i]])[0], atol=1e-5, rtol=0)
    m.use(None)
    assert np.abs(got[0] - m.logits([rows[0]])[0]).max() > 1e-2  # the adapter does something


def test_live_strength_equals_merged(tiny, ids, engine):
    live = edgeadapt.load(tiny["base"], engine=engine, mode="live")
    merged = edgeadapt.load(tiny["base"], engine=engine, mode="merge")
    for m in (live, merged):
        m.add_adapter(tiny["a"], name="a")
        m.add_adapter(tiny["b"], name="b")
    for spec in ({"a": 0.5}, {"a": 0.7, "b": 0.3}, {"b": -1.0}):
        live.use(spec)
        merged.use(spec)
        assert live.mode == "live" and merged.mode == "merge"
        np.testing.assert_allclose(live.logits(ids), merged.logits(ids), atol=1e-4, rtol=0)


def test_live_swap_binds_only(tiny, ids, engine):
    m = edgeadapt.load(tiny["base"], engine=engine, mode="live")
    m.add_adapter(tiny["a"], name="a")
    m.use("a")
    factors = m._live
    m.use(None)
    m.use("a")
    for t, (a, b) in m._live.items():  # the same arrays again: nothing re-read or re-computed
        assert np.shares_memory(a, factors[t][0]) and np.shares_memory(b, factors[t][1])


def test_batched_generation_per_row(tiny, engine):
    m = edgeadapt.load(tiny["base"], engine=engine, mode="live")
    m.add_adapter(tiny["a"], name="a")
    m.add_adapter(tiny["b"], name="b")
    prompts = [[5, 17, 42, 99, 7], [8, 9], [100, 101, 102]]
    per_row = ["a", None, "b"]
    got = m.generate_batch(prompts, 10, adapters=per_row)
    for p, spec, g in zip(prompts, per_row, got):
        m.use(spec)
        assert g == m.generate_ids(p, 10)


def _contenders(tiny, engine, mode):
    """A model in ``mode`` with adapters a and b, a prompt, and each set's greedy tokens from a reference model
    (the same mode; live for auto)."""
    ref = edgeadapt.load(tiny["base"], engine=engine, mode="live" if mode == "auto" else mode)
    m = edgeadapt.load(tiny["base"], engine=engine, mode=mode)
    for x in (ref, m):
        x.add_adapter(tiny["a"], name="a")
        x.add_adapter(tiny["b"], name="b")
    prompt = [5, 17, 42, 99, 7]
    expected = {}
    for spec in (None, "a", "b"):
        ref.use(spec)
        expected[spec] = tuple(ref.generate_ids(prompt, 6))
    assert len(set(expected.values())) == 3
    return m, prompt, expected


def test_swapping_thread_never_mixes_adapters(tiny, engine):
    """1,000 swaps while other threads generate: every output is exactly one adapter's (or the base's)."""
    # onnxruntime auto: the generators start on the plain graph and the first swap moves to the slotted one
    for mode in ("live", "merge") if engine == "numpy" else ("live", "auto"):
        m, prompt, expected = _contenders(tiny, engine, mode)
        seen, errors, stop = [], [], threading.Event()

        def swapper():  # at least 1,000 swaps, and on until the generators have finished 20 requests
            specs, i = [None, "a", "b"], 0
            while i < 1000 or len(seen) < 20 and not errors:
                m.use(specs[i % 3])
                i += 1
            stop.set()

        def generator():
            try:
                while not stop.is_set():
                    seen.append(tuple(m.generate_ids(prompt, 6)))
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=swapper)] + [threading.Thread(target=generator) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert seen and set(seen) <= set(expected.values()), (mode, len(seen))


def test_automatic_merges_and_swaps_never_mix(tiny, engine):
    """auto mode merging a set every few tokens while a thread swaps and others generate: a request reads the
    weights and the live factors of one state (a merge between the call and its lock once ran a set's live
    factors on top of its merged weights)."""
    import random
    import time

    m, prompt, expected = _contenders(tiny, engine, "auto")
    m.auto_merge_tokens = 4
    seen, errors, merged, stop = [], [], [], threading.Event()
    run = threading.Event()  # the generators run while it is set
    run.set()

    def swapper():
        rng = random.Random(0)
        for i in range(120):
            m.use([None, "a", "b"][i % 3])
            if i % 15 == 1:  # now and then hold "a", the generators paused, and run it alone until it is merged
                run.clear()  # (merges wait for an idle scheduler: generators back to back on a fast machine never
                deadline = time.monotonic() + 10  # leave one, whatever the timing)
                while m.mode != "merge" and time.monotonic() < deadline and not errors:
                    seen.append(tuple(m.generate_ids(prompt, 6)))
                run.set()
            else:
                time.sleep(rng.random() * 0.02)  # long enough, at times, for a merge
            merged.append(m.mode == "merge")
        stop.set()

    def generator(rows):
        try:
            while not stop.is_set():
                run.wait()
                if rows:  # rows of their own: the pure base under them, whatever the active set
                    out = m.generate_batch([prompt, prompt], 6, adapters=["b", None])
                    assert (tuple(out[0]), tuple(out[1])) == (expected["b"], expected[None])
                else:
                    seen.append(tuple(m.generate_ids(prompt, 6)))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=swapper)] + [threading.Thread(target=generator, args=(r,)) for r in (0, 0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert any(merged), "no automatic merge happened: the test did not exercise them"
    assert seen and set(seen) <= set(expected.values())


def test_rows_of_their_own_run_the_bare_base_beside_an_active_set(tiny, ids, engine):
    m = edgeadapt.load(tiny["base"], engine=engine, mode="live")
    m.add_adapter(tiny["a"], name="a")
    bare = m.generate_ids(ids[0], 6)
    m.use("a")
    assert m.generate_batch([ids[0]], 6, adapters=[None])[0] == bare != m.generate_ids(ids[0], 6)


def test_onnxruntime_lora_adapter_on_our_graph(tiny, ids, tmp_path):
    """Our .onnx_adapter through onnxruntime's own LoraAdapter / RunOptions equals our live path."""
    ort = pytest.importorskip("onnxruntime")
    from edgeadapt.formats.onnx_adapter import write_onnx_adapter

    delta = read_delta(tiny["a"])
    path = write_onnx_adapter(delta, tmp_path / "a.onnx_adapter")
    sess = ort.InferenceSession(str(tiny["base"] / "model_lora.onnx"), providers=["CPUExecutionProvider"])
    cfg = tiny["manifest"].arch
    x = np.asarray(ids, np.int64)
    feeds = {"input_ids": x, "attention_mask": np.ones_like(x), "position_ids": np.tile(np.arange(x.shape[1]), (2, 1))}
    for i in range(cfg.n_layers):
        for kv in ("key", "value"):
            feeds[f"past.{i}.{kv}"] = np.zeros((2, cfg.n_kv_heads, 0, cfg.head_dim), np.float32)
    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    ro = ort.RunOptions()
    ro.add_active_adapter(adapter)
    theirs = sess.run(["logits"], feeds, ro)[0]
    m = edgeadapt.load(tiny["base"], engine="ort", mode="live")
    m.add_adapter(path, name="a")  # our runtime reads it too
    m.use("a")
    np.testing.assert_allclose(m.logits(ids), theirs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(theirs, torch_logits(tiny["peft_a"], ids), atol=1e-4, rtol=0)


def test_onnx_adapter_for_another_base_is_refused(tiny, tmp_path):
    from dataclasses import replace

    from edgeadapt.formats.onnx_adapter import write_onnx_adapter

    other = replace(read_delta(tiny["a"]), fingerprint="sha256:" + "f" * 64)
    path = write_onnx_adapter(other, tmp_path / "x.onnx_adapter")
    m = edgeadapt.load(tiny["base"], engine="ort", mode="live")
    with pytest.raises(AdapterMismatchError, match=r"not pinned to this base \(unknown \(model_version \d+\)\).*edgeadapt import-adapter"):
        m.add_adapter(path)
    assert m.adapters == {}


@pytest.mark.parametrize("damage", ["truncated", "header", "empty", "noise"])
def test_damaged_onnx_adapter_is_refused_and_changes_nothing(tiny, ids, tmp_path, damage):
    from edgeadapt.errors import FormatError
    from edgeadapt.formats.onnx_adapter import write_onnx_adapter

    good = write_onnx_adapter(read_delta(tiny["a"]), tmp_path / "a.onnx_adapter").read_bytes()
    bad = {"truncated": good[: len(good) // 2], "header": bytes(b ^ 0xFF for b in good[:64]) + good[64:],
           "empty": b"", "noise": np.random.default_rng(0).bytes(4096)}[damage]
    (tmp_path / "x.onnx_adapter").write_bytes(bad)
    m = edgeadapt.load(tiny["base"], engine="ort", mode="live")
    m.add_adapter(tiny["b"], name="b")
    m.use("b")
    before = m.logits(ids)
    with pytest.raises(FormatError, match=r"x\.onnx_adapter: not a readable \.onnx_adapter file"):
        m.add_adapter(tmp_path / "x.onnx_adapter")
    assert list(m.adapters) == ["b"] and m.active == {"b": 1.0}
    np.testing.assert_array_equal(m.logits(ids), before)


def test_auto_mode_merges_a_long_lived_adapter(tiny, ids, engine):
    m = edgeadapt.load(tiny["base"], engine=engine, mode="auto")
    m.auto_merge_tokens = 20
    m.add_adapter(tiny["a"], name="a")
    m.add_adapter(tiny["b"], name="b")
    m.use("a")
    live = m.logits(ids)
    assert m.mode == "live"
    tokens = m.generate_ids([5, 6, 7], 10)
    m.logits(ids, adapters=["a", "b"])  # a mixed batch starts the count again
    for _ in range(2):
        assert m.generate_ids([5, 6, 7], 10) == tokens
    assert m.mode == "live"
    assert m.generate_ids([5, 6, 7], 10) == tokens  # 20 tokens of "a" alone: this request runs merged
    assert m.mode == "merge"
    if engine == "ort":
        assert m._engine.graph == "model.onnx"  # merged weights run on the plain graph
    np.testing.assert_allclose(m.logits(ids), live, atol=1e-4, rtol=0)
    m.use(None)  # back to live, from the pure base
    assert m.mode == "live"
    np.testing.assert_allclose(m.logits(ids), torch_logits(tiny["model"], ids), atol=1e-4, rtol=0)
    m.use("b")
    np.testing.assert_allclose(m.logits(ids), torch_logits(tiny["peft_b"], ids), atol=1e-4, rtol=0)


def test_auto_merge_stays_off_for_quantized_weights_and_when_disabled(tiny, ids):
    m = edgeadapt.load(tiny["base"], engine="ort", mode="auto")
    m.auto_merge_tokens = None
    m.add_adapter(tiny["a"], name="a")
    m.use("a")
    for _ in range(3):
        m.generate_ids([5, 6, 7], 10)
    assert m.mode == "live" and m._engine.graph == "model_live.onnx"


def test_auto_mode_runs_the_bare_base_on_the_plain_graph(tiny, ids):
    """onnxruntime, auto: no slots while no adapter runs; the first live adapter moves to the slotted graph
    (once), and a generation started before the switch finishes on the session it started with."""
    m = edgeadapt.load(tiny["base"], engine="ort")
    m.add_adapter(tiny["a"], name="a")
    assert m._engine.graph == "model.onnx"  # adding is not using
    base = m.logits(ids)
    steps = m._steps([ids[0]], 6, Sampler(), None)  # the decode loop under generate(stream=True)
    first = next(steps)  # running on the plain session
    m.use("a")
    assert m._engine.graph == "model_live.onnx" and m.mode == "live"
    rest = [t for step in steps for _, t in step]
    m.use(None)
    np.testing.assert_array_equal(m.logits(ids), base)  # idle slots = the plain graph, bit for bit
    assert [t for _, t in first] + rest == m.generate_ids(ids[0], 6)
    np.testing.assert_allclose(m.logits(ids, adapters=["a", None])[0], torch_logits(tiny["peft_a"], [ids[0]])[0],
                               atol=1e-4, rtol=0)
    explicit = edgeadapt.load(tiny["base"], engine="ort", mode="live")
    assert explicit._engine.graph == "model_live.onnx"  # mode="live": slots from the start, no first-use cost


def test_ort_by_name_defers_its_first_session(tiny, ids, monkeypatch):
    """engine="ort", mode auto: no session at load; the first run builds the plain graph, or — when the first
    request uses an adapter — only the slotted one (a cold start with an adapter builds one session, not two).
    engine="auto" still builds at load: a failed build is what sends it to numpy."""
    from edgeadapt.runtime.ort_engine.engine import OrtEngine

    built = []
    real = OrtEngine._build
    monkeypatch.setattr(OrtEngine, "_build", lambda self, overrides, path=None: (
        built.append((path or self._path).name), real(self, overrides, path))[1])
    ref = edgeadapt.load(tiny["base"], engine="ort", mode="live")
    ref.add_adapter(tiny["a"], name="a")
    ref.use("a")
    want_a, built[:] = ref.logits(ids), []

    m = edgeadapt.load(tiny["base"], engine="ort")
    m.add_adapter(tiny["a"], name="a")
    assert built == []
    m.use("a")
    np.testing.assert_array_equal(m.logits(ids), want_a)
    assert built == ["model_live.onnx"]
    m.use(None)
    np.testing.assert_allclose(m.logits(ids), torch_logits(tiny["model"], ids), atol=1e-4, rtol=0)

    built[:] = []
    bare = edgeadapt.load(tiny["base"], engine="ort")
    assert built == [] and bare._engine.graph == "model.onnx" and built == ["model.onnx"]
    np.testing.assert_allclose(bare.logits(ids), torch_logits(tiny["model"], ids), atol=1e-4, rtol=0)
    assert built == ["model.onnx"]

    built[:] = []
    edgeadapt.load(tiny["base"], engine="auto")
    assert built == ["model.onnx"]
