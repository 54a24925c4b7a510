"""Registry authentication: challenges, token requests, the token cache, credentials.

Credentials are only sent where it is safe: over HTTPS, or over plain HTTP to the
registry's own host when the user chose plain HTTP for it. They are never logged
(`Credentials.__repr__` hides the secret).

Credentials come from the command line or from Docker's `config.json` (`auths`,
`credHelpers`, `credsStore` and the `docker-credential-*` helper protocol): see
`docker_config_credentials` and `credential_lookup`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import requests

from ..errors import AuthError, OcifsError
from ..reference import DOCKER_HUB_ALIASES, DOCKER_HUB_CONFIG_KEY, Registry

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
    value: str = field(repr=False)
    expires_at: float = 0.0  # time.monotonic()

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

    def allow_plain_http(self, hostname: str | None) -> None:
        """The registry itself turned out to speak plain HTTP (a loopback registry)."""
        self._plain_http_host = hostname

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


# ---- Docker config.json and credential helpers ----------------------------------------------

DOCKER_CONFIG_FILE = "config.json"
# The username a credential helper answers with when its secret is an identity token.
IDENTITY_TOKEN_USERNAME = "<token>"
CREDENTIAL_HELPER_PREFIX = "docker-credential-"
# A helper's answer is a small JSON object; anything far larger is not one.
_MAX_HELPER_OUTPUT = 1 << 20
_NOT_FOUND_MESSAGE = "credentials not found"


def docker_config_dir(config_dir: str | None = None) -> str:
    """Where Docker's config lives: `config_dir`, else `$DOCKER_CONFIG`, else `~/.docker`."""
    if config_dir:
        return config_dir
    env = os.environ.get("DOCKER_CONFIG")
    if env:
        return env
    return os.path.join(os.path.expanduser("~"), ".docker")


def config_key_host(key: str) -> str:
    """The host[:port] a config.json key names, lower-cased: `https://Host:5000/v1/` -> `host:5000`."""
    text = key.strip()
    lower = text.lower()
    for scheme in ("https://", "http://"):
        if lower.startswith(scheme):
            text = text[len(scheme):]
            break
    return text.split("/", 1)[0].lower()


def config_key_matches(key: str, registry: Registry) -> bool:
    """Whether a config.json key (`auths`, `credHelpers`) is meant for `registry`."""
    host = config_key_host(key)
    if registry.is_docker_hub:
        return host in DOCKER_HUB_ALIASES
    return host == registry.host


def _matching_keys(section: Mapping[str, Any], registry: Registry) -> list[str]:
    """The keys of `section` that name `registry`, the most exact first, then in file order."""
    preferred = DOCKER_HUB_CONFIG_KEY if registry.is_docker_hub else registry.host
    keys = [k for k in section if isinstance(k, str) and config_key_matches(k, registry)]
    keys.sort(key=lambda k: (k != preferred, k.lower() != preferred))  # stable: file order otherwise
    return keys


def docker_config_credentials(
    registry: Registry, *, config_dir: str | None = None, timeout: float = 10
) -> Credentials | None:
    """Credentials for `registry` from Docker's config.json, or None.

    `credHelpers[host]` wins over `credsStore`; a helper that has nothing (or is missing, or
    fails) leaves the inline `auths` entry, if it holds credentials. Never raises: a missing
    or malformed file, a bad entry or a failing helper means no credentials, with a warning
    that never contains a secret.
    """
    try:
        return _docker_config_credentials(registry, docker_config_dir(config_dir), timeout,
                                          explicit=bool(config_dir or os.environ.get("DOCKER_CONFIG")))
    except Exception as exc:  # noqa: BLE001 - never let a credentials lookup break a mount
        log.warning("%s: Docker config credentials lookup failed (%s); going on without",
                    registry, type(exc).__name__)
        return None


def _docker_config_credentials(
    registry: Registry, directory: str, timeout: float, *, explicit: bool
) -> Credentials | None:
    path = os.path.join(directory, DOCKER_CONFIG_FILE)
    config = _load_docker_config(path, explicit=explicit)
    if config is None:
        return None

    auths = config.get("auths")
    if auths is None:
        auths = {}
    elif not isinstance(auths, dict):
        log.warning("%s: \"auths\" is not an object; ignoring it", path)
        auths = {}
    auth_keys = _matching_keys(auths, registry)

    helper: str | None = None
    server_url: str | None = None
    cred_helpers = config.get("credHelpers")
    if cred_helpers is not None and not isinstance(cred_helpers, dict):
        log.warning("%s: \"credHelpers\" is not an object; ignoring it", path)
        cred_helpers = None
    if cred_helpers:
        for key in _matching_keys(cred_helpers, registry):
            name = cred_helpers[key]
            if isinstance(name, str) and name:
                helper, server_url = name, key
                break
            log.warning("%s: credHelpers entry for %s is not a helper name; ignoring it", path, key)
    if helper is None:
        store = config.get("credsStore")
        if isinstance(store, str) and store:
            helper = store
            server_url = auth_keys[0] if auth_keys else None
        elif store is not None and store != "":
            log.warning("%s: \"credsStore\" is not a helper name; ignoring it", path)

    if helper is not None:
        if registry.is_docker_hub:
            server_url = DOCKER_HUB_CONFIG_KEY
        elif server_url is None:
            server_url = registry.host
        found = run_credential_helper(helper, server_url, timeout=timeout)
        if found is not None:
            log.debug("%s: using credentials of user %s from docker-credential-%s",
                      registry, found.username, helper)
            return found

    for key in auth_keys:
        found = _auth_entry_credentials(auths[key], f"{path}: auths[{key!r}]")
        if found is not None:
            log.debug("%s: using credentials of user %s from %s", registry, found.username, path)
            return found
    return None


def _load_docker_config(path: str, *, explicit: bool) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        # No Docker config is the usual case: only worth a warning when one was asked for.
        if explicit:
            log.warning("%s: no such file; no Docker config credentials", path)
        else:
            log.debug("%s: no such file; no Docker config credentials", path)
        return None
    except OSError as exc:
        log.warning("%s: cannot read it (%s); no Docker config credentials", path, exc.strerror or exc)
        return None
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        log.warning("%s: not UTF-8; no Docker config credentials", path)
        return None
    except json.JSONDecodeError as exc:
        # exc.msg and the position only: never the document (it holds secrets).
        log.warning("%s: not valid JSON (%s at line %d column %d); no Docker config credentials",
                    path, exc.msg, exc.lineno, exc.colno)
        return None
    if not isinstance(data, dict):
        log.warning("%s: not a JSON object; no Docker config credentials", path)
        return None
    return data


def _auth_entry_credentials(entry: Any, where: str) -> Credentials | None:
    """The credentials of one `auths` entry: `auth` (base64 user:pass), `username`/`password`,
    `identitytoken`. An empty entry (the marker `credsStore` leaves) has none."""
    if not isinstance(entry, dict):
        log.warning("%s is not an object; ignoring it", where)
        return None
    username: str | None = None
    password: str | None = None
    auth = entry.get("auth")
    if auth:
        if not isinstance(auth, str):
            log.warning("%s: \"auth\" is not a string; ignoring it", where)
        else:
            decoded = _decode_auth(auth)
            if decoded is None:
                log.warning("%s: \"auth\" is not base64 of user:password; ignoring it", where)
            else:
                username, password = decoded
    if username is None:
        user_field, pass_field = entry.get("username"), entry.get("password")
        if isinstance(user_field, str) and user_field:
            username = user_field
            password = pass_field if isinstance(pass_field, str) else ""
    token = entry.get("identitytoken")
    if isinstance(token, str) and token:
        return Credentials(username or IDENTITY_TOKEN_USERNAME, token, identity_token=True)
    if username is None or not (username or password):
        return None
    return Credentials(username, password or "")


def _decode_auth(auth: str) -> tuple[str, str] | None:
    text = "".join(auth.split())
    text += "=" * (-len(text) % 4)  # some writers drop the padding
    try:
        raw = base64.b64decode(text, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    username, sep, password = raw.partition(":")
    if not sep:
        return None
    return username, password.strip("\x00")


def run_credential_helper(name: str, server_url: str, *, timeout: float = 10) -> Credentials | None:
    """Ask `docker-credential-<name> get` for `server_url`'s credentials.

    The server URL goes on stdin, the answer `{"ServerURL","Username","Secret"}` comes on
    stdout; Username `<token>` marks Secret as an identity token. Not found, a missing helper,
    a failure or a timeout all give None (a warning except for "not found"). The secret is
    never on a command line and never logged.
    """
    program = CREDENTIAL_HELPER_PREFIX + name
    if "/" in name or os.sep in name or name in (".", ".."):
        log.warning("credential helper name %r is not a plain name; not running it", name)
        return None
    path = shutil.which(program)
    if path is None:
        log.warning("credential helper %s is not on PATH; no credentials from it", program)
        return None
    try:
        process = subprocess.Popen(
            [path, "get"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: a timeout kills what it started too
            close_fds=True,
        )
    except OSError as exc:
        log.warning("credential helper %s could not run (%s)", program, exc.strerror or exc)
        return None
    try:
        stdout, stderr = process.communicate(server_url.encode("utf-8"), timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        log.warning("credential helper %s did not answer within %gs; no credentials from it",
                    program, timeout)
        return None
    except BaseException:
        _kill_group(process)
        raise
    if process.returncode != 0:
        message = _helper_message(stdout, stderr)
        if _NOT_FOUND_MESSAGE in (stdout + stderr).decode("utf-8", "replace").lower():
            log.debug("credential helper %s has no credentials for %s", program, server_url)
        else:
            log.warning("credential helper %s failed for %s (exit status %d)%s", program,
                        server_url, process.returncode, f": {message}" if message else "")
        return None
    if len(stdout) > _MAX_HELPER_OUTPUT:
        log.warning("credential helper %s answered with too much output; ignoring it", program)
        return None
    try:
        answer: Any = json.loads(stdout.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        log.warning("credential helper %s answered with something that is not JSON; ignoring it",
                    program)
        return None
    if not isinstance(answer, dict):
        log.warning("credential helper %s answered with something that is not a JSON object",
                    program)
        return None
    username, secret = answer.get("Username"), answer.get("Secret")
    if not isinstance(username, str) or not isinstance(secret, str):
        log.warning("credential helper %s answered without a Username and Secret", program)
        return None
    if not secret:
        log.debug("credential helper %s has no secret for %s", program, server_url)
        return None
    if username == IDENTITY_TOKEN_USERNAME:
        return Credentials(IDENTITY_TOKEN_USERNAME, secret, identity_token=True)
    return Credentials(username, secret)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.kill()
    except ProcessLookupError:
        pass
    process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def _helper_message(stdout: bytes, stderr: bytes) -> str:
    """The first line of a failing helper's message (stdout, else stderr), short, never
    JSON-shaped, and with any secret its output shows cut out: a helper that failed after
    printing its answer must not get its secret logged."""
    secrets: list[str] = []
    try:
        printed: Any = json.loads(stdout.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        printed = None
    if isinstance(printed, dict):
        secrets = [v for k, v in printed.items() if k != "ServerURL" and k != "Username"
                   and isinstance(v, str) and v]
    for output in (stdout, stderr):
        text = output.decode("utf-8", "replace").strip()
        if not text or text.startswith(("{", "[")):
            continue
        line = text.splitlines()[0]
        for secret in secrets:
            line = line.replace(secret, "<redacted>")
        return line if len(line) <= 200 else line[:200] + "..."
    return ""


def credential_lookup(
    registry: Registry,
    explicit: Credentials | None,
    *,
    config_dir: str | None = None,
    timeout: float = 10,
) -> CredentialLookup:
    """The credentials for `registry`, as the CLI finds them: `explicit` (the command line)
    first, else Docker's config, looked up once on first use and remembered (also when it
    found nothing). Safe to call from several threads."""
    if explicit is not None:
        return lambda: explicit
    lock = threading.Lock()
    result: list[Credentials | None] = []  # empty until looked up

    def lookup() -> Credentials | None:
        with lock:  # held over the lookup on purpose: others wait for its answer
            if not result:
                result.append(
                    docker_config_credentials(registry, config_dir=config_dir, timeout=timeout)
                )
            return result[0]

    return lookup


# ---- storing in Docker's config (what `docker login` / `docker logout` write) ---------------
# Reading and storing stay in this one module, so both agree on keys, helpers and aliases.


class CredentialStoreError(OcifsError):
    """Credentials could not be stored or erased (a helper failed, config.json unwritable)."""


def config_server_key(registry: Registry) -> str:
    """The key `docker login` stores `registry` under: Docker Hub's legacy URL, else host[:port]."""
    return DOCKER_HUB_CONFIG_KEY if registry.is_docker_hub else registry.host


def credential_helper_for(registry: Registry, *, config_dir: str | None = None) -> str | None:
    """The helper name `docker login` would store `registry`'s credentials with:
    `credHelpers[host]`, else `credsStore`, else None (inline `auths`)."""
    config = _read_config_for_update(_config_path(config_dir))
    helpers = config.get("credHelpers")
    if isinstance(helpers, dict):
        for key in _matching_keys(helpers, registry):
            if isinstance(helpers[key], str) and helpers[key]:
                return str(helpers[key])
    store = config.get("credsStore")
    return store if isinstance(store, str) and store else None


def store_credentials(
    registry: Registry, credentials: Credentials, *, config_dir: str | None = None, timeout: float = 10
) -> str:
    """Store as `docker login` does; returns where (`docker-credential-NAME` or the file path).

    With a helper, the secret goes to `docker-credential-NAME store` on stdin and config.json
    gets only the empty `auths` marker Docker leaves; else `auths[key] = {"auth": base64}`.
    Every other key of config.json is kept; the file is replaced atomically.
    """
    path = _config_path(config_dir)
    key = config_server_key(registry)
    helper = credential_helper_for(registry, config_dir=config_dir)
    config = _read_config_for_update(path)
    auths = config.get("auths")
    if not isinstance(auths, dict):
        auths = {}
    # Other spellings of the same registry (`http://host`, Hub aliases) would shadow or
    # outlive the new entry: docker login replaces, so drop them.
    for other in _matching_keys(auths, registry):
        del auths[other]
    if helper is not None:
        username = IDENTITY_TOKEN_USERNAME if credentials.identity_token else credentials.username
        payload = json.dumps({"ServerURL": key, "Username": username, "Secret": credentials.password})
        _helper_call(helper, "store", payload, timeout)
        auths[key] = {}
        where = CREDENTIAL_HELPER_PREFIX + helper
    else:
        raw = f"{credentials.username}:{credentials.password}".encode()
        entry: dict[str, str] = {"auth": base64.b64encode(raw).decode("ascii")}
        if credentials.identity_token:
            entry = {"identitytoken": credentials.password}
        auths[key] = entry
        where = path
    config["auths"] = auths
    _write_config(path, config)
    return where


def erase_credentials(registry: Registry, *, config_dir: str | None = None, timeout: float = 10) -> bool:
    """Remove `registry`'s credentials as `docker logout` does: from its helper (if any) and
    every matching `auths` entry. True when something was removed."""
    path = _config_path(config_dir)
    helper = credential_helper_for(registry, config_dir=config_dir)
    config = _read_config_for_update(path)
    removed = False
    if helper is not None:
        removed = _helper_call(helper, "erase", config_server_key(registry), timeout, missing_ok=True)
    auths = config.get("auths")
    if isinstance(auths, dict):
        keys = _matching_keys(auths, registry)
        for key in keys:
            del auths[key]
        if keys:
            removed = True
            _write_config(path, config)
    return removed


def _config_path(config_dir: str | None) -> str:
    return os.path.join(docker_config_dir(config_dir), DOCKER_CONFIG_FILE)


def _read_config_for_update(path: str) -> dict[str, Any]:
    """config.json as an object to edit ({} when missing). Unlike the lenient reader, a file
    that cannot be parsed stops us: rewriting it would lose what it holds."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CredentialStoreError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        # Never quote the document: it holds secrets.
        raise CredentialStoreError(f"{path}: not valid JSON; fix or move it first") from None
    if not isinstance(data, dict):
        raise CredentialStoreError(f"{path}: not a JSON object; fix or move it first")
    return data


def _write_config(path: str, config: Mapping[str, Any]) -> None:
    """Replace config.json atomically: a temporary file beside it (0600; the mode of the file
    it replaces, if any), fsync, rename. A symlinked config.json is written through the link,
    as Docker does. The directory is created 0700."""
    target = os.path.realpath(path)
    directory = os.path.dirname(target)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        try:
            mode = os.stat(target).st_mode & 0o777
        except FileNotFoundError:
            mode = 0o600
        data = (json.dumps(config, indent="\t") + "\n").encode("utf-8")
        temp = f"{target}.ocifs-{os.getpid()}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fchmod(f.fileno(), mode)
                os.fsync(f.fileno())
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
    except OSError as exc:
        raise CredentialStoreError(f"{path}: cannot write it ({exc.strerror or exc})") from None


def _helper_call(name: str, action: str, payload: str, timeout: float, *, missing_ok: bool = False) -> bool:
    """Run `docker-credential-NAME store|erase` with `payload` on stdin. True on success;
    with `missing_ok`, False when the helper had nothing; else CredentialStoreError. The
    payload (which may hold the secret) is never on a command line and never in a message."""
    program = CREDENTIAL_HELPER_PREFIX + name
    if "/" in name or os.sep in name or name in (".", ".."):
        raise CredentialStoreError(f"credential helper name {name!r} is not a plain name")
    path = shutil.which(program)
    if path is None:
        raise CredentialStoreError(f"credential helper {program} is not on PATH")
    try:
        process = subprocess.Popen([path, action], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
    except OSError as exc:
        raise CredentialStoreError(f"credential helper {program} could not run ({exc.strerror or exc})") from None
    try:
        stdout, stderr = process.communicate(payload.encode("utf-8"), timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        raise CredentialStoreError(f"credential helper {program} did not answer within {timeout:g}s") from None
    except BaseException:
        _kill_group(process)
        raise
    if process.returncode == 0:
        return True
    if missing_ok and _NOT_FOUND_MESSAGE in (stdout + stderr).decode("utf-8", "replace").lower():
        return False
    message = _helper_message(stdout, stderr)
    for secret in _secrets_in(payload):
        message = message.replace(secret, "<redacted>")
    raise CredentialStoreError(f"credential helper {program} {action} failed (exit status "
                               f"{process.returncode}){': ' + message if message else ''}")


def _secrets_in(payload: str) -> list[str]:
    try:
        data: Any = json.loads(payload)
    except json.JSONDecodeError:
        return []
    secret = data.get("Secret") if isinstance(data, dict) else None
    return [secret] if isinstance(secret, str) and secret else []
