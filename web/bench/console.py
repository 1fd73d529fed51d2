"""`loa bench console`: the operator console as a browser sees it, on a 5,000-area province.

A real node (real-time media clock, SQLite) is seeded with the province of `loa bench api` (one
province, 50 districts, 4,949 communes, 10,000 loudspeakers) and driven by Debian's Chromium
through Playwright (a separate process: its CPU is not the node's). Figures, medians of `rounds`:

- `first_load`: a new browser profile opens `/`: bytes over the wire (compressed bodies plus
  headers, from Chromium's own network accounting) until the login form is usable, and the
  time until it is (`interactive_ms`). Goal: at most 300 KB, within 1 s.
- `overview`: log in as the province operator until its overview shows the 50 districts with
  what is on air and device counts over 10,000 devices (`login_to_overview_ms`: argon2's
  deliberate cost included), the same page reloaded in the session until it shows them again
  (`overview_ms`), then open a district of ~99 communes (`district_ms`). Goal: within 1 s.
- `on_air_visible`: with the overview open, a broadcast starts in a commune: the delay from the
  engine's switch (its on-air listener, wall clock) to the page's row showing it (a
  MutationObserver's wall clock in the page), p50 and p99 over `rounds` starts and stops.
  Goal: within 300 ms.
- `areas_api`: GET /api/v1/areas for the whole 5,000-area subtree right after a change of the
  tree (`whole_changed_ms`: rendered anew, what every request cost before the rendering was
  kept) and unchanged (`whole_ms`: the kept rendering; `whole_revalidated_ms`: If-None-Match,
  304), one level (`parent_ms`) and a search (`search_ms`), one request at a time from an
  aiohttp client in the node's process. The issue's baseline: 340 ms p50 for the whole tree.
  Also GET /api/v1/overview of the province (`overview_api_ms`: the server's part of `overview`).

One JSON object goes to stdout; progress goes to stderr.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loa.web.bench.api import ADMIN, PASSWORD, PROVINCE, USER, area_rows, seed_province, tone_wav
from loa.web.bench.errors import BenchError

CHROMIUM = "/usr/bin/chromium"
# Chromium on a closed network: no background connections, no sandbox as root, no GPU.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
GOALS = {"first_load_kb": 300, "interactive_ms": 1000, "overview_ms": 1000,
         "on_air_visible_ms": 300, "areas_whole_baseline_ms": 340}
WAIT_MS = 30_000


def log(msg: str) -> None:
    print(f"bench-console: {msg}", file=sys.stderr, flush=True)


def median(xs: list[float]) -> float:
    return round(statistics.median(xs), 1)


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return round(s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))], 1)


async def _first_load(browser: Any, base: str) -> dict[str, float]:
    """A fresh profile: every asset fetched, nothing from a cache."""
    ctx = await browser.new_context(viewport={"width": 360, "height": 640})
    try:
        page = await ctx.new_page()
        cdp = await ctx.new_cdp_session(page)
        await cdp.send("Network.enable")
        wire: list[float] = []
        cdp.on("Network.loadingFinished", lambda ev: wire.append(ev["encodedDataLength"]))
        t0 = time.perf_counter()
        await page.goto(f"{base}/")
        await page.locator("#username").wait_for(state="visible", timeout=WAIT_MS)
        interactive = (time.perf_counter() - t0) * 1000
        await page.wait_for_load_state("networkidle")
        return {"kb": sum(wire) / 1024, "interactive_ms": interactive, "requests": len(wire)}
    finally:
        await ctx.close()


async def _overview(browser: Any, base: str, district: str) -> tuple[dict[str, float], Any]:
    """Log in; time the overview of the province and the opening of one district. Returns the
    page still open on the overview (the caller closes its context)."""
    ctx = await browser.new_context(viewport={"width": 1280, "height": 800},
                                    timezone_id="Asia/Ho_Chi_Minh")
    page = await ctx.new_page()
    await page.goto(f"{base}/")
    await page.fill("#username", USER)
    await page.fill("#password", PASSWORD)
    rows = page.locator("#level-root > li.area-row").nth(49)
    t0 = time.perf_counter()
    await page.click("button[type=submit]")
    await rows.wait_for(timeout=WAIT_MS)
    login = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()  # the overview opened afresh in a logged-in page (modules cached)
    await page.reload()
    await rows.wait_for(timeout=WAIT_MS)
    overview = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    await page.click(f"li[data-code='{district}'] > .row button.name")
    await page.locator(f"#level-{district} > li").nth(90).wait_for(timeout=WAIT_MS)
    opened = (time.perf_counter() - t0) * 1000
    return {"login_to_overview_ms": login, "overview_ms": overview, "district_ms": opened}, page


WATCH = """([code, onAir]) => new Promise((resolve) => {
  const done = () => {
    const el = document.querySelector(`li[data-code="${code}"] .on-air`);
    if (el && (el.getAttribute("data-broadcast") !== "") === onAir) {
      observer.disconnect();
      resolve(performance.timeOrigin + performance.now());
    }
  };
  const observer = new MutationObserver(done);
  observer.observe(document.getElementById("app"),
                   { subtree: true, childList: true, attributes: true, characterData: true });
  done();
})"""


async def _on_air_visible(page: Any, node: Any, http: Any, base: str, auth: dict[str, str],
                          media: str, commune: str, rounds: int) -> list[float]:
    switched: list[tuple[str | None, float]] = []  # (broadcast now on air, wall ms)

    def heard(change: Any) -> None:  # on the engine's tick: only note the wall time
        if change.area == commune:
            switched.append((change.after, time.time() * 1000))

    node.engine.listeners.append(heard)
    delays: list[float] = []
    try:
        for _ in range(rounds):
            watcher = asyncio.ensure_future(page.evaluate(WATCH, [commune, True]))
            r = await http.post(f"{base}/api/v1/broadcasts", headers=auth, json={
                "media": media, "class": "priority", "targets": [commune]})
            assert r.status == 201, await r.text()
            bid = (await r.json())["id"]
            delays.append(await _delay(watcher, switched, bid))
            watcher = asyncio.ensure_future(page.evaluate(WATCH, [commune, False]))
            r = await http.delete(f"{base}/api/v1/broadcasts/{bid}", headers=auth)
            assert r.status in (200, 204), await r.text()
            delays.append(await _delay(watcher, switched, None))
    finally:
        node.engine.listeners.remove(heard)
    return delays


async def _delay(watcher: Any, switched: list[tuple[str | None, float]],
                 after: str | None) -> float:
    shown = await asyncio.wait_for(watcher, WAIT_MS / 1000)
    for _ in range(100):  # the listener runs on the tick: the page cannot be first, but wait
        at = [t for b, t in switched if b == after]
        if at:
            switched.clear()
            return float(shown - at[-1])
        await asyncio.sleep(0.01)
    raise BenchError(f"the engine never switched to {after}")


async def _timed_get(http: Any, url: str, headers: dict[str, str], n: int,
                     before: Any = None) -> tuple[list[float], Any]:
    out, last = [], None
    for _ in range(n):
        if before is not None:
            await before()
        t0 = time.perf_counter()
        r = await http.get(url, headers=headers)
        await r.read()
        out.append((time.perf_counter() - t0) * 1000)
        last = r
    return out, last


async def _areas_api(http: Any, base: str, auth: dict[str, str], rounds: int) -> dict[str, Any]:
    url = f"{base}/api/v1/areas"
    admin = {"Authorization": f"Bearer {await _token(http, base, ADMIN)}"}
    gzip = {**auth, "Accept-Encoding": "gzip"}
    renamed = 0

    async def change() -> None:  # a real change of the tree: the kept rendering is stale
        nonlocal renamed
        renamed += 1
        r = await http.patch(f"{base}/api/v1/areas/{PROVINCE}", headers=admin,
                             json={"name": f"Tỉnh Quảng Nam (mẫu {renamed})"})
        assert r.status == 200, await r.text()

    changed, r = await _timed_get(http, url, gzip, rounds, before=change)
    assert len((await r.json())["areas"]) == 5000
    whole, r = await _timed_get(http, url, gzip, rounds)
    tag = r.headers["ETag"]
    revalidated, r = await _timed_get(http, url, {**gzip, "If-None-Match": tag}, rounds)
    assert r.status == 304
    parent, _ = await _timed_get(http, f"{url}?parent={PROVINCE}", gzip, rounds)
    search, _ = await _timed_get(http, f"{url}?q=xa%20049", gzip, rounds)
    overview, _ = await _timed_get(http, f"{base}/api/v1/overview?root={PROVINCE}", gzip, rounds)
    r = await http.get(url, headers=gzip)
    wire_kb = int(r.headers.get("Content-Length", 0)) / 1024
    return {"whole_changed_ms_p50": median(changed), "whole_ms_p50": median(whole),
            "whole_revalidated_ms_p50": median(revalidated), "parent_ms_p50": median(parent),
            "search_ms_p50": median(search), "overview_api_ms_p50": median(overview),
            "whole_gzip_kb": round(wire_kb, 1),
            "baseline_whole_ms_p50": GOALS["areas_whole_baseline_ms"]}


async def _token(http: Any, base: str, user: str) -> str:
    r = await http.post(f"{base}/api/v1/auth/token", json={"username": user, "password": PASSWORD})
    assert r.status == 201, await r.text()
    return str((await r.json())["token"])


async def main(rounds: int) -> dict[str, Any]:
    try:
        from playwright.async_api import async_playwright
    except ImportError as e:
        raise BenchError("playwright is needed: pip install -e '.[test]'") from e
    from aiohttp import ClientSession, FormData

    from loa.web.config import load_config
    from loa.web.testing import start_node

    districts = [r["id"] for r in area_rows() if r["level"] == "district"]
    commune = next(r["id"] for r in area_rows() if r["parent"] == districts[0])
    with tempfile.TemporaryDirectory(prefix="loa-bench-console-") as tmp:
        cfg = load_config(None, env={}, data=tmp)
        log("seeding 5,000 areas and 10,000 devices")
        await seed_province(cfg)
        live = await start_node(cfg, access_log=None)
        out: dict[str, Any] = {"bench": "console", "areas": len(list(live.node.tree)),
                               "devices": len(live.node.devices.devices), "rounds": rounds}
        try:
            async with ClientSession(auto_decompress=True) as http, \
                    async_playwright() as pw:
                auth = {"Authorization": f"Bearer {await _token(http, live.url, USER)}"}
                form = FormData()
                form.add_field("file", tone_wav(30.0), filename="bench.wav")
                form.add_field("title", "bench")
                r = await http.post(f"{live.url}/api/v1/media", data=form, headers=auth)
                assert r.status == 201, await r.text()
                media = (await r.json())["id"]
                browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    log("first load")
                    loads = [await _first_load(browser, live.url) for _ in range(rounds)]
                    out["first_load"] = {
                        "kb_p50": median([x["kb"] for x in loads]),
                        "requests": loads[0]["requests"],
                        "interactive_ms_p50": median([x["interactive_ms"] for x in loads])}
                    log("overview")
                    views = []
                    for i in range(rounds):
                        figures, page = await _overview(browser, live.url, districts[0])
                        views.append(figures)
                        if i < rounds - 1:
                            await page.context.close()
                    out["overview"] = {k: median([v[k] for v in views])
                                       for k in ("login_to_overview_ms", "overview_ms",
                                                 "district_ms")}
                    log("on-air changes")
                    delays = await _on_air_visible(page, live.node, http, live.url, auth,
                                                   media, commune, rounds * 2)
                    out["on_air_visible_ms"] = {"p50": pct(delays, 50), "p99": pct(delays, 99),
                                                "n": len(delays)}
                    await page.context.close()
                finally:
                    await browser.close()
                log("areas API")
                out["areas_api"] = await _areas_api(http, live.url, auth, rounds * 4)
        finally:
            await live.stop()
    out["goals"] = GOALS
    return out


def run(args: Any) -> int:
    rounds = int(getattr(args, "rounds", 5))
    if rounds < 1:
        print("rounds must be >= 1", file=sys.stderr)
        return 2
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is missing: apt-get install chromium (make sysdeps)", file=sys.stderr)
        return 2
    print(json.dumps(asyncio.run(main(rounds)), ensure_ascii=False))
    return 0
