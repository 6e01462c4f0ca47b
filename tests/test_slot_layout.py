"""Group slots without block-diagonal zeros (issue #17, edge memory) and without thrown-away products (issue #14,
serving): the graphs with q|k|v and gate|up grouped (model_int4.onnx, model_live.onnx) take a group's B as its
weights' B over the group's rank in chunks of gcd(outputs), [n, 1, C, r, g] ("chunked", exported now), or side by
side, [n, 1, r, Σout] ("side_by_side", exported before), instead of one block-diagonal [n, Σr, Σout] (exported before
both); the runtime reads which from the graph's ``edgeadapt.slot_groups.b`` property, so base folders exported
before still run. The three layouts give the same logits — bare, alone, stacked, per row (adapters of unequal ranks
within a group, and with weights missing from a group) — and the same greedy tokens, and the new slot arrays hold
each factor once, without zeros, when a group's weights share a rank."""

from __future__ import annotations

import numpy as np
import pytest

import edgeadapt
from edgeadapt.converters.onnx_graphs import fast


@pytest.fixture(scope="module")
def bases(tiny, tmp_path_factory):
    """The tiny base exported as now (chunked group B), and as before (side by side; block-diagonal, no property)."""
    from edgeadapt.converters.export_base import export_base

    root = tmp_path_factory.mktemp("layout")
    export_base(tiny["root"] / "hf", root / "chunked", gguf_type="F32", onnx_weights=("fp32", "int4"))
    for name, layout in (("side_by_side", fast.SIDE_BY_SIDE), ("old", None)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fast._Linears, "group_b", layout)
            export_base(tiny["root"] / "hf", root / name, gguf_type="F32", onnx_weights=("fp32", "int4"))
    return {n: root / n for n in ("chunked", "side_by_side", "old")}


def _outputs(m, tiny, ids):
    for n in ("a", "b"):
        m.add_adapter(tiny[n], name=n)
    out = []
    for spec in ("a", {"a": 0.5, "b": 1.0}, "b", None):
        m.use(spec)
        out.append(m.logits(ids))
    out.append(m.logits(ids + ids[:1], adapters=["a", None, {"a": 1.0, "b": 0.5}]))
    out.append(np.array(m.generate_batch(ids, 5, adapters=["b", {"a": 1.0, "b": 1.0}])))
    return out


@pytest.mark.parametrize("layout", ["chunked", "side_by_side"])
@pytest.mark.parametrize("load", [dict(engine="ort", weights="int4"), dict(engine="ort", mode="live")])
def test_group_layouts_give_the_same_outputs(tiny, bases, ids, load, layout):
    new, old = edgeadapt.load(bases[layout], **load), edgeadapt.load(bases["old"], **load)
    got, ref = _outputs(new, tiny, ids), _outputs(old, tiny, ids)
    g = new._engine._current()
    assert g.side_by_side and bool(g.chunks) == (layout == "chunked") and not old._engine._current().side_by_side
    # side by side: measured bit for bit here (and on SmolLM2-135M int4); the bound leaves room for another CPU's GEMM
    # kernel. Chunked: each output's sum over the rank runs in a GEMM of another shape, so float32 rounding differs
    # (measured up to 1.1e-5 on these logits of magnitude ~1, in 2 of 4,608)
    tol = 1e-5 if layout == "side_by_side" else 1e-4
    for x, y in zip(got[:-1], ref[:-1]):
        np.testing.assert_allclose(x, y, rtol=0, atol=tol)
    np.testing.assert_array_equal(got[-1], ref[-1])  # greedy tokens


@pytest.mark.parametrize("layout", ["chunked", "side_by_side"])
def test_group_slot_arrays_hold_the_factors_without_zeros(tiny, bases, layout):
    m = edgeadapt.load(bases[layout], engine="ort", weights="int4")
    m.add_adapter(tiny["b"], name="b")  # rank 4 on q, k (no v) and gate (no up)
    m.use("b")
    g = m._engine._current()
    cfg = tiny["manifest"].arch
    for i in range(cfg.n_layers):
        a, b = m._live[f"blk.{i}.attn_qkv"]
        k, r, out = len(g.groups[f"blk.{i}.attn_qkv"]), 4, g.shapes[f"blk.{i}.attn_qkv"][0]
        q, kk = cfg.linear_shapes()[f"blk.{i}.attn_q.weight"][0], cfg.linear_shapes()[f"blk.{i}.attn_k.weight"][0]
        if layout == "chunked":  # [1, 1, C, r, g], chunk c = columns [c·g, (c + 1)·g) of the side-by-side B
            width = np.gcd.reduce([q, kk, cfg.linear_shapes()[f"blk.{i}.attn_v.weight"][0]])
            assert b.shape == (1, 1, out // width, r, width)
            b = b.transpose(0, 1, 3, 2, 4).reshape(1, 1, r, out)
        assert a.shape == (1, cfg.dim, k * r) and b.shape == (1, 1, r, out)
        assert not a[:, :, 2 * r:].any() and not b[..., q + kk:].any()  # v has no factors: its part only is zero
        assert a[:, :, :2 * r].all() and b[..., :q + kk].all()
