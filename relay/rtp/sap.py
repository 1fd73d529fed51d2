"""SAP (RFC 2974): the announcement packet that carries one SDP to a multicast listener group,
and its reading (to hear other origins announce a group of ours). IPv4 origins, no
authentication, no encryption or compression."""

from __future__ import annotations

import socket
import struct
import zlib


def sap_packet(sdp: str, origin: str, delete: bool = False) -> bytes:
    """RFC 2974 announcement (or deletion) of one SDP, IPv4 origin, no authentication."""
    body = sdp.encode("utf-8")
    msg_hash = (zlib.crc32(body) & 0xFFFF) or 1  # 0 is reserved for "no hash"
    flags = 0x20 | (0x04 if delete else 0)  # V=1, A=0 (IPv4), T: 0 announce / 1 delete
    return (struct.pack("!BBH", flags, 0, msg_hash) + socket.inet_aton(origin)
            + b"application/sdp\x00" + body)


def parse_sap(data: bytes) -> tuple[str, str]:
    """(origin, SDP text) of an RFC 2974 announcement; ValueError for a deletion, IPv6,
    another payload type or a malformed packet."""
    if len(data) < 8:
        raise ValueError("short SAP packet")
    flags, auth_len = data[0], data[1]
    if flags >> 5 != 1 or flags & 0x10 or flags & 0x04 or flags & 0x03:
        raise ValueError("not an IPv4, unencrypted, uncompressed SAP announcement")
    origin = socket.inet_ntoa(data[4:8])
    body = data[8 + 4 * auth_len:]
    if not body.startswith(b"v=0"):
        ptype, sep, body = body.partition(b"\x00")
        if not sep or ptype != b"application/sdp":
            raise ValueError("SAP payload is not SDP")
    return origin, body.decode("utf-8")
