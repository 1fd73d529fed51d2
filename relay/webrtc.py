"""WebRTC: WHEP listeners (pre-encoded Opus to every peer) and WHIP live input."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WebRtcSettings:
    max_peers: int = 500
    max_peers_per_area: int = 300
    whip_target_ms: float = 80.0  # jitter buffer of a live input
