"""A bulletin from the central source system (docs/exchange.md): the envelope read and checked
before anything is stored or aired. Modelled on CAP 1.2 (identifier, sender, sent, info with
urgency, resources with digests, areas by geocode, effective/expires) and EDXL-DE (one
envelope, content objects with digests), with the TT 39 class in place of severity × urgency."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from loa.streamer.areas import AreaTree
from loa.streamer.broadcast import BroadcastClass
from loa.streamer.errors import LoaError
from loa.streamer.messages import say

CLASSES = ("normal", "priority", "emergency")  # TT 39 thông thường, ưu tiên, khẩn cấp
FIELDS = {"id", "sender", "sent", "class", "title", "text", "attachments", "targets",
          "valid_from", "valid_until", "type", "references"}
# CAP msgType: a new bulletin, one that replaces those it references, or the end of them.
TYPES = ("alert", "update", "cancel")
MAX_REFERENCES = 100
ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
MAX_TEXT = 5000
MAX_TITLE = 200
MAX_TARGETS = 5000


class BulletinError(LoaError):
    """The envelope is refused (422 unless its kind says otherwise); `field` names the part."""


@dataclass
class Attachment:
    mime: str
    sha256: str
    data: bytes | None = None  # inline (base64 in the envelope), decoded
    uri: str | None = None  # to fetch, then check against sha256


@dataclass
class Bulletin:
    id: str
    sender: str
    sent: float
    klass: str
    title: str
    text: str | None
    targets: list[str]
    valid_from: float | None
    valid_until: float | None
    attachments: list[Attachment] = field(default_factory=list)
    type: str = "alert"
    references: list[str] = field(default_factory=list)  # ids of the same sender's bulletins

    @property
    def audio(self) -> Attachment | None:
        """The first audio attachment airs; the text is read when there is none."""
        return next((a for a in self.attachments if a.mime.startswith("audio/")), None)


def _time(data: dict[str, Any], name: str, required: bool) -> float | None:
    value = data.get(name)
    if value is None and not required:
        return None
    try:
        when = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:  # CAP: times carry their offset
        raise BulletinError(say("exchange.bad_time", name=name), field=name)
    return when.timestamp()


def _string(data: dict[str, Any], name: str, limit: int, required: bool = True) -> str | None:
    value = data.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise BulletinError(say("exchange.bad_string", name=name, limit=limit), field=name)
    return " ".join(value.split())


def _attachment(i: int, raw: Any, max_bytes: int) -> Attachment:
    name = f"attachments[{i}]"
    if not isinstance(raw, dict) or set(raw) - {"uri", "data", "sha256", "mime", "size"}:
        raise BulletinError(say("exchange.bad_attachment", name=name), field=name)
    mime, digest = raw.get("mime"), raw.get("sha256")
    if not isinstance(mime, str) or not mime or not isinstance(digest, str) \
            or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
        raise BulletinError(say("exchange.bad_attachment", name=name), field=name)
    uri, inline = raw.get("uri"), raw.get("data")
    if (uri is None) == (inline is None):
        raise BulletinError(say("exchange.bad_attachment", name=name), field=name)
    if uri is not None:
        if not isinstance(uri, str) or not uri.startswith(("http://", "https://")):
            raise BulletinError(say("exchange.bad_attachment", name=name), field=f"{name}.uri")
        return Attachment(mime, digest.lower(), uri=uri)
    if not isinstance(inline, str) or len(inline) > (max_bytes * 4) // 3 + 4096:
        raise BulletinError(say("exchange.attachment_too_large", name=name),
                            field=f"{name}.data")
    try:
        data = base64.b64decode("".join(inline.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BulletinError(say("exchange.bad_encoding", name=name), field=f"{name}.data") from None
    att = Attachment(mime, digest.lower(), data=data)
    verify(att, data, name)
    return att


def verify(att: Attachment, data: bytes, name: str) -> None:
    """The bytes are the ones the sender signed for by digest (EDXL-DE contentDigest)."""
    if hashlib.sha256(data).hexdigest() != att.sha256:
        raise BulletinError(say("exchange.digest_mismatch", name=name), field=f"{name}.sha256")


def parse(data: dict[str, Any], tree: AreaTree, max_bytes: int) -> Bulletin:
    """Check every field (the first fault is named) and every target area."""
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise BulletinError(say("field.unchangeable", fields=", ".join(unknown)),
                            field=unknown[0])
    bid = data.get("id")
    if not isinstance(bid, str) or not ID.fullmatch(bid):
        raise BulletinError(say("exchange.bad_id"), field="id")
    kind = data.get("type", "alert")
    if kind not in TYPES:
        raise BulletinError(say("exchange.bad_type", types=", ".join(TYPES)), field="type")
    refs = data.get("references", [])
    if not isinstance(refs, list) or len(refs) > MAX_REFERENCES or not all(
            isinstance(r, str) and ID.fullmatch(r) and r != bid for r in refs) \
            or (kind != "alert") != bool(refs):
        raise BulletinError(say("exchange.bad_references", limit=MAX_REFERENCES),
                            field="references")
    sent = _time(data, "sent", required=True)
    assert sent is not None
    sender = _string(data, "sender", 200) or ""
    if kind == "cancel":  # ends what it references: nothing of its own to air
        return Bulletin(id=bid, sender=sender, sent=sent, klass="normal", title="", text=None,
                        targets=[], valid_from=None, valid_until=None, type=kind,
                        references=list(dict.fromkeys(refs)))
    klass = data.get("class")
    if klass not in CLASSES:
        raise BulletinError(say("exchange.bad_class", classes=", ".join(CLASSES)), field="class")
    targets = data.get("targets")
    if not isinstance(targets, list) or not targets or len(targets) > MAX_TARGETS \
            or not all(isinstance(t, str) and t for t in targets):
        raise BulletinError(say("field.empty_list", name="targets"), field="targets")
    for t in targets:
        if t not in tree:
            raise BulletinError(say("area.unknown", area=t[:64]), field="targets")
    text = _string(data, "text", MAX_TEXT, required=False)
    raw_atts = data.get("attachments") or []
    if not isinstance(raw_atts, list):
        raise BulletinError(say("exchange.bad_attachment", name="attachments"),
                            field="attachments")
    attachments = [_attachment(i, a, max_bytes) for i, a in enumerate(raw_atts)]
    if text is None and not any(a.mime.startswith("audio/") for a in attachments):
        raise BulletinError(say("exchange.nothing_to_air"), field="text")
    valid_from = _time(data, "valid_from", required=False)
    valid_until = _time(data, "valid_until", required=False)
    if valid_until is not None and valid_from is not None and valid_until <= valid_from:
        raise BulletinError(say("report.to_before_from"), field="valid_until")
    return Bulletin(
        id=bid, sender=sender, sent=sent,
        klass=BroadcastClass.parse(klass).name,
        title=_string(data, "title", MAX_TITLE) or "", text=text,
        targets=list(dict.fromkeys(targets)), valid_from=valid_from, valid_until=valid_until,
        attachments=attachments, type=kind, references=list(dict.fromkeys(refs)))
