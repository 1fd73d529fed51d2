"""The device protocol over MQTT, against a real Mosquitto this test starts with the dynamic-security
plugin (relay/devices/mosquitto.py): the node administers device accounts, the broker enforces
them, devices are the reference client (relay/agent/mqtt.py) or raw aiomqtt sessions."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest
from aiomqtt.exceptions import MqttConnectError

from loa.relay.agent.client import Command, Outcome
from loa.relay.agent.mqtt import MqttDeviceClient
from loa.relay.agent.sim import Fleet
from loa.relay.devices.manager import DeviceManager, DeviceSettings
from loa.relay.devices.mosquitto import ManagedBroker, free_port
from loa.relay.devices.mqtt import MqttLink, MqttSettings
from loa.web.auth import add_user
from loa.web.node import Node
from loa.web.testing import start_node
from tests.apiclient import PASSWORD, PEOPLE, make_config
from tests.helpers import until

ADMIN, ADMIN_PASSWORD = "loa-admin", "broker-admin-secret"
EXTRA_PEOPLE = {"qtvtinh": ("admin", "T01", True)}


@dataclass
class Server:
    node: Node
    base: str
    http: aiohttp.ClientSession
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def mgr(self) -> DeviceManager:
        return self.node.devices

    async def call(self, who: str | None, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        async with self.http.request(method, self.base + path, headers=headers, **kw) as r:
            return r.status, await r.json(content_type=None)

    async def register(self, area: str) -> dict[str, Any]:
        status, dev = await self.call("qtvtinh", "POST", "/api/v1/devices", json={
            "name": f"Cụm loa {area}", "kind": "loudspeaker", "area": area})
        assert status == 201, dev
        return dev


async def eventually(cond: Callable[[], Any], timeout: float = 5.0) -> None:
    await until(cond, "the condition", timeout)


@asynccontextmanager
async def mqtt_node(tmp_path: Path, broker: ManagedBroker, **settings: Any
                    ) -> AsyncIterator[Server]:
    cfg = make_config(tmp_path)
    cfg.devices = DeviceSettings(**settings)
    cfg.mqtt = MqttSettings(enabled=True, url=broker.url, username=ADMIN,
                            password=ADMIN_PASSWORD)
    port = free_port()
    cfg.server.public_url = f"http://127.0.0.1:{port}"

    async def people(node: Node) -> None:
        for name, (role, area, emergency) in {**PEOPLE, **EXTRA_PEOPLE}.items():
            if not await node.store.find("user", username=name):
                await add_user(node.store, node.tree, name, role, area, PASSWORD, emergency)

    live = await start_node(cfg, realtime=False, prepare=people, port=port, access_log=None)
    http = aiohttp.ClientSession()
    srv = Server(live.node, live.url, http)
    try:
        for name in ("xa11", "qtvtinh"):
            async with http.post(srv.base + "/api/v1/auth/token",
                                 json={"username": name, "password": PASSWORD}) as r:
                srv.tokens[name] = (await r.json())["token"]
        assert live.node.mqtt is not None
        async with asyncio.timeout(15):  # first start: the node role is added, one reconnect
            await live.node.mqtt.ready.wait()
        yield srv
    finally:
        await http.close()
        await live.stop()


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[ManagedBroker]:
    b = ManagedBroker(tmp_path / "broker", ADMIN, ADMIN_PASSWORD)
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


@pytest.fixture
async def srv(tmp_path: Path, broker: ManagedBroker) -> AsyncIterator[Server]:
    async with mqtt_node(tmp_path, broker, retry_interval=0.5) as s:
        yield s


class Speaker:
    """The reference MQTT client with a command log."""

    def __init__(self, srv: Server, broker: ManagedBroker, dev_id: str, key: str) -> None:
        self.commands: list[Command] = []
        self.configs: list[dict[str, Any]] = []
        self.client = MqttDeviceClient(
            broker.url, srv.base, dev_id, key, session=srv.http, firmware="2.0.0",
            telemetry=lambda: {"state": "playing", "volume": 70}, on_command=self.on_command,
            on_config=self.on_config, backoff_min=0.2, backoff_max=0.5)
        self.task = asyncio.get_running_loop().create_task(self.client.run())

    async def on_command(self, cmd: Command) -> Outcome:
        self.commands.append(cmd)
        return True, None

    async def on_config(self, config: dict[str, Any]) -> None:
        self.configs.append(config)

    async def stop(self) -> int:
        self.client.stop()
        async with asyncio.timeout(10):
            return await self.task


async def provisioned(srv: Server) -> tuple[str, str]:
    dev = await srv.register("T01-H1-X1")
    status, body = await srv.call(None, "POST", "/api/v1/devices/provision",
                                  json={"device": dev["id"], "token": dev["provisioning_token"]})
    assert status == 201, body
    assert body["mqtt"] == {"url": srv.node.cfg.mqtt.url, "prefix": "vs",
                            "username": dev["id"]}
    return dev["id"], body["key"]


async def status_of(srv: Server, cid: str) -> str | None:
    rec = await srv.node.store.get("command", cid)
    return None if rec is None else rec["status"]


async def online(srv: Server, dev_id: str) -> None:
    async def check() -> bool:
        d = srv.mgr.get(dev_id)
        return d is not None and d.status == "online" and d.link is not None
    await eventually(check, timeout=10)


def raw(broker: ManagedBroker, user: str, password: str, **kw: Any) -> aiomqtt.Client:
    kw.setdefault("protocol", aiomqtt.ProtocolVersion.V5)  # SUBACK reason codes
    return aiomqtt.Client("127.0.0.1", broker.port, username=user, password=password,
                          identifier=user, **kw)


# ---- the protocol over the broker ---------------------------------------------------------------
async def test_command_reaches_an_mqtt_device_and_its_ack_is_recorded(
        srv: Server, broker: ManagedBroker) -> None:
    dev_id, key = await provisioned(srv)
    sp = Speaker(srv, broker, dev_id, key)
    await online(srv, dev_id)
    await eventually(lambda: _true(sp.client.stats["welcomes"] == 1))
    assert sp.configs and sp.configs[-1]["streams"][0]["url"].startswith(srv.base)
    status, body = await srv.call("xa11", "POST", f"/api/v1/devices/{dev_id}/commands",
                                  json={"command": "volume", "args": {"volume": 35}})
    assert status == 202 and body["online"] is True

    async def acked() -> bool:
        return await status_of(srv, body["id"]) == "acked"
    await eventually(acked, timeout=10)
    assert [(c.id, c.command, c.args) for c in sp.commands] == [
        (body["id"], "volume", {"volume": 35})]
    rec = await srv.node.store.get("command", body["id"])
    assert rec["tries"] == 1 and rec["issuer"] == "xa11"

    # Heartbeats carry the telemetry as over the WebSocket.
    assert await sp.client.send_heartbeat()
    await eventually(lambda: _true(srv.mgr.get(dev_id).telemetry is not None))  # type: ignore
    # The configuration is retained: a session that only subscribes gets it from the broker.
    async with raw(broker, dev_id, key) as c:
        await c.subscribe(f"vs/sub/{dev_id}/config", qos=1)
        async with asyncio.timeout(5):
            async for m in c.messages:
                assert m.retain
                cfg = json.loads(m.payload)  # type: ignore[arg-type]
                assert cfg["type"] == "config" and cfg["config"]["device"] == dev_id
                break
    assert await sp.stop() == 0


async def _true(v: bool) -> bool:
    return v


async def test_a_device_cannot_read_or_write_another_devices_topics(
        srv: Server, broker: ManagedBroker) -> None:
    a_id, a_key = await provisioned(srv)
    b_id, _ = await provisioned(srv)
    # A speaking as B: the broker drops the message and ends A's session. A's own hello, on a
    # new session after that, reaches the node and makes A online; B's never did.
    received = srv.node.mqtt.stats["received"]  # type: ignore[union-attr]
    with pytest.raises(aiomqtt.MqttError):
        async with raw(broker, a_id, a_key) as a:
            for _ in range(50):
                await a.publish(f"vs/pub/{b_id}", json.dumps(
                    {"v": 1, "type": "hello", "device": b_id, "firmware": "x"}), qos=1)
                await asyncio.sleep(0.1)
    async with raw(broker, a_id, a_key) as a:
        await a.publish(f"vs/pub/{a_id}", json.dumps(
            {"v": 1, "type": "hello", "device": a_id, "firmware": "x"}), qos=1)
        await online(srv, a_id)
    assert srv.node.mqtt.stats["received"] == received + 1  # type: ignore[union-attr]
    assert srv.mgr.get(b_id).status == "offline"  # type: ignore[union-attr]

    async with raw(broker, a_id, a_key) as a:
        refused = await a.subscribe(f"vs/sub/{b_id}/#", qos=1)
        assert [r.value for r in refused] == [135]  # SUBACK: not authorised
        assert [r.value for r in await a.subscribe("vs/pub/#", qos=1)] == [135]
        assert [r.value for r in await a.subscribe(f"vs/sub/{a_id}/#", qos=1)] == [1]
        # A command for B does not reach A (B's goes first, A's after it arrives).
        await srv.mgr.issue([srv.mgr.get(b_id)], "volume", {"volume": 10},  # type: ignore
                            single=True)
        await srv.mgr.issue([srv.mgr.get(a_id)], "volume", {"volume": 20},  # type: ignore
                            single=True)
        got: list[str] = []
        async with asyncio.timeout(5):
            async for m in a.messages:
                msg = json.loads(m.payload)  # type: ignore[arg-type]
                got.append(str(m.topic))
                if msg["type"] == "command":
                    assert msg["args"] == {"volume": 20}
                    break
        assert all(t.startswith(f"vs/sub/{a_id}") for t in got), got
    # No account at all: refused at CONNECT.
    with pytest.raises(MqttConnectError):
        async with raw(broker, "intruder", "x"):
            pass


async def test_revoked_credentials_are_refused_and_the_session_kicked(
        srv: Server, broker: ManagedBroker) -> None:
    dev_id, key = await provisioned(srv)
    sp = Speaker(srv, broker, dev_id, key)
    await online(srv, dev_id)
    status, _ = await srv.call("qtvtinh", "POST", f"/api/v1/devices/{dev_id}/revoke")
    assert status == 200
    async with asyncio.timeout(10):  # kicked by the broker, then its login refused: final
        assert await sp.task == 4001
    with pytest.raises(MqttConnectError) as e:
        async with raw(broker, dev_id, key):
            pass
    assert e.value.rc.value == 135  # type: ignore[union-attr]
    # Provisioned again (a replaced device): the new key works, the old one not.
    status, body = await srv.call("qtvtinh", "POST", f"/api/v1/devices/{dev_id}/provisioning")
    assert status == 201, body
    status, prov = await srv.call(None, "POST", "/api/v1/devices/provision",
                                  json={"device": dev_id, "token": body["provisioning_token"]})
    assert status == 201
    async with raw(broker, dev_id, prov["key"]) as c:
        assert [r.value for r in await c.subscribe(f"vs/sub/{dev_id}/#", qos=1)] == [1]
    with pytest.raises(MqttConnectError):
        async with raw(broker, dev_id, key):
            pass


async def test_account_changes_answer_503_while_the_broker_is_down(
        srv: Server, broker: ManagedBroker) -> None:
    dev = await srv.register("T01-H1-X1")
    await broker.stop()
    status, body = await srv.call(None, "POST", "/api/v1/devices/provision",
                                  json={"device": dev["id"], "token": dev["provisioning_token"]})
    assert status == 503, body
    await broker.start()
    assert srv.node.mqtt is not None
    async with asyncio.timeout(20):
        while not srv.node.mqtt.ready.is_set():
            await asyncio.sleep(0.05)
    status, body = await srv.call(None, "POST", "/api/v1/devices/provision",
                                  json={"device": dev["id"], "token": dev["provisioning_token"]})
    assert status == 201, body  # the token was not spent by the refused attempt


async def test_a_device_that_dies_is_offline_by_its_last_will(
        srv: Server, broker: ManagedBroker) -> None:
    """The agent in its own process, killed (no DISCONNECT): the broker publishes its will and the
    node marks it offline; the heartbeat is 60 s, so two missed ones cannot be why."""
    dev_id, key = await provisioned(srv)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loa.web.cli", "device", "--server", srv.base, "--key",
        f"{dev_id}:{key}", "--control", "mqtt", "--broker", broker.url, "--sink", "null",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    events = await srv.node.bus.subscribe("device.status")
    try:
        await online(srv, dev_id)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        async with asyncio.timeout(10):
            async for ev in events:
                if ev["device"] == dev_id and ev["status"] == "offline":
                    assert ev["reason"] == "last_will"
                    break
        assert srv.mgr.get(dev_id).link is None  # type: ignore[union-attr]
    finally:
        await events.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_commands_survive_a_broker_restart(srv: Server, broker: ManagedBroker) -> None:
    """A command issued while the broker is down is not lost: the node holds it and sends it
    once the device is back through the restarted broker, where it is acked."""
    dev_id, key = await provisioned(srv)
    sp = Speaker(srv, broker, dev_id, key)
    await online(srv, dev_id)
    await broker.stop(signal.SIGKILL)  # a crash, not a clean shutdown
    status, body = await srv.call("xa11", "POST", f"/api/v1/devices/{dev_id}/commands",
                                  json={"command": "volume", "args": {"volume": 61}})
    assert status == 202
    assert await status_of(srv, body["id"]) in ("queued", "sent")
    await broker.start()  # same port, same accounts (on disk)

    async def acked() -> bool:
        return await status_of(srv, body["id"]) == "acked"
    await eventually(acked, timeout=30)
    assert [c.args for c in sp.commands if c.id == body["id"]] == [{"volume": 61}]
    assert await sp.stop() == 0


async def test_sim_fleet_over_mqtt(srv: Server, broker: ManagedBroker, tmp_path: Path) -> None:
    """`loa sim --control mqtt`: registered and provisioned through the REST API, connected
    through the broker, every device acknowledges one bulk command."""
    fleet = Fleet(srv.base, srv.tokens["qtvtinh"], speakers=20, boards=2, area="T01",
                  fleet_file=tmp_path / "fleet.json", status_every=0, control="mqtt",
                  broker=broker.url)
    await fleet.start()
    try:
        await until(lambda: fleet.counts()["connected"] == 22, "22 devices connected", 60.0)
        await until(lambda: srv.mgr.connected == 22, "22 sessions on the node", 30.0)
        assert all(isinstance(d.link, MqttLink) for d in srv.mgr.devices.values())
        status, body = await srv.call("qtvtinh", "POST", "/api/v1/devices/commands", json={
            "area": "T01", "command": "power", "args": {"on": True}})
        assert status == 202 and body["online"] == 22, body

        async def acked() -> bool:
            t = srv.mgr.tally(body["command_batch"])
            return t is not None and t["acked"] == 22
        await until(acked, "22 acks", 30.0)
    finally:
        await fleet.stop()


def test_bench_devices_mqtt_beside_websocket() -> None:
    """`loa bench devices --control mqtt` prints both transports' figures from one run."""
    out = subprocess.run([sys.executable, "-m", "loa.web.cli", "bench", "devices", "--control",
                          "mqtt", "--n", "30", "--seconds", "1", "--heartbeat", "1"],
                         stdout=subprocess.PIPE, check=True, timeout=600)
    result = json.loads(out.stdout.decode().strip().splitlines()[-1])
    mqtt, ws = result["mqtt"], result["websocket"]
    assert (mqtt["control"], ws["control"], mqtt["devices"], ws["devices"]) == (
        "mqtt", "ws", 30, 30)
    for r in (mqtt, ws):  # every device acked every command of the fan-out
        assert r["command_fanout_ms"]["commands"] == 5 and r["heartbeats_in_window"] > 0
    assert mqtt["broker_cpu_fraction"] >= 0 and mqtt["bytes_per_device"] > 0


async def test_bad_messages_get_errors_and_an_oversized_one_ends_the_session(
        srv: Server, broker: ManagedBroker) -> None:
    dev_id, key = await provisioned(srv)
    async with raw(broker, dev_id, key) as c:
        await c.subscribe(f"vs/sub/{dev_id}", qos=1)
        up = f"vs/pub/{dev_id}"

        async def next_of(kind: str) -> dict[str, Any]:
            async with asyncio.timeout(5):
                async for m in c.messages:
                    msg: dict[str, Any] = json.loads(m.payload)  # type: ignore[arg-type]
                    if msg["type"] == kind:
                        return msg
            raise AssertionError(kind)

        await c.publish(up, json.dumps({"v": 1, "type": "heartbeat", "state": "idle"}), qos=1)
        assert (await next_of("close"))["code"] == 4000  # hello first
        await c.publish(up, json.dumps({"v": 1, "type": "hello", "device": dev_id}), qos=1)
        await next_of("welcome")
        await c.publish(up, b"{not json", qos=1)
        assert "error" in await next_of("error")
        await c.publish(up, json.dumps({"v": 1, "type": "heartbeat", "state": "loud"}), qos=1)
        assert "state" in (await next_of("error"))["error"]
        assert srv.mgr.get(dev_id).status == "online"  # type: ignore[union-attr]
        await c.publish(up, b"x" * (65 * 1024), qos=1)
        assert (await next_of("close"))["code"] == 1009
        await until(lambda: srv.mgr.get(dev_id).link is None,  # type: ignore[union-attr]
                    "the session ended")
