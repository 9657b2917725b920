"""Rebalancing end to end through the collector's HTTP API, with real live migration.

Everything is real: two libvirtd "hosts" in their own namespaces joined by a
veth pair (tests/integration/vmhost.py), a TCG guest, a collector with its
control plane (in this process, real HTTP on a free port, real embedded store)
and two ``cloudmon-agent`` processes, one per host, with ``--libvirt-uri`` of
their host, ``--allow-actions vm.migrate,vm.state`` and ``--migrate-uri`` the
URI the other host reaches them at.  The tests speak to the collector only as
the console does: ``/balance``, ``/balance/plan``, ``/hosts/{id}/maintenance``,
``/rules/{name}``, ``/events``.  Host names in plans are the agents' node ids.

One lab (hosts, guest, collector, agents) serves the whole module; each test
starts by clearing rules and maintenance and finds the guest where it is.
Run only these: ``pytest -m qemu tests/integration/test_rebalance_e2e.py``.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cloudmon.client import ApiClient
from cloudmon.collector import CollectorThread
from cloudmon.config import Config
from cloudmon.store import TelemetryStore, open_store
from tests.integration import vmhost
from tests.integration.conftest import INTEGRATION_TOKEN, ManagedProcess, agent_command, private_env

pytestmark = [pytest.mark.qemu, pytest.mark.integration]
log = logging.getLogger(__name__)

GUEST = "g0"
NODE = {"a": "host-a", "b": "host-b"}
STOPPED_XML = """<domain type='qemu'><name>off0</name><memory unit='MiB'>64</memory>
<os><type arch='x86_64'>hvm</type></os></domain>"""


@dataclass
class Lab:
    """The module's cluster: two hosts, one guest, a collector, two agents, an API client."""

    lab: vmhost.VmLab
    hosts: dict[str, vmhost.VmHost]
    guest: vmhost.Guest
    boot_id: str
    collector: CollectorThread
    store: TelemetryStore
    agents: list[ManagedProcess]
    api: ApiClient

    def logs(self) -> str:
        """The agents' and libvirtds' log tails (for assertion messages)."""
        parts = [f"--- {p.name}\n{p.log_text()[-2500:]}" for p in self.agents]
        parts += [f"--- libvirtd {h.name}\n{h.log_text()[-1500:]}" for h in self.hosts.values()]
        return "\n".join(parts)

    def where(self) -> str:
        """The node id of the host whose libvirt runs the guest (libvirt's view, not the collector's)."""
        running = [
            name
            for name, host in self.hosts.items()
            if GUEST in [d.name() for d in host.conn().listAllDomains() if d.isActive()]
        ]
        assert len(running) == 1, f"{GUEST} runs on {running or 'no host'}"
        return NODE[running[0]]

    def follow(self, node_id: str) -> None:
        """Point the harness at the guest's new host (as ``Guest.migrate`` does after its own migration)."""
        dest = next(h for name, h in self.hosts.items() if NODE[name] == node_id)
        if self.guest.host is dest:
            return
        self.guest.host.guests.pop(GUEST, None)
        self.guest.host = dest
        dest.guests[GUEST] = self.guest
        self.lab.pids.update(dest.qemu_pids())
        dest.configure_tap(self.guest)
        self.guest.console.reconnect()

    def events(self, kind: str = "rebalance.") -> list[dict[str, Any]]:
        """``GET /events?kind=...`` (oldest first)."""
        events: list[dict[str, Any]] = self.api._json("GET", f"/api/v1/events?kind={kind}&limit=1000")[
            "events"
        ]
        return events

    def wait_execution(self, plan_id: str, timeout: float = 120.0) -> dict[str, Any]:
        """Poll ``/balance`` until the execution of ``plan_id`` has ended; its execution view."""
        deadline = time.monotonic() + timeout
        while True:
            ex: dict[str, Any] = self.api.balance()["execution"]
            if ex["plan_id"] == plan_id and ex["state"] not in ("running", "idle"):
                return ex
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"plan {plan_id} still {ex['state']} after {timeout} s: {ex}\n{self.logs()}"
                )
            for agent in self.agents:
                assert agent.alive(), f"{agent.name} exited during the plan\n{agent.log_text()}"
            time.sleep(0.2)


def _wait(cond: Callable[[], Any], timeout: float, what: str, lab: Lab | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what}\n{lab.logs() if lab else ''}"
            )
        time.sleep(0.1)


def _start_agent(tmp: Path, url: str, node_id: str, host: vmhost.VmHost) -> ManagedProcess:
    log_path = tmp / f"agent-{node_id}.log"
    args = [*agent_command(), "--collector", url, "--token", INTEGRATION_TOKEN]
    args += ["--state-dir", str(tmp / f"agent-{node_id}"), "--interval", "0.5", "--node-id", node_id]
    args += [
        "--libvirt-uri",
        host.uri,
        "--allow-actions",
        "vm.migrate,vm.state",
        "--migrate-uri",
        host.tcp_uri,
    ]
    args += ["--top-n", "0", "--no-containers", "--no-gpus"]
    out = log_path.open("wb")
    proc = subprocess.Popen(
        args, stdout=out, stderr=subprocess.STDOUT, env=private_env(tmp / "home"), cwd=tmp
    )
    return ManagedProcess(f"agent {node_id}", proc, log_path, out)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    missing = vmhost.missing_prerequisites()
    if missing:
        pytest.skip("real QEMU guests need: " + ", ".join(missing))
    tmp = tmp_path_factory.mktemp("rebalance-e2e")
    image = vmhost.ensure_guest_image()
    lab = vmhost.VmLab()
    store = open_store(f"sqlite:///{tmp / 'telemetry.db'}")
    collector = CollectorThread(
        Config(listen_port=0, data_dir=str(tmp / "data"), control_tick_s=0.2), store, INTEGRATION_TOKEN
    )
    agents: list[ManagedProcess] = []
    api: ApiClient | None = None
    try:
        a, b = lab.add_host("a"), lab.add_host("b")
        lab.link(a, b)
        lab.start()
        guest = a.start_guest(GUEST, image)
        # A VM that is defined but shut off holds nothing and cannot be live-migrated:
        # evacuating host a must leave it alone.
        a.conn().defineXML(STOPPED_XML)
        guest.console.command("ping")
        boot_id = guest.console.boot_id
        assert boot_id
        collector.start()
        plane = collector.collector.control
        assert plane is not None, "the collector runs without its control plane"
        # Config has no knob for it: measure the imbalance every second, not every 10 s,
        # so /balance lists the hosts soon after their first reports.
        plane.balance_every_s = 1.0
        agents += [_start_agent(tmp, collector.url, NODE[h.name], h) for h in (a, b)]
        api = ApiClient(collector.url, INTEGRATION_TOKEN)
        env = Lab(lab, {"a": a, "b": b}, guest, boot_id, collector, store, agents, api)
        yield env
    finally:
        if api is not None:
            api.close()
        for agent in agents:
            agent.stop()
        collector.close()
        store.close()
        lab.close()
    left = list(vmhost.iter_leftovers(lab))
    assert not left, f"the lab left things behind: {left}"


def _reset(env: Lab) -> None:
    """Manual automation, default threshold, no rules, no host in maintenance; both hosts seen."""
    api = env.api
    api.put_balance_settings({"automation": "manual", "threshold": 3})
    for rule in api._json("GET", "/api/v1/rules")["rules"]:
        api._json("DELETE", f"/api/v1/rules/{rule['name']}")

    def both_hosts() -> bool:
        hosts = {h["name"]: h for h in api.balance()["hosts"]}
        return set(hosts) == set(NODE.values())

    _wait(both_hosts, 60, "/balance to list both hosts", env)
    for node_id in NODE.values():
        api._json("PUT", f"/api/v1/hosts/{node_id}/maintenance", {"maintenance": False})

    def guest_seen() -> bool:
        # The collector sees the guest where libvirt runs it (not still on its old host).
        where = env.where()
        nodes = {n.node_id: n for n in api.nodes().nodes}
        return all((f"vm.{GUEST}.mem_max" in api.node(n).latest) == (n == where) for n in nodes) and bool(
            nodes
        )

    _wait(guest_seen, 30, f"the collector to see {GUEST} on one host only", env)


def _recommend_every(env: Lab, seconds: float) -> None:
    """How often the collector recommends a plan by itself (Config has no knob for it)."""
    plane = env.collector.collector.control
    assert plane is not None
    plane.plan_every_s = seconds


def _guest_alive_on(env: Lab, node_id: str) -> None:
    env.follow(node_id)
    env.guest.console.command("ping")
    assert env.guest.console.boot_id == env.boot_id, "the guest rebooted: the migration was not live"


def _no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    """The control loops logged no error (e.g. a snapshot that failed while a migration ran)."""
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("cloudmon")]
    assert not errors, "\n".join(r.getMessage() for r in errors)


def _other(node_id: str) -> str:
    return next(n for n in NODE.values() if n != node_id)


def _plan_with_move(
    env: Lab, body: dict[str, Any], source: str, target: str, timeout: float = 30.0
) -> dict[str, Any]:
    """``POST /balance/plan`` until the plan moves the guest ``source`` -> ``target``.

    Host "other" CPU is the whole machine's (both hosts share it), and a host
    above its headroom takes no VM: on a busy machine one plan may find no room;
    a later one does.  Every plan that did not is reported if none ever does.
    """
    seen: list[dict[str, Any]] = []

    def propose() -> dict[str, Any] | None:
        p: dict[str, Any] = env.api.compute_plan(body)["plan"]
        if [(m["vm"], m["source"], m["target"]) for m in p["moves"]] == [(GUEST, source, target)]:
            return p
        seen.append({k: p[k] for k in ("moves", "rejected", "unresolved", "notes", "hosts_before")})
        return None

    try:
        plan: dict[str, Any] = _wait(propose, timeout, f"a plan moving {GUEST} {source} -> {target}", env)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nplans seen: {seen[-3:]}") from None
    return plan


def test_maintenance_plan_approved_in_the_api_live_migrates_the_guest_and_the_arbiter_holds_it(
    cluster: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    env, api = cluster, cluster.api
    # The operator computes and approves plans here: no recommendation of the
    # collector's own may supersede one between its computation and its approval.
    _recommend_every(env, 3600)
    _reset(env)
    src = env.where()
    dst = _other(src)

    # Host src enters maintenance: its VMs must move.
    assert api._json("PUT", f"/api/v1/hosts/{src}/maintenance", {"maintenance": True}) == {
        "host": src,
        "maintenance": True,
    }
    _wait(
        lambda: any(h["name"] == src and h["maintenance"] for h in api.balance()["hosts"]),
        10,
        f"/balance to show {src} in maintenance",
        env,
    )
    plan = _plan_with_move(env, {}, src, dst)
    assert plan["status"] == "proposed"
    (move,) = plan["moves"]
    assert move["mandatory"] is True
    assert "maintenance" in move["reason"], move["reason"]
    # The predicted before/after: the guest's memory leaves src for dst.
    assert plan["hosts_after"][src]["mem"] < plan["hosts_before"][src]["mem"]
    assert plan["hosts_after"][dst]["mem"] > plan["hosts_before"][dst]["mem"]

    approved = api.approve_plan(plan["id"])["plan"]
    assert approved["status"] == "running"
    ex = env.wait_execution(plan["id"])
    assert ex["state"] == "done", f"{ex}\n{env.logs()}"
    assert ex["moves_done"] == ex["moves_total"] == 1
    assert api.balance()["plan"]["status"] == "done"

    # libvirt's own view: running on dst, gone from src; the same boot, still answering.
    assert env.where() == dst
    _guest_alive_on(env, dst)

    # The event log tells the story of this plan, in order, each step with its why.
    events = env.events()
    assert any(e["kind"] == "rebalance.maintenance" and e["host"] == src for e in events)
    mine = [e for e in events if e.get("plan_id") == plan["id"]]
    assert [e["kind"] for e in mine] == [
        "rebalance.plan",
        "rebalance.plan_approved",
        "rebalance.move_started",
        "rebalance.move_done",
        "rebalance.plan_done",
    ], mine
    assert all(e["reason"] for e in mine)
    assert "approved by operator" in mine[1]["reason"]
    done = mine[3]
    assert (done["vm"], done["source"], done["target"], done["mandatory"]) == (GUEST, src, dst, True)
    assert done["seconds"] > 0

    # Back out of maintenance; a soft rule asks for the guest on src again.  The arbiter
    # holds a VM that just moved from going back, and the planner knows it: the plan
    # leaves the guest where it is and says why (nothing to approve, nothing fails).
    api._json("PUT", f"/api/v1/hosts/{src}/maintenance", {"maintenance": False})
    api._json("PUT", "/api/v1/rules/back", {"kind": "should_run_on", "vms": [GUEST], "hosts": [src]})
    def guest_considered() -> dict[str, Any] | None:
        # Right after a migration both hosts may still report the guest for a sample:
        # the snapshot leaves it out until one does.
        p: dict[str, Any] = api.compute_plan({"threshold": 5})["plan"]
        seen = {m["vm"] for m in p["moves"]} | {r["vm"] for r in p["rejected"]}
        return p if GUEST in seen else None

    held_plan = _wait(guest_considered, 30, f"a plan that considers {GUEST}", env)
    assert GUEST not in {m["vm"] for m in held_plan["moves"]}, held_plan
    (held,) = [r for r in held_plan["rejected"] if r["vm"] == GUEST]
    assert held["why"] == "hold"
    assert "moving it back is held" in held["detail"]
    assert env.where() == dst

    # A hard rule demands it: mandatory moves pass the hold.
    api._json("PUT", "/api/v1/rules/back", {"kind": "must_run_on", "vms": [GUEST], "hosts": [src]})
    must = _plan_with_move(env, {}, dst, src)
    assert must["moves"][0]["mandatory"] is True
    api.approve_plan(must["id"])
    ex = env.wait_execution(must["id"])
    assert ex["state"] == "done", f"{ex}\n{env.logs()}"
    assert env.where() == src
    _guest_alive_on(env, src)
    _no_errors_logged(caplog)


def test_partial_automation_evacuates_a_host_in_maintenance_by_itself(
    cluster: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    env, api = cluster, cluster.api
    # Both "hosts" are this one machine, whose CPU other work may fill: a plan that finds
    # no room under the headroom (all of it "used by others") is followed by another one
    # soon, not a minute later.
    _recommend_every(env, 2.0)
    _reset(env)
    src = env.where()
    dst = _other(src)
    before = api.balance()["execution"]["plan_id"]
    api.put_balance_settings({"automation": "partial"})
    api._json("PUT", f"/api/v1/hosts/{src}/maintenance", {"maintenance": True})

    # No approve: the collector runs the mandatory evacuation by itself.  (Its next
    # recommendation may replace /balance's plan at once; the execution view stays.)
    def finished() -> dict[str, Any] | None:
        ex: dict[str, Any] = api.balance()["execution"]
        return ex if ex["plan_id"] != before and ex["state"] not in ("running", "idle") else None

    try:
        ex = _wait(finished, 120, "the collector to run the evacuation by itself", env)
    except AssertionError as exc:
        view = api.balance()
        raise AssertionError(
            f"{exc}\nbalance: plan {view['plan']}\nexecution {view['execution']}\nevents {env.events()[-8:]}"
        ) from None
    assert ex["state"] == "done", f"{ex}\n{env.logs()}"
    assert ex["moves_done"] == ex["moves_total"] == 1
    story = [e for e in env.events() if e.get("plan_id") == ex["plan_id"]]
    assert [e["kind"] for e in story] == [
        "rebalance.plan",
        "rebalance.plan_approved",
        "rebalance.move_started",
        "rebalance.move_done",
        "rebalance.plan_done",
    ], story
    assert "approved by automation partial" in story[1]["reason"]
    done = story[3]
    assert (done["vm"], done["source"], done["target"], done["mandatory"]) == (GUEST, src, dst, True)
    assert env.where() == dst
    _guest_alive_on(env, dst)
    _no_errors_logged(caplog)
