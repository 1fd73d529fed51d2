"""What commands and configuration mean to a loudspeaker, written once for the reference agent
(relay/agent/agent.py) and the fleet simulator (relay/agent/sim.py). Each of them applies the
effects its own way (real audio, relays and a pipeline; or counters); the volume an operator set,
its override during an emergency, the refusals and the stream figures a heartbeat reports are
decided here."""

from __future__ import annotations

from typing import Any, TypeGuard

from loa.streamer.messages import say

EMERGENCY_VOLUME = 100  # a loudspeaker's volume in an emergency that names none
BAD_VOLUME = say("agent.bad_volume")
MISSING_ON = say("agent.missing_on")
NO_DISPLAY = say("agent.no_display")


def unsupported(command: str) -> str:
    return say("agent.unsupported_command", command=command)


def is_volume(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 100


def gain_of(volume: int) -> float:
    """0-100 -> linear gain (a squared curve: 50 is about -12 dB)."""
    return (max(0, min(100, volume)) / 100) ** 2


class Volume:
    """The volume a device plays at. An emergency overrides it and restores it when it ends; a
    volume set during the emergency (command or configuration) applies then."""

    def __init__(self, level: int = 80) -> None:
        self.level = level
        self.saved: int | None = None  # the operator's volume, while an emergency overrides it
        self.emergency = False
        self.configured: int | None = None  # the last `config.volume` seen

    def set(self, volume: int) -> None:
        """A `volume` command (or a changed configuration)."""
        if self.emergency:
            self.saved = volume  # applies when the emergency ends
        else:
            self.level = volume

    def configure(self, volume: Any) -> None:
        """The configured volume applies when it is new or changed (an operator's PATCH), so a
        reconnect's welcome does not undo a `volume` command."""
        if is_volume(volume) and volume != self.configured:
            self.configured = volume
            self.set(volume)

    def emergency_on(self, volume: Any, default: int | None = EMERGENCY_VOLUME) -> None:
        """The emergency's volume, or `default` when it names none (None: keep the level)."""
        if not self.emergency:
            self.saved = self.level
        self.emergency = True
        if is_volume(volume):
            self.level = volume
        elif default is not None:
            self.level = default

    def emergency_off(self) -> None:
        if self.emergency:
            self.emergency = False
            if self.saved is not None:
                self.level = self.saved
            self.saved = None


def config_emergency(config: dict[str, Any]) -> tuple[bool, Any] | None:
    """The emergency a `welcome`/`config` puts the device in: (True, volume) on, (False, None)
    off (`"emergency": null`), None when the configuration does not say."""
    if "emergency" not in config:
        return None
    em = config["emergency"]
    if isinstance(em, dict) and em.get("on"):
        return True, em.get("volume")
    if em is None:
        return False, None
    return None


def config_broadcast(config: dict[str, Any]) -> str | None:
    """The emergency a `welcome`/`config` says the device hears (`emergency.broadcast`)."""
    em = config.get("emergency")
    bid = em.get("broadcast") if isinstance(em, dict) and em.get("on") else None
    return bid if isinstance(bid, str) and bid else None


def command_broadcast(args: dict[str, Any]) -> str | None:
    """The emergency an `emergency` command turns on (None: off, or unnamed)."""
    bid = args.get("broadcast")
    return bid if args.get("on") is True and isinstance(bid, str) and bid else None


def stream_figures(url: str, fig: dict[str, Any], play: dict[str, Any]) -> dict[str, Any]:
    """A heartbeat's `stream`: the input's figures (`fig`: loss, jitter) and the player's
    (`play`: latency) since the last one, clamped and rounded as the protocol carries them."""
    out: dict[str, Any] = {"url": url[:2000]}
    if "loss" in fig:
        out["loss"] = round(max(0.0, min(1.0, fig["loss"])), 4)
    if "jitter_ms" in fig:
        out["jitter_ms"] = round(max(0.0, fig["jitter_ms"]), 2)
    if "latency_ms" in play:
        out["latency_ms"] = round(max(0.0, play["latency_ms"]), 1)
    return out
