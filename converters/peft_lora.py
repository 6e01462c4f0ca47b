"""PEFT LoRA folder -> edgeadapt delta file.

Reads ``adapter_config.json`` + ``adapter_model.safetensors`` (never pickle). Per target module
the scale PEFT uses is folded into B in float32:  s = alpha / r  (rsLoRA: alpha / √r), with r and
alpha taken from ``rank_pattern`` / ``alpha_pattern`` exactly as PEFT matches them (a pattern
matches a module path that equals it or ends in ``.<pattern>``, first match wins). B's rows of
q/k are permuted like the base's. Options this version cannot represent are refused by name.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.arch import ArchConfig, permute_qk, qk_heads
from edgeadapt.delta import write_delta
from edgeadapt.errors import AdapterMismatchError, FormatError, UnsupportedError, collect
from edgeadapt.names import gguf_name

PREFIX = "base_model.model."
# adapter_config.json options and the values this converter handles
_REFUSED = {"use_dora": (False, None), "lora_bias": (False, None), "fan_in_fan_out": (False, None),
            "use_qalora": (False, None)}


def pattern_key(patterns: list[str], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern p with re.match(rf"(.*\\.)?({p})$", module)."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", module):
            return p
    return None


def read_peft_config(folder: Path) -> dict[str, Any]:
    p = folder / "adapter_config.json"
    if not p.is_file():
        raise FormatError(f"{folder} is not a PEFT adapter folder: expected adapter_config.json")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{p}: not valid JSON: {e}") from e
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise UnsupportedError(f"{p}: peft_type {kind!r} is not supported yet (this version converts LORA)")
    for opt, ok in _REFUSED.items():
        if cfg.get(opt) not in ok:
            raise UnsupportedError(f"{p}: LoRA option {opt}={cfg[opt]!r} is not supported yet")
    if cfg.get("modules_to_save"):
        raise UnsupportedError(f"{p}: modules_to_save={cfg['modules_to_save']!r} is not supported yet")
    if cfg.get("trainable_token_indices"):
        raise UnsupportedError(f"{p}: trainable_token_indices is not supported yet")
    return cfg


def read_peft_tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    st = folder / "adapter_model.safetensors"
    if not st.is_file():
        found = "adapter_model.bin (pickle; convert it with safetensors first)" if (folder / "adapter_model.bin").exists() else "nothing"
        raise FormatError(f"{folder}: expected adapter_model.safetensors, found {found}")
    out = {}
    try:
        with safe_open(str(st), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k).float().numpy()
    except Exception as e:
        raise FormatError(f"{st}: not a readable safetensors file: {e}") from e
    return out


def lora_factors(cfg: ArchConfig, peft_cfg: dict[str, Any], tensors: dict[str, np.ndarray]
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """PEFT tensors -> {gguf weight name: (A [r, in], s·B [out, r])}, canonical layout."""
    r0, alpha0 = peft_cfg.get("r", 8), peft_cfg.get("lora_alpha", 8)
    rank_p, alpha_p = peft_cfg.get("rank_pattern") or {}, peft_cfg.get("alpha_pattern") or {}
    rslora = bool(peft_cfg.get("use_rslora", False))
    shapes = cfg.linear_shapes()
    problems: list[str] = []
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, t in tensors.items():
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
        factors[target] = (np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b))
    collect(problems, AdapterMismatchError, "the PEFT adapter does not fit this base:")
    return factors


def convert_peft(folder: str | Path, manifest: Any, out: str | Path, *, name: str | None = None,
                 version: int = 1, dtype: str = "F32", description: str = "") -> Path:
    """Convert a PEFT LoRA folder for the base described by ``manifest``; returns the delta path."""
    folder, out = Path(folder), Path(out)
    peft_cfg = read_peft_config(folder)
    factors = lora_factors(manifest.arch, peft_cfg, read_peft_tensors(folder))
    if not factors:
        raise FormatError(f"{folder}: no LoRA factors found")
    ranks = sorted({a.shape[0] for a, _ in factors.values()})
    source = (f"peft LoRA r={peft_cfg.get('r')} alpha={peft_cfg.get('lora_alpha')} rslora={bool(peft_cfg.get('use_rslora'))} "
              f"ranks={ranks} targets={len(factors)}")
    write_delta(out, arch=manifest.arch.arch, fingerprint=manifest.fingerprint, name=name or folder.name,
                version=version, factors=factors, source=source, description=description, dtype=dtype)
    return out
