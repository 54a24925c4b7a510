"""Registry metadata, one object that the tree and the writer share: tag lists, catalogs and
tag -> digest (TTL caches with stale answers when the registry cannot be reached, kept on
disk for `--offline`), manifests by digest (immutable: kept for good), small blobs.

No lock is held over network I/O.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from cachetools import LRUCache, TLRUCache, TTLCache

from . import deadline
from .digest import Digest
from .errors import (
    Denied,
    IntegrityError,
    ListingTruncated,
    NetworkError,
    NotFound,
    OcifsError,
    RegistryError,
    Unauthorized,
    Unsupported,
)
from .model import Descriptor, Index, Manifest, parse_manifest
from .reference import Source, is_valid_repository, is_valid_tag
from .registry.client import RegistryClient
from .registry.hub import HubClient
from .store import BlobStore
from .store.refs import RefStore

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long an answer that something does not exist, or a listing cut at its budget, is
# trusted (seconds).
NEGATIVE_TTL = 2.0
# Manifest requests a walk (`ls -l`, `find`, `ls -R`) keeps in flight: the one the walker
# itself waits for and WARM_CONCURRENCY - 1 fetched ahead of it, in the background.
WARM_CONCURRENCY = 8
WARM_LIMIT = 1000
# Tag lists fetched at once ahead of a walk through a namespace; and of each repository
# fetched so, the manifests of its first PREFETCH_TAGS tags (the walker warms the rest when
# it gets there): what a walk that stops early leaves fetched for nothing stays small.
LIST_CONCURRENCY = 4
PREFETCH_TAGS = 32
# Writes to the disk cache that may wait for the keeper thread; beyond, the fetching thread
# writes itself (the backlog holds manifests in memory, and unmounting drains it).
KEEP_BACKLOG = 1024
# How long a lookup by name may wait for a listing (a catalog may be huge or endless).
LOOKUP_LISTING_BUDGET = 2.0


@dataclass(frozen=True)
class Persist:
    """How a cache keeps its answers on disk for offline use: kind, and (de)serialisers."""

    refs: RefStore
    kind: str
    dump: Callable[[Any], Any]
    load: Callable[[Any], Any]


class SingleFlight:
    """One load per key at a time: whoever asks while a load runs waits for its answer
    (until its own deadline) instead of sending the same request again."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._flights: dict[Any, _Flight] = {}

    def run(self, key: Any, load: Callable[[], T]) -> T:
        with self._mutex:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            deadline.wait(flight.done, f"waiting for {key}")
            if flight.error is not None:
                raise flight.error
            return flight.value  # type: ignore[no-any-return]
        try:
            flight.value = load()
            return flight.value  # type: ignore[no-any-return]
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._mutex:
                del self._flights[key]
            flight.done.set()


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class _Cache:
    """A TTL cache with stale fallback: when loading fails because the registry cannot be
    reached, the last value ever loaded is served (and the failure logged): from memory, or
    from disk when `persist` is given (so `--offline` works after a restart)."""

    def __init__(self, ttl: float, maxsize: int = 4096, persist: Persist | None = None, *,
                 negative: Callable[[Any], bool] | None = None) -> None:
        # A value `negative` says is an absence ("no such repository") is kept only briefly:
        # whatever another client creates is reachable by name at once.
        def expires(_key: Any, value: Any, now: float) -> float:
            return now + (min(ttl, NEGATIVE_TTL) if negative is not None and negative(value) else ttl)

        self._fresh: TLRUCache[Any, Any] | None = TLRUCache(maxsize=maxsize, ttu=expires) if ttl > 0 else None
        self._stale: LRUCache[Any, Any] = LRUCache(maxsize=maxsize)
        self._persist = persist
        self._mutex = threading.Lock()
        self._flights = SingleFlight()

    def remember(self, key: Any, merge: Callable[[Any], Any]) -> None:
        """Fold something learnt another way into the last answer kept for `key` (served only
        when the registry cannot be reached; the fresh answer is left alone)."""
        with self._mutex:
            current = self._stale.get(key, _MISSING)
        if current is _MISSING and self._persist is not None:
            saved = self._persist.refs.load(self._persist.kind, repr(key))
            current = _MISSING if saved is None else self._persist.load(saved)
        value = merge(None if current is _MISSING else current)
        if value is current:
            return
        with self._mutex:
            self._stale[key] = value
        if self._persist is not None:
            self._persist.refs.save(self._persist.kind, repr(key), self._persist.dump(value))

    def peek(self, key: Any) -> Any:
        """The fresh answer for `key`, or _MISSING; nothing is loaded."""
        with self._mutex:
            if self._fresh is not None and key in self._fresh:
                return self._fresh[key]
        return _MISSING

    def known(self, key: Any) -> bool:
        """Whether this mount has seen an answer for `key` (fresh or not)."""
        with self._mutex:
            return key in self._stale

    def get(self, key: Any, load: Callable[[], T]) -> T:
        with self._mutex:
            if self._fresh is not None and key in self._fresh:
                return self._fresh[key]  # type: ignore[no-any-return]
        return self._flights.run(key, lambda: self._load(key, load))

    def _load(self, key: Any, load: Callable[[], T]) -> T:
        with self._mutex:  # a concurrent load may have finished meanwhile
            if self._fresh is not None and key in self._fresh:
                return self._fresh[key]  # type: ignore[no-any-return]
        try:
            value = load()
        except NetworkError as exc:
            with self._mutex:
                if key in self._stale:
                    log.warning("registry unreachable (%s); serving cached %s", exc, key)
                    return self._stale[key]  # type: ignore[no-any-return]
            saved = self._persist.refs.load(self._persist.kind, repr(key)) if self._persist else None
            if saved is None:
                raise
            log.warning("registry unreachable (%s); serving %s as last seen", exc, key)
            value = self._persist.load(saved)  # type: ignore[union-attr]
            with self._mutex:
                self._stale[key] = value
            return value
        with self._mutex:
            if self._fresh is not None:
                self._fresh[key] = value
            changed = self._stale.get(key, _MISSING) != value
            self._stale[key] = value
        if self._persist is not None and changed:
            self._persist.refs.save(self._persist.kind, repr(key), self._persist.dump(value))
        return value

    def invalidate(self, key: Any) -> None:
        with self._mutex:
            if self._fresh is not None:
                self._fresh.pop(key, None)

    def put(self, key: Any, value: Any, *, save: bool = True) -> None:
        """What this mount just wrote (or fetched) is the freshest answer there is; kept on
        disk too, unless `save` is False (then the caller calls `save` when it is time)."""
        with self._mutex:
            if self._fresh is not None:
                self._fresh[key] = value
            self._stale[key] = value
        if save:
            self.save(key, value)

    def save(self, key: Any, value: Any) -> None:
        """Keep `value` on disk as the last answer for `key` (for `--offline`)."""
        if self._persist is not None:
            self._persist.refs.save(self._persist.kind, repr(key), self._persist.dump(value))


# "No answer kept" in the caches (None is an answer: a catalog or tag list the registry will
# not give us).
_MISSING = object()


def _names_to_json(value: Any) -> Any:
    return None if value is None else sorted(value)


def _names_from_json(value: Any) -> Any:
    return None if value is None else set(value)


class _Truncated(set[str]):
    """A tag list cut at its budget: what was found (kept only briefly)."""


@dataclass(frozen=True)
class Listing:
    """The next path components under each registry path, as a catalog (or the Hub API)
    listed them; `complete` is False when the listing stopped at its budget."""

    children: dict[str, set[str]]
    complete: bool = True
    # The repositories themselves (a path can be a namespace, a repository, or both); None
    # where the listing does not say.
    repositories: frozenset[str] | None = None


def _catalog_to_json(value: Listing | None) -> Any:
    if value is None:
        return None
    saved: dict[str, Any] = {"complete": value.complete,
                             "children": {k: sorted(v) for k, v in value.children.items()}}
    if value.repositories is not None:
        saved["repositories"] = sorted(value.repositories)
    return saved


def _catalog_from_json(value: Any) -> Listing | None:
    if value is None:
        return None
    if "children" not in value:  # written by an older ocifs: the children alone
        return Listing({k: set(v) for k, v in value.items()})
    repositories = value.get("repositories")
    return Listing({k: set(v) for k, v in value["children"].items()}, bool(value.get("complete")),
                   None if repositories is None else frozenset(repositories))


def _descriptor_to_json(value: Descriptor) -> Any:
    return {"mediaType": value.media_type, "digest": str(value.digest), "size": value.size}


def _descriptor_from_json(value: Any) -> Descriptor:
    return Descriptor(value["mediaType"], Digest.parse(value["digest"]), int(value["size"]))




class Metadata:
    """What the registry says about tags, repositories and manifests, cached."""

    def __init__(
        self,
        source: Source,
        client: RegistryClient,
        store: BlobStore,
        *,
        hub: HubClient | None = None,
        ttl: float = 60.0,
        timeout: float = 30.0,
    ) -> None:
        self.source = source
        self.client = client
        self.store = store
        self.hub = hub
        self.ttl = ttl
        self.timeout = timeout  # the deadline of background work (listings, prefetches)
        # Keyed by where the registry is, not by scheme: a loopback registry's scheme is only
        # known once it answered, and an offline mount must find what an online one kept.
        refs = RefStore(store.root, client.base_url.split("://", 1)[-1])
        self._refs = refs
        self._catalog = _Cache(ttl, 4, Persist(refs, "catalog", _catalog_to_json, _catalog_from_json),
                               negative=lambda listing: listing is not None and not listing.complete)
        self._tags = _Cache(ttl, 4096, Persist(refs, "tags", _names_to_json, _names_from_json),
                            negative=lambda tags: tags == set() or isinstance(tags, _Truncated))
        self._repositories = _Cache(ttl, 4096, negative=lambda found: not found)
        self._missing_tags: TTLCache[tuple[str, str], bool] = TTLCache(maxsize=4096, ttl=min(ttl, NEGATIVE_TTL) or 1e-9)
        self._resolved = _Cache(ttl, 65536, Persist(refs, "tag", _descriptor_to_json, _descriptor_from_json))
        self._hub_repos = _Cache(ttl, 4096, Persist(refs, "hub-listing", _catalog_to_json, _catalog_from_json),
                                 negative=lambda listing: listing is not None and not listing.complete)
        self._manifests: LRUCache[Digest, Manifest | Index] = LRUCache(maxsize=4096)
        self._referrers = _Cache(ttl, 1024)  # (repository, digest) -> referrer descriptors
        self._mutex = threading.Lock()  # guards _manifests; never held over I/O
        self._manifest_flights = SingleFlight()
        self._tag_flights = SingleFlight()
        # Background work, started on first use (after the fork). One pool per kind of work,
        # so that none waits behind another: listings a lookup waits for, tag lists fetched
        # ahead of a walk, manifests fetched ahead of a walk (a stalled manifest GET must not
        # hold up a catalog or another repository's tag list).
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._closed = False
        self._background: dict[Any, Future[Any]] = {}
        self._keeping: deque[Future[None]] = deque()  # the keeper's backlog, oldest first
        # repository -> how many of its tags were handed to the manifest pool (per TTL)
        self._warmed: TTLCache[str, int] = TTLCache(maxsize=4096, ttl=max(ttl, 1e-9))
        self._prefetched: TTLCache[str, bool] = TTLCache(maxsize=4096, ttl=max(ttl, 1e-9))

    def has_offline_answers(self) -> bool:
        """Whether the cache holds any answer of this registry to mount offline with."""
        return not self._refs.is_empty()

    def may_have_tags(self, prefix: str) -> bool:
        """Whether `prefix` can be a repository (on Docker Hub a one-component path is a
        namespace, never a repository)."""
        if not prefix or not is_valid_repository(prefix):
            return False
        return not (self.source.registry.is_docker_hub and "/" not in prefix)

    def is_repository(self, prefix: str) -> bool:
        """Whether `prefix` is a repository with tags (or one whose tags cannot be listed):
        from the tag list when it is at hand, else from the first page of it alone."""
        if not self.may_have_tags(prefix):
            return False
        tags = self._tags.peek(prefix)
        if tags is not _MISSING:
            return tags is None or bool(tags)
        return self._repositories.get(prefix, partial(self._has_a_tag, prefix))

    def _has_a_tag(self, repository: str) -> bool:
        try:
            return next(iter(self.client.tags(repository)), None) is not None
        except NotFound:
            return False
        except (Unauthorized, Denied, Unsupported):
            return True  # tags we may not list can still be resolved one by one

    def cached_tags(self, repository: str) -> set[str] | None:
        """The tag list if this mount has a fresh one, else None (nothing is fetched)."""
        tags = self._tags.peek(repository)
        return tags if isinstance(tags, set) else None

    def tags(self, repository: str) -> set[str] | None:
        """The repository's tags (TTL-cached); empty when it is not a repository;
        None when the registry will not list them. A list cut at its budget holds what was
        found and is kept only briefly."""

        def load() -> set[str] | None:
            found: set[str] = set()
            try:
                for tag in self.client.tags(repository):
                    if is_valid_tag(tag):
                        found.add(tag)
            except NotFound:
                return set()
            except (Unauthorized, Denied, Unsupported) as exc:
                log.info("cannot list tags of %s: %s", repository, exc)
                return None
            except ListingTruncated as exc:
                log.warning("%s; listing the %d tags found", exc, len(found))
                return _Truncated(found)
            return found

        return self._tags.get(repository, load)

    def listed_children(self, prefix: str) -> set[str] | None:
        """The next path components under `prefix`, from the catalog or the Hub API (as far
        as the listing got within its budget); None where nothing lists this level."""
        listing = self._listing(prefix)
        return None if listing is None else listing.children.get(prefix, set())

    def lists(self, prefix: str, name: str) -> bool | None:
        """Whether a listing shows `name` under `prefix`: True or False where that is known,
        None where nothing lists this level or the listing stopped before it could say. A
        lookup by name waits for a listing only briefly (LOOKUP_LISTING_BUDGET)."""
        listing = self._listing_soon(prefix)
        if listing is None:
            return None
        if name in listing.children.get(prefix, set()):
            return True
        return False if listing.complete else None

    def _listing_soon(self, prefix: str) -> Listing | None:
        """The listing if it is at hand; else one loads in the background, with a whole
        operation's budget (so a listing made for a lookup is as good as one made for `ls`),
        and this waits for it LOOKUP_LISTING_BUDGET seconds at most (None if not ready)."""
        hub = self.source.registry.is_docker_hub
        cache, key = (self._hub_repos, prefix) if hub else (self._catalog, "catalog")
        at_hand = cache.peek(key)
        if at_hand is not _MISSING:
            return at_hand  # type: ignore[no-any-return]
        future = self._in_background(("listing", prefix if hub else ""), partial(self._listing, prefix))
        left = deadline.remaining()
        try:
            return future.result(timeout=max(0.0, min(LOOKUP_LISTING_BUDGET, left if left is not None else 1e9)))
        except FutureTimeout:
            return None

    def _executor(self, kind: str, workers: int) -> ThreadPoolExecutor | None:
        """The pool for one kind of background work (None once closed); the caller holds
        self._mutex."""
        if self._closed:
            return None
        pool = self._pools.get(kind)
        if pool is None:
            pool = self._pools[kind] = ThreadPoolExecutor(workers, thread_name_prefix=f"ocifs-{kind}")
        return pool

    def _in_background(self, key: Any, work: Callable[[], T]) -> Future[T]:
        """Run `work` in the listing pool, with a whole operation's deadline; one at a time
        per key (a caller while it runs gets the same future)."""
        with self._mutex:
            running = self._background.get(key)
            if running is not None:
                return running
            pool = self._executor("listing", 2)

            def bounded() -> T:
                with deadline.limit(self.timeout):
                    return work()

            if pool is None:  # unmounting: no more background work
                future: Future[T] = Future()
                future.set_exception(NetworkError("unmounting"))
                return future
            future = pool.submit(bounded)
            self._background[key] = future

        def done(_: Future[T]) -> None:
            with self._mutex:
                if self._background.get(key) is future:
                    del self._background[key]

        future.add_done_callback(done)
        return future

    def listing_at_hand(self, prefix: str) -> Listing | None:
        """The listing covering `prefix` if a fresh one is in memory (nothing is fetched)."""
        hub = self.source.registry.is_docker_hub
        at_hand = self._hub_repos.peek(prefix) if hub else self._catalog.peek("catalog")
        return None if at_hand is _MISSING else at_hand

    def lists_now(self, prefix: str, name: str) -> bool:
        """Whether a fresh listing in memory shows `name` under `prefix` (nothing is fetched)."""
        listing = self.listing_at_hand(prefix)
        return listing is not None and name in listing.children.get(prefix, ())

    def only_a_path(self, prefix: str) -> bool:
        """Whether a fresh, complete catalog in memory says `prefix` is a path to repositories
        and not a repository itself: it has no tags to ask for (until the catalog's TTL)."""
        listing = self.listing_at_hand(prefix)
        return (listing is not None and listing.complete and listing.repositories is not None
                and prefix not in listing.repositories and bool(listing.children.get(prefix)))

    def _listing(self, prefix: str) -> Listing | None:
        registry = self.source.registry
        if registry.is_docker_hub:
            if self.hub is not None and prefix and "/" not in prefix:
                try:
                    return self._hub_repos.get(prefix, partial(self._load_hub, prefix))
                except NetworkError as exc:
                    # hub.docker.com down: repositories stay reachable by name.
                    log.warning("Docker Hub API unavailable (%s)", exc)
            return None
        try:
            return self._catalog.get("catalog", self._load_catalog)
        except NetworkError as exc:
            # Tags may still be known: list what we can rather than fail the directory.
            log.warning("catalog unavailable (%s)", exc)
            return None

    def _load_hub(self, namespace: str) -> Listing | None:
        assert self.hub is not None
        names: set[str] = set()
        try:
            for name in self.hub.repositories(namespace):
                names.add(name)
        except NotFound:
            return Listing({namespace: set()})
        except ListingTruncated as exc:
            log.warning("%s; listing the %d repositories found", exc, len(names))
            return Listing({namespace: names}, complete=False)
        except RegistryError as exc:
            log.info("cannot list Docker Hub namespace %s: %s", namespace, exc)
            return None
        return Listing({namespace: names})

    def _load_catalog(self) -> Listing | None:
        repositories: list[str] = []
        complete = True
        try:
            for repository in self.client.catalog():
                repositories.append(repository)
        except (Unauthorized, Denied, Unsupported, NotFound) as exc:
            log.info("the registry's catalog cannot be listed: %s", exc)
            return None
        except ListingTruncated as exc:
            log.warning("%s; listing the %d repositories found", exc, len(repositories))
            complete = False
        children: dict[str, set[str]] = {}
        valid = frozenset(repository for repository in repositories if is_valid_repository(repository))
        for repository in valid:
            parts = repository.split("/")
            for i in range(len(parts)):
                children.setdefault("/".join(parts[:i]), set()).add(parts[i])
        return Listing(children, complete, valid)

    def resolve(self, repository: str, tag: str) -> Descriptor:
        """tag -> manifest descriptor, with HEAD, cached for the TTL (NotFound for a few seconds)."""
        key = (repository, tag)
        fresh = self._resolved.peek(key)  # a tag this mount just pushed beats an older 404
        if fresh is not _MISSING:
            return fresh  # type: ignore[no-any-return]
        with self._mutex:
            if key in self._missing_tags:
                raise NotFound(f"{repository}:{tag}: no such tag")
        try:
            descriptor = self._resolved.get(key, partial(self.client.resolve, repository, tag))
            self._seen_tag(repository, tag)
            return descriptor
        except NotFound:
            with self._mutex:
                self._missing_tags[key] = True
            raise

    def has_tag(self, repository: str, tag: str) -> bool:
        """Whether the tag exists, asked by name (not from the tag list); its manifest is
        then at hand (one GET where a GET is what it costs anyway)."""
        try:
            return self.tag_manifest(repository, tag) is not None
        except NotFound:
            return False

    def note_pushed(self, repository: str, tag: str, manifest: Manifest | Index) -> Descriptor:
        """This mount just PUT `manifest` as `tag`: show it at once, without asking again."""
        descriptor, _ = self._adopt(repository, tag, manifest)
        with self._mutex:
            self._missing_tags.pop((repository, tag), None)
        self._tags.invalidate(repository)
        self._catalog.invalidate("catalog")
        return descriptor

    def forget_tag_list(self, repository: str) -> None:
        self._tags.invalidate(repository)
        self._catalog.invalidate("catalog")

    def forget_tag(self, repository: str, tag: str) -> None:
        """The tag was deleted by this mount."""
        self._resolved.invalidate((repository, tag))
        self._tags.invalidate(repository)
        self._catalog.invalidate("catalog")

    def referrers(self, repository: str, digest: Digest) -> tuple[Descriptor, ...]:
        """The manifests that refer to `digest` (OCI 1.1 referrers, or the tag-schema
        fallback), cached for the TTL like a tag list."""
        return self._referrers.get((repository, digest), partial(self.client.referrers, repository, digest))

    def forget_referrers(self, repository: str, digest: Digest) -> None:
        """This mount just attached something to `digest`: ask again next time."""
        self._referrers.invalidate((repository, digest))

    def manifest(self, repository: str, descriptor: Descriptor) -> Manifest | Index:
        """The manifest by digest: from memory, the store, or the registry (then kept)."""
        digest = descriptor.digest
        with self._mutex:
            cached = self._manifests.get(digest)
        if cached is not None:
            return cached
        return self._manifest_flights.run(digest, lambda: self._load_manifest(repository, descriptor))

    def _load_manifest(self, repository: str, descriptor: Descriptor) -> Manifest | Index:
        digest = descriptor.digest
        with self._mutex:
            cached = self._manifests.get(digest)
        if cached is not None:
            return cached
        manifest: Manifest | Index | None = None
        path = self.store.complete_path(digest)
        if path is not None:
            try:
                manifest = parse_manifest(path.read_bytes(), content_type=descriptor.media_type,
                                          digest=digest)
            except (OSError, OcifsError) as exc:
                log.warning("cached manifest %s unusable: %s", digest, exc)
        if manifest is None:
            manifest = self.client.get_manifest(repository, str(digest))
            self._keep(digest, manifest)
            return manifest
        with self._mutex:
            self._manifests[digest] = manifest
        return manifest

    def tag_manifest(self, repository: str, tag: str, *, fresh: bool = False
                     ) -> tuple[Descriptor, Manifest | Index] | None:
        """The manifest a tag names (None when the tag does not exist), resolved with HEAD
        (cached for the TTL unless `fresh`). Some registries announce a wrong digest for
        tags: when nothing can be fetched under it, the tag itself is fetched and the digest
        of the bytes is what counts."""
        if fresh:
            descriptor = self.resolve_now(repository, tag)
            if descriptor is None:
                return None
        else:
            key = (repository, tag)
            if not self.source.registry.is_docker_hub and not self._resolved.known(key):
                # First sight in this mount: one GET (the body is needed anyway), not a HEAD
                # and then a GET. On Docker Hub a GET counts as a pull: HEAD first there.
                found = self._tag_flights.run(key, lambda: self._fetch_tag(repository, tag))
                if found is not None:
                    return found
            descriptor = self.resolve(repository, tag)  # NotFound when there is no such tag
        try:
            return descriptor, self.manifest(repository, descriptor)
        except (NotFound, IntegrityError) as exc:
            manifest = self.client.get_manifest(repository, tag)
            log.warning("%s:%s: the registry announced %s (%s); using the digest of its bytes, %s",
                        repository, tag, descriptor.digest, exc, manifest.digest)
        return self._adopt(repository, tag, manifest)

    def _fetch_tag(self, repository: str, tag: str) -> tuple[Descriptor, Manifest | Index] | None:
        """GET a tag's manifest; None when the registry cannot be reached (the caller falls
        back to what it last saw)."""
        key = (repository, tag)
        with self._mutex:
            if key in self._missing_tags:
                raise NotFound(f"{repository}:{tag}: no such tag")
        try:
            manifest = self.client.get_manifest(repository, tag)
        except NotFound:
            with self._mutex:
                self._missing_tags[key] = True
            raise
        except NetworkError:
            return None
        return self._adopt(repository, tag, manifest)

    def _adopt(self, repository: str, tag: str, manifest: Manifest | Index) -> tuple[Descriptor, Manifest | Index]:
        """`manifest` is what `tag` names now (fetched by tag, or just pushed): keep it and
        remember the tag's digest."""
        descriptor = Descriptor(manifest.media_type, manifest.digest, len(manifest.raw))
        with self._mutex:
            self._manifests[descriptor.digest] = manifest
        self._resolved.put((repository, tag), descriptor, save=False)
        # On disk, a tag's digest is kept only after its manifest: an `--offline` mount
        # after a crash never finds a tag whose manifest it does not have.
        self._on_disk(partial(self._keep_tag_on_disk, repository, tag, descriptor, manifest.raw))
        return descriptor, manifest

    def warm(self, repository: str, tags: Iterable[str]) -> None:
        """Fetch the manifests of `tags` in the background, in this order, WARM_CONCURRENCY - 1
        at a time (the walker's own request makes WARM_CONCURRENCY), WARM_LIMIT tags at
        most, each tag once per TTL: `ls -l` or `find` then find them here instead of asking
        one by one. Tags being fetched already cost nothing more (single flight)."""
        if self.source.registry.is_docker_hub:
            return  # a manifest GET is a pull there: only what the user reads is fetched
        wanted = list(tags)[:WARM_LIMIT]
        with self._mutex:
            done = self._warmed.get(repository, 0)
            if done >= len(wanted):
                return
            self._warmed[repository] = len(wanted)
            todo = [tag for tag in wanted if not self._resolved.known((repository, tag))]
            pool = self._executor("manifests", WARM_CONCURRENCY - 1) if todo else None
        for tag in todo:
            if pool is not None:
                pool.submit(self._warm_one, repository, tag)

    def _warm_one(self, repository: str, tag: str) -> None:
        try:
            with deadline.limit(self.timeout):
                self.tag_manifest(repository, tag)
        except OcifsError as exc:
            log.debug("%s:%s not prefetched: %s", repository, tag, exc)

    def prefetch(self, repositories: Iterable[str]) -> None:
        """A walk goes through these repositories next (`find`, `ls -lR` of a namespace):
        fetch their tag lists in the background, LIST_CONCURRENCY at a time, and as each list
        arrives the manifests of its first PREFETCH_TAGS tags (through `warm`, in order). Only
        names the catalog lists as repositories, each once per TTL."""
        if self.source.registry.is_docker_hub:
            return
        listing = self.listing_at_hand("")  # the catalog (Docker Hub was ruled out above)
        known = listing.repositories if listing is not None else None
        if not known:
            return  # without a catalog, a path may be no repository: not worth a guess
        with self._mutex:
            todo = [repository for repository in repositories
                    if repository in known and repository not in self._prefetched]
            for repository in todo:
                self._prefetched[repository] = True
            pool = self._executor("tags", LIST_CONCURRENCY) if todo else None
        for repository in todo:
            if pool is not None:
                pool.submit(self._prefetch_one, repository)

    def _prefetch_one(self, repository: str) -> None:
        try:
            with deadline.limit(self.timeout):
                tags = self.tags(repository)
        except OcifsError as exc:
            log.debug("tags of %s not prefetched: %s", repository, exc)
            return
        if tags:
            self.warm(repository, sorted(tags)[:PREFETCH_TAGS])

    def close(self) -> None:
        """Unmounting: background fetches stop; what is still to be written to the cache is
        written first (an `--offline` mount later needs what this one saw), for at most the
        background deadline: the rest is dropped (it can be fetched again)."""
        with self._mutex:
            pools, self._pools = dict(self._pools), {}
            self._closed = True
            last = self._keeping[-1] if self._keeping else None
        keeper = pools.pop("keep", None)
        for pool in pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        if keeper is not None:
            if last is not None:
                try:
                    last.result(timeout=self.timeout)  # one worker, in order: all before it too
                except FutureTimeout:
                    log.warning("unmounting: not all metadata could be kept on disk in time")
            keeper.shutdown(wait=False, cancel_futures=True)

    def _keep(self, digest: Digest, manifest: Manifest | Index) -> None:
        """Keep a manifest in memory at once, and on disk (for restarts and `--offline`) soon."""
        with self._mutex:
            self._manifests[digest] = manifest
        self._on_disk(partial(self._keep_on_disk, digest, manifest.raw))

    def _on_disk(self, work: Callable[[], None]) -> None:
        """Write what a fetch learnt to the disk cache in the background, one thing at a
        time, in order: adding to the cache may scan it for eviction, and file writes take
        their time; neither may hold up the walk that fetched it. Unmounting waits for it."""
        with self._mutex:
            while self._keeping and self._keeping[0].done():  # one worker: done in order
                self._keeping.popleft()
            keeper = self._executor("keep", 1) if len(self._keeping) < KEEP_BACKLOG else None
            if keeper is not None:
                self._keeping.append(keeper.submit(self._quietly, work))
        if keeper is None:  # unmounting, or the keeper is far behind: no unbounded backlog
            self._quietly(work)

    @staticmethod
    def _quietly(work: Callable[[], None]) -> None:
        try:
            work()
        except Exception:  # housekeeping: logged, never lost in a future nobody reads
            log.exception("keeping metadata on disk failed")

    def _keep_on_disk(self, digest: Digest, raw: bytes) -> None:
        try:
            self.store.add_bytes(digest, raw)
        except OcifsError as exc:
            log.info("could not keep manifest %s in the cache: %s", digest, exc)

    def _keep_tag_on_disk(self, repository: str, tag: str, descriptor: Descriptor, raw: bytes) -> None:
        self._keep_on_disk(descriptor.digest, raw)
        self._resolved.save((repository, tag), descriptor)
        self._seen_tag(repository, tag)

    def read_small(self, repository: str, descriptor: Descriptor) -> bytes:
        fetch = partial(self.client.fetch_blob_range, repository, descriptor.digest)
        return self.store.read_all(descriptor.digest, descriptor.size, fetch)


    def note_tag(self, repository: str, tag: str, descriptor: Descriptor) -> None:
        """What the tag resolved to just now, fresher than the cache."""
        self._resolved.put((repository, tag), descriptor)
        self._seen_tag(repository, tag)

    def _seen_tag(self, repository: str, tag: str) -> None:
        """A tag found by name: listed when the registry cannot be reached, even if its
        repository's tag list was never fetched."""
        self._tags.remember(repository, lambda tags: tags if tags and tag in tags else set(tags or ()) | {tag})

    def resolve_now(self, repository: str, tag: str) -> Descriptor | None:
        """tag -> manifest descriptor as the registry has it now (HEAD, ignoring the TTL);
        None when the tag does not exist. Writers edit what is there, not what was cached."""
        try:
            return self.client.resolve(repository, tag)
        except NotFound:
            return None
