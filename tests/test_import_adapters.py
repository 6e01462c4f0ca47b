"""import-adapter: adapter files other tools wrote, written as those tools write them, imported and
matched against the defining tool's own forward on both engines (live), and llama.cpp's greedy text.

- llama.cpp LoRA GGUF: made by llama.cpp's own ``convert_lora_to_gguf.py`` when its source tree is found
  (llama.cpp's source tree: tests/llama_cpp_src.py), else by
  :func:`layout_gguf`, which follows its layout (the skip / log line says which);
- ``.onnx_adapter``: onnxruntime's own ``AdapterFormat`` with the parameter names of onnxruntime-genai's
  model builder, of Olive's ``convert-adapters`` and of our slotted graph (pinned to no base);
- mlx-lm: its own LoRA / DoRA layers and save path (``linear_to_lora_layers``, ``trainable_parameters``,
  ``save_safetensors``) on the same tiny llama, its forward as the reference.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

import edgeadapt
from edgeadapt.cli import main
from edgeadapt.errors import AdapterMismatchError, EdgeAdaptError, FormatError
from edgeadapt.formats.arch import CONV1D_ARCHES, permute_qk, qk_heads, unpermute_qk

from arch_common import byte_tokenizer, llama_cpp_greedy
from conftest import add_lora, make_model, torch, torch_logits

TOL = 1e-4
ENGINES = ["numpy", "ort"]
GGUF_TYPES = ["F32", "F16", "BF16", "Q8_0"]


# ---- fixtures
@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """A tiny llama (3 blocks) with a vocabulary llama.cpp loads, its F32 base, and a PEFT LoRA with alpha ≠ r."""
    from edgeadapt.converters.export_base import export_base

    root = tmp_path_factory.mktemp("imports")
    model = make_model("llama", num_hidden_layers=3)
    model.save_pretrained(root / "hf")
    byte_tokenizer(root / "hf", bos=1, eos=2, pad=0)
    manifest = export_base(root / "hf", root / "base", gguf_type="F32")
    pm = add_lora(model, 3, r=8, lora_alpha=16)
    pm.save_pretrained(root / "peft")
    return dict(root=root, model=model, pm=pm, base=root / "base", manifest=manifest, hf=root / "hf")


@pytest.fixture
def ids():
    return np.random.default_rng(0).integers(3, 256, size=(2, 9)).tolist()


def run(engine: str, base: Path, delta: Path, ids) -> np.ndarray:
    m = edgeadapt.load(base, engine=engine, mode="live")
    m.add_adapter(delta, name="x")
    m.use("x")
    return m.logits(ids)


# ---- llama.cpp LoRA GGUF
def lora_converter() -> Path | None:
    """llama.cpp's convert_lora_to_gguf.py (tests/llama_cpp_src.py finds or fetches llama.cpp's source tree)."""
    from llama_cpp_src import llama_cpp_dir

    d = llama_cpp_dir()
    return None if d is None or not (d / "convert_lora_to_gguf.py").is_file() else d / "convert_lora_to_gguf.py"


def layout_gguf(peft_dir: Path, cfg, out: Path, outtype: str) -> Path:
    """A LoRA GGUF in the layout of llama.cpp's convert_lora_to_gguf.py: PEFT's A [r, in] and B [out, r] as
    saved, q/k rows of B permuted (llama), token_embd's A transposed, adapter.lora.alpha from the config."""
    from safetensors.numpy import load_file

    from edgeadapt.formats.names import gguf_name

    conf = json.loads((peft_dir / "adapter_config.json").read_text())
    t = load_file(str(peft_dir / "adapter_model.safetensors"))
    w = gguf.GGUFWriter(str(out), cfg.arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(conf["lora_alpha"]))
    qtype = gguf.GGMLQuantizationType[outtype]
    for key in sorted(k for k in t if ".lora_A" in k or ".lora_embedding_A" in k):
        module = key.split(".lora_")[0][len("base_model.model."):]
        name = gguf_name(cfg, module + ".weight")
        a = t[key].astype(np.float32)
        b = t[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")].astype(np.float32)
        if qk_heads(cfg, name):  # llama.cpp's LlamaModel.permute, on "norm"-rope architectures
            b = permute_qk(b, qk_heads(cfg, name))
        if name == "token_embd.weight":
            a = a.T
        if cfg.arch in CONV1D_ARCHES:  # its GPT-2 converter transposes Conv1D weights, PEFT's LoRA included
            a, b = b.T, a.T
        for suffix, x in ((".lora_a", a), (".lora_b", b)):
            x = np.ascontiguousarray(x)
            q8 = qtype == gguf.GGMLQuantizationType.Q8_0
            qt = gguf.GGMLQuantizationType.F16 if q8 and x.shape[-1] % 32 else qtype  # llama.cpp's Q8_0 rule
            if qt == gguf.GGMLQuantizationType.F32:
                w.add_tensor(name + suffix, x)
            elif qt == gguf.GGMLQuantizationType.F16:
                w.add_tensor(name + suffix, x.astype(np.float16))
            else:
                w.add_tensor(name + suffix, gguf.quants.quantize(x, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def llama_cpp_lora(fx: dict, peft_dir: Path, outtype: str, out: Path) -> tuple[Path, str]:
    """(file, who wrote it): llama.cpp's converter when found, else the layout writer."""
    conv = lora_converter()
    if conv is not None:
        res = subprocess.run([sys.executable, str(conv), "--base", str(fx["hf"]), "--outtype", outtype.lower(),
                              "--outfile", str(out), str(peft_dir)], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        return out, f"llama.cpp's {conv}"
    print("llama.cpp's convert_lora_to_gguf.py not found (set LLAMA_CPP_DIR): using the layout writer")
    return layout_gguf(peft_dir, fx["manifest"].arch, out, outtype), "the layout writer"


def file_reference(fx: dict, path: Path):
    """PEFT with the factors the file holds (read by gguf's own reader, dequantized, B unpermuted, alpha/r as
    PEFT applies it): PEFT's output for exactly what the file stores."""
    cfg = fx["manifest"].arch
    r = gguf.GGUFReader(str(path))
    got = {}
    for t in r.tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
        got[t.name] = np.asarray(x, np.float32)
    ref = copy.deepcopy(fx["pm"])
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if ".lora_A." not in n and ".lora_B." not in n:
                continue
            module = n.split(".lora_")[0][len("base_model.model."):]
            from edgeadapt.formats.names import gguf_name

            w = gguf_name(cfg, module + ".weight")
            x = got[w + (".lora_a" if ".lora_A." in n else ".lora_b")]
            if ".lora_B." in n and qk_heads(cfg, w):
                x = unpermute_qk(x, qk_heads(cfg, w))
            p.copy_(torch.from_numpy(x))
    return ref


@pytest.fixture(scope="module")
def cpp_files(fx):
    out = {}
    for t in GGUF_TYPES:
        out[t], who = llama_cpp_lora(fx, fx["root"] / "peft", t, fx["root"] / f"lora-{t}.gguf")
    out["who"] = who
    return out


@pytest.mark.parametrize("outtype", GGUF_TYPES)
def test_layout_writer_matches_llama_cpp(fx, cpp_files, outtype, tmp_path):
    """The fallback writer (used where llama.cpp's sources are absent) writes what llama.cpp's converter writes:
    the same keys' values, tensor names, types, shapes and bytes."""
    if cpp_files["who"] == "the layout writer":
        pytest.skip("llama.cpp's convert_lora_to_gguf.py not found (set LLAMA_CPP_DIR): nothing to compare with")
    mine = gguf.GGUFReader(str(layout_gguf(fx["root"] / "peft", fx["manifest"].arch, tmp_path / "l.gguf", outtype)))
    theirs = gguf.GGUFReader(str(cpp_files[outtype]))
    for key in ("general.type", "adapter.type", "adapter.lora.alpha", "general.architecture"):
        assert mine.fields[key].contents() == theirs.fields[key].contents(), key
    got = {t.name: (t.tensor_type, tuple(t.shape), bytes(t.data)) for t in mine.tensors}
    want = {t.name: (t.tensor_type, tuple(t.shape), bytes(t.data)) for t in theirs.tensors}
    assert got == want


@pytest.mark.parametrize("outtype", GGUF_TYPES)
@pytest.mark.parametrize("engine", ENGINES)
def test_llama_cpp_lora_matches_peft(fx, cpp_files, outtype, engine, ids):
    """Every factor type the converter writes: the imported delta computes PEFT's output for the factors the file
    holds (F32: PEFT's own adapter) within 1e-4, live, on both engines."""
    from edgeadapt.converters.importers import import_adapter

    out = fx["root"] / f"imported-{outtype}.gguf"
    res = import_adapter(cpp_files[outtype], fx["base"], out)
    got = run(engine, fx["base"], out, ids)
    ref = fx["pm"] if outtype == "F32" else file_reference(fx, cpp_files[outtype])
    want = torch_logits(ref, ids)
    assert np.abs(want - torch_logits(fx["model"], ids)).max() > 0.05, "the adapter must matter"
    err = np.abs(got - want).max()
    print(f"{outtype} from {cpp_files['who']} on {engine}: max |Δ| vs PEFT {err:.2e}")
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    assert "asserted by the importer" in res.asserted_by and "alpha 16" in res.asserted_by


@pytest.mark.parametrize("outtype", ["F32", "Q8_0"])
def test_llama_cpp_generates_the_same_text_from_the_imported_file(fx, cpp_files, outtype):
    """llama.cpp with the original LoRA and with the imported delta (alpha 0, scale in B) on the F32 base:
    the same greedy tokens — and, for F32, PEFT's."""
    from edgeadapt.converters.importers import import_adapter

    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install llama-cpp-python)")
    out = fx["root"] / f"for-llama-cpp-{outtype}.gguf"
    import_adapter(cpp_files[outtype], fx["base"], out)
    prompt = [5, 17, 42, 99, 7, 8]
    theirs = llama_cpp_greedy(fx["base"] / "model.gguf", prompt, 12, cpp_files[outtype], type_k=0, type_v=0)
    ours = llama_cpp_greedy(fx["base"] / "model.gguf", prompt, 12, out, type_k=0, type_v=0)
    assert ours == theirs and len(ours) == 12
    if outtype == "F32":  # PEFT's greedy tokens, EOS included (llama.cpp's generator does not stop at it)
        seq = list(prompt)
        for _ in range(12):
            seq.append(int(torch_logits(fx["pm"], [seq])[0, -1].argmax()))
        assert ours == seq[len(prompt):]


def test_embedding_lora_from_llama_cpp(fx, ids, tmp_path):
    """A LoRA on embed_tokens (token_embd's A stored transposed) + q/v: PEFT's output on both engines."""
    from edgeadapt.converters.importers import import_adapter

    pm = add_lora(fx["model"], 4, r=4, lora_alpha=12, target_modules=["embed_tokens", "q_proj", "v_proj"])
    pm.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    path, who = llama_cpp_lora(fx, tmp_path / "peft", "F32", tmp_path / "emb.gguf")
    res = import_adapter(path, fx["base"], tmp_path / "imported.gguf")
    assert res.adapter.kind == "embedding_lora"
    want = torch_logits(pm, ids)
    plain = add_lora(fx["model"], 4, r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"])
    assert np.abs(want - torch_logits(plain, ids)).max() > 0.05, "the embedding LoRA must matter"
    for engine in ENGINES:
        got = run(engine, fx["base"], tmp_path / "imported.gguf", ids)
        print(f"embedding LoRA from {who} on {engine}: max |Δ| vs PEFT {np.abs(got - want).max():.2e}")
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_add_adapter_on_a_llama_cpp_lora_names_import_adapter(fx, cpp_files):
    m = edgeadapt.load(fx["base"], engine="numpy")
    with pytest.raises(FormatError, match=r"another tool.*edgeadapt import-adapter .*lora-F32\.gguf --base BASE"):
        m.add_adapter(cpp_files["F32"], name="x")


def test_mismatches_are_named_at_once(fx, tmp_path):
    """Another architecture, a layer the base lacks, a wrong shape, an unpaired factor, a norm tensor: one error."""
    cfg = fx["manifest"].arch
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "qwen2")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    rng = np.random.default_rng(0)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    w.add_tensor("blk.7.attn_q.weight.lora_a", f(4, cfg.dim))
    w.add_tensor("blk.7.attn_q.weight.lora_b", f(cfg.q_dim, 4))
    w.add_tensor("blk.0.attn_v.weight.lora_a", f(4, cfg.dim + 1))
    w.add_tensor("blk.0.attn_v.weight.lora_b", f(cfg.kv_dim, 4))
    w.add_tensor("blk.1.ffn_up.weight.lora_a", f(4, cfg.dim))
    w.add_tensor("blk.1.attn_norm.weight", f(cfg.dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from edgeadapt.converters.importers import import_adapter

    with pytest.raises(AdapterMismatchError) as e:
        import_adapter(tmp_path / "bad.gguf", fx["base"], tmp_path / "out.gguf")
    msg = str(e.value)
    for part in ("architecture: the base is 'llama', bad.gguf says 'qwen2'", "blk.7.attn_q.weight: layer 7, but the "
                 "base has 3 layers", "blk.0.attn_v.weight: expected [out, in] = [32, 64]", "blk.1.ffn_up.weight: has "
                 "lora_a without its pair", "blk.1.attn_norm.weight: a whole norm tensor"):
        assert part in msg, msg
    assert not (tmp_path / "out.gguf").exists()


def test_wrong_arguments_are_refused_by_name(fx, cpp_files, tmp_path):
    from edgeadapt.converters.importers import import_adapter
    from edgeadapt.errors import UsageError

    good = dict(source=cpp_files["F32"], base=fx["base"], out=tmp_path / "x.gguf")
    for bad, want in ((dict(source=None), "expected an adapter file or folder path, found NoneType"),
                      (dict(name=3), "name: expected a non-empty string or None, found int 3"),
                      (dict(version=-1), "version: expected an integer"), (dict(version=1.5), "found float 1.5"),
                      (dict(dtype="Q4_0"), "dtype: expected F32 or F16"), (dict(out=None), "out: expected")):
        kw = {**good, **bad}
        with pytest.raises(UsageError, match=want):
            import_adapter(kw.pop("source"), kw.pop("base"), kw.pop("out"), **kw)
    assert not (tmp_path / "x.gguf").exists()


# ---- .onnx_adapter
def _onnx_adapter(path: Path, params: dict[str, np.ndarray], model_version: int = 0) -> Path:
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(model_version)
    keep = {k: np.ascontiguousarray(v) for k, v in params.items()}
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in keep.items()})
    fmt.export_adapter(str(path))
    return path


def _peft_matmul_factors(pm):
    """{hf module: (A [in, r], s·B [r, out])}: PEFT's factors as onnxruntime-genai's builder and Olive store them."""
    out, sd = {}, pm.state_dict()
    for n, m in pm.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            s = m.scaling["default"]
            module = n[len("base_model.model."):]
            out[module] = (sd[f"{n}.lora_A.default.weight"].numpy().T, (sd[f"{n}.lora_B.default.weight"].numpy() * s).T)
    return out


@pytest.mark.parametrize("scheme", ["genai-builder", "olive", "ours-unpinned"])
def test_onnx_adapter_names_match_peft(fx, scheme, ids, tmp_path):
    """onnxruntime-genai's builder names (model.layers.i.attn.q_proj.lora_A.MatMul.weight, as its make_matmul_lora
    names the initializers), Olive's convert-adapters names (float16), and our graph's names with model_version 0."""
    from edgeadapt.converters.importers import import_adapter
    from edgeadapt.formats.names import gguf_name

    cfg = fx["manifest"].arch
    params = {}
    for module, (a, b) in _peft_matmul_factors(fx["pm"]).items():
        if scheme == "genai-builder":
            stem = module.replace(".self_attn.", ".attn.")
            params[f"{stem}.lora_A.MatMul.weight"], params[f"{stem}.lora_B.MatMul.weight"] = a, b
        elif scheme == "olive":
            params[f"{module}.lora_A.weight"] = a.astype(np.float16)
            params[f"{module}.lora_B.weight"] = b.astype(np.float16)
        else:
            w = gguf_name(cfg, module + ".weight")
            bb = permute_qk(b.T, qk_heads(cfg, w)) if qk_heads(cfg, w) else b.T
            params[f"lora.{w}.a"], params[f"lora.{w}.b"] = a[None], bb.T[None]
    src = _onnx_adapter(tmp_path / f"{scheme}.onnx_adapter", {k: v.astype(v.dtype) for k, v in params.items()})
    res = import_adapter(src, fx["base"], tmp_path / "imported.gguf")
    assert "not this base's fingerprint pin" in res.asserted_by
    if scheme == "olive":  # float16 factors: PEFT with the same rounding
        ref = copy.deepcopy(fx["pm"])
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if ".lora_" in n:
                    p.copy_(p.half().float())
    else:
        ref = fx["pm"]
    want = torch_logits(ref, ids)
    for engine in ENGINES:
        got = run(engine, fx["base"], tmp_path / "imported.gguf", ids)
        print(f".onnx_adapter ({scheme}) on {engine}: max |Δ| vs PEFT {np.abs(got - want).max():.2e}")
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_onnx_adapter_refusals(fx, tmp_path):
    from edgeadapt.converters.importers import import_adapter

    cfg = fx["manifest"].arch
    src = _onnx_adapter(tmp_path / "q.onnx_adapter", {
        "model.layers.0.self_attn.q_proj.lora_A.quant.weight": np.zeros((4, 2, 16), np.uint8),
        "model.layers.0.self_attn.k_proj.dora_M.weight": np.ones(cfg.kv_dim, np.float32),
        "model.layers.5.self_attn.v_proj.lora_A.weight": np.ones((cfg.dim, 4), np.float32),
        "model.layers.5.self_attn.v_proj.lora_B.weight": np.ones((4, cfg.kv_dim), np.float32),
        "something.else": np.ones(3, np.float32)})
    with pytest.raises(AdapterMismatchError) as e:
        import_adapter(src, fx["base"], tmp_path / "out.gguf")
    msg = str(e.value)
    for part in ("Olive --quantize_int4", "a DoRA / LoHa parameter",
                 "model.layers.5.self_attn.v_proj: layer 5, but the base has 3 layers",
                 "something.else: not a LoRA parameter name"):
        assert part in msg, msg


# ---- mlx-lm
@pytest.fixture(scope="module")
def mlx_lm_model(fx):
    mx = pytest.importorskip("mlx.core", reason="mlx not installed (pip install 'mlx[cpu]' mlx-lm)")
    pytest.importorskip("mlx_lm", reason="mlx-lm not installed (pip install 'mlx[cpu]' mlx-lm)")
    return mx


def _mlx_adapter(fx, tmp_path: Path, kind: str, num_layers: int, keys=None):
    """An adapter folder saved as mlx_lm.lora saves it, and mlx-lm's own forward of the adapted model."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    conf = json.loads((fx["hf"] / "config.json").read_text())  # transformers 5 writes rope_parameters only;
    model, _ = load_model(fx["hf"], model_config={"rope_theta": conf["rope_parameters"]["rope_theta"]})  # mlx-lm
    #                                                                   reads rope_theta (qwen2 default: 1e6)
    model.freeze()
    params = {"rank": 4, "scale": 7.5, "dropout": 0.0, **({"keys": keys} if keys else {})}
    linear_to_lora_layers(model, num_layers, params, use_dora=kind == "dora")
    rng = np.random.default_rng(11)
    updates = []
    for k, v in tree_flatten(model.trainable_parameters()):  # trained-looking factors: B is zero at init
        x = rng.normal(0, 0.05, size=v.shape).astype(np.float32)
        if k.endswith(".m"):
            x = np.array(v) * (1 + 0.2 * rng.normal(size=v.shape)).astype(np.float32)
        updates.append((k, mx.array(x)))
    model.load_weights(updates, strict=False)
    folder = tmp_path / f"mlx-{kind}"
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": kind, "num_layers": num_layers, "lora_parameters": params, "model": str(fx["hf"])}))
    return folder, model


@pytest.mark.parametrize("kind,num_layers,keys", [("lora", 2, None),
                                                  ("dora", 3, ["self_attn.q_proj", "mlp.down_proj"])])
def test_mlx_lm_adapter_matches_mlx(fx, mlx_lm_model, kind, num_layers, keys, ids, tmp_path):
    """mlx-lm's LoRA (last 2 of 3 layers, every linear) and DoRA (q and down): mlx-lm's own logits on both engines."""
    import mlx.core as mx

    from edgeadapt.converters.importers import import_adapter

    folder, model = _mlx_adapter(fx, tmp_path, kind, num_layers, keys)
    want = np.array(model(mx.array(np.array(ids))).astype(mx.float32))
    assert np.abs(want - torch_logits(fx["model"], ids)).max() > 0.05, "the adapter must matter"
    res = import_adapter(folder, fx["base"], tmp_path / "imported.gguf")
    assert res.adapter.kind == kind and "num_layers" in res.asserted_by
    for engine in ENGINES:
        got = run(engine, fx["base"], tmp_path / "imported.gguf", ids)
        print(f"mlx-lm {kind} on {engine}: max |Δ| vs mlx-lm {np.abs(got - want).max():.2e}")
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_mlx_lm_mismatches(fx, mlx_lm_model, tmp_path):
    from edgeadapt.converters.importers import import_adapter

    folder, _ = _mlx_adapter(fx, tmp_path, "lora", 1, ["self_attn.q_proj"])
    conf = json.loads((folder / "adapter_config.json").read_text())
    conf.update(num_layers=5)
    conf["lora_parameters"]["rank"] = 6
    (folder / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(FormatError, match="num_layers: 5 adapted layers, but the base has 3"):
        import_adapter(folder, fx["base"], tmp_path / "x.gguf")
    conf.update(num_layers=1)
    (folder / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(AdapterMismatchError, match="rank 4, but lora_parameters.rank is 6"):
        import_adapter(folder, fx["base"], tmp_path / "x.gguf")
    conf.update(fine_tune_type="full")
    (folder / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(EdgeAdaptError, match="edgeadapt extract"):
        import_adapter(folder, fx["base"], tmp_path / "x.gguf")


# ---- another architecture: Qwen2 (neox rope: nothing permuted; q/k/v biases; tied head)
@pytest.fixture(scope="module")
def q2(tmp_path_factory):
    from edgeadapt.converters.export_base import export_base

    root = tmp_path_factory.mktemp("imports_qwen2")
    model = make_model("qwen2", seed=5, num_hidden_layers=2)
    model.save_pretrained(root / "hf")
    manifest = export_base(root / "hf", root / "base", gguf_type="F32")
    return dict(root=root, model=model, base=root / "base", manifest=manifest, hf=root / "hf")


def test_qwen2_llama_cpp_lora_and_mlx_dora(q2, ids, tmp_path):
    """llama.cpp's qwen2 names (F16 factors) against PEFT, and mlx-lm's DoRA on biased q/k/v against mlx-lm."""
    from edgeadapt.converters.importers import import_adapter

    pm = add_lora(q2["model"], 6, r=4, lora_alpha=6, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    pm.save_pretrained(tmp_path / "peft")
    path, who = llama_cpp_lora(q2, tmp_path / "peft", "F16", tmp_path / "q2.gguf")
    import_adapter(path, q2["base"], tmp_path / "q2-imported.gguf")
    want = torch_logits(file_reference(dict(q2, pm=pm), path), ids)
    for engine in ENGINES:
        got = run(engine, q2["base"], tmp_path / "q2-imported.gguf", ids)
        print(f"qwen2 F16 from {who} on {engine}: max |Δ| vs PEFT {np.abs(got - want).max():.2e}")
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    pytest.importorskip("mlx_lm", reason="mlx-lm not installed (pip install 'mlx[cpu]' mlx-lm)")
    import mlx.core as mx

    folder, model = _mlx_adapter(q2, tmp_path, "dora", 2, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])
    want = np.array(model(mx.array(np.array(ids))).astype(mx.float32))
    import_adapter(folder, q2["base"], tmp_path / "q2-dora.gguf")
    for engine in ENGINES:
        got = run(engine, q2["base"], tmp_path / "q2-dora.gguf", ids)
        print(f"qwen2 mlx-lm dora on {engine}: max |Δ| vs mlx-lm {np.abs(got - want).max():.2e}")
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


# ---- llama.cpp's names on every other architecture we export
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _arch_model(arch: str):
    if arch == "qwen3":
        from test_arch_qwen3 import make_qwen3

        return make_qwen3(), dict(target_modules=ALL_LINEAR)
    if arch == "gemma3":
        from test_arch_gemma3 import make_gemma3

        return make_gemma3(), dict(target_modules=ALL_LINEAR)
    if arch == "smollm3":
        from test_arch_smollm3 import make_smollm3

        return make_smollm3(), dict(target_modules=ALL_LINEAR)
    from test_arch_gpt2 import make_gpt2

    return make_gpt2(), dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "smollm3", "gpt2"])
def test_llama_cpp_lora_on_every_architecture(arch, ids, tmp_path):
    """llama.cpp's converter on Qwen3 (q/k norms), Gemma 3 (windowed layers), SmolLM3 (NoPE layers, q/k permuted)
    and GPT-2 (Conv1D, fan_in_fan_out: the converter transposes PEFT's factors a second time, so llama.cpp itself
    refuses the file; the import transposes them back): PEFT's output on both engines."""
    from edgeadapt.converters.export_base import export_base
    from edgeadapt.converters.importers import import_adapter

    model, conf = _arch_model(arch)
    model.save_pretrained(tmp_path / "hf")
    manifest = export_base(tmp_path / "hf", tmp_path / "base", gguf_type="F32")
    pm = add_lora(model, 1, r=4, lora_alpha=6, **conf)
    with torch.no_grad():  # a tenth of the helper's B: SmolLM3's 4 adapted layers stay well conditioned in float32
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.1)
    pm.save_pretrained(tmp_path / "peft")
    fx = dict(hf=tmp_path / "hf", manifest=manifest)
    path, who = llama_cpp_lora(fx, tmp_path / "peft", "F32", tmp_path / "lora.gguf")
    res = import_adapter(path, tmp_path / "base", tmp_path / "imported.gguf")
    assert ("transposed back" in res.asserted_by) == (arch == "gpt2")
    want = torch_logits(pm, ids)
    assert np.abs(want - torch_logits(model, ids)).max() > 0.05, "the adapter must matter"
    for engine in ENGINES:
        got = run(engine, tmp_path / "base", tmp_path / "imported.gguf", ids)
        print(f"{arch} from {who} on {engine}: max |Δ| vs PEFT {np.abs(got - want).max():.2e}")
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


# ---- the command line
def test_cli_import_and_inspect(fx, cpp_files, tmp_path):
    runner = CliRunner()
    out = tmp_path / "billing.gguf"
    res = runner.invoke(main, ["import-adapter", str(cpp_files["F16"]), "--base", str(fx["base"]), "-o", str(out),
                               "--name", "billing", "--version", "3"])
    assert res.exit_code == 0, res.output
    assert "imported llama.cpp LoRA GGUF" in res.output and "asserted, not proven" in res.output
    res = runner.invoke(main, ["inspect", str(out)])
    assert res.exit_code == 0, res.output
    assert "'billing' version 3" in res.output
    assert "asserted by   edgeadapt import-adapter from a llama.cpp LoRA GGUF (lora-F16.gguf" in res.output
    for bad, want in (([str(fx["root"] / "peft")], "PEFT folder: convert it with edgeadapt export-adapter"),
                      ([str(fx["base"] / "manifest.json")], "neither GGUF magic nor an .onnx_adapter"),
                      ([str(fx["base"] / "model.gguf")], "found a model, not an adapter")):
        res = runner.invoke(main, ["import-adapter", *bad, "--base", str(fx["base"]), "-o", str(tmp_path / "y.gguf")])
        assert res.exit_code == 2 and res.output.startswith("error: ") and want in res.output, res.output
