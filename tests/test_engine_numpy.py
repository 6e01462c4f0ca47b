"""NumpyEngine against transformers on tiny random llama / qwen2 models written as GGUF."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgeadapt.formats.arch import unpermute_qk  # noqa: E402
from edgeadapt.errors import AdapterMismatchError, UnsupportedError  # noqa: E402
from edgeadapt.runtime.numpy_engine import engine as engine_numpy  # noqa: E402
from edgeadapt.runtime.numpy_engine.engine import NumpyEngine  # noqa: E402
from numpy_common import _batch, _hf_logits, _real  # noqa: E402
from numpy_common import base_fixture, llama_fixture  # noqa: E402,F401 (the fixtures base, llama)


# ---------------------------------------------------------------- 1. batch with left padding
def test_matches_transformers_left_padded_batch(base):
    kind, model, cfg, w, path = base
    eng = NumpyEngine(path)
    assert eng.cfg.arch == ("llama" if kind == "llama" else "qwen2") and eng.name == "numpy"
    ids, mask, pos = _batch()
    logits, present = eng.forward(ids, mask, pos)
    assert logits.dtype == np.float32 and logits.shape == (2, 7, 256)
    assert np.isfinite(logits).all()  # pad rows too
    assert len(present) == 2 and present[0][0].shape == (2, 2, 7, 16) and present[0][1].dtype == np.float32
    ref = _hf_logits(model, ids, mask, pos)
    np.testing.assert_allclose(_real(logits, mask), _real(ref, mask), atol=1e-4, rtol=0)


def test_f32_weights_are_zero_copy(base):
    _, _, cfg, _, path = base
    eng = NumpyEngine(path)
    wq = eng._base["blk.0.attn_q.weight"]
    assert isinstance(wq, np.ndarray) and not wq.flags.owndata and np.shares_memory(wq, eng._reader.data)
    b = eng.base_weight("blk.0.attn_q.weight")
    assert b.shape == cfg.linear_shapes()["blk.0.attn_q.weight"] and not b.flags.writeable


# ---------------------------------------------------------------- 2. KV cache
def test_decode_with_cache_equals_full_forward(base):
    _, _, _, _, path = base
    eng = NumpyEngine(path)
    ids, mask, pos = _batch(1, S=9)
    full, _ = eng.forward(ids, mask, pos)
    P = 6
    logits, past = eng.forward(ids[:, :P], mask[:, :P], pos[:, :P])
    np.testing.assert_allclose(logits, full[:, :P], atol=1e-4, rtol=0)
    for s in range(P, 9):
        step, past = eng.forward(ids[:, s:s + 1], mask[:, :s + 1], pos[:, s:s + 1], past)
        assert past[0][0].shape == (2, 2, s + 1, 16)
        np.testing.assert_allclose(step[:, 0], full[:, s], atol=1e-4, rtol=0)


def test_cache_fork_and_foreign_past(base):
    """Extending an older past (a fork) must not disturb the branch computed from it, and a past
    built outside the engine (copies) works the same as the engine's own."""
    _, _, _, _, path = base
    eng = NumpyEngine(path)
    ids, mask, pos = _batch(2, S=8)
    _, p5 = eng.forward(ids[:, :5], mask[:, :5], pos[:, :5])
    a6, pa = eng.forward(ids[:, 5:6], mask[:, :6], pos[:, 5:6], p5)  # branch A (in place)
    alt = ids[:, 5:6] + 1
    b6, pb = eng.forward(alt, mask[:, :6], pos[:, 5:6], p5)  # fork B from the same past
    a7, _ = eng.forward(ids[:, 6:7], mask[:, :7], pos[:, 6:7], pa)  # branch A continues
    full, _ = eng.forward(ids[:, :7], mask[:, :7], pos[:, :7])
    np.testing.assert_allclose(a6[:, 0], full[:, 5], atol=1e-4, rtol=0)
    np.testing.assert_allclose(a7[:, 0], full[:, 6], atol=1e-4, rtol=0)
    ids_b = ids[:, :6].copy()
    ids_b[:, 5:6] = alt
    full_b, _ = eng.forward(ids_b, mask[:, :6], pos[:, :6])
    np.testing.assert_allclose(b6[:, 0], full_b[:, 5], atol=1e-4, rtol=0)
    copied = [(k.copy(), v.copy()) for k, v in p5]
    c6, _ = eng.forward(ids[:, 5:6], mask[:, :6], pos[:, 5:6], copied)
    np.testing.assert_allclose(c6, a6, atol=1e-6, rtol=0)
    # growing past the initial buffer capacity keeps results right
    _, p = eng.forward(ids[:1, :1], np.ones((1, 1), np.int64), np.zeros((1, 1), np.int64))
    rng = np.random.default_rng(3)
    seq = [int(ids[0, 0])]
    for t in range(1, 300):
        tok = int(rng.integers(1, 256))
        seq.append(tok)
        step, p = eng.forward(np.array([[tok]]), np.ones((1, t + 1), np.int64), np.array([[t]]), p)
    full, _ = eng.forward(np.array([seq]), np.ones((1, 300), np.int64), np.arange(300)[None])
    np.testing.assert_allclose(step[:, 0], full[:, -1], atol=1e-4, rtol=0)


# ---------------------------------------------------------------- 3. adapters: live == merged == transformers
_HF_MODULE = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}


def _hf_with_deltas(model, cfg, deltas):
    """A copy of ``model`` with canonical-layout deltas added to its weights."""
    import copy

    m = copy.deepcopy(model)
    sd = m.state_dict()
    with torch.no_grad():
        for name, d in deltas.items():
            _, i, kind, _ = name.split(".")
            if kind in ("attn_q", "attn_k") and cfg.rope == "norm":
                d = unpermute_qk(d, cfg.n_heads if kind == "attn_q" else cfg.n_kv_heads)
            sd[f"model.layers.{i}.{_HF_MODULE[kind]}.weight"] += torch.from_numpy(np.ascontiguousarray(d))
    return m


def test_live_equals_merged_equals_transformers(base):
    kind, model, cfg, w, path = base
    eng = NumpyEngine(path)
    ids, mask, pos = _batch(4)
    base_logits, _ = eng.forward(ids, mask, pos)
    rng = np.random.default_rng(5)
    shapes = cfg.linear_shapes()
    targets = ["blk.0.ffn_down.weight", "blk.1.attn_v.weight", "blk.0.attn_q.weight", "blk.1.attn_k.weight",
               "blk.1.ffn_gate.weight"]
    factors, deltas = {}, {}
    for n in targets:
        out, inn = shapes[n]
        lst = []
        for r, scale in ((4, 0.5), (2, 2.0)) if n == "blk.0.ffn_down.weight" else ((3, 1.5),):
            A = (0.1 * rng.standard_normal((r, inn))).astype(np.float32)
            B = (0.1 * rng.standard_normal((out, r))).astype(np.float32)
            lst.append((A, B, scale))
        factors[n] = lst
        deltas[n] = sum(np.float32(s) * (B @ A) for A, B, s in lst).astype(np.float32)

    eng.set_live(factors)
    live, _ = eng.forward(ids, mask, pos)
    eng.set_live({})
    eng.set_weights({n: eng.base_weight(n) + d for n, d in deltas.items()})
    merged, _ = eng.forward(ids, mask, pos)
    ref = _hf_logits(_hf_with_deltas(model, cfg, deltas), ids, mask, pos)
    assert np.abs(_real(live, mask) - _real(base_logits, mask)).max() > 1e-2  # the adapter does something
    np.testing.assert_allclose(_real(live, mask), _real(merged, mask), atol=1e-4, rtol=0)
    np.testing.assert_allclose(_real(merged, mask), _real(ref, mask), atol=1e-4, rtol=0)

    # live on top of overrides: merge half, run the rest live
    merged_part = {n: eng.base_weight(n) + deltas[n] for n in targets[:2]}
    eng.set_weights(merged_part)
    eng.set_live({n: factors[n] for n in targets[2:]})
    both, _ = eng.forward(ids, mask, pos)
    np.testing.assert_allclose(_real(both, mask), _real(ref, mask), atol=1e-4, rtol=0)

    eng.set_weights({})
    eng.set_live({})
    restored, _ = eng.forward(ids, mask, pos)
    assert np.array_equal(restored, base_logits)


# ---------------------------------------------------------------- 3b. per-row adapters (forward(lora=...))
def _factors(rng, shapes, targets, r):
    """{name: (A [r, in], B [out, r])}: PEFT orientation, scale already in B."""
    return {n: ((0.1 * rng.standard_normal((r, shapes[n][1]))).astype(np.float32),
                (0.1 * rng.standard_normal((shapes[n][0], r))).astype(np.float32)) for n in targets}


def _per_row(rows, shapes):
    """Adapters (or None) per batch row -> the forward(lora=) dict: ranks zero-padded to one r,
    zero slices for rows without that target."""
    names = sorted({n for f in rows if f for n in f})
    r = max(a.shape[0] for f in rows if f for a, _ in f.values())
    out = {}
    for n in names:
        o, i = shapes[n]
        A = np.zeros((len(rows), i, r), np.float32)
        Bm = np.zeros((len(rows), r, o), np.float32)
        for b, f in enumerate(rows):
            if f and n in f:
                a, bb = f[n]
                A[b, :, :a.shape[0]] = a.T
                Bm[b, :a.shape[0], :] = bb.T
        out[n] = (A, Bm)
    return out


def _shared(f):
    return {n: (np.ascontiguousarray(a.T)[None], np.ascontiguousarray(b.T)[None]) for n, (a, b) in f.items()}


def _batch3(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 256, size=(3, 7), dtype=np.int64)
    mask = np.ones((3, 7), np.int64)
    mask[1, :3] = 0  # row 1 left-padded by 3
    ids[1, :3] = 0
    return ids, mask, np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)


@pytest.mark.parametrize("mode", ["auto", "load"])
def test_per_row_lora_equals_each_row_alone(base, mode):
    """Rows: adapter X (rank 4), adapter Y (rank 2, other targets), no adapter — one forward."""
    kind, _, cfg, _, path = base
    eng = NumpyEngine(path, dequantize=mode)
    shapes = cfg.linear_shapes()
    rng = np.random.default_rng(11)
    tx = ["blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.1.ffn_up.weight", "blk.1.ffn_down.weight",
          "blk.0.attn_output.weight"] + (["output.weight"] if "output.weight" in shapes else [])
    ty = ["blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.ffn_gate.weight", "blk.1.attn_output.weight"]
    X, Y = _factors(rng, shapes, tx, 4), _factors(rng, shapes, ty, 2)
    ids, mask, pos = _batch3(12)
    got, _ = eng.forward(ids, mask, pos, lora=_per_row([X, Y, None], shapes))
    plain, _ = eng.forward(ids, mask, pos)
    for b, f in enumerate((X, Y, None)):
        alone, _ = eng.forward(ids[b:b + 1], mask[b:b + 1], pos[b:b + 1], lora=_shared(f) if f else None)
        real = mask[b].astype(bool)
        np.testing.assert_allclose(got[b][real], alone[0][real], atol=1e-5, rtol=0)
        if f:  # the adapter does something
            assert np.abs(got[b][real] - plain[b][real]).max() > 1e-2
    assert np.array_equal(eng.forward(ids, mask, pos)[0], plain)  # nothing stays behind


@pytest.mark.parametrize("mode", ["auto", "load"])
def test_row_lora_rows_are_bit_identical_to_each_row_alone(base, mode):
    """RowLoRA: each row at its own rank (4, 2, none, 4 again), no zero padding: the batch equals
    every row run alone with its 2-D factors exactly, where the padded slot form differs in the last bits."""
    from edgeadapt.runtime.numpy_engine.rows import RowLoRA

    _, _, cfg, _, path = base
    eng = NumpyEngine(path, dequantize=mode)
    shapes = cfg.linear_shapes()
    rng = np.random.default_rng(21)
    tx = ["blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.1.ffn_up.weight", "blk.1.ffn_down.weight"]
    ty = ["blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.ffn_gate.weight", "blk.1.ffn_down.weight"]
    X, Y = _factors(rng, shapes, tx, 4), _factors(rng, shapes, ty, 2)
    per = [X, Y, None, X]
    lora = {n: RowLoRA([(np.ascontiguousarray(f[n][0].T), np.ascontiguousarray(f[n][1].T)) if f and n in f else None
                        for f in per], shapes[n][1], shapes[n][0]) for n in sorted(set(tx) | set(ty))}
    ids = np.random.default_rng(22).integers(1, 256, size=(4, 6), dtype=np.int64)
    mask, pos = np.ones_like(ids), np.tile(np.arange(6), (4, 1))
    got, _ = eng.forward(ids, mask, pos, lora=lora)
    for b, f in enumerate(per):
        alone, _ = eng.forward(ids[b:b + 1], mask[:1], pos[:1], lora=_shared(f) if f else None)
        np.testing.assert_array_equal(got[b], alone[0])
    assert np.abs(got[0] - eng.forward(ids[:1], mask[:1], pos[:1])[0][0]).max() > 1e-2  # X does something
    with pytest.raises(AdapterMismatchError, match=r"blk.0.attn_q.weight: expected per-row factors of 3 rows, "
                                                   r"64 in, 64 out, found 4 rows"):
        eng.forward(ids[:3], mask[:3], pos[:3], lora=lora)
    with pytest.raises(AdapterMismatchError, match=r"row 1: expected float32 A \[64, r\] and B \[r, 64\]"):
        RowLoRA([None, (np.zeros((64, 2), np.float32), np.zeros((3, 64), np.float32))], 64, 64)


def test_shared_lora_equals_set_live_and_merged(base):
    kind, model, cfg, _, path = base
    eng = NumpyEngine(path)
    shapes = cfg.linear_shapes()
    rng = np.random.default_rng(13)
    f = _factors(rng, shapes, list(shapes), 3)  # every linear, the head too when untied
    ids, mask, pos = _batch(14)
    got, _ = eng.forward(ids, mask, pos, lora=_shared(f))
    eng.set_live({n: [(a, b, 1.0)] for n, (a, b) in f.items()})
    live, _ = eng.forward(ids, mask, pos)
    eng.set_live({})
    eng.set_weights({n: eng.base_weight(n) + b @ a for n, (a, b) in f.items()})
    merged, _ = eng.forward(ids, mask, pos)
    np.testing.assert_allclose(_real(got, mask), _real(live, mask), atol=1e-5, rtol=0)
    np.testing.assert_allclose(_real(got, mask), _real(merged, mask), atol=1e-4, rtol=0)
    # on top of a merged adapter: W' = W + ΔX, then + ΔY per call
    g = _factors(rng, shapes, ["blk.1.attn_v.weight", "blk.0.ffn_down.weight"], 2)
    both, _ = eng.forward(ids, mask, pos, lora=_shared(g))
    eng.set_weights({n: eng.base_weight(n) + b @ a + (g[n][1] @ g[n][0] if n in g else 0) for n, (a, b) in f.items()})
    np.testing.assert_allclose(_real(both, mask), _real(eng.forward(ids, mask, pos)[0], mask), atol=1e-4, rtol=0)


def test_per_row_lora_decode_with_cache_equals_full_forward(base):
    _, _, cfg, _, path = base
    eng = NumpyEngine(path, dequantize="load")
    shapes = cfg.linear_shapes()
    rng = np.random.default_rng(15)
    X = _factors(rng, shapes, ["blk.0.attn_k.weight", "blk.1.ffn_gate.weight", "blk.1.attn_output.weight"], 4)
    Y = _factors(rng, shapes, ["blk.0.attn_k.weight", "blk.0.ffn_up.weight"], 1)
    ids, mask, pos = _batch3(16)
    lora = _per_row([None, X, Y], shapes)
    full, _ = eng.forward(ids, mask, pos, lora=lora)
    P = 4
    step, past = eng.forward(ids[:, :P], mask[:, :P], pos[:, :P], lora=lora)
    np.testing.assert_allclose(step, full[:, :P], atol=1e-4, rtol=0)
    for s in range(P, 7):
        step, past = eng.forward(ids[:, s:s + 1], mask[:, :s + 1], pos[:, s:s + 1], past, lora=lora)
        real = mask[:, s].astype(bool)
        np.testing.assert_allclose(step[real, 0], full[real, s], atol=1e-4, rtol=0)


def test_bad_per_row_lora_names_every_tensor_and_computes_nothing(base):
    _, _, cfg, _, path = base
    eng = NumpyEngine(path)
    shapes = cfg.linear_shapes()
    ids, mask, pos = _batch3(17)
    want, _ = NumpyEngine(path).forward(ids[:, :6], mask[:, :6], pos[:, :6])
    _, past = eng.forward(ids[:, :5], mask[:, :5], pos[:, :5])
    nxt = (ids[:, 5:6], mask[:, :6], pos[:, 5:6])
    z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    nan = z(3, 64, 2)
    nan[1, 0, 0] = np.nan
    bad = {"blk.0.attn_q.weight": (z(2, 64, 2), z(2, 2, 64)),  # n = 2 with a batch of 3
           "blk.0.ffn_up.weight": (z(1, 32, 2), z(1, 2, 128)),  # in does not match
           "blk.1.ffn_down.weight": (z(1, 128, 2), z(1, 3, 64)),  # ranks of A and B differ
           "blk.1.attn_v.weight": (nan, z(3, 2, 32)),  # NaN
           "blk.0.attn_k.weight": (z(1, 64, 2).astype(np.float64), z(1, 2, 32)),  # float64
           "blk.1.attn_q.weight": (z(64, 2), z(2, 64)),  # 2-D
           "output_norm.weight": (z(1, 64, 2), z(1, 2, 64)),  # not a linear
           "blk.0.ffn_gate.weight": (z(3, 64, 2), z(3, 2, 128))}  # fine on its own
    with pytest.raises(AdapterMismatchError) as ei:
        eng.forward(*nxt[:3], past, lora=bad)
    msg = str(ei.value)
    for n in bad:
        assert (n in msg) == (n != "blk.0.ffn_gate.weight"), n
    assert "A [2, 64, 2]" in msg and "n = 1 or 3" in msg and "NaN/inf in A" in msg and "float64" in msg
    with pytest.raises(AdapterMismatchError, match="expected a dict"):
        eng.forward(*nxt[:3], past, lora=[("blk.0.attn_q.weight", None)])
    got, _ = eng.forward(*nxt[:3], past)  # the refused calls left the cache as it was
    np.testing.assert_allclose(got[:, 0], want[:, 5], atol=1e-4, rtol=0)
    # rank 0 (an ONNX-style empty default) is allowed and changes nothing
    empty = {n: (z(1, shapes[n][1], 0), z(1, 0, shapes[n][0])) for n in list(shapes)[:3]}
    assert np.array_equal(eng.forward(ids, mask, pos, lora=empty)[0], eng.forward(ids, mask, pos)[0])


# ---------------------------------------------------------------- 5. bad adapters leave the engine unchanged
def test_bad_overrides_and_factors_change_nothing(base):
    _, _, cfg, w, path = base
    eng = NumpyEngine(path)
    ids, mask, pos = _batch(8)
    good = {"blk.0.ffn_up.weight": eng.base_weight("blk.0.ffn_up.weight") * np.float32(1.5)}
    eng.set_weights(good)
    before, _ = eng.forward(ids, mask, pos)
    nan = eng.base_weight("blk.1.attn_v.weight").copy()
    nan[0, 0] = np.nan
    bad = {"blk.0.ffn_down.weight": np.zeros((3, 3), np.float32),  # wrong shape
           "blk.1.attn_v.weight": nan,  # NaN
           "blk.9.attn_q.weight": np.zeros((64, 64), np.float32),  # unknown name
           "blk.0.attn_k.weight": np.zeros(cfg.linear_shapes()["blk.0.attn_k.weight"], np.float64),  # dtype
           "blk.1.ffn_up.weight": eng.base_weight("blk.1.ffn_up.weight").copy()}  # fine on its own
    with pytest.raises(AdapterMismatchError) as ei:
        eng.set_weights(bad)
    msg = str(ei.value)
    for n in ("blk.0.ffn_down.weight", "blk.1.attn_v.weight", "blk.9.attn_q.weight", "blk.0.attn_k.weight"):
        assert n in msg
    assert "(64, 128)" in msg and "(3, 3)" in msg and "float64" in msg and "blk.1.ffn_up" not in msg
    with pytest.raises(AdapterMismatchError) as ei:
        eng.set_live({"blk.0.ffn_up.weight": [(np.zeros((2, 64), np.float32), np.zeros((128, 3), np.float32), 1.0)],
                      "output_norm.weight": [(np.zeros((2, 64), np.float32), np.zeros((64, 2), np.float32), 1.0)],
                      "blk.1.ffn_gate.weight": [(np.zeros((2, 64), np.float32), np.zeros((128, 2), np.float32),
                                                 float("nan"))]})
    msg = str(ei.value)
    assert "blk.0.ffn_up.weight[0].B" in msg and "output_norm.weight" in msg and "blk.1.ffn_gate.weight[0].scale" in msg
    after, _ = eng.forward(ids, mask, pos)
    assert np.array_equal(before, after)
    with pytest.raises(AdapterMismatchError):
        eng.base_weight("blk.7.nothing.weight")


def _blas_threads():
    """Thread counts of every OpenBLAS in the process (numpy's; scipy's when transformers loaded it)."""
    import ctypes

    counts = []
    for path in sorted({line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line.lower() and "/" in line}):
        lib = ctypes.CDLL(path)
        for fn in ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads", "openblas_get_num_threads"):
            if hasattr(lib, fn):
                counts.append(getattr(lib, fn)())
                break
    return counts


def test_threads_sets_openblas(llama):
    _, _, path = llama
    before = _blas_threads() if sys.platform.startswith("linux") else []
    if not before:
        pytest.skip("numpy's BLAS is not an OpenBLAS found in /proc/self/maps")
    try:
        eng = NumpyEngine(path, threads=1)
        assert eng.blas_threads_set is True and set(_blas_threads()) == {1}
        assert NumpyEngine(path).blas_threads_set is None and set(_blas_threads()) == {1}  # None leaves it alone
    finally:
        engine_numpy.set_blas_threads(max(before))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UnsupportedError, match="threads="):
            NumpyEngine(path, threads=bad)


# ---------------------------------------------------------------- 6. no torch / onnx on the device
def test_imports_without_torch_or_onnx():
    code = ("import sys; sys.modules['torch']=None; sys.modules['onnx']=None; sys.modules['onnxruntime']=None; "
            "import edgeadapt.runtime.numpy_engine.engine as m; assert 'torch' not in [k for k, v in sys.modules.items() if v]")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
