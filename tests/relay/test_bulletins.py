"""The TT 39 inbox across the link (relay/bulletins.py): two real nodes on loopback, a province
parent and a district child serving T01-H1, each with its own data directory. A bulletin the
province sends to communes the child serves lands in the CHILD's inbox; what the communes do
there reaches the province's GET /api/v1/bulletins/{id}."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loa.relay.bulletins import MEDIA_PATH, REPORT_PATH
from loa.streamer.broadcast import Broadcast
from loa.streamer.schedule import DEFAULT_TZ, ZoneInfo
from loa.streamer.sources import ToneSource
from loa.web.auth import add_user
from loa.web.config import Config
from loa.web.node import Node
from loa.web.testing import LiveNode, start_node
from tests.apiclient import PASSWORD, make_config, tone_file
from tests.audio import decode_packets, peak_hz, rms
from tests.helpers import until

DISTRICT = "T01-H1"
X1, X2, X3 = "T01-H1-X1", "T01-H1-X2", "T01-H1-X3"
USERS = (("tinh", "operator", "T01", True), ("qtvtinh", "admin", "T01", True),
         ("xa11", "operator", X1, False), ("xa12", "operator", X2, False))


async def people(node: Node) -> None:
    for name, role, area, emergency in USERS:
        if not await node.store.find("user", username=name):
            await add_user(node.store, node.tree, name, role, area, PASSWORD,
                           emergency=emergency)


@dataclass
class Pair:
    parent: LiveNode
    child: LiveNode
    http: aiohttp.ClientSession
    node_id: str
    key: str
    tokens: dict[tuple[str, str], str]

    async def call(self, where: str, who: str | None, method: str, path: str,
                   **kw: Any) -> tuple[int, Any]:
        live = self.parent if where == "parent" else self.child
        headers = dict(kw.pop("headers", {}))
        if who is not None:
            if (where, who) not in self.tokens:
                async with self.http.post(live.url + "/api/v1/auth/token",
                                          json={"username": who, "password": PASSWORD}) as r:
                    self.tokens[(where, who)] = (await r.json())["token"]
            headers["Authorization"] = f"Bearer {self.tokens[(where, who)]}"
        async with self.http.request(method, live.url + path, headers=headers, **kw) as r:
            return r.status, await r.json(content_type=None)


@asynccontextmanager
async def linked(tmp_path: Path, parent_cfg: Config | None = None) -> AsyncIterator[Pair]:
    """A province node and a district node linked to it with a key it issued."""
    (tmp_path / "parent").mkdir(exist_ok=True)
    parent = await start_node(parent_cfg or make_config(tmp_path / "parent"), prepare=people)
    http = aiohttp.ClientSession()
    p = Pair(parent, parent, http, "", "", {})
    child: LiveNode | None = None
    try:
        status, cred = await p.call("parent", "qtvtinh", "POST", "/api/v1/nodes",
                                    json={"name": "Nút huyện 1", "area": DISTRICT})
        assert status == 201, cred
        (tmp_path / "child").mkdir()
        cfg = make_config(tmp_path / "child")
        cfg.upstream.url, cfg.upstream.key = parent.url, cred["key"]
        cfg.upstream.areas = [DISTRICT]
        child = p.child = await start_node(cfg, prepare=people)
        p.node_id, p.key = cred["id"], cred["key"]
        yield p
    finally:
        if child is not None:
            await child.stop()
        await parent.stop()
        await http.close()


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    async with linked(tmp_path) as p:
        yield p


async def upload(p: Pair, path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        form = aiohttp.FormData()
        form.add_field("title", "Bản tin tỉnh")
        form.add_field("file", f, filename=path.name)
        status, media = await p.call("parent", "tinh", "POST", "/api/v1/media", data=form)
    assert status == 201, media
    return dict(media)


def heard(packets: list[Any], hz: float) -> bool:
    if len(packets) < 30:
        return False
    pcm, rate = decode_packets("opus", packets[-25:])
    pcm = pcm[-int(0.4 * rate):]
    return abs(peak_hz(pcm, rate) - hz) < 8 and rms(pcm) > 0.05


async def test_a_normal_bulletin_waits_in_the_child_nodes_inbox_and_the_answers_go_up(
        pair: Pair, tmp_path: Path):
    child, parent = pair.child.node, pair.parent.node
    assert child.upstream is not None and child.parent_bulletins is not None
    await until(lambda: child.upstream.state == "up", "the link up")
    media = await upload(pair, tone_file(tmp_path / "tin.wav", 900, 2))
    status, sent = await pair.call("parent", "tinh", "POST", "/api/v1/bulletins", json={
        "media": media["id"], "targets": [X1, X2], "class": "normal"})
    assert status == 201, sent
    # On the parent the entries are the child's: nobody acts on them here.
    assert {e["area"]: e.get("node") for e in sent["entries"]} == {
        X1: pair.node_id, X2: pair.node_id}
    status, out = await pair.call("parent", "tinh", "POST",
                                  f"/api/v1/inbox/{sent['entries'][0]['id']}/decline",
                                  json={"reason": "x"})
    assert status == 409 and pair.node_id in out["error"], out

    # In the child's inbox, pending; the audio fetched once, the same bytes as uploaded.
    async def box(who: str) -> list[dict[str, Any]]:
        status, out = await pair.call("child", who, "GET", "/api/v1/inbox")
        assert status == 200, out
        return list(out["entries"])

    await until(lambda: _len(box("xa11"), 1), "the bulletin in X1's inbox on the child")
    (e1,) = await box("xa11")
    assert (e1["state"], e1["from"], e1["class"], e1["title"], e1["bulletin"]) == (
        "pending", "T01", "normal", "Bản tin tỉnh", sent["id"])
    (fetched,) = [m for m in await child.store.find("media") if m.get("bulletin") == sent["id"]]
    assert fetched["sha256"] == media["sha256"] == hashlib.sha256(
        (tmp_path / "tin.wav").read_bytes()).hexdigest()
    assert await child.store.count("broadcast") == 0  # nothing airs before the commune says
    # The child reported them received: the province sees it; the child's monitor counts it.
    await until(lambda: _all_received(pair, sent["id"]), "received reported up")
    status, mon = await pair.call("child", "qtvtinh", "GET", "/api/v1/monitor")
    shown = mon["node"]["links"]["bulletins"]
    assert status == 200 and shown["received"] == 1 and shown["refused"] == 0, shown

    # X2 declines on the child: the province reads the reason.
    (e2,) = await box("xa12")
    status, out = await pair.call("child", "xa12", "POST", f"/api/v1/inbox/{e2['id']}/decline",
                                  json={"reason": "Trùng lịch họp dân"})
    assert status == 200 and out["state"] == "declined", out
    # X1 schedules it three seconds from now: it airs from the child, the parent not involved.
    ear: list[Any] = []
    child.hub.subscribe(X1, "opus").on_packets = ear.extend
    at = math.ceil(time.time()) + 3
    local = dt.datetime.fromtimestamp(at, ZoneInfo(DEFAULT_TZ))
    status, out = await pair.call("child", "xa11", "POST", f"/api/v1/inbox/{e1['id']}/schedule",
                                  json={"date": local.date().isoformat(),
                                        "time": local.strftime("%H:%M:%S")})
    assert status == 200 and out["state"] == "scheduled", out
    await until(lambda: (child.engine.on_air(X1) or {}).get("title") == "Bản tin tỉnh",
                "the bulletin on the child's air in X1")
    assert child.engine.on_air(X1)["issuer"] == X1  # the commune's schedule, as on one node
    await until(lambda: heard(ear, 900), "the bulletin's tone on X1's stream on the child")

    async def states() -> dict[str, tuple[str, str | None]]:
        _, b = await pair.call("parent", "tinh", "GET", f"/api/v1/bulletins/{sent['id']}")
        return {e["area"]: (e["state"], e.get("reason")) for e in b["entries"]}

    await until(lambda: _eq(states(), {X1: ("aired", None),
                                       X2: ("declined", "Trùng lịch họp dân")}),
                "the communes' answers on the province")
    audit = await parent.store.read_log("audit", limit=100)
    assert any(a["action"] == "inbox.report" and a["details"]["node"] == pair.node_id
               and a["details"]["state"] == "declined" for a in audit)

    # Idempotent by id: a reconnect resends nothing new, a replayed report changes nothing.
    received = child.parent_bulletins.counts["received"]
    connects = child.upstream.counts["connects"]
    for feed in list(parent.links.feeds):
        assert feed.end is not None
        feed.end(1001, "test: the network drops")
    await until(lambda: child.upstream.counts["connects"] == connects + 1, "the link back")
    assert child.parent_bulletins.counts["received"] == received
    assert sorted(e["area"] for e in await child.store.find("inbox")) == [X1, X2]
    auth = {"Authorization": f"Node {pair.key}"}
    replay = {"entries": [{"id": e2["id"], "state": "declined", "order": "before",
                           "reason": "Trùng lịch họp dân"}]}
    status, out = await pair.call("parent", None, "POST", REPORT_PATH, json=replay,
                                  headers=auth)
    assert status == 200 and out == {"changed": [], "refused": []}, out
    # Bad input from a child: another node's entry, a backwards state, no key; nothing changes.
    before = await parent.store.find("inbox")
    status, out = await pair.call("parent", None, "POST", REPORT_PATH, headers=auth, json={
        "entries": [{"id": "nope", "state": "aired", "order": "before", "reason": None},
                    {"id": e2["id"], "state": "pending", "order": "before", "reason": None}]})
    assert status == 200 and out["changed"] == [] and len(out["refused"]) == 2, out
    status, out = await pair.call("parent", None, "POST", REPORT_PATH, json=replay)
    assert status == 401, out
    status, out = await pair.call("parent", None, "GET", MEDIA_PATH,
                                  params={"id": media["id"]},
                                  headers={"Authorization": f"Node {pair.node_id}.wrong"})
    assert status == 401 and "wrong node key" in out["error"], out
    assert await parent.store.find("inbox") == before


async def _len(value: Any, n: int) -> bool:
    return len(await value) == n


async def _eq(value: Any, want: Any) -> bool:
    return bool(await value == want)


async def _all_received(p: Pair, bid: str) -> bool:
    _, b = await p.call("parent", "tinh", "GET", f"/api/v1/bulletins/{bid}")
    return all(e.get("received") for e in b["entries"])


async def test_priority_is_ordered_on_the_child_and_an_emergency_goes_through_its_service(
        pair: Pair, tmp_path: Path):
    child, parent = pair.child.node, pair.parent.node
    assert child.upstream is not None
    await until(lambda: child.upstream.state == "up", "the link up")
    own = child.engine.start(Broadcast(ToneSource(500, 0.3), [X1], issuer=X1, klass="priority",
                                       title="Bản tin xã"))
    media = await upload(pair, tone_file(tmp_path / "ut.wav", 800, 30))
    status, sent = await pair.call("parent", "tinh", "POST", "/api/v1/bulletins", json={
        "media": media["id"], "targets": [X1, X2], "class": "priority"})
    assert status == 201, sent
    bid = sent["broadcast"]
    # Default order: the province's bulletin before the commune's own, on the child.
    await until(lambda: child.engine.main_of(X1) == bid, "the province's priority on the child")
    status, out = await pair.call("child", "xa11", "GET", "/api/v1/inbox")
    await until(lambda: _len(_entries(pair, "xa11"), 1), "the entry in X1's inbox")
    (entry,) = await _entries(pair, "xa11")
    assert (entry["class"], entry["state"], entry["order"]) == ("priority", "aired", "before")
    # The commune puts it after its own: on the child's air at once, and the province sees it.
    status, out = await pair.call("child", "xa11", "POST", f"/api/v1/inbox/{entry['id']}/order",
                                  json={"order": "after"})
    assert status == 200 and out["order"] == "after", out
    await until(lambda: child.engine.main_of(X1) == own, "the commune's own first")
    assert child.engine.main_of(X2) == bid  # X2 kept the default
    # Sample-exact on the child's media clock: its own resumes where the bulletin stopped it.
    x1 = [c for c in child.engine.changes if c.area == X1]
    began = next(c.sample for c in x1 if c.after == own)
    stopped = next(c.sample for c in x1 if c.after == bid and c.before == own)
    back = next(c for c in x1 if c.after == own and c.cause == "reorder")
    assert back.before == bid and back.resumed_at == stopped - began, (back, began, stopped)
    await until(lambda: _orders(pair, sent["id"], {X1: "after", X2: "before"}),
                "the order reported to the province")
    await until(lambda: parent.engine.live_broadcast(bid).after_own == frozenset({X1}),
                "the order on the parent's air too (from its next tick)")
    # The link lost past its hold (the parent's broadcast let go here), then back: the hello
    # airs it again in the commune's order.
    link = child.upstream
    connects = link.counts["connects"]
    for feed in list(parent.links.feeds):
        assert feed.end is not None
        feed.end(1001, "test: the network drops")
    link._stop(bid, "upstream-lost")  # what the hold's end does
    await until(lambda: link.counts["connects"] > connects and bid in link.remotes,
                "the link back, the bulletin again")
    await until(lambda: getattr(child.engine.live_broadcast(bid), "after_own", None)
                == frozenset({X1}), "aired again after the commune's own")
    await until(lambda: child.engine.main_of(X1) == own, "still the commune's own first")

    # An emergency bulletin: the province's emergency service (attention signal first), on the
    # child at once, its entries aired with no one's say.
    status, em = await pair.call("parent", "tinh", "POST", "/api/v1/bulletins", json={
        "media": media["id"], "targets": [DISTRICT], "class": "emergency"})
    assert status == 201, em
    status, rec = await pair.call("parent", "tinh", "GET", f"/api/v1/emergencies/{em['emergency']}")
    assert status == 200 and rec["status"] == "active" and rec["broadcast"] == em["broadcast"]
    await until(lambda: all(child.engine.main_of(x) == em["broadcast"] for x in (X1, X2, X3)),
                "the emergency on the child everywhere")
    assert child.engine.on_air(X1)["class"] == "emergency"
    await until(lambda: _len(_entries(pair, "xa12"), 2), "the emergency in X2's inbox")
    assert {e["state"] for e in await _entries(pair, "xa12")} == {"aired"}


async def _entries(p: Pair, who: str) -> list[dict[str, Any]]:
    status, out = await p.call("child", who, "GET", "/api/v1/inbox")
    assert status == 200, out
    return list(out["entries"])


async def _orders(p: Pair, bid: str, want: dict[str, str]) -> bool:
    _, b = await p.call("parent", "tinh", "GET", f"/api/v1/bulletins/{bid}")
    return {e["area"]: e["order"] for e in b["entries"]} == want


async def test_three_levels_the_district_node_passes_it_down_and_the_answer_up(
        pair: Pair, tmp_path: Path):
    """Province -> district node -> commune node: the bulletin reaches the commune node's inbox
    through the district (its audio fetched from the district), the decline climbs back."""
    district = pair.child.node
    status, cred = await pair.call("child", "qtvtinh", "POST", "/api/v1/nodes",
                                   json={"name": "Nút xã 1", "area": X1})
    assert status == 201, cred
    (tmp_path / "commune").mkdir()
    cfg = make_config(tmp_path / "commune")
    cfg.upstream.url, cfg.upstream.key, cfg.upstream.areas = pair.child.url, cred["key"], [X1]
    commune = await start_node(cfg, prepare=people)
    try:
        c = commune.node
        assert c.upstream is not None and district.upstream is not None
        await until(lambda: c.upstream.state == "up" and district.upstream.state == "up",
                    "both links up")
        media = await upload(pair, tone_file(tmp_path / "ba.wav", 750, 2))
        status, sent = await pair.call("parent", "tinh", "POST", "/api/v1/bulletins", json={
            "media": media["id"], "targets": [X1], "class": "normal"})
        assert status == 201, sent

        async def commune_box() -> list[dict[str, Any]]:
            async with pair.http.post(commune.url + "/api/v1/auth/token",
                                      json={"username": "xa11", "password": PASSWORD}) as r:
                token = (await r.json())["token"]
            async with pair.http.get(commune.url + "/api/v1/inbox",
                                     headers={"Authorization": f"Bearer {token}"}) as r:
                return list((await r.json())["entries"])

        await until(lambda: _len(commune_box(), 1), "the bulletin on the commune node")
        (entry,) = await commune_box()
        assert (entry["id"], entry["from"], entry["state"]) == (
            sent["entries"][0]["id"], "T01", "pending")
        assert [m["sha256"] for m in await c.store.find("media")] == [media["sha256"]]
        # On the district node the entry is the commune node's: refused there.
        status, out = await pair.call("child", "qtvtinh", "POST",
                                      f"/api/v1/inbox/{entry['id']}/decline",
                                      json={"reason": "x"})
        assert status == 409, out
        async with pair.http.post(commune.url + "/api/v1/auth/token",
                                  json={"username": "xa11", "password": PASSWORD}) as r:
            token = (await r.json())["token"]
        async with pair.http.post(commune.url + f"/api/v1/inbox/{entry['id']}/decline",
                                  json={"reason": "Mất điện cả xã"},
                                  headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200, await r.text()

        async def on_province() -> tuple[str, str | None]:
            _, b = await pair.call("parent", "tinh", "GET", f"/api/v1/bulletins/{sent['id']}")
            (e,) = b["entries"]
            return e["state"], e.get("reason")

        await until(lambda: _eq(on_province(), ("declined", "Mất điện cả xã")),
                    "the commune's decline on the province, through the district")
    finally:
        await commune.stop()


async def test_bad_bulletin_messages_from_a_parent_change_nothing(pair: Pair):
    child = pair.child.node
    assert child.parent_bulletins is not None
    good = {"id": "b1", "class": "normal", "title": "x", "created": 1.0, "from": "T01",
            "from_path": ["T01"], "content": {"type": "file", "media": []}}
    bad = [
        {"type": "bulletin", "bulletin": {**good, "id": "b1", "class": "loud"}, "entries": [
            {"id": "e1", "area": X1}]},  # no such class
        {"type": "bulletin", "bulletin": {**good, "id": "b2"}, "entries": [
            {"id": "e2", "area": "T01-H2-X1"}]},  # outside the child's part of the tree
        {"type": "bulletin", "bulletin": {**good, "id": "b3"}, "entries": [
            {"id": "e3", "area": X1}]},  # nothing to air
        {"type": "bulletin", "bulletin": {**good, "id": "b4", "content": {
            "type": "file", "media": [{"id": "m", "sha256": "0" * 64}]}}, "entries": [
            {"id": "e4", "area": X1}]},  # media the parent does not have for it: 404
        {"type": "bulletin", "bulletin": "junk", "entries": []},
    ]
    for msg in bad:
        child.parent_bulletins.on_message(msg)
    await until(lambda: child.parent_bulletins.counts["refused"] >= 4, "the bad bulletins refused")
    assert await child.store.count("bulletin") == 0 and await child.store.count("inbox") == 0
    assert await child.store.count("programme") == 0


SECRET = "bi-mat-trung-uong-0123456789"


def signed(method: str, path: str, body: bytes) -> dict[str, str]:
    """Signed as docs/exchange.md says, written out here (not the product's helper)."""
    stamp = str(int(time.time()))
    mac = hmac.new(SECRET.encode(), f"{stamp}\n{method}\n{path}\n".encode() + body,
                   "sha256").hexdigest()
    return {"X-Loa-Peer": "central", "X-Loa-Timestamp": stamp,
            "X-Loa-Signature": f"sha256={mac}", "Content-Type": "application/json"}


async def test_a_central_bulletin_reaches_a_child_nodes_commune_and_its_answer_the_central(
        tmp_path: Path):
    """The central system pushes a normal bulletin to the province; a commune the district
    node serves declines it there; the province's delivery report names that answer."""
    (tmp_path / "parent").mkdir()
    cfg = make_config(tmp_path / "parent")
    cfg.exchange.peers, cfg.exchange.stats_interval = [f"central={SECRET}"], 0
    cfg.exchange.__post_init__()
    async with linked(tmp_path, cfg) as p:
        child = p.child.node
        assert child.upstream is not None
        await until(lambda: child.upstream.state == "up", "the link up")
        raw = json.dumps({"id": "TTCS-1", "sender": "ttcs@mic.gov.vn",
                          "sent": "2026-12-07T08:00:00+07:00", "class": "normal",
                          "title": "Lịch tiêm chủng", "text": "Thông báo lịch tiêm chủng.",
                          "targets": [X1, X2]}).encode()
        path = "/api/exchange/v1/bulletins"
        async with p.http.post(p.parent.url + path, data=raw,
                               headers=signed("POST", path, raw)) as r:
            assert r.status == 201, await r.text()
        await until(lambda: _len(_entries(p, "xa12"), 1), "in X2's inbox on the child")
        (entry,) = await _entries(p, "xa12")
        assert (entry["from"], entry["title"]) == ("T01", "Lịch tiêm chủng")
        # The text read once by the province's TTS; its audio fetched: one voice everywhere.
        (spoken,) = entry["listen"]
        assert (await child.store.get("media", spoken))["duration"] > 1
        status, out = await p.call("child", "xa12", "POST", f"/api/v1/inbox/{entry['id']}/decline",
                                   json={"reason": "Xã đang họp dân"})
        assert status == 200, out

        async def report() -> dict[str, Any] | None:
            path = "/api/exchange/v1/messages?type=delivery"
            async with p.http.get(p.parent.url + path, headers=signed("GET", path, b"")) as r:
                page = await r.json()
            found = [m for m in page["messages"] if m["bulletin"] == "TTCS-1"]
            return found[-1] if found else None

        await until(lambda: _truthy(report()), "the delivery report on the province")
        got = await report()
        assert got is not None and got["status"] == "partial", got
        assert [(c["code"], c["state"], c["reason"]) for c in got["communes"]] == [
            (X1, "pending", None), (X2, "declined", "Xã đang họp dân")]


async def _truthy(value: Any) -> bool:
    return bool(await value)
