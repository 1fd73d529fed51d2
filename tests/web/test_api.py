"""The REST API from the outside: rights, scopes, validation, uploads, the editorial check."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loa.web.http import PUBLIC
from loa.web.openapi import document
from tests.apiclient import (
    PASSWORD,
    Api,
    approved_programme,
    make_config,
    media_id,
    running_api,
    tone_file,
)


@pytest.fixture
async def api(tmp_path):
    async with running_api(make_config(tmp_path, max_mb=1, max_seconds=600)) as a:
        yield a


@pytest.fixture
def tone(tmp_path) -> Path:
    return tone_file(tmp_path / "tone.wav", 440, 3)


# ---- authentication -------------------------------------------------------------------------
def documented_operations() -> list[tuple[str, str]]:
    ops = []
    for path, item in document()["paths"].items():
        for method in ("get", "post", "patch", "delete"):
            if method in item:
                ops.append((method.upper(), re.sub(r"\{[^}]+\}", "x1", path)))
    return ops


async def test_every_operation_but_login_needs_a_token(api):
    for method, path in documented_operations():
        if (method, path) in PUBLIC:
            continue
        status, body = await api.call(None, method, path)
        assert status == 401, (method, path, status)
        assert "error" in body
        r = await api.client.request(method, path, headers={"Authorization": "Bearer forged"})
        assert r.status == 401, (method, path)


async def test_login_wrong_password_then_rate_limited(api):
    for _ in range(5):
        r = await api.client.post("/api/v1/auth/token",
                                  json={"username": "xa12", "password": "sai-mat-khau"})
        assert r.status == 401
    r = await api.client.post("/api/v1/auth/token",
                              json={"username": "xa12", "password": PASSWORD})
    assert r.status == 429 and int(r.headers["Retry-After"]) > 0


async def test_revoked_token_is_refused(api):
    status, _ = await api.call("xem11", "GET", "/api/v1/me")
    assert status == 200
    status, _ = await api.call("xem11", "DELETE", "/api/v1/auth/token")
    assert status == 204
    status, _ = await api.call("xem11", "GET", "/api/v1/me")
    assert status == 401


async def test_disabled_user_loses_access_at_once(api):
    node = api.node
    u = (await node.store.find("user", username="xa12"))[0]
    token = await api.login("qtv1")
    assert token
    status, body = await api.call("qtv1", "PATCH", f"/api/v1/users/{u['id']}",
                                  json={"disabled": True})
    assert status == 200, body
    status, _ = await api.call("xa12", "GET", "/api/v1/me")
    assert status == 401


# ---- rights and scopes -----------------------------------------------------------------------
async def test_viewer_cannot_write_anything(api, tone):
    mid = await media_id(api, tone)
    writes = [
        ("POST", "/api/v1/broadcasts", {"json": {"media": mid, "targets": ["T01-H1-X1"]}}),
        ("POST", "/api/v1/programmes", {"json": {"title": "t", "type": "file", "media": mid}}),
        ("POST", "/api/v1/schedules", {"json": {"programme": "p", "targets": ["T01-H1-X1"],
                                                "kind": "daily", "time": "05:00"}}),
        ("POST", "/api/v1/areas", {"json": {"code": "X9", "name": "x", "parent": "T01-H1-X1"}}),
        ("POST", "/api/v1/users", {"json": {"username": "u", "role": "viewer",
                                            "area": "T01-H1-X1"}}),
        ("POST", "/api/v1/tts", {"json": {"text": "xin chào"}}),
        ("DELETE", f"/api/v1/media/{mid}", {}),
    ]
    for method, path, kw in writes:
        status, body = await api.call("xem11", method, path, **kw)
        assert status == 403, (path, status, body)
    status, body = await api.upload("xem11", tone)
    assert status == 403


async def test_commune_operator_cannot_target_another_commune(api, tone):
    mid = await media_id(api, tone, "tinh")
    status, body = await api.call("xa11", "POST", "/api/v1/broadcasts",
                                  json={"media": mid, "targets": ["T01-H1-X2"]})
    assert status == 403, body
    status, body = await api.call("xa11", "POST", "/api/v1/broadcasts",
                                  json={"media": mid, "targets": ["T01-H1"]})
    assert status == 403  # its own district is above it, not inside it
    assert await api.node.store.count("broadcast") == 0


async def test_commune_operator_cannot_stop_a_district_broadcast(api, tone):
    prog = await approved_programme(api, tone, author="huyen1", approver="duyet1")
    status, b = await api.call("huyen1", "POST", "/api/v1/broadcasts",
                               json={"programme": prog, "targets": ["T01-H1"]})
    assert status == 201, b
    api.run(0.2)
    status, body = await api.call("xa11", "DELETE", f"/api/v1/broadcasts/{b['id']}")
    assert status == 403, body
    status, body = await api.call("huyen2", "DELETE", f"/api/v1/broadcasts/{b['id']}")
    assert status == 403  # a sibling district is not above it
    api.run(0.2)
    assert api.node.engine.on_air("T01-H1-X1")["broadcast"] == b["id"]
    status, _ = await api.call("tinh", "DELETE", f"/api/v1/broadcasts/{b['id']}")
    assert status == 204
    api.run(0.2)
    assert api.node.engine.on_air("T01-H1-X1")["broadcast"] is None


async def test_only_the_emergency_right_issues_emergency(api, tone):
    mid = await media_id(api, tone, "tinh")
    status, body = await api.call("huyen1", "POST", "/api/v1/broadcasts",
                                  json={"media": mid, "targets": ["T01-H1"],
                                        "class": "emergency"})
    assert status == 403, body
    status, body = await api.call("tinh", "POST", "/api/v1/broadcasts",
                                  json={"media": mid, "targets": ["T01"], "class": "emergency"})
    assert status == 201, body


async def test_editorial_check_only_approved_programmes_air(api, tone):
    mid = await media_id(api, tone, "bientap11")
    status, prog = await api.call("bientap11", "POST", "/api/v1/programmes",
                                  json={"title": "Bản tin", "type": "file", "media": mid})
    assert status == 201 and prog["status"] == "draft"
    # An editor cannot air at all; an operator cannot air a draft.
    status, _ = await api.call("bientap11", "POST", "/api/v1/broadcasts",
                               json={"programme": prog["id"], "targets": ["T01-H1-X1"]})
    assert status == 403
    status, body = await api.call("xa11", "POST", "/api/v1/broadcasts",
                                  json={"programme": prog["id"], "targets": ["T01-H1-X1"]})
    assert status == 409 and body["field"] == "programme"
    # Nor media directly: that needs the right to air unapproved content.
    status, _ = await api.call("xa11", "POST", "/api/v1/broadcasts",
                               json={"media": mid, "targets": ["T01-H1-X1"]})
    assert status == 403
    await api.call("bientap11", "POST", f"/api/v1/programmes/{prog['id']}/submit")
    # An approver of another district cannot approve it.
    status, _ = await api.call("duyet2", "POST", f"/api/v1/programmes/{prog['id']}/approve")
    assert status in (403, 404)
    status, body = await api.call("duyet1", "POST", f"/api/v1/programmes/{prog['id']}/reject",
                                  json={"reason": "Sai chính tả"})
    assert status == 200 and body["status"] == "rejected" and body["reason"] == "Sai chính tả"
    await api.call("bientap11", "POST", f"/api/v1/programmes/{prog['id']}/submit")
    status, body = await api.call("duyet1", "POST", f"/api/v1/programmes/{prog['id']}/approve")
    assert status == 200 and body["status"] == "approved"
    status, b = await api.call("xa11", "POST", "/api/v1/broadcasts",
                               json={"programme": prog["id"], "targets": ["T01-H1-X1"]})
    assert status == 201, b
    api.run(0.1)
    assert api.node.engine.on_air("T01-H1-X1")["broadcast"] == b["id"]


# ---- validation: 422 with the field named, nothing stored -----------------------------------
@pytest.mark.parametrize("change,field", [
    ({"until": "2026-11-01", "from": "2026-12-01"}, "until"),
    ({"kind": "weekly", "weekdays": ["mon", "funday"]}, "weekdays"),
    ({"targets": ["T01-H9-X9"]}, "targets"),
    ({"targets": []}, "targets"),
    ({"class": "urgent"}, "class"),
    ({"time": "25:61"}, "time"),
    ({"kind": "sometimes"}, "kind"),
])
async def test_bad_schedules_get_422_naming_the_field(api, tone, change, field):
    prog = await approved_programme(api, tone)
    before = await api.node.store.count("schedule")
    body = {"programme": prog, "targets": ["T01-H1-X1"], "kind": "daily", "time": "05:00",
            **change}
    status, out = await api.call("xa11", "POST", "/api/v1/schedules", json=body)
    assert status == 422, out
    assert out["field"] == field
    assert await api.node.store.count("schedule") == before


@pytest.mark.parametrize("body,field", [
    ({"targets": ["NOPE"], "text": "x"}, "targets"),
    ({"targets": [], "text": "x"}, "targets"),
    ({"targets": "T01-H1-X1", "text": "x"}, "targets"),
    ({"targets": ["T01-H1-X1"], "text": "x", "class": "loud"}, "class"),
    ({"targets": ["T01-H1-X1"]}, "media"),
    ({"targets": ["T01-H1-X1"], "media": "nope", "text": "x"}, "media"),
    ({"targets": ["T01-H1-X1"], "text": "x", "policy": "sometimes"}, "policy"),
])
async def test_bad_broadcasts_get_422_naming_the_field(api, body, field):
    status, out = await api.call("tinh", "POST", "/api/v1/broadcasts", json=body)
    assert status == 422, out
    assert out["field"] == field
    assert await api.node.store.count("broadcast") == 0


async def test_malformed_and_oversized_json(api):
    r = await api.client.post("/api/v1/broadcasts", data=b"{not json",
                              headers={**api.auth("tinh"), "Content-Type": "application/json"})
    assert r.status == 400
    r = await api.client.post("/api/v1/broadcasts", data=b"[1,2]",
                              headers={**api.auth("tinh"), "Content-Type": "application/json"})
    assert r.status == 400
    r = await api.client.post("/api/v1/broadcasts", data=b"x" * 300_000,
                              headers={**api.auth("tinh"), "Content-Type": "application/json"})
    assert r.status == 413
    r = await api.client.post("/api/v1/broadcasts", data=b"targets=x",
                              headers={**api.auth("tinh"), "Content-Type": "text/plain"})
    assert r.status == 415


# ---- uploads --------------------------------------------------------------------------------
def no_temp_files(api: Api) -> bool:
    return not any(api.node.library.tmp.iterdir())


async def test_upload_is_decoded_normalised_and_stored_once(api, tone, tmp_path):
    status, m = await api.upload("xa11", tone, "Chuông")
    assert status == 201, m
    assert m["title"] == "Chuông" and abs(m["duration"] - 3.0) < 0.05
    assert m["lufs"] is not None and m["gain_db"] is not None
    assert api.node.library.pcm_path(m["sha256"]).exists()
    status, again = await api.upload("xa11", tone, "Chuông lần 2")
    assert status == 201 and again["id"] != m["id"]  # a record per upload, with its title
    assert again["title"] == "Chuông lần 2" and again["sha256"] == m["sha256"]
    assert await api.node.store.count("media") == 2
    assert len(list(api.node.library.root.glob("*/*.s16"))) == 1  # the audio stored once
    assert no_temp_files(api)


async def test_bad_uploads_are_refused_and_leave_nothing(api, tone, tmp_path):
    good = tone.read_bytes()
    mp3 = tone_file(tmp_path / "long.mp3", 440, 3)
    bad = {
        "text.mp3": (b"day khong phai am thanh " * 200, 422),
        "truncated.mp3": (mp3.read_bytes()[: len(mp3.read_bytes()) // 2], 422),
        "empty.wav": (b"", 422),
        "big.wav": (good[:44] + os.urandom(1_200_000), 413),  # over the 1 MiB test limit
    }
    # A decompression bomb: 20 minutes of FLAC silence in a few KB, over the 600 s limit.
    bomb = tmp_path / "bomb.flac"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "anullsrc=r=8000:cl=mono", "-t", "1200", "-c:a", "flac", str(bomb)],
                   check=True)
    assert bomb.stat().st_size < 1_000_000
    bad["bomb.flac"] = (bomb.read_bytes(), 413)
    for name, (content, expect) in bad.items():
        p = tmp_path / name
        p.write_bytes(content)
        status, body = await api.upload("xa11", p)
        assert status == expect, (name, status, body)
        assert body["field"] == "file" if status != 413 or "field" in body else True
    assert await api.node.store.count("media") == 0
    assert no_temp_files(api)
    assert not list((api.node.library.root).glob("*/*.s16"))
    r = await api.client.post("/api/v1/media", data=b"abc",
                              headers={**api.auth("xa11"), "Content-Type": "audio/mpeg"})
    assert r.status == 415


# ---- broadcasts, on air, as-run --------------------------------------------------------------
async def test_broadcast_on_air_listing_stop_and_asrun(api, tone):
    prog = await approved_programme(api, tone, author="huyen1", approver="duyet1")
    status, b = await api.call("huyen1", "POST", "/api/v1/broadcasts",
                               json={"programme": prog, "targets": ["T01-H1"]})
    assert status == 201
    api.run(1.0)
    status, listing = await api.call("xa11", "GET", "/api/v1/broadcasts")
    assert status == 200
    areas = {a["area"]: a for a in listing["areas"]}
    assert set(areas) == {"T01-H1-X1"}  # a commune sees its own area only
    assert areas["T01-H1-X1"]["broadcast"] == b["id"]
    assert areas["T01-H1-X1"]["class"] == "normal" and areas["T01-H1-X1"]["issuer"] == "T01-H1"
    # Two plays of 3 s with a 1.5 s gap = 7.5 s; then it ends by itself.
    api.run(8.0)
    await api.node.station.flush()
    assert api.node.engine.on_air("T01-H1-X2")["broadcast"] is None
    status, rep = await api.call("huyen1", "GET", "/api/v1/reports/asrun")
    assert status == 200
    rows = [r for r in rep["entries"] if r["broadcast"] == b["id"]]
    assert {r["area"] for r in rows} == {"T01-H1", "T01-H1-X1", "T01-H1-X2", "T01-H1-X3"}
    assert all(abs(r["seconds"] - 7.5) < 0.05 and r["end_cause"] == "finished" for r in rows)
    status, csv_text = await api.call("huyen1", "GET", "/api/v1/reports/asrun?format=csv")
    assert status == 200 and csv_text.count(b["id"]) == 4
    # The virtual clock runs ahead of the wall clock: ask up to an hour from now.
    status, summ = await api.call("huyen1", "GET",
                                  f"/api/v1/reports/summary?to={time.time() + 3600}")
    assert abs(summ["hours"]["T01-H1-X1"]["normal"] * 3600 - 7.5) < 0.05
    assert sum(summ["bulletins_per_day"].values()) == 1


async def test_shutdown_writes_the_queued_as_run_log(api, tone):
    prog = await approved_programme(api, tone, author="huyen1", approver="duyet1")
    status, b = await api.call("huyen1", "POST", "/api/v1/broadcasts",
                               json={"programme": prog, "targets": ["T01-H1"]})
    assert status == 201
    api.run(8.0)  # it ends by itself: its as-run entries are queued, not yet written
    await asyncio.sleep(0)  # the clock thread's hand-overs land on the loop
    await api.node.station.stop_writer()  # what a shutdown does, no flush before it
    rows = [r for r in await api.node.store.read_log("asrun") if r["broadcast"] == b["id"]]
    assert {r["area"] for r in rows} == {"T01-H1", "T01-H1-X1", "T01-H1-X2", "T01-H1-X3"}
    assert (await api.node.store.get("broadcast", b["id"]))["status"] == "ended"


async def test_shutdown_is_bounded_when_the_store_hangs(api, tone, monkeypatch, caplog):
    monkeypatch.setattr("loa.streamer.station.STOP_TIMEOUT", 0.2)
    released = asyncio.Event()

    async def stuck_append(kind, entry):  # a dead store whose client swallows cancellation
        while not released.is_set():
            try:
                await released.wait()
            except asyncio.CancelledError:
                continue
        return entry

    prog = await approved_programme(api, tone, author="huyen1", approver="duyet1")
    await api.call("huyen1", "POST", "/api/v1/broadcasts",
                   json={"programme": prog, "targets": ["T01-H1-X1"]})
    await api.node.station.flush()
    monkeypatch.setattr(api.node.store, "append", stuck_append)
    api.run(8.0)
    await asyncio.sleep(0)
    t0 = time.monotonic()
    await asyncio.wait_for(api.node.station.stop_writer(), 5.0)  # a regression fails, not hangs
    assert time.monotonic() - t0 < 2.0  # two bounded waits of 0.2 s
    assert "event=asrun_error" in caplog.text
    released.set()


async def test_text_bulletin_is_spoken_and_cached(api):
    for _ in range(2):
        status, b = await api.call("tinh", "POST", "/api/v1/broadcasts",
                                   json={"text": "Thông báo khẩn: bão số 5 đổ bộ",
                                         "targets": ["T01-H2"], "class": "emergency"})
        assert status == 201, b
    assert await api.node.store.count("media") == 1  # synthesised once


async def test_every_write_is_audited_with_who_and_where(api, tone):
    await media_id(api, tone, "xa11")
    entries = await api.node.store.read_log("audit")
    up = [e for e in entries if e["action"] == "media.upload"]
    assert up and up[0]["user"] == "xa11" and up[0]["area"] == "T01-H1-X1" and up[0]["ip"]


async def test_areas_create_import_scoped(api):
    status, body = await api.call("qtv1", "POST", "/api/v1/areas",
                                  json={"code": "T01-H1-X4", "name": "Xã 4", "level": "commune",
                                        "parent": "T01-H1"})
    assert status == 201, body
    status, _ = await api.call("qtv1", "POST", "/api/v1/areas",
                               json={"code": "T01-H2-X4", "name": "Xã", "parent": "T01-H2"})
    assert status == 403
    csv_ok = "code,name,level,parent_code\nT01-H1-X4-T1,Thôn 1,village,T01-H1-X4\n"
    r = await api.client.post("/api/v1/areas/import", data=csv_ok.encode(),
                              headers={**api.auth("qtv1"), "Content-Type": "text/csv"})
    assert r.status == 201, await r.text()
    csv_bad = "code,name,level,parent_code\nV1,Thôn,village,NOWHERE\n"
    r = await api.client.post("/api/v1/areas/import", data=csv_bad.encode(),
                              headers={**api.auth("qtv1"), "Content-Type": "text/csv"})
    assert r.status == 422 and "NOWHERE" in (await r.json())["error"]
    assert "V1" not in api.node.tree
    # The new village hears a district broadcast like its siblings.
    status, b = await api.call("tinh", "POST", "/api/v1/broadcasts",
                               json={"text": "Thử", "targets": ["T01-H1"], "class": "emergency"})
    api.run(0.2)
    assert api.node.engine.on_air("T01-H1-X4-T1")["broadcast"] == b["id"]


# ---- the document and the routes agree ------------------------------------------------------
async def test_openapi_documents_exactly_the_routes(api):
    r = await api.client.get("/api/v1/openapi.json")
    assert r.status == 200
    doc = await r.json()
    documented = {(m.upper(), p) for p, item in doc["paths"].items()
                  for m in item if m in ("get", "post", "patch", "delete")}
    routed = set()
    for route in api.client.app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        if path and path.startswith("/api/v1/") and route.method in (
                "GET", "POST", "PATCH", "DELETE") and path != "/api/v1/openapi.json":
            routed.add((route.method, path))
    assert documented == routed


# ---- users from the command line while the server runs ---------------------------------------
async def test_user_added_by_cli_can_log_in_at_once(api):
    data = api.node.cfg.data_dir
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loa.web.cli", "user", "add", "moi", "--role", "operator",
        "--area", "T01-H2-X3", "--password", "mat-khau-moi-1", "--data", str(data),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert b"mat-khau-moi-1" not in out  # a password given is never echoed
    r = await api.client.post("/api/v1/auth/token",
                              json={"username": "moi", "password": "mat-khau-moi-1"})
    assert r.status == 201


async def test_bootstrap_admin_is_created_once(tmp_path, capsys):
    cfg = make_config(tmp_path)
    async with running_api(cfg) as api:
        first = api.node.bootstrap_password
        assert first and first in capsys.readouterr().out
    async with running_api(cfg) as api:
        assert api.node.bootstrap_password is None
    assert first not in capsys.readouterr().out


async def test_restart_puts_a_broadcast_back_at_its_offset(tmp_path, tone):
    cfg = make_config(tmp_path)
    async with running_api(cfg) as api:
        prog = await approved_programme(api, tone)
        status, b = await api.call("xa11", "POST", "/api/v1/broadcasts",
                                   json={"programme": prog, "targets": ["T01-H1-X1"]})
        assert status == 201
        api.run(0.5)
        rec = await api.node.store.get("broadcast", b["id"])
        await api.node.store.update("broadcast", b["id"], {"started": rec["started"] - 2.0})
        marked = time.time()  # from here the broadcast "airs" on while no node runs
    down = time.time() - marked  # the shutdown's share (a loaded machine: seconds)
    async with running_api(cfg) as api:
        api.run(0.1)
        assert api.node.engine.on_air("T01-H1-X1")["broadcast"] == b["id"]
        live = api.node.engine.broadcasts[b["id"]]
        wall = time.time() - marked
        assert (2.0 + down) * 48_000 <= live.b.source.position <= (2.2 + wall) * 48_000
