"""Programme rules without HTTP: fields and limits, the editorial check, what may be scheduled."""

from __future__ import annotations

from typing import Any

import pytest

from loa.streamer import programmes
from loa.streamer.programmes import MAX_GAP, MAX_REPEAT, ProgrammeError

MEDIA = {"m1": {"id": "m1", "duration": 12.5}, "m2": {"id": "m2", "duration": 7.5}}


class Body:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def value(self, name: str, kind: type, *, required: bool = True, default: Any = None) -> Any:
        if self.data.get(name) is None:
            if required:
                raise KeyError(name)
            return default
        return self.data[name]

    def strings(self, name: str) -> list[str]:
        return list(self.data[name])


async def media(mid: str, name: str) -> dict[str, Any]:
    return MEDIA[mid]


async def any_url(url: str) -> None:
    if not url.startswith("http"):
        raise ValueError("giao thức không được phép / scheme refused")


async def fields(**data: Any) -> dict[str, Any]:
    return await programmes.programme_fields(Body(data), media, any_url)


async def refused(**data: Any) -> ProgrammeError:
    with pytest.raises(ProgrammeError) as e:
        await fields(**data)
    return e.value


async def test_a_playlist_gets_defaults_and_the_duration_of_one_play():
    rec = await fields(title="  Bản tin  ", type="playlist", items=["m1", "m2"])
    assert rec == {"title": "Bản tin", "type": "playlist", "volume": 100, "repeat": 1, "gap": 0.0,
                   "items": ["m1", "m2"], "duration": 20.0}
    assert (await fields(title="Nói", type="tts", text="Xin chào"))["duration"] is None


@pytest.mark.parametrize(("data", "name"), [
    ({"title": " ", "type": "tts", "text": "x"}, "title"),
    ({"title": "x" * 201, "type": "tts", "text": "x"}, "title"),
    ({"title": "t", "type": "video"}, "type"),
    ({"title": "t", "type": "tts", "text": "x", "volume": 151}, "volume"),
    ({"title": "t", "type": "tts", "text": "x", "repeat": MAX_REPEAT + 1}, "repeat"),
    ({"title": "t", "type": "tts", "text": "x", "repeat": 0}, "repeat"),
    ({"title": "t", "type": "tts", "text": "x", "gap": MAX_GAP + 1}, "gap"),
    ({"title": "t", "type": "tts", "text": " "}, "text"),
    ({"title": "t", "type": "relay", "url": "http://x/" + "a" * 2000}, "url"),
])
async def test_a_field_out_of_its_limits_is_refused_with_422_naming_it(data, name):
    e = await refused(**data)
    assert (e.kind, e.field) == ("invalid", name)


async def test_a_refused_relay_url_gives_the_checks_reason():
    e = await refused(title="t", type="relay", url="rtsp://x/")
    assert (str(e), e.field, e.kind) == ("giao thức không được phép / scheme refused", "url",
                                         "invalid")
    assert (await fields(title="t", type="relay", url="http://x/"))["url"] == "http://x/"


def test_the_editorial_check_draft_pending_approved_or_rejected():
    prog = programmes.new_programme({"title": "t"}, "T01", "editor", now=5.0)
    assert (prog["status"], prog["area"], prog["owner"], prog["created"]) == \
        ("draft", "T01", "editor", 5.0)
    with pytest.raises(ProgrammeError) as e:
        programmes.approval(prog, "boss")
    assert e.value.kind == "conflict" and "(this one is draft)" in str(e.value)
    prog |= programmes.submission(prog, "editor")
    assert prog["status"] == "pending"
    with pytest.raises(ProgrammeError) as e:
        programmes.submission(prog, "editor")
    assert str(e.value) == ("không thể gửi duyệt ở trạng thái pending / "
                            "cannot submit a pending programme")
    with pytest.raises(ProgrammeError) as e:
        programmes.rejection(prog, "boss", "  ")
    assert (e.value.kind, e.value.field) == ("invalid", "reason")
    rejected = prog | programmes.rejection(prog, "boss", " sai tên ")
    assert (rejected["status"], rejected["reason"]) == ("rejected", "sai tên")
    assert programmes.submission(rejected, "editor")["status"] == "pending"  # resubmitted
    approved = prog | programmes.approval(prog, "boss", now=9.0)
    assert (approved["status"], approved["approved_at"]) == ("approved", 9.0)
    assert programmes.edited({"title": "t2"}) == {"title": "t2", "status": "draft", "reason": None}


def test_only_an_approved_programme_is_scheduled_unless_direct():
    programmes.check_schedulable({"status": "approved"}, direct=False)
    programmes.check_schedulable({"status": "draft"}, direct=True)
    with pytest.raises(ProgrammeError) as e:
        programmes.check_schedulable({"status": "pending"}, direct=False)
    assert (e.value.kind, e.value.field) == ("conflict", "programme")


def test_airtime_counts_repeats_gaps_and_a_minute_for_an_unknown_length():
    assert programmes.airtime(None) == 0.0
    assert programmes.airtime({"duration": 30.0, "repeat": 3, "gap": 10.0}) == 110.0
    assert programmes.airtime({"duration": None}) == 60.0


async def test_airtimes_of_schedules_read_their_programmes():
    class Store:
        async def get(self, kind: str, rid: str) -> dict[str, Any] | None:
            return {"p1": {"duration": 10.0, "repeat": 2, "gap": 5.0}}.get(rid)

    got = await programmes.airtimes(Store(), [{"programme": "p1"}, {"programme": "gone"}])
    assert got == {"p1": 25.0, "gone": 0.0}
