"""runtime/numpy_engine/rows.py: a mixed batch (each row its own adapter at its own rank) equals every row run
alone bit for bit, on every way the numpy engine keeps weights (F32 loaded, Q4_1 / Q8_0 / F16 kept lazy and
used slab by slab) and whatever kernel OpenBLAS picks (run with and without OPENBLAS_CORETYPE=Haswell: one
[batch·seq, in] product sums a row differently from that row's own product under Haswell's kernel; the engine
runs one product per row block with per-call factors, the output head included)."""

from __future__ import annotations

import numpy as np
import pytest

from numpy_common import _make, _write  # noqa: E402

from edgeadapt.converters.hf import from_transformers
from edgeadapt.runtime.numpy_engine.engine import NumpyEngine
from edgeadapt.runtime.numpy_engine.rows import RowLoRA
from edgeadapt.runtime.row_lora import PerRow


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = _make("llama")
    cfg, w = from_transformers(model)
    root = tmp_path_factory.mktemp("rows")
    return cfg, {q: _write(cfg, w, root / f"{q}.gguf", q) for q in ("F32", "F16", "Q8_0", "Q4_1")}


def _factors(rng, shapes, targets, r):
    """{name: (A [in, r], B [r, out])}: the engine's orientation, weights folded into B."""
    return {n: ((0.1 * rng.standard_normal((shapes[n][1], r))).astype(np.float32),
                (0.1 * rng.standard_normal((r, shapes[n][0]))).astype(np.float32)) for n in targets}


@pytest.mark.parametrize("qtype,mode", [("F32", "load"), ("F32", "lazy"), ("F16", "lazy"), ("Q8_0", "lazy"),
                                        ("Q4_1", "lazy")])
@pytest.mark.parametrize("seq", [1, 5, 12])
def test_mixed_batch_rows_equal_each_row_alone(llama, qtype, mode, seq):
    cfg, paths = llama
    eng = NumpyEngine(paths[qtype], dequantize=mode)
    shapes = cfg.linear_shapes()
    rng = np.random.default_rng(seq)
    tx = ["blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.1.ffn_up.weight", "blk.1.ffn_down.weight"]
    ty = ["blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.ffn_gate.weight", "output.weight"]
    X, Y = _factors(rng, shapes, tx, 4), _factors(rng, shapes, ty, 2)
    per = [X, None, Y, X, None]
    names = sorted(set(tx) | set(ty))
    lora = {n: PerRow([f[n] if f and n in f else None for f in per], shapes[n][1], shapes[n][0]) for n in names}
    ids = np.random.default_rng(seq + 1).integers(1, 256, size=(len(per), seq), dtype=np.int64)
    mask, pos = np.ones_like(ids), np.tile(np.arange(seq), (len(per), 1))
    got, _ = eng.forward(ids, mask, pos, lora=lora)
    again, _ = eng.forward(ids, mask, pos, lora=lora)  # the stacked form made on the first call is reused
    assert all(type(p.engine_form) is RowLoRA for p in lora.values()) and np.array_equal(got, again)
    for b, f in enumerate(per):
        shared = {n: (a[None], bb[None]) for n, (a, bb) in f.items()} if f else None
        alone, _ = eng.forward(ids[b:b + 1], mask[:1], pos[:1], lora=shared)
        np.testing.assert_array_equal(got[b], alone[0], err_msg=f"row {b}")
    plain, _ = eng.forward(ids[:1], mask[:1], pos[:1])
    assert np.abs(got[0] - plain[0]).max() > 1e-3  # X does something


def test_lazy_matmul_by_row_blocks_equals_each_block_alone(llama):
    cfg, paths = llama
    for qtype in ("Q4_1", "Q8_0", "F16"):
        eng = NumpyEngine(paths[qtype], dequantize="lazy")
        w = eng._layers[0][2][0]  # attn_q: a _Lazy
        for seq in (1, 3, 9):
            x = np.random.default_rng(seq).standard_normal((4 * seq, w.src.shape[1])).astype(np.float32)
            y = w.matmul(x, 4)
            for b in range(4):
                assert np.array_equal(y[b * seq:(b + 1) * seq], w.matmul(x[b * seq:(b + 1) * seq])), (qtype, seq, b)
