"""The Devices and Boards screens (issue 11, screens 8 and 9) against a real node, with devices
connected as real WebSocket clients: telemetry in the list, filters, a device turning offline on
the open page, commands to one device and to the filtered set with their acknowledgements, the
map, a commune's scope and the server's refusal in Vietnamese; a board's content composed,
previewed by the board page's own renderer and received by the board as it was previewed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from playwright.async_api import Page, expect

from tests.emergencynode import WAIT, DeviceWs, Srv, live_config, serving
from tests.web.browser import XSS, axe_violations, chromium, login, phone, shots

X1, X2 = "T01-H1-X1", "T01-H1-X2"
SLOW = WAIT * 1000  # ms: bound for waits on live events (never a speed check)
VN = timezone(timedelta(hours=7))


def config(tmp_path: Path) -> Any:
    cfg = live_config(tmp_path)
    cfg.devices.heartbeat = 1.0  # a silent device is offline after 2.1 s
    return cfg


async def heartbeat(d: DeviceWs, **telemetry: Any) -> None:
    assert d.ws is not None
    await d.ws.send_str(json.dumps({"v": 1, "type": "heartbeat", "state": "idle", **telemetry}))


@contextlib.asynccontextmanager
async def alive(devices: dict[str, tuple[DeviceWs, dict[str, Any]]]):
    """Heartbeats every 0.4 s for the devices still in `devices` (remove one to silence it)."""
    async def pump() -> None:
        while True:
            for d, tele in list(devices.values()):
                if d.ws is not None and not d.ws.closed:
                    await heartbeat(d, **tele)
            await asyncio.sleep(0.4)

    task = asyncio.create_task(pump())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Stream:
    """The console's event stream as `who` reads it (Server-Sent Events)."""

    def __init__(self, resp: Any) -> None:
        self.resp = resp

    async def frame(self) -> tuple[str, dict[str, Any]]:
        name, data = "", {}
        while True:
            line = (await self.resp.content.readline()).decode()
            assert line, "stream closed"
            line = line.rstrip("\n")
            if line.startswith(("event: ", "retry:")):
                name = line.partition(": ")[2] if line.startswith("event") else "retry"
            elif line.startswith("data: "):
                data = json.loads(line[6:])
            elif not line and name:
                return name, data

    async def until(self, name: str, **match: Any) -> list[tuple[str, dict[str, Any]]]:
        """Every event up to and including the first `name` whose data has `match`."""
        seen: list[tuple[str, dict[str, Any]]] = []
        async with asyncio.timeout(WAIT):
            while not seen or seen[-1][0] != name or any(
                    seen[-1][1].get(k) != v for k, v in match.items()):
                seen.append(await self.frame())
        return seen


async def stream(srv: Srv, who: str) -> Stream:
    resp = await srv.http.get(f"{srv.base}/api/v1/events",
                              headers={"Authorization": f"Bearer {await srv.login(who)}"})
    assert resp.status == 200
    s = Stream(resp)
    assert (await s.frame())[0] == "retry"
    return s


async def test_api_bulk_status_filter_ack_events_and_scope(tmp_path: Path) -> None:
    async with serving(config(tmp_path)) as srv:
        district, commune = await stream(srv, "huyen1"), await stream(srv, "xa11")
        a, b, silent = await srv.device(X1), await srv.device(X2), await srv.device(X1)
        async with alive({a.id: (a, {}), b.id: (b, {})}):
            await silent.close()
            await district.until("device", id=silent.id, status="offline")
            await _api_checks(srv, a, b, district, commune)
        for d in (a, b):
            await d.close()


async def _api_checks(srv: Srv, a: DeviceWs, b: DeviceWs, district: Stream,
                      commune: Stream) -> None:
    # A single command's outcome goes to whoever sees the device.
    acking = asyncio.create_task(a.command("volume"))
    status, one = await srv.call("huyen1", "POST", f"/api/v1/devices/{a.id}/commands",
                                 json={"command": "volume", "args": {"volume": 40}})
    assert status == 202 and one["online"], one
    await acking
    for s in (district, commune):
        seen = await s.until("command", id=one["id"])
        assert seen[-1][1] == {"id": one["id"], "device": a.id, "command": "volume",
                               "status": "acked", "error": None}
    # The bulk command takes the list's status filter: the offline device is left out.
    acks = [asyncio.create_task(d.command("stop")) for d in (a, b)]
    status, bulk = await srv.call("huyen1", "POST", "/api/v1/devices/commands",
                                  json={"area": "T01-H1", "command": "stop",
                                        "status": "online"})
    assert status == 202 and bulk["devices"] == 2 and bulk["online"] == 2, bulk
    await asyncio.gather(*acks)
    seen = await district.until("command", command_batch=bulk["command_batch"], acked=2)
    assert seen[-1][1]["devices"] == 2
    # The district's batch counts never reach a commune (it may not read the batch) ...
    status, _ = await srv.call("xa11", "GET", f"/api/v1/devices/commands/{bulk['command_batch']}")
    assert status == 404
    acking = asyncio.create_task(b.command("volume"))
    status, other = await srv.call("huyen1", "POST", f"/api/v1/devices/{b.id}/commands",
                                   json={"command": "volume", "args": {"volume": 10}})
    assert status == 202
    await acking
    status, mine = await srv.call("huyen1", "POST", f"/api/v1/devices/{a.id}/commands",
                                  json={"command": "play"})
    acking = asyncio.create_task(a.command("play"))
    await acking
    seen = await commune.until("command", id=mine["id"])
    ids = {d.get("id") for n, d in seen if n == "command"}
    batches = {d.get("command_batch") for n, d in seen if n == "command"}
    assert other["id"] not in ids and bulk["command_batch"] not in batches, seen
    # ... nor another commune's device nor area to a commune operator.
    status, body = await srv.call("xa11", "POST", f"/api/v1/devices/{b.id}/commands",
                                  json={"command": "volume", "args": {"volume": 10}})
    assert status == 404, body
    status, body = await srv.call("xa11", "POST", "/api/v1/devices/commands",
                                  json={"area": X2, "command": "stop"})
    assert status == 403 and body["error"].startswith("khu vực T01-H1-X2 ngoài phạm vi"), body
    status, body = await srv.call("huyen1", "POST", "/api/v1/devices/commands",
                                  json={"area": X1, "command": "stop", "status": "asleep"})
    assert status == 422 and body["field"] == "status", body


async def _checked(page: Page, name: str) -> None:
    await shots(page, name)
    assert await axe_violations(page) == [], name


async def test_devices_list_filters_live_offline_commands_acks_and_map(tmp_path: Path) -> None:
    async with serving(config(tmp_path)) as srv, chromium() as browser:
        tree = srv.node.tree
        for code, lat, lon in ((X1, 15.88, 108.33), (X2, 15.95, 108.40), ("T01-H1-X3", 15.80, 108.45)):
            tree.get(code).lat, tree.get(code).lon = lat, lon
        speaker, far, board = await srv.device(X1), await srv.device(X2), await srv.device(X1, "board")
        status, _ = await srv.call("qtv1", "PATCH", f"/api/v1/devices/{far.id}", json={"name": XSS})
        assert status == 200
        beats = {
            speaker.id: (speaker, {"state": "playing", "volume": 60, "firmware": "2.4.1",
                                   "network": {"type": "4g", "signal_dbm": -79},
                                   "stream": {"loss": 0.012}, "gps": [15.87, 108.31]}),
            far.id: (far, {"volume": 80, "gps": [15.96, 108.41]}),
            board.id: (board, {}),
        }
        async with alive(beats):
            page = await phone(browser, bypass_csp=True)
            dialogs: list[str] = []
            page.on("dialog", lambda d: dialogs.append(d.message))
            await login(page, f"{srv.base}/#/devices", "huyen1")
            rows = page.locator("li.device")
            await expect(rows).to_have_count(3)
            row = page.locator(f"li.device[data-id='{speaker.id}']")
            await expect(row.locator(".signal dd")).to_have_text("-79 dBm (4g)")
            await expect(row.locator(".loss dd")).to_have_text("1.2 %")
            await expect(row.locator(".firmware dd")).to_have_text("2.4.1")
            await expect(row.locator(".volume dd")).to_have_text("60")
            await expect(row.locator(".stream dd")).to_have_text("đang phát")
            await expect(page.locator(f"li.device[data-id='{far.id}'] .head a")).to_have_text(XSS)
            assert await page.locator("main img").count() == 0 and dialogs == []
            await expect(page.locator(".pager span")).to_have_text("1–3 trong 3 thiết bị")
            await _checked(page, "devices-list")

            await page.select_option("#filter-kind", "board")
            await expect(rows).to_have_count(1)
            await expect(rows.first).to_have_attribute("data-id", board.id)
            await page.select_option("#filter-kind", "")
            await page.select_option("#filter-area", X2)
            await expect(rows).to_have_count(1)
            await page.select_option("#filter-area", "T01-H1")
            await expect(rows).to_have_count(3)

            # The far device goes silent: the open page shows it offline (live event).
            del beats[far.id]
            await far.close()
            await expect(page.locator(f"li.device[data-id='{far.id}']")).to_have_attribute(
                "data-status", "offline", timeout=SLOW)
            await expect(page.locator(f"li.device[data-id='{far.id}'] .status")).to_have_text(
                "mất kết nối")
            await page.select_option("#filter-status", "offline")
            await expect(rows).to_have_count(1)
            await page.select_option("#filter-status", "online")
            await expect(rows).to_have_count(2)

            # A bulk command to the filtered set (the two online devices) and its acks.
            acks = [asyncio.create_task(d.command("volume")) for d in (speaker, board)]
            await page.fill("#bulk-volume", "50")
            await page.click("form.command button[type=submit]")
            got = await asyncio.gather(*acks)
            assert [c["args"] for c in got] == [{"volume": 50}] * 2
            await expect(page.locator("form.command .outcome")).to_have_text(
                "2/2 thiết bị đã xác nhận", timeout=SLOW)
            await _checked(page, "devices-bulk")

            # One device: its telemetry, a volume command and its acknowledgement.
            await page.click(f"li.device[data-id='{speaker.id}'] .head a")
            await expect(page.locator("main h1")).to_have_text(f"loudspeaker {X1}")
            acking = asyncio.create_task(speaker.command("volume"))
            await page.fill("#one-volume", "35")
            await page.click("form.command button[type=submit]")
            assert (await acking)["args"] == {"volume": 35}
            await expect(page.locator("form.command .outcome")).to_have_text(
                "Thiết bị đã xác nhận lệnh", timeout=SLOW)
            await expect(page.locator(".history li").first).to_contain_text(
                "Đặt âm lượng · đã xác nhận")
            await _checked(page, "devices-detail")

            # The map: areas and devices with coordinates, reachable by keyboard.
            await page.click("text=‹ Danh sách thiết bị")
            await page.select_option("#filter-status", "")
            await page.click(".views button >> nth=1")
            await expect(page.locator(".area-mark")).to_have_count(3)
            await expect(page.locator(".device-mark")).to_have_count(2)
            await expect(page.locator(f".device-mark[data-id='{far.id}']")).to_have_class(
                "device-mark offline")
            await expect(page.locator(f".area-mark[data-code='{X1}'] text")).to_have_text("Xã 1 huyện 1")
            await _checked(page, "devices-map")
            await page.focus(f".area-mark[data-code='{X2}']")
            await page.keyboard.press("Enter")
            await expect(page.locator("#filter-area")).to_have_value(X2)
            await page.click(".views button >> nth=0")
            await expect(rows).to_have_count(1)
        for d in (speaker, board):
            await d.close()


async def test_commune_sees_its_devices_and_a_forced_command_shows_the_403(tmp_path: Path) -> None:
    async with serving(config(tmp_path)) as srv, chromium() as browser:
        mine, other = await srv.device(X1), await srv.device(X2)
        async with alive({mine.id: (mine, {}), other.id: (other, {})}):
            page = await phone(browser, bypass_csp=True)
            await login(page, f"{srv.base}/#/devices", "xa11")
            await expect(page.locator("li.device")).to_have_count(1)
            await expect(page.locator("li.device").first).to_have_attribute("data-id", mine.id)
            options = await page.locator("#filter-area option").all_inner_texts()
            assert X2 not in " ".join(options) and "Xã 2 huyện 1" not in options
            # Another commune's device by its address: the server's answer, in Vietnamese.
            await page.goto(f"{srv.base}/#/devices/{other.id}")
            await expect(page.locator("main .error")).to_have_text("không có thiết bị")
            # A forced command (the request altered on its way) to the other commune: the 403.
            await page.goto(f"{srv.base}/#/devices")
            await expect(page.locator("li.device")).to_have_count(1)

            async def to_other(route: Any) -> None:
                body = json.loads(route.request.post_data or "{}")
                await route.continue_(post_data=json.dumps({**body, "area": X2}))

            await page.route("**/api/v1/devices/commands", to_other)
            await page.select_option("#bulk-command", "stop")
            await page.click("form.command button[type=submit]")
            await expect(page.locator("form.command .error")).to_have_text(
                "khu vực T01-H1-X2 ngoài phạm vi của bạn")
            await _checked(page, "devices-refused")
            # A viewer sees the commands disabled, with the reason.
            viewer = await phone(browser, bypass_csp=True)
            await login(viewer, f"{srv.base}/#/devices", "xem11")
            await expect(viewer.locator("form.command .reason")).to_have_text(
                "Bạn không có quyền phát sóng nên không gửi lệnh được")
            await expect(viewer.locator("form.command button[type=submit]")).to_be_disabled()
        for d in (mine, other):
            await d.close()


async def test_board_composed_previewed_and_received_as_previewed(tmp_path: Path) -> None:
    async with serving(config(tmp_path)) as srv, chromium() as browser:
        board = await srv.device(X1, "board")
        async with alive({board.id: (board, {})}):
            page = await phone(browser, bypass_csp=True)
            await login(page, f"{srv.base}/#/boards", "xa11")
            await page.select_option("#board-target", board.id)
            await page.check("input[name=layout][value=split]")
            await page.fill("#board-ticker", "Đường dây nóng: 0235 3812 345")
            await page.click("text=+ Chữ")
            await page.fill("#item-0-title", "Thông báo")
            await page.fill("#item-0-text", "Tiêm chủng tại trạm y tế xã")
            now = datetime.now(VN)
            start, end = now - timedelta(days=1), now + timedelta(days=1)
            await page.fill("#item-0-from", start.strftime("%Y-%m-%dT%H:%M"))
            await page.fill("#item-0-to", end.strftime("%Y-%m-%dT%H:%M"))
            tomorrow = (now + timedelta(days=1)).isoweekday()
            await page.locator(f"input[name=item-0-day][value='{tomorrow}']").uncheck()
            await page.click("text=+ Ảnh")
            url = "https://example.invalid/ban-do.png"
            await page.fill("#item-1-url", url)
            await page.select_option("#item-1-region", "side")
            await page.fill("#item-1-duration", "15")

            preview = page.frame_locator("iframe")
            await expect(preview.locator("#ticker-text")).to_have_text("Đường dây nóng: 0235 3812 345")
            await expect(preview.locator("#region-main .item.text.active h1")).to_have_text("Thông báo")
            await expect(preview.locator("#region-main .item.text.active p")).to_have_text(
                "Tiêm chủng tại trạm y tế xã")
            await expect(preview.locator("#region-side .item.image.active img")).to_have_attribute(
                "src", url)
            await _checked(page, "boards")

            receiving = asyncio.create_task(board.command("display"))
            await page.click("button[type=submit]:has-text('Gửi nội dung')")
            got = (await receiving)["args"]
            days = [d for d in range(1, 8) if d != tomorrow]
            text_from = datetime.strptime(start.strftime("%Y-%m-%dT%H:%M"), "%Y-%m-%dT%H:%M")
            text_to = datetime.strptime(end.strftime("%Y-%m-%dT%H:%M"), "%Y-%m-%dT%H:%M")
            assert got == {"layout": "split", "ticker": "Đường dây nóng: 0235 3812 345", "items": [
                {"id": "item-1", "type": "text", "title": "Thông báo",
                 "text": "Tiêm chủng tại trạm y tế xã", "region": "main",
                 "valid_from": text_from.replace(tzinfo=VN).timestamp(),
                 "valid_to": text_to.replace(tzinfo=VN).timestamp(), "weekdays": days},
                {"id": "item-2", "type": "image", "url": url, "region": "side",
                 "duration_s": 15}]}, got
            shown = json.loads(await page.frames[1].evaluate("JSON.stringify(loaBoard.state.content)"))
            assert shown["items"] == got["items"] and shown["ticker"] == got["ticker"]
            await expect(page.locator(".outcome")).to_have_text("Thiết bị đã xác nhận lệnh",
                                                               timeout=SLOW)
            status, rec = await srv.call("xa11", "GET", f"/api/v1/devices/{board.id}")
            assert status == 200 and rec["display"]["items"] == got["items"], rec
            assert time.time() - rec["display"]["updated"] < WAIT
            await _checked(page, "boards-sent")
        await board.close()
