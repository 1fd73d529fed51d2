"""Worker processes for socket fan-out: the link between node and worker, and their supervision.

Used by the HTTP fan-out (loa.relay.fanout) and the WHEP listeners (loa.relay.webrtc_workers).
Node and worker talk over an AF_UNIX SOCK_SEQPACKET socketpair, one pickled tuple per datagram
(both ends are this program), optionally with file descriptors (SCM_RIGHTS). A worker reports
at least every STATS_INTERVAL; the node kills a worker silent for STUCK_SECONDS and starts a new
one in its slot after any death (RESTART_DELAY later). What a worker held ends with it: the
pool's `lost` hook forgets it, and the clients reconnect by themselves.

Packets reach a worker the same way in both: the node batches each worker's rows on its handle
(`WorkerHandle.forward`) and sends them in one message a flush (`WorkerPool.flush_soon`); the
worker feeds them to a hub of its own (`WorkerBase.deliver`), where its unchanged transport
subscribes as in the node.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import pickle
import socket
import sys
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from loa.codecs.encoders import Packet
from loa.streamer.hub import PacketHub

log = logging.getLogger("loa.workers")

MAX_MESSAGE = 1 << 20  # a tick of packets for every channel fits easily
STATS_INTERVAL = 0.25  # seconds between a worker's reports (its heartbeat)
RESTART_DELAY = 0.5  # seconds before a dead worker is started again
STUCK_SECONDS = 5.0  # a worker silent this long (it reports every STATS_INTERVAL) is killed
MAX_FDS = 64  # descriptors passed in one message
BUFFER = 4 << 20  # socketpair buffers: a worker busy for a moment does not block the node


def close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
        s.setblocking(False)
    return a, b


PacketRow = tuple[str, str, int, int, int, bytes]  # a packet over the link: area, codec, pts,
# duration, rate, data


class Link:
    """One end of a socketpair: pickled messages out (queued while the peer is busy) and in."""

    def __init__(self, sock: socket.socket, on_message: Callable[[Any, list[int]], None],
                 on_eof: Callable[[], None]) -> None:
        self.sock = sock
        self.on_message = on_message
        self.on_eof = on_eof
        self.loop = asyncio.get_running_loop()
        self.out: list[tuple[bytes, list[int]]] = []  # (message, fds to pass)
        self.closed = False
        self.loop.add_reader(sock.fileno(), self._readable)

    def send(self, msg: Any, fds: list[int] | None = None) -> None:
        """Send a message; `fds` (dups the link owns) are closed once passed."""
        if self.closed:
            close_all(fds or [])
            return
        self.out.append((pickle.dumps(msg, pickle.HIGHEST_PROTOCOL), fds or []))
        if len(self.out) == 1:
            self._flush()

    def _flush(self) -> None:
        while self.out and not self.closed:
            data, fds = self.out[0]
            try:
                if fds:
                    socket.send_fds(self.sock, [data], fds)
                else:
                    self.sock.send(data)
            except BlockingIOError:
                self.loop.add_writer(self.sock.fileno(), self._flush)
                return
            except OSError:
                self.close()
                self.on_eof()
                return
            self.out.pop(0)
            close_all(fds)
        with contextlib.suppress(Exception):
            self.loop.remove_writer(self.sock.fileno())

    def _readable(self) -> None:
        for _ in range(64):  # then let the loop run other work
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, MAX_FDS)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:
                self.close()
                self.on_eof()
                return
            try:
                self.on_message(pickle.loads(data), fds)
            except Exception:  # a bad message is dropped; the link goes on
                log.exception("worker message failed event=worker_message_error")
                close_all(fds)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.sock.fileno())
            self.loop.remove_writer(self.sock.fileno())
        for _data, fds in self.out:
            close_all(fds)
        self.out.clear()
        self.sock.close()


# ---- the worker process -------------------------------------------------------------------
class WorkerBase:
    """A worker's end: `on_message` for what the node sends, `report` every STATS_INTERVAL
    (it must send something: the node hears the worker is alive), `stop` on ("stop",) or EOF."""

    def __init__(self, sock: socket.socket) -> None:
        self.hub = PacketHub()  # no loop: deliveries are synchronous, on this loop
        self.stopped = asyncio.get_running_loop().create_future()
        self.link = Link(sock, self.on_message, self.stop)

    def deliver(self, rows: list[PacketRow]) -> None:
        """Packets the node forwarded, into this worker's hub: one delivery per channel."""
        by_channel: dict[tuple[str, str], list[Packet]] = {}
        for area, codec, pts, duration, rate, data in rows:
            by_channel.setdefault((area, codec), []).append(
                Packet(codec, pts, duration, data, rate))
        for (area, codec), packets in by_channel.items():
            self.hub.deliver(area, codec, packets)

    def on_message(self, msg: Any, fds: list[int]) -> None:
        raise NotImplementedError

    def report(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if not self.stopped.done():
            self.stopped.set_result(None)

    async def finish(self) -> None:
        """After the stop, before the link closes: let what the worker holds end cleanly."""
        await asyncio.sleep(0.2)  # the transports flush what they hold


async def _serve(make: Callable[[socket.socket], WorkerBase], fd: int) -> None:
    w = make(socket.socket(fileno=fd))

    async def reporting() -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            w.report()

    task = asyncio.get_running_loop().create_task(reporting())
    await w.stopped
    task.cancel()
    await w.finish()
    w.link.close()


def worker_main(make: Callable[[socket.socket], WorkerBase], prog: str,
                argv: list[str] | None = None) -> int:
    """`python -m <module> --fd N`: the worker process's entry point."""
    ap = argparse.ArgumentParser(prog=f"python -m {prog}")
    ap.add_argument("--fd", type=int, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s {prog} worker %(message)s")
    logging.getLogger("loa").setLevel(logging.INFO)  # not aioice's per-check INFO lines
    asyncio.run(_serve(make, args.fd))
    return 0


# ---- the node side ------------------------------------------------------------------------
class WorkerHandle:
    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.proc: asyncio.subprocess.Process | None = None
        self.link: Link | None = None
        self.heard = 0.0  # loop time of its last message
        self.packets: list[PacketRow] = []  # for this worker, until the next flush

    @property
    def ready(self) -> bool:
        return self.link is not None and not self.link.closed

    def forward(self, area: str, packets: list[Packet]) -> None:
        """Packets for this worker, sent at the pool's next flush."""
        self.packets.extend((area, p.codec, p.pts, p.duration, p.rate, p.data) for p in packets)


H = TypeVar("H", bound=WorkerHandle)


class WorkerPool(Generic[H]):
    """Keeps `len(workers)` processes of `module` running. Subclasses give the first message
    (`init_message`), handle the workers' messages (`on_message`) and forget what a gone worker
    held (`lost`)."""

    module = ""  # run as `python -m module --fd N`
    event = "worker"  # log event prefix

    def __init__(self, workers: list[H]) -> None:
        self.workers = workers
        self.restarts = 0
        self.closed = False
        self._tasks: list[asyncio.Task[None]] = []
        self._flush_due = False

    def init_message(self) -> Any:
        raise NotImplementedError

    def flush(self) -> None:
        """Send each worker its pending `packets` (and clear them)."""
        raise NotImplementedError

    def flush_soon(self, delay: float = 0.0) -> None:
        """One flush `delay` s from now (0: this loop turn's end), whatever adds packets
        meanwhile: fewer, larger messages wake the workers less often."""
        if self._flush_due:
            return
        self._flush_due = True
        loop = asyncio.get_running_loop()
        if delay > 0:
            loop.call_later(delay, self._flush)
        else:
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        self.flush()

    def on_message(self, w: H, msg: Any, fds: list[int]) -> None:
        raise NotImplementedError

    def lost(self, w: H) -> None:
        """A worker is gone (its link is closed already)."""

    async def start(self) -> None:
        for w in self.workers:
            await self._spawn(w)
        self._tasks = [asyncio.get_running_loop().create_task(self._watch(w))
                       for w in self.workers]

    def pick(self) -> H | None:
        """A ready worker (the subclass's `load` says which is least busy)."""
        ready = [w for w in self.workers if w.ready]
        return min(ready, key=self.load) if ready else None

    def load(self, w: H) -> int:
        return 0

    def _on_message(self, w: H, msg: Any, fds: list[int]) -> None:
        w.heard = max(w.heard, asyncio.get_running_loop().time())
        self.on_message(w, msg, fds)

    async def _spawn(self, w: H) -> None:
        mine, theirs = pair()
        try:
            w.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", self.module, "--fd", str(theirs.fileno()),
                pass_fds=[theirs.fileno()], stdin=asyncio.subprocess.DEVNULL)
        finally:
            theirs.close()
        # Messages wait in the socketpair until the worker has started reading.
        w.link = Link(mine, lambda msg, fds: self._on_message(w, msg, fds), lambda: None)
        w.link.send(self.init_message())
        w.heard = asyncio.get_running_loop().time() + STUCK_SECONDS  # time to start up
        log.info("worker started event=%s_start slot=%d pid=%d", self.event, w.slot,
                 w.proc.pid)

    async def _watch(self, w: H) -> None:
        """Keep a worker process alive in this slot."""
        while not self.closed and w.proc is not None:
            code = await self._wait(w)
            self._lost(w)
            if self.closed:
                return
            self.restarts += 1
            log.warning("worker died event=%s_died slot=%d pid=%d code=%s; its clients "
                        "reconnect", self.event, w.slot, w.proc.pid, code)
            await asyncio.sleep(RESTART_DELAY)
            if not self.closed:
                await self._spawn(w)

    async def _wait(self, w: H) -> int:
        """The worker's exit code; a worker that stops reporting (frozen) is killed."""
        assert w.proc is not None
        loop = asyncio.get_running_loop()
        waiter = loop.create_task(w.proc.wait())
        while not waiter.done():
            await asyncio.wait([waiter], timeout=1.0)
            if not waiter.done() and loop.time() - w.heard > STUCK_SECONDS:
                log.warning("worker silent event=%s_stuck slot=%d pid=%d", self.event,
                            w.slot, w.proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
        return waiter.result()

    def _lost(self, w: H) -> None:
        if w.link is not None:
            w.link.close()
            w.link = None
        self.lost(w)

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc is not None and w.ready]

    async def close(self) -> None:
        """Stop the workers (they end what they hold) and wait for them."""
        if self.closed:
            return
        self.closed = True
        for w in self.workers:
            if w.link is not None:
                w.link.send(("stop",))
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                try:
                    await asyncio.wait_for(w.proc.wait(), 5)
                except TimeoutError:
                    w.proc.kill()
                    await w.proc.wait()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for w in self.workers:
            self._lost(w)
