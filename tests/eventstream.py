"""The console's event stream (GET /api/v1/events) read frame by frame, for API tests."""

from __future__ import annotations

import asyncio
import json

WAIT = 20.0  # a guard against a hung test, not a timing assert


class Stream:
    def __init__(self, resp) -> None:
        self.resp = resp

    async def frame(self) -> tuple[str, dict | None]:
        """The next event (name, data), or ("ping", None) / ("retry", None)."""
        name, data = None, None
        while True:
            line = (await self.resp.content.readline()).decode()
            if line == "":
                return "closed", None
            line = line.rstrip("\n")
            if line == "":
                if name or data is not None:
                    return name or "message", data
                continue
            if line.startswith(": ping"):
                return "ping", None
            if line.startswith("retry:"):
                return "retry", None
            key, _, value = line.partition(": ")
            if key == "event":
                name = value
            elif key == "data":
                data = json.loads(value)

    async def until(self, name: str, **match) -> list[tuple[str, dict | None]]:
        """Every frame up to and including the first `name` event whose data has `match`."""
        seen = []

        async def read() -> None:
            while True:
                f = await self.frame()
                seen.append(f)
                if f[0] == "closed":
                    raise AssertionError(f"stream closed before {name}: {seen}")
                if f[0] == name and all((f[1] or {}).get(k) == v for k, v in match.items()):
                    return

        await asyncio.wait_for(read(), WAIT)
        return seen


async def open_stream(api, who: str) -> Stream:
    resp = await api.client.get("/api/v1/events", headers=api.auth(who))
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["X-Accel-Buffering"] == "no"
    s = Stream(resp)
    assert (await s.frame())[0] == "retry"  # the client is registered from here
    return s
