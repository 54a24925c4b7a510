"""HTTP for the registry client: one session, timeouts on every request, bounded retries,
redirects that never carry credentials to another origin, and `check()`, the one place
that turns an error response into a typed error.
"""

from __future__ import annotations

import email.utils
import io
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from .. import __version__, deadline
from ..errors import (
    ConnectTimeout,
    Denied,
    ErrorDetail,
    ListingTruncated,
    NetworkError,
    NotFound,
    RegistryError,
    RequestTimeout,
    ServerError,
    TLSError,
    TooManyRequests,
    Unauthorized,
    Unsupported,
)
from .auth import Authenticator

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
# Rate-limit headers kept for `ocifs status` (Docker Hub sends them on manifest GET and HEAD).
RATE_LIMIT_HEADERS = ("ratelimit-limit", "ratelimit-remaining", "docker-ratelimit-source")
# Error bodies are read up to this size to find the `errors` JSON; the rest is ignored.
MAX_ERROR_BODY = 64 * 1024
# The first read of a body (see iter_body): small, for the time to the first byte.
FIRST_PIECE = 128 * 1024
# A refused connection costs nothing to retry, and the registry may be back a moment later:
# it holds nothing. A host that lets connections time out is different: every request would
# wait the whole connect timeout, so while it is suspect, one request at a time probes it and
# the others fail at once (half-open); the first answer clears it.

Body = bytes | IO[bytes] | None


@dataclass(frozen=True, kw_only=True)
class TransportOptions:
    """Network settings. Every request has both timeouts; retries cover connection errors,
    5xx and 429 (honouring Retry-After up to `max_retry_wait`)."""

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 3
    backoff: float = 0.5
    max_retry_wait: float = 30.0
    verify_tls: bool = True
    ca_file: str | None = None
    user_agent: str = f"ocifs/{__version__}"


class Transport:
    """Sends requests for one registry. Thread-safe: each thread has its own session, and all
    sessions share one connection pool, so a connection opened by one thread (a round trip,
    and a TLS handshake) serves the next request of any thread."""

    def __init__(self, options: TransportOptions, auth: Authenticator | None = None) -> None:
        self.options = options
        self.auth = auth
        self._local = threading.local()
        self._suspect: dict[str, str] = {}  # origin -> why: connections to it timed out
        self._probing: set[str] = set()  # suspect origins a request is probing now
        self._mutex = threading.Lock()
        self._rate_limit: dict[str, Any] = {}  # the last rate-limit headers seen (`ocifs status`)
        # urllib3's pools are thread-safe; the sessions around them (cookies, state) are not.
        self._adapter = requests.adapters.HTTPAdapter(pool_connections=8, pool_maxsize=32)
        if not options.verify_tls:
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

    @property
    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # no .netrc credentials, no proxies from the environment
            session.headers["User-Agent"] = self.options.user_agent
            session.verify = self.options.ca_file or self.options.verify_tls
            session.mount("https://", self._adapter)
            session.mount("http://", self._adapter)
            self._local.session = session
        return session

    def request(
        self,
        method: str,
        url: str,
        *,
        scopes: Sequence[str] = (),
        headers: dict[str, str] | None = None,
        body: Body = None,
        form: dict[str, str] | None = None,
        stream: bool = False,
        retry: bool = True,
        authenticate: bool = True,
    ) -> requests.Response:
        """Send with authorization, a single re-authentication after 401, and retries.

        The response is returned whatever its status: callers pass it to `check()`.
        `body` must be bytes or a seekable file (it is rewound for each attempt). Token
        requests come through here too, with `authenticate=False` and a `form` for POSTs.
        """
        auth = self.auth if authenticate else None
        # A token request is part of the request that needed it: never held back by a probe
        # (that request may be the probe itself).
        probe = self._admit(url) if authenticate else False
        try:
            return self._request(method, url, auth, scopes, headers, body, form, stream, retry)
        finally:
            if probe:
                with self._mutex:
                    self._probing.discard(_origin(url))

    def _request(self, method: str, url: str, auth: Authenticator | None, scopes: Sequence[str],
                 headers: dict[str, str] | None, body: Body, form: dict[str, str] | None,
                 stream: bool, retry: bool) -> requests.Response:
        start = body.tell() if body is not None and not isinstance(body, bytes) else 0
        attempt = 0
        reauthenticated = False
        while True:
            deadline.check(f"{method} {_loggable(url)}")
            request_headers = dict(headers or {})
            if auth is not None:
                authorization = auth.authorization(url, scopes, self._send_for_token)
                if authorization:
                    request_headers["Authorization"] = authorization
            if body is not None and not isinstance(body, bytes):
                body.seek(start)
            connect_timeout = deadline.clamp(self.options.connect_timeout)
            try:
                response = self._send(method, url, request_headers, body, stream, form=form,
                                      connect_timeout=connect_timeout)
            except NetworkError as exc:
                if isinstance(exc, ConnectTimeout) and connect_timeout >= self.options.connect_timeout:
                    # The whole connect timeout passed (not one cut short by a deadline).
                    self._suspect_origin(url, str(exc))
                wait = self._backoff(attempt + 1)
                if "refused" in str(exc).lower():
                    wait = min(wait, 0.2 * 2 ** attempt)  # nobody listens: ask again soon
                if not retry or attempt >= self.options.retries or isinstance(exc, ConnectTimeout) \
                        or not self._time_for(wait):
                    raise
                attempt += 1
                self._sleep(wait, url)
                continue
            self._clear_suspect(url)
            if response.status_code == 401 and auth is not None and not reauthenticated:
                reauthenticated = True
                if auth.handle_challenge(url, response, scopes, self._send_for_token):
                    response.close()
                    continue
                return response  # still readable: check() reports its errors[]
            if response.status_code in RETRY_STATUSES and retry and attempt < self.options.retries:
                asked = _retry_after(response)
                wait = self._backoff(attempt + 1) if asked is None else asked
                if wait <= self.options.max_retry_wait and self._time_for(wait):
                    attempt += 1
                    response.close()
                    log.info("%s %s: HTTP %d, retrying in %.1fs", method, _loggable(url),
                             response.status_code, wait)
                    self._sleep(wait, url)
                    continue
            return response

    def _admit(self, url: str) -> bool:
        """Let a request through; True when it is the one probing a suspect origin. While
        another request probes it, fail at once (ETIMEDOUT) instead of waiting as long."""
        origin = _origin(url)
        with self._mutex:
            why = self._suspect.get(origin)
            if why is None:
                return False
            if origin in self._probing:
                raise RequestTimeout(f"{why} (waiting for it to answer again)")
            self._probing.add(origin)
            return True

    def _suspect_origin(self, url: str, why: str) -> None:
        with self._mutex:
            self._suspect[_origin(url)] = why

    def _clear_suspect(self, url: str) -> None:
        origin = _origin(url)
        if origin in self._suspect:
            with self._mutex:
                if self._suspect.pop(origin, None) is not None:
                    log.warning("%s answers again", origin)

    @staticmethod
    def _time_for(wait: float) -> bool:
        """Whether a retry after `wait` seconds still fits before the deadline."""
        left = deadline.remaining()
        return left is None or left > wait + 0.2

    def _send_for_token(
        self, method: str, url: str, headers: dict[str, str], form: dict[str, str] | None
    ) -> requests.Response:
        """Token requests: same timeouts and retries, never the registry's authorization."""
        return self.request(method, url, headers=headers, form=form, authenticate=False)

    def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: Body,
        stream: bool,
        *,
        form: dict[str, str] | None = None,
        connect_timeout: float,
    ) -> requests.Response:
        """One request, following redirects for GET and HEAD by hand: Authorization is
        dropped as soon as a redirect leaves the original origin. The body is always read
        as a stream: one that is not asked for as a stream is read here, cut at the deadline
        like any other (a JSON answer must not trickle past it either)."""
        origin = _origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = self.session.request(
                    method,
                    url,
                    headers=headers,
                    data=body if form is None else form,
                    stream=True,
                    timeout=(connect_timeout, deadline.clamp(self.options.read_timeout)),
                    allow_redirects=False,
                )
            except requests.exceptions.SSLError as exc:
                reason = _reason(exc)
                certificate = any(word in reason.lower() for word in ("certificate", "hostname", "verify"))
                what = "certificate verification failed" if certificate else "TLS handshake failed"
                raise TLSError(f"{urlsplit(url).netloc}: {what} (see --ca-file, --insecure): {reason}",
                               certificate=certificate) from None
            except requests.exceptions.ConnectTimeout:
                raise ConnectTimeout(f"cannot reach {urlsplit(url).netloc}: connection timed out") from None
            except requests.exceptions.Timeout:
                raise RequestTimeout(f"{method} {_loggable(url)}: timed out") from None
            except (requests.exceptions.ConnectionError, urllib3.exceptions.HTTPError) as exc:
                raise NetworkError(
                    f"cannot reach {urlsplit(url).netloc}: {_reason(exc)}"
                ) from None
            except requests.exceptions.RequestException as exc:
                # A body cut off mid-chunk, a redirect to a URL that is not one: the exchange
                # failed, like a dropped connection (requests' own errors have no errno).
                raise NetworkError(f"{method} {_loggable(url)}: {_reason(exc)}") from None
            log.debug("%s %s -> %d", method, _loggable(url), response.status_code)
            _warn(response)
            self._note_rate_limit(response)
            if response.status_code not in REDIRECT_STATUSES or method not in ("GET", "HEAD"):
                return response if stream else _preload(response)
            location = response.headers.get("Location")
            if not location:
                return response if stream else _preload(response)
            response.close()
            url = urljoin(url, location)
            if _origin(url) != origin:
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        raise RegistryError(f"{method} {_loggable(url)}: too many redirects")

    def _note_rate_limit(self, response: requests.Response) -> None:
        """Keep the registry's rate-limit headers (Docker Hub: `ratelimit-limit: 100;w=21600`,
        `ratelimit-remaining`, `docker-ratelimit-source`), every response passing here."""
        seen: dict[str, Any] = {name: response.headers[name] for name in RATE_LIMIT_HEADERS if name in response.headers}
        if seen:
            seen["seen_at"] = time.time()
            with self._mutex:
                self._rate_limit = seen

    def rate_limit(self) -> dict[str, Any]:
        """The rate-limit headers of the last response that had any ({} if none did)."""
        with self._mutex:
            return dict(self._rate_limit)

    def _backoff(self, attempt: int) -> float:
        return float(self.options.backoff * (2.0 ** (attempt - 1)) * (0.5 + random.random()))

    @staticmethod
    def _sleep(seconds: float, url: str) -> None:
        time.sleep(max(0.0, seconds))


# Answers that are not streamed (JSON, errors) are read whole, up to this size.
MAX_PRELOAD = 64 * 1024 * 1024
# Pages followed at most by `follow_pages` (a loop guard, far above real sizes), and the time
# a page is given at least: with less left before the deadline, the listing stops there.
MAX_PAGES = 100_000
PAGE_RESERVE = 0.5

Page = tuple[list[str], str | None]  # (items, next URL as given, maybe relative)


def follow_pages(url: str, page: Callable[[str], Page], what: str) -> Iterator[str]:
    """Every item of a paged listing: `page(url)` fetches one page. A next page is followed
    when it is on the same origin and not seen before (relative links resolved). A listing
    has a budget: MAX_PAGES pages, and the thread's deadline (a catalog may be endless);
    past it, ListingTruncated is raised after the items found so far."""
    start = origin(url)
    seen: set[str] = set()
    for number in range(MAX_PAGES):
        seen.add(url)
        left = deadline.remaining()
        if number and left is not None and left < PAGE_RESERVE:
            raise ListingTruncated(f"{what}: stopped after {number} pages (time budget)")
        try:
            items, next_url = page(url)
        except RequestTimeout as exc:
            if number and deadline.remaining() is not None:
                raise ListingTruncated(f"{what}: stopped after {number} pages ({exc})") from None
            raise
        yield from items
        if not next_url:
            return
        next_url = urljoin(url, next_url)
        if origin(next_url) != start:
            log.warning("%s: ignoring a next page on another origin: %s", what, origin(next_url))
            return
        if next_url in seen:
            log.warning("%s: the next page loops back; stopping", what)
            return
        url = next_url
    raise ListingTruncated(f"{what}: stopped after {MAX_PAGES} pages")


def json_object(response: requests.Response, what: str) -> dict[str, Any]:
    """The body as a JSON object, or RegistryError."""
    try:
        data = response.json()
    except ValueError:
        raise RegistryError(f"{what}: the answer is not valid JSON") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{what}: the answer is not a JSON object")
    return data


def _preload(response: requests.Response) -> requests.Response:
    """Read the whole body now (at most MAX_PRELOAD bytes), cut at the deadline; the
    response then behaves as a non-streamed one."""
    chunks: list[bytes] = []
    size = 0
    for chunk in iter_body(response, 64 * 1024, close=False):
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_PRELOAD:
            response.close()
            raise RegistryError(f"{_loggable(response.url)}: an answer above {MAX_PRELOAD} bytes")
    response._content = b"".join(chunks)
    response._content_consumed = True  # type: ignore[attr-defined]
    return response


def iter_body(response: requests.Response, chunk_size: int = 1 << 20, *, close: bool = True) -> Iterator[bytes]:
    """The response body in chunks of up to `chunk_size`; a connection that drops or stalls
    mid-body raises NetworkError / RequestTimeout rather than requests' own exceptions. In a
    thread with a deadline the body is cut at the deadline: a server that trickles cannot
    stretch it.

    The first chunk is small (FIRST_PIECE) and the size doubles from there: a read blocks until
    its whole size arrived, so a reader waiting for the first bytes of a blob gets them after
    128 KiB, not after a MiB, while the rest still moves in big reads."""
    at = deadline.at()
    cutter = None
    if at is not None:
        cutter = threading.Timer(max(0.0, at - time.monotonic()), _cut, (response,))
        cutter.daemon = True
        cutter.start()
    late = RequestTimeout(f"{_loggable(response.url)}: timed out reading the body")
    whole = False
    try:
        for chunk in _growing_pieces(response, chunk_size):
            if at is not None and time.monotonic() >= at:
                raise late
            yield chunk
        whole = True
    except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.HTTPError, OSError) as exc:
        if at is not None and time.monotonic() >= at:
            raise late from None
        if "timed out" in str(exc).lower() or "timeout" in type(exc).__name__.lower():
            raise late from None
        raise NetworkError(f"{_loggable(response.url)}: connection lost: {_reason(exc)}") from None
    except requests.exceptions.Timeout:
        raise late from None
    finally:
        if cutter is not None:
            cutter.cancel()
        if close or not whole:
            response.close()


def _growing_pieces(response: requests.Response, largest: int) -> Iterator[bytes]:
    raw = response.raw
    if getattr(response, "_content_consumed", False) or not hasattr(raw, "stream"):
        yield from response.iter_content(largest)  # preloaded, or not a urllib3 body
        return
    size = min(largest, FIRST_PIECE)
    while True:
        piece = raw.read(size, decode_content=True)
        if not piece:
            response._content_consumed = True  # type: ignore[attr-defined]
            return
        yield piece
        size = min(largest, size * 2)


def _cut(response: requests.Response) -> None:
    """The deadline passed while a body was being read: shut the connection down, which
    wakes the reader blocked in recv()."""
    connection = getattr(response.raw, "connection", None)
    sock = getattr(connection, "sock", None)
    try:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def read_body(response: requests.Response, limit: int) -> bytes:
    """The whole body, refusing more than `limit` bytes (checked as it arrives)."""
    buffer = io.BytesIO()
    for chunk in iter_body(response, 64 * 1024):
        buffer.write(chunk)
        if buffer.tell() > limit:
            response.close()
            raise _TooLarge(limit)
    return buffer.getvalue()


class _TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


def check(response: requests.Response, what: str, *, ok: Iterable[int] = (200,)) -> requests.Response:
    """Return `response` if its status is in `ok`, else raise the typed error for it.

    `what` says what was asked ("manifest foo:1.0") for the message.
    """
    status = response.status_code
    if status in set(ok):
        return response
    details = _error_details(response)
    first = details[0] if details else None
    reason = f"{first.code}: {first.message}" if first and first.message else (
        first.code if first else f"HTTP {status}"
    )
    message = f"{what}: {reason}"
    codes = {d.code for d in details}
    cls: type[RegistryError]
    if status == 404 or codes & {"NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN"}:
        cls = NotFound
    elif status == 401:
        cls = Unauthorized
    elif status == 403 or "DENIED" in codes:
        cls = Denied
    elif status == 405 or "UNSUPPORTED" in codes:
        cls = Unsupported
    elif status == 429 or "TOOMANYREQUESTS" in codes:
        cls = TooManyRequests
    elif status >= 500:
        cls = ServerError
    else:
        cls = RegistryError
    raise cls(message, status=status, details=details)


def _error_details(response: requests.Response) -> tuple[ErrorDetail, ...]:
    try:
        raw = read_body(response, MAX_ERROR_BODY) if response.request.method != "HEAD" else b""
    except (_TooLarge, NetworkError):
        return ()
    try:
        data: Any = json.loads(raw) if raw else None
    except ValueError:
        return ()
    if not isinstance(data, dict) or not isinstance(data.get("errors"), list):
        return ()
    details = []
    for item in data["errors"]:
        if isinstance(item, dict) and isinstance(item.get("code"), str):
            message = item.get("message")
            details.append(ErrorDetail(item["code"], message if isinstance(message, str) else ""))
    return tuple(details)


def _retry_after(response: requests.Response) -> float | None:
    """Seconds from `Retry-After` (delta or HTTP date) or Docker Hub's `X-Retry-After` (unix time)."""
    value = response.headers.get("Retry-After")
    if value:
        value = value.strip()
        if value.isdigit():
            return float(value)
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())
    value = response.headers.get("X-Retry-After")
    if value and value.strip().isdigit():
        return max(0.0, float(value) - time.time())
    return None


def _warn(response: requests.Response) -> None:
    # `Warning: 299 - "text"` is for the user; it never changes what we do.
    for value in response.raw.headers.getlist("Warning") if response.raw is not None and hasattr(
        response.raw.headers, "getlist") else []:
        if value.startswith("299"):
            log.warning("registry warning: %s", value[3:].strip().lstrip("- ").strip('"'))


def origin(url: str) -> str:
    """`scheme://host[:port]` of a URL: what credentials and redirects are judged by."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


_origin = origin


def _loggable(url: str) -> str:
    """The URL without its query: upload locations carry state, token URLs carry scopes."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _reason(exc: BaseException) -> str:
    # requests wraps urllib3 errors in layers; the innermost reason is the useful one.
    text = str(exc)
    for marker in ("Caused by ", "] "):
        if marker in text:
            text = text.rsplit(marker, 1)[-1]
    return text.strip("()'\" ")[:200]
