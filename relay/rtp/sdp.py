"""SDP (RFC 4566/8866): build the description of an RTP stream, parse one we are given.

Shared by RTP out (the `/streams/A.sdp` file and SAP), WebRTC and RTP/relay inputs. It knows the
session-level lines a stream needs (v o s i c t a) and media sections (m c a) with their
`a=rtpmap` / `a=fmtp` maps; everything else is kept as plain attributes, never interpreted.
Parsing is strict about structure (a clear `SdpError` naming the line) and lenient about what it
does not need (unknown lines are kept or ignored, as RFC 8866 asks).
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field
from typing import Any

from loa.streamer.errors import LoaError
from loa.streamer.messages import say

MAX_SDP_BYTES = 64 * 1024
MAX_LINES = 2000


class SdpError(LoaError, ValueError):
    """A malformed session description; the message names the line."""

    kind = "invalid"


@dataclass
class Connection:
    address: str
    ttl: int | None = None  # IPv4 multicast only
    nettype: str = "IN"
    addrtype: str = "IP4"

    def line(self) -> str:
        addr = self.address if self.ttl is None else f"{self.address}/{self.ttl}"
        return f"c={self.nettype} {self.addrtype} {addr}"


@dataclass
class RtpMap:
    encoding: str  # as written: "opus", "PCMU", "MPA"
    clock: int
    channels: int | None = None

    def value(self) -> str:
        tail = f"/{self.channels}" if self.channels is not None else ""
        return f"{self.encoding}/{self.clock}{tail}"


@dataclass
class Media:
    media: str  # "audio"
    port: int
    proto: str  # "RTP/AVP"
    formats: list[str]  # payload types as written
    connection: Connection | None = None
    rtpmap: dict[int, RtpMap] = field(default_factory=dict)
    fmtp: dict[int, str] = field(default_factory=dict)
    attributes: list[tuple[str, str | None]] = field(default_factory=list)  # others, in order

    def attribute(self, name: str) -> str | None:
        """The value of the first `a=name[:value]` ("" for a flag), None when absent."""
        for k, v in self.attributes:
            if k == name:
                return v if v is not None else ""
        return None


@dataclass
class Session:
    name: str
    origin_address: str
    session_id: int = 0
    session_version: int = 0
    username: str = "-"
    info: str | None = None
    connection: Connection | None = None
    timing: tuple[int, int] = (0, 0)
    attributes: list[tuple[str, str | None]] = field(default_factory=list)
    media: list[Media] = field(default_factory=list)

    def to_text(self) -> str:
        """The description, CRLF line ends (RFC 8866 5), UTF-8 text."""
        ip4 = _addrtype(self.origin_address)
        lines = [
            "v=0",
            f"o={self.username} {self.session_id} {self.session_version} IN {ip4} "
            f"{self.origin_address}",
            f"s={_one_line(self.name) or '-'}",
        ]
        if self.info:
            lines.append(f"i={_one_line(self.info)}")
        if self.connection is not None:
            lines.append(self.connection.line())
        lines.append(f"t={self.timing[0]} {self.timing[1]}")
        lines += [_attr(k, v) for k, v in self.attributes]
        for m in self.media:
            lines.append(f"m={m.media} {m.port} {m.proto} {' '.join(m.formats)}")
            if m.connection is not None:
                lines.append(m.connection.line())
            for pt, rm in m.rtpmap.items():
                lines.append(f"a=rtpmap:{pt} {rm.value()}")
            for pt, params in m.fmtp.items():
                lines.append(f"a=fmtp:{pt} {params}")
            lines += [_attr(k, v) for k, v in m.attributes]
        return "\r\n".join(lines) + "\r\n"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _attr(name: str, value: str | None) -> str:
    return f"a={name}" if value is None else f"a={name}:{value}"


def _addrtype(address: str) -> str:
    try:
        return "IP6" if ipaddress.ip_address(address).version == 6 else "IP4"
    except ValueError:
        return "IP4"  # a host name: RFC 8866 allows an FQDN here


def rtp_audio_session(*, name: str, origin: str, session_id: int, version: int, address: str,
                      ttl: int | None, port: int, payload_type: int, rtpmap: RtpMap,
                      fmtp: str | None = None, ptime: int | None = None,
                      direction: str = "recvonly", info: str | None = None,
                      extra: list[tuple[str, str | None]] | None = None) -> Session:
    """The SDP of one audio RTP stream to `address:port` (a multicast group or a host).

    `direction` describes what a participant does: a listener of a broadcast group only receives
    (`recvonly`, RFC 8866 6.7.2); ffmpeg and VLC play it as they play a file without one.
    """
    media = Media("audio", port, "RTP/AVP", [str(payload_type)],
                  rtpmap={payload_type: rtpmap})
    if fmtp:
        media.fmtp[payload_type] = fmtp
    if ptime:
        media.attributes.append(("ptime", str(ptime)))
    if direction:
        media.attributes.append((direction, None))
    return Session(name=name, origin_address=origin, session_id=session_id,
                   session_version=version, info=info,
                   connection=Connection(address, ttl if _is_multicast4(address) else None),
                   attributes=[("tool", "loa"), ("charset", "UTF-8"), *(extra or [])],
                   media=[media])


def _is_multicast4(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.version == 4 and ip.is_multicast


# ---- parsing ---------------------------------------------------------------------------------
def parse_session(text: str | bytes) -> Session:
    """Parse a session description; `SdpError` (a ValueError) names the first bad line."""
    if isinstance(text, bytes | bytearray):
        if len(text) > MAX_SDP_BYTES:
            raise SdpError(say("sdp.too_large", limit=MAX_SDP_BYTES))
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise SdpError(say("sdp.bad_encoding")) from None
    if len(text) > MAX_SDP_BYTES:
        raise SdpError(say("sdp.too_large", limit=MAX_SDP_BYTES))
    lines = [ln.rstrip("\r") for ln in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise SdpError(say("sdp.empty"))
    if len(lines) > MAX_LINES:
        raise SdpError(say("sdp.too_many_lines", limit=MAX_LINES))
    origin: tuple[str, int, int, str] | None = None
    name: str | None = None
    seen_t = False
    current: Media | None = None
    sess_attrs: list[tuple[str, str | None]] = []
    sess_conn: Connection | None = None
    info: str | None = None
    timing = (0, 0)
    media: list[Media] = []
    for no, line in enumerate(lines, 1):
        if len(line) < 2 or line[1] != "=" or not line[0].isalpha():
            raise SdpError(say("sdp.bad_line", no=no, text=line[:40]))
        kind, value = line[0], line[2:]
        if no == 1:
            if kind != "v" or value.strip() != "0":
                raise SdpError(say("sdp.no_version"))
            continue
        if kind == "o":
            parts = value.split()
            if len(parts) != 6 or parts[3] != "IN":
                raise SdpError(say("sdp.bad_origin", no=no))
            try:
                origin = (parts[0], int(parts[1]), int(parts[2]), parts[5])
            except ValueError:
                raise SdpError(say("sdp.bad_origin_numbers", no=no)) from None
        elif kind == "s":
            name = value
        elif kind == "i" and current is None:
            info = value
        elif kind == "c":
            conn = _parse_connection(value, no)
            if current is None:
                sess_conn = conn
            else:
                current.connection = conn
        elif kind == "t":
            parts = value.split()
            try:
                if len(parts) != 2:
                    raise ValueError(value)
                timing = (int(parts[0]), int(parts[1]))
            except ValueError:
                raise SdpError(say("sdp.bad_timing", no=no)) from None
            seen_t = True
        elif kind == "m":
            current = _parse_media(value, no)
            media.append(current)
        elif kind == "a":
            aname, sep, aval = value.partition(":")
            if not aname:
                raise SdpError(say("sdp.empty_attribute", no=no))
            val: str | None = aval if sep else None
            if current is None:
                sess_attrs.append((aname, val))
            elif aname == "rtpmap":
                pt, rm = _parse_rtpmap(aval, no)
                current.rtpmap[pt] = rm
            elif aname == "fmtp":
                pt_s, _, params = aval.partition(" ")
                try:
                    current.fmtp[int(pt_s)] = params.strip()
                except ValueError:
                    raise SdpError(say("sdp.bad_fmtp", no=no)) from None
            else:
                current.attributes.append((aname, val))
        # b= k= r= z= u= e= p= and unknown letters: allowed, not needed here
    if origin is None:
        raise SdpError(say("sdp.missing_line", kind="o"))
    if name is None:
        raise SdpError(say("sdp.missing_line", kind="s"))
    if not seen_t:
        raise SdpError(say("sdp.missing_line", kind="t"))
    for m in media:
        if m.connection is None and sess_conn is None:
            raise SdpError(say("sdp.no_connection", media=m.media))
    return Session(name=name, origin_address=origin[3], session_id=origin[1],
                   session_version=origin[2], username=origin[0], info=info,
                   connection=sess_conn, timing=timing, attributes=sess_attrs, media=media)


def parse_sdp(text: str | bytes) -> dict[str, Any]:
    """`parse_session` as plain data (dicts and lists), for JSON and quick checks."""
    return parse_session(text).as_dict()


def _parse_connection(value: str, no: int) -> Connection:
    parts = value.split()
    if len(parts) != 3 or parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
        raise SdpError(say("sdp.bad_connection", no=no))
    addr, _, rest = parts[2].partition("/")
    ttl: int | None = None
    if rest:
        try:
            ttl = int(rest.split("/")[0])
        except ValueError:
            raise SdpError(say("sdp.bad_ttl", no=no)) from None
        if not 0 <= ttl <= 255:
            raise SdpError(say("sdp.ttl_range", no=no))
    if not addr:
        raise SdpError(say("sdp.no_address", no=no))
    return Connection(addr, ttl, parts[0], parts[1])


def _parse_media(value: str, no: int) -> Media:
    parts = value.split()
    if len(parts) < 4:
        raise SdpError(say("sdp.bad_media", no=no))
    port_s = parts[1].split("/")[0]
    try:
        port = int(port_s)
    except ValueError:
        raise SdpError(say("sdp.bad_port", no=no, port=parts[1])) from None
    if not 0 <= port <= 65535:
        raise SdpError(say("sdp.port_range", no=no))
    return Media(parts[0], port, parts[2], parts[3:])


def _parse_rtpmap(value: str, no: int) -> tuple[int, RtpMap]:
    pt_s, _, enc = value.partition(" ")
    bits = enc.strip().split("/")
    try:
        pt = int(pt_s)
        if not 0 <= pt <= 127 or len(bits) not in (2, 3) or not bits[0]:
            raise ValueError(value)
        clock = int(bits[1])
        channels = int(bits[2]) if len(bits) == 3 else None
        if clock <= 0 or (channels is not None and channels <= 0):
            raise ValueError(value)
    except ValueError:
        raise SdpError(say("sdp.bad_rtpmap", no=no)) from None
    return pt, RtpMap(bits[0], clock, channels)
