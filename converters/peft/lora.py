"""PEFT LoRA folder -> edgeadapt delta file.

Reads ``adapter_config.json`` + ``adapter_model.safetensors`` (never pickle). Per target module
the scale PEFT uses is folded into B in float32:  s = alpha / r  (rsLoRA: alpha / √r), with r and
alpha taken from ``rank_pattern`` / ``alpha_pattern`` exactly as PEFT matches them (a pattern
matches a module path that equals it or ends in ``.<pattern>``, first match wins). B's rows of
q/k are permuted like the base's. Options this version cannot represent are refused by name.

``fan_in_fan_out`` (GPT-2's Conv1D, weight [in, out]): PEFT transposes ΔW = s·B@A to the Conv1D
layout before adding it; the canonical base holds those weights transposed back to [out, in], so
the canonical delta is s·B@A as for any linear, with A [r, in] and B [out, r] as saved.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.formats.arch import CONV1D_ARCHES, ArchConfig, permute_qk, qk_heads
from edgeadapt.formats.delta import write_delta
from edgeadapt.errors import AdapterMismatchError, FormatError, UnsupportedError, collect
from edgeadapt.formats.names import gguf_name

PREFIX = "base_model.model."
# adapter_config.json options and the values this converter handles
_REFUSED = {"use_dora": (False, None), "use_qalora": (False, None)}  # fan_in_fan_out: see lora_factors


def pattern_key(patterns: list[str], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern p with re.match(rf"(.*\\.)?({p})$", module)."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", module):
            return p
    return None


def adapter_config(folder: Path) -> dict[str, Any]:
    """``adapter_config.json`` as a JSON object, whatever the kind (each converter checks the options it reads)."""
    p = folder / "adapter_config.json"
    if not p.is_file():
        raise FormatError(f"{folder} is not a PEFT adapter folder: expected adapter_config.json")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{p}: not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise FormatError(f"{p}: expected a JSON object")
    return cfg


def read_peft_config(folder: Path, handled: tuple[str, ...] = ()) -> dict[str, Any]:
    """``adapter_config.json``, validated: strict JSON (1 MiB at most), the types of every option we use,
    and rank/alpha patterns that are plain regular expressions (no quantified groups: no ReDoS).
    ``handled``: options the caller converts itself (``modules_to_save``, ``trainable_token_indices``)."""
    from edgeadapt.formats.manifest import load_json

    p = Path(folder) / "adapter_config.json"
    if not p.is_file():
        raise FormatError(f"{folder} is not a PEFT adapter folder: expected adapter_config.json")
    cfg = load_json(p, 1 << 20)
    if not isinstance(cfg, dict):
        raise FormatError(f"{p}: expected a JSON object, found {type(cfg).__name__}")
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise UnsupportedError(f"{p}: peft_type {kind!r} is not supported yet (this version converts LORA)")
    for opt, ok in _REFUSED.items():
        if cfg.get(opt) not in ok:
            raise UnsupportedError(f"{p}: LoRA option {opt}={cfg[opt]!r} is not supported yet")
    if cfg.get("modules_to_save") and "modules_to_save" not in handled:
        raise UnsupportedError(f"{p}: modules_to_save={cfg['modules_to_save']!r} is not supported yet")
    if cfg.get("trainable_token_indices") and "trainable_token_indices" not in handled:
        raise UnsupportedError(f"{p}: trainable_token_indices is not supported yet")

    def rank_ok(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 1 << 16

    def alpha_ok(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    problems = []
    if not rank_ok(cfg.get("r", 8)):
        problems.append(f"r: expected an integer in 1…65536, found {cfg.get('r')!r}")
    if not alpha_ok(cfg.get("lora_alpha", 8)):
        problems.append(f"lora_alpha: expected a finite number, found {cfg.get('lora_alpha')!r}")
    if cfg.get("use_rslora") not in (None, True, False):
        problems.append(f"use_rslora: expected true or false, found {cfg.get('use_rslora')!r}")
    for key, ok in (("rank_pattern", rank_ok), ("alpha_pattern", alpha_ok)):
        pats = cfg.get(key) or {}
        if not isinstance(pats, dict):
            problems.append(f"{key}: expected an object of pattern -> value, found {type(pats).__name__}")
            continue
        for pat, val in pats.items():
            if not ok(val):
                problems.append(f"{key}[{pat!r}]: bad value {val!r}")
            if len(pat) > 512 or re.search(r"\)[*+{]", pat):
                problems.append(f"{key}[{pat[:60]!r}]: patterns with quantified groups or over 512 characters are "
                                "not supported (they can take exponential time to match)")
                continue
            try:
                re.compile(pat)
            except re.error as e:
                problems.append(f"{key}[{pat!r}]: not a regular expression ({e})")
    collect(problems, FormatError, f"{p}: bad LoRA options:")
    return cfg


def read_peft_tensors(folder: Path) -> dict[str, np.ndarray]:
    """``adapter_model.safetensors`` as float32 arrays, without torch and without trusting the header:
    header size capped, offsets contiguous and inside the file, sizes = shape × dtype, names unique,
    values finite."""
    from edgeadapt.formats.manifest import _no_duplicates

    st = Path(folder) / "adapter_model.safetensors"
    if not st.is_file():
        found = "adapter_model.bin (pickle; convert it with safetensors first)" if (Path(folder) / "adapter_model.bin").exists() else "nothing"
        raise FormatError(f"{folder}: expected adapter_model.safetensors, found {found}")
    data = st.read_bytes()
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if n < 2 or n > min(100 << 20, len(data) - 8):
        raise FormatError(f"{st}: expected a safetensors header of at most {max(0, len(data) - 8)} bytes, found a "
                          f"claimed size of {n} (truncated or not a safetensors file)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise FormatError(f"{st}: header JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{st}: header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise FormatError(f"{st}: expected a header object, found {type(header).__name__}")
    header.pop("__metadata__", None)
    dtypes = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}
    body, problems, spans, out = memoryview(data)[8 + n:], [], [], {}
    for name, e in header.items():
        ok = (isinstance(e, dict) and isinstance(e.get("dtype"), str) and e["dtype"] in dtypes
              and isinstance(e.get("shape"), list)
              and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 40 for x in e["shape"])
              and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
              and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in e["data_offsets"]))
        if not ok:
            problems.append(f"{name}: expected dtype in {sorted(dtypes)}, a shape and data_offsets, found "
                            f"{str(e)[:120]}")
            continue
        (b0, b1), dt = e["data_offsets"], np.dtype(dtypes[e["dtype"]])
        if b1 - b0 != math.prod(e["shape"]) * dt.itemsize or b1 > len(body):
            problems.append(f"{name}: {e['shape']} {e['dtype']} needs {math.prod(e['shape']) * dt.itemsize} bytes, "
                            f"found offsets {b0}…{b1} in a {len(body)}-byte buffer")
            continue
        spans.append((b0, b1, name))
        a = np.frombuffer(body[b0:b1], dtype=dt).reshape(e["shape"])
        a = (a.astype(np.uint32) << 16).view(np.float32) if e["dtype"] == "BF16" else a.astype(np.float32)
        if not np.isfinite(a).all():
            problems.append(f"{name}: holds NaN or Inf")
        out[name] = a
    pos = 0
    for b0, b1, name in sorted(spans):
        if b0 != pos:
            problems.append(f"{name}: data starts at {b0}, expected {pos} (tensors must be contiguous, no overlap)")
        pos = max(pos, b1)
    if not problems and pos != len(body):
        problems.append(f"the tensors cover {pos} bytes of a {len(body)}-byte buffer")
    collect(problems, FormatError, f"{st}: not a valid safetensors file:")
    return out


def lora_factors(cfg: ArchConfig, peft_cfg: dict[str, Any], tensors: dict[str, np.ndarray],
                 biases: dict[str, np.ndarray] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """PEFT tensors -> {gguf weight name: (A [r, in], s·B [out, r])}, canonical layout. With
    ``lora_bias`` in the config, ``biases`` (when given) receives {gguf weight name: s·lora_B.bias [out]}."""
    r0, alpha0 = peft_cfg.get("r", 8), peft_cfg.get("lora_alpha", 8)
    rank_p, alpha_p = peft_cfg.get("rank_pattern") or {}, peft_cfg.get("alpha_pattern") or {}
    rslora = bool(peft_cfg.get("use_rslora", False))
    shapes = cfg.linear_shapes()
    if peft_cfg.get("fan_in_fan_out") not in (None, False) and cfg.arch not in CONV1D_ARCHES:
        raise UnsupportedError(f"LoRA option fan_in_fan_out={peft_cfg['fan_in_fan_out']!r} is for Conv1D layers "
                               f"(architectures {sorted(CONV1D_ARCHES)}); this {cfg.arch} base has none")
    if peft_cfg.get("lora_bias") and biases is None:
        raise UnsupportedError("LoRA option lora_bias=True: this conversion path has no place for the bias "
                               "(lora_B.bias); convert it with a path that takes biases")
    problems: list[str] = []
    pairs: dict[str, dict[str, np.ndarray]] = {}
    bias_t: dict[str, np.ndarray] = {}
    for key, t in tensors.items():
        mb = re.fullmatch(r"(.+)\.lora_B\.bias", key)
        if mb and key.startswith(PREFIX) and peft_cfg.get("lora_bias"):
            bias_t[mb.group(1)[len(PREFIX):]] = t
            continue
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
        if not m or not key.startswith(PREFIX):
            problems.append(f"{key}: not a LoRA factor this converter knows (kind not supported yet)")
            continue
        pairs.setdefault(m.group(1)[len(PREFIX):], {})[m.group(2)] = t
    factors = {}
    for module, ab in sorted(pairs.items()):
        target = gguf_name(cfg, module + ".weight")
        if target is None or target not in shapes:
            problems.append(f"{module}: no adaptable weight of the base has this name")
            continue
        if set(ab) != {"A", "B"}:
            problems.append(f"{module}: has lora_{''.join(ab)} without its pair")
            continue
        a, b = ab["A"], ab["B"]
        out, inp = shapes[target]
        rk, ak = pattern_key(list(rank_p), module), pattern_key(list(alpha_p), module)
        r = int(rank_p[rk]) if rk is not None else int(r0)
        alpha = float(alpha_p[ak]) if ak is not None else float(alpha0)
        if a.shape != (r, inp) or b.shape != (out, r):
            problems.append(f"{module}: expected lora_A [{r}, {inp}] and lora_B [{out}, {r}] (r from the config), "
                            f"found {list(a.shape)} and {list(b.shape)}")
            continue
        s = alpha / math.sqrt(r) if rslora else alpha / r
        b = (b.astype(np.float32) * np.float32(s)).astype(np.float32)
        heads = qk_heads(cfg, target)
        if heads:
            b = permute_qk(b, heads)
        if module in bias_t and biases is not None:
            bb = bias_t[module].astype(np.float32) * np.float32(s)
            if bb.shape != (out,):
                problems.append(f"{module}: expected lora_B.bias [{out}], found {list(bb.shape)}")
                continue
            biases[target] = np.ascontiguousarray(permute_qk(bb, heads) if heads else bb)
        factors[target] = (np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b))
    collect(problems, AdapterMismatchError, "the PEFT adapter does not fit this base:")
    return factors


def convert_peft(folder: str | Path, manifest: Any, out: str | Path, *, name: str | None = None,
                 version: int = 1, dtype: str = "F32", description: str = "") -> Path:
    """Convert a PEFT LoRA folder for the base described by ``manifest``; returns the delta path."""
    folder, out = Path(folder), Path(out)
    peft_cfg = read_peft_config(folder)
    biases: dict[str, np.ndarray] = {}  # lora_bias: Δb = s·lora_B.bias, stored beside the factors
    factors = lora_factors(manifest.arch, peft_cfg, read_peft_tensors(folder), biases)
    if not factors:
        raise FormatError(f"{folder}: no LoRA factors found")
    ranks = sorted({a.shape[0] for a, _ in factors.values()})
    source = (f"peft LoRA r={peft_cfg.get('r')} alpha={peft_cfg.get('lora_alpha')} rslora={bool(peft_cfg.get('use_rslora'))} "
              f"ranks={ranks} targets={len(factors)}")
    write_delta(out, arch=manifest.arch.arch, fingerprint=manifest.fingerprint, name=name or folder.name,
                version=version, factors=factors, biases=biases, source=source, description=description, dtype=dtype)
    return out
