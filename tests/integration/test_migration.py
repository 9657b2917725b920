"""A planned move live-migrates a real running QEMU guest between two real libvirt hosts.

Everything is real: two libvirtd "hosts" in their own namespaces joined by a
veth pair (tests/integration/vmhost.py), a TCG guest on host a, a collector in
this process, and two ``cloudmon-agent`` processes, one per host, each with
``--libvirt-uri`` of its host, ``--allow-actions vm.migrate,vm.state`` and
``--migrate-uri`` the URI the other host reaches it at.  Host a enters
maintenance; the planner plans the evacuation; the :class:`PlanExecutor` runs
it through the agents.  The guest must run on b afterwards with the same boot
id (it was never restarted) and still answer on its console.
Run only this: ``pytest -m qemu tests/integration/test_migration.py``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest

from cloudmon.actions.migration import PlanExecutor
from cloudmon.collector import CollectorThread
from cloudmon.config import Config
from cloudmon.control.arbiter import Arbiter
from cloudmon.store import open_store
from tests.integration import vmhost
from tests.integration.conftest import INTEGRATION_TOKEN, ManagedProcess, StartAgentProcess, wait_until

pytestmark = [pytest.mark.qemu, pytest.mark.integration]
log = logging.getLogger(__name__)


def _agent_args(host: vmhost.VmHost) -> tuple[str, ...]:
    return (
        "--libvirt-uri",
        host.uri,
        "--allow-actions",
        "vm.migrate,vm.state",
        "--migrate-uri",
        host.tcp_uri,
        "--top-n",
        "0",
        "--no-containers",
        "--no-gpus",
    )


def test_planned_move_live_migrates_a_running_guest(
    tmp_path: Path, start_agent_process: StartAgentProcess
) -> None:
    missing = vmhost.missing_prerequisites()
    if missing:
        pytest.skip("real QEMU guests need: " + ", ".join(missing))
    from cloudmon.rebalance.planner import plan
    from cloudmon.rebalance.snapshot import VM, ClusterSnapshot, Host

    image = vmhost.ensure_guest_image()
    lab = vmhost.VmLab()
    store = open_store(f"sqlite:///{tmp_path / 'telemetry.db'}")
    collector = CollectorThread(
        Config(listen_port=0, data_dir=str(tmp_path / "data")), store, INTEGRATION_TOKEN
    )
    agents: list[ManagedProcess] = []
    try:
        a, b = lab.add_host("a"), lab.add_host("b")
        lab.link(a, b)
        lab.start()
        guest = a.start_guest("g0", image)
        guest.console.command("ping")
        boot_id = guest.console.boot_id
        assert boot_id

        collector.start()
        model = collector.collector.model
        nodes = {"a": "node-a", "b": "node-b"}
        for host in (a, b):
            agents.append(
                start_agent_process(
                    collector.url, INTEGRATION_TOKEN, nodes[host.name], interval=0.2, extra=_agent_args(host)
                )
            )
        for agent, node_id in zip(agents, nodes.values(), strict=True):

            def reported(n: str = node_id) -> bool:
                return model.get(n) is not None

            wait_until(reported, 30, f"{node_id}'s first report", agent)

        def uri_for_host(host: str) -> str | None:
            node = model.get(nodes[host])
            return None if node is None else str(node.info.get("migrate_uri") or "") or None

        assert uri_for_host("b") == b.tcp_uri

        snapshot = ClusterSnapshot(
            ts=time.time(),
            hosts=[
                Host(name="a", cpu_cores=2, memory_mib=4096, maintenance=True),
                Host(name="b", cpu_cores=2, memory_mib=4096),
            ],
            vms=[VM(name="g0", host="a", cpu_demand_cores=0.1, memory_mib=128)],
        )
        moves = plan(snapshot).moves
        assert [(m.vm, m.source, m.target, m.mandatory) for m in moves] == [("g0", "a", "b", True)]

        events: list[dict[str, Any]] = []
        executor = PlanExecutor(
            collector.collector.commands,
            nodes.get,
            uri_for_host,
            Arbiter(time.time),
            None,
            time.time,
            events.append,
            migrate_timeout_s=120,
            verify_timeout_s=30,
        )
        report = executor.run(moves)
        logs = "\n".join(f"--- {p.name}\n{p.log_text()[-3000:]}" for p in agents)
        assert report.ok, f"{report.reason}\nevents: {events}\n{logs}\n{a.log_text()[-2000:]}"
        assert [o.vm for o in report.done] == ["g0"]
        log.info("move done in %.1f s: %s", report.done[0].seconds, report.done[0].detail)

        # libvirt's own view: running on b, gone from a.
        assert b.conn().lookupByName("g0").isActive()
        assert "g0" not in [d.name() for d in a.conn().listAllDomains()]
        # The harness follows the guest to b (what Guest.migrate does after its own migration).
        a.guests.pop("g0", None)
        guest.host = b
        b.guests["g0"] = guest
        lab.pids.update(b.qemu_pids())
        b.configure_tap(guest)
        guest.console.reconnect()
        guest.console.command("ping")
        assert guest.console.boot_id == boot_id, "the guest rebooted: the migration was not live"

        kinds = [e["kind"] for e in events]
        assert kinds[0] == "rebalance.move_started"
        assert kinds[-2:] == ["rebalance.move_done", "rebalance.plan_done"]
        done = events[-2]
        assert done["vm"] == "g0"
        assert done["seconds"] > 0
        assert events[-1]["ok"] is True
    finally:
        for agent in agents:
            agent.stop()
        collector.close()
        store.close()
        lab.close()
    left = list(vmhost.iter_leftovers(lab))
    assert not left, f"the lab left things behind: {left}"
