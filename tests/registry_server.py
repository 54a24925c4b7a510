"""Start and stop Debian's `docker-registry` (the CNCF distribution server) for tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import requests

REGISTRY_BINARY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
# Small, so that catalogs span several pages in every test session.
CATALOG_MAX_ENTRIES = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningRegistry:
    host: str  # "127.0.0.1:<port>"
    root: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    username: str | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_registry(
    workdir: Path, *, username: str | None = None, password: str | None = None,
    deletes: bool = True, port: int | None = None, pull_through: str | None = None,
) -> RunningRegistry:
    """A registry on 127.0.0.1 with a free port (or `port`), its own storage, deletes
    enabled unless told otherwise. Started again on the same workdir, it has the same content.
    `pull_through`: the URL of an upstream registry this one is a pull-through cache of
    (distribution's proxy mode: read-only, each blob fetched upstream once and kept)."""
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "storage"
    port = port or free_port()
    auth = ""
    if username is not None and password is not None:
        import bcrypt

        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        htpasswd = workdir / "htpasswd"
        htpasswd.write_text(f"{username}:{hashed}\n")
        auth = f"auth:\n  htpasswd:\n    realm: ocifs-test\n    path: {htpasswd}\n"
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: {str(deletes).lower()}\n"
        "  maintenance:\n    uploadpurging:\n      enabled: false\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: ocifs-test-secret\n"
        f"catalog:\n  maxentries: {CATALOG_MAX_ENTRIES}\n" + auth
        + (f"proxy:\n  remoteurl: {pull_through}\n" if pull_through else "")
    )
    log_path = workdir / "registry.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [REGISTRY_BINARY, "serve", str(config)], stdout=log_file, stderr=subprocess.STDOUT
        )
    registry = RunningRegistry(f"127.0.0.1:{port}", root, process, log_path, username, password)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {log_path.read_text()[-2000:]}")
        try:
            status = requests.get(f"{registry.url}/v2/", timeout=1).status_code
            if status in (200, 401):
                return registry
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    registry.stop()
    raise RuntimeError("docker-registry did not start within 20 s")
