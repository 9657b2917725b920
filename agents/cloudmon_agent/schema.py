"""The versioned wire schema shared by the agent and the collector.

The agent package owns this schema; the collector imports it (never the other
way round).  Decoding validates: a message that does not match is rejected
whole with a :class:`SchemaError` whose text names the offending field, so the
collector can answer 400 and store nothing.

Version policy: ``v`` is bumped when a field changes meaning or a required
field is added.  Optional fields with defaults may be added within a version;
unknown fields are ignored so that a newer agent can talk to an older
collector of the same major version.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Final, Literal

from cloudmon_agent.wire import UNSET, DecodeError, Meta, Struct, UnsetType, ValidationError, convert, decoder
from cloudmon_agent.wire import encode as encode  # any schema message as compact JSON

SCHEMA_VERSION: Final = 1
SUPPORTED_VERSIONS: Final[tuple[int, ...]] = (1,)

NonNeg = Annotated[float, Meta(ge=0)]
NonNegInt = Annotated[int, Meta(ge=0)]
Percent = Annotated[float, Meta(ge=0, le=100)]
NodeId = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@-]+$")]
Label = Annotated[str, Meta(min_length=1, max_length=255)]


class SchemaError(ValueError):
    """A message did not match the wire schema; the text names the field."""


class Filesystem(Struct, frozen=True, forbid_unknown_fields=False):
    """Usage of one mounted filesystem."""

    __lite_cache__: ClassVar[bool] = True  # see cloudmon_agent._lite.encode

    mount: Label
    fstype: Annotated[str, Meta(max_length=64)]
    total: NonNegInt
    used: NonNegInt
    percent: Percent


class DiskIO(Struct, frozen=True):
    """One physical disk over the last interval."""

    name: Label
    read_bps: NonNeg
    write_bps: NonNeg
    read_iops: NonNeg
    write_iops: NonNeg
    #: Share of the interval the disk had I/O in flight (``io_ticks``), 0..100.
    busy_percent: Percent


class NicIO(Struct, frozen=True):
    """One network interface over the last interval (per-second rates)."""

    name: Label
    rx_bps: NonNeg
    tx_bps: NonNeg
    rx_pps: NonNeg
    tx_pps: NonNeg
    rx_errors_ps: NonNeg = 0.0
    tx_errors_ps: NonNeg = 0.0
    rx_drops_ps: NonNeg = 0.0
    tx_drops_ps: NonNeg = 0.0


class Pressure(Struct, frozen=True):
    """Pressure stall information of one resource (``/proc/pressure/<resource>``).

    ``*_avg10`` are the kernel's 10 s averages (percent of time some / all
    non-idle tasks stalled); ``*_percent`` is the same share over the last
    interval, from the cumulative ``total`` counter.
    """

    __lite_cache__: ClassVar[bool] = True  # see cloudmon_agent._lite.encode

    resource: Annotated[str, Meta(min_length=1, max_length=16)]
    some_avg10: Percent
    some_percent: Percent
    full_avg10: Percent | None = None
    full_percent: Percent | None = None


class Sensor(Struct, frozen=True):
    """One hwmon reading: ``kind`` is ``temp`` (degrees C) or ``fan`` (RPM)."""

    __lite_cache__: ClassVar[bool] = True  # see cloudmon_agent._lite.encode

    chip: Label
    label: Label
    kind: Annotated[str, Meta(min_length=1, max_length=16)]
    value: float


class HostMetrics(Struct, frozen=True):
    """Host-wide usage over the last interval (rates are per second)."""

    cpu_percent: Percent
    cpu_per_core: list[Percent]
    mem_total: NonNegInt
    mem_used: NonNegInt
    mem_available: NonNegInt
    mem_percent: Percent
    swap_total: NonNegInt
    swap_used: NonNegInt
    swap_percent: Percent
    disk_read_bps: NonNeg
    disk_write_bps: NonNeg
    disk_read_iops: NonNeg
    disk_write_iops: NonNeg
    net_rx_bps: NonNeg
    net_tx_bps: NonNeg
    net_rx_pps: NonNeg
    net_tx_pps: NonNeg
    load1: NonNeg
    load5: NonNeg
    load15: NonNeg
    filesystems: list[Filesystem] = []
    uptime_s: NonNeg = 0.0
    #: Per physical disk (added in v1; absent from older agents).
    disks: list[DiskIO] = []
    #: Per counted network interface.
    nics: list[NicIO] = []
    #: Pressure stall information (empty where the kernel has none).
    pressure: list[Pressure] = []
    #: Temperatures and fan speeds (empty where there are no hwmon sensors).
    sensors: list[Sensor] = []


class AgentStats(Struct, frozen=True):
    """What the agent itself cost over the last cycle."""

    cpu_ms: NonNeg
    rss_bytes: NonNegInt
    #: Reports lost since the agent started (queue overflow, rejected, or dropped by a full spool).
    dropped_reports: NonNegInt = 0
    #: Reports waiting in the on-disk spool for the collector (replayed in order).
    spooled: NonNegInt = 0
    #: Bytes the spool takes on disk.
    spool_bytes: NonNegInt = 0
    #: Reports the spool dropped since the agent started (oldest first when full; torn records).
    spool_dropped: NonNegInt = 0


class NodeInfo(Struct, frozen=True):
    """Static facts about the node, repeated in every report (a few bytes)."""

    __lite_cache__: ClassVar[bool] = True  # see cloudmon_agent._lite.encode

    hostname: Label
    os: Annotated[str, Meta(max_length=255)] = ""
    cpu_count: NonNegInt = 0
    agent_version: Annotated[str, Meta(max_length=64)] = ""
    #: The libvirt URI other hosts use to reach this host's libvirtd (the
    #: destination of a live migration, e.g. ``qemu+tcp://10.0.0.7/system``);
    #: empty when the agent was not given one (``migrate_uri``).  Added in v1.
    migrate_uri: Annotated[str, Meta(max_length=1024)] = ""


class ProcessInfo(Struct, frozen=True):
    """One process in a top-N list."""

    __lite_cache__: ClassVar[bool] = True  # see cloudmon_agent._lite.encode

    pid: NonNegInt
    name: Annotated[str, Meta(max_length=64)]
    #: Share of one CPU over the scan interval (100 = one full core; may exceed 100).
    cpu_percent: NonNeg
    rss_bytes: NonNegInt


class ProcessTop(Struct, frozen=True):
    """The busiest processes, from a scan that runs less often than every cycle."""

    __lite_cache_lists__: ClassVar[tuple[str, ...]] = ("by_cpu", "by_mem")  # see cloudmon_agent._lite.encode

    #: Seconds since the scan these lists come from.
    age_s: NonNeg
    #: Processes seen by that scan.
    count: NonNegInt
    by_cpu: list[ProcessInfo] = []
    by_mem: list[ProcessInfo] = []


class VmDisk(Struct, frozen=True):
    """One disk of a VM (rates per second)."""

    device: Label
    read_bps: NonNeg
    write_bps: NonNeg
    read_iops: NonNeg
    write_iops: NonNeg


class VmNic(Struct, frozen=True):
    """One network interface of a VM (rates per second, as the host sees them)."""

    name: Label
    rx_bps: NonNeg
    tx_bps: NonNeg
    rx_pps: NonNeg
    tx_pps: NonNeg


class Vm(Struct, frozen=True):
    """One libvirt domain.  Memory is in bytes; CPU is 0 unless it is running."""

    __lite_cache__: ClassVar[bool] = True  # see cloudmon_agent._lite.encode

    uuid: Annotated[str, Meta(min_length=1, max_length=64)]
    name: Label
    #: running, blocked, paused, shutdown, shutoff, crashed, pmsuspended or nostate.
    state: Annotated[str, Meta(min_length=1, max_length=16)]
    vcpus: NonNegInt
    #: Busy share of its own vCPUs.
    cpu_percent: Percent
    #: The same time as a share of all the host's CPUs.
    host_cpu_percent: Percent
    #: Configured maximum (``balloon.maximum``).
    mem_max: NonNegInt
    #: What the balloon currently gives the guest (``balloon.current``).
    mem_current: NonNegInt
    #: Host memory the QEMU process holds (``balloon.rss``), when known.
    mem_rss: NonNegInt | None = None
    #: Memory the guest itself reports unused (needs the balloon driver in the guest).
    mem_unused: NonNegInt | None = None
    disks: list[VmDisk] = []
    nics: list[VmNic] = []
    #: PCI addresses (``0000:65:00.0``) of host devices (GPUs) assigned to it.
    hostdevs: list[str] = []


class Container(Struct, frozen=True):
    """One container, service or VM scope, from its cgroup."""

    __lite_cache__: ClassVar[bool] = True  # see cloudmon_agent._lite.encode

    name: Label
    #: docker, podman, service or vm.
    kind: Annotated[str, Meta(min_length=1, max_length=16)]
    #: Share of the host's CPUs.
    cpu_percent: Percent
    mem_bytes: NonNegInt
    #: The cgroup's memory limit; None when unlimited.
    mem_limit: NonNegInt | None = None
    io_read_bps: NonNeg = 0.0
    io_write_bps: NonNeg = 0.0


class GpuProcess(Struct, frozen=True):
    """A process using a GPU."""

    pid: NonNegInt
    mem_bytes: NonNegInt


class Gpu(Struct, frozen=True):
    """One GPU: seen by the host's NVML, or passed through to a VM (then only ``vm`` is known)."""

    __lite_cache__: ClassVar[bool] = True  # see cloudmon_agent._lite.encode

    index: NonNegInt
    pci: Annotated[str, Meta(max_length=32)]
    name: Annotated[str, Meta(max_length=128)] = ""
    util_percent: Percent | None = None
    mem_used: NonNegInt | None = None
    mem_total: NonNegInt | None = None
    temp_c: float | None = None
    power_w: NonNeg | None = None
    processes: list[GpuProcess] = []
    #: Name of the VM this GPU is passed through to, if any.
    vm: Annotated[str, Meta(max_length=255)] | None = None


class Throttle(Struct, frozen=True):
    """A collector the budget made run less often than every cycle."""

    __lite_cache__: ClassVar[bool] = True  # see cloudmon_agent._lite.encode

    collector: Annotated[str, Meta(min_length=1, max_length=64)]
    #: Runs once every ``period`` cycles.
    period: Annotated[int, Meta(ge=1)]
    #: Its mean CPU cost per run (ms).
    cost_ms: NonNeg


class BudgetStats(Struct, frozen=True):
    """The agent's CPU budget and what it did to keep to it."""

    budget_ms: NonNeg
    #: Expected collector CPU per cycle at the current periods (ms).
    expected_ms: NonNeg
    throttled: list[Throttle] = []


# -- commands: collector -> agent, results: agent -> collector (added within v1) ----------------

#: Every action an agent can execute; each node runs only those in its ``allow_actions``.
ACTIONS: Final[tuple[str, ...]] = ("vm.create", "vm.start", "vm.stop", "vm.delete", "vm.migrate", "vm.state")
Action = Literal["vm.create", "vm.start", "vm.stop", "vm.delete", "vm.migrate", "vm.state"]
CommandId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")]
VmName = Annotated[str, Meta(min_length=1, max_length=255)]
Seconds = Annotated[float, Meta(gt=0, le=86400)]
Path_ = Annotated[str, Meta(min_length=1, max_length=4096)]


class Command(Struct, frozen=True):
    """One action the collector asks an agent to carry out; rides back on an ingest answer.

    ``action`` is a plain string on the wire, not :data:`Action`: an agent that
    does not know a newer action must still decode the answer (and the report
    it acknowledges), then refuse that one command with a clear result.
    ``params`` are checked per action by :func:`command_params`.

    ``deadline`` is the collector's clock (epoch seconds); ``timeout_s`` is the
    time that was left when the collector sent it, which is what the agent goes
    by, so clock skew between the two machines does not matter.  The collector
    sends a command again with every answer until the agent reports on it; the
    agent executes each ``id`` at most once.
    """

    id: CommandId
    action: Annotated[str, Meta(min_length=1, max_length=64)]
    deadline: float
    timeout_s: Annotated[float, Meta(ge=0, le=86400)]
    params: dict[str, Any] = {}


class VmRef(Struct, frozen=True, forbid_unknown_fields=True):
    """Parameters of ``vm.start``, ``vm.delete`` and ``vm.state``: the domain's name."""

    vm: VmName


class StopParams(Struct, frozen=True, forbid_unknown_fields=True):
    """Parameters of ``vm.stop``: ACPI shutdown, then (``force``) destroy after ``timeout_s``."""

    vm: VmName
    timeout_s: Seconds = 60.0
    force: bool = True


class CreateParams(Struct, frozen=True, forbid_unknown_fields=True):
    """Parameters of ``vm.create``: the fields of the agent's ``vmops.VmSpec``.

    ``base_image`` (cloned copy-on-write into ``overlay_dir``) and/or
    ``template_xml`` (a domain XML file on the host); paths are the host's.
    """

    name: VmName
    vcpus: Annotated[int, Meta(ge=1, le=1024)] = 1
    memory_mib: Annotated[int, Meta(ge=16, le=16 << 20)] = 512
    base_image: Path_ | None = None
    base_format: Annotated[str, Meta(min_length=1, max_length=16)] = "qcow2"
    overlay_dir: Path_ | None = None
    template_xml: Path_ | None = None
    domain_type: Annotated[str, Meta(min_length=1, max_length=16)] = "kvm"
    network: Annotated[str, Meta(min_length=1, max_length=255)] | None = None
    kernel: Path_ | None = None
    initrd: Path_ | None = None
    cmdline: Annotated[str, Meta(max_length=4096)] | None = None
    group: Annotated[str, Meta(max_length=255)] = ""
    start: bool = True


class MigrateParams(Struct, frozen=True, forbid_unknown_fields=True):
    """Parameters of ``vm.migrate``: live (peer to peer) migration of ``vm`` to ``dest_uri``.

    ``dest_uri`` is the destination host's advertised ``NodeInfo.migrate_uri``.
    ``timeout_s`` bounds the migration job (default: the command's time left);
    past it the job is aborted and the VM keeps running on the source.
    ``data_uri`` sets where the memory stream goes (``tcp://ADDRESS``) when the
    destination's own ``migration_host`` setting is not enough.
    """

    vm: VmName
    dest_uri: Annotated[str, Meta(min_length=1, max_length=1024)]
    live: bool = True
    timeout_s: Seconds | None = None
    bandwidth_mib: Annotated[int, Meta(ge=1)] | None = None
    data_uri: Annotated[str, Meta(min_length=1, max_length=1024)] | None = None


#: The parameter struct of each action.
PARAMS: Final[dict[str, type[Struct]]] = {
    "vm.create": CreateParams,
    "vm.start": VmRef,
    "vm.stop": StopParams,
    "vm.delete": VmRef,
    "vm.migrate": MigrateParams,
    "vm.state": VmRef,
}


def command_params(action: str, params: dict[str, Any]) -> Struct:
    """``params`` validated as ``action``'s parameter struct, or :class:`SchemaError` naming the field."""
    kind = PARAMS.get(action)
    if kind is None:
        raise SchemaError(f"unknown action {action!r}; known actions: {', '.join(ACTIONS)}")
    try:
        return convert(params, kind)
    except ValidationError as exc:
        raise SchemaError(f"invalid parameters for {action}: {exc}") from None


class CommandProgress(Struct, frozen=True):
    """A command the agent has taken and not finished: ``state`` queued or running.

    Reports carry one per such command; the first also tells the collector the
    command arrived (it stops resending it).  ``detail`` holds figures such as
    a migration's ``data_processed`` / ``data_total`` bytes.
    """

    id: CommandId
    state: Annotated[str, Meta(min_length=1, max_length=16)]
    detail: dict[str, Any] = {}


class CommandResult(Struct, frozen=True):
    """How a command ended.  ``error`` says what went wrong and how to fix it when not ``ok``.

    Reports carry a result until the collector acknowledges it
    (``IngestResponse.acked``); the collector keeps the first and ignores copies.
    """

    id: CommandId
    ok: bool
    started: float
    finished: float
    error: str | None = None
    detail: dict[str, Any] = {}


class Report(Struct, frozen=True):
    """One sample of one node: what an agent pushes once per interval."""

    __lite_cache_lists__: ClassVar[tuple[str, ...]] = (
        "vms",
        "containers",
        "gpus",
    )  # see cloudmon_agent._lite.encode

    v: int
    node_id: NodeId
    ts: Annotated[float, Meta(gt=0)]
    seq: NonNegInt
    interval: Annotated[float, Meta(gt=0, le=3600)]
    node: NodeInfo
    host: HostMetrics
    agent: AgentStats
    # Optional sections (v1 additions): absent when the collector is off.
    processes: ProcessTop | None = None
    vms: list[Vm] = []
    containers: list[Container] = []
    gpus: list[Gpu] = []
    budget: BudgetStats | None = None
    #: Commands the agent has taken and not finished, and results not yet acknowledged.
    progress: list[CommandProgress] = []
    results: list[CommandResult] = []


class IngestResponse(Struct, frozen=True):
    """The collector's answer to a report: pending commands for the node ride back here.

    ``acked`` lists the ids of the results in the request that the collector
    has recorded (or had already): the agent stops sending those.  It is left
    out of the answer when there are none (the common answer stays as it was).
    """

    accepted: int
    commands: list[Command] = []
    acked: list[str] | UnsetType = UNSET


class _Envelope(Struct):
    v: int = -1


_report_decoder = decoder(Report)
_envelope_decoder = decoder(_Envelope)


def _check_version(v: int) -> None:
    if v not in SUPPORTED_VERSIONS:
        supported = ", ".join(str(s) for s in SUPPORTED_VERSIONS)
        raise SchemaError(f"unsupported schema version v={v}; this collector supports v in ({supported})")


def decode_report(data: bytes | bytearray | memoryview | str) -> Report:
    """Decode and validate one report, or raise :class:`SchemaError`.

    An unknown version is reported as such (naming the supported versions)
    even when the rest of the body does not match this version's schema.
    """
    try:
        report = _report_decoder(data)
    except ValidationError as exc:
        try:
            env = _envelope_decoder(data)
        except DecodeError:
            env = _Envelope()
        if env.v != -1:
            _check_version(env.v)
        raise SchemaError(f"invalid report: {exc}") from None
    except DecodeError as exc:
        raise SchemaError(f"malformed JSON: {exc}") from None
    _check_version(report.v)
    return report


def flatten(report: Report) -> dict[str, float]:
    """The report's numbers as ``metric name -> value``: what stores keep.

    Names are stable and dotted (``cpu.percent``, ``cpu.core.3``,
    ``fs./home.percent``); the collector, stores and console address series by
    these names.
    """
    h = report.host
    out: dict[str, float] = {
        "cpu.percent": h.cpu_percent,
        "mem.total": float(h.mem_total),
        "mem.used": float(h.mem_used),
        "mem.available": float(h.mem_available),
        "mem.percent": h.mem_percent,
        "swap.total": float(h.swap_total),
        "swap.used": float(h.swap_used),
        "swap.percent": h.swap_percent,
        "disk.read_bps": h.disk_read_bps,
        "disk.write_bps": h.disk_write_bps,
        "disk.read_iops": h.disk_read_iops,
        "disk.write_iops": h.disk_write_iops,
        "net.rx_bps": h.net_rx_bps,
        "net.tx_bps": h.net_tx_bps,
        "net.rx_pps": h.net_rx_pps,
        "net.tx_pps": h.net_tx_pps,
        "load.1": h.load1,
        "load.5": h.load5,
        "load.15": h.load15,
        "agent.cpu_ms": report.agent.cpu_ms,
        "agent.rss_bytes": float(report.agent.rss_bytes),
        "agent.dropped_reports": float(report.agent.dropped_reports),
        # The agent's sequence number makes "every sample stored exactly once" checkable.
        "agent.seq": float(report.seq),
        "agent.spooled": float(report.agent.spooled),
        "agent.spool_dropped": float(report.agent.spool_dropped),
    }
    for i, pct in enumerate(h.cpu_per_core):
        out[f"cpu.core.{i}"] = pct
    for fs in h.filesystems:
        out[f"fs.{fs.mount}.used"] = float(fs.used)
        out[f"fs.{fs.mount}.total"] = float(fs.total)
        out[f"fs.{fs.mount}.percent"] = fs.percent
    _flatten_sections(report, out)
    return out


def _flatten_sections(report: Report, out: dict[str, float]) -> None:
    """Metric names of the optional sections (added within v1).

    Per device / guest / container, a few figures each, so a node with 10
    VMs, 20 containers and 4 GPUs stays at a few hundred series:

    - ``disk.<dev>.{read_bps,write_bps,read_iops,write_iops,busy_percent}``
    - ``net.<nic>.{rx_bps,tx_bps,rx_pps,tx_pps,errors_ps,drops_ps}`` (errors and
      drops summed over rx and tx)
    - ``psi.<cpu|memory|io>.{some_avg10,some_percent,full_avg10,full_percent}``
    - ``sensor.<chip>.<label>`` (degrees C or RPM)
    - ``vm.<name>.{cpu_percent,host_cpu_percent,vcpus,mem_max,mem_current,mem_rss,
      mem_unused,disk_read_bps,disk_write_bps,net_rx_bps,net_tx_bps}`` (disk and
      net summed over the guest's devices; per-device figures stay in the report)
    - ``container.<name>.{cpu_percent,mem_bytes,io_read_bps,io_write_bps}``
    - ``gpu.<index>.{util_percent,mem_used,mem_total,temp_c,power_w}``
    - ``agent.budget.expected_ms`` and ``agent.budget.throttled`` (how many collectors)

    Top-N process lists are not flattened: they are kept only as the latest value.
    """
    h = report.host
    for d in h.disks:
        p = f"disk.{d.name}."
        out[p + "read_bps"] = d.read_bps
        out[p + "write_bps"] = d.write_bps
        out[p + "read_iops"] = d.read_iops
        out[p + "write_iops"] = d.write_iops
        out[p + "busy_percent"] = d.busy_percent
    for n in h.nics:
        p = f"net.{n.name}."
        out[p + "rx_bps"] = n.rx_bps
        out[p + "tx_bps"] = n.tx_bps
        out[p + "rx_pps"] = n.rx_pps
        out[p + "tx_pps"] = n.tx_pps
        out[p + "errors_ps"] = n.rx_errors_ps + n.tx_errors_ps
        out[p + "drops_ps"] = n.rx_drops_ps + n.tx_drops_ps
    for ps in h.pressure:
        p = f"psi.{ps.resource}."
        out[p + "some_avg10"] = ps.some_avg10
        out[p + "some_percent"] = ps.some_percent
        if ps.full_avg10 is not None:
            out[p + "full_avg10"] = ps.full_avg10
        if ps.full_percent is not None:
            out[p + "full_percent"] = ps.full_percent
    for se in h.sensors:
        out[f"sensor.{se.chip}.{se.label}"] = se.value
    for vm in report.vms:
        p = f"vm.{vm.name}."
        out[p + "cpu_percent"] = vm.cpu_percent
        out[p + "host_cpu_percent"] = vm.host_cpu_percent
        out[p + "vcpus"] = float(vm.vcpus)
        out[p + "mem_max"] = float(vm.mem_max)
        out[p + "mem_current"] = float(vm.mem_current)
        if vm.mem_rss is not None:
            out[p + "mem_rss"] = float(vm.mem_rss)
        if vm.mem_unused is not None:
            out[p + "mem_unused"] = float(vm.mem_unused)
        out[p + "disk_read_bps"] = sum(d.read_bps for d in vm.disks)
        out[p + "disk_write_bps"] = sum(d.write_bps for d in vm.disks)
        out[p + "net_rx_bps"] = sum(n.rx_bps for n in vm.nics)
        out[p + "net_tx_bps"] = sum(n.tx_bps for n in vm.nics)
    for c in report.containers:
        p = f"container.{c.name}."
        out[p + "cpu_percent"] = c.cpu_percent
        out[p + "mem_bytes"] = float(c.mem_bytes)
        out[p + "io_read_bps"] = c.io_read_bps
        out[p + "io_write_bps"] = c.io_write_bps
    for g in report.gpus:
        p = f"gpu.{g.index}."
        for key, val in (
            ("util_percent", g.util_percent),
            ("mem_used", g.mem_used),
            ("mem_total", g.mem_total),
            ("temp_c", g.temp_c),
            ("power_w", g.power_w),
        ):
            if val is not None:
                out[p + key] = float(val)
    if report.budget is not None:
        out["agent.budget.expected_ms"] = report.budget.expected_ms
        out["agent.budget.throttled"] = float(len(report.budget.throttled))
