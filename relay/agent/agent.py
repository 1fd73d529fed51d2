"""`loa device`: the reference loudspeaker agent (a complete IP loudspeaker cluster in software).

    loa device --server URL --key DEVICE_ID:KEY [--sink null|wav:FILE|default]
               [--transport http|rtp|webrtc] [--target-delay-ms 300] [--seconds S]

Control. One `DeviceClient` (relay/agent/client.py) holds the WebSocket: hello (capabilities:
Opus and G.711, transports http, rtp, webrtc with `--transport` first), welcome, commands acked
and executed once in order, heartbeats at the server's interval with telemetry (state, volume,
stream figures, network, power relays, faults, firmware "loa-agent/<version>"), reconnects with
back-off. Audio does not depend on the control channel: a device that loses its connection keeps
playing its area's stream.

Audio. The device plays the first stream of `welcome.config.streams` it supports (the server lists
them in the device's order of preference), falling back to the next after a failure:

- http/opus: Ogg Opus over HTTP (`/streams/A.opus`), read with aiohttp on the loop; Ogg pages are
  split into Opus packets by codecs/ogg.py (timestamps from the granule positions: gaps are loss)
  and decoded with PyAV in the playout thread. Timing by arrival (no sender reports over HTTP).
- rtp: the SDP (`/streams/A.sdp`) names the multicast group and port; the agent joins it on the
  interface that faces the server (127.0.0.1 when the server is on loopback), reads RTP and RTCP
  (port + 1), decodes Opus/PCMU/PCMA with PyAV, measures loss (sequence numbers) and RFC 3550
  interarrival jitter, and plays synchronised: every sample at `ntp(sample) + target_delay`
  through the sender reports (relay/agent/playout.py).
- webrtc/opus: WHEP with aiortc (host candidates limited to the interface facing the server,
  relay/webrtc.py's helper); decoded frames are paced by arrival.

The parts: sinks.py, decoders.py, inputs.py (with impair.py), pipeline.py; commands.py says what
commands mean, shared with the fleet simulator.

Sinks: `null` (discards; the playout records keep the instants), `wav:FILE` (48 kHz mono 16-bit,
plus `FILE.timing.csv`: per frame the stream timestamp, the ideal and the actual playout instant,
the source instant and the arrival), `default` (ALSA through `aplay` when it exists; refused with a
clear message otherwise).

Commands: play (area stream or an http(s) `url`), stop, volume, power (relays switched in order
with their delays, simulated and logged), reboot (the audio and the connection restart),
emergency (volume override and power on; off restores; `config.emergency` in a welcome or config
re-applies it), display (refused: a loudspeaker has no display). The configured volume applies
when it is new or changed, so a reconnect does not undo a `volume` command.

Network impairment for tests and demonstrations: `LOA_AGENT_IMPAIR="delay_ms=40,jitter_ms=20,
loss=0.01"` delays (and drops) RTP/RTCP datagrams on arrival, as a longer network path would.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from loa.relay.agent.client import Command, DeviceClient, Outcome
from loa.relay.agent.commands import (
    BAD_VOLUME,
    MISSING_ON,
    NO_DISPLAY,
    Volume,
    command_broadcast,
    config_broadcast,
    config_emergency,
    gain_of,
    is_volume,
    stream_figures,
    unsupported,
)
from loa.relay.agent.firmware import FIRMWARE
from loa.relay.agent.impair import Impairment
from loa.relay.agent.inputs import WebRtcInput
from loa.relay.agent.mqtt import CONTROLS, control_client
from loa.relay.agent.ota import FirmwareSlot, Refused
from loa.relay.agent.pipeline import CODECS, TRANSPORTS, Pipeline
from loa.relay.agent.playout import Player
from loa.relay.agent.sinks import make_sink
from loa.relay.devices.protocol import (
    FIRMWARE_COMMAND,
    ProtocolError,
    firmware_args,
    firmware_report,
    public_key,
)
from loa.streamer.messages import say

log = logging.getLogger("loa.agent")

STALLED_AFTER = 10.0  # seconds playing without audio before the `stream_stalled` fault
HEARD_WITHIN = 1.0  # seconds since the last real audio frame for the horns to count as playing
REPORT_EVERY = 0.25  # seconds between two looks at what the device plays (proof of delivery)


# ---- the agent ---------------------------------------------------------------------------------
@dataclass
class AgentOptions:
    server: str
    device: str
    key: str
    sink: str = "null"
    transport: str | None = None
    target_delay_ms: float = 300.0
    seconds: float | None = None
    impair: Impairment = field(default_factory=Impairment)
    fm_receiver: bool = False  # says it has an FM tuner (capability `fm`): takes `fm` commands
    state_dir: str | None = None  # firmware marker and images (OTA); None: cannot update
    firmware_key: str | None = None  # base64 ed25519 public key the device trusts for OTA
    boot_check: str | None = None  # the start check of a new version (exit 0 = started)
    control: str = "ws"  # ws | mqtt (relay/agent/mqtt.py)
    broker: str | None = None  # mqtt://host:port; None: the node's host, port 1883


class Agent:
    """A reference loudspeaker: control channel, stream pipeline, playout, commands."""

    def __init__(self, opts: AgentOptions, sink: Any | None = None) -> None:
        self.opts = opts
        self.sink = sink if sink is not None else make_sink(opts.sink)
        self.player = Player(self.sink, target_delay=opts.target_delay_ms / 1000)
        self.vol = Volume(80)
        self.playing = True  # the operator's intent: play / stop
        self.power_on = True
        self.relays = [True, True]
        self.session: aiohttp.ClientSession | None = None
        self.pipeline: Pipeline | None = None
        self.client: DeviceClient | None = None
        self.executed: list[Command] = []  # every command run once, in order (tests, logs)
        self._tasks: set[asyncio.Task[None]] = set()
        self._power_gen = 0
        self.fm: dict[str, Any] = {"on": False}  # the tuner: while on, the stream is not played
        self.hearing: str | None = None  # the emergency it was told it hears (proof of delivery)
        self.slot: FirmwareSlot | None = None
        if opts.state_dir:
            self.slot = FirmwareSlot(Path(opts.state_dir), FIRMWARE,
                                     public_key(opts.firmware_key) if opts.firmware_key else None,
                                     opts.boot_check)
        self.ota_report: dict[str, Any] | None = None  # sent after the next welcome
        self._updating: str | None = None  # the command id of the update in progress

    @property
    def firmware(self) -> str:
        return self.slot.firmware if self.slot is not None else FIRMWARE

    @property
    def volume(self) -> int:
        return self.vol.level

    # ---- lifecycle ----
    def capabilities(self) -> dict[str, Any]:
        transports = list(TRANSPORTS)
        if self.opts.transport in transports:
            transports.remove(self.opts.transport)
            transports.insert(0, self.opts.transport)
        caps: dict[str, Any] = {"codecs": list(CODECS), "transports": transports}
        if self.opts.fm_receiver:
            caps["fm"] = True
        return caps

    async def run(self, stop: asyncio.Event | None = None) -> int:
        stop = stop or asyncio.Event()
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        if self.slot is not None:
            await asyncio.to_thread(self.slot.load)
            self.ota_report = await self.slot.boot()  # a version on trial starts now
        self.player.start()
        self.pipeline = Pipeline(self.player, self.session, prefer=self.opts.transport,
                                 impair=self.opts.impair)
        self.client = control_client(self.opts.control, self.opts.broker, self.opts.server,
                                     self.opts.device, self.opts.key,
                                     session=self.session, firmware=self.firmware,
                                     telemetry=self.telemetry, on_command=self.on_command,
                                     on_config=self.on_config, capabilities=self.capabilities())
        self._apply_gain()
        client_task = asyncio.get_running_loop().create_task(self.client.run())
        self._spawn(self._report_playing())
        stop_task = asyncio.get_running_loop().create_task(stop.wait())
        code = 0
        try:
            done, _ = await asyncio.wait({client_task, stop_task},
                                         timeout=self.opts.seconds,
                                         return_when=asyncio.FIRST_COMPLETED)
            if client_task in done:
                code = client_task.result()
        finally:
            self.client.stop()
            stop_task.cancel()
            if not client_task.done():
                with suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(client_task, 5.0)
            for t in list(self._tasks):
                t.cancel()
            await self.pipeline.stop()
            await asyncio.to_thread(self.player.stop)
            await self.session.close()
        return code

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ---- configuration ----
    async def on_config(self, config: dict[str, Any]) -> None:
        assert self.pipeline is not None and self.client is not None
        if self.ota_report is not None:  # the outcome of an update, once connected again
            report, self.ota_report = self.ota_report, None
            await self.client.send(report)
        self.vol.configure(config.get("volume"))
        if (em := config_emergency(config)) is not None:
            self._emergency(*em)
            self.hearing = config_broadcast(config)
        streams = config.get("streams")
        changed = self.pipeline.set_streams(streams if isinstance(streams, list) else [])
        if self.playing and (changed or not self.pipeline.running) \
                and self.pipeline.url_override is None:
            self.pipeline.start()
        self._apply_gain()

    def _apply_gain(self) -> None:
        self.player.gain = gain_of(self.vol.level) if self.power_on and self.relays \
            and all(self.relays) and not self.fm["on"] else 0.0

    # ---- commands ----
    async def on_command(self, cmd: Command) -> Outcome:
        assert self.pipeline is not None
        a = cmd.args
        name = cmd.command
        if name == "volume":
            v = a.get("volume")
            if not is_volume(v):
                return False, BAD_VOLUME
            self.vol.set(v)
        elif name == "play":
            url = a.get("url")
            if url is not None and not (isinstance(url, str)
                                        and url.startswith(("http://", "https://"))):
                return False, say("agent.only_http")
            if "volume" in a:
                if not is_volume(a["volume"]):
                    return False, BAD_VOLUME
                self.vol.level = a["volume"]
            self.playing = True
            self.pipeline.start(url)
        elif name == "stop":
            self.playing = False
            await self.pipeline.stop()
        elif name == "power":
            on = a.get("on")
            steps = a.get("steps") or []
            if not isinstance(on, bool) or not isinstance(steps, list):
                return False, say("agent.bad_power")
            self._power(on, steps)
        elif name == "reboot":
            delay = a.get("delay_s", 0)
            self._spawn(self._reboot(float(delay) if isinstance(delay, int | float) else 0.0))
        elif name == "emergency":
            on = a.get("on")
            if not isinstance(on, bool):
                return False, MISSING_ON
            self._emergency(on, a.get("volume"))
            self.hearing = command_broadcast(a)
        elif name == "fm" and self.opts.fm_receiver:
            # No tuner in the reference agent: it mutes the stream while "tuned" and reports
            # the tuner's state; a real receiver plays the station and reports its signal.
            if a.get("on") is True and isinstance(a.get("frequency_mhz"), int | float):
                self.fm = {"on": True, "frequency_mhz": float(a["frequency_mhz"])}
            elif a.get("on") is False:
                self.fm = {"on": False}
            else:
                return False, MISSING_ON
        elif name == "display":
            return False, NO_DISPLAY
        elif name == FIRMWARE_COMMAND:
            return self._firmware(cmd)
        else:
            return False, unsupported(name)
        self.executed.append(cmd)
        self._apply_gain()
        return True, None

    def _power(self, on: bool, steps: list[Any]) -> None:
        relays = sorted({int(s["relay"]) for s in steps if isinstance(s, dict)
                         and isinstance(s.get("relay"), int)}) or [1, 2]
        n = max(max(relays), len(self.relays))
        if len(self.relays) < n:
            self.relays += [self.relays[-1] if self.relays else False] * (n - len(self.relays))
        self._power_gen += 1
        gen = self._power_gen
        self.power_on = on
        if not on:
            for r in reversed(relays):  # reverse order, at once
                self.relays[r - 1] = False
                log.info("relay off event=agent_relay relay=%d on=false", r)
            return
        for r in relays:
            self.relays[r - 1] = False

        async def warm_up() -> None:
            for s in steps or [{"relay": r, "delay_s": 0} for r in relays]:
                delay = float(s.get("delay_s", 0))
                if delay:
                    await asyncio.sleep(delay)
                if gen != self._power_gen:
                    return  # a newer power command took over
                self.relays[int(s["relay"]) - 1] = True
                log.info("relay on event=agent_relay relay=%d on=true", int(s["relay"]))
                self._apply_gain()

        self._spawn(warm_up())

    def _emergency(self, on: bool, volume: Any) -> None:
        if on:
            self.vol.emergency_on(volume)
            if not (self.power_on and all(self.relays)):
                self._power(True, [{"relay": i + 1, "delay_s": 0}
                                   for i in range(len(self.relays))])
            if not self.playing:
                self.playing = True
                assert self.pipeline is not None
                self.pipeline.start()
        else:
            self.vol.emergency_off()

    async def _reboot(self, delay: float) -> None:
        await asyncio.sleep(delay)
        log.info("rebooting event=agent_reboot")
        assert self.pipeline is not None and self.client is not None
        await self.pipeline.stop()
        self.playing = True
        await self.client.reconnect()  # the welcome of the new connection restarts the stream

    # ---- OTA firmware (relay/agent/ota.py) ----
    def _firmware(self, cmd: Command) -> Outcome:
        """Accept an update at once (the ack), then download, verify, apply and restart."""
        slot = self.slot
        if slot is None or slot.key is None:
            return False, say("agent.ota_unable")
        try:
            args = firmware_args(cmd.args)
        except ProtocolError as e:
            return False, str(e)
        if args["model"] != slot.model:
            return False, say("agent.ota_wrong_model", model=args["model"])
        if self._updating is None:
            self._updating = cmd.id
            self._spawn(self._update(cmd.id, args))
        return True, None

    async def _update(self, cid: str, args: dict[str, Any]) -> None:
        assert self.slot is not None and self.session is not None and self.client is not None
        slot = self.slot
        url = self.opts.server.rstrip("/") + args["url"]
        auth = {"Authorization": f"Device {self.opts.device}:{self.opts.key}"}
        try:
            part = await slot.download(self.session, url, auth, args)
            try:
                await asyncio.to_thread(slot.verify, part, args)
            except Refused:
                await asyncio.to_thread(slot.discard, part)  # a bad image is not resumed
                raise
        except Refused as e:
            log.warning("firmware refused event=agent_ota_refused version=%s error=%s",
                        args["version"], e)
            await self.client.send(firmware_report(cid, args["version"], "refused", str(e)))
            self._updating = None
            return
        await asyncio.to_thread(slot.apply, part, args, cid)
        # The restart: the new version starts (or is rolled back) and connects again.
        assert self.pipeline is not None
        await self.pipeline.stop()
        self.ota_report = await slot.boot()
        self.client.firmware = slot.firmware
        self._updating = None
        self.playing = True
        await self.client.reconnect()

    # ---- telemetry ----
    def state(self) -> str:
        if not self.power_on:
            return "off"
        if self.playing and self.pipeline is not None and self.pipeline.running \
                and self.player.playing:
            return "playing"
        return "idle"

    def audible(self) -> bool:
        """The stream's audio reaches the horns: playing, amplifier on, real audio just now."""
        return self.state() == "playing" and self.player.gain > 0 \
            and time.monotonic() - self.player.last_audio < HEARD_WITHIN

    async def _report_playing(self) -> None:
        """What the device plays, told to the node when it changes (`playing`)."""
        assert self.client is not None
        while True:
            state = "playing" if self.audible() else "off" if not self.power_on else "idle"
            with suppress(Exception):  # the emergency it was told of, else its stream's broadcast
                await self.client.report_playing(self.hearing or self.client.on_air, state)
            await asyncio.sleep(REPORT_EVERY)

    def stream_figures(self) -> dict[str, Any]:
        pipe = self.pipeline
        inp = pipe.input if pipe else None
        play = self.player.take_interval()
        if inp is None:
            return {}
        out = stream_figures(inp.url, inp.interval(), play)
        if play.get("synced") and "skew_ms" in play:
            out["skew_ms"] = round(play["skew_ms"], 3)
        return out

    def faults(self) -> list[str]:
        pipe = self.pipeline
        if self.playing and self.power_on and pipe is not None and pipe.running:
            quiet_since = max(pipe.started_at, self.player.last_audio)
            if time.monotonic() - quiet_since > STALLED_AFTER:
                return ["stream_stalled"]
        return []

    def telemetry(self) -> dict[str, Any]:
        pipe = self.pipeline
        if pipe is not None and isinstance(pipe.input, WebRtcInput):
            self._spawn(pipe.input.refresh_stats())  # figures for the next heartbeat
        return {"state": self.state(), "volume": self.vol.level, "stream": self.stream_figures(),
                "network": {"type": "ethernet"}, "firmware": self.firmware,
                "power": {"amp": self.power_on and all(self.relays),
                          "relays": list(self.relays[:8])},
                "faults": self.faults(), **({"fm": dict(self.fm)} if self.opts.fm_receiver
                                            else {})}


# ---- command line ------------------------------------------------------------------------------
def options_from_args(args: argparse.Namespace) -> AgentOptions:
    device, sep, key = str(args.key).partition(":")
    if not sep or not device or not key:
        raise ValueError(say("agent.bad_key_option"))
    transport = getattr(args, "transport", None)
    if transport is not None and transport not in TRANSPORTS:
        raise ValueError(f"--transport: {', '.join(TRANSPORTS)}")
    delay = float(getattr(args, "target_delay_ms", 300.0))
    if not 20 <= delay <= 10_000:
        raise ValueError(say("agent.bad_target_delay"))
    seconds = getattr(args, "seconds", None)
    key_b64 = getattr(args, "firmware_key", None)
    if key_b64:
        public_key(key_b64)  # ValueError: refused at start, not at the first update
    control = str(getattr(args, "control", "ws") or "ws")
    if control not in CONTROLS:
        raise ValueError(f"--control: {', '.join(CONTROLS)}")
    return AgentOptions(control=control, broker=getattr(args, "broker", None) or None,
                        server=str(args.server), device=device, key=key,
                        sink=str(getattr(args, "sink", "null") or "null"), transport=transport,
                        target_delay_ms=delay, seconds=float(seconds) if seconds else None,
                        fm_receiver=bool(getattr(args, "fm_receiver", False)),
                        impair=Impairment.parse(os.environ.get("LOA_AGENT_IMPAIR")),
                        state_dir=getattr(args, "state_dir", None), firmware_key=key_b64,
                        boot_check=getattr(args, "boot_check", None))


async def _main(opts: AgentOptions, sink: Any) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    agent = Agent(opts, sink)
    code = await agent.run(stop)
    t = agent.player.totals
    log.info("agent stopped event=agent_stop frames=%d missing=%d late=%d code=%d",
             t["frames"], t["missing"], t["late"], code)
    return code


def main(args: argparse.Namespace) -> int:
    """`loa device`: 0 after --seconds or Ctrl-C; 2 bad arguments or sink; 3 refused by the
    server (unknown device, wrong or revoked key, replaced)."""
    from loa.streamer.log import setup_logging

    setup_logging(os.environ.get("LOA_LOG_LEVEL", "info"), "kv")
    try:
        opts = options_from_args(args)
        from loa.relay.agent.client import ws_url

        ws_url(opts.server)
        sink = make_sink(opts.sink)
    except (ValueError, OSError) as e:
        print(f"loa device: {e}", file=sys.stderr)
        return 2
    # Playout threads wake on deadlines: a short GIL switch interval keeps their wake-up from
    # waiting behind the event loop (the default is 5 ms).
    sys.setswitchinterval(0.0005)
    # What is loaded now lives as long as the process: keep it out of the collector's full
    # passes, which would otherwise pause playout for tens of milliseconds now and then.
    gc.collect()
    gc.freeze()
    code = asyncio.run(_main(opts, sink))
    if code:
        print(f"loa device: {say('agent.refused', code=code)}", file=sys.stderr)
        return 3
    return 0
