"""Decoding media files into the internal format: 48 kHz mono float32.

Decoding is blocking work (PyAV releases the GIL while it decodes): call `decode_file` or iterate
`decode_chunks` in a thread (`asyncio.to_thread`), never on the event loop.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import av
import av.error
import numpy as np

SAMPLE_RATE = 48_000
MIN_SECONDS = 0.1


class MediaError(ValueError):
    """The input is not usable audio: not media, no audio stream, corrupt, empty, too long."""


def _why(e: Exception) -> str:
    """The reason without the file name (errors are shown to operators; paths are ours)."""
    return str(getattr(e, "strerror", None) or type(e).__name__)


def _open(path: str | os.PathLike[str]) -> av.container.InputContainer:
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise MediaError(f"không đọc được tệp / cannot read file: {e.strerror}") from None
    if size == 0:
        raise MediaError("tệp rỗng / empty file")
    try:
        return av.open(os.fspath(path), mode="r", options={"probesize": "5000000"})
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise MediaError(f"không phải tệp âm thanh / not a media file: {_why(e)}") from None


def decode_file(
    path: str | os.PathLike[str],
    *,
    max_seconds: float | None = None,
    strict: bool = True,
) -> np.ndarray:
    """Decode the first audio stream of `path` to 48 kHz mono float32, all in memory (short
    files: sources, tests). Uploads use `decode_chunks`, whose memory does not grow."""
    return np.concatenate(list(decode_chunks(path, max_seconds=max_seconds, strict=strict)))


CHUNK_SAMPLES = SAMPLE_RATE  # what `decode_chunks` hands on at a time: ~1 s, 192 KB


def decode_chunks(
    path: str | os.PathLike[str],
    *,
    max_seconds: float | None = None,
    strict: bool = True,
) -> Iterator[np.ndarray]:
    """Decode the first audio stream of `path` to 48 kHz mono float32 chunks of about
    CHUNK_SAMPLES, clipped to [-1, 1]; memory stays bounded whatever the file's length.

    Every check raises MediaError as soon as it can: the duration limit while decoding, the
    others (empty, too short, truncated) after the last chunk, so a consumer must treat what it
    received as provisional until the generator is exhausted. With `strict`, any corrupt packet
    makes the whole file an error: a bulletin that airs with a hole or a burst of noise is worse
    than one that is refused at upload.
    """
    container = _open(path)
    total = 0
    try:
        if not container.streams.audio:
            raise MediaError("tệp không có âm thanh / no audio stream in file")
        stream = container.streams.audio[0]
        if strict:
            stream.codec_context.options = {"err_detect": "crccheck+bitstream+buffer+explode"}
        declared = container.duration / 1_000_000 if container.duration else None
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        pending: list[np.ndarray] = []
        held = 0
        limit = None if max_seconds is None else int(max_seconds * SAMPLE_RATE)

        def chunk() -> np.ndarray:
            nonlocal held
            out = np.concatenate(pending).astype(np.float32, copy=False)
            pending.clear()
            held = 0
            if not np.isfinite(out).all():
                raise MediaError("tệp có mẫu không hợp lệ / file decodes to invalid samples")
            return np.clip(out, -1.0, 1.0, out=out)

        try:
            for frame in _frames(container, stream, resampler):
                a = frame.to_ndarray().reshape(-1)
                pending.append(a)
                held += a.shape[0]
                total += a.shape[0]
                if limit is not None and total > limit:
                    raise MediaError(
                        f"tệp quá dài / too long: more than {max_seconds:.0f} s of audio")
                if held >= CHUNK_SAMPLES:
                    yield chunk()
        except av.error.FFmpegError as e:
            raise MediaError(f"tệp âm thanh bị hỏng / corrupt audio: {_why(e)}") from None
        except (ValueError, RuntimeError) as e:
            if isinstance(e, MediaError):
                raise
            raise MediaError(f"tệp âm thanh bị hỏng / corrupt audio: {_why(e)}") from None
    finally:
        container.close()
    if total == 0:
        raise MediaError("tệp không có mẫu âm thanh nào / file holds no audio samples")
    seconds = total / SAMPLE_RATE
    if seconds < MIN_SECONDS:
        raise MediaError(f"tệp quá ngắn / too short: {seconds * 1000:.0f} ms of audio")
    if strict and declared and seconds < declared * 0.9 - 0.2:
        # The header (Xing/LAME frame count, WAV data size ...) promised more than the file holds.
        raise MediaError(
            f"tệp bị cắt cụt / truncated: header says {declared:.1f} s, file holds {seconds:.1f} s"
        )
    if pending:
        yield chunk()


def _frames(container: av.container.InputContainer, stream: av.AudioStream,
            resampler: av.AudioResampler) -> Iterator[av.AudioFrame]:
    """The stream's frames resampled, the resampler's tail included."""
    for frame in container.decode(stream):
        yield from resampler.resample(frame)
    yield from resampler.resample(None)
