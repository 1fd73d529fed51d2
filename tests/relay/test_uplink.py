"""Upward over the node link, store and forward (issue 12): what a child node reports reaches its
parent and the levels above once, across outages and replays; what a child may not report is
refused and nothing is stored. The chain test runs real `loa serve` processes (tests/nodes.py,
loa.web.nodeproc), each with its own data directory, on loopback."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from loa.relay.exchange import ExchangeSettings
from loa.relay.uplink import PARENT, Uplink
from loa.relay.upstream import UpstreamSettings
from loa.streamer.alerts import Alerts
from loa.streamer.areas import sample_tree
from loa.streamer.sources import ToneSource
from loa.streamer.state.open import open_store
from loa.streamer.station import Content
from loa.web.api.nodes import CLOSE_PROTOCOL
from loa.web.auth import add_user
from loa.web.config import Config
from loa.web.nodeproc import NodeApi
from tests.apiclient import PASSWORD, tone_file
from tests.helpers import until
from tests.linkpair import ADMIN, COMMUNE, DISTRICT, Linked, api, linked
from tests.nodes import WAIT, chain

COMMUNE_OUTSIDE = "T01-H2-X1"  # a commune of the other district
PEER = "central"  # the central source system, on the parent's exchange


async def eventually(fn: Callable[[], Awaitable[Any]], what: str) -> Any:
    """Poll until `fn()` returns something truthy; the timeout only ends a hung test."""
    deadline = time.monotonic() + WAIT
    while True:
        if result := await fn():
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def entries(node: NodeApi, bid: str) -> list[dict[str, Any]]:
    status, body = await node.call("GET", f"/api/v1/reports/asrun?to={time.time() + 60}")
    assert status == 200, body
    return [e for e in body["entries"] if e["broadcast"] == bid]


async def uplink(node: NodeApi) -> dict[str, Any]:
    status, body = await node.call("GET", "/api/v1/nodes")
    assert status == 200, body
    return dict(body["uplink"])


async def own_programme(node: NodeApi, tone: Path, area: str) -> str:
    """Air a media item of the node's own in `area`, wait until it is on air, stop it, wait
    until its as-run entry is closed: the broadcast id."""
    form = aiohttp.FormData()
    form.add_field("title", "Chương trình xã")
    form.add_field("file", tone.read_bytes(), filename=tone.name)
    status, media = await node.call("POST", "/api/v1/media", data=form)
    assert status == 201, media
    status, b = await node.call("POST", "/api/v1/broadcasts",
                                json={"media": media["id"], "targets": [area]})
    assert status == 201, b
    bid = str(b["id"])
    await eventually(lambda: entries(node, bid), "the programme on air")
    status, out = await node.call("DELETE", f"/api/v1/broadcasts/{bid}")
    assert status == 204, out

    async def closed() -> bool:
        return any(e["end"] is not None for e in await entries(node, bid))

    await eventually(closed, "its as-run entry closed")
    return bid


async def test_asrun_of_an_outage_reaches_the_province_once_and_a_replay_adds_nothing(
        tmp_path: Path) -> None:
    tone = tone_file(tmp_path / "tone.wav", 440, 30)
    async with chain(tmp_path, ["T01", DISTRICT, COMMUNE]) as c:
        (province, district, commune), procs = c.apis, c.nodes

        async def state(n: NodeApi, want: str) -> bool:
            return (await n.upstream()).get("state") == want

        # The middle node dies: the commune airs its own programme meanwhile.
        await procs[1].kill()
        await eventually(lambda: state(commune, "down"), "the commune's link down")
        bid = await own_programme(commune, tone, COMMUNE)
        assert len(await entries(commune, bid)) == 1
        assert (await uplink(commune))["queued_now"] >= 1  # kept for the parent
        assert await entries(province, bid) == []

        # The commune restarts during the outage (its queue is on disk); a copy of its data
        # directory keeps that queue, unacknowledged, for the replay below.
        await procs[2].stop()
        saved = tmp_path / "xa-saved"
        shutil.copytree(procs[2].root / "data", saved)
        await procs[2].start()

        # The district returns: the entry reaches the province, once, tagged with the node.
        await procs[1].start()
        got = await eventually(lambda: entries(province, bid), "the entry at the province")
        assert len(got) == 1, got
        e = got[0]
        assert e["area"] == COMMUNE and e["end"] is not None, e
        assert e["node_name"] == f"node 1 {DISTRICT}" and e["via"] == [f"node 2 {COMMUNE}"], e
        assert e["title"] == "Chương trình xã"
        at_district = await entries(district, bid)
        assert len(at_district) == 1 and at_district[0]["node_name"] == f"node 2 {COMMUNE}"

        async def drained(n: NodeApi) -> bool:
            u = await uplink(n)
            return u["queued_now"] == 0 and u["acked"] >= 1

        await eventually(lambda: drained(commune), "the commune's queue acked and emptied")
        await eventually(lambda: drained(district), "the district's queue acked and emptied")

        # The commune airs in a neighbour's area (its own tree has it, its key does not): the
        # district refuses that report, the commune drops it, nothing is stored above.
        other = await own_programme(commune, tone, "T01-H1-X2")

        async def refused() -> bool:
            u = await uplink(commune)
            return u["refused"] >= 1 and u["queued_now"] == 0

        await eventually(refused, "the neighbour's entry refused")
        assert await entries(district, other) == [] and await entries(province, other) == []
        status, body = await district.call("GET", "/api/v1/nodes")
        assert status == 200 and body["reports"]["refused"] >= 1, body

        # The summary on the province counts the commune's time too.
        status, summary = await province.call(
            "GET", f"/api/v1/reports/summary?to={time.time() + 60}")
        assert status == 200 and summary["hours"][COMMUNE]["normal"] > 0, summary

        # Replay: the commune comes back with its old, unacknowledged queue and sends it all
        # again, through a second reconnect; the district and the province add nothing.
        await procs[2].stop()
        shutil.rmtree(procs[2].root / "data")
        shutil.copytree(saved, procs[2].root / "data")
        await procs[2].start()
        await eventually(lambda: drained(commune), "the replay acked")
        await eventually(lambda: drained(district), "the replay forwarded and acked")
        assert len(await entries(district, bid)) == 1
        assert len(await entries(province, bid)) == 1
        status, body = await district.call("GET", "/api/v1/nodes")
        assert status == 200 and body["reports"]["asrun"] >= 2, body  # it did arrive again


# ---- a child that reports what it may not: in process, a raw link --------------------------------
def report(cursor: str, mid: str, area: str, **entry: Any) -> str:
    now = time.time()
    return json.dumps({"type": "asrun", "id": mid, "cursor": cursor, "origin": [], "entry": {
        "area": area, "broadcast": "b-" + mid, "title": "Bản tin xã", "class": "normal",
        "issuer": area, "start": now - 60, "end": now - 30, "seconds": 30.0,
        "start_cause": "start", "end_cause": "ended", **entry}})


async def test_reports_outside_the_childs_part_are_refused_and_replays_add_nothing(
        tmp_path: Path) -> None:
    async with linked(tmp_path) as pair:
        await outside_refused(pair)


async def outside_refused(pair: Linked) -> None:
    parent = pair.parent.node
    url = pair.parent.url + f"/api/v1/nodes/link?areas={DISTRICT}"
    headers = {"Authorization": f"Node {pair.cred['key']}"}

    async def stored(mid: str) -> list[dict[str, Any]]:
        return await parent.store.read_log("asrun", broadcast="b-" + mid)

    async with pair.http.ws_connect(url, headers=headers) as ws:
        hello = json.loads((await ws.receive()).data)
        assert hello["type"] == "hello" and hello["reports"] == 1

        async def send(text: str) -> dict[str, Any]:
            await ws.send_str(text)
            while True:  # control events of the parent's own broadcasts may come between
                msg = json.loads((await ws.receive(timeout=WAIT)).data)
                if msg["type"] == "ack":
                    return dict(msg)

        ack = await send(report("c1", "e1", COMMUNE))
        assert ack == {"type": "ack", "cursor": "c1"}
        extra = json.loads(report("c0", "e0", COMMUNE)) | {"junk": "x" * 100}
        assert "junk" in (await send(json.dumps(extra)))["refused"]  # a field no type has
        assert (await send(report("c2", "e1", COMMUNE)))["cursor"] == "c2"  # a replay
        rows = await stored("e1")
        assert len(rows) == 1 and rows[0]["node"] == pair.cred["id"] and rows[0]["area"] == COMMUNE

        # Another district's commune: refused with the reason, counted, nothing stored.
        ack = await send(report("c3", "e2", COMMUNE_OUTSIDE))
        assert ack["cursor"] == "c3" and COMMUNE_OUTSIDE in ack["refused"], ack
        assert await stored("e2") == []
        # An unknown area, a field of the wrong type, an unknown field: the same.
        for cursor, bad in (("c4", report("c4", "e3", "X99")),
                            ("c5", report("c5", "e4", COMMUNE, end="late")),
                            ("c6", report("c6", "e5", COMMUNE, extra=1))):
            ack = await send(bad)
            assert ack["cursor"] == cursor and ack["refused"], ack
        assert [await stored(m) for m in ("e3", "e4", "e5")] == [[], [], []]
        assert parent.uplink_in.counts["refused"] == 5 and parent.uplink_in.counts["asrun"] == 2

        # Devices: the child's inside count on the province's overview; outside is refused.
        def device(cursor: str, dev: str, area: str) -> str:
            return json.dumps({"type": "device", "id": f"device:{dev}", "cursor": cursor,
                               "device": {"id": dev, "name": "Loa chợ", "kind": "loudspeaker",
                                          "area": area, "status": "online",
                                          "changed": time.time()}})

        assert "refused" in await send(device("d1", "L2", COMMUNE_OUTSIDE))
        assert "refused" not in await send(device("d2", "L1", COMMUNE))
        status, ov = await _get(pair, f"/api/v1/overview?root={DISTRICT}")
        assert status == 200, ov
        assert ov["root"]["devices"]["online"] == 1, ov["root"]
        row = next(c for c in ov["children"] if c["code"] == COMMUNE)
        assert row["devices"]["online"] == 1 and row["devices"]["total"] == 1

        # Not an upward message at all: the link is closed with the reason.
        await ws.send_str("{not json")
        msg = await ws.receive(timeout=WAIT)
        while msg.type is aiohttp.WSMsgType.TEXT:
            msg = await ws.receive(timeout=WAIT)
        assert ws.close_code == CLOSE_PROTOCOL, (msg, ws.close_code)
    async with pair.http.ws_connect(url, headers=headers) as ws:
        await ws.receive()
        await ws.send_bytes(b"\x01\x02")
        msg = await ws.receive(timeout=WAIT)
        while msg.type is aiohttp.WSMsgType.TEXT:
            msg = await ws.receive(timeout=WAIT)
        assert ws.close_code == CLOSE_PROTOCOL and "text" in str(msg.extra), msg


async def _get(p: Linked, path: str) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {p.token}"}
    async with p.http.get(p.parent.url + path, headers=headers) as r:
        return r.status, await r.json()


# ---- device status, delivery counts and audit summaries ---------------------------------------------
async def test_device_status_delivery_counts_and_audit_summaries_reach_the_parent(
        tmp_path: Path) -> None:
    def audit_often(cfg: Config) -> None:
        cfg.upstream.audit_s = 1.0

    def central_peer(cfg: Config) -> None:  # the exchange, pull only: its outbox is read
        cfg.exchange = ExchangeSettings(peers=[f"{PEER}=bi-mat-trung-uong-0123456789"],
                                        stats_interval=0)

    async with linked(tmp_path, audit_often, central_peer) as pair:
        await reports_reach_the_parent(pair)


async def reports_reach_the_parent(pair: Linked) -> None:
    parent, child, http, token, cred = pair.parent, pair.child, pair.http, pair.token, pair.cred
    up = child.node.upstream
    assert up is not None
    await until(lambda: up.state == "up", "the link up")

    # A loudspeaker of the child's commune connects (a real device session on the child).
    status, out = await api(http, child.url, "POST", "/api/v1/auth/token",
                            json={"username": ADMIN, "password": PASSWORD})
    assert status == 201, out
    status, dev = await api(http, child.url, "POST", "/api/v1/devices", out["token"],
                            json={"name": "Loa chợ", "kind": "loudspeaker",
                                  "area": COMMUNE})
    assert status == 201, dev
    status, prov = await api(http, child.url, "POST", "/api/v1/devices/provision",
                             json={"device": dev["id"], "token": dev["provisioning_token"]})
    assert status == 201, prov
    ws = await http.ws_connect(child.url + "/api/v1/devices/connect")
    await ws.send_str(json.dumps({"v": 1, "type": "hello", "device": dev["id"],
                                  "key": prov["key"], "firmware": "1.0.0"}))
    assert json.loads((await ws.receive()).data)["type"] == "welcome"
    key = f"{cred['id']}:device:{dev['id']}"

    async def remote_status() -> str | None:
        rec = await parent.node.store.get("node_device", key)
        return rec["status"] if rec else None

    await until(lambda: _is(remote_status(), "online"), "the device online at the parent")
    status, ov = await api(http, parent.url, "GET", "/api/v1/overview?root=T01", token)
    assert status == 200, ov
    row = next(c for c in ov["children"] if c["code"] == DISTRICT)
    assert row["devices"]["online"] == 1 and row["devices"]["total"] == 1, row
    status, nodes = await api(http, parent.url, "GET", "/api/v1/nodes", token)
    assert nodes["nodes"][0]["devices"] == {"online": 1, "offline": 0, "fault": 0}

    # The central system's bulletin to the district airs at the parent and at the child: the
    # exchange's delivery report (revised when the child's entries come after the end) counts
    # the child's loudspeaker, and so do the statistics.
    status, _ = await parent.node.exchange.receive(PEER, json.dumps({
        "id": "B-1", "sender": "ttcs", "sent": "2026-12-07T08:00:00+07:00", "class": "priority",
        "title": "Thông báo", "text": "Thông báo của trung ương", "targets": [DISTRICT]}).encode())
    assert status == 201

    async def latest() -> dict[str, Any] | None:
        found = [r["message"] for r in await parent.node.store.find("exchange_out", peer=PEER)
                 if r["type"] == "delivery"]
        return max(found, key=lambda m: m["revision"]) if found else None

    async def complete() -> bool:
        """The latest report holds every as-run entry of the bulletin, the child's included
        (in revision 1, or a later one when the child's came after the end)."""
        report, out = await latest(), await parent.node.store.find("exchange_in", peer=PEER)
        if report is None or not out or child.node.uplink.pending:  # type: ignore[union-attr]
            return False
        rows = await parent.node.store.read_log("asrun", broadcast=out[0]["broadcast"])
        if not any(r.get("node") == cred["id"] for r in rows):
            return False
        # Each area's time counted once: the child's where it reported the area, the parent's
        # own elsewhere (the parent's mixer composes the child's areas too).
        by_child = {r["area"] for r in rows if r.get("node")}
        want: dict[str, float] = {}
        for r in rows:
            if bool(r.get("node")) == (r["area"] in by_child):
                want[r["area"]] = round(want.get(r["area"], 0.0) + r["seconds"], 3)
        return {a["code"]: a["seconds"] for a in report["areas"]} == want

    await until(complete, "a delivery report with the child's entries", timeout=WAIT)
    delivery = await latest()
    assert delivery is not None and delivery["bulletin"] == "B-1", delivery
    assert COMMUNE in {a["code"] for a in delivery["areas"]}
    assert delivery["loudspeakers"] == {"total": 1, "online": 1, "acked": None,
                                        "played": None}, delivery
    # The bulletin's broadcast record on the parent holds the child's delivery counts; another
    # district's user does not see it.
    (received,) = await parent.node.store.find("exchange_in", peer=PEER)
    path = f"/api/v1/broadcasts/{received['broadcast']}"

    async def with_delivery() -> bool:
        status, b = await api(http, parent.url, "GET", path, token)
        assert status == 200, b
        return any(r["node"] == cred["id"] for r in b.get("children", []))

    await until(with_delivery, "the child's delivery on the bulletin's record")
    await add_user(parent.node.store, parent.node.tree, "xem2", "viewer", "T01-H2", PASSWORD)
    status, out = await api(http, parent.url, "POST", "/api/v1/auth/token",
                            json={"username": "xem2", "password": PASSWORD})
    assert status == 201, out
    status, b = await api(http, parent.url, "GET", path, out["token"])
    assert status == 404 and "field" not in b, b
    (stats,) = await parent.node.exchange.statistics()
    assert stats["message"]["devices"]["loudspeaker"] == {"total": 1, "online": 1}, stats

    # A province broadcast airs at the child; when it ends, the child's delivery counts are
    # on the parent's broadcast record and its as-run entries in the parent's reports.
    rec = await parent.node.station.air(Content(ToneSource(1000, 0.3), "Bản tin tỉnh", None),
                                        targets=["T01"], klass="normal", issuer="T01",
                                        user="test")
    bid = rec["id"]
    await until(lambda: any(e["broadcast"] == bid for e in child.node.station.open_entries()),
                "on air at the child")
    parent.node.station.stop(bid, None)

    async def delivered() -> list[dict[str, Any]]:
        b = await parent.node.store.get("broadcast", bid)
        return list((b or {}).get("children", []))

    await until(delivered, "the child's delivery counts")
    (row,) = await delivered()
    assert row["node"] == cred["id"] and row["areas"] >= 1 and row["seconds"] > 0, row
    assert row["loudspeakers"] == {"total": 1, "online": 1}, row
    status, rep = await api(http, parent.url, "GET",
                            f"/api/v1/reports/asrun?to={time.time() + 60}", token)
    mine = [e for e in rep["entries"] if e["broadcast"] == bid and e.get("node")]
    assert mine and all(e["node"] == cred["id"] for e in mine), rep

    # The loudspeaker reports a fault: faulty at the parent too.
    await ws.send_str(json.dumps({"v": 1, "type": "heartbeat", "state": "playing",
                                  "volume": 70, "faults": ["speaker_open"]}))
    await until(lambda: _is(remote_status(), "fault"), "the device faulty at the parent")
    await ws.close()

    # Audit summaries: the child's writes (the device's registration) counted at the parent.
    async def summaries() -> list[dict[str, Any]]:
        return [e for e in await parent.node.store.read_log("audit",
                                                             action="node.audit_summary")
                if e["details"]["actions"].get("device.create")]

    await until(summaries, "an audit summary at the parent")
    s = (await summaries())[0]
    assert s["target"] == cred["id"] and s["area"] == DISTRICT, s


async def _is(value: Awaitable[Any], want: Any) -> bool:
    return await value == want


async def test_a_full_queue_drops_new_reports_with_an_alert(tmp_path: Path) -> None:
    store = await open_store("sqlite", tmp_path / "data")
    alerts = Alerts()
    up = Uplink(store, UpstreamSettings(queue_max=2), sample_tree(), alerts)
    try:
        entry = {"id": "e1", "area": COMMUNE, "broadcast": "b1", "start": 1.0, "end": 2.0}
        await up.asrun(entry)
        await up.asrun(entry)  # the same entry again: queued once
        await up.asrun({**entry, "id": "e2"})
        assert not alerts.active
        await up.asrun({**entry, "id": "e3"})  # beyond queue_max: dropped, counted, alerted
        queued = await up.queue.feed(PARENT, None, 10)
        assert [r["message"]["id"] for r in queued] == ["asrun:e1", "asrun:e2"]
        assert up.counts["dropped"] == 1 and ("uplink_full", "parent") in alerts.active
    finally:
        await store.close()
