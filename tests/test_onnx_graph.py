"""The hand-built ONNX decoder computes what transformers computes, and its weights can be
overridden and read back exactly as the contract in edgeadapt.converters.onnx_graphs.graph says."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from edgeadapt.converters.hf import from_transformers  # noqa: E402
from edgeadapt.converters.onnx_graphs.graph import DATA_FILE, VERIFY_FILE, build_onnx  # noqa: E402

SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
TOL = 1e-4


def _hf_model(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(tie_word_embeddings=True, **SIZES))
    with torch.no_grad():  # non-trivial weights: std 0.1, norm weights around 1, biases around 0
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def built(request, tmp_path_factory):
    model = _hf_model(request.param)
    cfg, w = from_transformers(model)
    out = tmp_path_factory.mktemp(request.param)
    steps = []
    table = build_onnx(cfg, w, out, progress=lambda *a: steps.append(a))
    return dict(model=model, cfg=cfg, w=w, out=out, table=table, steps=steps)


def _session(path, overrides=None):
    so = ort.SessionOptions()
    so.log_severity_level = 3  # weight_sums.onnx's overridable initializer makes ORT warn
    keep = []
    for name, arr in (overrides or {}).items():
        keep.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr, dtype=np.float32)))
        so.add_initializer(name, keep[-1])
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    sess._keep_alive = keep  # the OrtValues must outlive the session
    return sess


def _feeds(cfg, ids, mask, pos, past=None):
    b = ids.shape[0]
    f = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
         "position_ids": pos.astype(np.int64)}
    for i in range(cfg.n_layers):
        for kind in ("key", "value"):
            f[f"past.{i}.{kind}"] = (past[f"present.{i}.{kind}"] if past else
                                     np.zeros((b, cfg.n_kv_heads, 0, cfg.head_dim), np.float32))
    return f


def _run(sess, feeds):
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def _padded_batch(seq=8):
    """Two rows, row 0 left-padded by 2; padding-aware position ids."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, SIZES["vocab_size"], size=(2, seq))
    mask = np.ones((2, seq), np.int64)
    mask[0, :2] = 0
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return ids, mask, pos


def _hf_logits(model, ids, mask, pos):
    with torch.no_grad():
        return model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     position_ids=torch.from_numpy(pos)).logits.float().numpy()


# ---- 1. batch with left padding matches transformers
def test_padded_batch_matches_transformers(built):
    cfg = built["cfg"]
    ids, mask, pos = _padded_batch()
    out = _run(_session(built["out"] / "model.onnx"), _feeds(cfg, ids, mask, pos))
    ref = _hf_logits(built["model"], ids, mask, pos)
    real = mask.astype(bool)
    assert out["logits"].shape == (2, ids.shape[1], cfg.vocab_size)
    assert np.isfinite(out["logits"]).all()  # pad queries are fully masked: finite, not NaN
    assert np.abs(out["logits"][real] - ref[real]).max() < TOL
    assert out["present.1.key"].shape == (2, cfg.n_kv_heads, ids.shape[1], cfg.head_dim)
    assert built["steps"][-1] == ("save", 1, 1) and len(built["steps"]) == cfg.n_layers + 1


# ---- 2. prefill then single-token steps through the kv cache
def test_incremental_decoding_matches_full_forward(built):
    cfg = built["cfg"]
    ids, mask, pos = _padded_batch(seq=8)
    ref = _hf_logits(built["model"], ids, mask, pos)
    sess = _session(built["out"] / "model.onnx")
    out = _run(sess, _feeds(cfg, ids[:, :5], mask[:, :5], pos[:, :5]))
    assert np.abs(out["logits"][:, -1] - ref[:, 4]).max() < TOL
    for t in range(5, 8):
        out = _run(sess, _feeds(cfg, ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1], past=out))
        assert out["present.0.value"].shape[2] == t + 1
        assert np.abs(out["logits"][:, -1] - ref[:, t]).max() < TOL


# ---- 3. initializer overrides take effect, and weight_sums.onnx shows them
def test_override_changes_logits_and_weight_sums(built):
    cfg, w, out_dir = built["cfg"], built["w"], built["out"]
    name = "blk.0.ffn_down.weight"
    new = (w[name] * 1.5 + 0.01).astype(np.float32)  # canonical [out, in]
    ids, mask, pos = _padded_batch()
    feeds = _feeds(cfg, ids, mask, pos)
    base = _run(_session(out_dir / "model.onnx"), feeds)["logits"]
    over = _run(_session(out_dir / "model.onnx", {name: new.T}), feeds)["logits"]
    assert np.abs(over - base).max() > 1e-3

    order = list(cfg.linear_shapes())
    expected = np.array([w[n].astype(np.float64).sum() for n in order])
    sums0 = _session(out_dir / VERIFY_FILE).run(["weight_sums"], {})[0]
    sums1 = _session(out_dir / VERIFY_FILE, {name: new.T}).run(["weight_sums"], {})[0]
    assert sums0.shape == (len(order),)
    np.testing.assert_allclose(sums0, expected, rtol=1e-4, atol=1e-3)
    expected[order.index(name)] = new.astype(np.float64).sum()
    np.testing.assert_allclose(sums1, expected, rtol=1e-4, atol=1e-3)


def test_every_weight_is_overridable(built, tmp_path):
    """Overriding ALL weights equals a graph built from those weights: none was folded away."""
    cfg, w, table = built["cfg"], built["w"], built["table"]
    rng = np.random.default_rng(2)
    w2 = {n: (a + rng.normal(0, 0.05, a.shape)).astype(np.float32) for n, a in w.items()}
    build_onnx(cfg, w2, tmp_path)
    overrides = {e["onnx"]: (w2[n].T if e["layout"] == "in_out" else w2[n]) for n, e in table.items()}
    assert set(table) == set(cfg.tensor_shapes())
    feeds = _feeds(cfg, *_padded_batch())
    got = _run(_session(built["out"] / "model.onnx", overrides), feeds)["logits"]
    want = _run(_session(tmp_path / "model.onnx"), feeds)["logits"]
    assert np.abs(got - want).max() < 1e-5


def test_weights_feed_their_consumers_directly(built):
    model = onnx.load(str(built["out"] / "model.onnx"), load_external_data=False)
    consumers = {}
    for node in model.graph.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node.op_type)
    linear = built["cfg"].linear_shapes()
    for name in built["table"]:
        ops = set(consumers[name])
        norms = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}  # the fused graph's RMS norms
        assert ops <= ({"MatMul"} if name in linear else {"Gather", "Gemm", "Mul", "Add"} | norms), (name, ops)


# ---- 4. the table locates every weight in model.onnx.data
def test_table_offsets_memmap_back_to_weights(built):
    w, out_dir = built["w"], built["out"]
    for name, e in built["table"].items():
        assert e["file"] == DATA_FILE and e["dtype"] == "float32" and e["onnx"] == name
        assert e["length"] == 4 * int(np.prod(e["shape"]))
        a = np.memmap(out_dir / e["file"], dtype="<f4", mode="r", offset=e["offset"], shape=tuple(e["shape"]))
        want = w[name].T if e["layout"] == "in_out" else w[name]
        assert e["layout"] == ("in_out" if name in built["cfg"].linear_shapes() else "as_is")
        np.testing.assert_array_equal(a, want)
