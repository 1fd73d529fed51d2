"""Ogg Opus framing (RFC 3533 pages, RFC 7845 Opus mapping), in pure Python.

`OggOpusMuxer` turns a channel's Opus packets into Ogg pages once; every listener of the channel
gets the same bytes. A page holds several 20 ms packets (`page_ms` of audio) and its granule
position is the end of its last packet on the 48 kHz media timeline (`pts + duration`), so a
listener that joins mid-stream sees a stream with a positive start time, as RFC 7845 allows.
Every listener's logical stream starts at page sequence 0 like a file (libogg clients such as
VLC insist): the two header pages (`OpusHead` 0, `OpusTags` 1) are the same bytes for everyone,
and `renumber` rewrites the shared audio pages of a listener that joined later (sequence from 2,
granule from its first audio page, CRC redone) once per group of listeners that joined at the
same page (see loa.relay.icecast).

`read_pages` parses pages back (CRC checked): for tests and diagnostics. `OggReader` splits
a stream into packets as it arrives from the network, for receivers (the device agent).
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

OPUS_RATE = 48_000
PRE_SKIP = 312  # libopus' encoder delay at 48 kHz (RFC 7845 section 4.2)
MAX_SEGMENTS = 255

FLAG_CONTINUED = 0x01
FLAG_BOS = 0x02
FLAG_EOS = 0x04

_HEADER = struct.Struct("<4sBBqIIIB")  # capture, version, type, granule, serial, seq, crc, nseg


_REVERSED = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))  # each byte's bits reversed


def _reverse32(x: int) -> int:
    return int.from_bytes(x.to_bytes(4, "little").translate(_REVERSED), "big")


def ogg_crc(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """The Ogg page checksum: CRC-32, polynomial 0x04C11DB7, init 0, not reflected, no xor.

    Computed by zlib (C speed): zlib's CRC-32 is the same polynomial bit-reflected, so it gives
    Ogg's CRC over bit-reversed bytes, with its init and final xor undone."""
    reflected = zlib.crc32(bytes(data).translate(_REVERSED), _reverse32(crc) ^ 0xFFFFFFFF)
    return _reverse32(reflected ^ 0xFFFFFFFF)


_FIELDS = struct.Struct("<qII")  # granule, serial, sequence (bytes 6..17 of a page)
_FIELDS_CRC = struct.Struct("<qIII")  # the same and the CRC (bytes 6..25)


_ZEROS = memoryview(bytes(27 + 255 + 255 * 255))  # as long as the longest page


def renumber(data: bytes, seq_offset: int, granule_offset: int) -> bytes:
    """Whole pages with their sequence numbers lowered by `seq_offset` and their granule positions
    (unless -1, no packet ends there) by `granule_offset`, checksums updated.

    The CRC is linear: the new one is the old one xor the CRC of the change, i.e. of the 16
    changed header bytes followed by zeros to the page's end (zlib runs over the zeros), which
    costs about half of computing it over the page again."""
    buf = bytearray(data)
    pos, n = 0, len(buf)
    while pos + 27 <= n:
        nseg = buf[pos + 26]
        end = pos + 27 + nseg + sum(buf[pos + 27:pos + 27 + nseg])
        granule, serial, seq, crc = _FIELDS_CRC.unpack_from(buf, pos + 6)
        new_granule = granule - granule_offset if granule != -1 else granule
        new_seq = (seq - seq_offset) & 0xFFFFFFFF
        change = _FIELDS.pack(granule ^ new_granule, 0, seq ^ new_seq).translate(_REVERSED)
        reflected = zlib.crc32(_ZEROS[:end - pos - 22], zlib.crc32(change, 0xFFFFFFFF))
        crc ^= _reverse32(reflected ^ 0xFFFFFFFF)
        _FIELDS_CRC.pack_into(buf, pos + 6, new_granule, serial, new_seq, crc)
        pos = end
    return bytes(buf)


def lacing(size: int) -> bytes:
    """The lacing values of one whole packet: 255 per full segment, then the rest (< 255)."""
    return b"\xff" * (size // 255) + bytes((size % 255,))


def build_page(segments: bytes, body: bytes, *, granule: int, serial: int, seq: int,
               flags: int = 0) -> bytes:
    """One Ogg page from its lacing table and body; computes the CRC."""
    if not 0 < len(segments) <= MAX_SEGMENTS:
        raise ValueError("an Ogg page holds 1..255 lacing values")
    head = _HEADER.pack(b"OggS", 0, flags, granule, serial, seq & 0xFFFFFFFF, 0, len(segments))
    page = bytearray(head)
    page += segments
    page += body
    crc = ogg_crc(page)
    struct.pack_into("<I", page, 22, crc)
    return bytes(page)


def pages_for_packets(packets: list[bytes], granules: list[int], *, serial: int, seq: int,
                      flags: int = 0) -> tuple[list[bytes], int]:
    """Pack whole packets into as few pages as the 255-segment limit allows.

    A packet too long for the room left continues on the next page (flag 0x01); a page on which
    no packet ends carries granule -1 (RFC 3533). `granules[i]` belongs to `packets[i]`.
    Returns the pages and the next sequence number.
    """
    pages: list[bytes] = []
    segs = bytearray()
    body = bytearray()
    page_flags = flags
    granule = -1
    for data, g in zip(packets, granules, strict=True):
        lace = lacing(len(data))
        offset = 0
        while lace:
            room = MAX_SEGMENTS - len(segs)
            take = lace[:room]
            nbytes = sum(take)
            segs += take
            body += data[offset:offset + nbytes]
            offset += nbytes
            lace = lace[room:]
            if not lace:
                granule = g  # the packet ends on this page
            if len(segs) == MAX_SEGMENTS:
                pages.append(build_page(bytes(segs), bytes(body), granule=granule,
                                        serial=serial, seq=seq, flags=page_flags))
                seq += 1
                page_flags = FLAG_CONTINUED if lace else 0
                segs.clear()
                body.clear()
                granule = -1
    if segs:
        pages.append(build_page(bytes(segs), bytes(body), granule=granule, serial=serial,
                                seq=seq, flags=page_flags))
        seq += 1
    return pages, seq


def opus_head(channels: int = 1, pre_skip: int = PRE_SKIP, input_rate: int = OPUS_RATE,
              gain_q8: int = 0) -> bytes:
    """The identification header (RFC 7845 section 5.1), channel mapping family 0."""
    return struct.pack("<8sBBHIhB", b"OpusHead", 1, channels, pre_skip, input_rate, gain_q8, 0)


def opus_tags(vendor: str = "loa", comments: dict[str, str] | None = None) -> bytes:
    """The comment header (RFC 7845 section 5.2): vendor string and KEY=value comments."""
    v = vendor.encode("utf-8")
    out = bytearray(b"OpusTags")
    out += struct.pack("<I", len(v)) + v
    items = [f"{k}={val}".encode() for k, val in (comments or {}).items()]
    out += struct.pack("<I", len(items))
    for item in items:
        out += struct.pack("<I", len(item)) + item
    return bytes(out)


@dataclass
class OggOpusMuxer:
    """One logical Ogg Opus stream for one channel: pages made once, shared by every listener.

    `add(pts, duration, data)` takes the channel's packets in order (pts and duration in 48 kHz
    samples) and returns the pages completed by them: a page is sealed when it holds
    `page_samples` of audio. `flush()` seals what is pending. Audio pages start at sequence 2,
    after the two header pages of `headers()`.
    """

    serial: int = field(default_factory=lambda: random.getrandbits(32))
    page_samples: int = 4800  # 100 ms of 48 kHz audio per page
    channels: int = 1
    pre_skip: int = PRE_SKIP
    vendor: str = "loa"
    comments: dict[str, str] = field(default_factory=dict)
    seq: int = 2  # the sequence number of the next audio page
    granule: int = 0  # granule position of the last page sealed
    pages_out: int = 0
    _packets: list[bytes] = field(default_factory=list, repr=False)
    _granules: list[int] = field(default_factory=list, repr=False)
    _pending: int = 0  # samples pending in _packets
    _first: int = 0  # pts of the first packet in _packets
    start: int = 0  # pts of the first packet of the pages the last flush() sealed
    _head: bytes = field(default=b"", repr=False)

    def headers(self) -> bytes:
        """The OpusHead (BOS, sequence 0) and OpusTags (1) pages."""
        if not self._head:
            head = build_page(lacing(19), opus_head(self.channels, self.pre_skip), granule=0,
                              serial=self.serial, seq=0, flags=FLAG_BOS)
            tags_pages, _ = pages_for_packets([opus_tags(self.vendor, self.comments)], [0],
                                              serial=self.serial, seq=1)
            if len(tags_pages) != 1:
                raise ValueError("OpusTags too long for one page")
            self._head = head + tags_pages[0]
        return self._head

    @property
    def pending_samples(self) -> int:
        return self._pending

    def add(self, pts: int, duration: int, data: bytes) -> list[bytes]:
        if not self._packets:
            self._first = pts
        self._packets.append(data)
        self._granules.append(pts + duration)
        self._pending += duration
        if self._pending >= self.page_samples:
            return self.flush()
        return []

    def flush(self) -> list[bytes]:
        if not self._packets:
            return []
        pages, self.seq = pages_for_packets(self._packets, self._granules, serial=self.serial,
                                            seq=self.seq)
        self.granule = self._granules[-1]
        self.start = self._first
        self.pages_out += len(pages)
        self._packets = []
        self._granules = []
        self._pending = 0
        return pages


@dataclass
class OggPage:
    flags: int
    granule: int
    serial: int
    seq: int
    crc_ok: bool
    segments: bytes
    body: bytes
    size: int  # bytes of the whole page

    def packets(self) -> list[bytes]:
        """Packet pieces on this page (the last one may continue on the next page)."""
        out: list[bytes] = []
        pos = 0
        cur = 0
        for v in self.segments:
            cur += v
            if v < 255:
                out.append(self.body[pos:pos + cur])
                pos += cur
                cur = 0
        if cur:
            out.append(self.body[pos:pos + cur])
        return out


class OggError(ValueError):
    pass


def read_pages(data: bytes) -> Iterator[OggPage]:
    """Parse consecutive Ogg pages; raises OggError on a bad capture pattern or a cut page."""
    pos = 0
    n = len(data)
    while pos < n:
        if n - pos < _HEADER.size:
            raise OggError(f"truncated page header at {pos}")
        cap, version, flags, granule, serial, seq, crc, nseg = _HEADER.unpack_from(data, pos)
        if cap != b"OggS" or version != 0:
            raise OggError(f"no Ogg page at byte {pos}")
        seg_end = pos + _HEADER.size + nseg
        segments = data[pos + _HEADER.size:seg_end]
        end = seg_end + sum(segments)
        if len(segments) != nseg or end > n:
            raise OggError(f"truncated page at {pos}")
        page = bytearray(data[pos:end])
        page[22:26] = b"\0\0\0\0"
        yield OggPage(flags, granule, serial, seq, ogg_crc(page) == crc, bytes(segments),
                      bytes(data[seg_end:end]), end - pos)
        pos = end


class OggReader:
    """Incremental parsing of an Ogg byte stream as it arrives (any chunking): `feed` returns,
    for each page completed, the packets that end on it, the page's granule (the end position
    of its last packet) and whether it begins a stream. Chained streams (a new BOS page) restart
    with their headers. CRCs are not checked: a receiver plays what arrives (`read_pages`
    checks them)."""

    MAX_BUFFER = 1 << 20

    def __init__(self) -> None:
        self.buf = bytearray()
        self.partial = bytearray()
        self.serial: int | None = None
        self.pages = 0

    def feed(self, data: bytes) -> list[tuple[list[bytes], int | None, bool]]:
        """Complete pages: (packets completed on it, granule or None, beginning of stream)."""
        self.buf += data
        out: list[tuple[list[bytes], int | None, bool]] = []
        while True:
            start = self.buf.find(b"OggS")
            if start < 0:
                if len(self.buf) > self.MAX_BUFFER:
                    raise OggError("không phải Ogg / not an Ogg stream")
                del self.buf[:max(0, len(self.buf) - 3)]
                return out
            if start:
                del self.buf[:start]
            if len(self.buf) < 27:
                return out
            version, htype = self.buf[4], self.buf[5]
            if version != 0:
                del self.buf[:4]  # not a page: look for the next capture pattern
                continue
            granule = int.from_bytes(self.buf[6:14], "little", signed=True)
            serial = int.from_bytes(self.buf[14:18], "little")
            nsegs = self.buf[26]
            if len(self.buf) < 27 + nsegs:
                return out
            lacing = self.buf[27:27 + nsegs]
            size = 27 + nsegs + sum(lacing)
            if len(self.buf) < size:
                return out
            body = bytes(self.buf[27 + nsegs:size])
            del self.buf[:size]
            self.pages += 1
            bos = bool(htype & 0x02)
            if bos or serial != self.serial:
                self.serial = serial
                self.partial.clear()
            elif not htype & 0x01:
                self.partial.clear()  # not a continuation: a partial packet cannot complete
            packets: list[bytes] = []
            pos = 0
            for lace in lacing:
                self.partial += body[pos:pos + lace]
                pos += lace
                if lace < 255:
                    packets.append(bytes(self.partial))
                    self.partial.clear()
            out.append((packets, granule if granule >= 0 else None, bos))
