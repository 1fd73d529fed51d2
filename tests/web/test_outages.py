"""Availability reports (JSON, CSV and XLSX parsed back) and alerts to people: a signed webhook
received by a real aiohttp server and retried after it failed, across a restart; mail received
by a local SMTP server (aiosmtpd); a flapping cluster sending a bounded number of mails; the
daily digest at its local time; another commune refused."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import socket
from collections.abc import AsyncIterator
from datetime import datetime
from email import message_from_bytes, policy
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from openpyxl import load_workbook
from playwright.async_api import expect

from loa.relay.devices.history import TZ, month_bounds
from loa.relay.devices.manager import DeviceSettings
from loa.relay.devices.records import new_device_record, new_key, secret_hash
from loa.relay.exchange import PEER, SIGNATURE, TIMESTAMP, signature
from loa.streamer.alerts import Alert
from loa.web.config import Config
from loa.web.node import Node
from tests.apiclient import Api, make_config, running_api
from tests.emergencynode import live_config, serving
from tests.web.browser import axe_violations, chromium, login, phone, shots


async def until(cond: Any, timeout: float = 10.0) -> None:
    """Wait for `cond()` (awaited if a coroutine): a bound for a hung test, not a speed check."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        v = cond()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return
        assert loop.time() < deadline, "condition never held"
        await asyncio.sleep(0.02)


def config(tmp_path: Path, **alerts: Any) -> Config:
    cfg = make_config(tmp_path)
    cfg.fetch.allow_networks = ["127.0.0.0/8"]  # the test's webhook receiver
    cfg.fetch.__post_init__()
    cfg.alerts.retry_min, cfg.alerts.retry_max = 0.05, 0.2
    for k, v in alerts.items():
        setattr(cfg.alerts, k, v)
    return cfg


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with running_api(config(tmp_path)) as a:
        yield a


# ---- reports -----------------------------------------------------------------------------------
async def seed(node: Node) -> tuple[str, str, float]:
    """Two devices in two communes of district H1 over October 2026 (local)."""
    ids = []
    for area, name in (("T01-H1-X1", "Loa Đầu Làng"), ("T01-H1-X2", "Loa Chợ")):
        rec = new_device_record(name, "loudspeaker", area, {}, [], volume=80)
        await node.devices.create(rec)
        ids.append(rec["id"])
    d1, d2 = ids
    start, end = month_bounds("2026-10")
    h = node.history

    def ev(dev: str, area: str, status: str, previous: str, reason: str, at: float,
           faults: list[str] | None = None) -> None:
        h.on_status({"device": dev, "area": area, "status": status, "previous": previous,
                     "reason": reason, "faults": faults or [], "ts": at})

    # d1: online all month but 6 hours offline and one reconnect; d2: 3 h in fault, then
    # online to the month's end, then offline (in November).
    ev(d1, "T01-H1-X1", "online", "offline", "connected", start)
    ev(d1, "T01-H1-X1", "offline", "online", "missed_heartbeats", start + 86400)
    ev(d1, "T01-H1-X1", "online", "offline", "connected", start + 86400 + 6 * 3600)
    ev(d2, "T01-H1-X2", "fault", "offline", "connected", start, ["speaker_open"])
    ev(d2, "T01-H1-X2", "online", "fault", "heartbeat", start + 3 * 3600)
    ev(d1, "T01-H1-X1", "offline", "online", "missed_heartbeats", end)
    ev(d2, "T01-H1-X2", "offline", "online", "missed_heartbeats", end)
    h.add_signal(d1, "T01-H1-X1", -70.0, start + 100)
    h.add_signal(d1, "T01-H1-X1", -80.0, start + 200)
    await h.flush()
    return d1, d2, end - start


async def test_availability_as_json_csv_and_xlsx(api: Api) -> None:
    d1, d2, month_s = await seed(api.node)
    status, body = await api.call("huyen1", "GET",
                                  "/api/v1/reports/availability?area=T01-H1&month=2026-10")
    assert status == 200, body
    areas = {r["area"]: r for r in body["areas"]}
    assert set(areas) == {"T01-H1", "T01-H1-X1", "T01-H1-X2"}
    x1 = areas["T01-H1-X1"]
    assert (x1["online_s"], x1["offline_s"], x1["fault_s"]) == (month_s - 6 * 3600, 6 * 3600, 0)
    assert x1["availability"] == round((month_s - 6 * 3600) / month_s, 6)
    assert (x1["outages"], x1["connects"], x1["devices"]) == (1, 2, 1)
    h1 = areas["T01-H1"]
    assert h1["devices"] == 2 and h1["fault_s"] == 3 * 3600
    assert h1["online_s"] == 2 * month_s - 9 * 3600
    assert h1["availability_pct"] == round(100 * (2 * month_s - 9 * 3600) / (2 * month_s), 2)
    devices = {r["device"]: r for r in body["devices"]}
    assert devices[d2]["faults"] == "speaker_open: 1" and devices[d2]["name"] == "Loa Chợ"

    status, text = await api.call("huyen1", "GET", "/api/v1/reports/availability?area=T01-H1"
                                  "&month=2026-10&format=csv&by=device")
    assert status == 200
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["device"] for r in rows] == [d1, d2]
    assert float(rows[0]["offline_s"]) == 6 * 3600 and rows[0]["area_name"] == "Xã 1 huyện 1"

    r = await api.client.get("/api/v1/reports/availability?area=T01-H1&month=2026-10"
                             "&format=xlsx", headers=api.auth("huyen1"))
    assert r.status == 200 and "spreadsheetml" in r.headers["Content-Type"]
    wb = load_workbook(io.BytesIO(await r.read()))
    assert wb.sheetnames == ["Khu vực", "Thiết bị"]
    sheet = list(wb["Khu vực"].values)
    header = list(sheet[0])
    got = {row[0]: dict(zip(header, row, strict=True)) for row in sheet[1:]}
    assert got["T01-H1-X2"]["fault_s"] == 3 * 3600 and got["T01-H1"]["devices"] == 2
    assert got["T01-H1-X1"]["availability_pct"] == x1["availability_pct"]
    assert len(list(wb["Thiết bị"].values)) == 3

    status, cond = await api.call("huyen1", "GET",
                                  "/api/v1/reports/condition?area=T01-H1&month=2026-10")
    assert status == 200
    c1 = {r["device"]: r for r in cond["devices"]}[d1]
    assert (c1["signal_min"], c1["signal_max"], c1["signal_mean"], c1["signal_last"]) == (
        -80.0, -70.0, -75.0, -80.0)
    assert (c1["connects"], c1["outages"]) == (2, 1)
    r = await api.client.get("/api/v1/reports/condition?area=T01-H1&month=2026-10"
                             "&format=xlsx", headers=api.auth("huyen1"))
    rows_x = list(load_workbook(io.BytesIO(await r.read()))["Thiết bị"].values)
    assert rows_x[0][0] == "device" and len(rows_x) == 3

    # A commune sees its own; another commune's report is refused; bad input named.
    status, own = await api.call("xa11", "GET", "/api/v1/reports/availability?month=2026-10")
    assert status == 200 and [r["area"] for r in own["areas"]] == ["T01-H1-X1"]
    for path in ("/api/v1/reports/availability?area=T01-H1-X2&month=2026-10",
                 "/api/v1/reports/condition?area=T01-H1-X2&month=2026-10&format=csv",
                 "/api/v1/reports/availability?area=T01-H1&format=xlsx"):
        status, err = await api.call("xa11", "GET", path)
        assert status == 403 and err["field"] == "area", (path, err)
    for query, fld in (("month=2026-13", "month"), ("format=pdf", "format"),
                       ("by=commune", "by")):
        status, err = await api.call("huyen1", "GET", "/api/v1/reports/availability?" + query)
        assert status == 422 and err["field"] == fld


async def test_the_reports_screen_shows_the_month_and_downloads_the_apis_csv(
        tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv, chromium() as browser:
        d1, d2, _ = await seed(srv.node)
        page = await phone(browser, accept_downloads=True, bypass_csp=True)
        await login(page, f"{srv.base}/", "huyen1")
        await page.goto(f"{srv.base}/#/reports/T01-H1")
        section = page.locator("section.availability")
        await expect(section.locator("h2")).to_have_text("Tỷ lệ hoạt động của cụm loa")
        await page.select_option("#availability-month", "2026-10")
        rows = section.locator("tbody tr")
        await expect(rows).to_have_count(3)
        status, api_rows = await srv.call("huyen1", "GET", "/api/v1/reports/availability"
                                          "?area=T01-H1&month=2026-10")
        assert status == 200
        for r in api_rows["areas"]:
            row = section.locator(f"tr[data-area='{r['area']}']")
            await expect(row.locator("td.share")).to_have_text(f"{r['availability_pct']} %")
        await expect(section.locator("tr[data-area='T01-H1-X1']")).to_contain_text("6.0")
        await shots(page, "reports-availability")
        assert await axe_violations(page) == []
        async with page.expect_download() as info:
            await page.click("a.availability-csv-devices")
        got = Path(await (await info.value).path()).read_bytes().decode("utf-8")
        href = await page.locator("a.availability-csv-devices").get_attribute("href")
        status, text = await srv.call("huyen1", "GET", str(href))
        assert status == 200 and got == text and d1 in got and d2 in got


async def test_admin_names_the_contacts_in_the_console(tmp_path: Path) -> None:
    cfg = live_config(tmp_path)
    cfg.fetch.allow_networks = ["127.0.0.0/8"]
    cfg.fetch.__post_init__()
    async with serving(cfg) as srv, chromium() as browser:
        page = await phone(browser, bypass_csp=True)
        await login(page, f"{srv.base}/", "qtv1")
        await page.goto(f"{srv.base}/#/admin/alerts")
        await expect(page.locator("main")).to_contain_text("Chưa có người nhận nào")
        # another district's area: the server's 403 under the area field
        await page.fill("#contact-name", "Trung tâm huyện 2")
        await page.fill("#contact-area", "T01-H2")
        await page.fill("#address", "h2@example.vn")
        await page.click("form.new-contact button[type=submit]")
        await expect(page.locator("#contact-area-error")).to_contain_text("ngoài phạm vi")
        # a webhook for the district: its secret shown once, the contact listed
        await page.fill("#contact-area", "T01-H1")
        await page.select_option("#channel", "webhook")
        await page.fill("#address", "http://169.254.169.254/hook")
        await page.click("form.new-contact button[type=submit]")
        await expect(page.locator("#address-error")).to_contain_text("link-local")
        await page.fill("#address", "http://127.0.0.1:9/loa/hook")
        await page.click("form.new-contact button[type=submit]")
        secret = page.locator("form.new-contact .secret code")
        await expect(secret).to_have_count(1)
        rows = page.locator("ul.contacts li")
        await expect(rows).to_have_count(1)
        await expect(rows.first).to_contain_text("Trung tâm huyện 2")
        stored = await srv.node.store.find("alert_contact")
        assert [c["secret"] for c in stored] == [await secret.text_content()]
        await shots(page, "admin-alerts")
        assert await axe_violations(page) == []
        await rows.first.locator("button").click()
        await expect(page.locator("main")).to_contain_text("Chưa có người nhận nào")
        assert await srv.node.store.count("alert_contact") == 0


# ---- alerts: webhooks ------------------------------------------------------------------------
class Receiver:
    """A webhook receiver on 127.0.0.1 that fails while `failing` is set."""

    def __init__(self) -> None:
        self.failing = True
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.refused = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        async def hook(request: web.Request) -> web.Response:
            body = await request.read()
            if self.failing:
                self.refused += 1
                return web.Response(status=503)
            self.got.append((dict(request.headers), body))
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/loa/hook", hook)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/loa/hook"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def offline(dev: str, area: str, since: float = 0.0) -> Alert:
    return Alert("device_offline", dev, area, f"Cụm loa {dev} mất kết nối / {dev} is offline",
                 "critical", since=since)


async def test_webhook_is_signed_and_retried_across_a_restart(tmp_path: Path) -> None:
    rx = Receiver()
    await rx.start()
    try:
        async with running_api(config(tmp_path)) as api:
            status, c = await api.call("qtv1", "POST", "/api/v1/alert-contacts", json={
                "area": "T01-H1", "name": "Trung tâm huyện", "webhook": rx.url})
            assert status == 201 and len(c["secret"]) > 30
            secret = c["secret"]
            status, listed = await api.call("qtv1", "GET", "/api/v1/alert-contacts")
            assert status == 200 and "secret" not in json.dumps(listed)
            # An alert in a commune of the district, one in the other district (not told).
            api.node.alerts.raise_(offline("loa-1", "T01-H1-X2"))
            api.node.alerts.raise_(offline("loa-9", "T01-H2-X1"))
            await api.node.notifier.settle()
            await until(lambda: rx.refused >= 2)  # tried, refused, tried again
        # Restarted: the outbox still holds it and delivers it once the receiver takes it.
        rx.failing = False
        async with running_api(config(tmp_path)) as api:
            await until(lambda: len(rx.got) == 1)
            await asyncio.sleep(0.3)  # a few retry periods: nothing else may arrive
            assert len(rx.got) == 1
    finally:
        await rx.stop()
    headers, body = rx.got[0]
    assert headers[PEER] == c["id"]
    assert headers[SIGNATURE] == signature(secret, headers[TIMESTAMP], "POST", "/loa/hook", body)
    msg = json.loads(body)
    assert (msg["type"], msg["state"], msg["kind"], msg["subject"], msg["area"]) == (
        "alert", "raised", "device_offline", "loa-1", "T01-H1-X2")
    assert msg["text"].startswith("Cụm loa loa-1 mất kết nối")


async def test_contacts_are_admins_and_checked(api: Api) -> None:
    status, err = await api.call("huyen1", "GET", "/api/v1/alert-contacts")
    assert status == 403
    for body, fld in (({"area": "T01-H1", "name": "x"}, "email"),
                      ({"area": "T01-H1", "name": "x", "email": "khong-hop-le"}, "email"),
                      ({"area": "T01-H1", "name": "x", "email": "a@b.vn", "webhook": "x"},
                       "email"),
                      ({"area": "T01-H1", "name": "x", "webhook": "http://169.254.169.254/"},
                       "webhook"),
                      ({"area": "T01-H1", "name": "x", "email": "a@b.vn", "sms": "1"}, "sms"),
                      ({"area": "T01-H2", "name": "x", "email": "a@b.vn"}, "area")):
        status, err = await api.call("qtv1", "POST", "/api/v1/alert-contacts", json=body)
        assert status in (403, 422) and err["field"] == fld, (body, err)
    assert await api.node.store.count("alert_contact") == 0


# ---- alerts: e-mail ----------------------------------------------------------------------------
class Mailbox:
    def __init__(self) -> None:
        self.mails: list[Message] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.mails.append(message_from_bytes(envelope.content, policy=policy.default))
        return "250 OK"


@pytest.fixture
def smtp() -> Any:
    box = Mailbox()
    with socket.socket() as s:  # a free port (the controller checks it by connecting)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctl = Controller(box, hostname="127.0.0.1", port=port)
    ctl.start()
    yield ctl, box
    ctl.stop()


def subject(m: Message) -> str:
    return str(m["Subject"])


def text(m: Message) -> str:
    payload = m.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode("utf-8")


async def test_device_going_offline_mails_the_commune_and_flapping_is_bounded(
        tmp_path: Path, smtp: Any) -> None:
    ctl, box = smtp
    cfg = config(tmp_path, smtp_host="127.0.0.1", smtp_port=ctl.port, flap_max=4,
                 flap_window=3600.0, smtp_from="loa@tinh.gov.vn")
    cfg.devices = DeviceSettings(heartbeat=0.3)
    async with running_api(cfg) as api:
        clock = [datetime(2026, 12, 7, 8, 0, tzinfo=TZ).timestamp()]  # digest due tomorrow
        api.node.notifier.use_clock(lambda: clock[0])
        status, c = await api.call("qtv1", "POST", "/api/v1/alert-contacts", json={
            "area": "T01-H1-X1", "name": "Cán bộ xã", "email": "canbo@x1.vn"})
        assert status == 201 and "secret" not in c
        # A real cluster: it connects, then its socket closes; two heartbeats later it is
        # offline and the commune's officer gets a mail, Vietnamese first.
        key = new_key()
        rec = new_device_record("Loa Bến Đò", "loudspeaker", "T01-H1-X1", {}, [], volume=80)
        rec["key_hash"] = secret_hash(key)
        await api.node.devices.create(rec)
        ws = await api.client.ws_connect("/api/v1/devices/connect")
        await ws.send_str(json.dumps({"v": 1, "type": "hello", "device": rec["id"],
                                      "key": key}))
        assert json.loads((await ws.receive(timeout=5)).data)["type"] == "welcome"
        await ws.close()
        await until(lambda: len(box.mails) == 1)
        mail = box.mails[0]
        assert mail["To"] == "canbo@x1.vn" and mail["From"] == "loa@tinh.gov.vn"
        assert subject(mail) == "[Loa] Cụm loa Loa Bến Đò (T01-H1-X1) mất kết nối / " \
                                "device Loa Bến Đò (T01-H1-X1) is offline"
        body = text(mail)
        assert body.index("Khu vực Xã 1 huyện 1") < body.index("Area Xã 1 huyện 1")

        # A cluster bouncing 50 times (offline, back) within the hour: 4 mails as they happen
        # (the first outage above was one), then one summary when the hour is over.
        alerts = api.node.alerts
        for i in range(50):
            clock[0] += 30
            if i % 2 == 0:
                assert alerts.clear("device_offline", rec["id"])
            else:
                alerts.raise_(offline(rec["id"], "T01-H1-X1", since=clock[0]))
        await api.node.notifier.settle()
        await until(lambda: len(box.mails) == 4)
        clock[0] += 3600
        await api.node.notifier.tick()
        await until(lambda: len(box.mails) == 5)
        summary = text(box.mails[4])
        assert "Chập chờn: thêm 47 lần thay đổi" in summary and "47 more changes" in summary
        await asyncio.sleep(0.3)
        assert len(box.mails) == 5

        # The daily digest at 07:00 local: what is open in the commune.
        clock[0] = datetime(2026, 12, 8, 6, 59, tzinfo=TZ).timestamp()
        api.node.notifier.use_clock(lambda: clock[0])
        await api.node.notifier.tick()
        clock[0] += 120
        await api.node.notifier.tick()
        await until(lambda: len(box.mails) == 6)
        digest = box.mails[5]
        assert subject(digest).startswith("[Loa] Tóm tắt ngày 2026-12-08, Xã 1 huyện 1")
        assert "mất kết nối" in text(digest)
        await api.node.notifier.tick()  # once a day
        await asyncio.sleep(0.2)
        assert len(box.mails) == 6


def test_bench_outages_counts_what_it_did(capsys: pytest.CaptureFixture[str]) -> None:
    from loa.web.cli import main

    assert main(["bench", "outages", "--devices", "30", "--changes", "4", "--rounds", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    # 30 devices: online, then 4 changes (offline, fault, online, offline): 4 closed intervals
    # and 2 connections (the first, and fault after offline) each.
    assert (out["bench"], out["areas"], out["status_events"]) == ("outages", 5000, 150)
    # Communes 0-29 lie in 30 different districts (the bench province deals them round).
    assert out["log_entries"] == 30 * (4 + 2) and out["area_rows"] == 30 + 30 + 1


async def test_two_nodes_sharing_the_outbox_push_each_message_once(
        tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    """Two nodes of a cluster (one Redis store) each run the alert outbox: a receiver gets
    each message once."""
    from tests.helpers import delete_prefix

    rx = Receiver()
    rx.failing = False
    await rx.start()
    try:
        for n in ("a", "b"):
            (tmp_path / n).mkdir()
        cfgs = [config(tmp_path / n) for n in ("a", "b")]
        for cfg in cfgs:
            cfg.store, cfg.store_prefix = redis_url, redis_prefix
        async with running_api(cfgs[0]) as a, running_api(cfgs[1]) as b:
            status, c = await a.call("qtv1", "POST", "/api/v1/alert-contacts", json={
                "area": "T01-H1", "name": "Trung tâm", "webhook": rx.url})
            assert status == 201
            await b.node.notifier.tick()  # b reads the contact from the shared store
            for node in (a.node, b.node):  # both raise it (as after a restart): one message
                node.alerts.raise_(offline("loa-7", "T01-H1-X1", since=1_796_000_000.0))
                await node.notifier.settle()
            for i in range(20):
                a.node.alerts.raise_(offline(f"loa-x{i}", "T01-H1-X3", since=1_796_000_000.0))
            await a.node.notifier.settle()
            await until(lambda: len(rx.got) == 21)
            await asyncio.sleep(0.5)  # several rounds of both outboxes: nothing more
            assert len(rx.got) == 21
            assert len({json.loads(body)["id"] for _, body in rx.got}) == 21
    finally:
        await rx.stop()
        await delete_prefix(redis_url, redis_prefix)
