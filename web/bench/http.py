"""`loa bench fanout --transport http --listeners N [--seconds S] [--baseline icecast]
[--workers W]` and `loa bench fanout --transport http --storm --listeners N [--workers W]`.

What Icecast-compatible HTTP fan-out costs per listener, against Icecast 2 doing the same job.

A real node (real-time media clock) airs a tone as 32 kbit/s MP3 (24 kHz mono) on
`/streams/P01.mp3` (`--codec opus`: 32 kbit/s Ogg Opus on `/streams/P01.opus`, each listener's
pages renumbered for it; delivered_ratio then counts the Ogg framing, ~5 % over the bitrate). A child process (multiprocessing, spawn) holds the N listeners: plain
non-blocking sockets on one epoll loop that count bytes, so the listeners' CPU is not the
server's. The sequence, identical for Loa and for the Icecast baseline:

1. one listener; after a settling second, `baseline_cpu_fraction` over 2 s: the stream with one
   listener (Loa: media clock, mix, MP3 encode; Icecast: reading its source);
2. N - 1 more listeners (at most 200 connecting at a time), 2 s of warm-up;
3. the window of S seconds: the server's CPU (Loa: this process's `time.process_time()` plus
   its fan-out worker processes' run time, see `[http_streams] workers`; Icecast: the sum of its threads' `/proc/<pid>/task/*/schedstat` run time) and, in the child,
   every listener's bytes and the gaps between its reads;
4. `first_audio_ms`: 20 fresh listeners, one every 100 ms, from `connect()` to the first byte of
   audio after the response head (p50 and p99), while the N keep streaming.

Node figures over the window: `loop_lag_max_ms` (event loop), `media_clock_max_lateness_ms`
and `media_clock_skipped_ticks` (the media clock thread).

Figures: `server_cpu_fraction` (of one core, over the window), `server_cpu_per_listener` = that
divided by N (the whole process: what a listener costs), `server_cpu_per_listener_fanout` = the
same minus the one-listener baseline (the fan-out alone), `delivered_ratio` = bytes the N
received in the window / (N x bitrate x window), `max_gap_ms` = the longest wait of any listener
between two reads in the window, and `max_lateness_ms` = max_gap_ms minus the nominal write
interval (Loa: its batch span for this bitrate at that load, see `write_budget` in
loa.relay.icecast; Icecast: its 1,400-byte chunks): how much later than
the server meant the worst listener got its audio, the client's own scheduling included.
`ratio_vs_icecast` = Loa's server_cpu_per_listener / Icecast's; `ratio_vs_icecast_fanout` the
same for the fan-out alone; `ratio_vs_icecast_with_source` counts the ffmpeg that encodes for
Icecast (`feed_cpu_fraction`) on Icecast's side, since Loa mixes and encodes in its own process.

`--storm`: the N listeners stream, then all hang up at once and reconnect (every connect in
flight together), as after a network blip. Figures over the storm and one second after it:
`reconnect_seconds` (until all N get audio again), the media clock's `skipped_ticks` (a stall
over 10 ticks), `late_ticks` (started > 5 ms late) and `max_lateness_ms`, the event loop's lag,
and `server_cpu_seconds` (node and workers).

The Icecast baseline runs `icecast2` (Debian package icecast2) with a generated config on a free
127.0.0.1 port (run as user icecast2 or nobody through <changeowner> when the bench runs as
root), fed by `ffmpeg -re ... libmp3lame -b:a 32k -ac 1 -ar 24000 icecast://...`. When icecast2
is missing or fails, `baseline` is null with `baseline_reason`. Only one JSON object goes to
stdout; diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import math
import multiprocessing
import os
import resource
import selectors
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from loa.web.bench.errors import BenchError

ROOT = "P01"
BITRATE = 32_000
BYTES_PER_SECOND = BITRATE // 8
SETTLE_SECONDS = 1.0
BASELINE_SECONDS = 2.0
WARMUP_SECONDS = 2.0
FRESH_LISTENERS = 20
FRESH_SPACING = 0.1
INFLIGHT = 200
ICECAST_CHUNK = 1400  # Icecast 2.4 sends its source data in chunks of this size
MAX_RETRIES = 10_000  # connection attempts retried in all (refused, reset before the head)
CHILD_TIMEOUT = 300.0  # Icecast accepts slowly: thousands of listeners take a while
MAX_LISTENERS = 50_000


def raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            if os.geteuid() == 0:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# ---- the listening child ------------------------------------------------------------------
class _Conn:
    __slots__ = ("sock", "state", "head", "total", "window", "last", "max_gap", "t0", "first",
                 "fresh")

    def __init__(self, sock: socket.socket, fresh: bool) -> None:
        self.sock = sock
        self.state = "connect"
        self.head = b""
        self.total = 0
        self.window = 0
        self.last = 0.0
        self.max_gap = 0.0
        self.t0 = time.monotonic()
        self.first: float | None = None
        self.fresh = fresh


def client_main(conn: Connection, port: int, path: str, nofile: int) -> None:
    """Child: listeners on one epoll loop; answers the parent's commands on `conn`."""
    raise_nofile(nofile)
    sel = selectors.DefaultSelector()
    sel.register(conn.fileno(), selectors.EVENT_READ, None)
    conns: dict[int, _Conn] = {}
    request = f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nUser-Agent: loa-bench\r\n\r\n".encode()
    to_open = 0
    fresh_due: list[float] = []
    fresh_done: list[float] = []
    waiting: str | None = None  # the command waiting for its answer
    want_audio = 0
    failed = closed = retried = 0
    marked: float | None = None
    inflight = INFLIGHT

    def start(fresh: bool) -> None:
        nonlocal failed
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        err = s.connect_ex(("127.0.0.1", port))
        if err not in (0, errno.EINPROGRESS):
            failed += 1
            s.close()
            return
        c = _Conn(s, fresh)
        conns[s.fileno()] = c
        sel.register(s, selectors.EVENT_WRITE, c)

    def drop(c: _Conn, server_closed: bool) -> None:
        nonlocal failed, closed, retried, to_open
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(c.sock)
        conns.pop(c.sock.fileno(), None)
        c.sock.close()
        if server_closed and not c.fresh:
            if c.first is not None:
                closed += 1
            elif retried < MAX_RETRIES:
                retried += 1  # refused or reset while connecting (Icecast's short backlog)
                to_open += 1
            else:
                failed += 1

    def connecting() -> int:
        return sum(1 for c in conns.values() if c.first is None and not c.fresh)

    def streaming() -> list[_Conn]:
        return [c for c in conns.values() if c.first is not None and not c.fresh]

    while True:
        now = time.monotonic()
        while to_open and connecting() < inflight:
            start(False)
            to_open -= 1
        while fresh_due and fresh_due[0] <= now:
            fresh_due.pop(0)
            start(True)
        if waiting == "open" and len(streaming()) + failed >= want_audio and not to_open:
            conn.send({"streaming": len(streaming()), "failed": failed})
            waiting = None
        if waiting == "fresh" and not fresh_due and not any(c.fresh for c in conns.values()):
            ms = sorted(fresh_done)
            conn.send({"first_audio_ms": ms})
            waiting = None
        timeout = 0.05 if (to_open or fresh_due or waiting) else 0.5
        for key, _ in sel.select(timeout):
            c = key.data
            if c is None:
                cmd, arg = conn.recv()
                if cmd == "open":
                    to_open += int(arg)
                    want_audio = len(streaming()) + to_open
                    waiting = "open"
                elif cmd == "mark":
                    marked = time.monotonic()
                    for x in streaming():
                        x.window = 0
                        x.max_gap = 0.0
                        x.last = marked
                    conn.send({"ok": True})
                elif cmd == "report":
                    t = time.monotonic()
                    live = streaming()
                    gaps = [max(x.max_gap, t - x.last) for x in live]
                    conn.send({
                        "window_s": t - (marked or t),
                        "listeners": len(live),
                        "bytes": sum(x.window for x in live),
                        "min_bytes": min((x.window for x in live), default=0),
                        "max_gap_ms": 1000 * max(gaps, default=0.0),
                        "failed": failed,
                        "retried": retried,
                        "closed": closed,
                    })
                    marked = None
                elif cmd == "storm":  # every listener hangs up and calls again at once
                    gone = streaming()
                    for x in gone:
                        with contextlib.suppress(KeyError, ValueError):
                            sel.unregister(x.sock)
                        conns.pop(x.sock.fileno(), None)
                        x.sock.close()
                    inflight = max(INFLIGHT, int(arg))
                    to_open += len(gone)
                    want_audio = len(streaming()) + to_open
                    waiting = "open"
                elif cmd == "fresh":
                    base = time.monotonic()
                    fresh_due = [base + i * FRESH_SPACING for i in range(int(arg))]
                    fresh_done = []
                    waiting = "fresh"
                elif cmd == "quit":
                    for x in list(conns.values()):
                        x.sock.close()
                    conn.send({"ok": True})
                    return
                continue
            if c.state == "connect":
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    drop(c, True)
                    continue
                try:
                    c.sock.send(request)
                except OSError:
                    drop(c, True)
                    continue
                c.state = "head"
                sel.modify(c.sock, selectors.EVENT_READ, c)
                continue
            try:
                data = c.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                drop(c, True)
                continue
            t = time.monotonic()
            if c.state == "head":
                c.head += data
                end = c.head.find(b"\r\n\r\n")
                if end < 0:
                    continue
                if b" 200 " not in c.head[:end].split(b"\r\n", 1)[0] + b" ":
                    drop(c, True)
                    continue
                data = c.head[end + 4:]
                c.head = b""
                c.state = "audio"
                if not data:
                    continue
            if c.first is None:
                c.first = t
                c.last = t
                if c.fresh:
                    fresh_done.append(1000 * (t - c.t0))
                    drop(c, False)
                    continue
            c.total += len(data)
            if marked is not None:
                c.window += len(data)
                gap = t - c.last
                if gap > c.max_gap:
                    c.max_gap = gap
            c.last = t


class Listeners:
    """The parent's handle on the child (blocking pipe calls run in a thread)."""

    def __init__(self, port: int, path: str, nofile: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=client_main, args=(child, port, path, nofile),
                                daemon=True)
        self.proc.start()
        child.close()

    async def call(self, cmd: str, arg: Any = None, limit: float = CHILD_TIMEOUT) -> Any:
        self.conn.send((cmd, arg))

        def wait() -> Any:
            if not self.conn.poll(limit):
                raise BenchError(f"listener process did not answer {cmd!r} in {limit:.0f} s")
            return self.conn.recv()

        return await asyncio.to_thread(wait)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.call("quit", limit=10)
        await asyncio.to_thread(self.proc.join, 10)
        if self.proc.is_alive():
            self.proc.kill()


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    k = min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))
    return round(sorted(values)[k], 1)


async def measure(port: int, path: str, listeners: int, seconds: float, cpu: Any,
                  interval_ms: Any, on_mark: Any = None) -> dict[str, Any]:
    """The common procedure against a server whose CPU seconds `cpu()` reads."""
    nofile = listeners + FRESH_LISTENERS + 256
    client = Listeners(port, path, nofile)
    try:
        got = await client.call("open", 1)
        if got["streaming"] != 1:
            raise BenchError(f"the first listener got no audio: {got}")
        await asyncio.sleep(SETTLE_SECONDS)
        c0, t0 = cpu(), time.monotonic()
        await asyncio.sleep(BASELINE_SECONDS)
        base = (cpu() - c0) / (time.monotonic() - t0)
        t_open = time.monotonic()
        got = await client.call("open", listeners - 1)
        log(f"{got['streaming']} listeners streaming ({got['failed']} failed) in "
            f"{time.monotonic() - t_open:.1f} s")
        await asyncio.sleep(WARMUP_SECONDS)
        await client.call("mark")
        if on_mark is not None:
            on_mark()
        c0, t0 = cpu(), time.monotonic()
        await asyncio.sleep(seconds)
        c1, t1 = cpu(), time.monotonic()
        nominal_interval_ms = float(interval_ms())  # at the window's load
        rep = await client.call("report")
        fresh = await client.call("fresh", FRESH_LISTENERS)
    finally:
        await client.close()
    wall = t1 - t0
    frac = (c1 - c0) / wall
    n = rep["listeners"]  # per-listener figures: per listener that streamed in the window
    if n < 1:
        raise BenchError("no listener streamed in the window")
    expected = n * BYTES_PER_SECOND * rep["window_s"]
    ms = fresh["first_audio_ms"]
    return {
        "listeners_streaming": n,
        "listeners_failed": rep["failed"],
        "connects_retried": rep["retried"],
        "listeners_closed_by_server": rep["closed"],
        "seconds": round(wall, 2),
        "server_cpu_seconds": round(c1 - c0, 4),
        "server_cpu_fraction": round(frac, 5),
        "server_cpu_per_listener": round(frac / n, 8),
        "baseline_cpu_fraction": round(base, 5),
        "server_cpu_per_listener_fanout": round(max(0.0, frac - base) / n, 8),
        "listeners_per_core": round(n / frac) if frac > 0 else None,
        "delivered_ratio": round(rep["bytes"] / expected, 4) if expected else None,
        "min_listener_bytes": rep["min_bytes"],
        "max_gap_ms": round(rep["max_gap_ms"], 1),
        "nominal_write_interval_ms": round(nominal_interval_ms, 1),
        "max_lateness_ms": round(max(0.0, rep["max_gap_ms"] - nominal_interval_ms), 1),
        "first_audio_ms": {"p50": _pct(ms, 0.5), "p99": _pct(ms, 0.99), "max": _pct(ms, 1.0),
                           "n": len(ms)},
    }


# ---- Loa ----------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def loa_node(listeners: int, workers: int | None) -> AsyncIterator[Any]:
    """A real node airing the bench tone on a free port: yields (node, port)."""
    from loa.streamer.broadcast import Broadcast
    from loa.streamer.sources import ToneSource
    from loa.web.config import load_config
    from loa.web.testing import start_node

    with tempfile.TemporaryDirectory(prefix="loa-bench-http-") as tmp:
        cfg = load_config(None, env={}, data=str(Path(tmp) / "data"))
        cfg.areas.root_code = ROOT
        cfg.areas.root_name = "Tỉnh bench"
        cfg.encoders.mp3_bitrate = BITRATE
        cfg.encoders.opus_bitrate = BITRATE
        hs = cfg.http_streams
        if workers is not None:
            hs.workers = workers
        hs.max_listeners = max(hs.max_listeners, listeners + FRESH_LISTENERS + 10)
        hs.max_listeners_per_area = max(hs.max_listeners_per_area, hs.max_listeners)
        with contextlib.redirect_stdout(sys.stderr):  # the bootstrap password line
            live = await start_node(cfg, backlog=4096, access_log=None)
        try:
            live.node.engine.start(Broadcast(ToneSource(440, 0.3), [ROOT], issuer=ROOT,
                                             title="bench"))
            yield live.node, live.port
        finally:
            await live.stop()


def loa_cpu(node: Any) -> Any:
    """CPU seconds of the node's process and of its fan-out workers."""
    pool = node.fanout

    def cpu() -> float:
        pids = pool.worker_pids() if pool is not None else []
        return time.process_time() + sum(proc_cpu_seconds(pid) for pid in pids)

    return cpu


async def measure_loa(listeners: int, seconds: float, workers: int | None,
                      codec: str = "mp3") -> dict[str, Any]:
    async with loa_node(listeners, workers) as (node, port):
        hs = node.cfg.http_streams
        streamer = node.http
        clock = node.clock
        skipped = 0

        def mark() -> None:  # the node's own lateness figures cover the window only
            nonlocal skipped
            if clock is not None:
                clock.stats.max_lateness_ms = 0.0
                skipped = clock.stats.skipped_ticks
            node.lag.max_ms = 0.0

        out = await measure(port, f"/streams/{ROOT}.{codec}", listeners, seconds, loa_cpu(node),
                            lambda: streamer.batch_span_ms(BYTES_PER_SECOND), mark)
        stats = streamer.stats()
        out.update({
            "workers": hs.workers,
            "dropped": stats["dropped"],
            "loop_lag_max_ms": round(node.lag.max_ms, 1),
            "media_clock_max_lateness_ms": round(clock.stats.max_lateness_ms, 1)
            if clock else None,
            "media_clock_skipped_ticks": clock.stats.skipped_ticks - skipped
            if clock else None,
            "batch": {"batch_ms": hs.batch_ms, "batch_bytes": hs.batch_bytes,
                      "write_budget": hs.write_budget, "max_batch_ms": hs.max_batch_ms,
                      "burst_ms": hs.burst_ms, "burst_kb": hs.burst_kb},
        })
        return out


async def storm(listeners: int, workers: int | None) -> dict[str, Any]:
    """N listeners stream, then all hang up and reconnect at once; the media clock's figures
    over the storm (and a settling second after it) say whether a tick was delayed."""
    async with loa_node(listeners, workers) as (node, port):
        clock = node.clock
        assert clock is not None
        client = Listeners(port, f"/streams/{ROOT}.mp3", listeners + FRESH_LISTENERS + 256)
        cpu = loa_cpu(node)
        try:
            got = await client.call("open", listeners)
            log(f"{got['streaming']} listeners streaming ({got['failed']} failed)")
            await asyncio.sleep(WARMUP_SECONDS)
            st = clock.stats
            skipped, late = st.skipped_ticks, st.late_ticks
            st.max_lateness_ms = 0.0
            node.lag.max_ms = 0.0
            c0, n0, t0 = cpu(), time.process_time(), time.monotonic()
            again = await client.call("storm", listeners)
            reconnect = time.monotonic() - t0
            await asyncio.sleep(SETTLE_SECONDS)
            c1, n1, t1 = cpu(), time.process_time(), time.monotonic()
            rep = await client.call("report")
        finally:
            await client.close()
        return {
            "bench": "fanout", "transport": "http", "storm": True, "listeners": listeners,
            "workers": node.cfg.http_streams.workers, "cpu_count": os.cpu_count(),
            "reconnected": again["streaming"], "reconnect_failed": again["failed"],
            "connects_retried": rep["retried"],
            "reconnect_seconds": round(reconnect, 2),
            "window_seconds": round(t1 - t0, 2),
            "server_cpu_seconds": round(c1 - c0, 3),
            "node_process_cpu_seconds": round(n1 - n0, 3),  # the rest: the workers
            "media_clock_skipped_ticks": st.skipped_ticks - skipped,
            "media_clock_late_ticks": st.late_ticks - late,
            "media_clock_max_lateness_ms": round(st.max_lateness_ms, 1),
            "loop_lag_max_ms": round(node.lag.max_ms, 1),
        }


# ---- the Icecast baseline -----------------------------------------------------------------
def icecast_config(port: int, base: Path, listeners: int, user: str | None,
                   group: str | None) -> str:
    owner = (f"<changeowner><user>{user}</user><group>{group}</group></changeowner>"
             if user else "")
    return f"""<icecast>
  <location>loa bench</location><admin>bench@localhost</admin>
  <limits>
    <clients>{listeners + 200}</clients><sources>2</sources>
    <queue-size>524288</queue-size><client-timeout>30</client-timeout>
    <header-timeout>15</header-timeout><source-timeout>10</source-timeout>
    <burst-on-connect>1</burst-on-connect><burst-size>65535</burst-size>
  </limits>
  <authentication>
    <source-password>bench</source-password><admin-user>admin</admin-user>
    <admin-password>bench-admin</admin-password>
  </authentication>
  <hostname>127.0.0.1</hostname>
  <listen-socket><port>{port}</port><bind-address>127.0.0.1</bind-address></listen-socket>
  <fileserve>0</fileserve>
  <paths>
    <basedir>{base}</basedir><logdir>{base}</logdir><pidfile>{base}/icecast.pid</pidfile>
    <webroot>/usr/share/icecast2/web</webroot><adminroot>/usr/share/icecast2/admin</adminroot>
  </paths>
  <logging><accesslog>access.log</accesslog><errorlog>error.log</errorlog>
    <loglevel>2</loglevel></logging>
  <security><chroot>0</chroot>{owner}</security>
</icecast>
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu_seconds(pid: int) -> float:
    """CPU time of every thread of a process, from the scheduler's run-time counters."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
        return total / 1e9
    except OSError:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _http_ok(port: int, path: str) -> bool:
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except (OSError, TimeoutError):
        return False
    try:
        w.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 2)
        return b" 200 " in head.split(b"\r\n", 1)[0] + b" "
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return False
    finally:
        w.close()


async def _wait_for(cond: Any, what: str, limit: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not await cond():
        if loop.time() > deadline:
            raise BenchError(f"{what} not ready after {limit:.0f} s")
        await asyncio.sleep(0.2)


# What feeds Icecast the same stream as Loa's, per codec: ffmpeg's encoder arguments.
FEEDS = {
    "mp3": (["-c:a", "libmp3lame", "-b:a", "32k", "-ac", "1", "-ar", "24000", "-content_type",
             "audio/mpeg", "-f", "mp3"], "libmp3lame 32k mono 24 kHz"),
    "opus": (["-c:a", "libopus", "-b:a", "32k", "-ac", "1", "-ar", "48000", "-content_type",
              "audio/ogg", "-f", "ogg"], "libopus 32k mono in Ogg"),
}


async def measure_icecast(listeners: int, seconds: float, codec: str = "mp3"
                          ) -> tuple[dict[str, Any] | None, str]:
    exe = shutil.which("icecast2") or shutil.which("icecast")
    if exe is None:
        return None, "icecast2 not found (Debian: apt-get install icecast2)"
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        return None, "ffmpeg not found (it feeds Icecast)"
    import grp
    import pwd

    user = group = None
    if os.geteuid() == 0:  # Icecast refuses to run as root without <changeowner>
        for name in ("icecast2", "nobody"):
            with contextlib.suppress(KeyError):
                pw = pwd.getpwnam(name)
                user, group = name, grp.getgrgid(pw.pw_gid).gr_name
                break
        if user is None:
            return None, "running as root and no icecast2/nobody user to change to"
    with tempfile.TemporaryDirectory(prefix="loa-bench-icecast-") as tmp:
        base = Path(tmp)
        if user is not None:
            pw = pwd.getpwnam(user)
            os.chown(base, pw.pw_uid, pw.pw_gid)
        port = free_port()
        conf = base / "icecast.xml"
        conf.write_text(icecast_config(port, base, listeners, user, group))
        log_path = base / "feed.log"
        feed_log = await asyncio.to_thread(log_path.open, "wb")
        ice = await asyncio.create_subprocess_exec(
            exe, "-c", str(conf), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        feed: asyncio.subprocess.Process | None = None
        try:
            await _wait_for(lambda: _tcp_open(port), "icecast", 15)
            feed = await asyncio.create_subprocess_exec(
                ffmpeg, "-nostdin", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
                "sine=frequency=440:sample_rate=24000", *FEEDS[codec][0],
                f"icecast://source:bench@127.0.0.1:{port}/bench.{codec}",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=feed_log)
            await _wait_for(lambda: _http_ok(port, f"/bench.{codec}"), "the icecast mount", 15)
            ice_pid, feed_pid = ice.pid, feed.pid
            feed_c0 = proc_cpu_seconds(feed_pid)
            feed_t0 = time.monotonic()
            out = await measure(port, f"/bench.{codec}", listeners, seconds,
                                lambda: proc_cpu_seconds(ice_pid),
                                lambda: ICECAST_CHUNK / BYTES_PER_SECOND * 1000)
            feed_cpu = (proc_cpu_seconds(feed_pid) - feed_c0) / (time.monotonic() - feed_t0)
            ver = await asyncio.create_subprocess_exec(exe, "-v", stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.DEVNULL)
            version = (await ver.communicate())[0].decode(errors="replace").strip()
            out["server"] = version or exe
            out["feed"] = f"ffmpeg -re lavfi sine -> {FEEDS[codec][1]} -> icecast://"
            out["feed_cpu_fraction"] = round(feed_cpu, 5)  # not counted in the figures above
            return out, ""
        except BenchError as e:
            errlog = base / "error.log"
            tail = ""
            for path in (errlog, log_path):
                with contextlib.suppress(OSError):
                    tail += (await asyncio.to_thread(path.read_bytes))[-300:].decode(
                        errors="replace")
            return None, f"icecast baseline failed: {e}; {tail.strip()}"
        finally:
            for p in (feed, ice):
                if p is not None and p.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.terminate()
                    try:
                        await asyncio.wait_for(p.wait(), 10)
                    except TimeoutError:
                        p.kill()
                        await p.wait()
            feed_log.close()


async def _tcp_open(port: int) -> bool:
    try:
        _, w = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    w.close()
    return True


async def bench(listeners: int, seconds: float, baseline: str,
                workers: int | None = None, codec: str = "mp3") -> dict[str, Any]:
    result: dict[str, Any] = {"bench": "fanout", "transport": "http", "listeners": listeners,
                              "bitrate_kbps": BITRATE // 1000,
                              "codec": "mp3 24 kHz mono" if codec == "mp3" else
                              "opus 48 kHz mono in Ogg",
                              "cpu_count": os.cpu_count(),
                              "lateness_definition": "max_gap_ms (longest wait of any listener "
                              "between two reads) minus nominal_write_interval_ms"}
    result.update(await measure_loa(listeners, seconds, workers, codec))
    result["baseline"] = None
    result["ratio_vs_icecast"] = None
    if baseline == "icecast":
        ice, reason = await measure_icecast(listeners, seconds, codec)
        result["baseline"] = ice
        if ice is None:
            result["baseline_reason"] = reason
        elif ice["server_cpu_per_listener"] > 0:
            result["ratio_vs_icecast"] = round(
                result["server_cpu_per_listener"] / ice["server_cpu_per_listener"], 2)
            feed = ice.get("feed_cpu_fraction") or 0.0
            # Loa mixes and encodes inside the server; Icecast's encoder is its source client.
            result["ratio_vs_icecast_with_source"] = round(
                result["server_cpu_fraction"] / (ice["server_cpu_fraction"] + feed), 2)
            if ice["server_cpu_per_listener_fanout"] > 0:
                result["ratio_vs_icecast_fanout"] = round(
                    result["server_cpu_per_listener_fanout"]
                    / ice["server_cpu_per_listener_fanout"], 2)
    return result


def run(args: argparse.Namespace) -> int:
    listeners = int(args.listeners)
    seconds = float(args.seconds)
    if not 1 <= listeners <= MAX_LISTENERS:
        print(f"--listeners must be within 1..{MAX_LISTENERS}", file=sys.stderr)
        return 2
    if not 0 < seconds <= 600:
        print("--seconds must be within (0, 600]", file=sys.stderr)
        return 2
    raise_nofile(2 * listeners + 1024)
    workers = getattr(args, "workers", None)
    try:
        if getattr(args, "storm", False):
            result = asyncio.run(storm(listeners, workers))
        else:
            result = asyncio.run(bench(listeners, seconds, getattr(args, "baseline", "none"),
                                       workers, getattr(args, "codec", "mp3")))
    except BenchError as e:
        print(f"bench failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, ensure_ascii=False))
    return 0
