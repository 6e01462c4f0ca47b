"""Every public entry point given wrong types and values (None, numbers for names, float, negative or
out-of-vocabulary token ids, NaN weights) refuses with an EdgeAdaptError subclass naming what was expected
and found, and changes nothing: the same adapters stay loaded and active, and the model answers as before."""

from __future__ import annotations

import math

import numpy as np
import pytest

import edgeadapt
from edgeadapt import EdgeAdaptError
from edgeadapt.runtime.sampling import Sampler

NAN = math.nan


def _calls(m, a_path, vocab):
    ok = [[3, 4, 5]]
    return [
        ("load(None)", lambda: edgeadapt.load(None), "path"),
        ("load(3)", lambda: edgeadapt.load(3), "path"),
        ("load(missing)", lambda: edgeadapt.load("/no/such/base"), "manifest.json"),
        ("load(engine=gpu)", lambda: edgeadapt.load(m.manifest.root, engine="gpu"), "'gpu'"),
        ("load(mode=fast)", lambda: edgeadapt.load(m.manifest.root, mode="fast"), "'fast'"),
        ("load(weights=int3)", lambda: edgeadapt.load(m.manifest.root, weights="int3"), "'int3'"),
        ("load(threads=0)", lambda: edgeadapt.load(m.manifest.root, threads=0), "threads"),
        ("load(threads=1.5)", lambda: edgeadapt.load(m.manifest.root, threads=1.5), "threads"),
        ("read_delta(None)", lambda: edgeadapt.read_delta(None), "NoneType"),
        ("read_delta(3)", lambda: edgeadapt.read_delta(3), "int"),
        ("read_delta(missing)", lambda: edgeadapt.read_delta("/no/such.gguf"), "no such delta file"),
        ("add_adapter(None)", lambda: m.add_adapter(None), "NoneType"),
        ("add_adapter(3)", lambda: m.add_adapter(3), "int"),
        ("add_adapter('')", lambda: m.add_adapter(""), "''"),
        ("add_adapter(name=5)", lambda: m.add_adapter(a_path, name=5), "int"),
        ("add_adapter(name='')", lambda: m.add_adapter(a_path, name=""), "''"),
        ("add_adapter(missing)", lambda: m.add_adapter("/no/such.gguf"), "no such delta file"),
        ("add_adapter(object)", lambda: m.add_adapter(object()), "object"),
        ("remove_adapter(3)", lambda: m.remove_adapter(3), "int"),
        ("remove_adapter(None)", lambda: m.remove_adapter(None), "NoneType"),
        ("remove_adapter(unknown)", lambda: m.remove_adapter("zzz"), "zzz"),
        ("use(3)", lambda: m.use(3), "int 3"),
        ("use(1.5)", lambda: m.use(1.5), "float"),
        ("use([1])", lambda: m.use([1]), "int"),
        ("use({1: 1})", lambda: m.use({1: 1.0}), "int"),
        ("use(nan)", lambda: m.use({"a": NAN}), "finite"),
        ("use(inf)", lambda: m.use({"a": math.inf}), "finite"),
        ("use('x')", lambda: m.use({"a": "x"}), "finite"),
        ("use(unknown)", lambda: m.use("zzz"), "zzz"),
        ("logits(float ids)", lambda: m.logits([[1.5, 2]]), "integer"),
        ("logits(negative)", lambda: m.logits([[-1, 2]]), "[0, "),
        ("logits(out of vocab)", lambda: m.logits([[vocab]]), "[0, "),
        ("logits(ragged)", lambda: m.logits([[1, 2], [3]]), "ragged"),
        ("logits([])", lambda: m.logits([]), "[batch, seq]"),
        ("logits(str)", lambda: m.logits("abc"), "integer"),
        ("logits(None)", lambda: m.logits(None), "integer"),
        ("logits(bool)", lambda: m.logits([[True, False]]), "integer"),
        ("logits(adapters=str)", lambda: m.logits(ok, adapters="a"), "one entry per row"),
        ("logits(adapters=[3])", lambda: m.logits(ok, adapters=[3]), "int"),
        ("logits(adapters=[nan])", lambda: m.logits(ok, adapters=[{"a": NAN}]), "finite"),
        ("logits(mask shape)", lambda: m.logits(ok, np.ones((1, 2))), "shape"),
        ("generate(None)", lambda: m.generate(None), "prompt"),
        ("generate(3)", lambda: m.generate(3), "prompt"),
        ("generate([1.5])", lambda: m.generate([1.5, 2.0]), "prompt"),
        ("generate([-1])", lambda: m.generate([-1, 2]), "[0, "),
        ("generate(max_new_tokens=-1)", lambda: m.generate([3, 4], max_new_tokens=-1), "max_new_tokens"),
        ("generate(max_new_tokens=2.5)", lambda: m.generate([3, 4], max_new_tokens=2.5), "max_new_tokens"),
        ("generate(temperature=nan)", lambda: m.generate([3, 4], temperature=NAN), "temperature"),
        ("generate(temperature=-1)", lambda: m.generate([3, 4], temperature=-1.0), "temperature"),
        ("generate(top_p=0)", lambda: m.generate([3, 4], top_p=0.0), "top_p"),
        ("generate(top_k=-1)", lambda: m.generate([3, 4], top_k=-1), "top_k"),
        ("generate(seed='x')", lambda: m.generate([3, 4], seed="x"), "seed"),
        ("generate(adapters=[3])", lambda: m.generate([3, 4], adapters=[3]), "int"),
        ("generate_ids(str)", lambda: m.generate_ids("abc"), "token ids"),
        ("generate_ids(float)", lambda: m.generate_ids([1.5]), "integer"),
        ("generate_ids(out of vocab)", lambda: m.generate_ids([vocab + 5]), "[0, "),
        ("generate_batch(str)", lambda: m.generate_batch("abc"), "rows"),
        ("generate_batch([])", lambda: m.generate_batch([]), "rows"),
        ("generate_batch(adapters=str)", lambda: m.generate_batch([[3, 4]], adapters="a"), "one entry per row"),
        ("Sampler(top_k=1.5)", lambda: Sampler(top_k=1.5), "top_k"),
        ("Sampler(temperature=None)", lambda: Sampler(temperature=None), "temperature"),
    ]


@pytest.mark.parametrize("engine", ["numpy", "ort"])
def test_the_public_api_refuses_misuse_and_changes_nothing(tiny, engine):
    m = edgeadapt.load(tiny["base"], engine=engine, mode="live")
    m.add_adapter(str(tiny["a"]), name="a")
    m.add_adapter(str(tiny["b"]), name="b")
    m.use({"a": 0.5})
    probe = [[3, 4, 5, 6]]
    before = m.logits(probe)
    state = (sorted(m.adapters), dict(m.active))
    escaped, unnamed = [], []
    for label, call, want in _calls(m, str(tiny["a"]), m.config.vocab_size):
        try:
            call()
        except EdgeAdaptError as e:
            if want not in str(e):
                unnamed.append(f"{label}: expected {want!r} in the message, found {type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001 — the point of the test
            escaped.append(f"{label}: {type(e).__name__}: {e}")
        else:
            escaped.append(f"{label}: no error")
        assert (sorted(m.adapters), dict(m.active)) == state, f"{label} changed the model"
    assert not escaped, "calls that escaped EdgeAdaptError:\n" + "\n".join(escaped)
    assert not unnamed, "\n".join(unnamed)
    np.testing.assert_array_equal(m.logits(probe), before)


def test_the_encoder_api_refuses_misuse_and_changes_nothing(tmp_path):
    """The same walk over an encoder base (BERT family): embed / hidden states / adapters."""
    torch = pytest.importorskip("torch")
    from transformers import BertConfig, BertModel

    from edgeadapt.converters.export_base import export_base

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(tmp_path / "hf")
    export_base(tmp_path / "hf", tmp_path / "base")
    m = edgeadapt.load(tmp_path / "base", engine="numpy")
    probe = [[3, 4, 5]]
    before = m.embed(probe)
    calls = [
        ("embed(float ids)", lambda: m.embed([[1.5, 2]]), "integer"),
        ("embed(out of vocab)", lambda: m.embed([[500]]), "[0, "),
        ("embed(None)", lambda: m.embed(None), "integer"),
        ("hidden_states(negative)", lambda: m.hidden_states([[-2, 3]]), "[0, "),
        ("embed(ragged)", lambda: m.embed([[1, 2], [3]]), "ragged"),
        ("embed(adapters=str)", lambda: m.embed(probe, adapters="a"), "one entry per row"),
        ("add_adapter(None)", lambda: m.add_adapter(None), "NoneType"),
        ("add_adapter(3)", lambda: m.add_adapter(3), "int"),
        ("remove_adapter(None)", lambda: m.remove_adapter(None), "NoneType"),
        ("use(3)", lambda: m.use(3), "int 3"),
        ("use(nan)", lambda: m.use({"x": NAN}), "x"),
    ]
    problems = []
    for label, call, want in calls:
        try:
            call()
        except EdgeAdaptError as e:
            if want not in str(e):
                problems.append(f"{label}: expected {want!r} in {type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"{label}: escaped as {type(e).__name__}: {e}")
        else:
            problems.append(f"{label}: no error")
    assert not problems, "\n".join(problems)
    assert m.active == {} and m.adapters == {}
    np.testing.assert_array_equal(m.embed(probe), before)
