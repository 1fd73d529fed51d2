"""Outage history: intervals recorded from real device connections going away (missed
heartbeats, a closed socket), kept in SQLite and Redis alike; availability arithmetic exact on a
controlled timeline, cut at local month starts and rolled up the area tree."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from loa.relay.devices.history import (
    LOG,
    TZ,
    DeviceHistory,
    month_bounds,
    roll_up,
    tally_month,
)
from loa.relay.devices.manager import DeviceSettings
from loa.relay.devices.records import new_device_record, new_key, secret_hash
from loa.streamer.areas import AreaTree
from loa.streamer.state.store_sqlite import SqliteStore
from loa.web.testing import LiveNode, start_node
from tests.apiclient import SAMPLE_CSV, make_config
from tests.helpers import delete_prefix

HEARTBEAT = 1.0  # offline after two missed: 2.1 s (a quick reconnect fits well inside)


@asynccontextmanager
async def live(tmp_path: Path, store: str = "sqlite", prefix: str = "loa:"
               ) -> AsyncIterator[LiveNode]:
    cfg = make_config(tmp_path, store=store, prefix=prefix)
    cfg.devices = DeviceSettings(heartbeat=HEARTBEAT)
    node = await start_node(cfg, realtime=False, access_log=None)
    try:
        yield node
    finally:
        await node.stop()


async def device(node: LiveNode, area: str, name: str) -> tuple[str, str]:
    key = new_key()
    rec = new_device_record(name, "loudspeaker", area, {}, [], volume=80)
    rec["key_hash"] = secret_hash(key)
    await node.node.devices.create(rec)
    return rec["id"], key


async def connect(http: aiohttp.ClientSession, node: LiveNode, dev: str, key: str
                  ) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(node.url + "/api/v1/devices/connect")
    await ws.send_str(json.dumps({"v": 1, "type": "hello", "device": dev, "key": key}))
    msg = json.loads((await ws.receive(timeout=5)).data)
    assert msg["type"] == "welcome"
    return ws


async def heartbeat(ws: aiohttp.ClientWebSocketResponse, **kw: Any) -> None:
    await ws.send_str(json.dumps({"v": 1, "type": "heartbeat", "state": "playing", **kw}))


async def until(cond: Any, timeout: float = 10.0) -> None:
    """Wait for `cond()` (a bound for a hung test, not a speed check)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition never held"
        await asyncio.sleep(0.02)


async def intervals(node: LiveNode, dev: str) -> list[dict[str, Any]]:
    await node.node.history.flush()
    rows = await node.node.store.read_log(LOG, device=dev, limit=10_000)
    return sorted(rows, key=lambda r: r["ts"])


async def test_intervals_recorded_as_devices_go_away(tmp_path: Path) -> None:
    await intervals_as_devices_go_away(tmp_path, "sqlite", "loa:")


async def test_intervals_recorded_in_redis_alike(tmp_path: Path, redis_url: str,
                                                 redis_prefix: str) -> None:
    try:
        await intervals_as_devices_go_away(tmp_path, redis_url, redis_prefix)
    finally:
        await delete_prefix(redis_url, redis_prefix)


async def intervals_as_devices_go_away(tmp_path: Path, store: str, prefix: str) -> None:
    async with live(tmp_path, store, prefix) as node, aiohttp.ClientSession() as http:
        mgr, alerts = node.node.devices, node.node.alerts
        a, key_a = await device(node, "T01-H1-X1", "Loa A")
        b, key_b = await device(node, "T01-H1-X2", "Loa B")

        # A: online, a fault, online again, then silent with its socket open.
        ws_a = await connect(http, node, a, key_a)
        await heartbeat(ws_a, faults=["speaker_open"], network={"signal_dbm": -71})
        await until(lambda: mgr.devices[a].status == "fault")
        assert alerts.active[("device_fault", a)].detail == {"faults": ["speaker_open"]}
        await heartbeat(ws_a, network={"signal_dbm": -75})
        await until(lambda: mgr.devices[a].status == "online")
        assert ("device_fault", a) not in alerts.active
        node.node.history.sample()  # the signal it reports now
        # B: online, then its socket closed: offline once two heartbeats are missed.
        ws_b = await connect(http, node, b, key_b)
        await ws_b.close()
        await until(lambda: mgr.devices[a].status == "offline"
                    and mgr.devices[b].status == "offline")
        assert alerts.active[("device_offline", a)].area == "T01-H1-X1"
        assert ("device_offline", b) in alerts.active
        # B comes back: its outage is closed and its alert cleared.
        ws_b = await connect(http, node, b, key_b)
        await until(lambda: mgr.devices[b].status == "online")
        assert ("device_offline", b) not in alerts.active
        # B reboots quickly (a new connection before two heartbeats are missed): a
        # connection, no outage.
        await ws_b.close()
        ws_b = await connect(http, node, b, key_b)
        rows_b = await intervals(node, b)
        assert [(r["type"], r.get("status"), r.get("end_cause")) for r in rows_b] == [
            ("connect", None, None), ("interval", "online", "missed_heartbeats"),
            ("interval", "offline", "connected"), ("connect", None, None),
            ("connect", None, None)]
        opened = await node.node.store.get("device_interval", b)
        assert opened is not None and opened["status"] == "online"

        rows_a = await intervals(node, a)
        assert [(r["type"], r.get("status"), r.get("cause"), r.get("end_cause"))
                for r in rows_a] == [
            ("connect", None, None, None),
            ("interval", "online", "connected", "faults"),
            ("interval", "fault", "faults", "heartbeat"),
            ("interval", "online", "heartbeat", "missed_heartbeats")]
        assert rows_a[2]["faults"] == ["speaker_open"]
        for earlier, later in zip(rows_a[1:], rows_a[2:], strict=False):
            assert earlier["end"] == later["start"]  # no gap, no overlap
        assert node.node.history.open[a]["status"] == "offline"
        assert node.node.history.open[a]["cause"] == "missed_heartbeats"
        month = await node.node.store.find("device_month",
                                           month=datetime.now(TZ).strftime("%Y-%m"))
        assert [(m["device"], m["n"], m["last"]) for m in month] == [(a, 1, -75.0)]
        await ws_a.close()
        await ws_b.close()


async def test_open_outages_survive_a_restart_and_are_alerted_again(tmp_path: Path) -> None:
    async with live(tmp_path) as node, aiohttp.ClientSession() as http:
        contact = {"id": "c1", "area": "T01-H2", "name": "Huyện 2", "email": "h2@example.vn"}
        await node.node.store.create("alert_contact", contact)
        node.node.notifier.contacts.set(contact)
        a, key = await device(node, "T01-H2-X1", "Loa C")
        ws = await connect(http, node, a, key)
        await ws.close()
        await until(lambda: node.node.devices.devices[a].status == "offline")
        since = node.node.alerts.active[("device_offline", a)].since
        await node.node.notifier.settle()
        told = [r["id"] for r in await node.node.store.find("alert_out")]
        assert len(told) == 1  # the district's contact, once
    async with live(tmp_path) as node:
        # The outage open before the restart goes on, with its start; its alert is active
        # again, and the contact is not told twice.
        assert node.node.history.open[a]["start"] == since
        assert node.node.alerts.active[("device_offline", a)].since == since
        await node.node.notifier.settle()
        assert [r["id"] for r in await node.node.store.find("alert_out")] == told


async def test_availability_is_exact_on_a_controlled_timeline(tmp_path: Path) -> None:
    """Two devices over the turn of a local month: seconds per status, availability, outages
    and connections, per device and rolled up to the communes, district and province."""
    store = await SqliteStore.open(tmp_path / "s.db")
    hist = DeviceHistory(store)
    await hist.start()
    nov, dec = month_bounds("2026-11"), month_bounds("2026-12")
    assert nov[1] == dec[0] == datetime(2026, 12, 1, tzinfo=TZ).timestamp()
    t = dec[0] - 3600.0  # 23:00 on 30 November, local

    def ev(dev: str, area: str, status: str, previous: str, reason: str, at: float,
           faults: list[str] | None = None) -> None:
        hist.on_status({"device": dev, "area": area, "status": status, "previous": previous,
                        "reason": reason, "faults": faults or [], "ts": at})

    ev("d1", "T01-H1-X1", "online", "offline", "connected", t)
    ev("d2", "T01-H1-X2", "online", "offline", "connected", t)
    ev("d1", "T01-H1-X1", "offline", "online", "missed_heartbeats", t + 1800)  # 30 min up
    ev("d1", "T01-H1-X1", "online", "offline", "connected", t + 7200)  # down over midnight
    ev("d1", "T01-H1-X1", "online", "online", "connected", t + 7300)  # a reboot, stayed up
    ev("d2", "T01-H1-X2", "fault", "online", "faults", t + 5400, ["power_lost"])
    ev("d2", "T01-H1-X2", "online", "fault", "heartbeat", t + 9000)
    await hist.flush()
    now = t + 3600 + 10800  # 03:00 on 1 December

    tallies, areas = tally_month(await store.read_log(LOG, since=dec[0], until=dec[1],
                                                      limit=1000), hist.open.values(),
                                 "2026-12", now)
    d1, d2 = tallies["d1"], tallies["d2"]
    # d1 in December: offline 00:00-01:00 (continuing), online 01:00-03:00.
    assert d1.seconds == {"online": 7200.0, "fault": 0.0, "offline": 3600.0}
    assert d1.availability() == round(7200 / 10800, 6)
    assert (d1.outages, d1.connects) == (0, 2)  # the outage began in November
    # d2: online 00:00-00:30, fault (power lost) 00:30-01:30, online 01:30-03:00.
    assert d2.seconds == {"online": 1800.0 + 5400.0, "fault": 3600.0, "offline": 0.0}
    assert d2.faults == {"power_lost": 1} and d2.availability() == round(7200 / 10800, 6)

    nov_t, _ = tally_month(await store.read_log(LOG, since=nov[0], until=nov[1], limit=1000),
                           hist.open.values(), "2026-11", now)
    assert nov_t["d1"].seconds == {"online": 1800.0, "fault": 0.0, "offline": 1800.0}
    assert nov_t["d1"].outages == 1 and nov_t["d2"].seconds["online"] == 3600.0
    assert nov_t["d1"].connects == 1

    tree = AreaTree.from_csv(SAMPLE_CSV)
    rolled = roll_up(tallies, areas, tree, set(tree.subtree("T01")))
    assert set(rolled) == {"T01", "T01-H1", "T01-H1-X1", "T01-H1-X2"}
    assert rolled["T01-H1"].seconds == {"online": 14400.0, "fault": 3600.0, "offline": 3600.0}
    assert rolled["T01"].availability() == round(14400 / 21600, 6)
    assert rolled["T01-H1-X1"].seconds == d1.seconds
    await hist.stop()
    await store.close()
