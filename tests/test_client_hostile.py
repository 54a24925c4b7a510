"""The registry client against scripted HTTP servers: what a real registry cannot produce.

Token servers, cross-origin realms and redirects, 429/5xx, ranges that are ignored or wrong,
hangs, bad and oversize manifests, odd paging, chunked uploads that lose chunks, the Docker
Hub API, and names that must never reach the network. Each test starts its own servers
(tests/fakeserver.py) on 127.0.0.1 and asserts on what they received.
"""

from __future__ import annotations

import base64
import errno
import io
import os
import re
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from ocifs.digest import Digest
from ocifs.errors import (
    AuthError,
    Denied,
    IntegrityError,
    InvalidReference,
    ManifestError,
    ManifestTooLarge,
    NetworkError,
    NotFound,
    OcifsError,
    RangeError,
    RegistryError,
    RequestTimeout,
    ServerError,
    TooManyRequests,
    Unauthorized,
    Unsupported,
)
from ocifs.model import (
    EMPTY_DIGEST,
    MANIFEST_ACCEPT,
    MAX_MANIFEST_SIZE,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_MANIFEST,
    Index,
    Manifest,
    encode_json,
)
from ocifs.reference import Registry
from ocifs.registry import auth as auth_module
from ocifs.registry import client as client_module
from ocifs.registry.auth import Credentials
from ocifs.registry.client import ClientOptions, RegistryClient
from ocifs.registry.hub import HUB_PAGE_SIZE, HubClient
from ocifs.registry.transport import MAX_REDIRECTS, TransportOptions

from .fakeserver import (
    FakeServer,
    Reply,
    Request,
    closed_port,
    error_reply,
    sequence,
    silent_listener,
)

pytestmark = pytest.mark.timeout(60)

CREDS = Credentials("user", "pw")
BASIC = "Basic " + base64.b64encode(b"user:pw").decode()
REPO = "a/b"
PULL = "repository:a/b:pull"

MANIFEST = encode_json({
    "schemaVersion": 2,
    "mediaType": OCI_MANIFEST,
    "artifactType": "application/vnd.example.test",
    "config": {"mediaType": OCI_EMPTY, "digest": str(EMPTY_DIGEST), "size": 2},
    "layers": [{"mediaType": OCI_EMPTY, "digest": str(EMPTY_DIGEST), "size": 2}],
})
MANIFEST_DIGEST = Digest.of(MANIFEST)
OTHER = MANIFEST.replace(b"vnd.example.test", b"vnd.example.evil")
OTHER_DIGEST = Digest.of(OTHER)


# ---- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def srv(servers: Callable[[], FakeServer]) -> FakeServer:
    return servers()


def make_client(
    server: FakeServer | int,
    *,
    credentials: Credentials | None = None,
    page_size: int | None = None,
    **transport: float,
) -> RegistryClient:
    options = {"connect_timeout": 2.0, "read_timeout": 3.0, "retries": 0, "backoff": 0.01}
    options.update(transport)
    port = server if isinstance(server, int) else server.port
    return RegistryClient(
        Registry.parse(f"127.0.0.1:{port}"),
        ClientOptions(page_size=page_size, transport=TransportOptions(**options)),  # type: ignore[arg-type]
        credentials=lambda: credentials,
    )


def manifest_reply(raw: bytes = MANIFEST, digest: str | None = "auto",
                   content_type: str | None = OCI_MANIFEST) -> Reply:
    headers = {}
    if content_type:
        headers["Content-Type"] = content_type
    if digest == "auto":
        digest = str(Digest.of(raw))
    if digest:
        headers["Docker-Content-Digest"] = digest
    return Reply(200, raw, headers)


def serve_manifest(request: Request) -> Reply:
    return manifest_reply()


class BearerAuth:
    """A token service (on `token_server`, default the registry itself) and a gate that
    makes registry routes demand one of its tokens, as distribution's token auth does."""

    def __init__(
        self,
        registry: FakeServer,
        token_server: FakeServer | None = None,
        *,
        realm: str | None = None,
        expires_in: int | None = 60,
        password: str = "pw",
    ) -> None:
        self.registry = registry
        self.token_server = token_server or registry
        self.realm = realm or f"{self.token_server.origin}/token"
        self.expires_in = expires_in
        self.password = password
        self.issued: list[str] = []
        self.valid: set[str] = set()
        self._lock = threading.Lock()
        self.token_server.route("GET", "/token", self._token)

    def _token(self, request: Request) -> Reply:
        authorization = request.header("Authorization")
        if authorization is not None:
            expected = "Basic " + base64.b64encode(f"user:{self.password}".encode()).decode()
            if authorization != expected:
                return Reply(401, {"details": "incorrect username or password"})
        with self._lock:
            token = f"tok{len(self.issued) + 1}"
            self.issued.append(token)
            self.valid.add(token)
        body: dict[str, object] = {"token": token, "issued_at": "2024-01-01T00:00:00Z"}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return Reply(200, body)

    def revoke_all(self) -> None:
        with self._lock:
            self.valid.clear()

    def challenge(self, request: Request) -> Reply:
        match = re.match(r"/v2/(.+?)/(?:manifests|blobs|tags)/", request.path)
        scope = f',scope="repository:{match.group(1)}:pull"' if match else ""
        return error_reply(
            401, "UNAUTHORIZED", "authentication required",
            {"WWW-Authenticate": f'Bearer realm="{self.realm}",service="svc"{scope}'},
        )

    def gate(self, handler: Callable[[Request], Reply | None] | Reply) -> Callable[[Request], Reply | None]:
        def gated(request: Request) -> Reply | None:
            authorization = request.header("Authorization") or ""
            with self._lock:
                ok = authorization.startswith("Bearer ") and authorization[7:] in self.valid
            if not ok:
                return self.challenge(request)
            return handler(request) if callable(handler) else handler

        return gated


def basic_gate(handler: Callable[[Request], Reply | None]) -> Callable[[Request], Reply | None]:
    def gated(request: Request) -> Reply | None:
        if request.header("Authorization") != BASIC:
            return error_reply(401, "UNAUTHORIZED", "", {"WWW-Authenticate": 'Basic realm="Registry Realm"'})
        return handler(request)

    return gated


def authorizations(requests: list[Request]) -> list[str | None]:
    return [r.header("Authorization") for r in requests]


# ---- 1. Bearer and Basic authentication -------------------------------------------------------


def test_anonymous_bearer_token_request_carries_service_and_scope(srv: FakeServer) -> None:
    auth = BearerAuth(srv)
    srv.route("GET", "/v2/a/b/manifests/v1", auth.gate(serve_manifest))

    manifest = make_client(srv).get_manifest(REPO, "v1")

    assert isinstance(manifest, Manifest) and manifest.digest == MANIFEST_DIGEST
    token_requests = srv.seen("GET", "/token")
    assert len(token_requests) == 1
    assert token_requests[0].query == {"service": ["svc"], "scope": [PULL]}
    assert token_requests[0].header("Authorization") is None  # anonymous
    assert authorizations(srv.seen(path="/v2/a/b/manifests/v1")) == [None, "Bearer tok1"]
    # All four manifest media types are asked for.
    accept = srv.seen(path="/v2/a/b/manifests/v1")[-1].header("Accept") or ""
    assert [part.strip() for part in accept.split(",")] == list(MANIFEST_ACCEPT)


def test_bearer_token_request_with_credentials_uses_basic(srv: FakeServer) -> None:
    auth = BearerAuth(srv)
    srv.route("GET", "/v2/a/b/manifests/v1", auth.gate(serve_manifest))

    make_client(srv, credentials=CREDS).get_manifest(REPO, "v1")

    token_requests = srv.seen("GET", "/token")
    assert authorizations(token_requests) == [BASIC]
    assert token_requests[0].query == {"service": ["svc"], "scope": [PULL]}
    # The registry itself never sees the password, only the token.
    assert authorizations(srv.seen(path="/v2/.*")) == [None, "Bearer tok1"]


def test_bearer_token_cached_per_scope(srv: FakeServer) -> None:
    auth = BearerAuth(srv)
    srv.route("GET", "/v2/(a/b|c/d)/manifests/v1", auth.gate(serve_manifest))
    client = make_client(srv)

    client.get_manifest(REPO, "v1")
    client.get_manifest(REPO, "v1")
    assert len(srv.seen("GET", "/token")) == 1
    assert authorizations(srv.seen(path="/v2/a/b/.*")) == [None, "Bearer tok1", "Bearer tok1"]

    # Another repository is another scope: a new token, fetched before the request
    # (the registry's challenge is already known), so no second 401.
    client.get_manifest("c/d", "v1")
    token_requests = srv.seen("GET", "/token")
    assert len(token_requests) == 2
    assert token_requests[1].query["scope"] == ["repository:c/d:pull"]
    assert authorizations(srv.seen(path="/v2/c/d/.*")) == ["Bearer tok2"]


def test_bearer_token_refreshed_before_expiry(srv: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(auth_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    auth = BearerAuth(srv, expires_in=60)
    srv.route("GET", "/v2/a/b/manifests/v1", auth.gate(serve_manifest))
    client = make_client(srv)

    client.get_manifest(REPO, "v1")
    clock[0] += 45  # 15 s left: still used
    client.get_manifest(REPO, "v1")
    assert len(auth.issued) == 1
    clock[0] += 10  # 5 s left: inside the refresh margin
    client.get_manifest(REPO, "v1")

    assert len(auth.issued) == 2
    # Refreshed ahead of time: no 401 round trip for the third request.
    assert authorizations(srv.seen(path="/v2/.*")) == [None, "Bearer tok1", "Bearer tok1", "Bearer tok2"]


def test_bearer_short_expires_in_is_raised_to_the_60_second_minimum(
    srv: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [500.0]
    monkeypatch.setattr(auth_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    auth = BearerAuth(srv, expires_in=5)
    srv.route("GET", "/v2/a/b/manifests/v1", auth.gate(serve_manifest))
    client = make_client(srv)

    client.get_manifest(REPO, "v1")
    clock[0] += 30
    client.get_manifest(REPO, "v1")
    assert auth.issued == ["tok1"]
    clock[0] += 30
    client.get_manifest(REPO, "v1")
    assert auth.issued == ["tok1", "tok2"]


def test_revoked_token_reauthenticates_once_and_resends_the_body(srv: FakeServer) -> None:
    auth = BearerAuth(srv)
    stored: list[bytes] = []

    def post(request: Request) -> Reply:
        auth.revoke_all()  # the token dies mid-operation, after this request
        return Reply(202, b"", {"Location": "/v2/a/b/blobs/uploads/u1?_state=xyz"})

    def put(request: Request) -> Reply:
        stored.append(request.body)
        return Reply(201, b"", {"Docker-Content-Digest": request.query["digest"][0]})

    srv.route("POST", "/v2/a/b/blobs/uploads/", auth.gate(post))
    srv.route("PUT", "/v2/a/b/blobs/uploads/u1", auth.gate(put))
    data = os.urandom(5000)
    digest = Digest.of(data)
    file = io.BytesIO(data)

    make_client(srv).upload_monolithic(REPO, file, digest)

    assert authorizations(srv.seen("POST")) == [None, "Bearer tok1"]
    puts = srv.seen("PUT")
    assert authorizations(puts) == ["Bearer tok1", "Bearer tok2"]
    assert [len(p.body) for p in puts] == [len(data), len(data)]  # the file was rewound
    assert stored == [data]
    assert srv.seen("DELETE") == []


def test_401_is_retried_once_not_in_a_loop(srv: FakeServer) -> None:
    auth = BearerAuth(srv)
    srv.route("GET", "/v2/a/b/manifests/v1", auth.challenge)  # refuses every token

    with pytest.raises(Unauthorized) as info:
        make_client(srv, retries=3).get_manifest(REPO, "v1")

    assert info.value.errno == errno.EACCES
    assert info.value.status == 401
    assert info.value.code == "UNAUTHORIZED"
    assert authorizations(srv.seen(path="/v2/.*")) == [None, "Bearer tok1"]
    assert len(srv.seen("GET", "/token")) == 1


def test_refused_credentials_raise_auth_error(srv: FakeServer) -> None:
    auth = BearerAuth(srv, password="the-real-one")
    srv.route("GET", "/v2/a/b/manifests/v1", auth.gate(serve_manifest))

    with pytest.raises(AuthError) as info:
        make_client(srv, credentials=CREDS, retries=3).get_manifest(REPO, "v1")

    assert info.value.errno == errno.EACCES
    assert authorizations(srv.seen("GET", "/token")) == [BASIC]  # asked once, not retried
    assert len(srv.seen(path="/v2/.*")) == 1
    assert auth.issued == []


def test_basic_challenge_sends_basic_credentials(srv: FakeServer) -> None:
    srv.route("GET", "/v2/a/b/manifests/v1", basic_gate(serve_manifest))
    client = make_client(srv, credentials=CREDS)

    assert client.get_manifest(REPO, "v1").digest == MANIFEST_DIGEST
    assert client.get_manifest(REPO, "v1").digest == MANIFEST_DIGEST

    # Once the challenge is known, Basic goes with the first request.
    assert authorizations(srv.requests) == [None, BASIC, BASIC]


def test_basic_challenge_refused_credentials_do_not_loop(srv: FakeServer) -> None:
    srv.route("GET", "/v2/a/b/manifests/v1", basic_gate(serve_manifest))

    with pytest.raises(Unauthorized) as info:
        make_client(srv, credentials=Credentials("user", "wrong"), retries=3).get_manifest(REPO, "v1")

    assert info.value.errno == errno.EACCES
    wrong = "Basic " + base64.b64encode(b"user:wrong").decode()
    assert authorizations(srv.requests) == [None, wrong]


def test_basic_challenge_without_credentials_is_unauthorized(srv: FakeServer) -> None:
    srv.route("GET", "/v2/a/b/manifests/v1", basic_gate(serve_manifest))

    with pytest.raises(Unauthorized):
        make_client(srv).get_manifest(REPO, "v1")

    assert authorizations(srv.requests) == [None]


def test_relative_realm_is_resolved_against_the_registry(srv: FakeServer) -> None:
    auth = BearerAuth(srv, realm="/token")
    srv.route("GET", "/v2/a/b/manifests/v1", auth.gate(serve_manifest))

    assert make_client(srv, credentials=CREDS).get_manifest(REPO, "v1").digest == MANIFEST_DIGEST
    assert authorizations(srv.seen("GET", "/token")) == [BASIC]


def test_push_scope_with_commas_survives_the_challenge(srv: FakeServer) -> None:
    auth = BearerAuth(srv)

    def put(request: Request) -> Reply:
        if (request.header("Authorization") or "")[7:] not in auth.valid:
            return error_reply(401, "UNAUTHORIZED", "", {"WWW-Authenticate": (
                f'Bearer realm="{auth.realm}",service="svc",'
                'scope="repository:a/b:pull,push",error="insufficient_scope"')})
        return Reply(201, b"", {"Docker-Content-Digest": str(Digest.of(request.body))})

    srv.route("PUT", "/v2/a/b/manifests/v1", put)

    digest = make_client(srv, credentials=CREDS).put_manifest(REPO, "v1", MANIFEST, OCI_MANIFEST)

    assert digest == MANIFEST_DIGEST
    assert [r.query for r in srv.seen("GET", "/token")] == [
        {"service": ["svc"], "scope": ["repository:a/b:pull,push"]}]
    puts = srv.seen("PUT")
    assert authorizations(puts) == [None, "Bearer tok1"]
    assert [p.body for p in puts] == [MANIFEST, MANIFEST]
    assert puts[1].header("Content-Type") == OCI_MANIFEST


# ---- 2. credentials and plain HTTP -------------------------------------------------------------


def test_credentials_never_sent_over_plain_http_to_another_host(servers: Callable[[], FakeServer]) -> None:
    registry, token_server = servers(), servers()
    auth = BearerAuth(registry, token_server, realm=f"http://localhost:{token_server.port}/token")
    registry.route("GET", "/v2/a/b/manifests/v1", auth.gate(serve_manifest))

    with pytest.raises(AuthError) as info:
        make_client(registry, credentials=CREDS).get_manifest(REPO, "v1")

    assert info.value.errno == errno.EACCES
    assert token_server.requests == []  # not even a request without credentials
    assert authorizations(registry.requests) == [None]


def test_anonymous_token_from_a_realm_on_another_host(servers: Callable[[], FakeServer]) -> None:
    registry, token_server = servers(), servers()
    auth = BearerAuth(registry, token_server, realm=f"http://localhost:{token_server.port}/token")
    registry.route("GET", "/v2/a/b/manifests/v1", auth.gate(serve_manifest))

    assert make_client(registry).get_manifest(REPO, "v1").digest == MANIFEST_DIGEST

    assert authorizations(token_server.requests) == [None]
    assert token_server.requests[0].query == {"service": ["svc"], "scope": [PULL]}
    assert authorizations(registry.requests) == [None, "Bearer tok1"]


# ---- 3. redirects --------------------------------------------------------------------------------


@pytest.mark.parametrize("storage_host", ["127.0.0.1", "localhost"])
def test_blob_redirect_to_another_origin_drops_authorization(
    servers: Callable[[], FakeServer], storage_host: str
) -> None:
    registry, storage = servers(), servers()
    auth = BearerAuth(registry)
    blob = os.urandom(4096)
    digest = Digest.of(blob)
    target = f"http://{storage_host}:{storage.port}/store/{digest.hex}?sig=abc"
    registry.route("GET", f"/v2/a/b/blobs/{digest}", auth.gate(Reply(307, b"", {"Location": target})))
    storage.route("GET", f"/store/{digest.hex}", Reply(200, blob))

    assert b"".join(make_client(registry).fetch_blob(REPO, digest, len(blob))) == blob

    assert authorizations(registry.seen(path="/v2/.*")) == [None, "Bearer tok1"]
    assert len(storage.requests) == 1
    assert storage.requests[0].header("Authorization") is None
    assert storage.requests[0].query == {"sig": ["abc"]}


def test_blob_redirect_to_another_origin_keeps_range(servers: Callable[[], FakeServer]) -> None:
    registry, storage = servers(), servers()
    auth = BearerAuth(registry)
    blob = os.urandom(1000)
    digest = Digest.of(blob)
    registry.route("GET", f"/v2/a/b/blobs/{digest}", auth.gate(
        Reply(302, b"", {"Location": f"{storage.origin}/store/x"})))
    storage.route("GET", "/store/x", Reply(206, blob[100:150], {"Content-Range": "bytes 100-149/1000"}))

    assert b"".join(make_client(registry).fetch_blob_range(REPO, digest, 100, 50)) == blob[100:150]

    assert storage.requests[0].header("Range") == "bytes=100-149"
    assert storage.requests[0].header("Authorization") is None


def test_blob_redirect_on_the_same_origin_keeps_authorization(srv: FakeServer) -> None:
    auth = BearerAuth(srv)
    blob = os.urandom(2048)
    digest = Digest.of(blob)
    srv.route("GET", f"/v2/a/b/blobs/{digest}", auth.gate(
        Reply(307, b"", {"Location": f"/storage/{digest.hex}"})))
    srv.route("GET", f"/storage/{digest.hex}", auth.gate(Reply(200, blob)))

    assert b"".join(make_client(srv).fetch_blob(REPO, digest)) == blob

    assert authorizations(srv.seen(path="/storage/.*")) == ["Bearer tok1"]


def test_redirect_loop_is_bounded(srv: FakeServer) -> None:
    digest = Digest.of(b"x")
    srv.route("GET", f"/v2/a/b/blobs/{digest}", Reply(302, b"", {"Location": f"/v2/a/b/blobs/{digest}"}))

    with pytest.raises(RegistryError, match="too many redirects"):
        list(make_client(srv).fetch_blob(REPO, digest))

    assert len(srv.requests) == MAX_REDIRECTS + 1


# ---- 4. 429, 5xx and retries ---------------------------------------------------------------------


def test_429_retry_after_is_waited_for(srv: FakeServer) -> None:
    srv.route("GET", "/v2/a/b/manifests/v1", sequence(
        error_reply(429, "TOOMANYREQUESTS", "slow down", {"Retry-After": "1"}),
        manifest_reply(),
    ))

    started = time.monotonic()
    manifest = make_client(srv, retries=2).get_manifest(REPO, "v1")
    elapsed = time.monotonic() - started

    assert manifest.digest == MANIFEST_DIGEST
    first, second = srv.requests
    assert 0.9 <= second.time - first.time < 3.0  # backoff alone would be ~0.01 s
    assert elapsed < 4.0


def test_503_retried_with_growing_backoff_then_succeeds(srv: FakeServer) -> None:
    srv.route("GET", "/v2/a/b/manifests/v1", sequence(
        Reply(503, "unavailable"), Reply(503, "unavailable"), manifest_reply()))

    manifest = make_client(srv, retries=3, backoff=0.2).get_manifest(REPO, "v1")

    assert manifest.digest == MANIFEST_DIGEST
    times = [r.time for r in srv.requests]
    assert len(times) == 3
    # backoff * 2**(n-1) * [0.5, 1.5): first gap 0.1-0.3 s, second 0.2-0.6 s.
    assert 0.09 <= times[1] - times[0] < 1.0
    assert 0.19 <= times[2] - times[1] < 1.5


@pytest.mark.parametrize(
    ("reply", "exc_type", "errno_"),
    [
        (error_reply(429, "TOOMANYREQUESTS", "rate", {"Retry-After": "0"}), TooManyRequests, errno.EAGAIN),
        (Reply(503, "<html>busy</html>"), ServerError, errno.EIO),
        (Reply(500, "oops"), ServerError, errno.EIO),
        (Reply(502, ""), ServerError, errno.EIO),
    ],
    ids=["429", "503", "500", "502"],
)
def test_retries_exhausted_raise_typed_error(
    srv: FakeServer, reply: Reply, exc_type: type[RegistryError], errno_: int
) -> None:
    srv.route("GET", "/v2/a/b/manifests/v1", reply)

    with pytest.raises(exc_type) as info:
        make_client(srv, retries=2).get_manifest(REPO, "v1")

    assert info.value.status == reply.status
    assert info.value.errno == errno_
    assert len(srv.requests) == 3  # the first try and two retries


def test_retry_after_beyond_max_wait_fails_at_once(srv: FakeServer) -> None:
    srv.route("GET", "/v2/a/b/manifests/v1",
              error_reply(429, "TOOMANYREQUESTS", "", {"Retry-After": "120"}))
    client = RegistryClient(
        Registry.parse(srv.host),
        ClientOptions(transport=TransportOptions(connect_timeout=2, read_timeout=3, retries=3,
                                                 backoff=0.01, max_retry_wait=5)),
    )

    started = time.monotonic()
    with pytest.raises(TooManyRequests) as info:
        client.get_manifest(REPO, "v1")

    assert time.monotonic() - started < 1.0
    assert info.value.code == "TOOMANYREQUESTS"
    assert len(srv.requests) == 1


def test_dropped_connection_is_retried(srv: FakeServer) -> None:
    srv.route("GET", "/v2/a/b/manifests/v1", sequence(lambda request: request.drop(), manifest_reply()))

    assert make_client(srv, retries=1).get_manifest(REPO, "v1").digest == MANIFEST_DIGEST
    assert len(srv.requests) == 2


# ---- 5. ranges -------------------------------------------------------------------------------------

BLOB = bytes(range(256)) * 4  # 1024 bytes, every offset distinguishable mod 256
BLOB_DIGEST = Digest.of(BLOB)
BLOB_PATH = f"/v2/a/b/blobs/{BLOB_DIGEST}"


@pytest.mark.parametrize(("offset", "length"), [(100, 50), (0, 10), (1000, None), (1023, 1)])
def test_server_ignoring_range_gives_exactly_the_slice(srv: FakeServer, offset: int, length: int | None) -> None:
    srv.route("GET", BLOB_PATH, Reply(200, BLOB))

    data = b"".join(make_client(srv).fetch_blob_range(REPO, BLOB_DIGEST, offset, length))

    end = None if length is None else offset + length
    assert data == BLOB[offset:end]
    expected_range = f"bytes={offset}-" + ("" if length is None else str(offset + length - 1))
    assert srv.requests[0].header("Range") == expected_range


def test_206_starting_after_the_offset_is_a_range_error(srv: FakeServer) -> None:
    srv.route("GET", BLOB_PATH, Reply(206, BLOB[200:300], {"Content-Range": "bytes 200-299/1024"}))

    with pytest.raises(RangeError) as info:
        list(make_client(srv).fetch_blob_range(REPO, BLOB_DIGEST, 100, 100))

    assert info.value.errno == errno.EIO


def test_206_starting_before_the_offset_is_sliced(srv: FakeServer) -> None:
    srv.route("GET", BLOB_PATH, Reply(206, BLOB[64:400], {"Content-Range": "bytes 64-399/1024"}))

    data = b"".join(make_client(srv).fetch_blob_range(REPO, BLOB_DIGEST, 100, 50))

    assert data == BLOB[100:150]


@pytest.mark.parametrize("content_range", [None, "bytes */1024", "items 100-149/1024", "bytes 150-100/1024"])
def test_206_without_a_usable_content_range_is_a_range_error(srv: FakeServer, content_range: str | None) -> None:
    srv.route("GET", BLOB_PATH, Reply(206, BLOB[100:150], {"Content-Range": content_range} if content_range else {}))

    with pytest.raises(RangeError):
        list(make_client(srv).fetch_blob_range(REPO, BLOB_DIGEST, 100, 50))


def test_416_is_a_range_error(srv: FakeServer) -> None:
    srv.route("GET", BLOB_PATH, Reply(416, "", {"Content-Range": "bytes */1024"}))

    with pytest.raises(RangeError) as info:
        list(make_client(srv).fetch_blob_range(REPO, BLOB_DIGEST, 5000, 10))

    assert info.value.status == 416


def test_body_shorter_than_content_length_fails(srv: FakeServer) -> None:
    def short(request: Request) -> None:
        request.send_head(200, {"Content-Length": str(len(BLOB))})
        request.write(BLOB[:300])
        request.drop()

    srv.route("GET", BLOB_PATH, short)

    with pytest.raises((RangeError, NetworkError)):
        list(make_client(srv).fetch_blob_range(REPO, BLOB_DIGEST, 100, 500))


def test_close_delimited_body_that_ends_early_is_a_range_error(srv: FakeServer) -> None:
    def short(request: Request) -> None:
        request.send_head(200, {"Connection": "close"})  # no length: the body ends at close
        request.write(BLOB[:300])
        request.drop()

    srv.route("GET", BLOB_PATH, short)

    with pytest.raises(RangeError):
        list(make_client(srv).fetch_blob_range(REPO, BLOB_DIGEST, 100, 500))


def test_206_whose_body_is_shorter_than_its_range_is_a_range_error(srv: FakeServer) -> None:
    srv.route("GET", BLOB_PATH, Reply(206, BLOB[100:120], {"Content-Range": "bytes 100-599/1024"}))

    with pytest.raises(RangeError):
        list(make_client(srv).fetch_blob_range(REPO, BLOB_DIGEST, 100, 500))


def test_whole_blob_with_wrong_bytes_is_an_integrity_error(srv: FakeServer) -> None:
    srv.route("GET", BLOB_PATH, Reply(200, BLOB[:-1] + b"\x00"))

    with pytest.raises(IntegrityError):
        list(make_client(srv).fetch_blob(REPO, BLOB_DIGEST, len(BLOB)))


def test_whole_blob_of_the_wrong_size_is_an_integrity_error(srv: FakeServer) -> None:
    srv.route("GET", BLOB_PATH, Reply(200, BLOB + b"extra"))

    with pytest.raises(IntegrityError):
        list(make_client(srv).fetch_blob(REPO, BLOB_DIGEST, len(BLOB)))


# ---- 6. hangs, timeouts, refused connections -------------------------------------------------------


def test_server_that_never_answers_times_out(srv: FakeServer) -> None:
    srv.route("GET", "/v2/a/b/manifests/v1", lambda request: request.hang())

    started = time.monotonic()
    with pytest.raises(RequestTimeout) as info:
        make_client(srv, read_timeout=0.5, retries=0).get_manifest(REPO, "v1")
    elapsed = time.monotonic() - started

    assert info.value.errno == errno.ETIMEDOUT
    assert 0.4 <= elapsed < 5.0
    assert len(srv.requests) == 1


def test_listener_that_never_accepts_times_out() -> None:
    sock, port = silent_listener()
    try:
        started = time.monotonic()
        with pytest.raises(RequestTimeout):
            make_client(port, read_timeout=0.5, retries=0).get_manifest(REPO, "v1")
        assert time.monotonic() - started < 5.0
    finally:
        sock.close()


def test_manifest_headers_then_stall_times_out(srv: FakeServer) -> None:
    def stall(request: Request) -> None:
        request.send_head(200, {"Content-Type": OCI_MANIFEST, "Content-Length": str(len(MANIFEST))})
        request.write(MANIFEST[:20])
        request.hang()

    srv.route("GET", "/v2/a/b/manifests/v1", stall)

    started = time.monotonic()
    with pytest.raises(RequestTimeout):
        make_client(srv, read_timeout=0.5, retries=0).get_manifest(REPO, "v1")
    assert time.monotonic() - started < 5.0


def test_blob_body_stall_times_out(srv: FakeServer) -> None:
    def stall(request: Request) -> None:
        request.send_head(200, {"Content-Length": str(len(BLOB))})
        request.write(BLOB[:100])
        request.hang()

    srv.route("GET", BLOB_PATH, stall)

    started = time.monotonic()
    with pytest.raises(RequestTimeout):
        list(make_client(srv, read_timeout=0.5, retries=0).fetch_blob(REPO, BLOB_DIGEST))
    assert time.monotonic() - started < 5.0


def test_hang_with_retries_is_bounded_by_the_retries(srv: FakeServer) -> None:
    srv.route("GET", "/v2/a/b/manifests/v1", lambda request: request.hang())

    started = time.monotonic()
    with pytest.raises(RequestTimeout):
        make_client(srv, read_timeout=0.3, retries=2).get_manifest(REPO, "v1")

    assert time.monotonic() - started < 5.0
    assert len(srv.requests) == 3


def test_connection_refused_is_a_network_error() -> None:
    port = closed_port()

    started = time.monotonic()
    with pytest.raises(NetworkError) as info:
        make_client(port, retries=0).get_manifest(REPO, "v1")

    assert type(info.value) is NetworkError  # not a timeout
    assert info.value.errno == errno.EHOSTUNREACH
    assert time.monotonic() - started < 2.0


# ---- 7. manifests and error bodies --------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"schemaVersion": 2, "layers": [',
        b"\xff\xfe not json",
        b"[1, 2, 3]",
        b'{"schemaVersion": 2, "layers": [{"mediaType": "x", "digest": "sha256:nope", "size": 1}]}',
        b'{"schemaVersion": 2, "layers": "not a list"}',
        b'{"schemaVersion": 2}',
        b'{"schemaVersion": 1, "fsLayers": []}',
    ],
    ids=["truncated", "binary", "array", "bad-digest", "layers-not-list", "no-shape", "schema1"],
)
def test_malformed_manifest_is_a_manifest_error(srv: FakeServer, raw: bytes) -> None:
    # A neutral Content-Type: the body alone has to say what it is.
    srv.route("GET", "/v2/a/b/manifests/v1", manifest_reply(raw, content_type="application/json"))

    with pytest.raises(ManifestError) as info:
        make_client(srv).get_manifest(REPO, "v1")

    assert type(info.value) is ManifestError
    assert info.value.errno == errno.EIO


def test_a_tag_fetch_trusts_the_bytes_not_docker_content_digest(srv: FakeServer) -> None:
    """Some registries send a wrong header for tags: the digest of the bytes counts."""
    srv.route("GET", "/v2/a/b/manifests/v1", manifest_reply(OTHER, digest=str(MANIFEST_DIGEST)))

    assert make_client(srv).get_manifest(REPO, "v1").digest == OTHER_DIGEST


def test_manifest_without_digest_header_is_hashed(srv: FakeServer) -> None:
    srv.route("GET", "/v2/a/b/manifests/v1", manifest_reply(OTHER, digest=None))

    assert make_client(srv).get_manifest(REPO, "v1").digest == OTHER_DIGEST


@pytest.mark.parametrize("header", ["claimed", "honest", "none"])
def test_manifest_fetched_by_digest_must_match_it(srv: FakeServer, header: str) -> None:
    digest = {"claimed": str(MANIFEST_DIGEST), "honest": str(OTHER_DIGEST), "none": None}[header]
    srv.route("GET", f"/v2/a/b/manifests/{MANIFEST_DIGEST}", manifest_reply(OTHER, digest=digest))

    with pytest.raises(IntegrityError):
        make_client(srv).get_manifest(REPO, str(MANIFEST_DIGEST))


def test_resolve_by_digest_answered_with_another_digest(srv: FakeServer) -> None:
    srv.route("HEAD", f"/v2/a/b/manifests/{MANIFEST_DIGEST}", Reply(200, b"", {
        "Docker-Content-Digest": str(OTHER_DIGEST), "Content-Type": OCI_MANIFEST,
        "Content-Length": str(len(OTHER))}))

    with pytest.raises(IntegrityError):
        make_client(srv).resolve(REPO, str(MANIFEST_DIGEST))


def test_oversize_manifest_refused_by_content_length_before_reading(srv: FakeServer) -> None:
    def huge(request: Request) -> None:
        request.send_head(200, {"Content-Type": OCI_MANIFEST, "Content-Length": str(MAX_MANIFEST_SIZE + 1)})
        request.write(b'{"schemaVersion": 2, "annotations": {"x": "')
        request.hang()  # if the client tried to read the body it would time out instead

    srv.route("GET", "/v2/a/b/manifests/v1", huge)

    started = time.monotonic()
    with pytest.raises(ManifestTooLarge) as info:
        make_client(srv, read_timeout=3).get_manifest(REPO, "v1")

    assert time.monotonic() - started < 2.0
    assert info.value.errno == errno.EFBIG


def _chunked(body_size: int, *, stall_after: int | None = None) -> Callable[[Request], None]:
    """A manifest of `body_size` bytes, chunked (no Content-Length). With `stall_after`, the
    server stops sending after that many bytes and keeps the connection open."""

    def send(request: Request) -> None:
        request.send_head(200, {"Content-Type": OCI_MANIFEST, "Transfer-Encoding": "chunked"})
        head = b'{"schemaVersion":2,"mediaType":"' + OCI_MANIFEST.encode() + b'","layers":[],"annotations":{"pad":"'
        tail = b'"}}'
        body = head + b"x" * (body_size - len(head) - len(tail)) + tail
        if stall_after is not None:
            body = body[:stall_after]
        step = 256 * 1024
        try:
            for start in range(0, len(body), step):
                request.write_chunk(body[start:start + step])
            if stall_after is not None:
                request.hang()
            else:
                request.end_chunks()
        except OSError:  # the client hung up once it had seen enough
            request.drop()

    return send


def test_oversize_chunked_manifest_without_content_length(srv: FakeServer) -> None:
    srv.route("GET", "/v2/a/b/manifests/v1", _chunked(MAX_MANIFEST_SIZE + 1))

    with pytest.raises(ManifestTooLarge) as info:
        make_client(srv).get_manifest(REPO, "v1")

    assert info.value.errno == errno.EFBIG


def test_endless_chunked_manifest_is_cut_off_at_the_limit(srv: FakeServer) -> None:
    # More than the limit arrives, then nothing: a client that reads on would time out.
    srv.route("GET", "/v2/a/b/manifests/v1",
              _chunked(2 * MAX_MANIFEST_SIZE, stall_after=MAX_MANIFEST_SIZE + 256 * 1024))

    started = time.monotonic()
    with pytest.raises(ManifestTooLarge):
        make_client(srv, read_timeout=3).get_manifest(REPO, "v1")

    assert time.monotonic() - started < 2.5


def test_chunked_manifest_at_exactly_the_limit_is_accepted(srv: FakeServer) -> None:
    srv.route("GET", "/v2/a/b/manifests/v1", _chunked(MAX_MANIFEST_SIZE))

    manifest = make_client(srv).get_manifest(REPO, "v1")

    assert isinstance(manifest, Manifest)
    assert len(manifest.raw) == MAX_MANIFEST_SIZE


def test_unknown_media_types_are_accepted(srv: FakeServer) -> None:
    raw = encode_json({
        "schemaVersion": 2,
        "mediaType": "application/vnd.example.future.manifest.v9+json",
        "config": {"mediaType": "application/vnd.example.config+json", "digest": str(EMPTY_DIGEST), "size": 2},
        "layers": [{"mediaType": "application/x-never-heard-of-it", "digest": str(BLOB_DIGEST), "size": 1024,
                    "annotations": {"org.opencontainers.image.title": "blob.bin"}}],
        "unknownField": {"kept": True},
    })
    index_raw = encode_json({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.example.other+json", "digest": str(BLOB_DIGEST),
                       "size": 1024, "platform": {"os": "plan9", "architecture": "mips"}}],
    })
    srv.route("GET", "/v2/a/b/manifests/v1", manifest_reply(raw, content_type="application/vnd.example.weird"))
    srv.route("GET", "/v2/a/b/manifests/idx", manifest_reply(index_raw, content_type=f"{OCI_INDEX}; charset=utf-8"))
    client = make_client(srv)

    manifest = client.get_manifest(REPO, "v1")
    assert isinstance(manifest, Manifest)
    assert manifest.media_type == "application/vnd.example.future.manifest.v9+json"
    assert manifest.raw == raw
    assert [layer.media_type for layer in manifest.layers] == ["application/x-never-heard-of-it"]
    assert manifest.layers[0].title == "blob.bin"

    index = client.get_manifest(REPO, "idx")
    assert isinstance(index, Index)
    assert index.media_type == OCI_INDEX  # from the Content-Type, parameters ignored
    assert index.manifests[0].media_type == "application/vnd.example.other+json"
    assert index.manifests[0].platform is not None and index.manifests[0].platform.os == "plan9"


@pytest.mark.parametrize(
    ("status", "code", "exc_type", "errno_"),
    [
        (404, "MANIFEST_UNKNOWN", NotFound, errno.ENOENT),
        (404, "NAME_UNKNOWN", NotFound, errno.ENOENT),
        (400, "MANIFEST_UNKNOWN", NotFound, errno.ENOENT),  # the code wins over an odd status
        (403, "DENIED", Denied, errno.EACCES),
        (405, "UNSUPPORTED", Unsupported, errno.EPERM),
        (429, "TOOMANYREQUESTS", TooManyRequests, errno.EAGAIN),
        (400, "NAME_INVALID", RegistryError, errno.EIO),
        (500, "UNKNOWN", ServerError, errno.EIO),
    ],
)
def test_error_json_is_parsed_into_code(
    srv: FakeServer, status: int, code: str, exc_type: type[RegistryError], errno_: int
) -> None:
    srv.route("GET", "/v2/a/b/manifests/v1", Reply(status, {
        "errors": [{"code": code, "message": f"{code.lower()} says the registry", "detail": {"x": 1}},
                   {"code": "SECOND", "message": "ignored"}]}))

    with pytest.raises(exc_type) as info:
        make_client(srv).get_manifest(REPO, "v1")

    assert type(info.value) is exc_type
    assert info.value.code == code
    assert [d.code for d in info.value.details] == [code, "SECOND"]
    assert info.value.status == status
    assert info.value.errno == errno_
    assert f"{code.lower()} says the registry" in str(info.value)


@pytest.mark.parametrize(
    ("status", "body", "exc_type"),
    [
        (500, "<html><body>Internal Server Error</body></html>", ServerError),
        (502, b"\xff\xfe\x00 binary garbage", ServerError),
        (404, "404 page not found\n", NotFound),
        (403, "", Denied),
        (404, '{"message": "not the errors shape"}', NotFound),
        (404, '{"errors": "not a list"}', NotFound),
        (400, '{"errors": [{"message": "no code"}, 7]}', RegistryError),
        (404, b"{" + b" " * (200 * 1024) + b"}", NotFound),  # above the error-body limit
    ],
    ids=["html-500", "binary-502", "text-404", "empty-403", "json-no-errors", "errors-not-list",
         "errors-without-code", "huge-404"],
)
def test_non_json_error_body_still_gives_a_typed_error(
    srv: FakeServer, status: int, body: str | bytes, exc_type: type[RegistryError]
) -> None:
    srv.route("GET", "/v2/a/b/manifests/v1", Reply(status, body, {"Content-Type": "text/html"}))

    with pytest.raises(exc_type) as info:
        make_client(srv).get_manifest(REPO, "v1")

    assert type(info.value) is exc_type
    assert info.value.code is None
    assert info.value.status == status
    assert f"HTTP {status}" in str(info.value)


def _unauthorized_without_usable_challenge(srv: FakeServer, path: str) -> None:
    # A Basic challenge and no credentials: nothing to retry with, the 401 is the answer.
    srv.route("GET", path, error_reply(401, "UNAUTHORIZED", "authentication required",
                                       {"WWW-Authenticate": 'Basic realm="Registry Realm"'}))


def test_401_error_code_is_parsed_on_a_buffered_request(srv: FakeServer) -> None:
    _unauthorized_without_usable_challenge(srv, "/v2/a/b/tags/list")

    with pytest.raises(Unauthorized) as info:
        list(make_client(srv).tags(REPO))

    assert info.value.code == "UNAUTHORIZED"
    assert info.value.errno == errno.EACCES


def test_401_error_code_is_parsed_on_a_streamed_request(srv: FakeServer) -> None:
    _unauthorized_without_usable_challenge(srv, "/v2/a/b/manifests/v1")

    with pytest.raises(Unauthorized) as info:
        make_client(srv).get_manifest(REPO, "v1")  # manifests are fetched with stream=True

    assert info.value.code == "UNAUTHORIZED"


def test_head_error_without_body_is_typed(srv: FakeServer) -> None:
    srv.route("HEAD", "/v2/a/b/manifests/v1", Reply(404, b""))

    with pytest.raises(NotFound):
        make_client(srv).resolve(REPO, "v1")


def test_delete_disabled_is_unsupported(srv: FakeServer) -> None:
    srv.route("DELETE", f"/v2/a/b/manifests/{MANIFEST_DIGEST}",
              error_reply(405, "UNSUPPORTED", "The operation is unsupported."))

    with pytest.raises(Unsupported) as info:
        make_client(srv).delete_manifest(REPO, str(MANIFEST_DIGEST))

    assert info.value.errno == errno.EPERM


# ---- 8. tag list paging ------------------------------------------------------------------------


def _tag_pages(pages: dict[str | None, tuple[list[str], str | None]]) -> Callable[[Request], Reply]:
    """Pages keyed by the `last` query parameter (None for the first page)."""

    def handler(request: Request) -> Reply:
        last = request.query.get("last", [None])[0]
        tags, link = pages[last]
        headers = {"Link": link} if link else {}
        return Reply(200, {"name": "a", "tags": tags}, headers)

    return handler


def test_tag_list_follows_relative_links_across_three_pages(srv: FakeServer) -> None:
    srv.route("GET", "/v2/a/tags/list", _tag_pages({
        None: (["t1", "t2"], '</v2/a/tags/list?n=2&last=t2>; rel="next"'),
        # Fewer than n results is not the end; a `prev` link comes first.
        "t2": (["t3"], '</v2/a/tags/list?n=2>; rel="prev", </v2/a/tags/list?n=2&last=t3>; rel="next"'),
        "t3": (["t4", "t5"], None),
    }))

    tags = list(make_client(srv, page_size=2).tags("a"))

    assert tags == ["t1", "t2", "t3", "t4", "t5"]
    assert [r.query for r in srv.requests] == [
        {"n": ["2"]}, {"n": ["2"], "last": ["t2"]}, {"n": ["2"], "last": ["t3"]}]


@pytest.mark.parametrize("other_host", ["localhost", "127.0.0.1"])
def test_tag_list_link_to_another_origin_is_not_followed(
    servers: Callable[[], FakeServer], other_host: str
) -> None:
    registry, other = servers(), servers()
    registry.route("GET", "/v2/a/tags/list", _tag_pages({
        None: (["t1", "t2"], f'<http://{other_host}:{other.port}/v2/a/tags/list?n=2&last=t2>; rel="next"'),
    }))
    other.route("GET", "/v2/a/tags/list", Reply(200, {"name": "a", "tags": ["evil"]}))

    tags = list(make_client(registry, page_size=2).tags("a"))

    assert tags == ["t1", "t2"]
    assert other.requests == []
    assert len(registry.requests) == 1


@pytest.mark.parametrize("loop", ["self", "back-to-first"])
def test_tag_list_looping_link_stops(srv: FakeServer, loop: str) -> None:
    if loop == "self":
        pages = {None: (["t1", "t2"], '</v2/a/tags/list?n=2>; rel="next"')}
        expected, requests = ["t1", "t2"], 1
    else:
        pages = {
            None: (["t1", "t2"], '</v2/a/tags/list?n=2&last=t2>; rel="next"'),
            "t2": (["t3", "t4"], '</v2/a/tags/list?n=2>; rel="next"'),
        }
        expected, requests = ["t1", "t2", "t3", "t4"], 2
    srv.route("GET", "/v2/a/tags/list", _tag_pages(pages))  # type: ignore[arg-type]

    assert list(make_client(srv, page_size=2).tags("a")) == expected
    assert len(srv.requests) == requests


def test_catalog_retries_without_n_when_the_page_size_is_refused(srv: FakeServer) -> None:
    def catalog(request: Request) -> Reply:
        if "n" in request.query:
            return error_reply(400, "PAGINATION_NUMBER_INVALID", "invalid number of results requested")
        if "last" not in request.query:
            return Reply(200, {"repositories": ["a/b", "c/d"]}, {"Link": '</v2/_catalog?last=c%2Fd>; rel="next"'})
        return Reply(200, {"repositories": ["e/f"]})

    srv.route("GET", "/v2/_catalog", catalog)

    assert list(make_client(srv, page_size=1000).catalog()) == ["a/b", "c/d", "e/f"]
    assert [r.query for r in srv.requests] == [{"n": ["1000"]}, {}, {"last": ["c/d"]}]


# ---- 9. uploads -------------------------------------------------------------------------------------


def test_monolithic_upload_uses_the_location_as_is(srv: FakeServer) -> None:
    stored: list[Request] = []
    srv.route("POST", "/v2/a/b/blobs/uploads/",
              Reply(202, b"", {"Location": "/v2/a/b/blobs/uploads/u1?_state=xyz", "Docker-Upload-UUID": "u1"}))

    def put(request: Request) -> Reply:
        stored.append(request)
        return Reply(201, b"", {"Docker-Content-Digest": request.query["digest"][0]})

    srv.route("PUT", "/v2/a/b/blobs/uploads/u1", put)
    data = os.urandom(3000)
    digest = Digest.of(data)

    make_client(srv).upload_monolithic(REPO, data, digest)

    assert len(stored) == 1
    assert stored[0].raw_query == f"_state=xyz&digest={digest}"
    assert stored[0].body == data
    assert stored[0].header("Content-Type") == "application/octet-stream"


def test_absolute_upload_location_is_used_as_is(servers: Callable[[], FakeServer]) -> None:
    registry, uploads = servers(), servers()
    registry.route("POST", "/v2/a/b/blobs/uploads/",
                   Reply(202, b"", {"Location": f"{uploads.origin}/upload/session?_state=abc%3D%3D&x=1"}))
    uploads.route("PUT", "/upload/session",
                  lambda r: Reply(201, b"", {"Docker-Content-Digest": r.query["digest"][0]}))
    data = b"hello"
    digest = Digest.of(data)

    make_client(registry).upload_monolithic(REPO, data, digest)

    assert [r.raw_query for r in uploads.requests] == [f"_state=abc%3D%3D&x=1&digest={digest}"]


def test_upload_stored_under_another_digest_is_an_integrity_error(srv: FakeServer) -> None:
    srv.route("POST", "/v2/a/b/blobs/uploads/", Reply(202, b"", {"Location": "/v2/a/b/blobs/uploads/u1"}))
    srv.route("PUT", "/v2/a/b/blobs/uploads/u1", Reply(201, b"", {"Docker-Content-Digest": str(OTHER_DIGEST)}))
    srv.route("DELETE", "/v2/a/b/blobs/uploads/u1", Reply(204))

    with pytest.raises(IntegrityError):
        make_client(srv).upload_monolithic(REPO, b"data", Digest.of(b"data"))


class ChunkedUploadServer:
    """distribution's chunked upload semantics: a PATCH must start where the server is
    (else 416), `Range: 0-<size-1>` (`0-0` when empty, as distribution writes it), a new
    `_state` in every Location (an old one is refused). `faults` maps the n-th PATCH
    (1-based) to what goes wrong with it."""

    def __init__(self, server: FakeServer, faults: dict[int, str] | None = None,
                 min_chunk: int | None = None) -> None:
        self.data = bytearray()
        self.state = 0
        self.faults = faults or {}
        self.patches: list[Request] = []
        self.completed: bytes | None = None
        self.put_query: str | None = None
        self.min_chunk = min_chunk
        self._lock = threading.Lock()
        base = "/v2/a/b/blobs/uploads/"
        server.route("POST", base, self.post)
        server.route("PATCH", base + "u1", self.patch)
        server.route("GET", base + "u1", self.status)
        server.route("PUT", base + "u1", self.put)
        server.route("DELETE", base + "u1", lambda r: Reply(204))

    def location(self) -> str:
        return f"/v2/a/b/blobs/uploads/u1?_state=s{self.state}"

    def range(self) -> str:
        return f"0-{max(len(self.data) - 1, 0)}"

    def _headers(self) -> dict[str, str]:
        return {"Location": self.location(), "Range": self.range(), "Docker-Upload-UUID": "u1"}

    def _stale(self, request: Request) -> Reply | None:
        if request.query.get("_state") != [f"s{self.state}"]:
            return error_reply(400, "BLOB_UPLOAD_INVALID", f"stale state {request.raw_query}")
        return None

    def post(self, request: Request) -> Reply:
        headers = {"Location": self.location(), "Range": "0-0", "Docker-Upload-UUID": "u1"}
        if self.min_chunk:
            headers["OCI-Chunk-Min-Length"] = str(self.min_chunk)
        return Reply(202, b"", headers)

    def patch(self, request: Request) -> Reply | None:
        with self._lock:
            stale = self._stale(request)
            if stale:
                return stale
            self.patches.append(request)
            fault = self.faults.get(len(self.patches))
            if fault == "416":
                return Reply(416, b"", self._headers())
            if fault == "503":
                return Reply(503, b"")
            if fault == "drop":
                request.drop()
                return None
            match = re.fullmatch(r"(\d+)-(\d+)", request.header("Content-Range") or "")
            if (match is None or int(match.group(1)) != len(self.data)
                    or int(match.group(2)) - int(match.group(1)) + 1 != len(request.body)):
                return Reply(416, b"", self._headers())
            body = request.body[:-37] if fault == "short" else request.body  # silently loses a tail
            self.data += body
            self.state += 1
            return Reply(202, b"", self._headers())

    def status(self, request: Request) -> Reply:
        with self._lock:
            return self._stale(request) or Reply(204, b"", self._headers())

    def put(self, request: Request) -> Reply:
        with self._lock:
            stale = self._stale(request)
            if stale:
                return stale
            self.data += request.body
            digest = request.query.get("digest", [""])[0]
            if digest != str(Digest.of(bytes(self.data))):
                return error_reply(400, "DIGEST_INVALID", "provided digest did not match uploaded content")
            self.completed = bytes(self.data)
            self.put_query = request.raw_query
            return Reply(201, b"", {"Docker-Content-Digest": digest, "Location": f"/v2/a/b/blobs/{digest}"})


DATA = os.urandom(1000)
DATA_DIGEST = Digest.of(DATA)


def test_chunked_upload_without_faults(srv: FakeServer) -> None:
    upload = ChunkedUploadServer(srv)

    make_client(srv).upload_chunked(REPO, io.BytesIO(DATA), DATA_DIGEST, len(DATA), chunk_size=256)

    assert upload.completed == DATA
    assert [r.header("Content-Range") for r in upload.patches] == ["0-255", "256-511", "512-767", "768-999"]
    assert all(r.header("Content-Type") == "application/octet-stream" for r in upload.patches)
    assert upload.put_query == f"_state=s4&digest={DATA_DIGEST}"


@pytest.mark.parametrize("fault", ["416", "503", "drop"])
def test_chunked_upload_resumes_after_a_lost_chunk(srv: FakeServer, fault: str) -> None:
    upload = ChunkedUploadServer(srv, faults={2: fault})

    make_client(srv).upload_chunked(REPO, io.BytesIO(DATA), DATA_DIGEST, len(DATA), chunk_size=256)

    assert upload.completed == DATA
    assert [r.header("Content-Range") for r in upload.patches] == [
        "0-255", "256-511", "256-511", "512-767", "768-999"]
    assert len(srv.seen("GET", "/v2/a/b/blobs/uploads/u1")) == 1  # asked the server where it is
    assert upload.put_query == f"_state=s4&digest={DATA_DIGEST}"


def test_chunked_upload_resumes_when_the_servers_range_disagrees(srv: FakeServer) -> None:
    upload = ChunkedUploadServer(srv, faults={2: "short"})  # stores 256-37 bytes, says so in Range

    make_client(srv).upload_chunked(REPO, io.BytesIO(DATA), DATA_DIGEST, len(DATA), chunk_size=256)

    assert upload.completed == DATA
    ranges = [r.header("Content-Range") for r in upload.patches]
    assert ranges[:3] == ["0-255", "256-511", f"{512 - 37}-{512 - 37 + 255}"]
    assert len(srv.seen("GET", "/v2/a/b/blobs/uploads/u1")) == 1


@pytest.mark.parametrize("fault", ["503", "drop"])
def test_chunked_upload_resumes_when_the_first_chunk_was_lost(srv: FakeServer, fault: str) -> None:
    upload = ChunkedUploadServer(srv, faults={1: fault})

    make_client(srv).upload_chunked(REPO, io.BytesIO(DATA), DATA_DIGEST, len(DATA), chunk_size=256)

    assert upload.completed == DATA


def test_chunked_upload_gives_up_when_the_server_keeps_losing_chunks(srv: FakeServer) -> None:
    upload = ChunkedUploadServer(srv, faults={n: "416" for n in range(1, 100)})

    with pytest.raises(RegistryError, match="keeps losing chunks"):
        make_client(srv).upload_chunked(REPO, io.BytesIO(DATA), DATA_DIGEST, len(DATA), chunk_size=256)

    assert len(upload.patches) == client_module.MAX_UPLOAD_RECOVERIES + 1
    assert upload.completed is None
    assert len(srv.seen("DELETE")) == 1  # the session is cancelled


def test_chunked_upload_honours_the_minimum_chunk_length(srv: FakeServer) -> None:
    upload = ChunkedUploadServer(srv, min_chunk=400)

    make_client(srv).upload_chunked(REPO, io.BytesIO(DATA), DATA_DIGEST, len(DATA), chunk_size=256)

    assert upload.completed == DATA
    assert [len(r.body) for r in upload.patches] == [400, 400, 200]


# ---- 10. Docker Hub API -------------------------------------------------------------------------


def _hub_options() -> TransportOptions:
    return TransportOptions(connect_timeout=2, read_timeout=3, retries=0, backoff=0.01)


def test_hub_repositories_follow_absolute_next_across_three_pages(srv: FakeServer) -> None:
    base = f"{srv.origin}/v2/namespaces/ns/repositories"

    def page(request: Request) -> Reply:
        number = request.query.get("page", ["1"])[0]
        results, next_url = {
            "1": (["r1", "r2"], f"{base}?page=2&page_size={HUB_PAGE_SIZE}"),
            "2": (["r3"], f"{base}?page=3&page_size={HUB_PAGE_SIZE}"),
            "3": (["r4", "Not Valid"], None),
        }[number]
        return Reply(200, {
            "count": 4, "next": next_url, "previous": None,
            "results": [{"name": n, "namespace": "ns", "repository_type": "image"} for n in results],
        })

    srv.route("GET", "/v2/namespaces/ns/repositories", page)

    names = list(HubClient(srv.origin, _hub_options()).repositories("ns"))

    assert names == ["r1", "r2", "r3", "r4"]
    assert [r.query for r in srv.requests] == [
        {"page_size": [str(HUB_PAGE_SIZE)]},
        {"page": ["2"], "page_size": [str(HUB_PAGE_SIZE)]},
        {"page": ["3"], "page_size": [str(HUB_PAGE_SIZE)]},
    ]


@pytest.mark.parametrize("other_host", ["localhost", "127.0.0.1"])
def test_hub_next_on_another_host_is_not_followed(servers: Callable[[], FakeServer], other_host: str) -> None:
    hub, other = servers(), servers()
    hub.route("GET", "/v2/namespaces/ns/repositories", Reply(200, {
        "count": 3, "previous": None,
        "next": f"http://{other_host}:{other.port}/v2/namespaces/ns/repositories?page=2",
        "results": [{"name": "r1"}, {"name": "r2"}],
    }))
    other.route("GET", "/v2/namespaces/ns/repositories", Reply(200, {"next": None, "results": [{"name": "evil"}]}))

    assert list(HubClient(hub.origin, _hub_options()).repositories("ns")) == ["r1", "r2"]
    assert other.requests == []


def test_hub_next_looping_stops(srv: FakeServer) -> None:
    srv.route("GET", "/v2/namespaces/ns/repositories", Reply(200, {
        "next": f"{srv.origin}/v2/namespaces/ns/repositories?page_size={HUB_PAGE_SIZE}",
        "results": [{"name": "r1"}]}))

    assert list(HubClient(srv.origin, _hub_options()).repositories("ns")) == ["r1"]
    assert len(srv.requests) == 1


@pytest.mark.parametrize("namespace", ["Bad", "a/b", "../x", "", "ns?page=9"])
def test_hub_invalid_namespace_sends_nothing(srv: FakeServer, namespace: str) -> None:
    with pytest.raises(OcifsError):
        list(HubClient(srv.origin, _hub_options()).repositories(namespace))
    assert srv.requests == []


def test_hub_invalid_namespace_is_an_invalid_reference(srv: FakeServer) -> None:
    with pytest.raises(InvalidReference):
        list(HubClient(srv.origin, _hub_options()).repositories("Bad"))


# ---- 11. invalid names never reach the network ---------------------------------------------------

_DIGEST64 = "sha256:" + "a" * 64
INVALID_CALLS: list[tuple[str, Callable[[RegistryClient], object]]] = [
    ("repo-uppercase", lambda c: c.get_manifest("A/b", "v1")),
    ("repo-dotdot", lambda c: c.get_manifest("a/../b", "v1")),
    ("repo-empty-component", lambda c: c.get_manifest("a//b", "v1")),
    ("repo-trailing-slash", lambda c: c.resolve("a/b/", "v1")),
    ("repo-leading-dash", lambda c: list(c.tags("-a"))),
    ("repo-too-long", lambda c: list(c.tags("a" * 256))),
    ("repo-query", lambda c: c.get_manifest("a/b?x=1", "v1")),
    ("repo-space", lambda c: c.get_manifest("a b", "v1")),
    ("repo-empty", lambda c: list(c.tags(""))),
    ("repo-percent", lambda c: c.get_manifest("a%2fb", "v1")),
    ("tag-slash", lambda c: c.get_manifest("a/b", "v1/../../x")),
    ("tag-leading-dot", lambda c: c.resolve("a/b", ".v1")),
    ("tag-leading-dash", lambda c: c.get_manifest("a/b", "-v1")),
    ("tag-too-long", lambda c: c.get_manifest("a/b", "t" * 129)),
    ("tag-query", lambda c: c.get_manifest("a/b", "v1?x")),
    ("tag-empty", lambda c: c.get_manifest("a/b", "")),
    ("tag-plus", lambda c: c.put_manifest("a/b", "1.0+build", MANIFEST, OCI_MANIFEST)),
    ("digest-short", lambda c: c.get_manifest("a/b", "sha256:" + "a" * 63)),
    ("digest-uppercase", lambda c: c.get_manifest("a/b", "sha256:" + "A" * 64)),
    ("digest-algorithm", lambda c: c.get_manifest("a/b", "md5:" + "a" * 32)),
    ("digest-colon-tag", lambda c: c.resolve("a/b", "v1:x")),
    ("delete-bad-digest", lambda c: c.delete_manifest("a/b", "sha256:xyz")),
    ("delete-bad-repo", lambda c: c.delete_manifest("a/B", _DIGEST64)),
    ("blob-size", lambda c: c.blob_size("a/B", EMPTY_DIGEST)),
    ("blob-range", lambda c: list(c.fetch_blob_range("a b", EMPTY_DIGEST, 0, 10))),
    ("blob", lambda c: list(c.fetch_blob("../x", EMPTY_DIGEST))),
    ("blob-digest", lambda c: list(c.fetch_blob("a/b", Digest.parse("sha256:nothex")))),
    ("delete-blob", lambda c: c.delete_blob("a/b/", EMPTY_DIGEST)),
    ("start-upload", lambda c: c.start_upload("a/b/")),
    ("mount-from", lambda c: c.mount_blob("a/b", EMPTY_DIGEST, "x/../y")),
    ("upload-monolithic", lambda c: c.upload_monolithic("UP", b"{}", EMPTY_DIGEST)),
    ("upload-single-post", lambda c: c.upload_single_post("a/b:latest", b"{}", EMPTY_DIGEST)),
    ("upload-chunked", lambda c: c.upload_chunked("a/b:latest", io.BytesIO(b"{}"), EMPTY_DIGEST, 2)),
    ("push-blob", lambda c: c.push_blob("a/b/../c", io.BytesIO(b"{}"), EMPTY_DIGEST, 2)),
    ("put-manifest-repo", lambda c: c.put_manifest("a/b/", "v1", MANIFEST, OCI_MANIFEST)),
]


@pytest.mark.parametrize("call", [c for _, c in INVALID_CALLS], ids=[name for name, _ in INVALID_CALLS])
def test_invalid_names_raise_before_any_request(srv: FakeServer, call: Callable[[RegistryClient], object]) -> None:
    srv.route("*", ".*", Reply(200, MANIFEST))  # would answer anything

    with pytest.raises(InvalidReference) as info:
        call(make_client(srv))

    assert info.value.errno == errno.EINVAL
    assert srv.requests == []


def test_chunked_body_cut_off_is_a_network_error(srv: FakeServer) -> None:
    """requests raises ChunkedEncodingError (no errno) for a chunked body cut short on a
    buffered request: it must come out as a NetworkError like a dropped connection."""

    def cut(request: Request) -> None:
        request.send_head(200, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        request.write_chunk(b'{"name": "a/b", "tags": ["v1"')
        request.drop()

    srv.route("GET", "/v2/a/b/tags/list", cut)
    with pytest.raises(NetworkError) as info:
        list(make_client(srv).tags(REPO))
    assert info.value.errno == errno.EHOSTUNREACH
