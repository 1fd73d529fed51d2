"""The quiet hours form under an area's schedule, in Debian's Chromium: a commune operator sets
the hours and a volume row as plain times and percentages, the API's refusal shows under the
field it names, the saved rule is what the engine follows; a viewer sees it read-only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from playwright.async_api import expect

from loa.streamer.messages import say
from tests.emergencynode import live_config, serving
from tests.web.browser import axe_violations, chromium, login, phone, shots

X1 = "T01-H1-X1"


def vi(key: str, **params: Any) -> str:
    return say(key, **params).split(" / ")[0]


def by_id(name: str) -> str:
    return f'[id="{name}"]'


async def test_a_commune_operator_sets_quiet_hours_and_a_volume_row(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv, chromium() as browser:
        page = await phone(browser, bypass_csp=True)  # axe-core is injected
        await login(page, f"{srv.base}/", "xa11")
        await page.click("nav.screens >> text=Lịch phát")
        section = page.locator("section.airtime")
        await expect(section.locator(".airtime-source")).to_have_text(
            "Chưa có quy định: phát cả ngày, âm lượng 100 %")
        await page.fill(by_id("airtime.hours[0]"), "05:00")
        await page.fill(by_id("airtime.hours[0].to"), "21:30")
        await page.fill(by_id("airtime.volume[0].from"), "05:00")
        await page.fill(by_id("airtime.volume[0].to"), "07:00")
        await page.fill(by_id("airtime.volume[0].percent"), "140")
        await section.locator("button[type=submit]").click()
        error = page.locator(by_id("airtime.volume[0].percent-error"))
        await expect(error).to_have_text(vi("airtime.bad_percent",
                                            name="airtime.volume[0].percent"))
        await expect(page.locator(by_id("airtime.volume[0].percent"))).to_have_attribute(
            "aria-invalid", "true")
        assert await srv.node.store.find("airtime") == []
        assert await axe_violations(page) == [], "airtime error"
        await shots(page, "airtime-error")

        await page.fill(by_id("airtime.volume[0].percent"), "60")
        await section.locator("button[type=submit]").click()
        await expect(section.locator(".ok")).to_have_text("Đã lưu giờ phát")
        await expect(section.locator(".airtime-source")).to_have_text(
            "Quy định riêng của khu vực này")
        (rec,) = await srv.node.store.find("airtime")
        assert rec == {"id": X1, "rule": {"hours": [["05:00", "21:30"]], "volume": [
            {"from": "05:00", "to": "07:00", "percent": 60}]}}
        assert srv.clock is not None
        srv.clock.run(1)  # the engine takes new rules at its next tick
        air = srv.node.engine.airtime
        assert air is not None and air.rules[X1].hours == ((5 * 3600, 21 * 3600 + 1800),)
        await shots(page, "airtime-saved")

        # back to the district's (none): the button that drops the own rule
        await section.locator("button.inherit").click()
        await expect(section.locator(".airtime-source")).to_have_text(
            "Chưa có quy định: phát cả ngày, âm lượng 100 %")
        assert await srv.node.store.find("airtime") == []

        viewer = await phone(browser)
        await login(viewer, f"{srv.base}/", "xem11")
        await viewer.click("nav.screens >> text=Lịch phát")
        await expect(viewer.locator(by_id("airtime.hours[0]"))).to_be_disabled()
        await expect(viewer.locator("section.airtime button")).to_have_count(0)
