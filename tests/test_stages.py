"""Unit tests of the momentum, second-moment, scale and decay stages (CPU, no NS)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ortho_optax.matrix_view import TORCH_LAYOUT, MatrixDims
from ortho_optax.stages.decay import (add_weight_decay, scale_by_learning_rate_and_decay,
                                      weight_decay_stages)
from ortho_optax.stages.momentum import ema_momentum
from ortho_optax.stages.scale import scale_by_shape, shape_scale_factor
from ortho_optax.stages.second_moment import scale_by_namo, scale_by_second_moment


def _grads(shape, steps=3, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=shape).astype(np.float32) * s for s in (1.0, 8.0, 0.5)[:steps]]


# ---------------------------------------------------------------- momentum


@pytest.mark.parametrize("nesterov", [True, False])
def test_ema_momentum_matches_lerp_formula(nesterov):
  mu = 0.9
  tx = ema_momentum(mu, nesterov=nesterov)
  gs = _grads((4, 5))
  state = tx.init(jnp.zeros((4, 5)))
  m = np.zeros((4, 5), np.float32)
  for g in gs:
    out, state = tx.update(jnp.asarray(g), state)
    m = mu * m + (1 - mu) * g
    want = (1 - mu) * g + mu * m if nesterov else m
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(state.mu, m, rtol=1e-6, atol=1e-7)
  assert int(state.count) == 3


@pytest.mark.parametrize("nesterov", [True, False])
def test_ema_momentum_bias_correction(nesterov):
  mu = 0.8
  tx = ema_momentum(mu, nesterov=nesterov, bias_correction=True)
  state = tx.init(jnp.zeros((3,)))
  m = np.zeros(3, np.float32)
  for t, g in enumerate(_grads((3,)), start=1):
    out, state = tx.update(jnp.asarray(g), state)
    m = mu * m + (1 - mu) * g
    if nesterov:
      want = mu * m / (1 - mu ** (t + 1)) + (1 - mu) * g / (1 - mu ** t)
    else:
      want = m / (1 - mu ** t)
    np.testing.assert_allclose(out, want, rtol=1e-5)
  # A constant gradient is recovered exactly by the plain debiased EMA.
  if not nesterov:
    state = tx.init(jnp.zeros(()))
    for _ in range(4):
      out, state = tx.update(jnp.asarray(2.5), state)
      np.testing.assert_allclose(out, 2.5, rtol=1e-6)


def test_ema_momentum_matches_optax_nesterov_adam_first_moment():
  # optax.scale_by_adam(nesterov=True) uses the same bias-corrected Nesterov form;
  # with b2 -> its denominator constant (eps huge) the ratio isolates the first moment.
  mu = 0.9
  ours = ema_momentum(mu, nesterov=True, bias_correction=True)
  ref = optax.scale_by_adam(b1=mu, b2=0.0, eps=0.0, nesterov=True)
  g_abs = jnp.ones((5,))
  s1, s2 = ours.init(g_abs), ref.init(g_abs)
  for g in _grads((5,)):
    g = jnp.abs(jnp.asarray(g)) + 1.0  # b2 = 0: denominator is |g|
    a, s1 = ours.update(g, s1)
    b, s2 = ref.update(g, s2)
    np.testing.assert_allclose(a / g, b, rtol=1e-5)


def test_ema_momentum_mu_dtype_and_output_dtype():
  tx = ema_momentum(0.95, mu_dtype=jnp.bfloat16)
  state = tx.init(jnp.zeros((2, 3), jnp.float32))
  assert state.mu.dtype == jnp.bfloat16
  out, state = tx.update(jnp.ones((2, 3), jnp.float32), state)
  assert out.dtype == jnp.float32 and state.mu.dtype == jnp.bfloat16


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_ema_momentum_rejects_bad_momentum(bad):
  with pytest.raises(ValueError, match=f"momentum={bad}"):
    ema_momentum(bad)


def test_ema_momentum_accepts_array_momentum_under_jit():
  tx = ema_momentum(jnp.asarray(0.9))
  state = tx.init(jnp.zeros(3))
  out, _ = jax.jit(tx.update)(jnp.ones(3), state)
  np.testing.assert_allclose(out, 0.1 + 0.9 * 0.1, rtol=1e-6)


# ---------------------------------------------------------------- scale


@pytest.mark.parametrize("mode,out_,in_,want", [
    ("shape_scaling", 24, 16, math.sqrt(1.5)),
    ("shape_scaling", 16, 24, 1.0),
    ("spectral", 16, 24, math.sqrt(24)),
    ("unit_rms_norm", 16, 24, math.sqrt(16 / 24)),
    ("consistent_rms", 16, 24, math.sqrt(24) * 0.2),
    ("none", 16, 24, 1.0),
])
def test_scale_by_shape_factors_torch_and_flax_layout(mode, out_, in_, want):
  assert shape_scale_factor(mode, out_, in_) == pytest.approx(want)
  x = jnp.ones((out_, in_))
  y, _ = scale_by_shape(mode, dimension_numbers=TORCH_LAYOUT).update(x, ())
  np.testing.assert_allclose(y, want, rtol=1e-6)
  # The same weight in Flax (in, out) layout with the default view.
  y, _ = scale_by_shape(mode, extra_scale_factor=0.5).update(x.T, ())
  np.testing.assert_allclose(y, 0.5 * want, rtol=1e-6)


def test_scale_by_shape_batched_and_conv_views():
  tx = scale_by_shape("shape_scaling", dimension_numbers=lambda t: {
      "batched": MatrixDims((2,), (1,)), "conv": MatrixDims((1, 2, 3), (0,))})
  ups = {"batched": jnp.ones((3, 12, 4)), "conv": jnp.ones((18, 2, 3, 2))}
  out, _ = tx.update(ups, tx.init(ups))
  np.testing.assert_allclose(out["batched"], math.sqrt(3.0), rtol=1e-6)  # per (12, 4) matrix
  np.testing.assert_allclose(out["conv"], math.sqrt(18 / 12), rtol=1e-6)  # (18, 2*3*2)


def test_scale_by_shape_inside_multi_transform_masked_leaves():
  params = {"w": jnp.ones((8, 4)), "b": jnp.ones((4,))}
  tx = optax.multi_transform(
      {"o": scale_by_shape("spectral"), "a": optax.identity()},
      {"w": "o", "b": "a"})
  out, _ = tx.update(params, tx.init(params), params)
  np.testing.assert_allclose(out["w"], math.sqrt(8), rtol=1e-6)
  np.testing.assert_allclose(out["b"], 1.0)


def test_scale_by_shape_rejects_unknown_mode():
  with pytest.raises(ValueError, match="'spectrall'.*shape_scaling"):
    scale_by_shape("spectrall")


# ---------------------------------------------------------------- second moment


def test_adamuon_formula():
  beta2, eps = 0.9, 1e-8
  tx = scale_by_second_moment("adamuon", beta2, eps)
  os_ = _grads((6, 10))
  state = tx.init(jnp.zeros((6, 10)))
  v = np.zeros((6, 10), np.float32)
  for o in os_:
    out, state = tx.update(jnp.asarray(o), state)
    v = beta2 * v + (1 - beta2) * o * o
    np.testing.assert_allclose(out, o / (np.sqrt(v) + eps), rtol=1e-5)
    np.testing.assert_allclose(state.nu, v, rtol=1e-5)


@pytest.mark.parametrize("shape,axis,buf", [((24, 16), -1, (24, 1)), ((20, 20), -1, (20, 1)),
                                            ((16, 24), -2, (1, 24))])
def test_normuon_formula_and_buffer_shape(shape, axis, buf):
  beta2, eps = 0.95, 1e-8
  tx = scale_by_second_moment("normuon", beta2, eps, dimension_numbers=TORCH_LAYOUT)
  state = tx.init(jnp.zeros(shape))
  assert state.nu.shape == buf and state.nu.dtype == jnp.float32
  v = np.zeros(buf, np.float32)
  for o in _grads(shape):
    out, state = tx.update(jnp.asarray(o), state)
    v = beta2 * v + (1 - beta2) * np.mean(o * o, axis=axis, keepdims=True)
    want = o / np.sqrt(np.maximum(v, eps))
    want = want * np.linalg.norm(o) / max(np.linalg.norm(want), eps)
    np.testing.assert_allclose(out, want, rtol=1e-5)
    np.testing.assert_allclose(state.nu, v, rtol=1e-5)


def test_normuon_flax_layout_buffer_is_transposed_torch_buffer():
  # A tall torch (24, 16) weight is a (16, 24) Flax kernel: same per-row (per-out) stats.
  tx = scale_by_second_moment("normuon", dimension_numbers=None)
  o = _grads((24, 16), steps=1)[0]
  state = tx.init(jnp.zeros((16, 24)))
  assert state.nu.shape == (1, 24)
  out_flax, _ = tx.update(jnp.asarray(o.T), state)
  tx_t = scale_by_second_moment("normuon", dimension_numbers=TORCH_LAYOUT)
  out_torch, _ = tx_t.update(jnp.asarray(o), tx_t.init(jnp.zeros((24, 16))))
  np.testing.assert_allclose(out_flax, np.asarray(out_torch).T, rtol=1e-6)


def test_namo_wraps_momentum_and_orthogonalizer():
  beta2, eps, mu = 0.9, 1e-8, 0.8
  # Any U -> O map composes; a scaling stands in for the orthogonalizer here.
  tx = scale_by_namo(ema_momentum(mu, nesterov=False), optax.scale(-3.0), beta2, eps,
                     dimension_numbers=TORCH_LAYOUT)
  state = tx.init(jnp.zeros((5, 7)))
  assert state.nu.shape == (1,)
  m, v = np.zeros((5, 7), np.float32), 0.0
  for g in _grads((5, 7)):
    out, state = tx.update(jnp.asarray(g), state)
    m = mu * m + (1 - mu) * g
    v = beta2 * v + (1 - beta2) * np.sum(g * g)
    want = np.linalg.norm(m) / (np.sqrt(v) + eps) * (-3.0 * m)
    np.testing.assert_allclose(out, want, rtol=1e-5)
    np.testing.assert_allclose(state.inner_state[0].mu, m, rtol=1e-6)


def test_namo_batched_view_keeps_one_scalar_per_matrix():
  tx = scale_by_namo(optax.identity(), optax.identity(),
                     dimension_numbers=MatrixDims((2,), (1,)))
  state = tx.init(jnp.zeros((3, 4, 5)))
  assert state.nu.shape == (3,)
  g = jnp.asarray(_grads((3, 4, 5), steps=1)[0])
  _, state = tx.update(g, state)
  np.testing.assert_allclose(state.nu, 0.05 * np.sum(np.asarray(g) ** 2, axis=(1, 2)), rtol=1e-5)


def test_second_moment_validation():
  with pytest.raises(ValueError, match="namo"):
    scale_by_second_moment("namo")
  with pytest.raises(ValueError, match="'adam'.*adamuon"):
    scale_by_second_moment("adam")
  with pytest.raises(ValueError, match="beta2=1.0"):
    scale_by_second_moment("adamuon", beta2=1.0)


def test_second_moment_wrapped_form_equals_chain():
  g = jnp.asarray(_grads((6, 4), steps=1)[0])
  wrapped = scale_by_second_moment("normuon", dimension_numbers=TORCH_LAYOUT,
                                   momentum=ema_momentum(0.9), orthogonalizer=optax.scale(2.0))
  chained = optax.chain(ema_momentum(0.9), optax.scale(2.0),
                        scale_by_second_moment("normuon", dimension_numbers=TORCH_LAYOUT))
  a, _ = wrapped.update(g, wrapped.init(g))
  b, _ = chained.update(g, chained.init(g))
  np.testing.assert_allclose(a, b, rtol=1e-6)


# ---------------------------------------------------------------- decay


@pytest.mark.parametrize("method,coef", [("decoupled", 0.1 * 0.5), ("independent", 0.5),
                                         ("palm", 0.1 ** 2 * 0.5), ("l2", 0.0)])
def test_final_stage_decay_methods(method, coef):
  lr, wd = 0.1, 0.5
  p = jnp.asarray([1.0, -2.0, 3.0])
  u = jnp.asarray([0.5, 0.25, -1.0])
  tx = scale_by_learning_rate_and_decay(lr, wd, method)
  out, _ = tx.update(u, tx.init(p), p)
  np.testing.assert_allclose(out, -lr * u - coef * p, rtol=1e-6)


def test_weight_decay_stages_l2_goes_before_momentum():
  lr, wd, mu = 0.1, 0.5, 0.9
  first, last = weight_decay_stages(lr, wd, "l2")
  tx = optax.chain(first, ema_momentum(mu, nesterov=False), last)
  p = jnp.asarray([1.0, -2.0])
  g = jnp.asarray([0.3, 0.1])
  out, _ = tx.update(g, tx.init(p), p)
  np.testing.assert_allclose(out, -lr * (1 - mu) * (g + wd * p), rtol=1e-6)


def test_schedules_and_mask():
  sched = optax.linear_schedule(1.0, 0.0, 4)
  tx = scale_by_learning_rate_and_decay(sched, lambda c: 0.1 * (c + 1), "independent",
                                        mask={"w": True, "b": False})
  p = {"w": jnp.ones(2), "b": jnp.ones(2)}
  u = {"w": jnp.ones(2), "b": jnp.ones(2)}
  state = tx.init(p)
  for t in range(3):
    out, state = tx.update(u, state, p)
    lr, wd = 1.0 - t / 4, 0.1 * (t + 1)
    np.testing.assert_allclose(out["w"], -lr - wd, rtol=1e-6)
    np.testing.assert_allclose(out["b"], -lr, rtol=1e-6)


def test_inject_hyperparams_controls_learning_rate_and_decay():
  def factory(learning_rate, weight_decay, momentum):
    first, last = weight_decay_stages(learning_rate, weight_decay, "decoupled")
    return optax.chain(first, ema_momentum(momentum), last)

  tx = optax.inject_hyperparams(factory)(learning_rate=0.1, weight_decay=0.2, momentum=0.5)
  p = jnp.ones(3)
  state = tx.init(p)
  state.hyperparams["learning_rate"] = jnp.asarray(0.01)
  state.hyperparams["momentum"] = jnp.asarray(0.0)
  out, state = jax.jit(tx.update)(jnp.full(3, 2.0), state, p)
  np.testing.assert_allclose(out, -0.01 * 2.0 - 0.01 * 0.2, rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(learning_rate=-1.0), "learning_rate=-1.0"),
    (dict(learning_rate=0.1, weight_decay=-0.1), "weight_decay=-0.1"),
    (dict(learning_rate=0.1, method="l1"), "'l1'.*decoupled"),
])
def test_decay_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    scale_by_learning_rate_and_decay(**kwargs)


def test_decay_needs_params():
  tx = scale_by_learning_rate_and_decay(0.1, 0.1)
  with pytest.raises(ValueError):
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)))
  tx = add_weight_decay(0.1)
  with pytest.raises(ValueError):
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)))


def test_normuon_split_output_matches_per_block_statistics():
  # A fused QKV Flax kernel (in, 3*out) with num_splits=3: each block is its own matrix.
  for n_in, n_out in [(32, 8), (4, 8)]:  # column stats (wide blocks) / row stats (tall)
    dims = MatrixDims((0,), (1,), num_splits=3)
    tx = scale_by_second_moment("normuon", dimension_numbers=dims)
    k = _grads((n_in, 3 * n_out), steps=1)[0]
    state = tx.init(jnp.zeros(k.shape))
    out, state = tx.update(jnp.asarray(k), state)
    blocks = []
    for j in range(3):
      o = k[:, j * n_out:(j + 1) * n_out].T  # (out, in) block
      axis = -1 if n_out >= n_in else -2
      v = 0.05 * np.mean(o * o, axis=axis, keepdims=True)
      w = o / np.sqrt(np.maximum(v, 1e-8))
      blocks.append((w * np.linalg.norm(o) / np.linalg.norm(w)).T)
    np.testing.assert_allclose(out, np.concatenate(blocks, axis=1), rtol=1e-5)


@pytest.mark.parametrize("method", ["adamuon", "normuon", "namo"])
def test_second_moment_zero_updates_stay_finite(method):
  tx = scale_by_second_moment(method, dimension_numbers=TORCH_LAYOUT,
                              momentum=ema_momentum(0.9), orthogonalizer=optax.identity())
  state = tx.init(jnp.zeros((4, 6)))
  for _ in range(2):
    out, state = tx.update(jnp.zeros((4, 6)), state)
    assert np.all(np.isfinite(out)) and np.all(out == 0)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))
