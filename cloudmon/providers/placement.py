"""Where a new instance goes: pure placement over host capacity figures.

A host fits when its free vCPUs (times an optional overcommit ratio) and free
memory (less a headroom) cover the instance.  Among the hosts that fit, the
group is spread: the host with the fewest instances of the group wins, then the
one left with the most room (the smaller of its free CPU and free memory
shares after placement, then their sum), then the name (so the choice is deterministic).
When nothing fits, :class:`PlacementError` says what each host lacked.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from cloudmon.providers.base import ProviderError


class PlacementError(ProviderError):
    """No host can take the instance; the text names what each host lacks."""


@dataclass(frozen=True, slots=True)
class HostCapacity:
    """One host as placement sees it."""

    name: str
    vcpus: float
    memory_mib: float
    vcpus_used: float = 0.0
    memory_mib_used: float = 0.0
    #: Instances of the group being placed already on this host.
    group_instances: int = 0

    @classmethod
    def from_figures(cls, name: str, figures: Mapping[str, float], group_instances: int = 0) -> HostCapacity:
        """From a :meth:`Provider.hosts` entry (``vcpus``, ``vcpus_used``, ``memory_mib``, ``memory_mib_used``)."""
        return cls(
            name=name,
            vcpus=float(figures.get("vcpus", 0.0)),
            memory_mib=float(figures.get("memory_mib", 0.0)),
            vcpus_used=float(figures.get("vcpus_used", 0.0)),
            memory_mib_used=float(figures.get("memory_mib_used", 0.0)),
            group_instances=group_instances,
        )


def _lacks(
    h: HostCapacity, vcpus: float, memory_mib: float, cpu_ratio: float, headroom_mib: float
) -> list[str]:
    free_cpu = h.vcpus * cpu_ratio - h.vcpus_used
    free_mem = h.memory_mib - headroom_mib - h.memory_mib_used
    out: list[str] = []
    if free_cpu < vcpus:
        out.append(f"{max(free_cpu, 0):g} free vCPUs")
    if free_mem < memory_mib:
        out.append(f"{max(free_mem, 0):g} MiB free memory")
    return out


def place(
    hosts: Iterable[HostCapacity],
    vcpus: float,
    memory_mib: float,
    *,
    allowed: Collection[str] | None = None,
    cpu_allocation_ratio: float = 1.0,
    memory_headroom_mib: float = 0.0,
    what: str = "the instance",
) -> str:
    """The name of the host for an instance of ``vcpus`` and ``memory_mib``.

    ``allowed`` restricts the candidates (a launch template's host list);
    ``cpu_allocation_ratio`` allows vCPU overcommit (1.0: none);
    ``memory_headroom_mib`` is kept free on every host.
    """
    candidates = [h for h in hosts if allowed is None or h.name in allowed]
    if not candidates:
        if allowed is not None:
            raise PlacementError(
                f"no host to place {what} on: none of the allowed hosts ({', '.join(sorted(allowed)) or 'none'}) "
                "is known; fix the launch template's host list"
            )
        raise PlacementError(
            f"no host to place {what} on: the provider has no hosts; add hosts to its options"
        )
    best: tuple[tuple[int, float, float, str], str] | None = None
    refusals: list[str] = []
    for h in candidates:
        lacks = _lacks(h, vcpus, memory_mib, cpu_allocation_ratio, memory_headroom_mib)
        if lacks:
            refusals.append(f"{h.name} has only {' and '.join(lacks)}")
            continue
        cpu_total = h.vcpus * cpu_allocation_ratio
        cpu_left = (cpu_total - h.vcpus_used - vcpus) / cpu_total if cpu_total > 0 else 0.0
        mem_left = (h.memory_mib - h.memory_mib_used - memory_mib) / h.memory_mib if h.memory_mib > 0 else 0.0
        key = (h.group_instances, -min(cpu_left, mem_left), -(cpu_left + mem_left), h.name)
        if best is None or key < best[0]:
            best = (key, h.name)
    if best is None:
        raise PlacementError(
            f"no host can take {what} ({vcpus:g} vCPUs, {memory_mib:g} MiB): "
            + "; ".join(sorted(refusals))
            + ". Free capacity, add hosts, or lower the launch template's vcpus/memory_mib"
        )
    return best[1]
