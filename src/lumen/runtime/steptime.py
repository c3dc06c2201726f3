"""A worker's step-time model, fitted from its own recent engine steps and kept current.

The goodput rule of mechanism 3 (lumen.policy.speculation) needs the marginal cost of a verify
position on this worker now. The model is the simulator's fitted form (`policy.fit_step_time`, as
`lumen profile` fits it), refitted on a sliding window of the worker's last steps: it follows
whatever shares the device (time slots, other processes, clocks) without a profile run.
"""

from __future__ import annotations

from collections import deque

from ..policy import LinearStepTime, fit_step_time

WINDOW = 512        # steps the fit looks at
REFIT_EVERY = 64    # new steps between refits (a fit of 512 rows is ~1 ms)
MIN_ROWS = 32       # fewer than this: no model yet (the rule then does not speculate)


class LiveStepTime:
    def __init__(self, window: int = WINDOW, refit_every: int = REFIT_EVERY, min_rows: int = MIN_ROWS):
        self.rows: deque[tuple[float, float, float, float, float]] = deque(maxlen=window)
        self.refit_every, self.min_rows = refit_every, min_rows
        self._new = 0
        self._model: LinearStepTime | None = None
        self._last: object = None

    def record(self, step: dict) -> None:
        """One engine step (`Engine.last_step`, a new dict per step: the same one twice is skipped);
        decode positions count verify tokens too."""
        if not step or step is self._last:
            return
        self._last = step
        t = step.get("step_time_s", 0.0)
        if t > 0:
            seqs = step.get("num_decode_seqs", 0)
            d = step.get("num_decode_tokens", seqs)
            self.rows.append((step["num_prefill_tokens"], d, step["total_context_tokens"], t, seqs))
            self._new += 1

    def model(self) -> LinearStepTime | None:
        if len(self.rows) >= self.min_rows and (self._model is None or self._new >= self.refit_every):
            try:
                fit = fit_step_time(self.rows)
            except ValueError:
                return self._model
            # a window that cannot tell what a position costs (no prefill to price it by, no verify
            # step): keep the last model that could (or none: the verifier explores)
            if fit.coef[2] > 0.0:
                self._model = fit
            self._new = 0
        return self._model

    def coef(self) -> list[float] | None:
        """c0..c5 of the model (c5: per decoding sequence), or None."""
        m = self.model()
        return None if m is None else [*(float(c) for c in m.coef), float(m.seq_coef)]
