"""PEFT adapter kinds beyond plain LoRA -> edgeadapt adapters (see :mod:`edgeadapt.kinds.lora_family`).

DoRA (``use_dora``), IA3, LoHa, LoKr carry their own parameters; VeRA is exactly low rank and
becomes a plain LoRA delta (so llama.cpp can read it too). Per-module r / alpha follow PEFT's
``rank_pattern`` / ``alpha_pattern`` matching; options that change the math in ways not modelled
here are refused by name.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.formats.arch import ArchConfig, permute_qk, qk_heads
from edgeadapt.formats.delta import LoraDelta
from edgeadapt.errors import AdapterMismatchError, FormatError, UnsupportedError, collect
from edgeadapt.formats.delta_kinds import KindAdapter, heads_for
from edgeadapt.kinds.lora_family import DoraAdapter, Ia3Adapter, LohaAdapter, LokrAdapter
from edgeadapt.formats.names import gguf_name

from edgeadapt.converters.peft.lora import PREFIX, adapter_config, pattern_key, read_peft_tensors
from edgeadapt.converters.peft.seq import convert_peft_seq, is_seq_config

SUPPORTED = ("LORA (use_dora)", "IA3", "LOHA", "LOKR", "VERA")


def _modules(cfg: ArchConfig, tensors: dict[str, np.ndarray], suffixes: tuple[str, ...]) -> dict[str, dict[str, np.ndarray]]:
    """{module path: {suffix: tensor}} for keys ``base_model.model.<module>.<suffix>``."""
    out: dict[str, dict[str, np.ndarray]] = {}
    pat = re.compile(r"(.+)\.(" + "|".join(re.escape(s) for s in suffixes) + r")")
    for key, t in tensors.items():
        m = pat.fullmatch(key)
        if m and key.startswith(PREFIX):
            out.setdefault(m.group(1)[len(PREFIX):], {})[m.group(2)] = np.asarray(t, np.float32)
    return out


def _target(cfg: ArchConfig, module: str, problems: list[str]) -> str | None:
    t = gguf_name(cfg, module + ".weight")
    if t is None or t not in cfg.linear_shapes():
        problems.append(f"{module}: no adaptable linear weight of the base has this name")
        return None
    return t


def _r_alpha(pc: dict[str, Any], module: str, alpha_key: str) -> tuple[int, float]:
    rk = pattern_key(list(pc.get("rank_pattern") or {}), module)
    ak = pattern_key(list(pc.get("alpha_pattern") or {}), module)
    r = int(pc["rank_pattern"][rk]) if rk is not None else int(pc.get("r", 8))
    alpha = float(pc["alpha_pattern"][ak]) if ak is not None else float(pc.get(alpha_key, r))
    return r, alpha


def convert_peft_kind(folder: str | Path, manifest: Any, *, name: str | None = None, version: int = 1
                      ) -> KindAdapter | LoraDelta:
    """Read a PEFT folder of a kind listed in :data:`SUPPORTED` into an adapter for this base."""
    folder = Path(folder)
    pc = adapter_config(folder)
    if is_seq_config(pc):  # embedding LoRA, trainable tokens, modules_to_save, prompt / prefix tuning
        return convert_peft_seq(folder, manifest, name=name, version=version)
    cfg: ArchConfig = manifest.arch
    kind = pc.get("peft_type")
    tensors = read_peft_tensors(folder)
    problems: list[str] = []
    params: dict[str, dict[str, Any]] = {}
    common = dict(name=name or folder.name, version=version, arch=cfg.arch, fingerprint=manifest.fingerprint,
                  source=f"peft {kind}", path=str(folder))
    if pc.get("fan_in_fan_out"):
        raise UnsupportedError(f"{folder}: option fan_in_fan_out=True is not supported for {kind} on this architecture")
    if kind in ("LOHA", "LOKR") and pc.get("use_effective_conv2d"):
        raise UnsupportedError(f"{folder}: {kind.lower()} option use_effective_conv2d=True is not supported "
                               "(edgeadapt adapts linear layers; train without it)")
    emb = sorted({k.split(".lora_embedding")[0][len(PREFIX):] for k in tensors if ".lora_embedding_" in k})
    if emb and kind == "LORA" and pc.get("use_dora"):
        raise UnsupportedError(f"{folder}: dora on embeddings ({', '.join(emb)}) is not supported: PEFT's DoRA "
                               "option use_dora=True applies to linear layers here")
    if pc.get("modules_to_save"):
        raise UnsupportedError(f"{folder}: option modules_to_save={pc['modules_to_save']!r} is not supported yet")

    if kind == "LORA" and pc.get("use_dora"):
        if pc.get("lora_bias"):
            raise UnsupportedError(f"{folder}: option lora_bias=True with use_dora is not supported yet")
        for module, t in _modules(cfg, tensors, ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")).items():
            target = _target(cfg, module, problems)
            if target is None or len(t) != 3:
                problems += [] if target is None else [f"{module}: expected lora_A, lora_B and lora_magnitude_vector"]
                continue
            r, alpha = _r_alpha(pc, module, "lora_alpha")
            s = alpha / math.sqrt(r) if pc.get("use_rslora") else alpha / r
            params[target] = {"lora_a": t["lora_A.weight"], "lora_b": t["lora_B.weight"] * np.float32(s),
                              "dora_m": t["lora_magnitude_vector"]}
        cls: type[KindAdapter] = DoraAdapter
    elif kind == "IA3":
        ff = pc.get("feedforward_modules") or []
        ff = [ff] if isinstance(ff, str) else list(ff)
        shapes = cfg.linear_shapes()
        for module, t in _modules(cfg, tensors, ("ia3_l",)).items():
            target = _target(cfg, module, problems)
            if target is None:
                continue
            l = t["ia3_l"]
            is_ff = any(re.fullmatch(rf"(.*\.)?{re.escape(f)}", module) for f in ff) if isinstance(ff, list) else False
            axis = "in" if is_ff else "out"
            want = (1, shapes[target][1]) if is_ff else (shapes[target][0], 1)
            if l.shape != want:
                problems.append(f"{module}.ia3_l: expected {list(want)} ({'feed-forward: scales inputs' if is_ff else 'scales outputs'}), found {list(l.shape)}")
                continue
            params[target] = {"ia3_in" if axis == "in" else "ia3_out": l.reshape(-1)}
        cls = Ia3Adapter
    elif kind == "LOHA":
        for module, t in _modules(cfg, tensors, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")).items():
            target = _target(cfg, module, problems)
            if target is None or len(t) != 4:
                problems += [] if target is None else [f"{module}: expected hada_w1_a/_b and hada_w2_a/_b"]
                continue
            r, alpha = _r_alpha(pc, module, "alpha")
            params[target] = {"hada_w1a": t["hada_w1_a"] * np.float32(alpha / r), "hada_w1b": t["hada_w1_b"],
                              "hada_w2a": t["hada_w2_a"], "hada_w2b": t["hada_w2_b"]}
        cls = LohaAdapter
    elif kind == "LOKR":
        for module, t in _modules(cfg, tensors, ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")).items():
            target = _target(cfg, module, problems)
            if target is None:
                continue
            if "lokr_t2" in t:
                problems.append(f"{module}: lokr_t2 (effective conv2d) is not supported for linear layers")
                continue
            r, alpha = _r_alpha(pc, module, "alpha")
            p: dict[str, Any] = {}
            for f in ("w1", "w2"):
                if f"lokr_{f}" in t:
                    p[f"lokr_{f}"] = t[f"lokr_{f}"]
                elif f"lokr_{f}_a" in t and f"lokr_{f}_b" in t:
                    p[f"lokr_{f}a"], p[f"lokr_{f}b"] = t[f"lokr_{f}_a"], t[f"lokr_{f}_b"]
                else:
                    problems.append(f"{module}: expected lokr_{f} or lokr_{f}_a/_b")
            key = "lokr_w1" if "lokr_w1" in p else "lokr_w1a"  # the scale, folded exactly into one factor
            if key in p:
                p[key] = p[key] * np.float32(alpha / r)
            params[target] = p
        cls = LokrAdapter
    elif kind == "VERA":
        shared = {k.rsplit(".", 1)[-1]: np.asarray(v, np.float32) for k, v in tensors.items() if k.endswith(("vera_A", "vera_B"))}
        if set(shared) != {"vera_A", "vera_B"}:
            raise UnsupportedError(f"{folder}: VeRA without saved projections (save_projection=False) cannot be "
                                   "rebuilt off the training machine; train with save_projection=True")
        factors = {}
        shapes = cfg.linear_shapes()
        for module, t in _modules(cfg, tensors, ("vera_lambda_b", "vera_lambda_d")).items():
            target = _target(cfg, module, problems)
            if target is None or len(t) != 2:
                continue
            out, inp = shapes[target]
            a = t["vera_lambda_d"][:, None] * shared["vera_A"][:, :inp]  # [r, in]
            b = t["vera_lambda_b"][:, None] * shared["vera_B"][:out, :]  # [out, r]
            h = qk_heads(cfg, target)
            factors[target] = (np.ascontiguousarray(a), np.ascontiguousarray(permute_qk(b, h) if h else b))
        collect(problems, AdapterMismatchError, f"{folder}: the PEFT VeRA adapter does not fit this base:")
        return LoraDelta(factors=factors, name=common["name"], version=version, arch=cfg.arch,
                         fingerprint=manifest.fingerprint, source="peft VERA (exactly low rank: stored as LoRA)")
    else:
        raise UnsupportedError(f"{folder}: PEFT kind {kind!r}{' with use_dora' if pc.get('use_dora') else ''} is not "
                               f"supported by this converter; supported: {', '.join(SUPPORTED)} (plain LoRA: export-adapter)")
    collect(problems, AdapterMismatchError, f"{folder}: the PEFT {kind} adapter does not fit this base:")
    if not params:
        raise FormatError(f"{folder}: no {kind} parameters found in adapter_model.safetensors")
    adapter = cls(params=params, heads=heads_for(cfg, params), **common)
    adapter.check_base(cfg, manifest.fingerprint)
    return adapter


def is_peft_kind(folder: str | Path) -> bool:
    """Is this a PEFT folder of a kind :func:`convert_peft_kind` handles (anything but plain LoRA)?"""
    p = Path(folder) / "adapter_config.json"
    if not p.is_file():
        return False
    pc = adapter_config(Path(folder))
    return pc.get("peft_type") != "LORA" or bool(pc.get("use_dora")) or is_seq_config(pc)


def export_peft_kind(folder: str | Path, manifest: Any, out: str | Path, *, name: str | None = None,
                     version: int = 1, dtype: str = "F32") -> Path:
    """Convert a PEFT folder of any kind in :data:`SUPPORTED` to a delta file pinned to this base."""
    from edgeadapt.formats.delta import write_delta

    adapter = convert_peft_kind(folder, manifest, name=name, version=version)
    write_delta(out, adapter, dtype=dtype)
    return Path(out)
