"""``cloudmon-agent``: the agent's command line (also ``python -m cloudmon_agent``).

    cloudmon-agent --collector http://COLLECTOR:8470 --token TOKEN
    cloudmon-agent --once          # print one report as JSON, no collector needed

Settings come from defaults < TOML file < ``CLOUDMON_*`` environment < flags
(see :mod:`cloudmon_agent.config`).  SIGTERM and SIGINT stop it cleanly with
exit status 0; a configuration error exits with 2.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

import cloudmon_agent
from cloudmon_agent import __version__

if TYPE_CHECKING:
    import argparse

    from cloudmon_agent.config import AgentConfig

# The agent's modules are imported in main(), after _choose_wire(): they declare
# their record types against cloudmon_agent.wire, which binds on first import.

log = logging.getLogger("cloudmon_agent")

USAGE_HINT = """\
no collector given; run it as
  cloudmon-agent --collector http://COLLECTOR:8470 --token TOKEN
or set CLOUDMON_COLLECTOR and CLOUDMON_TOKEN, or put collector = "..." and token = "..."
in /etc/cloudmon/agent.toml (or pass --config FILE).
To print one report without a collector: cloudmon-agent --once"""


#: Every flag but --help and --version: (flag, metavar or None for a switch, help, group).
#: A switch sets its setting to False (``--no-gpus``: gpus) or, for --once, True.
OPTIONS: Final[tuple[tuple[str, str | None, str, str], ...]] = (
    ("--collector", "URL", "collector base URL, e.g. http://10.0.0.5:8470", ""),
    ("--token", "T", "the collector's bearer token (or CLOUDMON_TOKEN)", ""),
    ("--interval", "S", "seconds between samples (default 1)", ""),
    ("--node-id", "ID", "node id (default: generated once, kept in the state dir)", ""),
    ("--name", "NAME", "node display name (default: the hostname)", ""),
    ("--state-dir", "DIR", "where the node id and the spool are kept", ""),
    ("--timeout", "S", "seconds to wait for the collector (default 5)", ""),
    ("--spool-max-bytes", "SIZE", "most disk space for reports kept while the collector is away, "
     "e.g. 64MiB (default); when full the oldest are dropped", ""),
    ("--retry-max", "S", "longest wait between tries while the collector is away (default 30)", ""),
    ("--libvirt-uri", "URI", "libvirt URI for VM metrics (default qemu:///system; '' or none: no VMs)",
     "collectors"),
    ("--top-n", "N", "processes in each top list (default 5; 0: no process scan)", "collectors"),
    ("--processes-every", "S", "seconds between process scans (default 5)", "collectors"),
    ("--no-containers", None, "do not report containers, services and VM scopes from cgroups", "collectors"),
    ("--no-gpus", None, "do not report NVIDIA GPUs", "collectors"),
    ("--budget-ms", "MS", "collectors' CPU budget per cycle; over it the costliest runs less often "
     "(default 1; 0: off)", "collectors"),
    ("--allow-actions", "LIST", "comma-separated actions the collector may have this node run: vm.create, "
     "vm.start, vm.stop, vm.delete, vm.migrate, vm.state (default: none, every command is refused)", "actions"),
    ("--image-dirs", "LIST", "comma-separated directories vm.create may take images, templates and kernels "
     "from and put overlays in (default: none)", "actions"),
    ("--migrate-uri", "URI", "libvirt URI other hosts reach this host's libvirtd at, for live migrations to "
     "it (e.g. qemu+tcp://10.0.0.7/system)", "actions"),
    ("--config", "FILE", "TOML config file", ""),
    ("--log-level", "LEVEL", "DEBUG, INFO (default), WARNING, ERROR", ""),
    ("--once", None, "print one report as JSON on stdout and exit", ""),
)  # fmt: skip


def _dest(flag: str) -> str:
    name = flag[2:]
    return (name[3:] if name.startswith("no-") else name).replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (values stay strings; the config layer converts and validates)."""
    import argparse

    p = argparse.ArgumentParser(
        prog="cloudmon-agent",
        description="Sample this node once per interval and push reports to a cloudmon collector.",
    )
    p.add_argument("--version", action="version", version=f"cloudmon-agent {__version__}")
    groups: dict[str, Any] = {"": p}
    for flag, metavar, text, group in OPTIONS:
        where = groups.get(group) or groups.setdefault(group, p.add_argument_group(group))
        if metavar is not None:
            where.add_argument(flag, metavar=metavar, help=text)
        elif flag == "--once":
            where.add_argument(flag, action="store_true", help=text)
        else:
            where.add_argument(flag, dest=_dest(flag), action="store_const", const=False, help=text)
    return p


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """The flags as ``{setting: value}`` (None where not given); SystemExit like argparse.

    The plain ``--flag VALUE`` / ``--flag=VALUE`` forms of :data:`OPTIONS` are read
    here; anything else (--help, --version, an unknown or abbreviated flag, a
    missing value) goes to :func:`build_parser`, which prints what argparse
    prints.  argparse and what it pulls in (shutil, gettext, textwrap) would
    otherwise stay in the agent's memory for good: ≈1 MiB of RSS.
    """
    takes = {flag: metavar is not None for flag, metavar, _, _ in OPTIONS}
    out: dict[str, Any] = {_dest(flag): None for flag in takes}
    out["once"] = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, value = arg.partition("=")
        if flag not in takes or (eq and not takes[flag]):
            break
        if takes[flag]:
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                    break
                i += 1
                value = argv[i]
            out[_dest(flag)] = value
        else:
            out[_dest(flag)] = flag == "--once"
        i += 1
    else:
        return out
    return vars(build_parser().parse_args(argv))


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


def _choose_wire() -> str | None:
    """Bind :mod:`cloudmon_agent.wire` to the standard library's JSON in the agent's own process.

    msgspec would add ≈3 MiB to a process that runs on every node all day, to
    encode one report a second.  ``CLOUDMON_AGENT_WIRE=msgspec`` keeps msgspec.
    Nothing changes once the wire module is loaded (the agent runs embedded, or
    in a test).  Returns an error text for a bad ``CLOUDMON_AGENT_WIRE``.
    """
    choice = os.environ.get("CLOUDMON_AGENT_WIRE", "") or "lite"
    if choice not in ("lite", "msgspec"):
        return f"CLOUDMON_AGENT_WIRE must be lite or msgspec, got {choice!r}"
    if choice == "msgspec":
        import importlib.util

        if importlib.util.find_spec("msgspec") is None:
            return "CLOUDMON_AGENT_WIRE=msgspec needs msgspec: pip install 'cloudmon-agent[msgspec]'"
    if "cloudmon_agent.wire" not in sys.modules:
        cloudmon_agent.WIRE = choice
    return None


def _once(config: AgentConfig) -> int:
    from cloudmon_agent.agent import Agent
    from cloudmon_agent.schema import encode

    with Agent(config, whole_process=True) as agent:
        agent.prime()
        # The measuring window for rates, not a readiness wait.
        time.sleep(min(config.interval, 1.0))
        report = agent.sample()
    sys.stdout.write(encode(report).decode("utf-8") + "\n")
    sys.stdout.flush()
    return 0


def _serve(config: AgentConfig) -> int:
    from cloudmon_agent.agent import Agent

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
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else 2
    problem = _choose_wire()
    if problem:
        sys.stderr.write(f"cloudmon-agent: error: {problem}\n")
        return 2
    from cloudmon_agent.config import ConfigError, load_config

    try:
        config = load_config(
            Path(args["config"]) if args["config"] is not None else None,
            overrides={k: v for k, v in args.items() if k not in ("config", "once")},
        )
    except ConfigError as exc:
        sys.stderr.write(f"cloudmon-agent: error: {exc}\n")
        return 2
    _setup_logging(config.log_level)
    if not args["once"] and not config.collector:
        sys.stderr.write(f"cloudmon-agent: {USAGE_HINT}\n")
        return 2
    try:
        return _once(config) if args["once"] else _serve(config)
    except ConfigError as exc:  # e.g. the state dir is not writable
        sys.stderr.write(f"cloudmon-agent: error: {exc}\n")
        return 2
