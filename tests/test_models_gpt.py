"""The NNX GPT: shapes, dtypes, causality, init, routing of its parameters."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ortho_optax import routing
from ortho_optax.models import gpt

MICRO = dict(num_layers=1, model_dim=32, num_heads=2, seq_len=16)


def _model(**kw):
  return gpt.GPT(gpt.get_config("tiny", **(MICRO | kw)), rngs=nnx.Rngs(0))


def test_forward_shapes_and_dtypes():
  model = _model()
  tokens = jnp.arange(2 * 16, dtype=jnp.int32).reshape(2, 16) % 256
  logits = model(tokens)
  assert logits.shape == (2, 16, 256)
  assert logits.dtype == jnp.float32
  params = nnx.state(model, nnx.Param)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_zero_init_head_gives_uniform_loss_and_projections_are_zero():
  model = _model()
  assert not np.any(np.asarray(model.lm_head.kernel[...]))
  assert not np.any(np.asarray(model.blocks[0].attn.o.kernel[...]))
  assert not np.any(np.asarray(model.blocks[0].mlp.proj.kernel[...]))
  x = jnp.zeros((1, 16), jnp.int32)
  np.testing.assert_allclose(float(gpt.loss_fn(model, x, x)), math.log(256), rtol=1e-6)


def test_causal_future_tokens_do_not_change_past_logits():
  model = _model()
  # Give the zero-initialised projections weights so the test can fail.
  for mod in (model.lm_head, model.blocks[0].attn.o, model.blocks[0].mlp.proj):
    mod.kernel[...] = jax.random.normal(jax.random.key(1), mod.kernel[...].shape) * 0.1
  a = jax.random.randint(jax.random.key(2), (1, 16), 0, 256)
  b = a.at[:, 10:].set((a[:, 10:] + 7) % 256)
  la, lb = model(a), model(b)
  np.testing.assert_allclose(la[:, :10], lb[:, :10], atol=1e-5)
  assert not np.allclose(la[:, 10:], lb[:, 10:], atol=1e-3)


def test_softcap_bounds_logits():
  model = _model(logit_softcap=2.0)
  model.lm_head.kernel[...] = jnp.ones_like(model.lm_head.kernel[...]) * 10.0
  logits = model(jnp.zeros((1, 4), jnp.int32))
  assert float(jnp.max(jnp.abs(logits))) <= 2.0


def test_bf16_compute_and_fp8_head_run():
  model = _model(compute_dtype="bfloat16", fp8_head=True)
  model.lm_head.kernel[...] = jax.random.normal(jax.random.key(0), (32, 256)) * 0.1
  x = jnp.zeros((2, 8), jnp.int32)
  loss, grads = nnx.value_and_grad(gpt.loss_fn)(model, x, x)
  assert np.isfinite(float(loss))
  g = np.asarray(grads["lm_head"]["kernel"][...])
  assert g.dtype == np.float32 and np.any(g != 0)
  # fp8 head output is close to the bf16 head output.
  ref = gpt.GPT(gpt.get_config("tiny", **(MICRO | dict(compute_dtype="bfloat16"))),
                rngs=nnx.Rngs(0))
  ref.lm_head.kernel[...] = model.lm_head.kernel[...]
  np.testing.assert_allclose(model(x), ref(x), atol=0.15, rtol=0.1)


def test_presets_and_bad_config():
  small = gpt.get_config("small")
  assert (small.num_layers, small.model_dim, small.num_heads, small.seq_len,
          small.vocab_size) == (12, 768, 12, 1024, 50304)
  medium = gpt.get_config("medium")
  assert (medium.num_layers, medium.model_dim, medium.num_heads) == (24, 1024, 16)
  with pytest.raises(ValueError, match="unknown preset"):
    gpt.get_config("huge")
  with pytest.raises(ValueError, match="must be a multiple of"):
    gpt.get_config("tiny", num_heads=3)
  with pytest.raises(ValueError, match="unknown GPTConfig field"):
    gpt.get_config("tiny", width=3)
  with pytest.raises(ValueError, match="attention"):
    gpt.get_config("tiny", attention="flash")
  with pytest.raises(ValueError, match="exceeds seq_len"):
    _model()(jnp.zeros((1, 17), jnp.int32))


def test_param_count_and_flops_match_anchors_convention():
  small = gpt.get_config("small")
  model = nnx.eval_shape(lambda: gpt.GPT(small, rngs=nnx.Rngs(0)))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert abs(n - 162.2e6) < 0.5e6  # ANCHORS: 162M with the untied 50304 head
  n_no_embed = n - 50304 * 768
  # ANCHORS: 32k tokens in 70.7 ms is 40.1% of 989 TFLOP/s.
  mfu = gpt.flops_per_token(small, n_no_embed) * 32768 / 0.0707 / 989e12
  assert abs(mfu - 0.401) < 0.003


def test_routing_sends_embed_and_head_to_adam_and_kernels_to_ortho():
  model = _model()
  labels = routing.default_label_fn(nnx.state(model, nnx.Param))
  flat = {"/".join(str(getattr(k, "key", k)) for k in p): v
          for p, v in jax.tree_util.tree_leaves_with_path(labels)}
  assert flat["embed/embedding"] == "adam"
  assert flat["lm_head/kernel"] == "adam"
  hidden = [k for k in flat if k.startswith("blocks/")]
  assert len(hidden) == 6 and all(flat[k] == "ortho" for k in hidden)


@pytest.mark.parametrize("cap", [30.0, None])
def test_fused_cross_entropy_matches_autodiff(cap):
  # Random 16-bit logits: value and gradient of the fused loss equal the plain float32
  # path (softcap, logsumexp, gather) differentiated by JAX.
  logits = (jax.random.normal(jax.random.key(0), (3, 7, 301)) * 20).astype(jnp.bfloat16)
  targets = jax.random.randint(jax.random.key(1), (3, 7), 0, 301)

  def plain(l):
    z = l.astype(jnp.float32)
    if cap is not None:
      z = cap * jnp.tanh(z / cap)
    return gpt.cross_entropy(z, targets)

  v1, g1 = jax.value_and_grad(lambda l: gpt.fused_cross_entropy(l, targets, cap))(logits)
  v2, g2 = jax.value_and_grad(plain)(logits)
  assert g1.dtype == jnp.bfloat16
  np.testing.assert_allclose(float(v1), float(v2), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g1, np.float32), np.asarray(g2, np.float32),
                             rtol=1e-2, atol=1e-6)


def test_bf16_loss_fn_uses_the_fused_path_with_the_same_gradients(monkeypatch):
  calls = []
  real = gpt.fused_cross_entropy
  monkeypatch.setattr(gpt, "fused_cross_entropy",
                      lambda *a: calls.append(a[0].dtype) or real(*a))
  cfg = gpt.get_config("tiny", compute_dtype="bfloat16")
  model = gpt.GPT(cfg, rngs=nnx.Rngs(0))
  model.lm_head.kernel[...] = jax.random.normal(
      jax.random.key(1), model.lm_head.kernel[...].shape) * 0.5
  x = jax.random.randint(jax.random.key(2), (2, 32), 0, 256)
  y = jax.random.randint(jax.random.key(3), (2, 32), 0, 256)

  def plain(m, x, y):
    return gpt.cross_entropy(m(x), y)

  l1, g1 = nnx.value_and_grad(gpt.loss_fn)(model, x, y)
  assert calls == [jnp.bfloat16]  # 16-bit logits went through the fused loss
  l2, g2 = nnx.value_and_grad(plain)(model, x, y)
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-2,
                               atol=2e-2 * float(np.max(np.abs(np.asarray(b)))) + 1e-8)
