"""The monitor: what is on air where and why, who listens over which transport, how it sounds.

- `GET /api/v1/monitor[?area=CODE][&depth=N]` (bearer token, `read` right): JSON for the areas
  of the caller's subtree (or of `area` inside it), down to `depth` levels below it (default:
  all): the on-air programme and why it is there (class, issuing authority, who aired it, the
  cause of the last change), listeners per transport, and the listener/device totals of the
  area's whole subtree, bytes/s and packets per hub channel, HTTP and RTP streams, WebRTC peers
  with their RTT/loss/jitter, HLS segmenters, devices; plus node figures (media clock, event-loop
  lag, mixes, encoders, broadcasts on air per class, devices online/offline in scope). `path`
  names the areas from the caller's area down to `area` (the page's breadcrumb).
- `GET /metrics`: node-wide figures in the Prometheus text format (0.0.4). Public like
  `/healthz`: scrapers run on the management network. Written by hand rather than with
  prometheus-client: every figure already lives in the node (engine, hub, transports) and is read
  at scrape time, so the library's instrumentation objects would only add a copy and a
  dependency; the exposition format is a few lines of text. Label cardinality is bounded by the
  area tree and never grows with listeners, peers, devices or broadcasts: per area listener
  series for areas with a hub channel (listened to at least once) or a listener; per area and
  codec channel series for existing hub channels and RTP streams that send or have receivers;
  per area on-air series for areas with a programme on air; per area device series for areas
  with devices. Counters are exposed, not rates: Prometheus' `rate()` does the rest.
- `GET /monitor`: the page (web/static/monitor.html, .js, .css): log in, a live table one level
  of the tree at a time (with subtree totals and drill-down), listen to an area over WHEP.

Listener figures per transport: HTTP listeners (and their bytes, drops) from the HTTP streamer's
`HttpStreamer.stats()`; RTP unicast receivers per stream (a multicast group's listeners cannot be
counted: `rtp_multicast` says the group is sent), and per RTP stream the receivers' RTCP reports
(`reports`: loss fraction, cumulative lost, jitter in ms, last seen); WebRTC peers of the relay, with RTT, loss and
jitter from their receiver reports (a peer is named by a hash: its session id would let anyone
end the session); HLS serves shared segments and has no per-client count, so its figure is the
segmenter's state. Every hub channel reports its subscriptions too: one per transport and area
however many listeners that transport fans out to (encode once). Bitrates come from deltas of
the hub channels' byte and packet counters kept by a small sampler (every second on the real
clock; on a virtual clock per request and over media seconds, so tests get exact figures).

Cost (`python -m loa.web.bench.monitor`, 5,000 areas, 10,000 devices): a commune's document is a few
milliseconds; a province one level deep ~25 ms; the whole province (~5 MB) is built and sent in
chunks of `CHUNK` areas with turns of the event loop between them, and the /metrics text is
formatted in a worker thread, so neither holds the loop for long. Figures are read on the loop
thread while the media thread renders: containers the engine mutates are copied in one C-level
call (`list(...)`) before they are walked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from loa.streamer.areas import AreaTree
from loa.streamer.clock import TICK
from loa.streamer.hub import PacketHub
from loa.streamer.messages import say
from loa.web.api.schema import CODE, responses
from loa.web.http import ApiError, ok, principal, scoped_area
from loa.web.node import NODE, Node

log = logging.getLogger("loa.monitor")

STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"monitor.js": "text/javascript", "monitor.css": "text/css"}
CLASSES = ("emergency", "priority", "normal", "background")
TRANSPORTS = ("http", "rtp", "webrtc", "hls")
DEVICE_STATUSES = ("online", "offline", "fault")
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_DEPTH = 32
CHUNK = 250  # areas built, or encoded and sent, between two turns of the event loop

Key = tuple[str, str]  # (area, codec)


# ---- bitrate sampler ----------------------------------------------------------------------------
class RateSampler:
    """Bytes and packets per second of every hub channel, from deltas of its counters.

    Keeps the counters of a few recent instants (at least `interval` apart); a rate is taken
    between the oldest kept sample (at most `window` seconds old, when there are newer ones) and
    the newest. `clock` is any monotonic seconds: loop time, or media time on a virtual clock.
    """

    def __init__(self, hub: PacketHub, clock: Callable[[], float], interval: float = 1.0,
                 window: float = 3.0) -> None:
        self.hub = hub
        self.clock = clock
        self.interval = interval
        self.window = window
        self.samples: deque[tuple[float, dict[Key, tuple[int, int]]]] = deque()
        self._task: asyncio.Task[None] | None = None

    def sample(self, force: bool = False) -> None:
        now = self.clock()
        if self.samples and now - self.samples[-1][0] < self.interval / 2 and not force:
            return
        counters = self.hub.counters()
        self.samples.append((now, counters))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()

    def rate(self, key: Key) -> tuple[float, float] | None:
        """(bytes/s, packets/s) of a channel over the kept samples, None without two of them.

        Taken from the oldest sample that knows the channel: a channel created a moment ago has
        no history, and averaging its first packets over the whole window would understate it.
        """
        if len(self.samples) < 2:
            return None
        t1, c1 = self.samples[-1]
        last = c1.get(key)
        if last is None:
            return None
        for t0, c0 in self.samples:
            first = c0.get(key)
            if first is not None:
                if t1 <= t0:
                    return None
                return (last[0] - first[0]) / (t1 - t0), (last[1] - first[1]) / (t1 - t0)
        return None

    def rates(self) -> dict[Key, tuple[float, float]]:
        """Every channel's rate (see `rate`)."""
        keys = self.samples[-1][1] if self.samples else {}
        return {k: r for k in keys if (r := self.rate(k)) is not None}

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            try:
                self.sample()
            except Exception:  # the monitor must never die of a figure
                log.exception("rate sample failed event=monitor_sample_error")
            deadline += self.interval
            now = loop.time()
            if deadline < now:  # a stalled loop: next sample one interval from now
                deadline = now + self.interval
            await asyncio.sleep(deadline - now)


SAMPLER: web.AppKey[RateSampler] = web.AppKey("monitor_sampler", RateSampler)


# ---- collecting ---------------------------------------------------------------------------------
# Counts kept for every area in scope, in this order (cheap ints; detail dicts only for the areas
# a document lists).
TOTAL_KEYS = ("http", "rtp", "webrtc", *DEVICE_STATUSES)
HTTP_I, RTP_I, WEBRTC_I, DEV_I = 0, 1, 2, 3
HUB_CODECS = ("opus", "mp3", "pcmu", "pcma", "pcm")


class AreaFigures:
    """Transport details of one listed area (built only for areas that have something)."""

    __slots__ = ("channels", "http", "rtp", "rtp_multicast", "hls")

    def __init__(self) -> None:
        self.channels: list[dict[str, Any]] = []  # one per hub channel (codec)
        self.http: list[dict[str, Any]] = []  # one per HTTP stream (codec)
        self.rtp: list[dict[str, Any]] = []  # one per RTP stream sending or with receivers
        self.rtp_multicast = False
        self.hls: dict[str, Any] | None = None


EMPTY = AreaFigures()
ZERO = [0] * len(TOTAL_KEYS)


@dataclass
class Collected:
    detail: dict[str, AreaFigures] = field(default_factory=dict)  # listed areas, sparse
    counts: dict[str, list[int]] = field(default_factory=dict)  # areas in scope, sparse
    rtp_enabled: bool = False
    rtp_multicast: bool = False
    http: dict[str, int] = field(default_factory=dict)  # node totals
    rtp: dict[str, int] = field(default_factory=dict)  # node totals
    devices: dict[str, int] = field(default_factory=dict)  # totals over the scope

    def count(self, code: str) -> list[int]:
        c = self.counts.get(code)
        if c is None:
            c = self.counts[code] = [0] * len(TOTAL_KEYS)
        return c

    def listeners(self, code: str) -> dict[str, int | None]:
        c = self.counts.get(code, ZERO)
        return {"http": c[HTTP_I], "rtp": c[RTP_I] if self.rtp_enabled else None,
                "webrtc": c[WEBRTC_I],
                "hls": None}  # HLS serves shared segments: no per-client figure

    def device_counts(self, code: str) -> dict[str, int]:
        c = self.counts.get(code, ZERO)
        return dict(zip(DEVICE_STATUSES, c[DEV_I:], strict=True))


async def collect(app: web.Application, scope: set[str] | None, detail: set[str] | None
                  ) -> Collected:
    """Listener and device counts of every area in `scope` (None: all areas), and transport
    details of the areas in `detail` (None: the same as scope). Sparse; it lets the loop run
    between chunks of a big province (every list it walks is a copy)."""
    node = app[NODE]
    out = Collected()
    if detail is None:
        detail = scope

    def in_scope(code: str) -> bool:
        return scope is None or code in scope

    def fig(code: str) -> AreaFigures | None:
        if detail is not None and code not in detail:
            return None
        f = out.detail.get(code)
        if f is None:
            f = out.detail[code] = AreaFigures()
        return f

    # hub channels: details only (one subscription per transport, not listeners)
    sampler = app[SAMPLER]
    sampler.sample()
    hub = node.hub
    if detail is not None and len(detail) * len(HUB_CODECS) < hub.channel_count():
        found = hub.channel_stats((a, c) for a in detail for c in HUB_CODECS)
    else:
        found = hub.channel_stats()
    for i, ((area, codec), ch) in enumerate(found):
        if i and not i % (CHUNK * 4):
            await asyncio.sleep(0)
        f = fig(area)
        if f is None:
            continue
        bps, pps = sampler.rate((area, codec)) or (None, None)
        f.channels.append({
            "codec": codec, "subscribers": ch.subscribers, "packets": ch.packets,
            "bytes": ch.bytes,
            "bytes_per_s": None if bps is None else round(bps, 1),
            "kbps": None if bps is None else round(bps * 0.008, 2),
            "packets_per_s": None if pps is None else round(pps, 2),
        })

    # HTTP listeners (the HTTP streamer's own figures)
    http = node.http.stats()
    out.http = {k: int(http.get(k) or 0) for k in ("listeners", "dropped", "rejected")}
    for st in http.get("streams", []):
        area = str(st["area"])
        if not in_scope(area):
            continue
        if st.get("listeners"):
            out.count(area)[HTTP_I] += int(st["listeners"])
        f = fig(area)
        if f is not None:
            f.http.append({k: st.get(k) for k in ("codec", "listeners", "joined", "bytes",
                                                  "dropped", "batches")})

    # RTP: unicast receivers per stream; details of streams that send or have receivers
    rtp = node.rtp
    totals = dict.fromkeys(("packets", "octets", "receivers", "errors", "dropped", "blocked",
                            "rtcp_reports", "rtcp_malformed"), 0)
    if rtp is not None:
        out.rtp_enabled = True
        out.rtp_multicast = bool(rtp.settings.multicast)
        totals["rtcp_reports"] = rtp.rtcp_reports
        totals["rtcp_malformed"] = rtp.rtcp_malformed
        for i, ((area, _codec), st) in enumerate(list(rtp.streams.items())):
            if i and not i % (CHUNK * 4):
                await asyncio.sleep(0)
            n = len(st.receivers)
            totals["packets"] += st.packets
            totals["octets"] += st.octets
            totals["receivers"] += n
            totals["errors"] += st.errors
            totals["dropped"] += st.dropped
            totals["blocked"] += st.blocked
            if not in_scope(area):
                continue
            if n:
                out.count(area)[RTP_I] += n
            if n or st.sub is not None:
                f = fig(area)
                if f is not None:
                    d = st.stats()
                    f.rtp.append({k: d.get(k) for k in (
                        "codec", "group", "port", "active", "receivers", "packets", "octets",
                        "errors", "dropped", "blocked", "reports")})
                    f.rtp_multicast = f.rtp_multicast or (out.rtp_multicast
                                                          and st.sub is not None)
    out.rtp = totals

    # WebRTC peers
    relay = node.webrtc
    if relay is not None:
        for area, n in relay.peers_by_area().items():
            if in_scope(area):
                out.count(area)[WEBRTC_I] += n

    # HLS segmenters (details)
    hls = node.hls
    if hls is not None:
        now = asyncio.get_running_loop().time()
        for area, seg in list(hls.segmenters.items()):
            f = fig(area)
            if f is not None:
                f.hls = {"active": True, "segments": len(seg.segments),
                         "packets": seg.packets_in, "next_seq": seg.next_seq,
                         "idle_s": round(max(0.0, now - seg.last_request), 1)}

    # devices
    dev_totals = {**dict.fromkeys(DEVICE_STATUSES, 0), "connected": 0, "total": 0}
    mgr = node.devices
    if mgr is not None:
        index = {k: DEV_I + i for i, k in enumerate(DEVICE_STATUSES)}
        for n, dev in enumerate(list(mgr.devices.values())):
            if n and not n % (CHUNK * 8):
                await asyncio.sleep(0)
            where = dev.record.get("area")
            if not isinstance(where, str) or not in_scope(where):
                continue
            dev_totals["total"] += 1
            dev_totals["connected"] += dev.link is not None
            slot = index.get(dev.status)
            if slot is not None:
                dev_totals[dev.status] += 1
                out.count(where)[slot] += 1
    out.devices = dev_totals

    for f in out.detail.values():
        f.channels.sort(key=lambda c: str(c["codec"]))
        f.http.sort(key=lambda c: str(c["codec"]))
        f.rtp.sort(key=lambda c: str(c["codec"]))
    return out


def engine_figures(node: Node) -> dict[str, Any]:
    eng = node.engine
    mixes = list(eng.mixes.values())
    on_air = dict.fromkeys(CLASSES, 0)
    for live in list(eng.broadcasts.values()):
        if live.active:
            on_air[live.b.cls.name] = on_air.get(live.b.cls.name, 0) + 1
    return {
        **dict(eng.stats),
        "media_time": round(eng.media_time, 3),
        "mixes": len(mixes),
        "mixes_consumed": sum(1 for m in mixes if m.codecs),
        "encoders": sum(len(m.encoders) for m in mixes),
        "broadcasts_on_air": on_air,
    }


def clock_figures(node: Node) -> dict[str, Any]:
    if node.clock is not None:
        s = node.clock.stats.as_dict()
        return {"realtime": True, **s,
                "max_lateness_ms": round(float(s["max_lateness_ms"]), 3),
                "last_lateness_ms": round(float(s["last_lateness_ms"]), 3)}
    return {"realtime": False, "ticks": node.engine.stats["ticks"], "late_ticks": 0,
            "skipped_ticks": 0, "max_lateness_ms": 0.0, "last_lateness_ms": 0.0}


def transport_figures(app: web.Application, c: Collected) -> dict[str, Any]:
    relay = app[NODE].webrtc
    hls = app[NODE].hls
    return {
        "http": dict(c.http),
        "rtp": {"enabled": c.rtp_enabled, "multicast": c.rtp_multicast, **c.rtp},
        "webrtc": {"peers": len(relay.whep) if relay else 0,
                   "inputs": len(relay.whip) if relay else 0,
                   **(dict(relay.counters) if relay else {})},
        "hls": {"enabled": hls is not None,
                "segmenters": len(hls.segmenters) if hls is not None else 0},
    }


def last_changes(node: Node, codes: set[str]) -> dict[str, dict[str, Any]]:
    """The latest on-air change of each area: the cause of what it hears now."""
    out: dict[str, dict[str, Any]] = {}
    for ch in reversed(list(node.engine.changes)):
        if ch.area in codes and ch.area not in out:
            out[ch.area] = {"cause": ch.cause, "by": ch.by, "from": ch.before, "to": ch.after,
                            "time": ch.sample / 48_000}
            if len(out) == len(codes):
                break
    return out


def _peer_ref(session_id: str) -> str:
    """An opaque name for a WHEP peer: its session id would let anyone DELETE the session."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:10]


async def peer_figures(app: web.Application, codes: set[str]) -> dict[str, list[dict[str, Any]]]:
    """RTT, loss and jitter of every WHEP peer in these areas (from their receiver reports)."""
    relay = app[NODE].webrtc
    sessions = [s for s in list(relay.whep.values()) if s.area in codes]
    stats = await asyncio.gather(*(s.stats() for s in sessions), return_exceptions=True)
    out: dict[str, list[dict[str, Any]]] = {}
    for s, st in zip(sessions, stats, strict=True):
        if isinstance(st, BaseException):
            continue
        fig = {k: v for k, v in st.items() if k != "session"}
        fig["peer"] = _peer_ref(s.id)
        out.setdefault(s.area, []).append(fig)
    return out


NO_QUALITY: dict[str, Any] = {"peers": 0, "rtt_ms_max": None, "jitter_ms_max": None,
                              "fraction_lost_max": None, "packets_lost": 0}


def _quality(peers: list[dict[str, Any]]) -> dict[str, Any]:
    """The worst figures among an area's peers (what an operator must look at)."""
    if not peers:
        return dict(NO_QUALITY)

    def worst(name: str) -> float | None:
        vals = [float(p[name]) for p in peers if p.get(name) is not None]
        return max(vals) if vals else None

    return {"peers": len(peers), "rtt_ms_max": worst("rtt_ms"),
            "jitter_ms_max": worst("jitter_ms"), "fraction_lost_max": worst("fraction_lost"),
            "packets_lost": sum(int(p.get("packets_lost") or 0) for p in peers)}


def _on_air(node: Node, code: str) -> dict[str, Any] | None:
    try:
        return dict(node.engine.on_air(code))
    except KeyError:  # an area just added to the tree, not yet in the engine
        return None


def _subtree_totals(tree: AreaTree, scope: str, c: Collected, listed: set[str]
                    ) -> dict[str, list[int]]:
    """The counts (TOTAL_KEYS) of each listed area's whole subtree: what a district row sums."""
    out: dict[str, list[int]] = {}
    up: dict[str | None, list[list[int]]] = {}  # parent -> totals of its listed ancestors

    def targets(code: str | None) -> list[list[int]]:
        t = up.get(code)
        if t is None:
            t = []
            cur = code
            while cur is not None:
                if cur in listed:
                    t.append(out.setdefault(cur, [0] * len(TOTAL_KEYS)))
                if cur == scope:
                    break
                cur = tree.get(cur).parent
            up[code] = t
        return t

    for code, add in c.counts.items():
        for t in targets(code):
            for i, v in enumerate(add):
                t[i] += v
    return out


def active_alerts(node: Any, scope: str) -> list[dict[str, Any]]:
    """The node's active alerts about areas of `scope`'s subtree, oldest first."""
    tree = node.tree
    out = [{"kind": a.kind, "subject": a.subject, "area": a.area, "severity": a.severity,
            "text": a.text, "since": round(a.since, 3), "detail": a.detail}
           for a in node.alerts.active.values()
           if a.area in tree and tree.contains(scope, a.area)]
    return sorted(out, key=lambda a: a["since"])


async def monitor_json(app: web.Application, scope: str, depth: int | None = None,
                       root: str | None = None) -> dict[str, Any]:
    """The monitor document for the subtree of `scope`, down to `depth` levels below it;
    `path` names the areas from `root` (the caller's area) down to `scope`."""
    node = app[NODE]
    tree = node.tree
    path: list[dict[str, str]] = []
    for code in tree.ancestors(scope):
        path.append({"code": code, "name": tree.get(code).name})
        if code == root:
            break
    path.reverse()
    everything = tree.subtree(scope)
    codes = everything
    if depth is not None:
        top = tree.depth(scope)
        codes = [c for c in everything if tree.get(c).depth - top <= depth]
    listed = set(codes)
    collected = await collect(app, set(everything) if depth is not None else listed, listed)
    peers = await peer_figures(app, listed)
    totals = _subtree_totals(tree, scope, collected, listed)
    await asyncio.sleep(0)
    changes = last_changes(node, listed)
    records: dict[str, dict[str, Any]] = {}  # the broadcasts' records, read once each
    areas = []
    for i, code in enumerate(codes):
        if i and not i % CHUNK:
            await asyncio.sleep(0)  # a province of thousands of areas: let the loop serve
        a = tree.get(code)
        f = collected.detail.get(code, EMPTY)
        oa = _on_air(node, code) or {}
        bid = oa.get("broadcast")
        why: dict[str, Any] | None = None
        if bid:
            issuer = oa.get("issuer")
            if bid not in records:
                records[str(bid)] = await node.store.get("broadcast", str(bid)) or {}
            rec = records[str(bid)]
            iss = tree.get(str(issuer)) if issuer and issuer in tree else None
            since = float(oa.get("since") or 0.0)
            why = {
                "broadcast": bid, "title": oa.get("title"), "class": oa.get("class"),
                "issuer": issuer, "authority": {
                    "code": issuer, "name": iss.name if iss else None,
                    "level": iss.level if iss else None, "depth": iss.depth if iss else None},
                "user": rec.get("user"), "overlays": oa.get("overlays", []),
                "since": since, "since_epoch": round(node.station.wall(round(since * 48_000)), 3),
                # heard here because an area above issued it (not this area or one below)
                "inherited": issuer is not None and issuer != code
                and not tree.contains(code, str(issuer)),
            }
        peer_list = peers.get(code, [])
        listeners = collected.listeners(code)
        listeners["total"] = sum(v for v in listeners.values() if v)
        sub = totals.get(code, ZERO)
        areas.append({
            "code": code, "name": a.name, "level": a.level, "parent": a.parent,
            "children": len(a.children),
            "on_air": why,
            "last_change": changes.get(code),
            "listeners": listeners,
            "subtree": {"listeners": {"http": sub[HTTP_I], "rtp": sub[RTP_I],
                                      "webrtc": sub[WEBRTC_I]},
                        "devices": dict(zip(DEVICE_STATUSES, sub[DEV_I:], strict=True))},
            "http": f.http, "channels": f.channels,
            "packets": sum(int(c["packets"]) for c in f.channels),
            "bytes_per_s": round(sum(float(c["bytes_per_s"] or 0) for c in f.channels), 1),
            "rtp": f.rtp, "rtp_multicast": f.rtp_multicast,
            "webrtc": peer_list, "quality": _quality(peer_list),
            "hls": f.hls, "devices": collected.device_counts(code),
        })
    return {
        "scope": scope,
        "depth": depth,
        "path": path,
        "time": round(time.time(), 3),
        "node": {
            "uptime_s": round(time.time() - node.started, 1),
            "store": node.store_state(),
            "clock": clock_figures(node),
            "loop": {k: round(v, 3) for k, v in node.lag.as_dict().items()},
            "engine": engine_figures(node),
            "devices": collected.devices,  # over the whole subtree of the scope
            "transports": transport_figures(app, collected),
            # What needs a person now (streamer/alerts.py): those about this subtree.
            "alerts": active_alerts(node, scope),
            "links": {"children": node.links.stats(),  # issue 12: the links between nodes
                      "refused": list(node.links.refusals),  # the latest refusals (loop ...)
                      "upstream": node.upstream.stats() if node.upstream else None,
                      "uplink": node.uplink.stats() if node.uplink else None,
                      "reports": node.uplink_in.counts,
                      # the TT 39 inbox over the link: received, refused, reported up
                      "bulletins": dict(node.parent_bulletins.counts)
                      if node.parent_bulletins else None},
        },
        "areas": areas,
    }


# ---- Prometheus exposition ----------------------------------------------------------------------
def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _number(v: float | int | bool | None) -> str:
    if v is None:
        return "NaN"
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


Sample = tuple[dict[str, str], float | int | bool | None]


class Exposition:
    """Prometheus text format 0.0.4: HELP and TYPE once per family, then its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._labels: dict[tuple[str, str], str] = {}

    def head(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def label(self, key: str, value: str) -> str:
        """`key="value"`, escaped once per scrape (area codes repeat in many families)."""
        out = self._labels.get((key, value))
        if out is None:
            out = self._labels[(key, value)] = f'{key}="{_escape(value)}"'
        return out

    def add(self, name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> None:
        self.head(name, kind, help_text)
        for labels, value in samples:
            if labels:
                lab = ",".join(self.label(k, v) for k, v in labels.items())
                self.lines.append(f"{name}{{{lab}}} {_number(value)}")
            else:
                self.lines.append(f"{name} {_number(value)}")

    def rows(self, name: str, kind: str, help_text: str,
             samples: Iterable[tuple[str, float | int | None]]) -> None:
        """Samples whose label text is built already (`a="x",b="y"`, escaped)."""
        self.head(name, kind, help_text)
        lines = self.lines
        for lab, value in samples:
            lines.append(f"{name}{{{lab}}} {value if type(value) is int else _number(value)}")

    def one(self, name: str, kind: str, help_text: str, value: float | int | None) -> None:
        self.add(name, kind, help_text, [({}, value)])

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


@dataclass
class MetricsSnapshot:
    """Everything /metrics shows, copied on the event loop; formatted in a worker thread."""

    node: Node
    collected: Collected
    uptime: float
    clock: dict[str, Any]
    lag: dict[str, float]
    engine: dict[str, Any]
    transports: dict[str, Any]
    areas: list[str]
    device_events: dict[str, int] | None
    upstream: dict[str, Any] | None = None  # the link to this node's parent, if any
    children: int = 0  # child nodes linked to this node
    alerts: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, severity) -> n
    uplink: dict[str, Any] | None = None  # reports queued for the parent, if any
    reports: dict[str, int] | None = None  # reports taken from (or refused to) the children


async def metrics_snapshot(app: web.Application) -> MetricsSnapshot:
    node = app[NODE]
    c = await collect(app, None, None)
    mgr = node.devices
    return MetricsSnapshot(
        node=node, collected=c, uptime=time.time() - node.started, clock=clock_figures(node),
        lag=node.lag.as_dict(), engine=engine_figures(node),
        transports=transport_figures(app, c), areas=[a.code for a in list(node.tree)],
        device_events=dict(mgr.stats) if mgr is not None else None,
        upstream=node.upstream.stats() if node.upstream else None, children=len(node.links.feeds),
        alerts=dict(Counter((a.kind, a.severity) for a in node.alerts.active.values())),
        uplink=node.uplink.stats() if node.uplink else None, reports=dict(node.uplink_in.counts))


async def metrics_text(app: web.Application) -> str:
    """The exposition: figures copied on the loop, text built in a worker thread (a province of
    thousands of areas makes tens of thousands of lines; the loop keeps serving meanwhile)."""
    return await asyncio.to_thread(format_metrics, await metrics_snapshot(app))


def format_metrics(snap: MetricsSnapshot) -> str:
    node = snap.node
    c = snap.collected
    e = Exposition()
    e.one("loa_uptime_seconds", "gauge", "Seconds since the node started.", snap.uptime)

    clock = snap.clock
    e.one("loa_clock_realtime", "gauge", "1 when the media clock is the real clock.",
          int(bool(clock["realtime"])))
    e.one("loa_clock_ticks_total", "counter", "Media clock ticks (20 ms each).", clock["ticks"])
    e.one("loa_clock_late_ticks_total", "counter", "Ticks that started late (over 5 ms).",
          clock["late_ticks"])
    e.one("loa_clock_skipped_ticks_total", "counter",
          "Ticks given up after a stall longer than the catch-up limit.", clock["skipped_ticks"])
    e.one("loa_clock_lateness_max_seconds", "gauge", "Largest tick lateness since start.",
          float(clock["max_lateness_ms"]) / 1000)
    e.one("loa_clock_lateness_last_seconds", "gauge", "Lateness of the last tick.",
          float(clock["last_lateness_ms"]) / 1000)
    lag = snap.lag
    e.one("loa_loop_lag_seconds", "gauge", "Event loop lag, last measurement.",
          lag["loop_lag_ms"] / 1000)
    e.one("loa_loop_lag_max_seconds", "gauge", "Largest event loop lag since start.",
          lag["loop_lag_max_ms"] / 1000)

    eng = snap.engine
    e.one("loa_engine_ticks_total", "counter", "Ticks rendered by the engine.", eng["ticks"])
    e.one("loa_engine_mix_renders_total", "counter", "Mix renders.", eng["mix_renders"])
    e.one("loa_engine_encodes_total", "counter", "Encoder calls (one per mix, codec, tick).",
          eng["encodes"])
    e.one("loa_engine_source_errors_total", "counter", "Source read failures.",
          eng["source_errors"])
    e.one("loa_mixes", "gauge", "Distinct compositions (mixes).", eng["mixes"])
    e.one("loa_mixes_consumed", "gauge", "Mixes somebody listens to (rendered each tick).",
          eng["mixes_consumed"])
    e.one("loa_encoders", "gauge", "Open encoders (mix x codec).", eng["encoders"])
    e.add("loa_broadcasts_on_air", "gauge", "Broadcasts on air, by class.",
          [({"class": k}, n) for k, n in eng["broadcasts_on_air"].items()])
    on_air: dict[str, str] = {}
    for code in snap.areas:
        oa = _on_air(node, code)
        if oa and oa.get("class"):
            on_air[code] = str(oa["class"])

    def area(code: str) -> str:
        return e.label("area", code)

    e.rows("loa_area_on_air", "gauge",
           "1 for an area with a programme on air, labelled with its class.",
           ((f'{area(code)},{e.label("class", k)}', 1) for code, k in on_air.items()))

    chans = [(f'{area(code)},{e.label("codec", str(ch["codec"]))}', ch)
             for code in sorted(c.detail) for ch in c.detail[code].channels]
    for name, kind, key, text in (
            ("loa_channel_subscribers", "gauge", "subscribers",
             "Hub subscriptions of an area's stream in a codec (one per transport)."),
            ("loa_channel_packets_total", "counter", "packets",
             "Packets sent to an area's stream in a codec."),
            ("loa_channel_bytes_total", "counter", "bytes",
             "Payload bytes sent to an area's stream in a codec.")):
        e.rows(name, kind, text, ((lab, ch[key]) for lab, ch in chans))

    # Per area listener series for areas with a hub channel (listened to once) or a listener.
    active = sorted({code for code, f in c.detail.items() if f.channels or f.http or f.rtp}
                    | {code for code, n in c.counts.items() if any(n[:DEV_I])})
    transport = {t: e.label("transport", t) for t in TRANSPORTS}
    listeners: list[tuple[str, int | None]] = []
    for code in active:
        for t, n in c.listeners(code).items():
            if n is not None:
                listeners.append((f"{area(code)},{transport[t]}", n))
    e.rows("loa_listeners", "gauge",
           "Listeners of an area per transport (http, rtp unicast receivers, webrtc peers).",
           listeners)

    rtp = [(f'{area(code)},{e.label("codec", str(s["codec"]))}', s)
           for code in sorted(c.detail) for s in c.detail[code].rtp]
    e.rows("loa_rtp_receivers", "gauge", "Unicast receivers of an area's RTP stream.",
           ((lab, s["receivers"]) for lab, s in rtp))
    e.rows("loa_rtp_packets_total", "counter", "RTP packets sent per stream.",
           ((lab, s["packets"]) for lab, s in rtp))
    e.rows("loa_rtp_octets_total", "counter", "RTP payload octets sent per stream.",
           ((lab, s["octets"]) for lab, s in rtp))
    e.rows("loa_rtp_reporting_receivers", "gauge",
           "Receivers that sent RTCP receiver reports about an area's RTP stream.",
           ((lab, len(s["reports"])) for lab, s in rtp))
    e.rows("loa_rtp_receiver_loss_max", "gauge",
           "Highest loss fraction reported by a receiver of an area's RTP stream (RTCP RR).",
           ((lab, max((r["fraction_lost"] for r in s["reports"]), default=0.0))
            for lab, s in rtp))
    e.rows("loa_rtp_receiver_jitter_ms_max", "gauge",
           "Highest interarrival jitter reported by a receiver of an area's RTP stream (ms).",
           ((lab, max((r["jitter_ms"] for r in s["reports"]), default=0.0)) for lab, s in rtp))
    tr = snap.transports
    for name, key, text in (("loa_rtp_send_errors_total", "errors", "Failed RTP sends."),
                            ("loa_rtp_dropped_total", "dropped",
                             "RTP packets dropped (sender thread too far behind)."),
                            ("loa_rtp_blocked_total", "blocked",
                             "RTP packet copies not sent: send buffer full."),
                            ("loa_rtcp_reports_total", "rtcp_reports",
                             "RTCP report blocks received about this node's RTP streams."),
                            ("loa_rtcp_malformed_total", "rtcp_malformed",
                             "RTCP packets received that could not be parsed.")):
        e.one(name, "counter", text, int(tr["rtp"].get(key) or 0))
    e.one("loa_http_listeners", "gauge", "HTTP stream listeners (all areas).",
          tr["http"]["listeners"])
    e.one("loa_http_dropped_total", "counter", "HTTP listeners dropped (not reading).",
          tr["http"]["dropped"])
    e.one("loa_http_rejected_total", "counter", "HTTP listeners refused by a limit.",
          tr["http"]["rejected"])
    e.one("loa_webrtc_peers", "gauge", "WHEP listeners connected or negotiating.",
          tr["webrtc"]["peers"])
    e.one("loa_webrtc_inputs", "gauge", "WHIP live inputs.", tr["webrtc"]["inputs"])
    e.add("loa_webrtc_sessions_total", "counter", "WebRTC sessions opened or refused.",
          [({"event": k}, v) for k, v in tr["webrtc"].items() if k not in ("peers", "inputs")])
    e.one("loa_hls_segmenters", "gauge", "Areas with an HLS segmenter running.",
          tr["hls"]["segmenters"])

    dev = c.devices
    e.add("loa_devices", "gauge", "Registered devices by status.",
          [({"status": k}, dev[k]) for k in DEVICE_STATUSES])
    e.one("loa_devices_connected", "gauge", "Devices with an open control connection.",
          dev["connected"])
    status = [e.label("status", k) for k in DEVICE_STATUSES]
    e.rows("loa_area_devices", "gauge", "Devices of an area by status (areas with devices).",
           ((f"{area(code)},{status[i]}", n[DEV_I + i]) for code, n in sorted(c.counts.items())
            if any(n[DEV_I:]) for i in range(len(DEVICE_STATUSES))))
    if snap.device_events is not None:
        e.add("loa_device_events_total", "counter", "Device control channel events.",
              [({"event": k}, v) for k, v in snap.device_events.items()])
    e.one("loa_link_children", "gauge", "Child nodes linked to this node.", snap.children)
    e.add("loa_alerts_active", "gauge", "Active alerts (things that need a person) by kind.",
          [({"kind": k, "severity": s}, n) for (k, s), n in sorted(snap.alerts.items())])
    up = snap.upstream
    if up is not None:
        e.one("loa_upstream_up", "gauge", "1 while the link to the parent node is up.",
              int(up["state"] == "up"))
        e.add("loa_upstream_total", "counter", "The parent link's frames and refusals.",
              [({"event": k}, up[k]) for k in ("connects", "started", "stopped", "frames",
                                               "late", "concealed", "bad_frames", "bad_events")])
    if snap.uplink is not None:
        e.one("loa_uplink_queued", "gauge", "Reports queued for the parent node, not yet acked.",
              snap.uplink["queued_now"])
        e.add("loa_uplink_total", "counter", "Reports to the parent node by event.",
              [({"event": k}, snap.uplink[k]) for k in ("queued", "sent", "acked", "refused",
                                                        "dropped", "retries")])
    if snap.reports:
        e.add("loa_uplink_received_total", "counter",
              "Reports from child nodes by type (refused: outside the child's area or invalid).",
              [({"type": k}, v) for k, v in snap.reports.items()])
    return e.text()


# ---- handlers -----------------------------------------------------------------------------------
async def monitor_handler(request: web.Request) -> web.StreamResponse:
    p = principal(request)
    p.require("read")
    node = request.app[NODE]
    scope = request.query.get("area") or p.area
    scoped_area(p, node.tree, scope, missing=404)
    depth: int | None = None
    raw = request.query.get("depth")
    if raw:
        depth = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 3 else -1
        if not 0 <= depth <= MAX_DEPTH:
            raise ApiError(422, say("monitor.bad_depth", limit=MAX_DEPTH), "depth")
    return await send_json(request, await monitor_json(request.app, scope, depth, p.area))


async def send_json(request: web.Request, doc: dict[str, Any]) -> web.StreamResponse:
    """The document; a long `areas` list is encoded and sent in chunks so that one request
    never holds the event loop for the whole encoding (5,000 areas are ~5 MB)."""
    areas: list[Any] = doc["areas"]
    if len(areas) <= CHUNK:
        return ok(doc)
    resp = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    try:
        head = json.dumps({k: v for k, v in doc.items() if k != "areas"}, ensure_ascii=False)
        await resp.write((head[:-1] + ', "areas": [').encode())
        for i in range(0, len(areas), CHUNK):
            part = json.dumps(areas[i:i + CHUNK], ensure_ascii=False)[1:-1]
            await resp.write(((", " if i else "") + part).encode())
            await asyncio.sleep(0)  # write() only waits when the socket is full
        await resp.write(b"]}")
        await resp.write_eof()
    except ConnectionError:  # the client went away: nothing more to do
        log.debug("monitor client left event=monitor_client_gone")
    return resp


async def metrics_handler(request: web.Request) -> web.Response:
    return web.Response(text=await metrics_text(request.app), headers={
        "Content-Type": METRICS_TYPE, "Cache-Control": "no-cache"})


async def page_handler(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "monitor.html", headers={
        "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-cache"})


async def asset_handler(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    ctype = PAGE_FILES.get(name)
    if ctype is None:
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC / name, headers={
        "Content-Type": f"{ctype}; charset=utf-8", "Cache-Control": "no-cache"})


def openapi_paths() -> dict[str, Any]:
    """The OpenAPI entry of GET /api/v1/monitor (merged by web/openapi.py)."""

    return {
        "/api/v1/monitor": {
            "get": {
                "summary": say("openapi.monitor"),
                "security": [{"bearer": []}],
                "parameters": [
                    {"name": "area", "in": "query", "schema": CODE,
                     "description": "an area inside the caller's subtree (default: the "
                                    "caller's area)"},
                    {"name": "depth", "in": "query",
                     "schema": {"type": "integer", "minimum": 0, "maximum": 32},
                     "description": "levels below the area to list (default: all); each "
                                    "listed area also sums its whole subtree"}],
                "responses": responses(200, 401, 403, 404, 422),
            },
        },
    }


def setup(app: web.Application) -> None:
    """Register routes. The node is app[NODE] (started)."""
    node = app[NODE]
    clock: Callable[[], float]
    if node.realtime:
        clock = time.monotonic  # the loop's clock
    else:
        # Virtual clock: rates per media second, sampled when asked (exact in tests).
        def clock() -> float:
            return node.engine.stats["ticks"] * TICK

    sampler = RateSampler(node.hub, clock)
    app[SAMPLER] = sampler

    async def start(_app: web.Application) -> None:
        if node.realtime:
            sampler.start()

    async def stop(_app: web.Application) -> None:
        await sampler.stop()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    r = app.router
    r.add_get("/api/v1/monitor", monitor_handler)
    r.add_get("/metrics", metrics_handler)
    r.add_get("/monitor", page_handler)
    r.add_get("/monitor/{name}", asset_handler)
