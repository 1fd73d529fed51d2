"""The media library over HTTP: uploads (multipart), listing, text to speech."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from loa.codecs.decode import MediaError
from loa.streamer.clock import SAMPLE_RATE
from loa.streamer.library import MediaLibrary
from loa.streamer.messages import say
from loa.streamer.state.store import Record
from loa.streamer.tts import TtsError, UnknownVoice
from loa.web.api.core import node_of
from loa.web.http import ApiError, audit, field, ok, principal, read_json, scoped_area

routes = web.RouteTableDef()
CHUNK = 256 * 1024


def can_see(request: web.Request, record: Record) -> bool:
    """Media of the caller's subtree, and media handed down by the areas above it."""
    return principal(request).related(node_of(request).tree, record.get("area"))


MAX_PARTS = 8  # file, title, area and a few a client may add; 100k tiny parts cost seconds
MAX_PART_HEADERS = 16
MAX_HEADER_LINE = 1024
MAX_TEXT_FIELD = 4096  # bytes of a title or area part


@contextmanager
def disk_full_is_507() -> Iterator[None]:
    """A full disk is the operator's to fix, not a server bug: 507 with the reason."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ApiError(507, say("media.disk_full")) from None
        raise


@routes.post("/api/v1/media")
async def upload(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("edit")
    node = node_of(request)
    if not request.content_type.startswith("multipart/"):
        raise ApiError(415, say("media.multipart_required"))
    with disk_full_is_507():
        form = await _read_form(request, node.library)
        try:
            area = scoped_area(p, node.tree, form.get("area", p.area))
        except BaseException:
            await asyncio.to_thread(form["file"].unlink, missing_ok=True)
            raise
        try:  # ingest removes the temp file whatever happens
            record = await node.library.ingest(
                form["file"], title=form.get("title", ""), area=area, owner=p.username,
                filename=form["filename"])
        except MediaError as e:
            status = 413 if "too long" in str(e) or "too large" in str(e) else 422
            raise ApiError(status, str(e), "file") from None
    await audit(request, "media.upload", record["id"], title=record["title"])
    return ok(record, 201)


async def _read_form(request: web.Request, lib: MediaLibrary) -> dict[str, Any]:
    form = await read_form(request, lib.temp_path, lib.settings.max_bytes, ("title", "area"))
    if "title" in form:
        form["title"] = form["title"][:200].strip()
    return form


async def read_form(request: web.Request, temp: Callable[[], Path], max_bytes: int,
                    texts: tuple[str, ...]) -> dict[str, Any]:
    """A multipart upload: the text parts named in `texts` (stripped) and one `file` part in a
    temp file made by `temp()` (removed here if anything fails; "filename" its name), within
    bounded parts: a body of many parts or huge part headers is refused at once. Parts of other
    names are read and ignored. Used by the media library and firmware uploads."""
    form: dict[str, Any] = {}
    try:
        try:  # aiohttp's own limits (8 KB a header, 128 headers) are far above what we use
            reader = MultipartReader(request.headers, request.content,
                                     max_field_size=MAX_HEADER_LINE,
                                     max_headers=MAX_PART_HEADERS)
        except (ValueError, LookupError, HttpProcessingError) as e:  # no or bad boundary
            raise ApiError(400, say("media.malformed_multipart", error=type(e).__name__)) from None
        parts = 0
        while (part := await _next_part(reader)) is not None:
            parts += 1
            if parts > MAX_PARTS:
                raise ApiError(400, say("media.malformed_multipart",
                                        error=f"more than {MAX_PARTS} parts"))
            if not isinstance(part, BodyPartReader):  # nested multipart: never ours
                raise ApiError(400, say("media.malformed_multipart", error="nested multipart part"))
            if part.name in texts:
                form[part.name] = (await _text(part)).strip()
            elif part.name == "file":
                if "file" in form:
                    raise ApiError(422, say("media.one_file"), "file")
                form["filename"] = (part.filename or "")[:200]
                form["file"] = await asyncio.to_thread(temp)
                await _receive(part, form["file"], max_bytes)
        if "file" not in form:
            raise ApiError(422, say("media.no_file"), "file")
    except BaseException:
        if "file" in form:
            await asyncio.to_thread(form["file"].unlink, missing_ok=True)
        raise
    return form


async def _receive(part: BodyPartReader, temp: Path, max_bytes: int) -> None:
    """The file part into `temp`, refused as soon as it passes `max_bytes`."""
    size = 0
    f = await asyncio.to_thread(open, temp, "wb")
    try:
        while chunk := await part.read_chunk(CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(413, say("media.too_large", limit=max_bytes // 2**20), "file")
            await asyncio.to_thread(f.write, chunk)
    finally:
        await asyncio.to_thread(f.close)


async def _next_part(reader: MultipartReader) -> object:
    try:
        return await reader.next()
    except (ValueError, LookupError, HttpProcessingError) as e:
        raise ApiError(400, say("media.malformed_multipart", error=(
            f"{type(e).__name__} (a part has at most {MAX_PART_HEADERS} header lines of "
            f"{MAX_HEADER_LINE} bytes)"))) from None


async def _text(part: BodyPartReader) -> str:
    """A small text part, refused past MAX_TEXT_FIELD bytes instead of read whole."""
    raw = b""
    try:
        while chunk := await part.read_chunk(MAX_TEXT_FIELD):
            raw += chunk
            if len(raw) > MAX_TEXT_FIELD:
                raise ApiError(413, say("media.field_too_long", field=part.name,
                                        limit=MAX_TEXT_FIELD), part.name)
        return raw.decode(part.get_charset(default="utf-8"))  # RFC 7578: no transfer encoding
    except (ValueError, LookupError, HttpProcessingError) as e:  # bad charset, not decodable
        raise ApiError(400, say("media.malformed_multipart", error=type(e).__name__)) from None


@routes.get("/api/v1/media")
async def media_list(request: web.Request) -> web.Response:
    principal(request).require("read")
    items = [m for m in await node_of(request).store.find("media") if can_see(request, m)]
    return ok({"media": items})


async def _media(request: web.Request) -> Record:
    m = await node_of(request).store.get("media", request.match_info["id"])
    if m is None or not can_see(request, m):
        raise ApiError(404, say("media.unknown"))
    return m


@routes.get("/api/v1/media/{id}")
async def media_get(request: web.Request) -> web.Response:
    return ok(await _media(request))


def wav_header(pcm_bytes: int) -> bytes:
    """The 44-byte RIFF header of the stored audio (48 kHz mono 16-bit PCM, `pcm_bytes` long):
    with it the stored file plays in any browser as it is, without a decode."""
    rate, channels, width = SAMPLE_RATE, 1, 2
    return (b"RIFF" + struct.pack("<I", 36 + pcm_bytes) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * channels * width,
                                    channels * width, 8 * width)
            + b"data" + struct.pack("<I", pcm_bytes))


def _byte_range(request: web.Request, total: int) -> tuple[int, int] | None:
    """[start, end) of the one range asked (None: the whole body). An unreadable Range is
    ignored as RFC 9110 allows; a range past the end is 416."""
    try:
        wanted = request.http_range
    except ValueError:
        return None
    if wanted.start is None and wanted.stop is None:
        return None
    start, end, _ = wanted.indices(total)
    if start >= total or start >= end:
        raise ApiError(416, say("media.range", size=total),
                       headers={"Content-Range": f"bytes */{total}"})
    return start, end


async def _send_span(resp: web.StreamResponse, f: BinaryIO, head: bytes, start: int,
                     end: int) -> None:
    """Bytes [start, end) of `head` followed by the file `f`."""
    if start < len(head):
        await resp.write(head[start:end])
    pos = max(start - len(head), 0)
    await asyncio.to_thread(f.seek, pos)
    left = end - len(head) - pos
    while left > 0 and (chunk := await asyncio.to_thread(f.read, min(CHUNK, left))):
        await resp.write(chunk)
        left -= len(chunk)
    await resp.write_eof()


@routes.get("/api/v1/media/{id}/audio")
async def media_audio(request: web.Request) -> web.StreamResponse:
    """The audio as it airs (normalised), a WAV the console's <audio> plays and seeks in."""
    m = await _media(request)
    pcm = node_of(request).library.pcm_path(m["sha256"])
    try:
        f = await asyncio.to_thread(open, pcm, "rb")
    except OSError:
        raise ApiError(404, say("media.file_missing", media=m["id"])) from None
    try:
        size = await asyncio.to_thread(f.seek, 0, 2)
        head = wav_header(size)
        total = len(head) + size
        span = _byte_range(request, total)
        start, end = span or (0, total)
        resp = web.StreamResponse(status=206 if span else 200, headers={
            "Content-Type": "audio/wav", "Accept-Ranges": "bytes",
            "Cache-Control": "private, no-cache", "Content-Length": str(end - start),
            **({"Content-Range": f"bytes {start}-{end - 1}/{total}"} if span else {})})
        await resp.prepare(request)
        if request.method == "HEAD":  # the headers only: a StreamResponse would send the body
            await resp.write_eof()
            return resp
        with contextlib.suppress(ConnectionResetError):  # a seeking <audio> drops requests
            await _send_span(resp, f, head, start, end)
        return resp
    finally:
        await asyncio.to_thread(f.close)


@routes.delete("/api/v1/media/{id}")
async def media_delete(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("edit")
    m = await _media(request)
    node = node_of(request)
    p.require_area(node.tree, m["area"])  # handed-down media is read-only below
    in_use = [pr["id"] for pr in await node.store.find("programme")
              if pr.get("media") == m["id"] or m["id"] in pr.get("items", [])]
    if in_use:
        raise ApiError(409, say("media.in_use", programmes=", ".join(in_use)))
    await node.library.remove(m)
    await audit(request, "media.delete", m["id"])
    return web.Response(status=204)


@routes.post("/api/v1/tts")
async def tts(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("edit")
    data = await read_json(request)
    text = field(data, "text", str)
    voice = field(data, "voice", str, required=False)
    try:
        with disk_full_is_507():
            media = await node_of(request).speech.media_for(text, area=p.area,
                                                            owner=p.username, voice=voice)
    except ValueError as e:
        raise ApiError(422, str(e), "text") from None
    except UnknownVoice as e:
        raise ApiError(422, str(e), "voice") from None
    except TtsError as e:
        raise ApiError(503, str(e)) from None
    await audit(request, "tts", media["id"])
    return ok(media, 201)


def setup(app: web.Application) -> None:
    app.add_routes(routes)
