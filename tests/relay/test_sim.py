"""The fleet simulator against a real node on 127.0.0.1 (real clock, HTTP Opus streams).

200 loudspeakers and 5 boards are registered and provisioned through the REST API, connect, show
online in the server's device list, acknowledge one bulk command each, send heartbeats the server
keeps; two of them decode their area's stream and hear the tone on air. `loa sim` as a command
reuses its fleet file on a second run.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loa.relay.agent.sim import Fleet, load_fleet, recent_audio
from tests.audio import peak_hz
from tests.helpers import Server, start_node, stop_node, until

ROOT = Path(__file__).resolve().parents[2]


def _settings(cfg: Any) -> None:
    cfg.devices.heartbeat = 2.0
    cfg.devices.retry_interval = 1.0


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    # the whole province hears a 440 Hz tone
    srv = await start_node(tmp_path, _settings, "T01")
    try:
        yield srv
    finally:
        await stop_node(srv)


async def test_fleet_of_200_speakers_and_5_boards(server: Server, tmp_path: Path) -> None:
    fleet = Fleet(server.base, server.token, speakers=200, boards=5, decode=2, area="T01",
                  fleet_file=tmp_path / "fleet.json", status_every=0)
    await fleet.start()
    try:
        # registered through the REST API, spread over the six communes, keys in the file
        assert fleet.registered == 205 and fleet.reused == 0
        saved = load_fleet(tmp_path / "fleet.json", server.base)
        assert len(saved) == 205 and len({e.id for e in saved}) == 205
        assert {e.area for e in saved} == {f"T01-H{d}-X{c}" for d in (1, 2) for c in (1, 2, 3)}
        assert oct((tmp_path / "fleet.json").stat().st_mode & 0o777) == "0o600"

        async def online() -> int:
            data = await server.get("/api/v1/devices?area=T01&status=online&limit=1000")
            return int(data["total"])

        await until(lambda: fleet.counts()["connected"] == 205, "every device connected", timeout=60.0, step=0.1)
        await until(lambda: _eq(online(), 205), "the server listing 205 devices online", timeout=60.0, step=0.1)
        mgr = server.node.devices
        assert mgr.connected == 205

        # one bulk command reaches every device, each acknowledges it once
        status, body = await server.post("/api/v1/devices/commands", {
            "area": "T01", "command": "power",
            "args": {"on": True, "steps": [{"relay": 1, "delay_s": 0}, {"relay": 2,
                                                                       "delay_s": 0}]}})
        assert status == 202, body
        assert body["devices"] == 205 and body["online"] == 205
        batch = body["command_batch"]

        async def acked() -> int:
            return int((await server.get(f"/api/v1/devices/commands/{batch}"))["acked"])

        await until(lambda: _eq(acked(), 205), "205 acks", timeout=60.0, step=0.1)
        tally = await server.get(f"/api/v1/devices/commands/{batch}")
        assert tally["failed"] == 0 and tally["expired"] == 0
        assert fleet.commands["power"] == 205  # executed once each: no duplicate execution

        # heartbeats: every device's telemetry is on the server, spread (not all at once)
        await until(lambda: all(d.telemetry is not None and d.telemetry.get("firmware", "")
                                .startswith("loa-sim/") for d in mgr.devices.values()),
                    "a heartbeat from every device", timeout=60.0, step=0.1)
        board = next(d for d in mgr.devices.values() if d.record["kind"] == "board")
        assert board.telemetry is not None and board.telemetry["state"] == "idle"
        speaker = next(d for d in mgr.devices.values() if d.record["kind"] == "loudspeaker")
        assert speaker.telemetry is not None
        assert speaker.telemetry["network"]["type"] == "4g"
        assert speaker.telemetry["stream"]["url"].endswith(".opus?burst_ms=200")

        # two decoders hear the tone of their area
        decoders = fleet.decoders()
        assert len(decoders) == 2
        await until(lambda: all(len(recent_audio(d)) >= 24_000 for d in decoders),
                    "half a second of decoded audio in both decoders", timeout=60.0, step=0.1)
        for d in decoders:
            pcm = recent_audio(d)[-24_000:]
            assert abs(peak_hz(pcm, 48_000) - 440) < 5
            assert float(np.abs(pcm).max()) > 0.05
        dec = mgr.devices[decoders[0].entry.id]
        await until(lambda: dec.telemetry is not None and "jitter_ms" in dec.telemetry.get(
            "stream", {}), "a decoder's stream figures in its heartbeat", timeout=60.0, step=0.1)
        print(json.dumps({"fleet": fleet.counts()}))
    finally:
        await fleet.stop()
    await until(lambda: server.node.devices.connected == 0, "every connection closed", timeout=60.0, step=0.1)


async def _eq(v: Any, expected: int) -> bool:
    return bool(await v == expected)


def _sim(server: Server, cwd: Path, *extra: str, token: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LOA_TOKEN", None)
    if token:
        env["LOA_TOKEN"] = server.token
    return subprocess.run([sys.executable, "-m", "loa.web.cli", "sim", "--server", server.base,
                           "--speakers", "3", "--boards", "1", "--area", "T01-H2",
                           "--seconds", "3", *extra],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


async def test_sim_command_reuses_its_fleet_file(server: Server, tmp_path: Path) -> None:
    first = await asyncio.to_thread(_sim, server, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "4 mới / new" in first.stdout
    assert "kết nối/connected" in first.stdout  # the closing status line
    fleet = load_fleet(tmp_path / "loa-sim-fleet.json", server.base)
    assert len(fleet) == 4 and {e.area for e in fleet} <= {"T01-H2-X1", "T01-H2-X2",
                                                           "T01-H2-X3"}
    listed = await server.get("/api/v1/devices?area=T01-H2")
    assert listed["total"] == 4
    # a second run, even without a token, reuses the same devices and registers nothing
    second = await asyncio.to_thread(_sim, server, tmp_path, token=False)
    assert second.returncode == 0, second.stderr
    assert "4 dùng lại / reused, 0 mới / new" in second.stdout
    assert (await server.get("/api/v1/devices?area=T01-H2"))["total"] == 4
    assert load_fleet(tmp_path / "loa-sim-fleet.json", server.base) == fleet
    # more speakers than the file holds and no token: a clear refusal
    third = await asyncio.to_thread(_sim, server, tmp_path, "--speakers", "5", token=False)
    assert third.returncode == 1
    assert "--token" in third.stderr
