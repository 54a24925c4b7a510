"""The OCI distribution API: catalog, tags, manifests, blobs, uploads, deletes.

Names, tags and digests are validated before any request. Every response goes through
`transport.check()`. Paging follows `Link` headers (relative ones too, same origin only).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import quote, urlencode, urljoin, urlsplit

import requests

from .. import deadline
from ..digest import Digest, verified_chunks
from ..errors import (
    AuthError,
    IntegrityError,
    InvalidReference,
    ManifestError,
    ManifestTooLarge,
    NetworkError,
    NotFound,
    RangeError,
    RegistryError,
    RequestTimeout,
    ServerError,
    TLSError,
)
from ..model import (
    MANIFEST_ACCEPT,
    MAX_MANIFEST_SIZE,
    OCI_INDEX,
    Descriptor,
    Index,
    Manifest,
    base_media_type,
    fallback_tag,
    parse_manifest,
    parse_referrers,
)
from ..reference import Registry, check_reference, check_repository
from .auth import Authenticator, CredentialLookup
from .transport import (
    Page,
    Transport,
    TransportOptions,
    _TooLarge,
    check,
    follow_pages,
    iter_body,
    json_object,
    read_body,
)

log = logging.getLogger(__name__)

# Blobs up to this size go up in one PUT; bigger ones in chunks of CHUNK_SIZE.
MONOLITHIC_LIMIT = 32 * 1024 * 1024
CHUNK_SIZE = 16 * 1024 * 1024
# How often a chunked upload re-synchronises with the server before giving up.
MAX_UPLOAD_RECOVERIES = 5

_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_LINK_NEXT_RE = re.compile(r'<([^>]*)>\s*;[^,]*rel="?next"?')
_RANGE_RE = re.compile(r"^(?:bytes=)?(\d+)-(\d+)$")
# Pages of a referrers answer followed at most (each is an index of up to 4 MiB).
MAX_REFERRER_PAGES = 16


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def push_scope(repository: str) -> str:
    return f"repository:{repository}:pull,push"


def delete_scope(repository: str) -> str:
    return f"repository:{repository}:delete"


CATALOG_SCOPE = "registry:catalog:*"


@dataclass(frozen=True)
class ClientOptions:
    """How to reach one registry.

    `base_url` replaces `https://<api host>` (a mirror, or a test registry); `plain_http`
    defaults to True for loopback hosts. Credentials come from `credentials()`.
    """

    base_url: str | None = None
    plain_http: bool | None = None
    transport: TransportOptions = TransportOptions()
    page_size: int | None = None


CREDENTIALS_HINT = "give --username with --password-stdin, or log in with `docker login`"


class RegistryClient:
    """One registry's distribution API. Thread-safe."""

    def __init__(
        self,
        registry: Registry,
        options: ClientOptions = ClientOptions(),
        credentials: CredentialLookup = lambda: None,
    ) -> None:
        self.registry = registry
        # Like Docker: HTTPS unless told otherwise; a loopback registry that does not speak TLS
        # is talked to over plain HTTP (decided at the first request, see _settle_scheme).
        if options.base_url:
            self.base_url = options.base_url.rstrip("/")
        else:
            self.base_url = f"{'http' if options.plain_http else 'https'}://{registry.api_host}"
        self._scheme_settled = bool(options.base_url) or options.plain_http is not None \
            or not registry.is_loopback
        self._scheme_mutex = threading.Lock()
        self._open_to_anyone = False  # the scheme probe already got a 200 from /v2/
        scheme_host = urlsplit(self.base_url)
        self.auth = Authenticator(
            credentials,
            plain_http_host=scheme_host.hostname if scheme_host.scheme == "http" else None,
        )
        self._credentials = credentials
        self.transport = Transport(options.transport, self.auth)
        self.page_size = options.page_size

    # ---- helpers -------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        self._settle_scheme()
        return f"{self.base_url}/v2/{path}"

    def _settle_scheme(self) -> None:
        """For a loopback registry: HTTPS if it speaks TLS, else plain HTTP. A certificate it
        presents must be trusted (--ca-file, --insecure): that is an error, not a fallback."""
        if self._scheme_settled:
            return
        left = deadline.remaining()
        if not self._scheme_mutex.acquire(timeout=-1 if left is None else max(0.0, left)):
            raise RequestTimeout(f"{self.registry}: timed out waiting to learn whether it speaks TLS")
        try:
            if self._scheme_settled:
                return
            try:
                probe = self.transport.request("GET", f"{self.base_url}/v2/", retry=False, authenticate=False)
                probe.close()
                self._open_to_anyone = probe.status_code == 200
            except TLSError as exc:
                if exc.certificate:
                    raise
                self.base_url = "http://" + self.base_url[len("https://"):]
                self.auth.allow_plain_http(urlsplit(self.base_url).hostname)
                log.debug("%s speaks no TLS: plain HTTP", self.registry)
            self._scheme_settled = True
        finally:
            self._scheme_mutex.release()

    def _request(self, method: str, url: str, scopes: list[str], **kwargs: Any) -> requests.Response:
        return self.transport.request(method, url, scopes=scopes, **kwargs)

    # ---- discovery -------------------------------------------------------------------------

    def ping(self) -> None:
        """Check that the registry speaks the distribution API and accepts our credentials,
        or, without credentials, lets anonymous clients in."""
        url = self._url("")  # a loopback registry's scheme is settled by a GET of /v2/ too
        if self._open_to_anyone:
            return
        try:
            response = self._request("GET", url, [])
        except AuthError as exc:
            if self._credentials() is None:  # the token server refused an anonymous token
                raise AuthError(f"{self.registry} requires credentials ({exc}): {CREDENTIALS_HINT}") from None
            raise
        if response.status_code == 200:
            response.close()
            return
        if response.status_code == 401:
            if self._credentials() is not None:
                raise AuthError(f"{self.registry}: credentials refused")
            if "basic" in response.headers.get("WWW-Authenticate", "").lower():
                raise AuthError(f"{self.registry} requires credentials: {CREDENTIALS_HINT}")
            return  # anonymous: the registry wants tokens per repository
        if response.status_code == 404:
            raise RegistryError(f"{self.base_url} does not serve the OCI distribution API (/v2/)")
        check(response, f"{self.registry}")

    def catalog(self) -> Iterator[str]:
        """Every repository name the catalog lists, across all its pages."""
        query = {"n": str(self.page_size)} if self.page_size else {}
        url = self._url("_catalog") + (f"?{urlencode(query)}" if query else "")
        try:
            yield from self._paged(url, "repositories", [CATALOG_SCOPE], "catalog")
        except RegistryError as exc:
            # distribution refuses an `n` above its maximum; without `n` it pages by itself.
            if query and exc.code == "PAGINATION_NUMBER_INVALID":
                yield from self._paged(self._url("_catalog"), "repositories", [CATALOG_SCOPE], "catalog")
            else:
                raise

    def tags(self, repository: str) -> Iterator[str]:
        """Every tag of `repository`, across all pages, in the registry's order."""
        check_repository(repository)
        url = self._url(f"{repository}/tags/list")
        if self.page_size:
            url += f"?n={self.page_size}"
        yield from self._paged(url, "tags", [pull_scope(repository)], f"tags of {repository}")

    def _paged(self, url: str, key: str, scopes: list[str], what: str) -> Iterator[str]:
        """A catalog or tag list: names under `key`, next pages from `Link` headers."""

        def page(page_url: str) -> Page:
            response = check(self._request("GET", page_url, scopes), what)
            items = json_object(response, what).get(key) or []
            if not isinstance(items, list):
                raise RegistryError(f"{what}: '{key}' is not a list")
            return [item for item in items if isinstance(item, str)], _next_link(response, page_url)

        return follow_pages(url, page, what)

    # ---- manifests --------------------------------------------------------------------------

    def resolve(self, repository: str, reference: str) -> Descriptor:
        """Tag or digest -> descriptor of the manifest, with HEAD (not counted as a pull)."""
        check_repository(repository)
        check_reference(reference)
        url = self._url(f"{repository}/manifests/{reference}")
        response = check(
            self._request("HEAD", url, [pull_scope(repository)], headers=_accept()),
            f"manifest {repository}:{reference}",
        )
        header = response.headers.get("Docker-Content-Digest")
        media_type = base_media_type(response.headers.get("Content-Type"))
        size = response.headers.get("Content-Length")
        if not header or not media_type or size is None or not size.isdigit():
            # Without a digest header the only way to know is to hash the body.
            manifest = self.get_manifest(repository, reference)
            return Descriptor(manifest.media_type, manifest.digest, len(manifest.raw))
        try:
            digest = Digest.parse(header)
        except InvalidReference:
            raise RegistryError(f"manifest {repository}:{reference}: invalid Docker-Content-Digest") from None
        if ":" in reference and str(digest) != reference:
            raise IntegrityError(f"manifest {repository}@{reference}: registry answered {digest}")
        return Descriptor(media_type, digest, int(size))

    def get_manifest(self, repository: str, reference: str) -> Manifest | Index:
        """The manifest or index, parsed from the exact bytes served; fetched by digest, checked
        against it; fetched by tag, its digest is computed from the bytes."""
        check_repository(repository)
        check_reference(reference)
        what = f"manifest {repository}{'@' if ':' in reference else ':'}{reference}"
        url = self._url(f"{repository}/manifests/{reference}")
        response = check(
            self._request("GET", url, [pull_scope(repository)], headers=_accept(), stream=True), what
        )
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > MAX_MANIFEST_SIZE:
            response.close()
            raise ManifestTooLarge(f"{what}: {length} bytes is above the limit of {MAX_MANIFEST_SIZE}")
        try:
            raw = read_body(response, MAX_MANIFEST_SIZE)
        except _TooLarge:
            raise ManifestTooLarge(f"{what}: above the limit of {MAX_MANIFEST_SIZE} bytes") from None
        # By digest, the bytes must be that digest. By tag, the bytes are what counts: some
        # registries send a wrong Docker-Content-Digest for tags (kaniko#298).
        expected = Digest.parse(reference) if ":" in reference else None
        try:
            return parse_manifest(raw, content_type=response.headers.get("Content-Type"), digest=expected)
        except IntegrityError as exc:
            raise IntegrityError(f"{what}: {exc}") from None

    def put_manifest(
        self, repository: str, reference: str, raw: bytes, media_type: str
    ) -> Digest:
        """PUT a manifest by tag or digest; its blobs must already be there."""
        return self._put_manifest(repository, reference, raw, media_type)[0]

    def put_referrer(self, repository: str, raw: bytes, media_type: str) -> tuple[Digest, bool]:
        """PUT a manifest that has a `subject`, by digest. Also says whether the registry
        took note of the subject (`OCI-Subject` in its answer: it has the referrers API);
        when it did not, the caller updates the tag-schema fallback index."""
        digest = Digest.of(raw)
        return self._put_manifest(repository, str(digest), raw, media_type)

    def _put_manifest(
        self, repository: str, reference: str, raw: bytes, media_type: str
    ) -> tuple[Digest, bool]:
        check_repository(repository)
        check_reference(reference)
        if len(raw) > MAX_MANIFEST_SIZE:
            raise ManifestTooLarge(f"manifest of {len(raw)} bytes is above the limit of {MAX_MANIFEST_SIZE}")
        digest = Digest.of(raw)
        if ":" in reference and reference != str(digest):
            raise IntegrityError(f"manifest bytes do not match {reference}")
        url = self._url(f"{repository}/manifests/{reference}")
        response = check(
            self._request("PUT", url, [push_scope(repository)],
                          headers={"Content-Type": media_type}, body=raw),
            f"push manifest {repository}:{reference}",
            ok=(200, 201, 202),
        )
        subject_noted = bool(response.headers.get("OCI-Subject"))
        _check_digest_header(response, digest, f"manifest {repository}:{reference}")
        return digest, subject_noted

    # ---- referrers ---------------------------------------------------------------------------

    def referrers(self, repository: str, digest: Digest, artifact_type: str | None = None
                  ) -> tuple[Descriptor, ...]:
        """The manifests whose `subject` is `digest` (OCI 1.1): from the referrers API, or,
        where the registry has none (a 404 that is not NAME_UNKNOWN), from the tag-schema
        fallback index `<alg>-<hex>` (none when that tag does not exist). `artifact_type`
        filters (the registry may filter; the answer is filtered here again). An answer that
        is not an image index, too big, or with an invalid entry raises ManifestError."""
        check_repository(repository)
        what = f"referrers of {repository}@{digest}"
        url = self._url(f"{repository}/referrers/{digest}")
        if artifact_type:
            url += "?" + urlencode({"artifactType": artifact_type})
        found: list[Descriptor] = []
        seen: set[str] = set()
        for number in range(MAX_REFERRER_PAGES):
            seen.add(url)
            response = self._request("GET", url, [pull_scope(repository)],
                                     headers={"Accept": OCI_INDEX}, stream=True)
            if response.status_code == 404 and number == 0:
                try:
                    check(response, what)
                except NotFound as exc:
                    if any(detail.code == "NAME_UNKNOWN" for detail in exc.details):
                        raise
                log.debug("%s: no referrers API; using the tag-schema fallback", what)
                found = list(self._fallback_referrers(repository, digest))
                break
            check(response, what)
            found.extend(parse_referrers(self._read_manifest_body(response, what),
                                         content_type=response.headers.get("Content-Type")))
            next_url = _next_link(response, url)
            if not next_url or urlsplit(next_url)[:2] != urlsplit(url)[:2] or next_url in seen:
                break
            url = next_url
        else:
            log.warning("%s: stopped after %d pages", what, MAX_REFERRER_PAGES)
        if artifact_type:
            found = [entry for entry in found if entry.artifact_type == artifact_type]
        return tuple(found)

    def _fallback_referrers(self, repository: str, digest: Digest) -> tuple[Descriptor, ...]:
        index = self.fallback_index(repository, digest)
        return index.manifests if index is not None else ()

    def fallback_index(self, repository: str, digest: Digest) -> Index | None:
        """The tag-schema fallback index of `digest` (tag `<alg>-<hex>`), None when there is
        none; ManifestError when that tag is not an index."""
        tag = fallback_tag(digest)
        try:
            found = self.get_manifest(repository, tag)
        except NotFound:
            return None
        if not isinstance(found, Index):
            raise ManifestError(f"referrers of {repository}@{digest}: tag {tag} is not an image index")
        return found

    def _read_manifest_body(self, response: requests.Response, what: str) -> bytes:
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > MAX_MANIFEST_SIZE:
            response.close()
            raise ManifestTooLarge(f"{what}: {length} bytes is above the limit of {MAX_MANIFEST_SIZE}")
        try:
            return read_body(response, MAX_MANIFEST_SIZE)
        except _TooLarge:
            raise ManifestTooLarge(f"{what}: above the limit of {MAX_MANIFEST_SIZE} bytes") from None

    def delete_manifest(self, repository: str, reference: str) -> None:
        """Delete by digest (removes every tag on it) or by tag where the registry allows."""
        check_repository(repository)
        check_reference(reference)
        url = self._url(f"{repository}/manifests/{reference}")
        check(self._request("DELETE", url, [delete_scope(repository)]),
              f"delete manifest {repository}:{reference}", ok=(200, 202, 204))

    # ---- blobs -------------------------------------------------------------------------------

    def blob_size(self, repository: str, digest: Digest) -> int | None:
        """The blob's size if the repository has it, else None."""
        check_repository(repository)
        url = self._url(f"{repository}/blobs/{digest}")
        response = self._request("HEAD", url, [pull_scope(repository)])
        if response.status_code == 404:
            return None
        check(response, f"blob {repository}@{digest}")
        length = response.headers.get("Content-Length", "")
        return int(length) if length.isdigit() else 0

    def fetch_blob(self, repository: str, digest: Digest, size: int | None = None) -> Iterator[bytes]:
        """The whole blob as chunks; its digest (and size, if given) is checked before the
        last chunk is handed over."""
        return verified_chunks(self.fetch_blob_range(repository, digest, 0, None), digest, size)

    def fetch_blob_range(
        self, repository: str, digest: Digest, offset: int, length: int | None
    ) -> Iterator[bytes]:
        """Bytes [offset, offset+length) of a blob (to the end when length is None).

        Range is only a SHOULD: a 200 is read from the start and the head skipped, a 206
        must start at or before `offset` (by `Content-Range`), and a body that ends early
        raises RangeError. Nothing beyond the range is yielded.
        """
        check_repository(repository)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("negative range")
        if length == 0:
            return iter(())
        url = self._url(f"{repository}/blobs/{digest}")
        headers: dict[str, str] = {}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            headers["Range"] = f"bytes={offset}-{end}"
        what = f"blob {repository}@{digest}"
        response = self._request("GET", url, [pull_scope(repository)], headers=headers, stream=True)
        if response.status_code == 416:
            response.close()
            raise RangeError(f"{what}: range {offset}+{length} not satisfiable", status=416)
        check(response, what, ok=(200, 206))
        start = 0
        if response.status_code == 206:
            match = _CONTENT_RANGE_RE.match(response.headers.get("Content-Range", "").strip())
            if match is None:
                response.close()
                raise RangeError(f"{what}: 206 without a valid Content-Range", status=206)
            start = int(match.group(1))
            if start > offset or int(match.group(2)) < start:
                response.close()
                raise RangeError(
                    f"{what}: asked for bytes from {offset}, got {match.group(0)}", status=206
                )
        elif headers:
            log.debug("%s: the registry ignored Range; skipping %d bytes", what, offset)
        return _slice(iter_body(response), offset - start, length, what)

    def _post_upload(self, repository: str, query: dict[str, str], scopes: list[str]) -> requests.Response:
        url = self._url(f"{repository}/blobs/uploads/")
        if query:
            url += "?" + urlencode(query)
        return self._request("POST", url, scopes)

    def _upload_location(self, response: requests.Response, repository: str) -> str:
        location = response.headers.get("Location")
        if not location:
            raise RegistryError(f"upload to {repository}: the registry sent no Location")
        # Absolute or relative; it may carry state in its query: never rebuild it.
        return urljoin(response.url, location)

    def start_upload(self, repository: str) -> str:
        """Open an upload session; returns its location."""
        return self.open_upload(repository).location

    def open_upload(self, repository: str) -> UploadSession:
        """Open an upload session (POST) for a caller that sends the blob piece by piece as
        it has it (`UploadSession`)."""
        check_repository(repository)
        response = check(self._post_upload(repository, {}, [push_scope(repository)]),
                         f"start upload to {repository}", ok=(202,))
        minimum = response.headers.get("OCI-Chunk-Min-Length", "")
        location = self._upload_location(response, repository)
        response.close()
        return UploadSession(self, repository, location, int(minimum) if minimum.isdigit() else 0)

    def mount_blob(self, repository: str, digest: Digest, from_repository: str) -> bool:
        """Cross-repository mount. True when mounted; False when the registry would rather
        have the blob uploaded (its upload session is cancelled)."""
        check_repository(repository)
        check_repository(from_repository)
        response = self._post_upload(
            repository,
            {"mount": str(digest), "from": from_repository},
            [push_scope(repository), pull_scope(from_repository)],
        )
        if response.status_code == 201:
            response.close()
            return True
        check(response, f"mount {digest} from {from_repository} into {repository}", ok=(202,))
        self.cancel_upload(self._upload_location(response, repository), repository)
        return False

    def cancel_upload(self, location: str, repository: str) -> None:
        try:
            response = self._request("DELETE", location, [push_scope(repository)])
            response.close()
        except (NetworkError, RegistryError) as exc:
            log.debug("cancelling upload to %s failed: %s", repository, exc)

    def upload_monolithic(self, repository: str, data: bytes | IO[bytes], digest: Digest) -> None:
        """POST for a session, then one PUT with the whole blob."""
        location = self.start_upload(repository)
        try:
            self._finish_upload(location, repository, digest, data)
        except BaseException:
            self.cancel_upload(location, repository)
            raise

    def upload_single_post(self, repository: str, data: bytes, digest: Digest) -> None:
        """One POST with `?digest=` and the body; falls back to PUT if the server opens a session."""
        check_repository(repository)
        url = self._url(f"{repository}/blobs/uploads/") + "?" + urlencode({"digest": str(digest)})
        response = self._request(
            "POST", url, [push_scope(repository)],
            headers={"Content-Type": "application/octet-stream"}, body=data,
        )
        if response.status_code == 201:
            _check_digest_header(response, digest, f"blob {digest}")
            return
        check(response, f"upload {digest} to {repository}", ok=(202,))
        self._finish_upload(self._upload_location(response, repository), repository, digest, data)

    def upload_chunked(
        self, repository: str, file: IO[bytes], digest: Digest, size: int, chunk_size: int = CHUNK_SIZE
    ) -> None:
        """PATCH the file in chunks, tracking the offset ourselves, then PUT the digest.

        When the server disagrees (416, a Range that is not ours, a dropped connection), its
        upload status is asked and the upload resumes from where the server is.
        """
        session = self.open_upload(repository)
        chunk_size = max(chunk_size, session.min_chunk_length)
        recoveries = 0
        try:
            while session.offset < size:
                count = min(chunk_size, size - session.offset)
                file.seek(session.offset)
                chunk = file.read(count)
                if len(chunk) != count:
                    raise IntegrityError(f"upload of {digest}: the file changed while uploading")
                try:
                    session.append(chunk)
                    continue
                except (UploadOutOfStep, NetworkError, ServerError) as exc:
                    log.warning("upload to %s: %s; asking the server where it is", repository, exc)
                recoveries += 1
                if recoveries > MAX_UPLOAD_RECOVERIES:
                    raise RegistryError(f"upload of {digest} to {repository}: the server keeps losing chunks")
                session.resync()
            session.finish(digest)
        except BaseException:
            session.cancel()
            raise

    def _finish_upload(
        self, location: str, repository: str, digest: Digest, data: bytes | IO[bytes] | None
    ) -> None:
        separator = "&" if urlsplit(location).query else "?"
        url = f"{location}{separator}digest={quote(str(digest), safe=':')}"
        headers = {"Content-Type": "application/octet-stream"}
        if data is None:
            headers["Content-Length"] = "0"
        response = self._request("PUT", url, [push_scope(repository)], headers=headers,
                                 body=data if data is not None else b"")
        check(response, f"upload {digest} to {repository}", ok=(201, 204))
        _check_digest_header(response, digest, f"blob {digest}")

    def push_blob(
        self,
        repository: str,
        file: IO[bytes],
        digest: Digest,
        size: int,
        *,
        mount_from: str | None = None,
    ) -> None:
        """Make the blob exist in `repository` the cheapest way: already there, mounted from
        another repository, one PUT when small, chunks when big."""
        if self.blob_size(repository, digest) is not None:
            return
        if mount_from and mount_from != repository and self.mount_blob(repository, digest, mount_from):
            return
        if size <= MONOLITHIC_LIMIT:
            file.seek(0)
            self.upload_monolithic(repository, file.read(), digest)
        else:
            self.upload_chunked(repository, file, digest, size)

    def delete_blob(self, repository: str, digest: Digest) -> None:
        check_repository(repository)
        url = self._url(f"{repository}/blobs/{digest}")
        check(self._request("DELETE", url, [delete_scope(repository)]),
              f"delete blob {repository}@{digest}", ok=(200, 202, 204))


class UploadOutOfStep(RegistryError):
    """The registry holds other bytes of an upload than we sent (416, or its `Range` is not
    ours): `UploadSession.resync()` says where it is."""


class UploadSession:
    """One blob upload in progress (distribution-spec "chunked upload"): PATCHes in order,
    each at the offset the registry holds, then the PUT that names the digest. The registry
    checks the digest against everything it received, so a session whose bytes went wrong is
    never committed. One sender at a time; open one with `RegistryClient.open_upload`.
    """

    def __init__(self, client: RegistryClient, repository: str, location: str, min_chunk_length: int) -> None:
        self._client = client
        self.repository = repository
        self.location = location  # changes with every answer; never rebuilt from parts
        self.min_chunk_length = min_chunk_length  # OCI-Chunk-Min-Length: every PATCH but the last
        self.offset = 0  # bytes the registry holds, as far as we know
        self._confirmed = 0  # the offset after the last PATCH the registry accepted
        self._scopes = [push_scope(repository)]

    def append(self, data: bytes) -> None:
        """PATCH `data` at `offset`. UploadOutOfStep when the registry holds something else
        afterwards; NetworkError or ServerError when the exchange failed (the registry may or
        may not hold the piece: `resync()`); other errors as `check()` raises them."""
        if not data:
            return
        end = self.offset + len(data)
        headers = {"Content-Type": "application/octet-stream", "Content-Range": f"{self.offset}-{end - 1}"}
        # Not retried here: a PATCH that half-arrived must not be sent again at the same offset.
        response = self._client._request("PATCH", self.location, self._scopes, headers=headers,
                                         body=data, retry=False)
        if response.status_code == 416:
            response.close()
            raise UploadOutOfStep(f"upload to {self.repository}: the registry refused bytes from {self.offset}",
                                  status=416)
        check(response, f"upload to {self.repository}", ok=(202,))
        self.location = self._client._upload_location(response, self.repository)
        response.close()
        self.offset = self._confirmed = end
        server_end = _range_end(response.headers.get("Range"))
        if server_end is not None and server_end != end - 1:
            raise UploadOutOfStep(f"upload to {self.repository}: the registry is at {server_end + 1}, "
                                  f"we are at {end}", status=202)

    def resync(self) -> None:
        """Ask the registry how much it holds, and go on from there."""
        response = check(self._client._request("GET", self.location, self._scopes),
                         f"upload status for {self.repository}", ok=(204,))
        server_end = _range_end(response.headers.get("Range"))
        self.location = urljoin(response.url, response.headers.get("Location") or self.location)
        response.close()
        # `Range: 0-0` means either no bytes or one byte: with nothing confirmed yet, no bytes.
        if server_end is None or (server_end == 0 and self._confirmed == 0):
            self.offset = 0
        else:
            self.offset = server_end + 1

    def finish(self, digest: Digest, tail: bytes = b"") -> None:
        """Send `tail` (the last bytes, may be empty) with the PUT that commits the blob as
        `digest`; the registry refuses it (DIGEST_INVALID) unless every byte it holds hashes
        to `digest`."""
        self._client._finish_upload(self.location, self.repository, digest, tail or None)
        self.offset += len(tail)

    def cancel(self) -> None:
        """Drop the session (best effort: a registry purges abandoned uploads anyway)."""
        self._client.cancel_upload(self.location, self.repository)


def _accept() -> dict[str, str]:
    return {"Accept": ", ".join(MANIFEST_ACCEPT)}


def _next_link(response: requests.Response, url: str) -> str | None:
    header = response.headers.get("Link")
    if not header:
        return None
    match = _LINK_NEXT_RE.search(header)
    return urljoin(url, match.group(1)) if match else None


def _range_end(header: str | None) -> int | None:
    """`Range: 0-<end>` of an upload status (inclusive end; `0-0` may also mean empty)."""
    if not header:
        return None
    match = _RANGE_RE.match(header.strip())
    return int(match.group(2)) if match else None


def _check_digest_header(response: requests.Response, digest: Digest, what: str) -> None:
    header = response.headers.get("Docker-Content-Digest")
    response.close()
    if header and header != str(digest):
        raise IntegrityError(f"{what}: the registry stored {header}")


def _slice(chunks: Iterator[bytes], skip: int, length: int | None, what: str) -> Iterator[bytes]:
    remaining = length
    try:
        for chunk in chunks:
            if skip:
                if len(chunk) <= skip:
                    skip -= len(chunk)
                    continue
                chunk = chunk[skip:]
                skip = 0
            if remaining is not None:
                if len(chunk) >= remaining:
                    yield chunk[:remaining]
                    return
                remaining -= len(chunk)
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    if skip or (remaining is not None and remaining > 0):
        raise RangeError(f"{what}: the body ended early")
