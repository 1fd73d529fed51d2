"""Bulletins sent down and the commune inbox over HTTP, on the virtual clock: a normal bulletin
waits until the commune schedules it, a decline's reason reaches the sender, the commune orders a
priority clash, an emergency needs no one, and nobody acts on another commune's inbox."""

from __future__ import annotations

import datetime as dt
import math
import time
from pathlib import Path
from typing import Any

import pytest

from loa.streamer.clock import FRAME, tick_of
from loa.streamer.schedule import DEFAULT_TZ, ZoneInfo
from tests.apiclient import Api, approved_programme, make_config, media_id, running_api, tone_file
from tests.eventstream import open_stream
from tests.helpers import until

X1, X2, X3 = "T01-H1-X1", "T01-H1-X2", "T01-H1-X3"


@pytest.fixture
async def api(tmp_path):
    async with running_api(make_config(tmp_path)) as a:
        yield a


async def programme(api: Api, tmp_path: Path, who: str, hz: float, seconds: float,
                    approver: str | None = None) -> str:
    mid = await media_id(api, tone_file(tmp_path / f"t{hz}.wav", hz, seconds), who)
    status, prog = await api.call(who, "POST", "/api/v1/programmes",
                                  json={"title": f"Tin {who}", "type": "file", "media": mid})
    assert status == 201, prog
    if approver:
        await api.call(who, "POST", f"/api/v1/programmes/{prog['id']}/submit")
        status, body = await api.call(approver, "POST", f"/api/v1/programmes/{prog['id']}/approve")
        assert status == 200, body
    return str(prog["id"])


async def send(api: Api, who: str, pid: str, targets: list[str], klass: str) -> dict[str, Any]:
    status, body = await api.call(who, "POST", "/api/v1/bulletins",
                                  json={"programme": pid, "targets": targets, "class": klass})
    assert status == 201, body
    return dict(body)


def changes(api: Api, area: str) -> list[tuple[int, str | None, str]]:
    return [(c.sample, c.after, c.cause) for c in api.node.engine.changes if c.area == area]


async def test_a_normal_bulletin_waits_in_the_inbox_until_the_commune_schedules_it(api, tmp_path):
    pid = await programme(api, tmp_path, "tinh", 700, 2)
    sent = await send(api, "tinh", pid, ["T01-H1"], "normal")
    assert sorted((e["area"], e["state"]) for e in sent["entries"]) == [
        (X1, "pending"), (X2, "pending"), (X3, "pending")]
    status, box = await api.call("xa11", "GET", "/api/v1/inbox")
    assert status == 200
    (entry,) = box["entries"]
    assert (entry["area"], entry["from"], entry["class"], entry["title"], entry["state"]) == (
        X1, "T01", "normal", "Tin tinh", "pending")
    # Nothing airs before the commune schedules it.
    node = api.node
    await node.scheduler.run_once(time.time(), await node.store.find("schedule"))
    api.run(2)
    assert changes(api, X1) == [] and await node.store.count("broadcast") == 0

    at = math.ceil(time.time()) + 8
    local = dt.datetime.fromtimestamp(at, ZoneInfo(DEFAULT_TZ))
    status, done = await api.call("xa11", "POST", f"/api/v1/inbox/{entry['id']}/schedule", json={
        "date": local.date().isoformat(), "time": local.strftime("%H:%M:%S")})
    assert status == 200 and done["state"] == "scheduled", done
    sched = await node.store.get("schedule", done["schedule"])
    assert (sched["area"], sched["targets"], sched["programme"], sched["class"]) == (
        X1, [X1], pid, "normal")
    (bid,) = await node.scheduler.run_once(at - 3, await node.store.find("schedule"))
    start = tick_of(at - node.station.media_epoch)
    api.clock.run(start + 10 - api.clock.n)
    assert changes(api, X1) == [(start * FRAME, bid, "start")]  # at the scheduled sample
    assert changes(api, X2) == []  # X2 has not scheduled it

    async def state_of(area: str) -> str:
        _, b = await api.call("tinh", "GET", f"/api/v1/bulletins/{sent['id']}")
        return str(next(e for e in b["entries"] if e["area"] == area)["state"])

    await until(lambda: _is(state_of(X1), "aired"), "the entry marked aired")
    # X2 declines: the sender reads the reason.
    (e2,) = (await api.call("xa12", "GET", "/api/v1/inbox"))[1]["entries"]
    status, out = await api.call("xa12", "POST", f"/api/v1/inbox/{e2['id']}/decline",
                                 json={"reason": "Trùng giờ họp thôn"})
    assert status == 200 and out["state"] == "declined"
    _, b = await api.call("tinh", "GET", f"/api/v1/bulletins/{sent['id']}")
    assert {e["area"]: (e["state"], e.get("reason")) for e in b["entries"]} == {
        X1: ("aired", None), X2: ("declined", "Trùng giờ họp thôn"), X3: ("pending", None)}
    status, out = await api.call("xa12", "POST", f"/api/v1/inbox/{e2['id']}/schedule",
                                 json={"time": "06:00", "date": "2030-01-01"})
    assert status == 409 and "declined" in out["error"]
    # Another commune neither sees nor acts on X1's entry; the sender's bulletin is not its.
    for path, body in ((f"/api/v1/inbox/{entry['id']}/decline", {"reason": "x"}),
                       (f"/api/v1/inbox/{entry['id']}/schedule", {"time": "06:00"}),
                       (f"/api/v1/inbox/{entry['id']}/order", {"order": "after"})):
        status, out = await api.call("xa12", "POST", path, json=body)
        assert status == 404, (path, out)
    assert [e["area"] for e in (await api.call("xa12", "GET", "/api/v1/inbox"))[1]["entries"]] \
        == [X2]
    assert (await api.call("xa12", "GET", f"/api/v1/bulletins/{sent['id']}"))[0] == 404
    # The district reads its communes' entries.
    _, box = await api.call("huyen1", "GET", "/api/v1/inbox?state=pending")
    assert [e["area"] for e in box["entries"]] == [X3]


async def _is(value: Any, want: str) -> bool:
    return bool(await value == want)


async def test_the_commune_orders_a_priority_clash_with_its_own(api, tmp_path):
    own_pid = await approved_programme(api, tone_file(tmp_path / "own.wav", 500, 3))  # 7.5 s
    status, own = await api.call("xa11", "POST", "/api/v1/broadcasts",
                                 json={"programme": own_pid, "targets": [X1],
                                       "class": "priority"})
    assert status == 201, own
    own_length = api.node.engine.live_broadcast(own["id"]).source.length  # samples
    api.run(1)
    pid = await programme(api, tmp_path, "huyen1", 800, 2, approver="duyet1")
    at = api.node.engine.next_tick
    sent = await send(api, "huyen1", pid, [X1, X2], "priority")
    bid = sent["broadcast"]
    assert {e["state"] for e in sent["entries"]} == {"aired"}
    api.run(1)
    # Default "before": the district's bulletin takes the air from the commune's own at once.
    assert changes(api, X1)[1] == (at * FRAME, bid, "preempt")
    (entry,) = [e for e in sent["entries"] if e["area"] == X1]
    at2 = api.node.engine.next_tick
    status, out = await api.call("xa11", "POST", f"/api/v1/inbox/{entry['id']}/order",
                                 json={"order": "after"})
    assert status == 200 and out["order"] == "after"
    api.run(10)
    # "after": the commune's own is back at the next tick, resumes where it stopped, and the
    # district's bulletin airs the rest of its 2 s when the commune's own ends.
    got = changes(api, X1)
    assert got[2] == (at2 * FRAME, own["id"], "reorder")
    own_left = own_length - at * FRAME  # it started at tick 0
    assert got[3] == (math.ceil(own_left / FRAME) * FRAME + at2 * FRAME, bid, "finished")
    # X2 kept the default: the bulletin aired there at once, and ran to its end.
    assert [c for c in changes(api, X2) if c[1] == bid] == [(at * FRAME, bid, "start")]
    # An emergency or normal entry is not ordered; a bad order is named.
    status, out = await api.call("xa11", "POST", f"/api/v1/inbox/{entry['id']}/order",
                                 json={"order": "later"})
    assert status == 422 and out["field"] == "order"


async def test_an_emergency_from_above_airs_at_once_and_needs_no_one(api, tmp_path):
    pid = await programme(api, tmp_path, "tinh", 900, 2)
    status, out = await api.call("huyen1", "POST", "/api/v1/bulletins",
                                 json={"programme": pid, "targets": [X1], "class": "emergency"})
    assert status == 403, out  # the emergency right is granted, not a role's
    at = api.node.engine.next_tick
    sent = await send(api, "tinh", pid, ["T01-H2"], "emergency")
    api.run(1)
    for code in ("T01-H2-X1", "T01-H2-X2", "T01-H2-X3"):
        assert changes(api, code) == [(at * FRAME, sent["broadcast"], "start")]
        assert api.node.engine.on_air(code)["class"] == "emergency"
    assert changes(api, X1) == []
    assert {e["state"] for e in sent["entries"]} == {"aired"}
    # Through the emergency service, not as a bare broadcast: its record, its attention signal.
    em = await api.node.store.get("emergency", sent["emergency"])
    assert em is not None and em["broadcast"] == sent["broadcast"] and em["issuer"] == "T01"
    assert em["spec"]["attention"]["before"] is True, em["spec"]
    status, out = await api.call("huyen2", "POST",
                                 f"/api/v1/inbox/{sent['entries'][0]['id']}/order",
                                 json={"order": "after"})
    assert status == 409, out


async def test_a_commune_cannot_send_bulletins_up_or_sideways(api, tmp_path):
    pid = await programme(api, tmp_path, "huyen1", 600, 1, approver="duyet1")
    for who, targets, want in (("xa11", [X2], 403), ("xa11", ["T01-H1"], 403),
                               ("xa11", [X1], 403), ("huyen1", ["T01-H2-X1"], 403),
                               ("huyen1", ["T01"], 403), ("huyen1", ["T01-H1"], 403),
                               ("huyen1", ["NOWHERE"], 422)):
        status, out = await api.call(who, "POST", "/api/v1/bulletins",
                                     json={"programme": pid, "targets": targets})
        assert status == want and out["error"], (who, targets, out)
    assert await api.node.store.count("bulletin") == 0
    assert await api.node.store.count("inbox") == 0


async def test_inbox_changes_reach_the_commune_and_the_sender_on_the_event_stream(api, tmp_path):
    pid = await programme(api, tmp_path, "tinh", 650, 1)
    mine, sender, sibling = [await open_stream(api, w) for w in ("xa11", "tinh", "xa12")]
    sent = await send(api, "tinh", pid, [X1], "normal")
    (entry,) = sent["entries"]
    seen = await mine.until("inbox", id=entry["id"], state="pending")
    assert seen[-1][1]["from"] == "T01" and seen[-1][1]["area"] == X1
    await api.call("xa11", "POST", f"/api/v1/inbox/{entry['id']}/decline", json={"reason": "Bận"})
    seen = await sender.until("inbox", id=entry["id"], state="declined")
    assert seen[-1][1]["reason"] == "Bận"
    # The sibling commune hears nothing of X1's inbox: a later event of its own comes first.
    other = await send(api, "tinh", pid, [X2], "normal")
    seen = await sibling.until("inbox", area=X2)
    assert [d["id"] for n, d in seen if n == "inbox"] == [other["entries"][0]["id"]]


async def test_the_communes_order_survives_a_restart(tmp_path):
    cfg = make_config(tmp_path)
    async with running_api(cfg) as api:
        pid = await programme(api, tmp_path, "huyen1", 820, 30, approver="duyet1")
        sent = await send(api, "huyen1", pid, [X1, X2], "priority")
        (entry,) = [e for e in sent["entries"] if e["area"] == X1]
        status, _ = await api.call("xa11", "POST", f"/api/v1/inbox/{entry['id']}/order",
                                   json={"order": "after"})
        assert status == 200
    async with running_api(cfg) as api:
        restored = api.node.engine.live_broadcast(sent["broadcast"])
        assert restored is not None and restored.after_own == frozenset({X1})
