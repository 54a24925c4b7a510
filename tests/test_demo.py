"""The newcomer's first command works: scripts/demo, then scripts/demo stop."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from .mounts import is_mounted
from .registry_server import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_demo_shows_the_tree_and_stops(tmp_path: Path) -> None:
    env = dict(os.environ, OCIFS_DEMO_DIR=str(tmp_path / "demo"), OCIFS_DEMO_PORT=str(free_port()))
    try:
        result = subprocess.run([str(ROOT / "scripts" / "demo")], capture_output=True, text=True,
                                env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        out = result.stdout
        for expected in ("webapp-0.1.0.tgz", "README.md", "myvolume.txt", "linux-arm64", "linux-amd64",
                         "These files were pushed with oras-py.",
                         'user.oci.artifacttype="application/vnd.docker.volume.v1+tar.gz"'):
            assert expected in out, expected
        assert is_mounted(tmp_path / "demo" / "mnt")
    finally:
        subprocess.run([str(ROOT / "scripts" / "demo"), "stop"], env=env, capture_output=True, timeout=60)
    assert not is_mounted(tmp_path / "demo" / "mnt")
    assert not (tmp_path / "demo" / "registry.pid").exists()


def test_demo_refuses_a_port_that_is_already_taken(tmp_path: Path) -> None:
    """Someone else's server on the demo's port must not be filled with the demo's content."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, OCIFS_DEMO_DIR=str(tmp_path / "demo"), OCIFS_DEMO_PORT=str(port))
        result = subprocess.run([str(ROOT / "scripts" / "demo")], capture_output=True, text=True,
                                env=env, timeout=300)
    assert result.returncode != 0
    assert f"port {port}" in result.stderr and "already taken" in result.stderr, result.stderr[-2000:]
    assert "pushing demo content" not in result.stdout
    assert not is_mounted(tmp_path / "demo" / "mnt")
