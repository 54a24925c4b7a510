"""Tiny scripted HTTP servers for tests of what a real registry cannot produce.

Each `FakeServer` listens on 127.0.0.1 (an ephemeral port) in a thread. A test installs
handlers per method and path (a regular expression matched against the whole path); a
handler gets a `Request` and returns a `Reply`, or writes the answer itself through the
request's raw helpers (to stall, drop the connection, send chunked or short bodies) and
returns None. Every request is recorded in `server.requests`.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

# How long a stalling handler waits at most (the server's teardown releases it sooner).
MAX_HANG = 15.0


@dataclass
class Reply:
    """An answer: `body` may be bytes, str, or a JSON-able object (sent as JSON)."""

    status: int = 200
    body: Any = b""
    headers: dict[str, str] = field(default_factory=dict)

    def encoded(self) -> tuple[bytes, dict[str, str]]:
        headers = dict(self.headers)
        body = self.body
        if body is None:
            body = b""
        elif isinstance(body, str):
            body = body.encode()
        elif not isinstance(body, (bytes, bytearray)):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        return bytes(body), headers


def error_reply(status: int, code: str, message: str = "", headers: dict[str, str] | None = None) -> Reply:
    """A distribution-style `{"errors": [...]}` answer."""
    return Reply(status, {"errors": [{"code": code, "message": message, "detail": None}]}, headers or {})


@dataclass
class Request:
    method: str
    target: str  # the request target as sent: path and query
    path: str
    raw_query: str
    query: dict[str, list[str]]
    headers: Message
    body: bytes
    time: float  # time.monotonic() when the request (headers and body) had arrived
    handler: BaseHTTPRequestHandler = field(repr=False)
    server: FakeServer = field(repr=False)

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    # ---- raw answers (the handler then returns None) ---------------------------------------

    def send_head(self, status: int, headers: dict[str, str]) -> None:
        """Status line and headers only, flushed."""
        h = self.handler
        h.send_response_only(status)
        for name, value in headers.items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.flush()

    def write(self, data: bytes) -> None:
        self.handler.wfile.write(data)
        self.handler.wfile.flush()

    def write_chunk(self, data: bytes) -> None:
        """One chunk of a `Transfer-Encoding: chunked` body."""
        self.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunks(self) -> None:
        self.write(b"0\r\n\r\n")

    def hang(self, seconds: float = MAX_HANG) -> None:
        """Stall until the server is shut down (or `seconds` pass); the connection then closes."""
        self.server.stopping.wait(seconds)
        self.drop()

    def drop(self) -> None:
        """Close the connection without (more of) an answer."""
        self.handler.close_connection = True
        try:
            self.handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


Handler = Callable[[Request], "Reply | None"]


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1, silent, with a request-body reader that understands chunked bodies: the base
    of the test servers' handlers (this one, and the fault proxy's)."""

    protocol_version = "HTTP/1.1"
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



class _RequestHandler(QuietHandler):
    server: _HTTPServer

    def _dispatch(self) -> None:
        fake = self.server.fake
        body = self._read_body()
        parts = urlsplit(self.path)
        request = Request(
            method=self.command,
            target=self.path,
            path=parts.path,
            raw_query=parts.query,
            query=parse_qs(parts.query, keep_blank_values=True),
            headers=self.headers,
            body=body,
            time=time.monotonic(),
            handler=self,
            server=fake,
        )
        fake._record(request)
        handler = fake._find(self.command, parts.path)
        try:
            reply = handler(request) if handler else error_reply(404, "NOT_FOUND", "no route")
            if reply is not None:
                data, headers = reply.encoded()
                self.send_response_only(reply.status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                self.wfile.flush()
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug in the test's handler: surfaced at teardown
            fake.errors.append(exc)
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up (as the client under test does on purpose) are not errors.
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            self.fake.errors.append(error)  # type: ignore[arg-type]


class FakeServer:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self._lock = threading.Lock()
        self._httpd = _HTTPServer(("127.0.0.1", 0), _RequestHandler)
        self._httpd.fake = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def route(self, method: str, path: str, handler: Handler | Reply) -> None:
        """Answer `method` (or "*") on paths matching `path` (a whole-path regex).
        The first matching route wins."""
        if isinstance(handler, Reply):
            fixed = handler
            handler = lambda request: fixed  # noqa: E731
        self._routes.append((method.upper(), re.compile(path), handler))

    def _find(self, method: str, path: str) -> Handler | None:
        for route_method, pattern, handler in self._routes:
            if route_method in ("*", method) and pattern.fullmatch(path):
                return handler
        return None

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def seen(self, method: str | None = None, path: str | None = None) -> list[Request]:
        """Recorded requests, optionally only those of `method` on paths matching `path`."""
        with self._lock:
            found = list(self.requests)
        return [
            r for r in found
            if (method is None or r.method == method.upper())
            and (path is None or re.fullmatch(path, r.path))
        ]

    def close(self) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def sequence(*replies: Reply | Handler) -> Handler:
    """A handler answering with each of `replies` in turn, then repeating the last one."""
    items = list(replies)
    lock = threading.Lock()
    state = {"n": 0}

    def handler(request: Request) -> Reply | None:
        with lock:
            index = min(state["n"], len(items) - 1)
            state["n"] += 1
        item = items[index]
        return item(request) if callable(item) else item

    return handler


def silent_listener() -> tuple[socket.socket, int]:
    """A socket that listens (the kernel completes handshakes) but never accepts or answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock, int(sock.getsockname()[1])


def closed_port() -> int:
    """A port nothing listens on (bound then released): connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def all_headers(requests: Iterable[Request], name: str) -> list[str | None]:
    return [r.header(name) for r in requests]
