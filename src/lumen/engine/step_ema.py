"""A time slot admits a step only where its expected time fits what is left of the slot, and a step that
prefills costs many times one that only decodes: so the expected time is kept per kind, an EMA of each.
The engine times its steps this way, and the drafter its rounds."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepEma:
    prefill_s: float = 0.0  # EMA of the wall time of steps that ran prefill work (0: none measured)
    decode_s: float = 0.0   # EMA of the wall time of decode-only steps

    def observe(self, dt: float, prefill: bool) -> None:
        if prefill:
            self.prefill_s = _ema(self.prefill_s, dt)
        else:
            self.decode_s = _ema(self.decode_s, dt)

    def expected(self, prefill: bool) -> float:
        """The expected time of a step of that kind; the other kind's while this one was never measured
        (0: neither was)."""
        return (self.prefill_s or self.decode_s) if prefill else (self.decode_s or self.prefill_s)


def _ema(prev: float, x: float) -> float:
    return x if not prev else 0.8 * prev + 0.2 * x  # the newest measurement weighs 0.2
