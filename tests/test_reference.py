"""Unit tests for ocifs.reference: SOURCE parsing, registries, names and tags (no network)."""

from __future__ import annotations

import errno
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ocifs.digest import Digest
from ocifs.errors import InvalidReference, OcifsError
from ocifs.reference import (
    DOCKER_HUB,
    DOCKER_HUB_API_HOST,
    DOCKER_HUB_CONFIG_KEY,
    MAX_NAME_LENGTH,
    Registry,
    Source,
    check_reference,
    check_repository,
    check_tag,
    is_valid_component,
    is_valid_repository,
    is_valid_tag,
)

HEX = "0123456789abcdef" * 4
DIGEST = f"sha256:{HEX}"

# The regexes exactly as PROTOCOL.md section 1 writes them: the oracle for the validators.
PROTOCOL_NAME_RE = re.compile(
    r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*"
)
PROTOCOL_TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")

NAME_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-/")
TAG_ALPHABET = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
)

# --------------------------------------------------------------------------- strategies

_alnum = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
_separator = st.sampled_from([".", "_", "__", "-", "--", "---"])


@st.composite
def components(draw: st.DrawFn) -> str:
    """One path component built from the PROTOCOL grammar, independently of ocifs' regex."""
    text = draw(_alnum)
    for _ in range(draw(st.integers(0, 3))):
        text += draw(_separator) + draw(_alnum)
    return text


@st.composite
def names(draw: st.DrawFn) -> str:
    parts = draw(st.lists(components(), min_size=1, max_size=5))
    name = "/".join(parts)
    assume(len(name) <= MAX_NAME_LENGTH)
    return name


@st.composite
def tags(draw: st.DrawFn) -> str:
    first = draw(st.sampled_from(sorted(TAG_ALPHABET - {".", "-"})))
    rest = draw(st.text(alphabet=sorted(TAG_ALPHABET), max_size=127))
    return first + rest


def _insert(draw: st.DrawFn, text: str, char: str) -> str:
    at = draw(st.integers(0, len(text)))
    return text[:at] + char + text[at:]


@st.composite
def names_with_foreign_char(draw: st.DrawFn) -> str:
    name = draw(names())
    bad = draw(st.characters(exclude_characters="".join(NAME_ALPHABET)))
    return _insert(draw, name, bad)


@st.composite
def tags_with_foreign_char(draw: st.DrawFn) -> str:
    tag = draw(tags())
    bad = draw(st.characters(exclude_characters="".join(TAG_ALPHABET)))
    return _insert(draw, tag, bad)


# --------------------------------------------------------------------------- SOURCE forms


@pytest.mark.parametrize(
    "text", ["registry-1.docker.io/docker", "docker.io/docker", "index.docker.io/docker"]
)
def test_docker_hub_aliases_name_a_namespace(text: str) -> None:
    source = Source.parse(text)
    assert source.registry == Registry("docker.io")
    assert source.registry.host == DOCKER_HUB
    assert source.registry.is_docker_hub is True
    assert source.path == "docker"  # a namespace: no library/ without a tag or digest
    assert source.tag is None
    assert source.digest is None
    assert source.is_pinned is False
    assert source.reference is None
    assert str(source) == "docker.io/docker"


def test_docker_hub_aliases_are_case_insensitive() -> None:
    assert Source.parse("Registry-1.Docker.IO/docker").registry == Registry("docker.io")
    assert Registry.parse("INDEX.DOCKER.IO") == Registry("docker.io")


def test_docker_hub_official_image_with_tag_gets_library() -> None:
    source = Source.parse("docker.io/ubuntu:22.04")
    assert source.registry == Registry("docker.io")
    assert source.path == "library/ubuntu"
    assert source.tag == "22.04"
    assert source.digest is None
    assert source.is_pinned is True
    assert source.reference == "22.04"
    assert str(source) == "docker.io/library/ubuntu:22.04"


def test_docker_hub_official_image_with_digest_gets_library() -> None:
    source = Source.parse(f"registry-1.docker.io/alpine@{DIGEST}")
    assert source.registry.host == "docker.io"
    assert source.path == "library/alpine"
    assert source.tag is None
    assert source.digest == Digest("sha256", HEX)
    assert source.reference == DIGEST


def test_docker_hub_two_components_keep_their_namespace() -> None:
    source = Source.parse("docker.io/bitnami/redis:7.2")
    assert source.path == "bitnami/redis"
    assert source.tag == "7.2"
    explicit = Source.parse("docker.io/library/ubuntu:22.04")
    assert explicit.path == "library/ubuntu"


def test_library_only_on_docker_hub() -> None:
    source = Source.parse("ghcr.io/ubuntu:22.04")
    assert source.registry.host == "ghcr.io"
    assert source.path == "ubuntu"
    assert source.tag == "22.04"
    local = Source.parse(f"localhost:5000/alpine@{DIGEST}")
    assert local.path == "alpine"


def test_whole_registry() -> None:
    source = Source.parse("localhost:5000")
    assert source.registry == Registry("localhost:5000")
    assert source.path == ""
    assert source.tag is None and source.digest is None
    assert source.is_pinned is False
    assert str(source) == "localhost:5000"
    # A trailing slash names the same thing.
    assert Source.parse("localhost:5000/") == source


def test_whole_docker_hub() -> None:
    source = Source.parse("docker.io")
    assert source.registry.host == "docker.io"
    assert source.path == ""


@pytest.mark.parametrize(
    ("text", "host", "path"),
    [("ghcr.io/org", "ghcr.io", "org"), ("host.example/a/b", "host.example", "a/b"),
     ("ghcr.io/org/", "ghcr.io", "org")],
)
def test_path_prefix(text: str, host: str, path: str) -> None:
    source = Source.parse(text)
    assert source.registry.host == host
    assert source.path == path
    assert source.tag is None
    assert source.digest is None
    assert source.is_pinned is False


def test_tagged_repository() -> None:
    source = Source.parse("host.example/ns/repo:1.0")
    assert source.registry.host == "host.example"
    assert source.path == "ns/repo"
    assert source.tag == "1.0"
    assert source.digest is None
    assert source.is_pinned is True
    assert source.reference == "1.0"
    assert str(source) == "host.example/ns/repo:1.0"


def test_repository_by_digest() -> None:
    source = Source.parse(f"host.example/ns/repo@{DIGEST}")
    assert source.registry.host == "host.example"
    assert source.path == "ns/repo"
    assert source.tag is None
    assert source.digest == Digest.parse(DIGEST)
    assert source.is_pinned is True
    assert source.reference == DIGEST
    assert str(source) == f"host.example/ns/repo@{DIGEST}"


def test_tag_and_digest_digest_wins() -> None:
    source = Source.parse(f"host.example/ns/repo:1.0@{DIGEST}")
    assert source.path == "ns/repo"
    assert source.tag == "1.0"
    assert source.digest == Digest.parse(DIGEST)
    assert source.reference == DIGEST
    assert str(source) == f"host.example/ns/repo:1.0@{DIGEST}"


def test_ipv6_with_port_and_tag() -> None:
    source = Source.parse("[::1]:5000/a:b")
    assert source.registry == Registry("[::1]:5000")
    assert source.registry.hostname == "::1"
    assert source.registry.is_loopback is True
    assert source.path == "a"
    assert source.tag == "b"
    assert str(source) == "[::1]:5000/a:b"


def test_ipv4_with_port() -> None:
    source = Source.parse("127.0.0.1:5000/x")
    assert source.registry.host == "127.0.0.1:5000"
    assert source.registry.hostname == "127.0.0.1"
    assert source.registry.is_loopback is True
    assert source.path == "x"
    assert source.tag is None


def test_host_is_lower_cased_and_whitespace_stripped() -> None:
    source = Source.parse("  GHCR.io/org/repo:V1  ")
    assert source.registry.host == "ghcr.io"
    assert source.path == "org/repo"
    assert source.tag == "V1"  # tags are case-sensitive


def test_max_length_tag_accepted() -> None:
    tag = "a" * 128
    assert Source.parse(f"host/repo:{tag}").tag == tag


# --------------------------------------------------------------------------- malformed SOURCEs


@pytest.mark.parametrize(
    "text",
    [
        # a scheme
        "https://ghcr.io/org",
        "http://localhost:5000",
        "oci://host/ns/repo:1.0",
        # upper-case repository
        "host/Ns/repo",
        "ghcr.io/org/Repo:1.0",
        "docker.io/Ubuntu:22.04",
        # empty
        "",
        "   ",
        "/ns/repo",
        # bad ports
        "localhost:0",
        "localhost:65536",
        "localhost:99999",
        "localhost:123456",
        "localhost:abc",
        "localhost:/x",
        "localhost:-1/x",
        # tag or digest without a repository
        "localhost:5000/:latest",
        f"localhost:5000@{DIGEST}",
        f"ghcr.io/@{DIGEST}",
        # bad digests
        "host/repo@sha256:abc",
        f"host/repo@sha256:{HEX.upper()}",
        f"host/repo@md5:{HEX[:32]}",
        f"host/repo@{HEX}",
        "host/repo@",
        f"host/repo@sha256:{HEX}0",
        # .. and other non-components
        "host/a/../b",
        "host/../b",
        "host/a/./b",
        "host/a//b",
        "host/a/..",
        # bad tags
        "host/repo:" + "a" * 129,
        "host/repo:",
        "host/repo:.hidden",
        "host/repo:-x",
        "host/repo:a+b",
        # bad hosts
        "-host/repo",
        "ho_st.example/repo",
        "[::g]:5000/a",
        "[::1/a",
        "ho st/repo",
    ],
)
def test_malformed_source_rejected(text: str) -> None:
    with pytest.raises(InvalidReference) as info:
        Source.parse(text)
    assert info.value.errno == errno.EINVAL
    assert str(info.value)  # a message for people


def test_scheme_error_mentions_plain_http() -> None:
    with pytest.raises(InvalidReference, match="--plain-http"):
        Source.parse("http://localhost:5000/x")


def test_too_long_repository_rejected() -> None:
    name = "/".join(["a" * 50] * 6)  # 305 characters
    assert len(name) > MAX_NAME_LENGTH
    with pytest.raises(InvalidReference):
        Source.parse(f"host/{name}")


def test_non_ascii_port_digits_rejected() -> None:
    # U+0665 U+0660 U+0660 U+0660 are ARABIC-INDIC DIGITs: int() reads them as 5000.
    with pytest.raises(InvalidReference):
        Registry.parse("localhost:\u0665\u0660\u0660\u0660")


@given(st.text(max_size=80))
def test_source_parse_raises_only_invalid_reference(text: str) -> None:
    try:
        source = Source.parse(text)
    except InvalidReference:
        return
    assert isinstance(source, Source)
    assert source.path == "" or is_valid_repository(source.path)
    assert source.tag is None or is_valid_tag(source.tag)


@given(names(), st.one_of(st.none(), tags()))
def test_source_round_trip(name: str, tag: str | None) -> None:
    text = f"registry.example.com:443/{name}" + (f":{tag}" if tag else "")
    source = Source.parse(text)
    assert source.registry.host == "registry.example.com:443"
    assert source.path == name
    assert source.tag == tag
    assert source.digest is None
    assert str(source) == text
    assert Source.parse(str(source)) == source


# --------------------------------------------------------------------------- Registry


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:5000", "127.0.0.1", "127.0.0.1:5000", "127.1.2.3:80", "[::1]",
     "[::1]:5000", "foo.localhost:8080"],
)
def test_loopback(host: str) -> None:
    assert Registry.parse(host).is_loopback is True


@pytest.mark.parametrize(
    "host",
    ["10.0.0.1", "10.0.0.1:5000", "example.com", "example.com:5000", "192.168.1.1", "[::2]:5000",
     "docker.io", "ghcr.io", "localhostx.com", "128.0.0.1"],
)
def test_not_loopback(host: str) -> None:
    assert Registry.parse(host).is_loopback is False


@pytest.mark.parametrize(
    ("host", "hostname"),
    [("localhost:5000", "localhost"), ("[::1]:5000", "::1"), ("[::1]", "::1"),
     ("ghcr.io", "ghcr.io"), ("10.1.2.3:443", "10.1.2.3")],
)
def test_hostname(host: str, hostname: str) -> None:
    assert Registry.parse(host).hostname == hostname


def test_api_host_for_docker_hub() -> None:
    for alias in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        registry = Registry.parse(alias)
        assert registry.host == "docker.io"
        assert registry.api_host == DOCKER_HUB_API_HOST == "registry-1.docker.io"
        assert str(registry) == "docker.io"
    assert DOCKER_HUB_CONFIG_KEY == "https://index.docker.io/v1/"


def test_api_host_for_other_registries() -> None:
    assert Registry.parse("ghcr.io").api_host == "ghcr.io"
    assert Registry.parse("localhost:5000").api_host == "localhost:5000"
    assert Registry.parse("[::1]:5000").api_host == "[::1]:5000"
    assert Registry.parse("ghcr.io").is_docker_hub is False
    # Docker Hub on another port is not Docker Hub.
    assert Registry.parse("docker.io:443").is_docker_hub is False


@pytest.mark.parametrize("port", ["1", "80", "65535"])
def test_port_bounds_accepted(port: str) -> None:
    assert Registry.parse(f"localhost:{port}").host == f"localhost:{port}"


@pytest.mark.parametrize("host", ["", "localhost:0", "localhost:65536", "a:b:c", "::1", "[::1]:",
                                  "host/x", "[zz::1]", "host.", ".host"])
def test_bad_registry_rejected(host: str) -> None:
    with pytest.raises(InvalidReference):
        Registry.parse(host)


# --------------------------------------------------------------------------- names and tags


@pytest.mark.parametrize(
    "name",
    ["a", "library/ubuntu", "a/b/c", "a.b", "a_b", "a__b", "a-b", "a---b", "0", "9abc/d-e_f.g",
     "x" * MAX_NAME_LENGTH],
)
def test_valid_names(name: str) -> None:
    assert is_valid_repository(name) is True
    assert check_repository(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "A", "a/B", "a..b", "a___b", ".a", "a.", "_a", "a_", "-a", "a-", "/a", "a/", "a//b",
     "a/../b", "..", ".", "a b", "a:b", "a@b", "a_.b", "x" * (MAX_NAME_LENGTH + 1)],
)
def test_invalid_names(name: str) -> None:
    assert is_valid_repository(name) is False
    with pytest.raises(InvalidReference):
        check_repository(name)


@pytest.mark.parametrize("component", ["a", "a-b", "a.b", "a__b", "abc123"])
def test_valid_components(component: str) -> None:
    assert is_valid_component(component) is True


@pytest.mark.parametrize("component", ["", "a/b", "..", ".", "A", "a_", "-a", "a:b"])
def test_invalid_components(component: str) -> None:
    assert is_valid_component(component) is False


@pytest.mark.parametrize("tag", ["latest", "1.0", "V1", "_x", "0", "a" * 128, "1.0-rc.1_b", "A.-_"])
def test_valid_tags(tag: str) -> None:
    assert is_valid_tag(tag) is True
    assert check_tag(tag) == tag
    assert check_reference(tag) == tag


@pytest.mark.parametrize("tag", ["", ".x", "-x", "a" * 129, "a/b", "a:b", "a b", "a+b", "..", "é"])
def test_invalid_tags(tag: str) -> None:
    assert is_valid_tag(tag) is False
    with pytest.raises(InvalidReference):
        check_tag(tag)


def test_check_reference_digest_and_bad() -> None:
    assert check_reference(DIGEST) == DIGEST
    for bad in ("sha256:abc", f"sha256:{HEX.upper()}", "a:b", "", "..", f"md5:{HEX[:32]}"):
        with pytest.raises(InvalidReference):
            check_reference(bad)


def test_check_reference_refuses_trailing_newline() -> None:
    with pytest.raises(InvalidReference):
        check_reference(DIGEST + "\n")


@given(names())
def test_generated_names_accepted(name: str) -> None:
    assert PROTOCOL_NAME_RE.fullmatch(name) is not None  # the generator follows PROTOCOL.md
    assert is_valid_repository(name) is True
    assert check_repository(name) == name


@given(components())
def test_generated_components_accepted(component: str) -> None:
    assert is_valid_component(component) is True
    assert is_valid_repository(component) is True


@given(names_with_foreign_char())
def test_names_with_foreign_characters_rejected(name: str) -> None:
    assert is_valid_repository(name) is False
    assert is_valid_component(name) is False
    with pytest.raises(InvalidReference):
        check_repository(name)


@given(tags())
def test_generated_tags_accepted(tag: str) -> None:
    assert PROTOCOL_TAG_RE.fullmatch(tag) is not None
    assert is_valid_tag(tag) is True
    assert check_tag(tag) == tag


@given(tags_with_foreign_char())
def test_tags_with_foreign_characters_rejected(tag: str) -> None:
    assert is_valid_tag(tag) is False
    with pytest.raises(InvalidReference):
        check_tag(tag)


@settings(max_examples=300)
@given(st.text(alphabet=sorted(NAME_ALPHABET | {"A", " "}), max_size=40))
def test_name_validator_agrees_with_protocol_regex(text: str) -> None:
    expected = PROTOCOL_NAME_RE.fullmatch(text) is not None and len(text) <= MAX_NAME_LENGTH
    assert is_valid_repository(text) is expected


@settings(max_examples=300)
@given(st.text(alphabet=sorted(TAG_ALPHABET | {"/", ":", "+"}), max_size=140))
def test_tag_validator_agrees_with_protocol_regex(text: str) -> None:
    assert is_valid_tag(text) is (PROTOCOL_TAG_RE.fullmatch(text) is not None)


def test_invalid_reference_is_ocifs_error() -> None:
    with pytest.raises(OcifsError):
        check_tag("")


# ---- Docker short names (docker's rule: a first component with no dot, no port, not localhost) --


@pytest.mark.parametrize(
    ("text", "path", "tag"),
    [
        ("ubuntu", "library/ubuntu", None),
        ("ubuntu:22.04", "library/ubuntu", "22.04"),
        ("redis:7", "library/redis", "7"),  # as docker reads it: a tag, not a port
        ("library/ubuntu", "library/ubuntu", None),
        ("library/ubuntu:22.04", "library/ubuntu", "22.04"),
        ("bitnami/redis:7.2", "bitnami/redis", "7.2"),
        ("bitnami", "library/bitnami", None),
        ("a/b/c", "a/b/c", None),
        ("ubuntu/", "library/ubuntu", None),
    ],
)
def test_docker_short_names_are_docker_hub(text: str, path: str, tag: str | None) -> None:
    source = Source.parse(text)
    assert source.registry.is_docker_hub
    assert (source.path, source.tag) == (path, tag)
    assert source.is_pinned is (tag is not None)


def test_docker_short_name_with_digest() -> None:
    source = Source.parse(f"ubuntu@{DIGEST}")
    assert (source.registry.host, source.path, source.reference) == ("docker.io", "library/ubuntu", DIGEST)


@pytest.mark.parametrize(
    ("text", "host", "path"),
    [
        ("localhost", "localhost", ""),
        ("localhost/x", "localhost", "x"),
        ("localhost:5000", "localhost:5000", ""),
        ("127.0.0.1:5000", "127.0.0.1:5000", ""),
        ("ghcr.io", "ghcr.io", ""),
        ("myhost.lan/team/app", "myhost.lan", "team/app"),
        ("registry:5000/app", "registry:5000", "app"),  # a port makes it a host
        ("registry:5000/", "registry:5000", ""),  # how a dot-less host with a port is named alone
        ("[::1]:5000/x", "[::1]:5000", "x"),
        ("MyHost/x", "myhost", "x"),  # upper case is never a repository: a host
    ],
)
def test_hosts_are_not_short_names(text: str, host: str, path: str) -> None:
    source = Source.parse(text)
    assert (source.registry.host, source.path) == (host, path)


@pytest.mark.parametrize(
    "text",
    ["docker.io/library/ubuntu:22.04", "index.docker.io/library/ubuntu:22.04",
     "registry-1.docker.io/library/ubuntu:22.04", "docker.io/ubuntu:22.04", "ubuntu:22.04",
     "library/ubuntu:22.04", "DOCKER.IO/library/ubuntu:22.04"],
)
def test_docker_hub_spellings_agree(text: str) -> None:
    assert Source.parse(text) == Source(Registry("docker.io"), "library/ubuntu", "22.04")
    assert str(Source.parse(text)) == "docker.io/library/ubuntu:22.04"


def test_explicit_hub_host_keeps_namespaces() -> None:
    """Only a short name gets `library/`: `docker.io/bitnami` stays the namespace it always was."""
    assert Source.parse("docker.io/bitnami").path == "bitnami"
    assert Source.parse("bitnami").path == "library/bitnami"


@pytest.mark.parametrize("text", ["ubuntu:bad!tag", "ubuntu:", "Ubuntu/x:y:z", "ubuntu@sha256:short"])
def test_malformed_short_names_rejected(text: str) -> None:
    with pytest.raises(InvalidReference):
        Source.parse(text)
