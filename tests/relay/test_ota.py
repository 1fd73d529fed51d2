"""OTA firmware with real reference agents against a real node on 127.0.0.1.

Images are signed here with a fresh ed25519 key the node and the agents trust; the agents run
in-process with their own state directories (version marker, images). What is checked: the
node refuses an image whose signature does not cover its bytes, model and version (422 naming
the field); a staged rollout updates the canary, then the next share, and halts (with the
`ota_halted` alert) when a device's new version does not start and rolls back, leaving the rest
untouched until a person resumes it; a download cut half-way resumes with `Range` from where it
stopped; an image tampered with on the node is refused by the agent, which keeps its version.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from loa.relay.agent.agent import Agent, AgentOptions
from loa.relay.agent.firmware import FIRMWARE
from loa.relay.devices.protocol import firmware_manifest
from tests import helpers
from tests.helpers import AREA, Server, stop_node, until

MODEL, OLD = FIRMWARE.split("/")
NEW = "9.0.0"
KEY = Ed25519PrivateKey.generate()
PUB = base64.b64encode(KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def sign(image: bytes, version: str = NEW, key: Ed25519PrivateKey = KEY) -> str:
    manifest = firmware_manifest(MODEL, version, len(image), hashlib.sha256(image).hexdigest())
    return base64.b64encode(key.sign(manifest)).decode()


def configure(cfg: Any) -> None:
    cfg.firmware.keys = [f"{MODEL}={PUB}"]
    cfg.devices.heartbeat = 1.0
    cfg.devices.retry_interval = 1.0


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    srv = await helpers.start_node(tmp_path / "node", configure, "T01-H2")  # T01-H1 is quiet
    try:
        yield srv
    finally:
        await stop_node(srv)


async def upload(srv: Server, image: bytes, version: str, signature: str,
                 model: str = MODEL) -> tuple[int, Any]:
    form = aiohttp.FormData()
    form.add_field("model", model)
    form.add_field("version", version)
    form.add_field("signature", signature)
    form.add_field("file", image, filename="fw.bin", content_type="application/octet-stream")
    async with srv.http.post(f"{srv.base}/api/v1/firmware", data=form,
                             headers=srv.headers()) as r:
        return r.status, await r.json()


class Running:
    def __init__(self, srv: Server, dev: str, key: str, state: Path, *, server: str = "",
                 boot_check: str | None = None) -> None:
        self.id = dev
        self.state = state
        self.agent = Agent(AgentOptions(server or srv.base, dev, key, state_dir=str(state),
                                        firmware_key=PUB, boot_check=boot_check))
        self.stop = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self.agent.run(self.stop))

    def marker(self) -> dict[str, Any]:
        path = self.state / "firmware.json"
        return dict(json.loads(path.read_text())) if path.exists() else {}

    async def finish(self) -> None:
        self.stop.set()
        assert await asyncio.wait_for(self.task, 20) == 0


async def agents(srv: Server, tmp: Path, n: int, failing: int | None = None, *,
                 server: str = "") -> list[Running]:
    out = []
    for i in range(n):  # registered in order: a rollout takes devices in this order
        dev, key = await srv.device(name=f"Cụm loa {i}")
        out.append(Running(srv, dev, key, tmp / f"dev{i}", server=server,
                           boot_check="false" if i == failing else None))
    reg = srv.node.devices
    await until(lambda: all(reg.devices[a.id].record.get("firmware") == FIRMWARE
                            for a in out), "every agent connected with its firmware", 60)
    return out


async def rollout(srv: Server, body: dict[str, Any]) -> dict[str, Any]:
    status, r = await srv.post("/api/v1/rollouts", body)
    assert status == 201, r
    return dict(r)


async def state_of(srv: Server, rid: str) -> dict[str, Any]:
    return dict(await srv.get(f"/api/v1/rollouts/{rid}"))


async def commands(srv: Server, dev: str) -> list[str]:
    rows = (await srv.get(f"/api/v1/devices/{dev}/commands"))["commands"]
    return [r["command"] for r in rows]


# ---- upload --------------------------------------------------------------------------------------
async def test_upload_refuses_what_the_signature_does_not_cover(server: Server) -> None:
    image = os.urandom(100_000)
    other = Ed25519PrivateKey.generate()
    for img, version, sig, model, field in (
            (image, NEW, sign(image, key=other), MODEL, "signature"),  # another key
            (image[:-1000], NEW, sign(image), MODEL, "signature"),  # truncated
            (image, "9.0.1", sign(image), MODEL, "signature"),  # relabelled version
            (image, NEW, "not base64!", MODEL, "signature"),
            (image, NEW, sign(image), "other-model", "model"),  # no key trusted for it
            (image, "9 0", sign(image), MODEL, "version")):
        status, body = await upload(server, img, version, sig, model)
        assert (status, body.get("field")) == (422, field), body
    assert (await server.get("/api/v1/firmware"))["firmware"] == []
    assert not [p for p in (server.node.ota.dir).iterdir()]  # no temp file left behind

    status, rec = await upload(server, image, NEW, sign(image))
    assert status == 201, rec
    assert (rec["model"], rec["version"], rec["size"]) == (MODEL, NEW, len(image))
    assert rec["sha256"] == hashlib.sha256(image).hexdigest()
    status, body = await upload(server, image, NEW, sign(image))
    assert (status, body["field"]) == (409, "version"), body
    audit = (await server.get("/api/v1/audit"))["entries"]
    assert [e["target"] for e in audit if e["action"] == "firmware.upload"] == [rec["id"]]


# ---- a staged rollout that halts -------------------------------------------------------------------
async def test_staged_rollout_halts_when_a_new_version_does_not_start(
        server: Server, tmp_path: Path) -> None:
    image = os.urandom(300_000)
    status, fw = await upload(server, image, NEW, sign(image))
    assert status == 201, fw
    fleet = await agents(server, tmp_path, 5, failing=2)
    a, b, c, d, e = fleet
    try:
        # canary 2, then 60 % (3 of 5), then all; no failure tolerated
        r = await rollout(server, {"firmware": fw["id"], "area": AREA, "canary": 2,
                                   "stages": [60, 100], "max_failures": 0})
        assert r["sizes"] == [2, 3, 5] and r["order"] == [x.id for x in fleet]

        async def halted() -> bool:
            return (await state_of(server, r["id"]))["state"] == "halted"

        await until(halted, "the rollout halted", 90)
        got = await state_of(server, r["id"])
        states = {i: got["devices"][i]["state"] for i in got["order"]}
        assert states == {a.id: "installed", b.id: "installed", c.id: "failed",
                          d.id: "pending", e.id: "pending"}, got
        assert got["devices"][c.id]["error"].startswith("rolled_back"), got["devices"][c.id]
        reg = server.node.devices.devices
        for x in (a, b):  # the new version runs and the node knows it
            assert x.marker()["version"] == NEW and x.marker()["trial"] is False
            assert reg[x.id].record["firmware"] == f"{MODEL}/{NEW}"
        # the one whose new version did not start is back on its old one, and says so
        assert c.marker()["version"] == OLD and c.marker()["trial"] is False
        await until(lambda: reg[c.id].record["firmware"] == FIRMWARE, "c back on the old", 30)
        # the rest got nothing
        for x in (d, e):
            assert "firmware" not in await commands(server, x.id)
            assert x.marker() == {} and reg[x.id].record["firmware"] == FIRMWARE
        alert = server.node.alerts.active[("ota_halted", r["id"])]
        assert alert.severity == "critical" and alert.area == AREA
        assert alert.detail["failed"] == [c.id]

        # a person resumes it: the failure is accepted, the last stage runs to the end
        status, body = await server.post(f"/api/v1/rollouts/{r['id']}/resume", {})
        assert status == 200, body
        assert ("ota_halted", r["id"]) not in server.node.alerts.active

        async def done() -> bool:
            return (await state_of(server, r["id"]))["state"] == "done"

        await until(done, "the rollout done", 90)
        got = await state_of(server, r["id"])
        assert got["counts"] == {"pending": 0, "sent": 0, "accepted": 0, "installed": 4,
                                 "failed": 1}, got
        assert d.marker()["version"] == NEW and e.marker()["version"] == NEW
    finally:
        for x in fleet:
            await x.finish()


# ---- a download cut half-way resumes with Range ------------------------------------------------------
class CuttingProxy:
    """A TCP proxy to the node that aborts the first firmware download once `cut_after` bytes
    of it went to the device (a 4G link dropping)."""

    def __init__(self, port: int, cut_after: int) -> None:
        self.target = port
        self.cut_after = cut_after
        self.cuts = 0
        self.firmware_bytes = 0  # sent to the device on firmware downloads, in all
        self.cut_at = 0  # ... until the cut
        self.port = 0

    async def start(self) -> CuttingProxy:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        download = asyncio.Event()  # the request on this connection now is a download

        async def up() -> None:
            while data := await reader.read(65536):
                if data[:4] in (b"GET ", b"HEAD", b"POST"):  # a request (keep-alive: again)
                    if data.split(b"\r\n", 1)[0].find(b" /api/v1/firmware/download") > 0:
                        download.set()
                    else:
                        download.clear()
                up_w.write(data)
                await up_w.drain()

        async def down() -> None:
            sent = 0
            while data := await up_r.read(65536):
                if download.is_set():
                    self.firmware_bytes += len(data)
                    sent += len(data)
                    if self.cuts == 0 and sent > self.cut_after:
                        self.cuts += 1
                        self.cut_at = self.firmware_bytes
                        writer.transport.abort()
                        up_w.transport.abort()
                        return
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except Exception:  # noqa: BLE001 - a dropped connection ends both directions
            pass
        finally:
            for t in tasks:
                t.cancel()
            writer.transport.abort()
            up_w.transport.abort()

    async def close(self) -> None:
        self.server.close()


async def test_a_download_cut_half_way_resumes_with_range(server: Server, tmp_path: Path) -> None:
    image = os.urandom(2_000_000)
    status, fw = await upload(server, image, NEW, sign(image))
    assert status == 201, fw
    proxy = await CuttingProxy(server.port, cut_after=1_000_000).start()
    fleet = await agents(server, tmp_path, 1, server=f"http://127.0.0.1:{proxy.port}")
    x = fleet[0]
    try:
        r = await rollout(server, {"firmware": fw["id"], "area": AREA, "canary": 1,
                                   "stages": [100]})

        async def done() -> bool:
            return (await state_of(server, r["id"]))["state"] == "done"

        await until(done, "the rollout done", 90)
        assert proxy.cuts == 1
        slot = x.agent.slot
        assert slot is not None
        first, *rest = slot.requests
        assert first["start"] == 0 and first["status"] == 200
        assert 0 < first["bytes"] < len(image)  # cut half-way
        assert rest and rest[0]["start"] == first["bytes"] and rest[0]["status"] == 206
        assert sum(q["bytes"] for q in slot.requests) == len(image)  # nothing fetched twice
        # after the cut the node sent only the rest (and a response header)
        assert 0 <= proxy.firmware_bytes - proxy.cut_at - (len(image) - first["bytes"]) < 1024
        assert (x.state / "images" / f"{NEW}.bin").read_bytes() == image
        assert x.marker()["version"] == NEW
    finally:
        await x.finish()
        await proxy.close()


# ---- a tampered image is refused by the device ------------------------------------------------------
async def test_an_image_tampered_with_on_the_node_is_refused_by_the_agent(
        server: Server, tmp_path: Path) -> None:
    image = os.urandom(200_000)
    status, fw = await upload(server, image, NEW, sign(image))
    assert status == 201, fw
    # Someone with the node's disk swaps the image and its recorded digest: only the vendor's
    # signature, which the device checks with its own key, still tells.
    bad = bytearray(image)
    bad[1000:1010] = b"\x00" * 10
    node = server.node
    path = node.ota.path_of(fw)
    path.write_bytes(bytes(bad))
    tampered = {**fw, "sha256": hashlib.sha256(bad).hexdigest()}
    path.rename(node.ota.path_of(tampered))
    await node.store.put("firmware", tampered)
    fleet = await agents(server, tmp_path, 1)
    x = fleet[0]
    try:
        r = await rollout(server, {"firmware": fw["id"], "area": AREA, "canary": 1,
                                   "stages": [100]})

        async def halted() -> bool:
            return (await state_of(server, r["id"]))["state"] == "halted"

        await until(halted, "the rollout halted", 60)
        d = (await state_of(server, r["id"]))["devices"][x.id]
        assert d["state"] == "failed" and d["error"].startswith("refused"), d
        assert "signature" in d["error"]
        assert x.marker() == {}  # never switched: the old version runs
        assert not list((x.state / "images").iterdir())  # the bad image is not kept
        assert node.devices.devices[x.id].record["firmware"] == FIRMWARE
        assert x.agent.firmware == FIRMWARE
    finally:
        await x.finish()


# ---- a start that died on trial ------------------------------------------------------------------
async def test_a_start_that_died_on_trial_rolls_back_at_the_next(tmp_path: Path) -> None:
    """A power cut (or a crash) during the first start of a new version: the marker says a start
    was tried and never decided, so the next start goes back to the previous version."""
    from loa.relay.agent.ota import FirmwareSlot
    from loa.relay.devices.protocol import parse_firmware_report

    (tmp_path / "firmware.json").write_text(json.dumps(
        {"version": NEW, "previous": OLD, "trial": True, "boots": 1, "command": "c1"}))
    slot = FirmwareSlot(tmp_path, FIRMWARE, None)
    slot.load()
    report = await slot.boot()
    assert report is not None
    assert parse_firmware_report(report)[:3] == ("c1", NEW, "rolled_back")
    assert slot.firmware == FIRMWARE
    assert json.loads((tmp_path / "firmware.json").read_text())["version"] == OLD
    assert await slot.boot() is None  # nothing on trial any more


# ---- who a rollout takes -------------------------------------------------------------------------
async def test_a_rollout_takes_the_model_in_the_area_and_group_and_checks_its_stages(
        server: Server) -> None:
    from loa.relay.agent.client import register

    async def dev(area: str, groups: list[str], firmware: str) -> str:
        did, _ = await register(server.http, server.base, server.token, name="Cụm",
                                kind="loudspeaker", area=area, groups=groups)
        await server.node.devices.update(did, {"firmware": firmware})  # as it would report
        return did

    d1 = await dev(AREA, ["cho"], FIRMWARE)
    d2 = await dev("T01-H1-X2", ["cho", "truong"], FIRMWARE)
    await dev(AREA, [], FIRMWARE)  # not in the group
    await dev("T01-H2-X1", ["cho"], FIRMWARE)  # another district
    await dev(AREA, ["cho"], "other-model/1.0")  # another model
    image = os.urandom(10_000)
    status, fw = await upload(server, image, NEW, sign(image))
    assert status == 201, fw
    base = {"firmware": fw["id"], "area": "T01-H1", "group": "cho"}
    for bad, field in (({"stages": [50]}, "stages"), ({"stages": [60, 40, 100]}, "stages"),
                       ({"canary": 0}, "canary"), ({"come_back_s": 1}, "come_back_s"),
                       ({"wave": 1}, "wave"), ({"group": "khong-co"}, "area"),
                       ({"firmware": "khong-co"}, "firmware")):
        status, body = await server.post("/api/v1/rollouts", {**base, **bad})
        assert (status, body.get("field")) == (422, field), (bad, body)
    assert await server.node.store.find("rollout") == []
    r = await rollout(server, {**base, "canary": 1, "stages": [50, 100]})
    assert r["order"] == [d1, d2] and r["sizes"] == [1, 1, 2]
    assert r["counts"]["sent"] == 1 and r["devices"][d1]["state"] == "sent"
    assert await commands(server, d1) == ["firmware"] and await commands(server, d2) == []
    status, body = await server.post(f"/api/v1/rollouts/{r['id']}/halt", {})
    assert status == 200 and body["state"] == "halted", body
    assert ("ota_halted", r["id"]) in server.node.alerts.active
    status, body = await server.post(f"/api/v1/rollouts/{r['id']}/halt", {})
    assert status == 409, body


def test_a_bad_trusted_key_stops_start_up() -> None:
    from loa.web.config import ConfigError, load_config

    cfg = load_config(None, env={"LOA_FIRMWARE_KEYS": f"{MODEL}={PUB}"})
    assert list(cfg.firmware.trusted()) == [MODEL]
    for bad in (f"{MODEL}=bm90IGEga2V5", PUB, f"={PUB}"):
        with pytest.raises(ConfigError):
            load_config(None, env={"LOA_FIRMWARE_KEYS": bad})
