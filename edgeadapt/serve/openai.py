"""The OpenAI API surface edgeadapt serves: request validation and response shapes, no I/O.

Requests (``POST /v1/completions``, ``POST /v1/chat/completions``) MUST be JSON objects. Fields read:
``model`` (the base's id or a loaded adapter's name), ``prompt`` (completions: one string, or one list of token
ids) or ``messages`` (chat: ``[{"role", "content"}]``, the content a string or a list of text parts), ``echo``
(completions: the prompt's text before the completion), ``max_tokens`` (or ``max_completion_tokens``; default
16 for completions, as OpenAI's; the rest of the context for chat, as OpenAI's chat and vLLM), ``temperature``
(0–2, default 1), ``top_p`` (0 < p ≤ 1), ``seed``, ``stream``, ``stream_options.include_usage``, ``stop`` (a
string or up to 4), ``n`` (1 only). Extension: ``adapters``, ``{name: weight}``, a weighted stack of loaded
adapters (the ``model`` then names the base, or one of those adapters). Fields that would change the answer
and are not served (``logprobs``, penalties, ``logit_bias``, ``tools``, a JSON ``response_format``, ``suffix``,
``best_of`` > 1) are refused by name when set to anything but their default, never ignored; other unknown
fields are ignored, as OpenAI's own clients send some. Every refusal is an :class:`APIError` with OpenAI's
error body.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


class APIError(Exception):
    """An answer with status ``status`` and body ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class GenRequest:
    model: str
    prompt: str | None = None  # completions
    prompt_ids: list[int] | None = None  # completions given token ids
    echo: bool = False  # completions: the prompt's text first
    messages: list[dict[str, str]] | None = None  # chat
    max_tokens: int | None = 16  # None: the rest of the context (chat without a limit), set once the prompt is known
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    adapters: dict[str, float] | None = None  # the extension field


def _num(body: dict, key: str, lo: float, hi: float, default: float, *, integer: bool = False,
         lo_open: bool = False) -> Any:
    v = body.get(key)
    if v is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kind) or (not integer and not math.isfinite(v)) \
            or v < lo or v > hi or (lo_open and v == lo):
        rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise APIError(400, f"'{key}': expected {'an integer' if integer else 'a number'} in {rng}, found {v!r}", key)
    return v


def parse(body: Any, chat: bool) -> GenRequest:
    """Validate a request body; every problem is a 400 naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, f"expected a JSON object, found {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, f"'model': expected the id of the base or of a loaded adapter, found {model!r}", "model")
    req = GenRequest(model=model)
    if chat:
        req.messages = _messages(body.get("messages"))
    else:
        req.prompt, req.prompt_ids = _prompt(body.get("prompt"))
        echo = body.get("echo", False)
        if not isinstance(echo, bool) and echo is not None:
            raise APIError(400, f"'echo': expected true or false, found {echo!r}", "echo")
        req.echo = bool(echo)
    _refuse_unserved(body)
    key = "max_completion_tokens" if body.get("max_tokens") is None and "max_completion_tokens" in body else "max_tokens"
    req.max_tokens = _num(body, key, 1, 1 << 20, None if chat else 16, integer=True)
    req.temperature = float(_num(body, "temperature", 0, 2, 1.0))
    req.top_p = float(_num(body, "top_p", 0, 1, 1.0, lo_open=True))
    req.seed = _num(body, "seed", -(1 << 63), (1 << 63) - 1, None, integer=True)
    if req.seed is not None and req.seed < 0:
        req.seed &= (1 << 64) - 1
    if _num(body, "n", 1, 1, 1, integer=True) != 1:
        raise APIError(400, "'n': only 1 choice per request is served", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise APIError(400, f"'stream': expected true or false, found {stream!r}", "stream")
    req.stream = bool(stream)
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise APIError(400, "'stream_options': expected an object", "stream_options")
    req.include_usage = bool(opts.get("include_usage", False))
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"'stop': expected a string or a list of up to 4 non-empty strings, found {body.get('stop')!r}",
                       "stop")
    req.stop = stop
    ads = body.get("adapters")
    if ads is not None:
        if not isinstance(ads, dict) or not all(isinstance(k, str) and not isinstance(v, bool)
                                                and isinstance(v, (int, float)) and math.isfinite(v)
                                                for k, v in ads.items()):
            raise APIError(400, "'adapters': expected {adapter name: weight} with finite numbers", "adapters")
        req.adapters = {k: float(v) for k, v in ads.items()}
    return req


# fields that change the answer and that this server does not compute: their defaults (what clients send when
# the user set nothing) pass, anything else is refused by name rather than silently ignored
_UNSERVED = {"logprobs": False, "top_logprobs": 0, "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {},
             "tools": [], "functions": [], "suffix": "", "best_of": 1, "response_format": {"type": "text"}}


def _refuse_unserved(body: dict) -> None:
    for key, default in _UNSERVED.items():
        v = body.get(key)
        if v is None or (v == default and isinstance(v, bool) == isinstance(default, bool)):
            continue
        raise APIError(400, f"'{key}': not served by edgeadapt (expected it absent or {default!r}, found {v!r:.80})", key)


def _text_of(content: Any, where: str) -> str:
    """A message's content: a string, or OpenAI's list of parts of which only text parts are read."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"'{where}.content[{j}]': expected a text part {{\"type\": \"text\", \"text\": str}}, "
                                    f"found {kind or type(part).__name__!r}; this server reads text only", "messages")
            texts.append(part["text"])
        return "\n".join(texts)  # as vLLM joins a message's text parts
    raise APIError(400, f"'{where}.content': expected a string or a non-empty list of text parts, found "
                        f"{type(content).__name__}", "messages")


def _messages(msgs: Any) -> list[dict[str, str]]:
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages': expected a non-empty list of {\"role\": str, \"content\": str}", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"'messages[{i}]': expected {{\"role\": str, \"content\": str}}, found {m!r:.80}", "messages")
        out.append({"role": m["role"], "content": _text_of(m.get("content"), f"messages[{i}]")})
    return out


def _prompt(prompt: Any) -> tuple[str | None, list[int] | None]:
    """One prompt: a string, a list holding one string, a list of token ids, or a list holding one such list."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt, None
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return None, list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise APIError(400, f"'prompt': expected one prompt per request, found a list of {len(prompt)}; send one "
                            "request per prompt (they are batched together)", "prompt")
    raise APIError(400, "'prompt': expected a non-empty string or a non-empty list of token ids, found "
                        f"{type(prompt).__name__ if prompt != '' and prompt != [] else repr(prompt)}", "prompt")


# ---- responses
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, chat: bool, text: str, finish: str, use: dict) -> dict:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": use}


def chunk(rid: str, model: str, chat: bool, text: str | None, finish: str | None, first: bool = False) -> dict:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["delta"] = ({"role": "assistant"} if first else {}) | ({} if text is None else {"content": text})
    else:
        choice["text"] = text or ""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice]}


class SSEChunks:
    """One stream's server-sent events as bytes: the JSON of :func:`chunk` made once, each token's text spliced
    into it (a ``json.dumps`` of the text, not of a dict per token)."""

    _HOLE = "\x00edgeadapt\x00"

    def __init__(self, rid: str, model: str, chat: bool):
        self.rid, self.model, self.chat = rid, model, chat
        body = json.dumps(chunk(rid, model, chat, self._HOLE, None))
        head, _, tail = body.partition(json.dumps(self._HOLE))
        self._head, self._tail = b"data: " + head.encode(), tail.encode() + b"\n\n"

    def first(self) -> bytes:
        return self._event(chunk(self.rid, self.model, self.chat, "" if self.chat else None, None, first=True))

    def text(self, text: str) -> bytes:
        return self._head + json.dumps(text).encode() + self._tail

    def finish(self, reason: str) -> bytes:
        return self._event(chunk(self.rid, self.model, self.chat, None, reason))

    @staticmethod
    def _event(body: dict) -> bytes:
        return b"data: " + json.dumps(body).encode() + b"\n\n"


class StopScan:
    """Text as it is generated, held back while it may be the start of a stop string; ``push`` returns what may be
    sent and whether a stop string was reached (the text before it is then everything)."""

    def __init__(self, stop: list[str]):
        self.stop, self.held, self.hit = stop, "", False
        self.keep = max((len(s) for s in stop), default=1) - 1

    def push(self, piece: str) -> str:
        if not self.stop:
            return piece
        self.held += piece
        cut = min((i for i in (self.held.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            out, self.held = self.held[:cut], ""
            return out
        n = max(0, len(self.held) - self.keep)
        out, self.held = self.held[:n], self.held[n:]
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
