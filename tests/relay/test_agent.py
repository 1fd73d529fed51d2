"""The reference loudspeaker agent against a real node on 127.0.0.1 (real clock, RTP multicast on
loopback with TTL 0, WebRTC host candidates on 127.0.0.1).

Devices are registered through the REST API with the bootstrap admin and provisioned through the
public exchange; agents run in-process (asyncio tasks) or as `loa device` processes. What is
checked is behaviour: the tone on air is found by FFT in what each agent played, commands are
acknowledged in the server's records, heartbeats reach the server's registry and its bus, and two
agents of one area play every RTP sample at the same instant although one of them receives the
packets 40-60 ms later.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
import pytest
from aiohttp import web

from loa.relay.agent.agent import Agent, AgentOptions
from loa.relay.agent.client import Command, DeviceClient, ws_url
from loa.relay.agent.impair import Impairment
from loa.relay.agent.playout import (
    ArrivalTiming,
    ClockMapping,
    Player,
    PlayRecord,
    SeqStats,
    extend,
)
from loa.relay.agent.sinks import NullSink, make_sink
from loa.relay.rtp.wire import BadPacket, parse_rtcp, parse_rtp
from tests import helpers
from tests.audio import peak_hz, rms
from tests.helpers import AREA, LOCAL, Server, stop_node, until


# ---- a node ------------------------------------------------------------------------------------
def configure(cfg: Any) -> None:
    cfg.rtp.enabled = True
    cfg.rtp.interface = LOCAL
    cfg.rtp.ttl = 0
    cfg.rtp.port = random.randrange(20_000, 60_000, 2)
    cfg.rtp.group_base = f"239.255.{random.randrange(0, 200)}.0"
    cfg.rtp.pool_size = 64
    cfg.rtp.rtcp_interval = 1.0
    cfg.webrtc.ice_addresses = LOCAL
    cfg.devices.heartbeat = 1.0
    cfg.devices.retry_interval = 1.0


async def start_node(data: Path, port: int = 0, token: str | None = None,
                     rtp_codecs: str = "opus,pcmu") -> Server:
    def setup(cfg: Any) -> None:
        configure(cfg)
        cfg.rtp.codecs = rtp_codecs

    # the district and its communes hear a 440 Hz tone
    return await helpers.start_node(data, setup, "T01-H1", port=port, token=token)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    srv = await start_node(tmp_path / "node")
    try:
        yield srv
    finally:
        await stop_node(srv)


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 48_000)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768


def read_timing(path: Path) -> list[dict[str, float]]:
    with open(f"{path}.timing.csv", newline="", encoding="ascii") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


class Running:
    """An in-process agent task."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.stop = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(agent.run(self.stop))

    async def finish(self) -> int:
        self.stop.set()
        return await asyncio.wait_for(self.task, 20)


def agent(srv: Server, dev: str, key: str, **kw: Any) -> Running:
    return Running(Agent(AgentOptions(srv.base, dev, key, **kw)))


# ---- (a) HTTP Opus: tone, commands, heartbeats -------------------------------------------------
async def test_agent_over_http_plays_the_tone_acks_commands_and_reports(
        server: Server, tmp_path: Path) -> None:
    dev, key = await server.device()
    events = await server.node.bus.subscribe("device.status")
    wav = tmp_path / "http.wav"
    run = agent(server, dev, key, sink=f"wav:{wav}", transport="http")
    a = run.agent
    try:
        ev = await events.get(timeout=20)
        assert (ev["device"], ev["status"], ev["reason"]) == (dev, "online", "connected")
        await until(lambda: a.player.totals["frames"] >= 100, "two seconds played", timeout=30.0)
        assert a.pipeline is not None and a.pipeline.input is not None
        assert a.pipeline.input.transport == "http"
        frames_before = a.player.totals["frames"]

        status, body = await server.post(f"/api/v1/devices/{dev}/commands",
                                         {"command": "volume", "args": {"volume": 50}})
        assert status == 202 and body["online"] is True, body
        cid = body["id"]

        async def command_status() -> str:
            rows = (await server.get(f"/api/v1/devices/{dev}/commands"))["commands"]
            return str(next(r["status"] for r in rows if r["id"] == cid))

        await until(lambda: _is(command_status(), "acked"), "the volume command acked", timeout=30.0)
        assert a.volume == 50
        mark = a.player.totals["frames"]

        # power: relay 1 at once, relay 2 after its warm-up delay; the ack comes at acceptance
        status, body = await server.post(f"/api/v1/devices/{dev}/commands", {
            "command": "power", "args": {"on": True, "steps": [
                {"relay": 1, "delay_s": 0}, {"relay": 2, "delay_s": 0.3}]}})
        assert status == 202
        await until(lambda: a.relays == [True, True] and a.power_on, "both relays on", timeout=30.0)
        assert [c.command for c in a.executed] == ["volume", "power"]

        # heartbeats: kept by the server (registry and store), with the stream figures
        async def telemetry() -> dict[str, Any]:
            return dict((await server.get(f"/api/v1/devices/{dev}"))["telemetry"] or {})

        await until(lambda: _has_stream(telemetry(), volume=50),
                    "a heartbeat after the volume and power commands", timeout=30.0)
        t = await telemetry()
        assert t["state"] == "playing" and t["firmware"].startswith("loa-agent/")
        assert t["stream"]["url"] == f"{server.base}/streams/{AREA}.opus?burst_ms=200"
        assert 0 <= t["stream"]["loss"] <= 1 and t["stream"]["jitter_ms"] >= 0
        assert t["stream"]["latency_ms"] >= 300  # the target delay at least
        assert t["power"]["relays"] == [True, True] and t["faults"] == []
        await until(lambda: a.player.totals["frames"] >= mark + 75, "1.5 s at the new volume", timeout=30.0)
    finally:
        assert await run.finish() == 0
        await events.close()

    pcm = read_wav(wav)
    assert abs(peak_hz(pcm[-48_000:], 48_000) - 440) < 5
    # the volume command made it quieter: gain (50/100)^2 against (80/100)^2
    before = pcm[(frames_before - 50) * 960:(frames_before - 5) * 960]
    after = pcm[-48_000:]
    ratio = rms(after) / rms(before)
    assert abs(ratio - (0.5 / 0.8) ** 2) < 0.05, ratio


async def _is(v: Any, expected: str) -> bool:
    return bool(await v == expected)


async def _has_stream(v: Any, volume: int) -> bool:
    t = await v
    s = t.get("stream", {})
    return t.get("volume") == volume and "jitter_ms" in s and "latency_ms" in s \
        and t.get("power", {}).get("relays") == [True, True]


# ---- (b) RTP: two agents of one area play each sample at the same instant ----------------------
def run_agent_process(srv: Server, dev: str, key: str, wav: Path, seconds: float,
                      impair: str = "") -> int:
    """`loa device` over RTP into a WAV sink (its log next to it); the exit code."""
    env = {**os.environ, "LOA_AGENT_IMPAIR": impair}
    # 310 ms, not 300: the deadlines then fall between the node's 20 ms media ticks. Here the
    # node and both devices share two cores; real devices do not wake with the server.
    with open(f"{wav}.log", "wb") as log:
        return subprocess.run(
            [sys.executable, "-m", "loa.web.cli", "device", "--server", srv.base, "--key",
             f"{dev}:{key}", "--sink", f"wav:{wav}", "--transport", "rtp",
             "--target-delay-ms", "310", "--seconds", str(seconds)],
            env=env, stdout=subprocess.DEVNULL, stderr=log, timeout=60).returncode


async def test_two_rtp_agents_play_in_sync(server: Server, tmp_path: Path) -> None:
    (a_id, a_key), (b_id, b_key) = await server.device(name="Loa 1"), await server.device(
        name="Loa 2")
    wa, wb = tmp_path / "a.wav", tmp_path / "b.wav"
    # b's packets (RTP and RTCP) arrive 40-60 ms later than a's, as over a longer path
    codes = await asyncio.gather(
        asyncio.to_thread(run_agent_process, server, a_id, a_key, wa, 9),
        asyncio.to_thread(run_agent_process, server, b_id, b_key, wb, 9,
                          "delay_ms=40,jitter_ms=20"))
    assert codes == [0, 0], (Path(f"{wa}.log").read_text()[-2000:],
                             Path(f"{wb}.log").read_text()[-2000:])
    ta, tb = read_timing(wa), read_timing(wb)
    by_ts = {r["ts"]: r for r in ta if r["arrival"] > 0}
    pairs = [(by_ts[r["ts"]], r) for r in tb if r["arrival"] > 0 and r["ts"] in by_ts]
    assert len(pairs) >= 150, len(pairs)  # 3 s of frames both played from real packets
    # both derived the same instant for every sample from the sender reports ...
    assert max(abs(x["ideal"] - y["ideal"]) for x, y in pairs) < 1e-5
    assert all(abs(x["ideal"] - x["source"] - 0.31) < 1e-5 for x, _ in pairs)
    # ... although b received every packet later
    late = statistics.median(y["arrival"] - x["arrival"] for x, y in pairs)
    assert late >= 0.040, late
    # ... and played it then: the same instant on both, to well under a millisecond
    diffs = sorted(abs(x["played"] - y["played"]) * 1000 for x, y in pairs)
    skews = [abs(r["played"] - r["ideal"]) * 1000 for r in ta + tb if r["arrival"] > 0]
    result = {"frames": len(pairs), "agents_diff_ms_p50": round(statistics.median(diffs), 3),
              "agents_diff_ms_p95": round(diffs[int(0.95 * (len(diffs) - 1))], 3),
              "agents_diff_ms_max": round(diffs[-1], 3),
              "skew_ms_p50": round(statistics.median(skews), 3),
              "arrival_gap_ms_p50": round(late * 1000, 1)}
    print(json.dumps({"rtp_sync": result}))
    assert result["agents_diff_ms_p50"] < 1.0
    assert result["skew_ms_p50"] < 1.0
    for wav in (wa, wb):
        pcm = read_wav(wav)
        assert abs(peak_hz(pcm[-48_000:], 48_000) - 440) < 5


async def test_agent_over_rtp_pcmu_plays_the_tone(tmp_path: Path) -> None:
    srv = await start_node(tmp_path / "node", rtp_codecs="pcmu")
    try:
        dev, key = await srv.device()
        wav = tmp_path / "pcmu.wav"
        run = agent(srv, dev, key, sink=f"wav:{wav}", transport="rtp")
        try:
            await until(lambda: run.agent.player.totals["frames"] >= 75, "1.5 s played", timeout=30.0)
            inp = run.agent.pipeline.input if run.agent.pipeline else None
            assert inp is not None and inp.transport == "rtp" and inp.codec == "pcmu"
        finally:
            assert await run.finish() == 0
    finally:
        await stop_node(srv)
    pcm = read_wav(wav)
    assert pcm.shape[0] >= 75 * 960  # 8 kHz packets played as 48 kHz frames
    assert abs(peak_hz(pcm[-48_000:], 48_000) - 440) < 5


# ---- (c) WebRTC --------------------------------------------------------------------------------
async def test_agent_over_webrtc_plays_the_tone(server: Server, tmp_path: Path) -> None:
    dev, key = await server.device()
    wav = tmp_path / "webrtc.wav"
    run = agent(server, dev, key, sink=f"wav:{wav}", transport="webrtc")
    try:
        await until(lambda: run.agent.player.totals["frames"] >= 100, "two seconds played", timeout=30.0)
        inp = run.agent.pipeline.input if run.agent.pipeline else None
        assert inp is not None and inp.transport == "webrtc"
        assert inp.url == f"{server.base}/whep/{AREA}"

        async def stream() -> dict[str, Any]:
            t = (await server.get(f"/api/v1/devices/{dev}"))["telemetry"] or {}
            return dict(t.get("stream") or {})

        await until(lambda: _url_has(stream(), "/whep/"), "a heartbeat naming the WHEP stream", timeout=30.0)
    finally:
        assert await run.finish() == 0
    pcm = read_wav(wav)
    assert abs(peak_hz(pcm[-48_000:], 48_000) - 440) < 5
    await until(lambda: not server.node.devices.get(dev).link, "the control link closed", timeout=30.0)


async def _url_has(v: Any, part: str) -> bool:
    return part in (await v).get("url", "")


# ---- (d) the server restarts -------------------------------------------------------------------
async def test_agent_reconnects_after_a_server_restart(tmp_path: Path) -> None:
    srv = await start_node(tmp_path / "node")
    dev, key = await srv.device()
    run = agent(srv, dev, key, transport="http")
    a = run.agent
    try:
        await until(lambda: a.client is not None and a.client.connected, "connected", timeout=30.0)
        await until(lambda: a.player.totals["frames"] >= 25, "audio", timeout=30.0)
        port, token = srv.port, srv.token
        await stop_node(srv)
        await until(lambda: a.client is not None and not a.client.connected, "disconnected", timeout=30.0)
        srv = await start_node(tmp_path / "node", port=port, token=token)
        await until(lambda: a.client is not None and a.client.stats["welcomes"] == 2,
                    "welcomed again by the new server", timeout=30.0)
        assert a.client.final_code is None
        frames = a.player.totals["frames"]
        await until(lambda: a.player.totals["frames"] >= frames + 50, "audio again", timeout=30.0)
        assert a.player.recent_pcm().size and abs(
            peak_hz(a.player.recent_pcm()[-24_000:], 48_000) - 440) < 5
        dev_view = await srv.get(f"/api/v1/devices/{dev}")
        assert dev_view["connected"] is True and dev_view["status"] == "online"
    finally:
        assert await run.finish() == 0
        await stop_node(srv)


async def test_agent_with_an_fm_receiver_tunes_and_reports_it(
        server: Server, tmp_path: Path) -> None:
    dev, key = await server.device()
    run = agent(server, dev, key, transport="http", fm_receiver=True)
    a = run.agent
    try:
        await until(lambda: a.player.totals["frames"] >= 50, "the stream plays", timeout=30.0)
        assert a.player.gain > 0
        status, body = await server.post(f"/api/v1/devices/{dev}/commands", {
            "command": "fm", "args": {"on": True, "frequency_mhz": 99.9}})
        assert status == 202, body
        await until(lambda: a.fm["on"], "tuned", timeout=20.0)
        assert a.player.gain == 0.0  # the tuner plays, not the stream
        assert a.telemetry()["fm"] == {"on": True, "frequency_mhz": 99.9}
        rec = await server.node.store.get("device", dev)
        assert rec["capabilities"]["fm"] is True
        status, body = await server.post(f"/api/v1/devices/{dev}/commands", {
            "command": "fm", "args": {"on": False}})
        await until(lambda: not a.fm["on"] and a.player.gain > 0, "back on the stream",
                    timeout=20.0)
    finally:
        assert await run.finish() == 0


# ---- (e) an FM transmitter's bridge: the area's stream to a sound card through ALSA -------------
async def test_agent_as_fm_bridge_plays_the_area_into_an_alsa_device(
        server: Server, tmp_path: Path) -> None:
    """`--sink alsa:DEVICE` through the real ALSA library: a PCM of the ALSA file plugin stands
    in for the transmitter's line input (no sound card here) and keeps what it was given."""
    raw = tmp_path / "phat-fm.raw"
    (tmp_path / ".asoundrc").write_text(
        f'pcm.maphat {{ type file slave.pcm "null" file "{raw}" format "raw" }}\n')
    dev, key = await server.device()
    env = {**os.environ, "HOME": str(tmp_path)}
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "loa.web.cli", "device", "--server", server.base,
                         "--key", f"{dev}:{key}", "--sink", "alsa:maphat", "--transport", "http",
                         "--seconds", "4"],
        env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pcm = np.frombuffer(raw.read_bytes(), dtype="<i2").astype(np.float32) / 32768
    assert pcm.size > 48_000, pcm.size  # over a second of the area's audio reached the card
    tail = pcm[-48_000:]
    assert abs(peak_hz(tail, 48_000) - 440) < 5 and rms(tail) > 0.05


# ---- the command line --------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loa.web.cli", "device", *args],
                          capture_output=True, text=True, timeout=60)


async def test_cli_refuses_bad_arguments_and_a_wrong_key(server: Server) -> None:
    dev, _key = await server.device()
    bad_key = await asyncio.to_thread(_cli, "--server", server.base, "--key", "no-colon")
    assert bad_key.returncode == 2 and "DEVICE_ID:KEY" in bad_key.stderr
    bad_sink = await asyncio.to_thread(_cli, "--server", server.base, "--key", f"{dev}:x",
                                       "--sink", "mp3:/tmp/x")
    assert bad_sink.returncode == 2 and "null | wav:FILE | default" in bad_sink.stderr
    no_card = await asyncio.to_thread(_cli, "--server", server.base, "--key", f"{dev}:x",
                                      "--sink", "alsa:khong-co-card")
    assert no_card.returncode == 2 and "ALSA" in no_card.stderr, no_card.stderr
    wrong = await asyncio.to_thread(_cli, "--server", server.base, "--key", f"{dev}:wrong-key",
                                    "--seconds", "20")
    assert wrong.returncode == 3, wrong.stderr
    assert "4001" in wrong.stderr
    assert "wrong-key" not in wrong.stderr  # keys never reach the log


# ---- the protocol client against a scripted server ----------------------------------------------
async def test_device_client_executes_once_acks_every_copy_and_refuses_expired() -> None:
    acks: list[dict[str, Any]] = []
    hellos: list[dict[str, Any]] = []
    connections = 0

    async def connect(request: web.Request) -> web.WebSocketResponse:
        nonlocal connections
        connections += 1
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        hellos.append(json.loads((await ws.receive()).data))
        now = time.time()
        await ws.send_json({"v": 1, "type": "welcome", "server_time": now, "heartbeat": 30,
                            "config": {"device": "d1", "area": AREA, "streams": []}})
        if connections == 1:
            cmd = {"v": 1, "type": "command", "id": "ab.1", "command": "volume",
                   "args": {"volume": 30}, "expires": now + 60}
            await ws.send_json(cmd)
            await ws.send_json(cmd)  # the same id again: acked again, not executed again
            await ws.send_json({**cmd, "id": "ab.2", "expires": now - 1})
            await ws.send_json({"v": 1, "type": "command", "id": "ab.3", "command": "stop",
                                "args": "garbage", "expires": now + 60})
            await ws.send_json({"v": 1, "type": "error", "error": "thử / test"})
            for _ in range(4):
                acks.append(json.loads((await ws.receive()).data))
            await ws.close(code=1001)  # going away: the client comes back
        else:
            await ws.close(code=4001, message=b"wrong key")  # final: the client gives up
        return ws

    app = web.Application()
    app.router.add_get("/api/v1/devices/connect", connect)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, LOCAL, 0).start()
    base = f"http://{LOCAL}:{runner.addresses[0][1]}"
    executed: list[Command] = []

    async def on_command(cmd: Command) -> tuple[bool, str | None]:
        executed.append(cmd)
        return True, None

    async with aiohttp.ClientSession() as session:
        client = DeviceClient(base, "d1", "k" * 43, session=session, firmware="t/1",
                              telemetry=dict, on_command=on_command, backoff_min=0.05)
        code = await asyncio.wait_for(client.run(), 20)
    await runner.cleanup()
    assert code == 4001 and client.final_code == 4001 and connections == 2
    assert [h["type"] for h in hellos] == ["hello", "hello"] and hellos[0]["key"] == "k" * 43
    assert [c.id for c in executed] == ["ab.1"]
    assert acks == [{"v": 1, "type": "ack", "id": "ab.1", "ok": True},
                    {"v": 1, "type": "ack", "id": "ab.1", "ok": True},
                    {"v": 1, "type": "ack", "id": "ab.2", "ok": False, "error": "expired"},
                    {"v": 1, "type": "ack", "id": "ab.3", "ok": False,
                     "error": acks[3]["error"]}]
    assert "malformed" in acks[3]["error"]
    assert client.stats["duplicates"] == 1 and client.stats["errors"] == 1
    assert ws_url("https://loa.example.vn/x/") == "wss://loa.example.vn/x/api/v1/devices/connect"


# ---- pieces ------------------------------------------------------------------------------------
def test_clock_mapping_follows_drift_and_restarts_on_a_jump() -> None:
    m = ClockMapping(48_000)
    assert m.source_wall(0) is None
    epoch = 1_764_140_000.0
    drift = 1 + 80e-6  # the sender's media clock runs 80 ppm fast against its wall clock
    for i in range(10):  # a report every second
        ts = (1 << 32) + i * 48_000
        m.add(ts, epoch + i * drift)
    ts = (1 << 32) + 15 * 48_000  # five seconds after the last report
    got = m.source_wall(ts)
    assert got is not None and abs(got - (epoch + 15 * drift)) < 1e-6
    m.add((1 << 32) + 10 * 48_000, epoch + 500.0)  # a restarted sender: far off the line
    assert m.restarts == 1
    assert m.source_wall((1 << 32) + 10 * 48_000) == pytest.approx(epoch + 500.0)
    m.add((1 << 32) + 11 * 48_000, float("nan"))  # garbage is ignored
    assert m.source_wall((1 << 32) + 11 * 48_000) == pytest.approx(epoch + 501.0)


def test_rtp_rtcp_parsing_and_counters() -> None:
    for bad in (b"", b"\x80", b"\x40" + bytes(11), b"\xa0\x6f" + bytes(10) + b"\x00"):
        with pytest.raises(BadPacket):
            parse_rtp(bad)
    h = parse_rtp(b"\x90\xef\x00\x07" + (1234).to_bytes(4, "big") + (9).to_bytes(4, "big")
                  + b"\x00\x01\x00\x01" + b"\xaa\xbb\xcc\xdd" + b"payload")
    assert (h.marker, h.pt, h.seq, h.ts, h.ssrc, h.payload) == (True, 111, 7, 1234, 9,
                                                                b"payload")
    with pytest.raises(BadPacket):
        parse_rtcp(b"\x80\xc8\x00\x06" + bytes(8))  # says 28 bytes, has 12
    sr = (b"\x80\xc8\x00\x06" + (5).to_bytes(4, "big") + (2_208_988_800 + 100).to_bytes(4, "big")
          + (1 << 31).to_bytes(4, "big") + (777).to_bytes(4, "big") + bytes(8))
    bye = b"\x81\xcb\x00\x01" + (5).to_bytes(4, "big")
    reports, byes = parse_rtcp(sr + bye)
    assert reports[0].ntp == 100.5 and reports[0].rtp == 777 and byes == {5}
    assert extend(5, (1 << 32) - 10) == (1 << 32) + 5  # wrapped forward
    assert extend((1 << 32) - 10, (1 << 32) + 5) == (1 << 32) - 10  # a late one from before
    s = SeqStats()
    for seq in [65534, 65535, 1, 2]:  # 0 lost, across the wrap
        s.update(seq)
    assert s.expected == 5 and s.interval_loss() == pytest.approx(0.2)
    assert s.interval_loss() == 0.0


class _Collect:
    def __init__(self) -> None:
        self.recs: list[PlayRecord] = []

    def write(self, pcm: np.ndarray, rec: PlayRecord) -> None:
        self.recs.append(rec)

    def close(self) -> None:
        pass


def test_player_conceals_missing_frames_and_drops_late_ones() -> None:
    sink = _Collect()
    p = Player(sink, target_delay=0.1, settle=0)
    p.start()
    try:
        gen = p.open_stream(48_000, ArrivalTiming(48_000), lambda b: np.zeros(0, np.float32))
        t0 = p.now_wall()
        frame = np.full(960, 0.1, dtype=np.float32)
        for i in range(20):
            if i != 5:
                p.push(gen, (1 << 32) + i * 960, frame, t0)
        deadline = time.monotonic() + 10
        while len(sink.recs) < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        p.push(gen, (1 << 32) + 5 * 960, frame, t0)  # too late: its turn is past
        while len(sink.recs) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        p.stop()
    ts = [r.ts - (1 << 32) for r in sink.recs[:20]]
    assert ts == [i * 960 for i in range(20)]  # in order, one slot each
    assert [r.arrival == 0 for r in sink.recs[:20]] == [i == 5 for i in range(20)]
    assert p.totals["late"] == 1 and p.totals["missing"] >= 1
    # every slot 20 ms after the previous one, on the arrival timeline plus the delay
    assert all(abs(r.ideal - (t0 + 0.1 + i * 0.02)) < 1e-6 for i, r in enumerate(sink.recs[:20]))


def test_sinks_and_impairment_specs(tmp_path: Path) -> None:
    assert isinstance(make_sink("null"), NullSink)
    with pytest.raises(ValueError, match="unknown sink"):
        make_sink("flac:x")
    with pytest.raises(ValueError, match="no such directory"):
        make_sink(f"wav:{tmp_path}/nope/x.wav")
    imp = Impairment.parse("delay_ms=40,jitter_ms=20,loss=0.01")
    assert (imp.delay, imp.jitter, imp.loss) == (0.04, 0.02, 0.01) and imp.active
    for bad in ("delay=3", "loss=2", "delay_ms"):
        with pytest.raises(ValueError):
            Impairment.parse(bad)
    # a real decoder round trip through the agent's PCMU path: 8 kHz in, 48 kHz out
    from loa.relay.agent.decoders import make_decoder

    enc = av.CodecContext.create("pcm_mulaw", "w")
    enc.sample_rate, enc.layout, enc.format = 8000, "mono", "s16"
    enc.open()
    t = np.arange(8000) / 8000
    tone = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    dec = make_decoder("pcmu")
    out = []
    for i in range(0, 8000, 160):
        f = av.AudioFrame.from_ndarray(tone[None, i:i + 160], format="s16", layout="mono")
        f.sample_rate = 8000
        for pkt in enc.encode(f):
            out.append(dec(bytes(pkt)))
    pcm = np.concatenate(out)
    assert pcm.shape[0] == 48_000 and abs(peak_hz(pcm, 48_000) - 440) < 2
