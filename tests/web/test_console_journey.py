"""The issue's first journey through the console, every step in the page (issue 11): a commune
operator on a phone uploads a WAV (progress shown), writes a programme of it and submits it; the
district approver approves it in the queue; the operator schedules it a few seconds ahead; the
overview shows it on air when it starts, and FFmpeg on that commune's stream hears the file's
tone. The screens' own tests (test_console_library, _schedule) go into each step's details."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from zoneinfo import ZoneInfo

from playwright.async_api import expect

from tests.apiclient import tone_file
from tests.audio import peak_hz
from tests.emergencynode import live_config, serving
from tests.httpstreams import ffmpeg_record
from tests.web.browser import chromium, login, phone

ZONE = ZoneInfo("Asia/Ho_Chi_Minh")
X1 = "T01-H1-X1"


async def test_upload_approve_schedule_and_hear_it_all_in_the_console(tmp_path: Path) -> None:
    tone = tone_file(tmp_path / "ban-tin-trua.wav", 520, 40)
    async with serving(live_config(tmp_path), realtime=True) as srv, chromium() as browser:
        author = await phone(browser)
        await login(author, f"{srv.base}/", "xa11")
        await author.click("nav.screens >> text=Thư viện âm thanh")
        await author.set_input_files("#media-files", str(tone))
        upload = author.locator("li.upload")
        await expect(upload.locator("progress")).to_have_attribute("value", "1")
        await expect(upload.locator(".state")).to_have_text("đã lưu vào thư viện")

        await author.click("nav.screens >> text=Chương trình và duyệt")
        await author.fill("#title", "Bản tin trưa")
        await author.select_option("#media", label="ban-tin-trua (0:40)")
        await author.click("form.programme button[type=submit]")
        mine = author.locator("li.programme-row", has_text="Bản tin trưa")
        await mine.locator("button.submit").click()
        await expect(mine.locator(".badge")).to_have_text("chờ duyệt")

        approver = await phone(browser)
        await login(approver, f"{srv.base}/", "duyet1")
        await approver.click("nav.screens >> text=Chương trình và duyệt")
        await approver.locator("li.pending", has_text="Bản tin trưa").locator(
            "form.approve button").click()
        await expect(mine.locator(".badge")).to_have_text("đã duyệt")  # live, no reload

        await author.click("nav.screens >> text=Lịch phát")
        form = author.locator("form.schedule-form")
        await form.locator("#programme").select_option(label="Bản tin trưa")
        at = dt.datetime.now(ZONE) + dt.timedelta(seconds=10)
        await author.fill("#time", at.strftime("%H:%M:%S"))
        await form.locator("button[type=submit]").first.click()
        await expect(form.locator(".ok")).to_have_text("Đã lưu lịch")

        await author.click("nav.screens >> text=Tổng quan")
        on_air = author.locator(".root-row .on-air")
        await expect(on_air.locator("strong")).to_have_text("Bản tin trưa", timeout=30_000)
        await expect(on_air.locator(".why")).to_contain_text("thông thường")
        pcm, rate = await ffmpeg_record(f"{srv.base}/streams/{X1}.mp3?burst_ms=0",
                                        tmp_path / "heard.wav", 2.0)
        assert abs(peak_hz(pcm[rate // 2:], rate) - 520) < 15
