"""A real HAProxy (Debian's) in front of real local HTTP backends, driven through its runtime API.

Each test starts haproxy with a config in its tmp dir (free ports, ``-db`` foreground,
stopped by pid even when the test fails) in front of three threaded ``http.server``
backends that answer their own name; ``/hold`` keeps the response until the test
releases it, which makes a long-running request.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloudmon.lb.base import Drainer, DrainOutcome
from cloudmon.lb.drain import HaproxyDrainer
from cloudmon.lb.haproxy import HaproxyRuntime, LbError, LbUnavailable, ServerState
from cloudmon.lb.service import LoadBalancerService, ServiceGroup, WeightController
from tests.integration.lbkit import (
    HeldRequest,
    HttpBackend,
    distribution,
    running_backends,
    running_haproxy,
)
from tests.servers import HaproxyServer, wait_for

pytestmark = pytest.mark.integration

SERVERS = ("web-1", "web-2", "web-3")
MEMBERS = {f"vm-{i}": name for i, name in enumerate(SERVERS, start=1)}


@pytest.fixture
def backends() -> Iterator[dict[str, HttpBackend]]:
    with running_backends(SERVERS) as started:
        yield started


@pytest.fixture
def haproxy(tmp_path: Path, backends: dict[str, HttpBackend]) -> Iterator[HaproxyServer]:
    with running_haproxy(tmp_path / "haproxy", backends) as server:
        yield server


def make_group(server: HaproxyServer, **kw: object) -> ServiceGroup:
    args: dict[str, object] = {
        "name": "web",
        "backend": "app",
        "runtime": str(server.socket_path),
        "members": dict(MEMBERS),
    }
    args.update(kw)
    return ServiceGroup(**args)  # type: ignore[arg-type]


def servers_of(runtime: HaproxyRuntime) -> dict[str, ServerState]:
    return {s.name: s for s in runtime.show_servers("app")}


def hold_one(server: HaproxyServer, backends: dict[str, HttpBackend]) -> tuple[HeldRequest, str]:
    """Start one held request and return it with the name of the backend that holds it."""
    held = HeldRequest(server.url)
    wait_for(lambda: sum(b.count("/hold") for b in backends.values()) == 1, 30, "the held request")
    (name,) = [n for n, b in backends.items() if b.count("/hold") == 1]
    return held, name


def test_weights_from_load_change_haproxy_and_the_request_distribution(
    haproxy: HaproxyServer, backends: dict[str, HttpBackend]
) -> None:
    runtime = HaproxyRuntime(str(haproxy.socket_path))
    controller = WeightController(make_group(haproxy), runtime)
    assert {s.weight for s in servers_of(runtime).values()} == {100}

    events = controller.step({"vm-1": 5.0, "vm-2": 5.0, "vm-3": 100.0})
    (event,) = events
    assert event["kind"] == "lb.weights"
    assert event["changes"] == {"web-3": {"from": 100, "to": 5}}
    assert "web-3 100->5" in str(event["reason"])
    state = servers_of(runtime)
    assert {n: s.weight for n, s in state.items()} == {"web-1": 100, "web-2": 100, "web-3": 5}

    counts = distribution(haproxy.url, 300)
    # Weights 100:100:5 -> web-3 gets ≈ 2.4 % of new requests; the others share the rest.
    assert counts["web-3"] <= 0.06 * 300, counts
    assert counts["web-1"] >= 0.4 * 300, counts
    assert counts["web-2"] >= 0.4 * 300, counts

    # A small change of load is not worth a weight change (hysteresis): nothing is sent.
    assert controller.step({"vm-1": 7.0, "vm-2": 4.0, "vm-3": 99.0}) == []
    assert servers_of(runtime)["web-3"].weight == 5

    # The load moves: web-1 becomes the busy one; the TCP admin socket sees the same.
    (event,) = controller.step({"vm-1": 100.0, "vm-2": 5.0, "vm-3": 5.0})
    assert event["changes"] == {"web-1": {"from": 100, "to": 5}, "web-3": {"from": 5, "to": 100}}
    tcp = HaproxyRuntime(haproxy.stats_address)
    assert {n: s.weight for n, s in servers_of(tcp).items()} == {"web-1": 5, "web-2": 100, "web-3": 100}
    counts = distribution(haproxy.url, 300)
    assert counts["web-1"] <= 0.06 * 300, counts
    assert counts["web-3"] >= 0.4 * 300, counts


def test_weight_zero_gets_no_new_requests(haproxy: HaproxyServer, backends: dict[str, HttpBackend]) -> None:
    runtime = HaproxyRuntime(str(haproxy.socket_path))
    controller = WeightController(make_group(haproxy, min_weight=0), runtime)
    runtime.set_weight("app", "web-2", 0)
    counts = distribution(haproxy.url, 60)
    assert counts["web-2"] == 0, counts
    assert counts["web-1"] + counts["web-3"] == 60
    # web-2's weight 0 lies inside [0, 100]: the controller restores it from load, not on sight.
    (event,) = controller.step({"vm-1": 50.0, "vm-2": 50.0, "vm-3": 50.0})
    assert event["changes"] == {"web-2": {"from": 0, "to": 100}}


def test_least_outstanding_weights_follow_in_flight_requests(
    haproxy: HaproxyServer, backends: dict[str, HttpBackend]
) -> None:
    runtime = HaproxyRuntime(str(haproxy.socket_path))
    held, busy = hold_one(haproxy, backends)
    try:
        wait_for(lambda: servers_of(runtime)[busy].sessions == 1, 30, f"{busy} to show 1 session")
        controller = WeightController(make_group(haproxy, algorithm="least_outstanding"), runtime)
        (event,) = controller.step({})
        assert event["changes"] == {busy: {"from": 100, "to": 50}}
        numbers = event["numbers"]
        assert isinstance(numbers, dict)
        assert numbers[busy]["sessions"] == 1
    finally:
        backends[busy].release.set()
    assert held.finish() == (200, busy)


def test_drain_lets_the_open_request_finish_and_sends_nothing_new(
    haproxy: HaproxyServer, backends: dict[str, HttpBackend]
) -> None:
    runtime = HaproxyRuntime(str(haproxy.socket_path))
    events: list[dict[str, object]] = []
    service = LoadBalancerService(
        [make_group(haproxy, deregistration_delay_s=120.0)], on_event=events.append, poll_interval_s=0.05
    )
    drainer: Drainer = service.drainer
    try:
        held, busy = hold_one(haproxy, backends)
        instance = next(i for i, s in MEMBERS.items() if s == busy)
        outcome: list[DrainOutcome] = []
        worker = threading.Thread(target=lambda: outcome.append(drainer.drain(instance, 600.0)))
        worker.start()
        try:
            wait_for(lambda: servers_of(runtime)[busy].state == "drain", 30, f"{busy} to be draining")
            before = backends[busy].count("/")
            counts = distribution(haproxy.url, 40)
            assert counts[busy] == 0, counts
            assert backends[busy].count("/") == before
            # The drain waits for the open request (the delay is 120 s, far away).
            assert servers_of(runtime)[busy].sessions == 1
            assert worker.is_alive()
            assert not outcome
        finally:
            backends[busy].release.set()
        assert held.finish() == (200, busy)  # the existing request finished normally
        worker.join(60)
        assert not worker.is_alive()
        (result,) = outcome
        assert result.drained, result
        assert result.instance_id == instance
        assert result.numbers["sessions_left"] == 0
        assert servers_of(runtime)[busy].state == "maint"
        assert [e["kind"] for e in events] == ["lb.drain", "lb.drained"]
        assert events[1]["server"] == busy

        # The weight controller leaves a server in maintenance alone.
        assert all(c != busy for e in service.step({}) for c in e.get("changes", {}))  # type: ignore[attr-defined]

        drainer.undrain(instance)
        assert servers_of(runtime)[busy].state == "ready"
        assert events[-1]["kind"] == "lb.undrain"
        counts = distribution(haproxy.url, 30)
        assert counts[busy] > 0, counts
    finally:
        service.close()


def test_drain_timeout_goes_to_maint_and_still_lets_the_request_finish(
    haproxy: HaproxyServer, backends: dict[str, HttpBackend]
) -> None:
    runtime = HaproxyRuntime(str(haproxy.socket_path))
    events: list[dict[str, object]] = []
    drainer = HaproxyDrainer(
        [(make_group(haproxy, deregistration_delay_s=0.3), runtime)],
        on_event=events.append,
        poll_interval_s=0.05,
    )
    held, busy = hold_one(haproxy, backends)
    instance = next(i for i, s in MEMBERS.items() if s == busy)
    try:
        wait_for(lambda: servers_of(runtime)[busy].sessions == 1, 30, f"{busy} to show 1 session")
        result = drainer.drain(instance, 600.0)  # the group's 0.3 s delay is the shorter one
        assert not result.drained
        assert "deregistration delay ran out" in result.reason
        assert result.numbers["sessions_left"] == 1
        assert servers_of(runtime)[busy].state == "maint"
        assert [e["kind"] for e in events] == ["lb.drain", "lb.drain_timeout"]
    finally:
        backends[busy].release.set()
    # maint stops new traffic; HAProxy does not cut the session that was still open.
    assert held.finish() == (200, busy)
    drainer.close()


def test_slow_start_ramps_a_member_back_in(haproxy: HaproxyServer, backends: dict[str, HttpBackend]) -> None:
    runtime = HaproxyRuntime(str(haproxy.socket_path))
    now = [0.0]
    clock: Callable[[], float] = lambda: now[0]  # noqa: E731 - a fake clock for the ramp
    controller = WeightController(make_group(haproxy, slow_start_s=60.0), runtime, clock=clock)
    loads = {"vm-1": 10.0, "vm-2": 10.0, "vm-3": 10.0}
    assert controller.step(loads) == []  # all equal at 100 already
    runtime.set_state("app", "web-2", "maint")
    assert controller.step(loads) == []  # web-2 is out: left alone
    runtime.set_state("app", "web-2", "ready")
    now[0] = 1.0
    (event,) = controller.step(loads)
    assert event["changes"] == {"web-2": {"from": 100, "to": 1}}
    assert "slow start" in str(event["reason"])
    now[0] = 31.0
    (event,) = controller.step(loads)
    assert event["changes"] == {"web-2": {"from": 1, "to": 50}}
    now[0] = 61.0
    (event,) = controller.step(loads)
    assert event["changes"] == {"web-2": {"from": 50, "to": 100}}
    assert servers_of(runtime)["web-2"].weight == 100


def test_unknown_backend_or_server_is_a_clear_lb_error(
    haproxy: HaproxyServer, backends: dict[str, HttpBackend]
) -> None:
    runtime = HaproxyRuntime(str(haproxy.socket_path))
    with pytest.raises(LbError, match="HAProxy has no backend 'nope'") as exc:
        runtime.set_weight("nope", "web-1", 10)
    assert exc.value.answer == "No such backend."
    assert "backend name from the HAProxy configuration" in exc.value.fix
    with pytest.raises(LbError, match="HAProxy has no backend 'nope'"):
        runtime.show_servers("nope")
    with pytest.raises(LbError, match="backend 'app' has no server 'web-9'") as exc:
        runtime.set_state("app", "web-9", "drain")
    assert exc.value.answer == "No such server."
    assert "show servers state app" in exc.value.fix
    with pytest.raises(LbError, match=r"outside 0\.\.256"):
        runtime.set_weight("app", "web-1", 300)

    # The controller turns it into one lb.error event, not one per tick.
    controller = WeightController(make_group(haproxy, backend="nope"), runtime)
    (event,) = controller.step({"vm-1": 10.0})
    assert event["kind"] == "lb.error"
    assert "no backend 'nope'" in str(event["reason"])
    assert controller.step({"vm-1": 10.0}) == []

    # A drain of an instance mapped to a missing server fails clearly and drains nothing.
    drainer = HaproxyDrainer([(make_group(haproxy, members={"vm-9": "web-9"}), runtime)])
    result = drainer.drain("vm-9", 5.0)
    assert not result.drained
    assert "has no server 'web-9'" in result.reason


def test_haproxy_not_running_is_a_clear_error(
    haproxy: HaproxyServer, backends: dict[str, HttpBackend]
) -> None:
    unix = HaproxyRuntime(str(haproxy.socket_path), timeout=2.0)
    tcp = HaproxyRuntime(haproxy.stats_address, timeout=2.0)
    assert len(unix.show_servers("app")) == 3
    haproxy.stop()
    for runtime in (unix, tcp):
        with pytest.raises(LbUnavailable, match="is not reachable") as exc:
            runtime.show_servers("app")
        assert "is haproxy running" in exc.value.fix
    with pytest.raises(LbUnavailable, match="is not reachable"):
        HaproxyRuntime(str(haproxy.dir / "missing.sock")).set_weight("app", "web-1", 1)
    drainer = HaproxyDrainer([(make_group(haproxy), unix)])
    result = drainer.drain("vm-1", 5.0)
    assert not result.drained
    assert "could not start draining" in result.reason
