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

from loa.streamer.state.store import Record, Store
from loa.streamer.station import MAX_GAP, MAX_REPEAT, ContentError

PROGRAMME_TYPES = ("file", "playlist", "tts", "relay", "live")
ACTIONS = ("submit", "approve", "reject")
FALLBACK_SECONDS = 60.0  # airtime counted for a programme whose length is known only on air


class ProgrammeError(ContentError):
    """A programme breaks a rule: a bad field, a transition its status forbids, not approved."""


class Fields(Protocol):
    """Typed reads of a (merged) programme body; a missing or mistyped field raises."""

    def value(self, name: str, kind: type, *, required: bool = True, default: Any = None) -> Any:
        ...

    def strings(self, name: str) -> list[str]:
        ...


MediaLookup = Callable[[str, str], Awaitable[Record]]  # (media id, field) -> the media record
UrlCheck = Callable[[str], Awaitable[None]]  # raises ValueError with the reason to refuse


async def programme_fields(fields: Fields, media: MediaLookup, check_url: UrlCheck) -> Record:
    """The stored fields of a programme, validated, with its duration (one play) where known."""
    title = fields.value("title", str)
    if not title.strip() or len(title) > 200:
        raise ProgrammeError("tiêu đề 1-200 ký tự / title must be 1-200 characters", "title")
    kind = fields.value("type", str)
    if kind not in PROGRAMME_TYPES:
        raise ProgrammeError(
            f"loại không hợp lệ / type must be one of {', '.join(PROGRAMME_TYPES)}", "type")
    volume = fields.value("volume", int, required=False, default=100)
    if not 0 <= volume <= 150:
        raise ProgrammeError("âm lượng 0-150 / volume must be within 0-150", "volume")
    repeat = fields.value("repeat", int, required=False, default=1)
    if not 1 <= repeat <= MAX_REPEAT:
        raise ProgrammeError(
            f"số lần lặp 1-{MAX_REPEAT} / repeat must be within 1-{MAX_REPEAT}", "repeat")
    gap = fields.value("gap", float, required=False, default=0.0)
    if not 0 <= gap <= MAX_GAP:
        raise ProgrammeError("khoảng nghỉ 0-7200 giây / gap must be within 0-7200 s", "gap")
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
            raise ProgrammeError("văn bản 1-5000 ký tự / text must be 1-5000 characters", "text")
        out["text"] = text
    if kind == "relay":
        url = fields.value("url", str)
        if len(url) > 2000:
            raise ProgrammeError("địa chỉ tiếp sóng quá dài / url longer than 2000", "url")
        try:
            await check_url(url)
        except ValueError as e:
            raise ProgrammeError(str(e), "url") from None
        out["url"] = url
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
        raise ProgrammeError(f"không thể gửi duyệt ở trạng thái {prog['status']} / "
                             f"cannot submit a {prog['status']} programme", status=409)
    return {"status": "pending", "submitted_by": user, "reason": None}


def check_reviewable(prog: Record, action: str) -> None:
    """Only a pending programme is approved or rejected."""
    if prog["status"] != "pending":
        raise ProgrammeError(f"chỉ duyệt chương trình chờ duyệt / only pending programmes "
                             f"can be {action}d (this one is {prog['status']})", status=409)


def approval(prog: Record, user: str, now: float | None = None) -> Record:
    check_reviewable(prog, "approve")
    return {"status": "approved", "approved_by": user,
            "approved_at": time.time() if now is None else now}


def rejection(prog: Record, user: str, reason: str) -> Record:
    """Call `check_reviewable` first when reading the reason costs something (a request body)."""
    check_reviewable(prog, "reject")
    if not reason.strip():
        raise ProgrammeError("cần lý do từ chối / a reason is required", "reason")
    return {"status": "rejected", "reason": reason.strip(), "rejected_by": user}


def check_schedulable(prog: Record, direct: bool) -> None:
    """Only an approved programme is scheduled, unless the scheduler may air directly."""
    if prog.get("status") != "approved" and not direct:
        raise ProgrammeError("chương trình chưa được duyệt / programme is not approved",
                             "programme", 409)


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
