"""SmolLM3 end to end: a tiny SmolLM3ForCausalLM (4 layers, the 4th a NoPE layer that applies no rope,
GQA, tied head) exported with the CLI and run on both engines against transformers and PEFT (LoRA merged,
live and per row; DoRA, IA3, embedding LoRA; merge into a new base; greedy generation; cached decode; left
padding); the fused onnxruntime graph (no
RotaryEmbedding on the NoPE layer), its plain reference and the int4 graph; llama.cpp on our GGUF base and
delta file; export-base from our own GGUF; what llama.cpp's smollm3 cannot run is refused by name."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest

import edgeadapt
from edgeadapt.formats.arch import ArchConfig, check_features
from edgeadapt.errors import FormatError, UnsupportedError

from arch_common import (TOL, add_lora as _add_lora, byte_tokenizer, check_cached_decode, check_greedy,
                         check_per_row, check_left_padded, check_logits, check_lora, cli, export, export_lora,
                         greedy_hf, llama_cpp_greedy, randomize)
from conftest import ENGINES, torch, torch_logits
from llama_cpp_src import WHY

transformers = pytest.importorskip("transformers")

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm3_config(**over):
    from transformers import SmolLM3Config

    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
               rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, bos_token_id=1, eos_token_id=2,
               pad_token_id=0, attn_implementation="eager")
    cfg.update(over)
    return SmolLM3Config(**cfg)


def make_smollm3(seed: int = 0, **over):
    from transformers import SmolLM3ForCausalLM

    return randomize(SmolLM3ForCausalLM(smollm3_config(**over)), seed, norm_around=1.0)


def add_lora(model, seed: int, **cfg):
    """The shared helper's PEFT LoRA with one tenth of its B: its ×3 factors make the adapted 4-layer model
    ill-conditioned (PEFT's own float32 logits ~1e-4 off float64, test_adapted_model_is_well_conditioned);
    a tenth still moves the logits by more than 1."""
    pm = _add_lora(model, seed, **cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(0.1)
    return pm


def float64_logits(model, ids) -> np.ndarray:
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        return m(torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def sm(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm3")
    model = make_smollm3()
    base = export(model, root)
    pa = add_lora(model, 1, target_modules=ALL_LINEAR, use_rslora=True, rank_pattern={"down_proj": 6})
    pb = add_lora(model, 2, r=2, lora_alpha=3, target_modules=["q_proj", "k_proj", "gate_proj"])
    return dict(root=root, model=model, base=base, pa=pa, pb=pb, a=export_lora(pa, root, base, "a"),
                b=export_lora(pb, root, base, "b"))


@pytest.fixture
def ids():
    return np.random.default_rng(0).integers(3, 256, size=(2, 11)).tolist()


def test_card(sm):
    assert sm["model"].config.no_rope_layers == [1, 1, 1, 0]
    cfg = edgeadapt.load(sm["base"], engine="numpy")._engine.cfg
    assert (cfg.arch, cfg.rope, cfg.nope_layers, cfg.tied_embeddings, cfg.qk_norm, cfg.qkv_bias) == (
        "smollm3", "norm", [3], True, False, False)
    assert [cfg.uses_rope(i) for i in range(4)] == [True, True, True, False]
    assert (cfg.rope_theta, cfg.sliding_window, cfg.head_dim, cfg.n_kv_heads) == (50000.0, None, 16, 2)


def test_gguf_card_reads_back(sm):
    """The GGUF base alone (architecture smollm3, llama.cpp's keys) gives the same card, NoPE layers included."""
    import gguf

    reader = gguf.GGUFReader(str(sm["base"] / "model.gguf"))
    assert reader.fields["general.architecture"].contents() == "smollm3"
    got = ArchConfig.from_gguf(reader)
    want = ArchConfig.from_hf(sm["model"].config)
    assert got.rms_eps == pytest.approx(want.rms_eps, rel=1e-6)  # stored as float32
    assert got.to_dict() == {**want.to_dict(), "rms_eps": got.rms_eps, "pad_token_id": got.pad_token_id}


def test_adapted_model_is_well_conditioned(sm, ids):
    """1e-4 is a meaningful bound here: transformers' float32 logits of the base and of PEFT's adapted models are
    within 1e-5 of their float64 values, and the adapters matter."""
    for m in (sm["model"], sm["pa"], sm["pb"]):
        assert np.abs(torch_logits(m, ids) - float64_logits(m, ids)).max() < 1e-5
    assert np.abs(torch_logits(sm["pa"], ids) - torch_logits(sm["model"], ids)).max() > 1


def test_nope_layer_matters(sm, ids):
    """The same weights with rope on every layer give other logits: the NoPE layer is really exercised."""
    from transformers import SmolLM3ForCausalLM

    roped = SmolLM3ForCausalLM(smollm3_config(no_rope_layers=[1, 1, 1, 1])).eval()
    roped.load_state_dict(sm["model"].state_dict())
    assert np.abs(torch_logits(roped, ids) - torch_logits(sm["model"], ids)).max() > 1e-2


@pytest.mark.parametrize("engine", ENGINES)
def test_logits_match_transformers(sm, ids, engine):
    check_logits(sm["base"], sm["model"], engine, ids)


@pytest.mark.parametrize("engine", ENGINES)
def test_left_padded_batch(sm, engine):
    check_left_padded(sm["base"], sm["model"], engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_cached_decode_step(sm, ids, engine):
    check_cached_decode(sm["base"], sm["model"], engine, ids)


@pytest.mark.parametrize("mode", ["merge", "live"])
@pytest.mark.parametrize("engine", ENGINES)
def test_lora_matches_peft(sm, ids, engine, mode):
    check_lora(sm["base"], sm["a"], sm["pa"], sm["model"], engine, mode, ids)


@pytest.mark.parametrize("engine", ENGINES)
def test_per_row_adapters(sm, engine):
    check_per_row(sm, engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_greedy_generation_matches_transformers(sm, engine):
    check_greedy(sm["base"], sm["model"], engine, [5, 17, 42, 99, 7, 8], 10)


@pytest.mark.parametrize("engine", ENGINES)
def test_greedy_generation_with_lora_matches_peft(sm, engine):
    check_greedy(sm["base"], sm["pa"], engine, [9, 33, 4, 120, 64], 10, delta=sm["a"])


@pytest.mark.parametrize("engine", ENGINES)
def test_export_from_our_gguf(sm, ids, tmp_path, engine):
    """export-base from the model.gguf we wrote: the same card (NoPE layers from the architecture name) and
    transformers' logits."""
    cli("export-base", sm["base"] / "model.gguf", tmp_path / "b", "--gguf-type", "source")
    m = edgeadapt.load(tmp_path / "b", engine=engine)
    assert m.config.nope_layers == [3] and m.config.arch == "smollm3"
    np.testing.assert_allclose(m.logits(ids), torch_logits(sm["model"], ids), atol=TOL, rtol=0)


# ---- merge into a new base, other PEFT kinds
@pytest.mark.parametrize("engine", ENGINES)
def test_merged_base_equals_peft(sm, ids, tmp_path, engine):
    """`edgeadapt merge` folds the adapter into a new smollm3 base (the NoPE layers carried over): PEFT's logits."""
    cli("merge", sm["base"], sm["a"], "-o", tmp_path / "m", "--no-report")
    m = edgeadapt.load(tmp_path / "m", engine=engine)
    assert m.config.nope_layers == [3]
    np.testing.assert_allclose(m.logits(ids), torch_logits(sm["pa"], ids), atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def sm_kinds(sm):
    from peft import IA3Config, LoraConfig, get_peft_model

    confs = {"dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=ALL_LINEAR, init_lora_weights=False),
             "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
             "embedding_lora": LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "k_proj"],
                                          init_lora_weights=False)}
    out = {}
    for i, (kind, conf) in enumerate(confs.items()):
        torch.manual_seed(20 + i)
        pm = get_peft_model(copy.deepcopy(sm["model"]), conf)
        with torch.no_grad():  # trained-looking parameters: PEFT starts these as a no-op
            for n, p in pm.named_parameters():
                if "ia3_" in n or "magnitude" in n:
                    p.copy_(1.0 + 0.3 * torch.randn_like(p))
                elif "lora_" in n:
                    p.copy_(0.1 * torch.randn_like(p))
        out[kind] = (pm.eval(), export_lora(pm.eval(), sm["root"], sm["base"], kind))
    return out


@pytest.mark.parametrize("kind,mode", [("dora", "merge"), ("dora", "live"), ("ia3", "live"), ("embedding_lora", "live")])
@pytest.mark.parametrize("engine", ENGINES)
def test_other_kinds_match_peft(sm, sm_kinds, ids, engine, kind, mode):
    pm, path = sm_kinds[kind]
    assert np.abs(torch_logits(pm, ids) - float64_logits(pm, ids)).max() < 1e-5  # a meaningful 1e-4
    check_lora(sm["base"], path, pm, sm["model"], engine, mode, ids)


# ---- the fused onnxruntime graph, its plain-operator reference, and the quantized base
def test_fused_graph_skips_rope_on_the_nope_layer(sm):
    import onnx

    g = onnx.load(str(sm["base"] / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in g.node]
    assert ops.count("GroupQueryAttention") == 4 and ops.count("RotaryEmbedding") == 6  # q and k on layers 0-2
    gqa3 = next(n for n in g.node if n.name == "gqa_3")
    producers = {o: n.op_type for n in g.node for o in n.output}
    assert producers[gqa3.input[0]] != "RotaryEmbedding" and producers[gqa3.input[1]] != "RotaryEmbedding"
    gqa2 = next(n for n in g.node if n.name == "gqa_2")
    assert producers[gqa2.input[0]] == producers[gqa2.input[1]] == "RotaryEmbedding"


def test_reference_graph_matches_transformers(sm, ids, tmp_path):
    """The default-domain graph (build_onnx fused=False) skips rope on the same layer."""
    from edgeadapt.converters.hf import from_transformers
    from edgeadapt.converters.onnx_graphs.graph import build_onnx
    from test_quant_base import _feeds, _logits

    cfg, w = from_transformers(sm["model"])
    build_onnx(cfg, w, tmp_path, fused=False)
    got = _logits(tmp_path / "model.onnx", _feeds(cfg, ids), cfg)
    np.testing.assert_allclose(got, torch_logits(sm["model"], ids), atol=TOL, rtol=0)


def test_int4_graph_computes_its_blocks_with_lora(sm, tmp_path):
    """accuracy_level 0: the int4 graph with a live LoRA = the fp32 graph of its own dequantized weights with
    ΔW merged in float32 (the NoPE layer of the int4 graph is the one verified above)."""
    from edgeadapt.converters.hf import from_transformers
    from edgeadapt.converters.onnx_graphs.fast import build_quant_onnx
    from edgeadapt.converters.onnx_graphs.graph import build_onnx
    from edgeadapt.formats.delta import read_delta
    from test_quant_base import TOL_EXACT, _dequantized, _feeds, _logits, _lora_feeds

    cfg, w = from_transformers(sm["model"])
    build_quant_onnx(cfg, w, tmp_path / "q", "int4", accuracy_level=0)
    d = read_delta(sm["a"])
    merged = _dequantized(cfg, w, "int4")
    for t in d.targets:
        merged[t] = merged[t] + d.delta(t)
    build_onnx(cfg, merged, tmp_path / "want", slots=False)
    ids = np.random.default_rng(1).integers(3, 256, (2, 9))
    got = _logits(tmp_path / "q" / "model_int4.onnx", _feeds(cfg, ids, lora=_lora_feeds(d)), cfg)
    want = _logits(tmp_path / "want" / "model.onnx", _feeds(cfg, ids), cfg)
    assert np.abs(got - want).max() < TOL_EXACT


def test_int4_base_through_load(sm, ids, tmp_path):
    """export-base --onnx-weights int4: edgeadapt.load runs it (activations quantized, accuracy_level 4) with a
    live adapter; against the fp32 graph of its own dequantized weights with ΔW merged, activation rounding
    only (TOL_ACT of tests/test_quant_base.py). Against PEFT the mean error is within the quantized-base bound;
    the max (1.95 measured) is over TOL_MODEL's 1.5: four layers carry more int4 weight error than two."""
    from edgeadapt.converters.export_base import export_base
    from edgeadapt.converters.hf import from_transformers
    from edgeadapt.converters.onnx_graphs.graph import build_onnx
    from edgeadapt.formats.delta import read_delta
    from test_quant_base import TOL_ACT, TOL_MODEL, _dequantized, _feeds, _logits

    export_base(sm["root"] / "hf_base", tmp_path / "q", gguf_type="F32", onnx_weights=("fp32", "int4"))
    m = edgeadapt.load(tmp_path / "q", engine="ort", weights="int4", mode="live")
    m.add_adapter(sm["a"], name="a")
    m.use("a")
    got = m.logits(ids)
    cfg, w = from_transformers(sm["model"])
    merged = _dequantized(cfg, w, "int4")
    d = read_delta(sm["a"])
    for t in d.targets:
        merged[t] = merged[t] + d.delta(t)
    build_onnx(cfg, merged, tmp_path / "want", slots=False)
    assert np.abs(got - _logits(tmp_path / "want" / "model.onnx", _feeds(cfg, np.array(ids)), cfg)).max() < TOL_ACT
    err = np.abs(got - torch_logits(sm["pa"], ids))
    assert err.mean() < TOL_MODEL["int4"][1], (err.max(), err.mean())


# ---- llama.cpp
@pytest.fixture(scope="module")
def sm_cpp(tmp_path_factory):
    """A SmolLM3 of 5 layers (a roped layer after the NoPE one) with a vocabulary llama.cpp can load, its base,
    and a PEFT LoRA on every linear layer."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install llama-cpp-python)")
    root = tmp_path_factory.mktemp("smollm3_cpp")
    model = make_smollm3(3, num_hidden_layers=5)
    hf = root / "hf"
    model.save_pretrained(hf)
    byte_tokenizer(hf, bos=1, eos=2, pad=0)
    cli("export-base", hf, root / "base", "--gguf-type", "F32", "--no-onnx")
    pm = add_lora(model, 5, target_modules=ALL_LINEAR)
    return dict(root=root, model=model, base=root / "base", pm=pm, delta=export_lora(pm, root, root / "base", "a"))


def test_llama_cpp_agrees(sm_cpp):
    """llama.cpp loads our GGUF as smollm3 (its NoPE layers fixed by the architecture) and gives transformers'
    logits and our greedy tokens."""
    from test_arch_qwen3 import llama_cpp_logits

    prompt = [5, 17, 42, 99, 7, 8, 9, 10]
    got = edgeadapt.load(sm_cpp["base"], engine="numpy").generate_ids(prompt, max_new_tokens=8)
    want = greedy_hf(sm_cpp["model"], prompt, 8)
    want = want[: want.index(2)] if 2 in want else want
    assert got == want
    assert llama_cpp_greedy(sm_cpp["base"] / "model.gguf", prompt, len(got) or 1)[: len(got)] == got
    theirs = llama_cpp_logits(sm_cpp["base"] / "model.gguf", prompt)
    np.testing.assert_allclose(theirs, torch_logits(sm_cpp["model"], [prompt])[0], atol=TOL, rtol=0)


def test_llama_cpp_agrees_with_lora(sm_cpp):
    """llama.cpp takes our delta file as a LoRA of the smollm3 base and computes PEFT's logits."""
    from test_arch_qwen3 import llama_cpp_logits

    prompt = [5, 17, 42, 99, 7, 8, 9, 10]
    want = torch_logits(sm_cpp["pm"], [prompt])[0]
    assert np.abs(want - torch_logits(sm_cpp["model"], [prompt])[0]).max() > 0.05, "the adapter must matter"
    theirs = llama_cpp_logits(sm_cpp["base"] / "model.gguf", prompt, lora=sm_cpp["delta"])
    np.testing.assert_allclose(theirs, want, atol=TOL, rtol=0)


# ---- cards of published configs, and what is refused by name
def _smollm3_3b() -> dict:
    """A config.json with SmolLM3-3B's hyper-parameters (36 layers, every 4th NoPE, GQA 16/4, tied)."""
    return {"architectures": ["SmolLM3ForCausalLM"], "model_type": "smollm3", "attention_bias": False,
            "mlp_bias": False, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 11008,
            "max_position_embeddings": 65536, "num_attention_heads": 16, "num_hidden_layers": 36,
            "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 5000000.0,
            "no_rope_layer_interval": 4, "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(36)],
            "use_sliding_window": False, "sliding_window": None, "tie_word_embeddings": True, "vocab_size": 128256,
            "bos_token_id": 128000, "eos_token_id": 128012, "pad_token_id": 128004}


def test_card_of_a_3b_config():
    cfg = ArchConfig.from_hf(_smollm3_3b())
    assert (cfg.arch, cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta) == (
        "smollm3", 36, 2048, 16, 4, 128, 5e6)
    assert cfg.nope_layers == [3, 7, 11, 15, 19, 23, 27, 31, 35] and cfg.tied_embeddings
    without = {k: v for k, v in _smollm3_3b().items() if k != "no_rope_layers"}  # from the interval alone
    assert ArchConfig.from_hf(without).nope_layers == cfg.nope_layers


@pytest.mark.parametrize("over,match", [
    (dict(attention_bias=True), "smollm3: attention_bias=True is not supported"),
    (dict(use_sliding_window=True, sliding_window=4), "smollm3: use_sliding_window=True"),
    (dict(hidden_act="gelu"), "smollm3: hidden_act 'gelu' is not supported"),
    (dict(no_rope_layers=[1, 0, 1, 0]), r"smollm3: no_rope_layers \[1, 0, 1, 0\] .* every 4th layer exactly "
                                        r"\(layers \[3\]\)"),
    (dict(no_rope_layers=None, no_rope_layer_interval=2), r"no_rope_layers \[1, 0, 1, 0\] \(no_rope_layer_interval 2\)"),
    (dict(no_rope_layers=[1, 1, 1, 1]), r"smollm3: no_rope_layers \[1, 1, 1, 1\]"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64, "rope_theta": 50000.0}),
     r"smollm3: rope_scaling .*llama3.* is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 50000.0,
                           "original_max_position_embeddings": 64}), "rope_scaling .*yarn.* is not supported"),
])
def test_refused_configs(over, match):
    with pytest.raises(UnsupportedError, match=match):
        ArchConfig.from_hf(smollm3_config(**over))


def test_mlp_bias_is_refused():
    with pytest.raises(UnsupportedError, match="mlp_bias"):
        ArchConfig.from_hf({**_smollm3_3b(), "mlp_bias": True})


def test_gguf_with_a_window_is_refused(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "smollm3")
    for k, v in dict(block_count=4, context_length=128, embedding_length=64, feed_forward_length=96, vocab_size=256,
                     **{"attention.head_count": 4, "attention.head_count_kv": 2, "attention.sliding_window": 8}).items():
        w.add_key_value(f"smollm3.{k}", v, gguf.GGUFValueType.UINT32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(UnsupportedError, match="GGUF smollm3 with smollm3.attention.sliding_window = 8 is not supported"):
        ArchConfig.from_gguf(gguf.GGUFReader(str(tmp_path / "k.gguf")))


def test_card_nope_layers_are_checked(sm, tmp_path):
    """A manifest whose card moves the NoPE layers (which the GGUF cannot say) or puts them on another family
    is refused by name; old cards without the field load as before."""
    from edgeadapt.formats.manifest import read_manifest

    card = ArchConfig.from_hf(sm["model"].config).to_dict()
    for bad, match in (([1], "expected [3] for smollm3"), (None, "found None")):
        problems: list[str] = []
        check_features({**card, "nope_layers": bad}, problems)
        assert any(match in p for p in problems), problems
    problems = []
    check_features({**card, "arch": "llama", "nope_layers": [3]}, problems)
    assert any("NoPE layers are a smollm3 feature" in p for p in problems), problems
    problems = []
    check_features({k: v for k, v in {**card, "arch": "llama"}.items() if k != "nope_layers"}, problems)
    assert problems == []
    shutil.copytree(sm["base"], tmp_path / "b")
    man = json.loads((tmp_path / "b" / "manifest.json").read_text())
    man["arch"]["nope_layers"] = [2]
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(FormatError, match=r"arch.nope_layers: expected \[3\] for smollm3"):
        read_manifest(tmp_path / "b")


def test_cli_inspect_names_the_architecture(sm):
    from click.testing import CliRunner

    from edgeadapt.cli import main

    res = CliRunner().invoke(main, ["inspect", str(sm["base"])])
    assert res.exit_code == 0, res.output
    assert ("architecture  smollm3: 4 layers, dim 64, ffn 96, heads 4/2 kv × head_dim 16, vocab 256, rope norm "
            "(none on layers [3]), tied True") in res.output



# the converter names a BPE tokenizer by hashing its output on a test text; the test vocabulary is none it knows
_CONVERT = """import sys
sys.path.insert(0, sys.argv[1])
import conversion.base as base, conversion.llama as llama
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
llama.LlamaModel.set_vocab = lambda self: self._set_vocab_gpt2()
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", sys.argv[2], "--outfile", sys.argv[3], "--outtype", "f32"]
convert_hf_to_gguf.main()
"""


def test_gguf_from_llama_cpp_converter(sm_cpp, tmp_path):
    """A GGUF written by llama.cpp's own converter from the HF folder (SmolLM3Model: q/k rows permuted, no
    NoPE key) exports to our card and runs on both engines with transformers' logits."""
    import subprocess
    import sys

    from test_arch_qwen3 import _llama_cpp_converter

    conv = _llama_cpp_converter()
    if conv is None:
        pytest.skip(WHY)
    gguf_path = tmp_path / "smollm3.gguf"
    res = subprocess.run([sys.executable, "-c", _CONVERT, str(conv.parent), str(sm_cpp["root"] / "hf"), str(gguf_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    cli("export-base", gguf_path, tmp_path / "base", "--gguf-type", "source")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(sm_cpp["root"] / "hf"))  # the vocabulary came through the GGUF
    ours = edgeadapt.load(tmp_path / "base", engine="numpy")
    assert ours.tokenizer.encode("abcab hi") == tok.encode("abcab hi", add_special_tokens=False)
    ids = np.random.default_rng(6).integers(3, 256, size=(2, 9)).tolist()
    for engine in ENGINES:
        m = edgeadapt.load(tmp_path / "base", engine=engine)
        assert m.config.nope_layers == [3]
        np.testing.assert_allclose(m.logits(ids), torch_logits(sm_cpp["model"], ids), atol=TOL, rtol=0)
