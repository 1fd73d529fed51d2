"""Relay inputs ("tiếp sóng"): air an outside stream, e.g. national radio (VOV) at 05:00 and 17:00.

A `RelayInput` opens the stream with PyAV (FFmpeg's demuxers: HTTP/Icecast MP3, Ogg, AAC; HLS
`.m3u8`; RTP described by an `.sdp` URL or file) in a background thread, because opening,
demuxing and decoding block. It decodes, resamples to 48 kHz mono float32 and writes into a
`LivePush` jitter buffer, which the engine reads on the media clock like any live source.

When the input fails or ends, the LivePush underruns and the area hears silence (never the end of
the broadcast: only `close()` ends it); the thread logs `event=relay_input_down` and reconnects
with exponential backoff (0.5 s doubling to `backoff_max`, 1 s, so a station that comes back is on
air within a second; each wait is shortened by up to `backoff_jitter` of itself at random, so many
relays of one station do not reconnect in lockstep; a connection that stayed up a minute resets
it), logging `event=relay_input_up` when audio flows again.

Pacing: the thread writes only while the LivePush holds less than its target delay and otherwise
waits for the engine to drain it. A source that sends faster than real time (HLS fetches whole
segments; an Icecast server bursts on connect) is read at the pace it is played, not dropped by
overruns; a real-time source never waits. The LivePush follows small clock drift by itself.

Stopping: `close()` is immediate for the caller (a flag, no join) and the thread notices it between
two packets; a read that blocks on a silent network ends within `read_timeout` (FFmpeg's interrupt
callback, through PyAV's timeout), so the thread is gone within that bound, `join()` waits for it.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import av
import numpy as np

from loa.streamer.clock import SAMPLE_RATE
from loa.streamer.errors import LoaError
from loa.streamer.messages import say
from loa.streamer.sources import LivePush

log = logging.getLogger("loa.relay.inputs")

UNREAD_SECONDS = 0.5  # a LivePush not read for this long is not on air: do not wait for it


@dataclass
class RelayInputSettings:
    buffer_ms: float = 150.0  # the LivePush's target delay (what the thread keeps ahead)
    max_buffer_ms: float = 1000.0  # beyond this the LivePush drops the oldest audio
    open_timeout: float = 5.0  # seconds to connect and find the audio
    read_timeout: float = 5.0  # seconds without data: the input is down
    backoff_min: float = 0.5
    backoff_max: float = 1.0  # a returning station is on air within this (plus its open time)
    backoff_jitter: float = 0.25  # each wait is cut by up to this fraction of itself, at random
    good_after: float = 60.0  # up this long: the next failure retries after backoff_min again
    probesize: int = 8192  # bytes FFmpeg reads to recognise the format (32 kbit/s MP3: 2 s)
    analyzeduration_ms: int = 200  # how much of the stream FFmpeg looks at for its parameters
    max_bad_packets: int = 50  # consecutive undecodable packets before the input counts as down
    user_agent: str = "Loa relay (tiep song)"


def safe_url(url: str) -> str:
    """The URL for logs: no user:password, no query string (tokens live there)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    if not parts.scheme or not parts.netloc:
        return os.path.basename(url) or "<file>"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    if parts.username or parts.password:
        host = f"***@{host}"
    return urlunsplit((parts.scheme, host, parts.path, "…" if parts.query else "", ""))


def _is_local(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("", "file")


def open_options(url: str, settings: RelayInputSettings) -> tuple[str | None, dict[str, str]]:
    """The container format to force (or None: probe) and FFmpeg options for `url`."""
    path = urlsplit(url).path.lower()
    local = _is_local(url)
    opts = {
        "fflags": "nobuffer",
        "probesize": str(settings.probesize),
        "analyzeduration": str(settings.analyzeduration_ms * 1000),
        "rw_timeout": str(int(settings.read_timeout * 1_000_000)),
        "user_agent": settings.user_agent,
    }
    # Playlists and SDP files name further URLs: only network protocols may be opened from them,
    # local files only when the operator gave a local file in the first place.
    network = "http,https,tcp,tls,crypto,udp,rtp,srtp,srt,httpproxy"
    opts["protocol_whitelist"] = ("file," + network) if local else network
    fmt: str | None = None
    if path.endswith(".sdp"):
        fmt = "sdp"
        opts.pop("rw_timeout")  # the SDP demuxer's UDP reads are bounded by the interrupt callback
        opts["reorder_queue_size"] = "0"
        opts["max_delay"] = "100000"
    elif path.endswith(".m3u8"):
        fmt = "hls"
        opts["http_persistent"] = "1"
        opts["live_start_index"] = "-2"
    if local:
        opts.pop("rw_timeout", None)
        opts.pop("user_agent", None)
    return fmt, opts


class InputDown(LoaError):
    """The input cannot be opened, carries no audio, or stopped."""

    kind = "unavailable"


def decoded_audio(container: Any, stopped: Callable[[], bool], max_bad: int,
                  on_bad: Callable[[], None] | None = None) -> Iterator[np.ndarray]:
    """The first audio stream of an open PyAV container, decoded and resampled to 48 kHz mono
    float32, chunk by chunk, until it ends or `stopped()`; InputDown when it has no audio or
    `max_bad` packets in a row do not decode (garbage, or the wrong format)."""
    if not container.streams.audio:
        raise InputDown("no audio stream")
    stream = container.streams.audio[0]
    mono = MonoResampler()
    bad = 0
    for packet in container.demux(stream):
        if stopped():
            return
        try:
            frames = packet.decode()
        except (av.InvalidDataError, ValueError) as e:
            bad += 1
            if on_bad is not None:
                on_bad()
            if bad >= max_bad:
                raise InputDown(f"undecodable audio: {e}") from None
            continue
        bad = 0
        for frame in frames:
            for pcm in mono(frame):
                yield pcm
                if stopped():
                    return


class MonoResampler:
    """Decoded frames of any shape -> 48 kHz mono float32 chunks."""

    def __init__(self) -> None:
        self.resampler: av.AudioResampler | None = None
        self.shape: tuple[str, str, int] | None = None

    def __call__(self, frame: av.AudioFrame) -> Iterator[np.ndarray]:
        key = (frame.format.name, frame.layout.name, frame.sample_rate)
        if self.resampler is None or key != self.shape:
            # A new stream shape (an HLS discontinuity, a changed station): start a new
            # resampler rather than feeding the old one frames it was not made for.
            self.resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            self.shape = key
        for out in self.resampler.resample(frame):
            yield out.to_ndarray().reshape(-1)


class RelayInput:
    """An outside stream decoded in a thread into a LivePush. `start()`, then `close()`."""

    def __init__(self, url: str, settings: RelayInputSettings | None = None,
                 name: str = "relay", clock: Callable[[], float] = time.monotonic) -> None:
        if not isinstance(url, str) or not url.strip():
            raise ValueError(say("relay.no_url"))
        self.url = url.strip()
        self.settings = settings or RelayInputSettings()
        s = self.settings
        self.push = LivePush(target_ms=s.buffer_ms, max_ms=s.max_buffer_ms, name=name)
        self.name = name
        self.clock = clock
        self.state = "new"  # new | connecting | up | down | closed
        self.attempts = 0  # opens tried
        self.ups = 0  # times audio started flowing
        self.downs = 0  # times the input went down (failed to open or stopped)
        self.bad_packets = 0
        self.samples = 0  # 48 kHz samples written
        self.last_error = ""
        self.up_at: float | None = None  # clock() when audio last started flowing
        self.attempt_at: float | None = None  # clock() when the latest connection attempt began
        self.on_state: Callable[[str], None] | None = None  # called from the thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._high = int(s.buffer_ms * SAMPLE_RATE / 1000)
        self._flowed = False  # audio came through in the current connection
        self._seen_position = -1  # the LivePush's read position, last time we looked
        self._seen_at = 0.0

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def start(self) -> RelayInput:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="loa-relay-input",
                                            daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop: the thread ends at its next packet (or its read timeout); the LivePush ends."""
        if not self._stop.is_set():
            self._stop.set()
            self.push.close()
            log.info("relay input closed event=relay_input_closed url=%s", safe_url(self.url))

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end (call from a thread, never the event loop)."""
        t = self._thread
        if t is not None:
            t.join(timeout)
            return not t.is_alive()
        return True

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the thread ------------------------------------------------------------------------------
    def _set(self, state: str) -> None:
        self.state = state
        cb = self.on_state
        if cb is not None:
            try:
                cb(state)
            except Exception:  # a listener's bug must not stop the input
                log.exception("relay input state callback failed event=relay_input_error")

    def _run(self) -> None:
        s = self.settings
        delay = s.backoff_min
        announced = False  # the current outage has been logged as relay_input_down
        while not self._stop.is_set():
            self.attempts += 1
            self.attempt_at = self.clock()
            self._flowed = False
            self._set("connecting")
            try:
                reason = self._session()
            except InputDown as e:
                reason = str(e)
            except av.ExitError:
                reason = f"no data for {s.read_timeout:g} s"
            except av.FFmpegError as e:
                reason = f"{type(e).__name__}: {e.strerror or e}"
            except Exception as e:  # whatever the input does, the thread lives on
                log.exception("relay input failed event=relay_input_error url=%s",
                              safe_url(self.url))
                reason = f"{type(e).__name__}: {e}"
            if self._stop.is_set():
                break
            self.last_error = reason
            if self._flowed:
                announced = False
                if self.up_at is not None and self.clock() - self.up_at >= s.good_after:
                    delay = s.backoff_min  # a good minute: start the backoff over
            self.downs += 1
            self._set("down")
            wait = self.retry_delay(delay)
            if not announced:
                log.warning("relay input down event=relay_input_down url=%s error=%s "
                            "retry_in=%.2f", safe_url(self.url), reason, wait)
                announced = True
            else:
                log.info("relay input still down event=relay_input_retry url=%s attempt=%d "
                         "error=%s retry_in=%.2f", safe_url(self.url), self.attempts, reason,
                         wait)
            if self._stop.wait(wait):
                break
            delay = min(delay * 2, s.backoff_max)
        self._set("closed")

    def retry_delay(self, delay: float) -> float:
        """The wait before the next attempt: the backoff step, capped, cut by a random jitter."""
        s = self.settings
        step = min(delay, s.backoff_max)
        return step * (1.0 - s.backoff_jitter * random.random())

    def _open(self) -> Any:
        fmt, opts = open_options(self.url, self.settings)
        s = self.settings
        try:
            return av.open(self.url, "r", format=fmt, options=opts,
                           timeout=(s.open_timeout, s.read_timeout))
        except av.ExitError:
            raise InputDown(f"cannot open: nothing within {s.open_timeout:g} s") from None
        except av.FFmpegError as e:
            raise InputDown(f"cannot open: {e.strerror or e}") from None

    def _session(self) -> str:
        """One connection: open, decode until it ends. Returns why it ended."""
        container = self._open()
        try:
            if self._stop.is_set():
                return "closed"

            def bad() -> None:
                self.bad_packets += 1

            for pcm in decoded_audio(container, self._stop.is_set,
                                     self.settings.max_bad_packets, bad):
                self._write(pcm)
                if self._stop.is_set():
                    return "closed"
            return "closed" if self._stop.is_set() else "ended"
        finally:
            container.close()

    def _write(self, pcm: np.ndarray) -> None:
        push = self.push
        # Keep at most the target delay ahead of the engine: wait for it to play what is there.
        # Nobody reading (not on air yet): write anyway, the LivePush keeps only the newest audio,
        # so a relay that starts later does not start with stale audio.
        while not self._stop.is_set():
            over = push.fill_ms * SAMPLE_RATE / 1000 - self._high
            if over < 0:
                break
            now = self.clock()
            if push.position != self._seen_position:
                self._seen_position = push.position
                self._seen_at = now
            elif now - self._seen_at > UNREAD_SECONDS:
                break
            self._stop.wait(over / SAMPLE_RATE + 0.002)
        if self._stop.is_set():
            return
        push.write(pcm)
        self.samples += pcm.shape[0]
        if not self._flowed:
            self._flowed = True
            self.ups += 1
            self.up_at = self.clock()
            self._set("up")
            log.info("relay input up event=relay_input_up url=%s attempt=%d open_ms=%.0f",
                     safe_url(self.url), self.attempts,
                     (self.up_at - (self.attempt_at or self.up_at)) * 1000)
