"""`loa bench chain --hops N`: a chain of N + 1 real node processes (`loa serve` on loopback,
each with its own data directory), node i the parent of node i + 1, and what crosses the links.

The tree: a root `B` (province) and one area per level below it (`B-1`, `B-1-1`, ...); node i
serves the area of level i, the last node the deepest (the "commune" N hops down), which has
`--relayed K` leaf areas. A probe on every node (a link client with a key that node issued,
for the deepest area) timestamps each Opus frame it receives and decodes it: a frame of a
broadcast leaves a node only once that node has it on the air there and encoded.

- `emergency_first_packet_ms`: `--rounds` emergencies from the province node's API (a tone
  media item, the whole province, `POST /api/v1/broadcasts` class emergency): from the request
  to the first frame of it at each node (`at_node`: it is on the air there), per hop (node i
  minus node i - 1) and end to end (the last node), p50 and p99. Loopback, one machine: no WAN
  in it. `emergency_first_audio_ms`: the same to its first loud frame (a child's jitter buffer
  fills `[upstream] buffer_ms`, 60 ms, before it plays: the first frames are silence).
- `link_outage`: the last link goes through a TCP proxy in this process that drops every
  connection and refuses new ones for `--outage` seconds. First with only the last node's own
  programme on the air there: `local_programme_gap_ms` is how much of it was missing or silent
  around the outage (frames by timestamp). Then with the parent's priority programme on the air
  at the child (above its own): `back_on_parent_audio_ms` from the proxy's return to the first
  loud frame of the parent's programme at the child, and `parent_audio_gap_ms` from the last
  loud one before the drop to that one.
- `cpu_per_relayed_broadcast_percent`: the last node's CPU (from /proc) over `--cpu-seconds`
  with K of the province's broadcasts relayed down to it (one per leaf area: each heard, so each
  crosses every link) minus the same window with none, per broadcast, in % of one core. The
  probes are closed first: nobody listens at the last node, as on a commune node whose
  loudspeakers pull another area; what remains is receiving, decoding and buffering.

Icecast's master/slave relaying, for comparison (`baseline`): a slave polls the master's
stream list every `master-update-interval` (120 s by default) and relays mounts as plain
streams: no class, no authority, no preemption on the slave; a new emergency mount is found up
to 120 s later and plays only where a listener or a fallback override points at it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from loa.codecs.opus import OpusDecoder
from loa.relay.link import LinkError, decode_frame
from loa.web.bench.errors import BenchError
from loa.web.bench.preempt import log, stats
from loa.web.nodeproc import LOCAL, Chain, NodeApi

ROOT = "B"
LEVELS = ["province", "district", "commune", "village", "hamlet"]
LOUD = 0.05  # RMS of a frame that carries the tone (the tones air at about 0.2)
GOALS = {"end_to_end_p99_ms": 300.0, "local_programme_gap_ms": 0.0,
         "back_on_parent_audio_ms": 1000.0}
WAIT = 30.0  # bound for waits on events (a hung bench ends; never a speed figure)
ICECAST = {"master_update_interval_s": 120, "priority": False,
           "note": "an Icecast slave polls the master's mount list every 120 s (default "
                   "master-update-interval) and relays each mount as a plain stream: no class, "
                   "no authority, no preemption on the slave; an emergency is a new mount found "
                   "up to 120 s later, heard only where a listener or a fallback override "
                   "points at it"}


def tree_csv(hops: int, leaves: int) -> tuple[str, list[str]]:
    """The bench's area list and the chain of areas the nodes serve (root first)."""
    areas = [ROOT]
    rows = [f"{ROOT},Tỉnh đo,province,"]
    for i in range(1, hops + 1):
        areas.append(f"{areas[-1]}-1")
        rows.append(f"{areas[-1]},Cấp {i},{LEVELS[min(i, len(LEVELS) - 1)]},{areas[-2]}")
    rows += [f"{areas[-1]}-L{k},Thôn {k},leaf,{areas[-1]}" for k in range(1, leaves + 1)]
    return "code,name,level,parent_code\n" + "\n".join(rows) + "\n", areas


class Proxy:
    """127.0.0.1:<port> forwarded to a node; `drop()` closes every connection and refuses new
    ones (the WAN link is gone), `restore()` forwards again."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.up = True
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._client, LOCAL, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if not self.up:
            w.close()
            return
        try:
            tr, tw = await asyncio.open_connection(LOCAL, self.target)
        except OSError:
            w.close()
            return
        self._writers |= {w, tw}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(r, tw), pipe(tr, w))
        self._writers -= {w, tw}

    def drop(self) -> None:
        self.up = False
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.up = True

    async def close(self) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@dataclass
class Probe:
    """A link client on one node: each frame's arrival, media timestamp and loudness."""

    name: str
    frames: dict[str, list[tuple[float, int, float]]] = field(default_factory=dict)
    decoders: dict[str, OpusDecoder] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    hello: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, http: aiohttp.ClientSession, url: str, key: str, area: str) -> None:
        ws_url = url.replace("http", "ws", 1) + f"/api/v1/nodes/link?areas={area}&node={self.name}"
        async with http.ws_connect(ws_url, headers={"Authorization": f"Node {key}"},
                                   max_msg_size=1 << 20) as ws:
            async for msg in ws:
                now = time.perf_counter()
                if msg.type is aiohttp.WSMsgType.TEXT and '"hello"' in msg.data[:40]:
                    self.hello.set()
                elif msg.type is aiohttp.WSMsgType.BINARY:
                    try:
                        bid, pts, payload = decode_frame(msg.data)
                        dec = self.decoders.setdefault(bid, OpusDecoder())
                        pcm = dec.decode(payload)
                    except (LinkError, ValueError):
                        continue
                    level = float(np.sqrt(np.mean(np.square(pcm)))) if pcm.size else 0.0
                    self.frames.setdefault(bid, []).append((now, pts, level))

    def first(self, bid: str) -> float | None:
        got = self.frames.get(bid)
        return got[0][0] if got else None

    def loud(self, bid: str, after: float = 0.0, before: float = float("inf")) -> list[float]:
        return [t for t, _, lv in self.frames.get(bid, []) if after <= t < before and lv > LOUD]

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


async def until(cond: Any, what: str, within: float = WAIT) -> None:
    deadline = time.monotonic() + within
    while True:
        v = cond()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def tone(path: Path, hz: float, seconds: float) -> Path:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    f"sine=frequency={hz}:duration={seconds}", "-ac", "1", str(path)],
                   check=True)
    return path


async def upload_tone(api: NodeApi, where: Path, hz: float, seconds: float) -> str:
    path = await asyncio.to_thread(tone, where / f"tone-{hz:g}.wav", hz, seconds)
    return await api.upload(path, f"Âm {hz:g} Hz")


def local_gap_ms(frames: list[tuple[float, int, float]], t0: float, t1: float) -> float:
    """Missing or silent audio of a programme between t0 and t1 (arrival times), in ms."""
    got = sorted((pts, lv) for t, pts, lv in frames if t0 <= t <= t1)
    if len(got) < 2:
        return (t1 - t0) * 1000
    missing = sum(max(0, b - a - 960) for (a, _), (b, _) in zip(got, got[1:], strict=False))
    silent = sum(960 for _, lv in got if lv <= LOUD)
    return round((missing + silent) / 48, 1)


async def measure(hops: int, rounds: int, outage: float, cpu_seconds: float,
                  relayed: int, root: Path) -> dict[str, Any]:
    csv, areas = tree_csv(hops, relayed)
    deepest = areas[-1]
    proxies: list[Proxy] = []

    async def via(i: int, url: str) -> str:
        if i != hops:
            return url
        proxy = await Proxy(int(url.rsplit(":", 1)[1])).start()
        proxies.append(proxy)
        return f"http://{LOCAL}:{proxy.port}"

    probes = [Probe(f"probe-{i}") for i in range(hops + 1)]
    async with aiohttp.ClientSession() as http:
        chain = Chain(root, csv, areas, http, via=via)
        try:
            log(f"starting {hops + 1} nodes")
            await chain.start()
            await chain.linked(WAIT)
            for i, (api, node, probe) in enumerate(zip(chain.apis, chain.nodes, probes,
                                                       strict=True)):
                key = await api.node_key(deepest, f"probe {i}")
                probe.task = asyncio.get_running_loop().create_task(
                    probe.run(http, node.url, key, deepest))
                await until(probe.hello.is_set, f"probe {i} linked")
            alarm = await upload_tone(chain.ops[0], root, 1000, 30)

            # ---- emergencies: first frame at every node ------------------------------------
            at_node: list[list[float]] = [[] for _ in range(hops + 1)]
            heard_at: list[list[float]] = [[] for _ in range(hops + 1)]
            for r in range(rounds):
                t0 = time.perf_counter()
                bid = await chain.ops[0].air(alarm, [ROOT], "emergency")
                await until(lambda b=bid: all(p.loud(b) for p in probes), f"emergency {r}")
                for i, p in enumerate(probes):
                    at_node[i].append((p.first(bid) or t0) - t0)
                    heard_at[i].append(p.loud(bid)[0] - t0)
                await chain.ops[0].ok("DELETE", f"/api/v1/broadcasts/{bid}")
                await asyncio.sleep(0.3)
            per_hop = [[(b - a) * 1000 for a, b in zip(at_node[i - 1], at_node[i], strict=True)]
                       for i in range(1, hops + 1)]
            first_packet: dict[str, Any] = {
                "at_node": [stats([t * 1000 for t in ts]) for ts in at_node],
                "per_hop": [{"hop": i + 1, **stats(v)} for i, v in enumerate(per_hop)],
                "end_to_end": stats([t * 1000 for t in at_node[-1]]),
            }
            first_audio = {"at_node": [stats([t * 1000 for t in ts]) for ts in heard_at],
                           "end_to_end": stats([t * 1000 for t in heard_at[-1]])}
            log(f"emergencies: {json.dumps(first_packet['end_to_end'])}")

            # ---- the last link drops and returns ---------------------------------------------
            proxy, last = proxies[0], probes[-1]
            own = await chain.ops[-1].air(await upload_tone(chain.ops[-1], root, 500, 120),
                                          [deepest], "normal")
            await until(lambda: last.loud(own), "the last node's own programme")
            await asyncio.sleep(0.5)
            t_cut = time.perf_counter()
            proxy.drop()
            await asyncio.sleep(outage)
            proxy.restore()
            t_back = time.perf_counter()
            await until(lambda: _state(chain.apis[-1], "up"), "the link back")
            await asyncio.sleep(1.0)
            local_gap = local_gap_ms(last.frames.get(own, []), t_cut - 0.2,
                                     time.perf_counter())

            parents = await chain.ops[-2].air(await upload_tone(chain.ops[-2], root, 700, 120),
                                              [deepest], "priority")
            await until(lambda: last.loud(parents), "the parent's programme at the child")
            await asyncio.sleep(0.5)
            t_cut = time.perf_counter()
            proxy.drop()
            await asyncio.sleep(outage)
            proxy.restore()
            t_back = time.perf_counter()
            await until(lambda: last.loud(parents, after=t_back), "the parent's audio back")
            back = last.loud(parents, after=t_back)[0]
            before = last.loud(parents, before=t_cut)[-1]
            outage_figures: dict[str, Any] = {
                "outage_s": outage, "local_programme_gap_ms": local_gap,
                "back_on_parent_audio_ms": round((back - t_back) * 1000, 1),
                "parent_audio_gap_ms": round((back - before) * 1000, 1),
            }
            log(f"outage: {json.dumps(outage_figures)}")
            for bid, api in ((own, chain.ops[-1]), (parents, chain.ops[-2])):
                await api.ok("DELETE", f"/api/v1/broadcasts/{bid}")

            # ---- CPU per relayed broadcast at the last node ----------------------------------
            for p in probes:
                await p.close()
            child = chain.nodes[-1]
            await asyncio.sleep(1.0)
            c0 = child.cpu_seconds()
            await asyncio.sleep(cpu_seconds)
            idle = child.cpu_seconds() - c0
            music = await upload_tone(chain.ops[0], root, 300, 120)
            sent = [await chain.ops[0].air(music, [f"{deepest}-L{k}"], "normal")
                    for k in range(1, relayed + 1)]
            await until(lambda: _relayed(chain.apis[-1], relayed), "the broadcasts relayed")
            await asyncio.sleep(1.0)
            c0 = child.cpu_seconds()
            await asyncio.sleep(cpu_seconds)
            busy = child.cpu_seconds() - c0
            for bid in sent:
                await chain.ops[0].ok("DELETE", f"/api/v1/broadcasts/{bid}")
            cpu = {"idle_percent": round(idle / cpu_seconds * 100, 2),
                   "with_relayed_percent": round(busy / cpu_seconds * 100, 2),
                   "relayed": relayed,
                   "per_relayed_broadcast_percent":
                       round(max(0.0, busy - idle) / cpu_seconds / relayed * 100, 3)}
        finally:
            for p in probes:
                await p.close()
            await chain.close()
            for proxy in proxies:
                await proxy.close()
    met = {
        "end_to_end_p99_ms": (first_packet["end_to_end"]["p99"] or 1e9)
        <= GOALS["end_to_end_p99_ms"],
        "local_programme_gap_ms": local_gap <= GOALS["local_programme_gap_ms"],
        "back_on_parent_audio_ms": outage_figures["back_on_parent_audio_ms"]
        <= GOALS["back_on_parent_audio_ms"],
    }
    return {"bench": "chain", "hops": hops, "nodes": hops + 1, "rounds": rounds,
            "emergency_first_packet_ms": first_packet, "emergency_first_audio_ms": first_audio,
            "link_outage": outage_figures,
            "cpu": cpu, "cpu_per_relayed_broadcast_percent": cpu["per_relayed_broadcast_percent"],
            "goals": GOALS, "met": met, "baseline": {"icecast_master_slave": ICECAST}}


async def _state(api: NodeApi, state: str) -> bool:
    return (await api.upstream()).get("state") == state


async def _relayed(api: NodeApi, n: int) -> bool:
    return len((await api.upstream()).get("broadcasts", [])) >= n


def run(args: argparse.Namespace) -> int:
    if args.hops < 1 or args.rounds < 1 or args.relayed < 1:
        log("--hops, --rounds and --relayed must be >= 1")
        return 2
    with tempfile.TemporaryDirectory(prefix="loa-bench-chain-") as tmp:
        try:
            result = asyncio.run(measure(args.hops, args.rounds, args.outage, args.cpu_seconds,
                                         args.relayed, Path(tmp)))
        except BenchError as e:
            log(f"bench chain: {e}")
            return 1
    print(json.dumps(result, ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(2)
