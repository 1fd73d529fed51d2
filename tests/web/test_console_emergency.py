"""The console's emergency screen (emergency.js) and the API it needs: the preview of what an
emergency would interrupt (POST /api/v1/emergencies/preview), the live status of one (GET
/api/v1/emergencies/{id} `status`, the `emergency_status` event), and in Chromium the whole flow
of a province operator (areas, TTS text, confirmation, live status, stop) and the refusals."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from tests.emergencynode import X1, X2, X3, DeviceWs, Srv, live_config, serving, settle, start_music

TEXT = "Bão số năm sắp đổ bộ, người dân sơ tán ngay."


@contextlib.asynccontextmanager
async def acking(*devices: DeviceWs) -> AsyncIterator[None]:
    """The devices read and acknowledge every command in the background, as real ones do."""

    async def loop(d: DeviceWs) -> None:
        while True:
            await d.command("never", timeout=3600)

    tasks = [asyncio.create_task(loop(d)) for d in devices]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def acked_status(srv: Srv, who: str, eid: str, speakers: int) -> dict:
    """The emergency's status once `speakers` loudspeakers acknowledged it (bounded wait)."""
    async with asyncio.timeout(15):
        while True:
            status, one = await srv.call(who, "GET", f"/api/v1/emergencies/{eid}")
            assert status == 200, one
            if one["reach"]["loudspeakers"]["acked"] >= speakers:
                return one["reach"]
            await asyncio.sleep(0.02)


# ---- the API -------------------------------------------------------------------------------------
async def test_preview_counts_what_would_be_interrupted_and_starts_nothing(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv:
        node = srv.node
        music = start_music(node)
        srv.run(0.2)
        status, got = await srv.call("tinh", "POST", "/api/v1/emergencies/preview",
                                     json={"targets": [X1, X2], "content": {"text": TEXT}})
        assert status == 200, got
        assert (got["programmes"], got["communes"], got["areas"]) == (2, 2, 2)
        assert {r["area"]: r["broadcast"] for r in got["interrupted"]} == {X1: music[X1],
                                                                           X2: music[X2]}
        assert got["interrupted"][0]["name"] == "Xã 1 huyện 1" and got["waits"] == []
        assert await node.store.find("emergency") == []  # nothing started
        assert node.engine.on_air(X1)["broadcast"] == music[X1]
        # the whole district: three communes with music, two more areas without
        status, got = await srv.call("tinh", "POST", "/api/v1/emergencies/preview",
                                     json={"targets": ["T01-H1"]})
        assert status == 200 and (got["programmes"], got["communes"]) == (3, 3)
        # a province emergency on air: a district's would wait behind it, not interrupt it
        status, em = await srv.call("tinh", "POST", "/api/v1/emergencies", json={
            "targets": [X1], "content": {"text": TEXT}})
        assert status == 201, em
        srv.run(0.2)
        status, got = await srv.call("huyen1em", "POST", "/api/v1/emergencies/preview",
                                     json={"targets": [X1, X2]})
        assert status == 200, got
        assert [r["area"] for r in got["interrupted"]] == [X2]
        assert [(r["area"], r["broadcast"]) for r in got["waits"]] == [(X1, em["broadcast"])]


async def test_preview_is_refused_without_the_right_or_outside_the_subtree(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv:
        status, got = await srv.call("xa11", "POST", "/api/v1/emergencies/preview",
                                     json={"targets": [X1]})
        assert status == 403 and "khẩn cấp" in got["error"]
        # another commune's area: 403 naming the field
        status, got = await srv.call("xa11em", "POST", "/api/v1/emergencies/preview",
                                     json={"targets": [X2]})
        assert status == 403 and got["field"] == "targets", got
        status, got = await srv.call("xa11em", "POST", "/api/v1/emergencies/preview",
                                     json={"targets": []})
        assert status == 422 and got["field"] == "targets"
        status, got = await srv.call("xa11em", "POST", "/api/v1/emergencies/preview",
                                     json={"targets": [X1]})
        assert status == 200 and got["areas"] == 1


async def test_status_counts_acks_on_air_areas_and_is_cut_to_the_callers_subtree(
        tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv:
        node = srv.node
        start_music(node)
        speakers = [await srv.device(X1), await srv.device(X2)]
        board = await srv.device(X1, "board")
        bystander = await srv.device(X3)
        srv.run(0.2)
        async with acking(*speakers, board, bystander):
            status, em = await srv.call("tinh", "POST", "/api/v1/emergencies", json={
                "targets": [X1, X2], "content": {"text": TEXT}})
            assert status == 201, em
            srv.run(0.5)
            await settle()
            st = await acked_status(srv, "tinh", em["id"], 2)
            assert st["loudspeakers"] == {"acked": 2, "total": 2}
            assert st["boards"] == {"acked": 1, "total": 1}
            assert [a["code"] for a in st["on_air"]] == [X1, X2] and st["areas"] == 2
            # a commune sees its own part only
            status, one = await srv.call("xa11", "GET", f"/api/v1/emergencies/{em['id']}")
            assert status == 200
            assert one["reach"]["loudspeakers"] == {"acked": 1, "total": 1}
            assert [a["code"] for a in one["reach"]["on_air"]] == [X1]
            # another district does not know it
            status, _ = await srv.call("huyen2", "GET", f"/api/v1/emergencies/{em['id']}")
            assert status == 404
            status, _ = await srv.call("tinh", "DELETE", f"/api/v1/emergencies/{em['id']}")
            assert status == 200
            status, one = await srv.call("tinh", "GET", f"/api/v1/emergencies/{em['id']}")
            assert one["reach"]["on_air"] == [] and one["reach"]["loudspeakers"]["acked"] == 0
