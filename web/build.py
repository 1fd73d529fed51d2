"""The builder: every service of a node made from the Config and its collaborators.

One function per service, each given what it needs (no Node here: web/node.py calls these in
dependency order and owns the start and stop of what they return).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loa.relay.devices.manager import DeviceManager, DeviceSettings, StreamOffer
from loa.relay.devices.mqtt import MqttBinding
from loa.relay.fanout import FanoutPool
from loa.relay.hls import HlsService
from loa.relay.icecast import HttpStreamer
from loa.relay.inputs import RelayInputSettings
from loa.relay.rtp.out import RtpConfigError, RtpOut
from loa.relay.webrtc import WebRtcRelay, WhipSession
from loa.relay.webrtc_workers import WhepPool
from loa.streamer.areas import AreaTree
from loa.streamer.broadcast import Broadcast
from loa.streamer.emergency.service import EmergencySettings
from loa.streamer.hub import PacketHub
from loa.streamer.state.bus import Bus
from loa.streamer.state.store import Store
from loa.streamer.station import Station
from loa.web.config import Config, ConfigError

MIN_LISTEN_TOKEN = 8


# ---- the area tree -----------------------------------------------------------------------------
async def load_tree(store: Store, cfg: Config) -> AreaTree:
    """The area tree from the store; on first start from the configured official list."""
    rows = await store.find("area")
    if rows:
        # Not strict: a tree stored before the code alphabet (streamer/areas.py) still loads.
        return AreaTree.from_rows([(r["id"], r["name"], r.get("level", ""), r.get("parent"),
                                    r.get("lat"), r.get("lon")) for r in rows], strict=False)
    if cfg.areas.csv:
        text = await asyncio.to_thread(Path(cfg.areas.csv).read_text, encoding="utf-8")
        tree = AreaTree.from_csv(text)
    else:
        tree = AreaTree()
        tree.add(cfg.areas.root_code, cfg.areas.root_name, cfg.areas.root_level)
    await store.put_many("area", [area_record(a.code, tree) for a in tree])
    return tree


def archive_dir(cfg: Config) -> Path:
    return Path(cfg.archive.dir).expanduser() if cfg.archive.dir else cfg.data_dir / "archive"


def area_record(code: str, tree: AreaTree) -> dict[str, object]:
    a = tree.get(code)
    return {"id": a.code, "name": a.name, "level": a.level, "parent": a.parent,
            "lat": a.lat, "lon": a.lon}


# ---- config sections not in Config yet ---------------------------------------------------------
def device_settings(cfg: Config) -> DeviceSettings:
    """The [devices] config section (DeviceSettings defaults until Config carries one)."""
    s = getattr(cfg, "devices", None)
    return s if isinstance(s, DeviceSettings) else DeviceSettings()


def emergency_settings(cfg: Config) -> EmergencySettings:
    """The [emergency] config section (defaults until Config carries one)."""
    s = getattr(cfg, "emergency", None)
    return s if isinstance(s, EmergencySettings) else EmergencySettings()


def relay_input_settings(cfg: Config) -> RelayInputSettings | None:
    """An `[inputs]` config section (RelayInputSettings), used once Config has one."""
    s = getattr(cfg, "inputs", None)
    return s if isinstance(s, RelayInputSettings) else None


def stream_offer(cfg: Config) -> StreamOffer:
    """The streams this node offers a device in its hello answer."""
    return StreamOffer(
        http_codecs=("opus", "mp3"),
        hls_codec=cfg.hls.codec if cfg.hls.enabled else None,
        rtp_codecs=tuple(c.strip() for c in cfg.rtp.codecs.split(",") if c.strip())
        if cfg.rtp.enabled else (),
        webrtc=True)


# ---- services ----------------------------------------------------------------------------------
def rtp_out(cfg: Config, hub: PacketHub, tree: AreaTree, station: Station, store: Store,
            bus: Bus, node_id: str) -> RtpOut | None:
    """RtpOut when [rtp] is enabled; `ConfigError` for settings that cannot work."""
    if not cfg.rtp.enabled:
        return None
    try:
        return RtpOut(cfg.rtp, hub, tree, station.wall, state_dir=cfg.data_dir,
                      cname=f"loa@{socket.gethostname()}",
                      store=store if bus.shared else None, node_id=node_id)
    except RtpConfigError as e:
        raise ConfigError(str(e)) from None


def http_streamer(cfg: Config, hub: PacketHub, on_air: Callable[[str], dict[str, Any]]) -> HttpStreamer:
    return HttpStreamer(hub, cfg.http_streams, cfg.encoders, on_air=on_air)


def fanout_pool(cfg: Config, streamer: HttpStreamer) -> FanoutPool | None:
    """Fan-out worker processes for the HTTP listeners when `[http_streams] workers` > 0."""
    workers = max(0, cfg.http_streams.workers)
    return FanoutPool(streamer, workers) if workers else None


def hls_service(cfg: Config, hub: PacketHub) -> HlsService | None:
    return HlsService(hub, cfg.hls) if cfg.hls.enabled else None


def check_listen_tokens(cfg: Config, tree: AreaTree) -> None:
    for entry in cfg.webrtc.listen_tokens:
        code, _, tok = entry.partition("=")
        if code not in tree or len(tok) < MIN_LISTEN_TOKEN:
            raise ConfigError(f"[webrtc] listen_tokens: expected \"AREA=TOKEN\" with a known "
                              f"area and a token of 8 characters or more, got {code!r}=...")


def webrtc_relay(cfg: Config, hub: PacketHub, tree: AreaTree, station: Station) -> WebRtcRelay:
    """The WHEP/WHIP relay; a WHIP peer that goes away ends its broadcast."""
    check_listen_tokens(cfg, tree)
    relay = WebRtcRelay(hub, cfg.webrtc)
    workers = max(0, cfg.webrtc.workers)
    if workers:
        relay.pool = WhepPool(relay, workers)  # the pool needs the relay: set, not passed

    def whip_ended(s: WhipSession, cause: str) -> None:
        if cause not in ("deleted", "shutdown"):
            stop_whip_broadcast(station, s, "whip-" + cause)

    relay.on_whip_end = whip_ended
    return relay


def stop_whip_broadcast(station: Station, s: WhipSession, cause: str) -> None:
    """End the broadcast a WHIP peer fed (its peer went away)."""
    if s.bid is None:
        return
    try:
        station.stop(s.bid, by_area=None, cause=cause)
    except KeyError:
        pass  # already over


def whip_closer(relay: WebRtcRelay, loop: asyncio.AbstractEventLoop
                ) -> Callable[[Broadcast, str], None]:
    """An engine `ended_listeners` callback: a broadcast that ends closes its WHIP peer."""
    def broadcast_ended(b: Broadcast, cause: str) -> None:  # engine thread
        def close() -> None:
            s = relay.whip_for_broadcast(b.id)
            if s is not None:
                asyncio.ensure_future(relay.close_whip(s.id, "broadcast-" + cause))

        try:
            loop.call_soon_threadsafe(close)
        except RuntimeError:  # loop closed: shutting down
            pass

    return broadcast_ended


def device_manager(cfg: Config, store: Store, bus: Bus, node_id: str) -> DeviceManager:
    return DeviceManager(store, bus.publish, device_settings(cfg), stream_offer(cfg),
                         bus=bus if bus.shared else None, node_id=node_id)


def mqtt_binding(cfg: Config, devices: DeviceManager, node_id: str) -> MqttBinding | None:
    """The MQTT transport of the device channel when `[mqtt] enabled`; devices' stream URLs
    use the node's public URL (`[server] public_url`, else its HTTP address)."""
    if not cfg.mqtt.enabled:
        return None
    public = cfg.server.public_url.rstrip("/") or f"http://{cfg.server.http}"
    return MqttBinding(devices, cfg.mqtt, node_id, public)
