"""Deadlines of filesystem operations (DESIGN.md section 1: `--timeout` is the deadline of
one operation that needs the network, however the server trickles).

A deadline belongs to the thread that runs the operation: `with limit(seconds):` sets it
(nested limits only shorten it), and everything below that waits on the network in that
thread asks `remaining()`: request timeouts are clamped to it, retries stop before it, body
reads are cut at it, and waits for another thread's download end at it. Threads without a
deadline (background downloads, pushes) keep their per-request timeouts only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import RequestTimeout

_local = threading.local()


@contextmanager
def limit(seconds: float | None) -> Iterator[None]:
    """Run the block with a deadline `seconds` from now (None: no new limit)."""
    previous: float | None = getattr(_local, "at", None)
    at = previous
    if seconds is not None:
        mine = time.monotonic() + seconds
        at = mine if previous is None else min(previous, mine)
    _local.at = at
    try:
        yield
    finally:
        _local.at = previous


def at() -> float | None:
    """The monotonic time of this thread's deadline, if it has one."""
    return getattr(_local, "at", None)


def remaining() -> float | None:
    """Seconds left before this thread's deadline (may be negative), or None."""
    deadline = at()
    return None if deadline is None else deadline - time.monotonic()


def check(what: str) -> None:
    """RequestTimeout (ETIMEDOUT) when this thread's deadline has passed."""
    left = remaining()
    if left is not None and left <= 0:
        raise RequestTimeout(f"{what}: timed out (the operation's deadline, --timeout)")


def clamp(seconds: float) -> float:
    """`seconds`, or less when the deadline comes sooner (never below a few ms)."""
    left = remaining()
    return seconds if left is None else max(0.005, min(seconds, left))


def acquire(lock: threading.Lock, what: str) -> None:
    """Take `lock`, waiting until the deadline (for ever without one); RequestTimeout after it."""
    left = remaining()
    if not lock.acquire(timeout=-1 if left is None else max(0.0, left)):
        raise RequestTimeout(f"{what}: timed out (the operation's deadline, --timeout)")


def wait(event: threading.Event, what: str) -> None:
    """Wait for `event` until the deadline (for ever without one); RequestTimeout after it."""
    left = remaining()
    if left is None:
        event.wait()
    elif not event.wait(max(0.0, left)):
        raise RequestTimeout(f"{what}: timed out (the operation's deadline, --timeout)")
