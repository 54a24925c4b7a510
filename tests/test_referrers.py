"""`.referrers/` of a tag (OCI 1.1 referrers, issue 11 item 4): listing through the
tag-schema fallback on the real registry (distribution 2.8 has no referrers API) and through
the API on an in-test server; attaching by copying into `.referrers/<type>/<subtype>/`, on
the real registry and on it behind a proxy that adds the API (referrersproxy.py); hostile
referrers answers."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from ocifs.digest import Digest
from ocifs.model import (
    ANNOTATION_TITLE,
    EMPTY_JSON,
    OCI_INDEX,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    Descriptor,
    build_manifest,
    encode_json,
    fallback_tag,
    parse_manifest,
)
from ocifs.registry import RegistryClient

from .clients import oras_client
from .conftest import Mounter, make_client
from .content import push_artifact, push_blob
from .fakeserver import Reply, Request
from .helpers import errno_of, run
from .referrersproxy import ReferrersProxy
from .registry_server import RunningRegistry
from .test_read_edges import FakeRegistry, layer_dict, raw_manifest

SBOM = "application/vnd.example.sbom+json"


def test_attach_by_copy_found_through_fallback(client: RegistryClient, registry: RunningRegistry, repo: str,
                                                tmp_path: Path, mounter: Mounter) -> None:
    subject = push_artifact(client, repo, "1.0", {"app.txt": b"app\n"})
    sbom = tmp_path / "sbom.json"
    sbom.write_bytes(b'{"sbom": true}\n')
    mnt = mounter(f"{registry.host}/{repo}")
    tag = mnt / "1.0"
    assert ".referrers" not in os.listdir(tag)
    assert os.listdir(tag / ".referrers") == []
    os.makedirs(tag / ".referrers" / "application" / "vnd.example.sbom+json")
    run("cp", str(sbom), str(tag / ".referrers" / "application" / "vnd.example.sbom+json") + "/")
    # The registry has no referrers API: the fallback index lists the new manifest.
    index = client.get_manifest(repo, fallback_tag(subject))
    assert index.media_type == OCI_INDEX
    [entry] = index.manifests  # type: ignore[union-attr]
    assert entry.artifact_type == SBOM
    referrer = client.get_manifest(repo, str(entry.digest))
    assert referrer.media_type == OCI_MANIFEST
    assert referrer.artifact_type == SBOM
    assert referrer.subject is not None and referrer.subject.digest == subject
    assert [layer.title for layer in referrer.layers] == ["sbom.json"]  # type: ignore[union-attr]
    # The tag itself did not change.
    assert client.resolve(repo, "1.0").digest == subject
    # oras-py pulls the attachment by digest.
    out = tmp_path / "pulled"
    oras_client(registry).pull(target=f"{registry.host}/{repo}@{entry.digest}", outdir=str(out))
    assert (out / "sbom.json").read_bytes() == sbom.read_bytes()
    # A new mount finds it through the fallback, browsable like any artifact.
    mnt2 = mounter(f"{registry.host}/{repo}", cache_dir=tmp_path / "cache2")
    where = mnt2 / "1.0" / ".referrers"
    assert os.listdir(where) == ["application"]
    assert os.listdir(where / "application") == ["vnd.example.sbom+json"]
    assert os.listdir(where / "application" / "vnd.example.sbom+json") == [entry.digest.filename]
    artifact = where / "application" / "vnd.example.sbom+json" / entry.digest.filename
    assert os.listdir(artifact) == ["sbom.json"]
    assert (artifact / "sbom.json").read_bytes() == sbom.read_bytes()
    assert os.getxattr(artifact, "user.oci.artifacttype") == SBOM.encode()
    assert os.getxattr(artifact, "user.oci.digest") == str(entry.digest).encode()
    assert json.loads((artifact / ".manifest.json").read_bytes())["subject"]["digest"] == str(subject)
    # A second attachment is added to the fallback index (read-modify-write), the first kept.
    sig = tmp_path / "sig.txt"
    sig.write_bytes(b"signature\n")
    os.makedirs(mnt2 / "1.0" / ".referrers" / "application" / "vnd.example.sig")
    run("cp", str(sig), str(mnt2 / "1.0" / ".referrers" / "application" / "vnd.example.sig") + "/")
    index = client.get_manifest(repo, fallback_tag(subject))
    assert sorted(e.artifact_type or "" for e in index.manifests) == [SBOM, "application/vnd.example.sig"]  # type: ignore[union-attr]
    assert sorted(os.listdir(mnt2 / "1.0" / ".referrers" / "application")) == \
        ["vnd.example.sbom+json", "vnd.example.sig"]


def test_attachment_pushed_by_oras_py_shows(client: RegistryClient, registry: RunningRegistry, repo: str,
                                            tmp_path: Path, mounter: Mounter) -> None:
    """oras-py pushes a manifest with `subject` (it does not update the fallback index, as the
    oras CLI does on such a registry: the test does that part)."""
    import oras.oci

    subject = push_artifact(client, repo, "1.0", {"app.txt": b"app\n"})
    subject_descriptor = client.resolve(repo, "1.0")
    note = tmp_path / "note.txt"
    note.write_bytes(b"attached by oras-py\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        oras_client(registry).push(
            target=f"{registry.host}/{repo}:note", files=["note.txt"], disable_path_validation=True,
            subject=oras.oci.Subject(subject_descriptor.media_type, str(subject), subject_descriptor.size))
    finally:
        os.chdir(cwd)
    pushed = client.get_manifest(repo, "note")
    assert pushed.subject is not None and pushed.subject.digest == subject
    kind = pushed.config.media_type  # type: ignore[union-attr]  # oras-py sets no artifactType
    entry = {"mediaType": OCI_MANIFEST, "digest": str(pushed.digest), "size": len(pushed.raw),
             "artifactType": kind}
    client.put_manifest(repo, fallback_tag(subject),
                        encode_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}), OCI_INDEX)
    mnt = mounter(f"{registry.host}/{repo}")
    type_dir = mnt / "1.0" / ".referrers" / Path(*kind.split("/"))
    assert os.listdir(type_dir) == [pushed.digest.filename]
    assert (type_dir / pushed.digest.filename / "note.txt").read_bytes() == b"attached by oras-py\n"


def test_referrers_writes_refused_where_they_cannot_attach(client: RegistryClient, registry: RunningRegistry,
                                                           repo: str, mounter: Mounter) -> None:
    push_artifact(client, repo, "1.0", {"app.txt": b"app\n"})
    mnt = mounter(f"{registry.host}/{repo}")
    refs = mnt / "1.0" / ".referrers"
    assert errno_of(lambda: (refs / "loose.txt").write_bytes(b"x")) == errno.EPERM
    assert errno_of(lambda: os.mkdir(refs / "not a type")) == errno.EINVAL
    os.mkdir(refs / "application")
    assert errno_of(lambda: (refs / "application" / "f.txt").write_bytes(b"x")) == errno.EPERM
    assert errno_of(lambda: os.rmdir(refs)) == errno.ENOTEMPTY
    os.rmdir(refs / "application")  # made here: removed here
    assert os.listdir(refs) == []
    assert errno_of(lambda: os.rmdir(refs)) == errno.EPERM
    read_only = mounter(f"{registry.host}/{repo}", "--read-only")
    assert errno_of(lambda: os.mkdir(read_only / "1.0" / ".referrers" / "application")) == errno.EROFS


# ---- a registry with the referrers API ---------------------------------------------------------


class ReferrersRegistry(FakeRegistry):
    """FakeRegistry with `GET /v2/<repo>/referrers/<digest>`: `answers` maps a digest to a
    Reply (or, by default, the index of manifests whose subject is it)."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, Reply] = {}

    def _dispatch(self, request: Request) -> Reply | None:
        match = re.fullmatch(r"/v2/(.+)/referrers/([^/]+)", request.path)
        if match is None:
            return super()._dispatch(request)
        repo, digest = match.groups()
        if digest in self.answers:
            return self.answers[digest]
        entries: list[dict[str, Any]] = []
        for ref, raw in self.manifests.get(repo, {}).items():
            if not ref.startswith("sha256:"):
                continue
            manifest = parse_manifest(raw)
            if manifest.subject is not None and str(manifest.subject.digest) == digest:
                entry: dict[str, Any] = {"mediaType": manifest.media_type, "digest": ref, "size": len(raw)}
                if manifest.artifact_type:
                    entry["artifactType"] = manifest.artifact_type
                entries.append(entry)
        return Reply(200, encode_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}),
                     {"Content-Type": OCI_INDEX})


def _referrer(fake: FakeRegistry, repo: str, subject: Digest, artifact_type: str | None,
              files: list[tuple[str, bytes]]) -> Digest:
    subject_raw = fake.manifests[repo][str(subject)]
    for _, data in files:
        fake.add_blob(data)
    doc = json.loads(raw_manifest([layer_dict(data, title) for title, data in files]))
    if artifact_type:
        doc["artifactType"] = artifact_type
    else:
        doc.pop("artifactType", None)
    doc["subject"] = {"mediaType": OCI_MANIFEST, "digest": str(subject), "size": len(subject_raw)}
    return fake.add_manifest(repo, None, encode_json(doc))


@pytest.fixture
def api() -> Any:
    registry = ReferrersRegistry()
    try:
        yield registry
    finally:
        registry.close()


def test_referrers_api_listing(api: ReferrersRegistry, mounter: Mounter) -> None:
    subject = api.add_artifact("team/app", "1.0", [("app.txt", b"app\n")])
    sbom = _referrer(api, "team/app", subject, SBOM, [("sbom.json", b"{}\n")])
    untyped = _referrer(api, "team/app", subject, None, [("odd.txt", b"odd\n")])
    odd_type = _referrer(api, "team/app", subject, "not a/media/type", [("x.txt", b"x\n")])
    mnt = mounter(f"{api.host}/team/app", "--read-only")
    refs = mnt / "1.0" / ".referrers"
    assert sorted(os.listdir(refs)) == ["_untyped", "application"]
    assert sorted(os.listdir(refs / "_untyped")) == sorted([untyped.filename, odd_type.filename])
    assert (refs / "application" / "vnd.example.sbom+json" / sbom.filename / "sbom.json").read_bytes() == b"{}\n"
    assert (refs / "_untyped" / untyped.filename / "odd.txt").read_bytes() == b"odd\n"
    assert any(r.path == f"/v2/team/app/referrers/{subject}" for r in api.server.seen("GET"))
    assert errno_of(lambda: os.listdir(refs / "application" / "nope")) == errno.ENOENT


@pytest.mark.parametrize("answer", [
    Reply(200, b"<html>not json</html>", {"Content-Type": OCI_INDEX}),
    Reply(200, b"{" + b" " * (5 * 1024 * 1024) + b"}", {"Content-Type": OCI_INDEX}),
    Reply(200, encode_json({"schemaVersion": 2, "mediaType": OCI_INDEX,
                            "manifests": [{"mediaType": OCI_MANIFEST, "digest": "sha256:nothex", "size": 3}]}),
          {"Content-Type": OCI_INDEX}),
    Reply(200, encode_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": []}),
          {"Content-Type": OCI_MANIFEST}),
], ids=["not-json", "too-big", "bad-digest", "not-an-index"])
def test_hostile_referrers_answers(api: ReferrersRegistry, mounter: Mounter, answer: Reply) -> None:
    subject = api.add_artifact("team/app", "1.0", [("app.txt", b"app\n")])
    api.answers[str(subject)] = answer
    mnt = mounter(f"{api.host}/team/app", "--read-only")
    code = errno_of(lambda: os.listdir(mnt / "1.0" / ".referrers"))
    assert code in (errno.EIO, errno.EFBIG)
    # Only that directory: the tag and its files are fine.
    assert os.listdir(mnt / "1.0") == ["app.txt"]
    assert (mnt / "1.0" / "app.txt").read_bytes() == b"app\n"


# ---- attaching on a registry with the referrers API (the real registry behind ReferrersProxy) ----


@pytest.fixture
def api_proxies(registry: RunningRegistry) -> Iterator[Callable[..., ReferrersProxy]]:
    """`api_proxies(echo_subject=, filters=)`: the real registry with the referrers API in
    front (referrersproxy.py); all closed at the end."""
    made: list[ReferrersProxy] = []

    def make(**options: bool) -> ReferrersProxy:
        made.append(ReferrersProxy(registry.host, **options))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


def fallback_requests(proxy: ReferrersProxy, repo: str, subject: Digest) -> list[tuple[str, int | None]]:
    """(method, status) of every request that touched the fallback tag of `subject`."""
    path = re.escape(f"/v2/{repo}/manifests/{fallback_tag(subject)}")
    return [(method, status) for method in ("HEAD", "GET", "PUT", "DELETE")
            for status in proxy.requests(method, path)]


def attach_by_cp(mnt: Path, tag: str, source: Path) -> Path:
    """`cp` of `source` into `.referrers/application/vnd.example.sbom+json/` of `tag`."""
    type_dir = mnt / tag / ".referrers" / "application" / "vnd.example.sbom+json"
    os.makedirs(type_dir)
    run("cp", str(source), str(type_dir) + "/")
    return type_dir


def test_attach_on_a_registry_with_the_referrers_api(client: RegistryClient, registry: RunningRegistry,
                                                     repo: str, tmp_path: Path, mounter: Mounter,
                                                     api_proxies: Callable[..., ReferrersProxy]) -> None:
    proxy = api_proxies()
    subject = push_artifact(client, repo, "1.0", {"app.txt": b"app\n"})
    sbom = tmp_path / "sbom.json"
    sbom.write_bytes(b'{"sbom": "api"}\n')
    type_dir = attach_by_cp(mounter(f"{proxy.host}/{repo}"), "1.0", sbom)
    [pushed] = proxy.pushed[(repo, str(subject))]  # answered with OCI-Subject
    digest = Digest.parse(pushed)
    # (a) The attachment is listed, from the referrers API, in this mount and in a new one.
    assert os.listdir(type_dir) == [digest.filename]
    asked = len(proxy.requests("GET", f"/v2/{repo}/referrers/{subject}"))
    fresh = mounter(f"{proxy.host}/{repo}", cache_dir=tmp_path / "cache2")
    where = fresh / "1.0" / ".referrers" / "application" / "vnd.example.sbom+json"
    assert os.listdir(where) == [digest.filename]
    assert (where / digest.filename / "sbom.json").read_bytes() == sbom.read_bytes()
    api_answers = proxy.requests("GET", f"/v2/{repo}/referrers/{subject}")
    assert len(api_answers) > asked and set(api_answers) == {200}
    # (b) The registry said OCI-Subject: the client wrote no fallback index, nor read one.
    assert list(client.tags(repo)) == ["1.0"]
    assert fallback_requests(proxy, repo, subject) == []
    # (c) oras-py pulls the attachment by digest; its manifest names the subject and the type.
    oras = oras_client(dataclasses.replace(registry, host=proxy.host))
    out = tmp_path / "pulled"
    oras.pull(target=f"{proxy.host}/{repo}@{digest}", outdir=str(out))
    assert (out / "sbom.json").read_bytes() == sbom.read_bytes()
    manifest = oras.get_manifest(f"{proxy.host}/{repo}@{digest}")
    tag = client.resolve(repo, "1.0")
    assert manifest["artifactType"] == SBOM
    assert manifest["subject"] == {"mediaType": tag.media_type, "digest": str(subject), "size": tag.size}
    assert client.resolve(repo, "1.0").digest == subject  # the tag itself did not change


def test_attach_where_the_api_registry_sends_no_oci_subject(client: RegistryClient, registry: RunningRegistry,
                                                            repo: str, tmp_path: Path, mounter: Mounter,
                                                            api_proxies: Callable[..., ReferrersProxy]) -> None:
    """The registry has the API but does not say `OCI-Subject`: the client cannot tell it from
    one without the API and, as the spec asks, also writes the fallback index. What the API
    lists is still right: the attachment once (the fallback index has no subject)."""
    proxy = api_proxies(echo_subject=False)
    subject = push_artifact(client, repo, "1.0", {"app.txt": b"app\n"})
    sbom = tmp_path / "sbom.json"
    sbom.write_bytes(b'{"sbom": "no header"}\n')
    attach_by_cp(mounter(f"{proxy.host}/{repo}"), "1.0", sbom)
    [pushed] = proxy.pushed[(repo, str(subject))]
    digest = Digest.parse(pushed)
    index = client.get_manifest(repo, fallback_tag(subject))
    assert [(str(e.digest), e.artifact_type) for e in index.manifests] == [(pushed, SBOM)]  # type: ignore[union-attr]
    via_api = make_client(dataclasses.replace(registry, host=proxy.host))
    assert [(e.digest, e.artifact_type) for e in via_api.referrers(repo, subject)] == [(digest, SBOM)]
    # A new mount lists it from the API alone (the fallback tag is not read).
    touched = len(fallback_requests(proxy, repo, subject))
    fresh = mounter(f"{proxy.host}/{repo}", cache_dir=tmp_path / "cache2")
    refs = fresh / "1.0" / ".referrers"
    assert os.listdir(refs) == ["application"]
    assert os.listdir(refs / "application" / "vnd.example.sbom+json") == [digest.filename]
    assert (refs / "application" / "vnd.example.sbom+json" / digest.filename / "sbom.json").read_bytes() \
        == sbom.read_bytes()
    assert len(fallback_requests(proxy, repo, subject)) == touched


@pytest.mark.parametrize("filters", [True, False], ids=["registry-filters", "registry-ignores-filter"])
def test_client_filters_referrers_by_artifact_type(client: RegistryClient, registry: RunningRegistry, repo: str,
                                                   api_proxies: Callable[..., ReferrersProxy],
                                                   filters: bool) -> None:
    """`artifactType` is asked of the registry; whether it filtered (`OCI-Filters-Applied`) or
    not, only that type comes back."""
    proxy = api_proxies(filters=filters)
    via_api = make_client(dataclasses.replace(registry, host=proxy.host))
    subject = push_artifact(client, repo, "1.0", {"app.txt": b"app\n"})
    tag = client.resolve(repo, "1.0")
    push_blob(client, repo, EMPTY_JSON)  # the config of both
    made: dict[str, Digest] = {}
    for kind, data in ((SBOM, b"{}\n"), ("application/vnd.example.sig", b"sig\n")):
        push_blob(client, repo, data)
        raw = build_manifest([Descriptor.for_bytes(OCI_LAYER_TAR, data, {ANNOTATION_TITLE: "f"})],
                             artifact_type=kind, subject=tag)
        made[kind], noted = via_api.put_referrer(repo, raw, OCI_MANIFEST)
        assert noted
    assert sorted(e.digest for e in via_api.referrers(repo, subject)) == sorted(made.values())
    [only] = via_api.referrers(repo, subject, artifact_type=SBOM)
    assert (only.digest, only.artifact_type) == (made[SBOM], SBOM)
    assert proxy.queries[-1] == urlencode({"artifactType": SBOM})
    assert via_api.referrers(repo, subject, artifact_type="application/other") == ()


# ---- the client alone ---------------------------------------------------------------------------


def test_client_referrers_fallback_rules(servers: Any) -> None:
    """A 404 without NAME_UNKNOWN means no API (the fallback tag is read; missing = none);
    NAME_UNKNOWN means no such repository."""
    from ocifs.errors import NotFound

    from .fakeserver import error_reply
    from .test_client_hostile import make_client

    server = servers()
    subject = Digest.of(b"subject")
    entry = {"mediaType": OCI_MANIFEST, "digest": str(Digest.of(b"ref")), "size": 3, "artifactType": SBOM}
    index = encode_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]})
    server.route("GET", f"/v2/a/referrers/{subject}", Reply(404, "404 page not found\n"))
    server.route("GET", f"/v2/a/manifests/{fallback_tag(subject)}",
                 Reply(200, index, {"Content-Type": OCI_INDEX, "Content-Length": str(len(index))}))
    server.route("GET", f"/v2/b/referrers/{subject}", Reply(404, "404 page not found\n"))
    server.route("GET", f"/v2/b/manifests/{fallback_tag(subject)}", error_reply(404, "MANIFEST_UNKNOWN"))
    server.route("GET", f"/v2/c/referrers/{subject}", error_reply(404, "NAME_UNKNOWN"))
    client = make_client(server)
    [found] = client.referrers("a", subject)
    assert found.artifact_type == SBOM
    assert client.referrers("a", subject, artifact_type="application/other") == ()
    assert client.referrers("b", subject) == ()
    with pytest.raises(NotFound):
        client.referrers("c", subject)


def test_attach_updates_the_fallback_only_without_the_api() -> None:
    """`OCI-Subject` in the PUT's answer: the registry indexes it; else the fallback index is
    read, extended and checked."""
    from ocifs.model import Descriptor
    from ocifs.write.referrers import attach, referrer_layer
    from ocifs.write.targets import ReferrerTarget

    class Stub:
        def __init__(self, noted: bool) -> None:
            self.noted = noted
            self.tags: dict[str, bytes] = {}
            self.puts: list[str] = []

        def push_blob(self, *args: Any) -> None:
            pass

        def put_referrer(self, repository: str, raw: bytes, media_type: str) -> tuple[Digest, bool]:
            self.puts.append(str(Digest.of(raw)))
            return Digest.of(raw), self.noted

        def fallback_index(self, repository: str, digest: Digest) -> Any:
            raw = self.tags.get(fallback_tag(digest))
            return None if raw is None else parse_manifest(raw)

        def put_manifest(self, repository: str, tag: str, raw: bytes, media_type: str) -> Digest:
            self.tags[tag] = raw
            return Digest.of(raw)

    subject = Descriptor(OCI_MANIFEST, Digest.of(b"subject"), 7)
    target = ReferrerTarget("a", subject, SBOM, "sbom.json")
    layer = referrer_layer(target, Digest.of(b"{}\n"), 3, None)
    with_api = Stub(noted=True)
    attach(with_api, target, layer)  # type: ignore[arg-type]
    assert with_api.tags == {}
    without = Stub(noted=False)
    first = attach(without, target, layer)  # type: ignore[arg-type]
    index = parse_manifest(without.tags[fallback_tag(subject.digest)])
    assert [str(m.digest) for m in index.manifests] == [str(first)]  # type: ignore[union-attr]
    assert index.manifests[0].artifact_type == SBOM  # type: ignore[union-attr]


# ---- removing what is attached (`rm -r .referrers/<type>/<subtype>/sha256-<hex>`) ---------------


def _attach_files(client: RegistryClient, repo: str, tag: str, files: list[tuple[str, bytes]],
                  artifact_type: str = SBOM) -> Digest:
    """A referrer of `repo:tag` with several files, as `oras attach a b` makes one, listed in the
    tag-schema fallback index as the oras CLI does on a registry without the API."""
    from ocifs.model import referrer_descriptor
    from ocifs.write.referrers import add_to_fallback

    subject = client.resolve(repo, tag)
    push_blob(client, repo, EMPTY_JSON)
    layers = []
    for title, data in files:
        push_blob(client, repo, data)
        layers.append(Descriptor.for_bytes(OCI_LAYER_TAR, data, {ANNOTATION_TITLE: title}))
    raw = build_manifest(layers, artifact_type=artifact_type, subject=subject)
    digest, noted = client.put_referrer(repo, raw, OCI_MANIFEST)
    assert not noted
    add_to_fallback(client, repo, subject.digest, referrer_descriptor(parse_manifest(raw)))
    return digest


def _gone(client: RegistryClient, repo: str, reference: str) -> bool:
    from ocifs.errors import NotFound

    try:
        client.get_manifest(repo, reference)
    except NotFound:
        return True
    return False


def test_rm_r_removes_an_attachment_through_the_fallback(client: RegistryClient, registry: RunningRegistry,
                                                         repo: str, tmp_path: Path, mounter: Mounter) -> None:
    subject = push_artifact(client, repo, "1.0", {"app.txt": b"app\n"})
    sbom = tmp_path / "sbom.json"
    sbom.write_bytes(b'{"sbom": "to remove"}\n')
    sig = tmp_path / "sig.txt"
    sig.write_bytes(b"signature to remove\n")
    mnt = mounter(f"{registry.host}/{repo}")
    refs = mnt / "1.0" / ".referrers"
    type_dir = attach_by_cp(mnt, "1.0", sbom)
    os.makedirs(refs / "application" / "vnd.example.sig")
    run("cp", str(sig), str(refs / "application" / "vnd.example.sig") + "/")
    index = client.get_manifest(repo, fallback_tag(subject))
    by_type = {e.artifact_type: e.digest for e in index.manifests}  # type: ignore[union-attr]
    sbom_digest, sig_digest = by_type[SBOM], by_type["application/vnd.example.sig"]
    # `rm -r` of the referrer's directory: its manifest is deleted, the fallback index rewritten.
    run("rm", "-r", str(type_dir / sbom_digest.filename))
    assert _gone(client, repo, str(sbom_digest))
    index = client.get_manifest(repo, fallback_tag(subject))
    assert [e.digest for e in index.manifests] == [sig_digest]  # type: ignore[union-attr]
    assert errno_of(lambda: os.listdir(type_dir / sbom_digest.filename)) == errno.ENOENT
    assert os.listdir(type_dir) == []  # made here with mkdir: it stays, empty, until removed
    os.rmdir(type_dir)
    assert os.listdir(refs / "application") == ["vnd.example.sig"]
    # oras-py can no longer pull it.
    with pytest.raises(Exception, match=r"404|not found|Not Found|MANIFEST_UNKNOWN"):
        oras_client(registry).pull(target=f"{registry.host}/{repo}@{sbom_digest}", outdir=str(tmp_path / "out"))
    # A new mount does not show it either.
    fresh = mounter(f"{registry.host}/{repo}", cache_dir=tmp_path / "cache2")
    assert os.listdir(fresh / "1.0" / ".referrers" / "application") == ["vnd.example.sig"]
    # `rm` of the one file of the last referrer removes it: the fallback tag goes with it.
    run("rm", str(refs / "application" / "vnd.example.sig" / sig_digest.filename / "sig.txt"))
    assert _gone(client, repo, str(sig_digest))
    assert os.listdir(refs / "application" / "vnd.example.sig") == []
    run("rm", "-r", str(refs / "application"))
    assert _gone(client, repo, fallback_tag(subject))
    assert os.listdir(refs) == []
    assert list(client.tags(repo)) == ["1.0"]
    assert client.resolve(repo, "1.0").digest == subject  # the tag itself did not change
    assert (mnt / "1.0" / "app.txt").read_bytes() == b"app\n"


def test_a_referrer_goes_when_its_last_file_goes(client: RegistryClient, registry: RunningRegistry, repo: str,
                                                 mounter: Mounter) -> None:
    """A referrer is one manifest: removing one of several files hides it in this mount and
    changes nothing in the registry; the referrer is deleted when nothing of it is left."""
    subject = push_artifact(client, repo, "1.0", {"app.txt": b"app\n"})
    digest = _attach_files(client, repo, "1.0", [("a.txt", b"a\n"), ("docs/b.md", b"b\n")])
    mnt = mounter(f"{registry.host}/{repo}")
    where = mnt / "1.0" / ".referrers" / "application" / "vnd.example.sbom+json" / digest.filename
    assert sorted(os.listdir(where)) == ["a.txt", "docs"]
    os.unlink(where / "a.txt")
    assert os.listdir(where) == ["docs"]
    assert errno_of(lambda: os.stat(where / "a.txt")) == errno.ENOENT
    assert (where / "docs" / "b.md").read_bytes() == b"b\n"
    assert not _gone(client, repo, str(digest))  # nothing changed in the registry yet
    assert errno_of(lambda: os.rmdir(where)) == errno.ENOTEMPTY
    # `rm -r` of what is left removes the referrer.
    run("rm", "-r", str(where))
    assert _gone(client, repo, str(digest))
    assert _gone(client, repo, fallback_tag(subject))
    assert os.listdir(mnt / "1.0" / ".referrers") == []


def test_rm_r_removes_an_attachment_through_the_referrers_api(client: RegistryClient, registry: RunningRegistry,
                                                              repo: str, tmp_path: Path, mounter: Mounter,
                                                              api_proxies: Callable[..., ReferrersProxy]) -> None:
    proxy = api_proxies()
    subject = push_artifact(client, repo, "1.0", {"app.txt": b"app\n"})
    sbom = tmp_path / "sbom.json"
    sbom.write_bytes(b'{"sbom": "api, to remove"}\n')
    mnt = mounter(f"{proxy.host}/{repo}")
    type_dir = attach_by_cp(mnt, "1.0", sbom)
    [pushed] = proxy.pushed[(repo, str(subject))]
    digest = Digest.parse(pushed)
    assert os.listdir(type_dir) == [digest.filename]
    run("rm", "-r", str(type_dir / digest.filename))
    assert proxy.requests("DELETE", re.escape(f"/v2/{repo}/manifests/{digest}")) == [202]
    via_api = make_client(dataclasses.replace(registry, host=proxy.host))
    assert via_api.referrers(repo, subject) == ()
    assert os.listdir(type_dir) == []  # made here with mkdir
    run("rm", "-r", str(mnt / "1.0" / ".referrers" / "application"))
    assert os.listdir(mnt / "1.0" / ".referrers") == []
    # The registry indexed it itself: no fallback index was written or deleted.
    assert [m for m, _ in fallback_requests(proxy, repo, subject) if m in ("PUT", "DELETE")] == []
    assert list(client.tags(repo)) == ["1.0"]
    fresh = mounter(f"{proxy.host}/{repo}", cache_dir=tmp_path / "cache2")
    assert os.listdir(fresh / "1.0" / ".referrers") == []
    oras = oras_client(dataclasses.replace(registry, host=proxy.host))
    with pytest.raises(Exception, match=r"404|not found|Not Found|MANIFEST_UNKNOWN"):
        oras.pull(target=f"{proxy.host}/{repo}@{digest}", outdir=str(tmp_path / "out"))


def test_referrer_removal_refused_where_it_cannot_be(client: RegistryClient, registry: RunningRegistry, repo: str,
                                                     mounter: Mounter) -> None:
    subject = push_artifact(client, repo, "1.0", {"app.txt": b"app\n"})
    digest = _attach_files(client, repo, "1.0", [("sbom.json", b"{}\n")])
    read_only = mounter(f"{registry.host}/{repo}", "--read-only")
    where = read_only / "1.0" / ".referrers" / "application" / "vnd.example.sbom+json" / digest.filename
    assert errno_of(lambda: os.unlink(where / "sbom.json")) == errno.EROFS
    assert errno_of(lambda: os.rmdir(where)) == errno.EROFS
    mnt = mounter(f"{registry.host}/{repo}")
    refs = mnt / "1.0" / ".referrers"
    where = refs / "application" / "vnd.example.sbom+json" / digest.filename
    # Not a referrer's path: another type, a digest that refers to nothing.
    assert errno_of(lambda: os.rmdir(refs / "application" / "vnd.example.sig" / digest.filename)) == errno.ENOENT
    assert errno_of(lambda: os.rmdir(refs / "application" / "vnd.example.sbom+json"
                                     / Digest.of(b"nothing").filename)) == errno.ENOENT
    assert errno_of(lambda: os.unlink(where / "nothing.txt")) == errno.ENOENT
    # Its manifest's own files are not files of the referrer.
    assert errno_of(lambda: os.unlink(where / ".manifest.json")) == errno.EPERM
    assert errno_of(lambda: os.rmdir(where)) == errno.ENOTEMPTY
    assert not _gone(client, repo, str(digest))
    assert [e.digest for e in client.get_manifest(repo, fallback_tag(subject)).manifests] == [digest]  # type: ignore[union-attr]


def test_referrer_removal_on_a_registry_that_refuses_deletes(tmp_path: Path, mounter: Mounter) -> None:
    from .registry_server import start_registry

    server = start_registry(tmp_path / "nodelete", deletes=False)
    try:
        client = make_client(server)
        subject = push_artifact(client, "d/repo", "1.0", {"app.txt": b"app\n"})
        digest = _attach_files(client, "d/repo", "1.0", [("sbom.json", b"{}\n")])
        fallback = client.get_manifest("d/repo", fallback_tag(subject)).digest
        mnt = mounter(f"{server.host}/d/repo")
        where = mnt / "1.0" / ".referrers" / "application" / "vnd.example.sbom+json" / digest.filename
        assert errno_of(lambda: os.unlink(where / "sbom.json")) == errno.EPERM
        assert run("rm", "-r", str(where), check=False).returncode != 0
        # Nothing changed: the referrer, its file and the fallback index are all there.
        assert os.listdir(where) == ["sbom.json"]
        assert client.get_manifest("d/repo", str(digest)).digest == digest
        assert client.get_manifest("d/repo", fallback_tag(subject)).digest == fallback
        log = (mounter.cache_dir / "ocifs.log").read_text()
        assert f"d/repo@{digest}: the registry refuses deletes" in log
    finally:
        server.stop()


def test_detach_rewrites_the_fallback_index_or_deletes_it() -> None:
    """Without the API the referrer leaves the fallback index (read, rewritten, read again); the
    index that would be empty is deleted, by its digest (a newer index under the tag stays)."""
    from ocifs.write.referrers import detach

    subject = Digest.of(b"subject")
    tag = fallback_tag(subject)
    entries = [{"mediaType": OCI_MANIFEST, "digest": str(Digest.of(name)), "size": 3, "artifactType": SBOM}
               for name in (b"one", b"two")]

    class Stub:
        def __init__(self) -> None:
            self.tags = {tag: encode_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})}
            self.deleted: list[str] = []

        def delete_manifest(self, repository: str, reference: str) -> None:
            self.deleted.append(reference)
            for name, raw in list(self.tags.items()):
                if str(Digest.of(raw)) == reference:
                    del self.tags[name]

        def fallback_index(self, repository: str, digest: Digest) -> Any:
            raw = self.tags.get(fallback_tag(digest))
            return None if raw is None else parse_manifest(raw)

        def put_manifest(self, repository: str, reference: str, raw: bytes, media_type: str) -> Digest:
            self.tags[reference] = raw
            return Digest.of(raw)

    stub = Stub()
    detach(stub, "a", subject, Digest.of(b"one"))  # type: ignore[arg-type]
    assert stub.deleted == [str(Digest.of(b"one"))]
    index = parse_manifest(stub.tags[tag])
    assert [e.digest for e in index.manifests] == [Digest.of(b"two")]  # type: ignore[union-attr]
    detach(stub, "a", subject, Digest.of(b"two"))  # type: ignore[arg-type]
    assert tag not in stub.tags
    assert stub.deleted[-2:] == [str(Digest.of(b"two")), str(index.digest)]
