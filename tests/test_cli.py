"""The command line: export-base, export-adapter, inspect, generate — as a user types them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgeadapt.cli import main

from conftest import make_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    make_model("qwen2", seed=3, intermediate_size=96).save_pretrained(d / "hf")
    return d


def test_export_base_adapter_inspect(hf_dir, tiny):
    r = CliRunner()
    res = r.invoke(main, ["export-base", str(hf_dir / "hf"), str(hf_dir / "base"), "--gguf-type", "F16"])
    assert res.exit_code == 0, res.output
    assert "qwen2 2 layers dim 64" in res.output
    man = json.loads((hf_dir / "base" / "manifest.json").read_text())
    assert man["arch"]["qkv_bias"] and man["arch"]["tied_embeddings"] and man["gguf_type"] == "F16"
    assert {"onnx", "gguf"} <= set(man["files"])

    res = r.invoke(main, ["inspect", str(hf_dir / "base")])
    assert res.exit_code == 0 and "qwen2: 2 layers" in res.output, res.output

    res = r.invoke(main, ["export-adapter", str(tiny["root"] / "peft_a"), "--base", str(tiny["base"]),
                          "-o", str(hf_dir / "a.gguf"), "--name", "billing", "--version", "3"])
    assert res.exit_code == 0, res.output
    res = r.invoke(main, ["inspect", str(hf_dir / "a.gguf")])
    assert res.exit_code == 0, res.output
    assert "'billing' version 3" in res.output and tiny["manifest"].fingerprint in res.output
    assert "attn_k, attn_output, attn_q, attn_v, ffn_down, ffn_gate, ffn_up in 2 layers" in res.output
    assert "rank          [4, 6, 8]" in res.output


def test_export_adapter_for_wrong_base_is_refused(hf_dir, tiny):
    """An adapter converted against a base of other shapes: refused by name, exit code 2, no traceback."""
    r = CliRunner()
    if not (hf_dir / "base" / "manifest.json").exists():
        r.invoke(main, ["export-base", str(hf_dir / "hf"), str(hf_dir / "base")])
    res = r.invoke(main, ["export-adapter", str(tiny["root"] / "peft_a"), "--base", str(hf_dir / "base"),
                          "-o", str(hf_dir / "x.gguf")])
    assert res.exit_code == 2
    assert "error: the PEFT adapter does not fit this base" in res.output
    assert "model.layers.0.mlp.down_proj: expected lora_A [6, 96] and lora_B [64, 6] (r from the config), found [6, 128] and [64, 6]" in res.output
    assert "Traceback" not in res.output and not (hf_dir / "x.gguf").exists()


def test_inspect_refuses_a_damaged_file(tiny, tmp_path):
    data = bytearray(tiny["a"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "d.gguf").write_bytes(bytes(data))
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "d.gguf")])
    assert res.exit_code == 2 and "integrity check failed" in res.output


def test_runtime_imports_without_torch_or_onnx():
    code = ("import sys\n"
            "for m in ('torch', 'transformers', 'peft', 'onnx', 'safetensors'): sys.modules[m] = None\n"
            "import edgeadapt, edgeadapt.runtime.model, edgeadapt.runtime.ort_engine.engine, edgeadapt.runtime.numpy_engine.engine\n"
            "import edgeadapt.formats.delta, edgeadapt.formats.manifest\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'transformers') and sys.modules[m]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_export_onnx_adapter(tiny, tmp_path):
    import numpy as np

    import edgeadapt

    r = CliRunner()
    res = r.invoke(main, ["export-adapter", str(tiny["root"] / "peft_a"), "--base", str(tiny["base"]),
                          "-o", str(tmp_path / "a.onnx_adapter"), "--format", "onnx_adapter"])
    assert res.exit_code == 0, res.output
    res2 = r.invoke(main, ["export-adapter", str(tiny["a"]), "--base", str(tiny["base"]),
                           "-o", str(tmp_path / "b.onnx_adapter"), "--format", "onnx_adapter"])
    assert res2.exit_code == 0, res2.output
    m = edgeadapt.load(tiny["base"], engine="ort", mode="live")
    m.add_adapter(tmp_path / "a.onnx_adapter", name="x")
    m.add_adapter(tiny["a"], name="y")
    m.use("x")
    one = m.logits([[5, 6, 7]])
    m.use("y")
    np.testing.assert_allclose(one, m.logits([[5, 6, 7]]), atol=1e-6, rtol=0)


def test_adapter_weight_spec():
    from edgeadapt.cli.common import _file_weight

    assert _file_weight("a.gguf:0.5") == ("a.gguf", 0.5)
    assert _file_weight("a.gguf:-1") == ("a.gguf", -1.0)
    assert _file_weight("a.gguf") == ("a.gguf", 1.0)
    assert _file_weight("C:/x/a.gguf") == ("C:/x/a.gguf", 1.0)


def test_export_base_from_a_gguf_without_a_vocabulary(tiny, tmp_path, ids):
    """Our own model.gguf of a folder without a tokenizer says tokenizer.ggml.model = none: exporting from it
    gives a base without a tokenizer (token ids in, logits out), with the same logits."""
    import numpy as np

    import edgeadapt
    from edgeadapt.formats.manifest import read_manifest

    res = CliRunner().invoke(main, ["export-base", str(tiny["base"] / "model.gguf"), str(tmp_path / "again"),
                                    "--gguf-type", "F32"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    man = read_manifest(tmp_path / "again")
    assert man.path("tokenizer") is None and man.fingerprint == tiny["manifest"].fingerprint
    np.testing.assert_array_equal(edgeadapt.load(tmp_path / "again", engine="numpy").logits(ids),
                                  edgeadapt.load(tiny["base"], engine="numpy").logits(ids))


def test_generation_config_eos_ids_join_the_card(hf_dir, tmp_path):
    """Chat models list several eos ids in generation_config.json (config.json has one): generation stops at each."""
    import shutil

    from edgeadapt.formats.arch import ArchConfig
    from edgeadapt.converters.hf import from_hf_folder

    folder = tmp_path / "hf"
    shutil.copytree(hf_dir / "hf", folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "bos_token_id": 1}))
    cfg, _ = from_hf_folder(folder)
    assert cfg.eos_token_ids == [2, 7]
    assert ArchConfig.from_hf(json.loads((folder / "config.json").read_text())).eos_token_ids == [2]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 10 ** 9]}))
    from edgeadapt.errors import FormatError

    with pytest.raises(FormatError, match=r"eos_token_id must be token ids below 256, found \[2, 1000000000\]"):
        from_hf_folder(folder)
