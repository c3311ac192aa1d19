"""GPT-2 as a user writes it in Flax NNX: the model of ``bench_user_loop.py``.

Deliberately plain and independent of ``ortho_optax.models``: learned token (``wte``) and
position (``wpe``) embeddings, pre-LayerNorm blocks with a fused ``c_attn`` projection,
GELU MLP, a final ``ln_f`` and an untied ``lm_head``, with the parameter names of the
GPT-2 checkpoints. Parameters are float32 and every layer computes in ``dtype`` (bf16 by
default); the loss is the plain cross-entropy on float32 logits.

References:
  A. Radford et al., "Language Models are Unsupervised Multitask Learners", 2019.
  A. Karpathy, nanoGPT, https://github.com/karpathy/nanoGPT (``model.py``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Config:
  """Model hyperparameters.

  Attributes:
    vocab_size: token vocabulary (GPT-2's 50257 padded to 50304).
    seq_len: maximum sequence length (rows of ``wpe``).
    num_layers: transformer blocks.
    num_heads: attention heads.
    model_dim: residual width.
    dtype: compute dtype of every layer (parameters stay float32).
  """

  vocab_size: int = 50304
  seq_len: int = 1024
  num_layers: int = 12
  num_heads: int = 12
  model_dim: int = 768
  dtype: str = "bfloat16"

  def __post_init__(self):
    for name in ("vocab_size", "seq_len", "num_layers", "num_heads", "model_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"Config.{name} must be a positive int, got {value!r}.")
    if self.model_dim % self.num_heads:
      raise ValueError(f"model_dim={self.model_dim} must be a multiple of "
                       f"num_heads={self.num_heads}.")


PRESETS = {
    "small": Config(),
    "tiny": Config(vocab_size=256, seq_len=64, num_layers=2, num_heads=4, model_dim=64),
}


def get_config(preset: str, **overrides) -> Config:
  """The config of a preset (``small`` = GPT-2 small, ``tiny`` for CPU tests).

  Raises:
    ValueError: for an unknown preset.
  """
  if preset not in PRESETS:
    raise ValueError(f"preset={preset!r}; choose one of {sorted(PRESETS)}.")
  return dataclasses.replace(PRESETS[preset], **overrides)


def _attention_implementation() -> str | None:
  # cuDNN's fused attention on GPUs; JAX picks the XLA path elsewhere.
  return "cudnn" if jax.default_backend() == "gpu" else None


class CausalSelfAttention(nnx.Module):

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    d, dt = cfg.model_dim, jnp.dtype(cfg.dtype)
    self.num_heads = cfg.num_heads
    self.c_attn = nnx.Linear(d, 3 * d, dtype=dt, param_dtype=jnp.float32, rngs=rngs)
    self.c_proj = nnx.Linear(d, d, dtype=dt, param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
    q, k, v = (a.reshape(b, t, self.num_heads, d // self.num_heads) for a in (q, k, v))
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                     implementation=_attention_implementation())
    return self.c_proj(y.reshape(b, t, d))


class MLP(nnx.Module):

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    d, dt = cfg.model_dim, jnp.dtype(cfg.dtype)
    self.c_fc = nnx.Linear(d, 4 * d, dtype=dt, param_dtype=jnp.float32, rngs=rngs)
    self.c_proj = nnx.Linear(4 * d, d, dtype=dt, param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, x):
    return self.c_proj(jax.nn.gelu(self.c_fc(x)))


class Block(nnx.Module):

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    d, dt = cfg.model_dim, jnp.dtype(cfg.dtype)
    self.ln_1 = nnx.LayerNorm(d, dtype=dt, param_dtype=jnp.float32, rngs=rngs)
    self.attn = CausalSelfAttention(cfg, rngs=rngs)
    self.ln_2 = nnx.LayerNorm(d, dtype=dt, param_dtype=jnp.float32, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class GPT(nnx.Module):
  """Token ids ``(batch, time)`` to logits ``(batch, time, vocab)`` in float32."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    d, dt = cfg.model_dim, jnp.dtype(cfg.dtype)
    self.wte = nnx.Embed(cfg.vocab_size, d, dtype=dt, param_dtype=jnp.float32, rngs=rngs)
    self.wpe = nnx.Embed(cfg.seq_len, d, dtype=dt, param_dtype=jnp.float32, rngs=rngs)
    self.h = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.ln_f = nnx.LayerNorm(d, dtype=dt, param_dtype=jnp.float32, rngs=rngs)
    self.lm_head = nnx.Linear(d, cfg.vocab_size, use_bias=False, dtype=dt,
                              param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, idx):
    x = self.wte(idx) + self.wpe(jnp.arange(idx.shape[1]))
    for block in self.h:
      x = block(x)
    return self.lm_head(self.ln_f(x)).astype(jnp.float32)


def loss_fn(model: GPT, x, y):
  """Mean next-token cross-entropy."""
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
