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

from typing import Annotated, Final

import msgspec

SCHEMA_VERSION: Final = 1
SUPPORTED_VERSIONS: Final[tuple[int, ...]] = (1,)

NonNeg = Annotated[float, msgspec.Meta(ge=0)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
Percent = Annotated[float, msgspec.Meta(ge=0, le=100)]
NodeId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@-]+$")]
Label = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]


class SchemaError(ValueError):
    """A message did not match the wire schema; the text names the field."""


class Filesystem(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """Usage of one mounted filesystem."""

    mount: Label
    fstype: Annotated[str, msgspec.Meta(max_length=64)]
    total: NonNegInt
    used: NonNegInt
    percent: Percent


class HostMetrics(msgspec.Struct, frozen=True):
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


class AgentStats(msgspec.Struct, frozen=True):
    """What the agent itself cost over the last cycle."""

    cpu_ms: NonNeg
    rss_bytes: NonNegInt
    dropped_reports: NonNegInt = 0


class NodeInfo(msgspec.Struct, frozen=True):
    """Static facts about the node, repeated in every report (a few bytes)."""

    hostname: Label
    os: Annotated[str, msgspec.Meta(max_length=255)] = ""
    cpu_count: NonNegInt = 0
    agent_version: Annotated[str, msgspec.Meta(max_length=64)] = ""


class Report(msgspec.Struct, frozen=True):
    """One sample of one node: what an agent pushes once per interval."""

    v: int
    node_id: NodeId
    ts: Annotated[float, msgspec.Meta(gt=0)]
    seq: NonNegInt
    interval: Annotated[float, msgspec.Meta(gt=0, le=3600)]
    node: NodeInfo
    host: HostMetrics
    agent: AgentStats


class IngestResponse(msgspec.Struct, frozen=True):
    """The collector's answer to a report.  Commands ride back here (later)."""

    accepted: int
    commands: list[dict[str, object]] = []


class _Envelope(msgspec.Struct):
    v: int = -1


_report_decoder = msgspec.json.Decoder(Report)
_envelope_decoder = msgspec.json.Decoder(_Envelope)
_encoder = msgspec.json.Encoder()


def encode(msg: msgspec.Struct) -> bytes:
    """Encode any schema message as compact JSON."""
    return _encoder.encode(msg)


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
        report = _report_decoder.decode(data)
    except msgspec.ValidationError as exc:
        try:
            env = _envelope_decoder.decode(data)
        except msgspec.DecodeError:
            env = _Envelope()
        if env.v != -1:
            _check_version(env.v)
        raise SchemaError(f"invalid report: {exc}") from None
    except msgspec.DecodeError as exc:
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
    }
    for i, pct in enumerate(h.cpu_per_core):
        out[f"cpu.core.{i}"] = pct
    for fs in h.filesystems:
        out[f"fs.{fs.mount}.used"] = float(fs.used)
        out[f"fs.{fs.mount}.total"] = float(fs.total)
        out[f"fs.{fs.mount}.percent"] = fs.percent
    return out
