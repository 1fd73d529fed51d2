"""The device manager as the emergency service's devices (streamer/emergency/service.py's
`EmergencyDevices`): the `emergency` command to the loudspeakers and boards of some areas."""

from __future__ import annotations

from typing import Any

from loa.relay.devices.manager import DeviceManager
from loa.relay.devices.protocol import validate_command


class EmergencyDeviceCommands:
    """`EmergencyDevices` over this node's DeviceManager."""

    def __init__(self, mgr: DeviceManager) -> None:
        self.mgr = mgr

    async def emergency_command(self, areas: list[str], args: dict[str, Any],
                                include_offline: bool, ttl: float | None) -> dict[str, Any]:
        mgr = self.mgr
        # A device connected to another node of a cluster gets the command from that node,
        # which hears of the emergency on the bus: sending it from here too would double it.
        devices = [d for d in mgr.find(set(areas)) if not d.record.get("revoked")
                   and (d.link is not None or (include_offline and not mgr.remote(d)))]
        if not devices:
            return {"devices": 0, "online": 0}
        s = mgr.settings
        ttl = min(max(ttl or 0.0, s.command_ttl), s.max_command_ttl)
        issued = await mgr.issue(devices, "emergency", validate_command("emergency", args),
                                 ttl=ttl, issuer="emergency", area=min(areas, key=len))
        return {"devices": issued.devices, "online": issued.online, "batch": issued.batch}
