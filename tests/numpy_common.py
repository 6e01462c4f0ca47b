"""Shared by the numpy engine tests: tiny random llama / qwen2 models (transformers) written as GGUF."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgeadapt.converters.gguf_base import _hf_fields, write_base_gguf  # noqa: E402
from edgeadapt.converters.hf import from_transformers  # noqa: E402

SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
Q = gguf.GGMLQuantizationType


def _make(kind: str):
    torch.manual_seed(0 if kind == "llama" else 1)
    if kind == "llama":
        conf = transformers.LlamaConfig(**SIZES, tie_word_embeddings=False)
        cls = transformers.LlamaForCausalLM
    else:
        conf = transformers.Qwen2Config(**SIZES, tie_word_embeddings=True)
        cls = transformers.Qwen2ForCausalLM
    conf._attn_implementation = "eager"
    model = cls(conf).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
    return model


def _write(cfg, w, path: Path, qtype: str) -> Path:
    """Like write_base_gguf but any type gguf.quants can quantize (Q4_0, Q4_1, …) for 2-D tensors."""
    if qtype in ("F32", "F16", "Q8_0"):
        write_base_gguf(cfg, w, path, qtype=qtype, fingerprint="x")
        return path
    t = Q[qtype]
    writer = gguf.GGUFWriter(str(path), cfg.arch)
    _hf_fields(writer, cfg, None)
    for name, a in w.items():
        if a.ndim == 2 and a.shape[1] % gguf.GGML_QUANT_SIZES[t][0] == 0:
            writer.add_tensor(name, gguf.quants.quantize(a, t), raw_dtype=t)
        else:
            writer.add_tensor(name, np.ascontiguousarray(a, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make_base(kind: str, tmp_path_factory):
    """(kind, transformers model, cfg, weights, F32 GGUF path) of a tiny random llama / qwen2."""
    model = _make(kind)
    cfg, w = from_transformers(model)
    path = _write(cfg, w, tmp_path_factory.mktemp(kind) / "m.gguf", "F32")
    return kind, model, cfg, w, path


def _batch(seed=0, S=7):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 256, size=(2, S), dtype=np.int64)
    mask = np.ones((2, S), np.int64)
    mask[0, :2] = 0  # row 0 left-padded by 2
    ids[0, :2] = 0
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
    return ids, mask, pos


def _hf_logits(model, ids, mask, pos):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos))
    return out.logits.float().numpy()


def _real(a, mask_cols):
    """Logits at real (non-pad) positions only, flattened."""
    return a[mask_cols.astype(bool)]


def make_llama(tmp_path_factory):
    """(cfg, weights, F32 GGUF path) of the tiny llama."""
    model = _make("llama")
    cfg, w = from_transformers(model)
    return cfg, w, _write(cfg, w, tmp_path_factory.mktemp("llama-only") / "m.gguf", "F32")


# fixtures: imported by the test modules under these names (pytest registers them by their ``name``)
@pytest.fixture(scope="module", params=["llama", "qwen2"], name="base")
def base_fixture(request, tmp_path_factory):
    return make_base(request.param, tmp_path_factory)


@pytest.fixture(scope="module", name="llama")
def llama_fixture(tmp_path_factory):
    return make_llama(tmp_path_factory)
