"""Device records: ids, keys and provisioning tokens (only their hashes are stored), a new
device's record, and its public view (without the secrets)."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import secrets
import time
from typing import Any

from loa.streamer.state.store import Record

_counter = itertools.count()


def new_id() -> str:
    """Sortable by creation time (ms), unique within the process and very likely across."""
    return f"{int(time.time() * 1000):011x}{next(_counter) & 0xFFFF:04x}{secrets.token_hex(2)}"


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key() -> str:
    """A device key: 32 random bytes, URL-safe. Only its sha256 is stored."""
    return secrets.token_urlsafe(32)


def new_provisioning_token() -> str:
    return secrets.token_urlsafe(24)


def same_hash(stored: Any, secret: str) -> bool:
    return isinstance(stored, str) and hmac.compare_digest(stored, secret_hash(secret))


def has_display(record: Record) -> bool:
    return record.get("kind") == "board" or bool((record.get("capabilities") or {})
                                                  .get("display"))


# ---- records -------------------------------------------------------------------------------------
_SECRET_FIELDS = ("key_hash", "provision")


def new_device_record(name: str, kind: str, area: str, capabilities: dict[str, Any],
                      groups: list[str], *, volume: int, now: float | None = None) -> Record:
    now = time.time() if now is None else now
    return {"id": new_id(), "name": name, "kind": kind, "area": area,
            "capabilities": capabilities, "groups": groups, "volume": volume,
            "power_schedule": [], "status": "offline", "created": now, "updated": now,
            "firmware": None, "last_seen": None, "telemetry": None, "faults": [],
            "revoked": False, "key_hash": None}


def public_device(rec: Record) -> Record:
    out = {k: v for k, v in rec.items() if k not in _SECRET_FIELDS}
    out["provisioned"] = bool(rec.get("key_hash"))
    prov = rec.get("provision")
    out["provisioning_expires"] = prov.get("expires") if isinstance(prov, dict) else None
    return out

