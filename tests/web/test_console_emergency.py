"""The console's emergency screen (emergency.js) and the API it needs: the preview of what an
emergency would interrupt (POST /api/v1/emergencies/preview), the live status of one (GET
/api/v1/emergencies/{id} `status`, the `emergency_status` event), and in Chromium the whole flow
of a province operator (areas, TTS text, confirmation, live status, stop) and the refusals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

from playwright.async_api import expect

from tests.apiclient import tone_file
from tests.audio import peak_hz
from tests.emergencynode import X1, X2, X3, DeviceWs, Srv, live_config, serving, settle, start_music
from tests.httpstreams import ffmpeg_record
from tests.web.browser import XSS, axe_violations, chromium, login, phone, shots

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


# ---- the screen in Chromium ----------------------------------------------------------------------
async def test_province_runs_a_tts_emergency_to_two_communes_and_stops_it(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv, chromium() as browser:
        node = srv.node
        music = start_music(node)
        speakers = [await srv.device(X1), await srv.device(X2)]
        bystander = await srv.device(X3)
        srv.run(0.3)
        async with acking(*speakers, bystander):
            page = await phone(browser, bypass_csp=True)
            await login(page, f"{srv.base}/", "tinh")
            await page.click("nav.screens >> text=Khẩn cấp")
            await expect(page.locator("main h1")).to_have_text("Khẩn cấp")
            # areas: open the district, tick two of its communes
            tree = page.locator(".pick-tree")
            await tree.locator("li[data-code=T01-H1] button.expand").click()
            await tree.locator(f"input[data-code={X1}]").check()
            await tree.locator(f"input[data-code={X2}]").check()
            await expect(page.locator(".chosen li span")).to_have_text(["Xã 1 huyện 1",
                                                                        "Xã 2 huyện 1"])
            # content: the text, heard first (the speech is made on the node, played from it)
            await page.get_by_label("Nội dung cần đọc").fill(TEXT)
            await page.click("button.em-listen")
            audio = page.locator("audio.em-preview")
            await expect(audio).to_have_attribute("src", re.compile(r"^/api/v1/media/\w+/audio$"))
            media_id = (await audio.get_attribute("src") or "").split("/")[4]
            assert (await node.store.get("media", media_id) or {}).get("tts")
            await page.get_by_label("Số lần phát (1-10)").fill("2")
            await shots(page, "emergency-form")
            assert await axe_violations(page) == []
            # the confirmation says what it interrupts; nothing is on air yet
            await page.click("button.em-next")
            await expect(page.locator(".em-interrupts")).to_have_text(
                "Sẽ ngắt 2 chương trình tại 2 xã")
            await expect(page.locator(".em-rows li")).to_have_count(2)
            await expect(page.locator("form.em-form")).to_be_hidden()
            assert await node.store.find("emergency") == []
            await shots(page, "emergency-confirm")
            assert await axe_violations(page) == []
            await page.click("button.em-go")
            await expect(page).to_have_url(re.compile(r"#/emergency/\w+$"))
            (em,) = await node.store.find("emergency")
            assert em["targets"] == [X1, X2] and em["spec"]["repeat"] == 2
            srv.run(0.5)
            await settle()
            # the two communes switch, the third keeps its music; the screen follows live
            assert node.engine.on_air(X1)["broadcast"] == em["broadcast"]
            assert node.engine.on_air(X2)["broadcast"] == em["broadcast"]
            assert node.engine.on_air(X3)["broadcast"] == music[X3]
            await expect(page.locator(".em-state")).to_have_text("Đang phát tại 2/2 xã")
            await expect(page.locator(".em-speakers strong")).to_have_text("2/2")
            await expect(page.locator(".em-boards strong")).to_have_text("0/0")
            await expect(page.locator(".em-areas li")).to_have_text(["Xã 1 huyện 1",
                                                                     "Xã 2 huyện 1"])
            # proof of delivery: one loudspeaker reports playing it, the other is named
            assert speakers[0].ws is not None
            await speakers[0].ws.send_str(json.dumps({"v": 1, "type": "playing",
                                                      "broadcast": em["id"],
                                                      "state": "playing"}))
            await expect(page.locator(".em-played")).to_have_text("Đã phát tới 1/2 cụm loa")
            await expect(page.locator(".em-missing tbody td")).to_have_text([
                f"loudspeaker {X2}", "Xã 2 huyện 1", "đã nhận lệnh, chưa báo đang phát"])
            await expect(page.locator(".em-delivery a.csv")).to_have_attribute(
                "href", f"/api/v1/reports/delivery?emergency={em['id']}&format=csv")
            await shots(page, "emergency-live")
            assert await axe_violations(page) == []
            # stop: what was preempted resumes
            await page.click("button.em-stop")
            await expect(page.locator(".em-state")).to_contain_text("Đã kết thúc")
            await expect(page.locator("button.em-stop")).to_have_count(0)
            srv.run(0.3)
            await settle()
            assert node.engine.on_air(X1)["broadcast"] == music[X1]
            assert node.engine.on_air(X2)["broadcast"] == music[X2]
            await shots(page, "emergency-ended")


async def test_no_screen_without_the_right_and_a_commune_may_not_stop_the_province(
        tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv, chromium() as browser:
        start_music(srv.node)
        srv.run(0.2)
        page = await phone(browser)
        await login(page, f"{srv.base}/", "xa11")
        await expect(page.locator("nav.screens a")).not_to_contain_text(["Khẩn cấp"])
        await page.goto(f"{srv.base}/#/emergency")
        await expect(page.locator("main .error")).to_have_text(
            "Bạn không có quyền phát khẩn cấp: quyền này do quản trị viên cấp riêng")
        assert await page.locator("fieldset.area-picker").count() == 0

        status, em = await srv.call("tinh", "POST", "/api/v1/emergencies", json={
            "targets": ["T01-H1"], "content": {"text": TEXT}, "title": XSS})
        assert status == 201, em
        srv.run(0.3)
        page = await phone(browser, bypass_csp=True)
        await login(page, f"{srv.base}/", "xa11em")
        await page.click("nav.screens >> text=Khẩn cấp")
        await page.locator(".em-active a").click()  # the title, shown as text
        await expect(page.locator(".em-live h2")).to_have_text(XSS)
        await expect(page.locator(".em-state")).to_have_text("Đang phát tại 1/1 xã")
        await expect(page.locator("button.em-stop")).to_be_disabled()
        await expect(page.locator("#em-stop-why")).to_have_text(
            "Không được dừng: tin khẩn cấp do cấp trên (Tỉnh Mẫu) phát")
        await shots(page, "emergency-refused")
        assert await axe_violations(page) == []
        # the server refuses it too, with its reason, and it stays on air
        status, got = await srv.call("xa11em", "DELETE", f"/api/v1/emergencies/{em['id']}")
        assert status == 403 and "cấp trên" in got["error"]
        assert (await srv.node.store.get("emergency", em["id"]))["status"] == "active"


async def test_live_voice_emergency_from_the_console_microphone_is_heard(tmp_path: Path) -> None:
    """Content "live": the status page publishes the (fake) microphone over WHIP with the session;
    FFmpeg hears its 700 Hz on the target commune's stream after the attention signal, the
    bystander commune keeps its music; the microphone off, the emergency ends and the music is
    back."""
    mic = tone_file(tmp_path / "tone-700.wav", 700, 60, ("-ar", "48000"))
    async with serving(live_config(tmp_path), realtime=True) as srv, \
            chromium("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                     f"--use-file-for-fake-audio-capture={mic}") as browser:
        music = start_music(srv.node)
        page = await phone(browser, permissions=["microphone"], bypass_csp=True)
        await login(page, f"{srv.base}/", "tinh")
        await page.click("nav.screens >> text=Khẩn cấp")
        tree = page.locator(".pick-tree")
        await tree.locator("li[data-code=T01-H1] button.expand").click()
        await tree.locator(f"input[data-code={X1}]").check()
        await page.locator("input[name=kind][value=live]").check()
        await page.click("button.em-next")
        await page.click("button.em-go")
        await page.click("button.em-voice-start")
        await expect(page.locator(".em-voice-state")).to_have_text("● GIỌNG NÓI ĐANG PHÁT")
        assert await page.locator("#em-level").evaluate("m => m.value") >= 0  # fed by the mic
        await shots(page, "emergency-voice")
        assert await axe_violations(page) == []
        pcm, rate = await ffmpeg_record(f"{srv.base}/streams/{X1}.mp3?burst_ms=0",
                                        tmp_path / "x1.wav", 8)
        assert abs(peak_hz(pcm[-3 * rate:], rate) - 700) < 15  # the voice, after the attention
        pcm, rate = await ffmpeg_record(f"{srv.base}/streams/{X3}.mp3?burst_ms=0",
                                        tmp_path / "x3.wav", 2)
        assert abs(peak_hz(pcm, rate) - 400) < 15  # the bystander's music (tests/emergencynode)
        assert srv.node.engine.on_air(X3)["broadcast"] == music[X3]
        # the voice was the message: the microphone off, the emergency ends (closing signal)
        await page.click("button.em-voice-stop")
        await expect(page.locator(".em-state")).to_contain_text("Đã kết thúc", timeout=15_000)
        pcm, rate = await ffmpeg_record(f"{srv.base}/streams/{X1}.mp3?burst_ms=0",
                                        tmp_path / "after.wav", 2)
        assert abs(peak_hz(pcm, rate) - 300) < 15  # X1's music is back
