"""OTA firmware on the node: signed images per model, and staged rollouts that halt by themselves.

Images. An admin uploads an image with its model, version and an ed25519 signature over
`firmware_manifest(model, version, size, sha256)` (relay/devices/protocol.py). The keys trusted per
model are configuration (`[firmware] keys = ["MODEL=BASE64"]`), not API data: whoever steals an
admin's token can upload, but cannot make the node (or a device, which holds its own key) accept
an image the vendor did not sign. The node checks the signature at upload (422 `signature`) and
keeps the image content-addressed under `<data>/firmware/`; devices check it again before they
apply, since the node is not what they trust.

Rollouts. A rollout sends one image to the devices of its model in an area's subtree (optionally
one group), in stages: `canary` devices first, then cumulative shares (`stages`, percent, the last
100). A device counts as updated when it comes back reporting `MODEL/VERSION`; it fails when it
refuses the command or the image, reports a rollback, or is not back within `come_back_s`. A
stage starts when every device of the previous ones is settled; more than `max_failures` failed
devices halt the rollout and raise the `ota_halted` alert (streamer/alerts.py) for a person, who
may resume it (the failures seen so far are then accepted) or halt it for good. One periodic task
(every second) drives every rollout; rollout state is a store record, so a restart continues it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from loa.relay.devices.manager import Device, DeviceManager
from loa.relay.devices.protocol import (
    FIRMWARE_COMMAND,
    FIRMWARE_REPORT,
    firmware_manifest,
    parse_firmware_report,
    public_key,
    signature_ok,
    split_firmware,
)
from loa.relay.devices.records import new_id
from loa.streamer.alerts import Alert, Alerts
from loa.streamer.areas import AreaTree
from loa.streamer.errors import LoaError
from loa.streamer.messages import say
from loa.streamer.state.store import Record, Store

log = logging.getLogger("loa.ota")

IMAGE_PATH = "/api/v1/firmware/download"  # where devices download (`?image=ID`)
STEP_S = 1.0  # how often rollouts are driven
PENDING, SENT, ACCEPTED, INSTALLED, FAILED = "pending", "sent", "accepted", "installed", "failed"
SETTLED = (INSTALLED, FAILED)


@dataclass
class FirmwareSettings:
    """Config section [firmware] (env LOA_FIRMWARE_<KEY>)."""

    keys: list[str] = field(default_factory=list)  # "MODEL=BASE64 ed25519 public key"
    max_mb: int = 32  # largest image accepted
    come_back_s: float = 900.0  # default: an updated device must be back on the new version

    def trusted(self) -> dict[str, list[Ed25519PublicKey]]:
        """The keys trusted per model (ValueError naming the bad entry)."""
        out: dict[str, list[Ed25519PublicKey]] = {}
        for entry in self.keys:
            model, sep, b64 = entry.partition("=")
            if not sep or not model.strip():
                raise ValueError(f"[firmware] keys: {entry[:40]!r} is not MODEL=BASE64")
            try:
                out.setdefault(model.strip(), []).append(public_key(b64))
            except ValueError as e:
                raise ValueError(f"[firmware] keys: {model.strip()}: {e}") from None
        return out


class OtaError(LoaError):
    pass


def image_args(fw: Record) -> dict[str, Any]:
    """The args of the `firmware` command that installs image `fw` (protocol `firmware_args`)."""
    return {"model": fw["model"], "version": fw["version"], "size": fw["size"],
            "sha256": fw["sha256"], "signature": fw["signature"],
            "url": f"{IMAGE_PATH}?image={fw['id']}"}


def stage_sizes(total: int, canary: int, stages: list[int]) -> list[int]:
    """Cumulative device counts per stage: the canary, then each share (rounded up)."""
    sizes = [min(canary, total)]
    for pct in stages:
        sizes.append(max(sizes[-1], min(total, math.ceil(total * pct / 100))))
    return sizes


class Ota:
    """Firmware images and rollouts of this node."""

    def __init__(self, store: Store, devices: DeviceManager, alerts: Alerts, tree: AreaTree,
                 settings: FirmwareSettings, data_dir: Path) -> None:
        self.store = store
        self.devices = devices
        self.alerts = alerts
        self.tree = tree
        self.settings = settings
        self.keys = settings.trusted()
        self.dir = data_dir / "firmware"
        self.rollouts: dict[str, Record] = {}  # running or halted, by id
        self._commands: dict[str, tuple[str, str]] = {}  # command id -> (rollout, device)
        self._dirty: set[str] = set()  # rollouts changed since they were last stored
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one change of rollout state at a time

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self.dir.mkdir, parents=True, exist_ok=True)
        for state in ("running", "halted"):
            for r in await self.store.find("rollout", state=state):
                self.rollouts[r["id"]] = r
                for dev_id, d in r["devices"].items():
                    if d.get("command"):
                        self._commands[d["command"]] = (r["id"], dev_id)
                if state == "halted":
                    self._raise(r)
        self.devices.handlers[FIRMWARE_REPORT] = self._report
        self.devices.ack_listeners.append(self._on_ack)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # ---- images --------------------------------------------------------------------------------
    def temp_path(self) -> Path:
        """A new empty file beside the images (an upload lands there, then is renamed)."""
        fd, name = tempfile.mkstemp(dir=self.dir, prefix="upload-", suffix=".part")
        os.close(fd)
        return Path(name)

    def path_of(self, fw: Record) -> Path:
        return self.dir / f"{fw['sha256']}.bin"

    async def add_image(self, temp: Path, *, model: str, version: str, signature: str,
                        area: str, uploader: str) -> Record:
        """Check an uploaded image (in `temp`, removed here) and keep it; OtaError naming the
        field: `model` without a trusted key, `signature` that does not verify, 409 a version
        already uploaded."""
        try:
            keys = self.keys.get(model)
            if not keys:
                raise OtaError(say("ota.untrusted_model", model=model), field="model")
            size, sha = await asyncio.to_thread(_digest, temp)
            if size == 0:
                raise OtaError(say("ota.empty_image"), field="file")
            if not signature_ok(keys, firmware_manifest(model, version, size, sha), signature):
                raise OtaError(say("ota.bad_signature"), field="signature")
            for other in await self.store.find("firmware", model=model):
                if other["version"] == version:
                    raise OtaError(say("ota.version_exists", model=model, version=version),
                                   kind="conflict", field="version")
            rec: Record = {"id": new_id(), "model": model, "version": version, "size": size,
                           "sha256": sha, "signature": signature, "area": area,
                           "uploader": uploader, "created": time.time()}
            await asyncio.to_thread(temp.replace, self.path_of(rec))
            await self.store.create("firmware", rec)
            log.info("firmware image added event=ota_image model=%s version=%s size=%d",
                     model, version, size)
            return rec
        finally:
            await asyncio.to_thread(temp.unlink, missing_ok=True)

    # ---- rollouts ------------------------------------------------------------------------------
    def targets(self, fw: Record, area: str, group: str | None) -> list[Device]:
        """Devices of the image's model in the subtree (and group), not revoked, in a stable
        order (by id: the order they were registered in)."""
        found = [d for d in self.devices.find(set(self.tree.subtree(area)), group=group)
                 if not d.record.get("revoked")
                 and split_firmware(d.record.get("firmware"))[0] == fw["model"]]
        return sorted(found, key=lambda d: d.id)

    async def create(self, fw: Record, *, area: str, group: str | None, canary: int,
                     stages: list[int], max_failures: int, come_back_s: float,
                     issuer: str) -> Record:
        devices = self.targets(fw, area, group)
        if not devices:
            raise OtaError(say("ota.no_devices", model=fw["model"]), field="area")
        target = f"{fw['model']}/{fw['version']}"
        r: Record = {
            "id": new_id(), "firmware": fw["id"], "model": fw["model"], "version": fw["version"],
            "area": area, "group": group, "canary": canary, "stages": stages,
            "max_failures": max_failures, "accepted_failures": 0, "come_back_s": come_back_s,
            "issuer": issuer, "created": time.time(), "state": "running", "stage": -1,
            "sizes": stage_sizes(len(devices), canary, stages), "reason": None,
            "devices": {d.id: {"state": INSTALLED if d.record.get("firmware") == target
                               else PENDING, "error": None, "command": None, "at": None}
                        for d in devices},
            "order": [d.id for d in devices]}
        async with self._lock:
            await self.store.create("rollout", r)
            self.rollouts[r["id"]] = r
            await self._drive(r)
        log.info("rollout started event=ota_rollout id=%s model=%s version=%s devices=%d "
                 "issuer=%s", r["id"], r["model"], r["version"], len(devices), issuer)
        return r

    async def halt(self, r: Record, reason: str) -> None:
        async with self._lock:
            if r["state"] == "running":
                await self._halt(r, reason)

    async def resume(self, r: Record) -> None:
        """Continue a halted rollout: the failures seen so far are accepted."""
        async with self._lock:
            if r["state"] != "halted":
                raise OtaError(say("ota.not_halted"), kind="conflict", field="state")
            r["state"] = "running"
            r["reason"] = None
            r["accepted_failures"] = self._failures(r)
            self._dirty.add(r["id"])
            self.alerts.clear("ota_halted", r["id"])
            await self._drive(r)

    def summary(self, r: Record) -> Record:
        counts = dict.fromkeys((PENDING, SENT, ACCEPTED, INSTALLED, FAILED), 0)
        for d in r["devices"].values():
            counts[d["state"]] += 1
        return {**r, "counts": counts}

    # ---- what devices say ----------------------------------------------------------------------
    def _on_ack(self, rec: Record, _t: float) -> None:
        """The ack of a `firmware` command: accepted (downloads now) or refused at once."""
        found = self._commands.get(rec["id"])
        if rec.get("command") != FIRMWARE_COMMAND or found is None:
            return
        r = self.rollouts.get(found[0])
        d = r["devices"].get(found[1]) if r else None
        if r is None or d is None or d["state"] in SETTLED:
            return
        if rec["status"] == "acked":
            d["state"] = ACCEPTED
        else:
            self._fail(d, rec.get("error") or say("outbox.refused"))
        self._dirty.add(r["id"])
        self._wake(r)

    async def _report(self, dev: Device, msg: dict[str, Any]) -> None:
        """A device's `firmware` report: installed, refused (verification) or rolled back."""
        cid, version, state, error = parse_firmware_report(msg)  # ProtocolError: the manager's
        found = self._commands.get(cid)
        r = self.rollouts.get(found[0]) if found else None
        if r is None or found is None or found[1] != dev.id:
            return
        d = r["devices"][dev.id]
        log.info("firmware report event=ota_report rollout=%s device=%s version=%s state=%s "
                 "error=%s", r["id"], dev.id, version, state, (error or "")[:200])
        if d["state"] in SETTLED:
            return
        if state == "installed" and version == r["version"]:
            d["state"], d["at"] = INSTALLED, time.time()
        elif state != "installed":
            self._fail(d, f"{state}: {error or ''}".strip(": "))
        self._dirty.add(r["id"])
        self._wake(r)

    def _fail(self, d: Record, error: str) -> None:
        d["state"], d["error"], d["at"] = FAILED, error[:500], time.time()

    def _wake(self, r: Record) -> None:
        """Drive the rollout soon (acks and reports arrive in the manager's own call stacks)."""
        loop = asyncio.get_running_loop()

        async def go() -> None:
            async with self._lock:
                if r["state"] == "running":
                    await self._drive(r)
                elif r["id"] in self._dirty:
                    self._dirty.discard(r["id"])
                    await self.store.put("rollout", r)

        task = loop.create_task(go())
        task.add_done_callback(_log_failure)

    # ---- driving -------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            deadline += STEP_S
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            try:
                async with self._lock:
                    for r in list(self.rollouts.values()):
                        if r["state"] == "running":
                            await self._drive(r)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("rollout step failed event=ota_step_error")

    def _failures(self, r: Record) -> int:
        return sum(1 for d in r["devices"].values() if d["state"] == FAILED)

    async def _drive(self, r: Record) -> None:
        """Settle what devices did, halt past the threshold, start the next stage, or finish."""
        now = time.time()
        target = f"{r['model']}/{r['version']}"
        for dev_id, d in r["devices"].items():
            if d["state"] not in (SENT, ACCEPTED):
                continue
            dev = self.devices.get(dev_id)
            if dev is not None and dev.record.get("firmware") == target:
                d["state"], d["at"] = INSTALLED, now
                self._dirty.add(r["id"])
            elif now - float(d["sent"]) > r["come_back_s"]:
                self._fail(d, say("ota.not_back", seconds=r["come_back_s"]))
                self._dirty.add(r["id"])
        failures = self._failures(r) - r["accepted_failures"]
        if failures > r["max_failures"]:
            await self._halt(r, say("ota.too_many_failures", failures=failures,
                                    limit=r["max_failures"]))
            return
        order: list[str] = r["order"]
        sizes: list[int] = r["sizes"]
        stage = r["stage"]
        done_upto = sizes[stage] if stage >= 0 else 0
        if all(r["devices"][i]["state"] in SETTLED for i in order[:done_upto]):
            self._dirty.add(r["id"])
            if stage + 1 >= len(sizes):
                r["state"] = "done"
                self.rollouts.pop(r["id"], None)
                for cid in [c for c, (rid, _) in self._commands.items() if rid == r["id"]]:
                    del self._commands[cid]
                log.info("rollout done event=ota_done id=%s failures=%d", r["id"],
                         self._failures(r))
            else:
                r["stage"] = stage + 1
                await self._send(r, order[done_upto:sizes[stage + 1]])
        if r["id"] in self._dirty:  # a large fleet's record is not rewritten every second
            self._dirty.discard(r["id"])
            await self.store.put("rollout", r)

    async def _send(self, r: Record, ids: list[str]) -> None:
        fw = await self.store.get("firmware", r["firmware"])
        todo = [self.devices.get(i) for i in ids if r["devices"][i]["state"] == PENDING]
        devices = [d for d in todo if d is not None]
        if fw is None or not devices:
            return
        issued = await self.devices.issue(devices, FIRMWARE_COMMAND, image_args(fw),
                                          ttl=r["come_back_s"], issuer=r["issuer"],
                                          area=r["area"])
        now = time.time()
        for dev, cid in zip(devices, issued.ids, strict=True):
            d = r["devices"][dev.id]
            d.update(state=SENT, command=cid, sent=now)
            self._commands[cid] = (r["id"], dev.id)
        log.info("rollout stage event=ota_stage id=%s stage=%d devices=%d", r["id"],
                 r["stage"], len(devices))

    async def _halt(self, r: Record, reason: str) -> None:
        r["state"] = "halted"
        r["reason"] = reason
        self._dirty.discard(r["id"])
        await self.store.put("rollout", r)
        log.warning("rollout halted event=ota_halted id=%s reason=%s", r["id"], reason)
        self._raise(r)

    def _raise(self, r: Record) -> None:
        self.alerts.raise_(Alert(
            kind="ota_halted", subject=r["id"], area=r["area"], severity="critical",
            text=say("ota.halted", model=r["model"], version=r["version"],
                     reason=r["reason"] or ""),
            detail={"rollout": r["id"], "failed": [i for i, d in r["devices"].items()
                                                   if d["state"] == FAILED]}))


def _digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            size += len(chunk)
            h.update(chunk)
    return size, h.hexdigest()


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("rollout update failed event=ota_step_error error=%r", task.exception())
