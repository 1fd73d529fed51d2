"""`loa bench mix` runs end to end and reports honest counts (no timing thresholds)."""

from __future__ import annotations

import json

import pytest

from loa.web.bench.run import liquidsoap_script
from loa.web.cli import main


def test_bench_mix_small(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "mix", "--zones", "3", "--seconds", "0.5"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert len(out) == 1  # exactly one JSON object on stdout
    result = json.loads(out[0])
    assert result["bench"] == "mix"
    assert result["zones"] == 3
    assert result["mixes"] == 3  # every commune is its own composition
    assert result["encoders"] == 6  # Opus + MP3 per mix
    assert result["codecs"] == ["opus", "mp3"]
    assert result["cpu_per_audio_second"] > 0
    assert result["cpu_per_zone_percent"] > 0
    assert result["baseline"] is None


def test_liquidsoap_script_one_station_per_output() -> None:
    script = liquidsoap_script(stations=3, mp3_rate=24_000, bitrate_kbps=32, major=2)
    assert script.count("output.file(%mp3(mono, bitrate=32, samplerate=24000)") == 3
    assert "settings.init.allow_root.set(true)" in script


def test_liquidsoap_script_matches_loa_mp3_quality() -> None:
    script = liquidsoap_script(stations=1, mp3_rate=24_000, bitrate_kbps=32, major=2, quality=7)
    assert "internal_quality=7" in script


def test_bench_without_liquidsoap_reports_null_baseline(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("loa.web.bench.run.shutil.which", lambda name: None)
    rc = main(["bench", "mix", "--zones", "2", "--seconds", "0.2", "--baseline", "liquidsoap"])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert result["baseline"] is None
    assert "not found" in result["baseline_reason"]
    assert result["ratio_vs_liquidsoap"] is None
    assert result["mp3_only_cpu_per_zone_percent"] > 0


def test_bench_mix_paced_runs_on_the_real_clock(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "mix", "--zones", "2", "--seconds", "0.6", "--paced"])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert result["clock"] == "real (paced)"
    assert (result["zones"], result["mixes"], result["encoders"]) == (2, 2, 4)
    # Ticks counted by the real clock over 0.6 s of wall time: about 30 of them.
    assert 0.4 <= result["seconds"] <= 0.9
    assert result["wall_seconds"] >= 0.6
    assert result["late_ticks"] >= 0 and result["cpu_per_zone_percent"] > 0
    assert result["kbps_per_zone"]["mp3"] > 0


def test_bench_console_runs_in_chromium_on_a_5000_area_province(
        capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "console", "--rounds", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(out) == 1
    result = json.loads(out[0])
    assert (result["bench"], result["areas"], result["devices"]) == ("console", 5000, 10000)
    assert result["first_load"]["requests"] >= 10  # page, modules, texts: all counted
    assert 0 < result["first_load"]["kb_p50"] < 1000
    assert all(v > 0 for v in result["overview"].values()) and len(result["overview"]) == 3
    assert result["on_air_visible_ms"]["n"] == 4  # two starts and two stops seen on the page
    api = result["areas_api"]
    assert api["whole_gzip_kb"] > 0 and api["baseline_whole_ms_p50"] == 340


def test_bench_archive_records_every_area_from_its_packets(
        capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "archive", "--areas", "3", "--seconds", "2"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(out) == 1
    result = json.loads(out[0])
    assert result["bench"] == "archive" and result["areas"] == 3
    # 32 kbit/s of Opus is 14.4 MB an hour; Ogg pages add a little, nothing is re-encoded.
    assert 14_000_000 < result["bytes_per_area_hour"] < 17_000_000, result
    assert result["cpu_per_area_share_of_core"] > 0
def test_bench_ingest_pushes_real_encoders_and_measures_the_bursts(
        capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "ingest", "--sources", "2", "--seconds", "3"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["bench"], result["sources"], result["connected"]) == ("ingest", 2, 2)
    assert result["push_to_air_ms"]["bursts"] >= 2
    assert result["cpu_per_ingest_percent"] is not None
