"""Alerts: the one place where a part of the node says that something needs a person.

A part that finds a fault (a device gone silent, dead air on a relay, a halted rollout, a full
disk) raises an Alert keyed by (kind, subject) and clears it when the fault is over. Raising an
alert that is already active changes nothing, so a part may raise on every check. Notifiers (the
console's event stream, webhooks, e-mail) subscribe to the changes; what they do with them (flap
damping, digests, retries) is theirs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

log = logging.getLogger("loa.alerts")

SEVERITIES = ("warning", "critical")


@dataclass(frozen=True)
class Alert:
    kind: str  # "device_offline", "device_fault", "dead_air", "disk_full", ...
    subject: str  # what it is about: a device id, an area code, a mount
    area: str  # the area whose people are told (and whose subtree may read it)
    text: str  # bilingual, from streamer/messages.py
    severity: str = "warning"
    detail: dict[str, object] = field(default_factory=dict)
    since: float = 0.0  # wall clock when raised
    cleared: float | None = None  # wall clock when cleared; None while active

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.subject


Listener = Callable[[Alert], None]


class Alerts:
    """The node's active alerts and the listeners told of every change."""

    def __init__(self) -> None:
        self.active: dict[tuple[str, str], Alert] = {}
        self.listeners: list[Listener] = []

    def raise_(self, alert: Alert) -> bool:
        """Make `alert` active; False (and nothing told) when it is active already."""
        if alert.severity not in SEVERITIES:
            raise ValueError(f"severity {alert.severity!r} not in {SEVERITIES}")
        if alert.key in self.active:
            return False
        alert = replace(alert, since=alert.since or time.time(), cleared=None)
        self.active[alert.key] = alert
        log.warning("alert raised event=alert_raised kind=%s subject=%s area=%s severity=%s",
                    alert.kind, alert.subject, alert.area, alert.severity)
        self._tell(alert)
        return True

    def clear(self, kind: str, subject: str) -> bool:
        """End the active alert (kind, subject); False when there was none."""
        alert = self.active.pop((kind, subject), None)
        if alert is None:
            return False
        alert = replace(alert, cleared=time.time())
        log.info("alert cleared event=alert_cleared kind=%s subject=%s area=%s",
                 kind, subject, alert.area)
        self._tell(alert)
        return True

    def _tell(self, alert: Alert) -> None:
        for listener in list(self.listeners):
            try:
                listener(alert)
            except Exception:  # a notifier's bug must not stop the part that raised
                log.exception("alert listener failed event=alert_listener_error kind=%s",
                              alert.kind)
