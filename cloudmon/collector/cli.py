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
from cloudmon.store import StoreError, TierSpec, open_store

log = logging.getLogger(__name__)


def tiers_for(config: Config) -> tuple[TierSpec, ...]:
    """The store tiers (1 s raw, 1 min, 1 h) with the configured retention."""
    return (
        TierSpec("raw", 1, round(config.retention_raw_hours * 3600)),
        TierSpec("1m", 60, round(config.retention_1m_hours * 3600)),
        TierSpec("1h", 3600, round(config.retention_1h_hours * 3600)),
    )


def _event_loop_policy() -> None:
    # uvloop is optional (≈ 6 % faster here); use it only where installed.
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


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
    try:
        token = ensure_token(config)
        if not config.store:
            config.data_path.mkdir(parents=True, exist_ok=True)
        store = open_store(config.store_url, tiers_for(config))
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
