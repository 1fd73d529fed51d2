"""The alerts registry: raised once per (kind, subject), cleared once, listeners told each change."""

from loa.streamer.alerts import Alert, Alerts


def test_raise_is_idempotent_and_clear_tells_listeners() -> None:
    alerts = Alerts()
    seen: list[Alert] = []
    alerts.listeners.append(seen.append)
    a = Alert("dead_air", "T01-H1-X1", "T01-H1-X1", "im lặng / dead air", "critical")
    assert alerts.raise_(a) is True
    assert alerts.raise_(a) is False  # a part may raise on every check
    assert [x.cleared for x in seen] == [None] and seen[0].since > 0
    assert alerts.clear("dead_air", "T01-H1-X1") is True
    assert alerts.clear("dead_air", "T01-H1-X1") is False
    assert len(seen) == 2 and seen[1].cleared is not None
    assert alerts.active == {}


def test_a_failing_listener_does_not_stop_the_raiser() -> None:
    alerts = Alerts()
    seen: list[Alert] = []

    def broken(_: Alert) -> None:
        raise RuntimeError("notifier bug")

    alerts.listeners += [broken, seen.append]
    assert alerts.raise_(Alert("device_offline", "d1", "T01", "t"))
    assert len(seen) == 1


def test_unknown_severity_is_refused() -> None:
    import pytest
    with pytest.raises(ValueError):
        Alerts().raise_(Alert("x", "y", "T01", "t", "panic"))
