"""`loa demo` as a visitor runs it: the console URL and the demo logins are the first lines it
prints, and the simulated fleet's arrival and departure are one line each, not two per device."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_opens_with_the_console_and_summarises_the_fleet(tmp_path: Path) -> None:
    port = _free_port()
    run = subprocess.run([sys.executable, "-m", "loa.web.cli", "demo", "--seconds", "6",
                          "--data", str(tmp_path / "demo"), "--http", f"127.0.0.1:{port}"],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = (run.stdout + run.stderr).splitlines()
    assert lines[0].startswith(f"Bảng điều khiển / console: http://127.0.0.1:{port}/"), lines[:3]
    assert "xa11 (operator T01-H1-X1)" in lines[1] and "loa-demo-2026" in lines[1]
    assert lines.count("22 thiết bị mô phỏng đã kết nối / 22 simulated devices connected") == 1
    assert lines.count(
        "22 thiết bị mô phỏng đã ngắt kết nối / 22 simulated devices disconnected") == 1
    per_device = [x for x in lines if "event=device_connect " in x or "event=device_welcome" in x
                  or "event=device_disconnect" in x]
    assert per_device == []
