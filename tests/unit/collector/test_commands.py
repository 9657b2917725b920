"""Commands for agents: the queue on its own, and the round trip through a real collector and a real agent."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from cloudmon.collector import CollectorThread
from cloudmon.collector.commands import CommandError, CommandQueue, CommandState
from cloudmon_agent.actions import not_allowed_message
from cloudmon_agent.agent import Agent
from cloudmon_agent.config import AgentConfig
from cloudmon_agent.schema import CommandProgress, CommandResult, encode
from tests.unit.collector.helpers import TOKEN, FakeClock, get, make_report, post, wait_for

NODE_XML = Path(__file__).parents[1] / "agent" / "data" / "libvirt-test-node.xml"


@pytest.fixture
def queue(clock: FakeClock) -> CommandQueue:
    return CommandQueue(clock, result_grace_s=10.0)


def result(cid: str, ok: bool = True, **detail: Any) -> CommandResult:
    return CommandResult(
        id=cid, ok=ok, started=1.0, finished=2.0, detail=detail, error=None if ok else "broke"
    )


# -- the queue ------------------------------------------------------------------------------


def test_submit_checks_action_params_and_timeout(queue: CommandQueue) -> None:
    with pytest.raises(CommandError, match=r"unknown action 'vm\.reboot'; known actions: vm\.create"):
        queue.submit("n1", "vm.reboot", {"vm": "a"})
    with pytest.raises(
        CommandError, match=r"invalid parameters for vm\.migrate: Object missing required field `dest_uri`"
    ):
        queue.submit("n1", "vm.migrate", {"vm": "a"})
    with pytest.raises(CommandError, match="timeout_s must be > 0"):
        queue.submit("n1", "vm.state", {"vm": "a"}, timeout_s=0)
    assert queue.take("n1") == []


def test_commands_are_resent_until_a_report_mentions_them(queue: CommandQueue, clock: FakeClock) -> None:
    h = queue.submit("n1", "vm.state", {"vm": "a"}, timeout_s=60)
    assert h.view().state == "queued"
    assert queue.take("other") == []
    first = queue.take("n1")
    assert [c.id for c in first] == [h.id]
    assert first[0].action == "vm.state"
    assert first[0].params == {"vm": "a"}
    assert first[0].timeout_s == 60
    assert h.state is CommandState.SENT
    clock.advance(5)
    again = queue.take("n1")  # the answer may have been lost: send it again
    assert [c.id for c in again] == [h.id]
    assert again[0].timeout_s == 55
    assert queue.report("n1", [CommandProgress(h.id, "running", {"percent": 40.0})], []) == []
    assert queue.take("n1") == []
    assert h.progress == {"percent": 40.0}
    assert h.state is CommandState.SENT


def test_first_result_stands_copies_are_acknowledged_and_ignored(queue: CommandQueue) -> None:
    h = queue.submit("n1", "vm.state", {"vm": "a"})
    queue.take("n1")
    assert queue.report("n1", [], [result(h.id, state="running")]) == [h.id]
    assert h.state is CommandState.DONE
    assert h.ok
    assert queue.report("n1", [], [result(h.id, ok=False)]) == [h.id]
    assert h.result is not None
    assert h.result.detail == {"state": "running"}
    # Results for another node's command, or a forgotten one: acknowledged, not recorded.
    h2 = queue.submit("n2", "vm.state", {"vm": "b"})
    assert queue.report("n1", [], [result(h2.id), result("gone")]) == [h2.id, "gone"]
    assert h2.state is CommandState.QUEUED
    assert queue.pending("n2") == [h2]


def test_unpicked_commands_expire_at_the_deadline_sent_ones_after_the_grace(
    queue: CommandQueue, clock: FakeClock
) -> None:
    events: list[dict[str, object]] = []
    queue.on_event = events.append
    q = queue.submit("n1", "vm.state", {"vm": "a"}, timeout_s=30)
    s = queue.submit("n2", "vm.state", {"vm": "b"}, timeout_s=30)
    queue.take("n2")
    clock.advance(30)
    assert queue.expire() == [q]
    assert q.state is CommandState.EXPIRED
    assert q.result is not None
    assert q.result.error is not None
    assert "did not pick the command up within 30 s" in q.result.error
    assert "it was not run" in q.result.error
    assert queue.take("n1") == []
    clock.advance(9)
    assert queue.expire() == []
    clock.advance(1)
    assert queue.expire() == [s]
    assert s.result is not None
    assert s.result.error is not None
    assert "may still run or have run" in s.result.error
    # A late result is still recorded, and the event says it was late.
    queue.report("n2", [], [result(s.id, state="running")])
    assert s.state is CommandState.DONE
    assert [e["kind"] for e in events] == [
        "command.submitted",
        "command.submitted",
        "command.expired",
        "command.expired",
        "command.done",
    ]
    assert events[-1]["late"] is True


def test_wait_returns_when_another_thread_records_the_result(queue: CommandQueue) -> None:
    h = queue.submit("n1", "vm.state", {"vm": "a"})
    queue.take("n1")
    t = threading.Timer(0.05, lambda: queue.report("n1", [], [result(h.id, state="running")]))
    t.start()
    try:
        got = h.wait(10)
    finally:
        t.join()
    assert got is not None
    assert got.detail == {"state": "running"}
    assert h.wait(0) is got


def test_wait_with_a_version_returns_on_progress(queue: CommandQueue) -> None:
    h = queue.submit("n1", "vm.migrate", {"vm": "a", "dest_uri": "qemu+tcp://b/system"})
    queue.take("n1")
    v = h.version
    t = threading.Timer(
        0.05, lambda: queue.report("n1", [CommandProgress(h.id, "running", {"percent": 5})], [])
    )
    t.start()
    try:
        assert h.wait(10, since_version=v) is None
    finally:
        t.join()
    assert h.version != v
    assert h.view().progress == {"percent": 5}


def test_a_node_has_a_bounded_number_of_pending_commands(clock: FakeClock) -> None:
    q = CommandQueue(clock, max_pending_per_node=2)
    q.submit("n1", "vm.state", {"vm": "a"})
    q.submit("n1", "vm.state", {"vm": "a"})
    with pytest.raises(CommandError, match="already has 2 commands waiting"):
        q.submit("n1", "vm.state", {"vm": "a"})
    q.submit("n2", "vm.state", {"vm": "a"})


# -- through a real collector ---------------------------------------------------------------


def test_ingest_answers_carry_commands_and_acknowledge_results(collector: CollectorThread) -> None:
    post(collector.url, encode(make_report("n1", ts=1_000_000.0)))
    h = collector.collector.commands.submit("n1", "vm.state", {"vm": "web-1"})
    answer = post(collector.url, encode(make_report("n1", ts=1_000_001.0)))
    assert answer.status == 200
    assert [c["id"] for c in answer.body["commands"]] == [h.id]
    assert answer.body["commands"][0]["action"] == "vm.state"
    assert "acked" not in answer.body
    # Another node's answer carries nothing for it.
    assert post(collector.url, encode(make_report("n2", ts=1_000_001.0))).body["commands"] == []
    r = msgspec.structs.replace(make_report("n1", ts=1_000_002.0), results=[result(h.id, state="running")])
    for _ in range(2):  # a resent report (lost answer, spool replay): same answer, one result
        answer = post(collector.url, encode(r))
        assert answer.body == {"accepted": 1, "commands": [], "acked": [h.id]}
    assert h.state is CommandState.DONE
    assert h.result is not None
    assert h.result.detail == {"state": "running"}


def test_command_routes(collector: CollectorThread) -> None:
    post(collector.url, encode(make_report("n1")))
    path = "/api/v1/nodes/n1/commands"
    body = msgspec.json.encode({"action": "vm.state", "params": {"vm": "web-1"}, "timeout_s": 60})
    answer = post(collector.url, body, path=path)
    assert answer.status == 202, answer.body
    view = answer.body
    assert view["state"] == "queued"
    assert view["node_id"] == "n1"
    assert view["params"] == {"vm": "web-1"}
    assert view["result"] is None
    got = get(collector.url, f"/api/v1/commands/{view['id']}")
    assert got.status == 200
    assert got.body["id"] == view["id"]
    assert post(collector.url, body, path=path, token=None).status == 401
    missing = post(collector.url, body, path="/api/v1/nodes/nobody/commands")
    assert missing.status == 404
    assert "unknown node 'nobody'" in missing.body["error"]
    bad = post(collector.url, msgspec.json.encode({"action": "vm.state", "params": {}}), path=path)
    assert bad.status == 400
    assert "invalid parameters for vm.state" in bad.body["error"]
    typo = post(collector.url, msgspec.json.encode({"action": "vm.state", "parms": {}}), path=path)
    assert typo.status == 400
    assert "parms" in typo.body["error"]
    assert get(collector.url, "/api/v1/commands/nope").status == 404


@pytest.fixture
def agent(collector: CollectorThread, tmp_path: Path) -> Iterator[Agent]:
    pytest.importorskip("libvirt")
    config = AgentConfig(
        collector=collector.url,
        token=TOKEN,
        node_id="agent-1",
        name="agent-host",
        state_dir=tmp_path / "agent-state",
        interval=0.1,
        libvirt_uri=f"test://{NODE_XML}",
        allow_actions=("vm.state",),
        migrate_uri="qemu+tcp://10.9.9.9/system",
        top_n=0,
        containers=False,
        gpus=False,
    )
    a = Agent(config)
    a.start()
    try:
        yield a
    finally:
        a.close()


def test_round_trip_with_a_real_agent(collector: CollectorThread, agent: Agent) -> None:
    ct = collector.collector
    node = wait_for(lambda: ct.model.get("agent-1"), what="the agent's first report")
    assert node.info["migrate_uri"] == "qemu+tcp://10.9.9.9/system"
    ok = ct.commands.submit("agent-1", "vm.state", {"vm": "web-1"}, timeout_s=30)
    refused = ct.commands.submit("agent-1", "vm.stop", {"vm": "web-1"}, timeout_s=30)
    assert ok.wait(20) is not None, ok.view()
    assert refused.wait(20) is not None, refused.view()
    assert ok.ok
    assert ok.result is not None
    assert ok.result.detail == {"vm": "web-1", "state": "running"}
    assert refused.result is not None
    assert not refused.result.ok
    assert refused.result.error == not_allowed_message("vm.stop")
    # The collector acknowledged both: the agent stops sending them.
    executor = agent.open_executor()
    wait_for(lambda: executor.outgoing() == ([], []), what="results acknowledged")
