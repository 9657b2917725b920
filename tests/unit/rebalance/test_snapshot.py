"""The snapshot format: round trip, validation errors that name the object."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudmon.rebalance.snapshot import (
    VM,
    ClusterSnapshot,
    Host,
    Rule,
    SnapshotError,
    dump,
    load,
    loads,
    validate,
)

EXAMPLE = Path(__file__).resolve().parents[3] / "resources" / "examples" / "snapshot.json"


def _snap(rules: list[Rule] | None = None) -> ClusterSnapshot:
    return ClusterSnapshot(
        ts=1.0,
        hosts=[Host(name="a", cpu_cores=8, memory_mib=1024), Host(name="b", cpu_cores=8, memory_mib=1024)],
        vms=[VM(name=n, host="a", cpu_demand_cores=1, memory_mib=128) for n in ("x", "y", "z")],
        rules=rules or [],
    )


def test_round_trip(tmp_path: Path) -> None:
    snap = _snap([Rule(name="r", kind="must_run_on", vms=["x"], hosts=["b"])])
    dump(snap, tmp_path / "s.json")
    assert load(tmp_path / "s.json") == snap


def test_the_shipped_example_loads() -> None:
    snap = load(EXAMPLE)
    assert len(snap.hosts) == 4
    assert snap.settings is not None


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([Rule(name="r", kind="anti_affinity", vms=["x", "nope"])], "rule 'r' names VM 'nope'"),
        ([Rule(name="r", kind="must_run_on", vms=["x"], hosts=["c"])], "rule 'r' names host 'c'"),
        ([Rule(name="r", kind="must_run_on", vms=["x"])], "lists no hosts"),
        ([Rule(name="r", kind="affinity", vms=["x"])], "needs at least two VMs"),
        ([Rule(name="r", kind="affinity", vms=["x", "y"], hosts=["a"])], "must not list hosts"),
        (
            [
                Rule(name="t", kind="affinity", vms=["x", "y"]),
                Rule(name="u", kind="affinity", vms=["y", "z"]),
                Rule(name="apart", kind="anti_affinity", vms=["x", "z"]),
            ],
            "anti-affinity rule 'apart' separates VMs 'x' and 'z'",
        ),
    ],
)
def test_bad_rules_are_named(rules: list[Rule], message: str) -> None:
    with pytest.raises(SnapshotError, match=message):
        validate(_snap(rules))


def test_vm_on_unknown_host_and_duplicates_are_named() -> None:
    snap = _snap()
    bad = ClusterSnapshot(
        ts=1, hosts=snap.hosts, vms=[*snap.vms, VM(name="w", host="q", cpu_demand_cores=0, memory_mib=1)]
    )
    with pytest.raises(SnapshotError, match="VM 'w' runs on host 'q'"):
        validate(bad)
    with pytest.raises(SnapshotError, match="host 'a' is listed twice"):
        validate(ClusterSnapshot(ts=1, hosts=[snap.hosts[0], snap.hosts[0]], vms=[]))


def test_json_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match=r"cpu_cores"):
        loads(b'{"ts": 1, "hosts": [{"name": "a", "cpu_cores": -1, "memory_mib": 1}], "vms": []}')
    with pytest.raises(SnapshotError, match="not valid JSON"):
        loads(b"{")
    with pytest.raises(SnapshotError, match="cannot read snapshot"):
        load(tmp_path / "missing.json")
