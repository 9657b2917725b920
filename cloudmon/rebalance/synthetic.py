"""Random cluster snapshots for benchmarks, property tests and the demo (seeded, reproducible)."""

from __future__ import annotations

import random

from cloudmon.rebalance.snapshot import VM, ClusterSnapshot, Host


def random_snapshot(
    seed: int,
    hosts: int,
    vms: int,
    *,
    fill: float = 0.55,
    skew: float = 2.0,
    ts: float = 0.0,
) -> ClusterSnapshot:
    """A cluster of ``hosts`` hosts (16-64 cores, 64-256 GiB) and ``vms`` VMs placed unevenly.

    VMs are sized so the cluster is about ``fill`` full (CPU and memory) and land
    on hosts with a bias of ``skew`` (1 = uniform): the first hosts get more, so
    there is something to rebalance.  No host is filled past 100 %.
    """
    rng = random.Random(seed)
    hs = [
        Host(
            name=f"h{i:04d}",
            cpu_cores=float(rng.choice((16, 32, 32, 48, 64))),
            memory_mib=float(rng.choice((65536, 131072, 131072, 196608, 262144))),
        )
        for i in range(hosts)
    ]
    total_cpu = sum(h.cpu_cores for h in hs) * fill
    total_mem = sum(h.memory_mib for h in hs) * fill
    raw = [(rng.paretovariate(2.5), rng.paretovariate(2.5)) for _ in range(vms)]
    sc = total_cpu / sum(c for c, _ in raw)
    sm = total_mem / sum(m for _, m in raw)
    used = [[0.0, 0.0] for _ in hs]
    weights = [1.0 / (1 + i * skew / max(1, hosts)) ** 2 for i in range(hosts)]
    out: list[VM] = []
    for j, (c, m) in enumerate(raw):
        cpu = round(c * sc, 2)
        mem = float(round(m * sm / 256) * 256 or 256)
        for _ in range(50):
            h = rng.choices(range(hosts), weights)[0]
            if used[h][0] + cpu <= hs[h].cpu_cores and used[h][1] + mem <= hs[h].memory_mib:
                break
        else:
            h = min(range(hosts), key=lambda k: used[k][1] / hs[k].memory_mib)
        used[h][0] += cpu
        used[h][1] += mem
        out.append(VM(name=f"vm{j:05d}", host=hs[h].name, cpu_demand_cores=cpu, memory_mib=mem))
    return ClusterSnapshot(ts=ts, hosts=hs, vms=out)
