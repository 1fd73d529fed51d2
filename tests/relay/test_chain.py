"""Levels with real node processes (issue 12): `loa serve` processes on loopback, each with its
own data directory and config, linked province -> district -> commune (and province -> commune)
by keys each parent issued. Everything is driven and checked from outside, as an operator would:
the REST API of each node, and each area's HTTP Opus stream decoded by FFmpeg (PyAV) to the
frequency it carries."""

from __future__ import annotations

from pathlib import Path

from tests.nodes import air_tone, chain, eventually, hears, on_air

P, D, C = "T01", "T01-H1", "T01-H1-X1"
ELSEWHERE = "T01-H2-X1"  # a commune of another district


def shown(rec: dict, klass: str, authority: int, issuer: str, title: str) -> None:
    assert (rec["class"], rec["authority"], rec["issuer"], rec["title"]) == \
        (klass, authority, issuer, title), rec


async def test_province_district_commune(tmp_path: Path) -> None:
    async with chain(tmp_path, [P, D, C]) as c:
        prov, dist, comm = c.nodes
        own = await air_tone(c.ops[2], tmp_path, 500, [C], "normal", "Chương trình xã")
        await hears(comm, C, 500, "the commune's own programme")
        districts = await air_tone(c.ops[1], tmp_path, 440, [D], "normal", "Nhạc huyện")
        await hears(comm, C, 440, "the district's programme above the commune's own")

        # The province airs a normal programme elsewhere while the district's priority bulletin
        # airs in its communes: each where it is sent, the commune shows who sent what.
        music = await air_tone(c.ops[0], tmp_path, 300, ["T01-H2"], "normal", "Nhạc tỉnh")
        bulletin = await air_tone(c.ops[1], tmp_path, 660, [D], "priority",
                                  "Bản tin ưu tiên huyện")
        await hears(comm, C, 660, "the district's priority bulletin on the commune node")
        await hears(prov, ELSEWHERE, 300, "the province's programme elsewhere")
        seen = await on_air(c.ops[2], C)
        shown(seen["records"][bulletin], "priority", 1, D, "Bản tin ưu tiên huyện")
        assert seen["area"]["broadcast"] == bulletin and music not in seen["records"]

        # A province emergency to the whole province: heard on the commune node, over the
        # district's bulletin and the commune's own; class, authority, issuer, title intact.
        alarm = await air_tone(c.ops[0], tmp_path, 1000, [P], "emergency", "Khẩn cấp: lũ")
        await hears(comm, C, 1000, "the province's emergency two hops down")
        await hears(dist, D, 1000, "the province's emergency on the district node")
        seen = await on_air(c.ops[2], C)
        shown(seen["records"][alarm], "emergency", 0, P, "Khẩn cấp: lũ")
        assert seen["area"]["broadcast"] == alarm and seen["area"]["class"] == "emergency"
        assert {own, districts, bulletin} <= set(seen["records"])  # preempted, not ended

        # The province ends it: the district's bulletin resumes on the commune.
        await c.ops[0].ok("DELETE", f"/api/v1/broadcasts/{alarm}")
        await hears(comm, C, 660, "the district's bulletin back after the emergency")
        assert alarm not in (await on_air(c.ops[2], C))["records"]


async def test_province_commune_two_levels(tmp_path: Path) -> None:
    async with chain(tmp_path, [P, C]) as c:
        prov, comm = c.nodes
        own = await air_tone(c.ops[1], tmp_path, 500, [C], "priority", "Bản tin xã")
        await hears(comm, C, 500, "the commune's own")
        music = await air_tone(c.ops[0], tmp_path, 300, ["T01-H2"], "normal", "Nhạc tỉnh")
        await hears(prov, ELSEWHERE, 300, "the province's programme elsewhere")
        assert music not in (await on_air(c.ops[1], C))["records"]
        await hears(comm, C, 500, "the commune's own, untouched by a programme elsewhere")
        alarm = await air_tone(c.ops[0], tmp_path, 1000, [P], "emergency", "Khẩn cấp: bão")
        await hears(comm, C, 1000, "the province's emergency one hop down")
        seen = await on_air(c.ops[1], C)
        shown(seen["records"][alarm], "emergency", 0, P, "Khẩn cấp: bão")
        assert own in seen["records"]
        await c.ops[0].ok("DELETE", f"/api/v1/broadcasts/{alarm}")
        await hears(comm, C, 500, "the commune's own resumes")


async def test_the_district_killed_and_restarted(tmp_path: Path) -> None:
    async with chain(tmp_path, [P, D, C]) as c:
        prov, dist, comm = c.nodes
        own = await air_tone(c.ops[2], tmp_path, 500, [C], "normal", "Chương trình xã")
        districts = await air_tone(c.ops[1], tmp_path, 440, [D], "normal", "Nhạc huyện")
        await hears(comm, C, 440, "the district's programme on the commune")

        await dist.kill()
        await eventually(lambda: _state(c, 2, "down"), "the commune's link down")
        await hears(comm, C, 500, "the commune's own while the district is dead")
        # The province speaks while the district is down: it reaches the commune after.
        alarm = await air_tone(c.ops[0], tmp_path, 1000, [P], "emergency", "Khẩn cấp: cháy")
        await hears(comm, C, 500, "the commune's own: the province cannot reach it yet")

        await dist.start()
        await eventually(lambda: _state(c, 2, "up"), "the commune's link back")
        await hears(comm, C, 1000, "the province's emergency after the district's return")
        seen = await on_air(c.ops[2], C)
        ids = [r["id"] for r in seen["all"]]
        assert sorted(ids) == sorted({own, districts, alarm}), seen["all"]  # none twice
        shown(seen["records"][alarm], "emergency", 0, P, "Khẩn cấp: cháy")
        await c.ops[0].ok("DELETE", f"/api/v1/broadcasts/{alarm}")
        await hears(comm, C, 440, "the district's own programme again, resumed")
        seen = await on_air(c.ops[2], C)
        assert seen["area"]["broadcast"] == districts
        assert sorted(r["id"] for r in seen["all"]) == sorted({own, districts})


async def _state(c, i: int, state: str) -> bool:
    return (await c.apis[i].upstream()).get("state") == state
