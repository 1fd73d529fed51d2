"""The OpenAPI 3 document of /api/v1, served at /api/v1/openapi.json.

Written by hand next to the handlers; tests/test_api.py checks that every route is documented and
every documented path exists, and schemathesis drives the whole API from this document.
"""

from __future__ import annotations

from aiohttp import web

from loa.streamer.messages import say
from loa.web.api.schema import (
    CODE,
    CODE_PARAM,
    CODES,
    ERROR,
    ID_PARAM,
    RANGE_PARAMS,
    READ,
    STR,
    TARGETS,
    WRITE,
    S,
    body,
    obj,
    responses,
)

PROGRAMME: S = obj({
    "title": {"type": "string", "minLength": 1, "maxLength": 200},
    "type": {"type": "string", "enum": ["file", "playlist", "tts", "relay", "live", "ingest"]},
    "media": STR, "items": {"type": "array", "items": STR},
    "text": STR, "url": STR, "area": CODE, "mount": STR,
    "volume": {"type": "integer", "minimum": 0, "maximum": 150},
    "repeat": {"type": "integer", "minimum": 1, "maximum": 10},
    "gap": {"type": "number", "minimum": 0, "maximum": 7200},
}, ["title", "type"])

SCHEDULE: S = obj({
    "programme": STR, "targets": TARGETS, "class": {"type": "string", "enum": CODES},
    "kind": {"type": "string", "enum": ["once", "daily", "weekly"]},
    "time": {"type": "string", "example": "05:00"},
    "date": {"type": "string", "example": "2026-12-01"},
    "weekdays": {"type": "array", "items": {"type": "string", "enum": [
        "mon", "tue", "wed", "thu", "fri", "sat", "sun"]}},
    "from": STR, "until": STR, "tz": {"type": "string", "example": "Asia/Ho_Chi_Minh"},
    "enabled": {"type": "boolean"},
}, ["programme", "targets", "kind", "time"])

BROADCAST: S = obj({
    "media": STR, "programme": STR, "text": {"type": "string", "maxLength": 5000},
    "targets": TARGETS, "class": {"type": "string", "enum": CODES},
    "policy": {"type": "string", "enum": ["resume", "skip", "overlay"]},
}, ["targets"])


CLASS_PARAM: S = {"name": "class", "in": "query", "schema": {"type": "string", "enum": CODES}}
AUDIO: S = {code: {"description": desc, "content": {"audio/wav": {"schema": {
    "type": "string", "format": "binary"}}}} for code, desc in (("200", "OK"),
                                                                ("206", "Partial content"))}
AUDIO["416"] = {"description": "Range not satisfiable",
                "content": {"application/json": {"schema": ERROR}}}


def document() -> S:
    secured: S = {"security": [{"bearer": []}]}
    paths: S = {
        "/api/v1/auth/token": {
            "post": {"summary": say("openapi.login"), "security": [],
                     "requestBody": body(obj({"username": STR, "password": STR},
                                             ["username", "password"])),
                     "responses": responses(201, 400, 401, 415, 422, 429)},
            "delete": {"summary": say("openapi.logout"), **secured,
                       "responses": responses(204, 401)},
        },
        "/api/v1/me": {"get": {"summary": "The caller", **secured, "responses": responses(*READ)}},
        "/api/v1/auth/session": {
            "post": {"summary": say("openapi.session_login"), "security": [],
                     "requestBody": body(obj({"username": STR, "password": STR},
                                             ["username", "password"])),
                     "responses": responses(200, 400, 401, 415, 422, 429)},
            "delete": {"summary": say("openapi.session_logout"),
                       **secured, "responses": responses(204, 401, 403)},
        },
        "/api/v1/auth/me": {"get": {"summary": say("openapi.auth_me"), **secured,
                                    "responses": responses(*READ)}},
        "/api/v1/auth/password": {
            "post": {"summary": say("openapi.password"),
                     **secured,
                     "requestBody": body(obj({"current": STR, "new": STR}, ["current", "new"])),
                     "responses": responses(204, *WRITE)},
        },
        "/api/v1/events": {"get": {"summary": say("openapi.events"), **secured,
                                   "responses": responses(*READ)}},
        "/api/v1/overview": {
            "get": {"summary": say("openapi.overview"), **secured,
                    "parameters": [{"name": "root", "in": "query", "required": False,
                                    "schema": CODE}],
                    "responses": responses(*READ, 404)},
        },
        "/api/v1/areas": {
            "get": {"summary": say("openapi.areas"), **secured,
                    "parameters": [
                        {"name": "parent", "in": "query", "required": False, "schema": CODE},
                        {"name": "q", "in": "query", "required": False,
                         "schema": {"type": "string", "minLength": 1, "maxLength": 100}},
                        {"name": "limit", "in": "query", "required": False,
                         "schema": {"type": "integer", "minimum": 1, "maximum": 500}}],
                    "responses": responses(*READ, 304, 404, 422)},
            "post": {"summary": say("openapi.area_create"), **secured,
                     "requestBody": body(obj({"code": CODE, "name": STR, "level": STR,
                                              "parent": CODE}, ["code", "name", "parent"])),
                     "responses": responses(201, 409, *WRITE)},
        },
        "/api/v1/areas/import": {
            "post": {"summary": say("openapi.area_import"), **secured,
                     "parameters": [{"name": "dry_run", "in": "query", "required": False,
                                     "description": "1: check every row, store nothing",
                                     "schema": {"type": "string", "enum": ["0", "1"]}}],
                     "requestBody": body({"type": "string"}, "text/csv"),
                     "responses": responses(200, 201, 413, *WRITE)},
        },
        "/api/v1/areas/{code}": {
            "parameters": [CODE_PARAM],
            "get": {"summary": say("openapi.area"), **secured,
                    "responses": responses(*READ, 404)},
            "patch": {"summary": say("openapi.area_update"), **secured,
                      "requestBody": body(obj({"name": STR, "level": STR})),
                      "responses": responses(200, 404, *WRITE)},
        },
        "/api/v1/users": {
            "get": {"summary": say("openapi.users"), **secured,
                    "responses": responses(*READ)},
            "post": {"summary": say("openapi.user_create"), **secured,
                     "requestBody": body(obj({
                         "username": STR, "role": {"type": "string", "enum": [
                             "admin", "approver", "editor", "operator", "viewer"]},
                         "area": CODE, "password": STR, "emergency": {"type": "boolean"},
                     }, ["username", "role", "area"])),
                     "responses": responses(201, 409, *WRITE)},
        },
        "/api/v1/users/{id}": {
            "parameters": [ID_PARAM],
            "patch": {"summary": say("openapi.user_update"), **secured,
                      "requestBody": body(obj({"role": STR, "password": STR,
                                               "disabled": {"type": "boolean"},
                                               "emergency": {"type": "boolean"}})),
                      "responses": responses(200, 404, *WRITE)},
        },
        "/api/v1/users/{id}/password": {
            "parameters": [ID_PARAM],
            "post": {"summary": say("openapi.user_password_reset"), **secured,
                     "responses": responses(200, 401, 403, 404)},
        },
        "/api/v1/audit": {
            "get": {"summary": say("openapi.audit"), **secured,
                    "parameters": [*RANGE_PARAMS[:2],
                                   {"name": "user", "in": "query", "schema": STR},
                                   {"name": "action", "in": "query", "schema": STR},
                                   {"name": "limit", "in": "query", "schema": {
                                       "type": "integer", "minimum": 1, "maximum": 1000}},
                                   {"name": "before", "in": "query", "schema": {
                                       "type": "integer", "minimum": 1}}],
                    "responses": responses(*READ, 422)},
        },
        "/api/v1/media": {
            "get": {"summary": say("openapi.media"), **secured,
                    "responses": responses(*READ)},
            "post": {"summary": say("openapi.media_upload"),
                     **secured,
                     "requestBody": body(obj({"file": {"type": "string", "format": "binary"},
                                              "title": STR, "area": CODE}, ["file"]),
                                         "multipart/form-data"),
                     "responses": responses(201, 413, 507, *WRITE)},
        },
        "/api/v1/media/{id}": {
            "parameters": [ID_PARAM],
            "get": {"summary": say("openapi.media_item"), **secured,
                    "responses": responses(*READ, 404)},
            "delete": {"summary": say("openapi.media_delete"), **secured,
                       "responses": responses(204, 401, 403, 404, 409)},
        },
        "/api/v1/media/{id}/audio": {
            "parameters": [ID_PARAM],
            "get": {"summary": say("openapi.media_audio"), **secured,
                    "parameters": [{"name": "Range", "in": "header", "required": False,
                                    "schema": {"type": "string", "example": "bytes=0-1023"}}],
                    "responses": {**responses(401, 403, 404), **AUDIO}},
        },
        "/api/v1/tts": {
            "post": {"summary": say("openapi.tts"), **secured,
                     "requestBody": body(obj({"text": {"type": "string", "maxLength": 5000},
                                              "voice": STR}, ["text"])),
                     "responses": responses(201, 503, 507, *WRITE)},
        },
        "/api/v1/programmes": {
            "get": {"summary": say("openapi.programmes"), **secured,
                    "parameters": [{"name": "status", "in": "query", "schema": {
                        "type": "string", "enum": ["draft", "pending", "approved", "rejected"]}},
                        {"name": "under", "in": "query", "schema": CODE,
                         "description": "only programmes of this area's subtree"}],
                    "responses": responses(*READ, 422)},
            "post": {"summary": say("openapi.programme_create"), **secured,
                     "requestBody": body(PROGRAMME), "responses": responses(201, *WRITE)},
        },
        "/api/v1/programmes/{id}": {
            "parameters": [ID_PARAM],
            "get": {"summary": "Một chương trình", **secured, "responses": responses(*READ, 404)},
            "patch": {"summary": say("openapi.programme_update"), **secured,
                      "requestBody": body(obj(PROGRAMME["properties"])),
                      "responses": responses(200, 404, *WRITE)},
        },
        **{f"/api/v1/programmes/{{id}}/{action}": {
            "parameters": [ID_PARAM],
            "post": {"summary": summary, **secured,
                     **({"requestBody": body(obj({"reason": STR}, ["reason"]))}
                        if action == "reject" else {}),
                     "responses": responses(200, 404, 409, *WRITE)},
        } for action, summary in (("submit", say("openapi.programme_submit")),
                                  ("approve", say("openapi.programme_approve")),
                                  ("reject", say("openapi.programme_reject")))},
        "/api/v1/schedules": {
            "get": {"summary": say("openapi.schedules"), **secured, "responses": responses(*READ)},
            "post": {"summary": say("openapi.schedule_create"),
                     **secured, "requestBody": body(SCHEDULE),
                     "parameters": [{"name": "dry_run", "in": "query", "required": False,
                                     "description": "1: check and report conflicts, store nothing",
                                     "schema": {"type": "string", "enum": ["0", "1"]}}],
                     "responses": responses(200, 201, 409, *WRITE)},
        },
        "/api/v1/schedules/calendar": {
            "get": {"summary": say("openapi.schedule_calendar"), **secured,
                    "parameters": [
                        {"name": "area", "in": "query", "required": False, "schema": CODE},
                        {"name": "from", "in": "query", "required": False,
                         "schema": {"type": "string", "format": "date"}},
                        {"name": "days", "in": "query", "required": False,
                         "schema": {"type": "integer", "minimum": 1, "maximum": 31}}],
                    "responses": responses(*READ, 422)},
        },
        "/api/v1/schedules/{id}": {
            "parameters": [ID_PARAM],
            "patch": {"summary": say("openapi.schedule_update"), **secured,
                      "requestBody": body(obj({"enabled": {"type": "boolean"}}, ["enabled"])),
                      "responses": responses(200, 404, *WRITE)},
            "delete": {"summary": say("openapi.schedule_delete"), **secured,
                       "responses": responses(204, 401, 403, 404)},
        },
        "/api/v1/broadcasts": {
            "get": {"summary": say("openapi.broadcasts"), **secured,
                    "responses": responses(*READ)},
            "post": {"summary": say("openapi.broadcast_start"), **secured,
                     "requestBody": body(BROADCAST),
                     "responses": responses(201, 404, 409, *WRITE)},
        },
        "/api/v1/broadcasts/{id}": {
            "parameters": [ID_PARAM],
            "get": {"summary": say("openapi.broadcast"), **secured,
                    "responses": responses(*READ, 404)},
            "delete": {"summary": say("openapi.broadcast_stop"), **secured,
                       "responses": responses(204, 401, 403, 404)},
        },
        "/api/v1/reports/asrun": {
            "get": {"summary": say("openapi.asrun"), **secured,
                    "parameters": [*RANGE_PARAMS, CLASS_PARAM,
                                   {"name": "format", "in": "query",
                                    "schema": {"type": "string", "enum": ["json", "csv"]}}],
                    "responses": responses(*READ, 422)},
        },
        "/api/v1/reports/summary": {
            "get": {"summary": say("openapi.summary"), **secured,
                    "parameters": [*RANGE_PARAMS, CLASS_PARAM],
                    "responses": responses(*READ, 422)},
        },
    }
    from loa.web.api import devices as api_devices

    paths.update(api_devices.openapi_paths())
    from loa.web import monitor
    from loa.web.api import emergency as api_emergency

    paths.update(monitor.openapi_paths())
    paths.update(api_emergency.openapi_paths())
    from loa.web.api import inbox as api_inbox

    paths.update(api_inbox.openapi_paths())
    from loa.web.api import nodes as api_nodes

    paths.update(api_nodes.openapi_paths())
    from loa.web.api import archive as api_archive

    paths.update(api_archive.openapi_paths())
    from loa.web.api import delivery as api_delivery

    paths.update(api_delivery.openapi_paths())
    from loa.web.api import geo as api_geo

    paths.update(api_geo.openapi_paths())
    from loa.web.api import firmware as api_firmware

    paths.update(api_firmware.openapi_paths())
    from loa.web.api import airtime as api_airtime

    paths.update(api_airtime.openapi_paths())
    from loa.web.api import contacts as api_contacts
    from loa.web.api import outages as api_outages

    paths.update(api_outages.openapi_paths())
    paths.update(api_contacts.openapi_paths())
    from loa.web.api import mounts as api_mounts

    paths.update(api_mounts.openapi_paths())
    return {
        "openapi": "3.0.3",
        "info": {"title": "Loa API", "version": "1",
                 "description": "Loa broadcast server. Every call needs a bearer token from "
                                "POST /api/v1/auth/token and acts within the caller's area."},
        "servers": [{"url": "/"}],
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }


async def serve(request: web.Request) -> web.Response:
    return web.json_response(document())


def setup(app: web.Application) -> None:
    app.router.add_get("/api/v1/openapi.json", serve)
