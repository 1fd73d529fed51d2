"""Ogg Opus framing: CRC, lacing, headers, and real decoders reading what the muxer writes."""

from __future__ import annotations

import random
import struct
import subprocess
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from loa.codecs.encoders import OpusEncoder
from loa.codecs.ogg import (
    FLAG_BOS,
    FLAG_CONTINUED,
    OggOpusMuxer,
    OggReader,
    lacing,
    ogg_crc,
    pages_for_packets,
    read_pages,
    renumber,
)
from loa.codecs.opus import packet_samples
from loa.streamer.sources import ToneSource
from tests.audio import peak_hz


def _crc_bitwise(data: bytes) -> int:
    """Reference: the Ogg CRC bit by bit (poly 0x04C11DB7, init 0, MSB first, no xor)."""
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if crc & 0x80000000 else \
                (crc << 1) & 0xFFFFFFFF
    return crc


def test_crc_known_vectors() -> None:
    assert ogg_crc(b"") == 0
    assert ogg_crc(b"123456789") == 0x89A1897F  # the published check value of this CRC
    rng = random.Random(7)
    for n in (1, 2, 17, 255, 1000):
        data = bytes(rng.getrandbits(8) for _ in range(n))
        assert ogg_crc(data) == _crc_bitwise(data)


def test_crc_matches_pages_written_by_ffmpeg(tmp_path: Path) -> None:
    path = tmp_path / "ff.opus"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "sine=frequency=500:duration=1", "-ac", "1", "-c:a", "libopus", str(path)],
                   check=True)
    pages = list(read_pages(path.read_bytes()))
    assert len(pages) >= 3
    assert all(p.crc_ok for p in pages)
    assert pages[0].flags & FLAG_BOS
    assert pages[0].packets()[0].startswith(b"OpusHead")
    corrupt = bytearray(path.read_bytes())
    corrupt[pages[0].size + 40] ^= 0xFF  # a byte inside the second page
    assert not list(read_pages(bytes(corrupt)))[1].crc_ok


def test_lacing_values() -> None:
    assert lacing(0) == b"\x00"
    assert lacing(100) == bytes([100])
    assert lacing(255) == bytes([255, 0])  # a multiple of 255 ends with a zero lacing value
    assert lacing(600) == bytes([255, 255, 90])


def test_long_packet_continues_on_next_page() -> None:
    big = bytes(range(256)) * 300  # 76,800 bytes: more than 255 x 255
    small = b"\x01\x02\x03"
    pages, seq = pages_for_packets([small, big, small], [960, 1920, 2880], serial=5, seq=10)
    assert seq == 10 + len(pages) and len(pages) == 2
    parsed = list(read_pages(b"".join(pages)))
    assert [p.seq for p in parsed] == [10, 11]
    assert all(p.crc_ok and p.serial == 5 for p in parsed)
    assert parsed[0].granule == 960  # only `small` ends on the first page
    assert parsed[1].flags & FLAG_CONTINUED
    assert parsed[1].granule == 2880
    first, second = parsed[0].packets(), parsed[1].packets()
    assert first[0] == small
    assert first[1] + second[0] == big
    assert second[1] == small


def test_renumber_keeps_granule_minus_one_and_fixes_every_crc() -> None:
    big = bytes(range(256)) * 600  # spans three pages: the middle one ends no packet
    pages, _ = pages_for_packets([big, b"\x01"], [1920, 2880], serial=5, seq=40)
    before = list(read_pages(b"".join(pages)))
    assert [p.granule for p in before] == [-1, -1, 2880]
    after = list(read_pages(renumber(b"".join(pages), 38, 960)))
    assert all(p.crc_ok for p in after)
    assert [p.seq for p in after] == [2, 3, 4]
    assert [p.granule for p in after] == [-1, -1, 1920]
    assert [p.body for p in after] == [p.body for p in before]


def _tone_packets(freq: float, seconds: float, start: int = 0) -> list[tuple[int, int, bytes]]:
    enc = OpusEncoder(start)
    src = ToneSource(freq, 0.4)
    out = []
    for _ in range(int(seconds * 50)):
        for p in enc.encode(src.read(960)):
            out.append((p.pts, p.duration, p.data))
    return out


def test_headers_parse_and_pages_are_numbered_and_timed() -> None:
    mux = OggOpusMuxer(serial=0x1234ABCD, page_samples=4800)
    start = 48_000 * 60  # a stream joined one minute into the media timeline
    pages: list[bytes] = []
    packets = _tone_packets(440, 1.0, start)
    for pts, dur, data in packets:
        pages += mux.add(pts, dur, data)
    pages += mux.flush()
    data = mux.headers() + b"".join(pages)
    parsed = list(read_pages(data))
    assert all(p.crc_ok and p.serial == 0x1234ABCD for p in parsed)
    assert [p.seq for p in parsed] == list(range(len(parsed)))
    head, tags = parsed[0], parsed[1]
    assert head.flags == FLAG_BOS and head.granule == 0
    magic, version, channels, pre_skip, rate, gain, family = struct.unpack(
        "<8sBBHIhB", head.packets()[0])
    assert (magic, version, channels, pre_skip, rate, gain, family) == \
        (b"OpusHead", 1, 1, 312, 48_000, 0, 0)
    vendor_len = struct.unpack_from("<I", tags.packets()[0], 8)[0]
    assert tags.packets()[0][:8] == b"OpusTags"
    assert tags.packets()[0][12:12 + vendor_len] == b"loa"
    audio = parsed[2:]
    assert len(audio) == 10  # 50 packets of 20 ms, 5 per 100 ms page
    assert sum(len(p.packets()) for p in audio) == len(packets)
    assert [p.granule for p in audio] == [start + 4800 * (i + 1) for i in range(10)]
    # A listener joining at the 6th audio page gets it renumbered: sequence 2 after the
    # headers, granules from its first audio page, valid checksums; the bodies are the same.
    first = audio[5]
    late_bytes = mux.headers() + renumber(b"".join(pages[5:]), first.seq - 2,
                                          first.granule - 4800)
    late = list(read_pages(late_bytes))
    assert all(p.crc_ok for p in late)
    assert [p.seq for p in late] == list(range(len(late)))
    assert [p.granule for p in late[2:]] == [4800 * (i + 1) for i in range(5)]
    assert [p.body for p in late[2:]] == [p.body for p in audio[5:]]


def test_fast_crc_matches_the_table_crc_and_chains() -> None:
    data = bytes(random.Random(7).getrandbits(8) for _ in range(3000))
    for size in (0, 1, 27, 255, 3000):
        assert ogg_crc(data[:size]) == _crc_bitwise(data[:size])
    assert ogg_crc(data[1000:], ogg_crc(data[:1000])) == _crc_bitwise(data)


def test_real_decoders_read_the_stream(tmp_path: Path) -> None:
    mux = OggOpusMuxer(page_samples=4800)
    body = b""
    for pts, dur, data in _tone_packets(1000, 2.0):
        body += b"".join(mux.add(pts, dur, data))
    body += b"".join(mux.flush())
    path = tmp_path / "loa.opus"
    path.write_bytes(mux.headers() + body)

    probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries",
                            "stream=codec_name,channels,sample_rate", "-of", "csv=p=0",
                            str(path)], capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "opus,48000,1"

    wav = tmp_path / "out.wav"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(path), "-ac", "1",
                    "-ar", "48000", str(wav)], check=True)
    with wave.open(str(wav)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32)
    assert abs(pcm.shape[0] - 2 * 48_000 + 312) <= 960  # pre-skip trimmed, 2 s of audio
    assert abs(peak_hz(pcm[4800:], 48_000) - 1000) < 5

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.name == "opus"
        frames = [f.to_ndarray().reshape(-1) for f in container.decode(stream)]
    decoded = np.concatenate(frames)
    assert abs(peak_hz(decoded[4800:], 48_000) - 1000) < 5


def test_ogg_reader_splits_a_real_opus_stream(tmp_path: Path) -> None:
    path = tmp_path / "t.opus"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i",
                    "sine=frequency=440:duration=2", "-ac", "1", "-c:a", "libopus",
                    "-frame_duration", "20", str(path)], check=True)
    data = path.read_bytes()
    r = OggReader()
    pages = []
    for i in range(0, len(data), 333):  # arbitrary chunking, as the network delivers
        pages += r.feed(data[i:i + 333])
    packets = [p for page in pages for p in page[0]]
    assert packets[0].startswith(b"OpusHead") and packets[1].startswith(b"OpusTags")
    audio = packets[2:]
    assert all(packet_samples(p) == 960 for p in audio[:-1])
    pre_skip = int.from_bytes(packets[0][10:12], "little")
    assert pages[-1][1] == 2 * 48_000 + pre_skip  # the last granule: every sample counted
    assert pages[0][2] is True and not any(p[2] for p in pages[1:])
    with pytest.raises(Exception, match="Ogg"):
        OggReader().feed(b"x" * (OggReader.MAX_BUFFER + 10))


def test_ogg_reader_joins_packets_across_pages_and_restarts_on_a_new_stream() -> None:
    long = bytes(range(256)) * 300  # 76,800 bytes: continues over two more pages
    short = [b"\x01" * 10, b"\x02" * 20]
    pages, seq = pages_for_packets([long] + short, [960, 1920, 2880], serial=7, seq=0,
                                   flags=FLAG_BOS)
    chained, _ = pages_for_packets([b"OpusHead" + bytes(11)], [0], serial=8, seq=0,
                                   flags=FLAG_BOS)
    data = b"junk" + b"".join(pages) + b"".join(chained)
    r = OggReader()
    got = []
    for i in range(0, len(data), 1000):
        got += r.feed(data[i:i + 1000])
    assert r.pages == len(pages) + 1
    packets = [p for page in got for p in page[0]]
    assert packets == [long, *short, b"OpusHead" + bytes(11)]
    assert [g for _, g, _ in got[:len(pages) - 1]] == [None] * (len(pages) - 1)  # no packet ends
    assert got[len(pages) - 1][1] == 2880 and got[-1][2] is True and r.serial == 8


def test_ogg_reader_drops_a_packet_whose_start_was_lost() -> None:
    pages, _ = pages_for_packets([b"\xaa" * 70_000], [960], serial=1, seq=0)
    r = OggReader()
    assert r.feed(pages[0]) == [([], None, False)]  # the packet goes on on the next page...
    # ...which was lost: the next page is not a continuation, the partial packet is dropped
    nxt, _ = pages_for_packets([b"\xcc" * 5], [2880], serial=1, seq=2)
    assert r.feed(nxt[0]) == [([b"\xcc" * 5], 2880, False)]

