"""Third-party clients as the other side in tests: oras-py, skopeo, umoci."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .registry_server import RunningRegistry


def oras_client(server: RunningRegistry):  # type: ignore[no-untyped-def]
    import oras.client

    # The test registry sends Basic challenges, which oras-py's default (token) backend
    # mistakes for a token realm.
    backend = "basic" if server.username else "token"
    client = oras.client.OrasClient(hostname=server.host, insecure=True, auth_backend=backend)
    if server.username:
        client.login(username=server.username, password=server.password, tls_verify=False,
                     hostname=server.host)
    return client


def oras_push(server: RunningRegistry, target: str, files: list[Path]) -> None:
    """`oras push` from oras-py; titles are the files' base names."""
    client = oras_client(server)
    client.push(target=f"{server.host}/{target}", files=[str(f) for f in files],
                disable_path_validation=True)


def run(*command: str, cwd: Path | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise AssertionError(f"{command[0]} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def build_umoci_image(layout: Path, tag: str, files: dict[str, bytes], *, mtime: int | None = None) -> None:
    """An OCI image layout holding one image with `files` in its root filesystem (with that
    modification time, else now)."""
    if not (layout / "index.json").exists():
        run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", f"{layout}:{tag}")
    staging = layout.parent / f"{layout.name}-files-{tag}"
    staging.mkdir(exist_ok=True)
    for name, data in files.items():
        source = staging / name.replace("/", "_")
        source.write_bytes(data)
        if mtime is not None:
            os.utime(source, (mtime, mtime))
        run("umoci", "insert", "--image", f"{layout}:{tag}", str(source), "/" + name)
    run("umoci", "config", "--image", f"{layout}:{tag}", "--config.cmd", "/bin/sh")


def skopeo_copy(layout: Path, tag: str, server: RunningRegistry, target: str, *options: str) -> None:
    command = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", *options]
    if server.username:
        command.append(f"--dest-creds={server.username}:{server.password}")
    run(*command, f"oci:{layout}:{tag}", f"docker://{server.host}/{target}")
