"""The cluster snapshot the planner works on: hosts, VMs, rules (a documented JSON format).

A snapshot is plain data.  It is built from the live collector state
(:mod:`cloudmon.rebalance.live`) or loaded from a file for an offline what-if
(``cloudmon plan --snapshot FILE``); the README's "Cluster snapshots" section
documents the format field by field.

Units: CPU in cores (a VM's demand is a high percentile over a window, not the
last sample), memory in MiB, GPUs as whole devices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec

NonNeg = Annotated[float, msgspec.Meta(ge=0)]
Positive = Annotated[float, msgspec.Meta(gt=0)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]

#: Rule kinds.  ``affinity``: the VMs run on one host.  ``anti_affinity``: no two of them share a
#: host.  ``must_run_on`` / ``must_not_run_on``: hard VM-host rules.  ``should_run_on`` /
#: ``should_not_run_on``: soft VM-host rules (a penalty in the planner's score, not a constraint).
RuleKind = Literal[
    "affinity",
    "anti_affinity",
    "must_run_on",
    "must_not_run_on",
    "should_run_on",
    "should_not_run_on",
]
VM_HOST_KINDS: frozenset[str] = frozenset(
    {"must_run_on", "must_not_run_on", "should_run_on", "should_not_run_on"}
)


class SnapshotError(ValueError):
    """A snapshot (or a rule document) is invalid; the text names the object and the fix."""


class Host(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One physical host and its capacity."""

    name: Name
    #: CPU capacity in cores.
    cpu_cores: Positive
    memory_mib: Positive
    gpus: Annotated[int, msgspec.Meta(ge=0)] = 0
    #: Entering maintenance: every VM on it must move (mandatory moves).
    maintenance: bool = False
    #: A powered-off host takes no VMs (consolidation lists hosts that can be powered off).
    powered_on: bool = True
    #: CPU (cores) and memory (MiB) used by things other than the listed VMs (hypervisor, services).
    cpu_used_other: NonNeg = 0.0
    memory_used_other_mib: NonNeg = 0.0


class VM(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One virtual machine and what it needs."""

    name: Name
    #: The host it runs on now.
    host: Name
    #: CPU demand in cores: a high percentile (p95) over a window, not the last sample.
    cpu_demand_cores: NonNeg
    #: Memory it holds on its host (its configured size): capacity and migration cost.
    memory_mib: NonNeg
    gpus: Annotated[int, msgspec.Meta(ge=0)] = 0
    #: A pinned VM never moves.
    pinned: bool = False
    #: Page-dirtying rate in MiB/s when known (live migration cost grows with it).
    dirty_rate_mibps: NonNeg | None = None


class Rule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A placement rule over VMs (and hosts, for the VM-host kinds)."""

    name: Name
    kind: RuleKind
    vms: list[Name]
    #: Hosts of a VM-host rule; must be empty for ``affinity`` / ``anti_affinity``.
    hosts: list[Name] = []


Threshold = Annotated[int, msgspec.Meta(ge=1, le=5)]


class PlanSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How the planner plans (defaults follow vSphere DRS where it has one).

    ``threshold`` is DRS's migration threshold: 1 makes only mandatory moves
    (rule violations, maintenance evacuation); 2..5 also take balancing moves whose
    improvement reaches :data:`cloudmon.rebalance.planner.MIN_GAIN` for that level
    (5 takes even small improvements).  ``automation`` is carried for the
    executor: ``manual`` recommends only, ``partial`` applies mandatory moves by
    itself, ``full`` applies the whole plan.
    """

    threshold: Threshold = 3
    automation: Literal["manual", "partial", "full"] = "manual"
    mode: Literal["balance", "consolidate"] = "balance"
    #: Share of each host's CPU and memory that VMs may fill (GPUs are whole devices: no headroom).
    headroom: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.8
    #: At most this many migrations run at once (moves are grouped in waves of at most K).
    max_concurrent: Annotated[int, msgspec.Meta(ge=1)] = 2
    #: At most this many moves per plan, mandatory ones included.
    max_moves: Annotated[int, msgspec.Meta(ge=0)] = 32
    solver: Literal["auto", "exact", "heuristic"] = "auto"
    #: Time the exact solver may take (seconds).
    time_budget_s: Positive = 2.0
    #: ``auto`` uses the exact solver up to this many (VM, host) pairs.
    exact_max_pairs: Annotated[int, msgspec.Meta(ge=0)] = 2000
    #: Migration link speed in MiB/s (10 GbE ≈ 1190).
    link_rate_mibps: Positive = 1190.0
    #: Score penalty of one VM off its ``should`` hosts (in host-variance units, see the planner).
    should_penalty: NonNeg = 0.05
    #: Score cost of one second of migration (makes cheap moves win near-ties).
    cost_weight: NonNeg = 1e-5
    #: Perturbation rounds of the heuristic's local search on small clusters (0 = plain descent).
    search_restarts: Annotated[int, msgspec.Meta(ge=0)] = 60
    #: At most this many rejected alternatives are listed in a plan.
    max_rejected: Annotated[int, msgspec.Meta(ge=0)] = 50


class ClusterSnapshot(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The whole cluster at one instant: what a plan is computed from."""

    ts: NonNeg
    hosts: list[Host]
    vms: list[VM]
    rules: list[Rule] = []
    #: Planner settings saved with the snapshot (command-line options override them).
    settings: PlanSettings | None = None


def validate(snap: ClusterSnapshot) -> ClusterSnapshot:
    """Check cross-references and rule consistency; raise :class:`SnapshotError` naming the object."""
    hosts: set[str] = set()
    for h in snap.hosts:
        if h.name in hosts:
            raise SnapshotError(f"host {h.name!r} is listed twice; host names must be unique")
        hosts.add(h.name)
    vms: set[str] = set()
    for v in snap.vms:
        if v.name in vms:
            raise SnapshotError(f"VM {v.name!r} is listed twice; VM names must be unique")
        vms.add(v.name)
        if v.host not in hosts:
            raise SnapshotError(
                f"VM {v.name!r} runs on host {v.host!r}, which is not in the snapshot's hosts; add that host"
            )
    rule_names: set[str] = set()
    for r in snap.rules:
        validate_rule(r, vms, hosts)
        if r.name in rule_names:
            raise SnapshotError(f"rule {r.name!r} is listed twice; rule names must be unique")
        rule_names.add(r.name)
    _check_contradictions(snap.rules)
    return snap


def validate_rule(r: Rule, vms: set[str], hosts: set[str]) -> None:
    """Check one rule against the names it may refer to."""
    if len(set(r.vms)) != len(r.vms):
        raise SnapshotError(f"rule {r.name!r} names a VM twice; list each VM once")
    for name in r.vms:
        if name not in vms:
            raise SnapshotError(
                f"rule {r.name!r} names VM {name!r}, which is not in the snapshot; remove it from the rule"
            )
    if r.kind in VM_HOST_KINDS:
        if not r.hosts:
            raise SnapshotError(f"rule {r.name!r} ({r.kind}) lists no hosts; give at least one")
        if not r.vms:
            raise SnapshotError(f"rule {r.name!r} ({r.kind}) lists no VMs; give at least one")
        for name in r.hosts:
            if name not in hosts:
                raise SnapshotError(
                    f"rule {r.name!r} names host {name!r}, which is not in the snapshot; remove it from the rule"
                )
    else:
        if r.hosts:
            raise SnapshotError(f"rule {r.name!r} ({r.kind}) is a VM-VM rule and must not list hosts")
        if len(r.vms) < 2:
            raise SnapshotError(f"rule {r.name!r} ({r.kind}) needs at least two VMs")


def _check_contradictions(rules: list[Rule]) -> None:
    """Two VMs that must be together (affinity, transitively) and apart (anti-affinity) is no plan."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    for r in rules:
        if r.kind == "affinity":
            for other in r.vms[1:]:
                parent[find(other)] = find(r.vms[0])
    for r in rules:
        if r.kind != "anti_affinity":
            continue
        seen: dict[str, str] = {}
        for v in r.vms:
            root = find(v)
            if root in seen:
                raise SnapshotError(
                    f"anti-affinity rule {r.name!r} separates VMs {seen[root]!r} and {v!r}, which "
                    "affinity rules keep together; remove one of the rules"
                )
            seen[root] = v


_decoder = msgspec.json.Decoder(ClusterSnapshot)
_encoder = msgspec.json.Encoder()


def loads(data: bytes | str) -> ClusterSnapshot:
    """Decode and validate a snapshot from JSON."""
    try:
        snap = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise SnapshotError(f"invalid snapshot: {exc}") from None
    except msgspec.DecodeError as exc:
        raise SnapshotError(f"snapshot is not valid JSON: {exc}") from None
    return validate(snap)


def dumps(snap: ClusterSnapshot) -> bytes:
    """Encode a snapshot as JSON (indented: snapshots are meant to be read and edited)."""
    return msgspec.json.format(_encoder.encode(snap), indent=2)


def load(path: str | Path) -> ClusterSnapshot:
    """Read and validate a snapshot file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot {str(p)!r}: {exc.strerror}") from None
    try:
        return loads(data)
    except SnapshotError as exc:
        raise SnapshotError(f"{p}: {exc}") from None


def dump(snap: ClusterSnapshot, path: str | Path) -> None:
    """Write a snapshot file."""
    Path(path).write_bytes(dumps(snap) + b"\n")
