"""Credentials from Docker's config.json: `auths` keys in every form, Docker Hub aliases,
`credHelpers` over `credsStore` over inline `auths`, identity tokens, malformed files, and real
`docker-credential-*` helper programs on PATH (found, not found, failing, missing, hanging).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ocifs.reference import DOCKER_HUB_CONFIG_KEY, Registry
from ocifs.registry import auth as auth_module
from ocifs.registry.auth import (
    Credentials,
    config_key_host,
    credential_lookup,
    docker_config_credentials,
    run_credential_helper,
)

from .helpers import process_alive, wait_until

REG = Registry.parse("reg.example.com")
HUB = Registry.parse("docker.io")
USER = "alice"
SECRET = "pa55:w0rd-Zq8xT"  # a colon inside on purpose
CREDS = Credentials(USER, SECRET)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def auth_entry(user: str = USER, password: str = SECRET) -> dict[str, str]:
    return {"auth": b64(f"{user}:{password}")}


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME of our own, no DOCKER_CONFIG: the user's real Docker config never leaks in."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    return home


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty $DOCKER_CONFIG directory."""
    directory = tmp_path / "docker-config"
    directory.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(directory))
    return directory


WriteConfig = Callable[[Any], Path]


@pytest.fixture
def write_config(config_dir: Path) -> WriteConfig:
    def write(config: Any) -> Path:
        path = config_dir / "config.json"
        path.write_text(config if isinstance(config, str) else json.dumps(config))
        return path

    return write


# ---- helper programs ------------------------------------------------------------------------


class Helper:
    """A `docker-credential-NAME` program on PATH: logs its argv and stdin, answers from a table."""

    def __init__(self, bin_dir: Path, name: str) -> None:
        self.name = name
        self.path = bin_dir / f"docker-credential-{name}"
        self.log = bin_dir / f"{name}.log"

    def calls(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


MakeHelper = Callable[..., Helper]

_PY_HELPER = """#!{python}
import json, sys, time
url = sys.stdin.read()
with open({log!r}, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "stdin": url}}) + "\\n")
time.sleep({delay!r})
answers = {answers!r}
if url in answers:
    sys.stdout.write(json.dumps(answers[url]))
    sys.exit(0)
sys.stdout.write("credentials not found in native keychain\\n")
sys.exit(1)
"""


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "bin"
    directory.mkdir()
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ.get('PATH', '')}")
    return directory


@pytest.fixture
def make_helper(bin_dir: Path) -> MakeHelper:
    def make(name: str, answers: dict[str, dict[str, str]] | None = None, *,
             script: str | None = None, delay: float = 0) -> Helper:
        helper = Helper(bin_dir, name)
        if script is None:
            script = _PY_HELPER.format(python=sys.executable, log=str(helper.log),
                                       answers=answers or {}, delay=delay)
        helper.path.write_text(script)
        helper.path.chmod(helper.path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return helper

    return make


def answer(user: str = USER, secret: str = SECRET, url: str = "") -> dict[str, str]:
    return {"ServerURL": url, "Username": user, "Secret": secret}


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ---- where config.json lives ----------------------------------------------------------------


def test_reads_docker_config_env(write_config: WriteConfig) -> None:
    write_config({"auths": {"reg.example.com": auth_entry()}})
    assert docker_config_credentials(REG) == CREDS


def test_reads_home_docker_config(isolated_home: Path) -> None:
    (isolated_home / ".docker").mkdir()
    (isolated_home / ".docker" / "config.json").write_text(
        json.dumps({"auths": {"reg.example.com": auth_entry()}})
    )
    assert docker_config_credentials(REG) == CREDS


def test_docker_config_env_wins_over_home(isolated_home: Path, write_config: WriteConfig) -> None:
    (isolated_home / ".docker").mkdir()
    (isolated_home / ".docker" / "config.json").write_text(
        json.dumps({"auths": {"reg.example.com": auth_entry("home-user", "home-pw")}})
    )
    write_config({"auths": {"reg.example.com": auth_entry()}})
    assert docker_config_credentials(REG) == CREDS


def test_config_dir_argument_wins_over_env(tmp_path: Path, write_config: WriteConfig) -> None:
    write_config({"auths": {"reg.example.com": auth_entry("env-user", "env-pw")}})
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"auths": {"reg.example.com": auth_entry()}}))
    assert docker_config_credentials(REG, config_dir=str(other)) == CREDS


# ---- auths keys -----------------------------------------------------------------------------


@pytest.mark.parametrize("key", [
    "reg.example.com",
    "REG.Example.COM",
    "https://reg.example.com",
    "https://reg.example.com/",
    "https://reg.example.com/v1/",
    "https://reg.example.com/v2/",
    "http://reg.example.com",
    "HTTPS://reg.example.com/some/path",
    "reg.example.com/v1/",
    " reg.example.com ",
])
def test_auths_key_forms(write_config: WriteConfig, key: str) -> None:
    write_config({"auths": {key: auth_entry()}})
    assert docker_config_credentials(REG) == CREDS


@pytest.mark.parametrize("key", [
    "https://reg.example.com:5000/v1/",
    "http://reg.example.com:5000",
    "reg.example.com:5000",
    "reg.example.com:5000/path",
])
def test_auths_key_with_port(write_config: WriteConfig, key: str) -> None:
    write_config({"auths": {key: auth_entry()}})
    assert docker_config_credentials(Registry.parse("reg.example.com:5000")) == CREDS


@pytest.mark.parametrize("key", [
    "reg.example.com:5000",  # another port is another registry
    "https://reg.example.com:5000/v1/",
    "other.example.com",
    "reg.example.com.evil.test",
    "https://evil.test/reg.example.com",
    "evil.test/reg.example.com",
    "example.com",
    "https://index.docker.io/v1/",
])
def test_auths_key_for_another_host_does_not_match(write_config: WriteConfig, key: str) -> None:
    write_config({"auths": {key: auth_entry()}})
    assert docker_config_credentials(REG) is None


def test_port_registry_does_not_take_portless_key(write_config: WriteConfig) -> None:
    write_config({"auths": {"reg.example.com": auth_entry()}})
    assert docker_config_credentials(Registry.parse("reg.example.com:5000")) is None


def test_ipv6_registry_key(write_config: WriteConfig) -> None:
    write_config({"auths": {"https://[::1]:5000/v1/": auth_entry()}})
    assert docker_config_credentials(Registry.parse("[::1]:5000")) == CREDS


@pytest.mark.parametrize("key,host", [
    ("https://Reg.Example.com:5000/v1/", "reg.example.com:5000"),
    ("http://host", "host"),
    ("host/v1/", "host"),
    ("https://index.docker.io/v1/", "index.docker.io"),
])
def test_config_key_host(key: str, host: str) -> None:
    assert config_key_host(key) == host


def test_exact_key_wins_over_other_forms(write_config: WriteConfig) -> None:
    write_config({"auths": {
        "https://reg.example.com/v1/": auth_entry("url-user", "url-pw"),
        "reg.example.com": auth_entry(),
    }})
    assert docker_config_credentials(REG) == CREDS


def test_first_matching_key_with_credentials_is_used(write_config: WriteConfig) -> None:
    write_config({"auths": {
        "https://reg.example.com": {},  # a credsStore marker: no credentials inline
        "http://reg.example.com/v1/": auth_entry(),
        "reg.example.com/v2/": auth_entry("later", "later-pw"),
    }})
    assert docker_config_credentials(REG) == CREDS


# ---- Docker Hub -----------------------------------------------------------------------------


@pytest.mark.parametrize("key", [
    "https://index.docker.io/v1/",
    "index.docker.io",
    "docker.io",
    "registry-1.docker.io",
    "https://registry-1.docker.io/v2/",
    "https://docker.io",
])
@pytest.mark.parametrize("host", ["docker.io", "index.docker.io", "registry-1.docker.io"])
def test_docker_hub_aliases(write_config: WriteConfig, key: str, host: str) -> None:
    write_config({"auths": {key: auth_entry()}})
    assert docker_config_credentials(Registry.parse(host)) == CREDS


def test_docker_hub_canonical_key_wins(write_config: WriteConfig) -> None:
    write_config({"auths": {
        "docker.io": auth_entry("alias-user", "alias-pw"),
        "registry-1.docker.io": auth_entry("alias2-user", "alias2-pw"),
        DOCKER_HUB_CONFIG_KEY: auth_entry(),
    }})
    assert docker_config_credentials(HUB) == CREDS


def test_docker_hub_key_is_not_for_other_registries(write_config: WriteConfig) -> None:
    write_config({"auths": {DOCKER_HUB_CONFIG_KEY: auth_entry(), "docker.io": auth_entry()}})
    assert docker_config_credentials(Registry.parse("ghcr.io")) is None


# ---- auths entry forms ----------------------------------------------------------------------


def test_username_password_fields(write_config: WriteConfig) -> None:
    write_config({"auths": {"reg.example.com": {"username": USER, "password": SECRET}}})
    assert docker_config_credentials(REG) == CREDS


def test_auth_field_wins_over_username_password(write_config: WriteConfig) -> None:
    write_config({"auths": {"reg.example.com": {**auth_entry(), "username": "x", "password": "y"}}})
    assert docker_config_credentials(REG) == CREDS


def test_auth_without_padding_and_with_whitespace(write_config: WriteConfig) -> None:
    encoded = b64("bob:pw1").rstrip("=")
    assert len(encoded) % 4  # really unpadded
    write_config({"auths": {"reg.example.com": {"auth": f" {encoded[:3]}\n{encoded[3:]} "}}})
    assert docker_config_credentials(REG) == Credentials("bob", "pw1")


def test_auth_password_trailing_nuls_are_trimmed(write_config: WriteConfig) -> None:
    # Docker trims NUL bytes from the decoded password; some writers pad with them.
    write_config({"auths": {"reg.example.com": {"auth": b64("bob:pw\x00\x00")}}})
    assert docker_config_credentials(REG) == Credentials("bob", "pw")


def test_non_ascii_password(write_config: WriteConfig) -> None:
    write_config({"auths": {"reg.example.com": auth_entry("bob", "s3cret-pässword")}})
    assert docker_config_credentials(REG) == Credentials("bob", "s3cret-pässword")


def test_identity_token_with_username(write_config: WriteConfig) -> None:
    write_config({"auths": {"reg.example.com": {"auth": b64(f"{USER}:"), "identitytoken": "tok-123"}}})
    found = docker_config_credentials(REG)
    assert found == Credentials(USER, "tok-123", identity_token=True)


def test_identity_token_without_username(write_config: WriteConfig) -> None:
    write_config({"auths": {"reg.example.com": {"identitytoken": "tok-123"}}})
    assert docker_config_credentials(REG) == Credentials("<token>", "tok-123", identity_token=True)


def test_empty_entry_has_no_credentials(write_config: WriteConfig) -> None:
    write_config({"auths": {"reg.example.com": {}}})
    assert docker_config_credentials(REG) is None


def test_no_auths_at_all(write_config: WriteConfig) -> None:
    write_config({"experimental": "enabled"})
    assert docker_config_credentials(REG) is None


# ---- malformed and missing files ------------------------------------------------------------


@pytest.mark.parametrize("content,expect", [
    ('{"auths": {"reg.example.com": {"auth": "', "not valid JSON"),
    ("", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"auths": ["reg.example.com"]}', '"auths" is not an object'),
    ('{"auths": {"reg.example.com": "YWxpY2U6cHc="}}', "is not an object"),
    ('{"auths": {"reg.example.com": {"auth": "!!!not base64!!!"}}}', "not base64"),
    (json.dumps({"auths": {"reg.example.com": {"auth": b64("no-colon-here")}}}), "not base64"),
    (json.dumps({"auths": {"reg.example.com": {"auth": base64.b64encode(b"\xff\xfe:x").decode()}}}),
     "not base64"),
    ('{"auths": {"reg.example.com": {"auth": 42}}}', "not a string"),
    ('{"credHelpers": "fake", "auths": {}}', '"credHelpers" is not an object'),
    ('{"credsStore": 7}', '"credsStore" is not a helper name'),
])
def test_malformed_config_gives_none_with_warning(
    write_config: WriteConfig, caplog: pytest.LogCaptureFixture, content: str, expect: str
) -> None:
    write_config(content)
    assert docker_config_credentials(REG) is None
    assert any(expect in message for message in warnings(caplog)), warnings(caplog)


def test_config_not_utf8(config_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    (config_dir / "config.json").write_bytes(b'{"auths": {"\xff": {}}}')
    assert docker_config_credentials(REG) is None
    assert any("not UTF-8" in message for message in warnings(caplog))


def test_config_with_utf8_bom(config_dir: Path) -> None:
    (config_dir / "config.json").write_bytes(
        b"\xef\xbb\xbf" + json.dumps({"auths": {"reg.example.com": auth_entry()}}).encode()
    )
    assert docker_config_credentials(REG) == CREDS


def test_config_is_a_directory(config_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    (config_dir / "config.json").mkdir()
    assert docker_config_credentials(REG) is None
    assert any("cannot read" in message for message in warnings(caplog))


def test_bad_entry_falls_through_to_another_matching_key(
    write_config: WriteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    write_config({"auths": {"reg.example.com": {"auth": "%%%"}, "https://reg.example.com": auth_entry()}})
    assert docker_config_credentials(REG) == CREDS
    assert any("not base64" in message for message in warnings(caplog))


def test_missing_default_config_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    assert docker_config_credentials(REG) is None
    assert warnings(caplog) == []
    assert any("no such file" in r.getMessage() for r in caplog.records)


def test_missing_config_asked_for_warns(config_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert docker_config_credentials(REG) is None
    assert any("no such file" in message for message in warnings(caplog))


def test_missing_config_dir_argument_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert docker_config_credentials(REG, config_dir=str(tmp_path / "nowhere")) is None
    assert any("no such file" in message for message in warnings(caplog))


def test_unexpected_error_is_no_credentials(
    write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write_config({"auths": {"reg.example.com": auth_entry()}})

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"oops {SECRET}")

    monkeypatch.setattr(auth_module, "_auth_entry_credentials", broken)
    caplog.set_level(logging.DEBUG)
    assert docker_config_credentials(REG) is None
    assert any("RuntimeError" in message for message in warnings(caplog))
    assert SECRET not in caplog.text


# ---- credential helpers ---------------------------------------------------------------------


def test_cred_helper_protocol(write_config: WriteConfig, make_helper: MakeHelper) -> None:
    helper = make_helper("fake", {"reg.example.com": answer(url="reg.example.com")})
    write_config({"credHelpers": {"reg.example.com": "fake"}})
    assert docker_config_credentials(REG) == CREDS
    # Exactly `get`, the server URL on stdin (no newline), nothing else.
    assert helper.calls() == [{"argv": ["get"], "stdin": "reg.example.com"}]


def test_shell_script_helper(write_config: WriteConfig, make_helper: MakeHelper, bin_dir: Path) -> None:
    log_file = bin_dir / "sh.log"
    make_helper("shell", script=f"""#!/bin/sh
url=$(cat)
printf '%s %s\\n' "$*" "$url" >> '{log_file}'
if [ "$url" = "https://reg.example.com" ]; then
  printf '{{"ServerURL":"%s","Username":"shelly","Secret":"sh-secret"}}' "$url"
else
  echo "credentials not found in native keychain"
  exit 1
fi
""")
    write_config({"credsStore": "shell", "auths": {"https://reg.example.com": {}}})
    assert docker_config_credentials(REG) == Credentials("shelly", "sh-secret")
    assert log_file.read_text() == "get https://reg.example.com\n"


def test_cred_helper_overrides_auths(write_config: WriteConfig, make_helper: MakeHelper) -> None:
    make_helper("fake", {"reg.example.com": answer()})
    write_config({
        "auths": {"reg.example.com": auth_entry("inline", "inline-pw")},
        "credHelpers": {"reg.example.com": "fake"},
    })
    assert docker_config_credentials(REG) == CREDS


def test_cred_helpers_override_creds_store(write_config: WriteConfig, make_helper: MakeHelper) -> None:
    helper = make_helper("fake", {"reg.example.com": answer()})
    store = make_helper("store", {"reg.example.com": answer("store-user", "store-pw")})
    write_config({"credsStore": "store", "credHelpers": {"reg.example.com": "fake"}})
    assert docker_config_credentials(REG) == CREDS
    assert len(helper.calls()) == 1
    assert store.calls() == []


def test_cred_helpers_for_another_host_leave_creds_store(
    write_config: WriteConfig, make_helper: MakeHelper
) -> None:
    other = make_helper("fake", {"reg.example.com": answer("wrong", "wrong-pw")})
    make_helper("store", {"reg.example.com": answer()})
    write_config({"credsStore": "store", "credHelpers": {"other.example.com": "fake"}})
    assert docker_config_credentials(REG) == CREDS
    assert other.calls() == []


def test_cred_helpers_key_forms(write_config: WriteConfig, make_helper: MakeHelper) -> None:
    helper = make_helper("fake", {"https://reg.example.com/v1/": answer()})
    write_config({"credHelpers": {"https://reg.example.com/v1/": "fake"}})
    assert docker_config_credentials(REG) == CREDS
    assert helper.calls()[0]["stdin"] == "https://reg.example.com/v1/"  # the key as written


def test_creds_store_overrides_auths(write_config: WriteConfig, make_helper: MakeHelper) -> None:
    make_helper("store", {"reg.example.com": answer()})
    write_config({"credsStore": "store", "auths": {"reg.example.com": auth_entry("inline", "inline-pw")}})
    assert docker_config_credentials(REG) == CREDS


def test_creds_store_without_auths_entry_gets_host(
    write_config: WriteConfig, make_helper: MakeHelper
) -> None:
    store = make_helper("store", {"reg.example.com:5000": answer()})
    write_config({"credsStore": "store"})
    assert docker_config_credentials(Registry.parse("reg.example.com:5000")) == CREDS
    assert store.calls() == [{"argv": ["get"], "stdin": "reg.example.com:5000"}]


def test_creds_store_gets_auths_key_as_written(write_config: WriteConfig, make_helper: MakeHelper) -> None:
    store = make_helper("store", {"https://reg.example.com": answer()})
    write_config({"credsStore": "store", "auths": {"https://reg.example.com": {}}})
    assert docker_config_credentials(REG) == CREDS
    assert store.calls()[0]["stdin"] == "https://reg.example.com"


def test_empty_creds_store_is_unset(write_config: WriteConfig, caplog: pytest.LogCaptureFixture) -> None:
    write_config({"credsStore": "", "auths": {"reg.example.com": auth_entry()}})
    assert docker_config_credentials(REG) == CREDS
    assert warnings(caplog) == []


@pytest.mark.parametrize("helper_key", ["docker.io", "index.docker.io", DOCKER_HUB_CONFIG_KEY,
                                        "registry-1.docker.io"])
def test_docker_hub_helper_gets_canonical_url(
    write_config: WriteConfig, make_helper: MakeHelper, helper_key: str
) -> None:
    helper = make_helper("fake", {DOCKER_HUB_CONFIG_KEY: answer()})
    write_config({"credHelpers": {helper_key: "fake"}})
    assert docker_config_credentials(HUB) == CREDS
    assert helper.calls() == [{"argv": ["get"], "stdin": DOCKER_HUB_CONFIG_KEY}]


def test_docker_hub_creds_store_gets_canonical_url(
    write_config: WriteConfig, make_helper: MakeHelper
) -> None:
    store = make_helper("desktop", {DOCKER_HUB_CONFIG_KEY: answer()})
    write_config({"credsStore": "desktop", "auths": {"docker.io": {}}})
    assert docker_config_credentials(Registry.parse("registry-1.docker.io")) == CREDS
    assert store.calls()[0]["stdin"] == DOCKER_HUB_CONFIG_KEY


def test_helper_identity_token(write_config: WriteConfig, make_helper: MakeHelper) -> None:
    make_helper("fake", {"reg.example.com": answer("<token>", "refresh-tok")})
    write_config({"credHelpers": {"reg.example.com": "fake"}})
    assert docker_config_credentials(REG) == Credentials("<token>", "refresh-tok", identity_token=True)


def test_helper_not_found_is_none_without_warning(
    write_config: WriteConfig, make_helper: MakeHelper, caplog: pytest.LogCaptureFixture
) -> None:
    helper = make_helper("fake", {})  # exits 1: "credentials not found in native keychain"
    write_config({"credHelpers": {"reg.example.com": "fake"}})
    assert docker_config_credentials(REG) is None
    assert len(helper.calls()) == 1
    assert warnings(caplog) == []


def test_helper_not_found_leaves_inline_auths(write_config: WriteConfig, make_helper: MakeHelper) -> None:
    make_helper("store", {})
    write_config({"credsStore": "store", "auths": {"reg.example.com": auth_entry()}})
    assert docker_config_credentials(REG) == CREDS


def test_helper_failure_warns(
    write_config: WriteConfig, make_helper: MakeHelper, caplog: pytest.LogCaptureFixture
) -> None:
    make_helper("broken", script="#!/bin/sh\necho 'cannot reach the keyring daemon' >&2\nexit 3\n")
    write_config({"credHelpers": {"reg.example.com": "broken"}})
    assert docker_config_credentials(REG) is None
    assert any("exit status 3" in m and "keyring daemon" in m for m in warnings(caplog)), warnings(caplog)


def test_missing_helper_warns(write_config: WriteConfig, caplog: pytest.LogCaptureFixture,
                              bin_dir: Path) -> None:
    write_config({"credHelpers": {"reg.example.com": "nothere"}})
    assert docker_config_credentials(REG) is None
    assert any("docker-credential-nothere" in m and "PATH" in m for m in warnings(caplog))


def test_missing_creds_store_helper_leaves_inline_auths(
    write_config: WriteConfig, caplog: pytest.LogCaptureFixture, bin_dir: Path
) -> None:
    write_config({"credsStore": "desktop-not-installed", "auths": {"reg.example.com": auth_entry()}})
    assert docker_config_credentials(REG) == CREDS
    assert any("docker-credential-desktop-not-installed" in m for m in warnings(caplog))


def test_helper_not_executable_is_missing(
    write_config: WriteConfig, bin_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (bin_dir / "docker-credential-noexec").write_text("#!/bin/sh\necho '{}'\n")  # mode 644
    write_config({"credHelpers": {"reg.example.com": "noexec"}})
    assert docker_config_credentials(REG) is None
    assert any("docker-credential-noexec" in m for m in warnings(caplog))


@pytest.mark.parametrize("name", ["../evil", "/bin/sh", "a/b"])
def test_helper_name_with_a_path_is_not_run(
    write_config: WriteConfig, make_helper: MakeHelper, caplog: pytest.LogCaptureFixture,
    bin_dir: Path, name: str
) -> None:
    # A program that would answer if it were run through the path in the name.
    (bin_dir / "docker-credential-a").mkdir()
    evil = make_helper("a/b", {"reg.example.com": answer()}) if name == "a/b" else None
    write_config({"credsStore": name})
    assert docker_config_credentials(REG) is None
    assert any("not a plain name" in m for m in warnings(caplog))
    if evil is not None:
        assert evil.calls() == []


@pytest.mark.parametrize("output", ["not json at all", "[1, 2]", '{"Username": "u"}',
                                    '{"Username": 1, "Secret": "s"}'])
def test_helper_bad_answer_warns(
    write_config: WriteConfig, make_helper: MakeHelper, caplog: pytest.LogCaptureFixture, output: str
) -> None:
    make_helper("odd", script=f"#!/bin/sh\ncat >/dev/null\nprintf '%s' '{output}'\n")
    write_config({"credHelpers": {"reg.example.com": "odd"}})
    assert docker_config_credentials(REG) is None
    assert warnings(caplog)


def test_helper_empty_secret_is_none(write_config: WriteConfig, make_helper: MakeHelper) -> None:
    make_helper("fake", {"reg.example.com": answer("", "")})
    write_config({"credHelpers": {"reg.example.com": "fake"}})
    assert docker_config_credentials(REG) is None


def test_helper_that_ignores_stdin(write_config: WriteConfig, make_helper: MakeHelper) -> None:
    make_helper("deaf", script='#!/bin/sh\nprintf \'{"Username":"u","Secret":"s"}\'\n')
    write_config({"credHelpers": {"reg.example.com": "deaf"}})
    assert docker_config_credentials(REG) == Credentials("u", "s")


def test_hanging_helper_times_out_and_is_killed(
    write_config: WriteConfig, make_helper: MakeHelper, bin_dir: Path,
    caplog: pytest.LogCaptureFixture
) -> None:
    pid_file = bin_dir / "sleep.pid"
    # The shell starts a grandchild that holds stdout open: killing the shell alone would leave it.
    make_helper("hang", script=f"#!/bin/sh\nsleep 60 &\necho $! > '{pid_file}'\nwait\n")
    write_config({"credHelpers": {"reg.example.com": "hang"}})
    start = time.monotonic()
    assert docker_config_credentials(REG, timeout=1) is None
    elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 5
    assert any("did not answer within 1s" in m for m in warnings(caplog))
    pid = int(pid_file.read_text())
    wait_until(lambda: not process_alive(pid), timeout=5)
    assert not process_alive(pid), "the helper's child outlived the timeout"


def test_run_credential_helper_directly(make_helper: MakeHelper) -> None:
    make_helper("fake", {"https://x.example/": answer()})
    assert run_credential_helper("fake", "https://x.example/") == CREDS
    assert run_credential_helper("fake", "https://y.example/") is None


# ---- secrets never logged -------------------------------------------------------------------


def test_secrets_never_logged(
    config_dir: Path, make_helper: MakeHelper, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "Sup3r-S3cret-Val"
    token = "Id3ntity-T0ken-Val"
    encoded = b64(f"{USER}:{secret}")
    path = config_dir / "config.json"
    make_helper("good", {"good.example.com": answer(USER, secret)})
    make_helper("tok", {"tok.example.com": answer("<token>", token)})
    # Fails after printing its answer, on stdout and stderr: neither may reach the log.
    make_helper("leaky", script=f"""#!/bin/sh
cat >/dev/null
printf '{{"Username":"u","Secret":"{secret}"}}'
echo 'error {secret}' >&2
exit 2
""")
    # Fails after printing a truncated answer: nothing to parse, so nothing to redact by.
    make_helper("leaky3", script=f"""#!/bin/sh
cat >/dev/null
printf '{{"Username":"u","Secret":"{secret}'
exit 1
""")
    make_helper("leaky2", script=f"#!/bin/sh\ncat >/dev/null\necho '[\"{secret}\"]'\nexit 0\n")
    make_helper("slow", script=f"#!/bin/sh\necho '{secret}'\nsleep 30\n")

    scenarios: list[tuple[str, Registry, Credentials | None]] = [
        (json.dumps({"auths": {"reg.example.com": {"auth": encoded}}}), REG, Credentials(USER, secret)),
        (json.dumps({"auths": {"reg.example.com": {"username": USER, "password": secret}}}), REG,
         Credentials(USER, secret)),
        (json.dumps({"auths": {"reg.example.com": {"identitytoken": token}}}), REG,
         Credentials("<token>", token, identity_token=True)),
        (json.dumps({"credHelpers": {"good.example.com": "good"}}), Registry.parse("good.example.com"),
         Credentials(USER, secret)),
        (json.dumps({"credHelpers": {"tok.example.com": "tok"}}), Registry.parse("tok.example.com"),
         Credentials("<token>", token, identity_token=True)),
        (json.dumps({"credHelpers": {"reg.example.com": "leaky"}}), REG, None),
        (json.dumps({"credHelpers": {"reg.example.com": "leaky2"}}), REG, None),
        (json.dumps({"credHelpers": {"reg.example.com": "leaky3"}}), REG, None),
        (json.dumps({"credHelpers": {"reg.example.com": "slow"}}), REG, None),
        # Truncated JSON, a bad base64 value that is itself the secret, an auth without a colon.
        ('{"auths": {"reg.example.com": {"auth": "' + encoded, REG, None),
        (json.dumps({"auths": {"reg.example.com": {"auth": secret + "!"}}}), REG, None),
        (json.dumps({"auths": {"reg.example.com": {"auth": b64(secret)}}}), REG, None),
        (json.dumps({"auths": {"reg.example.com": [secret]}}), REG, None),
        (json.dumps({"auths": {"reg.example.com": {"auth": encoded}}, "credsStore": {"x": secret}}),
         REG, Credentials(USER, secret)),
    ]
    for content, registry, expected in scenarios:
        path.write_text(content)
        assert docker_config_credentials(registry, timeout=1) == expected, content
        lookup = credential_lookup(registry, None, timeout=1)
        found = lookup()
        assert found == expected
        log.debug("the lookup returned %r", found)  # Credentials' repr hides the secret
    assert caplog.records, "nothing was logged: the test would prove nothing"
    for needle in (secret, token, encoded):
        assert needle not in caplog.text
        for record in caplog.records:
            assert needle not in repr(record.args)


log = logging.getLogger(__name__)


# ---- credential_lookup ----------------------------------------------------------------------


def test_lookup_explicit_credentials_first(write_config: WriteConfig, make_helper: MakeHelper) -> None:
    helper = make_helper("fake", {"reg.example.com": answer("config-user", "config-pw")})
    write_config({"credHelpers": {"reg.example.com": "fake"}})
    explicit = Credentials("cli-user", "cli-pw")
    lookup = credential_lookup(REG, explicit)
    assert lookup() is explicit
    assert lookup() is explicit
    assert helper.calls() == []


def test_lookup_falls_back_to_docker_config_lazily_once(
    write_config: WriteConfig, make_helper: MakeHelper
) -> None:
    helper = make_helper("fake", {"reg.example.com": answer()})
    write_config({"credHelpers": {"reg.example.com": "fake"}})
    lookup = credential_lookup(REG, None)
    assert helper.calls() == []  # nothing until asked
    assert lookup() == CREDS
    assert lookup() == CREDS
    assert len(helper.calls()) == 1


def test_lookup_caches_no_credentials(write_config: WriteConfig, make_helper: MakeHelper) -> None:
    helper = make_helper("fake", {})
    path = write_config({"credHelpers": {"reg.example.com": "fake"}})
    lookup = credential_lookup(REG, None)
    assert lookup() is None
    path.write_text(json.dumps({"auths": {"reg.example.com": auth_entry()}}))
    assert lookup() is None  # looked up once: a mount does not change identity midway
    assert len(helper.calls()) == 1


def test_lookup_passes_config_dir_and_timeout(tmp_path: Path, make_helper: MakeHelper) -> None:
    other = tmp_path / "cfg"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"auths": {"reg.example.com": auth_entry()}}))
    assert credential_lookup(REG, None, config_dir=str(other))() == CREDS


def test_lookup_is_thread_safe(write_config: WriteConfig, make_helper: MakeHelper) -> None:
    helper = make_helper("fake", {"reg.example.com": answer()}, delay=0.5)
    write_config({"credHelpers": {"reg.example.com": "fake"}})
    lookup = credential_lookup(REG, None)
    barrier = threading.Barrier(8)
    results: list[Credentials | None] = []
    results_lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        found = lookup()
        with results_lock:
            results.append(found)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [CREDS] * 8
    assert len(helper.calls()) == 1

