"""The noise scale ``B_simple = tr(Σ) / |G|²`` from pairs of squared gradient norms, smoothed
(McCandlish et al. 2018, Appendix A.1); see :mod:`adabatch.noise`."""

from __future__ import annotations

import math
from typing import Any

from .._validation import check_fraction, check_non_negative_number

#: Default decay of the moving averages of |G|² and tr(Σ).
DEFAULT_EMA_DECAY = 0.95


class BiasCorrectedEMA:
    """An exponential moving average that is unbiased from its first update (Adam's correction).

    Args:
        decay (float): weight of the past, in ``[0, 1)``. Default: 0.95.
    """

    def __init__(self, decay: float = DEFAULT_EMA_DECAY) -> None:
        self.decay = check_fraction("decay", decay)
        self.biased = 0.0
        self.updates = 0

    def update(self, value: float) -> None:
        self.biased = self.decay * self.biased + (1 - self.decay) * value
        self.updates += 1

    @property
    def value(self) -> float:
        """The average, ``nan`` before the first update."""
        if not self.updates:
            return math.nan
        return self.biased / (1 - self.decay**self.updates)

    def state_dict(self) -> dict[str, Any]:
        return {"biased": self.biased, "updates": self.updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.biased = float(state_dict["biased"])
        self.updates = int(state_dict["updates"])


class NoiseScale:
    """Smoothed two-batch estimates of ``|G|²``, ``tr(Σ)`` and the simple noise scale.

    Args:
        decay (float): decay of both moving averages. Default: 0.95.

    Example:
        >>> noise = NoiseScale()
        >>> noise.update(grad_sqr_small=2.0, batch_small=32, grad_sqr_big=1.1, batch_big=256)
        True
        >>> round(noise.noise_scale, 1)
        33.9
    """

    def __init__(self, decay: float = DEFAULT_EMA_DECAY) -> None:
        self._grad_sqr = BiasCorrectedEMA(decay)
        self._grad_var = BiasCorrectedEMA(decay)
        # The averages of the raw estimates' squares: their spread, hence each average's error.
        self._grad_sqr_squares = BiasCorrectedEMA(decay)
        self._grad_var_squares = BiasCorrectedEMA(decay)
        self.last_grad_sqr = math.nan  # the raw per-step estimates, for logging
        self.last_grad_var = math.nan

    def update(self, grad_sqr_small: float, batch_small: int, grad_sqr_big: float, batch_big: int) -> bool:
        """Add one step's pair of squared gradient norms.

        Args:
            grad_sqr_small (float): ``|G_small|²``, squared norm of the mean gradient over
                ``batch_small`` samples.
            batch_small (int): samples behind ``grad_sqr_small``.
            grad_sqr_big (float): ``|G_big|²``, over ``batch_big`` samples, a superset.
            batch_big (int): samples behind ``grad_sqr_big``; larger than ``batch_small``.

        Returns:
            whether the step was counted: a step with a non-finite norm (an overflow, a step a
            GradScaler skips) or without two distinct batch sizes is not.
        """
        if not 0 < batch_small < batch_big:
            return False
        grad_sqr = (batch_big * grad_sqr_big - batch_small * grad_sqr_small) / (batch_big - batch_small)
        grad_var = (grad_sqr_small - grad_sqr_big) / (1 / batch_small - 1 / batch_big)
        return self.add(grad_sqr, grad_var)

    def add(self, grad_sqr: float, grad_var: float) -> bool:
        """Add one step's unbiased estimates of ``|G|²`` and ``tr(Σ)``, however obtained (the
        plain loop's pairs of independent batches give them from their product and their
        difference, see :meth:`GradientNoiseMeter.from_consecutive_steps
        <adabatch.noise.GradientNoiseMeter.from_consecutive_steps>`).

        Returns:
            whether they were counted: not if either is not finite.
        """
        if not (math.isfinite(grad_sqr) and math.isfinite(grad_var)):
            return False
        self.last_grad_sqr, self.last_grad_var = grad_sqr, grad_var
        self._grad_sqr.update(grad_sqr)
        self._grad_var.update(grad_var)
        self._grad_sqr_squares.update(grad_sqr * grad_sqr)
        self._grad_var_squares.update(grad_var * grad_var)
        return True

    @property
    def steps(self) -> int:
        """Steps counted so far."""
        return self._grad_sqr.updates

    @property
    def grad_sqr(self) -> float:
        """Smoothed ``|G|²``, the squared norm of the true gradient."""
        return self._grad_sqr.value

    @property
    def grad_var(self) -> float:
        """Smoothed ``tr(Σ)``, the trace of the per-sample gradient covariance."""
        return self._grad_var.value

    @property
    def noise_scale(self) -> float:
        """``B_simple = tr(Σ) / |G|²``; ``nan`` before the first step, ``inf`` while the
        smoothed ``|G|²`` is not positive (the gradient is all noise)."""
        grad_sqr, grad_var = self.grad_sqr, self.grad_var
        if math.isnan(grad_sqr) or math.isnan(grad_var):
            return math.nan
        if grad_sqr <= 0:
            return math.inf
        return max(grad_var, 0.0) / grad_sqr

    @property
    def standard_errors(self) -> tuple[float, float]:
        """The standard errors of the smoothed ``|G|²`` and ``tr(Σ)``: how far each average may
        be from the value it estimates. Where ``|G|²``'s error is as large as half of it, the
        noise scale is not resolved (the true ``|G|²`` may be near zero, and ``B_simple``
        anything from the estimate to many times it).

        Each is the square root of a weighted mean's variance: the raw estimates' variance
        (their averaged squares less the squared average, made unbiased for the weights) times
        ``Σw² / (Σw)²``, which the decay ``β`` after ``n`` measurements makes
        ``(1 - β)(1 + βⁿ) / ((1 + β)(1 - βⁿ))``: 1 after one measurement, 0.026 after many at
        the default decay. They are approximations: the raw estimates are taken as independent
        draws around a value that does not move. Both are ``nan`` before two measurements, which
        first show a spread, and at a decay of 0, where the average is the last estimate.
        """
        return (self._standard_error(self._grad_sqr, self._grad_sqr_squares),
                self._standard_error(self._grad_var, self._grad_var_squares))

    def lower_bound(self, errors: float = 1.0) -> float:
        """The smallest ``B_simple`` the measurements support: ``tr(Σ)`` taken ``errors``
        standard errors below its average, over ``|G|²`` taken as many above its average (and
        above zero, which a true ``|G|²`` never falls below).

        Unlike :attr:`noise_scale` it does not run off to infinity where ``|G|²`` is lost in its
        own noise: it is at most ``tr(Σ) / (errors · |G|²'s standard error)``, the largest noise
        scale the measurements so far can tell from an infinite one. An estimate that is biased
        towards a small ``|G|²`` (the plain loop's pairs of consecutive steps, see
        :mod:`adabatch.noise`) is held to the same limit.

        Args:
            errors (float): standard errors to take off; 0 gives :attr:`noise_scale`. Default: 1.

        Returns:
            the bound, ``nan`` while :attr:`standard_errors` are (before two measurements, or at a
            decay of 0), ``inf`` only if ``|G|²`` is not positive and has no spread at all.
        """
        if check_non_negative_number("errors", errors) == 0:
            return self.noise_scale
        return self._lower_bound(errors, *self.standard_errors)

    def _lower_bound(self, errors: float, grad_sqr_error: float, grad_var_error: float) -> float:
        if math.isnan(grad_sqr_error) or math.isnan(grad_var_error):
            return math.nan
        grad_var = max(self.grad_var - errors * grad_var_error, 0.0)
        grad_sqr = max(self.grad_sqr, 0.0) + errors * grad_sqr_error
        if grad_sqr <= 0:
            return math.inf if grad_var > 0 else math.nan
        return grad_var / grad_sqr

    @staticmethod
    def _standard_error(average: BiasCorrectedEMA, squares: BiasCorrectedEMA) -> float:
        decay, updates = average.decay, average.updates
        if updates < 2 or decay == 0:  # no spread yet, or one measurement weighs all
            return math.nan
        share = (1 - decay) * (1 + decay**updates) / ((1 + decay) * (1 - decay**updates))
        spread = max(squares.value - average.value**2, 0.0)
        return math.sqrt(spread * share / (1 - share))

    def scalars(self) -> dict[str, float]:
        """The smoothed and the last raw estimates, their standard errors and the noise scale's
        lower bound at one error, for logging; empty before the first step."""
        if not self.steps:
            return {}
        grad_sqr_error, grad_var_error = self.standard_errors
        return {"noise/grad_sqr": self.grad_sqr, "noise/grad_var": self.grad_var, "noise/noise_scale": self.noise_scale,
                "noise/raw_grad_sqr": self.last_grad_sqr, "noise/raw_grad_var": self.last_grad_var,
                "noise/grad_sqr_error": grad_sqr_error, "noise/grad_var_error": grad_var_error,
                "noise/noise_scale_lower": self._lower_bound(1.0, grad_sqr_error, grad_var_error)}

    def state_dict(self) -> dict[str, Any]:
        return {"grad_sqr": self._grad_sqr.state_dict(), "grad_var": self._grad_var.state_dict(),
                "grad_sqr_squares": self._grad_sqr_squares.state_dict(),
                "grad_var_squares": self._grad_var_squares.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._grad_sqr.load_state_dict(state_dict["grad_sqr"])
        self._grad_var.load_state_dict(state_dict["grad_var"])
        # A state saved before the squares were kept is taken as a history without spread.
        for key, average, squares in (("grad_sqr_squares", self._grad_sqr, self._grad_sqr_squares),
                                      ("grad_var_squares", self._grad_var, self._grad_var_squares)):
            squares.load_state_dict(state_dict[key] if key in state_dict else {
                "biased": average.biased * average.value if average.updates else 0.0, "updates": average.updates})
