"""The `loa` command line: serve, demo, bench, user, device, sim."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--data", help="data directory (default ./loa-data)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="loa", description="Loa broadcast server")
    sub = ap.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    _common(serve)
    serve.add_argument("--http", default=None, help="HOST:PORT to listen on")

    user = sub.add_parser("user", help="manage users")
    usub = user.add_subparsers(dest="user_command", required=True)
    add = usub.add_parser("add", help="add a user (works while the server runs)")
    _common(add)
    add.add_argument("name")
    add.add_argument("--role", required=True,
                     choices=["admin", "approver", "editor", "operator", "viewer"])
    add.add_argument("--area", required=True, help="area code the user acts on (and below)")
    add.add_argument("--password", default=None, help="generated and printed when omitted")
    add.add_argument("--emergency", action="store_true", help="grant the emergency right")
    add.add_argument("--direct", action="store_true",
                     help="may air content that has not been approved")

    device = sub.add_parser("device", help="the reference loudspeaker agent")
    device.add_argument("--server", required=True, help="http://host:port of the Loa node")
    device.add_argument("--key", required=True, help="DEVICE_ID:KEY from provisioning")
    device.add_argument("--sink", default="null", help="null | wav:FILE | default")
    device.add_argument("--transport", default=None, choices=["http", "rtp", "webrtc"],
                        help="override the preference the server sends")
    device.add_argument("--target-delay-ms", type=float, default=300.0,
                        help="synchronised playout delay after the RTCP time mapping")
    device.add_argument("--seconds", type=float, default=None, help="stop after this long")

    sim = sub.add_parser("sim", help="a fleet of light simulated devices")
    sim.add_argument("--server", required=True)
    sim.add_argument("--speakers", type=int, default=100)
    sim.add_argument("--boards", type=int, default=0)
    sim.add_argument("--decode", type=int, default=0, help="how many also decode audio")
    sim.add_argument("--token", default=None,
                     help="admin bearer token used to register the fleet (or LOA_TOKEN)")
    sim.add_argument("--area", default=None, help="register the fleet under this area")
    sim.add_argument("--seconds", type=float, default=None)

    demo = sub.add_parser("demo", help="run the engine with a sample province")
    _common(demo)
    demo.add_argument("--http", default=None, help="HOST:PORT to listen on (default 127.0.0.1:8080)")
    demo.add_argument("--seconds", type=float, default=None, help="stop after this long")

    bench = sub.add_parser("bench", help="benchmarks printing JSON figures")
    bsub = bench.add_subparsers(dest="bench", required=True)
    mix = bsub.add_parser("mix", help="mixing + encoding cost per distinct composition")
    mix.add_argument("--zones", type=int, default=20)
    mix.add_argument("--seconds", type=float, default=10.0)
    mix.add_argument("--find", action="store_true", help="search the largest real-time zones")
    mix.add_argument("--paced", action="store_true",
                     help="run on the real media clock (as a server does), not back to back")
    mix.add_argument("--baseline", choices=["none", "liquidsoap"], default="none",
                     help="also measure Liquidsoap doing the same work, in the same run")
    api = bsub.add_parser("api", help="REST API latency with 5,000 areas and 10,000 devices")
    api.add_argument("--requests", type=int, default=500, help="per measured operation")
    api.add_argument("--concurrency", type=int, default=16)
    con = bsub.add_parser("console", help="the console in Chromium on a 5,000-area province")
    con.add_argument("--rounds", type=int, default=5)
    pre = bsub.add_parser("preempt", help="emergency switch latency per transport")
    pre.add_argument("--devices", type=int, default=200)
    pre.add_argument("--rounds", type=int, default=10)
    dev = bsub.add_parser("devices", help="control-channel cost per device")
    dev.add_argument("--n", type=int, default=1000)
    dev.add_argument("--seconds", type=float, default=30.0)
    dev.add_argument("--heartbeat", type=float, default=30.0)
    ing = bsub.add_parser("ingest", help="CPU per pushing encoder, push-to-air latency")
    ing.add_argument("--sources", type=int, default=10)
    ing.add_argument("--seconds", type=float, default=20.0)
    fan = bsub.add_parser("fanout", help="delivery cost per listener of one transport")
    fan.add_argument("--transport", required=True, choices=["http", "rtp", "webrtc"])
    fan.add_argument("--listeners", type=int, default=1000)
    fan.add_argument("--seconds", type=float, default=15.0)
    fan.add_argument("--baseline", choices=["none", "icecast"], default="none",
                     help="http: also measure Icecast 2 serving the same stream, same run")
    fan.add_argument("--codec", choices=["mp3", "opus"], default="mp3",
                     help="http: the stream measured (opus: Ogg Opus)")
    fan.add_argument("--storm", action="store_true",
                     help="http: every listener reconnects at once; media clock figures")
    fan.add_argument("--workers", type=int, default=None,
                     help="http: fan-out worker processes (default: [http_streams] workers); "
                          "webrtc: WHEP worker processes (default: [webrtc] workers)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from loa.web.serve import run_serve

        return run_serve(args)
    if args.command == "user":
        from loa.web.serve import run_user

        return run_user(args)
    if args.command == "device":
        from loa.relay.agent.agent import main as agent_main

        return int(agent_main(args))
    if args.command == "sim":
        from loa.relay.agent.sim import main as sim_main

        return int(sim_main(args))
    if args.command == "demo":
        from loa.web.demo import run_demo

        return run_demo(args)
    if args.command == "bench" and args.bench == "preempt":
        from loa.web.bench.preempt import run as run_preempt

        return int(run_preempt(args))
    if args.command == "bench" and args.bench == "devices":
        from loa.web.bench.devices import run as run_devices

        return int(run_devices(args))
    if args.command == "bench" and args.bench == "console":
        from loa.web.bench.console import run as run_console

        return int(run_console(args))
    if args.command == "bench" and args.bench == "api":
        from loa.web.bench.api import run

        return int(run(args))
    if args.command == "bench" and args.bench == "ingest":
        from loa.web.bench.ingest import run as run_ingest

        return int(run_ingest(args))
    if args.command == "bench" and args.bench == "fanout":
        import importlib

        mod = importlib.import_module(f"loa.web.bench.{args.transport}")
        return int(mod.run(args))
    if args.command == "bench":
        from loa.web.bench.run import run_bench

        return run_bench(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
