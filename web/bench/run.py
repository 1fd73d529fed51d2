"""`loa bench mix`: what one distinct composition costs to mix and encode, in CPU per audio second.

The bench builds a province with N communes. Every commune hears its own composition of two
sources: a background music programme (a looped clip of a chord whose pitch differs per commune)
ducked under an overlay announcement (a looped tone at a per-commune frequency). Both are 16-bit
PCM clips, as the media library keeps every uploaded file. One consumer per commune
subscribes to Opus and MP3, so the engine renders N distinct mixes and runs 2N encoders. The engine
runs on a `VirtualClock` (ticks back to back) and the bench reports the CPU the process used per
second of audio produced: below 1.0 the machine keeps up in real time.

`--paced` runs the engine on the real media clock instead, as a server does (each tick then starts
on cold caches and costs more: the figure to size a machine with). `--find` searches the largest N
that stays real time with 20 % headroom (exponential, then binary search, short runs). `--baseline liquidsoap` also runs Liquidsoap encoding comparable MP3 streams
(sine -> mksafe -> output.file(%mp3 mono 32 kbit/s) to /dev/null) on its real-time CPU clock, reads
its CPU from /proc, and compares it with Loa encoding MP3 only: the two take turns for
COMPARE_ROUNDS rounds and the figures are medians (the machine is shared and noisy). Only one JSON object goes to
stdout; diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from loa.streamer.areas import AreaTree
from loa.streamer.broadcast import Broadcast, BroadcastClass, Policy
from loa.streamer.clock import FRAME, SAMPLE_RATE, RealClock, VirtualClock
from loa.streamer.engine import Engine, EngineSettings
from loa.streamer.hub import Subscription
from loa.streamer.sources import PcmSource, Playlist
from loa.web.bench.errors import BenchError

TICKS_PER_SECOND = SAMPLE_RATE // FRAME  # 50
WARMUP_SECONDS = 1.0
CLIP_SECONDS = 2.0  # music clip length; every partial is a multiple of 0.5 Hz so it loops cleanly
DRAIN_EVERY = 25  # ticks between two drains of the subscriptions (0.5 s)
SUB_MAXLEN = 200  # packets a subscription keeps; older ones drop (bounded memory either way)
HEADROOM = 0.8  # --find: real time with 20 % headroom
FIND_SECONDS = 3.0
FIND_START = 8
FIND_BUDGET = 100.0  # wall seconds the search may use, so `--find` ends in about two minutes
COMPARE_ROUNDS = 5  # --baseline liquidsoap: Loa and Liquidsoap take turns this many times
COMPARE_ROUND_SECONDS = 3.0
LIQUIDSOAP_MAX_STATIONS = 20
LIQUIDSOAP_WARMUP = 1.0
LIQUIDSOAP_START_TIMEOUT = 30.0
ROOT = "P01"



class LiquidsoapRefused(BenchError):
    """Liquidsoap exited before streaming (e.g. it refused a setting): try another script."""


# ---- the Loa side ---------------------------------------------------------------------------
def _half_hz(f: float) -> float:
    return round(f * 2) / 2


def music_pcm(zone: int, seconds: float = CLIP_SECONDS) -> np.ndarray:
    """A music-like clip, different for every zone: a pulsing chord on a per-zone root note."""
    t = np.arange(int(seconds * SAMPLE_RATE), dtype=np.float64) / SAMPLE_RATE
    f0 = 110.0 + 0.5 * zone
    partials = ((f0, 1.0), (_half_hz(1.25 * f0), 0.6), (_half_hz(1.5 * f0), 0.45),
                (2 * f0, 0.25))
    chord = sum(a * np.sin(2 * np.pi * f * t) for f, a in partials)
    pulse = 0.6 + 0.4 * (0.5 + 0.5 * np.cos(2 * np.pi * 2.0 * t))  # two beats a second
    peak = sum(a for _, a in partials)
    return _s16(0.4 * pulse * chord / peak)


def overlay_hz(zone: int) -> float:
    return 600.0 + 2.5 * zone


def announcement_pcm(zone: int, seconds: float = CLIP_SECONDS) -> np.ndarray:
    """A stand-in for a spoken announcement: a tone at a per-zone pitch (loops cleanly)."""
    t = np.arange(int(seconds * SAMPLE_RATE), dtype=np.float64) / SAMPLE_RATE
    return _s16(0.3 * np.sin(2 * np.pi * overlay_hz(zone) * t))


def _s16(x: np.ndarray) -> np.ndarray:
    """16-bit PCM, as the media library stores every decoded file (streamer/library.py)."""
    return np.round(x * 32767).astype(np.int16)


def commune_code(zone: int) -> str:
    return f"{ROOT}-X{zone + 1:04d}"


class MixBench:
    """N communes, each with its own two-source composition, consumed in `codecs`."""

    def __init__(self, zones: int, codecs: Sequence[str], total_seconds: float,
                 settings: EngineSettings | None = None) -> None:
        if zones < 1:
            raise ValueError("zones must be at least 1")
        self.zones = zones
        self.codecs = tuple(codecs)
        tree = AreaTree()
        tree.add(ROOT, "Tỉnh bench", "province")
        codes = [commune_code(i) for i in range(zones)]
        for i, code in enumerate(codes):
            tree.add(code, f"Xã {i + 1}", "commune", ROOT)
        self.engine = Engine(tree, settings or EngineSettings())
        self.clock = VirtualClock(self.engine.tick)
        repeat = math.ceil(total_seconds / CLIP_SECONDS) + 2
        for i, code in enumerate(codes):
            clip = PcmSource(music_pcm(i), name=f"music {code}")
            music = Playlist([clip], repeat=repeat, name=f"music loop {code}")
            self.engine.start(Broadcast(music, [code], code, klass=BroadcastClass.background,
                                        title=f"nhạc nền {code}"))
            clip = PcmSource(announcement_pcm(i), name=f"announcement {code}")
            speech = Playlist([clip], repeat=repeat, name=f"announcement loop {code}")
            self.engine.start(Broadcast(speech, [code], ROOT, klass=BroadcastClass.normal,
                                        policy=Policy.overlay, title=f"thông báo {code}"))
        self.subs: list[Subscription] = [
            self.engine.hub.subscribe(code, codec, maxlen=SUB_MAXLEN)
            for code in codes for codec in self.codecs
        ]
        self.packets: dict[str, int] = {c: 0 for c in self.codecs}
        self.bytes: dict[str, int] = {c: 0 for c in self.codecs}

    def drain(self) -> None:
        for sub in self.subs:
            got = sub.drain()
            codec = sub.channel.codec
            self.packets[codec] += len(got)
            self.bytes[codec] += sum(len(p.data) for p in got)

    def run(self, ticks: int) -> None:
        done = 0
        while done < ticks:
            step = min(DRAIN_EVERY, ticks - done)
            self.clock.run(step)
            self.drain()
            done += step

    def check(self) -> int:
        """The figure is honest only if every commune is its own mix with both sources."""
        mixes = self.engine.consumed_mixes()
        problems = []
        if len(mixes) != self.zones:
            problems.append(f"{len(mixes)} consumed mixes for {self.zones} zones")
        for m in mixes:
            if len(m.areas) != 1 or len(m.key) != 2:
                problems.append(f"mix {m.id}: areas={sorted(m.areas)} layers={len(m.key)}")
                break
        if len({m.key for m in mixes}) != len(mixes):
            problems.append("consumed mixes share a key")
        want_enc = self.zones * len(self.codecs)
        if self.engine.encoder_count() != want_enc:
            problems.append(f"{self.engine.encoder_count()} encoders, expected {want_enc}")
        if self.engine.stats["source_errors"]:
            problems.append(f"{self.engine.stats['source_errors']} source errors")
        if problems:
            raise BenchError("; ".join(problems))
        return len(mixes)


def measure_mix(zones: int, seconds: float, codecs: Sequence[str] = ("opus", "mp3"),
                settings: EngineSettings | None = None, *,
                paced: bool = False) -> dict[str, Any]:
    """Warm up, then render `seconds` of audio; CPU per audio second.

    Back to back on a virtual clock by default. `paced` runs the engine on the real media clock
    instead, as a server does: every tick wakes the clock thread, which then works on cold caches,
    so the same work costs more CPU (the figure to size a machine with).
    """
    settings = settings or EngineSettings()
    warm = int(round(WARMUP_SECONDS * TICKS_PER_SECOND))
    ticks = max(1, int(round(seconds * TICKS_PER_SECOND)))
    bench = MixBench(zones, codecs, 2 * WARMUP_SECONDS + ticks / TICKS_PER_SECOND + 2, settings)
    late = skipped = 0
    if paced:
        clock = RealClock(bench.engine.tick)
        clock.start()
        try:
            _paced_run(bench, WARMUP_SECONDS)
            bench.check()
            for c in codecs:
                bench.packets[c] = bench.bytes[c] = 0
            gc.collect()
            st = clock.stats
            c0, w0, n0 = time.process_time(), time.perf_counter(), st.ticks
            late0, skipped0 = st.late_ticks, st.skipped_ticks
            _paced_run(bench, ticks / TICKS_PER_SECOND)
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            ticks = st.ticks - n0
            late, skipped = st.late_ticks - late0, st.skipped_ticks - skipped0
        finally:
            clock.stop()
    else:
        bench.run(warm)
        bench.check()
        for c in codecs:
            bench.packets[c] = bench.bytes[c] = 0
        gc.collect()
        c0, w0 = time.process_time(), time.perf_counter()
        bench.run(ticks)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    audio_seconds = ticks / TICKS_PER_SECOND
    mixes = bench.check()
    assert mixes == zones, (mixes, zones)
    per_audio = cpu / audio_seconds
    enc = settings.encoders
    result = {
        "bench": "mix",
        "clock": "real (paced)" if paced else "virtual (back to back)",
        "zones": zones,
        "seconds": audio_seconds,
        "cpu_seconds": round(cpu, 4),
        "wall_seconds": round(wall, 4),
        "cpu_per_audio_second": round(per_audio, 5),
        "cpu_per_zone_percent": round(100 * per_audio / zones, 4),
        # Keeping up: the clock never had to skip ticks (late ticks are reported, not judged:
        # on a shared machine they measure the neighbours as much as Loa).
        "realtime": per_audio < 1.0 and skipped == 0,
        "mixes": mixes,
        "encoders": bench.engine.encoder_count(),
        "codecs": list(codecs),
        "opus_bitrate": enc.opus_bitrate,
        "opus_complexity": enc.opus_complexity,
        "mp3_bitrate": enc.mp3_bitrate,
        "mp3_rate": enc.mp3_rate,
        "mp3_quality": enc.mp3_quality,
        "kbps_per_zone": {c: round(bench.bytes[c] * 8 / audio_seconds / zones / 1000, 2)
                          for c in codecs},
        "warmup_seconds": WARMUP_SECONDS,
    }
    if paced:
        result.update({"late_ticks": late, "skipped_ticks": skipped})
    return result


def _paced_run(bench: MixBench, seconds: float) -> None:
    """Let the real clock run for `seconds`, draining the consumers every DRAIN_EVERY ticks."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, DRAIN_EVERY / TICKS_PER_SECOND))
        bench.drain()


def find_max_zones(seconds: float = FIND_SECONDS, budget: float = FIND_BUDGET,
                   codecs: Sequence[str] = ("opus", "mp3"), *,
                   paced: bool = False) -> dict[str, Any]:
    """Largest N with cpu_per_audio_second <= HEADROOM: double until too slow, then bisect."""
    t0 = time.monotonic()
    tries: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None

    def fits(n: int) -> bool:
        nonlocal best
        r = measure_mix(n, seconds, codecs, paced=paced)
        ok = r["cpu_per_audio_second"] <= HEADROOM and r["realtime"]
        tries.append({"zones": n, "cpu_per_audio_second": r["cpu_per_audio_second"], "fits": ok})
        print(f"bench: zones={n} cpu_per_audio_second={r['cpu_per_audio_second']:.3f} "
              f"{'fits' if ok else 'too slow'}", file=sys.stderr)
        if ok and (best is None or n > best["zones"]):
            best = r
        return ok

    def out_of_time() -> bool:
        return time.monotonic() - t0 > budget

    lo, hi = 0, None  # lo fits (0 trivially), hi does not
    n = FIND_START
    while hi is None:
        if fits(n):
            lo = n
            if out_of_time():
                break
            n *= 2
        else:
            hi = n
    converged = hi is not None
    if hi is not None:
        while hi - lo > 1:
            if out_of_time():
                converged = False
                break
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
    result: dict[str, Any] = {"bench": "mix", "find": True, "max_realtime_zones": lo}
    if best is not None:
        result.update({k: v for k, v in best.items() if k != "bench"})
    result.update({
        "headroom_limit": HEADROOM,
        "converged": converged,
        "first_too_slow_zones": hi,
        "search": tries,
        "search_wall_seconds": round(time.monotonic() - t0, 1),
    })
    return result


# ---- the Liquidsoap baseline ----------------------------------------------------------------
def liquidsoap_version(exe: str) -> str | None:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"Liquidsoap\s+v?(\S+)", out.stdout + out.stderr)
    return m.group(1) if m else None


def liquidsoap_script(stations: int, mp3_rate: int | None, bitrate_kbps: int, major: int,
                      quality: int | None = None) -> str:
    """K stations, each sine -> mksafe -> mono MP3 -> /dev/null, on a 48 kHz mono frame.

    `quality` is LAME's -q (Liquidsoap's `internal_quality`, default 2); Loa uses `mp3_quality`.
    None leaves Liquidsoap's default (44.1 kHz output, quality 2).
    """
    if major >= 2:
        head = [
            "settings.init.allow_root.set(true)",
            "settings.log.stdout.set(true)",
            "settings.log.file.set(false)",
            "settings.log.level.set(3)",
            f"settings.frame.audio.samplerate.set({SAMPLE_RATE})",
            "settings.frame.audio.channels.set(1)",
        ]
    else:
        head = [
            'set("init.allow_root", true)',
            'set("log.stdout", true)',
            'set("log.file", false)',
            'set("log.level", 3)',
            f'set("frame.audio.samplerate", {SAMPLE_RATE})',
            'set("frame.audio.channels", 1)',
        ]
    rate = "" if mp3_rate is None else f", samplerate={mp3_rate}"
    q = "" if quality is None else f", internal_quality={quality}"
    body = [
        f"output.file(%mp3(mono, bitrate={bitrate_kbps}{rate}{q}), "
        f'"/dev/null", mksafe(sine({300.0 + 7.0 * k:.1f})))'
        for k in range(stations)
    ]
    return "\n".join(head + body) + "\n"


def _proc_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class _Liquidsoap:
    """A running Liquidsoap: started, streaming and warmed up; `measure` reads its CPU."""

    def __init__(self, exe: str, script: str) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="loa-bench-")
        path = os.path.join(self._tmp.name, "bench.liq")
        with open(path, "w") as f:
            f.write(script)
        self.proc = subprocess.Popen([exe, path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, cwd=self._tmp.name)
        self._log: deque[str] = deque(maxlen=40)
        self._ready = threading.Event()
        self.catchups = 0
        self._reader = threading.Thread(target=self._read, name="liquidsoap-log", daemon=True)
        self._reader.start()
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.append(line.rstrip())
            if "Streaming loop starts" in line:
                self._ready.set()
            if "catchup" in line.lower():
                self.catchups += 1

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + LIQUIDSOAP_START_TIMEOUT
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None:
                self._reader.join(timeout=5)
                tail = " | ".join(list(self._log)[-6:])
                raise LiquidsoapRefused(f"liquidsoap exited before streaming "
                                        f"(rc={self.proc.returncode}): {tail}")
            if time.monotonic() > deadline:
                raise BenchError(f"liquidsoap did not start streaming within "
                                 f"{LIQUIDSOAP_START_TIMEOUT:g} s")
        time.sleep(LIQUIDSOAP_WARMUP)

    def measure(self, seconds: float) -> tuple[float, float]:
        """(CPU seconds, wall seconds) it used over the next `seconds`."""
        if self.proc.poll() is not None:
            raise BenchError(f"liquidsoap exited early (rc={self.proc.returncode})")
        c0, w0 = _proc_cpu(self.proc.pid), time.monotonic()
        time.sleep(seconds)
        c1, w1 = _proc_cpu(self.proc.pid), time.monotonic()
        if self.proc.poll() is not None:
            raise BenchError(f"liquidsoap exited during the run (rc={self.proc.returncode})")
        return c1 - c0, w1 - w0

    def close(self) -> None:
        _stop(self.proc)
        self._reader.join(timeout=5)
        self._tmp.cleanup()


def _start_liquidsoap(exe: str, stations: int, bitrate: int,
                      attempts: Sequence[tuple[int | None, int | None]]
                      ) -> tuple[_Liquidsoap, dict[str, Any]]:
    """The first (samplerate, quality) of `attempts` Liquidsoap accepts; raises BenchError."""
    version = liquidsoap_version(exe)
    try:
        major = int((version or "2").split(".")[0])
    except ValueError:
        major = 2
    errors = []
    for rate, quality in attempts:
        script = liquidsoap_script(stations, rate, bitrate // 1000, major, quality)
        try:
            ls = _Liquidsoap(exe, script)
        except LiquidsoapRefused as e:  # another setting may be accepted
            errors.append(f"samplerate {rate} internal_quality {quality}: {e}")
            print(f"bench: liquidsoap attempt failed: {errors[-1]}", file=sys.stderr)
            continue
        return ls, {
            "name": "liquidsoap",
            "version": version,
            "stations": stations,
            "samplerate": rate,  # None: Liquidsoap's default (44,100)
            "internal_quality": quality,  # None: Liquidsoap's default (2)
            "bitrate": bitrate,
            "channels": 1,
            "internal_samplerate": SAMPLE_RATE,
            "pipeline": "sine -> mksafe -> output.file(%mp3(mono), /dev/null)",
            "script_line": script.splitlines()[-1],
            "clock": "real-time CPU clock (no sound card)",
            "cpu_resolution_seconds": 1 / os.sysconf("SC_CLK_TCK"),
        }
    raise BenchError("; ".join(errors))


def compare_with_liquidsoap(zones: int, seconds: float,
                            settings: EngineSettings | None = None) -> dict[str, Any]:
    """Loa encoding MP3 only against Liquidsoap encoding 32 kbit/s mono MP3, round after round.

    Two Liquidsoaps run: `baseline` is its own `%mp3(mono, bitrate=32)` (its defaults: 44.1 kHz,
    LAME quality 2), the configuration the issue's 1.1 %-per-station baseline describes;
    `baseline_same_settings` is told Loa's own sample rate and LAME quality. This machine is
    shared and noisy, so Loa and the Liquidsoaps take turns (Loa renders `seconds` of audio, then
    each Liquidsoap's CPU is read over `seconds`) and the figures are medians over the rounds;
    each ratio is the median of the rounds' ratios. Never raises for a missing Liquidsoap.
    """
    settings = settings or EngineSettings()
    enc = settings.encoders
    window = min(seconds, COMPARE_ROUND_SECONDS)
    configs: dict[str, list[tuple[int | None, int | None]]] = {
        "baseline": [(None, None)],
        "baseline_same_settings": [(r, q) for r in dict.fromkeys((enc.mp3_rate, 44_100))
                                   for q in (enc.mp3_quality, None)],
    }
    loa_rounds: list[float] = []
    result: dict[str, Any] = {}
    exe = shutil.which("liquidsoap")
    stations = min(zones, LIQUIDSOAP_MAX_STATIONS)
    running: dict[str, tuple[_Liquidsoap, dict[str, Any]]] = {}
    reasons: dict[str, str] = {}
    try:
        for name, attempts in configs.items():
            if exe is None:
                reasons[name] = "liquidsoap not found on PATH"
                continue
            try:
                running[name] = _start_liquidsoap(exe, stations, enc.mp3_bitrate, attempts)
            except (BenchError, OSError) as e:
                reasons[name] = str(e)
        theirs: dict[str, list[float]] = {name: [] for name in running}
        cpu_totals = {name: [0.0, 0.0] for name in running}
        for _ in range(COMPARE_ROUNDS if running else 1):
            r = measure_mix(zones, window, ("mp3",), settings)
            loa_rounds.append(float(r["cpu_per_zone_percent"]))
            for name, (ls, _) in list(running.items()):
                try:
                    cpu, wall = ls.measure(window)
                except (BenchError, OSError) as e:
                    reasons[name] = str(e)
                    ls.close()
                    del running[name]
                    continue
                cpu_totals[name][0] += cpu
                cpu_totals[name][1] += wall
                theirs[name].append(100 * cpu / wall / stations)
    finally:
        for ls, _ in running.values():
            ls.close()
    result["mp3_only_cpu_per_zone_percent"] = round(statistics.median(loa_rounds), 4)
    result["mp3_only_rounds"] = loa_rounds
    for name in configs:
        suffix = name.removeprefix("baseline")
        if name not in running:
            result[name] = None
            result[f"{name}_reason"] = reasons.get(name, "not measured")
            result[f"ratio_vs_liquidsoap{suffix}"] = None
            continue
        info = running[name][1]
        cpu, wall = cpu_totals[name]
        info.update({
            "seconds": round(wall, 3),
            "cpu_seconds": round(cpu, 3),
            "cpu_per_station_percent": round(statistics.median(theirs[name]), 4),
            "rounds_percent": [round(x, 4) for x in theirs[name]],
            "catchup_warnings": running[name][0].catchups,
        })
        result[name] = info
        ratios = [loa / t for loa, t in zip(loa_rounds, theirs[name], strict=True) if t > 0]
        result[f"ratio_vs_liquidsoap{suffix}"] = (
            round(statistics.median(ratios), 3) if ratios else None)
    return result


# ---- entry point ----------------------------------------------------------------------------
def run_bench(args: argparse.Namespace) -> int:
    if getattr(args, "bench", "mix") != "mix":
        print(f"unknown bench {args.bench!r}", file=sys.stderr)
        return 2
    zones = int(args.zones)
    seconds = float(args.seconds)
    if zones < 1 or seconds <= 0:
        print("--zones must be >= 1 and --seconds > 0", file=sys.stderr)
        return 2
    try:
        paced = bool(getattr(args, "paced", False))
        if args.find:
            result = find_max_zones(min(seconds, FIND_SECONDS), paced=paced)
        else:
            result = measure_mix(zones, seconds, paced=paced)
        if args.baseline == "liquidsoap":
            result.update(compare_with_liquidsoap(int(result.get("zones") or zones), seconds))
        else:
            result["baseline"] = None
            result["baseline_reason"] = "not requested (--baseline none)"
    except BenchError as e:
        print(f"bench failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, ensure_ascii=False))
    return 0
