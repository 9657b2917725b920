"""The cron parser and next-fire computation (UTC)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudmon.autoscale import cron


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[arg-type,misc]


def iso(t: float | None) -> str:
    assert t is not None
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M %a")


@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        ("* * * * *", ts(2024, 1, 1, 10, 0, 30), "2024-01-01 10:01 Mon"),
        ("0 8 * * *", ts(2024, 1, 1, 8, 0), "2024-01-02 08:00 Tue"),  # strictly after
        ("0 8 * * *", ts(2024, 1, 1, 7, 59, 59), "2024-01-01 08:00 Mon"),
        ("*/15 * * * *", ts(2024, 1, 1, 10, 16), "2024-01-01 10:30 Mon"),
        ("5-10/2 * * * *", ts(2024, 1, 1, 10, 7), "2024-01-01 10:09 Mon"),
        ("5/20 * * * *", ts(2024, 1, 1, 10, 26), "2024-01-01 10:45 Mon"),
        ("0 8 * * mon-fri", ts(2024, 1, 5, 9, 0), "2024-01-08 08:00 Mon"),  # Fri after 8 -> Mon
        ("0 0 * * 7", ts(2024, 1, 1, 0, 0), "2024-01-07 00:00 Sun"),  # 7 is Sunday
        ("30 2 1,15 * *", ts(2024, 1, 2, 0, 0), "2024-01-15 02:30 Mon"),
        ("0 0 29 feb *", ts(2024, 3, 1, 0, 0), "2028-02-29 00:00 Tue"),
        ("0 12 1 jan-mar/2 *", ts(2024, 1, 2, 0, 0), "2024-03-01 12:00 Fri"),
        # Both day fields restricted: either matches (Vixie cron).
        ("0 0 13 * fri", ts(2024, 1, 1, 0, 0), "2024-01-05 00:00 Fri"),
        ("@daily", ts(2024, 12, 31, 23, 59), "2025-01-01 00:00 Wed"),
        ("@hourly", ts(2024, 1, 1, 10, 0), "2024-01-01 11:00 Mon"),
    ],
)
def test_next_fire(expr: str, after: float, expected: str) -> None:
    assert iso(cron.next_fire(expr, after)) == expected


def test_an_impossible_date_never_fires() -> None:
    assert cron.next_fire("0 0 30 2 *", ts(2024, 1, 1)) is None


@pytest.mark.parametrize(
    ("expr", "words"),
    [
        ("* * * *", "has 4 fields; use 5"),
        ("60 * * * *", "minute 60 is out of range; use 0-59"),
        ("* 24 * * *", "hour 24 is out of range"),
        ("* * 0 * *", "day-of-month 0 is out of range; use 1-31"),
        ("* * * foo *", "month 'foo' is not a number or a name"),
        ("* * * * 8", "day-of-week 8 is out of range; use 0-7"),
        ("10-5 * * * *", "runs backwards; write it as 5-10"),
        ("*/0 * * * *", "step '0' in minute must be a whole number >= 1"),
        ("1,,2 * * * *", "empty item in the minute field"),
    ],
)
def test_errors_name_the_field_and_the_fix(expr: str, words: str) -> None:
    with pytest.raises(cron.CronError) as info:
        cron.parse(expr)
    assert words in str(info.value)
    assert repr(expr) in str(info.value)


EXPRS = [
    "*/7 * * * *",
    "0 8 * * mon-fri",
    "15,45 */3 * * *",
    "0 0 1,15 * *",
    "30 6 * jun-aug sat,sun",
    "0 0 13 * 5",
]


@settings(max_examples=60, deadline=None)
@given(expr=st.sampled_from(EXPRS), after=st.integers(min_value=1_600_000_000, max_value=1_900_000_000))
def test_next_fire_is_the_first_matching_minute(expr: str, after: int) -> None:
    c = cron.parse(expr)
    t = cron.next_fire(c, after)
    assert t is not None
    assert t > after
    assert t % 60 == 0
    assert c.matches(t)
    # No matching minute in between (checked minute by minute over at most 3 days).
    m = (after // 60 + 1) * 60
    while m < min(t, after + 3 * 86400):
        assert not c.matches(m), iso(m)
        m += 60
