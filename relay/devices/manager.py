"""The device control channel: protocol messages, validation, sessions, commands, heartbeats.

Devices (IP loudspeaker clusters, LED/LCD boards) hold one WebSocket to the node and speak JSON
messages with `"v": 1` (docs/device-protocol.md is the contract). This module knows nothing of
HTTP: the web layer hands it a `Link` (send bytes, close with a code) and the raw messages.

Design for thousands of devices on one core:

- The registry lives in memory (`DeviceManager.devices`, one small `Device` per registered device)
  and is written through to the store; every write of a device record goes through the manager,
  so the in-memory record is authoritative and batched writes never lose a REST change. The store
  is read once at start (devices, and commands not yet delivered).
- No task per device: the aiohttp handler coroutine is the only per-connection task. One periodic
  task (`_run`) marks devices offline after two missed heartbeats, re-sends unacknowledged commands
  (one heap of deadlines on `loop.time()`), expires commands and persists telemetry in batches.
- Store writes are coalesced (`_Writer`, stopped by a marker rather than by cancellation):
  heartbeats update memory and are written every `persist_interval` seconds with one `put_many`;
  status changes and command state are written at once, but many of them in one `put_many` when
  they come together (10,000 acks = a few writes).
- A bulk command is serialised once: every device gets the same bytes except its command id,
  spliced in between a pre-encoded prefix and suffix.

Cluster (several nodes on one Redis store and bus): a device's connection, its undelivered
commands, their retries and expiry belong to the node it is connected to, recorded as `node` in
its record. On hello a node takes the device over: it reads the device's undelivered commands from
the store and publishes `device.node` (`{"device", "node", "status", "origin"}`); every other node
then hands the commands it holds for that device to the new node and stops counting the device's
heartbeats. A command issued on any node for a device served by another is written to the store
(`queued`) and sent over the bus's durable stream `devices.<node>` to that node, which delivers,
retries and expires it and records its ack in the store, where every node reads it. Delivery is
idempotent by command id: a command already held, or already settled in the store, is dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import hmac
import itertools
import json
import logging
import math
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import quote

from loa.streamer.state.bus import Bus, BusClosed, BusSubscription
from loa.streamer.state.store import NotFound, Record, Store

log = logging.getLogger("loa.devices")

PROTOCOL_VERSION = 1
WRITER_STOP_TIMEOUT = 10.0  # seconds a shutdown waits for a store writer, twice at most
NODE_TOPIC = "device.node"  # bus event: a device is now served by a node ("" = by none)
ROUTE_GROUP = "devices"  # consumer group of the per-node command streams (`route_stream`)


def route_stream(node: str) -> str:
    """The durable bus stream of the commands for the devices a node serves."""
    return f"devices.{node}"

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
COMMANDS = ("play", "stop", "volume", "power", "reboot", "display", "emergency")
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
_SLOW_BYTES = 16 * 1024  # unsent bytes above which a link is not written to (see DeviceManager)
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


@dataclass
class DeviceSettings:
    """Config section [devices] (env LOA_DEVICES_<KEY>)."""

    heartbeat: float = 60.0  # seconds between heartbeats, told to every device in `welcome`
    hello_timeout: float = 10.0  # the first message must arrive within this
    retry_interval: float = 5.0  # an unacknowledged command is sent again after this
    max_tries: int = 5  # sends of a command per connection before it is marked failed
    command_ttl: float = 600.0  # default expiry of a command (seconds after it is issued)
    max_command_ttl: float = 7 * 86400.0
    persist_interval: float = 10.0  # telemetry is written to the store in batches this often
    max_errors: int = 10  # malformed messages on one connection before it is closed (4008)
    max_message_kb: int = 64  # larger messages close the connection (1009)
    provisioning_hours: float = 24.0  # lifetime of a one-time provisioning token
    max_queued: int = 500  # undelivered commands kept per device; the oldest expire first
    default_volume: int = 80

    def __post_init__(self) -> None:
        if self.heartbeat <= 0 or self.retry_interval <= 0 or self.persist_interval <= 0:
            raise ValueError("devices: heartbeat, retry_interval, persist_interval must be > 0")
        if self.max_tries < 1 or self.max_errors < 1 or self.max_queued < 1:
            raise ValueError("devices: max_tries, max_errors, max_queued must be >= 1")


# ---- errors -------------------------------------------------------------------------------------
class ProtocolError(ValueError):
    """A message or a field that breaks the protocol; the text is sent back to its sender."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class HelloRejected(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# ---- ids and secrets -----------------------------------------------------------------------------
_counter = itertools.count()


def new_id() -> str:
    """Sortable by creation time (ms), unique within the process and very likely across."""
    return f"{int(time.time() * 1000):011x}{next(_counter) & 0xFFFF:04x}{secrets.token_hex(2)}"


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key() -> str:
    """A device key: 32 random bytes, URL-safe. Only its sha256 is stored."""
    return secrets.token_urlsafe(32)


def new_provisioning_token() -> str:
    return secrets.token_urlsafe(24)


def same_hash(stored: Any, secret: str) -> bool:
    return isinstance(stored, str) and hmac.compare_digest(stored, secret_hash(secret))


# ---- field validation ----------------------------------------------------------------------------
def _err(field: str, vi: str, en: str) -> ProtocolError:
    return ProtocolError(f"{vi} / {en}", field)


def _field(obj: dict[str, Any], key: str, path: str, required: bool) -> tuple[str, Any]:
    """The field's full name and its value (None when absent and not required)."""
    name = f"{path}{key}"
    v = obj.get(key)
    if v is None and required:
        raise _err(name, f"thiếu trường {name}", f"missing field {name}")
    return name, v


def _int(obj: dict[str, Any], key: str, lo: int, hi: int, *, path: str = "",
         required: bool = False) -> int | None:
    name, v = _field(obj, key, path, required)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _err(name, f"{name} phải là số nguyên {lo}-{hi}",
                   f"{name} must be an integer within {lo}-{hi}")
    return v


def _num(obj: dict[str, Any], key: str, lo: float, hi: float, *, path: str = "",
         required: bool = False) -> float | None:
    name, v = _field(obj, key, path, required)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
            or not lo <= v <= hi:
        raise _err(name, f"{name} phải là số trong khoảng {lo}-{hi}",
                   f"{name} must be a number within {lo}-{hi}")
    return float(v)


def _str(obj: dict[str, Any], key: str, max_len: int, *, path: str = "",
         required: bool = False, choices: Iterable[str] | None = None) -> str | None:
    name, v = _field(obj, key, path, required)
    if v is None:
        return None
    if not isinstance(v, str) or len(v) > max_len:
        raise _err(name, f"{name} phải là chuỗi tối đa {max_len} ký tự",
                   f"{name} must be a string of at most {max_len} characters")
    if choices is not None:
        allowed = tuple(choices)
        if v not in allowed:
            raise _err(name, f"{name} phải là một trong {', '.join(allowed)}",
                       f"{name} must be one of {', '.join(allowed)}")
    return v


def _bool(obj: dict[str, Any], key: str, *, path: str = "", required: bool = False
          ) -> bool | None:
    name, v = _field(obj, key, path, required)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise _err(name, f"{name} phải là true/false", f"{name} must be a boolean")
    return v


def _obj(v: Any, name: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _err(name, f"{name} phải là đối tượng JSON", f"{name} must be a JSON object")
    return v


def _url(obj: dict[str, Any], key: str, *, path: str = "", required: bool = False
         ) -> str | None:
    v = _str(obj, key, MAX_URL, path=path, required=required)
    if v is not None and not v.startswith(_URL_SCHEMES):
        raise _err(f"{path}{key}", f"{path}{key} phải là URL http(s)/rtp/udp/rtsp/srt",
                   f"{path}{key} must be an http(s), rtp, udp, rtsp or srt URL")
    return v


def _no_extra(obj: dict[str, Any], allowed: Iterable[str], name: str) -> None:
    extra = sorted(set(obj) - set(allowed))
    if extra:
        raise _err(name, f"{name}: trường không hợp lệ {', '.join(extra)}",
                   f"{name}: unknown field(s) {', '.join(extra)}")


def _names(v: Any, name: str, choices: tuple[str, ...]) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _err(name, f"{name} phải là danh sách chuỗi", f"{name} must be a list of strings")
    bad = [x for x in v if x not in choices]
    if bad:
        raise _err(name, f"{name}: giá trị không hỗ trợ {', '.join(bad[:5])}",
                   f"{name}: unsupported value(s) {', '.join(bad[:5])} "
                   f"(supported: {', '.join(choices)})")
    return list(dict.fromkeys(v))


def validate_capabilities(v: Any) -> dict[str, Any]:
    """{"codecs": [...], "transports": [...], "display": {"width", "height"}?}."""
    caps = _obj(v, "capabilities")
    _no_extra(caps, ("codecs", "transports", "display"), "capabilities")
    out: dict[str, Any] = {
        "codecs": _names(caps.get("codecs", ["opus", "mp3"]), "capabilities.codecs", CODECS),
        "transports": _names(caps.get("transports", ["http"]), "capabilities.transports",
                             TRANSPORTS),
    }
    if not out["codecs"] or not out["transports"]:
        raise _err("capabilities", "cần ít nhất một codec và một phương thức truyền",
                   "capabilities need at least one codec and one transport")
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
        raise _err("groups", "groups phải là danh sách tên 1-64 ký tự",
                   "groups must be a list of names of 1-64 characters")
    groups = list(dict.fromkeys(v))
    if len(groups) > MAX_GROUPS:
        raise _err("groups", f"tối đa {MAX_GROUPS} nhóm", f"at most {MAX_GROUPS} groups")
    return groups


def validate_name(v: Any) -> str:
    if not isinstance(v, str) or not v.strip() or len(v) > MAX_NAME:
        raise _err("name", f"tên 1-{MAX_NAME} ký tự", f"name must be 1-{MAX_NAME} characters")
    return v.strip()


def validate_power_schedule(v: Any) -> list[dict[str, Any]]:
    """[{"on": "HH:MM", "off": "HH:MM", "days": [1..7]}] (1 = Monday), local time of the node."""
    if not isinstance(v, list) or len(v) > MAX_SCHEDULE:
        raise _err("power_schedule", f"power_schedule là danh sách tối đa {MAX_SCHEDULE} mục",
                   f"power_schedule must be a list of at most {MAX_SCHEDULE} entries")
    out = []
    for i, item in enumerate(v):
        name = f"power_schedule[{i}]"
        e = _obj(item, name)
        _no_extra(e, ("on", "off", "days"), name)
        on = _str(e, "on", 5, path=f"{name}.", required=True)
        off = _str(e, "off", 5, path=f"{name}.", required=True)
        for key, hhmm in (("on", on), ("off", off)):
            if not _HHMM.match(hhmm or ""):
                raise _err(f"{name}.{key}", f"{name}.{key} phải có dạng HH:MM",
                           f"{name}.{key} must be HH:MM")
        days = e.get("days", [1, 2, 3, 4, 5, 6, 7])
        if not isinstance(days, list) or not days or not all(
                isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 7 for d in days):
            raise _err(f"{name}.days", f"{name}.days là danh sách số 1-7 (1 = thứ Hai)",
                       f"{name}.days must be a list of 1-7 (1 = Monday)")
        out.append({"on": on, "off": off, "days": sorted(set(days))})
    return out


def validate_volume(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 100:
        raise _err("volume", "âm lượng 0-100", "volume must be an integer within 0-100")
    return v


def has_display(record: Record) -> bool:
    return record.get("kind") == "board" or bool((record.get("capabilities") or {})
                                                  .get("display"))


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
    raise _err(name, f"{name} phải là giây epoch hoặc ngày giờ ISO 8601",
               f"{name} must be epoch seconds or an ISO 8601 date/time")


def _page_url(obj: dict[str, Any], key: str, path: str) -> str:
    """A URL a board's browser can fetch: http(s), or a path on this node ("/...")."""
    name = f"{path}{key}"
    v = _str(obj, key, MAX_URL, path=path, required=True)
    assert v is not None
    if not (v.startswith(("http://", "https://")) or (v.startswith("/")
                                                        and not v.startswith("//"))):
        raise _err(name, f"{name} phải là URL http(s) hoặc đường dẫn /...",
                   f"{name} must be an http(s) URL or a path on this node (/...)")
    return v


def validate_display_items(v: Any) -> list[dict[str, Any]]:
    """The items of the display content model (docs/device-protocol.md, 3.4.1), normalised:
    valid_from/valid_to as epoch seconds, weekdays sorted, ids filled in and unique."""
    if not isinstance(v, list) or len(v) > MAX_DISPLAY_ITEMS:
        raise _err("args.items", f"args.items là danh sách tối đa {MAX_DISPLAY_ITEMS} mục",
                   f"args.items must be a list of at most {MAX_DISPLAY_ITEMS} items")
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
            raise _err(f"{path}id", f"{path}id bị trùng", f"{path}id is not unique")
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
            raise _err(f"{path}valid_to", f"{path}valid_to phải sau valid_from",
                       f"{path}valid_to must be after valid_from")
        if it.get("weekdays") is not None:
            days = it["weekdays"]
            if not isinstance(days, list) or not days or not all(
                    isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 7
                    for d in days):
                raise _err(f"{path}weekdays", f"{path}weekdays là danh sách số 1-7 "
                                              "(1 = thứ Hai)",
                           f"{path}weekdays must be a list of 1-7 (1 = Monday)")
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
        raise _err(name, f"{name} là danh sách 1-{MAX_SCHEDULE} khung giờ",
                   f"{name} must be a list of 1-{MAX_SCHEDULE} time windows")
    out = []
    for w in v:
        if not (isinstance(w, list) and len(w) == 2 and isinstance(w[0], str)
                and isinstance(w[1], str) and _HHMM.match(w[0])
                and (_HHMM.match(w[1]) or w[1] == "24:00") and w[0] != w[1]):
            raise _err(name, f"{name}: mỗi khung giờ là [\"HH:MM\", \"HH:MM\"] khác nhau",
                       f"{name}: each window must be [\"HH:MM\", \"HH:MM\"] (start != end)")
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
    return {"on": True, **{k: args[k] for k in ("text", "volume") if k in args},
            "since": since}


def validate_command(command: Any, args: Any) -> dict[str, Any]:
    """The args of a command, normalised; ProtocolError naming the bad field."""
    if command not in COMMANDS:
        raise _err("command", f"lệnh không hợp lệ, cần một trong {', '.join(COMMANDS)}",
                   f"command must be one of {', '.join(COMMANDS)}")
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
            raise _err("args.steps", f"args.steps là danh sách tối đa {MAX_RELAYS} bước",
                       f"args.steps must be a list of at most {MAX_RELAYS} steps")
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
                raise _err("args.items", "dùng items hoặc text/image/video, không dùng cả hai",
                           "use items or text/image/video (the single-item form), not both")
            out["items"] = validate_display_items(a["items"])
        if not out.keys() & {"text", "image", "video", "clear", "items", "ticker"}:
            raise _err("args", "display cần items, ticker, text, image, video hoặc clear",
                       "display needs items, ticker, text, image, video or clear")
        if len(encode(out)) > MAX_DISPLAY_BYTES:
            raise _err("args", f"nội dung hiển thị quá lớn (tối đa {MAX_DISPLAY_BYTES} byte)",
                       f"display content too large (at most {MAX_DISPLAY_BYTES} bytes)")
    elif command == "emergency":
        _no_extra(a, ("on", "volume", "text"), "args")
        out["on"] = _bool(a, "on", path="args.", required=True)
        if (vol := _int(a, "volume", 0, 100, path="args.")) is not None:
            out["volume"] = vol
        if (text := _str(a, "text", MAX_TEXT, path="args.")) is not None:
            out["text"] = text
    return out


# ---- messages ------------------------------------------------------------------------------------
def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode()


def error_message(text: str) -> bytes:
    return encode({"v": PROTOCOL_VERSION, "type": "error", "error": text})


def parse_message(raw: str | bytes) -> dict[str, Any]:
    """A protocol message: a JSON object with "v": 1 and a string "type"."""
    try:
        msg = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("JSON không hợp lệ / malformed JSON") from None
    if not isinstance(msg, dict):
        raise ProtocolError("cần một đối tượng JSON / a message must be a JSON object")
    if msg.get("v") != PROTOCOL_VERSION or isinstance(msg.get("v"), bool):
        raise ProtocolError(f"phiên bản không hỗ trợ / unsupported protocol version "
                            f"(\"v\" must be {PROTOCOL_VERSION})", "v")
    if not isinstance(msg.get("type"), str):
        raise ProtocolError("thiếu loại thông điệp / missing message type", "type")
    return msg


@dataclass
class Hello:
    device: str
    key: str
    firmware: str | None
    capabilities: dict[str, Any] | None


def parse_hello(msg: dict[str, Any]) -> Hello:
    if msg.get("type") != "hello":
        raise ProtocolError("thông điệp đầu tiên phải là hello / first message must be hello")
    device = _str(msg, "device", 64, required=True)
    key = _str(msg, "key", 256, required=True)
    assert device is not None and key is not None
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
            raise _err("gps", "gps là [vĩ độ, kinh độ]", "gps must be [lat, lon]")
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
                raise _err("power.relays", f"power.relays là tối đa {MAX_RELAYS} giá trị "
                                           "true/false",
                           f"power.relays must be at most {MAX_RELAYS} booleans")
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
                raise _err("display.items", "display.items là danh sách mã mục đang hiển thị",
                           "display.items must be a list of the ids of the items shown")
            disp["items"] = list(shown)
        if (em := _bool(d, "emergency", path="display.")) is not None:
            disp["emergency"] = em
        out["display"] = disp
    faults = msg.get("faults", [])
    if not isinstance(faults, list) or len(faults) > MAX_FAULTS or not all(
            isinstance(f, str) and 0 < len(f) <= 64 for f in faults):
        raise _err("faults", f"faults là danh sách tối đa {MAX_FAULTS} mã lỗi",
                   f"faults must be a list of at most {MAX_FAULTS} fault codes")
    out["faults"] = list(dict.fromkeys(faults))
    return out


def parse_ack(msg: dict[str, Any]) -> tuple[str, bool, str | None]:
    cid = _str(msg, "id", 64, required=True)
    ok = _bool(msg, "ok", required=True)
    error = _str(msg, "error", 500)
    assert cid is not None and ok is not None
    return cid, ok, error


def command_message(rec: Record) -> bytes:
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


# ---- stream URLs ---------------------------------------------------------------------------------
# A loudspeaker plays a connect burst from its start, so the burst is its delay behind live: it
# asks for a short one (browsers get the Icecast-sized default, which they need to autoplay).
DEVICE_BURST_MS = 200

@dataclass(frozen=True)
class StreamOffer:
    """What this node serves, to build a device's stream list from."""

    http_codecs: tuple[str, ...] = ("opus", "mp3")
    hls_codec: str | None = "mp3"
    rtp_codecs: tuple[str, ...] = ()
    webrtc: bool = True


def stream_urls(public: str, area: str, caps: dict[str, Any], offer: StreamOffer
                ) -> list[dict[str, str]]:
    """The streams of `area` this device can play, in its order of preference: its transports in
    the order it lists them, and within a transport its codecs in the order it lists them."""
    base = public.rstrip("/")
    a = quote(area, safe="")
    codecs = list(caps.get("codecs") or [])
    out: list[dict[str, str]] = []
    for transport in caps.get("transports") or []:
        if transport == "http":
            for c in codecs:
                if c in offer.http_codecs:
                    out.append({"transport": "http", "codec": c,
                                "url": f"{base}/streams/{a}.{c}?burst_ms={DEVICE_BURST_MS}"})
        elif transport == "hls" and offer.hls_codec and offer.hls_codec in codecs:
            out.append({"transport": "hls", "codec": offer.hls_codec,
                        "url": f"{base}/streams/{a}/index.m3u8"})
        elif transport == "rtp":
            common = [c for c in codecs if c in offer.rtp_codecs]
            if common:
                out.append({"transport": "rtp", "codec": common[0],
                            "url": f"{base}/streams/{a}.sdp"})
        elif transport == "webrtc" and offer.webrtc and "opus" in codecs:
            out.append({"transport": "webrtc", "codec": "opus", "url": f"{base}/whep/{a}"})
    return out


# ---- records -------------------------------------------------------------------------------------
_SECRET_FIELDS = ("key_hash", "provision")


def new_device_record(name: str, kind: str, area: str, capabilities: dict[str, Any],
                      groups: list[str], *, volume: int, now: float | None = None) -> Record:
    now = time.time() if now is None else now
    return {"id": new_id(), "name": name, "kind": kind, "area": area,
            "capabilities": capabilities, "groups": groups, "volume": volume,
            "power_schedule": [], "status": "offline", "created": now, "updated": now,
            "firmware": None, "last_seen": None, "telemetry": None, "faults": [],
            "revoked": False, "key_hash": None}


def public_device(rec: Record) -> Record:
    out = {k: v for k, v in rec.items() if k not in _SECRET_FIELDS}
    out["provisioned"] = bool(rec.get("key_hash"))
    prov = rec.get("provision")
    out["provisioning_expires"] = prov.get("expires") if isinstance(prov, dict) else None
    return out


# ---- the link a session talks through (implemented by the web layer) ------------------------------
class Link(Protocol):
    errors: int  # malformed messages received on this connection

    def unsent(self) -> int:
        """Bytes written but not yet taken by the kernel."""

    def closing(self) -> bool: ...

    async def send(self, data: bytes) -> None:
        """Queue one text frame. Does not wait when `unsent()` is small (see DeviceManager)."""

    def close(self, code: int, reason: str) -> None:
        """Start closing with this code (non-blocking; idempotent)."""


# ---- in-memory state -----------------------------------------------------------------------------
class Device:
    """One registered device in memory: its record, its connection and its undelivered commands."""

    __slots__ = ("id", "record", "link", "status", "last_seen", "telemetry", "outbox",
                 "ready", "public")

    def __init__(self, record: Record) -> None:
        self.id: str = record["id"]
        self.record = record  # authoritative copy; written through to the store
        self.link: Link | None = None
        self.status: str = record.get("status") or "offline"
        self.last_seen = 0.0  # loop.time() of the last message
        self.telemetry: dict[str, Any] | None = record.get("telemetry")
        self.outbox: dict[str, Record] | None = None  # cid -> queued/sent command, in order
        self.ready = False  # welcome sent and the backlog delivered on this link
        self.public = ""  # base URL the device reached us by

    def view(self) -> Record:
        out = public_device(self.record)
        out["status"] = self.status
        out["connected"] = self.link is not None
        out["telemetry"] = self.telemetry
        out["queued_commands"] = len(self.outbox) if self.outbox else 0
        return out


class _Writer:
    """Coalesces store writes of one kind: `mark` a record, and whatever is marked while the
    previous `put_many` runs goes out in the next one. `flush()` waits until everything marked
    before the call is written (each batch has a generation number). `stop()` ends the task with
    a marker it reads between two writes, not by cancellation: a store client that swallows a
    cancellation in the middle of a command (redis-py 8) would leave the task running forever."""

    def __init__(self, store: Store, kind: str) -> None:
        self.store = store
        self.kind = kind
        self.pending: dict[str, Record] = {}
        self.batches = 0  # put_many calls made
        self.records = 0  # records written
        self._gen = 1  # generation of `pending`
        self._done = 0  # highest generation written
        self._kick = asyncio.Event()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = False  # the marker: the task ends once it has nothing left to write

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def mark(self, rec: Record) -> None:
        self.pending[rec["id"]] = rec
        self._kick.set()

    def forget(self, rid: str) -> None:
        self.pending.pop(rid, None)

    async def flush(self) -> None:
        target = self._gen if self.pending else self._gen - 1
        if self._done >= target:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        self._kick.set()
        await fut

    async def _run(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            while self.pending:
                batch, self.pending = self.pending, {}
                gen = self._gen
                self._gen += 1
                snap = [dict(r) for r in batch.values()]  # on the loop: the thread gets copies
                try:
                    await self.store.put_many(self.kind, snap)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("store write failed event=device_store_error kind=%s n=%d",
                                  self.kind, len(snap))
                    for k, v in batch.items():  # written again with the next batch
                        self.pending.setdefault(k, v)
                    if self._stopping:
                        return  # shutting down on a failing store: logged, nothing to wait for
                    await asyncio.sleep(1.0)  # back-off, not a timing loop
                    continue
                self.batches += 1
                self.records += len(snap)
                self._done = gen
                self._wake()
            if self._stopping:
                return

    def _wake(self) -> None:
        keep = []
        for target, fut in self._waiters:
            if self._done >= target:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((target, fut))
        self._waiters = keep

    async def stop(self) -> None:
        if self.pending:
            with suppress(Exception):
                await asyncio.wait_for(self.flush(), WRITER_STOP_TIMEOUT)
        if self._task:
            self._stopping = True
            self._kick.set()
            # Bounded: the write in flight ends (or fails) and the task reads the marker; only a
            # store that never answers is cancelled after the wait.
            done, _ = await asyncio.wait({self._task}, timeout=WRITER_STOP_TIMEOUT)
            if not done:
                log.error("store writer still busy at shutdown event=device_store_error "
                          "kind=%s pending=%d", self.kind, len(self.pending))
                self._task.cancel()
        for _, fut in self._waiters:
            if not fut.done():
                fut.cancel()


@dataclass
class Issued:
    """What a command request did."""

    batch: str
    ids: list[str]
    devices: int
    online: int  # sent at once (connected devices)
    routed: int = 0  # handed to the node serving the device (cluster)


@dataclass
class _Tally:
    area: str
    command: str
    created: float
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMMAND_STATUSES, 0))

    def as_dict(self, batch: str) -> Record:
        total = sum(self.counts.values())
        return {"command_batch": batch, "area": self.area, "command": self.command,
                "created": self.created, "devices": total, **self.counts}


Publish = Callable[[str, dict[str, Any]], Awaitable[None]]


class DeviceManager:
    """The device registry and every device connection of this node."""

    MAX_TALLIES = 256
    MAX_SETTLED = 100_000  # ids of settled commands remembered (ahead of the write-behind)

    def __init__(self, store: Store, publish: Publish, settings: DeviceSettings | None = None,
                 offer: StreamOffer | None = None, *, bus: Bus | None = None,
                 node_id: str = "") -> None:
        self.store = store
        self.publish = publish
        self.bus = bus  # with a node id: commands are routed to the node serving a device
        self.node_id = node_id
        self.settings = settings or DeviceSettings()
        self.offer = offer or StreamOffer()
        self.devices: dict[str, Device] = {}
        self.connected = 0
        self.ack_listeners: list[Callable[[Record, float], None]] = []  # (command, loop time)
        self._devw = _Writer(store, "device")
        self._cmdw = _Writer(store, "command")
        self._heap: list[tuple[float, int, str, str]] = []  # due, seq, device, command id
        self._due: dict[str, int] = {}  # command id -> seq of its live heap entry
        self._seq = itertools.count()
        self._tele_dirty: set[str] = set()
        self._with_outbox: set[str] = set()
        self._tallies: OrderedDict[str, _Tally] = OrderedDict()
        self._provision_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._planned = math.inf
        self._task: asyncio.Task[None] | None = None
        self._closers: set[asyncio.Task[None]] = set()
        self._settled: OrderedDict[str, None] = OrderedDict()
        self._stopping = False
        self._nodes: BusSubscription | None = None
        self._bus_tasks: list[asyncio.Task[None]] = []
        self.stats = {"heartbeats": 0, "acks": 0, "sent": 0, "resent": 0, "errors": 0,
                      "routed": 0, "received": 0}

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the registry and the undelivered commands; start the periodic task."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for rec in await self.store.find("device"):
            dev = Device(rec)
            if dev.status != "offline":
                # Online when the node stopped: offline in two heartbeats unless it reconnects.
                dev.last_seen = now
            self.devices[dev.id] = dev
        pending = await self.store.find("command", status="queued")
        pending += await self.store.find("command", status="sent")
        pending.sort(key=lambda r: (r.get("created", 0), r["id"]))
        for rec in pending:
            d = self.devices.get(rec.get("device", ""))
            if d is None:
                continue
            rec["status"] = "queued"
            rec["tries"] = 0
            self._enqueue(d, rec)
        self._devw.start()
        self._cmdw.start()
        self._task = loop.create_task(self._run())
        if self.bus is not None and self.node_id:
            self._nodes = await self.bus.subscribe(NODE_TOPIC)
            self._bus_tasks = [loop.create_task(self._read_nodes(self._nodes)),
                               loop.create_task(self._read_routes())]
        log.info("device registry loaded event=devices_start devices=%d undelivered=%d",
                 len(self.devices), len(pending))

    async def close_all(self, code: int = CLOSE_GOING_AWAY,
                        reason: str = "máy chủ dừng / server shutting down") -> None:
        for dev in self.devices.values():
            if dev.link is not None:
                dev.link.close(code, reason)
        if self._closers:
            await asyncio.wait(list(self._closers), timeout=5.0)

    async def stop(self) -> None:
        self._stopping = True  # the bus readers end by themselves (within a receive timeout)
        if self._nodes is not None:
            await self._nodes.close()
        if self._bus_tasks:
            _, late = await asyncio.wait(self._bus_tasks, timeout=WRITER_STOP_TIMEOUT)
            for t in late:
                t.cancel()
            self._bus_tasks = []
        if self._task:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._persist_telemetry()
        await self._devw.stop()
        await self._cmdw.stop()

    def track(self, task: asyncio.Task[None]) -> None:
        """Keep a closing task alive until it ends (links call this)."""
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    # ---- registry ----------------------------------------------------------------------------
    def get(self, device_id: str) -> Device | None:
        return self.devices.get(device_id)

    def find(self, areas: set[str] | None = None, *, kind: str | None = None,
             status: str | None = None, group: str | None = None) -> list[Device]:
        out = []
        for d in self.devices.values():
            r = d.record
            if (areas is None or r["area"] in areas) and (kind is None or r["kind"] == kind) \
                    and (status is None or d.status == status) \
                    and (group is None or group in r.get("groups", ())):
                out.append(d)
        return out

    async def create(self, rec: Record) -> Device:
        await self.store.create("device", rec)
        dev = Device(rec)
        self.devices[dev.id] = dev
        return dev

    async def update(self, device_id: str, changes: Record) -> Device:
        """Merge changes (None deletes a field) into the record, write it, push the device's
        configuration when it is connected and something it uses changed."""
        dev = self.devices.get(device_id)
        if dev is not None and self.remote(dev):  # the serving node's record, not ours
            dev = await self._load(device_id, fresh=True)
        if dev is None:
            raise NotFound(f"device {device_id!r}")
        rec = dict(dev.record)
        for k, v in changes.items():
            if k == "id":
                continue
            if v is None:
                rec.pop(k, None)
            else:
                rec[k] = v
        rec["updated"] = time.time()
        dev.record = rec
        self._devw.mark(rec)
        await self._devw.flush()
        if dev.link is not None and dev.ready and changes.keys() & {
                "area", "volume", "power_schedule", "groups", "name", "capabilities"}:
            await self._send(dev, encode({"v": PROTOCOL_VERSION, "type": "config",
                                          "config": self.config_of(dev)}))
        return dev

    async def provision(self, device_id: str, token: str) -> str | None:
        """Exchange a one-time provisioning token for a device key (None: refused)."""
        async with self._provision_lock:  # two exchanges of one token: exactly one wins
            dev = self.devices.get(device_id)
            if dev is None:
                return None
            prov = dev.record.get("provision")
            if not isinstance(prov, dict) or not same_hash(prov.get("hash"), token) \
                    or float(prov.get("expires", 0)) < time.time():
                return None
            key = new_key()
            await self.update(device_id, {"key_hash": secret_hash(key), "provision": None,
                                          "revoked": False, "provisioned_at": time.time()})
            return key

    async def revoke(self, device_id: str) -> Device:
        dev = await self.update(device_id, {"revoked": True, "revoked_at": time.time()})
        await self._close_session(dev, "khóa bị thu hồi / key revoked")
        return dev

    async def _close_session(self, dev: Device, reason: str) -> None:
        """Close the device's connection with 4003, here or on the node serving it."""
        if self.remote(dev):
            assert self.bus is not None
            with suppress(Exception):  # a bus down: its next hello is refused all the same
                await self.bus.send(route_stream(dev.record["node"]),
                                    {"v": PROTOCOL_VERSION, "close": dev.id, "reason": reason})
        elif dev.link is not None:
            dev.link.close(CLOSE_REVOKED, reason)
            dev.link = None
            dev.ready = False
            self.connected -= 1

    async def remove(self, device_id: str) -> bool:
        dev = self.devices.pop(device_id, None)
        if dev is None:
            return False
        await self._close_session(dev, "thiết bị đã bị xóa / device deleted")
        self._devw.forget(device_id)
        self._tele_dirty.discard(device_id)
        self._with_outbox.discard(device_id)
        await self._devw.flush()  # a batch already taken may still hold it
        await self.store.delete("device", device_id)
        for rec in list((dev.outbox or {}).values()):
            self._set_status(rec, "expired", error="thiết bị đã bị xóa / device deleted")
        return True

    # ---- connections ---------------------------------------------------------------------------
    def config_of(self, dev: Device) -> dict[str, Any]:
        r = dev.record
        return {"device": dev.id, "name": r["name"], "kind": r["kind"], "area": r["area"],
                "groups": r.get("groups", []),
                "streams": stream_urls(dev.public, r["area"], r.get("capabilities") or {},
                                       self.offer),
                "volume": r.get("volume", self.settings.default_volume),
                "power_schedule": r.get("power_schedule", []),
                "display": r.get("display"), "emergency": r.get("emergency")}

    async def hello(self, link: Link, raw: str | bytes, public: str) -> Device:
        """Authenticate the first message of a connection; welcome and deliver the backlog.
        HelloRejected carries the close code."""
        try:
            hello = parse_hello(parse_message(raw))
        except ProtocolError as e:
            raise HelloRejected(CLOSE_MALFORMED_HELLO, f"hello không hợp lệ / bad hello: {e}"
                                ) from None
        dev = self.devices.get(hello.device)
        if dev is None or (self.bus is not None and dev.link is None):
            # Registered by another node, or changed there (revoked, moved) since: the store's.
            dev = await self._load(hello.device, fresh=True)
        if dev is None or not same_hash(dev.record.get("key_hash"), hello.key):
            raise HelloRejected(CLOSE_UNAUTHORISED,
                                "sai thiết bị hoặc khóa / unknown device or wrong key")
        if dev.record.get("revoked"):
            raise HelloRejected(CLOSE_REVOKED, "khóa bị thu hồi / key revoked")
        loop = asyncio.get_running_loop()
        old = dev.link
        if old is not None:
            old.close(CLOSE_REPLACED, "kết nối mới thay thế / replaced by a new connection")
            log.info("device connection replaced event=device_replaced device=%s", dev.id)
        else:
            self.connected += 1
        dev.link = link
        dev.ready = False
        dev.public = public
        dev.last_seen = loop.time()
        changes: Record = {"last_seen": time.time(), "node": self.node_id}
        if hello.firmware is not None:
            changes["firmware"] = hello.firmware
        if hello.capabilities is not None and hello.capabilities != dev.record.get(
                "capabilities"):
            changes["capabilities"] = hello.capabilities
        rec = {**dev.record, **changes}
        dev.record = rec
        status = "fault" if rec.get("faults") else "online"
        try:
            await self._claim(dev)  # before the welcome: a welcomed device is ready at once
            await self._send(dev, encode({
                "v": PROTOCOL_VERSION, "type": "welcome", "server_time": time.time(),
                "heartbeat": self.settings.heartbeat, "config": self.config_of(dev)}))
            log.info("device connected event=device_connect device=%s area=%s firmware=%s",
                     dev.id, rec["area"], rec.get("firmware"))
            if dev.status != status:
                await self._status(dev, status, "connected")
            else:
                self._devw.mark(rec)
            await self._publish_node(dev)
            await self._deliver_backlog(dev, link)
        except BaseException:  # cancelled (shutdown) or worse: no dead link left behind
            await self.disconnected(dev, link)
            raise
        return dev

    async def _deliver_backlog(self, dev: Device, link: Link) -> None:
        """Undelivered commands in the order they were issued, including those issued while this
        runs (`issue` only queues them until the device is ready)."""
        done: set[str] = set()
        while dev.link is link:
            todo = [r for r in (dev.outbox or {}).values() if r["id"] not in done]
            if not todo:
                dev.ready = True
                return
            now = time.time()
            for rec in todo:
                if dev.link is not link:
                    return
                done.add(rec["id"])
                if rec["status"] in FINAL:
                    continue
                if rec["expires"] <= now:
                    self._set_status(rec, "expired")
                    continue
                rec["tries"] = 0  # tries count per connection
                await self._try_send(dev, rec)

    async def disconnected(self, dev: Device, link: Link) -> None:
        """The link ended. The device stays online until it misses two heartbeats (a quick
        reconnect over a flaky 4G link is not an outage); its commands wait for it."""
        if dev.link is not link:
            return  # replaced or closed by us: already accounted
        dev.link = None
        dev.ready = False
        self.connected -= 1
        log.info("device disconnected event=device_disconnect device=%s", dev.id)

    async def receive(self, dev: Device, link: Link, raw: str | bytes) -> None:
        """One message of an authenticated connection."""
        if dev.link is not link:
            return  # a replaced connection still talking
        dev.last_seen = asyncio.get_running_loop().time()
        try:
            msg = parse_message(raw)
            kind = msg["type"]
            if kind == "heartbeat":
                await self._heartbeat(dev, parse_heartbeat(msg))
            elif kind == "ack":
                self._ack(dev, *parse_ack(msg))
            else:
                raise ProtocolError(f"loại thông điệp không rõ / unknown message type {kind!r}",
                                    "type")
        except ProtocolError as e:
            await self.protocol_error(dev, link, str(e))

    async def protocol_error(self, dev: Device, link: Link, text: str) -> None:
        self.stats["errors"] += 1
        link.errors += 1
        log.info("bad device message event=device_bad_message device=%s errors=%d error=%s",
                 dev.id, link.errors, text[:200])
        if link.errors >= self.settings.max_errors:
            link.close(CLOSE_ABUSE, "quá nhiều lỗi / too many malformed messages")
            return
        if not link.closing():
            with suppress(Exception):
                await link.send(error_message(text))

    async def _heartbeat(self, dev: Device, telemetry: dict[str, Any]) -> None:
        self.stats["heartbeats"] += 1
        telemetry["at"] = time.time()
        dev.telemetry = telemetry
        self._tele_dirty.add(dev.id)
        faults = telemetry["faults"]
        status = "fault" if faults else "online"
        if faults != dev.record.get("faults") or (
                "firmware" in telemetry and telemetry["firmware"] != dev.record.get("firmware")):
            dev.record["faults"] = faults
            if "firmware" in telemetry:
                dev.record["firmware"] = telemetry["firmware"]
            if status == dev.status:
                self._persist_one(dev)
        if status != dev.status:
            await self._status(dev, status, "faults" if faults else "heartbeat")

    def _persist_one(self, dev: Device) -> None:
        rec = dev.record
        rec["status"] = dev.status
        rec["telemetry"] = dev.telemetry
        if dev.telemetry is not None:
            rec["last_seen"] = dev.telemetry["at"]
        self._tele_dirty.discard(dev.id)
        self._devw.mark(rec)

    async def _status(self, dev: Device, status: str, reason: str) -> None:
        await self._announce([self._change(dev, status, reason)])

    def _change(self, dev: Device, status: str, reason: str) -> dict[str, Any]:
        """Set a status and queue its write; the event to announce once it is written."""
        previous, dev.status = dev.status, status
        self._persist_one(dev)
        r = dev.record
        log.info("device status event=device_status device=%s status=%s previous=%s reason=%s",
                 dev.id, status, previous, reason)
        return {"v": PROTOCOL_VERSION, "device": dev.id, "name": r["name"], "kind": r["kind"],
                "area": r["area"], "status": status, "previous": previous, "reason": reason,
                "faults": r.get("faults", []), "ts": time.time()}

    async def _announce(self, events: list[dict[str, Any]]) -> None:
        """Status events go out once the store has the change: a subscriber that reads the
        device back sees what the event says."""
        await self._devw.flush()
        for ev in events:
            try:
                await self.publish("device.status", ev)
            except Exception:
                log.exception("bus publish failed event=device_status_publish_error device=%s",
                              ev["device"])

    # ---- commands ------------------------------------------------------------------------------
    def _enqueue(self, dev: Device, rec: Record) -> None:
        if dev.outbox is None:
            dev.outbox = {}
        dev.outbox[rec["id"]] = rec
        self._with_outbox.add(dev.id)
        if len(dev.outbox) > self.settings.max_queued:
            oldest = next(iter(dev.outbox.values()))
            self._set_status(oldest, "expired",
                             error="hàng đợi đầy / too many undelivered commands")

    def _set_status(self, rec: Record, status: str, **fields: Any) -> None:
        old = rec["status"]
        rec["status"] = status
        rec.update(fields)
        if status in FINAL:
            rec["done"] = time.time()
            self._due.pop(rec["id"], None)
            self._settled[rec["id"]] = None  # a copy routed back here later is dropped
            if len(self._settled) > self.MAX_SETTLED:
                self._settled.popitem(last=False)
            dev = self.devices.get(rec["device"])
            if dev is not None and dev.outbox is not None:
                dev.outbox.pop(rec["id"], None)
                if not dev.outbox:
                    dev.outbox = None
                    self._with_outbox.discard(dev.id)
        tally = self._tallies.get(rec.get("batch") or "")
        if tally is not None and old != status:
            tally.counts[old] -= 1
            tally.counts[status] += 1
        self._cmdw.mark(rec)

    async def _send(self, dev: Device, data: bytes) -> bool:
        """Write to the device's link when it takes it without waiting: a link with more than
        16 KB unsent (a device that does not read) is skipped, so one stuck device never holds up
        a fan-out (aiohttp only waits for drain once the transport is paused, above that)."""
        link = dev.link
        if link is None or link.closing() or link.unsent() > _SLOW_BYTES:
            return False
        try:
            await link.send(data)
        except Exception:  # the connection is going away: its handler will notice
            return False
        return True

    async def _try_send(self, dev: Device, rec: Record, data: bytes | None = None) -> None:
        """Send a queued/sent command once more and schedule its retry."""
        if await self._send(dev, data or command_message(rec)):
            tries = rec["tries"] + 1
            self.stats["sent" if tries == 1 else "resent"] += 1
            self._set_status(rec, "sent", sent=time.time(), tries=tries)
        else:
            self._cmdw.mark(rec)  # stays queued; the retry tries again
        self._schedule(dev.id, rec)

    def _schedule(self, dev_id: str, rec: Record) -> None:
        due = asyncio.get_running_loop().time() + self.settings.retry_interval
        seq = self._due[rec["id"]] = next(self._seq)
        heapq.heappush(self._heap, (due, seq, dev_id, rec["id"]))
        if due < self._planned:
            self._wake.set()

    def _tally(self, batch: str, area: str, command: str) -> _Tally:
        t = self._tallies[batch] = _Tally(area, command, time.time())
        while len(self._tallies) > self.MAX_TALLIES:
            self._tallies.popitem(last=False)
        return t

    def tally(self, batch: str) -> Record | None:
        t = self._tallies.get(batch)
        return None if t is None else t.as_dict(batch)

    async def issue(self, devices: list[Device], command: str, args: dict[str, Any], *,
                    ttl: float | None = None, issuer: str | None = None,
                    area: str | None = None, single: bool = False) -> Issued:
        """A command (args already validated) to each device: sent at once to the connected ones,
        queued for the others, all persisted before this returns."""
        now = time.time()
        ttl = self.settings.command_ttl if ttl is None else ttl
        expires = round(now + ttl, 3)
        batch = new_id()
        tally = None if single else self._tally(batch, area or "", command)
        prefix, suffix = command_template(command, args, expires)
        shown = display_state(args, now) if command == "display" else None  # one for all
        online = 0
        ids = []
        routed: list[tuple[str, Record]] = []
        for i, dev in enumerate(devices):
            cid = batch if single else f"{batch}.{i}"
            ids.append(cid)
            rec: Record = {"id": cid, "device": dev.id, "command": command, "args": args,
                           "status": "queued", "created": now, "expires": expires, "tries": 0,
                           "batch": None if single else batch, "issuer": issuer}
            if tally is not None:
                tally.counts["queued"] += 1
            if self.remote(dev):  # its node keeps its state, delivers and retries
                self._cmdw.mark(rec)
                routed.append((dev.record["node"], rec))
                continue
            if command in STATEFUL_COMMANDS:
                self._remember(dev, command, args, shown, now)
            online += await self._offer(dev, rec, prefix + cid.encode() + suffix)
        await self._cmdw.flush()
        for node, rec in routed:  # after the store has them: the receiver may read them back
            await self._route(node, rec)
        log.info("device command event=device_command command=%s batch=%s devices=%d "
                 "online=%d routed=%d issuer=%s", command, batch, len(devices), online,
                 len(routed), issuer)
        return Issued(batch, ids, len(devices), online, len(routed))

    async def _offer(self, dev: Device, rec: Record, data: bytes | None = None) -> bool:
        """Queue a new command for a device of this node; send it at once when it is connected
        and nothing older waits. True: sent."""
        waiting = dev.outbox is not None and any(
            r["status"] == "queued" for r in dev.outbox.values())
        self._enqueue(dev, rec)
        if dev.link is not None and dev.ready and not waiting:
            await self._try_send(dev, rec, data)
            return bool(rec["status"] == "sent")
        self._cmdw.mark(rec)  # offline, its backlog is being delivered, or an older one waits
        if dev.link is not None and dev.ready:
            self._schedule(dev.id, rec)
        return False

    # ---- cluster: which node serves a device, commands routed to it -----------------------------
    def remote(self, dev: Device) -> bool:
        """Served by another node of the cluster (its commands go there)."""
        node = dev.record.get("node")
        return dev.link is None and bool(node) and node != self.node_id and self.bus is not None

    async def _load(self, device_id: str, fresh: bool = False) -> Device | None:
        """A device registered by another node since this one started, or (`fresh`) the record
        another node kept while it served the device: read it from the store."""
        if not isinstance(device_id, str) or not device_id:
            return None
        rec = await self.store.get("device", device_id)
        dev = self.devices.get(device_id)  # loaded meanwhile, or known and refreshed
        if rec is None:
            return dev
        if dev is None:
            dev = self.devices[device_id] = Device(rec)
        elif fresh and dev.link is None:
            dev.record = rec
            dev.telemetry = rec.get("telemetry")
        return dev

    async def _publish_node(self, dev: Device) -> None:
        if self.bus is None or not self.node_id:
            return
        try:
            await self.bus.publish(NODE_TOPIC, {"v": PROTOCOL_VERSION, "device": dev.id,
                                                "node": dev.record.get("node") or "",
                                                "status": dev.status, "origin": self.node_id})
        except Exception as e:  # noqa: BLE001 - the device is served here all the same
            log.error("bus publish failed event=device_node_publish_error device=%s error=%s",
                      dev.id, e)

    async def _claim(self, dev: Device) -> None:
        """A device connected here: take over the undelivered commands other nodes issued or
        held for it (from the store), and tell the cluster."""
        if self.bus is None or not self.node_id:
            return
        rows = await self.store.find("command", device=dev.id, status="queued")
        rows += await self.store.find("command", device=dev.id, status="sent")
        rows.sort(key=lambda r: (r.get("created", 0), r["id"]))
        for rec in rows:
            if rec["id"] not in (dev.outbox or {}) and rec["id"] not in self._settled:
                rec["status"] = "queued"
                rec["tries"] = 0
                self._enqueue(dev, rec)

    async def _route(self, node: str, rec: Record) -> None:
        assert self.bus is not None
        try:
            await self.bus.send(route_stream(node), {"v": PROTOCOL_VERSION, "command": rec})
            self.stats["routed"] += 1
        except Exception as e:  # noqa: BLE001 - the bus is down: hold it here instead
            log.error("bus send failed event=device_route_error device=%s node=%s error=%s",
                      rec["device"], node, e)
            dev = self.devices.get(rec["device"])
            if dev is not None:
                self._enqueue(dev, rec)

    async def _read_routes(self) -> None:
        """Commands other nodes issued for the devices of this node (durable: a command read
        before a crash and not acknowledged is read again after the restart)."""
        assert self.bus is not None
        stream = route_stream(self.node_id)
        while not self._stopping:
            try:
                got = await self.bus.receive(stream, ROUTE_GROUP, self.node_id, count=100,
                                             timeout=1.0)
            except BusClosed:
                return
            except Exception as e:  # noqa: BLE001 - the bus comes back: try again
                log.error("bus read failed event=device_route_error error=%s", e)
                await asyncio.sleep(1.0)
                continue
            for mid, body in got:
                try:
                    if "close" in body:  # revoked or deleted on the node that was asked
                        dev = self.devices.get(str(body["close"]))
                        if dev is not None:
                            await self._close_session(dev, str(body.get("reason", ""))[:100])
                            await self._load(dev.id, fresh=True)
                    else:
                        await self._accept(body.get("command"))
                except Exception:
                    log.exception("routed command failed event=device_route_error")
                with suppress(Exception):
                    await self.bus.ack(stream, ROUTE_GROUP, mid)

    async def _accept(self, rec: Any) -> None:
        """A command routed here: idempotent by id, expiry kept, held if the device left."""
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
            return
        dev = self.devices.get(rec.get("device", "")) or await self._load(rec.get("device", ""))
        if dev is None or rec["id"] in (dev.outbox or {}) or rec["id"] in self._settled:
            return
        stored = await self.store.get("command", rec["id"])
        if stored is not None and stored.get("status") in FINAL:
            return
        self.stats["received"] += 1
        rec["status"] = "queued"
        rec["tries"] = 0
        now = time.time()
        if float(rec.get("expires", 0)) <= now:
            rec["done"] = now
            rec["status"] = "expired"
            self._cmdw.mark(rec)
            return
        if self.remote(dev):  # it moved on meanwhile: pass it along
            await self._route(dev.record["node"], rec)
            return
        command, args = rec["command"], rec["args"]
        if command in STATEFUL_COMMANDS:
            shown = display_state(args, now) if command == "display" else None
            self._remember(dev, command, args, shown, now)
        await self._offer(dev, rec)

    async def _read_nodes(self, sub: BusSubscription) -> None:
        """`device.node` events until the subscription closes (at stop)."""
        async for ev in sub:
            try:
                await self._on_node(ev)
            except Exception:
                log.exception("device node event failed event=device_node_error")

    async def _on_node(self, ev: Record) -> None:
        """Another node serves a device now (or none does): hand over what is held for it."""
        if ev.get("origin") == self.node_id:
            return
        dev = self.devices.get(ev.get("device", "")) or await self._load(ev.get("device", ""))
        node = ev.get("node")
        if dev is None or not isinstance(node, str) or dev.link is not None:
            return  # connected here (an older event, or a half-open link its heartbeats end)
        dev.record["node"] = node
        if ev.get("status") in DEVICE_STATUSES:
            dev.status = ev["status"]
        if not node or node == self.node_id:
            return
        held = [r for r in (dev.outbox or {}).values() if r["status"] not in FINAL]
        for rec in held:
            self._due.pop(rec["id"], None)
        dev.outbox = None
        self._with_outbox.discard(dev.id)
        self._tele_dirty.discard(dev.id)
        for rec in held:
            await self._route(node, rec)

    def _remember(self, dev: Device, command: str, args: dict[str, Any],
                  shown: dict[str, Any] | None, now: float) -> None:
        """Keep what a display/emergency command leaves on the device in its record (sent again
        in `config`, so a board that reconnects or reloads shows it at once) and expire the
        older commands of that kind it has not received yet: the state supersedes them, and a
        board coming back must not flash an emergency that has ended since."""
        for rec in list((dev.outbox or {}).values()):
            if rec["command"] == command and (rec["status"] == "queued"
                                              or (rec["status"] == "sent" and dev.link is None)):
                self._set_status(rec, "expired", error="đã có lệnh mới hơn / superseded by a "
                                                       "newer command")
        r = dev.record
        # `shown` (the display state) is shared by every device of a bulk command: never
        # mutated in place, only replaced.
        state = shown if command == "display" else emergency_state(args, r.get("emergency"),
                                                                   now)
        if state is None:
            r.pop(command, None)
        else:
            r[command] = state
        self._devw.mark(r)

    def _ack(self, dev: Device, cid: str, ok: bool, error: str | None) -> None:
        rec = (dev.outbox or {}).get(cid)
        if rec is None:
            return  # a late ack of a command already settled: harmless
        self.stats["acks"] += 1
        if ok:
            self._set_status(rec, "acked", acked=time.time())
        else:
            self._set_status(rec, "failed", acked=time.time(),
                             error=(error or "thiết bị từ chối / refused by the device")[:500])
        if self.ack_listeners:
            t = asyncio.get_running_loop().time()
            for fn in self.ack_listeners:
                fn(rec, t)

    # ---- the periodic task ---------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        check_every = min(max(s.heartbeat / 4, 0.05), 5.0)
        expire_every = min(max(s.command_ttl / 10, 0.1), 30.0)
        now = loop.time()
        next_check, next_persist, next_expire = (now + check_every, now + s.persist_interval,
                                                 now + expire_every)
        while True:
            now = loop.time()
            try:
                if now >= next_check:
                    next_check = max(next_check + check_every, now)
                    await self._check_offline(now)
                if now >= next_persist:
                    next_persist = max(next_persist + s.persist_interval, now)
                    self._persist_telemetry()
                if now >= next_expire:
                    next_expire = max(next_expire + expire_every, now)
                    self._expire()
                await self._retries(now)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("device sweep failed event=device_sweep_error")
            self._planned = min(next_check, next_persist, next_expire,
                                self._heap[0][0] if self._heap else math.inf)
            self._wake.clear()
            if self._planned > loop.time():
                with suppress(TimeoutError):
                    async with asyncio.timeout_at(self._planned):
                        await self._wake.wait()

    async def _check_offline(self, now: float) -> None:
        hb = self.settings.heartbeat
        limit = now - (2 * hb + 0.1 * hb)  # two heartbeats missed (plus 10 % for the network)
        late = [d for d in self.devices.values() if d.status != "offline" and d.last_seen < limit
                and not self.remote(d)]
        events = []
        for dev in late:
            dev.record["node"] = ""
            await self._publish_node(dev)
            if dev.link is not None:
                dev.link.close(CLOSE_HEARTBEAT, "mất nhịp tim / missed heartbeats")
                dev.link = None
                dev.ready = False
                self.connected -= 1
            events.append(self._change(dev, "offline", "missed_heartbeats"))
        if events:
            await self._announce(events)

    def _persist_telemetry(self) -> None:
        for dev_id in list(self._tele_dirty):
            dev = self.devices.get(dev_id)
            if dev is not None:
                self._persist_one(dev)
        self._tele_dirty.clear()

    def _expire(self) -> None:
        now = time.time()
        for dev_id in list(self._with_outbox):
            dev = self.devices.get(dev_id)
            for rec in list((dev.outbox or {}).values()) if dev else ():
                if rec["expires"] <= now:
                    self._set_status(rec, "expired")

    async def _retries(self, now: float) -> None:
        wall = time.time()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, seq, dev_id, cid = heapq.heappop(heap)
            if self._due.get(cid) != seq:
                continue  # settled, or rescheduled since
            del self._due[cid]
            dev = self.devices.get(dev_id)
            rec = (dev.outbox or {}).get(cid) if dev else None
            if dev is None or rec is None:
                continue
            if rec["expires"] <= wall:
                self._set_status(rec, "expired")
            elif dev.link is None:
                continue  # waits for the reconnect
            elif not dev.ready:  # its backlog is being delivered: look again later
                self._schedule(dev.id, rec)
            elif rec["tries"] >= self.settings.max_tries:
                self._set_status(rec, "failed",
                                 error=f"không xác nhận sau {rec['tries']} lần gửi / "
                                       f"no ack after {rec['tries']} sends")
            else:
                await self._try_send(dev, rec)
