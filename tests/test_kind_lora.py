"""Plain PEFT LoRA (rsLoRA, rank_pattern, alpha_pattern; a second adapter on a subset of layers) through the
CLI into a delta file, on both engines, merged and live, against PEFT's own forward (README's kinds table)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import edgeadapt
from edgeadapt.cli import main

from conftest import ENGINES, torch_logits

CASES = [pytest.param(e, m, id=f"lora_{e}_{m}") for e in ENGINES for m in ("merge", "live")]


@pytest.fixture(scope="module")
def cli_files(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_cli")
    out = {}
    for key in ("a", "b"):
        path = root / f"{key}.gguf"
        res = CliRunner().invoke(main, ["export-adapter", str(tiny["root"] / f"peft_{key}"), "--base", str(tiny["base"]),
                                        "-o", str(path), "--name", key])
        assert res.exit_code == 0, res.output
        out[key] = path
    return out


@pytest.mark.parametrize("engine,mode", CASES)
def test_kind(tiny, ids, cli_files, engine, mode):
    m = edgeadapt.load(tiny["base"], engine=engine, mode=mode)
    for key in ("a", "b"):
        m.add_adapter(cli_files[key])
    for key in ("a", "b"):
        want = torch_logits(tiny[f"peft_{key}"], ids)
        assert np.abs(want - torch_logits(tiny["model"], ids)).max() > 0.05, "the adapter must matter"
        m.use(key)
        assert m.mode == mode
        np.testing.assert_allclose(m.logits(ids), want, atol=1e-4, rtol=0)
    m.use(None)
    np.testing.assert_allclose(m.logits(ids), torch_logits(tiny["model"], ids), atol=1e-4, rtol=0)
