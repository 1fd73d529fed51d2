"""FM programmes (issue 14): a commune's loudspeakers with an FM receiver tune the station while
its programme wins the area, and give it back when an emergency preempts it or it ends; the
others hear the area's stream, which holds the programme's place in silence."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from loa.relay.devices.protocol import ProtocolError, parse_heartbeat, validate_command
from tests.emergencynode import DeviceWs, Srv, live_config, serving

X1 = "T01-H1-X1"


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[Srv]:
    async with serving(live_config(tmp_path)) as s:
        yield s


async def fm_programme(srv: Srv, **fields: object) -> tuple[int, dict]:
    return await srv.call("bientap11", "POST", "/api/v1/programmes", json={
        "title": "Đài PT-TH tỉnh FM", "type": "fm", **fields})


async def no_command(dev: DeviceWs, name: str) -> bool:
    try:
        await dev.command(name, timeout=0.5)
    except TimeoutError:
        return True
    return False


async def test_receivers_tune_while_the_fm_programme_wins_and_give_it_back(srv: Srv):
    for bad, name in (({"frequency_mhz": 120.0, "duration": 60}, "frequency_mhz"),
                      ({"frequency_mhz": 99.9}, "duration"),
                      ({"frequency_mhz": 99.9, "duration": 0}, "duration")):
        status, out = await fm_programme(srv, **bad)
        assert (status, out.get("field")) == (422, name), out
    status, prog = await fm_programme(srv, frequency_mhz=99.9, duration=20)
    assert status == 201 and prog["duration"] == 20, prog
    for who, action in (("bientap11", "submit"), ("duyet1", "approve")):
        assert (await srv.call(who, "POST", f"/api/v1/programmes/{prog['id']}/{action}"))[0] == 200
    receiver = await srv.device(X1, fm=True)
    plain = await srv.device(X1)

    status, b = await srv.call("xa11", "POST", "/api/v1/broadcasts",
                               json={"programme": prog["id"], "targets": [X1]})
    assert status == 201, b
    srv.run(0.2)
    tuned = await receiver.command("fm")
    assert tuned["args"] == {"on": True, "frequency_mhz": 99.9}, tuned
    assert srv.node.engine.on_air(X1)["broadcast"] == b["id"]  # ranked like any programme
    assert await no_command(plain, "fm")  # no receiver: it plays the stream

    status, em = await srv.call("xa11em", "POST", "/api/v1/emergencies",
                                json={"targets": [X1], "content": {"text": "Lũ về"}})
    assert status == 201, em
    srv.run(0.2)
    assert (await receiver.command("fm"))["args"] == {"on": False}  # back to the stream
    assert (await srv.call("xa11em", "DELETE", f"/api/v1/emergencies/{em['id']}"))[0] == 200
    srv.run(0.5)
    assert (await receiver.command("fm"))["args"] == {"on": True, "frequency_mhz": 99.9}
    srv.run(21)  # the programme's end
    await asyncio.sleep(0.05)
    assert srv.node.engine.on_air(X1)["broadcast"] is None
    assert (await receiver.command("fm"))["args"] == {"on": False}


def test_the_fm_command_and_the_tuners_telemetry_are_checked():
    assert validate_command("fm", {"on": True, "frequency_mhz": 87.5}) == {
        "on": True, "frequency_mhz": 87.5}
    assert validate_command("fm", {"on": False}) == {"on": False}
    for bad, name in (({"on": True}, "args.frequency_mhz"), ({"on": True, "frequency_mhz": 50},
                                                               "args.frequency_mhz"),
                      ({"frequency_mhz": 99.9}, "args.on"), ({"on": False, "x": 1}, "args")):
        with pytest.raises(ProtocolError) as e:
            validate_command("fm", bad)
        assert e.value.field == name, (bad, e.value.field)
    beat = parse_heartbeat({"state": "playing", "fm": {"on": True, "frequency_mhz": 99.9,
                                                       "rssi_dbm": -61}})
    assert beat["fm"] == {"on": True, "frequency_mhz": 99.9, "rssi_dbm": -61}
    with pytest.raises(ProtocolError):
        parse_heartbeat({"state": "playing", "fm": {"frequency_mhz": 99.9}})
