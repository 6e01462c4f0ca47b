"""Smaller deltas: quantized factor storage (F16, Q8_0, int8, int4), version-1 compatibility,
and the error report of ``export-adapter --quant``."""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from edgeadapt.cli import main
from edgeadapt.formats.delta import (LoraDelta, dequantize_rows, parse_gguf, quantize_rows, read_delta, write_delta)
from edgeadapt.errors import FormatError, UnsupportedError

FIXTURES = Path(__file__).parent / "fixtures"
FP = "sha256:" + "ab" * 32


def _factors(seed: int = 0, r: int = 8, out: int = 64, inp: int = 128, scale: float = 0.02):
    rng = np.random.default_rng(seed)
    return {"blk.0.attn_q.weight": (rng.normal(size=(r, 64)).astype(np.float32),
                                    (scale * rng.normal(size=(64, r))).astype(np.float32)),
            "blk.1.ffn_down.weight": (rng.normal(size=(r, inp)).astype(np.float32),
                                      (scale * rng.normal(size=(out, r))).astype(np.float32))}


def _write(path, factors, dtype, **kw):
    write_delta(path, arch="llama", fingerprint=FP, name="q", version=3, factors=factors, dtype=dtype, **kw)
    return read_delta(path)


# ---- grouped integers, by hand
def test_int8_codes_by_hand():
    codes, scales = quantize_rows(np.array([[127.0, -63.5, 0.0, 1.0]], np.float32), 8, 4)
    assert codes.tolist() == [[127, -64, 0, 1]] and scales.dtype == np.float16 and scales.tolist() == [[1.0]]
    assert dequantize_rows(codes, scales, 8, 4).tolist() == [[127.0, -64.0, 0.0, 1.0]]


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    x = np.arange(-8, 8, dtype=np.float32)[None]  # the extreme -8 maps to code -8: scale exactly 1
    codes, scales = quantize_rows(x, 4, 16)
    assert codes.view(np.uint8).tolist() == [[0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]]
    assert scales.tolist() == [[1.0]]
    assert dequantize_rows(codes, scales, 4, 16).tolist() == x.tolist()


def test_short_last_group_and_float32_scales_for_tiny_values():
    rng = np.random.default_rng(1)
    x = (1e-7 * rng.normal(size=(3, 40))).astype(np.float32)  # scales below float16's normal range
    codes, scales = quantize_rows(x, 8, 32)
    assert codes.shape == (3, 40) and scales.shape == (3, 2) and scales.dtype == np.float32
    back = dequantize_rows(codes, scales, 8, 32)
    step = np.repeat(scales, 32, axis=1)[:, :40]
    assert np.all(np.abs(back - x) <= step / 2 * (1 + 1e-6))


# ---- files
@pytest.mark.parametrize("dtype", ["F32", "F16", "Q8_0", "int8", "int4"])
def test_round_trip_is_exactly_the_stored_values(tmp_path, dtype):
    f = _factors()
    d = _write(tmp_path / "d.gguf", f, dtype)
    assert d.quant == dtype and d.format_version == 2 and d.signature == ""
    for w, (a, b) in f.items():
        ga, gb = d.factors[w]
        assert ga.dtype == gb.dtype == np.float32 and ga.shape == a.shape and gb.shape == b.shape
        if dtype == "F32":
            want_a, want_b = a, b
        elif dtype == "F16":
            want_a, want_b = a.astype(np.float16).astype(np.float32), b.astype(np.float16).astype(np.float32)
        elif dtype == "Q8_0":  # A's rows are multiples of 32: Q8_0; B's rank 8 is not: F16 (llama.cpp's rule)
            T = gguf.GGMLQuantizationType.Q8_0
            want_a = gguf.quants.dequantize(gguf.quants.quantize(a, T), T)
            want_b = b.astype(np.float16).astype(np.float32)
        else:
            bits = 8 if dtype == "int8" else 4
            want_a = dequantize_rows(*quantize_rows(a, bits, 32), bits, 32)
            want_b = dequantize_rows(*quantize_rows(np.ascontiguousarray(b.T), bits, 32), bits, 32).T
        assert np.array_equal(ga, want_a) and np.array_equal(gb, want_b)


def test_llama_cpp_sees_lora_only_for_types_it_reads(tmp_path):
    types = {}
    for dtype in ("F32", "F16", "Q8_0", "int8", "int4"):
        _write(tmp_path / f"{dtype}.gguf", _factors(), dtype)
        c = parse_gguf((tmp_path / f"{dtype}.gguf").read_bytes(), dtype)
        types[dtype] = (c.fields["adapter.type"].value, sorted({t.ttype.name for t in c.tensors}))
    assert types == {"F32": ("lora", ["F32"]), "F16": ("lora", ["F16"]), "Q8_0": ("lora", ["F16", "Q8_0"]),
                     "int8": ("edgeadapt-int8-lora", ["F16", "I8"]), "int4": ("edgeadapt-int4-lora", ["F16", "I8"])}


def test_sizes_follow_the_bits(tmp_path):
    f = {"blk.0.ffn_up.weight": (np.ones((8, 512), np.float32), np.full((1024, 8), 0.01, np.float32))}
    sizes = {q: (_write(tmp_path / f"{q}.gguf", f, q), (tmp_path / f"{q}.gguf").stat().st_size)[1]
             for q in ("F32", "int8", "int4")}
    n = 8 * 512 + 1024 * 8  # 12,288 values; scales: (512 + 1024) / 32 per rank row, float16
    header = sizes["F32"] - 4 * n
    assert sizes["int8"] - header == pytest.approx(n + 2 * 8 * 48, abs=200)
    assert sizes["int4"] - header == pytest.approx(n // 2 + 2 * 8 * 48, abs=200)


def test_version_1_files_are_still_read():
    d = read_delta(FIXTURES / "delta_v1.gguf")
    assert (d.name, d.version, d.format_version, d.quant, d.signature) == ("legacy", 7, 1, "F32", "")
    rng = np.random.default_rng(0)  # how the fixture was made (edgeadapt 0.1.0)
    a0, b0 = rng.normal(size=(2, 8)).astype(np.float32), rng.normal(size=(8, 2)).astype(np.float32)
    assert np.array_equal(d.factors["blk.0.attn_q.weight"][0], a0) and np.array_equal(d.factors["blk.0.attn_q.weight"][1], b0)
    assert read_delta(FIXTURES / "delta_v1_f16.gguf").quant == "F16"


def test_writer_refuses_what_it_cannot_store(tmp_path):
    odd = {"blk.0.attn_q.weight": (np.ones((2, 63), np.float32), np.ones((64, 2), np.float32))}
    with pytest.raises(FormatError, match=r"int4 packs two values per byte and needs even in/out sizes, found \[64, 63\]"):
        _write(tmp_path / "x.gguf", odd, "int4")
    with pytest.raises(FormatError, match="group size must be even and in 2…4096, found 3"):
        _write(tmp_path / "x.gguf", _factors(), "int8", group_size=3)
    with pytest.raises(UnsupportedError, match="choose one of F32, F16, Q8_0, int8, int4"):
        _write(tmp_path / "x.gguf", _factors(), "Q4_K")


# ---- the error report
def _small_delta(tiny, scale: float) -> dict:
    """A LoRA on every linear weight of the tiny base, ΔW about ``scale`` of W (like a trained adapter)."""
    rng = np.random.default_rng(5)
    return {w: ((rng.normal(size=(8, i)) / np.sqrt(i)).astype(np.float32),
                (scale * 0.1 * rng.normal(size=(o, 8))).astype(np.float32))
            for w, (o, i) in tiny["manifest"].arch.linear_shapes().items()}


@pytest.mark.parametrize("dtype,least", [("F32", 1.0), ("int8", 0.99), ("int4", 0.9)])
def test_report_measures_the_quantized_delta(tiny, tmp_path, dtype, least):
    from edgeadapt.converters.quant_report import compare_deltas

    man = tiny["manifest"]
    f = _small_delta(tiny, 0.05)
    ref = LoraDelta(name="r", version=1, arch="llama", fingerprint=man.fingerprint, factors=f)
    write_delta(tmp_path / "q.gguf", arch="llama", fingerprint=man.fingerprint, name="q", version=1, factors=f, dtype=dtype)
    rep = compare_deltas(tiny["base"], ref, read_delta(tmp_path / "q.gguf"), label=dtype, engine="numpy")
    assert rep.positions == 8 * 25 and rep.prompts == 8
    assert rep.agreement >= least
    if dtype == "F32":
        assert rep.max_abs_logit_error == 0.0
    else:
        assert 0 < rep.max_abs_logit_error < 1.0


def test_export_adapter_quant_prints_the_report(tiny, tmp_path):
    out = tmp_path / "a8.gguf"
    res = CliRunner().invoke(main, ["export-adapter", str(tiny["root"] / "peft_a"), "--base", str(tiny["base"]),
                                    "-o", str(out), "--quant", "int8"])
    assert res.exit_code == 0, res.output
    assert read_delta(out).quant == "int8"
    lines = res.output.splitlines()
    assert lines[1] == "error report  int8 delta vs the fp32 adapter"
    assert lines[2] == f"  size                 {out.stat().st_size:,} bytes"
    st = (tiny["root"] / "peft_a" / "adapter_model.safetensors").stat().st_size
    assert lines[3] == f"    = {out.stat().st_size / st:.3f}× adapter_model.safetensors (fp32 PEFT) ({st:,} bytes)"
    assert re.fullmatch(r"  greedy agreement     \d+\.\d\d % \(\d+/200 positions, 8 prompts, teacher-forced on the "
                        r"reference's greedy tokens\)", lines[7])
