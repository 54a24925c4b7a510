"""A registry with the OCI 1.1 referrers API: the real test registry (distribution 2.8, which
has none) behind a FaultProxy that adds the two parts of the API a client sees.

- `PUT /v2/<repo>/manifests/<ref>` is forwarded; when the registry took it (201) and the body
  has a `subject`, the proxy records it and answers `OCI-Subject: <subject digest>` as an OCI
  1.1 registry does (`echo_subject=False`: a registry that has the API but does not send the
  header, as some do).
- `GET /v2/<repo>/referrers/<digest>` is answered by the proxy: an image index of the recorded
  referrers of that digest that the registry still holds and that still name it as their
  subject (each is read back from the registry, so the descriptor is built from the stored
  bytes: `artifactType` from the manifest, else its config's media type, as the spec says).
  `?artifactType=` filters them and `OCI-Filters-Applied: artifactType` says so
  (`filters=False`: a registry that ignores the filter and says nothing).
- `DELETE /v2/<repo>/manifests/<digest>` is forwarded; when the registry took it, that
  manifest is no longer a recorded referrer (it would not be listed anyway: each is read back).

Only what goes through the proxy is known: manifests pushed to the registry directly, or
before the proxy started, are not listed.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
from email.message import Message
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ocifs.model import OCI_INDEX, OCI_MANIFEST

from .faultproxy import FaultProxy

_MANIFEST = re.compile(r"/v2/(?P<repo>.+)/manifests/(?P<ref>[^/]+)")
_REFERRERS = re.compile(r"/v2/(?P<repo>.+)/referrers/(?P<digest>[^/]+)")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _subject_of(body: bytes) -> str | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    subject = doc.get("subject") if isinstance(doc, dict) else None
    digest = subject.get("digest") if isinstance(subject, dict) else None
    return digest if isinstance(digest, str) else None


class ReferrersProxy(FaultProxy):
    def __init__(self, upstream: str, *, echo_subject: bool = True, filters: bool = True) -> None:
        self.echo_subject = echo_subject
        self.filters = filters
        # (repository, subject digest) -> digests of the manifests pushed with that subject.
        self.pushed: dict[tuple[str, str], list[str]] = {}
        self.queries: list[str] = []  # the query strings of the referrers requests answered
        super().__init__(upstream)

    def forwarded(self, method: str, path: str, body: bytes, status: int) -> list[tuple[str, str]]:
        match = _MANIFEST.fullmatch(path)
        if method == "DELETE" and match is not None and status in (200, 202, 204):
            with self._lock:
                for (repo, _), known in self.pushed.items():
                    if repo == match["repo"] and match["ref"] in known:
                        known.remove(match["ref"])
            return []
        if method != "PUT" or match is None or status != 201:
            return []
        subject = _subject_of(body)
        if subject is None:
            return []
        with self._lock:
            known = self.pushed.setdefault((match["repo"], subject), [])
            if _sha256(body) not in known:
                known.append(_sha256(body))
        return [("OCI-Subject", subject)] if self.echo_subject else []

    def local_answer(self, method: str, target: str, headers: Message
                     ) -> tuple[int, list[tuple[str, str]], bytes] | None:
        parts = urlsplit(target)
        match = _REFERRERS.fullmatch(parts.path)
        if method != "GET" or match is None:
            return None
        repo, subject = match["repo"], match["digest"]
        with self._lock:
            self.queries.append(parts.query)
        if not _DIGEST.fullmatch(subject):
            error = {"errors": [{"code": "DIGEST_INVALID", "message": subject, "detail": None}]}
            return 400, [("Content-Type", "application/json")], json.dumps(error).encode()
        with self._lock:
            candidates = list(self.pushed.get((repo, subject), []))
        entries = [entry for entry in (self._held(repo, digest, subject) for digest in candidates)
                   if entry is not None]
        answer = [("Content-Type", OCI_INDEX)]
        wanted = parse_qs(parts.query).get("artifactType")
        if wanted and self.filters:
            entries = [entry for entry in entries if entry.get("artifactType") in wanted]
            answer.append(("OCI-Filters-Applied", "artifactType"))
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        return 200, answer, json.dumps(index).encode()

    def _held(self, repo: str, digest: str, subject: str) -> dict[str, Any] | None:
        """The referrers-API descriptor of `digest` as the registry now holds it; None when it
        is gone or does not refer to `subject`."""
        upstream = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            upstream.request("GET", f"/v2/{repo}/manifests/{digest}",
                             headers={"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"})
            response = upstream.getresponse()
            raw = response.read()
        finally:
            upstream.close()
        if response.status != 200 or _sha256(raw) != digest or _subject_of(raw) != subject:
            return None
        doc = json.loads(raw)
        entry: dict[str, Any] = {"mediaType": doc.get("mediaType") or response.getheader("Content-Type"),
                                 "digest": digest, "size": len(raw)}
        artifact_type = doc.get("artifactType") or (doc.get("config") or {}).get("mediaType")
        if artifact_type:
            entry["artifactType"] = artifact_type
        if doc.get("annotations"):
            entry["annotations"] = doc["annotations"]
        return entry
