"""Unit tests of polar.py: SVD polar, Aurora polar and its balanced variants, cosh norm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import golden_tolerance, load_golden
from ortho_optax.newton_schulz import newton_schulz
import importlib
import re

from ortho_optax.polar import (aurora_polar, cosh_normalize, leverage_uniform_polar, polar,
                               riemannian_balanced_polar)

F32 = dict(compute_dtype=jnp.float32, backend="xla")
polar_module = importlib.import_module("ortho_optax.polar")  # the package exports polar()


def _rand(shape, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _row_sq(p):
  """Row norms² on the long side (tall orientation)."""
  p = np.asarray(p, np.float64)
  if p.shape[-2] < p.shape[-1]:
    p = np.swapaxes(p, -1, -2)
  return (p**2).sum(-1)


# ----------------------------------------------------------------------------- polar (SVD)


@pytest.mark.parametrize("shape", [(6, 6), (5, 9), (9, 5), (2, 3, 4, 7)])
def test_polar_matches_numpy_svd(shape, highest_precision):
  x = _rand(shape, seed=1)
  u, _, vh = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
  np.testing.assert_allclose(polar(x), u @ vh, atol=1e-5)
  assert polar(x).dtype == jnp.float32


def test_polar_rank_deficient_and_zero():
  z = polar(jnp.zeros((3, 4, 5)))
  assert np.all(np.asarray(z) == 0)
  x = np.outer(np.arange(1.0, 5.0), np.arange(1.0, 4.0)).astype(np.float32)  # rank 1
  p = np.asarray(polar(jnp.asarray(x)))
  np.testing.assert_allclose(np.linalg.svd(p, compute_uv=False), [1, 0, 0], atol=1e-5)
  assert polar(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- aurora_polar


def test_aurora_polar_is_newton_schulz_with_aurora_coefficients():
  x = _rand((2, 8, 12), seed=2)
  ref = newton_schulz(x, steps=12, coefficients="aurora", eps=1e-7, **F32)
  np.testing.assert_array_equal(aurora_polar(x, **F32), ref)
  s = np.linalg.svd(np.asarray(aurora_polar(x, **F32)), compute_uv=False)
  np.testing.assert_allclose(s, 1.0, atol=1e-3)


def test_aurora_polar_bf16_default():
  x = _rand((8, 12), seed=3)
  out = aurora_polar(x)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, polar(x), atol=3e-2)


# ----------------------------------------------------------------------------- leverage


def test_leverage_square_is_plain_polar():
  x = _rand((10, 10), seed=4)
  np.testing.assert_array_equal(leverage_uniform_polar(x, **F32), aurora_polar(x, **F32))


@pytest.mark.parametrize("shape", [(24, 8), (8, 24)])
def test_leverage_balances_row_norms(shape):
  # Give rows very different norms: the plain polar factor then has uneven leverage.
  x = _rand(shape, seed=5) * jnp.linspace(0.1, 3.0, max(shape))[
      (slice(None), None) if shape[0] > shape[1] else (None, slice(None))]
  target = min(shape) / max(shape)
  spread = lambda p: np.abs(_row_sq(p) / target - 1).max()
  s1 = spread(leverage_uniform_polar(x, pp_iterations=1, **F32))
  s4 = spread(leverage_uniform_polar(x, pp_iterations=4, **F32))
  assert s4 < s1 and s4 < 0.05
  # Still (nearly) an isometry on the short side.
  p = np.asarray(leverage_uniform_polar(x, pp_iterations=4, **F32), np.float64)
  g = p.T @ p if shape[0] > shape[1] else p @ p.T
  np.testing.assert_allclose(g, np.eye(min(shape)), atol=2e-2)


def test_leverage_transpose_and_batch():
  x = _rand((3, 6, 14), seed=6)
  f = jax.jit(lambda a: leverage_uniform_polar(a, pp_iterations=2, **F32))
  out = f(x)
  np.testing.assert_allclose(jnp.swapaxes(f(jnp.swapaxes(x, -1, -2)), -1, -2), out, atol=1e-5)
  for i in range(3):
    np.testing.assert_allclose(out[i], f(x[i:i + 1])[0], atol=1e-5)


def test_leverage_zero_input_and_bad_args():
  assert np.all(np.asarray(leverage_uniform_polar(jnp.zeros((4, 9)), **F32)) == 0)
  with pytest.raises(ValueError, match="pp_iterations"):
    leverage_uniform_polar(_rand((4, 6)), pp_iterations=0)
  with pytest.raises(ValueError, match="pp_beta"):
    leverage_uniform_polar(_rand((4, 6)), pp_beta=0.0)
  with pytest.raises(ValueError, match="rank >= 2"):
    leverage_uniform_polar(jnp.ones(4))


# ----------------------------------------------------------------------------- riemannian


@pytest.mark.parametrize("explicit_cg", [True, False])
def test_riemannian_matches_aurora_golden_steps(highest_precision, explicit_cg, monkeypatch):
  """The golden is the Riemannian Aurora optimizer; its update direction is this
  function (square -> polar) times sqrt(max(1, rows/cols)). Momentum is recomputed here.
  Both CG forms: the golden's shapes take the explicit one by default."""
  monkeypatch.setattr(polar_module, "explicit_cg_operator", lambda *_: explicit_cg)
  arrays, meta = load_golden("aurora/riemannian_steps_fp32.npz")
  h = meta["hyperparameters"]
  f = jax.jit(lambda u: riemannian_balanced_polar(
      u, outer_steps=h["outer_steps"], cg_steps=h["cg_steps"],
      riemannian_eta=h["riemannian_eta"], retraction_steps=h["retraction_steps"], **F32))
  for name in ("wide", "tall", "square"):
    w = arrays[f"{name}__param_init"].astype(np.float32)
    m = np.zeros_like(w)
    for t in (1, 2, 3):
      g = arrays[f"{name}__grad_t{t}"]
      m = m + (1 - h["mu"]) * (g - m)
      u = g + h["mu"] * (m - g)
      o = np.asarray(f(jnp.asarray(u))) * np.sqrt(max(1.0, w.shape[0] / w.shape[1]))
      w = w * (1 - h["eta"] * h["weight_decay"]) - h["eta"] * o
      key = f"{name}__param_t{t}"
      rtol, atol = golden_tolerance(meta, key)
      np.testing.assert_allclose(w, arrays[key], rtol=rtol, atol=atol, err_msg=key)


def test_riemannian_balances_batches_and_is_finite():
  # One compiled function for every check (compiles dominate the CPU test time).
  f = jax.jit(lambda a: riemannian_balanced_polar(a, **F32))
  x = _rand((2, 20, 6), seed=7) * jnp.linspace(0.2, 2.0, 20)[:, None]
  out = np.asarray(f(x))
  assert np.all(np.isfinite(out))
  target = 6 / 20
  for i in range(2):
    base = np.abs(_row_sq(aurora_polar(x[i], **F32)) / target - 1).max()
    assert np.abs(_row_sq(out[i]) / target - 1).max() < base
  # Matrices of a batch are independent (own CG early exits): replacing the second one
  # by zeros leaves the first unchanged, and a zero matrix gives a finite result.
  out2 = np.asarray(f(x.at[1].set(0.0)))
  np.testing.assert_allclose(out2[0], out[0], atol=1e-6)
  assert np.all(np.isfinite(out2[1]))
  # Wide input = transposed tall input.
  np.testing.assert_allclose(np.asarray(f(jnp.swapaxes(x, -1, -2))), np.swapaxes(out, -1, -2),
                             atol=1e-4)


def test_riemannian_cg_forms_agree_and_the_explicit_one_never_waits_for_the_host(monkeypatch):
  # Explicit: P∘P formed once, a fixed-count loop (XLA knows every trip count, so a GPU
  # never reads a predicate back); implicit: the early-exit while loop. The two operators
  # are equal in exact arithmetic: compared in float64, where rounding cannot move the
  # unconverged CG iterates apart (float32 results differ by ~1e-4 on this input).
  x = _rand((3, 40, 10), seed=3) * jnp.linspace(0.3, 3.0, 40)[:, None]
  assert polar_module.explicit_cg_operator(3, 40, 10, 20)
  run_explicit = lambda a: riemannian_balanced_polar(a, **F32)
  explicit = jax.jit(run_explicit).lower(x).compile().as_text()
  loops = re.findall(r"\swhile\(", explicit)
  assert loops and len(re.findall(r"known_trip_count", explicit)) == len(loops)
  f64 = dict(compute_dtype=jnp.float64, backend="xla")
  with jax.enable_x64(True):
    x64 = jnp.asarray(np.asarray(x), jnp.float64)
    explicit_out = np.asarray(jax.jit(lambda a: riemannian_balanced_polar(a, **f64))(x64))
  monkeypatch.setattr(polar_module, "explicit_cg_operator", lambda *_: False)
  run_implicit = lambda a: riemannian_balanced_polar(a, **F32)  # a new trace
  implicit = jax.jit(run_implicit).lower(x).compile().as_text()
  assert len(re.findall(r"known_trip_count", implicit)) < len(re.findall(r"\swhile\(", implicit))
  with jax.enable_x64(True):
    implicit_out = np.asarray(jax.jit(lambda a: riemannian_balanced_polar(a, **f64))(x64))
  assert explicit_out.dtype == np.float64
  np.testing.assert_allclose(implicit_out, explicit_out, atol=1e-9)


def test_explicit_cg_operator_choice():
  assert polar_module.explicit_cg_operator(12, 3072, 768, 20)  # GPT-2 small's MLP stack
  assert not polar_module.explicit_cg_operator(4, 16384, 4096, 20)  # 4 GiB of P∘P
  assert not polar_module.explicit_cg_operator(1, 4000, 10, 20)  # costlier than 20 iterations
  assert not polar_module.explicit_cg_operator(1, 40, 10, 0)


def test_riemannian_bad_args():
  with pytest.raises(ValueError, match="cg_steps"):
    riemannian_balanced_polar(_rand((5, 3)), cg_steps=-1)
  with pytest.raises(ValueError, match="riemannian_eta"):
    riemannian_balanced_polar(_rand((5, 3)), riemannian_eta=-0.1)


# ----------------------------------------------------------------------------- cosh


def test_cosh_normalize_formula():
  g = np.asarray(_rand((4, 5, 3), seed=9), np.float64)
  gamma = 1.25
  n = np.sqrt((g**2).sum())
  r = np.sqrt(np.mean(np.cosh(gamma * g / (n + 1e-7))**2))
  np.testing.assert_allclose(cosh_normalize(jnp.asarray(g, jnp.float32), gamma), g / (r + 1e-8),
                             rtol=1e-6)
  assert 1.0 <= r <= np.sqrt(1 + np.sinh(gamma)**2 / g.size)


def test_cosh_normalize_zero_and_dtype():
  assert np.all(np.asarray(cosh_normalize(jnp.zeros((3, 2)))) == 0)
  out = cosh_normalize(jnp.ones((7,), jnp.bfloat16))
  assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
  with pytest.raises(ValueError, match="gamma"):
    cosh_normalize(jnp.ones(3), gamma=-1.0)


def test_cosh_normalize_matches_auon_golden():
  """AuON's update G/(r+1e-8) recovered from the golden's parameter trajectory."""
  arrays, meta = load_golden("auon/auon_steps_fp32.npz")
  h = meta["hyperparameters"]
  for name in ("wide", "bias", "batched", "zero"):
    p = arrays[f"{name}__param_init"].astype(np.float32)
    m = np.zeros_like(p)
    for t in (1, 2, 3):
      g = arrays[f"{name}__grad_t{t}"]
      p = p * (1 - h["lr"] * h["weight_decay"])
      m = m + (1 - h["momentum"]) * (g - m)
      G = g + h["momentum"] * (m - g)
      p = p - h["lr"] * np.asarray(cosh_normalize(jnp.asarray(G), h["gamma"]))
      key = f"{name}__param_t{t}"
      rtol, atol = golden_tolerance(meta, key)
      np.testing.assert_allclose(p, arrays[key], rtol=rtol, atol=atol, err_msg=key)
