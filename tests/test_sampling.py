"""The sampler against its definition and against transformers' logits warpers.

``reference`` below is the definition written the direct way (a full sort, a cumulative sum over the whole
vocabulary, a fresh array at each step). The runtime's sampler must draw the same token from the same generator
state on every row, vocabulary size, temperature, top_k and top_p, and the distribution it draws from must be
transformers' ``TemperatureLogitsWarper`` → ``TopKLogitsWarper`` → ``TopPLogitsWarper``."""

from __future__ import annotations

import numpy as np
import pytest

from edgeadapt.runtime.sampling import Sampler


def reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    if top_k:
        k = min(top_k, z.shape[-1])
        kth = np.partition(z, -k, axis=-1)[:, -k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_p < 1:
        order = np.argsort(-p, axis=-1, kind="stable")
        sp = np.take_along_axis(p, order, -1)
        keep = np.cumsum(sp, -1) - sp < top_p
        sp = np.where(keep, sp, 0)
        p = np.zeros_like(p)
        np.put_along_axis(p, order, sp, -1)
        p /= p.sum(-1, keepdims=True)
    return p


def reference(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> np.ndarray:
    p = reference_probs(logits, temperature, top_k, top_p)
    u = rng.random((p.shape[0], 1))
    return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1)


def _logits(rng: np.random.Generator, rows: int, vocab: int, kind: str) -> np.ndarray:
    if kind == "peaked":  # a language model's usual shape: a few likely tokens, a long tail
        x = rng.standard_normal((rows, vocab)) * 2.0
        x[:, rng.integers(0, vocab, 5)] += rng.uniform(6, 14, 5)
    elif kind == "flat":
        x = rng.standard_normal((rows, vocab)) * 0.05
    else:  # "spread": values over many orders of magnitude of probability
        x = rng.standard_normal((rows, vocab)) * 12.0
    return x.astype(np.float32)


SETTINGS = [(1.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 40, 1.0), (1.3, 0, 0.9), (0.8, 0, 0.5), (0.9, 50, 0.95),
            (1.0, 1, 1.0), (2.0, 0, 0.99), (0.5, 3000, 0.999), (1.0, 0, 1e-6)]


@pytest.mark.parametrize("vocab", [7, 300, 49152])
@pytest.mark.parametrize("kind", ["peaked", "flat", "spread"])
def test_same_tokens_as_the_definition(vocab, kind):
    gen = np.random.default_rng(vocab + len(kind))
    for temperature, top_k, top_p in SETTINGS:
        for rows in (1, 3):
            for seed in range(6):
                x = _logits(gen, rows, vocab, kind)
                s = Sampler(temperature, top_k, top_p, seed=seed)
                ref_rng = np.random.default_rng(seed)
                for _ in range(3):  # the generator's state carries over between steps
                    got, want = s(x), reference(x, temperature, top_k, top_p, ref_rng)
                    assert got.dtype == np.int64 and got.shape == (rows,)
                    assert got.tolist() == want.tolist(), (temperature, top_k, top_p, rows, seed, kind)


def test_ties_and_masked_tokens():
    """Equal logits at the top_k / top_p boundary and -inf logits: the same kept set as the definition (ties in
    token order), so the same tokens."""
    vocab = 49152
    x = np.full((1, vocab), -3.0, np.float32)
    x[0, :100] = 2.0  # 100 tied tokens
    x[0, 5000:5010] = -np.inf
    x[0, 7] = 4.0
    for temperature, top_k, top_p in [(1.0, 50, 1.0), (1.0, 0, 0.5), (0.9, 80, 0.7), (1.0, 0, 1.0)]:
        for seed in range(20):
            ref_rng = np.random.default_rng(seed)
            s = Sampler(temperature, top_k, top_p, seed=seed)
            assert s(x).tolist() == reference(x, temperature, top_k, top_p, ref_rng).tolist()


def test_distribution_is_transformers_warpers():
    """reference_probs (what the sampler draws from, by the test above) equals softmax after transformers'
    temperature, top-k and top-p warpers, and the sampler's draws follow it."""
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    gen = np.random.default_rng(3)
    for temperature, top_k, top_p in [(0.7, 0, 0.9), (1.0, 20, 1.0), (1.3, 30, 0.8), (0.9, 0, 1.0)]:
        x = _logits(gen, 2, 1000, "peaked")
        t = torch.from_numpy(x.astype(np.float64))
        t = TemperatureLogitsWarper(temperature)(None, t)
        if top_k:
            t = TopKLogitsWarper(top_k)(None, t)
        if top_p < 1:
            t = TopPLogitsWarper(top_p)(None, t)
        want = torch.softmax(t, -1).numpy()
        np.testing.assert_allclose(reference_probs(x, temperature, top_k, top_p), want, atol=1e-12)

    x = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]], np.float32))
    s = Sampler(1.0, 0, 0.8, seed=11)  # keeps 0.5, 0.2, 0.15 -> 0.588, 0.235, 0.176
    counts = np.bincount(np.concatenate([s(x) for _ in range(20000)]), minlength=5)
    p = np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85
    assert counts[3:].sum() == 0
    assert np.all(np.abs(counts / 20000 - p) < 5 * np.sqrt(p * (1 - p) / 20000) + 1e-12), counts


def test_nan_row_does_not_hang():
    x = np.full((1, 49152), np.nan, np.float32)
    for top_k, top_p in [(0, 1.0), (40, 1.0), (0, 0.9)]:
        assert Sampler(1.0, top_k, top_p, seed=0)(x).shape == (1,)
