"""The OpenAPI 3 document of /api/v1, served at /api/v1/openapi.json.

Written by hand next to the handlers; tests/test_api.py checks that every route is documented and
every documented path exists, and schemathesis drives the whole API from this document.
"""

from __future__ import annotations

from aiohttp import web

from loa.web.api.schema import (
    CODE,
    CODE_PARAM,
    CODES,
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
    "type": {"type": "string", "enum": ["file", "playlist", "tts", "relay", "live"]},
    "media": STR, "items": {"type": "array", "items": STR},
    "text": STR, "url": STR, "area": CODE,
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


def document() -> S:
    secured: S = {"security": [{"bearer": []}]}
    paths: S = {
        "/api/v1/auth/token": {
            "post": {"summary": "Đăng nhập / log in: a bearer token", "security": [],
                     "requestBody": body(obj({"username": STR, "password": STR},
                                             ["username", "password"])),
                     "responses": responses(201, 400, 401, 415, 422, 429)},
            "delete": {"summary": "Đăng xuất / revoke this token", **secured,
                       "responses": responses(204, 401)},
        },
        "/api/v1/me": {"get": {"summary": "The caller", **secured, "responses": responses(*READ)}},
        "/api/v1/auth/session": {
            "post": {"summary": "Đăng nhập bảng điều khiển / console log in: an HttpOnly session "
                                "cookie (loa_session) and its CSRF value", "security": [],
                     "requestBody": body(obj({"username": STR, "password": STR},
                                             ["username", "password"])),
                     "responses": responses(200, 400, 401, 415, 422, 429)},
            "delete": {"summary": "Đăng xuất / end this session (or token), clear the cookie",
                       **secured, "responses": responses(204, 401, 403)},
        },
        "/api/v1/auth/me": {"get": {"summary": "Người dùng, khu vực, quyền / the caller, its "
                                               "area path, rights and CSRF value", **secured,
                                    "responses": responses(*READ)}},
        "/api/v1/auth/password": {
            "post": {"summary": "Đổi mật khẩu / change one's password; ends every other session",
                     **secured,
                     "requestBody": body(obj({"current": STR, "new": STR}, ["current", "new"])),
                     "responses": responses(204, *WRITE)},
        },
        "/api/v1/events": {"get": {"summary": "Sự kiện trực tiếp / live events of the caller's "
                                              "scope (text/event-stream)", **secured,
                                   "responses": responses(*READ)}},
        "/api/v1/overview": {
            "get": {"summary": "Tổng quan / one level of the area tree: on air, devices, today, "
                               "emergencies, faults", **secured,
                    "parameters": [{"name": "root", "in": "query", "required": False,
                                    "schema": CODE}],
                    "responses": responses(*READ, 404)},
        },
        "/api/v1/areas": {
            "get": {"summary": "Cây khu vực / the caller's area subtree", **secured,
                    "responses": responses(*READ)},
            "post": {"summary": "Tạo khu vực / create an area (admin)", **secured,
                     "requestBody": body(obj({"code": CODE, "name": STR, "level": STR,
                                              "parent": CODE}, ["code", "name", "parent"])),
                     "responses": responses(201, 409, *WRITE)},
        },
        "/api/v1/areas/import": {
            "post": {"summary": "Nhập danh mục đơn vị hành chính / import the official list "
                                "(CSV code,name,level,parent_code)", **secured,
                     "requestBody": body({"type": "string"}, "text/csv"),
                     "responses": responses(201, 413, *WRITE)},
        },
        "/api/v1/areas/{code}": {
            "parameters": [CODE_PARAM],
            "get": {"summary": "Một khu vực / one area", **secured,
                    "responses": responses(*READ, 404)},
            "patch": {"summary": "Sửa khu vực / rename an area", **secured,
                      "requestBody": body(obj({"name": STR, "level": STR})),
                      "responses": responses(200, 404, *WRITE)},
        },
        "/api/v1/users": {
            "get": {"summary": "Người dùng / users of the subtree (admin)", **secured,
                    "responses": responses(*READ)},
            "post": {"summary": "Tạo người dùng / create a user (admin)", **secured,
                     "requestBody": body(obj({
                         "username": STR, "role": {"type": "string", "enum": [
                             "admin", "approver", "editor", "operator", "viewer"]},
                         "area": CODE, "password": STR, "emergency": {"type": "boolean"},
                     }, ["username", "role", "area"])),
                     "responses": responses(201, 409, *WRITE)},
        },
        "/api/v1/users/{id}": {
            "parameters": [ID_PARAM],
            "patch": {"summary": "Sửa người dùng / change role, password, disable", **secured,
                      "requestBody": body(obj({"role": STR, "password": STR,
                                               "disabled": {"type": "boolean"},
                                               "emergency": {"type": "boolean"}})),
                      "responses": responses(200, 404, *WRITE)},
        },
        "/api/v1/audit": {
            "get": {"summary": "Nhật ký thao tác / audit log (admin)", **secured,
                    "parameters": RANGE_PARAMS[:2], "responses": responses(*READ, 422)},
        },
        "/api/v1/media": {
            "get": {"summary": "Thư viện âm thanh / media library", **secured,
                    "responses": responses(*READ)},
            "post": {"summary": "Tải lên / upload audio (decoded, normalised, stored once)",
                     **secured,
                     "requestBody": body(obj({"file": {"type": "string", "format": "binary"},
                                              "title": STR, "area": CODE}, ["file"]),
                                         "multipart/form-data"),
                     "responses": responses(201, 413, 507, *WRITE)},
        },
        "/api/v1/media/{id}": {
            "parameters": [ID_PARAM],
            "get": {"summary": "Một tệp / one media item", **secured,
                    "responses": responses(*READ, 404)},
            "delete": {"summary": "Xoá / delete", **secured,
                       "responses": responses(204, 401, 403, 404, 409)},
        },
        "/api/v1/tts": {
            "post": {"summary": "Chuyển văn bản thành giọng nói / text to speech", **secured,
                     "requestBody": body(obj({"text": {"type": "string", "maxLength": 5000},
                                              "voice": STR}, ["text"])),
                     "responses": responses(201, 503, 507, *WRITE)},
        },
        "/api/v1/programmes": {
            "get": {"summary": "Chương trình / programmes", **secured,
                    "parameters": [{"name": "status", "in": "query", "schema": {
                        "type": "string", "enum": ["draft", "pending", "approved", "rejected"]}}],
                    "responses": responses(*READ)},
            "post": {"summary": "Tạo chương trình / create a programme", **secured,
                     "requestBody": body(PROGRAMME), "responses": responses(201, *WRITE)},
        },
        "/api/v1/programmes/{id}": {
            "parameters": [ID_PARAM],
            "get": {"summary": "Một chương trình", **secured, "responses": responses(*READ, 404)},
            "patch": {"summary": "Sửa (về nháp) / edit (back to draft)", **secured,
                      "requestBody": body(obj(PROGRAMME["properties"])),
                      "responses": responses(200, 404, *WRITE)},
        },
        **{f"/api/v1/programmes/{{id}}/{action}": {
            "parameters": [ID_PARAM],
            "post": {"summary": summary, **secured,
                     **({"requestBody": body(obj({"reason": STR}, ["reason"]))}
                        if action == "reject" else {}),
                     "responses": responses(200, 404, 409, *WRITE)},
        } for action, summary in (("submit", "Gửi duyệt / submit for approval"),
                                  ("approve", "Duyệt / approve"),
                                  ("reject", "Từ chối / reject with a reason"))},
        "/api/v1/schedules": {
            "get": {"summary": "Lịch phát / schedules", **secured, "responses": responses(*READ)},
            "post": {"summary": "Đặt lịch / schedule a programme (conflicts are reported)",
                     **secured, "requestBody": body(SCHEDULE),
                     "responses": responses(201, 409, *WRITE)},
        },
        "/api/v1/schedules/{id}": {
            "parameters": [ID_PARAM],
            "delete": {"summary": "Xoá lịch / delete", **secured,
                       "responses": responses(204, 401, 403, 404)},
        },
        "/api/v1/broadcasts": {
            "get": {"summary": "Đang phát / what is on air per area and why", **secured,
                    "responses": responses(*READ)},
            "post": {"summary": "Phát ngay / start a broadcast", **secured,
                     "requestBody": body(BROADCAST),
                     "responses": responses(201, 404, 409, *WRITE)},
        },
        "/api/v1/broadcasts/{id}": {
            "parameters": [ID_PARAM],
            "delete": {"summary": "Dừng / stop (the issuer's authority or above)", **secured,
                       "responses": responses(204, 401, 403, 404)},
        },
        "/api/v1/reports/asrun": {
            "get": {"summary": "Nhật ký phát sóng / as-run log (JSON or CSV)", **secured,
                    "parameters": [*RANGE_PARAMS, {"name": "format", "in": "query",
                                                   "schema": {"type": "string",
                                                              "enum": ["json", "csv"]}}],
                    "responses": responses(*READ, 422)},
        },
        "/api/v1/reports/summary": {
            "get": {"summary": "Báo cáo / hours on air per area and class, bulletins per day",
                    **secured, "parameters": RANGE_PARAMS, "responses": responses(*READ, 422)},
        },
    }
    from loa.web.api import devices as api_devices

    paths.update(api_devices.openapi_paths())
    from loa.web import monitor
    from loa.web.api import emergency as api_emergency

    paths.update(monitor.openapi_paths())
    paths.update(api_emergency.openapi_paths())
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
