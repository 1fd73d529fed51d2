"""Where a device's audio goes: `null`, `wav:FILE` (with each frame's instants in
FILE.timing.csv), `default` or `alsa:DEVICE` (a sound card through ALSA: a loudspeaker's
amplifier, or the line input of a commune's FM transmitter when the agent runs as its bridge)."""

from __future__ import annotations

import csv
import os
import wave
from contextlib import suppress
from pathlib import Path
from typing import TextIO

import av
import numpy as np

from loa.relay.agent.playout import SAMPLE_RATE, PlayRecord
from loa.streamer.errors import LoaError
from loa.streamer.messages import say


class NullSink:
    """Discards the audio; the player's records keep when each frame was played."""

    def write(self, pcm: np.ndarray, rec: PlayRecord) -> None:
        pass

    def close(self) -> None:
        pass


def to_s16(pcm: np.ndarray) -> bytes:
    return (np.clip(pcm, -1.0, 1.0) * 32767).astype("<i2").tobytes()


class WavSink:
    """48 kHz mono 16-bit WAV, and FILE.timing.csv with each frame's instants."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._wav = wave.open(str(path), "wb")  # noqa: SIM115 - closed in close()
        self._wav.setnchannels(1)
        self._wav.setsampwidth(2)
        self._wav.setframerate(SAMPLE_RATE)
        self._timing: TextIO = open(f"{path}.timing.csv", "w", newline="",  # noqa: SIM115
                                    encoding="ascii")
        self._csv = csv.writer(self._timing)
        self._csv.writerow(["ts", "ideal", "played", "source", "arrival", "samples"])
        self.samples = 0

    def write(self, pcm: np.ndarray, rec: PlayRecord) -> None:
        self._wav.writeframes(to_s16(pcm))
        self._csv.writerow([rec.ts, f"{rec.ideal:.6f}", f"{rec.played:.6f}",
                            f"{rec.source:.6f}", f"{rec.arrival:.6f}", pcm.shape[0]])
        self.samples += pcm.shape[0]

    def close(self) -> None:
        self._wav.close()
        self._timing.close()


SYSTEM_ALSA_CONF = Path("/usr/share/alsa/alsa.conf")


class AlsaSink:
    """A sound card through ALSA (PyAV's `alsa` output; no external player): `default`, a card
    (`hw:1,0`) or a PCM named in asound.conf. Writes are paced by the player's clock; ALSA's own
    buffer absorbs the card's small drift against it."""

    def __init__(self, device: str) -> None:
        self.device = device
        # PyAV's wheels carry their own alsa-lib, built to read its configuration from a path
        # that exists only on their build machine: point it at the system's (Debian:
        # libasound2-data), or no card and no asound.conf PCM is known.
        if "ALSA_CONFIG_PATH" not in os.environ and SYSTEM_ALSA_CONF.exists():
            os.environ["ALSA_CONFIG_PATH"] = str(SYSTEM_ALSA_CONF)
        try:
            self._out = av.open(device, "w", format="alsa")
            self._stream = self._out.add_stream("pcm_s16le", rate=SAMPLE_RATE, layout="mono")
            self._out.start_encoding()  # opens the device now: a wrong name fails at start
        except (av.FFmpegError, OSError, ValueError) as e:
            raise SinkError(say("agent.no_sound_device", device=device, error=e)) from None

    def write(self, pcm: np.ndarray, rec: PlayRecord) -> None:
        s16 = (np.clip(pcm, -1.0, 1.0) * 32767).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(s16, format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        for packet in self._stream.encode(frame):
            self._out.mux(packet)

    def close(self) -> None:
        with suppress(av.FFmpegError, OSError, ValueError):
            for packet in self._stream.encode(None):
                self._out.mux(packet)
        with suppress(av.FFmpegError, OSError, ValueError):
            self._out.close()


class SinkError(LoaError, ValueError):
    """A `--sink` that cannot be opened (unknown spec, no sound device, no directory)."""

    kind = "invalid"


def make_sink(spec: str) -> NullSink | WavSink | AlsaSink:
    """`null`, `wav:FILE`, `default` or `alsa:DEVICE`; SinkError with a bilingual reason
    otherwise."""
    if spec == "null":
        return NullSink()
    if spec.startswith("wav:") and len(spec) > 4:
        path = Path(spec[4:]).expanduser()
        if not path.parent.is_dir():
            raise SinkError(say("agent.no_directory", path=path.parent))
        return WavSink(path)
    if spec == "default":
        return AlsaSink("default")
    if spec.startswith("alsa:") and len(spec) > 5:
        return AlsaSink(spec[5:])
    raise SinkError(say("agent.unknown_sink", spec=spec))
