"""SSRF: the URLs the node opens for an operator (relay programmes, CAP resources) cannot reach the
node itself, loopback or link-local services, unless an operator allowed their network."""

from __future__ import annotations

import ipaddress

import pytest
from aiohttp import web

from loa.relay.urlpolicy import (
    FETCH_SCHEMES,
    RELAY_SCHEMES,
    FetchSettings,
    UrlRefused,
    check_url,
    own_addresses,
)
from loa.web.cap_fetch import cap_fetcher
from loa.web.config import ConfigError, load_config
from tests.apiclient import Api, make_config, running_api

REFUSED = ["http://127.0.0.1:8000/live.mp3", "http://[::1]/x", "http://[::ffff:127.0.0.1]/x",
           "http://169.254.169.254/latest/meta-data/", "http://0.0.0.0:80/", "rtsp://[fe80::1]/a",
           "http://localhost/x", "udp://255.255.255.255:5004", "http://239.1.2.3/x",
           "file:///etc/passwd", "ftp://10.0.0.1/a.mp3", "http:///nohost", "http://a:b:c/"]
ALLOWED = ["http://10.0.0.1:8000/live.mp3", "https://192.168.1.20/vov1.m3u8",
           "rtp://239.1.2.3:5004", "udp://172.16.0.9:5004", "rtsp://100.64.0.1/a",
           "http://8.8.8.8/x"]


@pytest.mark.parametrize("url", REFUSED)
async def test_refused_urls(url: str):
    with pytest.raises(UrlRefused) as e:
        await check_url(url, RELAY_SCHEMES, FetchSettings())
    assert " / " in str(e.value)


@pytest.mark.parametrize("url", ALLOWED)
async def test_private_public_and_multicast_urls_pass(url: str):
    await check_url(url, RELAY_SCHEMES, FetchSettings())


async def test_the_nodes_own_addresses_are_refused():
    own = [ip for ip in await own_addresses() if not ip.is_loopback and not ip.is_link_local]
    assert own, "this host has an address besides loopback"
    for ip in own:
        host = f"[{ip}]" if ip.version == 6 else str(ip)
        with pytest.raises(UrlRefused, match="own addresses"):
            await check_url(f"http://{host}:8080/streams/T01.mp3", RELAY_SCHEMES,
                            FetchSettings())


async def test_operator_allowed_networks_and_config():
    allow = FetchSettings(allow_networks=["127.0.0.0/8", "::1"])
    await check_url("http://127.0.0.1:8000/live.mp3", RELAY_SCHEMES, allow)
    await check_url("http://[::1]:8000/live.mp3", RELAY_SCHEMES, allow)
    with pytest.raises(UrlRefused):
        await check_url("http://169.254.169.254/", RELAY_SCHEMES, allow)
    with pytest.raises(UrlRefused):
        await check_url("rtp://127.0.0.1:5004", FETCH_SCHEMES, allow)  # scheme of another use
    cfg = load_config(None, env={"LOA_FETCH_ALLOW_NETWORKS": "127.0.0.0/8, 10.9.0.0/16"})
    assert cfg.fetch.allowed(ipaddress.ip_address("10.9.1.1"))
    with pytest.raises(ConfigError, match="allow_networks"):
        load_config(None, env={"LOA_FETCH_ALLOW_NETWORKS": "nhà-tôi"})


@pytest.fixture
async def api(tmp_path):
    async with running_api(make_config(tmp_path)) as a:
        yield a


def relay(url: str) -> dict[str, str]:
    return {"title": "Tiếp sóng", "type": "relay", "url": url}


async def test_relay_programmes_refuse_internal_urls_when_stored_and_when_aired(api: Api):
    for url in ("http://127.0.0.1:8080/streams/T01.mp3", "http://169.254.169.254/latest",
                "gopher://10.0.0.1/"):
        status, out = await api.call("tinh", "POST", "/api/v1/programmes", json=relay(url))
        assert status == 422 and out["field"] == "url", out
    status, prog = await api.call("tinh", "POST", "/api/v1/programmes",
                                  json=relay("http://10.20.30.40:8000/vov1.mp3"))
    assert status == 201, prog
    status, out = await api.call("tinh", "PATCH", f"/api/v1/programmes/{prog['id']}",
                                 json={"url": "http://[::1]/x"})
    assert status == 422 and out["field"] == "url", out
    # Stored when it was fine, points inside now (a name that resolves elsewhere): refused on air.
    await api.node.store.update("programme", prog["id"], {"url": "http://localhost:8080/x"})
    status, out = await api.call("tinh", "POST", "/api/v1/broadcasts",
                                 json={"programme": prog["id"], "targets": ["T01-H1"]})
    assert status == 422 and out["field"] == "url" and "loopback" in out["error"], out
    assert not api.node.inputs.inputs
    assert await api.node.store.count("broadcast") == 0


async def test_cap_resources_are_not_fetched_from_inside(api: Api):
    hits: list[str] = []

    async def serve(request: web.Request) -> web.StreamResponse:
        hits.append(request.path)
        raise web.HTTPFound(f"http://127.0.0.2:{request.url.port}/other.wav")

    app = web.Application()
    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        svc = api.node.emergency
        with pytest.raises(UrlRefused, match="loopback"):
            await cap_fetcher(svc.settings, FetchSettings())(f"http://127.0.0.1:{port}/clip.wav")
        assert hits == []
        # Allowed origin, but its redirect leads to a loopback address that is not.
        fetch = cap_fetcher(svc.settings, FetchSettings(allow_networks=["127.0.0.1/32"]))
        with pytest.raises(UrlRefused, match="127.0.0.2"):
            await fetch(f"http://127.0.0.1:{port}/clip.wav")
        assert hits == ["/clip.wav"]
    finally:
        await runner.cleanup()
