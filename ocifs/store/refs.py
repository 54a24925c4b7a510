"""Mutable registry metadata kept on disk: tag lists, tag -> digest, catalogs.

Only for when the registry cannot be reached (`--offline`, or a registry gone while
mounted): the last answer seen is served instead of an error. Entries are small JSON files
named by a hash of their key, written atomically (temporary file + rename), private (0600).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from .layout import DIR_MODE, FILE_MODE

log = logging.getLogger(__name__)


class RefStore:
    """Last-known answers by (namespace, kind, key). Failures are logged, never raised:
    this is a fallback, not a source of truth."""

    def __init__(self, root: str | Path, namespace: str) -> None:
        self.directory = Path(root) / "refs" / hashlib.sha256(namespace.encode()).hexdigest()[:32]
        self._ready = False

    def _path(self, kind: str, key: str) -> Path:
        name = hashlib.sha256(f"{kind}\0{key}".encode("utf-8", "surrogateescape")).hexdigest()
        return self.directory / name

    def save(self, kind: str, key: str, value: Any) -> None:
        try:
            if not self._ready:
                self.directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
                os.chmod(self.directory.parent, DIR_MODE)
                os.chmod(self.directory, DIR_MODE)
                self._ready = True
            data = json.dumps({"kind": kind, "key": key, "value": value}).encode()
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
            try:
                os.fchmod(fd, FILE_MODE)
                os.write(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, self._path(kind, key))
        except OSError as exc:
            log.info("could not keep %s %s for offline use: %s", kind, key, exc)

    def is_empty(self) -> bool:
        """No answer kept (or none readable)."""
        try:
            return not any(not entry.name.startswith(".tmp-") for entry in os.scandir(self.directory))
        except OSError:
            return True

    def load(self, kind: str, key: str) -> Any:
        """The saved value, or None."""
        try:
            data = json.loads(self._path(kind, key).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.info("unusable offline entry for %s %s: %s", kind, key, exc)
            return None
        if not isinstance(data, dict) or data.get("kind") != kind or data.get("key") != key:
            return None
        return data.get("value")
