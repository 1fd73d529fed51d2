"""The media library: uploads become normalised, content-addressed audio under the data directory.

At upload a file is decoded (proving it is audio), measured (EBU R128) and stored twice under
`media/<sha[:2]>/`: the original bytes (`<sha>.orig`) and the audio the engine airs, 48 kHz mono
16-bit PCM already at the target loudness (`<sha>.s16`). Airing then costs a memory map, not a
decode, so starting a broadcast never waits for FFmpeg.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loa.codecs.decode import MediaError, decode_file
from loa.codecs.loudness import integrated_lufs, normalise_gain
from loa.streamer.clock import SAMPLE_RATE
from loa.streamer.sources import PcmSource
from loa.streamer.store import Conflict, Record, Store


@dataclass
class LibrarySettings:
    max_bytes: int = 200 * 1024 * 1024
    max_seconds: float = 4 * 3600.0
    loudness_target: float = -16.0  # LUFS; speech on outdoor horns wants it loud and even


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class MediaLibrary:
    def __init__(self, root: Path, store: Store, settings: LibrarySettings | None = None) -> None:
        self.root = Path(root)
        self.store = store
        self.settings = settings or LibrarySettings()
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._maps: dict[str, np.ndarray] = {}  # sha256 -> memory map, opened once

    def temp_path(self, suffix: str = "") -> Path:
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="upload-", suffix=suffix)
        os.close(fd)
        return Path(name)

    def pcm_path(self, sha: str) -> Path:
        return self.root / sha[:2] / f"{sha}.s16"

    async def ingest(self, upload: Path, *, title: str, area: str, owner: str,
                     filename: str = "", extra: dict[str, Any] | None = None) -> Record:
        """Turn an uploaded temp file into a media record. The temp file is always removed.

        Raises MediaError for anything that is not usable audio; then nothing is stored.
        """
        try:
            sha, info = await asyncio.to_thread(self._process, upload)
        finally:
            await asyncio.to_thread(upload.unlink, missing_ok=True)
        existing = await self.store.find("media", sha256=sha)
        if existing:
            return existing[0]
        record: Record = {
            "id": sha[:16],
            "sha256": sha,
            "title": title or filename or sha[:16],
            "filename": filename,
            "area": area,
            "owner": owner,
            "created": time.time(),
            **info,
            **(extra or {}),
        }
        try:
            return await self.store.create("media", record)
        except Conflict:  # the same file uploaded twice at once
            return (await self.store.find("media", sha256=sha))[0]

    def _process(self, upload: Path) -> tuple[str, dict[str, Any]]:
        if upload.stat().st_size > self.settings.max_bytes:
            raise MediaError(
                f"tệp quá lớn / file too large: limit {self.settings.max_bytes // 2**20} MiB")
        pcm = decode_file(upload, max_seconds=self.settings.max_seconds)
        lufs = integrated_lufs(pcm)
        gain = normalise_gain(lufs, self.settings.loudness_target)
        peak = float(np.max(np.abs(pcm)))
        if peak * gain > 0.999:  # never clip to reach the target: a little quieter instead
            gain = 0.999 / peak
        pcm16 = np.round(np.clip(pcm * gain, -1.0, 1.0) * 32767).astype("<i2")
        sha = _sha256(upload)
        folder = self.root / sha[:2]
        folder.mkdir(parents=True, exist_ok=True)
        final = self.pcm_path(sha)
        if not final.exists():
            part = final.with_suffix(".part")
            pcm16.tofile(part)
            os.replace(part, final)
            shutil.copyfile(upload, folder / f"{sha}.orig")
        return sha, {
            "duration": pcm.shape[0] / SAMPLE_RATE,
            "lufs": None if lufs == float("-inf") else round(lufs, 2),
            "gain_db": round(20 * np.log10(gain), 2) if gain > 0 else None,
            "bytes": upload.stat().st_size,
        }

    def source(self, record: Record, gain: float = 1.0) -> PcmSource:
        """The aired audio of a media record: a memory map, instant to open."""
        sha = record["sha256"]
        pcm = self._maps.get(sha)
        if pcm is None:
            try:
                pcm = np.memmap(self.pcm_path(sha), dtype="<i2", mode="r")
            except (OSError, ValueError):
                raise MediaError(
                    f"thiếu tệp âm thanh / media file missing: {record['id']}") from None
            self._maps[sha] = pcm
        return PcmSource(pcm, record.get("title") or record["id"], gain)

    async def remove(self, record: Record) -> None:
        await self.store.delete("media", record["id"])
        sha = record["sha256"]
        self._maps.pop(sha, None)
        for suffix in (".s16", ".orig"):
            await asyncio.to_thread((self.root / sha[:2] / f"{sha}{suffix}").unlink,
                                    missing_ok=True)
