"""The device protocol over MQTT (Mosquitto): a second transport of the same DeviceManager.

The messages are those of the WebSocket channel (relay/devices/protocol.py), one JSON message
per MQTT PUBLISH; the manager keeps the commands, acks, queue, expiry and heartbeats exactly as
for a WebSocket (this module hands it one `MqttLink` per device session). Topics (prefix `vs`,
after the field firmware's `vs/sub/<IMEI>` and `vs/pub/<id>`), docs/device-protocol.md 8:

- `vs/pub/<id>`: device -> node, QoS 1: `hello` (no key: the broker authenticated the device),
  `heartbeat`, `ack`; and the device's last will `{"v":1,"type":"offline"}`, which the broker
  publishes when the connection dies without DISCONNECT: the device is offline at once.
- `vs/sub/<id>`: node -> device, QoS 1: `welcome`, `command`, `config`, `error`, and `close`
  (the WebSocket close code and reason: the session ended, say hello again, or stop on 4001/4003).
- `vs/sub/<id>/config`: the device's last configuration, retained: a device that boots while
  the node is unreachable still knows its streams.

One topic per direction (not one per message type) keeps each device's ACL at three entries and
its messages in order (MQTT orders messages per topic only).

Accounts (`[mqtt] accounts = true`): the broker enforces who is who through Mosquitto's
dynamic-security plugin, which this node administers over `$CONTROL/dynamic-security/v1` with
its `[mqtt] username`. A device's account is its id with its key as password, and a role of its
own that may publish `vs/pub/<id>` and subscribe/receive `vs/sub/<id>/#` only (Mosquitto 2.0's
dynamic security has no `%u` patterns, hence a role per device). Why the plugin rather than a
password file and an ACL file reloaded with SIGHUP: changes apply at once and from another host,
disabling an account disconnects its live session (a reloaded password file leaves it
connected), and nothing is rewritten per change on the broker's host by Loa.
Provisioning creates the account (a previous one with its old key is deleted, which disconnects
it); revocation and deletion disable it (and so disconnect it). While the broker does not answer,
provisioning and revocation answer 503 and change nothing.

The node's own session is persistent (clean session off): hellos, acks and wills published while
the node is away are queued by the broker and read when it comes back. The node's publishes do
not wait for the broker's PUBACK (a fan-out to 10,000 devices is not 10,000 round trips); a
command whose PUBLISH is lost with a broker restart is sent again by the manager (no ack).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
from collections import deque
from contextlib import suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiomqtt

from loa.relay.devices.manager import DeviceManager, HelloRejected
from loa.relay.devices.protocol import (
    CLOSE_MALFORMED_HELLO,
    CLOSE_REPLACED,
    CLOSE_TOO_BIG,
    PROTOCOL_VERSION,
    ProtocolError,
    encode,
    parse_message,
)
from loa.streamer.errors import LoaError
from loa.streamer.messages import say

log = logging.getLogger("loa.devices.mqtt")

DYNSEC = "$CONTROL/dynamic-security/v1"
NODE_ROLE = "loa-node"
RECONNECT_MIN, RECONNECT_MAX = 0.5, 10.0


@dataclass
class MqttSettings:
    """Config section [mqtt] (env LOA_MQTT_<KEY>)."""

    enabled: bool = False
    url: str = "mqtt://127.0.0.1:1883"  # the broker this node connects to
    device_url: str = ""  # the broker address given to devices at provisioning ("" = url)
    username: str = ""  # this node's broker account (the dynamic-security admin)
    password: str = ""
    prefix: str = "vs"  # topics: <prefix>/pub/<device>, <prefix>/sub/<device>[/config]
    client_id: str = ""  # "" = loa-<node id>
    accounts: bool = True  # device accounts and ACLs in the broker (dynamic security)
    keepalive: int = 30  # seconds: this node's keepalive with the broker
    admin_timeout: float = 5.0  # seconds the broker may take to answer an account change

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "+#\0") or \
                self.prefix.startswith(("$", "/")) or self.prefix.endswith("/"):
            raise ValueError("mqtt: prefix must be a plain topic level (no + # $ or edge /)")
        if self.keepalive < 5 or self.admin_timeout <= 0:
            raise ValueError("mqtt: keepalive must be >= 5 and admin_timeout > 0")

    def broker(self) -> tuple[str, int, bool]:
        """(host, port, tls) of `url`: mqtt://host[:1883] or mqtts://host[:8883]."""
        u = urlsplit(self.url)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise ValueError(f"mqtt: url must be mqtt://host[:port] or mqtts://..., got "
                             f"{self.url!r}")
        tls = u.scheme == "mqtts"
        return u.hostname, u.port or (8883 if tls else 1883), tls


class Topics:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.uplinks = f"{prefix}/pub/+"  # the node's one subscription
        self._up = f"{prefix}/pub/"

    def up(self, device: str) -> str:
        return self._up + device

    def down(self, device: str) -> str:
        return f"{self.prefix}/sub/{device}"

    def config(self, device: str) -> str:
        return f"{self.prefix}/sub/{device}/config"

    def device_of(self, topic: str) -> str | None:
        if not topic.startswith(self._up):
            return None
        dev = topic[len(self._up):]
        return dev if dev and "/" not in dev else None


def device_role(device: str) -> str:
    return f"loa-device-{device}"


def role_acls(prefix: str, device: str) -> list[dict[str, Any]]:
    """What a device may do: publish its uplink, subscribe to and receive its own downlink."""
    down = f"{prefix}/sub/{device}/#"
    return [{"acltype": "publishClientSend", "topic": f"{prefix}/pub/{device}", "allow": True},
            {"acltype": "subscribePattern", "topic": down, "allow": True},
            {"acltype": "publishClientReceive", "topic": down, "allow": True}]


def account_commands(prefix: str, device: str, key: str) -> list[dict[str, Any]]:
    """The dynamic-security commands creating a device's role and account."""
    role = device_role(device)
    return [{"command": "createRole", "rolename": role, "acls": role_acls(prefix, device)},
            {"command": "createClient", "username": device, "password": key,
             "clientid": device, "roles": [{"rolename": role}]}]


def close_message(code: int, reason: str) -> bytes:
    return encode({"v": PROTOCOL_VERSION, "type": "close", "code": code, "reason": reason})


class MqttLink:
    """One device session over the broker, as the manager sees a connection."""

    __slots__ = ("binding", "device", "errors", "closed")

    def __init__(self, binding: MqttBinding, device: str) -> None:
        self.binding = binding
        self.device = device
        self.errors = 0
        self.closed = False

    def unsent(self) -> int:
        return 0  # the broker queues per device; one slow device never holds the node up

    def closing(self) -> bool:
        return self.closed or not self.binding.connected

    async def send(self, data: bytes) -> None:
        b = self.binding
        b.publish(b.topics.down(self.device), data)
        head = data[:40]
        if b'"type":"config"' in head or b'"type":"welcome"' in head:
            config = json.loads(data)["config"]  # rare: once per session and config change
            b.publish(b.topics.config(self.device),
                      encode({"v": PROTOCOL_VERSION, "type": "config", "config": config}),
                      retain=True)

    def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        b = self.binding
        if b.links.get(self.device) is self:
            del b.links[self.device]
        if code != CLOSE_REPLACED:  # replaced: the device's own new session goes on
            b.publish(b.topics.down(self.device), close_message(code, reason))
        dev = b.manager.get(self.device)
        if dev is not None and dev.link is self:  # closed for abuse or size: the session ends
            b._spawn(b.manager.disconnected(dev, self))


class MqttBinding:
    """This node's MQTT client: the device sessions over the broker, and the device accounts."""

    def __init__(self, manager: DeviceManager, settings: MqttSettings, node_id: str,
                 public: str) -> None:
        self.manager = manager
        self.settings = settings
        self.topics = Topics(settings.prefix)
        self.public = public  # base URL of this node's streams, for the devices' config
        self.client_id = settings.client_id or f"loa-{node_id or 'node'}"[:64]
        self.links: dict[str, MqttLink] = {}
        self.client: aiomqtt.Client | None = None
        self.connected = False
        self.ready = asyncio.Event()  # connected, accounts set up, subscribed
        self.stats = {"connects": 0, "received": 0, "published": 0, "publish_errors": 0,
                      "wills": 0, "refused": 0}
        self._task: asyncio.Task[None] | None = None
        # device -> its messages not yet handled: one device's in order (its hello before what
        # follows), devices independent (one waiting on the store holds up no other)
        self._inbox: dict[str, deque[bytes]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._answers: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._seq = itertools.count()
        settings.broker()  # a bad URL stops start-up, not the first connect

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self.settings.accounts:
            self.manager.key_listeners.append(self.on_key)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop reading; sessions end as the devices' heartbeats stop counting (the broker keeps
        the node's session: what devices send meanwhile is read at the next start)."""
        if self.on_key in self.manager.key_listeners:
            self.manager.key_listeners.remove(self.on_key)
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for t in list(self._tasks):
            t.cancel()

    async def _run(self) -> None:
        s = self.settings
        host, port, tls = s.broker()
        delay = RECONNECT_MIN
        while True:
            try:
                async with aiomqtt.Client(
                        host, port, username=s.username or None, password=s.password or None,
                        identifier=self.client_id, clean_session=False,
                        keepalive=s.keepalive, tls_params=aiomqtt.TLSParameters() if tls
                        else None,
                        # No in-flight cap: with paho's cap (20, or 1000) a fan-out's messages
                        # beyond it wait in paho, and the second fan-out of a 4,000-device bench
                        # never left it (133 of 4,000 sent). The broker's own queue bounds it.
                        max_inflight_messages=0,
                        max_queued_outgoing_messages=0) as client:
                    self._own_writes(client)
                    self.client = client
                    self.connected = True
                    self.stats["connects"] += 1
                    if s.accounts:
                        await client.subscribe(f"{DYNSEC}/response", qos=1)
                    await client.subscribe(self.topics.uplinks, qos=1)
                    log.info("mqtt connected event=mqtt_connect broker=%s:%d client=%s",
                             host, port, self.client_id)
                    reader = asyncio.get_running_loop().create_task(self._read(client))
                    try:
                        if s.accounts:
                            await self._setup()
                        self.ready.set()
                        delay = RECONNECT_MIN
                        await reader
                    finally:
                        reader.cancel()
                        with suppress(asyncio.CancelledError, aiomqtt.MqttError):
                            await reader
            except (aiomqtt.MqttError, LoaError) as e:  # LoaError: the set-up went unanswered
                log.warning("mqtt broker unreachable event=mqtt_disconnect broker=%s:%d "
                            "error=%s retry_s=%.1f", host, port, e, delay)
            finally:
                self.client = None
                self.connected = False
                self.ready.clear()
            await asyncio.sleep(delay * random.uniform(0.75, 1.0))
            delay = min(delay * 2, RECONNECT_MAX)

    @staticmethod
    def _own_writes(client: aiomqtt.Client) -> None:
        """Register paho's socket writer on this loop ourselves. aiomqtt adds the writer later
        (call_soon_threadsafe, as if paho ran in another thread) but removes it at once, so
        under a fan-out the add can land after paho counts it removed: paho then holds its
        packets (and the PUBACKs of what it reads) until something else writes. Past the connect,
        paho runs on this loop's thread only: add and remove are both immediate. (A 10,000-device
        fan-out that stalled was first put down to this; Mosquitto 2.0.11's in-flight quota was the
        cause that its fix removed, see mosquitto.py.)"""
        paho = client._client  # noqa: SLF001
        loop = asyncio.get_running_loop()

        def writable() -> None:
            try:
                paho.loop_write()
            except Exception:  # noqa: BLE001 - the connection is going: the reader ends it
                sock = paho.socket()
                if sock is not None:
                    loop.remove_writer(sock.fileno())

        def register(_c: Any, _u: Any, sock: Any) -> None:
            loop.add_writer(sock.fileno(), writable)

        def unregister(_c: Any, _u: Any, sock: Any) -> None:
            loop.remove_writer(sock.fileno())

        paho.on_socket_register_write = register
        paho.on_socket_unregister_write = unregister
        sock = paho.socket()
        if sock is not None and paho.want_write():
            register(paho, None, sock)

    async def _read(self, client: aiomqtt.Client) -> None:
        try:
            await self._read_messages(client)
        finally:  # disconnected: account changes waiting for an answer fail now
            for fut in self._answers.values():
                if not fut.done():
                    fut.set_exception(LoaError(say("mqtt.broker_unavailable"),
                                               kind="unavailable"))

    async def _read_messages(self, client: aiomqtt.Client) -> None:
        async for m in client.messages:
            topic = m.topic.value
            payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
            if topic.startswith(DYNSEC):
                self._answer(payload)
                continue
            dev = self.topics.device_of(topic)
            if dev is None:
                continue
            self.stats["received"] += 1
            inbox = self._inbox.get(dev)
            if inbox is not None:  # the device's earlier messages are being handled
                inbox.append(payload)
            else:
                self._inbox[dev] = deque((payload,))
                self._spawn(self._drain(dev))

    async def _drain(self, device: str) -> None:
        inbox = self._inbox[device]
        try:
            while inbox:
                try:
                    await self._message(device, inbox.popleft())
                except Exception:
                    log.exception("mqtt message failed event=mqtt_message_error device=%s",
                                  device)
        finally:
            del self._inbox[device]

    # ---- device messages -----------------------------------------------------------------------
    async def _message(self, device: str, payload: bytes) -> None:
        mgr = self.manager
        link = self.links.get(device)
        if len(payload) > mgr.settings.max_message_kb * 1024:  # as a WebSocket: 1009
            if link is not None:
                link.close(CLOSE_TOO_BIG, say("mqtt.too_big"))
            else:
                self._refuse(device, CLOSE_TOO_BIG, say("mqtt.too_big"))
            return
        dev = mgr.get(device) if link is not None else None
        if link is not None and dev is not None and b'"hello"' not in payload \
                and b'"offline"' not in payload:
            await mgr.receive(dev, link, payload)  # heartbeat or ack: parsed once, there
            return
        try:
            msg = parse_message(payload)
        except ProtocolError as e:
            if link is not None and dev is not None:
                await mgr.protocol_error(dev, link, str(e))
            return
        kind = msg.get("type")
        if kind == "hello":
            await self._hello(device, msg, payload)
        elif kind == "offline":  # the broker published the device's last will
            self.stats["wills"] += 1
            if link is not None and dev is not None:
                link.closed = True
                del self.links[device]
                await mgr.gone(dev, link, "last_will")
        elif link is None or dev is None:
            self._refuse(device, CLOSE_MALFORMED_HELLO, say("device.hello_needed"))
        else:
            await mgr.receive(dev, link, payload)

    async def _hello(self, device: str, msg: dict[str, Any], payload: bytes) -> None:
        if msg.get("device") != device:  # a device speaks for itself only
            self._refuse(device, CLOSE_MALFORMED_HELLO, say("mqtt.wrong_device"))
            return
        link = MqttLink(self, device)
        old = self.links.get(device)
        self.links[device] = link
        try:
            await self.manager.hello(link, payload, self.public, trusted=self.settings.accounts)
        except HelloRejected as e:
            if self.links.get(device) is link:
                del self.links[device]
                if old is not None:
                    old.closed = True
            self._refuse(device, e.code, e.reason)
            return
        if old is not None:
            old.closed = True

    def _refuse(self, device: str, code: int, reason: str) -> None:
        self.stats["refused"] += 1
        log.info("mqtt device refused event=mqtt_refused device=%s code=%d reason=%s",
                 device[:64], code, reason)
        self.publish(self.topics.down(device), close_message(code, reason))

    # ---- publishing ----------------------------------------------------------------------------
    def publish(self, topic: str, data: bytes, *, retain: bool = False) -> None:
        """QoS 1, without waiting for the broker's PUBACK: straight through aiomqtt's paho client
        (aiomqtt's own `publish()` waits, and scans every pending call on each call: quadratic
        in a fan-out to 10,000 devices). A message lost with the connection is sent again by the
        manager (no ack)."""
        client = self.client
        if client is None or not self.connected:
            self.stats["publish_errors"] += 1
            return
        info = client._client.publish(topic, data, qos=1, retain=retain)  # noqa: SLF001
        self.stats["published" if info.rc == 0 else "publish_errors"] += 1

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ---- device accounts (dynamic security) ----------------------------------------------------
    async def _admin(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send dynamic-security commands in one message; their answers, in order."""
        client = self.client
        if client is None or not self.connected:
            raise LoaError(say("mqtt.broker_unavailable"), kind="unavailable")
        loop = asyncio.get_running_loop()
        futs = []
        for c in commands:
            tag = f"{self.client_id}.{next(self._seq)}"
            c["correlationData"] = tag
            fut = self._answers[tag] = loop.create_future()
            futs.append((tag, fut))
        wait = self.settings.admin_timeout * max(1.0, len(commands) / 40)
        try:
            await client.publish(DYNSEC, json.dumps({"commands": commands}), qos=1,
                                 timeout=wait)
            async with asyncio.timeout(wait):
                return [await f for _, f in futs]
        except (aiomqtt.MqttError, TimeoutError):
            raise LoaError(say("mqtt.broker_unavailable"), kind="unavailable") from None
        finally:
            for tag, fut in futs:
                self._answers.pop(tag, None)
                if fut.done() and not fut.cancelled():
                    fut.exception()  # retrieved: the first failure was raised already
                else:
                    fut.cancel()

    def _answer(self, payload: bytes) -> None:
        with suppress(ValueError, TypeError, AttributeError):
            for r in json.loads(payload).get("responses", []):
                fut = self._answers.get(str(r.get("correlationData")))
                if fut is not None and not fut.done():
                    fut.set_result(r)

    async def _setup(self) -> None:
        """The node's own role (publish to devices, read from them) and deny-by-default ACLs.
        Adding the role to our account makes the broker disconnect us once (first start only):
        the reconnect finds it in place."""
        p = self.topics.prefix
        got = await self._admin([{"command": "getClient", "username": self.settings.username}])
        roles = {r.get("rolename") for r in got[0].get("data", {}).get("client", {}).get(
            "roles", [])}
        await self._admin([
            {"command": "setDefaultACLAccess", "acls": [
                {"acltype": "publishClientSend", "allow": False},
                {"acltype": "publishClientReceive", "allow": False},
                {"acltype": "subscribe", "allow": False},
                {"acltype": "unsubscribe", "allow": True}]},
            {"command": "createRole", "rolename": NODE_ROLE, "acls": [
                {"acltype": "publishClientSend", "topic": f"{p}/sub/#", "allow": True},
                {"acltype": "subscribePattern", "topic": f"{p}/pub/#", "allow": True},
                {"acltype": "publishClientReceive", "topic": f"{p}/pub/#", "allow": True}]}])
        if NODE_ROLE not in roles:
            log.info("mqtt node role added event=mqtt_setup role=%s", NODE_ROLE)
            await self._admin([{"command": "addClientRole", "username": self.settings.username,
                                "rolename": NODE_ROLE}])

    async def on_key(self, device: str, key: str | None) -> None:
        """The manager's key listener: a new key (account created afresh) or none (disabled:
        the broker disconnects it and refuses it from now on)."""
        if key is None:
            answers = await self._admin([{"command": "disableClient", "username": device}])
            log.info("mqtt account disabled event=mqtt_account_disabled device=%s", device)
            err = answers[0].get("error")
            if err and "not found" not in str(err).lower():
                raise LoaError(say("mqtt.account_failed", error=err), kind="unavailable")
            self.publish(self.topics.config(device), b"", retain=True)  # clears the retained
            return
        await self.set_keys([(device, key)])

    ACCOUNTS_PER_MESSAGE = 50

    async def set_keys(self, keys: list[tuple[str, str]]) -> None:
        """Create device accounts (id, key), many per broker message. Mosquitto 2.0 rewrites the
        plugin's file after every command, so a new account costs two commands (its role, its
        client) and only an existing one is deleted and created again."""
        p = self.topics.prefix
        for i in range(0, len(keys), self.ACCOUNTS_PER_MESSAGE):
            chunk = keys[i:i + self.ACCOUNTS_PER_MESSAGE]
            answers = await self._admin([c for d, k in chunk for c in account_commands(p, d, k)])
            again = [(d, k) for j, (d, k) in enumerate(chunk)
                     if answers[2 * j].get("error") or answers[2 * j + 1].get("error")]
            if not again:
                continue
            answers = await self._admin([c for d, k in again for c in (
                {"command": "deleteClient", "username": d},
                {"command": "deleteRole", "rolename": device_role(d)},
                *account_commands(p, d, k))])
            for j, a in enumerate(answers):
                if j % 4 >= 2 and a.get("error"):  # deleting what is not there is fine
                    raise LoaError(say("mqtt.account_failed", error=a["error"]),
                                   kind="unavailable")
        log.info("mqtt accounts created event=mqtt_account_created devices=%d%s", len(keys),
                 f" device={keys[0][0]}" if len(keys) == 1 else "")
