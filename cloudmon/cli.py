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
    app = sub.add_parser(
        "apply",
        help="create or update auto-scaling groups from a TOML or JSON file",
        description="Apply the [[group]] tables of FILE to the collector: groups that differ are "
        "created or replaced, unchanged ones are left alone (see README: Auto-scaling groups).",
    )
    _add_common(app)
    app.add_argument("file", type=Path, metavar="FILE", help="groups file (.toml or .json)")
    app.add_argument(
        "--connect", metavar="URL", help="collector URL (default: the console running on this machine)"
    )
    app.add_argument("--prune", action="store_true", help="also delete groups the file does not name")
    app.add_argument("--dry-run", action="store_true", help="only say what would change")
    demo = sub.add_parser(
        "demo",
        help="open the console on a simulated cluster that auto-scales (nothing real is touched)",
        description="Simulated hosts, VMs and an auto-scaling group whose nodes speak the real "
        "protocol to a real embedded collector. Its data lives in a temporary directory.",
    )
    _add_common(demo)
    demo.add_argument("--headless", action="store_true", help="no window: print the group's activity")
    demo.add_argument(
        "--seconds", type=float, default=0.0, help="stop after this long (default: until closed)"
    )
    from cloudmon.rebalance.cli import add_parser as add_plan_parser

    add_plan_parser(sub)
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
    if args.command == "apply":
        return _apply(args, config)
    if args.command == "demo":
        return _demo(args, config)
    if args.command == "plan":
        from cloudmon.rebalance.cli import run as run_plan

        return run_plan(args)
    return _run_console(args, config)


def _apply(args: argparse.Namespace, config: Config) -> int:
    from cloudmon.autoscale.apply import ApplyError, apply_specs, load_file
    from cloudmon.autoscale.model import GroupSpec, SpecError, spec_from_doc
    from cloudmon.client import ApiClient, ApiError
    from cloudmon.runtime import running_collector_url

    try:
        specs = load_file(args.file)
    except ApplyError as exc:
        print(f"cloudmon apply: {exc}", file=sys.stderr)
        return 2
    url = args.connect or running_collector_url(config)
    if not url:
        print(
            f"cloudmon apply: no cloudmon console is running with data dir {config.data_path}; start "
            "'cloudmon' first, or name a collector with --connect URL (and --token or CLOUDMON_TOKEN)",
            file=sys.stderr,
        )
        return 2
    token = config.token
    if not token and not args.connect:
        from cloudmon.config import ensure_token

        token = ensure_token(config)
    api = ApiClient(url, token or None)
    try:
        existing: dict[str, GroupSpec] = {}
        for g in api.groups().get("groups", []):
            try:
                existing[str(g["name"])] = spec_from_doc(g["spec"])
            except (SpecError, KeyError, TypeError) as exc:
                log.warning("group %s on the collector is not readable here: %s", g.get("name"), exc)

        def put(spec: GroupSpec) -> None:
            api.put_group(spec.name, msgspec.to_builtins(spec))

        lines = apply_specs(
            specs,
            existing=existing,
            put=put,
            delete=lambda name: api.delete_group(name, force=True),
            prune=args.prune,
            dry_run=args.dry_run,
        )
    except (ApiError, ApplyError) as exc:
        print(f"cloudmon apply: {url}: {exc}", file=sys.stderr)
        return 1
    finally:
        api.close()
    for line in lines:
        print(line)
    return 0


def _demo(args: argparse.Namespace, config: Config) -> int:
    import tempfile

    from cloudmon.runtime import EmbeddedRuntime, RuntimeStartError
    from cloudmon.sim.demo import build_demo

    with tempfile.TemporaryDirectory(prefix="cloudmon-demo-") as tmp:
        # Its own data dir and a free port: the demo never mixes with real data or a running console.
        demo_config = msgspec.structs.replace(
            config, data_dir=args.data_dir or tmp, store="", listen_port=0, control_tick_s=1.0
        )
        runtime = EmbeddedRuntime(demo_config, local_agent=False)
        try:
            runtime.start()
            demo = build_demo(runtime.url, runtime.token)
        except RuntimeStartError as exc:
            runtime.close()
            print(f"cloudmon demo: {exc}", file=sys.stderr)
            return 1
        try:
            runtime.control.add_provider("simulated", demo.provider)
            runtime.control.autoscale.put_group(demo.group)
            demo.start()
            log.info("demo: simulated cluster at %s (group %s)", runtime.url, demo.group.name)
            if args.headless:
                return _demo_headless(runtime.url, runtime.token, demo.group.name, args.seconds)
            return _run_demo_console(args, runtime.url, runtime.token)
        finally:
            demo.close()
            runtime.close()


def _demo_headless(url: str, token: str, group: str, seconds: float) -> int:
    import time

    from cloudmon.client import ApiClient, ApiError

    print(f"cloudmon demo (simulated cluster) at {url}; Ctrl-C stops it", flush=True)
    api = ApiClient(url, token)
    seen: set[str] = set()
    deadline = time.monotonic() + seconds if seconds > 0 else float("inf")
    try:
        while time.monotonic() < deadline:
            try:
                events = api.group_activity(group, limit=50).get("events", [])
            except ApiError as exc:
                print(f"  (collector: {exc})", flush=True)
                events = []
            for ev in reversed(events):
                key = str(ev.get("id"))
                if key in seen:
                    continue
                seen.add(key)
                stamp = time.strftime("%H:%M:%S", time.localtime(float(ev.get("ts", 0))))
                print(f"{stamp} {ev.get('kind')}: {ev.get('reason')}", flush=True)
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        api.close()
    return 0


def _run_demo_console(args: argparse.Namespace, url: str, token: str) -> int:
    try:
        from cloudmon.ui.app import run_console
    except ImportError as exc:
        print(
            f"cloudmon demo: the desktop console needs Qt ({exc}); install it with "
            "pip install 'cloudmon[desktop]', or run 'cloudmon demo --headless'",
            file=sys.stderr,
        )
        return 2
    return run_console(url, token, embedded=True, screenshot=args.screenshot, simulated=True)


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
