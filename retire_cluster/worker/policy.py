"""The owner's rules for lending the device: when it may take new tasks.

Theory of operation: every few seconds the agent feeds fresh :class:`Readings`
and the local time to :meth:`OwnerPolicy.evaluate`, which answers accepting or
not, and why. Each rule has hysteresis: it stops the device at its threshold
but lets it go again only once the reading is back past the threshold by a
margin (battery +5 points, temperature -2 degrees, owner CPU -10 points), so a
phone hovering at 20 % battery does not flap in and out of the cluster.

A reading the platform cannot give (None) never blocks: a desktop with no
battery is treated as on mains power. No I/O and no clock here.
Python 3.9 syntax and the standard library only.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

__all__ = ["Decision", "OwnerPolicy", "PolicyConfig", "Readings", "parse_hours"]


#: ``H:MM-H:MM`` or ``HH:MM-HH:MM``, 24-hour local time, spaces around the dash allowed.
_HOURS = re.compile(r"\s*([0-9]{1,2}):([0-9]{2})\s*-\s*([0-9]{1,2}):([0-9]{2})\s*")


def parse_hours(text: str) -> Tuple[dt.time, dt.time]:
    """``22:00-07:00`` to (start, end); the window may wrap past midnight.

    Parsed here, not by ``time.fromisoformat``: that took ``22-07``,
    ``2200-0700`` (3.11+ only) and seconds, and a UTC offset (``22:00+01:00``)
    gave an aware time that crashed the first comparison with the clock.

    Raises:
        ValueError: with a sentence saying the expected form.
    """
    match = _HOURS.fullmatch(text)
    hh1, mm1, hh2, mm2 = (int(g) for g in match.groups()) if match else (99, 0, 99, 0)
    if max(hh1, hh2) > 23 or max(mm1, mm2) > 59:
        raise ValueError(f"--hours {text!r}: use HH:MM-HH:MM in 24-hour local time, e.g. 22:00-07:00.")
    start, end = dt.time(hh1, mm1), dt.time(hh2, mm2)
    if start == end:
        raise ValueError(f"--hours {text!r}: start and end are equal; leave --hours out to allow all day.")
    return start, end


def in_window(now: dt.time, window: Tuple[dt.time, dt.time]) -> bool:
    start, end = window
    if start < end:
        return start <= now < end
    return now >= start or now < end


@dataclass
class PolicyConfig:
    """The owner's settings (all off by default: the device is always lent)."""

    only_when_charging: bool = False
    min_battery_pct: Optional[float] = None
    max_battery_temp_c: Optional[float] = None
    max_owner_cpu_pct: Optional[float] = None
    hours: Optional[Tuple[dt.time, dt.time]] = None
    evict: bool = False
    battery_margin_pct: float = 5.0
    temp_margin_c: float = 2.0
    cpu_margin_pct: float = 10.0

    def __post_init__(self) -> None:
        if self.min_battery_pct is not None and not 0 <= self.min_battery_pct <= 100:
            raise ValueError("--min-battery must be a percentage from 0 to 100.")
        if self.max_battery_temp_c is not None and not 0 <= self.max_battery_temp_c <= 100:  # NaN too
            raise ValueError("--max-battery-temp must be a temperature in degrees C from 0 to 100.")
        if self.max_owner_cpu_pct is not None and not 0 < self.max_owner_cpu_pct <= 100:
            raise ValueError("--max-owner-cpu must be a percentage from 1 to 100.")

    @property
    def active(self) -> bool:
        return bool(
            self.only_when_charging
            or self.min_battery_pct is not None
            or self.max_battery_temp_c is not None
            or self.max_owner_cpu_pct is not None
            or self.hours is not None
        )


@dataclass
class Readings:
    """What the profiler could measure; None means unknown."""

    battery_pct: Optional[float] = None
    charging: Optional[bool] = None
    battery_temp_c: Optional[float] = None
    owner_cpu_pct: Optional[float] = None


@dataclass
class Decision:
    accepting: bool
    reason: Optional[str] = None


def _over_limit(value: Optional[float], limit: Optional[float], over: str, recovering: str, margin: float) -> str:
    """Why a max-rule blocks: over its limit now, or back under it but not yet past its margin
    (hysteresis), or its reading went unknown while it blocked."""
    assert limit is not None  # the rule is set
    if value is not None and value > limit:
        return over.format(f"{value:g}", f"{limit:g}")
    return recovering.format(f"{limit + margin:g}", f"{limit:g}")


@dataclass
class OwnerPolicy:
    """Evaluates :class:`PolicyConfig` with per-rule hysteresis."""

    config: PolicyConfig
    _blocked: Dict[str, bool] = field(default_factory=dict)

    def evaluate(self, readings: Readings, local_time: dt.time) -> Decision:
        """Whether the device may take new tasks now, and if not, the first reason."""
        c, r = self.config, readings
        reasons = []
        if c.hours is not None and not in_window(local_time, c.hours):
            reasons.append(f"outside --hours {c.hours[0]:%H:%M}-{c.hours[1]:%H:%M}")
        if c.only_when_charging and r.charging is False:
            reasons.append("not charging (--only-when-charging)")
        if self._rule("battery", c.min_battery_pct, r.battery_pct,
                      block=lambda v, t: v < t, release=lambda v, t: v >= t + c.battery_margin_pct):
            reasons.append(f"battery {r.battery_pct:g}% below --min-battery {c.min_battery_pct:g}%"
                           if r.battery_pct is not None and c.min_battery_pct is not None
                           and r.battery_pct < c.min_battery_pct
                           else f"battery recovering to {c.min_battery_pct + c.battery_margin_pct:g}%"
                           if c.min_battery_pct is not None else "battery low")
        if self._rule("temp", c.max_battery_temp_c, r.battery_temp_c,
                      block=lambda v, t: v > t, release=lambda v, t: v <= t - c.temp_margin_c):
            reasons.append(_over_limit(r.battery_temp_c, c.max_battery_temp_c, "battery at {} C, limit "
                                       "--max-battery-temp {} C", "battery cooling to {} C (--max-battery-temp {} C)",
                                       -c.temp_margin_c))
        if self._rule("cpu", c.max_owner_cpu_pct, r.owner_cpu_pct,
                      block=lambda v, t: v > t, release=lambda v, t: v < t - c.cpu_margin_pct):
            reasons.append(_over_limit(r.owner_cpu_pct, c.max_owner_cpu_pct, "owner using {}% CPU, limit "
                                       "--max-owner-cpu {}%", "owner CPU settling below {}% (--max-owner-cpu {}%)",
                                       -c.cpu_margin_pct))
        if reasons:
            return Decision(False, "; ".join(reasons))
        return Decision(True)

    def _rule(self, name: str, threshold: Optional[float], value: Optional[float], *,
              block: Callable[[float, float], bool], release: Callable[[float, float], bool]) -> bool:
        """Whether rule ``name`` blocks now, updating its hysteresis state."""
        if threshold is None:
            return False
        blocked = self._blocked.get(name, False)
        if value is None:
            return blocked  # unknown: keep the last state (initially not blocking)
        if blocked and release(value, threshold):
            blocked = False
        elif not blocked and block(value, threshold):
            blocked = True
        self._blocked[name] = blocked
        return blocked
