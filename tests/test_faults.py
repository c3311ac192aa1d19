"""Determinism on the CPU: two runs of an optimizer with the same seed give bit-identical
parameters and states, for every optimizer (the trainer's resume and crashed-checkpoint
faults are tested with its checkpoints, in tests/test_checkpoints.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ortho_optax

OPTIMIZERS = ["muon", "turbo_muon", "auon", "hybrid_auon", "aurora", "riemannian_aurora",
              "adaptive_muon", "normuon", "adamuon", "namo", "oadamw"]


@functools.lru_cache(maxsize=None)
def _optimizer_step(name):
  tx = getattr(ortho_optax, name)()
  loss = lambda p: jnp.sum(jnp.tanh(p["blocks"]["kernel"] @ p["mlp"]["kernel"]) ** 2) + jnp.sum(
      p["blocks"]["bias"] ** 2)

  @jax.jit
  def step(params, state):
    g = jax.grad(loss)(params)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  return tx, step


def _run_optimizer(name, seed=0, steps=3):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = {"blocks": {"kernel": jax.random.normal(k[0], (8, 12)),
                       "bias": jax.random.normal(k[1], (12,))},
            "mlp": {"kernel": jax.random.normal(k[2], (12, 8))}}
  tx, step = _optimizer_step(name)
  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_is_bit_deterministic(name):
  (p1, s1), (p2, s2) = _run_optimizer(name), _run_optimizer(name)
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # ... and the seed matters (the comparison above is not vacuous).
  p3, _ = _run_optimizer(name, seed=1)
  assert not np.array_equal(np.asarray(p1["mlp"]["kernel"]), np.asarray(p3["mlp"]["kernel"]))
