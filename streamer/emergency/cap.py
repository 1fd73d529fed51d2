"""CAP 1.2 (OASIS Common Alerting Protocol): safe parsing, schema validation, mapping to Loa.

Parsing is `defusedxml` with DTDs, entity declarations and external references all forbidden: a
CAP message never needs them, and they are how "billion laughs" and XXE documents attack a parser.
Validation implements the rules of the official CAP 1.2 schema (the XSD is not shipped here) in
code, so every refusal names the element and says why, Vietnamese first:

- namespace `urn:oasis:names:tc:emergency:cap:1.2`, root `alert`;
- the element order and cardinality of `alert`, `info`, `resource`, `area` as the schema's
  `sequence`s define them (ds: signatures and other foreign elements are allowed at the end of
  `alert`, like the schema's `any`);
- required elements (`identifier`, `sender`, `sent`, `status`, `msgType`, `scope`; `category`,
  `event`, `urgency`, `severity`, `certainty` in `info`; `resourceDesc`, `mimeType` in
  `resource`; `areaDesc` in `area`); enumerations of status, msgType, scope, category,
  responseType, urgency, severity, certainty;
- dateTime values in the schema's pattern `YYYY-MM-DDThh:mm:ss±hh:mm` (an explicit offset; "Z"
  is not allowed by CAP 1.2 §3.3.2) that are also real instants;
- identifier and sender without spaces, commas, "<" or "&"; `references` as space-separated
  `sender,identifier,sent` triples; polygons as closed rings of at least four `lat,lon` points,
  circles as `lat,lon radius_km`, in range.

Inline resources (`derefUri`, base64; real civil-emergency messages carry their EAS audio this
way, hundreds of KB) have no length limit in CAP 1.2: they are bounded by the caller's
`max_resource` (decoded bytes) instead of the text-field limit, may hold whitespace and line
breaks, and are checked against `size` (decoded bytes) and `digest` (SHA-1, hex) when given.
Optional elements present but empty (`<instruction/>`, `<source></source>`: IPAWS and
Environment Canada send them) count as absent. An `info` without `language` is taken as
Vietnamese (CAP's own default is en-US; the feeds Loa serves are Vietnamese).

Beyond the schema, for a message to act on: Alert and Update need at least one `info`; Update
and Cancel need `references`; restricted and private scopes need `restriction`/`addresses`.

Mapping (what `streamer/emergency/service.py` airs): the preferred `info` (language vi / vi-VN first),
its areas (geocodes whose valueName is configured, default "area", carry an area code; polygons
and circles select the areas whose point lies inside), its class from severity and urgency
(a configurable table), the text to speak and to show, its expiry and an audio resource.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from xml.etree.ElementTree import Element, ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

from loa.streamer.areas import AreaTree
from loa.streamer.errors import LoaError
from loa.streamer.messages import say

NS = "urn:oasis:names:tc:emergency:cap:1.2"
_Q = "{" + NS + "}"

STATUS = ("Actual", "Exercise", "System", "Test", "Draft")
MSG_TYPES = ("Alert", "Update", "Cancel", "Ack", "Error")
SCOPES = ("Public", "Restricted", "Private")
CATEGORIES = ("Geo", "Met", "Safety", "Security", "Rescue", "Fire", "Health", "Env",
              "Transport", "Infra", "CBRNE", "Other")
RESPONSE_TYPES = ("Shelter", "Evacuate", "Prepare", "Execute", "Avoid", "Monitor", "Assess",
                  "AllClear", "None")
URGENCIES = ("Immediate", "Expected", "Future", "Past", "Unknown")
SEVERITIES = ("Extreme", "Severe", "Moderate", "Minor", "Unknown")
CERTAINTIES = ("Observed", "Likely", "Possible", "Unlikely", "Unknown")

# The schema's pattern for every dateTime of CAP 1.2 (no "Z", no fractions: an explicit offset).
_DATETIME = re.compile(r"^\d\d\d\d-\d\d-\d\dT\d\d:\d\d:\d\d[-+]\d\d:\d\d$")
_BAD_ID_CHARS = re.compile(r"[\s,<&]")
MAX_TEXT_FIELD = 20_000  # characters of one text element (description, instruction ...)
DEFAULT_LANGUAGE = "vi-VN"  # an info without <language>
_SHA1_HEX = re.compile(r"^[0-9a-fA-F]{40}$")


class CapError(LoaError, ValueError):
    """A CAP document that cannot be accepted (kind invalid); `element` names the CAP element."""

    def __init__(self, message: str, element: str | None = None) -> None:
        super().__init__(message)
        self.element = element


class CapNotXml(CapError):
    """Not an XML document Loa reads at all (malformed, DTD, entities): the API answers 400,
    a status no kind has, where a well-formed document that breaks CAP's rules gets 422."""


# ---- the model --------------------------------------------------------------------------------
@dataclass
class CapResource:
    description: str
    mime_type: str
    size: int | None = None
    uri: str | None = None
    deref: bytes | None = None  # derefUri, base64-decoded
    digest: str | None = None

    @property
    def is_audio(self) -> bool:
        return self.mime_type.lower().startswith("audio/")


@dataclass
class CapArea:
    description: str
    polygons: list[list[tuple[float, float]]] = field(default_factory=list)
    circles: list[tuple[float, float, float]] = field(default_factory=list)  # lat, lon, km
    geocodes: list[tuple[str, str]] = field(default_factory=list)  # (valueName, value)
    altitude: float | None = None
    ceiling: float | None = None


@dataclass
class CapInfo:
    language: str
    categories: list[str]
    event: str
    urgency: str
    severity: str
    certainty: str
    response_types: list[str] = field(default_factory=list)
    audience: str | None = None
    event_codes: list[tuple[str, str]] = field(default_factory=list)
    effective: datetime | None = None
    onset: datetime | None = None
    expires: datetime | None = None
    sender_name: str | None = None
    headline: str | None = None
    description: str | None = None
    instruction: str | None = None
    web: str | None = None
    contact: str | None = None
    parameters: list[tuple[str, str]] = field(default_factory=list)
    resources: list[CapResource] = field(default_factory=list)
    areas: list[CapArea] = field(default_factory=list)


@dataclass
class CapAlert:
    identifier: str
    sender: str
    sent: datetime
    sent_text: str  # as written: part of the message's identity
    status: str
    msg_type: str
    scope: str
    source: str | None = None
    restriction: str | None = None
    addresses: str | None = None
    codes: list[str] = field(default_factory=list)
    note: str | None = None
    references: list[tuple[str, str, str]] = field(default_factory=list)
    incidents: str | None = None
    infos: list[CapInfo] = field(default_factory=list)

    @property
    def key(self) -> str:
        """The identity of a CAP message: sender, identifier and sent (CAP 1.2 §3.2.1)."""
        return message_key(self.sender, self.identifier, self.sent_text)

    def reference_keys(self) -> list[str]:
        return [message_key(s, i, t) for s, i, t in self.references]

    def summary(self) -> dict[str, Any]:
        return {"identifier": self.identifier, "sender": self.sender, "sent": self.sent_text,
                "status": self.status, "msgType": self.msg_type, "scope": self.scope,
                "references": [",".join(r) for r in self.references]}


def message_key(sender: str, identifier: str, sent: str) -> str:
    return f"{sender},{identifier},{sent}"


# ---- the schema, as code ------------------------------------------------------------------------
# (element, minOccurs, maxOccurs) in schema order; maxOccurs None = unbounded.
Seq = tuple[tuple[str, int, int | None], ...]
ALERT_SEQ: Seq = (("identifier", 1, 1), ("sender", 1, 1), ("sent", 1, 1), ("status", 1, 1),
                  ("msgType", 1, 1), ("source", 0, 1), ("scope", 1, 1), ("restriction", 0, 1),
                  ("addresses", 0, 1), ("code", 0, None), ("note", 0, 1),
                  ("references", 0, 1), ("incidents", 0, 1), ("info", 0, None))
INFO_SEQ: Seq = (("language", 0, 1), ("category", 1, None), ("event", 1, 1),
                 ("responseType", 0, None), ("urgency", 1, 1), ("severity", 1, 1),
                 ("certainty", 1, 1), ("audience", 0, 1), ("eventCode", 0, None),
                 ("effective", 0, 1), ("onset", 0, 1), ("expires", 0, 1),
                 ("senderName", 0, 1), ("headline", 0, 1), ("description", 0, 1),
                 ("instruction", 0, 1), ("web", 0, 1), ("contact", 0, 1),
                 ("parameter", 0, None), ("resource", 0, None), ("area", 0, None))
RESOURCE_SEQ: Seq = (("resourceDesc", 1, 1), ("mimeType", 1, 1), ("size", 0, 1), ("uri", 0, 1),
                     ("derefUri", 0, 1), ("digest", 0, 1))
AREA_SEQ: Seq = (("areaDesc", 1, 1), ("polygon", 0, None), ("circle", 0, None),
                 ("geocode", 0, None), ("altitude", 0, 1), ("ceiling", 0, 1))
VALUE_SEQ: Seq = (("valueName", 1, 1), ("value", 1, 1))
# Elements that must hold text; any other element present but empty counts as absent (a
# parameter's <value/> included: Environment Canada sends empty ones).
REQUIRED_TEXT = frozenset(name for seq in (ALERT_SEQ, INFO_SEQ, RESOURCE_SEQ, AREA_SEQ, VALUE_SEQ)
                          for name, lo, _ in seq if lo and name != "value")


def _local(el: Element) -> tuple[str | None, str]:
    tag = el.tag if isinstance(el.tag, str) else ""
    if tag.startswith("{"):
        ns, _, name = tag[1:].partition("}")
        return ns, name
    return None, tag


def _sequence(parent: Element, seq: Seq, where: str, *, foreign_tail: bool = False
              ) -> dict[str, list[Element]]:
    """Check the children of `parent` against a schema sequence; returns them by name."""
    out: dict[str, list[Element]] = {name: [] for name, _, _ in seq}
    children = list(parent)
    i = 0
    for name, lo, hi in seq:
        while i < len(children):
            ns, local = _local(children[i])
            if ns != NS or local != name:
                break
            out[name].append(children[i])
            i += 1
        n = len(out[name])
        if n < lo and any(_local(c) == (NS, name) for c in children[i:]):
            raise CapError(say("cap.out_of_order", name=name, where=where,
                               order=", ".join(x for x, _, _ in seq)), element=name)
        if n < lo:
            raise CapError(say("cap.missing", name=name, where=where), element=name)
        if hi is not None and n > hi:
            raise CapError(say("cap.too_many", name=name, hi=hi, where=where), element=name)
    if foreign_tail:  # the schema's <any namespace="##other">: signatures, encryption
        while i < len(children) and _local(children[i])[0] not in (NS, None):
            i += 1
    if i < len(children):
        ns, local = _local(children[i])
        shown = local if ns == NS else children[i].tag
        raise CapError(say("cap.unexpected", name=shown, where=where), element=str(local))
    return out


def _text(el: Element, name: str, *, required: bool = True) -> str:
    if len(el):
        raise CapError(say("cap.has_children", name=name), element=name)
    value = (el.text or "").strip()
    if required and not value:
        raise CapError(say("cap.empty", name=name), element=name)
    if len(value) > MAX_TEXT_FIELD:
        raise CapError(say("cap.too_long", name=name, limit=MAX_TEXT_FIELD), element=name)
    return value


def _one(found: dict[str, list[Element]], name: str) -> str | None:
    els = found[name]
    return (_text(els[0], name, required=name in REQUIRED_TEXT) or None) if els else None


def _enum(value: str, allowed: tuple[str, ...], name: str) -> str:
    if value not in allowed:
        raise CapError(say("cap.not_one_of", name=name, value=value, allowed=", ".join(allowed)),
                       element=name)
    return value


def parse_datetime(value: str, name: str = "sent") -> datetime:
    if not _DATETIME.match(value):
        raise CapError(say("cap.datetime", name=name, value=value), element=name)
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise CapError(say("cap.not_instant", name=name, value=value), element=name) from None


def _id_text(value: str, name: str) -> str:
    if _BAD_ID_CHARS.search(value):
        raise CapError(say("cap.bad_chars", name=name), element=name)
    return value


def _number(text: str, name: str, lo: float, hi: float) -> float:
    try:
        v = float(text)
    except ValueError:
        raise CapError(say("cap.not_number", name=name, value=text), element=name) from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise CapError(say("cap.out_of_range", name=name, lo=lo, hi=hi), element=name)
    return v


def _point(text: str, name: str) -> tuple[float, float]:
    lat_s, sep, lon_s = text.partition(",")
    if not sep:
        raise CapError(say("cap.point", name=name, value=text), element=name)
    return _number(lat_s, name, -90, 90), _number(lon_s, name, -180, 180)


def parse_polygon(text: str) -> list[tuple[float, float]]:
    pts = [_point(p, "polygon") for p in text.split()]
    if len(pts) < 4 or pts[0] != pts[-1]:
        raise CapError(say("cap.polygon"), element="polygon")
    return pts


def parse_circle(text: str) -> tuple[float, float, float]:
    parts = text.split()
    if len(parts) != 2:
        raise CapError(say("cap.circle"), element="circle")
    lat, lon = _point(parts[0], "circle")
    return lat, lon, _number(parts[1], "circle", 0, 20_000)


def _values(els: list[Element], name: str) -> list[tuple[str, str]]:
    out = []
    for el in els:
        found = _sequence(el, VALUE_SEQ, name)
        out.append((_one(found, "valueName") or "", _one(found, "value") or ""))
    return out


def _resource(el: Element, max_resource: int | None) -> CapResource:
    f = _sequence(el, RESOURCE_SEQ, "resource")
    size = None
    if f["size"]:
        s = _one(f, "size") or ""
        if not s.isdigit():
            raise CapError(say("cap.size_integer"), element="size")
        size = int(s)
    digest = _one(f, "digest")
    if digest is not None and not _SHA1_HEX.match(digest):
        raise CapError(say("cap.digest_format"), element="digest")
    res = CapResource(description=_one(f, "resourceDesc") or "",
                      mime_type=_one(f, "mimeType") or "", size=size, uri=_one(f, "uri"),
                      digest=digest)
    if f["derefUri"]:
        res.deref = _deref(f["derefUri"][0], max_resource)
        verify(res, res.deref)
    return res


def _deref(el: Element, max_resource: int | None) -> bytes:
    """An inline resource: base64 of any length (whitespace and line breaks allowed), at most
    `max_resource` bytes once decoded."""
    if len(el):
        raise CapError(say("cap.has_children", name="derefUri"), element="derefUri")
    text = "".join((el.text or "").split())
    if not text:
        raise CapError(say("cap.empty", name="derefUri"), element="derefUri")
    size = len(text) // 4 * 3 - (len(text) - len(text.rstrip("=")))  # decoded, before decoding
    if max_resource is not None and size > max_resource:
        raise CapError(say("cap.resource_too_large", size=size, limit=max_resource),
                       element="derefUri")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise CapError(say("cap.deref_encoding", error=e), element="derefUri") from None


def verify(res: CapResource, data: bytes) -> None:
    """The resource's bytes against its declared `size` and `digest` (SHA-1 hex)."""
    if res.size is not None and res.size != len(data):
        raise CapError(say("cap.size_mismatch", declared=res.size, size=len(data)), element="size")
    if res.digest is not None and hashlib.sha1(data).hexdigest() != res.digest.lower():
        raise CapError(say("cap.digest_mismatch"), element="digest")


def _area(el: Element) -> CapArea:
    f = _sequence(el, AREA_SEQ, "area")
    area = CapArea(description=_one(f, "areaDesc") or "",
                   polygons=[parse_polygon(t) for p in f["polygon"]
                             if (t := _text(p, "polygon", required=False))],
                   circles=[parse_circle(t) for c in f["circle"]
                            if (t := _text(c, "circle", required=False))],
                   geocodes=_values(f["geocode"], "geocode"))
    if f["altitude"]:
        area.altitude = _number(_one(f, "altitude") or "", "altitude", -1e6, 1e6)
    if f["ceiling"]:
        if area.altitude is None:
            raise CapError(say("cap.ceiling"), element="ceiling")
        area.ceiling = _number(_one(f, "ceiling") or "", "ceiling", -1e6, 1e6)
    return area


def _info(el: Element, max_resource: int | None) -> CapInfo:
    f = _sequence(el, INFO_SEQ, "info")

    def when(name: str) -> datetime | None:
        v = _one(f, name)
        return parse_datetime(v, name) if v is not None else None

    return CapInfo(
        language=_one(f, "language") or DEFAULT_LANGUAGE,
        categories=[_enum(_text(c, "category"), CATEGORIES, "category") for c in f["category"]],
        event=_one(f, "event") or "",
        response_types=[_enum(_text(r, "responseType"), RESPONSE_TYPES, "responseType")
                        for r in f["responseType"]],
        urgency=_enum(_one(f, "urgency") or "", URGENCIES, "urgency"),
        severity=_enum(_one(f, "severity") or "", SEVERITIES, "severity"),
        certainty=_enum(_one(f, "certainty") or "", CERTAINTIES, "certainty"),
        audience=_one(f, "audience"),
        event_codes=_values(f["eventCode"], "eventCode"),
        effective=when("effective"), onset=when("onset"), expires=when("expires"),
        sender_name=_one(f, "senderName"), headline=_one(f, "headline"),
        description=_one(f, "description"), instruction=_one(f, "instruction"),
        web=_one(f, "web"), contact=_one(f, "contact"),
        parameters=_values(f["parameter"], "parameter"),
        resources=[_resource(r, max_resource) for r in f["resource"]],
        areas=[_area(a) for a in f["area"]],
    )


def _references(text: str) -> list[tuple[str, str, str]]:
    out = []
    for item in text.split():
        parts = item.split(",")
        if len(parts) != 3 or not all(parts):
            raise CapError(say("cap.references_format", value=item), element="references")
        parse_datetime(parts[2], "references")
        out.append((parts[0], parts[1], parts[2]))
    return out


def parse(data: bytes, max_resource: int | None = None) -> CapAlert:
    """Parse and validate one CAP 1.2 alert. CapError (CapNotXml: not XML) when it is bad.
    `max_resource`: the largest inline resource (decoded bytes); None for no limit."""
    try:
        root = fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as e:
        raise CapNotXml(say("cap.xml_refused", error=type(e).__name__)) from None
    except (ParseError, ValueError) as e:
        raise CapNotXml(say("cap.not_xml", error=e)) from None
    ns, local = _local(root)
    if local != "alert" or ns != NS:
        raise CapError(say("cap.root", ns=NS, local=local, found=ns or "no namespace"),
                       element="alert")
    f = _sequence(root, ALERT_SEQ, "alert", foreign_tail=True)
    sent_text = _one(f, "sent") or ""
    alert = CapAlert(
        identifier=_id_text(_one(f, "identifier") or "", "identifier"),
        sender=_id_text(_one(f, "sender") or "", "sender"),
        sent=parse_datetime(sent_text, "sent"),
        sent_text=sent_text,
        status=_enum(_one(f, "status") or "", STATUS, "status"),
        msg_type=_enum(_one(f, "msgType") or "", MSG_TYPES, "msgType"),
        scope=_enum(_one(f, "scope") or "", SCOPES, "scope"),
        source=_one(f, "source"),
        restriction=_one(f, "restriction"),
        addresses=_one(f, "addresses"),
        codes=[_text(c, "code") for c in f["code"]],
        note=_one(f, "note"),
        incidents=_one(f, "incidents"),
        infos=[_info(i, max_resource) for i in f["info"]],
    )
    if f["references"]:
        alert.references = _references(_one(f, "references") or "")
    if alert.scope == "Restricted" and not alert.restriction:
        raise CapError(say("cap.restricted"), element="restriction")
    if alert.scope == "Private" and not alert.addresses:
        raise CapError(say("cap.private"), element="addresses")
    if alert.msg_type in ("Alert", "Update") and not alert.infos:
        raise CapError(say("cap.no_info", type=alert.msg_type), element="info")
    if alert.msg_type in ("Update", "Cancel") and not alert.references:
        raise CapError(say("cap.no_references", type=alert.msg_type), element="references")
    return alert


# ---- mapping ------------------------------------------------------------------------------------
def pick_info(alert: CapAlert, preferred: tuple[str, ...] = ("vi", "vi-VN")) -> CapInfo:
    """The info block to air: the first in a preferred language, else the first."""
    want = [p.lower() for p in preferred]
    for lang in want:
        for info in alert.infos:
            if info.language.lower() == lang:
                return info
    for info in alert.infos:  # vi-XX when only "vi" was preferred, and the like
        if info.language.lower().split("-")[0] in {w.split("-")[0] for w in want}:
            return info
    return alert.infos[0]


def parse_class_table(emergency: str, priority: str) -> list[tuple[str, str, str]]:
    """`"Extreme/Immediate,Severe/Immediate"`-style lists -> [(class, severity, urgency)];
    `*` matches anything. Checked at start-up (ValueError)."""
    table = []
    for klass, spec in (("emergency", emergency), ("priority", priority)):
        for item in (x.strip() for x in spec.split(",")):
            if not item:
                continue
            sev, sep, urg = item.partition("/")
            if not sep or (sev != "*" and sev not in SEVERITIES) or (
                    urg != "*" and urg not in URGENCIES):
                raise ValueError(f"bad CAP class rule {item!r}: Severity/Urgency, e.g. "
                                 "Severe/Immediate (or * for any)")
            table.append((klass, sev, urg))
    return table


def classify(info: CapInfo, table: list[tuple[str, str, str]]) -> str:
    for klass, sev, urg in table:
        if sev in ("*", info.severity) and urg in ("*", info.urgency):
            return klass
    return "normal"


def point_in_polygon(lat: float, lon: float, ring: list[tuple[float, float]]) -> bool:
    """Ray casting on (lat, lon) as plane coordinates (fine at the size of a province)."""
    inside = False
    n = len(ring)
    j = n - 1
    for i in range(n):
        yi, xi = ring[i]
        yj, xj = ring[j]
        if (yi > lat) != (yj > lat):
            x = xi + (lat - yi) * (xj - xi) / (yj - yi)
            if lon < x:
                inside = not inside
        j = i
    return inside


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6371.0088 * math.asin(min(1.0, math.sqrt(a)))


def target_areas(info: CapInfo, tree: AreaTree, geocode_name: str = "area") -> list[str]:
    """The Loa areas an info block targets. Geocodes named `geocode_name` must be area codes
    (CapError naming the unknown one); polygons and circles select every area whose point lies
    inside. An area below another selected one is dropped (its ancestor covers it)."""
    picked: dict[str, None] = {}
    for area in info.areas:
        for name, value in area.geocodes:
            if name != geocode_name:
                continue
            if value not in tree:
                raise CapError(say("area.unknown", area=value), element="geocode")
            picked.setdefault(value, None)
        if area.polygons or area.circles:
            for a in tree:
                if a.lat is None or a.lon is None:
                    continue
                if any(point_in_polygon(a.lat, a.lon, ring) for ring in area.polygons) or any(
                        distance_km(a.lat, a.lon, c_lat, c_lon) <= km
                        for c_lat, c_lon, km in area.circles):
                    picked.setdefault(a.code, None)
    codes = list(picked)
    chosen = set(codes)
    return [c for c in codes if not any(anc in chosen for anc in tree.ancestors(c)[1:])]


def spoken_text(info: CapInfo, prefix: str = "") -> str:
    """What TTS reads after the attention signal: headline, description, instruction."""
    parts = [prefix] if prefix else []
    for t in (info.headline or info.event, info.description, info.instruction):
        if t:
            t = " ".join(t.split())
            parts.append(t if t[-1] in ".!?…" else t + ".")
    return " ".join(parts)


def board_text(info: CapInfo, prefix: str = "", limit: int = 2000) -> str:
    parts = [prefix] if prefix else []
    parts += [" ".join(t.split()) for t in (info.headline or info.event, info.description,
                                            info.instruction) if t]
    text = " — ".join(parts)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def expiry(info: CapInfo) -> float | None:
    return info.expires.timestamp() if info.expires else None


def now_utc() -> datetime:
    return datetime.now(UTC)
