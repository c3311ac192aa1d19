"""Polar Express coefficients: greedy minimax-optimal odd quintics (Amsel et al., 2025).

Each Newton–Schulz step applies an odd quintic ``p(σ) = aσ + bσ³ + cσ⁵`` to every singular
value. Polar Express chooses, step by step, the quintic that minimises the worst-case
distance ``max_{σ∈[l,u]} |1 − p(σ)|`` over the interval ``[l, u]`` where the singular
values are known to lie, then maps the interval through ``p`` for the next step. The
minimax quintic equioscillates at four points ``l < q < r < u``
(``p = 1−E, 1+E, 1−E, 1+E``), found here by a Remez exchange: solve the 4×4 linear system
for ``(a, b, c, E)`` on the current points, move ``q, r`` to the interior extrema of ``p``
(roots of ``p'``), repeat until ``E`` stops changing.

Two practical touches from the paper: the lower end is "cushioned" to at least
``cushion · u`` (very small ``l`` gives steep, fragile quintics; the optimal polynomial for
the cushioned interval is then rescaled so that ``p(l) + p(u) = 2`` on the true
interval), and every polynomial but the last is finally divided by a safety factor
(``a/s, b/s³, c/s⁵``, i.e. ``p(σ/s)``) so that round-off that pushes a singular value
slightly above the interval cannot blow up.

References:
  Amsel, Persson, Musco, Gower, *The Polar Express: Optimal Matrix Sign Methods and Their
  Application to the Muon Algorithm*, arXiv 2505.16932, 2025.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

#: The paper's default lower-end cushion (as a fraction of the upper end).
DEFAULT_CUSHION = 0.02407327424182761


def _quintic(abc, x):
  a, b, c = abc
  return a * x + b * x**3 + c * x**5


def minimax_odd_quintic(lower: float, upper: float, tol: float = 1e-15,
                        max_iter: int = 100) -> tuple[float, float, float]:
  """The odd quintic minimising ``max_{x∈[lower, upper]} |1 − p(x)|`` (Remez exchange).

  Args:
    lower, upper: the interval, ``0 <= lower <= upper``.
    tol: stop when the equioscillation error changes by less than this.
    max_iter: cap on Remez iterations.

  Returns:
    ``(a, b, c)`` as Python floats.
  """
  if not 0 <= lower <= upper or upper <= 0:
    raise ValueError(f"need 0 <= lower <= upper and upper > 0, got [{lower}, {upper}].")
  if lower / upper >= 1 - 5e-6:
    # Degenerate interval: the minimax quintic tends to the one with p(u) = 1 and
    # p'(u) = p''(u) = 0, i.e. (15t − 10t³ + 3t⁵)/8 with t = x/u (solving the Remez system
    # here would be ill-conditioned).
    return 15 / 8 / upper, -10 / 8 / upper**3, 3 / 8 / upper**5
  # Initial reference points; exact in the limit lower -> upper.
  q, r = (3 * lower + upper) / 4, (lower + 3 * upper) / 4
  err_prev = math.inf
  for _ in range(max_iter):
    pts = np.array([lower, q, r, upper], dtype=np.float64)
    signs = np.array([1.0, -1.0, 1.0, -1.0])
    system = np.stack([pts, pts**3, pts**5, signs], axis=1)
    a, b, c, err = np.linalg.solve(system, np.ones(4))
    # Interior extrema of p: roots of p'(x) = a + 3b x² + 5c x⁴ (a quadratic in x²).
    disc = math.sqrt(max(9 * b * b - 20 * a * c, 0.0))
    q, r = sorted(math.sqrt(max((-3 * b + sgn * disc) / (10 * c), 0.0)) for sgn in (-1.0, 1.0))
    if abs(err - err_prev) <= tol:
      break
    err_prev = err
  return float(a), float(b), float(c)


def polar_express_coefficients(
    steps: int,
    lower_bound: float = 1e-3,
    upper_bound: float = 1.0,
    safety: float = 1.01,
    cushion: float = DEFAULT_CUSHION,
) -> tuple[tuple[float, float, float], ...]:
  """Greedy Polar Express schedule of ``steps`` quintic triples.

  With the defaults and ``steps=8`` this reproduces the published table (NVIDIA's
  ``polar_express`` preset, :data:`ortho_optax.coefficients.PRESETS`).

  Args:
    steps: number of triples (>= 1).
    lower_bound: assumed smallest singular value after normalisation (``l``).
    upper_bound: assumed largest singular value (``u``; 1 after Frobenius normalisation).
    safety: divide every triple but the last by this factor (``p(σ) -> p(σ/safety)``);
      1 disables it.
    cushion: lower end of each step's design interval is ``max(l, cushion·u)``.

  Returns:
    A tuple of ``steps`` ``(a, b, c)`` triples (usable as ``coefficients=`` of
    :func:`ortho_optax.newton_schulz.newton_schulz`).

  References:
    Amsel, Persson, Musco, Gower, "The Polar Express: Optimal Matrix Sign Methods and
    Their Application to the Muon Algorithm", arXiv 2505.16932, 2025;
    NVIDIA-NeMo/Emerging-Optimizers (published coefficient table).
  """
  if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
    raise ValueError(f"steps must be an integer >= 1, got {steps!r}.")
  if not 0 < lower_bound <= upper_bound:
    raise ValueError(
        f"need 0 < lower_bound <= upper_bound, got lower_bound={lower_bound!r}, "
        f"upper_bound={upper_bound!r}.")
  if not safety >= 1:
    raise ValueError(f"safety must be >= 1, got {safety!r}.")
  if not 0 <= cushion <= 1:
    raise ValueError(f"cushion must be in [0, 1], got {cushion!r}.")
  lo, hi = float(lower_bound), float(upper_bound)
  triples = []
  for _ in range(steps):
    abc = minimax_odd_quintic(max(lo, cushion * hi), hi)
    # Re-centre on the true interval: choose a scalar so that 1 − p(lo) = p(hi) − 1.
    scale = 2.0 / (_quintic(abc, lo) + _quintic(abc, hi))
    abc = tuple(v * scale for v in abc)
    triples.append(abc)
    lo = _quintic(abc, lo)
    hi = 2.0 - lo
  safe = [(a / safety, b / safety**3, c / safety**5) for a, b, c in triples[:-1]]
  return tuple(safe + [triples[-1]])
