"""Shared pieces of the optimizers: the AdamW fallback, routing and preset signatures."""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from ortho_optax import matrix_view
from ortho_optax import routing
from ortho_optax import validation


#: Newton–Schulz steps when ``ns_steps`` is ``None``. Step counts default to ``None`` in the
#: optimizers' signatures: ``optax.inject_hyperparams`` turns every int argument it is not
#: told to keep static into an array, and a step count must stay a Python int.
NS_STEPS = 5


def default_if_none(value, default):
  """``default`` for ``None`` (a step count left at its default), else ``value``."""
  return default if value is None else value


def checked_ns_steps(ns_steps) -> int:
  """``ns_steps`` (:data:`NS_STEPS` for ``None``), checked: an int >= 1. The stage calls it
  ``steps``; the error names the optimizer's argument."""
  ns_steps = default_if_none(ns_steps, NS_STEPS)
  validation.check_int("ns_steps", ns_steps, 1)
  return ns_steps


def newton_schulz_stage(orthogonalizer: str = "newton_schulz", *, restart_every=2,
                        **stage_kwargs) -> optax.GradientTransformation:
  """The orthogonalize stage of a Newton–Schulz optimizer, with the method it names.

  Args:
    orthogonalizer: ``"newton_schulz"`` or ``"gram_newton_schulz"``
      (:data:`ortho_optax.orthogonalizers.NEWTON_SCHULZ_METHODS`).
    restart_every: Gram Newton–Schulz's restart period (an int >= 1 or ``None``; unused
      by ``"newton_schulz"``).
    **stage_kwargs: the other arguments of
      :func:`ortho_optax.stages.orthogonalize.orthogonalize`.

  Returns:
    The stage.

  Raises:
    ValueError: for an unknown ``orthogonalizer`` (naming the value and the choices) and
      whatever the stage rejects.
  """
  # Local: the orthogonalize stage imports optimizer-level helpers.
  from ortho_optax.gram_newton_schulz import _check_restart_every
  from ortho_optax.orthogonalizers import NEWTON_SCHULZ_METHODS
  from ortho_optax.stages.orthogonalize import orthogonalize
  validation.check_choice("orthogonalizer", orthogonalizer, NEWTON_SCHULZ_METHODS)
  if orthogonalizer == "newton_schulz" and validation.is_array(restart_every):
    # optax.inject_hyperparams makes an array of every numeric argument it is not told to
    # keep static: a restart period is no hyperparameter of standard Newton-Schulz.
    restart_every = None
  _check_restart_every(restart_every)  # a bad value is an error even where it is unused
  return orthogonalize(orthogonalizer, restart_every=restart_every, **stage_kwargs)


def check_adam(adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_weight_decay,
               adam_nesterov=False) -> None:
  """Validates the ``adam_*`` hyperparameters of the AdamW branch."""
  validation.check_learning_rate(adam_learning_rate, "adam_learning_rate")
  validation.check_range("adam_b1", adam_b1, 0.0, 1.0, high_open=True)
  validation.check_range("adam_b2", adam_b2, 0.0, 1.0, high_open=True)
  validation.check_non_negative("adam_eps", adam_eps)
  validation.check_non_negative("adam_weight_decay", adam_weight_decay, schedule=True)
  validation.check_bool("adam_nesterov", adam_nesterov)


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
    adam_nesterov: bool = False,
    label_fn: Any = None,
    dimension_numbers: Any = None,
    adam_tx: Optional[optax.GradientTransformation] = None,
    name: Optional[str] = "with_adamw_fallback",
) -> optax.GradientTransformationExtraArgs:
  """Sends weight matrices to ``ortho_tx`` and every other parameter to AdamW.

  Built on :func:`optax.multi_transform` with the labels of
  :mod:`ortho_optax.routing`: ``"ortho"`` -> ``ortho_tx``, ``"adam"`` -> AdamW (or
  ``adam_tx``), ``"frozen"`` (non floating-point leaves) -> :func:`optax.set_to_zero`.
  ``ortho_tx`` only ever sees the ``"ortho"`` leaves (the others are
  ``optax.MaskedNode``), so its stages may assume matrices. ``init`` warns (once) when
  no leaf is labelled ``"ortho"``.

  Args:
    ortho_tx: the orthogonalized chain (already including its learning rate).
    adam_learning_rate: AdamW learning rate, a number or a schedule.
    adam_b1, adam_b2, adam_eps, adam_weight_decay: AdamW hyperparameters
      (:func:`optax.adamw`; bias-corrected, ``eps`` outside the square root, decoupled
      decay multiplied by the learning rate).
    adam_nesterov: NAdamW (:func:`optax.adamw` with ``nesterov=True``), as
      optax.contrib.muon's AdamW branch uses with ``nesterov=True``.
    label_fn: ``None`` (:func:`ortho_optax.routing.default_label_fn`), a callable
      ``params -> label pytree`` or the label pytree (or a prefix of it); labels
      ``"ortho"``, ``"adam"`` and ``"frozen"``.
    dimension_numbers: the optimizer's matrix views, for the default labels (a leaf of
      rank >= 3 with a ``MatrixDims`` is a matrix); unused with a ``label_fn``.
    adam_tx: replaces the AdamW branch entirely (e.g. AuON's custom Adam, or a
      :func:`optax.inject_hyperparams`-wrapped AdamW); the ``adam_*`` numbers are then
      ignored.
    name: the optimizer's name in the warning; ``None`` turns the warning off (when the
      two branches are the same optimizer).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (a ``multi_transform``; its state is
    ``optax.MultiTransformState`` with ``inner_states["ortho" | "adam" | "frozen"]``).

  Raises:
    ValueError: for bad ``adam_*`` values; at ``init`` / ``update`` for a complex leaf
      labelled ``"ortho"`` or an unknown label.

  References:
    K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024,
    https://kellerjordan.github.io/posts/muon/ (AdamW for embeddings, heads and
    non-matrix parameters); Liu et al., "Muon is Scalable for LLM Training",
    arXiv 2502.16982, 2025.
  """
  if adam_tx is not None and not (callable(getattr(adam_tx, "init", None))
                                  and callable(getattr(adam_tx, "update", None))):
    raise ValueError(
        f"adam_tx must be an optax.GradientTransformation (with init and update) or None, "
        f"got {adam_tx!r}.")
  if adam_tx is None:
    check_adam(adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_weight_decay,
               adam_nesterov)
    adam_tx = float16_in_float32(optax.adamw(
        learning_rate=adam_learning_rate, b1=adam_b1, b2=adam_b2, eps=adam_eps,
        weight_decay=adam_weight_decay, nesterov=adam_nesterov))
  transforms = {
      routing.ORTHO: ortho_tx,
      routing.ADAM: adam_tx,
      routing.FROZEN: optax.set_to_zero(),
  }
  labels = routing.checked_labels(label_fn, dimension_numbers)
  tx = optax.multi_transform(transforms, labels)
  if name is None:
    return tx
  return optax.GradientTransformationExtraArgs(
      _warn_if_nothing_orthogonalized(tx.init, labels, name), tx.update)


def _warn_if_nothing_orthogonalized(init, labels, name):
  """``init`` that warns, the first time only, when no leaf is labelled ``"ortho"``."""
  warned = []

  def init_fn(params):
    state = init(params)
    flat = jax.tree.leaves(labels(params))
    if not warned and routing.ORTHO not in flat and routing.ADAM in flat:
      warned.append(True)
      warnings.warn(
          f"{name}: no parameter reaches the orthogonalized branch; all "
          f"{flat.count(routing.ADAM)} trainable leaves go to the AdamW branch. By default "
          "real floating-point 2-D leaves (and N-D leaves with a matrix view) are "
          "orthogonalized unless their path names an embedding, an output head or a norm. "
          "See ortho_optax.routing_report(params) and pass label_fn or dimension_numbers "
          "to route your matrices.", UserWarning, stacklevel=2)
    return state

  return init_fn


def preset_signature(base: Callable[..., Any], exclude=()):
  """Decorator: a preset's signature is its own arguments, then ``base``'s other ones.

  The preset ``def preset(own args..., **base_kwargs)`` forwards the rest to ``base``;
  its ``__signature__`` lists ``base``'s remaining arguments (minus ``exclude``, the ones
  the preset sets itself) as keyword-only, so ``inspect.signature`` and
  ``optax.inject_hyperparams`` see every argument and its default.
  """

  def decorate(fn):
    own = inspect.signature(fn)
    params = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
    taken = {p.name for p in params} | set(exclude)
    rest = [p.replace(kind=p.KEYWORD_ONLY)
            for p in inspect.signature(base).parameters.values() if p.name not in taken]
    fn.__signature__ = own.replace(parameters=params + rest)
    return fn

  return decorate


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

  inner = optax.with_extra_args_support(inner)

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
  matrix_view.check_dimension_numbers(dimension_numbers)
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
    "check_adam", "float16_in_float32", "find_states", "masked_dimension_numbers",
    "newton_schulz_stage", "preset_signature", "with_adamw_fallback",
]
