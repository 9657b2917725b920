"""Build a :class:`ClusterSnapshot` from the live collector state.

Hosts come from the :class:`~cloudmon.model.cluster.ClusterModel` (one per
online node: ``name`` is the node id, cores from ``info["cpu_count"]``, memory
from ``mem.total``, GPUs from the ``gpu.<i>.*`` series), VMs from the node's
latest flattened ``vm.<name>.*`` values.  A VM's CPU demand is a high percentile
(p95 by default) over a window of ``vm.<name>.host_cpu_percent`` read from the
store (step averages), not the last sample; its memory is ``mem_max`` (what it
holds and what a migration copies).  Placement rules, maintenance and per-VM
settings are store documents:

* kind ``"rule"``, key = rule name: a :class:`~cloudmon.rebalance.snapshot.Rule`
  as JSON (``kind``, ``vms``, ``hosts``; ``name`` defaults to the key);
* kind ``"host_maintenance"``, key = host (node id): ``{"maintenance": true}``
  (a document with ``false`` is ignored);
* kind ``"vm"``, key = VM name: any of ``pinned``, ``gpus``, ``dirty_rate_mibps``.

VMs that are not running (the collector lists them per node in
``info["vms_not_running"]``: shut off, crashed ...) hold nothing and cannot be
live-migrated: they are left out.  A VM that two hosts report at once (a live
migration in flight: paused on the destination, running on the source, or one
report older than the migration's end) is placed where it runs; when that is
not clear (two hosts run a VM of that name) it is left out of this snapshot
with a warning, instead of failing the whole snapshot.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Final

import msgspec

from cloudmon.model.cluster import ClusterModel, NodeStatus
from cloudmon.rebalance.snapshot import (
    VM,
    ClusterSnapshot,
    Host,
    PlanSettings,
    Rule,
    SnapshotError,
    validate,
)
from cloudmon.store.base import TelemetryStore

log = logging.getLogger(__name__)

_MIB = 1024.0 * 1024.0
#: States of a VM that holds its host's resources and can be live-migrated.
_PLACED_STATES: Final = frozenset({"running", "blocked", "paused"})


class VmSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-VM planner settings kept as a ``"vm"`` document."""

    pinned: bool = False
    gpus: int = 0
    dirty_rate_mibps: float | None = None


def load_rules(store: TelemetryStore) -> list[Rule]:
    """Every ``"rule"`` document as a :class:`Rule` (names are checked later, against a snapshot)."""
    out: list[Rule] = []
    for key, doc in sorted(store.list_documents("rule").items()):
        try:
            out.append(msgspec.convert({"name": key, **doc}, Rule))
        except msgspec.ValidationError as exc:
            raise SnapshotError(f"rule document {key!r} is invalid: {exc}; fix or delete it") from None
    return out


def load_maintenance(store: TelemetryStore) -> set[str]:
    """Hosts whose ``"host_maintenance"`` document says ``maintenance: true``."""
    return {
        k
        for k, doc in store.list_documents("host_maintenance").items()
        if doc.get("maintenance", True) is True
    }


def load_vm_settings(store: TelemetryStore) -> dict[str, VmSettings]:
    """Every ``"vm"`` document (pinned, gpus, dirty rate) by VM name."""
    out: dict[str, VmSettings] = {}
    for key, doc in store.list_documents("vm").items():
        try:
            out[key] = msgspec.convert(doc, VmSettings)
        except msgspec.ValidationError as exc:
            raise SnapshotError(f"vm document {key!r} is invalid: {exc}; fix or delete it") from None
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation; 0 for no values."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _vm_names(latest: Mapping[str, float]) -> list[str]:
    names = {k[3:].rsplit(".", 1)[0] for k in latest if k.startswith("vm.") and k.endswith(".mem_max")}
    return sorted(names)


def _not_running(info: Mapping[str, object]) -> dict[str, str]:
    """``info["vms_not_running"]`` (VM name -> libvirt state) as the collector keeps it."""
    raw = info.get("vms_not_running")
    if not isinstance(raw, dict):
        return {}
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}


def _one_place_each(placed: Mapping[str, list[tuple[VM, str]]]) -> list[VM]:
    """Each VM once: where it runs when several hosts report it (see the module docs)."""
    out: list[VM] = []
    for name, seen in placed.items():
        if len(seen) == 1:
            out.append(seen[0][0])
            continue
        running = [vm for vm, state in seen if state != "paused"]
        if len(running) == 1:
            out.append(running[0])
            continue
        log.warning(
            "planner snapshot leaves out VM %s: hosts %s all report it (a migration in flight, or two "
            "VMs of one name: give them unique names)",
            name,
            ", ".join(f"{vm.host} ({state})" for vm, state in seen),
        )
    return out


def _is_vm_host(
    node_id: str, hostname: str, info: Mapping[str, object], latest: Mapping[str, float], guests: set[str]
) -> bool:
    """Whether a node takes part in placement: it runs VMs or accepts migrations, and is no guest.

    A node that reports no VMs and advertises no ``migrate_uri`` (a plain server, the
    console's own machine) can neither give nor take a VM.
    """
    if node_id in guests or hostname in guests:
        return False
    return bool(_vm_names(latest)) or bool(info.get("migrate_uri"))


def snapshot_from_live(
    model: ClusterModel,
    store: TelemetryStore,
    now: float,
    *,
    window_s: float | None = 3600.0,
    step_s: float = 10.0,
    q: float = 95.0,
    settings: PlanSettings | None = None,
) -> ClusterSnapshot:
    """A snapshot of the online nodes at ``now``; VM CPU demand is the ``q``-th percentile over ``window_s``
    (``None``: the latest values, no store reads: for a chart of how things are now).

    Unreachable nodes (and their VMs) are left out: a plan must not send VMs to
    a host nobody hears from.  Rules naming VMs or hosts not in the snapshot are
    left out with a warning.
    """
    if (window_s is not None and window_s <= 0) or step_s <= 0 or not 0 < q <= 100:
        raise ValueError("window_s and step_s must be > 0 and q in (0, 100]")
    maintenance = load_maintenance(store)
    vm_settings = load_vm_settings(store)
    hosts: list[Host] = []
    placed: dict[str, list[tuple[VM, str]]] = defaultdict(list)
    online = [
        n
        for n in sorted(model.nodes(), key=lambda n: n.node_id)
        if n.status(now, model.node_timeout) is NodeStatus.ONLINE
    ]
    # A guest's own agent (an auto-scaling instance reporting from inside its VM) is
    # not a host: its node id or hostname names a VM that a host reports.
    guests = {name for n in online for name in _vm_names(n.latest)}
    for node in sorted(model.nodes(), key=lambda n: n.node_id):
        if node.status(now, model.node_timeout) is not NodeStatus.ONLINE:
            log.info("planner snapshot leaves out unreachable node %s", node.node_id)
            continue
        latest = dict(node.latest)
        if not _is_vm_host(node.node_id, node.hostname, node.info, latest, guests):
            continue
        cores_raw = node.info.get("cpu_count", 0)
        cores = float(cores_raw) if isinstance(cores_raw, int | float) else 0.0
        mem_mib = latest.get("mem.total", 0.0) / _MIB
        if cores <= 0 or mem_mib <= 0:
            log.warning("planner snapshot leaves out node %s: cpu_count or mem.total unknown", node.node_id)
            continue
        stopped = _not_running(node.info)
        names = [n for n in _vm_names(latest) if stopped.get(n, "running") in _PLACED_STATES]
        metrics = [f"vm.{n}.host_cpu_percent" for n in names]
        demand: dict[str, float] = {}
        if metrics and window_s is None:
            demand = {n: latest.get(m, 0.0) / 100.0 * cores for n, m in zip(names, metrics, strict=True)}
        elif metrics and window_s is not None:
            res = store.series(node.node_id, metrics, now - window_s, now, step_s)
            for n, m in zip(names, metrics, strict=True):
                series = res.metrics.get(m)
                vals = [v for v in series.avg if v is not None] if series is not None else []
                pct = percentile(vals, q) if vals else latest.get(m, 0.0)
                demand[n] = pct / 100.0 * cores
        gpus = {k.split(".")[1] for k in latest if k.startswith("gpu.")}
        vm_cpu_now = sum(latest.get(f"vm.{n}.host_cpu_percent", 0.0) for n in names)
        vm_mem_now = sum(latest.get(f"vm.{n}.mem_rss", latest.get(f"vm.{n}.mem_current", 0.0)) for n in names)
        hosts.append(
            Host(
                name=node.node_id,
                cpu_cores=cores,
                memory_mib=mem_mib,
                gpus=len(gpus),
                maintenance=node.node_id in maintenance,
                cpu_used_other=max(0.0, latest.get("cpu.percent", 0.0) - vm_cpu_now) / 100.0 * cores,
                memory_used_other_mib=max(0.0, latest.get("mem.used", 0.0) - vm_mem_now) / _MIB,
            )
        )
        for n in names:
            extra = vm_settings.get(n, VmSettings())
            vm = VM(
                name=n,
                host=node.node_id,
                cpu_demand_cores=round(demand.get(n, 0.0), 4),
                memory_mib=latest.get(f"vm.{n}.mem_max", 0.0) / _MIB,
                gpus=extra.gpus,
                pinned=extra.pinned,
                dirty_rate_mibps=extra.dirty_rate_mibps,
            )
            placed[n].append((vm, stopped.get(n, "running")))
    vms = _one_place_each(placed)
    host_names = {h.name for h in hosts}
    vm_names = {v.name for v in vms}
    rules: list[Rule] = []
    for rule in load_rules(store):
        missing = [v for v in rule.vms if v not in vm_names] + [h for h in rule.hosts if h not in host_names]
        if missing:
            log.warning(
                "rule %s left out of the snapshot: %s not in the cluster now", rule.name, ", ".join(missing)
            )
            continue
        rules.append(rule)
    return validate(ClusterSnapshot(ts=now, hosts=hosts, vms=vms, rules=rules, settings=settings))
