"""The simulator: simulated hosts, VMs and group instances that speak the real
protocol to the real collector (for ``cloudmon demo`` and load tests).

- :class:`~cloudmon.sim.simulator.Simulator`: the nodes and the one thread that reports for all of them;
- :class:`~cloudmon.sim.workload.Workload`: a seeded demand curve that rises, falls and spikes;
- :func:`~cloudmon.sim.demo.build_demo`: the demo's cluster, group and provider.
"""

from __future__ import annotations

from cloudmon.sim.simulator import SIM_OS, SIM_PREFIX, Simulator, sim_name
from cloudmon.sim.workload import Workload

__all__ = ["SIM_OS", "SIM_PREFIX", "Simulator", "Workload", "sim_name"]
