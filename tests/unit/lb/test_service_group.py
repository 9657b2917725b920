"""ServiceGroup documents and the no-load-balancer drain hook."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cloudmon.lb.base import Drainer
from cloudmon.lb.drain import HaproxyDrainer, TimeoutDrainer
from cloudmon.lb.haproxy import LbError
from cloudmon.lb.service import (
    DOCUMENT_KIND,
    LoadBalancerService,
    ServiceGroup,
    load_groups,
    open_runtime,
    save_group,
)
from cloudmon.store import open_store


def group(**kw: object) -> ServiceGroup:
    args: dict[str, object] = {
        "name": "web",
        "backend": "app",
        "runtime": "/run/haproxy/admin.sock",
        "members": {"vm-1": "web-1", "vm-2": "web-2"},
    }
    args.update(kw)
    return ServiceGroup(**args)  # type: ignore[arg-type]


def test_defaults_follow_elb() -> None:
    g = group()
    assert g.deregistration_delay_s == 300.0
    assert g.algorithm == "weighted"
    assert g.provider == "haproxy"
    assert (g.min_weight, g.max_weight) == (1, 100)
    assert g.server_of("vm-2") == "web-2"
    assert g.server_of("vm-9") is None


def test_document_round_trip_through_a_real_store(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    try:
        g = group(algorithm="least_outstanding", deregistration_delay_s=30.0, slow_start_s=60.0)
        save_group(store, g)
        save_group(store, group(name="api", backend="api", members={"vm-3": "api-1"}))
        store.put_document(DOCUMENT_KIND, "broken", {"name": "broken"})
        assert store.get_document(DOCUMENT_KIND, "web") == g.to_document()
        loaded = load_groups(store)
        assert [x.name for x in loaded] == ["api", "web"]  # the broken one is skipped
        assert loaded[1] == g
    finally:
        store.close()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"min_weight": 50, "max_weight": 10}, "min_weight <= max_weight"),
        ({"max_weight": 300}, "<= 256"),
        ({"deregistration_delay_s": -1.0}, "deregistration_delay_s must be >= 0"),
        ({"members": {"vm-1": "a", "vm-2": "a"}}, "same server"),
        ({"members": {"vm-1": "bad name"}}, "invalid HAProxy server name"),
        ({"backend": "app;shutdown"}, "invalid HAProxy backend name"),
        ({"name": ""}, "name must not be empty"),
        ({"timeout_s": 0.0}, "timeout_s must be > 0"),
    ],
)
def test_invalid_groups_say_what_is_wrong(kw: dict[str, object], message: str) -> None:
    with pytest.raises((ValueError, LbError), match=message):
        group(**kw)


def test_invalid_documents_say_which_field() -> None:
    doc = group().to_document()
    doc["algorithm"] = "random"
    with pytest.raises(ValueError, match=r"invalid service_group document.*algorithm"):
        ServiceGroup.from_document(doc)
    doc = group().to_document()
    doc["max_weight"] = 999
    with pytest.raises(ValueError, match="<= 256"):
        ServiceGroup.from_document(doc)


def test_unknown_provider_is_refused() -> None:
    doc = group().to_document()
    doc["provider"] = "nginx"
    with pytest.raises(ValueError, match="provider"):
        ServiceGroup.from_document(doc)


def test_service_builds_runtimes_from_the_registry() -> None:
    svc = LoadBalancerService([group(), group(name="api", backend="api", runtime="127.0.0.1:9999")])
    try:
        assert repr(svc.runtimes["web"]) == "HaproxyRuntime('/run/haproxy/admin.sock')"
        assert repr(svc.runtimes["api"]) == "HaproxyRuntime('127.0.0.1:9999')"
        assert isinstance(svc.drainer, Drainer)
        assert repr(open_runtime(group())) == "HaproxyRuntime('/run/haproxy/admin.sock')"
    finally:
        svc.close()
    with pytest.raises(ValueError, match="unique"):
        LoadBalancerService([group(), group()])


def test_drainer_without_membership_has_nothing_to_drain() -> None:
    drainer = HaproxyDrainer([])
    outcome = drainer.drain("vm-1", 30.0)
    assert outcome.drained
    assert "nothing to drain" in outcome.reason
    drainer.undrain("vm-1")  # nothing to undo, no error


class FakeClock:
    """A fake monotonic clock advanced only by the injected sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_timeout_drainer_waits_the_shorter_of_timeout_and_delay() -> None:
    clock = FakeClock()
    drainer = TimeoutDrainer(delay_s=20.0, clock=clock, sleep=clock.sleep)
    assert isinstance(drainer, Drainer)
    outcome = drainer.drain("vm-1", 300.0)
    assert outcome.drained
    assert outcome.waited_s == 20.0
    assert "no load balancer" in outcome.reason
    assert sum(clock.sleeps) == 20.0
    outcome = TimeoutDrainer(clock=clock, sleep=clock.sleep).drain("vm-1", 7.5)
    assert outcome.waited_s == 7.5


def test_timeout_drainer_close_cancels_the_wait() -> None:
    drainer = TimeoutDrainer()
    result: list[object] = []
    worker = threading.Thread(target=lambda: result.append(drainer.drain("vm-1", 3600.0)))
    worker.start()
    drainer.close()
    worker.join(30)
    assert not worker.is_alive()
    (outcome,) = result
    assert not outcome.drained  # type: ignore[attr-defined]
    assert "cancelled" in outcome.reason  # type: ignore[attr-defined]
