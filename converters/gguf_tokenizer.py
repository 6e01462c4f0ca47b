"""tokenizer.json from a GGUF's vocabulary, tokenizing as llama.cpp does on the same file.

transformers' GGUF tokenizer converter gives the vocabulary, the merges and the added tokens; what
llama.cpp decides from the file's metadata is then written over it, so that our runtime and llama.cpp
give the same ids for the same text:

- BOS / EOS: ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` when the file sets them, else
  llama.cpp's default for the tokenizer model (sentencepiece ``llama``: BOS; byte-level ``gpt2``: none,
  except the pre-tokenizers llama.cpp adds BOS for, e.g. ``llama3``). Written as the post-processor.
- byte-level BPE (``gpt2``): the pre-tokenizer is llama.cpp's for ``tokenizer.ggml.pre`` — a list of
  regexes, each splitting the pieces the previous one left (LLAMA_CPP_SPLITS), then the byte alphabet;
  a pre-tokenizer llama.cpp matches whole words against the vocabulary for (``ignore_merges``) keeps that.
- sentencepiece (``llama``): spaces become "▁"; ``tokenizer.ggml.add_space_prefix`` (default on) puts
  one "▁" before every run of text, at the start and after every special token, as llama.cpp does.

The decision is returned (and recorded in the base manifest's ``special_tokens``): ``add_bos``,
``add_eos``, ``tokenizer_model``, ``pre``, ``add_space_prefix``, ``rules: "llama.cpp"``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edgeadapt.errors import UnsupportedError

# ---- llama.cpp's pre-tokenizers (src/llama-vocab.cpp, llm_tokenizer_bpe): name -> regexes, applied in turn
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_GROUPS: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("default",), (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
    (("gpt-2", "phi-2", "mpt", "olmo", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
      "mellum", "modern-bert", "exaone4", "jais", "trillion", "granite-docling"), (_GPT2,)),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano",
      "dbrx", "smaug-bpe"), (_LLAMA3,)),
    (("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"), (_QWEN2,)),
    (("qwen35",), (_QWEN35,)),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
     (r"\p{N}", _GPT2)),  # one digit per piece first
]
LLAMA_CPP_SPLITS: dict[str, tuple[str, ...]] = {name: regexes for names, regexes in _GROUPS for name in names}


def pre_name(regexes: tuple[str, ...]) -> str | None:
    """The llama.cpp pre-tokenizer name whose regexes these are (a tokenizer.json this module wrote), or None."""
    return next((names[0] for names, r in _GROUPS if r == tuple(regexes)), None)
# pre-tokenizers llama.cpp adds BOS for by default, and those it looks whole pieces up in the vocabulary for
_BOS_BY_DEFAULT = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                   "jina-v5-nano", "tekken", "chameleon"}
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                  "jina-v5-nano"}
_TOKENIZER_AS = {"smollm3": "llama"}  # GGUF architecture -> the one transformers reads its tokenizer under


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def llama_cpp_rules(reader: Any) -> dict[str, Any]:
    """What llama.cpp decides from a GGUF's tokenizer metadata: model, pre-tokenizer, BOS / EOS, space prefix."""
    model = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre") or "default"  # llama.cpp: a missing pre-tokenizer is "default"
    if model == "gpt2":
        if pre not in LLAMA_CPP_SPLITS:
            raise UnsupportedError(f"GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not one edgeadapt reproduces; "
                                   f"expected one of {sorted(LLAMA_CPP_SPLITS)}")
        add_bos, add_eos, space = pre in _BOS_BY_DEFAULT, False, False
    elif model == "llama":
        pre, add_bos, add_eos, space = "default", True, False, True
    else:
        raise UnsupportedError(f"GGUF tokenizer model {model!r} (tokenizer.ggml.model) is not one edgeadapt "
                               "reproduces; expected 'gpt2' (byte-level BPE) or 'llama' (sentencepiece)")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", add_bos))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", add_eos))
    space = bool(_field(reader, "tokenizer.ggml.add_space_prefix", space))
    return {"rules": "llama.cpp", "tokenizer_model": model, "pre": pre, "add_bos": add_bos, "add_eos": add_eos,
            "add_space_prefix": space if model == "llama" else False}


def _post_processor(rules: dict[str, Any], bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> dict:
    first = [bos] if rules["add_bos"] and bos else []
    last = [eos] if rules["add_eos"] and eos else []
    seq = lambda x, t: {"Sequence": {"id": x, "type_id": t}}  # noqa: E731
    tok = lambda s, t: {"SpecialToken": {"id": s[0], "type_id": t}}  # noqa: E731
    return {"type": "TemplateProcessing",
            "single": [tok(s, 0) for s in first] + [seq("A", 0)] + [tok(s, 0) for s in last],
            "pair": ([tok(s, 0) for s in first] + [seq("A", 0)] + [tok(s, 0) for s in last]
                     + [tok(s, 1) for s in first] + [seq("B", 1)] + [tok(s, 1) for s in last]),
            "special_tokens": {s[0]: {"id": s[0], "ids": [s[1]], "tokens": [s[0]]} for s in first + last}}


def llama_cpp_tokenizer_json(tokenizer_json: dict[str, Any], rules: dict[str, Any],
                             bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> dict[str, Any]:
    """``tokenizer_json`` (transformers' conversion of the GGUF) with llama.cpp's rules written over it."""
    j = dict(tokenizer_json)
    if rules["tokenizer_model"] == "gpt2":
        splits = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
                  for r in LLAMA_CPP_SPLITS[rules["pre"]]]
        j["normalizer"] = None
        j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": splits + [
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
        j["model"] = {**j["model"], "ignore_merges": rules["pre"] in _IGNORE_MERGES}
    else:  # sentencepiece: "▁" for every space, one more before each run of text when add_space_prefix
        space = [{"type": "Prepend", "prepend": "\u2581"}] if rules["add_space_prefix"] else []
        j["normalizer"] = {"type": "Sequence", "normalizers": space + [
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
        j["pre_tokenizer"] = None
        strip = [{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if rules["add_space_prefix"] else []
        j["decoder"] = {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}] + strip}
    j["post_processor"] = _post_processor(rules, bos, eos)
    return j


def tokenizer_from_gguf(src: Path, out: Path, reader: Any) -> tuple[str | None, dict[str, Any]]:
    """Write ``out/tokenizer.json`` from the GGUF ``src``; returns (chat template, special tokens + decision).
    A GGUF without a vocabulary (``tokenizer.ggml.model`` "none" or no token list) gives a base without a
    tokenizer (token ids in, logits out), as an HF folder without tokenizer.json does."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    model = _field(reader, "tokenizer.ggml.model")
    if model in (None, "none") or "tokenizer.ggml.tokens" not in reader.fields:
        return None, {}
    rules = llama_cpp_rules(reader)
    arch = _field(reader, "general.architecture")
    folder, name = src.parent, src.name
    tmp = out / "_tok"
    if arch in _TOKENIZER_AS:  # transformers' GGUF reader does not know the architecture; the vocabulary is the same
        folder, name = tmp, "metadata.gguf"
        folder.mkdir(exist_ok=True)
        _metadata_copy(reader, arch, _TOKENIZER_AS[arch], folder / name)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    except Exception as e:  # the converter's own error is a bare KeyError / ValueError
        raise UnsupportedError(f"{src.name}: transformers cannot convert its {model!r} tokenizer to tokenizer.json "
                               f"({type(e).__name__}: {e})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    ids = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos")}
    named = {k: (tokens[i], i) if isinstance(i, int) and 0 <= i < len(tokens) else None for k, i in ids.items()}
    if rules["add_bos"] and named["bos"] is None or rules["add_eos"] and named["eos"] is None:
        raise UnsupportedError(f"{src.name}: its tokenizer adds BOS / EOS but names no such token "
                               f"(tokenizer.ggml.bos_token_id / eos_token_id: {ids['bos']}, {ids['eos']})")
    j = json.loads(tok.backend_tokenizer.to_str())
    types = _llama_cpp_types(tokens, _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
    if model == "llama":  # llama.cpp's sentencepiece merges by token score, whatever the architecture
        j["model"] = _spm_model(j["model"], tokens, _field(reader, "tokenizer.ggml.scores"))
    j["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": ty != _USER_DEFINED}
                         for i, (t, ty) in enumerate(zip(tokens, types)) if ty in _MATCHED_WHOLE]
    j = llama_cpp_tokenizer_json(j, rules, named["bos"], named["eos"])
    Tokenizer.from_str(json.dumps(j)).save(str(out / "tokenizer.json"))  # parsed back: a tokenizer that loads
    special = {"bos_token": named["bos"] and named["bos"][0], "eos_token": named["eos"] and named["eos"][0],
               "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], **rules}
    return getattr(tok, "chat_template", None) or _field(reader, "tokenizer.chat_template"), special


# token types (gguf.TokenType) llama.cpp matches whole in the text before tokenizing the rest (with parse_special:
# all three; user-defined ones always)
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4
_MATCHED_WHOLE = {_UNKNOWN, _CONTROL, _USER_DEFINED}
# texts llama.cpp makes control tokens whatever type the file gives them (end-of-turn / end-of-generation and
# fill-in-the-middle markers, src/llama-vocab.cpp); "</s>" stays normal in a vocabulary that also has one of
# _S_IS_NORMAL among them
_CONTROL_TEXTS = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>", "\u2581<PRE>",
    "<|code_prefix|>", "<|prefix|>", "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>",
    "<SUF>", "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>", "<|fim_middle|>", "<fim-middle>", "<fim_middle>",
    "<\uff5cfim\u2581end\uff5c>", "<MID>", "\u2581<MID>", "<|code_middle|>", "<|middle|>", "<|fim_pad|>", "<fim-pad>",
    "<fim_pad>", "<PAD>", "[PAD]", "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>",
    "<|file_sep|>"])
_S_IS_NORMAL = ("<|tool_response>", "<|plamo:eos|>")


def _llama_cpp_types(tokens: list[str], types: list[int]) -> list[int]:
    """The token types llama.cpp works with: the file's, control-looking texts made control."""
    present = set(tokens)
    control = _CONTROL_TEXTS - ({"</s>"} if any(t in present for t in _S_IS_NORMAL) else set())
    return [_CONTROL if t in control and ty != _CONTROL else ty for t, ty in zip(tokens, types)]


def _spm_model(model: dict[str, Any], tokens: list[str], scores: list[float] | None) -> dict[str, Any]:
    """A BPE model that merges as llama.cpp's sentencepiece tokenizer does: the pair whose joined token scores
    highest first. The tokens are the file's, spelled as stored."""
    from transformers.tokenization_utils_base import generate_merges

    if scores is None:
        raise UnsupportedError("a sentencepiece GGUF vocabulary without tokenizer.ggml.scores cannot be reproduced")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = generate_merges(vocab, dict(zip(tokens, (float(x) for x in scores))))
    return {**model, "vocab": vocab, "merges": [list(m) for m in merges], "byte_fallback": True, "ignore_merges": False}


def _metadata_copy(reader: Any, arch: str, as_arch: str, path: Path) -> None:
    """The metadata of a GGUF, no tensors, under the architecture ``as_arch`` (its ``arch.`` keys renamed)."""
    import gguf

    w = gguf.GGUFWriter(str(path), as_arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        new_key = as_arch + key[len(arch):] if key.startswith(arch + ".") else key
        w.add_key_value(new_key, field.contents(), vtype, sub_type=sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
