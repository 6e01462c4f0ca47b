"""The scripts in examples/ run as a user runs them (a subprocess, their own command line), on a tiny llama
with a tiny word-level tokenizer and chat template instead of SmolLM2, so they cannot rot:

- ``train_adapters.py --model`` trains the three support-desk adapters with PEFT; each converts, and
  edgeadapt's live forward matches PEFT's own within 1e-4;
- ``support_router.py --base --adapters`` answers its tickets in mixed batches (each row its own adapter);
  every answer is the text that ticket gets alone with its routed adapter (``use`` + ``generate``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import edgeadapt  # noqa: E402
from conftest import make_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
VOICES = ("billing", "tech", "account")


def _run(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], capture_output=True, text=True,
                         cwd=REPO, timeout=900, env={**os.environ, "PYTHONHASHSEED": "0"})
    assert out.returncode == 0, f"{script} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def _module(script: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(script[:-3], EXAMPLES / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def desk(tmp_path_factory):
    """A tiny llama HF folder with a byte-level BPE tokenizer (a token per byte, as GGUF's GPT-2 BPE vocabulary
    reads it) and a chat template, its exported base, and the adapters the training example writes for it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from edgeadapt.converters.export_base import export_base

    root = tmp_path_factory.mktemp("desk")
    model = make_model("llama", vocab_size=288, max_position_embeddings=512)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({c: 3 + i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), model.config.vocab_size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    model.save_pretrained(root / "hf")
    fast.save_pretrained(root / "hf")
    export_base(root / "hf", root / "base", gguf_type="F32")
    _run("train_adapters.py", "--model", root / "hf", "--steps", "3", "--out", root / "adapters")
    return dict(root=root, model=model, hf=root / "hf", base=root / "base", adapters=root / "adapters")


def test_train_adapters_writes_peft_adapters_edgeadapt_runs_as_peft_does(desk):
    from peft import PeftModel

    from edgeadapt.converters.peft.lora import convert_peft
    from edgeadapt.formats.manifest import read_manifest

    manifest = read_manifest(desk["base"])
    ids = np.random.default_rng(0).integers(3, 288, size=(2, 7))
    m = edgeadapt.load(desk["base"], engine="numpy", mode="live")
    for voice in VOICES:
        folder = desk["adapters"] / voice
        assert (folder / "adapter_model.safetensors").is_file()
        m.add_adapter(convert_peft(folder, manifest, desk["root"] / f"{voice}.gguf", name=voice))
        peft = PeftModel.from_pretrained(make_model("llama", vocab_size=288, max_position_embeddings=512),
                                         str(folder)).eval()
        with torch.no_grad():
            want = peft(torch.tensor(ids)).logits.float().numpy()
        got = m.logits(ids, adapters=[voice, voice])
        assert np.abs(got - want).max() < 1e-4, voice
        assert np.abs(got - m.logits(ids)).max() > 1e-4, f"{voice}: the trained adapter changes nothing"


def test_support_router_answers_each_ticket_as_it_would_alone(desk):
    out = _run("support_router.py", "--base", desk["base"], "--adapters", desk["adapters"], "--engine", "numpy",
               "--max-new-tokens", "6", "--out", desk["root"] / "router")
    router = _module("support_router.py")
    routes = [router.route(t) or "general" for t in router.TICKETS]
    assert set(routes) == {"general", *VOICES}  # the batches mix the three adapters and the bare base
    heads = [f"[{r}] {t}\n    " for r, t in zip(routes, router.TICKETS)]
    starts = [out.index(h) for h in heads]
    assert starts == sorted(starts)
    ends = starts[1:] + [len(out)]
    # an answer is random bytes of a random model: it runs to the next ticket (a batch header between them)
    answers = [re.sub(r"\n--- batch of \d+ .*$", "", out[s + len(h): e].rstrip("\n")).strip()
               for h, s, e in zip(heads, starts, ends)]
    m = edgeadapt.load(desk["base"], engine="numpy", mode="live")
    for voice in VOICES:
        m.add_adapter(desk["root"] / "router" / f"{voice}.gguf", name=voice)
    for r, ticket, answer in zip(routes, router.TICKETS, answers):
        m.use(None if r == "general" else r)
        alone = m.generate_ids(m.encode_prompt(ticket), 6)  # the batch decodes each row's ids whole, as here
        assert answer == m.tokenizer.decode(alone).strip(), ticket
