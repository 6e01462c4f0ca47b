"""The text side of :class:`edgeadapt.runtime.model.Model`: logits, generation (one prompt through the scheduler,
explicit batches step by step), prompts through the base's chat template. A mixin: it runs on the model's state
(engine, adapters, live plans, locks) and the model's request methods (``_plan``, ``_request``), as transformers'
``GenerationMixin`` does on its models."""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from edgeadapt.errors import FormatError, UnsupportedError, UsageError
from edgeadapt.runtime import args
from edgeadapt.runtime.args import UseSpec
from edgeadapt.runtime.sampling import Sampler
from edgeadapt.runtime.seq import Plan
from edgeadapt.runtime.tokenizer import StreamDecoder

Live = dict[str, Any]  # a live plan: weight -> the factors the engine runs (see Model._factors)


class Generation:
    """Logits and text for a :class:`~edgeadapt.runtime.model.Model`."""

    def logits(self, ids: Sequence[Sequence[int]] | np.ndarray, attention_mask: np.ndarray | None = None, *,
               adapters: Sequence[UseSpec] | None = None) -> np.ndarray:
        """Logits [batch, seq, vocab] (float32) for a batch of equal-length rows (left-pad + mask otherwise).
        ``adapters``: one entry per row (a name, ``{name: weight}`` or None for the bare base)."""
        ids = self._check_ids(ids)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        if mask.shape != ids.shape:
            raise FormatError(f"attention_mask must have the shape of ids {list(ids.shape)}, found {list(mask.shape)}")
        pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
        with self._request(self._plan(adapters, ids.shape[0])) as plan:
            past, mask, pos = self._seq.past(plan, mask, pos)  # a KV prefix (prompt / prefix tuning), if any
            return self._forward(ids, mask, pos, past, plan, every=True)[0]

    def _forward(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: Any, plan: Live | None,
                 every: bool = False) -> Any:
        """(logits, cache). Generation samples the last position only: an engine with ``last_logits`` then makes
        only that row ([B, 1, vocab]); ``every``: every position's (Model.logits)."""
        kw: dict[str, Any] = {"last": True} if not every and self._engine.last_logits else {}
        if not plan:
            return self._engine.forward(ids, mask, pos, past, **kw)
        if not isinstance(plan, Plan):  # live factors only
            return self._engine.forward(ids, mask, pos, past, lora=plan, **kw)
        if plan.bn:  # bottleneck slots (runtime.bn_slots)
            kw["bn"] = plan.bn
        if plan.head is not None:  # a tied head's changed rows (runtime.seq.HeadFn)
            kw["head"] = plan.head(ids.shape[0])
        return self._engine.forward(ids, mask, pos, past, lora=plan if len(plan) else None,
                                    embed=None if plan.embed is None else plan.embed(ids), **kw)

    def _check_ids(self, ids: Any) -> np.ndarray:
        return args.token_rows(ids, self.config.vocab_size)

    def encode_prompt(self, prompt: str, chat: bool | None = None, system: str | None = None) -> list[int]:
        tok = self.tokenizer
        if bool(tok.chat_template) if chat is None else chat:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            return tok.encode_raw(tok.render_chat(msgs))
        return tok.encode(prompt)

    def generate(self, prompt: str | Sequence[int] | Sequence[str], max_new_tokens: int = 64, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stream: bool = False, chat: bool | None = None, system: str | None = None,
                 adapters: Sequence[UseSpec] | None = None) -> str | list[str] | Iterator[str]:
        """Generate text. ``prompt``: a string, token ids, or a list of strings (a batch, one forward pass
        per step; ``adapters`` then gives each row its own adapter). ``chat`` (default: when the base has a
        template) wraps prompts in the model's chat template. ``stream=True`` yields text pieces
        (single prompt only)."""
        args.prompt(prompt)
        args.count(max_new_tokens, "max_new_tokens")
        sampler = Sampler(temperature, top_k, top_p, seed)
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], str):
            if stream:
                raise UnsupportedError("stream=True takes one prompt; a batch returns a list of strings")
            rows = [self.encode_prompt(p, chat, system) for p in prompt]
            outs = self.generate_batch(rows, max_new_tokens, sampler, adapters=adapters)
            return [self.tokenizer.decode(o) for o in outs]
        ids = self.encode_prompt(prompt, chat, system) if isinstance(prompt, str) else args.token_list(prompt, self.config.vocab_size)
        plan = self._plan(adapters, 1)
        own = None if adapters is None else self._normalise(adapters[0])
        pieces = self._stream(ids, max_new_tokens, sampler, plan, own)
        return pieces if stream else "".join(pieces)

    def agenerate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, **kw: Any) -> Any:
        """:meth:`generate` for asyncio: ``await m.agenerate(p)`` is the text; ``stream=True`` gives an async
        iterator of pieces. Concurrent calls join one decode batch (runtime.scheduler); cancelling the task
        frees its row."""
        from edgeadapt.runtime.streams import agenerate
        return agenerate(self, prompt, max_new_tokens, **kw)

    def generate_ids(self, ids: Sequence[int], max_new_tokens: int = 64, sampler: Sampler | None = None, *,
                     adapter: UseSpec = None) -> list[int]:
        """Token ids in, generated token ids out (stops at EOS, which is not included)."""
        ids = args.token_list(ids, self.config.vocab_size)
        args.count(max_new_tokens, "max_new_tokens")
        plan = self._plan([adapter], 1) if adapter is not None else self._plan(None, 1)
        own = None if adapter is None else self._normalise(adapter)
        return [t for step in self._steps([ids], max_new_tokens, sampler or Sampler(), plan, own) for _, t in step]

    def generate_batch(self, rows: Sequence[Sequence[int]], max_new_tokens: int = 64, sampler: Sampler | None = None,
                       *, adapters: Sequence[UseSpec] | None = None, plan: Live | None = None) -> list[list[int]]:
        """Several prompts (token ids) at once, left-padded, one forward pass per step; each row may
        have its own adapter. Returns the generated ids of each row (up to its EOS)."""
        if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or not rows:
            raise UsageError(f"rows: expected a non-empty list of token-id lists, found {type(rows).__name__}")
        rows = [args.token_list(r, self.config.vocab_size) for r in rows]
        args.count(max_new_tokens, "max_new_tokens")
        if plan is None:
            plan = self._plan(adapters, len(rows))
        sampler = sampler or Sampler()
        outs: list[list[int]] = [[] for _ in rows]
        for step in self._steps(rows, max_new_tokens, sampler, plan):
            for i, t in step:
                outs[i].append(t)
        return outs

    def _stream(self, ids: list[int], max_new_tokens: int, sampler: Sampler, plan: Live | None,
                own: Mapping[str, float] | None = None) -> Iterator[str]:
        dec = StreamDecoder(self.tokenizer)
        for step in self._steps([ids], max_new_tokens, sampler, plan, own):
            for _, t in step:
                piece = dec.push(t)
                if piece:
                    yield piece

    def _steps(self, rows: Sequence[Sequence[int]], max_new_tokens: int, sampler: Sampler, plan: Live | None,
               own: Mapping[str, float] | None = None) -> Iterator[list[tuple[int, int]]]:
        """Decode loop: yields [(row, token)] for the rows still running, step by step. One prompt with
        ``batching`` on runs in the model's scheduler (``own``: its set when ``plan`` is its own)."""
        if not rows or any(len(r) == 0 for r in rows):
            raise FormatError("cannot generate from an empty prompt")
        if len(rows) == 1 and self.batching and (plan is None or own is not None):
            from edgeadapt.runtime.scheduler import scheduler_of
            yield from scheduler_of(self).run(rows[0], max_new_tokens, sampler, plan, own)
            return
        shared = plan is None  # the active set, not rows of its own
        if shared:
            self._maybe_auto_merge()
        eos = set(self.config.eos_token_ids)
        width = max(len(r) for r in rows)
        x = self._check_ids([[0] * (width - len(r)) + list(r) for r in rows])
        mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int64)
        pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
        running = np.ones(len(rows), bool)
        past = None
        with self._request(plan) as plan:
            past, mask, pos = self._seq.past(plan, mask, pos)  # a KV prefix (prompt / prefix tuning), if any
            for _ in range(max_new_tokens):
                logits, past = self._forward(x, mask, pos, past, plan)
                nxt = sampler(logits[:, -1])
                step = []
                for i, t in enumerate(nxt.tolist()):
                    if running[i]:
                        if t in eos:
                            running[i] = False
                        else:
                            step.append((i, int(t)))
                if shared or len(rows) == 1:
                    self._stable_tokens += len(step)
                if not running.any():
                    return
                yield step
                x = np.where(running, nxt, 0).astype(np.int64)[:, None]
                pos = pos[:, -1:] + 1
                mask = np.concatenate([mask, running.astype(np.int64)[:, None]], axis=1)
