"""AuON / HybridAuON / AuON-Adam, Aurora / Riemannian Aurora and OAdamW against the goldens.

Each golden file holds 3 consecutive steps of the PyTorch reference on small parameters
(PyTorch layout ``(out, in)``): we feed the same gradients through the optax port and
compare parameters and optimizer state after every step with the per-key tolerances.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import golden_tolerance, load_golden
from ortho_optax.matrix_view import TORCH_LAYOUT, MatrixDims
from ortho_optax.optimizers._common import find_states
from ortho_optax.optimizers import auon as auon_lib
from ortho_optax.optimizers import aurora as aurora_lib
from ortho_optax.optimizers import oadamw as oadamw_lib
from ortho_optax.stages import kahan as kahan_stages
from ortho_optax.stages import momentum as momentum_stages
from ortho_optax.stages import stable_adamw as stable_adamw_stages


# ---------------------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------------------


def _names(arrays):
  return sorted({k.split("__")[0] for k in arrays if k.endswith("__param_init")})


def _torch_dims(shape):
  """PyTorch-layout view of a golden parameter."""
  if len(shape) == 2:
    return TORCH_LAYOUT
  if len(shape) == 3:  # batched (B, out, in)
    return MatrixDims(reduction_axes=(2,), output_axes=(1,))
  if len(shape) == 4:  # conv (out, in, kh, kw)
    return MatrixDims(reduction_axes=(1, 2, 3), output_axes=(0,))
  return None


def _find_states(tree, cls):
  """Every ``cls`` instance inside a (nested) optax state, depth-first."""
  return find_states(tree, lambda x: isinstance(x, cls))


def _leaf(states, field, name):
  """``getattr(s, field)[name]`` of the one state that holds leaf ``name``."""
  hits = [getattr(s, field)[name] for s in states
          if not isinstance(getattr(s, field)[name], optax.MaskedNode)]
  assert len(hits) == 1, (field, name, len(hits))
  return hits[0]


def _state_of(states, name):
  hits = [s for s in states if not isinstance(s.mu[name], optax.MaskedNode)]
  assert len(hits) == 1, (name, len(hits))
  return hits[0]


def run_golden(rel, tx, state_keys, *, tol_factor=1.0, steps=3):
  """Runs ``tx`` on the golden's gradients and checks every stored key.

  Args:
    rel: golden file, relative to the reference directory.
    tx: the transformation under test.
    state_keys: ``{golden state name: fn(opt_state, param name) -> array}``.
    tol_factor: multiplies the per-key tolerance (1 for fp32 goldens).
  """
  arrays, meta = load_golden(rel)
  names = _names(arrays)
  params = {n: jnp.asarray(arrays[f"{n}__param_init"]) for n in names}
  state = tx.init(params)
  update = jax.jit(tx.update)
  worst = 0.0
  for t in range(1, steps + 1):
    grads = {n: jnp.asarray(arrays[f"{n}__grad_t{t}"]) for n in names}
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    checks = [(f"{n}__param_t{t}", params[n]) for n in names]
    for golden_name, getter in state_keys.items():
      for n in names:
        key = f"{n}__state_{golden_name}_t{t}"
        if key in arrays:
          checks.append((key, getter(state, n)))
    for key, got in checks:
      rtol, atol = golden_tolerance(meta, key)
      rtol, atol = rtol * tol_factor, atol * tol_factor
      want = arrays[key]
      got = np.asarray(got, dtype=np.float64)
      np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=key)
      excess = np.max(np.abs(got - want) / (atol + rtol * np.abs(want)))
      worst = max(worst, float(excess))
  return worst


def _all(label):
  return lambda params: jax.tree.map(lambda _: label, params)


def _by_name(mapping, default):
  return lambda params: {k: mapping.get(k, default) for k in params}


def _golden_dims(rel):
  arrays, _ = load_golden(rel)
  return {n: _torch_dims(arrays[f"{n}__param_init"].shape) for n in _names(arrays)}


def momentum_of(state, name):
  return _leaf(_find_states(state, momentum_stages.EmaMomentumState), "mu", name)


# ---------------------------------------------------------------------------------------
# AuON
# ---------------------------------------------------------------------------------------


def test_auon_steps_fp32(highest_precision):
  # lr 0.08, momentum 0.9, wd 0.1, gamma 1.25; includes 1-D, 3-D and all-zero-grad leaves.
  tx = auon_lib.auon(0.08, momentum=0.9, weight_decay=0.1, gamma=1.25, label_fn=_all("ortho"))
  run_golden("auon/auon_steps_fp32.npz", tx, {"momentum_buffer": momentum_of})


def test_hybrid_auon_steps_fp32(highest_precision):
  rel = "auon/hybrid_auon_steps_fp32.npz"
  tx = auon_lib.hybrid_auon(0.05, momentum=0.9, weight_decay=0.05, gamma=2.0, ns_steps=4,
                            label_fn=_all("ortho"), dimension_numbers=_golden_dims(rel))
  run_golden(rel, tx, {"momentum_buffer": momentum_of})


def test_auon_adam_steps_fp32(highest_precision):
  tx = auon_lib.auon_adam(0.01, b1=0.8, b2=0.95, eps=1e-10, weight_decay=0.1)
  run_golden("auon/adam_steps_fp32.npz", tx, {
      "exp_avg": lambda s, n: s.mu[n],
      "exp_avg_sq": lambda s, n: s.nu[n],
      "step": lambda s, n: s.count,
  })


def test_auon_with_reference_adam_branch(highest_precision):
  """AuON's hidden matrices plus the reference Adam on the rest, in one transform."""
  tx = auon_lib.auon(0.08, label_fn=_all("adam"),
                     adam_tx=auon_lib.auon_adam(0.01, b1=0.8, b2=0.95, eps=1e-10,
                                                weight_decay=0.1))
  run_golden("auon/adam_steps_fp32.npz", tx, {})


# ---------------------------------------------------------------------------------------
# Aurora
# ---------------------------------------------------------------------------------------

_AURORA_FILES = [
    # file, pp_iterations, pp_beta, nesterov, compute dtype, tolerance factor
    ("aurora/aurora_steps_pp1_fp32.npz", 1, 0.5, True, jnp.float32, 1.0),
    ("aurora/aurora_steps_pp2_fp32.npz", 2, 0.5, True, jnp.float32, 1.0),
    ("aurora/aurora_steps_pp2_nonesterov_fp32.npz", 2, 0.35, False, jnp.float32, 1.0),
    # bf16 "as published" goldens are smoke tests (tolerance 1.5x the bf16-vs-fp32 gap).
    # Our bf16 rounding points differ from torch's (the reference also rounds O and the
    # leverage row norms to bf16); pp2 lands at 1.1x its per-key tolerance, so 1.5x.
    ("aurora/aurora_steps_pp1_bf16asis.npz", 1, 0.5, True, jnp.bfloat16, 1.5),
    ("aurora/aurora_steps_pp2_bf16asis.npz", 2, 0.5, True, jnp.bfloat16, 1.5),
]


@pytest.mark.parametrize("rel, pp_iterations, pp_beta, nesterov, dtype, factor", _AURORA_FILES,
                         ids=[f[0].split("/")[1][:-4] for f in _AURORA_FILES])
def test_aurora_steps(highest_precision, rel, pp_iterations, pp_beta, nesterov, dtype, factor):
  tx = aurora_lib.aurora(0.05, weight_decay=0.1, momentum=0.9, nesterov=nesterov,
                         pp_iterations=pp_iterations, pp_beta=pp_beta, compute_dtype=dtype,
                         label_fn=_all("ortho"), dimension_numbers=_golden_dims(rel))
  run_golden(rel, tx, {"momentum_buffer": momentum_of}, tol_factor=factor)


def test_riemannian_aurora_steps_fp32(highest_precision):
  rel = "aurora/riemannian_steps_fp32.npz"
  tx = aurora_lib.riemannian_aurora(
      0.05, weight_decay=0.1, momentum=0.9, nesterov=True, outer_steps=3, cg_steps=20,
      riemannian_eta=0.1, retraction_steps=2, compute_dtype=jnp.float32,
      label_fn=_all("ortho"), dimension_numbers=_golden_dims(rel))
  run_golden(rel, tx, {"momentum_buffer": momentum_of})


def test_aurora_nonfinite_update_is_skipped_and_counted():
  params = {"w": jnp.ones((4, 6)) * 0.1, "b": jnp.zeros(6)}
  labels = {"w": "ortho", "b": "adam"}
  tx = aurora_lib.aurora(compute_dtype=jnp.float32, label_fn=labels)
  state = tx.init(params)
  good = {"w": jnp.full((4, 6), 0.5).at[0, 0].set(1.0), "b": jnp.ones(6)}
  _, state = tx.update(good, state, params)
  m_before = momentum_of(state, "w")
  bad = {"w": good["w"].at[1, 2].set(jnp.nan), "b": jnp.ones(6)}
  updates, state = jax.jit(tx.update)(bad, state, params)
  np.testing.assert_array_equal(updates["w"], 0.0)  # no NaN reaches the weights
  assert np.all(np.isfinite(updates["b"]))  # the AdamW branch is independent
  np.testing.assert_array_equal(momentum_of(state, "w"), m_before)  # not advanced
  assert int(aurora_lib.nonfinite_count(state)) == 1
  updates, state = tx.update(good, state, params)
  assert np.all(np.isfinite(updates["w"])) and np.any(updates["w"] != 0)
  assert int(aurora_lib.nonfinite_count(state)) == 1
  # Under an outer apply_if_finite the Aurora guard is still the one reported.
  outer = optax.apply_if_finite(tx, max_consecutive_errors=5)
  outer_state = outer.init(params)
  _, outer_state = outer.update(good, outer_state, params)
  assert int(aurora_lib.nonfinite_count(outer_state)) == 0


def test_skip_nonfinite_updates_checks_the_output_too():
  # Finite gradients, non-finite output (an overflow inside the transformation).
  guard = aurora_lib.skip_nonfinite_updates(
      optax.chain(optax.trace(decay=0.5), optax.scale(jnp.inf)))
  params = {"w": jnp.ones((2, 3))}
  state = guard.init(params)
  updates, new_state = guard.update({"w": jnp.ones((2, 3))}, state, params)
  np.testing.assert_array_equal(updates["w"], 0.0)
  np.testing.assert_array_equal(new_state.inner_state[0].trace["w"], 0.0)  # not advanced
  assert int(new_state.total_notfinite) == 1 and int(new_state.notfinite_count) == 1
  ok = aurora_lib.skip_nonfinite_updates(optax.chain(optax.trace(decay=0.5), optax.scale(2.0)))
  updates, s2 = ok.update({"w": jnp.ones((2, 3))}, ok.init(params), params)
  np.testing.assert_array_equal(updates["w"], 2.0)
  assert int(s2.total_notfinite) == 0


# ---------------------------------------------------------------------------------------
# OAdamW
# ---------------------------------------------------------------------------------------


def _oadamw_state_keys():
  states = lambda s: _find_states(s, stable_adamw_stages.StableAdamWState)
  return {
      "exp_avg": lambda s, n: _leaf(states(s), "mu", n),
      "exp_avg_sq": lambda s, n: _leaf(states(s), "nu", n),
      "step": lambda s, n: _state_of(states(s), n).count,
  }


def test_oadamw_plain_steps_fp32(highest_precision):
  tx = oadamw_lib.oadamw(0.01, b1=0.9, b2=0.95, weight_decay=0.1, eps=1e-6, muon=False,
                         kahan_sum=False, label_fn=_all("adam"))
  run_golden("oadamw/plain_steps_fp32.npz", tx, _oadamw_state_keys())


def test_oadamw_muon_steps_fp32(highest_precision):
  # The 1-D 'bias' sits in the reference's Muon group but gets the raw gradient: the
  # same StableAdamW core without NS, i.e. our "adam" branch.
  rel = "oadamw/muon_steps_fp32.npz"
  tx = oadamw_lib.oadamw(0.01, b1=0.9, b2=0.95, weight_decay=0.1, eps=1e-6, kahan_sum=False,
                         label_fn=_by_name({"bias": "adam"}, "ortho"),
                         dimension_numbers=_golden_dims(rel))
  run_golden(rel, tx, _oadamw_state_keys())


def test_oadamw_mixed_decouple_gap2_steps_fp32(highest_precision):
  # Muon group {wide, tall} with ns_steps=3, update_proj_gap=2 (step 3 reuses step 2's
  # NS output); plain group {bias, square}; fully decoupled decay with max_lr=0.02.
  rel = "oadamw/mixed_decouple_gap2_steps_fp32.npz"
  tx = oadamw_lib.oadamw(0.01, b1=0.85, b2=0.98, weight_decay=1e-3, eps=1e-8,
                         decouple_lr=True, max_lr=0.02, kahan_sum=False, ns_steps=3,
                         update_proj_gap=2,
                         label_fn=_by_name({"wide": "ortho", "tall": "ortho"}, "adam"),
                         dimension_numbers=_golden_dims(rel))
  run_golden(rel, tx, _oadamw_state_keys())


def test_oadamw_gap_matters():
  """Without the NS cache the mixed golden must fail (the test can fail)."""
  rel = "oadamw/mixed_decouple_gap2_steps_fp32.npz"
  tx = oadamw_lib.oadamw(0.01, b1=0.85, b2=0.98, weight_decay=1e-3, eps=1e-8,
                         decouple_lr=True, max_lr=0.02, kahan_sum=False, ns_steps=3,
                         update_proj_gap=1,
                         label_fn=_by_name({"wide": "ortho", "tall": "ortho"}, "adam"),
                         dimension_numbers=_golden_dims(rel))
  with jax.default_matmul_precision("highest"), pytest.raises(AssertionError):
    run_golden(rel, tx, _oadamw_state_keys())


def test_oadamw_kahan_bf16_tracks_fp32():
  """bf16 parameters with Kahan summation follow the fp32 trajectory closely."""
  key = jax.random.PRNGKey(0)
  w32 = jax.random.normal(key, (16, 24)) * 0.5
  target = jax.random.normal(jax.random.PRNGKey(1), (16, 24))
  loss = lambda w: 0.5 * jnp.sum((w.astype(jnp.float32) - target) ** 2)

  def train(w, kahan):
    tx = oadamw_lib.oadamw(1e-3, kahan_sum=kahan, label_fn=_all("ortho"))
    state = tx.init(w)
    step = jax.jit(lambda w, s: tx.update(jax.grad(loss)(w).astype(w.dtype), s, w))
    for _ in range(60):
      u, state = step(w, state)
      w = optax.apply_updates(w, u)
    return w.astype(jnp.float32)

  ref = train(w32, None)
  with_kahan = train(w32.astype(jnp.bfloat16), None)
  without = train(w32.astype(jnp.bfloat16), False)
  err_k = float(jnp.max(jnp.abs(with_kahan - ref)))
  err_n = float(jnp.max(jnp.abs(without - ref)))
  assert err_k < 0.5 * err_n, (err_k, err_n)


def test_stable_adamw_takes_the_limit_for_a_gradient_whose_square_overflows():
  # |g| = 1e20 is finite but g² is inf in float32: the RMS clip must not turn it into NaN.
  tx = stable_adamw_stages.stable_adamw(1e-3, weight_decay=0.0)
  p = {"b": jnp.ones(3), "w": jnp.ones(2)}
  u, state = tx.update({"b": jnp.full(3, 1e20), "w": jnp.ones(2)}, tx.init(p), p)
  assert np.all(np.isfinite(np.asarray(u["b"]))) and np.all(np.asarray(u["b"]) == 0.0)
  np.testing.assert_allclose(np.asarray(u["w"]), -1e-3, rtol=1e-5)
  # A non-finite gradient still gives a non-finite update (nothing hidden).
  u, _ = tx.update({"b": jnp.array([1.0, jnp.inf, 1.0]), "w": jnp.full(2, jnp.nan)}, state, p)
  assert not np.all(np.isfinite(np.asarray(u["b"]))) and np.all(np.isnan(np.asarray(u["w"])))


def test_oadamw_keeps_one_set_of_moments_for_both_branches():
  # Both branches run the same StableAdamW core, so it runs once after the routing:
  # one mu/nu tree without masked copies, and no Kahan tree for float32 leaves.
  p = {"w": jnp.ones((4, 8)), "b": jnp.ones((8,)), "i": jnp.zeros((2,), jnp.int32)}
  tx = oadamw_lib.oadamw(1e-3)
  state = tx.init(p)
  (core,) = _find_states(state, stable_adamw_stages.StableAdamWState)
  assert set(core.mu) == {"w", "b", "i"}
  assert isinstance(core.mu["i"], optax.MaskedNode)  # the int leaf is frozen
  assert not any(isinstance(core.mu[k], optax.MaskedNode) for k in ("w", "b"))
  (kahan,) = _find_states(state, kahan_stages.KahanSummationState)
  assert kahan.compensation is None
  u, _ = tx.update({"w": jnp.ones((4, 8)), "b": jnp.ones((8,)), "i": jnp.zeros((2,), jnp.int32)},
                   state, p)
  np.testing.assert_array_equal(u["i"], 0)
  assert float(jnp.abs(u["w"]).max()) > 0 and float(jnp.abs(u["b"]).max()) > 0


def test_oadamw_runs_float16_leaves_in_float32():
  # A float16 second moment would overflow for |g| > 256 and freeze the leaf.
  p = {"b": jnp.ones((3,), jnp.float16)}
  tx = oadamw_lib.oadamw(1e-3, weight_decay=0.0, kahan_sum=False)
  state = tx.init(p)
  u, state = tx.update({"b": jnp.full((3,), 300.0, jnp.float16)}, state, p)
  u, state = tx.update({"b": jnp.ones((3,), jnp.float16)}, state, p)
  assert u["b"].dtype == jnp.float16
  states = _find_states(state, stable_adamw_stages.StableAdamWState)
  assert {leaf.dtype for s in states for leaf in jax.tree.leaves((s.mu, s.nu))} == {
      jnp.dtype(jnp.float32)}
  ref_tx = oadamw_lib.oadamw(1e-3, weight_decay=0.0, kahan_sum=False)
  p32, s32 = {"b": jnp.ones((3,), jnp.float32)}, None
  s32 = ref_tx.init(p32)
  _, s32 = ref_tx.update({"b": jnp.full((3,), 300.0)}, s32, p32)
  u32, _ = ref_tx.update({"b": jnp.ones(3)}, s32, p32)
  np.testing.assert_allclose(np.asarray(u["b"], np.float32), np.asarray(u32["b"]), rtol=2e-3)
