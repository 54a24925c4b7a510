"""Registry authentication: challenges, token requests, the token cache, credentials.

Credentials are only sent where it is safe: over HTTPS, or over plain HTTP to the
registry's own host when the user chose plain HTTP for it. They are never logged
(`Credentials.__repr__` hides the secret).
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import requests

from ..errors import AuthError

log = logging.getLogger(__name__)

# Token lifetime when the server does not say, and the floor the spec sets.
DEFAULT_TOKEN_LIFETIME = 60.0
# Refresh a token this long before it expires, so it does not expire in flight.
TOKEN_REFRESH_MARGIN = 10.0
CLIENT_ID = "ocifs"


@dataclass(frozen=True)
class Credentials:
    """A username and secret. `identity_token` marks the secret as an OAuth2 refresh token."""

    username: str
    password: str = field(repr=False)
    identity_token: bool = False

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class Challenge:
    """One challenge of a `WWW-Authenticate` header: scheme (lower case) and its parameters."""

    scheme: str
    params: Mapping[str, str]


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a `WWW-Authenticate` value (RFC 7235): several challenges, quoted strings with
    commas and escapes inside them, tokens and token68 values."""
    challenges: list[Challenge] = []
    pos, n = 0, len(header)

    def skip(chars: str) -> None:
        nonlocal pos
        while pos < n and header[pos] in chars:
            pos += 1

    def token() -> str:
        nonlocal pos
        start = pos
        while pos < n and header[pos] not in ' \t,="':
            pos += 1
        return header[start:pos]

    def quoted() -> str:
        nonlocal pos
        pos += 1  # opening quote
        out: list[str] = []
        while pos < n and header[pos] != '"':
            if header[pos] == "\\" and pos + 1 < n:
                pos += 1
            out.append(header[pos])
            pos += 1
        pos += 1  # closing quote (or end)
        return "".join(out)

    current: Challenge | None = None
    while pos < n:
        skip(" \t,")
        if pos >= n:
            break
        start = pos
        name = token()
        skip(" \t")
        if pos < n and header[pos] == "=" and current is not None:
            # A parameter of the current challenge (or a token68 that ends in "=").
            pos += 1
            skip(" \t")
            value = quoted() if pos < n and header[pos] == '"' else token()
            params = dict(current.params)
            params[name.lower()] = value
            current = Challenge(current.scheme, params)
            challenges[-1] = current
            continue
        if not name:
            pos = start + 1  # stray character: skip it
            continue
        current = Challenge(name.lower(), {})
        challenges.append(current)
    return challenges


@dataclass
class _Token:
    value: str
    expires_at: float  # time.monotonic()

    def valid(self) -> bool:
        return time.monotonic() < self.expires_at - TOKEN_REFRESH_MARGIN


# The HTTP function the authenticator uses for token requests, supplied by the transport
# (so token requests get the same timeouts, retries and TLS settings): (method, url,
# headers, form data) -> response.
TokenSender = Callable[[str, str, dict[str, str], dict[str, str] | None], requests.Response]
CredentialLookup = Callable[[], Credentials | None]


class Authenticator:
    """Authorization for one registry: remembers its challenge and caches tokens per scope set.

    `plain_http_host` is the registry's hostname when the user chose plain HTTP: only that
    host may then receive credentials without TLS.
    """

    def __init__(
        self,
        credentials: CredentialLookup,
        *,
        plain_http_host: str | None = None,
    ) -> None:
        self._credentials = credentials
        self._plain_http_host = plain_http_host
        self._mutex = threading.Lock()  # guards the dicts below; never held over I/O
        self._challenges: dict[str, Challenge] = {}  # origin -> challenge
        self._tokens: dict[tuple[str, frozenset[str]], _Token] = {}

    def may_send_credentials(self, url: str) -> bool:
        parts = urlsplit(url)
        if parts.scheme == "https":
            return True
        return parts.scheme == "http" and parts.hostname == self._plain_http_host

    def authorization(
        self, url: str, scopes: Iterable[str], send: TokenSender
    ) -> str | None:
        """The Authorization header for a request to `url` needing `scopes`, if one is known.

        With a known Bearer challenge and no valid token, a token is fetched first, which
        saves the round trip of an unauthenticated request that would be refused.
        """
        origin = _origin(url)
        with self._mutex:
            challenge = self._challenges.get(origin)
            if challenge is None:
                return None
            key = (origin, frozenset(scopes))
            token = self._tokens.get(key)
        if challenge.scheme == "basic":
            return self._basic(url)
        if token is not None and token.valid():
            return f"Bearer {token.value}"
        token = self._fetch_token(url, challenge, key[1], send)
        with self._mutex:
            self._tokens[key] = token
        return f"Bearer {token.value}"

    def handle_challenge(
        self, url: str, response: requests.Response, scopes: Iterable[str], send: TokenSender
    ) -> bool:
        """Learn from a 401. True when a retry with new authorization may succeed."""
        header = response.headers.get("WWW-Authenticate", "")
        challenges = parse_challenges(header)
        chosen = next((c for c in challenges if c.scheme == "bearer"), None) or next(
            (c for c in challenges if c.scheme == "basic"), None
        )
        if chosen is None:
            return False
        origin = _origin(url)
        scope_set = frozenset(scopes)
        if chosen.scheme == "bearer":
            # The challenge may name the scope the server wants; ask for ours and that one.
            wanted = chosen.params.get("scope")
            if wanted:
                scope_set = scope_set | frozenset(wanted.split(" "))
        with self._mutex:
            previous = self._challenges.get(origin)
            self._challenges[origin] = chosen
            self._tokens.pop((origin, frozenset(scopes)), None)
        if chosen.scheme == "basic":
            # Retry only when we have credentials we were not already sending.
            return previous is None and self._basic(url) is not None
        token = self._fetch_token(url, chosen, scope_set, send)
        with self._mutex:
            self._tokens[(origin, frozenset(scopes))] = token
        return True

    def _basic(self, url: str) -> str | None:
        credentials = self._credentials()
        if credentials is None or credentials.identity_token:
            return None
        if not self.may_send_credentials(url):
            raise AuthError(
                f"refusing to send credentials over plain HTTP to {urlsplit(url).netloc}"
            )
        return credentials.basic_header()

    def _fetch_token(
        self, url: str, challenge: Challenge, scopes: frozenset[str], send: TokenSender
    ) -> _Token:
        realm = challenge.params.get("realm")
        if not realm:
            raise AuthError(f"{_origin(url)}: Bearer challenge without a realm")
        realm = urljoin(url, realm)
        service = challenge.params.get("service")
        credentials = self._credentials()
        if credentials is not None and not self.may_send_credentials(realm):
            raise AuthError(
                f"refusing to send credentials over plain HTTP to token server {urlsplit(realm).netloc}"
            )
        response: requests.Response | None = None
        if credentials is not None and credentials.identity_token:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": credentials.password,
                "client_id": CLIENT_ID,
                "scope": " ".join(sorted(scopes)),
            }
            if service:
                form["service"] = service
            response = send("POST", realm, {}, form)
            if response.status_code in (404, 405):
                response = None  # no OAuth2 endpoint: fall back to GET
        if response is None:
            query: list[tuple[str, str]] = []
            if service:
                query.append(("service", service))
            query.extend(("scope", s) for s in sorted(scopes))
            token_url = realm + ("&" if "?" in realm else "?") + urlencode(query) if query else realm
            headers: dict[str, str] = {}
            if credentials is not None and not credentials.identity_token:
                headers["Authorization"] = credentials.basic_header()
            response = send("GET", token_url, headers, None)
        if response.status_code in (401, 403):
            raise AuthError(
                f"{urlsplit(realm).netloc} refused the credentials"
                if credentials
                else f"{urlsplit(realm).netloc} refused an anonymous token"
            )
        if response.status_code != 200:
            raise AuthError(f"token request to {urlsplit(realm).netloc} failed: HTTP {response.status_code}")
        return _parse_token(response)


def _parse_token(response: requests.Response) -> _Token:
    try:
        data: Any = response.json()
    except ValueError:
        raise AuthError("token server answered with something that is not JSON") from None
    if not isinstance(data, dict):
        raise AuthError("token server answered with something that is not a JSON object")
    value = data.get("token") or data.get("access_token")
    if not isinstance(value, str) or not value:
        raise AuthError("token server answered without a token")
    lifetime = data.get("expires_in")
    if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) or lifetime <= 0:
        lifetime = DEFAULT_TOKEN_LIFETIME
    # The spec sets 60 seconds as the minimum a client should assume.
    lifetime = max(float(lifetime), DEFAULT_TOKEN_LIFETIME)
    return _Token(value, time.monotonic() + lifetime)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
