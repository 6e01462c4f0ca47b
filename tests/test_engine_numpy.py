"""NumpyEngine against transformers on tiny random llama / qwen2 models written as GGUF."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgeadapt.arch import unpermute_qk  # noqa: E402
from edgeadapt.converters.gguf_base import _hf_fields, write_base_gguf  # noqa: E402
from edgeadapt.converters.hf import from_gguf_file, from_transformers  # noqa: E402
from edgeadapt.errors import AdapterMismatchError, FormatError, UnsupportedError  # noqa: E402
from edgeadapt.gguf_file import SMALL_ARRAY, open_gguf  # noqa: E402
from edgeadapt.runtime import engine_numpy, ggml_weights  # noqa: E402
from edgeadapt.runtime.engine_numpy import NumpyEngine  # noqa: E402

SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
Q = gguf.GGMLQuantizationType


def _make(kind: str):
    torch.manual_seed(0 if kind == "llama" else 1)
    if kind == "llama":
        conf = transformers.LlamaConfig(**SIZES, tie_word_embeddings=False)
        cls = transformers.LlamaForCausalLM
    else:
        conf = transformers.Qwen2Config(**SIZES, tie_word_embeddings=True)
        cls = transformers.Qwen2ForCausalLM
    conf._attn_implementation = "eager"
    model = cls(conf).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
    return model


def _write(cfg, w, path: Path, qtype: str) -> Path:
    """Like write_base_gguf but any type gguf.quants can quantize (Q4_0, Q4_1, …) for 2-D tensors."""
    if qtype in ("F32", "F16", "Q8_0"):
        write_base_gguf(cfg, w, path, qtype=qtype, fingerprint="x")
        return path
    t = Q[qtype]
    writer = gguf.GGUFWriter(str(path), cfg.arch)
    _hf_fields(writer, cfg, None)
    for name, a in w.items():
        if a.ndim == 2 and a.shape[1] % gguf.GGML_QUANT_SIZES[t][0] == 0:
            writer.add_tensor(name, gguf.quants.quantize(a, t), raw_dtype=t)
        else:
            writer.add_tensor(name, np.ascontiguousarray(a, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def base(request, tmp_path_factory):
    model = _make(request.param)
    cfg, w = from_transformers(model)
    path = _write(cfg, w, tmp_path_factory.mktemp(request.param) / "m.gguf", "F32")
    return request.param, model, cfg, w, path


def _batch(seed=0, S=7):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 256, size=(2, S), dtype=np.int64)
    mask = np.ones((2, S), np.int64)
    mask[0, :2] = 0  # row 0 left-padded by 2
    ids[0, :2] = 0
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
    return ids, mask, pos


def _hf_logits(model, ids, mask, pos):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos))
    return out.logits.float().numpy()


def _real(a, mask_cols):
    """Logits at real (non-pad) positions only, flattened."""
    return a[mask_cols.astype(bool)]


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
    from edgeadapt.runtime.row_lora import RowLoRA

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


# ---------------------------------------------------------------- 4. quantized bases
def test_q8_0_load_and_lazy(base, tmp_path):
    kind, model, cfg, w, path = base
    q8 = _write(cfg, w, tmp_path / "q8.gguf", "Q8_0")
    ids, mask, pos = _batch(6)
    ref, _ = NumpyEngine(path).forward(ids, mask, pos)
    e_load = NumpyEngine(q8, dequantize="load")
    e_lazy = NumpyEngine(q8, dequantize="lazy")
    e_auto = NumpyEngine(q8)
    assert e_load._mode == "load" and e_lazy._mode == "lazy" and e_auto._mode == "load"
    assert isinstance(e_lazy._base["blk.0.ffn_up.weight"], engine_numpy._Lazy)
    lo, _ = e_load.forward(ids, mask, pos)
    la, _ = e_lazy.forward(ids, mask, pos)
    au, _ = e_auto.forward(ids, mask, pos)
    np.testing.assert_allclose(lo, la, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lo, au, atol=1e-5, rtol=0)
    err = np.abs(_real(lo, mask) - _real(ref, mask)).max()
    assert 0 < err < 0.05 * np.abs(_real(ref, mask)).max(), err
    # base_weight is the dequantized tensor, in both modes
    reader = gguf.GGUFReader(str(q8))
    t = {t.name: t for t in reader.tensors}["blk.1.ffn_down.weight"]
    want = gguf.quants.dequantize(t.data, t.tensor_type)
    for e in (e_load, e_lazy):
        got = e.base_weight("blk.1.ffn_down.weight")
        assert got.dtype == np.float32 and np.array_equal(got, want)
    # live adapters work on a lazy quantized base exactly as on a loaded one
    n = "blk.0.ffn_up.weight"
    A = np.full((2, cfg.dim), 0.05, np.float32)
    B = np.full((cfg.ffn_dim, 2), 0.05, np.float32)
    for e in (e_load, e_lazy):
        e.set_live({n: [(A, B, 1.0)]})
    np.testing.assert_allclose(e_load.forward(ids, mask, pos)[0], e_lazy.forward(ids, mask, pos)[0], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = _make("llama")
    cfg, w = from_transformers(model)
    return cfg, w, _write(cfg, w, tmp_path_factory.mktemp("llama-only") / "m.gguf", "F32")


@pytest.mark.parametrize("qtype", ["F16", "Q4_0", "Q4_1", "Q5_0"])
def test_other_types_load_and_lazy(llama, tmp_path, qtype):
    cfg, w, path = llama
    f = _write(cfg, w, tmp_path / f"{qtype}.gguf", qtype)
    ids, mask, pos = _batch(7)
    ref, _ = NumpyEngine(path).forward(ids, mask, pos)
    lo, _ = NumpyEngine(f, dequantize="load").forward(ids, mask, pos)
    la, _ = NumpyEngine(f, dequantize="lazy").forward(ids, mask, pos)
    np.testing.assert_allclose(lo, la, atol=1e-5, rtol=0)
    # exact against gguf's own dequantization of the file run through the F32 path (4-bit noise on a
    # random tiny model moves logits by up to ~50 %, so closeness to the F32 model says little)
    _, wq = from_gguf_file(f)
    indep = _write(cfg, wq, tmp_path / f"{qtype}-dequantized.gguf", "F32")
    np.testing.assert_allclose(lo, NumpyEngine(indep).forward(ids, mask, pos)[0], atol=1e-4, rtol=0)
    if qtype == "F16":
        np.testing.assert_allclose(_real(lo, mask), _real(ref, mask), atol=1e-2, rtol=0)


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0", "Q4_1"])
def test_fast_dequantizers_match_gguf(qtype):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((37, 96)).astype(np.float32) * np.linspace(0.01, 3, 96, dtype=np.float32)
    t = Q[qtype]
    q = gguf.quants.quantize(a, t)
    fast = ggml_weights._FAST_DEQ[t](q)
    assert fast.dtype == np.float32 and np.array_equal(fast, gguf.quants.dequantize(q, t))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_block_matvec_matches_dequantize_then_matmul(qtype):
    """The lazy decode path (x Wᵀ straight from the blocks) against gguf's dequantization, in float64."""
    rng = np.random.default_rng(1)
    t = Q[qtype]
    a = (rng.standard_normal((40, 96)) * np.linspace(0.05, 2, 96)).astype(np.float32)
    q = gguf.quants.quantize(a, t)
    w = gguf.quants.dequantize(q, t).astype(np.float64)
    for n in (1, 2, ggml_weights._MATVEC_MAX_ROWS):
        x = rng.standard_normal((n, 96)).astype(np.float32)
        y = ggml_weights._FAST_MV[t](x, q)
        assert y.dtype == np.float32 and y.shape == (n, 40)
        np.testing.assert_allclose(y, x.astype(np.float64) @ w.T, atol=2e-5, rtol=1e-5)


def test_lazy_decode_equals_load_decode(llama, tmp_path):
    """Decode steps (few rows: the block matvec path) on a lazy Q4_1 base equal the loaded base."""
    cfg, w, _ = llama
    f = _write(cfg, w, tmp_path / "q41.gguf", "Q4_1")
    ids, mask, pos = _batch(18, S=9)
    outs = []
    for mode in ("load", "lazy"):
        eng = NumpyEngine(f, dequantize=mode)
        _, past = eng.forward(ids[:, :5], mask[:, :5], pos[:, :5])
        steps = []
        for s in range(5, 9):
            step, past = eng.forward(ids[:, s:s + 1], mask[:, :s + 1], pos[:, s:s + 1], past)
            steps.append(step)
        outs.append(np.concatenate(steps, axis=1))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4, rtol=0)


def test_auto_goes_lazy_above_limit(base, tmp_path, monkeypatch):
    _, _, cfg, w, _ = base
    q8 = _write(cfg, w, tmp_path / "q8.gguf", "Q8_0")
    monkeypatch.setattr(NumpyEngine, "auto_load_limit", 1000)
    assert NumpyEngine(q8)._mode == "lazy"


def test_fused_load_mode_with_partial_overrides_and_live(llama):
    """"load" fuses q|k|v and gate|up; overriding one member of a group unfuses that group only,
    and live factors apply to views of a fused output: all equal the zero-copy engine."""
    cfg, w, path = llama
    ref_eng, fused = NumpyEngine(path), NumpyEngine(path, dequantize="load")
    assert (0, "qkv") in fused._fused and (1, "gu") in fused._fused and not ref_eng._fused
    ids, mask, pos = _batch(9)
    np.testing.assert_allclose(fused.forward(ids, mask, pos)[0], ref_eng.forward(ids, mask, pos)[0], atol=1e-4, rtol=0)
    rng = np.random.default_rng(10)
    shapes = cfg.linear_shapes()
    over = {n: ref_eng.base_weight(n) + np.float32(0.05) * rng.standard_normal(shapes[n]).astype(np.float32)
            for n in ("blk.0.attn_k.weight", "blk.1.ffn_up.weight")}
    live = {n: [((0.1 * rng.standard_normal((2, shapes[n][1]))).astype(np.float32),
                 (0.1 * rng.standard_normal((shapes[n][0], 2))).astype(np.float32), 0.7)]
            for n in ("blk.0.attn_q.weight", "blk.1.attn_v.weight", "blk.1.ffn_gate.weight", "blk.0.ffn_up.weight",
                      "output.weight")}
    for e in (ref_eng, fused):
        e.set_weights(over)
        e.set_live(live)
    a, _ = ref_eng.forward(ids, mask, pos)
    b, _ = fused.forward(ids, mask, pos)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    assert fused._layers[0][0] is None and fused._layers[1][0] is not None  # blk.0 qkv unfused, blk.1 fused
    assert fused._layers[1][1] is None and fused._layers[0][1] is not None
    fused.set_weights({})
    fused.set_live({})
    np.testing.assert_allclose(fused.forward(ids, mask, pos)[0], NumpyEngine(path).forward(ids, mask, pos)[0],
                               atol=1e-4, rtol=0)
    for n in ("blk.0.attn_k.weight", "blk.1.ffn_gate.weight", "output.weight"):
        assert np.array_equal(fused.base_weight(n), w[n])


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


# ---------------------------------------------------------------- errors on files
def test_file_errors(base, tmp_path):
    _, _, cfg, w, _ = base
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(FormatError, match="junk.gguf"):
        NumpyEngine(junk)
    missing = dict(w)
    del missing["blk.1.ffn_up.weight"]
    missing["blk.0.ffn_down.weight"] = missing["blk.0.ffn_down.weight"][:, :64].copy()
    p = tmp_path / "missing.gguf"
    write_base_gguf(cfg, missing, p, qtype="F32", fingerprint="x")
    with pytest.raises(FormatError) as ei:
        NumpyEngine(p)
    assert "blk.1.ffn_up.weight" in str(ei.value) and "blk.0.ffn_down.weight" in str(ei.value)
    other = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(other), "mamba")  # an architecture edgeadapt does not run
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedError):
        NumpyEngine(other)
    with pytest.raises(UnsupportedError):
        NumpyEngine(base[4], dequantize="sometimes")


def _gguf_with_vocab(cfg, w, path):
    """A base file with a long string array and a long int array in its metadata, like a real one."""
    writer = gguf.GGUFWriter(str(path), cfg.arch)
    _hf_fields(writer, cfg, None)
    writer.add_token_list([f"tok{i}".encode() for i in range(3000)])
    writer.add_token_types([1] * 3000)
    writer.add_array("test.small", [1, 2, 3])
    writer.add_string("test.text", "héllo")
    for name, a in w.items():
        writer.add_tensor(name, np.ascontiguousarray(a, np.float32) if a.ndim == 1 else a.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_lean_reader_matches_gguf_reader(llama, tmp_path):
    cfg, w, _ = llama
    p = _gguf_with_vocab(cfg, w, tmp_path / "v.gguf")
    ours, theirs = open_gguf(p), gguf.GGUFReader(str(p))
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.ttype, a.shape[::-1], a.start, a.nbytes) == (b.tensor_type, tuple(b.shape), b.data_offset, b.n_bytes)
        assert ours.view(a).dtype == b.data.dtype and np.array_equal(ours.view(a), b.data)
    for k, f in theirs.fields.items():
        if not k.startswith("GGUF."):
            assert len(ours.fields[k].data) == len(f.data)
            if len(f.data) <= SMALL_ARRAY:
                assert ours.fields[k].contents() == f.contents(), k
    assert ours.fields["tokenizer.ggml.tokens"].contents() is None  # 3000 strings stepped over
    assert ours.fields["test.text"].contents() == "héllo" and ours.fields["test.small"].contents() == [1, 2, 3]
    ArchConfig = type(cfg)
    assert ArchConfig.from_gguf(ours) == ArchConfig.from_gguf(theirs)


def test_lean_reader_refuses_damaged_files(llama, tmp_path):
    """Cut anywhere, or with a lying count / offset: a FormatError naming the file, never another error."""
    cfg, w, _ = llama
    data = _gguf_with_vocab(cfg, w, tmp_path / "v.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    header_end = data.index(b"blk.1.ffn_down.weight") + 200  # past the tensor table
    for cut in list(range(0, 64, 7)) + list(range(64, header_end, 997)) + [len(data) - 1]:
        bad.write_bytes(data[:cut])
        with pytest.raises(FormatError, match="bad.gguf"):
            NumpyEngine(bad)
    lying = bytearray(data)
    lying[16:24] = (1 << 40).to_bytes(8, "little")  # key/value count
    bad.write_bytes(bytes(lying))
    with pytest.raises(FormatError, match=r"header claims 1099511627776 metadata keys; a \d+-byte file holds at most"):
        NumpyEngine(bad)
    swapped = bytearray(data)
    swapped[4:8] = (3 << 24).to_bytes(4, "little")  # version 3, big-endian
    bad.write_bytes(bytes(swapped))
    with pytest.raises(UnsupportedError, match="GGUF version 50331648, a big-endian file \\(version 3\\)"):
        NumpyEngine(bad)


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
            "import edgeadapt.runtime.engine_numpy as m; assert 'torch' not in [k for k, v in sys.modules.items() if v]")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
