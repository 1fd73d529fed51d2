"""The exchange with the central source system (docs/exchange.md), composed from the node's
services: a bulletin received is checked, stored once per id, and handed to the machinery of
its class (`hand_off`); when it ends, a delivery report from the as-run log goes up; statistics
go up every `[exchange] stats_interval`. Messages up are stored in the outbox (relay/exchange.py)
first, so a peer may pull them and the push survives a restart."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from loa.relay.devices.protocol import DEVICE_KINDS
from loa.relay.exchange import Outbox, Poller
from loa.streamer import exchange as model
from loa.streamer import inbox
from loa.streamer.asrun import asrun_rows, counted_once, hours_per_area
from loa.streamer.broadcast import Broadcast
from loa.streamer.errors import LoaError
from loa.streamer.messages import say
from loa.streamer.state.store import Record, canon

if TYPE_CHECKING:
    from loa.web.node import Node

log = logging.getLogger("loa.exchange")
VERSION = 1
KIND = "exchange_in"
REVISE_S = 2.0  # a child's entries arriving together make one revised delivery report


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


class Refused(Exception):
    """A bulletin refused before anything was stored: HTTP status, bilingual text, field."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


class ExchangeService:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.settings = node.cfg.exchange
        self.outbox = Outbox(node.store, self.settings)
        self.poller = Poller(node.store, self.settings, self.receive_pulled)
        self._lock = asyncio.Lock()  # one bulletin at a time: a replay racing its first copy
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._revising: set[str] = set()  # broadcasts whose revised delivery report is due

    @property
    def max_bytes(self) -> int:
        return self.settings.attachment_mb * 1024 * 1024

    @property
    def body_limit(self) -> int:
        """A bulletin's JSON: one largest attachment in base64 and 1 MiB of the rest."""
        return self.max_bytes * 4 // 3 + 1024 * 1024

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.outbox.start()
        self.poller.start()
        self.node.engine.ended_listeners.append(self._on_end_thread)
        self.node.inbox_listeners.append(self._inbox_changed)
        if self.settings.stats_interval > 0 and self.settings.peers:
            self._spawn(self._statistics_loop())

    async def stop(self) -> None:
        if self._on_end_thread in self.node.engine.ended_listeners:
            self.node.engine.ended_listeners.remove(self._on_end_thread)
        if self._inbox_changed in self.node.inbox_listeners:
            self.node.inbox_listeners.remove(self._inbox_changed)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.poller.stop()
        await self.outbox.stop()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- bulletins down -------------------------------------------------------------------
    async def receive(self, peer: str, raw: bytes) -> tuple[int, Record]:
        """(201, answer) for a new bulletin on air; (200, the first answer) for a replay."""
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise Refused(400, say("http.malformed_json", error="JSON")) from None
        if not isinstance(data, dict):
            raise Refused(400, say("http.json_not_object"))
        try:
            bulletin = model.parse(data, self.node.tree, self.max_bytes)
        except model.BulletinError as e:
            raise Refused(422, str(e), e.field) from None
        key = f"{peer}:{bulletin.id}"
        digest = hashlib.sha256(canon(data).encode()).hexdigest()
        async with self._lock:
            known = await self.node.store.get(KIND, key)
            if known is not None:
                if known["digest"] != digest:
                    raise Refused(409, say("exchange.replay_differs"), "id")
                return 200, {**known["answer"], "duplicate": True}
            if bulletin.valid_until is not None and bulletin.valid_until <= time.time():
                raise Refused(422, say("exchange.expired"), "valid_until")
            if bulletin.type == "cancel":
                aired = {"areas": [], "ended": await self._end(peer, bulletin, "cancelled")}
                if not aired["ended"]:  # CAP: a Cancel of nothing known is refused
                    raise Refused(404, say("exchange.unknown_references"), "references")
            else:
                media = await self._audio(bulletin, peer)
                aired = await self.hand_off(bulletin, peer, media)
                # An update replaces: the new one is on air before the old ones end.
                aired["ended"] = await self._end(peer, bulletin, "updated")
            status = "cancelled" if bulletin.type == "cancel" else "accepted"
            answer: Record = {"id": bulletin.id, "status": status, "type": bulletin.type,
                              **({} if bulletin.type == "cancel" else {"class": bulletin.klass}),
                              "areas": aired["areas"],
                              "received": iso(time.time()),
                              **{k: aired[k] for k in ("broadcast", "emergency", "ended")
                                 if aired.get(k)}}
            await self.node.store.create(KIND, {
                "id": key, "peer": peer, "digest": digest, "received": time.time(),
                "broadcast": aired.get("broadcast"), "bulletin": bulletin.id,
                "inbox": aired.get("bulletin"), "class": bulletin.klass, "answer": answer})
        await self.outbox.put(peer, self._message("ack", f"ack:{bulletin.id}", {
            "bulletin": bulletin.id, "status": status, "areas": aired["areas"],
            **({"ended": aired["ended"]} if aired.get("ended") else {})}))
        log.info("bulletin %s event=exchange_bulletin peer=%s id=%s type=%s class=%s areas=%d "
                 "ended=%d", status, peer, bulletin.id[:128], bulletin.type, bulletin.klass,
                 len(aired["areas"]), len(aired.get("ended", ())))
        return 201, answer

    async def receive_pulled(self, peer: str, raw: bytes) -> None:
        """A bulletin read from the peer's feed: the same checks; a refusal becomes a refused
        `ack` message (the peer's only way to hear of it) and the feed moves on."""
        try:
            await self.receive(peer, raw)
        except Refused as e:
            data = json.loads(raw)
            bid = data.get("id") if isinstance(data, dict) else None
            log.warning("pulled bulletin refused event=exchange_refused peer=%s status=%d "
                        "field=%s", peer, e.status, e.field)
            if isinstance(bid, str) and model.ID.fullmatch(bid):
                await self.outbox.put(peer, self._message("ack", f"ack:{bid}", {
                    "bulletin": bid, "status": "refused", "error": str(e), "field": e.field}))

    async def _audio(self, b: model.Bulletin, peer: str) -> str | None:
        """The audio attachment as a library media id (checked against its digest), or None
        when the text is read instead."""
        att = b.audio
        if att is None:
            return None
        data = att.data
        if data is None:
            assert att.uri is not None
            fetch = self.node.emergency.fetch
            try:
                if fetch is None:
                    raise ValueError("no fetcher")
                data = await fetch(att.uri)
            except Exception as e:  # noqa: BLE001 - the sender's URI: refused, with why
                raise Refused(422, say("exchange.fetch_failed", error=str(e)[:200]),
                              "attachments") from None
            try:
                model.verify(att, data, "attachments")
            except model.BulletinError as e:
                raise Refused(422, str(e), e.field) from None
        library = self.node.library
        tmp = library.temp_path(".audio")
        await asyncio.to_thread(tmp.write_bytes, data)
        try:
            media = await library.ingest(tmp, title=b.title, area=self._root(), owner=peer,
                                         filename="exchange", extra={"bulletin": b.id})
        except ValueError as e:  # MediaError: not audio
            raise Refused(422, say("exchange.not_audio", error=e), "attachments") from None
        return str(media["id"])

    async def _end(self, peer: str, b: model.Bulletin, cause: str) -> list[str]:
        """End what the bulletins `b` references put on air (an emergency through the
        emergency service, a broadcast at once or before it starts); the ids known here."""
        known = []
        for ref in b.references:
            rec = await self.node.store.get(KIND, f"{peer}:{ref}")
            if rec is None:
                continue
            known.append(ref)
            if rec.get("ended_by"):
                continue
            eid = rec["answer"].get("emergency")
            if eid:
                await self.node.emergency.end(eid, cause, user=f"exchange:{peer}")
            elif rec.get("broadcast") and self.node.engine.live_broadcast(rec["broadcast"]):
                self.node.station.stop(rec["broadcast"], by_area=None, cause=cause)
            if rec.get("inbox"):
                await self._withdraw(str(rec["inbox"]), cause)
            await self.node.store.update(KIND, rec["id"], {"ended_by": b.id})
        return known

    async def _withdraw(self, bulletin_id: str, cause: str) -> None:
        """A cancelled or replaced bulletin leaves the communes' inboxes of this node: what
        waits there or is scheduled (its schedule removed) turns `cancelled`; what aired or was
        declined stays as it was."""
        store = self.node.store
        for e in await store.find("inbox", bulletin=bulletin_id):
            if e["state"] not in ("pending", "scheduled") or e.get("node"):
                continue  # a child node's entry: its node answers for it
            if e.get("schedule"):
                await store.delete("schedule", str(e["schedule"]))
            e = await store.update("inbox", e["id"], {"state": "cancelled", "reason": cause,
                                                      "changed": time.time()})
            self.node.inbox_changed(e)

    def _root(self) -> str:
        return self.node.tree.roots()[0].code

    async def hand_off(self, b: model.Bulletin, peer: str, media: str | None) -> Record:
        """Hand a bulletin to the TT 39 inbox with the province root's authority (its text read
        by TTS when no audio): `normal` waits in each target commune's inbox until the commune
        schedules or declines it (reported up as they answer), `priority` airs at once (from
        `valid_from` when later) and each commune orders a clash, `emergency` airs at once
        through the emergency service."""
        node, root, user = self.node, self._root(), f"exchange:{peer}"
        if media is not None:
            rec = await node.store.get("media", media)
            assert rec is not None
            prog = inbox.media_programme(b.title, root, user, media=rec)
        else:
            prog = inbox.media_programme(b.title, root, user, text=b.text)
        bulletin = inbox.new_bulletin(root, user, prog, b.klass, b.targets, text=b.text,
                                      valid_until=b.valid_until,
                                      exchange={"peer": peer, "id": b.id})
        now = time.time()
        start = b.valid_from if b.valid_from is not None and b.valid_from > now else None
        try:
            entries = await inbox.deliver(node.store, node.station, node.tree, bulletin, prog,
                                          emergency=node.emergency, start=start,
                                          expires=b.valid_until)
        except LoaError as err:
            raise Refused(422, str(err), err.field) from None
        await node.downlink.send(bulletin, entries)
        for e in entries:
            node.inbox_changed(e)
        bid = bulletin.get("broadcast")
        return {"bulletin": bulletin["id"], "areas": [e["area"] for e in entries],
                **({"broadcast": bid} if bid else {}),
                **({"emergency": bulletin["emergency"]} if bulletin.get("emergency") else {})}

    def _inbox_changed(self, entry: Record) -> None:
        """A commune answered a normal bulletin from the central system: report it up."""
        if entry.get("class") == "normal" and self._loop is not None:
            self._spawn(self.communes_report(str(entry["bulletin"])))

    async def _communes(self, bulletin_id: str) -> list[Record]:
        tree = self.node.tree
        return [{"code": e["area"], "name": tree.get(e["area"]).name if e["area"] in tree
                 else e["area"], "state": e["state"], "reason": e.get("reason"),
                 "at": iso(e["changed"]) if e.get("changed") else None}
                for e in sorted(await self.node.store.find("inbox", bulletin=bulletin_id),
                                key=lambda e: e["area"])]

    async def communes_report(self, bulletin_id: str) -> Record | None:
        """The `delivery` report of a normal bulletin: what each commune did (pending,
        scheduled, declined with its reason, aired, and when). One message per distinct set of
        answers (ids carry their digest: a replay stores nothing twice); the last, when every
        commune has declined or aired it, is `delivery:<id>` with status `complete`."""
        b = await self.node.store.get("bulletin", bulletin_id)
        ext = (b or {}).get("exchange")
        if not ext:
            return None
        communes = await self._communes(bulletin_id)
        if all(c["state"] == "pending" for c in communes):
            return None  # nobody has answered yet: the ack said as much
        complete = all(c["state"] in inbox.FINAL for c in communes)
        digest = hashlib.sha256(canon(communes).encode()).hexdigest()[:12]
        mid = f"delivery:{ext['id']}" + ("" if complete else f":{digest}")
        return await self.outbox.put(ext["peer"], self._message("delivery", mid, {
            "bulletin": ext["id"], "class": "normal",
            "status": "complete" if complete else "partial", "communes": communes}))

    # ---- reports up ------------------------------------------------------------------------
    def _message(self, kind: str, mid: str, body: Record) -> Record:
        return {"id": mid, "type": kind, "version": VERSION, "sender": self.node.node_id,
                "sent": iso(time.time()), **body}

    def _on_end_thread(self, b: Broadcast, cause: str) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._spawn, self.report(b.id, cause))

    async def report(self, bid: str, cause: str) -> Record | None:
        """The delivery report of the bulletin that aired as broadcast `bid`, from the as-run
        log (areas, when, how long) and the devices (loudspeakers there, online, acked)."""
        found = await self.node.store.find(KIND, broadcast=bid)
        if not found:
            return None
        rec = found[0]
        revision = int(rec.get("reported") or 0) + 1
        await self.node.station.flush()  # the as-run entries of its last segments
        rows = counted_once(await self.node.store.read_log("asrun", broadcast=bid,
                                                           limit=100_000))
        areas: dict[str, Record] = {}
        tree = self.node.tree
        for r in rows:
            a = areas.setdefault(r["area"], {"code": r["area"], "start": r["start"],
                                             "end": r["end"], "seconds": 0.0})
            a.update(start=min(a["start"], r["start"]), end=max(a["end"], r["end"]),
                     seconds=round(a["seconds"] + float(r.get("seconds") or 0), 3))
        reached = [{**a, "name": tree.get(a["code"]).name if a["code"] in tree else a["code"],
                    "start": iso(a["start"]), "end": iso(a["end"])}
                   for a in sorted(areas.values(), key=lambda a: (a["start"], a["code"]))]
        leaves = {a["code"] for a in reached if a["code"] in tree
                  and not tree.get(a["code"]).children}
        speakers = [d for d in self.node.devices.find(leaves, kind="loudspeaker")
                    if not d.record.get("revoked")]
        below = [d for d in await self.node.store.find("node_device", kind="loudspeaker")
                 if d.get("area") in leaves]  # those child nodes reported
        eid = rec["answer"].get("emergency")
        proofs = await self.node.delivery.proofs(eid) if eid else None  # durable, any node
        communes = await self._communes(rec["inbox"]) if rec.get("inbox") else []
        # A child node's entries may arrive after the end (an outage): each later arrival
        # sends the whole report again as a new revision, under its own id.
        mid = f"delivery:{rec['bulletin']}" + (f":{revision}" if revision > 1 else "")
        message = self._message("delivery", mid, {
            "bulletin": rec["bulletin"], "class": rec["class"], "revision": revision,
            "status": "aired" if reached else "not_aired", "end_cause": cause,
            "areas": reached, "communes": communes, "loudspeakers": {
                "total": len(speakers) + len(below),
                "online": sum(d.status != "offline" for d in speakers)
                + sum(d.get("status") != "offline" for d in below),
                "acked": None if proofs is None else sum(
                    bool((proofs.get(d.id) or {}).get("acked")) for d in speakers),
                "played": None if proofs is None else sum(
                    bool((proofs.get(d.id) or {}).get("played")) for d in speakers)}})
        out = await self.outbox.put(rec["peer"], message)
        await self.node.store.update(KIND, rec["id"], {"reported": revision, "end_cause": cause})
        return out

    async def child_report(self, kind: str, entry: Record) -> None:
        """A child node's as-run entry was stored here (relay/uplink.py): when its broadcast is
        a bulletin already reported, a revision follows (one per burst of arrivals)."""
        bid = entry.get("broadcast")
        if kind != "asrun" or not isinstance(bid, str) or bid in self._revising:
            return
        found = await self.node.store.find(KIND, broadcast=bid)
        if not found or not found[0].get("reported"):
            return  # not a bulletin, or its end's report will hold the entry
        self._revising.add(bid)
        cause = found[0].get("end_cause")
        asyncio.get_running_loop().call_later(
            REVISE_S, lambda: self._spawn(self._revise(bid, cause)))

    async def _revise(self, bid: str, cause: str | None) -> None:
        self._revising.discard(bid)
        await self.report(bid, cause or "ended")

    async def statistics(self, until: float | None = None) -> list[Record]:
        """One statistics message per peer for the last interval: stations (leaf areas),
        devices online per kind, hours aired per area and class."""
        until = time.time() if until is None else until
        since = until - (self.settings.stats_interval or 3600.0)
        rows = await asrun_rows(self.node.store, since, until)
        devices = {k: {"total": 0, "online": 0} for k in DEVICE_KINDS}
        for d in self.node.devices.find():
            c = devices.get(d.record.get("kind", ""))
            if c is not None and not d.record.get("revoked"):
                c["total"] += 1
                c["online"] += d.status != "offline"
        for r in await self.node.store.find("node_device"):  # those of the child nodes
            c = devices.get(r.get("kind", ""))
            if c is not None:
                c["total"] += 1
                c["online"] += r.get("status") != "offline"
        body = {"period": {"from": iso(since), "to": iso(until)},
                "stations": len(self.node.tree.resolve_leaves([self._root()])),
                "devices": devices, "hours": hours_per_area(counted_once(rows), since, until)}
        mid = f"statistics:{self.node.node_id[:32]}:{int(until)}"
        return [await self.outbox.put(peer, self._message("statistics", mid, body))
                for peer in self.settings.peer_names()]

    async def _statistics_loop(self) -> None:
        loop = asyncio.get_running_loop()
        every = self.settings.stats_interval
        deadline = loop.time() + every
        while True:
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            deadline += every  # absolute deadlines: no drift over days
            try:
                await self.statistics()
            except Exception:  # noqa: BLE001 - logged; the next interval tries again
                log.exception("statistics not stored event=exchange_statistics_failed")
