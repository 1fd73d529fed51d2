"""The TT 39 rules between levels: bulletins a province or district sends down, and the inbox of
each commune they reach.

A bulletin names content (an approved programme, or a media item the sender may air directly: it
becomes an approved `file` programme of the sender, so one representation serves the schedules,
the link and the emergency service), a class and target areas below the sender. Each
commune it covers (a leaf of the area tree) gets one inbox entry, whose life the class decides
(`FLOW`): a `normal` one waits until the commune schedules it (through the schedules) or declines
it with a reason the sender reads; `priority` and `emergency` ones air at once with the sender's
authority. When a priority bulletin meets the commune's own priority broadcast the commune orders
them: the entry's `order` ("before" or "after" its own), which the engine ranks by
(`Broadcast.after_own`). An `emergency` bulletin airs through the emergency service (attention
signal, loudspeakers commanded, boards), never as a bare broadcast. A commune served by a child
node (a node key's area holds it) keeps its entry here with that `node`: the child's commune acts
on it there, and the child reports the state back (relay/bulletins.py). The rules raise
`InboxError`; the HTTP layer maps it to a status.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Iterable

from loa.streamer.areas import AreaTree
from loa.streamer.broadcast import BroadcastClass
from loa.streamer.emergency.service import EmergencyService, Request
from loa.streamer.engine import Engine
from loa.streamer.messages import say
from loa.streamer.schedule import DEFAULT_TZ, ZoneInfo, occurrences
from loa.streamer.state.store import Record, Store
from loa.streamer.station import ContentError, Station

# class -> the state an entry starts in: it waits for the commune, or it is on air already.
FLOW = {"normal": "pending", "priority": "aired", "emergency": "aired"}
STATES = ("pending", "scheduled", "declined", "aired", "cancelled")
ORDERS = ("before", "after")
# Levels keep priority slots province > district > commune (DESIGN.md "Priority"): until the
# commune says otherwise, the bulletin from above goes first and the commune's own resumes after.
DEFAULT_ORDER = "before"
MAX_REASON = 500
FINAL = ("declined", "aired", "cancelled")  # a commune's last word, or the sender's cancel


class InboxError(ContentError):
    """A bulletin or inbox entry breaks a rule: a bad target, a transition its state forbids."""


def check_class(value: str) -> str:
    try:
        name = BroadcastClass.parse(value).name
    except ValueError as e:
        raise InboxError(str(e), field="class") from None
    if name not in FLOW:
        raise InboxError(say("inbox.class", classes=", ".join(FLOW)), field="class")
    return name


def communes(tree: AreaTree, sender: str, targets: Iterable[str]) -> list[str]:
    """The leaf areas (communes) a bulletin reaches. Every target lies strictly below the
    sender: a bulletin goes down, never to the sender's own area, up or sideways."""
    targets = list(targets)
    for t in targets:
        if t == sender or not tree.contains(sender, t):
            raise InboxError(say("inbox.not_below", area=t), kind="forbidden", field="targets")
    return tree.resolve_leaves(targets)


def new_bulletin(sender: str, user: str, programme: Record, klass: str,
                 targets: list[str], now: float | None = None, **extra: object) -> Record:
    return {"id": uuid.uuid4().hex[:12], "area": sender, "user": user,
            "programme": programme["id"], "title": programme["title"], "class": klass,
            "targets": targets, "created": time.time() if now is None else now, **extra}


def media_programme(title: str, sender: str, user: str, *, media: Record | None = None,
                    text: str | None = None, now: float | None = None) -> Record:
    """The approved programme a media bulletin (or, with `text`, a spoken one) airs: stored
    with the bulletin, so its content is a programme like any other bulletin's."""
    at = time.time() if now is None else now
    body: Record = {"type": "file", "media": media["id"], "duration": media.get("duration")} \
        if media is not None else {"type": "tts", "text": text, "duration": None}
    return {"id": uuid.uuid4().hex[:12], "title": title, **body, "volume": 100,
            "repeat": 1, "gap": 0.0, "area": sender, "owner": user, "status": "approved",
            "approved_by": user, "approved_at": at, "created": at, "bulletin": True}


def emergency_content(programme: Record) -> Record:
    """What the emergency service airs of a programme: one media item or a text."""
    if programme.get("type") == "file":
        return {"media": programme["media"]}
    if programme.get("type") == "tts":
        return {"text": programme["text"]}
    raise InboxError(say("inbox.emergency_content"), field="programme")


def node_of(keys: Iterable[Record], tree: AreaTree, area: str) -> str | None:
    """The child node that serves a commune (the deepest live node key whose area holds it), or
    None when this node serves it itself."""
    best: tuple[int, str] | None = None
    for k in keys:
        if not k.get("revoked") and k["area"] in tree and area in tree \
                and tree.contains(k["area"], area):
            depth = tree.depth(k["area"])
            if best is None or depth > best[0]:
                best = (depth, k["id"])
    return best[1] if best else None


def entries(bulletin: Record, codes: Iterable[str],
            nodes: dict[str, str] | None = None) -> list[Record]:
    """One inbox entry per commune, in the state its class starts in; `nodes` names the child
    node of a commune served below this one."""
    state = FLOW[bulletin["class"]]
    nodes = nodes or {}
    return [{"id": uuid.uuid4().hex[:12], "bulletin": bulletin["id"], "area": code,
             "from": bulletin["area"], "class": bulletin["class"], "title": bulletin["title"],
             "programme": bulletin["programme"], "state": state,
             "order": DEFAULT_ORDER, "created": bulletin["created"],
             **({"node": nodes[code]} if code in nodes else {})} for code in codes]


def require_here(entry: Record) -> None:
    """An entry of a commune a child node serves is acted on there, not here."""
    if entry.get("node"):
        raise InboxError(say("inbox.at_child", node=entry["node"]), kind="conflict")


def require_pending(entry: Record, action: str) -> None:
    """Only a pending entry is scheduled or declined (checked before reading a request body)."""
    if entry["state"] != "pending":
        raise InboxError(say("inbox.not_pending", action=action, state=entry["state"]),
                         kind="conflict")


def scheduling(entry: Record, schedule_id: str, user: str) -> Record:
    require_pending(entry, "schedule")
    return {"state": "scheduled", "schedule": schedule_id, "by": user, "changed": time.time()}


def check_validity(bulletin: Record | None, schedule: Record, now: float | None = None) -> None:
    """A bulletin valid until a time (the central system's `valid_until`) is scheduled to air
    before it, or not at all."""
    until = (bulletin or {}).get("valid_until")
    if until is None:
        return
    start = time.time() if now is None else now
    if not occurrences(schedule, start, float(until)):
        at = dt.datetime.fromtimestamp(float(until), ZoneInfo(DEFAULT_TZ))
        raise InboxError(say("inbox.after_validity", until=at.strftime("%H:%M %d/%m/%Y")),
                         field="date" if schedule.get("kind") == "once" else "time")


def declining(entry: Record, reason: str, user: str) -> Record:
    require_pending(entry, "decline")
    reason = reason.strip()
    if not reason or len(reason) > MAX_REASON:
        raise InboxError(say("inbox.reason", limit=MAX_REASON), field="reason")
    return {"state": "declined", "reason": reason, "by": user, "changed": time.time()}


def ordering(entry: Record, order: str) -> Record:
    """Only a priority bulletin is ordered against the commune's own (an emergency always goes
    first, a normal one airs when the commune schedules it)."""
    if order not in ORDERS:
        raise InboxError(say("inbox.order", orders=", ".join(ORDERS)), field="order")
    if entry["class"] != "priority":
        raise InboxError(say("inbox.order_class"), kind="conflict", field="order")
    return {"order": order}


def after_own(entries_of_bulletin: Iterable[Record]) -> frozenset[str]:
    """The communes that put the bulletin after their own: what the engine ranks by."""
    return frozenset(e["area"] for e in entries_of_bulletin if e.get("order") == "after")


async def deliver(store: Store, station: Station, tree: AreaTree, bulletin: Record,
                  programme: Record, *, emergency: EmergencyService | None = None,
                  start: float | None = None, expires: float | None = None) -> list[Record]:
    """Store a bulletin and an entry per commune it reaches, then air it at once when its class
    says so, with the sender's authority: priority as a broadcast (from `start`, an epoch,
    when later), emergency through the emergency service; both end at `expires`. What the
    API's send, the exchange and a child receiving its parent's bulletin call. Returns the
    entries."""
    keys = await store.find("node_key")
    codes = tree.resolve_leaves(bulletin["targets"])
    made = entries(bulletin, codes, {c: n for c in codes if (n := node_of(keys, tree, c))})
    klass = bulletin["class"]
    content = None
    if klass == "emergency":  # a bad programme refuses before anything is stored
        spec = emergency_content(programme)
        if emergency is None:
            raise InboxError(say("inbox.emergency_unavailable"), field="class")
    elif klass == "priority":
        content = await station.programme_content(programme)
    if programme.get("bulletin"):  # a media bulletin's own programme
        await store.put("programme", programme)
    await store.create("bulletin", bulletin)  # stored before anything airs
    await store.put_many("inbox", made)
    if content is not None:
        rec = await station.air(content, targets=bulletin["targets"], klass=klass,
                                issuer=bulletin["area"], user=bulletin["user"],
                                spec={"programme": programme["id"]}, start=start,
                                until=expires, extra={"bulletin": bulletin["id"]})
        bulletin.update(await store.update("bulletin", bulletin["id"], {"broadcast": rec["id"]}))
    elif emergency is not None and klass == "emergency":
        em = await emergency.create(Request(
            targets=bulletin["targets"], content=spec, issuer=bulletin["area"],
            user=bulletin["user"], title=bulletin["title"], text=bulletin.get("text"),
            repeat=int(programme.get("repeat", 1)), gap=float(programme.get("gap", 0.0)),
            expires=expires))
        bulletin.update(await store.update("bulletin", bulletin["id"], {
            "broadcast": em["broadcast"], "emergency": em["id"]}))
    return made


async def apply_order(store: Store, engine: Engine, bulletin_id: str) -> None:
    """After a commune changed its order: re-rank the bulletin on air (from the next tick) and
    keep the order on its broadcast's record, so a restart airs it in the same order."""
    bid = ((await store.get("bulletin", bulletin_id)) or {}).get("broadcast")
    if bid and engine.live_broadcast(bid) is not None:
        after = after_own(await store.find("inbox", bulletin=bulletin_id))
        await store.update("broadcast", bid, {"after_own": sorted(after)})
        engine.reorder(bid, after)
