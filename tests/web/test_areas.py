"""GET /api/v1/areas for a large tree: one level (`parent=`), a search (`q=`, diacritics and case
ignored), the whole subtree revalidated by ETag and refreshed after a change; all scoped."""

from __future__ import annotations

from tests.apiclient import make_config, running_api


async def test_one_level_search_and_the_cached_whole_subtree_stay_in_scope(tmp_path):
    async with running_api(make_config(tmp_path)) as api:
        status, level = await api.call("tinh", "GET", "/api/v1/areas?parent=T01")
        assert status == 200
        assert [a["code"] for a in level["areas"]] == ["T01-H1", "T01-H2"]
        status, body = await api.call("xa11", "GET", "/api/v1/areas?parent=T01-H1")
        assert status == 403, body  # above the commune: not its subtree
        status, body = await api.call("tinh", "GET", "/api/v1/areas?parent=NOPE")
        assert status == 404, body

        # "xa 1 huyen 1" finds "Xã 1 huyện 1"; a district sees only its own branch
        status, found = await api.call("tinh", "GET", "/api/v1/areas?q=xa%201%20huyen%201")
        assert status == 200 and [a["code"] for a in found["areas"]] == ["T01-H1-X1"]
        assert [p["code"] for p in found["areas"][0]["path"]] == ["T01", "T01-H1", "T01-H1-X1"]
        status, found = await api.call("huyen2", "GET", "/api/v1/areas?q=huyen%201")
        assert status == 200 and found["areas"] == []
        status, found = await api.call("tinh", "GET", "/api/v1/areas?q=T01-H&limit=1")
        assert [a["code"] for a in found["areas"]] == ["T01-H1"] and found["more"] is True
        for bad in ("q=", "q=x&limit=0", "q=x&limit=501", "q=x&limit=abc", "q=" + "x" * 101):
            status, body = await api.call("tinh", "GET", f"/api/v1/areas?{bad}")
            assert status == 422, (bad, body)

        # the whole subtree: 304 on its ETag until the tree changes
        r = await api.client.get("/api/v1/areas", headers=api.auth("huyen1"))
        tag = r.headers["ETag"]
        assert {a["code"] for a in (await r.json())["areas"]} == {
            "T01-H1", "T01-H1-X1", "T01-H1-X2", "T01-H1-X3"}
        r = await api.client.get("/api/v1/areas",
                                 headers={**api.auth("huyen1"), "If-None-Match": tag})
        assert r.status == 304
        status, _ = await api.call("qtv1", "POST", "/api/v1/areas", json={
            "code": "T01-H1-X9", "name": "Xã mới", "parent": "T01-H1"})
        assert status == 201
        r = await api.client.get("/api/v1/areas",
                                 headers={**api.auth("huyen1"), "If-None-Match": tag})
        assert r.status == 200 and r.headers["ETag"] != tag
        assert "T01-H1-X9" in {a["code"] for a in (await r.json())["areas"]}
        r = await api.client.get("/api/v1/areas",
                                 headers={**api.auth("huyen2"), "If-None-Match": tag})
        assert r.status == 200  # another root's tag never matches
