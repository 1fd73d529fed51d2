"""Configuration from LOA_<SECTION>_<KEY> environment variables."""

from __future__ import annotations

from dataclasses import fields

import pytest

from loa.web.config import Config, ConfigError, load_config


def test_sections_with_an_underscore_are_set_from_the_environment() -> None:
    cfg = load_config(None, env={"LOA_HTTP_STREAMS_BURST_MS": "1234",
                                 "LOA_HTTP_STREAMS_MAX_LISTENERS_PER_AREA": "7",
                                 "LOA_SERVER_PUBLIC_URL": "http://node.example",
                                 "LOA_ENGINE_DUCK_DB": "-12"})
    assert cfg.http_streams.burst_ms == 1234
    assert cfg.http_streams.max_listeners_per_area == 7
    assert cfg.server.public_url == "http://node.example"
    assert cfg.engine.duck_db == -12.0


def test_every_section_with_an_underscore_is_reachable() -> None:
    """Each such section takes a variable for its first key (the longest name matches)."""
    cfg = Config()
    sections = [f.name for f in fields(Config) if "_" in f.name
                and f.name not in ("store", "store_prefix")]
    assert "http_streams" in sections
    for section in sections:
        obj = getattr(cfg, section)
        key = next(f for f in fields(obj) if isinstance(getattr(obj, f.name), int | float)
                   and not isinstance(getattr(obj, f.name), bool))
        value = getattr(obj, key.name) + 1
        loaded = load_config(None, env={f"LOA_{section}_{key.name}".upper(): str(value)})
        assert getattr(getattr(loaded, section), key.name) == value, section


@pytest.mark.parametrize("var", ["LOA_HTTP_STREAMS_BOGUS", "LOA_HTTP_STREAMS_BURST", "LOA_RTP_NOPE"])
def test_unknown_key_of_a_known_section_stops_start_up(var: str) -> None:
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(None, env={var: "1"})


def test_loa_variables_of_other_tools_are_ignored() -> None:
    cfg = load_config(None, env={"LOA_TEST_REDIS": "redis://x", "LOA_HTTP": "1",
                                 "LOA_HTTPX_FOO": "1", "LOA_": "1", "LOA_HTTP_STREAMS_": "1"})
    assert cfg.http_streams.burst_ms == Config().http_streams.burst_ms


def test_wrong_type_from_the_environment_stops_start_up() -> None:
    with pytest.raises(ConfigError, match=r"\[http_streams\] burst_ms: expected int"):
        load_config(None, env={"LOA_HTTP_STREAMS_BURST_MS": "lots"})
