"""Choosing the next token: greedy, or temperature / top-k / top-p sampling with a seed."""

from __future__ import annotations

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
        """logits [batch, vocab] -> token ids [batch]."""
        if self.temperature == 0:
            return logits.argmax(-1)
        z = logits.astype(np.float64) / self.temperature
        if self.top_k:
            k = min(self.top_k, z.shape[-1])
            kth = np.partition(z, -k, axis=-1)[:, -k][:, None]
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        if self.top_p < 1:
            order = np.argsort(-p, axis=-1)
            sp = np.take_along_axis(p, order, -1)
            keep = np.cumsum(sp, -1) - sp < self.top_p  # always keeps the most likely token
            sp = np.where(keep, sp, 0)
            p = np.zeros_like(p)
            np.put_along_axis(p, order, sp, -1)
            p /= p.sum(-1, keepdims=True)
        u = self.rng.random((p.shape[0], 1))
        return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1)
