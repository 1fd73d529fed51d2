"""The console's air screen (issue 11, screen 6) in Chromium against a real node on the realtime
clock: going live from the (fake) browser microphone over WHIP with the session cookie, ON AIR and
the level meter, FFmpeg hearing it on the commune's stream and the programme under it resuming
after stop; a programme started now to two ticked communes, heard in both, preempted in one by a
district priority broadcast; the classes the user may use; the API's refusals by their field."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
from playwright.async_api import Page, Route, expect

from loa.streamer.messages import say
from tests.apiclient import PASSWORD, tone_file
from tests.audio import peak_hz
from tests.emergencynode import X1, X2, Srv, live_config, serving
from tests.httpstreams import ffmpeg_record
from tests.web.browser import XSS, axe_violations, chromium, login, phone, shots
from tests.webrtcpeers import ToneTrack, offer_pc

FAKE_MIC = ("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream")


async def _heard_hz(srv: Srv, out: Path) -> float:
    pcm, rate = await ffmpeg_record(f"{srv.base}/streams/{X1}.mp3?burst_ms=0", out, 3)
    return peak_hz(pcm, rate)


async def _air_screen(page: Page, base: str, who: str) -> None:
    await login(page, f"{base}/", who)
    await page.click("nav.screens >> text=Phát ngay")
    await expect(page.locator("main h1")).to_have_text("Phát ngay")
    await expect(page.locator(".pick-tree input[type=checkbox]").first).to_be_visible()


async def test_commune_goes_live_from_the_microphone_then_the_programme_resumes(
        tmp_path: Path) -> None:
    mic = tone_file(tmp_path / "tone-700.wav", 700, 60, ("-ar", "48000"))
    async with serving(live_config(tmp_path), realtime=True) as srv, \
            chromium(*FAKE_MIC, f"--use-file-for-fake-audio-capture={mic}") as browser:
        music = await srv.approved(tone_file(tmp_path / "tone-440.wav", 440, 120),
                                "Nhạc nền xã", "bientap11")
        status, under = await srv.call("xa11", "POST", "/api/v1/broadcasts", json={
            "programme": music, "targets": [X1], "class": "background"})
        assert status == 201, under
        assert abs(await _heard_hz(srv, tmp_path / "before.wav") - 440) < 15

        page = await phone(browser, permissions=["microphone"], bypass_csp=True)
        await _air_screen(page, srv.base, "xa11")
        background = page.locator(f"li.broadcast[data-broadcast='{under['id']}']")
        await expect(background.locator(f"li[data-code={X1}]")).to_contain_text("đang được nghe")
        # a plain operator: no emergency class, and the reason is said
        await expect(page.locator("#class option")).to_have_text(["thông thường", "ưu tiên"])
        await expect(page.locator("#class-note")).to_have_text("Phát khẩn cấp cần quyền khẩn cấp")
        await page.locator(f".pick-tree input[data-code={X1}]").check()
        await page.fill("#title", "Thông báo của xã")
        assert await axe_violations(page) == [], "idle"
        await shots(page, "air-idle")

        await page.click("button.go-live")
        await expect(page.locator("#live-state")).to_have_text("ĐANG PHÁT TRỰC TIẾP")
        await page.wait_for_function("document.querySelector('meter.level').value > 0.05")
        live = page.locator("li.broadcast:has(> strong:text-is('Thông báo của xã'))")
        await expect(live.locator(f"li[data-code={X1}]")).to_contain_text("đang được nghe")
        await expect(background.locator(f"li[data-code={X1}]")).to_contain_text(
            "bị chặn bởi Thông báo của xã (thông thường, Xã 1 huyện 1)")
        assert abs(await _heard_hz(srv, tmp_path / "live.wav") - 700) < 15
        stored = await page.evaluate("JSON.stringify(Object.entries(localStorage))")
        assert "token" not in stored and "csrf" not in stored
        assert await axe_violations(page) == [], "on air"
        await shots(page, "air-on-air")

        await page.click("button.stop-live")
        await expect(page.locator("button.go-live")).to_be_visible()
        await expect(live).to_have_count(0)
        await expect(background.locator(f"li[data-code={X1}]")).to_contain_text("đang được nghe")
        assert abs(await _heard_hz(srv, tmp_path / "after.wav") - 440) < 15
        _, now = await srv.call("xa11", "GET", "/api/v1/broadcasts")
        assert [b["id"] for b in now["broadcasts"]] == [under["id"]]


async def test_programme_now_to_two_communes_heard_then_preempted_in_one(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path), realtime=True) as srv, chromium() as browser:
        tone = tone_file(tmp_path / "tone.wav", 440, 120)
        await srv.approved(tone, "Bản tin trưa", "huyen1")
        storm = await srv.approved(tone, f"Tin bão {XSS}", "huyen1")
        page = await phone(browser)
        dialogs: list[str] = []
        page.on("dialog", lambda d: dialogs.append(d.message))
        blocked: list[str] = []
        page.on("console", lambda m: blocked.append(m.text) if "Content Security" in m.text
                else None)
        await _air_screen(page, srv.base, "huyen1")
        for code in (X1, X2):
            await page.locator(f".pick-tree input[data-code={code}]").check()
        await page.select_option("#programme", label="Bản tin trưa")
        await page.select_option("#class", "normal")
        await page.click("form.air-now button[type=submit]")
        noon = page.locator("li.broadcast:has(> strong:text-is('Bản tin trưa'))")
        for code in (X1, X2):
            await expect(noon.locator(f"li[data-code={code}]")).to_contain_text("đang được nghe")
        # a loudspeaker of X1 reports playing it: proof of delivery under the broadcast
        speaker = await srv.device(X1)
        (noon_rec,) = [r for r in await srv.node.store.find("broadcast", status="on-air")
                       if r["title"] == "Bản tin trưa"]
        assert speaker.ws is not None
        await speaker.ws.send_str(json.dumps({"v": 1, "type": "playing",
                                              "broadcast": noon_rec["id"], "state": "playing"}))

        status, body = await srv.call("huyen1", "POST", "/api/v1/broadcasts", json={
            "programme": storm, "targets": [X1], "class": "priority"})
        assert status == 201, body
        await expect(noon.locator("p.played")).to_contain_text("Đã phát tới 1/1 cụm loa")
        await expect(noon.locator(f"li[data-code={X1}]")).to_have_text(
            f"Xã 1 huyện 1 bị chặn bởi Tin bão {XSS} (ưu tiên, Huyện 1)")
        await expect(noon.locator(f"li[data-code={X2}]")).to_contain_text("đang được nghe")
        assert await page.locator("main img").count() == 0 and dialogs == []
        await shots(page, "air-preempted")
        await page.click("button.lang")
        await expect(noon.locator(f"li[data-code={X1}]")).to_have_text(
            f"Xã 1 huyện 1 preempted by Tin bão {XSS} (priority, Huyện 1)")
        await page.click("button.lang")

        # stopping from the page: the programme leaves the list, the priority one stays
        await noon.get_by_role("button", name="Dừng Bản tin trưa").click()
        await expect(noon).to_have_count(0)
        await expect(page.locator("li.broadcast", has_text="Tin bão")).to_have_count(1)
        assert blocked == []


async def _force_targets(route: Route) -> None:
    """The page's request with another commune as its target, as a forged client would send."""
    if route.request.method != "POST":
        await route.continue_()
    elif "/whip/" in route.request.url:
        await route.continue_(url=route.request.url.replace(f"/whip/{X1}", f"/whip/{X2}"))
    else:
        body = json.loads(route.request.post_data or "{}")
        await route.continue_(post_data=json.dumps({**body, "targets": [X2]}))


async def test_classes_offered_and_refusals_shown_by_their_field(tmp_path: Path) -> None:
    mic = tone_file(tmp_path / "tone-700.wav", 700, 10, ("-ar", "48000"))
    async with serving(live_config(tmp_path), realtime=True) as srv, \
            chromium(*FAKE_MIC, f"--use-file-for-fake-audio-capture={mic}") as browser:
        await srv.approved(tone_file(tmp_path / "tone.wav", 440, 5), "Bản tin xã", "bientap11")
        # the emergency right adds the emergency class
        page = await phone(browser)
        await _air_screen(page, srv.base, "tinh")
        await expect(page.locator("#class option")).to_have_text(
            ["thông thường", "ưu tiên", "khẩn cấp"])
        await expect(page.locator("#class-note")).to_have_count(0)

        page = await phone(browser, permissions=["microphone"])
        await _air_screen(page, srv.base, "xa11")
        # no target: the API's 422 under the area picker
        await page.click("form.air-now button[type=submit]")
        error = page.locator("#targets-error")
        await expect(error).to_have_text("danh sách rỗng")
        await expect(page.locator("fieldset#targets")).to_have_attribute(
            "aria-describedby", "targets-error")
        await page.click("button.go-live")
        await expect(error).to_have_text("Chọn ít nhất một khu vực phát")
        await shots(page, "air-no-target")

        # another commune forced into the requests: the server's 403 under the picker
        await page.locator(f".pick-tree input[data-code={X1}]").check()
        await page.route("**/api/v1/broadcasts", _force_targets)
        await page.route("**/whip/**", _force_targets)
        await page.click("form.air-now button[type=submit]")
        await expect(error).to_contain_text(f"khu vực {X2} ngoài phạm vi của bạn")
        await page.click("button.go-live")
        await expect(error).to_contain_text(f"khu vực {X2} ngoài phạm vi của bạn")
        await expect(page.locator("button.go-live")).to_be_enabled()
        _, now = await srv.call("tinh", "GET", "/api/v1/broadcasts")
        assert now["broadcasts"] == []

        # logging out while live ends the broadcast: the microphone's peer closes
        await page.unroute("**/api/v1/broadcasts")
        await page.unroute("**/whip/**")
        await page.click("button.go-live")
        await expect(page.locator("#live-state")).to_have_text("ĐANG PHÁT TRỰC TIẾP")
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[str] = loop.create_future()
        srv.node.engine.ended_listeners.append(  # called on the engine's tick
            lambda b, cause: loop.call_soon_threadsafe(
                lambda: ended.done() or ended.set_result(cause)))
        await page.click("text=Đăng xuất")
        assert (await asyncio.wait_for(ended, 15)).startswith("whip-")
        await _air_screen(page, srv.base, "xa11")
        await expect(page.locator(".area-picker .chosen")).to_have_text("Chưa chọn khu vực nào")
        await expect(page.locator("section.mine")).to_contain_text("Không có buổi phát nào")


async def test_whip_takes_the_console_session_with_its_csrf_value(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv, \
            aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.post(f"{srv.base}/api/v1/auth/session",
                             json={"username": "xa11", "password": PASSWORD}) as r:
            assert r.status == 200
            csrf = (await r.json())["csrf"]
        pc = offer_pc("sendonly", None, ToneTrack(700))
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp

        async def post(targets: str, **headers: str) -> tuple[int, object, str, str]:
            async with http.post(f"{srv.base}/whip/{targets}", data=sdp, headers={
                    "Content-Type": "application/sdp", **headers}) as r:
                body = await r.json() if r.content_type == "application/json" else await r.text()
                return (r.status, body, r.headers.get("Location", ""),
                        r.headers.get("Loa-Broadcast", ""))

        # the cookie alone (a cross-site form would carry it) is refused
        status, body, _, _ = await post(X1)
        assert status == 403 and body == {"error": say("auth.csrf_missing")}
        # another commune: 403 naming the field, like the broadcasts API's
        status, body, _, _ = await post(X2, **{"X-CSRF-Token": csrf})
        assert status == 403 and isinstance(body, dict) and body["field"] == "targets"
        assert f"khu vực {X2} ngoài phạm vi" in body["error"]
        status, body = await srv.call("xa11", "POST", "/api/v1/broadcasts", json={
            "programme": "x", "targets": [X1, X2]})
        assert status == 403 and body["field"] == "targets", body
        assert await srv.node.store.find("broadcast") == []

        status, _, location, bid = await post(X1, **{"X-CSRF-Token": csrf, "Origin": srv.base})
        assert status == 201 and location.startswith("/whip/session/")
        rec = await srv.node.store.get("broadcast", bid)
        assert rec is not None and rec["user"] == "xa11" and rec["targets"] == [X1]
        assert rec["spec"] == {"live": "whip"}
        async with http.delete(srv.base + location) as r:
            assert r.status == 403  # ending it needs the CSRF value too
        async with http.delete(srv.base + location, headers={"X-CSRF-Token": csrf}) as r:
            assert r.status == 204
        srv.run(0.1)
        assert srv.node.engine.live_broadcast(bid) is None
        await pc.close()
