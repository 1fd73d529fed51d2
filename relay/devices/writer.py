"""The write-behind writer of device state (records, commands) to the store."""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress

from loa.streamer.state.store import Record, Store

log = logging.getLogger("loa.devices")

WRITER_STOP_TIMEOUT = 10.0  # seconds a shutdown waits for a store writer, twice at most


class Writer:
    """Coalesces store writes of one kind: `mark` a record, and whatever is marked while the
    previous `put_many` runs goes out in the next one. `flush()` waits until everything marked
    before the call is written (each batch has a generation number). `stop()` ends the task with
    a marker it reads between two writes, not by cancellation: a store client that swallows a
    cancellation in the middle of a command (redis-py 8) would leave the task running forever."""

    def __init__(self, store: Store, kind: str) -> None:
        self.store = store
        self.kind = kind
        self.pending: dict[str, Record] = {}
        self.batches = 0  # put_many calls made
        self.records = 0  # records written
        self._gen = 1  # generation of `pending`
        self._done = 0  # highest generation written
        self._kick = asyncio.Event()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = False  # the marker: the task ends once it has nothing left to write

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def mark(self, rec: Record) -> None:
        self.pending[rec["id"]] = rec
        self._kick.set()

    def forget(self, rid: str) -> None:
        self.pending.pop(rid, None)

    async def flush(self) -> None:
        target = self._gen if self.pending else self._gen - 1
        if self._done >= target:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        self._kick.set()
        await fut

    async def _run(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            while self.pending:
                batch, self.pending = self.pending, {}
                gen = self._gen
                self._gen += 1
                snap = [dict(r) for r in batch.values()]  # on the loop: the thread gets copies
                try:
                    await self.store.put_many(self.kind, snap)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("store write failed event=device_store_error kind=%s n=%d",
                                  self.kind, len(snap))
                    for k, v in batch.items():  # written again with the next batch
                        self.pending.setdefault(k, v)
                    if self._stopping:
                        return  # shutting down on a failing store: logged, nothing to wait for
                    await asyncio.sleep(1.0)  # back-off, not a timing loop
                    continue
                self.batches += 1
                self.records += len(snap)
                self._done = gen
                self._wake()
            if self._stopping:
                return

    def _wake(self) -> None:
        keep = []
        for target, fut in self._waiters:
            if self._done >= target:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((target, fut))
        self._waiters = keep

    async def stop(self) -> None:
        if self.pending:
            with suppress(Exception):
                await asyncio.wait_for(self.flush(), WRITER_STOP_TIMEOUT)
        if self._task:
            self._stopping = True
            self._kick.set()
            # Bounded: the write in flight ends (or fails) and the task reads the marker; only a
            # store that never answers is cancelled after the wait.
            done, _ = await asyncio.wait({self._task}, timeout=WRITER_STOP_TIMEOUT)
            if not done:
                log.error("store writer still busy at shutdown event=device_store_error "
                          "kind=%s pending=%d", self.kind, len(self.pending))
                self._task.cancel()
        for _, fut in self._waiters:
            if not fut.done():
                fut.cancel()

