"""A llama.cpp LoRA GGUF (as ``convert_lora_to_gguf.py`` writes it) -> our canonical LoRA factors.

What llama.cpp's converter writes and ``src/llama-adapter.cpp`` reads:

- ``general.type = "adapter"``, ``adapter.type = "lora"``, ``general.architecture`` the base's;
  ``adapter.lora.alpha`` (float32; missing means 0);
- per adapted base tensor ``<w>`` (llama.cpp's GGUF name, e.g. ``blk.3.attn_q.weight``):
  ``<w>.lora_a`` = A [r, in] and ``<w>.lora_b`` = B [out, r] (numpy order; ggml ``ne`` reversed), of type
  F32, F16, BF16 or Q8_0 (Q8_0 files keep a factor whose last dimension is not a multiple of 32 in F16);
- the rows of B for q / k of "norm"-rope models permuted as the base converter permutes the base's
  rows — the layout of our base and delta files, so nothing is permuted here;
- for the token embedding, ``token_embd.weight.lora_a`` transposed: [vocab, r], B [dim, r].

llama.cpp applies ``scale = alpha / r`` (r read from B) or 1 when alpha is 0; that scale is folded into
B here, as our format stores it (alpha 0). Files llama.cpp's converter makes from mergekit's
``extract-lora`` may carry whole norm tensors beside the factors: a replacement, not a LoRA, refused by
name. The file is read with our strict GGUF reader.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np

from edgeadapt.errors import AdapterMismatchError, FormatError, UnsupportedError, collect
from edgeadapt.formats.arch import CONV1D_ARCHES, ArchConfig
from edgeadapt.formats.gguf_file import open_gguf, tensor_view

from edgeadapt.converters.importers.common import (EMBED, Imported, arch_problem, finite_problems,
                                                   target_problems)

_T = gguf.GGMLQuantizationType
TYPES = (_T.F32, _T.F16, _T.BF16, _T.Q8_0)  # what convert_lora_to_gguf.py writes (--outtype f32/f16/bf16/q8_0)
K_TYPE, K_ADAPTER, K_ALPHA = gguf.Keys.General.TYPE, gguf.Keys.Adapter.TYPE, gguf.Keys.Adapter.LORA_ALPHA
K_ARCH = gguf.Keys.General.ARCHITECTURE
_NUMBERS = ("FLOAT32", "FLOAT64", "UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64")


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _float(data: np.ndarray, t) -> np.ndarray:
    v = tensor_view(data, t)
    if t.ttype in (_T.F32, _T.F16):
        return v.astype(np.float32)
    return gguf.quants.dequantize(v.reshape(-1, v.shape[-1]), t.ttype).reshape(t.shape).astype(np.float32)


def read_llama_lora(path: str | Path, cfg: ArchConfig) -> Imported:
    """Read and check a llama.cpp LoRA GGUF against the base card ``cfg``; raises naming every problem."""
    path = Path(path)
    g = open_gguf(path)
    f = {k: x.value for k, x in g.fields.items()}
    if "edgeadapt.format" in f:
        raise FormatError(f"{path}: already an edgeadapt delta file (pinned to {f.get('edgeadapt.base.fingerprint')}); "
                          "load it with add_adapter / --adapter as it is, nothing to import")
    if f.get(K_TYPE) != "adapter" or f.get(K_ADAPTER) != "lora":
        what = "a model, not an adapter" if f.get(K_TYPE, "model") == "model" else f"{K_TYPE}={f.get(K_TYPE)!r}"
        raise FormatError(f"{path}: expected a llama.cpp LoRA GGUF ({K_TYPE}='adapter', {K_ADAPTER}='lora'), found "
                          f"{what}, {K_ADAPTER}={f.get(K_ADAPTER)!r}")
    if gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS in f:
        raise UnsupportedError(f"{path}: an activated LoRA (aLoRA: it acts only after its invocation tokens); "
                               "edgeadapt applies a LoRA to every token and cannot run it as trained")
    problems = arch_problem(cfg, f.get(K_ARCH), path.name)
    alpha = 0.0
    if K_ALPHA in f:
        a = g.fields[K_ALPHA]
        if a.vtype not in _NUMBERS or not math.isfinite(float(a.value)):
            problems.append(f"{K_ALPHA}: expected a finite float32, found {a.vtype} {a.value!r}")
        else:
            alpha = float(a.value)
    parts: dict[str, dict[str, object]] = {}
    for t in g.tensors:
        base, dot, role = t.name.rpartition(".")
        if not dot or role not in ("lora_a", "lora_b"):
            kind = ("a whole norm tensor (mergekit extract-lora)" if "norm" in t.name
                    else "not a .lora_a / .lora_b factor")
            problems.append(f"{t.name}: {kind}; only LoRA factors can be imported")
            continue
        if t.ttype not in TYPES:
            problems.append(f"{t.name}: type {t.ttype.name}; llama.cpp's converter writes "
                            f"{', '.join(x.name for x in TYPES)}, and those are what this importer reads")
            continue
        if len(t.shape) != 2:
            problems.append(f"{t.name}: expected a 2-D factor, found shape {list(t.shape)}")
            continue
        parts.setdefault(base, {})[role] = t
    imp = Imported(fmt="llama.cpp LoRA GGUF")
    types: set[str] = set()
    flip = _conv1d_flipped(cfg, parts)
    for w in sorted(parts):
        p = parts[w]
        if set(p) != {"lora_a", "lora_b"}:
            problems.append(f"{w}: has {', '.join(sorted(p))} without its pair")
            continue
        ta, tb = p["lora_a"], p["lora_b"]
        types |= {ta.ttype.name, tb.ttype.name}
        a_shape = ta.shape[::-1] if w == EMBED else ta.shape  # token_embd's A is stored [vocab, r]
        b_shape = tb.shape
        if flip and w != EMBED:  # (B A)ᵀ = Aᵀ Bᵀ: lora_a holds Bᵀ, lora_b holds Aᵀ
            a_shape, b_shape = tb.shape[::-1], ta.shape[::-1]
        bad = target_problems(cfg, w, a_shape, b_shape)
        if bad:
            problems += bad
            continue
        a, b = _float(g.data, ta), _float(g.data, tb)
        if flip and w != EMBED:
            a, b = b.T, a.T
        r = b.shape[1]
        scale = alpha / r if alpha else 1.0  # llama.cpp: alpha / rank (rank read from B), or 1 when alpha is 0
        b = (b * np.float32(scale)).astype(np.float32)
        bad = finite_problems(w, a, b)
        if bad:
            problems += bad
            continue
        if w == EMBED:
            imp.embed = (np.ascontiguousarray(a.T), np.ascontiguousarray(b))
        else:
            imp.factors[w] = (np.ascontiguousarray(a), np.ascontiguousarray(b))
    if not parts and not problems:
        problems.append("no .lora_a / .lora_b tensors")
    collect(problems, AdapterMismatchError, f"{path}: this llama.cpp LoRA does not fit the base:")
    imp.notes += [f"adapter.lora.alpha {alpha:g}" + (" (scale alpha/r folded into B)" if alpha else " (scale 1)"),
                  f"factors {'/'.join(sorted(types))}"]
    if flip:
        imp.notes.append("Conv1D factors transposed back (llama.cpp's converter transposes PEFT's [out, in] LoRA of "
                         "GPT-2 a second time)")
    return imp


def _conv1d_flipped(cfg: ArchConfig, parts: dict[str, dict[str, object]]) -> bool:
    """Whether the factors of a Conv1D architecture (GPT-2) hold the transposed change, as llama.cpp's
    ``convert_lora_to_gguf.py`` writes them: its GPT-2 converter transposes Conv1D weights [in, out] to
    [out, in], and applies that to PEFT's LoRA, whose factors are already [out, in] — llama.cpp itself
    refuses such a file (or, for a square weight alone, computes the transposed change). Decided by the
    non-square targets: every one transposed -> True; a file with only square targets is read as stored."""
    if cfg.arch not in CONV1D_ARCHES:
        return False
    linear, seen = cfg.linear_shapes(), set()
    for w, p in parts.items():
        if w in linear and set(p) == {"lora_a", "lora_b"} and linear[w][0] != linear[w][1]:
            seen.add((p["lora_b"].shape[0], p["lora_a"].shape[1]) == linear[w][::-1])
    return seen == {True}
