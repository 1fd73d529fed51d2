"""The device protocol, defined once for both ends (docs/device-protocol.md is the contract).

JSON messages with `"v": 1` over one WebSocket: the device sends `hello`, `heartbeat` and `ack`;
the node sends `welcome`, `config`, `command` and `error`. This module holds the version, the
close codes, the vocabularies and limits, the validators the node applies to what a device sends
and to the commands an operator issues, and the builders of the messages both ends send. It knows
nothing of sessions or storage (relay/devices/manager.py) nor of the device's audio
(relay/agent/).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from loa.streamer.errors import LoaError
from loa.streamer.messages import say

PROTOCOL_VERSION = 1

# ---- close codes (WebSocket close frames sent by the server) -------------------------------------
CLOSE_GOING_AWAY = 1001  # the server shuts down: reconnect with back-off
CLOSE_TOO_BIG = 1009  # a message over max_message_kb
CLOSE_MALFORMED_HELLO = 4000  # first message missing, late, not JSON or not a valid hello
CLOSE_UNAUTHORISED = 4001  # unknown device or wrong key
CLOSE_HEARTBEAT = 4002  # two heartbeats missed: the server considers the device offline
CLOSE_REVOKED = 4003  # key revoked or device deleted: do not reconnect with this key
CLOSE_ABUSE = 4008  # too many malformed messages on one connection
CLOSE_REPLACED = 4009  # another connection of the same device took over

# ---- vocabularies -----------------------------------------------------------------------------
DEVICE_KINDS = ("loudspeaker", "board")
TRANSPORTS = ("http", "hls", "rtp", "webrtc")
CODECS = ("opus", "mp3", "aac", "pcmu", "pcma")
COMMANDS = ("play", "stop", "volume", "power", "reboot", "display", "emergency", "fm")
STATES = ("playing", "idle", "off")
NETWORKS = ("4g", "3g", "5g", "ethernet", "wifi")
DEVICE_STATUSES = ("online", "offline", "fault")
COMMAND_STATUSES = ("queued", "sent", "acked", "failed", "expired")
FINAL = frozenset({"acked", "failed", "expired"})
KNOWN_FAULTS = ("speaker_open", "speaker_short", "power_lost", "sim_error", "amp_fault",
                "stream_stalled", "overheat", "display_fault")

MAX_GROUPS = 10
MAX_TEXT = 2000
MAX_URL = 2000
MAX_NAME = 100
MAX_FAULTS = 32
MAX_RELAYS = 8
MAX_SCHEDULE = 16
MAX_ERROR = 500  # characters of the error of a refused command (ack)
MAX_ID = 64  # characters of a device or command id
_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")
_URL_SCHEMES = ("http://", "https://", "rtp://", "udp://", "rtsp://", "srt://")
# The display content model (boards): see docs/device-protocol.md 3.4.1.
LAYOUTS = ("full", "split")
REGIONS = ("main", "side")
ITEM_TYPES = ("text", "image", "video")
MAX_DISPLAY_ITEMS = 50
MAX_TITLE = 200
MAX_DISPLAY_BYTES = 60 * 1024  # encoded args of one display command
STATEFUL_COMMANDS = ("display", "emergency")  # kept per device and sent again in `config`


# ---- errors -------------------------------------------------------------------------------------
class ProtocolError(LoaError, ValueError):
    """A message or a field that breaks the protocol; the text is sent back to its sender.
    `field` stays positional: every validator names the field it refuses."""

    kind = "invalid"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message, field=field)


# ---- field validation ----------------------------------------------------------------------------
def _field(obj: dict[str, Any], key: str, path: str, required: bool) -> tuple[str, Any]:
    """The field's full name and its value (None when absent and not required)."""
    name = f"{path}{key}"
    v = obj.get(key)
    if v is None and required:
        raise ProtocolError(say("protocol.missing_field", name=name), name)
    return name, v


def _int(obj: dict[str, Any], key: str, lo: int, hi: int, *, path: str = "",
         required: bool = False) -> int | None:
    name, v = _field(obj, key, path, required)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ProtocolError(say("protocol.not_integer", name=name, lo=lo, hi=hi), name)
    return v


def _num(obj: dict[str, Any], key: str, lo: float, hi: float, *, path: str = "",
         required: bool = False) -> float | None:
    name, v = _field(obj, key, path, required)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
            or not lo <= v <= hi:
        raise ProtocolError(say("protocol.not_number", name=name, lo=lo, hi=hi), name)
    return float(v)


def _str(obj: dict[str, Any], key: str, max_len: int, *, path: str = "",
         required: bool = False, choices: Iterable[str] | None = None) -> str | None:
    name, v = _field(obj, key, path, required)
    if v is None:
        return None
    if not isinstance(v, str) or len(v) > max_len:
        raise ProtocolError(say("protocol.not_string", name=name, limit=max_len), name)
    if choices is not None:
        allowed = tuple(choices)
        if v not in allowed:
            raise ProtocolError(say("protocol.not_choice", name=name, allowed=", ".join(allowed)),
                                name)
    return v


def _bool(obj: dict[str, Any], key: str, *, path: str = "", required: bool = False
          ) -> bool | None:
    name, v = _field(obj, key, path, required)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise ProtocolError(say("protocol.not_boolean", name=name), name)
    return v


def _obj(v: Any, name: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ProtocolError(say("protocol.not_object", name=name), name)
    return v


def _url(obj: dict[str, Any], key: str, *, path: str = "", required: bool = False
         ) -> str | None:
    v = _str(obj, key, MAX_URL, path=path, required=required)
    if v is not None and not v.startswith(_URL_SCHEMES):
        raise ProtocolError(say("protocol.not_stream_url", name=f"{path}{key}"), f"{path}{key}")
    return v


def _no_extra(obj: dict[str, Any], allowed: Iterable[str], name: str) -> None:
    extra = sorted(set(obj) - set(allowed))
    if extra:
        raise ProtocolError(say("protocol.unknown_fields", name=name, fields=", ".join(extra)),
                            name)


def _names(v: Any, name: str, choices: tuple[str, ...]) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ProtocolError(say("protocol.not_string_list", name=name), name)
    bad = [x for x in v if x not in choices]
    if bad:
        raise ProtocolError(say("protocol.unsupported_values", name=name, values=", ".join(bad[:5]),
                                supported=", ".join(choices)), name)
    return list(dict.fromkeys(v))


def validate_capabilities(v: Any) -> dict[str, Any]:
    """{"codecs": [...], "transports": [...], "display": {"width", "height"}?}."""
    caps = _obj(v, "capabilities")
    _no_extra(caps, ("codecs", "transports", "display", "fm"), "capabilities")
    out: dict[str, Any] = {
        "codecs": _names(caps.get("codecs", ["opus", "mp3"]), "capabilities.codecs", CODECS),
        "transports": _names(caps.get("transports", ["http"]), "capabilities.transports",
                             TRANSPORTS),
    }
    if not out["codecs"] or not out["transports"]:
        raise ProtocolError(say("protocol.no_capabilities"), "capabilities")
    if (fm := _bool(caps, "fm", path="capabilities.")) is not None:
        out["fm"] = fm  # an FM receiver: it can air an `fm` programme itself
    if caps.get("display") is not None:
        d = _obj(caps["display"], "capabilities.display")
        _no_extra(d, ("width", "height"), "capabilities.display")
        out["display"] = {
            "width": _int(d, "width", 1, 16384, path="capabilities.display.", required=True),
            "height": _int(d, "height", 1, 16384, path="capabilities.display.", required=True),
        }
    return out


def validate_groups(v: Any) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(g, str) and 0 < len(g) <= 64 for g in v):
        raise ProtocolError(say("protocol.bad_groups"), "groups")
    groups = list(dict.fromkeys(v))
    if len(groups) > MAX_GROUPS:
        raise ProtocolError(say("protocol.too_many_groups", limit=MAX_GROUPS), "groups")
    return groups


def validate_name(v: Any) -> str:
    if not isinstance(v, str) or not v.strip() or len(v) > MAX_NAME:
        raise ProtocolError(say("protocol.bad_name", limit=MAX_NAME), "name")
    return v.strip()


def validate_power_schedule(v: Any) -> list[dict[str, Any]]:
    """[{"on": "HH:MM", "off": "HH:MM", "days": [1..7]}] (1 = Monday), local time of the node."""
    if not isinstance(v, list) or len(v) > MAX_SCHEDULE:
        raise ProtocolError(say("protocol.bad_power_schedule", limit=MAX_SCHEDULE),
                            "power_schedule")
    out = []
    for i, item in enumerate(v):
        name = f"power_schedule[{i}]"
        e = _obj(item, name)
        _no_extra(e, ("on", "off", "days"), name)
        on = _str(e, "on", 5, path=f"{name}.", required=True)
        off = _str(e, "off", 5, path=f"{name}.", required=True)
        for key, hhmm in (("on", on), ("off", off)):
            if not _HHMM.match(hhmm or ""):
                raise ProtocolError(say("protocol.not_hhmm", name=f"{name}.{key}"), f"{name}.{key}")
        days = e.get("days", [1, 2, 3, 4, 5, 6, 7])
        if not isinstance(days, list) or not days or not all(
                isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 7 for d in days):
            raise ProtocolError(say("protocol.bad_weekdays", name=f"{name}.days"), f"{name}.days")
        out.append({"on": on, "off": off, "days": sorted(set(days))})
    return out


def validate_volume(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 100:
        raise ProtocolError(say("protocol.bad_volume"), "volume")
    return v


def _epoch(obj: dict[str, Any], key: str, path: str) -> float | None:
    """Epoch seconds, or an ISO 8601 date/time (without an offset: the node's local time)."""
    name = f"{path}{key}"
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, str) and len(v) <= 64:
        try:
            t = datetime.fromisoformat(v)
        except ValueError:
            pass
        else:
            return round((t if t.tzinfo else t.astimezone()).timestamp(), 3)
    elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) \
            and 0 <= v <= 1e11:
        return float(v)
    raise ProtocolError(say("protocol.bad_time", name=name), name)


def _page_url(obj: dict[str, Any], key: str, path: str) -> str:
    """A URL a board's browser can fetch: http(s), or a path on this node ("/...")."""
    name = f"{path}{key}"
    v = _str(obj, key, MAX_URL, path=path, required=True)
    assert v is not None
    if not (v.startswith(("http://", "https://")) or (v.startswith("/")
                                                        and not v.startswith("//"))):
        raise ProtocolError(say("protocol.not_page_url", name=name), name)
    return v


def validate_display_items(v: Any) -> list[dict[str, Any]]:
    """The items of the display content model (docs/device-protocol.md, 3.4.1), normalised:
    valid_from/valid_to as epoch seconds, weekdays sorted, ids filled in and unique."""
    if not isinstance(v, list) or len(v) > MAX_DISPLAY_ITEMS:
        raise ProtocolError(say("protocol.too_many_items", limit=MAX_DISPLAY_ITEMS), "args.items")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, raw in enumerate(v):
        path = f"args.items[{i}]."
        it = _obj(raw, f"args.items[{i}]")
        _no_extra(it, ("id", "type", "text", "title", "scroll", "url", "region", "valid_from",
                       "valid_to", "weekdays", "times", "duration_s"), f"args.items[{i}]")
        item: dict[str, Any] = {
            "id": _str(it, "id", 64, path=path) or f"item-{i + 1}",
            "type": _str(it, "type", 8, path=path, required=True, choices=ITEM_TYPES)}
        if item["id"] in seen:
            raise ProtocolError(say("protocol.duplicate_id", name=f"{path}id"), f"{path}id")
        seen.add(item["id"])
        if item["type"] == "text":
            _no_extra(it, set(it) - {"url"}, f"args.items[{i}]")
            item["text"] = _str(it, "text", MAX_TEXT, path=path, required=True)
            if (title := _str(it, "title", MAX_TITLE, path=path)) is not None:
                item["title"] = title
            if _bool(it, "scroll", path=path):
                item["scroll"] = True
        else:
            _no_extra(it, set(it) - {"text", "title", "scroll"}, f"args.items[{i}]")
            item["url"] = _page_url(it, "url", path)
        if (region := _str(it, "region", 8, path=path, choices=REGIONS)) is not None:
            item["region"] = region
        for key in ("valid_from", "valid_to"):
            if (t := _epoch(it, key, path)) is not None:
                item[key] = t
        if "valid_from" in item and "valid_to" in item and item["valid_to"] <= item["valid_from"]:
            raise ProtocolError(say("protocol.valid_to_early", name=f"{path}valid_to"),
                                f"{path}valid_to")
        if it.get("weekdays") is not None:
            days = it["weekdays"]
            if not isinstance(days, list) or not days or not all(
                    isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 7
                    for d in days):
                raise ProtocolError(say("protocol.bad_weekdays", name=f"{path}weekdays"),
                                    f"{path}weekdays")
            item["weekdays"] = sorted(set(days))
        if it.get("times") is not None:
            item["times"] = _time_windows(it["times"], f"{path}times")
        if (dur := _num(it, "duration_s", 1, 86400, path=path)) is not None:
            item["duration_s"] = dur
        out.append(item)
    return out


def _time_windows(v: Any, name: str) -> list[list[str]]:
    """[["HH:MM", "HH:MM"], ...]: start inclusive, end exclusive ("24:00" allowed), a window
    whose end is before its start runs over midnight."""
    if not isinstance(v, list) or not v or len(v) > MAX_SCHEDULE:
        raise ProtocolError(say("protocol.bad_windows", name=name, limit=MAX_SCHEDULE), name)
    out = []
    for w in v:
        if not (isinstance(w, list) and len(w) == 2 and isinstance(w[0], str)
                and isinstance(w[1], str) and _HHMM.match(w[0])
                and (_HHMM.match(w[1]) or w[1] == "24:00") and w[0] != w[1]):
            raise ProtocolError(say("protocol.bad_window", name=name), name)
        out.append([w[0], w[1]])
    return out


def display_state(args: dict[str, Any], now: float) -> dict[str, Any] | None:
    """What a board shows after a `display` command (validated args): the content model
    {"layout", "items", "ticker", "updated"}, or None after `clear` alone. The single-item form
    becomes items ("image"/"video" in the main region, "text" beside it in a split layout) and its
    duration_s becomes their valid_to."""
    if "items" in args:
        items = [dict(it) for it in args["items"]]
    else:
        items = []
        visual = [k for k in ("video", "image") if k in args]
        for k in visual:
            items.append({"id": k, "type": k, "url": args[k]})
        if "text" in args:
            side = args.get("layout") == "split" and bool(visual)
            items.append({"id": "text", "type": "text", "text": args["text"],
                          **({"region": "side"} if side else {})})
        if "duration_s" in args:
            for it in items:
                it["valid_to"] = round(now + args["duration_s"], 3)
    if not items and not args.get("ticker"):
        return None
    return {"layout": args.get("layout", "full"), "items": items,
            "ticker": args.get("ticker") or None, "updated": round(now, 3)}


def emergency_state(args: dict[str, Any], previous: dict[str, Any] | None, now: float
                    ) -> dict[str, Any] | None:
    """The emergency state of a device after an `emergency` command (None: off)."""
    if not args["on"]:
        return None
    since = previous["since"] if previous and previous.get("on") else round(now, 3)
    return {"on": True, **{k: args[k] for k in ("text", "volume", "broadcast") if k in args},
            "since": since}


def validate_command(command: Any, args: Any) -> dict[str, Any]:
    """The args of a command, normalised; ProtocolError naming the bad field."""
    if command not in COMMANDS:
        raise ProtocolError(say("protocol.unknown_command", commands=", ".join(COMMANDS)),
                            "command")
    a = _obj({} if args is None else args, "args")
    out: dict[str, Any] = {}
    if command == "play":
        _no_extra(a, ("url", "volume"), "args")
        if (url := _url(a, "url", path="args.")) is not None:
            out["url"] = url
        if (vol := _int(a, "volume", 0, 100, path="args.")) is not None:
            out["volume"] = vol
    elif command == "stop":
        _no_extra(a, (), "args")
    elif command == "volume":
        _no_extra(a, ("volume",), "args")
        out["volume"] = _int(a, "volume", 0, 100, path="args.", required=True)
    elif command == "power":
        _no_extra(a, ("on", "steps"), "args")
        out["on"] = _bool(a, "on", path="args.", required=True)
        steps = a.get("steps", [])
        if not isinstance(steps, list) or len(steps) > MAX_RELAYS:
            raise ProtocolError(say("protocol.too_many_steps", limit=MAX_RELAYS), "args.steps")
        out["steps"] = []
        for i, st in enumerate(steps):
            name = f"args.steps[{i}]"
            s = _obj(st, name)
            _no_extra(s, ("relay", "delay_s"), name)
            out["steps"].append({
                "relay": _int(s, "relay", 1, MAX_RELAYS, path=f"{name}.", required=True),
                "delay_s": _num(s, "delay_s", 0, 3600, path=f"{name}.", required=True)})
    elif command == "reboot":
        _no_extra(a, ("delay_s",), "args")
        if (d := _num(a, "delay_s", 0, 3600, path="args.")) is not None:
            out["delay_s"] = d
    elif command == "display":
        _no_extra(a, ("text", "image", "video", "layout", "duration_s", "clear", "items",
                      "ticker"), "args")
        if (text := _str(a, "text", MAX_TEXT, path="args.")) is not None:
            out["text"] = text
        for key in ("image", "video"):
            if (u := _url(a, key, path="args.")) is not None:
                out[key] = u
        if (layout := _str(a, "layout", 16, path="args.", choices=LAYOUTS)):
            out["layout"] = layout
        if (dur := _num(a, "duration_s", 1, 86400, path="args.")) is not None:
            out["duration_s"] = dur
        if _bool(a, "clear", path="args."):
            out["clear"] = True
        if (ticker := _str(a, "ticker", MAX_TEXT, path="args.")) is not None:
            out["ticker"] = ticker
        if a.get("items") is not None:
            if out.keys() & {"text", "image", "video", "duration_s"}:
                raise ProtocolError(say("protocol.display_both_forms"), "args.items")
            out["items"] = validate_display_items(a["items"])
        if not out.keys() & {"text", "image", "video", "clear", "items", "ticker"}:
            raise ProtocolError(say("protocol.display_empty"), "args")
        if len(encode(out)) > MAX_DISPLAY_BYTES:
            raise ProtocolError(say("protocol.display_too_large", limit=MAX_DISPLAY_BYTES), "args")
    elif command == "emergency":
        _no_extra(a, ("on", "volume", "text", "broadcast"), "args")
        out["on"] = _bool(a, "on", path="args.", required=True)
        if (vol := _int(a, "volume", 0, 100, path="args.")) is not None:
            out["volume"] = vol
        if (text := _str(a, "text", MAX_TEXT, path="args.")) is not None:
            out["text"] = text
        if (bid := _str(a, "broadcast", MAX_ID, path="args.")) is not None:
            out["broadcast"] = bid  # what the device hears: proof of delivery, below
    elif command == "fm":
        out = validate_fm(a)
    return out


# ---- messages ------------------------------------------------------------------------------------
def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode()


def error_message(text: str) -> bytes:
    return encode({"v": PROTOCOL_VERSION, "type": "error", "error": text})


def same_version(msg: dict[str, Any]) -> bool:
    """Whether a message speaks this version of the protocol (both ends check it)."""
    v = msg.get("v")
    return v == PROTOCOL_VERSION and not isinstance(v, bool)


def parse_message(raw: str | bytes) -> dict[str, Any]:
    """A protocol message: a JSON object with "v": 1 and a string "type"."""
    try:
        msg = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(say("protocol.malformed_json")) from None
    if not isinstance(msg, dict):
        raise ProtocolError(say("protocol.not_json_object"))
    if not same_version(msg):
        raise ProtocolError(say("protocol.unsupported_version", version=PROTOCOL_VERSION), "v")
    if not isinstance(msg.get("type"), str):
        raise ProtocolError(say("protocol.missing_type"), "type")
    return msg


@dataclass
class Hello:
    device: str
    key: str
    firmware: str | None
    capabilities: dict[str, Any] | None


def parse_hello(msg: dict[str, Any], *, key_required: bool = True) -> Hello:
    """`key_required=False`: the transport authenticated the device already (MQTT: the broker
    checked its password), the hello carries no key."""
    if msg.get("type") != "hello":
        raise ProtocolError(say("protocol.hello_first"))
    device = _str(msg, "device", MAX_ID, required=True)
    key = _str(msg, "key", 256, required=key_required) or ""
    assert device is not None
    caps = msg.get("capabilities")
    return Hello(device, key, _str(msg, "firmware", 64),
                 None if caps is None else validate_capabilities(caps))


def parse_heartbeat(msg: dict[str, Any]) -> dict[str, Any]:
    """The telemetry of a heartbeat, validated; unknown fields are ignored (newer firmware)."""
    out: dict[str, Any] = {"state": _str(msg, "state", 16, required=True, choices=STATES)}
    if (vol := _int(msg, "volume", 0, 100)) is not None:
        out["volume"] = vol
    if msg.get("stream") is not None:
        s = _obj(msg["stream"], "stream")
        stream: dict[str, Any] = {}
        if (url := _str(s, "url", MAX_URL, path="stream.")) is not None:
            stream["url"] = url
        for key, lo, hi in (("loss", 0.0, 1.0), ("jitter_ms", 0.0, 1e6),
                            ("latency_ms", 0.0, 1e7), ("skew_ms", -1e7, 1e7)):
            if (x := _num(s, key, lo, hi, path="stream.")) is not None:
                stream[key] = x
        out["stream"] = stream
    if msg.get("network") is not None:
        n = _obj(msg["network"], "network")
        net: dict[str, Any] = {}
        if (kind := _str(n, "type", 16, path="network.", choices=NETWORKS)) is not None:
            net["type"] = kind
        if (dbm := _num(n, "signal_dbm", -200, 0, path="network.")) is not None:
            net["signal_dbm"] = dbm
        out["network"] = net
    if (fw := _str(msg, "firmware", 64)) is not None:
        out["firmware"] = fw
    if msg.get("gps") is not None:
        g = msg["gps"]
        if not (isinstance(g, list) and len(g) == 2 and all(
                isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
                for x in g) and -90 <= g[0] <= 90 and -180 <= g[1] <= 180):
            raise ProtocolError(say("protocol.bad_gps"), "gps")
        out["gps"] = [float(g[0]), float(g[1])]
    if msg.get("power") is not None:
        p = _obj(msg["power"], "power")
        power: dict[str, Any] = {}
        if (volt := _num(p, "voltage", 0, 1000, path="power.")) is not None:
            power["voltage"] = volt
        if (amp := _bool(p, "amp", path="power.")) is not None:
            power["amp"] = amp
        if p.get("relays") is not None:
            r = p["relays"]
            if not isinstance(r, list) or len(r) > MAX_RELAYS or not all(
                    isinstance(x, bool) for x in r):
                raise ProtocolError(say("protocol.bad_relays", limit=MAX_RELAYS), "power.relays")
            power["relays"] = list(r)
        out["power"] = power
    if msg.get("display") is not None:
        d = _obj(msg["display"], "display")
        disp: dict[str, Any] = {}
        for key in ("width", "height"):
            if (px := _int(d, key, 1, 16384, path="display.")) is not None:
                disp[key] = px
        if d.get("items") is not None:
            shown = d["items"]
            if not isinstance(shown, list) or len(shown) > MAX_DISPLAY_ITEMS or not all(
                    isinstance(x, str) and 0 < len(x) <= 64 for x in shown):
                raise ProtocolError(say("protocol.bad_display_items"), "display.items")
            disp["items"] = list(shown)
        if (em := _bool(d, "emergency", path="display.")) is not None:
            disp["emergency"] = em
        out["display"] = disp
    if msg.get("fm") is not None:
        out["fm"] = parse_fm_telemetry(msg["fm"])
    faults = msg.get("faults", [])
    if not isinstance(faults, list) or len(faults) > MAX_FAULTS or not all(
            isinstance(f, str) and 0 < len(f) <= 64 for f in faults):
        raise ProtocolError(say("protocol.bad_faults", limit=MAX_FAULTS), "faults")
    out["faults"] = list(dict.fromkeys(faults))
    return out


def parse_ack(msg: dict[str, Any]) -> tuple[str, bool, str | None]:
    cid = _str(msg, "id", MAX_ID, required=True)
    ok = _bool(msg, "ok", required=True)
    error = _str(msg, "error", MAX_ERROR)
    assert cid is not None and ok is not None
    return cid, ok, error


def command_message(rec: dict[str, Any]) -> bytes:
    return encode({"v": PROTOCOL_VERSION, "type": "command", "id": rec["id"],
                   "command": rec["command"], "args": rec["args"], "expires": rec["expires"]})


_ID_MARK = "\x00id\x00"


def command_template(command: str, args: dict[str, Any], expires: float) -> tuple[bytes, bytes]:
    """(prefix, suffix): prefix + id + suffix is `command_message` of a command with that id.
    Ids are [0-9a-f.] so they need no JSON escaping."""
    data = encode({"v": PROTOCOL_VERSION, "type": "command", "id": _ID_MARK,
                   "command": command, "args": args, "expires": expires})
    prefix, suffix = data.split(b"\\u0000id\\u0000")
    return prefix, suffix


# ---- what a device sends (relay/agent/client.py) -------------------------------------------------
def hello_message(device: str, key: str, firmware: str,
                  capabilities: dict[str, Any] | None = None) -> dict[str, Any]:
    """The first message of a connection (`parse_hello` reads it on the node)."""
    msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": "hello", "device": device, "key": key,
                           "firmware": firmware}
    if capabilities is not None:
        msg["capabilities"] = capabilities
    return msg


def ack_message(cid: str, ok: bool, error: str | None = None) -> dict[str, Any]:
    """The answer to every copy of a command (`parse_ack`)."""
    msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": "ack", "id": cid, "ok": ok}
    if not ok and error:
        msg["error"] = error[:MAX_ERROR]
    return msg


def heartbeat_message(telemetry: dict[str, Any]) -> dict[str, Any]:
    """A heartbeat with the device's telemetry (`parse_heartbeat`)."""
    return {"v": PROTOCOL_VERSION, "type": "heartbeat", **telemetry}


# ---- FM receivers (issue 14: FM stations on IP) ---------------------------------------------------
# A loudspeaker with an FM receiver (capability `fm`) airs an `fm` programme by tuning it: the node
# sends `fm` {"on": true, "frequency_mhz"} when such a programme wins its area and {"on": false}
# when it stops winning (ended, preempted); the device reports its tuner in heartbeats.
FM_BAND = (76.0, 108.0)  # MHz: the Japanese band's bottom to the top of the common one


def validate_fm(a: dict[str, Any]) -> dict[str, Any]:
    """`fm` command args: {"on": true, "frequency_mhz": 76-108} or {"on": false}."""
    _no_extra(a, ("on", "frequency_mhz"), "args")
    on = _bool(a, "on", path="args.", required=True)
    if not on:
        return {"on": False}
    return {"on": True, "frequency_mhz": _num(a, "frequency_mhz", *FM_BAND, path="args.",
                                              required=True)}


def parse_fm_telemetry(v: Any) -> dict[str, Any]:
    """A heartbeat's tuner: {"on", "frequency_mhz"?, "rssi_dbm"?} (receivers report signal)."""
    f = _obj(v, "fm")
    out: dict[str, Any] = {"on": bool(_bool(f, "on", path="fm.", required=True))}
    if (mhz := _num(f, "frequency_mhz", *FM_BAND, path="fm.")) is not None:
        out["frequency_mhz"] = mhz
    if (rssi := _num(f, "rssi_dbm", -150, 20, path="fm.")) is not None:
        out["rssi_dbm"] = rssi
    return out
# ---- proof of delivery (issue 13): what a loudspeaker hears ---------------------------------------
# The node tells a loudspeaker what its area's stream carries (`onair`, the stream's metadata on
# the control channel: in answer to its first `playing` report, then whenever it changes) and the
# `emergency` command names the emergency it turns on (`args.broadcast`, kept in
# `config.emergency`). The device says what it plays whenever that changes: a `playing` message
# with the broadcast it hears (the emergency, else the stream's broadcast; null: nothing) and its
# stream state ("playing": the stream's audio reaches the horns; "idle": it does not, e.g.
# stopped, stalled or a broken amplifier; "off": powered off). The node keeps it as proof
# (relay/devices/proof.py).
def onair_message(broadcast: str | None, title: str | None) -> bytes:
    """What the area's stream carries now (node -> loudspeaker)."""
    return encode({"v": PROTOCOL_VERSION, "type": "onair", "broadcast": broadcast,
                   "title": (title or "")[:MAX_TITLE] or None})


def parse_onair(msg: dict[str, Any]) -> str | None:
    """The broadcast of an `onair` message (None: silence or unreadable)."""
    bid = msg.get("broadcast")
    return bid if isinstance(bid, str) and 0 < len(bid) <= MAX_ID else None


def playing_message(broadcast: str | None, state: str) -> dict[str, Any]:
    """What a device plays now (`parse_playing`)."""
    return {"v": PROTOCOL_VERSION, "type": "playing", "broadcast": broadcast, "state": state,
            "at": round(time.time(), 3)}


def parse_playing(msg: dict[str, Any]) -> tuple[str | None, str]:
    """(broadcast or None, state) of a `playing` message; ProtocolError naming the bad field."""
    bid = _str(msg, "broadcast", MAX_ID)
    state = _str(msg, "state", 16, required=True, choices=STATES)
    assert state is not None
    if bid == "":
        raise ProtocolError(say("protocol.not_string", name="broadcast", limit=MAX_ID),
                            "broadcast")
    return bid, state


# Boards: proof of play. The board says which item of its display content is on screen: when it
# comes on (`at` = `since`), while it stays (with every heartbeat) and when it goes off
# (`shown`, sent by the board page, web/static/board.js).
REPORTS = ("playing", "shown")  # device -> node reports of proof (relay/devices/proof.py)


def parse_report(msg: dict[str, Any]) -> dict[str, Any]:
    """A `playing` or `shown` message, validated: {"type", ...its fields}."""
    if msg["type"] == "playing":
        bid, state = parse_playing(msg)
        return {"type": "playing", "broadcast": bid, "state": state}
    item = _str(msg, "item", 64, required=True)
    region = _str(msg, "region", 8, choices=REGIONS) or "main"
    since = _epoch(msg, "since", "")
    at = _epoch(msg, "at", "")
    if not item or since is None or at is None or at < since:
        raise ProtocolError(say("protocol.bad_shown"), "since")
    return {"type": "shown", "item": item, "region": region, "since": since, "at": at}
# ---- OTA firmware (docs/device-protocol.md, "Firmware updates") ------------------------------------
# Kept apart: the `firmware` command is issued by rollouts only (relay/devices/ota.py), never by
# POST /devices/commands (it is not in COMMANDS); the device answers it with an ack (accepted or
# refused at once) and later with one `firmware` report (installed, refused, rolled_back).
FIRMWARE_COMMAND = "firmware"
FIRMWARE_REPORT = "firmware"  # the message type of the report a device sends
FIRMWARE_STATES = ("installed", "refused", "rolled_back")
MAX_VERSION = 64
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")  # also a model name
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def firmware_manifest(model: str, version: str, size: int, sha256: str) -> bytes:
    """The bytes an ed25519 firmware signature covers: model and version are signed with the
    image's size and digest, so a signed image cannot be relabelled (a downgrade) nor cut."""
    return f"loa-firmware/1\n{model}\n{version}\n{size}\n{sha256}\n".encode()


def public_key(b64: str) -> Ed25519PublicKey:
    """An ed25519 public key from the base64 of its 32 raw bytes (ValueError otherwise)."""
    try:
        raw = base64.b64decode(b64.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError, UnsupportedAlgorithm):
        raise ValueError("not the base64 of a 32-byte ed25519 public key") from None


def signature_ok(keys: Iterable[Ed25519PublicKey], manifest: bytes, signature_b64: str) -> bool:
    """Whether one of `keys` signed `manifest` (the signature as base64 of its 64 bytes)."""
    try:
        sig = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError):
        return False
    for key in keys:
        try:
            key.verify(sig, manifest)
            return True
        except InvalidSignature:
            continue
    return False


def split_firmware(reported: Any) -> tuple[str, str]:
    """A device reports its firmware as "MODEL/VERSION" (hello, heartbeats): (model, version);
    ("", "") when it reports none or another form."""
    if not isinstance(reported, str) or reported.count("/") != 1:
        return "", ""
    model, version = reported.split("/")
    return (model, version) if _VERSION.match(model) and _VERSION.match(version) else ("", "")


def valid_version(v: Any, name: str) -> str:
    """A model or version name: ASCII letters, digits and . _ + - (at most 64)."""
    if not isinstance(v, str) or not _VERSION.match(v):
        raise ProtocolError(say("ota.bad_name", name=name), name)
    return v


def firmware_args(args: Any) -> dict[str, Any]:
    """The args of a `firmware` command as a device reads them (ProtocolError naming the field):
    {"model", "version", "size", "sha256", "signature" (base64), "url" (a path on the node)}."""
    a = _obj(args, "args")
    _no_extra(a, ("model", "version", "size", "sha256", "signature", "url"), "args")
    out: dict[str, Any] = {"model": valid_version(a.get("model"), "args.model"),
                           "version": valid_version(a.get("version"), "args.version"),
                           "size": _int(a, "size", 1, 2**31, path="args.", required=True),
                           "sha256": _str(a, "sha256", 64, path="args.", required=True),
                           "signature": _str(a, "signature", 128, path="args.", required=True),
                           "url": _str(a, "url", MAX_URL, path="args.", required=True)}
    if not _SHA256.match(out["sha256"]):
        raise ProtocolError(say("ota.bad_digest"), "args.sha256")
    if not out["url"].startswith("/") or out["url"].startswith("//"):
        raise ProtocolError(say("protocol.not_page_url", name="args.url"), "args.url")
    return out


def firmware_report(cid: str, version: str, state: str, error: str | None = None
                    ) -> dict[str, Any]:
    """What a device says of a `firmware` command once it is settled (`parse_firmware_report`)."""
    msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": FIRMWARE_REPORT, "id": cid,
                           "version": version, "state": state}
    if error:
        msg["error"] = error[:MAX_ERROR]
    return msg


def parse_firmware_report(msg: dict[str, Any]) -> tuple[str, str, str, str | None]:
    """(command id, version, state, error) of a device's `firmware` report."""
    cid = _str(msg, "id", MAX_ID, required=True)
    version = valid_version(msg.get("version"), "version")
    state = _str(msg, "state", 16, required=True, choices=FIRMWARE_STATES)
    assert cid is not None and state is not None
    return cid, version, state, _str(msg, "error", MAX_ERROR)
