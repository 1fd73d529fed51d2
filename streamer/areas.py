"""The area tree: province, districts, communes, villages ... as data, of any depth.

An area is identified by its official administrative code (GSO) or any unique code the operator
chooses. The tree decides authority: an area nearer the root outranks the areas below it.
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from loa.streamer.errors import LoaError
from loa.streamer.messages import say


class AreaError(LoaError, ValueError):
    """A bad area or area list: unknown code, unknown parent, cycle, duplicate (kind invalid:
    the API answers 422 naming the targets)."""


@dataclass
class Area:
    code: str
    name: str
    level: str = ""
    parent: str | None = None
    lat: float | None = None
    lon: float | None = None
    children: list[str] = field(default_factory=list, repr=False)
    depth: int = 0
    _folded: tuple[str, str] | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, object]:
        return {
            "code": self.code,
            "name": self.name,
            "level": self.level,
            "parent": self.parent,
            "lat": self.lat,
            "lon": self.lon,
        }


# Official (GSO) codes are digits, operators' own codes ASCII letters, digits and '-': nothing
# that can hide in a URL, a log line or a look-alike (NUL, RTL override, Cyrillic "Т").
CODE_RE = re.compile(r"[A-Za-z0-9-]{1,32}")


def fold(text: str) -> str:
    """Lower case without diacritics (đ as d): how an operator types a place on a phone."""
    plain = unicodedata.normalize("NFD", text.lower().replace("đ", "d"))
    return "".join(c for c in plain if not unicodedata.combining(c)).strip()


def _clean_code(code: str, strict: bool = True) -> str:
    """`strict=False` for codes already stored: a tree saved before the rule must still load."""
    code = (code or "").strip()
    if not (CODE_RE.fullmatch(code) if strict else code):
        raise AreaError(say("area.bad_code", code=code[:40]))
    return code


class AreaTree:
    def __init__(self) -> None:
        self._areas: dict[str, Area] = {}
        self.version = 0  # bumped by every change: what a cached rendering of the tree checks

    # ---- building -------------------------------------------------------------------------
    def add(
        self,
        code: str,
        name: str,
        level: str = "",
        parent: str | None = None,
        lat: float | None = None,
        lon: float | None = None,
        strict: bool = True,
    ) -> Area:
        code = _clean_code(code, strict)
        if code in self._areas:
            raise AreaError(say("area.duplicate", code=code))
        if parent is not None:
            parent = parent.strip() or None
        if parent is not None and parent not in self._areas:
            raise AreaError(say("area.unknown_parent", parent=parent, code=code))
        area = Area(code=code, name=name.strip() or code, level=level.strip(), parent=parent,
                    lat=lat, lon=lon)
        if parent is not None:
            p = self._areas[parent]
            p.children.append(code)
            area.depth = p.depth + 1
        self._areas[code] = area
        self.version += 1
        return area

    def remove(self, code: str) -> None:
        """Remove a leaf area (undoing an add whose storing failed)."""
        area = self.get(code)
        if area.children:
            raise AreaError(say("area.has_children", code=code))
        if area.parent is not None:
            self._areas[area.parent].children.remove(code)
        del self._areas[code]
        self.version += 1

    def update(self, code: str, *, name: str | None = None, level: str | None = None) -> Area:
        area = self.get(code)
        if name is not None:
            area.name = name
        if level is not None:
            area.level = level
        self.version += 1
        return area

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[Any, ...]], strict: bool = True) -> AreaTree:
        """Build from (code, name, level, parent_code[, lat, lon]) rows in any order.

        Unknown parents, cycles and duplicate codes are reported with the row that caused them.
        `strict=False` loads stored codes that predate the code alphabet.
        """
        tree = cls()
        pending: dict[str, tuple[int, str, str, str | None]] = {}
        coords: dict[str, tuple[float | None, float | None]] = {}
        for i, (code, name, level, parent, *where) in enumerate(rows, start=1):
            try:
                code = _clean_code(code, strict)
            except AreaError as e:
                raise AreaError(say("area.row", row=i, error=e)) from None
            parent = (parent or "").strip() or None
            if code in pending:
                raise AreaError(say("area.row_duplicate", row=i, code=code))
            pending[code] = (i, name, level, parent)
            if len(where) == 2:
                coords[code] = (where[0], where[1])
        for code, (i, _name, _level, parent) in pending.items():
            if parent is not None and parent not in pending:
                raise AreaError(say("area.row_unknown_parent", row=i, parent=parent, code=code))
        # Insert parents before children; whatever is left after that is in a cycle.
        placed: set[str] = set()
        progress = True
        while progress and len(placed) < len(pending):
            progress = False
            for code, (_i, name, level, parent) in pending.items():
                if code not in placed and (parent is None or parent in placed):
                    tree.add(code, name, level, parent, *coords.get(code, (None, None)),
                             strict=strict)
                    placed.add(code)
                    progress = True
        if len(placed) < len(pending):
            stuck = sorted(c for c in pending if c not in placed)
            raise AreaError(say("area.cycle", codes=", ".join(stuck[:10])))
        return tree

    @classmethod
    def from_csv(cls, text: str) -> AreaTree:
        return cls.from_rows(parse_csv(text))

    # ---- queries --------------------------------------------------------------------------
    def __contains__(self, code: object) -> bool:
        return code in self._areas

    def __len__(self) -> int:
        return len(self._areas)

    def __iter__(self) -> Iterator[Area]:
        return iter(self._areas.values())

    def get(self, code: str) -> Area:
        try:
            return self._areas[code]
        except KeyError:
            raise AreaError(say("area.unknown", area=code)) from None

    def roots(self) -> list[Area]:
        return [a for a in self._areas.values() if a.parent is None]

    def ancestors(self, code: str) -> list[str]:
        """The area itself, then its parent, up to the root."""
        out = []
        cur: str | None = self.get(code).code
        while cur is not None:
            out.append(cur)
            cur = self._areas[cur].parent
        return out

    def contains(self, outer: str, inner: str) -> bool:
        """True when `inner` is `outer` or lies below it."""
        self.get(outer)
        return outer in self.ancestors(inner)

    def subtree(self, code: str) -> list[str]:
        """The area and everything below it, parents before children."""
        out = [self.get(code).code]
        i = 0
        while i < len(out):
            out.extend(self._areas[out[i]].children)
            i += 1
        return out

    def covered(self, targets: Iterable[str]) -> list[str]:
        """Every area a target set reaches (targets and their subtrees), without repeats."""
        seen: dict[str, None] = {}
        for t in targets:
            for c in self.subtree(t):
                seen.setdefault(c, None)
        return list(seen)

    def resolve_leaves(self, targets: Iterable[str]) -> list[str]:
        """The leaf areas a target set covers."""
        return [c for c in self.covered(targets) if not self._areas[c].children]

    def search(self, root: str, query: str, limit: int) -> tuple[list[str], bool]:
        """Areas of `root`'s subtree whose name holds `query` (case and diacritics ignored:
        "quang nam" finds "Quảng Nam") or whose code starts with it, in tree order; and whether
        there were more than `limit`."""
        want = fold(query)
        found: list[str] = []
        for code in self.subtree(root):
            if code.lower().startswith(want) or want in self._folded(code):
                if len(found) == limit:
                    return found, True
                found.append(code)
        return found, False

    def _folded(self, code: str) -> str:
        area = self._areas[code]
        if area._folded is None or area._folded[0] != area.name:
            area._folded = (area.name, fold(area.name))
        return area._folded[1]

    def depth(self, code: str) -> int:
        return self.get(code).depth


HEADER_CELLS = {"code", "ma", "mã", "ma_dvhc", "mã đvhc"}  # a header row's first cell


def coordinates(lat: str, lon: str) -> tuple[float | None, float | None]:
    """Optional `lat`, `lon` cells of an area list: both empty, or both degrees in range."""
    lat, lon = lat.strip(), lon.strip()
    if not lat and not lon:
        return None, None
    try:
        y, x = float(lat), float(lon)
    except ValueError:
        raise AreaError(say("area.bad_coordinates")) from None
    if not (-90 <= y <= 90 and -180 <= x <= 180):
        raise AreaError(say("area.bad_coordinates"))
    return y, x


def parse_csv(text: str) -> list[tuple[Any, ...]]:
    """Official administrative units list: columns code, name, level, parent_code, and the
    optional lat, lon (decimal degrees, WGS 84) of the area's centre.

    A header row is recognised by its first cell (`code`, `ma`, `mã`) and skipped.
    """
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    rows: list[tuple[Any, ...]] = []
    try:
        for i, row in enumerate(reader, start=1):
            if not row or all(not c.strip() for c in row):
                continue
            if i == 1 and row[0].strip().lower() in HEADER_CELLS:
                continue
            if len(row) < 3:
                raise AreaError(say("area.row_columns", row=i))
            parent = row[3] if len(row) > 3 else None
            try:
                where = coordinates(*(row[4:6] + ["", ""])[:2])
            except AreaError as e:
                raise AreaError(say("area.row", row=i, error=e)) from None
            rows.append((row[0].strip(), row[1], row[2], parent, *where))
    except csv.Error as e:
        raise AreaError(say("area.bad_csv", error=e)) from None
    return rows


def sample_tree() -> AreaTree:
    """The demo province whose codes docs and tests rely on."""
    t = AreaTree()
    t.add("T01", "Tỉnh Mẫu", "province")
    for h in (1, 2):
        hc = f"T01-H{h}"
        t.add(hc, f"Huyện {h}", "district", "T01")
        for x in (1, 2, 3):
            t.add(f"{hc}-X{x}", f"Xã {x} huyện {h}", "commune", hc)
    return t
