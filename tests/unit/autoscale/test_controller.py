"""The pure controller: policies, warm-up, cooldowns, schedules, health, termination, drain."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import msgspec
import pytest

from cloudmon.autoscale.controller import (
    Observation,
    choose_victims,
    decide,
    mark_draining,
    mark_launch_failed,
    place,
)
from cloudmon.autoscale.model import (
    Alarm,
    GroupSpec,
    GroupState,
    Instance,
    ScheduledAction,
    Step,
    StepScalingPolicy,
    TargetTrackingPolicy,
    initial_state,
)
from cloudmon.autoscale.policy import percent_change
from cloudmon.providers.base import InstanceState
from tests.unit.autoscale.helpers import T0, in_service, make_spec, running


def kinds(events: list[dict[str, object]]) -> list[str]:
    return [str(e["kind"]) for e in events]


def codes(events: list[dict[str, object]]) -> list[str]:
    return [str(e.get("code")) for e in events if e["kind"] == "autoscale.no_action"]


def cpu(state: GroupState, value: float) -> dict[str, dict[str, float]]:
    return {i.id: {"cpu.percent": value} for i in state.instances}


TT = TargetTrackingPolicy(name="cpu50", target=50.0)


def tt_state(n: int, **spec_kw: object) -> tuple[GroupSpec, GroupState, float]:
    spec_kw.setdefault("policies", [TT])
    spec = make_spec(desired=n, **spec_kw)
    st = initial_state(spec)
    in_service(st, n, T0 - 3600)
    return spec, st, T0


# ----- target tracking -----


def test_target_tracking_scales_out_proportionally_and_says_why() -> None:
    spec, st, now = tt_state(2, policies=[TT])
    dec = decide(spec, st, now, running(st, now, cpu(st, 90.0)))
    assert dec.state.desired == 4  # ceil(2 * 90 / 50)
    assert dec.launch == 2
    ev = next(e for e in dec.events if e["kind"] == "autoscale.scale_out")
    assert ev["policy"] == "cpu50"
    nums = ev["numbers"]
    assert isinstance(nums, dict)
    assert nums["value"] == 90.0
    assert nums["target"] == 50.0
    assert nums["from"] == 2
    assert nums["to"] == 4
    assert "cpu.percent 90.0" in str(ev["reason"])
    assert "2 -> 4" in str(ev["reason"])
    assert st.desired == 2, "decide must not change its input"


def test_within_tolerance_does_nothing_and_logs_it_once() -> None:
    spec, st, now = tt_state(3, policies=[TT])
    dec = decide(spec, st, now, running(st, now, cpu(st, 54.0)))
    assert dec.state.desired == 3
    assert dec.launch == 0
    assert not dec.drain
    assert codes(dec.events) == ["within_tolerance"]
    again = decide(spec, dec.state, now + 15, running(dec.state, now + 15, cpu(dec.state, 53.0)))
    assert again.events == []


def test_scale_out_cooldown_blocks_a_second_scale_out() -> None:
    spec, st, now = tt_state(2, policies=[TT])
    st.last_scale_out_at = now - 30
    dec = decide(spec, st, now, running(st, now, cpu(st, 95.0)))
    assert dec.state.desired == 2
    ev = next(e for e in dec.events if e["kind"] == "autoscale.no_action")
    assert ev["code"] == "cooldown"
    assert ev["numbers"]["cooldown_left_s"] == pytest.approx(30.0)  # type: ignore[index]


def test_new_instances_do_not_count_until_warmed_up() -> None:
    spec, st, now = tt_state(2, policies=[TT], default_warmup_s=300.0)
    # Two more launched 100 s ago, in service since 60 s ago: still warming, reporting 0 % CPU.
    for k in range(2):
        st.instances.append(
            Instance(
                id=f"new-{k}", group="web", state="in_service", launched_at=now - 100, in_service_at=now - 60
            )
        )
    st.desired = 4
    values = {i.id: {"cpu.percent": 90.0 if not i.id.startswith("new") else 0.0} for i in st.instances}
    dec = decide(spec, st, now, running(st, now, values))
    # The aggregate is 90 % over the two warmed-up ones: 4 needed, 4 already desired.
    assert dec.state.desired == 4
    assert codes(dec.events) == ["warming_up"]
    # Once warmed up, the new ones' (low) values count and nothing more is needed.
    later = now + 300
    dec2 = decide(spec, dec.state, later, running(dec.state, later, values))
    assert dec2.state.desired == 4  # average 45 %: within tolerance of 50
    assert codes(dec2.events) == ["within_tolerance"]


def test_scale_in_waits_for_stability_then_removes_a_bounded_step_then_cools_down() -> None:
    spec, st, now = tt_state(10, policies=[TT])
    dec = decide(spec, st, now, running(st, now, cpu(st, 20.0)))
    assert dec.state.desired == 10
    assert codes(dec.events) == ["stabilizing"]
    t = now + 299
    dec = decide(spec, dec.state, t, running(dec.state, t, cpu(dec.state, 20.0)))
    assert dec.state.desired == 10
    t = now + 300
    dec = decide(spec, dec.state, t, running(dec.state, t, cpu(dec.state, 20.0)))
    # Needed ceil(10*20/50) = 4, but at most 10 % of 10 = 1 per step.
    assert dec.state.desired == 9
    assert kinds(dec.events) == ["autoscale.scale_in"]
    assert len(dec.drain) == 1
    st2 = dec.state
    mark_draining(st2, dec.drain[0], t, t + 30, "scale-in")
    t2 = t + 100
    dec = decide(spec, st2, t2, running(st2, t2, cpu(st2, 20.0)))
    assert dec.state.desired == 9
    t3 = t + 300
    dec = decide(spec, dec.state, t3, running(dec.state, t3, cpu(dec.state, 20.0)))
    assert dec.state.desired == 8


def test_scale_in_disabled_keeps_capacity() -> None:
    spec, st, now = tt_state(
        4, policies=[TargetTrackingPolicy(name="p", target=50.0, scale_in_enabled=False)]
    )
    st.below_since["p"] = now - 10_000
    dec = decide(spec, st, now, running(st, now, cpu(st, 5.0)))
    assert dec.state.desired == 4
    assert codes(dec.events) == ["scale_in_disabled"]


def test_capacity_is_clamped_at_max_and_says_so() -> None:
    spec, st, now = tt_state(3, policies=[TT], max_size=3)
    dec = decide(spec, st, now, running(st, now, cpu(st, 99.0)))
    assert dec.state.desired == 3
    assert codes(dec.events) == ["at_max"]
    assert "maximum of 3" in str(dec.events[0]["reason"])


def test_any_reported_metric_can_be_tracked() -> None:
    spec = make_spec(policies=[TargetTrackingPolicy(name="rps", metric="app.rps", target=100.0)])
    st = initial_state(spec)
    in_service(st, 2, T0 - 3600)
    dec = decide(spec, st, T0, running(st, T0, {i.id: {"app.rps": 250.0} for i in st.instances}))
    assert dec.state.desired == 5


# ----- step scaling -----


def step_policy(**kw: object) -> StepScalingPolicy:
    base: dict[str, object] = {
        "name": "cpu-high",
        "alarm": Alarm(threshold=80.0, comparison=">", duration_s=180.0),
        "steps": [Step(lower=0.0, upper=10.0, adjustment=1), Step(lower=10.0, adjustment=3)],
        "cooldown_s": 120.0,
    }
    base.update(kw)
    return StepScalingPolicy(**base)  # type: ignore[arg-type]


def test_step_alarm_must_hold_for_its_duration() -> None:
    spec = make_spec(policies=[step_policy()])
    st = initial_state(spec)
    in_service(st, 2, T0 - 3600)
    seq = [(0, 85.0, 2), (120, 85.0, 2), (150, 70.0, 2), (200, 85.0, 2), (379, 85.0, 2), (380, 85.0, 3)]
    seen: list[str] = []
    for dt, v, want in seq:
        dec = decide(spec, st, T0 + dt, running(st, T0 + dt, cpu(st, v)))
        assert dec.state.desired == want, (dt, dec.events)
        seen += codes(dec.events) + [k for k in kinds(dec.events) if k != "autoscale.no_action"]
        st = dec.state
    # The break at 150 s restarted the clock; it fired 180 s after 200 s.
    assert seen == ["alarm_pending", "alarm_ok", "alarm_pending", "autoscale.scale_out"]


def test_step_bounds_pick_the_adjustment_and_cooldown_applies() -> None:
    spec = make_spec(policies=[step_policy()])
    st = initial_state(spec)
    in_service(st, 2, T0 - 3600)
    st.breach_since["cpu-high"] = T0 - 600
    dec = decide(spec, st, T0, running(st, T0, cpu(st, 95.0)))  # offset 15 -> +3
    assert dec.state.desired == 5
    st = dec.state
    dec = decide(spec, st, T0 + 60, running(st, T0 + 60, cpu(st, 95.0)))
    assert dec.state.desired == 5
    assert codes(dec.events) == ["cooldown"]
    dec = decide(spec, dec.state, T0 + 120, running(dec.state, T0 + 120, cpu(dec.state, 95.0)))
    assert dec.state.desired == 8


def test_exact_capacity() -> None:
    p = step_policy(adjustment_type="exact_capacity", steps=[Step(lower=0.0, adjustment=6)])
    spec = make_spec(policies=[p])
    st = initial_state(spec)
    in_service(st, 2, T0 - 3600)
    st.breach_since["cpu-high"] = T0 - 600
    assert decide(spec, st, T0, running(st, T0, cpu(st, 81.0))).state.desired == 6


@pytest.mark.parametrize(
    ("capacity", "percent", "magnitude", "change"),
    [
        (10, 25.0, None, 2),  # 2.5 rounds toward zero
        (2, 25.0, None, 1),  # 0.5 rounds to 1, never 0
        (4, 25.0, 3, 3),  # 1 raised to the minimum magnitude
        (10, -50.0, None, -5),
        (3, -10.0, None, -1),  # -0.3 -> -1
        (8, -25.0, 3, -3),
        (5, 0.0, 2, 0),
    ],
)
def test_percent_change_in_capacity(
    capacity: int, percent: float, magnitude: int | None, change: int
) -> None:
    assert percent_change(capacity, percent, magnitude) == change


def test_percent_step_scale_in_with_min_magnitude_through_decide() -> None:
    p = StepScalingPolicy(
        name="cpu-low",
        alarm=Alarm(threshold=30.0, comparison="<", duration_s=60.0),
        adjustment_type="percent_change_in_capacity",
        steps=[Step(upper=0.0, adjustment=-10.0)],
        min_adjustment_magnitude=2,
        cooldown_s=0.0,
    )
    spec = make_spec(policies=[p], desired=8)
    st = initial_state(spec)
    in_service(st, 8, T0 - 3600)
    st.breach_since["cpu-low"] = T0 - 120
    dec = decide(spec, st, T0, running(st, T0, cpu(st, 10.0)))
    assert dec.state.desired == 6  # -0.8 -> -1 -> magnitude 2
    assert kinds(dec.events) == ["autoscale.scale_in"]
    assert len(dec.drain) == 2


def test_target_tracking_vetoes_a_step_scale_in_while_it_is_not_below_target() -> None:
    low = StepScalingPolicy(
        name="low", alarm=Alarm(threshold=60.0, comparison="<", duration_s=0.0), steps=[Step(adjustment=-1)]
    )
    spec = make_spec(policies=[TT, low], desired=4, default_cooldown_s=0.0)
    st = initial_state(spec)
    in_service(st, 4, T0 - 3600)
    dec = decide(spec, st, T0, running(st, T0, cpu(st, 50.0)))
    assert dec.state.desired == 4
    assert "held_by_policy" in codes(dec.events)


# ----- scheduled actions -----


def test_scheduled_action_fires_at_its_cron_time_once() -> None:
    at8 = datetime(2024, 1, 8, 8, 0, tzinfo=UTC).timestamp()  # a Monday
    spec = make_spec(
        scheduled=[ScheduledAction(name="morning", cron="0 8 * * mon-fri", min_size=5, max_size=12)]
    )
    st = initial_state(spec)
    in_service(st, 2, at8 - 3600)
    dec = decide(spec, st, at8 - 30, running(st, at8 - 30))
    assert dec.state.min_size == 1
    assert not dec.events
    dec = decide(spec, dec.state, at8 - 5, running(dec.state, at8 - 5))
    assert dec.state.min_size == 1
    dec = decide(spec, dec.state, at8 + 10, running(dec.state, at8 + 10))
    assert (dec.state.min_size, dec.state.max_size, dec.state.desired) == (5, 12, 5)
    assert kinds(dec.events) == ["autoscale.scheduled"]
    assert dec.launch == 3
    assert "1/10/2 -> 5/12/5" in str(dec.events[0]["reason"])
    dec = decide(spec, dec.state, at8 + 70, running(dec.state, at8 + 70))
    assert not dec.events


def test_changed_spec_sizes_are_adopted_once() -> None:
    spec = make_spec()
    st = initial_state(spec)
    st.desired = 7  # moved by a policy since
    dec = decide(spec, st, T0, {})
    assert dec.state.desired == 7
    assert not dec.events
    spec2 = make_spec(desired=3)
    dec = decide(spec2, dec.state, T0 + 1, {})
    assert dec.state.desired == 3
    assert kinds(dec.events) == ["autoscale.capacity_set"]


# ----- health -----


def test_silent_agent_after_grace_is_replaced_and_the_launch_is_mandatory() -> None:
    spec = make_spec(desired=2, health_check_grace_s=300.0, health_check_timeout_s=60.0)
    st = initial_state(spec)
    in_service(st, 2, T0 - 1000)
    a, _b = (i.id for i in st.instances)
    obs = running(st, T0)
    obs[a] = Observation(state=InstanceState.RUNNING, last_report=T0 - 61)
    dec = decide(spec, st, T0, obs)
    assert [i.state for i in dec.state.instances] == ["unhealthy", "in_service"]
    assert dec.delete == [a]
    assert dec.launch == 1
    assert dec.mandatory_launches == 1
    ev = dec.events[0]
    assert ev["kind"] == "autoscale.replace_unhealthy"
    assert "silent for 61 s" in str(ev["reason"])


def test_no_health_verdict_on_agent_silence_within_grace() -> None:
    spec = make_spec(desired=1, health_check_grace_s=300.0)
    st = initial_state(spec)
    st.instances.append(
        Instance(
            id="i1",
            group="web",
            state="in_service",
            node_id="n1",
            launched_at=T0 - 200,
            in_service_at=T0 - 190,
        )
    )
    obs = {"i1": Observation(state=InstanceState.RUNNING, last_report=None)}
    assert decide(spec, st, T0, obs).delete == []
    assert decide(spec, st, T0 + 100, obs).delete == ["i1"]


@pytest.mark.parametrize("pstate", [InstanceState.STOPPED, InstanceState.MISSING])
def test_vm_not_running_is_replaced_even_within_grace(pstate: InstanceState) -> None:
    spec = make_spec(desired=1)
    st = initial_state(spec)
    st.instances.append(
        Instance(id="i1", group="web", state="in_service", launched_at=T0 - 5, in_service_at=T0 - 5)
    )
    dec = decide(spec, st, T0, {"i1": Observation(state=pstate)})
    assert dec.delete == ["i1"]
    assert dec.launch == 1
    assert pstate.value in str(dec.events[0]["reason"])


def test_pending_becomes_in_service_when_running() -> None:
    spec = make_spec(desired=1)
    st = initial_state(spec)
    st.instances.append(Instance(id="i1", group="web", launched_at=T0 - 20))
    dec = decide(spec, st, T0, {"i1": Observation(state=InstanceState.PENDING)})
    assert dec.state.instances[0].state == "pending"
    assert not dec.events
    dec = decide(spec, dec.state, T0 + 5, {"i1": Observation(state=InstanceState.RUNNING)})
    assert dec.state.instances[0].state == "in_service"
    assert dec.state.instances[0].in_service_at == T0 + 5
    assert kinds(dec.events) == ["autoscale.in_service"]


# ----- termination and drain -----


def inst(iid: str, launched: float, host: str) -> Instance:
    return Instance(id=iid, group="web", state="in_service", launched_at=launched, host=host)


def test_termination_policies() -> None:
    insts = [inst("a", 1, "h1"), inst("b", 2, "h2"), inst("c", 3, "h2"), inst("d", 4, "h1")]
    assert [i.id for i in choose_victims(insts, 2, "oldest")] == ["a", "b"]
    assert [i.id for i in choose_victims(insts, 2, "newest")] == ["d", "c"]
    loaded = choose_victims(insts, 3, "most_loaded_host", {"h1": 0.2, "h2": 0.9})
    assert [i.id for i in loaded] == ["b", "c", "a"]
    # Without load figures: the host with most of the group's instances first.
    insts2 = [*insts, inst("e", 5, "h2")]
    assert [i.id for i in choose_victims(insts2, 2, "most_loaded_host")] == ["b", "a"]


def test_scale_in_drains_first_then_terminates_after_the_drain() -> None:
    spec = make_spec(desired=3, drain_timeout_s=30.0)
    st = initial_state(spec)
    in_service(st, 3, T0 - 100)
    st.desired = 2
    st.spec_sizes = [1, 10, 3]
    dec = decide(spec, st, T0, running(st, T0))
    assert dec.drain == [st.instances[0].id]
    assert dec.delete == []
    victim = dec.drain[0]
    st = dec.state
    mark_draining(st, victim, T0, T0 + 30, "scale-in to 2")
    dec = decide(spec, st, T0 + 29, running(st, T0 + 29))
    assert dec.delete == []
    assert dec.launch == 0
    assert not dec.drain
    dec = decide(spec, dec.state, T0 + 30, running(dec.state, T0 + 30))
    assert dec.delete == [victim]
    assert "drain timeout reached" in next(i.reason for i in dec.state.instances if i.id == victim)
    # A load balancer that finished early ends the drain before the timeout.
    dec2 = decide(spec, st, T0 + 5, running(st, T0 + 5), drained={victim})
    assert dec2.delete == [victim]


def test_launch_failures_back_off() -> None:
    spec = make_spec(desired=2)
    st = initial_state(spec)
    assert mark_launch_failed(st, T0) == 10.0
    assert mark_launch_failed(st, T0) == 20.0
    dec = decide(spec, st, T0 + 5, {})
    assert dec.launch == 0
    assert codes(dec.events) == ["launch_backoff"]
    assert decide(spec, dec.state, T0 + 21, {}).launch == 2


def test_placement_spreads_and_respects_room() -> None:
    hosts = {
        "h1": {"vcpus": 8, "vcpus_used": 7, "memory_mib": 8192, "memory_mib_used": 0},
        "h2": {"vcpus": 8, "vcpus_used": 2, "memory_mib": 8192, "memory_mib_used": 0},
        "h3": {"vcpus": 8, "vcpus_used": 1, "memory_mib": 8192, "memory_mib_used": 8000},
    }
    assert place(2, 512, [], hosts, []) == "h2"  # h1 lacks CPUs, h3 memory
    assert place(1, 512, [], hosts, [inst("x", 1, "h2")]) == "h1"  # spread first
    assert place(1, 512, ["h3"], hosts, []) == "h3"  # nothing fits: the allowed host, provider says why
    assert place(1, 512, [], {}, []) is None


def test_state_round_trips_through_json() -> None:
    spec, st, now = tt_state(3, policies=[TT])
    dec = decide(spec, st, now, running(st, now, cpu(st, 90.0)))
    doc = msgspec.json.decode(msgspec.json.encode(dec.state))
    assert msgspec.convert(doc, GroupState) == dec.state


def test_a_metric_hovering_at_the_band_edge_does_not_flood_the_activity_history() -> None:
    spec = make_spec(policies=[TT])
    st = initial_state(spec)
    in_service(st, 2, T0 - 3600)
    quiet: list[tuple[float, str]] = []
    # Each second the average crosses the lower band edge (45) one way or the other.
    for t in range(600):
        value = 44.7 if t % 2 else 47.7
        dec = decide(spec, st, T0 + t, running(st, T0 + t, cpu(st, value)))
        quiet += [(float(t), c) for c in codes(dec.events)]
        st = dec.state
    assert {c for _, c in quiet} == {"within_tolerance", "stabilizing"}
    # Each reason at most once a minute: about 20 lines in 10 minutes, not 600.
    assert len(quiet) <= 2 * (600 // 60 + 1)
    for code in ("within_tolerance", "stabilizing"):
        times = [t for t, c in quiet if c == code]
        assert all(b - a >= 60 for a, b in itertools.pairwise(times))
