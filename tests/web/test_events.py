"""GET /api/v1/events: the scoped live stream of the console."""

from __future__ import annotations

import asyncio

import pytest

from loa.web import events as events_mod
from loa.web.events import HUB
from tests.apiclient import approved_programme, make_config, media_id, running_api, tone_file
from tests.eventstream import WAIT, open_stream


@pytest.fixture
async def api(tmp_path):
    async with running_api(make_config(tmp_path, max_mb=1, max_seconds=600)) as a:
        yield a


@pytest.fixture
def tone(tmp_path):
    return tone_file(tmp_path / "tone.wav", 440, 3)


async def test_commune_gets_its_onair_never_the_siblings(api, tone):
    s = await open_stream(api, "xa11")
    prog = await approved_programme(api, tone, author="huyen1", approver="duyet1")
    status, b2 = await api.call("xa12", "POST", "/api/v1/broadcasts",
                                json={"programme": prog, "targets": ["T01-H1-X2"]})
    assert status == 201, b2
    api.run(0.2)
    status, b1 = await api.call("xa11", "POST", "/api/v1/broadcasts",
                                json={"programme": prog, "targets": ["T01-H1-X1"]})
    assert status == 201, b1
    api.run(0.2)
    seen = await s.until("onair", broadcast=b1["id"])
    onair = [d for n, d in seen if n == "onair"]
    assert all(d["area"] == "T01-H1-X1" for d in onair), onair
    assert onair[-1]["cause"] and onair[-1]["title"]


async def test_device_status_event(api):
    s = await open_stream(api, "huyen1")
    status, dev = await api.call("qtv1", "POST", "/api/v1/devices", json={
        "name": "Cụm loa chợ", "kind": "loudspeaker", "area": "T01-H1-X1"})
    assert status == 201
    await api.node.bus.publish("device.status", {
        "device": "other", "name": "x", "area": "T01-H2-X1", "status": "offline", "ts": 1.0})
    await api.node.bus.publish("device.status", {
        "device": dev["id"], "name": dev["name"], "area": "T01-H1-X1", "status": "offline",
        "ts": 2.0})
    seen = await s.until("device", id=dev["id"])
    assert [d["id"] for n, d in seen if n == "device"] == [dev["id"]]
    assert seen[-1][1] == {"id": dev["id"], "name": "Cụm loa chợ", "area": "T01-H1-X1",
                           "status": "offline", "at": 2.0}


async def test_emergency_start_and_end(api, tone):
    mid = await media_id(api, tone, "tinh")
    s = await open_stream(api, "xa11")
    status, em = await api.call("tinh", "POST", "/api/v1/emergencies", json={
        "targets": ["T01-H1"], "content": {"media": mid}})
    assert status in (200, 201), em
    seen = await s.until("emergency", id=em["id"], state="start")
    assert seen[-1][1]["areas"] == ["T01-H1-X1"]  # only the areas in the commune's scope
    status, _ = await api.call("tinh", "DELETE", f"/api/v1/emergencies/{em['id']}")
    assert status in (200, 204)
    await s.until("emergency", id=em["id"], state="end")


async def test_programme_approval_event(api, tone):
    s = await open_stream(api, "huyen1")
    prog = await approved_programme(api, tone, author="huyen1", approver="duyet1")
    seen = await s.until("programme", id=prog, status="approved")
    assert seen[-1][1]["area"] == "T01-H1"


async def test_overflow_sends_resync(api, monkeypatch):
    s = await open_stream(api, "huyen1")
    hub = api.client.app[HUB]
    for i in range(events_mod.QUEUE + 10):
        hub.publish("schedule", {"id": str(i), "area": "T01-H1", "action": "created"},
                    ["T01-H1"])
    seen = await s.until("resync")
    after = await s.until("schedule", id=str(events_mod.QUEUE + 9))
    ids = [d["id"] for n, d in seen + after if n == "schedule"]
    assert "0" not in ids and len(ids) <= events_mod.QUEUE


async def test_revoked_token_closes_the_stream(api):
    s = await open_stream(api, "xa11")
    status, _ = await api.call("xa11", "DELETE", "/api/v1/auth/token")
    assert status == 204
    api.client.app[HUB].publish("schedule", {"id": "s", "area": "T01-H1-X1",
                                             "action": "created"}, ["T01-H1-X1"])
    f = await asyncio.wait_for(s.frame(), WAIT)
    assert f == ("closed", None)
