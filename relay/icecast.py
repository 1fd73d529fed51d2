"""Icecast-compatible HTTP streams: /streams/A.mp3 and /streams/A.opus (Ogg)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class HttpStreamSettings:
    burst_ms: int = 200  # audio sent at once to a new listener for a fast start
    batch_ms: int = 100  # writes per listener are batched to cut per-listener cost
    high_water_kb: int = 256  # a listener whose unsent backlog exceeds this is dropped
    max_listeners: int = 5000
    max_listeners_per_area: int = 2000
    icy_metaint: int = 16000
