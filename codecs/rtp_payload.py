"""RTP payload formats: how each codec's encoded frames ride in RTP payloads.

Opus RFC 7587 (PT 111, 48 kHz clock, one 20 ms packet per RTP packet), PCMU/PCMA RFC 3551 (PT 0/8,
8 kHz, 20 ms), MP3 RFC 2250 (PT 14, 90 kHz clock, a 4-byte MPA header carrying the fragment
offset; one frame per packet, fragmented only when a frame would not fit the payload room).
The RTP header itself is the transport's (loa.relay.rtp.wire); this module only knows payloads.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class PayloadFormat:
    codec: str
    pt: int
    clock: int
    encoding: str  # the SDP rtpmap's name, as written: "opus", "PCMU", "MPA"
    channels: int | None = None  # the rtpmap's channel count, when it names one
    fmtp: str | None = None
    ptime: int | None = None
    header_size: int = 0  # payload header before the media data (RFC 2250 MPA: 4 bytes)
    label: str = ""  # in the session name: an area's streams must be told apart in a player

    @property
    def title(self) -> str:
        return self.label or self.encoding

    def timestamp(self, pts: int, rate: int) -> int:
        """The RTP clock position of a media position `pts` at `rate` (not yet offset/wrapped)."""
        return pts * self.clock // rate

    def fragments(self, data: bytes, room: int) -> Iterator[tuple[int, bytes]]:
        """(offset, chunk) of each RTP payload a frame takes: one, or several fragments of a
        frame larger than `room` bytes (an empty frame still takes one packet)."""
        offset = 0
        while True:
            chunk = data[offset:offset + room]
            yield offset, chunk
            offset += len(chunk)
            if offset >= len(data):
                return

    def pack_header_into(self, buf: bytearray | memoryview, at: int, offset: int) -> None:
        """Write the payload header (MPA: MBZ, fragment offset) at `at`; nothing if none."""
        if self.header_size:
            struct.pack_into("!HH", buf, at, 0, offset)


FORMATS: dict[str, PayloadFormat] = {
    # RFC 7587: the rtpmap is always opus/48000/2; sprop-stereo=0 says we send mono.
    "opus": PayloadFormat("opus", 111, 48_000, "opus", 2, fmtp="sprop-stereo=0", ptime=20,
                          label="Opus"),
    "pcmu": PayloadFormat("pcmu", 0, 8_000, "PCMU", ptime=20),
    "pcma": PayloadFormat("pcma", 8, 8_000, "PCMA", ptime=20),
    "mp3": PayloadFormat("mp3", 14, 90_000, "MPA", header_size=4, label="MP3"),
}
