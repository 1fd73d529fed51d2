"""Property-based API testing: schemathesis drives every documented operation of /api/v1.

A real node (virtual clock) serves its API on a real TCP port on 127.0.0.1; schemathesis loads
the document from GET /api/v1/openapi.json and sends generated requests (valid and invalid by the
schema) with the `requests` transport from a worker thread, while the server keeps running on the
test's event loop. Two callers: the bootstrap admin of the province (emergency right) and a
commune operator.

Generated data alone rarely names a record that exists, so part of the cases are "grounded": a
path id is replaced by the id of a seeded record of that kind (media, programme, schedule,
broadcast, user), and body fields naming areas, media or programmes get real values. That way
the generator also reaches the code behind the 404s.

The checks: no 5xx, ever (`not_a_server_error`), and every status code is documented
(`status_code_conformance`). Every failure is collected (no early stop, no shrinking) and the test
fails with the exact requests, grouped by distinct cause, with the server's tracebacks.
Hypothesis is derandomized and keeps no database: the same requests every run.

Every 5xx the fuzzer found was fixed; each stays as a regression test at the end of this file,
one exact request with a hand-written malformed body schemathesis cannot produce (broken
multipart framing, deep JSON, lone surrogates). A new 5xx that cannot be fixed at once goes into
KNOWN_5XX (tolerated by the fuzz run, printed) together with such a reproduction.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import status_code_conformance

from loa.streamer.broadcast import Broadcast
from loa.streamer.sources import ToneSource
from loa.web.auth import add_user
from tests.apiclient import PASSWORD, Api, make_config, running_api, tone_file

# Examples per operation and generation mode. About 45 operations x 2 modes x 2 callers: the
# whole module stays well under a minute on two cores.
# LOA_SCHEMATHESIS_SCALE=10 digs deeper locally (minutes); CI runs the default.
SCALE = float(os.environ.get("LOA_SCHEMATHESIS_SCALE", "1"))
EXAMPLES = {GenerationMode.POSITIVE: round(25 * SCALE), GenerationMode.NEGATIVE: round(15 * SCALE)}
# Operations whose every example costs a subprocess (espeak-ng) or a decode: fewer examples.
SLOW_OPERATIONS = {"POST /api/v1/tts": round(10 * SCALE), "POST /api/v1/media": round(20 * SCALE)}
LOGOUT = {"DELETE /api/v1/auth/token", "DELETE /api/v1/auth/session"}
# A live stream never ends: tests/web/test_events.py drives it.
STREAMING = {"GET /api/v1/events"}
HTTP_TIMEOUT = 30.0  # a request that hangs is a finding too; this only bounds the test

# 5xx the fuzzer may find that are not fixed yet, each with a reproduction below (KNOWN_BUGS): a
# finding matching one of these (operation, regex on the server's exception or answer) is printed,
# not failed; anything else fails the test. Empty: everything found so far is fixed.
KNOWN_5XX: list[tuple[str, str]] = []

CALLERS = {
    # name -> who runs the API as that caller
    "admin": "admin",  # bootstrap admin at the province root, emergency right
    "commune": "xa11",  # operator of commune T01-H1-X1
}


# ---- server side: tracebacks of 5xx ---------------------------------------------------------
class ServerErrors(logging.Handler):
    """Collects the server's error logs (error middleware, aiohttp's own handler)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []
        self.mutex = threading.Lock()
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with self.mutex:
            self.records.append(self.format(record))

    def take(self) -> list[str]:
        with self.mutex:
            out, self.records = self.records, []
        return out


@pytest.fixture
def server_errors() -> Any:
    handler = ServerErrors()
    loggers = [logging.getLogger(n) for n in ("loa", "aiohttp.server", "aiohttp.web")]
    for lg in loggers:
        lg.addHandler(handler)
    yield handler
    for lg in loggers:
        lg.removeHandler(handler)


@pytest.fixture
def fixed_generation(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The same requests whatever else is loaded. Besides its seed, Hypothesis draws (5 % of the
    time) from constants it collects in every local module present in sys.modules, so the
    requests would change with the test selection and with any edit anywhere in the tree. Leave
    those out (an internal hook: if it moves, generation is merely less stable)."""
    from hypothesis.internal.conjecture import providers

    if hasattr(providers, "_get_local_constants") and hasattr(providers, "Constants"):
        empty = providers.Constants()
        monkeypatch.setattr(providers, "_get_local_constants", lambda: empty)
        providers.CONSTANTS_CACHE.cache.clear()
    yield
    providers.CONSTANTS_CACHE.cache.clear()


# ---- seeded records -------------------------------------------------------------------------
@dataclass
class Seeds:
    codes: list[str]
    inside: list[str]  # the caller's subtree
    ids: dict[str, list[str]]  # path prefix (media, programmes, ...) -> ids of real records
    batches: list[str]  # device command batches
    media: list[str]
    programmes: list[str]
    approved: list[str]
    audio: list[bytes]  # a real WAV file, and broken ones
    logout_tokens: list[str] = field(default_factory=list)


async def _ok(api: Api, who: str, method: str, path: str, **kw: Any) -> Any:
    status, body = await api.call(who, method, path, **kw)
    assert status in (200, 201, 202), (method, path, status, body)
    return body


async def seed(api: Api, tmp_path: Path, caller: str, password: str) -> Seeds:
    """Records of every kind, some inside the caller's area and some outside it."""
    node = api.node
    tone = tone_file(tmp_path / "seed.wav", 523, 1)
    tone2 = tone_file(tmp_path / "seed2.wav", 659, 1)
    wav = tone_file(tmp_path / "upload.wav", 784, 0.5).read_bytes()
    media = []
    for who, path in (("xa11", tone), ("tinh", tone2)):
        status, body = await api.upload(who, path)
        assert status == 201, body
        media.append(body["id"])
    progs = []
    for i, (who, state) in enumerate((("xa11", "draft"), ("xa11", "pending"),
                                      ("xa11", "approved"), ("huyen1", "approved"),
                                      ("xa11", "rejected"))):
        prog = await _ok(api, who, "POST", "/api/v1/programmes",
                         json={"title": f"Bản tin {i}", "type": "file", "media": media[i % 2],
                               "repeat": 1})
        if state != "draft":
            await _ok(api, who, "POST", f"/api/v1/programmes/{prog['id']}/submit")
        if state in ("approved", "rejected"):
            action = "approve" if state == "approved" else "reject"
            kw = {"json": {"reason": "chưa đạt"}} if action == "reject" else {}
            await _ok(api, "duyet1", "POST", f"/api/v1/programmes/{prog['id']}/{action}", **kw)
        progs.append(prog["id"])
    tts = await _ok(api, "bientap11", "POST", "/api/v1/programmes",
                    json={"title": "Thông báo", "type": "tts", "text": "xin chào bà con"})
    progs.append(tts["id"])
    schedules = []
    for who, prog, target in (("xa11", progs[2], "T01-H1-X1"), ("huyen1", progs[3], "T01-H1")):
        s = await _ok(api, who, "POST", "/api/v1/schedules",
                      json={"programme": prog, "targets": [target], "kind": "daily",
                            "time": "05:30"})
        schedules.append(s["id"])
    broadcasts = []
    for who, body in (("xa11", {"programme": progs[2], "targets": ["T01-H1-X1"]}),
                      ("huyen1", {"programme": progs[3], "targets": ["T01-H1"],
                                  "class": "priority"}),
                      ("tinh", {"media": media[1], "targets": ["T01-H2"]})):
        b = await _ok(api, who, "POST", "/api/v1/broadcasts", json=body)
        broadcasts.append(b["id"])
    # an emergency straight in the engine (not persisted): on air, unknown to the store
    node.engine.start(Broadcast(ToneSource(440, 0.3), ["T01-H2-X1"], issuer="T01",
                                klass="emergency"))
    api.run(1)
    users = []
    for name, role, area in (("nan-xa", "viewer", "T01-H1-X1"), ("nan-huyen", "editor", "T01-H1"),
                             ("nan-xa2", "operator", "T01-H2-X2")):
        rec, _ = await add_user(node.store, node.tree, name, role, area, PASSWORD)
        users.append(rec["id"])
    # somebody else's user record too (never the callers': fuzzing must not lock them out)
    users += [u["id"] for u in await node.store.find("user")
              if u["username"] in ("xem11", "huyen2")]
    devices = []
    for name, kind, area in (("Cụm loa X1", "loudspeaker", "T01-H1-X1"),
                             ("Bảng tin X1", "board", "T01-H1-X1"),
                             ("Cụm loa H1", "loudspeaker", "T01-H1"),
                             ("Cụm loa H2-X3", "loudspeaker", "T01-H2-X3")):
        who = "qtv1" if area.startswith("T01-H1") else "admin"
        if who not in api.tokens:
            admin_pw = api.node.bootstrap_password if who == "admin" else PASSWORD
            await api.login(who, admin_pw)
        d = await _ok(api, who, "POST", "/api/v1/devices",
                      json={"name": name, "kind": kind, "area": area})
        devices.append(d["id"])
    batch = await _ok(api, "qtv1", "POST", "/api/v1/devices/commands",
                      json={"area": "T01-H1", "command": "volume", "args": {"volume": 60}})
    logout = [await api.login(caller, password) for _ in range(12)]
    api.tokens[caller] = await api.login(caller, password)  # the fuzzing token: never revoked
    area = (await node.store.find("user", username=caller))[0]["area"]
    return Seeds(codes=[a.code for a in node.tree] + ["T99", "T01-H1-X9"],
                 inside=list(node.tree.subtree(area)),
                 ids={"media": media, "programmes": progs, "schedules": schedules,
                      "broadcasts": broadcasts, "users": users, "devices": devices},
                 batches=[batch["command_batch"]],
                 media=media, programmes=progs, approved=[progs[2], progs[3]],
                 audio=[wav, wav, wav[:44], wav[:44] + bytes(range(256)) * 8, b"ID3" + wav],
                 logout_tokens=logout)


# ---- grounding generated cases ----------------------------------------------------------------
CONTENT_KEYS = ("media", "programme", "text")
ENUMS: dict[str, list[Any]] = {  # mostly valid values, some not
    "class": ["normal", "normal", "priority", "emergency", "background", "khẩn cấp", 2],
    "policy": ["resume", "resume", "skip", "overlay", "never"],
}
COMMAND_ARGS: dict[str, list[Any]] = {  # device commands: valid args and near misses
    "volume": [{"volume": 70}, {"volume": 101}, {}],
    "power": [{"on": True}, {"on": False, "steps": [{"relay": 1, "delay_s": 30}]}, {"on": 1}],
    "play": [{"url": "http://127.0.0.1:1/streams/T01.opus"}, {"url": "file:///etc/passwd"}],
    "display": [{"text": "Thông báo"}, {}],
    "emergency": [{}, {"text": "Bão"}],
}
SCHEDULE_VALUES: dict[str, list[Any]] = {
    "time": ["05:00", "17:30", "23:59:30", "24:00"],
    "date": ["2030-01-01", "2026-02-29", "hôm nay"],
    "from": ["2030-01-01", None],
    "until": ["2030-12-31", "2029-01-01", None],
    "tz": ["Asia/Ho_Chi_Minh", "UTC", "Sao/Hoa"],
    "weekdays": [["mon", "fri"], ["sun"], ["mon", "mon"], []],
}


def ground(case: Any, seeds: Seeds, draw: Callable[[st.SearchStrategy[Any]], Any]) -> None:
    """Swap generated identifiers for real ones (decided by Hypothesis: reproducible)."""
    path = case.operation.path
    params = case.path_parameters or {}
    codes = st.one_of(st.sampled_from(seeds.inside), st.sampled_from(seeds.inside),
                      st.sampled_from(seeds.codes))
    if "id" in params:
        kind = path.split("/")[3]
        pool = seeds.ids.get(kind, [])
        if pool and draw(st.booleans()):
            params["id"] = draw(st.sampled_from(pool))
    if "batch" in params and draw(st.booleans()):
        params["batch"] = draw(st.sampled_from(seeds.batches))
    if "code" in params and draw(st.booleans()):
        params["code"] = draw(codes)
    body = case.body
    if not isinstance(body, dict) or not draw(st.booleans()):
        return
    if "targets" in body:
        body["targets"] = draw(st.lists(codes, min_size=1, max_size=3))
    for key in ("area", "parent"):
        if key in body:
            body[key] = draw(codes)
    if "media" in body:
        body["media"] = draw(st.sampled_from(seeds.media))
    if "items" in body:
        body["items"] = draw(st.lists(st.sampled_from(seeds.media), min_size=1, max_size=3))
    if "programme" in body:
        body["programme"] = draw(st.sampled_from(seeds.programmes))
    for key, values in ENUMS.items():
        if key in body:
            body[key] = draw(st.sampled_from(values))
    if path == "/api/v1/media" and "file" in body:
        body["file"] = draw(st.sampled_from(seeds.audio))
    if "text" in body and isinstance(body["text"], str):
        body["text"] = body["text"][:200]  # espeak-ng on 5,000 random characters: seconds
    if path == "/api/v1/broadcasts":  # exactly one content, mostly an approved programme
        for k in CONTENT_KEYS:
            body.pop(k, None)
        content = draw(st.sampled_from(["programme", "programme", "media", "text"]))
        body[content] = draw(st.sampled_from({
            "programme": seeds.approved, "media": seeds.media,
            "text": ["xin chào", "  ", "Thông báo khẩn"]}[content]))
    if "command" in body and isinstance(body["command"], str) and body["command"] in COMMAND_ARGS:
        body["args"] = draw(st.sampled_from(COMMAND_ARGS[body["command"]]))
    if path == "/api/v1/schedules":
        for key, values in SCHEDULE_VALUES.items():
            if key in body or key == "time":
                body[key] = draw(st.sampled_from(values))


# ---- the run ------------------------------------------------------------------------------------
@dataclass
class Finding:
    operation: str
    mode: str
    check: str
    request: str
    status: int | None
    message: str
    server_log: list[str]

    @property
    def signature(self) -> str:
        """What distinguishes one bug from another: the operation, the check and the server's
        exception (last traceback line) or the error the server answered."""
        cause = ""
        for line in reversed("\n".join(self.server_log).splitlines()):
            if line and not line.startswith(" "):
                cause = line.strip()
                break
        if not cause:
            m = re.search(r'`(\{"error".*?\})`', self.message)
            cause = m.group(1) if m else self.message.splitlines()[0] if self.message else ""
        return f"{self.operation} {self.check} {self.status} {cause[:300]}"

    def __str__(self) -> str:
        logs = "\n".join(self.server_log) or "(no server log)"
        return (f"--- {self.operation} [{self.mode}] {self.check}: status {self.status}\n"
                f"{self.request}\n{self.message}\n{logs}")


def is_known(f: Finding) -> bool:
    return f.check == "not_a_server_error" and any(
        f.operation == op and re.search(rx, f.signature) for op, rx in KNOWN_5XX)


def report(findings: list[Finding]) -> str:
    """One example per distinct bug, with how often it happened."""
    groups: dict[str, list[Finding]] = {}
    for f in findings:
        groups.setdefault(f.signature, []).append(f)
    return "\n\n".join(f"=== {len(fs)}x {sig}\n{fs[0]}" for sig, fs in groups.items())


def describe(case: Any, prepared: requests.PreparedRequest | None) -> str:
    if prepared is None:
        return f"{case.method} {case.formatted_path} body={case.body!r}"
    body = prepared.body
    if isinstance(body, bytes):
        body = body[:600]
    elif isinstance(body, str):
        body = body[:600]
    ctype = prepared.headers.get("Content-Type")
    return f"{prepared.method!s} {prepared.url!s}\nContent-Type: {ctype!r}\nbody: {body!r}"


class Fuzzer:
    """Blocking: runs in a worker thread while the server runs on the event loop."""

    def __init__(self, base_url: str, token: str, seeds: Seeds, errors: ServerErrors,
                 checks: list[Any]) -> None:
        self.base_url = base_url
        self.token = token
        self.seeds = seeds
        self.errors = errors
        self.checks = checks
        self.session = requests.Session()
        self.findings: list[Finding] = []
        self.statuses: dict[str, dict[int, int]] = {}
        self.no_negative: list[str] = []
        self._logout = iter(seeds.logout_tokens)
        self._last_logout = seeds.logout_tokens[-1]

    def bearer(self, label: str) -> str:
        if label not in LOGOUT:
            return self.token
        # revoke a token minted for it, never the fuzzing one
        self._last_logout = next(self._logout, self._last_logout)
        return self._last_logout

    def send(self, case: Any, label: str, mode: GenerationMode) -> None:
        headers = {"Authorization": f"Bearer {self.bearer(label)}"}
        # Negative cases often mutate the Authorization header: test_api.py covers missing and
        # forged tokens; here every case is sent as the caller to reach the handlers.
        case.headers = {**(case.headers or {}), **headers}
        self.errors.take()
        try:
            response = case.call(base_url=self.base_url, session=self.session, headers=headers,
                                 timeout=HTTP_TIMEOUT)
        except requests.RequestException as e:
            self.findings.append(Finding(label, mode.value, "transport",
                                         describe(case, getattr(e, "request", None)), None,
                                         repr(e), self.errors.take()))
            return
        seen = self.statuses.setdefault(label, {})
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        for check in self.checks:
            if check is status_code_conformance and response.status_code >= 500 \
                    and not_a_server_error in self.checks:
                continue  # already reported as a server error
            try:
                case.validate_response(response, checks=[check], headers=headers)
            except (FailureGroup, AssertionError) as e:  # the check failed
                self.findings.append(Finding(label, mode.value, check.__name__,
                                             describe(case, response.request),
                                             response.status_code, str(e)[:1500],
                                             self.errors.take()))

    def operation(self, op: Any, mode: GenerationMode, examples: int) -> None:
        label = f"{op.method.upper()} {op.path}"

        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck), print_blob=False)
        @given(case=op.as_strategy(generation_mode=mode), data=st.data())
        def run(case: Any, data: st.DataObject) -> None:
            ground(case, self.seeds, data.draw)
            self.send(case, label, mode)

        try:
            run()
        except Unsatisfiable:
            # nothing in this operation can be made invalid (no parameters, no body, no auth)
            assert mode is GenerationMode.NEGATIVE, label
            self.no_negative.append(label)

    def run(self) -> None:
        schema = schemathesis.openapi.from_url(f"{self.base_url}/api/v1/openapi.json",
                                               timeout=10)
        operations = []
        for r in schema.get_all_operations():
            assert isinstance(r, Ok), f"the document has an invalid operation: {r.err()!r}"
            operations.append(r.ok())
        assert len(operations) >= 40, [op.label for op in operations]
        # deletions last, so the seeded records serve every other operation first
        operations.sort(key=lambda op: op.method.upper() == "DELETE")
        try:
            for op in operations:
                label = f"{op.method.upper()} {op.path}"
                if label in STREAMING:
                    continue
                for mode, examples in EXAMPLES.items():
                    self.operation(op, mode, min(examples, SLOW_OPERATIONS.get(label, examples)))
        finally:
            self.session.close()


@pytest.mark.parametrize("caller", sorted(CALLERS))
async def test_api_never_answers_5xx_and_documents_its_codes(tmp_path, server_errors, caller,
                                                              fixed_generation):
    cfg = make_config(tmp_path, max_mb=2, max_seconds=120)
    async with running_api(cfg) as api:
        who = CALLERS[caller]
        password = PASSWORD
        if who == "admin":
            assert api.node.bootstrap_password
            password = api.node.bootstrap_password
            admin = (await api.node.store.find("user", username="admin"))[0]
            assert admin["role"] == "admin" and admin["area"] == "T01" and admin["emergency"]
        seeds = await seed(api, tmp_path, who, password)
        server = api.client.server
        base_url = f"http://{server.host}:{server.port}"
        assert server.host == "127.0.0.1"
        fuzzer = Fuzzer(base_url, api.tokens[who], seeds, server_errors,
                        [not_a_server_error, status_code_conformance])
        await asyncio.to_thread(fuzzer.run)
        findings, statuses = fuzzer.findings, fuzzer.statuses
        # the fuzzing token still works: every operation was really exercised as the caller
        status, me = await api.call(who, "GET", "/api/v1/me")
        assert status == 200 and me["username"] == who
    known = [f for f in findings if is_known(f)]
    new = [f for f in findings if not is_known(f)]
    print(json.dumps({"caller": who, "statuses": statuses, "no_negative": fuzzer.no_negative,
                      "known_5xx": sorted({f.signature for f in known})}, sort_keys=True))
    assert not new, f"{len(new)} findings\n{report(new)}"
    # the generator reached past authentication and validation on the main operations
    assert any(c in (200, 201, 204) for c in statuses["POST /api/v1/broadcasts"]), statuses


# ---- the 5xx found (and fixed), one exact request each ------------------------------------------
# Each case must answer 4xx (any 4xx: the fix chooses) and change nothing.
MULTIPART = "multipart/form-data; boundary=XX"


def part(headers: bytes, value: bytes = b"v") -> bytes:
    return b"--XX\r\n" + headers + b"\r\n\r\n" + value + b"\r\n--XX--\r\n"


@dataclass
class RawCase:
    method: str
    path: str
    content_type: str | None
    body: bytes
    who: str | None = "qtv1"  # admin of district T01-H1; None: no token


def raw_json(text: str) -> bytes:
    """JSON text as sent: `\\ud800` stays an escape, which json.loads turns into a lone
    surrogate."""
    return text.encode()


KNOWN_BUGS: dict[str, tuple[RawCase, str]] = {
    # web/api/media.py upload(): aiohttp's multipart reader raises InvalidHeader / ValueError /
    # LookupError, none of which error_middleware maps -> 500.
    "multipart-control-char-in-part-name": (RawCase(
        "POST", "/api/v1/media", MULTIPART,
        part(b'Content-Disposition: form-data; name="a\x0fb"')),
        "InvalidHeader from BodyPartReader headers"),
    "multipart-no-boundary": (RawCase(
        "POST", "/api/v1/media", "multipart/form-data",
        part(b'Content-Disposition: form-data; name="file"')),
        "ValueError: boundary missed"),
    "multipart-boundary-too-long": (RawCase(
        "POST", "/api/v1/media", "multipart/form-data; boundary=" + "X" * 100,
        b"--" + b"X" * 100 + b"--\r\n"), "ValueError: boundary is too long"),
    "multipart-no-starting-boundary": (RawCase(
        "POST", "/api/v1/media", MULTIPART, b"garbage"),
        "ValueError: Could not find starting boundary"),
    "multipart-truncated": (RawCase(
        "POST", "/api/v1/media", MULTIPART,
        b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF'),
        "ValueError: Reading after EOF"),
    "multipart-unknown-charset": (RawCase(
        "POST", "/api/v1/media", MULTIPART,
        part(b'Content-Disposition: form-data; name="title"\r\n'
             b'Content-Type: text/plain; charset=nope')),
        "LookupError: unknown encoding (part.text())"),
    "multipart-title-not-utf8": (RawCase(
        "POST", "/api/v1/media", MULTIPART,
        part(b'Content-Disposition: form-data; name="title"', b"\xff\xfe")),
        "UnicodeDecodeError (part.text())"),
    # web/http.py read_json(): json.loads raises RecursionError / ValueError (int digits limit)
    # that are not JSONDecodeError -> 500.
    "json-deep-nesting": (RawCase(
        "POST", "/api/v1/programmes", "application/json",
        b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "RecursionError in json.loads"),
    "json-huge-integer": (RawCase(
        "POST", "/api/v1/programmes", "application/json",
        b'{"title":"t","type":"tts","text":"x","volume":' + b"9" * 5000 + b"}"),
        "ValueError: Exceeds the limit (4300 digits) for integer string conversion"),
    # read_json() accepts lone surrogates; the store cannot encode them -> 500.
    "json-lone-surrogate": (RawCase(
        "POST", "/api/v1/programmes", "application/json",
        raw_json('{"title":"t\\ud800","type":"tts","text":"xin chào"}')),
        "UnicodeEncodeError in store_sqlite._set_record"),
    "json-lone-surrogate-login": (RawCase(
        "POST", "/api/v1/auth/token", "application/json",
        raw_json('{"username":"\\ud800","password":"mat-khau-123"}'), who=None),
        "UnicodeEncodeError in the store lookup: a 500 for anyone, no token needed"),
    "json-lone-surrogate-area-rename": (RawCase(
        "PATCH", "/api/v1/areas/T01-H1-X1", "application/json",
        raw_json('{"name":"x\\ud800"}')),
        "UnicodeEncodeError in the store write, after tree.update() renamed it in memory"),
    # web/api/media.py tts(): an unknown voice is the caller's error, not 503.
    "tts-unknown-voice": (RawCase(
        "POST", "/api/v1/tts", "application/json",
        raw_json('{"text":"xin chào","voice":"zz-khong-co"}')),
        "TtsError from espeak-ng -> 503"),
}


@pytest.mark.parametrize("name", list(KNOWN_BUGS))
async def test_former_5xx_answer_4xx(tmp_path, name):
    case, _ = KNOWN_BUGS[name]
    async with running_api(make_config(tmp_path, max_mb=1, max_seconds=60)) as api:
        before = {k: await api.node.store.count(k) for k in ("programme", "media", "area")}
        headers = api.auth(case.who)
        if case.content_type:
            headers["Content-Type"] = case.content_type
        r = await api.client.request(case.method, case.path, data=case.body, headers=headers)
        body = await r.text()
        after = {k: await api.node.store.count(k) for k in before}
    assert after == before
    assert 400 <= r.status < 500, (r.status, body)


# web/api/core.py area_create() adds the area to the in-memory tree before the store write and
# before engine.add_area(); streamer/engine.py on_air() indexes engine.areas with a code of the
# tree. Any area the engine has not taken yet (before the next tick; never, when the request
# failed after tree.add) makes GET /api/v1/broadcasts 500 for every caller above it.
AREA_CASES: dict[str, tuple[dict[str, str], bool, str]] = {
    "engine-area-not-yet-added": ({"code": "T01-H1-X4", "name": "Xã 4"}, False,
                                  "on_air KeyError until the media thread adds the area"),
    "area-code-with-spaces": ({"code": " T01-H1-X5 ", "name": "Xã 5"}, True,
                              "tree.add strips the code, area_record() does not: 422 after "
                              "the tree took it; the engine never does"),
    "area-name-lone-surrogate": ({"code": "T01-H1-X6", "name": "\ud800"}, True,
                                 "store write fails after tree.add: 500, tree keeps it"),
}


@pytest.mark.parametrize("name", list(AREA_CASES))
async def test_area_changes_never_break_the_broadcast_list(tmp_path, name):
    fields, tick, _ = AREA_CASES[name]
    async with running_api(make_config(tmp_path)) as api:
        data = json.dumps({**fields, "parent": "T01-H1"}).encode()
        r = await api.client.post("/api/v1/areas", data=data, headers={
            **api.auth("qtv1"), "Content-Type": "application/json"})
        created = r.status == 201
        assert created or 400 <= r.status < 500, await r.text()
        code = fields["code"].strip()
        # an area is everywhere (tree, store) or nowhere
        assert (code in api.node.tree) == created
        assert (await api.node.store.get("area", code) is not None) == created
        if tick:
            api.run(0.1)
        status, body = await api.call("huyen1", "GET", "/api/v1/broadcasts")
        assert status == 200, body
        if created:
            assert code in [a["area"] for a in body["areas"]]


# web/api/mounts.py _rtp(): an empty `rtp` object or `sdp` string asks for no RTP at all; it
# reached an assert (500) before it was refused with 422.
@pytest.mark.parametrize("extra", [{"rtp": {}}, {"sdp": ""}])
async def test_a_mount_with_an_empty_rtp_or_sdp_is_refused(tmp_path, extra):
    async with running_api(make_config(tmp_path)) as api:
        status, body = await api.call("qtv1", "POST", "/api/v1/mounts",
                                      json={"name": "rong", **extra})
        assert status == 422 and body["field"] in ("rtp", "sdp"), body
        assert not await api.node.store.find("mount")
