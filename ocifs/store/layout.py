"""Where things live under a store's root, and keeping that tree private (0700).

    <root>/blobs/<algorithm>/<hex>        complete, verified blobs (never written in place)
    <root>/partial/<algorithm>/<hex>      sparse data file of a blob being downloaded
    <root>/partial/<algorithm>/<hex>.map  its chunk map (see files.py)
    <root>/tmp/                           files being copied or written before a rename
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from pathlib import Path

from ..digest import Digest
from ..errors import StoreError

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
MAP_SUFFIX = ".map"


class Layout:
    """Paths of one store root; creates directories 0700 on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.partial = root / "partial"
        self.tmp = root / "tmp"
        self._made: set[Path] = set()
        self._lock = threading.Lock()

    def create(self) -> None:
        for path in (self.root, self.blobs, self.partial, self.tmp):
            self._mkdir(path)

    def prepare(self, digest: Digest) -> None:
        """Create the per-algorithm directories a digest needs."""
        self._mkdir(self.blobs / digest.algorithm)
        self._mkdir(self.partial / digest.algorithm)

    def blob(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.hex

    def partial_data(self, digest: Digest) -> Path:
        return self.partial / digest.algorithm / digest.hex

    def partial_map(self, digest: Digest) -> Path:
        return self.partial / digest.algorithm / (digest.hex + MAP_SUFFIX)

    def _mkdir(self, path: Path) -> None:
        with self._lock:
            if path in self._made:
                return
            try:
                path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError.from_oserror(exc, f"cannot create cache directory {path}") from exc
            try:
                # chmod even when it existed: the cache holds what the user's credentials fetched.
                if stat.S_IMODE(path.stat().st_mode) != DIR_MODE:
                    os.chmod(path, DIR_MODE)
            except OSError as exc:
                if exc.errno != errno.EROFS:
                    raise StoreError.from_oserror(exc, f"cannot make cache directory {path} private") from exc
                # A read-only cache still serves what it holds.
                log.warning("cache directory %s is read-only: serving what it holds", path)
            self._made.add(path)
