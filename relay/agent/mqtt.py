"""The device side of the control channel over MQTT (`loa device|sim --control mqtt`).

`MqttDeviceClient` is a `DeviceClient` (relay/agent/client.py: the same welcome, commands executed
once and acknowledged, config, heartbeats and back-off) whose connection is an MQTT session with
the broker instead of a WebSocket to the node (topics: relay/devices/mqtt.py and
docs/device-protocol.md 8). The device logs in to the broker as its id with its key, leaves its
last will (`offline`) with the broker, subscribes to `vs/sub/<id>/#` (its commands and its retained
configuration: known at once, even while the node is unreachable) and says hello on `vs/pub/<id>`.
A `close` from the node ends the session as a WebSocket close would: 4001/4003/4009 for good,
otherwise the device says hello again. The broker refusing the login or the subscription (a key
revoked, an account disabled) is final too (4001).
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import suppress
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from loa.relay.agent.client import DeviceClient
from loa.relay.devices.protocol import (
    CLOSE_UNAUTHORISED,
    PROTOCOL_VERSION,
    encode,
    hello_message,
)

log = logging.getLogger("loa.device")

REFUSED_CODES = {4, 5, 134, 135}  # MQTT 3.1.1 / 5 CONNACK: bad credentials, not authorised


def broker_address(url: str) -> tuple[str, int, bool]:
    u = urlsplit(url)
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise ValueError(f"broker URL must be mqtt://host[:port] or mqtts://..., got {url!r}")
    tls = u.scheme == "mqtts"
    return u.hostname, u.port or (8883 if tls else 1883), tls


class MqttDeviceClient(DeviceClient):
    """One device's session with the broker; `run()` until `stop()` or refused for good."""

    def __init__(self, broker: str, *args: Any, prefix: str = "vs", keepalive: int = 30,
                 key_in_hello: bool = False, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.broker = broker_address(broker)
        self.prefix = prefix
        self.keepalive = keepalive
        self.key_in_hello = key_in_hello  # a broker without device accounts: the node checks it
        self._client: aiomqtt.Client | None = None
        self._drop = asyncio.Event()  # reconnect(): end this session

    @property
    def up(self) -> str:
        return f"{self.prefix}/pub/{self.device}"

    def stop(self) -> None:
        self._stopping.set()

    async def reconnect(self) -> None:
        self._drop.set()

    async def _session(self) -> int | None:
        self.stats["connects"] += 1
        self._drop.clear()
        host, port, tls = self.broker
        will = aiomqtt.Will(self.up, encode({"v": PROTOCOL_VERSION, "type": "offline"}), qos=1)
        try:
            async with aiomqtt.Client(
                    host, port, username=self.device, password=self._key,
                    identifier=self.device, will=will, keepalive=self.keepalive,
                    clean_session=True, timeout=self.hello_timeout,
                    tls_params=aiomqtt.TLSParameters() if tls else None) as client:
                self._client = client
                granted = await client.subscribe(f"{self.prefix}/sub/{self.device}/#", qos=1)
                if any(getattr(g, "value", g) >= 128 for g in granted):
                    log.warning("subscription refused event=device_subscribe_refused "
                                "device=%s", self.device)
                    return CLOSE_UNAUTHORISED
                return await self._serve(client)
        except MqttConnectError as e:
            if getattr(e.rc, "value", e.rc) in REFUSED_CODES:
                return CLOSE_UNAUTHORISED
            raise ConnectionError(str(e)) from None
        except aiomqtt.MqttError as e:
            raise ConnectionError(str(e)) from None  # the base class backs off and reconnects
        finally:
            self._client = None
            self.connected = False

    async def _serve(self, client: aiomqtt.Client) -> int | None:
        hb: asyncio.Task[None] | None = None
        reader = asyncio.get_running_loop().create_task(self._read(client))
        stop = asyncio.get_running_loop().create_task(self._ended())
        try:
            await self._hello(client)
            if self.own_heartbeat:
                hb = asyncio.get_running_loop().create_task(self._heartbeats())
            await asyncio.wait({reader, stop}, return_when=asyncio.FIRST_COMPLETED)
            return reader.result() if reader.done() else None
        finally:
            for t in (hb, reader, stop):
                if t is not None:
                    t.cancel()
                    with suppress(asyncio.CancelledError, aiomqtt.MqttError, ConnectionError):
                        await t

    async def _ended(self) -> None:
        stopping = asyncio.ensure_future(self._stopping.wait())
        drop = asyncio.ensure_future(self._drop.wait())
        try:
            await asyncio.wait({stopping, drop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            drop.cancel()

    async def _hello(self, client: aiomqtt.Client) -> None:
        hello = hello_message(self.device, self._key, self.firmware, self.capabilities)
        if not self.key_in_hello:
            del hello["key"]  # the broker authenticated this session
        await client.publish(self.up, json.dumps(hello, ensure_ascii=False), qos=1)

    async def _read(self, client: aiomqtt.Client) -> int | None:
        """Messages until a close from the node ends the session (its code)."""
        async for m in client.messages:
            raw = m.payload.decode() if isinstance(m.payload, bytes | bytearray) else \
                str(m.payload)
            msg = self._decode(raw)
            if msg is None:
                continue
            if msg.get("type") == "welcome":
                self.connected = True
            if msg.get("type") != "close":
                await self._message(raw)
                continue
            code = msg.get("code")
            log.info("session closed by the node event=device_session_closed device=%s "
                     "code=%s reason=%s", self.device, code, str(msg.get("reason"))[:200])
            self.connected = False
            if code in (4001, 4003, 4009) or not isinstance(code, int):
                return code if isinstance(code, int) else None
            await asyncio.sleep(self.backoff_min)  # a hello refused as malformed: no storm
            await self._hello(client)  # a new session on the same connection
        return None

    async def _send(self, msg: dict[str, Any]) -> bool:
        client = self._client
        if client is None:
            return False
        try:
            async with self._send_lock:
                await client.publish(self.up, json.dumps(msg, ensure_ascii=False,
                                                         allow_nan=False), qos=1, timeout=10.0)
        except aiomqtt.MqttError:
            return False
        return True


CONTROLS = ("ws", "mqtt")


def default_broker(server: str) -> str:
    """mqtt://<the node's host>:1883: the broker usually runs beside the node."""
    return f"mqtt://{urlsplit(server).hostname or '127.0.0.1'}:1883"


def control_client(control: str, broker: str | None, server: str, device: str, key: str,
                   **kw: Any) -> DeviceClient:
    """The control channel `loa device` and `loa sim` asked for (`--control`, `--broker`)."""
    if control == "mqtt":
        return MqttDeviceClient(broker or default_broker(server), server, device, key, **kw)
    if control != "ws":
        raise ValueError(f"--control: {', '.join(CONTROLS)}")
    return DeviceClient(server, device, key, **kw)
