"""PlanExecutor and AgentProvider through a real collector and a real agent on libvirt's test:/// driver.

The test driver cannot migrate, so a move fails there with libvirt's own
reason: exactly what the executor must report and stop on.  (A successful
live migration is tests/integration/test_migration.py, on real QEMU guests.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cloudmon.actions.migration import PlanExecutor
from cloudmon.collector import CollectorThread
from cloudmon.control.arbiter import Arbiter
from cloudmon.providers.agent import AgentProvider
from cloudmon.providers.base import InstanceState, LaunchRequest, ProviderError
from cloudmon_agent.agent import Agent
from cloudmon_agent.config import AgentConfig
from tests.unit.collector.helpers import TOKEN, FakeClock, wait_for

libvirt = pytest.importorskip("libvirt")
NODE_XML = Path(__file__).parents[1] / "agent" / "data" / "libvirt-test-node.xml"


@dataclass(frozen=True)
class Mv:
    vm: str
    source: str
    target: str
    mandatory: bool = False
    wave: int = 0


@pytest.fixture
def agent(collector: CollectorThread, tmp_path: Path) -> Iterator[Agent]:
    config = AgentConfig(
        collector=collector.url,
        token=TOKEN,
        node_id="node-a",
        state_dir=tmp_path / "agent",
        interval=0.1,
        libvirt_uri=f"test://{NODE_XML}",
        allow_actions=("vm.migrate", "vm.state", "vm.delete"),
        top_n=0,
        containers=False,
        gpus=False,
    )
    a = Agent(config)
    a.start()
    try:
        wait_for(lambda: collector.collector.model.get("node-a"), what="the agent's first report")
        yield a
    finally:
        a.close()


def executor(
    collector: CollectorThread, clock: FakeClock, events: list[dict[str, Any]], arbiter: Arbiter | None = None
) -> PlanExecutor:
    nodes = {"a": "node-a", "b": "node-b"}
    return PlanExecutor(
        collector.collector.commands,
        nodes.get,
        {"b": "qemu+tcp://10.9.9.9/system"}.get,
        arbiter or Arbiter(clock),
        None,
        clock,
        events.append,
        migrate_timeout_s=20,
        verify_timeout_s=10,
    )


def test_a_failed_migration_stops_the_plan_and_says_why(
    collector: CollectorThread, agent: Agent, clock: FakeClock
) -> None:
    events: list[dict[str, Any]] = []
    arbiter = Arbiter(clock)
    report = executor(collector, clock, events, arbiter).run(
        [Mv("db-1", "a", "b", wave=1), Mv("web-1", "a", "b", wave=0)]
    )
    assert not report.ok
    assert report.done == []
    assert report.failed is not None
    assert report.failed.vm == "web-1"  # wave 0 first
    assert report.failed.reason.startswith(
        "migration failed: migration of web-1 to qemu+tcp://10.9.9.9/system"
    )
    assert report.skipped == ["db-1"]  # nothing after a failure, nothing retried
    assert [e["kind"] for e in events] == [
        "rebalance.move_started",
        "rebalance.move_failed",
        "rebalance.plan_done",
    ]
    assert events[1]["reason"] == report.failed.reason
    assert events[2]["ok"] is False
    assert arbiter.claimed("web-1") is None  # the claim ended with the move


def test_refusals_before_anything_is_sent(collector: CollectorThread, clock: FakeClock) -> None:
    events: list[dict[str, Any]] = []
    no_agent = executor(collector, clock, events).run([Mv("web-1", "c", "b")])
    assert no_agent.failed is not None
    assert no_agent.failed.reason == "host c has no agent reporting to this collector"
    no_uri = executor(collector, clock, events).run([Mv("web-1", "b", "a")])
    assert no_uri.failed is not None
    assert "advertises no migrate_uri; set migrate_uri in its agent.toml" in no_uri.failed.reason
    arbiter = Arbiter(clock, budget=1)
    arbiter.request("autoscale", "other")
    spent = executor(collector, clock, events, arbiter).run([Mv("web-1", "a", "b")])
    assert spent.failed is not None
    assert spent.failed.reason.startswith("the arbiter refused: change budget spent: 1 of 1")
    assert collector.collector.commands.pending("node-a") == []


def test_cancel_stops_before_the_next_move(collector: CollectorThread, clock: FakeClock) -> None:
    events: list[dict[str, Any]] = []
    ex = executor(collector, clock, events)
    ex.cancel()
    report = ex.run([Mv("web-1", "a", "b")])
    assert report.cancelled
    assert not report.ok
    assert report.skipped == ["web-1"]
    assert [e["kind"] for e in events] == ["rebalance.plan_done"]


def test_agent_provider_describes_and_deletes_through_the_agent(
    collector: CollectorThread, agent: Agent, clock: FakeClock
) -> None:
    p = AgentProvider(collector.collector.commands, {"a": "node-a"}, {"timeout_s": 20, "state_timeout_s": 20})
    found = p.describe(["web-1", "off-1", "ghost"])
    assert found["web-1"].state is InstanceState.RUNNING
    assert found["web-1"].host == "a"
    assert found["off-1"].state is InstanceState.STOPPED
    assert found["ghost"].state is InstanceState.MISSING
    p.delete("off-1")
    assert p.describe(["off-1"])["off-1"].state is InstanceState.MISSING
    # vm.create is not in this agent's allow_actions: the agent's refusal comes back as the error.
    with pytest.raises(ProviderError, match=r"vm\.create on host a failed: action vm\.create is not allowed"):
        p.create(LaunchRequest(group="g", name="new-1", image="/nonexistent/base.qcow2"))
    with pytest.raises(ProviderError, match="unknown option"):
        AgentProvider(collector.collector.commands, {"a": "node-a"}, {"colour": "red"})


def test_abandon_stops_waiting_for_a_migration_at_once(collector: CollectorThread, clock: FakeClock) -> None:
    import threading

    events: list[dict[str, Any]] = []
    ex = executor(collector, clock, events)
    reports: list[Any] = []
    # No agent answers for node-a: the migration command waits for it.
    t = threading.Thread(target=lambda: reports.append(ex.run([Mv("web-1", "a", "b")])))
    t.start()
    wait_for(lambda: any(e["kind"] == "rebalance.move_started" for e in events), what="the move to start")
    ex.abandon()
    t.join(10)
    assert not t.is_alive()
    (report,) = reports
    assert not report.ok
    assert report.failed is not None
    assert "the collector stopped while web-1 was migrating" in report.reason
