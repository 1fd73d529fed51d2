"""The base of Loa's own errors, and the kinds of refusal the API turns into statuses.

A domain error says *what kind* of refusal it is, never an HTTP status: web/http.py maps the kind
to a status in one place. Its text comes from the message catalogue (streamer/messages.py).
codecs/ stays a library apart (its OggError and MediaError are plain ValueErrors, translated by
the caller).
"""

from __future__ import annotations

from typing import Literal

Kind = Literal["invalid", "not_found", "forbidden", "conflict", "unavailable", "limit"]


class LoaError(Exception):
    """A refusal or failure an operator or a device maker reads: bilingual text, kind, field."""

    kind: Kind = "invalid"

    def __init__(self, message: str, *, kind: Kind | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind
        self.field = field
