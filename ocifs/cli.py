"""The `ocifs` command: argument parsing, logging, wiring, and (with the mount) daemonizing."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__, cachetool, deadline, mountopts, status
from .errors import AuthError, NetworkError, NotFound, OcifsError
from .metadata import Metadata
from .reference import Registry, Source
from .registry import ClientOptions, Credentials, RegistryClient, TransportOptions, credentials
from .registry.auth import config_key_host, credential_lookup
from .registry.hub import HubClient
from .store import BlobStore
from .tree import Tree
from .view import View
from .write import Writer

log = logging.getLogger("ocifs")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


# What a FUSE mount whose daemon died answers (ECONNABORTED first, then ENOTCONN).
STALE_ERRNOS = frozenset({errno.ENOTCONN, errno.ECONNABORTED})


class UsageError(Exception):
    """A problem with what the user typed: one line, exit status 2."""


def parse_size(text: str) -> int:
    """`10G`, `512M`, `1.5GiB`, `4096` -> bytes (binary multiples)."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (bytes, or with K/M/G/T)")
    number, unit, _ = match.groups()
    return int(float(number) * _SIZE_FACTORS[unit.lower()])


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0: {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def default_cache_size(store: BlobStore) -> int | None:
    """Half of what the cache's file system has free, counting what the cache holds already:
    an unattended mount never fills the disk."""
    try:
        vfs = os.statvfs(store.root)
        held = store.usage()
    except (OSError, OcifsError):
        return None
    return (vfs.f_bavail * vfs.f_frsize + held) // 2


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ocifs")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, like every other ocifs error, plus the usage hint argparse would give.
        self.exit(2, f"{self.prog}: {message}\nTry '{self.prog} --help'.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ocifs",
        description="Mount an OCI registry as a filesystem: namespaces, repositories and tags are "
        "directories, artifacts are files.",
    )
    parser.add_argument("--version", action="version", version=f"ocifs {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    mount = commands.add_parser(
        "mount",
        help="mount a registry, namespace, repository or tag",
        description="Mount SOURCE (HOST[:PORT][/PATH][:TAG|@DIGEST], or a Docker Hub short name like "
        "ubuntu:22.04) on MOUNTPOINT. Returns once "
        "the mount is live; the filesystem runs on in the background.",
    )
    mount.add_argument("source", metavar="SOURCE", help="HOST[:PORT][/PATH][:TAG|@DIGEST]")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing directory")
    mount.add_argument("--read-only", action="store_true", help="refuse every write (EROFS)")
    mount.add_argument("--plain-http", action="store_true",
                       help="use HTTP, not HTTPS (the default for localhost, 127.0.0.0/8 and ::1)")
    mount.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    mount.add_argument("--ca-file", metavar="FILE", help="trust the CA certificates in FILE")
    mount.add_argument("--username", "-u", metavar="USER", help="registry user name")
    mount.add_argument("--password-stdin", action="store_true",
                       help="read the password or token for --username from standard input "
                       "(without it, -u asks on the terminal)")
    mount.add_argument("--cache-dir", metavar="DIR", default=None,
                       help="blob cache (default $XDG_CACHE_HOME/ocifs)")
    mount.add_argument("--cache-size", metavar="SIZE", type=parse_size, default=None,
                       help="bound the cache, in bytes or with K/M/G/T (default: half of what its "
                       "file system has free at mount, counting what the cache holds already)")
    mount.add_argument("--ttl", metavar="SECONDS", type=_non_negative_float, default=60.0,
                       help="how long tag lists, catalogs and tags are cached (default 60)")
    mount.add_argument("--timeout", metavar="SECONDS", type=_positive_float, default=30.0,
                       help="the deadline of one filesystem operation that needs the network: "
                       "lookups, listings and reads end by then (data, or ETIMEDOUT) however the "
                       "registry trickles; each request of a push gets as long (default 30)")
    mount.add_argument("--mirror", metavar="URL",
                       help="talk to this registry URL instead of HOST (a mirror or pull-through cache)")
    mount.add_argument("--hub-url", metavar="URL", default="https://hub.docker.com",
                       help="the Docker Hub API (default https://hub.docker.com)")
    mount.add_argument("--verify", choices=("eof", "full"), default="eof",
                       help="eof (default): bytes are served as they arrive and a sequential reader "
                       "gets its last bytes only once the blob matches its digest (a random reader may "
                       "see bytes not verified yet); full: no byte of a blob before the whole blob is "
                       "verified")
    mount.add_argument("--artifact-type", metavar="TYPE", default=None,
                       help="artifactType of new manifests (default application/vnd.unknown.artifact.v1)")
    mount.add_argument("--allow-other", action="store_true",
                       help="let other users use the mount (with -o default_permissions)")
    mount.add_argument("-o", dest="fuse_options", metavar="OPT[,OPT...]", action="append", default=[],
                       help="FUSE mount options")
    mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    mount.add_argument("--offline", action="store_true",
                       help="mount from the cache when the registry cannot be reached")
    mount.add_argument("--debug", action="store_true", help="log every operation")
    mount.add_argument("--log-file", metavar="FILE",
                       help="where the background daemon logs (default CACHE_DIR/ocifs.log; "
                       "with -f, standard error)")

    umount = commands.add_parser(
        "umount", help="unmount a mountpoint",
        description="Unmount MOUNTPOINT (also after the daemon died). Refuses while files written "
        "to it are not pushed yet, and lists them; --force unmounts anyway (they stay staged in "
        "the cache and the next mount of the same SOURCE pushes them).")
    umount.add_argument("mountpoint", metavar="MOUNTPOINT")
    umount.add_argument("-f", "--force", action="store_true",
                        help="unmount even when files are not pushed yet")
    umount.add_argument("-z", "--lazy", action="store_true",
                        help="detach now even while the mount is busy; the daemon ends once the "
                        "last open file or directory is closed (umount -l, fusermount3 -uz)")
    add_status_and_cache_commands(commands)
    add_login_parsers(commands)
    return parser


def add_status_and_cache_commands(commands: Any) -> None:
    """`ocifs status` and `ocifs cache ...` (the work is in status.py and cachetool.py)."""
    show = commands.add_parser(
        "status", help="what live mounts are doing",
        description="Each live ocifs mount (or only MOUNTPOINT): source, cache use, bytes fetched "
        "and served, reads in flight, blobs being fetched, pushes pending or failed, rate limits.")
    show.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    show.add_argument("--json", action="store_true", help="print JSON (a list, one object per mount)")
    cache = commands.add_parser(
        "cache", help="look at or trim the blob cache",
        description="Safe while mounts run: staged files are never touched; prune spares blobs "
        "a live mount holds open.")
    actions = cache.add_subparsers(dest="cache_command", metavar="ACTION", parser_class=_Parser)
    actions.required = True
    for name, text in (("info", "location, size, blobs, partial blobs, staged files, fragments"),
                       ("prune", "remove least recently used blobs down to --max-size"),
                       ("clear", "remove every cached blob (not staged files)")):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("--cache-dir", metavar="DIR", default=None,
                            help="the cache (default $XDG_CACHE_HOME/ocifs, as for mount)")
        if name == "info":
            action.add_argument("--json", action="store_true", help="print JSON")
        if name == "prune":
            action.add_argument("--max-size", metavar="SIZE", type=parse_size, default=0,
                                help="keep at most this much (bytes, or with K/M/G/T; default 0: "
                                "all that no mount uses)")


def cmd_status(args: argparse.Namespace) -> int:
    import json

    try:
        entries = status.collect(args.mountpoint)
    except LookupError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(entries, indent=2, sort_keys=True))
    else:
        sys.stdout.write(status.format_all(entries))
    return 1 if any("error" in entry["status"] for entry in entries) else 0


def cmd_cache(args: argparse.Namespace) -> int:
    import json

    cache_dir = Path(args.cache_dir or default_cache_dir())
    if cache_dir.exists() and not cache_dir.is_dir():
        raise UsageError(f"--cache-dir is not a directory: {cache_dir}")
    if args.cache_command == "info":
        found = cachetool.info(cache_dir)
        if args.json:
            print(json.dumps(found.to_json(), indent=2, sort_keys=True))
        else:
            sys.stdout.write(cachetool.format_info(found))
    elif args.cache_command == "prune":
        sys.stdout.write(cachetool.format_result("pruned", cachetool.prune(cache_dir, args.max_size)))
    else:
        sys.stdout.write(cachetool.format_result("cleared", cachetool.clear(cache_dir)))
    return 0


def add_login_parsers(commands: Any) -> None:
    """`ocifs login` and `ocifs logout`, stored as `docker login` does (see docs/credentials.md)."""
    login = commands.add_parser(
        "login", help="check credentials with a registry and store them as docker login does",
        description="Log in to HOST (default Docker Hub): the credentials are checked with the "
        "registry, then stored through Docker's credential helper (credsStore, credHelpers) or in "
        "config.json ($DOCKER_CONFIG, else ~/.docker), where docker, oras and ocifs find them.")
    login.add_argument("host", metavar="HOST", nargs="?", default="docker.io",
                       help="registry host[:port] (default docker.io)")
    login.add_argument("--username", "-u", metavar="USER", help="user name (asked for when missing)")
    login.add_argument("--password-stdin", action="store_true",
                       help="read the password or token from standard input (else asked for on the terminal)")
    login.add_argument("--plain-http", action="store_true", help="use HTTP, not HTTPS")
    login.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    login.add_argument("--ca-file", metavar="FILE", help="trust the CA certificates in FILE")
    login.add_argument("--timeout", metavar="SECONDS", type=_positive_float, default=30.0,
                       help="how long the check may take (default 30)")
    logout = commands.add_parser("logout", help="remove stored credentials",
                                 description="Remove HOST's credentials (default Docker Hub) from "
                                 "Docker's credential helper or config.json.")
    logout.add_argument("host", metavar="HOST", nargs="?", default="docker.io")


def _login_registry(text: str) -> Registry:
    # docker accepts `https://index.docker.io/v1/`-style server URLs too.
    try:
        return Registry.parse(config_key_host(text) if "://" in text else text.rstrip("/"))
    except OcifsError as exc:
        raise UsageError(str(exc)) from None


def cmd_login(args: argparse.Namespace) -> int:
    registry = _login_registry(args.host)
    try:
        creds = credentials.read_credentials(args.username, args.password_stdin, prompt_username=True)
    except credentials.CredentialsInputError as exc:
        raise UsageError(str(exc)) from None
    options = ClientOptions(plain_http=True if args.plain_http else None, transport=TransportOptions(
        connect_timeout=min(args.timeout, 10.0), read_timeout=args.timeout,
        verify_tls=not args.insecure, ca_file=args.ca_file))
    where = credentials.login(registry, creds, options, timeout=args.timeout)
    print(f"Login Succeeded ({registry}: stored in {where})")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    registry = _login_registry(args.host)
    if credentials.logout(registry):
        print(f"Removing login credentials for {registry}")
    else:
        print(f"Not logged in to {registry}")
    return 0


def client_for(args: argparse.Namespace, source: Source) -> RegistryClient:
    """The registry client the mount options describe."""
    explicit: Credentials | None = None
    if args.username:
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
            explicit = Credentials(args.username, password)
        else:  # asked for on a terminal; a pipe or /dev/null without --password-stdin is an error
            try:
                explicit = credentials.read_credentials(args.username, False, prompt_username=False)
            except credentials.CredentialsInputError as exc:
                raise UsageError(f"--username: {exc}") from None
    elif args.password_stdin:
        raise UsageError("--password-stdin needs --username")
    if args.mirror and not re.match(r"^https?://[^/]+", args.mirror):
        raise UsageError(f"--mirror must be an http:// or https:// URL: {args.mirror!r}")
    if args.mirror and "@" in args.mirror.split("/")[2]:
        raise UsageError("--mirror must not carry credentials: use --username and --password-stdin")
    options = ClientOptions(
        base_url=args.mirror,
        plain_http=True if args.plain_http else None,
        transport=TransportOptions(
            connect_timeout=min(args.timeout, 10.0),
            read_timeout=args.timeout,
            verify_tls=not args.insecure,
            ca_file=args.ca_file,
        ),
    )
    # The command line first, then Docker's config.json (auths, credHelpers, credsStore).
    return RegistryClient(source.registry, options, credential_lookup(source.registry, explicit))


def check_mountpoint(path: str) -> Path:
    mountpoint = Path(path)
    try:
        if not mountpoint.is_dir():
            if mountpoint.exists():
                raise UsageError(f"mountpoint is not a directory: {path}")
            raise UsageError(f"mountpoint does not exist: {path}")
    except OSError as exc:
        if exc.errno in STALE_ERRNOS:
            return mountpoint  # a stale mount left by a dead daemon: the mount cleans it up
        raise UsageError(f"mountpoint {path}: {exc.strerror}") from None
    return mountpoint


def parse_fuse_options(values: list[str]) -> dict[str, Any]:
    """`-o a,b=c -o d` -> {"a": True, "b": "c", "d": True}."""
    options: dict[str, Any] = {}
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, rest = item.partition("=")
            options[key] = rest if sep else True
    return options


def prepare_mountpoint(path: str) -> Path:
    """Refuse a busy mountpoint; clean up a stale one left by a dead daemon."""
    mountpoint = Path(path)
    if is_mounted(mountpoint):
        # statvfs, unlike stat, is never answered from the kernel's caches.
        if not is_stale(mountpoint):
            raise UsageError(f"mountpoint is busy (already mounted): {path}")
        log.info("cleaning up the stale mount on %s", path)
        unmount(mountpoint)
    return check_mountpoint(path)


def setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else logging.INFO if args.foreground else logging.WARNING
    handler: logging.Handler
    if args.log_file:
        # Private from the start: logs name repositories and hosts.
        os.close(os.open(args.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
        handler = logging.FileHandler(args.log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("ocifs: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # urllib3 logs whole URLs, queries included (presigned redirects, upload state): never
    # below INFO. ocifs logs its own line for each request, without the query.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    if not args.debug:
        logging.getLogger("fuse").setLevel(logging.WARNING)


def check_local_paths(args: argparse.Namespace) -> None:
    """What can be wrong on this machine, said before the registry is asked anything."""
    if args.log_file:
        directory = os.path.dirname(os.path.abspath(args.log_file))
        if not os.path.isdir(directory):
            raise UsageError(f"log file {args.log_file}: directory {directory} does not exist")
    if args.cache_dir and os.path.exists(args.cache_dir) and not os.path.isdir(args.cache_dir):
        raise UsageError(f"cache directory {args.cache_dir} is not a directory")


def host_hint(text: str) -> str:
    """A hint when SOURCE does not start with a registry host, by Docker's rule (a first
    component with a dot or a port, or localhost): `ns/a:1` is not `HOST/ns/a:1`."""
    first = text.split("/", 1)[0]
    if "/" in text and "." not in first and ":" not in first and first != "localhost":
        return f" (SOURCE {text} starts with no registry host: write HOST[:PORT]/{text})"
    return ""


def cmd_mount(args: argparse.Namespace) -> int:
    try:
        source = Source.parse(args.source)
    except OcifsError as exc:
        raise UsageError(str(exc)) from None
    check_local_paths(args)
    mountpoint = prepare_mountpoint(args.mountpoint)
    client = client_for(args, source)
    offline: str | None = None  # why the registry could not be reached, when mounting from the cache
    try:
        with deadline.limit(args.timeout):  # one operation: the token fetch and retries included
            client.ping()
            if source.is_pinned:
                client.resolve(source.path, source.reference or "")  # a pinned tag must exist
    except NotFound:
        print(f"ocifs: {source}: not found (no such tag, digest or repository){host_hint(args.source)}",
              file=sys.stderr)
        return 1
    except (NetworkError, AuthError) as exc:
        if not args.offline or isinstance(exc, AuthError):
            print(f"ocifs: {exc}{host_hint(args.source)}", file=sys.stderr)
            return 1
        offline = str(exc)
    cache_dir = Path(args.cache_dir or default_cache_dir())
    try:
        store = BlobStore(cache_dir, max_bytes=args.cache_size, verify_full=args.verify == "full",
                          background_timeout=args.timeout)
        if args.cache_size is None:
            store.max_bytes = default_cache_size(store)
    except (OSError, OcifsError) as exc:
        raise UsageError(f"cache directory {cache_dir}: {exc}") from None
    if not args.foreground and not args.log_file:
        args.log_file = str(cache_dir / "ocifs.log")
    hub = HubClient(args.hub_url, client.transport.options) if source.registry.is_docker_hub else None
    metadata = Metadata(source, client, store, hub=hub, ttl=args.ttl, timeout=args.timeout)
    if offline is not None:
        if not metadata.has_offline_answers():
            print(f"ocifs: {offline}; the cache {cache_dir} holds nothing of {source.registry}: "
                  "nothing to mount offline", file=sys.stderr)
            return 1
        print(f"ocifs: {offline}; mounting from the cache (--offline)", file=sys.stderr)
    tree = Tree(source, metadata)
    writer = None
    if not args.read_only:
        writer = Writer(metadata, client, store, source=str(source), open_blob=tree.open,
                        on_pushed=tree.note_file_time, artifact_type=args.artifact_type)
        # Before the mount goes live, so that what a stopped daemon left is reported here:
        # complete files are pushed once mounted; fragments are set aside (and logged).
        recovered, fragments = writer.recover()
        args.recovery_reported = bool(recovered or fragments)
        if recovered:
            log.warning("%d file(s) staged before the last daemon stopped will be pushed: %s",
                        len(recovered), ", ".join(staged.path for staged in recovered))
    view = View(tree, writer, status=lambda: status.daemon_status(
        source=str(source), cache_dir=cache_dir, log_file=args.log_file,
        read_only=bool(args.read_only), store=store, transport=client.transport))
    if args.foreground:
        setup_logging(args)
        serve(args, source, view, str(mountpoint), on_ready=None)
        return 0
    return daemonize(args, source, view, str(mountpoint))


READY = b"\0ocifs-ready\n"
# What a filesystem operation may take beyond --timeout (local work, scheduling).
OPERATION_MARGIN = 1.0
# How long `mount` waits for the daemon's init() before giving up on it.
MOUNT_WAIT = 60.0


def serve(args: argparse.Namespace, source: Source, view: View, mountpoint: str,
          on_ready: Callable[[], None] | None) -> None:
    from . import fs  # imports the FUSE binding: only when mounting

    operations = fs.Operations(view, on_ready=on_ready, on_destroy=view.tree.store.close,
                               operation_timeout=args.timeout + OPERATION_MARGIN)
    try:
        fs.run(operations, mountpoint, fsname=str(source), read_only=args.read_only,
               allow_other=args.allow_other, extra_options=parse_fuse_options(args.fuse_options))
    except RuntimeError as exc:
        # libfuse returns non-zero when its loop was interrupted by a signal: a clean exit
        # once mounted; before that, a failure to mount.
        if not operations.ready:
            raise OcifsError(f"cannot mount on {mountpoint}") from None
        log.debug("FUSE loop ended: %s", exc)


def daemonize(args: argparse.Namespace, source: Source, view: View, mountpoint: str) -> int:
    """Fork; the child runs FUSE in its own session and reports through a pipe once its
    init() has run (or with the error that stopped it); the parent exits accordingly.

    Until it is ready the child's stderr is the pipe, so libfuse's own complaints reach
    the user; then it becomes the log file (or /dev/null)."""
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_end)
        try:
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.dup2(write_end, 2)
            setup_logging(args)

            def ready() -> None:
                if args.log_file:
                    log_fd = os.open(args.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                    os.dup2(log_fd, 2)
                    os.close(log_fd)
                else:
                    os.dup2(devnull, 2)
                os.write(write_end, READY)
                os.close(write_end)

            serve(args, source, view, mountpoint, on_ready=ready)
            code = 0
        except OcifsError as exc:
            os.write(2, f"{exc}\n".encode())
            code = 1
        except BaseException as exc:  # noqa: BLE001 - the daemon must report, not trace back
            os.write(2, f"{type(exc).__name__}: {exc}\n".encode())
            code = 1
        os._exit(code)

    os.close(write_end)
    output = bytearray()
    import select

    deadline = time.monotonic() + MOUNT_WAIT
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            os.kill(pid, 15)
            print(f"ocifs: the filesystem did not start within {MOUNT_WAIT:.0f} s", file=sys.stderr)
            return 1
        readable, _, _ = select.select([read_end], [], [], remaining)
        if not readable:
            continue
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        output += chunk
        if READY in output:
            break
    os.close(read_end)
    text = bytes(output).split(READY)[0].decode(errors="replace")
    if READY in output:
        for line in text.splitlines():
            if line.strip():
                print(line, file=sys.stderr)  # warnings from before the mount went live
        if sys.stderr.isatty() or text.strip() or getattr(args, "recovery_reported", False):
            print(f"ocifs: {source} mounted on {mountpoint}; log: {args.log_file}", file=sys.stderr)
        return 0
    os.waitpid(pid, 0)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # One line: libfuse's complaint (if any) and ours.
    lines = [line[len("ocifs: "):] if line.startswith("ocifs: ") else line for line in lines]
    message = "; ".join(dict.fromkeys(lines[-3:])) or "the filesystem exited before it was mounted"
    print(f"ocifs: {message}", file=sys.stderr)
    if is_mounted(Path(mountpoint)):
        unmount(Path(mountpoint))
    return 1


_MOUNTINFO_ESCAPE = re.compile(rb"\\([0-7]{3})")


def mount_type(path: Path) -> str | None:
    """The file system type mounted on `path` (the topmost), or None when it is not a mount
    point (any name: mountinfo is bytes, with octal escapes)."""
    target = os.fsencode(os.path.realpath(path))
    found = None
    try:
        with open("/proc/self/mountinfo", "rb") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 4 and b"-" in fields[5:]:
                    point = _MOUNTINFO_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), fields[4])
                    if point == target:
                        separator = fields.index(b"-", 5)
                        found = fields[separator + 1].decode(errors="replace") if len(fields) > separator + 1 else ""
    except OSError:
        pass
    return found


def is_mounted(path: Path) -> bool:
    """Whether `path` is a mount point."""
    return mount_type(path) is not None


def unmount(mountpoint: Path, *, lazy: bool = False) -> str | None:
    """Unmount (`lazy`: detach even when busy); None on success, else the reason. Works on
    stale mounts of dead daemons."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool:
        command = [tool, "-uz" if lazy else "-u", str(mountpoint)]
    else:
        command = ["umount", *(["-l"] if lazy else []), str(mountpoint)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode == 0 or not is_mounted(mountpoint):
        return None
    if not is_stale(mountpoint):
        # A live mount in use stays mounted, as with umount(8): say why.
        return (result.stderr.strip().splitlines() or ["unmount failed"])[-1]
    # A dead daemon leaves a stale mount: detach it lazily.
    if tool:
        subprocess.run([tool, "-uz", str(mountpoint)], capture_output=True)
    if is_mounted(mountpoint) and os.geteuid() == 0:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
    if not is_mounted(mountpoint):
        return None
    return (result.stderr.strip().splitlines() or ["unmount failed"])[-1]


def is_stale(mountpoint: Path) -> bool:
    """A FUSE mount whose daemon is gone."""
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        return exc.errno in STALE_ERRNOS
    return False


# How long `umount` waits for a live daemon to say what it still holds.
STATUS_WAIT = 10.0


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = Path(args.mountpoint)
    kind = mount_type(mountpoint)
    if kind is None:
        if not os.path.lexists(mountpoint):
            raise UsageError(f"{mountpoint}: no such file or directory")
        return 0  # not mounted (any more): nothing to do
    if kind != "fuse.ocifs":
        raise UsageError(f"{mountpoint}: not an ocifs mount ({kind}); use umount(8)")
    found = None if is_stale(mountpoint) else status.read(mountpoint, STATUS_WAIT)
    held = None if found is None or "error" in found else found  # a dead or stuck daemon says nothing
    if held is not None:
        unpushed = [entry for entry in held.get("staged", []) if entry.get("state") != "fragment"]
        for entry in held.get("fragments", []) + [e for e in held.get("staged", []) if e not in unpushed]:
            print(f"ocifs: not pushed, kept aside: {entry.get('path')} "
                  f"({entry.get('reason') or entry.get('error')}) in {entry.get('file')}", file=sys.stderr)
        if unpushed:
            verb = "left staged" if args.force else "not pushed yet"
            print(f"ocifs: {mountpoint}: {len(unpushed)} file(s) {verb}:", file=sys.stderr)
            for entry in unpushed:
                why = f": {entry['error']}" if entry.get("error") else ""
                print(f"  {entry.get('path')} ({entry.get('state')}{why})", file=sys.stderr)
            if not args.force:
                print("ocifs: not unmounted; retry when the registry answers, or use --force "
                      "(the next mount of the same SOURCE pushes them)", file=sys.stderr)
                return 1
    reason = unmount(mountpoint, lazy=args.lazy)
    if reason is not None:
        print(f"ocifs: cannot unmount {mountpoint}: {reason}", file=sys.stderr)
        return 1
    return 0


def command_names(parser: argparse.ArgumentParser) -> list[str]:
    """The subcommands `parser` knows (whoever added them)."""
    names: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            names += list(action.choices)
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    if mountopts.is_mount_form(words, command_names(parser)):
        # `ocifs SOURCE MOUNTPOINT -o OPTS`: how fuse3's mount.fuse3 runs us for `mount -t fuse.ocifs`.
        try:
            command = mountopts.parse_mount_form(words)
        except mountopts.MountOptionError as exc:
            print(f"ocifs: {exc}", file=sys.stderr)
            return 2
        mountopts.apply_environ(command)
        words = ["mount", *command.argv]
    args = parser.parse_args(words)
    logging.basicConfig(level=logging.WARNING, format="ocifs: %(message)s")
    if args.command == "mount" and args.debug:
        logging.getLogger().setLevel(logging.DEBUG)
    try:
        if args.command == "mount":
            return cmd_mount(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "cache":
            return cmd_cache(args)
        if args.command in ("login", "logout"):
            return cmd_login(args) if args.command == "login" else cmd_logout(args)
        return cmd_umount(args)
    except UsageError as exc:
        print(f"ocifs: {exc}", file=sys.stderr)
        return 2
    except OcifsError as exc:
        print(f"ocifs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def mount_helper(argv: Sequence[str] | None = None) -> int:
    """`mount.fuse.ocifs`: the helper mount(8) runs for type fuse.ocifs when it is linked as
    /sbin/mount.fuse.ocifs (see docs/boot.md)."""
    try:
        command = mountopts.parse_helper_argv(sys.argv[1:] if argv is None else argv)
    except mountopts.MountOptionError as exc:
        print(f"mount.fuse.ocifs: {exc}", file=sys.stderr)
        return 1  # mount(8): "incorrect invocation"
    if command.fake:
        return 0
    mountopts.apply_environ(command)
    return main(["mount", *command.argv])


if __name__ == "__main__":
    sys.exit(main())
