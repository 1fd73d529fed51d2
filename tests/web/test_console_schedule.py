"""The console's schedule calendar (issue 11, screen 5) against a real node in Debian's Chromium:
a commune operator schedules an approved programme on a phone and FFmpeg hears it air, conflicts
shown before anything is stored, a district's schedule read-only in the commune's calendar (its
forced delete refused in Vietnamese), a daily range in the week view; and the API behind it
(dry run, calendar, turning off, the 403s across areas)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from playwright.async_api import Page, expect

from loa.streamer.messages import say
from tests.apiclient import tone_file
from tests.audio import peak_hz
from tests.emergencynode import Srv, live_config, serving
from tests.httpstreams import ffmpeg_record
from tests.web.browser import XSS, axe_violations, chromium, login, phone, shots

ZONE = ZoneInfo("Asia/Ho_Chi_Minh")
X1, X2, H1 = "T01-H1-X1", "T01-H1-X2", "T01-H1"


def vi(key: str, **params: Any) -> str:
    """The Vietnamese half of an API text, as the console shows it."""
    return say(key, **params).split(" / ")[0]


async def approved(srv: Srv, tmp_path: Path, title: str, who: str = "xa11", hz: float = 660,
                   seconds: float = 30) -> str:
    """A tone programme of `who`'s area, approved by the district's approver: its id."""
    return await srv.approved(tone_file(tmp_path / f"tone-{hz}.wav", hz, seconds), title, who)


async def scheduled(srv: Srv, who: str, **body: Any) -> dict[str, Any]:
    status, rec = await srv.call(who, "POST", "/api/v1/schedules", json=body)
    assert status == 201, rec
    return dict(rec)


async def open_schedule(page: Page, area_name: str) -> None:
    await page.click("nav.screens >> text=Lịch phát")
    await expect(page.locator("main h1")).to_have_text(f"Lịch phát: {area_name}")


def today() -> dt.date:
    return dt.datetime.now(ZONE).date()


async def test_a_commune_schedules_once_on_a_phone_and_ffmpeg_hears_it_air(
        tmp_path: Path) -> None:
    async with serving(live_config(tmp_path), realtime=True) as srv, chromium() as browser:
        pid = await approved(srv, tmp_path, "Bản tin trưa", hz=660)
        page = await phone(browser)
        await login(page, f"{srv.base}/", "xa11")
        await open_schedule(page, "Xã 1 huyện 1")
        form = page.locator("form.schedule-form")
        await form.locator("#programme").select_option(pid)
        await expect(page.locator("#kind-once")).to_be_checked()
        await expect(page.locator(".area-picker .chosen li span")).to_have_text(["Xã 1 huyện 1"])
        # a few seconds ahead, to the second (the scheduler submits 5 s ahead)
        at = dt.datetime.now(ZONE) + dt.timedelta(seconds=10)
        await page.fill("#time", at.strftime("%H:%M:%S"))
        await form.locator("button[type=submit]").first.click()
        await expect(form.locator(".ok")).to_have_text("Đã lưu lịch")
        (rec,) = await srv.node.store.find("schedule")
        assert (rec["kind"], rec["date"], rec["time"], rec["targets"], rec["programme"]) == (
            "once", at.date().isoformat(), at.strftime("%H:%M:%S"), [X1], pid)
        airing = page.locator(f".calendar li.airing[data-schedule='{rec['id']}']")
        await expect(airing.locator("time")).to_have_text(at.strftime("%H:%M"))
        await expect(airing.locator(".title")).to_have_text("Bản tin trưa")

        await page.click("nav.screens >> text=Tổng quan")
        on_air = page.locator(".root-row .on-air")
        await expect(on_air.locator("strong")).to_have_text("Bản tin trưa", timeout=30_000)
        samples, rate = await ffmpeg_record(f"{srv.base}/streams/{X1}.mp3?burst_ms=0",
                                            tmp_path / "heard.wav", 2.0)
        assert len(samples) > rate, len(samples)
        assert abs(peak_hz(samples[rate // 2:], rate) - 660) < 15


async def test_conflicts_are_shown_before_saving_and_422s_under_their_field(
        tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv, chromium() as browser:
        pid = await approved(srv, tmp_path, XSS)
        await scheduled(srv, "xa11", programme=pid, targets=[X1], kind="daily", time="08:00")
        page = await phone(browser, bypass_csp=True)
        dialogs: list[str] = []
        page.on("dialog", lambda d: dialogs.append(d.message))
        await login(page, f"{srv.base}/", "xa11")
        await open_schedule(page, "Xã 1 huyện 1")
        form = page.locator("form.schedule-form")
        save = form.locator("button[type=submit]").first

        # an empty target list: the API's 422 under the area picker
        await page.click("button[aria-label='Bỏ chọn Xã 1 huyện 1']")
        await page.check("#kind-daily")
        await page.fill("#time", "08:00:10")
        await save.click()
        await expect(page.locator("#targets-error")).to_have_text(vi("field.empty_list",
                                                                     name="targets"))
        await page.locator(".pick-tree input[data-code='T01-H1-X1']").check()
        # a time that is none: under "time" (typed as text: no 12-hour picker of the locale)
        await page.fill("#time", "25:61")
        await save.click()
        await expect(page.locator("#time-error")).to_have_text(vi("schedule.time", value="25:61"))
        await expect(page.locator("#targets-error")).to_have_count(0)
        await page.fill("#time", "08:00:10")
        # a range that ends before it begins: under "until"
        await page.fill("#from", "10/06/2026")
        await page.fill("#until", "01/06/2026")
        await save.click()
        await expect(page.locator("#until-error")).to_have_text(vi("schedule.until_before_from"))
        await expect(page.locator("#until")).to_have_attribute("aria-invalid", "true")
        await expect(page.locator("#time-error")).to_have_count(0)
        await shots(page, "schedule-error")
        await page.fill("#from", "")
        await page.fill("#until", "")

        # overlapping the 08:00 bulletin: the conflict is shown, nothing is stored
        await save.click()
        conflicts = form.locator("section.conflicts")
        await expect(conflicts.locator("h3")).to_have_text("Trùng lịch (1)")
        await expect(conflicts.locator("li")).to_contain_text(f"Trùng với «{XSS}» của Xã 1 huyện 1")
        assert await srv.node.store.count("schedule") == 1
        assert await page.locator("main img").count() == 0 and dialogs == []
        assert await axe_violations(page) == [], "conflict"
        await shots(page, "schedule-conflict")
        await conflicts.locator("button.cancel").click()
        await expect(conflicts).to_have_count(0)
        assert await srv.node.store.count("schedule") == 1
        # asked again, then confirmed: stored
        await save.click()
        await conflicts.locator("button.save-anyway").click()
        await expect(form.locator(".ok")).to_have_text("Đã lưu lịch")
        assert await srv.node.store.count("schedule") == 2
        await expect(page.locator(".calendar li.airing")).to_have_count(2)


async def test_a_district_schedule_is_read_only_for_the_commune_and_its_delete_refused(
        tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv, chromium() as browser:
        district = await approved(srv, tmp_path, "Bản tin huyện", who="huyen1", hz=500)
        own = await approved(srv, tmp_path, "Bản tin xã", hz=700)
        theirs = await scheduled(srv, "huyen1", programme=district, targets=[H1], kind="daily",
                                 time="06:00")
        mine = await scheduled(srv, "xa11", programme=own, targets=[X1], kind="daily",
                               time="17:00")
        page = await phone(browser, bypass_csp=True)
        await login(page, f"{srv.base}/", "xa11")
        await open_schedule(page, "Xã 1 huyện 1")
        above = page.locator(f"li.airing[data-schedule='{theirs['id']}']")
        await expect(above.locator(".title")).to_have_text("Bản tin huyện")
        await expect(above.locator(".readonly")).to_have_text("Chỉ xem: lịch của cấp trên (Huyện 1)")
        await expect(above.locator("button")).to_have_count(0)
        ours = page.locator(f"li.airing[data-schedule='{mine['id']}']")
        await expect(ours.locator("button.delete")).to_be_visible()
        await expect(page.locator(".calendar li.airing time")).to_have_text(["06:00", "17:00"])
        assert await axe_violations(page) == [], "day"

        # forced through the console's own API call: the server's 403, in Vietnamese
        status, text = await page.evaluate("""async (id) => {
            const { api } = await import("/console/static/api.js");
            const { half } = await import("/console/static/i18n.js");
            try { await api("DELETE", `/api/v1/schedules/${id}`); return [204, ""]; }
            catch (e) { return [e.status, half(e.message)]; }
        }""", theirs["id"])
        assert (status, text) == (403, vi("schedule.above", area="Huyện 1"))
        assert await srv.node.store.get("schedule", theirs["id"]) is not None
        # live: what the district schedules for the commune appears without a reload
        later = await scheduled(srv, "huyen1", programme=district, targets=[X1], kind="daily",
                                time="12:00")
        await expect(page.locator(f"li.airing[data-schedule='{later['id']}'] .readonly")
                     ).to_have_text("Chỉ xem: lịch của cấp trên (Huyện 1)")

        # its own: turned off (kept, shown off), on again, then deleted after a second click
        await ours.locator("button.toggle").click()
        await expect(ours).to_have_class("airing class-normal off")
        await expect(ours.locator(".state")).to_have_text("đã tắt")
        assert (await srv.node.store.get("schedule", mine["id"]))["enabled"] is False
        await ours.locator("button.toggle").click()
        await expect(ours.locator(".state")).to_have_count(0)
        await ours.locator("button.delete").click()
        await ours.locator("button.confirm-delete").click()
        await expect(ours).to_have_count(0)
        assert await srv.node.store.get("schedule", mine["id"]) is None

        # the district picks its commune: there its own schedule is its to change
        page = await phone(browser)
        await login(page, f"{srv.base}/", "huyen1")
        await open_schedule(page, "Huyện 1")
        await page.locator("#sched-area").select_option(X1)
        await expect(page.locator("main h1")).to_have_text("Lịch phát: Xã 1 huyện 1")
        await expect(page.locator(f"li.airing[data-schedule='{theirs['id']}'] button.delete")
                     ).to_be_visible()

        # a viewer sees the calendar, no form, the reason for both
        page = await phone(browser)
        await login(page, f"{srv.base}/", "xem11")
        await open_schedule(page, "Xã 1 huyện 1")
        above = page.locator(f"li.airing[data-schedule='{theirs['id']}']")
        await expect(above.locator(".readonly")).to_have_text("Chỉ xem: bạn không có quyền phát sóng")
        await expect(page.locator("form.schedule-form")).to_have_count(0)
        await expect(page.locator("main p.note")).to_have_text("Chỉ xem: bạn không có quyền phát sóng")


async def test_a_daily_range_shows_on_its_days_of_the_week_view_only(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv, chromium() as browser:
        pid = await approved(srv, tmp_path, "Nhạc sáng")
        week = [today() - dt.timedelta(days=today().weekday()) + dt.timedelta(days=i)
                for i in range(7)]
        page = await phone(browser, bypass_csp=True)
        await login(page, f"{srv.base}/", "xa11")
        await open_schedule(page, "Xã 1 huyện 1")
        await page.locator("#programme").select_option(pid)
        await page.check("#kind-daily")
        await page.fill("#time", "07:00")
        await page.fill("#from", week[1].strftime("%d/%m/%Y"))
        await page.fill("#until", week[3].strftime("%d/%m/%Y"))
        await page.locator("form.schedule-form button[type=submit]").first.click()
        await expect(page.locator("form.schedule-form .ok")).to_be_visible()
        (rec,) = await srv.node.store.find("schedule")
        assert (rec["from"], rec["until"]) == (week[1].isoformat(), week[3].isoformat())

        await page.click(".views >> text=Tuần")
        days = page.locator(".calendar.week > li.day")
        await expect(days).to_have_count(7)
        await expect(days.locator("h3 .date")).to_have_text([d.strftime("%d/%m/%Y") for d in week])
        await expect(days.first.locator("h3")).to_contain_text("Thứ Hai")
        for i, d in enumerate(week):
            expected = 1 if 1 <= i <= 3 else 0
            await expect(page.locator(f"li.day[data-date='{d.isoformat()}'] li.airing")
                         ).to_have_count(expected)
        await expect(page.locator("li.airing time").first).to_have_text("07:00")
        assert await axe_violations(page) == [], "week"
        await shots(page, "schedule-week")
        # the next week is outside the range
        await page.click("button.next")
        await expect(days.first).to_have_attribute(
            "data-date", (week[0] + dt.timedelta(days=7)).isoformat())
        await expect(page.locator("li.airing")).to_have_count(0)
        # the day view of Wednesday; the English switch
        await page.click("button.previous")
        await page.fill("#sched-day", week[2].strftime("%d/%m/%Y"))
        await page.click(".views >> text=Ngày")
        await expect(page.locator(".calendar.day > li.day")).to_have_count(1)
        await expect(page.locator(".calendar li.airing .title")).to_have_text("Nhạc sáng")
        await shots(page, "schedule-day")
        await page.click("button.lang")
        await expect(page.locator(".calendar li.day h3")).to_contain_text("Wednesday")
        await expect(page.locator(".calendar li.airing .meta")).to_contain_text("daily")


async def test_schedule_api_dry_run_calendar_switch_and_cross_area_refusals(
        tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv:
        own = await approved(srv, tmp_path, "Bản tin xã", seconds=2)
        district = await approved(srv, tmp_path, "Bản tin huyện", who="huyen1", hz=500,
                                  seconds=2)
        mine = await scheduled(srv, "xa11", programme=own, targets=[X1], kind="daily",
                               time="05:00")
        theirs = await scheduled(srv, "huyen1", programme=district, targets=[H1], kind="weekly",
                                 weekdays=["mon", "wed"], time="05:00")
        sibling = await scheduled(srv, "huyen1", programme=district, targets=[X2], kind="daily",
                                  time="09:00")

        # dry run: the same checks and conflicts, 200, nothing stored
        body = {"programme": own, "targets": [X1], "kind": "daily", "time": "05:00:01"}
        status, out = await srv.call("xa11", "POST", "/api/v1/schedules?dry_run=1", json=body)
        assert status == 200 and out["stored"] is False, out
        assert {c["schedule"] for c in out["conflicts"]} == {mine["id"], theirs["id"]}
        assert {c["area_name"] for c in out["conflicts"]} == {"Xã 1 huyện 1", "Huyện 1"}
        assert await srv.node.store.count("schedule") == 3
        status, out = await srv.call("xa11", "POST", "/api/v1/schedules?dry_run=1",
                                     json={**body, "targets": [X2]})
        assert status == 403, out
        status, out = await srv.call("xa11", "POST", "/api/v1/schedules?dry_run=1",
                                     json={**body, "time": "24:00"})
        assert (status, out["field"]) == (422, "time")
        assert await srv.node.store.count("schedule") == 3

        # the calendar: its own and the district's (not its to change), never the sibling's
        monday = today() - dt.timedelta(days=today().weekday())
        status, cal = await srv.call("xa11", "GET", f"/api/v1/schedules/calendar?area={X1}"
                                     f"&from={monday.isoformat()}&days=7")
        assert status == 200, cal
        assert [d["weekday"] for d in cal["days"]] == ["mon", "tue", "wed", "thu", "fri", "sat",
                                                       "sun"]
        seen = [(d["weekday"], i["schedule"], i["mine"]) for d in cal["days"] for i in d["items"]]
        assert (("mon", theirs["id"], False) in seen and ("wed", theirs["id"], False) in seen
                and ("tue", theirs["id"], False) not in seen)
        assert sum(s == mine["id"] and m for _, s, m in seen) == 7
        assert all(s != sibling["id"] for _, s, _ in seen)
        first = cal["days"][0]["items"][0]
        assert dt.datetime.fromtimestamp(first["at"], ZONE).strftime("%H:%M") == "05:00"
        status, cal = await srv.call("huyen1", "GET", f"/api/v1/schedules/calendar?area={H1}"
                                     "&days=1")
        assert status == 200 and {i["schedule"] for i in cal["days"][0]["items"]} >= {
            mine["id"], sibling["id"]}
        for query, name in (("days=0", "days"), ("days=32", "days"), ("from=01/06/2026", "from")):
            status, out = await srv.call("xa11", "GET", f"/api/v1/schedules/calendar?{query}")
            assert (status, out.get("field")) == (422, name), (query, out)
        status, out = await srv.call("xa11", "GET", f"/api/v1/schedules/calendar?area={X2}")
        assert status == 403, out

        # turning off: its own yes; the district's 403 (readable), the sibling's 404 (hidden)
        status, out = await srv.call("xa11", "PATCH", f"/api/v1/schedules/{mine['id']}",
                                     json={"enabled": False})
        assert status == 200 and out["enabled"] is False, out
        status, out = await srv.call("xa11", "PATCH", f"/api/v1/schedules/{mine['id']}",
                                     json={"enabled": "no"})
        assert (status, out["field"]) == (422, "enabled")
        status, out = await srv.call("xa11", "PATCH", f"/api/v1/schedules/{mine['id']}",
                                     json={"time": "06:00"})
        assert (status, out["field"]) == (422, "time")
        for who, sid, expected in (("xa11", theirs["id"], 403), ("xa11", sibling["id"], 404),
                                   ("xa12", mine["id"], 404), ("xem11", mine["id"], 403)):
            for method, kw in (("PATCH", {"json": {"enabled": False}}), ("DELETE", {})):
                status, out = await srv.call(who, method, f"/api/v1/schedules/{sid}", **kw)
                assert status == expected, (who, method, sid, out)
        status, out = await srv.call("xa11", "DELETE", f"/api/v1/schedules/{theirs['id']}")
        assert out["error"] == say("schedule.above", area="Huyện 1")
        assert await srv.node.store.count("schedule") == 3
        assert (await srv.node.store.get("schedule", theirs["id"]))["enabled"] is True
        # the district may turn off the commune's schedule (its subtree)
        status, out = await srv.call("huyen1", "PATCH", f"/api/v1/schedules/{mine['id']}",
                                     json={"enabled": True})
        assert status == 200 and out["enabled"] is True
        audit = [e["action"] for e in await srv.node.store.read_log("audit", limit=500)]
        assert audit.count("schedule.update") == 2
