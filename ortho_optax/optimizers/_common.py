"""Shared pieces of the optimizers: the AdamW fallback and hyperparameter checks.

Validation helpers follow one policy (team brief): they check *Python numbers* only and
raise a ``ValueError`` that names the hyperparameter, its value and what is allowed.
Anything else (a ``jax.Array``, a NumPy array, a schedule, a tracer under
``optax.inject_hyperparams``) is accepted as is, because it may only be known at run
time.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
import optax

from ortho_optax import matrix_view
from ortho_optax import routing


from ortho_optax.validation import (  # noqa: F401  (re-exported for the optimizers)
    check_choice,
    check_in_range,
    check_int,
    check_learning_rate,
    check_momentum,
    check_non_negative,
    check_positive,
)


def check_adam(adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_weight_decay) -> None:
  """Validates the ``adam_*`` hyperparameters shared by every optimizer."""
  check_learning_rate(adam_learning_rate, "adam_learning_rate")
  check_in_range("adam_b1", adam_b1, 0.0, 1.0, high_inclusive=False)
  check_in_range("adam_b2", adam_b2, 0.0, 1.0, high_inclusive=False)
  check_non_negative("adam_eps", adam_eps)
  check_non_negative("adam_weight_decay", adam_weight_decay)


# ---------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------


def with_adamw_fallback(
    ortho_tx: optax.GradientTransformation,
    *,
    adam_learning_rate: optax.ScalarOrSchedule = 3e-4,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-10,
    adam_weight_decay: float = 0.0,
    label_fn: Any = None,
    adam_tx: Optional[optax.GradientTransformation] = None,
) -> optax.GradientTransformation:
  """Sends hidden matrices to ``ortho_tx`` and every other parameter to AdamW.

  Built on :func:`optax.multi_transform` with the labels of
  :mod:`ortho_optax.routing`: ``"ortho"`` -> ``ortho_tx``, ``"adam"`` -> AdamW (or
  ``adam_tx``), ``"frozen"`` (non floating-point leaves) -> :func:`optax.set_to_zero`.
  ``ortho_tx`` only ever sees the ``"ortho"`` leaves (the others are
  ``optax.MaskedNode``), so its stages may assume matrices.

  Args:
    ortho_tx: the orthogonalized chain (already including its learning rate).
    adam_learning_rate: AdamW learning rate, a number or a schedule.
    adam_b1, adam_b2, adam_eps, adam_weight_decay: AdamW hyperparameters
      (:func:`optax.adamw`; bias-corrected, ``eps`` outside the square root, decoupled
      decay multiplied by the learning rate).
    label_fn: ``None`` (:func:`ortho_optax.routing.default_label_fn`), a callable
      ``params -> label pytree`` or the label pytree itself; labels ``"ortho"``,
      ``"adam"`` and ``"frozen"``.
    adam_tx: replaces the AdamW branch entirely (e.g. AuON's custom Adam, or a
      :func:`optax.inject_hyperparams`-wrapped AdamW); the ``adam_*`` numbers are then
      ignored.

  Returns:
    An ``optax.GradientTransformation`` (a ``multi_transform``; its state is
    ``optax.MultiTransformState`` with ``inner_states["ortho" | "adam" | "frozen"]``).

  References:
    K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024,
    https://kellerjordan.github.io/posts/muon/ (AdamW for embeddings, heads and
    non-matrix parameters); Liu et al., "Muon is Scalable for LLM Training",
    arXiv 2502.16982, 2025.
  """
  if adam_tx is None:
    check_adam(adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_weight_decay)
    adam_tx = float16_in_float32(optax.adamw(
        learning_rate=adam_learning_rate, b1=adam_b1, b2=adam_b2, eps=adam_eps,
        weight_decay=adam_weight_decay))
  transforms = {
      routing.ORTHO: ortho_tx,
      routing.ADAM: adam_tx,
      routing.FROZEN: optax.set_to_zero(),
  }
  return optax.multi_transform(transforms, _freeze_non_floating(label_fn))


def _freeze_non_floating(label_fn):
  """``label_fn`` with every non floating-point leaf labelled ``"frozen"``.

  The default rules already do this; a user label pytree or callable that sends an
  integer / bool leaf to ``"ortho"`` or ``"adam"`` would otherwise hit a matrix-view
  error or AdamW's integer arithmetic. Integer leaves are always left untouched.
  """
  base = routing.default_label_fn if label_fn is None else label_fn

  def labels(params):
    lab = base(params) if callable(base) else base

    def one(label, leaf):
      return label if routing._is_floating(routing._leaf_array(leaf)) else routing.FROZEN

    return jax.tree.map(one, lab, params, is_leaf=lambda x: x is None)

  return labels


def _to_float32_if_float16(x):
  return x.astype(jnp.float32) if getattr(x, "dtype", None) == jnp.float16 else x


def float16_in_float32(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Runs ``inner`` in float32 for float16 leaves (state in float32, updates cast back).

  ``optax.adamw`` keeps ``nu`` in the parameter dtype: in float16, ``(1 - b2) g²``
  underflows to 0 for ``|g| < ~1e-3`` and ``adam_eps = 1e-10`` rounds to 0, so
  ``m / (sqrt(nu) + eps)`` is ``inf``/NaN for small gradients. float16 leaves are
  therefore upcast; other dtypes (bfloat16 has float32's exponent range) are untouched,
  so their state keeps the parameter dtype.
  """

  def init_fn(params):
    return inner.init(jax.tree.map(_to_float32_if_float16, params))

  def update_fn(updates, state, params=None, **extra_args):
    up32 = jax.tree.map(_to_float32_if_float16, updates)
    p32 = None if params is None else jax.tree.map(_to_float32_if_float16, params)
    new, state = inner.update(up32, state, p32, **extra_args)
    new = jax.tree.map(lambda n, u: n.astype(u.dtype), new, updates)
    return new, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def masked_dimension_numbers(dimension_numbers):
  """Makes ``dimension_numbers`` usable on a sub-tree masked by ``multi_transform``.

  A pytree of ``MatrixDims`` given for the *full* parameter tree does not match the
  masked tree the orthogonalized branch sees (non-matrix leaves become
  ``optax.MaskedNode``). This returns a callable that looks each leaf's dims up by its
  path (:func:`ortho_optax.matrix_view.path_str`), which is the same in both trees.
  ``None``, a single ``MatrixDims`` and callables are returned unchanged.
  """
  if (dimension_numbers is None or callable(dimension_numbers)
      or isinstance(dimension_numbers, matrix_view.MatrixDims)):
    return dimension_numbers
  by_path = routing.dims_path_dict(dimension_numbers)

  def dims_for(tree):
    return jax.tree_util.tree_map_with_path(
        lambda p, _: by_path.get(matrix_view.path_str(p)), tree)

  return dims_for


def find_states(tree: Any, match) -> list[Any]:
  """Nodes of a (nested) optax state for which ``match(node)`` holds, depth-first.

  Walks dicts, tuples and lists (optax chain / partition states); a matching node is
  returned whole and not searched further.
  """
  found = []

  def walk(x):
    if match(x):
      found.append(x)
      return
    if isinstance(x, dict):
      for v in x.values():
        walk(v)
    elif isinstance(x, (tuple, list)):
      for v in x:
        walk(v)

  walk(tree)
  return found


__all__ = [
    "check_adam", "check_choice", "check_in_range", "check_int", "check_learning_rate",
    "check_momentum", "check_non_negative", "check_positive", "float16_in_float32",
    "find_states", "masked_dimension_numbers",
    "with_adamw_fallback",
]
