"""Attaching: a file copied into `.referrers/<type>/<subtype>/` of a manifest becomes a new
artifact that refers to it, as `oras attach --artifact-type <type>/<subtype>` makes one: an
image manifest with the empty config, `artifactType`, the file as its one titled layer and
`subject` set to that manifest, pushed by digest (nothing is tagged).

A registry with the referrers API says so when it takes the manifest (`OCI-Subject`); on one
without it, the tag-schema fallback index (`<alg>-<hex>` of the subject) is read, the new
manifest added, and PUT back, then read again to check it holds it (bounded rounds: the
registry API has no compare-and-swap; another writer's PUT in between is seen and redone).

A registry that has the referrers API but does not send `OCI-Subject` (some do not) cannot be
told from one without it, so it gets the fallback index too, as the distribution spec asks of
clients when the header is absent (oras-go does the same). What its API lists stays right:
the registry indexed the subject itself, and the fallback index has no `subject`, so it is
not a referrer; the cost is one more tag, `<alg>-<hex>`. Reads on such a registry use the API
and never that tag (tests/test_referrers.py, on the real registry behind a proxy that adds
the API, covers both answers).

Detaching (`detach`) undoes it: the referrer manifest is deleted by digest first (a registry
that refuses deletes changes nothing), then taken out of the subject's fallback index when
there is one that lists it, by the same checked read-modify-write; an index that would be
left empty is deleted by its own digest, so that a newer index another writer PUT under the
tag meanwhile is not deleted with it.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import random
import time
from datetime import UTC, datetime
from typing import Any

from ..digest import Digest
from ..errors import IntegrityError, NotFound, Refused, RegistryError, Unsupported
from ..model import (
    ANNOTATION_CREATED,
    ANNOTATION_TITLE,
    EMPTY_DESCRIPTOR,
    EMPTY_JSON,
    OCI_INDEX,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    Descriptor,
    Index,
    add_referrer,
    build_manifest,
    encode_json,
    fallback_tag,
    parse_manifest,
    referrer_descriptor,
)
from ..registry.client import RegistryClient
from .targets import ReferrerTarget

log = logging.getLogger(__name__)

FALLBACK_ROUNDS = 6


def attach(client: RegistryClient, target: ReferrerTarget, layer: Descriptor) -> Digest:
    """Push the referrer manifest for `layer` (its blob already in the repository) and make
    it findable; returns the new manifest's digest."""
    repository = target.repository
    client.push_blob(repository, io.BytesIO(EMPTY_JSON), EMPTY_DESCRIPTOR.digest, EMPTY_DESCRIPTOR.size)
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    raw = build_manifest([layer], artifact_type=target.artifact_type,
                         annotations={ANNOTATION_CREATED: created}, subject=target.subject)
    digest, noted = client.put_referrer(repository, raw, OCI_MANIFEST)
    if not noted:
        entry = referrer_descriptor(parse_manifest(raw, content_type=OCI_MANIFEST))
        add_to_fallback(client, repository, target.subject.digest, entry)
    log.info("attached %s to %s@%s as %s (%s)", target.title, repository, target.subject.digest,
             digest, target.artifact_type)
    return digest


def add_to_fallback(client: RegistryClient, repository: str, subject: Digest, entry: Descriptor) -> None:
    """Read-modify-write of the tag-schema fallback index, checked after each PUT."""
    tag = fallback_tag(subject)
    for attempt in range(FALLBACK_ROUNDS):
        index = client.fallback_index(repository, subject)
        raw = add_referrer(index, entry)
        if raw is None:
            return  # listed already (by us in an earlier round, or by another client)
        started = time.monotonic()
        client.put_manifest(repository, tag, raw, index.media_type if index is not None else OCI_INDEX)
        took = time.monotonic() - started
        time.sleep(max(0.02, took) * (1 + random.random()))  # let a concurrent writer's PUT land
        check = client.fallback_index(repository, subject)
        if check is not None and any(item.digest == entry.digest for item in check.manifests):
            return
        log.info("%s:%s was replaced without %s; adding it again (round %d)", repository, tag,
                 entry.digest, attempt + 2)
    raise IntegrityError(f"{repository}:{tag}: other writers keep replacing the referrers index")


def detach(client: RegistryClient, repository: str, subject: Digest, referrer: Digest) -> None:
    """Delete the referrer manifest `referrer` of `subject` and take it out of the subject's
    fallback index. EPERM (nothing changed) when the registry refuses deletes."""
    try:
        client.delete_manifest(repository, str(referrer))
    except Unsupported as exc:
        log.warning("%s@%s: the registry refuses deletes; the referrer stays (%s)", repository, referrer, exc)
        raise Refused(f"{repository}@{referrer}: the registry refuses deletes", errno.EPERM) from None
    except NotFound:
        log.info("%s@%s: already gone from the registry", repository, referrer)
    remove_from_fallback(client, repository, subject, referrer)
    log.info("removed %s@%s, which referred to %s", repository, referrer, subject)


def remove_from_fallback(client: RegistryClient, repository: str, subject: Digest, referrer: Digest) -> None:
    """Read-modify-write of the tag-schema fallback index without `referrer`, checked after
    each change; the index is deleted (by its digest) rather than left empty."""
    tag = fallback_tag(subject)
    for attempt in range(FALLBACK_ROUNDS):
        index = client.fallback_index(repository, subject)
        if index is None or not any(item.digest == referrer for item in index.manifests):
            return  # no fallback index (the registry has the API), or not listed (any more)
        raw = _without_referrer(index, referrer)
        started = time.monotonic()
        if raw is None:
            _delete_index(client, repository, tag, index)
        else:
            client.put_manifest(repository, tag, raw, index.media_type)
        took = time.monotonic() - started
        time.sleep(max(0.02, took) * (1 + random.random()))  # let a concurrent writer's PUT land
        check = client.fallback_index(repository, subject)
        if check is None or not any(item.digest == referrer for item in check.manifests):
            return
        log.info("%s:%s lists %s again; removing it again (round %d)", repository, tag, referrer, attempt + 2)
    raise IntegrityError(f"{repository}:{tag}: other writers keep putting {referrer} back in the referrers index")


def _without_referrer(index: Index, referrer: Digest) -> bytes | None:
    """The fallback index without the entries of `referrer`, everything else kept; None when
    nothing would be left."""
    try:
        data: dict[str, Any] = json.loads(index.raw)
    except ValueError as exc:
        raise IntegrityError(f"index {index.digest} no longer parses: {exc}") from None
    entries = data.get("manifests")
    kept = [item for item in entries if not (isinstance(item, dict) and item.get("digest") == str(referrer))] \
        if isinstance(entries, list) else []
    if not kept:
        return None
    data["manifests"] = kept
    return encode_json(data)


def _delete_index(client: RegistryClient, repository: str, tag: str, index: Index) -> None:
    """Delete the fallback index that held only the removed referrer. By digest: the registry
    untags it only while the tag still names these bytes (a newer index PUT meanwhile stays).
    Where that delete fails, an empty index is PUT instead."""
    try:
        client.delete_manifest(repository, str(index.digest))
    except NotFound:
        pass  # replaced or deleted meanwhile: the check after says which
    except RegistryError as exc:
        log.info("%s:%s: could not delete the emptied referrers index (%s); leaving it empty", repository,
                 tag, exc)
        empty = encode_json({"schemaVersion": 2, "mediaType": index.media_type, "manifests": []})
        client.put_manifest(repository, tag, empty, index.media_type)


def referrer_layer(target: ReferrerTarget, digest: Digest, size: int, media_type: str | None) -> Descriptor:
    """The one layer of an attached file, as oras lays it out."""
    return Descriptor(media_type or OCI_LAYER_TAR, digest, size, {ANNOTATION_TITLE: target.title})
