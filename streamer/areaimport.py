"""Checking an area list (CSV: code, name, level, parent_code[, lat, lon]) before anything is
stored (lat, lon: the area's centre in decimal degrees, optional; CAP polygons and the map use
them): every
row's problem at once, with its line and field, so an operator fixes the whole file in one pass.

A pure function of the text and two sets of codes (the tree's, and the caller's subtree): it runs
in a worker thread on an 8 MiB file without touching the live tree.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from loa.streamer.areas import CODE_RE, HEADER_CELLS, AreaError, coordinates
from loa.streamer.errors import Kind
from loa.streamer.messages import say

NAME_LIMIT = 200
MAX_PROBLEMS = 1000  # reported; the count says how many there were in all


@dataclass(frozen=True)
class Row:
    line: int
    code: str
    name: str
    level: str
    parent: str
    lat: float | None = None
    lon: float | None = None


@dataclass(frozen=True)
class Problem:
    line: int
    field: str  # code, name, parent, columns, file
    error: str  # "vi / en"
    kind: Kind = "invalid"  # "forbidden": outside the caller's area

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "field": self.field, "error": self.error}


@dataclass
class Checked:
    rows: list[Row]  # importable, parents before children (empty when there is any problem)
    problems: list[Problem]


def check(text: str, known: Collection[str], inside: Collection[str]) -> Checked:
    """`known`: the tree's codes; `inside`: the caller's subtree, where new areas must hang."""
    rows, problems = _read(text)
    first_line: dict[str, int] = {}  # code -> the line it first appears on
    good: dict[str, Row] = {}  # rows without a problem of their own
    for r in rows:
        found = _row_problems(r, known, inside, first_line)
        first_line.setdefault(r.code, r.line)
        problems += found
        if not found:
            good[r.code] = r
    placed = set(order := _placed(good, known))
    for r in good.values():  # a parent further down the file is fine; one nowhere is not
        if r.code not in placed:
            missing = r.parent not in first_line
            problems.append(Problem(r.line, "parent", say("area.no_parent", parent=r.parent)
                                    if missing else
                                    say("area.import_parent_invalid", parent=r.parent)))
    problems.sort(key=lambda p: p.line)
    return Checked([] if problems else [good[c] for c in order], problems)


def _read(text: str) -> tuple[list[Row], list[Problem]]:
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    rows: list[Row] = []
    problems: list[Problem] = []
    try:
        for cells in reader:
            line = reader.line_num
            if not cells or all(not c.strip() for c in cells):
                continue
            if not rows and not problems and cells[0].strip().lower() in HEADER_CELLS:
                continue
            if len(cells) < 3:
                problems.append(Problem(line, "columns", say("area.import_columns")))
                continue
            try:
                lat, lon = coordinates(*(cells[4:6] + ["", ""])[:2])
            except AreaError as e:
                problems.append(Problem(line, "lat", str(e)))
                continue
            rows.append(Row(line, cells[0].strip(), cells[1].strip(), cells[2].strip(),
                            cells[3].strip() if len(cells) > 3 else "", lat, lon))
    except csv.Error as e:
        problems.append(Problem(reader.line_num, "file", say("area.bad_csv", error=e)))
    return rows, problems


def _row_problems(r: Row, known: Collection[str], inside: Collection[str],
                  first_line: dict[str, int]) -> list[Problem]:
    out = []
    if not CODE_RE.fullmatch(r.code):
        out.append(Problem(r.line, "code", say("area.bad_code", code=r.code[:40])))
    elif r.code in known:
        out.append(Problem(r.line, "code", say("area.exists", code=r.code)))
    elif r.code in first_line:
        out.append(Problem(r.line, "code", say("area.import_duplicate", code=r.code,
                                                    first=first_line[r.code])))
    if not r.name or len(r.name) > NAME_LIMIT:
        out.append(Problem(r.line, "name", say("area.name_length", limit=NAME_LIMIT)))
    if not r.parent or (r.parent in known and r.parent not in inside):
        out.append(Problem(r.line, "parent", say("area.import_outside", code=r.code),
                           "forbidden"))
    return out


def _placed(good: dict[str, Row], known: Collection[str]) -> list[str]:
    """Codes reachable from the tree through good rows, parents first; the rest hang below a
    row with a problem, an unknown parent or a cycle."""
    children: dict[str, list[str]] = {}
    for r in good.values():
        children.setdefault(r.parent, []).append(r.code)
    order = [r.code for r in good.values() if r.parent in known]
    i = 0
    while i < len(order):
        order.extend(children.get(order[i], []))
        i += 1
    return order
