"""Snapshots from the live model and the real embedded store: p95 demand, rules, maintenance."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudmon.model import ClusterModel
from cloudmon.rebalance.live import load_rules, percentile, snapshot_from_live
from cloudmon.rebalance.planner import plan
from cloudmon.rebalance.snapshot import SnapshotError
from cloudmon.store import Sample, TelemetryStore, open_store

GIB = 1024.0**3
# Recent data: the store picks its tier by the age of the range (raw is kept 24 h).
NOW = float(int(time.time()))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TelemetryStore]:
    s = open_store("sqlite:///" + str(tmp_path / "t.db"))
    yield s
    s.close()


def _values(vms: dict[str, float], cpu: float) -> dict[str, float]:
    out = {"cpu.percent": cpu, "mem.total": 64 * GIB, "mem.used": 20 * GIB}
    for name, pct in vms.items():
        out[f"vm.{name}.host_cpu_percent"] = pct
        out[f"vm.{name}.vcpus"] = 4.0
        out[f"vm.{name}.mem_max"] = 8 * GIB
        out[f"vm.{name}.mem_current"] = 8 * GIB
    return out


def _feed(store: TelemetryStore, model: ClusterModel) -> None:
    # node-a: web's CPU is 10 % of the host most of the time with short peaks of 50 %.
    samples = []
    for i in range(600):
        web = 50.0 if i % 10 == 0 else 10.0
        samples.append(Sample("node-a", NOW - 600 + i, _values({"web": web, "db": 20.0}, web + 25)))
        samples.append(Sample("node-b", NOW - 600 + i, _values({"batch": 5.0}, 8.0)))
    store.write_samples(samples)
    store.flush()
    for node, vms, cpu in (("node-a", {"web": 10.0, "db": 20.0}, 35.0), ("node-b", {"batch": 5.0}, 8.0)):
        model.update(node, node, NOW, 1.0, _values(vms, cpu), {"hostname": node, "cpu_count": 16}, NOW)
    model.update(
        "node-c",
        "node-c",
        NOW - 100,
        1.0,
        _values({}, 1.0),
        {"hostname": "node-c", "cpu_count": 16},
        NOW - 100,
    )


def test_snapshot_uses_a_high_percentile_not_the_last_sample(store: TelemetryStore) -> None:
    model = ClusterModel(node_timeout=5.0)
    _feed(store, model)
    snap = snapshot_from_live(model, store, NOW, window_s=600, step_s=1)
    assert [h.name for h in snap.hosts] == ["node-a", "node-b"]  # node-c is unreachable
    vms = {v.name: v for v in snap.vms}
    # p95 of web's samples is the 50 % peak (1 in 10), not the last 10 %: 0.5 * 16 cores.
    assert vms["web"].cpu_demand_cores == pytest.approx(8.0)
    assert vms["db"].cpu_demand_cores == pytest.approx(3.2)
    assert vms["web"].memory_mib == pytest.approx(8192)
    # Without a window: the latest values, read from the model only (the chart's point).
    now_vms = {v.name: v for v in snapshot_from_live(model, store, NOW, window_s=None).vms}
    assert now_vms["web"].cpu_demand_cores == pytest.approx(1.6)  # the last 10 %
    a = snap.hosts[0]
    assert a.cpu_cores == 16
    assert a.memory_mib == pytest.approx(65536)
    assert a.cpu_used_other == pytest.approx((35 - 30) / 100 * 16)
    assert a.memory_used_other_mib == pytest.approx(4 * 1024)


def test_rules_maintenance_and_vm_documents(store: TelemetryStore) -> None:
    model = ClusterModel(node_timeout=5.0)
    _feed(store, model)
    store.put_document("rule", "db-home", {"kind": "must_run_on", "vms": ["db"], "hosts": ["node-a"]})
    store.put_document("rule", "gone", {"kind": "anti_affinity", "vms": ["web", "old-vm"]})
    store.put_document("host_maintenance", "node-a", {"maintenance": True})
    store.put_document("vm", "batch", {"pinned": True, "dirty_rate_mibps": 50.0})
    snap = snapshot_from_live(model, store, NOW, window_s=600, step_s=1)
    assert [r.name for r in snap.rules] == ["db-home"]  # 'gone' names a VM that is not there
    assert snap.hosts[0].maintenance
    batch = next(v for v in snap.vms if v.name == "batch")
    assert batch.pinned
    assert batch.dirty_rate_mibps == 50.0
    p = plan(snap)
    assert [m.vm for m in p.moves] == ["web"]  # db must stay on node-a; it cannot be evacuated
    assert p.unresolved


def test_bad_rule_document_is_named(store: TelemetryStore) -> None:
    store.put_document("rule", "broken", {"kind": "sideways", "vms": ["a"]})
    with pytest.raises(SnapshotError, match="rule document 'broken'"):
        load_rules(store)


def test_percentile() -> None:
    assert percentile([], 95) == 0.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)


def test_only_vm_hosts_take_part_not_plain_servers_or_guests(store: TelemetryStore) -> None:
    model = ClusterModel(node_timeout=5.0)
    info: dict[str, object] = {"cpu_count": 16}
    model.update("kvm-1", "kvm-1", NOW, 1.0, _values({"web-1": 30.0}, 40.0), info, NOW)
    # An empty host that accepts migrations is a target.
    model.update(
        "kvm-2", "kvm-2", NOW, 1.0, _values({}, 2.0), {**info, "migrate_uri": "qemu+tls://kvm-2/system"}, NOW
    )
    # A plain server (no VMs, no libvirt) and the agent inside guest web-1 are not hosts.
    model.update("db-server", "db-server", NOW, 1.0, _values({}, 50.0), info, NOW)
    model.update("node-in-guest", "web-1", NOW, 1.0, _values({}, 90.0), {"cpu_count": 2}, NOW)
    snap = snapshot_from_live(model, store, NOW, window_s=60)
    assert [h.name for h in snap.hosts] == ["kvm-1", "kvm-2"]
    assert [(v.name, v.host) for v in snap.vms] == [("web-1", "kvm-1")]


def test_stopped_vms_are_left_out_and_a_migrating_vm_counts_once_where_it_runs(
    store: TelemetryStore, caplog: pytest.LogCaptureFixture
) -> None:
    model = ClusterModel(node_timeout=5.0)
    info: dict[str, object] = {"cpu_count": 16, "migrate_uri": "qemu+tcp://x/system"}
    # kvm-1 runs web (being migrated to kvm-2, paused there until it ends) and has a shut-off VM.
    stopped: dict[str, object] = {**info, "vms_not_running": {"old": "shutoff"}}
    model.update("kvm-1", "kvm-1", NOW, 1.0, _values({"web": 30.0, "old": 0.0}, 40.0), stopped, NOW)
    model.update(
        "kvm-2",
        "kvm-2",
        NOW,
        1.0,
        _values({"web": 0.0}, 2.0),
        {**info, "vms_not_running": {"web": "paused"}},
        NOW,
    )
    snap = snapshot_from_live(model, store, NOW, window_s=60)
    assert [(v.name, v.host) for v in snap.vms] == [("web", "kvm-1")]
    # Right after the migration both hosts may report it running (one report is older):
    # where is not clear, so it is left out with a warning, and the rest still plans.
    model.update("kvm-2", "kvm-2", NOW, 1.0, _values({"web": 30.0, "db": 5.0}, 40.0), info, NOW)
    snap = snapshot_from_live(model, store, NOW, window_s=60)
    assert [(v.name, v.host) for v in snap.vms] == [("db", "kvm-2")]
    assert "leaves out VM web: hosts kvm-1 (running), kvm-2 (running)" in caplog.text
