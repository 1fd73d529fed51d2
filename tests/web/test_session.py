"""The console's cookie session: flags, CSRF on writes, logout, password change, no token in logs."""

from __future__ import annotations

import logging

import pytest

from tests.apiclient import PASSWORD, make_config, running_api


@pytest.fixture
async def api(tmp_path):
    async with running_api(make_config(tmp_path)) as a:
        yield a


async def start_session(api, who: str = "xa11", password: str = PASSWORD):
    api.client.session.cookie_jar.clear()
    r = await api.client.post("/api/v1/auth/session", json={"username": who, "password": password})
    return r


async def test_session_cookie_flags_and_body(api):
    r = await start_session(api)
    assert r.status == 200
    body = await r.json()
    assert body["user"]["username"] == "xa11" and "password" not in body["user"]
    assert body["area"]["code"] == "T01-H1-X1"
    assert [a["code"] for a in body["area"]["path"]] == ["T01", "T01-H1", "T01-H1-X1"]
    assert "air" in body["rights"] and "admin" not in body["rights"]
    header = r.headers["Set-Cookie"]
    parts = [p.strip() for p in header.split(";")]
    assert parts[0].startswith("loa_session=") and len(parts[0]) > 30
    assert "HttpOnly" in parts and "SameSite=Strict" in parts and "Path=/" in parts
    assert f"Max-Age={12 * 3600}" in parts and "Secure" not in parts
    r = await api.client.get("/api/v1/auth/me")
    me = await r.json()
    assert r.status == 200 and me["csrf"] == body["csrf"] and me["user"]["username"] == "xa11"


async def test_wrong_password_is_401_vietnamese_first(api):
    r = await start_session(api, password="sai-mat-khau")
    assert r.status == 401
    assert (await r.json())["error"].startswith("sai tên đăng nhập")
    assert "loa_session" not in r.cookies


async def test_cookie_write_needs_the_csrf_header(api):
    csrf = (await (await start_session(api, "qtv1")).json())["csrf"]
    new = {"username": "moi1", "role": "viewer", "area": "T01-H1-X1", "password": PASSWORD}
    for headers in ({}, {"X-CSRF-Token": "forged"}):
        r = await api.client.post("/api/v1/users", json=new, headers=headers)
        assert r.status == 403
        assert (await r.json())["error"].startswith("thiếu hoặc sai mã")
        assert not await api.node.store.find("user", username="moi1")
    r = await api.client.post("/api/v1/users", json=new, headers={"X-CSRF-Token": csrf})
    assert r.status == 201, await r.text()
    assert await api.node.store.find("user", username="moi1")


async def test_bearer_needs_no_csrf_and_me_has_null_csrf(api):
    api.client.session.cookie_jar.clear()
    status, body = await api.call("xa11", "GET", "/api/v1/auth/me")
    assert status == 200 and body["csrf"] is None
    status, _ = await api.call("qtv1", "POST", "/api/v1/users", json={
        "username": "moi2", "role": "viewer", "area": "T01-H1-X1", "password": PASSWORD})
    assert status == 201


async def test_logout_ends_the_cookie(api):
    csrf = (await (await start_session(api)).json())["csrf"]
    cookie = api.client.session.cookie_jar.filter_cookies(api.client.make_url("/"))["loa_session"]
    r = await api.client.delete("/api/v1/auth/session", headers={"X-CSRF-Token": csrf})
    assert r.status == 204
    assert "Max-Age=0" in r.headers["Set-Cookie"]
    r = await api.client.get("/api/v1/auth/me", cookies={"loa_session": cookie.value})
    assert r.status == 401


async def test_password_change_ends_other_sessions(api):
    other = api.tokens["xa11"]
    csrf = (await (await start_session(api)).json())["csrf"]
    h = {"X-CSRF-Token": csrf}
    r = await api.client.post("/api/v1/auth/password", headers=h,
                              json={"current": "sai-mat-khau", "new": "mat-khau-moi-1"})
    assert r.status == 403 and (await r.json())["field"] == "current"
    r = await api.client.post("/api/v1/auth/password", headers=h,
                              json={"current": PASSWORD, "new": "ngan"})
    assert r.status == 422 and (await r.json())["field"] == "new"
    r = await api.client.post("/api/v1/auth/password", headers=h,
                              json={"current": PASSWORD, "new": "mat-khau-moi-1"})
    assert r.status == 204
    assert (await api.client.get("/api/v1/auth/me")).status == 200  # this session stays
    r = await api.client.get("/api/v1/me", headers={"Authorization": f"Bearer {other}"})
    assert r.status == 401
    audit = await api.node.store.read_log("audit")
    assert any(a["action"] == "password.change" for a in audit)


async def test_session_token_never_logged(api, caplog):
    caplog.set_level(logging.DEBUG)
    r = await start_session(api)
    token = r.cookies["loa_session"].value
    await api.client.get("/api/v1/auth/me")
    await api.client.post("/api/v1/users", json={})  # refused: no csrf, audited
    await api.client.delete("/api/v1/auth/session")
    assert token not in caplog.text
    assert all(token not in str(a) for a in await api.node.store.read_log("audit"))
