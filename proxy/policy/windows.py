"""Time windows: a call is taken only between two local times of day (clock passed in)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo


@dataclass
class TimeWindow:
    """[start, end) in minutes after local midnight; end <= start spans midnight."""

    start_min: int
    end_min: int
    tz: ZoneInfo
    # the answer changes once a minute at most (zone offsets are whole minutes): the last
    # minute asked and its answer
    _minute: int = field(default=-1, repr=False, compare=False)
    _allowed: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def parse(cls, start: str, end: str, tz: str) -> TimeWindow:
        return cls(_minutes(start), _minutes(end), ZoneInfo(tz))

    @classmethod
    def from_binding(cls, text: str) -> TimeWindow:
        """A binding's `time_window` ("08:00-22:00" or "08:00-22:00 Europe/Berlin", checked
        by proxy.bindings.model.check_time_window; default zone Asia/Shanghai)."""
        span, _, zone = text.strip().partition(" ")
        start, _, end = span.partition("-")
        return cls.parse(start, end, zone or "Asia/Shanghai")

    def allows(self, wall: float) -> bool:
        """Whether `wall` (unix seconds) falls inside the window, in the window's zone."""
        minute = int(wall // 60)
        if minute != self._minute:
            self._allowed = self._compute(wall)
            self._minute = minute
        return self._allowed

    def _compute(self, wall: float) -> bool:
        local = datetime.fromtimestamp(wall, self.tz)
        minute = local.hour * 60 + local.minute
        if self.start_min < self.end_min:
            return self.start_min <= minute < self.end_min
        return minute >= self.start_min or minute < self.end_min


def _minutes(text: str) -> int:
    hours, _, minutes = text.partition(":")
    return int(hours) * 60 + int(minutes)
