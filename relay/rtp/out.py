"""RTP out: one multicast group per area and codec, unicast receivers, RTCP, SDP, SAP.

Streams. Every area has one stream per configured codec. A stream is one UDP socket, one random
SSRC, a continuous sequence number and an RTP timestamp taken from the packets' media pts (which
the engine keeps continuous when the area moves between compositions) plus a random offset, so a
preemption upstream is invisible to a receiver: same SSRC, next sequence number, next timestamp.
Payload formats: loa.codecs.rtp_payload (MP3 frames larger than `max_payload` are fragmented).
Groups: loa.relay.rtp.groups (a block of groups per area, stable and unique per deployment); a
group another origin announces over SAP is logged (`event=rtp_group_collision`).

Sending. Hub deliveries arrive on the event loop; the loop only queues them. One sender thread
builds each RTP packet once per stream in a fixed buffer and sends it to every destination (the
multicast group, then the unicast receivers) with a single `sendmmsg(2)` per packet where libc has
it (ctypes; the call releases the GIL), else a `sendto` loop. The destination table is rebuilt
only when receivers change. A failed send to one destination (unreachable, refused) is counted
against that destination and skipped; it never stops the stream or the other destinations. A full
send buffer ends that packet's fan-out (counted as `blocked`). Packets that waited longer than
`max_delay_ms` for a starved sender thread are dropped (counted), so the stream stays live. ICMP errors are not read (`IP_RECVERR` stays off), so a dead receiver cannot make a
send to a live one fail.

RTCP. A sender report goes to the group's `port + 1` and to every receiver's `port + 1` right
after the stream's first packet, then every second for the first `FAST_REPORTS` reports and every
`rtcp_interval` seconds after that (a device that joins needs one SR to synchronise its playout:
it should not wait 5 s for it; one ~70-byte SR a second is under 1 kbit/s, within RFC 3550's 5 %
of even the 32 kbit/s streams), and again at once (at most every `SR_MIN_GAP`) with the fast
series restarted when a unicast receiver joins or a new receiver's first report arrives (a
multicast listener is known only from its reports), always right after a data packet: its RTP timestamp is that packet's, and its NTP timestamp is the wall-clock time of the
packet's media position (`wall(sample)`, the engine's media epoch mapping), plus packet and octet
counts and an SDES CNAME. A BYE goes out when the stream stops.

Receiver reports. One socket per node listens on `port + 1` (every address), receiving the
RTCP that devices send to a group's `port + 1` (multicast: the node joins every group it sends,
through membership-only sockets of 20 groups each, Linux's per-socket limit, which the listener
receives through `IP_MULTICAST_ALL`) or to the node's own address (unicast). Report blocks of RRs
and SRs about one of our SSRCs update that stream's per-receiver figures (`reports`: fraction
lost, cumulative lost, jitter in ms, last seen), at most `max_receivers` per stream, forgotten
after `REPORT_TTL` s of silence. A malformed packet is counted (`rtcp_malformed`) and ignored.

SAP (RFC 2974, only when `sap` is on): each multicast stream's SDP, named after the area and the
codec ("Xã Phú Thuận (Opus)", "... (PCMU)": a player lists an area's streams apart), is announced to
`sap_address:sap_port` with the session TTL, one stream at a time spread over `sap_interval`
(stretched so all announcements together stay under `sap_bandwidth`, 4 kbit/s), and deleted at
stop.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import ipaddress
import logging
import random
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from typing import Any

from loa.codecs.encoders import Packet
from loa.codecs.rtp_payload import FORMATS, PayloadFormat
from loa.relay.rtp import sendmmsg
from loa.relay.rtp.groups import (
    AUTO_BASE,
    AUTO_SPAN,
    BLOCK,
    STATE_FILE,
    GroupAllocator,
    PoolExhausted,
    node_pool,
)
from loa.relay.rtp.sap import parse_sap, sap_packet
from loa.relay.rtp.sdp import RtpMap, parse_session, rtp_audio_session
from loa.relay.rtp.wire import (
    HEADER_SIZE,
    ReportBlock,
    bye_packet,
    pack_rtp_header_into,
    parse_receiver_reports,
    sender_report,
)
from loa.streamer.areas import AreaTree
from loa.streamer.emergency.service import node_identity
from loa.streamer.errors import LoaError
from loa.streamer.hub import PacketHub, Subscription
from loa.streamer.messages import say
from loa.streamer.state.store import Store

log = logging.getLogger("loa.rtp")

MEDIA_RATE = 48_000  # the engine's sample clock (wall() takes 48 kHz samples)
REFRESH_SECONDS = 2.0  # how often new areas in the tree get their streams
MAX_QUEUED_TICKS = 50  # a stream whose sender is this far behind (1 s) drops new packets
ERROR_LOG_SECONDS = 10.0
COLLISION_LOG_SECONDS = 600.0  # one collision is logged again at most this often
SR_MIN_GAP = 0.5  # a new receiver triggers an early sender report, at most this often
REPORT_TTL = 60.0  # a receiver that has not reported for this long is dropped from `reports`
MAX_MEMBERSHIPS = 20  # multicast groups per socket (Linux net.ipv4.igmp_max_memberships)
FAST_REPORTS = 4  # sender reports at FAST_INTERVAL after a start or a join, then rtcp_interval
FAST_INTERVAL = 1.0


class RtpConfigError(LoaError, ValueError):
    """The [rtp] settings cannot work (bad group, port, interface, codec ...)."""

    kind = "invalid"


@dataclass
class RtpSettings:
    enabled: bool = False  # multicast is planned per network: switch it on deliberately
    group_base: str = ""  # groups are allocated from here ("": a pool of this node's, see above)
    port: int = 5004  # every group uses this port (RTCP: port + 1)
    ttl: int = 16  # 0 keeps packets on this host (tests, demo)
    interface: str = ""  # address of the interface multicast leaves by; "" = the default route
    dscp: int = 46  # EF
    codecs: str = "opus,pcmu"
    sap: bool = False
    rtcp_interval: float = 5.0
    multicast: bool = True  # off: only registered unicast receivers get packets
    pool_size: int = 4096  # groups from group_base (4 per area: 1024 areas)
    sap_address: str = "224.2.127.254"
    sap_port: int = 9875
    sap_interval: float = 30.0  # each stream is announced this often (at least)
    sap_bandwidth: int = 4000  # bit/s for all announcements together (RFC 2974 default)
    max_receivers: int = 20_000  # unicast receivers per stream
    max_payload: int = 1200  # bytes of RTP payload per packet (MP3 frames above are fragmented)
    sndbuf_kb: int = 2048  # socket send buffer per stream
    sendmmsg: bool = True  # one system call per packet for all destinations (Linux)
    max_delay_ms: int = 500  # packets that waited longer for the sender are dropped, not sent


# ---- settings ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckedSettings:
    base: ipaddress.IPv4Address  # AUTO_BASE while `auto` (the pool is chosen at start)
    blocks: int
    codecs: tuple[str, ...]
    interface: str
    sap_group: ipaddress.IPv4Address
    auto: bool = False


def check_settings(s: RtpSettings) -> CheckedSettings:
    """Validate [rtp]; `RtpConfigError` names the key and says what is expected."""
    auto = not s.group_base.strip()
    if auto and not BLOCK <= s.pool_size <= AUTO_SPAN:
        raise RtpConfigError(say("rtp_config.pool_size_auto", low=BLOCK, high=AUTO_SPAN))
    try:
        base = AUTO_BASE if auto else ipaddress.IPv4Address(s.group_base.strip())
    except ValueError:
        raise RtpConfigError(say("rtp_config.bad_address", setting="group_base",
                                 value=s.group_base)) from None
    if not base.is_multicast:
        raise RtpConfigError(say("rtp_config.not_multicast", setting="group_base", address=base))
    if s.pool_size < BLOCK:
        raise RtpConfigError(say("rtp_config.pool_size_min", low=BLOCK))
    last = int(base) + s.pool_size - 1
    if last > int(ipaddress.IPv4Address("239.255.255.255")):
        raise RtpConfigError(say("rtp_config.past_multicast_range", base=base, size=s.pool_size))
    if int(base) < int(ipaddress.IPv4Address("224.0.1.0")):
        raise RtpConfigError(say("rtp_config.control_block", base=base))
    if not 1 <= s.port <= 65534:
        raise RtpConfigError(say("rtp_config.port", value=s.port))
    if not 0 <= s.ttl <= 255:
        raise RtpConfigError(say("rtp_config.out_of_range", setting="ttl", low=0, high=255,
                                 value=s.ttl))
    if not 0 <= s.dscp <= 63:
        raise RtpConfigError(say("rtp_config.out_of_range", setting="dscp", low=0, high=63,
                                 value=s.dscp))
    codecs = tuple(c.strip().lower() for c in s.codecs.split(",") if c.strip())
    unknown = [c for c in codecs if c not in FORMATS]
    if not codecs or unknown or len(set(codecs)) != len(codecs):
        raise RtpConfigError(say("rtp_config.codecs", formats=", ".join(FORMATS),
                                 value=s.codecs))
    iface = s.interface.strip()
    if iface:
        try:
            ipaddress.IPv4Address(iface)
        except ValueError:
            raise RtpConfigError(say("rtp_config.interface", value=s.interface)) from None
    if not s.rtcp_interval > 0:
        raise RtpConfigError(say("rtp_config.positive", setting="rtcp_interval"))
    if not s.sap_interval > 0:
        raise RtpConfigError(say("rtp_config.positive", setting="sap_interval"))
    try:
        sap_group = ipaddress.IPv4Address(s.sap_address.strip())
    except ValueError:
        raise RtpConfigError(say("rtp_config.bad_address", setting="sap_address",
                                 value=s.sap_address)) from None
    if not sap_group.is_multicast:
        raise RtpConfigError(say("rtp_config.not_multicast", setting="sap_address",
                                 address=sap_group))
    if not 1 <= s.sap_port <= 65535:
        raise RtpConfigError(say("rtp_config.out_of_range", setting="sap_port", low=1, high=65535,
                                 value=s.sap_port))
    if s.sap_bandwidth < 100:
        raise RtpConfigError(say("rtp_config.sap_bandwidth"))
    if not 1 <= s.max_receivers <= 1_000_000:
        raise RtpConfigError(say("rtp_config.out_of_range", setting="max_receivers", low=1,
                                 high=1_000_000, value=s.max_receivers))
    if not 20 <= s.max_delay_ms <= 10_000:
        raise RtpConfigError(say("rtp_config.out_of_range", setting="max_delay_ms", low=20,
                                 high=10_000, value=s.max_delay_ms))
    if not 100 <= s.max_payload <= 8000:
        raise RtpConfigError(say("rtp_config.max_payload"))
    return CheckedSettings(base, s.pool_size // BLOCK, codecs, iface, sap_group, auto)


class ReceiverReport:
    """What one receiver (by its SSRC) last reported about one stream."""

    __slots__ = ("ssrc", "host", "port", "fraction_lost", "lost", "highest_seq", "jitter_ms",
                 "last_seen", "reports")

    def __init__(self, ssrc: int, host: str, port: int) -> None:
        self.ssrc = ssrc
        self.host = host
        self.port = port
        self.fraction_lost = 0.0
        self.lost = 0
        self.highest_seq = 0
        self.jitter_ms = 0.0
        self.last_seen = 0.0
        self.reports = 0

    def as_dict(self) -> dict[str, Any]:
        return {"ssrc": self.ssrc, "host": self.host, "port": self.port,
                "fraction_lost": round(self.fraction_lost, 4), "lost": self.lost,
                "highest_seq": self.highest_seq, "jitter_ms": round(self.jitter_ms, 2),
                "last_seen": round(self.last_seen, 3), "reports": self.reports}


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, handle: Callable[[bytes, tuple[str | Any, int]], None]) -> None:
        self.handle = handle

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.handle(data, addr)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---- streams ----------------------------------------------------------------------------------
class Receiver:
    __slots__ = ("host", "port", "errors", "last_errno", "added")

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.errors = 0
        self.last_errno = 0
        self.added = time.time()

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "errors": self.errors,
                "last_error": errno.errorcode.get(self.last_errno, "") if self.last_errno else ""}


class _GroupDest(Receiver):
    """The multicast group as a destination (so its errors are counted the same way)."""


class RtpStream:
    """One area in one codec: socket, SSRC, sequence, timestamps, destinations, counters."""

    def __init__(self, out: RtpOut, area: str, fmt: PayloadFormat, group: str) -> None:
        self.out = out
        self.area = area
        self.codec = fmt.codec
        self.fmt = fmt
        self.group = group
        self.port = out.settings.port
        rnd = random.SystemRandom()
        self.ssrc = rnd.getrandbits(32)
        self.seq = rnd.getrandbits(16)
        self.ts_offset = rnd.getrandbits(32)
        self.receivers: dict[tuple[str, int], Receiver] = {}
        self.lock = threading.Lock()
        self.version = 0  # bumped (under lock) whenever receivers change
        self.sub: Subscription | None = None
        self.sock: socket.socket | None = None
        # sender thread state
        self.packets = 0
        self.octets = 0
        self.errors = 0
        self.dropped = 0  # packets not sent at all (sender too far behind: max_delay_ms)
        self.blocked = 0  # packet copies not sent: the socket's send buffer was full
        self.first = True
        self.next_sr = 0.0  # on out.clock
        self.last_sr = 0.0
        self.fast = FAST_REPORTS  # sender reports left at the fast interval
        self.last_ts: int | None = None
        self.last_sample = 0
        self.fanout_ms_max = 0.0
        self._built = -1
        self._dests: list[Receiver] = []
        self._addrs: list[tuple[str, int]] = []
        self._table: sendmmsg.DestTable | None = None
        self._buf = ctypes.create_string_buffer(out.settings.max_payload + 16)
        self._view = memoryview(self._buf).cast("B")
        self._iov = sendmmsg.Iovec(ctypes.addressof(self._buf), 0)
        self._last_error_log = 0.0
        self._queued = 0  # loop side
        self._done = 0  # sender side
        self.group_dest = _GroupDest(group, self.port)
        self.reports: dict[int, ReceiverReport] = {}  # by reporter SSRC (loop side)

    # ---- loop side ----
    def open(self) -> None:
        s = self.out.settings
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, s.ttl)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, s.dscp << 2)
            if self.out.checked.interface:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                                socket.inet_aton(self.out.checked.interface))
            _set_sndbuf(sock, s.sndbuf_kb * 1024)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # we never read
            sock.bind(("0.0.0.0", 0))
        except OSError:
            sock.close()
            raise
        self.sock = sock

    def wanted(self) -> bool:
        return self.out.settings.multicast or bool(self.receivers)

    def queue(self, packets: list[Packet]) -> None:
        if self._queued - self._done >= MAX_QUEUED_TICKS:
            self.dropped += len(packets)
            return
        self._queued += 1
        self.out._queue.put((self, packets, time.monotonic()))

    # ---- sender thread ----
    def _refresh(self) -> None:
        with self.lock:
            if self._built == self.version:
                return
            version = self.version
            dests: list[Receiver] = [self.group_dest] if self.out.settings.multicast else []
            dests += list(self.receivers.values())
        self._dests = dests
        self._addrs = [(d.host, d.port) for d in dests]
        self._table = (sendmmsg.DestTable(self._addrs, self._iov) if self.out.use_sendmmsg
                       else None)
        self._built = version

    def send(self, packets: list[Packet], queued_at: float) -> None:
        self._done += 1
        sock = self.sock
        if sock is None:
            return
        if time.monotonic() - queued_at > self.out.max_delay:
            # The sender fell behind (a starved CPU): stale audio would only fill receivers'
            # buffers late; skip it so the stream is live again at once. Sequence numbers stay
            # continuous, the timestamps show the gap.
            self.dropped += len(packets)
            return
        self._refresh()
        fmt = self.fmt
        view = self._view
        hdr_len = HEADER_SIZE + fmt.header_size
        room = self.out.settings.max_payload - fmt.header_size
        for p in packets:
            ts = (fmt.timestamp(p.pts, p.rate) + self.ts_offset) & 0xFFFFFFFF
            # one RTP packet, or several fragments of an oversized MP3 frame
            for offset, chunk in fmt.fragments(p.data, room):
                pack_rtp_header_into(view, self.first, fmt.pt, self.seq, ts, self.ssrc)
                fmt.pack_header_into(view, HEADER_SIZE, offset)
                n = hdr_len + len(chunk)
                view[hdr_len:n] = chunk
                self._fanout(sock, n)
                self.first = False
                self.seq = (self.seq + 1) & 0xFFFF
                self.packets += 1
                self.octets += n - HEADER_SIZE
            self.last_ts = ts
            self.last_sample = p.pts * MEDIA_RATE // p.rate
        self.fanout_ms_max = max(self.fanout_ms_max, (time.monotonic() - queued_at) * 1000)
        now = self.out.clock()
        if now >= self.next_sr and self.last_ts is not None:
            self._send_rtcp(self._report(), now)

    def _fanout(self, sock: socket.socket, length: int) -> None:
        table = self._table
        n = len(self._dests)
        if n == 0:
            return
        if table is None:
            view = self._view[:length]
            for i, addr in enumerate(self._addrs):
                try:
                    sock.sendto(view, addr)
                except OSError as e:
                    if e.errno in sendmmsg.BUFFER_FULL:
                        self.blocked += n - i
                        return
                    self._failed(i, e.errno or 0)
            return
        self._iov.len = length
        fd = sock.fileno()
        i = 0
        while i < n:
            sent = sendmmsg.SENDMMSG(fd, table.base + i * sendmmsg.MMSG_SIZE,
                                     min(sendmmsg.MAX_BATCH, n - i), sendmmsg.MSG_DONTWAIT)
            if sent > 0:
                i += sent
                continue
            err = ctypes.get_errno()
            try:  # the one that failed: once more on its own, then count it and move on
                sock.sendto(self._view[:length], self._addrs[i])
            except OSError as e:
                if e.errno in sendmmsg.BUFFER_FULL:  # the send buffer is full: this packet ends here
                    self.blocked += n - i
                    return
                self._failed(i, e.errno or err)
            i += 1

    def _failed(self, i: int, err: int) -> None:
        d = self._dests[i]
        d.errors += 1
        d.last_errno = err
        self.errors += 1
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_SECONDS:
            self._last_error_log = now
            log.warning("send failed event=rtp_send_error area=%s codec=%s dest=%s:%d errno=%s "
                        "errors=%d", self.area, self.codec, d.host, d.port,
                        errno.errorcode.get(err, err), self.errors)

    def _report(self, bye: bool = False) -> bytes:
        assert self.last_ts is not None
        ntp = self.out.wall(self.last_sample)
        make = bye_packet if bye else sender_report
        return make(self.ssrc, ntp, self.last_ts, self.packets, self.octets, self.out.cname)

    def _send_rtcp(self, packet: bytes, now: float) -> None:
        sock = self.sock
        if sock is None:
            return
        interval = self.out.settings.rtcp_interval
        if self.fast > 0:
            self.fast -= 1
            interval = min(interval, FAST_INTERVAL)
        self.last_sr = now
        self.next_sr = now + interval
        for d in self._dests:
            try:
                sock.sendto(packet, (d.host, d.port + 1))
            except OSError:
                pass  # RTCP is best effort; data-path errors are counted above

    def request_report(self) -> None:
        """A new receiver: send a sender report soon (not more often than SR_MIN_GAP), then a
        few more at the fast interval."""
        self.fast = FAST_REPORTS
        self.next_sr = min(self.next_sr, max(self.out.clock(), self.last_sr + SR_MIN_GAP))

    def restart_reports(self) -> None:
        """The stream (re)starts: a report right after its first packet, then the fast ones."""
        self.fast = FAST_REPORTS
        self.next_sr = 0.0

    def close(self) -> None:
        """Sender thread (or after it stopped): BYE, then close."""
        if self.sock is None:
            return
        if self.last_ts is not None:
            self._refresh()
            self._send_rtcp(self._report(bye=True), self.out.clock())
        self.sock.close()
        self.sock = None

    def stats(self) -> dict[str, Any]:
        return {"area": self.area, "codec": self.codec, "group": self.group, "port": self.port,
                "payload_type": self.fmt.pt, "clock": self.fmt.clock, "ssrc": self.ssrc,
                "ts_offset": self.ts_offset, "active": self.sub is not None,
                "packets": self.packets, "octets": self.octets,
                "receivers": len(self.receivers), "errors": self.errors,
                "dropped": self.dropped, "blocked": self.blocked,
                "fanout_ms_max": round(self.fanout_ms_max, 3),
                "reports": [r.as_dict() for r in self.reports.values()]}

    def report(self, reporter: int, block: ReportBlock, addr: tuple[str, int], now: float,
               limit: int) -> None:
        """A receiver report block about this stream (loop side)."""
        r = self.reports.get(reporter)
        if r is None:
            self.request_report()  # a new listener (a group's are known only from their RRs)
            if len(self.reports) >= limit:
                self.reports = {k: v for k, v in self.reports.items()
                                if now - v.last_seen < REPORT_TTL}
                if len(self.reports) >= limit:
                    return
            r = self.reports[reporter] = ReceiverReport(reporter, addr[0], addr[1])
        _, r.fraction_lost, r.lost, r.highest_seq, jitter = block
        r.jitter_ms = jitter * 1000 / self.fmt.clock
        r.host, r.port = addr[0], addr[1]
        r.last_seen = now
        r.reports += 1


def _set_sndbuf(sock: socket.socket, size: int) -> None:
    force = getattr(socket, "SO_SNDBUFFORCE", 32)
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)  # root: beyond wmem_max
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def _parse_host(host: str) -> str:
    try:
        ip = ipaddress.IPv4Address(host.strip())
    except ValueError:
        raise ValueError(say("rtp.receiver_bad_host", host=host)) from None
    if ip.is_unspecified or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(say("rtp.receiver_unusable", ip=ip))
    return str(ip)


# ---- the transport ----------------------------------------------------------------------------
class RtpOut:
    """RTP out for a node: streams per (area, codec), their receivers, RTCP and SAP."""

    def __init__(self, settings: RtpSettings, hub: PacketHub, tree: AreaTree,
                 wall: Callable[[int], float], *, state_dir: Path | None = None,
                 cname: str | None = None, store: Store | None = None,
                 node_id: str = "") -> None:
        self.settings = settings
        self.checked = check_settings(settings)
        self.hub = hub
        self.tree = tree
        self.wall = wall  # 48 kHz media sample -> Unix epoch seconds
        self.clock: Callable[[], float] = time.monotonic  # schedules RTCP (tests: a virtual one)
        self.codecs = self.checked.codecs
        self.alloc = GroupAllocator(self.checked.base, self.checked.blocks,
                                    state_dir / STATE_FILE if state_dir else None)
        self.state_dir = state_dir
        self.store = store  # the cluster's shared store: the allocation lives there
        self.node_id = node_id
        self._confirmed: set[str] = set()  # areas whose block the shared store holds
        self._sap_in: asyncio.DatagramTransport | None = None
        self.collisions = 0
        self._collision_logged: dict[tuple[str, int, str], float] = {}
        self.cname = cname or f"loa@{socket.gethostname()}"
        self.use_sendmmsg = bool(settings.sendmmsg and sendmmsg.SENDMMSG is not None)
        self.max_delay = settings.max_delay_ms / 1000
        self.streams: dict[tuple[str, str], RtpStream] = {}
        self.origin = self.checked.interface or "127.0.0.1"
        self._queue: SimpleQueue[tuple[RtpStream, list[Packet], float] | None] = SimpleQueue()
        self._thread: threading.Thread | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._sap_sock: socket.socket | None = None
        self._rtcp_in: asyncio.DatagramTransport | None = None
        self._members: list[socket.socket] = []  # membership-only sockets (MAX_MEMBERSHIPS each)
        self._joined: set[str] = set()
        self.by_ssrc: dict[int, RtpStream] = {}
        self.rtcp_reports = 0  # report blocks about our streams
        self.rtcp_malformed = 0  # RTCP packets that could not be parsed
        self._save_task: asyncio.Task[None] | None = None
        self.started = False

    # ---- lifecycle ----
    async def start(self) -> None:
        await asyncio.to_thread(self.alloc.load)
        if not self.node_id and self.state_dir is not None:
            self.node_id = await asyncio.to_thread(node_identity, self.state_dir)
        self._choose_base()
        if self.store is not None:
            self._confirmed = await self.alloc.claim(self.store, [a.code for a in self.tree])
        self.origin = await asyncio.to_thread(self._origin_address)
        self._check_interface()
        self._thread = threading.Thread(target=self._run, name="loa-rtp-send", daemon=True)
        self._thread.start()
        self.started = True
        await self._listen_rtcp()
        try:
            for area in list(self.tree):
                self.ensure_area(area.code)
        except Exception:
            await self.close()
            raise
        if self.alloc.dirty:
            await asyncio.to_thread(self.alloc.save)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._refresh_areas()))
        if self.settings.sap and self.settings.multicast:
            self._sap_sock = self._make_sap_socket()
            self._tasks.append(loop.create_task(self._announce()))
        if self.settings.multicast:
            await self._listen_sap()
        log.info("rtp out started event=rtp_start streams=%d codecs=%s multicast=%s "
                 "group_base=%s port=%d ttl=%d interface=%s sendmmsg=%s", len(self.streams),
                 ",".join(self.codecs), self.settings.multicast, self.alloc.base,
                 self.settings.port, self.settings.ttl, self.checked.interface or "default",
                 self.use_sendmmsg)

    async def close(self) -> None:
        if not self.started:
            return
        self.started = False
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        self._tasks.clear()
        if self._sap_sock is not None:
            for st in self._multicast_streams():
                try:
                    self._sap_sock.sendto(sap_packet(self.sdp(st.area, st.codec), self.origin,
                                                     delete=True),
                                          (self.settings.sap_address, self.settings.sap_port))
                except OSError:
                    pass
            self._sap_sock.close()
            self._sap_sock = None
        for tr in (self._rtcp_in, self._sap_in):
            if tr is not None:
                tr.close()
        self._rtcp_in = self._sap_in = None
        for m in self._members:
            m.close()
        self._members.clear()
        self._joined.clear()
        for st in self.streams.values():
            if st.sub is not None:
                st.sub.close()
                st.sub = None
        self._queue.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
            self._thread = None
        for st in self.streams.values():
            st.close()  # sender stopped: safe here; already closed ones are skipped
        if self._save_task is not None:
            await self._save_task
        if self.alloc.dirty:
            await asyncio.to_thread(self.alloc.save)
        log.info("rtp out stopped event=rtp_stop")

    def _run(self) -> None:
        q = self._queue
        while True:
            item = q.get()
            if item is None:
                break
            st, packets, queued_at = item
            try:
                st.send(packets, queued_at)
            except Exception:  # the sender must survive anything one stream does
                log.exception("rtp send failed event=rtp_sender_error area=%s codec=%s",
                              st.area, st.codec)
        for st in list(self.streams.values()):
            try:
                st.close()
            except Exception:
                log.exception("rtp close failed event=rtp_close_error area=%s", st.area)

    def _origin_address(self) -> str:
        """The address multicast leaves from (no packet is sent)."""
        if self.checked.interface:
            return self.checked.interface
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.connect((str(self.checked.base), self.settings.port))
            addr: str = s.getsockname()[0]
            return addr if addr != "0.0.0.0" else "127.0.0.1"
        except OSError:
            return "127.0.0.1"
        finally:
            s.close()

    def _check_interface(self) -> None:
        iface = self.checked.interface
        if not iface:
            return
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(iface))
        except OSError as e:
            raise RtpConfigError(say("rtp_config.interface_not_local", iface=iface,
                                     error=e.strerror)) from None
        finally:
            s.close()

    # ---- unique groups ----
    def _choose_base(self) -> None:
        """group_base = "": the pool recorded in rtp-groups.json, else this node's own (by its
        id); in a cluster one base for all nodes, which share the allocation."""
        if not self.checked.auto:
            return
        if self.store is not None:
            base = AUTO_BASE
        elif self.alloc.recorded_base is not None:
            base = self.alloc.recorded_base
        else:
            base = node_pool(self.node_id, self.checked.blocks * BLOCK)
        if int(base) + self.checked.blocks * BLOCK > int(AUTO_BASE) + AUTO_SPAN \
                or int(base) < int(AUTO_BASE):
            base = node_pool(self.node_id, self.checked.blocks * BLOCK)  # pool_size changed
        if base != self.alloc.base:
            self.alloc.base = base
            self.alloc.dirty = True

    async def claim(self, area: str) -> None:
        """Cluster: make sure an area added at run time has its block in the shared store."""
        if self.store is not None and area not in self._confirmed and area in self.tree:
            try:
                self._confirmed |= await self.alloc.claim(self.store, [area])
            except Exception as e:  # noqa: BLE001 - no stream yet (404); the refresh retries
                log.error("cannot claim groups event=rtp_groups_store_error area=%s error=%s",
                          area, e)

    async def _listen_sap(self) -> None:
        """Hear other origins' SAP announcements: a group and port of ours named there is a
        collision (two deployments on one network), logged."""
        s = self.settings
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(False)
            sock.bind((s.sap_address, s.sap_port))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                            socket.inet_aton(s.sap_address)
                            + socket.inet_aton(self.checked.interface or "0.0.0.0"))
            loop = asyncio.get_running_loop()
            self._sap_in, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(self.on_sap), sock=sock)
        except OSError as e:
            sock.close()
            log.warning("no sap listener event=sap_listen_error error=%s", e)

    def on_sap(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            origin, sdp = parse_sap(data)
            session = parse_session(sdp)
        except (ValueError, struct.error, OSError):
            return  # not ours to judge; SAP carries other payloads too
        if any(k == "x-loa-node" and v == self.node_id for k, v in session.attributes):
            return  # our own announcement, looped back
        mine = {(st.group, st.port): st for st in self._multicast_streams()}
        for m in session.media:
            conn = m.connection or session.connection
            st = mine.get((conn.address, m.port)) if conn is not None else None
            if st is None:
                continue
            self.collisions += 1
            key = (st.group, st.port, origin)
            now = time.monotonic()
            if now - self._collision_logged.get(key, -COLLISION_LOG_SECONDS) \
                    >= COLLISION_LOG_SECONDS:
                self._collision_logged[key] = now
                log.error("another origin announces one of our groups event=rtp_group_collision "
                          "group=%s port=%d area=%s codec=%s other_origin=%s other_session=%s",
                          st.group, st.port, st.area, st.codec, origin,
                          _one_line(session.name)[:80])

    # ---- receiver reports ----
    async def _listen_rtcp(self) -> None:
        """The RTCP listener on port + 1; a port taken by another program is logged, not fatal."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(False)
            sock.bind(("0.0.0.0", self.settings.port + 1))
            loop = asyncio.get_running_loop()
            self._rtcp_in, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(self.on_rtcp),
                                                                   sock=sock)
        except OSError as e:
            sock.close()
            log.warning("no rtcp listener event=rtcp_listen_error port=%d error=%s",
                        self.settings.port + 1, e)
            return
        for st in self.streams.values():
            self._join(st.group)

    def _join(self, group: str) -> None:
        """Join a group we send so its RTCP reaches the listener (multicast only)."""
        if self._rtcp_in is None or not self.settings.multicast or group in self._joined:
            return
        mreq = socket.inet_aton(group) + socket.inet_aton(self.checked.interface or "0.0.0.0")
        for attempt in range(2):
            if attempt or not self._members or len(self._joined) >= MAX_MEMBERSHIPS * len(
                    self._members):
                self._members.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            try:
                self._members[-1].setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
                self._joined.add(group)
                return
            except OSError as e:
                if e.errno != errno.ENOBUFS or attempt:
                    log.warning("cannot join group for rtcp event=rtcp_join_error group=%s "
                                "error=%s", group, e)
                    return

    def on_rtcp(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            reports = parse_receiver_reports(data)
        except (ValueError, struct.error):
            self.rtcp_malformed += 1
            return
        now = time.time()
        limit = self.settings.max_receivers
        for reporter, blocks in reports:
            if reporter in self.by_ssrc:
                continue  # one of our own sender reports, looped back
            for block in blocks:
                st = self.by_ssrc.get(block[0])
                if st is not None:
                    self.rtcp_reports += 1
                    st.report(reporter, block, (str(addr[0]), int(addr[1])), now, limit)

    # ---- areas and streams ----
    def ensure_area(self, area: str) -> bool:
        """Streams for an area of the tree (allocating its groups). False: unknown area."""
        if area not in self.tree:
            return False
        if all((area, c) in self.streams for c in self.codecs):
            return True
        if self.store is not None and area not in self._confirmed:
            return False  # its block comes from the shared store first (claim)
        try:
            for codec in self.codecs:
                if (area, codec) in self.streams:
                    continue
                st = RtpStream(self, area, FORMATS[codec], self.alloc.group(area, codec))
                self.streams[(area, codec)] = st
                self.by_ssrc[st.ssrc] = st
                self._join(st.group)
                self._sync(st)
        except PoolExhausted as e:
            log.error("no multicast group for area event=rtp_pool_full area=%s error=%s",
                      area, e)
            return False
        return True

    def stream(self, area: str, codec: str | None = None) -> RtpStream:
        """KeyError (bilingual) for an unknown area or a codec that is not configured."""
        codec = (codec or self.codecs[0]).lower()
        if codec not in self.codecs:
            available = say("rtp.codecs_available", codecs=", ".join(self.codecs))
            raise KeyError(say("rtp.codec_not_served", codec=codec, available=available))
        if not self.ensure_area(area):
            if area in self.tree:
                raise KeyError(say("rtp.area_no_stream", area=area))
            raise KeyError(say("area.unknown", area=area))
        return self.streams[(area, codec)]

    def _sync(self, st: RtpStream) -> None:
        """Subscribe to the hub while the stream has somewhere to go; unsubscribe otherwise.

        The socket opens with the first subscription (a unicast-only node keeps no socket for
        streams nobody receives); if it cannot open, the refresh round tries again."""
        if st.wanted() and st.sub is None and self.started:
            if st.sock is None:
                try:
                    st.open()
                except OSError as e:  # out of file descriptors: this stream waits, others go on
                    log.error("cannot open rtp socket event=rtp_socket_error area=%s codec=%s "
                              "error=%s", st.area, st.codec, e)
                    return
            # Marked before the first packet can reach the sender thread: set after wiring, a
            # packet sent in between left the marker on the stream's second packet instead.
            st.first = True
            st.restart_reports()
            sub = self.hub.subscribe(st.area, st.codec, maxlen=4)
            sub.on_packets = st.queue
            st.sub = sub
        elif not st.wanted() and st.sub is not None:
            st.sub.close()
            st.sub = None

    def add_receiver(self, area: str, codec: str, host: str, port: int) -> Receiver:
        """Send this stream also to host:port (RTCP to port+1). ValueError/KeyError if bad."""
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65534:
            raise ValueError(say("rtp.receiver_port", port=port))
        ip = _parse_host(host)
        st = self.stream(area, codec)
        with st.lock:
            got = st.receivers.get((ip, port))
            if got is not None:
                return got
            if len(st.receivers) >= self.settings.max_receivers:
                limit = say("limit.max", limit=self.settings.max_receivers)
                raise ValueError(say("rtp.too_many_receivers", area=area, codec=codec,
                                     limit=limit))
            r = Receiver(ip, port)
            st.receivers[(ip, port)] = r
            st.version += 1
        st.request_report()
        self._sync(st)
        log.info("receiver added event=rtp_receiver_add area=%s codec=%s dest=%s:%d "
                 "receivers=%d", area, st.codec, ip, port, len(st.receivers))
        return r

    def remove_receiver(self, area: str, codec: str, host: str, port: int) -> bool:
        try:
            ip = _parse_host(host)
            st = self.stream(area, codec)
        except (KeyError, ValueError):
            return False
        with st.lock:
            r = st.receivers.pop((ip, port), None)
            if r is not None:
                st.version += 1
        if r is None:
            return False
        self._sync(st)
        log.info("receiver removed event=rtp_receiver_remove area=%s codec=%s dest=%s:%d "
                 "receivers=%d", area, st.codec, ip, port, len(st.receivers))
        return True

    def receivers(self, area: str, codec: str) -> list[Receiver]:
        st = self.stream(area, codec)
        with st.lock:
            return list(st.receivers.values())

    # ---- descriptions ----
    def sdp(self, area: str, codec: str | None = None) -> str:
        st = self.stream(area, codec)
        a = self.tree.get(area)
        fmt = st.fmt
        sess_id = zlib.crc32(f"{area}/{fmt.codec}".encode())
        version = zlib.crc32(f"{st.group}:{st.port}/{self.settings.ttl}/{fmt.pt}".encode())
        return rtp_audio_session(
            name=f"{a.name} ({fmt.title})", origin=self.origin, session_id=sess_id, version=version,
            address=st.group, ttl=self.settings.ttl, port=st.port, payload_type=fmt.pt,
            rtpmap=RtpMap(fmt.encoding, fmt.clock, fmt.channels), fmtp=fmt.fmtp, ptime=fmt.ptime,
            info=f"Loa {a.code} {fmt.codec}",
            extra=[("x-loa-area", a.code), *([("x-loa-node", self.node_id)]
                                               if self.node_id else [])]).to_text()

    def stats(self) -> dict[str, Any]:
        streams = [st.stats() for st in self.streams.values()]
        return {
            "enabled": True,
            "multicast": self.settings.multicast,
            "sendmmsg": self.use_sendmmsg,
            "streams": streams,
            "packets": sum(s["packets"] for s in streams),
            "octets": sum(s["octets"] for s in streams),
            "receivers": sum(s["receivers"] for s in streams),
            "errors": sum(s["errors"] for s in streams),
            "dropped": sum(s["dropped"] for s in streams),
            "blocked": sum(s["blocked"] for s in streams),
            "rtcp_reports": self.rtcp_reports,
            "rtcp_malformed": self.rtcp_malformed,
        }

    # ---- background tasks ----
    def _multicast_streams(self) -> list[RtpStream]:
        return list(self.streams.values()) if self.settings.multicast else []

    async def _refresh_areas(self) -> None:
        """Areas added to the tree at run time get their streams (and a recorded block)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            deadline += REFRESH_SECONDS
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            known = {a for a, _ in self.streams}
            new = [a.code for a in self.tree if a.code not in known]
            if new and self.store is not None:
                try:
                    self._confirmed |= await self.alloc.claim(self.store, new)
                except Exception as e:  # noqa: BLE001 - the store comes back: next round
                    log.error("cannot claim groups event=rtp_groups_store_error error=%s", e)
            for area in new:
                self.ensure_area(area)
            for st in list(self.streams.values()):
                if st.sub is None and st.wanted():
                    self._sync(st)  # a socket that could not open before
            if self.alloc.dirty:
                try:
                    await asyncio.to_thread(self.alloc.save)
                except OSError as e:  # kept in memory; retried on the next round
                    log.error("cannot save group map event=rtp_groups_save_error error=%s", e)

    def _make_sap_socket(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, self.settings.ttl)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        if self.checked.interface:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                         socket.inet_aton(self.checked.interface))
        return s

    async def _announce(self) -> None:
        """Round-robin announcements on absolute deadlines, under the SAP bandwidth limit."""
        loop = asyncio.get_running_loop()
        dest = (self.settings.sap_address, self.settings.sap_port)
        deadline = loop.time()
        i = 0
        while True:
            streams = sorted(self._multicast_streams(), key=lambda s: (s.area, s.codec))
            if not streams:
                deadline += self.settings.sap_interval
            else:
                st = streams[i % len(streams)]
                i += 1
                pkt = sap_packet(self.sdp(st.area, st.codec), self.origin)
                try:
                    assert self._sap_sock is not None
                    self._sap_sock.sendto(pkt, dest)
                except OSError as e:
                    log.warning("sap send failed event=sap_error errno=%s",
                                errno.errorcode.get(e.errno or 0, e.errno))
                # all streams once per period; the period grows so the total stays <= 4 kbit/s
                period = max(self.settings.sap_interval,
                             len(pkt) * 8 * len(streams) / self.settings.sap_bandwidth)
                deadline += period / len(streams)
            await asyncio.sleep(max(0.0, deadline - loop.time()))
