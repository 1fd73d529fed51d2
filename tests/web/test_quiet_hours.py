"""Quiet hours over the API: a commune operator sets them, a bad row is refused naming it and
changes nothing, the district's rule is inherited, and the node's engine keeps a normal broadcast
off the air outside the hours while an emergency airs (the virtual clock of the test node)."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from tests.apiclient import Api, make_config, running_api, tone_file

X1, X2 = "T01-H1-X1", "T01-H1-X2"


@pytest.fixture
async def api(tmp_path):
    async with running_api(make_config(tmp_path)) as a:
        yield a


def closed_now() -> list[list[str]]:
    """Hours that exclude the present local time (the next two hours are quiet)."""
    now = dt.datetime.now(ZoneInfo("Asia/Ho_Chi_Minh"))
    a, b = now + dt.timedelta(hours=2), now + dt.timedelta(hours=10)
    return [[a.strftime("%H:%M"), b.strftime("%H:%M")]]


async def test_quiet_hours_are_set_validated_inherited_and_applied(api: Api, tmp_path):
    status, body = await api.call("xa11", "PUT", f"/api/v1/areas/{X1}/airtime", json={
        "hours": [["05:00", "21:00"]],
        "volume": [{"from": "05:00", "to": "07:00", "percent": 140}]})
    assert (status, body["field"]) == (422, "airtime.volume[0].percent"), body
    status, body = await api.call("xa11", "PUT", f"/api/v1/areas/{X1}/airtime",
                                  json={"hours": [["5h", "21:00"]]})
    assert (status, body["field"]) == (422, "airtime.hours[0]"), body
    assert await api.node.store.find("airtime") == []
    # a commune operator may not set its district's, nor its neighbour's
    status, _ = await api.call("xa11", "PUT", "/api/v1/areas/T01-H1/airtime",
                               json={"hours": [["05:00", "21:00"]]})
    assert status == 403
    status, _ = await api.call("xem11", "PUT", f"/api/v1/areas/{X1}/airtime",
                               json={"hours": [["05:00", "21:00"]]})
    assert status == 403

    # the district sets quiet hours that hold now; its communes inherit them
    status, body = await api.call("huyen1", "PUT", "/api/v1/areas/T01-H1/airtime",
                                  json={"hours": closed_now(), "volume": [
                                      {"from": "00:00", "to": "24:00", "percent": 70}]})
    assert status == 200, body
    status, view = await api.call("xa12", "GET", f"/api/v1/areas/{X2}/airtime")
    assert status == 200 and view["own"] is None and view["from"] == "T01-H1"
    assert view["effective"]["volume"] == [{"from": "00:00", "to": "24:00", "percent": 70}]

    tone = tone_file(tmp_path / "t.wav", 440, 30)
    status, media = await api.upload("tinh", tone)
    assert status == 201, media
    status, b = await api.call("tinh", "POST", "/api/v1/broadcasts", json={
        "media": media["id"], "targets": [X1, X2], "class": "normal"})
    assert status == 201, b
    api.run(1.0)
    assert api.node.engine.main_of(X1) is None and api.node.engine.main_of(X2) is None

    # X1 sets its own hours (all day): it replaces the district's there, at the next tick
    status, body = await api.call("xa11", "PUT", f"/api/v1/areas/{X1}/airtime",
                                  json={"hours": [["00:00", "24:00"]]})
    assert status == 200 and body["from"] == X1, body
    api.run(1.0)
    assert api.node.engine.main_of(X1) == b["id"] and api.node.engine.main_of(X2) is None

    # an emergency airs in X2's quiet hours
    status, em = await api.call("tinh", "POST", "/api/v1/emergencies", json={
        "targets": [X2], "content": {"media": media["id"]}})
    assert status == 201, em
    api.run(1.0)
    assert api.node.engine.main_of(X2) is not None
    assert api.node.engine.live_broadcast(api.node.engine.main_of(X2)).cls.name == "emergency"

    # a commune created now follows its district's rule from the next tick
    status, _ = await api.call("qtv1", "POST", "/api/v1/areas", json={
        "code": "T01-H1-X9", "name": "Xã mới", "level": "commune", "parent": "T01-H1"})
    assert status == 201
    api.run(0.1)
    assert api.node.engine.airtime is not None
    assert api.node.engine.airtime.rules["T01-H1-X9"] == api.node.engine.airtime.rules[X2]

    # dropping X1's own rule brings the district's back
    status, body = await api.call("xa11", "DELETE", f"/api/v1/areas/{X1}/airtime")
    assert status == 200 and body["from"] == "T01-H1", body
    api.run(1.0)
    assert api.node.engine.main_of(X1) is None
    audit = [e["action"] for e in await api.node.store.read_log("audit", limit=100)]
    assert audit.count("airtime.set") == 2 and audit.count("airtime.clear") == 1
