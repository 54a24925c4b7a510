"""`ocifs login` / `ocifs logout`, and asking the user for credentials.

Login checks the credentials with a real authenticated request (GET /v2/ through the usual
Basic or token flow) before anything is stored; storing and erasing follow `docker login` and
live with the reading of Docker's config in auth.py. Secrets are never printed or logged.
"""

from __future__ import annotations

import getpass
import sys
from typing import TextIO

from .. import deadline
from ..errors import AuthError, OcifsError
from ..reference import Registry
from .auth import Credentials, erase_credentials, store_credentials
from .client import ClientOptions, RegistryClient


class CredentialsInputError(OcifsError):
    """What the user gave (or could not be asked for) is not usable: a usage problem."""


def read_credentials(
    username: str | None,
    password_stdin: bool,
    *,
    prompt_username: bool,
    stdin: TextIO | None = None,
) -> Credentials:
    """The username and password as `docker login` asks for them.

    `--password-stdin` reads all of standard input (trailing newline dropped) and needs a
    username. Otherwise the password is asked for with getpass, which needs a terminal: with
    standard input not one, this fails at once rather than hang or read a pipe by surprise.
    A missing username is asked for on the terminal when `prompt_username`.
    """
    stream = stdin if stdin is not None else sys.stdin
    interactive = _isatty(stream)
    if password_stdin:
        if not username:
            raise CredentialsInputError("--password-stdin needs --username")
        password = stream.read()
        # Like docker: drop the line end a file or `echo` adds, nothing else.
        password = password[:-1] if password.endswith("\n") else password
        password = password[:-1] if password.endswith("\r") else password
        return Credentials(username, password)
    if not interactive:
        what = "--username with --password-stdin" if prompt_username else "--password-stdin"
        raise CredentialsInputError(
            f"standard input is not a terminal: cannot ask for the password; give {what}")
    if not username:
        if not prompt_username:
            raise CredentialsInputError("a password needs --username")
        sys.stderr.write("Username: ")
        sys.stderr.flush()
        username = stream.readline().strip()
        if not username:
            raise CredentialsInputError("no username given")
    password = getpass.getpass("Password: ")
    if not password:
        raise CredentialsInputError("no password given")
    return Credentials(username, password)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def verify_credentials(registry: Registry, credentials: Credentials, options: ClientOptions,
                       *, timeout: float) -> None:
    """A real authenticated GET /v2/: AuthError when the registry refuses the credentials."""
    client = RegistryClient(registry, options, lambda: credentials)
    try:
        with deadline.limit(timeout):
            client.ping()
    except AuthError as exc:
        text = str(exc)
        raise AuthError(text if "refused" in text else f"{registry}: login refused: {text}") from None


def login(registry: Registry, credentials: Credentials, options: ClientOptions, *,
          timeout: float, config_dir: str | None = None) -> str:
    """Verify, then store as docker does. Returns where they went. Nothing is stored when the
    registry refuses them or cannot be reached."""
    verify_credentials(registry, credentials, options, timeout=timeout)
    return store_credentials(registry, credentials, config_dir=config_dir, timeout=timeout)


def logout(registry: Registry, *, config_dir: str | None = None, timeout: float = 10) -> bool:
    """Remove the stored credentials (helper and config.json). True when there were some."""
    return erase_credentials(registry, config_dir=config_dir, timeout=timeout)
