"""Fitting L(N, D) = E + A / N^alpha + B / D^beta to a sweep's final losses, and what follows from the fit.

Design decisions
- The fit is Hoffmann et al. 2022's "approach 3" (Chinchilla, section 3.3 and appendix D.2): parameters
  a = log A, b = log B, e = log E, alpha, beta; the model's log-loss is
  LSE(a - alpha log N, b - beta log D, e) (log-sum-exp, so the three terms stay positive and the sum never
  overflows), and the objective is the Huber loss (delta = 1e-3) between that and the measured log-loss,
  summed over runs. Huber rather than squares because a few runs that trained badly (a spike, a bad seed)
  would otherwise pull the exponents.
- The objective has many local minima, so it is minimised with L-BFGS-B (scipy.optimize, with the
  analytic gradient) from a grid of initialisations, and the best end point is kept.
- Uncertainty: a bootstrap over runs (resample the runs with replacement, refit from the full-data
  optimum and a few grid points), reporting the 5th and 95th percentiles of each constant. With ~18 tiny
  runs the intervals are wide; they say how much the constants can be trusted, which is the point.
- Compute-optimal allocation for C = 6 N D (Hoffmann et al. eq. 4): N_opt = G (C/6)^(beta/(alpha+beta)),
  D_opt = (C/6) / N_opt, with G = (alpha A / (beta B))^(1/(alpha+beta)).
- Two forms: with the irreducible term E (Chinchilla) and without it (E = 0: pure power laws in N and D, as
  in Kaplan et al. 2020, whose laws have no constant). When every run is far above E, E trades off against
  B and beta and a free E can bend the D curve flat too early; which form extrapolates better is decided
  on the sweep's own runs (`gptlab.lab.scaling.choose_fit`), not assumed.
- float64 throughout (numpy); tests check the fit against synthetic data drawn from known constants.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize

HUBER_DELTA = 1e-3  # Hoffmann et al. 2022, appendix D.2
NO_E = -40.0  # log E pinned here for the form without an irreducible term (exp(-40) ~ 4e-18: no effect)
INIT_GRID = {  # initialisations: every combination (a coarse subset of Chinchilla's grid, sized for seconds)
    "a": (0.0, 5.0, 10.0),
    "b": (0.0, 5.0, 10.0),
    "e": (-1.0, 0.5),
    "alpha": (0.2, 0.6),
    "beta": (0.2, 0.6),
}


@dataclass(frozen=True)
class ScalingLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n, d):
        """Predicted loss at N parameters and D tokens (scalars or arrays)."""
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def optimal(self, compute):
        """(N_opt, D_opt) for compute C = 6 N D FLOPs (Hoffmann et al. eq. 4)."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        n = g * np.power(np.asarray(compute, dtype=np.float64) / 6.0, self.beta / (self.alpha + self.beta))
        return n, np.asarray(compute, dtype=np.float64) / 6.0 / n

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals r and its derivative."""
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    return value, np.where(small, r, delta * np.sign(r))


def objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray,
              delta: float = HUBER_DELTA) -> tuple[float, np.ndarray]:
    """Summed Huber loss of LSE(a - alpha log N, b - beta log D, e) - log L, and its gradient in
    theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    pred = top + np.log(total)  # log-sum-exp over the three terms
    value, dvalue = _huber(pred - log_loss, delta)
    g = weights * (dvalue / total)  # d objective / d term
    grad = np.array([g[0].sum(), g[1].sum(), g[2].sum(), -(g[0] @ log_n), -(g[1] @ log_d)])
    return float(value.sum()), grad


def _minimise(start: np.ndarray, args: tuple, with_e: bool = True) -> tuple[float, np.ndarray]:
    # exponents kept non-negative: a negative one would make loss grow with size, which no run shows
    e_bounds = (None, None) if with_e else (NO_E, NO_E)
    bounds = [(None, None), (None, None), e_bounds, (0.0, 3.0), (0.0, 3.0)]
    if not with_e:
        start = np.array([*start[:2], NO_E, *start[3:]])
    result = minimize(objective, start, args=args, jac=True, method="L-BFGS-B", bounds=bounds,
                      options={"maxiter": 1000, "ftol": 1e-14, "gtol": 1e-10})
    return float(result.fun), result.x


def _best(starts: list[np.ndarray], args: tuple, with_e: bool = True) -> np.ndarray:
    return min((_minimise(s, args, with_e) for s in starts), key=lambda r: r[0])[1]


def _law(theta: np.ndarray, with_e: bool = True) -> ScalingLaw:
    a, b, e, alpha, beta = theta
    return ScalingLaw(E=float(np.exp(e)) if with_e else 0.0, A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha),
                      beta=float(beta))


def _args(n, d, loss) -> tuple:
    n, d, loss = (np.asarray(v, dtype=np.float64) for v in (n, d, loss))
    if not (n.shape == d.shape == loss.shape) or n.ndim != 1:
        raise ValueError("n, d and loss must be 1-D sequences of the same length")
    if np.any(n <= 0) or np.any(d <= 0) or np.any(loss <= 0):
        raise ValueError("parameters, tokens and losses must be positive")
    return np.log(n), np.log(d), np.log(loss)


def fit_scaling_law(n, d, loss, grid: dict[str, tuple[float, ...]] = INIT_GRID, with_e: bool = True) -> ScalingLaw:
    """The best fit over a grid of initialisations of (a, b, e, alpha, beta) (module docstring);
    `with_e=False` fits the form without the irreducible term (E = 0)."""
    args = _args(n, d, loss)
    starts = [np.array(p, dtype=np.float64) for p in itertools.product(*(grid[k] for k in INIT_GRID))]
    if not with_e:  # e is pinned: its grid values would only repeat the same starts
        starts = list({tuple(p[:2]) + (NO_E,) + tuple(p[3:]): p for p in starts}.values())
    return _law(_best(starts, args, with_e), with_e)


def bootstrap_laws(n, d, loss, law: ScalingLaw, samples: int = 100, seed: int = 0,
                   with_e: bool = True) -> list[ScalingLaw]:
    """Fits to the runs resampled with replacement. Each refit starts from the full-data optimum `law` and
    one generic point (a full grid per sample would take minutes); samples with a single N or D are
    skipped (they cannot identify an exponent)."""
    log_n, log_d, log_loss = _args(n, d, loss)
    rng = np.random.default_rng(seed)
    centre = np.array([np.log(law.A), np.log(law.B), np.log(law.E) if with_e else NO_E, law.alpha, law.beta])
    starts = [centre, np.array([5.0, 5.0, 0.0, 0.4, 0.4])]
    laws = []
    for _ in range(samples):
        pick = rng.integers(0, len(log_n), len(log_n))
        if len(set(log_n[pick])) > 1 and len(set(log_d[pick])) > 1:
            laws.append(_law(_best(starts, (log_n[pick], log_d[pick], log_loss[pick]), with_e), with_e))
    return laws


def intervals(laws: list[ScalingLaw], quantiles: tuple[float, float] = (0.05, 0.95)) -> dict[str, list[float]]:
    """Per constant, its (5th, 95th) percentiles over `laws` (the bootstrap fits)."""
    rows = [law.to_dict() for law in laws]
    return {k: [float(np.quantile([r[k] for r in rows], q)) for q in quantiles] for k in rows[0]}
