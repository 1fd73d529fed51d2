"""HTTP fan-out in worker processes (loa.relay.fanout), against a real node and real clients.

The node parses the request and counts the limits; the listener's socket then belongs to a
worker process, which writes the stream. Waits are bounded polls on counters, never timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from loa.relay.fanout import FanoutPool
from tests.audio import peak_hz
from tests.helpers import until
from tests.httpstreams import AREA, Server, Start, mp3_frames, open_stream, read_wav, servers


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """Nodes with fan-out workers (as many as each test asks for)."""
    async with servers(tmp_path, 1) as _start:
        yield _start


def pool_of(srv: Server) -> FanoutPool:
    return srv.node.fanout


def socket_holders(local_port: int, remote_port: int) -> set[int]:
    """Pids holding the server-side socket of one loopback TCP connection."""
    inode = ""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            local, remote = parts[1], parts[2]
            if int(local.split(":")[1], 16) == local_port and \
                    int(remote.split(":")[1], 16) == remote_port:
                inode = parts[9]
    assert inode and inode != "0", "connection not found"
    holders = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    holders.add(int(pid))
        except OSError:
            continue
    return holders


async def test_listener_socket_belongs_to_the_worker_not_the_node(start: Start) -> None:
    srv = await start(workers=1, warm_seconds=0)  # unsubscribed with the last listener
    srv.background(440)
    reader, writer, status, _ = await open_stream(srv.port, f"/streams/{AREA}.mp3")
    assert status == "HTTP/1.0 200 OK"
    audio = await reader.readexactly(4000)
    assert mp3_frames(audio) >= 40  # MPEG-2 layer III frames from the first byte on
    client_port = writer.get_extra_info("sockname")[1]
    pool = pool_of(srv)
    await until(lambda: socket_holders(srv.port, client_port) == set(pool.worker_pids()),
                "the node to let go of the listener's socket", timeout=20.0)
    assert os.getpid() not in socket_holders(srv.port, client_port)
    assert srv.streamer.total == 1 and srv.streamer.channels == {}  # counted, not served here
    writer.close()
    await until(lambda: srv.streamer.total == 0, "the worker to report the listener gone", timeout=20.0)
    assert srv.node.hub.channels[(AREA, "mp3")].subs == []  # unsubscribed with the last one


async def test_worker_streams_decodable_audio_with_counters(start: Start, tmp_path: Path) -> None:
    srv = await start(workers=2)
    srv.background(440)
    outs = []
    procs = []
    for codec in ("mp3", "opus"):
        out = tmp_path / f"w-{codec}.wav"
        outs.append(out)
        procs.append(await asyncio.create_subprocess_exec(
            "ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i",
            srv.url(f"/streams/{AREA}.{codec}"), "-t", "2", "-ac", "1", "-ar", "48000",
            str(out)))
    await until(lambda: srv.streamer.total == 2, "both listeners", timeout=20.0)
    await until(lambda: srv.sent(AREA, "mp3") > 4000 and srv.sent(AREA, "opus") > 4000,
                "the workers' byte counters to reach the node", timeout=20.0)
    assert sorted(len(w.listeners) for w in pool_of(srv).workers) == [1, 1]  # least loaded
    for proc in procs:
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    for out in outs:
        pcm, rate = read_wav(out)
        assert pcm.shape[0] >= 1.9 * rate
        assert abs(peak_hz(pcm[int(0.3 * rate):], rate) - 440) < 10
    await until(lambda: srv.streamer.total == 0, "ffmpeg's connections to be closed", timeout=20.0)
    stats = srv.streamer.stats()
    assert stats["listeners"] == 0 and len(stats["streams"]) == 2
    assert all(s["listeners"] == 0 for s in stats["streams"])
    await until(lambda: all(s["joined"] == 1 for s in srv.streamer.stats()["streams"]),
                "the workers' join counters", timeout=20.0)


async def test_icy_titles_through_a_worker(start: Start) -> None:
    srv = await start(workers=1, icy_metaint=1000)
    srv.background(440, "Nhạc nền")
    reader, writer, _, headers = await open_stream(srv.port, f"/streams/{AREA}.mp3",
                                                   "Icy-MetaData: 1")
    assert headers["icy-metaint"] == "1000"
    titles: list[str] = []
    try:
        for _ in range(80):
            await reader.readexactly(1000)
            n = (await reader.readexactly(1))[0]
            if n:
                text = (await reader.readexactly(n * 16)).rstrip(b"\0").decode("utf-8")
                titles.append(text[len("StreamTitle='"):-2])
                if len(titles) == 1:
                    srv.bulletin(1000, "Bản tin huyện")
            if titles and titles[-1] == "Bản tin huyện (normal)":
                break
    finally:
        writer.close()
    assert titles == ["Nhạc nền (background)", "Bản tin huyện (normal)"]
    assert pool_of(srv).workers[0].titles[AREA] == "Bản tin huyện (normal)"


async def one_listener_on_one_worker(start: Start) -> tuple[
        Server, FanoutPool, asyncio.StreamReader, asyncio.StreamWriter, int]:
    srv = await start(workers=1, warm_seconds=0)  # unsubscribed with the last listener
    srv.background(440)
    pool = pool_of(srv)
    reader, writer, _, _ = await open_stream(srv.port, f"/streams/{AREA}.mp3")
    await reader.readexactly(2000)
    [pid] = pool.worker_pids()
    return srv, pool, reader, writer, pid


async def test_killed_worker_is_restarted_and_new_listeners_play(start: Start) -> None:
    srv, pool, reader, writer, pid = await one_listener_on_one_worker(start)
    old = [pid]
    os.kill(pid, signal.SIGKILL)
    while await asyncio.wait_for(reader.read(65536), 30):
        pass  # the listener's connection ends with its worker
    writer.close()
    await until(lambda: pool.restarts == 1 and len(pool.worker_pids()) == 1,
                "the worker to be started again", timeout=20.0)
    assert pool.worker_pids() != old
    assert srv.streamer.total == 0 and srv.node.hub.channels[(AREA, "mp3")].subs == []
    reader, writer, status, _ = await open_stream(srv.port, f"/streams/{AREA}.mp3")
    assert status == "HTTP/1.0 200 OK"
    audio = await asyncio.wait_for(reader.readexactly(8000), 30)
    assert mp3_frames(audio) >= 80  # MPEG-2 layer III frames from the first byte on
    assert len(pool.workers[0].listeners) == 1  # served by the new worker
    writer.close()


async def test_limits_still_answer_503_with_workers(start: Start) -> None:
    srv = await start(workers=1, max_listeners_per_area=1, retry_after=7)
    srv.background()
    a = await open_stream(srv.port, f"/streams/{AREA}.mp3")
    async with aiohttp.ClientSession() as http:
        async with http.get(srv.url(f"/streams/{AREA}.opus")) as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "7"
            assert "khu vực đã đủ người nghe" in (await r.json())["error"]
        a[1].close()
        await until(lambda: srv.streamer.total == 0, "the worker to report the listener gone", timeout=20.0)
        async with http.get(srv.url(f"/streams/{AREA}.opus")) as r:
            assert r.status == 200
            assert (await r.content.readexactly(4)) == b"OggS"
    assert srv.streamer.rejected == 1


def test_worker_socketpair_passes_a_descriptor() -> None:
    """SCM_RIGHTS over SOCK_SEQPACKET: one message, one socket, the bytes intact."""
    from loa.relay.workers import pair as _pair

    a, b = _pair()
    x, y = socket.socketpair()
    try:
        socket.send_fds(a, [b"hello"], [x.fileno()])
        data, fds, _, _ = socket.recv_fds(b, 1024, 4)
        assert data == b"hello" and len(fds) == 1
        with socket.socket(fileno=fds[0]) as passed:
            passed.sendall(b"via worker")
            assert y.recv(100) == b"via worker"
    finally:
        for s in (a, b, x, y):
            s.close()


async def test_a_worker_that_stops_reading_is_replaced(start: Start) -> None:
    srv, pool, _reader, writer, old = await one_listener_on_one_worker(start)
    os.kill(old, signal.SIGSTOP)  # alive but frozen: it stops reporting to the node
    try:
        await until(lambda: pool.restarts == 1, "the frozen worker to be replaced", timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old, signal.SIGCONT)
    writer.close()
    await until(lambda: len(pool.worker_pids()) == 1 and pool.worker_pids() != [old],
                "a new worker", timeout=20.0)
    assert srv.streamer.total == 0
    reader, writer, status, _ = await open_stream(srv.port, f"/streams/{AREA}.mp3")
    assert status == "HTTP/1.0 200 OK"
    assert mp3_frames(await asyncio.wait_for(reader.readexactly(4000), 30)) >= 40
    writer.close()


async def test_a_channel_stays_warm_for_the_workers_after_its_last_listener(start: Start) -> None:
    """A listener who comes back within warm_seconds gets a fresh burst from the worker: the
    node keeps feeding the worker's channel after its last listener left."""
    srv = await start(workers=1, warm_seconds=30)
    srv.background(440)
    reader, writer, _, _ = await open_stream(srv.port, f"/streams/{AREA}.mp3")
    await reader.readexactly(2000)
    writer.close()
    await until(lambda: srv.streamer.total == 0, "the listener left", timeout=20.0)
    pool = pool_of(srv)
    assert (AREA, "mp3") in pool.subs and (AREA, "mp3") in pool.cooling  # still fed, cooling
    assert srv.node.hub.channels[(AREA, "mp3")].subs  # the encoder keeps running
    reader, writer, _, _ = await open_stream(srv.port, f"/streams/{AREA}.mp3")
    await reader.readexactly(2000)
    assert (AREA, "mp3") not in pool.cooling  # back in use: no longer cooling
    writer.close()
