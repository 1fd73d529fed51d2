"""Every text an operator, an official or a device maker reads, in one catalogue.

Vietnamese first, English second. `say` renders "vi / en", the form the API, the logs and the
devices show; `CATALOGUE` is what the console reads to show one language. Keys are
"<concept>.<what>"; parameters are named in both languages' text where they belong.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Text(NamedTuple):
    vi: str
    en: str


CATALOGUE: dict[str, Text] = {
    # areas
    "area.unknown": Text("không có khu vực", "unknown area {area}"),
}


def say(key: str, **params: Any) -> str:
    """The bilingual text of `key` with `params` filled in ("vi / en")."""
    text = CATALOGUE[key]
    return f"{text.vi.format(**params)} / {text.en.format(**params)}"
