"""GET /api/v1/overview: one level of the tree, scoped to the caller, with on-air and devices."""

from __future__ import annotations

import pytest

from tests.apiclient import approved_programme, make_config, running_api, tone_file


@pytest.fixture
async def api(tmp_path):
    async with running_api(make_config(tmp_path, max_mb=1, max_seconds=600)) as a:
        yield a


async def test_district_sees_its_communes_on_air_and_devices(api, tmp_path):
    tone = tone_file(tmp_path / "tone.wav", 440, 3)
    prog = await approved_programme(api, tone, author="huyen1", approver="duyet1")
    status, b = await api.call("huyen1", "POST", "/api/v1/broadcasts",
                               json={"programme": prog, "targets": ["T01-H1-X1"]})
    assert status == 201, b
    for area in ("T01-H1-X1", "T01-H1-X1", "T01-H1-X2"):
        status, dev = await api.call("qtv1", "POST", "/api/v1/devices", json={
            "name": "Cụm loa", "kind": "loudspeaker", "area": area})
        assert status == 201, dev
    api.run(0.2)
    status, body = await api.call("huyen1", "GET", "/api/v1/overview")
    assert status == 200, body
    assert body["root"]["code"] == "T01-H1"
    assert [a["code"] for a in body["root"]["path"]] == ["T01", "T01-H1"]
    assert body["root"]["devices"]["total"] == 3
    rows = {r["code"]: r for r in body["children"]}
    assert set(rows) == {c for c in api.node.tree.get("T01-H1").children}
    x1, x2 = rows["T01-H1-X1"], rows["T01-H1-X2"]
    assert x1["on_air"]["broadcast"] == b["id"] and x2["on_air"] is None
    assert x1["devices"] == {"online": 0, "offline": 2, "fault": 0, "total": 2}
    assert x2["devices"]["total"] == 1 and x1["children"] == 0
    assert len(body["faults"]) == 3 and all(f["status"] == "offline" for f in body["faults"])
    assert body["emergencies"] == [] and body["today"] == []


async def test_commune_cannot_see_its_district_and_unknown_is_404(api):
    status, body = await api.call("xa11", "GET", "/api/v1/overview?root=T01-H1")
    assert status == 403, body
    status, body = await api.call("xa11", "GET", "/api/v1/overview?root=T01-H1-X2")
    assert status == 403
    status, body = await api.call("huyen1", "GET", "/api/v1/overview?root=KHONG-CO")
    assert status == 404 and body["field"] == "root"
    status, body = await api.call("xa11", "GET", "/api/v1/overview")
    assert status == 200 and body["root"]["code"] == "T01-H1-X1" and body["children"] == []


async def test_area_name_comes_back_literally(api):
    name = "<script>alert(1)</script> Thôn Đông"
    status, body = await api.call("qtv1", "POST", "/api/v1/areas", json={
        "code": "T01-H1-X1-T1", "name": name, "level": "village", "parent": "T01-H1-X1"})
    assert status == 201, body
    r = await api.client.get("/api/v1/overview?root=T01-H1-X1", headers=api.auth("xa11"))
    assert r.headers["Content-Type"].startswith("application/json")
    body = await r.json()
    assert body["children"][0]["name"] == name and body["root"]["children"] == 1
