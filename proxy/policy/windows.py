"""Time windows: a call is taken only between two local times of day (clock passed in)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class TimeWindow:
    """[start, end) in minutes after local midnight; end <= start spans midnight."""

    start_min: int
    end_min: int
    tz: ZoneInfo

    @classmethod
    def parse(cls, start: str, end: str, tz: str) -> TimeWindow:
        return cls(_minutes(start), _minutes(end), ZoneInfo(tz))

    def allows(self, wall: float) -> bool:
        """Whether `wall` (unix seconds) falls inside the window, in the window's zone."""
        local = datetime.fromtimestamp(wall, self.tz)
        minute = local.hour * 60 + local.minute
        if self.start_min < self.end_min:
            return self.start_min <= minute < self.end_min
        return minute >= self.start_min or minute < self.end_min


def _minutes(text: str) -> int:
    hours, _, minutes = text.partition(":")
    return int(hours) * 60 + int(minutes)
