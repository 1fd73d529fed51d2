"""Alerts to the people responsible: webhooks (JSON, HMAC-signed) and e-mail (SMTP), with flap
damping and a daily digest, built on the node's alert registry (streamer/alerts.py).

Who is told: the contacts (store kind `alert_contact`, managed by the admins of an area through
`/api/v1/alert-contacts`) of the alert's area and of every area above it: a commune's officer
hears of the commune's clusters, the district's of its communes', the province's of all.

Every message goes through a store-backed outbox (relay/exchange.py's Outbox, kind
`alert_out`): stored first, then delivered and retried with capped backoff across restarts.
Message ids are (alert, its start, raised/cleared), so a restart that raises an alert again for
the same outage sends nothing twice.

Flap damping, per alert (kind, subject): at most `flap_max` messages in `flap_window` seconds,
counted from the first. Changes beyond that are held and counted; when the window ends one
`flapping` message says how many changes were held and the state now, and a new window starts
with it. A cluster bouncing 50 times in an hour (with the defaults 4 and 3600 s) sends 5
messages per contact: 4 as they happen and one summary.

The daily digest goes out at `digest_time` (local, Asia/Ho_Chi_Minh): the alerts active in each
contact's subtree and the number of changes of the last 24 hours.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.header import Header
from email.mime.text import MIMEText
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp

from loa.relay.exchange import Outbox
from loa.streamer.alerts import Alert, Alerts
from loa.streamer.areas import AreaTree
from loa.streamer.messages import say
from loa.streamer.state.store import Record, Store, StoreUnavailable

log = logging.getLogger("loa.notify")

CONTACTS = "alert_contact"
OUTBOX = "alert_out"
TZ = ZoneInfo("Asia/Ho_Chi_Minh")
DAY = 86400.0


@dataclass
class NotifySettings:
    """Config section [alerts] (env LOA_ALERTS_<KEY>)."""

    smtp_host: str = ""  # "" = no e-mail (webhooks only)
    smtp_port: int = 25
    smtp_from: str = "loa@localhost"
    smtp_user: str = ""
    smtp_password: str = field(default="", repr=False)  # never logged
    smtp_starttls: bool = False
    smtp_timeout: float = 10.0
    flap_window: float = 3600.0  # seconds; see the module docstring
    flap_max: int = 4
    digest_time: str = "07:00"  # local HH:MM; "" = no digest
    retry_min: float = 5.0  # a failed delivery is retried after this, doubling to retry_max
    retry_max: float = 600.0
    keep_days: float = 90.0  # sent messages are deleted this long after they were written

    def __post_init__(self) -> None:
        if self.keep_days <= 0:
            raise ValueError("[alerts] keep_days must be > 0")
        if self.flap_window <= 0 or self.flap_max < 1:
            raise ValueError("[alerts] flap_window must be > 0 and flap_max >= 1")
        if self.digest_time:
            try:
                datetime.strptime(self.digest_time, "%H:%M")
            except ValueError:
                raise ValueError("[alerts] digest_time must be HH:MM") from None


class Contacts:
    """The contacts in memory (read from the store at start, changed through `set`/`drop`),
    and the outbox's view of them: the webhook URL and secret of a webhook contact."""

    def __init__(self, settings: NotifySettings) -> None:
        self.by_id: dict[str, Record] = {}
        self.retry_min = settings.retry_min
        self.retry_max = settings.retry_max
        self.keep_days = settings.keep_days

    def set(self, rec: Record) -> None:
        self.by_id[rec["id"]] = rec

    def drop(self, cid: str) -> None:
        self.by_id.pop(cid, None)

    def push_url(self, peer: str) -> str | None:
        rec = self.by_id.get(peer)
        return rec.get("webhook") if rec else None

    def secret(self, peer: str) -> str | None:
        rec = self.by_id.get(peer)
        return rec.get("secret") if rec else None

    def for_area(self, tree: AreaTree, area: str) -> list[Record]:
        """Contacts of `area` and of every area above it."""
        above = set(tree.ancestors(area)) if area in tree else set()
        return [c for c in self.by_id.values() if c["area"] in above]


@dataclass
class _Flap:
    start: float  # when the current window began
    sent: int = 0  # messages sent in it
    held: int = 0  # changes held back in it
    last: Alert | None = None  # the latest change (sent or held)


class Notifier:
    """Listens to the node's alerts and tells the contacts (see the module docstring)."""

    def __init__(self, store: Store, tree: AreaTree, alerts: Alerts, settings: NotifySettings,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.tree = tree
        self.alerts = alerts
        self.settings = settings
        self.clock = clock  # wall clock; a test passes its own
        self.contacts = Contacts(settings)
        self.outbox = Outbox(store, self.contacts, OUTBOX, deliver=self._deliver)
        self._flaps: dict[tuple[str, str], _Flap] = {}
        self._recent: deque[tuple[float, str]] = deque()  # (when, area) of every change
        self._pending: set[asyncio.Task[None]] = set()
        self._tail: asyncio.Task[None] | None = None  # the last of them (see _spawn)
        self._ticker: asyncio.Task[None] | None = None
        self._next_digest = 0.0
        self.stats = {"sent": 0, "held": 0, "summaries": 0, "digests": 0, "mails": 0}

    def use_clock(self, clock: Callable[[], float]) -> None:
        """Run on another wall clock (a test's): the next digest is planned from it."""
        self.clock = clock
        self._next_digest = self._digest_after(clock())

    async def start(self) -> None:
        for rec in await self.store.find(CONTACTS):
            self.contacts.set(rec)
        self._next_digest = self._digest_after(self.clock())
        self.alerts.listeners.append(self.on_alert)
        self.outbox.start()
        self._ticker = asyncio.get_running_loop().create_task(self._tick_every())

    async def stop(self) -> None:
        if self.on_alert in self.alerts.listeners:
            self.alerts.listeners.remove(self.on_alert)
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        await self.settle()
        await self.outbox.stop()

    async def settle(self) -> None:
        """Wait until every change told so far is in the outbox."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    # ---- changes ---------------------------------------------------------------------------
    def on_alert(self, alert: Alert) -> None:
        """An alerts listener (synchronous): decide now, store the messages in a task."""
        now = self.clock()
        self._recent.append((now, alert.area))
        while self._recent and self._recent[0][0] < now - DAY:
            self._recent.popleft()
        f = self._flaps.get(alert.key)
        if f is None or now - f.start >= self.settings.flap_window:
            if f is not None and f.held:
                self._summary(f)  # not ticked yet: the window ended before this change
            f = self._flaps[alert.key] = _Flap(now)
        f.last = alert
        if f.sent < self.settings.flap_max:
            f.sent += 1
            self.stats["sent"] += 1
            self._spawn(self._tell(alert, _state(alert), 0))
        else:
            f.held += 1
            self.stats["held"] += 1

    async def tick(self) -> None:
        """Send the summaries of windows that ended and the digest when it is due; read the
        contacts again (another node of a cluster may have changed them)."""
        try:
            self.contacts.by_id = {r["id"]: r for r in await self.store.find(CONTACTS)}
        except StoreUnavailable:
            pass  # the ones known stay
        now = self.clock()
        for key, f in list(self._flaps.items()):
            if now - f.start >= self.settings.flap_window:
                if f.held:
                    self._summary(f)
                    self._flaps[key] = _Flap(now, sent=1, last=f.last)
                elif f.last is not None and f.last.cleared is not None:
                    del self._flaps[key]  # over and quiet: forgotten
        if self.settings.digest_time and now >= self._next_digest:
            day = datetime.fromtimestamp(self._next_digest, TZ).date().isoformat()
            self._next_digest = self._digest_after(now)
            self._spawn(self._digest(day, now))
        await self.settle()

    def _summary(self, f: _Flap) -> None:
        assert f.last is not None
        self.stats["summaries"] += 1
        self._spawn(self._tell(f.last, "flapping", f.held))

    def _spawn(self, coro: Any) -> None:
        """Store messages in the order of the changes (a `cleared` never before its
        `raised`): each task waits for the one before it."""
        before = self._tail

        async def in_order() -> None:
            if before is not None:
                await asyncio.gather(before, return_exceptions=True)
            await coro

        task = self._tail = asyncio.get_running_loop().create_task(in_order())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _tick_every(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, self.settings.flap_window / 4))
            try:
                await self.tick()
            except Exception:
                log.exception("alert tick failed event=notify_error")

    # ---- messages ---------------------------------------------------------------------------
    async def _tell(self, alert: Alert, state: str, held: int) -> None:
        """One message per contact responsible for the alert's area, into the outbox."""
        at = self.clock()
        mid = f"{alert.kind}:{alert.subject}:{alert.since:.3f}:{state}"
        if state == "flapping":
            mid += f":{at:.3f}"
        message: Record = {
            "id": mid, "type": "alert", "state": state, "kind": alert.kind,
            "subject": alert.subject, "area": alert.area, "severity": alert.severity,
            "text": alert.text, "since": alert.since, "cleared": alert.cleared,
            "detail": alert.detail, "held": held, "at": at}
        for c in self.contacts.for_area(self.tree, alert.area):
            await self._put(c, message)

    async def _digest(self, day: str, now: float) -> None:
        self.stats["digests"] += 1
        for c in list(self.contacts.by_id.values()):
            inside = c["area"]
            active = [a for a in self.alerts.active.values()
                      if a.area in self.tree and self.tree.contains(inside, a.area)]
            changes = sum(1 for t, area in self._recent if t >= now - DAY and area in self.tree
                          and self.tree.contains(inside, area))
            await self._put(c, {
                "id": f"digest:{day}", "type": "digest", "day": day, "area": inside,
                "changes": changes, "at": now,
                "active": [{"kind": a.kind, "subject": a.subject, "area": a.area,
                            "text": a.text, "since": a.since} for a in
                           sorted(active, key=lambda a: (a.area, a.since))]})

    async def _put(self, contact: Record, message: Record) -> None:
        try:
            await self.outbox.put(contact["id"], message, push=True)
        except Exception as e:  # noqa: BLE001 - a store outage: logged, the alert stays active
            log.error("alert message not stored event=notify_error contact=%s error=%s",
                      contact["id"], e)

    async def _deliver(self, http: aiohttp.ClientSession, rec: Record) -> bool:
        contact = self.contacts.by_id.get(rec["peer"])
        if contact is None:
            return True  # the contact was removed: nothing to deliver
        if contact.get("webhook"):
            return await self.outbox.push(http, rec)
        if not self.settings.smtp_host:
            log.warning("no SMTP server for an alert mail event=notify_no_smtp contact=%s",
                        contact["id"])
            return False
        mail = render_mail(rec["message"], self.settings.smtp_from, contact["email"], self.tree)
        try:
            await asyncio.to_thread(send_mail, self.settings, mail)
        except (OSError, smtplib.SMTPException) as e:
            log.info("mail failed event=notify_mail_failed contact=%s error=%s",
                     contact["id"], type(e).__name__)
            return False
        self.stats["mails"] += 1
        return True

    # ---- the digest's time ------------------------------------------------------------------
    def _digest_after(self, now: float) -> float:
        """The first digest time (local) strictly after `now`."""
        if not self.settings.digest_time:
            return float("inf")
        hh, mm = (int(x) for x in self.settings.digest_time.split(":"))
        local = datetime.fromtimestamp(now, TZ)
        at = local.replace(hour=hh, minute=mm, second=0, microsecond=0)
        if at.timestamp() <= now:
            at = (local + timedelta(days=1)).replace(hour=hh, minute=mm, second=0,
                                                     microsecond=0)
        return at.timestamp()


def _state(alert: Alert) -> str:
    return "raised" if alert.cleared is None else "cleared"


# ---- e-mail -------------------------------------------------------------------------------------
def _local(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, TZ).strftime("%H:%M %d/%m/%Y")


def _area_name(tree: AreaTree, code: str) -> str:
    return f"{tree.get(code).name} ({code})" if code in tree else code


def render_mail(message: Record, sender: str, to: str, tree: AreaTree) -> MIMEText:
    """The mail of an outbox message: Vietnamese first, English second (each line "vi / en").
    The subject is one RFC 2047 Header: the default policy's folding drops the space between
    an encoded word and the next (Vietnamese subjects came out as "(T01)mất")."""
    if message["type"] == "digest":
        title = "[Loa] " + say("notify.digest_subject", day=message["day"],
                               area=_area_name(tree, message["area"]),
                               n=len(message["active"]))
        lines = [say("notify.digest_intro", area=_area_name(tree, message["area"]),
                     n=len(message["active"]), changes=message["changes"]), ""]
        lines += [f"- {a['text']} ({say('notify.since', at=_local(a['since']))})"
                  for a in message["active"]] or [say("notify.digest_none")]
    else:
        where = {"area": _area_name(tree, message["area"]), "since": _local(message["since"])}
        if message["state"] == "raised":
            what = say("notify.raised", **where)
        elif message["state"] == "cleared":
            what = say("notify.cleared", cleared=_local(message["cleared"]), **where)
        else:
            what = say("notify.flapping", held=message["held"], area=where["area"])
        title = "[Loa] " + message["text"]
        lines = [message["text"], "", what]
        faults = message.get("detail", {}).get("faults")
        if faults:
            lines.append(say("notify.faults", faults=", ".join(faults)))
    lines += ["", say("notify.footer")]
    mail = MIMEText("\n".join(lines) + "\n", "plain", "utf-8")
    mail["Subject"] = Header(title, "utf-8")  # type: ignore[assignment]  # compat32 takes it
    mail["From"] = sender
    mail["To"] = to
    return mail


def send_mail(settings: NotifySettings, mail: MIMEText) -> None:
    """Blocking SMTP send (run it in a thread)."""
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port,
                      timeout=settings.smtp_timeout) as smtp:
        if settings.smtp_starttls:
            smtp.starttls(context=ssl.create_default_context())
        if settings.smtp_user:
            smtp.login(settings.smtp_user, settings.smtp_password)
        smtp.send_message(mail)
