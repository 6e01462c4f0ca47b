"""GPT-2 end to end: a tiny GPT2LMHeadModel (LayerNorm with bias, learned positions, fused c_attn,
GELU-tanh, biases everywhere, Conv1D weights) exported with the CLI and run on both engines
against transformers, and a PEFT LoRA with fan_in_fan_out=True on c_attn / c_proj / c_fc against PEFT."""

from __future__ import annotations

import numpy as np
import pytest

import edgeadapt
from edgeadapt.errors import UnsupportedError

from arch_common import (add_lora, byte_tokenizer, check_cached_decode, check_greedy, check_left_padded, check_lora,
                         check_logits, cli, export, export_lora, greedy_hf, llama_cpp_greedy, randomize)
from conftest import ENGINES

transformers = pytest.importorskip("transformers")


def make_gpt2(seed: int = 0, **over):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2,
               pad_token_id=0, attn_implementation="eager")
    cfg.update(over)
    return randomize(GPT2LMHeadModel(GPT2Config(**cfg)), seed, norm_around=1.0)


@pytest.fixture(scope="module")
def g2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    model = make_gpt2()
    base = export(model, root)
    pm = add_lora(model, 1, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                  rank_pattern={"c_fc": 6}, alpha_pattern={"c_attn": 5})
    assert pm.peft_config["default"].fan_in_fan_out
    return dict(root=root, model=model, base=base, pm=pm, delta=export_lora(pm, root, base, "a"))


@pytest.fixture
def ids():
    return np.random.default_rng(1).integers(3, 256, size=(2, 9)).tolist()


def test_card_and_layout(g2):
    eng = edgeadapt.load(g2["base"], engine="numpy")._engine
    cfg = eng.cfg
    assert (cfg.arch, cfg.norm, cfg.fused_qkv, cfg.learned_pos, cfg.rope) == ("gpt2", "layer", True, True, "none")
    assert list(cfg.linear_shapes())[:4] == ["blk.0.attn_qkv.weight", "blk.0.attn_output.weight",
                                             "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"]
    # Conv1D [in, out] in HF, [out, in] in the canonical layout
    w = g2["model"].transformer.h[0].attn.c_attn.weight.detach().numpy()
    np.testing.assert_array_equal(eng.base_weight("blk.0.attn_qkv.weight"), w.T)


@pytest.mark.parametrize("engine", ENGINES)
def test_logits_match_transformers(g2, ids, engine):
    check_logits(g2["base"], g2["model"], engine, ids)


@pytest.mark.parametrize("engine", ENGINES)
def test_left_padded_batch(g2, engine):
    check_left_padded(g2["base"], g2["model"], engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_cached_decode_step(g2, ids, engine):
    check_cached_decode(g2["base"], g2["model"], engine, ids)


@pytest.mark.parametrize("engine,mode", [pytest.param(e, m, id=f"gpt2_fan_in_fan_out_{e}_{m}")
                                         for e in ENGINES for m in ("merge", "live")])
def test_kind(g2, ids, engine, mode):
    """PEFT LoRA with fan_in_fan_out on GPT-2's Conv1D layers vs PEFT's forward (README's kinds table)."""
    check_lora(g2["base"], g2["delta"], g2["pm"], g2["model"], engine, mode, ids)


@pytest.mark.parametrize("engine", ENGINES)
def test_greedy_generation_matches_transformers(g2, engine):
    check_greedy(g2["base"], g2["model"], engine, [5, 17, 42, 99, 7], 10)


def test_fan_in_fan_out_refused_on_linear_layers(tmp_path, tiny):
    """fan_in_fan_out only describes Conv1D layers: on a llama base it is refused by name."""
    import json

    from edgeadapt.converters.peft.lora import convert_peft

    folder = tmp_path / "peft"
    import shutil

    shutil.copytree(tiny["root"] / "peft_b", folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = True
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="fan_in_fan_out=True is for Conv1D layers"):
        convert_peft(folder, tiny["manifest"], tmp_path / "x.gguf")


def test_llama_cpp_agrees(tmp_path):
    """llama.cpp loads our GGUF (gpt2 arch, F32) and gives our greedy tokens."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install llama-cpp-python)")
    model = make_gpt2(4)
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    byte_tokenizer(hf, bos=1, eos=2, pad=0)
    cli("export-base", hf, tmp_path / "base", "--gguf-type", "F32", "--no-onnx")
    prompt = [5, 17, 42, 99, 7, 8, 9, 10]
    got = edgeadapt.load(tmp_path / "base", engine="numpy").generate_ids(prompt, max_new_tokens=8)
    want = greedy_hf(model, prompt, 8)
    assert got == (want[: want.index(2)] if 2 in want else want)
    assert llama_cpp_greedy(tmp_path / "base" / "model.gguf", prompt, len(got) or 1)[: len(got)] == got


def test_quantized_onnx_refused_by_name(g2, tmp_path):
    from edgeadapt.converters.export_base import export_base

    with pytest.raises(UnsupportedError, match="quantized ONNX \\(int4\\) is not supported for the gpt2 architecture"):
        export_base(g2["root"] / "hf_base", tmp_path / "q", onnx_weights=("int4",))
