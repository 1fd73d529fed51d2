"""Where a device's audio goes: `null`, `wav:FILE` (with each frame's instants in
FILE.timing.csv) or `default` (ALSA through `aplay`)."""

from __future__ import annotations

import csv
import shutil
import subprocess
import wave
from contextlib import suppress
from pathlib import Path
from typing import TextIO

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


class AplaySink:
    """The sound card through ALSA's `aplay` (raw s16le 48 kHz mono on its stdin)."""

    def __init__(self) -> None:
        exe = shutil.which("aplay")
        if exe is None:
            raise SinkError(say("agent.no_sound_device"))
        self._proc = subprocess.Popen([exe, "-q", "-t", "raw", "-f", "S16_LE", "-r",
                                       str(SAMPLE_RATE), "-c", "1", "-B", "100000"],
                                      stdin=subprocess.PIPE)

    def write(self, pcm: np.ndarray, rec: PlayRecord) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(to_s16(pcm))

    def close(self) -> None:
        if self._proc.stdin is not None:
            with suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(2.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()


class SinkError(LoaError, ValueError):
    """A `--sink` that cannot be opened (unknown spec, no sound device, no directory)."""

    kind = "invalid"


def make_sink(spec: str) -> NullSink | WavSink | AplaySink:
    """`null`, `wav:FILE` or `default`; SinkError with a bilingual reason otherwise."""
    if spec == "null":
        return NullSink()
    if spec.startswith("wav:") and len(spec) > 4:
        path = Path(spec[4:]).expanduser()
        if not path.parent.is_dir():
            raise SinkError(say("agent.no_directory", path=path.parent))
        return WavSink(path)
    if spec == "default":
        return AplaySink()
    raise SinkError(say("agent.unknown_sink", spec=spec))
