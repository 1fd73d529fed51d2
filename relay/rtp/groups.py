"""Multicast groups of RTP out: which groups each area's streams are sent to.

Group allocation (stable across restarts and when areas are added, unique per deployment). Each
area owns a block of four consecutive groups from `group_base` (`opus`, `pcmu`, `pcma`, `mp3` in that order, whichever are
configured), all on `port` (RTCP on `port + 1`). The block index is first proposed by a hash of
the area code (CRC-32 modulo the number of blocks in the pool), taking the next free block on a
collision, and is then recorded in `rtp-groups.json` in the data directory, which wins from then
on. So an area keeps its groups across restarts and config edits, adding areas never moves an
existing one (a position in a sorted list would), and two nodes with the same area list propose
the same groups; the file only settles the rare collisions. Only a pool shrunk below an area's
block moves that area (logged).

Two deployments on one network must not send the same groups. A cluster (nodes on one shared
store) keeps the allocation in the store (kind `rtp_group`, the block unique), so its nodes share
one map and never hand one block to two areas. A lone node with `group_base = ""` (the default)
takes a pool of its own: 239.72.0.0/13 cut into pools of `pool_size` groups, the pool chosen by a
hash of the node id (data directory `node-id`), recorded in `rtp-groups.json` and kept from then
on; set `group_base` to plan the groups by hand. A collision is still detected: the node listens
to SAP on `sap_address:sap_port` and logs `event=rtp_group_collision` when an announcement of
another origin (not this node's `x-loa-node`) names a group and port this node sends.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import zlib
from pathlib import Path

from loa.streamer.errors import LoaError
from loa.streamer.messages import say
from loa.streamer.state.store import Conflict, Store

log = logging.getLogger("loa.rtp")

BLOCK = 4  # groups per area: one per codec slot
SLOTS = {"opus": 0, "pcmu": 1, "pcma": 2, "mp3": 3}  # a codec's position in the area's block
STATE_FILE = "rtp-groups.json"
GROUP_KIND = "rtp_group"  # the cluster's allocation in the shared store
AUTO_BASE = ipaddress.IPv4Address("239.72.0.0")  # node pools (group_base = "") lie in this /13
AUTO_SPAN = 1 << 19


def node_pool(node_id: str, pool_size: int) -> ipaddress.IPv4Address:
    """The first group of a lone node's own pool (group_base = ""): by a hash of its id."""
    pools = AUTO_SPAN // pool_size
    return AUTO_BASE + (zlib.crc32(node_id.encode("utf-8")) % pools) * pool_size


class PoolExhausted(LoaError, RuntimeError):
    """Every block of groups is taken: one more area gets no RTP stream."""

    kind = "limit"


class GroupAllocator:
    """Area -> block of groups: hash proposal, first free block on collision, persisted."""

    def __init__(self, base: ipaddress.IPv4Address, blocks: int, path: Path | None) -> None:
        self.base = base
        self.blocks = blocks
        self.path = path
        self.slots: dict[str, int] = {}
        self.dirty = False
        self.recorded_base: ipaddress.IPv4Address | None = None  # as in the file

    def load(self) -> None:
        """Read the recorded blocks (blocking: call from a thread)."""
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            slots = data["blocks"]
            if not isinstance(slots, dict):
                raise ValueError("blocks is not an object")
            self.recorded_base = ipaddress.IPv4Address(data.get("group_base"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("unreadable group map, allocating afresh event=rtp_groups_unreadable "
                      "path=%s error=%s", self.path, e)
            self.dirty = True
            return
        taken: set[int] = set()
        for area, block in slots.items():
            if not isinstance(block, int) or isinstance(block, bool) or block in taken:
                self.dirty = True
                continue
            if not 0 <= block < self.blocks:
                log.warning("area outside the shrunk pool moves event=rtp_group_moved area=%s "
                            "block=%s blocks=%d", area, block, self.blocks)
                self.dirty = True
                continue
            self.slots[str(area)] = block
            taken.add(block)

    def save(self) -> None:
        """Write atomically (blocking: call from a thread)."""
        if self.path is None:
            self.dirty = False
            return
        data = {"version": 1, "group_base": str(self.base), "block_size": BLOCK,
                "blocks": dict(sorted(self.slots.items()))}
        tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
        os.replace(tmp, self.path)
        self.dirty = False

    def block(self, area: str) -> int:
        got = self.slots.get(area)
        if got is not None:
            return got
        if len(self.slots) >= self.blocks:
            raise PoolExhausted(say("rtp.pool_exhausted", blocks=self.blocks))
        taken = set(self.slots.values())
        b = zlib.crc32(area.encode("utf-8")) % self.blocks
        while b in taken:
            b = (b + 1) % self.blocks
        self.slots[area] = b
        self.dirty = True
        return b

    def group(self, area: str, codec: str) -> str:
        return str(self.base + self.block(area) * BLOCK + SLOTS[codec])

    def adopt(self, area: str, block: int) -> None:
        """The shared store's block for an area: it wins over what this node had."""
        if self.slots.get(area) == block:
            return
        for other, b in list(self.slots.items()):
            if b == block:
                del self.slots[other]
        self.slots[area] = block
        self.dirty = True

    async def claim(self, store: Store, areas: list[str]) -> set[str]:
        """Cluster: every area's block from the shared store, allocating the missing ones there
        (the block is unique in the store: two nodes never take one block for two areas).
        Returns the areas that have a block."""
        rows = await store.find(GROUP_KIND)
        for r in rows:
            if isinstance(r.get("block"), int) and 0 <= r["block"] < self.blocks:
                self.adopt(r["id"], r["block"])
        have = {r["id"] for r in rows}
        taken = {r.get("block") for r in rows}
        for area in areas:
            if area in have:
                continue
            b = self.slots.get(area)
            if b is None or b in taken:
                b = zlib.crc32(area.encode("utf-8")) % self.blocks
            for _ in range(self.blocks):
                while b in taken and len(taken) < self.blocks:
                    b = (b + 1) % self.blocks
                if b in taken:
                    break  # pool full
                try:
                    await store.create(GROUP_KIND, {"id": area, "block": b})
                except Conflict:
                    rec = await store.get(GROUP_KIND, area)
                    if rec is not None:  # another node allocated this area meanwhile
                        b = int(rec["block"])
                    else:  # another node took this block for another area
                        taken.add(b)
                        continue
                self.adopt(area, b)
                have.add(area)
                taken.add(b)
                break
        return have
