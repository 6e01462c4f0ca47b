"""A base folder is an onnxruntime-genai model: its genai_config.json runs model_lora.onnx, and
adapters written with ``export-adapter --format onnx_adapter`` load through ``og.Adapters``.
Checked against our live path and PEFT, on the fused llama and Qwen3 graphs and the generic GPT-2 graph."""

from __future__ import annotations

import json

import numpy as np
import pytest

import edgeadapt
from edgeadapt.formats.delta import read_delta
from edgeadapt.formats.manifest import read_manifest

from arch_common import add_lora, export, export_lora, randomize
from conftest import torch_logits

og = pytest.importorskip("onnxruntime_genai")

PROMPT = [5, 17, 33, 9, 41]
N_NEW = 10


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("genai_gpt2")
    model = randomize(GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                 bos_token_id=1, eos_token_id=2)), 5, norm_around=1.0)
    base = export(model, root)
    pm = add_lora(model, 6, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    return dict(root=root, base=base, model=model, peft_a=pm, a=export_lora(pm, root, base, "a"))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    from test_arch_qwen3 import make_qwen3  # head_dim 24 over a hidden size of 64, q/k norms

    root = tmp_path_factory.mktemp("genai_qwen3")
    model = make_qwen3()
    base = export(model, root)
    pm = add_lora(model, 6, target_modules="all-linear")
    return dict(root=root, base=base, model=model, peft_a=pm, a=export_lora(pm, root, base, "a"))


@pytest.fixture(params=["llama", "gpt2", "qwen3"])
def family(request):
    return request.getfixturevalue("tiny" if request.param == "llama" else request.param)


def _genai_run(model, adapters, name):
    """Prompt logits [1, T, V] and the greedy continuation, through onnxruntime-genai."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + N_NEW, do_sample=False)
    gen = og.Generator(model, params)
    if name:
        gen.set_active_adapter(adapters, name)
    gen.append_tokens(PROMPT)
    logits = np.asarray(gen.get_output("logits")).copy()
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return logits, out


def test_manifest_lists_the_genai_config(family):
    man = read_manifest(family["base"])
    cfg = json.loads(man.path("genai").read_text())
    dec = cfg["model"]["decoder"]
    assert man.path("onnx_lora").name == dec["filename"]
    assert (dec["num_hidden_layers"], dec["head_size"]) == (man.arch.n_layers, man.arch.head_dim)


def test_genai_runs_the_base_and_our_onnx_adapter(family, tmp_path):
    from edgeadapt.formats.onnx_adapter import write_onnx_adapter

    path = write_onnx_adapter(read_delta(family["a"]), tmp_path / "a.onnx_adapter")
    model = og.Model(str(family["base"]))
    adapters = og.Adapters(model)
    adapters.load(str(path), "a")
    ours = edgeadapt.load(family["base"], engine="ort", mode="live")
    ours.add_adapter(family["a"], name="a")
    for name, reference in ((None, family["model"]), ("a", family["peft_a"])):
        logits, tokens = _genai_run(model, adapters, name)
        ours.use(name)
        np.testing.assert_allclose(logits, ours.logits([PROMPT]), atol=1e-5, rtol=0)
        np.testing.assert_allclose(logits, torch_logits(reference, [PROMPT]), atol=1e-4, rtol=0)
        assert tokens == ours.generate_ids(PROMPT, N_NEW), name
    assert not np.allclose(_genai_run(model, adapters, None)[0], _genai_run(model, adapters, "a")[0], atol=1e-3)


def test_merged_base_carries_a_genai_config(tiny, tmp_path):
    from edgeadapt.converters.merge import merge_adapters

    out = merge_adapters(tiny["base"], [(tiny["a"], 1.0)], tmp_path / "merged")
    model = og.Model(str(out.root))
    logits, _ = _genai_run(model, None, None)
    np.testing.assert_allclose(logits, torch_logits(tiny["peft_a"], [PROMPT]), atol=1e-4, rtol=0)
