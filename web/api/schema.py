"""The OpenAPI vocabulary the route modules describe themselves with (loa.web.openapi builds
the document from their descriptions)."""

from __future__ import annotations

from typing import Any

S = dict[str, Any]

CODES = ["emergency", "priority", "normal", "background"]


def obj(props: S, required: list[str] | None = None) -> S:
    out: S = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    return out


STR: S = {"type": "string"}
CODE: S = {"type": "string", "minLength": 1, "maxLength": 64}
TARGETS: S = {"type": "array", "items": CODE, "minItems": 1}
ERROR: S = obj({"error": STR, "field": STR}, ["error"])


def body(schema: S, ctype: str = "application/json") -> S:
    return {"required": True, "content": {ctype: {"schema": schema}}}


def responses(*codes: int, created: bool = False) -> S:
    out: S = {}
    for c in codes:
        desc = {200: "OK", 201: "Created", 204: "No Content", 304: "Not modified (ETag)",
                400: "Malformed request",
                401: "Not authenticated", 403: "Forbidden", 404: "Not found", 409: "Conflict",
                413: "Too large", 415: "Unsupported media type", 422: "Invalid field",
                429: "Too many requests", 503: "Unavailable", 507: "Disk full"}[c]
        entry: S = {"description": desc}
        if c >= 400:
            entry["content"] = {"application/json": {"schema": ERROR}}
        elif c in (200, 201):
            entry["content"] = {"application/json": {"schema": {"type": "object"}}}
        out[str(c)] = entry
    return out


ID_PARAM: S = {"name": "id", "in": "path", "required": True, "schema": STR}
CODE_PARAM: S = {"name": "code", "in": "path", "required": True, "schema": CODE}
RANGE_PARAMS: list[S] = [
    {"name": "from", "in": "query", "schema": STR, "description": "epoch seconds or ISO 8601"},
    {"name": "to", "in": "query", "schema": STR},
    {"name": "area", "in": "query", "schema": CODE},
]

READ = (200, 401, 403)
WRITE = (400, 401, 403, 415, 422)
