"""Trainer, checkpoints, optimizer registry and CLI of ortho_optax.models (micro configs)."""

import dataclasses
import functools
import json
import math

import numpy as np
import pytest

import ortho_optax
from ortho_optax.models import cli, optimizers as opt_lib, step as step_lib, train as train_lib

MICRO = dict(num_layers=1, model_dim=32, num_heads=2)


def _cfg(**kw):
  base = dict(preset="tiny", model=MICRO, seq_len=16, data="embedded:prose", batch_size=4,
              steps=8, eval_every=4, eval_batches=2, log_every=2, warmup_steps=0,
              schedule="constant")
  return train_lib.TrainConfig(**(base | kw))


def test_schedule_warmup_then_decay():
  f = train_lib.lr_multiplier(100, 10, "cosine", 0.1)
  assert float(f(0)) == pytest.approx(0.1)
  assert float(f(9)) == pytest.approx(1.0)
  assert float(f(10)) == pytest.approx(1.0)
  assert float(f(100)) == pytest.approx(0.1)
  assert float(f(55)) == pytest.approx(0.55, abs=1e-6)
  g = train_lib.lr_multiplier(100, 0, "linear", 0.0)
  assert float(g(50)) == pytest.approx(0.5)
  with pytest.raises(ValueError, match="schedule"):
    train_lib.lr_multiplier(100, 0, "step")


def test_registry_errors():
  with pytest.raises(ValueError, match="optimizer='sgdx' is not supported"):
    opt_lib.resolve("sgdx")
  assert opt_lib.OPTIMIZERS[1:] == tuple(ortho_optax.OPTIMIZERS)
  assert opt_lib.resolve("muon") is ortho_optax.muon
  with pytest.raises(ValueError, match="takes no argument"):
    opt_lib.build("adamw", 1e-3, not_an_arg=1)
  assert opt_lib.parse_opt_args(["momentum=0.9", "nesterov=false", "x=none", "m=muon"]) == {
      "momentum": 0.9, "nesterov": False, "x": None, "m": "muon"}
  with pytest.raises(ValueError, match="key=value"):
    opt_lib.parse_opt_args(["momentum"])
  with pytest.raises(ValueError, match="steps must be an int >= 1, got steps=0"):
    _cfg(steps=0).validate()


@pytest.mark.slow
@pytest.mark.parametrize("name", opt_lib.OPTIMIZERS)
def test_every_optimizer_lowers_the_loss(name):
  """10 steps of each optimizer (its tiny default lr) on a micro GPT, < 60 s in all."""
  import jax.numpy as jnp
  from flax import nnx
  from ortho_optax.models import data as data_lib, gpt
  cfg = _cfg(optimizer=name, steps=10)
  model = gpt.GPT(cfg.model_config(), rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, train_lib.make_optimizer(cfg), wrt=nnx.Param)
  step = step_lib.make_train_step()
  sampler = data_lib.BatchSampler(data_lib.load_embedded("prose").train, 4, 16, seed=0)
  losses = []
  for i in range(cfg.steps):
    x, y = sampler(i)
    losses.append(float(step(model, optimizer, jnp.asarray(x), jnp.asarray(y))))
  assert all(math.isfinite(l) for l in losses), losses
  assert losses[0] == pytest.approx(math.log(256), rel=1e-4)  # zero-init head
  assert np.mean(losses[-3:]) < losses[0] - 0.2, losses


def test_train_step_matches_the_step_on_the_objects():
  # The trainer's flat, donated, ahead-of-time compiled step computes what the same step
  # on the objects does; after write_back() the objects hold the new state.
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from ortho_optax.models import data as data_lib
  cfg = _cfg(optimizer="muon", steps=3)
  sampler = data_lib.BatchSampler(data_lib.load_embedded("prose").train, 4, 16, seed=0)
  runs = []
  for flat in (False, True):
    model, optimizer = train_lib.init_model_and_optimizer(cfg)
    x0, y0 = map(jnp.asarray, sampler(0))
    step = (step_lib.TrainStep(model, optimizer, x0, y0) if flat else
            functools.partial(step_lib.make_train_step(), model, optimizer))
    losses = []
    for i in range(cfg.steps):
      x, y = sampler(i)
      losses.append(float(step(jnp.asarray(x), jnp.asarray(y))))
    if flat:
      assert step.compile_s > 0
      step.write_back()
    runs.append((losses, jax.tree.leaves(nnx.state((model, optimizer)))))
  (l0, s0), (l1, s1) = runs
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  assert l1[-1] < l1[0]
  for a, b in zip(s0, s1):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_train_step_takes_a_state_holding_one_array_twice():
  # A transform whose state holds the same array at two leaves (legal in optax) must not
  # break the trainer's donated step ("donate the same buffer twice").
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from ortho_optax.models import data as data_lib, gpt

  def shared_state():
    def init(params):
      del params
      zero = jnp.zeros([], jnp.int32)
      return (zero, zero)

    def update(updates, state, params=None):
      del params
      return updates, (state[0] + 1, state[1])
    return optax.GradientTransformation(init, update)

  cfg = _cfg(steps=3)
  model = gpt.GPT(cfg.model_config(), rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(shared_state(), optax.adamw(1e-3)),
                            wrt=nnx.Param)
  sampler = data_lib.BatchSampler(data_lib.load_embedded("prose").train, 4, 16, seed=0)
  step = step_lib.TrainStep(model, optimizer, *map(jnp.asarray, sampler(0)))
  for i in range(cfg.steps):
    x, y = sampler(i)
    assert math.isfinite(float(step(jnp.asarray(x), jnp.asarray(y))))
  step.write_back()
  counts = [int(v) for v in jax.tree.leaves(nnx.state(optimizer))
            if v.shape == () and jnp.issubdtype(v.dtype, jnp.integer)]
  assert 3 in counts and 0 in counts  # the transform's two counters, now distinct


def test_python_dash_m_entry_point():
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-m", "ortho_optax", "compare", "--help"],
                       capture_output=True, text=True, timeout=120, check=True).stdout
  assert "--lr-mults" in out and "turbo_muon" in out
