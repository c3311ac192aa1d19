"""Kahan-compensated updates for bf16 / fp16 parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ortho_optax.stages.kahan import kahan_summation


def _train(dtype, kahan, steps=200, lr=1e-3, compensation_dtype=None):
  """SGD on 0.5 * ||w - target||^2 with a small lr: bf16 updates round away."""
  target = jnp.linspace(0.5, 4.0, 64)
  w = jnp.full((64,), 3.0, dtype)
  tx = optax.sgd(lr)
  if kahan:
    tx = optax.chain(tx, kahan_summation(compensation_dtype))
  state = tx.init(w)

  @jax.jit
  def step(w, state):
    g = (w.astype(jnp.float32) - target).astype(w.dtype)
    u, state = tx.update(g, state, w)
    return optax.apply_updates(w, u), state

  for _ in range(steps):
    w, state = step(w, state)
  return np.asarray(w.astype(jnp.float32))


@pytest.mark.parametrize("dtype,compensation_dtype", [
    (jnp.bfloat16, None), (jnp.bfloat16, jnp.float32), (jnp.float16, None)])
def test_kahan_tracks_f32_training_far_better(dtype, compensation_dtype):
  ref = _train(jnp.float32, kahan=False)
  plain = _train(dtype, kahan=False)
  comp = _train(dtype, kahan=True, compensation_dtype=compensation_dtype)
  err_plain = np.max(np.abs(plain - ref))
  err_comp = np.max(np.abs(comp - ref))
  # Without compensation bf16 weights near 3 (ulp 2^-6) stall: per-step updates
  # of ~1e-3 are below half an ulp. With it they follow the f32 trajectory to
  # within one ulp of the final value.
  assert err_plain > 0.05
  assert err_comp < 0.02
  assert err_comp * 10 < err_plain


def test_kahan_passes_f32_leaves_through_without_buffer():
  params = {"w": jnp.ones((3,), jnp.float32), "h": jnp.ones((2, 2), jnp.bfloat16)}
  tx = kahan_summation()
  state = tx.init(params)
  assert state.compensation["w"] is None
  assert state.compensation["h"].dtype == jnp.bfloat16
  u = {"w": jnp.full((3,), 1e-4), "h": jnp.full((2, 2), 1e-4)}
  out, state = tx.update(u, state, params)
  np.testing.assert_array_equal(out["w"], u["w"])
  # 1 + 1e-4 rounds to 1 in bf16: nothing applied, everything kept in the buffer.
  np.testing.assert_array_equal(out["h"], 0.0)
  assert out["h"].dtype == jnp.bfloat16  # updates in the parameters' dtype
  np.testing.assert_allclose(state.compensation["h"].astype(jnp.float32), 1e-4, rtol=1e-2)


def test_kahan_update_is_in_param_dtype_and_the_buffer_keeps_what_it_loses():
  rng = np.random.default_rng(0)
  params = jnp.asarray(rng.normal(size=(200,)), jnp.bfloat16)
  tx = kahan_summation(jnp.float32)
  state = tx.init(params)
  u = jnp.asarray(rng.normal(size=(200,)) * 0.3, jnp.float32)
  out, state = jax.jit(tx.update)(u, state, params)
  assert out.dtype == jnp.bfloat16
  new = np.asarray(optax.apply_updates(params, out), np.float32)
  p = np.asarray(params, np.float32)
  exact = p + np.asarray(u)
  target = np.asarray(jnp.asarray(exact).astype(jnp.bfloat16), np.float32)
  # Steps that keep the weight within a factor 2 (what Kahan summation is for) are
  # exact in bf16 (Sterbenz): the weight lands on round(p + u) ...
  small = (target * p > 0) & (np.abs(target) >= np.abs(p) / 2) & (np.abs(target) <= 2 * np.abs(p))
  assert small.sum() > 100
  np.testing.assert_array_equal(new[small], target[small])
  # ... and for every step, what the bf16 update did not apply is in the buffer, exactly.
  np.testing.assert_array_equal(np.asarray(state.compensation), exact - new)
  assert np.any(new[~small] != target[~small])  # some large steps did round


def test_kahan_large_steps_lose_nothing_over_time():
  # Weights crossing zero and growing 100x: d = round(p_new - p) is inexact, the buffer
  # carries the difference into the next steps, and the sum tracks float32.
  p = jnp.full((64,), 1e-3, jnp.bfloat16)
  ref = np.full((64,), 1e-3, np.float32)
  tx = kahan_summation(jnp.float32)
  state = tx.init(p)
  rng = np.random.default_rng(1)
  step = jax.jit(tx.update)
  for _ in range(50):
    u = rng.normal(size=(64,)).astype(np.float32) * 0.1
    out, state = step(jnp.asarray(u), state, p)
    p = optax.apply_updates(p, out)
    ref = ref + u
  err = np.abs(np.asarray(p, np.float32) + np.asarray(state.compensation) - ref)
  assert np.max(err) < 1e-6 * np.max(np.abs(ref)) + 1e-7


def test_kahan_needs_params():
  tx = kahan_summation()
  with pytest.raises(ValueError, match="params"):
    tx.update(jnp.ones(2), tx.init(jnp.ones(2, jnp.bfloat16)))


def test_muon_kahan_sum_on_bf16_params():
  from ortho_optax.optimizers.muon import muon
  rng = np.random.default_rng(0)
  target = jnp.asarray(rng.normal(size=(8, 8)) + 3.0, jnp.float32)
  bias_target = jnp.asarray(rng.normal(size=(8,)) + 3.0, jnp.float32)

  def train(dtype, kahan_sum):
    params = {"w": jnp.full((8, 8), 3.0, dtype), "b": jnp.full((8,), 3.0, dtype)}
    tx = muon(learning_rate=2e-3, weight_decay=0.0, adam_learning_rate=1e-3,
              compute_dtype=None, label_fn={"w": "ortho", "b": "adam"}, backend="xla",
              kahan_sum=kahan_sum)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
      grads = {"w": (params["w"].astype(jnp.float32) - target).astype(dtype),
               "b": (params["b"].astype(jnp.float32) - bias_target).astype(dtype)}
      u, state = tx.update(grads, state, params)
      return optax.apply_updates(params, u), state

    for _ in range(60):
      params, state = step(params, state)
    return jax.tree.map(lambda x: np.asarray(x, np.float32), params)

  ref = train(jnp.float32, False)
  plain = train(jnp.bfloat16, False)
  comp = train(jnp.bfloat16, True)
  # Per-step updates (~7e-4 on "w", 1e-3 on "b") are below half a bf16 ulp at 3
  # (7.8e-3): without compensation both branches stall; with it they track f32
  # (measured errors ~0.008 / 0.003 vs 0.11 / 0.06).
  for k in ("w", "b"):
    err_plain = np.max(np.abs(plain[k] - ref[k]))
    err_comp = np.max(np.abs(comp[k] - ref[k]))
    assert err_comp * 4 < err_plain, (k, err_comp, err_plain)
  # float32 parameters: kahan_sum is a pass-through.
  np.testing.assert_array_equal(train(jnp.float32, True)["w"], ref["w"])


@pytest.mark.parametrize("name", ["turbo_muon", "adaptive_muon", "normuon"])
def test_muon_family_kahan_sum_wiring(name):
  from ortho_optax.optimizers import adaptive_muon, turbo_muon
  from ortho_optax.stages.kahan import KahanSummationState
  factory = {"turbo_muon": turbo_muon.turbo_muon, "adaptive_muon": adaptive_muon.adaptive_muon,
             "normuon": adaptive_muon.normuon}[name]
  params = {"w": jnp.ones((4, 6), jnp.bfloat16), "b": jnp.ones((6,), jnp.float32)}
  labels = {"w": "ortho", "b": "adam"}
  find = lambda s: [x for x in jax.tree_util.tree_leaves(
      s, is_leaf=lambda x: isinstance(x, KahanSummationState))
      if isinstance(x, KahanSummationState)]
  assert not find(factory(label_fn=labels).init(params))
  (kahan,) = find(factory(label_fn=labels, kahan_sum=True).init(params))
  assert kahan.compensation["w"].dtype == jnp.bfloat16 and kahan.compensation["b"] is None


def test_kahan_sum_validation():
  from ortho_optax.optimizers.muon import muon
  with pytest.raises(ValueError, match="kahan_sum"):
    muon(kahan_sum="yes")


def test_kahan_state_is_none_without_low_precision_leaves():
  # A tree of None buffers would still be a tree nnx.jit walks on every step.
  params = {"w": jnp.ones((3,), jnp.float32), "v": {"x": jnp.ones((2, 2), jnp.float32)}}
  tx = kahan_summation()
  state = tx.init(params)
  assert state.compensation is None
  u = {"w": jnp.full((3,), 1e-4), "v": {"x": jnp.full((2, 2), 2e-4)}}
  out, new_state = jax.jit(tx.update)(u, state, params)
  assert new_state.compensation is None
  jax.tree.map(np.testing.assert_array_equal, out, u)
