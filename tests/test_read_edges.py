"""Edges of the read-only tree, the FUSE adapter and the mount command (DESIGN.md sections
1, 2 and 5), through real mounts and real programs, against the test registry and against
scripted hostile registries."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from ocifs.digest import Digest
from ocifs.model import (
    ANNOTATION_TITLE,
    EMPTY_DESCRIPTOR,
    EMPTY_JSON,
    OCI_INDEX,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
)
from ocifs.registry import RegistryClient

from .conftest import TEST_PASSWORD, TEST_USER, Mounter, make_client
from .content import push_artifact, push_layers
from .fakeserver import FakeServer, Reply, Request, error_reply
from .helpers import allocated_bytes, errno_of, run
from .mounts import force_unmount, mount_entry, mountinfo_lines, ocifs, parse_mountinfo_line
from .registry_server import RunningRegistry

MiB = 1024 * 1024


def mounted_at(path: Path) -> tuple[str, str] | None:
    """(per-mount options, super options) of the mount on `path`, or None."""
    entry = mount_entry(path)
    return None if entry is None else (entry.options, entry.super_options)


# ---- a scripted registry --------------------------------------------------------------------


def layer_dict(data: bytes, title: str | None = None, media_type: str = OCI_LAYER_TAR) -> dict[str, Any]:
    item: dict[str, Any] = {"mediaType": media_type, "digest": str(Digest.of(data)), "size": len(data)}
    if title is not None:
        item["annotations"] = {ANNOTATION_TITLE: title}
    return item


def raw_manifest(layers: Sequence[dict[str, Any]], **extra: Any) -> bytes:
    """An OCI manifest as JSON with ASCII escapes (so lone surrogates survive as `\\ud800`)."""
    data = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.unknown.artifact.v1",
            "config": EMPTY_DESCRIPTOR.to_dict(), "layers": list(layers), **extra}
    return json.dumps(data).encode()


def raw_index(entries: Sequence[tuple[bytes, dict[str, str] | None, dict[str, str] | None]]) -> bytes:
    manifests = []
    for raw, platform, notes in entries:
        media_type = json.loads(raw).get("mediaType", OCI_MANIFEST)
        item: dict[str, Any] = {"mediaType": media_type, "digest": str(Digest.of(raw)), "size": len(raw)}
        if platform is not None:
            item["platform"] = platform
        if notes:
            item["annotations"] = notes
        manifests.append(item)
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()


class FakeRegistry:
    """A registry on a FakeServer: repositories of tags -> manifest bytes, blobs by digest,
    an optional catalog (any strings), optional raw tag lists (any strings)."""

    def __init__(self) -> None:
        self.server = FakeServer()
        self.manifests: dict[str, dict[str, bytes]] = {}  # repo -> reference -> raw
        self.tag_lists: dict[str, list[str]] = {}
        self.blobs: dict[str, bytes] = {}
        self.catalog: list[str] | None = None
        self.missing_blobs: set[str] = set()
        self.missing_manifests: set[str] = set()
        self.hang = threading.Event()
        self.tag_page: int | None = None
        s = self.server
        s.route("*", "/v2/.*", self._dispatch)
        s.route("*", "/v2/", self._dispatch)

    @property
    def host(self) -> str:
        return self.server.host

    def add_blob(self, data: bytes) -> Digest:
        digest = Digest.of(data)
        self.blobs[str(digest)] = data
        return digest

    def add_manifest(self, repo: str, tag: str | None, raw: bytes) -> Digest:
        digest = Digest.of(raw)
        refs = self.manifests.setdefault(repo, {})
        refs[str(digest)] = raw
        if tag is not None:
            refs[tag] = raw
            tags = self.tag_lists.setdefault(repo, [])
            if tag not in tags:
                tags.append(tag)
        return digest

    def add_artifact(self, repo: str, tag: str | None, files: Sequence[tuple[str | None, bytes]]) -> Digest:
        self.add_blob(EMPTY_JSON)
        for _, data in files:
            self.add_blob(data)
        return self.add_manifest(repo, tag, raw_manifest([layer_dict(d, t) for t, d in files]))

    def _dispatch(self, request: Request) -> Reply | None:
        if self.hang.is_set():
            request.hang(30)
            return None
        path = request.path
        if path == "/v2/":
            return Reply(200, {})
        if path == "/v2/_catalog":
            if self.catalog is None:
                return error_reply(404, "UNSUPPORTED")
            return Reply(200, {"repositories": self.catalog})
        match = re.fullmatch(r"/v2/(.+)/tags/list", path)
        if match:
            repo = match.group(1)
            if repo not in self.tag_lists:
                return error_reply(404, "NAME_UNKNOWN")
            tags = self.tag_lists[repo]
            if self.tag_page:
                last = request.query.get("last", [None])[0]
                start = tags.index(last) + 1 if last in tags else 0
                page = tags[start:start + self.tag_page]
                headers = {}
                if start + self.tag_page < len(tags):
                    headers["Link"] = f'</v2/{repo}/tags/list?last={page[-1]}>; rel="next"'
                return Reply(200, {"name": repo, "tags": page}, headers)
            return Reply(200, {"name": repo, "tags": tags})
        match = re.fullmatch(r"/v2/(.+)/manifests/([^/]+)", path)
        if match:
            repo, ref = match.groups()
            raw = self.manifests.get(repo, {}).get(ref)
            if raw is None or str(Digest.of(raw)) in self.missing_manifests:
                return error_reply(404, "MANIFEST_UNKNOWN")
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = None
            media_type = (doc.get("mediaType") if isinstance(doc, dict) else None) or OCI_MANIFEST
            headers = {"Content-Type": media_type, "Docker-Content-Digest": str(Digest.of(raw)),
                       "Content-Length": str(len(raw))}
            return Reply(200, b"" if request.method == "HEAD" else raw, headers)
        match = re.fullmatch(r"/v2/(.+)/blobs/([^/]+)", path)
        if match:
            digest = match.group(2)
            data = self.blobs.get(digest)
            if data is None or digest in self.missing_blobs:
                return error_reply(404, "BLOB_UNKNOWN")
            return Reply(200, b"" if request.method == "HEAD" else data,
                         {"Content-Length": str(len(data)), "Content-Type": "application/octet-stream"})
        return error_reply(404, "NOT_FOUND")

    def close(self) -> None:
        self.hang.clear()
        self.server.close()


@pytest.fixture
def fake() -> Any:
    registry = FakeRegistry()
    try:
        yield registry
    finally:
        registry.close()


def name_of(data: bytes, ext: str = ".tar") -> str:
    return Digest.of(data).filename + ext


# ---- hostile manifests ----------------------------------------------------------------------


def test_a_title_with_a_lone_surrogate_is_named_by_digest(fake: FakeRegistry, mounter: Mounter) -> None:
    fake.add_artifact("hostile/repo", "t", [("ok.txt", b"fine"), ("bad\ud800name", b"surrogate")])
    mnt = mounter(f"{fake.host}/hostile/repo")
    assert sorted(os.listdir(mnt / "t")) == sorted(["ok.txt", name_of(b"surrogate")])
    assert (mnt / "t" / name_of(b"surrogate")).read_bytes() == b"surrogate"


def test_odd_and_long_titles(fake: FakeRegistry, mounter: Mounter) -> None:
    longest = "l" * 255
    files = [
        (longest, b"255 bytes is fine"),
        ("m" * 256, b"256 bytes is too long"),
        ("é" * 128, b"256 bytes in utf-8"),
        ("é" * 127 + "x", b"255 bytes in utf-8"),
        ("nul\0byte", b"nul"),
        ("back\\slash", b"backslash"),
        ("new\nline", b"newline"),
        ("deep/" * 30 + "leaf", b"thirty levels"),
        ("..", b"dotdot"),
        ("a/../b", b"dotdot inside"),
        ("trailing/", b"trailing slash"),
        ("//double", b"double slash"),
        (".config.json", b"reserved config"),
        (".manifest.json/x", b"under a reserved name"),
    ]
    fake.add_artifact("hostile/titles", "t", files)
    mnt = mounter(f"{fake.host}/hostile/titles")
    tag = mnt / "t"
    expected = {longest, "é" * 127 + "x", "back\\slash", "deep"} | {
        name_of(d) for t, d in files
        if t in ("m" * 256, "é" * 128, "nul\0byte", "new\nline", "..", "a/../b", "trailing/", "//double",
                 ".config.json", ".manifest.json/x")}
    assert set(os.listdir(tag)) == expected
    assert (tag / longest).read_bytes() == b"255 bytes is fine"
    assert (tag / ("é" * 127 + "x")).stat().st_size == len(b"255 bytes in utf-8")
    assert (tag / Path(*(["deep"] * 30), "leaf")).read_bytes() == b"thirty levels"
    assert (tag / name_of(b"reserved config")).read_bytes() == b"reserved config"
    assert (tag / ".config.json").read_bytes() == b"{}"
    found = run("find", str(tag), "-type", "f", "-print0").stdout.split("\0")[:-1]
    assert len(found) == len(files)
    assert all(os.path.realpath(p).startswith(str(tag) + "/") for p in found)


def test_a_title_spoofing_a_digest_name_hides_no_layer(fake: FakeRegistry, mounter: Mounter) -> None:
    real = b"the real layer"
    fake.add_artifact("hostile/spoof", "t", [(name_of(real), b"impostor bytes"), (None, real)])
    mnt = mounter(f"{fake.host}/hostile/spoof")
    tag = mnt / "t"
    names = os.listdir(tag)
    assert len(names) == 2  # every layer is reachable under some name
    # A file named after a digest holds the bytes of that digest.
    for name in names:
        if name.startswith("sha256-"):
            hexpart = name.split("-", 1)[1].split(".", 1)[0]
            assert os.getxattr(tag / name, "user.oci.digest").decode() == f"sha256:{hexpart}"


def test_a_platform_spoofing_a_digest_name_hides_no_manifest(fake: FakeRegistry, mounter: Mounter) -> None:
    repo = "hostile/spoofidx"
    impostor = fake.add_artifact(repo, None, [("f", b"impostor")])
    real = fake.add_artifact(repo, None, [("f", b"real")])
    raws = fake.manifests[repo]
    fake.add_manifest(repo, "idx", raw_index([
        (raws[str(impostor)], {"os": "sha256", "architecture": real.hex}, None),
        (raws[str(real)], None, None)]))
    mnt = mounter(f"{fake.host}/{repo}", "--read-only")
    names = os.listdir(mnt / "idx")
    assert len(names) == 2
    assert os.getxattr(mnt / "idx" / real.filename, "user.oci.digest").decode() == str(real)


def test_duplicate_platforms_nested_indexes_and_attestations(fake: FakeRegistry, mounter: Mounter) -> None:
    repo = "hostile/multi"
    amd_a = fake.add_artifact(repo, None, [("a.txt", b"amd64 first")])
    amd_b = fake.add_artifact(repo, None, [("a.txt", b"amd64 second")])
    arm = fake.add_artifact(repo, None, [("a.txt", b"arm64 in the inner index")])
    s390 = fake.add_artifact(repo, None, [("a.txt", b"s390x in the inner index")])
    att = fake.add_artifact(repo, None, [("sbom", b"attestation")])
    raws = fake.manifests[repo]
    inner = raw_index([(raws[str(arm)], {"os": "linux", "architecture": "arm64"}, None),
                       (raws[str(s390)], {"os": "linux", "architecture": "s390x"}, None)])
    inner_digest = fake.add_manifest(repo, None, inner)
    inner_with_platform = raw_index([(raws[str(arm)], {"os": "linux", "architecture": "arm64"}, None)])
    inner_platform_digest = fake.add_manifest(repo, None, inner_with_platform)
    outer = raw_index([
        (raws[str(amd_a)], {"os": "linux", "architecture": "amd64"}, None),
        (raws[str(amd_b)], {"os": "linux", "architecture": "amd64"}, None),
        (inner, None, None),
        (inner_with_platform, {"os": "windows", "architecture": "amd64"}, None),
        (raws[str(att)], {"os": "unknown", "architecture": "unknown"},
         {"vnd.docker.reference.type": "attestation-manifest"}),
    ])
    outer_digest = fake.add_manifest(repo, "multi", outer)
    mnt = mounter(f"{fake.host}/{repo}", "--read-only")
    multi = mnt / "multi"
    assert sorted(os.listdir(multi)) == sorted(
        ["linux-amd64", amd_b.filename, inner_digest.filename, "windows-amd64"])
    assert (multi / "linux-amd64" / "a.txt").read_bytes() == b"amd64 first"
    assert (multi / amd_b.filename / "a.txt").read_bytes() == b"amd64 second"
    assert sorted(os.listdir(multi / inner_digest.filename)) == ["linux-arm64", "linux-s390x"]
    assert (multi / inner_digest.filename / "linux-s390x" / "a.txt").read_bytes() == b"s390x in the inner index"
    assert (multi / "windows-amd64" / "linux-arm64" / "a.txt").read_bytes() == b"arm64 in the inner index"
    assert (multi / inner_digest.filename / ".manifest.json").read_bytes() == inner
    assert (multi / ".manifest.json").read_bytes() == outer
    assert os.getxattr(multi, "user.oci.digest").decode() == str(outer_digest)
    assert os.getxattr(multi / "windows-amd64", "user.oci.digest").decode() == str(inner_platform_digest)
    assert os.getxattr(multi / "windows-amd64", "user.oci.mediatype").decode() == OCI_INDEX
    assert errno_of(lambda: (multi / ".config.json").read_bytes()) == errno.ENOENT
    assert errno_of(lambda: os.stat(multi / att.filename)) == errno.ENOENT  # attestations are not there
    files = run("find", str(multi), "-type", "f").stdout.split()
    assert len(files) == 5
    pinned = mounter(f"{fake.host}/{repo}@{outer_digest}", "--read-only")
    assert sorted(os.listdir(pinned)) == sorted(os.listdir(multi))
    assert (pinned / inner_digest.filename / "linux-arm64" / "a.txt").read_bytes() == b"arm64 in the inner index"
    assert os.getxattr(pinned, "user.oci.mediatype").decode() == OCI_INDEX
    listing = run("tar", "cvf", "/dev/null", "-C", str(mnt), "multi").stdout.split()
    assert sorted(p for p in listing if not p.endswith("/")) == sorted(
        os.path.relpath(p, mnt) for p in files)


def test_broken_manifests_fail_alone_with_real_errnos(fake: FakeRegistry, mounter: Mounter) -> None:
    repo = "hostile/broken"
    fake.add_artifact(repo, "good", [("g.txt", b"good")])
    fake.add_manifest(repo, "notjson", b"{this is not json")
    fake.add_manifest(repo, "array", b"[1, 2, 3]")
    fake.add_manifest(repo, "negsize", raw_manifest([{"mediaType": OCI_LAYER_TAR, "size": -1,
                                                       "digest": str(Digest.of(b"x"))}]))
    fake.add_manifest(repo, "baddigest", raw_manifest([{"mediaType": OCI_LAYER_TAR, "size": 1,
                                                         "digest": "sha256:../../etc/passwd"}]))
    fake.add_manifest(repo, "layersobj", raw_manifest({"not": "a list"}))  # type: ignore[arg-type]
    fake.add_manifest(repo, "schema1", json.dumps({"schemaVersion": 1, "name": repo}).encode())
    fake.tag_lists[repo].append("ghost")  # listed, but HEAD and GET answer 404
    mnt = mounter(f"{fake.host}/{repo}", "--read-only", "--timeout", "5")
    assert sorted(os.listdir(mnt)) == sorted(["good", "notjson", "array", "negsize", "baddigest",
                                              "layersobj", "schema1", "ghost"])
    started = time.monotonic()
    for tag in ("notjson", "array", "negsize", "baddigest", "layersobj", "schema1"):
        assert errno_of(lambda tag=tag: os.listdir(mnt / tag)) == errno.EIO, tag
    assert errno_of(lambda: os.listdir(mnt / "ghost")) == errno.ENOENT
    assert time.monotonic() - started < 10
    # ls -l of the repository shows every tag it can, and says which it cannot.
    listing = run("ls", "-l", str(mnt), check=False)
    assert listing.returncode != 0
    assert "good" in listing.stdout
    assert (mnt / "good" / "g.txt").read_bytes() == b"good"


def test_index_entries_the_registry_lost(fake: FakeRegistry, mounter: Mounter) -> None:
    repo = "hostile/lostidx"
    kept = fake.add_artifact(repo, None, [("k.txt", b"kept")])
    lost = fake.add_artifact(repo, None, [("l.txt", b"lost manifest")])
    raws = fake.manifests[repo]
    fake.add_manifest(repo, "idx", raw_index([
        (raws[str(kept)], {"os": "linux", "architecture": "amd64"}, None),
        (raws[str(lost)], {"os": "linux", "architecture": "arm64"}, None)]))
    fake.missing_manifests.add(str(lost))
    mnt = mounter(f"{fake.host}/{repo}", "--read-only", "--timeout", "5")
    assert sorted(os.listdir(mnt / "idx")) == ["linux-amd64", "linux-arm64"]
    assert (mnt / "idx" / "linux-amd64" / "k.txt").read_bytes() == b"kept"
    assert errno_of(lambda: os.listdir(mnt / "idx" / "linux-arm64")) in (errno.ENOENT, errno.EIO)
    assert (mnt / "idx" / "linux-amd64" / "k.txt").read_bytes() == b"kept"


def test_a_blob_the_registry_lost_fails_reads_with_eio(fake: FakeRegistry, mounter: Mounter) -> None:
    repo = "hostile/lostblob"
    data = os.urandom(100_000)
    fake.add_artifact(repo, "files", [("gone.bin", data), ("here.txt", b"here")])
    fake.missing_blobs.add(str(Digest.of(data)))
    mnt = mounter(f"{fake.host}/{repo}", "--read-only", "--timeout", "5")
    files = mnt / "files"
    assert sorted(os.listdir(files)) == ["gone.bin", "here.txt"]
    assert (files / "gone.bin").stat().st_size == len(data)  # from the descriptor, no fetch
    assert (files / "here.txt").read_bytes() == b"here"
    with open(files / "gone.bin", "rb") as f, pytest.raises(OSError) as caught:  # open works: it is there
        f.read()
    assert caught.value.errno == errno.EIO, caught.value


def test_invalid_catalog_names_and_tags_are_never_shown_nor_asked(fake: FakeRegistry, mounter: Mounter) -> None:
    fake.catalog = ["good/repo", "Bad/Upper", "../etc", "a//b", "x/../y", "ok", "-dash", "", "sp ace/r",
                    "trail/", "good/repo/..", 7]  # type: ignore[list-item]
    fake.add_artifact("good/repo", "v1", [("f", b"good")])
    fake.add_artifact("ok", "latest", [("f", b"ok")])
    fake.tag_lists["good/repo"] += ["-bad", ".hidden", "../up", "a" * 129, "sha256:abc", "with space",
                                    "", "ok.tag_1-X"]
    fake.add_artifact("good/repo", "ok.tag_1-X", [("f", b"odd but valid")])
    mnt = mounter(fake.host, "--read-only")
    assert sorted(os.listdir(mnt)) == ["good", "ok"]
    assert os.listdir(mnt / "good") == ["repo"]
    assert sorted(os.listdir(mnt / "good" / "repo")) == ["ok.tag_1-X", "v1"]
    assert (mnt / "good" / "repo" / "ok.tag_1-X" / "f").read_bytes() == b"odd but valid"
    before = len(fake.server.requests)
    for name in ("-bad", ".hidden", "with space", "..."):
        assert errno_of(lambda name=name: os.stat(mnt / "good" / "repo" / name)) == errno.ENOENT, name
    for name in ("Bad", "-dash", "sp ace", "UPPER"):
        assert errno_of(lambda name=name: os.stat(mnt / name)) == errno.ENOENT, name
    asked = [r.target for r in fake.server.requests[before:]]
    assert not [t for t in asked if "bad" in t.lower() or "hidden" in t or "space" in t or "dash" in t
                or "..." in t], asked


def test_big_directories_of_tags_across_pages(fake: FakeRegistry, mounter: Mounter) -> None:
    repo = "big/tags"
    raw_one = fake.add_artifact(repo, "t0000", [("n.txt", b"first")])
    raw = fake.manifests[repo][str(raw_one)]
    tags = [f"t{i:04d}" for i in range(700)]
    for tag in tags[1:]:
        fake.add_manifest(repo, tag, raw)
    fake.tag_lists[repo].reverse()  # the registry's order is not ours
    fake.tag_page = 100
    mnt = mounter(f"{fake.host}/{repo}", "--read-only")
    assert os.listdir(mnt) == tags or sorted(os.listdir(mnt)) == tags
    assert run("ls", str(mnt)).stdout.split() == tags
    assert len(run("find", str(mnt), "-maxdepth", "1", "-mindepth", "1", "-type", "d").stdout.split()) == 700
    assert (mnt / "t0699" / "n.txt").read_bytes() == b"first"
    inodes = {os.stat(mnt / tag).st_ino for tag in tags[:50]}
    assert len(inodes) == 50


# ---- Docker Hub -----------------------------------------------------------------------------


def test_docker_hub_whole_registry_and_official_images(client: RegistryClient, registry: RunningRegistry,
                                                       mounter: Mounter) -> None:
    official = f"off{os.getpid()}"
    namespace = f"hubwide{os.getpid()}"
    digest = push_artifact(client, f"library/{official}", "1.0", {"o.txt": b"official image"})
    push_artifact(client, f"{namespace}/app", "latest", {"a.txt": b"namespaced"})
    push_artifact(client, f"{namespace}x/hidden", "latest", {"h.txt": b"unlisted"})
    hub = FakeServer()
    listings = {"library": [official, "notpushed"], namespace: ["app"]}

    def page(request: Request) -> Reply:
        ns = request.path.split("/")[3]
        if ns == f"{namespace}x":
            return Reply(403, {"message": "forbidden"})
        if ns not in listings:
            return Reply(404, {"message": "not found"})
        return Reply(200, {"count": len(listings[ns]), "next": None,
                           "results": [{"name": n, "namespace": ns} for n in listings[ns]]})

    hub.route("GET", "/v2/namespaces/[^/]+/repositories", page)
    try:
        common = ("--read-only", "--mirror", registry.url, "--hub-url", hub.origin)
        whole = mounter("docker.io", *common)
        assert sorted(os.listdir(whole / "library")) == sorted([official, "notpushed"])
        assert os.listdir(whole / "library" / official) == ["1.0"]
        assert (whole / "library" / official / "1.0" / "o.txt").read_bytes() == b"official image"
        assert os.listdir(whole / namespace) == ["app"]
        assert (whole / namespace / "app" / "latest" / "a.txt").read_bytes() == b"namespaced"
        # A namespace the Hub API will not list still reaches its repositories by name.
        assert os.listdir(whole / f"{namespace}x") == []
        assert (whole / f"{namespace}x" / "hidden" / "latest" / "h.txt").read_bytes() == b"unlisted"
        assert os.listdir(whole) == []  # Docker Hub has no catalog
        # docker.io/<name>:<tag> is library/<name>:<tag>, on every alias of Docker Hub.
        for host in ("docker.io", "index.docker.io", "registry-1.docker.io"):
            pinned = mounter(f"{host}/{official}:1.0", *common)
            assert os.listdir(pinned) == ["o.txt"]
        by_digest = mounter(f"docker.io/{official}@{digest}", *common)
        assert (by_digest / "o.txt").read_bytes() == b"official image"
        assert os.getxattr(by_digest, "user.oci.digest").decode() == str(digest)
        # A one-component path without a tag is a namespace.
        ns = mounter(f"docker.io/{namespace}", *common)
        assert os.listdir(ns) == ["app"]
    finally:
        hub.close()


# ---- mount options ----------------------------------------------------------------------------


def test_a_pinned_source_whose_tag_does_not_exist(fake: FakeRegistry, tmp_path: Path, mounter: Mounter) -> None:
    fake.add_artifact("pin/repo", "t", [("f", b"x")])
    mnt = tmp_path / "mnt0"
    mnt.mkdir()
    mounter.mounted.append(mnt)
    result = ocifs("mount", "--cache-dir", str(mounter.cache_dir), f"{fake.host}/pin/repo:nosuchtag", str(mnt))
    if result.returncode != 0:  # refused at mount time, in one line: fine
        assert len(result.stderr.strip().splitlines()) == 1 and mounted_at(mnt) is None
        return
    # Mounted: then listing its root must not pretend that the tag is an empty directory.
    with pytest.raises(OSError):
        os.listdir(mnt)


def test_ttl_zero_shows_a_moved_tag_at_once(client: RegistryClient, registry: RunningRegistry, repo: str,
                                            mounter: Mounter) -> None:
    push_artifact(client, repo, "m", {"f.txt": b"old"})
    mnt = mounter(f"{registry.host}/{repo}", "--ttl", "0")
    assert (mnt / "m" / "f.txt").read_bytes() == b"old"
    push_artifact(client, repo, "m", {"f.txt": b"new bytes"})
    push_artifact(client, repo, "n", {"g.txt": b"a new tag"})
    time.sleep(1.2)  # the kernel's own entry and attribute caches (1 s)
    assert (mnt / "m" / "f.txt").read_bytes() == b"new bytes"
    assert sorted(os.listdir(mnt)) == ["m", "n"]


def cache_usage(cache: Path) -> int:
    return sum(allocated_bytes(cache / folder) for folder in ("blobs", "partial", "tmp"))


def test_small_cache_size_stays_bounded_and_reads_stay_right(client: RegistryClient, registry: RunningRegistry,
                                                             repo: str, mounter: Mounter, tmp_path: Path) -> None:
    blobs = {f"b{i}.bin": os.urandom(700 * 1024) for i in range(6)}
    push_artifact(client, repo, "t", blobs)
    cache = tmp_path / "small-cache"
    mnt = mounter(f"{registry.host}/{repo}", "--cache-size", "1M", cache_dir=cache)
    for _ in range(2):
        for name, data in blobs.items():
            assert (mnt / "t" / name).read_bytes() == data
            assert cache_usage(cache) <= 2 * MiB, (name, cache_usage(cache))
    assert cache_usage(cache) <= 2 * MiB


def test_allow_other_mounts_with_default_permissions(client: RegistryClient, registry: RunningRegistry,
                                                     repo: str, mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"f": b"x"})
    mnt = mounter(f"{registry.host}/{repo}", "--allow-other")
    found = mounted_at(mnt)
    assert found is not None
    assert {"allow_other", "default_permissions"} <= set(found[1].split(","))


def test_o_allow_other_also_gets_default_permissions(client: RegistryClient, registry: RunningRegistry,
                                                     repo: str, mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"f": b"x"})
    mnt = mounter(f"{registry.host}/{repo}", "-o", "allow_other")
    found = mounted_at(mnt)
    assert found is not None
    assert "allow_other" in found[1].split(",")
    assert "default_permissions" in found[1].split(",")


def test_o_options_are_passed_through(client: RegistryClient, registry: RunningRegistry, repo: str,
                                      mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"f": b"x"})
    mnt = mounter(f"{registry.host}/{repo}", "-o", "noatime,fsname=myfs", "-o", "ro")
    found = mounted_at(mnt)
    assert found is not None
    assert "noatime" in found[0].split(",") and "ro" in found[0].split(",")
    line = next(os.fsdecode(raw) for raw in mountinfo_lines() if parse_mountinfo_line(raw).mount_point == str(mnt))
    assert line.split(" - ")[1].split()[:2] == ["fuse.ocifs", "myfs"]
    assert (mnt / "t" / "f").read_bytes() == b"x"


def test_log_file_holds_no_credentials(auth_registry: RunningRegistry, repo: str, mounter: Mounter,
                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    from ocifs.registry import Credentials

    writer = make_client(auth_registry, credentials=Credentials(TEST_USER, TEST_PASSWORD))
    push_artifact(writer, repo, "t", {"f.txt": b"secret data"})
    log_file = tmp_path / "ocifs.log"
    # --password-stdin needs stdin: mounted by hand, unmounted by the mounter.
    mnt = tmp_path / "mnt-log"
    mnt.mkdir()
    mounter.mounted.append(mnt)
    result = ocifs("mount", "--cache-dir", str(mounter.cache_dir), "--read-only", "--debug",
                   "--log-file", str(log_file), "--username", TEST_USER, "--password-stdin",
                   f"{auth_registry.host}/{repo}", str(mnt), stdin=TEST_PASSWORD + "\n")
    assert result.returncode == 0, result.stderr
    assert (mnt / "t" / "f.txt").read_bytes() == b"secret data"
    assert errno_of(lambda: os.stat(mnt / "nope")) == errno.ENOENT
    mounter.unmount_all()
    text = log_file.read_bytes()
    assert len(text) > 0
    token = base64.b64encode(f"{TEST_USER}:{TEST_PASSWORD}".encode())
    assert TEST_PASSWORD.encode() not in text and token not in text
    assert TEST_PASSWORD.encode("latin-1") not in text
    assert b"Authorization" not in text


def test_debug_logs_every_operation(client: RegistryClient, registry: RunningRegistry, repo: str,
                                    mounter: Mounter, tmp_path: Path) -> None:
    push_artifact(client, repo, "t", {"needle-file.txt": b"x" * 10})
    log_file = tmp_path / "debug.log"
    mnt = mounter(f"{registry.host}/{repo}", "--debug", "--log-file", str(log_file))
    assert (mnt / "t" / "needle-file.txt").read_bytes() == b"x" * 10
    mounter.unmount_all()
    text = log_file.read_text(errors="replace")
    assert "needle-file.txt" in text, text[-2000:]


def test_mountpoint_that_is_a_file_missing_or_not_empty(client: RegistryClient, registry: RunningRegistry,
                                                         repo: str, tmp_path: Path, mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"f": b"registry"})
    source = f"{registry.host}/{repo}"
    a_file = tmp_path / "file"
    a_file.write_text("a file")
    for path, words in ((a_file, "not a directory"), (tmp_path / "missing", "does not exist")):
        result = ocifs("mount", "--cache-dir", str(mounter.cache_dir), source, str(path))
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ocifs: ") and words in lines[0], result.stderr
        assert mounted_at(path) is None
    assert a_file.read_text() == "a file"
    assert not (tmp_path / "missing").exists()
    # A directory with files in it is mounted over (as libfuse 3 does); the files come back after.
    busy = tmp_path / "mnt0"
    busy.mkdir()
    (busy / "underneath").write_text("mine")
    mnt = mounter(source)
    assert mnt == busy
    assert os.listdir(mnt) == ["t"]
    mounter.unmount_all()
    assert os.listdir(busy) == ["underneath"]


def test_umount_of_a_path_that_is_not_a_mount(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "keep").write_text("kept")
    result = ocifs("umount", str(plain))
    assert result.returncode == 0, result.stderr
    assert (plain / "keep").read_text() == "kept"


def test_umount_and_busy_check_of_a_non_ascii_mountpoint(client: RegistryClient, registry: RunningRegistry,
                                                         repo: str, tmp_path: Path) -> None:
    push_artifact(client, repo, "t", {"f": b"x"})
    mnt = tmp_path / "mnt-é ü"
    mnt.mkdir()
    cache = tmp_path / "cache"
    try:
        result = ocifs("mount", "--cache-dir", str(cache), f"{registry.host}/{repo}", str(mnt))
        assert result.returncode == 0, result.stderr
        assert mounted_at(mnt) is not None
        assert (mnt / "t" / "f").read_bytes() == b"x"
        again = ocifs("mount", "--cache-dir", str(cache), f"{registry.host}/{repo}", str(mnt))
        assert again.returncode != 0 and "busy" in again.stderr
        result = ocifs("umount", str(mnt))
        assert result.returncode == 0, result.stderr
        assert mounted_at(mnt) is None
    finally:
        force_unmount(mnt)


def test_a_mountpoint_name_that_is_not_utf8(client: RegistryClient, registry: RunningRegistry, repo: str,
                                            tmp_path: Path) -> None:
    push_artifact(client, repo, "t", {"f": b"x"})
    mnt = tmp_path / os.fsdecode(b"mnt-\xff")
    mnt.mkdir()
    try:
        result = ocifs("mount", "--cache-dir", str(tmp_path / "cache"), f"{registry.host}/{repo}", str(mnt))
        assert result.returncode == 0, result.stderr
        assert (mnt / "t" / "f").read_bytes() == b"x"
        result = ocifs("umount", str(mnt))
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        assert mounted_at(mnt) is None
    finally:
        force_unmount(mnt)


def test_root_getattr_and_statfs_answer_without_the_network(fake: FakeRegistry, mounter: Mounter) -> None:
    fake.add_artifact("net/repo", "t", [("f", b"x")])
    whole = mounter(fake.host, "--timeout", "5")
    pinned = mounter(f"{fake.host}/net/repo:t", "--timeout", "5")
    assert os.listdir(pinned) == ["f"]
    fake.hang.set()  # every request now stalls
    started = time.monotonic()
    for mnt in (whole, pinned):
        st = os.stat(mnt)
        assert stat.S_ISDIR(st.st_mode) and st.st_ino == 1 and st.st_uid == os.getuid()
        vfs = os.statvfs(mnt)
        assert vfs.f_namemax == 255 and vfs.f_blocks > 0
        assert run("df", str(mnt), timeout=10).returncode == 0
        assert run("stat", "-f", "-c", "%l", str(mnt), timeout=10).stdout.strip() == "255"
        assert run("stat", "-c", "%F", str(mnt), timeout=10).stdout.strip() == "directory"
    assert time.monotonic() - started < 2.5


# ---- reading with real programs ---------------------------------------------------------------


def test_tar_du_ls_cp_of_a_tag(client: RegistryClient, registry: RunningRegistry, repo: str,
                               mounter: Mounter, tmp_path: Path) -> None:
    files = {"top.bin": os.urandom(300_001), "docs/a.md": b"# a\n", "docs/deeper/b.txt": b"b" * 5000,
             "empty": b"", "one": b"1"}
    push_layers(client, repo, "t", list(files.items()),
                annotations={"org.opencontainers.image.created": "2023-05-06T07:08:09Z"})
    mnt = mounter(f"{registry.host}/{repo}", "--read-only")
    tag = mnt / "t"
    # tar of the tag: exactly the artifacts, no hidden files, no "file changed as we read it".
    archive = subprocess.run(["tar", "cf", "-", "-C", str(mnt), "t"], capture_output=True, timeout=60,
                             check=False)
    assert archive.returncode == 0, archive.stderr
    out = tmp_path / "untar"
    out.mkdir()
    subprocess.run(["tar", "xf", "-", "-C", str(out)], input=archive.stdout, check=True, timeout=60)
    got = {str(p.relative_to(out / "t")): p.read_bytes() for p in (out / "t").rglob("*") if p.is_file()}
    assert got == files
    # ls -l sizes, modes, times.
    listing = run("ls", "-l", "--time-style=+%s", str(tag)).stdout
    assert re.search(r"^-r--r--r-- 1 \S+ \S+ 300001 1683356889 top\.bin$", listing, re.MULTILINE), listing
    assert re.search(r"^dr-xr-xr-x 2 \S+ \S+ +0 1683356889 docs$", listing, re.MULTILINE), listing
    assert re.search(r"^-r--r--r-- 1 \S+ \S+ +0 1683356889 empty$", listing, re.MULTILINE), listing
    # du: apparent sizes are exact, allocated sizes follow st_blocks.
    assert int(run("du", "-sb", str(tag)).stdout.split()[0]) == sum(len(d) for d in files.values())
    st = (tag / "top.bin").stat()
    assert st.st_blocks == (300_001 + 511) // 512 and st.st_blksize == MiB
    assert (tag / "empty").stat().st_blocks == 0 and (tag / "empty").stat().st_size == 0
    assert (tag / "empty").read_bytes() == b""
    assert os.getxattr(tag / "empty", "user.oci.digest").decode() == str(Digest.of(b""))
    assert run("stat", "-c", "%o %b %B", str(tag / "one")).stdout.split() == [str(MiB), "1", "512"]
    # cp -r copies only the artifacts.
    copy = tmp_path / "copy"
    run("cp", "-r", str(tag), str(copy))
    assert {str(p.relative_to(copy)): p.read_bytes() for p in copy.rglob("*") if p.is_file()} == files
    # getfattr -d dumps the user.oci.* attributes of files and of the tag.
    dump = run("getfattr", "-d", "--absolute-names", str(tag / "one")).stdout
    assert f'user.oci.digest="{Digest.of(b"1")}"' in dump
    assert f'user.oci.mediatype="{OCI_LAYER_TAR}"' in dump
    dump = run("getfattr", "-d", "--absolute-names", str(tag)).stdout
    assert "user.oci.artifacttype=" in dump and "user.oci.digest=" in dump
    assert run("getfattr", "-d", "--absolute-names", str(tag / "docs")).stdout == ""
    assert sorted(os.listxattr(tag / "docs" / "a.md")) == ["user.oci.digest", "user.oci.mediatype"]
    # The hidden files read by name.
    manifest = json.loads((tag / ".manifest.json").read_bytes())
    assert len(manifest["layers"]) == len(files)
    assert (tag / ".config.json").read_bytes() == b"{}"
    assert ".manifest.json" not in run("ls", "-a", str(tag)).stdout


def test_inodes_are_stable_and_ls_i_agrees_with_stat(client: RegistryClient, registry: RunningRegistry,
                                                     repo: str, mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"a.txt": b"a", "d/b.txt": b"b"})
    push_artifact(client, repo, "u", {"a.txt": b"a"})
    mnt = mounter(f"{registry.host}/{repo}", "--read-only")
    paths = [mnt / "t", mnt / "t" / "a.txt", mnt / "t" / "d", mnt / "t" / "d" / "b.txt", mnt / "u" / "a.txt"]
    first = [p.stat().st_ino for p in paths]
    time.sleep(1.1)  # past the kernel's attribute cache
    assert [p.stat().st_ino for p in paths] == first
    assert len(set(first)) == len(first)  # the same bytes in two tags are two files
    for directory in (mnt, mnt / "t", mnt / "t" / "d"):
        for entry in os.scandir(directory):
            assert entry.inode() == os.stat(entry.path).st_ino, entry.path
        shown: dict[str, int] = {}
        for line in run("ls", "-i", str(directory)).stdout.splitlines():
            ino, name = line.split(maxsplit=1)
            shown[name] = int(ino)
        assert shown == {e.name: os.stat(e.path).st_ino for e in os.scandir(directory)}
    # A directory of the registry has no attributes; getfattr -d says nothing and succeeds.
    assert run("getfattr", "-d", "--absolute-names", str(mnt)).stdout == ""
    assert os.listxattr(mnt) == []


def test_dot_and_dotdot_inodes_agree_with_stat(client: RegistryClient, registry: RunningRegistry, repo: str,
                                               mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"d/b.txt": b"b"})
    mnt = mounter(f"{registry.host}/{repo}", "--read-only")
    for directory in (mnt, mnt / "t", mnt / "t" / "d"):
        shown = {}
        for line in run("ls", "-ai", str(directory)).stdout.splitlines():
            ino, name = line.split(maxsplit=1)
            shown[name] = int(ino)
        assert shown["."] == os.stat(directory).st_ino, directory
        if directory != mnt:
            assert shown[".."] == os.stat(directory / "..").st_ino, directory


def test_concurrent_readers_of_one_big_file(client: RegistryClient, registry: RunningRegistry, repo: str,
                                            mounter: Mounter) -> None:
    data = os.urandom(24 * MiB + 12345)
    push_artifact(client, repo, "big", {"big.bin": data})
    mnt = mounter(f"{registry.host}/{repo}", "--read-only")
    path = str(mnt / "big" / "big.bin")
    expected = hashlib.sha256(data).hexdigest()
    procs = [subprocess.Popen(["sha256sum", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(5)]
    # And one reader that starts in the middle, going backwards in 1 MiB steps.
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in range(20 * MiB, -1, -MiB):
            assert os.pread(fd, MiB, offset) == data[offset:offset + MiB]
    finally:
        os.close(fd)
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.split()[0].decode() == expected


def test_lseek_and_pread_patterns(client: RegistryClient, registry: RunningRegistry, repo: str,
                                  mounter: Mounter) -> None:
    data = os.urandom(9 * MiB + 7)
    push_artifact(client, repo, "p", {"p.bin": data, "small": b"0123456789"})
    mnt = mounter(f"{registry.host}/{repo}", "--read-only")
    with open(mnt / "p" / "p.bin", "rb", buffering=0) as f:
        f.seek(-10, os.SEEK_END)
        assert f.read(10) == data[-10:]
        assert f.read(10) == b""
        f.seek(0)
        assert f.read(10) == data[:10]
        fd = f.fileno()
        assert os.pread(fd, 100, 4 * MiB - 50) == data[4 * MiB - 50:4 * MiB + 50]  # across a chunk edge
        assert os.pread(fd, 100, len(data) - 3) == data[-3:]
        assert os.pread(fd, 100, len(data) + 100) == b""
        assert os.lseek(fd, 0, os.SEEK_END) == len(data)
        assert os.pread(fd, 2 * MiB, 6 * MiB) == data[6 * MiB:8 * MiB]
    with open(mnt / "p" / "small", "rb") as f:
        f.seek(5)
        assert f.read() == b"56789"
    # Two handles on one file, interleaved.
    with open(mnt / "p" / "p.bin", "rb") as a, open(mnt / "p" / "p.bin", "rb") as b:
        a.seek(8 * MiB)
        assert a.read(4096) == data[8 * MiB:8 * MiB + 4096]
        assert b.read(4096) == data[:4096]
        assert a.read() == data[8 * MiB + 4096:]


def test_mmap_and_a_moved_tag_of_the_same_size(client: RegistryClient, registry: RunningRegistry, repo: str,
                                               mounter: Mounter) -> None:
    import mmap

    old, new = os.urandom(200_000), os.urandom(200_000)
    push_artifact(client, repo, "m", {"same.bin": old})
    mnt = mounter(f"{registry.host}/{repo}", "--read-only", "--ttl", "0.5")
    path = mnt / "m" / "same.bin"
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert mapped[:] == old
    push_artifact(client, repo, "m", {"same.bin": new})
    time.sleep(1.6)  # past the TTL and the kernel's attribute cache
    assert path.read_bytes() == new  # the page cache must not serve the old bytes
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert mapped[:] == new
    assert os.getxattr(path, "user.oci.digest").decode() == str(Digest.of(new))


def test_an_open_file_keeps_its_bytes_when_the_tag_moves(client: RegistryClient, registry: RunningRegistry,
                                                         repo: str, mounter: Mounter) -> None:
    old, new = os.urandom(4 * MiB), os.urandom(4 * MiB)
    push_artifact(client, repo, "m", {"f.bin": old})
    mnt = mounter(f"{registry.host}/{repo}", "--read-only", "--ttl", "0.5")
    path = mnt / "m" / "f.bin"
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.read(fd, 65536) == old[:65536]
        push_artifact(client, repo, "m", {"f.bin": new})
        time.sleep(1.6)  # past the TTL and the kernel's attribute cache
        assert path.read_bytes() == new  # another reader opens the new bytes
        rest = b""
        while chunk := os.read(fd, MiB):
            rest += chunk
        # The first reader goes on with the blob it opened (not: the new blob from here on).
        assert rest == old[65536:], f"{len(rest)} bytes, the new blob's: {rest == new[65536:]}"
    finally:
        os.close(fd)


def test_access_agrees_with_the_modes_shown(client: RegistryClient, registry: RunningRegistry, repo: str,
                                            mounter: Mounter) -> None:
    push_artifact(client, repo, "t", {"data.bin": b"not a program"})
    mnt = mounter(f"{registry.host}/{repo}", "--read-only")
    path = mnt / "t" / "data.bin"
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert os.access(path, os.R_OK)
    assert not os.access(path, os.W_OK)
    assert run("find", str(mnt / "t"), "-type", "f", "-executable").stdout == ""
    assert not os.access(path, os.X_OK)


def test_cache_size_zero_still_reads(client: RegistryClient, registry: RunningRegistry, repo: str,
                                     mounter: Mounter, tmp_path: Path) -> None:
    blobs = {f"z{i}.bin": os.urandom(300_000 + i) for i in range(3)}
    push_artifact(client, repo, "t", blobs)
    cache = tmp_path / "zero-cache"
    mnt = mounter(f"{registry.host}/{repo}", "--cache-size", "0", cache_dir=cache)
    for _ in range(2):
        for name, data in blobs.items():
            assert (mnt / "t" / name).read_bytes() == data
    held = [open(mnt / "t" / name, "rb") for name in blobs]
    try:
        assert [f.read() for f in held] == list(blobs.values())
    finally:
        for f in held:
            f.close()
    assert cache_usage(cache) <= MiB


def test_a_log_file_that_cannot_be_written_fails_the_mount_in_one_line(registry: RunningRegistry,
                                                                         tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = ocifs("mount", "--cache-dir", str(tmp_path / "cache"), "--log-file",
                   str(tmp_path / "no-such-dir" / "log"), registry.host, str(mnt))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ocifs: ") and "no-such-dir" in lines[0], result.stderr
    assert mounted_at(mnt) is None
