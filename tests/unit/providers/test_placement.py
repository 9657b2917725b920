"""Placement: fits, spreads a group, and says what each host lacked."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudmon.providers.placement import HostCapacity, PlacementError, place


def test_spreads_by_group_instances_before_free_room() -> None:
    hosts = [
        HostCapacity("big", vcpus=32, memory_mib=65536, group_instances=2),
        HostCapacity("small", vcpus=4, memory_mib=8192, group_instances=1),
    ]
    assert place(hosts, 1, 1024) == "small"


def test_among_equal_spread_the_most_free_host_wins() -> None:
    hosts = [
        HostCapacity("a", vcpus=8, memory_mib=16384, vcpus_used=6, memory_mib_used=1024),
        HostCapacity("b", vcpus=8, memory_mib=16384, vcpus_used=2, memory_mib_used=4096),
        HostCapacity("c", vcpus=8, memory_mib=16384, vcpus_used=2, memory_mib_used=2048),
    ]
    assert place(hosts, 1, 1024) == "c"


def test_ties_are_broken_by_name() -> None:
    hosts = [HostCapacity("z", 4, 4096), HostCapacity("a", 4, 4096)]
    assert place(hosts, 1, 512) == "a"


def test_nothing_fits_names_what_each_host_lacks() -> None:
    hosts = [
        HostCapacity("h1", vcpus=4, memory_mib=8192, vcpus_used=3),
        HostCapacity("h2", vcpus=8, memory_mib=4096, memory_mib_used=3072),
    ]
    with pytest.raises(PlacementError) as exc:
        place(hosts, 2, 2048, what="an instance of group web")
    text = str(exc.value)
    assert "no host can take an instance of group web (2 vCPUs, 2048 MiB)" in text
    assert "h1 has only 1 free vCPUs" in text
    assert "h2 has only 1024 MiB free memory" in text
    assert "lower the launch template's vcpus/memory_mib" in text


def test_allowed_hosts_overcommit_and_headroom() -> None:
    hosts = [HostCapacity("a", 4, 8192, vcpus_used=4), HostCapacity("b", 4, 8192)]
    assert place(hosts, 1, 512, allowed={"a", "b"}) == "b"
    with pytest.raises(PlacementError, match="a has only 0 free vCPUs"):
        place(hosts, 1, 512, allowed={"a"})
    assert place(hosts, 1, 512, allowed={"a"}, cpu_allocation_ratio=2.0) == "a"
    with pytest.raises(PlacementError, match="b has only 1024 MiB free memory"):
        place(hosts, 1, 2048, allowed={"b"}, memory_headroom_mib=7168)
    with pytest.raises(PlacementError, match=r"none of the allowed hosts \(x\) is known"):
        place(hosts, 1, 512, allowed={"x"})
    with pytest.raises(PlacementError, match="the provider has no hosts"):
        place([], 1, 512)


def test_from_provider_figures() -> None:
    h = HostCapacity.from_figures("h", {"vcpus": 8, "memory_mib": 1024, "vcpus_used": 2}, group_instances=3)
    assert h == HostCapacity("h", 8.0, 1024.0, 2.0, 0.0, 3)


hosts_st = st.lists(
    st.builds(
        HostCapacity,
        name=st.text("abcdef", min_size=1, max_size=3),
        vcpus=st.integers(1, 64).map(float),
        memory_mib=st.integers(256, 65536).map(float),
        vcpus_used=st.integers(0, 64).map(float),
        memory_mib_used=st.integers(0, 65536).map(float),
        group_instances=st.integers(0, 5),
    ),
    max_size=6,
    unique_by=lambda h: h.name,
)


@given(hosts_st, st.integers(1, 16), st.integers(64, 16384))
def test_the_chosen_host_fits_and_has_fewest_group_instances_among_those_that_fit(
    hosts: list[HostCapacity], vcpus: int, memory_mib: int
) -> None:
    fits = [
        h for h in hosts if h.vcpus - h.vcpus_used >= vcpus and h.memory_mib - h.memory_mib_used >= memory_mib
    ]
    if not fits:
        with pytest.raises(PlacementError):
            place(hosts, vcpus, memory_mib)
        return
    chosen = next(h for h in hosts if h.name == place(hosts, vcpus, memory_mib))
    assert chosen in fits
    assert chosen.group_instances == min(h.group_instances for h in fits)
