"""The board player page (/board) in a real browser (Debian chromium via Playwright) against a
running node on 127.0.0.1, and the display content model of the device protocol."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import struct
import subprocess
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from loa.relay.devices.manager import DeviceManager, DeviceSettings
from loa.relay.devices.protocol import ProtocolError, display_state, validate_command
from tests.apiclient import Api, make_config, running_api

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--autoplay-policy=no-user-gesture-required"]
NOTICE = "Thông báo: Lịch tiêm chủng ngày 05/12 tại trạm y tế xã"
TICKER = "Tin vắn: Xã tổ chức dọn vệ sinh môi trường vào sáng Chủ Nhật, mời bà con tham gia"
ALERT = ("KHẨN CẤP: Bão số 9 sắp đổ bộ. Người dân vùng trũng thấp di chuyển ngay đến nơi trú "
         "ẩn an toàn theo hướng dẫn của chính quyền xã")
TZ = "Asia/Ho_Chi_Minh"
VN = dt.timezone(dt.timedelta(hours=7))


# ---- fixtures --------------------------------------------------------------------------------------
def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A solid-colour PNG, made by hand (no imaging library needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    row = b"\x00" + bytes(rgb) * width
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * height))
            + chunk(b"IEND", b""))


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    """A node serving HTTP on 127.0.0.1 (a real TCP port) with the sample users logged in.
    Heartbeats every 2 s, so the board's reports arrive while the test looks."""
    cfg = make_config(tmp_path)
    cfg.devices = DeviceSettings(heartbeat=2.0)
    async with running_api(cfg) as a:
        yield a


@pytest.fixture
async def files(tmp_path: Path) -> AsyncIterator[str]:
    """A tiny local file server (its base URL): /map.png is 64 x 32 green, /clip.mp4 is a
    2-second 320 x 240 H.264 test pattern."""
    clip = tmp_path / "clip.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc=size=320x240:rate=25", "-t", "2", "-pix_fmt", "yuv420p",
                    "-c:v", "libx264", "-movflags", "+faststart", str(clip)], check=True)
    app = web.Application()
    image = png(64, 32, (0, 160, 60))

    async def serve_png(_: web.Request) -> web.Response:
        return web.Response(body=image, content_type="image/png")

    async def serve_clip(_: web.Request) -> web.FileResponse:
        return web.FileResponse(clip)

    app.router.add_get("/map.png", serve_png)
    app.router.add_get("/clip.mp4", serve_clip)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


async def new_page(browser: Browser) -> tuple[BrowserContext, Page]:
    ctx = await browser.new_context(viewport={"width": 1280, "height": 720}, timezone_id=TZ,
                                    locale="vi-VN")
    page = await ctx.new_page()
    page.on("console", lambda m: print(f"[browser {m.type}] {m.text}"))
    page.on("pageerror", lambda e: print(f"[browser error] {e}"))
    return ctx, page


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def register(api: Api, kind: str = "board", area: str = "T01-H1-X1",
                   name: str = "Bảng tin chợ xã") -> tuple[str, str]:
    """A provisioned device: (id, key)."""
    status, dev = await api.call("qtv1", "POST", "/api/v1/devices",
                                 json={"name": name, "kind": kind, "area": area})
    assert status == 201, dev
    status, prov = await api.call(None, "POST", "/api/v1/devices/provision",
                                  json={"device": dev["id"], "token": dev["provisioning_token"]})
    assert status == 201, prov
    return dev["id"], prov["key"]


def manager(api: Api) -> DeviceManager:
    return api.node.devices


async def connected(api: Api, device: str) -> None:
    async def ready() -> bool:
        dev = manager(api).get(device)
        return dev is not None and dev.link is not None and dev.ready
    await eventually(ready)


async def command_status(api: Api, device: str) -> list[tuple[str, str]]:
    """(command, status) of the device's commands, oldest first."""
    status, body = await api.call("tinh", "GET", f"/api/v1/devices/{device}/commands")
    assert status == 200, body
    return [(c["command"], c["status"]) for c in reversed(body["commands"])]


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, VN).isoformat(timespec="seconds")


# ---- the page in a browser ---------------------------------------------------------------------------
async def test_board_shows_content_emergency_and_refuses_a_wrong_key(
        api: Api, files: str, browser: Browser) -> None:
    board, key = await register(api)
    speaker, _ = await register(api, kind="loudspeaker", name="Cụm loa chợ")
    base = str(api.client.make_url("/board"))
    ctx, page = await new_page(browser)

    await page.goto(f"{base}?device={board}&key={key}")
    await connected(api, board)
    assert "key=" not in page.url  # the key left the address bar at once
    assert f"device={board}" in page.url
    rec = manager(api).get(board)
    assert rec is not None and rec.record["capabilities"]["display"] == {"width": 1280,
                                                                         "height": 720}

    # Content for every board of the district, through the bulk command API.
    now = time.time()
    args = {"layout": "split", "ticker": TICKER, "items": [
        {"id": "tiem-chung", "type": "text", "title": "Trạm y tế xã", "text": NOTICE},
        {"id": "ban-do", "type": "image", "url": f"{files}/map.png", "region": "side"},
        {"id": "het-han", "type": "text", "text": "Tin đã hết hạn", "valid_to": iso(now - 60)},
        {"id": "chua-den", "type": "text", "text": "Tin chưa đến giờ",
         "valid_from": now + 3600}]}
    status, body = await api.call("huyen1", "POST", "/api/v1/devices/commands",
                                  json={"area": "T01-H1", "command": "display", "args": args})
    assert status == 202, body
    assert (body["devices"], body["online"]) == (1, 1)  # the board only, not the loudspeaker

    main = page.locator("#region-main .item.active")
    await expect(main).to_contain_text(NOTICE)
    await expect(main).to_contain_text("Trạm y tế xã")
    await expect(page.locator("#board")).to_have_attribute("data-layout", "split")
    await expect(page.locator("#ticker")).to_be_visible()
    await expect(page.locator("#ticker-text")).to_have_text(TICKER)
    img = page.locator("#region-side .item.active img")
    await expect(img).to_be_visible()
    await page.wait_for_function(
        "() => document.querySelector('#region-side .item.active img').naturalWidth === 64")
    # Not valid now: neither expired nor future items are anywhere in the page.
    text = await page.locator("body").inner_text()
    assert "Tin đã hết hạn" not in text and "Tin chưa đến giờ" not in text
    assert await page.locator("[data-id=het-han], [data-id=chua-den]").count() == 0
    assert await page.locator("#emergency").is_hidden()
    await eventually(lambda: _acked(api, board, "display"))
    # The board reports what it shows in its heartbeats.
    await eventually(lambda: _reports(api, board, ["tiem-chung", "ban-do"]))
    tele = _telemetry(api, board)
    assert tele["display"]["emergency"] is False and tele["state"] == "idle"
    assert tele["faults"] == [] and tele["firmware"].startswith("loa-board-page/")
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "board.png"))

    # Emergency: the text covers the screen within a second of the command.
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    status, body = await api.call("tinh", "POST", "/api/v1/devices/commands",
                                  json={"area": "T01-H1-X1", "command": "emergency",
                                        "args": {"on": True, "text": ALERT}})
    await page.wait_for_selector("#emergency", state="visible")
    elapsed = loop.time() - t0
    print(json.dumps({"board_emergency_overlay_s": round(elapsed, 3)}))
    assert status == 202 and body["devices"] == 2, body  # board and loudspeaker
    assert elapsed < 3.0
    await expect(page.locator("#emergency-text")).to_have_text(ALERT)
    await expect(page.locator("#emergency-label")).to_have_text("KHẨN CẤP / EMERGENCY")
    box = await page.locator("#emergency").bounding_box()
    assert box is not None and (box["width"], box["height"]) == (1280, 720)
    await page.screenshot(path=str(ARTIFACTS / "board-emergency.png"))

    # A reload: content and emergency come back from the server's welcome (no local copy).
    await page.evaluate("localStorage.removeItem('loa.board.content')")
    await page.reload()
    await page.wait_for_selector("#emergency", state="visible")
    await expect(page.locator("#emergency-text")).to_have_text(ALERT)
    await expect(page.locator("#region-main .item.active")).to_contain_text(NOTICE)
    status, view = await api.call("tinh", "GET", f"/api/v1/devices/{board}")
    assert view["emergency"]["on"] is True and view["emergency"]["text"] == ALERT
    assert [it["id"] for it in view["display"]["items"]] == ["tiem-chung", "ban-do", "het-han",
                                                              "chua-den"]
    assert view["display"]["items"][2]["valid_to"] == pytest.approx(now - 60, abs=1)

    # Emergency off: the overlay leaves, the content is back.
    t0 = loop.time()
    status, _ = await api.call("tinh", "POST", "/api/v1/devices/commands",
                               json={"area": "T01-H1-X1", "command": "emergency",
                                     "args": {"on": False}})
    assert status == 202
    await page.wait_for_selector("#emergency", state="hidden")
    print(json.dumps({"board_emergency_off_s": round(loop.time() - t0, 3)}))
    await expect(page.locator("#region-main .item.active")).to_contain_text(NOTICE)
    status, view = await api.call("tinh", "GET", f"/api/v1/devices/{board}")
    assert view.get("emergency") is None
    # The loudspeaker was offline: the "on" it never received is superseded by the "off".
    assert await command_status(api, speaker) == [("emergency", "expired"),
                                                  ("emergency", "queued")]

    # A wrong key: a clear bilingual message (close code 4001), no reconnect attempts.
    ctx2, other = await new_page(browser)
    await other.goto(f"{base}?device={board}&key=not-the-key")
    gate = other.locator("#gate-message")
    await expect(gate).to_be_visible()
    await expect(gate).to_contain_text("Sai mã thiết bị hoặc khóa")
    await expect(gate).to_contain_text("wrong key")
    await expect(gate).to_contain_text("4001")
    await expect(other.locator("#login")).to_be_visible()
    await other.screenshot(path=str(ARTIFACTS / "board-wrong-key.png"))
    assert await other.evaluate("localStorage.getItem('loa.board.key')") is None
    # The good page is still connected (the wrong key changed nothing).
    dev = manager(api).get(board)
    assert dev is not None and dev.link is not None
    await ctx2.close()
    await ctx.close()


async def _acked(api: Api, device: str, command: str) -> bool:
    return (command, "acked") in await command_status(api, device)


def _telemetry(api: Api, device: str) -> dict[str, Any]:
    dev = manager(api).get(device)
    return (dev.telemetry if dev is not None else None) or {}


async def _state(api: Api, device: str, state: str, faults: list[str]) -> bool:
    tele = _telemetry(api, device)
    return tele.get("state") == state and tele.get("faults") == faults


def _gone() -> Any:
    raise AssertionError("the device disappeared")


async def _reports(api: Api, device: str, items: list[str]) -> bool:
    return bool(_telemetry(api, device).get("display", {}).get("items") == items)


async def test_board_login_form_rotation_video_and_clear(api: Api, files: str,
                                                        browser: Browser) -> None:
    board, key = await register(api)
    ctx, page = await new_page(browser)
    await page.goto(str(api.client.make_url("/board")))
    await expect(page.locator("#gate-message")).to_contain_text("Nhập mã thiết bị")
    await page.fill("#login-device", board)
    await page.fill("#login-key", key)
    await page.click("#login button")
    await connected(api, board)
    await expect(page.locator("#gate")).to_be_hidden()
    await expect(page.locator("#idle")).to_be_visible()  # nothing to show yet: the clock

    # Two items in one region rotate every duration_s; a scrolling text is a CSS animation.
    status, _ = await api.call("xa11", "POST", f"/api/v1/devices/{board}/commands", json={
        "command": "display", "args": {"items": [
            {"id": "a", "type": "text", "text": "Mục thứ nhất", "duration_s": 1},
            {"id": "b", "type": "text", "text": "Mục thứ hai chạy chữ", "scroll": True,
             "duration_s": 1}]}})
    assert status == 202
    active = page.locator("#region-main .item.active")
    await expect(active).to_have_attribute("data-id", "a")
    await expect(active).to_have_attribute("data-id", "b")
    await expect(active).to_have_attribute("data-id", "a")
    await expect(page.locator("#board")).to_have_attribute("data-layout", "full")
    anim = await page.evaluate(
        "getComputedStyle(document.querySelector('[data-id=b] .marquee > span')).animationName")
    assert anim == "marquee"

    # The board remembers its id and key: a reload reconnects without the form.
    first = manager(api).get(board)
    assert first is not None and first.link is not None
    old_link = first.link
    await page.reload()
    await eventually(lambda: _relinked(api, board, old_link))
    await expect(page.locator("#gate")).to_be_hidden()
    await expect(active).to_contain_text("Mục thứ")

    # Validity is re-evaluated every second: an item appears at its valid_from and leaves at its
    # valid_to with no command in between.
    start = time.time()
    status, _ = await api.call("xa11", "POST", f"/api/v1/devices/{board}/commands", json={
        "command": "display", "args": {"items": [
            {"id": "sap-toi", "type": "text", "text": "Tin đến giờ mới hiện",
             "valid_from": start + 1.5, "valid_to": start + 3.5}]}})
    assert status == 202
    await expect(page.locator("#idle")).to_be_visible()
    await expect(active).to_have_text("Tin đến giờ mới hiện")
    assert time.time() >= start + 1.5
    await expect(page.locator("#idle")).to_be_visible()
    assert time.time() >= start + 3.5
    assert await page.locator("[data-id=sap-toi]").count() == 0

    # A video (MP4, which every Chromium plays) and an image that does not load: the board
    # plays the one and reports a display fault for the other.
    status, _ = await api.call("xa11", "POST", f"/api/v1/devices/{board}/commands", json={
        "command": "display", "args": {"layout": "split", "items": [
            {"id": "clip", "type": "video", "url": f"{files}/clip.mp4"},
            {"id": "mat", "type": "image", "url": "/khong-co-anh.png", "region": "side"}]}})
    assert status == 202
    await page.wait_for_function(
        "() => { const v = document.querySelector('#region-main .item.active video');"
        " return v && !v.paused && v.currentTime > 0 && v.videoWidth === 320; }")
    await eventually(lambda: _state(api, board, "playing", ["display_fault"]))
    assert (manager(api).get(board) or _gone()).status == "fault"

    # The single-item form with clear: nothing left, the idle clock again.
    status, _ = await api.call("xa11", "POST", f"/api/v1/devices/{board}/commands",
                               json={"command": "display", "args": {"clear": True}})
    assert status == 202
    await expect(page.locator("#idle")).to_be_visible()
    await expect(page.locator("#board")).to_be_hidden()
    status, view = await api.call("xa11", "GET", f"/api/v1/devices/{board}")
    assert "display" not in view
    await eventually(lambda: _state(api, board, "idle", []))
    assert (manager(api).get(board) or _gone()).status == "online"
    await ctx.close()


async def _relinked(api: Api, device: str, old: object) -> bool:
    dev = manager(api).get(device)
    return dev is not None and dev.link is not None and dev.link is not old and dev.ready


async def test_board_schedule_rules_in_the_browser(api: Api, browser: Browser) -> None:
    """The page's validity rules at fixed instants (time zone of the context: Asia/Ho_Chi_Minh)."""
    ctx, page = await new_page(browser)
    await page.goto(str(api.client.make_url("/board")))
    friday_8 = dt.datetime(2025, 12, 5, 8, 0, tzinfo=VN).timestamp()  # a Friday, 08:00

    async def valid(item: dict[str, Any], t: float = friday_8) -> bool:
        return bool(await page.evaluate("([i, t]) => window.loaBoard.isValid(i, t)", [item, t]))

    assert await valid({})
    assert await valid({"weekdays": [5]}) and not await valid({"weekdays": [1, 2, 3, 4, 6, 7]})
    assert await valid({"times": [["07:00", "11:00"]]})
    assert not await valid({"times": [["11:00", "13:00"], ["13:30", "17:00"]]})
    assert await valid({"times": [["22:00", "09:00"]]})  # over midnight
    assert not await valid({"times": [["22:00", "02:00"]]})
    assert not await valid({"times": [["07:00", "08:00"]]})  # the end is exclusive
    assert await valid({"times": [["08:00", "08:01"]]})
    assert await valid({"times": [["20:00", "24:00"]]}, friday_8 + 15.9 * 3600)
    assert await valid({"valid_from": "2025-12-05T07:59:00+07:00"})
    assert not await valid({"valid_to": "2025-12-05T08:00:00+07:00"})
    assert await valid({"valid_to": friday_8 + 1, "valid_from": friday_8})
    assert not await valid({"valid_from": friday_8 + 1})
    assert not await valid({"valid_from": "không phải ngày"})  # malformed: hidden
    assert not await valid({"weekdays": [5], "times": [["09:00", "10:00"]]})
    # The single-item form, as the server normalises it (relay/devices/protocol.py display_state).
    legacy = {"text": "Bão số 3", "image": "https://example.invalid/a.png", "layout": "split",
              "duration_s": 60}
    got = await page.evaluate("([a, t]) => window.loaBoard.normalize(a, t)", [legacy, 1000])
    want = display_state(validate_command("display", legacy), 1000)
    assert want is not None
    del want["updated"]
    assert got == want
    await ctx.close()


# ---- the content model on the server ---------------------------------------------------------------
async def test_display_content_is_validated(api: Api) -> None:
    board, _ = await register(api)

    async def refused(args: dict[str, Any]) -> str:
        status, err = await api.call("xa11", "POST", f"/api/v1/devices/{board}/commands",
                                     json={"command": "display", "args": args})
        assert status == 422, (args, err)
        assert " / " in err["error"]  # Vietnamese, then English
        return str(err["field"])

    text = {"type": "text", "text": "Thông báo"}
    assert await refused({"items": [{"type": "audio", "url": "http://x/a.mp3"}]}) \
        == "args.items[0].type"
    assert await refused({"items": [{"type": "text"}]}) == "args.items[0].text"
    assert await refused({"items": [{"type": "image", "url": "javascript:alert(1)"}]}) \
        == "args.items[0].url"
    assert await refused({"items": [{"type": "image", "url": "//elsewhere/x.png"}]}) \
        == "args.items[0].url"
    assert await refused({"items": [{**text, "times": [["7:00", "11:00"]]}]}) \
        == "args.items[0].times"
    assert await refused({"items": [{**text, "times": [["07:00", "07:00"]]}]}) \
        == "args.items[0].times"
    assert await refused({"items": [{**text, "weekdays": [0]}]}) == "args.items[0].weekdays"
    assert await refused({"items": [{**text, "valid_to": "tuần sau"}]}) \
        == "args.items[0].valid_to"
    assert await refused({"items": [{**text, "valid_from": 200, "valid_to": 100}]}) \
        == "args.items[0].valid_to"
    assert await refused({"items": [{**text, "id": "x"}, {**text, "id": "x"}]}) \
        == "args.items[1].id"
    assert await refused({"items": [{**text, "colour": "red"}]}) == "args.items[0]"
    assert await refused({"items": [text], "text": "both forms"}) == "args.items"
    assert await refused({"items": [text] * 51}) == "args.items"
    assert await refused({"items": [{"type": "text", "text": "x" * 2000, "id": f"i{i}"}
                                    for i in range(40)]}) == "args"  # over 60 KiB
    assert await refused({"layout": "split"}) == "args"
    # Nothing changed on the device.
    status, view = await api.call("xa11", "GET", f"/api/v1/devices/{board}")
    assert "display" not in view

    # Normalised: ISO times to epoch seconds (no offset: the node's local time), ids filled in.
    args = validate_command("display", {"items": [
        {**text, "valid_from": "2025-12-05T07:00:00+07:00", "valid_to": "2025-12-06",
         "weekdays": [5, 1, 5], "times": [["22:00", "24:00"]]},
        {"type": "video", "url": "/files/clip.mp4", "region": "side"}], "ticker": "Tin vắn"})
    first, second = args["items"]
    assert first["valid_from"] == dt.datetime(2025, 12, 5, tzinfo=dt.UTC).timestamp()
    assert first["valid_to"] == dt.datetime(2025, 12, 6).timestamp()
    assert first["weekdays"] == [1, 5] and first["id"] == "item-1" and second["id"] == "item-2"
    with pytest.raises(ProtocolError):
        validate_command("display", {"items": [{**text, "url": "http://x/y.png"}]})


async def test_welcome_carries_the_display_and_emergency_state(api: Api) -> None:
    """A board that was offline gets its content and emergency in `welcome`; commands it missed
    that a newer one of the same kind replaced are expired, not delivered."""
    board, key = await register(api)
    calls = [("display", {"text": "Tin cũ"}), ("emergency", {"on": True, "text": "Lũ quét"}),
             ("display", {"items": [{"id": "moi", "type": "text", "text": "Tin mới"}],
                          "layout": "full"}),
             ("emergency", {"on": False}),
             ("emergency", {"on": True, "text": "Sạt lở đất", "volume": 100})]
    for command, args in calls:
        status, body = await api.call("tinh", "POST", f"/api/v1/devices/{board}/commands",
                                      json={"command": command, "args": args})
        assert status == 202 and body["online"] is False, body
    assert await command_status(api, board) == [
        ("display", "expired"), ("emergency", "expired"), ("display", "queued"),
        ("emergency", "expired"), ("emergency", "queued")]

    url = str(api.client.make_url("/api/v1/devices/connect"))
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        await ws.send_json({"v": 1, "type": "hello", "device": board, "key": key})
        welcome = await ws.receive_json(timeout=5)
        cfg = welcome["config"]
        assert cfg["display"]["items"] == [{"id": "moi", "type": "text", "text": "Tin mới"}]
        assert cfg["display"]["layout"] == "full" and cfg["display"]["ticker"] is None
        assert cfg["emergency"]["text"] == "Sạt lở đất" and cfg["emergency"]["volume"] == 100
        got = []
        for _ in range(2):
            msg = await ws.receive_json(timeout=5)
            got.append((msg["command"], msg["args"]))
            await ws.send_json({"v": 1, "type": "ack", "id": msg["id"], "ok": True})
        assert got == [calls[2], calls[4]]
        # A heartbeat with the board's display report is kept as telemetry.
        await ws.send_json({"v": 1, "type": "heartbeat", "state": "idle",
                            "display": {"width": 1920, "height": 1080, "items": ["moi"],
                                        "emergency": True}})

        async def reported() -> bool:
            dev = manager(api).get(board)
            return bool(dev and dev.telemetry and "display" in dev.telemetry)
        await eventually(reported)
        dev = manager(api).get(board)
        assert dev is not None and dev.telemetry is not None
        assert dev.telemetry["display"] == {"width": 1920, "height": 1080, "items": ["moi"],
                                            "emergency": True}
        # A bad display report is a protocol error, answered in both languages.
        await ws.send_json({"v": 1, "type": "heartbeat", "state": "idle",
                            "display": {"width": 0}})
        err = await ws.receive_json(timeout=5)
        assert err["type"] == "error" and "display.width" in err["error"]
    assert await command_status(api, board) == [
        ("display", "expired"), ("emergency", "expired"), ("display", "acked"),
        ("emergency", "expired"), ("emergency", "acked")]


async def test_board_page_is_static_and_safe(api: Api) -> None:
    """The page and its assets: UTF-8, no referrer (the key is in the URL), a strict CSP,
    revalidated caching, nothing outside the three files."""
    r = await api.client.get("/board?device=x&key=secret")
    assert r.status == 200
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    assert r.headers["Referrer-Policy"] == "no-referrer"
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    html = await r.text()
    assert "Bảng tin điện tử" in html and "secret" not in html
    for path, ctype in (("/board/board.js", "text/javascript"), ("/board/board.css", "text/css")):
        r = await api.client.get(path)
        assert r.status == 200 and r.headers["Content-Type"] == f"{ctype}; charset=utf-8"
        assert r.headers["Cache-Control"] == "no-cache"
        etag = r.headers["ETag"]
        r = await api.client.get(path, headers={"If-None-Match": etag})
        assert r.status == 304
    r = await api.client.get("/board/../app.py")
    assert r.status == 404


async def test_board_reports_proof_of_play_kept_per_item_and_day(api: Api,
                                                                 browser: Browser) -> None:
    board, key = await register(api)
    ctx, page = await new_page(browser)
    await page.goto(str(api.client.make_url(f"/board?device={board}&key={key}")))
    await connected(api, board)
    status, _ = await api.call("xa11", "POST", f"/api/v1/devices/{board}/commands", json={
        "command": "display", "args": {"items": [
            {"id": "tiem-chung", "type": "text", "text": NOTICE, "duration_s": 1},
            {"id": "ve-sinh", "type": "text", "text": TICKER, "duration_s": 1}]}})
    assert status == 202
    active = page.locator("#region-main .item.active")
    for item in ("tiem-chung", "ve-sinh", "tiem-chung", "ve-sinh"):
        await expect(active).to_have_attribute("data-id", item)

    async def report() -> dict[str, Any]:
        status, body = await api.call("xa11", "GET", "/api/v1/reports/shown")
        assert status == 200, body
        return {r["item"]: r for r in body["items"]}

    async def both_twice() -> bool:
        got = await report()
        return all(got.get(i, {}).get("shows", 0) >= 2 for i in ("tiem-chung", "ve-sinh"))

    await eventually(both_twice, timeout=15.0)
    got = await report()
    today = dt.datetime.now(VN).date().isoformat()
    for r in got.values():
        assert r["device"] == board and r["name"] == "Bảng tin chợ xã" and r["day"] == today
        assert r["area"] == "T01-H1-X1" and r["region"] == "main"
        assert r["last"] > r["first"] and 0.5 < r["seconds"] <= r["last"] - r["first"] + 0.01
    # the CSV holds the same rows; another commune may not read this one's boards
    status, text = await api.call("xa11", "GET", "/api/v1/reports/shown?format=csv")
    assert status == 200 and text.splitlines()[0].startswith("device,name,area")
    assert sum(1 for line in text.splitlines() if f"{board}," in line) == 2
    status, other = await api.call("xa12", "GET", "/api/v1/reports/shown")
    assert status == 200 and other["items"] == []
    status, _ = await api.call("xa12", "GET", "/api/v1/reports/shown?area=T01-H1-X1")
    assert status == 403
    status, bad = await api.call("xa11", "GET", "/api/v1/reports/shown?from=05/12/2026")
    assert status == 422 and bad["field"] == "from"
    await ctx.close()
