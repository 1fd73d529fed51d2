"""Shared fixtures. Redis is real: absent under CI it is a failure, never a skip."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import pytest

REDIS_URL = os.environ.get("LOA_TEST_REDIS", "redis://127.0.0.1:6379/0")


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    """A reachable Redis URL; yields it with a unique key prefix in `redis_prefix`."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as e:  # noqa: BLE001 - any failure to reach it means the same
        await client.aclose()
        if os.environ.get("CI"):
            pytest.fail(f"Redis is required under CI and is not reachable at {REDIS_URL}: {e}")
        pytest.skip(f"Redis not reachable at {REDIS_URL} (set CI=1 to make this a failure)")
    await client.aclose()
    yield REDIS_URL


@pytest.fixture
def redis_prefix() -> str:
    return f"loa-test-{uuid.uuid4().hex[:8]}:"
