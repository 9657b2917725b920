"""Realistic collector answers for the Groups and Balance pages (the API's JSON contract).

Used by the page tests and by ``render_screenshots``; all times are relative
to ``now`` so that "ago" and clock columns read naturally.
"""

from __future__ import annotations

import math
from typing import Any


def web_spec() -> dict[str, Any]:
    return {
        "name": "web",
        "template": {
            "provider": "simulated",
            "image": "debian-12-web",
            "vcpus": 2,
            "memory_mib": 2048,
            "hosts": ["node-01", "node-02", "node-03"],
        },
        "min_size": 2,
        "max_size": 8,
        "desired": 4,
        "health_check_grace_s": 120,
        "default_warmup_s": 90,
        "termination_policy": "oldest",
        "default_cooldown_s": 300,
        "drain_timeout_s": 30,
        "policies": [
            {
                "type": "target_tracking",
                "name": "cpu-60",
                "metric": "cpu.percent",
                "target": 60.0,
                "scale_in_enabled": True,
            },
            {
                "type": "step",
                "name": "cpu-burst",
                "metric": "cpu.percent",
                "alarm": {"threshold": 85.0, "comparison": ">", "duration_s": 180},
                "adjustment_type": "change_in_capacity",
                "steps": [
                    {"lower": 0, "upper": 10, "adjustment": 1},
                    {"lower": 10, "upper": None, "adjustment": 3},
                ],
            },
        ],
        "scheduled": [{"name": "night", "cron": "0 22 * * *", "min_size": 1, "max_size": 4, "desired": 2}],
    }


def groups_answer(now: float) -> dict[str, Any]:
    web = {
        "name": "web",
        "spec": web_spec(),
        "desired": 4,
        "instances": [
            {
                "id": "web-7f3a",
                "state": "in_service",
                "host": "node-01",
                "node_id": "web-7f3a-1",
                "launched_at": now - 7200,
            },
            {
                "id": "web-91c2",
                "state": "in_service",
                "host": "node-02",
                "node_id": "web-91c2-1",
                "launched_at": now - 5400,
            },
            {
                "id": "web-a04e",
                "state": "unhealthy",
                "host": "node-03",
                "node_id": "web-a04e-1",
                "launched_at": now - 1800,
            },
            {
                "id": "web-c55d",
                "state": "pending",
                "host": "node-01",
                "node_id": None,
                "launched_at": now - 40,
            },
        ],
        "metric": {"name": "cpu.percent", "value": 71.4, "target": 60.0},
        "simulated": True,
    }
    batch_spec = {
        "name": "batch",
        "template": {
            "provider": "libvirt",
            "image": "batch-base.qcow2",
            "vcpus": 4,
            "memory_mib": 8192,
            "hosts": [],
        },
        "min_size": 0,
        "max_size": 3,
        "desired": 1,
        "health_check_grace_s": 300,
        "default_warmup_s": 120,
        "termination_policy": "newest",
        "default_cooldown_s": 600,
        "drain_timeout_s": 120,
        "policies": [{"type": "target_tracking", "name": "mem-70", "metric": "mem.percent", "target": 70.0}],
        "scheduled": [],
    }
    batch = {
        "name": "batch",
        "spec": batch_spec,
        "desired": 1,
        "instances": [
            {
                "id": "batch-001",
                "state": "in_service",
                "host": "node-04",
                "node_id": "batch-001",
                "launched_at": now - 86400,
            }
        ],
        "metric": {"name": "mem.percent", "value": 52.0, "target": 70.0},
        "simulated": False,
    }
    return {"groups": [web, batch]}


def activity_answer(now: float) -> dict[str, Any]:
    return {
        "events": [
            {
                "id": "e6",
                "ts": now - 20,
                "kind": "autoscale.no_action",
                "group": "web",
                "reason": "CPU is above target but the group is warming up: 1 instance still in warm-up for 70 s.",
                "numbers": {"metric": 71.4, "target": 60.0, "warming": 1},
            },
            {
                "id": "e5",
                "ts": now - 40,
                "kind": "autoscale.launch",
                "group": "web",
                "reason": "Launched web-c55d on node-01 (most free CPU among allowed hosts).",
                "numbers": {"vcpus": 2, "memory_mib": 2048},
            },
            {
                "id": "e4",
                "ts": now - 41,
                "kind": "autoscale.scale_out",
                "group": "web",
                "reason": "Target tracking cpu-60: average CPU 78.2 % over 3 min is above the target 60 %.",
                "numbers": {"metric": 78.2, "target": 60.0, "desired_before": 3, "desired_after": 4},
            },
            {
                "id": "e3",
                "ts": now - 600,
                "kind": "autoscale.launch_failed",
                "group": "web",
                "reason": "Provider simulated refused: host node-02 has no free memory (needs 2048 MiB).",
                "numbers": {"exit_code": 1},
            },
            {
                "id": "e2",
                "ts": now - 1800,
                "kind": "autoscale.replace_unhealthy",
                "group": "web",
                "reason": "web-0b1d stopped reporting 150 s ago (grace 120 s): replacing it.",
                "numbers": {"silent_s": 150, "grace_s": 120},
            },
            {
                "id": "e1",
                "ts": now - 3600,
                "kind": "autoscale.scale_in",
                "group": "web",
                "reason": "Average CPU 31 % is below target 60 % for 15 min; drained web-51aa, then terminated it.",
                "numbers": {"metric": 31.0, "target": 60.0, "desired_before": 4, "desired_after": 3},
            },
        ]
    }


HOSTS = ("node-01", "node-02", "node-03", "node-04", "node-05", "node-06")
CPU_BEFORE = {
    "node-01": 0.91,
    "node-02": 0.84,
    "node-03": 0.35,
    "node-04": 0.22,
    "node-05": 0.58,
    "node-06": 0.12,
}
CPU_AFTER = {
    "node-01": 0.63,
    "node-02": 0.61,
    "node-03": 0.52,
    "node-04": 0.49,
    "node-05": 0.58,
    "node-06": 0.29,
}


def _hosts(cpu: dict[str, float]) -> dict[str, dict[str, float]]:
    return {h: {"cpu": c, "mem": round(0.3 + c * 0.4, 3)} for h, c in cpu.items()}


def plan(status: str = "proposed") -> dict[str, Any]:
    before, after = _hosts(CPU_BEFORE), _hosts(CPU_AFTER)

    def move(vm: str, src: str, dst: str, wave: int, gain: float, cost: float, reason: str) -> dict[str, Any]:
        return {
            "vm": vm,
            "source": src,
            "target": dst,
            "reason": reason,
            "gain": gain,
            "cost_s": cost,
            "mandatory": False,
            "wave": wave,
            "source_before": before[src],
            "source_after": after[src],
            "target_before": before[dst],
            "target_after": after[dst],
        }

    moves = [
        move(
            "db-replica-2",
            "node-01",
            "node-04",
            0,
            0.071,
            42.0,
            "node-01 CPU 91 % is 33 points above the mean",
        ),
        move(
            "web-91c2", "node-02", "node-03", 0, 0.048, 18.0, "node-02 CPU 84 % is 26 points above the mean"
        ),
        move(
            "cache-1",
            "node-01",
            "node-06",
            1,
            0.021,
            9.5,
            "spreads cache-1 away from db-replica-1 (anti-affinity)",
        ),
    ]
    moves[2]["mandatory"] = True
    return {
        "id": "p-0042",
        "status": status,
        "created": 1_700_000_000.0,
        "solver": "cp-sat (optimal, 0.31 s)",
        "imbalance_before": 0.284,
        "imbalance_after": 0.112,
        "moves": moves,
        "rejected": [
            {
                "vm": "db-primary",
                "target": "node-04",
                "why": "pinned",
                "detail": "db-primary is pinned to node-01",
            },
            {
                "vm": "web-7f3a",
                "target": "node-06",
                "why": "too_small_gain",
                "detail": "gain 0.004 below 0.02 at threshold 3",
            },
            {
                "vm": "batch-001",
                "target": "node-03",
                "why": "capacity",
                "detail": "node-03 memory would reach 93 % (headroom 15 %)",
            },
        ],
        "hosts_before": before,
        "hosts_after": after,
        "power_off": [],
    }


def balance_answer(now: float, with_plan: bool = True, executing: bool = False) -> dict[str, Any]:
    ts = [now - 3600 + 60 * k for k in range(61)]
    # Drifts up to the plan's "before" (0.284) at the end of the hour.
    value = [
        round(0.2 + 0.05 * math.sin(k / 9) + 0.0014 * k - 0.05 * math.sin(60 / 9) * k / 60, 4)
        for k in range(61)
    ]
    p = plan("running" if executing else "proposed") if with_plan else None
    execution: dict[str, Any] = {
        "plan_id": None,
        "state": "idle",
        "moves_done": 0,
        "moves_total": 0,
        "current": None,
        "message": "",
    }
    if executing:
        execution = {
            "plan_id": "p-0042",
            "state": "running",
            "moves_done": 1,
            "moves_total": 3,
            "current": {"vm": "web-91c2", "source": "node-02", "target": "node-03", "percent": 64.0},
            "message": "",
        }
    return {
        "settings": {"threshold": 3, "automation": "manual", "mode": "balance"},
        "imbalance": {"ts": ts, "value": value},
        "hosts": [{"name": h, "cpu": CPU_BEFORE[h], "mem": 0.3 + CPU_BEFORE[h] * 0.4} for h in HOSTS],
        "plan": p,
        "execution": execution,
    }
