"""The control plane's rebalancing decisions with plain data: holds, automation, settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from cloudmon.collector.commands import CommandQueue
from cloudmon.control.arbiter import Arbiter
from cloudmon.control.plane import ControlError, ControlPlane
from cloudmon.model.cluster import ClusterModel
from cloudmon.rebalance.snapshot import VM, ClusterSnapshot, Host
from cloudmon.store import TelemetryStore, open_store


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


SNAPSHOT = ClusterSnapshot(
    ts=0.0,
    hosts=[
        Host(name="busy", cpu_cores=8, memory_mib=32768),
        Host(name="idle", cpu_cores=8, memory_mib=32768),
    ],
    vms=[VM(name=f"vm{i}", host="busy", cpu_demand_cores=1.8, memory_mib=2048) for i in range(4)],
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TelemetryStore]:
    s = open_store(f"sqlite:///{tmp_path / 't.db'}")
    yield s
    s.close()


@pytest.fixture
def plane(store: TelemetryStore) -> Iterator[ControlPlane]:
    clock = Clock()
    p = ControlPlane(
        store,
        ClusterModel(),
        CommandQueue(clock),
        clock=clock,
        arbiter=Arbiter(clock, hold_s=600),
        snapshot_source=lambda model, store, now, window: SNAPSHOT,
    )
    yield p
    p.close()


def test_a_vm_just_moved_is_not_planned_back_and_the_plan_says_why(plane: ControlPlane) -> None:
    first = plane.compute_plan({"threshold": 5})
    moved = {m["vm"] for m in first["moves"]}
    assert moved, first
    # vm0 came to "busy" from "idle" a minute ago (say, rebalanced the other way).
    assert plane.arbiter.request("rebalance", "vm0", source="idle", target="busy")
    plane.arbiter.release("rebalance", "vm0")
    again = plane.compute_plan({})
    assert "vm0" not in {m["vm"] for m in again["moves"]}
    assert again["moves"], "the other VMs still balance the cluster"
    (held,) = [r for r in again["rejected"] if r["vm"] == "vm0"]
    assert held["why"] == "hold"
    assert "moving it back is held" in held["detail"]


def test_settings_are_checked_and_kept(plane: ControlPlane) -> None:
    with pytest.raises(ControlError, match="automation"):
        plane.put_settings({"automation": "sometimes"})
    assert plane.put_settings({"automation": "partial", "threshold": 2}).automation == "partial"
    assert plane.settings().threshold == 2


def test_a_vm_another_loop_just_changed_stays_put_unless_it_must_move(store: TelemetryStore) -> None:
    clock = Clock()
    arbiter = Arbiter(clock, hold_s=600)
    snap = SNAPSHOT

    def source(
        model: ClusterModel, store: TelemetryStore, now: float, window: float | None
    ) -> ClusterSnapshot:
        return snap

    plane = ControlPlane(
        store, ClusterModel(), CommandQueue(clock), clock=clock, arbiter=arbiter, snapshot_source=source
    )
    try:
        # The auto-scaler launched every VM on "busy" a minute ago (and let go of them).
        for v in SNAPSHOT.vms:
            assert arbiter.request("autoscale", v.name)
            arbiter.release("autoscale", v.name)
        held = plane.compute_plan({"threshold": 5})
        assert held["moves"] == []
        assert {r["vm"] for r in held["rejected"] if r["why"] == "hold"} == {v.name for v in SNAPSHOT.vms}
        assert all("changed by autoscale" in r["detail"] for r in held["rejected"] if r["why"] == "hold")
        # "busy" enters maintenance: its VMs must move, hold or not.
        snap = ClusterSnapshot(
            ts=0.0,
            hosts=[Host(name="busy", cpu_cores=8, memory_mib=32768, maintenance=True), SNAPSHOT.hosts[1]],
            # (lighter, so that all four fit on "idle" within its headroom)
            vms=[msgspec.structs.replace(v, cpu_demand_cores=1.5) for v in SNAPSHOT.vms],
        )
        evacuation = plane.compute_plan({})
        assert {m["vm"] for m in evacuation["moves"]} == {v.name for v in SNAPSHOT.vms}
        assert all(m["mandatory"] for m in evacuation["moves"])
    finally:
        plane.close()


def test_the_command_provider_runs_only_programs_the_operator_allowed(
    store: TelemetryStore, tmp_path: Path
) -> None:
    from cloudmon.autoscale.model import LaunchTemplate
    from cloudmon.providers.base import ProviderError

    script = tmp_path / "mycloud"
    script.write_text("#!/bin/sh\ncat >/dev/null; echo i-1\n", encoding="utf-8")
    script.chmod(0o755)
    clock = Clock()
    plane = ControlPlane(
        store, ClusterModel(), CommandQueue(clock), clock=clock, command_allow=(str(script),)
    )
    try:
        allowed = LaunchTemplate(
            provider="command", params={"create": [str(script), "create"], "delete": f"{script} rm"}
        )
        assert plane._provider_for(allowed).name == "command"
        for params, what in (
            ({"create": "/usr/bin/python3 -c 1", "delete": [str(script)]}, "/usr/bin/python3"),
            ({"create": ["mycloud"], "delete": [str(script)]}, "'mycloud'"),  # relative: found on PATH
            # An allowed program with the caller's environment would run anything (BASH_ENV, LD_PRELOAD).
            ({"create": [str(script)], "delete": [str(script)], "env": {"BASH_ENV": "$(id)"}}, "'env'"),
            ({"create": [str(script)], "delete": [str(script)], "cwd": "/"}, "'cwd'"),
        ):
            with pytest.raises(ProviderError) as err:
                plane._provider_for(LaunchTemplate(provider="command", params=params))
            assert what in str(err.value)
    finally:
        plane.close()


def test_command_allow_comes_from_the_environment_as_a_list(tmp_path: Path) -> None:
    from cloudmon.config import load_config

    empty = tmp_path / "cloudmon.toml"  # never the user's own config
    empty.write_text("", encoding="utf-8")
    config = load_config(empty, environ={"CLOUDMON_COMMAND_ALLOW": "/bin/sh, /usr/local/bin/mycloud"})
    assert config.command_allow == ["/bin/sh", "/usr/local/bin/mycloud"]


def test_libvirt_uris_that_run_programs_are_refused(store: TelemetryStore) -> None:
    from cloudmon.autoscale.model import LaunchTemplate
    from cloudmon.providers.base import ProviderError

    clock = Clock()
    plane = ControlPlane(store, ClusterModel(), CommandQueue(clock), clock=clock)
    try:
        for uri in ("qemu+ext:///system?command=/tmp/evil", "qemu+ssh://h/system?netcat=/tmp/evil"):
            template = LaunchTemplate(
                provider="libvirt", params={"hosts": {"h": uri}, "template_xml": "/x.xml"}
            )
            with pytest.raises(ProviderError, match="would run a program"):
                plane._provider_for(template)
    finally:
        plane.close()
