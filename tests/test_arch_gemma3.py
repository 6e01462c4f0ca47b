"""Gemma 3 (text decoder) end to end: a tiny Gemma3ForCausalLM with every feature switched on
((1+w) norms, √dim embeddings, GELU-tanh, q/k norms, post norms, query_pre_attn_scalar, a sliding
window shorter than the test sequences with its own rope base, linear rope scaling on the global
layer, final logit softcapping) exported with the CLI and run on both engines against
transformers and PEFT."""

from __future__ import annotations

import numpy as np
import pytest

import edgeadapt

from arch_common import (add_lora, byte_tokenizer, check_cached_decode, check_greedy, check_left_padded, check_lora,
                         check_logits, export, export_lora, greedy_hf, llama_cpp_greedy, randomize)
from conftest import ENGINES

transformers = pytest.importorskip("transformers")

WINDOW = 4


def make_gemma3(seed: int = 0, **over):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=24, max_position_embeddings=128, sliding_window=WINDOW,
               layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=20,
               rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}},
               final_logit_softcapping=3.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
               attn_implementation="eager")
    cfg.update(over)
    return randomize(Gemma3ForCausalLM(Gemma3TextConfig(**cfg)), seed, norm_around=0.0)


@pytest.fixture(scope="module")
def g3(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3")
    model = make_gemma3()
    base = export(model, root)
    pm = add_lora(model, 1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                  use_rslora=True, rank_pattern={"down_proj": 6})
    return dict(root=root, model=model, base=base, pm=pm, delta=export_lora(pm, root, base, "a"))


@pytest.fixture
def ids():
    return np.random.default_rng(0).integers(3, 256, size=(2, 11)).tolist()  # 11 tokens > window 4


def test_card(g3):
    cfg = edgeadapt.load(g3["base"], engine="numpy")._engine.cfg
    assert (cfg.arch, cfg.swa_layers, cfg.sliding_window, cfg.rope_theta_swa, cfg.rope_scale) == ("gemma3", [0], 4, 1000.0, 2.0)
    assert cfg.attn_scale == pytest.approx(20 ** -0.5) and cfg.final_softcap == 3.0 and cfg.embed_scale == 8.0


@pytest.mark.parametrize("engine", ENGINES)
def test_logits_match_transformers(g3, ids, engine):
    check_logits(g3["base"], g3["model"], engine, ids)


@pytest.mark.parametrize("engine", ENGINES)
def test_left_padded_batch(g3, engine):
    check_left_padded(g3["base"], g3["model"], engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_cached_decode_step(g3, ids, engine):
    check_cached_decode(g3["base"], g3["model"], engine, ids)


@pytest.mark.parametrize("mode", ["merge", "live"])
@pytest.mark.parametrize("engine", ENGINES)
def test_lora_matches_peft(g3, ids, engine, mode):
    check_lora(g3["base"], g3["delta"], g3["pm"], g3["model"], engine, mode, ids)


@pytest.mark.parametrize("engine", ENGINES)
def test_greedy_generation_matches_transformers(g3, engine):
    check_greedy(g3["base"], g3["model"], engine, [5, 17, 42, 99, 7, 8], 10)


def test_window_matters(g3, ids):
    """The window is really exercised: without it the logits past the window differ."""
    from edgeadapt.runtime.numpy_engine.engine import NumpyEngine
    import dataclasses

    m = edgeadapt.load(g3["base"], engine="numpy")
    cfg = dataclasses.replace(m._engine.cfg, sliding_window=None)
    eng = NumpyEngine(g3["base"] / "model.gguf", cfg)
    x = np.asarray(ids)
    full = eng.forward(x, np.ones_like(x), np.broadcast_to(np.arange(x.shape[1]), x.shape).copy())[0]
    assert np.abs(full[:, WINDOW:] - m.logits(ids)[:, WINDOW:]).max() > 1e-2


def test_llama_cpp_agrees(tmp_path):
    """llama.cpp loads our GGUF and gives our greedy tokens. llama.cpp's gemma3 fixes what our card
    carries as data (every 6th layer global, rope base 10000 on windowed layers, 1/√head_dim), so
    this model uses those values: 6 layers, query_pre_attn_scalar = head_dim, no softcap."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install llama-cpp-python)")
    model = make_gemma3(3, num_hidden_layers=6, layer_types=None, query_pre_attn_scalar=24, final_logit_softcapping=None,
                        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    byte_tokenizer(hf, bos=1, eos=2, pad=0)
    from arch_common import cli

    cli("export-base", hf, tmp_path / "base", "--gguf-type", "F32", "--no-onnx")
    prompt = [5, 17, 42, 99, 7, 8, 9, 10]  # 8 tokens > window 4
    ours = edgeadapt.load(tmp_path / "base", engine="numpy")
    got = ours.generate_ids(prompt, max_new_tokens=8)
    theirs = llama_cpp_greedy(tmp_path / "base" / "model.gguf", prompt, len(got) or 1)
    want = greedy_hf(model, prompt, 8)
    want = want[: want.index(2)] if 2 in want else want
    assert got == want
    assert theirs[: len(got)] == got
