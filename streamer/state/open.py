"""Opening the node's state from its configured URLs: the store and the bus backends."""

from __future__ import annotations

from pathlib import Path

from loa.streamer.state.bus import Bus, InProcessBus
from loa.streamer.state.bus_redis import RedisBus
from loa.streamer.state.store import Store
from loa.streamer.state.store_redis import RedisStore
from loa.streamer.state.store_sqlite import SqliteStore


async def open_store(url: str, data_dir: str | Path, prefix: str = "loa:", *,
                     degraded: bool = False) -> Store:
    """`sqlite` (default, under data_dir) or `redis://...`. `degraded`: a SQLite file on a disk
    that refuses writes is opened read-only (see SqliteStore.open) rather than failing."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return await RedisStore.connect(url, prefix=prefix)
    if url in ("", "sqlite"):
        path = Path(data_dir) / "loa.db"
    elif url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
    else:
        raise ValueError(f"unknown store {url!r}: use sqlite or redis://host:port/db")
    return await SqliteStore.open(path, degraded=degraded)


async def open_bus(url: str, prefix: str = "loa:") -> Bus:
    """In-process for `""`/`sqlite`/`memory`, Redis for `redis://...`."""
    spec = url.strip()
    if "://" in spec:
        scheme = spec.split("://", 1)[0].lower()
        if scheme in ("memory", "sqlite"):
            return InProcessBus()
        if scheme in ("redis", "rediss"):
            return await RedisBus.connect(spec, prefix)
    else:
        scheme = spec.lower()
        if scheme in ("", "memory", "sqlite"):
            return InProcessBus()
    # Only the scheme: the rest of a URL may carry a password.
    raise ValueError(f"unsupported bus URL scheme {scheme!r}: use '', 'memory', 'sqlite[:///…]', "
                     "'redis://…' or 'rediss://…'")
