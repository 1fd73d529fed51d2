"""Reading the as-run log: the entries of a period (closed, and those still on air), those to
add up when child nodes report too, and the hours on air per area and class. The reports API
and the exchange's statistics use them."""

from __future__ import annotations

import time
from collections import defaultdict

from loa.streamer.state.store import Record, Store
from loa.streamer.station import node_marks


async def asrun_rows(store: Store, since: float, until: float) -> list[Record]:
    """As-run entries overlapping [since, until), closed and still on air, by start."""
    rows = await store.read_log("asrun", since=since - 86400, until=until, limit=200_000)
    # Segments still on air (or left open by a crash not yet recovered): no end, `on_air`,
    # `seen` the last time their node marked itself on air.
    marks = await node_marks(store)
    rows += [{**{k: v for k, v in r.items() if k != "node"}, "end": None,
              "seconds": None, "end_cause": None, "on_air": True,
              "seen": marks.get(r.get("node", ""))}
             for r in await store.find("onair")]
    now = time.time()
    out = [r for r in rows if end_of(r, now) > since and r["start"] < until]
    out.sort(key=lambda r: (r["start"], r["area"]))
    return out


def counted_once(rows: list[Record]) -> list[Record]:
    """The entries to add up: where a child node reported a broadcast in an area (its entries
    carry `node`), this node's own entries of that broadcast there give way to the child's.
    This node's mixer composes every area of its tree, but the loudspeakers of the child's
    areas listen to the child: counting both would double the hours."""
    below = {(r["area"], r.get("broadcast")) for r in rows if r.get("node")}
    return [r for r in rows if r.get("node") or (r["area"], r.get("broadcast")) not in below]


def hours_per_area(rows: list[Record], since: float, until: float) -> dict[str, dict[str, float]]:
    """Hours on air per area and class within [since, until)."""
    now = time.time()
    hours: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in rows:
        start, end = max(r["start"], since), min(end_of(r, now), until)
        hours[r["area"]][r.get("class") or "unknown"] += (end - start) / 3600
    return {a: {c: round(h, 6) for c, h in cs.items()} for a, cs in sorted(hours.items())}


def end_of(row: Record, now: float) -> float:
    """An open entry counts as on air until now."""
    return float(row["end"]) if row.get("end") is not None else max(now, row["start"])
