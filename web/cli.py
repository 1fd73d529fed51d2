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
    device.add_argument("--fm-receiver", action="store_true",
                        help="say it has an FM tuner: it takes `fm` commands (tune, off)")
    device.add_argument("--sink", default="null",
                        help="null | wav:FILE | default | alsa:DEVICE (a sound card: "
                             "a loudspeaker's amplifier, a commune FM transmitter's input)")
    device.add_argument("--transport", default=None, choices=["http", "rtp", "webrtc"],
                        help="override the preference the server sends")
    device.add_argument("--target-delay-ms", type=float, default=300.0,
                        help="synchronised playout delay after the RTCP time mapping")
    device.add_argument("--seconds", type=float, default=None, help="stop after this long")
    device.add_argument("--state-dir", default=None,
                        help="firmware version marker and images (OTA updates need it)")
    device.add_argument("--firmware-key", default=None,
                        help="base64 ed25519 public key firmware images must be signed with")
    device.add_argument("--boot-check", default=None,
                        help="command run at the first start of a new firmware; "
                             "non-zero exit rolls it back")
    device.add_argument("--control", default="ws", choices=["ws", "mqtt"],
                        help="control channel: the node's WebSocket or the MQTT broker")
    device.add_argument("--broker", default=None,
                        help="mqtt://host:port of the broker (default: the server's host:1883)")

    sim = sub.add_parser("sim", help="a fleet of light simulated devices")
    sim.add_argument("--server", required=True)
    sim.add_argument("--speakers", type=int, default=100)
    sim.add_argument("--boards", type=int, default=0)
    sim.add_argument("--decode", type=int, default=0, help="how many also decode audio")
    sim.add_argument("--broken", type=int, default=0,
                     help="how many loudspeakers have a broken amplifier (ack, report silence)")
    sim.add_argument("--token", default=None,
                     help="admin bearer token used to register the fleet (or LOA_TOKEN)")
    sim.add_argument("--area", default=None, help="register the fleet under this area")
    sim.add_argument("--seconds", type=float, default=None)
    sim.add_argument("--control", default="ws", choices=["ws", "mqtt"],
                     help="control channel: the node's WebSocket or the MQTT broker")
    sim.add_argument("--broker", default=None,
                     help="mqtt://host:port of the broker (default: the server's host:1883)")

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
    arc = bsub.add_parser("archive", help="CPU of recording an area's stream (as-aired archive)")
    arc.add_argument("--areas", type=int, default=200)
    arc.add_argument("--seconds", type=float, default=60.0)
    chain = bsub.add_parser("chain", help="node processes linked parent to child: emergency "
                            "latency per hop, a link's outage, CPU per relayed broadcast")
    chain.add_argument("--hops", type=int, default=2, help="links: hops + 1 node processes")
    chain.add_argument("--rounds", type=int, default=20, help="emergencies measured")
    chain.add_argument("--outage", type=float, default=3.0, help="seconds the last link is down")
    chain.add_argument("--cpu-seconds", type=float, default=5.0, help="each CPU window")
    chain.add_argument("--relayed", type=int, default=4,
                       help="the province's broadcasts relayed for the CPU figure")
    dev = bsub.add_parser("devices", help="control-channel cost per device")
    dev.add_argument("--n", type=int, default=1000)
    dev.add_argument("--seconds", type=float, default=30.0)
    dev.add_argument("--heartbeat", type=float, default=30.0)
    dev.add_argument("--proof", action="store_true",
                     help="also: an emergency's delivery proof from every device (ms)")
    out = bsub.add_parser("outages", help="outage history cost and a month's availability report")
    out.add_argument("--devices", type=int, default=2000)
    out.add_argument("--changes", type=int, default=30, help="status changes per device")
    out.add_argument("--rounds", type=int, default=3)
    dev.add_argument("--control", default="ws", choices=["ws", "mqtt"],
                     help="mqtt: the MQTT binding on a Mosquitto it starts, beside WebSocket")
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
    upl = bsub.add_parser("uplink", help="an outage's backlog of reports drained up the link")
    upl.add_argument("--entries", type=int, default=10_000)
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
    if args.command == "bench" and args.bench == "archive":
        from loa.web.bench.archive import run as run_archive

        return run_archive(args)
    if args.command == "bench" and args.bench == "chain":
        from loa.web.bench.chain import run as run_chain

        return int(run_chain(args))
    if args.command == "bench" and args.bench == "devices":
        from loa.web.bench.devices import run as run_devices

        return int(run_devices(args))
    if args.command == "bench" and args.bench == "console":
        from loa.web.bench.console import run as run_console

        return int(run_console(args))
    if args.command == "bench" and args.bench == "outages":
        from loa.web.bench.outages import run as run_outages

        return run_outages(args)
    if args.command == "bench" and args.bench == "uplink":
        from loa.web.bench.uplink import run as run_uplink

        return run_uplink(args)
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
