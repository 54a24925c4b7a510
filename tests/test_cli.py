"""The `ocifs` command as users run it: exit codes and one-line errors."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ocifs import __version__

from .mounts import ocifs
from .registry_server import free_port


def test_version_and_help() -> None:
    result = ocifs("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"ocifs {__version__}"
    help_text = ocifs("mount", "--help").stdout
    for option in ("--read-only", "--plain-http", "--cache-size", "--ttl", "--mirror", "--hub-url",
                   "--offline", "--allow-other", "--password-stdin"):
        assert option in help_text


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("ocifs: ")
    return lines[0]


def test_malformed_source(tmp_path: Path) -> None:
    for source in ("Upper/Case", "https://host/repo", "host/repo:bad:tag!", "host:99999/x", ""):
        result = ocifs("mount", source, str(tmp_path))
        assert result.returncode == 2, source
        assert "SOURCE" in one_line_error(result) or "invalid" in result.stderr


def test_missing_or_wrong_mountpoint(tmp_path: Path) -> None:
    result = ocifs("mount", "localhost:5000/x", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert "does not exist" in one_line_error(result)
    file = tmp_path / "file"
    file.write_text("x")
    result = ocifs("mount", "localhost:5000/x", str(file))
    assert "not a directory" in one_line_error(result)


def test_unreachable_registry(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    result = ocifs("mount", f"127.0.0.1:{port}/repo", str(tmp_path))
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in one_line_error(result)


def test_username_needs_password_stdin(tmp_path: Path) -> None:
    result = ocifs("mount", "--username", "u", "localhost:5000", str(tmp_path), stdin="")  # not a terminal
    assert result.returncode == 2
    assert "--password-stdin" in one_line_error(result)


def test_refused_credentials(auth_registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = ocifs("mount", "--username", auth_registry.username, "--password-stdin",
                   auth_registry.host, str(tmp_path), stdin="wrong\n")
    assert result.returncode == 1
    assert "refused" in one_line_error(result)
    assert "wrong" not in result.stderr


def test_umount_of_a_directory_that_is_not_mounted(tmp_path: Path) -> None:
    result = ocifs("umount", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert os.path.isdir(tmp_path)


def test_mirror_with_credentials_is_refused(tmp_path: Path) -> None:
    result = ocifs("mount", "--mirror", "http://user:secret@127.0.0.1:1", "docker.io/x", str(tmp_path))
    assert result.returncode == 2
    line = one_line_error(result)
    assert "--username" in line and "secret" not in line


def test_foreground_mount_failure_exits_non_zero(registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = ocifs("mount", "-f", "--cache-dir", str(tmp_path / "cache"), "-o", "no_such_fuse_option",
                   registry.host, str(tmp_path))
    assert result.returncode == 1
    assert "cannot mount" in result.stderr
