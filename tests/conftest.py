"""Session fixtures: real registries (anonymous and htpasswd), clients, unique names."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ocifs.reference import Registry
from ocifs.registry import ClientOptions, Credentials, RegistryClient, TransportOptions

from .registry_server import RunningRegistry, start_registry

TEST_USER = "ocifs-user"
TEST_PASSWORD = "s3cret-pässword"  # non-ASCII on purpose

_names = itertools.count()


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
