"""Edges of `ocifs mount` found in trials: each mistake gets one clear line and a non-zero
exit; `--debug` in the background writes to the log file."""

from __future__ import annotations

from pathlib import Path

from ocifs.registry import RegistryClient

from .content import push_artifact
from .mounts import is_mounted, ocifs
from .registry_server import RunningRegistry, free_port
from .test_cli import one_line_error


def test_log_file_in_a_missing_directory(registry: RunningRegistry, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "ocifs.log"
    result = ocifs("mount", "--cache-dir", str(tmp_path / "cache"), "--log-file", str(missing),
                   registry.host, str(tmp_path))
    assert result.returncode != 0
    line = one_line_error(result)
    assert str(missing.parent) in line and "does not exist" in line, line
    assert not is_mounted(tmp_path)


def test_a_file_as_cache_dir(registry: RunningRegistry, tmp_path: Path) -> None:
    file = tmp_path / "cache"
    file.write_text("not a directory")
    (tmp_path / "mnt").mkdir()
    result = ocifs("mount", "--cache-dir", str(file), registry.host, str(tmp_path / "mnt"))
    assert result.returncode != 0
    line = one_line_error(result)
    assert str(file) in line and "not a directory" in line, line
    assert not is_mounted(tmp_path / "mnt")


def test_offline_with_an_empty_cache(tmp_path: Path) -> None:
    host = f"127.0.0.1:{free_port()}"  # nothing listens there
    (tmp_path / "mnt").mkdir()
    result = ocifs("mount", "--offline", "--cache-dir", str(tmp_path / "cache"), f"{host}/repo",
                   str(tmp_path / "mnt"))
    assert result.returncode == 1
    line = one_line_error(result)
    assert host in line and "nothing" in line and "cache" in line, line
    assert not is_mounted(tmp_path / "mnt")


def test_a_missing_tag(client: RegistryClient, registry: RunningRegistry, repo: str, tmp_path: Path) -> None:
    push_artifact(client, repo, "there", {"f": b"x"})
    (tmp_path / "mnt").mkdir()
    result = ocifs("mount", "--cache-dir", str(tmp_path / "cache"), f"{registry.host}/{repo}:missing",
                   str(tmp_path / "mnt"))
    assert result.returncode == 1
    line = one_line_error(result)
    assert f"{repo}:missing" in line and "not found" in line and "404" not in line, line
    assert not is_mounted(tmp_path / "mnt")


def test_a_source_without_a_registry_host_gets_a_hint(tmp_path: Path) -> None:
    result = ocifs("mount", "--timeout", "5", "--cache-dir", str(tmp_path / "cache"), "ns/a:1", str(tmp_path))
    assert result.returncode != 0
    line = one_line_error(result)
    assert "HOST" in line and "ns/a:1" in line, line


def test_debug_in_the_background_goes_to_the_log_file(client: RegistryClient, registry: RunningRegistry,
                                                       repo: str, tmp_path: Path) -> None:
    push_artifact(client, repo, "t", {"f": b"x"})
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = tmp_path / "cache"
    result = ocifs("mount", "--debug", "--cache-dir", str(cache), f"{registry.host}/{repo}", str(mnt))
    try:
        assert result.returncode == 0, result.stderr
        assert (mnt / "t" / "f").read_bytes() == b"x"
    finally:
        ocifs("umount", str(mnt))
    text = (cache / "ocifs.log").read_text()
    assert " DEBUG " in text, text[-2000:]
