"""Upward over the node link, store and forward (issue 12): what a child node reports reaches its
parent and the levels above once, across outages and replays; what a child may not report is
refused and nothing is stored. The chain test runs real `loa serve` processes (tests/nodes.py),
each with its own data directory, on loopback."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from loa.web.api.nodes import CLOSE_PROTOCOL
from tests.apiclient import tone_file
from tests.nodes import WAIT, NodeProcess, chain
from tests.relay.test_upstream import COMMUNE, DISTRICT, Pair, pair  # noqa: F401 (fixture)

COMMUNE_OUTSIDE = "T01-H2-X1"  # a commune of the other district


async def eventually(fn: Callable[[], Awaitable[Any]], what: str) -> Any:
    """Poll until `fn()` returns something truthy; the timeout only ends a hung test."""
    deadline = time.monotonic() + WAIT
    while True:
        if result := await fn():
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def entries(node: NodeProcess, bid: str) -> list[dict[str, Any]]:
    status, body = await node.call("GET", f"/api/v1/reports/asrun?to={time.time() + 60}")
    assert status == 200, body
    return [e for e in body["entries"] if e["broadcast"] == bid]


async def uplink(node: NodeProcess) -> dict[str, Any]:
    status, body = await node.call("GET", "/api/v1/nodes")
    assert status == 200, body
    return dict(body["uplink"])


async def own_programme(node: NodeProcess, tone: Path, area: str) -> str:
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
    async with aiohttp.ClientSession() as http:
        nodes: list[NodeProcess] = []
        try:
            nodes = await chain(tmp_path, http, [("tinh", "T01"), ("huyen", DISTRICT),
                                                 ("xa", COMMUNE)])
            province, district, commune = nodes

            async def state(n: NodeProcess, want: str) -> bool:
                return await n.link_state() == want

            await eventually(lambda: state(commune, "up"), "the commune linked")
            await eventually(lambda: state(district, "up"), "the district linked")

            # The middle node dies: the commune airs its own programme meanwhile.
            await district.kill()
            await eventually(lambda: state(commune, "down"), "the commune's link down")
            bid = await own_programme(commune, tone, COMMUNE)
            assert len(await entries(commune, bid)) == 1
            assert (await uplink(commune))["queued_now"] >= 1  # kept for the parent
            assert await entries(province, bid) == []

            # The commune restarts during the outage (its queue is on disk); a copy of its data
            # directory keeps that queue, unacknowledged, for the replay below.
            await commune.stop()
            saved = tmp_path / "xa-saved"
            shutil.copytree(commune.data, saved)
            await commune.start()

            # The district returns: the entry reaches the province, once, tagged with the node.
            await district.start()
            got = await eventually(lambda: entries(province, bid), "the entry at the province")
            assert len(got) == 1, got
            e = got[0]
            assert e["area"] == COMMUNE and e["end"] is not None and e["node_name"] == "Nút huyen"
            assert e["via"] == ["Nút xa"] and e["title"] == "Chương trình xã"
            at_district = await entries(district, bid)
            assert len(at_district) == 1 and at_district[0]["node_name"] == "Nút xa"

            async def drained(n: NodeProcess) -> bool:
                u = await uplink(n)
                return u["queued_now"] == 0 and u["acked"] >= 1

            await eventually(lambda: drained(commune), "the commune's queue acked and emptied")
            await eventually(lambda: drained(district), "the district's queue acked and emptied")

            # The summary on the province counts the commune's time too.
            status, summary = await province.call(
                "GET", f"/api/v1/reports/summary?to={time.time() + 60}")
            assert status == 200 and summary["hours"][COMMUNE]["normal"] > 0, summary

            # Replay: the commune comes back with its old, unacknowledged queue and sends it all
            # again, through a second reconnect; the district and the province add nothing.
            await commune.stop()
            shutil.rmtree(commune.data)
            shutil.copytree(saved, commune.data)
            await commune.start()
            await eventually(lambda: drained(commune), "the replay acked")
            await eventually(lambda: drained(district), "the replay forwarded and acked")
            assert len(await entries(district, bid)) == 1
            assert len(await entries(province, bid)) == 1
            status, body = await district.call("GET", "/api/v1/nodes")
            assert status == 200 and body["reports"]["asrun"] >= 2, body  # it did arrive again
        finally:
            for n in nodes:
                await n.close()


# ---- a child that reports what it may not: in process, a raw link --------------------------------
def report(cursor: str, mid: str, area: str, **entry: Any) -> str:
    now = time.time()
    return json.dumps({"type": "asrun", "id": mid, "cursor": cursor, "origin": [], "entry": {
        "area": area, "broadcast": "b-" + mid, "title": "Bản tin xã", "class": "normal",
        "issuer": area, "start": now - 60, "end": now - 30, "seconds": 30.0,
        "start_cause": "start", "end_cause": "ended", **entry}})


async def test_reports_outside_the_childs_part_are_refused_and_replays_add_nothing(
        pair: Pair) -> None:  # noqa: F811 (the fixture of test_upstream)
    parent = pair.parent.node
    url = pair.parent.url + f"/api/v1/nodes/link?areas={DISTRICT}"
    headers = {"Authorization": f"Node {pair.key}"}

    async def stored(mid: str) -> list[dict[str, Any]]:
        return await parent.store.read_log("asrun", broadcast="b-" + mid)

    async with pair.http.ws_connect(url, headers=headers) as ws:
        hello = json.loads((await ws.receive()).data)
        assert hello["type"] == "hello"

        async def send(text: str) -> dict[str, Any]:
            await ws.send_str(text)
            while True:  # control events of the parent's own broadcasts may come between
                msg = json.loads((await ws.receive(timeout=WAIT)).data)
                if msg["type"] == "ack":
                    return dict(msg)

        ack = await send(report("c1", "e1", COMMUNE))
        assert ack == {"type": "ack", "cursor": "c1"}
        assert (await send(report("c2", "e1", COMMUNE)))["cursor"] == "c2"  # a replay
        rows = await stored("e1")
        assert len(rows) == 1 and rows[0]["node"] == pair.node_id and rows[0]["area"] == COMMUNE

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
        assert parent.uplink_in.counts["refused"] == 4 and parent.uplink_in.counts["asrun"] == 2

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


async def _get(p: Pair, path: str) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {p.token}"}
    async with p.http.get(p.parent.url + path, headers=headers) as r:
        return r.status, await r.json()
