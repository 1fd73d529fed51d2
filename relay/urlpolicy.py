"""Which outside URLs the node may open (relay inputs, CAP resources): the guard against SSRF.

An operator names a URL and the server connects to it, from inside the provincial network. So:
the scheme is allow-listed per use, the host is resolved (on the event loop's resolver) and every
address it resolves to is checked. Loopback, link-local (cloud metadata lives there), unspecified,
limited broadcast and the node's own addresses are refused unless an operator allowed their
network (`[fetch] allow_networks`). Private RFC 1918 networks stay allowed: provincial networks
are closed private networks. Multicast is a group to join, valid for rtp/udp only.

The check runs when a URL is stored (programme create/update) and again when it is opened: the
name may resolve elsewhere by then.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp.abc import ResolveResult
from aiohttp.resolver import ThreadedResolver

from loa.streamer.errors import LoaError
from loa.streamer.messages import say

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

RELAY_SCHEMES = ("http", "https", "rtp", "udp", "rtsp")
FETCH_SCHEMES = ("http", "https")
MULTICAST_SCHEMES = ("rtp", "udp")
OWN_TTL = 30.0  # seconds the node's own addresses are cached (interfaces rarely change)


class UrlRefused(LoaError, ValueError):
    """The URL may not be opened; the message says why (Vietnamese / English)."""

    kind = "forbidden"


@dataclass
class FetchSettings:
    """`[fetch]`: networks an operator allows despite the rules above (e.g. "127.0.0.0/8" for a
    relay of a local encoder), and how long a name may take to resolve."""
    allow_networks: list[str] = field(default_factory=list)
    resolve_timeout: float = 3.0
    _networks: list[IpNetwork] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        nets = []
        for n in self.allow_networks:
            try:
                nets.append(ipaddress.ip_network(str(n).strip(), strict=False))
            except ValueError:
                raise ValueError(f"allow_networks: not a network: {n!r}") from None
        self._networks = nets

    def allowed(self, ip: IpAddress) -> bool:
        return any(ip.version == n.version and ip in n for n in self._networks)


def _ip(text: str) -> IpAddress:
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _read_own() -> set[IpAddress]:
    """This host's addresses on Linux: LOCAL entries of the IPv4 FIB and every IPv6 address."""
    own: set[IpAddress] = set()
    try:
        last = None
        for line in Path("/proc/net/fib_trie").read_text().splitlines():
            s = line.strip()
            if s.startswith("|--"):
                last = s[3:].strip()
            elif s.startswith("/32 host LOCAL") and last:
                own.add(_ip(last))
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            hexa = line.split()[0]
            own.add(_ip(":".join(hexa[i:i + 4] for i in range(0, 32, 4))))
    except (OSError, ValueError, IndexError):
        pass
    return own


_own: tuple[float, set[IpAddress]] = (-OWN_TTL, set())


async def own_addresses() -> set[IpAddress]:
    global _own
    now = time.monotonic()
    if now - _own[0] >= OWN_TTL:
        _own = (now, await asyncio.to_thread(_read_own))
    return _own[1]


def address_problem(ip: IpAddress, scheme: str, own: set[IpAddress]) -> str | None:
    """Why `ip` may not be opened with `scheme` ("vi / en"), or None."""
    if ip.is_unspecified:
        return say("url.unspecified")
    if ip.is_loopback:
        return say("url.loopback")
    if ip.is_link_local:
        return say("url.link_local")
    if ip == ipaddress.IPv4Address("255.255.255.255"):
        return say("url.broadcast")
    if ip.is_multicast:
        return None if scheme in MULTICAST_SCHEMES else \
            say("url.multicast_scheme")
    if ip in own:
        return say("url.own_address")
    return None


async def resolve(host: str, port: int | None, seconds: float) -> list[IpAddress]:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(seconds):
            infos = await loop.getaddrinfo(host, port or 0, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError):
        raise UrlRefused(say("url.unresolvable", host=host), kind="invalid") from None
    return [_ip(str(info[4][0])) for info in infos]


async def check_addresses(host: str, ips: Iterable[IpAddress], scheme: str,
                          settings: FetchSettings) -> None:
    own = await own_addresses()
    for ip in ips:
        if settings.allowed(ip):
            continue
        why = address_problem(ip, scheme, own)
        if why:
            why_vi, why_en = why.split(" / ")
            raise UrlRefused(say("url.address_refused", host=host, ip=ip, why_vi=why_vi,
                                 why_en=why_en))


async def check_url(url: str, schemes: Iterable[str], settings: FetchSettings) -> None:
    """Refuse (UrlRefused) a URL whose scheme is not in `schemes` or whose host resolves to an
    address the rules above forbid."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UrlRefused(say("url.malformed"), kind="invalid") from None
    scheme = parts.scheme.lower()
    allowed = tuple(schemes)
    if scheme not in allowed:
        raise UrlRefused(say("url.scheme", schemes=", ".join(allowed)))
    host = parts.hostname
    if not host:
        raise UrlRefused(say("url.no_host"), kind="invalid")
    await check_addresses(host, await resolve(host, port, settings.resolve_timeout), scheme,
                          settings)


class PolicyResolver(ThreadedResolver):
    """aiohttp's resolver, checking every address a connection is about to use: what was
    checked is what is connected to (a name cannot resolve elsewhere in between)."""

    def __init__(self, settings: FetchSettings, scheme: str = "http") -> None:
        super().__init__()
        self.settings = settings
        self.scheme = scheme

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await super().resolve(host, port, family)
        await check_addresses(host, [_ip(r["host"]) for r in found], self.scheme, self.settings)
        return found
