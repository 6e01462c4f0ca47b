"""Hostile input: the readers of delta files, base manifests and PEFT folders refuse every lie with
an EdgeAdaptError — never another exception, a crash, a hang or a huge allocation.

Part one pins the messages for hand-made and fuzz-found files (``fixtures/hostile``). Part two
fuzzes: hypothesis mutates valid files (derandomized in CI, a bounded number of examples; set
``EDGEADAPT_FUZZ_SCALE=20`` for a long random run) and asserts only EdgeAdaptError comes out.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeadapt.converters.peft.lora import lora_factors, read_peft_config, read_peft_tensors
from edgeadapt.formats.delta import UNSIGNED, delta_from_bytes, read_delta, with_signature, write_delta
from edgeadapt.errors import EdgeAdaptError, FormatError, IntegrityError
from edgeadapt.formats.manifest import read_manifest

HOSTILE = Path(__file__).parent / "fixtures" / "hostile"
SCALE = float(os.environ.get("EDGEADAPT_FUZZ_SCALE", "1"))
FUZZ = settings(max_examples=int(400 * SCALE), deadline=None, derandomize=SCALE == 1, database=None,
                suppress_health_check=list(HealthCheck))

# ---- part one: pinned refusals
DELTA_CASES = {
    "truncated_header.gguf": "expected 8 bytes of the tensor count at byte 8, found 2 (truncated file or a lying size)",
    "huge_tensor_count.gguf": "header claims 4611686018427387904 tensors; a 1536-byte file holds at most 64",
    "huge_key_count.gguf": "header claims 4000 metadata keys; a 1536-byte file holds at most 128",
    "lying_string_length.gguf": "expected 2305843009213693952 bytes of the value of 'general.architecture' at byte 64, "
                                "found 32 (truncated file or a lying size)",
    "lying_array_count.gguf": "the value of 'x.tokens' claims 1099511627776 items; only 976 bytes are left",
    "duplicate_key.gguf": "metadata key 'edgeadapt.adapter.name' appears twice",
    "offset_past_end.gguf": "tensor 'blk.0.attn_q.weight.lora_b' claims bytes 1099511627776…1099511628032 of the data "
                            "section; expected an offset aligned to 32 inside the 512 bytes present",
    "misaligned_offset.gguf": "tensor 'blk.0.attn_q.weight.lora_b' claims bytes 250…506 of the data section",
    "overlapping_tensors.gguf": "tensors 'blk.0.attn_q.weight.lora_a' and 'blk.0.attn_q.weight.lora_b' overlap",
    "duplicate_tensor.gguf": "tensor name 'blk.0.attn_q.weight.lora_a' appears twice",
    "unknown_type.gguf": "tensor 'blk.0.attn_q.weight.lora_b' has type id 99, which this reader does not know",
    "five_dims.gguf": "tensor 'blk.0.attn_q.weight.lora_b' has 5 dimensions; GGUF allows 1 to 4",
    "nan_factor.gguf": "bad tensors:\n  blk.0.attn_q.weight: factors hold NaN or Inf",
    "wrong_dtype.gguf": "bad tensors:\n  blk.0.attn_q.weight.lora_a: expected type I8 for int8 factors, found F32",
    "unpaired_factor.gguf": "bad tensors:\n  blk.0.attn_q.weight: expected lora_a, lora_b; found lora_a",
    "rank_mismatch.gguf": "blk.0.attn_q.weight: lora_a [2, 32] and lora_b [64, 1] do not share a rank",
    "short_integrity.gguf": "edgeadapt.integrity: expected a string of exactly 71 bytes, found a STRING of 9 bytes",
    "flipped_data.gguf": "integrity check failed",
    # found by random mutation of a version-1 file: edgeadapt 0.1 crashed with TypeError
    "v1_zero_dim.gguf": "tensor 'blk.0.attn_q.weight.lora_b' has dimensions [2, 0]; each must be ≥ 1",
}


def test_the_valid_fixture_reads():
    assert read_delta(HOSTILE / "valid.gguf").name == "hostile"


@pytest.mark.parametrize("name", sorted(DELTA_CASES))
def test_hostile_delta_files(name):
    with pytest.raises(FormatError) as e:
        read_delta(HOSTILE / name)
    assert DELTA_CASES[name] in str(e.value)
    assert str(e.value).startswith(str(HOSTILE / name))
    if name == "flipped_data.gguf":
        assert isinstance(e.value, IntegrityError)


def test_every_hostile_fixture_is_pinned():
    assert {p.name for p in HOSTILE.glob("*.gguf")} - {"valid.gguf"} == set(DELTA_CASES)


def _write_manifest(folder: Path, d) -> Path:
    (folder / "manifest.json").write_text(d if isinstance(d, str) else json.dumps(d))
    return folder


MANIFEST_CASES = [
    (lambda d: '{"format": "edgeadapt.base", "format": "x"}', "not valid JSON: duplicate key 'format'"),
    (lambda d: json.dumps(d).replace('"rope_theta": 10000.0', '"rope_theta": NaN'), "not valid JSON: NaN is not a JSON number"),
    (lambda d: "[" * 100000 + "]" * 100000, "JSON nested too deeply to be a manifest"),
    (lambda d: {**d, "files": {"gguf": "../../etc/passwd"}}, "files['gguf'] = '../../etc/passwd' must be a relative path inside the folder"),
    (lambda d: {**d, "arch": {**d["arch"], "n_layers": -1}}, "arch.n_layers: expected int in 1…4096, found -1"),
    (lambda d: {**d, "arch": {**d["arch"], "dim": True}}, "arch.dim: expected int in 1…131072, found True"),
    (lambda d: {**d, "arch": {**d["arch"], "arch": "gpt9"}}, "arch.arch: expected one of ['gemma3', 'gpt2', 'llama', 'qwen2', 'qwen3', 'smollm3'], found 'gpt9'"),
    (lambda d: {**d, "fingerprint": "md5:abc"}, "fingerprint: expected 'sha256:' and 64 lowercase hex digits, found 'md5:abc'"),
    (lambda d: {**d, "tensors": {**d["tensors"], "token_embd.weight": {"onnx": {
        **d["tensors"]["token_embd.weight"]["onnx"], "offset": 1 << 40}}}},
     "tensors['token_embd.weight'].onnx: bytes 1099511627776…1099511693312 lie outside model.onnx.data"),
    (lambda d: {**d, "tensors": {**d["tensors"], "token_embd.weight": {"onnx": {
        **d["tensors"]["token_embd.weight"]["onnx"], "shape": [256, 65]}}}},
     "tensors['token_embd.weight'].onnx: expected shape [256, 64] of 65536 bytes, found [256, 65] and length 65536"),
    (lambda d: {**d, "tensors": {**d["tensors"], "blk.9.attn_q.weight": {}}},
     "tensors['blk.9.attn_q.weight']: not a tensor of this llama architecture card"),
    # minimized inputs the fuzzer below found (TypeError: unhashable type before the fix)
    (lambda d: {**d, "arch": {**d["arch"], "arch": []}}, "arch.arch: expected one of ['gemma3', 'gpt2', 'llama', 'qwen2', 'qwen3', 'smollm3'], found []"),
    (lambda d: {**d, "tensors": {**d["tensors"], "token_embd.weight": {"onnx": {
        **d["tensors"]["token_embd.weight"]["onnx"], "dtype": {}}}}}, "tensors['token_embd.weight'].onnx: bad or missing dtype"),
    # a tensor's data file is checked once per file name: one outside the folder, or not a name, is still refused
    (lambda d: {**d, "tensors": {**d["tensors"], "output_norm.weight": {"onnx": {
        **d["tensors"]["output_norm.weight"]["onnx"], "file": "../model.onnx.data"}}}},
     "tensors['output_norm.weight'].onnx: bad or missing file"),
    (lambda d: {**d, "tensors": {**d["tensors"], "output_norm.weight": {"onnx": {
        **d["tensors"]["output_norm.weight"]["onnx"], "file": ["model.onnx.data"]}}}},
     "tensors['output_norm.weight'].onnx: bad or missing file"),
]


@pytest.mark.parametrize("case", range(len(MANIFEST_CASES)))
def test_hostile_manifests(tiny, tmp_path, case):
    good = json.loads((tiny["base"] / "manifest.json").read_text())
    shutil.copy(tiny["base"] / "model.onnx.data", tmp_path / "model.onnx.data")
    edit, message = MANIFEST_CASES[case]
    with pytest.raises(FormatError) as e:
        read_manifest(_write_manifest(tmp_path, edit(good)))
    assert message in str(e.value)


def _peft_copy(tiny, tmp_path) -> Path:
    d = tmp_path / "peft"
    shutil.copytree(tiny["root"] / "peft_b", d)
    return d


def _rewrite_safetensors(path: Path, edit) -> None:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    header, body = edit(header, body)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + body)


def test_hostile_safetensors(tiny, tmp_path):
    d = _peft_copy(tiny, tmp_path)
    st_path = d / "adapter_model.safetensors"
    good = st_path.read_bytes()
    key = sorted(k for k in json.loads(good[8:8 + int.from_bytes(good[:8], "little")]) if k != "__metadata__")[0]

    def expect(edit, message):
        st_path.write_bytes(good)
        if callable(edit):
            _rewrite_safetensors(st_path, edit)
        else:
            st_path.write_bytes(edit)
        with pytest.raises(FormatError) as e:
            read_peft_tensors(d)
        assert message in str(e.value)

    expect(struct.pack("<Q", 1 << 60) + good[8:], "claimed size of 1152921504606846976 (truncated or not a safetensors file)")
    expect(good[:100], "(truncated or not a safetensors file)")
    expect(lambda h, b: ({**h, key: {**h[key], "dtype": "I64"}}, b), f"{key}: expected dtype in ['BF16', 'F16', 'F32', 'F64']")
    expect(lambda h, b: ({**h, key: {**h[key], "data_offsets": [0, 1 << 40]}}, b), f"{key}: ")
    expect(lambda h, b: (h, b[:4] + struct.pack("<f", float("nan")) + b[8:]), "holds NaN or Inf")
    expect(lambda h, b: (h, b + b"\0" * 8), "the tensors cover")
    text = good[8:8 + int.from_bytes(good[:8], "little")].decode()  # padded with spaces
    dup = text.rstrip()[:-1] + "," + json.dumps(key) + ":" + json.dumps(json.loads(text)[key]) + "}"
    expect(struct.pack("<Q", len(dup)) + dup.encode() + good[8 + len(text):], f"duplicate key {key!r}")


def test_hostile_peft_configs(tiny, tmp_path):
    d = _peft_copy(tiny, tmp_path)
    good = json.loads((d / "adapter_config.json").read_text())
    for edit, message in ((dict(r="8"), "r: expected an integer in 1…65536, found '8'"),
                          (dict(lora_alpha=[1]), "lora_alpha: expected a finite number, found [1]"),
                          (dict(rank_pattern={"(a+)+$": 4}), "patterns with quantified groups or over 512 characters"),
                          (dict(alpha_pattern={"[": 4}), "alpha_pattern['[']: not a regular expression"),
                          (dict(use_rslora="yes"), "use_rslora: expected true or false, found 'yes'")):
        (d / "adapter_config.json").write_text(json.dumps({**good, **edit}))
        with pytest.raises(FormatError) as e:
            read_peft_config(d)
        assert message in str(e.value)


# ---- part two: fuzzing
class Hang(Exception):
    pass


def _watchdog(seconds: int):
    """Raise Hang in the main thread if one example runs for ``seconds`` (a hang, not slowness)."""
    def fire(*_):
        raise Hang(f"a reader ran for {seconds}s on one input")
    signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)


INTERESTING = [0, 1, 2, 3, 4, 7, 8, 31, 32, 255, 256, 1 << 16, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 62, (1 << 64) - 1]
mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(1, 255)),
    st.tuples(st.just("u64"), st.integers(0, 1 << 16), st.sampled_from(INTERESTING)),
    st.tuples(st.just("u32"), st.integers(0, 1 << 16), st.sampled_from(INTERESTING[:14])),
    st.tuples(st.just("cut"), st.integers(0, 1 << 16), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.integers(1, 64)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 16), st.integers(1, 64)),
    st.tuples(st.just("nan"), st.integers(0, 1 << 16), st.sampled_from([0x7FC00000, 0x7F800000, 0xFF800000])),
)


def _mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, pos, arg in ops:
        if not b:
            break
        i = pos % len(b)
        if op == "flip":
            b[i] ^= arg
        elif op in ("u64", "u32", "nan"):
            fmt = "<Q" if op == "u64" else "<I"
            b[i:i + struct.calcsize(fmt)] = struct.pack(fmt, arg % (1 << (8 * struct.calcsize(fmt))))
        elif op == "cut":
            del b[i:]
        elif op == "insert":
            b[i:i] = bytes((i * 7 + k) % 256 for k in range(arg))
        else:
            del b[i:i + arg]
    return bytes(b)


def _seeds(tmp: Path) -> list[bytes]:
    rng = np.random.default_rng(0)
    f = {"blk.0.attn_q.weight": (rng.normal(size=(2, 32)).astype(np.float32), rng.normal(size=(32, 2)).astype(np.float32)),
         "blk.0.ffn_up.weight": (rng.normal(size=(2, 64)).astype(np.float32), rng.normal(size=(32, 2)).astype(np.float32))}
    out = [(HOSTILE.parent / "delta_v1.gguf").read_bytes()]
    for dtype in ("F32", "Q8_0", "int8", "int4"):
        write_delta(tmp / f"{dtype}.gguf", arch="llama", fingerprint="sha256:" + "0" * 64, name="s", version=1,
                    factors=f, dtype=dtype, group_size=16)
        out.append((tmp / f"{dtype}.gguf").read_bytes())
    return out


def test_fuzz_delta_reader(tmp_path):
    seeds = _seeds(tmp_path)

    @FUZZ
    @given(seed=st.integers(0, len(seeds) - 1), ops=st.lists(mutation, min_size=1, max_size=4), reseal=st.booleans())
    def run(seed, ops, reseal):
        data = _mutate(seeds[seed], ops)
        _watchdog(10)
        try:
            if reseal:  # repair the integrity, so the checks behind it are reached too
                try:
                    data = with_signature(data, UNSIGNED)
                except EdgeAdaptError:
                    pass
            delta_from_bytes(data)
        except EdgeAdaptError:
            pass
        finally:
            signal.alarm(0)

    run()


json_value = st.recursive(st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False)
                          | st.text(max_size=20) | st.sampled_from(["../x", "/etc/passwd", "model.gguf", "float16"]),
                          lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                          max_leaves=8)


def _paths(d, prefix=()):
    yield prefix
    if isinstance(d, dict):
        for k, v in list(d.items())[:40]:
            yield from _paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d[:8]):
            yield from _paths(v, prefix + (i,))


def _set(d, path, value):
    if not path:
        return value
    d[path[0]] = _set(d[path[0]], path[1:], value)
    return d


def test_fuzz_manifest_reader(tiny, tmp_path):
    good = json.loads((tiny["base"] / "manifest.json").read_text())
    shutil.copy(tiny["base"] / "model.onnx.data", tmp_path / "model.onnx.data")
    paths = [p for p in _paths(good) if p]

    @FUZZ
    @given(edits=st.lists(st.tuples(st.integers(0, len(paths) - 1), json_value), min_size=1, max_size=3),
           raw=st.lists(mutation, max_size=2))
    def run(edits, raw):
        d = json.loads(json.dumps(good))
        for i, v in edits:
            try:
                d = _set(d, paths[i], v)
            except (KeyError, IndexError, TypeError):
                pass
        text = _mutate(json.dumps(d).encode(), raw) if raw else json.dumps(d).encode()
        (tmp_path / "manifest.json").write_bytes(text)
        _watchdog(10)
        try:
            read_manifest(tmp_path)
        except EdgeAdaptError:
            pass
        finally:
            signal.alarm(0)

    run()


def test_fuzz_peft_reader(tiny, tmp_path):
    d = _peft_copy(tiny, tmp_path)
    good_st = (d / "adapter_model.safetensors").read_bytes()
    good_cfg = json.loads((d / "adapter_config.json").read_text())
    cfg_keys = ["r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "peft_type"]
    arch = tiny["manifest"].arch

    @FUZZ
    @given(ops=st.lists(mutation, max_size=3), edits=st.lists(st.tuples(st.sampled_from(cfg_keys), json_value), max_size=2))
    def run(ops, edits):
        (d / "adapter_model.safetensors").write_bytes(_mutate(good_st, ops))
        (d / "adapter_config.json").write_text(json.dumps({**good_cfg, **dict(edits)}))
        _watchdog(10)
        try:
            lora_factors(arch, read_peft_config(d), read_peft_tensors(d))
        except EdgeAdaptError:
            pass
        finally:
            signal.alarm(0)

    run()
