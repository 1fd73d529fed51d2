"""The device side of OTA firmware (docs/device-protocol.md, "Firmware updates").

A device keeps its firmware state in a directory (`--state-dir`): `firmware.json`, the version
marker (`version` it runs, `previous`, `trial` while a new version has not yet started once,
`boots` tried), and the images under `images/`. A `firmware` command is acked at once (accepted),
then the image is downloaded (`Range` resumes a cut download, also across restarts: the part file
stays), its size, sha256 and the ed25519 signature over `firmware_manifest` are checked against
the key the device trusts (`--firmware-key`, never the node's word), and only then is the marker
switched (apply) and the device restarted. The next start of a version on trial runs the start
check (`--boot-check CMD`, the device's own self-test; exit 0 = started); if it fails, or a start
died before deciding (`boots` already counted), the marker goes back to the previous version.
The outcome goes to the node in one `firmware` report after the next welcome: installed,
refused (download or verification; the old version kept) or rolled_back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shlex
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from loa.relay.devices.protocol import (
    firmware_manifest,
    firmware_report,
    signature_ok,
    split_firmware,
)
from loa.streamer.messages import say

log = logging.getLogger("loa.agent.ota")

MARKER = "firmware.json"
DOWNLOAD_TRIES = 6  # attempts of one download (each resumes where the last stopped)
CHUNK = 64 * 1024
BOOT_CHECK_S = 60.0


class Refused(Exception):
    """The image is not installed (download or verification failed): the old version stays."""


class FirmwareSlot:
    """The version marker and images of one device."""

    def __init__(self, state_dir: Path, firmware: str, key: Ed25519PublicKey | None,
                 boot_check: str | None = None) -> None:
        self.dir = state_dir
        self.model, builtin = split_firmware(firmware)
        self.key = key
        self.boot_check = boot_check
        self.marker: dict[str, Any] = {"version": builtin, "previous": None, "trial": False,
                                       "boots": 0, "command": None}
        self.requests: list[dict[str, Any]] = []  # every download request: start, status, bytes

    @property
    def firmware(self) -> str:
        return f"{self.model}/{self.marker['version']}"

    # ---- the marker ------------------------------------------------------------------------
    def load(self) -> None:
        (self.dir / "images").mkdir(parents=True, exist_ok=True)
        try:
            saved = json.loads((self.dir / MARKER).read_text())
        except FileNotFoundError:
            return
        if isinstance(saved, dict) and isinstance(saved.get("version"), str):
            self.marker.update(saved)

    def _save(self) -> None:
        tmp = self.dir / (MARKER + ".tmp")
        tmp.write_text(json.dumps(self.marker))
        os.replace(tmp, self.dir / MARKER)  # atomic: a power cut leaves the old or the new

    # ---- download and verification -----------------------------------------------------------
    async def download(self, session: aiohttp.ClientSession, url: str,
                       headers: dict[str, str], args: dict[str, Any]) -> Path:
        """The image in `<sha256>.part`, resumed with Range from what is there already."""
        part = self.dir / "images" / f"{args['sha256']}.part"
        size = int(args["size"])
        error = ""
        for attempt in range(DOWNLOAD_TRIES):
            have = await asyncio.to_thread(_size, part)
            if have >= size:
                return part
            ask = dict(headers)
            if have:
                ask["Range"] = f"bytes={have}-"
            entry: dict[str, Any] = {"start": have, "status": None, "bytes": 0}
            self.requests.append(entry)
            try:
                async with session.get(url, headers=ask,
                                       timeout=aiohttp.ClientTimeout(sock_read=30)) as r:
                    entry["status"] = r.status
                    if r.status == 200:
                        have = 0  # the server sent the whole image: start again
                    elif r.status != 206 or not r.headers.get("Content-Range", "").startswith(
                            f"bytes {have}-"):
                        raise Refused(say("agent.ota_download", error=f"HTTP {r.status}"))
                    f = await asyncio.to_thread(open, part, "r+b" if have else "wb")
                    try:
                        await asyncio.to_thread(f.seek, have)
                        async for chunk in r.content.iter_chunked(CHUNK):
                            await asyncio.to_thread(f.write, chunk)
                            entry["bytes"] += len(chunk)
                            if have + entry["bytes"] > size:
                                break
                    finally:
                        await asyncio.to_thread(f.close)
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                error = type(e).__name__
                log.info("firmware download cut event=agent_ota_download_cut at=%d error=%s",
                         have + entry["bytes"], error)
                await asyncio.sleep(min(0.5 * 2**attempt, 10.0))
                continue
            if have + entry["bytes"] >= size:
                return part
        raise Refused(say("agent.ota_download", error=error or "incomplete"))

    def verify(self, path: Path, args: dict[str, Any]) -> None:
        """Size, digest and signature of the downloaded image (in a thread); Refused otherwise."""
        if self.key is None:
            raise Refused(say("agent.ota_unable"))
        got = _size(path)
        if got != args["size"]:
            raise Refused(say("agent.ota_size", got=got, want=args["size"]))
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != args["sha256"]:
            raise Refused(say("agent.ota_digest"))
        manifest = firmware_manifest(args["model"], args["version"], got, args["sha256"])
        if not signature_ok([self.key], manifest, args["signature"]):
            raise Refused(say("agent.ota_signature"))

    def discard(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    # ---- apply, start, roll back -----------------------------------------------------------
    def apply(self, path: Path, args: dict[str, Any], cid: str) -> None:
        """Keep the verified image and switch the marker to it, on trial until it starts."""
        os.replace(path, self.dir / "images" / f"{args['version']}.bin")
        self.marker = {"version": args["version"], "previous": self.marker["version"],
                       "trial": True, "boots": 0, "command": cid}
        self._save()
        log.info("firmware applied event=agent_ota_apply version=%s previous=%s",
                 args["version"], self.marker["previous"])

    async def boot(self) -> dict[str, Any] | None:
        """A start: a version on trial is started (checked) and kept, or rolled back. The report
        for the node, or None when nothing was on trial."""
        m = self.marker
        if not m.get("trial"):
            return None
        cid, version = str(m.get("command") or ""), str(m["version"])
        if m.get("boots", 0) >= 1:
            return await asyncio.to_thread(self._roll_back, cid, version,
                                           "a start did not finish")
        m["boots"] = m.get("boots", 0) + 1
        await asyncio.to_thread(self._save)
        ok, error = await self._check(version)
        if not ok:
            return await asyncio.to_thread(self._roll_back, cid, version, error)
        m["trial"] = False
        await asyncio.to_thread(self._save)
        log.info("firmware started event=agent_ota_installed version=%s", version)
        return firmware_report(cid, version, "installed")

    async def _check(self, version: str) -> tuple[bool, str]:
        if not self.boot_check:
            return True, ""
        env = {**os.environ, "LOA_FIRMWARE_VERSION": version,
               "LOA_FIRMWARE_IMAGE": str(self.dir / "images" / f"{version}.bin")}
        try:
            proc = await asyncio.create_subprocess_exec(
                *shlex.split(self.boot_check), env=env, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE)
            async with asyncio.timeout(BOOT_CHECK_S):
                _, err = await proc.communicate()
        except (OSError, TimeoutError) as e:
            return False, type(e).__name__
        if proc.returncode != 0:
            return False, f"exit {proc.returncode}: {err.decode(errors='replace')[:200]}"
        return True, ""

    def _roll_back(self, cid: str, version: str, error: str) -> dict[str, Any]:
        previous = self.marker.get("previous") or self.marker["version"]
        self.marker = {"version": previous, "previous": None, "trial": False, "boots": 0,
                       "command": None}
        self._save()
        log.warning("firmware rolled back event=agent_ota_rollback version=%s back_to=%s "
                    "error=%s", version, previous, error)
        return firmware_report(cid, version, "rolled_back", say("agent.ota_no_start",
                                                                 error=error))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
