"""The console's area picker (areapicker.js, used by the schedule, air-now and emergency screens)
mounted on the live console page: one level at a time, a whole district in one tick, the search
that ignores diacritics, and only the caller's subtree."""

from __future__ import annotations

from pathlib import Path

from playwright.async_api import Page, expect

from tests.emergencynode import live_config, serving
from tests.web.browser import axe_violations, chromium, login, phone

MOUNT = """async () => {
  const { render } = await import("preact");
  const { html } = await import("/console/static/i18n.js");
  const { session } = await import("/console/static/api.js");
  const { AreaPicker } = await import("/console/static/areapicker.js");
  const host = document.createElement("main");
  host.id = "picker-host";
  document.body.replaceChildren(host);
  window.chosen = [];
  const draw = () => render(html`<${AreaPicker} root=${session.value.area} value=${window.chosen}
      legend="Khu vực nhận" onChange=${(c) => { window.chosen = c; draw(); }} />`, host);
  draw();
}"""


async def _mount(page: Page) -> None:
    await page.evaluate(MOUNT)
    await expect(page.locator("fieldset.area-picker")).to_be_visible()


async def test_a_district_in_one_tick_search_and_scope(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv, chromium() as browser:
        page = await phone(browser, bypass_csp=True)
        await login(page, f"{srv.base}/", "tinh")
        await _mount(page)
        # the root is open one level: the districts, no commune loaded yet
        tree = page.locator(".pick-tree")
        await expect(tree.locator("li[data-code=T01-H1]")).to_be_visible()
        assert await tree.locator("li[data-code=T01-H1-X1]").count() == 0
        await tree.locator("li[data-code=T01-H1] button.expand").click()
        x1 = tree.locator("input[data-code=T01-H1-X1]")
        await x1.check()
        assert await page.evaluate("window.chosen") == ["T01-H1-X1"]
        # ticking the district covers its communes: the commune tick is dropped, shown included
        await tree.locator("input[data-code=T01-H1]").check()
        assert await page.evaluate("window.chosen") == ["T01-H1"]
        await expect(x1).to_be_checked()
        await expect(x1).to_be_disabled()
        # search without diacritics finds "Xã 2 huyện 2"
        await page.fill("input[type=search]", "xa 2 huyen 2")
        found = page.locator(".found input[data-code=T01-H2-X2]")
        await found.check()
        assert await page.evaluate("window.chosen") == ["T01-H1", "T01-H2-X2"]
        await expect(page.locator(".chosen li span")).to_have_text(["Huyện 1", "Xã 2 huyện 2"])
        assert await axe_violations(page) == []
        # the whole province in one tick; removing it with its chip button
        await tree.locator("input[data-code=T01]").check()
        assert await page.evaluate("window.chosen") == ["T01"]
        await page.click("button[aria-label='Bỏ chọn Tỉnh Mẫu']")
        assert await page.evaluate("window.chosen") == []

        # a commune operator's picker holds its own commune only, and searches only it
        page = await phone(browser)
        await login(page, f"{srv.base}/", "xa11")
        await _mount(page)
        await expect(page.locator(".pick-tree input[type=checkbox]")).to_have_count(1)
        await page.fill("input[type=search]", "huyen 2")
        await expect(page.locator("fieldset.area-picker")).to_contain_text("Không tìm thấy khu vực")
