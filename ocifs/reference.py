"""Parse SOURCE (`HOST[:PORT][/PATH][:TAG|@DIGEST]`, or a Docker Hub short name such as
`ubuntu:22.04`), repository names and tags.

Everything here is pure: invalid input raises InvalidReference before any request is made.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .digest import Digest
from .errors import InvalidReference

DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DOCKER_HUB_API_HOST = "registry-1.docker.io"
# The key Docker's config.json uses for Docker Hub credentials.
DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_COMPONENT_RE = re.compile(_COMPONENT)
_TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_HOSTNAME_RE = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?))*"
)
# Clients commonly cap host + "/" + name at 255 characters (distribution-spec).
MAX_NAME_LENGTH = 255


def is_valid_repository(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and _NAME_RE.fullmatch(name) is not None


def is_valid_component(component: str) -> bool:
    """Whether `component` can be one `/`-separated part of a repository name."""
    return _COMPONENT_RE.fullmatch(component) is not None


def is_valid_tag(tag: str) -> bool:
    return _TAG_RE.fullmatch(tag) is not None


def check_repository(name: str) -> str:
    if not is_valid_repository(name):
        raise InvalidReference(f"invalid repository name: {name!r}")
    return name


def check_tag(tag: str) -> str:
    if not is_valid_tag(tag):
        raise InvalidReference(f"invalid tag: {tag!r}")
    return tag


def check_reference(ref: str) -> str:
    """A manifest reference is a tag or a digest."""
    if ":" in ref:
        Digest.parse(ref)
        return ref
    return check_tag(ref)


def is_docker_short_name(text: str) -> bool:
    """Whether SOURCE `text` (digest already removed) names Docker Hub without naming a host.

    Docker's rule: the first `/`-separated component is a registry host when it holds a dot
    or a colon, is `localhost`, or has upper-case letters; otherwise the name is on Docker Hub.
    Without a `/`, ocifs also reads whole registries (`localhost:5000`, `ghcr.io`): the part
    before any `:` decides (a dot, `localhost`, upper case, `[v6]` make it a host), so
    `ubuntu`, `ubuntu:22.04` and `redis:7` are Docker Hub's `library/...` as in docker. A
    dot-less host with a port is then written with a `/`: `registry:5000/`.
    """
    first, slash, _ = text.partition("/")
    name = first if slash else first.partition(":")[0]
    if not name or name == "localhost" or "." in name or name != name.lower() or name.startswith("["):
        return False
    return not (slash and ":" in first)  # `host:port/...` names a host


@dataclass(frozen=True)
class Registry:
    """A registry host as the user names it: `host`, `host:port` or `[v6]:port`, lower-cased.

    Docker Hub's aliases all become `docker.io`; `api_host` is where its API lives.
    """

    host: str

    @classmethod
    def parse(cls, text: str) -> Registry:
        host = text.lower()
        if host in DOCKER_HUB_ALIASES:
            return cls(DOCKER_HUB)
        match = re.fullmatch(r"(\[[0-9a-f:.]+\]|[^:\[\]/]+)(?::([0-9]{1,5}))?", host)
        if match is None:
            raise InvalidReference(f"invalid registry host: {text!r}")
        name, port = match.groups()
        if name.startswith("["):
            try:
                ipaddress.IPv6Address(name[1:-1])
            except ValueError:
                raise InvalidReference(f"invalid registry host: {text!r}") from None
        elif _HOSTNAME_RE.fullmatch(name) is None:
            raise InvalidReference(f"invalid registry host: {text!r}")
        if port is not None and not 0 < int(port) < 65536:
            raise InvalidReference(f"invalid port in registry host: {text!r}")
        return cls(host)

    @property
    def is_docker_hub(self) -> bool:
        return self.host == DOCKER_HUB

    @property
    def api_host(self) -> str:
        """The host[:port] that serves the distribution API."""
        return DOCKER_HUB_API_HOST if self.is_docker_hub else self.host

    @property
    def hostname(self) -> str:
        """The host without port or IPv6 brackets."""
        if self.host.startswith("["):
            return self.host[1 : self.host.index("]")]
        return self.host.rsplit(":", 1)[0] if ":" in self.host else self.host

    @property
    def is_loopback(self) -> bool:
        """localhost, 127.0.0.0/8 and ::1: where plain HTTP is the default."""
        name = self.hostname
        if name == "localhost" or name.endswith(".localhost"):
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return self.host


@dataclass(frozen=True)
class Source:
    """What `ocifs mount SOURCE` names: a registry, a path under it, maybe one tag or digest.

    `path` is "" for a whole registry. With a tag or digest, `path` is a repository name
    (`library/` already added on Docker Hub); without, it is a namespace or repository prefix.
    """

    registry: Registry
    path: str = ""
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> Source:
        original = text
        if "://" in text:
            raise InvalidReference(
                f"invalid SOURCE {original!r}: give HOST[/PATH][:TAG|@DIGEST] without a scheme"
                " (plain HTTP is --plain-http)"
            )
        text = text.strip()
        if not text:
            raise InvalidReference("empty SOURCE")
        digest: Digest | None = None
        if "@" in text:
            text, _, digest_text = text.rpartition("@")
            try:
                digest = Digest.parse(digest_text)
            except InvalidReference as exc:
                raise InvalidReference(f"invalid SOURCE {original!r}: {exc}") from None
        host_text, _, path = text.partition("/")
        short = is_docker_short_name(text)
        if short:  # `ubuntu:22.04`, `library/ubuntu`, `bitnami/redis`: Docker Hub, as docker reads them
            host_text, path = DOCKER_HUB, text
        tag: str | None = None
        path = path.rstrip("/")
        if path:
            last = path.rsplit("/", 1)[-1]
            if ":" in last:
                path, _, tag = path.rpartition(":")
                if not is_valid_tag(tag):
                    raise InvalidReference(f"invalid tag {tag!r} in SOURCE {original!r}")
        try:
            registry = Registry.parse(host_text)
        except InvalidReference as exc:
            raise InvalidReference(f"invalid SOURCE {original!r}: {exc}") from None
        if (tag is not None or digest is not None) and not path:
            raise InvalidReference(f"invalid SOURCE {original!r}: a tag or digest needs a repository")
        if path and not is_valid_repository(path):
            raise InvalidReference(
                f"invalid SOURCE {original!r}: {path!r} is not a repository path"
                " (lower-case letters, digits and separators)"
            )
        if registry.is_docker_hub and path and "/" not in path and (tag or digest or short):
            # Docker's official images; `docker.io/NAME` without a tag stays a namespace.
            path = f"library/{path}"
        return cls(registry, path, tag, digest)

    @property
    def is_pinned(self) -> bool:
        """Whether SOURCE names one tag or manifest rather than a directory of repositories."""
        return self.tag is not None or self.digest is not None

    @property
    def reference(self) -> str | None:
        """The manifest reference (digest wins over tag, as docker does), or None."""
        if self.digest is not None:
            return str(self.digest)
        return self.tag

    def __str__(self) -> str:
        text = self.registry.host
        if self.path:
            text += "/" + self.path
        if self.tag:
            text += ":" + self.tag
        if self.digest:
            text += "@" + str(self.digest)
        return text
