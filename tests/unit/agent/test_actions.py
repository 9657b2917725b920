"""The agent's executor on libvirt's test:/// driver: allow-list, parameters, deadlines, exactly once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudmon_agent.actions import JOURNAL_FILE, Executor, not_allowed_message
from cloudmon_agent.config import ConfigError, load_config
from cloudmon_agent.schema import Command, CommandResult

libvirt = pytest.importorskip("libvirt")

NODE_XML = Path(__file__).parent / "data" / "libvirt-test-node.xml"
URI = f"test://{NODE_XML}"
ALL = ("vm.create", "vm.start", "vm.stop", "vm.delete", "vm.migrate", "vm.state")


def cmd(cid: str, action: str, within: float = 30.0, **params: Any) -> Command:
    """A command as the collector sends it, ``within`` seconds to run."""
    return Command(id=cid, action=action, deadline=time.time() + within, timeout_s=within, params=params)


def results_of(ex: Executor, n: int, timeout: float = 10.0) -> dict[str, CommandResult]:
    """Wait until the executor is idle and has ``n`` unacknowledged results."""
    deadline = time.monotonic() + timeout
    while True:
        _, results = ex.outgoing()
        if ex.idle() and len(results) >= n:
            return {r.id: r for r in results}
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {n} results, have {[r.id for r in results]}")
        time.sleep(0.01)


@pytest.fixture
def executor(tmp_path: Path) -> Iterator[Executor]:
    ex = Executor(ALL, URI, tmp_path / "state")
    try:
        yield ex
    finally:
        ex.close()


def test_vm_state_reports_the_domain_state(executor: Executor) -> None:
    executor.submit([cmd("c1", "vm.state", vm="web-1"), cmd("c2", "vm.state", vm="off-1")])
    res = results_of(executor, 2)
    assert res["c1"].ok, res["c1"].error
    assert res["c1"].detail == {"vm": "web-1", "state": "running"}
    assert res["c2"].detail["state"] == "shutoff"
    assert res["c1"].started <= res["c1"].finished


def test_missing_vm_state_is_missing_not_an_error(executor: Executor) -> None:
    executor.submit([cmd("c1", "vm.state", vm="no-such-vm")])
    assert results_of(executor, 1)["c1"].detail == {"vm": "no-such-vm", "state": "missing"}


def test_lifecycle_stop_start_delete_through_vmops(executor: Executor) -> None:
    executor.submit([cmd("s1", "vm.stop", vm="web-1", timeout_s=1.0)])
    assert results_of(executor, 1)["s1"].detail == {"vm": "web-1", "state": "shutoff"}
    executor.submit([cmd("s2", "vm.start", vm="web-1")])
    assert results_of(executor, 2)["s2"].detail == {"vm": "web-1", "state": "running"}
    executor.submit([cmd("s3", "vm.delete", vm="off-1"), cmd("s4", "vm.state", vm="off-1")])
    res = results_of(executor, 4)
    assert res["s3"].ok, res["s3"].error
    assert res["s4"].detail["state"] == "missing"


def test_vms_cloudmon_did_not_create_are_neither_stopped_nor_deleted(executor: Executor) -> None:
    executor.submit([cmd("n1", "vm.stop", vm="db-1", timeout_s=1.0), cmd("n2", "vm.delete", vm="db-1")])
    res = results_of(executor, 2)
    for cid in ("n1", "n2"):
        assert not res[cid].ok
        assert "not created by cloudmon" in (res[cid].error or "")
    executor.submit([cmd("n3", "vm.state", vm="db-1")])
    assert results_of(executor, 3)["n3"].detail["state"] == "running"


def test_create_takes_files_only_from_the_image_dirs(tmp_path: Path) -> None:
    ex = Executor(ALL, URI, tmp_path / "state", image_dirs=[str(tmp_path / "images")])
    try:
        ex.submit(
            [
                cmd(
                    "c1",
                    "vm.create",
                    name="x1",
                    base_image="/etc/shadow",
                    base_format="raw",
                    overlay_dir=str(tmp_path / "images"),
                ),
                cmd("c2", "vm.create", name="x2", template_xml=str(tmp_path / "images/../elsewhere/t.xml")),
            ]
        )
        res = results_of(ex, 2)
        assert "base_image '/etc/shadow' is outside this agent's image_dirs" in (res["c1"].error or "")
        assert "outside this agent's image_dirs" in (res["c2"].error or "")  # .. does not escape
    finally:
        ex.close()


def test_a_failing_action_says_why(executor: Executor) -> None:
    executor.submit([cmd("f1", "vm.start", vm="ghost")])
    res = results_of(executor, 1)["f1"]
    assert not res.ok
    assert res.error is not None
    assert "ghost" in res.error
    assert "not defined" in res.error


def test_migration_is_refused_by_the_test_driver_with_libvirt_reason(executor: Executor) -> None:
    # The test driver has no migration: the real libvirt error must come back, not a hang.
    executor.submit(
        [
            cmd("m1", "vm.migrate", vm="web-1", dest_uri="test:///default"),
            cmd("m2", "vm.migrate", vm="ghost", dest_uri="test:///default"),
            cmd("m3", "vm.migrate", vm="off-1", dest_uri="test:///default"),
        ]
    )
    res = results_of(executor, 3)
    assert not res["m1"].ok
    assert res["m1"].error is not None
    assert res["m1"].error.startswith("migration of web-1 to test:///default failed after")
    assert res["m2"].error == "there is no VM named 'ghost' on this host"
    assert res["m3"].error is not None
    assert "not running" in res["m3"].error


def test_nothing_is_allowed_by_default(tmp_path: Path) -> None:
    ex = Executor((), URI, tmp_path / "state")
    try:
        ex.submit([cmd("r1", "vm.migrate", vm="web-1", dest_uri="qemu+tcp://h/system")])
        res = results_of(ex, 1)["r1"]
    finally:
        ex.close()
    assert not res.ok
    assert res.error == not_allowed_message("vm.migrate")
    assert "allow_actions" in res.error
    assert "CLOUDMON_ALLOW_ACTIONS" in res.error


def test_only_allowed_actions_run(tmp_path: Path) -> None:
    ex = Executor(("vm.state",), URI, tmp_path / "state")
    try:
        ex.submit([cmd("a1", "vm.state", vm="web-1"), cmd("a2", "vm.stop", vm="web-1")])
        ex.submit([cmd("a3", "vm.state", vm="web-1")])
        res = results_of(ex, 3)
    finally:
        ex.close()
    assert res["a1"].ok
    assert res["a2"].error == not_allowed_message("vm.stop")
    assert res["a3"].detail["state"] == "running"  # the refused stop did not run


def test_unknown_action_and_bad_params_are_refused_naming_the_problem(executor: Executor) -> None:
    executor.submit(
        [
            cmd("u1", "vm.explode", vm="web-1"),
            cmd("u2", "vm.state"),
            cmd("u3", "vm.state", vm="web-1", colour="red"),
            cmd("u4", "vm.migrate", vm="web-1", dest_uri="qemu+tcp://h/system", timeout_s=-1),
        ]
    )
    res = results_of(executor, 4)
    assert res["u1"].error is not None
    assert "unknown action 'vm.explode'" in res["u1"].error
    assert res["u2"].error is not None
    assert "invalid parameters for vm.state" in res["u2"].error
    assert "vm" in res["u2"].error
    assert res["u3"].error is not None
    assert "colour" in res["u3"].error
    assert res["u4"].error is not None
    assert "timeout_s" in res["u4"].error


def test_a_command_past_its_deadline_is_not_run(executor: Executor) -> None:
    executor.submit([cmd("d1", "vm.stop", within=0.0, vm="web-1"), cmd("d2", "vm.state", vm="web-1")])
    res = results_of(executor, 2)
    assert not res["d1"].ok
    assert res["d1"].error is not None
    assert res["d1"].error.startswith("deadline passed before it could start")
    assert res["d2"].detail["state"] == "running"


def test_each_id_runs_once_even_when_resent_and_after_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ex = Executor(ALL, URI, state)
    try:
        ex.submit([cmd("x1", "vm.stop", vm="web-1", timeout_s=1.0)])
        ex.submit([cmd("x1", "vm.stop", vm="web-1", timeout_s=1.0)])  # resent by the collector
        first = results_of(ex, 1)["x1"]
        assert first.ok
        assert len(ex.outgoing()[1]) == 1
    finally:
        ex.close()
    # A new agent on the same state dir: the unacknowledged result is still there
    # (the collector ignores copies), and the id is not run again.
    ex2 = Executor(ALL, URI, state)
    try:
        ex2.submit([cmd("x1", "vm.stop", vm="web-1", timeout_s=1.0)])
        _, again = ex2.outgoing()
        assert again == [first]
        ex2.acked(["x1"])
        assert ex2.outgoing() == ([], [])
    finally:
        ex2.close()
    ex3 = Executor(ALL, URI, state)
    try:
        ex3.submit([cmd("x1", "vm.stop", vm="web-1")])
        assert ex3.idle()
        assert ex3.outgoing() == ([], [])  # acknowledged results stay acknowledged
    finally:
        ex3.close()


def test_a_command_interrupted_by_a_crash_is_reported_unknown_not_rerun(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    # What a SIGKILL during a migration leaves: the id taken, no result; a torn last line.
    (state / JOURNAL_FILE).write_bytes(b'{"id":"k1","event":"taken","action":"vm.migrate"}\n{"id":"k2","ev')
    ex = Executor(ALL, URI, state)
    try:
        _, results = ex.outgoing()
        assert [r.id for r in results] == ["k1"]
        assert not results[0].ok
        assert results[0].error is not None
        assert "outcome is unknown" in results[0].error
        ex.submit([cmd("k1", "vm.stop", vm="web-1")])
        assert ex.idle()
    finally:
        ex.close()


def test_progress_shows_queued_commands_until_they_finish(executor: Executor) -> None:
    executor.submit([cmd("p1", "vm.stop", vm="web-1", timeout_s=1.0), cmd("p2", "vm.state", vm="web-1")])
    progress, _ = executor.outgoing()
    assert {p.id for p in progress} <= {"p1", "p2"}
    res = results_of(executor, 2)
    assert set(res) == {"p1", "p2"}
    assert executor.outgoing()[0] == []


def test_libvirt_off_gives_a_clear_refusal(tmp_path: Path) -> None:
    ex = Executor(("vm.state",), "", tmp_path / "state")
    try:
        ex.submit([cmd("o1", "vm.state", vm="web-1")])
        res = results_of(ex, 1)["o1"]
    finally:
        ex.close()
    assert res.error is not None
    assert "libvirt_uri is empty" in res.error


def test_allow_actions_and_migrate_uri_from_every_source(tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text(
        'allow_actions = ["vm.state", "vm.migrate"]\nmigrate_uri = "qemu+tcp://10.0.0.7/system"\n'
    )
    cfg = load_config(toml, environ={})
    assert cfg.allow_actions == ("vm.state", "vm.migrate")
    assert cfg.migrate_uri == "qemu+tcp://10.0.0.7/system"
    env = load_config(None, environ={"CLOUDMON_ALLOW_ACTIONS": "vm.state, vm.stop"})
    assert env.allow_actions == ("vm.state", "vm.stop")
    flag = load_config(None, environ={}, overrides={"allow_actions": "vm.create"})
    assert flag.allow_actions == ("vm.create",)
    assert load_config(None, environ={}).allow_actions == ()
    with pytest.raises(ConfigError, match=r"allow_actions.*unknown action\(s\) vm.reboot; known: vm.create"):
        load_config(None, environ={"CLOUDMON_ALLOW_ACTIONS": "vm.state,vm.reboot"})
    with pytest.raises(ConfigError, match="migrate_uri"):
        load_config(None, environ={"CLOUDMON_MIGRATE_URI": "not a uri"})
