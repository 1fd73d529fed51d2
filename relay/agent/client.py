"""The device side of the control channel (docs/device-protocol.md), for `loa device` and `loa sim`.

`DeviceClient` holds one device's WebSocket to the node: `hello` with its key, `welcome` (the
heartbeat interval and the configuration with the area's streams in order of preference), then
`command`s, each executed once in order and acknowledged (every copy, ack `ok: false, error:
"expired"` when its expiry passed), `config` pushes, `error` notices (logged), and `heartbeat`s
at the interval the server gave, either from its own timer or, for a fleet, from one shared
scheduler (`own_heartbeat=False`, the fleet calls `send_heartbeat`).

It reconnects on its own: back-off from 1 s doubling to 60 s with +-20 % jitter, reset by every
`welcome`. Close codes 4001 (unknown device or wrong key), 4003 (revoked, deleted) and 4009
(replaced by another connection of the same device) are final: `run()` returns the code.

Registration and provisioning helpers (`register`, `provision`) speak the REST API: an operator
(admin) registers a device and gets its one-time provisioning token; the device trades the token
for its key. Keys and tokens are never logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp

from loa.relay.devices.protocol import (
    CLOSE_REPLACED,
    CLOSE_REVOKED,
    CLOSE_UNAUTHORISED,
    MAX_ID,
    ack_message,
    heartbeat_message,
    hello_message,
    parse_onair,
    playing_message,
    same_version,
)
from loa.streamer.errors import LoaError
from loa.streamer.messages import say

log = logging.getLogger("loa.device")

CONNECT_PATH = "/api/v1/devices/connect"
FINAL_CODES = {CLOSE_UNAUTHORISED: "unauthorised", CLOSE_REVOKED: "revoked",
               CLOSE_REPLACED: "replaced"}
MAX_MESSAGE = 64 * 1024
REMEMBERED_COMMANDS = 1024  # ids kept to recognise a command sent twice


class ApiFailure(LoaError, RuntimeError):
    """A REST call answered with an error status (message from the server's body).

    An HTTP *client's* error: `status` is the server's answer, kept as is (callers and the text
    show it). It is not turned into a domain kind: to this side the call simply did not succeed,
    hence `unavailable` whatever the status; the status says why."""

    kind = "unavailable"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Command:
    id: str
    command: str
    args: dict[str, Any]
    expires: float


Outcome = tuple[bool, str | None]
CommandHandler = Callable[[Command], Awaitable[Outcome]]
ConfigHandler = Callable[[dict[str, Any]], Awaitable[None]]


def ws_url(server: str) -> str:
    """http(s)://host[:port][/prefix] -> ws(s)://host[:port][/prefix]/api/v1/devices/connect."""
    u = urlsplit(server.rstrip("/"))
    if u.scheme not in ("http", "https", "ws", "wss") or not u.netloc:
        raise ValueError(say("agent.bad_server_url", server=server))
    scheme = {"http": "ws", "https": "wss"}.get(u.scheme, u.scheme)
    return urlunsplit((scheme, u.netloc, u.path.rstrip("/") + CONNECT_PATH, "", ""))


async def _json(r: aiohttp.ClientResponse) -> Any:
    try:
        return await r.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        return {"error": (await r.text())[:200]}


async def api_call(session: aiohttp.ClientSession, method: str, url: str, *,
                   token: str | None = None, body: Any = None, expect: int = 200) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.request(method, url, json=body, headers=headers) as r:
        data = await _json(r)
        if r.status != expect:
            msg = data.get("error", "") if isinstance(data, dict) else str(data)[:200]
            raise ApiFailure(r.status, str(msg))
        return data


async def register(session: aiohttp.ClientSession, server: str, token: str, *, name: str,
                   kind: str, area: str, capabilities: dict[str, Any] | None = None,
                   groups: list[str] | None = None) -> tuple[str, str]:
    """Register a device (admin token); returns (device id, one-time provisioning token)."""
    body: dict[str, Any] = {"name": name, "kind": kind, "area": area}
    if capabilities is not None:
        body["capabilities"] = capabilities
    if groups:
        body["groups"] = groups
    data = await api_call(session, "POST", f"{server.rstrip('/')}/api/v1/devices", token=token,
                          body=body, expect=201)
    return str(data["id"]), str(data["provisioning_token"])


async def provision(session: aiohttp.ClientSession, server: str, device: str,
                    provisioning_token: str) -> str:
    """Trade the one-time provisioning token for the device key (public endpoint)."""
    data = await api_call(session, "POST", f"{server.rstrip('/')}/api/v1/devices/provision",
                          body={"device": device, "token": provisioning_token}, expect=201)
    return str(data["key"])


def device_url(server: str, device: str) -> str:
    return f"{server.rstrip('/')}/api/v1/devices/{quote(device, safe='')}"


def parse_command(msg: dict[str, Any]) -> Command:
    """ValueError for a command the device cannot act on (its id, when present, is acked)."""
    cid, name, args, expires = (msg.get("id"), msg.get("command"), msg.get("args", {}),
                                msg.get("expires"))
    if not isinstance(cid, str) or not cid or len(cid) > MAX_ID:
        raise ValueError("command without a valid id")
    if not isinstance(name, str) or not isinstance(args, dict):
        raise ValueError("command name or args malformed")
    if isinstance(expires, bool) or not isinstance(expires, int | float):
        raise ValueError("command expires malformed")
    return Command(cid, name, args, float(expires))


class DeviceClient:
    """One device's control connection; `run()` until `stop()` or a final close code."""

    def __init__(self, server: str, device: str, key: str, *,
                 session: aiohttp.ClientSession, firmware: str,
                 telemetry: Callable[[], dict[str, Any]], on_command: CommandHandler,
                 on_config: ConfigHandler | None = None,
                 on_onair: Callable[[str | None], Awaitable[None]] | None = None,
                 capabilities: dict[str, Any] | None = None, own_heartbeat: bool = True,
                 backoff_min: float = 1.0, backoff_max: float = 60.0,
                 hello_timeout: float = 15.0) -> None:
        self.server = server.rstrip("/")
        self.url = ws_url(server)
        self.device = device
        self._key = key
        self.session = session
        self.firmware = firmware
        self.telemetry = telemetry
        self.on_command = on_command
        self.on_config = on_config
        self.on_onair = on_onair
        self.capabilities = capabilities
        self.own_heartbeat = own_heartbeat
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.hello_timeout = hello_timeout
        self.heartbeat_interval = 60.0
        self.config: dict[str, Any] | None = None
        self.server_time_offset = 0.0  # server_time - local time at welcome
        self.connected = False
        self.final_code: int | None = None
        self.stats = {"connects": 0, "welcomes": 0, "heartbeats": 0, "commands": 0,
                      "duplicates": 0, "acks": 0, "nacks": 0, "errors": 0, "failures": 0}
        self._done: OrderedDict[str, Outcome] = OrderedDict()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self.attempted = asyncio.Event()  # set once the first connection was welcomed or failed
        self._stopping = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self.on_air: str | None = None  # the broadcast its area's stream carries (`onair`)
        self._playing: tuple[str | None, str] | None = None  # what it plays (proof of delivery)
        self._playing_sent: tuple[str | None, str] | None = None  # ... as the node last heard

    # ---- lifecycle -----------------------------------------------------------------------------
    def stop(self) -> None:
        self._stopping.set()
        ws = self._ws
        if ws is not None and not ws.closed:
            asyncio.get_running_loop().create_task(ws.close())

    async def reconnect(self) -> None:
        """Close the current connection; `run()` connects again after its back-off."""
        ws = self._ws
        if ws is not None and not ws.closed:
            await ws.close()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> int:
        """Connect and serve until stopped (0) or refused for good (the close code)."""
        backoff = self.backoff_min
        while not self._stopping.is_set():
            welcomed_before = self.stats["welcomes"]
            code: int | None = None
            try:
                code = await self._session()
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                self.stats["failures"] += 1
                log.info("control connection failed event=device_connect_error device=%s "
                         "error=%s", self.device, type(e).__name__)
            self.attempted.set()
            if self._stopping.is_set():
                break
            if code in FINAL_CODES:
                self.final_code = code
                log.warning("device refused for good event=device_refused device=%s code=%d "
                            "reason=%s", self.device, code, FINAL_CODES[code])
                return code
            if self.stats["welcomes"] > welcomed_before:
                backoff = self.backoff_min
            delay = backoff * random.uniform(0.8, 1.2)
            backoff = min(backoff * 2, self.backoff_max)
            log.info("reconnecting event=device_reconnect device=%s code=%s in_s=%.2f",
                     self.device, code, delay)
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
        return 0

    async def _session(self) -> int | None:
        self.stats["connects"] += 1
        async with asyncio.timeout(self.hello_timeout):
            ws = await self.session.ws_connect(
                self.url, autoping=True, heartbeat=None, max_msg_size=4 * MAX_MESSAGE,
                timeout=aiohttp.ClientWSTimeout(ws_close=5.0))
        hb: asyncio.Task[None] | None = None
        try:
            self._ws = ws
            if self._stopping.is_set():
                return None
            hello = hello_message(self.device, self._key, self.firmware, self.capabilities)
            await ws.send_str(json.dumps(hello, ensure_ascii=False))
            first = await ws.receive(timeout=self.hello_timeout)
            if first.type is not aiohttp.WSMsgType.TEXT:
                return ws.close_code
            welcome = self._decode(first.data)
            if welcome is None or welcome.get("type") != "welcome":
                log.warning("expected welcome event=device_no_welcome device=%s",
                            self.device)
                return ws.close_code
            await self._welcome(welcome)
            self.connected = True
            self._playing_sent = None  # a new connection hears it again ...
            self.on_air = None  # ... and tells what the stream carries when it hears it
            if self._playing is not None:
                await self.report_playing(*self._playing)
            if self.own_heartbeat:
                hb = asyncio.get_running_loop().create_task(self._heartbeats())
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    await self._message(msg.data)
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    break
            return ws.close_code
        finally:
            self.connected = False
            self._ws = None
            if hb is not None:
                hb.cancel()
                with suppress(asyncio.CancelledError):
                    await hb
            if not ws.closed:
                with suppress(Exception):
                    await ws.close()

    # ---- messages ------------------------------------------------------------------------------
    def _decode(self, raw: str) -> dict[str, Any] | None:
        try:
            msg = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(msg, dict) or not same_version(msg):
            return None
        return msg

    async def _welcome(self, msg: dict[str, Any]) -> None:
        self.stats["welcomes"] += 1
        self.attempted.set()
        hb = msg.get("heartbeat")
        if isinstance(hb, int | float) and not isinstance(hb, bool) and hb > 0:
            self.heartbeat_interval = float(hb)
        st = msg.get("server_time")
        if isinstance(st, int | float) and not isinstance(st, bool):
            self.server_time_offset = float(st) - time.time()
        config = msg.get("config")
        log.info("device connected event=device_welcome device=%s heartbeat_s=%g area=%s",
                 self.device, self.heartbeat_interval,
                 config.get("area") if isinstance(config, dict) else None)
        if isinstance(config, dict):
            self.config = config
            if self.on_config is not None:
                await self.on_config(config)

    async def _message(self, raw: str) -> None:
        msg = self._decode(raw)
        if msg is None:
            log.warning("unreadable server message event=device_bad_message device=%s",
                        self.device)
            return
        kind = msg.get("type")
        if kind == "command":
            await self._command(msg)
        elif kind == "config":
            config = msg.get("config")
            if isinstance(config, dict):
                self.config = config
                log.info("configuration changed event=device_config device=%s area=%s",
                         self.device, config.get("area"))
                if self.on_config is not None:
                    await self.on_config(config)
        elif kind == "error":
            self.stats["errors"] += 1
            log.warning("server error notice event=device_server_error device=%s error=%s",
                        self.device, str(msg.get("error"))[:300])
        elif kind == "welcome":
            await self._welcome(msg)
        elif kind == "onair":
            self.on_air = parse_onair(msg)
            if self.on_onair is not None:
                await self.on_onair(self.on_air)
        # unknown types: ignored (a newer server)

    async def _command(self, msg: dict[str, Any]) -> None:
        try:
            cmd = parse_command(msg)
        except ValueError as e:
            cid = msg.get("id")
            log.warning("malformed command event=device_bad_command device=%s error=%s",
                        self.device, e)
            if isinstance(cid, str) and 0 < len(cid) <= MAX_ID:
                await self._ack(cid, (False, say("agent.malformed_command", error=e)))
            return
        done = self._done.get(cmd.id)
        if done is not None:  # sent again (our ack was lost): ack again, do not execute twice
            self.stats["duplicates"] += 1
            await self._ack(cmd.id, done)
            return
        self.stats["commands"] += 1
        if cmd.expires <= time.time() + self.server_time_offset:
            outcome: Outcome = (False, "expired")
        else:
            try:
                outcome = await self.on_command(cmd)
            except Exception as e:  # noqa: BLE001 - a failing handler is a refused command
                log.exception("command failed event=device_command_error device=%s "
                              "command=%s id=%s", self.device, cmd.command, cmd.id)
                outcome = (False, say("agent.device_error", error=type(e).__name__))
        self._done[cmd.id] = outcome
        while len(self._done) > REMEMBERED_COMMANDS:
            self._done.popitem(last=False)
        log.info("command event=device_command device=%s command=%s id=%s ok=%s error=%s",
                 self.device, cmd.command, cmd.id, outcome[0], outcome[1])
        await self._ack(cmd.id, outcome)

    async def _ack(self, cid: str, outcome: Outcome) -> None:
        ok, error = outcome
        if await self._send(ack_message(cid, ok, error)):
            self.stats["acks" if ok else "nacks"] += 1

    async def send(self, msg: dict[str, Any]) -> bool:
        """Send one message of the device's own (e.g. a firmware report); False when not
        connected."""
        return await self._send(msg)

    async def _send(self, msg: dict[str, Any]) -> bool:
        ws = self._ws
        if ws is None or ws.closed:
            return False
        try:
            async with self._send_lock:
                await ws.send_str(json.dumps(msg, ensure_ascii=False, allow_nan=False))
        except (aiohttp.ClientError, ConnectionError, RuntimeError):
            return False
        return True

    async def report_playing(self, broadcast: str | None, state: str) -> None:
        """Tell the node what the device plays (the broadcast it hears, its stream state) when
        that changed since the node last heard it; again on every new connection."""
        self._playing = (broadcast, state)
        if self.connected and self._playing != self._playing_sent \
                and await self._send(playing_message(broadcast, state)):
            self._playing_sent = (broadcast, state)

    # ---- heartbeats ----------------------------------------------------------------------------
    async def send_heartbeat(self) -> bool:
        if not self.connected:
            return False
        if await self._send(heartbeat_message(self.telemetry())):
            self.stats["heartbeats"] += 1
            return True
        return False

    async def _heartbeats(self) -> None:
        """One at once (the server gets telemetry right away), then on absolute deadlines."""
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            try:
                await self.send_heartbeat()
            except Exception:  # noqa: BLE001 - a broken telemetry source must not end the link
                log.exception("heartbeat failed event=device_heartbeat_error device=%s",
                              self.device)
            deadline += self.heartbeat_interval
            if deadline < loop.time():  # the loop was starved: skip, do not burst
                deadline = loop.time() + self.heartbeat_interval
