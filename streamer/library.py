"""The media library: uploads become normalised, content-addressed audio under the data directory.

At upload a file is decoded (proving it is audio), measured (EBU R128) and stored twice under
`media/<sha[:2]>/`: the original bytes (`<sha>.orig`) and the audio the engine airs, 48 kHz mono
16-bit PCM already at the target loudness (`<sha>.s16`). Airing then costs a memory map, not a
decode, so starting a broadcast never waits for FFmpeg. Decoding streams to disk in bounded
memory, at most `decoders` at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loa.codecs.decode import MediaError, decode_chunks
from loa.codecs.loudness import LoudnessMeter, normalise_gain
from loa.streamer.clock import SAMPLE_RATE
from loa.streamer.messages import say
from loa.streamer.sources import PcmSource
from loa.streamer.state.store import Record, Store


@dataclass
class LibrarySettings:
    max_bytes: int = 200 * 1024 * 1024
    max_seconds: float = 4 * 3600.0
    loudness_target: float = -16.0  # LUFS; speech on outdoor horns wants it loud and even
    decoders: int = 2  # uploads decoded at once (a CPU each); more wait their turn


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


GAIN_STEP = 1 << 20  # samples a step of the gain pass: 2 MB of 16-bit PCM


def _apply_gain(path: Path, gain: float) -> None:
    """Scale 16-bit PCM in place, a step at a time (a memory map would count the whole file in
    the process's resident memory)."""
    with open(path, "r+b") as f:
        while raw := f.read(GAIN_STEP * 2):
            q = np.frombuffer(raw, dtype="<i2").astype(np.float32)
            out = np.clip(np.round(q * np.float32(gain)), -32767, 32767).astype("<i2")
            f.seek(-len(raw), os.SEEK_CUR)
            f.write(out.tobytes())


class MediaLibrary:
    """Records are per upload (their own id, title, owner and area); the audio is shared by
    content: records of the same bytes point at one `<sha>.s16`, removed with the last of them."""

    def __init__(self, root: Path, store: Store, settings: LibrarySettings | None = None) -> None:
        self.root = Path(root)
        self.store = store
        self.settings = settings or LibrarySettings()
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._maps: dict[str, np.ndarray] = {}  # sha256 -> memory map, opened once
        self._decoding = asyncio.Semaphore(max(1, self.settings.decoders))
        # Held while content files are committed with a record, or a record is removed with
        # the files no other record uses: neither sees the other half done.
        self._content = asyncio.Lock()

    def temp_path(self, suffix: str = "") -> Path:
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="upload-", suffix=suffix)
        os.close(fd)
        return Path(name)

    def pcm_path(self, sha: str) -> Path:
        return self.root / sha[:2] / f"{sha}.s16"

    def original_path(self, sha: str) -> Path:
        """The bytes as uploaded (what a child node fetches and checks against `sha`)."""
        return self._orig_path(sha)

    def _orig_path(self, sha: str) -> Path:
        return self.root / sha[:2] / f"{sha}.orig"

    async def ingest(self, upload: Path, *, title: str, area: str, owner: str,
                     filename: str = "", extra: dict[str, Any] | None = None) -> Record:
        """Turn an uploaded temp file into a new media record of `area`. The temp file is
        always removed.

        Raises MediaError for anything that is not usable audio, OSError (ENOSPC ...) when the
        disk fails; then nothing is stored and no partial file is left.
        """
        part: Path | None = None
        try:
            async with self._decoding:
                pcm, sha, info = await asyncio.to_thread(self._process, upload)
                part = pcm
            record: Record = {
                "id": uuid.uuid4().hex[:16],
                "sha256": sha,
                "title": title or filename or sha[:16],
                "filename": filename,
                "area": area,
                "owner": owner,
                "created": time.time(),
                **info,
                **(extra or {}),
            }
            async with self._content:
                await asyncio.to_thread(self._commit, pcm, upload, sha)
                try:
                    return await self.store.create("media", record)
                except BaseException:
                    # Unless the store cannot even say who uses the audio: keep it then.
                    with contextlib.suppress(Exception):
                        await self._drop_unused(sha)
                    raise
        finally:
            await asyncio.to_thread(self._unlink, upload, part)

    @staticmethod
    def _unlink(*paths: Path | None) -> None:
        for p in paths:
            if p is not None:
                p.unlink(missing_ok=True)

    def _process(self, upload: Path) -> tuple[Path, str, dict[str, Any]]:
        """Decode, measure and normalise `upload` into a temp 16-bit PCM file, in bounded memory:
        decoded chunks are written as they come and measured on the way (EBU R128), then a
        second pass over the file applies the gain."""
        if upload.stat().st_size > self.settings.max_bytes:
            raise MediaError(say("media.too_large", limit=self.settings.max_bytes // 2**20))
        part = self.temp_path(".s16.part")
        try:
            meter = LoudnessMeter(SAMPLE_RATE)
            peak = 0.0
            with open(part, "wb") as f:
                for chunk in decode_chunks(upload, max_seconds=self.settings.max_seconds):
                    meter.add(chunk)
                    peak = max(peak, float(np.max(np.abs(chunk))))
                    f.write(np.round(chunk * 32767).astype("<i2").tobytes())
            lufs = meter.lufs()
            gain = normalise_gain(lufs, self.settings.loudness_target)
            if peak * gain > 0.999:  # never clip to reach the target: a little quieter instead
                gain = 0.999 / peak
            if gain != 1.0:
                _apply_gain(part, gain)
            sha = _sha256(upload)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return part, sha, {
            "duration": meter.samples / SAMPLE_RATE,
            "lufs": None if lufs == float("-inf") else round(lufs, 2),
            "gain_db": round(20 * np.log10(gain), 2) if gain > 0 else None,
            "bytes": upload.stat().st_size,
        }

    def _commit(self, part: Path, upload: Path, sha: str) -> None:
        """Make `part` (and the original bytes) the content file of `sha`, unless it exists."""
        final = self.pcm_path(sha)
        if final.exists():
            return  # the same bytes are stored already: this record shares them
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(upload, self._orig_path(sha))  # a rename: the temp dir is on this disk
        os.replace(part, final)

    async def _drop_unused(self, sha: str) -> None:
        """Remove the content files of `sha` if no record points at them (call under the lock)."""
        if await self.store.find("media", sha256=sha):
            return
        self._maps.pop(sha, None)
        await asyncio.to_thread(self._unlink, self.pcm_path(sha), self._orig_path(sha))

    def source(self, record: Record, gain: float = 1.0) -> PcmSource:
        """The aired audio of a media record: a memory map, instant to open."""
        sha = record["sha256"]
        pcm = self._maps.get(sha)
        if pcm is None:
            try:
                pcm = np.memmap(self.pcm_path(sha), dtype="<i2", mode="r")
            except (OSError, ValueError):
                raise MediaError(say("media.file_missing", media=record["id"])) from None
            self._maps[sha] = pcm
        return PcmSource(pcm, record.get("title") or record["id"], gain)

    async def remove(self, record: Record) -> None:
        """Delete the record; its audio goes with the last record that uses it."""
        async with self._content:
            await self.store.delete("media", record["id"])
            await self._drop_unused(record["sha256"])
