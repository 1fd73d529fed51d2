"""Cross-area sweep: every write operation of the OpenAPI document, tried by commune A's admin
against commune B's records and areas (path ids and body references), leaks nothing.

A and B are sibling communes. A's user holds every right there is (admin, emergency, direct): any
success would be a leak of scope, not of role. Each answer must be 403/404/422 (never 2xx), B's
records must be unchanged afterwards, and every 403 must be in the audit log. A write operation
the sweep does not know how to fill fails the test, so the sweep stays complete.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import FormData
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from loa.relay.devices.protocol import firmware_manifest
from loa.web.auth import add_user
from tests.apiclient import PASSWORD, Api, make_config, running_api, tone_file

A = "T01-H1-X1"
B = "T01-H1-X2"
NEW_PASSWORD = "mat-khau-moi-456"
FW_KEY = Ed25519PrivateKey.generate()  # OTA: the vendor key the node trusts for model "loa"


@pytest.fixture
async def api(tmp_path):
    cfg = make_config(tmp_path, max_mb=1, max_seconds=600)
    pub = FW_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    cfg.firmware.keys = [f"loa={base64.b64encode(pub).decode()}"]
    async with running_api(cfg) as a:
        for name, area in (("qtvA", A), ("qtvB", B)):
            await add_user(a.node.store, a.node.tree, name, "admin", area, PASSWORD,
                           emergency=True, direct=True)
            await a.login(name)
        yield a


async def created(api: Api, who: str, method: str, path: str, **kw: Any) -> dict[str, Any]:
    status, body = await api.call(who, method, path, **kw)
    assert status in (200, 201, 202), (method, path, status, body)
    return body


async def upload(api: Api, who: str, tone: Path, area: str | None = None) -> dict[str, Any]:
    form = FormData()
    form.add_field("title", f"Bản tin {who}")
    if area:
        form.add_field("area", area)
    form.add_field("file", tone.read_bytes(), filename=tone.name)
    return await created(api, who, "POST", "/api/v1/media", data=form)


def firmware_form(version: str, area: str | None = None) -> FormData:
    image = f"firmware {version}".encode()
    manifest = firmware_manifest("loa", version, len(image), hashlib.sha256(image).hexdigest())
    form = FormData()
    for k, v in (("model", "loa"), ("version", version), ("area", area),
                 ("signature", base64.b64encode(FW_KEY.sign(manifest)).decode())):
        if v:
            form.add_field(k, v)
    form.add_field("file", image, filename="fw.bin")
    return form


async def programme(api: Api, who: str, status: str, **body: Any) -> str:
    body = {"title": f"Chương trình {status}", "type": "tts", "text": "Xin chào", **body}
    pid = (await created(api, who, "POST", "/api/v1/programmes", json=body))["id"]
    if status in ("pending", "approved"):
        await created(api, who, "POST", f"/api/v1/programmes/{pid}/submit")
    if status == "approved":
        await created(api, who, "POST", f"/api/v1/programmes/{pid}/approve")
    return str(pid)


@dataclass
class World:
    """Both communes' records: ids by name."""
    a: dict[str, str] = field(default_factory=dict)
    b: dict[str, str] = field(default_factory=dict)


async def build(api: Api, tmp_path: Path) -> World:
    w = World()
    tone = tone_file(tmp_path / "tone.wav", 440, 2)
    tone_b = tone_file(tmp_path / "tone-b.wav", 550, 2)  # other bytes: no deduplication
    for who, ids, t in (("qtvA", w.a, tone), ("qtvB", w.b, tone_b)):
        ids["media"] = (await upload(api, who, t))["id"]
        ids["file_ok"] = await programme(api, who, "approved", type="file", media=ids["media"])
        ids["file_draft"] = await programme(api, who, "draft", type="file", media=ids["media"])
        ids["list_draft"] = await programme(api, who, "draft", type="playlist",
                                            items=[ids["media"]])
        ids["pending"] = await programme(api, who, "pending")
        area = A if who == "qtvA" else B
        ids["schedule"] = (await created(api, who, "POST", "/api/v1/schedules", json={
            "programme": ids["file_ok"], "targets": [area], "kind": "daily",
            "time": "05:00"}))["id"]
        ids["device"] = (await created(api, who, "POST", "/api/v1/devices", json={
            "name": f"Cụm loa {area}", "kind": "loudspeaker", "area": area}))["id"]
        await api.node.devices.update(ids["device"], {"firmware": "loa/1.0"})  # as reported
        ids["firmware"] = (await created(api, who, "POST", "/api/v1/firmware",
                                         data=firmware_form(f"2.0-{area}")))["id"]
        ids["rollout"] = (await created(api, who, "POST", "/api/v1/rollouts", json={
            "firmware": ids["firmware"], "area": area}))["id"]
        await created(api, who, "PUT", f"/api/v1/areas/{area}/airtime",
                      json={"hours": [["05:00", "22:00"]]})
        ids["user"] = (await created(api, who, "POST", "/api/v1/users", json={
            "username": f"nguoi-{area}", "role": "editor", "area": area,
            "password": PASSWORD}))["id"]
        ids["broadcast"] = (await created(api, who, "POST", "/api/v1/broadcasts", json={
            "media": ids["media"], "targets": [area]}))["id"]
        ids["emergency"] = (await created(api, who, "POST", "/api/v1/emergencies", json={
            "targets": [area], "content": {"media": ids["media"]}}))["id"]
        ids["relay"] = await programme(api, who, "approved", type="relay",
                                       url="http://203.0.113.5/khong-co.mp3")
        ids["capture"] = (await created(api, who, "POST", "/api/v1/captures", json={
            "programme": ids["relay"], "start": time.time() + 3600, "seconds": 60}))["id"]
        ids["contact"] = (await created(api, who, "POST", "/api/v1/alert-contacts", json={
            "area": area, "name": f"Cán bộ {area}", "email": f"canbo@{area.lower()}.vn"}))["id"]
        ids["mount"] = (await created(api, who, "POST", "/api/v1/mounts", json={
            "name": f"studio-{area}", "area": area, "targets": [area]}))["id"]
        await created(api, who, "PUT", f"/api/v1/areas/{area}/dead-air", json={"seconds": 20})
        ids["ingest_prog"] = await programme(api, who, "draft", type="ingest",
                                             mount=ids["mount"])
    # The district's bulletin in both communes' inboxes.
    pid = await programme(api, "qtv1", "approved", type="tts")
    sent = await created(api, "huyen1", "POST", "/api/v1/bulletins",
                         json={"programme": pid, "targets": [A, B]})
    for e in sent["entries"]:
        (w.a if e["area"] == A else w.b)["inbox"] = e["id"]
        ids["node"] = (await created(api, who, "POST", "/api/v1/nodes", json={
            "name": f"Nút {area}", "area": area}))["id"]
    return w


def cap_alert(code: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2">'
            f"<identifier>SCOPE-1</identifier><sender>kttv@tinh.gov.vn</sender>"
            f"<sent>2026-06-01T05:00:00+07:00</sent><status>Actual</status>"
            f"<msgType>Alert</msgType><scope>Public</scope><info><language>vi-VN</language>"
            f"<category>Met</category><event>Bão</event><urgency>Immediate</urgency>"
            f"<severity>Extreme</severity><certainty>Observed</certainty>"
            f"<headline>Bão</headline><area><areaDesc>Xã</areaDesc><geocode>"
            f"<valueName>area</valueName><value>{code}</value></geocode></area></info>"
            f"</alert>").encode()


Attempt = tuple[str, dict[str, Any]]  # path, request keyword arguments


def csv_body(text: str) -> dict[str, Any]:
    return {"data": text.encode(), "headers": {"Content-Type": "text/csv"}}


def attempts(w: World) -> dict[tuple[str, str], Callable[[], list[Attempt]] | str]:
    """How to attack each write operation with A's token: B's ids in the path, B's areas and
    records in the body (and A's own records changed to point at B's). A string: the operation
    names nothing of another area (why), checked separately."""
    b, a = w.b, w.a
    media_b = b["media"]
    return {
        ("POST", "/api/v1/auth/token"): "public login: names no area",
        ("DELETE", "/api/v1/auth/token"): "ends the caller's own token",
        ("POST", "/api/v1/auth/session"): "public login: names no area",
        ("DELETE", "/api/v1/auth/session"): "ends the caller's own session",
        ("POST", "/api/v1/auth/password"): "changes the caller's own password only",
        ("POST", "/api/v1/nodes/inbox"): "a child node's key, scoped to the key's area "
                                          "(tests/relay/test_bulletins.py)",
        ("POST", "/api/v1/devices/provision"): "public: a device's one-time token (401 below)",
        ("POST", "/api/v1/tts"): "speaks into the caller's own area (checked below)",
        ("POST", "/api/exchange/v1/bulletins"): "peer-signed: a user's token is no credential "
                                                "(401 below)",
        ("POST", "/api/v1/areas"): lambda: [
            ("/api/v1/areas", {"json": {"code": "X2-MOI", "name": "Thôn mới", "parent": B}})],
        ("POST", "/api/v1/areas/import"): lambda: [
            ("/api/v1/areas/import", csv_body(f"X2-T1,Thôn 1,village,{B}\n"))],
        ("PATCH", "/api/v1/areas/{code}"): lambda: [
            (f"/api/v1/areas/{B}", {"json": {"name": "Bị sửa"}}),
            (f"/api/v1/areas/{A}", {"json": {"parent": B}}),
            (f"/api/v1/areas/{A}", {"json": {"name": "A", "code": B}})],
        ("POST", "/api/v1/users"): lambda: [
            ("/api/v1/users", {"json": {"username": "ke-gian", "role": "admin", "area": B,
                                        "password": PASSWORD}})],
        ("PATCH", "/api/v1/users/{id}"): lambda: [
            (f"/api/v1/users/{b['user']}", {"json": {"disabled": True}}),
            (f"/api/v1/users/{b['user']}", {"json": {"password": NEW_PASSWORD}}),
            (f"/api/v1/users/{a['user']}", {"json": {"area": B}}),
            (f"/api/v1/users/{a['user']}", {"json": {"role": "viewer", "area": B}}),
            (f"/api/v1/users/{a['user']}", {"json": {"direct": True}})],
        ("POST", "/api/v1/users/{id}/password"): lambda: [
            (f"/api/v1/users/{b['user']}/password", {})],
        ("POST", "/api/v1/media"): lambda: [("/api/v1/media", {"data": media_form(B)})],
        ("DELETE", "/api/v1/media/{id}"): lambda: [(f"/api/v1/media/{media_b}", {})],
        ("POST", "/api/v1/programmes"): lambda: [
            ("/api/v1/programmes", {"json": {"title": "x", "type": "tts", "text": "x",
                                             "area": B}}),
            ("/api/v1/programmes", {"json": {"title": "x", "type": "file", "media": media_b}}),
            ("/api/v1/programmes", {"json": {"title": "x", "type": "playlist",
                                             "items": [a["media"], media_b]}}),
            ("/api/v1/programmes", {"json": {"title": "x", "type": "ingest",
                                             "mount": b["mount"]}})],
        ("PATCH", "/api/v1/programmes/{id}"): lambda: [
            *[(f"/api/v1/programmes/{b[k]}", {"json": {"title": "Bị sửa"}})
              for k in ("file_ok", "file_draft", "pending")],
            (f"/api/v1/programmes/{a['file_draft']}", {"json": {"media": media_b}}),
            (f"/api/v1/programmes/{a['list_draft']}", {"json": {"items": [media_b]}}),
            (f"/api/v1/programmes/{a['ingest_prog']}", {"json": {"mount": b["mount"]}})],
        ("POST", "/api/v1/programmes/{id}/submit"): lambda: [
            (f"/api/v1/programmes/{b['file_draft']}/submit", {})],
        ("POST", "/api/v1/programmes/{id}/approve"): lambda: [
            (f"/api/v1/programmes/{b['pending']}/approve", {})],
        ("POST", "/api/v1/programmes/{id}/reject"): lambda: [
            (f"/api/v1/programmes/{b['pending']}/reject", {"json": {"reason": "Không"}})],
        ("POST", "/api/v1/schedules"): lambda: [
            ("/api/v1/schedules", {"json": {"programme": b[k], "targets": [A], "kind": "daily",
                                            "time": "06:00"}})
            for k in ("file_ok", "file_draft")] + [
            ("/api/v1/schedules", {"json": {"programme": a["file_ok"], "targets": [B],
                                            "kind": "daily", "time": "06:00"}})],
        ("DELETE", "/api/v1/schedules/{id}"): lambda: [(f"/api/v1/schedules/{b['schedule']}", {})],
        ("PATCH", "/api/v1/schedules/{id}"): lambda: [
            (f"/api/v1/schedules/{b['schedule']}", {"json": {"enabled": False}})],
        ("POST", "/api/v1/broadcasts"): lambda: [
            ("/api/v1/broadcasts", {"json": {"media": media_b, "targets": [A]}}),
            *[("/api/v1/broadcasts", {"json": {"programme": b[k], "targets": [A]}})
              for k in ("file_ok", "file_draft", "list_draft", "pending")],
            ("/api/v1/broadcasts", {"json": {"media": a["media"], "targets": [B]}}),
            ("/api/v1/broadcasts", {"json": {"media": media_b, "targets": [A],
                                             "class": "emergency"}})],
        ("DELETE", "/api/v1/broadcasts/{id}"): lambda: [
            (f"/api/v1/broadcasts/{b['broadcast']}", {})],
        ("POST", "/api/v1/devices"): lambda: [
            ("/api/v1/devices", {"json": {"name": "Loa lạ", "kind": "loudspeaker", "area": B}})],
        ("POST", "/api/v1/devices/commands"): lambda: [
            ("/api/v1/devices/commands", {"json": {"area": B, "command": "stop"}})],
        ("PATCH", "/api/v1/devices/{id}"): lambda: [
            (f"/api/v1/devices/{b['device']}", {"json": {"name": "Bị sửa"}}),
            (f"/api/v1/devices/{a['device']}", {"json": {"area": B}})],
        ("DELETE", "/api/v1/devices/{id}"): lambda: [(f"/api/v1/devices/{b['device']}", {})],
        ("POST", "/api/v1/devices/{id}/revoke"): lambda: [
            (f"/api/v1/devices/{b['device']}/revoke", {})],
        ("POST", "/api/v1/devices/{id}/provisioning"): lambda: [
            (f"/api/v1/devices/{b['device']}/provisioning", {})],
        ("POST", "/api/v1/devices/{id}/commands"): lambda: [
            (f"/api/v1/devices/{b['device']}/commands", {"json": {"command": "stop"}})],
        ("POST", "/api/v1/alert-contacts"): lambda: [
            ("/api/v1/alert-contacts", {"json": {"area": B, "name": "x",
                                                 "email": "x@example.vn"}})],
        ("DELETE", "/api/v1/alert-contacts/{id}"): lambda: [
            (f"/api/v1/alert-contacts/{b['contact']}", {})],
        ("POST", "/api/v1/nodes"): lambda: [
            ("/api/v1/nodes", {"json": {"name": "Nút lạ", "area": B}})],
        ("POST", "/api/v1/nodes/{id}/revoke"): lambda: [
            (f"/api/v1/nodes/{b['node']}/revoke", {})],
        ("POST", "/api/v1/mounts"): lambda: [
            ("/api/v1/mounts", {"json": {"name": "la", "area": B}}),
            ("/api/v1/mounts", {"json": {"name": "la", "area": A, "targets": [B]}})],
        ("DELETE", "/api/v1/mounts/{id}"): lambda: [(f"/api/v1/mounts/{b['mount']}", {})],
        ("PUT", "/api/v1/areas/{code}/dead-air"): lambda: [
            (f"/api/v1/areas/{B}/dead-air", {"json": {"seconds": 5}})],
        ("DELETE", "/api/v1/areas/{code}/dead-air"): lambda: [
            (f"/api/v1/areas/{B}/dead-air", {})],
        ("POST", "/api/v1/emergencies"): lambda: [
            ("/api/v1/emergencies", {"json": {"targets": [B], "content": {"text": "Cháy"}}}),
            ("/api/v1/emergencies", {"json": {"targets": [A], "content": {"media": media_b}}}),
            ("/api/v1/emergencies", {"json": {"targets": [A], "content": {"text": "Cháy"},
                                              "attention": {"media": media_b}}})],
        ("POST", "/api/v1/emergencies/preview"): lambda: [  # tells what B has on air
            ("/api/v1/emergencies/preview", {"json": {"targets": [B],
                                                      "content": {"text": "Cháy"}}})],
        ("DELETE", "/api/v1/emergencies/{id}"): lambda: [
            (f"/api/v1/emergencies/{b['emergency']}", {})],
        ("POST", "/api/v1/bulletins"): lambda: [  # a commune sends nothing, up or sideways
            ("/api/v1/bulletins", {"json": {"programme": a["file_ok"], "targets": [B]}}),
            ("/api/v1/bulletins", {"json": {"programme": b["file_ok"], "targets": [A]}})],
        ("POST", "/api/v1/inbox/{id}/schedule"): lambda: [
            (f"/api/v1/inbox/{b['inbox']}/schedule", {"json": {"time": "06:00",
                                                               "date": "2030-01-01"}})],
        ("POST", "/api/v1/inbox/{id}/decline"): lambda: [
            (f"/api/v1/inbox/{b['inbox']}/decline", {"json": {"reason": "Không"}})],
        ("POST", "/api/v1/inbox/{id}/order"): lambda: [
            (f"/api/v1/inbox/{b['inbox']}/order", {"json": {"order": "after"}})],
        ("PUT", "/api/v1/areas/{code}/archive"): lambda: [
            (f"/api/v1/areas/{B}/archive", {"json": {"enabled": True}})],
        ("DELETE", "/api/v1/areas/{code}/archive"): lambda: [
            (f"/api/v1/areas/{B}/archive", {})],
        ("POST", "/api/v1/captures"): lambda: [
            ("/api/v1/captures", {"json": {"programme": b["relay"], "start": 4e9,
                                           "seconds": 60}}),
            ("/api/v1/captures", {"json": {"programme": a["relay"], "start": 4e9,
                                           "seconds": 60,
                                           "air": {"targets": [B], "at": 4e9 + 120}}})],
        ("DELETE", "/api/v1/captures/{id}"): lambda: [
            (f"/api/v1/captures/{b['capture']}", {})],
        ("POST", "/api/v1/archive/replay"): lambda: [
            ("/api/v1/archive/replay", {"json": {"area": B, "from": 0, "to": 60}}),
            ("/api/v1/archive/replay", {"json": {"area": A, "from": 0, "to": 60,
                                                 "targets": [B]}})],
        ("PUT", "/api/v1/areas/{code}/airtime"): lambda: [
            (f"/api/v1/areas/{B}/airtime", {"json": {"hours": [["05:00", "06:00"]]}}),
            ("/api/v1/areas/T01-H1/airtime", {"json": {"hours": [["05:00", "06:00"]]}})],
        ("DELETE", "/api/v1/areas/{code}/airtime"): lambda: [
            (f"/api/v1/areas/{B}/airtime", {})],
        ("POST", "/api/v1/firmware"): lambda: [
            ("/api/v1/firmware", {"data": firmware_form("3.0", B)})],
        ("POST", "/api/v1/rollouts"): lambda: [
            ("/api/v1/rollouts", {"json": {"firmware": b["firmware"], "area": A}}),
            ("/api/v1/rollouts", {"json": {"firmware": a["firmware"], "area": B}})],
        ("POST", "/api/v1/rollouts/{id}/halt"): lambda: [
            (f"/api/v1/rollouts/{b['rollout']}/halt", {})],
        ("POST", "/api/v1/rollouts/{id}/resume"): lambda: [
            (f"/api/v1/rollouts/{b['rollout']}/resume", {})],
        ("POST", "/api/v1/alerts"): lambda: [
            ("/api/v1/alerts", {"data": cap_alert(B),
                                "headers": {"Content-Type": "application/cap+xml"}})],
    }


def media_form(area: str) -> FormData:
    form = FormData()
    form.add_field("title", "Tệp lạ")
    form.add_field("area", area)
    # A tiny valid WAV (0.1 s of silence): the area must be refused before it matters.
    wav = base64.b64decode("UklGRiQAAABXQVZFZm10IBAAAAABAAEAgD4AAAB9AAACABAAZGF0YQAAAAA=")
    form.add_field("file", wav, filename="lang.wav")
    return form


KINDS = ("media", "programme", "schedule", "device", "emergency", "user", "area", "broadcast",
         "bulletin", "inbox", "area_settings", "capture", "firmware", "rollout", "airtime",
         "alert_contact", "mount", "dead_air")


async def snapshot(api: Api) -> dict[str, Any]:
    """Every record of B's area (and B's area itself), as stored."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        for rec in await api.node.store.find(kind):
            where = rec.get("area") or rec.get("issuer") or rec.get("id")
            if where == B or B in (rec.get("targets") or []):
                out[f"{kind}:{rec['id']}"] = {k: v for k, v in rec.items()
                                              if k not in ("last_seen", "updated")}
    return out


async def test_cross_area_sweep_of_every_write_operation(api: Api, tmp_path: Path):
    w = await build(api, tmp_path)
    before = await snapshot(api)
    assert len(before) >= 12, sorted(before)
    status, doc = await api.call("qtvA", "GET", "/api/v1/openapi.json")
    assert status == 200
    status, exchange = await api.call(None, "GET", "/api/exchange/v1/openapi.json")
    assert status == 200
    ops = [(m.upper(), path) for path, item in {**doc["paths"], **exchange["paths"]}.items()
           for m in ("post", "put", "patch", "delete") if m in item]
    table = attempts(w)
    unknown = [op for op in ops if op not in table]
    assert not unknown, f"the sweep does not know how to attack {unknown}: add them"
    refused403 = 0
    leaks = []
    tried = 0
    for op in ops:
        how = table[op]
        if isinstance(how, str):
            continue
        for path, kw in how():
            tried += 1
            status, body = await api.call("qtvA", op[0], path, **kw)
            if status not in (403, 404, 422):
                leaks.append((op, path, kw.get("json"), status, body))
            refused403 += status == 403
            if status in (403, 422):
                assert isinstance(body, dict) and body.get("error"), (op, path, body)
    assert not leaks, leaks
    assert tried >= 45 and refused403 >= 20, (tried, refused403)
    assert await snapshot(api) == before
    # Every 403 to A is in the audit log, with the method, path and reason; no secrets.
    entries = [e for e in await api.node.store.read_log("audit", limit=5000)
               if e["action"] == "refused" and e["user"] == "qtvA"]
    assert sum(e["details"]["status"] == 403 for e in entries) == refused403
    assert all(e["area"] == A and e["ip"] and e["details"]["method"] in
               ("POST", "PUT", "PATCH", "DELETE") and e["target"].startswith("/api/v1/")
               and e["details"]["reason"] for e in entries)
    assert PASSWORD not in str(entries) and api.tokens["qtvA"] not in str(entries)
    # The operations that name nothing of another area.
    status, _ = await api.call(None, "POST", "/api/v1/devices/provision",
                               json={"device": w.b["device"], "token": "sai"})
    assert status == 401
    status, tts = await api.call("qtvA", "POST", "/api/v1/tts",
                                 json={"text": "Thông báo của xã A"})
    assert status == 201 and tts["area"] == A
    status, out = await api.call("qtvA", "POST", "/api/exchange/v1/bulletins", json={
        "id": "X", "sender": "x", "sent": "2026-12-07T08:00:00+07:00", "class": "emergency",
        "title": "x", "text": "x", "targets": [B]})
    assert status == 401 and await api.node.store.count("exchange_in") == 0, out
    assert await snapshot(api) == before


async def test_references_to_another_communes_records_are_refused(api: Api, tmp_path: Path):
    """Item by item, with the field named: the gaps the sweep found, each on its own."""
    w = await build(api, tmp_path)
    cases = [
        ("/api/v1/broadcasts", {"media": w.b["media"], "targets": [A]}, "media"),
        ("/api/v1/broadcasts", {"programme": w.b["file_ok"], "targets": [A]}, "programme"),
        ("/api/v1/broadcasts", {"programme": w.b["file_draft"], "targets": [A]}, "programme"),
        ("/api/v1/programmes", {"title": "x", "type": "file", "media": w.b["media"]}, "media"),
        ("/api/v1/programmes", {"title": "x", "type": "playlist",
                                "items": [w.a["media"], w.b["media"]]}, "items"),
        ("/api/v1/schedules", {"programme": w.b["file_ok"], "targets": [A], "kind": "daily",
                               "time": "07:00"}, "programme"),
        ("/api/v1/emergencies", {"targets": [A], "content": {"media": w.b["media"]}},
         "content.media"),
    ]
    counts = {k: await api.node.store.count(k) for k in ("broadcast", "programme", "schedule",
                                                          "emergency")}
    for path, body, name in cases:
        status, out = await api.call("qtvA", "POST", path, json=body)
        assert status == 403, (path, body, out)
        assert out["field"] == name and "/" in out["error"], out
    assert counts == {k: await api.node.store.count(k) for k in counts}
    # Shared down from above is allowed: the district's approved programme airs in A.
    pid = await programme(api, "qtv1", "approved", type="tts")
    status, out = await api.call("qtvA", "POST", "/api/v1/broadcasts",
                                 json={"programme": pid, "targets": [A]})
    assert status == 201, out


async def test_patch_refuses_fields_it_would_ignore(api: Api):
    u = (await api.node.store.find("user", username="xa11"))[0]
    for body, name in (({"area": B}, "area"), ({"direct": True}, "direct"),
                       ({"role": "viewer", "bogus": 1}, "bogus")):
        status, out = await api.call("qtv1", "PATCH", f"/api/v1/users/{u['id']}", json=body)
        assert status == 422 and out["field"] == name, out
    assert await api.node.store.get("user", u["id"]) == u
    for body, name in (({"parent": "T01-H1"}, "parent"), ({"name": "X", "code": "Z"}, "code")):
        status, out = await api.call("qtv1", "PATCH", f"/api/v1/areas/{B}", json=body)
        assert status == 422 and out["field"] == name, out
    assert api.node.tree.get(B).name == "Xã 2 huyện 1"
    status, out = await api.call("qtv1", "PATCH", f"/api/v1/areas/{B}", json={"name": "Xã Hai"})
    assert status == 200 and out["name"] == "Xã Hai"


@pytest.mark.parametrize("code", ["X\x00Y", "X\u202eY", "T01-H1-X\u0422", "Т01", "a b", "a_b",
                                  "a.b", "x" * 33, "", "Xã"])
async def test_area_codes_are_ascii_letters_digits_and_dash(api: Api, code: str):
    status, out = await api.call("qtv1", "POST", "/api/v1/areas",
                                 json={"code": code, "name": "Thôn", "parent": "T01-H1"})
    assert status == 422 and out["field"] == "code", out
    assert code not in api.node.tree
    status, out = await api.call("qtv1", "POST", "/api/v1/areas/import",
                                 data=f"{code},Thôn,village,T01-H1\n".encode(),
                                 headers={"Content-Type": "text/csv"})
    assert status == 422 and "code" in out["error"], out
    assert len(api.node.tree) == 9


async def test_official_and_operator_codes_still_accepted(api: Api):
    for code in ("26734", "T01-H1-THON-3", "x" * 32):
        status, out = await api.call("qtv1", "POST", "/api/v1/areas",
                                     json={"code": code, "name": "Thôn", "parent": "T01-H1"})
        assert status == 201, out


async def test_refused_writes_are_audited_without_secrets(api: Api):
    status, _ = await api.call(None, "POST", "/api/v1/broadcasts", json={"text": "x"})
    assert status == 401
    r = await api.client.post("/api/v1/auth/token",
                              json={"username": "xa12", "password": "mat-khau-sai-789"})
    assert r.status == 401
    status, _ = await api.call("xem11", "POST", "/api/v1/broadcasts",
                               json={"text": "x", "targets": [A]})
    assert status == 403
    status, _ = await api.call("xem11", "GET", "/api/v1/users")  # a read: not audited
    assert status == 403
    entries = [e for e in await api.node.store.read_log("audit") if e["action"] == "refused"]
    got = [(e["user"], e["details"]["method"], e["target"], e["details"]["status"])
           for e in entries]
    assert got == [(None, "POST", "/api/v1/broadcasts", 401),
                   (None, "POST", "/api/v1/auth/token", 401),
                   ("xem11", "POST", "/api/v1/broadcasts", 403)], got
    assert all(e["ip"] for e in entries)
    assert "mat-khau-sai-789" not in str(entries)
    assert not any(t in str(entries) for t in api.tokens.values())
