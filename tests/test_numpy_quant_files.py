"""NumpyEngine on quantized GGUF bases (every ggml type it reads, lazy and loaded) and on damaged files."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgeadapt.converters.gguf_base import _hf_fields, write_base_gguf  # noqa: E402
from edgeadapt.converters.hf import from_gguf_file  # noqa: E402
from edgeadapt.errors import FormatError, UnsupportedError  # noqa: E402
from edgeadapt.formats.gguf_file import SMALL_ARRAY, open_gguf  # noqa: E402
from edgeadapt.runtime.numpy_engine import engine as engine_numpy, weights as ggml_weights  # noqa: E402
from edgeadapt.runtime.numpy_engine.engine import NumpyEngine  # noqa: E402
from numpy_common import Q, _batch, _real, _write  # noqa: E402
from numpy_common import base_fixture, llama_fixture  # noqa: E402,F401 (the fixtures base, llama)


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


