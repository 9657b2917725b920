"""Running the collector headless: ``cloudmon collector`` (and ``python -m cloudmon.collector``).

The flags are parsed by :mod:`cloudmon.cli`; :func:`run_headless` serves the
resulting configuration until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys

from cloudmon.collector.server import Collector, CollectorError
from cloudmon.config import Config, ConfigError, ensure_token
from cloudmon.store import StoreError, open_store

log = logging.getLogger(__name__)


def _event_loop_policy() -> None:
    # uvloop is optional (measured ≈ 15-40 % more reports/s here); use it where installed.
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        log.info("event loop: asyncio (pip install uvloop for more throughput)")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    log.info("event loop: uvloop")


async def _serve(config: Config, collector: Collector, token_note: str) -> None:
    await collector.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        print(f"cloudmon collector listening on {collector.url}", flush=True)
        print(token_note, flush=True)
        # Startup objects (modules, routes, the OpenAPI document) live forever:
        # keep them out of every future collection.
        gc.freeze()
        await stop.wait()
        log.info("signal received; stopping")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await collector.close()


def run_headless(config: Config) -> int:
    """Serve the collector until SIGTERM/SIGINT; returns the process exit status.

    Prints ``cloudmon collector listening on http://HOST:PORT`` once listening and
    where the token is kept (never the token).  Startup errors (bad config, port
    in use, store unreachable) are printed to stderr and give status 2.
    """
    if not config.is_loopback and not config.token:
        # A token generated into a file nobody has read protects nothing an
        # operator knows about: off loopback the operator must choose one.
        print(
            f"cloudmon collector: error: listening on {config.listen_host} (not loopback) requires a "
            "configured token: set token in the config file, CLOUDMON_TOKEN, or --token",
            file=sys.stderr,
        )
        return 2
    try:
        token = ensure_token(config)
        if not config.store:
            config.data_path.mkdir(parents=True, exist_ok=True)
        store = open_store(config.store_url, config.tiers())
    except (ConfigError, StoreError, OSError) as exc:
        print(f"cloudmon collector: error: {exc}", file=sys.stderr)
        return 2
    if config.token:
        token_note = "token: configured (token setting, CLOUDMON_TOKEN or --token)"
    else:
        token_note = f"token: kept in {config.data_path / 'token'}"
    try:
        collector = Collector(config, store, token)
        _event_loop_policy()
        asyncio.run(_serve(config, collector, token_note))
    except (ConfigError, CollectorError) as exc:
        print(f"cloudmon collector: error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0
