"""The one contract every media output of a node keeps (Liquidsoap's "one output contract").

RTP out, HTTP streams, HLS and WebRTC differ in everything but their life: the composition root
(loa.web) starts each once, closes each once at shutdown (listeners and peers are ended, sockets
and threads released) and reads `stats()` for the monitor. A transport with nothing to open
before its first listener still has `start()`, so the root treats them all alike.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Transport(Protocol):
    async def start(self) -> None:
        """Open what the transport needs before anyone listens (sockets, threads, tasks)."""

    async def close(self) -> None:
        """End every listener and release everything; the transport is not started again."""

    def stats(self) -> dict[str, Any]:
        """JSON-ready figures for the monitor."""
