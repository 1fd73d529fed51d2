"""The operator console in Debian's Chromium (Playwright): launching it, logging in, screenshots
of a screen at 360 and 1280 px into test-artifacts/, and the axe-core accessibility check."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, Page, async_playwright, expect

from loa.web.bench.console import CHROMIUM_ARGS
from tests.apiclient import PASSWORD

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


async def shots(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    for width in (360, 1280):
        await page.set_viewport_size({"width": width, "height": 640 if width == 360 else 800})
        await page.screenshot(path=str(ARTIFACTS / f"console-{name}-{width}.png"), full_page=True)
    await page.set_viewport_size({"width": 360, "height": 640})
    assert await page.evaluate("document.scrollingElement.scrollWidth") <= 360, name


@asynccontextmanager
async def chromium(*args: str) -> AsyncIterator[Browser]:
    """Debian's Chromium (`npx playwright install` cannot download here); `args` add flags
    (a fake microphone, ...)."""
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path="/usr/bin/chromium",
                                           args=[*CHROMIUM_ARGS, *args])
        try:
            yield browser
        finally:
            await browser.close()


async def phone(browser: Browser, **context: Any) -> Page:
    """A page in a new context: a 360 x 640 phone in Asia/Ho_Chi_Minh unless `context` says
    otherwise (bypass_csp=True for axe, timezone_id, permissions, ...)."""
    ctx = await browser.new_context(**{"viewport": {"width": 360, "height": 640},
                                       "timezone_id": "Asia/Ho_Chi_Minh", **context})
    return await ctx.new_page()


AXE = Path(__file__).resolve().parents[2] / "web/console/node_modules/axe-core/axe.min.js"
XSS = "<img src=x onerror=alert(1)>"


async def login(page: Page, url: str, who: str, password: str = PASSWORD) -> None:
    await page.goto(url)
    await page.fill("#username", who)
    await page.fill("#password", password)
    await page.click("button[type=submit]")
    await expect(page.locator("header .who")).to_contain_text(who)


async def axe_violations(page: Page) -> list[str]:
    """Serious or critical axe-core violations of the page as it stands (WCAG 2.1 A/AA). The
    page's context needs bypass_csp=True: axe is injected as a script."""
    await page.add_script_tag(path=str(AXE))
    found = await page.evaluate("""async () => (await axe.run(document, {runOnly:
        ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"]})).violations
        .filter(v => v.impact === "serious" || v.impact === "critical")
        .map(v => `${v.id}: ${v.nodes.map(n => n.target.join(" ")).join(", ")}`)""")
    return list(found)


