"""Containers, services and VM scopes through cgroups (v1 and v2).

Which groups count (matched on the last path component):

- docker: ``docker-<id>.scope`` (systemd driver) or ``docker/<id>`` (cgroupfs
  driver, v1 and v2);
- podman: ``libpod-<id>.scope`` / ``libpod-<id>`` (not ``libpod-conmon-*``);
- systemd services: ``system.slice/<unit>.service``;
- libvirt VMs: ``machine.slice/machine-qemu\\x2d<n>\\x2d<name>.scope`` or the
  cgroupfs ``machine/<name>.libvirt-qemu``.

Docker containers are named from ``/var/lib/docker/containers/<id>/config.v2.json``
(read once per container, when it is discovered); otherwise, and for podman,
the 12-character short id is the name.

Layout: pure v2 when ``<root>/cgroup.controllers`` exists; else v1 with
``cpuacct`` (or ``cpu,cpuacct``), ``memory`` and ``blkio`` hierarchies under
``<root>``.  A hybrid host (v1 + an empty ``unified`` v2) is read as v1.  The
group list is re-scanned every ``refresh_s`` seconds; each sample reads
three or four small files per group.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from typing import Final

from cloudmon_agent.collectors.counters import KeyedRates
from cloudmon_agent.schema import Container
from cloudmon_agent.wire import DecodeError, Struct, decode_any

log = logging.getLogger(__name__)

_DOCKER_SCOPE: Final = re.compile(r"^docker-([0-9a-f]{12,64})\.scope$")
_PODMAN: Final = re.compile(r"^libpod-(?!conmon-)([0-9a-f]{12,64})(?:\.scope)?$")
_HEX_ID: Final = re.compile(r"^[0-9a-f]{64}$")
_MACHINE_SCOPE: Final = re.compile(r"^machine-qemu\\x2d\d+\\x2d(.+)\.scope$")
_MACHINE_V1: Final = re.compile(r"^(.+)\.libvirt-qemu$")
_MAX_DEPTH: Final = 5
#: v1 reports "no limit" as a huge page-aligned number.
_V1_UNLIMITED: Final = 1 << 62


class Group(Struct, frozen=True):
    """One cgroup worth reporting: its path relative to the hierarchy root."""

    rel: str
    name: str
    kind: str


def _unescape_systemd(s: str) -> str:
    return re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), s)


def classify(rel: str, docker_root: str = "/var/lib/docker") -> Group | None:
    """The :class:`Group` for a cgroup path (``/system.slice/x.service``), or None if not counted."""
    g = _classify(rel, docker_root)
    if g is not None and len(g.name) > 255:  # schema.Label: a longer name would get the report rejected
        g = Group(g.rel, g.name[:255], g.kind)
    return g


def _classify(rel: str, docker_root: str) -> Group | None:
    parts = [p for p in rel.split("/") if p]
    if not parts:
        return None
    leaf = parts[-1]
    parent = parts[-2] if len(parts) >= 2 else ""
    if m := _DOCKER_SCOPE.match(leaf):
        return Group(rel, _docker_name(m.group(1), docker_root), "docker")
    if parent == "docker" and _HEX_ID.match(leaf):
        return Group(rel, _docker_name(leaf, docker_root), "docker")
    if m := _PODMAN.match(leaf):
        return Group(rel, m.group(1)[:12], "podman")
    if m := _MACHINE_SCOPE.match(leaf):
        return Group(rel, _unescape_systemd(m.group(1)), "vm")
    if parent == "machine" and (m := _MACHINE_V1.match(leaf)):
        return Group(rel, m.group(1), "vm")
    if parent == "system.slice" and leaf.endswith(".service"):
        return Group(rel, _unescape_systemd(leaf), "service")
    return None


def _docker_name(cid: str, docker_root: str) -> str:
    try:
        with open(f"{docker_root}/containers/{cid}/config.v2.json", "rb") as fh:
            name = decode_any(fh.read()).get("Name", "")
    except (OSError, ValueError, AttributeError, DecodeError):
        name = ""
    name = str(name).lstrip("/")
    return name[:255] if name else cid[:12]


def _walk(root: str) -> list[str]:
    """Relative paths of every cgroup under ``root`` (to a bounded depth)."""
    out: list[str] = []
    stack = [("", 0)]
    while stack:
        rel, depth = stack.pop()
        if depth >= _MAX_DEPTH:
            continue
        try:
            with os.scandir(root + rel) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        child = f"{rel}/{e.name}"
                        out.append(child)
                        stack.append((child, depth + 1))
        except OSError:
            continue
    return out


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


class ContainerCollector:
    """Fills ``Report.containers``: CPU, memory and I/O per counted cgroup."""

    field: str = "containers"

    def __init__(
        self,
        root: str = "/sys/fs/cgroup",
        *,
        host_cpus: int | None = None,
        refresh_s: float = 30.0,
        docker_root: str = "/var/lib/docker",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self.v2 = os.path.exists(f"{root}/cgroup.controllers")
        self._cpus = host_cpus or os.cpu_count() or 1
        self._refresh_s = refresh_s
        self._docker_root = docker_root
        self._clock = clock
        self._next_refresh = 0.0
        self._groups: list[Group] = []
        self._rates = KeyedRates()
        if self.v2:
            self._cpu_root = self._mem_root = self._io_root = root
        else:
            self._cpu_root = next(
                (
                    f"{root}/{d}"
                    for d in ("cpuacct", "cpu,cpuacct", "cpuacct,cpu")
                    if os.path.isdir(f"{root}/{d}")
                ),
                f"{root}/cpuacct",
            )
            self._mem_root = f"{root}/memory"
            self._io_root = f"{root}/blkio"

    @property
    def groups(self) -> list[Group]:
        """The groups found by the last scan."""
        return list(self._groups)

    def refresh(self) -> None:
        """Re-scan the hierarchy for containers, services and VM scopes."""
        found: list[Group] = []
        for rel in _walk(self._cpu_root):
            g = classify(rel, self._docker_root)
            if g is not None:
                found.append(g)
        self._groups = found

    def prime(self) -> None:
        """Scan and take the first CPU and I/O readings."""
        self.collect()

    def collect(self) -> list[Container]:
        """One sample of every counted group (rates 0 for a group's first sample)."""
        now = self._clock()
        if now >= self._next_refresh:
            self.refresh()
            self._next_refresh = now + self._refresh_s
        raw: dict[str, tuple[int, int, int]] = {}
        mem: dict[str, tuple[int, int | None]] = {}
        for g in self._groups:
            try:
                cpu_ns = self._cpu_ns(g.rel)
            except (OSError, ValueError, IndexError):
                continue  # the group went away since the scan
            rd, wr = self._io_bytes(g.rel)
            raw[g.rel] = (cpu_ns, rd, wr)
            mem[g.rel] = self._memory(g.rel)
        rates = self._rates.update(raw, now)
        out: list[Container] = []
        for g in self._groups:
            if g.rel not in raw:
                continue
            r = rates.get(g.rel) or [0.0, 0.0, 0.0]
            used, limit = mem[g.rel]
            out.append(
                Container(
                    name=g.name,
                    kind=g.kind,
                    cpu_percent=min(100.0, r[0] / 1e9 / self._cpus * 100.0),
                    mem_bytes=used,
                    mem_limit=limit,
                    io_read_bps=r[1],
                    io_write_bps=r[2],
                )
            )
        return out

    def _cpu_ns(self, rel: str) -> int:
        if self.v2:
            for line in _read(f"{self._cpu_root}{rel}/cpu.stat").split(b"\n"):
                if line.startswith(b"usage_usec "):
                    return int(line.split()[1]) * 1000
            raise ValueError("no usage_usec in cpu.stat")
        return int(_read(f"{self._cpu_root}{rel}/cpuacct.usage"))

    def _memory(self, rel: str) -> tuple[int, int | None]:
        try:
            if self.v2:
                used = int(_read(f"{self._mem_root}{rel}/memory.current"))
                lim_s = _read(f"{self._mem_root}{rel}/memory.max").strip()
                return used, None if lim_s == b"max" else int(lim_s)
            used = int(_read(f"{self._mem_root}{rel}/memory.usage_in_bytes"))
            lim = int(_read(f"{self._mem_root}{rel}/memory.limit_in_bytes"))
        except (OSError, ValueError):
            return 0, None
        return used, None if lim >= _V1_UNLIMITED else lim

    def _io_bytes(self, rel: str) -> tuple[int, int]:
        rd = wr = 0
        try:
            if self.v2:
                # "8:0 rbytes=1 wbytes=2 rios=3 wios=4 ..." per device
                for line in _read(f"{self._io_root}{rel}/io.stat").split(b"\n"):
                    for kv in line.split()[1:]:
                        k, _, v = kv.partition(b"=")
                        if k == b"rbytes":
                            rd += int(v)
                        elif k == b"wbytes":
                            wr += int(v)
            else:
                # "8:0 Read 123" per device and op, then "Total N"
                for line in _read(f"{self._io_root}{rel}/blkio.throttle.io_service_bytes").split(b"\n"):
                    f = line.split()
                    if len(f) == 3 and f[1] == b"Read":
                        rd += int(f[2])
                    elif len(f) == 3 and f[1] == b"Write":
                        wr += int(f[2])
        except (OSError, ValueError):
            pass
        return rd, wr

    def close(self) -> None:
        """Nothing kept open."""
        self._groups = []
