"""`PUT` and `SOURCE /ingest/{mount}`: the Icecast source protocol (relay/ingest.py airs it).

Encoders speak it two ways: `PUT` with `Expect: 100-continue` (Icecast 2.4, ffmpeg's
`icecast://`), or the legacy `SOURCE` method (`-legacy_icecast 1`, old BUTT, Barix), and both
send the audio as the rest of the connection with no length and no chunking, often in the same
TCP segment as the head. aiohttp's HTTP parser would read those bytes as a next request, so the
head of such a request alone is parsed and what follows is kept as an upgraded connection's tail
(`_data_received`); the handler takes the bytes over (`protocol.set_parser`, as aiohttp's
WebSocket does), holds at most PREAUTH_BYTES while it checks the credential, then answers `200`
(what a legacy client waits for) and feeds the pipe.
A client that does send a framed body (chunked or with a length) is read through aiohttp.

Credentials (HTTP Basic): the mount's own (user `source` or the mount's `user`, its password,
kept as a hash) or a Loa user who may air, whose area holds the mount's area (and with the
emergency right for an emergency mount). Wrong: `401` before any audio is read; another area's
mount: `403`; failures count towards the login limit of the name and the address (`429`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from loa.relay.devices.records import same_hash
from loa.relay.ingest import Connection, Mount
from loa.streamer.messages import say
from loa.streamer.station import Content
from loa.web.auth import AuthError, Principal, RateLimited, check_password
from loa.web.http import PRINCIPAL, audit, error_response
from loa.web.node import NODE, Node

log = logging.getLogger("loa.ingest")

PREAUTH_BYTES = 64 * 1024  # audio held while the credential is checked, at most
BASIC = {"WWW-Authenticate": 'Basic realm="Loa ingest"'}


class _Raw:
    """The connection's bytes after the request head: held until a pipe takes them."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.held = bytearray()
        self.conn: Connection | None = None
        self.eof = False
        self.paused = False
        self._resumer: asyncio.Task[None] | None = None

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self.conn is None:
            self.held += data
            if len(self.held) >= PREAUTH_BYTES:
                self._pause()
        elif not self.conn.pipe.feed(bytes(data)) and not self.paused:
            self._pause()  # TCP pushes back on the encoder until the decoder made room
            self._resumer = asyncio.get_running_loop().create_task(self._resume(self.conn))
        return False, b""

    def feed_eof(self) -> None:
        self.eof = True
        if self.conn is not None:
            self.conn.pipe.end()

    def _pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    async def _resume(self, conn: Connection) -> None:
        await conn.pipe.room()
        if self.paused and self.transport is not None and not self.transport.is_closing():
            self.paused = False
            self.transport.resume_reading()

    def attach(self, conn: Connection) -> None:
        self.conn = conn
        if self.held:
            conn.pipe.feed(bytes(self.held))
            self.held.clear()
        if self.eof:
            conn.pipe.end()
        elif self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()


def _basic(request: web.Request) -> tuple[str, str] | None:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Basic "):
        return None
    try:
        user, sep, password = base64.b64decode(header[6:].strip(), validate=True
                                                ).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


async def _refusal(node: Node, request: web.Request, rec: dict[str, Any]
                   ) -> web.Response | None:
    """None when the credential may push to the mount; else the 401/403/429 answer."""
    cred = _basic(request)
    if cred is None:
        return error_response(401, say("ingest.credential"), headers=BASIC)
    user, password = cred
    ip = request.remote or "?"
    keys = [f"ingest:{rec['id']}", f"login:ip:{ip}"]
    try:
        node.login_guard.check(keys)
        if user == rec.get("user", "source"):
            if not same_hash(rec.get("secret_hash"), password):
                await node.login_guard.failed(keys)
                return error_response(401, say("ingest.credential"), headers=BASIC)
            return None
        p = Principal.of(await check_password(node.store, node.login_guard, user, password, ip))
    except RateLimited as e:
        return error_response(429, str(e), headers={"Retry-After": str(int(e.retry_after) + 1)})
    except AuthError:
        return error_response(401, say("ingest.credential"), headers=BASIC)
    request[PRINCIPAL] = p
    if not p.can("air") or rec["area"] not in node.tree \
            or not node.tree.contains(p.area, rec["area"]):
        return error_response(403, say("ingest.outside", mount=rec["name"], area=rec["area"],
                                       own=p.area))
    if rec.get("class") == "emergency" and not p.emergency:
        return error_response(403, say("ingest.no_emergency_right"))
    return None


async def ingest(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    framed = request.can_read_body  # chunked or with a length: aiohttp reads it
    raw = None
    if not framed:
        raw = _Raw(request.transport)
        request.protocol.set_parser(raw)  # type: ignore[arg-type]
    name = request.match_info["mount"]
    found = await node.store.find("mount", name=name)
    if not found:
        return _closing(error_response(404, say("ingest.unknown_mount", mount=name[:64])))
    rec = found[0]
    refused = await _refusal(node, request, rec)
    if refused is not None:
        log.info("ingest refused event=ingest_refused mount=%s remote=%s status=%d",
                 rec["name"], request.remote, refused.status)
        return _closing(refused)
    m = node.ingests.mounts.get(rec["id"])
    if node.ingests.connected() >= node.ingests.settings.max_connections and (
            m is None or m.connection is None):
        return _closing(error_response(503, say("ingest.too_many"),
                                       headers={"Retry-After": "10"}))
    if request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
    resp = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
    resp.force_close()
    await resp.prepare(request)  # the legacy client's go-ahead
    conn = node.ingests.open(rec, request.headers.get("Content-Type", ""), request.remote or "?")
    await audit(request, "ingest.connect", rec["id"], mount=rec["name"],
                agent=request.headers.get("User-Agent", "")[:200],
                ice_name=request.headers.get("Ice-Name", "")[:200])
    try:
        if raw is not None:
            raw.attach(conn)
        else:
            async for chunk in request.content.iter_any():
                if conn.done.is_set() or not conn.pipe.feed(chunk) and await _room(conn):
                    break
            conn.pipe.end()
        await conn.done.wait()
    finally:
        node.ingests.close(conn, "hung up")
    return resp


def _closing(resp: web.Response) -> web.Response:
    """A refusal ends the connection: what the encoder sends after its head is no request."""
    resp.force_close()
    return resp


async def _room(conn: Connection) -> bool:
    """Wait for the decoder to make room; True when the push is over meanwhile."""
    await conn.pipe.room()
    return conn.done.is_set()


# ---- a mount bound to targets airs by itself while an encoder is connected --------------------
def auto_air(node: Node) -> None:
    async def up(m: Mount) -> None:
        rec = m.record
        if not rec.get("targets") or m.auto is not None:
            return
        push = node.ingests.subscribe(rec, rec.get("title") or rec["name"])
        record = await node.station.air(
            Content(source=push, title=rec.get("title") or rec["name"], duration=None),
            targets=list(rec["targets"]), klass=rec.get("class", "normal"), issuer=rec["area"],
            user=f"mount:{rec['name']}", spec={"live": "ingest", "mount": rec["id"]})
        m.auto = str(record["id"])
        log.info("ingest on air event=ingest_live mount=%s broadcast=%s", rec["name"], m.auto)

    def down(m: Mount) -> None:
        if m.auto is not None:
            try:
                node.station.stop(m.auto, None, cause="ingest-ended")
            except KeyError:
                pass
            m.auto = None

    def on_up(m: Mount) -> None:
        task = asyncio.get_running_loop().create_task(up(m))
        task.add_done_callback(_logged)

    node.ingests.on_up = on_up
    node.ingests.on_down = down


def _logged(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("ingest could not air event=ingest_error error=%s", task.exception())


# ---- the request head apart from the audio behind it -------------------------------------------
_plain_data_received = RequestHandler.data_received
_heads: dict[RequestHandler, bytes] = {}  # a source's request head, while it is incomplete
MAX_HEAD = 16 * 1024


def _source_head(data: bytes) -> bool:
    return data.startswith((b"SOURCE ", b"PUT /ingest/"))


def _data_received(self: RequestHandler, data: bytes) -> None:
    """An encoder sends its audio right behind the request head, with no length, often in the
    same segment: aiohttp's parser would take it for a next request (400, the Ogg headers
    lost). The head alone goes to the parser; what follows is kept as an upgraded connection's
    tail (aiohttp's own path for WebSocket), which the handler takes with `set_parser`."""
    pending = _heads.pop(self, None)
    if pending is None and not (self._payload_parser is None and not self._upgraded
                                and _source_head(data)):
        return _plain_data_received(self, data)
    buf = (pending or b"") + data
    end = buf.find(b"\r\n\r\n")
    if end < 0 and len(buf) <= MAX_HEAD:
        if len(_heads) < 10_000:  # (a flood of half heads falls back to the plain parser)
            _heads[self] = buf
            return None
    head = buf[:end + 4] if end >= 0 else buf
    lower = head.lower()
    if end < 0 or b"\r\ncontent-length:" in lower or b"\r\ntransfer-encoding:" in lower:
        return _plain_data_received(self, buf)  # a framed body: aiohttp reads it
    _plain_data_received(self, head)
    self._upgraded = True
    self._message_tail += buf[end + 4:]
    return None


def setup(app: web.Application) -> None:
    RequestHandler.data_received = _data_received  # type: ignore[method-assign]
    auto_air(app[NODE])
    app.router.add_route("PUT", "/ingest/{mount}", ingest, expect_handler=_no_expect)
    app.router.add_route("SOURCE", "/ingest/{mount}", ingest)


async def _no_expect(request: web.Request) -> None:
    """`100 Continue` only once the credential is checked (the handler sends it)."""
