"""The message catalogue: bilingual, well-formed, every key used and every used key present."""

import re
import string
from pathlib import Path

import pytest

from loa.streamer.errors import LoaError
from loa.streamer.messages import CATALOGUE, say

ROOT = Path(__file__).resolve().parent.parent
VIETNAMESE = re.compile("[àáảãạăắằẳẵặâấầẩẫậđèéẻẽẹêếềểễệìíỉĩịòóỏõọôốồổỗộơớờởỡợùúủũụưứừửữựỳýỷỹỵ]",
                        re.IGNORECASE)


def test_say_renders_vietnamese_then_english_with_the_parameters():
    assert say("area.unknown", area="X-1") == "không có khu vực / unknown area X-1"


def test_an_unknown_key_or_a_missing_parameter_fails_loudly():
    with pytest.raises(KeyError):
        say("area.nope")
    with pytest.raises(KeyError):
        say("area.unknown")


@pytest.mark.parametrize("key", sorted(CATALOGUE))
def test_each_entry_has_a_vietnamese_text_and_an_english_one(key):
    vi, en = CATALOGUE[key]
    assert vi.strip() and en.strip() and " / " not in vi and " / " not in en
    assert VIETNAMESE.search(vi) or not re.search("[a-z]{3}", vi), f"{key}: vi has no diacritics"
    assert not VIETNAMESE.search(en), f"{key}: en text holds Vietnamese"
    fields = {f for text in (vi, en) for _, f, _, _ in string.Formatter().parse(text) if f}
    assert all(f.isidentifier() for f in fields), key


def _sources() -> str:
    return "\n".join(p.read_text() for d in ("streamer", "codecs", "relay", "web")
                     for p in (ROOT / d).rglob("*.py"))


def _console_keys() -> set[str]:
    """Keys the console's own modules show: t("console.x", ...) (vendor files excluded)."""
    static = ROOT / "web" / "console" / "static"
    return {k for p in static.rglob("*.js") if "vendor" not in p.parts
            for k in re.findall(r"""\bt\(\s*["'`]([a-z_]+\.[a-z_.]+)["'`]""", p.read_text())}


def test_every_key_in_the_catalogue_is_used_and_every_used_key_exists():
    text = _sources()
    used = set(re.findall(r"""\bsay\(\s*["']([a-z_]+\.[a-z_.]+)["']""", text))
    used |= _console_keys()
    assert used <= set(CATALOGUE), sorted(used - set(CATALOGUE))
    assert set(CATALOGUE) <= used, sorted(set(CATALOGUE) - used)


def test_a_loa_error_carries_its_kind_and_field():
    e = LoaError(say("area.unknown", area="A"), kind="not_found", field="area")
    assert (e.kind, e.field, str(e)) == ("not_found", "area", "không có khu vực / unknown area A")
    assert LoaError("x").kind == "invalid"


def test_every_kind_of_refusal_has_an_http_status():
    from typing import get_args

    from loa.streamer.errors import Kind
    from loa.web.http import STATUS_OF_KIND, status_of
    assert set(STATUS_OF_KIND) == set(get_args(Kind))
    assert status_of(LoaError("x", kind="forbidden")) == 403
    assert status_of(LoaError("x")) == 422


def _inline_bilingual(path: Path) -> list[int]:
    """Lines of string literals (f-string parts too) holding Vietnamese before " / "."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        head, sep, _ = node.value.partition(" / ")
        if sep and VIETNAMESE.search(head):
            found.append(node.lineno)
    return found


def test_no_module_writes_a_bilingual_text_inline():
    # codecs/ stays a library apart: its few texts are translated by their callers
    catalogue = ROOT / "streamer" / "messages.py"
    inline = {str(p.relative_to(ROOT)): lines
              for d in ("streamer", "relay", "web") for p in (ROOT / d).rglob("*.py")
              if p != catalogue and (lines := _inline_bilingual(p))}
    assert not inline, inline
