"""HTTP for adapter updates: ngclient's fetcher, with retries, resume (HTTP Range) and a slow-retrieval guard.

:class:`Fetcher` is a ``tuf.ngclient.FetcherInterface``: ngclient downloads metadata through it
(and bounds every metadata file's length itself). :meth:`Fetcher.download_to` downloads a target
into a partial file that survives the process: an interrupted download — a reset connection, a
truncated body, a killed process — continues from the bytes already on disk with ``Range:
bytes=N-`` when the server answers 206, and from zero when it answers 200. It never keeps more
than the length the signed metadata allows (endless data). A connection with no byte for
``timeout`` seconds, or slower than ``min_rate`` bytes/s on average after ``grace`` seconds, is
dropped (slow retrieval). Connection errors, truncated bodies and 5xx answers are retried
``retries`` times, resuming where the body stopped. The caller verifies the result with tuf's
``TargetFile.verify_length_and_hashes``: nothing here decides that bytes are good.

Device-safe: urllib3 (which tuf uses) and the standard library.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Callable, Iterator

import urllib3
from tuf.api import exceptions
from tuf.ngclient.fetcher import FetcherInterface

_CHUNK = 1 << 16
_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class Fetcher(FetcherInterface):
    """GET over urllib3 with bounded time and bounded retries; counts the body bytes it receives."""

    def __init__(self, *, timeout: float = 20.0, min_rate: float = 2048.0, grace: float = 10.0, retries: int = 3,
                 user_agent: str = "edgeadapt-sync"):
        self.timeout, self.min_rate, self.grace, self.retries = timeout, min_rate, grace, retries
        self.bytes = 0  # body bytes received, every request
        self.requests = 0
        self.user_agent = user_agent
        self._pool = urllib3.PoolManager(retries=False)

    # ---- one request
    def _open(self, url: str, offset: int) -> tuple[urllib3.BaseHTTPResponse, int]:
        """GET ``url`` from byte ``offset``; returns the response and the offset its body starts at."""
        headers = {"User-Agent": self.user_agent} | ({"Range": f"bytes={offset}-"} if offset else {})
        self.requests += 1
        try:
            r = self._pool.request("GET", url, headers=headers, preload_content=False, redirect=False,
                                   timeout=urllib3.Timeout(connect=self.timeout, read=self.timeout))
        except urllib3.exceptions.TimeoutError as e:
            raise exceptions.SlowRetrievalError(f"{url}: no answer in {self.timeout:g}s") from e
        if r.status >= 400:
            r.release_conn()
            raise exceptions.DownloadHTTPError(f"{url}: HTTP {r.status}", r.status)
        if r.status == 206:
            m = _RANGE_RE.fullmatch(r.headers.get("Content-Range", ""))
            if m is None or int(m.group(1)) != offset:
                r.release_conn()
                raise exceptions.DownloadError(f"{url}: asked for bytes from {offset}, the server sent "
                                               f"Content-Range {r.headers.get('Content-Range')!r}")
            return r, offset
        if r.status != 200:
            r.release_conn()
            raise exceptions.DownloadHTTPError(f"{url}: HTTP {r.status} (expected 200 or 206)", r.status)
        return r, 0

    def _body(self, url: str, r: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        t0, got = time.monotonic(), 0
        try:
            while chunk := r.read1(_CHUNK):  # what has arrived: an interrupted body keeps every byte it got
                got += len(chunk)
                self.bytes += len(chunk)
                yield chunk
                dt = time.monotonic() - t0
                if dt > self.grace and got / dt < self.min_rate:
                    raise exceptions.SlowRetrievalError(f"{url}: {got:,} bytes in {dt:.1f}s is below the "
                                                        f"{self.min_rate:,.0f} bytes/s this device accepts")
        except urllib3.exceptions.TimeoutError as e:
            raise exceptions.SlowRetrievalError(f"{url}: no byte for {self.timeout:g}s") from e
        finally:
            r.release_conn()

    # ---- a body from an offset, resumed across dropped connections
    def stream(self, url: str, offset: int = 0) -> Iterator[tuple[int, bytes]]:
        """Yield (offset, chunk) from ``offset`` to the end of ``url``'s body, reconnecting (with Range)
        after connection errors, truncated bodies and 5xx answers, at most ``retries`` times."""
        failures = 0
        while True:
            try:
                r, start = self._open(url, offset)
                skip = offset - start  # a server that ignores Range sends everything again
                for chunk in self._body(url, r):
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                        if not chunk:
                            continue
                    yield offset, chunk
                    offset += len(chunk)
                return
            except exceptions.DownloadHTTPError as e:
                if e.status_code < 500 or failures >= self.retries:
                    raise
            except (urllib3.exceptions.HTTPError, ConnectionError) as e:  # reset, refused, truncated body
                if isinstance(e, urllib3.exceptions.TimeoutError):
                    raise exceptions.SlowRetrievalError(f"{url}: {e}") from e
                if failures >= self.retries:
                    raise exceptions.DownloadError(f"{url}: {type(e).__name__}: {e} "
                                                   f"(gave up after {self.retries} retries)") from e
            failures += 1
            time.sleep(min(0.2 * 2 ** failures, 2.0))

    def _fetch(self, url: str) -> Iterator[bytes]:  # ngclient: metadata
        return (chunk for _, chunk in self.stream(url))

    # ---- a target into a partial file that outlives the process
    def download_to(self, url: str, part: Path, length: int,
                    progress: Callable[[int, int], None] | None = None) -> int:
        """Complete ``part`` to ``length`` bytes from ``url``, resuming from its current size; returns the
        bytes received. More bytes than ``length`` (endless data) are refused and never written."""
        have = part.stat().st_size if part.is_file() else 0
        if have > length:
            part.unlink()
            have = 0
        if have == length:
            return 0
        before = self.bytes
        with open(part, "r+b" if have else "wb") as f:
            f.seek(have)
            for off, chunk in self.stream(url, have):
                if off != f.tell():
                    f.seek(off)
                    f.truncate()
                if off + len(chunk) > length:
                    raise exceptions.DownloadLengthMismatchError(
                        f"{url}: the server sent more than the {length:,} bytes the signed metadata allows")
                f.write(chunk)
                if progress is not None:
                    progress(off + len(chunk), length)
            f.flush()
            os.fsync(f.fileno())
            if f.tell() != length:
                raise exceptions.DownloadLengthMismatchError(
                    f"{url}: the body ended after {f.tell():,} of {length:,} bytes")
        return self.bytes - before
