"""The operator console's assets as the node serves them (issue 11): the page with its strict CSP
(the inline import map allowed by its hash), gzip when accepted, year-long caching of the
versioned vendor modules, revalidation by ETag, and only console texts in the catalogue."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from playwright.async_api import expect

from loa.web import console
from loa.web.auth import add_user
from loa.web.node import Node
from loa.web.testing import running_node
from tests.apiclient import PASSWORD, make_config, tone_file
from tests.emergencynode import Srv, live_config, serving
from tests.web.browser import XSS, axe_violations, chromium, login, phone, shots


async def test_page_assets_and_catalogue_are_served_safely_and_compressed(tmp_path: Path) -> None:
    async with running_node(make_config(tmp_path), realtime=False) as live, \
            aiohttp.ClientSession(auto_decompress=True) as http:
        async with http.get(f"{live.url}/", headers={"Accept-Encoding": "gzip"}) as r:
            assert r.status == 200 and r.headers["Content-Encoding"] == "gzip"
            page = await r.text()
            policy = r.headers["Content-Security-Policy"]
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert r.headers["Referrer-Policy"] == "same-origin"
            tag = r.headers["ETag"]
        assert console.import_map_hash(page) in policy and "'unsafe-inline'" not in policy
        assert "object-src 'none'" in policy and "frame-ancestors 'none'" in policy
        async with http.get(f"{live.url}/", headers={"If-None-Match": tag}) as r:
            assert r.status == 304
        async with http.get(f"{live.url}/console/static/vendor/preact-11.2.0.mjs",
                            headers={"Accept-Encoding": "identity"}) as r:
            assert r.status == 200 and "Content-Encoding" not in r.headers
            assert "immutable" in r.headers["Cache-Control"]
            assert r.headers["Content-Type"].startswith("text/javascript")
        for bad in ("vendor/.stamp", "../__init__.py", "nope.js"):
            async with http.get(f"{live.url}/console/static/{bad}") as r:
                assert r.status == 404, bad
        async with http.get(f"{live.url}/console/catalogue.json") as r:
            texts = await r.json()
        assert all(k.startswith("console.") or k in console.SHOWN for k in texts)
        assert all(set(v) == {"vi", "en"} for v in texts.values())


async def test_login_account_language_and_logout_in_chromium(tmp_path: Path) -> None:
    async def prepare(node: Node) -> None:
        await add_user(node.store, node.tree, "xa11", "operator", "T01-H1-X1", PASSWORD)

    async with running_node(make_config(tmp_path), realtime=False, prepare=prepare) as live, \
            chromium() as browser:
        page = await phone(browser, locale="vi-VN")
        outside: list[str] = []
        page.on("request", lambda r: None if r.url.startswith(live.url) else outside.append(r.url))
        answer = await page.goto(f"{live.url}/")
        assert answer is not None
        assert "frame-ancestors 'none'" in (await answer.all_headers())["content-security-policy"]
        await page.fill("#username", "xa11")
        await page.fill("#password", "sai-mat-khau")
        await page.click("button[type=submit]")
        await expect(page.locator(".error")).to_have_text("sai tên đăng nhập hoặc mật khẩu")
        await shots(page, "login")
        await page.fill("#password", PASSWORD)
        await page.click("button[type=submit]")
        await expect(page.locator("main h1")).to_have_text("Tổng quan: Xã 1 huyện 1")
        await page.click("nav.screens >> text=Tài khoản")
        await expect(page.locator("dd.area")).to_have_text("Xã 1 huyện 1")
        assert "loa_session" not in await page.evaluate("document.cookie")
        stored = await page.evaluate("JSON.stringify(Object.entries(localStorage))")
        assert "token" not in stored and "csrf" not in stored
        await shots(page, "account")
        await page.click("button.lang")
        await expect(page.locator("h1")).to_have_text("Account")
        await page.click("text=Log out")
        await expect(page.locator("#username")).to_be_visible()
        assert outside == []


async def _on_air_programme(srv: Srv, tmp_path: Path, area: str) -> str:
    """A tone programme of the district, approved, put on air in `area` now: its broadcast id."""
    prog = await srv.approved(tone_file(tmp_path / "tone.wav", 440, 30), "Bản tin sáng",
                              "huyen1")
    status, b = await srv.call("huyen1", "POST", "/api/v1/broadcasts",
                               json={"programme": prog, "targets": [area]})
    assert status == 201, b
    return str(b["id"])


async def test_overview_live_on_air_emergency_banner_and_escaped_names(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv, chromium() as browser:
        status, body = await srv.call("qtv1", "POST", "/api/v1/areas", json={
            "code": "T01-H1-X9", "name": XSS, "level": "commune", "parent": "T01-H1"})
        assert status == 201, body
        page = await phone(browser)
        dialogs: list[str] = []
        page.on("dialog", lambda d: dialogs.append(d.message))
        await login(page, f"{srv.base}/", "tinh")
        await expect(page.locator("main h1")).to_have_text("Tổng quan: Tỉnh Mẫu")
        rows = page.locator("#level-root > li.area-row")
        await expect(rows).to_have_count(2)  # one level only: the districts
        assert await page.locator("li[data-code=T01-H1-X1]").count() == 0
        district = page.locator("li[data-code=T01-H1] > .row button.name")
        await district.click()
        await expect(district).to_have_attribute("aria-expanded", "true")
        await expect(page.locator("#level-T01-H1 > li.area-row")).to_have_count(4)
        await expect(page.locator("li[data-code=T01-H1-X9] .name")).to_have_text(XSS)
        assert await page.locator("main img").count() == 0 and dialogs == []
        x1 = page.locator("li[data-code=T01-H1-X1] .on-air")
        await expect(x1).to_have_text("không phát")

        # on air: the row changes in place from the event stream, with the class and issuer
        bid = await _on_air_programme(srv, tmp_path, "T01-H1-X1")
        srv.run(0.2)
        await expect(x1).to_have_attribute("data-broadcast", bid)
        await expect(x1.locator("strong")).to_have_text("Bản tin sáng")
        await expect(x1.locator(".why")).to_contain_text("thông thường")
        await expect(page.locator("li[data-code=T01-H1-X2] .on-air")).to_have_text("không phát")
        await shots(page, "overview")

        # an emergency to district 2: the banner (role=alert), gone when it ends
        status, em = await srv.call("tinh", "POST", "/api/v1/emergencies", json={
            "targets": ["T01-H2"], "title": "Bão số 3", "content": {"text": "Bão số ba"}})
        assert status in (200, 201), em
        banner = page.locator(".emergency[role=alert]")
        await expect(banner).to_contain_text("Bão số 3")
        await expect(banner.locator("h2")).to_have_text("ĐANG PHÁT KHẨN CẤP (1)")
        await shots(page, "overview-emergency")
        status, _ = await srv.call("tinh", "DELETE", f"/api/v1/emergencies/{em['id']}")
        assert status in (200, 204)
        await expect(banner).to_have_count(0)


async def test_commune_sees_its_subtree_and_the_refusal_and_changes_its_password(
        tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv, chromium() as browser:
        page = await phone(browser, timezone_id="UTC")
        await login(page, f"{srv.base}/", "xa11")
        await expect(page.locator("main h1")).to_have_text("Tổng quan: Xã 1 huyện 1")
        await expect(page.locator("main")).not_to_contain_text("Xã 2 huyện 1")
        # an operator's screens; no emergency (no right) and no administration (not an admin)
        await expect(page.locator("nav.screens a")).to_have_text([
            "Tổng quan", "Phát ngay", "Thư viện âm thanh", "Chương trình và duyệt", "Lịch phát",
            "Hộp thư bản tin", "Thiết bị", "Bảng tin", "Báo cáo", "Tài khoản"])
        await page.goto(f"{srv.base}/#/admin")  # typed by hand: the reason, not a blank page
        await expect(page.locator("main[data-screen=admin] .error[role=alert]")).to_have_text(
            "Chỉ quản trị viên mới mở được màn hình này")
        # dd/mm/yyyy HH:MM in Asia/Ho_Chi_Minh even in a browser set to UTC
        shown = await page.evaluate(
            "import('/console/static/format.js').then(m => m.dateTime(1767225600))")
        assert shown == "07:00 01/01/2026"

        # a forced look at the sibling commune: the server's 403, in Vietnamese, on the page
        await page.goto(f"{srv.base}/#/overview/T01-H1-X2")
        await expect(page.locator("main .error[role=alert]")).to_contain_text("khu vực T01-H1-X2 ngoài phạm vi của bạn")

        await page.click("nav.screens >> text=Tài khoản")
        await expect(page.locator(".area")).to_have_text("Xã 1 huyện 1")
        form = page.locator("form.password")
        for current, new, again, where in (("sai", "mat-khau-moi-1", "mat-khau-moi-1", "current"),
                                           (PASSWORD, "ngan", "ngan", "new"),
                                           (PASSWORD, "mat-khau-moi-1", "khac-han", "again")):
            await page.fill("#current", current)
            await page.fill("#new", new)
            await page.fill("#again", again)
            await form.locator("button[type=submit]").click()
            await expect(page.locator(f"#{where}-error")).to_be_visible()
            await expect(page.locator(f"#{where}")).to_have_attribute("aria-invalid", "true")
        await shots(page, "account-error")
        await page.fill("#current", PASSWORD)
        await page.fill("#new", "mat-khau-moi-1")
        await page.fill("#again", "mat-khau-moi-1")
        await form.locator("button[type=submit]").click()
        await expect(page.locator("form.password .ok")).to_contain_text("Đã đổi mật khẩu")
        await page.click("text=Đăng xuất")
        await login(page, f"{srv.base}/", "xa11", "mat-khau-moi-1")


async def test_screens_have_no_serious_accessibility_violation(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv, chromium() as browser:
        page = await phone(browser, bypass_csp=True)  # axe is injected as a script
        await page.goto(f"{srv.base}/")
        await expect(page.locator("#username")).to_be_visible()
        assert await axe_violations(page) == [], "login"
        await login(page, f"{srv.base}/", "tinh")
        await page.locator("li[data-code=T01-H1] button.name").click()
        await expect(page.locator("#level-T01-H1 > li")).to_have_count(3)
        assert await axe_violations(page) == [], "overview"
        await page.click("nav.screens >> text=Tài khoản")
        await page.fill("#current", "sai")
        await page.fill("#new", "x")
        await page.fill("#again", "x")
        await page.locator("form.password button[type=submit]").click()
        await expect(page.locator("#new-error, #current-error")).to_have_count(1)
        assert await axe_violations(page) == [], "account"
