"""Programme rules: what a programme may hold, the editorial check, and what may be scheduled.

A programme is a draft until submitted; an approver approves or rejects it while it is pending; an
edit sends it back to draft. Only approved programmes are scheduled, unless the scheduler holds
the `direct` right. The rules raise `ProgrammeError`; the HTTP layer maps it to a status.

The body's typed fields, the media it names and the relay URL it points to are read through the
caller's ports (`Fields`, `MediaLookup`, `UrlCheck`): who may see a media item and which URLs are
allowed are decided outside, and their errors pass through unchanged.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from loa.streamer.messages import say
from loa.streamer.state.store import Record, Store
from loa.streamer.station import ContentError

PROGRAMME_TYPES = ("file", "playlist", "tts", "relay", "live", "fm", "ingest")
FM_BAND = (76.0, 108.0)  # MHz (relay/devices/protocol.py: the receivers' band)
MAX_FM_SECONDS = 86400.0
ACTIONS = ("submit", "approve", "reject")
FALLBACK_SECONDS = 60.0  # airtime counted for a programme whose length is known only on air
MAX_REPEAT = 10  # plays of a programme's (or an emergency's) message
MAX_GAP = 7200.0  # seconds between two plays


class ProgrammeError(ContentError):
    """A programme breaks a rule: a bad field, a transition its status forbids, not approved."""


class Fields(Protocol):
    """Typed reads of a (merged) programme body; a missing or mistyped field raises."""

    def value(self, name: str, kind: type, *, required: bool = True, default: Any = None) -> Any:
        ...

    def strings(self, name: str) -> list[str]:
        ...


MediaLookup = Callable[[str, str], Awaitable[Record]]  # (media id, field) -> the media record
MountLookup = Callable[[str], Awaitable[Record]]  # mount id -> the mount (in the caller's scope)
UrlCheck = Callable[[str], Awaitable[None]]  # raises ValueError with the reason to refuse


async def programme_fields(fields: Fields, media: MediaLookup, check_url: UrlCheck,
                           mount: MountLookup | None = None) -> Record:
    """The stored fields of a programme, validated, with its duration (one play) where known."""
    title = fields.value("title", str)
    if not title.strip() or len(title) > 200:
        raise ProgrammeError(say("title.length", limit=200), field="title")
    kind = fields.value("type", str)
    if kind not in PROGRAMME_TYPES:
        raise ProgrammeError(say("programme.type", types=", ".join(PROGRAMME_TYPES)),
                             field="type")
    volume = fields.value("volume", int, required=False, default=100)
    if not 0 <= volume <= 150:
        raise ProgrammeError(say("volume.range", limit=150), field="volume")
    repeat = fields.value("repeat", int, required=False, default=1)
    if not 1 <= repeat <= MAX_REPEAT:
        raise ProgrammeError(say("programme.repeat", limit=MAX_REPEAT), field="repeat")
    gap = fields.value("gap", float, required=False, default=0.0)
    if not 0 <= gap <= MAX_GAP:
        raise ProgrammeError(say("programme.gap", limit=MAX_GAP), field="gap")
    out: Record = {"title": title.strip(), "type": kind, "volume": volume, "repeat": repeat,
                   "gap": gap}
    if kind == "file":
        out["media"] = fields.value("media", str)
        ids = [out["media"]]
    elif kind == "playlist":
        out["items"] = fields.strings("items")
        ids = out["items"]
    else:
        ids = []
    seconds = 0.0
    for mid in ids:
        m = await media(mid, "media" if kind == "file" else "items")
        seconds += float(m.get("duration", 0))
    out["duration"] = seconds or None  # one play; tts/relay/live: known when it airs
    if kind == "tts":
        text = fields.value("text", str)
        if not text.strip() or len(text) > 5000:
            raise ProgrammeError(say("text.length", limit=5000), field="text")
        out["text"] = text
    if kind == "relay":
        url = fields.value("url", str)
        if len(url) > 2000:
            raise ProgrammeError(say("programme.url_length", limit=2000), field="url")
        try:
            await check_url(url)
        except ValueError as e:
            raise ProgrammeError(str(e), field="url") from None
        out["url"] = url
    if kind == "fm":  # an FM station the area's receivers tune: it has no end of its own
        mhz = fields.value("frequency_mhz", float)
        if not FM_BAND[0] <= mhz <= FM_BAND[1]:
            raise ProgrammeError(say("programme.fm_frequency", low=FM_BAND[0], high=FM_BAND[1]),
                                 field="frequency_mhz")
        seconds = fields.value("duration", float)
        if not 1 <= seconds <= MAX_FM_SECONDS:
            raise ProgrammeError(say("programme.fm_duration", limit=int(MAX_FM_SECONDS)),
                                 field="duration")
        out.update(frequency_mhz=round(mhz, 2), duration=seconds)
    if kind == "ingest":
        mid = fields.value("mount", str)
        if mount is None:
            raise ProgrammeError(say("programme.ingest_unavailable"), field="type")
        out["mount"] = (await mount(mid))["id"]
    return out


def new_programme(fields: Record, area: str, owner: str, now: float | None = None) -> Record:
    """A new programme: a draft of its owner's area."""
    return {**fields, "id": uuid.uuid4().hex[:12], "area": area, "owner": owner,
            "status": "draft", "created": time.time() if now is None else now}


def edited(fields: Record) -> Record:
    """The changes of an edit: an edited programme needs a new editorial check."""
    return {**fields, "status": "draft", "reason": None}


def submission(prog: Record, user: str) -> Record:
    if prog["status"] not in ("draft", "rejected"):
        raise ProgrammeError(say("programme.cannot_submit", status=prog["status"]),
                             kind="conflict")
    return {"status": "pending", "submitted_by": user, "reason": None}


def check_reviewable(prog: Record, action: str) -> None:
    """Only a pending programme is approved or rejected."""
    if prog["status"] != "pending":
        raise ProgrammeError(say("programme.not_pending", action=action, status=prog["status"]),
                             kind="conflict")


def approval(prog: Record, user: str, now: float | None = None) -> Record:
    check_reviewable(prog, "approve")
    return {"status": "approved", "approved_by": user,
            "approved_at": time.time() if now is None else now}


def rejection(prog: Record, user: str, reason: str) -> Record:
    """Call `check_reviewable` first when reading the reason costs something (a request body)."""
    check_reviewable(prog, "reject")
    if not reason.strip():
        raise ProgrammeError(say("programme.reason_required"), field="reason")
    return {"status": "rejected", "reason": reason.strip(), "rejected_by": user}


def check_schedulable(prog: Record, direct: bool) -> None:
    """Only an approved programme is scheduled, unless the scheduler may air directly."""
    if prog.get("status") != "approved" and not direct:
        raise ProgrammeError(say("programme.not_approved"), kind="conflict", field="programme")


def airtime(prog: Record | None) -> float:
    """Seconds a programme airs, repeats and gaps included, for conflict checks."""
    if prog is None:
        return 0.0
    repeat = int(prog.get("repeat", 1))
    return (float(prog.get("duration") or FALLBACK_SECONDS) * repeat
            + float(prog.get("gap", 0)) * (repeat - 1))


async def airtimes(store: Store, schedules: Iterable[Record]) -> dict[str, float]:
    """programme id -> its airtime, for the conflict check of these schedules."""
    return {s["programme"]: airtime(await store.get("programme", s["programme"]))
            for s in schedules}
