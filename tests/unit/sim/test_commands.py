"""Simulated hosts execute the collector's commands: driven with real wire messages, no collector.

Answers are real :class:`IngestResponse` objects (what ``HttpTransport.send``
returns) and every report goes through the real wire decoder, so what is
checked here is what the collector would see.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from cloudmon.sim import Simulator, Workload
from cloudmon.sim.simulator import SOLO_TICKS, migrate_uri, migration_seconds
from cloudmon_agent.schema import Command, CommandResult, IngestResponse, Report, decode_report, encode


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _reports(sim: Simulator, now: float) -> dict[str, Report]:
    return {r.node_id: decode_report(encode(r)) for r in sim.build_reports(now)}


def _cmd(cid: str, action: str, clock: Clock, timeout_s: float = 60.0, **params: Any) -> Command:
    return Command(id=cid, action=action, deadline=clock.now + timeout_s, timeout_s=timeout_s, params=params)


def _answer(*commands: Command, acked: list[str] | None = None) -> IngestResponse:
    # Through the wire encoding too: the simulator gets what the transport decodes.
    raw = encode(IngestResponse(accepted=1, commands=list(commands), acked=acked or msgspec.UNSET))
    return msgspec.json.decode(raw, type=IngestResponse)


def _result(report: Report, cid: str) -> CommandResult:
    found = [r for r in report.results if r.id == cid]
    assert found, f"no result {cid} in {report.node_id}'s report: {report.results}"
    return found[0]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sim(clock: Clock) -> Simulator:
    s = Simulator(None, None, clock=clock)
    s.add_host("a", vcpus=8, memory_mib=16384)
    s.add_host("b", vcpus=8, memory_mib=16384)
    s.add_vm("a", "db", 2, 4096, Workload.constant(60))
    return s


def test_hosts_advertise_a_migrate_uri_and_instances_do_not(sim: Simulator, clock: Clock) -> None:
    sim.add_instance("web-1", "web", "b")
    reports = _reports(sim, clock.now)
    assert reports["sim-a"].node.migrate_uri == migrate_uri("sim-a") == "sim+migrate://sim-a"
    assert reports["sim-web-1"].node.migrate_uri == ""


def test_migration_reports_progress_then_moves_the_vm_and_its_load(sim: Simulator, clock: Clock) -> None:
    assert migration_seconds(4096) == 2.0
    cmd = _cmd("m1", "vm.migrate", clock, vm="db", dest_uri="sim+migrate://sim-b", live=True, timeout_s=600)
    assert sim.receive(["sim-a"], _answer(cmd)) == 1
    sim.tick()
    assert sim.solo_nodes() == {"sim-a", "sim-b"}  # the source got a command; the destination is checked next
    first = _reports(sim, clock.now)["sim-a"]
    assert [(p.id, p.state, p.detail["percent"]) for p in first.progress] == [("m1", "running", 0.0)]
    assert {v.name for v in first.vms} == {"db"}  # still on the source while it copies

    clock.now += 1.0
    sim.tick()
    half = _reports(sim, clock.now)
    assert half["sim-a"].progress[0].detail["percent"] == pytest.approx(50.0)
    assert half["sim-a"].progress[0].detail["data_processed"] == pytest.approx(2048 * 1024 * 1024)
    assert half["sim-b"].vms == []

    clock.now += 1.0
    sim.tick()
    done = _reports(sim, clock.now)
    result = _result(done["sim-a"], "m1")
    assert result.ok, result.error
    assert result.detail["vm"] == "db"
    assert result.detail["dest_uri"] == "sim+migrate://sim-b"
    assert result.detail["percent"] == 100.0
    assert result.detail["data_total"] == 4096 * 1024 * 1024
    assert result.finished - result.started == pytest.approx(2.0)
    assert done["sim-a"].progress == []
    assert done["sim-a"].vms == []
    moved = {v.name: v for v in done["sim-b"].vms}
    assert set(moved) == {"db"}
    assert moved["db"].cpu_percent == pytest.approx(60.0)  # its workload came along
    assert sim.vm_host("db") == "sim-b"


def test_each_command_runs_once_and_its_result_rides_until_acked(sim: Simulator, clock: Clock) -> None:
    cmd = _cmd("m1", "vm.migrate", clock, vm="db", dest_uri="sim+migrate://sim-b")
    sim.receive(["sim-a"], _answer(cmd))
    # The collector sends it again until a report mentions it: not a second migration.
    assert sim.receive(["sim-a"], _answer(cmd)) == 0
    clock.now += migration_seconds(4096)
    sim.tick()
    for _ in range(3):  # repeated in every report ...
        assert _result(_reports(sim, clock.now)["sim-a"], "m1").ok
    sim.receive(["sim-a"], _answer(cmd))  # ... and a late copy of the command after it finished
    assert sim.stats.commands_taken == 1
    sim.receive(["sim-a"], _answer(acked=["m1"]))  # ... until the collector acknowledges it
    assert _reports(sim, clock.now)["sim-a"].results == []
    assert sim.pending_results("sim-a") == []
    assert sim.stats.results_acked == 1
    assert sim.vm_host("db") == "sim-b"


def test_state_stop_and_start(sim: Simulator, clock: Clock) -> None:
    sim.receive(["sim-a"], _answer(_cmd("s1", "vm.state", clock, vm="db")))
    sim.receive(["sim-b"], _answer(_cmd("s2", "vm.state", clock, vm="db")))
    reports = _reports(sim, clock.now)
    assert _result(reports["sim-a"], "s1").detail == {"vm": "db", "state": "running"}
    assert _result(reports["sim-b"], "s2").detail == {"vm": "db", "state": "missing"}

    sim.receive(["sim-a"], _answer(_cmd("stop", "vm.stop", clock, vm="db", timeout_s=5, force=True)))
    reports = _reports(sim, clock.now)
    assert _result(reports["sim-a"], "stop").detail == {"vm": "db", "state": "shutoff"}
    vm = reports["sim-a"].vms[0]
    assert (vm.state, vm.cpu_percent, vm.mem_current) == ("shutoff", 0.0, 0)
    assert sim.vm_state("db") == "shutoff"

    sim.receive(["sim-a"], _answer(_cmd("start", "vm.start", clock, vm="db")))
    reports = _reports(sim, clock.now)
    assert _result(reports["sim-a"], "start").detail == {"vm": "db", "state": "running"}
    assert reports["sim-a"].vms[0].cpu_percent == pytest.approx(60.0)


@pytest.mark.parametrize(
    ("node", "action", "params", "error"),
    [
        ("sim-a", "vm.create", {"name": "x"}, "action vm.create is not supported by simulated node sim-a"),
        ("sim-a", "vm.delete", {"vm": "db"}, "not supported by simulated node"),
        ("sim-a", "vm.teleport", {"vm": "db"}, "unknown action 'vm.teleport': this agent knows"),
        ("sim-a", "vm.state", {"name": "db"}, "invalid parameters for vm.state"),
        ("sim-a", "vm.start", {"vm": "nope"}, "cannot start VM 'nope': it is not defined on sim-a"),
        ("sim-b", "vm.stop", {"vm": "db"}, "cannot stop VM 'db': it is not defined on sim-b"),
        ("sim-a", "vm.migrate", {"vm": "db", "dest_uri": "sim+migrate://sim-a"}, "same host"),
        (
            "sim-a",
            "vm.migrate",
            {"vm": "db", "dest_uri": "sim+migrate://sim-zz"},
            "no simulated host 'sim-zz'",
        ),
        (
            "sim-a",
            "vm.migrate",
            {"vm": "db", "dest_uri": "qemu+tcp://10.0.0.2/system"},
            "take only sim+migrate",
        ),
        ("sim-b", "vm.migrate", {"vm": "db", "dest_uri": "sim+migrate://sim-a"}, "not defined on sim-b"),
        ("sim-web-1", "vm.state", {"vm": "db"}, "is a simulated group instance (a guest), not a host"),
    ],
)
def test_what_cannot_run_gets_a_failed_result_that_says_why(
    sim: Simulator, clock: Clock, node: str, action: str, params: dict[str, Any], error: str
) -> None:
    sim.add_instance("web-1", "web", "b")
    sim.receive([node], _answer(_cmd("c", action, clock, **params)))
    result = _result(_reports(sim, clock.now)[node], "c")
    assert not result.ok
    assert error in (result.error or "")
    assert sim.vm_host("db") == "sim-a"  # nothing moved


def test_a_migration_needs_room_on_the_destination(clock: Clock) -> None:
    sim = Simulator(None, None, clock=clock)
    sim.add_host("a", memory_mib=16384)
    sim.add_host("small", memory_mib=8192)
    sim.add_vm("a", "big", 4, 8192, Workload.constant(10))
    sim.receive(
        ["sim-a"], _answer(_cmd("m", "vm.migrate", clock, vm="big", dest_uri=migrate_uri("sim-small")))
    )
    result = _result(_reports(sim, clock.now)["sim-a"], "m")
    assert "it needs 8192 MiB and sim-small has 6144 MiB free" in (result.error or "")


def test_a_migration_past_its_time_limit_is_aborted_and_the_vm_stays(sim: Simulator, clock: Clock) -> None:
    # 4 GiB takes 2 s; the command allows 1.5 s.
    sim.receive(
        ["sim-a"],
        _answer(_cmd("m", "vm.migrate", clock, vm="db", dest_uri=migrate_uri("sim-b"), timeout_s=1.5)),
    )
    clock.now += 1.6
    sim.tick()
    result = _result(_reports(sim, clock.now)["sim-a"], "m")
    assert not result.ok
    assert "timed out" in (result.error or "")
    assert "keeps running on this host" in (result.error or "")
    clock.now += 5
    sim.tick()
    assert sim.vm_host("db") == "sim-a"


def test_a_group_instance_migrates_and_its_agent_keeps_reporting(sim: Simulator, clock: Clock) -> None:
    sim.set_workload("web", Workload.constant(40))
    sim.add_instance("web-1", "web", "a", vcpus=2, memory_mib=2048)
    sim.receive(["sim-a"], _answer(_cmd("m", "vm.migrate", clock, vm="web-1", dest_uri=migrate_uri("sim-b"))))
    clock.now += migration_seconds(2048)
    sim.tick()
    reports = _reports(sim, clock.now)
    assert _result(reports["sim-a"], "m").ok
    assert {v.name for v in reports["sim-b"].vms} == {"web-1"}
    assert {v.name for v in reports["sim-a"].vms} == {"db"}
    assert reports["sim-web-1"].host.cpu_percent == pytest.approx(40.0)
    assert sim.vm_host("web-1") == "sim-b"
    assert sim.host_usage() == {
        "sim-a": {"vcpus_used": 2.0, "memory_mib_used": 4096.0},
        "sim-b": {"vcpus_used": 2.0, "memory_mib_used": 2048.0},
    }


def test_commands_answered_to_a_batch_wait_until_their_nodes_post_alone(sim: Simulator, clock: Clock) -> None:
    cmd = _cmd("s", "vm.state", clock, vm="db")
    # An answer to a batch does not say which node a command is for: nothing runs yet ...
    assert sim.receive(["sim-a", "sim-b"], _answer(cmd)) == 0
    assert sim.stats.commands_taken == 0
    assert _reports(sim, clock.now)["sim-a"].results == []
    # ... the command comes again on the node's own answer, and runs there.
    assert sim.receive(["sim-b"], _answer(cmd)) == 1
    assert _result(_reports(sim, clock.now)["sim-b"], "s").detail["state"] == "missing"
    assert SOLO_TICKS > 1


def test_the_simulated_provider_follows_a_migrated_instance(sim: Simulator, clock: Clock) -> None:
    from cloudmon.providers.base import LaunchRequest
    from cloudmon.providers.simulated import SimulatedProvider

    provider = SimulatedProvider(
        {
            "simulator": sim,
            "hosts": {"a": {"vcpus": 8, "memory_mib": 16384}, "b": {"vcpus": 8, "memory_mib": 16384}},
        },
        clock=clock,
    )
    try:
        info = provider.create(LaunchRequest(group="web", name="web-1", vcpus=2, memory_mib=2048, host="a"))
        assert info.host == "sim-a"
        sim.receive(
            ["sim-a"], _answer(_cmd("m", "vm.migrate", clock, vm="web-1", dest_uri=migrate_uri("sim-b")))
        )
        clock.now += migration_seconds(2048)
        sim.tick()
        assert provider.describe(["web-1"])["web-1"].host == "sim-b"
        # Placement sees where things are now: db (4 GiB) on a, web-1 (2 GiB) on b.
        hosts = provider.hosts()
        assert hosts["sim-a"]["memory_mib_used"] == 4096.0
        assert hosts["sim-b"]["memory_mib_used"] == 2048.0
    finally:
        provider.close()
