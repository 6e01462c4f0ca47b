"""PEFT folders whose adapters act on embeddings or the sequence -> :class:`edgeadapt.kinds.sequence.SeqAdapter`.

Handled (PEFT 0.21 key names, ``base_model.model.`` prefix):

- LoRA on ``embed_tokens``: ``…embed_tokens.lora_embedding_A`` [r, vocab] / ``_B`` [dim, r], scale alpha/r
  (rsLoRA alpha/√r, ``rank_pattern`` / ``alpha_pattern`` as for linears). PEFT also saves the whole
  base embedding (``…embed_tokens.base_layer.weight``): it is checked against the base, never kept.
- trainable tokens: ``trainable_token_indices`` of a LoRA config (``…embed_tokens.token_adapter.
  trainable_tokens_delta``) or a ``TRAINABLE_TOKENS`` config (``token_indices``,
  ``…embed_tokens.trainable_tokens_delta``): [n, dim] rows that replace the embedding's rows.
- ``modules_to_save``: ``lm_head`` (a replaced output head, merged) and ``embed_tokens`` (kept as
  replaced rows: only the rows that differ from the base when its float32 table is at hand).

On a base whose head is tied to the embedding, PEFT 0.21 ties trainable tokens to the head (the head
rows of those ids are replaced by the same rows), trains a separate copy of ``lm_head`` in
``modules_to_save`` (the embedding stays the base's), and ties the head to a saved embedding only with
``ensure_weight_tying``. The head's changed rows are kept as ``head_rows`` and run live.
- prompt tuning (``PROMPT_TUNING``) and prefix tuning (``PREFIX_TUNING``): ``prompt_embeddings``.

Linear LoRA factors saved beside these parts are converted as :mod:`edgeadapt.converters.peft.lora` does.
Anything else (norms in ``modules_to_save``, encoder-decoder prompt learning, …) is refused by name.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.formats.arch import ArchConfig
from edgeadapt.errors import AdapterMismatchError, FormatError, UnsupportedError, collect
from edgeadapt.kinds.sequence import SeqAdapter, hf_prefix_to_base

from edgeadapt.converters.peft.lora import (PREFIX, adapter_config, lora_factors, pattern_key, read_peft_config,
                                           read_peft_tensors)

SEQ_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING", "TRAINABLE_TOKENS")
EMBED = "model.embed_tokens"
HEAD = "lm_head"
# the keys of each part, after the prefix
K_EMB_A, K_EMB_B, K_EMB_BASE = (f"{EMBED}.lora_embedding_A", f"{EMBED}.lora_embedding_B",
                                f"{EMBED}.base_layer.weight")
K_TT = (f"{EMBED}.token_adapter.trainable_tokens_delta", f"{EMBED}.trainable_tokens_delta")


def is_seq_config(pc: dict[str, Any]) -> bool:
    """Does this PEFT config need this converter (rather than the plain LoRA one)?"""
    if pc.get("peft_type") in SEQ_TYPES:
        return True
    if pc.get("peft_type") != "LORA" or pc.get("use_dora"):
        return False
    tm = pc.get("target_modules") or []
    tm = [tm] if isinstance(tm, str) else list(tm)
    return bool(pc.get("trainable_token_indices") or pc.get("modules_to_save") or any(_is_embed(t) for t in tm))


def _is_embed(module: str) -> bool:
    return module == "embed_tokens" or module.endswith(".embed_tokens")


def _base_embedding(manifest: Any) -> np.ndarray | None:
    """The base's float32 token_embd [vocab, dim], memory-mapped from model.onnx.data, or None."""
    e = (manifest.tensors.get("token_embd.weight") or {}).get("onnx") if hasattr(manifest, "tensors") else None
    if not isinstance(e, dict) or e.get("dtype") != "float32" or e.get("layout") != "as_is":
        return None
    f = Path(manifest.root) / e["file"]
    if not f.is_file():
        return None
    return np.memmap(f, dtype="<f4", mode="r", offset=int(e["offset"]), shape=tuple(e["shape"]))


def _token_indices(pc: dict[str, Any], folder: Path) -> list[int]:
    raw = pc.get("token_indices") if pc.get("peft_type") == "TRAINABLE_TOKENS" else pc.get("trainable_token_indices")
    if isinstance(raw, dict):  # {module name: indices}
        other = [k for k in raw if not _is_embed(k)]
        if other:
            raise UnsupportedError(f"{folder}: trainable tokens on {other} are not supported (embed_tokens only)")
        raw = next(iter(raw.values()), [])
    if not isinstance(raw, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in raw):
        raise FormatError(f"{folder}: trainable token indices must be a list of integers, found {raw!r}")
    return raw


def convert_peft_seq(folder: str | Path, manifest: Any, *, name: str | None = None, version: int = 1,
                     description: str = "") -> SeqAdapter:
    """Read a PEFT folder of one of these kinds into an adapter for the base of ``manifest``."""
    folder = Path(folder)
    pc = adapter_config(folder)
    cfg: ArchConfig = manifest.arch
    kind = pc.get("peft_type")
    tensors = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in read_peft_tensors(folder).items()}
    common = dict(name=name or folder.name, version=version, arch=cfg.arch, fingerprint=manifest.fingerprint,
                  path=str(folder), description=description)
    if kind in ("PROMPT_TUNING", "PREFIX_TUNING"):
        adapter = _prompt_learning(folder, pc, cfg, tensors, common)
    elif kind == "TRAINABLE_TOKENS":
        tm = pc.get("target_modules") or []
        tm = [tm] if isinstance(tm, str) else list(tm)
        if any(not _is_embed(t) for t in tm):
            raise UnsupportedError(f"{folder}: TRAINABLE_TOKENS on {tm} is not supported (embed_tokens only)")
        rows = _tt_rows(folder, pc, cfg, tensors, [])
        adapter = SeqAdapter.build("trainable_tokens", token_rows=rows, head_rows=rows if cfg.tied_embeddings else None,
                                   source="peft TRAINABLE_TOKENS", **common)
    elif kind == "LORA":
        adapter = _lora(folder, pc, cfg, tensors, manifest, common)
    else:
        raise UnsupportedError(f"{folder}: PEFT kind {kind!r} is not one this converter handles "
                               f"(LORA with embed_tokens / trainable tokens / modules_to_save, {', '.join(SEQ_TYPES)})")
    adapter.check_base(cfg, manifest.fingerprint)
    return adapter


def _prompt_learning(folder: Path, pc: dict[str, Any], cfg: ArchConfig, tensors: dict[str, np.ndarray],
                     common: dict[str, Any]) -> SeqAdapter:
    kind = pc["peft_type"]
    if pc.get("task_type") not in (None, "CAUSAL_LM"):
        raise UnsupportedError(f"{folder}: {kind} with task_type={pc.get('task_type')!r} is not supported (CAUSAL_LM)")
    if int(pc.get("num_transformer_submodules") or 1) != 1:
        raise UnsupportedError(f"{folder}: {kind} with num_transformer_submodules="
                               f"{pc.get('num_transformer_submodules')} (encoder-decoder) is not supported")
    p = tensors.get("prompt_embeddings")
    others = sorted(set(tensors) - {"prompt_embeddings"})
    if p is None or others:
        raise FormatError(f"{folder}: a {kind} folder holds exactly 'prompt_embeddings'; found {sorted(tensors)}")
    n = int(pc.get("num_virtual_tokens") or p.shape[0])
    problems = []
    if kind == "PROMPT_TUNING":
        if p.shape != (n, cfg.dim):
            problems.append(f"prompt_embeddings: expected [{n}, {cfg.dim}] (num_virtual_tokens × hidden size), "
                            f"found {list(p.shape)}")
        collect(problems, AdapterMismatchError, f"{folder}: the PEFT prompt tuning adapter does not fit this base:")
        return SeqAdapter.build("prompt_tuning", prompt=np.ascontiguousarray(p, np.float32),
                          source=f"peft PROMPT_TUNING n_virtual={n}", **common)
    want = cfg.n_layers * 2 * cfg.kv_dim
    for key, got, exp in (("num_layers", pc.get("num_layers"), cfg.n_layers),
                          ("num_attention_heads", pc.get("num_attention_heads"), cfg.n_kv_heads),
                          ("token_dim", pc.get("token_dim"), cfg.kv_dim)):
        if got is not None and got != exp:
            problems.append(f"{key}: expected {exp} for this base (prefix keys/values are per kv head), found {got}")
    if p.shape != (n, want):
        problems.append(f"prompt_embeddings: expected [{n}, {want}] (num_virtual_tokens × layers {cfg.n_layers} × 2 × "
                        f"kv heads {cfg.n_kv_heads} × head_dim {cfg.head_dim}), found {list(p.shape)}")
    collect(problems, AdapterMismatchError, f"{folder}: the PEFT prefix tuning adapter does not fit this base:")
    return SeqAdapter.build("prefix_tuning", prefix=hf_prefix_to_base(p, cfg),
                      source=f"peft PREFIX_TUNING n_virtual={n}", **common)


def _tt_rows(folder: Path, pc: dict[str, Any], cfg: ArchConfig, tensors: dict[str, np.ndarray],
             problems: list[str]) -> tuple[np.ndarray, np.ndarray]:
    idx = _token_indices(pc, folder)
    key = next((k for k in K_TT if k in tensors), None)
    if key is None:
        raise FormatError(f"{folder}: trainable tokens configured but no {' or '.join(K_TT)} saved")
    rows = np.asarray(tensors.pop(key), np.float32)
    if rows.shape != (len(idx), cfg.dim):
        problems.append(f"{key}: expected [{len(idx)}, {cfg.dim}] (one row per trainable token), found {list(rows.shape)}")
    return np.asarray(idx, np.int64), rows


def _lora(folder: Path, pc: dict[str, Any], cfg: ArchConfig, tensors: dict[str, np.ndarray], manifest: Any,
          common: dict[str, Any]) -> SeqAdapter:
    pc = read_peft_config(folder, handled=("modules_to_save", "trainable_token_indices"))  # LoRA options checked
    problems: list[str] = []
    parts: dict[str, Any] = {}
    kinds = []
    base_e = _base_embedding(manifest)
    # ---- embedding LoRA
    if K_EMB_A in tensors or K_EMB_B in tensors:
        a, b = tensors.pop(K_EMB_A, None), tensors.pop(K_EMB_B, None)
        if a is None or b is None:
            raise FormatError(f"{folder}: {K_EMB_A} and {K_EMB_B} come in pairs; found only one")
        rk, ak = pattern_key(list(pc.get("rank_pattern") or {}), EMBED), pattern_key(list(pc.get("alpha_pattern") or {}), EMBED)
        r = int(pc["rank_pattern"][rk]) if rk is not None else int(pc.get("r", 8))
        alpha = float(pc["alpha_pattern"][ak]) if ak is not None else float(pc.get("lora_alpha", 8))
        if a.shape[0] != r or b.shape[1] != r:
            problems.append(f"{EMBED}: expected rank {r} (from the config), found A {list(a.shape)} and B {list(b.shape)}")
        s = alpha / math.sqrt(r) if pc.get("use_rslora") else alpha / r
        parts["embed_lora"] = (np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b * np.float32(s), np.float32))
        kinds.append("embedding_lora")
        saved = tensors.pop(K_EMB_BASE, None)  # PEFT's copy of the base embedding: checked, not kept
        if saved is not None and base_e is not None and saved.shape == base_e.shape:
            err = float(np.abs(saved - base_e).max())
            if err > 1e-5 * max(1.0, float(np.abs(base_e).max())):
                problems.append(f"{K_EMB_BASE}: the embedding PEFT saved differs from this base's (max |Δ| {err:.3g}); "
                                "the adapter was trained on another base")
    # ---- trainable tokens
    if pc.get("trainable_token_indices"):
        parts["token_rows"] = _tt_rows(folder, pc, cfg, tensors, problems)
        if cfg.tied_embeddings:  # PEFT ties a TrainableTokensLayer on lm_head to the embedding's
            parts["head_rows"] = parts["token_rows"]
        kinds.append("trainable_tokens")
    # ---- modules_to_save
    mts = pc.get("modules_to_save") or []
    seen: set[str] = set()  # PEFT may list one module twice ("embed_tokens", "model.embed_tokens")
    for module in ([mts] if isinstance(mts, str) else list(mts)):
        part = HEAD if module == HEAD or module.endswith("." + HEAD) else EMBED if _is_embed(module) else module
        if part in seen:
            continue
        seen.add(part)
        if module == HEAD or module.endswith("." + HEAD):
            w = tensors.pop(f"{HEAD}.weight", None)
            if w is None:
                raise FormatError(f"{folder}: modules_to_save names {module!r} but {PREFIX}{HEAD}.weight is not saved")
            if not cfg.tied_embeddings:
                parts["head"] = np.ascontiguousarray(w, np.float32)
            elif w.shape != (cfg.vocab_size, cfg.dim):
                problems.append(f"{HEAD}.weight: expected [{cfg.vocab_size}, {cfg.dim}], found {list(w.shape)}")
            else:  # a trained copy of the tied head: its rows that differ from the embedding, live
                ids = np.arange(cfg.vocab_size) if base_e is None else np.flatnonzero((w != base_e).any(axis=1))
                parts["head_rows"] = (ids.astype(np.int64), np.ascontiguousarray(w[ids], np.float32))
        elif _is_embed(module):
            w = tensors.pop(f"{EMBED}.weight", None)
            if w is None or w.shape != (cfg.vocab_size, cfg.dim):
                raise FormatError(f"{folder}: modules_to_save names {module!r}; expected {PREFIX}{EMBED}.weight "
                                  f"[{cfg.vocab_size}, {cfg.dim}], found {None if w is None else list(w.shape)}")
            if "token_rows" in parts:
                raise UnsupportedError(f"{folder}: trainable tokens and modules_to_save of the embedding together")
            ids = np.arange(cfg.vocab_size) if base_e is None else np.flatnonzero((w != base_e).any(axis=1))
            parts["token_rows"] = (ids.astype(np.int64), np.ascontiguousarray(w[ids], np.float32))
            if cfg.tied_embeddings and pc.get("ensure_weight_tying"):  # PEFT ties the head to the saved copy
                if "head_rows" in parts:
                    raise UnsupportedError(f"{folder}: modules_to_save of lm_head and embed_tokens on a tied head")
                parts["head_rows"] = parts["token_rows"]
                h = tensors.pop(f"{HEAD}.weight", None)  # PEFT saves the tied head too: the same table
                if h is not None and not np.array_equal(h, w):
                    problems.append(f"{HEAD}.weight: saved beside a tied embedding copy, expected the same table")
        else:
            raise UnsupportedError(f"{folder}: modules_to_save={module!r} is not supported (lm_head and embed_tokens are)")
        kinds.append("modules_to_save")
    collect(problems, AdapterMismatchError, f"{folder}: the PEFT adapter does not fit this base:")
    factors = lora_factors(cfg, pc, {PREFIX + k: v for k, v in tensors.items()}) if tensors else {}
    return SeqAdapter.build(kinds[0] if kinds else "embedding_lora", factors=factors,
                      source=f"peft LORA ({', '.join(kinds)}) linear targets={len(factors)}", **parts, **common)

