"""The on-air engine: every tick, decide what each area hears, mix it once, encode it once.

Per tick (20 ms) the engine
1. applies queued commands (start/stop) and due events (scheduled starts and ends, sources that
   finished or failed), re-arbitrating only the areas they touch;
2. regroups those areas into mixes: areas whose layers are equal share one `Mix`;
3. reads every playhead once, renders every mix that someone consumes, encodes it in the codecs
   its areas' subscribers want, and hands the packets to the hub.

Arbitration (DESIGN.md "Priority") is decided by `arbiter`: highest class, then highest authority,
then earliest start. The engine carries the decision out: a preempted `resume` programme
pauses and later resumes at the exact sample where it stopped; `skip` drops it in that area; an
`overlay` ducks what is under it. Every switch is a short crossfade, never a click.

The engine is synchronous and single-threaded by design: the real clock calls `tick` from its own
thread, tests call it from a virtual clock. Commands from other threads go through a queue.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from loa.codecs.encoders import Encoder, EncoderSettings, Packet
from loa.streamer import arbiter
from loa.streamer.airtime import Airtime, Rule
from loa.streamer.areas import AreaTree
from loa.streamer.broadcast import Broadcast, BroadcastClass, Policy
from loa.streamer.clock import FRAME, SAMPLE_RATE, tick_of
from loa.streamer.errors import Kind, LoaError
from loa.streamer.hub import PacketHub
from loa.streamer.messages import say
from loa.streamer.mixer import Envelope, Key, Mix, Renderer, db, ramp
from loa.streamer.sources import Source

log = logging.getLogger("loa.engine")

PCM = "pcm"  # pseudo-codec: raw 48 kHz float32 frames, for taps, tests and meters


class AuthorityError(LoaError, PermissionError):
    """A lower authority tried to stop or change a higher authority's broadcast."""

    kind: Kind = "forbidden"


@dataclass
class EngineSettings:
    fade_ms: float = 10.0  # crossfade on every switch (at most 30 ms)
    duck_db: float = -15.0  # how far an overlay ducks what is under it
    duck_ramp_ms: float = 200.0
    history_ticks: int = 8
    encoders: EncoderSettings = field(default_factory=EncoderSettings)

    def __post_init__(self) -> None:
        if not 0 < self.fade_ms <= 30:
            raise ValueError("fade_ms must be within (0, 30]")


@dataclass
class OnAirChange:
    """Who is on air in an area changed, and why."""

    area: str
    tick: int
    sample: int
    before: str | None
    after: str | None
    cause: str
    by: str | None = None  # the broadcast whose start/stop/end caused the change
    resumed_at: int | None = None  # the new programme resumes at this sample of its source

    def as_dict(self) -> dict[str, object]:
        return {
            "area": self.area,
            "time": self.sample / SAMPLE_RATE,
            "sample": self.sample,
            "from": self.before,
            "to": self.after,
            "cause": self.cause,
            "by": self.by,
            "resumed_at": self.resumed_at,
        }


class Playhead:
    """A cursor into a broadcast's source, shared by every area that hears the same samples."""

    _ids = 0

    def __init__(self, bid: str, source: Source) -> None:
        Playhead._ids += 1
        self.id = Playhead._ids
        self.bid = bid
        self.source = source
        self.failed = False


class _Live:
    """Runtime state of an accepted broadcast."""

    def __init__(self, b: Broadcast, authority: int, start_tick: int, end_tick: int | None,
                 areas: list[str]) -> None:
        self.b = b
        self.authority = authority
        self.start_tick = start_tick
        self.end_tick = end_tick
        self.areas = areas
        self.active = False
        self.remaining: set[str] = set()
        self.shared: Playhead | None = None  # live (unseekable) sources: one playhead for all
        self.candidate = arbiter.Candidate(b.id, b.cls, authority, start_tick, b.seq,
                                           b.policy is Policy.overlay)
        self.yielding: dict[str, arbiter.Candidate] = {}  # area -> its rank under `after_own`

    def order(self, tree: AreaTree, within: Iterable[str] | None = None) -> set[str]:
        """Rank it in each area of a commune in `b.after_own` as that commune's, after its own;
        only below `within` (the communes whose choice changed) when given. Returns the areas
        whose rank changed."""
        if within is None:
            codes: Iterable[str] = self.areas
        else:
            mine = set(self.areas)
            codes = [c for w in within if w in tree for c in tree.subtree(w) if c in mine]
        changed = set()
        for code in codes:
            commune = next((a for a in tree.ancestors(code) if a in self.b.after_own), None)
            rank = None if commune is None else dataclasses.replace(
                self.candidate, authority=tree.depth(commune), yields=True)
            if self.yielding.get(code) != rank:
                changed.add(code)
                if rank is None:
                    del self.yielding[code]
                else:
                    self.yielding[code] = rank
        return changed

    def candidate_in(self, code: str) -> arbiter.Candidate:
        return self.yielding.get(code, self.candidate)


class _AreaState:
    def __init__(self, code: str) -> None:
        self.code = code
        self.candidates: set[str] = set()
        self.main: str | None = None
        self.overlays: tuple[str, ...] = ()
        self.paused: dict[str, int] = {}
        self.held: dict[str, set[str]] = {}  # bid -> why it is off the air here (Engine.hold)
        self.layers: dict[str, tuple[Playhead, Envelope]] = {}  # bid -> (playhead, envelope)
        self.fading: list[tuple[Playhead, Envelope]] = []  # outgoing layers, fading to 0
        self.mix: Mix | None = None
        self.since: int = 0

    def key(self) -> Key:
        layers = [(ph.id, env) for ph, env in self.layers.values()]
        layers += [(ph.id, env) for ph, env in self.fading]
        return tuple(sorted(layers, key=lambda x: (x[0], x[1].start, x[1].g0, x[1].g1)))

    def ramping(self) -> bool:
        return bool(self.fading) or any(not env.constant for _, env in self.layers.values())


class Engine:
    def __init__(self, tree: AreaTree, settings: EngineSettings | None = None,
                 hub: PacketHub | None = None) -> None:
        self.tree = tree
        self.settings = settings or EngineSettings()
        self.hub = hub or PacketHub()
        self.n = 0  # the tick being rendered (or next to render)
        self.fade = int(self.settings.fade_ms * SAMPLE_RATE / 1000)
        self.duck_ramp = int(self.settings.duck_ramp_ms * SAMPLE_RATE / 1000)
        self.areas: dict[str, _AreaState] = {a.code: _AreaState(a.code) for a in tree}
        self.broadcasts: dict[str, _Live] = {}
        self.mixes: dict[Key, Mix] = {}
        self.renderer = Renderer()
        self.playheads: dict[int, Playhead] = {}
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._dirty: dict[str, tuple[str, str | None]] = {}  # area -> (cause, by)
        self._ramping: set[str] = set()
        self._pending: list[_Live] = []  # accepted, start tick in the future
        self._fresh: dict[tuple[str, int, int], Playhead] = {}
        self._fresh_tick = -1
        self.changes: deque[OnAirChange] = deque(maxlen=10_000)
        self.listeners: list[Callable[[OnAirChange], None]] = []
        self.started_listeners: list[Callable[[Broadcast], None]] = []  # on the air (tick thread)
        self.ended_listeners: list[Callable[[Broadcast, str], None]] = []
        self.stats = {"ticks": 0, "mix_renders": 0, "encodes": 0, "source_errors": 0}
        self.airtime: Airtime | None = None  # quiet hours and time-of-day volume (tick thread)
        self._air_areas: dict[Rule, list[str]] = {}
        self._air_state: dict[Rule, tuple[bool, int]] = {}
        silence = self._mix_for(())
        for code in self.areas:
            self.areas[code].mix = silence
            silence.areas.add(code)

    # ---- commands (any thread) ---------------------------------------------------------------
    def start(self, b: Broadcast) -> str:
        """Accept a broadcast; it goes on air at its start (or the next tick). Returns its id."""
        for t in b.targets:
            self.tree.get(t)  # AreaError for an unknown target, before anything changes
        authority = self.tree.depth(b.issuer)
        areas = self.tree.covered(b.targets)
        start_tick = self.n if b.start is None else tick_of(b.start)
        end_tick = None if b.end is None else tick_of(b.end)
        live = _Live(b, authority, start_tick, end_tick, areas)
        live.order(self.tree)
        self.broadcasts[b.id] = live  # visible to stop() at once; airs from the tick thread
        self._commands.put(lambda: self._accept(live))
        return b.id

    def stop(self, bid: str, by_area: str | None = None, cause: str = "stopped") -> None:
        """Stop a broadcast everywhere. `by_area` must be the issuer's area or above it."""
        live = self.broadcasts.get(bid)
        if live is None:
            raise KeyError(bid)
        if by_area is not None and not self.tree.contains(by_area, live.b.issuer):
            raise AuthorityError(say("broadcast.not_yours", area=by_area, issuer=live.b.issuer))
        self._commands.put(lambda: self._end(live, cause))

    def hold(self, bid: str, reason: str, on: bool = True,
             areas: Iterable[str] | None = None) -> None:
        """Take a broadcast off the air in `areas` (default: all it covers) without ending it,
        or give it back (`on=False`): its input is gone, it airs dead air. Its areas fall back
        to what ranks next at the next tick (on-air cause `reason`, then `reason-over`); holds
        of different reasons add up; a held live source keeps being read in real time."""
        live = self.broadcasts.get(bid)
        if live is None:
            raise KeyError(bid)
        codes = None if areas is None else list(areas)
        self._commands.put(lambda: self._hold(live, reason, on, codes))

    def _hold(self, live: _Live, reason: str, on: bool, codes: list[str] | None) -> None:
        bid = live.b.id
        if bid not in self.broadcasts:
            return
        for code in live.areas if codes is None else codes:
            st = self.areas.get(code)
            if st is None:
                continue
            reasons = st.held.setdefault(bid, set())
            was = bool(reasons)
            (reasons.add if on else reasons.discard)(reason)
            if not reasons:
                del st.held[bid]
            if was != bool(reasons) and bid in st.candidates:
                self._mark(code, reason if on else f"{reason}-over", bid)

    def held(self, bid: str, area: str) -> bool:
        """The broadcast is held off the air in the area (any thread)."""
        st = self.areas.get(area)
        return st is not None and bool(st.held.get(bid))

    def reorder(self, bid: str, after_own: frozenset[str]) -> None:
        """Change the communes that put a broadcast after their own (TT 39: the commune orders
        a priority clash); the areas whose order changed re-arbitrate at the next tick."""
        live = self.broadcasts.get(bid)
        if live is None:
            raise KeyError(bid)

        def apply() -> None:
            changed = live.b.after_own ^ after_own
            live.b.after_own = after_own
            for code in live.order(self.tree, changed):
                if live.active and live.b.id in self.areas[code].candidates:
                    self._mark(code, "reorder", live.b.id)

        self._commands.put(apply)

    def set_airtime(self, airtime: Airtime | None) -> None:
        """New quiet hours and volumes (streamer/airtime.py); every area re-arbitrates at the
        next tick."""

        def apply() -> None:
            old = set(self.airtime.rules) if self.airtime else set()
            self.airtime = airtime
            self._air_areas = airtime.by_rule() if airtime else {}
            self._air_state = airtime.state(self.n) if airtime else {}
            for code in old | set(airtime.rules if airtime else ()):
                if code in self.areas:
                    self._mark(code, "airtime", None)

        self._commands.put(apply)

    def _airtime_tick(self, n: int) -> None:
        """Mark the areas whose rule says something else at this tick than at the last."""
        assert self.airtime is not None
        state = self.airtime.state(n)
        for rule, now in state.items():
            if self._air_state.get(rule) != now:
                for code in self._air_areas.get(rule, ()):
                    if code in self.areas:
                        self._mark(code, "quiet_hours", None)
        self._air_state = state

    def add_area(self, code: str) -> None:
        """An area added to the tree (API, import) gets its state; it hears its ancestors'
        broadcasts from the next tick."""
        self.tree.get(code)
        self._commands.put(lambda: self._add_area(code))

    def _add_area(self, code: str) -> None:
        if code in self.areas:
            return
        st = _AreaState(code)
        self.areas[code] = st
        silence = self._mix_for(())
        silence.areas.add(code)
        silence.codecs_version = -1
        st.mix = silence
        above = set(self.tree.ancestors(code))
        for live in list(self.broadcasts.values()):
            if live.active and above & set(live.b.targets):
                live.areas.append(code)
                live.remaining.add(code)
                live.order(self.tree)
                st.candidates.add(live.b.id)
        self._mark(code, "start", None)

    def on_air(self, area: str) -> dict[str, object]:
        code = self.tree.get(area).code
        st = self.areas.get(code) or _AreaState(code)  # added to the tree, not yet ticked
        main = self.broadcasts.get(st.main) if st.main else None
        return {
            "area": area,
            # a broadcast stopped since the last tick is gone, though the area's next tick has
            # yet to switch: nothing (a half record with no class) is reported on air
            "broadcast": st.main if main else None,
            "title": main.b.title if main else None,
            "class": main.b.cls.name if main else None,
            "issuer": main.b.issuer if main else None,
            "overlays": list(st.overlays),
            "since": st.since * FRAME / SAMPLE_RATE,
            "mix": st.mix.id if st.mix else None,
        }

    def active(self) -> list[Broadcast]:
        """The broadcasts on the air now (accepted and started), any thread."""
        return [live.b for live in list(self.broadcasts.values()) if live.active]

    def main_of(self, area: str) -> str | None:
        """The id of the broadcast an area hears now (None: silence or an unknown area)."""
        st = self.areas.get(area)
        return st.main if st else None

    def overlays_of(self, area: str) -> tuple[str, ...]:
        """The overlays an area hears over its main broadcast now (any thread)."""
        st = self.areas.get(area)
        return st.overlays if st else ()

    def live_broadcast(self, bid: str) -> Broadcast | None:
        live = self.broadcasts.get(bid)
        return live.b if live else None

    @property
    def media_time(self) -> float:
        return self.n * FRAME / SAMPLE_RATE

    @property
    def next_tick(self) -> int:
        """The first tick a command given now can still take effect on."""
        return self.n + 1 if self.stats["ticks"] else self.n

    def idle(self) -> bool:
        """Nothing on air, nothing fading, nothing queued: ticks until the next event are silent."""
        return (not self.broadcasts and self._commands.empty() and not self._ramping
                and not self._dirty)

    def next_pending_tick(self) -> int | None:
        return self._pending[0].start_tick if self._pending else None

    def encoder_count(self) -> int:
        return sum(len(m.encoders) for m in self.mixes.values())

    def consumed_mixes(self) -> list[Mix]:
        return [m for m in self.mixes.values() if m.codecs]

    # ---- the tick ----------------------------------------------------------------------------
    def tick(self, n: int) -> None:
        self.n = n
        s = n * FRAME
        self._run_commands()
        self._due(n)
        self._run_commands()  # what started listeners asked (a hold) acts in the start's tick
        if self.airtime is not None:
            self._airtime_tick(n)
        regroup: set[str] = set()
        dirty, self._dirty = self._dirty, {}
        for code, (cause, by) in dirty.items():
            self._arbitrate(self.areas[code], n, cause, by)
            regroup.add(code)
        for code in list(self._ramping):
            st = self.areas[code]
            if self._settle(st, s):
                regroup.add(code)
            if not st.ramping():
                self._ramping.discard(code)
        if regroup:
            self._regroup(regroup)
        self._render(n, s)
        self.stats["ticks"] += 1

    def _run_commands(self) -> None:
        while True:
            try:
                self._commands.get_nowait()()
            except queue.Empty:
                break

    def _accept(self, live: _Live) -> None:
        if live.b.id not in self.broadcasts:
            return  # stopped before it was accepted
        if live.start_tick <= self.n:
            self._activate(live)
        else:
            self._pending.append(live)
            self._pending.sort(key=lambda x: x.start_tick)

    def _activate(self, live: _Live) -> None:
        live.active = True
        live.remaining = set(live.areas)
        log.info("broadcast on event=broadcast_start id=%s class=%s issuer=%s targets=%s title=%r",
                 live.b.id, live.b.cls.name, live.b.issuer, ",".join(live.b.targets),
                 live.b.title)
        for code in live.areas:
            self.areas[code].candidates.add(live.b.id)
            self._mark(code, "start", live.b.id)
        for cb in self.started_listeners:
            cb(live.b)

    def _mark(self, code: str, cause: str, by: str | None) -> None:
        # The first cause of a tick wins: it is the event that made the area change.
        self._dirty.setdefault(code, (cause, by))

    def _due(self, n: int) -> None:
        while self._pending and self._pending[0].start_tick <= n:
            self._activate(self._pending.pop(0))
        for live in list(self.broadcasts.values()):
            if live.active and live.end_tick is not None and live.end_tick <= n:
                self._end(live, live.b.end_cause)

    def _end(self, live: _Live, cause: str) -> None:
        if live in self._pending:
            self._pending.remove(live)
        for code in list(live.remaining):
            self._drop(code, live.b.id, cause)
        self._finish(live, cause)

    def _drop(self, code: str, bid: str, cause: str, mark: bool = True) -> None:
        """The broadcast is over in this area (ended, finished, skipped, failed, stopped)."""
        st = self.areas[code]
        st.candidates.discard(bid)
        st.paused.pop(bid, None)
        if mark:
            self._mark(code, cause, bid)
        live = self.broadcasts.get(bid)
        if live is not None:
            live.remaining.discard(code)
            if not live.remaining and live.active:
                self._finish(live, cause)

    def _finish(self, live: _Live, cause: str) -> None:
        if self.broadcasts.pop(live.b.id, None) is None:
            return
        live.active = False
        for code in live.areas:
            if code in self.areas:
                self.areas[code].held.pop(live.b.id, None)
        log.info("broadcast over event=broadcast_end id=%s cause=%s", live.b.id, cause)
        for cb in self.ended_listeners:
            cb(live.b, cause)

    # ---- arbitration -------------------------------------------------------------------------
    def _arbitrate(self, st: _AreaState, n: int, cause: str, by: str | None) -> None:
        s = n * FRAME
        air = self.airtime
        decision = arbiter.decide(self.broadcasts[b].candidate_in(st.code)
                                  for b in st.candidates
                                  if b in self.broadcasts and b not in st.held and (
                                      air is None or air.allows(st.code,
                                                                self.broadcasts[b].b.cls, n)))
        new_main, overlays = decision.main, decision.overlays
        main = self.broadcasts[new_main] if new_main else None
        audible = decision.audible
        resumed_at: int | None = None

        # Outgoing layers fade out; preempted `resume` programmes remember where they stopped.
        for bid in list(st.layers):
            if bid in audible:
                continue
            ph, env = st.layers.pop(bid)
            g = env.at(s)
            if g > 0 and not ph.failed and not ph.source.finished:
                st.fading.append((ph, ramp(s, g, 0.0, self.fade)))
            if bid in st.candidates:
                lv = self.broadcasts[bid]
                if lv.b.policy is Policy.skip and bid not in st.held:
                    self._drop(st.code, bid, "skipped", mark=False)
                elif ph.source.seekable:
                    st.paused[bid] = ph.source.position

        duck = db(main.b.duck_db if main and main.b.duck_db is not None else self.settings.duck_db)
        if overlays:
            ov = self.broadcasts[overlays[0]].b
            duck = db(ov.duck_db if ov.duck_db is not None else self.settings.duck_db)
        for bid in audible:
            lv = self.broadcasts[bid]
            target = lv.b.gain * (duck if bid == new_main and overlays else 1.0)
            if air is not None:
                target *= air.gain(st.code, lv.b.cls, n)
            if bid in st.layers:
                ph, env = st.layers[bid]
                g = env.at(s)
                if g != target or env.g1 != target:
                    st.layers[bid] = (ph, ramp(s, g, target, self.duck_ramp))
            else:
                at = st.paused.pop(bid, None)
                if bid == new_main:
                    resumed_at = at
                # Never heard here yet: from where the broadcast's own cursor stands (0, or the
                # offset a restart resumes at).
                ph = self._playhead(lv, lv.b.source.position if at is None else at, n)
                st.layers[bid] = (ph, ramp(s, 0.0, target, self.fade))

        sw = arbiter.switch(st.main, decision, n, cause, by)
        if sw is not None:
            change = OnAirChange(st.code, sw.tick, sw.sample, sw.before, sw.after, sw.cause, by,
                                 resumed_at)
            st.main = new_main
            st.since = n
            self.changes.append(change)
            log.info("on-air change event=on_air area=%s from=%s to=%s cause=%s by=%s",
                     st.code, change.before, change.after, change.cause, by)
            for cb in self.listeners:
                cb(change)
        st.overlays = overlays
        if st.ramping():
            self._ramping.add(st.code)

    def _playhead(self, live: _Live, position: int, n: int) -> Playhead:
        src = live.b.source
        if not src.seekable:
            if live.shared is None:
                live.shared = Playhead(live.b.id, src)
            # (again after a preemption or a hold: the cursor is dropped while no area hears it)
            self.playheads[live.shared.id] = live.shared
            return live.shared
        # Areas that (re)start this broadcast at the same sample in the same tick share a cursor.
        key = (live.b.id, position, n)
        ph = self._fresh.get(key) if self._fresh_tick == n else None
        if ph is None:
            if self._fresh_tick != n:
                self._fresh = {}
                self._fresh_tick = n
            ph = Playhead(live.b.id, src.at(position))
            self._fresh[key] = ph
            self.playheads[ph.id] = ph
        return ph

    def _settle(self, st: _AreaState, s: int) -> bool:
        """Drop finished fade-outs and freeze finished ramps. True when the key changed."""
        changed = False
        if st.fading:
            fading = [(ph, env) for ph, env in st.fading if s < env.start + env.length]
            changed = len(fading) != len(st.fading)
            st.fading = fading
        for bid, (ph, env) in st.layers.items():
            settled = env.settled(s)
            if settled is not env:
                st.layers[bid] = (ph, settled)
                changed = True
        return changed

    # ---- grouping ----------------------------------------------------------------------------
    def _mix_for(self, key: Key, parent: Mix | None = None) -> Mix:
        mix = self.mixes.get(key)
        if mix is None:
            mix = Mix(key, self.settings.history_ticks, parent)
            self.mixes[key] = mix
        return mix

    def _regroup(self, codes: set[str]) -> None:
        moves: dict[Mix, dict[Key, list[str]]] = defaultdict(lambda: defaultdict(list))
        for code in codes:
            st = self.areas[code]
            k = st.key()
            assert st.mix is not None
            if st.mix.key != k:
                moves[st.mix][k].append(code)
        for mix, groups in moves.items():
            leaving = {c for g in groups.values() for c in g}
            staying = mix.areas - leaving
            for k, group in sorted(groups.items(), key=lambda kv: -len(kv[1])):
                target = self.mixes.get(k)
                if target is None and not staying:
                    # The whole mix changes together: keep it (and its encoders), new key.
                    del self.mixes[mix.key]
                    mix.key = k
                    self.mixes[k] = mix
                    staying = set(group)
                    continue
                if target is None:
                    target = self._mix_for(k, parent=mix)
                for code in group:
                    mix.areas.discard(code)
                    target.areas.add(code)
                    self.areas[code].mix = target
                target.codecs_version = -1
            mix.codecs_version = -1
            if not mix.areas and self.mixes.get(mix.key) is mix:
                del self.mixes[mix.key]
                mix.close()

    # ---- rendering ---------------------------------------------------------------------------
    def _tail_faded(self, length: int | None, first: int, frame: np.ndarray) -> np.ndarray:
        """Fade out the last `fade` samples of a finite source: its end is a switch too.

        `first` is the source position of the frame's first sample.
        """
        if length is None or first + FRAME <= length - self.fade:
            return frame
        idx = np.arange(first, first + FRAME)
        return frame * np.clip((length - idx) / self.fade, 0.0, 1.0).astype(np.float32)

    def _render(self, n: int, s: int) -> None:
        hub = self.hub
        version = hub.version
        wanted: dict[str, set[str]] | None = None
        used: dict[int, list[Mix]] = defaultdict(list)
        consumed: list[Mix] = []
        for mix in self.mixes.values():
            if mix.codecs_version != version:
                if wanted is None:
                    wanted = hub.wanted()
                if len(wanted) < len(mix.areas):  # few listened areas, a mix of thousands
                    mix.codecs = set().union(*(c for a, c in wanted.items() if a in mix.areas))
                else:
                    mix.codecs = set().union(*(wanted.get(a, set()) for a in mix.areas))
                mix.codecs_version = version
                for codec in list(mix.encoders):
                    if codec not in mix.codecs:
                        del mix.encoders[codec]
            for ph_id, _ in mix.key:
                used[ph_id].append(mix)
            if mix.codecs:
                consumed.append(mix)

        # Read every playhead once; nobody listening: just advance it.
        frames: dict[int, np.ndarray] = {}
        # Stored PCM (the library's 16-bit maps) is converted for all playheads at once.
        stored: dict[np.dtype, list[tuple[int, Playhead, int, np.ndarray, float]]] = \
            defaultdict(list)
        needed = {ph for m in consumed for ph, _ in m.key}
        for ph_id in list(self.playheads):
            ph = self.playheads[ph_id]
            if ph_id not in used:
                del self.playheads[ph_id]  # no area hears this cursor any more
                continue
            try:
                if ph_id in needed:
                    first = ph.source.position
                    run = ph.source.read_stored(FRAME)
                    if run is not None:
                        stored[run[0].dtype].append((ph_id, ph, first, run[0], run[1]))
                    else:
                        frame = ph.source.read(FRAME)
                        frames[ph_id] = self._tail_faded(ph.source.length, first, frame)
                else:
                    ph.source.skip(FRAME)
            except Exception as e:  # a failing source must never stop the stream
                self.stats["source_errors"] += 1
                log.error("source failed event=source_error broadcast=%s source=%r error=%s",
                          ph.bid, ph.source.name, e)
                frames[ph_id] = np.zeros(FRAME, dtype=np.float32)
                ph.failed = True
            if ph.failed or ph.source.finished:
                cause = "source-error" if ph.failed else "finished"
                for mix in used[ph_id]:
                    for code in mix.areas:
                        st = self.areas[code]
                        layer = st.layers.get(ph.bid)
                        if layer is not None and layer[0] is ph:
                            self._drop(code, ph.bid, cause)
        for group in stored.values():
            raw = np.concatenate([g[3] for g in group]).reshape(len(group), FRAME)
            scales = np.array([g[4] for g in group], dtype=np.float32)[:, None]
            converted = np.multiply(raw, scales, dtype=np.float32)
            for (ph_id, ph, first, _, _), frame in zip(group, converted, strict=True):
                frames[ph_id] = self._tail_faded(ph.source.length, first, frame)
        # Live sources nobody hears right now still run in real time (drain their buffers).
        for live in list(self.broadcasts.values()):
            if live.active and live.shared is not None and live.shared.id not in used:
                live.shared.source.skip(FRAME)

        pcm = self.renderer.render(consumed, s, frames)
        self.stats["mix_renders"] += len(consumed)
        by_codec: dict[str, list[int]] = defaultdict(list)
        for i, mix in enumerate(consumed):
            for codec in mix.codecs:
                by_codec[codec].append(i)
        enc_settings = self.settings.encoders
        for codec, rows in by_codec.items():
            mixes = [consumed[i] for i in rows]
            if codec == PCM:
                out = [[Packet(PCM, s, FRAME, pcm[i].tobytes(), SAMPLE_RATE)] for i in rows]
            else:
                # A new encoder first catches up on the mix's recent audio, then all encode.
                primed = [mix.open_encoder(codec, s, enc_settings)
                          if codec not in mix.encoders else [] for mix in mixes]
                fresh = Encoder.encode_rows([mix.encoders[codec] for mix in mixes],
                                            pcm if len(rows) == len(consumed) else pcm[rows])
                out = [p + f for p, f in zip(primed, fresh, strict=True)]
                self.stats["encodes"] += len(rows)
            for mix, packets in zip(mixes, out, strict=True):
                if not packets:
                    continue
                for code in mix.areas:
                    hub.publish(code, codec, packets)
        hub.flush()


def class_of(value: str) -> BroadcastClass:
    return BroadcastClass.parse(value)
