"""`loa bench devices --n N --seconds S --heartbeat H [--control mqtt]`: what the control channel
costs per device.

This process runs a real node (SQLite store, in-process bus, no media clock: nothing is on air, so
only the control channel costs CPU) with its HTTP server on 127.0.0.1. A child process runs N
devices as aiohttp WebSocket clients on one event loop: each says hello, then sends a heartbeat
every H seconds, the N of them spread evenly over the interval, and acknowledges every command at
once.

Measured in the server process:

- `server_cpu_fraction`: CPU time of the whole server process (every thread: the event loop and
  the SQLite writer) over S wall seconds of steady heartbeats, divided by S. 1.0 = one core.
- `bytes_per_device`: (VmRSS from /proc/self/status once all devices are connected and have sent
  heartbeats) minus (VmRSS after a node without devices has run once), divided by N:
  the registry record, the connection (socket, aiohttp request and WebSocket objects), the session
  and its telemetry, together.
- `command_fanout_ms`: several bulk commands to the whole province (`POST /api/v1/devices/commands`,
  the REST path operators use); for each device, the time from the request to its ack arriving at
  the server. p50/p99 over every device of every command; `all_acked_ms` is the slowest command's
  last ack.

`--control mqtt`: the same measures for the MQTT binding (docs/device-protocol.md 11), then the
WebSocket ones in a fresh process, printed side by side (`{"mqtt": {...}, "websocket": {...}}`).
This process starts a Mosquitto with dynamic security and persistence
(relay/devices/mosquitto.py) whose device accounts are seeded in its file before it starts (as the
registry is seeded in the store: provisioning 10,000 devices one by one through the broker costs
Mosquitto 2.0 one rewrite of its file per command); the node connects to it, the fleet's devices
log in to it with their keys and their last will. `server_cpu_fraction` and `bytes_per_device` are
the node's; `broker_cpu_fraction` and `broker_bytes_per_device` (VmRSS delta of the broker from
before the fleet connects to after the window) the broker's, `node_and_broker_cpu_fraction` both.

The server process runs with Python's default cyclic-GC thresholds unless LOA_BENCH_GC_THRESHOLD
is set (e.g. "700,10,1000"): with ~10,000 connections a full (generation 2) collection walks
about a million aiohttp objects and pauses the loop for up to a second, and a fan-out that
allocates 10,000 command records triggers one. The thresholds in use are part of the output.

With `--proof`: then an emergency to the whole province (the media clock runs for this phase,
so it is on air), every device acks its `emergency` command and reports `playing` it (the
protocol's proof of delivery); `delivery_proof` gives the time from the request until
`GET /api/v1/emergencies/{id}` says every loudspeaker played it (polled every 100 ms, so up to
100 ms late), the 201's time, and the goal (10 s for 2,000 devices).

Only the JSON object goes to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import Any

from aiohttp import ClientSession

ROOT = "B01"
COMMUNES_PER_DISTRICT = 20
DEVICES_PER_COMMUNE = 15
FANOUT_COMMANDS = 5
CONNECT_AT_ONCE = 200
WAIT_LIMIT = 600.0  # seconds any phase may take before the bench gives up


def _say(text: str) -> None:
    print(f"bench devices: {text}", file=sys.stderr, flush=True)


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def areas_csv(n: int) -> tuple[str, list[str]]:
    """A province with enough communes for n devices (15 per commune, 20 per district)."""
    communes = max(1, -(-n // DEVICES_PER_COMMUNE))
    lines = ["code,name,level,parent_code", f"{ROOT},Tỉnh bench,province,"]
    codes = []
    for c in range(communes):
        d = c // COMMUNES_PER_DISTRICT
        if c % COMMUNES_PER_DISTRICT == 0:
            lines.append(f"{ROOT}-D{d},Huyện {d},district,{ROOT}")
        code = f"{ROOT}-D{d}-C{c}"
        lines.append(f"{code},Xã {c},commune,{ROOT}-D{d}")
        codes.append(code)
    return "\n".join(lines) + "\n", codes


# ---- the device fleet (child process) -------------------------------------------------------------
HEARTBEAT = {"v": 1, "type": "heartbeat", "state": "playing", "volume": 70,
             "stream": {"url": "http://127.0.0.1/streams/x.opus", "loss": 0.002,
                        "jitter_ms": 6.5, "latency_ms": 180, "skew_ms": -2.0},
             "network": {"type": "4g", "signal_dbm": -79}, "firmware": "2.4.1",
             "gps": [15.88, 108.33], "power": {"voltage": 12.3, "amp": True,
                                               "relays": [True, True]}, "faults": []}


class FleetDevice(asyncio.Protocol):
    """One simulated device on a raw asyncio connection: a minimal WebSocket client (RFC 6455:
    upgrade, masked text frames out, unmasked frames in), so that the fleet process costs far
    less per message than the server it measures. The masking key is zero (XOR with zero is the
    identity): allowed by the framing, and what a constrained device firmware may do."""

    __slots__ = ("fleet", "i", "dev_id", "key", "transport", "buf", "upgraded", "welcomed",
                 "closed")

    def __init__(self, fleet: Fleet, i: int, dev_id: str, key: str) -> None:
        self.fleet = fleet
        self.i = i
        self.dev_id = dev_id
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.upgraded = False
        self.welcomed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        nonce = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            f"GET /api/v1/devices/connect HTTP/1.1\r\nHost: {self.fleet.host}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {nonce}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n".encode())

    def send(self, payload: bytes, opcode: int = 0x1) -> None:
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
        if self.transport is not None and not self.closed:
            self.transport.write(head + b"\x00\x00\x00\x00" + payload)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self._fail(RuntimeError(f"no upgrade: {buf[:200]!r}"))
                return
            self.upgraded = True
            buf = buf[end + 4:]
            self.send(json.dumps({"v": 1, "type": "hello", "device": self.dev_id,
                                  "key": self.key, "firmware": "2.4.1"}).encode())
        while len(buf) >= 2:
            opcode, n, hdr = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    break
                n, hdr = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n, hdr = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < hdr + n:
                break
            payload, buf = buf[hdr:hdr + n], buf[hdr + n:]
            self._frame(opcode, payload)
        self.buf = buf

    def _frame(self, opcode: int, payload: bytes) -> None:
        if opcode == 0x1:
            if not self.welcomed.done():
                if b'"type":"welcome"' in payload:
                    self.welcomed.set_result(None)
                else:
                    self._fail(RuntimeError(f"no welcome: {payload[:200]!r}"))
            elif b'"type":"command"' in payload:
                msg = json.loads(payload)
                cid = msg["id"]
                self.send(b'{"v":1,"type":"ack","id":"' + cid.encode() + b'","ok":true}')
                self.fleet.acks += 1
                bid = msg["args"].get("broadcast") if msg["command"] == "emergency" else None
                if bid:  # proof of delivery: the device plays the emergency it was told of
                    self.send(json.dumps({"v": 1, "type": "playing", "broadcast": bid,
                                          "state": "playing"}).encode())
        elif opcode == 0x8:
            self.send(payload[:2], 0x8)
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            if not self.welcomed.done():
                self._fail(RuntimeError(f"closed: {payload!r}"))
        elif opcode == 0x9:
            self.send(payload, 0xA)

    def _fail(self, exc: Exception) -> None:
        if not self.welcomed.done():
            self.welcomed.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.welcomed.done():
            self.welcomed.set_exception(exc or ConnectionError("connection lost"))


def _mqtt_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return len(b).to_bytes(2, "big") + b


def _mqtt_packet(first: int, body: bytes) -> bytes:
    n, length = len(body), b""
    while True:  # the remaining length, 7 bits per byte
        n, digit = divmod(n, 128)
        length += bytes((digit | 0x80 if n else digit,))
        if not n:
            return bytes((first,)) + length + body


class MqttFleetDevice(asyncio.Protocol):
    """One simulated device on a raw asyncio connection speaking the MQTT 3.1.1 packets a
    device needs (CONNECT with its will, SUBSCRIBE, PUBLISH QoS 1 both ways, PUBACK), for the
    reason FleetDevice hand-frames WebSocket: the fleet must cost far less per message than the
    node and the broker it loads. Loa's own side uses aiomqtt (relay/devices/mqtt.py)."""

    __slots__ = ("fleet", "i", "dev_id", "key", "transport", "buf", "welcomed", "closed", "pid",
                 "up")

    def __init__(self, fleet: Fleet, i: int, dev_id: str, key: str) -> None:
        self.fleet = fleet
        self.i = i
        self.dev_id = dev_id
        self.key = key
        self.up = _mqtt_str(f"vs/pub/{dev_id}")
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.welcomed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.pid = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # clean session, will QoS 1, user name and password; keepalive 300 s
        flags = 0x02 | 0x04 | 0x08 | 0x40 | 0x80
        body = (_mqtt_str("MQTT") + bytes((4, flags)) + (300).to_bytes(2, "big")
                + _mqtt_str(self.dev_id) + self.up
                + _mqtt_str(b'{"v":1,"type":"offline"}')
                + _mqtt_str(self.dev_id) + _mqtt_str(self.key))
        transport.write(_mqtt_packet(0x10, body)
                        + _mqtt_packet(0x82, (1).to_bytes(2, "big")
                                       + _mqtt_str(f"vs/sub/{self.dev_id}/#") + b"\x01"))

    def send(self, payload: bytes) -> None:
        self.pid = self.pid % 65535 + 1
        if self.transport is not None and not self.closed:
            self.transport.write(_mqtt_packet(0x32, self.up + self.pid.to_bytes(2, "big")
                                              + payload))

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        while len(buf) >= 2:
            n, mult, pos = 0, 1, 1
            while True:
                if pos >= len(buf):
                    self.buf = buf
                    return
                b = buf[pos]
                n += (b & 0x7F) * mult
                mult *= 128
                pos += 1
                if not b & 0x80:
                    break
            if len(buf) < pos + n:
                break
            self._packet(buf[0], buf[pos:pos + n])
            buf = buf[pos + n:]
        self.buf = buf

    def _packet(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == 2 and body[1] != 0:  # CONNACK refused
            self._fail(RuntimeError(f"CONNACK {body[1]}"))
        elif kind == 9 and body[2] >= 0x80:  # SUBACK refused
            self._fail(RuntimeError("SUBACK refused"))
        elif kind == 9:
            self.send(json.dumps({"v": 1, "type": "hello", "device": self.dev_id,
                                  "firmware": "2.4.1"}).encode())
        elif kind == 3:
            qos = (first >> 1) & 3
            tlen = int.from_bytes(body[:2], "big")
            start = 2 + tlen
            if qos:
                if self.transport is not None and not self.closed:
                    self.transport.write(b"\x40\x02" + body[start:start + 2])
                start += 2
            payload = body[start:]
            if not self.welcomed.done():
                if b'"type":"welcome"' in payload:
                    self.welcomed.set_result(None)
                elif b'"type":"close"' in payload:
                    self._fail(RuntimeError(f"closed: {payload[:200]!r}"))
            elif b'"type":"command"' in payload:
                cid = json.loads(payload)["id"]
                self.send(b'{"v":1,"type":"ack","id":"' + cid.encode() + b'","ok":true}')
                self.fleet.acks += 1

    def _fail(self, exc: Exception) -> None:
        if not self.welcomed.done():
            self.welcomed.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.welcomed.done():
            self.welcomed.set_exception(exc or ConnectionError("connection lost"))


class Fleet:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.acks = 0


async def _fleet(spec: dict[str, Any]) -> None:
    raise_nofile()
    loop = asyncio.get_running_loop()
    fleet = Fleet(spec["host"], spec["port"])
    heartbeat: float = spec["heartbeat"]
    devices: list[list[str]] = spec["devices"]
    n = len(devices)
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)
    conns: list[FleetDevice | MqttFleetDevice] = []
    mqtt = spec.get("control") == "mqtt"
    port = spec["broker_port"] if mqtt else fleet.port

    async def connect(i: int, dev_id: str, key: str) -> None:
        async with gate:
            proto: FleetDevice | MqttFleetDevice
            _, proto = await loop.create_connection(
                (lambda: MqttFleetDevice(fleet, i, dev_id, key)) if mqtt
                else (lambda: FleetDevice(fleet, i, dev_id, key)), fleet.host, port)
            await proto.welcomed
        conns.append(proto)

    await asyncio.gather(*(connect(i, d, k) for i, (d, k) in enumerate(devices)))
    conns.sort(key=lambda c: c.i)
    print(json.dumps({"connected": n}), flush=True)

    # Heartbeats spread evenly: device i at start + i * H / N, then every H. One task, absolute
    # deadlines, everything due sent in one go.
    data = json.dumps(HEARTBEAT, separators=(",", ":")).encode()
    start = loop.time()
    step = heartbeat / n
    k = 0
    while True:
        due_until = int((loop.time() - start) / step)
        while k <= due_until:
            conns[k % n].send(data)
            k += 1
        await asyncio.sleep(max(0.0, start + k * step - loop.time()))


def fleet_main(path: str) -> None:
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    asyncio.run(_fleet(spec))


# ---- the server side -------------------------------------------------------------------------------
PROOF_GOAL_S = 10.0  # issue 13: delivery proof of an emergency to 2,000 devices within 10 s
PROOF_POLL = 0.1


async def _proof(http: ClientSession, base: str, headers: dict[str, str], n: int,
                 tick: Any) -> dict[str, Any]:
    """An emergency to the whole province; the time until its delivery proof is complete."""
    from loa.streamer.clock import RealClock

    loop = asyncio.get_running_loop()
    clock = RealClock(tick)
    clock.start()
    try:
        ts = loop.time()
        async with http.post(base + "/api/v1/emergencies", headers=headers, json={
                "targets": [ROOT], "content": {"text": "Đo thời gian xác nhận phát."},
                "repeat": 10, "gap": 5}) as r:
            body = await r.json()
            if r.status != 201:
                raise RuntimeError(f"emergency: {r.status} {body}")
        api_s = loop.time() - ts
        eid, played, total = body["id"], 0, 0
        async with asyncio.timeout(WAIT_LIMIT):
            while played < n:
                async with http.get(f"{base}/api/v1/emergencies/{eid}", headers=headers) as r:
                    d = (await r.json())["delivery"]
                played, total = d["played"], d["total"]
                if played < n:
                    await asyncio.sleep(PROOF_POLL)
        complete_s = loop.time() - ts
        _say(f"delivery proof: {played}/{total} loudspeakers in {complete_s * 1000:.0f} ms")
        async with http.delete(f"{base}/api/v1/emergencies/{eid}", headers=headers) as r:
            await r.read()
    finally:
        clock.stop()
    return {"devices": n, "played": played, "total": total,
            "api_201_ms": round(api_s * 1000, 1), "complete_ms": round(complete_s * 1000, 1),
            "poll_ms": PROOF_POLL * 1000, "goal_ms": PROOF_GOAL_S * 1000,
            "within_goal": complete_s <= PROOF_GOAL_S}


def proc_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


async def _bench(n: int, seconds: float, heartbeat: float, control: str = "ws",
                 proof: bool = False
                 ) -> dict[str, Any]:
    from loa.relay.devices.manager import DeviceSettings
    from loa.relay.devices.mosquitto import ManagedBroker
    from loa.relay.devices.mqtt import MqttSettings
    from loa.relay.devices.records import new_device_record, new_key, secret_hash
    from loa.streamer.state.open import open_store
    from loa.streamer.state.store import Record
    from loa.web.auth import add_user
    from loa.web.config import load_config
    from loa.web.node import Node
    from loa.web.testing import running_node, start_node

    gc_env = os.environ.get("LOA_BENCH_GC_THRESHOLD", "").strip()
    if gc_env:
        gc.set_threshold(*(int(x) for x in gc_env.split(",")))
    nofile = raise_nofile()
    if nofile < n + 200:
        raise RuntimeError(f"open files limit {nofile} is below {n + 200}: raise `ulimit -n`")
    loop = asyncio.get_running_loop()
    async with AsyncExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="loa-bench-devices-"))
        csv_text, communes = areas_csv(n)
        csv = Path(tmp) / "areas.csv"
        csv.write_text(csv_text, encoding="utf-8")
        cfg = load_config(None, env={}, data=str(Path(tmp) / "data"))
        cfg.areas.csv = str(csv)
        cfg.devices = DeviceSettings(heartbeat=heartbeat)  # type: ignore[attr-defined]
        password = "bench-password-1"
        records: list[Record] = []
        keys: list[list[str]] = []
        for i in range(n):
            rec = new_device_record(f"Cụm loa {i}", "loudspeaker",
                                    communes[i // DEVICES_PER_COMMUNE],
                                    {"codecs": ["opus", "mp3"], "transports": ["http", "hls"]},
                                    [], volume=80)
            key = new_key()
            rec["key_hash"] = secret_hash(key)
            records.append(rec)
            keys.append([rec["id"], key])
        # Seeded before the node starts: its device manager loads the registry at start.
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        store = await open_store(cfg.store, cfg.data_dir, cfg.store_prefix)
        try:
            await store.put_many("device", records)
        finally:
            await store.close()
        del records
        # The registry must be seeded before the node starts (its device manager loads it at
        # start), so the baseline is taken after a node without devices has started and
        # stopped once: its imports and one-time caches are then in rss0, and bytes_per_device
        # counts what the devices cost, as before.
        broker: ManagedBroker | None = None
        accounts_s = 0.0
        if control == "mqtt":  # a broker with dynamic security, as docs/device-protocol.md 11
            broker = ManagedBroker(Path(tmp) / "broker", "loa-admin", password)
            stack.push_async_callback(broker.stop)  # before the directory goes
            t = loop.time()
            await broker.seed([(d, k) for d, k in keys])  # as the store: seeded, not provisioned
            accounts_s = loop.time() - t
            await broker.start()
            cfg.mqtt = MqttSettings(enabled=True, url=broker.url, username="loa-admin",
                                    password=password)
        warm = load_config(None, env={}, data=str(Path(tmp) / "warm"))
        warm.areas.csv = str(csv)
        warm.mqtt = cfg.mqtt
        async with running_node(warm, realtime=False, handle_signals=False) as w:
            if w.node.mqtt is not None:
                async with asyncio.timeout(30):
                    await w.node.mqtt.ready.wait()
        gc.collect()
        rss0 = rss_bytes()

        async def prepare(node: Node) -> None:
            await add_user(node.store, node.tree, "bench", "admin", ROOT, password,
                           emergency=True)

        live = await start_node(cfg, realtime=False, prepare=prepare, backlog=4096,
                                access_log=None, handle_signals=False)
        mgr, port, base = live.node.devices, live.port, live.url
        if live.node.mqtt is not None:
            async with asyncio.timeout(30):
                await live.node.mqtt.ready.wait()
        broker_rss0 = proc_rss(broker.proc.pid) if broker and broker.proc else 0
        spec_path = Path(tmp) / "fleet.json"
        spec_path.write_text(json.dumps({"host": "127.0.0.1", "port": port, "control": control,
                                         "broker_port": broker.port if broker else 0,
                                         "heartbeat": heartbeat, "devices": keys}),
                             encoding="utf-8")
        del keys
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loa.web.bench.devices", "--fleet", str(spec_path),
            stdout=asyncio.subprocess.PIPE)
        http = ClientSession()
        try:
            async with http.post(base + "/api/v1/auth/token",
                                 json={"username": "bench", "password": password}) as r:
                token = (await r.json())["token"]
            t_connect = loop.time()
            assert proc.stdout is not None
            async with asyncio.timeout(WAIT_LIMIT):
                line = await proc.stdout.readline()
            if not line:
                raise RuntimeError("the device fleet exited before connecting")
            connect_s = loop.time() - t_connect
            if mgr.connected != n:
                raise RuntimeError(f"{mgr.connected} of {n} devices connected")
            _say(f"{n} devices connected in {connect_s:.1f} s")

            # One heartbeat interval to reach the steady state, then the measured window.
            await asyncio.sleep(min(heartbeat, 30.0))
            bcpu0 = broker.cpu_seconds() if broker else 0.0
            hb0, cpu0, t0 = mgr.stats["heartbeats"], cpu_seconds(), loop.time()
            await asyncio.sleep(seconds)
            cpu1, t1, hb1 = cpu_seconds(), loop.time(), mgr.stats["heartbeats"]
            bcpu1 = broker.cpu_seconds() if broker else 0.0
            gc.collect()
            rss1 = rss_bytes()
            broker_rss1 = proc_rss(broker.proc.pid) if broker and broker.proc else 0
            _say(f"window {t1 - t0:.1f} s: {hb1 - hb0} heartbeats, "
                 f"{(cpu1 - cpu0) / (t1 - t0):.3f} of a core")

            # Fan-out: bulk commands to every device, acks timed at the server.
            acks: dict[str, float] = {}
            done = asyncio.Event()

            def on_ack(rec: Record, t: float) -> None:
                acks[rec["id"]] = t
                if len(acks) == n:
                    done.set()

            mgr.ack_listeners.append(on_ack)
            latencies: list[float] = []
            last: list[float] = []
            accepted: list[float] = []
            headers = {"Authorization": f"Bearer {token}"}
            for c in range(FANOUT_COMMANDS):
                acks.clear()
                done.clear()
                ts = loop.time()
                async with http.post(base + "/api/v1/devices/commands", headers=headers,
                                     json={"area": ROOT, "command": "volume",
                                           "args": {"volume": 50 + c}}) as r:
                    body = await r.json()
                    if r.status != 202 or body["online"] != n:
                        raise RuntimeError(f"bulk command: {r.status} {body}")
                    batch = body["command_batch"]
                accepted.append(loop.time() - ts)
                async with asyncio.timeout(WAIT_LIMIT):
                    while not done.is_set():  # progress while it waits (a stuck fan-out shows)
                        with suppress(TimeoutError):
                            await asyncio.wait_for(done.wait(), 10.0)
                        if not done.is_set():
                            _say(f"command {c + 1}: {len(acks)} of {n} acked; {mgr.tally(batch)}")
                lat = [t - ts for t in acks.values()]
                latencies += lat
                last.append(max(lat))
                _say(f"command {c + 1}: all {n} acked in {max(lat) * 1000:.0f} ms")
                await asyncio.sleep(1.0)  # let the ack writes settle between commands
            mgr.ack_listeners.remove(on_ack)
            delivery = await _proof(http, base, headers, n, live.node.engine.tick) \
                if proof else None
            binding = dict(live.node.mqtt.stats) if live.node.mqtt is not None else {}
        finally:
            await http.close()
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()
            await live.stop()
    mqtt: dict[str, Any] = {}
    if broker is not None:
        mqtt = {"broker": "mosquitto (dynamic security, persistence)",
                "broker_cpu_fraction": round((bcpu1 - bcpu0) / (t1 - t0), 4),
                "node_and_broker_cpu_fraction": round((cpu1 - cpu0 + bcpu1 - bcpu0) / (t1 - t0),
                                                      4),
                "broker_bytes_per_device": round((broker_rss1 - broker_rss0) / n),
                "accounts_seeded_s": round(accounts_s, 2), "binding_stats": binding}
    return {
        "bench": "devices", "control": control, "devices": n, "heartbeat_s": heartbeat,
        **mqtt,
        "window_s": round(t1 - t0, 2),
        "heartbeats_in_window": hb1 - hb0,
        "server_cpu_fraction": round((cpu1 - cpu0) / (t1 - t0), 4),
        "bytes_per_device": round((rss1 - rss0) / n),
        "memory_measure": "VmRSS delta / N",
        "connect_s": round(connect_s, 2),
        "command_fanout_ms": {
            "p50": round(statistics.median(latencies) * 1000, 1),
            "p99": round(percentile(latencies, 0.99) * 1000, 1),
            "all_acked_ms": round(max(last) * 1000, 1),
            "http_202_ms_median": round(statistics.median(accepted) * 1000, 1),
            "commands": FANOUT_COMMANDS,
        },
        "store": "sqlite", "media_clock": False, "gc_threshold": list(gc.get_threshold()),
        **({"delivery_proof": delivery} if delivery is not None else {}),
    }


def run(args: argparse.Namespace) -> int:
    n = int(args.n)
    if n < 1:
        print("--n must be at least 1", file=sys.stderr)
        return 2
    control = str(getattr(args, "control", "ws") or "ws")
    proof = bool(getattr(args, "proof", False))
    if control != "mqtt":
        result = asyncio.run(_bench(n, float(args.seconds), float(args.heartbeat), proof=proof))
        print(json.dumps(result), flush=True)
        return 0
    # MQTT beside WebSocket in one run: one after the other (not competing for the cores), the
    # WebSocket one in a fresh process so neither's memory figure holds the other's leftovers.
    mqtt = asyncio.run(_bench(n, float(args.seconds), float(args.heartbeat), "mqtt", proof))
    out = subprocess.run([sys.executable, "-m", "loa.web.cli", "bench", "devices", "--n", str(n),
                          "--seconds", str(args.seconds), "--heartbeat", str(args.heartbeat),
                          *(["--proof"] if proof else [])],
                         stdout=subprocess.PIPE, check=True)
    ws = json.loads(out.stdout.decode().strip().splitlines()[-1])
    print(json.dumps({"bench": "devices", "devices": n, "mqtt": mqtt, "websocket": ws}),
          flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--fleet":
        fleet_main(sys.argv[2])
    else:
        print("usage: loa bench devices --n N (this module's own entry is the device fleet)",
              file=sys.stderr)
        sys.exit(2)
