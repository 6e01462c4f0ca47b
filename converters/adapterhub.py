"""AdapterHub (``adapters`` 1.x) adapters -> edgeadapt adapter objects pinned to one base.

Reads a folder written by ``model.save_adapter``: ``adapter_config.json`` (``{"config": {…},
"model_type", "hidden_size", "version", …}``) and ``adapter.safetensors`` — or, on the host only,
``pytorch_adapter.bin`` through ``torch.load(weights_only=True)``. Supported:

| AdapterHub config | keys | becomes |
|---|---|---|
| bottleneck (``seq_bn``, ``double_seq_bn``, ``par``, any BnConfig without gating / PHM / invertible adapters) | BERT: ``…attention.output.adapters.<n>.adapter_down.0`` / ``adapter_up``, ``…output.adapters.<n>.…``; Llama / Mistral: ``…layers.<i>.attention_adapters.adapters.<n>.…``, ``…output_adapters.…`` | :class:`edgeadapt.kinds.bottleneck.BottleneckAdapter` (encoder and llama-family bases, live) |
| LoRA (``composition_mode="add"``) | ``….loras.<n>.lora_A`` [r,in], ``lora_B`` [out,r] | LoRA factors, B·alpha/r (:class:`edgeadapt.formats.delta.LoraDelta`) |
| IA3 (``composition_mode="scale"``) | ``….loras.<n>.lora_B`` [out,1] | output scaling l·alpha of every target, FFN included (:class:`edgeadapt.kinds.lora_family.Ia3Adapter`, axis "out") |

Adapters saved by ``adapters`` < 1.1.0 ignored alpha (LoRA / IA3): as AdapterHub's own loader
does, alpha is taken to be r for them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.formats.arch import HF_MODEL_TYPES, permute_qk, qk_heads
from edgeadapt.kinds.bottleneck import DECODER_ARCHES, BottleneckAdapter, placement, target_name
from edgeadapt.formats.delta import LoraDelta
from edgeadapt.errors import AdapterMismatchError, FormatError, UnsupportedError, collect
from edgeadapt.kinds.lora_family import Ia3Adapter

_BN_UNSUPPORTED = {"use_gating": False, "phm_layer": False, "inv_adapter": None, "cross_adapter": False,
                   "stochastic_depth": 0.0}
_LORA_UNSUPPORTED = {"use_gating": False, "use_dora": False}


def read_adapterhub(folder: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(adapter_config.json, tensors as float32 arrays) of an AdapterHub adapter folder."""
    folder = Path(folder)
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "no such folder"
        raise FormatError(f"{folder} is not an AdapterHub adapter folder: expected adapter_config.json, found {found}")
    meta = json.loads(cfg_path.read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise FormatError(f"{cfg_path}: expected an AdapterHub config with a 'config' object, found keys "
                          f"{sorted(meta) if isinstance(meta, dict) else type(meta).__name__}")
    st, pt = folder / "adapter.safetensors", folder / "pytorch_adapter.bin"
    if st.is_file():
        from safetensors.numpy import load_file
        tensors = load_file(str(st))
    elif pt.is_file():
        import torch  # host only: a pickle, read with torch's restricted loader
        tensors = {k: v.float().numpy() for k, v in torch.load(str(pt), map_location="cpu", weights_only=True).items()}
    else:
        raise FormatError(f"{folder}: expected adapter.safetensors or pytorch_adapter.bin, found "
                          f"{sorted(p.name for p in folder.iterdir())}")
    return meta, {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def _kind(c: dict[str, Any]) -> str:
    arch = c.get("architecture")
    if arch in (None, "bottleneck") and "reduction_factor" in c:
        return "bottleneck"
    if arch == "lora":
        return "ia3" if c.get("composition_mode") == "scale" else "lora"
    raise UnsupportedError(f"AdapterHub architecture {arch!r} is not supported by this converter; supported: "
                           "bottleneck (seq_bn, double_seq_bn, par), lora, ia3")


def _alpha(meta: dict[str, Any]) -> float:
    """AdapterHub's loader: versions < 1.1.0 saved LoRA / IA3 with a scaling that ignored alpha."""
    c, v = meta["config"], str(meta.get("version", ""))
    m = re.fullmatch(r"adapters\.(\d+)\.(\d+)\.(\d+).*", v)
    if m and tuple(int(x) for x in m.groups()) < (1, 1, 0):
        return float(c.get("r", 8))
    return float(c.get("alpha", 8))


def _refuse(c: dict[str, Any], unsupported: dict[str, Any], kind: str) -> None:
    bad = [f"{k}={c[k]!r}" for k, ok in unsupported.items() if k in c and c[k] not in (ok, None) and c[k] != ok]
    if bad:
        raise UnsupportedError(f"AdapterHub {kind} option(s) {', '.join(bad)} not supported; "
                               f"supported: {', '.join(f'{k}={v!r}' for k, v in unsupported.items())}")


def convert_adapterhub(folder: str | Path, manifest: Any, *, name: str | None = None, version: int = 1) -> Any:
    """An AdapterHub adapter folder -> an adapter object for ``manifest``'s base (``Model.add_adapter``)."""
    meta, tensors = read_adapterhub(folder)
    cfg = manifest.arch
    c = meta["config"]
    problems = []
    if meta.get("model_type") not in (None, *_hf_types(cfg)):
        problems.append(f"model_type: the base is {' / '.join(repr(t) for t in _hf_types(cfg))}, the adapter was "
                        f"trained on {meta['model_type']!r}")
    if meta.get("hidden_size") not in (None, cfg.dim):
        problems.append(f"hidden_size: the base has {cfg.dim}, the adapter {meta['hidden_size']}")
    collect(problems, AdapterMismatchError, f"AdapterHub adapter {folder} does not fit this base:")
    kind = _kind(c)
    # the adapter's own name: every key carries it (…adapters.<n>.… / …loras.<n>.…)
    names = {m.group(1) for k in tensors if (m := re.search(r"\.(?:adapters|loras)\.([^.]+)\.", k))}
    if len(names) != 1:
        raise FormatError(f"{folder}: expected the tensors of one adapter, found adapter names {sorted(names)}")
    own = names.pop()
    common = dict(name=name or meta.get("name") or own, version=version, arch=cfg.arch, fingerprint=manifest.fingerprint,
                  source=f"adapterhub:{Path(folder).name}")
    if kind == "bottleneck":
        return _bottleneck(c, tensors, cfg, common)
    return _lora_family(kind, c, _alpha(meta), tensors, cfg, common)


def _hf_types(cfg: Any) -> tuple[str, ...]:
    """The Hugging Face model types this base's architecture comes from (llama: llama, mistral)."""
    if getattr(cfg, "family", None) == "encoder":
        return ("bert",)
    return tuple(t for t, (arch, _, _) in HF_MODEL_TYPES.items() if arch == cfg.arch) or (cfg.arch,)


def _bottleneck(c: dict[str, Any], tensors: dict[str, np.ndarray], cfg: Any, common: dict[str, Any]) -> BottleneckAdapter:
    _refuse(c, _BN_UNSUPPORTED, "bottleneck")
    parts = r"\.adapters\.[^.]+\.(adapter_down\.[01]|adapter_up|adapter_norm_before|adapter_norm_after|scaling)" \
        r"(?:\.(weight|bias))?$"
    if getattr(cfg, "family", None) == "encoder":
        pat = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.(attention\.output|output)" + parts)
        position = {"attention.output": "attn", "output": "ffn"}
    elif cfg.arch in DECODER_ARCHES:
        # AdapterHub's Llama / Mistral: attention_adapters after o_proj, output_adapters after the MLP, each
        # called with layer_norm=None
        if c.get("residual_before_ln") == "post_add" and not c.get("is_parallel"):
            raise UnsupportedError("AdapterHub bottleneck option residual_before_ln='post_add' is not supported on "
                                   f"a {cfg.arch!r} decoder: its blocks pass no LayerNorm to the adapter, so AdapterHub "
                                   "sets no adapter residual (its own forward fails); use true or false")
        pat = re.compile(r"(?:^|\.)layers\.(\d+)\.(attention_adapters|output_adapters)" + parts)
        position = {"attention_adapters": "attn", "output_adapters": "ffn"}
    else:
        raise UnsupportedError("AdapterHub bottleneck adapters are supported on encoder bases (BERT family) and "
                               f"llama-family decoders ({', '.join(DECODER_ARCHES)}); this base is a {cfg.arch!r} "
                               "decoder, whose blocks have no bottleneck slots")
    params: dict[str, dict[str, np.ndarray]] = {}
    unknown = []
    # adapter_down is Sequential([LayerNorm if ln_before], Linear, activation): the LayerNorm is also
    # saved as adapter_norm_before
    ln_b = bool(c.get("ln_before"))
    part = {"adapter_down.0": "ln_before" if ln_b else "down", "adapter_down.1": "down" if ln_b else "?",
            "adapter_up": "up", "adapter_norm_before": "ln_before", "adapter_norm_after": "ln_after",
            "scaling": "scaling"}
    for k, v in tensors.items():
        m = pat.search(k)
        if not m or part[m.group(3)] == "?":
            unknown.append(k)
            continue
        t = target_name(int(m.group(1)), position[m.group(2)])
        p, wb = part[m.group(3)], m.group(4)
        key = p if p == "scaling" else (f"{p}_bias" if wb == "bias" else p) if p in ("down", "up") else \
            f"{p}_{'w' if wb == 'weight' else 'b'}"
        params.setdefault(t, {})[key] = v
    if unknown:
        raise UnsupportedError(f"AdapterHub bottleneck tensors this converter cannot place: {unknown[:5]}")
    scaling = c.get("scaling", 1.0)
    for q in params.values():
        s = q.pop("scaling", None)
        s = np.float32(scaling) if s is None and isinstance(scaling, (int, float)) else s
        if s is None:
            raise FormatError(f"bottleneck scaling {scaling!r} is learned but the tensors hold no scaling")
        s = np.asarray(s, np.float32).reshape(-1)  # [1] or [dim]
        q["up"] = q["up"] * (s[:, None] if s.size > 1 else s[0])
        q["up_bias"] = q["up_bias"] * s if s.size > 1 else q["up_bias"] * s[0]
    return BottleneckAdapter(ctrl=placement(c), params=params, config=dict(c), **common)


def _lora_family(kind: str, c: dict[str, Any], alpha: float, tensors: dict[str, np.ndarray], cfg: Any,
                 common: dict[str, Any]) -> Any:
    _refuse(c, _LORA_UNSUPPORTED, kind)
    target_of = _target_namer(cfg)
    by_target: dict[str, dict[str, np.ndarray]] = {}
    unknown = []
    for k, v in tensors.items():
        m = re.fullmatch(r"(.+)\.loras\.[^.]+\.(lora_A|lora_B)", k)
        t = target_of(m.group(1)) if m else None
        if t is None:
            unknown.append(k)
            continue
        by_target.setdefault(t, {})[m.group(2)] = v
    if unknown:
        raise UnsupportedError(f"AdapterHub {kind} tensors with no linear weight of this {cfg.arch} base: {unknown[:5]}")
    if kind == "ia3":
        params = {t: {"ia3_out": (p["lora_B"].reshape(-1) * np.float32(alpha)).astype(np.float32)}
                  for t, p in by_target.items()}
        heads = {t: h for t in params if (h := _heads(cfg, t))}
        return Ia3Adapter(params=params, heads=heads, **common)
    r = float(c.get("r", 8))
    factors = {}
    for t, p in by_target.items():
        if "lora_A" not in p or "lora_B" not in p:
            raise FormatError(f"{t}: LoRA needs lora_A and lora_B, found {sorted(p)}")
        b = p["lora_B"] * np.float32(alpha / r)
        h = _heads(cfg, t)
        factors[t] = (np.ascontiguousarray(p["lora_A"]), np.ascontiguousarray(permute_qk(b, h) if h else b))
    return LoraDelta(factors=factors, **common)


def _heads(cfg: Any, target: str) -> int | None:
    return None if getattr(cfg, "family", None) == "encoder" else qk_heads(cfg, target)


def _target_namer(cfg: Any):
    if getattr(cfg, "family", None) == "encoder":
        from edgeadapt.converters.hf_encoder import encoder_gguf_name
        linear = cfg.linear_shapes()

        def enc(module: str) -> str | None:
            n = encoder_gguf_name(cfg, module + ".weight")
            return n if n in linear else None
        return enc
    from edgeadapt.formats.names import gguf_name
    linear = cfg.linear_shapes()

    def dec(module: str) -> str | None:
        for pre in ("", "model."):
            n = gguf_name(cfg, pre + module + ".weight")
            if n in linear:
                return n
        return None
    return dec


# ---- delta files
def is_adapterhub(folder: str | Path) -> bool:
    """Is this an AdapterHub adapter folder (``adapter_config.json`` with a ``config`` object, and
    ``adapter.safetensors`` or ``pytorch_adapter.bin``)?"""
    folder = Path(folder)
    p = folder / "adapter_config.json"
    if not folder.is_dir() or not p.is_file():
        return False
    try:
        meta = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return (isinstance(meta, dict) and isinstance(meta.get("config"), dict)
            and any((folder / f).is_file() for f in ("adapter.safetensors", "pytorch_adapter.bin")))


def export_adapterhub(folder: str | Path, manifest: Any, out: str | Path, *, name: str | None = None,
                      version: int = 1, dtype: str = "F32") -> Path:
    """Convert an AdapterHub folder to a delta file pinned to ``manifest``'s base (kind ``lora``,
    ``ia3`` or ``bottleneck``); verified against the base before anything is written."""
    from edgeadapt.formats.delta import write_delta

    adapter = convert_adapterhub(folder, manifest, name=name, version=version)
    if getattr(manifest.arch, "family", None) == "encoder":
        from edgeadapt.runtime.encoder import check_adapter
        check_adapter(manifest.arch, manifest.fingerprint, adapter)
    else:
        adapter.check_base(manifest.arch, manifest.fingerprint)
    write_delta(out, adapter, dtype=dtype)
    return Path(out)
