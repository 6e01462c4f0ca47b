"""Generation samples the last position only (issue #17, edge memory): the graphs with a ``logits.from`` input
(the int4 / int8 graphs, model_live.onnx) compute that row alone when asked (``forward(last=True)``), and it is
bit for bit the last row of every position's logits — bare, with an adapter, on a left-padded batch, with a
live change of a tied head's rows; ``Model.logits`` still returns every position."""

from __future__ import annotations

import numpy as np
import pytest

import edgeadapt


@pytest.fixture(scope="module")
def qbase(tiny, tmp_path_factory):
    from edgeadapt.converters.export_base import export_base

    out = tmp_path_factory.mktemp("last") / "base"
    export_base(tiny["root"] / "hf", out, gguf_type="F32", onnx_weights=("fp32", "int4"))
    return out


@pytest.mark.parametrize("load", [dict(engine="ort", weights="int4"), dict(engine="ort", mode="live")])
def test_last_row_alone_is_the_last_row_of_all(tiny, qbase, load):
    m = edgeadapt.load(qbase, **load)
    m.add_adapter(tiny["a"], name="a")
    e = m._engine
    ids = np.random.default_rng(3).integers(3, 256, (2, 11)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    for plan in (None, m._live_plan([{"a": 1.0}])):
        lora = {"lora": plan} if plan else {}
        full, _ = e.forward(ids, mask, pos, **lora)
        last, _ = e.forward(ids, mask, pos, last=True, **lora)
        assert full.shape == (2, 11, tiny["manifest"].arch.vocab_size) and last.shape == (2, 1, full.shape[2])
        np.testing.assert_array_equal(last, full[:, -1:])
    assert e._current().logits_from  # the row alone was computed by the graph, not sliced afterwards


@pytest.mark.parametrize("load", [dict(engine="ort", weights="int4"), dict(engine="ort", mode="live")])
def test_model_logits_keep_every_position_and_generation_its_argmax(tiny, qbase, ids, load):
    from dataclasses import replace

    m = edgeadapt.load(qbase, **load)
    m.config = replace(m.config, eos_token_ids=[])  # the first token whatever it is
    m.add_adapter(tiny["a"], name="a")
    m.use("a")
    lg = m.logits([ids[0]])
    assert lg.shape[1] == len(ids[0])
    assert m.generate_ids(ids[0], 1)[0] == int(lg[0, -1].argmax())


@pytest.mark.parametrize("load", [dict(engine="ort", weights="int4"), dict(engine="ort", mode="live")])
def test_decode_steps_write_one_kept_buffer(tiny, qbase, load):
    """A cache's decode steps (last=True, one new token) write their logits into one buffer it keeps: each step's
    values are those of the same step on a cache that returns fresh arrays, the buffer changes when the batch
    does, and a run of every position still returns an array of its own."""
    m = edgeadapt.load(qbase, **load)
    e = m._engine
    ids = np.random.default_rng(5).integers(3, 256, (2, 9)).astype(np.int64)
    mask, pos = np.ones_like(ids), np.arange(9, dtype=np.int64)[None].repeat(2, 0)
    lg, past = e.forward(ids, mask, pos, last=True)
    ref, ref_past = e.forward(ids, mask, pos)
    kept, steps = None, []
    for k in range(4):
        tok = lg[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask, pos = np.ones((2, mask.shape[1] + 1), np.int64), pos[:, -1:] + 1
        lg, past = e.forward(tok, mask, pos, past, last=True)
        ref, ref_past = e.forward(tok, mask, pos, ref_past)  # last=False: a fresh array each step
        assert kept is None or lg is kept
        kept = lg
        steps.append(ref)
        np.testing.assert_array_equal(lg, ref)
    assert all(a is not b for a, b in zip(steps, steps[1:]))
    one, _ = e.forward(ids[:1], np.ones((1, 9), np.int64), np.arange(9, dtype=np.int64)[None], last=True)
    again, _ = e.forward(ids[:1], np.ones((1, 9), np.int64), np.arange(9, dtype=np.int64)[None], last=True)
    assert one is not again  # new caches, new buffers
