"""The StableAdamW core of OAdamW (torch-optimi ``StableAdamW``, jeb1399/OAdamW).

Per tensor, with the 1-based step ``t`` and the (possibly orthogonalized) gradient ``g``::

  b1_t = debias(b1, t),  b2_t = debias(b2, t)          debias(b, t) = (b^t - b) / (b^t - 1)
  m <- lerp(m, g, 1 - b1_t);  v <- b2_t v + (1 - b2_t) g^2
  rms  = sqrt(mean(g^2 / max(v, eps^2)))               (per tensor, updated v)
  lr_t = lr / max(1, rms)
  p   <- p (1 - lr_t wd)                 decoupled (default)
  p   <- p (1 - (lr_t / max_lr) wd)      fully decoupled (decouple_lr=True)
  p   <- p - lr_t m / (sqrt(v) + eps)

``debias(b, 1) = 0`` and by induction ``m`` and ``v`` equal Adam's bias-corrected
moments, so this is AdamW with eps outside the square root plus the per-tensor RMS
learning-rate clip of StableAdamW (Wortsman et al., 2023). Because the clip rescales
the learning rate *and* the weight decay per tensor, the stage owns both: its output
is the final update ``-(lr_t m / (sqrt(v) + eps) + lr_t wd p)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax
from optax import tree_utils as otu

from ortho_optax import validation


class StableAdamWState(NamedTuple):
  """State of :func:`stable_adamw`.

  Attributes:
    count: int32 step counter ``t`` (after the update: the number of steps taken).
      Every leaf of one transform advances together, so it serves as both the
      reference's per-tensor counter (Muon groups) and its per-group counter.
    mu: first moment ``exp_avg`` (bias-corrected by construction).
    nu: second moment ``exp_avg_sq`` (bias-corrected by construction).
  """
  count: chex.Array
  mu: optax.Updates
  nu: optax.Updates


def debias_beta(beta, step):
  """``(beta^t - beta) / (beta^t - 1)``: the EMA coefficient that debiases by itself.

  ``debias_beta(beta, 1) == 0``. With it, ``m_t = lerp(m_{t-1}, g, 1 - debias_beta)``
  equals ``m_t^{Adam} / (1 - beta^t)``.
  """
  beta_t = beta ** step
  return (beta_t - beta) / (beta_t - 1)


def stable_adamw(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-6,
    weight_decay: float = 1e-2,
    decouple_lr: bool = False,
    max_lr: Optional[float] = None,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  """StableAdamW: debiased-beta AdamW with per-tensor RMS learning-rate clipping.

  Args:
    learning_rate: a number or a schedule ``count -> lr`` (``count`` = steps taken
      before this one, as in optax).
    b1, b2: moment coefficients in ``[0, 1)``.
    eps: added to ``sqrt(v)``; ``eps^2`` floors ``v`` inside the RMS.
    weight_decay: decoupled weight decay, multiplied by the clipped ``lr_t``
      (or by ``lr_t / max_lr`` with ``decouple_lr``). Applied to every leaf this
      transform sees (route leaves elsewhere with a ``label_fn`` to exempt them).
    decouple_lr: fully decoupled decay ``p <- p (1 - (lr_t / max_lr) wd)`` (the
      schedule's shape still modulates the decay, its scale does not).
    max_lr: the reference learning rate of ``decouple_lr``; ``None`` means
      ``learning_rate`` (which must then be a number).
    mu_dtype: dtype of ``m`` and ``v``; ``None`` keeps the parameter dtype (as the
      reference). The arithmetic itself is float32 (or wider).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`StableAdamWState`. Its
    output already includes ``-lr_t`` (chain nothing after it but, optionally,
    :func:`ortho_optax.stages.kahan.kahan_summation`). Needs ``params`` when
    ``weight_decay`` is not 0.

  References:
    Wortsman et al., "Stable and low-precision training for large-scale
    vision-language models", 2023 (StableAdamW).
    Warner, torch-optimi ``StableAdamW`` (0.3.3), 2023; jeb1399/OAdamW.
  """
  validation.check_learning_rate(learning_rate)
  validation.check_range("b1", b1, 0.0, 1.0, high_open=True)
  validation.check_range("b2", b2, 0.0, 1.0, high_open=True)
  validation.check_positive("eps", eps)
  validation.check_non_negative("weight_decay", weight_decay)
  validation.check_bool("decouple_lr", decouple_lr)
  if decouple_lr:
    if max_lr is None:
      if callable(learning_rate):
        raise ValueError(
            "decouple_lr=True with a learning-rate schedule needs max_lr (the learning "
            "rate the weight decay is relative to), got max_lr=None.")
      max_lr = learning_rate
    validation.check_positive("max_lr", max_lr)
  mu_dtype = validation.check_dtype("mu_dtype", mu_dtype)
  mu_dtype = None if mu_dtype is None else jax.dtypes.canonicalize_dtype(mu_dtype)

  def init_fn(params):
    return StableAdamWState(
        count=jnp.zeros([], jnp.int32),
        mu=otu.tree_zeros_like(params, dtype=mu_dtype),
        nu=otu.tree_zeros_like(params, dtype=mu_dtype))

  def update_fn(updates, state, params=None):
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    count = optax.safe_int32_increment(state.count)
    t = count.astype(jnp.float32)
    b1_t = debias_beta(jnp.asarray(b1, jnp.float32), t)
    b2_t = debias_beta(jnp.asarray(b2, jnp.float32), t)
    decay_on = not (isinstance(weight_decay, (int, float)) and weight_decay == 0)
    if decay_on and params is None:
      raise ValueError(validation.NO_PARAMS)
    wd_scale = weight_decay / max_lr if decouple_lr else weight_decay

    def one(g, m, v, p):
      cdt = jnp.promote_types(g.dtype, jnp.float32)
      g32 = g.astype(cdt)
      if jnp.iscomplexobj(g32):  # |g|^2, real, as optax's Adam does for complex parameters
        rdt = jnp.finfo(cdt).dtype
        g_sq, v_old = jnp.square(jnp.abs(g32)), jnp.real(v).astype(rdt)
      else:
        rdt = cdt
        g_sq, v_old = g32 * g32, v.astype(cdt)
      m_new = m.astype(cdt) + (1 - b1_t) * (g32 - m.astype(cdt))
      v_new = b2_t * v_old + (1 - b2_t) * g_sq
      eps_sq = jnp.asarray(eps, rdt) ** 2
      # g^2 / v <= 1 / (1 - b2_t); a finite g whose square overflows takes that limit
      # instead of inf / inf = NaN.
      ratio = jnp.where(jnp.isinf(g_sq) & jnp.isfinite(g32),
                        1 / (1 - b2_t), g_sq / jnp.maximum(v_new, eps_sq))
      rms = jnp.sqrt(jnp.mean(ratio)) if g.size else 0.0
      lr_t = lr / jnp.maximum(1.0, rms)
      step = m_new / (jnp.sqrt(v_new) + eps)
      if decay_on:
        step = step + wd_scale * p.astype(cdt)
      out = (-lr_t * step).astype(g.dtype)
      return out, m_new.astype(m.dtype), v_new.astype(v.dtype)

    g_leaves, treedef = jax.tree.flatten(updates)
    m_leaves = treedef.flatten_up_to(state.mu)
    v_leaves = treedef.flatten_up_to(state.nu)
    p_leaves = treedef.flatten_up_to(params) if params is not None else [None] * len(g_leaves)
    results = [one(g, m, v, p) for g, m, v, p in zip(g_leaves, m_leaves, v_leaves, p_leaves)]
    out = treedef.unflatten([r[0] for r in results])
    new_mu = treedef.unflatten([r[1] for r in results])
    new_nu = treedef.unflatten([r[2] for r in results])
    return out, StableAdamWState(count=count, mu=new_mu, nu=new_nu)

  return optax.GradientTransformation(init_fn, update_fn)


__all__ = ["StableAdamWState", "debias_beta", "stable_adamw"]
