"""Metadata at network speed (issue "Close to the wire", item 4), counted at a proxy in front
of the real registry: a tag directory costs one manifest GET (no HEAD first) and its files
nothing more; a walk through a repository's tags, or through a namespace, fetches manifests
several at once but never more than WARM_CONCURRENCY (seen by holding them at the proxy),
ahead of the walker across repositories, without fetching anything twice; held manifest
GETs hold up no catalog or tag list; a second walk within the TTL asks the registry nothing."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

from ocifs.metadata import WARM_CONCURRENCY
from ocifs.registry import RegistryClient

from .conftest import Mounter
from .content import push_artifact
from .faultproxy import FaultProxy


def manifest_requests(proxy: FaultProxy, repository: str) -> Counter[tuple[str, str]]:
    """(method, reference) -> how many times the proxy saw it for `repository`."""
    counted: Counter[tuple[str, str]] = Counter()
    prefix = f"/v2/{repository}/manifests/"
    for method, path, _ in list(proxy.seen):
        if path.startswith(prefix):
            counted[(method, path[len(prefix):])] += 1
    return counted


def test_a_walk_fetches_each_manifest_once_and_a_second_walk_nothing(
        client: RegistryClient, repo: str, proxy: FaultProxy, mounter: Mounter) -> None:
    tags = [f"v{i}" for i in range(12)]
    for tag in tags:
        push_artifact(client, repo, tag, {f"{tag}.txt": tag.encode()})
    mnt = mounter(f"{proxy.host}/{repo}", "--read-only", "--ttl", "60")
    walk = subprocess.run(["ls", "-lR", str(mnt)], capture_output=True, text=True, timeout=60)
    assert walk.returncode == 0, walk.stderr
    for tag in tags:
        assert f"{tag}.txt" in walk.stdout
    counted = manifest_requests(proxy, repo)
    # One GET per tag, and nothing else: no HEAD before it, nothing fetched twice by the
    # walk and the background fetches racing for the same tag.
    assert counted == Counter({("GET", tag): 1 for tag in tags}), counted
    before = len(proxy.seen)
    again = subprocess.run(["ls", "-lR", str(mnt)], capture_output=True, text=True, timeout=60)
    assert again.stdout == walk.stdout
    assert proxy.seen[before:] == []  # within the TTL: answered from memory


def test_looking_at_one_tag_fetches_only_that_tag(client: RegistryClient, repo: str, proxy: FaultProxy,
                                                  mounter: Mounter, tmp_path: Path) -> None:
    """Reading one file does not fetch every other tag's manifest (that is for walks)."""
    for tag in ("a", "b", "c", "d"):
        push_artifact(client, repo, tag, {"f.txt": tag.encode()})
    mnt = mounter(f"{proxy.host}/{repo}", "--read-only")
    assert sorted(p.name for p in mnt.iterdir()) == ["a", "b", "c", "d"]
    assert (mnt / "b" / "f.txt").read_bytes() == b"b"
    counted = manifest_requests(proxy, repo)
    assert {reference for _, reference in counted} == {"b"}, counted


# ---- one tag ----------------------------------------------------------------------------------


def requests_after(proxy: FaultProxy, start: int) -> list[tuple[str, str, int | None]]:
    return list(proxy.seen[start:])


def test_a_cold_tag_directory_costs_one_manifest_get_and_its_files_nothing(
        client: RegistryClient, repo: str, proxy: FaultProxy, mounter: Mounter) -> None:
    """`ls MNT/tag`: one GET of the manifest by tag (its digest is that of the bytes, no HEAD
    first); stat and xattrs of the files in it are answered from it."""
    push_artifact(client, repo, "1.0", {"a.txt": b"a", "b.txt": b"bb", "docs/c.md": b"ccc"})
    push_artifact(client, repo, "2.0", {"z.txt": b"z"})
    mnt = mounter(f"{proxy.host}/{repo}", "--read-only")
    start = len(proxy.seen)
    listed = subprocess.run(["ls", str(mnt / "1.0")], capture_output=True, text=True, timeout=60)
    assert listed.stdout.split() == ["a.txt", "b.txt", "docs"], listed.stderr
    assert requests_after(proxy, start) == [("GET", f"/v2/{repo}/manifests/1.0", 200)]
    after_ls = len(proxy.seen)
    stat = subprocess.run(["stat", "-c", "%n %s", *(str(mnt / "1.0" / name) for name in
                                                   ("a.txt", "b.txt", "docs", "docs/c.md"))],
                          capture_output=True, text=True, timeout=60)
    assert stat.returncode == 0, stat.stderr
    assert [line.split()[1] for line in stat.stdout.splitlines()][:2] == ["1", "2"]
    assert os.getxattr(mnt / "1.0" / "a.txt", "user.oci.digest").startswith(b"sha256:")
    assert os.getxattr(mnt / "1.0", "user.oci.digest").startswith(b"sha256:")
    assert requests_after(proxy, after_ls) == []


def test_a_cold_tag_in_a_namespace_mount_costs_one_manifest_get(
        client: RegistryClient, repo: str, proxy: FaultProxy, mounter: Mounter) -> None:
    """The same through a namespace: the tag's manifest is one GET, no HEAD. (Entering the
    repository by name before any listing is at hand asks once whether its name is a tag of
    the namespace: a 404, and the catalog, which says it is not.)"""
    app = f"{repo}/app"
    push_artifact(client, app, "1.0", {"a.txt": b"a"})
    mnt = mounter(f"{proxy.host}/{repo}", "--read-only")
    start = len(proxy.seen)
    listed = subprocess.run(["ls", str(mnt / "app" / "1.0")], capture_output=True, text=True, timeout=60)
    assert listed.stdout.split() == ["a.txt"], listed.stderr
    seen = requests_after(proxy, start)
    assert [r for r in seen if r[1].startswith(f"/v2/{app}/")] == [("GET", f"/v2/{app}/manifests/1.0", 200)]
    assert [r for r in seen if "/manifests/" in r[1] and not r[1].startswith(f"/v2/{app}/")] == \
        [("GET", f"/v2/{repo}/manifests/app", 404)]
    assert not [r for r in seen if r[0] == "HEAD"], seen
    before = len(proxy.seen)
    assert subprocess.run(["ls", "-l", str(mnt / "app" / "1.0")], capture_output=True, timeout=60).returncode == 0
    assert requests_after(proxy, before) == []


# ---- walks: bounded concurrency -----------------------------------------------------------------


def held(proxy: FaultProxy, path_regex: str, at_least: int) -> int:
    """How many GETs matching `path_regex` the proxy holds once the client stops sending more:
    with every one of them held, that is how many the client keeps in flight at once."""
    assert proxy.wait_for("GET", path_regex, at_least, timeout=30), \
        f"only {len(proxy.arrivals('GET', path_regex))} requests for {path_regex} arrived"
    time.sleep(1.0)  # room for any request beyond the bound to arrive too
    return len(proxy.arrivals("GET", path_regex))


def test_ls_l_of_a_repository_fetches_its_tags_manifests_a_few_at_a_time(
        client: RegistryClient, repo: str, proxy: FaultProxy, mounter: Mounter) -> None:
    """`ls -l` of 30 tags: once the walk is recognised (a second tag looked up) the manifests
    are fetched several at once, and never more than WARM_CONCURRENCY at once. Held at the
    proxy, nothing completes, so what arrives is what the client keeps in flight."""
    tags = [f"t{i:02d}" for i in range(30)]
    for tag in tags:
        push_artifact(client, repo, tag, {f"{tag}.txt": tag.encode()})
    mnt = mounter(f"{proxy.host}/{repo}", "--read-only")
    later = rf"/v2/{repo}/manifests/t(0[2-9]|[12]\d)"
    proxy.stall("GET", later)  # every tag but the first two
    walker = subprocess.Popen(["ls", "-l", str(mnt)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        in_flight = held(proxy, later, 2)
        assert 2 <= in_flight <= WARM_CONCURRENCY, in_flight
    finally:
        proxy.heal()
        out, err = walker.communicate(timeout=60)
    assert walker.returncode == 0, err
    assert [line.split()[-1] for line in out.splitlines()[1:]] == tags
    answered = Counter(path.rsplit("/", 1)[1] for method, path, status in proxy.seen
                       if status == 200 and f"/v2/{repo}/manifests/" in path)
    assert answered == Counter(tags), answered  # each tag fetched once (held ones again after)


def namespace(client: RegistryClient, root: str, repositories: list[str], tags: list[str]) -> None:
    for name in repositories:
        for tag in tags:
            push_artifact(client, f"{root}/{name}", tag, {"f.txt": f"{name}:{tag}".encode()})


def test_find_through_a_namespace_fetches_ahead_across_repositories_a_few_at_a_time(
        client: RegistryClient, repo: str, proxy: FaultProxy, mounter: Mounter) -> None:
    """`find` of a namespace: once it is seen going down into more than one repository, the
    next repositories' tag lists and manifests are fetched ahead of it, several manifests
    at once and never more than WARM_CONCURRENCY. The manifests of c, d and e are held: the
    walker stops in c, and what arrives meanwhile from d and e was fetched ahead; their tag
    lists were fetched while manifests were held."""
    names, tags = ["a", "b", "c", "d", "e"], [f"t{i}" for i in range(6)]
    namespace(client, repo, names, tags)
    mnt = mounter(f"{proxy.host}/{repo}", "--read-only")
    start = len(proxy.seen)
    held_paths = rf"/v2/{repo}/[cde]/manifests/.*"
    proxy.stall("GET", held_paths)
    walker = subprocess.Popen(["find", str(mnt)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        in_flight = held(proxy, held_paths, 2)
        assert 2 <= in_flight <= WARM_CONCURRENCY, in_flight
        held_repositories = {path.split("/")[-3] for _, path, _ in list(proxy.arrived)
                             if re.fullmatch(held_paths, path)}
        assert held_repositories - {"c"}, held_repositories  # d or e: ahead of the walker
        assert proxy.arrivals("GET", rf"/v2/{repo}/[de]/tags/list") and \
            len(proxy.arrivals("GET", rf"/v2/{repo}/[de]/tags/list")) == 2
    finally:
        proxy.heal()
        out, err = walker.communicate(timeout=60)
    assert walker.returncode == 0, err
    for name in names:
        for tag in tags:
            assert f"{mnt}/{name}/{tag}/f.txt" in out.splitlines()
    # Each tag list once, each manifest answered once, nothing else but the catalog.
    seen = requests_after(proxy, start)
    assert Counter(path for _, path, status in seen if path.endswith("/tags/list")) == \
        Counter(f"/v2/{repo}/{name}/tags/list" for name in names)
    assert Counter(path for _, path, status in seen if "/manifests/" in path and status == 200) == \
        Counter(f"/v2/{repo}/{name}/manifests/{tag}" for name in names for tag in tags)
    assert {path for _, path, _ in seen if "/manifests/" not in path and not path.endswith("/tags/list")} \
        == {"/v2/_catalog"}
    before = len(proxy.seen)
    again = subprocess.run(["find", str(mnt)], capture_output=True, text=True, timeout=60)
    assert again.stdout == out
    assert requests_after(proxy, before) == []


def test_ls_lR_of_a_namespace_asks_for_each_thing_once_and_then_nothing(
        client: RegistryClient, repo: str, proxy: FaultProxy, mounter: Mounter) -> None:
    """The request count of a walk through a namespace is the catalog's pages, one tag list
    per repository and one GET per tag: the namespace, which the catalog shows is no
    repository, is not asked for tags, nor its repositories' names as tags. Again within
    the TTL: no request."""
    names, tags = ["a", "b", "c", "d"], ["1.0", "2.0", "3.0"]
    namespace(client, repo, names, tags)
    mnt = mounter(f"{proxy.host}/{repo}", "--read-only")
    start = len(proxy.seen)
    walk = subprocess.run(["ls", "-lR", str(mnt)], capture_output=True, text=True, timeout=60)
    assert walk.returncode == 0, walk.stderr
    assert walk.stdout.count("f.txt") == len(names) * len(tags)
    seen = requests_after(proxy, start)
    catalog = [r for r in seen if r[1] == "/v2/_catalog"]
    assert catalog and all(status == 200 for _, _, status in catalog)
    expected = Counter([("GET", f"/v2/{repo}/{name}/tags/list", 200) for name in names]
                       + [("GET", f"/v2/{repo}/{name}/manifests/{tag}", 200) for name in names for tag in tags])
    assert Counter(r for r in seen if r[1] != "/v2/_catalog") == expected
    before = len(proxy.seen)
    again = subprocess.run(["ls", "-lR", str(mnt)], capture_output=True, text=True, timeout=60)
    assert again.stdout == walk.stdout
    assert requests_after(proxy, before) == []


# ---- walks: nothing waits on unrelated work -------------------------------------------------------


def test_held_manifests_of_one_repository_hold_up_no_listing(
        client: RegistryClient, repo: str, proxy: FaultProxy, mounter: Mounter) -> None:
    """While a walk of `a` has every background manifest fetch held by the registry, the
    catalog (all its pages) and another repository's tag list are still fetched at once:
    a lookup that needs the catalog again (expired: --ttl 1) asks for it before it answers,
    and `ls` of `b` lists its tags."""
    namespace(client, repo, ["a"], [f"t{i:02d}" for i in range(12)])
    namespace(client, repo, ["b"], ["1.0", "2.0"])
    mnt = mounter(f"{proxy.host}/{repo}", "--read-only", "--ttl", "1")
    later = rf"/v2/{repo}/a/manifests/t(0[2-9]|1\d)"
    proxy.stall("GET", later)  # all of a's tags but the first two
    walker = subprocess.Popen(["ls", "-l", str(mnt / "a")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        assert held(proxy, later, WARM_CONCURRENCY - 1) >= WARM_CONCURRENCY - 1  # the whole pool is held
        time.sleep(1.1)  # the catalog expires
        catalogs = len(proxy.arrivals("GET", "/v2/_catalog"))
        found = subprocess.run(["ls", "-d", str(mnt / "b")], capture_output=True, text=True, timeout=60)
        assert found.returncode == 0, found.stderr
        assert len(proxy.arrivals("GET", "/v2/_catalog")) > catalogs  # asked, not queued behind a
        listed = subprocess.run(["ls", str(mnt / "b")], capture_output=True, text=True, timeout=60)
        assert listed.stdout.split() == ["1.0", "2.0"], listed.stderr
        # The proxy records a request once its handler ends, which may be just after ls got it.
        for _ in range(200):
            if proxy.requests("GET", rf"/v2/{repo}/b/tags/list")[-1:] == [200]:
                break
            time.sleep(0.01)
        assert proxy.requests("GET", rf"/v2/{repo}/b/tags/list")[-1:] == [200]
        assert walker.poll() is None  # all the while, a's manifests were held
    finally:
        proxy.heal()
        walker.communicate(timeout=60)
