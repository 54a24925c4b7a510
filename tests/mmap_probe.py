"""A process that maps files and touches their pages, driven by JSON lines on stdin (one
answer line on stdout per command), for the mmap tests (issue 12).

Page faults on a FUSE file block in the kernel: in the test process a hung fault could not be
interrupted by a timeout, a separate process can be killed. It also keeps mappings alive across
the steps of a test (a tag that moves under a live mapping).

Commands (`id` names a mapping):
  {"op": "map", "id": 1, "path": P, "shared": true, "populate": false,
   "advice": "random"|"sequential"|null}
      open P, mmap all of it (PROT_READ; MAP_SHARED or MAP_PRIVATE; MAP_POPULATE), close
      the descriptor (the mapping keeps the file open, as loaders' mappings do)
      -> {"size": N, "seconds": how long mmap() took}
  {"op": "touch", "id": 1, "offsets": [...], "length": 4096}
      read `length` bytes at each offset through the mapping (page faults)
      -> {"sha256": [hex per offset], "seconds": [per offset]}
  {"op": "scan", "id": 1, "step": 1048576, "start": 0, "end": null}
      read the mapping (or [start, end) of it) forward, `step` bytes at a time, as a loader
      copies a tensor out -> {"sha256": hex of those bytes, "seconds": s}
  {"op": "unmap", "id": 1} -> {}
Errors answer {"error": "...", "errno": n}.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import sys
import time
from typing import Any

ADVICE = {"random": mmap.MADV_RANDOM, "sequential": mmap.MADV_SEQUENTIAL}


def serve() -> None:
    maps: dict[int, mmap.mmap] = {}
    for line in sys.stdin:
        command: dict[str, Any] = json.loads(line)
        try:
            answer = handle(command, maps)
        except OSError as exc:
            answer = {"error": str(exc), "errno": exc.errno}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def handle(command: dict[str, Any], maps: dict[int, mmap.mmap]) -> dict[str, Any]:
    op, ident = command["op"], command.get("id", 0)
    if op == "map":
        fd = os.open(command["path"], os.O_RDONLY)
        try:
            flags = mmap.MAP_SHARED if command["shared"] else mmap.MAP_PRIVATE
            if command.get("populate"):
                flags |= mmap.MAP_POPULATE  # as llama.cpp maps a model: every page read in mmap()
            started = time.monotonic()
            mapping = mmap.mmap(fd, 0, flags=flags, prot=mmap.PROT_READ)
            seconds = time.monotonic() - started
        finally:
            os.close(fd)
        if command.get("advice"):
            mapping.madvise(ADVICE[command["advice"]])
        maps[ident] = mapping
        return {"size": len(mapping), "seconds": seconds}
    mapping = maps[ident]
    if op == "touch":
        hashes, seconds = [], []
        for offset in command["offsets"]:
            started = time.monotonic()
            data = mapping[offset:offset + command["length"]]  # the page faults happen here
            seconds.append(time.monotonic() - started)
            hashes.append(hashlib.sha256(data).hexdigest())
        return {"sha256": hashes, "seconds": seconds}
    if op == "scan":
        started = time.monotonic()
        whole = hashlib.sha256()
        step, start = command["step"], command.get("start", 0)
        end = command.get("end") or len(mapping)
        for offset in range(start, end, step):
            whole.update(mapping[offset:min(end, offset + step)])
        return {"sha256": whole.hexdigest(), "seconds": time.monotonic() - started}
    if op == "unmap":
        maps.pop(ident).close()
        return {}
    raise ValueError(f"unknown op {op!r}")


if __name__ == "__main__":
    serve()
