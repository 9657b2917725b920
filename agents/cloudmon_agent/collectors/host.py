"""Host-wide usage: CPU, memory, swap, disk I/O, filesystems, network, load, uptime.

Split in two so the cheap path stays cheap and the rate logic is shared:

- a *source* reads raw values: :class:`ProcSource` parses ``/proc`` directly
  on Linux (a few kept-open files, no per-call psutil object churn);
  :class:`PsutilSource` is the portable fallback for other systems;
- :class:`HostCollector` owns every stateful counter (one
  :class:`~cloudmon_agent.collectors.counters.CpuPercent` and two
  :class:`~cloudmon_agent.collectors.counters.RateCounter`) and turns raw
  values into :class:`~cloudmon_agent.schema.HostMetrics`.

What counts (and why):

- disk I/O is summed over *physical* disks (``/sys/block/X/device`` exists):
  partitions, loop, zram, device-mapper and md devices would count the same
  bytes twice or count memory;
- network is summed over physical interfaces (not under
  ``/sys/devices/virtual/net``) when there are any, so bridge, tap, veth and
  bond traffic on a VM host is not counted two or three times; where every
  interface is virtual (a container) all but loopback count;
- filesystems are the real mounted ones: pseudo (``nodev``) filesystems,
  read-only images (squashfs, erofs) and network filesystems (whose
  ``statvfs`` can hang on a dead server) are skipped, ``/`` is always kept,
  and bind mounts of one device are reported once.

Device lists and the mount table are re-scanned every ``refresh_s`` seconds
(30 by default), not every sample.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable
from typing import Any, Final, NamedTuple, Protocol, TypeVar

from cloudmon_agent.collectors.counters import CpuPercent, KeyedRates, RateCounter
from cloudmon_agent.collectors.procfs import ProcFile
from cloudmon_agent.schema import DiskIO, Filesystem, HostMetrics, NicIO, Pressure, Sensor

log = logging.getLogger(__name__)

_SECTOR: Final = 512  # /proc/diskstats counts 512-byte sectors whatever the device's block size
_MAX_MOUNT_LEN: Final = 255  # schema.Label
_MAX_FSTYPE_LEN: Final = 64
#: Read-only images: always 100 % full, one per snap/app; noise, not capacity.
_IMAGE_FS: Final = frozenset({"squashfs", "erofs"})
#: ``nodev`` filesystems that do hold local data.
_LOCAL_NODEV_FS: Final = frozenset({"zfs"})
#: Used when /proc/filesystems cannot be read; also covers network filesystems.
_PSEUDO_FS: Final = frozenset(
    {
        "autofs", "binfmt_misc", "bpf", "cgroup", "cgroup2", "configfs", "debugfs", "devpts",
        "devtmpfs", "efivarfs", "fuse", "fusectl", "hugetlbfs", "mqueue", "nsfs", "overlay",
        "proc", "pstore", "ramfs", "rpc_pipefs", "securityfs", "selinuxfs", "sysfs", "tmpfs",
        "tracefs", "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "9p", "virtiofs",
    }
)  # fmt: skip
_OCTAL_ESCAPE: Final = re.compile(r"\\([0-7]{3})")


#: The /proc/meminfo lines read (a key starts a line: "SwapCached:" is not "Cached:").
_MEMINFO_LINE: Final = re.compile(
    rb"^(MemTotal|MemAvailable|MemFree|Buffers|Cached|SwapTotal|SwapFree):\s+(\d+)", re.MULTILINE
)


def _line_of(data: bytes, name: bytes, end_mark: bytes) -> bytes:
    """The line of ``data`` whose field ``name`` is followed by ``end_mark``, or b"".

    The name starts a line or follows a space (/proc/net/dev right-aligns names
    in 6 columns, so ``enp0s31f6:`` starts its line; ``veth0:`` is not ``eth0:``).
    """
    for marker in (b" " + name + end_mark, b"\n" + name + end_mark):
        at = data.find(marker)
        if at >= 0:
            at += 1
            break
    else:
        if not data.startswith(name + end_mark):
            return b""
        at = 0
    start = data.rfind(b"\n", 0, at) + 1
    end = data.find(b"\n", at)
    return data[start : end if end >= 0 else len(data)]


class MemInfo(NamedTuple):
    """Memory and swap in bytes."""

    total: int
    available: int
    swap_total: int
    swap_free: int


class Mount(NamedTuple):
    """One mounted filesystem worth reporting."""

    mount: str
    fstype: str
    source: str


class HostSource(Protocol):
    """Reads raw host values; :class:`HostCollector` turns them into rates."""

    def refresh(self) -> None:
        """Re-scan slow-changing things: disks, interfaces, mounts."""

    def cpu_times(self) -> dict[int, tuple[float, float]]:
        """Cumulative ``(busy, idle)`` time per CPU number, in any fixed unit."""

    def memory(self) -> MemInfo:
        """Current memory and swap."""

    def disk_counters(self) -> dict[str, tuple[int, int, int, int]]:
        """Per physical disk: cumulative read bytes, write bytes, reads, writes."""

    def net_counters(self) -> dict[str, tuple[int, int, int, int]]:
        """Per counted interface: cumulative rx bytes, tx bytes, rx packets, tx packets."""

    def mounts(self) -> list[Mount]:
        """The filesystems to report (as of the last :meth:`refresh`)."""

    def fs_usage(self, path: str) -> tuple[int, int, float]:
        """``(total, used, percent)`` of the filesystem mounted at ``path``; raises OSError."""

    def loadavg(self) -> tuple[float, float, float]:
        """1, 5 and 15 minute load averages."""

    def uptime(self) -> float:
        """Seconds since boot."""

    def close(self) -> None:
        """Release kept-open files."""


def _unescape_mount(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \ooo.
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def select_mounts(entries: Iterable[tuple[str, str, str]], nodev: frozenset[str]) -> list[Mount]:
    """Pick the filesystems to report from ``(source, mount point, fstype)`` in mount order.

    A later mount on the same point hides the earlier one; pseudo, image and
    network filesystems are dropped (``/`` is always kept); of several mounts
    of one source (bind mounts) the shortest path is kept, ``/`` first.
    """
    visible: dict[str, Mount] = {}
    for source, mount, fstype in entries:
        visible.pop(mount, None)  # re-insert so order follows the visible mount
        visible[mount] = Mount(mount, fstype, source)
    by_source: dict[str, Mount] = {}
    for m in visible.values():
        if m.mount != "/":
            if m.fstype in _IMAGE_FS or m.fstype.startswith("fuse."):
                continue
            if (m.fstype in nodev or m.fstype in _PSEUDO_FS) and m.fstype not in _LOCAL_NODEV_FS:
                continue
        if len(m.mount) > _MAX_MOUNT_LEN or len(m.fstype) > _MAX_FSTYPE_LEN:
            continue  # would fail the schema and get the whole report rejected
        cur = by_source.get(m.source)
        if cur is None or m.mount == "/" or (cur.mount != "/" and len(m.mount) < len(cur.mount)):
            by_source[m.source] = m
    return sorted(by_source.values(), key=lambda m: (m.mount != "/", m.mount))


class ProcSource:
    """Linux: parse ``/proc`` and ``/sys`` directly.  ``root`` is for tests only."""

    def __init__(self, proc: str = "/proc", sys: str = "/sys") -> None:
        self._proc = proc
        self._sys = sys
        #: Where this source reads ``/proc`` and ``/sys`` (other readers of the same tree follow it).
        self.proc_root = proc
        self.sys_root = sys
        # The per-CPU lines come first; stop before the (huge) intr line.
        self._stat = ProcFile(f"{proc}/stat", stop_at=b"\nintr")
        self._meminfo = ProcFile(f"{proc}/meminfo")
        self._diskstats = ProcFile(f"{proc}/diskstats")
        self._netdev = ProcFile(f"{proc}/net/dev")
        self._uptime = ProcFile(f"{proc}/uptime")
        self._loadavg = ProcFile(f"{proc}/loadavg")
        #: Per disk, cumulative ms with I/O in flight (``io_ticks``), from the last disk read.
        self.io_ticks: dict[str, int] = {}
        #: Per interface, cumulative rx errors, tx errors, rx drops, tx drops, from the last read.
        self.net_errors: dict[str, tuple[int, int, int, int]] = {}
        self._disks: frozenset[str] | None = None  # None: no sysfs, filter by name
        self._nics: frozenset[str] | None = None  # None: every interface but loopback
        self._mounts: list[Mount] = []
        self.refresh()

    # -- slow-changing state ------------------------------------------------
    def refresh(self) -> None:
        self._disks = self._scan_disks()
        self._nics = self._scan_nics()
        self._mounts = self._scan_mounts()

    def _scan_disks(self) -> frozenset[str] | None:
        try:
            names = os.listdir(f"{self._sys}/block")
        except OSError:
            return None
        # Whole disks backed by a device; loop, ram, zram, dm-* and md* have no
        # ``device`` link, and partitions are not listed in /sys/block at all.
        return frozenset(n for n in names if os.path.exists(f"{self._sys}/block/{n}/device"))

    def _scan_nics(self) -> frozenset[str] | None:
        base = f"{self._sys}/class/net"
        try:
            names = os.listdir(base)
        except OSError:
            return None
        physical = frozenset(
            n for n in names if "/devices/virtual/" not in os.path.realpath(os.path.join(base, n))
        )
        return physical or None

    def _scan_mounts(self) -> list[Mount]:
        try:
            with open(f"{self._proc}/filesystems", encoding="utf-8") as fh:
                nodev = frozenset(
                    line.split()[-1] for line in fh if line.startswith("nodev") and line.split()
                )
        except OSError:
            nodev = frozenset()
        entries: list[tuple[str, str, str]] = []
        try:
            with open(f"{self._proc}/self/mounts", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    parts = line.split()
                    if len(parts) >= 3:
                        entries.append((_unescape_mount(parts[0]), _unescape_mount(parts[1]), parts[2]))
        except OSError as exc:
            log.debug("cannot read the mount table: %s", exc)
            return [Mount("/", "", "/")]
        return select_mounts(entries, nodev)

    # -- per-sample reads ---------------------------------------------------
    def cpu_times(self) -> dict[int, tuple[float, float]]:
        out: dict[int, tuple[float, float]] = {}
        for line in self._stat.read().split(b"\n"):
            if not line.startswith(b"cpu"):
                break  # the cpu lines come first
            f = line.split()
            if f[0] == b"cpu" or len(f) < 5:
                continue  # the aggregate line: the total is derived from the cores
            v = [int(x) for x in f[1:9]]
            v += [0] * (8 - len(v))
            user, nice, system, idle, iowait, irq, softirq, steal = v
            # guest time is already inside user/nice; steal counts as busy (as psutil does)
            out[int(f[0][3:])] = (user + nice + system + irq + softirq + steal, idle + iowait)
        return out

    def memory(self) -> MemInfo:
        # One regex pass for the seven wanted keys, not a split of all ~50 lines.
        got = {k: int(v) * 1024 for k, v in _MEMINFO_LINE.findall(self._meminfo.read())}
        total = got.get(b"MemTotal", 0)
        avail = got.get(b"MemAvailable")
        if avail is None:  # kernels before 3.14
            avail = got.get(b"MemFree", 0) + got.get(b"Buffers", 0) + got.get(b"Cached", 0)
        return MemInfo(total, min(avail, total), got.get(b"SwapTotal", 0), got.get(b"SwapFree", 0))

    def disk_counters(self) -> dict[str, tuple[int, int, int, int]]:
        disks = self._disks
        data = self._diskstats.read()
        out: dict[str, tuple[int, int, int, int]] = {}
        ticks: dict[str, int] = {}
        self.io_ticks = ticks
        if disks is not None:
            # The known disks' lines only ("   8  0 sda 1 2 ..."): loop, ram and
            # partition lines, often most of the file, are never split.
            lines = [ln for ln in (_line_of(data, d.encode(), b" ") for d in disks) if ln]
        else:
            lines = data.split(b"\n")
        for line in lines:
            f = line.split()
            if len(f) < 10:
                continue
            name = f[2].decode()
            if disks is not None and name not in disks:
                continue
            if disks is None and not _looks_like_physical_disk(name):
                continue
            out[name] = (int(f[5]) * _SECTOR, int(f[9]) * _SECTOR, int(f[3]), int(f[7]))
            if len(f) >= 13:
                ticks[name] = int(f[12])
        return out

    def net_counters(self) -> dict[str, tuple[int, int, int, int]]:
        nics = self._nics
        data = self._netdev.read()
        out: dict[str, tuple[int, int, int, int]] = {}
        errs: dict[str, tuple[int, int, int, int]] = {}
        self.net_errors = errs
        if nics is not None:
            # The counted interfaces' lines only ("  eth0: 123 ...").
            lines = [ln for ln in (_line_of(data, n.encode(), b":") for n in nics) if ln]
        else:
            lines = data.split(b"\n")[2:]
        for line in lines:
            name_b, sep, rest = line.partition(b":")
            if not sep:
                continue
            name = name_b.strip().decode()
            if (nics is not None and name not in nics) or name == "lo":
                continue
            f = rest.split()
            if len(f) >= 12:
                out[name] = (int(f[0]), int(f[8]), int(f[1]), int(f[9]))
                errs[name] = (int(f[2]), int(f[10]), int(f[3]), int(f[11]))
        return out

    def mounts(self) -> list[Mount]:
        return self._mounts

    def fs_usage(self, path: str) -> tuple[int, int, float]:
        st = os.statvfs(path)
        total = st.f_blocks * st.f_frsize
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        avail = st.f_bavail * st.f_frsize
        # As df does: the share of what non-root users could have that is used.
        denom = used + avail
        return total, used, (min(100.0, 100.0 * used / denom) if denom > 0 else 0.0)

    def loadavg(self) -> tuple[float, float, float]:
        f = self._loadavg.read().split()
        return float(f[0]), float(f[1]), float(f[2])

    def uptime(self) -> float:
        if self._proc == "/proc" and hasattr(time, "CLOCK_BOOTTIME"):
            # /proc/uptime's first figure is this clock: no file to read.
            return time.clock_gettime(time.CLOCK_BOOTTIME)
        return float(self._uptime.read().split()[0])

    def close(self) -> None:
        for f in (self._stat, self._meminfo, self._diskstats, self._netdev, self._uptime, self._loadavg):
            f.close()


_VIRTUAL_DISK = re.compile(r"^(loop|ram|zram|dm-|md|nbd|sr|fd)\d")
_PARTITION = re.compile(r"^((sd|hd|vd|xvd)[a-z]+\d+|(nvme\d+n\d+|mmcblk\d+)p\d+)$")


def _looks_like_physical_disk(name: str) -> bool:
    # Only used without sysfs: the usual names of virtual devices and partitions.
    return not (_VIRTUAL_DISK.match(name) or _PARTITION.match(name))


class PsutilSource:
    """Portable fallback (macOS, Windows, BSD) built on psutil."""

    def __init__(self) -> None:
        import psutil  # only here: Linux never pays for importing it

        self._ps = psutil
        self._boot = psutil.boot_time()
        self._mounts: list[Mount] = []
        self.refresh()

    def refresh(self) -> None:
        entries = [(p.device, p.mountpoint, p.fstype) for p in self._ps.disk_partitions(all=False)]
        self._mounts = select_mounts(entries, frozenset())

    def cpu_times(self) -> dict[int, tuple[float, float]]:
        out: dict[int, tuple[float, float]] = {}
        for i, t in enumerate(self._ps.cpu_times(percpu=True)):
            d = t._asdict()
            idle = d.get("idle", 0.0) + d.get("iowait", 0.0)
            busy = sum(d.values()) - idle - d.get("guest", 0.0) - d.get("guest_nice", 0.0)
            out[i] = (busy, idle)
        return out

    def memory(self) -> MemInfo:
        vm = self._ps.virtual_memory()
        sw = self._ps.swap_memory()
        return MemInfo(int(vm.total), int(vm.available), int(sw.total), int(sw.free))

    def disk_counters(self) -> dict[str, tuple[int, int, int, int]]:
        per = self._ps.disk_io_counters(perdisk=True) or {}
        return {k: (v.read_bytes, v.write_bytes, v.read_count, v.write_count) for k, v in per.items()}

    def net_counters(self) -> dict[str, tuple[int, int, int, int]]:
        per = self._ps.net_io_counters(pernic=True) or {}
        return {
            k: (v.bytes_recv, v.bytes_sent, v.packets_recv, v.packets_sent)
            for k, v in per.items()
            if not (k.startswith("lo") or "loopback" in k.lower())
        }

    def mounts(self) -> list[Mount]:
        return self._mounts

    def fs_usage(self, path: str) -> tuple[int, int, float]:
        u = self._ps.disk_usage(path)
        return int(u.total), int(u.used), min(100.0, max(0.0, float(u.percent)))

    def loadavg(self) -> tuple[float, float, float]:
        return self._ps.getloadavg()

    def uptime(self) -> float:
        return max(0.0, time.time() - self._boot)

    def close(self) -> None:
        pass


_PSI_RESOURCES: Final = ("cpu", "memory", "io")


class PressureReader:
    """Pressure stall information from ``/proc/pressure/{cpu,memory,io}`` (Linux >= 4.20).

    Reports the kernel's ``avg10`` and, from the cumulative ``total`` (µs
    stalled), the stalled share of the last interval.  Resources whose file is
    missing (older kernels, PSI disabled) are left out; no file at all gives
    an empty list.
    """

    def __init__(self, proc: str = "/proc") -> None:
        self._files = {
            r: ProcFile(f"{proc}/pressure/{r}")
            for r in _PSI_RESOURCES
            if os.path.exists(f"{proc}/pressure/{r}")
        }
        self._rates = KeyedRates()

    def read(self, now: float) -> list[Pressure]:
        """One reading; the ``*_percent`` figures are 0 on the first."""
        parsed: dict[str, tuple[float, float | None, int, int | None]] = {}
        for res, f in list(self._files.items()):
            try:
                text = f.read()
            except OSError:
                continue
            some_avg: float | None = None
            full_avg: float | None = None
            some_total = 0
            full_total: int | None = None
            for line in text.split(b"\n"):
                kind, _, rest = line.partition(b" ")
                if kind not in (b"some", b"full"):
                    continue
                vals = dict(kv.split(b"=", 1) for kv in rest.split() if b"=" in kv)
                avg = float(vals.get(b"avg10", b"0"))
                total = int(vals.get(b"total", b"0"))
                if kind == b"some":
                    some_avg, some_total = avg, total
                else:
                    full_avg, full_total = avg, total
            if some_avg is not None:
                parsed[res] = (some_avg, full_avg, some_total, full_total)
        rates = self._rates.update(
            {r: (v[2], v[3] if v[3] is not None else 0) for r, v in parsed.items()}, now
        )
        out: list[Pressure] = []
        for res, (some_avg, full_avg, _, full_total) in parsed.items():
            r = rates.get(res) or [0.0, 0.0]
            # total is in µs: µs per s / 1e4 = percent of the interval
            out.append(
                Pressure(
                    resource=res,
                    some_avg10=_clamp(some_avg),
                    some_percent=_clamp(r[0] / 1e4),
                    # The cpu "full" line exists since 5.13 but is always 0 at system level.
                    full_avg10=_clamp(full_avg) if full_avg is not None else None,
                    full_percent=_clamp(r[1] / 1e4) if full_total is not None else None,
                )
            )
        return out

    def close(self) -> None:
        """Release the kept-open files."""
        for f in self._files.values():
            f.close()


class SensorReader:
    """Temperatures and fan speeds from ``/sys/class/hwmon`` (cheap: a few kept-open files).

    The list of inputs is scanned by :meth:`refresh`; no hwmon directory (a VM,
    a container) gives an empty list.
    """

    def __init__(self, sys: str = "/sys") -> None:
        self._base = f"{sys}/class/hwmon"
        self._inputs: list[tuple[str, str, str, ProcFile]] = []
        self.refresh()

    def refresh(self) -> None:
        """Re-scan the sensor inputs."""
        self.close()
        inputs: list[tuple[str, str, str, ProcFile]] = []
        try:
            chips = sorted(os.listdir(self._base))
        except OSError:
            self._inputs = []
            return
        for chip_dir in chips:
            d = os.path.join(self._base, chip_dir)
            try:
                with open(os.path.join(d, "name"), encoding="utf-8") as fh:
                    chip = fh.read().strip() or chip_dir
                files = sorted(os.listdir(d))
            except OSError:
                continue
            for fn in files:
                m = _SENSOR_INPUT.match(fn)
                if not m:
                    continue
                kind, num = m.group(1), m.group(2)
                label = f"{kind}{num}"
                try:
                    with open(os.path.join(d, f"{kind}{num}_label"), encoding="utf-8") as fh:
                        label = fh.read().strip() or label
                except OSError:
                    pass
                inputs.append((chip[:255], label[:255], kind, ProcFile(os.path.join(d, fn))))
        self._inputs = inputs

    def read(self) -> list[Sensor]:
        """Current readings (°C for ``temp``, RPM for ``fan``); unreadable inputs are skipped."""
        out: list[Sensor] = []
        for chip, label, kind, f in self._inputs:
            try:
                raw = int(f.read().strip())
            except (OSError, ValueError):
                continue
            out.append(
                Sensor(
                    chip=chip, label=label, kind=kind, value=raw / 1000.0 if kind == "temp" else float(raw)
                )
            )
        return out

    def close(self) -> None:
        """Release the kept-open files."""
        for *_, f in self._inputs:
            f.close()


_SENSOR_INPUT: Final = re.compile(r"^(temp|fan)(\d+)_input$")


def _clamp(v: float) -> float:
    return min(100.0, max(0.0, v))


def default_source() -> HostSource:
    """:class:`ProcSource` where ``/proc`` is Linux's, else :class:`PsutilSource`."""
    if os.path.exists("/proc/stat") and os.path.exists("/proc/meminfo"):
        return ProcSource()
    return PsutilSource()


_T = TypeVar("_T")


class HostCollector:
    """Fills ``Report.host``.  Owns the CPU, disk and network counters.

    The first :meth:`collect` (or :meth:`prime`) only primes the counters: its
    CPU percentages and rates are 0.  Not thread-safe; one sampler calls it.
    """

    field: str = "host"

    def __init__(
        self,
        source: HostSource | None = None,
        *,
        refresh_s: float = 30.0,
        slow_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        extras: bool | None = None,
        pressure: PressureReader | None = None,
        sensors: SensorReader | None = None,
    ) -> None:
        """``extras`` turns on per-disk, per-NIC, pressure and sensor lists (default: on Linux).

        ``pressure`` and ``sensors`` replace the readers of the real ``/proc``
        and ``/sys`` (tests point them at fake trees).  Filesystem usage,
        pressure and sensors change slowly (and the load averages only every 5 s)
        and are read every ``slow_s``
        seconds (reports in between repeat the last reading): ``statvfs`` per
        mount and a file per sensor are a fifth of the host collector's CPU.
        """
        self._source = source if source is not None else default_source()
        self._refresh_s = refresh_s
        self._clock = clock
        self._next_refresh = clock() + refresh_s
        self._slow_s = slow_s
        self._next_slow = -math.inf
        self._slow: dict[str, list[Any]] = {}
        self._load: tuple[float, float, float] = (0.0, 0.0, 0.0)
        self._cpu = CpuPercent()
        self._disk = RateCounter(4)
        self._net = RateCounter(4)
        self._disk_each = KeyedRates()
        self._net_each = KeyedRates()
        self._failed: set[str] = set()
        linux = isinstance(self._source, ProcSource)
        self._extras = extras if extras is not None else linux
        if isinstance(self._source, ProcSource) and self._extras:
            # Same tree as the source's: a fake /proc in tests, the real one otherwise.
            if pressure is None:
                pressure = PressureReader(self._source.proc_root)
            if sensors is None:
                sensors = SensorReader(self._source.sys_root)
        self._pressure = pressure
        self._sensors = sensors

    @property
    def primed(self) -> bool:
        """True once the counters hold a first sample."""
        return self._cpu.primed

    def prime(self) -> None:
        """Take the first reading of every counter (rates need two)."""
        self.collect()

    def _read(self, what: str, read: Callable[[], _T], default: _T) -> _T:
        # Missing data (no /proc/diskstats in a container, a vanished mount)
        # must not cost the whole sample: use the default, warn once per kind.
        try:
            value = read()
        except (OSError, ValueError, IndexError) as exc:
            if what not in self._failed:
                self._failed.add(what)
                log.warning("cannot read %s: %s; reporting it as zero", what, exc)
            return default
        if what in self._failed:
            self._failed.discard(what)
            log.info("reading %s works again", what)
        return value

    def collect(self) -> HostMetrics:
        """One sample of the host (rates over the time since the previous call)."""
        src = self._source
        now = self._clock()
        if now >= self._next_refresh:
            self._read("device and mount lists", src.refresh, None)
            if self._sensors is not None:
                self._read("hwmon sensors", self._sensors.refresh, None)
            self._next_refresh = now + self._refresh_s
        times: dict[int, tuple[float, float]] = self._read("CPU times", src.cpu_times, {})
        cpu = self._cpu.update(times)
        cpu_total, per_core = cpu if cpu is not None else (0.0, [0.0] * (max(times, default=-1) + 1))
        disk_raw: dict[str, tuple[int, int, int, int]] = self._read("disk counters", src.disk_counters, {})
        net_raw: dict[str, tuple[int, int, int, int]] = self._read("network counters", src.net_counters, {})
        if self._extras:
            # The totals are the sums of the per-device rates: one pass over the counters.
            disks, disk = self._per_disk(disk_raw, now)
            nics, net = self._per_nic(net_raw, now)
        else:
            disks, nics = [], []
            disk = self._disk.update(disk_raw, now) or [0.0] * 4
            net = self._net.update(net_raw, now) or [0.0] * 4
        if now >= self._next_slow:
            slow: dict[str, list[Any]] = {"filesystems": self._filesystems()}
            if self._extras and self._pressure is not None:
                slow["pressure"] = self._pressure.read(now)
            if self._extras and self._sensors is not None:
                slow["sensors"] = self._sensors.read()
            self._slow = slow
            # The kernel recomputes the load averages every 5 s (LOAD_FREQ): read them then.
            self._load = self._read("load average", src.loadavg, (0.0, 0.0, 0.0))
            self._next_slow = now + self._slow_s
        extras: dict[str, list[Any]] = dict(self._slow)
        if self._extras:
            extras["disks"] = disks
            extras["nics"] = nics
        mem = self._read("memory", src.memory, MemInfo(0, 0, 0, 0))
        load = self._load
        mem_used = mem.total - mem.available
        swap_used = max(0, mem.swap_total - mem.swap_free)
        return HostMetrics(
            cpu_percent=cpu_total,
            cpu_per_core=per_core,
            mem_total=mem.total,
            mem_used=mem_used,
            mem_available=mem.available,
            mem_percent=_pct(mem_used, mem.total),
            swap_total=mem.swap_total,
            swap_used=swap_used,
            swap_percent=_pct(swap_used, mem.swap_total),
            disk_read_bps=disk[0],
            disk_write_bps=disk[1],
            disk_read_iops=disk[2],
            disk_write_iops=disk[3],
            net_rx_bps=net[0],
            net_tx_bps=net[1],
            net_rx_pps=net[2],
            net_tx_pps=net[3],
            load1=max(0.0, load[0]),
            load5=max(0.0, load[1]),
            load15=max(0.0, load[2]),
            uptime_s=max(0.0, self._read("uptime", src.uptime, 0.0)),
            **extras,
        )

    def _per_disk(
        self, raw: dict[str, tuple[int, int, int, int]], now: float
    ) -> tuple[list[DiskIO], list[float]]:
        """Per-disk rates, and their sums (read/write bytes and operations per second)."""
        ticks: dict[str, int] = getattr(self._source, "io_ticks", {})
        both = {k: (*v, ticks.get(k, 0)) for k, v in raw.items()}
        out: list[DiskIO] = []
        total = [0.0, 0.0, 0.0, 0.0]
        for name, r in sorted(self._disk_each.update(both, now).items()):
            if r is None:  # new since the last sample: counted from the next one
                r = [0.0] * 5
            else:
                total = [total[0] + r[0], total[1] + r[1], total[2] + r[2], total[3] + r[3]]
            if len(name) <= _MAX_MOUNT_LEN:
                # io_ticks is ms busy per s of wall time: /10 gives percent
                out.append(DiskIO(name, r[0], r[1], r[2], r[3], busy_percent=min(100.0, r[4] / 10.0)))
        return out, total

    def _per_nic(
        self, raw: dict[str, tuple[int, int, int, int]], now: float
    ) -> tuple[list[NicIO], list[float]]:
        """Per-interface rates, and their sums (rx/tx bytes and packets per second)."""
        errs: dict[str, tuple[int, int, int, int]] = getattr(self._source, "net_errors", {})
        both = {k: (*v, *errs.get(k, (0, 0, 0, 0))) for k, v in raw.items()}
        out: list[NicIO] = []
        total = [0.0, 0.0, 0.0, 0.0]
        for name, r in sorted(self._net_each.update(both, now).items()):
            if r is None:
                r = [0.0] * 8
            else:
                total = [total[0] + r[0], total[1] + r[1], total[2] + r[2], total[3] + r[3]]
            if len(name) <= _MAX_MOUNT_LEN:
                out.append(NicIO(name, r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]))
        return out, total

    def _filesystems(self) -> list[Filesystem]:
        out: list[Filesystem] = []
        for m in self._source.mounts():
            try:
                total, used, percent = self._source.fs_usage(m.mount)
            except OSError as exc:  # unmounted since the last refresh, or no permission
                log.debug("statvfs(%s) failed: %s", m.mount, exc)
                continue
            out.append(Filesystem(mount=m.mount, fstype=m.fstype, total=total, used=used, percent=percent))
        return out

    def close(self) -> None:
        """Release the source's kept-open files."""
        self._source.close()
        if self._pressure is not None:
            self._pressure.close()
        if self._sensors is not None:
            self._sensors.close()


def _pct(part: int, whole: int) -> float:
    return min(100.0, max(0.0, 100.0 * part / whole)) if whole > 0 else 0.0
