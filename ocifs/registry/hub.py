"""Docker Hub's web API: the repositories of a namespace (Hub has no catalog)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from urllib.parse import quote

from ..errors import InvalidReference, RegistryError
from ..reference import is_valid_component
from .transport import Page, Transport, TransportOptions, check, follow_pages, json_object

log = logging.getLogger(__name__)

DEFAULT_HUB_URL = "https://hub.docker.com"
HUB_PAGE_SIZE = 100  # the API allows up to 1000; 100 keeps each answer small


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
        what = f"Docker Hub namespace {namespace}"

        def page(page_url: str) -> Page:
            data = json_object(check(self.transport.request("GET", page_url), what), what)
            results = data.get("results") or []
            if not isinstance(results, list):
                raise RegistryError(f"{what}: 'results' is not a list")
            names = [item.get("name") for item in results if isinstance(item, dict)]
            next_url = data.get("next")
            return ([name for name in names if isinstance(name, str) and is_valid_component(name)],
                    next_url if isinstance(next_url, str) else None)

        return follow_pages(url, page, what)
