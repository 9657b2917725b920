"""A small 5-field cron parser and matcher for scheduled scaling actions (UTC).

Fields: ``minute hour day-of-month month day-of-week``, each ``*``, a number,
a range ``a-b``, a list ``a,b,c`` and steps ``*/n`` or ``a-b/n``.  Months and
weekdays also take names (``jan``, ``mon``); day-of-week 0 and 7 are Sunday.
As in Vixie cron (and AWS scheduled actions), when both day-of-month and
day-of-week are restricted a day matches if *either* does.  The shortcuts
``@hourly``, ``@daily``, ``@weekly``, ``@monthly`` and ``@yearly`` are known.

Plain functions on plain data: no clock of their own.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_MONTHS = {m.lower(): i for i, m in enumerate(calendar.month_abbr) if m}
_DAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_SHORTCUTS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day-of-month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day-of-week", 0, 7, _DAYS),
)
# How far ahead next_fire looks: a "31 2 *" (Feb 31st) never fires; 8 years
# covers every leap-year combination of a valid expression.
_HORIZON_DAYS = 366 * 8


class CronError(ValueError):
    """A cron expression that cannot be parsed; the text says which field and how to fix it."""


@dataclass(frozen=True, slots=True)
class Cron:
    """A parsed expression: the allowed values of each field."""

    expr: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday .. 6 = Saturday
    days_restricted: bool
    weekdays_restricted: bool

    def day_matches(self, day: datetime) -> bool:
        """Whether the calendar day (UTC) matches the day-of-month/day-of-week/month fields."""
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return dom or dow
        return dom and dow

    def matches(self, ts: float) -> bool:
        """Whether the minute holding UNIX time ``ts`` matches."""
        t = datetime.fromtimestamp(ts, UTC)
        return t.minute in self.minutes and t.hour in self.hours and self.day_matches(t)


def _value(text: str, name: str, lo: int, hi: int, names: dict[str, int], expr: str) -> int:
    key = text.lower()
    if key in names:
        return names[key]
    try:
        v = int(text)
    except ValueError:
        hint = f" or a name ({', '.join(names)})" if names else ""
        raise CronError(f"cron {expr!r}: {name} {text!r} is not a number{hint}; use {lo}-{hi}") from None
    if not lo <= v <= hi:
        raise CronError(f"cron {expr!r}: {name} {v} is out of range; use {lo}-{hi}")
    return v


def _field(text: str, name: str, lo: int, hi: int, names: dict[str, int], expr: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        if not part:
            raise CronError(f"cron {expr!r}: empty item in the {name} field {text!r}; remove the extra comma")
        rng, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) < 1:
                raise CronError(f"cron {expr!r}: step {step_text!r} in {name} must be a whole number >= 1")
            step = int(step_text)
        if rng == "*":
            a, b = lo, hi
        elif "-" in rng:
            left, _, right = rng.partition("-")
            a = _value(left, name, lo, hi, names, expr)
            b = _value(right, name, lo, hi, names, expr)
            if a > b:
                raise CronError(f"cron {expr!r}: range {rng!r} in {name} runs backwards; write it as {b}-{a}")
        else:
            a = _value(rng, name, lo, hi, names, expr)
            # "5/15" means from 5 to the end, every 15 (as Vixie cron reads it).
            b = hi if slash else a
        out.update(range(a, b + 1, step))
    return out


def parse(expr: str) -> Cron:
    """Parse a 5-field cron expression (or a shortcut); :class:`CronError` names the bad field."""
    if not isinstance(expr, str):
        raise CronError(f"cron expression must be a string, got {type(expr).__name__}")
    text = _SHORTCUTS.get(expr.strip().lower(), expr.strip())
    parts = text.split()
    if len(parts) != 5:
        raise CronError(
            f"cron {expr!r}: has {len(parts)} fields; use 5 (minute hour day-of-month month day-of-week), "
            "e.g. '0 8 * * mon-fri'"
        )
    sets = [_field(p, n, lo, hi, names, expr) for p, (n, lo, hi, names) in zip(parts, _FIELDS, strict=True)]
    weekdays = {d % 7 for d in sets[4]}
    return Cron(
        expr=expr,
        minutes=frozenset(sets[0]),
        hours=frozenset(sets[1]),
        days=frozenset(sets[2]),
        months=frozenset(sets[3]),
        weekdays=frozenset(weekdays),
        days_restricted=parts[2] != "*",
        weekdays_restricted=parts[4] != "*",
    )


def next_fire(cron: Cron | str, after: float) -> float | None:
    """The first whole minute strictly after ``after`` (UNIX seconds) that matches, or ``None``
    if the expression never matches (e.g. February 30th)."""
    c = parse(cron) if isinstance(cron, str) else cron
    start = datetime.fromtimestamp(after, UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
    day = start.replace(hour=0, minute=0)
    hours = sorted(c.hours)
    minutes = sorted(c.minutes)
    for i in range(_HORIZON_DAYS):
        d = day + timedelta(days=i)
        if not c.day_matches(d):
            continue
        for h in hours:
            for m in minutes:
                t = d.replace(hour=h, minute=m)
                if t >= start:
                    return t.timestamp()
    return None
