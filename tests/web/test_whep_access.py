"""WHEP is open to anyone: offers are rate-limited per address, and an area may require a listen
token (or a logged-in user's token whose subtree holds the area)."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiortc import RTCSessionDescription

from loa.web.config import ConfigError
from loa.web.node import Node
from loa.web.offer_buckets import OfferBuckets
from tests.apiclient import make_config
from tests.webrtcpeers import SDP, offer_pc, start_server

LISTEN = "bi-mat-nghe-123"


async def test_offers_are_rate_limited_per_address(tmp_path: Path):
    srv, runner = await start_server(tmp_path, whep_burst=3, whep_offers_per_s=0.05)
    try:
        statuses = []
        for _ in range(5):  # a malformed offer still spends a token: a flood costs nothing else
            async with srv.http.post(f"{srv.base}/whep/T01-H1-X1", data="v=0",
                                     headers=SDP) as r:
                statuses.append(r.status)
                retry = r.headers.get("Retry-After")
        assert statuses == [400, 400, 400, 429, 429], statuses
        assert retry is not None and int(retry) >= 1
    finally:
        await srv.http.close()
        await runner.cleanup()
        await srv.node.stop()


def test_bucket_refills_and_forgets():
    b = OfferBuckets(rate=2.0, burst=2)
    assert b.take("a", 0.0) == 0 and b.take("a", 0.0) == 0
    assert b.take("a", 0.0) == pytest.approx(0.5)
    assert b.take("b", 0.0) == 0  # another address has its own bucket
    assert b.take("a", 0.5) == 0  # refilled


async def test_listen_token_guards_the_area_and_below(tmp_path: Path):
    srv, runner = await start_server(tmp_path, listen_tokens=[f"T01-H1={LISTEN}"])
    try:
        async def post(area: str, body: str = "v=0", token: str | None = None,
                       query: str = "") -> int:
            headers = {**SDP, **({"Authorization": f"Bearer {token}"} if token else {})}
            async with srv.http.post(f"{srv.base}/whep/{area}{query}", data=body,
                                     headers=headers) as r:
                return r.status

        assert await post("T01-H1-X1") == 401
        assert await post("T01-H1-X1", token="sai-roi-sai-roi") == 401
        assert await post("T01-H1-X1", query="?token=sai") == 401
        assert await post("T01-H1-X1", token=await srv.token("huyen2")) == 403  # other district
        # Past the token check, the offer itself is looked at (400: "v=0" is no offer).
        assert await post("T01-H1-X1", token=LISTEN) == 400
        assert await post("T01-H1-X1", query=f"?token={LISTEN}") == 400
        assert await post("T01-H1-X1", token=await srv.token("xa11")) == 400  # a user of it
        assert await post("T01-H1-X1", token=await srv.token("tinh")) == 400  # above it
        assert await post("T01-H2-X1") == 400  # no token configured there
        # A real offer with the monitor's credential (the logged-in user's token) is answered.
        pc = offer_pc("recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        async with srv.http.post(f"{srv.base}/whep/T01-H1-X1", data=pc.localDescription.sdp,
                                 headers=await srv.bearer("huyen1")) as r:
            assert r.status == 201, await r.text()
            await pc.setRemoteDescription(RTCSessionDescription(await r.text(), "answer"))
        await pc.close()
        refused = [e for e in await srv.node.store.read_log("audit") if e["action"] == "refused"]
        assert [e["details"]["status"] for e in refused] == [401, 401, 401, 403]
        assert LISTEN not in str(refused)
    finally:
        await srv.http.close()
        await runner.cleanup()
        await srv.node.stop()


@pytest.mark.parametrize("entry", ["NOPE=bi-mat-nghe-123", "T01=ngan", "T01"])
async def test_bad_listen_tokens_stop_start_up(tmp_path: Path, entry: str):
    cfg = make_config(tmp_path)
    cfg.webrtc.listen_tokens = [entry]
    node = Node(cfg, realtime=False)
    try:
        with pytest.raises(ConfigError, match="listen_tokens"):
            await node.start()
    finally:
        await node.stop()
