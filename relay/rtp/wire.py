"""The RTP/RTCP wire format (RFC 3550), shared by the sender (RTP out) and receivers.

RTP: the fixed 12-byte header written into a send buffer, and `parse_rtp` for a received packet
(CSRCs, header extension and padding handled). RTCP: the sender report with its SDES CNAME,
BYE, the report blocks of receivers' RRs/SRs, and `parse_rtcp` for the sender reports and BYEs
a receiver (relay/agent) maps its clock with. A malformed packet raises `BadPacket` (a
`ValueError`): at the edge it is counted and dropped, never fatal.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from loa.streamer.errors import LoaError
from loa.streamer.messages import say

NTP_EPOCH_OFFSET = 2_208_988_800  # seconds from 1900-01-01 to 1970-01-01
HEADER_SIZE = 12  # RTP fixed header, no CSRC, no extension (what we send)


class BadPacket(LoaError, ValueError):
    """A datagram that is not a usable RTP or RTCP packet (dropped and counted)."""

    kind = "invalid"


# ---- RTP -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RtpHeader:
    marker: bool
    pt: int
    seq: int
    ts: int
    ssrc: int
    payload: bytes


def pack_rtp_header_into(buf: bytearray | memoryview, marker: bool, pt: int, seq: int, ts: int,
                         ssrc: int) -> None:
    """Version 2, no padding, extension or CSRC, at the start of `buf`."""
    struct.pack_into("!BBHII", buf, 0, 0x80, (0x80 if marker else 0) | pt, seq, ts, ssrc)


def parse_rtp(data: bytes) -> RtpHeader:
    """RFC 3550 5.1: version 2, CSRCs, header extension and padding handled."""
    if len(data) < HEADER_SIZE:
        raise BadPacket(say("rtp.packet_short"))
    b0, b1, seq, ts, ssrc = struct.unpack_from("!BBHII", data)
    if b0 >> 6 != 2:
        raise BadPacket(say("rtp.packet_bad_version"))
    off = HEADER_SIZE + 4 * (b0 & 0x0F)
    end = len(data)
    if b0 & 0x20:  # padding: the last byte counts the padding bytes
        pad = data[-1]
        if pad == 0 or pad > end - off:
            raise BadPacket(say("rtp.packet_bad_padding"))
        end -= pad
    if b0 & 0x10:  # header extension
        if off + 4 > end:
            raise BadPacket(say("rtp.packet_truncated_extension"))
        (words,) = struct.unpack_from("!H", data, off + 2)
        off += 4 + 4 * words
    if off > end:
        raise BadPacket(say("rtp.packet_truncated_header"))
    return RtpHeader(bool(b1 & 0x80), b1 & 0x7F, seq, ts, ssrc, bytes(data[off:end]))


# ---- RTCP ----------------------------------------------------------------------------------
def ntp_timestamp(epoch: float) -> tuple[int, int]:
    """(seconds since 1900 mod 2^32, 32-bit fraction) of a Unix epoch time."""
    sec = int(epoch // 1)
    frac = int((epoch - sec) * (1 << 32))
    if frac >= 1 << 32:
        sec, frac = sec + 1, 0
    return (sec + NTP_EPOCH_OFFSET) & 0xFFFFFFFF, frac


def ntp_to_unix(sec: int, frac: int) -> float:
    """The Unix epoch time of an NTP (seconds since 1900, 32-bit fraction) timestamp."""
    return sec - NTP_EPOCH_OFFSET + frac / (1 << 32)


@dataclass(frozen=True)
class SenderReport:
    ssrc: int
    ntp: float  # Unix epoch seconds
    rtp: int  # 32-bit RTP timestamp of the same instant
    packets: int
    octets: int


def sender_report(ssrc: int, ntp: float, rtp_ts: int, packets: int, octets: int,
                  cname: str) -> bytes:
    """RTCP compound packet: SR (no report blocks) + SDES CNAME (RFC 3550 6.4.1, 6.5)."""
    sec, frac = ntp_timestamp(ntp)
    sr = struct.pack("!BBHIIIIII", 0x80, 200, 6, ssrc, sec, frac, rtp_ts & 0xFFFFFFFF,
                     packets & 0xFFFFFFFF, octets & 0xFFFFFFFF)
    return sr + sdes_cname(ssrc, cname)


def bye_packet(ssrc: int, ntp: float, rtp_ts: int, packets: int, octets: int,
               cname: str) -> bytes:
    bye = struct.pack("!BBHI", 0x81, 203, 1, ssrc)
    return sender_report(ssrc, ntp, rtp_ts, packets, octets, cname) + bye


def sdes_cname(ssrc: int, cname: str) -> bytes:
    """An SDES packet with one chunk: the CNAME item (RFC 3550 6.5.1)."""
    text = cname.encode("utf-8")[:255]
    chunk = struct.pack("!IBB", ssrc, 1, len(text)) + text + b"\x00"
    chunk += b"\x00" * (-len(chunk) % 4)
    return struct.pack("!BBH", 0x81, 202, len(chunk) // 4) + chunk


ReportBlock = tuple[int, float, int, int, int]  # source SSRC, fraction lost, lost, seq, jitter


def parse_receiver_reports(data: bytes) -> list[tuple[int, list[ReportBlock]]]:
    """(reporter SSRC, report blocks) of each SR/RR of a compound RTCP packet (RFC 3550 6.4);
    other packet types are skipped. `BadPacket` for anything malformed."""
    out: list[tuple[int, list[ReportBlock]]] = []
    off = 0
    if len(data) < 8:
        raise BadPacket("short RTCP packet")
    while off < len(data):
        if len(data) - off < 4:
            raise BadPacket("truncated RTCP header")
        b0, pt, length = struct.unpack_from("!BBH", data, off)
        end = off + 4 * (length + 1)
        if b0 >> 6 != 2 or end > len(data):
            raise BadPacket("bad RTCP version or length")
        if pt in (200, 201):
            count = b0 & 0x1F
            first = off + (28 if pt == 200 else 8)
            if first + 24 * count > end:
                raise BadPacket("report blocks past the packet")
            reporter = struct.unpack_from("!I", data, off + 4)[0]
            blocks: list[ReportBlock] = []
            for i in range(count):
                src, word, seq, jitter = struct.unpack_from("!IIII", data, first + 24 * i)
                lost = word & 0xFFFFFF
                if lost & 0x800000:  # 24-bit two's complement (duplicates make it negative)
                    lost -= 1 << 24
                blocks.append((src, (word >> 24) / 256, lost, seq, jitter))
            out.append((reporter, blocks))
        off = end
    return out


def parse_rtcp(data: bytes) -> tuple[list[SenderReport], set[int]]:
    """Sender reports and BYE'd SSRCs of a compound RTCP packet (what a receiver needs to map
    RTP time to the wall clock); other packets are skipped. `BadPacket` for anything malformed."""
    reports: list[SenderReport] = []
    bye: set[int] = set()
    off = 0
    if len(data) < 8:
        raise BadPacket(say("rtcp.packet_short"))
    while off + 4 <= len(data):
        b0, pt, length = struct.unpack_from("!BBH", data, off)
        if b0 >> 6 != 2:
            raise BadPacket(say("rtcp.packet_bad_version"))
        size = 4 * (length + 1)
        if off + size > len(data):
            raise BadPacket(say("rtcp.packet_truncated"))
        if pt == 200 and size >= 28:
            ssrc, sec, frac, rtp, packets, octets = struct.unpack_from("!IIIIII", data, off + 4)
            reports.append(SenderReport(ssrc, ntp_to_unix(sec, frac), rtp, packets, octets))
        elif pt == 203:
            count = b0 & 0x1F
            for i in range(min(count, (size - 4) // 4)):
                bye.add(struct.unpack_from("!I", data, off + 4 + 4 * i)[0])
        off += size
    return reports, bye
