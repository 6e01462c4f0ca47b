"""Choosing the next token: greedy, or temperature / top-k / top-p sampling with a seed."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from edgeadapt.errors import EdgeAdaptError


class SamplingError(EdgeAdaptError, ValueError):
    pass


@dataclass
class Sampler:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        from edgeadapt.runtime import args

        self.temperature, self.top_p = args.number(self.temperature, "temperature"), args.number(self.top_p, "top_p")
        self.top_k = args.count(self.top_k, "top_k")
        if self.seed is not None:
            args.count(self.seed, "seed")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise SamplingError(f"expected temperature ≥ 0, 0 < top_p ≤ 1, top_k ≥ 0; found "
                                f"{self.temperature}, {self.top_p}, {self.top_k}")
        self._rng: np.random.Generator | None = None  # made at the first sampled token (see rng)

    @property
    def rng(self) -> np.random.Generator:
        """The seeded generator, made when a token is first sampled: greedy decoding never draws, and does not
        import numpy.random (~15 ms of a cold start) nor read the system's entropy."""
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        return self._rng

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits [batch, vocab] -> token ids [batch].

        Sampled rows: p = softmax(logits / temperature) in float64; top_k keeps the tokens no lower than the k-th
        largest; top_p keeps, in order of decreasing p, each token while the mass before it is below top_p (at least
        the most likely one), then renormalizes; the token is the first whose cumulative p reaches u ~ U[0, 1), one u
        per row from the seeded generator. The work is done in buffers this thread keeps, and top_k / top_p sort
        only the few tokens that can matter: a token of SmolLM2's 49,152 is drawn in 0.3–0.7 ms instead of 0.7–5 ms
        (a fresh 393 KB array is a page fault per 4 KB of it; a full argsort is 0.7 ms), the same token as the
        direct way (tests/test_sampling.py; bench/sampling.py)."""
        if self.temperature == 0:
            return logits.argmax(-1)
        rows, vocab = logits.shape
        z = _scratch(0, logits.shape)
        np.copyto(z, logits)
        z /= self.temperature
        if self.top_k and self.top_k < vocab:
            for zi in z:  # exp(z − max) of the kept tokens; the others' exp(−inf) = 0 (exp of −inf: 4× slower)
                top = float(zi.max())
                keep = np.flatnonzero(zi >= _kth_largest(zi, self.top_k, top))
                e = np.exp(zi[keep] - top)
                zi[:] = 0
                zi[keep] = e
        else:
            z -= z.max(-1, keepdims=True)
            np.exp(z, out=z)
        z /= z.sum(-1, keepdims=True)
        if self.top_p < 1:
            for pi in z:
                _nucleus(pi, self.top_p)
        u = self.rng.random((rows, 1))
        return np.array([_draw(pi, float(ui)) for pi, ui in zip(z, u[:, 0])], np.int64)


_local = threading.local()


def _scratch(i: int, shape: tuple[int, ...], dtype: type = np.float64) -> np.ndarray:
    """This thread's buffer ``i`` of ``shape`` and ``dtype``, kept between calls: samplers on different threads (the
    scheduler's, callers') never share one."""
    bufs = _local.__dict__.setdefault("bufs", {})
    b = bufs.get(i)
    if b is None or b.shape != shape or b.dtype != dtype:
        b = bufs[i] = np.empty(shape, dtype)
    return b


def _at_least(x: np.ndarray, t: float) -> tuple[np.ndarray, int]:
    """(x ≥ t as a kept boolean buffer, how many)."""
    mask = np.greater_equal(x, t, out=_scratch(2, x.shape, np.bool_))
    return mask, int(np.count_nonzero(mask))


def _kth_largest(z: np.ndarray, k: int, top: float) -> float:
    """The k-th largest value of the row z (1 ≤ k < len(z), ``top`` its largest): partitions only the values above
    a threshold that at least k of them reach (every other value is lower than all of those), widening it 2× a try."""
    gap = 1.0
    while np.isfinite(top):
        mask, n = _at_least(z, top - gap)
        if n >= k:
            sel = z[mask]
            return float(np.partition(sel, n - k)[n - k])
        gap *= 2
    return float(np.partition(z, z.size - k)[z.size - k])  # inf / nan in the row: as np.partition orders them


def _nucleus(p: np.ndarray, top_p: float) -> None:
    """Top-p in place on the probability row p: the tokens in order of decreasing p (ties by token id), each kept
    while the cumulative mass before it is below top_p, the rest set to 0, renormalized. Sorts only the tokens no
    lower than a threshold whose mass reaches top_p (they are the first ones of the full order), lowering it 4× a
    try."""
    t = float(p.max())
    if not t > 0:  # a row of NaNs: left as it is, as the full sort would leave it
        return
    while True:
        t /= 4
        mask, n = _at_least(p, t)
        if n < p.size and t > 0 and float(np.add.reduce(p, where=mask)) < top_p + 1e-9:
            continue  # the nucleus may reach past these: lower the threshold
        cand = np.flatnonzero(mask)
        order = cand[np.argsort(-p[cand], kind="stable")]
        sp = p[order]
        cs = np.cumsum(sp)
        if cs[-1] >= top_p or n == p.size or t == 0:
            break
    kept = order[cs - sp < top_p]
    vals = p[kept]
    p[:] = 0
    p[kept] = vals
    p /= p.sum()


def _draw(p: np.ndarray, u: float) -> int:
    """The first token whose cumulative probability reaches u (the last token if rounding leaves every sum below
    u). The cumulative sum runs over the nonzero entries only when they are few: adding a zero changes no sum."""
    n = int(np.count_nonzero(p))
    if n * 4 < p.size:
        if u <= 0 or n == 0:
            return 0
        nz = np.flatnonzero(p)
        j = int(np.searchsorted(np.cumsum(p[nz]), u, side="left"))
        return int(nz[j]) if j < n else p.size - 1
    c = np.cumsum(p, out=_scratch(1, p.shape))
    return min(int(np.searchsorted(c, u, side="left")), p.size - 1)
