"""CAP 1.2 alerts: safe parsing and the schema's rules, the mapping to areas, classes and text,
and the API end to end: reference loudspeaker agents (`loa device`) hear the attention signal
over HTTP in the two targeted communes while the third keeps its music, a board gets the text,
a Cancel brings the music back at the sample where it stopped; bad documents change nothing
while a listener elsewhere keeps receiving.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import re
import signal
import sys
import wave
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
import pytest
from aiohttp import web

from loa.codecs.ogg import OggReader
from loa.relay.urlpolicy import FetchSettings
from loa.streamer.areas import AreaTree, sample_tree
from loa.streamer.clock import SAMPLE_RATE
from loa.streamer.emergency import cap
from loa.streamer.emergency.cap import CapError
from loa.streamer.emergency.service import ATTENTION_TONES, EmergencySettings, tts_voices
from loa.web.api.emergency import cap_status
from loa.web.auth import add_user
from tests.apiclient import PASSWORD
from tests.audio import peak_hz
from tests.emergencynode import (
    MUSIC,
    STEP,
    WAIT,
    X1,
    X2,
    X3,
    Srv,
    ended,
    live_config,
    serving,
    settle,
    start_music,
    steps_at,
    switch,
)
from tests.helpers import until

ICT = timezone(timedelta(hours=7))
CAP_XML = {"Content-Type": "application/cap+xml"}


# ---- documents --------------------------------------------------------------------------------------
def when(seconds: float = 0.0) -> str:
    return (datetime.now(ICT) + timedelta(seconds=seconds)).replace(microsecond=0).isoformat()


def area_xml(*codes: str, desc: str = "Khu vực", polygon: str | None = None,
             circle: str | None = None, name: str = "area") -> str:
    parts = [f"<areaDesc>{desc}</areaDesc>"]
    if polygon:
        parts.append(f"<polygon>{polygon}</polygon>")
    if circle:
        parts.append(f"<circle>{circle}</circle>")
    parts += [f"<geocode><valueName>{name}</valueName><value>{c}</value></geocode>"
              for c in codes]
    return "<area>" + "".join(parts) + "</area>"


def info_xml(*areas: str, language: str = "vi-VN", severity: str = "Extreme",
             urgency: str = "Immediate", expires: str | None = None,
             headline: str = "Bão số 5 đổ bộ", description: str = "Gió giật cấp 12.",
             instruction: str = "Người dân vào nơi trú ẩn.", resource: str = "") -> str:
    exp = f"<expires>{expires}</expires>" if expires else ""
    return (f"<info><language>{language}</language><category>Met</category>"
            f"<event>Bão</event><responseType>Shelter</responseType>"
            f"<urgency>{urgency}</urgency><severity>{severity}</severity>"
            f"<certainty>Observed</certainty>{exp}<senderName>Đài KTTV tỉnh</senderName>"
            f"<headline>{headline}</headline><description>{description}</description>"
            f"<instruction>{instruction}</instruction>{resource}"
            + "".join(areas or (area_xml(X1, X2),)) + "</info>")


def cap_doc(*infos: str, identifier: str = "KTTV-2026-001", sender: str = "kttv@tinh.gov.vn",
            sent: str | None = None, status: str = "Actual", msg_type: str = "Alert",
            scope: str = "Public", references: str | None = None, ns: str = cap.NS,
            extra: str = "") -> bytes:
    refs = f"<references>{references}</references>" if references else ""
    body = "".join(infos) if infos else (info_xml() if msg_type != "Cancel" else "")
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<alert xmlns="{ns}">'
            f"<identifier>{identifier}</identifier><sender>{sender}</sender>"
            f"<sent>{sent or when()}</sent><status>{status}</status>"
            f"<msgType>{msg_type}</msgType><scope>{scope}</scope>{extra}{refs}{body}"
            "</alert>").encode()


def ref(doc: bytes) -> str:
    a = cap.parse(doc)
    return f"{a.sender},{a.identifier},{a.sent_text}"


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2"><identifier>&lol3;</identifier></alert>"""
EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE alert [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2"><identifier>&xxe;</identifier></alert>"""


def _swap(doc: bytes, old: str, new: str) -> bytes:
    assert old.encode() in doc
    return doc.replace(old.encode(), new.encode(), 1)


GOOD = cap_doc(sent="2026-11-26T10:00:00+07:00")
BAD_DOCUMENTS: list[tuple[str, bytes, int, str]] = [
    ("not XML", b"storm tomorrow", 400, "XML"),
    ("truncated", GOOD[:-20], 400, "XML"),
    ("wrong namespace", cap_doc(ns="urn:oasis:names:tc:emergency:cap:1.1"), 422, "namespace"),
    ("no namespace", _swap(GOOD, f' xmlns="{cap.NS}"', ""), 422, "namespace"),
    ("billion laughs", BILLION_LAUGHS, 400, "DTD"),
    ("external entity", EXTERNAL_ENTITY, 400, "DTD"),
    ("missing info", _swap(GOOD, info_xml(), ""), 422, "info"),
    ("missing identifier", _swap(GOOD, "<identifier>KTTV-2026-001</identifier>", ""), 422,
     "identifier"),
    ("identifier with space", _swap(GOOD, "KTTV-2026-001", "KTTV 2026"), 422, "identifier"),
    ("bad status", _swap(GOOD, "<status>Actual</status>", "<status>Real</status>"), 422,
     "status"),
    ("bad msgType", _swap(GOOD, "<msgType>Alert</msgType>", "<msgType>Warn</msgType>"), 422,
     "msgType"),
    ("bad scope", _swap(GOOD, "<scope>Public</scope>", "<scope>Open</scope>"), 422, "scope"),
    ("bad severity", _swap(GOOD, "<severity>Extreme</severity>",
                           "<severity>Huge</severity>"), 422, "severity"),
    ("bad category", _swap(GOOD, "<category>Met</category>", "<category>Weather</category>"),
     422, "category"),
    ("sent in Z", _swap(GOOD, "2026-11-26T10:00:00+07:00", "2026-11-26T03:00:00Z"), 422,
     "sent"),
    ("sent with fraction", _swap(GOOD, "2026-11-26T10:00:00+07:00",
                                 "2026-11-26T10:00:00.5+07:00"), 422, "sent"),
    ("impossible date", _swap(GOOD, "2026-11-26T10:00:00+07:00", "2026-02-30T10:00:00+07:00"),
     422, "sent"),
    ("out of order", _swap(GOOD, "<status>Actual</status><msgType>Alert</msgType>",
                           "<msgType>Alert</msgType><status>Actual</status>"), 422, "order"),
    ("unknown element", _swap(GOOD, "<scope>Public</scope>",
                              "<scope>Public</scope><priority>1</priority>"), 422, "priority"),
    ("restricted without restriction", _swap(GOOD, "<scope>Public</scope>",
                                             "<scope>Restricted</scope>"), 422, "restriction"),
    ("cancel without references", cap_doc(msg_type="Cancel"), 422, "references"),
    ("open polygon", cap_doc(info_xml(area_xml(polygon="15,108 16,108 16,109 15,109.5"))),
     422, "polygon"),
    ("polygon out of range", cap_doc(info_xml(area_xml(polygon="95,108 16,108 16,109 95,108"))),
     422, "polygon"),
    ("expired", cap_doc(info_xml(expires=when(-60))), 422, "expired"),
    ("unknown area", cap_doc(info_xml(area_xml("T99-X9"))), 422, "T99-X9"),
    ("no known area", cap_doc(info_xml(area_xml("T01-H1-X1", name="ma-xa"))), 422, "area"),
    ("cancel for an unknown alert", cap_doc(
        msg_type="Cancel", references="kttv@tinh.gov.vn,KHONG-CO,2026-11-26T09:00:00+07:00"),
     404, "referenced"),
]
SCHEMA_ONLY = 23  # the first ones break the schema; the others are refused when acted on


# ---- parsing and validation --------------------------------------------------------------------------
def test_a_complete_alert_parses_into_the_model() -> None:
    res = ('<resource><resourceDesc>Bản tin</resourceDesc><mimeType>audio/mpeg</mimeType>'
           '<size>1234</size><uri>https://kttv.example/b.mp3</uri>'
           '<digest>0123456789abcdef0123456789abcdef01234567</digest></resource>')
    doc = cap_doc(info_xml(area_xml("T01-H2", circle="15.5,108.2 3"), language="en-US",
                           headline="Storm", expires="2030-01-01T00:00:00+07:00"),
                  info_xml(resource=res), sent="2026-11-26T10:00:00+07:00",
                  extra="<code>IPAWSv1.0</code><note>n</note>",
                  references="a@b,ID-1,2026-11-26T09:00:00+07:00")
    a = cap.parse(doc)
    assert (a.identifier, a.sender, a.status, a.msg_type, a.scope) == (
        "KTTV-2026-001", "kttv@tinh.gov.vn", "Actual", "Alert", "Public")
    assert a.sent == datetime(2026, 11, 26, 3, 0, tzinfo=UTC)
    assert a.key == "kttv@tinh.gov.vn,KTTV-2026-001,2026-11-26T10:00:00+07:00"
    assert a.references == [("a@b", "ID-1", "2026-11-26T09:00:00+07:00")]
    assert a.codes == ["IPAWSv1.0"] and a.note == "n"
    assert len(a.infos) == 2
    info = cap.pick_info(a)  # Vietnamese preferred over the first block
    assert info.language == "vi-VN" and info.headline == "Bão số 5 đổ bộ"
    assert info.response_types == ["Shelter"] and info.sender_name == "Đài KTTV tỉnh"
    assert info.resources[0].is_audio and info.resources[0].size == 1234
    assert a.infos[0].areas[0].circles == [(15.5, 108.2, 3.0)]
    assert a.infos[0].expires is not None and cap.expiry(a.infos[0]) == datetime(
        2030, 1, 1, tzinfo=ICT).timestamp()
    tree = sample_tree()
    assert cap.target_areas(info, tree) == [X1, X2]
    assert cap.spoken_text(info, "Diễn tập.") == (
        "Diễn tập. Bão số 5 đổ bộ. Gió giật cấp 12. Người dân vào nơi trú ẩn.")


def test_a_signature_after_the_info_blocks_is_allowed() -> None:
    sig = '<Signature xmlns="http://www.w3.org/2000/09/xmldsig#"><SignedInfo/></Signature>'
    doc = _swap(GOOD, "</alert>", sig + "</alert>")
    assert cap.parse(doc).identifier == "KTTV-2026-001"
    with pytest.raises(CapError):  # but not before them
        cap.parse(_swap(GOOD, "<info>", sig + "<info>"))


@pytest.mark.parametrize("name,doc,status,reason", BAD_DOCUMENTS[:SCHEMA_ONLY],
                         ids=[b[0] for b in BAD_DOCUMENTS[:SCHEMA_ONLY]])
def test_schema_rules_refuse_bad_documents(name: str, doc: bytes, status: int,
                                           reason: str) -> None:
    with pytest.raises(CapError) as e:
        cap.parse(doc)
    assert cap_status(e.value) == status
    assert reason.lower() in str(e.value).lower()
    assert " / " in str(e.value)  # Vietnamese / English


def test_class_table_is_configurable() -> None:
    default = EmergencySettings().class_table
    a = cap.parse(cap_doc(info_xml(severity="Severe", urgency="Immediate"),
                          info_xml(severity="Moderate", urgency="Expected", language="en"),
                          info_xml(severity="Extreme", urgency="Future", language="fr")))
    assert [cap.classify(i, default) for i in a.infos] == ["emergency", "normal", "priority"]
    strict = EmergencySettings(cap_emergency="Extreme/Immediate", cap_priority="*/*").class_table
    assert [cap.classify(i, strict) for i in a.infos] == ["priority", "priority", "priority"]
    with pytest.raises(ValueError):
        EmergencySettings(cap_emergency="Terrible/Immediate")


def test_polygons_and_circles_select_areas_by_their_point() -> None:
    tree = AreaTree()
    tree.add("P", "Tỉnh", "province")
    tree.add("A", "Xã A", "commune", "P", lat=15.0, lon=108.0)
    tree.add("B", "Xã B", "commune", "P", lat=15.5, lon=108.5)
    tree.add("C", "Xã C", "commune", "P", lat=16.2, lon=108.1)
    tree.add("D", "Xã D", "commune", "P")  # no coordinates: never selected by geometry
    # A concave ring (an L) holding A and C but not B, which sits in its notch.
    ring = "14.8,107.8 16.5,107.8 16.5,108.3 15.2,108.3 15.2,108.8 14.8,108.8 14.8,107.8"
    a = cap.parse(cap_doc(info_xml(area_xml(polygon=ring))))
    assert cap.target_areas(a.infos[0], tree) == ["A", "C"]
    near_b = cap.parse(cap_doc(info_xml(area_xml(circle="15.55,108.5 10"))))
    assert cap.target_areas(near_b.infos[0], tree) == ["B"]  # 5.6 km away
    small = cap.parse(cap_doc(info_xml(area_xml(circle="15.55,108.5 5"))))
    assert cap.target_areas(small.infos[0], tree) == []
    both = cap.parse(cap_doc(info_xml(area_xml("P", circle="15.55,108.5 10"))))
    assert cap.target_areas(both.infos[0], tree) == ["P"]  # B lies under P: P covers it
    assert cap.point_in_polygon(15.0, 108.0, cap.parse_polygon(ring))
    assert not cap.point_in_polygon(15.5, 108.5, cap.parse_polygon(ring))


# ---- real-world documents (tests/data/cap, sources in its README) ---------------------------------
DATA = Path(__file__).resolve().parents[1] / "data" / "cap"


def real(name: str) -> bytes:
    return (DATA / name).read_bytes()


def test_real_documents_parse_validate_and_map() -> None:
    table = EmergencySettings().class_table
    # Environment Canada: an Update in English and French, six polygons with CAP-CP geocodes,
    # empty <instruction/> and <value/> (refused as "empty" before).
    eccc = cap.parse(real("eccc-wind-warning-update-en-fr.xml"))
    assert eccc.msg_type == "Update" and eccc.sender == "cap-pac@canada.ca"
    assert eccc.references == [("cap-pac@canada.ca", "urn:oid:2.49.0.1.124.2075275656.2022",
                                "2022-10-10T04:49:30-00:00")]
    assert [i.language for i in eccc.infos] == ["en-CA", "fr-CA"]
    en, fr = eccc.infos
    assert en.instruction is None and fr.headline == "avertissement de vent en vigueur"
    assert len(en.areas) == 6 and all(len(a.polygons) == 1 for a in en.areas)
    assert en.areas[0].geocodes[0] == ("layer:EC-MSC-SMC:1.0:CLC", "077210")
    assert en.parameters[-1] == ("layer:EC-MSC-SMC:1.1:Newly_Active_Areas", "")
    assert cap.pick_info(eccc) is en  # no Vietnamese block: the first one
    assert cap.classify(en, table) == "normal"  # Moderate / Future
    # IPAWS (Michigan State Police): the EAS audio inline, MP3 in 76-column base64 lines far
    # beyond the text-field limit (refused as "not base64" before).
    mi = cap.parse(real("ipaws-mi-cem-embedded-audio.xml"))
    res = mi.infos[0].resources[0]
    assert res.is_audio and res.mime_type == "audio/x-ipaws-audio-mp3"
    assert res.deref is not None and len(res.deref) == 188_752
    assert res.deref[:3] == b"ID3"  # an MP3 file
    assert real("ipaws-mi-cem-embedded-audio.xml").count(b"\n") > 2000  # line breaks inside
    assert cap.classify(mi.infos[0], table) == "emergency"  # Extreme / Immediate
    assert mi.infos[0].areas[0].geocodes == [("SAME", "026000")]
    # IPAWS (Puerto Rico): size and SHA-1 digest of the inline audio, empty optional elements.
    pr = cap.parse(real("ipaws-pr-rmt-size-digest.xml"))
    assert pr.source is None and pr.addresses is None and pr.note is None
    res = pr.infos[0].resources[0]
    assert res.deref is not None and res.size == len(res.deref)
    assert res.digest == hashlib.sha1(res.deref).hexdigest()
    assert pr.infos[0].instruction is None and cap.classify(pr.infos[0], table) == "emergency"
    # IPAWS Cancel with a signature; NTWC tsunami Update with three references and no
    # <language> (taken as Vietnamese: the node's voice); the OASIS CAP 1.2 examples.
    nv = cap.parse(real("ipaws-nv-cancel.xml"))
    assert nv.msg_type == "Cancel" and not nv.infos and len(nv.references) == 1
    ts = cap.parse(real("ntwc-tsunami-cancellation-update.xml"))
    assert [r[1] for r in ts.references] == ["PAAQ-1-mg5a94", "PAAQ-2-mg5a94", "PAAQ-3-mg5a94"]
    assert ts.infos[0].language == cap.DEFAULT_LANGUAGE and tts_voices(
        ts.infos[0].language) == [None]
    assert ts.infos[0].areas[0].circles == [(55.3, -134.9, 0.0)]
    assert ts.infos[0].resources[0].deref is None  # a JSON document by uri: not aired
    storm = cap.parse(real("oasis-cap12-a2-thunderstorm-polygon.xml"))
    assert len(storm.infos[0].areas[0].polygons[0]) == 5
    assert cap.classify(storm.infos[0], table) == "emergency"  # Severe / Immediate
    quake = cap.parse(real("oasis-cap12-a3-earthquake-update.xml"))
    assert quake.msg_type == "Update" and cap.classify(quake.infos[0], table) == "normal"
    # NWS's CAP 1.1 feed: refused, and the reason says why.
    with pytest.raises(CapError) as e:
        cap.parse(real("nws-blizzard-cap11.xml"))
    assert cap_status(e.value) == 422 and "cap:1.1" in str(e.value)


def test_polygons_of_a_real_alert_select_the_areas_inside() -> None:
    tree = AreaTree()
    tree.add("P", "Tỉnh", "province")
    tree.add("HINTON", "Hinton", "commune", "P", lat=53.40, lon=-117.57)
    tree.add("EDMONTON", "Edmonton", "commune", "P", lat=53.55, lon=-113.49)
    eccc = cap.parse(real("eccc-wind-warning-update-en-fr.xml"))
    assert cap.target_areas(eccc.infos[0], tree) == ["HINTON"]


def _swap_tag(doc: bytes, tag: str, value: str) -> bytes:
    start = doc.index(f"<{tag}>".encode()) + len(tag) + 2
    return doc[:start] + value.encode() + doc[doc.index(f"</{tag}>".encode(), start):]


@pytest.mark.parametrize("what,change,element,reason", [
    ("digest", lambda d: _swap_tag(d, "digest", "0" * 40), "digest", "does not match"),
    ("size", lambda d: _swap_tag(d, "size", "1234"), "size", "says 1234 bytes"),
    ("base64", lambda d: d.replace(b"<derefUri>", b"<derefUri>@@", 1), "derefUri",
     "not valid base64"),
    ("sha-1", lambda d: _swap_tag(d, "digest", "abc"), "digest", "SHA-1"),
])
def test_inline_resources_are_refused_with_the_true_reason(
        what: str, change: Any, element: str, reason: str) -> None:
    with pytest.raises(CapError) as e:
        cap.parse(change(real("ipaws-pr-rmt-size-digest.xml")))
    assert cap_status(e.value) == 422 and e.value.element == element, (what, e.value)
    assert reason in str(e.value) and " / " in str(e.value)


def test_an_inline_resource_over_the_configured_size_is_refused_as_too_large() -> None:
    doc = real("ipaws-mi-cem-embedded-audio.xml")
    assert cap.parse(doc, 188_752).infos[0].resources[0].deref is not None
    with pytest.raises(CapError) as e:
        cap.parse(doc, 100_000)
    assert e.value.element == "derefUri" and "too large" in str(e.value)


def test_the_body_limit_admits_the_largest_resource_in_base64_with_line_breaks() -> None:
    s = EmergencySettings(cap_max_kb=64, cap_resource_mb=1)
    inline = len(base64.encodebytes(b"\0" * s.cap_resource_bytes).replace(b"\n", b"\r\n"))
    assert s.cap_body_limit >= 64 * 1024 + inline


# ---- the API, virtual clock ------------------------------------------------------------------------
async def post_cap(srv: Srv, doc: bytes, who: str = "tinh",
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
    return await srv.call(who, "POST", "/api/v1/alerts", data=doc, headers=headers or CAP_XML)


async def test_alert_update_cancel_and_repeats(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv:
        node = srv.node
        music = start_music(node)
        board = await srv.device(X1, "board")
        subs = {a: node.hub.subscribe(a, "pcm", maxlen=100_000) for a in MUSIC}
        srv.run(1.0)
        doc = cap_doc()
        status, em = await post_cap(srv, doc)
        assert status == 201, em
        assert em["class"] == "emergency" and em["targets"] == [X1, X2]
        assert em["cap"]["key"] == ref(doc) and em["cap"]["severity"] == "Extreme"
        assert em["title"] == "Bão số 5 đổ bộ"
        on = await board.command("emergency")
        assert on["args"]["on"] is True and on["args"]["text"].startswith("Bão số 5 đổ bộ — Gió")
        srv.run(3.2)
        await settle()
        s1 = switch(node, X1, em["broadcast"])
        tones = [int(ATTENTION_TONES[k % 2]) for k in range(12)]
        assert steps_at(subs[X1], s1.sample, 12) == tones
        assert steps_at(subs[X2], s1.sample, 12) == tones
        assert set(steps_at(subs[X3], s1.sample, 12)) == {400}
        # The same message again: 200, the same emergency, nothing new airs.
        status, again = await post_cap(srv, doc)
        assert status == 200 and again["id"] == em["id"] and again["duplicate"] is True
        assert len(await node.store.find("emergency")) == 1
        # An Update replaces it (new text on the board, new audio at once).
        upd = cap_doc(info_xml(headline="Bão số 5 đổi hướng"), identifier="KTTV-2026-002",
                      msg_type="Update", references=ref(doc))
        status, new = await post_cap(srv, upd)
        assert status == 201, new
        old = await ended(node, em["id"])
        assert old["end_cause"] == "updated" and old["replaced_by"] == new["id"]
        assert (await board.command("emergency"))["args"]["text"].startswith("Bão số 5 đổi")
        srv.run(0.1)
        assert node.engine.on_air(X1)["broadcast"] == new["broadcast"]
        # Cancel ends it: music where it stopped, the board cleared.
        cancel = cap_doc(identifier="KTTV-2026-003", msg_type="Cancel", references=ref(upd))
        status, got = await post_cap(srv, cancel)
        assert status == 200 and got["ended"] == [new["id"]]
        assert (await ended(node, new["id"]))["end_cause"] == "cancelled"
        assert (await board.command("emergency"))["args"] == {"on": False}
        srv.run(0.1)
        for a in (X1, X2):
            start = switch(node, a, music[a])
            back = next(c for c in node.engine.changes if c.area == a and c.after == music[a]
                        and c.before is not None)
            assert back.resumed_at == s1.sample - start.sample
        status, got = await post_cap(srv, cancel)
        assert status == 200 and got["duplicate"] is True
        unknown = cap_doc(identifier="KTTV-2026-004", msg_type="Cancel",
                          references="x@y,NOPE,2026-11-26T10:00:00+07:00")
        status, got = await post_cap(srv, unknown)
        assert status == 404, got
        audits = [a["action"] for a in await node.store.read_log("audit")]
        assert audits.count("alert.receive") == 5 and audits.count("alert.refused") == 1
        await board.close()


async def test_classes_exercises_expiry_and_rights(tmp_path: Path) -> None:
    cfg = live_config(tmp_path)
    cfg.emergency = EmergencySettings(cap_exercise_areas=X1)  # type: ignore[attr-defined]
    async with serving(cfg) as srv:
        node = srv.node
        start_music(node)
        board = await srv.device(X3, "board")
        srv.run(0.2)
        # Moderate / Expected: a normal bulletin (with the attention signal), no device command.
        status, em = await post_cap(srv, cap_doc(info_xml(
            area_xml(X3), severity="Moderate", urgency="Expected"), identifier="N-1"))
        assert status == 201 and em["class"] == "normal" and em["devices"]["devices"] == 0
        srv.run(0.1)
        assert node.engine.on_air(X3)["class"] == "normal"
        assert node.engine.on_air(X3)["broadcast"] == em["broadcast"]
        # Exercise: only where configured, marked, and "Diễn tập." is read first.
        status, got = await post_cap(srv, cap_doc(info_xml(area_xml(X2)), status="Exercise",
                                                  identifier="EX-1"))
        assert status == 422 and "Exercise" in got["error"]
        status, ex = await post_cap(srv, cap_doc(status="Exercise", identifier="EX-2"))
        assert status == 201 and ex["targets"] == [X1]
        assert ex["title"].startswith("[DIỄN TẬP / EXERCISE]")
        assert ex["spec"]["intro"] == "Diễn tập." and ex["text"].startswith("[DIỄN TẬP")
        # Test, System, Draft: not aired (Test is not enabled anywhere here).
        status, _ = await post_cap(srv, cap_doc(status="Test", identifier="T-1"))
        assert status == 422
        for st in ("System", "Draft"):
            status, got = await post_cap(srv, cap_doc(status=st, identifier=f"S-{st}"))
            assert status == 202 and got["aired"] is False
        # An alert that expires soon airs, then ends at its expiry.
        status, short = await post_cap(srv, cap_doc(info_xml(area_xml(X3), expires=when(3)),
                                                     identifier="E-1"))
        assert status == 201
        assert (await board.command("emergency"))["args"]["on"] is True
        rec = await ended(node, short["id"], timeout=WAIT)
        assert rec["end_cause"] == "expired"
        assert (await board.command("emergency"))["args"] == {"on": False}
        # Rights: a token, the emergency right, areas inside the caller's.
        doc = cap_doc(identifier="R-1")
        assert (await post_cap(srv, doc, who=None))[0] == 401
        assert (await post_cap(srv, doc, who="xa11"))[0] == 403
        assert (await post_cap(srv, doc, who="xa11em"))[0] == 403  # X2 is not its area
        status, _ = await post_cap(srv, doc, headers={"Content-Type": "application/json"})
        assert status == 415
        assert len(await node.store.find("emergency", cap_key=ref(doc))) == 0
        await board.close()


async def test_polygon_targets_areas_with_coordinates(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv:
        node = srv.node
        for code, (lat, lon) in {X1: (15.0, 108.0), X2: (15.5, 108.5),
                                 X3: (16.2, 108.1)}.items():
            area = node.tree.get(code)
            area.lat, area.lon = lat, lon
        ring = "14.8,107.8 16.5,107.8 16.5,108.3 15.2,108.3 15.2,108.8 14.8,108.8 14.8,107.8"
        status, em = await post_cap(srv, cap_doc(info_xml(area_xml(polygon=ring))))
        assert status == 201, em
        assert em["targets"] == [X1, X3]


# ---- real-world documents through the API ----------------------------------------------------------
def future(doc: bytes, seconds: float = 3600) -> bytes:
    """A published document with its <expires> moved ahead: as published, all have expired."""
    return re.sub(rb"<expires>[^<]*</expires>", f"<expires>{when(seconds)}</expires>".encode(),
                  doc)


def same_config(tmp_path: Path, **settings: Any) -> Any:
    """A node whose tree also holds the SAME (US county) codes of the IPAWS documents' areas,
    with CAP geocodes read from valueName SAME."""
    cfg = live_config(tmp_path)
    with open(cfg.areas.csv, "a", encoding="utf-8") as f:
        f.write("072115,Quebradillas,commune,T01-H1\n026000,Michigan,commune,T01-H2\n")
    cfg.emergency = EmergencySettings(cap_geocode="SAME", **settings)
    return cfg


async def test_real_alerts_with_inline_audio_air_it(tmp_path: Path) -> None:
    settings = {"cap_max_kb": 64, "cap_resource_mb": 1}
    async with serving(same_config(tmp_path, **settings)) as srv:
        node = srv.node
        start_music(node)
        sub = node.hub.subscribe("072115", "pcm", maxlen=100_000)
        srv.run(0.2)
        doc = real("ipaws-pr-rmt-size-digest.xml")
        status, got = await post_cap(srv, doc)
        assert status == 422 and got["field"] == "expires", got  # as published: over
        status, em = await post_cap(srv, future(doc))
        assert status == 201, em
        assert em["targets"] == ["072115"] and em["class"] == "emergency"
        media = await node.store.get("media", em["spec"]["content"]["media"])
        assert media is not None and media["cap_resource"] == "derefUri"
        assert abs(media["duration"] - 5.0) < 0.1
        srv.run(3.0 + 0.5 + 2.0)
        await settle()
        s = switch(node, "072115", em["broadcast"])
        # After the attention signal (12 steps) and the pause (2): the authority's 1050 Hz.
        assert steps_at(sub, s.sample + 14 * STEP + STEP, 4) == [1050] * 4
        # 258 KB of speech in base64 lines, over cap_max_kb: the body limit adds the resource.
        mi = future(real("ipaws-mi-cem-embedded-audio.xml"))
        assert 64 * 1024 < len(mi) < EmergencySettings(**settings).cap_body_limit
        status, em = await post_cap(srv, mi)
        assert status == 201, em
        media = await node.store.get("media", em["spec"]["content"]["media"])
        assert media is not None and abs(media["duration"] - 23.5) < 0.2
        # Bytes that are not audio, correctly declared: refused, naming the element.
        junk = b"EAS audio? no. " * 300
        bad = future(doc)
        for tag, value in (("identifier", "NOT-AUDIO-1"), ("size", str(len(junk))),
                           ("digest", hashlib.sha1(junk).hexdigest()),
                           ("derefUri", base64.b64encode(junk).decode())):
            bad = _swap_tag(bad, tag, value)
        status, got = await post_cap(srv, bad)
        assert status == 422 and got["field"] == "derefUri" and "not audio" in got["error"]
        status, got = await post_cap(srv, b" " * (EmergencySettings(**settings).cap_body_limit
                                                  + 1))
        assert status == 413
        assert len(await node.store.find("emergency")) == 2


async def test_real_documents_as_published_are_refused_with_the_true_reason(
        tmp_path: Path) -> None:
    want = {  # file: (status, field); all have expired, the NV Cancel's alert is unknown here
        "eccc-wind-warning-update-en-fr.xml": (422, "expires"),
        "ipaws-mi-cem-embedded-audio.xml": (422, "expires"),
        "ipaws-pr-rmt-size-digest.xml": (422, "expires"),
        "ipaws-nv-cancel.xml": (404, "references"),
        "ntwc-tsunami-cancellation-update.xml": (422, "expires"),
        "oasis-cap12-a2-thunderstorm-polygon.xml": (422, "expires"),
        "oasis-cap12-a3-earthquake-update.xml": (422, "area"),  # no expiry; not in this tree
        "nws-blizzard-cap11.xml": (422, "alert"),  # CAP 1.1
    }
    assert set(want) == {p.name for p in DATA.glob("*.xml")}
    async with serving(live_config(tmp_path)) as srv:
        for name, (status, field) in want.items():
            got_status, got = await post_cap(srv, real(name))
            assert (got_status, got.get("field")) == (status, field), (name, got)
            assert " / " in got["error"]
        assert await srv.node.store.find("emergency") == []


def test_voices_for_rfc3066_languages() -> None:
    assert tts_voices("en-US") == ["en-us", "en", None]
    assert tts_voices("fr") == ["fr", None]
    assert tts_voices("vi-VN") == tts_voices("vi") == tts_voices("") == tts_voices(None) == [None]


async def test_the_info_language_chooses_the_voice(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv:
        node = srv.node
        area = node.tree.get(X2)
        area.lat, area.lon = 53.40, -117.57  # inside one of Environment Canada's polygons
        english = cap_doc(info_xml(area_xml(X1), language="en-US", headline="Storm warning",
                                   description="Gusts of 120 km/h.", instruction="Stay in."),
                          identifier="EN-1")
        status, em = await post_cap(srv, english)
        assert status == 201 and em["spec"]["language"] == "en-US", em
        # Two languages: the Vietnamese block airs, in the Vietnamese voice.
        both = cap_doc(info_xml(area_xml(X3), language="en-US", headline="Storm"),
                       info_xml(area_xml(X3)), identifier="VI-1")
        status, vi = await post_cap(srv, both)
        assert status == 201 and vi["title"] == "Bão số 5 đổ bộ" and vi["targets"] == [X3]
        status, ca = await post_cap(srv, future(real("eccc-wind-warning-update-en-fr.xml")))
        assert status == 201 and ca["targets"] == [X2] and ca["class"] == "normal", ca
        # A language the TTS engine lacks: the Vietnamese voice, and the alert airs.
        klingon = cap_doc(info_xml(area_xml(X3), language="tlh", headline="Qapla"),
                          identifier="TLH-1")
        status, _ = await post_cap(srv, klingon)
        assert status == 201
        voices = {m["title"]: m["tts"]["voice"] for m in await node.store.find("media")
                  if m.get("tts")}
        assert voices["Qapla. Gió giật cấp 12. Người dân vào nơi trú ẩn."] == "vi"
        assert voices["Storm warning. Gusts of 120 km/h. Stay in."] == "en-us"
        assert voices["Bão số 5 đổ bộ. Gió giật cấp 12. Người dân vào nơi trú ẩn."] == "vi"
        assert [v for t, v in voices.items() if t.startswith("wind warning in effect.")] == [
            "en-ca"]


async def test_a_repeated_alert_from_another_area_gets_no_record(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv:
        node = srv.node
        await add_user(node.store, node.tree, "xa12em", "operator", X2, PASSWORD, True)
        doc = cap_doc(info_xml(area_xml(X1)), identifier="DUP-1")
        status, em = await post_cap(srv, doc, who="xa11em")
        assert status == 201, em
        status, got = await post_cap(srv, doc, who="xa12em")  # another commune, same message
        assert status == 409 and set(got) == {"error", "field"} and got["field"] == "identifier"
        assert em["id"] not in got["error"] and "Bão" not in got["error"]
        for who in ("xa11em", "huyen1em"):  # the sender's own area, or one above it
            status, again = await post_cap(srv, doc, who=who)
            assert status == 200 and again["id"] == em["id"] and again["duplicate"] is True
        cancel = cap_doc(identifier="DUP-2", msg_type="Cancel", references=ref(doc))
        # Another commune's Cancel or Update of it: not known there (no record, no area code).
        for n, msg_type in enumerate(("Cancel", "Update")):
            other = cap_doc(info_xml(area_xml(X2)), identifier=f"OTHER-{n}", msg_type=msg_type,
                            references=ref(doc))
            status, got = await post_cap(srv, other, who="xa12em")
            if msg_type == "Cancel":
                assert status == 404 and X1 not in got["error"], got
            else:  # airs in its own commune as a new alert; X1's goes on
                assert status == 201 and got["replaces"] == [] and got["targets"] == [X2], got
        assert (await node.store.get("emergency", em["id"]))["status"] == "active"
        status, got = await post_cap(srv, cancel, who="xa11em")
        assert status == 200 and got["ended"] == [em["id"]]
        status, got = await post_cap(srv, cancel, who="xa12em")
        assert status == 409 and set(got) == {"error", "field"}
        refused = [a for a in await node.store.read_log("audit") if a["action"] == "alert.refused"]
        assert len(refused) == 3


def tone_wav(hz: float, seconds: float) -> bytes:
    t = np.arange(int(seconds * 16_000)) / 16_000
    pcm = (0.3 * 32767 * np.sin(2 * np.pi * hz * t)).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


async def test_audio_resource_is_fetched_within_limits_and_aired(tmp_path: Path) -> None:
    clip = tone_wav(1500, 2.0)
    big = tone_wav(1500, 40.0)  # 1.28 MB: over a 1 MB limit
    async def serve(request: web.Request) -> web.Response:
        body = clip if request.match_info["name"] == "clip" else big
        return web.Response(body=body, content_type="audio/wav")

    app = web.Application()
    app.router.add_get("/{name}.wav", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    cfg = live_config(tmp_path)
    cfg.emergency = EmergencySettings(cap_resource_mb=1)  # type: ignore[attr-defined]
    cfg.fetch = FetchSettings(allow_networks=["127.0.0.0/8"])  # the origin is local here
    try:
        async with serving(cfg) as srv:
            node = srv.node
            start_music(node)
            sub = node.hub.subscribe(X1, "pcm", maxlen=100_000)
            srv.run(0.2)

            def resource(name: str, digest: str = "") -> str:
                d = f"<digest>{digest}</digest>" if digest else ""
                return (f"<resource><resourceDesc>Giọng đọc</resourceDesc>"
                        f"<mimeType>audio/x-wav</mimeType>"
                        f"<uri>http://{host}:{port}/{name}</uri>{d}</resource>")

            status, em = await post_cap(srv, cap_doc(info_xml(
                area_xml(X1), resource=resource("clip.wav", hashlib.sha1(clip).hexdigest()))))
            assert status == 201, em
            assert "media" in em["spec"]["content"]  # the authority's recording, not TTS
            srv.run(3.0 + 0.5 + 1.0)
            await settle()
            s = switch(node, X1, em["broadcast"])
            # After the attention signal and the pause: the fetched recording.
            assert steps_at(sub, s.sample + 12 * STEP + STEP * 2 + STEP // 2, 2) == [1500, 1500]
            status, _ = await srv.call("tinh", "DELETE", f"/api/v1/emergencies/{em['id']}")
            assert status == 200
            # Too big, or a digest that does not match: the text is read instead.
            for n, (name, digest) in enumerate((("big.wav", ""), ("clip.wav", "0" * 40))):
                status, em = await post_cap(srv, cap_doc(info_xml(
                    area_xml(X1), resource=resource(name, digest)), identifier=f"B-{n}"))
                assert status == 201
                assert em["spec"]["content"] == {"text": "Bão số 5 đổ bộ. Gió giật cấp 12. "
                                                         "Người dân vào nơi trú ẩn."}
                await srv.call("tinh", "DELETE", f"/api/v1/emergencies/{em['id']}")
    finally:
        await runner.cleanup()


# ---- real clients on the real clock -----------------------------------------------------------------
class OggOpusListener:
    """An HTTP listener of /streams/A.opus: Ogg pages -> Opus packets -> PCM (PyAV)."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url
        self.pcm: list[np.ndarray] = []
        self.packets = 0
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        dec = av.CodecContext.create("libopus", "r")
        dec.sample_rate = 48_000
        dec.layout = "mono"
        reader = OggReader()
        async with self.http.get(self.url) as r:
            assert r.status == 200
            async for chunk in r.content.iter_any():
                for packets, _, _ in reader.feed(chunk):
                    for pkt in packets:
                        if pkt.startswith((b"OpusHead", b"OpusTags")) or not pkt:
                            continue
                        self.packets += 1
                        for f in dec.decode(av.Packet(pkt)):
                            a = f.to_ndarray().reshape(-1)
                            self.pcm.append(a.astype(np.float32) / (
                                32768 if a.dtype == np.int16 else 1))

    def recent_hz(self, seconds: float = 0.5) -> float:
        pcm = np.concatenate(self.pcm)[-int(seconds * 48_000):]
        return peak_hz(pcm, 48_000)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


async def test_bad_documents_are_refused_while_a_listener_keeps_receiving(
        tmp_path: Path) -> None:
    async with serving(live_config(tmp_path), realtime=True) as srv:
        node = srv.node
        start_music(node)
        listener = OggOpusListener(srv.http, f"{srv.base}/streams/{X3}.opus")
        listener.start()
        try:
            await until(lambda: listener.packets >= 25, "the listener's first second")
            for name, doc, want, reason in BAD_DOCUMENTS:
                status, got = await post_cap(srv, doc)
                assert status == want, (name, got)
                assert reason.lower() in got["error"].lower(), (name, got)
            assert await node.store.find("emergency") == []
            assert all(node.engine.on_air(a)["class"] == "normal" for a in MUSIC)
            seen = listener.packets
            await until(lambda: listener.packets >= seen + 50, "another second of audio")
            assert abs(listener.recent_hz() - 400) < 5  # its music, unchanged
            status, _ = await srv.call("tinh", "GET", "/healthz")
            assert status == 200
        finally:
            await listener.stop()


async def run_agent(srv: Srv, area: str, wav: Path) -> tuple[str, asyncio.subprocess.Process]:
    dev_id, key = await srv.provision(area, "loudspeaker", codecs=["opus"], transports=["http"])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loa.web.cli", "device", "--server", srv.base,
        "--key", f"{dev_id}:{key}", "--transport", "http", "--sink", f"wav:{wav}",
        "--seconds", "60", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    return dev_id, proc


def windows(wav: Path, seconds: float = 0.1) -> list[int]:
    """Peak frequency (10 Hz steps) of every `seconds` window of a WAV that is not silent."""
    with wave.open(str(wav)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32)
    pcm /= 32768
    n = int(seconds * SAMPLE_RATE)
    out = []
    for k in range(len(pcm) // n):
        win = pcm[k * n:(k + 1) * n]
        if float(np.sqrt(np.mean(win * win))) > 0.02:
            out.append(int(round(peak_hz(win, SAMPLE_RATE) / 10) * 10))
    return out


async def test_cap_end_to_end_with_reference_agents_a_board_and_a_cancel(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path), realtime=True) as srv:
        node = srv.node
        music = start_music(node)
        wavs = {a: tmp_path / f"{a}.wav" for a in MUSIC}
        agents = {a: await run_agent(srv, a, wavs[a]) for a in MUSIC}
        board = await srv.device(X1, "board")
        try:
            await until(lambda: all(node.hub.channel(a, "opus").subs for a in MUSIC),
                        "three agents listening")
            await asyncio.sleep(1.5)  # music in every commune
            doc = cap_doc(info_xml(area_xml(X1, X2), headline="Lũ quét"))
            status, em = await post_cap(srv, doc)
            assert status == 201, em
            assert em["devices"] == {"devices": 3, "online": 3}  # 2 loudspeakers and a board
            on = await board.command("emergency")
            assert on["args"]["on"] is True and on["args"]["text"].startswith("Lũ quét")
            await asyncio.sleep(2.5)  # the attention signal plays in X1 and X2
            cancel = cap_doc(identifier="KTTV-2026-009", msg_type="Cancel", references=ref(doc))
            status, got = await post_cap(srv, cancel)
            assert status == 200 and got["ended"] == [em["id"]]
            assert (await board.command("emergency"))["args"] == {"on": False}
            await until(lambda: node.engine.on_air(X1)["broadcast"] == music[X1], "music")
            await asyncio.sleep(2.0)  # music again, heard by the agents
        finally:
            for _, proc in agents.values():
                if proc.returncode is None:
                    proc.send_signal(signal.SIGINT)
            for _, proc in agents.values():
                _, err = await asyncio.wait_for(proc.communicate(), WAIT)
                assert proc.returncode == 0, err.decode()[-2000:]
            await board.close()
        # What the agents played: music, the two-tone attention signal, music again.
        for a in (X1, X2):
            seq = windows(wavs[a])
            tones = [i for i, f in enumerate(seq) if f in ATTENTION_TONES]
            assert len(tones) >= 15, (a, seq)  # at least 1.5 s of the signal
            first, last = tones[0], tones[-1]
            assert {seq[i] for i in range(first, last + 1) if seq[i] in ATTENTION_TONES} == {
                int(t) for t in ATTENTION_TONES}
            # The first window may hold the playback's onset (part silence: its peak is off by a
            # bin under load); from the second on, music until the signal.
            assert set(seq[1:first]) == {int(MUSIC[a])}, (a, seq)
            after = seq[last + 1:]
            assert len(after) >= 5 and set(after) == {int(MUSIC[a])}, (a, seq)
        assert set(windows(wavs[X3])) == {400}  # the third commune kept its music
        # The music resumed at the sample where the emergency stopped it.
        for a in (X1, X2):
            start = switch(node, a, music[a])
            pre = switch(node, a, em["broadcast"])
            back = next(c for c in node.engine.changes if c.area == a and c.after == music[a]
                        and c.before == em["broadcast"])
            assert back.resumed_at == pre.sample - start.sample
        # The loudspeakers acknowledged the emergency commands (on, then off).
        for a in (X1, X2):
            dev_id = agents[a][0]
            rows = sorted(await node.store.find("command", device=dev_id),
                          key=lambda r: r["created"])
            assert [(r["command"], r["args"]["on"], r["status"]) for r in rows] == [
                ("emergency", True, "acked"), ("emergency", False, "acked")]
        assert await node.store.find("command", device=agents[X3][0]) == []


def test_the_bad_documents_differ_from_a_good_one_in_one_way() -> None:
    """The good document parses, so each bad one fails for its own reason."""
    assert cap.parse(GOOD).identifier == "KTTV-2026-001"
    assert len({b[0] for b in BAD_DOCUMENTS}) == len(BAD_DOCUMENTS)
    for _, doc, _, _ in BAD_DOCUMENTS[SCHEMA_ONLY:]:  # valid CAP, refused for what it says
        cap.parse(doc)
