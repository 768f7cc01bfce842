"""Time for the supervisor: a clock it reads (tests set their own) and the cron schedules of
``SCHEDULED`` deployments.

The cron dialect is the classic five fields, ``minute hour day-of-month month day-of-week``, each
``*``, a number, a range ``a-b``, a step ``*/n`` or ``a-b/n``, or a comma list of those; months and
days of the week may be named (``jan``, ``mon``); day of week 0 and 7 are Sunday. As in Vixie cron,
when both day fields are restricted a day matching either runs. Written here rather than adding a
dependency (croniter, the usual package, changed hands in 2024-2025 after its author stepped away):
the dialect above is fifty lines.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from r1serve.errors import InvalidRequest


class Clock:
    """The wall clock, UTC. The supervisor reads time only through this, so a test can move it."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)


class ManualClock(Clock):
    """A clock that moves only when told to (tests)."""

    def __init__(self, start: dt.datetime) -> None:
        self._now = start

    def now(self) -> dt.datetime:
        return self._now

    def set(self, value: dt.datetime) -> None:
        self._now = value

    def advance(self, **delta: float) -> None:
        self._now += dt.timedelta(**delta)


_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# (name, lowest, highest, names mapped to numbers)
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, {m: i + 1 for i, m in enumerate(_MONTHS)}),
    ("day of week", 0, 7, {d: i for i, d in enumerate(_DAYS)}),
)
_HORIZON_DAYS = 366 * 5  # a schedule that matches no day in five years (``0 0 30 2 *``) never runs


def _bad(text: str, why: str) -> InvalidRequest:
    return InvalidRequest(
        f"schedule `{text}` is not a valid cron expression: {why} "
        "(five fields: minute hour day-of-month month day-of-week, e.g. `0 9 * * mon-fri`)",
        param="schedule",
        code="invalid_value",
    )


def _number(token: str, names: dict[str, int], text: str, field: str) -> int:
    token = token.lower()
    if token in names:
        return names[token]
    if not token.isdigit():
        raise _bad(text, f"`{token}` in the {field} field is not a number")
    return int(token)


def _parse_field(part: str, index: int, text: str) -> frozenset[int]:
    field, low, high, names = _FIELDS[index]
    values: set[int] = set()
    for item in part.split(","):
        body, _, step_text = item.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise _bad(text, f"step `{step_text}` in the {field} field must be a positive number")
            step = int(step_text)
        if body == "*":
            start, end = low, high
        elif "-" in body:
            a, _, b = body.partition("-")
            start, end = _number(a, names, text, field), _number(b, names, text, field)
        else:
            start = _number(body, names, text, field)
            end = high if step_text else start
        if not (low <= start <= high and low <= end <= high) or start > end:
            raise _bad(text, f"`{item}` is outside {low}-{high} in the {field} field")
        values.update(range(start, end + 1, step))
    if index == 4 and 7 in values:  # Sunday is 0 and 7
        values = (values - {7}) | {0}
    return frozenset(values)


@dataclass(frozen=True)
class Cron:
    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool  # the day-of-month field is `*`
    any_weekday: bool  # the day-of-week field is `*`

    @classmethod
    def parse(cls, text: str) -> Cron:
        parts = text.split()
        if len(parts) != 5:
            raise _bad(text, f"it has {len(parts)} fields, not 5")
        m, h, dom, mon, dow = (_parse_field(p, i, text) for i, p in enumerate(parts))
        return cls(text, m, h, dom, mon, dow, any_day=parts[2] == "*", any_weekday=parts[4] == "*")

    def _day_matches(self, day: dt.date) -> bool:
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow

    def next_after(self, after: dt.datetime) -> dt.datetime | None:
        """The first minute strictly after ``after`` (UTC) that the schedule names, or None."""
        start = after.astimezone(dt.UTC).replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
        day = start.date()
        for _ in range(_HORIZON_DAYS):
            if self._day_matches(day):
                first = start if day == start.date() else None
                for hour in sorted(self.hours):
                    if first is not None and hour < first.hour:
                        continue
                    for minute in sorted(self.minutes):
                        if first is not None and hour == first.hour and minute < first.minute:
                            continue
                        return dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=dt.UTC)
            day += dt.timedelta(days=1)
        return None
