"""Qwen3 with the real Qwen vocabulary (151,936 tokens, byte-level BPE, llama.cpp pre-tokenizer "qwen2")
and Qwen3-0.6B's chat template, both from a llama.cpp source tree (its models/ggml-vocab-qwen2.gguf
vocabulary test file and models/templates/). A tiny random Qwen3 gets that vocabulary in a qwen3 GGUF;
export-base from it writes tokenizer.json (transformers' GGUF tokenizer converter), which must tokenize
llama.cpp's own test texts into llama.cpp's expected ids. Slow: the 151,936-token vocabulary is copied
and converted (~40 s)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgeadapt

from arch_common import cli, llama_cpp_greedy
from test_arch_qwen3 import _llama_cpp_converter, make_qwen3
from llama_cpp_src import WHY


def _llama_cpp_models() -> Path | None:
    conv = _llama_cpp_converter()
    return None if conv is None or not (conv.parent / "models" / "ggml-vocab-qwen2.gguf").is_file() else conv.parent / "models"


@pytest.fixture(scope="module")
def models_dir():
    d = _llama_cpp_models()
    if d is None:
        pytest.skip(WHY)
    return d


@pytest.fixture(scope="module")
def vocab_base(models_dir, tmp_path_factory):
    """(qwen3 GGUF with the Qwen vocabulary, the base folder exported from it)."""
    import gguf

    root = tmp_path_factory.mktemp("qwen3_vocab")
    model = make_qwen3(4, vocab_size=151936, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
                       pad_token_id=151643)
    model.save_pretrained(root / "hf")
    cli("export-base", root / "hf", root / "b0", "--gguf-type", "F32", "--no-onnx")
    weights, vocab = gguf.GGUFReader(str(root / "b0" / "model.gguf")), gguf.GGUFReader(str(models_dir / "ggml-vocab-qwen2.gguf"))
    w = gguf.GGUFWriter(str(root / "qwen3.gguf"), "qwen3")
    for reader, keep in ((weights, lambda k: k.startswith("qwen3.") or k == "general.file_type"),
                         (vocab, lambda k: k.startswith("tokenizer."))):
        for key, field in reader.fields.items():
            if keep(key):
                vtype = field.types[0]
                w.add_key_value(key, field.contents(), vtype,
                                sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in weights.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_shape=tuple(int(x) for x in reversed(t.shape)), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cli("export-base", root / "qwen3.gguf", root / "base", "--gguf-type", "source", "--no-onnx")
    return root / "qwen3.gguf", root / "base"


def _vocab_tests(models_dir: Path) -> list[tuple[str, list[int]]]:
    texts = (models_dir / "ggml-vocab-qwen2.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = (models_dir / "ggml-vocab-qwen2.gguf.out").read_text(encoding="utf-8").split("\n")
    return [(t, [int(x) for x in i.split()]) for t, i in zip(texts, ids)]


@pytest.mark.slow
def test_tokenizer_gives_llama_cpps_ids(models_dir, vocab_base):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install llama-cpp-python)")
    gguf_path, base = vocab_base
    tok = edgeadapt.load(base, engine="numpy").tokenizer
    llm = llama_cpp.Llama(model_path=str(base / "model.gguf"), n_ctx=64, verbose=False, vocab_only=True)
    cases = _vocab_tests(models_dir)
    assert len(cases) > 40
    assert [tok.encode_raw(t) for t, _ in cases] == [i for _, i in cases]
    assert [llm.tokenize(t.encode(), add_bos=False, special=False) for t, _ in cases] == [i for _, i in cases]


@pytest.mark.slow
def test_gguf_from_a_hf_folder_tokenizes_like_llama_cpp(models_dir, vocab_base, tmp_path):
    """From a Hugging Face folder with a Qwen tokenizer.json, the GGUF's vocabulary is written with llama.cpp's
    "qwen2" pre-tokenizer (one digit per piece, its own punctuation rule): llama.cpp then gives the expected
    ids on every test text ("default" missed 6 of 47)."""
    import gguf
    import llama_cpp
    from transformers import PreTrainedTokenizerFast

    model = make_qwen3(4, vocab_size=151936, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645)
    model.save_pretrained(tmp_path / "hf")
    PreTrainedTokenizerFast(tokenizer_file=str(vocab_base[1] / "tokenizer.json"), eos_token="<|im_end|>",
                            pad_token="<|endoftext|>").save_pretrained(tmp_path / "hf")
    cli("export-base", tmp_path / "hf", tmp_path / "base", "--gguf-type", "F32", "--no-onnx")
    reader = gguf.GGUFReader(str(tmp_path / "base" / "model.gguf"))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    llm = llama_cpp.Llama(model_path=str(tmp_path / "base" / "model.gguf"), n_ctx=64, verbose=False, vocab_only=True)
    cases = _vocab_tests(models_dir)
    assert [llm.tokenize(t.encode(), add_bos=False, special=False) for t, _ in cases] == [i for _, i in cases]


@pytest.mark.slow
def test_greedy_from_text_agrees_with_llama_cpp(vocab_base):
    _, base = vocab_base
    ours = edgeadapt.load(base, engine="numpy")
    prompt = ours.tokenizer.encode_raw("Hello, world! This is 🦙.cpp")
    got = ours.generate_ids(prompt, max_new_tokens=8)
    assert got and llama_cpp_greedy(base / "model.gguf", prompt, len(got))[: len(got)] == got


def test_chat_template_renders_like_transformers(models_dir, tmp_path):
    """Qwen3-0.6B's template (thinking blocks stripped from past turns, a system turn) through our sandboxed
    renderer and through transformers' own."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from edgeadapt.runtime.tokenizer import Tokenizer

    template = (models_dir / "templates" / "Qwen-Qwen3-0.6B.jinja").read_text(encoding="utf-8")
    from tokenizers import Tokenizer as Fast, models

    Fast(models.BPE(vocab={"a": 0}, merges=[])).save(str(tmp_path / "t.json"))  # the template needs no vocabulary
    tok = Tokenizer(tmp_path / "t.json", chat_template=template, special={"eos_token": "<|im_end|>"})
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>\nthinking\n</think>\n\nHello!"}, {"role": "user", "content": "2+2?"}]
    ours = tok.render_chat(msgs)
    assert "<think>" not in ours and ours.endswith("<|im_start|>assistant\n")
    assert ours == render_jinja_template(conversations=[msgs], chat_template=template, add_generation_prompt=True)[0][0]
