"""The operator console's assets as the node serves them (issue 11): the page with its strict CSP
(the inline import map allowed by its hash), gzip when accepted, year-long caching of the
versioned vendor modules, revalidation by ETag, and only console texts in the catalogue."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from loa.web import console
from loa.web.testing import running_node
from tests.apiclient import make_config


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
