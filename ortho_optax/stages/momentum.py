"""EMA momentum with the Keller-Jordan Nesterov blend.

Every seed system keeps its momentum as an exponential moving average,
``m <- lerp(m, g, 1 - mu) = mu * m + (1 - mu) * g`` (not the SGD form
``m <- mu * m + g``), and feeds the orthogonalizer either ``m`` itself or the
Nesterov blend ``lerp(g, m, mu) = (1 - mu) * g + mu * m``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax
from optax import tree_utils as otu

from ortho_optax.validation import check_bool, check_dtype, check_range


class EmaMomentumState(NamedTuple):
  """State of :func:`ema_momentum`."""
  count: chex.Array  # int32 step counter, used by the bias correction.
  mu: optax.Updates  # the EMA buffer ("momentum_buffer" in the references).


def ema_momentum(
    momentum: float = 0.95,
    nesterov: bool = True,
    bias_correction: bool = False,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""EMA momentum, optionally with the Nesterov blend and bias correction.

  With ``mu = momentum`` and ``t`` the 1-based step::

    m_t = lerp(m_{t-1}, g_t, 1 - mu) = mu m_{t-1} + (1 - mu) g_t
    out = (1 - mu) g_t + mu m_t        (nesterov=True)
    out = m_t                          (nesterov=False)

  This is the form of every seed system (AuON, Turbo-Muon, Aurora, NVIDIA
  Emerging-Optimizers), none of which bias-corrects. With
  ``bias_correction=True`` the moment is debiased as in Adam/NAdam::

    out = m_t / (1 - mu^t)                                            (plain)
    out = mu m_t / (1 - mu^{t+1}) + (1 - mu) g_t / (1 - mu^t)         (nesterov)

  the second being the standard bias-corrected Nesterov form (the one of
  ``optax.scale_by_adam(nesterov=True)`` and ``optax.contrib.scale_by_muon``). Only the
  output is corrected; the stored buffer is the plain EMA.

  Args:
    momentum: the EMA coefficient ``mu`` in ``[0, 1)``; may be a jax array
      (e.g. under ``optax.inject_hyperparams``).
    nesterov: use the Nesterov blend instead of the buffer itself.
    bias_correction: debias the output by ``1 - mu^t`` (see above).
    mu_dtype: dtype of the buffer (a dtype or a name such as ``"bf16"``); ``None``
      keeps the dtype of the updates. The blend is computed before the buffer is cast,
      in the promoted dtype.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`EmaMomentumState`.

  Raises:
    ValueError: for a ``momentum`` outside ``[0, 1)``, non-bool flags or a bad
      ``mu_dtype``.

  References:
    Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024.
    Dozat, "Incorporating Nesterov Momentum into Adam", 2016.
  """
  check_range("momentum", momentum, 0.0, 1.0, high_open=True)
  check_bool("nesterov", nesterov)
  check_bool("bias_correction", bias_correction)
  mu_dtype = check_dtype("mu_dtype", mu_dtype)
  mu_dtype = None if mu_dtype is None else jax.dtypes.canonicalize_dtype(mu_dtype)

  def init_fn(params):
    return EmaMomentumState(
        count=jnp.zeros([], jnp.int32),
        mu=otu.tree_zeros_like(params, dtype=mu_dtype))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_int32_increment(state.count)
    # lerp(m, g, 1 - mu) written as m + (1 - mu)(g - m), the torch.lerp form.
    new_mu = jax.tree.map(lambda g, m: m + (1 - momentum) * (g - m), updates, state.mu)
    if nesterov:
      out = jax.tree.map(lambda g, m: g + momentum * (m - g), updates, new_mu)
    else:
      out = new_mu
    if bias_correction:
      t = count.astype(jnp.float32)
      bc_t = 1 - momentum ** t
      if nesterov:
        bc_next = 1 - momentum ** (t + 1)
        out = jax.tree.map(
            lambda g, m: momentum * m / bc_next + (1 - momentum) * g / bc_t, updates, new_mu)
      else:
        out = jax.tree.map(lambda m: m / bc_t, new_mu)
    out = jax.tree.map(lambda o, g: o.astype(g.dtype), out, updates)
    new_mu = otu.tree_cast(new_mu, mu_dtype)
    return out, EmaMomentumState(count=count, mu=new_mu)

  return optax.GradientTransformation(init_fn, update_fn)
