"""Text to speech behind one small interface; espeak-ng's Vietnamese voice is the default.

An external TTS service (a provider's HTTP API) implements `TtsEngine.synthesize` the same way.
Results are cached by (engine, voice, area, text) in the media library, so a bulletin read twice in
an area is synthesised once.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import shutil
from pathlib import Path

from loa.streamer.errors import Kind, LoaError
from loa.streamer.library import MediaLibrary
from loa.streamer.messages import say
from loa.streamer.state.store import Record


class TtsError(LoaError, RuntimeError):
    """Speech cannot be made now (no engine, timeout, engine failure): the API answers 503."""

    kind: Kind = "unavailable"


class UnknownVoice(LoaError, ValueError):
    """The caller asked for a voice the engine does not have: their error, not ours."""


class TtsEngine(abc.ABC):
    name = "tts"

    @abc.abstractmethod
    async def synthesize(self, text: str, voice: str, out: Path) -> None:
        """Write speech for `text` to the audio file `out` (any format FFmpeg decodes)."""


class EspeakEngine(TtsEngine):
    name = "espeak-ng"

    def __init__(self, speed: int = 145) -> None:
        self.exe = shutil.which("espeak-ng")
        self.speed = speed

    async def synthesize(self, text: str, voice: str, out: Path) -> None:
        if not self.exe:
            raise TtsError(say("tts.not_installed"))
        if not voice or len(voice) > 40 or not all(c.isalnum() or c in "-_+" for c in voice):
            raise UnknownVoice(say("tts.bad_voice", voice=voice[:40]))
        proc = await asyncio.create_subprocess_exec(
            self.exe, "-v", voice, "-s", str(self.speed), "-w", str(out), "--", text,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        except TimeoutError:
            proc.kill()
            raise TtsError(say("tts.timeout")) from None
        if proc.returncode != 0 or b"does not exist" in err:
            if b"does not exist" in err:
                raise UnknownVoice(say("tts.unknown_voice", voice=voice))
            raise TtsError(f"espeak-ng failed: {err.decode(errors='replace').strip()[:200]}")


MAX_TEXT = 5000


class Speech:
    """Text -> media record, cached."""

    def __init__(self, library: MediaLibrary, engine: TtsEngine | None = None,
                 voice: str = "vi") -> None:
        self.library = library
        self.engine = engine or EspeakEngine()
        self.voice = voice

    async def media_for(self, text: str, *, area: str, owner: str,
                        voice: str | None = None) -> Record:
        text = " ".join(text.split())
        if not text:
            raise ValueError(say("tts.empty"))
        if len(text) > MAX_TEXT:
            raise ValueError(say("tts.too_long", limit=MAX_TEXT))
        voice = voice or self.voice
        # A cached record is reused only by its own area: another area gets its own record
        # (its title, owner, area), sharing the stored audio.
        key = hashlib.sha256(
            f"{self.engine.name}\0{voice}\0{area}\0{text}".encode()).hexdigest()[:32]
        store = self.library.store
        cached = await store.get("tts", key)
        if cached:
            media = await store.get("media", cached["media"])
            if media and media.get("area") == area and await asyncio.to_thread(
                    self.library.pcm_path(media["sha256"]).exists):
                return media
        out = self.library.temp_path(".wav")
        try:
            await self.engine.synthesize(text, voice, out)
            media = await self.library.ingest(out, title=text[:80], area=area, owner=owner,
                                              filename="tts.wav",
                                              extra={"tts": {"voice": voice,
                                                             "engine": self.engine.name}})
        finally:
            out.unlink(missing_ok=True)
        await store.put("tts", {"id": key, "media": media["id"]})
        return media
