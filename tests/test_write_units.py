"""Pure pieces of the write path: chart metadata, scratch names, layer edits."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from ocifs.digest import Digest
from ocifs.errors import NotFound, Refused
from ocifs.helm import chart_metadata
from ocifs.model import ANNOTATION_TITLE, OCI_LAYER_TAR, Descriptor
from ocifs.write.edits import drop_layer, put_layer
from ocifs.write.targets import check_name, is_scratch


def chart(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_chart_metadata_keeps_helm_strings_and_makes_json() -> None:
    yaml_text = (b"apiVersion: v2\nname: demo\nversion: 1.10\nappVersion: 2.0\n"
                 b"deprecated: true\nannotations:\n  built: 2020-01-01\n")
    metadata = chart_metadata(chart({"demo/Chart.yaml": yaml_text, "demo/values.yaml": b""}))
    assert metadata is not None
    assert metadata["version"] == "1.10" and metadata["appVersion"] == "2.0"
    assert metadata["deprecated"] is True
    assert metadata["annotations"] == {"built": "2020-01-01"}
    json.dumps(metadata)  # JSON-safe


@pytest.mark.parametrize("archive", [
    b"not a tarball",
    chart({"Chart.yaml": b"name: x\nversion: 1\n"}),  # not under <name>/
    chart({"demo/sub/Chart.yaml": b"name: x\nversion: 1\n"}),
    chart({"demo/Chart.yaml": b"name: [unclosed\n"}),
    chart({"demo/Chart.yaml": b"version: 1.0\n"}),  # no name
    chart({"demo/Chart.yaml": b"- a list\n"}),
])
def test_not_a_chart(archive: bytes) -> None:
    assert chart_metadata(archive) is None


def test_scratch_names() -> None:
    for name in (".f.swp", ".f.swa", "f~", "4913", ".#f"):
        assert is_scratch(name), name
    for name in ("f.swp", "4914", "a.txt", "#f"):
        assert not is_scratch(name), name


def test_check_name() -> None:
    check_name("t/ok", "ok")
    with pytest.raises(Refused) as caught:
        check_name("t/x", "x" * 256)
    assert caught.value.errno == 36  # ENAMETOOLONG
    with pytest.raises(Refused) as caught:
        check_name("t/bad", "bad\udcff")
    assert caught.value.errno == 22  # EINVAL


def layer(title: str | None, data: bytes) -> Descriptor:
    return Descriptor.for_bytes(OCI_LAYER_TAR, data, {ANNOTATION_TITLE: title} if title else {})


def test_put_layer_replaces_in_place_and_keeps_clashing_titles() -> None:
    a, b, dup = layer("a", b"1"), layer("b", b"2"), layer("a", b"3")
    new = layer("a", b"4")
    assert put_layer([a, b, dup], new, a) == [new, b, dup]
    assert put_layer([a, b], new, None) == [new, b]  # by title
    c = layer("c", b"5")
    assert put_layer([a, b], c, None) == [a, b, c]


def test_drop_layer_falls_back_to_the_title_and_says_when_gone() -> None:
    a, b = layer("a", b"1"), layer("b", b"2")
    changed = layer("a", b"changed elsewhere")
    assert drop_layer([changed, b], a) == [b]
    with pytest.raises(NotFound):
        drop_layer([b], a)
    assert Digest.of(b"1") == a.digest
