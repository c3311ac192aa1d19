"""A Flax NNX GPT in the style of modded-nanogpt, for validating ortho-optax.

The model follows the speedrun GPT (KellerJordan/modded-nanogpt's ``train_gpt.py``)
without its speedrun-only extras (value embeddings, U-net skips, per-block scalars):
token embedding, rotary positions
with half-truncated frequencies, RMSNorm without weights, QK-norm, ReLU² MLP,
zero-initialised output projections, an untied output head and an optional tanh logit
soft-cap. Master weights are float32 and matmuls run in ``compute_dtype`` (bf16 by
default). Attention goes through :func:`jax.nn.dot_product_attention` (cuDNN on GPUs,
XLA elsewhere).

Every hidden weight is a plain 2-D ``nnx.Linear`` kernel ``(in, out)``: ``q``, ``k``,
``v`` and ``o`` in attention, ``fc`` and ``proj`` in the MLP. So the default
:func:`ortho_optax.routing.default_label_fn` sends them to the orthogonalized chain with
the default Flax view, and the token table (``embed``) and the output head (``lm_head``)
to AdamW. Separate q/k/v projections (rather than one fused ``qkv``) keep each
projection its own matrix for Newton–Schulz, as the seeds do, with no need for a
``MatrixDims(num_splits=3)``.

References:
  Jordan et al., modded-nanogpt (2024), https://github.com/KellerJordan/modded-nanogpt
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from ortho_optax import validation


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Model hyperparameters.

  Attributes:
    vocab_size: token vocabulary (GPT-2's 50257 is padded to 50304).
    num_layers: number of transformer blocks.
    num_heads: attention heads; ``model_dim`` must be a multiple.
    model_dim: residual width.
    seq_len: maximum sequence length (sets the rotary table).
    mlp_ratio: MLP hidden width over ``model_dim``.
    logit_softcap: ``c·tanh(logits/c)`` on the head's output, or ``None`` for none.
    compute_dtype: dtype of activations and matmuls (weights stay float32); ``"auto"``
      is bfloat16 on GPUs/TPUs and float32 on CPUs (where XLA emulates bf16 matmuls
      about 4x slower than float32).
    attention: ``"auto"`` (cuDNN on a GPU with 16-bit compute, XLA otherwise),
      ``"cudnn"`` or ``"xla"``.
    fp8_head: run the output head's matmul in float8 e4m3 with fixed scales, as
      modded-nanogpt does (Hopper GPUs; slower elsewhere, off by default).
    rope_base: rotary frequencies are ``(1/rope_base)^linspace(0, 1, D/4)``.
  """

  vocab_size: int = 256
  num_layers: int = 2
  num_heads: int = 4
  model_dim: int = 128
  seq_len: int = 64
  mlp_ratio: int = 4
  logit_softcap: float | None = 15.0
  compute_dtype: str = "auto"
  attention: Literal["auto", "cudnn", "xla"] = "auto"
  fp8_head: bool = False
  rope_base: float = 1024.0

  def __post_init__(self):
    check_fields(dataclasses.asdict(self), lambda field: f"GPTConfig.{field}")

  @property
  def head_dim(self) -> int:
    return self.model_dim // self.num_heads

  @property
  def dtype(self):
    if self.compute_dtype == "auto":
      return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(self.compute_dtype)


#: Integer fields of :class:`GPTConfig` (each >= 1).
POSITIVE_INT_FIELDS = ("vocab_size", "num_layers", "num_heads", "model_dim", "seq_len",
                       "mlp_ratio")
ATTENTION_CHOICES = ("auto", "cudnn", "xla")
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")


def check_fields(values: dict, name: Callable[[str], str] = str) -> None:
  """Checks :class:`GPTConfig` field values (all of them or some overrides).

  Args:
    values: field name -> value.
    name: how a field is named in the message (``GPTConfig.model_dim``, ``--model-dim``).

  Raises:
    ValueError: naming the field, its value and what is allowed.
  """
  for field in POSITIVE_INT_FIELDS:
    if field in values:
      validation.check_int(name(field), values[field], 1)
  if "attention" in values:
    validation.check_choice(name("attention"), values["attention"], ATTENTION_CHOICES)
  if "compute_dtype" in values:
    validation.check_choice(name("compute_dtype"), values["compute_dtype"], DTYPE_CHOICES)
  cap = values.get("logit_softcap")
  if cap is not None:
    validation.check_positive(name("logit_softcap"), cap)
  dim, heads = values.get("model_dim"), values.get("num_heads")
  if dim is not None and heads is not None:
    if dim % heads:
      raise ValueError(f"{name('model_dim')}={dim} must be a multiple of "
                       f"{name('num_heads')}={heads}.")
    if (dim // heads) % 4:
      raise ValueError(f"the head size {name('model_dim')}={dim} / {name('num_heads')}="
                       f"{heads} = {dim // heads} must be a multiple of 4 (rotary positions).")


PRESETS: dict[str, GPTConfig] = {
    # Trains on a laptop CPU in minutes on the byte-level corpus.
    "tiny": GPTConfig(vocab_size=256, num_layers=2, num_heads=4, model_dim=128, seq_len=64),
    # GPT-2 small (124M without the head; 162M with the untied 50304-token head).
    "small": GPTConfig(vocab_size=50304, num_layers=12, num_heads=12, model_dim=768,
                       seq_len=1024, logit_softcap=30.0),
    # GPT-2 medium (350M).
    "medium": GPTConfig(vocab_size=50304, num_layers=24, num_heads=16, model_dim=1024,
                        seq_len=1024, logit_softcap=30.0),
}


def get_config(preset: str, **overrides) -> GPTConfig:
  """Returns the named preset with ``overrides`` applied.

  Raises:
    ValueError: for an unknown preset or field name.
  """
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; valid choices: {sorted(PRESETS)}.")
  fields = {f.name for f in dataclasses.fields(GPTConfig)}
  bad = sorted(set(overrides) - fields)
  if bad:
    raise ValueError(f"unknown GPTConfig field(s) {bad}; valid: {sorted(fields)}.")
  return dataclasses.replace(PRESETS[preset], **overrides)


def rms_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Weightless RMSNorm over the last axis, computed in float32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return y.astype(x.dtype)


def rotary_tables(head_dim: int, seq_len: int, base: float = 1024.0):
  """cos/sin tables ``(seq_len, head_dim/2)`` with modded-nanogpt's half-truncated rotary.

  Frequencies ``(1/base)^linspace(0, 1, D/4)`` followed by ``D/4`` zeros, so half of
  the rotated pairs carry no position (they pass through unchanged).
  """
  quarter = head_dim // 4
  freqs = (1.0 / base) ** jnp.linspace(0.0, 1.0, quarter, dtype=jnp.float32)
  freqs = jnp.concatenate([freqs, jnp.zeros((quarter,), jnp.float32)])
  theta = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * freqs[None, :]
  return jnp.cos(theta), jnp.sin(theta)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates ``x`` ``(batch, seq, heads, D)`` pairwise on its two halves."""
  t = x.shape[1]
  cos = cos[None, :t, None, :].astype(x.dtype)
  sin = sin[None, :t, None, :].astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], axis=-1)


def _attention_impl(config: GPTConfig) -> str | None:
  if config.attention == "xla":
    return "xla"
  if config.attention == "cudnn":
    return "cudnn"
  on_gpu = jax.default_backend() == "gpu"
  sixteen_bit = config.dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if on_gpu and sixteen_bit and config.head_dim <= 128 else "xla"


def _linear(din: int, dout: int, config: GPTConfig, rngs: nnx.Rngs, zero: bool = False):
  # CastedLinear init of the speedrun: uniform with bound sqrt(3)·0.5·din^-1/2, i.e. a
  # standard deviation of 0.5/sqrt(din).
  init = (nnx.initializers.zeros_init() if zero else
          nnx.initializers.variance_scaling(0.25, "fan_in", "uniform"))
  return nnx.Linear(din, dout, use_bias=False, kernel_init=init, dtype=config.dtype,
                    param_dtype=jnp.float32, rngs=rngs)


class CausalSelfAttention(nnx.Module):
  """Multi-head causal attention with QK-norm and rotary positions."""

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    d = config.model_dim
    self.config = config
    self.q = _linear(d, d, config, rngs)
    self.k = _linear(d, d, config, rngs)
    self.v = _linear(d, d, config, rngs)
    self.o = _linear(d, d, config, rngs, zero=True)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    h, hd = self.config.num_heads, self.config.head_dim
    q = self.q(x).reshape(b, t, h, hd)
    k = self.k(x).reshape(b, t, h, hd)
    v = self.v(x).reshape(b, t, h, hd)
    q = apply_rotary(rms_norm(q), cos, sin)
    k = apply_rotary(rms_norm(k), cos, sin)
    y = jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=_attention_impl(self.config))
    return self.o(y.reshape(b, t, h * hd))


class MLP(nnx.Module):
  """``d -> ratio·d``, ReLU², ``ratio·d -> d`` (output zero-initialised)."""

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    d = config.model_dim
    self.fc = _linear(d, config.mlp_ratio * d, config, rngs)
    self.proj = _linear(config.mlp_ratio * d, d, config, rngs, zero=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(jnp.square(jax.nn.relu(self.fc(x))))


class Block(nnx.Module):
  """Pre-norm residual block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    self.attn = CausalSelfAttention(config, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, cos, sin):
    x = x + self.attn(rms_norm(x), cos, sin)
    return x + self.mlp(rms_norm(x))


# FP8 head matmul. Forward: x and w are scaled into e4m3 range and multiplied with a
# higher-precision accumulator; backward: plain compute-dtype matmuls (gradients of the
# cast are the straight-through identity), matching modded-nanogpt's forward scales
# x_s = sqrt(d)/448, w_s = 24/448 (its e5m2 backward is not reproduced).
@jax.custom_vjp
def _fp8_matmul(x, w, x_scale, w_scale):
  xq = (x / x_scale).astype(jnp.float8_e4m3fn)
  wq = (w / w_scale).astype(jnp.float8_e4m3fn)
  y = jnp.dot(xq, wq, preferred_element_type=jnp.float32)
  return (y * (x_scale * w_scale)).astype(x.dtype)


def _fp8_fwd(x, w, x_scale, w_scale):
  return _fp8_matmul(x, w, x_scale, w_scale), (x, w)


def _fp8_bwd(res, g):
  x, w = res
  gx = jnp.dot(g, w.T.astype(g.dtype)).astype(x.dtype)
  gw = jnp.dot(x.reshape(-1, x.shape[-1]).T.astype(g.dtype),
               g.reshape(-1, g.shape[-1]), preferred_element_type=jnp.float32)
  return gx, gw.astype(w.dtype), None, None


_fp8_matmul.defvjp(_fp8_fwd, _fp8_bwd)


class GPT(nnx.Module):
  """Decoder-only transformer; ``__call__(tokens) -> logits`` in float32.

  Attributes:
    embed: token table (``nnx.Embed``), routed to AdamW.
    blocks: list of :class:`Block`.
    lm_head: untied output head (``nnx.Linear``, zero-initialised), routed to AdamW.
  """

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Embed(config.vocab_size, config.model_dim, dtype=config.dtype,
                           param_dtype=jnp.float32, rngs=rngs)
    blocks = [Block(config, rngs=rngs) for _ in range(config.num_layers)]
    # flax >= 0.12 wants module lists wrapped in nnx.List; older versions take a list.
    self.blocks = nnx.List(blocks) if hasattr(nnx, "List") else blocks
    self.lm_head = _linear(config.model_dim, config.vocab_size, config, rngs, zero=True)

  def head_logits(self, tokens: jax.Array) -> jax.Array:
    """The head's raw logits in the compute dtype (no float32 cast, no soft-cap)."""
    cfg = self.config
    if tokens.shape[-1] > cfg.seq_len:
      raise ValueError(f"sequence length {tokens.shape[-1]} exceeds seq_len={cfg.seq_len}.")
    cos, sin = rotary_tables(cfg.head_dim, cfg.seq_len, cfg.rope_base)
    # Gather the float32 rows, then cast (nnx.Embed casts the whole table first): the same
    # values, but the gradient is a float32 scatter-add of the batch's rows instead of a
    # bfloat16 one into a bfloat16 copy of the table, so repeated tokens (a byte corpus
    # puts 32k positions on 256 rows) accumulate in float32.
    x = rms_norm(jnp.take(self.embed.embedding[...], tokens, axis=0).astype(cfg.dtype))
    for block in self.blocks:
      x = block(x, cos, sin)
    x = rms_norm(x)
    if cfg.fp8_head:
      w = self.lm_head.kernel[...]
      return _fp8_matmul(x, w.astype(x.dtype), jnp.float32(math.sqrt(cfg.model_dim) / 448),
                         jnp.float32(24.0 / 448))
    return self.lm_head(x)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return _softcap(self.head_logits(tokens).astype(jnp.float32), self.config.logit_softcap)


def _logz_and_picked(logits, targets):
  """``logsumexp`` of each row and the target's logit."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return logz, picked


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy in nats, in float32."""
  logz, picked = _logz_and_picked(logits, targets)
  return jnp.mean(logz - picked)


def _softcap(z, cap):
  return z if cap is None else cap * jnp.tanh(z / cap)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fused_cross_entropy(logits: jax.Array, targets: jax.Array, cap: float | None) -> jax.Array:
  """Mean cross-entropy of soft-capped 16-bit logits, float32 math, no float32 copy.

  Same value as ``cross_entropy(softcap(logits.astype(f32)), targets)``, but written so
  that XLA reads the (tokens × vocab) logits in their 16-bit dtype: the forward is one
  reduction pass, the backward one elementwise pass that writes the 16-bit gradient
  (``softmax − onehot``, times the soft-cap's derivative) instead of autodiff's float32
  intermediates. For a GPT-2 head at 64k tokens (65536 × 50304) that is ~20 GB less
  memory traffic per step.

  Args:
    logits: ``(..., vocab)`` raw head outputs (bf16/f16; float32 works too).
    targets: ``(...)`` int token ids.
    cap: the logit soft-cap ``c`` (``c·tanh(z/c)``) or ``None``.

  Returns:
    The mean loss, float32.
  """
  return _fused_ce_fwd(logits, targets, cap)[0]


def _fused_ce_fwd(logits, targets, cap):
  lse, picked = _logz_and_picked(_softcap(logits.astype(jnp.float32), cap), targets)
  return jnp.mean(lse - picked), (logits, targets, lse)


def _fused_ce_bwd(cap, res, g):
  logits, targets, lse = res
  z = _softcap(logits.astype(jnp.float32), cap)
  p = jnp.exp(z - lse[..., None])
  onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
  dz = (p - onehot) * (g / lse.size)
  if cap is not None:  # d/dx c·tanh(x/c) = 1 - tanh² = 1 - (z/c)²
    dz = dz * (1.0 - jnp.square(z / cap))
  return dz.astype(logits.dtype), None


fused_cross_entropy.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def loss_fn(model: GPT, inputs: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy; with 16-bit compute through :func:`fused_cross_entropy`
  (float32 compute keeps the plain autodiff path, bit for bit as before)."""
  cfg = model.config
  if cfg.dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return fused_cross_entropy(model.head_logits(inputs), targets, cfg.logit_softcap)
  return cross_entropy(model(inputs), targets)


def count_params(model: nnx.Module, exclude_embedding: bool = False) -> int:
  """Number of parameters (optionally without the token table)."""
  state = nnx.state(model, nnx.Param)
  total = sum(x.size for x in jax.tree.leaves(state))
  if exclude_embedding:
    total -= model.embed.embedding[...].size
  return int(total)


def flops_per_token(config: GPTConfig, num_params: int) -> float:
  """Training flops per token: ``6·N + 12·L·d·T`` (PaLM, appendix B).

  ``num_params`` should exclude the embedding table (a gather, no matmul) but include the
  head. The attention term counts QKᵀ and AV forward and backward without discounting
  the causal mask, the usual convention of published MFU figures (a 32k-token AdamW
  step of GPT-2 small at 70.7 ms on an H100 is then 40.1% MFU).
  """
  return 6.0 * num_params + 12.0 * config.num_layers * config.model_dim * config.seq_len
