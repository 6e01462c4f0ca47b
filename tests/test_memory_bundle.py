"""Device bundles (``edgeadapt bundle``) and the ``memory=`` policies of ``edgeadapt.load``.

- a bundle for one engine and weight type holds only that engine's files, keeps the fingerprint, and gives
  exactly the logits and greedy tokens of the full base folder, bare, with one adapter and two stacked, on
  the quantized and fp32 onnxruntime graphs and on the numpy engine (merge mode too, where it exists);
- the int4 / int8 bundle stores block scales and Q4_1 offsets as float16 (smaller data file) and still
  computes bit for bit what the full folder computes;
- what a bundle left out is refused by name;
- ``memory="low" | "balanced" | "fast"`` change what the engine holds, not what it computes (onnxruntime: bit
  for bit; numpy: the same tokens, logits within float32 summation order);
- a device run (load, add, use, generate) does not import the gguf package, only its constants.
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import edgeadapt
from edgeadapt.errors import FormatError, UnsupportedError


@pytest.fixture(scope="module")
def qbase(tiny, tmp_path_factory):
    from edgeadapt.converters.export_base import export_base

    out = tmp_path_factory.mktemp("membase") / "base"
    export_base(tiny["root"] / "hf", out, gguf_type="F32", onnx_weights=("fp32", "int4", "int8"))
    return out


def _bundle(base, out, target):
    from edgeadapt.cli.core import main

    res = CliRunner().invoke(main, ["bundle", str(base), str(out), "--for", target], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out


def _outputs(root, tiny, ids, **load):
    """Logits bare / with "a" / with "a"+"b" stacked, and greedy tokens with "a"."""
    m = edgeadapt.load(root, **load)
    m.add_adapter(tiny["a"], name="a")
    m.add_adapter(tiny["b"], name="b")
    out = [m.logits(ids)]
    m.use("a")
    out.append(m.logits(ids))
    m.use({"a": 0.5, "b": 1.0})
    out.append(m.logits(ids))
    m.use("a")
    return out, m.generate_ids(ids[0], 12)


@pytest.mark.parametrize("target,load", [
    ("ort/int4", dict(engine="ort", weights="int4")),
    ("ort/int8", dict(engine="ort", weights="int8")),
    ("ort/fp32", dict(engine="ort", mode="live")),
    ("ort/fp32", dict(engine="ort", mode="merge")),
    ("numpy/gguf", dict(engine="numpy")),
])
def test_bundle_gives_the_full_folders_outputs(tiny, qbase, tmp_path, ids, target, load):
    from edgeadapt.formats.manifest import read_manifest

    b = _bundle(qbase, tmp_path / "bundle", target)
    full, man = read_manifest(qbase), read_manifest(b)
    assert man.fingerprint == full.fingerprint and man.arch == full.arch
    assert sorted(p.name for p in b.iterdir()) == sorted(
        {"manifest.json", "tokenizer.json"} & {p.name for p in qbase.iterdir()} | set(man.files.values())
        | ({"model.onnx.data"} if target == "ort/fp32" else set())
        | ({f"model_{target[-4:]}.onnx.data"} if target in ("ort/int4", "ort/int8") else set()))
    assert "model_lora.onnx" not in man.files.values() and "genai" not in man.files
    want, got = _outputs(qbase, tiny, ids, **load), _outputs(b, tiny, ids, **load)
    for x, y in zip(want[0], got[0]):
        np.testing.assert_array_equal(x, y)
    assert want[1] == got[1]


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_quantized_bundle_stores_scales_in_float16(qbase, tmp_path, kind):
    import onnx

    b = _bundle(qbase, tmp_path / "bundle", f"ort/{kind}")
    m = onnx.load(str(b / f"model_{kind}.onnx"), load_external_data=False)
    halves = {t.name for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    scales = [n.output[0] for n in m.graph.node if n.op_type == "Cast" and n.input[0] in halves]
    assert any(s.endswith(".scales") for s in scales)
    if kind == "int4":  # Q4_1 offsets m + 8d rebuilt from m in float16
        assert any(n.op_type == "Add" and n.output[0].endswith(".offsets") for n in m.graph.node)
    full = (qbase / f"model_{kind}.onnx.data").stat().st_size
    assert (b / f"model_{kind}.onnx.data").stat().st_size < full


def test_bundle_refuses_what_it_left_out(tiny, qbase, tmp_path):
    from edgeadapt.converters.bundle import bundle

    b = _bundle(qbase, tmp_path / "bundle", "ort/int4")
    with pytest.raises(FormatError, match="model.onnx"):
        edgeadapt.load(b, engine="ort")  # weights fp32: not shipped
    with pytest.raises(FormatError, match="model.gguf"):
        edgeadapt.load(b, engine="numpy")
    with pytest.raises(FormatError, match="--onnx-quant int8"):
        bundle(tiny["base"], tmp_path / "b8", engine="ort", weights="int8")  # the tiny base has no int8 graph
    with pytest.raises(UnsupportedError, match="expected a new or empty folder"):
        bundle(qbase, b, engine="ort", weights="fp32")  # over another bundle: stale files would stay
    with pytest.raises(UnsupportedError, match="expected a new or empty folder"):
        bundle(qbase, qbase)


@pytest.mark.parametrize("load", [dict(engine="ort", weights="int4"), dict(engine="ort", mode="live"),
                                  dict(engine="ort", mode="merge"), dict(engine="numpy")])
def test_memory_policies_compute_the_same(tiny, qbase, ids, load):
    """onnxruntime: bit for bit. numpy: "low" / "fast" pick its lazy / load weights (W read from the mapped
    file with x @ W.T, or transposed once), which BLAS sums in another order: the same tokens, logits within
    float32 rounding."""
    ref = _outputs(qbase, tiny, ids, memory="fast", **load)
    for policy in ("low", "balanced"):
        got = _outputs(qbase, tiny, ids, memory=policy, **load)
        for x, y in zip(ref[0], got[0]):
            if load["engine"] == "ort":
                np.testing.assert_array_equal(x, y)
            else:
                np.testing.assert_allclose(x, y, rtol=0, atol=2e-5)
        assert ref[1] == got[1]


def test_only_fast_keeps_a_memory_pattern_per_length(qbase, tiny):
    """onnxruntime plans and keeps a memory pattern for every new set of input shapes, and every decode step's mask
    is one column wider: resident memory would grow with the conversation (docs/PERFORMANCE.md, "Memory")."""
    for policy, arena, pattern in (("low", False, False), ("balanced", True, False), ("fast", True, True)):
        m = edgeadapt.load(qbase, engine="ort", weights="int4", memory=policy)
        m.add_adapter(tiny["a"], name="a")
        for spec in (None, "a"):  # the plain session, then the slotted one
            m.use(spec)
            m.generate_ids([5, 6, 7], max_new_tokens=2)
            so = m._engine._current().sess.get_session_options()
            assert (so.enable_cpu_mem_arena, so.enable_mem_pattern) == (arena, pattern), (policy, spec)


def test_memory_policy_is_checked(qbase):
    from edgeadapt.errors import UsageError

    with pytest.raises(UsageError, match="memory: expected one of 'low', 'balanced', 'fast', found"):
        edgeadapt.load(qbase, memory="tiny")


def test_quantized_bundle_names_what_needs_float_embedding_rows(qbase, tmp_path, ids):
    """Trainable tokens replace embedding rows, so they read the base's float32 rows (model.onnx.data), which an
    int4 bundle does not ship: refused by name, where the full folder runs them."""
    from edgeadapt.formats.manifest import read_manifest
    from edgeadapt.kinds.sequence import SeqAdapter

    b = _bundle(qbase, tmp_path / "bundle", "ort/int4")
    man = read_manifest(qbase)
    tok = SeqAdapter.build("trainable_tokens", token_rows=(np.array([5, 17]), np.ones((2, man.arch.dim))), name="t",
                           version=1, arch=man.arch.arch, fingerprint=man.fingerprint)
    full = edgeadapt.load(qbase, engine="ort", weights="int4")
    full.add_adapter(tok)
    full.use("t")
    assert np.isfinite(full.logits(ids)).all()
    m = edgeadapt.load(b, engine="ort", weights="int4")
    m.add_adapter(tok)
    with pytest.raises(FormatError, match=r"device bundle ships none\); load the full base folder"):
        m.use("t")
        m.logits(ids)


@pytest.mark.parametrize("load", [dict(engine="ort", weights="int4"), dict(engine="numpy")])
def test_a_device_run_imports_no_gguf_package(tiny, qbase, load):
    """Loading a base, adding and using an adapter and generating read GGUF files with edgeadapt's own reader and
    gguf's constants only: the gguf package (whose import brings its writer, sentencepiece and yaml, +4.4 MB) is
    not imported. A fresh interpreter, so nothing else imported it first."""
    import subprocess
    import sys

    code = ("import sys, edgeadapt\n"
            f"m = edgeadapt.load({str(qbase)!r}, **{load!r})\n"
            f"m.add_adapter({str(tiny['a'])!r}, name='a')\n"
            "m.use('a')\n"
            "assert len(m.generate_batch([[5, 6, 7]], 4)[0]) == 4\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('gguf', 'yaml', 'sentencepiece')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
