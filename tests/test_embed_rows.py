"""The int4 / int8 graphs' embedding rows, read by the runtime (issue #17, edge memory): the graphs exported now take
the tokens' Q8_0 rows as the input ``embed.rows``, which the engine reads from the data file with ``pread`` where the
graph's ``edgeadapt.embed_rows`` property says, instead of onnxruntime gathering them through its memory map of the
file (which made every 2 MB page-cache folio a token falls in resident). The outputs are those of the in-graph
lookup (GatherBlockQuantized) bit for bit — bare, with adapters, per row, generated tokens, on the full folder and
on the device bundle (float16 scales) — and base folders exported before still run. A truncated data file, a
malformed property and ids outside the vocabulary are refused by name.

The output head runs in parts of HEAD_ROWS rows (views of the same bytes, logits side by side), so that onnxruntime,
which prepacks weights in node order and unmaps each original once packed, never holds a whole head's original
beside every packed weight: the logits are those of one product bit for bit, tied head or not, and the bundle
writes the head's bytes once."""

from __future__ import annotations

import functools
import json
import shutil
import sys

import numpy as np
import pytest

import edgeadapt
from edgeadapt.converters.onnx_graphs import fast
from edgeadapt.errors import FormatError


@pytest.fixture(scope="module")
def bases(tiny, tmp_path_factory):
    """The tiny base exported as now (rows fed) and as before (rows gathered in-graph), int4 and int8."""
    from edgeadapt.converters.export_base import export_base

    root = tmp_path_factory.mktemp("rows")
    export_base(tiny["root"] / "hf", root / "new", gguf_type="F32", onnx_weights=("int4", "int8"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fast, "build_quant_onnx", functools.partial(fast.build_quant_onnx, embed_rows=False))
        export_base(tiny["root"] / "hf", root / "old", gguf_type="F32", onnx_weights=("int4", "int8"))
    return root / "new", root / "old"


def _outputs(m, tiny, ids):
    for n in ("a", "b"):
        m.add_adapter(tiny[n], name=n)
    out = []
    for spec in (None, "a", {"a": 0.5, "b": 1.0}):
        m.use(spec)
        out.append(m.logits(ids))
    out.append(m.logits(ids + ids[:1], adapters=["a", None, {"a": 1.0, "b": 0.5}]))
    m.use("b")
    out.append(np.array(m.generate_ids(ids[0], max_new_tokens=6)))
    out.append(np.array(m.generate_batch(ids, 5, adapters=["b", None])))
    return out


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_rows_read_by_the_runtime_equal_the_in_graph_lookup(tiny, bases, ids, weights):
    new, old = (edgeadapt.load(b, engine="ort", weights=weights) for b in bases)
    got, ref = _outputs(new, tiny, ids), _outputs(old, tiny, ids)
    assert new._engine._current().rows is not None and old._engine._current().rows is None
    for x, y in zip(got, ref):  # the same float32 rows in: the same graph after them, bit for bit
        np.testing.assert_array_equal(x, y)


def test_the_graphs_gather_nothing_and_the_bundle_points_at_its_own_file(tiny, bases, ids, tmp_path):
    import onnx

    from edgeadapt.converters.bundle import bundle

    new, _ = bases
    for name in ("model_int4.onnx", "model_int4_base.onnx"):
        model = onnx.load(str(new / name), load_external_data=False)
        assert "GatherBlockQuantized" not in {n.op_type for n in model.graph.node}
        assert "embed.rows" in {i.name for i in model.graph.input}
    out = tmp_path / "bundle"
    bundle(new, out, engine="ort", weights="int4")
    spec = json.loads(_prop(out / "model_int4.onnx"))
    assert spec["file"] == "model_int4.onnx.data" and spec["scales"]["type"] == "float16"
    full = edgeadapt.load(new, engine="ort", weights="int4")
    dev = edgeadapt.load(out, engine="ort", weights="int4")
    for m in (full, dev):
        m.add_adapter(tiny["a"], name="a")
    np.testing.assert_array_equal(dev.logits(ids), full.logits(ids))
    dev.use("a"), full.use("a")
    np.testing.assert_array_equal(dev.logits(ids), full.logits(ids))
    rows = dev._engine._current().rows
    np.testing.assert_array_equal(rows(np.array(ids)), full._engine._current().rows(np.array(ids)))


def _prop(path, key="edgeadapt.embed_rows"):
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}[key]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps")
def test_the_embedding_table_is_not_mapped_into_memory(bases, ids):
    """After a prompt and a few tokens, no page of the data file's mappings that holds embedding bytes is
    resident; the in-graph lookup of the graphs exported before maps the pages of the rows it read (its data file
    has the same layout: the offsets are the new graph's)."""
    new, old = bases
    spec = json.loads(_prop(new / "model_int4.onnx"))
    lo = spec["data"]["offset"]
    hi = lo + spec["vocab"] * spec["dim"]

    def embedding_resident_kb(root):
        data = str((root / spec["file"]).resolve())
        kb, cur = 0, None
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()
                if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
                    a, b = (int(x, 16) for x in head[0].split("-"))
                    off = int(head[2], 16)
                    cur = (off, off + b - a) if len(head) == 6 and head[5] == data else None
                elif cur is not None and head[0] == "Rss:" and cur[0] < hi and cur[1] > lo:
                    kb += int(head[1])
        return kb

    models = []
    for root in (new, old):
        models.append(edgeadapt.load(root, engine="ort", weights="int4"))  # memory="balanced": pages dropped after build
        models[-1].generate_ids(ids[0], max_new_tokens=4)
    assert embedding_resident_kb(new) == 0
    assert embedding_resident_kb(old) > 0  # the lookup this replaces: what the test would see if rows were mapped


def test_bad_rows_are_refused_by_name(tiny, bases, tmp_path):
    from edgeadapt.runtime.ort_engine.session import EmbedRows

    new, _ = bases
    arch = tiny["manifest"].arch
    spec = json.loads(_prop(new / "model_int4.onnx"))
    m = edgeadapt.load(new, engine="ort", weights="int4")
    rows = m._engine._current().rows
    with pytest.raises(FormatError, match=r"token ids must lie in \[0, \d+\); found"):
        rows(np.array([[1, rows.vocab]]))
    with pytest.raises(FormatError, match=r"token ids must lie in \[0, \d+\); found -1"):
        rows(np.array([[-1, 2]]))
    assert rows(np.zeros((2, 0), np.int64)).shape == (2, 0, rows.dim)
    with pytest.raises(FormatError, match="edgeadapt.embed_rows property is not the expected JSON"):
        EmbedRows(new, json.dumps({"file": spec["file"]}), arch)
    with pytest.raises(FormatError, match=r"expected an embedding of \[\d+, \d+\]"):
        EmbedRows(new, json.dumps({**spec, "dim": spec["dim"] * 2}), arch)
    with pytest.raises(FormatError, match="cannot be opened"):
        EmbedRows(tmp_path, json.dumps(spec), arch)
    size = (new / spec["file"]).stat().st_size  # the rows said to lie past the end of the file
    with pytest.raises(FormatError, match=r"expected at least \d+ bytes \(the embedding rows\), found %d" % size):
        EmbedRows(new, json.dumps({**spec, "data": {**spec["data"], "offset": size}}), arch)
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copyfile(new / spec["file"], copy / spec["file"])
    reader = EmbedRows(copy, json.dumps(spec), arch)
    before = reader(np.array([[spec["vocab"] - 1]]))
    with open(copy / spec["file"], "r+b") as f:  # the file cut under a running model: refused, never zeros
        f.truncate(spec["scales"]["offset"])
    with pytest.raises(FormatError, match="the file changed under the running model"):
        reader(np.array([[spec["vocab"] - 1]]))
    np.testing.assert_array_equal(before, rows(np.array([[spec["vocab"] - 1]])))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # an output head of its own; a head tied to the embedding
def test_a_head_in_parts_gives_the_logits_of_one_product(kind, tmp_path, ids):
    from conftest import make_model

    from edgeadapt.converters.bundle import bundle
    from edgeadapt.converters.export_base import export_base

    make_model(kind).save_pretrained(tmp_path / "hf")
    with pytest.MonkeyPatch.context() as mp:  # 256 rows in parts of 96, 96 and 64
        mp.setattr(fast, "build_quant_onnx", functools.partial(fast.build_quant_onnx, head_rows=96))
        export_base(tmp_path / "hf", tmp_path / "parts", gguf_type="F32", onnx_weights=("int4",))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fast, "build_quant_onnx", functools.partial(fast.build_quant_onnx, head_rows=None, embed_rows=False))
        export_base(tmp_path / "hf", tmp_path / "whole", gguf_type="F32", onnx_weights=("int4",))
    import onnx

    graph = onnx.load(str(tmp_path / "parts" / "model_int4.onnx"), load_external_data=False).graph
    heads = [n for n in graph.node if n.op_type == "MatMulNBits" and ".part" in n.input[1]]
    assert [dict((a.name, a.i) for a in n.attribute)["N"] for n in heads] == [96, 96, 64]
    bundle(tmp_path / "parts", tmp_path / "bundle", engine="ort", weights="int4")
    outs = []
    for root in ("parts", "whole", "bundle"):
        m = edgeadapt.load(tmp_path / root, engine="ort", weights="int4")
        outs.append((m.logits(ids), m.generate_batch(ids, 6)))
    for got in outs[1:]:
        np.testing.assert_array_equal(outs[0][0], got[0])
        assert outs[0][1] == got[1]
    # the bundle writes the head's bytes once (its parts point into them): smaller than the full folder's data
    # file, which it would exceed by the head's size if each part were written again
    data = "model_int4.onnx.data"
    assert (tmp_path / "bundle" / data).stat().st_size < (tmp_path / "parts" / data).stat().st_size
