"""An mlx-lm adapter folder (``mlx_lm.lora``: LoRA or DoRA) -> our canonical factors.

What ``mlx_lm.lora`` saves (``mlx_lm/tuner/lora.py``, ``dora.py``, ``utils.py``):

- ``adapter_config.json``: ``fine_tune_type`` ("lora" | "dora" | "full"; older files: ``use_dora``),
  ``num_layers`` (the last N blocks are adapted; -1 all; older files: ``lora_layers``) and
  ``lora_parameters`` = {``rank``, ``scale``, ``dropout``, optional ``keys``: the module paths inside a
  block that were adapted};
- ``adapters.safetensors``: the trainable parameters, ``<module>.lora_a`` [in, r] and ``<module>.lora_b``
  [r, out] for a linear (``model.layers.N.self_attn.q_proj.lora_a``), plus ``<module>.m`` [out] for DoRA;
  an embedding LoRA stores ``lora_a`` [vocab, r], ``lora_b`` [r, dim].

mlx-lm computes y = x Wᵀ + scale · (x A) B: in PEFT's terms A_peft = Aᵀ, B_peft = scale · Bᵀ. DoRA:
y = m / ‖W + scale·BᵀAᵀ‖_row ⊙ (x Wᵀ + scale · (x A) B) + bias — PEFT's DoRA, so it becomes a ``dora``
delta. mlx-lm's MoE (SwitchLinear) LoRA, DoRA on embeddings and full fine-tunes are refused by name.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.errors import AdapterMismatchError, FormatError, UnsupportedError, collect
from edgeadapt.formats.arch import ArchConfig, permute_qk, qk_heads

from edgeadapt.converters.importers.common import (EMBED, Imported, finite_problems, layer_problem,
                                                   module_target, target_problems)

CONFIG, WEIGHTS = "adapter_config.json", "adapters.safetensors"
_KEY = re.compile(r"(.+)\.(lora_a|lora_b|m)")


def is_mlx_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def _config(folder: Path) -> dict[str, Any]:
    from edgeadapt.formats.manifest import load_json

    cfg = load_json(folder / CONFIG, 1 << 20)
    if not isinstance(cfg, dict):
        raise FormatError(f"{folder / CONFIG}: expected a JSON object, found {type(cfg).__name__}")
    return cfg


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    """``adapters.safetensors`` as float32 (safetensors validates the header; bf16 goes through torch)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return {k: v.float().numpy() for k, v in load_file(str(folder / WEIGHTS)).items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{folder / WEIGHTS}: not a readable safetensors file: {e}") from None


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_mlx_adapter(folder: str | Path, cfg: ArchConfig) -> Imported:
    """Read and check an mlx-lm adapter folder against the base card ``cfg``; raises naming every problem."""
    folder = Path(folder)
    conf = _config(folder)
    where = folder / CONFIG
    kind = conf.get("fine_tune_type", "dora" if conf.get("use_dora") else "lora")
    if kind == "full":
        raise UnsupportedError(f"{where}: fine_tune_type 'full' saves whole weights, not an adapter; reduce it to a "
                               "low-rank delta with: edgeadapt extract")
    if kind not in ("lora", "dora"):
        raise UnsupportedError(f"{where}: fine_tune_type {kind!r}; this importer reads 'lora' and 'dora'")
    lp = conf.get("lora_parameters")
    problems: list[str] = []
    if not isinstance(lp, dict):
        raise FormatError(f"{where}: expected lora_parameters {{rank, scale, …}}, found {lp!r}")
    if "scale" not in lp:
        hint = " ('alpha' is not mlx-lm's key: it scales by 'scale')" if "alpha" in lp else ""
        problems.append(f"lora_parameters.scale: missing{hint}")
    elif not _number(lp["scale"]):
        problems.append(f"lora_parameters.scale: expected a finite number, found {lp['scale']!r}")
    rank = lp.get("rank")
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
        problems.append(f"lora_parameters.rank: expected a positive integer, found {rank!r}")
    n = conf.get("num_layers", conf.get("lora_layers", -1))
    if not (isinstance(n, int) and not isinstance(n, bool)) or n == 0 or n < -1:
        problems.append(f"num_layers: expected a positive integer or -1, found {n!r}")
    elif n > cfg.n_layers:
        problems.append(f"num_layers: {n} adapted layers, but the base has {cfg.n_layers}")
    collect(problems, FormatError, f"{where}: bad mlx-lm adapter options:")
    scale = np.float32(lp["scale"])
    first = 0 if n == -1 else cfg.n_layers - n  # mlx-lm adapts model.layers[-num_layers:]
    modules: dict[str, dict[str, np.ndarray]] = {}
    for k, v in _tensors(folder).items():
        m = _KEY.fullmatch(k)
        if not m:
            problems.append(f"{k}: not an mlx-lm adapter parameter (<module>.lora_a | .lora_b | .m)")
            continue
        modules.setdefault(m.group(1), {})[m.group(2)] = v
    imp = Imported(fmt=f"mlx-lm {kind.upper()} adapter")
    want = {"lora_a", "lora_b"} | ({"m"} if kind == "dora" else set())
    for module in sorted(modules):
        p = modules[module]
        target = module_target(cfg, module, problems)
        if target is None:
            continue
        if set(p) != want:
            problems.append(f"{module}: expected {', '.join(sorted(want))} ({kind}), found {', '.join(sorted(p))}")
            continue
        if any(x.ndim != 2 for x in (p["lora_a"], p["lora_b"])):
            problems.append(f"{module}: factors of shapes {list(p['lora_a'].shape)}, {list(p['lora_b'].shape)}; "
                            "expected 2-D (mlx-lm's MoE SwitchLinear LoRA is not supported)")
            continue
        bad = layer_problem(cfg, target)
        blk = re.match(r"blk\.(\d+)\.", target)
        if not bad and blk and int(blk.group(1)) < first:
            bad = f"{target}: num_layers={n} adapts blk.{first}…blk.{cfg.n_layers - 1} of this base"
        if bad:
            problems.append(bad)
            continue
        if target == EMBED:  # z = scale · lora_a[ids] @ lora_b: A_ours = lora_aᵀ [r, vocab], B = scale · lora_bᵀ
            if kind == "dora":
                problems.append(f"{module}: DoRA on the embedding is not supported")
                continue
            a, b = p["lora_a"].T, scale * p["lora_b"].T
        else:  # y += scale · (x lora_a) lora_b: A = lora_aᵀ [r, in], B = scale · lora_bᵀ [out, r]
            a, b = p["lora_a"].T, scale * p["lora_b"].T
        found = target_problems(cfg, target, a.shape, b.shape)
        if not found and a.shape[0] != rank:
            found = [f"{module}: rank {a.shape[0]}, but lora_parameters.rank is {rank}"]
        if not found and kind == "dora" and p["m"].shape != (b.shape[0],):
            found = [f"{module}.m: expected [{b.shape[0]}], found {list(p['m'].shape)}"]
        found = found or finite_problems(module, a, b, *([p["m"]] if kind == "dora" else []))
        if found:
            problems += found
            continue
        a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
        if target == EMBED:
            imp.embed = (a, b)
        elif kind == "dora":  # training-library row order; the delta records the q/k permutation
            imp.dora[target] = {"lora_a": a, "lora_b": b, "dora_m": np.ascontiguousarray(p["m"], np.float32)}
        else:
            heads = qk_heads(cfg, target)
            imp.factors[target] = (a, np.ascontiguousarray(permute_qk(b, heads)) if heads else b)
    if not modules and not problems:
        problems.append("no lora_a / lora_b parameters")
    collect(problems, AdapterMismatchError, f"{folder}: this mlx-lm adapter does not fit the base:")
    imp.notes += [f"rank {rank}, scale {float(scale):g} folded into B", f"num_layers {n}"]
    return imp
