"""Relay inputs ("tiếp sóng"): programmes of type relay air an outside stream.

`RelayInputs.factory(programme)`, the station's `relay_factory`, starts a `RelayInput` for `programme["url"]` and returns its
LivePush, which the station airs like any source. The input's life follows its broadcast: the
engine's `ended_listeners` (however the broadcast ends: stopped, preempted with `skip`, its
schedule's end, a source error) close the input whose LivePush was the broadcast's source. An
input that never made it on air (the store refused the broadcast, a restore failed) is closed
after `ORPHAN_SECONDS`; `close()` (the node's stop) closes every input and waits for the threads.
"""

from __future__ import annotations

import asyncio
import logging

from loa.relay.inputs import RelayInput, RelayInputSettings, safe_url
from loa.relay.urlpolicy import RELAY_SCHEMES, FetchSettings, UrlRefused, check_url
from loa.streamer.broadcast import Broadcast
from loa.streamer.engine import Engine
from loa.streamer.messages import say
from loa.streamer.sources import Source
from loa.streamer.state.store import Record
from loa.streamer.station import ContentError

log = logging.getLogger("loa.relay.inputs")

ORPHAN_SECONDS = 30.0
JOIN_SECONDS = 10.0


class RelayInputs:
    """The relay inputs of one node."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, policy: FetchSettings,
                 settings: RelayInputSettings | None = None) -> None:
        self.engine = engine
        self.loop = loop
        self.policy = policy
        self.settings = settings or RelayInputSettings()
        self.inputs: list[RelayInput] = []
        engine.ended_listeners.append(self._ended_thread)

    async def open(self, prog: Record) -> RelayInput:
        """A started input of a relay programme's URL, checked against the URL policy again
        (the name may resolve elsewhere than when it was stored); the caller closes it."""
        url = prog.get("url")
        if not isinstance(url, str) or not url.strip():
            raise ContentError(say("relay.programme_no_url"), "url")
        try:
            await check_url(url, RELAY_SCHEMES, self.policy)
        except UrlRefused as e:
            log.warning("relay url refused event=relay_url_refused programme=%s url=%s "
                        "reason=%s", prog.get("id"), safe_url(url), e)
            raise ContentError(str(e), "url") from None
        inp = RelayInput(url, self.settings, name=str(prog.get("title") or "relay"))
        inp.start()
        log.info("relay input started event=relay_input_start programme=%s url=%s",
                 prog.get("id"), safe_url(url))
        return inp

    async def factory(self, prog: Record) -> Source:
        """The station's relay_factory: an input whose life follows its broadcast."""
        inp = await self.open(prog)
        self.inputs.append(inp)
        self.loop.call_later(ORPHAN_SECONDS, self._reap_if_orphan, inp)
        return inp.push

    def _ended_thread(self, b: Broadcast, cause: str) -> None:
        """Engine thread: a broadcast ended. Its input (if it is one of ours) closes."""
        try:
            self.loop.call_soon_threadsafe(self._ended, b.source)
        except RuntimeError:  # the loop is closed: shutting down, cleanup closes inputs
            pass

    def _ended(self, source: Source) -> None:
        for inp in [i for i in self.inputs if i.push is source]:
            self._close(inp)

    def _on_air(self, inp: RelayInput) -> bool:
        return any(live.b.source is inp.push
                   for live in list(self.engine.broadcasts.values()))

    def _reap_if_orphan(self, inp: RelayInput) -> None:
        if inp in self.inputs and not self._on_air(inp):
            log.warning("relay input never aired event=relay_input_orphan url=%s",
                        safe_url(inp.url))
            self._close(inp)

    def _close(self, inp: RelayInput) -> None:
        inp.close()
        if inp in self.inputs:
            self.inputs.remove(inp)

    async def close(self) -> None:
        self.engine.ended_listeners[:] = [cb for cb in self.engine.ended_listeners
                                          if cb != self._ended_thread]
        inputs = list(self.inputs)
        for inp in inputs:
            self._close(inp)

        def join() -> None:
            for inp in inputs:
                inp.join(JOIN_SECONDS)

        await asyncio.to_thread(join)
