"""The TT 39 inbox across the link between nodes, both ends (the rules: streamer/inbox.py).

Down (`Downlink`, the parent): a bulletin whose communes a child node serves goes down that
child's link as a `bulletin` control message (the bulletin, the entries of the child's communes
with their ids, and its content: title, volume, repeat, gap and the media it plays with their
SHA-256), when it is sent and again after every reconnect until the child has reported the
entries: idempotent by bulletin and entry id.

Media of a `normal` bulletin is FETCHED by the child when the bulletin arrives (`GET
/api/v1/nodes/media?id=`, node key, the original upload's bytes checked against their digest),
not streamed over the link when the commune airs it: the commune chooses the hour, the link may
be down then (4G), and a child never depends on its parent to air what it scheduled; the media
crosses once per child, however often it airs. A `priority` or `emergency` bulletin airs at the
parent and crosses the link as its broadcast (relay/link.py); the child keeps its entries so the
commune orders a priority clash there, on the same broadcast id.

Up (`ParentBulletins`, the child): every change of an entry from above (received, scheduled, declined with
its reason, aired, ordered) is reported to `POST /api/v1/nodes/inbox` from the store (an entry's
`reported` mark trails its state), so nothing is lost across an outage or a restart and a replay
changes nothing at the parent. A middle node (district) is both: its entries of a commune node
below go down again, and what that node reports goes up.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from loa.relay.link import Feed, LinkServer
from loa.streamer import inbox
from loa.streamer.areas import AreaTree
from loa.streamer.library import MediaLibrary
from loa.streamer.messages import say
from loa.streamer.state.store import Record, Store, StoreUnavailable
from loa.streamer.station import Station

log = logging.getLogger("loa.bulletins")

MEDIA_PATH = "/api/v1/nodes/media"
REPORT_PATH = "/api/v1/nodes/inbox"
REPORTED = ("state", "order", "reason")  # what a report carries of an entry
MAX_REPORT = 200  # entries per report
RETRY_MAX = 60.0  # a bulletin's fetch is retried, doubling from 1 s, while the wait is below this


class BulletinRefused(ValueError):
    """A bulletin message or a report that is not one: refused with its reason."""


def mark(entry: Record) -> list[Any]:
    return [entry.get(k) for k in REPORTED]


async def programme_media(station: Station, prog: Record) -> list[Record]:
    """The media records a programme plays (a TTS programme's rendering included)."""
    kind = prog.get("type")
    ids = [prog["media"]] if kind == "file" else list(prog.get("items") or []) \
        if kind == "playlist" else []
    if kind == "tts":
        ids = [(await station.speech.media_for(prog["text"], area=prog["area"],
                                               owner=prog.get("owner", "")))["id"]]
    out = []
    for mid in ids:
        m = await station.store.get("media", mid)
        if m is not None:
            out.append(m)
    return out


class Downlink:
    """The parent's end: bulletins down to the children that serve their communes, media to
    them, their reports applied here."""

    def __init__(self, links: LinkServer, store: Store, tree: AreaTree,
                 station: Station) -> None:
        self.links = links
        self.store = store
        self.tree = tree
        self.station = station

    async def message(self, bulletin: Record, entries: list[Record]) -> Record:
        prog = await self.store.get("programme", bulletin.get("programme") or "") or {}
        media = await programme_media(self.station, prog) \
            if bulletin["class"] == "normal" and prog else []
        ids = [m["id"] for m in media]
        if ids and bulletin.get("media_ids") != ids:  # what its children may fetch
            bulletin.update(await self.store.update("bulletin", bulletin["id"],
                                                    {"media_ids": ids}))
        content = {"title": prog.get("title", bulletin["title"]), "type": prog.get("type"),
                   "volume": prog.get("volume", 100), "repeat": prog.get("repeat", 1),
                   "gap": prog.get("gap", 0.0), "url": prog.get("url"),
                   "media": [{k: m.get(k) for k in ("id", "sha256", "title", "duration")}
                             for m in media]}
        return {"type": "bulletin", "bulletin": {
            **{k: bulletin.get(k) for k in ("id", "class", "title", "created", "broadcast",
                                            "emergency", "valid_until")},
            "from": bulletin["area"], "from_path": list(reversed(self.tree.ancestors(
                bulletin["area"]))) if bulletin["area"] in self.tree else [bulletin["area"]],
            "content": content},
            "entries": [{"id": e["id"], "area": e["area"]} for e in entries]}

    def _mine(self, feed: Feed, entries: list[Record]) -> list[Record]:
        return [e for e in entries if e.get("node") == feed.node and any(
            a in self.tree and self.tree.contains(a, e["area"]) for a in feed.areas)]

    async def send(self, bulletin: Record, entries: list[Record]) -> None:
        """A bulletin just stored: to each connected child that serves some of its communes
        (one not connected, or one this fails for, gets it when it reconnects)."""
        for feed in list(self.links.feeds):
            mine = self._mine(feed, entries)
            try:
                if mine:
                    feed.queue_text(await self.message(bulletin, mine))
            except Exception as e:  # noqa: BLE001 - stored: the child's next hello resends it
                log.warning("bulletin not sent down event=bulletin_down_failed node=%s id=%s "
                            "error=%s", feed.node, bulletin["id"], e)

    async def resend(self, feed: Feed) -> None:
        """After a child's hello: every bulletin it has not reported receiving. A failure
        (the store down) is logged; the link and what it carries go on."""
        try:
            waiting: dict[str, list[Record]] = {}
            for e in self._mine(feed, await self.store.find("inbox")):
                if not e.get("received"):
                    waiting.setdefault(e["bulletin"], []).append(e)
            for bid, entries in sorted(waiting.items(), key=lambda kv: kv[1][0]["created"]):
                b = await self.store.get("bulletin", bid)
                if b is not None:
                    feed.queue_text(await self.message(b, entries))
        except Exception as e:  # noqa: BLE001 - its next connection tries again
            log.warning("bulletins not resent event=bulletin_down_failed node=%s error=%s",
                        feed.node, e)

    async def media_for(self, key: Record, mid: str) -> Record:
        """A media record a child may fetch: one a bulletin to its communes plays."""
        bulletins = {e["bulletin"] for e in await self.store.find("inbox")
                     if e.get("node") == key["id"]}
        for bid in bulletins:
            b = await self.store.get("bulletin", bid)
            if b is not None and mid in (b.get("media_ids") or []):
                m = await self.store.get("media", mid)
                if m is not None:
                    return m
        raise BulletinRefused(say("bulletin.media_unknown"))

    async def report(self, key: Record, items: Any) -> tuple[list[Record], list[Record]]:
        """A child's report: (entries changed, refusals with their reasons). Only entries of
        the child's own communes, only forward: pending -> scheduled | declined | aired,
        scheduled -> aired; the same report again changes nothing."""
        if not isinstance(items, list) or len(items) > MAX_REPORT:
            raise BulletinRefused(say("bulletin.report_shape", limit=MAX_REPORT))
        changed, refused = [], []
        for item in items:
            try:
                entry, changes = await self._checked(key, item)
            except BulletinRefused as e:
                refused.append({"id": str(item.get("id"))[:64] if isinstance(item, dict)
                                else None, "error": str(e)})
                continue
            if changes:
                entry = await self.store.update("inbox", entry["id"], changes)
                if "order" in changes:
                    await inbox.apply_order(self.store, self.station.engine, entry["bulletin"])
                changed.append(entry)
        return changed, refused

    async def _checked(self, key: Record, item: Any) -> tuple[Record, Record]:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise BulletinRefused(say("bulletin.report_shape", limit=MAX_REPORT))
        entry = await self.store.get("inbox", item["id"])
        if entry is None or entry.get("node") != key["id"] or entry["area"] not in self.tree \
                or key["area"] not in self.tree \
                or not self.tree.contains(key["area"], entry["area"]):
            raise BulletinRefused(say("inbox.unknown"))
        state, order, reason = (item.get(k) for k in REPORTED)
        if state not in inbox.STATES or order not in inbox.ORDERS or not (
                reason is None or isinstance(reason, str) and 0 < len(reason)
                <= inbox.MAX_REASON):
            raise BulletinRefused(say("bulletin.report_shape", limit=MAX_REPORT))
        changes: Record = {} if entry.get("received") else {"received": time.time()}
        if state != entry["state"]:
            allowed = {"pending": ("scheduled", "declined", "aired"), "scheduled": ("aired",)}
            if state not in allowed.get(entry["state"], ()):
                raise BulletinRefused(say("inbox.not_pending", action=state,
                                          state=entry["state"]))
            if state == "declined" and not reason:
                raise BulletinRefused(say("inbox.reason", limit=inbox.MAX_REASON))
            changes.update(state=state, reason=reason, changed=time.time())
        if order != entry.get("order") and entry["class"] == "priority":
            changes["order"] = order
        return entry, changes


class ParentBulletins:
    """The child's end: bulletins from the parent into this node's inbox, and the commune's
    answers back up."""

    def __init__(self, url: str, key: str, areas: list[str], store: Store, tree: AreaTree,
                 library: MediaLibrary, notify: Callable[[Record], None],
                 down: Callable[[Record, list[Record]], Any] | None = None,
                 backoff_max: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.key = key
        self.areas = areas
        self.store = store
        self.tree = tree
        self.library = library
        self.notify = notify  # an entry stored or changed here
        self.down = down  # a middle node passes entries of a node below it on
        self.backoff_max = backoff_max
        self.counts = {"received": 0, "refused": 0, "reported": 0, "report_refused": 0}
        self._wake = asyncio.Event()
        self._busy: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._http: aiohttp.ClientSession | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Node {self.key}"}

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        self._spawn(self._report_loop())
        self._wake.set()  # what a previous run left unreported

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def wake(self, _entry: Record | None = None) -> None:
        self._wake.set()

    # ---- down: a bulletin message from the link --------------------------------------------
    def on_message(self, msg: dict[str, Any]) -> None:
        """From the link's reader: never waits (a fetch must not hold the parent's audio)."""
        b = msg.get("bulletin")
        bid = b.get("id") if isinstance(b, dict) else None
        if not isinstance(bid, str) or bid in self._busy:
            return
        self._busy.add(bid)
        self._spawn(self._receive(msg, bid))

    async def _receive(self, msg: dict[str, Any], bid: str) -> None:
        try:
            delay = 1.0
            while True:
                try:
                    await self.receive(msg)
                    return
                except (aiohttp.ClientError, OSError, TimeoutError, StoreUnavailable) as e:
                    if delay > RETRY_MAX:  # given up here: the next hello resends it
                        raise
                    log.warning("bulletin not received yet event=bulletin_retry id=%s "
                                "error=%s", bid[:64], e)
                    # A backoff between attempts, not a wait for a condition.
                    await asyncio.sleep(delay)
                    delay *= 2
        except (BulletinRefused, ValueError, KeyError, TypeError) as e:
            self.counts["refused"] += 1
            log.warning("bulletin from the parent refused event=bulletin_refused id=%s "
                        "error=%s", bid[:64], e)
        except (aiohttp.ClientError, OSError, TimeoutError, StoreUnavailable) as e:
            log.warning("bulletin not received, the parent resends it after a reconnect "
                        "event=bulletin_retry id=%s error=%s", bid[:64], e)
        except Exception:  # noqa: BLE001 - a parent's message must never stop this node
            self.counts["refused"] += 1
            log.exception("bulletin from the parent failed event=bulletin_refused id=%s",
                          bid[:64])
        finally:
            self._busy.discard(bid)

    async def receive(self, msg: dict[str, Any]) -> list[Record]:
        """Store the bulletin and its entries here (once: known ids are kept), fetching the
        media of a normal one first; then report them received."""
        b, items = msg["bulletin"], msg["entries"]
        bid, klass = str(b["id"]), inbox.check_class(str(b["class"]))
        codes = [str(e["area"]) for e in items]
        for code in codes:
            if code not in self.tree or not any(self.tree.contains(a, code) for a in self.areas):
                raise BulletinRefused(say("link.area_outside", area=code[:64],
                                          own=",".join(self.areas)))
        known = {e["id"] for e in await self.store.find("inbox", bulletin=bid)}
        fresh = [e for e in items if str(e["id"]) not in known]
        if not fresh:
            self.wake()
            return []
        sender = self._sender(b)
        stored = await self.store.get("bulletin", bid)
        if stored is None:
            prog = await self._programme(b, sender) if klass == "normal" else None
            stored = {"id": bid, "area": sender, "from": str(b["from"]), "user": "upstream",
                      "programme": prog["id"] if prog else None, "title": str(b["title"]),
                      "class": klass, "targets": codes, "created": float(b["created"]),
                      "broadcast": b.get("broadcast"), "emergency": b.get("emergency"),
                      "valid_until": float(b["valid_until"]) if b.get("valid_until") else None,
                      "upstream": self.url}
            await self.store.put("bulletin", stored)
        keys = await self.store.find("node_key")
        made = []
        for e in fresh:
            area = str(e["area"])
            rec = inbox.entries(stored, [area])[0]
            node = inbox.node_of(keys, self.tree, area)
            made.append({**rec, "id": str(e["id"]), "from": stored["from"], "upstream": True,
                         "reported": None, **({"node": node} if node else {})})
        await self.store.put_many("inbox", made)
        self.counts["received"] += 1
        log.info("bulletin from the parent event=bulletin_received id=%s class=%s communes=%d",
                 bid, klass, len(made))
        for e in made:
            self.notify(e)
        if self.down is not None:
            await self.down(stored, [e for e in made if e.get("node")])
        self.wake()
        return made

    def _sender(self, b: dict[str, Any]) -> str:
        """The sender as this tree knows it (itself, else its nearest ancestor here)."""
        path = [str(c) for c in b.get("from_path") or [b["from"]]]
        return next((c for c in reversed(path) if c in self.tree), self.tree.roots()[0].code)

    async def _programme(self, b: dict[str, Any], sender: str) -> Record:
        """The approved programme of a normal bulletin here, its media fetched from the
        parent and checked against their digests."""
        c = b["content"]
        kind = str(c.get("type"))
        ids = []
        for m in c.get("media") or []:
            ids.append(await self._fetch(m, sender, str(b["id"])))
        body: Record
        if kind == "relay" and isinstance(c.get("url"), str):
            body = {"type": "relay", "url": c["url"]}
        elif ids:
            body = {"type": "file", "media": ids[0]} if len(ids) == 1 else \
                {"type": "playlist", "items": ids}
        else:
            raise BulletinRefused(say("bulletin.no_content"))
        at = time.time()
        prog = {"id": f"{b['id']}-p"[:64], "title": str(c.get("title") or b["title"]), **body,
                "volume": int(c.get("volume", 100)), "repeat": int(c.get("repeat", 1)),
                "gap": float(c.get("gap", 0.0)), "duration": None, "area": sender,
                "owner": "upstream", "status": "approved", "approved_by": "upstream",
                "approved_at": at, "created": at, "bulletin": True}
        await self.store.put("programme", prog)
        return prog

    async def _fetch(self, m: dict[str, Any], sender: str, bid: str) -> str:
        assert self._http is not None
        sha = str(m["sha256"])
        have = await self.store.find("media", sha256=sha)
        if have:  # the same bytes are here already (an earlier bulletin): one record more
            rec = {**have[0], "id": f"{bid}-{str(m['id'])}"[:64], "area": sender,
                   "owner": "upstream", "bulletin": bid}
            await self.store.put("media", rec)
            return str(rec["id"])
        limit = self.library.settings.max_bytes
        async with self._http.get(self.url + MEDIA_PATH, params={"id": str(m["id"])},
                                  headers=self.headers) as r:
            if r.status != 200:
                raise BulletinRefused(say("bulletin.fetch_failed", status=r.status))
            data = bytearray()
            async for chunk in r.content.iter_chunked(1 << 16):
                data += chunk
                if len(data) > limit:
                    break
        if len(data) > limit or hashlib.sha256(data).hexdigest() != sha:
            raise BulletinRefused(say("bulletin.digest_mismatch"))
        tmp = self.library.temp_path(".audio")
        await asyncio.to_thread(tmp.write_bytes, bytes(data))
        rec = await self.library.ingest(tmp, title=str(m.get("title") or bid), area=sender,
                                        owner="upstream", filename="upstream",
                                        extra={"bulletin": bid})
        return str(rec["id"])

    # ---- up: the commune's answers ----------------------------------------------------------
    async def _report_loop(self) -> None:
        delay = 0.25
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.report_due()
                delay = 0.25
            except Exception as e:  # noqa: BLE001 - the network, the store, a parent's odd answer
                log.warning("inbox report not delivered event=inbox_report_retry error=%s", e)
                # A backoff between attempts, not a wait for a condition.
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
                self._wake.set()

    async def report_due(self) -> int:
        """Report every entry whose state the parent has not acknowledged; how many."""
        assert self._http is not None
        due = [e for e in await self.store.find("inbox")
               if e.get("upstream") and e.get("reported") != mark(e)]
        done = 0
        for i in range(0, len(due), MAX_REPORT):
            batch = due[i:i + MAX_REPORT]
            body = {"entries": [{"id": e["id"], **dict(zip(REPORTED, mark(e), strict=True))}
                                for e in batch]}
            async with self._http.post(self.url + REPORT_PATH, json=body,
                                       headers=self.headers) as r:
                answer = await r.json(content_type=None)
                if r.status != 200 or not isinstance(answer, dict):
                    raise BulletinRefused(str(answer.get("error") if isinstance(answer, dict)
                                              else r.status))
            for bad in answer.get("refused", []):  # the parent will not take it: not resent
                self.counts["report_refused"] += 1
                log.warning("inbox report refused event=inbox_report_refused id=%s error=%s",
                            bad.get("id"), bad.get("error"))
            for e in batch:
                await self.store.update("inbox", e["id"], {"reported": mark(e)})
            done += len(batch)
        self.counts["reported"] += done
        return done
