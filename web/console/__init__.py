"""The operator console (issue 11): the page at `/`, its ES modules and the texts it shows.

- `GET /`: static/index.html, whose inline import map names the vendored modules; the CSP allows
  that one inline script by its hash, computed here from the file at start-up.
- `GET /console/static/{path}`: the console's own modules and styles (revalidated, so an upgrade
  reaches every browser at once) and static/vendor/ (Preact, htm, signals, copied there by
  `make console` under names that carry their version: cached for a year).
- `GET /console/catalogue.json`: {key: {"vi", "en"}} for every "console.*" text of the catalogue
  and the few other texts the console shows on its own (`SHOWN`); the console picks one language.

Everything is public: the page holds no data; the data comes from /api/, which authenticates.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import re
from pathlib import Path, PurePosixPath

from aiohttp import web

from loa.streamer.messages import CATALOGUE

STATIC = Path(__file__).parent / "static"
INDEX = STATIC / "index.html"
PREFIX = "console."
SHOWN = ("store.unreachable",)  # texts outside "console.*" the console shows by itself
TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
         ".svg": "image/svg+xml", ".html": "text/html", ".json": "application/json"}
VENDOR_CACHE = "public, max-age=31536000, immutable"
IMPORT_MAP = re.compile(r'<script type="importmap">(.*?)</script>', re.DOTALL)


def import_map_hash(html: str) -> str:
    """The CSP source of the page's inline import map (the only inline script)."""
    found = IMPORT_MAP.search(html)
    if found is None:
        raise ValueError(f"{INDEX} has no import map")
    digest = hashlib.sha256(found.group(1).encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


def csp(script_hash: str) -> str:
    return ("default-src 'self'; "
            f"script-src 'self' {script_hash}; style-src 'self'; img-src 'self' data:; "
            "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
            "frame-ancestors 'none'; form-action 'self'")


def send(request: web.Request, body: bytes, headers: dict[str, str]) -> web.Response:
    """`body` gzipped when the browser accepts it (the first load must stay small), with an ETag
    so the revalidated files answer 304 unchanged."""
    tag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
    head = {**headers, "ETag": tag, "Vary": "Accept-Encoding"}
    if request.headers.get("If-None-Match") == tag:
        return web.Response(status=304, headers=head)
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        return web.Response(body=gzip.compress(body, 6, mtime=0),
                            headers={**head, "Content-Encoding": "gzip"})
    return web.Response(body=body, headers=head)


def catalogue() -> dict[str, dict[str, str]]:
    return {k: {"vi": t.vi, "en": t.en} for k, t in CATALOGUE.items()
            if k.startswith(PREFIX) or k in SHOWN}


def setup(app: web.Application) -> None:
    """Register routes. The page's hash is computed once: the file ships with the package."""
    security = {"Content-Security-Policy": csp(import_map_hash(INDEX.read_text("utf-8"))),
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"}
    texts = json.dumps(catalogue(), ensure_ascii=False).encode()

    async def index(request: web.Request) -> web.StreamResponse:
        return send(request, await asyncio.to_thread(INDEX.read_bytes), {**security, "Cache-Control": "no-cache",
                                                  "Content-Type": "text/html; charset=utf-8"})

    async def static(request: web.Request) -> web.StreamResponse:
        rel = PurePosixPath(request.match_info["path"])
        ctype = TYPES.get(rel.suffix)
        if ctype is None or rel.is_absolute() or any(p.startswith(".") for p in rel.parts):
            raise web.HTTPNotFound()
        path = STATIC / rel
        if not path.is_file():
            raise web.HTTPNotFound()
        vendor = rel.parts[0] == "vendor"
        return send(request, await asyncio.to_thread(path.read_bytes), {
            **security, "Content-Type": f"{ctype}; charset=utf-8",
            "Cache-Control": VENDOR_CACHE if vendor else "no-cache"})

    async def catalogue_json(request: web.Request) -> web.Response:
        return send(request, texts, {**security, "Cache-Control": "no-cache",
                                     "Content-Type": "application/json; charset=utf-8"})

    app.router.add_get("/", index)
    app.router.add_get("/console/static/{path:.+}", static)
    app.router.add_get("/console/catalogue.json", catalogue_json)
