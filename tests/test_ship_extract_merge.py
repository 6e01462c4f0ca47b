"""Full fine-tune -> delta by truncated SVD (extract), and adapters folded into a new base folder (merge)."""

from __future__ import annotations

import copy
import json
import re

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

import edgeadapt
from edgeadapt.cli import main
from edgeadapt.converters.extract import choose_rank, extract_delta, extract_report
from edgeadapt.converters.merge import base_weights, merge_adapters, merge_report
from edgeadapt.formats.delta import read_delta
from edgeadapt.errors import AdapterMismatchError, IntegrityError
from edgeadapt.formats.fingerprint import fingerprint
from edgeadapt.formats.manifest import read_manifest

from conftest import torch


@pytest.fixture(scope="module")
def finetunes(tiny, tmp_path_factory):
    """HF folders: the tiny base with PEFT adapter b merged in (rank 4 on q, k, gate); the same plus
    full-rank noise on every linear weight and a changed norm."""
    root = tmp_path_factory.mktemp("ft")
    exact = copy.deepcopy(tiny["peft_b"]).merge_and_unload()
    exact.save_pretrained(root / "exact")
    noisy = copy.deepcopy(exact)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in noisy.named_parameters():
            if n.endswith("proj.weight"):
                p.add_(1e-3 * torch.randn(p.shape, generator=g))
        noisy.model.norm.weight.mul_(1.01)
    noisy.save_pretrained(root / "noisy")
    return root


def test_choose_rank():
    s = np.array([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert [choose_rank(s, None, e, None) for e in (0.5, 0.9, 0.93, 1.0)] == [1, 2, 3, 3]
    assert choose_rank(s, 2, None, None) == 2 and choose_rank(s, 8, None, None) == 3
    assert choose_rank(s, None, 1.0, 2) == 2


def test_extract_recovers_a_merged_lora(tiny, finetunes, tmp_path):
    r = extract_delta(finetunes / "exact", tiny["base"], tmp_path / "x.gguf", rank=4, name="x")
    ref = read_delta(tiny["b"])
    assert sorted(r.ranks) == sorted(ref.targets) and set(r.ranks.values()) == {4}
    assert len(r.untouched) == 2 * 7 + 1 - len(ref.targets) and r.not_carried == []  # + output.weight (untied)
    for t in ref.targets:  # ΔW = B@A of the PEFT adapter, up to float32 rounding of W_ft - W
        np.testing.assert_allclose(r.delta.delta(t), ref.delta(t), atol=2e-6, rtol=0)
        assert r.energy[t] == pytest.approx(1.0, abs=1e-6)
    rep = extract_report(r, tiny["base"], engine="numpy")
    assert rep.agreement == 1.0 and rep.max_abs_logit_error < 1e-3


def test_extract_by_energy_reports_what_it_cannot_carry(tiny, finetunes, tmp_path):
    r = extract_delta(finetunes / "noisy", tiny["base"], tmp_path / "n.gguf", energy=0.99, max_rank=32, dtype="int8")
    assert len(r.ranks) == 14 and r.untouched == ["output.weight"]  # no noise there
    assert all(e >= 0.99 or r.ranks[t] == 32 for t, e in r.energy.items())
    assert [t for t, _ in r.not_carried] == ["output_norm.weight"]
    assert r.delta.quant == "int8" and r.delta.source.startswith("extracted by truncated SVD from the fine-tune noisy (energy=0.99 max_rank=32")


def test_extract_refuses_another_architecture(finetunes, tmp_path):
    from conftest import make_model
    from edgeadapt.converters.export_base import export_base

    make_model("llama", seed=3, intermediate_size=96).save_pretrained(tmp_path / "hf3")
    export_base(tmp_path / "hf3", tmp_path / "base3", gguf_type="F32", onnx=False)
    with pytest.raises(AdapterMismatchError, match=r"is not a fine-tune of the base .*:\n  ffn_dim: base 96, fine-tuned 128"):
        extract_delta(finetunes / "exact", tmp_path / "base3", tmp_path / "y.gguf", rank=2)


def test_cli_extract(tiny, finetunes, tmp_path):
    res = CliRunner().invoke(main, ["extract", str(finetunes / "exact"), "--base", str(tiny["base"]), "-o",
                                    str(tmp_path / "e.gguf"), "--energy", "0.999", "--engine", "numpy"])
    assert res.exit_code == 0, res.output
    assert re.match(r"wrote .*e\.gguf \([\d,]+ bytes\): 6 weights, rank 4…4 \(median 4\), energy kept", res.output)
    assert "unchanged linear weights left out: 9" in res.output
    assert "error report  extracted delta (F32, ranks 4…4) vs the full fine-tune's linear-weight deltas" in res.output


# ---- merge
def test_merge_equals_applying_the_adapters(tiny, tmp_path, ids):
    out = tmp_path / "merged"
    man = merge_adapters(tiny["base"], [(tiny["a"], 0.7), (tiny["b"], 0.3)], out)
    a, b = read_delta(tiny["a"]), read_delta(tiny["b"])
    assert man.fingerprint != tiny["manifest"].fingerprint
    assert read_manifest(out).fingerprint == man.fingerprint == fingerprint(base_weights(read_manifest(out)).weights)
    mf = read_manifest(out).merged_from
    assert mf["base"]["fingerprint"] == tiny["manifest"].fingerprint
    assert [(x["name"], x["version"], x["weight"], x["integrity"]) for x in mf["adapters"]] == \
        [("a", 1, 0.7, a.integrity), ("b", 1, 0.3, b.integrity)]
    r = gguf.GGUFReader(str(out / "model.gguf"))
    assert r.fields["edgeadapt.base.fingerprint"].contents() == man.fingerprint
    assert json.loads(r.fields["edgeadapt.merged_from"].contents())["adapters"][1]["name"] == "b"
    for engine in ("numpy", "ort"):
        ref = edgeadapt.load(tiny["base"], engine=engine, mode="merge")
        ref.add_adapter(a, name="a")
        ref.add_adapter(b, name="b")
        ref.use({"a": 0.7, "b": 0.3})
        assert np.array_equal(edgeadapt.load(out, engine=engine).logits(ids), ref.logits(ids)), engine
    m = edgeadapt.load(out, engine="numpy")
    with pytest.raises(AdapterMismatchError, match="base fingerprint: the adapter was made for"):
        m.add_adapter(tiny["a"])  # the merged base is another base: no double counting


def test_merge_requantizes_to_the_base_precision(tiny, tmp_path):
    from edgeadapt.converters.export_base import export_base

    export_base(tiny["root"] / "hf", tmp_path / "q8", gguf_type="Q8_0", onnx=False)
    base_types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "q8" / "model.gguf")).tensors}
    out = tmp_path / "merged"
    merge_adapters(tmp_path / "q8", [(tiny["b"], 1.0)], out)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    assert types == base_types and types["blk.0.attn_q.weight"] == "Q8_0"
    assert read_manifest(out).merged_from["requantized"] == ["Q8_0"]
    rep = merge_report(tmp_path / "q8", [(tiny["b"], 1.0)], out)
    assert rep.max_abs_logit_error > 0 and rep.agreement >= 0.85  # a chaotic random tiny model: see SHIPPING.md for SmolLM2


def test_merge_refuses_a_tampered_base(tiny, tmp_path):
    import shutil

    shutil.copytree(tiny["base"], tmp_path / "base")
    data = tmp_path / "base" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[1000] ^= 0x40
    data.write_bytes(raw)
    with pytest.raises(IntegrityError, match=r"the base weights \(model.onnx.data \(float32\)\) hash to sha256:"):
        merge_adapters(tmp_path / "base", [(tiny["a"], 1.0)], tmp_path / "merged")


def test_cli_merge(tiny, tmp_path):
    res = CliRunner().invoke(main, ["merge", str(tiny["base"]), str(tiny["a"]), f"{tiny['b']}:0.5", "-o",
                                    str(tmp_path / "m"), "--no-onnx"])
    assert res.exit_code == 0, res.output
    assert "+ a v1×1, b v1×0.5" in res.output
    assert "error report  merged base (F32) vs the base with the adapters applied at run time" in res.output
    assert "max |Δlogit|         0\n" in res.output and "greedy agreement     100.00 %" in res.output
