"""Scheduled capture of an input (web/captures.py): the 05:00 relay recorded into the library at
its time without airing, then aired at 06:30 — here a station on 127.0.0.1 sending 520 Hz,
captured for 3 s and aired 2 s later, on the real clock."""

from __future__ import annotations

import asyncio
import io
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np

from loa.relay.urlpolicy import FetchSettings
from tests.audio import peak_hz
from tests.emergencynode import Srv, live_config, serving
from tests.origin import Origin, station_mp3

X1, X2 = "T01-H1-X1", "T01-H1-X2"
WAIT = 30.0  # bound for waits (never a speed check)


async def relay_programme(srv: Srv, url: str) -> str:
    status, prog = await srv.call("bientap11", "POST", "/api/v1/programmes", json={
        "title": "Thời sự VOV 5 giờ", "type": "relay", "url": url})
    assert status == 201, prog
    for who, action in (("bientap11", "submit"), ("duyet1", "approve")):
        status, body = await srv.call(who, "POST", f"/api/v1/programmes/{prog['id']}/{action}")
        assert status == 200, body
    return str(prog["id"])


async def state(srv: Srv, cid: str, want: str) -> dict[str, Any]:
    async with asyncio.timeout(WAIT):
        while True:
            status, rec = await srv.call("xa11", "GET", f"/api/v1/captures/{cid}")
            assert status == 200, rec
            if rec["status"] == want:
                return rec
            assert rec["status"] in ("scheduled", "recording", "done"), rec
            await asyncio.sleep(0.1)


async def test_a_relay_is_captured_at_its_time_and_aired_later(tmp_path: Path):
    origin = Origin(station_mp3(tmp_path / "vov.mp3", 520, 30))
    await origin.start()
    cfg = live_config(tmp_path)
    cfg.fetch = FetchSettings(allow_networks=["127.0.0.0/8"])  # the outside world is local
    try:
        async with serving(cfg, realtime=True) as srv:
            prog = await relay_programme(srv, f"http://127.0.0.1:{origin.port}/live.mp3")
            now = time.time()
            body = {"programme": prog, "start": now + 0.5, "seconds": 3,
                    "air": {"targets": [X1], "at": now + 6}}
            for who, bad, want in (
                    ("xa12", {}, (403, "programme")),  # another commune's programme
                    ("xa11", {"air": {"targets": [X2], "at": now + 6}}, (403, "targets")),
                    ("xa11", {"seconds": 0}, (422, "seconds")),
                    ("xa11", {"start": now - 60}, (422, "start")),
                    ("xa11", {"air": {"targets": [X1], "at": now + 1}}, (422, "air.at")),
                    ("xem11", {}, (403, None))):
                status, out = await srv.call(who, "POST", "/api/v1/captures",
                                             json={**body, **bad})
                assert (status, out.get("field")) == want, (who, bad, out)
            status, rec = await srv.call("xa11", "POST", "/api/v1/captures", json=body)
            assert status == 201 and rec["status"] == "scheduled", rec
            assert (await srv.call("xa12", "GET", f"/api/v1/captures/{rec['id']}"))[0] == 404

            rec = await state(srv, rec["id"], "recording")
            assert srv.node.engine.on_air(X1)["broadcast"] is None  # captured, not aired
            rec = await state(srv, rec["id"], "done")
            # Its window, from the moment the input opened (a few ms after 05:00) to its end.
            assert 2.9 <= rec["recorded"] <= 3.0 and time.time() < now + 6
            assert srv.node.engine.on_air(X1)["broadcast"] is None  # not before its time
            async with srv.http.get(f"{srv.base}/api/v1/media/{rec['media']}/audio", headers={
                    "Authorization": f"Bearer {await srv.login('xa11')}"}) as r:
                assert r.status == 200
                with wave.open(io.BytesIO(await r.read())) as w:
                    rate = w.getframerate()
                    pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2") / 32768
            assert abs(len(pcm) / rate - rec["recorded"]) < 0.02
            assert abs(peak_hz(pcm[len(pcm) // 2:], rate) - 520) < 5  # the station, heard

            rec = await state(srv, rec["id"], "aired")
            async with asyncio.timeout(WAIT):  # on air from the media clock's next tick
                while srv.node.engine.on_air(X1)["broadcast"] != rec["broadcast"]:
                    await asyncio.sleep(0.02)
            b = await srv.node.store.get("broadcast", rec["broadcast"])
            assert b["issuer"] == X1 and b["user"] == "xa11" and b["spec"]["capture"] == rec["id"]
            status, listed = await srv.call("xa11", "GET", "/api/v1/captures")
            assert [c["id"] for c in listed["captures"]] == [rec["id"]]
            status, out = await srv.call("xa11", "DELETE", f"/api/v1/captures/{rec['id']}")
            assert (status, out["field"]) == (409, "id")
    finally:
        await origin.kill()
