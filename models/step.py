"""The training step of the GPT: one compiled, donated ``jax.jit`` over the split state.

:func:`train_step` is the step itself, a pure function ``(graphdef, state, inputs,
targets) -> (state, loss)`` of the ``nnx.split`` state of a model and its
``nnx.Optimizer``. :class:`TrainStep` is how the trainer and ``benchmarks/bench_gpt.py``
run it: ``nnx.split`` once, the state kept as a flat list of arrays (no NNX graph
traversal and no nested-pytree flattening per call), compiled ahead of time (so its
compilation is timed on its own and a later call can never silently recompile), and the
state donated, i.e. updated in place on the device.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from ortho_optax.models import gpt
from ortho_optax.models import mesh as mesh_lib


def train_step(graphdef, state, inputs, targets, mesh=None):
  """One optimizer step of ``nnx.merge(graphdef, state) = (model, optimizer)``.

  Args:
    graphdef, state: ``nnx.split((model, optimizer))``.
    inputs, targets: ``(batch, seq)`` token ids.
    mesh: optional ``(data, fsdp)`` mesh: the new state is constrained to its FSDP
      shardings so it stays sharded from step to step.

  Returns:
    ``(new state, loss)``.
  """
  model, optimizer = nnx.merge(graphdef, state)
  loss, grads = nnx.value_and_grad(gpt.loss_fn)(model, inputs, targets)
  optimizer.update(model, grads)
  if mesh is not None:
    mesh_lib.constrain_nnx(mesh, model, optimizer)
  return nnx.state((model, optimizer)), loss


class TrainStep:
  """:func:`train_step` compiled for one model, optimizer and batch shape.

  Building it compiles the step (:attr:`compile_s` seconds). Each call then runs one step
  on :attr:`leaves`, the current state as a flat list of arrays, donated: the model's and
  optimizer's own arrays are consumed by the first call, and :meth:`write_back` points
  them at the current state again.

  Args:
    model: the GPT.
    optimizer: its ``nnx.Optimizer``.
    inputs, targets: a batch of the shape (and sharding) every call will get.
    mesh: optional ``(data, fsdp)`` mesh (see :func:`train_step`).

  Attributes:
    leaves: the current state, flat.
    compile_s: seconds spent tracing and compiling the step.
    step_fn: the pure step ``(leaves, inputs, targets) -> (leaves, loss)``, for tools that
      compile it another way (a profiler that must not donate).
  """

  def __init__(self, model, optimizer, inputs, targets, mesh=None):
    self._objects = (model, optimizer)
    graphdef, state = nnx.split(self._objects)
    leaves, treedef = jax.tree.flatten(state)
    self._treedef = treedef
    self.leaves = _distinct_buffers(leaves)

    def step(leaves, inputs, targets):
      new_state, loss = train_step(graphdef, jax.tree.unflatten(treedef, leaves), inputs,
                                   targets, mesh)
      new_leaves, new_treedef = jax.tree.flatten(new_state)
      if new_treedef != treedef:
        raise ValueError("the optimizer step changed the structure of the state.")
      return new_leaves, loss

    def evaluate(leaves, inputs, targets):
      model, _ = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
      return gpt.loss_fn(model, inputs, targets)

    self.step_fn = step
    start = time.perf_counter()
    self._step = jax.jit(step, donate_argnums=0).lower(self.leaves, inputs, targets).compile()
    self.compile_s = time.perf_counter() - start
    self._evaluate = jax.jit(evaluate)

  def __call__(self, inputs, targets) -> jax.Array:
    """One step; returns the loss (a device scalar: reading it waits for the step)."""
    self.leaves, loss = self._step(self.leaves, inputs, targets)
    return loss

  def loss(self, inputs, targets) -> jax.Array:
    """The loss of the current model on a batch (any batch size), without a step."""
    return self._evaluate(self.leaves, inputs, targets)

  def wait(self) -> None:
    """Blocks until every step dispatched so far has finished on the device."""
    jax.block_until_ready(self.leaves)

  @property
  def state(self) -> nnx.State:
    """The current ``nnx.State`` of ``(model, optimizer)``."""
    return jax.tree.unflatten(self._treedef, self.leaves)

  def write_back(self) -> None:
    """Points the model's and optimizer's variables at the current state."""
    nnx.update(self._objects, self.state)


def make_train_step(mesh=None):
  """:func:`train_step` on the objects: ``step(model, optimizer, x, y) -> loss``.

  For code that keeps using the model and optimizer between steps (the objects are
  updated in place; nothing is donated). The trainer runs :class:`TrainStep`.
  """
  jitted = jax.jit(train_step, static_argnums=(0, 4))

  def run(model, optimizer, inputs, targets):
    graphdef, state = nnx.split((model, optimizer))
    state, loss = jitted(graphdef, state, inputs, targets, mesh)
    nnx.update((model, optimizer), state)
    return loss

  return run


def _distinct_buffers(leaves):
  """``leaves`` with every repeated array (the same object at two leaves, as an optimizer
  state may hold) replaced by a copy: donation rejects a buffer passed twice."""
  seen = set()
  out = []
  for x in leaves:
    if isinstance(x, jax.Array) and id(x) in seen:
      x = jnp.copy(x)
    seen.add(id(x))
    out.append(x)
  return out
