"""HLS out: /streams/A/index.m3u8 with short MPEG-TS segments and a sliding window."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class HlsSettings:
    enabled: bool = True
    segment_seconds: float = 2.0
    window: int = 6  # segments listed in the playlist
    codec: str = "mp3"
