"""The as-aired archive (relay/archive.py) through the API: a commune chooses to record, what its
stream carried is kept packet for packet, FFmpeg decodes a downloaded span to the bulletin that
aired (its tone, its duration within 40 ms), a replay airs it again, another commune is refused,
and a full disk stops the recording with an alert while the stream goes on."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from loa.codecs.encoders import Packet
from loa.relay.archive import ALERT_KIND, Archive
from loa.streamer.alerts import Alert
from tests.apiclient import tone_file
from tests.audio import peak_hz
from tests.emergencynode import Srv, live_config, serving, start_music
from tests.faults import fill, tmpfs

X1, X2 = "T01-H1-X1", "T01-H1-X2"
SETTINGS = f"/api/v1/areas/{X1}/archive"


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[Srv]:
    cfg = live_config(tmp_path)
    cfg.archive.segment_s = 3.0  # several segments in one test: a span crosses them
    async with serving(cfg) as s:
        yield s


def ffmpeg_pcm(data: bytes, path: Path) -> np.ndarray:
    """What FFmpeg decodes of an Ogg Opus file, mono float32 at 48 kHz."""
    path.write_bytes(data)
    out = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "f32le", "-ac", "1",
                          "-ar", "48000", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(out, dtype=np.float32)


def loud_seconds(pcm: np.ndarray, rate: int = 48000) -> float:
    """Seconds of audio louder than -30 dBFS, by 5 ms windows (the tone's length)."""
    win = rate // 200
    n = len(pcm) // win
    rms = np.sqrt(np.mean(pcm[:n * win].reshape(n, win) ** 2, axis=1))
    return float(np.count_nonzero(rms > 10 ** (-30 / 20)) * win / rate)


async def test_a_commune_records_its_stream_and_replays_what_aired(srv: Srv, tmp_path: Path):
    # The commune's own choice; another commune may neither read nor change it.
    status, out = await srv.call("xa12", "PUT", SETTINGS, json={"enabled": True})
    assert status == 403, out
    for bad, name in (({"enabled": "yes"}, "enabled"),
                      ({"enabled": True, "retention_days": 0}, "retention_days"),
                      ({"enabled": True, "keep": 1}, "keep")):
        status, out = await srv.call("xa11", "PUT", SETTINGS, json=bad)
        assert (status, out.get("field")) == (422, name), out
    assert X1 not in srv.node.archive.recorders  # refused: nothing changed
    status, out = await srv.call("xa11", "PUT", SETTINGS,
                                 json={"enabled": True, "retention_days": 7})
    assert status == 200, out
    assert (out["effective"], out["from"], out["recording"]) == (
        {"enabled": True, "retention_days": 7}, X1, True)
    assert set(srv.node.archive.recorders) == {X1}  # its neighbour did not choose it
    status, out = await srv.call("xem11", "GET", SETTINGS)
    assert status == 200 and out["own"] == {"enabled": True, "retention_days": 7}

    # What the stream carries, packet for packet, beside the archive.
    carried: list[Packet] = []
    sub = srv.node.hub.subscribe(X1, "opus", maxlen=100_000)
    sub.on_packets = carried.extend
    prog = await srv.approved(tone_file(tmp_path / "ban-tin.wav", 700, 2), "Bản tin",
                              "bientap11")
    srv.run(1.0)
    status, b = await srv.call("xa11", "POST", "/api/v1/broadcasts",
                               json={"programme": prog, "targets": [X1]})
    assert status == 201, b
    srv.run(4.0)
    await asyncio.sleep(0.05)  # the hub's hops to the loop
    await srv.node.station.flush()
    # `to` ahead: the virtual clock runs the media (and as-run) time ahead of the wall clock.
    status, report = await srv.call("xa11", "GET", f"/api/v1/reports/asrun?area={X1}"
                                    f"&to={time.time() + 3600}")
    entry = next(e for e in report["entries"] if e["broadcast"] == b["id"])
    assert 1.9 < entry["seconds"] < 2.1, entry

    # The span around the bulletin, across segments of 3 s: the stream's own packets.
    since, until = entry["start"] - 0.5, entry["end"] + 0.5
    await srv.node.archive.flush()
    data, first, seconds = srv.node.archive.read(X1, since, until)
    stream = [p.data for p in carried
              if since <= srv.node.station.wall(p.pts) + p.duration / 96_000 < until]
    kept = [p for _, _, p in srv.node.archive._packets(X1, since, until)]
    assert kept == stream and len(stream) == 150  # 3 s of 20 ms packets, none lost
    assert len(srv.node.archive.segments(X1)) >= 2

    async with srv.http.get(f"{srv.base}/api/v1/archive/{X1}/audio?from={since}&to={until}",
                            headers={"Authorization": f"Bearer {await srv.login('xem11')}"}
                            ) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "audio/ogg"
        body = await r.read()
    pcm = ffmpeg_pcm(body, tmp_path / "bang-chung.opus")
    assert abs(loud_seconds(pcm) - entry["seconds"]) <= 0.04, loud_seconds(pcm)
    assert abs(peak_hz(pcm, 48000) - 700) < 10
    status, out = await srv.call("xa12", "GET", f"/api/v1/archive/{X1}/audio?from={since}"
                                 f"&to={until}")
    assert status == 403, out
    audit = await srv.node.store.read_log("audit", limit=1000)
    assert any(e["action"] == "archive.download" and e["target"] == X1 for e in audit)

    # Replay: the as-run entry's audio is a library item, aired again at once.
    status, out = await srv.call("xa12", "POST", "/api/v1/archive/replay",
                                 json={"asrun": entry["id"], "targets": [X2]})
    assert status == 403, out
    status, out = await srv.call("xa11", "POST", "/api/v1/archive/replay",
                                 json={"asrun": entry["id"], "targets": [X1]})
    assert status == 201, out
    assert out["media"]["title"] == "Phát lại: Bản tin"
    assert abs(out["media"]["duration"] - entry["seconds"]) <= 0.04, out["media"]
    srv.run(0.2)
    assert srv.node.engine.on_air(X1)["broadcast"] == out["broadcast"]["id"]
    sub.close()


async def test_a_full_disk_stops_recording_with_an_alert_while_the_stream_goes_on(
        tmp_path: Path):
    with tmpfs("2m") as disk:
        cfg = live_config(tmp_path)
        cfg.archive.dir = str(disk / "archive")
        cfg.archive.min_free_mb = 0
        async with serving(cfg) as srv:
            raised: list[Alert] = []
            srv.node.alerts.listeners.append(raised.append)
            status, out = await srv.call("huyen1", "PUT", "/api/v1/areas/T01-H1/archive",
                                         json={"enabled": True})
            assert status == 200, out
            archive: Archive = srv.node.archive
            assert set(archive.recorders) == {"T01-H1", X1, X2, "T01-H1-X3"}  # inherited
            start_music(srv.node)  # silence would be packets of a few bytes
            srv.run(1.0)
            await asyncio.sleep(0.05)
            await archive.flush()
            assert archive.stats["bytes"] > 0 and archive.stopped is None
            filler = fill(disk)
            heard: list[Packet] = []
            sub = srv.node.hub.subscribe(X1, "opus", maxlen=100_000)
            sub.on_packets = heard.extend
            srv.run(3.0)  # more than the last pages of the files still hold
            async with asyncio.timeout(10):  # its own once-a-second flush may be the one
                while not archive.stopped:
                    await archive.flush()  # ENOSPC: recording stops, nothing else does
                    await asyncio.sleep(0.05)
            assert not archive.recorders and archive.stats["write_errors"] == 1
            await archive.check()  # still full: it stays stopped, the alert is not repeated
            assert archive.stopped and len(raised) == 1
            assert [a.kind for a in raised] == [ALERT_KIND]
            assert raised[0].severity == "critical" and "No space" in raised[0].text
            srv.run(1.0)
            await asyncio.sleep(0.05)
            assert len(heard) >= 200  # the stream went on through it
            filler.unlink()
            await archive.check()  # room again: recording resumes, the alert clears
            assert archive.stopped is None and X1 in archive.recorders
            assert raised[-1].kind == ALERT_KIND and raised[-1].cleared is not None
            sub.close()
