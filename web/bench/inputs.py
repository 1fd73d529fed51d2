"""`python -m loa.web.bench.inputs`: CPU to decode and resample one relayed stream."""

from __future__ import annotations

import json
import os
import threading
import time

from loa.relay.inputs import RelayInput, RelayInputSettings
from loa.streamer.clock import SAMPLE_RATE


def bench(seconds: float = 60.0) -> dict[str, object]:
    """CPU to decode and resample one relayed stream, per audio second (MP3 and AAC over HTTP
    are the common inputs; here from a local file so only the decode path is measured)."""
    import subprocess
    import tempfile

    results: dict[str, object] = {"bench": "relay_input_decode", "audio_seconds": seconds}
    with tempfile.TemporaryDirectory() as tmp:
        for label, args, ext in (
                ("mp3_128k_44k_stereo", ["-c:a", "libmp3lame", "-b:a", "128k", "-ar", "44100",
                                         "-ac", "2"], "mp3"),
                ("aac_64k_48k_stereo", ["-c:a", "aac", "-b:a", "64k", "-ar", "48000",
                                        "-ac", "2"], "aac"),
        ):
            path = os.path.join(tmp, f"in.{ext}")
            subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                            f"sine=frequency=440:duration={seconds}", *args, path], check=True)
            inp = RelayInput(path, RelayInputSettings(buffer_ms=10_000_000,
                                                      max_buffer_ms=20_000_000))
            ended = threading.Event()
            inp.on_state = lambda st, ended=ended: ended.set() if st == "down" else None
            t0 = time.process_time()
            w0 = time.perf_counter()
            inp.start()
            ended.wait(120)
            cpu = time.process_time() - t0
            wall = time.perf_counter() - w0
            inp.close()
            inp.join(5)
            results[label] = {
                "decoded_s": round(inp.samples / SAMPLE_RATE, 2),
                "cpu_percent_of_core": round(100 * cpu / seconds, 3),
                "inputs_per_core": int(seconds / cpu) if cpu else None,
                "wall_s": round(wall, 3),
            }
    return results


if __name__ == "__main__":
    print(json.dumps(bench()))
