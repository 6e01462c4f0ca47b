"""Adapters on the embeddings and the sequence (embedding LoRA, trainable tokens, modules_to_save, prompt and
prefix tuning): built with PEFT on the tiny Llama, converted, run on both engines and compared with PEFT's
own forward in torch (fp32, 1e-4)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import edgeadapt
from edgeadapt.errors import AdapterMismatchError, UnsupportedError

from conftest import ENGINES, make_model, torch, torch_logits

peft = pytest.importorskip("peft")

TOKENS = [5, 17, 40, 99, 200]  # trainable tokens; the test ids below contain them
N_VIRTUAL = 5


def _ids():
    rng = np.random.default_rng(7)
    ids = rng.integers(3, 256, size=(2, 9))
    ids[0, 2], ids[1, 0], ids[1, 5], ids[0, 7] = 5, 17, 99, 200
    return ids.tolist()


def _configs():
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TrainableTokensConfig

    return {
        "embedding_lora": LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "down_proj"],
                                     init_lora_weights=False),
        "trainable_tokens": TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=TOKENS),
        "lora_trainable_tokens": LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"], init_lora_weights=False,
                                            trainable_token_indices=TOKENS),
        "modules_to_save": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                      init_lora_weights=False),
        "prompt_tuning": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL),
        "prefix_tuning": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL),
    }


def _peft(model, kind, seed):
    from peft import get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(model), _configs()[kind])
    with torch.no_grad():  # trained-looking parameters (PEFT starts most of these as a no-op)
        for n, p in pm.named_parameters():
            if "lora_" in n or "prompt_encoder" in n:
                p.copy_(0.3 * torch.randn_like(p))
            elif "trainable_tokens_delta" in n or "modules_to_save" in n:
                p.add_(0.2 * torch.randn_like(p))
    return pm.eval()


def _peft_logits(pm, kind, ids):
    out = torch_logits(pm, ids)
    return out[:, N_VIRTUAL:] if kind == "prompt_tuning" else out  # PEFT returns the virtual positions too


def _peft_greedy(pm, kind, ids, n):
    """Greedy decoding with PEFT's own forward over the whole sequence at every step (no cache)."""
    seq = [list(ids)]
    for _ in range(n):
        seq[0].append(int(_peft_logits(pm, kind, seq)[0, -1].argmax()))
    return seq[0][len(ids):]


@pytest.fixture(scope="module")
def seq_adapters(tiny, tmp_path_factory):
    """kind -> (kind, PEFT model, converted adapter, PEFT folder), built once per kind."""
    from click.testing import CliRunner

    from edgeadapt.cli import main

    cache = {}

    def get(kind):
        if kind not in cache:
            pm = _peft(tiny["model"], kind, seed=11 + list(_configs()).index(kind))
            folder = tmp_path_factory.mktemp(kind)
            pm.save_pretrained(folder)
            out = folder / f"{kind}.gguf"  # through the CLI, into a delta file, read back
            res = CliRunner().invoke(main, ["export-adapter", str(folder), "--base", str(tiny["base"]), "-o", str(out),
                                            "--name", kind])
            assert res.exit_code == 0, res.output
            cache[kind] = (kind, pm, out, folder)
        return cache[kind]

    return get


def _mode(kind):
    return "merge" if kind == "modules_to_save" else "live"


def _check_kind(tiny, seq_kind, engine):
    kind, pm, path, _ = seq_kind
    ids = _ids()
    m = edgeadapt.load(tiny["base"], engine=engine)
    assert m.add_adapter(path) == kind
    m.use(kind)
    want = _peft_logits(pm, kind, ids)
    base = torch_logits(tiny["model"], ids)
    assert np.abs(want - base).max() > 0.05, "the adapter must matter"
    np.testing.assert_allclose(m.logits(ids), want, atol=1e-4, rtol=0)
    assert m.mode == _mode(kind)
    if kind in ("prompt_tuning", "prefix_tuning"):  # greedy generation through the cache
        assert m.generate_ids(ids[0], 6, adapter=kind) == _peft_greedy(pm, kind, ids[0], 6)
    m.use(None)
    np.testing.assert_allclose(m.logits(ids), base, atol=1e-4, rtol=0)


# ---- one test per kind, engine and how it runs: test_kind_<kind>_<engine>_<merge|live>
def _make_test(kind, engine):
    def test(tiny, seq_adapters):
        _check_kind(tiny, seq_adapters(kind), engine)

    test.__doc__ = f"{kind} on the {engine} engine ({_mode(kind)}) gives PEFT's logits"
    return test


for _kind in _configs():
    for _engine in ENGINES:
        globals()[f"test_kind_{_kind}_{_engine}_{_mode(_kind)}"] = _make_test(_kind, _engine)


# embedding LoRA merged (mode="merge") on an untied base: E + s·(B@A)ᵀ into token_embd.weight, nothing live
def _check_embedding_merge(tiny, seq_adapters, engine):
    kind, pm, path, _ = seq_adapters("embedding_lora")
    ids = _ids()
    m = edgeadapt.load(tiny["base"], engine=engine, mode="merge")
    m.add_adapter(path)
    m.use(kind)
    assert m.mode == "merge"
    assert getattr(m._live, "embed", None) is None, "the embedding change is merged, not fed live"
    np.testing.assert_allclose(m.logits(ids), _peft_logits(pm, kind, ids), atol=1e-4, rtol=0)
    m.use(None)
    np.testing.assert_allclose(m.logits(ids), torch_logits(tiny["model"], ids), atol=1e-4, rtol=0)


def _make_merge_test(engine):
    def test(tiny, seq_adapters):
        _check_embedding_merge(tiny, seq_adapters, engine)

    test.__doc__ = f"embedding LoRA merged into token_embd.weight on the {engine} engine gives PEFT's logits"
    return test


for _engine in ENGINES:
    globals()[f"test_kind_embedding_lora_{_engine}_merge"] = _make_merge_test(_engine)


# ---- files
@pytest.mark.parametrize("kind", list(_configs()))
def test_file_round_trip(tiny, seq_adapters, kind):
    """The delta file holds exactly what the converter made; it never carries the base embedding."""
    from edgeadapt.converters.peft.seq import convert_peft_seq
    from edgeadapt.formats.delta import read_delta

    _, _, path, folder = seq_adapters(kind)
    made, read = convert_peft_seq(folder, tiny["manifest"], name=kind), read_delta(path)
    assert type(read) is type(made) and read.kind == kind.replace("lora_", "")
    assert read.params.keys() == made.params.keys()
    for t, p in made.params.items():
        assert p.keys() == read.params[t].keys()
        for k, x in p.items():
            np.testing.assert_array_equal(read.params[t][k], x)
    np.testing.assert_array_equal(read.token_ids, made.token_ids) if made.token_ids is not None else None
    if kind == "embedding_lora":
        assert "rows" not in read.params["token_embd.weight"] and read.nbytes < 256 * 64 * 4  # no base table


# ---- per-row batches: a sequence adapter, a LoRA and the bare base in one forward pass
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", ["embedding_lora", "lora_trainable_tokens", "prompt_tuning", "prefix_tuning"])
def test_mixed_rows(tiny, seq_adapters, kind, engine):
    _, pm, path, _ = seq_adapters(kind)
    ids = _ids()
    rows = [ids[0], ids[1], ids[0]]
    m = edgeadapt.load(tiny["base"], engine=engine, mode="live")
    m.add_adapter(path, name="s")
    m.add_adapter(tiny["a"], name="a")
    got = m.logits(rows, adapters=["s", "a", None])
    np.testing.assert_allclose(got[0], _peft_logits(pm, kind, [rows[0]])[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[1], torch_logits(tiny["peft_a"], [rows[1]])[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[2], torch_logits(tiny["model"], [rows[2]])[0], atol=1e-4, rtol=0)
    # generation, rows of different lengths (left-padded): each row as if alone
    prompts = [ids[0][:7], ids[1], ids[0][:4]]
    outs = m.generate_batch(prompts, 5, adapters=["s", "a", None])
    alone = [m.generate_ids(prompts[0], 5, adapter="s"), m.generate_ids(prompts[1], 5, adapter="a"),
             m.generate_ids(prompts[2], 5)]
    assert outs == alone
    if kind in ("prompt_tuning", "prefix_tuning"):
        assert outs[0] == _peft_greedy(pm, kind, prompts[0], 5)[:len(outs[0])]


# ---- refusals
def test_bad_inputs_are_refused(tiny, seq_adapters, tmp_path):
    from edgeadapt.converters.peft.seq import convert_peft_seq
    from edgeadapt.kinds.sequence import SeqAdapter

    man = tiny["manifest"]
    common = dict(name="x", version=1, arch=man.arch.arch, fingerprint=man.fingerprint)
    m = edgeadapt.load(tiny["base"], engine="numpy")
    bad = {
        "embedding LoRA: expected A \\[r, 256\\] and B \\[64, r\\]":
            SeqAdapter.build("embedding_lora", embed_lora=(np.ones((4, 300)), np.ones((64, 4))), **common),
        "token rows: expected \\[2, 64\\]":
            SeqAdapter.build("trainable_tokens", token_rows=(np.array([1, 2]), np.ones((2, 32))), **common),
        "ids must lie in \\[0, 256\\)":
            SeqAdapter.build("trainable_tokens", token_rows=(np.array([1, 999]), np.ones((2, 64))), **common),
        "prompt embeddings: expected \\[n_virtual, 64\\], found \\[5, 32\\]":
            SeqAdapter.build("prompt_tuning", prompt=np.ones((5, 32)), **common),
        "130 virtual tokens leave no room in a context of 128":
            SeqAdapter.build("prompt_tuning", prompt=np.ones((130, 64)), **common),
        "virtual.prefix: hold NaN or Inf":
            SeqAdapter.build("prefix_tuning", prefix=np.full((3, 128), np.nan), **common),
        "output head: expected \\[256, 64\\]":
            SeqAdapter.build("modules_to_save", head=np.ones((200, 64)), **common),
    }
    for msg, adapter in bad.items():
        with pytest.raises(AdapterMismatchError, match=msg):
            m.add_adapter(adapter)
    assert m.adapters == {}  # a failed add changes nothing
    # a prompt that no longer fits the context after the virtual tokens
    m.add_adapter(SeqAdapter.build("prompt_tuning", prompt=np.ones((100, 64), np.float32), **common))
    with pytest.raises(edgeadapt.FormatError, match="100 virtual tokens \\+ 40 prompt tokens exceed the context of 128"):
        m.logits([[3] * 40], adapters=["x"])
    # virtual tokens run alone, at weight 1
    m.add_adapter(tiny["a"], name="a")
    with pytest.raises(UnsupportedError, match="prompt_tuning adapter 'x' prepends virtual tokens and runs alone"):
        m.use({"x": 1.0, "a": 1.0})
    assert m.active == {}
    # converter: a folder made for another width names both sizes
    other = _peft(make_model("llama", hidden_size=32, num_attention_heads=2, num_key_value_heads=1), "prompt_tuning", 3)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(AdapterMismatchError, match="prompt_embeddings: expected \\[5, 64\\].*found \\[5, 32\\]"):
        convert_peft_seq(tmp_path / "other", man)


def test_modules_to_save_of_a_norm_is_refused_by_name(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    from edgeadapt.converters.peft.seq import convert_peft_seq

    pm = get_peft_model(copy.deepcopy(tiny["model"]), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["norm"]))
    pm.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedError, match="modules_to_save='norm' is not supported \\(lm_head and embed_tokens are\\)"):
        convert_peft_seq(tmp_path, tiny["manifest"])


# ---- a base whose head is tied to the embedding (SmolLM2's layout)
@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    from edgeadapt.converters.export_base import export_base

    root = tmp_path_factory.mktemp("tied")
    model = make_model("llama", seed=3, tie_word_embeddings=True)
    model.save_pretrained(root / "hf")
    return model, export_base(root / "hf", root / "base", gguf_type="F32"), root


@pytest.mark.parametrize("engine", ENGINES)
def test_tied_head_embedding_lora_changes_only_the_input(tied, engine, tmp_path):
    """PEFT's embedding LoRA wraps only embed_tokens: the tied head keeps the base table. So does ours."""
    from edgeadapt.converters.peft.seq import convert_peft_seq

    model, man, root = tied
    assert man.arch.tied_embeddings
    pm = _peft(model, "embedding_lora", 5)
    pm.save_pretrained(tmp_path)
    m = edgeadapt.load(root / "base", engine=engine)
    m.add_adapter(convert_peft_seq(tmp_path, man, name="e"))
    m.use("e")
    ids = _ids()
    np.testing.assert_allclose(m.logits(ids), torch_logits(pm, ids), atol=1e-4, rtol=0)
    # merge mode: the linears merge, the embedding change stays live (merging it would change the tied head)
    m = edgeadapt.load(root / "base", engine=engine, mode="merge")
    m.add_adapter(convert_peft_seq(tmp_path, man, name="e"))
    m.use("e")
    assert m.mode == "merge" and m._live.embed is not None
    np.testing.assert_allclose(m.logits(ids), torch_logits(pm, ids), atol=1e-4, rtol=0)


# trainable tokens and modules_to_save(lm_head) on the tied base: PEFT replaces the head rows of the trainable
# tokens too (a TrainableTokensLayer on lm_head tied to the embedding's), and trains a copy of lm_head while the
# embedding stays the base's; both run live as a change of some head rows (head.ids / head.delta)
TIED = {"trainable_tokens_tied": "trainable_tokens", "lora_trainable_tokens_tied": "lora_trainable_tokens",
        "modules_to_save_tied": "modules_to_save"}


@pytest.fixture(scope="module")
def tied_adapters(tied, tmp_path_factory):
    from click.testing import CliRunner

    from edgeadapt.cli import main

    model, _, root = tied
    cache = {}

    def get(kind):
        if kind not in cache:
            pm = _peft(model, TIED[kind], seed=31 + list(TIED).index(kind))
            folder = tmp_path_factory.mktemp(kind)
            pm.save_pretrained(folder)
            out = folder / f"{kind}.gguf"
            res = CliRunner().invoke(main, ["export-adapter", str(folder), "--base", str(root / "base"), "-o", str(out),
                                            "--name", kind])
            assert res.exit_code == 0, res.output
            cache[kind] = (pm, out)
        return cache[kind]

    return get


def _check_tied(tied, tied_adapters, kind, engine):
    model, _, root = tied
    pm, path = tied_adapters(kind)
    ids = _ids()
    m = edgeadapt.load(root / "base", engine=engine)
    m.add_adapter(path, name=kind)
    m.use(kind)
    want, base = torch_logits(pm, ids), torch_logits(model, ids)
    assert np.abs(want - base).max() > 0.05, "the adapter must matter"
    np.testing.assert_allclose(m.logits(ids), want, atol=1e-4, rtol=0)
    assert m.mode == "live"
    assert m.generate_ids(ids[0], 5, adapter=kind) == _peft_greedy(pm, kind, ids[0], 5)  # through the cache
    m.use(None)
    np.testing.assert_allclose(m.logits(ids), base, atol=1e-4, rtol=0)


def _make_tied_test(kind, engine):
    def test(tied, tied_adapters):
        _check_tied(tied, tied_adapters, kind, engine)

    test.__doc__ = f"{TIED[kind]} on a tied head, {engine} engine (live), gives PEFT's logits"
    return test


for _kind in TIED:
    for _engine in ENGINES:
        globals()[f"test_kind_{_kind}_{_engine}_live"] = _make_tied_test(_kind, _engine)


def test_tied_head_parts_peft_semantics(tied, tied_adapters):
    """What the converter keeps matches what PEFT does on a tied base: trainable tokens change the same rows of
    embedding and head; modules_to_save(lm_head) changes head rows only (PEFT's embedding stays the base's)."""
    from edgeadapt.formats.delta import read_delta

    model, _, _ = tied
    tt_pm, tt_path = tied_adapters("trainable_tokens_tied")
    tt = read_delta(tt_path)
    np.testing.assert_array_equal(tt.head_ids, TOKENS)
    np.testing.assert_array_equal(tt.head_rows[1], tt.token_rows[1])
    mts_pm, mts_path = tied_adapters("modules_to_save_tied")
    mts = read_delta(mts_path)
    assert mts.token_rows is None and mts.head is None and 0 < len(mts.head_ids) <= 256
    base_e = model.get_input_embeddings().weight.detach().numpy()
    peft_e = mts_pm.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(peft_e, base_e)  # PEFT trains a copy of the head; the embedding is untouched
    head = mts_pm.get_output_embeddings()
    w = getattr(head, "modules_to_save", None)
    w = (w["default"] if w is not None else head).weight.detach().numpy()
    np.testing.assert_array_equal(mts.head_rows[1], w[mts.head_ids])


@pytest.mark.parametrize("engine", ENGINES)
def test_tied_head_mixed_rows(tied, tied_adapters, engine):
    """Rows with different head changes (trainable tokens, a trained head copy, none) in one forward pass."""
    model, _, root = tied
    (tt_pm, tt), (mts_pm, mts) = tied_adapters("trainable_tokens_tied"), tied_adapters("modules_to_save_tied")
    ids = _ids()
    rows = [ids[0], ids[1], ids[0]]
    m = edgeadapt.load(root / "base", engine=engine, mode="live")
    m.add_adapter(tt, name="t")
    m.add_adapter(mts, name="h")
    got = m.logits(rows, adapters=["t", "h", None])
    np.testing.assert_allclose(got[0], torch_logits(tt_pm, [rows[0]])[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[1], torch_logits(mts_pm, [rows[1]])[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[2], torch_logits(model, [rows[2]])[0], atol=1e-4, rtol=0)
    prompts = [ids[0][:7], ids[1], ids[0][:4]]
    outs = m.generate_batch(prompts, 4, adapters=["t", "h", None])
    assert outs == [m.generate_ids(prompts[0], 4, adapter="t"), m.generate_ids(prompts[1], 4, adapter="h"),
                    m.generate_ids(prompts[2], 4)]


def test_tied_head_change_is_refused_without_the_graph_input(tied, tied_adapters):
    """The bare graphs (model.onnx) have no head.delta: onnxruntime in merge mode refuses a head change by name,
    before anything changes; the engine itself refuses one fed to a graph without the input."""
    model, _, root = tied
    _, tt = tied_adapters("trainable_tokens_tied")
    m = edgeadapt.load(root / "base", engine="ort", mode="merge")
    m.add_adapter(tt, name="t")
    with pytest.raises(UnsupportedError, match="change rows of a tied output head, which onnxruntime runs live only"):
        m.use("t")
    assert m.active == {}
    ids = _ids()
    np.testing.assert_allclose(m.logits(ids), torch_logits(model, ids), atol=1e-4, rtol=0)
    with pytest.raises(UnsupportedError, match="model.onnx has no head.delta input"):
        m._engine.forward(np.array(ids), np.ones((2, 9), np.int64), np.tile(np.arange(9), (2, 1)),
                          head=(np.array([5]), np.ones((1, 1, 64), np.float32)))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("tying", [False, True])
def test_tied_embedding_modules_to_save(tied, tmp_path, engine, tying):
    """modules_to_save of embed_tokens on a tied base: PEFT changes the embedding only, or, with
    ensure_weight_tying, the head as well (tied to the embedding's trained copy). Both as PEFT."""
    from peft import LoraConfig, get_peft_model

    from edgeadapt.converters.peft.seq import convert_peft_seq

    model, man, root = tied
    torch.manual_seed(8)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False,
                                                         modules_to_save=["embed_tokens"], ensure_weight_tying=tying))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p[TOKENS] += 0.3 * torch.randn_like(p[TOKENS])
    pm.eval().save_pretrained(tmp_path)
    a = convert_peft_seq(tmp_path, man, name="e")
    assert (a.head_rows is not None) == tying
    m = edgeadapt.load(root / "base", engine=engine)
    m.add_adapter(a)
    ids = _ids()
    want = torch_logits(pm, ids)
    assert np.abs(want - torch_logits(model, ids)).max() > 0.05
    np.testing.assert_allclose(m.logits(ids, adapters=["e", "e"]), want, atol=1e-4, rtol=0)


# ---- concurrent requests (runtime.scheduler): sequence adapters beside a LoRA and the bare base
@pytest.mark.parametrize("engine", ENGINES)
def test_concurrent_requests_with_sequence_adapters_equal_alone(tiny, seq_adapters, engine):
    """Requests of different lengths on one model's scheduler, each with its own set — virtual tokens (a KV prefix
    the row starts with), embedding changes, a LoRA, nothing — decoded in one batch (onnxruntime: right-padded,
    the embedding changes on the fed-arrays path): each gets its alone tokens, logits within 1e-5."""
    from edgeadapt.runtime.scheduler import scheduler_of
    from test_scheduler import _alone, _together

    m = edgeadapt.load(tiny["base"], engine=engine, mode="live")
    for kind in ("prompt_tuning", "prefix_tuning", "embedding_lora", "lora_trainable_tokens"):
        m.add_adapter(seq_adapters(kind)[2], name=kind)
    m.add_adapter(tiny["a"], name="a")
    ids = _ids()
    reqs = [(ids[0][:7], 8, "prompt_tuning", 0), (ids[1], 10, "a", 0), (ids[0][:3], 9, "embedding_lora", 1),
            (ids[1][:5], 7, "prefix_tuning", 2), (ids[0], 8, None, 3), (ids[1][:4], 6, "lora_trainable_tokens", 4)]
    ref = _alone(m, reqs)
    sched = scheduler_of(m)
    steps0 = sched.steps
    got = _together(m, reqs)
    assert sched.peak > 1 and sched.steps - steps0 < sum(len(t) for t, _ in ref)  # rows shared steps
    for k, ((rt, rl), (gt, gl)) in enumerate(zip(ref, got)):
        assert gt == rt, f"request {k}: tokens differ"
        for step, (a, b) in enumerate(zip(rl, gl)):
            np.testing.assert_allclose(b, a, atol=1e-5, rtol=0, err_msg=f"request {k}, step {step}")
