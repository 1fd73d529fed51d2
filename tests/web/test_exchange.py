"""The exchange with the central source system (docs/exchange.md): a stand-in central system (an
aiohttp server started here) pushes signed bulletins to a node on a real port (virtual clock),
and receives the node's signed acknowledgements and delivery reports on its webhook."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from loa.streamer.clock import FRAME, tick_of
from loa.streamer.schedule import DEFAULT_TZ, ZoneInfo
from loa.web.config import Config
from tests.apiclient import tone_file
from tests.emergencynode import Srv, live_config, serving

SECRET = "bi-mat-trung-uong-0123456789"
PEER = "central"
H1_LEAVES = {"T01-H1-X1", "T01-H1-X2", "T01-H1-X3"}
WAIT = 20.0


def sign(method: str, path: str, body: bytes, ts: float | None = None,
         secret: str = SECRET) -> dict[str, str]:
    """Signed the way docs/exchange.md says, written out here (not the product's helper)."""
    stamp = str(int(time.time() if ts is None else ts))
    mac = hmac.new(secret.encode(), f"{stamp}\n{method}\n{path}\n".encode() + body,
                   hashlib.sha256).hexdigest()
    return {"X-Loa-Peer": PEER, "X-Loa-Timestamp": stamp, "X-Loa-Signature": f"sha256={mac}"}


@dataclass
class Central:
    """The stand-in central system: its webhook refuses the first push (503) to make the node
    retry, then keeps each message once by id, after checking its signature."""
    url: str = ""
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)
    pushes: int = 0
    bad_signatures: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    feed: list[dict[str, Any]] = field(default_factory=list)  # bulletins the node may pull
    polls: list[tuple[str | None, str | None]] = field(default_factory=list)  # since, etag
    served: int = 0  # pages with bulletins
    down: bool = False  # the webhook answers 503 to everything

    async def bulletins(self, request: web.Request) -> web.Response:
        """The central's bulletin feed. It ignores `since` and sends no ETag twice, so the node
        reads the same page twice (and must air it once), then answers 304 to its ETag."""
        expected = sign("GET", request.path_qs, b"", float(request.headers["X-Loa-Timestamp"]))
        if expected["X-Loa-Signature"] != request.headers.get("X-Loa-Signature"):
            return web.Response(status=401)
        match = request.headers.get("If-None-Match")
        self.polls.append((request.query.get("since"), match))
        tag = f'"{len(self.feed)}"'
        if match == tag:
            return web.Response(status=304)
        self.served += bool(self.feed)
        return web.json_response({"bulletins": self.feed, "cursor": str(len(self.feed))},
                                 headers={"ETag": tag} if self.served > 2 else {})

    async def webhook(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.pushes += 1
        expected = sign("POST", request.path, raw, float(request.headers["X-Loa-Timestamp"]))
        if not hmac.compare_digest(expected["X-Loa-Signature"],
                                   request.headers.get("X-Loa-Signature", "")):
            self.bad_signatures += 1
            return web.Response(status=401)
        if self.pushes == 1 or self.down:
            return web.Response(status=503)
        msg = json.loads(raw)
        self.messages.setdefault(msg["id"], msg)
        self.arrived.set()
        return web.Response(status=204)

    async def message(self, mid: str) -> dict[str, Any]:
        async with asyncio.timeout(WAIT):
            while mid not in self.messages:
                self.arrived.clear()
                await self.arrived.wait()
        return self.messages[mid]


@pytest.fixture
async def central() -> AsyncIterator[Central]:
    c = Central()
    app = web.Application()
    app.router.add_post("/webhook", c.webhook)
    app.router.add_get("/bulletins", c.bulletins)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    c.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield c
    await runner.cleanup()


def exchange_config(tmp_path: Path, central: Central) -> Config:
    cfg = live_config(tmp_path)
    cfg.exchange.peers = [f"{PEER}={SECRET}"]
    cfg.exchange.push = [f"{PEER}={central.url}/webhook"]
    cfg.exchange.pull = [f"{PEER}={central.url}/bulletins"]
    cfg.exchange.pull_interval = 0.05
    cfg.exchange.retry_min = 0.05
    cfg.exchange.stats_interval = 0
    cfg.exchange.__post_init__()
    return cfg


@pytest.fixture
async def srv(tmp_path: Path, central: Central) -> AsyncIterator[Srv]:
    async with serving(exchange_config(tmp_path, central)) as s:
        yield s


def bulletin(bid: str, klass: str = "priority", targets: list[str] | None = None,
             **extra: Any) -> dict[str, Any]:
    return {"id": bid, "sender": "ttcs@mic.gov.vn", "sent": "2026-12-07T08:00:00+07:00",
            "class": klass, "title": f"Bản tin {bid}", "text": "Thông báo lịch tiêm chủng.",
            "targets": targets or ["T01-H1"], **extra}


async def push(srv: Srv, body: dict[str, Any] | bytes, **sign_kw: Any) -> tuple[int, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    path = "/api/exchange/v1/bulletins"
    headers = {"Content-Type": "application/json", **sign("POST", path, raw, **sign_kw)}
    return await srv.call(None, "POST", path, data=raw, headers=headers)


async def pull(srv: Srv, query: str = "", etag: str | None = None) -> tuple[int, Any, str]:
    path = "/api/exchange/v1/messages" + query
    headers = sign("GET", path, b"")
    if etag:
        headers["If-None-Match"] = etag
    async with srv.http.get(srv.base + path, headers=headers) as r:
        body = await r.json() if r.status == 200 else None
        return r.status, body, r.headers.get("ETag", "")


async def counts(srv: Srv) -> dict[str, int]:
    store = srv.node.store
    return {k: await store.count(k) for k in ("exchange_in", "broadcast", "media", "emergency")}


def on_air(srv: Srv) -> dict[str, Any]:
    return {a: srv.node.engine.on_air(a)["broadcast"] for a in srv.node.tree.subtree("T01")}


async def test_pushed_bulletin_airs_and_the_signed_delivery_report_names_the_areas(
        srv: Srv, central: Central):
    status, answer = await push(srv, bulletin("B-1"))
    assert status == 201, answer
    assert set(answer["areas"]) == H1_LEAVES and answer["class"] == "priority"
    srv.run(0.1)
    for area in H1_LEAVES:  # the right class, with the province root's authority
        now = srv.node.engine.on_air(area)
        assert now["broadcast"] == answer["broadcast"], now
        assert now["class"] == "priority" and now["issuer"] == "T01", now
    for area in ("T01-H2-X1", "T01-H2-X2"):
        assert srv.node.engine.on_air(area)["broadcast"] is None
    ack = await central.message("ack:B-1")
    assert ack["bulletin"] == "B-1" and set(ack["areas"]) == H1_LEAVES
    srv.run(10)  # the spoken bulletin ends
    report = await central.message("delivery:B-1")
    assert report["status"] == "aired" and report["class"] == "priority"
    reached = {a["code"] for a in report["areas"]}
    assert H1_LEAVES <= reached and not reached & {"T01-H2-X1", "T01-H2-X2", "T01-H2-X3"}
    x1 = next(a for a in report["areas"] if a["code"] == "T01-H1-X1")
    assert x1["name"] == "Xã 1 huyện 1" and 0.5 < x1["seconds"] < 10, x1
    assert report["loudspeakers"] == {"total": 0, "online": 0, "acked": None, "played": None}
    # What each commune's inbox says: a priority bulletin aired in all, in the default order.
    assert {(c["code"], c["state"]) for c in report["communes"]} == {
        (code, "aired") for code in H1_LEAVES}
    assert central.pushes >= 3 and central.bad_signatures == 0  # the first push was retried
    async with asyncio.timeout(WAIT):  # the outbox marks it once the webhook answered
        while (rec := await srv.node.store.get("exchange_out", f"{PEER}:delivery:B-1")
               )["push"] != "delivered":
            await asyncio.sleep(0.01)
    assert rec["attempts"] == 0


async def test_emergency_bulletin_airs_at_once_through_the_emergency_service(
        srv: Srv, central: Central, tmp_path: Path):
    wav = tone_file(tmp_path / "canh-bao.wav", 700, 2)
    data = wav.read_bytes()
    body = bulletin("E-1", "emergency", ["T01-H2-X1"], text=None, attachments=[{
        "mime": "audio/wav", "sha256": hashlib.sha256(data).hexdigest(),
        "data": base64.b64encode(data).decode()}])
    status, answer = await push(srv, body)
    assert status == 201, answer
    srv.run(0.1)
    now = srv.node.engine.on_air("T01-H2-X1")
    assert now["class"] == "emergency" and now["issuer"] == "T01", now
    assert srv.node.engine.on_air("T01-H2-X2")["broadcast"] is None
    rec = await srv.node.store.get("emergency", answer["emergency"])
    assert rec["user"] == f"exchange:{PEER}" and rec["spec"]["content"].get("media")


async def test_a_normal_bulletin_waits_in_the_communes_inboxes_and_the_report_names_answers(
        srv: Srv, central: Central):
    status, answer = await push(srv, bulletin("N-1", "normal", ["T01-H1-X1", "T01-H1-X2"]))
    assert status == 201 and "broadcast" not in answer, answer
    assert sorted(answer["areas"]) == ["T01-H1-X1", "T01-H1-X2"]
    srv.run(1)
    assert await srv.node.store.count("broadcast") == 0  # not straight to air
    status, box = await srv.call("xa11", "GET", "/api/v1/inbox")
    (e1,) = box["entries"]
    assert (e1["from"], e1["class"], e1["title"], e1["state"]) == (
        "T01", "normal", "Bản tin N-1", "pending")
    status, box = await srv.call("xa12", "GET", "/api/v1/inbox")
    (e2,) = box["entries"]
    status, out = await srv.call("xa12", "POST", f"/api/v1/inbox/{e2['id']}/decline",
                                 json={"reason": "Xã đang có bão, ưu tiên tin khẩn"})
    assert status == 200, out
    # X1 schedules it: the scheduler starts it (virtual clock), the entry turns aired.
    at = math.ceil(time.time()) + 5
    local = dt.datetime.fromtimestamp(at, ZoneInfo(DEFAULT_TZ))
    status, out = await srv.call("xa11", "POST", f"/api/v1/inbox/{e1['id']}/schedule", json={
        "date": local.date().isoformat(), "time": local.strftime("%H:%M:%S")})
    assert status == 200 and out["state"] == "scheduled", out
    node = srv.node
    (bid,) = await node.scheduler.run_once(at - 3, await node.store.find("schedule"))
    assert srv.clock is not None
    start = tick_of(at - node.station.media_epoch)
    srv.clock.run(start + 10 - srv.clock.n)
    # At the scheduled sample, the text read by TTS, in X1 only.
    assert [(c.sample, c.cause) for c in node.engine.changes if c.after == bid] == [
        (start * FRAME, "start")]
    report = await central.message("delivery:N-1")  # every commune has answered: complete
    assert report["status"] == "complete" and report["class"] == "normal", report
    assert [(c["code"], c["state"], c["reason"]) for c in report["communes"]] == [
        ("T01-H1-X1", "aired", None),
        ("T01-H1-X2", "declined", "Xã đang có bão, ưu tiên tin khẩn")]
    assert all(c["at"] for c in report["communes"])
    # ... after partial reports as they answered (each once, by its own id).
    partial = [m for mid, m in central.messages.items() if mid.startswith("delivery:N-1:")]
    assert partial and all(m["status"] == "partial" for m in partial)


async def test_a_normal_bulletin_is_scheduled_within_its_validity_or_not_at_all(
        srv: Srv, central: Central):
    until = dt.datetime.now(ZoneInfo(DEFAULT_TZ)).replace(microsecond=0) + dt.timedelta(
        minutes=10)
    status, answer = await push(srv, bulletin("V-1", "normal", ["T01-H1-X1"],
                                              valid_until=until.isoformat()))
    assert status == 201, answer
    (entry,) = (await srv.call("xa11", "GET", "/api/v1/inbox"))[1]["entries"]
    late = until + dt.timedelta(days=1)
    status, out = await srv.call("xa11", "POST", f"/api/v1/inbox/{entry['id']}/schedule", json={
        "date": late.date().isoformat(), "time": late.strftime("%H:%M")})
    assert status == 422 and out["field"] == "date", out
    assert until.strftime("%H:%M %d/%m/%Y") in out["error"]
    assert await srv.node.store.count("schedule") == 0
    soon = until - dt.timedelta(minutes=5)
    status, out = await srv.call("xa11", "POST", f"/api/v1/inbox/{entry['id']}/schedule", json={
        "date": soon.date().isoformat(), "time": soon.strftime("%H:%M:%S")})
    assert status == 200 and out["state"] == "scheduled", out


async def test_replayed_bulletin_is_deduplicated(srv: Srv, central: Central):
    status, first = await push(srv, bulletin("B-2", "normal"))
    assert status == 201, first
    before = await counts(srv)
    status, again = await push(srv, bulletin("B-2", "normal"))
    assert status == 200 and again == {**first, "duplicate": True}
    assert await counts(srv) == before
    assert await srv.node.store.count("inbox") == 3  # one entry per commune, once
    status, out = await push(srv, bulletin("B-2", "normal", text="Nội dung khác."))
    assert status == 409 and out["field"] == "id", out
    assert await counts(srv) == before
    path = "/api/exchange/v1/bulletins/B-2"
    status, got = await srv.call(None, "GET", path, headers=sign("GET", path, b""))
    assert status == 200 and got == first


@pytest.mark.parametrize("case", ["bad_signature", "stale", "unsigned", "digest", "area",
                                  "expired"])
async def test_refused_bulletins_store_nothing_and_change_nothing_on_air(
        srv: Srv, central: Central, case: str):
    data = b"RIFF-not-really-audio"
    body = bulletin("R-1")
    kw: dict[str, Any] = {}
    if case == "bad_signature":
        kw["secret"] = "sai-bi-mat"
    elif case == "stale":
        kw["ts"] = time.time() - 3600
    elif case == "digest":
        body.update(text=None, attachments=[{"mime": "audio/wav", "sha256": "0" * 64,
                                             "data": base64.b64encode(data).decode()}])
    elif case == "area":
        body["targets"] = ["T01-H1", "T99-KHONG-CO"]
    elif case == "expired":
        body["valid_until"] = "2020-01-01T00:00:00+07:00"
    srv.run(0.1)
    before, air = await counts(srv), on_air(srv)
    if case == "unsigned":
        status, out = await srv.call(None, "POST", "/api/exchange/v1/bulletins", json=body)
    else:
        status, out = await push(srv, body, **kw)
    expected = {"bad_signature": (401, None), "stale": (401, None), "unsigned": (401, None),
                "digest": (422, "attachments[0].sha256"), "area": (422, "targets"),
                "expired": (422, "valid_until")}[case]
    assert (status, out.get("field")) == expected, out
    assert " / " in out["error"] and SECRET not in json.dumps(out)
    srv.run(0.1)
    assert await counts(srv) == before and on_air(srv) == air
    if status == 401:  # audited as a refusal, without the signature or the secret
        audit = await srv.node.store.read_log("audit", limit=1000)
        refused = [e for e in audit if e["action"] == "refused"]
        assert refused and refused[-1]["details"]["status"] == 401
        assert SECRET not in json.dumps(audit)


async def test_pull_with_since_cursor_and_etag(srv: Srv, central: Central):
    status, _ = await push(srv, bulletin("P-1", "normal"))
    assert status == 201
    status, page, etag = await pull(srv)
    assert status == 200 and [m["id"] for m in page["messages"]] == ["ack:P-1"], page
    assert page["messages"][0]["type"] == "ack" and etag
    status, _, _ = await pull(srv, "", etag)
    assert status == 304  # the same page again
    cursor = page["cursor"]
    status, empty, etag2 = await pull(srv, f"?since={cursor}")
    assert status == 200 and empty["messages"] == [] and empty["cursor"] == cursor
    status, _, _ = await pull(srv, f"?since={cursor}", etag2)
    assert status == 304  # nothing new
    status, _ = await push(srv, bulletin("P-2", "normal"))
    assert status == 201
    status, page2, _ = await pull(srv, f"?since={cursor}", etag2)
    assert status == 200 and [m["id"] for m in page2["messages"]] == ["ack:P-2"]
    stats = await srv.node.exchange.statistics()
    assert stats[0]["message"]["stations"] == 6
    status, page3, _ = await pull(srv, f"?since={page2['cursor']}&type=statistics")
    assert status == 200 and page3["messages"][0]["devices"]["loudspeaker"]["total"] == 0
    path = "/api/exchange/v1/messages"
    status, out = await srv.call(None, "GET", path, headers=sign("GET", path, b"",
                                                                 secret="sai"))
    assert status == 401, out


async def test_bulletins_pulled_from_the_central_feed_air_once(srv: Srv, central: Central):
    central.feed += [bulletin("F-1", "normal", ["T01-H2"]),
                     bulletin("F-BAD", "normal", ["T99-KHONG-CO"])]
    async with asyncio.timeout(WAIT):  # read twice without an ETag, then 304 to it
        while ("2", '"2"') not in central.polls:
            await asyncio.sleep(0.02)
    srv.run(0.1)
    got = await srv.node.store.get("exchange_in", f"{PEER}:F-1")
    assert got is not None and await srv.node.store.count("exchange_in") == 1
    # Normal: in the communes' inboxes, once, until they schedule it; nothing on air.
    entries = await srv.node.store.find("inbox", bulletin=got["inbox"])
    assert sorted((e["area"], e["state"]) for e in entries) == [
        ("T01-H2-X1", "pending"), ("T01-H2-X2", "pending"), ("T01-H2-X3", "pending")]
    assert await srv.node.store.count("broadcast") == 0
    refused = await central.message("ack:F-BAD")  # the central hears of the refusal
    assert refused["status"] == "refused" and refused["field"] == "targets", refused
    assert central.polls[0][0] is None and central.polls[-1][0] == "2"  # the cursor, kept
    assert (await srv.node.store.get("exchange_cursor", PEER))["cursor"] == "2"


async def test_a_restart_loses_no_message_of_the_outbox(tmp_path: Path, central: Central):
    central.down = True
    cfg = exchange_config(tmp_path, central)
    async with serving(cfg) as first:
        status, _ = await push(first, bulletin("O-1", "normal"))
        assert status == 201
        async with asyncio.timeout(WAIT):  # refused at least twice, retried with backoff
            while (await first.node.store.get("exchange_out", f"{PEER}:ack:O-1")
                   )["attempts"] < 2:
                await asyncio.sleep(0.02)
    central.down = False
    async with serving(cfg) as second:
        ack = await central.message("ack:O-1")
        assert ack["bulletin"] == "O-1"
        status, again = await push(second, bulletin("O-1", "normal"))  # still deduplicated
        assert status == 200 and again["duplicate"] is True


async def test_exchange_openapi_documents_exactly_its_routes(srv: Srv):
    status, doc = await srv.call(None, "GET", "/api/exchange/v1/openapi.json")
    assert status == 200
    documented = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    routed = {(r.method, r.resource.canonical) for r in srv.app.router.routes()
              if r.resource is not None and r.resource.canonical.startswith("/api/exchange/")
              and r.method in ("GET", "POST")}
    assert documented == routed


async def test_validity_ends_the_bulletin_on_the_media_clock_across_a_restart(
        tmp_path: Path, central: Central):
    """`valid_until` ends an airing bulletin (end cause `expired`) even when the node restarted
    in between: the end is stored with the broadcast, not held in a timer of the process."""
    wav = tone_file(tmp_path / "dai.wav", 600, 30)  # longer than its validity
    data = wav.read_bytes()
    until = time.time() + 8
    body = bulletin("V-1", "priority", ["T01-H2-X1"], text=None,
                    valid_until=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(until)),
                    attachments=[{"mime": "audio/wav", "sha256": hashlib.sha256(data).hexdigest(),
                                  "data": base64.b64encode(data).decode()}])
    cfg = exchange_config(tmp_path, central)
    async with serving(cfg) as first:
        status, answer = await push(first, body)
        assert status == 201, answer
        first.run(1)
        assert first.node.engine.on_air("T01-H2-X1")["broadcast"] == answer["broadcast"]
    async with serving(cfg) as second:
        second.run(0.2)  # restored at its offset, with its end
        assert second.node.engine.on_air("T01-H2-X1")["broadcast"] == answer["broadcast"]
        left = int(until) - time.time()
        second.run(max(0.0, left - 1))
        assert second.node.engine.on_air("T01-H2-X1")["broadcast"] == answer["broadcast"]
        second.run(1.2)
        assert second.node.engine.on_air("T01-H2-X1")["broadcast"] is None
        report = await central.message("delivery:V-1")
        assert report["end_cause"] == "expired" and report["status"] == "aired", report
        rec = await second.node.store.get("broadcast", answer["broadcast"])
        assert rec["end_cause"] == "expired" and rec["until"] == int(until), rec


async def test_a_stranger_is_refused_before_its_body_is_read(srv: Srv, central: Central):
    """Unsigned or signed by an unknown peer: 401 as soon as the headers are in, while the
    announced 10 MB body has not been sent at all (a stranger cannot make the node read it)."""
    host, port = srv.base.removeprefix("http://").split(":")
    for headers in ({}, {"X-Loa-Peer": "ai-do", "X-Loa-Timestamp": str(int(time.time())),
                         "X-Loa-Signature": "sha256=00"}):
        reader, writer = await asyncio.open_connection(host, int(port))
        lines = ["POST /api/exchange/v1/bulletins HTTP/1.1", f"Host: {host}",
                 "Content-Type: application/json", "Content-Length: 10000000",
                 *(f"{k}: {v}" for k, v in headers.items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), WAIT)  # hang guard, not a timing
        assert status.startswith(b"HTTP/1.1 401"), status
        writer.close()
    assert await counts(srv) == {"exchange_in": 0, "broadcast": 0, "media": 0, "emergency": 0}


async def test_the_outbox_prunes_what_was_pushed_or_left_to_pull_long_ago(
        srv: Srv, central: Central):
    """`keep_days` after it was written a message that needs nothing more is deleted; one still
    to be pushed is kept however old (a webhook down for months loses nothing)."""
    outbox = srv.node.exchange.outbox
    store = srv.node.store
    day = 86400.0
    old = time.time() - 100 * day  # keep_days defaults to 90
    for mid, push_state in (("old-delivered", "delivered"), ("old-pull", "pull"),
                            ("old-pending", "pending"), ("new-delivered", "delivered")):
        await store.create("exchange_out", {
            "id": f"{PEER}:{mid}", "peer": PEER, "type": "ack", "message": {"id": mid},
            "created": old if mid.startswith("old") else time.time(), "push": push_state,
            "attempts": 0, "next_try": time.time() + day})
    assert await outbox.prune() == 2
    left = {r["id"] for r in await store.find("exchange_out")}
    assert {f"{PEER}:old-pending", f"{PEER}:new-delivered"} <= left
    assert not left & {f"{PEER}:old-delivered", f"{PEER}:old-pull"}


async def test_an_update_replaces_and_a_cancel_ends_what_was_on_air(srv: Srv, central: Central):
    """CAP's msgType: an update airs in place of the bulletins it references (the new one on
    air before the old ones end), a cancel ends them (emergencies through the emergency
    service), a cancel of nothing known is 404 with nothing stored."""
    status, first = await push(srv, bulletin("U-1", "priority", ["T01-H2"], text="Bản cũ. " * 40))
    assert status == 201, first
    srv.run(0.2)
    assert srv.node.engine.on_air("T01-H2-X1")["broadcast"] == first["broadcast"]
    status, upd = await push(srv, bulletin("U-2", "priority", ["T01-H2"], text="Bản mới. " * 40,
                                           type="update", references=["U-1"]))
    assert status == 201 and upd["ended"] == ["U-1"] and upd["type"] == "update", upd
    srv.run(0.2)
    for area in ("T01-H2-X1", "T01-H2-X2", "T01-H2-X3"):
        assert srv.node.engine.on_air(area)["broadcast"] == upd["broadcast"]
    await srv.node.station.flush()  # broadcast records are written through the station's queue
    old = await srv.node.store.get("broadcast", first["broadcast"])
    assert old["status"] == "ended" and old["end_cause"] == "updated", old
    report = await central.message("delivery:U-1")
    assert report["end_cause"] == "updated"

    status, emerg = await push(srv, bulletin("U-3", "emergency", ["T01-H1-X1"]))
    assert status == 201, emerg
    srv.run(0.2)
    assert srv.node.engine.on_air("T01-H1-X1")["class"] == "emergency"
    cancel = {"id": "U-4", "sender": "ttcs@mic.gov.vn", "sent": "2026-12-07T09:00:00+07:00",
              "type": "cancel", "references": ["U-2", "U-3", "KHONG-CO"]}
    status, out = await push(srv, cancel)
    assert status == 201 and out["status"] == "cancelled", out
    assert out["ended"] == ["U-2", "U-3"] and "class" not in out
    srv.run(0.2)
    for area in ("T01-H1-X1", "T01-H2-X1"):
        assert srv.node.engine.on_air(area)["broadcast"] is None, area
    assert (await srv.node.store.get("emergency", emerg["emergency"]))["end_cause"] == "cancelled"
    ack = await central.message("ack:U-4")
    assert ack["status"] == "cancelled" and ack["ended"] == ["U-2", "U-3"]

    before = await counts(srv)
    status, out = await push(srv, {**cancel, "id": "U-5", "references": ["KHONG-CO"]})
    assert (status, out["field"]) == (404, "references"), out
    for bad in ({"type": "cancel"}, {"type": "update"}, {"references": ["U-1"]},
                {"type": "revoke", "references": ["U-1"]}):
        status, out = await push(srv, bulletin("U-6", "priority", **bad))
        assert status == 422 and out["field"] in ("references", "type"), (bad, out)
    assert await counts(srv) == before


async def test_a_cancel_withdraws_a_normal_bulletin_from_the_communes_inboxes(
        srv: Srv, central: Central):
    """What waits or is scheduled turns `cancelled` (its schedule removed: it never airs);
    what a commune declined stays declined; the delivery report says so."""
    status, answer = await push(srv, bulletin("W-1", "normal", ["T01-H1-X1", "T01-H1-X2"]))
    assert status == 201, answer
    (e1,) = (await srv.call("xa11", "GET", "/api/v1/inbox"))[1]["entries"]
    (e2,) = (await srv.call("xa12", "GET", "/api/v1/inbox"))[1]["entries"]
    local = dt.datetime.fromtimestamp(math.ceil(time.time()) + 3600, ZoneInfo(DEFAULT_TZ))
    status, out = await srv.call("xa11", "POST", f"/api/v1/inbox/{e1['id']}/schedule", json={
        "date": local.date().isoformat(), "time": local.strftime("%H:%M:%S")})
    assert status == 200 and out["state"] == "scheduled", out
    assert await srv.node.store.count("schedule") == 1
    status, out = await srv.call("xa12", "POST", f"/api/v1/inbox/{e2['id']}/decline",
                                 json={"reason": "Đã có tin tương tự"})
    assert status == 200, out
    status, out = await push(srv, {"id": "W-2", "sender": "ttcs@mic.gov.vn",
                                   "sent": "2026-12-07T09:00:00+07:00", "type": "cancel",
                                   "references": ["W-1"]})
    assert status == 201 and out["ended"] == ["W-1"], out
    assert await srv.node.store.count("schedule") == 0
    (e1,) = (await srv.call("xa11", "GET", "/api/v1/inbox"))[1]["entries"]
    (e2,) = (await srv.call("xa12", "GET", "/api/v1/inbox"))[1]["entries"]
    assert (e1["state"], e1["reason"]) == ("cancelled", "cancelled")
    assert e2["state"] == "declined"
    report = await central.message("delivery:W-1")  # every commune's last word is in
    assert report["status"] == "complete", report
    assert [(c["code"], c["state"]) for c in report["communes"]] == [
        ("T01-H1-X1", "cancelled"), ("T01-H1-X2", "declined")]
