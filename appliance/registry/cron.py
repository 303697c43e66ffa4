"""When a schedule is due: `--every 7d` intervals and five-field cron expressions, in UTC. Pure functions.

    parse_cron("30 2 * * 1")            # 02:30 UTC every Monday
    next_cron_time(cron, after)         # the first matching minute strictly after `after`
    parse_every("7d") -> 604800         # m, h, d or w; at least one minute

Cron fields are minute, hour, day of month, month, day of week (0 or 7 = Sunday), each `*`, a
number, a range `a-b`, a list `a,b`, or a step `*/n` / `a-b/n`. As in Vixie cron, when both day
fields are restricted a day matches either. Names (MON, JAN) and `@daily` are not accepted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from appliance.errors import AirlockError

_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))
_EVERY = re.compile(r"(\d{1,6})([mhdw])")
_UNIT_S = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
SEARCH_YEARS = 5


class ScheduleSpecError(AirlockError):
    """An --every interval or a --cron expression is not valid."""


@dataclass(frozen=True)
class Cron:
    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    """0 = Sunday ... 6 = Saturday (7 is folded into 0)."""
    days_restricted: bool
    weekdays_restricted: bool

    def matches_day(self, when: datetime) -> bool:
        in_days = when.day in self.days
        in_weekdays = (when.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return in_days or in_weekdays
        return in_days and in_weekdays


def parse_every(text: str) -> int:
    match = _EVERY.fullmatch(text.strip().lower())
    if not match or int(match.group(1)) == 0:
        raise ScheduleSpecError(f"--every {text!r} is not an interval", hint="a number and a unit: 30m, 12h, 7d or 2w")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


def _field(text: str, name: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        body, _, step_text = part.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if body == "*":
                first, last = low, high
            elif "-" in body:
                first, last = (int(x) for x in body.split("-", 1))
            else:
                first = last = int(body)
        except ValueError:
            raise ScheduleSpecError(f"cron {name} field {text!r} is not understood",
                                    hint="use *, a number, a-b, a,b or */n, e.g. \"30 2 * * 1\"") from None
        if step < 1 or not low <= first <= last <= high:
            raise ScheduleSpecError(f"cron {name} field {text!r} is outside {low}-{high}",
                                    hint="e.g. \"30 2 * * 1\" is 02:30 UTC every Monday")
        values.update(range(first, last + 1, step))
    return frozenset(values)


def parse_cron(text: str) -> Cron:
    parts = text.split()
    if len(parts) != 5:
        raise ScheduleSpecError(f"cron expression {text!r} has {len(parts)} fields, not 5",
                                hint="minute hour day-of-month month day-of-week, e.g. \"30 2 * * 1\" (UTC)")
    sets = [_field(p, name, low, high) for p, (name, low, high) in zip(parts, _FIELDS, strict=True)]
    weekdays = frozenset(d % 7 for d in sets[4])
    cron = Cron(" ".join(parts), sets[0], sets[1], sets[2], sets[3], weekdays, parts[2] != "*", parts[4] != "*")
    if next_cron_time(cron, datetime(2000, 1, 1)) is None:
        raise ScheduleSpecError(f"cron expression {text!r} never matches a real date",
                                hint="check the day of month against the month (there is no 30 February)")
    return cron


def next_cron_time(cron: Cron, after: datetime) -> datetime | None:
    """The first minute strictly after `after` that matches, or None within SEARCH_YEARS (an impossible date)."""
    when = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    limit = after + timedelta(days=366 * SEARCH_YEARS)
    while when <= limit:
        if when.month not in cron.months:
            year, month = (when.year + 1, 1) if when.month == 12 else (when.year, when.month + 1)
            when = when.replace(year=year, month=month, day=1, hour=0, minute=0)
        elif not cron.matches_day(when):
            when = (when + timedelta(days=1)).replace(hour=0, minute=0)
        elif when.hour not in cron.hours:
            when = (when + timedelta(hours=1)).replace(minute=0)
        elif when.minute not in cron.minutes:
            when += timedelta(minutes=1)
        else:
            return when
    return None
