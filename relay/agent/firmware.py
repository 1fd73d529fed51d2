"""The firmware string the device agent reports (hello, heartbeats, User-Agent)."""

from __future__ import annotations

from importlib import metadata


def version() -> str:
    try:
        return metadata.version("loa")
    except metadata.PackageNotFoundError:
        return "0"


FIRMWARE = f"loa-agent/{version()}"
