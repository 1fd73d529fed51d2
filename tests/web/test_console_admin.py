"""Reports (as-run, charts, CSV) and administration (users, area import, audit log): the API
they use, then the screens in Debian's Chromium against a real node (issue 11, screens 10-11)."""

from __future__ import annotations

import re
from pathlib import Path

from playwright.async_api import expect

from tests.emergencynode import Srv, live_config, serving
from tests.web.browser import axe_violations, chromium, login, phone, shots

BAD_CSV = ("code,name,level,parent_code\n"
           "T01-H1-X1-T1,Thôn 1,village,T01-H1-X1\n"
           "bad code,Thôn 2,village,T01-H1-X1\n"
           "T01-H1-X1-T3,Thôn 3,village,NOWHERE\n"
           "T01-H1-X1-T1,Thôn 1 again,village,T01-H1-X1\n"
           "T01-H2-X1-T1,Thôn khác,village,T01-H2-X1\n"
           "T01-H1-X2,Xã trùng,commune,T01-H1\n")
GOOD_CSV = ("code,name,level,parent_code\n"
            "T01-H1-X1-T2,Thôn 2,village,T01-H1-X1-T1\n"  # its parent comes further down
            "T01-H1-X1-T1,Thôn 1,village,T01-H1-X1\n")


async def csv(srv: Srv, who: str, text: str, dry_run: bool) -> tuple[int, dict]:
    return await srv.call(who, "POST", "/api/v1/areas/import" + ("?dry_run=1" if dry_run else ""),
                          data=text.encode(), headers={"Content-Type": "text/csv"})


async def user_id(srv: Srv, username: str) -> str:
    return str((await srv.node.store.find("user", username=username))[0]["id"])


# ---- the API ---------------------------------------------------------------------------------
async def test_area_import_reports_every_row_and_stores_nothing_until_all_are_good(
        tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv:
        before = len(srv.node.tree)
        status, out = await csv(srv, "qtv1", BAD_CSV, dry_run=True)
        assert status == 200 and out["valid"] is False, out
        assert [(e["line"], e["field"]) for e in out["errors"]] == [
            (3, "code"), (4, "parent"), (5, "code"), (6, "parent"), (7, "code")]
        assert "NOWHERE" in out["errors"][1]["error"] and "line 2" in out["errors"][2]["error"]
        status, out = await csv(srv, "qtv1", BAD_CSV, dry_run=False)
        assert status == 422 and out["problems"] == 5 and out["line"] == 3, out
        assert len(srv.node.tree) == before and await srv.node.store.count("area") == before

        status, out = await csv(srv, "qtv1", GOOD_CSV, dry_run=True)
        assert status == 200 and out["valid"] and out["count"] == 2, out
        assert [r["code"] for r in out["rows"]] == ["T01-H1-X1-T1", "T01-H1-X1-T2"]
        assert len(srv.node.tree) == before
        status, out = await csv(srv, "qtv1", GOOD_CSV, dry_run=False)
        assert status == 201 and out["imported"] == 2, out
        assert srv.node.tree.get("T01-H1-X1-T2").parent == "T01-H1-X1-T1"
        assert await srv.node.store.count("area") == before + 2

        # another district's commune: refused whole, 403, even in a dry run's verdict
        status, out = await csv(srv, "qtv1", "T01-H2-X1-T1,Thôn,village,T01-H2-X1\n", False)
        assert status == 403 and out["errors"][0]["field"] == "parent", out
        status, out = await csv(srv, "xa11", GOOD_CSV, dry_run=True)
        assert status == 403, out


async def test_password_reset_is_scoped_shown_once_and_ends_the_sessions(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv:
        xa11 = await user_id(srv, "xa11")
        assert (await srv.call("xa11", "GET", "/api/v1/me"))[0] == 200
        status, out = await srv.call("qtv1", "POST", f"/api/v1/users/{xa11}/password")
        assert status == 200 and out["username"] == "xa11" and len(out["password"]) >= 12, out
        assert (await srv.call("xa11", "GET", "/api/v1/me"))[0] == 401  # the old token
        async with srv.http.post(f"{srv.base}/api/v1/auth/token", json={
                "username": "xa11", "password": out["password"]}) as r:
            assert r.status == 201
        stored = await srv.node.store.get("user", xa11)
        assert out["password"] not in str(stored)
        # outside the subtree, above the admin's rights, unknown, not an admin
        for who, target, status_, field in (
                ("qtv1", await user_id(srv, "huyen2"), 403, None),
                ("qtv1", await user_id(srv, "huyen1em"), 403, "password"),
                ("qtv1", "nobody", 404, None),
                ("huyen1", xa11, 403, None)):
            status, out = await srv.call(who, "POST", f"/api/v1/users/{target}/password")
            assert status == status_ and out.get("field") == field, (target, out)
        status, out = await srv.call("qtv1", "PATCH", f"/api/v1/users/{xa11}",
                                     json={"emergency": True})
        assert status == 403 and out["field"] == "emergency", out
        status, out = await srv.call("qtv1", "GET", "/api/v1/audit?action=user.password_reset")
        assert [e["target"] for e in out["entries"]] == [xa11]


async def test_audit_log_is_the_subtree_newest_first_filtered_and_paged(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv:
        for i in range(3):
            status, _ = await srv.call("qtv1", "POST", "/api/v1/areas", json={
                "code": f"T01-H1-X1-N{i}", "name": f"Thôn {i}", "parent": "T01-H1-X1"})
            assert status == 201
        status, _ = await srv.call("tinh", "POST", "/api/v1/auth/password",
                                   json={"current": "sai", "new": "mat-khau-moi-1"})
        assert status == 403  # refused: audited with tinh's area, the province
        status, out = await srv.call("qtv1", "GET", "/api/v1/audit?action=area.create&limit=2")
        assert status == 200 and out["more"] is True, out
        assert [e["target"] for e in out["entries"]] == ["T01-H1-X1-N2", "T01-H1-X1-N1"]
        status, out = await srv.call(
            "qtv1", "GET", f"/api/v1/audit?action=area.create&limit=2&before={out['next']}")
        assert [e["target"] for e in out["entries"]] == ["T01-H1-X1-N0"] and not out["more"]
        status, out = await srv.call("qtv1", "GET", "/api/v1/audit")
        assert all(e["user"] != "tinh" for e in out["entries"])  # the province is above
        status, out = await srv.call("tinh", "GET", "/api/v1/audit?user=tinh")
        assert status == 403  # an operator, not an admin
        for bad in ("limit=0", "limit=x", "before=-1", "from=yesterday"):
            status, out = await srv.call("qtv1", "GET", f"/api/v1/audit?{bad}")
            assert status == 422, (bad, out)


async def test_reports_filter_by_class_name_the_areas_and_stay_in_scope(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv:
        status, b = await srv.call("tinh", "POST", "/api/v1/broadcasts", json={
            "text": "Thông báo", "targets": ["T01-H1-X1"], "class": "priority"})
        assert status == 201, b
        srv.run(1.0)
        status, _ = await srv.call("tinh", "DELETE", f"/api/v1/broadcasts/{b['id']}")
        srv.run(0.2)
        status, out = await srv.call("xa11", "GET", "/api/v1/reports/asrun?class=priority")
        assert status == 200 and [e["area_name"] for e in out["entries"]] == ["Xã 1 huyện 1"]
        status, out = await srv.call("xa11", "GET", "/api/v1/reports/asrun?class=normal")
        assert out["entries"] == []
        status, out = await srv.call("xa11", "GET", "/api/v1/reports/summary")
        assert out["names"] == {"T01-H1-X1": "Xã 1 huyện 1"}
        assert list(out["hours"]["T01-H1-X1"]) == ["priority"]
        status, out = await srv.call("xa11", "GET", "/api/v1/reports/asrun?class=loud")
        assert status == 422 and out["field"] == "class"
        status, out = await srv.call("xa11", "GET", "/api/v1/reports/summary?area=T01-H1-X2")
        assert status == 403, out


# ---- the screens in Chromium -----------------------------------------------------------------
async def air(srv: Srv, area: str, klass: str, seconds: float) -> str:
    status, b = await srv.call("tinh", "POST", "/api/v1/broadcasts", json={
        "text": f"Thông báo {klass}", "targets": [area], "class": klass})
    assert status == 201, b
    srv.run(seconds)
    status, _ = await srv.call("tinh", "DELETE", f"/api/v1/broadcasts/{b['id']}")
    assert status in (204, 404)  # stopped, or the spoken text had ended by itself
    srv.run(0.2)
    return str(b["id"])


async def test_reports_rows_charts_filters_and_the_csv_download(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv, chromium() as browser:
        page = await phone(browser, accept_downloads=True)
        await login(page, f"{srv.base}/", "huyen1")
        await page.click("nav.screens >> text=Báo cáo")
        await expect(page.locator("main h1")).to_have_text("Báo cáo")
        await expect(page.locator("main")).to_contain_text("Không có gì được phát trong khoảng này")

        # something airs: the rows come with the on-air events, no reload
        normal = await air(srv, "T01-H1-X1", "normal", 2.0)
        priority = await air(srv, "T01-H1-X2", "priority", 1.0)
        rows = page.locator("table.asrun tbody tr")
        await expect(rows).to_have_count(2)
        await expect(page.locator(f"tr[data-broadcast='{normal}']")).to_contain_text("Xã 1 huyện 1")
        await expect(page.locator(f"tr[data-broadcast='{priority}']")).to_contain_text("ưu tiên")

        # the charts' numbers are the API's summary for the same filters
        href = await page.locator("a.csv").get_attribute("href")
        assert href is not None and href.endswith("&format=csv")
        query = href.split("?", 1)[1].removesuffix("&format=csv")
        status, summary = await srv.call("huyen1", "GET", f"/api/v1/reports/summary?{query}")
        assert status == 200 and set(summary["hours"]) == {"T01-H1-X1", "T01-H1-X2"}
        await expect(page.locator("svg.hours rect")).to_have_count(2)
        for area, classes in summary["hours"].items():
            for klass, hours in classes.items():
                bar = page.locator(f"svg.hours g[data-area={area}] rect[data-class={klass}]")
                assert float(await bar.get_attribute("data-hours") or "nan") == hours
                await expect(bar.locator("title")).to_contain_text(summary["names"][area])
        days = page.locator("svg.days rect")
        assert [int(await days.nth(i).get_attribute("data-count") or -1)
                for i in range(await days.count())] == list(summary["bulletins_per_day"].values())
        await expect(page.locator("table.numbers.hours tbody tr")).to_have_count(2)
        await shots(page, "reports")

        # the CSV from the page is the API's, byte for byte
        async with page.expect_download() as info:
            await page.click("a.csv")
        download = await info.value
        got = Path(await download.path()).read_bytes()
        async with srv.http.get(f"{srv.base}{href}", headers={
                "Authorization": f"Bearer {await srv.login('huyen1')}"}) as r:
            assert r.status == 200
            assert got == await r.read()
        assert normal in got.decode() and priority in got.decode()

        # filters: one class; a date that does not exist is refused under its field
        await page.select_option("#report-class", "priority")
        await page.click("form.report-filters button[type=submit]")
        await expect(rows).to_have_count(1)
        await expect(rows.first).to_have_attribute("data-broadcast", priority)
        await expect(page.locator("a.csv")).to_have_attribute("href", re.compile("class=priority"))
        await page.fill("#from", "31/02/2026")
        await page.click("form.report-filters button[type=submit]")
        await expect(page.locator("#from-error")).to_have_text("ngày phải có dạng dd/mm/yyyy")
        await shots(page, "reports-filtered")

        # a commune forcing its sibling's report: the server's 403, in Vietnamese
        other = await phone(browser)
        await login(other, f"{srv.base}/", "xa11")
        await other.goto(f"{srv.base}/#/reports/T01-H1-X2")
        await expect(other.locator("main .error[role=alert]")).to_contain_text(
            "khu vực T01-H1-X2 ngoài phạm vi của bạn")


async def test_admin_users_areas_and_audit_in_chromium(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv, chromium() as browser:
        page = await phone(browser)
        dialogs: list[str] = []
        page.on("dialog", lambda d: dialogs.append(d.message))
        await login(page, f"{srv.base}/", "qtv1")
        await page.click("nav.screens >> text=Quản trị")
        await expect(page.locator("main h1")).to_have_text("Quản trị")
        await expect(page.locator("li[data-username=xa11]")).to_be_visible()
        assert await page.locator("li[data-username=huyen2]").count() == 0  # another district

        # create a commune user (password generated, shown once)
        await page.fill("#username", "xa13moi")
        await page.select_option("#new-role", "operator")
        await page.fill("#area", "T01-H1-X3")
        await page.click("form.new-user button[type=submit]")
        created = page.locator("form.new-user .ok code")
        await expect(created).to_have_count(1)
        secret = await created.text_content()
        async with srv.http.post(f"{srv.base}/api/v1/auth/token", json={
                "username": "xa13moi", "password": secret}) as r:
            assert r.status == 201
        row = page.locator("li[data-username=xa13moi]")
        uid = await user_id(srv, "xa13moi")
        assert (await srv.node.store.get("user", uid))["area"] == "T01-H1-X3"

        # change the role, disable
        async with page.expect_response(lambda r: r.request.method == "PATCH") as answer:
            await page.select_option(f"#role-{uid}", "viewer")
        assert (await answer.value).status == 200
        assert (await srv.node.store.get("user", uid))["role"] == "viewer"
        await row.locator("button.disable").click()
        await expect(row.locator(".state")).to_have_text("đã khoá")
        assert (await srv.node.store.get("user", uid))["disabled"] is True

        # reset xa11's password: the new one logs in, the old token is refused
        assert (await srv.call("xa11", "GET", "/api/v1/me"))[0] == 200
        xa11 = page.locator("li[data-username=xa11]")
        await xa11.locator("button.reset").click()
        new = await xa11.locator(".secret code").text_content()
        assert new and (await srv.call("xa11", "GET", "/api/v1/me"))[0] == 401
        async with srv.http.post(f"{srv.base}/api/v1/auth/token", json={
                "username": "xa11", "password": new}) as r:
            assert r.status == 201

        # the emergency right it may not grant: disabled with the reason; forced, the 403 shows
        box = page.locator("#emergency")
        await expect(box).to_be_disabled()
        await expect(page.locator("#emergency-why")).to_contain_text("không có quyền khẩn cấp")
        await page.fill("#username", "ke-gian")
        await page.fill("#area", "T01-H1-X1")
        await page.evaluate("document.getElementById('emergency').disabled = false")
        await box.check()
        await page.click("form.new-user button[type=submit]")
        await expect(page.locator("#emergency-error")).to_have_text("không thể cấp quyền khẩn cấp")
        # and a user outside its subtree: the 403 under the area field
        await page.evaluate("document.getElementById('emergency').checked = false")
        await page.fill("#area", "T01-H2-X1")
        await page.click("form.new-user button[type=submit]")
        await expect(page.locator("#area-error")).to_contain_text("ngoài phạm vi")
        assert not await srv.node.store.find("user", username="ke-gian")
        await shots(page, "admin-users")

        # areas: a CSV with bad rows shows each row's error and stores nothing
        status, areas_before = await srv.call("qtv1", "GET", "/api/v1/areas")
        await page.click("nav.tabs >> text=Khu vực")
        await page.set_input_files("#csv-file", files=[{
            "name": "xa.csv", "mimeType": "text/csv", "buffer": BAD_CSV.encode()}])
        problems = page.locator("table.problems tbody tr")
        await expect(problems).to_have_count(5)
        await expect(page.locator("table.problems tr[data-line='4']")).to_contain_text("NOWHERE")
        await expect(page.locator("table.problems caption")).to_have_text("5 lỗi, chưa nhập gì")
        assert await page.locator("button.do-import").count() == 0
        assert (await srv.call("qtv1", "GET", "/api/v1/areas"))[1] == areas_before
        await shots(page, "admin-import-errors")
        # a good one: what would be imported, then imported
        await page.set_input_files("#csv-file", files=[{
            "name": "xa.csv", "mimeType": "text/csv", "buffer": GOOD_CSV.encode()}])
        await expect(page.locator(".import [role=status]")).to_have_text("Tệp hợp lệ: 2 khu vực mới")
        await page.click("button.do-import")
        await expect(page.locator(".import .ok")).to_have_text("Đã nhập 2 khu vực")
        await expect(page.locator(".area-tree li[data-code=T01-H1-X1-T2]")).to_have_count(1)
        assert srv.node.tree.get("T01-H1-X1-T2").parent == "T01-H1-X1-T1"
        await shots(page, "admin-areas")

        # the audit log lists these actions, newest first; filtered by action
        await page.click("nav.tabs >> text=Nhật ký thao tác")
        for action in ("user.create", "user.update", "user.password_reset", "area.import",
                       "refused"):
            await expect(page.locator(f"ol.audit li[data-action='{action}']").first).to_be_visible()
        await page.fill("#action", "user.update")
        await page.click("form.audit-filters button[type=submit]")
        await expect(page.locator("ol.audit li")).to_have_count(2)  # role, then disabled
        await shots(page, "admin-audit")
        assert dialogs == []

        # a commune operator: no admin screen, and the API's 403 if forced
        other = await phone(browser)
        await login(other, f"{srv.base}/", "xa12")
        await expect(other.locator("nav.screens")).not_to_contain_text("Quản trị")
        await other.goto(f"{srv.base}/#/admin/users")
        await expect(other.locator("main[data-screen=admin] .error[role=alert]")).to_have_text(
            "Chỉ quản trị viên mới mở được màn hình này")
        refusal = await other.evaluate("""import('/console/static/api.js').then(m =>
            m.api('GET', '/api/v1/users').then(() => 'allowed', e => `${e.status} ${e.message}`))""")
        assert refusal.startswith("403 "), refusal


async def test_reports_and_admin_have_no_serious_accessibility_violation(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv, chromium() as browser:
        await air(srv, "T01-H1-X1", "normal", 1.0)
        status, _ = await srv.call("qtv1", "POST", "/api/v1/areas", json={
            "code": "T01-H1-X1-T9", "name": "Thôn 9", "parent": "T01-H1-X1"})  # audited
        assert status == 201
        page = await phone(browser, bypass_csp=True)  # axe is injected as a script
        await login(page, f"{srv.base}/", "qtv1")
        await page.goto(f"{srv.base}/#/reports")
        await expect(page.locator("table.asrun tbody tr")).to_have_count(1)
        await page.locator("details").first.click()
        assert await axe_violations(page) == [], "reports"
        await page.goto(f"{srv.base}/#/admin/users")
        await expect(page.locator("li[data-username=xa11]")).to_be_visible()
        assert await axe_violations(page) == [], "admin users"
        await page.goto(f"{srv.base}/#/admin/areas")
        await page.set_input_files("#csv-file", files=[{
            "name": "xa.csv", "mimeType": "text/csv", "buffer": BAD_CSV.encode()}])
        await expect(page.locator("table.problems tbody tr")).to_have_count(5)
        assert await axe_violations(page) == [], "admin areas"
        await page.goto(f"{srv.base}/#/admin/audit")
        await expect(page.locator("ol.audit li").first).to_be_visible()
        assert await axe_violations(page) == [], "admin audit"
