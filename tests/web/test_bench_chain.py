"""`loa bench chain` runs end to end, tiny, and reports figures of the right shape (no timing
thresholds: speed is the bench's to report, not the test's)."""

from __future__ import annotations

import json

import pytest

from loa.web.cli import main


def test_bench_chain_one_hop(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "chain", "--hops", "1", "--rounds", "2", "--outage", "0.5",
               "--cpu-seconds", "0.5", "--relayed", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(out) == 1  # exactly one JSON object on stdout
    r = json.loads(out[0])
    assert (r["bench"], r["hops"], r["nodes"], r["rounds"]) == ("chain", 1, 2, 2)
    first = r["emergency_first_packet_ms"]
    assert len(first["at_node"]) == 2 and [h["hop"] for h in first["per_hop"]] == [1]
    assert first["end_to_end"]["n"] == 2 and first["per_hop"][0]["n"] == 2
    # The child has it after its parent: each round's frame reached the origin's probe first.
    # Figures, not an order: each node's first packet is timed on its own (no timing asserts).
    assert first["at_node"][0]["p50"] > 0 and first["end_to_end"]["p50"] > 0
    heard = r["emergency_first_audio_ms"]
    assert len(heard["at_node"]) == 2 and heard["end_to_end"]["p50"] >= first["end_to_end"]["p50"]
    out_ = r["link_outage"]
    assert out_["outage_s"] == 0.5 and out_["local_programme_gap_ms"] >= 0
    assert out_["parent_audio_gap_ms"] >= out_["back_on_parent_audio_ms"] > 0
    assert r["cpu"]["relayed"] == 1 and r["cpu"]["with_relayed_percent"] > 0
    assert r["cpu_per_relayed_broadcast_percent"] >= 0
    assert set(r["met"]) == set(r["goals"])
    assert r["baseline"]["icecast_master_slave"]["master_update_interval_s"] == 120
