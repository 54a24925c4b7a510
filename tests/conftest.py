"""Session fixtures: real registries (anonymous and htpasswd), clients, unique names."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ocifs.reference import Registry
from ocifs.registry import ClientOptions, Credentials, RegistryClient, TransportOptions
from ocifs.store import BlobStore

from .fakeserver import FakeServer
from .faultproxy import FaultProxy
from .mounts import fuse_mounts_under, mount, unmount
from .registry_server import RunningRegistry, start_registry

TEST_USER = "ocifs-user"
TEST_PASSWORD = "s3cret-pässword"  # non-ASCII on purpose

_names = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def _private_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """oras-py's login writes ~/.docker/config.json, which ocifs reads for credentials: the
    session gets its own HOME and DOCKER_CONFIG, so tests neither see nor touch the user's."""
    home = tmp_path_factory.mktemp("home")
    saved = {name: os.environ.get(name) for name in ("HOME", "DOCKER_CONFIG", "XDG_CACHE_HOME")}
    os.environ["HOME"] = str(home)
    os.environ["DOCKER_CONFIG"] = str(tmp_path_factory.mktemp("docker-config"))  # not where oras-py writes
    os.environ["XDG_CACHE_HOME"] = str(home / ".cache")
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """Debian's docker-registry, anonymous, deletes enabled, catalog pages of 3."""
    server = start_registry(tmp_path_factory.mktemp("registry"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """The same server behind htpasswd (Basic) authentication."""
    server = start_registry(
        tmp_path_factory.mktemp("auth-registry"), username=TEST_USER, password=TEST_PASSWORD
    )
    yield server
    server.stop()


def make_client(server: RunningRegistry, *, credentials: Credentials | None = None,
                page_size: int | None = None) -> RegistryClient:
    return RegistryClient(
        Registry.parse(server.host),
        ClientOptions(page_size=page_size,
                      transport=TransportOptions(connect_timeout=5, read_timeout=20, backoff=0.05)),
        lambda: credentials,
    )


@pytest.fixture
def servers() -> Iterator[Callable[[], FakeServer]]:
    """`servers()` starts a scripted HTTP server (fakeserver.py); all closed at the end, and
    a handler that raised fails the test."""
    made: list[FakeServer] = []

    def make() -> FakeServer:
        server = FakeServer()
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()
    errors = [e for s in made for e in s.errors]
    assert not errors, f"fake server handlers raised: {errors!r}"


@pytest.fixture
def proxy(registry: RunningRegistry) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the anonymous registry (see faultproxy.py)."""
    instance = FaultProxy(registry.host)
    try:
        yield instance
    finally:
        instance.close()


@pytest.fixture
def client(registry: RunningRegistry) -> RegistryClient:
    return make_client(registry)


@pytest.fixture
def auth_client(auth_registry: RunningRegistry) -> RegistryClient:
    return make_client(auth_registry, credentials=Credentials(TEST_USER, TEST_PASSWORD))


@pytest.fixture
def repo() -> str:
    """A repository name no other test uses (the registry lives for the whole session)."""
    return f"test/r{os.getpid()}-{next(_names)}"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


# ---- mounts ----------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_mounted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Whatever happens in a test, the session ends with nothing mounted."""
    base = tmp_path_factory.getbasetemp()
    yield
    for mountpoint in fuse_mounts_under(base):
        unmount(mountpoint)


class Mounter:
    """`mounter(source, *options)` mounts with the real `ocifs` command; all unmounted at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.cache_dir = tmp_path / "cache"
        self.mounted: list[Path] = []

    def __call__(self, source: str, *options: str, cache_dir: Path | None = None) -> Path:
        mountpoint = self.tmp_path / f"mnt{len(self.mounted)}"
        self.mounted.append(mountpoint)
        return mount(source, mountpoint, *options, cache_dir=cache_dir or self.cache_dir)

    def unmount_all(self) -> None:
        for mountpoint in self.mounted:
            unmount(mountpoint)


@pytest.fixture
def mounter(tmp_path: Path) -> Iterator[Mounter]:
    instance = Mounter(tmp_path)
    try:
        yield instance
    finally:
        instance.unmount_all()


# ---- store tests (test_store*.py): a cache root, and stores closed at teardown ----------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def stores() -> Iterator[list[BlobStore]]:
    """Stores to close at teardown, so no worker thread outlives its test."""
    made: list[BlobStore] = []
    yield made
    for store in made:
        store.close()
