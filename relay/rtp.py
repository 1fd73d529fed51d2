"""RTP out: one multicast group per area and codec, unicast receivers, RTCP, SDP, SAP."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RtpSettings:
    enabled: bool = False  # multicast is planned per network: switch it on deliberately
    group_base: str = "239.72.0.0"  # groups are allocated from here, one per area and codec
    port: int = 5004  # every group uses this port (RTCP: port + 1)
    ttl: int = 16  # 0 keeps packets on this host (tests, demo)
    interface: str = ""  # address of the interface multicast leaves by; "" = the default route
    dscp: int = 46  # EF
    codecs: str = "opus,pcmu"
    sap: bool = False
    rtcp_interval: float = 5.0
