"""LibvirtProvider over two fake hosts of libvirt's test:/// driver (custom host files)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudmon.providers import InstanceState, LaunchRequest, ProviderError, open_provider
from cloudmon.providers.placement import PlacementError

libvirt = pytest.importorskip("libvirt")

from cloudmon.providers.libvirt import HostWorker, LibvirtProvider  # noqa: E402

DATA = Path(__file__).parent / "data"
HOSTS = {"host-a": f"test://{DATA / 'host-a.xml'}", "host-b": f"test://{DATA / 'host-b.xml'}"}
TEMPLATE = str(DATA / "template.xml")


def _libvirt_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("libvirt-")]


@pytest.fixture
def provider() -> Iterator[LibvirtProvider]:
    p = LibvirtProvider({"hosts": HOSTS, "template_xml": TEMPLATE, "call_timeout_s": 10})
    try:
        yield p
    finally:
        p.close()
    # An abandoned worker ends on its own once its stuck call returns (after the test
    # released it): wait for that, boundedly, instead of racing it.
    deadline = time.monotonic() + 10
    while _libvirt_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _libvirt_threads() == []


def _req(name: str, group: str = "web", **kw: Any) -> LaunchRequest:
    return LaunchRequest(
        group=group, name=name, vcpus=kw.pop("vcpus", 1), memory_mib=kw.pop("memory_mib", 1024), **kw
    )


def test_registry_builds_it() -> None:
    p = open_provider("libvirt", {"hosts": HOSTS})
    try:
        assert isinstance(p, LibvirtProvider)
        assert p.name == "libvirt"
    finally:
        p.close()


def test_hosts_report_capacity_and_what_running_domains_use(provider: LibvirtProvider) -> None:
    hosts = provider.hosts()
    assert set(hosts) == {"host-a", "host-b"}
    a, b = hosts["host-a"], hosts["host-b"]
    assert (a["vcpus"], a["memory_mib"], a["vcpus_used"], a["memory_mib_used"]) == (8, 16384, 2, 4096)
    assert (b["vcpus"], b["memory_mib"], b["vcpus_used"], b["memory_mib_used"]) == (4, 8192, 1, 1024)


def test_a_group_spreads_over_both_hosts_and_is_described_and_deleted(provider: LibvirtProvider) -> None:
    first = provider.create(_req("web-1"))
    second = provider.create(_req("web-2"))
    third = provider.create(_req("web-3"))
    # host-a has the most room; then host-b has none of the group; then both have one: most room wins
    assert (first.host, second.host, third.host) == ("host-a", "host-b", "host-a")
    assert {i.state for i in (first, second, third)} == {InstanceState.RUNNING}
    assert first.id == "web-1"
    assert first.group == "web"
    assert first.created > 0
    # an instance of another group does not count for the spread of "web"
    assert provider.create(_req("db-1", group="db")).host == "host-a"

    desc = provider.describe(["web-1", "web-2", "web-3", "gone"])
    assert {k: (v.state, v.host, v.group) for k, v in desc.items()} == {
        "web-1": (InstanceState.RUNNING, "host-a", "web"),
        "web-2": (InstanceState.RUNNING, "host-b", "web"),
        "web-3": (InstanceState.RUNNING, "host-a", "web"),
        "gone": (InstanceState.MISSING, None, ""),
    }
    assert provider.hosts()["host-b"]["vcpus_used"] == 2

    provider.delete("web-2")
    provider.delete("web-2")  # deleting a missing instance is not an error
    assert provider.describe(["web-2"])["web-2"].state is InstanceState.MISSING
    assert provider.hosts()["host-b"]["vcpus_used"] == 1


def test_explicit_host_and_allowed_hosts(provider: LibvirtProvider) -> None:
    assert provider.create(_req("w-1", host="host-b")).host == "host-b"
    assert provider.create(_req("w-2", params={"hosts": ["host-b"]})).host == "host-b"
    with pytest.raises(ProviderError, match="unknown libvirt hosts"):
        provider.create(_req("w-3", params={"hosts": ["host-z"]}))
    with pytest.raises(ProviderError, match="unknown libvirt host 'host-z'"):
        provider.create(_req("w-4", host="host-z"))


def test_when_nothing_fits_the_error_names_what_each_host_lacks(provider: LibvirtProvider) -> None:
    with pytest.raises(PlacementError) as exc:
        provider.create(_req("huge-1", vcpus=7, memory_mib=9000))
    text = str(exc.value)
    assert "instance huge-1 of group web (7 vCPUs, 9000 MiB)" in text
    assert "host-a has only 6 free vCPUs" in text
    assert "host-b has only 3 free vCPUs and 7168 MiB free memory" in text
    assert provider.describe(["huge-1"])["huge-1"].state is InstanceState.MISSING


def test_vm_errors_surface_as_provider_errors(provider: LibvirtProvider) -> None:
    with pytest.raises(
        ProviderError, match=r"libvirt host host-a: .*cannot read template domain XML /nope.xml"
    ):
        provider.create(_req("x-1", image="/nope.xml", host="host-a"))
    with pytest.raises(ProviderError, match="base_image needs overlay_dir"):
        provider.create(_req("x-2", image="/images/base.qcow2", host="host-a"))


def test_an_unreachable_host_is_skipped_for_placement_but_blocks_a_missing_verdict() -> None:
    hosts = {"good": HOSTS["host-a"], "bad": "test:///nonexistent/host.xml"}
    p = LibvirtProvider({"hosts": hosts, "template_xml": TEMPLATE})
    try:
        assert set(p.hosts()) == {"good"}
        assert p.create(_req("w-1")).host == "good"
        assert p.describe(["w-1"])["w-1"].state is InstanceState.RUNNING
        with pytest.raises(
            ProviderError, match=r"cannot tell whether w-9 still exist.*cannot connect to libvirt host bad"
        ):
            p.describe(["w-9"])
    finally:
        p.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "needs hosts = "),
        ({"hosts": {}}, "needs hosts = "),
        ({"hosts": HOSTS, "call_timeout_s": "soon"}, "call_timeout_s must be a number"),
        ({"hosts": HOSTS, "create_timeout_s": 0}, "create_timeout_s must be > 0"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ProviderError, match=message):
        LibvirtProvider(options)


def test_a_call_that_overruns_is_abandoned_and_the_host_gets_a_fresh_worker() -> None:
    release = threading.Event()
    worker = HostWorker("slow", HOSTS["host-a"])
    try:
        assert worker.call(lambda conn: conn.getInfo()[2], 10, "a query") == 8
        with pytest.raises(
            ProviderError, match=r"libvirt host slow .* did not answer a stuck call within 0.2 s"
        ):
            worker.call(lambda conn: release.wait(30), 0.2, "a stuck call")
        assert worker.abandoned
        with pytest.raises(ProviderError, match="worker closed"):
            worker.call(lambda conn: 1, 1, "x")
    finally:
        release.set()
        worker.close()
    assert not worker.alive()


def test_the_provider_replaces_an_abandoned_worker(provider: LibvirtProvider) -> None:
    release = threading.Event()
    try:
        with pytest.raises(ProviderError, match="did not answer"):
            provider._call("host-a", lambda conn: release.wait(30), "a stuck call", timeout=0.2)
    finally:
        release.set()
    assert provider.hosts()["host-a"]["vcpus"] == 8


def test_closed_provider_refuses_work(provider: LibvirtProvider) -> None:
    provider.hosts()
    provider.close()
    provider.close()
    with pytest.raises(ProviderError, match="closed"):
        provider.create(_req("late-1", host="host-a"))
