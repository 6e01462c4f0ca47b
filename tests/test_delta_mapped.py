"""A delta file's F32 factors are held once (issue #17, edge memory).

- ``read_delta`` verifies the file through a read-only memory map and keeps names and shapes only; the factors
  are read again, privately, when first used (``MappedFactors``), and must then be the bytes verified at load:
  a file rewritten in place after loading is refused by name, never run;
- the model driver hands the engines transposed views of those arrays and the onnxruntime engine copies them
  into its slot layout once: outputs are bit for bit those of the same adapter read into memory the old way
  (``delta_from_bytes``), bare, alone, stacked, swapped, removed and per row, on the int4 graph and on numpy;
- once the engine holds its copy, the driver's and the delta's are released: an active adapter is held once, and
  a plan that needs the factors again (a stack) reads them again, verified — a file rewritten after ``use()``
  keeps running as verified in the engine, and is refused by name when read again.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import edgeadapt
from edgeadapt.errors import IntegrityError
from edgeadapt.formats.delta import MappedFactors, delta_from_bytes, read_delta


@pytest.fixture(scope="module")
def qbase(tiny, tmp_path_factory):
    from edgeadapt.converters.export_base import export_base

    out = tmp_path_factory.mktemp("mapped") / "base"
    export_base(tiny["root"] / "hf", out, gguf_type="F32", onnx_weights=("fp32", "int4"))
    return out


def test_loaded_factors_are_the_files_and_are_read_on_use(tiny):
    d = read_delta(tiny["a"])
    ref = delta_from_bytes(tiny["a"].read_bytes(), tiny["a"])
    assert isinstance(d.factors, MappedFactors) and "read" not in repr(d.factors)
    # what loading and checking a base ask for comes from the verified header, without reading the factors
    assert d.targets == ref.targets and d.ranks == ref.ranks and d.n_params == ref.n_params
    assert [d.base_shape(t) for t in d.targets] == [ref.base_shape(t) for t in ref.targets]
    assert "read" not in repr(d.factors)
    for t in ref.targets:
        for x, y in zip(d.factors[t], ref.factors[t]):
            assert x.dtype == np.float32 and x.shape == y.shape
            np.testing.assert_array_equal(x, y)
    assert "read" in repr(d.factors)


def test_a_file_rewritten_after_loading_is_refused_when_used(tiny, tmp_path):
    """Any change of the bytes between loading and first use is refused: what runs must be what was verified."""
    path = tmp_path / "x.gguf"
    shutil.copy(tiny["a"], path)
    d = read_delta(path)
    data = bytearray(path.read_bytes())
    data[-8:] = np.array([0.5, -0.25], np.float32).tobytes()  # the last factor values change, the size does not
    with open(path, "r+b") as f:  # in place: the same inode the loader mapped
        f.write(data)
    with pytest.raises(IntegrityError, match="changed after it was loaded"):
        d.factors[d.targets[0]]


def test_factors_read_before_a_rewrite_stay_the_verified_ones(tiny, tmp_path):
    path = tmp_path / "x.gguf"
    shutil.copy(tiny["a"], path)
    d = read_delta(path)
    before = {t: tuple(x.copy() for x in d.factors[t]) for t in d.targets}
    with open(path, "r+b") as f:
        f.seek(-64, 2)
        f.write(bytes(64))
    for t in d.targets:
        for x, y in zip(d.factors[t], before[t]):
            np.testing.assert_array_equal(x, y)


def _run(m, ids, tiny):
    """Logits bare, "a", "a"+"b" stacked, "b" after a swap, bare after removing "a"; greedy tokens per row."""
    out = [m.logits(ids)]
    m.use("a")
    out.append(m.logits(ids))
    m.use({"a": 0.5, "b": 1.0})
    out.append(m.logits(ids))
    m.use("b")
    out.append(m.logits(ids))
    rows = m.generate_batch(ids, 6, adapters=["a", {"a": 1.0, "b": 0.5}])
    m.use(None)
    m.remove_adapter("a")
    out.append(m.logits(ids))
    return out, rows


@pytest.mark.parametrize("load", [dict(engine="ort", weights="int4"), dict(engine="ort", mode="live"),
                                  dict(engine="numpy")])
def test_outputs_are_those_of_the_adapter_read_into_memory(tiny, qbase, ids, load):
    got = edgeadapt.load(qbase, **load)
    ref = edgeadapt.load(qbase, **load)
    for m, how in ((got, "mapped"), (ref, "in memory")):
        for n in ("a", "b"):
            m.add_adapter(tiny[n] if how == "mapped" else delta_from_bytes(tiny[n].read_bytes(), tiny[n]), name=n)
    assert isinstance(got.adapters["a"].factors, MappedFactors)
    assert not isinstance(ref.adapters["a"].factors, MappedFactors)
    (g, grows), (r, rrows) = _run(got, ids, tiny), _run(ref, ids, tiny)
    for x, y in zip(g, r):
        np.testing.assert_array_equal(x, y)
    assert grows == rrows


def _released(m, name):
    return "read" not in repr(m.adapters[name].factors) and name not in m._factor_cache


@pytest.mark.parametrize("load", [dict(engine="ort", weights="int4"), dict(engine="ort", mode="live")])
def test_onnxruntime_holds_an_active_adapter_once(tiny, qbase, ids, load):
    m = edgeadapt.load(qbase, **load)
    for n in ("a", "b"):
        m.add_adapter(tiny[n], name=n)
    m.use("a")
    one = m.logits(ids)
    assert _released(m, "a")  # the engine's slot arrays are the one copy
    m.use({"a": 1.0, "b": 0.5})  # read again (verified), copied into the stacked plan's slots, released
    two = m.logits(ids)
    assert _released(m, "a") and _released(m, "b")
    m.use("a")  # the kept plan of "a": nothing read
    assert _released(m, "a")
    np.testing.assert_array_equal(m.logits(ids), one)
    rows = m.logits(ids, adapters=["a", {"a": 1.0, "b": 0.5}])  # per-row plans read them again too
    np.testing.assert_array_equal(rows[0], one[0])
    assert _released(m, "a") and _released(m, "b")
    assert not np.array_equal(one, two)


def test_numpy_keeps_its_own_copy_and_releases_the_deltas(tiny, qbase, ids):
    m = edgeadapt.load(qbase, engine="numpy")
    m.add_adapter(tiny["a"], name="a")
    m.use("a")
    m.logits(ids)
    assert "read" not in repr(m.adapters["a"].factors) and "a" in m._factor_cache


def test_a_file_rewritten_after_use_runs_as_verified_and_is_refused_when_read_again(tiny, qbase, ids, tmp_path):
    path = tmp_path / "x.gguf"
    shutil.copy(tiny["a"], path)
    m = edgeadapt.load(qbase, engine="ort", weights="int4")
    m.add_adapter(path, name="a")
    m.add_adapter(tiny["b"], name="b")
    m.use("a")
    before = m.logits(ids)
    with open(path, "r+b") as f:  # in place: the inode the loader mapped
        f.seek(-64, 2)
        f.write(bytes(64))
    np.testing.assert_array_equal(m.logits(ids), before)  # the engine's copy of the verified factors
    with pytest.raises(IntegrityError, match="changed after it was loaded"):
        m.use({"a": 1.0, "b": 1.0})  # a stack reads "a" again: refused, by name
    assert m.active == {"a": 1.0}  # nothing changed
    np.testing.assert_array_equal(m.logits(ids), before)


# ---- streamed: one adapter's factors copied into the engine's slots as the file is read
def test_a_stream_gives_the_files_factors_and_checks_the_whole_file(tiny, tmp_path):
    d = read_delta(tiny["a"])
    ref = delta_from_bytes(tiny["a"].read_bytes(), tiny["a"])
    assert d.factors.streams
    got = {t: (a, b) for t, a, b in d.factors.stream()}
    assert sorted(got) == sorted(ref.factors)  # every target once
    for t, (a, b) in got.items():
        np.testing.assert_array_equal(a, ref.factors[t][0])
        np.testing.assert_array_equal(b, ref.factors[t][1])
        assert a.flags.owndata and b.flags.owndata  # private copies, not views of the mapping
    path = tmp_path / "x.gguf"
    shutil.copy(tiny["a"], path)
    d = read_delta(path)
    with open(path, "r+b") as f:  # in place, the last bytes: every target has been yielded before the check
        f.seek(-4, 2)
        f.write(np.float32(0.125).tobytes())
    seen = []
    with pytest.raises(IntegrityError, match="changed after it was loaded"):
        for t, _, _ in d.factors.stream():
            seen.append(t)
    assert sorted(seen) == sorted(ref.factors)  # the check comes after the last one, before the loop ends


def test_a_stream_refuses_a_changed_header(tiny, tmp_path):
    path = tmp_path / "x.gguf"
    shutil.copy(tiny["a"], path)
    d = read_delta(path)
    data = bytearray(path.read_bytes())
    at = data.find(b"edgeadapt.adapter.name")
    data[at:at + 4] = b"EDGE"  # a key renamed: the same size, another header
    with open(path, "r+b") as f:
        f.write(data)
    with pytest.raises(IntegrityError, match="changed after it was loaded"):
        list(d.factors.stream())


@pytest.mark.parametrize("weight", [1.0, 0.5, -2.0])
def test_a_streamed_plan_is_the_plan_made_from_the_whole_file(tiny, qbase, weight, monkeypatch):
    """use() of one mapped adapter builds its slots while reading the file: the same arrays, bit for bit, as the
    plan made from every factor at once (the path stacks and in-memory adapters take)."""
    m = edgeadapt.load(qbase, engine="ort", weights="int4")
    m.add_adapter(tiny["a"], name="a")
    calls = []
    stream = MappedFactors.stream
    monkeypatch.setattr(MappedFactors, "stream", lambda self: calls.append(1) or stream(self))
    got = m._live_plan([{"a": weight}])
    assert calls == [1] and _released(m, "a")
    ref = m._engine.slot_form(m._factors([{"a": weight}]))
    assert calls == [1]  # the whole-file path read it privately
    assert sorted(got) == sorted(ref)
    for n in ref:
        assert len(got[n]) == len(ref[n]) == 2
        for x, y in zip(got[n], ref[n]):
            assert x.dtype == y.dtype and x.shape == y.shape and x.flags.c_contiguous
            np.testing.assert_array_equal(x, y)


def test_use_of_a_file_changed_since_loading_is_refused_and_changes_nothing(tiny, qbase, ids, tmp_path):
    path = tmp_path / "x.gguf"
    shutil.copy(tiny["a"], path)
    m = edgeadapt.load(qbase, engine="ort", weights="int4")
    m.add_adapter(path, name="a")
    m.add_adapter(tiny["b"], name="b")
    m.use("b")
    before = m.logits(ids)
    with open(path, "r+b") as f:
        f.seek(-64, 2)
        f.write(bytes(64))
    with pytest.raises(IntegrityError, match="changed after it was loaded"):
        m.use("a")
    assert m.active == {"b": 1.0}
    np.testing.assert_array_equal(m.logits(ids), before)
    with pytest.raises(IntegrityError, match="changed after it was loaded"):
        m.generate_batch(ids, 2, adapters=["a", "b"])  # a batch row's one-row plan: refused the same way


def test_a_streamed_use_holds_the_slots_and_not_a_second_copy(tiny, qbase, tmp_path):
    """Python-side allocations while use() builds one adapter's plan (the session built before): the slot
    arrays and about one group's factors, where the whole-file path held a private copy of every factor too."""
    import tracemalloc

    from edgeadapt.formats.delta import write_delta

    ref = read_delta(tiny["a"])
    rng = np.random.default_rng(0)
    shapes = edgeadapt.load(qbase, engine="ort", weights="int4").config.linear_shapes()
    r = 128  # every linear layer: factors of a few MB, beside which Python's own allocations do not count
    path = tmp_path / "wide.gguf"
    write_delta(path, arch=ref.arch, fingerprint=ref.fingerprint, name="a",
                factors={w: (rng.standard_normal((r, n_in), np.float32), rng.standard_normal((n_out, r), np.float32))
                         for w, (n_out, n_in) in shapes.items()})

    def peak_over_slots(stream: bool) -> tuple[int, int]:
        m = edgeadapt.load(qbase, engine="ort", weights="int4")
        m.add_adapter(path, name="a")
        m._slots_ready()
        if not stream:
            m.adapters["a"].factors._head = None  # as a version-1 file: read whole
        tracemalloc.start()
        try:
            m.use("a")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        slots = sum(x.nbytes for f in m._live.values() for x in f)
        return peak - slots, slots

    factors = sum(a.nbytes + b.nbytes for a, b in read_delta(path).factors.values())
    streamed, slots = peak_over_slots(True)
    whole, _ = peak_over_slots(False)
    assert whole >= factors  # the test can fail: the whole-file path holds every factor beside the slots
    assert streamed < factors / 2, (streamed, factors, slots)  # the factors of one layer's largest group, ~1/3 here
