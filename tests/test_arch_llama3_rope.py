"""Llama 3.x rope scaling ("llama3" rope_type): a tiny Llama whose scaling really moves the frequencies of
its head_dim (one kept, two interpolated, five divided by the factor), exported with the CLI and run on both
engines against transformers and PEFT (logits, left padding, cached decode, greedy generation, LoRA merged
and live, a merged base); the plain-operator and int4 graphs; Llama 3.2's own rope parameters at positions
past 12,000; llama.cpp on our GGUF (it reads the divisors from rope_freqs.weight) with and without our LoRA;
a GGUF from llama.cpp's own converter; export-base from our model.gguf; Llama 3.2 1B's config.json; and
what is refused by name (other rope types, bad llama3 parameters, a bad or misplaced rope_freqs.weight,
hostile manifest cards)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import edgeadapt
from edgeadapt.formats.arch import ArchConfig, llama3_rope_freqs
from edgeadapt.errors import FormatError, UnsupportedError

from arch_common import (TOL, add_lora, check_cached_decode, check_greedy, check_left_padded, check_logits,
                         check_lora, cli, export, export_lora, randomize)
from conftest import ENGINES, SIZES, torch, torch_logits
from llama_cpp_src import WHY

transformers = pytest.importorskip("transformers")

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# head_dim 16 at base 1e4: wavelengths 6.3 … 19869; with original_max 64 / high 4 -> 16 and / low 1 -> 64,
# frequency 0 is kept, 1 and 2 are interpolated, 3 … 7 are divided by 8
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


LLAMA32_1B = {  # meta-llama/Llama-3.2-1B config.json
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0",
    "use_cache": True, "vocab_size": 128256}


def llama3_config(rope=LLAMA3, **over):
    from transformers import LlamaConfig

    return LlamaConfig(**{**SIZES, "rope_parameters": dict(rope), "bos_token_id": 1, "eos_token_id": 2,
                          "pad_token_id": 0, "attn_implementation": "eager", **over})


def make_llama3(seed: int = 0, **over):
    from transformers import LlamaForCausalLM

    return randomize(LlamaForCausalLM(llama3_config(**over)), seed, norm_around=1.0)


@pytest.fixture(scope="module")
def l3(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama3_rope")
    model = make_llama3()
    base = export(model, root)
    pa = add_lora(model, 1, target_modules=ALL_LINEAR)
    return dict(root=root, model=model, base=base, pa=pa, a=export_lora(pa, root, base, "a"))


@pytest.fixture
def ids():
    return np.random.default_rng(0).integers(3, 256, size=(2, 12)).tolist()


# ---- the card
def test_card(l3):
    cfg = edgeadapt.load(l3["base"], engine="numpy")._engine.cfg
    assert (cfg.arch, cfg.rope, cfg.rope_theta, cfg.rope_scale) == ("llama", "norm", 10000.0, 1.0)
    assert cfg.rope_freqs == llama3_rope_freqs(LLAMA3, 10000.0, 16)
    freqs = np.array(cfg.rope_freqs)
    assert freqs[0] == 1.0 and 1.0 < freqs[1] < freqs[2] < 8.0 and (freqs[3:] == 8.0).all()


def test_cli_inspect_names_the_scaling(l3):
    from click.testing import CliRunner

    from edgeadapt.cli import main

    res = CliRunner().invoke(main, ["inspect", str(l3["base"])])
    assert res.exit_code == 0, res.output
    assert "vocab 256, rope norm with Llama 3.x scaling, tied False" in res.output


def test_frequencies_are_transformers(l3):
    """inv_freq / rope_freqs is transformers' llama3 inv_freq (to the last bit or one ulp)."""
    cfg = ArchConfig.from_hf(l3["model"].config)
    theirs = l3["model"].model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(cfg.rope_inv_freq(), theirs, rtol=2.5e-7, atol=0)


def test_scaling_changes_the_reference(l3, ids):
    """Without the scaling transformers' own logits differ: the test positions exercise it."""
    plain = make_llama3(rope={"rope_type": "default", "rope_theta": 10000.0})
    plain.load_state_dict(l3["model"].state_dict())
    assert np.abs(torch_logits(plain, ids) - torch_logits(l3["model"], ids)).max() > 1e-2


# ---- both engines against transformers / PEFT
@pytest.mark.parametrize("engine", ENGINES)
def test_logits_match_transformers(l3, ids, engine):
    check_logits(l3["base"], l3["model"], engine, ids)


@pytest.mark.parametrize("engine", ENGINES)
def test_left_padded_batch(l3, engine):
    check_left_padded(l3["base"], l3["model"], engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_cached_decode_step(l3, ids, engine):
    check_cached_decode(l3["base"], l3["model"], engine, ids)


@pytest.mark.parametrize("mode", ["merge", "live"])
@pytest.mark.parametrize("engine", ENGINES)
def test_lora_matches_peft(l3, ids, engine, mode):
    check_lora(l3["base"], l3["a"], l3["pa"], l3["model"], engine, mode, ids)


@pytest.mark.parametrize("engine", ENGINES)
def test_greedy_generation_matches_transformers(l3, engine):
    check_greedy(l3["base"], l3["model"], engine, [5, 17, 42, 99, 7, 8], 24)  # positions up to 29: deep into the scaled frequencies


def test_reference_graph_matches_transformers(l3, ids, tmp_path):
    """The default-domain graph (build_onnx fused=False) reads the same scaled rope tables."""
    from edgeadapt.converters.hf import from_transformers
    from edgeadapt.converters.onnx_graphs.graph import build_onnx
    from test_quant_base import _feeds, _logits

    cfg, w = from_transformers(l3["model"])
    build_onnx(cfg, w, tmp_path, fused=False)
    got = _logits(tmp_path / "model.onnx", _feeds(cfg, ids), cfg)
    np.testing.assert_allclose(got, torch_logits(l3["model"], ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("engine", ENGINES)
def test_merged_base_equals_peft(l3, ids, tmp_path, engine):
    """`edgeadapt merge` writes a new base that keeps the scaling (card, rope tables, rope_freqs.weight)."""
    cli("merge", l3["base"], l3["a"], "-o", tmp_path / "m", "--no-report")
    m = edgeadapt.load(tmp_path / "m", engine=engine)
    assert m._engine.cfg.rope_freqs == llama3_rope_freqs(LLAMA3, 10000.0, 16)
    np.testing.assert_allclose(m.logits(ids), torch_logits(l3["pa"], ids), atol=TOL, rtol=0)


def test_quantized_base_through_load(l3, ids, tmp_path):
    """export-base --onnx-weights int4: the int4 graph reads the scaled tables too (near PEFT, to the
    quantization bound of tests/test_quant_base.py)."""
    from edgeadapt.converters.export_base import export_base
    from test_quant_base import TOL_MODEL

    export_base(l3["root"] / "hf_base", tmp_path / "q", gguf_type="F32", onnx_weights=("fp32", "int4"))
    m = edgeadapt.load(tmp_path / "q", engine="ort", weights="int4", mode="live")
    m.add_adapter(l3["a"], name="a")
    m.use("a")
    err = np.abs(m.logits(ids) - torch_logits(l3["pa"], ids))
    assert err.max() < TOL_MODEL["int4"][0] and err.mean() < TOL_MODEL["int4"][1], (err.max(), err.mean())


def test_llama32_rope_far_out(tmp_path):
    """Llama 3.2's own rope parameters (head_dim 64, base 5e5, factor 32, original 8192) at positions past
    12,000, where the scaling moves every angle by radians: both engines within 1e-4 of transformers."""
    from transformers import LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, **{k: LLAMA32_1B["rope_scaling"][k] for k in (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}}
    shape = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16384)
    model = randomize(LlamaForCausalLM(llama3_config(rope=rope, **shape)), 6, norm_around=1.0)
    plain = randomize(LlamaForCausalLM(llama3_config(rope={"rope_type": "default", "rope_theta": 500000.0}, **shape)),
                      6, norm_around=1.0)
    base = export(model, tmp_path)
    ids = np.random.default_rng(6).integers(3, 256, size=(2, 8))
    pos = np.broadcast_to(12000 + 37 * np.arange(8), (2, 8)).astype(np.int64)  # 12000 … 12259

    def hf(m):
        with torch.no_grad():
            return m(torch.tensor(ids), position_ids=torch.tensor(pos)).logits.numpy()

    want = hf(model)
    assert np.abs(hf(plain) - want).max() > 1e-2
    for engine in ENGINES:
        eng = edgeadapt.load(base, engine=engine)._engine
        got, _ = eng.forward(ids, np.ones_like(ids), np.ascontiguousarray(pos), None)
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0, err_msg=engine)


# ---- GGUF: our writer, llama.cpp, and back
def _gguf_freqs(path) -> np.ndarray:
    import gguf

    t = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}["rope_freqs.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.F32
    return np.array(t.data, np.float32)


def test_gguf_carries_rope_freqs(l3):
    """model.gguf holds llama.cpp's rope_freqs.weight (F32 [head_dim/2]); the GGUF alone gives the same card."""
    import gguf

    path = l3["base"] / "model.gguf"
    np.testing.assert_array_equal(_gguf_freqs(path), np.array(llama3_rope_freqs(LLAMA3, 10000.0, 16), np.float32))
    reader = gguf.GGUFReader(str(path))
    assert "llama.rope.scaling.type" not in reader.fields  # llama.cpp's converter writes none for llama3 either
    got, want = ArchConfig.from_gguf(reader), ArchConfig.from_hf(l3["model"].config)
    assert got.rope_freqs == want.rope_freqs
    assert got.to_dict() == {**want.to_dict(), "rms_eps": got.rms_eps, "pad_token_id": got.pad_token_id}
    from edgeadapt.runtime.numpy_engine.engine import NumpyEngine  # the device's strict GGUF reader: the same divisors

    assert NumpyEngine(path).cfg.rope_freqs == want.rope_freqs


@pytest.mark.parametrize("gguf_type", ["F32", "source"])
def test_export_from_our_gguf(l3, ids, tmp_path, gguf_type):
    """export-base from our own model.gguf: the same card and transformers' logits on both engines."""
    cli("export-base", l3["base"] / "model.gguf", tmp_path / "b", "--gguf-type", gguf_type)
    assert np.array_equal(_gguf_freqs(tmp_path / "b" / "model.gguf"), _gguf_freqs(l3["base"] / "model.gguf"))
    for engine in ENGINES:
        m = edgeadapt.load(tmp_path / "b", engine=engine)
        assert m._engine.cfg.rope_freqs == llama3_rope_freqs(LLAMA3, 10000.0, 16)
        np.testing.assert_allclose(m.logits(ids), torch_logits(l3["model"], ids), atol=TOL, rtol=0)


def _llama_cpp_logits(gguf_path, prompt, lora=None):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install llama-cpp-python)")
    from test_arch_qwen3 import llama_cpp_logits

    return llama_cpp_logits(gguf_path, prompt, lora=lora)


def _rewrite_gguf(src, dst, freqs):
    """A copy of the GGUF ``src`` whose rope_freqs.weight is ``freqs`` (None: left out)."""
    import gguf

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "llama")
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment"):
            continue
        vtype = field.types[0]
        w.add_key_value(key, field.contents(), vtype,
                        sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        if t.name != "rope_freqs.weight":
            w.add_tensor(t.name, np.array(t.data).reshape(tuple(int(x) for x in reversed(t.shape))))
    if freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(freqs, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_llama_cpp_agrees(l3, tmp_path):
    """llama.cpp on our GGUF gives transformers' logits; the same file without rope_freqs.weight does not
    (so llama.cpp really reads the divisors from it)."""
    prompt = np.random.default_rng(3).integers(3, 256, size=40).tolist()  # positions 0 … 39
    want = torch_logits(l3["model"], [prompt])[0]
    theirs = _llama_cpp_logits(l3["base"] / "model.gguf", prompt)
    np.testing.assert_allclose(theirs, want, atol=TOL, rtol=0)
    unscaled = _llama_cpp_logits(_rewrite_gguf(l3["base"] / "model.gguf", tmp_path / "plain.gguf", None), prompt)
    assert np.abs(unscaled - want).max() > 1e-2


def test_llama_cpp_agrees_with_lora(l3):
    """llama.cpp takes our delta file as a LoRA of the scaled base and computes PEFT's logits."""
    prompt = np.random.default_rng(4).integers(3, 256, size=24).tolist()
    want = torch_logits(l3["pa"], [prompt])[0]
    assert np.abs(want - torch_logits(l3["model"], [prompt])[0]).max() > 0.05, "the adapter must matter"
    np.testing.assert_allclose(_llama_cpp_logits(l3["base"] / "model.gguf", prompt, lora=l3["a"]), want,
                               atol=TOL, rtol=0)


_CONVERT = """import sys
sys.path.insert(0, sys.argv[1])
import conversion.base as base, conversion.llama as llama
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
llama.LlamaModel.set_vocab = lambda self: self._set_vocab_gpt2()
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", sys.argv[2], "--outfile", sys.argv[3], "--outtype", "f32"]
convert_hf_to_gguf.main()
"""


def test_gguf_from_llama_cpp_converter(l3, ids, tmp_path):
    """llama.cpp's own converter writes rope_freqs.weight from the HF folder: its divisors are ours (to float32
    rounding), and its GGUF exports and runs on both engines with transformers' logits."""
    import subprocess
    import sys

    from arch_common import byte_tokenizer
    from test_arch_qwen3 import _llama_cpp_converter

    conv = _llama_cpp_converter()
    if conv is None:
        pytest.skip(WHY)
    hf = tmp_path / "hf"
    shutil.copytree(l3["root"] / "hf_base", hf)
    byte_tokenizer(hf, bos=1, eos=2, pad=0)
    gguf_path = tmp_path / "llama3.gguf"
    res = subprocess.run([sys.executable, "-c", _CONVERT, str(conv.parent), str(hf), str(gguf_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    np.testing.assert_allclose(_gguf_freqs(gguf_path), llama3_rope_freqs(LLAMA3, 10000.0, 16), rtol=1e-6, atol=0)
    cli("export-base", gguf_path, tmp_path / "base", "--gguf-type", "source")
    for engine in ENGINES:
        check_logits(tmp_path / "base", l3["model"], engine, ids)


# ---- what is refused, and old cards
def _export(src, out):
    from edgeadapt.converters.export_base import export_base

    return export_base(src, out, gguf_type="F32", onnx=False)


@pytest.mark.parametrize("freqs,match", [
    ([1.0] * 7, r"rope_freqs.weight: expected F32 \[8\] \(head_dim / 2\), found F32 \[7\]"),
    ([1.0] * 7 + [-2.0], r"rope_freqs.weight: expected positive finite divisors"),
])
def test_bad_rope_freqs_in_a_gguf_are_refused(l3, tmp_path, freqs, match):
    bad = _rewrite_gguf(l3["base"] / "model.gguf", tmp_path / "bad.gguf", freqs)
    with pytest.raises(FormatError, match=match):
        _export(bad, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
    from edgeadapt.runtime.numpy_engine.engine import NumpyEngine

    with pytest.raises(FormatError, match=match):
        NumpyEngine(bad)


def test_rope_freqs_in_a_gguf_of_another_family_are_refused(tmp_path):
    """llama.cpp reads rope_freqs.weight on the llama family only (of ours): a qwen3 GGUF holding one is refused."""
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "qwen3")
    for k, v in dict(block_count=2, context_length=128, embedding_length=64, feed_forward_length=96, vocab_size=256,
                     **{"attention.head_count": 4, "attention.head_count_kv": 2}).items():
        w.add_key_value(f"qwen3.{k}", v, gguf.GGUFValueType.UINT32)
    w.add_tensor("rope_freqs.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedError, match=r"GGUF qwen3 with rope_freqs.weight \(per-frequency rope scaling\) "
                                               r"is not supported \(Llama 3.x rope scaling on the llama family only\)"):
        ArchConfig.from_gguf(gguf.GGUFReader(str(tmp_path / "q.gguf")))


def test_gguf_and_card_must_agree(l3, tmp_path):
    """A base folder whose card and model.gguf disagree about rope_freqs is refused by the numpy engine."""
    folder = tmp_path / "b"
    shutil.copytree(l3["base"], folder)
    _rewrite_gguf(l3["base"] / "model.gguf", folder / "model.gguf", [2.0] * 8)
    with pytest.raises(FormatError, match=r"rope_freqs.weight: expected \[1.0, 1.29.*\(the card's rope_freqs\), "
                                          r"found \[2.0, 2.0"):
        edgeadapt.load(folder, engine="numpy")


def _manifest_with(base, out, **card):
    shutil.copytree(base, out)
    m = json.loads((out / "manifest.json").read_text())
    m["arch"].update(card)
    for k, v in card.items():
        if v is ...:
            del m["arch"][k]
    (out / "manifest.json").write_text(json.dumps(m))
    return out


@pytest.mark.parametrize("card,match", [
    ({"rope_freqs": [1.0] * 7}, r"arch.rope_freqs: expected null or a list of head_dim/2 = 8 positive finite"),
    ({"rope_freqs": [1.0] * 7 + [0.0]}, r"arch.rope_freqs: expected null or a list"),
    ({"rope_freqs": [1.0] * 7 + [True]}, r"arch.rope_freqs: expected null or a list"),
    ({"rope_freqs": "8"}, r"arch.rope_freqs: expected null or a list"),
    ({"rope_freqs": [1.0] * 8, "rope": "none"}, r"arch.rope_freqs: Llama 3.x rope scaling is for the llama family "
                                                r"with rope, found arch 'llama', rope 'none'"),
    ({"rope_freqs": [1.0] * 8, "arch": "qwen3"}, r"arch.rope_freqs: Llama 3.x rope scaling is for the llama family "
                                                 r"with rope, found arch 'qwen3', rope 'norm'"),
])
def test_hostile_cards_are_refused(l3, tmp_path, card, match):
    from edgeadapt.formats.manifest import read_manifest

    with pytest.raises(FormatError, match=match):
        read_manifest(_manifest_with(l3["base"], tmp_path / "b", **card))


def test_old_cards_load(l3, tmp_path):
    """A card written before rope_freqs existed (no key) reads as unscaled rope; on this base's GGUF, which
    holds rope_freqs.weight, the numpy engine then names the disagreement."""
    from edgeadapt.formats.manifest import read_manifest

    folder = _manifest_with(l3["base"], tmp_path / "b", rope_freqs=...)
    assert "rope_freqs" not in json.loads((folder / "manifest.json").read_text())["arch"]
    assert read_manifest(folder).arch.rope_freqs is None
    with pytest.raises(FormatError, match=r"rope_freqs.weight: expected none \(the card's rope_freqs\), found \[1.0, "):
        edgeadapt.load(folder, engine="numpy")


@pytest.mark.parametrize("rope,match", [
    ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "original_max_position_embeddings": 32}, "'yarn'"),
    ({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}, "'dynamic'"),
    ({"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
      "original_max_position_embeddings": 32}, "'longrope'"),
])
def test_other_rope_types_are_refused(rope, match):
    with pytest.raises(UnsupportedError, match=rf"rope_scaling .*{match}.* is not supported yet"):
        ArchConfig.from_hf(llama3_config(rope=rope))


def test_llama3_params_are_checked():
    with pytest.raises(UnsupportedError, match=r"llama3 rope needs numbers for .*; missing or not a number: "
                                               r"\['low_freq_factor'\]"):
        ArchConfig.from_hf({**llama3_config().to_dict(), "rope_parameters": {
            k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}})
    with pytest.raises(UnsupportedError, match="0 < low_freq_factor < high_freq_factor"):
        ArchConfig.from_hf({**llama3_config().to_dict(), "rope_parameters": {**LLAMA3, "low_freq_factor": 4.0}})


def test_llama3_rope_on_qwen3_is_refused():
    """transformers would take llama3 rope on Qwen3; llama.cpp's qwen3 reads no rope_freqs, so it is refused."""
    from test_arch_qwen3 import qwen3_config

    with pytest.raises(UnsupportedError, match=r"rope_scaling .*'llama3'.* is not supported yet \(plain or linear "
                                               r"rope; llama3 on the llama family\)"):
        ArchConfig.from_hf(qwen3_config(rope_parameters={**LLAMA3}))


def test_card_of_llama32_1b_config():
    """Llama 3.2 1B's config.json (transformers 4.45 keys): 15 frequencies kept, 3 interpolated, 14 divided by 32 —
    transformers' own inv_freq for that config."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = ArchConfig.from_hf(LLAMA32_1B)
    assert (cfg.arch, cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.tied_embeddings) == (
        "llama", 16, 2048, 32, 8, 64, True)
    assert (cfg.rope_theta, cfg.rope_scale, cfg.context_length) == (500000.0, 1.0, 131072)
    freqs = np.array(cfg.rope_freqs)
    assert (freqs[:15] == 1.0).all() and (1.0 < freqs[15:18]).all() and (freqs[15:18] < 32.0).all()
    assert (freqs[18:] == 32.0).all()
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**LLAMA32_1B), "cpu")
    np.testing.assert_allclose(cfg.rope_inv_freq(), inv.numpy(), rtol=2.5e-7, atol=0)


def test_llama3_rope_on_qwen2_is_refused():
    """qwen2 takes the generic config path; llama.cpp's qwen2 reads no rope_freqs either."""
    from conftest import make_model

    g = {**make_model("qwen2").config.to_dict(), "rope_parameters": {**LLAMA3}}
    with pytest.raises(UnsupportedError, match=r"qwen2: rope_scaling .*\(llama3\) is supported on the llama family only"):
        ArchConfig.from_hf(g)
