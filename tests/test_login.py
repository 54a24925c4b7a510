"""`ocifs login` / `ocifs logout` as users run them, against the real htpasswd registry: stored as
`docker login` stores (config.json `auths`, or a real `docker-credential-*` helper program on
PATH), read back by ocifs's own lookup, by `ocifs mount` and by oras-py; refused credentials
store nothing; passwords asked for on a real terminal (a pty), never read from a pipe by surprise.
"""

from __future__ import annotations

import base64
import json
import os
import pty
import select
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ocifs.reference import DOCKER_HUB_CONFIG_KEY, Registry
from ocifs.registry.auth import Credentials, docker_config_credentials, store_credentials

from .conftest import Mounter
from .content import push_artifact
from .helpers import run
from .mounts import is_mounted, ocifs, unmount
from .registry_server import RunningRegistry

HELPER = "ocifstest"
_HELPER_SCRIPT = """#!{python}
# A credential helper speaking Docker's protocol: store/get/erase/list, secrets in a JSON file.
import json, os, sys
db = {db!r}
data = json.load(open(db)) if os.path.exists(db) else {{}}
action = sys.argv[1]
raw = sys.stdin.read()
if action == "store":
    item = json.loads(raw)
    data[item["ServerURL"]] = {{"Username": item["Username"], "Secret": item["Secret"]}}
elif action == "get":
    url = raw.strip()
    if url not in data:
        print("credentials not found in native keychain")
        sys.exit(1)
    print(json.dumps({{"ServerURL": url, **data[url]}}))
elif action == "erase":
    url = raw.strip()
    if url not in data:
        print("credentials not found in native keychain")
        sys.exit(1)
    del data[url]
elif action == "list":
    print(json.dumps({{url: item["Username"] for url, item in data.items()}}))
    sys.exit(0)
else:
    sys.exit(2)
with open(db + ".tmp", "w") as f:
    json.dump(data, f)
os.replace(db + ".tmp", db)
"""


@pytest.fixture
def docker_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME and DOCKER_CONFIG=$HOME/.docker (not created yet): where docker and oras-py look."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DOCKER_CONFIG", str(home / ".docker"))
    return home / ".docker"


@pytest.fixture
def helper_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`docker-credential-ocifstest` on PATH; returns the JSON file it keeps secrets in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    db = tmp_path / "helper-secrets.json"
    script = bin_dir / f"docker-credential-{HELPER}"
    script.write_text(_HELPER_SCRIPT.format(python=sys.executable, db=str(db)))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return db


def login(server: RunningRegistry, password: str | None = None, *extra: str) -> subprocess.CompletedProcess[str]:
    return ocifs("login", "-u", server.username or "", "--password-stdin", *extra, server.host,
                 stdin=(server.password if password is None else password) + "\n", timeout=60)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ocifs: "), result.stderr
    return lines[0]


def config_of(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((directory / "config.json").read_text())
    return data


# ---- config.json ----------------------------------------------------------------------------


def test_login_stores_in_config_json_and_everyone_reads_it(auth_registry: RunningRegistry, docker_home: Path,
                                                           auth_client: Any, repo: str, tmp_path: Path) -> None:
    result = login(auth_registry)
    assert result.returncode == 0, result.stderr
    assert "Login Succeeded" in result.stdout
    assert auth_registry.password not in result.stdout + result.stderr
    config = config_of(docker_home)
    token = base64.b64encode(f"{auth_registry.username}:{auth_registry.password}".encode()).decode()
    assert config == {"auths": {auth_registry.host: {"auth": token}}}
    assert stat.S_IMODE((docker_home / "config.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(docker_home.stat().st_mode) == 0o700
    # ocifs's own lookup
    registry = Registry.parse(auth_registry.host)
    assert docker_config_credentials(registry) == Credentials(auth_registry.username or "",
                                                              auth_registry.password or "")
    # oras-py, reading ~/.docker/config.json with no login of its own
    import oras.client

    push_artifact(auth_client, repo, "1", {"a.txt": b"pushed"})
    reader = oras.client.OrasClient(hostname=auth_registry.host, insecure=True, auth_backend="basic")
    # get_manifest loads ~/.docker/config.json (get_tags would not)
    assert reader.get_manifest(f"{auth_registry.host}/{repo}:1")["layers"]
    # logout: gone for everyone
    result = ocifs("logout", auth_registry.host)
    assert result.returncode == 0, result.stderr
    assert config_of(docker_home) == {"auths": {}}
    assert docker_config_credentials(registry) is None
    result = ocifs("logout", auth_registry.host)
    assert result.returncode == 0 and "Not logged in" in result.stdout


def test_login_keeps_every_other_key(auth_registry: RunningRegistry, docker_home: Path) -> None:
    docker_home.mkdir(mode=0o700)
    before = {"auths": {"other.example.com": {"auth": "eDp5"},
                        f"http://{auth_registry.host}": {"auth": "b2xkOm9sZA=="}},
              "HttpHeaders": {"User-Agent": "x"}, "psFormat": "table {{.ID}}", "currentContext": "c"}
    (docker_home / "config.json").write_text(json.dumps(before))
    (docker_home / "config.json").chmod(0o640)
    assert login(auth_registry).returncode == 0
    after = config_of(docker_home)
    # the old spelling of the same registry is replaced, as docker login does
    assert set(after["auths"]) == {"other.example.com", auth_registry.host}
    assert {k: v for k, v in after.items() if k != "auths"} == {k: v for k, v in before.items() if k != "auths"}
    assert stat.S_IMODE((docker_home / "config.json").stat().st_mode) == 0o640  # its mode is kept
    assert [p.name for p in docker_home.iterdir()] == ["config.json"]  # no temporary left


def test_refused_credentials_store_nothing(auth_registry: RunningRegistry, docker_home: Path,
                                           helper_db: Path) -> None:
    result = login(auth_registry, "wrong-Zq8")
    assert result.returncode == 1
    line = one_line(result)
    assert "refused" in line and auth_registry.host in line
    assert "wrong-Zq8" not in result.stdout + result.stderr
    assert not docker_home.exists()
    docker_home.mkdir()
    (docker_home / "config.json").write_text(json.dumps({"credsStore": HELPER}))
    assert login(auth_registry, "wrong-Zq8").returncode == 1
    assert not helper_db.exists()
    assert config_of(docker_home) == {"credsStore": HELPER}


def test_malformed_config_is_not_overwritten(auth_registry: RunningRegistry, docker_home: Path) -> None:
    docker_home.mkdir()
    (docker_home / "config.json").write_text('{"auths": {"x": ')
    result = login(auth_registry)
    assert result.returncode == 1
    assert "not valid JSON" in one_line(result)
    assert (docker_home / "config.json").read_text() == '{"auths": {"x": '


# ---- credential helpers ---------------------------------------------------------------------


def test_login_through_creds_store_round_trip(auth_registry: RunningRegistry, docker_home: Path, helper_db: Path,
                                             auth_client: Any, repo: str, mounter: Mounter, tmp_path: Path) -> None:
    docker_home.mkdir()
    (docker_home / "config.json").write_text(json.dumps({"credsStore": HELPER, "experimental": "enabled"}))
    result = login(auth_registry)
    assert result.returncode == 0, result.stderr
    assert f"docker-credential-{HELPER}" in result.stdout
    assert json.loads(helper_db.read_text()) == {
        auth_registry.host: {"Username": auth_registry.username, "Secret": auth_registry.password}}
    # config.json holds no secret: only docker's empty marker
    assert config_of(docker_home) == {"credsStore": HELPER, "experimental": "enabled",
                                      "auths": {auth_registry.host: {}}}
    assert run(f"docker-credential-{HELPER}", "list").stdout.strip() == json.dumps(
        {auth_registry.host: auth_registry.username})
    registry = Registry.parse(auth_registry.host)
    assert docker_config_credentials(registry) == Credentials(auth_registry.username or "",
                                                              auth_registry.password or "")
    # a real mount and oras-py find them through the helper
    push_artifact(auth_client, repo, "1", {"f.txt": b"hello"})
    mnt = mounter(f"{auth_registry.host}/{repo}:1", "--read-only")
    assert (mnt / "f.txt").read_text() == "hello"
    import oras.client

    reader = oras.client.OrasClient(hostname=auth_registry.host, insecure=True, auth_backend="basic")
    # get_manifest loads ~/.docker/config.json (get_tags would not)
    assert reader.get_manifest(f"{auth_registry.host}/{repo}:1")["layers"]
    # logout erases from the helper and drops the marker
    assert ocifs("logout", auth_registry.host).returncode == 0
    assert json.loads(helper_db.read_text()) == {}
    assert config_of(docker_home) == {"credsStore": HELPER, "experimental": "enabled", "auths": {}}
    result = ocifs("mount", "--read-only", f"{auth_registry.host}/{repo}", str(tmp_path / "mnt2"))
    assert result.returncode != 0


def test_cred_helpers_entry_wins_over_creds_store(auth_registry: RunningRegistry, docker_home: Path,
                                                 helper_db: Path) -> None:
    docker_home.mkdir()
    (docker_home / "config.json").write_text(json.dumps(
        {"credsStore": "absent-helper", "credHelpers": {auth_registry.host: HELPER}}))
    assert login(auth_registry).returncode == 0
    assert auth_registry.host in json.loads(helper_db.read_text())
    assert ocifs("logout", auth_registry.host).returncode == 0
    assert json.loads(helper_db.read_text()) == {}


def test_missing_helper_is_one_line_and_stores_nothing(auth_registry: RunningRegistry, docker_home: Path) -> None:
    docker_home.mkdir()
    (docker_home / "config.json").write_text(json.dumps({"credsStore": "absent-helper"}))
    result = login(auth_registry)
    assert result.returncode == 1
    assert "docker-credential-absent-helper" in one_line(result)
    assert config_of(docker_home) == {"credsStore": "absent-helper"}


def test_docker_hub_key_through_a_helper(docker_home: Path, helper_db: Path) -> None:
    """Docker Hub cannot be reached from the tests: the storing half alone, then `ocifs logout`."""
    docker_home.mkdir()
    (docker_home / "config.json").write_text(json.dumps({"credsStore": HELPER}))
    hub = Registry.parse("index.docker.io")
    store_credentials(hub, Credentials("me", "hub-secret"))
    assert json.loads(helper_db.read_text()) == {DOCKER_HUB_CONFIG_KEY: {"Username": "me", "Secret": "hub-secret"}}
    assert config_of(docker_home)["auths"] == {DOCKER_HUB_CONFIG_KEY: {}}
    assert docker_config_credentials(Registry.parse("docker.io")) == Credentials("me", "hub-secret")
    result = ocifs("logout")  # no HOST: Docker Hub, as docker logout
    assert result.returncode == 0, result.stderr
    assert json.loads(helper_db.read_text()) == {}


def test_docker_hub_key_in_config_json(docker_home: Path) -> None:
    store_credentials(Registry.parse("registry-1.docker.io"), Credentials("me", "s"))
    assert set(config_of(docker_home)["auths"]) == {DOCKER_HUB_CONFIG_KEY}
    assert ocifs("logout", "https://index.docker.io/v1/").returncode == 0
    assert config_of(docker_home)["auths"] == {}


# ---- asking for the password ----------------------------------------------------------------


def test_no_terminal_and_no_password_stdin_fails_at_once(auth_registry: RunningRegistry, docker_home: Path,
                                                         tmp_path: Path) -> None:
    for argv in (("login", "-u", "u", auth_registry.host), ("login", auth_registry.host),
                 ("mount", "-u", "u", auth_registry.host, str(tmp_path))):
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "ocifs", *argv], capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=30)
        assert result.returncode == 2, (argv, result.stderr)
        assert "--password-stdin" in one_line(result) and "terminal" in result.stderr
        assert time.monotonic() - started < 10
    assert not docker_home.exists()


def on_terminal(argv: list[str], answers: list[tuple[str, str]], timeout: float = 60) -> tuple[int, str]:
    """Run `ocifs argv` on a new pseudo-terminal (its controlling terminal); when the output
    shows each prompt, type its answer. Returns the exit status and everything shown."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin, stdout, stderr and /dev/tty are the pty
        os.execv(sys.executable, [sys.executable, "-m", "ocifs", *argv])
    shown = b""
    pending = list(answers)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                shown += chunk
            if pending and pending[0][0].encode() in shown:
                os.write(fd, (pending.pop(0)[1] + "\n").encode())
                shown += b"\0"  # so the same prompt text is not matched twice
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), shown.decode(errors="replace")


def test_login_prompts_on_a_terminal(auth_registry: RunningRegistry, docker_home: Path) -> None:
    code, shown = on_terminal(["login", auth_registry.host],
                              [("Username: ", auth_registry.username or ""),
                               ("Password: ", auth_registry.password or "")])
    assert code == 0, shown
    assert "Login Succeeded" in shown
    assert (auth_registry.password or "") not in shown  # not echoed
    assert auth_registry.host in config_of(docker_home)["auths"]


def test_mount_username_prompts_on_a_terminal(auth_registry: RunningRegistry, docker_home: Path,
                                             auth_client: Any, repo: str, tmp_path: Path) -> None:
    push_artifact(auth_client, repo, "1", {"f.txt": b"prompted"})
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        code, shown = on_terminal(["mount", "--read-only", "--cache-dir", str(tmp_path / "cache"),
                                   "-u", auth_registry.username or "", f"{auth_registry.host}/{repo}:1",
                                   str(mnt)], [("Password: ", auth_registry.password or "")])
        assert code == 0, shown
        assert (auth_registry.password or "") not in shown
        assert (mnt / "f.txt").read_text() == "prompted"
    finally:
        if is_mounted(mnt):
            unmount(mnt)


# ---- Docker short names through the real command ---------------------------------------------


def test_short_name_mounts_docker_hub_library(client: Any, registry: RunningRegistry, mounter: Mounter) -> None:
    """`NAME:TAG` and `NAME` mean Docker Hub's `library/NAME`; Hub itself is the local registry
    through --mirror (the tests have no internet)."""
    name = f"shortname{os.getpid()}"
    push_artifact(client, f"library/{name}", "1.0", {"hello.txt": b"from the hub"})
    pinned = mounter(f"{name}:1.0", "--read-only", "--mirror", registry.url)
    assert (pinned / "hello.txt").read_bytes() == b"from the hub"
    whole = mounter(name, "--read-only", "--mirror", registry.url, "--hub-url", "http://127.0.0.1:9")
    assert os.listdir(whole) == ["1.0"]
    assert (whole / "1.0" / "hello.txt").read_bytes() == b"from the hub"
    result = ocifs("mount", "ubuntu:bad!tag", str(pinned))
    assert result.returncode == 2 and "SOURCE" in one_line(result)
