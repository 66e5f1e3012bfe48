"""An iteration's device time, predicted from its shape and fitted online to what the worker
measures; and the safety margin the SLO budget keeps, learned from the predictions it misses.

    time_ms = b0 + b1 * prefill tokens + b2 * prefill attention work + b3 * chunks
                 + b4 * decodes + b5 * KV tokens the decodes read

Every coefficient is fitted, none is set by hand: the matmuls scale with the tokens that pass
through them (prefill tokens, and one per decode), decode attention with the KV it reads, prefill
attention with chunk length times context (the pairs it scores), and each chunk or decode adds
per-sequence work (planning, gathers). The fit is non-negative least squares, so the prediction
can only grow with any of them, which is what the budget search relies on.

The samples are a window of recent iterations plus anchors: the start-up profile (or the first
iterations served when there was none). Anchors are never forgotten, so a direction the recent
traffic does not excite (say, hours of decode-only iterations) keeps what the profile measured
instead of decaying to zero and letting the budget run to its cap. Outliers (a step that waited
for a noisy neighbour) are down-weighted (Huber) in the fit; the margin, not the fit, covers them.

Pure: numpy only, no I/O, no clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

FEATURES = ("fixed", "prefill_tokens", "prefill_attention", "chunks", "decodes", "decode_kv")


@dataclass(frozen=True)
class IterationShape:
    """What an iteration computes, as far as its time goes."""

    prefill_tokens: int = 0
    prefill_attention: int = 0    # sum over chunks of chunk length x context after the chunk
    num_chunks: int = 0
    num_decodes: int = 0
    decode_kv_tokens: int = 0     # sum over decodes of the context each one reads

    def with_chunk(self, num_computed: int, num_tokens: int) -> IterationShape:
        """This shape plus a prefill chunk of num_tokens after num_computed tokens."""
        return IterationShape(self.prefill_tokens + num_tokens,
                              self.prefill_attention + num_tokens * (num_computed + num_tokens),
                              self.num_chunks + 1, self.num_decodes, self.decode_kv_tokens)

    def with_decode(self, context: int) -> IterationShape:
        """This shape plus a decode whose token attends to context tokens (itself included)."""
        return IterationShape(self.prefill_tokens, self.prefill_attention, self.num_chunks,
                              self.num_decodes + 1, self.decode_kv_tokens + context)

    @property
    def is_empty(self) -> bool:
        return self.num_chunks == 0 and self.num_decodes == 0

    def features(self) -> np.ndarray:
        return np.array([1.0, self.prefill_tokens, self.prefill_attention, self.num_chunks,
                         self.num_decodes, self.decode_kv_tokens], dtype=np.float64)


def nnls(gram: np.ndarray, rhs: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """argmin_{b >= 0} b'Gb - 2 h'b for a positive definite G: Lawson and Hanson's active set
    on the normal equations (a few small solves for a handful of unknowns)."""
    d = len(rhs)
    free = np.zeros(d, dtype=bool)      # coefficients allowed off zero
    b = np.zeros(d)
    for _ in range(3 * d):
        gradient = rhs - gram @ b
        if free.all() or gradient[~free].max() <= tol * max(1.0, np.abs(rhs).max()):
            break
        free[np.argmax(np.where(free, -np.inf, gradient))] = True
        while True:
            trial = np.zeros(d)
            trial[free] = np.linalg.solve(gram[np.ix_(free, free)], rhs[free])
            if (trial[free] > 0).all():
                b = trial
                break
            # Step towards the trial until the first coefficient reaches zero; drop it.
            shrinking = free & (trial <= 0)
            alpha = np.min(b[shrinking] / np.maximum(b[shrinking] - trial[shrinking], 1e-300))
            b = b + alpha * (trial - b)
            free &= b > tol
            b[~free] = 0.0
            if not free.any():
                break
    return b


def fit_nonnegative(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None, *,
                    ridge: float = 1e-6, huber: float = 2.0, rounds: int = 3) -> np.ndarray:
    """Non-negative, outlier-robust least squares: coefficients b >= 0 with x @ b ~ y.

    Columns are scaled to unit weighted RMS before solving (so that a feature counted in
    millions and one counted in units weigh alike; b >= 0 survives a positive scale), with a
    small ridge for the collinear ones. Then a few rounds of Huber reweighting: residuals beyond
    huber x the robust spread (MAD) weigh in proportion to the inverse of their size."""
    n, d = x.shape
    w0 = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    scale = np.sqrt((w0[:, None] * x * x).sum(axis=0) / max(w0.sum(), 1e-12))
    scale[scale == 0] = 1.0
    xs = x / scale
    w = w0.copy()
    b = np.zeros(d)
    for _ in range(max(1, rounds)):
        xw = xs * w[:, None]
        gram = xs.T @ xw + ridge * w.sum() * np.eye(d)
        b = nnls(gram, xw.T @ y)
        resid = y - xs @ b
        spread = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
        if spread <= 0:
            break
        limit = huber * spread
        big = np.abs(resid) > limit
        w = w0 * np.where(big, limit / np.maximum(np.abs(resid), 1e-300), 1.0)
    return b / scale


@dataclass(frozen=True)
class LatencyModelConfig:
    window: int = 256             # recent iterations in the fit
    num_anchors: int = 64         # the profile (or the first iterations served) kept for good
    refit_every: int = 16         # observations between refits (a refit takes a few ms)
    min_samples: int = 8          # no prediction before this many samples


@dataclass
class LatencyModel:
    """Predicts an iteration's device time in ms from its shape; fitted on the fly."""

    config: LatencyModelConfig = field(default_factory=LatencyModelConfig)
    coefficients: np.ndarray | None = None     # per FEATURES, ms per unit; None until fitted
    _anchors: list[tuple[np.ndarray, float]] = field(default_factory=list)
    _recent: deque[tuple[np.ndarray, float]] = field(default_factory=deque)
    _since_fit: int = 0
    _profiled: bool = False       # the anchors came from a profile: they are complete

    def __post_init__(self) -> None:
        self._recent = deque(self._recent, maxlen=self.config.window)

    @property
    def ready(self) -> bool:
        return self.coefficients is not None

    @property
    def num_samples(self) -> int:
        return len(self._anchors) + len(self._recent)

    def warm_start(self, samples: Iterable[tuple[IterationShape, float]]) -> None:
        """Profiled (shape, device ms) pairs: anchors of the fit from now on."""
        for shape, ms in samples:
            if len(self._anchors) < self.config.num_anchors:
                self._anchors.append((shape.features(), float(ms)))
        self._profiled = bool(self._anchors)
        self.refit()

    def observe(self, shape: IterationShape, measured_ms: float) -> None:
        if shape.is_empty or not np.isfinite(measured_ms) or measured_ms <= 0:
            return
        sample = (shape.features(), float(measured_ms))
        # Without a profile, the first iterations served become the anchors.
        if len(self._anchors) < self.config.num_anchors and not self._profiled:
            self._anchors.append(sample)
        else:
            self._recent.append(sample)
        self._since_fit += 1
        if self._since_fit >= self.config.refit_every or not self.ready:
            self.refit()

    def refit(self) -> None:
        self._since_fit = 0
        samples = self._anchors + list(self._recent)
        if len(samples) < self.config.min_samples:
            return
        x = np.stack([f for f, _ in samples])
        y = np.array([ms for _, ms in samples])
        self.coefficients = fit_nonnegative(x, y)

    def predict_ms(self, shape: IterationShape) -> float:
        """The predicted device time, or 0.0 before the first fit."""
        if self.coefficients is None:
            return 0.0
        return float(shape.features() @ self.coefficients)


@dataclass
class SafetyMargin:
    """The relative margin the budget keeps below the target: a running estimate of the
    quantile q of measured / predicted - 1 (stochastic gradient on the pinball loss). A miss
    (measured above predicted x (1 + margin)) raises it by step x q; every other iteration lowers
    it by step x (1 - q): with q = 0.99, one miss undoes 99 quiet iterations, and it settles where
    about 1% of iterations run past their margin."""

    quantile: float = 0.99
    step: float = 0.02
    value: float = 0.1
    floor: float = 0.0
    ceiling: float = 1.0

    def start_from(self, ratios: Iterable[float]) -> None:
        """Starts at the quantile of the profile's relative errors, if there are any."""
        errors = np.array([r for r in ratios if np.isfinite(r)])
        if errors.size:
            self.value = float(np.clip(np.quantile(errors, self.quantile), self.floor, self.ceiling))

    def observe(self, predicted_ms: float, measured_ms: float) -> None:
        if predicted_ms <= 0 or measured_ms <= 0:
            return
        error = measured_ms / predicted_ms - 1.0
        if error > self.value:
            self.value += self.step * self.quantile
        else:
            self.value -= self.step * (1.0 - self.quantile)
        self.value = min(self.ceiling, max(self.floor, self.value))


@dataclass
class LatencyTracker:
    """The model, the margin, and recent prediction errors, for one replica's device."""

    model: LatencyModel = field(default_factory=LatencyModel)
    margin: SafetyMargin = field(default_factory=SafetyMargin)
    errors: deque[float] = field(default_factory=lambda: deque(maxlen=1000))  # signed, relative

    def warm_start(self, samples: list[tuple[IterationShape, float]]) -> None:
        self.model.warm_start(samples)
        if self.model.ready:
            self.margin.start_from(ms / p - 1.0 for shape, ms in samples
                                   if (p := self.model.predict_ms(shape)) > 0)

    def predict_ms(self, shape: IterationShape) -> float:
        return self.model.predict_ms(shape)

    def observe(self, shape: IterationShape, predicted_ms: float, measured_ms: float) -> None:
        """An iteration's measured device time, and what was predicted when it was formed."""
        if shape.is_empty or measured_ms <= 0:
            return
        if predicted_ms > 0:
            self.margin.observe(predicted_ms, measured_ms)
            self.errors.append((predicted_ms - measured_ms) / measured_ms)
        self.model.observe(shape, measured_ms)

    def error_quantiles(self) -> tuple[float, float]:
        """P50 and P99 of |predicted - measured| / measured over recent iterations (0 if none)."""
        if not self.errors:
            return 0.0, 0.0
        p50, p99 = np.quantile(np.abs(np.array(self.errors)), [0.5, 0.99])
        return float(p50), float(p99)
