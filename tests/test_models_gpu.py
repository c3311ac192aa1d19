"""GPU-only checks of the GPT: cuDNN attention and the FP8 head against the XLA paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ortho_optax.models import gpt

pytestmark = pytest.mark.gpu


def _pair(**kw):
  cfg = dict(num_layers=2, model_dim=256, num_heads=4, seq_len=128, compute_dtype="bfloat16")
  a = gpt.GPT(gpt.get_config("tiny", **(cfg | kw)), rngs=nnx.Rngs(0))
  for blk in a.blocks:  # non-zero projections so every path matters
    for mod in (blk.attn.o, blk.mlp.proj):
      mod.kernel[...] = jax.random.normal(jax.random.key(1), mod.kernel[...].shape) * 0.02
  a.lm_head.kernel[...] = jax.random.normal(jax.random.key(2), a.lm_head.kernel[...].shape) * 0.05
  return a


def test_cudnn_attention_matches_xla():
  model = _pair(attention="cudnn")
  tokens = jax.random.randint(jax.random.key(3), (4, 128), 0, 256)
  ref_cfg = gpt.get_config("tiny", **{**model.config.__dict__, "attention": "xla"})
  graphdef, state = nnx.split(model)
  ref = nnx.merge(nnx.graphdef(gpt.GPT(ref_cfg, rngs=nnx.Rngs(0))), state)
  a, b = model(tokens), ref(tokens)
  rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  assert rel < 2e-2, rel
  ga = nnx.grad(gpt.loss_fn)(model, tokens, tokens)
  gb = nnx.grad(gpt.loss_fn)(ref, tokens, tokens)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    assert np.linalg.norm(x - y) <= 5e-2 * np.linalg.norm(y) + 1e-6


def test_fp8_head_close_to_bf16_head():
  model = _pair(fp8_head=True)
  cfg = gpt.get_config("tiny", **{**model.config.__dict__, "fp8_head": False})
  ref = nnx.merge(nnx.graphdef(gpt.GPT(cfg, rngs=nnx.Rngs(0))), nnx.state(model))
  tokens = jax.random.randint(jax.random.key(3), (4, 128), 0, 256)
  la, lb = gpt.loss_fn(model, tokens, tokens), gpt.loss_fn(ref, tokens, tokens)
  assert abs(float(la) - float(lb)) < 0.05 * float(lb)
