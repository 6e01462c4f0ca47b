"""Qwen3 end to end: a tiny Qwen3ForCausalLM with head_dim (24) independent of hidden / heads (64 / 4),
GQA, random non-trivial q_norm / k_norm weights and an untied head, exported with the CLI and run on
both engines against transformers and PEFT (LoRA merged, live and per row; DoRA, IA3, embedding LoRA;
merge into a new base; extract from a fine-tune); the fused onnxruntime graph, its plain reference and
the int4 / int8 graphs; onnxruntime-genai on the base folder; llama.cpp on our GGUF base and delta file,
and our export of llama.cpp's own GGUF; what the family cannot take is refused by name (and Qwen2's
window, read from the same config keys)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import edgeadapt
from edgeadapt.formats.arch import ArchConfig
from edgeadapt.errors import UnsupportedError

from arch_common import (TOL, add_lora, byte_tokenizer, check_cached_decode, check_greedy, check_per_row,
                         check_left_padded, check_logits, check_lora, cli, export, export_lora, greedy_hf,
                         llama_cpp_greedy, randomize)
from conftest import ENGINES, torch, torch_logits
from llama_cpp_src import WHY

transformers = pytest.importorskip("transformers")

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def qwen3_config(**over):
    from transformers import Qwen3Config

    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=24, max_position_embeddings=128, rms_norm_eps=1e-6,
               rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager")
    cfg.update(over)
    return Qwen3Config(**cfg)


def make_qwen3(seed: int = 0, **over):
    from transformers import Qwen3ForCausalLM

    return randomize(Qwen3ForCausalLM(qwen3_config(**over)), seed, norm_around=1.0)


@pytest.fixture(scope="module")
def q3(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    model = make_qwen3()
    base = export(model, root)
    pa = add_lora(model, 1, target_modules=ALL_LINEAR, use_rslora=True, rank_pattern={"down_proj": 6})
    pb = add_lora(model, 2, r=2, lora_alpha=3, target_modules=["q_proj", "k_proj", "gate_proj"])
    return dict(root=root, model=model, base=base, pa=pa, pb=pb, a=export_lora(pa, root, base, "a"),
                b=export_lora(pb, root, base, "b"))


@pytest.fixture
def ids():
    return np.random.default_rng(0).integers(3, 256, size=(2, 11)).tolist()


def test_card(q3):
    cfg = edgeadapt.load(q3["base"], engine="numpy")._engine.cfg
    assert (cfg.arch, cfg.rope, cfg.qk_norm, cfg.qkv_bias, cfg.head_dim, cfg.q_dim, cfg.dim) == (
        "qwen3", "neox", True, False, 24, 96, 64)
    assert (cfg.rope_theta, cfg.sliding_window, cfg.tied_embeddings, cfg.post_norms) == (50000.0, None, False, False)


def test_cli_inspect_shows_the_head_layout(q3):
    from click.testing import CliRunner

    from edgeadapt.cli import main

    res = CliRunner().invoke(main, ["inspect", str(q3["base"])])
    assert res.exit_code == 0, res.output
    assert "architecture  qwen3: 2 layers, dim 64, ffn 96, heads 4/2 kv × head_dim 24, q/k norm, vocab 256, rope neox" \
        in res.output


def test_gguf_card_reads_back(q3):
    """The GGUF base alone (llama.cpp's keys) gives the same card: key_length carries head_dim."""
    import gguf

    reader = gguf.GGUFReader(str(q3["base"] / "model.gguf"))
    assert reader.fields["qwen3.attention.key_length"].contents() == 24
    assert reader.fields["qwen3.attention.value_length"].contents() == 24
    got = ArchConfig.from_gguf(reader)
    want = ArchConfig.from_hf(q3["model"].config)
    assert got.rms_eps == pytest.approx(want.rms_eps, rel=1e-6)  # stored as float32
    same = {"rms_eps": got.rms_eps, "pad_token_id": got.pad_token_id}  # no pad id is written without a tokenizer
    assert got.to_dict() == {**want.to_dict(), **same}


def test_qk_norm_matters(q3, ids):
    """The q/k norm weights are really exercised: with them at one, transformers' logits differ."""
    plain = copy.deepcopy(q3["model"])
    with torch.no_grad():
        for layer in plain.model.layers:
            layer.self_attn.q_norm.weight.fill_(1.0)
            layer.self_attn.k_norm.weight.fill_(1.0)
    assert np.abs(torch_logits(plain, ids) - torch_logits(q3["model"], ids)).max() > 1e-2


@pytest.mark.parametrize("engine", ENGINES)
def test_logits_match_transformers(q3, ids, engine):
    check_logits(q3["base"], q3["model"], engine, ids)


@pytest.mark.parametrize("engine", ENGINES)
def test_left_padded_batch(q3, engine):
    check_left_padded(q3["base"], q3["model"], engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_cached_decode_step(q3, ids, engine):
    check_cached_decode(q3["base"], q3["model"], engine, ids)


@pytest.mark.parametrize("mode", ["merge", "live"])
@pytest.mark.parametrize("engine", ENGINES)
def test_lora_matches_peft(q3, ids, engine, mode):
    check_lora(q3["base"], q3["a"], q3["pa"], q3["model"], engine, mode, ids)


@pytest.mark.parametrize("engine", ENGINES)
def test_per_row_adapters(q3, engine):
    check_per_row(q3, engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_greedy_generation_matches_transformers(q3, engine):
    check_greedy(q3["base"], q3["model"], engine, [5, 17, 42, 99, 7, 8], 10)


@pytest.mark.parametrize("engine", ENGINES)
def test_greedy_generation_with_lora_matches_peft(q3, engine):
    check_greedy(q3["base"], q3["pa"], engine, [9, 33, 4, 120, 64], 10, delta=q3["a"])


# ---- merge into a new base, extract from a fine-tune
@pytest.mark.parametrize("engine", ENGINES)
def test_merged_base_equals_peft(q3, ids, tmp_path, engine):
    """`edgeadapt merge` folds the adapter into a new qwen3 base (q/k norms carried over): PEFT's logits."""
    cli("merge", q3["base"], q3["a"], "-o", tmp_path / "m", "--no-report")
    np.testing.assert_allclose(edgeadapt.load(tmp_path / "m", engine=engine).logits(ids), torch_logits(q3["pa"], ids),
                               atol=TOL, rtol=0)


def test_extract_from_a_fine_tune(q3, ids, tmp_path):
    """A full fine-tune (PEFT's merge of adapter a, saved as a plain Qwen3 folder) -> low-rank delta by SVD of
    the linear-weight changes (rank 6 holds them all) -> PEFT's logits on both engines."""
    ft = copy.deepcopy(q3["pa"]).merge_and_unload()
    ft.save_pretrained(tmp_path / "ft")
    cli("extract", tmp_path / "ft", "--base", q3["base"], "-o", tmp_path / "x.gguf", "--rank", "6", "--no-report")
    for engine in ENGINES:
        check_lora(q3["base"], tmp_path / "x.gguf", q3["pa"], q3["model"], engine, "live", ids)


# ---- other PEFT kinds (the live scale / bias graph and the embedding-change input of the fused graph)
def _kind_configs():
    from peft import IA3Config, LoraConfig

    return {"dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=ALL_LINEAR, init_lora_weights=False),
            "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
            "embedding_lora": LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "k_proj"],
                                         init_lora_weights=False)}


@pytest.fixture(scope="module")
def q3_kinds(q3):
    from peft import get_peft_model

    out = {}
    for i, (kind, conf) in enumerate(_kind_configs().items()):
        torch.manual_seed(20 + i)
        pm = get_peft_model(copy.deepcopy(q3["model"]), conf)
        with torch.no_grad():  # trained-looking parameters: PEFT starts these as a no-op
            for n, p in pm.named_parameters():
                if "ia3_" in n or "magnitude" in n:
                    p.copy_(1.0 + 0.3 * torch.randn_like(p))
                elif "lora_" in n:
                    p.copy_(0.3 * torch.randn_like(p))
        out[kind] = (pm.eval(), export_lora(pm.eval(), q3["root"], q3["base"], kind))
    return out


@pytest.mark.parametrize("kind,mode", [("dora", "merge"), ("dora", "live"), ("ia3", "live"), ("embedding_lora", "live")])
@pytest.mark.parametrize("engine", ENGINES)
def test_other_kinds_match_peft(q3, q3_kinds, ids, engine, kind, mode):
    pm, path = q3_kinds[kind]
    check_lora(q3["base"], path, pm, q3["model"], engine, mode, ids)


# ---- the fused onnxruntime graph, its plain-operator reference, and the quantized bases
def test_ort_runs_the_fused_graph(q3):
    """model.onnx is the com.microsoft graph: q/k norms are SimplifiedLayerNormalization over the heads,
    attention is GroupQueryAttention (the logits tests above check its numbers)."""
    import onnx

    g = onnx.load(str(q3["base"] / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in g.node]
    assert ops.count("GroupQueryAttention") == 2 and ops.count("RotaryEmbedding") == 4
    head_norms = [n.input[1] for n in g.node if n.op_type == "SimplifiedLayerNormalization"
                  and n.input[1].endswith(("attn_q_norm.weight", "attn_k_norm.weight"))]
    assert sorted(head_norms) == [f"blk.{i}.attn_{c}_norm.weight" for i in range(2) for c in "kq"]
    # the live and the scale / bias graphs are written; bottleneck slots are not (AdapterHub has no Qwen3)
    assert (q3["base"] / "model_live.onnx").is_file() and (q3["base"] / "model_kinds.onnx").is_file()
    assert not (q3["base"] / "model_bottleneck.onnx").exists()


def test_adapterhub_bottleneck_is_refused_by_name(q3, tmp_path):
    import json

    from edgeadapt.converters.adapterhub import convert_adapterhub
    from edgeadapt.formats.manifest import read_manifest

    (tmp_path / "bn").mkdir()
    (tmp_path / "bn" / "adapter_config.json").write_text(json.dumps({
        "config": {"architecture": "bottleneck", "mh_adapter": False, "output_adapter": True, "reduction_factor": 16,
                   "non_linearity": "relu", "original_ln_before": True, "original_ln_after": True,
                   "residual_before_ln": True, "ln_before": False, "ln_after": False, "scaling": 1.0},
        "hidden_size": 64, "model_class": "Qwen3ForCausalLM", "model_type": "qwen3", "name": "bn", "version": "1.3.0"}))
    from safetensors.numpy import save_file

    key = "model.layers.0.output_adapters.adapters.bn.adapter_down.0.weight"
    save_file({key: np.ones((4, 64), np.float32)}, str(tmp_path / "bn" / "adapter.safetensors"))
    with pytest.raises(UnsupportedError, match="this base is a 'qwen3' decoder, whose blocks have no bottleneck slots"):
        convert_adapterhub(tmp_path / "bn", read_manifest(q3["base"]))


def test_reference_graph_matches_transformers(q3, ids, tmp_path):
    """The default-domain graph (build_onnx fused=False) computes the same q/k norms."""
    from edgeadapt.converters.hf import from_transformers
    from edgeadapt.converters.onnx_graphs.graph import build_onnx
    from test_quant_base import _feeds, _logits

    cfg, w = from_transformers(q3["model"])
    build_onnx(cfg, w, tmp_path, fused=False)
    got = _logits(tmp_path / "model.onnx", _feeds(cfg, ids), cfg)
    np.testing.assert_allclose(got, torch_logits(q3["model"], ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_quantized_graph_computes_its_blocks_with_lora(q3, kind, tmp_path):
    """accuracy_level 0: the int4 / int8 graph with a live LoRA = the fp32 graph of its own dequantized
    weights with ΔW merged in float32 (so the quantized graph's q/k norms are those verified above)."""
    from edgeadapt.converters.hf import from_transformers
    from edgeadapt.converters.onnx_graphs.fast import build_quant_onnx
    from edgeadapt.converters.onnx_graphs.graph import build_onnx
    from edgeadapt.formats.delta import read_delta
    from test_quant_base import TOL_EXACT, _dequantized, _feeds, _logits, _lora_feeds

    cfg, w = from_transformers(q3["model"])
    build_quant_onnx(cfg, w, tmp_path / "q", kind, accuracy_level=0)
    d = read_delta(q3["a"])
    merged = _dequantized(cfg, w, kind)
    for t in d.targets:
        merged[t] = merged[t] + d.delta(t)
    build_onnx(cfg, merged, tmp_path / "want", slots=False)
    ids = np.random.default_rng(1).integers(3, 256, (2, 9))
    got = _logits(tmp_path / "q" / f"model_{kind}.onnx", _feeds(cfg, ids, lora=_lora_feeds(d)), cfg)
    want = _logits(tmp_path / "want" / "model.onnx", _feeds(cfg, ids), cfg)
    assert np.abs(got - want).max() < TOL_EXACT


def test_quantized_base_through_load(q3, ids, tmp_path):
    """export-base --onnx-weights int4: edgeadapt.load runs it with a live adapter, near PEFT (quantization
    error only, the bound of tests/test_quant_base.py)."""
    from edgeadapt.converters.export_base import export_base
    from test_quant_base import TOL_MODEL

    export_base(q3["root"] / "hf_base", tmp_path / "q", gguf_type="F32", onnx_weights=("fp32", "int4"))
    m = edgeadapt.load(tmp_path / "q", engine="ort", weights="int4", mode="live")
    m.add_adapter(q3["a"], name="a")
    m.use("a")
    err = np.abs(m.logits(ids) - torch_logits(q3["pa"], ids))
    assert err.max() < TOL_MODEL["int4"][0] and err.mean() < TOL_MODEL["int4"][1], (err.max(), err.mean())


# ---- llama.cpp
@pytest.fixture(scope="module")
def q3_cpp(tmp_path_factory):
    """A tied Qwen3 with a vocabulary llama.cpp can load, its base, and a PEFT LoRA on every linear layer."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install llama-cpp-python)")
    root = tmp_path_factory.mktemp("qwen3_cpp")
    model = make_qwen3(3, tie_word_embeddings=True, num_hidden_layers=3)
    hf = root / "hf"
    model.save_pretrained(hf)
    byte_tokenizer(hf, bos=1, eos=2, pad=0)
    cli("export-base", hf, root / "base", "--gguf-type", "F32", "--no-onnx")
    pm = add_lora(model, 5, target_modules=ALL_LINEAR)
    return dict(root=root, model=model, base=root / "base", pm=pm, delta=export_lora(pm, root, root / "base", "a"))


def llama_cpp_logits(gguf_path, prompt, lora=None) -> np.ndarray:
    import llama_cpp

    kw = dict(lora_path=str(lora)) if lora else {}
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=128, n_threads=1, verbose=False, logits_all=True,
                          type_k=0, type_v=0, **kw)  # an F32 kv cache (ggml type 0; the default is F16)
    llm.eval(prompt)
    return np.array(llm.scores[: len(prompt)], np.float32)


def test_llama_cpp_agrees(q3_cpp):
    """llama.cpp loads our GGUF as qwen3 (head_dim from key_length) and gives transformers' logits and our
    greedy tokens."""
    prompt = [5, 17, 42, 99, 7, 8, 9, 10]
    ours = edgeadapt.load(q3_cpp["base"], engine="numpy")
    got = ours.generate_ids(prompt, max_new_tokens=8)
    want = greedy_hf(q3_cpp["model"], prompt, 8)
    want = want[: want.index(2)] if 2 in want else want
    assert got == want
    assert llama_cpp_greedy(q3_cpp["base"] / "model.gguf", prompt, len(got) or 1)[: len(got)] == got
    theirs = llama_cpp_logits(q3_cpp["base"] / "model.gguf", prompt)
    np.testing.assert_allclose(theirs, torch_logits(q3_cpp["model"], [prompt])[0], atol=TOL, rtol=0)


def test_llama_cpp_loads_a_base_without_vocabulary(q3):
    """Exported from a folder without a tokenizer, the GGUF names no vocabulary ("none"): llama.cpp still
    loads it and computes transformers' logits from token ids."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install llama-cpp-python)")
    prompt = [5, 17, 42, 99, 7]
    theirs = llama_cpp_logits(q3["base"] / "model.gguf", prompt)
    np.testing.assert_allclose(theirs, torch_logits(q3["model"], [prompt])[0], atol=TOL, rtol=0)


def test_llama_cpp_agrees_with_lora(q3_cpp):
    """llama.cpp takes our delta file as a LoRA of the qwen3 base and computes PEFT's logits."""
    prompt = [5, 17, 42, 99, 7, 8, 9, 10]
    want = torch_logits(q3_cpp["pm"], [prompt])[0]
    assert np.abs(want - torch_logits(q3_cpp["model"], [prompt])[0]).max() > 0.05, "the adapter must matter"
    theirs = llama_cpp_logits(q3_cpp["base"] / "model.gguf", prompt, lora=q3_cpp["delta"])
    np.testing.assert_allclose(theirs, want, atol=TOL, rtol=0)


def _llama_cpp_converter():
    """llama.cpp's convert_hf_to_gguf.py (tests/llama_cpp_src.py finds or fetches llama.cpp's source tree)."""
    from llama_cpp_src import llama_cpp_dir

    d = llama_cpp_dir()
    return None if d is None else d / "convert_hf_to_gguf.py"


# the converter names a BPE tokenizer by hashing its output on a test text; the test vocabulary is none it knows
_CONVERT = """import sys
sys.path.insert(0, sys.argv[1])
import conversion.base as base, conversion.qwen as qwen
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
qwen.Qwen2Model.set_vocab = lambda self: self._set_vocab_gpt2()
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", sys.argv[2], "--outfile", sys.argv[3], "--outtype", "f32"]
convert_hf_to_gguf.main()
"""


def test_gguf_from_llama_cpp_converter(q3_cpp, ids, tmp_path):
    """A GGUF written by llama.cpp's own converter from the HF folder (no rope.dimension_count, head_dim as
    key_length) exports and runs on both engines with transformers' logits."""
    import subprocess
    import sys

    conv = _llama_cpp_converter()
    if conv is None:
        pytest.skip(WHY)
    gguf_path = tmp_path / "qwen3.gguf"
    res = subprocess.run([sys.executable, "-c", _CONVERT, str(conv.parent), str(q3_cpp["root"] / "hf"), str(gguf_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    cli("export-base", gguf_path, tmp_path / "base", "--gguf-type", "source")
    for engine in ENGINES:
        check_logits(tmp_path / "base", q3_cpp["model"], engine, ids)


# ---- cards of published configs, and what is refused by name
QWEN3_06B = {  # Qwen/Qwen3-0.6B config.json (transformers 4.51 keys: rope_theta / rope_scaling, no layer_types)
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02,
    "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936}


def test_card_of_qwen3_06b_config():
    cfg = ArchConfig.from_hf(QWEN3_06B)
    assert (cfg.arch, cfg.n_layers, cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.q_dim) == (
        "qwen3", 28, 1024, 3072, 16, 8, 128, 2048)
    assert (cfg.rope, cfg.rope_theta, cfg.rope_scale, cfg.qk_norm, cfg.qkv_bias, cfg.tied_embeddings) == (
        "neox", 1e6, 1.0, True, False, True)
    assert (cfg.sliding_window, cfg.swa_layers, cfg.eos_token_ids, cfg.context_length) == (None, None, [151645], 40960)
    assert cfg.tensor_shapes()["blk.27.attn_q_norm.weight"] == (128,) and "output.weight" not in cfg.tensor_shapes()


@pytest.mark.parametrize("engine", ENGINES)
def test_qwen2_window_on_every_layer_matches_transformers(tmp_path, engine):
    """Qwen2 with use_sliding_window and max_window_layers 0: windowed everywhere, as the card says."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def config(window: bool):
        return Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           use_sliding_window=window, sliding_window=3, max_window_layers=0, bos_token_id=1,
                           eos_token_id=2, attn_implementation="eager")

    model = randomize(Qwen2ForCausalLM(config(True)), 8, norm_around=1.0)
    base = export(model, tmp_path)
    ids = np.random.default_rng(5).integers(3, 256, size=(2, 10)).tolist()
    full = Qwen2ForCausalLM(config(False)).eval()
    full.load_state_dict(model.state_dict())
    assert np.abs(torch_logits(full, ids) - torch_logits(model, ids)).max() > 1e-2  # the window matters
    check_logits(base, model, engine, ids)
    check_cached_decode(base, model, engine, ids)


def test_qwen2_window_on_some_layers_is_refused():
    """Qwen2 (the same config keys): a window on every layer or none is a card; on some layers only is refused."""
    from transformers import Qwen2Config

    def card(**kw):
        return ArchConfig.from_hf(Qwen2Config(num_hidden_layers=3, sliding_window=4, **kw))

    assert card(use_sliding_window=False).sliding_window is None
    assert card(use_sliding_window=True, max_window_layers=0).sliding_window == 4
    assert card(use_sliding_window=True, max_window_layers=3).sliding_window is None
    with pytest.raises(UnsupportedError, match=r"qwen2: sliding_window on some layers only .*max_window_layers 1"):
        card(use_sliding_window=True, max_window_layers=1)


def _gguf_card(tmp_path, **keys):
    """The card of a tensor-less qwen3 GGUF with the hparams of the test model and ``keys`` on top."""
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "qwen3")
    for k, v in dict(block_count=2, context_length=128, embedding_length=64, feed_forward_length=96,
                     vocab_size=256, **{"attention.head_count": 4, "attention.head_count_kv": 2,
                                        "attention.key_length": 24}, **keys).items():
        w.add_key_value(f"qwen3.{k}", v, gguf.GGUFValueType.UINT32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return ArchConfig.from_gguf(gguf.GGUFReader(str(tmp_path / "k.gguf")))


@pytest.mark.parametrize("keys,match", [
    ({"attention.sliding_window": 4}, "GGUF qwen3 with qwen3.attention.sliding_window = 4 is not supported"),
    ({"attention.value_length": 16}, "GGUF qwen3: attention.value_length 16 != key_length 24 is not supported"),
    ({"rope.dimension_count": 12}, r"GGUF qwen3: partial rope \(rope.dimension_count 12 of head_dim 24\)"),
])
def test_refused_gguf_keys(tmp_path, keys, match):
    assert _gguf_card(tmp_path).head_dim == 24
    with pytest.raises(UnsupportedError, match=match):
        _gguf_card(tmp_path, **keys)


@pytest.mark.parametrize("over,match", [
    (dict(attention_bias=True), "qwen3: attention_bias=True is not supported"),
    (dict(use_sliding_window=True, sliding_window=4, max_window_layers=1), "qwen3: use_sliding_window=True"),
    (dict(hidden_act="gelu"), "qwen3: hidden_act 'gelu' is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                           "original_max_position_embeddings": 32}), "rope_scaling .*yarn.* is not supported"),
])
def test_refused_configs(over, match):
    with pytest.raises(UnsupportedError, match=match):
        ArchConfig.from_hf(qwen3_config(**over))
