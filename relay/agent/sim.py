"""`loa sim`: a fleet of light simulated devices in one process, against a real node.

    loa sim --server URL --speakers N --boards M [--decode K] [--broken B]
            [--token T | env LOA_TOKEN] [--area CODE] [--seconds S]

Fleet. With an admin bearer token the simulator registers the devices it needs through the REST
API (`POST /api/v1/devices`, spread round-robin over the leaf areas under `--area`, or under the
token user's area) and provisions each one (`POST /api/v1/devices/provision`). The ids and keys
go to a JSON file (`./loa-sim-fleet.json`, mode 0600, one fleet per server URL), so a second run
reuses them and registers only what is missing (with a token, devices the server no longer knows
are dropped from the file first; without one the file is trusted).

Devices. Every device is a `DeviceClient` (relay/agent/client.py) with the real protocol: hello,
welcome, commands executed once and acknowledged, reconnection with back-off. Loudspeakers accept
play, stop, volume, power, reboot and emergency; boards accept display, emergency, power and
reboot and refuse audio commands, like the board page. One task sends every heartbeat of the
fleet, spread evenly over the interval the server gives (N devices: one every interval/N s), so
10,000 devices on a 60 s interval make a steady 167 messages per second, never a burst.

Proof of delivery. Loudspeakers report what they play (`playing`: the emergency they were told
of, else the broadcast their stream carries, from `onair`); the last B (`--broken`) have a broken
amplifier: connected, they ack commands but report `idle` (and the `amp_fault` fault).

Audio. The first K loudspeakers also play their area's HTTP Opus stream through the reference
agent's pipeline (relay/agent/pipeline.py) into a null sink: real decoding, real loss/jitter
figures in their heartbeats, the last seconds of audio kept for inspection.

Connection ramp: devices connect in batches of `CONNECT_BATCH`, each waiting for the previous one
to be welcomed (or to fail), so the server never sees thousands of handshakes at once.

Status: one line every `status_every` seconds (10 s): connected, commands acked, heartbeats sent,
decoders hearing audio. Ctrl-C, or `--seconds` counted from when the fleet is ready, stops it
cleanly (every connection closed); `loa sim` then prints one JSON line: the counts, and the CPU
time and peak memory of the process while the fleet ran (how many devices one core can simulate).

`run_fleet(...)` is the same fleet as a coroutine, for `loa demo` and tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import resource
import signal
import sys
import time
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import numpy as np

from loa.relay.agent import commands
from loa.relay.agent.client import (
    ApiFailure,
    Command,
    Outcome,
    api_call,
    provision,
    register,
    ws_url,
)
from loa.relay.agent.commands import Volume, gain_of
from loa.relay.agent.firmware import version
from loa.relay.agent.mqtt import control_client
from loa.relay.agent.pipeline import Pipeline
from loa.relay.agent.playout import Player
from loa.relay.agent.sinks import NullSink
from loa.streamer.messages import say

log = logging.getLogger("loa.sim")

FIRMWARE = f"loa-sim/{version()}"
FLEET_FILE = "loa-sim-fleet.json"
CONNECT_BATCH = 200
REGISTER_CONCURRENCY = 16
SPEAKER_CAPS = {"codecs": ["opus", "mp3"], "transports": ["http"]}
BOARD_CAPS = {"codecs": ["opus"], "transports": ["http"],
              "display": {"width": 1920, "height": 1080}}


@dataclass
class FleetEntry:
    id: str
    key: str
    kind: str  # loudspeaker | board
    area: str
    name: str


# ---- the fleet file ----------------------------------------------------------------------------
def load_fleet(path: Path, server: str) -> list[FleetEntry]:
    """The devices recorded for `server` (an unreadable file is reported and ignored)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data.get("servers", {}).get(server.rstrip("/"), [])
        return [FleetEntry(**{k: str(r[k]) for k in ("id", "key", "kind", "area", "name")})
                for r in rows]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("fleet file unreadable, starting afresh event=sim_fleet_unreadable "
                    "path=%s error=%s", path, type(e).__name__)
        return []


def save_fleet(path: Path, server: str, entries: list[FleetEntry]) -> None:
    """Atomically, readable by the owner only (it holds device keys)."""
    data: dict[str, Any] = {"version": 1, "servers": {}}
    with suppress(FileNotFoundError, OSError, ValueError):
        old = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(old.get("servers"), dict):
            data["servers"] = old["servers"]
    data["servers"][server.rstrip("/")] = [asdict(e) for e in entries]
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
    os.replace(tmp, path)


# ---- one simulated device ----------------------------------------------------------------------
class SimDevice:
    """A light loudspeaker or board: protocol only, unless it decodes audio."""

    def __init__(self, fleet: Fleet, entry: FleetEntry, decode: bool,
                 broken: bool = False) -> None:
        self.fleet = fleet
        self.entry = entry
        self.board = entry.kind == "board"
        self.broken = broken and not self.board  # amplifier fault: connected, acks, silent
        self.hearing: str | None = None  # the emergency it was told it hears
        self.vol = Volume(80)
        self.power = True
        self.playing = not self.board
        self.display_items: list[str] = []
        self.signal = -60.0 - random.random() * 40  # dBm, steady per device
        self.player: Player | None = None
        self.pipeline: Pipeline | None = None
        if decode and not self.board:
            self.player = Player(NullSink(), target_delay=0.3)
        assert fleet.session is not None
        self.client = control_client(
            fleet.control, fleet.broker, fleet.server, entry.id, entry.key,
            session=fleet.session, firmware=FIRMWARE,
            telemetry=self.telemetry, on_command=self.on_command, on_config=self.on_config,
            on_onair=self.on_onair, capabilities=BOARD_CAPS if self.board else SPEAKER_CAPS, own_heartbeat=False)
        self.task: asyncio.Task[int] | None = None

    def start(self) -> None:
        if self.player is not None:
            self.player.start()
            assert self.fleet.session is not None
            self.pipeline = Pipeline(self.player, self.fleet.session, prefer="http")
        self.task = asyncio.get_running_loop().create_task(self.client.run())

    async def stop(self) -> None:
        self.client.stop()
        if self.pipeline is not None:
            await self.pipeline.stop()
        if self.player is not None:
            await asyncio.to_thread(self.player.stop)

    def hears_audio(self) -> bool:
        p = self.player
        return p is not None and p.playing and time.monotonic() - p.last_audio < 2.0

    def play_state(self) -> str:
        """What its horns do (the `playing` report): a decoding device plays when its decoder
        hears the stream; the others as their simulated state says."""
        if not self.power:
            return "off"
        if self.board or self.broken or not self.playing or self.vol.level == 0:
            return "idle"
        if self.player is not None:
            return "playing" if self.hears_audio() and self.player.gain > 0 else "idle"
        return "playing"

    def report(self) -> None:
        """Tell the node what it plays now (soon: after the ack of the command that changed it)."""
        if not self.board:
            loop = asyncio.get_running_loop()
            loop.call_soon(lambda: self.fleet.spawn(
                self.client.report_playing(self.heard(), self.play_state())))

    def heard(self) -> str | None:
        """The emergency it was told of, else the broadcast its stream carries."""
        return self.hearing or self.client.on_air

    async def on_onair(self, _bid: str | None) -> None:
        self.report()

    async def on_config(self, config: dict[str, Any]) -> None:
        self.vol.configure(config.get("volume"))
        if (em := commands.config_emergency(config)) is not None:
            self._emergency(*em)
            self.hearing = commands.config_broadcast(config)
        disp = config.get("display")
        if self.board and isinstance(disp, dict) and isinstance(disp.get("items"), list):
            self.display_items = [str(i.get("id")) for i in disp["items"]
                                  if isinstance(i, dict)][:50]
        if self.pipeline is not None:
            streams = config.get("streams")
            changed = self.pipeline.set_streams(streams if isinstance(streams, list) else [])
            if self.playing and (changed or not self.pipeline.running):
                self.pipeline.start()
        self._gain()
        self.report()

    def _gain(self) -> None:
        if self.player is not None:
            self.player.gain = gain_of(self.vol.level) if self.power else 0.0

    def _emergency(self, on: bool, volume: Any) -> None:
        if on:
            self.vol.emergency_on(volume, None if self.board else commands.EMERGENCY_VOLUME)
            self.power = True
        else:
            self.vol.emergency_off()

    async def on_command(self, cmd: Command) -> Outcome:
        a, name = cmd.args, cmd.command
        self.fleet.commands[name] = self.fleet.commands.get(name, 0) + 1
        if name in ("play", "stop", "volume") and self.board:
            return False, say("sim.board_no_audio")
        if name == "display" and not self.board:
            return False, commands.NO_DISPLAY
        if name == "volume":
            if not commands.is_volume(a.get("volume")):
                return False, commands.BAD_VOLUME
            self.vol.set(a["volume"])
        elif name == "play":
            self.playing = True
            if commands.is_volume(a.get("volume")):
                self.vol.level = a["volume"]
            if self.pipeline is not None:
                self.pipeline.start(a.get("url") if isinstance(a.get("url"), str) else None)
        elif name == "stop":
            self.playing = False
            if self.pipeline is not None:
                await self.pipeline.stop()
        elif name == "power":
            if not isinstance(a.get("on"), bool):
                return False, commands.MISSING_ON
            self.power = a["on"]
        elif name == "emergency":
            if not isinstance(a.get("on"), bool):
                return False, commands.MISSING_ON
            self._emergency(a["on"], a.get("volume"))
            self.hearing = commands.command_broadcast(a)
        elif name == "display":
            items = a.get("items")
            if a.get("clear"):
                self.display_items = []
            elif isinstance(items, list):
                self.display_items = [str(i.get("id", f"item-{n + 1}"))
                                      for n, i in enumerate(items) if isinstance(i, dict)][:50]
            else:
                self.display_items = [k for k in ("video", "image", "text") if k in a]
        elif name == "reboot":
            pass  # a simulated device comes back at once: nothing to restart
        else:
            return False, commands.unsupported(name)
        self._gain()
        self.report()
        return True, None

    def telemetry(self) -> dict[str, Any]:
        state = "off" if not self.power else "playing" if self.playing and not self.board \
            else "idle"
        t: dict[str, Any] = {"state": state, "volume": self.vol.level,
                             "network": {"type": "4g", "signal_dbm": round(self.signal, 1)},
                             "firmware": FIRMWARE,
                             "power": {"amp": self.power, "relays": [self.power, self.power]},
                             "faults": ["amp_fault"] if self.broken else []}
        config = self.client.config or {}
        streams = config.get("streams") or []
        if self.pipeline is not None and self.pipeline.input is not None:
            inp = self.pipeline.input
            fig = inp.interval()
            play = self.player.take_interval() if self.player else {}
            t["stream"] = commands.stream_figures(inp.url, fig, play)
        elif streams and isinstance(streams[0], dict) and isinstance(streams[0].get("url"), str):
            t["stream"] = {"url": streams[0]["url"][:2000]}
        if self.board:
            t["display"] = {"width": 1920, "height": 1080, "items": self.display_items,
                            "emergency": self.vol.emergency}
        return t


# ---- the fleet -----------------------------------------------------------------------------------
class Fleet:
    """Registers (or reuses), connects and runs the simulated devices."""

    def __init__(self, server: str, token: str | None, speakers: int, boards: int = 0,
                 decode: int = 0, area: str | None = None, *, fleet_file: Path | None = None,
                 status_every: float = 10.0, connect_batch: int = CONNECT_BATCH,
                 broken: int = 0, control: str = "ws", broker: str | None = None) -> None:
        if speakers < 0 or boards < 0 or decode < 0:
            raise ValueError(say("sim.negative_counts"))
        ws_url(server)  # validates the URL
        self.server = server.rstrip("/")
        self.control = control  # ws | mqtt (relay/agent/mqtt.py)
        self.broker = broker
        self.token = token
        self.speakers = speakers
        self.boards = boards
        self.decode = min(decode, speakers)
        self.broken = max(0, min(broken, speakers - self.decode))  # the last speakers: amp fault
        self.area = area
        self.fleet_file = fleet_file or Path(FLEET_FILE)
        self.status_every = status_every
        self.connect_batch = max(1, connect_batch)
        self.session: aiohttp.ClientSession | None = None
        self.entries: list[FleetEntry] = []
        self.devices: list[SimDevice] = []
        self.commands: dict[str, int] = {}
        self.registered = 0  # devices registered by this run
        self.reused = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._spawned: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._spawned.add(t)
        t.add_done_callback(self._spawned.discard)

    # ---- registration ----
    async def _leaf_areas(self) -> list[str]:
        assert self.session is not None and self.token is not None
        data = await api_call(self.session, "GET", f"{self.server}/api/v1/areas",
                              token=self.token)
        areas = {a["code"]: a for a in data.get("areas", []) if isinstance(a, dict)}
        root = self.area or data.get("root")
        if root not in areas:
            raise ApiFailure(404, f"{say('area.unknown', area=root)} "
                                  f"({say('sim.outside_token_area')})")
        leaves: list[str] = []
        todo = [root]
        while todo:  # depth-first, children in the server's order
            code = todo.pop(0)
            children = [c for c in areas[code].get("children", []) if c in areas]
            if children:
                todo[:0] = children
            else:
                leaves.append(code)
        return leaves

    async def _known_ids(self, areas: list[str]) -> set[str]:
        """Every device id the server has under the fleet's area."""
        assert self.session is not None and self.token is not None
        root = self.area
        if root is None:
            me = await api_call(self.session, "GET", f"{self.server}/api/v1/me",
                                token=self.token)
            root = str(me.get("area"))
        ids: set[str] = set()
        offset = 0
        while True:
            data = await api_call(self.session, "GET",
                                  f"{self.server}/api/v1/devices?area={quote(root, safe='')}"
                                  f"&limit=10000&offset={offset}", token=self.token)
            rows = data.get("devices", [])
            ids.update(str(d["id"]) for d in rows)
            offset += len(rows)
            if not rows or offset >= int(data.get("total", 0)):
                return ids

    async def prepare(self) -> None:
        """The fleet's devices: from the file, registered and provisioned as needed."""
        assert self.session is not None
        entries = await asyncio.to_thread(load_fleet, self.fleet_file, self.server)
        leaves: list[str] = []
        if self.token:
            leaves = await self._leaf_areas()
            known = await self._known_ids(leaves)
            kept = [e for e in entries if e.id in known and e.area in leaves]
            if len(kept) != len(entries):
                log.info("fleet file entries unknown to the server dropped "
                         "event=sim_fleet_pruned dropped=%d", len(entries) - len(kept))
            entries = kept
        speakers = [e for e in entries if e.kind == "loudspeaker"][: self.speakers]
        boards = [e for e in entries if e.kind == "board"][: self.boards]
        self.reused = len(speakers) + len(boards)
        need = [("loudspeaker", i) for i in range(len(speakers), self.speakers)]
        need += [("board", i) for i in range(len(boards), self.boards)]
        if need and not self.token:
            raise ApiFailure(401, say("sim.token_needed", count=len(need)))
        new: list[FleetEntry] = []
        sem = asyncio.Semaphore(REGISTER_CONCURRENCY)
        all_entries = list(entries)

        async def one(kind: str, i: int) -> None:
            assert self.session is not None and self.token is not None
            area = leaves[i % len(leaves)]
            label = "Loa mô phỏng" if kind == "loudspeaker" else "Bảng tin mô phỏng"
            name = f"{label} {i + 1:05d}"
            async with sem:
                dev, ptoken = await register(
                    self.session, self.server, self.token, name=name, kind=kind, area=area,
                    capabilities=BOARD_CAPS if kind == "board" else SPEAKER_CAPS,
                    groups=["mo-phong"])
                key = await provision(self.session, self.server, dev, ptoken)
            e = FleetEntry(dev, key, kind, area, name)
            new.append(e)
            all_entries.append(e)
            if len(new) % 500 == 0:
                await asyncio.to_thread(save_fleet, self.fleet_file, self.server,
                                        list(all_entries))
                _say(say("sim.registered", done=len(new), total=len(need)))

        if need:
            _say(f"{say('sim.registering', count=len(need))} "
                 f"({say('sim.area_count', count=len(leaves))})")
        try:
            await asyncio.gather(*(one(k, i) for k, i in need))
        finally:
            if need or len(all_entries) != len(entries):
                await asyncio.to_thread(save_fleet, self.fleet_file, self.server, all_entries)
        self.registered = len(new)
        speakers += [e for e in new if e.kind == "loudspeaker"]
        boards += [e for e in new if e.kind == "board"]
        self.entries = speakers + boards

    # ---- running ----
    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            timeout=aiohttp.ClientTimeout(total=60))
        try:
            await self.prepare()
        except BaseException:
            await self.session.close()
            raise
        speakers = [e for e in self.entries if e.kind == "loudspeaker"]
        decoding = {e.id for e in speakers[: self.decode]}
        broken = {e.id for e in speakers[len(speakers) - self.broken:]} if self.broken else set()
        self.devices = [SimDevice(self, e, e.id in decoding, e.id in broken)
                        for e in self.entries]
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._connect()))
        if self.decode:
            self._tasks.append(loop.create_task(self._decoder_reports()))
        self._tasks.append(loop.create_task(self._heartbeats()))
        if self.status_every > 0:
            self._tasks.append(loop.create_task(self._status()))

    async def _connect(self) -> None:
        for i in range(0, len(self.devices), self.connect_batch):
            batch = self.devices[i:i + self.connect_batch]
            for d in batch:
                d.start()
            with suppress(TimeoutError):  # a slow batch does not hold the fleet back for long
                await asyncio.wait_for(
                    asyncio.gather(*(d.client.attempted.wait() for d in batch)), 15.0)

    def heartbeat_interval(self) -> float:
        for d in self.devices:
            if d.client.stats["welcomes"]:
                return d.client.heartbeat_interval
        return 60.0

    async def _heartbeats(self) -> None:
        """Every device once per interval, spread evenly: one slot every interval/N seconds."""
        loop = asyncio.get_running_loop()
        interval = self.heartbeat_interval()
        t0 = loop.time()
        slot = 0
        while True:
            n = len(self.devices)
            if n == 0:
                await asyncio.sleep(1.0)
                continue
            now_interval = self.heartbeat_interval()
            if now_interval != interval:
                interval, t0, slot = now_interval, loop.time(), 0
            step = interval / n
            due = int((loop.time() - t0) / step) + 1
            while slot < due:
                d = self.devices[slot % n]
                slot += 1
                if d.client.connected:
                    try:
                        await d.client.send_heartbeat()
                    except Exception:  # noqa: BLE001 - one device's telemetry never stops all
                        log.exception("heartbeat failed event=sim_heartbeat_error device=%s",
                                      d.entry.id)
            await asyncio.sleep(max(0.01, t0 + slot * step - loop.time()))

    async def _decoder_reports(self) -> None:
        """Decoding devices play what their decoder hears: told when it changes."""
        while True:
            for d in self.decoders():
                if d.client.connected:
                    with suppress(Exception):
                        await d.client.report_playing(d.heard(), d.play_state())
            await asyncio.sleep(0.25)

    def counts(self) -> dict[str, Any]:
        c = {"devices": len(self.devices),
             "connected": sum(d.client.connected for d in self.devices),
             "commands": sum(d.client.stats["commands"] for d in self.devices),
             "acked": sum(d.client.stats["acks"] for d in self.devices),
             "refused_commands": sum(d.client.stats["nacks"] for d in self.devices),
             "heartbeats": sum(d.client.stats["heartbeats"] for d in self.devices),
             "reconnects": sum(max(0, d.client.stats["connects"] - 1) for d in self.devices),
             "refused": sum(d.client.final_code is not None for d in self.devices),
             "decoding": sum(d.player is not None for d in self.devices),
             "hearing": sum(d.hears_audio() for d in self.devices),
             "registered": self.registered, "reused": self.reused}
        return c

    def status_line(self) -> str:
        c = self.counts()
        return (f"loa sim: kết nối/connected {c['connected']}/{c['devices']}  "
                f"lệnh/commands {c['commands']} (ack {c['acked']}, từ chối/refused "
                f"{c['refused_commands']})  nhịp tim/heartbeats {c['heartbeats']}  "
                f"giải mã/decoding {c['hearing']}/{c['decoding']}  "
                f"kết nối lại/reconnects {c['reconnects']}  bị từ chối/rejected {c['refused']}")

    async def _status(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            deadline += self.status_every
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            print(self.status_line(), flush=True)

    def decoders(self) -> list[SimDevice]:
        return [d for d in self.devices if d.player is not None]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        for t in list(self._spawned):
            t.cancel()
        await asyncio.gather(*(d.stop() for d in self.devices), return_exceptions=True)
        tasks = [d.task for d in self.devices if d.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=10.0)
            for p in pending:
                p.cancel()
        if self.session is not None:
            await self.session.close()
            self.session = None


def _say(text: str) -> None:
    print(f"loa sim: {text}", flush=True)


def recent_audio(dev: SimDevice) -> np.ndarray:
    return dev.player.recent_pcm() if dev.player is not None else np.zeros(0, np.float32)


async def run_fleet(server_url: str, token: str | None, speakers: int, boards: int,
                    decode: int, area: str | None, stop_event: asyncio.Event, *,
                    fleet_file: Path | None = None, status_every: float = 10.0,
                    duration: float | None = None, summary: dict[str, Any] | None = None,
                    broken: int = 0, control: str = "ws",
                    broker: str | None = None) -> int:
    """Run a fleet until `stop_event` is set (or `duration` seconds after it is ready); 0 when
    it ran, 1 when it could not be prepared (the reason is printed). `summary`, when given,
    receives the final counts and what the process spent while the fleet ran."""
    fleet = Fleet(server_url, token, speakers, boards, decode, area, fleet_file=fleet_file,
                  status_every=status_every, broken=broken, control=control,
                  broker=broker)
    try:
        await fleet.start()
    except (ApiFailure, aiohttp.ClientError, OSError) as e:
        print(f"loa sim: {say('sim.cannot_prepare', error=e)}",
              file=sys.stderr, flush=True)
        return 1
    c = fleet.counts()
    _say(f"{say('sim.device_count', count=c['devices'])} "
         f"({say('sim.reused_count', count=c['reused'])}, "
         f"{say('sim.new_count', count=c['registered'])}) -> {fleet.server}; "
         f"{say('sim.fleet_file', path=fleet.fleet_file)}")
    if duration:
        asyncio.get_running_loop().call_later(duration, stop_event.set)
    cpu0, t0 = _cpu_seconds(), time.monotonic()
    try:
        await stop_event.wait()
    finally:
        print(fleet.status_line(), flush=True)
        if summary is not None:
            # the whole process (every thread: the loop and the decoders) while the fleet ran
            wall, cpu = time.monotonic() - t0, _cpu_seconds() - cpu0
            n = max(1, len(fleet.devices))
            summary.update(fleet.counts())
            summary.update({
                "seconds": round(wall, 1), "cpu_seconds": round(cpu, 2),
                "cpu_fraction": round(cpu / wall, 4) if wall > 0 else None,
                "cpu_us_per_device_second": round(cpu / wall / n * 1e6, 1) if wall > 0
                else None,
                "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                    1)})
        await fleet.stop()
    return 0


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _main(args: argparse.Namespace, token: str | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    data = getattr(args, "data", None)
    fleet_file = Path(data) / FLEET_FILE if data else None
    summary: dict[str, Any] = {}
    code = await run_fleet(args.server, token, int(args.speakers), int(args.boards),
                           int(args.decode or 0), args.area, stop, fleet_file=fleet_file,
                           duration=float(args.seconds) if args.seconds else None,
                           summary=summary, broken=int(getattr(args, "broken", 0) or 0),
                           control=str(getattr(args, "control", "ws")),
                           broker=getattr(args, "broker", None) or None)
    if code == 0:
        print(json.dumps({"sim": summary}, ensure_ascii=False), flush=True)
    return code


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def main(args: argparse.Namespace) -> int:
    """`loa sim`: 0 after --seconds or Ctrl-C; 1 the fleet could not be prepared; 2 bad
    arguments."""
    from loa.streamer.log import setup_logging

    setup_logging(os.environ.get("LOA_LOG_LEVEL", "warning"), "kv")
    token = getattr(args, "token", None) or os.environ.get("LOA_TOKEN") or None
    try:
        ws_url(args.server)
        if int(args.speakers) < 0 or int(args.boards) < 0 or int(args.decode or 0) < 0:
            raise ValueError(say("sim.negative_counts"))
    except ValueError as e:
        print(f"loa sim: {e}", file=sys.stderr)
        return 2
    _raise_nofile()
    return asyncio.run(_main(args, token))
