"""The console's library and programmes screens (issue 11, screens 3 and 4) in Debian's Chromium
against a real node: upload with progress and the server's refusals per file, listening to the
node's own audio, text to speech, delete (audited), programmes written, submitted, approved or
rejected with a reason the author sees live; and the API the screens added (the audio with
Range, the approver's `under=` filter), scoped to the caller's area."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
from playwright.async_api import Page, expect

from tests.apiclient import tone_file
from tests.emergencynode import Srv, live_config, serving
from tests.web.browser import XSS, axe_violations, chromium, login, phone, shots

LIBRARY = "nav.screens >> text=Thư viện âm thanh"
PROGRAMMES = "nav.screens >> text=Chương trình và duyệt"


async def upload(srv: Srv, who: str, path: Path, title: str) -> dict[str, Any]:
    form = aiohttp.FormData()
    form.add_field("title", title)
    form.add_field("file", path.read_bytes(), filename=path.name)
    status, body = await srv.call(who, "POST", "/api/v1/media", data=form)
    assert status == 201, body
    return dict(body)


async def media_count(srv: Srv, who: str) -> int:
    status, body = await srv.call(who, "GET", "/api/v1/media")
    assert status == 200, body
    return len(body["media"])


async def audio(srv: Srv, who: str | None, mid: str, **headers: str) -> tuple[int, bytes]:
    if who:
        headers["Authorization"] = f"Bearer {await srv.login(who)}"
    async with srv.http.get(f"{srv.base}/api/v1/media/{mid}/audio", headers=headers) as r:
        return r.status, await r.read()


async def fetch(page: Page, url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """What the page's own session gets for `url`: status, content type, first bytes."""
    return dict(await page.evaluate("""async ([url, headers]) => {
        const r = await fetch(url, {headers});
        const bytes = new Uint8Array(await r.arrayBuffer());
        return {status: r.status, type: r.headers.get("content-type"), size: bytes.length,
                head: String.fromCharCode(...bytes.slice(0, 4)),
                range: r.headers.get("content-range")};
    }""", [url, headers or {}]))


async def test_upload_programme_submit_approve_and_reject_live(tmp_path: Path) -> None:
    tone = tone_file(tmp_path / "ban-tin-sang.wav", 440, 3)
    async with serving(live_config(tmp_path)) as srv, chromium() as browser:
        author = await phone(browser)
        await login(author, f"{srv.base}/", "xa11")
        await author.click(LIBRARY)
        await expect(author.locator("main h1")).to_have_text("Thư viện âm thanh")
        await expect(author.locator("p.count")).to_have_text("0 trên 0 tệp")
        await author.set_input_files("#media-files", str(tone))
        row = author.locator("li.upload")
        await expect(row.locator(".state")).to_have_text("đã lưu vào thư viện")
        await expect(row.locator("progress")).to_have_attribute("value", "1")
        await expect(author.locator("li.media .title")).to_have_text(["ban-tin-sang"])
        await expect(author.locator("li.media .meta")).to_contain_text("0:03")
        await shots(author, "library")

        # a programme of it, a draft, then submitted: "chờ duyệt" on the author's page
        await author.click(PROGRAMMES)
        await author.fill("#title", "Bản tin sáng")
        await author.select_option("#media", label="ban-tin-sang (0:03)")
        await author.click("form.programme button[type=submit]")
        mine = author.locator("li.programme-row", has_text="Bản tin sáng")
        await expect(mine.locator(".badge")).to_have_text("nháp")
        await mine.locator("button.submit").click()
        await expect(mine.locator(".badge")).to_have_text("chờ duyệt")
        await expect(mine.locator("button.submit")).to_have_count(0)

        # a second one, written and submitted through the API, will be rejected
        media = (await srv.call("xa11", "GET", "/api/v1/media"))[1]["media"][0]
        status, other = await srv.call("xa11", "POST", "/api/v1/programmes", json={
            "title": XSS, "type": "file", "media": media["id"]})
        assert status == 201, other
        status, _ = await srv.call("xa11", "POST", f"/api/v1/programmes/{other['id']}/submit")
        assert status == 200
        await expect(author.locator("li.programme-row .badge")).to_have_text(
            ["chờ duyệt", "chờ duyệt"])  # the `programme` event: no reload

        # the district approver's queue: both, listened to, one approved
        approver = await phone(browser)
        await login(approver, f"{srv.base}/", "duyet1")
        await approver.click(PROGRAMMES)
        queue = approver.locator("li.pending")
        await expect(queue).to_have_count(2)
        first = approver.locator("li.pending", has_text="Bản tin sáng")
        await first.locator("button.listen").click()
        src = await first.locator("audio").get_attribute("src")
        assert src == f"/api/v1/media/{media['id']}/audio"
        got = await fetch(approver, src)
        assert (got["status"], got["type"], got["head"]) == (200, "audio/wav", "RIFF")
        assert got["size"] == 44 + 3 * 48000 * 2  # the stored 48 kHz mono 16-bit audio
        got = await fetch(approver, src, {"Range": "bytes=44-"})
        assert (got["status"], got["size"]) == (206, 3 * 48000 * 2)
        assert got["range"] == f"bytes 44-{44 + 3 * 48000 * 2 - 1}/{44 + 3 * 48000 * 2}"
        await expect(approver.locator("li.pending .title", has_text="onerror")).to_have_text(XSS)
        assert await approver.locator("main img").count() == 0
        await shots(approver, "programmes-queue")
        await first.locator("form.approve button").click()
        await expect(queue).to_have_count(1)
        await expect(mine.locator(".badge")).to_have_text("đã duyệt")  # live on the author's page
        await expect(mine.locator(".approved")).to_contain_text("duyet1 duyệt lúc")

        # reject: a reason is required (the 422 under its field), then the author reads it
        rejecting = approver.locator("li.pending")
        await rejecting.locator("button.reject").click()
        reason = approver.locator(f"#reason-{other['id']}")
        await expect(reason).to_have_attribute("aria-invalid", "true")
        await expect(approver.locator(f"#reason-{other['id']}-error")).to_have_text(
            "cần lý do từ chối")
        await shots(approver, "programmes-reject-error")
        await reason.fill("Thiếu nguồn tin")
        await rejecting.locator("button.reject").click()
        await expect(approver.locator("li.pending")).to_have_count(0)
        await expect(approver.locator(".queue")).to_contain_text("Không có chương trình chờ duyệt")
        theirs = author.locator(f"li.programme-row[data-id='{other['id']}']")
        await expect(theirs.locator(".badge")).to_have_text("bị từ chối")
        await expect(theirs.locator(".reason q")).to_have_text("Thiếu nguồn tin")
        await expect(theirs.locator("button.submit")).to_be_visible()  # may fix and resubmit
        await shots(author, "programmes")
        status, body = await srv.call("xa11", "GET", f"/api/v1/programmes/{other['id']}")
        assert (body["status"], body["reason"]) == ("rejected", "Thiếu nguồn tin")


async def test_refused_uploads_show_the_servers_reason_and_store_nothing(tmp_path: Path) -> None:
    cfg = live_config(tmp_path)
    cfg.media.max_seconds = 2
    fake = tmp_path / "khong-phai-am-thanh.wav"
    fake.write_text("đây là văn bản, không phải âm thanh\n" * 50)
    long = tone_file(tmp_path / "qua-dai.wav", 440, 4)
    short = tone_file(tmp_path / "ngan.wav", 330, 1)
    async with serving(cfg) as srv, chromium() as browser:
        before = await media_count(srv, "xa11")
        page = await phone(browser)
        await login(page, f"{srv.base}/", "xa11")
        await page.click(LIBRARY)
        await page.set_input_files("#media-files", [str(fake), str(long), str(short)])
        refused = page.locator("li.upload.refused")
        await expect(refused).to_have_count(2)
        await expect(page.locator("li.upload", has_text="khong-phai-am-thanh.wav")
                     .locator(".error")).to_contain_text("không phải tệp âm thanh")
        await expect(page.locator("li.upload", has_text="qua-dai.wav")
                     .locator(".error")).to_have_text("tệp quá dài")
        await expect(page.locator("li.upload.done")).to_have_text(
            ["ngan.wav" + "đã lưu vào thư viện"])
        await shots(page, "library-refused")
        assert await media_count(srv, "xa11") == before + 1  # only the good one

        # the English side of the same reason after the switch
        await page.click("button.lang")
        await expect(page.locator("main h1")).to_have_text("Library")


async def test_recording_from_the_microphone_is_uploaded(tmp_path: Path) -> None:
    fake_microphone = ("--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream")
    async with serving(live_config(tmp_path)) as srv, chromium(*fake_microphone) as browser:
        page = await phone(browser, permissions=["microphone"])
        await login(page, f"{srv.base}/", "xa11")
        await page.click(LIBRARY)
        await page.click("button.record")
        await expect(page.locator(".recording time")).to_have_text("0:02")  # two seconds in
        await shots(page, "library-recording")
        await page.click("button.stop")
        await expect(page.locator("li.upload .state")).to_have_text("đã lưu vào thư viện")
        item = page.locator("li.media")
        await expect(item.locator(".title")).to_have_text(re.compile(r"^Ghi âm \d\d:\d\d "))
        status, body = await srv.call("xa11", "GET", "/api/v1/media")
        assert body["media"][0]["filename"].endswith(".webm")
        assert 1.5 < body["media"][0]["duration"] < 6, body


async def test_text_to_speech_preview_search_filter_and_audited_delete(tmp_path: Path) -> None:
    tone = tone_file(tmp_path / "tone.wav", 440, 2)
    async with serving(live_config(tmp_path)) as srv, chromium() as browser:
        district = await upload(srv, "huyen1", tone, "Nhạc hiệu huyện")
        await upload(srv, "xa11", tone, XSS)
        page = await phone(browser)
        await login(page, f"{srv.base}/", "xa11")
        await page.click(LIBRARY)
        items = page.locator("li.media")
        await expect(items).to_have_count(2)
        await expect(page.locator("li.media .title", has_text="onerror")).to_have_text(XSS)
        assert await page.locator("main img").count() == 0

        # text to speech: the preview plays the node's audio, the item joins the list
        await page.click("form.tts button[type=submit]")
        await expect(page.locator("#text-error")).to_be_visible()  # empty text: under its field
        await page.fill("#text", "Thông báo lịch tiêm chủng ngày mai")
        await page.click("form.tts button[type=submit]")
        preview = page.locator(".preview audio")
        await expect(preview).to_have_count(1)
        got = await fetch(page, str(await preview.get_attribute("src")))
        assert (got["status"], got["type"]) == (200, "audio/wav") and got["size"] > 44
        await expect(items).to_have_count(3)

        # search ignores diacritics; the filters split own, handed down and speech
        await page.fill("#media-search", "thong bao")
        await expect(items).to_have_count(1)
        await expect(items.locator(".title")).to_have_text("Thông báo lịch tiêm chủng ngày mai")
        await page.fill("#media-search", "")
        await page.select_option("#media-kind", "above")
        await expect(items.locator(".title")).to_have_text(["Nhạc hiệu huyện"])
        await expect(items.locator(".note")).to_contain_text("của cấp trên")
        await expect(items.locator("button.delete")).to_have_count(0)  # handed down: read-only
        await page.select_option("#media-kind", "tts")
        await expect(items).to_have_count(1)
        await page.select_option("#media-kind", "all")
        await shots(page, "library-tts")

        # delete with a confirmation; a media a programme uses is refused with the reason
        mine = items.filter(has_text="onerror")
        media_id = await mine.get_attribute("data-id")
        await mine.locator("button.delete").click()
        await mine.locator("button.delete.yes").click()
        await expect(items).to_have_count(2)
        status, log = await srv.call("qtv1", "GET", "/api/v1/audit")
        assert status == 200
        assert [(e["user"], e["target"]) for e in log["entries"]
                if e["action"] == "media.delete"] == [("xa11", media_id)]
        used = items.filter(has_text="Thông báo")
        used_id = await used.get_attribute("data-id")
        status, _ = await srv.call("xa11", "POST", "/api/v1/programmes", json={
            "title": "Tiêm chủng", "type": "file", "media": used_id})
        assert status == 201
        await used.locator("button.delete").click()
        await used.locator("button.delete.yes").click()
        await expect(used.locator(".error")).to_have_text("tệp đang được dùng")
        assert district["id"] != used_id


async def test_programme_form_shows_each_refusal_under_its_field(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv, chromium() as browser:
        page = await phone(browser)
        await login(page, f"{srv.base}/", "bientap11")  # an editor: writes, cannot approve
        await page.click(PROGRAMMES)
        await expect(page.locator(".queue")).to_have_count(0)
        save = page.locator("form.programme button[type=submit]")
        await save.click()
        await expect(page.locator("#title-error")).to_have_text("tiêu đề 1-200 ký tự")
        await expect(page.locator("#title")).to_have_attribute("aria-invalid", "true")
        await page.fill("#title", "Tiếp sóng VOV")
        await page.select_option("#type", "relay")
        await page.fill("#url", "ftp://example.invalid/x")
        await save.click()
        await expect(page.locator("#url-error")).to_be_visible()
        await shots(page, "programmes-error")
        await page.select_option("#type", "file")
        await save.click()
        await expect(page.locator("#media-error")).to_have_text("thiếu trường")
        await page.select_option("#type", "tts")
        await page.fill("#text", "Loa phát thanh xã xin thông báo")
        await page.fill("#repeat", "2")
        await save.click()
        row = page.locator("li.programme-row")
        await expect(row.locator(".title")).to_have_text("Tiếp sóng VOV")
        await expect(row.locator(".spoken")).to_have_text("Loa phát thanh xã xin thông báo")
        await expect(row.locator(".meta")).to_contain_text("×2")
        await page.click(LIBRARY)  # the editor uploads, records and makes speech
        await expect(page.locator("#media-files")).to_be_attached()
        assert await page.locator("button.record, form.tts").count() == 2


async def test_rights_scope_of_the_audio_and_the_queue(tmp_path: Path) -> None:
    tone = tone_file(tmp_path / "tone.wav", 440, 1)
    async with serving(live_config(tmp_path)) as srv, chromium() as browser:
        x2 = await upload(srv, "xa12", tone, "của xã 2")
        district = await upload(srv, "huyen1", tone, "của huyện")
        for path in (f"/api/v1/media/{x2['id']}/audio", f"/api/v1/media/{x2['id']}"):
            status, body = await srv.call("xa11", "GET", path)
            assert status == 404, body  # another commune's media does not exist for xa11
        status, _ = await srv.call("xa11", "DELETE", f"/api/v1/media/{x2['id']}")
        assert status == 404
        status, body = await srv.call("xa11", "DELETE", f"/api/v1/media/{district['id']}")
        assert status == 403 and "ngoài phạm vi" in body["error"], body  # handed down: read only
        status, raw = await audio(srv, "xa11", district["id"])
        assert status == 200 and raw.startswith(b"RIFF") and raw[8:12] == b"WAVE"
        status, raw = await audio(srv, "xa11", district["id"], Range="bytes=999999999-")
        assert status == 416 and "đoạn yêu cầu nằm ngoài tệp" in raw.decode(), raw
        status, _ = await audio(srv, "xa11", district["id"], Range="bytes=0-3,8-11")
        assert status == 200  # several ranges: the whole file, as RFC 9110 allows
        status, _ = await audio(srv, None, district["id"])
        assert status == 401
        async with srv.http.head(f"{srv.base}/api/v1/media/{district['id']}/audio", headers={
                "Authorization": f"Bearer {await srv.login('xa11')}"}) as r:
            assert (r.status, r.headers["Content-Length"], await r.read()) == (
                200, str(44 + 48000 * 2), b"")

        # the approver's queue: pending programmes of their subtree only, never a sibling's
        for who, media in (("xa12", x2), ("huyen1", district)):
            status, prog = await srv.call(who, "POST", "/api/v1/programmes", json={
                "title": f"của {who}", "type": "file", "media": media["id"]})
            assert status == 201, prog
            status, _ = await srv.call(who, "POST", f"/api/v1/programmes/{prog['id']}/submit")
            assert status == 200
        status, body = await srv.call("duyet1", "GET",
                                      "/api/v1/programmes?status=pending&under=T01-H1")
        assert sorted(p["owner"] for p in body["programmes"]) == ["huyen1", "xa12"]
        status, body = await srv.call("duyet1", "GET",
                                      "/api/v1/programmes?status=pending&under=T01-H1-X1")
        assert body["programmes"] == []
        status, body = await srv.call("duyet2", "GET",
                                      "/api/v1/programmes?status=pending&under=T01-H1")
        assert status == 403, body
        status, body = await srv.call("xa11", "GET", "/api/v1/programmes?under=T01")
        assert status == 403, body  # above the caller: not theirs to decide on
        status, body = await srv.call("xa11", "GET", "/api/v1/programmes?under=NOPE")
        assert status == 422 and body["field"] == "under", body

        # the viewer: listens, but no upload, recording, speech, delete or programme form
        page = await phone(browser)
        await login(page, f"{srv.base}/", "xem11")
        await page.click(LIBRARY)
        await expect(page.locator("p.read-only")).to_contain_text("chỉ được nghe")
        await expect(page.locator("li.media")).to_have_count(1)
        assert await page.locator("#media-files, button.record, form.tts, button.delete").count() == 0
        await expect(page.locator("li.media button.listen")).to_have_count(1)
        await page.click(PROGRAMMES)
        await expect(page.locator("p.read-only")).to_contain_text("cần quyền biên tập")
        assert await page.locator("form.programme, .queue, button.submit").count() == 0


async def test_library_and_programmes_have_no_serious_accessibility_violation(
        tmp_path: Path) -> None:
    tone = tone_file(tmp_path / "tone.wav", 440, 1)
    async with serving(live_config(tmp_path)) as srv, chromium() as browser:
        media = await upload(srv, "xa11", tone, "Bản tin")
        status, prog = await srv.call("xa11", "POST", "/api/v1/programmes", json={
            "title": "Bản tin trưa", "type": "file", "media": media["id"]})
        assert status == 201
        await srv.call("xa11", "POST", f"/api/v1/programmes/{prog['id']}/submit")
        page = await phone(browser, bypass_csp=True)
        await login(page, f"{srv.base}/", "xa11")
        await page.click(LIBRARY)
        await expect(page.locator("li.media")).to_have_count(1)
        await page.locator("li.media button.listen").click()
        await page.locator("li.media button.delete").click()
        assert await axe_violations(page) == [], "library"
        await page.click(PROGRAMMES)
        await page.select_option("#type", "playlist")
        await expect(page.locator("li.programme-row")).to_have_count(1)
        assert await axe_violations(page) == [], "programmes"
        approver = await phone(browser, bypass_csp=True)
        await login(approver, f"{srv.base}/", "duyet1")
        await approver.click(PROGRAMMES)
        await expect(approver.locator("li.pending")).to_have_count(1)
        assert await axe_violations(approver) == [], "queue"
