"""Adapters on the embeddings and the sequence (embedding LoRA, trainable tokens, modules_to_save, prompt and
prefix tuning): built with PEFT on the tiny Llama, converted, run on both engines and compared with PEFT's
own forward in torch (fp32, 1e-4)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import edgeadapt
from edgeadapt.errors import AdapterMismatchError, UnsupportedError

from conftest import ENGINES, make_model, torch, torch_logits

peft = pytest.importorskip("peft")

TOKENS = [5, 17, 40, 99, 200]  # trainable tokens; the test ids below contain them
N_VIRTUAL = 5


def _ids():
    rng = np.random.default_rng(7)
    ids = rng.integers(3, 256, size=(2, 9))
    ids[0, 2], ids[1, 0], ids[1, 5], ids[0, 7] = 5, 17, 99, 200
    return ids.tolist()


def _configs():
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TrainableTokensConfig

    return {
        "embedding_lora": LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "down_proj"],
                                     init_lora_weights=False),
        "trainable_tokens": TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=TOKENS),
        "lora_trainable_tokens": LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"], init_lora_weights=False,
                                            trainable_token_indices=TOKENS),
        "modules_to_save": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                      init_lora_weights=False),
        "prompt_tuning": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL),
        "prefix_tuning": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL),
    }


def _peft(model, kind, seed):
    from peft import get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(model), _configs()[kind])
    with torch.no_grad():  # trained-looking parameters (PEFT starts most of these as a no-op)
        for n, p in pm.named_parameters():
            if "lora_" in n or "prompt_encoder" in n:
                p.copy_(0.3 * torch.randn_like(p))
            elif "trainable_tokens_delta" in n or "modules_to_save" in n:
                p.add_(0.2 * torch.randn_like(p))
    return pm.eval()


def _peft_logits(pm, kind, ids):
    out = torch_logits(pm, ids)
    return out[:, N_VIRTUAL:] if kind == "prompt_tuning" else out  # PEFT returns the virtual positions too


def _peft_greedy(pm, kind, ids, n):
    """Greedy decoding with PEFT's own forward over the whole sequence at every step (no cache)."""
    seq = [list(ids)]
    for _ in range(n):
        seq[0].append(int(_peft_logits(pm, kind, seq)[0, -1].argmax()))
    return seq[0][len(ids):]


@pytest.fixture(scope="module")
def seq_adapters(tiny, tmp_path_factory):
    """kind -> (kind, PEFT model, converted adapter, PEFT folder), built once per kind."""
    from edgeadapt.converters.peft_seq import convert_peft_seq

    cache = {}

    def get(kind):
        if kind not in cache:
            pm = _peft(tiny["model"], kind, seed=11 + list(_configs()).index(kind))
            folder = tmp_path_factory.mktemp(kind)
            pm.save_pretrained(folder)
            cache[kind] = (kind, pm, convert_peft_seq(folder, tiny["manifest"], name=kind), folder)
        return cache[kind]

    return get


def _mode(kind):
    return "merge" if kind == "modules_to_save" else "live"


def _check_kind(tiny, seq_kind, engine):
    kind, pm, adapter, _ = seq_kind
    ids = _ids()
    m = edgeadapt.load(tiny["base"], engine=engine)
    m.add_adapter(adapter)
    m.use(kind)
    want = _peft_logits(pm, kind, ids)
    base = torch_logits(tiny["model"], ids)
    assert np.abs(want - base).max() > 0.05, "the adapter must matter"
    np.testing.assert_allclose(m.logits(ids), want, atol=1e-4, rtol=0)
    assert m.mode == _mode(kind)
    if kind in ("prompt_tuning", "prefix_tuning"):  # greedy generation through the cache
        assert m.generate_ids(ids[0], 6, adapter=kind) == _peft_greedy(pm, kind, ids[0], 6)
    m.use(None)
    np.testing.assert_allclose(m.logits(ids), base, atol=1e-4, rtol=0)


# ---- one test per kind, engine and how it runs: test_kind_<kind>_<engine>_<merge|live>
def _make_test(kind, engine):
    def test(tiny, seq_adapters):
        _check_kind(tiny, seq_adapters(kind), engine)

    test.__doc__ = f"{kind} on the {engine} engine ({_mode(kind)}) gives PEFT's logits"
    return test


for _kind in _configs():
    for _engine in ENGINES:
        globals()[f"test_kind_{_kind}_{_engine}_{_mode(_kind)}"] = _make_test(_kind, _engine)
