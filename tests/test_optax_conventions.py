"""Every optimizer of the library against the usual Optax conventions.

Parametrized over all public optimizers (muon family, AuON, Aurora, OAdamW): jit without
retracing, extra ``update`` kwargs, ``inject_hyperparams``, ``tree_map_params``, chains
with clipping and schedules, ``apply_if_finite``, ``MultiSteps``, convergence on small
problems, zero gradients, a save / restore round trip and construction-time validation.
"""

import functools
import inspect
import io
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import assert_trees_equal
import ortho_optax as oo
from ortho_optax.optimizers import adaptive_muon as adaptive_lib
from ortho_optax.optimizers import auon as auon_lib
from ortho_optax.optimizers import aurora as aurora_lib
from ortho_optax.optimizers import muon as muon_lib
from ortho_optax.optimizers import oadamw as oadamw_lib
from ortho_optax.optimizers import turbo_muon as turbo_lib


def _adaptive(method):
  fn = functools.partial(adaptive_lib.adaptive_muon, moment2_method=method)
  fn.__signature__ = inspect.signature(adaptive_lib.adaptive_muon).replace(parameters=[
      p for p in inspect.signature(adaptive_lib.adaptive_muon).parameters.values()
      if p.name != "moment2_method"])
  return fn


# name -> (factory, learning rate for the convergence problems, name of its momentum)
OPTIMIZERS = {
    "muon": (muon_lib.muon, 0.1, "momentum"),
    "turbo_muon": (turbo_lib.turbo_muon, 0.1, "momentum"),
    "auon": (auon_lib.auon, 0.03, "momentum"),
    "hybrid_auon": (auon_lib.hybrid_auon, 0.1, "momentum"),
    "aurora": (aurora_lib.aurora, 0.1, "momentum"),
    "riemannian_aurora": (aurora_lib.riemannian_aurora, 0.1, "momentum"),
    "adaptive_muon_adamuon": (_adaptive("adamuon"), 0.03, "momentum"),
    "adaptive_muon_normuon": (_adaptive("normuon"), 0.03, "momentum"),
    "adaptive_muon_namo": (_adaptive("namo"), 0.1, "momentum"),
    "normuon": (adaptive_lib.normuon, 0.03, "momentum"),
    "adamuon": (adaptive_lib.adamuon, 0.03, "momentum"),
    "namo": (adaptive_lib.namo, 0.1, "momentum"),
    "oadamw": (oadamw_lib.oadamw, 0.1, "b1"),
}
NAMES = list(OPTIMIZERS)


def make(name, **kwargs):
  return OPTIMIZERS[name][0](**kwargs)


def _params():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(42), 3)
  return {
      "dense": {"kernel": jax.random.normal(k1, (6, 4)) * 0.3,
                "bias": jax.random.normal(k2, (4,)) * 0.1},
      "out_proj": {"kernel": jax.random.normal(k3, (4, 4)) * 0.3},
      "gain": jnp.float32(1.0),
  }


def _grads(seed=0, scale=1.0):
  params = _params()
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      scale * jax.random.normal(k, jnp.shape(x)) for k, x in zip(keys, leaves)])


def _all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def chex_close(a, b, rtol=2e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _map_params():
  """``optax.tree.map_params`` (optax >= 0.2.5) or the older ``optax.tree_map_params``."""
  return getattr(getattr(optax, "tree", None), "map_params", None) or optax.tree_map_params


@functools.lru_cache(maxsize=None)
def _jitted(name):
  """The default optimizer ``name`` and its jitted ``update`` (shared between tests).

  The jitted function forwards extra keyword arguments to ``update`` (as a line search
  would pass ``value=``), so every test that uses it also checks they are accepted.
  """
  tx = make(name)
  traces = []

  @jax.jit
  def update(grads, state, params, value):
    traces.append(1)
    return tx.update(grads, state, params, value=value, grad=grads)

  return tx, update, traces


def _step(name, grads, state, params):
  _, update, _ = _jitted(name)
  return update(grads, state, params, jnp.float32(1.0))


@pytest.mark.parametrize("name", NAMES)
def test_jit_no_retrace_extra_args_zero_grads_and_save_restore(name):
  tx, _, traces = _jitted(name)
  params = _params()
  state = tx.init(params)
  n_traces = len(traces)
  # A zero gradient from a fresh state: a finite update (only weight decay acts).
  zeros = jax.tree.map(jnp.zeros_like, params)
  u, state = _step(name, zeros, state, params)
  assert _all_finite(u) and _all_finite(state)
  for seed in range(2):
    u, state = _step(name, _grads(seed), state, params)
    assert _all_finite(u)
    params = optax.apply_updates(params, u)
  u, state = _step(name, zeros, state, params)  # zero gradient after real ones
  assert _all_finite(u) and _all_finite(state)
  assert len(traces) - n_traces <= 1  # at most one trace (none if another test traced)
  assert jax.tree.structure(u) == jax.tree.structure(params)
  # Save every state leaf to an .npz in memory and restore it into a fresh structure.
  leaves, treedef = jax.tree.flatten(state)
  buf = io.BytesIO()
  np.savez(buf, *[np.asarray(x) for x in leaves])
  buf.seek(0)
  loaded = np.load(buf)
  restored_leaves = [jnp.asarray(loaded[f"arr_{i}"]) for i in range(len(leaves))]
  template = jax.tree.structure(tx.init(params))
  assert template == treedef
  restored = jax.tree.unflatten(template, restored_leaves)
  for x, y in zip(leaves, restored_leaves):
    assert np.asarray(x).dtype == np.asarray(y).dtype
  p1, p2, s1, s2 = params, params, state, restored
  for seed in range(2, 4):
    u1, s1 = _step(name, _grads(seed), s1, p1)
    u2, s2 = _step(name, _grads(seed), s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  assert_trees_equal(p1, p2)
  assert_trees_equal(s1, s2)
  assert len(traces) - n_traces <= 1


@pytest.mark.parametrize("name", NAMES)
def test_state_can_be_donated(name):
  # Training loops donate the optimizer state (jax.jit(donate_argnums=...)); XLA rejects
  # a buffer passed twice, so no two state leaves may share one, before or after a step.
  tx = make(name)
  params = _params()
  state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=1)
  def step(grads, state, params):
    return tx.update(grads, state, params)

  for seed in range(3):
    leaves = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
    assert len({id(x) for x in leaves}) == len(leaves)
    assert len({x.unsafe_buffer_pointer() for x in leaves}) == len(leaves)
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", "Some donated buffers were not usable")
      u, state = step(_grads(seed), state, params)
    params = optax.apply_updates(params, u)
  assert _all_finite(params)


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams(name):
  factory, _, mom = OPTIMIZERS[name]
  injected = ("learning_rate", mom, "weight_decay")
  static = tuple(p for p in inspect.signature(factory).parameters if p not in injected)
  tx = optax.inject_hyperparams(factory, static_args=static)(
      learning_rate=0.02, **{mom: 0.9}, weight_decay=0.0)
  params = _params()
  traces = []

  @jax.jit
  def update(grads, state, params):
    traces.append(1)
    return tx.update(grads, state, params)

  state = tx.init(params)
  _, state = update(_grads(0), state, params)
  u1, _ = update(_grads(1), state, params)
  # The update of a hidden matrix is proportional to the learning rate (no decay).
  state2 = state._replace(hyperparams={**state.hyperparams, "learning_rate": jnp.float32(0.04)})
  u2, _ = update(_grads(1), state2, params)
  np.testing.assert_allclose(u2["dense"]["kernel"], 2 * u1["dense"]["kernel"], rtol=1e-5,
                             atol=1e-8)
  assert np.any(np.asarray(u1["dense"]["kernel"]) != 0)
  state0 = state._replace(hyperparams={**state.hyperparams, "learning_rate": jnp.float32(0.0)})
  u0, _ = update(_grads(1), state0, params)
  np.testing.assert_array_equal(u0["dense"]["kernel"], 0.0)
  # A different momentum changes the next update; weight decay now acts on the weights.
  state3 = state._replace(hyperparams={**state.hyperparams, mom: jnp.float32(0.5),
                                       "weight_decay": jnp.float32(0.1)})
  u3, _ = update(_grads(1), state3, params)
  assert not np.allclose(u3["dense"]["kernel"], u1["dense"]["kernel"])
  assert len(traces) == 1  # hyperparameter changes do not retrace


@pytest.mark.parametrize("name", NAMES)
def test_tree_map_params(name):
  tx = make(name)
  params = _params()
  state = tx.init(params)
  mapped = _map_params()(tx, lambda v: jnp.full_like(v, 7.0), state,
                         transform_non_params=lambda v: v)
  assert jax.tree.structure(mapped) == jax.tree.structure(state)
  # The parameter-structured buffers (momentum / moments of the kernels) were mapped;
  # step counters were not.
  before, after = jax.tree.leaves(state), jax.tree.leaves(mapped)
  changed = [a for a, b in zip(after, before) if not np.array_equal(np.asarray(a), np.asarray(b))]
  assert changed and all(np.all(np.asarray(c) == 7.0) for c in changed)
  assert (6, 4) in {jnp.shape(c) for c in changed}
  assert all(np.issubdtype(np.asarray(c).dtype, np.floating) for c in changed)


@pytest.mark.parametrize("name", NAMES)
def test_chain_clip_schedule_and_apply_if_finite(name):
  """``apply_if_finite(chain(clip_by_global_norm, opt(schedule)))``: one compilation."""
  lr = optax.warmup_cosine_decay_schedule(0.0, 0.05, 2, 10)
  tx = optax.apply_if_finite(
      optax.chain(optax.clip_by_global_norm(1.0), make(name, learning_rate=lr)),
      max_consecutive_errors=3)
  params = _params()
  state = tx.init(params)
  step = jax.jit(tx.update)
  u, state = step(_grads(0, scale=100.0), state, params)  # schedule(0) = 0
  np.testing.assert_allclose(u["dense"]["kernel"], 0.0, atol=1e-7)
  for seed in range(1, 4):
    u, state = step(_grads(seed, scale=100.0), state, params)
    params = optax.apply_updates(params, u)
  assert _all_finite(params)
  assert not np.allclose(params["dense"]["kernel"], _params()["dense"]["kernel"])
  # A NaN gradient: the step is skipped and the state (momentum, counters) unchanged.
  nan_grads = jax.tree.map(lambda g: g * jnp.nan, _grads(5))
  u, new_state = step(nan_grads, state, params)
  for x in jax.tree.leaves(u):
    np.testing.assert_array_equal(np.asarray(x), 0.0)
  assert_trees_equal(new_state.inner_state, state.inner_state)
  assert int(new_state.notfinite_count) == 1 and not bool(new_state.last_finite)
  u, state = step(_grads(6), new_state, params)  # and training continues
  assert _all_finite(u) and bool(state.last_finite)


@pytest.mark.parametrize("name", NAMES)
def test_multi_steps_updates_only_on_real_steps(name):
  inner = _jitted(name)[0]
  tx = optax.MultiSteps(inner, every_k_schedule=2)
  params = _params()
  state = tx.init(params)
  step = jax.jit(tx.update)
  g0, g1 = _grads(0), _grads(1)
  u, state = step(g0, state, params)
  for x in jax.tree.leaves(u):
    np.testing.assert_array_equal(np.asarray(x), 0.0)
  assert_trees_equal(state.inner_opt_state, inner.init(params))  # nothing orthogonalized
  u, state = step(g1, state, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g0, g1)
  u_ref, inner_state = _step(name, mean, inner.init(params), params)
  chex_close(u, u_ref, rtol=1e-4, atol=1e-6)
  chex_close(state.inner_opt_state, inner_state, rtol=1e-4, atol=1e-6)


# Convergence: four independent problems in one parameter tree (one compilation).
_K = jax.random.split(jax.random.PRNGKey(0), 4)
_X = jax.random.normal(_K[0], (32, 8))
_W_TRUE = jax.random.normal(_K[1], (8, 6))
_B_TRUE = jax.random.normal(_K[2], (6,))
_T = jax.random.normal(_K[3], (5, 5))


def _problem_losses(p):
  quadratic = 0.5 * jnp.sum((p["quad"]["kernel"] - _T) ** 2)
  w = p["rosen"]["kernel"]  # three independent 2-D Rosenbrock problems, one per row
  rosenbrock = jnp.sum((1 - w[:, 0]) ** 2 + 100 * (w[:, 1] - w[:, 0] ** 2) ** 2)
  matrix = jnp.mean((_X @ p["mat"]["kernel"] - _X @ _W_TRUE) ** 2)
  mixed = jnp.mean((_X @ p["mixed"]["kernel"] + p["mixed"]["bias"]
                    - (_X @ _W_TRUE + _B_TRUE)) ** 2)
  return jnp.stack([quadratic, rosenbrock, matrix, mixed])


@pytest.mark.parametrize("name", NAMES)
def test_convergence_quadratic_rosenbrock_matrix_mixed(name):
  steps = 300
  lr = OPTIMIZERS[name][1]
  kwargs = dict(learning_rate=optax.cosine_decay_schedule(lr, steps), weight_decay=0.0)
  if name != "oadamw":
    kwargs["adam_learning_rate"] = optax.cosine_decay_schedule(0.05, steps)
  tx = make(name, **kwargs)
  params = {"quad": {"kernel": jnp.zeros((5, 5))}, "rosen": {"kernel": jnp.zeros((3, 2))},
            "mat": {"kernel": jnp.zeros((8, 6))},
            "mixed": {"kernel": jnp.zeros((8, 6)), "bias": jnp.zeros(6)}}

  def body(carry, _):
    p, s = carry
    g = jax.grad(lambda p: _problem_losses(p).sum())(p)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  run = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), None, steps)[0][0])
  final = run(params)
  ratio = np.asarray(_problem_losses(final) / _problem_losses(params))
  assert np.all(ratio < 0.1), dict(zip(["quadratic", "rosenbrock", "matrix", "mixed"], ratio))


_BAD = [("learning_rate", -1.0), ("weight_decay", -0.5), ("momentum", 1.5)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arg, value", _BAD, ids=[b[0] for b in _BAD])
def test_bad_hyperparameters_raise_value_error(name, arg, value):
  if arg == "momentum":
    arg = OPTIMIZERS[name][2]
  with pytest.raises(ValueError, match=arg) as info:
    make(name, **{arg: value})
  assert repr(value) in str(info.value) or str(value) in str(info.value)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arg, value", _BAD, ids=[b[0] for b in _BAD])
def test_bad_concrete_array_hyperparameters_raise(name, arg, value):
  # A NumPy or concrete JAX array has a known value: it is checked like a number.
  if arg == "momentum":
    arg = OPTIMIZERS[name][2]
  for array in (np.asarray(value), jnp.asarray(value)):
    with pytest.raises(ValueError, match=f"{arg} must be a finite number.*concrete array"):
      make(name, **{arg: array})
  with pytest.raises(ValueError, match=r"learning_rate must be a scalar, got an array of shape"):
    make(name, learning_rate=jnp.array([0.1, 0.2]))


def test_traced_hyperparameters_are_accepted_and_valid_arrays_work():
  tx = optax.inject_hyperparams(oo.muon, static_args=oo.inject_static_args(oo.muon))(0.02)
  params = {"w": jnp.ones((4, 3))}
  state = tx.init(params)
  jax.jit(tx.update)(params, state, params)  # the hyperparameters are tracers here
  oo.muon(learning_rate=jnp.asarray(0.02), momentum=np.asarray(0.9))


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_checks_its_backend(name):
  with pytest.raises(ValueError, match=r"backend='cuda' is not supported; valid choices: "
                                       r"'auto', 'xla', 'pallas'"):
    make(name, backend="cuda")


@pytest.mark.parametrize("name", NAMES)
def test_bad_adam_hyperparameters_raise(name):
  if name == "oadamw":
    with pytest.raises(ValueError, match="b2"):
      make(name, b2=1.0)
    with pytest.raises(ValueError, match="eps"):
      make(name, eps=0.0)
    return
  with pytest.raises(ValueError, match="adam_b2"):
    make(name, adam_b2=1.0)
  with pytest.raises(ValueError, match="adam_learning_rate"):
    make(name, adam_learning_rate=-3e-4)
