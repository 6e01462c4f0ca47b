"""Token streams of one prompt on a Model's scheduler (:mod:`runtime.scheduler`): a sync iterator, and for asyncio
the tokens each step delivers with no thread hop per token (one executor hop per request, to admit it).

``Model.agenerate`` and ``edgeadapt serve`` run here; with batching off, or for a batch of prompts, ``agenerate``
runs ``generate`` with each ``next`` in the event loop's executor (:func:`aiterate`).
"""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Any, AsyncIterator, Iterator, Sequence

from edgeadapt.runtime.scheduler import _END, scheduler_of


class LoopSink:
    """Where an asyncio request's tokens arrive: filled on its event loop (the worker hands each step's tokens
    to the loop in one ``call_soon_threadsafe``), read by :meth:`get`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.items = loop, collections.deque()
        self._wake: asyncio.Future | None = None

    def push(self, item: Any) -> None:  # on the loop
        self.items.append(item)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def get(self) -> list:
        """Every item delivered so far (at least one)."""
        while not self.items:
            self._wake = self.loop.create_future()
            await self._wake
        out = list(self.items)
        self.items.clear()
        return out


async def arun(sched: Any, ids: Sequence[int], max_new: int, sampler: Any, prepare: Any) -> AsyncIterator[list[int]]:
    """One request for asyncio: lists of the tokens that have arrived (in order). One executor hop, which
    calls ``prepare()`` for (plan, own) — making a plan may wait for a merge to be undone — and admits it;
    closing the iterator (or cancelling its task) drops its row."""
    if max_new <= 0:
        return
    loop = asyncio.get_running_loop()
    sink = LoopSink(loop)
    fut = loop.run_in_executor(None, lambda: sched.submit(ids, max_new, sampler, *prepare(), sink))
    try:
        row = await asyncio.shield(fut)
    except asyncio.CancelledError:  # admitted later all the same: drop it then
        fut.add_done_callback(lambda f: f.cancelled() or f.exception() or sched.cancel(f.result(), wait=False))
        raise
    try:
        while True:
            items = await sink.get()
            toks = []
            for item in items:
                if item is _END:
                    if toks:
                        yield toks
                    return
                if isinstance(item, BaseException):
                    raise item
                toks.append(item)
            yield toks
    finally:
        sched.cancel(row, wait=False)


def stream_tokens(model: Any, ids: Sequence[int], max_new: int, sampler: Any, adapter: Any = None) -> Iterator[int]:
    """Generated token ids of one prompt, as they come (EOS excluded), with ``adapter`` (a name, ``{name: weight}``)
    as its own set, or the active set when None; closing the iterator frees the row."""
    own = None if adapter is None else model._normalise(adapter)
    plan = model._plan(None if adapter is None else [adapter], 1)
    for step in model._steps([list(ids)], max_new, sampler, plan, own):
        for _, t in step:
            yield t


async def astream_tokens(model: Any, ids: Sequence[int], max_new: int, sampler: Any,
                         adapter: Any = None) -> AsyncIterator[list[int]]:
    """:func:`stream_tokens` for asyncio: lists of token ids as each step delivers them, with no thread hop per
    token (batching off: the sync stream, one executor hop per token)."""
    if not model.batching:
        async for t in aiterate(lambda: stream_tokens(model, ids, max_new, sampler, adapter)):
            yield [t]
        return
    if not ids:
        from edgeadapt.errors import FormatError
        raise FormatError("cannot generate from an empty prompt")
    own = None if adapter is None else model._normalise(adapter)
    it = arun(scheduler_of(model), list(ids), max_new, sampler,
                                  lambda: (model._plan(None if adapter is None else [adapter], 1), own))
    try:
        async for toks in it:
            yield toks
    finally:
        await it.aclose()


async def aiterate(make: Any) -> AsyncIterator[Any]:
    """An async iterator over the sync iterator ``make()`` returns, each ``next`` in the event loop's executor;
    closing it (or cancelling its task) closes the sync one there, which frees a request's row."""
    loop = asyncio.get_running_loop()
    it = await loop.run_in_executor(None, lambda: iter(make()))
    lock = threading.Lock()  # next() and close() never overlap (a cancelled await may leave a next() running)

    def step() -> Any:
        with lock:
            return next(it, _END)

    def close() -> None:
        with lock:
            getattr(it, "close", lambda: None)()

    try:
        while True:
            item = await loop.run_in_executor(None, step)
            if item is _END:
                return
            yield item
    finally:
        await asyncio.shield(loop.run_in_executor(None, close))


def agenerate(model: Any, prompt: Any, max_new_tokens: int = 64, *, stream: bool = False, **kw: Any) -> Any:
    """``Model.agenerate``: the text (an awaitable), or with ``stream=True`` an async iterator of pieces. One prompt
    with batching on runs in the scheduler with no thread hop per token; a batch of prompts, or batching off, runs
    ``generate`` with each ``next`` in the executor. Cancelling the task (or closing the iterator) frees its row."""
    batch = isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], str)
    if batch or not model.batching:
        pieces = aiterate(lambda: model.generate(prompt, max_new_tokens, stream=True, **kw))
    else:
        pieces = _apieces(model, prompt, max_new_tokens, **kw)
    if stream:
        return pieces

    async def text() -> str:
        return "".join([p async for p in pieces])
    return text()


async def _apieces(model: Any, prompt: Any, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
                   top_p: float = 1.0, seed: int | None = None, chat: bool | None = None, system: str | None = None,
                   adapters: Any = None) -> AsyncIterator[str]:
    """Text pieces of one prompt, as :meth:`Model.generate` with ``stream=True`` gives them (the same checks)."""
    from edgeadapt.runtime import args
    from edgeadapt.runtime.sampling import Sampler
    from edgeadapt.runtime.tokenizer import StreamDecoder

    args.prompt(prompt)
    args.count(max_new_tokens, "max_new_tokens")
    sampler = Sampler(temperature, top_k, top_p, seed)
    ids = (model.encode_prompt(prompt, chat, system) if isinstance(prompt, str)
           else args.token_list(prompt, model.config.vocab_size))
    if not ids:
        from edgeadapt.errors import FormatError
        raise FormatError("cannot generate from an empty prompt")
    dec = StreamDecoder(model.tokenizer)

    def prepare() -> tuple:  # in the executor, as generate() does it: the plan checks ``adapters``
        plan = model._plan(adapters, 1)
        return plan, None if adapters is None else model._normalise(adapters[0])
    it = arun(scheduler_of(model), ids, max_new_tokens, sampler, prepare)
    try:
        async for toks in it:
            for t in toks:
                piece = dec.push(t)
                if piece:
                    yield piece
    finally:
        await it.aclose()
