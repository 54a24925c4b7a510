"""The layout rules of DESIGN.md section 2, without I/O or mounts: `ocifs.layout` (title and
digest names, platforms, attestations, `build_layout`, inode numbers) and
`ocifs.helm.chart_file_stem`.

Manifests are built as JSON with `json.dumps` (ASCII escapes), so that titles a registry can
serve but Python cannot encode (lone surrogates) reach the parser as they would from a
registry.
"""

from __future__ import annotations

import json
import os
import posixpath
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ocifs.digest import Digest
from ocifs.helm import chart_file_stem
from ocifs.layout import (
    CONFIG_FILE,
    CONTROL_DIR,
    MANIFEST_FILE,
    NAME_MAX,
    RESERVED_NAMES,
    Entry,
    Layout,
    build_layout,
    digest_name,
    inode_number,
    is_attestation,
    platform_name,
    title_parts,
)
from ocifs.model import (
    ANNOTATION_DOCKER_REFERENCE_TYPE,
    ANNOTATION_TITLE,
    DOCKER_LAYER_TAR_GZIP,
    EMPTY_DESCRIPTOR,
    EMPTY_JSON,
    HELM_CHART,
    HELM_CONFIG,
    HELM_PROVENANCE,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_LAYER_TAR,
    OCI_LAYER_TAR_GZIP,
    OCI_LAYER_TAR_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
    parse_manifest,
)

# ---- helpers -----------------------------------------------------------------------------------


def layer(data: bytes, title: str | None = None, media_type: str = OCI_LAYER_TAR) -> dict[str, Any]:
    """A layer descriptor as JSON: `title` becomes the title annotation when given."""
    item: dict[str, Any] = {"mediaType": media_type, "digest": str(Digest.of(data)), "size": len(data)}
    if title is not None:
        item["annotations"] = {ANNOTATION_TITLE: title}
    return item


def image_manifest(layers: Sequence[dict[str, Any]], config: Descriptor = EMPTY_DESCRIPTOR) -> Manifest:
    """An OCI image manifest with these layers, parsed from JSON with ASCII escapes."""
    raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config.to_dict(),
                      "layers": list(layers)}).encode()
    parsed = parse_manifest(raw)
    assert isinstance(parsed, Manifest)
    return parsed


def manifest_entry(data: bytes, platform: dict[str, str] | None = None,
                   annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """An index entry for a manifest whose bytes are `data`."""
    item: dict[str, Any] = {"mediaType": OCI_MANIFEST, "digest": str(Digest.of(data)), "size": len(data)}
    if platform is not None:
        item["platform"] = platform
    if annotations:
        item["annotations"] = annotations
    return item


def image_index(entries: Sequence[dict[str, Any]]) -> Index:
    raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(entries)}).encode()
    parsed = parse_manifest(raw)
    assert isinstance(parsed, Index)
    return parsed


def names_of(layout: Layout) -> dict[tuple[str, ...], Digest]:
    """Each listed file path -> the digest behind it."""
    return {path: descriptor.digest for path, descriptor in layout.files.items()}


def dname(data: bytes, media_type: str = OCI_LAYER_TAR) -> str:
    """The digest name a layer of `data` and `media_type` gets."""
    return digest_name(Descriptor(media_type, Digest.of(data), len(data)))


def descriptor(platform: Platform | None = None, annotations: dict[str, str] | None = None,
               data: bytes = b"m") -> Descriptor:
    return Descriptor(OCI_MANIFEST, Digest.of(data), len(data), annotations or {}, platform)


# ---- title_parts -------------------------------------------------------------------------------


@pytest.mark.parametrize(("title", "parts"), [
    ("a.txt", ("a.txt",)),
    ("docs/a.md", ("docs", "a.md")),
    ("a/b/c/d", ("a", "b", "c", "d")),
    ("..a", ("..a",)),  # only exactly "." and ".." are special
    ("a..", ("a..",)),
    (".hidden", (".hidden",)),
    ("back\\slash", ("back\\slash",)),
    ("l" * NAME_MAX, ("l" * NAME_MAX,)),  # 255 bytes: the longest name
    ("é" * 127 + "x", ("é" * 127 + "x",)),  # 255 bytes in UTF-8
    ("docs/.manifest.json", ("docs", ".manifest.json")),  # reserved only at the top of a tag
    ("sp ace", ("sp ace",)),
])
def test_title_parts_of_safe_titles(title: str, parts: tuple[str, ...]) -> None:
    """A safe title is the tuple of its `/`-separated components, nothing dropped or added."""
    assert title_parts(title) == parts


@pytest.mark.parametrize("title", [
    None,
    "",
    "/etc/passwd",  # absolute
    "/",
    "..",
    "../escape",
    "a/../../escape",
    "a/..",
    ".",
    "./a",
    "a/./b",
    "a//b",  # empty component
    "a/",
    "//double",
    "nul\0byte",
    "\0",
    "a/b\0c",
    "m" * (NAME_MAX + 1),  # 256 bytes
    "é" * 128,  # 256 bytes in UTF-8 (128 characters)
    "ok/" + "x" * (NAME_MAX + 1),  # a long inner component
    MANIFEST_FILE,
    CONFIG_FILE,
    CONTROL_DIR,
    f"{CONTROL_DIR}/status",
    f"{MANIFEST_FILE}/x",
    "bad\ud800name",  # a lone surrogate, as JSON can carry one
    "dir/\udcffname",
])
def test_title_parts_refuses_unsafe_titles(title: str | None) -> None:
    """Absolute, `..`, `.`, empty components, NUL, over NAME_MAX bytes, reserved names and
    lone surrogates: None (the layer is named by its digest)."""
    assert title_parts(title) is None


@pytest.mark.parametrize("title", ["new\nline", "tab\there", "bell\x07", "del\x7f", "c1\x85next",
                                   "\u202eevil.txt", "iso\u2066late"])
def test_title_parts_refuses_control_and_bidi_characters(title: str) -> None:
    """DESIGN.md: a title with control characters or bidi formatting characters is unsafe."""
    assert title_parts(title) is None


# ---- digest_name, platform_name, is_attestation --------------------------------------------------


@pytest.mark.parametrize(("media_type", "extension"), [
    (OCI_LAYER_TAR, ".tar"),
    (OCI_LAYER_TAR_GZIP, ".tar.gz"),
    (OCI_LAYER_TAR_ZSTD, ".tar.zst"),
    (DOCKER_LAYER_TAR_GZIP, ".tar.gz"),
    ("application/vnd.docker.image.rootfs.diff.tar.zstd", ".tar.zst"),
    ("APPLICATION/VND.OCI.IMAGE.LAYER.V1.TAR+GZIP", ".tar.gz"),  # media types are case-insensitive
    (HELM_CHART, ".tar.gz"),
    ("application/octet-stream", ""),
    (HELM_PROVENANCE, ""),
    (OCI_EMPTY, ""),
    ("text/plain+zip", ""),
])
def test_digest_name_extensions(media_type: str, extension: str) -> None:
    """`<algorithm>-<hex>` plus `.tar.gz`/`.tar.zst`/`.tar` for compressed or plain tar layers."""
    data = b"some layer"
    assert digest_name(Descriptor(media_type, Digest.of(data), len(data))) == \
        f"sha256-{Digest.of(data).hex}{extension}"


@pytest.mark.parametrize(("platform", "name"), [
    (Platform("linux", "amd64"), "linux-amd64"),
    (Platform("linux", "arm64", "v8"), "linux-arm64-v8"),
    (Platform("linux", "arm", "v7", "10.0"), "linux-arm-v7"),  # os.version is not part of the name
    (Platform("windows", "amd64", None, "10.0.17763"), "windows-amd64"),
    (Platform("linux/../..", "amd64"), None),  # a slash would leave the directory
    (Platform("linux", "amd64/x"), None),
    (Platform("li\0nux", "amd64"), None),
    (Platform("l" * 250, "amd64"), None),  # over NAME_MAX
    (None, None),
])
def test_platform_name(platform: Platform | None, name: str | None) -> None:
    """`<os>-<arch>[-<variant>]`, or None where there is no platform or it is no safe name."""
    assert platform_name(descriptor(platform)) == name


@pytest.mark.parametrize(("platform", "annotations", "expected"), [
    (Platform("unknown", "unknown"), {}, True),
    (None, {ANNOTATION_DOCKER_REFERENCE_TYPE: "attestation-manifest"}, True),
    (Platform("linux", "amd64"), {ANNOTATION_DOCKER_REFERENCE_TYPE: "attestation-manifest"}, True),
    (Platform("linux", "amd64"), {}, False),
    (Platform("unknown", "amd64"), {}, False),
    (Platform("linux", "unknown"), {}, False),
    (None, {}, False),
    (None, {ANNOTATION_DOCKER_REFERENCE_TYPE: "something-else"}, False),
])
def test_is_attestation(platform: Platform | None, annotations: dict[str, str], expected: bool) -> None:
    """`unknown/unknown`, or the Docker attestation reference type: an attestation."""
    assert is_attestation(descriptor(platform, annotations)) is expected


# ---- build_layout: image manifests --------------------------------------------------------------


def test_nested_titles_make_directories() -> None:
    """`docs/a.md` is file `a.md` in directory `docs/`; directories list their entries."""
    layout = build_layout(image_manifest([
        layer(b"top", "top.txt"), layer(b"a", "docs/a.md"), layer(b"c", "docs/b/c.md"),
    ]))
    assert names_of(layout) == {("top.txt",): Digest.of(b"top"), ("docs", "a.md"): Digest.of(b"a"),
                                ("docs", "b", "c.md"): Digest.of(b"c")}
    assert layout.dirs == frozenset({("docs",), ("docs", "b")})
    assert layout.manifests == {}
    assert layout.children(()) == [Entry("docs", True, None), Entry("top.txt", False, Digest.of(b"top"))]
    assert layout.children(("docs",)) == [Entry("a.md", False, Digest.of(b"a")), Entry("b", True, None)]
    assert layout.children(("docs", "b")) == [Entry("c.md", False, Digest.of(b"c"))]
    assert layout.children(("nowhere",)) == []


def test_untitled_and_unsafe_titles_get_digest_names() -> None:
    layout = build_layout(image_manifest([
        layer(b"untitled", None, OCI_LAYER_TAR_GZIP),
        layer(b"dotdot", "../x"),
        layer(b"reserved", MANIFEST_FILE),
        layer(b"surrogate", "a\udcffb", "application/octet-stream"),
    ]))
    assert names_of(layout) == {
        (dname(b"untitled", OCI_LAYER_TAR_GZIP),): Digest.of(b"untitled"),
        (dname(b"dotdot"),): Digest.of(b"dotdot"),
        (dname(b"reserved"),): Digest.of(b"reserved"),
        (dname(b"surrogate", "application/octet-stream"),): Digest.of(b"surrogate"),
    }
    assert layout.dirs == frozenset()


def test_clashing_titles_fall_back_to_digest_names() -> None:
    """The first layer keeps a title; a later one that clashes is named by its digest."""
    layout = build_layout(image_manifest([layer(b"first", "same"), layer(b"second", "same")]))
    assert names_of(layout) == {("same",): Digest.of(b"first"), (dname(b"second"),): Digest.of(b"second")}


@pytest.mark.parametrize("order", ["file first", "directory first"])
def test_a_file_and_a_directory_of_one_name_keep_both(order: str) -> None:
    """`docs` as a file and `docs/x` as a nested title: whichever comes second is named by
    digest; both stay reachable."""
    as_file, in_dir = layer(b"file", "docs"), layer(b"nested", "docs/x")
    layers = [as_file, in_dir] if order == "file first" else [in_dir, as_file]
    layout = build_layout(image_manifest(layers))
    if order == "file first":
        assert names_of(layout) == {("docs",): Digest.of(b"file"), (dname(b"nested"),): Digest.of(b"nested")}
        assert layout.dirs == frozenset()
    else:
        assert names_of(layout) == {("docs", "x"): Digest.of(b"nested"), (dname(b"file"),): Digest.of(b"file")}
        assert layout.dirs == frozenset({("docs",)})


@pytest.mark.parametrize("order", ["impostor first", "impostor last"])
@pytest.mark.parametrize(("spelling", "media_type"), [
    ("with extension", OCI_LAYER_TAR_GZIP),
    ("without extension", OCI_LAYER_TAR_GZIP),
    ("as a directory", OCI_LAYER_TAR),
])
def test_a_title_spelling_another_layers_digest_name_hides_nothing(order: str, spelling: str,
                                                                   media_type: str) -> None:
    """A title that spells another layer's digest name (with or without its extension, or as
    the directory of a nested title) is not used: the impostor is named by its own digest, and
    the digest name keeps naming the layer it belongs to."""
    real = b"the real layer"
    real_name = dname(real, media_type)
    title = {"with extension": real_name, "without extension": Digest.of(real).filename,
             "as a directory": real_name + "/inner"}[spelling]
    impostor = layer(b"impostor bytes", title)
    genuine = layer(real, None, media_type)
    layout = build_layout(image_manifest([impostor, genuine] if order == "impostor first" else [genuine, impostor]))
    assert names_of(layout) == {(real_name,): Digest.of(real),
                                (dname(b"impostor bytes"),): Digest.of(b"impostor bytes")}


def test_a_title_spelling_its_own_digest_name_is_kept() -> None:
    data = b"honest"
    layout = build_layout(image_manifest([layer(data, dname(data))]))
    assert names_of(layout) == {(dname(data),): Digest.of(data)}


def test_the_same_blob_twice() -> None:
    """Twice titled: two files. Titled and untitled: both listed. Twice untitled: once."""
    layout = build_layout(image_manifest([layer(b"x", "one"), layer(b"x", "two")]))
    assert names_of(layout) == {("one",): Digest.of(b"x"), ("two",): Digest.of(b"x")}
    layout = build_layout(image_manifest([layer(b"x", "one"), layer(b"x")]))
    assert names_of(layout) == {("one",): Digest.of(b"x"), (dname(b"x"),): Digest.of(b"x")}
    layout = build_layout(image_manifest([layer(b"x"), layer(b"x")]))
    assert names_of(layout) == {(dname(b"x"),): Digest.of(b"x")}


def test_the_placeholder_layer_is_not_listed() -> None:
    """The untitled empty descriptor of a file-less artifact is hidden; a titled `{}` file, or
    `{}` under another media type, is a file."""
    assert build_layout(image_manifest([EMPTY_DESCRIPTOR.to_dict()])).files == {}
    layout = build_layout(image_manifest([
        EMPTY_DESCRIPTOR.to_dict(),
        layer(EMPTY_JSON, "braces.json", OCI_EMPTY),
        layer(EMPTY_JSON, None, "application/json"),
    ]))
    assert names_of(layout) == {("braces.json",): Digest.of(EMPTY_JSON),
                                (dname(EMPTY_JSON, "application/json"),): Digest.of(EMPTY_JSON)}


def helm_manifest(*extra: dict[str, Any]) -> Manifest:
    config = Descriptor.for_bytes(HELM_CONFIG, b'{"name":"demo","version":"0.1.0"}')
    return image_manifest([*extra, layer(b"chart", None, HELM_CHART), layer(b"prov", None, HELM_PROVENANCE)],
                          config)


def test_helm_chart_and_provenance_names() -> None:
    """With the chart's name, `<name>-<version>.tgz` and `.tgz.prov`, as `helm pull` saves them;
    without it (config unreadable), digest names."""
    layout = build_layout(helm_manifest(), "demo-0.1.0")
    assert names_of(layout) == {("demo-0.1.0.tgz",): Digest.of(b"chart"),
                                ("demo-0.1.0.tgz.prov",): Digest.of(b"prov")}
    layout = build_layout(helm_manifest())
    assert names_of(layout) == {(dname(b"chart", HELM_CHART),): Digest.of(b"chart"),
                                (dname(b"prov", HELM_PROVENANCE),): Digest.of(b"prov")}
    assert dname(b"chart", HELM_CHART).endswith(".tar.gz")


def test_a_titled_file_named_like_the_chart_keeps_both() -> None:
    layout = build_layout(helm_manifest(layer(b"squatter", "demo-0.1.0.tgz")), "demo-0.1.0")
    assert names_of(layout) == {("demo-0.1.0.tgz",): Digest.of(b"squatter"),
                                (dname(b"chart", HELM_CHART),): Digest.of(b"chart"),
                                ("demo-0.1.0.tgz.prov",): Digest.of(b"prov")}


# ---- build_layout: indexes ------------------------------------------------------------------------


def test_index_platforms_duplicates_and_attestations() -> None:
    """One directory per platform; the same manifest twice shows once; a second manifest of
    one platform, and entries without a platform, are named by digest; attestations are not
    listed; an index lists no files."""
    amd, arm, other_amd, nested, attest, attest2 = (b"amd", b"arm", b"amd2", b"nested", b"att", b"att2")
    layout = build_layout(image_index([
        manifest_entry(amd, {"os": "linux", "architecture": "amd64"}),
        manifest_entry(arm, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
        manifest_entry(amd, {"os": "linux", "architecture": "amd64"}),  # the same manifest again
        manifest_entry(other_amd, {"os": "linux", "architecture": "amd64"}),  # another one, same platform
        manifest_entry(nested),  # no platform
        manifest_entry(attest, {"os": "unknown", "architecture": "unknown"}),
        manifest_entry(attest2, {"os": "linux", "architecture": "amd64"},
                       {ANNOTATION_DOCKER_REFERENCE_TYPE: "attestation-manifest"}),
    ]))
    assert {name: entry.digest for name, entry in layout.manifests.items()} == {
        "linux-amd64": Digest.of(amd),
        "linux-arm64-v8": Digest.of(arm),
        Digest.of(other_amd).filename: Digest.of(other_amd),
        Digest.of(nested).filename: Digest.of(nested),
    }
    assert layout.files == {} and layout.dirs == frozenset()
    assert all(entry.is_dir and entry.digest is None for entry in layout.children(()))
    assert [entry.name for entry in layout.children(())] == sorted(layout.manifests)


def test_a_platform_spelling_another_entrys_digest_name_hides_nothing() -> None:
    """os `sha256`, architecture `<hex of another entry>`: that name stays the other entry's."""
    target = b"platformless"
    layout = build_layout(image_index([
        manifest_entry(b"spoofer", {"os": "sha256", "architecture": Digest.of(target).hex}),
        manifest_entry(target),
    ]))
    assert {name: entry.digest for name, entry in layout.manifests.items()} == {
        Digest.of(target).filename: Digest.of(target),
        Digest.of(b"spoofer").filename: Digest.of(b"spoofer"),
    }


# ---- the property: nothing unsafe, nothing hidden ---------------------------------------------------

BLOBS = [b"a", b"b", b"c", b"dd", EMPTY_JSON, b""]
MEDIA_TYPES = [OCI_LAYER_TAR, OCI_LAYER_TAR_GZIP, OCI_LAYER_TAR_ZSTD, "application/octet-stream", OCI_EMPTY]
COMPONENTS = ["a", "b", "docs", ".", "..", "", "x" * NAME_MAX, "y" * (NAME_MAX + 1), "é" * 128,
              "nul\0", "\ud800", MANIFEST_FILE, CONFIG_FILE, CONTROL_DIR, "sha256-", ".tar.gz"]


@st.composite
def titles(draw: st.DrawFn) -> str | None:
    """Titles as a hostile registry could serve them: paths of safe and unsafe components,
    other layers' digest names (with and without extensions), random text."""
    kind = draw(st.sampled_from(["none", "components", "digest name", "text"]))
    if kind == "none":
        return None
    if kind == "digest name":
        name = dname(draw(st.sampled_from(BLOBS)), draw(st.sampled_from(MEDIA_TYPES)))
        suffix = draw(st.sampled_from(["", "/inner", "/", ".extra"]))
        return name + suffix
    if kind == "text":
        return draw(st.text(alphabet=st.sampled_from("ab/.\0é\ud800"), max_size=12))
    parts = draw(st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=4))
    prefix = draw(st.sampled_from(["", "", "/"]))
    return prefix + "/".join(parts)


@st.composite
def hostile_manifests(draw: st.DrawFn) -> Manifest:
    layers = draw(st.lists(
        st.builds(lambda data, title, media_type: layer(data, title, media_type),
                  st.sampled_from(BLOBS), titles(), st.sampled_from(MEDIA_TYPES)),
        min_size=0, max_size=8))
    return image_manifest(layers)


def is_safe_component(name: str) -> bool:
    """One path component a kernel accepts and that stays where it is."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name and len(encoded) <= NAME_MAX


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_manifests())
def test_every_name_is_safe_and_no_layer_is_hidden(manifest: Manifest) -> None:
    """Whatever titles a manifest carries: every name `build_layout` makes is one safe path
    component, nothing resolves outside the tag directory, reserved names never appear at its
    top, files and directories never overlap, a digest name always names its own digest, and
    every layer but the placeholder is listed under some name."""
    layout = build_layout(manifest)
    own_names = {}
    for item in manifest.layers:
        own_names[item.digest.filename] = item.digest
        own_names[digest_name(item)] = item.digest
    for path, item in layout.files.items():
        assert path and all(is_safe_component(part) for part in path), path
        assert path[0] not in RESERVED_NAMES
        joined = posixpath.normpath(posixpath.join("/tag", *path))
        assert joined.startswith("/tag/"), path
        assert path not in layout.dirs
        assert all(path[:i] not in layout.files for i in range(1, len(path)))
        owner = own_names.get(path[0])
        assert owner is None or owner == item.digest, (path, item.digest)
    prefixes = {path[:i] for path in layout.files for i in range(1, len(path))}
    assert layout.dirs == prefixes
    for entry in layout.children(()):
        assert is_safe_component(entry.name) and entry.name not in RESERVED_NAMES
    listed = {item.digest for item in layout.files.values()}
    expected = {item.digest for item in manifest.layers
                if not (item.media_type == OCI_EMPTY and item.digest == Digest.of(EMPTY_JSON)
                        and item.title is None)}
    assert listed == expected


PLATFORM_WORDS = ["linux", "amd64", "arm64", "v8", "unknown", "sha256", Digest.of(b"m1").hex, "..", ".",
                  "a/b", "\0", "", "x" * 300]


@st.composite
def hostile_indexes(draw: st.DrawFn) -> Index:
    entries = []
    for _ in range(draw(st.integers(0, 6))):
        data = draw(st.sampled_from([b"m1", b"m2", b"m3"]))
        platform = None
        if draw(st.booleans()):
            platform = {"os": draw(st.sampled_from(PLATFORM_WORDS)),
                        "architecture": draw(st.sampled_from(PLATFORM_WORDS))}
            variant = draw(st.sampled_from([None, "v7", "/", ".."]))
            if variant is not None:
                platform["variant"] = variant
        annotations = draw(st.sampled_from([None, {ANNOTATION_DOCKER_REFERENCE_TYPE: "attestation-manifest"}]))
        entries.append(manifest_entry(data, platform, annotations))
    return image_index(entries)


@settings(max_examples=200, deadline=None)
@given(hostile_indexes())
def test_index_directories_are_safe_and_complete(index: Index) -> None:
    """Every directory of an index is one safe name, names a platform or its own digest, and
    every manifest that is not only an attestation is listed exactly once."""
    layout = build_layout(index)
    assert layout.files == {} and layout.dirs == frozenset()
    for name, entry in layout.manifests.items():
        assert is_safe_component(name) and name not in RESERVED_NAMES, name
        assert not is_attestation(entry)
        assert name == entry.digest.filename or name == platform_name(entry)
        if name.startswith("sha256-") and name[len("sha256-"):] in {Digest.of(d).hex for d in (b"m1", b"m2", b"m3")}:
            assert name == entry.digest.filename
    listed = [entry.digest for entry in layout.manifests.values()]
    assert len(listed) == len(set(listed))
    assert set(listed) == {entry.digest for entry in index.manifests if not is_attestation(entry)}


# ---- inode numbers -----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.one_of(st.none(), st.binary(max_size=8).map(Digest.of)))
def test_inode_numbers_are_stable_and_never_0_or_1(path: str, digest: Digest | None) -> None:
    """Any path (even one with lone surrogates) has an inode above 1 that fits in 64 bits, the
    same each time it is asked for."""
    number = inode_number(path, digest)
    assert 2 <= number < 2 ** 64
    assert inode_number(path, digest) == number


def test_inode_numbers_differ_by_path_and_by_file_digest() -> None:
    a, b = Digest.of(b"a"), Digest.of(b"b")
    numbers = {inode_number("r/t/f", a), inode_number("r/t/f", b), inode_number("r/t/f", None),
               inode_number("r/t/g", a), inode_number("r/t", None), inode_number("r/u/f", a)}
    assert len(numbers) == 6


def test_inode_numbers_do_not_depend_on_the_process() -> None:
    """Stable across processes (not Python's randomised `hash`): a remount gives the same
    numbers."""
    digest = Digest.of(b"x")
    code = ("from ocifs.layout import inode_number; from ocifs.digest import Digest;"
            "print(inode_number('repo/tag/f\u00e9', Digest.of(b'x')), inode_number('repo', None))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            check=True, timeout=60)
    assert result.stdout.split() == [str(inode_number("repo/tag/f\u00e9", digest)), str(inode_number("repo", None))]


# ---- helm.chart_file_stem --------------------------------------------------------------------------


@pytest.mark.parametrize(("config", "stem"), [
    (b'{"name":"demo","version":"0.1.0","apiVersion":"v2"}', "demo-0.1.0"),
    (b'{"name":"web","version":"1.2.3+build.4"}', "web-1.2.3+build.4"),  # the file keeps the +
    (b'{"name":"d","version":"1"}', "d-1"),
    (json.dumps({"name": "n" * 240, "version": "12345"}).encode(), "n" * 240 + "-12345"),  # 255 with .tgz.prov
    (json.dumps({"name": "n" * 240, "version": "123456"}).encode(), None),  # `.tgz.prov` would pass 255
    (b"not json", None),
    (b"\xff\xfe", None),
    (b"[1, 2]", None),
    (b'"a string"', None),
    (b'{"name":"demo"}', None),
    (b'{"version":"1.0"}', None),
    (b'{"name":1,"version":"1.0"}', None),
    (b'{"name":"demo","version":1.0}', None),
    (b'{"name":"../../etc","version":"1"}', None),
    (b'{"name":"a/b","version":"1"}', None),
    (b'{"name":"nul\\u0000","version":"1"}', None),
    (b'{"name":"bad\\ud800","version":"1"}', None),
    (b"[" * 100_000, None),  # too deep to parse
])
def test_chart_file_stem(config: bytes, stem: str | None) -> None:
    """`<name>-<version>` from a chart config, or None when that is no safe file name (room is
    kept for `.tgz.prov`)."""
    result = chart_file_stem(config)
    assert result == stem
    if result is not None:
        assert is_safe_component(result + ".tgz.prov")


def test_a_name_spelled_like_a_digest_name_is_its_own_digest_name_only() -> None:
    """A title or a platform spelled like the digest name of a blob that is not even in the
    manifest (found by the property test above) is not used either: a `sha256-<hex>` name
    always names that digest."""
    stranger = Digest.of(b"not in this manifest")
    manifest = image_manifest([layer(b"data", stranger.filename + ".tar")])
    assert names_of(build_layout(manifest)) == {(dname(b"data"),): Digest.of(b"data")}
    index = image_index([manifest_entry(b"m2", {"os": "sha256", "architecture": stranger.hex})])
    assert list(build_layout(index).manifests) == [Digest.of(b"m2").filename]
