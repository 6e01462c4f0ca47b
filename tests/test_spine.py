"""The spine, end to end on a tiny llama: HF folder -> base folder, PEFT LoRA -> delta, runtime
logits against transformers and PEFT in torch, swaps, stacking, refusals."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import edgeadapt
from edgeadapt.formats.delta import read_delta, write_delta
from edgeadapt.errors import AdapterMismatchError, AdapterNotFoundError, EdgeAdaptError, FormatError, IntegrityError

from conftest import ENGINES, torch, torch_logits

TOL = 1e-4


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.param


@pytest.fixture(params=["merge", "live"])
def mode(request):
    return request.param


def test_base_matches_transformers(tiny, ids, engine):
    m = edgeadapt.load(tiny["base"], engine=engine)
    assert m.engine == engine
    np.testing.assert_allclose(m.logits(ids), torch_logits(tiny["model"], ids), atol=TOL, rtol=0)


def test_left_padded_batch_matches_transformers(tiny, engine):
    m = edgeadapt.load(tiny["base"], engine=engine)
    ids = [[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    mask = [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    got, want = m.logits(ids, attention_mask=np.array(mask)), torch_logits(tiny["model"], ids, mask)
    real = np.array(mask, bool)
    np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=0)


def test_lora_matches_peft(tiny, ids, engine, mode):
    """rsLoRA, rank_pattern and alpha_pattern, all linear layers, non-zero B."""
    m = edgeadapt.load(tiny["base"], engine=engine, mode=mode)
    m.add_adapter(tiny["a"], name="a")
    m.use("a")
    want = torch_logits(tiny["peft_a"], ids)
    assert np.abs(want - torch_logits(tiny["model"], ids)).max() > 0.1  # the adapter matters
    np.testing.assert_allclose(m.logits(ids), want, atol=TOL, rtol=0)


def test_second_adapter_matches_peft(tiny, ids, engine, mode):
    m = edgeadapt.load(tiny["base"], engine=engine, mode=mode)
    m.add_adapter(tiny["b"])
    m.use("b")
    np.testing.assert_allclose(m.logits(ids), torch_logits(tiny["peft_b"], ids), atol=TOL, rtol=0)


def _weighted_reference(tiny, weights):
    """W + Σ w·ΔW with PEFT's own get_delta_weight, on a copy of the base."""
    ref = copy.deepcopy(tiny["model"])
    params = dict(ref.named_parameters())
    for key, w in weights.items():
        pm = tiny["peft_" + key]
        for name, mod in pm.named_modules():
            if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
                target = name.replace("base_model.model.", "", 1) + ".weight"
                with torch.no_grad():
                    params[target].add_(w * mod.get_delta_weight("default"))
    return ref


def test_stacking_with_weights(tiny, ids, engine, mode):
    m = edgeadapt.load(tiny["base"], engine=engine, mode=mode)
    m.add_adapter(tiny["a"], name="a")
    m.add_adapter(tiny["b"], name="b")
    m.use({"a": 0.7, "b": 0.3})
    ref = _weighted_reference(tiny, {"a": 0.7, "b": 0.3})
    np.testing.assert_allclose(m.logits(ids), torch_logits(ref, ids), atol=TOL, rtol=0)


def test_swaps_are_bit_identical(tiny, ids, engine, mode):
    m = edgeadapt.load(tiny["base"], engine=engine, mode=mode)
    base = m.logits(ids)
    m.add_adapter(tiny["a"], name="a")
    m.add_adapter(tiny["b"], name="b")
    m.use("a")
    first_a = m.logits(ids)
    m.use("b")
    m.use("a")
    fresh = edgeadapt.load(tiny["base"], engine=engine, mode=mode)
    fresh.add_adapter(tiny["a"], name="a")
    fresh.use("a")
    assert np.array_equal(m.logits(ids), fresh.logits(ids))
    assert np.array_equal(m.logits(ids), first_a)
    m.use(None)
    assert np.array_equal(m.logits(ids), base)
    m.remove_adapter("a")
    assert sorted(m.adapters) == ["b"] and m.active == {}


def test_engines_agree(tiny, ids):
    a, b = edgeadapt.load(tiny["base"], engine="ort"), edgeadapt.load(tiny["base"], engine="numpy")
    for m in (a, b):
        m.add_adapter(tiny["a"], name="a")
        m.use({"a": 0.5})
    np.testing.assert_allclose(a.logits(ids), b.logits(ids), atol=TOL, rtol=0)


def test_greedy_generation_matches_transformers(tiny, engine, mode):
    m = edgeadapt.load(tiny["base"], engine=engine, mode=mode)
    m.add_adapter(tiny["a"], name="a")
    prompt = [5, 17, 42, 99, 7]
    for spec, ref in ((None, tiny["model"]), ("a", tiny["peft_a"])):
        m.use(spec)
        got = m.generate_ids(prompt, max_new_tokens=12)
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=2,
                               pad_token_id=0)
        want = [t for t in out[0, len(prompt):].tolist()]
        want = want[: want.index(2)] if 2 in want else want
        assert got == want


def test_sampling_is_seeded(tiny):
    from edgeadapt.runtime.sampling import Sampler

    m = edgeadapt.load(tiny["base"], engine="numpy")
    s = lambda: Sampler(temperature=0.9, top_k=20, top_p=0.9, seed=7)  # noqa: E731
    one = m.generate_ids([5, 6, 7], 10, s())
    assert one == m.generate_ids([5, 6, 7], 10, s())
    assert m.generate_ids([5, 6, 7], 10, Sampler(temperature=1.0, top_k=1, seed=3)) == m.generate_ids([5, 6, 7], 10)


def test_sampler_draws_from_its_seed_and_greedy_never_draws():
    from edgeadapt.runtime.sampling import Sampler

    logits = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    s = Sampler(temperature=1.0, seed=11)
    got = [s(logits) for _ in range(4)]
    ref = np.random.default_rng(11)  # the seed's own draws, one [batch, 1] per step
    p = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = [np.minimum((np.cumsum(p, -1) < ref.random((3, 1))).sum(-1), 49) for _ in range(4)]
    assert [g.tolist() for g in got] == [w.tolist() for w in want]
    greedy = Sampler()
    assert greedy(logits).tolist() == logits.argmax(-1).tolist() and greedy._rng is None  # no generator made


# ---- refusals leave the model as it was
def _other_base_delta(tiny, tmp_path):
    d = read_delta(tiny["a"])
    path = tmp_path / "other.gguf"
    write_delta(path, arch=d.arch, fingerprint="sha256:" + "0" * 64, name="other", version=1, factors=d.factors)
    return path


def test_refuses_adapter_for_another_base(tiny, ids, tmp_path, engine, mode):
    m = edgeadapt.load(tiny["base"], engine=engine, mode=mode)
    m.add_adapter(tiny["a"], name="a")
    m.use("a")
    before = m.logits(ids)
    with pytest.raises(AdapterMismatchError, match="base fingerprint: the adapter was made for sha256:0000"):
        m.add_adapter(_other_base_delta(tiny, tmp_path))
    assert sorted(m.adapters) == ["a"] and m.active == {"a": 1.0}
    assert np.array_equal(m.logits(ids), before)


def test_refuses_truncated_file(tiny, ids, tmp_path):
    m = edgeadapt.load(tiny["base"], engine="numpy")
    data = tiny["a"].read_bytes()
    for cut in (10, 200, len(data) // 2, len(data) - 1):
        (tmp_path / "t.gguf").write_bytes(data[:cut])
        with pytest.raises(FormatError):
            m.add_adapter(tmp_path / "t.gguf")
    assert m.adapters == {}


def test_refuses_flipped_byte(tiny, tmp_path):
    data = bytearray(tiny["a"].read_bytes())
    data[-100] ^= 0x01
    (tmp_path / "f.gguf").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="integrity check failed"):
        read_delta(tmp_path / "f.gguf")


def test_refuses_wrong_shape_naming_tensor(tiny, ids, tmp_path, engine):
    m = edgeadapt.load(tiny["base"], engine=engine)
    base = m.logits(ids)
    rng = np.random.default_rng(0)
    bad = {"blk.1.ffn_down.weight": (rng.normal(size=(4, 64)).astype(np.float32), rng.normal(size=(64, 4)).astype(np.float32))}
    write_delta(tmp_path / "w.gguf", arch="llama", fingerprint=tiny["manifest"].fingerprint, name="w", version=1, factors=bad)
    with pytest.raises(AdapterMismatchError, match=r"blk\.1\.ffn_down\.weight: expected lora_a \[r, 128\] and lora_b \[64, r\], found \[4, 64\]"):
        m.add_adapter(tmp_path / "w.gguf")
    assert m.adapters == {} and np.array_equal(m.logits(ids), base)


def test_use_unknown_or_bad_weight_changes_nothing(tiny, ids):
    m = edgeadapt.load(tiny["base"], engine="numpy")
    m.add_adapter(tiny["a"], name="a")
    m.use("a")
    before = m.logits(ids)
    with pytest.raises(AdapterNotFoundError, match="no adapter named"):
        m.use({"a": 1.0, "missing": 1.0})
    with pytest.raises(AdapterMismatchError, match="finite"):
        m.use({"a": float("nan")})
    assert m.active == {"a": 1.0} and np.array_equal(m.logits(ids), before)


def test_every_refusal_is_an_edgeadapt_error():
    for cls in (AdapterMismatchError, AdapterNotFoundError, FormatError, IntegrityError):
        assert issubclass(cls, EdgeAdaptError)
    assert issubclass(AdapterMismatchError, ValueError) and issubclass(AdapterNotFoundError, KeyError)


def test_ort_refuses_a_session_that_ignores_overrides(tiny, ids, monkeypatch):
    """onnxruntime silently ignores overrides of folded weights: the engine must notice and keep the old model."""
    from edgeadapt.runtime.ort_engine.engine import OrtEngine, OverrideNotAppliedError

    m = edgeadapt.load(tiny["base"], engine="ort", mode="merge")
    m.add_adapter(tiny["a"], name="a")
    before = m.logits(ids)
    real_build = OrtEngine._build
    monkeypatch.setattr(OrtEngine, "_build", lambda self, overrides, path=None: real_build(self, {}, path))
    with pytest.raises(OverrideNotAppliedError, match="did not take these weight overrides"):
        m.use("a")
    assert m.active == {} and np.array_equal(m.logits(ids), before)
