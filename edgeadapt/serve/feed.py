"""A sync feeds a running ``edgeadapt serve``: what it installed is loaded, what it pruned is unloaded.

The server must run with ``--store`` (the store the sync wrote) and ``--admin-key``. Every adapter the
repository lists for this base (installed now or before) that the server does not run at the store's version
is loaded, or swapped for that version (``"replace": true``: the server reads it, then swaps it in at once, so
no request finds the name missing); one the sync removed is unloaded. So a server left behind (busy, down,
restarted with older files) is brought in line by the next sync, even one that downloads nothing. A name used
by running requests is not swapped or unloaded under them (the server answers 409): it is retried every
``poll`` seconds for up to ``wait`` seconds, then left as it is (the server keeps the version it had) and
reported.

Standard library only (``urllib``): a device that syncs needs no HTTP client package for this.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import quote

from edgeadapt.errors import UpdateError


@dataclass
class FeedResult:
    loaded: list[str] = field(default_factory=list)  # new names now served
    reloaded: list[str] = field(default_factory=list)  # updated names now served at their new version
    unloaded: list[str] = field(default_factory=list)  # removed names no longer served
    kept: list[str] = field(default_factory=list)  # in use past ``wait``: the server keeps its version
    failed: list[str] = field(default_factory=list)  # "name: why" — the server refused the new version

    def summary(self) -> str:
        parts = [f"{k} {len(v)} ({', '.join(v)})" for k, v in
                 (("loaded", self.loaded), ("reloaded", self.reloaded), ("unloaded", self.unloaded)) if v]
        if self.kept:
            parts.append(f"still in use, kept at their running version: {', '.join(self.kept)}")
        if self.failed:
            parts.append("refused: " + "; ".join(self.failed))
        return ", ".join(parts) or "nothing to change"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Server:
    def __init__(self, url: str, key: str, timeout: float):
        self.url, self.key, self.timeout = url.rstrip("/"), key, timeout

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"authorization": f"Bearer {self.key}", "content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:  # noqa: S310 (the user's own server URL)
                return r.status, _body(r.read())
        except urllib.error.HTTPError as e:
            return e.code, _body(e.read())
        except (urllib.error.URLError, OSError) as e:
            raise UpdateError(f"{self.url}: expected a running `edgeadapt serve`, found no answer "
                              f"({getattr(e, 'reason', e)}); the store is synced, the server unchanged") from None


def _body(raw: bytes) -> dict:
    try:
        got = json.loads(raw)
    except ValueError:
        return {}
    return got if isinstance(got, dict) else {}


def _why(status: int, body: dict) -> str:
    err = body.get("error")
    return f"HTTP {status}: {err.get('message') if isinstance(err, dict) else body or 'no JSON body'}"


def feed(url: str, key: str, want: dict[str, int], removed: list[str], *, wait: float = 30.0, poll: float = 0.5,
         timeout: float = 30.0) -> FeedResult:
    """Bring the server at ``url`` in line with the store: ``want`` = {name: version installed}, ``removed`` =
    names a sync took out of the store. Raises :class:`UpdateError` when the server does not answer or refuses
    the admin key."""
    s = _Server(url, key, timeout)
    status, body = s.call("GET", "/admin/adapters")
    if status != 200 or not isinstance(body.get("data"), list):
        raise UpdateError(f"{s.url}: expected the admin listing of `edgeadapt serve --admin-key …` (GET "
                          f"/admin/adapters), found {_why(status, body)}")
    served = {a.get("id"): a.get("version") for a in body["data"] if isinstance(a, dict)}
    out = FeedResult()
    pending = [(n, "reload" if n in served else "load") for n, v in sorted(want.items())
               if n not in removed and served.get(n, -1) != v]
    pending += [(n, "unload") for n in removed if n in served]
    deadline = time.monotonic() + wait
    while pending:
        busy = []
        for name, action in pending:
            if action == "unload":
                status, body = s.call("DELETE", "/admin/adapters/" + quote(name, safe=""))
            else:
                status, body = s.call("POST", "/admin/adapters", {"name": name, "replace": action == "reload"})
            if status == 409 and action != "load":  # running requests use it: not under them
                busy.append((name, action))
            elif action == "unload":
                if status in (200, 404):  # 404: already gone
                    out.unloaded.append(name)
                else:
                    out.failed.append(f"{name}: unload {_why(status, body)}")
            elif status == 200:
                (out.reloaded if action == "reload" else out.loaded).append(name)
            else:
                out.failed.append(f"{name}: load {_why(status, body)}")
        if not busy or time.monotonic() >= deadline:
            out.kept += [n for n, _ in busy]
            break
        pending = busy
        time.sleep(poll)
    return out
