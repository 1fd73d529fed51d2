"""MPEG-TS (ISO/IEC 13818-1) for one audio elementary stream: PAT, PMT, PES with a PTS and a PCR,
188-byte packets. The packets are already encoded, so muxing is pure framing.

Why hand-written rather than PyAV's "mpegts" muxer: written here it keeps the continuity counters
and the 90 kHz timestamps continuous from one segment to the next (a muxer opened per segment
restarts both, which demuxers that read segments back to back, like FFmpeg's HLS demuxer, report
as corrupt), marks discontinuities in the stream itself, costs no container set-up per segment,
and is cheap enough to run on the event loop (see `python -m loa.web.bench.hls --segmenter`: about
1 ms of CPU for a 2 s segment), so no thread hop is needed. MPEG audio (MP3) only: stream type 3,
or 4 for the MPEG-2 low sample rates.
"""

from __future__ import annotations

from loa.codecs.encoders import Packet

TS = 188
PMT_PID = 0x1000
AUDIO_PID = 0x100
STREAM_MPEG1_AUDIO = 0x03
STREAM_MPEG2_AUDIO = 0x04  # MPEG-2 (LSF, 16-24 kHz) layer I-III
PTS_MASK = (1 << 33) - 1
PTS_OFFSET = 126_000  # 1.4 s: the first PTS, so that the PCR (0.7 s earlier) never goes negative
PCR_LEAD = 63_000  # the PCR runs 0.7 s ahead of the PTS (FFmpeg's default mux delay)
PES_MAX_SECONDS = 0.2  # a PES carries at most this much audio (a PCR in each one)
PES_MAX_BYTES = 2930


def _crc32_table() -> list[int]:
    table = []
    for i in range(256):
        c = i << 24
        for _ in range(8):
            c = ((c << 1) ^ 0x04C11DB7) if c & 0x80000000 else (c << 1)
        table.append(c & 0xFFFFFFFF)
    return table


_CRC = _crc32_table()


def crc32_mpeg(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _CRC[((crc >> 24) ^ b) & 0xFF]
    return crc


def _section(table_id: int, ext: int, body: bytes) -> bytes:
    """A PSI section with the syntax header, version 0, current, one section, and its CRC."""
    length = 5 + len(body) + 4
    head = bytes([table_id, 0xB0 | (length >> 8), length & 0xFF, ext >> 8, ext & 0xFF,
                  0xC1, 0x00, 0x00])
    sec = head + body
    return sec + crc32_mpeg(sec).to_bytes(4, "big")


def _pes_header(pts90: int, payload_len: int) -> bytes:
    pts = pts90 & PTS_MASK
    length = 3 + 5 + payload_len  # flags, header length, PTS, then the payload
    return bytes([
        0x00, 0x00, 0x01, 0xC0, (length >> 8) & 0xFF, length & 0xFF,
        0x84,  # '10', not scrambled, data aligned
        0x80,  # PTS only
        0x05,
        0x21 | ((pts >> 29) & 0x0E),
        (pts >> 22) & 0xFF, 0x01 | ((pts >> 14) & 0xFE),
        (pts >> 7) & 0xFF, 0x01 | ((pts << 1) & 0xFE),
    ])


class TsMuxer:
    """MPEG-TS for one audio elementary stream, continuous across the segments it writes."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        stream_type = STREAM_MPEG2_AUDIO if rate < 32_000 else STREAM_MPEG1_AUDIO
        pat = _section(0x00, 1, bytes([0x00, 0x01, 0xE0 | (PMT_PID >> 8), PMT_PID & 0xFF]))
        pmt = _section(0x02, 1, bytes([
            0xE0 | (AUDIO_PID >> 8), AUDIO_PID & 0xFF,  # PCR PID
            0xF0, 0x00,  # no program descriptors
            stream_type, 0xE0 | (AUDIO_PID >> 8), AUDIO_PID & 0xFF, 0xF0, 0x00,
        ]))
        self._psi = {0: b"\x00" + pat, PMT_PID: b"\x00" + pmt}  # pointer field, then section
        self._cc = {0: 0, PMT_PID: 0, AUDIO_PID: 0}

    def _next_cc(self, pid: int) -> int:
        cc = self._cc[pid]
        self._cc[pid] = (cc + 1) & 0x0F
        return cc

    def _psi_packet(self, pid: int) -> bytes:
        payload = self._psi[pid]
        head = bytes([0x47, 0x40 | (pid >> 8), pid & 0xFF, 0x10 | self._next_cc(pid)])
        return head + payload + b"\xff" * (TS - 4 - len(payload))

    def _pes_packets(self, pes: bytes, pcr90: int, discontinuity: bool,
                     out: list[bytes]) -> None:
        pos = 0
        first = True
        while pos < len(pes):
            af: bytes | None = None  # adaptation field after its length byte; None: none
            if first:
                # A PCR, random access (every MP3 frame stands alone), maybe a discontinuity.
                flags = 0x50 | (0x80 if discontinuity else 0)
                base = pcr90 & PTS_MASK
                af = bytes([flags, (base >> 25) & 0xFF, (base >> 17) & 0xFF, (base >> 9) & 0xFF,
                            (base >> 1) & 0xFF, ((base & 1) << 7) | 0x7E, 0x00])
            room = TS - 4 - (0 if af is None else 1 + len(af))
            chunk = pes[pos:pos + room]
            stuff = room - len(chunk)
            if stuff:  # the last packet of the PES: stuffing in the adaptation field
                if af is not None:
                    af += b"\xff" * stuff
                else:
                    af = b"" if stuff == 1 else b"\x00" + b"\xff" * (stuff - 2)
            cc = self._next_cc(AUDIO_PID)
            head = bytes([0x47, (0x40 if first else 0x00) | (AUDIO_PID >> 8), AUDIO_PID & 0xFF])
            if af is None:
                out.append(head + bytes([0x10 | cc]) + chunk)
            else:
                out.append(head + bytes([0x30 | cc, len(af)]) + af + chunk)
            pos += len(chunk)
            first = False

    def segment(self, packets: list[Packet], discontinuity: bool = False) -> bytes:
        """PAT, PMT, then the packets in PES packets of at most PES_MAX_SECONDS."""
        out = [self._psi_packet(0), self._psi_packet(PMT_PID)]
        max_dur = int(PES_MAX_SECONDS * self.rate)
        i = 0
        while i < len(packets):
            j = i
            size = 0
            dur = 0
            while j < len(packets) and (j == i or (size + len(packets[j].data) <= PES_MAX_BYTES
                                                   and dur + packets[j].duration <= max_dur)):
                size += len(packets[j].data)
                dur += packets[j].duration
                j += 1
            payload = b"".join(p.data for p in packets[i:j])
            pts90 = packets[i].pts * 90_000 // self.rate + PTS_OFFSET
            pes = _pes_header(pts90, len(payload)) + payload
            self._pes_packets(pes, pts90 - PCR_LEAD, discontinuity and i == 0, out)
            i = j
        return b"".join(out)
