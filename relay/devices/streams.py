"""The streams a device is offered in its `welcome`/`config`: this node's mounts for its area,
in the device's order of preference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

# A loudspeaker plays a connect burst from its start, so the burst is its delay behind live: it
# asks for a short one (browsers get the Icecast-sized default, which they need to autoplay).
DEVICE_BURST_MS = 200

@dataclass(frozen=True)
class StreamOffer:
    """What this node serves, to build a device's stream list from."""

    http_codecs: tuple[str, ...] = ("opus", "mp3")
    hls_codec: str | None = "mp3"
    rtp_codecs: tuple[str, ...] = ()
    webrtc: bool = True


def stream_urls(public: str, area: str, caps: dict[str, Any], offer: StreamOffer
                ) -> list[dict[str, str]]:
    """The streams of `area` this device can play, in its order of preference: its transports in
    the order it lists them, and within a transport its codecs in the order it lists them."""
    base = public.rstrip("/")
    a = quote(area, safe="")
    codecs = list(caps.get("codecs") or [])
    out: list[dict[str, str]] = []
    for transport in caps.get("transports") or []:
        if transport == "http":
            for c in codecs:
                if c in offer.http_codecs:
                    out.append({"transport": "http", "codec": c,
                                "url": f"{base}/streams/{a}.{c}?burst_ms={DEVICE_BURST_MS}"})
        elif transport == "hls" and offer.hls_codec and offer.hls_codec in codecs:
            out.append({"transport": "hls", "codec": offer.hls_codec,
                        "url": f"{base}/streams/{a}/index.m3u8"})
        elif transport == "rtp":
            common = [c for c in codecs if c in offer.rtp_codecs]
            if common:
                out.append({"transport": "rtp", "codec": common[0],
                            "url": f"{base}/streams/{a}.sdp"})
        elif transport == "webrtc" and offer.webrtc and "opus" in codecs:
            out.append({"transport": "webrtc", "codec": "opus", "url": f"{base}/whep/{a}"})
    return out

