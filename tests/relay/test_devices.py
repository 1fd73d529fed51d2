"""The device registry and control channel from the outside: a real node on 127.0.0.1, devices
as aiohttp WebSocket clients, operators through the REST API."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from loa.relay.devices import protocol
from loa.relay.devices.manager import DeviceSettings
from loa.relay.devices.records import new_device_record, new_key, secret_hash
from loa.web.api import devices as api_devices
from loa.web.auth import add_user
from loa.web.node import Node
from loa.web.testing import start_node
from tests.apiclient import PASSWORD, PEOPLE, make_config

EXTRA_PEOPLE = {"qtv11": ("admin", "T01-H1-X1", False), "qtvtinh": ("admin", "T01", True)}


@dataclass
class Server:
    node: Node
    base: str
    http: aiohttp.ClientSession
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def mgr(self) -> api_devices.DeviceManager:
        return self.node.devices

    app: web.Application = None  # type: ignore[assignment]

    async def call(self, who: str | None, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        async with self.http.request(method, self.base + path, headers=headers, **kw) as r:
            ctype = r.headers.get("Content-Type", "")
            body = await r.json() if ctype.startswith("application/json") else await r.text()
            return r.status, body

    async def register(self, area: str = "T01-H1-X1", who: str = "qtvtinh", **kw: Any
                       ) -> dict[str, Any]:
        body = {"name": kw.pop("name", f"Cụm loa {area}"), "kind": kw.pop("kind", "loudspeaker"),
                "area": area, **kw}
        status, dev = await self.call(who, "POST", "/api/v1/devices", json=body)
        assert status == 201, dev
        return dev

    async def provisioned(self, area: str = "T01-H1-X1", **kw: Any) -> Device:
        dev = await self.register(area, **kw)
        status, body = await self.call(None, "POST", "/api/v1/devices/provision",
                                       json={"device": dev["id"],
                                             "token": dev["provisioning_token"]})
        assert status == 201, body
        return Device(self, dev["id"], body["key"])


@dataclass
class Device:
    srv: Server
    id: str
    key: str
    ws: aiohttp.ClientWebSocketResponse | None = None

    async def open(self, key: str | None = None, **hello: Any) -> aiohttp.ClientWebSocketResponse:
        ws = await self.srv.http.ws_connect(self.srv.base + "/api/v1/devices/connect")
        await ws.send_str(json.dumps({"v": 1, "type": "hello", "device": self.id,
                                      "key": key or self.key, "firmware": "1.0.0", **hello}))
        return ws

    async def connect(self, **hello: Any) -> dict[str, Any]:
        self.ws = await self.open(**hello)
        welcome = await self.recv()
        assert welcome["type"] == "welcome", welcome
        return welcome

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        assert self.ws is not None
        msg = await self.ws.receive(timeout=timeout)
        assert msg.type is WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
        out: dict[str, Any] = json.loads(msg.data)
        assert out["v"] == 1
        return out

    async def send(self, obj: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send_str(json.dumps(obj))

    async def heartbeat(self, **kw: Any) -> None:
        await self.send({"v": 1, "type": "heartbeat", "state": "playing", "volume": 70, **kw})

    async def ack(self, cid: str, ok: bool = True, error: str | None = None) -> None:
        await self.send({"v": 1, "type": "ack", "id": cid, "ok": ok,
                         **({"error": error} if error else {})})

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
            self.ws = None


async def closed_with(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> int | None:
    """Read until the server closes; the close code."""
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.CLOSE:  # the server's close frame, as sent
                return int(msg.data)
            if msg.type in (WSMsgType.CLOSED, WSMsgType.CLOSING, WSMsgType.ERROR):
                return ws.close_code


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Wait until `check()` holds (polled); fail after `timeout` (a bound, not a measurement)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.02)


@asynccontextmanager
async def serving(tmp_path: Path, store: str = "sqlite", prefix: str = "loa:",
                  **settings: Any) -> AsyncIterator[Server]:
    cfg = make_config(tmp_path, store=store, prefix=prefix)
    cfg.devices = DeviceSettings(**settings)  # the [devices] config section

    async def people(node: Node) -> None:
        for name, (role, area, emergency) in {**PEOPLE, **EXTRA_PEOPLE}.items():
            if not await node.store.find("user", username=name):  # a restarted node has them
                await add_user(node.store, node.tree, name, role, area, PASSWORD, emergency)

    live = await start_node(cfg, realtime=False, prepare=people, backlog=1024, access_log=None)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    srv = Server(live.node, live.url, http)
    srv.app = live.app
    try:
        for name in ("tinh", "xa11", "huyen1", "xem11", "qtv1", "qtv11", "qtvtinh"):
            async with http.post(srv.base + "/api/v1/auth/token",
                                 json={"username": name, "password": PASSWORD}) as r:
                assert r.status == 201
                srv.tokens[name] = (await r.json())["token"]
        yield srv
    finally:
        await http.close()
        await live.stop()


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[Server]:
    async with serving(tmp_path, retry_interval=0.3, max_tries=3) as s:
        yield s


async def command_status(srv: Server, cid: str) -> str | None:
    rec = await srv.node.store.get("command", cid)
    return None if rec is None else rec["status"]


# ---- provisioning ------------------------------------------------------------------------------
async def test_provisioning_token_works_once_and_the_key_connects(srv: Server) -> None:
    dev = await srv.register("T01-H1-X1", capabilities={
        "codecs": ["mp3", "opus"], "transports": ["hls", "http", "webrtc"]})
    assert dev["status"] == "offline" and dev["provisioned"] is False
    token = dev["provisioning_token"]
    stored = await srv.node.store.get("device", dev["id"])
    assert token not in json.dumps(stored)  # only its hash is kept
    assert stored["provision"]["hash"] == secret_hash(token)
    assert 23.9 * 3600 < stored["provision"]["expires"] - time.time() <= 24 * 3600

    status, body = await srv.call(None, "POST", "/api/v1/devices/provision",
                                  json={"device": dev["id"], "token": "doan-mo"})
    assert status == 401
    status, body = await srv.call(None, "POST", "/api/v1/devices/provision",
                                  json={"device": dev["id"], "token": token})
    assert status == 201, body
    key = body["key"]
    assert body["connect"].startswith("ws://127.0.0.1:") and body["connect"].endswith(
        "/api/v1/devices/connect")
    stored = await srv.node.store.get("device", dev["id"])
    assert stored["key_hash"] == secret_hash(key) and "provision" not in stored
    assert key not in json.dumps(stored)
    status, body = await srv.call(None, "POST", "/api/v1/devices/provision",
                                  json={"device": dev["id"], "token": token})
    assert status == 401, body  # the token is void once exchanged

    d = Device(srv, dev["id"], key)
    welcome = await d.connect()
    cfg = welcome["config"]
    assert welcome["heartbeat"] == 60.0 and abs(welcome["server_time"] - time.time()) < 60
    assert cfg["area"] == "T01-H1-X1" and cfg["volume"] == 80 and cfg["power_schedule"] == []
    # The device's transports in its order, codecs in its order, only what the node serves.
    assert [(s["transport"], s["codec"]) for s in cfg["streams"]] == [
        ("hls", "mp3"), ("http", "mp3"), ("http", "opus"), ("webrtc", "opus")]
    assert cfg["streams"][0]["url"] == srv.base + "/streams/T01-H1-X1/index.m3u8"
    assert cfg["streams"][1]["url"] == srv.base + "/streams/T01-H1-X1.mp3?burst_ms=200"
    assert cfg["streams"][3]["url"] == srv.base + "/whep/T01-H1-X1"
    status, body = await srv.call("xa11", "GET", f"/api/v1/devices/{dev['id']}")
    assert status == 200 and body["status"] == "online" and body["provisioned"] is True
    assert body["firmware"] == "1.0.0" and "key_hash" not in body
    await d.close()


async def test_public_url_names_the_streams(tmp_path: Path) -> None:
    async with serving(tmp_path) as srv:
        srv.node.cfg.server.public_url = "https://loa.example.vn/"
        d = await srv.provisioned("T01-H2-X3")
        welcome = await d.connect()
        assert [s["url"] for s in welcome["config"]["streams"]] == [
            "https://loa.example.vn/streams/T01-H2-X3.opus?burst_ms=200",
            "https://loa.example.vn/streams/T01-H2-X3.mp3?burst_ms=200"]
        await d.close()


# ---- commands ----------------------------------------------------------------------------------
async def test_command_delivered_acked_and_config_pushed(srv: Server) -> None:
    d = await srv.provisioned()
    await d.connect()
    status, body = await srv.call("xa11", "POST", f"/api/v1/devices/{d.id}/commands",
                                  json={"command": "volume", "args": {"volume": 40}})
    assert status == 202 and body["online"] is True
    cmd = await d.recv()
    assert cmd["type"] == "command" and cmd["id"] == body["id"]
    assert cmd["command"] == "volume" and cmd["args"] == {"volume": 40}
    assert 590 < cmd["expires"] - time.time() <= 600
    assert await command_status(srv, cmd["id"]) == "sent"
    await d.ack(cmd["id"])
    await eventually(lambda: _is(srv, cmd["id"], "acked"))
    rec = await srv.node.store.get("command", cmd["id"])
    assert rec["tries"] == 1 and rec["issuer"] == "xa11" and rec["device"] == d.id

    # A refusal is a failed command with the device's reason.
    status, body = await srv.call("xa11", "POST", f"/api/v1/devices/{d.id}/commands",
                                  json={"command": "power", "args": {"on": True, "steps": [
                                      {"relay": 1, "delay_s": 0}, {"relay": 2, "delay_s": 30}]}})
    assert status == 202
    cmd = await d.recv()
    assert cmd["args"]["steps"][1] == {"relay": 2, "delay_s": 30.0}
    await d.ack(cmd["id"], ok=False, error="relay 2 stuck")
    await eventually(lambda: _is(srv, cmd["id"], "failed"))
    assert (await srv.node.store.get("command", cmd["id"]))["error"] == "relay 2 stuck"

    # Configuration changes reach a connected device at once.
    status, body = await srv.call("qtv1", "PATCH", f"/api/v1/devices/{d.id}",
                                  json={"volume": 55, "area": "T01-H1-X2",
                                        "power_schedule": [{"on": "05:00", "off": "06:30"}]})
    assert status == 200, body
    msg = await d.recv()
    assert msg["type"] == "config" and msg["config"]["volume"] == 55
    assert msg["config"]["area"] == "T01-H1-X2"
    assert msg["config"]["streams"][0]["url"].endswith("/streams/T01-H1-X2.opus?burst_ms=200")
    assert msg["config"]["power_schedule"] == [{"on": "05:00", "off": "06:30",
                                                "days": [1, 2, 3, 4, 5, 6, 7]}]
    stored = await srv.node.store.get("device", d.id)
    assert stored["volume"] == 55 and stored["area"] == "T01-H1-X2"
    # History, newest first.
    status, body = await srv.call("huyen1", "GET", f"/api/v1/devices/{d.id}/commands")
    assert [c["status"] for c in body["commands"]] == ["failed", "acked"]
    await d.close()


async def _is(srv: Server, cid: str, status: str) -> bool:
    return await command_status(srv, cid) == status


async def test_commands_for_an_offline_device_wait_and_arrive_in_order(srv: Server) -> None:
    d = await srv.provisioned()
    await d.connect()
    await d.close()
    await eventually(lambda: _true(srv.mgr.get(d.id).link is None))
    ids = []
    for vol in (10, 20, 30):
        status, body = await srv.call("xa11", "POST", f"/api/v1/devices/{d.id}/commands",
                                      json={"command": "volume", "args": {"volume": vol}})
        assert status == 202 and body["online"] is False
        ids.append(body["id"])
    assert [await command_status(srv, c) for c in ids] == ["queued"] * 3
    await d.connect()
    got = [await d.recv() for _ in ids]
    assert [m["id"] for m in got] == ids
    assert [m["args"]["volume"] for m in got] == [10, 20, 30]
    for cid in ids:
        await d.ack(cid)
    for cid in ids:
        await eventually(lambda cid=cid: _is(srv, cid, "acked"))
    await d.close()


async def _true(value: bool) -> bool:
    return value


async def test_queued_commands_survive_a_restart(tmp_path: Path) -> None:
    async with serving(tmp_path) as srv:
        d = await srv.provisioned()
        status, body = await srv.call("xa11", "POST", f"/api/v1/devices/{d.id}/commands",
                                      json={"command": "stop"})
        assert status == 202 and body["online"] is False
        cid = body["id"]
    # Same data directory: the device, its key and its queued command are back.
    async with serving(tmp_path) as srv2:
        d2 = Device(srv2, d.id, d.key)
        await d2.connect()
        cmd = await d2.recv()
        assert cmd["id"] == cid and cmd["command"] == "stop"
        await d2.close()


async def test_expired_command_is_never_delivered(srv: Server) -> None:
    d = await srv.provisioned()
    status, short = await srv.call("xa11", "POST", f"/api/v1/devices/{d.id}/commands",
                                   json={"command": "reboot", "ttl_s": 0.2})
    assert status == 202
    status, kept = await srv.call("xa11", "POST", f"/api/v1/devices/{d.id}/commands",
                                  json={"command": "volume", "args": {"volume": 5}})
    await asyncio.sleep(0.3)  # the first one's expiry passes while the device is away
    await d.connect()
    cmd = await d.recv()
    assert cmd["id"] == kept["id"]  # the reboot never arrives
    await d.ack(cmd["id"])
    await eventually(lambda: _is(srv, kept["id"], "acked"))
    assert await command_status(srv, short["id"]) == "expired"
    with pytest.raises(TimeoutError):
        await d.recv(timeout=0.5)
    await d.close()


async def test_unacked_command_is_sent_again_then_fails(srv: Server) -> None:
    d = await srv.provisioned()
    await d.connect()
    status, body = await srv.call("xa11", "POST", f"/api/v1/devices/{d.id}/commands",
                                  json={"command": "play", "args": {"volume": 90}})
    first = await d.recv()  # ignored: no ack
    again = await d.recv()
    assert again == first  # the same command, same id
    await d.ack(again["id"])
    await eventually(lambda: _is(srv, first["id"], "acked"))
    assert (await srv.node.store.get("command", first["id"]))["tries"] == 2

    status, body = await srv.call("xa11", "POST", f"/api/v1/devices/{d.id}/commands",
                                  json={"command": "stop"})
    copies = [await d.recv() for _ in range(3)]  # max_tries = 3, never acked
    assert {c["id"] for c in copies} == {body["id"]}
    await eventually(lambda: _is(srv, body["id"], "failed"))
    with pytest.raises(TimeoutError):
        await d.recv(timeout=0.8)  # no fourth copy
    await d.close()


# ---- connection rules ------------------------------------------------------------------------
async def test_bad_hellos_are_refused_with_their_codes(srv: Server) -> None:
    d = await srv.provisioned()
    ws = await d.open(key="sai-khoa")
    assert await closed_with(ws) == 4001
    ws = await Device(srv, "khong-co", d.key).open()
    assert await closed_with(ws) == 4001
    for first in ("không phải JSON", json.dumps({"v": 1, "type": "heartbeat"}),
                  json.dumps({"v": 2, "type": "hello", "device": d.id, "key": d.key}),
                  json.dumps({"v": 1, "type": "hello", "device": d.id})):
        ws = await srv.http.ws_connect(srv.base + "/api/v1/devices/connect")
        await ws.send_str(first)
        assert await closed_with(ws) == 4000, first
    # The device itself was never disturbed: it still connects.
    await d.connect()
    await d.close()
    status, body = await srv.call(None, "GET", "/api/v1/devices/connect")
    assert status == 426


async def test_hello_timeout(tmp_path: Path) -> None:
    async with serving(tmp_path, hello_timeout=0.3) as srv:
        ws = await srv.http.ws_connect(srv.base + "/api/v1/devices/connect")
        assert await closed_with(ws) == 4000


async def test_revoked_key_closes_the_session_and_is_refused(srv: Server) -> None:
    d = await srv.provisioned()
    await d.connect()
    status, body = await srv.call("qtv1", "POST", f"/api/v1/devices/{d.id}/revoke")
    assert status == 200 and body["revoked"] is True
    assert d.ws is not None
    assert await closed_with(d.ws) == 4003
    ws = await d.open()
    assert await closed_with(ws) == 4003
    # A new provisioning token gives the device a new key; the revoked one stays refused.
    status, body = await srv.call("qtv1", "POST", f"/api/v1/devices/{d.id}/provisioning")
    assert status == 201
    status, body = await srv.call(None, "POST", "/api/v1/devices/provision",
                                  json={"device": d.id, "token": body["provisioning_token"]})
    assert status == 201
    ws = await d.open()
    assert await closed_with(ws) == 4001
    d2 = Device(srv, d.id, body["key"])
    await d2.connect()
    await d2.close()


async def test_second_connection_replaces_the_first(srv: Server) -> None:
    d = await srv.provisioned()
    await d.connect()
    old = d.ws
    await d.connect()
    assert old is not None
    assert await closed_with(old) == 4009
    status, body = await srv.call("xa11", "POST", f"/api/v1/devices/{d.id}/commands",
                                  json={"command": "stop"})
    assert body["online"] is True
    cmd = await d.recv()
    assert cmd["id"] == body["id"]
    assert srv.mgr.connected == 1
    await d.close()


async def test_malformed_messages_get_errors_then_the_connection_closes(srv: Server) -> None:
    d = await srv.provisioned()
    await d.connect()
    assert d.ws is not None
    await d.ws.send_str("{không phải json")
    err = await d.recv()
    assert err["type"] == "error" and "malformed JSON" in err["error"]
    await d.send({"v": 1, "type": "dance"})
    assert "unknown message type" in (await d.recv())["error"]
    await d.send({"v": 1, "type": "heartbeat", "state": "playing", "volume": 300})
    assert "volume" in (await d.recv())["error"]
    await d.ws.send_bytes(b"\x00\x01")
    assert (await d.recv())["type"] == "error"
    for _ in range(5):
        await d.ws.send_str("[]")
        assert (await d.recv())["type"] == "error"
    await d.ws.send_str("rác")  # the tenth
    assert await closed_with(d.ws) == 4008

    await d.connect()  # a new connection starts from zero errors
    assert d.ws is not None
    await d.ws.send_str("x" * (65 * 1024))
    assert await closed_with(d.ws) == 1009


# ---- heartbeats and status -----------------------------------------------------------------------
async def test_offline_after_two_missed_heartbeats_with_bus_events(tmp_path: Path) -> None:
    async with serving(tmp_path, heartbeat=0.5) as srv:
        events = await srv.node.bus.subscribe("device.status")
        d = await srv.provisioned()
        welcome = await d.connect()
        assert welcome["heartbeat"] == 0.5
        ev = await events.get(timeout=5)
        assert (ev["device"], ev["status"], ev["previous"]) == (d.id, "online", "offline")
        await d.heartbeat(faults=["speaker_open"])
        ev = await events.get(timeout=5)
        assert (ev["status"], ev["faults"]) == ("fault", ["speaker_open"])
        assert (await srv.node.store.get("device", d.id))["status"] == "fault"
        await d.heartbeat()
        ev = await events.get(timeout=5)
        assert (ev["status"], ev["previous"]) == ("online", "fault")
        # Silence: two heartbeats missed -> offline, and the connection is closed.
        ev = await events.get(timeout=5)
        assert (ev["device"], ev["status"], ev["reason"]) == (d.id, "offline",
                                                              "missed_heartbeats")
        assert d.ws is not None
        assert await closed_with(d.ws) == 4002
        assert (await srv.node.store.get("device", d.id))["status"] == "offline"
        await events.close()


async def test_heartbeats_kept_in_memory_written_in_batches(tmp_path: Path) -> None:
    async with serving(tmp_path, persist_interval=3600.0) as srv:
        d = await srv.provisioned()
        await d.connect()
        await eventually(lambda: _stored_status(srv, d.id, "online"))
        for i in range(20):
            await d.heartbeat(volume=i, network={"type": "4g", "signal_dbm": -71},
                              stream={"url": "x", "loss": 0.01, "jitter_ms": 4,
                                      "latency_ms": 120, "skew_ms": -3}, gps=[15.88, 108.33],
                              power={"voltage": 12.1, "amp": True, "relays": [True, False]})
        await eventually(lambda: _true(srv.mgr.stats["heartbeats"] == 20))
        status, body = await srv.call("xa11", "GET", f"/api/v1/devices/{d.id}")
        assert body["telemetry"]["volume"] == 19
        assert body["telemetry"]["network"] == {"type": "4g", "signal_dbm": -71.0}
        assert (await srv.node.store.get("device", d.id)).get("telemetry") is None  # not yet
        srv.mgr._persist_telemetry()  # what the periodic task does every persist_interval
        await eventually(lambda: _stored_volume(srv, d.id, 19))
        await d.close()


async def _stored_status(srv: Server, dev_id: str, status: str) -> bool:
    rec = await srv.node.store.get("device", dev_id)
    return rec is not None and rec["status"] == status


async def _stored_volume(srv: Server, dev_id: str, volume: int) -> bool:
    rec = await srv.node.store.get("device", dev_id)
    return rec is not None and (rec.get("telemetry") or {}).get("volume") == volume


# ---- REST rights ----------------------------------------------------------------------------------
async def test_registration_needs_an_admin_of_the_area(srv: Server) -> None:
    body = {"name": "Loa chợ", "kind": "loudspeaker", "area": "T01-H1-X1"}
    status, _ = await srv.call("xem11", "POST", "/api/v1/devices", json=body)
    assert status == 403  # viewer
    status, _ = await srv.call("xa11", "POST", "/api/v1/devices", json=body)
    assert status == 403  # operator
    status, _ = await srv.call("qtv11", "POST", "/api/v1/devices",
                               json={**body, "area": "T01-H1-X2"})
    assert status == 403  # commune admin, another commune
    status, _ = await srv.call("qtv11", "POST", "/api/v1/devices", json=body)
    assert status == 201
    status, err = await srv.call("qtv11", "POST", "/api/v1/devices",
                                 json={**body, "kind": "radio"})
    assert status == 422 and err["field"] == "kind"
    status, err = await srv.call("qtv11", "POST", "/api/v1/devices",
                                 json={**body, "capabilities": {"codecs": ["flac"]}})
    assert status == 422 and err["field"] == "capabilities.codecs"
    status, err = await srv.call("qtv11", "POST", "/api/v1/devices",
                                 json={**body, "groups": [f"g{i}" for i in range(11)]})
    assert status == 422 and err["field"] == "groups"
    status, _ = await srv.call(None, "POST", "/api/v1/devices", json=body)
    assert status == 401


async def test_listing_filters_and_scopes(srv: Server) -> None:
    online = await srv.provisioned("T01-H1-X1", name="A")
    faulty = await srv.provisioned("T01-H1-X1", name="B")
    never = await srv.register("T01-H1-X2", name="C", kind="board",
                               capabilities={"display": {"width": 1920, "height": 1080}})
    elsewhere = await srv.register("T01-H2-X1", name="D")
    await online.connect()
    await faulty.connect()
    await faulty.heartbeat(faults=["power_lost"])
    await eventually(lambda: _true(srv.mgr.get(faulty.id).status == "fault"))

    async def ids(who: str, query: str = "") -> set[str]:
        status, body = await srv.call(who, "GET", f"/api/v1/devices{query}")
        assert status == 200, body
        assert body["total"] == len(body["devices"])
        return {d["id"] for d in body["devices"]}

    assert await ids("huyen1") == {online.id, faulty.id, never["id"]}
    assert await ids("tinh") == {online.id, faulty.id, never["id"], elsewhere["id"]}
    assert await ids("tinh", "?status=online") == {online.id}
    assert await ids("tinh", "?status=fault") == {faulty.id}
    assert await ids("tinh", "?status=offline") == {never["id"], elsewhere["id"]}
    assert await ids("tinh", "?kind=board") == {never["id"]}
    assert await ids("tinh", "?area=T01-H1-X1&status=online") == {online.id}
    assert await ids("xa11") == {online.id, faulty.id}
    status, _ = await srv.call("xa11", "GET", "/api/v1/devices?area=T01-H1")
    assert status == 403
    status, _ = await srv.call("xa11", "GET", f"/api/v1/devices/{never['id']}")
    assert status == 404  # outside the caller's area: not even its existence
    status, _ = await srv.call("tinh", "GET", "/api/v1/devices?status=broken")
    assert status == 422
    # Commands: air right, emergency right, display only to boards.
    status, _ = await srv.call("xem11", "POST", f"/api/v1/devices/{online.id}/commands",
                               json={"command": "stop"})
    assert status == 403
    status, _ = await srv.call("xa11", "POST", "/api/v1/devices/commands",
                               json={"area": "T01-H1-X1", "command": "emergency",
                                     "args": {"on": True}})
    assert status == 403
    status, err = await srv.call("xa11", "POST", f"/api/v1/devices/{online.id}/commands",
                                 json={"command": "display", "args": {"text": "Bão số 3"}})
    assert status == 422
    status, err = await srv.call("xa11", "POST", f"/api/v1/devices/{online.id}/commands",
                                 json={"command": "volume", "args": {"volume": 101}})
    assert status == 422 and err["field"] == "args.volume"
    status, body = await srv.call("tinh", "POST", "/api/v1/devices/commands",
                                  json={"area": "T01-H1", "command": "display",
                                        "args": {"text": "Bão số 3", "layout": "full"}})
    assert status == 202 and (body["devices"], body["online"]) == (1, 0)
    # Delete: the device is gone and its connection closed.
    status, _ = await srv.call("qtv1", "DELETE", f"/api/v1/devices/{online.id}")
    assert status == 204
    assert online.ws is not None
    assert await closed_with(online.ws) == 4003
    assert await srv.node.store.get("device", online.id) is None
    assert await ids("tinh") == {faulty.id, never["id"], elsewhere["id"]}
    await faulty.close()
    entries = await srv.node.store.read_log("audit")
    actions = [e["action"] for e in entries]
    assert actions.count("device.create") == 4 and "device.delete" in actions
    assert "device.commands" in actions and actions.count("device.provision") == 2


# ---- scale -----------------------------------------------------------------------------------------
async def test_bulk_command_reaches_2000_connected_devices(tmp_path: Path) -> None:
    n = 2000
    async with serving(tmp_path, heartbeat=600.0) as srv:
        areas = ["T01-H1-X1", "T01-H1-X2", "T01-H1-X3", "T01-H2-X1", "T01-H2-X2", "T01-H2-X3"]
        keys = {}
        for i in range(n):
            rec = new_device_record(f"Loa {i}", "loudspeaker", areas[i % 6],
                                    {"codecs": ["opus"], "transports": ["http"]}, [],
                                    volume=80)
            keys[rec["id"]] = key = new_key()
            rec["key_hash"] = secret_hash(key)
            await srv.mgr.create(rec)
        acked: dict[str, float] = {}
        welcomed = asyncio.Semaphore(0)
        all_acked = asyncio.Event()
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        gate = asyncio.Semaphore(100)  # connections being set up at once

        async def device(dev_id: str, key: str) -> None:
            async with gate:
                ws = await http.ws_connect(srv.base + "/api/v1/devices/connect")
                await ws.send_str(json.dumps({"v": 1, "type": "hello", "device": dev_id,
                                              "key": key}))
                assert json.loads((await ws.receive()).data)["type"] == "welcome"
            welcomed.release()
            async for msg in ws:
                m = json.loads(msg.data)
                if m["type"] == "command":
                    await ws.send_str(json.dumps({"v": 1, "type": "ack", "id": m["id"],
                                                  "ok": True}))
                    acked[m["id"]] = time.perf_counter()
                    if len(acked) == n:
                        all_acked.set()

        tasks = [asyncio.create_task(device(i, k)) for i, k in keys.items()]
        try:
            for _ in range(n):
                await welcomed.acquire()
            assert srv.mgr.connected == n
            # A welcomed device is ready once the server delivered its (empty) backlog: under
            # load the last ones still were when the command went out and counted as queued.
            deadline = asyncio.get_running_loop().time() + 30
            while not all(d.ready for d in srv.mgr.devices.values()):
                assert asyncio.get_running_loop().time() < deadline, "devices never ready"
                await asyncio.sleep(0.05)
            t0 = time.perf_counter()
            status, body = await srv.call("tinh", "POST", "/api/v1/devices/commands",
                                          json={"area": "T01", "command": "emergency",
                                                "args": {"on": True, "volume": 100,
                                                         "text": "Bão số 3"}})
            t_resp = time.perf_counter()
            assert status == 202, body
            assert (body["devices"], body["online"]) == (n, n)
            await asyncio.wait_for(all_acked.wait(), 30)
            t_all = time.perf_counter()
            assert len(acked) == n and all(c.startswith(body["command_batch"]) for c in acked)
            await eventually(lambda: _count(srv, "acked", n), timeout=30)
            status, tally = await srv.call("tinh", "GET",
                                           f"/api/v1/devices/commands/{body['command_batch']}")
            assert (tally["devices"], tally["acked"], tally["sent"], tally["queued"]) == (
                n, n, 0, 0)
            print(json.dumps({"devices": n, "http_202_ms": round((t_resp - t0) * 1000, 1),
                              "all_received_ms": round((t_all - t0) * 1000, 1)}))
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await http.close()


async def _count(srv: Server, status: str, n: int) -> bool:
    return await srv.node.store.count("command", status=status) == n


async def test_writer_stops_with_a_marker_when_the_store_swallows_cancellation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py 8 may swallow a cancellation in the middle of a command and run on: the device
    writers must end by themselves once their write is done, not wait for a cancellation."""
    from loa.relay.devices import manager as control
    from loa.relay.devices import writer
    from loa.streamer.state.open import open_store

    monkeypatch.setattr(writer, "WRITER_STOP_TIMEOUT", 3.0)  # the old code waited it out
    monkeypatch.setattr(control, "WRITER_STOP_TIMEOUT", 3.0)
    store = await open_store("sqlite", tmp_path)
    real_put_many = store.put_many
    started = asyncio.Event()

    async def swallowing_put_many(kind: str, records: list[dict[str, Any]]) -> None:
        started.set()
        try:
            await asyncio.sleep(0.5)
        except asyncio.CancelledError:
            pass  # what the client library does: the cancellation is lost, the write goes on
        await real_put_many(kind, records)

    async def publish(topic: str, msg: dict[str, Any]) -> None:
        pass

    mgr = control.DeviceManager(store, publish, DeviceSettings())
    await mgr.start()
    try:
        dev = await mgr.create(new_device_record("Cụm loa", "loudspeaker", "T01-H1-X1", {}, [],
                                                 volume=80))
        monkeypatch.setattr(store, "put_many", swallowing_put_many)
        dev.record["volume"] = 55
        mgr._devw.mark(dev.record)
        await started.wait()  # a write is in flight when the node stops
        await mgr.stop()
        assert mgr._devw._task is not None and mgr._devw._task.done()
        assert not mgr._devw._task.cancelled()  # it ended by itself, after its write
        assert mgr._cmdw._task is not None and mgr._cmdw._task.done()
        rec = await store.get("device", dev.id)
        assert rec is not None and rec["volume"] == 55  # the write in flight was not lost
    finally:
        await store.close()



# ---- a cluster: two nodes on one Redis store and bus ----------------------------------------------
async def test_commands_reach_a_device_connected_to_another_node(
        tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    """Registered on A, connected to B: a command issued on A is routed to B over the bus, the
    device gets it once, its ack is recorded and visible from A; a command that expires while
    the device is away is never delivered by the node it comes back to."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with serving(tmp_path / "a", redis_url, redis_prefix, retry_interval=0.3) as a, \
            serving(tmp_path / "b", redis_url, redis_prefix, retry_interval=0.3) as b:
        assert a.mgr.node_id and b.mgr.node_id and a.mgr.node_id != b.mgr.node_id
        d = await a.provisioned("T01-H1-X1")  # B started before it existed
        d.srv = b
        await d.connect()
        dev_a = a.mgr.get(d.id)
        assert dev_a is not None

        async def a_knows() -> bool:
            return dev_a.record.get("node") == b.mgr.node_id and dev_a.status == "online"
        await eventually(a_knows)

        status, body = await a.call("xa11", "POST", f"/api/v1/devices/{d.id}/commands",
                                    json={"command": "volume", "args": {"volume": 35}})
        assert status == 202 and body["routed"] is True, body
        cmd = await d.recv()
        assert cmd["type"] == "command" and cmd["id"] == body["id"]
        assert cmd["command"] == "volume" and cmd["args"] == {"volume": 35}
        await d.ack(cmd["id"])

        async def acked_on_a() -> bool:
            status, rows = await a.call("xa11", "GET", f"/api/v1/devices/{d.id}/commands")
            return status == 200 and [r["status"] for r in rows["commands"]
                                      if r["id"] == body["id"]] == ["acked"]
        await eventually(acked_on_a)
        # The same command routed again (a bus redelivery): settled, never sent twice.
        stored = await a.node.store.get("command", body["id"])
        await a.node.bus.send(f"devices.{b.mgr.node_id}", {"v": 1, "command": stored})

        # Away from B (still online for two heartbeats): a short-lived command issued on A
        # waits at B, expires there, and is not delivered when the device comes back to A.
        await d.close()
        await eventually(lambda: _async(b.mgr.get(d.id).link is None))  # type: ignore[union-attr]
        status, short = await a.call("xa11", "POST", f"/api/v1/devices/{d.id}/commands",
                                     json={"command": "volume", "args": {"volume": 20},
                                           "ttl_s": 0.3})
        assert status == 202 and short["routed"] is True
        status, later = await a.call("xa11", "POST", f"/api/v1/devices/{d.id}/commands",
                                     json={"command": "volume", "args": {"volume": 60}})
        assert status == 202
        await asyncio.sleep(0.5)  # past the first one's expiry
        d.srv = a
        await d.connect()  # back, to node A this time
        cmd = await d.recv()
        assert cmd["id"] == later["id"] and cmd["args"] == {"volume": 60}  # not the expired one
        await d.ack(cmd["id"])

        async def settled() -> bool:
            return (await command_status(a, short["id"]) == "expired"
                    and await command_status(a, later["id"]) == "acked")
        await eventually(settled, 10.0)
        assert b.mgr.stats["received"] >= 1
        with pytest.raises(asyncio.TimeoutError):
            await d.recv(timeout=1.0)  # nothing else: no duplicate from B's hand-over
        await d.close()

        # Served by B again, then revoked on A: B reads the record again at the next hello.
        d.srv = b
        await d.connect()
        await d.close()

        async def a_knows_b_again() -> bool:
            return dev_a.record.get("node") == b.mgr.node_id
        await eventually(a_knows_b_again)
        status, _ = await a.call("qtvtinh", "POST", f"/api/v1/devices/{d.id}/revoke")
        assert status == 200
        assert await closed_with(await d.open()) == 4003

    # Connected to B and revoked on A: B closes the session.
    async with serving(tmp_path / "a", redis_url, redis_prefix) as a, \
            serving(tmp_path / "b", redis_url, redis_prefix) as b:
        d2 = await a.provisioned("T01-H1-X1")
        d2.srv = b
        await d2.connect()
        dev2 = a.mgr.get(d2.id)

        async def a_knows_d2() -> bool:
            return dev2 is not None and dev2.record.get("node") == b.mgr.node_id
        await eventually(a_knows_d2)
        status, _ = await a.call("qtvtinh", "POST", f"/api/v1/devices/{d2.id}/revoke")
        assert status == 200
        assert d2.ws is not None and await closed_with(d2.ws) == 4003


async def _async(value: bool) -> bool:
    return value


async def test_an_emergency_started_on_one_node_reaches_devices_on_another_once(
        tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    """The node serving a device sends it the emergency (it hears of it on the bus); the node
    that started it must not queue a second copy that a reconnect would deliver again."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with serving(tmp_path / "a", redis_url, redis_prefix) as a, \
            serving(tmp_path / "b", redis_url, redis_prefix) as b:
        d = await a.provisioned("T01-H1-X1")
        d.srv = b
        await d.connect()  # served by B

        async def a_knows() -> bool:
            dev = a.mgr.get(d.id)
            return dev is not None and dev.record.get("node") == b.mgr.node_id
        await eventually(a_knows)
        status, em = await a.call("tinh", "POST", "/api/v1/emergencies", json={
            "targets": ["T01-H1-X1"], "content": {"text": "Bão."}, "text": "BÃO"})
        assert status == 201, em
        cmd = await d.recv(timeout=10.0)
        assert cmd["command"] == "emergency" and cmd["args"]["text"] == "BÃO"
        await d.ack(cmd["id"])

        async def all_acked() -> bool:
            rows = await a.node.store.find("command", device=d.id)
            return [r["status"] for r in rows if r["command"] == "emergency"] == ["acked"]
        await eventually(all_acked)
        with pytest.raises(asyncio.TimeoutError):
            await d.recv(timeout=1.0)
        # Back on node A: the emergency is in its config, no second command.
        await d.close()
        d.srv = a
        welcome = await d.connect()
        assert welcome["config"]["emergency"]["text"] == "BÃO"
        with pytest.raises(asyncio.TimeoutError):
            await d.recv(timeout=1.0)
        await d.close()
        status, _ = await a.call("tinh", "DELETE", f"/api/v1/emergencies/{em['id']}")
        assert status == 200


def test_what_a_device_builds_is_what_the_node_reads() -> None:
    """Both ends speak relay/devices/protocol.py: the device's hello, ack and heartbeat parse on
    the node, and a message of another version is refused by both."""
    caps = {"codecs": ["opus"], "transports": ["http", "rtp"]}
    raw = json.dumps(protocol.hello_message("d1", "k" * 43, "loa-agent/1", caps),
                     ensure_ascii=False)
    hello = protocol.parse_hello(protocol.parse_message(raw))
    assert (hello.device, hello.key, hello.firmware, hello.capabilities) == (
        "d1", "k" * 43, "loa-agent/1", caps)
    assert "capabilities" not in protocol.hello_message("d1", "k", "fw")
    ack = protocol.ack_message("c1", False, "x" * 900)
    assert protocol.parse_ack(protocol.parse_message(json.dumps(ack))) == ("c1", False, "x" * 500)
    assert "error" not in protocol.ack_message("c1", True, "ignored")
    beat = protocol.heartbeat_message({"state": "idle", "volume": 30, "faults": []})
    assert protocol.parse_heartbeat(protocol.parse_message(json.dumps(beat)))["volume"] == 30
    for v in (2, True, None):
        assert not protocol.same_version({"v": v, "type": "ack"})
        with pytest.raises(protocol.ProtocolError):
            protocol.parse_message(json.dumps({"v": v, "type": "ack"}))
