"""Emergency override: the feature a province buys Loa for.

An emergency (TT 39/2020 class `emergency`, "khẩn cấp") is a broadcast that preempts every lower
programme of its target areas in the same tick, plus what the stream cannot do: loudspeakers of
those areas get an `emergency` command at once (amplifier on, the emergency volume) and bulletin
boards get its text full screen (docs/device-protocol.md §3.4). This module is the service behind
`POST /api/v1/emergencies` and CAP 1.2 alerts (`POST /api/v1/alerts`, streamer/emergency/cap.py).

What airs: the attention signal, a short pause, the message (a media item, text read by TTS, or
a live voice published over WHIP), repeated `repeat` times with `gap` seconds between, then the
attention signal again. The attention signal (`attention_pcm`) is two tones alternating, 800 Hz
and 1000 Hz, 250 ms each (2 Hz), 3 s: the "hi-lo" alternating pattern of public-address and
evacuation sounders, unlike speech or music, recognisable through a horn loudspeaker and easy to
detect by machine; every 250 ms step starts and ends with a 5 ms raised-cosine edge, so there is
no click. An emergency whose message finishes (all repeats done) ends by itself.

Guarantees:

- Persisted before acknowledged: the emergency record (kind `emergency`) and its broadcast record
  are in the store before `create` returns, so the API's 201 means it survives a crash.
- Restart: on start-up the service puts every active emergency back on air (before the HTTP
  server accepts a request), at the position it would have reached: each node keeps, in its
  broadcast record of the emergency, the source position and the wall time it last resumed
  (`position`, `resumed`), updated when the emergency goes audible or silent (preempted by a
  higher emergency, waiting behind one). The content is rebuilt from the record's `spec`: TTS is
  cached in the media library, the attention signal is synthesised again. Broadcast records of
  emergencies carry `restored_by: "emergency"`, and the Station's generic restore leaves them to
  this service.
- Audit and as-run: the API writes the audit entries; the Station writes the as-run log from the
  engine's changes for the emergency's broadcast, one entry per area it reached. The record keeps
  the resolved leaf areas (`areas`).
- Authority: the engine ranks emergencies like every broadcast (class, then the authority nearest
  the root, then the earliest start): a district's emergency under a province one waits (policy
  resume) and airs after it. Devices follow the same rule: in every area they show the winning
  emergency (its volume and text), and get `{"on": false}` only when no emergency is left there.
  Stopping needs the emergency right at the issuer's area or above (checked by the API).

Cluster (several nodes on one Redis store and bus): the node that accepts an emergency publishes
`{"event": "start", "id", "origin", "record"}` on the bus topic `emergency`, and `{"event":
"end", "id", "cause"}` when it ends. Every node acts on them: a node that hears of an active
emergency it does not know airs it locally (idempotent by id: a second event, or an event about
one it restored itself, changes nothing) and sends the command to the devices connected to it;
an end stops it locally. The store is the source of truth: a late or repeated event for an ended
emergency is ignored, and a restarted node restores every active emergency from the store.

Relay chain (province -> district -> commune nodes, the next step; designed, not built): a
district node that relays the province subscribes to the province node's `emergency` events
through its upstream link (the same event body, carried over the link that already brings the
province's audio) and treats them like bus events with one difference: it airs the emergency
from the province's stream (the district's relay input switched to class `emergency`, authority
of the province's root, so nothing of the district can preempt it) instead of rebuilding the
content, and re-publishes the event (with itself as `origin`, the province's id kept in
`upstream`) on its own bus for its commune nodes. Ids stay the province's, so the chain is
idempotent end to end; an `end` travels the same way; a district node that loses the link keeps
airing what it has (the relay input's reconnect) and reconciles from the upstream's list of
active emergencies (`GET /api/v1/emergencies`) when the link returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import numpy as np

from loa.codecs.decode import MediaError
from loa.streamer.areas import AreaError, AreaTree
from loa.streamer.broadcast import Broadcast, BroadcastClass
from loa.streamer.clock import SAMPLE_RATE
from loa.streamer.emergency import cap as capmod
from loa.streamer.engine import Engine, OnAirChange
from loa.streamer.errors import Kind, LoaError
from loa.streamer.library import MediaLibrary
from loa.streamer.messages import say
from loa.streamer.programmes import MAX_GAP, MAX_REPEAT
from loa.streamer.sources import PcmSource, Playlist, Silence, Source
from loa.streamer.state.bus import Bus, BusClosed, BusSubscription
from loa.streamer.state.store import Conflict, NotFound, Record, Store
from loa.streamer.station import Content, Station
from loa.streamer.tts import Speech, TtsError, UnknownVoice

log = logging.getLogger("loa.emergency")

TOPIC = "emergency"
KIND = "emergency"
MAX_BOARD_TEXT = 2000  # the device protocol's limit for `emergency.text`
MAX_TITLE = 200
ATTENTION_TONES = (800.0, 1000.0)
ATTENTION_STEP = 0.25  # seconds per tone


@dataclass
class EmergencySettings:
    """Config section [emergency] (env LOA_EMERGENCY_<KEY>)."""

    volume: int = 100  # loudspeaker volume during an emergency (0-100)
    attention_before: bool = True  # the attention signal before the message
    attention_after: bool = True  # ... and after it
    attention_seconds: float = 3.0
    attention_pause: float = 0.5  # silence between the attention signal and the message
    cap_geocode: str = "area"  # CAP geocode valueName whose value is a Loa area code
    cap_emergency: str = "Extreme/Immediate,Severe/Immediate"  # Severity/Urgency -> emergency
    cap_priority: str = "Extreme/*,Severe/*,Moderate/Immediate"  # -> priority; else normal
    cap_languages: str = "vi,vi-VN"  # preferred info languages, in order
    cap_exercise_areas: str = ""  # where status Exercise airs: "" nowhere, "*" all, or codes
    cap_test_areas: str = ""  # same for status Test
    cap_repeat: int = 1  # times a CAP message is read
    cap_gap: float = 3.0
    cap_max_kb: int = 1024  # a CAP document apart from its inline (derefUri) resources
    cap_resource_mb: int = 20  # one audio resource, inline (decoded) or fetched from its uri
    cap_resource_timeout: float = 15.0

    def __post_init__(self) -> None:
        if not 0 <= self.volume <= 100:
            raise ValueError("emergency: volume must be within 0-100")
        if not 0.5 <= self.attention_seconds <= 30:
            raise ValueError("emergency: attention_seconds must be within 0.5-30")
        if not 0 <= self.attention_pause <= 10:
            raise ValueError("emergency: attention_pause must be within 0-10")
        if not 1 <= self.cap_repeat <= MAX_REPEAT or not 0 <= self.cap_gap <= MAX_GAP:
            raise ValueError(f"emergency: cap_repeat 1-{MAX_REPEAT}, cap_gap 0-{MAX_GAP:g}")
        if self.cap_max_kb < 1 or self.cap_resource_mb < 1 or self.cap_resource_timeout <= 0:
            raise ValueError("emergency: cap_max_kb, cap_resource_mb, cap_resource_timeout > 0")
        capmod.parse_class_table(self.cap_emergency, self.cap_priority)

    @property
    def class_table(self) -> list[tuple[str, str, str]]:
        return capmod.parse_class_table(self.cap_emergency, self.cap_priority)

    @property
    def cap_resource_bytes(self) -> int:
        return self.cap_resource_mb * 1024 * 1024

    @property
    def cap_body_limit(self) -> int:
        """Bytes of a CAP document: its text, plus one largest resource inline in base64 (4/3)
        with a line break every 76 characters (MIME style, CRLF)."""
        b64 = -(-self.cap_resource_bytes // 3) * 4
        return self.cap_max_kb * 1024 + b64 + -(-b64 // 76) * 2

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(x.strip() for x in self.cap_languages.split(",") if x.strip())


class EmergencyError(LoaError):
    """Refused: bilingual text, the kind of refusal (streamer/errors.py), the field."""


class DuplicateAlert(EmergencyError):
    """Not a refusal: an alert received before (same sender, identifier, sent). `record` is
    the emergency it made, when this node knows it; the API answers 200."""

    kind: Kind = "conflict"

    def __init__(self, message: str, record: Record | None = None) -> None:
        super().__init__(message)
        self.record = record


class EmergencyDevices(Protocol):
    """The loudspeakers and boards of the areas (the device manager, in relay/)."""

    async def emergency_command(self, areas: list[str], args: dict[str, Any],
                                include_offline: bool, ttl: float | None) -> dict[str, Any]:
        """Send the `emergency` command with `args` to the devices of `areas` (also queued for
        those not connected now when `include_offline`) -> {"devices", "online", ...}."""
        ...


# An audio resource of a CAP alert: url -> bytes (size and time limits are the fetcher's).
Fetcher = Callable[[str], Awaitable[bytes]]


@functools.lru_cache(maxsize=8)
def attention_pcm(seconds: float = 3.0, tones: tuple[float, float] = ATTENTION_TONES,
                  step: float = ATTENTION_STEP, amplitude: float = 0.4,
                  edge: float = 0.005) -> np.ndarray:
    """The attention signal: `tones` alternating every `step` seconds, click-free edges."""
    n = int(round(step * SAMPLE_RATE))
    steps = max(2, int(round(seconds / step)))
    t = np.arange(n) / SAMPLE_RATE
    ramp = max(1, int(edge * SAMPLE_RATE))
    env = np.ones(n)
    rise = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
    env[:ramp] = rise
    env[n - ramp:] = rise[::-1]
    parts = [amplitude * env * np.sin(2 * np.pi * tones[i % 2] * t) for i in range(steps)]
    pcm = np.concatenate(parts).astype(np.float32)
    pcm.flags.writeable = False
    return pcm


def node_identity(data_dir: Path) -> str:
    """This node's stable id (a file in its data directory), created at first start."""
    path = Path(data_dir) / "node-id"
    try:
        value = path.read_text(encoding="utf-8").strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    value = uuid.uuid4().hex[:16]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value + "\n", encoding="utf-8")
    tmp.replace(path)
    return value


def tts_voices(language: str | None) -> list[str | None]:
    """Voices to try for an RFC 3066 language tag, most specific first ("en-US": "en-us",
    "en"; espeak-ng's names), then None: the node's default voice, which is Vietnamese (also
    for "vi", "vi-VN" and no language)."""
    tag = (language or "").strip().lower()
    primary = tag.split("-")[0]
    if not primary or primary == "vi":
        return [None]
    return [*dict.fromkeys((tag, primary)), None]


def whip_url(targets: list[str], title: str) -> str:
    return (f"/whip/{quote(','.join(targets), safe=',')}?class=emergency"
            f"&title={quote(title, safe='')}")


@dataclass
class Request:
    """What to air: built by the API from JSON, or from a CAP alert."""

    targets: list[str]
    content: dict[str, Any]  # {"media": id} | {"text": "..."} | {"live": True}
    issuer: str  # area of the issuing authority
    user: str
    klass: str = "emergency"
    repeat: int = 1
    gap: float = 0.0
    attention_before: bool | None = None  # None: the node's setting
    attention_after: bool | None = None
    attention_media: str | None = None
    volume: int | None = None
    text: str | None = None  # for boards; defaults to the spoken text or the title
    title: str | None = None
    intro: str | None = None  # spoken before the message ("Diễn tập." for exercises)
    language: str | None = None  # of the message text (RFC 3066): chooses the TTS voice
    expires: float | None = None  # epoch; the emergency ends then
    cap: dict[str, Any] | None = None
    cap_key: str | None = None
    replaces: list[str] = field(default_factory=list)


@dataclass
class _Track:
    """Where this node's broadcast of an emergency stands, for restore after a restart."""

    bid: str
    eid: str
    position: int  # source samples played before `since`
    since: int | None = None  # engine sample at which it last became audible
    areas: set[str] = field(default_factory=set)


class EmergencyService:
    def __init__(self, *, engine: Engine, station: Station, store: Store, bus: Bus,
                 tree: AreaTree, library: MediaLibrary, speech: Speech,
                 settings: EmergencySettings | None = None, node_id: str = "",
                 devices: EmergencyDevices | None = None, fetch: Fetcher | None = None) -> None:
        self.engine = engine
        self.station = station
        self.store = store
        self.bus = bus
        self.tree = tree
        self.library = library
        self.speech = speech
        self.settings = settings or EmergencySettings()
        self.node_id = node_id or uuid.uuid4().hex[:16]
        self.devices = devices
        self.fetch = fetch
        self.active: dict[str, Record] = {}  # eid -> record (this node's view)
        self._local: dict[str, str] = {}  # eid -> this node's broadcast id
        self._by_bid: dict[str, str] = {}  # broadcast id -> eid
        self._tracks: dict[str, _Track] = {}  # broadcast id -> position tracking
        self._linked: dict[str, str] = {}  # live (WHIP) broadcast id -> eid
        self._covered: dict[str, set[str]] = {}  # eid -> areas its targets cover
        self._winners: dict[str, str] = {}  # area -> the emergency its devices show
        self._batches: dict[str, str] = {}  # device command batch -> the emergency it shows
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lock = asyncio.Lock()
        self._sub: BusSubscription | None = None
        self._reader: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._live_waiting = False  # a live emergency waits for its WHIP voice (engine thread)
        self._stopping = False
        self.stats = {"started": 0, "ended": 0, "remote_started": 0, "restored": 0,
                      "device_commands": 0}

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Subscribe to the bus, hook the engine, put active emergencies back on air."""
        self._loop = asyncio.get_running_loop()
        self._sub = await self.bus.subscribe(TOPIC)
        self.engine.listeners.append(self._on_change_thread)
        self.engine.ended_listeners.append(self._on_end_thread)
        async with self._lock:
            await self._restore()
        self._reader = self._loop.create_task(self._read_bus(self._sub))

    async def stop(self) -> None:
        """Shut down this node's part. Emergencies stay active in the store: a restarted node
        (or the other nodes) keep them on air."""
        if self._on_change_thread in self.engine.listeners:
            self.engine.listeners.remove(self._on_change_thread)
        if self._on_end_thread in self.engine.ended_listeners:
            self.engine.ended_listeners.remove(self._on_end_thread)
        for h in self._timers.values():
            h.cancel()
        self._timers.clear()
        self._stopping = True
        if self._sub is not None:  # the reader sees BusClosed
            with contextlib.suppress(Exception):
                await self._sub.close()
        if self._reader is not None:
            self._reader.cancel()
            # Bounded: a cancel that lands inside a store call may come back as another error.
            await asyncio.wait([self._reader], timeout=5.0)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)

    def _spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("emergency task failed event=emergency_task_error task=%s error=%r",
                          what, t.exception())

        task.add_done_callback(done)

    # ---- queries -----------------------------------------------------------------------------
    async def get(self, eid: str) -> Record | None:
        rec = await self.store.get(KIND, eid)
        return rec

    async def records(self, status: str | None = "active") -> list[Record]:
        return await self.store.find(KIND, status=status) if status else \
            await self.store.find(KIND)

    def local_broadcast(self, eid: str) -> str | None:
        return self._local.get(eid)

    def broadcasts(self, eid: str) -> set[str]:
        """This node's broadcasts of the emergency: its own, and a live emergency's voice."""
        out = {b for b, e in self._linked.items() if e == eid}
        local = self._local.get(eid)
        return (out | {local}) if local else out

    def emergency_of(self, batch: str) -> str | None:
        """The active emergency a device command batch turned on."""
        eid = self._batches.get(batch)
        return eid if eid in self.active else None

    # ---- content -----------------------------------------------------------------------------
    def _attention(self, spec: Record) -> Source:
        return PcmSource(attention_pcm(self.settings.attention_seconds), "attention")

    async def _library_source(self, media_id: str) -> Source:
        media = await self.store.get("media", media_id)
        if media is None:
            raise EmergencyError(say("media.unknown_id", media=media_id), field="media")
        return self.library.source(media)

    async def _speech_source(self, text: str, rec: Record, language: str | None = None
                             ) -> Source:
        """Text read by TTS in the voice of `language` (RFC 3066, e.g. "en-US": tried as "en-us",
        then "en"), the node's Vietnamese voice when there is none or the engine has neither."""
        voices = tts_voices(language)
        try:
            for voice in voices:
                try:
                    media = await self.speech.media_for(text, area=rec["issuer"],
                                                        owner=rec["user"], voice=voice)
                    break
                except UnknownVoice:
                    if voice is None:
                        raise
                    log.warning("no TTS voice event=tts_voice_missing voice=%s language=%s",
                                voice, language)
        except (ValueError, TtsError) as e:
            raise EmergencyError(say("tts.cannot_speak", error=e), field="text") from None
        return self.library.source(media)

    async def _message(self, rec: Record, strict: bool) -> list[Source]:
        """The message part (intro + content). Not strict (restore, other nodes): what cannot
        be rebuilt falls back to the board text read aloud, or is left out (logged)."""
        spec = rec["spec"]
        content = spec.get("content") or {}
        out: list[Source] = []
        try:
            if spec.get("intro"):
                out.append(await self._speech_source(spec["intro"], rec))
            if content.get("media"):
                out.append(await self._library_source(str(content["media"])))
            elif content.get("text"):
                out.append(await self._speech_source(str(content["text"]), rec,
                                                     spec.get("language")))
            return out
        except (EmergencyError, MediaError, OSError) as e:
            if strict:
                if isinstance(e, EmergencyError):
                    raise
                raise EmergencyError(say("emergency.cannot_air", error=e),
                                     field="content") from None
            log.error("emergency content unavailable event=emergency_content_error id=%s "
                      "error=%s", rec["id"], e)
            if rec.get("text") and not content.get("text"):
                with contextlib.suppress(EmergencyError):
                    return [await self._speech_source(rec["text"], rec, spec.get("language"))]
            return []

    async def _programme(self, rec: Record, strict: bool) -> Source | None:
        spec = rec["spec"]
        att = spec.get("attention") or {}
        pause = self.settings.attention_pause
        parts: list[Source] = []

        async def attention() -> Source:
            if att.get("media"):
                try:
                    return await self._library_source(str(att["media"]))
                except (EmergencyError, MediaError, OSError) as e:
                    if strict:
                        raise
                    log.error("attention media unavailable event=emergency_attention_error "
                              "id=%s error=%s", rec["id"], e)
            return self._attention(spec)

        message = [] if (spec.get("content") or {}).get("live") else \
            await self._message(rec, strict)
        if att.get("before"):
            parts.append(await attention())
            if message and pause:
                parts.append(Silence(pause))
        repeat = int(spec.get("repeat", 1))
        gap = float(spec.get("gap", 0.0))
        for i in range(repeat if message else 0):
            parts.extend(message)
            if i < repeat - 1 and gap:
                parts.append(Silence(gap))
        if att.get("after") and message:
            if pause:
                parts.append(Silence(pause))
            parts.append(await attention())
        if not parts:
            return None
        return Playlist(parts, name=rec["title"])

    # ---- airing ------------------------------------------------------------------------------
    async def _air(self, rec: Record, source: Source | None, offset: int = 0,
                   bid: str | None = None) -> str | None:
        """Put this node's broadcast of the emergency on air (`offset` samples into it); its
        broadcast id, or None when there is no audio to air."""
        if source is None:
            return None
        assert source.length is not None
        bid = bid or uuid.uuid4().hex[:12]
        self._tracks[bid] = _Track(bid, rec["id"], offset)
        self._by_bid[bid] = rec["id"]
        self._local[rec["id"]] = bid
        try:
            await self.station.air(
                Content(source, rec["title"], source.length / SAMPLE_RATE), targets=rec["targets"],
                klass=rec["class"], issuer=rec["issuer"], user=rec["user"], policy="resume",
                spec={"emergency": rec["id"]}, offset=offset / SAMPLE_RATE, bid=bid,
                extra={"restored_by": "emergency", "emergency": rec["id"], "node": self.node_id,
                       "position": offset})
        except BaseException:
            self._tracks.pop(bid, None)
            self._by_bid.pop(bid, None)
            self._local.pop(rec["id"], None)
            raise
        return bid

    def _register(self, rec: Record) -> None:
        eid = rec["id"]
        self.active[eid] = rec
        self._live_waiting = any(r.get("live") for r in self.active.values())
        if rec["class"] == "emergency":
            codes = [t for t in rec["targets"] if t in self.tree]
            self._covered[eid] = set(self.tree.covered(codes))
        exp = rec.get("expires")
        if exp is not None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, float(exp) - time.time())
            self._timers[eid] = loop.call_at(loop.time() + delay, self._expire, eid)

    def _expire(self, eid: str) -> None:
        self._timers.pop(eid, None)
        self._spawn(self.end(eid, "expired"), "expire")

    async def create(self, req: Request) -> Record:
        """Check, build, persist, air, command the devices, tell the other nodes."""
        s = self.settings
        for t in req.targets:
            if t not in self.tree:
                raise EmergencyError(say("area.unknown", area=t), field="targets")
        try:
            BroadcastClass.parse(req.klass)
        except ValueError as e:
            raise EmergencyError(str(e), field="class") from None
        if not 1 <= req.repeat <= MAX_REPEAT:
            raise EmergencyError(say("programme.repeat", limit=MAX_REPEAT), field="repeat")
        if not 0 <= req.gap <= MAX_GAP:
            raise EmergencyError(say("programme.gap", limit=MAX_GAP), field="gap")
        now = time.time()
        if req.expires is not None and req.expires <= now:
            raise EmergencyError(say("emergency.expired"), field="expires")
        live = bool(req.content.get("live"))
        spoken = req.content.get("text")
        title = (req.title or (f"Khẩn cấp: {spoken}" if spoken and req.klass == "emergency"
                               else spoken) or say("emergency.title")).strip()
        title = " ".join(title.split())
        if len(title) > MAX_TITLE:
            title = title[:MAX_TITLE - 1] + "…"
        text = " ".join((req.text or spoken or title).split())
        if len(text) > MAX_BOARD_TEXT:
            text = text[:MAX_BOARD_TEXT - 1] + "…"
        eid = uuid.uuid4().hex[:12]
        rec: Record = {
            "id": eid,
            "status": "active",
            "class": BroadcastClass.parse(req.klass).name,
            "title": title,
            "targets": list(req.targets),
            "areas": self.tree.resolve_leaves(req.targets),
            "issuer": req.issuer,
            "user": req.user,
            "created": now,
            "spec": {
                "content": dict(req.content),
                "intro": req.intro,
                "language": req.language,
                "repeat": req.repeat,
                "gap": req.gap,
                "attention": {
                    "before": s.attention_before if req.attention_before is None
                    else req.attention_before,
                    "after": s.attention_after if req.attention_after is None
                    else req.attention_after,
                    "media": req.attention_media,
                },
            },
            "volume": s.volume if req.volume is None else req.volume,
            "text": text,
            "live": live,
            "expires": req.expires,
            "origin": self.node_id,
            "broadcast": uuid.uuid4().hex[:12],
            "cap": req.cap,
            "cap_key": req.cap_key,
            "replaces": list(req.replaces),
        }
        async with self._lock:
            source = await self._programme(rec, strict=True)
            rec["duration"] = None if source is None or source.length is None \
                else source.length / SAMPLE_RATE
            if source is None:
                rec["broadcast"] = None
            if live:
                rec["whip"] = whip_url(rec["targets"], title)
            try:
                await self.store.create(KIND, rec)  # persisted before anything airs
            except Conflict:
                existing = (await self.store.find(KIND, cap_key=req.cap_key))[:1] \
                    if req.cap_key else []
                raise DuplicateAlert(say("cap.duplicate"),
                                     existing[0] if existing else None) from None
            bid = await self._air(rec, source, 0, rec["broadcast"])
            self._register(rec)
            for old in req.replaces:
                await self._end_locked(old, "updated", user=req.user, notify=False,
                                       extra={"replaced_by": eid})
            devices = await self._update_devices(include_offline=True)
        self.stats["started"] += 1
        log.info("emergency on event=emergency_start id=%s class=%s issuer=%s user=%s "
                 "targets=%s areas=%d broadcast=%s live=%s cap=%s", eid, rec["class"],
                 rec["issuer"], rec["user"], ",".join(rec["targets"]), len(rec["areas"]), bid,
                 live, req.cap_key or "-")
        await self._publish({"event": "start", "id": eid, "record": rec})
        return {**rec, "devices": devices}

    async def end(self, eid: str, cause: str, *, user: str | None = None,
                  publish: bool = True, include_offline: bool = True) -> Record | None:
        async with self._lock:
            return await self._end_locked(eid, cause, user=user, publish=publish,
                                          include_offline=include_offline)

    async def _end_locked(self, eid: str, cause: str, *, user: str | None = None,
                          publish: bool = True, include_offline: bool = True,
                          notify: bool = True, extra: Record | None = None) -> Record | None:
        self.active.pop(eid, None)
        self._live_waiting = any(r.get("live") for r in self.active.values())
        timer = self._timers.pop(eid, None)
        if timer is not None:
            timer.cancel()
        bid = self._local.pop(eid, None)
        if bid is not None:
            self._by_bid.pop(bid, None)
            self._stop_broadcast(bid, cause)
        for lb, e in list(self._linked.items()):
            if e == eid:
                del self._linked[lb]
                self._stop_broadcast(lb, cause)
        self._covered.pop(eid, None)
        for batch in [b for b, e in self._batches.items() if e == eid]:
            del self._batches[batch]
        rec = await self.store.get(KIND, eid)
        changed = False
        if rec is not None and rec.get("status") == "active":
            rec = await self.store.update(KIND, eid, {
                "status": "ended", "ended": time.time(), "end_cause": cause, "ended_by": user,
                "ended_on": self.node_id, **(extra or {})})
            changed = True
        if notify:
            await self._update_devices(include_offline)
        if changed:
            self.stats["ended"] += 1
            log.info("emergency over event=emergency_end id=%s cause=%s by=%s", eid, cause,
                     user or "-")
            if publish:
                await self._publish({"event": "end", "id": eid, "cause": cause})
        return rec

    def _stop_broadcast(self, bid: str, cause: str) -> None:
        try:
            self.station.stop(bid, by_area=None, cause=cause)
        except KeyError:
            pass  # already over here

    async def _publish(self, event: Record) -> None:
        try:
            await self.bus.publish(TOPIC, {"v": 1, "origin": self.node_id, **event})
        except Exception as e:  # noqa: BLE001 - the emergency is on air; the cluster is extra
            log.error("bus publish failed event=emergency_publish_error id=%s error=%s",
                      event.get("id"), e)

    # ---- devices -----------------------------------------------------------------------------
    def _rank(self, eid: str) -> tuple[int, float, str]:
        rec = self.active[eid]
        issuer = rec["issuer"]
        depth = self.tree.depth(issuer) if issuer in self.tree else 99
        return (depth, float(rec.get("created", 0)), eid)

    def _compute_winners(self) -> dict[str, str]:
        best: dict[str, str] = {}
        for eid, areas in self._covered.items():
            if eid not in self.active:
                continue
            rank = self._rank(eid)
            for a in areas:
                cur = best.get(a)
                if cur is None or rank < self._rank(cur):
                    best[a] = eid
        return best

    async def _update_devices(self, include_offline: bool) -> dict[str, Any]:
        """Send every area whose winning emergency changed its new state."""
        new = self._compute_winners()
        groups: dict[str | None, list[str]] = {}
        for a in set(new) | set(self._winners):
            if new.get(a) != self._winners.get(a):
                groups.setdefault(new.get(a), []).append(a)
        self._winners = new
        total = {"devices": 0, "online": 0}
        if self.devices is None:
            return total
        for eid, areas in groups.items():
            if eid is None:
                args: Record = {"on": False}
                ttl = None
            else:
                rec = self.active[eid]
                # `broadcast`: the devices report what they hear by it (proof of delivery)
                args = {"on": True, "volume": int(rec["volume"]), "text": rec["text"],
                        "broadcast": eid}
                ttl = None if rec.get("duration") is None or rec.get("live") else \
                    float(rec["duration"]) + 60.0
            try:
                got = await self.devices.emergency_command(sorted(areas), args, include_offline,
                                                           ttl)
            except Exception:
                log.exception("device commands failed event=emergency_devices_error id=%s", eid)
                continue
            if eid is not None and got.get("batch"):
                self._batches[str(got["batch"])] = eid  # its acks count for that emergency
            self.stats["device_commands"] += int(got.get("devices", 0))
            total["devices"] += int(got.get("devices", 0))
            total["online"] += int(got.get("online", 0))
        return total

    # ---- engine events (engine thread -> loop) -----------------------------------------------
    def _on_change_thread(self, c: OnAirChange) -> None:
        # Engine thread, inside a tick: decide cheaply, hop to the loop, never raise.
        try:
            mine = c.before in self._by_bid or c.after in self._by_bid or (
                self._live_waiting and c.after is not None and c.after not in self._linked)
            if mine and self._loop is not None:
                self._loop.call_soon_threadsafe(self._on_change, c)
        except Exception:  # noqa: BLE001 - a closed loop at shutdown, or worse: not the tick's
            pass

    def _on_end_thread(self, b: Broadcast, cause: str) -> None:
        try:
            if (b.id in self._by_bid or b.id in self._linked) and self._loop is not None:
                self._loop.call_soon_threadsafe(self._on_end, b.id, cause)
        except Exception:  # noqa: BLE001 - see _on_change_thread
            pass

    def _on_change(self, c: OnAirChange) -> None:
        for bid, gained in ((c.before, False), (c.after, True)):
            tr = self._tracks.get(bid) if bid is not None else None
            if bid is None or tr is None:
                continue
            was = bool(tr.areas)
            (tr.areas.add if gained else tr.areas.discard)(c.area)
            if tr.areas and not was:
                tr.since = c.sample
                changes: Record = {"position": tr.position,
                                   "resumed": self.station.wall(c.sample)}
            elif was and not tr.areas:
                if tr.since is not None:
                    tr.position += c.sample - tr.since
                tr.since = None
                changes = {"position": tr.position, "resumed": None}
            else:
                continue
            self._spawn(self._save_track(bid, changes), "track")
        if c.after is not None and c.after not in self._by_bid and c.after not in self._linked:
            self._link_live(c.after)

    def _link_live(self, bid: str) -> None:
        """A live (WHIP) emergency broadcast from the issuer of a live emergency, to the same
        targets: it is that emergency's voice; when it ends, the emergency ends."""
        b = self.engine.live_broadcast(bid)
        if b is None or b.cls is not BroadcastClass.emergency or b.source.seekable:
            return
        for eid, rec in self.active.items():
            if rec.get("live") and rec["issuer"] == b.issuer \
                    and set(rec["targets"]) == set(b.targets):
                self._linked[bid] = eid
                log.info("live voice linked event=emergency_live id=%s broadcast=%s", eid, bid)
                return

    async def _save_track(self, bid: str, changes: Record) -> None:
        with contextlib.suppress(NotFound):
            await self.store.update("broadcast", bid, changes)

    def _on_end(self, bid: str, cause: str) -> None:
        self._tracks.pop(bid, None)
        eid = self._linked.pop(bid, None)
        if eid is not None:
            self._spawn(self.end(eid, "live-ended"), "live-end")
            return
        eid = self._by_bid.get(bid)
        if eid is None or self._local.get(eid) != bid:
            return  # we stopped it ourselves
        rec = self.active.get(eid)
        if rec is not None and rec.get("live"):
            self._local.pop(eid, None)  # the attention signal is over; the live voice goes on
            self._by_bid.pop(bid, None)
            return
        self._spawn(self.end(eid, "finished" if cause == "finished" else cause), "end")

    # ---- the bus -----------------------------------------------------------------------------
    async def _read_bus(self, sub: BusSubscription) -> None:
        while not self._stopping:
            try:
                ev = await sub.get()
            except (BusClosed, asyncio.CancelledError):
                return
            except Exception:
                log.exception("bus read failed event=emergency_bus_error")
                return
            try:
                await self._on_event(ev)
            except Exception:
                log.exception("emergency event failed event=emergency_event_error id=%s",
                              ev.get("id"))

    async def _on_event(self, ev: Record) -> None:
        eid = ev.get("id")
        if not isinstance(eid, str) or ev.get("origin") == self.node_id:
            return
        if ev.get("event") == "end":
            if eid in self.active:
                await self.end(eid, str(ev.get("cause") or "ended"), publish=False,
                               include_offline=False)
            return
        if ev.get("event") != "start" or eid in self.active:
            return
        async with self._lock:
            if eid in self.active:
                return
            rec = await self.store.get(KIND, eid)
            if rec is None and isinstance(ev.get("record"), dict):
                rec = ev["record"]  # stores not shared: the event is all we have
            if rec is None or rec.get("status") != "active":
                return
            for old in rec.get("replaces") or []:
                if old in self.active:
                    await self._end_locked(old, "updated", publish=False, notify=False)
            await self._air_known(rec, 0)
            self._register(rec)
            await self._update_devices(include_offline=False)
        self.stats["remote_started"] += 1
        log.info("emergency from another node event=emergency_remote id=%s origin=%s", eid,
                 ev.get("origin"))

    async def _air_known(self, rec: Record, offset: int) -> str | None:
        """Air an emergency accepted elsewhere or before a restart (never refuses: what cannot
        be rebuilt is logged and left out)."""
        try:
            source = await self._programme(rec, strict=False)
            if source is not None and source.length is not None and offset >= source.length:
                return None
            return await self._air(rec, source, offset)
        except (AreaError, ValueError, MediaError, OSError) as e:
            log.error("cannot air emergency event=emergency_air_error id=%s error=%s",
                      rec["id"], e)
            return None

    # ---- restart -----------------------------------------------------------------------------
    async def _restore(self) -> None:
        now = time.time()
        previous: dict[str, Record] = {}
        for b in await self.store.find("broadcast", status="on-air"):
            if b.get("restored_by") != "emergency" or b.get("node") != self.node_id:
                continue
            # This node's process that aired it is gone: close the record, remember where it was.
            previous[b["emergency"]] = b
            await self.store.update("broadcast", b["id"], {
                "status": "ended", "end_cause": "restart", "ended": now})
        for rec in await self.store.find(KIND, status="active"):
            eid = rec["id"]
            if rec.get("expires") is not None and float(rec["expires"]) <= now:
                self.active[eid] = rec
                await self._end_locked(eid, "expired", notify=False)
                continue
            prev = previous.get(eid)
            position = 0
            if prev is not None:
                position = int(prev.get("position") or 0)
                if prev.get("resumed"):
                    position += int(max(0.0, now - float(prev["resumed"])) * SAMPLE_RATE)
            dur = rec.get("duration")
            if not rec.get("live") and dur is not None and position >= dur * SAMPLE_RATE:
                self.active[eid] = rec
                await self._end_locked(eid, "restart-over", notify=False)
                continue
            if not (rec.get("live") and position >= (dur or 0) * SAMPLE_RATE):
                await self._air_known(rec, position)
            self._register(rec)
            self.stats["restored"] += 1
            log.info("emergency restored event=emergency_restored id=%s position=%.2f",
                     eid, position / SAMPLE_RATE)
        # Devices already got their commands before the restart (queued ones are delivered by
        # the device manager); only what ended meanwhile is sent now.
        stale = set(self._winners)
        self._winners = self._compute_winners()
        if self.devices is not None:
            gone = sorted(a for a in stale if a not in self._winners)
            if gone:
                await self.devices.emergency_command(gone, {"on": False}, True, None)

    # ---- CAP ---------------------------------------------------------------------------------
    async def cap(self, alert: capmod.CapAlert, *, issuer: str, user: str,
                  check_area: Callable[[str], None]) -> tuple[int, Record]:
        """Act on a validated CAP alert. (status, body): 201 aired, 200 already known / a
        Cancel done, 202 accepted without airing (System, Draft, Ack, Error)."""
        s = self.settings
        key = alert.key
        known = await self.store.find(KIND, cap_key=key)
        if known:
            return 200, self._duplicate(known[0], issuer)
        if alert.msg_type == "Cancel":
            done = await self.store.find(KIND, cancel_key=key)
            if done:
                for r in done:
                    self._duplicate(r, issuer)
                return 200, {"cancelled": [r["id"] for r in done], "duplicate": True}
            return await self._cap_cancel(alert, issuer=issuer, user=user)
        if alert.status in ("System", "Draft") or alert.msg_type in ("Ack", "Error"):
            return 202, {"aired": False, "cap": alert.summary(),
                         "reason": say("cap.not_aired", status=alert.status,
                                       type=alert.msg_type)}
        info = capmod.pick_info(alert, s.languages)
        exp = capmod.expiry(info)
        if exp is not None and exp <= time.time():
            raise EmergencyError(say("cap.expired", expires=info.expires.isoformat()
                                     if info.expires else ""), field="expires")
        targets = capmod.target_areas(info, self.tree, s.cap_geocode)
        if not targets:
            raise EmergencyError(say("cap.no_area", geocode=s.cap_geocode), field="area")
        for t in targets:
            check_area(t)
        intro = None
        marker = ""
        if alert.status in ("Exercise", "Test"):
            exercise = alert.status == "Exercise"
            allowed = s.cap_exercise_areas if exercise else s.cap_test_areas
            targets = self._allowed(targets, allowed)
            if not targets:
                raise EmergencyError(say("cap.exercise_disabled") if exercise
                                     else say("cap.test_disabled"), field="status")
            intro = "Diễn tập." if exercise else "Thử nghiệm."
            marker = f"[{say('cap.exercise') if exercise else say('cap.test')}] "
        klass = capmod.classify(info, s.class_table)
        replaces: list[str] = []
        if alert.msg_type == "Update":
            for r in await self._referenced(alert, issuer):
                if r.get("status") == "active":
                    self._check_authority(r, issuer)
                    replaces.append(r["id"])
        content: dict[str, Any] = {"text": capmod.spoken_text(info)}
        media = await self._cap_audio(info, issuer, user)
        if media is not None:
            content = {"media": media}
        headline = info.headline or info.event
        req = Request(targets=targets, content=content, issuer=issuer, user=user, klass=klass,
                      repeat=s.cap_repeat, gap=s.cap_gap, intro=intro, language=info.language,
                      text=capmod.board_text(info, marker.strip()),
                      title=f"{marker}{headline}", expires=exp,
                      cap={**alert.summary(), "key": key, "event": info.event,
                           "severity": info.severity, "urgency": info.urgency,
                           "certainty": info.certainty, "language": info.language,
                           "expires": info.expires.isoformat() if info.expires else None},
                      cap_key=key, replaces=replaces)
        try:
            rec = await self.create(req)
        except DuplicateAlert as e:
            if e.record is not None:
                return 200, self._duplicate(e.record, issuer)
            raise
        return 201, rec

    def _duplicate(self, rec: Record, issuer: str) -> Record:
        """A CAP message received before: idempotent for a caller whose area covers the one
        that sent it first; refused without its content for any other area (409)."""
        if not (issuer in self.tree and rec["issuer"] in self.tree
                and self.tree.contains(issuer, rec["issuer"])):
            raise EmergencyError(say("cap.sent_elsewhere"), kind="conflict", field="identifier")
        return {**rec, "duplicate": True}

    def _allowed(self, targets: list[str], spec: str) -> list[str]:
        spec = spec.strip()
        if spec == "*":
            return targets
        roots = [c.strip() for c in spec.split(",") if c.strip() in self.tree]
        out = []
        for t in targets:
            if any(self.tree.contains(r, t) for r in roots):
                out.append(t)
            else:  # a target above an enabled area: air in the enabled part only
                out += [r for r in roots if self.tree.contains(t, r) and r not in out]
        return list(dict.fromkeys(out))

    async def _referenced(self, alert: capmod.CapAlert, issuer: str) -> list[Record]:
        """The alerts an Update or Cancel refers to, as far as the caller's area may know them:
        its subtree's, or those above it (which it may not end: `_check_authority`); another
        branch's alerts are unknown to it."""
        out = []
        for k in alert.reference_keys():
            for r in await self.store.find(KIND, cap_key=k):
                if issuer in self.tree and r["issuer"] in self.tree and (
                        self.tree.contains(issuer, r["issuer"])
                        or self.tree.contains(r["issuer"], issuer)):
                    out.append(r)
        return out

    def _check_authority(self, rec: Record, area: str) -> None:
        issuer = rec["issuer"]
        if issuer in self.tree and area in self.tree and not self.tree.contains(area, issuer):
            raise EmergencyError(say("cap.not_yours", area=area, issuer=issuer),
                                 kind="forbidden")

    async def _cap_cancel(self, alert: capmod.CapAlert, *, issuer: str, user: str
                          ) -> tuple[int, Record]:
        found = await self._referenced(alert, issuer)
        if not found:
            raise EmergencyError(say("cap.unknown_reference"), kind="not_found",
                                 field="references")
        for r in found:
            self._check_authority(r, issuer)
        ended = []
        for r in found:
            if r.get("status") == "active":
                await self.end(r["id"], "cancelled", user=user)
                ended.append(r["id"])
            await self.store.update(KIND, r["id"], {"cancel_key": alert.key})
        return 200, {"cancelled": [r["id"] for r in found], "ended": ended,
                     "cap": alert.summary()}

    async def _cap_audio(self, info: capmod.CapInfo, issuer: str, user: str) -> str | None:
        """The first audio resource as a library media id. Inline (derefUri, checked by the
        parser): it must decode as audio, else the alert is refused (422). From a uri: None (TTS
        instead) when it cannot be had within the limits or does not match its size/digest."""
        for res in info.resources:
            if not res.is_audio:
                continue
            if res.deref is not None:
                try:
                    return await self._ingest(res, res.deref, info, issuer, user)
                except MediaError as e:
                    raise EmergencyError(say("cap.resource_not_audio", error=e),
                                         field="derefUri") from None
                except OSError as e:  # the node's disk, not the alert: read the text instead
                    log.error("cap audio resource not stored event=cap_resource_error "
                              "uri=derefUri error=%s", e)
                    continue
            if not (res.uri and res.uri.startswith(("http://", "https://")) and self.fetch):
                continue
            try:
                data = await self.fetch(res.uri)
                if len(data) > self.settings.cap_resource_bytes:
                    raise ValueError("resource larger than cap_resource_mb")
                await asyncio.to_thread(capmod.verify, res, data)
                return await self._ingest(res, data, info, issuer, user)
            except Exception as e:  # noqa: BLE001 - any failure: read the text instead
                log.warning("cap audio resource unusable event=cap_resource_error uri=%s "
                            "error=%s", res.uri[:200], e)
        return None

    async def _ingest(self, res: capmod.CapResource, data: bytes, info: capmod.CapInfo,
                      issuer: str, user: str) -> str:
        """Decode a resource's bytes into the media library, like an upload (off the loop)."""
        tmp = self.library.temp_path(".audio")
        await asyncio.to_thread(tmp.write_bytes, data)
        media = await self.library.ingest(tmp, title=res.description or info.event,
                                          area=issuer, owner=user, filename="cap-resource",
                                          extra={"cap_resource": res.uri or "derefUri"})
        return str(media["id"])
