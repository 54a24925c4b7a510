"""The tests' own mountinfo reader (tests/mounts.py): mount points are bytes with octal escapes,
and a name that is not UTF-8 anywhere on the machine must neither break it nor hide a mount."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from . import mounts
from .mounts import MountEntry, fuse_mounts_under, is_mounted, mount_entries, parse_mountinfo_line

NOT_UTF8 = (b"36 25 0:51 / /srv/caf\\303\\251\\040\\377\\376\\011tab\\012nl\\134bs\\015cr rw,nosuid,relatime"
            b" shared:7 master:1 - fuse.ocifs ocifs\\040src rw,user_id=0,group_id=0\n")


def test_a_line_with_a_non_utf8_escaped_mount_point() -> None:
    entry = parse_mountinfo_line(NOT_UTF8)
    assert entry == MountEntry(
        mount_point=os.fsdecode(b"/srv/caf\xc3\xa9 \xff\xfe\ttab\nnl\\bs\rcr"),
        options="rw,nosuid,relatime",
        fstype="fuse.ocifs",
        source="ocifs src",
        super_options="rw,user_id=0,group_id=0",
    )
    # The name round-trips to the bytes the kernel has.
    assert os.fsencode(entry.mount_point) == b"/srv/caf\xc3\xa9 \xff\xfe\ttab\nnl\\bs\rcr"


def test_a_line_without_optional_fields() -> None:
    entry = parse_mountinfo_line(b"22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw")
    assert entry == MountEntry("/", "rw,relatime", "ext4", "/dev/sda1", "rw")


def test_a_non_utf8_mount_elsewhere_hides_no_fuse_mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = os.fsencode(os.path.realpath(tmp_path))
    lines = [
        b"22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw",
        NOT_UTF8,
        b"40 22 0:52 / " + root + b"/mnt\\040one rw,nosuid - fuse.ocifs ocifs rw,user_id=0",
        b"41 22 0:53 / " + root + b"/caf\\377 rw - fuse.ocifs ocifs rw,user_id=0",
        b"42 22 0:54 / " + root + b"/plain rw - tmpfs tmpfs rw",
        b"43 22 0:55 / " + root + b"-sibling/mnt rw - fuse.ocifs ocifs rw,user_id=0",
    ]
    monkeypatch.setattr(mounts, "mountinfo_lines", lambda: lines)
    assert fuse_mounts_under(tmp_path) == [tmp_path.resolve() / "mnt one",
                                           tmp_path.resolve() / os.fsdecode(b"caf\xff")]
    assert is_mounted(tmp_path / "mnt one")
    assert is_mounted(tmp_path / os.fsdecode(b"caf\xff"))
    assert not is_mounted(tmp_path / "mnt")


def test_this_machines_mountinfo_parses() -> None:
    entries = mount_entries()
    assert any(entry.mount_point == "/" for entry in entries)
    assert all(entry.mount_point.startswith("/") and entry.fstype for entry in entries)
