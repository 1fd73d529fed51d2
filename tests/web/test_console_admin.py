"""Reports (as-run, charts, CSV) and administration (users, area import, audit log): the API
they use, then the screens in Debian's Chromium against a real node (issue 11, screens 10-11)."""

from __future__ import annotations

from pathlib import Path

from tests.emergencynode import Srv, live_config, serving

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
