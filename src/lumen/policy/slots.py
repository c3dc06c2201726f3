"""Time-division device shares: the workers that share one device take turns in fixed slots.

Why: where N workers share a device (one GPU, or the cores of one CPU box) and use it freely, a dead
worker's share goes to the survivors, which then serve faster; a failure costs no capacity and no
recovery comparison means anything (DESIGN.md section 5). With slots, worker `index` of `count` may
start device work only inside its own slot of a cycle of `count` slots of `slot_s` seconds, and a slot
whose owner is dead, hung, loading or idle stays empty: N workers on one device behave as N devices of
1/N speed, and losing one costs exactly 1/N of the capacity.

The schedule is a pure function of a clock shared by every process of the host (CLOCK_MONOTONIC,
Python's `time.monotonic`), the worker's index among those sharing its device and the slot length:
no messages are needed to agree on it, and a restarted incarnation keeps its index and so its slot.
The simulator drives its workers with the same functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Within this fraction of its slot's beginning any step may start, fitting or not (and overrun, counted).
# Otherwise a step longer than a slot could never start, and one just shorter only in the first
# (slot - step) of its slot: a 69 ms step in a 70 ms slot in its first millisecond, which a worker's
# loop misses cycle after cycle (a restarted H100 worker never served, 2026-12-07)
LONG_STEP_START_FRACTION = 0.1
# The default slot length holds this many decode steps (a slot that holds ~3 left a quarter of it idle
# in the issue-23 probe: a step that does not fit waits for the next slot)
STEPS_PER_SLOT = 8
MIN_SLOT_S = 0.02
MAX_SLOT_S = 0.5
DEVICE_SHARES = ("auto", "shared", "slots")


@dataclass(frozen=True, slots=True)
class SlotSchedule:
    index: int      # this worker's position among the workers that share its device
    count: int      # how many share it (the dead ones included: their slots stay empty)
    slot_s: float   # slot length, seconds

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"slot index {self.index} out of range for {self.count} workers")
        if not (self.slot_s > 0 and math.isfinite(self.slot_s)):
            raise ValueError("slot length must be positive and finite")

    @property
    def cycle_s(self) -> float:
        return self.count * self.slot_s

    def _slot_number(self, t: float) -> int:
        """The k with k * slot_s <= t < (k + 1) * slot_s, boundaries as `window` computes them (t // slot_s
        alone can disagree with k * slot_s by a rounding)."""
        k = int(t // self.slot_s)
        if k * self.slot_s > t:
            k -= 1
        elif (k + 1) * self.slot_s <= t:
            k += 1
        return k

    def owner(self, t: float) -> int:
        """The index of the worker whose slot holds instant t (exactly one, for every t)."""
        return self._slot_number(t) % self.count

    def window(self, t: float) -> tuple[float, float]:
        """This worker's slot that holds t, or else its next one: (start, end), end > t."""
        k = self._slot_number(t)
        k += (self.index - k) % self.count  # the first slot number >= k that is ours
        return k * self.slot_s, (k + 1) * self.slot_s

    def start_at(self, t: float, step_s: float) -> float:
        """The earliest instant >= t at which a device step expected to take `step_s` may start: now if
        it fits in what is left of this worker's current slot, or whatever its length if now is near the
        slot's start (LONG_STEP_START_FRACTION: a step that does not fit overruns least there); else the
        start of its next slot."""
        start, end = self.window(t)
        now = max(t, start)
        if now + step_s <= end or now - start <= LONG_STEP_START_FRACTION * self.slot_s:
            return now
        return self.window(end)[0]  # the next slot of this worker's

    def wait_s(self, t: float, step_s: float) -> float:
        """How long to wait from t before starting a step of `step_s` (0: start now)."""
        return self.start_at(t, step_s) - t

    def overrun_s(self, started: float, ended: float) -> float:
        """How far a step that started at `started` (inside this worker's slot) ran past that slot's end."""
        return max(0.0, ended - self.window(started)[1])


def share_groups(devices: list[str]) -> list[tuple[int, int]]:
    """(index, count) of each worker among the workers on the same device, for workers assigned
    `devices[i]` in order; a worker alone on its device gets (0, 1)."""
    seen: dict[str, int] = {}
    index = []
    for d in devices:
        index.append(seen.get(d, 0))
        seen[d] = index[-1] + 1
    return [(i, seen[d]) for i, d in zip(index, devices, strict=True)]


def resolve_device_share(mode: str, max_workers_per_device: int) -> str:
    """'auto' means slots where any device is shared by several workers, else shared (which then equals
    one device per worker: the multi-GPU path, unchanged)."""
    if mode not in DEVICE_SHARES:
        raise ValueError(f"unknown device share {mode!r}: use one of {', '.join(DEVICE_SHARES)}")
    if mode == "auto":
        return "slots" if max_workers_per_device > 1 else "shared"
    return mode


def default_slot_s(decode_step_s: float, steps_per_slot: int = STEPS_PER_SLOT) -> float:
    """A slot that holds `steps_per_slot` decode steps of the expected length, within
    [MIN_SLOT_S, MAX_SLOT_S], rounded to the millisecond. Longer slots waste less at their ends (a step
    that does not fit waits for the next slot) but add up to (N-1) slots to a new request's wait."""
    if not decode_step_s > 0:
        raise ValueError("decode step time must be positive")
    return round(min(MAX_SLOT_S, max(MIN_SLOT_S, steps_per_slot * decode_step_s)), 3)
