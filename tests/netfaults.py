"""A real static server (nginx on loopback) and a fault-injecting HTTP proxy between it and a device.

``Nginx(root)`` serves a folder with its own prefix, config, pid and logs (Range works for static
files by default); its access log records every request's status, bytes on the wire and Range.
``FaultProxy(upstream)`` forwards one request per connection and, for requests whose path contains
a given string, misbehaves: ``reset`` (RST after half the body), ``truncate`` (FIN after half the
body, Content-Length unchanged), ``stall`` (half the body, then silence), ``slow`` (the body trickled
at ``rate`` bytes/s), ``500`` (an error answer), ``longer`` (bytes after the declared body),
``endless`` (no Content-Length, the body then garbage forever), ``norange`` (the Range header dropped,
as by a server without Range support). It counts the bytes it sends.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen | None = None, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class Nginx:
    """nginx serving ``root`` on 127.0.0.1; ``why_not`` says why it could not start (then ``url`` is None)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.prefix = Path(tempfile.mkdtemp(prefix="edgeadapt-nginx-"))
        self.port = free_port()
        self.url: str | None = None
        self.why_not = ""
        self.proc: subprocess.Popen | None = None
        if not os.path.exists(NGINX):
            self.why_not = f"nginx not found ({NGINX}); install Debian's nginx-light"
            return
        for d in ("logs", "tmp"):
            (self.prefix / d).mkdir()
        conf = self.prefix / "nginx.conf"
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read pytest's 0700 temp folders
        conf.write_text(f"""daemon off;
{user}worker_processes 1;
pid {self.prefix}/nginx.pid;
error_log {self.prefix}/logs/error.log warn;
events {{ worker_connections 128; }}
http {{
    types {{ application/json json; application/octet-stream gguf; }}
    default_type application/octet-stream;
    log_format wire '$uri $status $bytes_sent "$http_range"';
    access_log {self.prefix}/logs/access.log wire;
    client_body_temp_path {self.prefix}/tmp/body;
    proxy_temp_path {self.prefix}/tmp/proxy;
    fastcgi_temp_path {self.prefix}/tmp/fastcgi;
    uwsgi_temp_path {self.prefix}/tmp/uwsgi;
    scgi_temp_path {self.prefix}/tmp/scgi;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root.resolve()};
        location / {{ }}
    }}
}}
""")
        try:
            self.proc = subprocess.Popen([NGINX, "-p", str(self.prefix), "-c", str(conf), "-e",
                                          str(self.prefix / "logs" / "error.log")],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError as e:
            self.why_not = f"nginx could not start: {e}"
            return
        if not _wait_port(self.port, self.proc):
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else "no answer"
            self.stop()
            self.why_not = f"nginx did not start on 127.0.0.1:{self.port}: {err.strip()[:300]}"
            return
        self.url = f"http://127.0.0.1:{self.port}"

    def log(self) -> list[tuple[str, int, int, str]]:
        """(uri, status, bytes sent, Range header) for every request so far."""
        p = self.prefix / "logs" / "access.log"
        out = []
        for line in p.read_text().splitlines() if p.is_file() else []:
            uri, status, sent, rng = line.split(" ", 3)
            rng = rng.strip('"')
            out.append((uri, int(status), int(sent), "" if rng == "-" else rng))
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.prefix, ignore_errors=True)


@dataclass
class Fault:
    kind: str  # reset | truncate | stall | slow | 500 | longer | endless | norange
    match: str  # substring of the request path
    times: int = 1  # how many matching requests misbehave (-1: all)
    rate: float = 200.0  # slow: bytes per second
    at: float = 0.5  # reset / truncate / stall: share of the body sent first


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 that breaks the answers it is told to; ``sent`` counts bytes to clients."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.faults: list[Fault] = []
        self.sent = 0
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def add(self, kind: str, match: str, **kw) -> Fault:
        f = Fault(kind, match, **kw)
        with self._lock:
            self.faults.append(f)
        return f

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def close(self) -> None:
        self._stop.set()
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _pick(self, path: str) -> Fault | None:
        with self._lock:
            self.requests.append(path)
            for f in self.faults:
                if f.match in path and f.times != 0:
                    f.times -= 1 if f.times > 0 else 0
                    return f
        return None

    def _send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        with self._lock:
            self.sent += len(data)

    def _handle(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(30)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            lines = head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
            path = lines[0].split(b" ")[1].decode()
            fault = self._pick(path)
            if fault is not None and fault.kind == "500":
                self._send(conn, b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            drop = (b"connection:", b"range:") if fault is not None and fault.kind == "norange" else (b"connection:",)
            req = b"\r\n".join([ln for ln in lines if not ln.lower().startswith(drop)] +
                               [b"Connection: close"]) + b"\r\n\r\n"
            with socket.create_connection(("127.0.0.1", self.upstream), timeout=30) as up:
                up.sendall(req)
                resp = b""
                while chunk := up.recv(1 << 20):
                    resp += chunk
            rhead, _, body = resp.partition(b"\r\n\r\n")
            rhead += b"\r\n\r\n"
            self._answer(conn, fault, rhead, body)
        except OSError:
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def _answer(self, conn: socket.socket, fault: Fault | None, head: bytes, body: bytes) -> None:
        if fault is None or fault.kind == "norange":
            self._send(conn, head + body)
            return
        cut = int(len(body) * fault.at)
        if fault.kind == "reset":
            self._send(conn, head + body[:cut])
            time.sleep(0.2)  # let the client read what was sent: an RST drops what it has not read yet
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        elif fault.kind == "truncate":
            self._send(conn, head + body[:cut])
            conn.shutdown(socket.SHUT_WR)
        elif fault.kind == "stall":
            self._send(conn, head + body[:cut])
            self._stop.wait(60)
        elif fault.kind == "slow":
            self._send(conn, head)
            step = max(1, int(fault.rate / 10))
            for i in range(0, len(body), step):
                self._send(conn, body[i:i + step])
                time.sleep(0.1)
        elif fault.kind == "longer":
            self._send(conn, head + body + os.urandom(max(1024, len(body))))
        elif fault.kind == "endless":
            status = head.split(b"\r\n", 1)[0]
            self._send(conn, status + b"\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n" + body)
            junk = os.urandom(1 << 16)
            for _ in range(4096):  # 256 MB at most
                self._send(conn, junk)
        else:
            raise ValueError(f"unknown fault {fault.kind!r}")
