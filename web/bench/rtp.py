"""`loa bench fanout --transport rtp --listeners N [--seconds S]`: what RTP unicast costs per listener.

A real node (real-time media clock) airs a tone in Opus; RtpOut sends it to N unicast receivers
registered at N distinct loopback addresses (127.0.0.2, 127.0.0.3, ...) on one port. A child
process owns that port with one socket (the kernel hands it every receiver's packets), counts
packets by sequence number and reads each packet's kernel arrival time (SO_TIMESTAMPNS), so it
keeps up at 100,000 packets/s and its own lag never counts as lateness.

Measured in this process (the server: loop, media clock, encoder and sender threads):
- `baseline_cpu_fraction`: the node airing the same stream with no receiver (encode, clock);
- `server_cpu_fraction` over S seconds with N receivers; `server_cpu_per_listener` is the
  difference divided by N (the cost of fan-out alone), `server_cpu_per_listener_gross` is the
  whole process divided by N; `receivers_per_core` = 1 / server_cpu_per_listener.
Measured by the child, for exactly the packets the server sent in the window (by sequence
number): `delivered_ratio` = packets received / (N x packets sent), and `max_lateness_ms` = how
much later than the earliest the latest packet arrived, with the media timeline taken out (each
packet's arrival minus its RTP timestamp in seconds): it adds the clock's jitter, the hop to the
sender thread and the time to reach the last receiver of a tick.
On loopback the kernel delivers in the sender's context, so the server CPU includes the
receiving side of the kernel's work too: a NIC would make it cheaper, not dearer.
Only one JSON object goes to stdout; diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from loa.relay.rtp.out import RtpOut, RtpStream
from loa.streamer.broadcast import Broadcast
from loa.streamer.sources import ToneSource
from loa.web.bench.errors import BenchError

WARMUP_SECONDS = 1.0
BASELINE_SECONDS = 2.0
DRAIN_SECONDS = 0.5
FIRST_HOST = ipaddress.IPv4Address("127.0.0.2")
MAX_LISTENERS = 1_000_000
MAX_SECONDS = 600.0  # the window must stay well inside the 16-bit sequence space
CHILD_TIMEOUT = 30.0


# ---- the receiving child ------------------------------------------------------------------
def receive_main(rcvbuf_mb: int = 64) -> int:
    """Child: bind a port, print it, count packets by sequence until told the window."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33),
                        rcvbuf_mb << 20)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_mb << 20)
    so_tsns = getattr(socket, "SO_TIMESTAMPNS", 35)
    sock.setsockopt(socket.SOL_SOCKET, so_tsns, 1)
    sock.bind(("0.0.0.0", 0))
    sock.settimeout(0.2)
    print(f"ready {sock.getsockname()[1]}", flush=True)
    counts = [0] * 65536
    first = [0.0] * 65536  # earliest arrival of each sequence number (any receiver)
    last = [0.0] * 65536
    stamps = [0] * 65536
    command: list[str] = []
    done = threading.Event()

    def read_stdin() -> None:
        line = sys.stdin.readline()
        command.append(line)
        done.set()

    threading.Thread(target=read_stdin, daemon=True).start()
    space = socket.CMSG_SPACE(16)
    unpack_hdr = struct.Struct("!HI").unpack_from
    unpack_ts = struct.Struct("=qq").unpack_from
    total = 0
    c0 = time.process_time()
    w0 = time.monotonic()
    while True:
        try:
            data, anc, _flags, _addr = sock.recvmsg(2048, space)
        except TimeoutError:
            if done.is_set():
                break
            continue
        if len(data) < 12:
            continue
        seq, ts = unpack_hdr(data, 2)
        arrival = 0.0
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == so_tsns:
                sec, nsec = unpack_ts(payload)
                arrival = sec + nsec * 1e-9
        if counts[seq] == 0:
            first[seq] = arrival
            stamps[seq] = ts
        counts[seq] += 1
        if arrival > last[seq]:
            last[seq] = arrival
        total += 1
    cpu = time.process_time() - c0
    wall = time.monotonic() - w0
    parts = command[0].split() if command else []
    if len(parts) != 3:
        print(json.dumps({"error": f"bad command {command!r}"}), flush=True)
        return 2
    seq0, n, clock = int(parts[0]), int(parts[1]), int(parts[2])
    got = 0
    ts0 = stamps[seq0 % 65536]
    missing = 0
    early: list[float] = []
    late: list[float] = []
    within: list[float] = []
    for k in range(n):
        s = (seq0 + k) % 65536
        if counts[s] == 0:
            missing += 1
            continue
        got += counts[s]
        media = ((stamps[s] - ts0) & 0xFFFFFFFF) / clock
        early.append(first[s] - media)
        late.append(last[s] - media)
        within.append(last[s] - first[s])
    out: dict[str, Any] = {"received": got, "total": total, "missing_seq": missing,
                           "cpu_fraction": cpu / wall if wall > 0 else 0.0}
    if early:
        lo = min(early)
        late.sort()
        within.sort()
        out["lateness_ms"] = {"max": (late[-1] - lo) * 1000,
                              "p99": (late[int(0.99 * (len(late) - 1))] - lo) * 1000,
                              "p50": (late[len(late) // 2] - lo) * 1000}
        out["tick_spread_ms"] = {"max": within[-1] * 1000,
                                 "p50": within[len(within) // 2] * 1000}
    print(json.dumps(out), flush=True)
    return 0


# ---- the server side ------------------------------------------------------------------------
def _hosts(n: int) -> list[str]:
    return [str(FIRST_HOST + i) for i in range(n)]


async def _start_child() -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loa.web.bench.rtp", "receive",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), CHILD_TIMEOUT)
    parts = line.decode().split()
    if len(parts) != 2 or parts[0] != "ready":
        proc.kill()
        await proc.wait()
        raise BenchError(f"receiver process did not start: {line!r}")
    return proc, int(parts[1])


async def _sleep_until(deadline: float) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, deadline - loop.time()))


async def measure(listeners: int, seconds: float) -> dict[str, Any]:
    from loa.web.config import load_config
    from loa.web.node import Node

    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory(prefix="loa-bench-rtp-") as tmp:
        cfg = load_config(None, env={}, data=str(Path(tmp) / "data"))
        cfg.rtp.enabled = True
        cfg.rtp.interface = "127.0.0.1"
        cfg.rtp.ttl = 0
        cfg.rtp.multicast = False
        cfg.rtp.codecs = "opus"
        cfg.rtp.group_base = "239.255.250.0"
        cfg.rtp.pool_size = 16
        node = Node(cfg, realtime=True)
        with contextlib.redirect_stdout(sys.stderr):  # the bootstrap admin line is not JSON
            await node.start()
        out: RtpOut | None = node.rtp  # the node started it ([rtp] enabled)
        proc: asyncio.subprocess.Process | None = None
        try:
            area = node.tree.roots()[0].code
            node.engine.start(Broadcast(ToneSource(440, 0.3), [area], issuer=area,
                                        title="bench"))
            assert out is not None
            st = out.stream(area, "opus")
            # Baseline: the same stream encoded, nobody to send it to.
            hold = node.hub.subscribe(area, "opus", maxlen=1)
            t = loop.time() + WARMUP_SECONDS
            await _sleep_until(t)
            base_s = min(BASELINE_SECONDS, seconds)
            c0, w0 = time.process_time(), time.perf_counter()
            await _sleep_until(t + base_s)
            base_cpu = (time.process_time() - c0) / (time.perf_counter() - w0)

            proc, port = await _start_child()
            for host in _hosts(listeners):
                out.add_receiver(area, "opus", host, port)
            hold.close()
            t = loop.time() + WARMUP_SECONDS
            await _sleep_until(t)
            seq0, sent0, errors0 = st.seq, st.packets, st.errors
            lag0 = node.lag.max_ms
            c0, w0 = time.process_time(), time.perf_counter()
            await _sleep_until(t + seconds)
            cpu = time.process_time() - c0
            wall = time.perf_counter() - w0
            seq1, sent1 = st.seq, st.packets
            window = (seq1 - seq0) % 65536
            for host in _hosts(listeners):
                out.remove_receiver(area, "opus", host, port)
            await asyncio.sleep(DRAIN_SECONDS)
            report = await _child_report(proc, seq0, window, st)
            proc = None
        finally:
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
            await node.stop()
    fraction = cpu / wall
    net = max(fraction - base_cpu, 1e-9)
    per = net / listeners
    expected = window * listeners
    clock = node.clock.stats if node.clock else None
    return {
        "bench": "fanout",
        "transport": "rtp",
        "listeners": listeners,
        "seconds": round(wall, 3),
        "codec": "opus",
        "packets_per_second": round((sent1 - sent0) / wall, 2),
        "server_cpu_seconds": round(cpu, 4),
        "server_cpu_fraction": round(fraction, 5),
        "baseline_cpu_fraction": round(base_cpu, 5),
        "server_cpu_per_listener": round(per, 9),
        "server_cpu_per_listener_gross": round(fraction / listeners, 9),
        "receivers_per_core": round(1 / per),
        "us_per_packet_per_receiver": round(per * 1e6 / 50, 3),
        "delivered_ratio": round(report["received"] / expected, 6) if expected else 0.0,
        "packets_expected": expected,
        "packets_received": report["received"],
        "max_lateness_ms": _ms(report, "lateness_ms", "max"),
        "p99_lateness_ms": _ms(report, "lateness_ms", "p99"),
        "p50_lateness_ms": _ms(report, "lateness_ms", "p50"),
        "first_to_last_receiver_ms_p50": _ms(report, "tick_spread_ms", "p50"),
        "first_to_last_receiver_ms_max": _ms(report, "tick_spread_ms", "max"),
        "send_errors": st.errors - errors0,
        "sender_dropped": st.dropped,
        "sender_blocked": st.blocked,
        "fanout_ms_max": round(st.fanout_ms_max, 3),
        "sendmmsg": out.use_sendmmsg if out else False,
        "loop_lag_max_ms": round(max(node.lag.max_ms, lag0), 3),
        "clock_late_ticks": clock.late_ticks if clock else None,
        "clock_max_lateness_ms": round(clock.max_lateness_ms, 3) if clock else None,
        "receiver_cpu_fraction": round(report["cpu_fraction"], 4),
        "warmup_seconds": WARMUP_SECONDS,
        "baseline_seconds": base_s,
        "cpu_count": os.cpu_count(),
    }


def _ms(report: dict[str, Any], name: str, key: str) -> float | None:
    got = report.get(name)
    return None if not got else round(float(got[key]), 3)


async def _child_report(proc: asyncio.subprocess.Process, seq0: int, window: int,
                        st: RtpStream) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"{seq0} {window} {st.fmt.clock}\n".encode())
    await proc.stdin.drain()
    line = await asyncio.wait_for(proc.stdout.readline(), CHILD_TIMEOUT)
    await asyncio.wait_for(proc.wait(), CHILD_TIMEOUT)
    try:
        report: dict[str, Any] = json.loads(line)
    except json.JSONDecodeError:
        raise BenchError(f"receiver process answered {line!r}") from None
    if "error" in report:
        raise BenchError(f"receiver process: {report['error']}")
    return report


def run(args: argparse.Namespace) -> int:
    listeners = int(args.listeners)
    seconds = float(args.seconds)
    if not 1 <= listeners <= MAX_LISTENERS or not 0 < seconds <= MAX_SECONDS:
        print(f"--listeners must be 1-{MAX_LISTENERS} and --seconds in (0, {MAX_SECONDS:g}]",
              file=sys.stderr)
        return 2
    if getattr(args, "baseline", "none") not in (None, "none"):
        print("rtp: --baseline is not available for this transport (ignored)", file=sys.stderr)
    try:
        result = asyncio.run(measure(listeners, seconds))
    except (BenchError, OSError, ValueError) as e:
        print(f"bench failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["receive"]:
        sys.exit(receive_main())
    print("usage: loa bench fanout --transport rtp --listeners N [--seconds S]", file=sys.stderr)
    sys.exit(2)
