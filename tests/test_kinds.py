"""PEFT's other adapter kinds (DoRA, IA3, LoHa, LoKr, VeRA, LoRA with lora_bias): exported with the CLI to
delta files, run on both engines merged and live (and per row, kinds mixed in one batch), and compared
with PEFT's own forward in torch."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import edgeadapt
from edgeadapt.errors import UnsupportedError

from conftest import ENGINES, torch, torch_logits

peft = pytest.importorskip("peft")

KINDS = ("dora", "dora_rslora", "ia3", "loha", "lokr", "vera", "lora_bias")


def _configs():
    from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, VeraConfig

    return {
        "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "k_proj", "down_proj"],
                           init_lora_weights=False),
        "dora_rslora": LoraConfig(r=8, lora_alpha=4, use_dora=True, use_rslora=True, target_modules="all-linear",
                                  init_lora_weights=False),
        "ia3": IA3Config(target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "loha": LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                           rank_pattern={"up_proj": 2}),
        "lokr": LoKrConfig(r=4, alpha=6, target_modules=["q_proj", "k_proj", "down_proj", "gate_proj"]),
        "vera": VeraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj"], save_projection=True),
        "lora_bias": LoraConfig(r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "k_proj", "up_proj"],
                                init_lora_weights=False),
    }


def _peft(model, config, seed):
    from peft import get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():  # trained-looking parameters: PEFT initialises most kinds to a no-op
        for n, p in pm.named_parameters():
            if any(k in n for k in ("lora_", "ia3_", "hada_", "lokr_", "vera_lambda")):
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if ("ia3_" in n or "magnitude" in n) else 0.3 * torch.randn_like(p))
    return pm.eval()


def _export(folder, base, out):
    from click.testing import CliRunner

    from edgeadapt.cli import main

    res = CliRunner().invoke(main, ["export-adapter", str(folder), "--base", str(base), "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def kinds(tiny, tmp_path_factory):
    """kind -> (PEFT model, delta file written by `edgeadapt export-adapter`)."""
    root = tmp_path_factory.mktemp("kinds")
    out = {}
    for i, name in enumerate(KINDS):
        pm = _peft(tiny["model"], _configs()[name], seed=10 + i)
        pm.save_pretrained(root / name)
        out[name] = (pm, _export(root / name, tiny["base"], root / f"{name}.gguf"))
    return out


# lora_bias on onnxruntime runs live only (no bias input in the merge graph): see the test after test_kind
CASES = [pytest.param(k, e, m, id=f"{k}_{e}_{m}") for k in KINDS for e in ENGINES for m in ("merge", "live")
         if (k, e, m) != ("lora_bias", "ort", "merge")]


@pytest.mark.parametrize("name,engine,mode", CASES)
def test_kind(tiny, ids, kinds, name, engine, mode):
    pm, path = kinds[name]
    m = edgeadapt.load(tiny["base"], engine=engine, mode=mode)
    m.add_adapter(path)
    want = torch_logits(pm, ids)
    assert np.abs(want - torch_logits(tiny["model"], ids)).max() > 0.05, "the adapter must matter"
    m.use(name)
    assert m.mode == mode
    np.testing.assert_allclose(m.logits(ids), want, atol=1e-4, rtol=0)
    m.use(None)
    np.testing.assert_allclose(m.logits(ids), torch_logits(tiny["model"], ids), atol=1e-4, rtol=0)


def test_lora_bias_merge_on_onnxruntime_is_refused(tiny, kinds):
    m = edgeadapt.load(tiny["base"], engine="ort", mode="merge")
    m.add_adapter(kinds["lora_bias"][1])
    with pytest.raises(UnsupportedError, match=r"change biases \(lora_bias\), which onnxruntime runs live only"):
        m.use("lora_bias")
    assert m.active == {}


@pytest.mark.parametrize("engine", ENGINES)
def test_kind_per_row_mixed(tiny, kinds, engine):
    """One batch, one adapter per row — every kind and the bare base — each row as PEFT computes it alone."""
    rows = ["dora", "ia3", None, "loha", "lokr", "lora_bias", "vera"]
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 256, size=(len(rows), 7)).tolist()
    m = edgeadapt.load(tiny["base"], engine=engine, mode="live")
    for n in rows:
        if n:
            m.add_adapter(kinds[n][1])
    got = m.logits(ids, adapters=rows)
    for i, n in enumerate(rows):
        want = torch_logits(kinds[n][0] if n else tiny["model"], [ids[i]])[0]
        np.testing.assert_allclose(got[i], want, atol=1e-4, rtol=0, err_msg=f"row {i} ({n})")


@pytest.mark.parametrize("engine", ENGINES)
def test_kind_live_generation_matches_merged(tiny, kinds, engine):
    """Decoding with a kv cache through the scale / bias slots gives the merged adapter's tokens."""
    live = edgeadapt.load(tiny["base"], engine=engine, mode="live")
    merged = edgeadapt.load(tiny["base"], engine=engine, mode="merge")
    prompt = [5, 17, 99, 3]
    for m in (live, merged):
        m.add_adapter(kinds["dora"][1])
        m.use("dora")
    assert live.mode == "live" and merged.mode == "merge"
    assert live.generate_ids(prompt, 8) == merged.generate_ids(prompt, 8)


@pytest.mark.parametrize("engine", ENGINES)
def test_kinds_stack_like_their_merge(tiny, ids, kinds, engine):
    """Stacked live (DoRA + LoHa + LoRA + IA3, weighted) = the same set merged: W + Σ wᵢ ΔWᵢ from the immutable
    base. DoRA's output scale and IA3's input scale on one layer (ffn_down) have no exact live form: live mode
    refuses that set naming the layer, auto mode merges it."""
    live, auto, merged = (edgeadapt.load(tiny["base"], engine=engine, mode=mode) for mode in ("live", "auto", "merge"))
    for m in (live, auto, merged):
        for n in ("dora", "loha", "ia3"):
            m.add_adapter(kinds[n][1])
        m.add_adapter(tiny["a"], name="a")
    spec = {"dora": 0.7, "loha": 1.0, "a": 0.5, "ia3": -0.5}
    for m in (live, merged):
        m.use({k: w for k, w in spec.items() if k != "ia3"})
    assert live.mode == "live" and merged.mode == "merge"
    np.testing.assert_allclose(live.logits(ids), merged.logits(ids), atol=1e-4, rtol=0)
    live.use({"loha": 0.3, "a": 0.5, "ia3": -0.5})  # IA3 with kinds that do not scale the same layers: live
    merged.use({"loha": 0.3, "a": 0.5, "ia3": -0.5})
    assert live.mode == "live"
    np.testing.assert_allclose(live.logits(ids), merged.logits(ids), atol=1e-4, rtol=0)
    with pytest.raises(UnsupportedError, match="ffn_down.weight: an input scale and an output scale"):
        live.use(spec)
    assert live.active == {"loha": 0.3, "a": 0.5, "ia3": -0.5}  # a refused use() changes nothing
    auto.use({"a": 0.5})  # first live: on onnxruntime, auto moves to model_live.onnx (weights fused in-graph)
    before = auto.logits(ids)
    auto.use(spec)
    merged.use(spec)
    assert auto.mode == "merge"
    if engine == "ort":  # model_live.onnx cannot take weight overrides: the merge runs on model.onnx
        assert auto._engine.graph == "model.onnx"
    np.testing.assert_allclose(auto.logits(ids), merged.logits(ids), atol=1e-4, rtol=0)
    auto.use({"a": 0.5})  # and back to live, on the live graph with the base weights
    assert auto.mode == "live" and (engine != "ort" or auto._engine.graph == "model_live.onnx")
    np.testing.assert_array_equal(auto.logits(ids), before)


def test_inspect_says_kind_and_forms(tiny, kinds):
    from click.testing import CliRunner

    from edgeadapt.cli import main

    res = CliRunner().invoke(main, ["inspect", str(kinds["dora"][1])])
    assert res.exit_code == 0, res.output
    assert "kind dora" in res.output
    assert "runs          merged: yes, live: yes, needs the unquantized base" in res.output
    res = CliRunner().invoke(main, ["inspect", str(kinds["lora_bias"][1])])
    assert "rank          4, with bias changes" in res.output


def test_unsupported_kind_is_named(tiny, tmp_path):
    from peft import OFTConfig, get_peft_model

    from edgeadapt.converters.peft.kinds import convert_peft_kind

    pm = get_peft_model(copy.deepcopy(tiny["model"]), OFTConfig(oft_block_size=16, r=0, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedError, match=r"PEFT kind 'OFT' is not supported by this converter; supported: "
                                               r"LORA \(use_dora\), IA3, LOHA, LOKR, VERA"):
        convert_peft_kind(tmp_path, tiny["manifest"])


def test_unsupported_options_are_named(tiny, tmp_path):
    from peft import LoHaConfig, LoraConfig, get_peft_model

    from edgeadapt.converters.peft.kinds import convert_peft_kind

    pm = get_peft_model(copy.deepcopy(tiny["model"]), LoHaConfig(r=2, target_modules=["q_proj"],
                                                                 use_effective_conv2d=True))
    pm.save_pretrained(tmp_path / "loha")
    with pytest.raises(UnsupportedError, match="loha option use_effective_conv2d=True is not supported"):
        convert_peft_kind(tmp_path / "loha", tiny["manifest"])
    pm = get_peft_model(copy.deepcopy(tiny["model"]), LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "dora_bias")  # PEFT refuses this pair itself; a hand-edited config may not
    cfg = tmp_path / "dora_bias" / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"lora_bias": false', '"lora_bias": true'))
    assert '"lora_bias": true' in cfg.read_text()
    with pytest.raises(UnsupportedError, match="option lora_bias=True with use_dora is not supported"):
        convert_peft_kind(tmp_path / "dora_bias", tiny["manifest"])
