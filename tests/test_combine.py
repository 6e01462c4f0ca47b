"""combine: several adapters -> one delta file, checked against the runtime stacking the inputs live,
against PEFT's own ΔW added by hand in torch, against PEFT's add_weighted_adapter where it is right,
and against peft.utils.merge_utils for TIES / DARE."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
from click.testing import CliRunner

import edgeadapt
from edgeadapt.cli import main
from edgeadapt.converters import combine as cb
from edgeadapt.formats.delta import read_delta, write_delta

from conftest import ENGINES, add_lora, torch, torch_logits

peft = pytest.importorskip("peft")
W = (0.7, 0.3)


# ---- helpers
def _cli(*args):
    res = CliRunner().invoke(main, ["combine", *map(str, args)])
    return res


def _ok(*args):
    res = _cli(*args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.output


def _peft_deltas(pm, adapter="default"):
    """{module path: ΔW} of a PEFT model, from PEFT's own get_delta_weight (its scaling, rsLoRA, patterns)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if isinstance(mod, LoraLayer) and adapter in mod.lora_A:
            with torch.no_grad():
                out[name] = mod.get_delta_weight(adapter).float()
    return out


def _with_deltas(model, parts):
    """A copy of the HF base with Σ w·ΔW added to its linear weights, in torch (the reference)."""
    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for deltas, w in parts:
            for name, d in deltas.items():
                mods[name].weight += w * d
    return m.eval()


def _model(tiny, engine, **adapters):
    m = edgeadapt.load(tiny["base"], engine=engine)
    for name, a in adapters.items():
        m.add_adapter(a, name=name)
    return m


@pytest.fixture(scope="module")
def extra(tiny, tmp_path_factory):
    """A third plain LoRA (other rank and targets), and a DoRA, both as PEFT folders and converted."""
    from peft import LoraConfig, get_peft_model

    from edgeadapt.converters.peft.kinds import convert_peft_kind
    from edgeadapt.converters.peft.lora import convert_peft

    root = tmp_path_factory.mktemp("combine")
    c = add_lora(tiny["model"], 3, r=6, lora_alpha=12, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    c.save_pretrained(root / "peft_c")
    convert_peft(root / "peft_c", tiny["manifest"], root / "c.gguf", name="c")
    torch.manual_seed(4)
    dora = get_peft_model(copy.deepcopy(tiny["model"]), LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                                                                   target_modules=["q_proj", "k_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in dora.named_parameters():
            if "lora_" in n:
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if "magnitude" in n else 0.3 * torch.randn_like(p))
    dora.eval().save_pretrained(root / "peft_dora")
    return dict(root=root, peft_c=c, c=root / "c.gguf", peft_dora=dora, dora_dir=root / "peft_dora",
                dora=convert_peft_kind(root / "peft_dora", tiny["manifest"], name="dora"))


def _dora_deltas(pm):
    """PEFT's DoRA change of each weight: merged weight minus base weight, both from PEFT."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
            base = mod.get_base_layer().weight.detach().clone()
            with torch.no_grad():
                mod.merge(adapter_names=["default"])
                out[name] = (mod.get_base_layer().weight - base).float().clone()
                mod.unmerge()
    return out


# ---- (a) cat / linear: exactly the live stack, and exactly PEFT's ΔW added by hand
@pytest.mark.parametrize("method", ["cat", "linear"])
def test_exact_methods_equal_the_live_stack_and_peft(tiny, ids, tmp_path, method):
    out = tmp_path / f"{method}.gguf"
    text = _ok(tiny["a"], tiny["b"], "--weights", "0.7,0.3", "--method", method, "-o", out, "--base", tiny["base"])
    assert f"{method}, 14 targets" in text and "exact" in text
    d = read_delta(out)
    a, b = read_delta(tiny["a"]), read_delta(tiny["b"])
    q = "blk.0.attn_q.weight"  # in both inputs: a at rank 8, b at rank 4
    assert d.factors[q][0].shape[0] == 12  # linear keeps cat's factors when no rank can be saved
    assert d.fingerprint == tiny["manifest"].fingerprint and d.name == method
    ref = _with_deltas(tiny["model"], [(_peft_deltas(tiny["peft_a"]), W[0]), (_peft_deltas(tiny["peft_b"]), W[1])])
    want = torch_logits(ref, ids)
    assert np.abs(want - torch_logits(tiny["model"], ids)).max() > 0.05, "the adapters must matter"
    for engine in ENGINES:
        m = _model(tiny, engine, a=tiny["a"], b=tiny["b"], ab=out)
        m.use({"a": W[0], "b": W[1]})
        stacked = m.logits(ids)
        m.use("ab")
        got = m.logits(ids)
        np.testing.assert_allclose(got, stacked, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # and every target's ΔW is the weighted sum (the q row permutation included)
    for t in d.targets:
        exact = sum(w * x.delta(t) for x, w in zip((a, b), W) if t in x.targets)
        np.testing.assert_allclose(d.delta(t), exact, atol=1e-6 * np.abs(exact).max(), rtol=0)


def test_linear_keeps_only_the_rank_it_needs(tiny, tmp_path):
    """The same adapter twice is rank r, not 2r (cat keeps 2r); the change is still exact."""
    a = read_delta(tiny["a"])
    res = cb.combine_files([tiny["a"], tiny["a"]], [0.5, 0.25], tmp_path / "aa.gguf", method="linear")
    cat = cb.combine_files([tiny["a"], tiny["a"]], [0.5, 0.25], tmp_path / "aa_cat.gguf", method="cat")
    for t in a.targets:
        r = a.factors[t][0].shape[0]
        assert res.ranks[t] == r and cat.ranks[t] == 2 * r
        np.testing.assert_allclose(res.delta.delta(t), 0.75 * a.delta(t), atol=1e-6, rtol=0)
    assert max(res.rel_error.values()) < 1e-6


# ---- (b) PEFT's add_weighted_adapter, where it is right (no rsLoRA first, plain LoRA)
def _peft_pair(tiny, extra, first, second):
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(tiny["model"]), first[1], adapter_name=first[0])
    pm.load_adapter(second[1], adapter_name=second[0])
    return pm.eval()


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_matches_peft_add_weighted_adapter(tiny, extra, ids, tmp_path, method):
    """b (r=4, q/k/gate) and c (r=6, q/v/o/up/down): PEFT's cat and svd are right for plain LoRA."""
    pm = _peft_pair(tiny, extra, ("b", tiny["root"] / "peft_b"), ("c", extra["root"] / "peft_c"))
    rank = 5  # below the rank of the q sum (10): the truncation matters there
    kw = dict(svd_rank=rank) if method == "svd" else {}
    pm.add_weighted_adapter(["b", "c"], list(W), "bc", combination_type=method, **kw)
    pm.set_adapter("bc")
    want = torch_logits(pm, ids)
    out = tmp_path / "bc.gguf"
    args = ["--rank", rank, "--all-modules"] if method == "svd" else []
    text = _ok(tiny["b"], extra["c"], "--weights", "0.7,0.3", "--method", method, *args, "-o", out)
    for engine in ENGINES:
        m = _model(tiny, engine, bc=out)
        m.use("bc")
        # float32 against torch: the two products' rounding grows with the logits' scale (|logit| up to ~3.3 here:
        # 1.1e-4 apart on numpy under some BLAS kernels); a wrong weight or rank moves them by ~1e-1
        np.testing.assert_allclose(m.logits(ids), want, atol=1e-4 * max(1.0, float(np.abs(want).max())), rtol=0)
    if method == "svd":
        # PEFT's rank-5 factors and ours are the same best approximation; the error we print is its true error
        res = cb.combine_files([tiny["b"], extra["c"]], list(W), tmp_path / "again.gguf", method="svd", rank=rank)
        peft_d = _peft_deltas(pm, "bc")
        mod = "model.layers.0.self_attn.q_proj"
        t = "blk.0.attn_q.weight"
        exact = sum(w * read_delta(f).delta(t) for f, w in zip((tiny["b"], extra["c"]), W))
        s = np.linalg.svd(exact.astype(np.float64), compute_uv=False)
        bound = np.sqrt((s[rank:] ** 2).sum() / (s ** 2).sum())
        assert bound > 1e-2 and res.rel_error[t] == pytest.approx(bound, rel=1e-5)
        ours = res.delta.delta(t)
        assert np.linalg.norm(ours - exact) / np.linalg.norm(exact) == pytest.approx(bound, rel=1e-4)
        from edgeadapt.formats.arch import permute_qk
        np.testing.assert_allclose(ours, permute_qk(peft_d[mod].numpy(), tiny["manifest"].arch.n_heads),
                                   atol=1e-5, rtol=0)
        assert re.search(rf"{t}\s+rank\s+5\s+{bound:.3e}", text), text


# ---- (c) where PEFT's add_weighted_adapter is wrong
def test_rslora_first_peft_is_wrong_ours_is_exact(tiny, ids, tmp_path):
    """a is rsLoRA (with rank/alpha patterns), b is not: PEFT copies use_rslora from the first adapter
    into the combined one and scales it by √R instead of 1 (peft #3761)."""
    pm = _peft_pair(tiny, None, ("a", tiny["root"] / "peft_a"), ("b", tiny["root"] / "peft_b"))
    pm.add_weighted_adapter(["a", "b"], list(W), "ab", combination_type="cat")
    pm.set_adapter("ab")
    peft_logits = torch_logits(pm, ids)
    ref = _with_deltas(tiny["model"], [(_peft_deltas(tiny["peft_a"]), W[0]), (_peft_deltas(tiny["peft_b"]), W[1])])
    want = torch_logits(ref, ids)
    assert np.abs(peft_logits - want).max() > 0.1, "PEFT's rsLoRA combination is expected to be off (peft #3761)"
    out = tmp_path / "ab.gguf"
    _ok(tiny["a"], tiny["b"], "--weights", "0.7,0.3", "--method", "cat", "-o", out)
    for engine in ENGINES:
        m = _model(tiny, engine, ab=out)
        m.use("ab")
        np.testing.assert_allclose(m.logits(ids), want, atol=1e-4, rtol=0)


def test_peft_linear_has_cross_terms_ours_is_the_sum(tiny, ids, tmp_path):
    """PEFT's "linear" mixes A and B apart: b at 0.7 plus b at 0.3 becomes (√0.7+√0.3)²·ΔW_b ≈ 1.92·ΔW_b.
    Ours is Σ wᵢ·ΔWᵢ = ΔW_b (and keeps rank 4, not 8)."""
    pm = _peft_pair(tiny, None, ("b1", tiny["root"] / "peft_b"), ("b2", tiny["root"] / "peft_b"))
    pm.add_weighted_adapter(["b1", "b2"], list(W), "bb", combination_type="linear")
    pm.set_adapter("bb")
    want = torch_logits(tiny["peft_b"], ids)
    assert np.abs(torch_logits(pm, ids) - want).max() > 0.1
    d = _peft_deltas(pm, "bb")["model.layers.0.self_attn.q_proj"]
    ref = _peft_deltas(tiny["peft_b"])["model.layers.0.self_attn.q_proj"]
    np.testing.assert_allclose(d.numpy(), (np.sqrt(0.7) + np.sqrt(0.3)) ** 2 * ref.numpy(), rtol=1e-4, atol=1e-6)
    res = cb.combine_files([tiny["b"], tiny["b"]], list(W), tmp_path / "bb.gguf", method="linear")
    assert set(res.ranks.values()) == {4}
    m = _model(tiny, "numpy", bb=res.path)
    m.use("bb")
    np.testing.assert_allclose(m.logits(ids), want, atol=1e-4, rtol=0)


def test_dora_combination_is_exact_peft_is_not(tiny, extra, ids, tmp_path):
    """DoRA's change depends on the base: ours is W + 0.7·ΔW_dora(W) + 0.3·ΔW_a, as applying both live;
    PEFT's add_weighted_adapter makes a new DoRA adapter whose magnitude is re-initialised (peft #3608)."""
    from peft import PeftModel

    dora_d = _dora_deltas(extra["peft_dora"])
    ref = _with_deltas(tiny["model"], [(dora_d, W[0]), (_peft_deltas(tiny["peft_a"]), W[1])])
    want = torch_logits(ref, ids)
    out = tmp_path / "da.gguf"
    # a PEFT folder (DoRA) converted in memory against --base, and a delta file; svd at full rank is exact
    text = _ok(extra["dora_dir"], tiny["a"], "--weights", "0.7,0.3", "--method", "svd", "--rank", 64,
               "--base", tiny["base"], "-o", out)
    assert re.search(r"truncation to rank 64: .*\(max \d\.\d+e-0[78]", text), text  # full rank: float rounding only
    d, a = read_delta(out), read_delta(tiny["a"])
    base = edgeadapt.load(tiny["base"], engine="numpy")._engine.base_weight
    for t in d.targets:  # every ΔW is the weighted sum, DoRA's taken from the immutable base
        exact = W[1] * (a.delta(t) if t in a.targets else 0)
        exact = exact + (W[0] * extra["dora"].delta(t, base(t)) if t in extra["dora"].targets else 0)
        np.testing.assert_allclose(d.delta(t), exact, atol=1e-6 * np.abs(exact).max(), rtol=0)
    for engine in ENGINES:
        m = _model(tiny, engine, dora=extra["dora"], a=tiny["a"], da=out)
        m.use({"dora": W[0], "a": W[1]})
        stacked = m.logits(ids)
        m.use("da")
        got = m.logits(ids)
        # the full-rank factors are rounded to float32: on this model that moves logits by up to ~3e-5, as
        # much as the runtime's own live and merged forms of one adapter set differ (test_rounding_floor)
        np.testing.assert_allclose(got, stacked, atol=5e-5, rtol=0)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # PEFT: two DoRA adapters combined by add_weighted_adapter are not the weighted sum of their changes
    pm = PeftModel.from_pretrained(copy.deepcopy(tiny["model"]), extra["dora_dir"], adapter_name="d1")
    pm.load_adapter(extra["dora_dir"], adapter_name="d2")
    pm.add_weighted_adapter(["d1", "d2"], [0.5, 0.5], "dd", combination_type="cat")
    pm.set_adapter("dd")
    ref1 = _with_deltas(tiny["model"], [(dora_d, 1.0)])
    assert np.abs(torch_logits(pm, ids) - torch_logits(ref1, ids)).max() > 0.05
    res = cb.combine_files([extra["dora"], extra["dora"]], [0.5, 0.5], tmp_path / "dd.gguf", method="linear",
                           base=tiny["base"])
    m = _model(tiny, "numpy", dd=res.path)
    m.use("dd")
    np.testing.assert_allclose(m.logits(ids), torch_logits(ref1, ids), atol=1e-4, rtol=0)


def test_svd_of_a_dora_reports_the_true_truncation_error(tiny, extra, tmp_path):
    """At rank 4 the DoRA change (full rank) is truncated: the written factors are the best rank-4
    approximation of ΔW_dora(W), and the error we report is theirs."""
    res = cb.combine_files([extra["dora"]], [1.0], tmp_path / "d4.gguf", method="svd", rank=4, base=tiny["base"])
    base = edgeadapt.load(tiny["base"], engine="numpy")
    for t in extra["dora"].targets:
        exact = extra["dora"].delta(t, base._engine.base_weight(t)).astype(np.float64)
        u, s, vt = np.linalg.svd(exact, full_matrices=False)
        best = (u[:, :4] * s[:4]) @ vt[:4]
        got = res.delta.delta(t).astype(np.float64)
        assert res.ranks[t] == 4
        np.testing.assert_allclose(got, best, atol=1e-5 * np.abs(exact).max(), rtol=0)
        true_err = np.linalg.norm(exact - got) / np.linalg.norm(exact)
        assert res.rel_error[t] == pytest.approx(true_err, rel=1e-3) and true_err > 1e-3


# ---- other kinds and bias changes
def test_bias_changes_add_up(tiny, ids, tmp_path):
    """LoRA with lora_bias: cat / linear / svd carry Σ wᵢ·Δbᵢ exactly beside the factors."""
    from edgeadapt.converters.peft.lora import convert_peft

    pms, files = [], []
    for seed, cfg in ((5, dict(r=4, target_modules=["q_proj", "v_proj"])), (6, dict(r=2, target_modules=["v_proj", "up_proj"]))):
        pm = add_lora(tiny["model"], seed, lora_bias=True, **cfg)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n and n.endswith("bias"):
                    p.normal_(0.0, 0.3)
        pm.save_pretrained(tmp_path / f"p{seed}")
        files.append(convert_peft(tmp_path / f"p{seed}", tiny["manifest"], tmp_path / f"p{seed}.gguf", name=f"p{seed}"))
        pms.append(pm)
    ref = copy.deepcopy(tiny["model"])
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for pm, w in zip(pms, W):
            for name, mod in pm.base_model.model.named_modules():
                if hasattr(mod, "lora_B") and "default" in mod.lora_B:
                    target = mods[name]
                    target.weight += w * mod.get_delta_weight("default")
                    db = w * mod.lora_B["default"].bias * mod.scaling["default"]
                    if target.bias is None:
                        target.bias = torch.nn.Parameter(torch.zeros(target.out_features))
                    target.bias += db
    want = torch_logits(ref.eval(), ids)
    for method in ("cat", "linear", "svd"):
        out = tmp_path / f"bias_{method}.gguf"
        _ok(*files, "--weights", "0.7,0.3", "--method", method, "-o", out, *(["--rank", 6] if method == "svd" else []))
        d = read_delta(out)
        ins = [read_delta(f) for f in files]
        for t in ("blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.1.ffn_up.weight"):
            exact = sum(w * x.biases[t] for x, w in zip(ins, W) if t in x.biases)
            np.testing.assert_allclose(d.biases[t], exact, atol=1e-7, rtol=0)
        for engine in ENGINES:
            m = _model(tiny, engine, c=out)
            m.use("c")
            np.testing.assert_allclose(m.logits(ids), want, atol=1e-4, rtol=0)


def test_any_kind_combines_by_svd(tiny, ids, tmp_path):
    """LoHa (exact factors of rank r₁·r₂), IA3 (needs the base) and a LoRA: linear is W + Σ wᵢ·ΔWᵢ,
    equal to the runtime stacking all three; svd at rank 4 is the best rank-4 approximation of that sum.
    The kinds are read from delta files of their own."""
    from peft import IA3Config, LoHaConfig, get_peft_model

    from edgeadapt.converters.peft.kinds import convert_peft_kind

    files = []
    for name, conf in (("loha", LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "up_proj"])),
                       ("ia3", IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))):
        torch.manual_seed(7)
        pm = get_peft_model(copy.deepcopy(tiny["model"]), conf)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "hada_" in n or "ia3_" in n:
                    p.copy_(1.0 + 0.3 * torch.randn_like(p) if "ia3_" in n else 0.3 * torch.randn_like(p))
        pm.save_pretrained(tmp_path / name)
        write_delta(tmp_path / f"{name}.gguf", convert_peft_kind(tmp_path / name, tiny["manifest"], name=name))
        files.append(tmp_path / f"{name}.gguf")
    files.append(tiny["b"])
    weights = [0.5, 0.8, 0.3]
    ins = [read_delta(f) for f in files]
    assert [x.kind for x in ins] == ["loha", "ia3", "lora"]
    res = _cli(*files, "--method", "svd", "--rank", 4, "-o", tmp_path / "x.gguf")
    assert res.exit_code == 2 and "the change of ia3 depends on the base weights; give the base folder (--base)" in res.output
    m0 = edgeadapt.load(tiny["base"], engine="numpy")
    base = m0._engine.base_weight
    exact = {}
    for x, w in zip(ins, weights):
        for t in x.targets:
            d = w * (x.delta(t, base(t)) if x.needs_base else x.delta(t))
            exact[t] = exact[t] + d if t in exact else d
    lin = cb.combine_files(files, weights, tmp_path / "lin.gguf", method="linear", base=tiny["base"])
    svd = cb.combine_files(files, weights, tmp_path / "svd.gguf", method="svd", rank=4, base=tiny["base"])
    assert lin.ranks["blk.0.attn_q.weight"] == 8  # LoHa r₁·r₂ = 4, plus b's 4: kept exactly
    assert lin.ranks["blk.0.ffn_down.weight"] == 64  # IA3 scales a full-rank weight: full rank
    for t, e in exact.items():
        np.testing.assert_allclose(lin.delta.delta(t), e, atol=1e-6 * np.abs(e).max(), rtol=0)
        u, s, vt = np.linalg.svd(e.astype(np.float64), full_matrices=False)
        np.testing.assert_allclose(svd.delta.delta(t), (u[:, :4] * s[:4]) @ vt[:4], atol=1e-5 * np.abs(e).max(), rtol=0)
        assert svd.rel_error[t] == pytest.approx(np.sqrt((s[4:] ** 2).sum() / (s ** 2).sum()), rel=1e-4, abs=1e-7)
    for engine in ENGINES:
        m = edgeadapt.load(tiny["base"], engine=engine)
        for x in ins:
            m.add_adapter(x)
        m.add_adapter(lin.path, name="lin")
        m.use(dict(zip(("loha", "ia3", "b"), weights)))
        stacked = m.logits(ids)
        m.use("lin")
        np.testing.assert_allclose(m.logits(ids), stacked, atol=5e-5, rtol=0)


def test_quantized_output(tiny, tmp_path):
    out = tmp_path / "q.gguf"
    text = _ok(tiny["a"], tiny["b"], "--weights", "0.7,0.3", "--method", "svd", "--rank", 4, "--quant", "int8", "-o", out)
    assert "quant int8" in text
    d, f = read_delta(out), cb.combine_files([tiny["a"], tiny["b"]], list(W), tmp_path / "f.gguf", method="svd", rank=4)
    assert d.quant == "int8" and out.stat().st_size < 0.4 * f.path.stat().st_size
    t = "blk.0.attn_q.weight"
    assert 0 < np.abs(d.delta(t) - f.delta.delta(t)).max() < 0.02 * np.abs(f.delta.delta(t)).max()
    q = cb.combine_files([tiny["a"], tiny["b"]], list(W), tmp_path / "q2.gguf", method="svd", rank=4, dtype="int8")
    true = np.linalg.norm(d.delta(t) - f.delta.delta(t)) / np.linalg.norm(f.delta.delta(t))
    assert q.quant_error[t] == pytest.approx(true, rel=1e-3) and 1e-4 < true < 0.02
    assert re.search(r"stored as int8: relative error of ΔW against the float32 factors per target \(max \d", text)


# ---- (d) TIES / DARE against the published algorithms and peft.utils.merge_utils
def _tasks(shape=(48, 40), n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) * s for s in (1.0, 0.5, 2.0)[:n]]


def _ties_reference(tasks, weights, density, sign_method):
    """TIES-Merging (Yadav et al. 2023) written out entry by entry: keep the top-k magnitudes of each
    task vector, elect each entry's sign, average the weighted values that agree with it."""
    out = np.zeros_like(tasks[0])
    trimmed = []
    for t in tasks:
        k = int(density * t.size)
        thresh = np.sort(np.abs(t).ravel())[::-1][k - 1] if k else np.inf
        trimmed.append(np.where(np.abs(t) >= thresh, t, 0))
    for idx in np.ndindex(out.shape):
        vals = [tt[idx] for tt in trimmed]
        mag = sum(vals) if sign_method == "total" else sum(np.sign(v) for v in vals)
        elected = 1 if mag >= 0 else -1
        agree = [w * v for v, w in zip(vals, weights) if np.sign(v) == elected]
        out[idx] = sum(agree) / len(agree) if agree else 0.0
    return out


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_ties_matches_the_algorithm_and_peft(sign_method):
    from peft.utils import merge_utils

    tasks, weights = _tasks(), [0.7, 0.3, -0.2]
    ours = cb.merge_task_vectors("ties", tasks, weights, density=0.3, majority_sign=sign_method)
    np.testing.assert_allclose(ours, _ties_reference(tasks, weights, 0.3, sign_method), atol=1e-6, rtol=0)
    theirs = merge_utils.ties([torch.from_numpy(t) for t in tasks], torch.tensor(weights), 0.3, sign_method)
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-6, rtol=0)
    assert 0.2 < (ours != 0).mean() < 0.9


@pytest.mark.parametrize("method", ["dare", "dare_ties"])
def test_dare_matches_peft_with_the_same_masks(method, monkeypatch):
    """PEFT draws DARE's masks with torch.bernoulli; fed our seeded masks, its dare_linear / dare_ties
    give exactly our result. Our masks are Bernoulli(density) and reproducible from the seed."""
    from peft.utils import merge_utils

    tasks, weights, density = _tasks(), [0.7, 0.3, 0.5], 0.4
    masks = [cb.dare_mask(t.shape, density, 7, i, "blk.0.attn_q.weight") for i, t in enumerate(tasks)]
    feed = iter(masks)
    monkeypatch.setattr(merge_utils.torch, "bernoulli", lambda p: torch.from_numpy(next(feed).astype(np.float32)))
    fn = merge_utils.dare_linear if method == "dare" else merge_utils.dare_ties
    theirs = fn([torch.from_numpy(t) for t in tasks], torch.tensor(weights), density).numpy()
    ours = cb.merge_task_vectors(method, tasks, weights, density=density, seed=7, target="blk.0.attn_q.weight")
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)
    if method == "dare":  # written out: Σ wᵢ·mᵢ⊙τᵢ/density
        np.testing.assert_allclose(ours, sum(w * m * t / density for w, m, t in zip(weights, masks, tasks)),
                                   atol=1e-6, rtol=0)
    kept = np.mean([m.mean() for m in masks])
    assert abs(kept - density) < 0.03
    again = cb.dare_mask(tasks[0].shape, density, 7, 0, "blk.0.attn_q.weight")
    assert np.array_equal(again, masks[0]) and not np.array_equal(again, cb.dare_mask(tasks[0].shape, density, 8, 0,
                                                                                       "blk.0.attn_q.weight"))


@pytest.mark.parametrize("method", ["ties", "dare", "dare_ties"])
def test_task_vector_methods_write_the_svd_of_the_merge(tiny, extra, tmp_path, method):
    """End to end on the tiny model: the file holds the best rank-R approximation of the merged
    task vectors of a, b, c (each ΔW from its file), and reports that approximation's error."""
    files = [tiny["a"], tiny["b"], extra["c"]]
    weights = [0.5, 0.3, 0.4]
    out = tmp_path / f"{method}.gguf"
    text = _ok(*files, "--weights", "0.5,0.3,0.4", "--method", method, "--density", 0.5, "--seed", 3, "--rank", 6,
               "-o", out, "--all-modules")
    d = read_delta(out)
    ins = [read_delta(f) for f in files]
    for t in d.targets:
        here = [(i, x, w) for i, (x, w) in enumerate(zip(ins, weights)) if t in x.targets]
        tasks = [x.delta(t) for _, x, _ in here]
        ws = [w for _, _, w in here]
        if method == "ties":
            merged = _ties_reference(tasks, ws, 0.5, "total") if t == "blk.0.attn_q.weight" else \
                cb.merge_task_vectors("ties", tasks, ws, density=0.5)
        else:
            dropped = [tk * cb.dare_mask(tk.shape, 0.5, 3, i, t) / np.float32(0.5) for (i, _, _), tk in zip(here, tasks)]
            merged = sum(w * x for w, x in zip(ws, dropped)) if method == "dare" else \
                cb.disjoint_merge(np.stack(dropped) * np.asarray(ws, np.float32)[:, None, None],
                                  cb.majority_sign_mask(np.stack(dropped), "total"))
        u, s, vt = np.linalg.svd(merged.astype(np.float64), full_matrices=False)
        best = (u[:, :6] * s[:6]) @ vt[:6]
        np.testing.assert_allclose(d.delta(t), best, atol=2e-6 * np.abs(merged).max(), rtol=0)
        err = np.sqrt((s[6:] ** 2).sum() / (s ** 2).sum())
        assert re.search(rf"{t}\s+rank\s+6\s+{err:.3e}", text), text
    assert "truncation to rank 6" in text
    # the seed matters for dare, and only for dare
    again = cb.combine_files(files, weights, tmp_path / "again.gguf", method=method, density=0.5, seed=4, rank=6)
    changed = not np.allclose(again.delta.delta("blk.0.attn_q.weight"), d.delta("blk.0.attn_q.weight"))
    assert changed == method.startswith("dare")


def test_randomized_svd_is_near_optimal_and_reports_its_true_error():
    """A 600×500 matrix with a decaying spectrum, rank 20: the randomized path is taken and is within
    0.1 % of the optimal error; the reported error is the error of the factors returned."""
    rng = np.random.default_rng(1)
    u, _ = np.linalg.qr(rng.standard_normal((600, 500)))
    v, _ = np.linalg.qr(rng.standard_normal((500, 500)))
    s = 0.9 ** np.arange(500)
    d = ((u * s) @ v.T).astype(np.float32)
    uu, ss, vt = cb.svd_dense(d, 20)
    assert len(ss) == 20 + cb._OVERSAMPLE  # randomized: only the sketch's triplets
    a, b = cb._split(uu, ss, vt, 20)
    true = np.linalg.norm(d - b.astype(np.float64) @ a) / np.linalg.norm(d)
    optimal = np.sqrt((s[20:] ** 2).sum() / (s ** 2).sum())
    assert true < optimal * 1.001
    assert cb._rel_error(float((d.astype(np.float64) ** 2).sum()), ss, 20) == pytest.approx(true, rel=1e-3)


# ---- (e) bad input: clear errors, nothing written
def test_inputs_pinned_to_another_base_are_refused(tiny, tmp_path):
    a = read_delta(tiny["a"])
    other = tmp_path / "other.gguf"
    write_delta(other, arch="qwen2", fingerprint="sha256:" + "ab" * 32, name="other", version=1,
                factors={"blk.0.attn_q.weight": a.factors["blk.0.attn_q.weight"]})
    res = _cli(tiny["a"], other, "-o", tmp_path / "x.gguf")
    assert res.exit_code == 2
    assert "error: cannot combine adapters pinned to different bases" in res.output
    assert f"'a' ({tiny['a']}): llama, base {tiny['manifest'].fingerprint}" in res.output
    assert f"'other' ({other}): qwen2, base sha256:abab" in res.output
    assert not (tmp_path / "x.gguf").exists()
    res = _cli(tiny["a"], "--base", tiny["base"], "-o", tmp_path / "x.gguf")  # one input, checked against --base
    assert res.exit_code == 0, res.output
    assert (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("args, message", [
    (["--weights", "0.7"], "expected one weight per input (2), found 1: 0.7"),
    (["--weights", "0.7,0.2,0.1"], "expected one weight per input (2), found 3"),
    (["--weights", "nan,0.3"], "weights must be finite numbers, found nan for 'a' ("),
    (["--weights", "0.7,inf"], "weights must be finite numbers, found inf for 'b' ("),
    (["--weights", "0.7,x"], "expected comma-separated numbers such as 0.7,0.3, found '0.7,x'"),
    (["--method", "svd", "--rank", "0"], "rank must be an integer ≥ 1, found 0"),
    (["--method", "linear", "--rank", "4"], "method 'linear' is exact and keeps every rank it needs"),
    (["--method", "ties"], "method 'ties' needs a density in (0, 1]"),
    (["--method", "dare", "--density", "1.5"], "method 'dare' needs a density in (0, 1] (the share of each ΔW kept), found 1.5"),
    (["--method", "svd", "--density", "0.5"], "density applies to ties, dare and dare_ties, not to 'svd'"),
    (["--weights", "0,0"], "the combined change is zero on every target"),
])
def test_bad_options_are_refused(tiny, tmp_path, args, message):
    out = tmp_path / "x.gguf"
    res = _cli(tiny["a"], tiny["b"], *args, "-o", out)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert not out.exists()


def test_dora_needs_the_base_and_cannot_be_concatenated(tiny, extra, tmp_path):
    from edgeadapt.errors import FormatError, UnsupportedError

    a = read_delta(tiny["a"])
    with pytest.raises(FormatError, match=r"'dora' \(.*peft_dora\): the change of dora depends on the base weights; "
                                          r"give the base folder \(--base\)"):
        cb.combine_files([extra["dora"], a], None, tmp_path / "x.gguf", method="svd")
    with pytest.raises(UnsupportedError, match=r"method 'cat' concatenates LoRA factors and takes LoRA inputs only; "
                                               r"found 'dora' .* \(dora\): use linear \(exact\) or svd \(rank R\)"):
        cb.combine_files([extra["dora"], a], None, tmp_path / "x.gguf", method="cat", base=tiny["base"])
    res = _cli(extra["dora_dir"], tiny["a"], "-o", tmp_path / "x.gguf")
    assert res.exit_code == 2 and "a PEFT folder is converted against its base; give the base folder (--base)" in res.output
    assert not (tmp_path / "x.gguf").exists()
