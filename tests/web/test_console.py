"""The operator console's assets as the node serves them (issue 11): the page with its strict CSP
(the inline import map allowed by its hash), gzip when accepted, year-long caching of the
versioned vendor modules, revalidation by ETag, and only console texts in the catalogue."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from playwright.async_api import Page, async_playwright, expect

from loa.web import console
from loa.web.auth import add_user
from loa.web.node import Node
from loa.web.testing import running_node
from tests.apiclient import PASSWORD, make_config


async def test_page_assets_and_catalogue_are_served_safely_and_compressed(tmp_path: Path) -> None:
    async with running_node(make_config(tmp_path), realtime=False) as live, \
            aiohttp.ClientSession(auto_decompress=True) as http:
        async with http.get(f"{live.url}/", headers={"Accept-Encoding": "gzip"}) as r:
            assert r.status == 200 and r.headers["Content-Encoding"] == "gzip"
            page = await r.text()
            policy = r.headers["Content-Security-Policy"]
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert r.headers["Referrer-Policy"] == "same-origin"
            tag = r.headers["ETag"]
        assert console.import_map_hash(page) in policy and "'unsafe-inline'" not in policy
        assert "object-src 'none'" in policy and "frame-ancestors 'none'" in policy
        async with http.get(f"{live.url}/", headers={"If-None-Match": tag}) as r:
            assert r.status == 304
        async with http.get(f"{live.url}/console/static/vendor/preact-11.2.0.mjs",
                            headers={"Accept-Encoding": "identity"}) as r:
            assert r.status == 200 and "Content-Encoding" not in r.headers
            assert "immutable" in r.headers["Cache-Control"]
            assert r.headers["Content-Type"].startswith("text/javascript")
        for bad in ("vendor/.stamp", "../__init__.py", "nope.js"):
            async with http.get(f"{live.url}/console/static/{bad}") as r:
                assert r.status == 404, bad
        async with http.get(f"{live.url}/console/catalogue.json") as r:
            texts = await r.json()
        assert all(k.startswith("console.") or k in console.SHOWN for k in texts)
        assert all(set(v) == {"vi", "en"} for v in texts.values())


# ---- in Chromium ---------------------------------------------------------------------------------
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


async def _shots(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    for width in (360, 1280):
        await page.set_viewport_size({"width": width, "height": 640 if width == 360 else 800})
        await page.screenshot(path=str(ARTIFACTS / f"console-{name}-{width}.png"), full_page=True)
    await page.set_viewport_size({"width": 360, "height": 640})
    assert await page.evaluate("document.scrollingElement.scrollWidth") <= 360, name


async def test_login_account_language_and_logout_in_chromium(tmp_path: Path) -> None:
    async def prepare(node: Node) -> None:
        await add_user(node.store, node.tree, "xa11", "operator", "T01-H1-X1", PASSWORD)

    async with running_node(make_config(tmp_path), realtime=False, prepare=prepare) as live, \
            async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        ctx = await browser.new_context(viewport={"width": 360, "height": 640},
                                        timezone_id="Asia/Ho_Chi_Minh", locale="vi-VN")
        page = await ctx.new_page()
        outside: list[str] = []
        page.on("request", lambda r: None if r.url.startswith(live.url) else outside.append(r.url))
        answer = await page.goto(f"{live.url}/")
        assert answer is not None
        assert "frame-ancestors 'none'" in (await answer.all_headers())["content-security-policy"]
        await page.fill("#username", "xa11")
        await page.fill("#password", "sai-mat-khau")
        await page.click("button[type=submit]")
        await expect(page.locator(".error")).to_have_text("sai tên đăng nhập hoặc mật khẩu")
        await _shots(page, "login")
        await page.fill("#password", PASSWORD)
        await page.click("button[type=submit]")
        await expect(page.locator(".area")).to_have_text("Xã 1 huyện 1")
        assert "loa_session" not in await page.evaluate("document.cookie")
        stored = await page.evaluate("JSON.stringify(Object.entries(localStorage))")
        assert "token" not in stored and "csrf" not in stored
        await _shots(page, "account")
        await page.click("button.lang")
        await expect(page.locator("h1")).to_have_text("Account")
        await page.click("text=Log out")
        await expect(page.locator("#username")).to_be_visible()
        assert outside == []
        await browser.close()
