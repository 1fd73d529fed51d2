"""The exchange with the central source system on the wire (docs/exchange.md): HMAC-SHA256
signatures of every request both ways, and the store-backed outbox that pushes our messages
(acknowledgements, delivery reports, statistics) to a peer's webhook until it takes them.

A signature covers `timestamp \\n METHOD \\n path?query \\n raw body` with the peer's shared
secret; the timestamp must be within `max_skew` of our clock, so a captured request cannot be
replayed later, and ids deduplicate replays inside that window."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from yarl import URL

from loa.streamer.messages import say
from loa.streamer.state.store import Conflict, Record, Store, StoreUnavailable

log = logging.getLogger("loa.exchange")

PEER = "X-Loa-Peer"
TIMESTAMP = "X-Loa-Timestamp"  # unix seconds
SIGNATURE = "X-Loa-Signature"  # "sha256=<hex>"
OUTBOX = "exchange_out"  # store kind of our outgoing messages (the pull feed and the outbox)
CURSORS = "exchange_cursor"  # store kind: id = peer, `cursor` = where its bulletin feed stands
MAX_FEED = 64 * 1024 * 1024  # a page of a peer's bulletin feed
PUSH_TIMEOUT = 10.0
PRUNE_EVERY = 3600.0  # seconds between two prunings of the outbox
CLAIM_WINDOW = 3 * PUSH_TIMEOUT  # seconds one node holds an attempt at a push (see _push_due)


def _pairs(name: str, items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        peer, sep, value = item.partition("=")
        if not sep or not peer.strip() or not value.strip():
            raise ValueError(f"[exchange] {name}: expected \"peer=value\" items")
        out[peer.strip()] = value.strip()
    return out


@dataclass
class ExchangeSettings:
    """Config section [exchange] (env LOA_EXCHANGE_<KEY>)."""

    # "central=SECRET": who may talk to us (never in a repr, a log or an answer)
    peers: list[str] = field(default_factory=list, repr=False)
    push: list[str] = field(default_factory=list)  # "central=https://.../webhook": where we push
    max_skew: float = 300.0  # seconds a signed request's timestamp may differ from our clock
    retry_min: float = 1.0  # first wait before a failed push is retried, doubling ...
    retry_max: float = 300.0  # ... up to this
    pull: list[str] = field(default_factory=list)  # "central=https://.../bulletins": we poll
    pull_interval: float = 30.0  # seconds between two polls of a peer's bulletin feed
    stats_interval: float = 3600.0  # seconds between two statistics messages (0: none)
    attachment_mb: int = 20  # largest attachment of a bulletin (inline or by uri)
    keep_days: float = 90.0  # messages pushed (or left for pulling) this long ago are deleted
    _secrets: dict[str, str] = field(default_factory=dict, repr=False)
    _push_urls: dict[str, str] = field(default_factory=dict, repr=False)
    _pull_urls: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._secrets = _pairs("peers", self.peers)
        self._push_urls = _pairs("push", self.push)
        self._pull_urls = _pairs("pull", self.pull)
        unknown = (set(self._push_urls) | set(self._pull_urls)) - set(self._secrets)
        if unknown:
            raise ValueError(f"[exchange] push or pull names peers without a secret: "
                             f"{sorted(unknown)}")
        if self.pull_interval <= 0:
            raise ValueError("[exchange] pull_interval must be > 0")
        if self.keep_days <= 0:
            raise ValueError("[exchange] keep_days must be > 0")

    def secret(self, peer: str) -> str | None:
        return self._secrets.get(peer)

    def peer_names(self) -> list[str]:
        return list(self._secrets)

    def push_url(self, peer: str) -> str | None:
        return self._push_urls.get(peer)

    def pull_urls(self) -> dict[str, str]:
        return dict(self._pull_urls)


def signature(secret: str, ts: str, method: str, path: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), b"\n".join(
        (ts.encode(), method.upper().encode(), path.encode(), body)), hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def signed_headers(peer: str, secret: str, method: str, path: str, body: bytes,
                   now: float | None = None) -> dict[str, str]:
    ts = str(int(time.time() if now is None else now))
    return {PEER: peer, TIMESTAMP: ts, SIGNATURE: signature(secret, ts, method, path, body)}


class SignatureRefused(Exception):
    """Why a request is not from a peer we know (bilingual text)."""


def claimed_peer(settings: ExchangeSettings, headers: Mapping[str, str],
                 now: float | None = None) -> str:
    """The peer a request says it is from, when it names a known peer with a fresh timestamp
    (else SignatureRefused): checked before the body is read, so a stranger cannot make the
    node read megabytes; the signature itself needs the body (`verified_peer`)."""
    peer, ts, sig = (headers.get(h, "") for h in (PEER, TIMESTAMP, SIGNATURE))
    if not peer or not ts or not sig or settings.secret(peer) is None:
        raise SignatureRefused(say("exchange.unsigned"))
    try:
        stamp = int(ts)
    except ValueError:
        raise SignatureRefused(say("exchange.stale")) from None
    if abs((time.time() if now is None else now) - stamp) > settings.max_skew:
        raise SignatureRefused(say("exchange.stale"))
    return peer


def verified_peer(settings: ExchangeSettings, headers: Mapping[str, str], method: str,
                  path: str, body: bytes, now: float | None = None) -> str:
    """The peer that signed this request, or SignatureRefused with the reason's key."""
    peer = claimed_peer(settings, headers, now)
    secret = settings.secret(peer)
    assert secret is not None  # claimed_peer knows it
    if not hmac.compare_digest(signature(secret, headers[TIMESTAMP], method, path, body),
                               headers[SIGNATURE]):
        raise SignatureRefused(say("exchange.bad_signature"))
    return peer


def cursor_of(rec: Record) -> str:
    """A message's place in its peer's feed: creation time, then id (ties broken the same
    way on every node of a cluster)."""
    return f"{rec['created']:.6f}-{rec['id']}"


class PushTargets(Protocol):
    """Where an Outbox pushes (ExchangeSettings for the exchange; alert contacts for alerts)."""

    retry_min: float
    retry_max: float
    keep_days: float  # what needs nothing more is deleted this long after it was written

    def push_url(self, peer: str) -> str | None: ...

    def secret(self, peer: str) -> str | None: ...


Deliver = Callable[[aiohttp.ClientSession, Record], Awaitable[bool]]


class Outbox:
    """Our messages to the peers: every one is stored first (the pull feed reads them); those
    for a peer with a webhook are pushed, retried with capped backoff until a 2xx, across
    restarts. Ids are the messages' own, so a receiver deduplicates a push it already has.

    `kind` is the store kind it keeps its messages in; `deliver` replaces the signed webhook
    POST for messages that go another way (alert e-mails), and may call `push` itself."""

    def __init__(self, store: Store, settings: PushTargets, kind: str = OUTBOX,
                 deliver: Deliver | None = None) -> None:
        self.store = store
        self.settings = settings
        self.kind = kind
        self._deliver: Deliver = deliver or self.push
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.stats = {"pushed": 0, "failed": 0}

    async def put(self, peer: str, message: Record, push: bool | None = None,
                  replace: bool = False) -> Record:
        """Store a message (idempotent by id: the stored one wins, unless `replace`: a newer
        state of the same thing, queued anew) and push it if we may (`push`: whether to, when
        the peer has no webhook URL but another way, e-mail)."""
        # One record per peer and message id (two peers may get a message of the same id).
        if push is None:
            push = bool(self.settings.push_url(peer))
        rec: Record = {"id": f"{peer}:{message['id']}", "peer": peer, "type": message["type"],
                       "created": time.time(), "message": message,
                       "push": "pending" if push else "pull", "attempts": 0, "next_try": 0.0}
        if replace:
            await self.store.put(self.kind, rec)
            self._wake.set()
            return rec
        try:
            await self.store.create(self.kind, rec)
        except Conflict:
            return await self.store.get(self.kind, rec["id"]) or rec
        self._wake.set()
        return rec

    async def feed(self, peer: str, since: str | None, limit: int) -> list[Record]:
        rows = sorted(await self.store.find(self.kind, peer=peer), key=cursor_of)
        if since:
            rows = [r for r in rows if cursor_of(r) > since]
        return rows[:limit]

    async def done(self, rec: Record) -> bool:
        """A message the peer has taken: deleted (True), unless a newer state replaced it
        meanwhile or it is gone already."""
        now = await self.store.get(self.kind, rec["id"])
        if now is None or now["created"] != rec["created"]:
            return False
        return await self.store.delete(self.kind, rec["id"])

    async def queued(self, peer: str) -> int:
        return await self.store.count(self.kind, peer=peer)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def prune(self, now: float | None = None) -> int:
        """Delete the messages older than `keep_days` that need nothing more: pushed, or for
        a peer that pulls (it had that long to read them). One still to be pushed is kept
        however old: nothing is lost while a peer's webhook is down."""
        cutoff = (time.time() if now is None else now) - self.settings.keep_days * 86400
        old = [r for state in ("delivered", "pull")
               for r in await self.store.find(self.kind, push=state) if r["created"] < cutoff]
        for rec in old:
            await self.store.delete(self.kind, rec["id"])
        if old:
            log.info("outbox pruned event=exchange_pruned kind=%s messages=%d", self.kind,
                     len(old))
        return len(old)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        prune_at = loop.time()
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=PUSH_TIMEOUT)) as http:
            while True:
                self._wake.clear()
                try:
                    if loop.time() >= prune_at:
                        prune_at = loop.time() + PRUNE_EVERY
                        await self.prune()
                    wait = await self._push_due(http)
                except StoreUnavailable as e:
                    log.warning("outbox store unavailable event=exchange_store error=%s", e)
                    wait = self.settings.retry_max
                except Exception:  # a bug in one delivery must not end every later one
                    log.exception("outbox round failed event=exchange_outbox_error kind=%s",
                                  self.kind)
                    wait = self.settings.retry_max
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except TimeoutError:
                    pass

    async def _push_due(self, http: aiohttp.ClientSession) -> float:
        """Push what is due; the seconds until the next retry falls due."""
        now = time.time()
        nxt = self.settings.retry_max
        for rec in sorted(await self.store.find(self.kind, push="pending"), key=cursor_of):
            if rec["next_try"] > now:
                nxt = min(nxt, rec["next_try"] - now)
                continue
            # Nodes of a cluster share the outbox: the store's atomic counter lets one of them
            # make each attempt (a node that dies in it leaves the attempt to the others once
            # the window has passed).
            if await self.store.hit(f"{self.kind}:{rec['id']}:{rec['attempts']}",
                                    CLAIM_WINDOW) > 1:
                continue
            if await self._deliver(http, rec):
                await self.store.update(self.kind, rec["id"], {"push": "delivered",
                                                               "delivered": time.time()})
                self.stats["pushed"] += 1
                continue
            attempts = rec["attempts"] + 1
            s = self.settings
            # Capped exponential backoff with jitter: many nodes do not retry in lockstep.
            delay = min(s.retry_max, s.retry_min * 2 ** (attempts - 1)) * random.uniform(0.75, 1)
            await self.store.update(self.kind, rec["id"], {"attempts": attempts,
                                                           "next_try": now + delay})
            self.stats["failed"] += 1
            nxt = min(nxt, delay)
        return max(nxt, 0.01)

    async def push(self, http: aiohttp.ClientSession, rec: Record) -> bool:
        """POST the message to the peer's webhook, signed; True on a 2xx."""
        peer = rec["peer"]
        url, secret = self.settings.push_url(peer), self.settings.secret(peer)
        if url is None or secret is None:  # configuration changed since: pull only now
            return True
        body = _dumps(rec["message"])
        path = URL(url).raw_path_qs
        headers = {"Content-Type": "application/json",
                   **signed_headers(peer, secret, "POST", path, body)}
        try:
            async with http.post(url, data=body, headers=headers) as r:
                ok = 200 <= r.status < 300
                if not ok:
                    log.warning("push refused event=exchange_push_refused kind=%s peer=%s "
                                "id=%s status=%d", self.kind, peer, rec["id"], r.status)
                return ok
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            log.info("push failed event=exchange_push_failed kind=%s peer=%s id=%s error=%s",
                     self.kind, peer, rec["id"], type(e).__name__)
            return False


class Poller:
    """Bulletins down by pull: every `pull_interval` each peer's feed is read after our cursor
    (`GET url?since=CURSOR`, signed, `If-None-Match`), each bulletin handed to `receive`
    (which deduplicates by id), then the cursor the feed gave is stored: a restart resumes."""

    def __init__(self, store: Store, settings: ExchangeSettings,
                 receive: Callable[[str, bytes], Awaitable[Any]]) -> None:
        self.store = store
        self.settings = settings
        self.receive = receive
        self._tasks: list[asyncio.Task[None]] = []
        self._etags: dict[str, str] = {}

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(peer, url))
                       for peer, url in self.settings.pull_urls().items()]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _run(self, peer: str, url: str) -> None:
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=PUSH_TIMEOUT)) as http:
            deadline = loop.time()
            while True:
                deadline += self.settings.pull_interval  # absolute: no drift
                try:
                    await self.poll(http, peer, url)
                except (aiohttp.ClientError, TimeoutError, OSError, ValueError,
                        StoreUnavailable) as e:
                    log.info("pull failed event=exchange_pull_failed peer=%s error=%s", peer,
                             type(e).__name__)
                except Exception:  # noqa: BLE001 - a bulletin that cannot air: next poll again
                    log.exception("pull failed event=exchange_pull_failed peer=%s", peer)
                await asyncio.sleep(max(0.0, deadline - loop.time()))

    async def poll(self, http: aiohttp.ClientSession, peer: str, url: str) -> int:
        """One read of the peer's feed: the number of bulletins handed over."""
        secret = self.settings.secret(peer)
        assert secret is not None  # settings refuse a pull without a secret
        at = await self.store.get(CURSORS, peer)
        target = URL(url)
        if at and at.get("cursor"):
            target = target.update_query(since=at["cursor"])
        headers = signed_headers(peer, secret, "GET", target.raw_path_qs, b"")
        if peer in self._etags:
            headers["If-None-Match"] = self._etags[peer]
        async with http.get(target, headers=headers) as r:
            if r.status == 304:
                return 0
            if r.status != 200:
                raise ValueError(f"HTTP {r.status}")
            raw = await r.content.read(MAX_FEED + 1)
            etag = r.headers.get("ETag")
        page = json.loads(raw) if len(raw) <= MAX_FEED else None
        if not isinstance(page, dict) or not isinstance(page.get("bulletins"), list):
            raise ValueError("not a bulletin feed page")
        for bulletin in page["bulletins"]:
            await self.receive(peer, json.dumps(bulletin, ensure_ascii=False).encode())
        if isinstance(page.get("cursor"), str):
            await self.store.put(CURSORS, {"id": peer, "cursor": page["cursor"]})
        if etag:
            self._etags[peer] = etag
        return len(page["bulletins"])


def _dumps(message: Any) -> bytes:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()
