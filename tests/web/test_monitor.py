"""The monitor: GET /api/v1/monitor scoped to the caller, GET /metrics parsed and checked, and the
/monitor page in a real Chromium that logs in, finds the area's programme and listens over WHEP.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import async_playwright

from loa.streamer.hub import PacketHub
from loa.streamer.sources import ToneSource
from loa.streamer.station import Content
from loa.web.auth import add_user
from loa.web.monitor import Exposition, RateSampler
from loa.web.node import Node
from loa.web.testing import running_node
from tests.apiclient import PASSWORD, PEOPLE, Api, make_config, running_api
from tests.helpers import get_metrics, parse_metrics, until, val

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
TITLE = "Bản tin thử nghiệm 440 Hz"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    # Host candidates as plain IPs: no mDNS .local names (their registration is multicast).
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    # No name lookups at all (the page is on 127.0.0.1): otherwise Chromium asks the network's
    # DNS for update, autofill and account services despite the flags above (seen by tcpdump).
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


async def air_tone(node: Node, klass: str = "priority") -> str:
    """The district T01-H1 airs a 440 Hz tone (persisted like any broadcast, user huyen1)."""
    rec = await node.station.air(Content(ToneSource(440, 0.3), TITLE, None),
                                 targets=["T01-H1"], klass=klass, issuer="T01-H1",
                                 user="huyen1")
    return str(rec["id"])


def area(body: dict, code: str) -> dict:
    found = [a for a in body["areas"] if a["code"] == code]
    assert len(found) == 1, [a["code"] for a in body["areas"]]
    return found[0]


# ---- JSON API (virtual clock) --------------------------------------------------------------------
@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with running_api(make_config(tmp_path)) as a:
        yield a


async def test_commune_operator_sees_only_its_commune(api: Api) -> None:
    node = api.node
    bid = await air_tone(node)
    x1 = await api.client.get("/streams/T01-H1-X1.opus")  # real HTTP listeners
    x2 = await api.client.get("/streams/T01-H1-X2.mp3")
    assert x1.status == 200 and x2.status == 200
    status, first = await api.call("xa11", "GET", "/api/v1/monitor")
    assert status == 200, first
    api.run(2.0)
    assert await x1.content.readexactly(4) == b"OggS"  # audio reached the listener
    streams = api.node.http.stats()["streams"]
    for _ in range(500):  # fan-out workers report their byte counters within a moment
        if all(x["bytes"] for x in streams):
            break
        await asyncio.sleep(0.02)
        streams = api.node.http.stats()["streams"]
    status, body = await api.call("xa11", "GET", "/api/v1/monitor")
    assert status == 200, body
    assert body["scope"] == "T01-H1-X1"
    assert [a["code"] for a in body["areas"]] == ["T01-H1-X1"]
    a = body["areas"][0]
    assert a["name"] == "Xã 1 huyện 1"
    on = a["on_air"]
    assert on["broadcast"] == bid and on["title"] == TITLE and on["class"] == "priority"
    assert on["issuer"] == "T01-H1" and on["user"] == "huyen1" and on["inherited"] is True
    assert on["authority"] == {"code": "T01-H1", "name": "Huyện 1", "level": "district",
                               "depth": 1}
    assert a["last_change"]["cause"] == "start" and a["last_change"]["to"] == bid
    assert a["listeners"] == {"http": 1, "rtp": None, "webrtc": 0, "hls": None, "total": 1}
    [http] = a["http"]
    assert http["codec"] == "opus" and http["listeners"] == 1 and http["bytes"] > 0
    [opus] = a["channels"]
    ch = node.hub.channels[("T01-H1-X1", "opus")]
    assert opus["codec"] == "opus" and opus["subscribers"] == 1
    assert opus["packets"] == ch.packets == a["packets"] == 100
    assert opus["bytes"] == ch.bytes
    # Two media seconds between the two requests: every 20 ms tick made one Opus packet.
    assert opus["packets_per_s"] == 50.0
    assert opus["bytes_per_s"] * 2.0 == pytest.approx(ch.bytes - first["areas"][0]["channels"][0]
                                                      ["bytes"], abs=0.2)
    n = body["node"]
    assert n["clock"]["realtime"] is False and n["clock"]["ticks"] == 100
    assert n["engine"]["broadcasts_on_air"] == {"emergency": 0, "priority": 1, "normal": 0,
                                                "background": 0}
    assert n["engine"]["encoders"] == 2  # one mix heard by X1 (opus) and X2 (mp3)
    assert n["devices"] == {"online": 0, "offline": 0, "fault": 0, "connected": 0, "total": 0}
    assert set(n["loop"]) == {"loop_lag_ms", "loop_lag_max_ms"}

    status, body = await api.call("huyen1", "GET", "/api/v1/monitor")
    assert [a["code"] for a in body["areas"]] == ["T01-H1", "T01-H1-X1", "T01-H1-X2",
                                                  "T01-H1-X3"]
    assert area(body, "T01-H1")["on_air"]["inherited"] is False
    assert area(body, "T01-H1-X2")["listeners"]["http"] == 1
    status, body = await api.call("tinh", "GET", "/api/v1/monitor?area=T01-H2")
    assert status == 200 and [a["code"] for a in body["areas"]][0] == "T01-H2"
    assert all(a["on_air"] is None for a in body["areas"])

    # One level at a time, with the totals of each listed area's whole subtree.
    status, body = await api.call("tinh", "GET", "/api/v1/monitor?depth=1")
    assert status == 200, body
    assert [a["code"] for a in body["areas"]] == ["T01", "T01-H1", "T01-H2"]
    assert body["path"] == [{"code": "T01", "name": "Tỉnh Mẫu"}]
    assert area(body, "T01")["listeners"]["http"] == 0
    assert area(body, "T01")["subtree"]["listeners"] == {"http": 2, "rtp": 0, "webrtc": 0}
    assert area(body, "T01-H1")["subtree"]["listeners"]["http"] == 2
    assert area(body, "T01-H1")["children"] == 3
    assert area(body, "T01-H2")["subtree"]["listeners"]["http"] == 0
    status, body = await api.call("huyen1", "GET", "/api/v1/monitor?area=T01-H1-X1&depth=0")
    assert body["path"] == [{"code": "T01-H1", "name": "Huyện 1"},
                            {"code": "T01-H1-X1", "name": "Xã 1 huyện 1"}]
    assert [a["code"] for a in body["areas"]] == ["T01-H1-X1"]
    assert body["areas"][0]["subtree"]["listeners"]["http"] == 1
    x1.close()
    x2.close()


async def test_monitor_refuses_out_of_scope_and_garbage(api: Api) -> None:
    status, body = await api.call("xa11", "GET", "/api/v1/monitor?area=T01-H1")
    assert status == 403 and "ngoài phạm vi" in body["error"]
    status, body = await api.call("xa11", "GET", "/api/v1/monitor?area=T01-H2-X1")
    assert status == 403
    status, body = await api.call("tinh", "GET", "/api/v1/monitor?area=NOPE%22%0A")
    assert status == 404 and body["field"] == "area"
    for bad in ("abc", "-1", "99", "1.5", "+1", " 1", "１", "9" * 40):
        status, body = await api.call("tinh", "GET", f"/api/v1/monitor?depth={bad}")
        assert status == 422 and body["field"] == "depth", bad
    status, body = await api.call(None, "GET", "/api/v1/monitor")
    assert status == 401
    r = await api.client.get("/api/v1/monitor", headers={"Authorization": "Bearer forged"})
    assert r.status == 401


async def test_page_and_assets_are_served(api: Api) -> None:
    r = await api.client.get("/monitor")
    assert r.status == 200 and r.headers["Content-Type"] == "text/html; charset=utf-8"
    html = await r.text()
    assert "Giám sát phát thanh" in html and "/monitor/monitor.js" in html
    for name, ctype in (("monitor.js", "text/javascript"), ("monitor.css", "text/css")):
        r = await api.client.get(f"/monitor/{name}")
        assert r.status == 200 and r.headers["Content-Type"].startswith(ctype)
        assert len(await r.read()) > 1000
    for bad in ("monitor.html.bak", "..%2Fapp.py", "%2e%2e%2fmonitor.py"):
        r = await api.client.get(f"/monitor/{bad}")
        assert r.status == 404, bad


# ---- /metrics ------------------------------------------------------------------------------------
async def test_metrics_series_and_values(api: Api) -> None:
    node = api.node
    # No warm time: the hub subscription goes with the last listener (asserted at the end).
    api.node.http.settings.warm_seconds = 0.0
    await air_tone(node, "emergency")
    listeners = [await api.client.get("/streams/T01-H1-X1.opus") for _ in range(2)]
    await get_metrics(api.client)  # first rate sample at media time 0
    api.run(1.0)
    series, types = await get_metrics(api.client)
    ch = node.hub.channels[("T01-H1-X1", "opus")]
    assert val(series, "loa_listeners", area="T01-H1-X1", transport="http") == 2
    assert val(series, "loa_http_listeners") == 2
    assert val(series, "loa_listeners", area="T01-H1-X1", transport="webrtc") == 0
    # One hub subscription serves both HTTP listeners (encode once, fan out).
    assert val(series, "loa_channel_subscribers", area="T01-H1-X1", codec="opus") == 1
    assert val(series, "loa_channel_packets_total", area="T01-H1-X1", codec="opus") \
        == ch.packets == 50
    assert val(series, "loa_channel_bytes_total", area="T01-H1-X1", codec="opus") == ch.bytes
    assert types["loa_channel_packets_total"] == "counter"
    assert types["loa_listeners"] == "gauge"
    assert val(series, "loa_broadcasts_on_air", **{"class": "emergency"}) == 1
    assert val(series, "loa_broadcasts_on_air", **{"class": "normal"}) == 0
    for code in ("T01-H1", "T01-H1-X1", "T01-H1-X2", "T01-H1-X3"):
        assert val(series, "loa_area_on_air", area=code, **{"class": "emergency"}) == 1
    assert not [k for k in series if k[0] == "loa_area_on_air" and ("area", "T01-H2") in k[1]]
    assert val(series, "loa_engine_ticks_total") == 50
    assert val(series, "loa_clock_ticks_total") == 50
    assert val(series, "loa_clock_realtime") == 0
    assert val(series, "loa_encoders") == 1 and val(series, "loa_mixes_consumed") == 1
    assert val(series, "loa_devices", status="online") == 0
    assert val(series, "loa_webrtc_peers") == 0
    # Bounded cardinality: only an area somebody listens to has per area listener series.
    assert {dict(k[1])["area"] for k in series if k[0] == "loa_listeners"} == {"T01-H1-X1"}
    assert {k for k in series if k[0] == "loa_listeners"} == {
        ("loa_listeners", frozenset({("area", "T01-H1-X1"), ("transport", t)}))
        for t in ("http", "webrtc")}  # RTP is off here; HLS has no per-client figure
    for r in listeners:
        r.close()

    async def gone() -> bool:
        series, _ = await get_metrics(api.client)
        return val(series, "loa_listeners", area="T01-H1-X1", transport="http") == 0

    await until(gone, "the HTTP listeners counted out after they hung up", timeout=20.0, step=0.1)
    series, _ = await get_metrics(api.client)
    assert val(series, "loa_http_listeners") == 0
    assert val(series, "loa_channel_subscribers", area="T01-H1-X1", codec="opus") == 0


async def test_metrics_count_devices_online_and_offline(api: Api) -> None:
    status, dev = await api.call("qtv1", "POST", "/api/v1/devices", json={
        "name": "Cụm loa chợ", "kind": "loudspeaker", "area": "T01-H1-X1"})
    assert status == 201, dev
    status, dev2 = await api.call("qtv1", "POST", "/api/v1/devices", json={
        "name": "Cụm loa trường", "kind": "loudspeaker", "area": "T01-H1-X2"})
    assert status == 201, dev2
    series, _ = await get_metrics(api.client)
    assert val(series, "loa_devices", status="offline") == 2
    assert val(series, "loa_devices", status="online") == 0
    status, keyed = await api.call(None, "POST", "/api/v1/devices/provision",
                                   json={"device": dev["id"], "token": dev["provisioning_token"]})
    assert status == 201, keyed
    ws = await api.client.ws_connect("/api/v1/devices/connect")
    await ws.send_str(json.dumps({"v": 1, "type": "hello", "device": dev["id"],
                                  "key": keyed["key"], "firmware": "test"}))
    welcome = json.loads((await ws.receive(timeout=10)).data)
    assert welcome["type"] == "welcome"
    series, _ = await get_metrics(api.client)
    assert val(series, "loa_devices", status="online") == 1
    assert val(series, "loa_devices", status="offline") == 1
    assert val(series, "loa_devices_connected") == 1
    assert val(series, "loa_area_devices", area="T01-H1-X1", status="online") == 1
    assert val(series, "loa_area_devices", area="T01-H1-X2", status="offline") == 1
    status, body = await api.call("xa11", "GET", "/api/v1/monitor")
    assert body["node"]["devices"]["online"] == 1 and body["node"]["devices"]["total"] == 1
    assert body["areas"][0]["devices"] == {"online": 1, "offline": 0, "fault": 0}
    status, body = await api.call("huyen1", "GET", "/api/v1/monitor")
    assert body["node"]["devices"]["total"] == 2
    await ws.close()


def test_rate_sampler_starts_a_new_channel_at_its_first_sample() -> None:
    hub = PacketHub()
    now = [0.0]
    sampler = RateSampler(hub, lambda: now[0], interval=1.0, window=3.0)
    a = hub.channel("A", "opus")
    sampler.sample()
    for t in (1.0, 2.0, 3.0, 4.0):
        a.bytes += 4000
        a.packets += 50
        if t == 3.0:
            b = hub.channel("B", "mp3")  # appears late: rated from its own first sample
        if t == 4.0:
            b.bytes += 3000
            b.packets += 40
        now[0] = t
        sampler.sample()
    assert [t for t, _ in sampler.samples] == [1.0, 2.0, 3.0, 4.0]  # the window keeps 3 s
    assert sampler.rates() == {("A", "opus"): (4000.0, 50.0), ("B", "mp3"): (3000.0, 40.0)}
    now[0] = 4.2  # too soon after the last sample: not kept
    sampler.sample()
    assert len(sampler.samples) == 4


def test_exposition_escapes_label_values() -> None:
    e = Exposition()
    e.add("loa_x", "gauge", "A test.", [({"area": 'a"b\\c\nd'}, 1), ({"area": "e"}, 2.5)])
    e.one("loa_y", "counter", "Another.", None)
    series, types = parse_metrics(e.text())
    assert val(series, "loa_x", area='a"b\\c\nd') == 1
    assert val(series, "loa_x", area="e") == 2.5
    assert str(val(series, "loa_y")) == "nan" and types == {"loa_x": "gauge", "loa_y": "counter"}


# ---- RTP receivers (real RtpOut on loopback) ----------------------------------------------------
async def test_rtp_receivers_are_counted(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    cfg.rtp.enabled = True
    cfg.rtp.interface = "127.0.0.1"
    cfg.rtp.ttl = 0
    cfg.rtp.multicast = False
    async with running_api(cfg) as api:
        out = api.node.rtp
        out.add_receiver("T01-H1-X1", "opus", "127.0.0.1", 39_000)
        out.add_receiver("T01-H1-X1", "opus", "127.0.0.1", 39_002)
        status, body = await api.call("xa11", "GET", "/api/v1/monitor")
        a = body["areas"][0]
        assert a["listeners"]["rtp"] == 2 and a["rtp_multicast"] is False
        [st] = [s for s in a["rtp"] if s["codec"] == "opus"]
        assert st["receivers"] == 2 and st["active"] is True
        series, _ = await get_metrics(api.client)
        assert val(series, "loa_rtp_receivers", area="T01-H1-X1", codec="opus") == 2
        assert val(series, "loa_listeners", area="T01-H1-X1", transport="rtp") == 2
        # The RTP stream's hub subscription is not counted as an HTTP listener.
        assert val(series, "loa_listeners", area="T01-H1-X1", transport="http") == 0


# ---- the page in Chromium, on a real node ---------------------------------------------------------
@dataclass
class Server:
    node: Node
    app: web.Application
    base: str
    http: aiohttp.ClientSession


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    cfg = make_config(tmp_path)
    cfg.webrtc.ice_addresses = "127.0.0.1"

    async def people(node: Node) -> None:
        for name, (role, code, emergency) in PEOPLE.items():
            await add_user(node.store, node.tree, name, role, code, PASSWORD, emergency)

    async with running_node(cfg, prepare=people) as live, aiohttp.ClientSession() as http:
        yield Server(live.node, live.app, live.url, http)


async def test_page_logs_in_shows_the_area_and_listens(server: Server) -> None:
    bid = await air_tone(server.node)
    relay = server.node.webrtc
    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(server.base + "/monitor")
            await page.wait_for_selector("#login-view:not([hidden])")
            assert await page.is_hidden("#logout")  # nobody is logged in yet
            await page.fill("#username", "xa11")
            await page.fill("#password", "wrong-password")
            await page.click("#login-button")
            await page.wait_for_selector("#login-error:not([hidden])")
            assert "đăng nhập" in (await page.text_content("#login-error") or "").lower()
            await page.fill("#password", PASSWORD)
            await page.click("#login-button")
            row = page.locator('tr[data-area="T01-H1-X1"]')
            await row.wait_for()
            assert await page.is_visible("#logout")
            await page.wait_for_function(
                "document.querySelector('tr[data-area=\"T01-H1-X1\"] .c-onair .title')")
            assert await row.locator(".c-onair .title").text_content() == TITLE
            assert "Ưu tiên / Priority" in (await row.locator(".c-why").text_content() or "")
            assert "Huyện 1 (T01-H1)" in (await row.locator(".c-why").text_content() or "")
            assert await page.locator("#areas tbody tr").count() == 1  # a commune sees itself
            assert await page.evaluate("sessionStorage.getItem('loa.monitor.token')")

            await row.locator("button.listen").click()
            await until(lambda: page.evaluate("window.loaMonitor.bytesReceived() > 0"),
                        "audio bytes in the page", timeout=20.0, step=0.1)
            assert len(relay.whep) == 1
            [session] = relay.whep.values()
            assert session.area == "T01-H1-X1" and session.connected is not None

            # The server sees the peer: the monitor counts it and reports its quality.
            async def peer_reported() -> bool:
                async with server.http.get(server.base + "/api/v1/monitor", headers={
                        "Authorization": "Bearer " + str(await page.evaluate(
                            "sessionStorage.getItem('loa.monitor.token')"))}) as r:
                    body = await r.json()
                a = body["areas"][0]
                return a["listeners"]["webrtc"] == 1 and bool(a["webrtc"]) and \
                    a["webrtc"][0]["packets_sent"] and a["quality"]["rtt_ms_max"] is not None

            await until(peer_reported, "the peer in /api/v1/monitor with an RTT", timeout=20.0, step=0.1)
            await until(lambda: page.evaluate(
                "document.querySelector('tr[data-area=\"T01-H1-X1\"] .c-webrtc')"
                ".textContent === '1'"), "the page counting its own WebRTC peer", timeout=20.0, step=0.1)
            await until(lambda: page.evaluate(
                "/^RTT [0-9]/.test(document.querySelector("
                "'tr[data-area=\"T01-H1-X1\"] .c-quality').textContent)"),
                "the peer's RTT in the page", timeout=20.0, step=0.1)
            # Audio keeps flowing (not just a first burst).
            seen = await page.evaluate("window.loaMonitor.bytesReceived()")
            await until(lambda: page.evaluate(f"window.loaMonitor.bytesReceived() > {seen}"),
                        "more audio bytes in the page", timeout=20.0, step=0.1)
            # What plays is the programme: the analyser of the page's level meter finds the
            # tone (one FFT bin is 48000/4096 = 11.7 Hz wide).
            await until(lambda: page.evaluate(
                "isFinite(parseFloat(document.getElementById('listen-level').dataset.value))"),
                "a sound level in the page", timeout=20.0, step=0.1)
            level = float(await page.evaluate(
                "document.getElementById('listen-level').dataset.value"))
            assert -20 < level < -6  # a 0.3 sine is -13.5 dBFS
            assert abs(await page.evaluate("window.loaMonitor.peakHz()") - 440) < 15
            await page.screenshot(path=str(ARTIFACTS / "monitor.png"), full_page=True)
            assert (await page.text_content("#listen-codec") or "").lower().startswith(
                "audio/opus")

            # A province operator opens the page too: one level at a time, with subtree totals.
            page2 = await browser.new_page(viewport={"width": 1400, "height": 900})
            page2.on("pageerror", lambda e: errors.append(str(e)))
            await page2.goto(server.base + "/monitor")
            await page2.fill("#username", "tinh")
            await page2.fill("#password", PASSWORD)
            await page2.click("#login-button")
            h1 = page2.locator('tr[data-area="T01-H1"]')
            await h1.wait_for()
            assert await page2.locator("#areas tbody tr").count() == 3  # T01, T01-H1, T01-H2
            await until(lambda: page2.evaluate(
                "(document.querySelector('tr[data-area=\"T01-H1\"] .c-webrtc .sum') || {})"
                ".textContent === 'Σ 1'"), "the district's subtree counting the peer", timeout=20.0, step=0.1)
            await h1.locator("button.drill").click()
            x1 = page2.locator('tr[data-area="T01-H1-X1"] .c-onair .title')
            await x1.wait_for()
            assert await x1.text_content() == TITLE
            assert await page2.locator("#areas tbody tr").count() == 4  # T01-H1 and 3 communes
            assert (await page2.text_content("#crumbs") or "").startswith("Tỉnh Mẫu›Huyện 1")
            assert await page2.evaluate("location.hash") == "#area=T01-H1"
            await page2.screenshot(path=str(ARTIFACTS / "monitor-province.png"), full_page=True)
            await page2.click("#crumbs button.crumb")
            await page2.locator('tr[data-area="T01-H2"]').wait_for()
            await page2.close()

            series, _ = await get_metrics(server.http, server.base + "/metrics")
            assert val(series, "loa_webrtc_peers") == 1
            assert val(series, "loa_listeners", area="T01-H1-X1", transport="webrtc") == 1
            assert val(series, "loa_clock_realtime") == 1
            assert val(series, "loa_area_on_air", area="T01-H1-X1", **{"class": "priority"}) == 1

            await page.click("#listen-stop")
            await until(lambda: not relay.whep, "the WHEP session deleted by the page", timeout=20.0, step=0.1)
            assert errors == []
        finally:
            await browser.close()
    assert server.node.engine.on_air("T01-H1-X1")["broadcast"] == bid  # nothing stopped it


async def test_active_alerts_are_in_the_monitor_of_their_subtree_and_in_metrics(api: Api) -> None:
    from loa.streamer.alerts import Alert
    alerts = api.node.alerts
    alerts.raise_(Alert("device_offline", "loa-x11", "T01-H1-X1", "mất kết nối / offline"))
    alerts.raise_(Alert("dead_air", "T01-H2-X1", "T01-H2-X1", "im lặng / dead air", "critical"))
    status, body = await api.call("xa11", "GET", "/api/v1/monitor")
    assert status == 200, body
    assert [(a["kind"], a["area"]) for a in body["node"]["alerts"]] == [
        ("device_offline", "T01-H1-X1")]  # the other commune's alert is not its business
    status, body = await api.call("tinh", "GET", "/api/v1/monitor")
    assert {a["kind"] for a in body["node"]["alerts"]} == {"device_offline", "dead_air"}
    series, _ = await get_metrics(api.client)
    assert val(series, "loa_alerts_active", kind="dead_air", severity="critical") == 1
    alerts.clear("dead_air", "T01-H2-X1")
    status, body = await api.call("tinh", "GET", "/api/v1/monitor")
    assert [a["kind"] for a in body["node"]["alerts"]] == ["device_offline"]
