"""Group slots without block-diagonal zeros (issue #17, edge memory): the graphs with q|k|v and gate|up grouped
(model_int4.onnx, model_live.onnx) take a group's B as its weights' B side by side over the group's rank,
[n, 1, r, Σout], instead of one block-diagonal [n, Σr, Σout]; the runtime reads which from the graph's
``edgeadapt.slot_groups.b`` property, so base folders exported before still run. Both layouts give the same
logits — bare, alone, stacked, per row (adapters of unequal ranks within a group, and with weights missing from a
group) — and the new slot arrays hold each factor once, without zeros, when a group's weights share a rank."""

from __future__ import annotations

import numpy as np
import pytest

import edgeadapt
from edgeadapt.converters.onnx_graphs import fast


@pytest.fixture(scope="module")
def bases(tiny, tmp_path_factory):
    """The tiny base exported as now, and as before (block-diagonal group B, no layout property)."""
    from edgeadapt.converters.export_base import export_base

    root = tmp_path_factory.mktemp("layout")
    export_base(tiny["root"] / "hf", root / "new", gguf_type="F32", onnx_weights=("fp32", "int4"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fast._Linears, "group_b", None)
        export_base(tiny["root"] / "hf", root / "old", gguf_type="F32", onnx_weights=("fp32", "int4"))
    return root / "new", root / "old"


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


@pytest.mark.parametrize("load", [dict(engine="ort", weights="int4"), dict(engine="ort", mode="live")])
def test_side_by_side_and_block_diagonal_groups_give_the_same_outputs(tiny, bases, ids, load):
    new, old = (edgeadapt.load(b, **load) for b in bases)
    got, ref = _outputs(new, tiny, ids), _outputs(old, tiny, ids)
    assert new._engine._current().side_by_side and not old._engine._current().side_by_side
    for x, y in zip(got[:-1], ref[:-1]):
        # measured bit for bit here (and on SmolLM2-135M int4); the bound leaves room for another CPU's GEMM kernel
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got[-1], ref[-1])  # greedy tokens


def test_side_by_side_slot_arrays_hold_the_factors_without_zeros(tiny, bases):
    m = edgeadapt.load(bases[0], engine="ort", weights="int4")
    m.add_adapter(tiny["b"], name="b")  # rank 4 on q, k (no v) and gate (no up)
    m.use("b")
    g = m._engine._current()
    cfg = tiny["manifest"].arch
    for i in range(cfg.n_layers):
        a, b = m._live[f"blk.{i}.attn_qkv"]
        k, r = len(g.groups[f"blk.{i}.attn_qkv"]), 4
        assert a.shape == (1, cfg.dim, k * r) and b.shape == (1, 1, r, g.shapes[f"blk.{i}.attn_qkv"][0])
        q, kk = cfg.linear_shapes()[f"blk.{i}.attn_q.weight"][0], cfg.linear_shapes()[f"blk.{i}.attn_k.weight"][0]
        assert not a[:, :, 2 * r:].any() and not b[..., q + kk:].any()  # v has no factors: its part only is zero
        assert a[:, :, :2 * r].all() and b[..., :q + kk].all()
