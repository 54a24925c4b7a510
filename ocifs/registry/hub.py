"""Docker Hub's web API: the repositories of a namespace (Hub has no catalog)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from urllib.parse import quote, urljoin, urlsplit

from ..errors import InvalidReference, RegistryError
from ..reference import is_valid_component
from .transport import Transport, TransportOptions, check

log = logging.getLogger(__name__)

DEFAULT_HUB_URL = "https://hub.docker.com"
HUB_PAGE_SIZE = 100  # the API allows up to 1000; 100 keeps each answer small
MAX_HUB_PAGES = 10_000


class HubClient:
    """Lists namespaces through `GET /v2/namespaces/{ns}/repositories`, following `next`."""

    def __init__(self, base_url: str = DEFAULT_HUB_URL, options: TransportOptions = TransportOptions()) -> None:
        self.base_url = base_url.rstrip("/")
        self.transport = Transport(options)

    def repositories(self, namespace: str) -> Iterator[str]:
        """Names (without the namespace) of the namespace's repositories, every page."""
        if not is_valid_component(namespace):
            raise InvalidReference(f"invalid Docker Hub namespace: {namespace!r}")
        url = f"{self.base_url}/v2/namespaces/{quote(namespace)}/repositories?page_size={HUB_PAGE_SIZE}"
        origin = urlsplit(url)[:2]
        seen: set[str] = set()
        for _ in range(MAX_HUB_PAGES):
            seen.add(url)
            response = check(self.transport.request("GET", url), f"Docker Hub namespace {namespace}")
            try:
                data = response.json()
            except ValueError:
                raise RegistryError("Docker Hub API answered with invalid JSON") from None
            if not isinstance(data, dict):
                raise RegistryError("Docker Hub API answered with something that is not an object")
            results = data.get("results") or []
            if not isinstance(results, list):
                raise RegistryError("Docker Hub API: 'results' is not a list")
            for item in results:
                name = item.get("name") if isinstance(item, dict) else None
                if isinstance(name, str) and is_valid_component(name):
                    yield name
            next_url = data.get("next")
            if not isinstance(next_url, str) or not next_url:
                return
            next_url = urljoin(url, next_url)
            if urlsplit(next_url)[:2] != origin or next_url in seen:
                log.warning("Docker Hub API: not following next page %s", next_url)
                return
            url = next_url
