"""Polar Express coefficients computed from scratch reproduce the published table."""

import numpy as np
import pytest

from ortho_optax.coefficients import PRESETS
from ortho_optax.polar_express import minimax_odd_quintic, polar_express_coefficients


def test_reproduces_published_table():
  got = np.array(polar_express_coefficients(8, lower_bound=1e-3, safety=1.01))
  want = np.array(PRESETS["polar_express"])  # NVIDIA's table, 4 decimals
  np.testing.assert_allclose(got, want, rtol=1e-3)
  assert np.abs(got - want).max() < 1e-4  # within the table's rounding


def test_safety_factor_spares_the_last_triple():
  raw = np.array(polar_express_coefficients(5, safety=1.0))
  safe = np.array(polar_express_coefficients(5, safety=1.01))
  np.testing.assert_allclose(safe[:-1], raw[:-1] / np.array([1.01, 1.01**3, 1.01**5]))
  np.testing.assert_array_equal(safe[-1], raw[-1])


def test_minimax_equioscillates():
  lo, hi = 0.1, 1.0
  a, b, c = minimax_odd_quintic(lo, hi)
  x = np.linspace(lo, hi, 20001)
  err = 1 - (a * x + b * x**3 + c * x**5)
  e = np.abs(err).max()
  # Four alternating extrema of equal size: at both ends and at the two interior ones.
  assert abs(err[0] - e) < 1e-9 and abs(err[-1] + e) < 1e-9
  assert abs(err.min() + e) < 1e-6 and abs(err.max() - e) < 1e-6
  # No other odd quintic of a small perturbation does better (local optimality).
  rng = np.random.RandomState(0)
  for _ in range(50):
    d = rng.randn(3) * 1e-3
    p = (a + d[0]) * x + (b + d[1]) * x**3 + (c + d[2]) * x**5
    assert np.abs(1 - p).max() >= e - 1e-12


def test_schedule_converges_and_degenerate_interval():
  coeffs = polar_express_coefficients(10)
  s = np.logspace(-3, 0, 200)
  for a, b, c in coeffs:
    s = a * s + b * s**3 + c * s**5
  np.testing.assert_allclose(s, 1.0, atol=5e-3)
  np.testing.assert_allclose(minimax_odd_quintic(1.0, 1.0), (15 / 8, -10 / 8, 3 / 8))


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps"),
    (dict(steps=3, lower_bound=0.0), "lower_bound"),
    (dict(steps=3, lower_bound=2.0), "lower_bound"),
    (dict(steps=3, safety=0.9), "safety"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    polar_express_coefficients(**kwargs)
