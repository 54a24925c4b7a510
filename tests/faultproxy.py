"""A forwarding HTTP proxy in front of a real registry, with faults on demand.

`FaultProxy(upstream)` listens on 127.0.0.1 (an ephemeral port) in a thread and forwards
every request to `upstream` ("127.0.0.1:<port>") unchanged: method, path and query,
headers (Host included, so the URLs the registry builds point back at the proxy) and
body; the answer's status, headers and body come back as they are (bodies are streamed,
with the upstream's Content-Length; HEAD answers keep it too).

Faults, each for `method` (or "*") on paths matching `path_regex` (whole path), optionally
only for requests whose headers satisfy `when(headers)`, and for the first `times`
matching requests (None: until `heal()`):

- `fail(method, path_regex, status)`: answer `status` with a distribution-style error body
  instead, without reaching the registry;
- `stall(...)`: never answer (the connection is held open) until `heal()` or `close()`;
- `drip(..., piece=, interval=)`: forward, then send the body `piece` bytes every `interval`
  seconds (a trickling server);
- `drop(..., after=, before=)`: forward, send the status, the headers and the first `after`
  bytes of the body, call `before()` (a test's gate: it may block to time the drop), then
  close the connection;
- `lie(..., offset=, length=)`: forward with other bytes at blob offsets [offset,
  offset+length) (placed by `Content-Range` for 206 answers), headers unchanged: a server
  whose `Content-Range` is right and whose bytes are not.

Subclasses may answer some requests themselves (`local_answer`) and add headers to
forwarded answers (`forwarded`): referrersproxy.py adds the OCI 1.1 referrers API that way.

`heal()` ends every fault (stalled and dripping requests are released by closing their
connection). Every request is recorded in `seen` as (method, path, status answered; None
when stalled, dropped or cut off) once it ends, and in `arrived` as (method, path, headers)
as soon as it arrives.

A registry across the internet, for benchmarks: `FaultProxy(upstream, latency=0.04,
rate=30 * 2**20)`, or `throttle(latency=, rate=)` at any time (0 or None: off). Each new
connection waits `latency` seconds before its first request is read (the TCP handshake),
each request waits `latency` after it arrived and before it is forwarded (one round trip),
and body bytes flow at most `rate` bytes/s per connection, both ways (a paced connection
gets no credit for the time it was idle). `bytes_sent(method, path_regex)` counts the
answer body bytes sent to clients so far, answers still streaming included; `connections`
counts the connections accepted.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from .fakeserver import QuietHandler

# Hop-by-hop headers (RFC 9110 7.6.1) are the proxy's own business; bodies are re-framed
# with Content-Length.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                         "trailer", "transfer-encoding", "upgrade", "content-length"})
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
# The longest a stall or a drip lasts when nobody heals or closes the proxy.
MAX_HOLD = 120.0
_PIECE = 64 * 1024
_OTHER = bytes(b ^ 0x5A for b in range(256))  # every byte changed


class _Pacer:
    """Spaces one connection's body bytes at a rate. A piece goes out at the start of its
    slot (the first byte is not held back) and the next waits for the slot's end; time spent
    idle gives no burst credit, as a congested link would not."""

    def __init__(self) -> None:
        self._due = 0.0

    def pace(self, count: int, rate: float | None) -> None:
        if not rate or count <= 0:
            return
        now = time.monotonic()
        if self._due > now:
            time.sleep(self._due - now)
            now = self._due
        self._due = now + count / rate


@dataclass
class _Fault:
    kind: str  # fail, stall, drip, drop, lie
    method: str
    pattern: re.Pattern[str]
    when: Callable[[Message], bool] | None = None
    times: int | None = None
    status: int = 0
    piece: int = 0
    interval: float = 0.0
    after: int = 0
    before: Callable[[], None] | None = None
    offset: int = 0
    length: int = 0

    def matches(self, method: str, path: str, headers: Message) -> bool:
        return (self.method in ("*", method) and self.pattern.fullmatch(path) is not None
                and (self.times is None or self.times > 0)
                and (self.when is None or bool(self.when(headers))))


class _Handler(QuietHandler):
    server: _Server
    # The head and the body go out in separate writes: with Nagle's algorithm the body waits
    # for the client's delayed ACK of the head (up to 40 ms per answer), a delay no registry adds.
    disable_nagle_algorithm = True
    _pacer: _Pacer
    _request: tuple[str, str] = ("", "")  # method and path of the request being answered

    def setup(self) -> None:
        super().setup()
        self._pacer = _Pacer()
        self.server.proxy._connected()
        latency = self.server.proxy.latency
        if latency:
            time.sleep(latency)  # a new connection costs a round trip (the handshake)

    def _write_body(self, data: bytes) -> None:
        self._pacer.pace(len(data), self.server.proxy.rate)
        self.wfile.write(data)
        self.server.proxy._count(self._request, len(data))

    def _read_request_body(self) -> bytes:
        """The request body; paced like answers when the proxy throttles."""
        rate = self.server.proxy.rate
        length = self.headers.get("Content-Length")
        if not rate or self.headers.get("Transfer-Encoding", "").lower() == "chunked" \
                or not (length and length.isdigit()):
            body = self._read_body()
            self._pacer.pace(len(body), rate)
            return body
        parts: list[bytes] = []
        left = int(length)
        while left > 0:
            part = self.rfile.read(min(_PIECE, left))
            if not part:
                break
            self._pacer.pace(len(part), rate)
            parts.append(part)
            left -= len(part)
        return b"".join(parts)

    def _head(self, status: int, headers: list[tuple[str, str]], length: int) -> None:
        self.send_response_only(status)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        for name, value in self.server.proxy.extra_headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.flush()

    def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self._head(status, headers, len(body))
        if self.command != "HEAD":
            self._write_body(body)
        self.wfile.flush()

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _forward(self) -> None:
        proxy = self.server.proxy
        body = self._read_request_body()
        path = urlsplit(self.path).path
        self._request = (self.command, path)
        proxy._arrive(self.command, path, self.headers)
        if proxy.latency:
            time.sleep(proxy.latency)  # the round trip of this request and its answer
        fault = proxy._fault_for(self.command, path, self.headers)
        status: int | None = None
        try:
            if fault is not None and fault.kind == "fail":
                error = {"errors": [{"code": "UNKNOWN", "message": "injected by the test's proxy",
                                     "detail": None}]}
                status = fault.status
                self._answer(status, [("Content-Type", "application/json")], json.dumps(error).encode())
            elif fault is not None and fault.kind == "stall":
                proxy._released().wait(MAX_HOLD)
                self._drop()
            elif (local := proxy.local_answer(self.command, self.path, self.headers)) is not None:
                status = local[0]
                self._answer(*local)
            else:
                status = self._relay(proxy, body, fault)
        except (TimeoutError, BrokenPipeError, ConnectionResetError, OSError):
            status = None
            self.close_connection = True
        proxy._record(self.command, path, status)

    def _relay(self, proxy: FaultProxy, body: bytes, fault: _Fault | None) -> int | None:
        """Forward upstream and stream the answer back, with `fault` (drip, drop, lie) applied.
        The status answered, or None when the body was cut off on purpose."""
        upstream = http.client.HTTPConnection(proxy.upstream, timeout=30)
        try:
            headers: dict[str, str] = {}
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    # A repeated header (Go's client sends one Accept line per media type) is
                    # one comma-separated list (RFC 9110 5.3), not the last of its lines.
                    headers[name] = f"{headers[name]}, {value}" if name in headers else value
            upstream.request(self.command, self.path, body=body if body or self.command in
                             ("POST", "PUT", "PATCH") else None, headers=headers)
            response = upstream.getresponse()
            answer_headers = response.getheaders() + proxy.forwarded(
                self.command, urlsplit(self.path).path, body, response.status)
            length_text = response.getheader("Content-Length")
            if self.command == "HEAD" or response.status in (204, 304):
                self._head(response.status, answer_headers,
                           int(length_text) if length_text and length_text.isdigit() else 0)
                return response.status
            if length_text is None or not length_text.isdigit():
                data = response.read()  # chunked or close-delimited upstream: re-framed
                length = len(data)
                pieces: Any = iter([data])
            else:
                length = int(length_text)
                pieces = iter(lambda: response.read(_PIECE), b"")
            start = 0
            match = _CONTENT_RANGE.fullmatch((response.getheader("Content-Range") or "").strip())
            if response.status == 206 and match:
                start = int(match.group(1))
            self._head(response.status, answer_headers, length)
            released = proxy._released()
            sent = 0
            pending = b""
            while True:
                if fault is not None and fault.kind == "drip":
                    while len(pending) < fault.piece:
                        more = next(pieces, b"")
                        if not more:
                            break
                        pending += more
                    data, pending = pending[:fault.piece], pending[fault.piece:]
                else:
                    data = next(pieces, b"")
                if not data:
                    break
                if fault is not None and fault.kind == "lie":
                    data = _lie(data, start + sent, fault.offset, fault.length)
                if fault is not None and fault.kind == "drop" and sent + len(data) >= fault.after:
                    self._write_body(data[:fault.after - sent])
                    self.wfile.flush()
                    if fault.before is not None:
                        fault.before()
                    self._drop()
                    return None
                self._write_body(data)
                self.wfile.flush()
                sent += len(data)
                if fault is not None and fault.kind == "drip" and released.wait(fault.interval):
                    self._drop()  # healed or closed: the trickle ends
                    return None
            return response.status
        finally:
            upstream.close()

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward


def _lie(data: bytes, at: int, offset: int, length: int) -> bytes:
    """`data` (the blob's bytes from offset `at`) with [offset, offset+length) replaced by other bytes."""
    a, b = max(at, offset), min(at + len(data), offset + length)
    if a >= b:
        return data
    return data[:a - at] + data[a - at:b - at].translate(_OTHER) + data[b - at:]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # A client opening many connections at once (parallel streams, a walk) must not overflow
    # the listen backlog: a dropped SYN is retried a second later, a delay no registry adds.
    request_queue_size = 128
    proxy: FaultProxy


class FaultProxy:
    def __init__(self, upstream: str, *, latency: float = 0.0, rate: float | None = None) -> None:
        self.upstream = upstream
        self.latency = latency  # seconds added per request and per new connection
        self.rate = rate  # body bytes per second per connection; None: unlimited
        self.seen: list[tuple[str, str, int | None]] = []
        self.extra_headers: list[tuple[str, str]] = []  # added to every answer (rate-limit headers, ...)
        self.connections = 0
        self._sent: Counter[tuple[str, str]] = Counter()  # answer body bytes by (method, path)
        self.arrived: list[tuple[str, str, Message]] = []
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.proxy = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01},
                                        daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._httpd.server_address[1]}"

    # ---- faults ----------------------------------------------------------------------------

    def _add(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def fail(self, method: str, path_regex: str, status: int) -> None:
        """Answer `status` to `method` (or "*") on paths matching `path_regex` (whole path)
        until `heal()`."""
        self._add(_Fault("fail", method.upper(), re.compile(path_regex), status=status))

    def stall(self, method: str, path_regex: str, *, when: Callable[[Message], bool] | None = None,
              times: int | None = None) -> None:
        """Never answer matching requests (the connection stays open) until `heal()`/`close()`."""
        self._add(_Fault("stall", method.upper(), re.compile(path_regex), when, times))

    def drip(self, method: str, path_regex: str, *, piece: int, interval: float,
             when: Callable[[Message], bool] | None = None, times: int | None = None) -> None:
        """Forward, then send the body `piece` bytes at a time, one piece every `interval` s."""
        self._add(_Fault("drip", method.upper(), re.compile(path_regex), when, times,
                         piece=piece, interval=interval))

    def drop(self, method: str, path_regex: str, *, after: int = 0, times: int | None = 1,
             when: Callable[[Message], bool] | None = None, before: Callable[[], None] | None = None) -> None:
        """Forward, send the head and the first `after` body bytes, call `before()`, then close
        the connection (once by default)."""
        self._add(_Fault("drop", method.upper(), re.compile(path_regex), when, times,
                         after=after, before=before))

    def lie(self, method: str, path_regex: str, *, offset: int, length: int,
            when: Callable[[Message], bool] | None = None, times: int | None = None) -> None:
        """Forward with other bytes at blob offsets [offset, offset+length); headers (Content-Range,
        Content-Length) as the registry sent them."""
        self._add(_Fault("lie", method.upper(), re.compile(path_regex), when, times,
                         offset=offset, length=length))

    def throttle(self, *, latency: float = 0.0, rate: float | None = None) -> None:
        """Stand for a registry across the internet: `latency` seconds per request (and per
        new connection), body bytes at most `rate` bytes/s per connection. 0/None: off."""
        self.latency = latency
        self.rate = rate

    def heal(self) -> None:
        """Forward everything again; stalled and dripping requests are cut off."""
        with self._lock:
            self._faults.clear()
            release, self._release = self._release, threading.Event()
        release.set()

    # ---- for subclasses: API the real registry lacks (referrersproxy.py) ---------------------

    def local_answer(self, method: str, target: str, headers: Message
                     ) -> tuple[int, list[tuple[str, str]], bytes] | None:
        """(status, headers, body) answered by the proxy itself instead of forwarding
        `target` (path and query); None forwards it. Faults come first."""
        return None

    def forwarded(self, method: str, path: str, body: bytes, status: int) -> list[tuple[str, str]]:
        """Called when the registry has answered a forwarded request (`body`: the request's);
        returns headers to add to that answer."""
        return []

    # ---- what was seen ---------------------------------------------------------------------

    def requests(self, method: str, path_regex: str) -> list[int | None]:
        """The statuses answered to `method` on paths matching `path_regex`, in order."""
        pattern = re.compile(path_regex)
        with self._lock:
            return [status for m, path, status in self.seen if m == method.upper() and pattern.fullmatch(path)]

    def arrivals(self, method: str, path_regex: str) -> list[Message]:
        """The headers of requests for `method` on paths matching `path_regex` that arrived so
        far (answered or not), in order."""
        pattern = re.compile(path_regex)
        with self._lock:
            return [headers for m, path, headers in self.arrived
                    if m == method.upper() and pattern.fullmatch(path)]

    def bytes_sent(self, method: str = "*", path_regex: str = ".*") -> int:
        """Answer body bytes sent so far to `method` (or "*") requests on paths matching
        `path_regex` (bytes of answers still streaming included)."""
        pattern = re.compile(path_regex)
        wanted = method.upper()
        with self._lock:
            return sum(count for (m, path), count in self._sent.items()
                       if wanted in ("*", m) and pattern.fullmatch(path))

    def wait_for(self, method: str, path_regex: str, count: int = 1, timeout: float = 10.0) -> bool:
        """Poll until `count` such requests arrived, or `timeout` seconds passed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.arrivals(method, path_regex)) >= count:
                return True
            time.sleep(0.01)
        return len(self.arrivals(method, path_regex)) >= count

    def _fault_for(self, method: str, path: str, headers: Message) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path, headers):
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None

    def _released(self) -> threading.Event:
        with self._lock:
            return self._release

    def _arrive(self, method: str, path: str, headers: Message) -> None:
        with self._lock:
            self.arrived.append((method, path, headers))

    def _record(self, method: str, path: str, status: int | None) -> None:
        with self._lock:
            self.seen.append((method, path, status))

    def _connected(self) -> None:
        with self._lock:
            self.connections += 1

    def _count(self, request: tuple[str, str], sent: int) -> None:
        with self._lock:
            self._sent[request] += sent

    def close(self) -> None:
        self._released().set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
