"""The only code that speaks HTTP: the distribution API, auth, transport, Docker Hub."""

from .auth import Credentials
from .client import ClientOptions, RegistryClient
from .transport import TransportOptions

__all__ = ["ClientOptions", "Credentials", "RegistryClient", "TransportOptions"]
