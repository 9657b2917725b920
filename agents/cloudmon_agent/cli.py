"""``cloudmon-agent``: the agent's command line (also ``python -m cloudmon_agent``).

    cloudmon-agent --collector http://COLLECTOR:8470 --token TOKEN
    cloudmon-agent --once          # print one report as JSON, no collector needed

Settings come from defaults < TOML file < ``CLOUDMON_*`` environment < flags
(see :mod:`cloudmon_agent.config`).  SIGTERM and SIGINT stop it cleanly with
exit status 0; a configuration error exits with 2.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from cloudmon_agent import __version__
from cloudmon_agent.agent import Agent
from cloudmon_agent.config import AgentConfig, ConfigError, load_config
from cloudmon_agent.schema import encode

log = logging.getLogger("cloudmon_agent")

USAGE_HINT = """\
no collector given; run it as
  cloudmon-agent --collector http://COLLECTOR:8470 --token TOKEN
or set CLOUDMON_COLLECTOR and CLOUDMON_TOKEN, or put collector = "..." and token = "..."
in /etc/cloudmon/agent.toml (or pass --config FILE).
To print one report without a collector: cloudmon-agent --once"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (values stay strings; the config layer converts and validates)."""
    p = argparse.ArgumentParser(
        prog="cloudmon-agent",
        description="Sample this node once per interval and push reports to a cloudmon collector.",
    )
    p.add_argument("--version", action="version", version=f"cloudmon-agent {__version__}")
    p.add_argument("--collector", metavar="URL", help="collector base URL, e.g. http://10.0.0.5:8470")
    p.add_argument("--token", metavar="T", help="the collector's bearer token (or CLOUDMON_TOKEN)")
    p.add_argument("--interval", metavar="S", help="seconds between samples (default 1)")
    p.add_argument("--node-id", metavar="ID", help="node id (default: generated once, kept in the state dir)")
    p.add_argument("--name", metavar="NAME", help="node display name (default: the hostname)")
    p.add_argument("--state-dir", metavar="DIR", help="where the node id and the spool are kept")
    p.add_argument("--timeout", metavar="S", help="seconds to wait for the collector (default 5)")
    p.add_argument(
        "--spool-max-bytes",
        metavar="SIZE",
        help="most disk space for reports kept while the collector is away, e.g. 64MiB (default); "
        "when full the oldest are dropped",
    )
    p.add_argument(
        "--retry-max", metavar="S", help="longest wait between tries while the collector is away (default 30)"
    )
    c = p.add_argument_group("collectors")
    c.add_argument(
        "--libvirt-uri",
        metavar="URI",
        help="libvirt URI for VM metrics (default qemu:///system; '' or none: no VMs)",
    )
    c.add_argument("--top-n", metavar="N", help="processes in each top list (default 5; 0: no process scan)")
    c.add_argument("--processes-every", metavar="S", help="seconds between process scans (default 5)")
    c.add_argument(
        "--no-containers",
        dest="containers",
        action="store_const",
        const=False,
        help="do not report containers, services and VM scopes from cgroups",
    )
    c.add_argument(
        "--no-gpus", dest="gpus", action="store_const", const=False, help="do not report NVIDIA GPUs"
    )
    c.add_argument(
        "--budget-ms",
        metavar="MS",
        help="collectors' CPU budget per cycle; over it the costliest runs less often (default 1; 0: off)",
    )
    a = p.add_argument_group("actions")
    a.add_argument(
        "--allow-actions",
        metavar="LIST",
        help="comma-separated actions the collector may have this node run: vm.create, vm.start, "
        "vm.stop, vm.delete, vm.migrate, vm.state (default: none, every command is refused)",
    )
    a.add_argument(
        "--image-dirs",
        metavar="LIST",
        help="comma-separated directories vm.create may take images, templates and kernels from "
        "and put overlays in (default: none)",
    )
    a.add_argument(
        "--migrate-uri",
        metavar="URI",
        help="libvirt URI other hosts reach this host's libvirtd at, for live migrations to it "
        "(e.g. qemu+tcp://10.0.0.7/system)",
    )
    p.add_argument("--config", metavar="FILE", type=Path, help="TOML config file")
    p.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO (default), WARNING, ERROR")
    p.add_argument("--once", action="store_true", help="print one report as JSON on stdout and exit")
    return p


class _StopRequested(Exception):
    """Raised in the main thread by the SIGTERM/SIGINT handler."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # Ignore further signals so a second Ctrl-C cannot interrupt the cleanup.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise _StopRequested(signum)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _once(config: AgentConfig) -> int:
    with Agent(config, whole_process=True) as agent:
        agent.prime()
        # The measuring window for rates, not a readiness wait.
        time.sleep(min(config.interval, 1.0))
        report = agent.sample()
    sys.stdout.write(encode(report).decode("utf-8") + "\n")
    sys.stdout.flush()
    return 0


def _serve(config: AgentConfig) -> int:
    agent = Agent(config, whole_process=True)
    # Everything allocated so far (modules, classes, the collectors) lives as long
    # as the process: move it out of the collector's reach, so the occasional
    # full collection walks only what the cycles allocate.  Only here, in the
    # agent's own process, never when the Agent is embedded in another program.
    gc.collect()
    gc.freeze()
    in_main = threading.current_thread() is threading.main_thread()
    stops = {signal.SIGTERM, signal.SIGINT}
    masking = in_main and hasattr(signal, "pthread_sigmask")
    try:
        if in_main:
            signal.signal(signal.SIGTERM, _on_signal)
            signal.signal(signal.SIGINT, _on_signal)
        # A stop signal during start() would interrupt Thread.start() before the
        # new thread is known to run, and close() could not join it (seen in CI:
        # close() then raced the first cycle).  Hold such signals until start()
        # returns; the agent's threads inherit the mask, so they go to this thread.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, stops) if masking else None
        try:
            agent.start()
        finally:
            if old_mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        agent.join()  # returns only if the agent thread ends by itself (an error)
    except _StopRequested as exc:
        log.info("signal %s: stopping", exc.args[0])
        return 0
    finally:
        agent.close()
    return 1 if agent.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent; returns the process exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        config = load_config(
            args.config,
            overrides={
                "collector": args.collector,
                "token": args.token,
                "interval": args.interval,
                "node_id": args.node_id,
                "name": args.name,
                "state_dir": args.state_dir,
                "timeout": args.timeout,
                "log_level": args.log_level,
                "spool_max_bytes": args.spool_max_bytes,
                "retry_max": args.retry_max,
                "libvirt_uri": args.libvirt_uri,
                "top_n": args.top_n,
                "processes_every": args.processes_every,
                "containers": args.containers,
                "gpus": args.gpus,
                "budget_ms": args.budget_ms,
                "allow_actions": args.allow_actions,
                "migrate_uri": args.migrate_uri,
                "image_dirs": args.image_dirs,
            },
        )
    except ConfigError as exc:
        sys.stderr.write(f"cloudmon-agent: error: {exc}\n")
        return 2
    _setup_logging(config.log_level)
    if not args.once and not config.collector:
        sys.stderr.write(f"cloudmon-agent: {USAGE_HINT}\n")
        return 2
    try:
        return _once(config) if args.once else _serve(config)
    except ConfigError as exc:  # e.g. the state dir is not writable
        sys.stderr.write(f"cloudmon-agent: error: {exc}\n")
        return 2
