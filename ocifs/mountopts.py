"""mount(8) and /etc/fstab: `mount -t fuse.ocifs SOURCE MOUNTPOINT -o OPTS`.

Two routes reach ocifs from mount(8), and both end here:

- fuse3's `mount.fuse3` (what `/sbin/mount.fuse` links to) runs the program named by the
  type's subtype, found on the standard PATH: `ocifs SOURCE MOUNTPOINT -o OPTS`;
- our own helper, `/sbin/mount.fuse.ocifs` (a link to the `mount.fuse.ocifs` console script),
  which mount(8) prefers when it exists: `mount.fuse.ocifs SOURCE MOUNTPOINT [-sfnv] [-N NS]
  [-o OPTS] [-t TYPE]`.

Either way the comma-separated options are translated into the arguments of `ocifs mount`:
ocifs's own options by name (`cache_dir=` is `--cache-dir`), the generic mount(8) and systemd
options ignored, everything else passed on to FUSE as `-o`. Nothing here imports the rest of
ocifs: cli.py parses and dispatches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

# option -> the `ocifs mount` flag it sets (no value).
FLAGS = {
    "ro": "--read-only",
    "allow_other": "--allow-other",
    "offline": "--offline",
    "debug": "--debug",
    "plain_http": "--plain-http",
    "insecure": "--insecure",
}
# option=value -> the `ocifs mount` option taking that value.
VALUED = {
    "cache_dir": "--cache-dir",
    "cache_size": "--cache-size",
    "ttl": "--ttl",
    "timeout": "--timeout",
    "verify": "--verify",
    "log_file": "--log-file",
    "ca_file": "--ca-file",
    "mirror": "--mirror",
    "hub_url": "--hub-url",
    "artifact_type": "--artifact-type",
}
# Options for mount(8), fstab and systemd, not for the filesystem. `dev` and `suid` are what
# mount.fuse3 adds for root: dropped, so that a mount at boot keeps libfuse's nodev,nosuid as
# `ocifs mount` does (a registry is no place for device files and setuid programs).
IGNORED = frozenset({
    "rw", "defaults", "auto", "noauto", "nofail", "_netdev", "user", "nouser", "users", "owner",
    "group", "dev", "suid", "loop",
})
IGNORED_PREFIXES = ("x-", "comment=", "fsname=", "subtype=")
# Secrets never go into fstab (it is world-readable) nor onto a command line (ps shows it).
REFUSED = {
    "username": "credentials come from the Docker config of the user who mounts (`docker login`, "
                "or docker_config=DIR), not from mount options",
    "password": "never put a password in mount options: log in with `docker login` and use "
                "docker_config=DIR if needed",
}


class MountOptionError(ValueError):
    """An option that cannot be used in a mount(8) line: one line for the user."""


@dataclass
class MountCommand:
    """What to run: `ocifs mount ARGV`, with `environ` set first (DOCKER_CONFIG)."""

    argv: list[str]
    environ: dict[str, str] = field(default_factory=dict)
    fake: bool = False  # mount -f: do everything but mount


def split_options(groups: Sequence[str]) -> list[str]:
    """`["ro,ttl=5", "debug"]` -> `["ro", "ttl=5", "debug"]` (empty items dropped)."""
    return [item.strip() for group in groups for item in group.split(",") if item.strip()]


def translate(source: str, mountpoint: str, groups: Sequence[str], extra: Sequence[str] = ()) -> MountCommand:
    """The `ocifs mount` arguments for `SOURCE MOUNTPOINT -o GROUPS` (`extra`: further
    `ocifs mount` arguments given on the command line, passed on as they are)."""
    argv: list[str] = []
    environ: dict[str, str] = {}
    fuse: list[str] = []
    for item in split_options(groups):
        key, sep, value = item.partition("=")
        if key in REFUSED:
            raise MountOptionError(f"option {key}= is not supported: {REFUSED[key]}")
        if item in IGNORED or item.startswith(IGNORED_PREFIXES):
            continue
        if key in FLAGS and not sep:
            argv.append(FLAGS[key])
        elif key in VALUED:
            if not sep or not value:
                raise MountOptionError(f"option {key}= needs a value")
            argv += [VALUED[key], value]
        elif key == "docker_config":
            if not value:
                raise MountOptionError("option docker_config= needs a directory")
            # Credentials of that Docker config (config.json, credential helpers), as DOCKER_CONFIG does.
            environ["DOCKER_CONFIG"] = value
        else:
            fuse.append(item)  # a FUSE option (nosuid, noexec, max_read=..., default_permissions...)
    if fuse:
        argv += ["-o", ",".join(fuse)]
    return MountCommand([*argv, *extra, source, mountpoint], environ)


def is_mount_form(argv: Sequence[str], commands: Sequence[str]) -> bool:
    """Whether `argv` is `SOURCE MOUNTPOINT ...` rather than `COMMAND ...`: the form mount.fuse3
    uses. A first word that is a command or an option keeps its meaning."""
    return (len(argv) >= 2 and not argv[0].startswith("-") and argv[0] not in commands
            and not argv[1].startswith("-"))


def parse_mount_form(argv: Sequence[str]) -> MountCommand:
    """`SOURCE MOUNTPOINT [-o OPTS]... [ocifs mount options]`."""
    source, mountpoint, rest = argv[0], argv[1], list(argv[2:])
    groups: list[str] = []
    extra: list[str] = []
    while rest:
        word = rest.pop(0)
        if word == "-o":
            if not rest:
                raise MountOptionError("option -o needs a value")
            groups.append(rest.pop(0))
        elif word.startswith("-o") and not word.startswith("--"):
            groups.append(word[2:])
        else:
            extra.append(word)
    return translate(source, mountpoint, groups, extra)


def parse_helper_argv(argv: Sequence[str]) -> MountCommand:
    """What mount(8) gives a `/sbin/mount.TYPE` helper (mount(8), "External helpers"):
    `SOURCE MOUNTPOINT [-sfnv] [-N NAMESPACE] [-o OPTIONS] [-t TYPE.SUBTYPE]`."""
    positional: list[str] = []
    groups: list[str] = []
    fake = read_only = False
    words = list(argv)
    while words:
        word = words.pop(0)
        if word in ("-o", "-t", "-N"):
            if not words:
                raise MountOptionError(f"option {word} needs a value")
            value = words.pop(0)
            if word == "-o":
                groups.append(value)
            elif word == "-N":
                raise MountOptionError("mount namespaces (-N) are not supported: run mount inside the namespace")
            elif value not in ("fuse.ocifs", "ocifs"):
                raise MountOptionError(f"not an ocifs type: {value}")
        elif word.startswith("-o") and len(word) > 2:
            groups.append(word[2:])
        elif word.startswith("-") and len(word) > 1 and set(word[1:]) <= set("sfnvr"):
            # -s sloppy, -n no mtab, -v verbose, -r read-only (util-linux passes ro in -o too): nothing
            # to do; -f fake: check the line, mount nothing.
            fake = fake or "f" in word
            read_only = read_only or "r" in word
        elif word.startswith("-") and len(word) > 1:
            raise MountOptionError(f"unknown mount helper option: {word}")
        else:
            positional.append(word)
    if len(positional) != 2:
        raise MountOptionError("usage: mount.fuse.ocifs SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]")
    command = translate(positional[0], positional[1], groups)
    if read_only and "--read-only" not in command.argv:
        command.argv.insert(0, "--read-only")
    command.fake = fake
    return command


def apply_environ(command: MountCommand) -> None:
    """Set what the options ask of the environment, before any credential is looked up."""
    os.environ.update(command.environ)
