"""A forwarding HTTP proxy in front of a real registry, with faults on demand.

`FaultProxy(upstream)` listens on 127.0.0.1 (an ephemeral port) in a thread and forwards
every request to `upstream` ("127.0.0.1:<port>") unchanged: method, path and query,
headers (Host included, so the URLs the registry builds point back at the proxy) and
body; the answer's status, headers and body come back as they are. `fail(method,
path_regex, status)` makes matching requests answer `status` with a distribution-style
error body instead, without reaching the registry, until `heal()`. Every request is
recorded in `seen` as (method, path, status answered).
"""

from __future__ import annotations

import http.client
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

# Hop-by-hop headers (RFC 9110 7.6.1) are the proxy's own business; bodies are re-framed
# with Content-Length.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                         "trailer", "transfer-encoding", "upgrade", "content-length"})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 10  # idle keep-alive connections end by themselves

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = self.headers.get("Content-Length")
        return self.rfile.read(int(length)) if length and length.isdigit() else b""

    def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response_only(status)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _forward(self) -> None:
        proxy = self.server.proxy
        body = self._read_body()
        path = urlsplit(self.path).path
        status = proxy._fault_for(self.command, path)
        try:
            if status is not None:
                error = {"errors": [{"code": "UNKNOWN", "message": "injected by the test's proxy",
                                     "detail": None}]}
                self._answer(status, [("Content-Type", "application/json")], json.dumps(error).encode())
            else:
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=30)
                try:
                    headers = {name: value for name, value in self.headers.items()
                               if name.lower() not in _HOP_BY_HOP}
                    upstream.request(self.command, self.path, body=body if body or self.command in
                                     ("POST", "PUT", "PATCH") else None, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    status = response.status
                    self._answer(status, response.getheaders(), data)
                finally:
                    upstream.close()
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        proxy._record(self.command, path, status)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: FaultProxy


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.seen: list[tuple[str, str, int | None]] = []
        self._faults: list[tuple[str, re.Pattern[str], int]] = []
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.proxy = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01},
                                        daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._httpd.server_address[1]}"

    def fail(self, method: str, path_regex: str, status: int) -> None:
        """Answer `status` to `method` (or "*") on paths matching `path_regex` (whole path)
        until `heal()`."""
        with self._lock:
            self._faults.append((method.upper(), re.compile(path_regex), status))

    def heal(self) -> None:
        """Forward everything again."""
        with self._lock:
            self._faults.clear()

    def requests(self, method: str, path_regex: str) -> list[int | None]:
        """The statuses answered to `method` on paths matching `path_regex`, in order."""
        pattern = re.compile(path_regex)
        with self._lock:
            return [status for m, path, status in self.seen if m == method.upper() and pattern.fullmatch(path)]

    def _fault_for(self, method: str, path: str) -> int | None:
        with self._lock:
            for fault_method, pattern, status in self._faults:
                if fault_method in ("*", method) and pattern.fullmatch(path):
                    return status
        return None

    def _record(self, method: str, path: str, status: int | None) -> None:
        with self._lock:
            self.seen.append((method, path, status))

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
