"""Load-balancer weights and draining end to end through the collector's HTTP API.

A real HAProxy (Debian's, started by the test; tests/servers.py) in front of two
real local HTTP backends, a real collector with its control plane (in this
process, real HTTP on a free port, real embedded store).  The tests speak to the
collector only over HTTP: ``PUT /service-groups/{name}``, ``PUT /groups/{name}``,
``GET /service-groups``, ``/groups``, ``/events``; they read HAProxy through its
own runtime API (``show servers state``) and send real requests through it.

CPU figures come from real reports POSTed to ``/ingest`` for nodes whose node ids
are the instance ids (what a guest agent in each instance would send).  Instances
of the auto-scaling group come from the simulated provider (``cloudmon demo``'s):
a cloud's API is outside this machine; the load balancer and the drain are real.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudmon.client import ApiClient
from cloudmon.collector import CollectorThread
from cloudmon.config import Config
from cloudmon.lb.haproxy import HaproxyRuntime, ServerState
from cloudmon.providers.simulated import SimulatedProvider
from cloudmon.store import TelemetryStore, open_store
from cloudmon_agent.schema import encode
from tests.integration.lbkit import HeldRequest, HttpBackend, distribution, running_backends, running_haproxy
from tests.servers import HaproxyServer
from tests.unit.collector.helpers import TOKEN, make_report, post, wait_for

pytestmark = pytest.mark.integration

SERVERS = ("web-1", "web-2")


class Reporter:
    """Posts a real report per node every ``interval`` s with the CPU % the test sets."""

    def __init__(self, url: str, cpu: dict[str, float], interval: float = 0.3) -> None:
        self.url = url
        self.cpu = dict(cpu)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._seq = 0
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="reporter", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._seq += 1
            for node_id, cpu in list(self.cpu.items()):
                answer = post(self.url, encode(make_report(node_id, time.time(), cpu, self._seq)))
                if answer.status != 200:
                    self.errors.append(f"{node_id}: {answer.status} {answer.body}")
            self._stop.wait(self._interval)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def backends() -> Iterator[dict[str, HttpBackend]]:
    with running_backends(SERVERS) as started:
        yield started


@pytest.fixture
def haproxy(tmp_path: Path, backends: dict[str, HttpBackend]) -> Iterator[HaproxyServer]:
    with running_haproxy(tmp_path / "haproxy", backends) as server:
        yield server


@pytest.fixture
def provider() -> Iterator[SimulatedProvider]:
    p = SimulatedProvider({"hosts": 2, "boot_delay_s": 0})
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def collector(tmp_path: Path, provider: SimulatedProvider) -> Iterator[CollectorThread]:
    store: TelemetryStore = open_store(f"sqlite:///{tmp_path / 'telemetry.db'}")
    ct = CollectorThread(
        Config(listen_port=0, data_dir=str(tmp_path / "data"), control_tick_s=0.2),
        store,
        TOKEN,
        providers={"simulated": provider},
    )
    try:
        ct.start()
        yield ct
    finally:
        ct.close()
        store.close()


@pytest.fixture
def api(collector: CollectorThread) -> Iterator[ApiClient]:
    client = ApiClient(collector.url, TOKEN)
    try:
        yield client
    finally:
        client.close()


def _servers(haproxy: HaproxyServer) -> dict[str, ServerState]:
    runtime = HaproxyRuntime(str(haproxy.socket_path), 2.0)
    try:
        return {s.name: s for s in runtime.show_servers("app")}
    finally:
        close = getattr(runtime, "close", None)
        if callable(close):
            close()


def _events(api: ApiClient, kind: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = api._json("GET", f"/api/v1/events?kind={kind}&limit=1000")["events"]
    return events


def _put_service_group(api: ApiClient, haproxy: HaproxyServer, members: dict[str, str], **kw: Any) -> None:
    doc = {"backend": "app", "runtime": str(haproxy.socket_path), "members": members, **kw}
    saved = api._json("PUT", "/api/v1/service-groups/web", doc)["service_group"]
    assert saved["members"] == members


def test_haproxy_weights_follow_the_instances_cpu(
    collector: CollectorThread, api: ApiClient, haproxy: HaproxyServer
) -> None:
    reporter = Reporter(collector.url, {"vm-1": 90.0, "vm-2": 5.0})
    try:
        _put_service_group(api, haproxy, {"vm-1": "web-1", "vm-2": "web-2"})

        def busy_weighted_down() -> dict[str, ServerState] | None:
            s = _servers(haproxy)
            return s if s["web-1"].weight < 30 and s["web-2"].weight == 100 else None

        servers = wait_for(busy_weighted_down, 15, "HAProxy's weights to follow CPU (web-1 busy)")
        # weighted: 100 * (100 - 90 + 5) / (100 - 5 + 5) = 15
        assert servers["web-1"].weight == 15
        assert not reporter.errors, reporter.errors

        # Requests follow the weights: HAProxy's weighted round robin sends web-1 15 of every 115.
        counts = distribution(haproxy.url, 115)
        assert counts["web-2"] > 4 * counts["web-1"] > 0, counts

        # The decision is in the event log, with its numbers; the console sees the weights.
        (ev,) = [e for e in _events(api, "lb.") if e["kind"] == "lb.weights"]
        assert ev["group"] == "web"
        assert ev["changes"] == {"web-1": {"from": 100, "to": 15}}
        assert ev["numbers"]["web-1"]["cpu_percent"] == 90.0
        assert "web-1 100->15" in ev["reason"]
        (group,) = api._json("GET", "/api/v1/service-groups")["service_groups"]
        assert group["weights"] == {"web-1": 15, "web-2": 100}

        # The load moves: the weights follow it back.
        reporter.cpu = {"vm-1": 5.0, "vm-2": 90.0}

        def swapped() -> bool:
            s = _servers(haproxy)
            return s["web-1"].weight == 100 and s["web-2"].weight == 15

        wait_for(swapped, 15, "HAProxy's weights to follow CPU (web-2 busy)")
        weights = [e["changes"] for e in _events(api, "lb.weights")]
        assert weights[-1] == {"web-1": {"from": 15, "to": 100}, "web-2": {"from": 100, "to": 15}}
    finally:
        reporter.close()
    assert not reporter.errors, reporter.errors


GROUP: dict[str, Any] = {
    "template": {"provider": "simulated", "vcpus": 1, "memory_mib": 512},
    "min_size": 1,
    "max_size": 2,
    "desired": 2,
    "health_check_grace_s": 300,
    "default_warmup_s": 0,
    "drain_timeout_s": 30,
}


def test_scale_in_drains_the_instance_through_haproxy_before_terminating_it(
    api: ApiClient, haproxy: HaproxyServer, backends: dict[str, HttpBackend]
) -> None:
    api.put_group("asg", GROUP)

    def two_in_service() -> list[str]:
        (g,) = api.groups()["groups"]
        ids = sorted(i["id"] for i in g["instances"] if i["state"] == "in_service")
        return ids if len(ids) == 2 else []

    ids = wait_for(two_in_service, 15, "two instances in service")
    members = dict(zip(ids, SERVERS, strict=True))
    _put_service_group(api, haproxy, members, deregistration_delay_s=30)
    wait_for(
        lambda: "weights" in api._json("GET", "/api/v1/service-groups")["service_groups"][0],
        10,
        "the control plane to pick up the service group",
    )

    # One long request open on each backend (round robin, equal weights).
    held = [HeldRequest(haproxy.url), HeldRequest(haproxy.url)]
    wait_for(
        lambda: all(b.count("/hold") == 1 for b in backends.values()), 15, "a held request on each backend"
    )

    api.put_group("asg", {**GROUP, "desired": 1})

    def draining() -> str | None:
        s = _servers(haproxy)
        names = [n for n in SERVERS if s[n].state == "drain"]
        return names[0] if len(names) == 1 else None

    victim = wait_for(draining, 15, "HAProxy to drain one server")
    keeper = next(n for n in SERVERS if n != victim)
    victim_id = next(i for i, n in members.items() if n == victim)

    # While its request is open, the instance is not terminated and gets nothing new.
    (g,) = api.groups()["groups"]
    states = {i["id"]: i["state"] for i in g["instances"]}
    assert states[victim_id] == "draining", states
    before = backends[victim].count()
    assert distribution(haproxy.url, 10) == {keeper: 10}
    assert backends[victim].count() == before
    assert not [e for e in api.group_activity("asg")["events"] if e["kind"] == "autoscale.terminate"]

    # The open request finishes; then the drain ends, the server goes to maint and the
    # instance is terminated.
    backends[victim].release.set()
    done = wait_for(
        lambda: [h.result[0] for h in held if h.result], 15, "the victim's open request to finish"
    )
    assert done == [(200, victim)]

    def terminated() -> bool:
        (g,) = api.groups()["groups"]
        return victim_id not in {i["id"] for i in g["instances"]}

    wait_for(terminated, 15, f"{victim_id} to be terminated after its drain")
    assert _servers(haproxy)[victim].state == "maint"
    drains = [e for e in _events(api, "lb.") if e.get("instance") == victim_id]
    kinds = [e["kind"] for e in drains]
    assert kinds[:2] == ["lb.drain", "lb.drained"], drains
    drained_at = drains[1]["ts"]
    activity = api.group_activity("asg")["events"]
    terminate = [e for e in activity if e["kind"] == "autoscale.terminate" and e.get("instance") == victim_id]
    assert terminate, activity
    assert terminate[0]["ts"] >= drained_at
    backends[keeper].release.set()
    for h in held:
        status, body = h.finish()
        assert status == 200
        assert body in SERVERS
