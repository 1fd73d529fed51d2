"""A Mosquitto broker Loa starts itself: for tests, `loa bench devices --control mqtt`, and as the
reference of the broker configuration the MQTT binding needs (README "MQTT devices").

The broker runs the dynamic-security plugin (device accounts and ACLs, managed by the node over
`$CONTROL/dynamic-security/v1`, relay/devices/mqtt.py), keeps its state on disk (`persistence`:
QoS 1 messages queued for a persistent session survive a restart) and lifts the per-client queue
limits that would drop a fleet's acks while the node reads them (`max_queued_messages 0`).
"""

from __future__ import annotations

import asyncio
import base64
import getpass
import hashlib
import json
import os
import shutil
import signal
import socket
from pathlib import Path

from loa.relay.devices.mqtt import device_role, role_acls

DYNSEC_PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_CTRL = shutil.which("mosquitto_ctrl") or "/usr/bin/mosquitto_ctrl"
DYNSEC_ITERATIONS = 101  # PBKDF2-SHA512 rounds, as mosquitto_ctrl writes them


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def broker_conf(directory: Path, port: int) -> str:
    return "\n".join([
        "per_listener_settings false",
        # As root mosquitto would drop to the `mosquitto` user, which cannot read a private
        # directory (pytest's tmp_path): stay who we are.
        f"user {getpass.getuser()}",
        f"listener {port} 127.0.0.1",
        "allow_anonymous false",
        f"plugin {DYNSEC_PLUGIN}",
        f"plugin_opt_config_file {directory / 'dynamic-security.json'}",
        "persistence true",
        f"persistence_location {directory}/",
        "autosave_interval 1",  # queued messages on disk within a second
        "max_queued_messages 0",  # no cap per client: the node's session holds a fleet's acks
        # No in-flight window either: Mosquitto 2.0.11 (Debian 12) can lose count of a client's
        # in-flight quota under load and then holds that client's messages for good (fixed in
        # 2.0.13); seen as a 10,000-device fan-out whose acks stopped reaching the node.
        "max_inflight_messages 0",
        "max_keepalive 600",
        "log_type error",
        "log_type warning",
        f"log_dest file {directory / 'mosquitto.log'}",
        "",
    ])


class ManagedBroker:
    """One mosquitto process on 127.0.0.1:`port` with its files in `directory`."""

    def __init__(self, directory: Path, admin: str, password: str, port: int = 0) -> None:
        self.directory = directory
        self.admin = admin
        self.password = password
        self.port = port or free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def dynsec(self) -> Path:
        return self.directory / "dynamic-security.json"

    async def init(self) -> None:
        """The plugin's file with its admin account (hashed by mosquitto's own tool), once."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.dynsec.exists():
            return
        init = await asyncio.create_subprocess_exec(
            MOSQUITTO_CTRL, "dynsec", "init", str(self.dynsec), self.admin, self.password,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await init.communicate()
        if init.returncode != 0:
            raise RuntimeError(f"mosquitto_ctrl dynsec init: {err.decode()[:300]}")

    async def seed(self, accounts: list[tuple[str, str]], prefix: str = "vs") -> None:
        """Write device accounts (id, key) into the plugin's file before the broker starts,
        exactly as the node creates them (relay/devices/mqtt.py) but without one file rewrite
        per command: a bench's 10,000 devices in seconds instead of an hour."""
        await self.init()
        data = json.loads(await asyncio.to_thread(self.dynsec.read_text, encoding="utf-8"))

        def build() -> None:
            for device, key in accounts:
                salt = os.urandom(12)
                digest = hashlib.pbkdf2_hmac("sha512", key.encode(), salt, DYNSEC_ITERATIONS)
                data["roles"].append({"rolename": device_role(device),
                                      "acls": role_acls(prefix, device)})
                data["clients"].append({
                    "username": device, "clientid": device,
                    "password": base64.b64encode(digest).decode(),
                    "salt": base64.b64encode(salt).decode(), "iterations": DYNSEC_ITERATIONS,
                    "roles": [{"rolename": device_role(device)}]})
            self.dynsec.write_text(json.dumps(data), encoding="utf-8")

        await asyncio.to_thread(build)

    async def start(self) -> None:
        await self.init()
        conf = self.directory / "mosquitto.conf"
        conf.write_text(broker_conf(self.directory, self.port), encoding="utf-8")
        self.proc = await asyncio.create_subprocess_exec(
            MOSQUITTO, "-c", str(conf), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while True:
            if self.proc.returncode is not None:
                log = self.directory / "mosquitto.log"
                text = log.read_text(errors="replace")[-500:] if log.exists() else ""
                raise RuntimeError(f"mosquitto exited ({self.proc.returncode}): {text}")
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                return
            except OSError:
                if loop.time() > deadline:
                    raise RuntimeError(f"mosquitto not listening on {self.port}") from None
                await asyncio.sleep(0.05)

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: mosquitto saves its state and exits; SIGKILL: a crash."""
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(sig)
        try:
            async with asyncio.timeout(10.0):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()

    def cpu_seconds(self) -> float:
        """User + system CPU time of the broker process so far (from /proc)."""
        if self.proc is None:
            return 0.0
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
