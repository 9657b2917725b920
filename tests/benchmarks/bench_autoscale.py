"""Target tracking vs a plain threshold scaler on a simulated 24 h workload.

    .venv/bin/python -m tests.benchmarks.bench_autoscale [SEED] [STEP_S]

The workload (seeded) is a daily curve (night trough, afternoon peak) with
noise and a few spikes of 10-40 min.  Demand is in "CPU percent of one
instance"; each in-service instance runs at demand / in-service instances
(capped at 100 %).  New instances boot for 90 s (pending, no traffic).

Both scalers run through the real controller (:func:`cloudmon.autoscale.controller.decide`),
with every action granted at once:

* target tracking: keep average CPU at 50 % (defaults: ±10 % band, scale-out
  cooldown 60 s, scale-in after 300 s below the band, 300 s scale-in cooldown,
  at most 10 % per scale-in step, 180 s warm-up);
* threshold: +1 instance when CPU > 70 %, -1 when CPU < 30 %, evaluated every
  step with no cooldown, no warm-up, no alarm duration.

Printed per scaler: scaling actions, time the CPU spent outside ±10 % of the
50 % target, time above 80 % (overload), instance-hours, peak instances.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass
from typing import Any

from cloudmon.autoscale.controller import (
    Observation,
    decide,
    mark_deleted,
    mark_draining,
    mark_launched,
    new_instance_name,
)
from cloudmon.autoscale.model import (
    Alarm,
    GroupSpec,
    Instance,
    LaunchTemplate,
    Step,
    StepScalingPolicy,
    TargetTrackingPolicy,
    initial_state,
)
from cloudmon.providers.base import InstanceState

DAY = 86400
BOOT_S = 90.0
TARGET = 50.0
T0 = 1_700_006_400.0  # 2023-11-15 00:00 UTC


def workload(seed: int, step: float) -> list[float]:
    rng = random.Random(seed)
    n = int(DAY / step)
    spikes = []
    for _ in range(5):
        start = rng.uniform(0, DAY)
        spikes.append((start, start + rng.uniform(600, 2400), rng.uniform(1.4, 2.2)))
    out = []
    for k in range(n):
        t = k * step
        daily = 0.5 - 0.5 * math.cos(2 * math.pi * (t - 3 * 3600) / DAY)  # trough 03:00, peak 15:00
        d = 120 + 780 * daily
        d *= 1 + rng.gauss(0, 0.06)
        for a, b, f in spikes:
            if a <= t < b:
                d *= f
        out.append(max(0.0, d))
    return out


@dataclass
class Result:
    name: str
    actions: int
    outside_s: float
    above_s: float
    overload_s: float
    instance_hours: float
    peak: int


def run(name: str, spec: GroupSpec, demand: list[float], step: float) -> Result:
    state = initial_state(spec)
    now = T0
    actions = 0
    outside = above = overload = inst_s = 0.0
    peak = 0
    for d in demand:
        now += step
        serving = [
            i
            for i in state.instances
            if i.state in ("in_service", "draining") and now - i.launched_at >= BOOT_S
        ]
        cpu = 100.0 if not serving else min(100.0, d / len(serving))
        obs = {
            i.id: Observation(
                state=InstanceState.RUNNING if now - i.launched_at >= BOOT_S else InstanceState.PENDING,
                values={"cpu.percent": cpu},
                last_report=now,
            )
            for i in state.instances
        }
        dec = decide(spec, state, now, obs)
        st = dec.state
        actions += sum(1 for e in dec.events if e["kind"] in ("autoscale.scale_out", "autoscale.scale_in"))
        for iid in dec.delete:
            mark_deleted(st, iid)
        for iid in dec.drain:
            mark_draining(st, iid, now, now + spec.drain_timeout_s, "scale-in")
        for _ in range(dec.launch):
            iname = new_instance_name(st)
            mark_launched(st, Instance(id=iname, group=st.group, launched_at=now), mandatory=False)
        state = st
        if not TARGET * 0.9 <= cpu <= TARGET * 1.1:
            outside += step
        if cpu > TARGET * 1.1:
            above += step
        if cpu > 80.0:
            overload += step
        inst_s += len(state.instances) * step
        peak = max(peak, len(state.live()))
    return Result(name, actions, outside, above, overload, inst_s / 3600, peak)


def main() -> None:
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    step = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
    demand = workload(seed, step)
    base: dict[str, Any] = {
        "name": "bench",
        "template": LaunchTemplate(),
        "min_size": 2,
        "max_size": 40,
        "desired": 4,
        "drain_timeout_s": 30.0,
        "health_check_grace_s": 600.0,
    }
    tt = GroupSpec(
        **base, default_warmup_s=180.0, policies=[TargetTrackingPolicy(name="cpu50", target=TARGET)]
    )
    threshold = GroupSpec(
        **base,
        default_warmup_s=0.0,
        default_cooldown_s=0.0,
        policies=[
            StepScalingPolicy(
                name="high",
                alarm=Alarm(threshold=70.0, duration_s=0.0),
                steps=[Step(lower=0.0, adjustment=1)],
            ),
            StepScalingPolicy(
                name="low",
                alarm=Alarm(threshold=30.0, comparison="<", duration_s=0.0),
                steps=[Step(upper=0.0, adjustment=-1)],
            ),
        ],
    )
    print(
        f"24 h simulated workload, seed {seed}, {step:.0f} s steps, demand {min(demand):.0f}..{max(demand):.0f} "
        f"(CPU % of one instance), boot {BOOT_S:.0f} s, target {TARGET:.0f} % CPU"
    )
    print(
        f"{'scaler':<18}{'actions':>8}{'outside ±10 %':>15}{'(above)':>9}{'CPU > 80 %':>12}{'inst-hours':>12}{'peak':>6}"
    )
    for r in (run("target tracking", tt, demand, step), run("threshold 70/30", threshold, demand, step)):
        print(
            f"{r.name:<18}{r.actions:>8}{r.outside_s / 3600:>13.1f} h{r.above_s / 3600:>7.1f} h{r.overload_s / 60:>8.0f} min"
            f"{r.instance_hours:>12.1f}{r.peak:>6}"
        )


if __name__ == "__main__":
    main()
