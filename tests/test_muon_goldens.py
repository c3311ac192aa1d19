"""Muon, Turbo-Muon and AdaptiveMuon against the PyTorch golden vectors (3 steps each).

Every file's matrices go through the orthogonalized chain (``label_fn`` routes
them to "ortho"; the parameters the reference sends to Adam go to "adam") with
PyTorch-layout matrix views per leaf: ``(out, in)`` -> ``TORCH_LAYOUT``, batched
``(B, out, in)`` -> ``MatrixDims((2,), (1,))``, conv ``(out, in, kh, kw)`` ->
``MatrixDims((1, 2, 3), (0,))``. Parameters and optimizer state are compared after
every step at the per-key tolerance of the golden file.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import golden_tolerance, load_golden
from ortho_optax.matrix_view import TORCH_LAYOUT, MatrixDims
from ortho_optax.stages.momentum import EmaMomentumState
from ortho_optax.stages.second_moment import SecondMomentState


def torch_dims(tree):
  """Per-leaf PyTorch-layout views (works on the masked sub-tree of multi_transform)."""
  def one(x):
    if x.ndim == 2:
      return TORCH_LAYOUT
    if x.ndim == 3:
      return MatrixDims((2,), (1,))
    if x.ndim == 4:
      return MatrixDims((1, 2, 3), (0,))
    raise ValueError(f"no matrix view for rank {x.ndim}")
  return jax.tree.map(one, tree)


def _find(tree, cls):
  leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, cls))
  return [x for x in leaves if isinstance(x, cls)]


def _param_names(z):
  return sorted({k.split("__")[0] for k in z})


def _check(name, got, z, meta, key, failures):
  want = z[key]
  got = np.asarray(got, np.float32).reshape(want.shape)
  rtol, atol = golden_tolerance(meta, key)
  if not np.allclose(got, want, rtol=rtol, atol=atol):
    err = np.max(np.abs(got - want) - rtol * np.abs(want))
    failures.append(f"{key}: max excess error {err:.3g} (atol {atol:.3g}, rtol {rtol:.3g})")


def run_golden(rel, make_tx, adam_params=()):
  """Runs 3 steps of ``make_tx(hyperparameters, labels)`` and compares with ``rel``."""
  z, meta = load_golden(rel)
  hp = meta["hyperparameters"]
  names = _param_names(z)
  params = {n: jnp.asarray(z[f"{n}__param_init"]) for n in names}
  labels = {n: "adam" if n in adam_params else "ortho" for n in names}
  tx = make_tx(hp, labels)
  state = tx.init(params)
  update = jax.jit(tx.update)
  failures = []
  for t in (1, 2, 3):
    grads = {n: jnp.asarray(z[f"{n}__grad_t{t}"]) for n in names}
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for n in names:
      _check(n, params[n], z, meta, f"{n}__param_t{t}", failures)
    (mom,) = _find(state, EmaMomentumState)
    second = _find(state, SecondMomentState)
    adam = _find(state, optax.ScaleByAdamState)
    for n in names:
      if f"{n}__state_momentum_buffer_t{t}" in z:
        _check(n, mom.mu[n], z, meta, f"{n}__state_momentum_buffer_t{t}", failures)
      if f"{n}__state_moment2_buffer_t{t}" in z:
        _check(n, second[0].nu[n], z, meta, f"{n}__state_moment2_buffer_t{t}", failures)
      if f"{n}__state_exp_avg_t{t}" in z:
        _check(n, adam[0].mu[n], z, meta, f"{n}__state_exp_avg_t{t}", failures)
        _check(n, adam[0].nu[n], z, meta, f"{n}__state_exp_avg_sq_t{t}", failures)
  assert not failures, f"{rel}:\n" + "\n".join(failures)
  return meta


# ------------------------------------------------------------------ Turbo-Muon


def _turbo(compute_dtype):
  from ortho_optax.optimizers.turbo_muon import turbo_muon

  def make(hp, labels):
    kw = {}
    if "adam_group" in hp:
      a, hp = hp["adam_group"], hp["muon_group"]
      kw = dict(adam_learning_rate=a["lr"], adam_b1=a["betas"][0], adam_b2=a["betas"][1],
                adam_eps=a["eps"], adam_weight_decay=a["weight_decay"])
    return turbo_muon(
        learning_rate=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"],
        variant=hp["variant"], compute_dtype=compute_dtype, label_fn=labels,
        dimension_numbers=torch_dims, backend="xla", **kw)
  return make


@pytest.mark.parametrize("rel", ["turbo/turbo_steps_fp32.npz", "turbo/standard_steps_fp32.npz"])
def test_turbo_muon_steps_fp32(rel, highest_precision):
  run_golden(rel, _turbo(None))


def test_turbo_muon_conv_scale_factor_matches_reference_quirk():
  # SPEC 2.2 step 5: the reference scales a conv update by sqrt(max(1, kh/kw)) from the 4-D
  # shape; we use the (out, in*kh*kw) view's factor. The golden kernel makes both sqrt(1.5),
  # so the fp32 golden above checks the honest factor without an extra_scale_factor.
  out_, in_, kh, kw = 18, 2, 3, 2
  assert math.isclose(math.sqrt(max(1, kh / kw)), math.sqrt(max(1, out_ / (in_ * kh * kw))))


def test_turbo_muon_aux_adam_fp32(highest_precision):
  run_golden("turbo/aux_adam_steps_fp32.npz", _turbo(None), adam_params=("bias", "emb"))


def test_turbo_muon_steps_bf16_as_published():
  run_golden("turbo/turbo_steps_bf16asis.npz", _turbo(jnp.bfloat16))


# ------------------------------------------------------------------ AuON repo's Muon


def _auon_muon(compute_dtype):
  from ortho_optax.optimizers.muon import muon

  def make(hp, labels):
    return muon(learning_rate=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"],
                ns_steps=hp["ns_steps"], compute_dtype=compute_dtype, label_fn=labels,
                dimension_numbers=torch_dims, backend="xla")
  return make


def test_auon_muon_steps_fp32(highest_precision):
  run_golden("auon/muon_steps_fp32.npz", _auon_muon(None))


def test_auon_muon_steps_bf16_as_published():
  run_golden("auon/muon_steps_bf16asis.npz", _auon_muon(jnp.bfloat16))


# ------------------------------------------------------------------ NVIDIA Muon / AdaptiveMuon


def _eo_kwargs(hp):
  return dict(
      learning_rate=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"],
      nesterov=hp["nesterov"], weight_decay_method=hp["weight_decay_method"],
      coefficients=hp["coefficient_type"], ns_steps=hp["num_ns_steps"],
      scale_mode=hp["scale_mode"], extra_scale_factor=hp["extra_scale_factor"],
      compute_dtype=None if hp["fp32_matmul_prec"] == "highest" else jnp.bfloat16,
      dimension_numbers=torch_dims, backend="xla")


def _eo_muon(hp, labels):
  from ortho_optax.optimizers.muon import muon
  # NVIDIA normalises by max(||X||_F, 1e-15); +1e-15 is the same for nonzero X.
  return muon(eps=1e-15, label_fn=labels, **_eo_kwargs(hp))


EO_MUON_FP32 = [
    "eo/muon_nesterov_decoupled_spectral_quintic5_fp32.npz",
    "eo/muon_plain_independent_shape_polarexpress8_fp32.npz",
    "eo/muon_nesterov_l2_unitrms_aol4_fp32.npz",
    "eo/muon_nesterov_palm_spectral_cubic5_fp32.npz",
]


@pytest.mark.parametrize("rel", EO_MUON_FP32)
def test_eo_muon_steps_fp32(rel, highest_precision):
  run_golden(rel, _eo_muon)


def test_eo_muon_default_precision_bf16():
  run_golden("eo/muon_defaultprec_bf16medium.npz", _eo_muon)


def _eo_adaptive(hp, labels):
  from ortho_optax.optimizers.adaptive_muon import adaptive_muon
  return adaptive_muon(moment2_method=hp["moment2_method"], beta2=hp["beta2"], eps=hp["eps"],
                       ns_eps=1e-15, label_fn=labels, **_eo_kwargs(hp))


@pytest.mark.parametrize("method", ["adamuon", "normuon", "namo"])
def test_eo_adaptive_muon_steps_fp32(method, highest_precision):
  run_golden(f"eo/adaptive_{method}_fp32.npz", _eo_adaptive)


def test_thin_variants_equal_adaptive_muon(highest_precision):
  from ortho_optax.optimizers.adaptive_muon import adamuon, adaptive_muon, namo, normuon
  z, meta = load_golden("eo/adaptive_normuon_fp32.npz")
  params = {"w": jnp.asarray(z["wide__param_init"])}
  grads = {"w": jnp.asarray(z["wide__grad_t1"])}
  labels = {"w": "ortho"}
  for method, fn in [("adamuon", adamuon), ("normuon", normuon), ("namo", namo)]:
    a = fn(0.01, label_fn=labels, compute_dtype=None, dimension_numbers=TORCH_LAYOUT)
    b = adaptive_muon(0.01, moment2_method=method, label_fn=labels, compute_dtype=None,
                      dimension_numbers=TORCH_LAYOUT)
    ua, _ = a.update(grads, a.init(params), params)
    ub, _ = b.update(grads, b.init(params), params)
    np.testing.assert_array_equal(ua["w"], ub["w"])


# ------------------------------------------------------------------ construction


def test_defaults_follow_the_references():
  import inspect
  from ortho_optax.optimizers.adaptive_muon import adaptive_muon
  from ortho_optax.optimizers.muon import muon
  from ortho_optax.optimizers.turbo_muon import turbo_muon
  d = lambda f: {k: p.default for k, p in inspect.signature(f).parameters.items()}
  m, t, a = d(muon), d(turbo_muon), d(adaptive_muon)
  # AuON repo's Muon (SPEC 1.4).
  from ortho_optax.optimizers import _common
  # Step counts default to None (optax.inject_hyperparams keeps them static): 5 steps.
  assert m["ns_steps"] is None and a["ns_steps"] is None and _common.NS_STEPS == 5
  assert (m["learning_rate"], m["momentum"], m["weight_decay"]) == (0.02, 0.95, 0.01)
  assert (m["nesterov"], m["coefficients"], m["scale_mode"], m["eps"]) == (
      True, "muon", "shape_scaling", 1e-7)
  assert jnp.dtype(m["compute_dtype"]) == jnp.bfloat16  # a name: not a schedule to optax
  # Turbo-Muon (SPEC 2.2-2.3) and its aux Adam.
  assert (t["learning_rate"], t["momentum"], t["weight_decay"], t["variant"], t["eps"]) == (
      0.02, 0.95, 0.0, "turbo", 1e-6)
  assert (t["adam_learning_rate"], t["adam_b1"], t["adam_b2"], t["adam_eps"],
          t["adam_weight_decay"]) == (3e-4, 0.9, 0.95, 1e-10, 0.0)
  # NVIDIA AdaptiveMuon (SPEC 5.4/5.5).
  assert (a["learning_rate"], a["momentum"], a["weight_decay"], a["nesterov"]) == (
      3e-4, 0.95, 0.01, False)
  assert (a["coefficients"], a["scale_mode"], a["weight_decay_method"]) == (
      "quintic", "spectral", "decoupled")
  g = {"w": jax.random.normal(jax.random.key(0), (8, 24))}
  for f in (muon, adaptive_muon):
    by_default, explicit = f(backend="xla"), f(ns_steps=5, backend="xla")
    np.testing.assert_array_equal(by_default.update(g, by_default.init(g), g)[0]["w"],
                                  explicit.update(g, explicit.init(g), g)[0]["w"])
  assert (a["moment2_method"], a["beta2"], a["eps"]) == ("adamuon", 0.95, 1e-8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(learning_rate=-0.1), "learning_rate"),
    (dict(momentum=1.0), "momentum=1.0"),
    (dict(momentum=-0.5), "momentum=-0.5"),
    (dict(ns_steps=0), "ns_steps"),
    (dict(coefficients="muonn"), "muonn"),
    (dict(scale_mode="spectra"), "spectra"),
    (dict(weight_decay_method="l1"), "l1"),
    (dict(preconditioning="svd"), "svd"),
    (dict(weight_decay=-1.0), "weight_decay"),
])
def test_muon_rejects_bad_hyperparameters(kwargs, match):
  from ortho_optax.optimizers.muon import muon
  with pytest.raises(ValueError, match=match):
    muon(**kwargs)


def test_turbo_and_adaptive_reject_bad_hyperparameters():
  from ortho_optax.optimizers.adaptive_muon import adaptive_muon, namo
  from ortho_optax.optimizers.turbo_muon import turbo_muon
  with pytest.raises(ValueError, match="'fast'.*turbo"):
    turbo_muon(variant="fast")
  with pytest.raises(ValueError, match="ns_steps|steps"):
    turbo_muon(ns_steps=6)  # turbo_aol takes the last steps of a 5-triple table
  with pytest.raises(ValueError, match="turbo_muon sets coefficients and preconditioning by "
                                       "its variant.*use ortho_optax.muon"):
    turbo_muon(coefficients="quintic", preconditioning="frobenius")
  with pytest.raises(ValueError, match="'adam'.*adamuon"):
    adaptive_muon(moment2_method="adam")
  with pytest.raises(ValueError, match="namo.*l2"):
    adaptive_muon(moment2_method="namo", weight_decay_method="l2")
  with pytest.raises(ValueError, match="namo.*l2"):
    namo(weight_decay_method="l2")
  with pytest.raises(ValueError, match="beta2=1.0"):
    adaptive_muon(beta2=1.0)


@pytest.mark.parametrize("name", ["muon", "turbo_muon", "adaptive_muon", "normuon", "adamuon",
                                  "namo"])
def test_inject_hyperparams_controls_whole_optimizer(name, highest_precision):
  from ortho_optax.optimizers import adaptive_muon as am, muon as mu, turbo_muon as tm
  from ortho_optax.optimizers.muon import inject_static_args
  factory = {"muon": mu.muon, "turbo_muon": tm.turbo_muon, "adaptive_muon": am.adaptive_muon,
             "normuon": am.normuon, "adamuon": am.adamuon, "namo": am.namo}[name]
  static = inject_static_args(factory)
  assert {"ns_steps", "compute_dtype", "label_fn", "dimension_numbers"} <= set(static)
  assert not {"learning_rate", "momentum", "weight_decay"} & set(static)
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  kw = dict(compute_dtype=None, label_fn={"w": "ortho", "b": "adam"}, backend="xla")
  tx = optax.inject_hyperparams(factory, static_args=static)(
      learning_rate=0.05, momentum=0.9, weight_decay=0.1, **kw)
  state = tx.init(params)
  state.hyperparams["learning_rate"] = jnp.asarray(0.01)
  state.hyperparams["momentum"] = jnp.asarray(0.5)
  state.hyperparams["weight_decay"] = jnp.asarray(0.3)
  got, _ = jax.jit(tx.update)(grads, state, params)
  ref = factory(learning_rate=0.01, momentum=0.5, weight_decay=0.3, **kw)
  want, _ = ref.update(grads, ref.init(params), params)
  other = factory(learning_rate=0.05, momentum=0.9, weight_decay=0.1, **kw)
  far, _ = other.update(grads, other.init(params), params)
  assert not np.allclose(far["w"], want["w"], rtol=1e-3)  # the injected values matter
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7)


def test_learning_rate_schedule():
  from ortho_optax.optimizers.muon import muon
  params = {"w": jnp.ones((4, 6))}
  grads = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)), jnp.float32)}
  sched = optax.linear_schedule(0.1, 0.0, 2)
  kw = dict(weight_decay=0.0, label_fn={"w": "ortho"}, compute_dtype=None, backend="xla")
  tx, ref = muon(learning_rate=sched, **kw), muon(learning_rate=1.0, **kw)
  s, r = tx.init(params), ref.init(params)
  for lr in (0.1, 0.05, 0.0):
    u, s = tx.update(grads, s, params)
    v, r = ref.update(grads, r, params)
    np.testing.assert_allclose(u["w"], lr * v["w"], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["muon", "turbo_muon", "standard", "adamuon", "normuon", "namo"])
def test_zero_gradients_only_decay(name):
  from ortho_optax.optimizers import adaptive_muon as am, muon as mu, turbo_muon as tm
  factory = {"muon": mu.muon, "turbo_muon": tm.turbo_muon,
             "standard": lambda **k: tm.turbo_muon(variant="standard", **k),
             "adamuon": am.adamuon, "normuon": am.normuon, "namo": am.namo}[name]
  params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)}
  tx = factory(learning_rate=0.1, weight_decay=0.2, label_fn={"w": "ortho"}, backend="xla")
  state = tx.init(params)
  for _ in range(2):
    u, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
    np.testing.assert_allclose(u["w"], -0.1 * 0.2 * params["w"], rtol=1e-6)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


def test_mu_dtype_keeps_momentum_in_bfloat16():
  from ortho_optax.optimizers.muon import muon
  params = {"w": jnp.ones((6, 4), jnp.float32)}
  tx = muon(mu_dtype=jnp.bfloat16, label_fn={"w": "ortho"}, backend="xla")
  u, state = tx.update({"w": jnp.full((6, 4), 0.5)}, tx.init(params), params)
  (mom,) = _find(state, EmaMomentumState)
  assert mom.mu["w"].dtype == jnp.bfloat16 and u["w"].dtype == jnp.float32
