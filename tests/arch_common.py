"""Shared checks of the per-architecture tests (tests/test_arch_*.py): a tiny model's HF folder is
exported with the CLI, then both engines are compared with transformers / PEFT in torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import edgeadapt
from edgeadapt.cli import main

from conftest import add_lora as conftest_add_lora, make_model as conftest_make_model, torch, torch_logits

TOL = 1e-4


def randomize(model, seed: int, norm_around: float):
    """Non-trivial weights: the default init is nearly zero. Norm weights around ``norm_around``
    (1 for plain norms, 0 for Gemma's 1 + w), biases and everything else N(0, 0.1)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name or ".ln_" in name) and name.endswith("weight"):
                p.copy_(norm_around + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


def cli(*args: str) -> None:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output + repr(res.exception)


def export(model, root: Path, name: str = "base") -> Path:
    hf = root / f"hf_{name}"
    model.save_pretrained(hf)
    cli("export-base", hf, root / name, "--gguf-type", "F32")
    return root / name


def add_lora(model, seed: int, **cfg):
    """A PEFT LoRA with random, non-zero B, on its own copy of the base (rank 4, alpha 8; targets given)."""
    return conftest_add_lora(model, seed, **{"r": 4, "lora_alpha": 8, **cfg})


def export_lora(pm, root: Path, base: Path, name: str) -> Path:
    pm.save_pretrained(root / f"peft_{name}")
    cli("export-adapter", root / f"peft_{name}", "--base", base, "-o", root / f"{name}.gguf", "--name", name)
    return root / f"{name}.gguf"


# ---- the checks
def check_logits(base: Path, model, engine: str, ids) -> None:
    m = edgeadapt.load(base, engine=engine)
    np.testing.assert_allclose(m.logits(ids), torch_logits(model, ids), atol=TOL, rtol=0)


def check_left_padded(base: Path, model, engine: str) -> None:
    m = edgeadapt.load(base, engine=engine)
    ids = [[0, 0, 0, 5, 6, 7, 8, 9, 10], [9, 10, 11, 12, 13, 14, 15, 16, 17]]
    mask = [[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9]
    got, want = m.logits(ids, attention_mask=np.array(mask)), torch_logits(model, ids, mask)
    real = np.array(mask, bool)
    np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=0)


def check_cached_decode(base: Path, model, engine: str, ids) -> None:
    """Prefill all but the last token, then one decode step on the KV cache: the last logits must be
    those of one full forward."""
    m = edgeadapt.load(base, engine=engine)
    eng = m._engine
    x = np.asarray(ids, np.int64)
    B, S = x.shape
    mask = np.ones((B, S), np.int64)
    pos = np.broadcast_to(np.arange(S, dtype=np.int64), (B, S))
    _, past = eng.forward(x[:, :-1], mask[:, :-1], np.ascontiguousarray(pos[:, :-1]), None)
    last, _ = eng.forward(x[:, -1:], mask, np.ascontiguousarray(pos[:, -1:]), past)
    np.testing.assert_allclose(last[:, 0], torch_logits(model, ids)[:, -1], atol=TOL, rtol=0)


def check_lora(base: Path, delta: Path, pm, model, engine: str, mode: str, ids) -> None:
    m = edgeadapt.load(base, engine=engine, mode=mode)
    m.add_adapter(delta, name="a")
    m.use("a")
    want = torch_logits(pm, ids)
    assert np.abs(want - torch_logits(model, ids)).max() > 0.05, "the adapter must matter"
    np.testing.assert_allclose(m.logits(ids), want, atol=TOL, rtol=0)
    assert m.mode == mode


def check_greedy(base: Path, reference, engine: str, prompt: list[int], n: int = 10, delta: Path | None = None,
                 eos: int = 2) -> None:
    """Greedy tokens of the base (with ``delta`` live, when given) equal transformers' / PEFT's (up to eos)."""
    m = edgeadapt.load(base, engine=engine, mode="live" if delta else "auto")
    if delta:
        m.add_adapter(delta, name="a")
        m.use("a")
    want = greedy_hf(reference, prompt, n)
    want = want[: want.index(eos)] if eos in want else want
    assert m.generate_ids(prompt, max_new_tokens=n) == want


def check_per_row(fx: dict, engine: str) -> None:
    """One left-padded batch, one adapter per row (a, b, none): each row as PEFT / transformers computes it.
    ``fx``: base, a, b (delta files), pa, pb (their PEFT models), model."""
    m = edgeadapt.load(fx["base"], engine=engine, mode="live")
    m.add_adapter(fx["a"], name="a")
    m.add_adapter(fx["b"], name="b")
    rng = np.random.default_rng(4)
    rows = [rng.integers(3, 256, size=n).tolist() for n in (9, 6, 4)]
    width = max(map(len, rows))
    padded = [[0] * (width - len(r)) + r for r in rows]
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    got = m.logits(padded, mask, adapters=["a", "b", None])
    for row, ref, out in zip(rows, (fx["pa"], fx["pb"], fx["model"]), got):
        np.testing.assert_allclose(out[width - len(row):], torch_logits(ref, [row])[0], atol=TOL, rtol=0)
    assert np.abs(got[1][width - 6:] - torch_logits(fx["model"], [rows[1]])[0]).max() > 0.05  # b matters


def greedy_hf(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def llama_cpp_greedy(gguf_path: Path, prompt: list[int], n: int, lora: Path | None = None, **llama_kw) -> list[int]:
    """llama.cpp's greedy tokens on ``gguf_path`` (with the LoRA GGUF ``lora``); ``llama_kw`` go to ``Llama``."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install llama-cpp-python)")
    if lora is not None:
        llama_kw["lora_path"] = str(lora)
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=128, n_threads=1, verbose=False, seed=0,
                          vocab_only=False, logits_all=False, **llama_kw)
    out: list[int] = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


def byte_tokenizer(folder: Path, bos: int, eos: int, pad: int) -> None:
    """A byte-level BPE tokenizer of 256 tokens (one merge) saved into an HF folder, so the exported
    GGUF carries a vocabulary llama.cpp can load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())[:255]  # 255 bytes + one merge (llama.cpp wants merges)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["ab"] = 255
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    inv = {i: ch for ch, i in vocab.items()}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=inv[bos], eos_token=inv[eos], pad_token=inv[pad])
    fast.save_pretrained(folder)


def text_base(root: Path, loras: dict[str, tuple[int, dict]], chat_template: str | None = None,
              base: str = "base") -> dict:
    """A tiny llama that answers in text (byte-level tokenizer, optional chat template) exported to
    ``root / base``, and a converted PEFT LoRA per ``loras`` entry (name -> (seed, LoraConfig overrides)):
    {"base", "manifest", name: delta path} — what a server or a sync test serves."""
    import json

    from edgeadapt.converters.export_base import export_base
    from edgeadapt.converters.peft.lora import convert_peft

    model = conftest_make_model("llama", seed=4)
    model.save_pretrained(root / "hf")
    byte_tokenizer(root / "hf", bos=1, eos=2, pad=0)
    if chat_template:
        cfg = json.loads((root / "hf" / "tokenizer_config.json").read_text())
        cfg["chat_template"] = chat_template
        (root / "hf" / "tokenizer_config.json").write_text(json.dumps(cfg))
    man = export_base(root / "hf", root / base, gguf_type="F32")
    out = dict(base=root / base, manifest=man)
    for name, (seed, kw) in loras.items():
        conftest_add_lora(model, seed, **kw).save_pretrained(root / f"peft_{name}")
        out[name] = convert_peft(root / f"peft_{name}", man, root / f"{name}.gguf", name=name)
    return out
