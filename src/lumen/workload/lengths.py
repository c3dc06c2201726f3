"""Named prompt/output length distributions.

Every distribution names its source. ``sample(n, rng)`` returns two int64 arrays (prompt tokens,
output tokens), each value >= 1.

- ``sharegpt``: ShareGPT-like. The vLLM paper (Kwon et al., "Efficient Memory Management for
  Large Language Model Serving with PagedAttention", SOSP 2023, Fig. 11a) reports mean input
  161.31 and mean output 337.99 tokens for its ShareGPT set. The paper gives means only, so we
  use independent lognormals whose means match exactly (mu = ln(mean) - sigma²/2); the shape
  sigma is OUR assumption (not from the paper): 1.0 for input, 0.8 for output, which gives
  medians ≈ 98 and ≈ 246 and a long tail like ShareGPT's histograms.
- ``splitwise-conv`` / ``splitwise-code``: fitted to the public Azure LLM inference trace 2023
  (Azure Public Dataset, CC-BY, Microsoft; Patel et al., "Splitwise", ISCA 2024), files
  ``AzureLLMInferenceTrace_conv.csv`` (19,366 requests) and ``..._code.csv`` (8,819 requests),
  columns TIMESTAMP,ContextTokens,GeneratedTokens. The length histograms are multi-modal
  (conversation prompts cluster near 400, 1020 and 4096 tokens), so a lognormal fits them badly
  (the lognormal MLE median of conversation prompts is 760 vs 1020 in the data). We store the
  trace's empirical quantile function at 27 probability knots and sample by inverse CDF with
  log-linear interpolation between knots. Prompt and output lengths are sampled independently:
  their rank correlation in the trace is negligible (Spearman 0.073 conv, -0.021 code).
  Reference statistics of the trace: conv context median 1020 / mean 1155 / p90 2734,
  generated median 129 / mean 211 / p90 424; code context median 1469 / mean 2048, generated
  median 13 / mean 28.
- ``fixed:P:O``: every request has exactly P prompt and O output tokens (smoke tests, demos).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "LengthDist",
    "LognormalLengths",
    "QuantileLengths",
    "FixedLengths",
    "LENGTH_DISTRIBUTIONS",
    "get_lengths",
]


class LengthDist:
    """Base class: a joint distribution of (prompt tokens, output tokens)."""

    name: str
    source: str

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


def _lognormal_mu(mean: float, sigma: float) -> float:
    return float(np.log(mean) - sigma * sigma / 2.0)


@dataclass(frozen=True)
class LognormalLengths(LengthDist):
    """Independent lognormal prompt and output lengths, parametrised by their means."""

    name: str
    source: str
    prompt_mean: float
    prompt_sigma: float
    output_mean: float
    output_sigma: float

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        p = rng.lognormal(_lognormal_mu(self.prompt_mean, self.prompt_sigma), self.prompt_sigma, size=n)
        o = rng.lognormal(_lognormal_mu(self.output_mean, self.output_sigma), self.output_sigma, size=n)
        return _to_tokens(p), _to_tokens(o)


@dataclass(frozen=True)
class QuantileLengths(LengthDist):
    """Independent prompt/output lengths from stored empirical quantile functions.

    ``probs`` are the knot probabilities (0 and 1 included); ``prompt_q`` / ``output_q`` the
    token counts at those probabilities. Sampling draws u ~ U(0,1) and interpolates
    log(tokens) linearly between knots, which keeps the trace's range, median and modes.
    """

    name: str
    source: str
    probs: tuple[float, ...]
    prompt_q: tuple[float, ...]
    output_q: tuple[float, ...]
    _logp: np.ndarray = field(init=False, repr=False, compare=False)
    _logo: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (len(self.probs) == len(self.prompt_q) == len(self.output_q) >= 2):
            raise ValueError("probs, prompt_q and output_q must have the same length >= 2")
        if self.probs[0] != 0.0 or self.probs[-1] != 1.0 or np.any(np.diff(self.probs) <= 0):
            raise ValueError("probs must increase strictly from 0 to 1")
        for q in (self.prompt_q, self.output_q):
            if np.any(np.diff(q) < 0) or min(q) < 1:
                raise ValueError("quantiles must be non-decreasing and >= 1")
        object.__setattr__(self, "_logp", np.log(np.asarray(self.prompt_q, dtype=np.float64)))
        object.__setattr__(self, "_logo", np.log(np.asarray(self.output_q, dtype=np.float64)))

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        probs = np.asarray(self.probs)
        u = rng.random(size=(2, n))
        p = np.exp(np.interp(u[0], probs, self._logp))
        o = np.exp(np.interp(u[1], probs, self._logo))
        return _to_tokens(p), _to_tokens(o)


@dataclass(frozen=True)
class FixedLengths(LengthDist):
    name: str
    source: str
    prompt: int
    output: int

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return np.full(n, self.prompt, dtype=np.int64), np.full(n, self.output, dtype=np.int64)


def _to_tokens(x: np.ndarray) -> np.ndarray:
    return np.maximum(np.rint(x), 1).astype(np.int64)


_VLLM_SOURCE = (
    "Kwon et al., SOSP 2023 (vLLM), Fig. 11a: ShareGPT mean input 161.31, mean output 337.99 tokens; "
    "lognormal shapes sigma=1.0/0.8 are lumen's assumption"
)
_AZURE_SOURCE = (
    "Azure LLM inference trace 2023 (Azure Public Dataset, CC-BY; Patel et al., Splitwise, ISCA 2024), "
    "{}: empirical quantiles of ContextTokens/GeneratedTokens"
)

# Knot probabilities shared by both Azure fits.
_AZURE_PROBS = (
    0.0, 0.01, 0.02, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40, 0.45, 0.50, 0.55,
    0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0,
)  # fmt: skip

# numpy.quantile (linear) of the 19,366 conversation requests.
_CONV_CONTEXT = (
    2.0, 29.0, 91.0, 181.0, 207.0, 372.0, 387.0, 396.0, 403.0, 414.0, 703.0, 984.0, 1020.0, 1045.0,
    1071.0, 1097.0, 1130.0, 1189.0, 1315.0, 1876.2, 2734.5, 4083.0, 4098.0, 4142.0, 4831.0, 6179.1, 14050.0,
)  # fmt: skip
_CONV_GENERATED = (
    7.0, 16.0, 24.0, 41.0, 54.0, 67.0, 77.0, 85.0, 91.0, 96.0, 103.0, 113.0, 129.0, 151.0,
    177.0, 217.0, 384.0, 395.0, 400.0, 411.0, 424.0, 451.0, 540.0, 601.0, 643.2, 954.0, 1000.0,
)  # fmt: skip
# numpy.quantile (linear) of the 8,819 code requests.
_CODE_CONTEXT = (
    3.0, 17.0, 35.0, 75.0, 147.0, 232.0, 385.6, 578.0, 770.0, 938.6, 1075.0, 1261.1, 1469.0, 1690.0,
    1909.0, 2163.7, 2433.0, 2744.5, 3192.4, 3920.2, 5187.6, 7303.3, 7436.0, 7436.0, 7436.0, 7437.0, 7437.0,
)  # fmt: skip
_CODE_GENERATED = (
    6.0, 6.0, 6.0, 6.0, 7.0, 7.0, 8.0, 9.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0,
    16.0, 18.0, 20.0, 24.0, 29.0, 39.0, 55.0, 90.0, 170.9, 251.5, 359.4, 825.3, 1899.0,
)  # fmt: skip

LENGTH_DISTRIBUTIONS: dict[str, LengthDist] = {
    "sharegpt": LognormalLengths("sharegpt", _VLLM_SOURCE, 161.31, 1.0, 337.99, 0.8),
    "splitwise-conv": QuantileLengths(
        "splitwise-conv", _AZURE_SOURCE.format("conversation"), _AZURE_PROBS, _CONV_CONTEXT, _CONV_GENERATED
    ),
    "splitwise-code": QuantileLengths(
        "splitwise-code", _AZURE_SOURCE.format("code"), _AZURE_PROBS, _CODE_CONTEXT, _CODE_GENERATED
    ),
}


def get_lengths(spec: str | LengthDist) -> LengthDist:
    """Resolve a distribution by name (see module doc), ``fixed:P:O``, or pass one through."""
    if isinstance(spec, LengthDist):
        return spec
    key = spec.strip().lower()
    if key in LENGTH_DISTRIBUTIONS:
        return LENGTH_DISTRIBUTIONS[key]
    if key.startswith("fixed:"):
        parts = key.split(":")
        try:
            p, o = int(parts[1]), int(parts[2])
            if len(parts) != 3 or p < 1 or o < 1:
                raise ValueError
        except (ValueError, IndexError):
            raise ValueError(f"bad fixed length spec {spec!r}; expected fixed:PROMPT:OUTPUT, both >= 1") from None
        return FixedLengths(key, "fixed", p, o)
    names = ", ".join([*LENGTH_DISTRIBUTIONS, "fixed:P:O"])
    raise ValueError(f"unknown length distribution {spec!r}; choose one of: {names}")
