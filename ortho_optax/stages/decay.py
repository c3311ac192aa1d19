"""Learning rate and weight decay: the last stage(s) of every orthogonalized chain.

NVIDIA Emerging-Optimizers names four weight-decay methods; all seed
systems use one of them (AuON, AuON-Muon, Turbo-Muon, Aurora: ``"decoupled"``):

===============  ==========================================  ======================
method           effect                                      where in the chain
===============  ==========================================  ======================
``decoupled``    ``p <- p - lr * wd * p``                    last stage
``independent``  ``p <- p - wd * p`` (not tied to lr)        last stage
``l2``           ``g <- g + wd * p``                         first stage (pre-momentum)
``palm``         ``p <- p - lr^2 * wd * p``                  last stage
===============  ==========================================  ======================

The references decay the weights before computing or applying the update
(``p <- p (1 - lr wd); p <- p - lr O``); since ``O`` does not depend on ``p``
this equals the single update ``-(lr O + lr wd p)`` returned here, up to one
rounding. The last stage folds the learning rate in (optax's sign convention:
it returns the negative step), so a chain ending in
:func:`scale_by_learning_rate_and_decay` is fed to ``optax.apply_updates``.
Learning rate and weight decay are plain numbers, jax arrays (as
``optax.inject_hyperparams`` passes them) or ``optax.Schedule`` callables of the
step count kept in the state.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import optax

from ortho_optax.validation import NO_PARAMS, check_choice, check_learning_rate, check_non_negative

WEIGHT_DECAY_METHODS = ("decoupled", "independent", "l2", "palm")

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]
MaskOrFn = Optional[Union[Any, Callable[[optax.Params], Any]]]


def _value(x: ScalarOrSchedule, count):
  return x(count) if callable(x) else x


def _mask_tree(mask: MaskOrFn, params):
  """``None`` -> every leaf True; a callable is applied to ``params``."""
  if mask is None:
    return jax.tree.map(lambda _: True, params)
  return mask(params) if callable(mask) else mask


def _is_zero(x) -> bool:
  return not callable(x) and isinstance(x, (int, float)) and x == 0


class WeightDecayState(NamedTuple):
  """Step counter (for scheduled learning rate / weight decay)."""
  count: chex.Array


def add_weight_decay(
    weight_decay: ScalarOrSchedule,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  """Coupled (L2) decay ``g <- g + wd * p``, placed before the momentum.

  This is NVIDIA's ``weight_decay_method="l2"`` (which writes ``g + wd p`` into
  ``p.grad`` before the momentum update). Unlike ``optax.add_decayed_weights``
  it accepts a schedule.

  Args:
    weight_decay: the coefficient ``wd >= 0``, an array or a schedule of the step.
    mask: optional pytree of bools (or callable ``params -> pytree``) choosing
      the leaves to decay.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`WeightDecayState`.

  References:
    NVIDIA-NeMo/Emerging-Optimizers (``weight_decay_method`` of
    ``OrthogonalizedOptimizer``); Liu et al., "Muon is Scalable for LLM Training",
    arXiv 2502.16982, 2025.
  """
  check_non_negative("weight_decay", weight_decay, schedule=True)

  def init_fn(params):
    del params
    return WeightDecayState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    count = optax.safe_int32_increment(state.count)
    if _is_zero(weight_decay):
      return updates, WeightDecayState(count=count)
    if params is None:
      raise ValueError(NO_PARAMS)
    wd = _value(weight_decay, state.count)
    updates = jax.tree.map(
        lambda g, p, m: (g + wd * p).astype(g.dtype) if m else g,
        updates, params, _mask_tree(mask, params))
    return updates, WeightDecayState(count=count)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_learning_rate_and_decay(
    learning_rate: ScalarOrSchedule,
    weight_decay: ScalarOrSchedule = 0.0,
    method: str = "decoupled",
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  """The final stage: ``u <- -(lr * u) - c * p`` with ``c`` set by ``method``.

  ``c = lr*wd`` (decoupled), ``wd`` (independent), ``lr**2 * wd`` (palm),
  ``0`` (l2, whose decay is applied before the momentum by
  :func:`add_weight_decay`; see :func:`weight_decay_stages`).

  Args:
    learning_rate: ``lr >= 0``, an array or a schedule of the step count.
    weight_decay: ``wd >= 0``, an array or a schedule.
    method: ``"decoupled"``, ``"independent"``, ``"l2"`` or ``"palm"``.
    mask: optional pytree of bools (or callable ``params -> pytree``) choosing
      the leaves to decay.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`WeightDecayState`.

  References:
    NVIDIA-NeMo/Emerging-Optimizers (``weight_decay_method`` of
    ``OrthogonalizedOptimizer``); Liu et al., "Muon is Scalable for LLM Training",
    arXiv 2502.16982, 2025.
  """
  check_learning_rate(learning_rate)
  check_non_negative("weight_decay", weight_decay, schedule=True)
  check_choice("weight_decay_method", method, WEIGHT_DECAY_METHODS)
  no_decay = method == "l2" or _is_zero(weight_decay)

  def init_fn(params):
    del params
    return WeightDecayState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    count = optax.safe_int32_increment(state.count)
    lr = _value(learning_rate, state.count)
    if no_decay:
      updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
      return updates, WeightDecayState(count=count)
    if params is None:
      raise ValueError(NO_PARAMS)
    wd = _value(weight_decay, state.count)
    if method == "decoupled":
      c = lr * wd
    elif method == "independent":
      c = wd
    else:  # palm
      c = lr * lr * wd
    updates = jax.tree.map(
        lambda u, p, m: (-lr * u - c * p if m else -lr * u).astype(u.dtype),
        updates, params, _mask_tree(mask, params))
    return updates, WeightDecayState(count=count)

  return optax.GradientTransformation(init_fn, update_fn)


def weight_decay_stages(
    learning_rate: ScalarOrSchedule,
    weight_decay: ScalarOrSchedule = 0.0,
    method: str = "decoupled",
    mask: MaskOrFn = None,
) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """``(first, last)`` stages of a chain for a weight-decay method.

  ``first`` goes before the momentum (the L2 decay for ``"l2"``, the identity
  otherwise); ``last`` ends the chain (learning rate, plus the decay of the other
  methods). ``chain(first, momentum, orthogonalize, ..., last)`` reproduces the
  order of NVIDIA's ``OrthogonalizedOptimizer`` and of the Keller-style
  references for every method.

  Args:
    learning_rate: a number or an ``optax`` schedule.
    weight_decay: decay coefficient (>= 0), number or schedule.
    method: ``"decoupled"``, ``"independent"``, ``"l2"`` or ``"palm"`` (see
      :func:`scale_by_learning_rate_and_decay`).
    mask: optional pytree or callable selecting the decayed leaves, as in optax.

  Returns:
    ``(first, last)``, two ``optax.GradientTransformation`` objects.

  Raises:
    ValueError: for an unknown ``method`` or a negative ``weight_decay``.

  References:
    NVIDIA-NeMo/Emerging-Optimizers (``weight_decay_method`` of
    ``OrthogonalizedOptimizer``); Liu et al., "Muon is Scalable for LLM Training",
    arXiv 2502.16982, 2025.
  """
  if method == "l2":
    # The decay is all in the first stage; the last one only scales by the learning rate.
    return (add_weight_decay(weight_decay, mask),
            scale_by_learning_rate_and_decay(learning_rate, 0.0, method))
  first = optax.identity()
  last = scale_by_learning_rate_and_decay(learning_rate, weight_decay, method, mask)
  return first, last
