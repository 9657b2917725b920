"""``cloudmon`` command line: the desktop console, or the headless collector.

    cloudmon                      console + embedded collector, store and local agent
    cloudmon --connect URL        console against a remote collector
    cloudmon collector            the same collector, headless (for a server)

This is the composition root's front door: it reads the configuration and
hands it to :mod:`cloudmon.runtime` (embedded mode), :mod:`cloudmon.collector`
(headless) or :mod:`cloudmon.ui` (console).  Qt is imported only when the
console is asked for, so the headless collector runs without it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import msgspec

from cloudmon import __version__
from cloudmon.config import Config, ConfigError, load_config

log = logging.getLogger("cloudmon")


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 127.0.0.1:8470), got {value!r}")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port in {value!r} is not a number") from None


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML configuration file (default: the user config dir)")
    p.add_argument(
        "--listen",
        type=_listen,
        metavar="HOST:PORT",
        help="where the collector listens (default 127.0.0.1:8470; non-loopback needs a token)",
    )
    p.add_argument("--token", help="bearer token for agents and consoles (or CLOUDMON_TOKEN)")
    p.add_argument("--store", metavar="URL", help="telemetry store URL (default: embedded, in the data dir)")
    p.add_argument("--data-dir", help="directory for the embedded store, token and local agent")
    p.add_argument(
        "--queue",
        metavar="URL",
        help="shared Redis ingest queue for several collectors (redis://HOST:PORT/DB)",
    )
    p.add_argument("--node-timeout", type=float, help="seconds of silence before a node is unreachable")
    p.add_argument("--log-level", default=os.environ.get("CLOUDMON_LOG_LEVEL", "INFO"))
    p.add_argument("--print-config", action="store_true", help="print the effective configuration and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cloudmon", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"cloudmon {__version__}")
    _add_common(parser)
    parser.add_argument("--connect", metavar="URL", help="open the console on a remote collector")
    parser.add_argument(
        "--no-local-agent", action="store_true", help="embedded mode without sampling this machine"
    )
    parser.add_argument(
        "--screenshot",
        type=Path,
        metavar="FILE",
        help="save a PNG of the window once the overview is drawn, then exit",
    )
    sub = parser.add_subparsers(dest="command")
    col = sub.add_parser("collector", help="run the collector headless (HTTP API + store)")
    _add_common(col)
    return parser


def _config_from(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {
        "token": args.token,
        "store": args.store,
        "data_dir": args.data_dir,
        "queue": args.queue,
        "node_timeout": args.node_timeout,
    }
    if args.listen is not None:
        overrides["listen_host"], overrides["listen_port"] = args.listen
    return load_config(args.config, overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=str(args.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = _config_from(args)
    except ConfigError as exc:
        print(f"cloudmon: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        shown = msgspec.structs.asdict(config)
        if shown.get("token"):
            shown["token"] = "***"
        print(msgspec.json.format(msgspec.json.encode(shown)).decode())
        return 0
    if args.command == "collector":
        from cloudmon.collector import run_headless

        return run_headless(config)
    return _run_console(args, config)


def _run_console(args: argparse.Namespace, config: Config) -> int:
    try:
        from cloudmon.ui.app import run_console
    except ImportError as exc:
        print(
            f"cloudmon: the desktop console needs Qt ({exc}). Install it with: pip install 'cloudmon[desktop]'",
            file=sys.stderr,
        )
        return 2
    if args.connect:
        token = config.token
        return run_console(args.connect, token, embedded=False, screenshot=args.screenshot)

    from cloudmon.runtime import EmbeddedRuntime, RuntimeStartError

    runtime = EmbeddedRuntime(config, local_agent=not args.no_local_agent)
    try:
        runtime.start()
    except RuntimeStartError as exc:
        runtime.close()
        print(f"cloudmon: {exc}", file=sys.stderr)
        return 1
    try:
        return run_console(
            runtime.url, runtime.token, embedded=True, on_close=runtime.close, screenshot=args.screenshot
        )
    finally:
        runtime.close()
