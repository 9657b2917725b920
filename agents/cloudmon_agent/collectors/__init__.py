"""Collectors: small pluggable samplers, each filling one field of the report.

A collector is any object with the :class:`Collector` shape.  The agent calls
:meth:`Collector.prime` once, then :meth:`Collector.collect` once per cycle
from its one sampling thread, and puts the result in the report field named by
:attr:`Collector.field`.  Each owns its own counters.

:func:`default_collectors` builds the set a node runs from
:class:`CollectorOptions`: host (always), top processes, containers
(cgroups), VMs (when a URI is set and a local daemon's socket or libvirt-python
can serve it), GPUs (when
NVML finds one, or VMs have GPUs assigned), all under a CPU budget
(:mod:`cloudmon_agent.budget`) unless ``budget_ms`` is 0.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

from cloudmon_agent.collectors.host import HostCollector
from cloudmon_agent.wire import Struct

log = logging.getLogger(__name__)


class Collector(Protocol):
    """One sampler of one part of the node."""

    #: The :class:`~cloudmon_agent.schema.Report` field this collector fills.
    field: str

    def prime(self) -> None:
        """Take first readings of stateful counters (rates need two samples)."""

    def collect(self) -> object:
        """One sample: the value of ``Report.<field>``."""

    def close(self) -> None:
        """Release files, handles and connections."""


class CollectorOptions(Struct, frozen=True, kw_only=True):
    """What :func:`default_collectors` turns on (the agent config maps onto these)."""

    #: libvirt URI for VMs; empty turns the VM collector off.  Off anyway without libvirt-python.
    libvirt_uri: str = "qemu:///system"
    #: Processes in each top-N list; 0 turns the process scan off.
    top_n: int = 5
    #: Seconds between process scans (the report carries the last lists and their age).
    processes_every_s: float = 5.0
    #: Report containers, services and VM scopes from cgroups.
    containers: bool = True
    #: cgroup mount point (tests point it at a fake tree).
    cgroup_root: str = "/sys/fs/cgroup"
    #: Report NVIDIA GPUs through NVML when it finds one.
    gpus: bool = True
    #: Collector CPU budget per cycle in ms; 0 turns the budget off.
    budget_ms: float = 1.0


def default_collectors(options: CollectorOptions | None = None) -> list[Collector]:
    """The collectors a node runs, per ``options`` (defaults: everything available)."""
    from cloudmon_agent.budget import BudgetPolicy, apply_budget

    opts = options if options is not None else CollectorOptions()
    out: list[Collector] = [HostCollector()]
    if opts.top_n > 0 and os.path.isdir("/proc/self"):
        from cloudmon_agent.collectors.processes import ProcessCollector

        out.append(ProcessCollector(top_n=opts.top_n, every_s=opts.processes_every_s))
    if opts.containers and os.path.isdir(opts.cgroup_root):
        from cloudmon_agent.collectors.containers import ContainerCollector

        out.append(ContainerCollector(opts.cgroup_root))
    vms = None
    if opts.libvirt_uri:
        from cloudmon_agent.collectors.vms import VmCollector, libvirt_module

        if libvirt_module(opts.libvirt_uri) is not None:
            vms = VmCollector(opts.libvirt_uri)
            out.append(vms)
        else:
            log.info(
                "libvirt-python is not installed: no VM metrics from %s (install cloudmon-agent[libvirt])",
                opts.libvirt_uri,
            )
    if opts.gpus:
        from cloudmon_agent.collectors.gpus import GpuCollector, open_nvml, vfio_pci_devices

        nvml = open_nvml()
        if nvml is not None or vms is not None or vfio_pci_devices():
            out.append(GpuCollector(nvml, vm_owners=vms.gpu_owners if vms is not None else None))
    if opts.budget_ms > 0:
        out = apply_budget(out, BudgetPolicy(opts.budget_ms))
    return out


__all__ = ["Collector", "CollectorOptions", "HostCollector", "default_collectors"]
