"""`loa serve` and `loa user`: the server process and its user administration."""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys

from aiohttp import web

from loa.streamer.areas import AreaError
from loa.streamer.log import setup_logging
from loa.streamer.messages import say
from loa.streamer.state.open import open_store
from loa.web.app import create_app
from loa.web.auth import add_user
from loa.web.build import load_tree
from loa.web.config import Config, ConfigError, load_config
from loa.web.node import Node


def _config(args: argparse.Namespace, http: str | None = None) -> Config:
    try:
        return load_config(args.config, data=args.data, http=http)
    except ConfigError as e:
        print(say("serve.config_error", error=e), file=sys.stderr)
        raise SystemExit(2) from None


def make_runner(app: web.Application, cfg: Config, **kw: object) -> web.AppRunner:
    """The HTTP runner. aiohttp has no header-read timeout of its own, but its keep-alive timer
    starts when a connection opens, is not reset by incoming bytes, and closes a connection only
    while it waits for a complete request: as `header_timeout` it bounds a slowloris (partial
    request line or headers) and idle keep-alive, never a response in progress (streams,
    websockets)."""
    return web.AppRunner(app, access_log=None, keepalive_timeout=cfg.server.header_timeout,
                         **kw)  # type: ignore[arg-type]


async def serve(cfg: Config, *, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    node = Node(cfg)
    await node.start()
    app = create_app(node)
    gc.freeze()  # what start-up built lives forever: keep it out of every later collection
    runner = make_runner(app, cfg, handle_signals=False)
    await runner.setup()
    host, _, port = cfg.server.http.rpartition(":")
    site = web.TCPSite(runner, host or "0.0.0.0", int(port))
    await site.start()
    print(f"{say('serve.serving', address=cfg.server.http)} "
          f"({say('serve.data_dir', path=cfg.data_dir)})", flush=True)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    if ready:
        ready.set()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await node.stop()


def run_serve(args: argparse.Namespace) -> int:
    cfg = _config(args, http=args.http)
    # Thousands of long-lived connections make full collections walk ~10^6 objects (a 1 s
    # pause at 10,000 devices, measured): collect the oldest generation far less often.
    gc.set_threshold(700, 10, 1000)
    setup_logging(cfg.log.level, cfg.log.format)
    asyncio.run(serve(cfg))
    return 0


async def _user_add(cfg: Config, args: argparse.Namespace) -> int:
    store = await open_store(cfg.store, cfg.data_dir, cfg.store_prefix)
    try:
        tree = await load_tree(store, cfg)
        record, password = await add_user(store, tree, args.name, args.role, args.area,
                                          args.password, args.emergency, args.direct)
    except (ValueError, AreaError) as e:
        print(say("serve.error", error=e), file=sys.stderr)
        return 2
    finally:
        await store.close()
    print(say("serve.user_created", username=record["username"], role=record["role"],
              area=record["area"], emergency=record["emergency"]))
    if args.password is None:
        print(say("serve.password", password=password))
    return 0


def run_user(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.user_command == "add":
        return asyncio.run(_user_add(cfg, args))
    return 2
