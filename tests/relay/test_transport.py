"""Every media output keeps the one Transport contract (loa.relay.transport)."""

from __future__ import annotations

import inspect

import pytest

from loa.relay.hls import HlsService
from loa.relay.icecast import HttpStreamer
from loa.relay.rtp.out import RtpOut
from loa.relay.transport import Transport
from loa.relay.webrtc import WebRtcRelay


@pytest.mark.parametrize("cls", [RtpOut, HttpStreamer, HlsService, WebRtcRelay])
def test_each_output_satisfies_the_transport_contract(cls: type) -> None:
    assert issubclass(cls, Transport)
    # runtime_checkable only sees the names: the kind of each method (awaitable or not) and
    # its parameters must match too, or the composition root would call it wrong.
    for name in ("start", "close", "stats"):
        want, got = getattr(Transport, name), getattr(cls, name)
        assert inspect.iscoroutinefunction(got) == inspect.iscoroutinefunction(want), name
        assert list(inspect.signature(got).parameters) == ["self"], name
