"""The console's bulletin inbox (issue 12, TT 39) in Debian's Chromium against a real node: a
commune operator on a phone listens to a bulletin from the province, schedules one, declines
another with a reason, and puts a priority bulletin after its own; the province follows each
commune's answer live, the reason included."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
from playwright.async_api import expect

from loa.streamer.messages import say
from tests.apiclient import tone_file
from tests.emergencynode import Srv, live_config, serving
from tests.helpers import until
from tests.web.browser import XSS, axe_violations, chromium, login, phone, shots

ZONE = ZoneInfo("Asia/Ho_Chi_Minh")
X1, X2 = "T01-H1-X1", "T01-H1-X2"


async def media(srv: Srv, path: Path, title: str) -> str:
    form = aiohttp.FormData()
    form.add_field("title", title)
    form.add_field("file", path.read_bytes(), filename=path.name)
    status, rec = await srv.call("tinh", "POST", "/api/v1/media", data=form)
    assert status == 201, rec
    return str(rec["id"])


async def send(srv: Srv, mid: str, targets: list[str], klass: str) -> dict[str, Any]:
    status, out = await srv.call("tinh", "POST", "/api/v1/bulletins",
                                 json={"media": mid, "targets": targets, "class": klass})
    assert status == 201, out
    return dict(out)


def entry_of(sent: dict[str, Any], area: str) -> str:
    return str(next(e["id"] for e in sent["entries"] if e["area"] == area))


async def test_a_commune_answers_its_inbox_on_a_phone_and_the_province_sees_it_live(
        tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv, chromium() as browser:
        mid = await media(srv, tone_file(tmp_path / "tin.wav", 700, 2), "Bản tin tiêm chủng")
        odd = await media(srv, tone_file(tmp_path / "odd.wav", 600, 2), XSS)
        first = await send(srv, mid, [X1, X2], "normal")
        second = await send(srv, odd, [X1], "normal")
        urgent = await send(srv, mid, [X1], "priority")
        page = await phone(browser, bypass_csp=True)
        dialogs: list[str] = []
        page.on("dialog", lambda d: dialogs.append(d.message))
        await login(page, f"{srv.base}/", "xa11")
        await page.click("nav.screens >> text=Hộp thư bản tin")
        await expect(page.locator("main h1")).to_have_text("Hộp thư bản tin")
        rows = page.locator("li.inbox-entry")
        await expect(rows).to_have_count(3)
        one = page.locator(f"li.inbox-entry[data-id='{entry_of(first, X1)}']")
        await expect(one.locator(".badge")).to_have_text("chờ xử lý")
        await expect(one.locator(".meta")).to_contain_text("từ Tỉnh")
        await shots(page, "inbox")
        assert await axe_violations(page) == [], "inbox"

        # Listen: the audio as it airs, in the page.
        await one.locator("button.listen").click()
        await expect(one.locator("audio")).to_have_attribute(
            "src", f"/api/v1/media/{mid}/audio")
        # Schedule it: a day that is none is refused under its field; then tomorrow 06:30.
        await one.locator("input[id^=date-]").fill("31/02/2027")
        await one.locator("input[id^=time-]").fill("06:30")
        await one.locator("form.inbox-schedule button").click()
        await expect(one.locator("form.inbox-schedule .error")).to_be_visible()
        assert await srv.node.store.count("schedule") == 0
        tomorrow = dt.datetime.now(ZONE).date() + dt.timedelta(days=1)
        await one.locator("input[id^=date-]").fill(tomorrow.strftime("%d/%m/%Y"))
        await one.locator("form.inbox-schedule button").click()
        await expect(one.locator(".badge")).to_have_text("đã lên lịch")
        (sched,) = await srv.node.store.find("schedule")
        assert (sched["kind"], sched["date"], sched["time"], sched["targets"]) == (
            "once", tomorrow.isoformat(), "06:30", [X1])

        # Decline the other: without a reason the API's refusal under the field, then with one.
        two = page.locator(f"li.inbox-entry[data-id='{entry_of(second, X1)}']")
        await expect(two.locator(".title")).to_have_text(XSS)  # shown as text, never markup
        await two.locator("button.decline").click()
        await expect(two.locator(".inbox-decline .error")).to_have_text(
            say("inbox.reason", limit=500).split(" / ")[0])
        await two.locator("textarea").fill("Trùng giờ họp dân")
        await two.locator("button.decline").click()
        await expect(two.locator(".badge")).to_have_text("đã từ chối")
        await expect(two.locator(".reason q")).to_have_text("Trùng giờ họp dân")

        # The priority bulletin: after the commune's own.
        three = page.locator(f"li.inbox-entry[data-id='{entry_of(urgent, X1)}']")
        await expect(three.locator("input[value=before]")).to_be_checked()
        await three.locator("input[value=after]").check()
        await expect(three.locator("input[value=after]")).to_be_checked()
        async def order() -> str:
            entry = await srv.node.store.get("inbox", entry_of(urgent, X1))
            return str((entry or {}).get("order"))

        await until(lambda: _is(order(), "after"), "the order stored")
        aired = await srv.node.store.get("broadcast", urgent["broadcast"])
        assert aired is not None and aired["after_own"] == [X1]  # the engine's, at its tick
        assert await page.locator("main img").count() == 0 and dialogs == []
        await shots(page, "inbox-answered")
        assert await axe_violations(page) == [], "answered"

        # The province, on a wide screen: each commune's answer, live.
        wide = await phone(browser, bypass_csp=True, viewport={"width": 1280, "height": 800})
        await login(wide, f"{srv.base}/", "tinh")
        await wide.click("nav.screens >> text=Hộp thư bản tin")
        await expect(wide.locator("li.inbox-entry")).to_have_count(0)  # its own: under "sent"
        sent = wide.locator(f"li.sent-bulletin[data-id='{first['id']}']")
        await expect(sent.locator(f"tr[data-area='{X1}'] td").first).to_have_text("đã lên lịch")
        await expect(sent.locator(f"tr[data-area='{X2}'] td").first).to_have_text("chờ xử lý")
        status, _ = await srv.call("xa12", "POST",
                                   f"/api/v1/inbox/{entry_of(first, X2)}/decline",
                                   json={"reason": "Loa xã đang sửa"})
        assert status == 200
        await expect(sent.locator(f"tr[data-area='{X2}'] td")).to_have_text(
            ["đã từ chối", "Loa xã đang sửa"])
        await expect(wide.locator(f"li.sent-bulletin[data-id='{urgent['id']}'] "
                                  f"tr[data-area='{X1}'] td")).to_have_text(
            ["đã phát", "phát sau bản tin của xã"])
        await shots(wide, "inbox-sent")
        assert await axe_violations(wide) == [], "sent"

        # A viewer of the commune reads the inbox, with no form to act and the reason why.
        viewer = await phone(browser)
        await login(viewer, f"{srv.base}/", "xem11")
        await viewer.click("nav.screens >> text=Hộp thư bản tin")
        await expect(viewer.locator("li.inbox-entry")).to_have_count(3)
        await expect(viewer.locator(".read-only")).to_be_visible()
        await expect(viewer.locator("li.inbox-entry form, li.inbox-entry fieldset")).to_have_count(0)


async def _is(value: Any, want: str) -> bool:
    return bool(await value == want)
