"""Area coordinates and the map (issue 13): the area CSV's optional lat, lon columns, checked row
by row and kept through a restart; devices' GPS from their heartbeats over the real control
channel; GET /api/v1/map.geojson scoped to the caller's subtree; CAP polygons then select the
imported areas (before and after a restart)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from loa.streamer.emergency.cap import NS
from tests.apiclient import Api, make_config, running_api
from tests.helpers import until

ICT = timezone(timedelta(hours=7))
CSV = ("code,name,level,parent_code,lat,lon\n"
       "T01-H1-X4,Xã 4 huyện 1,commune,T01-H1,15.8801,108.3302\n"
       "T01-H1-X5,Xã 5 huyện 1,commune,T01-H1,,\n")
# a ring around T01-H1-X4's point only
RING = "15.85,108.30 15.90,108.30 15.90,108.36 15.85,108.36 15.85,108.30"


def cap_polygon(identifier: str) -> bytes:
    sent = datetime.now(ICT).replace(microsecond=0).isoformat()
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<alert xmlns="{NS}">'
            f"<identifier>{identifier}</identifier><sender>kttv@tinh.gov.vn</sender>"
            f"<sent>{sent}</sent><status>Actual</status><msgType>Alert</msgType>"
            f"<scope>Public</scope><info><language>vi-VN</language><category>Met</category>"
            f"<event>Lũ quét</event><urgency>Immediate</urgency><severity>Extreme</severity>"
            f"<certainty>Observed</certainty><headline>Lũ quét</headline>"
            f"<description>Nước lên nhanh.</description><area><areaDesc>Vùng trũng</areaDesc>"
            f"<polygon>{RING}</polygon></area></info></alert>").encode()


async def _import(api: Api, text: str, dry: bool = False) -> tuple[int, Any]:
    return await api.call("qtv1", "POST", "/api/v1/areas/import" + ("?dry_run=1" if dry else ""),
                          data=text.encode(), headers={"Content-Type": "text/csv"})


def _features(geo: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["properties"].get("code") or f["properties"]["id"]: f for f in geo["features"]}


async def test_coordinates_geojson_and_cap_polygons(tmp_path: Path) -> None:
    async with running_api(make_config(tmp_path)) as api:
        # a bad coordinate is refused with its line and field; nothing is stored
        status, got = await _import(api, CSV.replace("15.8801", "95"), dry=True)
        assert status == 200 and not got["valid"], got
        assert [(p["line"], p["field"]) for p in got["errors"]] == [(2, "lat")]
        assert "độ thập phân" in got["errors"][0]["error"]
        status, got = await _import(api, CSV.replace("108.3302", ""))
        assert status == 422 and got["line"] == 2, got
        assert "T01-H1-X4" not in api.node.tree
        status, got = await _import(api, CSV, dry=True)
        assert status == 200 and got["rows"][0]["lat"] == 15.8801 and got["rows"][1]["lat"] is None
        status, got = await _import(api, CSV)
        assert status == 201, got

        # a loudspeaker of X4 with a GPS fix, over the real control channel
        status, dev = await api.call("qtv1", "POST", "/api/v1/devices", json={
            "name": "Cụm loa đầu cầu", "kind": "loudspeaker", "area": "T01-H1-X4"})
        assert status == 201, dev
        status, prov = await api.call(None, "POST", "/api/v1/devices/provision", json={
            "device": dev["id"], "token": dev["provisioning_token"]})
        assert status == 201
        async with api.client.ws_connect("/api/v1/devices/connect") as ws:
            await ws.send_json({"v": 1, "type": "hello", "device": dev["id"], "key": prov["key"],
                                "firmware": "2.4.1"})
            assert (await ws.receive_json(timeout=10))["type"] == "welcome"
            await ws.send_json({"v": 1, "type": "heartbeat", "state": "playing",
                                "gps": [15.8812, 108.3311], "faults": []})
            await until(lambda: (api.node.devices.get(dev["id"]) or _none()).telemetry,
                        "the heartbeat kept")

        r = await api.client.get("/api/v1/map.geojson?area=T01-H1",
                                 headers=api.auth("huyen1"))
        assert r.status == 200 and r.content_type == "application/geo+json"
        geo = json.loads(await r.text())
        assert geo["type"] == "FeatureCollection"
        f = _features(geo)
        assert "T01-H1-X5" not in f  # no coordinates, not on the map
        x4 = f["T01-H1-X4"]
        assert x4["geometry"] == {"type": "Point", "coordinates": [108.3302, 15.8801]}
        assert x4["properties"]["name"] == "Xã 4 huyện 1"
        speaker = f[dev["id"]]
        assert speaker["geometry"]["coordinates"] == [108.3311, 15.8812]
        assert speaker["properties"]["kind"] == "loudspeaker"
        assert speaker["properties"]["area"] == "T01-H1-X4"
        # depth 0: the area alone; a filter the device list knows; other districts: 403
        status, geo = await api.call("huyen1", "GET", "/api/v1/map.geojson?depth=0&kind=board")
        assert status == 200 and json.loads(geo)["features"] == []
        status, bad = await api.call("huyen1", "GET", "/api/v1/map.geojson?status=lost")
        assert status == 422 and bad["field"] == "status"
        status, _ = await api.call("huyen2", "GET", "/api/v1/map.geojson?area=T01-H1")
        assert status == 403
        status, geo = await api.call("xa11", "GET", "/api/v1/map.geojson")
        assert status == 200 and json.loads(geo)["features"] == []  # X1: no coordinates, device

        # CAP: a polygon selects the imported area by its point
        status, em = await api.call("tinh", "POST", "/api/v1/alerts", data=cap_polygon("GEO-1"),
                                    headers={"Content-Type": "application/cap+xml"})
        assert status == 201, em
        assert em["areas"] == ["T01-H1-X4"]

    # after a restart the tree read back from the store keeps the coordinates
    async with running_api(make_config(tmp_path)) as api:
        assert (api.node.tree.get("T01-H1-X4").lat, api.node.tree.get("T01-H1-X4").lon) == (
            15.8801, 108.3302)
        status, em = await api.call("tinh", "POST", "/api/v1/alerts", data=cap_polygon("GEO-2"),
                                    headers={"Content-Type": "application/cap+xml"})
        assert status == 201, em
        assert em["areas"] == ["T01-H1-X4"]


def _none() -> Any:
    raise AssertionError("the device is not registered")
