"""One error tree for ocifs. Each error knows the errno a filesystem caller should see.

    OcifsError                      EIO     base of everything ocifs raises on purpose
    ├── InvalidReference            EINVAL  a SOURCE, name, tag or digest that cannot be one
    ├── NotADirectory               ENOTDIR a path that goes through a file
    ├── Refused                     (given) a filesystem operation ocifs will not do here:
    │                                       EPERM, EINVAL, EXDEV, ENOTEMPTY, EBUSY, EROFS...
    ├── IntegrityError              EIO     bytes that do not match their digest or size
    ├── PushFailed                  EIO     a written file could not be pushed (it stays staged)
    ├── StoreError                  (each)  the local cache failed: the OSError's errno (ENOSPC, ...)
    ├── ManifestError               EIO     a manifest or index that cannot be parsed
    │   └── ManifestTooLarge        EFBIG   above model.MAX_MANIFEST_SIZE
    ├── AuthError                   EACCES  credentials refused, or not sendable safely
    ├── NetworkError                EHOSTUNREACH  the registry cannot be reached
    │   ├── TLSError                EHOSTUNREACH  the TLS handshake failed (`certificate`: it was
    │   │                                         the certificate; else the server speaks no TLS)
    │   └── RequestTimeout          ETIMEDOUT     no answer in time (a request, an operation)
    │       ├── ConnectTimeout      ETIMEDOUT     no connection in time: the host is suspect
    │       └── ListingTruncated    ETIMEDOUT     a paged listing cut at its page or time budget
    └── RegistryError               EIO     the registry answered with an error status
        ├── NotFound                ENOENT  NAME_UNKNOWN, MANIFEST_UNKNOWN, BLOB_UNKNOWN, 404
        ├── Unauthorized            EACCES  401 after authenticating
        ├── Denied                  EACCES  403, DENIED
        ├── Unsupported             EPERM   405, UNSUPPORTED (deletes disabled, ...)
        ├── TooManyRequests         EAGAIN  429 after the retries ran out
        ├── RangeError              EIO     a blob range answer that does not match the request
        └── ServerError             EIO     5xx after the retries ran out

Nothing below fs.py raises FUSE errors: fs.py reads `errno` from these.
"""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass


class OcifsError(Exception):
    """Base class: a message for people and an errno for the filesystem."""

    errno: int = _errno.EIO

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidReference(OcifsError):
    errno = _errno.EINVAL


class NotADirectory(OcifsError):
    errno = _errno.ENOTDIR


class Refused(OcifsError):
    """An operation the layout does not allow (a write to an image tag, a rename across
    repositories of a directory, ...); `errno` says which refusal."""

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class PushFailed(OcifsError):
    """close() of a written file: the push failed; the file stays staged."""

    errno = _errno.EIO


class IntegrityError(OcifsError):
    errno = _errno.EIO


class StoreError(OcifsError):
    """The content store on local disk failed; `errno` is set per error (ENOSPC for a full disk)."""

    def __init__(self, message: str, *, errno: int = _errno.EIO) -> None:
        super().__init__(message)
        self.errno = errno

    @classmethod
    def from_oserror(cls, exc: OSError, what: str) -> StoreError:
        """Wrap a disk error, keeping its errno (EIO when it has none)."""
        reason = exc.strerror or str(exc)
        return cls(f"{what}: {reason}", errno=exc.errno or _errno.EIO)


class ManifestError(OcifsError):
    errno = _errno.EIO


class ManifestTooLarge(ManifestError):
    errno = _errno.EFBIG


class AuthError(OcifsError):
    errno = _errno.EACCES


class NetworkError(OcifsError):
    errno = _errno.EHOSTUNREACH


class TLSError(NetworkError):
    """The TLS handshake failed: an untrusted certificate (`certificate`), or a server that
    does not speak TLS at all."""

    def __init__(self, message: str, *, certificate: bool) -> None:
        super().__init__(message)
        self.certificate = certificate


class RequestTimeout(NetworkError):
    errno = _errno.ETIMEDOUT


class ConnectTimeout(RequestTimeout):
    errno = _errno.ETIMEDOUT


class ListingTruncated(RequestTimeout):
    """A catalog or namespace listing stopped at its budget; what came before it is valid."""


@dataclass(frozen=True)
class ErrorDetail:
    """One entry of a registry's `{"errors": [...]}` body."""

    code: str
    message: str = ""


class RegistryError(OcifsError):
    """The registry answered with an error status; `code` is the first `errors[].code` if any."""

    errno = _errno.EIO

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        details: tuple[ErrorDetail, ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.details = details

    @property
    def code(self) -> str | None:
        return self.details[0].code if self.details else None


class NotFound(RegistryError):
    errno = _errno.ENOENT


class Unauthorized(RegistryError):
    errno = _errno.EACCES


class Denied(RegistryError):
    errno = _errno.EACCES


class Unsupported(RegistryError):
    errno = _errno.EPERM


class TooManyRequests(RegistryError):
    errno = _errno.EAGAIN


class RangeError(RegistryError):
    errno = _errno.EIO


class ServerError(RegistryError):
    errno = _errno.EIO
