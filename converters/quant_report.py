"""The error report: how far a shipped form (quantized delta, extracted delta, merged base) is from
its float32 reference, measured on the model's outputs.

For each prompt the reference generates greedily; both sides are then run teacher-forced on the
reference's tokens, and at every predicting position we compare logits (max |Δlogit|) and argmax
(greedy-token agreement). Both sides run on the same engine, so the numbers isolate the shipped
form's error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeadapt.formats.delta import LoraDelta

# a prompt set for bases with a tokenizer: support, chat, facts, code, arithmetic
PROMPTS = ("Where is my invoice?", "My app keeps crashing when I open it.", "How do I reset my password?",
           "Can I get a refund for last month?", "What is the capital of France?",
           "Write a haiku about the sea.", "Explain what a CPU cache is.", "What is 17 times 23?",
           "Summarise the plot of Romeo and Juliet.", "Give me three tips for better sleep.",
           "My internet is slow in the evenings.", "Translate 'good morning' into Spanish.")
N_NEW = 24
N_PROMPTS = 8


@dataclass
class ErrorReport:
    label: str  # what was measured, e.g. "int8 delta"
    reference: str  # what it was measured against
    max_abs_logit_error: float
    mean_abs_logit_error: float
    agree: int  # positions whose argmax matches the reference
    positions: int
    prompts: int
    size: int | None = None  # bytes of the shipped file
    sizes: tuple[tuple[str, int], ...] = ()  # (label, bytes) of what it is compared with

    @property
    def agreement(self) -> float:
        return self.agree / self.positions if self.positions else 1.0

    def lines(self) -> list[str]:
        out = [f"error report  {self.label} vs {self.reference}"]
        if self.size is not None:
            out.append(f"  size                 {self.size:,} bytes")
            for name, n in self.sizes:
                out.append(f"    = {self.size / n:.3f}× {name} ({n:,} bytes)")
        out += [f"  max |Δlogit|         {self.max_abs_logit_error:.4g}",
                f"  mean |Δlogit|        {self.mean_abs_logit_error:.4g}",
                f"  greedy agreement     {100 * self.agreement:.2f} % ({self.agree}/{self.positions} positions, "
                f"{self.prompts} prompts, teacher-forced on the reference's greedy tokens)"]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "reference": self.reference, "size": self.size, "sizes": dict(self.sizes),
                "max_abs_logit_error": self.max_abs_logit_error, "mean_abs_logit_error": self.mean_abs_logit_error,
                "agreement": self.agreement, "agree": self.agree, "positions": self.positions, "prompts": self.prompts}


# ---- prompts
def default_prompts(model: Any, n: int = N_PROMPTS, seed: int = 0) -> list[list[int]]:
    """Token ids: the built-in prompt set through the chat template, or seeded random ids when
    the base has no tokenizer."""
    try:
        tok = model.tokenizer
    except Exception:  # no tokenizer in the base folder
        tok = None
    if tok is None:
        rng = np.random.default_rng(seed)
        hi = model.config.vocab_size
        return rng.integers(min(3, hi - 1), hi, size=(n, 8)).tolist()
    out = []
    for p in PROMPTS[:n]:
        text = tok.render_chat([{"role": "user", "content": p}]) if tok.chat_template else p
        out.append(tok._tok.encode(text, add_special_tokens=False).ids if tok.chat_template else tok.encode(p))
    return out


def read_prompts(path: str | os.PathLike, model: Any) -> list[list[int]]:
    """One prompt per line (blank lines skipped), through the chat template when the base has one."""
    tok = model.tokenizer
    lines = [x.strip() for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
    if tok.chat_template:
        return [tok._tok.encode(tok.render_chat([{"role": "user", "content": p}]), add_special_tokens=False).ids
                for p in lines]
    return [tok.encode(p) for p in lines]


# ---- measuring
def _reference_runs(model: Any, prompts: Sequence[Sequence[int]], n_new: int) -> list[tuple[list[int], int, np.ndarray]]:
    runs = []
    for p in prompts:
        seq = list(p) + model.generate_ids(list(p), n_new)
        runs.append((seq, len(p), model.logits([seq])[0, len(p) - 1:]))
    return runs


def _compare(runs: list[tuple[list[int], int, np.ndarray]], candidate: Any, label: str, reference: str
             ) -> ErrorReport:
    mx, total, agree, positions = 0.0, 0.0, 0, 0
    for seq, start, ref in runs:
        got = candidate.logits([seq])[0, start - 1:]
        d = np.abs(got.astype(np.float64) - ref)
        mx, total = max(mx, float(d.max())), total + float(d.mean()) * len(d)
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        positions += len(d)
    return ErrorReport(label=label, reference=reference, max_abs_logit_error=mx,
                       mean_abs_logit_error=total / max(positions, 1), agree=agree, positions=positions,
                       prompts=len(runs))


def compare_models(reference: Any, candidate: Any, prompts: Sequence[Sequence[int]], *, label: str,
                   against: str, n_new: int = N_NEW) -> ErrorReport:
    """Two ready models (adapters already in use) on the same prompts."""
    return _compare(_reference_runs(reference, prompts, n_new), candidate, label, against)


def compare_deltas(base: str | os.PathLike | Any, reference: LoraDelta, candidate: LoraDelta, *,
                   label: str, against: str = "the fp32 adapter", prompts: Sequence[Sequence[int]] | None = None,
                   n_new: int = N_NEW, engine: str = "auto") -> ErrorReport:
    """The same base (a folder, or a model loaded with mode="merge") with ``reference`` and then
    ``candidate`` merged in."""
    import edgeadapt

    m = edgeadapt.load(base, engine=engine, mode="merge") if isinstance(base, (str, os.PathLike)) else base
    m.add_adapter(reference, name="__reference__")
    m.add_adapter(candidate, name="__candidate__")
    try:
        prompts = prompts if prompts is not None else default_prompts(m)
        m.use("__reference__")
        runs = _reference_runs(m, prompts, n_new)
        m.use("__candidate__")
        return _compare(runs, m, label, against)
    finally:
        m.use(None)
        m.remove_adapter("__reference__")
        m.remove_adapter("__candidate__")


def adapter_report(peft_dir: str | os.PathLike, base: str | os.PathLike, delta_path: str | os.PathLike, *,
                   engine: str = "auto", prompts: Sequence[Sequence[int]] | None = None, n_new: int = N_NEW
                   ) -> ErrorReport:
    """A delta file converted from a PEFT folder vs that adapter in float32: sizes and output error."""
    import tempfile

    from edgeadapt.formats.delta import read_delta, write_delta
    from edgeadapt.formats.manifest import read_manifest

    from edgeadapt.converters.peft.lora import lora_factors, read_peft_config, read_peft_tensors

    man, peft_dir = read_manifest(base), Path(peft_dir)
    factors = lora_factors(man.arch, read_peft_config(peft_dir), read_peft_tensors(peft_dir))
    cand = read_delta(delta_path)
    ref = LoraDelta(name=cand.name, version=cand.version, arch=man.arch.arch, fingerprint=man.fingerprint,
                    factors=factors)
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "f32.gguf"
        write_delta(f32, arch=man.arch.arch, fingerprint=man.fingerprint, name=cand.name, version=cand.version,
                    factors=factors, source=cand.source, description=cand.description)
        f32_size = f32.stat().st_size
    rep = compare_deltas(base, ref, cand, label=f"{cand.quant} delta", engine=engine, prompts=prompts, n_new=n_new)
    rep.size = Path(delta_path).stat().st_size
    rep.sizes = (("adapter_model.safetensors (fp32 PEFT)", (peft_dir / "adapter_model.safetensors").stat().st_size),
                 ("the F32 delta", f32_size))
    return rep
