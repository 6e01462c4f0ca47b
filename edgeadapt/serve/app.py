"""An OpenAI-compatible HTTP server for one base and its adapters (starlette; run by uvicorn).

Every request runs in the model's scheduler (:mod:`edgeadapt.runtime.scheduler`): concurrent requests share
one decode batch, each with its own adapter set. ``model`` picks the base (its id) or a loaded adapter (its
name); the ``adapters`` extension field gives a weighted stack. Endpoints: ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /health``, and — only when an admin key is set —
``GET|POST /admin/adapters``, ``DELETE /admin/adapters/{name}``. Errors are OpenAI-shaped JSON; a client that
disconnects cancels its row.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from edgeadapt.errors import AdapterNotFoundError, EdgeAdaptError
from edgeadapt.serve import openai as oa
from edgeadapt.serve.openai import APIError


class Service:
    """The model, its id, its keys, and which adapters running requests use (an adapter in use is not unloaded)."""

    def __init__(self, model: Any, base_id: str, *, api_key: str | None = None, admin_key: str | None = None):
        self.m, self.base_id = model, base_id
        self.api_key, self.admin_key = api_key, admin_key
        self.in_use: dict[str, int] = {}
        self.created = int(time.time())

    @functools.cached_property
    def max_body(self) -> int:
        """The largest request body read: a prompt of the whole context written with the vocabulary's longest
        entries, each byte JSON-escaped (≤ 6 bytes a byte), and 64 KiB for the rest; bases without a tokenizer
        read up to 1 MiB. A larger body is refused (413) before it is read."""
        try:
            span = self.m.tokenizer.max_token_bytes
        except EdgeAdaptError:
            span = 0
        return max(1 << 20, self.m.config.context_length * span * 6 + (64 << 10))

    # ---- checks
    def auth(self, request: Any, key: str | None) -> None:
        if key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "expected the header 'Authorization: Bearer <key>' with this server's key, found "
                                + ("another key" if got else "none"), code="invalid_api_key")

    def spec(self, req: oa.GenRequest) -> dict[str, float] | None:
        """The request's adapter set: None = the bare base."""
        loaded = self.m.adapters
        if req.model != self.base_id and req.model not in loaded:
            raise APIError(404, f"The model '{req.model}' does not exist: this server has the base "
                                f"'{self.base_id}' and the adapters {sorted(loaded)}", "model", "model_not_found")
        spec = {} if req.model == self.base_id else {req.model: 1.0}
        if req.adapters is not None:
            missing = sorted(n for n in req.adapters if n not in loaded)
            if missing:
                raise APIError(404, f"'adapters' names {missing}, which are not loaded; loaded: {sorted(loaded)}",
                               "adapters", "model_not_found")
            spec.update(req.adapters)
        spec = {n: w for n, w in spec.items() if w != 0}
        return spec or None

    def prompt_ids(self, req: oa.GenRequest) -> list[int]:
        try:
            tok = self.m.tokenizer
        except EdgeAdaptError as e:
            raise APIError(400, str(e)) from None
        limit = self.m.config.context_length
        text = req.prompt if req.messages is None else "".join(m["content"] for m in req.messages)
        if text is not None and len(text) > limit:  # cheap bound first: no tokenizer run on a text far too long
            n = len(text.encode("utf-8"))
            if n > 2 * limit * tok.max_token_bytes:  # ≥ 2× the context in tokens, whatever a normalizer drops
                raise APIError(413, f"expected prompt + max_tokens ≤ the context of {limit} tokens, found a prompt of "
                                    f"{n} bytes, more than {2 * limit} tokens of this vocabulary", "prompt",
                               "context_length_exceeded")
        if req.prompt_ids is not None:  # token ids as given: no BOS added, as llama.cpp's server and vLLM take them
            vocab = self.m.config.vocab_size
            bad = [t for t in req.prompt_ids if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"'prompt': expected token ids in [0, {vocab}), found {bad[0]}", "prompt")
            ids = list(req.prompt_ids)
        elif req.messages is None:
            ids = self.m.encode_prompt(req.prompt, chat=False)
        elif not tok.chat_template:
            raise APIError(400, f"the base '{self.base_id}' has no chat template; use /v1/completions", "messages")
        else:
            ids = tok.encode_raw(tok.render_chat(req.messages))
        if not ids:
            raise APIError(400, "the prompt encodes to no tokens", "prompt")
        if req.max_tokens is None:  # chat without a limit: until EOS or the end of the context
            req.max_tokens = max(1, limit - len(ids))
        if len(ids) + req.max_tokens > limit:
            raise APIError(413, f"expected prompt + max_tokens ≤ the context of {limit} tokens, found {len(ids)} + "
                                f"{req.max_tokens}; shorten the prompt or lower max_tokens", "prompt",
                           "context_length_exceeded")
        return ids


async def _json(request: Any, limit: int) -> Any:
    """The request's JSON, read up to ``limit`` bytes: a larger body is a 413 before it is held in memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"expected a request body of at most {limit} bytes, found {declared}", code="request_too_large")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise APIError(413, f"expected a request body of at most {limit} bytes, found more", code="request_too_large")
        parts.append(part)
    raw = b"".join(parts)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"expected a JSON body, found {len(raw)} bytes that do not parse ({e})") from None


async def _tokens(svc: Service, ids: list[int], req: oa.GenRequest, spec: dict | None) -> AsyncIterator[list[int]]:
    """The request's tokens as the scheduler hands them to this loop: a list per step (more when this stream
    fell behind), no thread hop per token."""
    from edgeadapt.runtime.sampling import Sampler
    from edgeadapt.runtime.scheduler import QueueFullError
    from edgeadapt.runtime.streams import astream_tokens

    sampler = Sampler(req.temperature, 0, req.top_p, req.seed)
    names = list(spec or ())
    for n in names:
        svc.in_use[n] = svc.in_use.get(n, 0) + 1
    it = astream_tokens(svc.m, ids, req.max_tokens, sampler, spec)
    try:
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            return
        except QueueFullError as e:
            raise APIError(429, str(e), code="queue_full") from None
        yield first
        async for toks in it:
            yield toks
    finally:
        await it.aclose()
        for n in names:
            svc.in_use[n] -= 1


async def _until_disconnect(request: Any) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


def build_app(svc: Service, *, workers: int = 64, cors_origins: tuple[str, ...] = ()) -> Any:
    """The ASGI app. ``cors_origins``: web origins (``https://chat.example``, or ``*``) whose pages may call this
    server from a browser (CORS); none by default, so a page the user visits cannot drive a local model."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from edgeadapt.runtime.tokenizer import StreamDecoder

    async def generate(request: Any, chat: bool) -> Any:
        svc.auth(request, svc.api_key)
        req = oa.parse(await _json(request, svc.max_body), chat)
        spec = svc.spec(req)
        ids = await asyncio.get_running_loop().run_in_executor(None, svc.prompt_ids, req)  # off the event loop
        rid = oa.new_id(chat)
        echo = "" if chat or not req.echo else req.prompt if req.prompt is not None else svc.m.tokenizer.decode(ids)
        tokens = _tokens(svc, ids, req, spec)
        try:  # admission and prefill before the status line: a full queue is a 429, not a broken stream
            first = await tokens.__anext__()
        except StopAsyncIteration:
            first = None

        async def batches() -> AsyncIterator[list[int]]:
            if first is not None:
                yield first
                async for toks in tokens:
                    yield toks

        async def pieces() -> AsyncIterator[tuple[list[str], str | None, int]]:
            """(texts to send, one per token that completed some text; finish reason once done; tokens so far)."""
            dec, scan, n = StreamDecoder(svc.m.tokenizer), oa.StopScan(req.stop), 0
            try:
                async for batch in batches():
                    texts = []
                    for t in batch:
                        n += 1
                        out = scan.push(dec.push(t))
                        if out:
                            texts.append(out)
                        if scan.hit:
                            break
                    if texts:
                        yield texts, None, n
                    if scan.hit:
                        break
                tail = "" if scan.hit else scan.flush()
                yield [tail] if tail else [], "length" if n >= req.max_tokens and not scan.hit else "stop", n
            finally:
                await tokens.aclose()

        if req.stream:
            async def sse() -> AsyncIterator[bytes]:
                event = oa.SSEChunks(rid, req.model, chat)
                yield event.first() + (event.text(echo) if echo else b"")
                n = 0
                async for texts, finish, n in pieces():
                    out = b"".join(event.text(t) for t in texts)  # one write for what this step brought
                    if finish:
                        out += event.finish(finish)
                    if out:
                        yield out
                if req.include_usage:
                    body = oa.chunk(rid, req.model, chat, None, None)
                    body["choices"], body["usage"] = [], oa.usage(len(ids), n)
                    yield b"data: " + json.dumps(body).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

        async def collect() -> tuple[str, str, int]:
            text, finish, n = echo, "stop", 0
            async for texts, fin, n in pieces():
                text += "".join(texts)
                finish = fin or finish
            return text, finish, n

        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_until_disconnect(request))
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:  # the client left: its row leaves the batch
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            raise APIError(499, "client closed the request")
        gone.cancel()
        text, finish, n = work.result()
        return JSONResponse(oa.completion(rid, req.model, chat, text, finish, oa.usage(len(ids), n)))

    async def completions(request: Any) -> Any:
        return await generate(request, chat=False)

    async def chat_completions(request: Any) -> Any:
        return await generate(request, chat=True)

    def model_cards() -> list[dict]:
        data = [{"id": svc.base_id, "object": "model", "created": svc.created, "owned_by": "edgeadapt"}]
        return data + [{"id": n, "object": "model", "created": svc.created, "owned_by": "edgeadapt",
                        "parent": svc.base_id, "root": svc.base_id} for n in sorted(svc.m.adapters)]

    async def models(request: Any) -> Any:
        svc.auth(request, svc.api_key)
        return JSONResponse({"object": "list", "data": model_cards()})

    async def model(request: Any) -> Any:  # GET /v1/models/{id}: the OpenAI client's models.retrieve
        svc.auth(request, svc.api_key)
        want = request.path_params["model"]
        for card in model_cards():
            if card["id"] == want:
                return JSONResponse(card)
        raise APIError(404, f"The model '{want}' does not exist: this server has the base '{svc.base_id}' and the "
                            f"adapters {sorted(svc.m.adapters)}", "model", "model_not_found")

    async def health(request: Any) -> Any:
        from edgeadapt.runtime.scheduler import scheduler_of
        s = scheduler_of(svc.m)
        return JSONResponse({"status": "ok", "running": s.active, "steps": s.steps, "cancelled": s.cancelled})

    # ---- admin: load / unload adapters (off unless an admin key is set)
    def admin_auth(request: Any) -> None:
        if svc.admin_key is None:
            raise APIError(404, "admin endpoints are off: start the server with --admin-key", code="admin_off")
        svc.auth(request, svc.admin_key)

    async def admin_list(request: Any) -> Any:
        admin_auth(request)
        return JSONResponse({"data": [{"id": n, "version": getattr(svc.m.adapters[n], "version", None),
                                       "in_use": svc.in_use.get(n, 0)} for n in sorted(svc.m.adapters)]})

    async def admin_load(request: Any) -> Any:
        admin_auth(request)
        body = await _json(request, 1 << 20)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"] \
                or not isinstance(body.get("file", body["name"]), str):
            raise APIError(400, "expected {\"name\": NAME} (an adapter installed in the store) or "
                                "{\"name\": NAME, \"file\": PATH}")
        name, replace = body["name"], body.get("replace", False)
        if not isinstance(replace, bool):
            raise APIError(400, f"'replace': expected true or false, found {replace!r}", "replace")
        if name == svc.base_id or (name in svc.m.adapters and not replace):
            raise APIError(409, f"'{name}' is already loaded (or is the base's id); unload it first, or send "
                                "\"replace\": true to swap in another version", "name")
        source = body.get("file", name)
        if not os.path.exists(source) and ("file" in body or svc.m.store is None):
            raise APIError(404, f"no adapter file {source!r}" + ("" if "file" in body else
                                                                " (and this server has no --store to load it from)"),
                           "file")
        try:  # read and verified off the event loop; kept below, on it
            delta, _ = await asyncio.get_running_loop().run_in_executor(None, svc.m.read_adapter, source, name)
        except FileNotFoundError as e:
            raise APIError(404, f"no adapter file or installed adapter {source!r} ({e.strerror or e})", "file") from None
        except EdgeAdaptError as e:
            raise APIError(404 if isinstance(e, AdapterNotFoundError) else 400, str(e), "file") from None
        # on the event loop, with no await between the check and the swap: no request is admitted in between, so
        # none runs with the name missing, and none that runs sees its version change (a batch rebuilt later
        # resolves a row's adapters by name)
        if name in svc.m.adapters and not replace:
            raise APIError(409, f"'{name}' was loaded meanwhile; send \"replace\": true to swap it", "name")
        if svc.in_use.get(name):
            raise APIError(409, f"'{name}' is used by {svc.in_use[name]} running requests; retry when they end", "name")
        svc.m.add_adapter(delta, name=name)
        return JSONResponse({"id": name, "object": "model", "owned_by": "edgeadapt", "parent": svc.base_id,
                             "version": getattr(delta, "version", None)})

    async def admin_unload(request: Any) -> Any:
        admin_auth(request)
        name = request.path_params["name"]
        if name not in svc.m.adapters:
            raise APIError(404, f"no adapter named '{name}'; loaded: {sorted(svc.m.adapters)}", "name")
        if svc.in_use.get(name):
            raise APIError(409, f"'{name}' is used by {svc.in_use[name]} running requests; retry when they end", "name")
        svc.m.remove_adapter(name)
        return JSONResponse({"id": name, "deleted": True})

    # ---- errors: OpenAI's shape, never a traceback
    async def api_error(request: Any, e: APIError) -> Any:
        return JSONResponse(e.body(), status_code=e.status)

    async def http_error(request: Any, e: HTTPException) -> Any:
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body(),
                            status_code=e.status_code)

    async def edge_error(request: Any, e: EdgeAdaptError) -> Any:
        from edgeadapt.runtime.scheduler import QueueFullError
        status = 429 if isinstance(e, QueueFullError) else 400
        return JSONResponse(APIError(status, str(e)).body(), status_code=status)

    async def internal(request: Any, e: Exception) -> Any:
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edgeadapt-serve")
        asyncio.get_running_loop().set_default_executor(pool)  # every stream waits for tokens in one of these
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    routes = [Route("/v1/models", models), Route("/v1/models/{model:path}", model),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]), Route("/health", health),
              Route("/admin/adapters", admin_list), Route("/admin/adapters", admin_load, methods=["POST"]),
              Route("/admin/adapters/{name}", admin_unload, methods=["DELETE"])]
    middleware = []
    if cors_origins:
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins), max_age=600,
                                     allow_methods=["GET", "POST", "DELETE"], allow_headers=["authorization", "content-type"]))
    return Starlette(routes=routes, lifespan=lifespan, middleware=middleware, exception_handlers={
        APIError: api_error, HTTPException: http_error, EdgeAdaptError: edge_error, Exception: internal})


def serve(svc: Service, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning", workers: int = 96,
          cors_origins: tuple[str, ...] = ()) -> None:
    """Serve until SIGINT / SIGTERM (uvicorn's handlers: running requests get a few seconds, then it exits)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Any:  # uvicorn's re-raises the signal after shutting down: exit status -15
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    config = uvicorn.Config(build_app(svc, workers=workers, cors_origins=cors_origins), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            access_log=False)
    Server(config).run()
