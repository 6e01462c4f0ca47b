"""Delta files of every adapter kind: CLI export, strict round trip, hostile files refused."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from edgeadapt.formats.delta import delta_from_bytes, read_delta, write_delta
from edgeadapt.formats.delta_kinds import KindAdapter, register_kind
from edgeadapt.errors import AdapterMismatchError, FormatError, UnsupportedError

from conftest import torch

peft = pytest.importorskip("peft")

KIND_CONFIGS = ("dora", "ia3", "loha", "lokr")


def _configs():
    from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig

    return {
        "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "k_proj", "down_proj"],
                           init_lora_weights=False),
        "ia3": IA3Config(target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "loha": LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                           rank_pattern={"up_proj": 2}),
        "lokr": LoKrConfig(r=4, alpha=6, target_modules=["q_proj", "k_proj", "down_proj", "gate_proj"]),
    }


def peft_kind(model, config, seed):
    """A PEFT model of this config with trained-looking (random, non-identity) parameters."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if any(k in n for k in ("lora_", "ia3_", "hada_", "lokr_", "vera_lambda")):
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if ("ia3_" in n or "magnitude" in n) else 0.3 * torch.randn_like(p))
    return pm.eval()


@pytest.fixture(scope="module", params=KIND_CONFIGS)
def kind_folder(request, tiny, tmp_path_factory):
    pm = peft_kind(tiny["model"], _configs()[request.param], seed=len(request.param))
    folder = tmp_path_factory.mktemp(request.param)
    pm.save_pretrained(folder)
    return request.param, folder


def test_kind_file_round_trip(tiny, kind_folder, tmp_path):
    from edgeadapt.converters.peft.kinds import convert_peft_kind

    name, folder = kind_folder
    mem = convert_peft_kind(folder, tiny["manifest"], name=name)
    write_delta(tmp_path / "k.gguf", mem)
    back = read_delta(tmp_path / "k.gguf")
    assert type(back) is type(mem) and back.kind == name and back.heads == mem.heads
    back.check_base(tiny["manifest"].arch, tiny["manifest"].fingerprint)
    from edgeadapt.runtime.model import load

    m = load(tiny["base"], engine="numpy")
    for t in mem.targets:
        base = m._engine.base_weight(t)
        np.testing.assert_array_equal(back.delta(t, base), mem.delta(t, base))
    raw = (tmp_path / "k.gguf").read_bytes()
    assert b"edgeadapt-" + name.encode() in raw  # adapter.type: llama.cpp refuses it by name
    # F16 storage reads back within float16 rounding
    write_delta(tmp_path / "h.gguf", mem, dtype="F16")
    half = read_delta(tmp_path / "h.gguf")
    assert half.quant == "F16"
    t = mem.targets[0]
    np.testing.assert_allclose(half.delta(t, m._engine.base_weight(t)), mem.delta(t, m._engine.base_weight(t)),
                               atol=2e-2)


def test_kind_file_refuses_damage(tiny, kind_folder, tmp_path):
    from edgeadapt.converters.peft.kinds import convert_peft_kind

    name, folder = kind_folder
    mem = convert_peft_kind(folder, tiny["manifest"], name=name)
    # NaN written → refused at write time
    bad = copy.deepcopy(mem)
    t = bad.targets[0]
    p = next(iter(bad.params[t]))
    bad.params[t][p] = bad.params[t][p].copy()
    bad.params[t][p].flat[0] = np.nan
    with pytest.raises(FormatError, match=rf"{t}\.{p}: holds NaN or Inf"):
        write_delta(tmp_path / "nan.gguf", bad)
    # an unpaired / missing parameter → refused at read time
    lone = copy.deepcopy(mem)
    drop = sorted(lone.params[t])[0]
    if len(lone.params[t]) > 1:
        del lone.params[t][drop]
        write_delta(tmp_path / "lone.gguf", lone)
        with pytest.raises(FormatError, match=rf"bad {name} parameters:\n  {t}: expected"):
            read_delta(tmp_path / "lone.gguf")
    # a flipped byte → integrity refused
    write_delta(tmp_path / "ok.gguf", mem)
    raw = bytearray((tmp_path / "ok.gguf").read_bytes())
    raw[-5] ^= 0x40
    with pytest.raises(FormatError, match="integrity check failed"):
        delta_from_bytes(bytes(raw), "flipped.gguf")
    # made for another base → refused naming the fingerprint
    other = read_delta(tmp_path / "ok.gguf")
    with pytest.raises(AdapterMismatchError, match="base fingerprint: the adapter was made for"):
        other.check_base(tiny["manifest"].arch, "sha256:" + "0" * 64)


def test_kind_wrong_shape_for_base(tiny, tmp_path):
    from edgeadapt.kinds.lora_family import LohaAdapter

    a = LohaAdapter(name="x", version=1, arch="llama", fingerprint=tiny["manifest"].fingerprint,
                    params={"blk.0.attn_v.weight": {"hada_w1a": np.ones((5, 2), np.float32),
                                                    "hada_w1b": np.ones((2, 64), np.float32),
                                                    "hada_w2a": np.ones((5, 2), np.float32),
                                                    "hada_w2b": np.ones((2, 64), np.float32)}})
    write_delta(tmp_path / "w.gguf", a)
    with pytest.raises(AdapterMismatchError, match=r"blk\.0\.attn_v\.weight: the base tensor is \[32, 64\], "
                                                   r"the loha parameters fit \[5, 64\]"):
        read_delta(tmp_path / "w.gguf").check_base(tiny["manifest"].arch, tiny["manifest"].fingerprint)


def test_unknown_kind_is_named(tiny, tmp_path):
    @register_kind
    class Odd(KindAdapter):
        kind = "odd_test_kind"
        PARAMS = {"w": (1,)}

        def base_shape(self, target):
            return None

    a = Odd(name="o", version=1, arch="llama", fingerprint="f", params={"x": {"w": np.ones(3, np.float32)}})
    write_delta(tmp_path / "o.gguf", a)
    assert type(read_delta(tmp_path / "o.gguf")) is Odd
    from edgeadapt.formats import delta_kinds

    del delta_kinds.KINDS["odd_test_kind"]
    with pytest.raises(UnsupportedError, match="adapter kind 'odd_test_kind' is not supported by this version"):
        read_delta(tmp_path / "o.gguf")


def test_lora_file_unchanged_and_llama_cpp_type(tiny):
    d = read_delta(tiny["a"])
    assert d.kind == "lora" and d.metadata["adapter.type"] == "lora" and not d.biases
