"""Settings an area's people choose for their area and, unless a lower area sets its own, for
every area below it: one record per area (store kind `area_settings`, id = the area code), one
key per section (`archive`, ...). A section is validated by the part that owns it (`register`),
so this module knows no section's fields; `effective` walks up the tree to the nearest area
that set the section."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loa.streamer.areas import AreaTree
from loa.streamer.errors import LoaError
from loa.streamer.messages import say
from loa.streamer.state.store import Record, Store

KIND = "area_settings"
Validator = Callable[[Any], Record]  # the section's value checked and normalised, or LoaError

SECTIONS: dict[str, Validator] = {}


class SettingsError(LoaError):
    """A section's value is refused (422); `field` names it (`archive.retention_days`)."""


def register(section: str, validate: Validator) -> None:
    SECTIONS[section] = validate


class AreaSettings:
    """The stored settings of every area, kept in memory (read on every tick by their users)."""

    def __init__(self, store: Store, tree: AreaTree) -> None:
        self.store = store
        self.tree = tree
        self._own: dict[str, Record] = {}  # area code -> its own sections
        self.listeners: list[Callable[[str, str], None]] = []  # (area, section) changed

    async def load(self) -> None:
        self._own = {r["id"]: {k: v for k, v in r.items() if k in SECTIONS}
                     for r in await self.store.find(KIND)}

    def own(self, code: str) -> Record:
        return dict(self._own.get(code, {}))

    def effective(self, code: str, section: str) -> tuple[Record | None, str | None]:
        """(value, the area that set it) of the nearest area on the path up that set it."""
        for a in self.tree.ancestors(code):
            value = self._own.get(a, {}).get(section)
            if value is not None:
                return value, a
        return None, None

    async def put(self, code: str, section: str, value: Any) -> Record | None:
        """Set (or with None, remove: inherit again) the area's own section; stored first."""
        validate = SECTIONS.get(section)
        if validate is None:
            raise SettingsError(say("field.unchangeable", fields=section[:64]), field=section)
        checked = None if value is None else validate(value)
        own = {**self._own.get(code, {}), section: checked}
        own = {k: v for k, v in own.items() if v is not None}
        await self.store.put(KIND, {"id": code, **own})
        self._own[code] = own
        for listener in list(self.listeners):
            listener(code, section)
        return checked
