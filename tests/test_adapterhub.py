"""AdapterHub adapters (bottleneck, LoRA, IA3): built with the ``adapters`` library on tiny in-memory
models with non-trivial weights, saved, converted, run on both engines and compared with the
library's own forward in torch (1e-4). ``adapters`` pins transformers 4.57: run in its venv."""

from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import pytest

from conftest import ENGINES, make_model, torch, torch_logits

import edgeadapt
from edgeadapt.formats.delta import read_delta
from edgeadapt.errors import AdapterMismatchError, UnsupportedError

# collected everywhere (docs/build_kinds.py reads the test names), run where AdapterHub imports
pytestmark = pytest.mark.skipif(importlib.util.find_spec("adapters") is None,
                                reason="AdapterHub's `adapters` is not installed (it needs transformers ~=4.57: "
                                       "pip install transformers==4.57.6 adapters==1.3.0)")

BERT = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, num_labels=3)


def _configs():
    from adapters import DoubleSeqBnConfig, IA3Config, LoRAConfig, ParBnConfig, SeqBnConfig

    return {
        "seq_bn": SeqBnConfig(),
        "double_seq_bn": DoubleSeqBnConfig(),
        "par": ParBnConfig(),
        # every placement option away from its preset, each once
        "seq_bn_ln": SeqBnConfig(ln_before=True, ln_after=True, residual_before_ln=False, non_linearity="gelu",
                                 reduction_factor=4, scaling="channel"),
        "seq_bn_postadd": SeqBnConfig(residual_before_ln="post_add", adapter_residual_before_ln=True, ln_after=True,
                                      original_ln_after=False, non_linearity="tanh", scaling=0.5),
        "houlsby_learned": DoubleSeqBnConfig(original_ln_before=True, scaling="learned", non_linearity="leakyrelu",
                                             leave_out=[0]),
        "par_ln": ParBnConfig(ln_after=True, non_linearity="gelu_new", scaling=2.0, mh_adapter=True),
        "lora": LoRAConfig(r=4, alpha=8, attn_matrices=["q", "k", "v"], intermediate_lora=True, output_lora=True),
        "ia3": IA3Config(alpha=2),
    }


KINDS = ["seq_bn", "double_seq_bn", "par", "seq_bn_ln", "seq_bn_postadd", "houlsby_learned", "par_ln", "lora", "ia3"]


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    m = BertForSequenceClassification(BertConfig(**BERT)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "LayerNorm" in n else 0.1 * torch.randn_like(p))
    return m


def _with_adapter(model, name, config, seed):
    import adapters

    m = copy.deepcopy(model)
    adapters.init(m)
    m.add_adapter(name, config=config)
    torch.manual_seed(seed)
    with torch.no_grad():  # trained-looking parameters: the default inits are (nearly) no-ops
        for n, p in m.named_parameters():
            if f".{name}." in n or n.endswith(f".{name}"):
                near_one = "norm" in n or "scaling" in n or (config.architecture == "lora" and
                                                            config.composition_mode == "scale")
                p.copy_(1 + 0.3 * torch.randn_like(p) if near_one else 0.3 * torch.randn_like(p))
    m.set_active_adapters(name)
    return m.eval()


def _ref(m, ids, mask):
    with torch.no_grad():
        out = m(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    return out.hidden_states[-1].numpy(), out.logits.numpy()


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from edgeadapt.converters.export_base import export_base

    root = tmp_path_factory.mktemp("ah_bert")
    model = _bert()
    model.save_pretrained(root / "hf")
    manifest = export_base(root / "hf", root / "base")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 120, size=(3, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # a padded row
    return dict(root=root, model=model, manifest=manifest, base=root / "base", ids=ids, mask=mask)


def cli(*args):
    """Run the edgeadapt CLI in-process; return its output, failing the test on a non-zero exit."""
    from click.testing import CliRunner

    from edgeadapt.cli import main

    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.output


def export(folder, base, out, *extra):
    """AdapterHub folder -> delta file, through ``edgeadapt export-adapter``."""
    out_text = cli("export-adapter", folder, "--base", base, "-o", out, *extra)
    assert out_text.startswith(f"wrote {out}")
    return out


@pytest.fixture(scope="module")
def built(bert):
    """kind -> (adapters model, the delta file the CLI wrote from its saved folder)."""
    out = {}
    configs = _configs()
    assert list(configs) == KINDS
    for k, (kind, cfg) in enumerate(configs.items()):
        m = _with_adapter(bert["model"], kind, cfg, seed=10 + k)
        folder = bert["root"] / kind
        m.save_adapter(str(folder), kind, use_safetensors=(k % 2 == 0))  # both file forms
        out[kind] = (m, export(folder, bert["base"], bert["root"] / f"{kind}.gguf"))
    return out


def _masked(a, mask):
    return a * mask[..., None]


def _check_kind(bert, built, kind, engine):
    m_ref, path = built[kind]
    ids, mask = bert["ids"], bert["mask"]
    want_h, want_logits = _ref(m_ref, ids, mask)
    base_h, _ = _ref(bert["model"], ids, mask)
    assert np.abs(_masked(want_h - base_h, mask)).max() > 0.05, "the adapter must matter"
    em = edgeadapt.load(bert["base"], engine=engine)
    assert em.engine == engine
    assert em.add_adapter(path) == kind  # the file: integrity, kind, base fingerprint checked
    em.use(kind)
    np.testing.assert_allclose(_masked(em.hidden_states(ids, mask), mask), _masked(want_h, mask), atol=1e-4, rtol=0)
    np.testing.assert_allclose(em.classify(ids, mask), want_logits, atol=1e-4, rtol=0)
    em.use(None)  # back to the bare base, nothing re-read
    np.testing.assert_allclose(_masked(em.hidden_states(ids, mask), mask), _masked(base_h, mask), atol=1e-4, rtol=0)


for _kind in KINDS:
    for _engine in ENGINES:
        def _test(bert, built, kind=_kind, engine=_engine):
            _check_kind(bert, built, kind, engine)
        _test.__name__ = f"test_kind_{_kind}_{_engine}_live"
        globals()[_test.__name__] = _test
del _test


@pytest.mark.parametrize("engine", ENGINES)
def test_per_row_adapters(bert, built, engine):
    """One pass, each row its own adapter (bottleneck, LoRA, none) = each row run alone by the library."""
    ids, mask = bert["ids"], bert["mask"]
    em = edgeadapt.load(bert["base"], engine=engine)
    for kind in ("seq_bn", "lora", "double_seq_bn"):
        em.add_adapter(built[kind][1])
    rows = ["seq_bn", "lora", None]
    got = em.hidden_states(ids, mask, adapters=rows)
    for r, kind in enumerate(rows):
        want, _ = _ref(built[kind][0] if kind else bert["model"], ids[r:r + 1], mask[r:r + 1])
        np.testing.assert_allclose(got[r] * mask[r][:, None], want[0] * mask[r][:, None], atol=1e-4, rtol=0)
    with pytest.raises(UnsupportedError, match="two bottleneck adapters at blk.0.ffn"):
        em.hidden_states(ids, mask, adapters=[["seq_bn", "double_seq_bn"], None, None])


def test_old_version_alpha_is_r(bert, built, tmp_path):
    """Saved by adapters < 1.1.0: alpha was ignored, so the loader (theirs and ours) takes alpha = r."""
    from edgeadapt.converters.adapterhub import convert_adapterhub

    m_ref, _ = built["lora"]
    m_ref.save_adapter(str(tmp_path), "lora", use_safetensors=True)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta["version"] = "adapters.1.0.1"
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    old = convert_adapterhub(tmp_path, bert["manifest"], name="old")
    new = read_delta(built["lora"][1])
    t = next(iter(new.factors))
    np.testing.assert_allclose(old.factors[t][1] * 2.0, new.factors[t][1], rtol=1e-6)  # alpha 8 / r 4 vs r / r
    # and the library's own loader agrees
    import adapters

    m2 = copy.deepcopy(bert["model"])
    adapters.init(m2)
    m2.load_adapter(str(tmp_path), load_as="old", set_active=True, use_safetensors=True)
    em = edgeadapt.load(bert["base"], engine="numpy")
    em.add_adapter(old)
    em.use("old")
    want, _ = _ref(m2.eval(), bert["ids"], bert["mask"])
    np.testing.assert_allclose(_masked(em.hidden_states(bert["ids"], bert["mask"]), bert["mask"]),
                               _masked(want, bert["mask"]), atol=1e-4, rtol=0)


def test_refusals(bert, built, tmp_path):
    from adapters import SeqBnConfig

    from edgeadapt.converters.adapterhub import convert_adapterhub

    m = _with_adapter(bert["model"], "gated", SeqBnConfig(use_gating=True), 3)
    m.save_adapter(str(tmp_path / "gated"), "gated", use_safetensors=True)
    with pytest.raises(UnsupportedError, match=r"bottleneck option\(s\) use_gating=True not supported"):
        convert_adapterhub(tmp_path / "gated", bert["manifest"])
    meta = json.loads((bert["root"] / "seq_bn" / "adapter_config.json").read_text())
    meta["hidden_size"] = 48
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "adapter_config.json").write_text(json.dumps(meta))
    (tmp_path / "wrong" / "adapter.safetensors").write_bytes((bert["root"] / "seq_bn" / "adapter.safetensors").read_bytes())
    with pytest.raises(AdapterMismatchError, match="hidden_size: the base has 32, the adapter 48"):
        convert_adapterhub(tmp_path / "wrong", bert["manifest"])
    em = edgeadapt.load(bert["base"], engine="numpy")
    a = read_delta(built["seq_bn"][1])
    a2 = copy.copy(a)
    a2.fingerprint = "sha256:" + "0" * 64
    with pytest.raises(AdapterMismatchError, match="base fingerprint"):
        em.add_adapter(a2, name="other")
    assert em.adapters == {}  # a failed add changes nothing


# ---- llama-family decoders: AdapterHub LoRA and IA3 become our kinds
def _llama_config(kind):
    from adapters import IA3Config, LoRAConfig

    return (LoRAConfig(r=4, alpha=6, attn_matrices=["q", "k", "v"], intermediate_lora=True, output_lora=True)
            if kind == "lora" else IA3Config(attn_matrices=["q", "k", "v"], intermediate_lora=True, output_lora=True))


@pytest.fixture(scope="module")
def llama_built(tiny, tmp_path_factory):
    """kind -> (adapters model on the tiny llama, the delta file the CLI wrote)."""
    root = tmp_path_factory.mktemp("ah_llama")
    out = {}
    for kind in ("lora", "ia3"):
        m = _with_adapter(tiny["model"], kind, _llama_config(kind), seed=5)
        m.save_adapter(str(root / kind), kind, use_safetensors=kind == "lora")
        out[kind] = (m, export(root / kind, tiny["base"], root / f"{kind}.gguf"))
    return out


def _check_llama(tiny, llama_built, kind, engine, mode, ids):
    m, path = llama_built[kind]
    want = torch_logits(m, ids)
    assert np.abs(want - torch_logits(tiny["model"], ids)).max() > 0.05, "the adapter must matter"
    em = edgeadapt.load(tiny["base"], engine=engine, mode=mode)
    em.add_adapter(path)
    em.use(kind)
    np.testing.assert_allclose(em.logits(ids), want, atol=1e-4, rtol=0)


for _kind in ("lora", "ia3"):
    for _engine in ENGINES:
        for _mode in ("merge", "live"):
            def _test(tiny, llama_built, ids, kind=_kind, engine=_engine, mode=_mode):
                _check_llama(tiny, llama_built, kind, engine, mode, ids)
            _test.__name__ = f"test_kind_llama_{_kind}_{_engine}_{_mode}"
            globals()[_test.__name__] = _test
del _test


def test_inspect_says_kind_and_live_only(bert, built):
    text = cli("inspect", built["seq_bn"][1])
    assert "kind bottleneck" in text and "merged: no, live: yes" in text
    assert f"fingerprint {bert['manifest'].fingerprint}" in text


# ---- llama-family decoders: bottleneck adapters at the two residual adds of each block
def _llama_bn_configs():
    from adapters import DoubleSeqBnConfig, ParBnConfig, SeqBnConfig

    return {
        "seq_bn": SeqBnConfig(),
        "double_seq_bn": DoubleSeqBnConfig(),
        "par": ParBnConfig(),
        # the placement options away from their presets (post_add is refused on decoders: see below)
        "seq_bn_ln": SeqBnConfig(original_ln_before=True, residual_before_ln=False, ln_before=True, ln_after=True,
                                 adapter_residual_before_ln=True, original_ln_after=False, non_linearity="gelu",
                                 reduction_factor=4, scaling="channel"),
        "houlsby_learned": DoubleSeqBnConfig(scaling="learned", non_linearity="tanh", leave_out=[0]),
        "par_ln": ParBnConfig(ln_after=True, non_linearity="gelu_new", scaling=2.0, mh_adapter=True),
    }


LLAMA_BN = ["seq_bn", "double_seq_bn", "par", "seq_bn_ln", "houlsby_learned", "par_ln"]


@pytest.fixture(scope="module")
def llama_bn(tiny, tmp_path_factory):
    """kind -> (adapters model on the tiny llama, the delta file the CLI wrote); plus an AdapterHub LoRA."""
    root = tmp_path_factory.mktemp("ah_llama_bn")
    out = {}
    for k, (kind, cfg) in enumerate({**_llama_bn_configs(), "lora": _llama_config("lora")}.items()):
        m = _with_adapter(tiny["model"], kind, cfg, seed=20 + k)
        m.save_adapter(str(root / kind), kind, use_safetensors=(k % 2 == 0))
        out[kind] = (m, export(root / kind, tiny["base"], root / f"{kind}.gguf"))
    return out


def _greedy(m, prompt, n):
    """The library's own greedy decode (full forward per token), stopping at EOS as the runtime does."""
    ids, out = list(prompt), []
    for _ in range(n):
        t = int(torch_logits(m, [ids])[0, -1].argmax())
        if t == 2:
            break
        out.append(t)
        ids.append(t)
    return out


def _check_llama_bn(tiny, llama_bn, kind, engine, ids):
    m, path = llama_bn[kind]
    want = torch_logits(m, ids)
    assert np.abs(want - torch_logits(tiny["model"], ids)).max() > 0.05, "the adapter must matter"
    em = edgeadapt.load(tiny["base"], engine=engine, mode="live")
    assert em.engine == engine
    assert em.add_adapter(path) == kind
    em.use(kind)
    np.testing.assert_allclose(em.logits(ids), want, atol=1e-4, rtol=0)
    assert em.generate_ids(ids[0], 8) == _greedy(m, ids[0], 8)
    em.use(None)  # the bare base again
    np.testing.assert_allclose(em.logits(ids), torch_logits(tiny["model"], ids), atol=1e-4, rtol=0)


for _kind in LLAMA_BN:
    for _engine in ENGINES:
        def _test(tiny, llama_bn, ids, kind=_kind, engine=_engine):
            _check_llama_bn(tiny, llama_bn, kind, engine, ids)
        _test.__name__ = f"test_kind_llama_{_kind}_{_engine}_live"
        globals()[_test.__name__] = _test
del _test


@pytest.mark.parametrize("engine", ENGINES)
def test_llama_per_row_bottleneck_lora_none(tiny, llama_bn, engine):
    """One batch, rows [bottleneck, LoRA, none] = each row run alone by the library; logits and greedy decode."""
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 256, size=(3, 7)).tolist()
    em = edgeadapt.load(tiny["base"], engine=engine, mode="auto")  # onnxruntime: the plain graph until needed
    for kind in ("double_seq_bn", "lora", "par"):
        em.add_adapter(llama_bn[kind][1])
    rows = ["double_seq_bn", "lora", None]
    refs = [llama_bn[k][0] if k else tiny["model"] for k in rows]
    got = em.logits(ids, adapters=rows)
    for r, m in enumerate(refs):
        np.testing.assert_allclose(got[r], torch_logits(m, ids[r:r + 1])[0], atol=1e-4, rtol=0)
    outs = em.generate_batch(ids, 6, adapters=rows)
    assert outs == [_greedy(m, ids[r], 6) for r, m in enumerate(refs)]
    em.use("par")  # active in auto mode: it stays live (numpy's auto-merge skips what cannot merge)
    em.auto_merge_tokens = 1
    assert em.generate_ids(ids[0], 6) == _greedy(llama_bn["par"][0], ids[0], 6)
    np.testing.assert_allclose(em.logits(ids[:1]), torch_logits(llama_bn["par"][0], ids[:1]), atol=1e-4, rtol=0)
    assert em.mode == "live"
    with pytest.raises(UnsupportedError, match=r"two bottleneck adapters at blk\.0\.ffn in one row .*Stack"):
        em.logits(ids, adapters=[["double_seq_bn", "par"], None, None])


def test_llama_bottleneck_refusals(tiny, llama_bn, tmp_path):
    """post_add (AdapterHub's own Llama forward fails on it) is refused by name through the CLI, nothing written;
    a bottleneck cannot be merged."""
    from adapters import SeqBnConfig
    from click.testing import CliRunner

    from edgeadapt.cli import main

    m = _with_adapter(tiny["model"], "bn", SeqBnConfig(original_ln_before=True, residual_before_ln="post_add"), 1)
    m.save_adapter(str(tmp_path / "bn"), "bn", use_safetensors=True)
    res = CliRunner().invoke(main, ["export-adapter", str(tmp_path / "bn"), "--base", str(tiny["base"]),
                                    "-o", str(tmp_path / "bn.gguf")])
    assert res.exit_code == 2
    assert "residual_before_ln='post_add' is not supported on a 'llama' decoder" in res.output
    assert not (tmp_path / "bn.gguf").exists()
    em = edgeadapt.load(tiny["base"], engine="numpy", mode="merge")
    em.add_adapter(llama_bn["seq_bn"][1])
    with pytest.raises(UnsupportedError, match="non-linear: it cannot be merged, only run live"):
        em.use("seq_bn")
    assert em.active == {}


@pytest.mark.parametrize("engine", ENGINES)
def test_mistral_bottleneck(engine, tmp_path):
    """A Mistral base (exported as llama): an AdapterHub adapter trained on model_type 'mistral' runs the same."""
    from adapters import DoubleSeqBnConfig
    from transformers import MistralConfig, MistralForCausalLM

    from edgeadapt.converters.export_base import export_base

    torch.manual_seed(0)
    base = MistralForCausalLM(MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
                                            eos_token_id=2)).eval()
    with torch.no_grad():
        for n, p in base.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in n else 0.15 * torch.randn_like(p))
    base.save_pretrained(tmp_path / "hf")
    export_base(tmp_path / "hf", tmp_path / "base", gguf_type="F32")
    m = _with_adapter(base, "hb", DoubleSeqBnConfig(ln_after=True, non_linearity="silu"), 4)
    m.save_adapter(str(tmp_path / "hb"), "hb")
    path = export(tmp_path / "hb", tmp_path / "base", tmp_path / "hb.gguf")
    ids = np.random.default_rng(1).integers(3, 128, size=(2, 6)).tolist()
    em = edgeadapt.load(tmp_path / "base", engine=engine, mode="live")
    em.add_adapter(path)
    em.use("hb")
    np.testing.assert_allclose(em.logits(ids), torch_logits(m, ids), atol=1e-4, rtol=0)
