"""Tiny models built in memory, exported once per session, shared by the tests."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ENGINES = ["ort", "numpy"]
SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def make_model(kind: str = "llama", seed: int = 0, **over):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(**{**SIZES, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, **over})
        model = LlamaForCausalLM(cfg)
    else:
        cfg = Qwen2Config(**{**SIZES, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, **over})
        model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # non-trivial weights: the default init is nearly zero
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


def add_lora(model, seed: int, **cfg):
    """A PEFT LoRA with non-zero B (random init), returned with its own copy of the base."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    conf = dict(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.0)
    conf.update(cfg)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(**conf))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.mul_(3.0)
    return pm.eval()


def torch_logits(model, ids, mask=None) -> np.ndarray:
    ids_t = torch.tensor(ids)
    kw = {}
    if mask is not None:
        m = torch.tensor(mask)
        kw = dict(attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return model(ids_t, **kw).logits.float().numpy()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny llama, its HF folder, its exported base folder and two PEFT adapters (converted)."""
    from edgeadapt.converters.export_base import export_base
    from edgeadapt.converters.peft.lora import convert_peft

    root = tmp_path_factory.mktemp("tiny")
    model = make_model("llama")
    model.save_pretrained(root / "hf")
    manifest = export_base(root / "hf", root / "base", gguf_type="F32")
    a = add_lora(model, 1, use_rslora=True, rank_pattern={"v_proj": 4, "down_proj": 6}, alpha_pattern={"o_proj": 5})
    b = add_lora(model, 2, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "gate_proj"])
    a.save_pretrained(root / "peft_a")
    b.save_pretrained(root / "peft_b")
    convert_peft(root / "peft_a", manifest, root / "a.gguf", name="a")
    convert_peft(root / "peft_b", manifest, root / "b.gguf", name="b")
    return dict(root=root, model=model, peft_a=a, peft_b=b, base=root / "base", a=root / "a.gguf", b=root / "b.gguf",
                manifest=manifest)


@pytest.fixture
def ids():
    rng = np.random.default_rng(0)
    return rng.integers(3, 256, size=(2, 9)).tolist()
