"""Fetching the audio resource of a CAP alert from its URI, under the node's URL policy."""

from __future__ import annotations

import aiohttp
from yarl import URL

from loa.relay.urlpolicy import FETCH_SCHEMES, FetchSettings, PolicyResolver, check_url
from loa.streamer.emergency.service import EmergencySettings, Fetcher

MAX_REDIRECTS = 3


def cap_fetcher(settings: EmergencySettings, policy: FetchSettings) -> Fetcher:
    """CAP resource URIs: http(s) only, never to the node itself or link-local addresses
    (relay/urlpolicy.py), checked for every redirect and every address connected to."""
    async def fetch(url: str) -> bytes:
        limit = settings.cap_resource_mb * 1024 * 1024
        timeout = aiohttp.ClientTimeout(total=settings.cap_resource_timeout)
        connector = aiohttp.TCPConnector(resolver=PolicyResolver(policy))
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            for _ in range(MAX_REDIRECTS + 1):
                await check_url(url, FETCH_SCHEMES, policy)  # IP literals skip the resolver
                async with http.get(url, allow_redirects=False) as r:
                    if r.status in (301, 302, 303, 307, 308) and "Location" in r.headers:
                        url = str(r.url.join(URL(r.headers["Location"])))
                        continue
                    if r.status != 200:
                        raise ValueError(f"HTTP {r.status}")
                    if r.content_length is not None and r.content_length > limit:
                        raise ValueError(f"resource of {r.content_length} bytes is over the "
                                         "limit")
                    data = await r.content.read(limit + 1)
                    if len(data) > limit:
                        raise ValueError("resource is over the size limit")
                    return data
            raise ValueError("too many redirects")

    return fetch
