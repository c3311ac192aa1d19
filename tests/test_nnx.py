"""Every optimizer as ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` in an ``nnx.jit`` step.

A tiny language model (Embed + Linear + LayerNorm + head) trains for a few steps; the
default routing must send the embedding, the head, the biases and the norm to the
element-wise branch and only the hidden Linear kernel to the orthogonalized branch.
"""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from ortho_optax import routing
from ortho_optax.matrix_view import path_str
from ortho_optax.optimizers._common import find_states
from ortho_optax.stages.stable_adamw import StableAdamWState
from test_optax_conventions import NAMES, OPTIMIZERS, make

VOCAB, DIM, HIDDEN = 16, 8, 16


class TinyLM(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
    self.fc = nnx.Linear(DIM, HIDDEN, rngs=rngs)
    self.norm = nnx.LayerNorm(HIDDEN, rngs=rngs)
    self.lm_head = nnx.Linear(HIDDEN, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    h = jax.nn.gelu(self.fc(self.embed(tokens)))
    return self.lm_head(self.norm(h))


def _batch():
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 6), 0, VOCAB)
  return tokens, (tokens * 3 + 1) % VOCAB  # a learnable next-token map


def _loss(model, tokens, targets):
  logits = model(tokens)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _paths(tree):
  """``{path: leaf}`` with ``optax.MaskedNode`` kept as a leaf."""
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
  return {path_str(p): x for p, x in flat}


def test_default_routing_of_the_model():
  model = TinyLM(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  labels = _paths(routing.default_label_fn(state))
  assert labels == {
      "embed/embedding": "adam", "fc/kernel": "ortho", "fc/bias": "adam",
      "norm/scale": "adam", "norm/bias": "adam",
      "lm_head/kernel": "adam", "lm_head/bias": "adam",
  }
  assert _paths(routing.label_from_model(model)(state)) == labels
  report = routing.routing_report(state)
  assert "embed/embedding" in report and "ortho" in report


@pytest.mark.parametrize("name", NAMES)
def test_nnx_optimizer_trains(name):
  model = TinyLM(nnx.Rngs(0))
  lr = OPTIMIZERS[name][1]
  kwargs = dict(learning_rate=lr)
  if name != "oadamw":
    kwargs["adam_learning_rate"] = 1e-2
  optimizer = nnx.Optimizer(model, make(name, **kwargs), wrt=nnx.Param)
  embed0 = np.asarray(model.embed.embedding[...])
  fc0 = np.asarray(model.fc.kernel[...])

  @nnx.jit
  def train_step(model, optimizer, tokens, targets):
    loss, grads = nnx.value_and_grad(_loss)(model, tokens, targets)
    optimizer.update(model, grads)
    return loss

  tokens, targets = _batch()
  losses = [float(train_step(model, optimizer, tokens, targets)) for _ in range(8)]
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0], losses
  assert not np.allclose(model.embed.embedding[...], embed0)
  assert not np.allclose(model.fc.kernel[...], fc0)

  if name == "oadamw":
    # The routing first (Newton-Schulz on the hidden kernel only), then one StableAdamW
    # core with moments for every leaf, in one tree.
    assert isinstance(optimizer.opt_state[0], optax.MultiTransformState)
    (core,) = find_states(optimizer.opt_state, lambda x: isinstance(x, StableAdamWState))
    moments = _paths(core.mu)
    assert not any(isinstance(v, optax.MaskedNode) for v in moments.values())
    assert any(k.endswith("fc/kernel") for k in moments)
    assert any(k.endswith("embed/embedding") for k in moments)
    return
  # Routing inside the optimizer state: the orthogonalized branch holds buffers only for
  # the hidden kernel, the element-wise branch for everything else.
  inner = optimizer.opt_state.inner_states
  ortho = _paths(inner["ortho"])
  adam = _paths(inner["adam"])
  assert all(isinstance(v, optax.MaskedNode) for k, v in ortho.items()
             if k.endswith(("embedding", "lm_head/kernel", "bias", "scale")))
  assert any(k.endswith("fc/kernel") and not isinstance(v, optax.MaskedNode)
             for k, v in ortho.items())
  assert all(isinstance(v, optax.MaskedNode) for k, v in adam.items()
             if k.endswith("fc/kernel"))
  assert any(k.endswith("embed/embedding") and not isinstance(v, optax.MaskedNode)
             for k, v in adam.items())
