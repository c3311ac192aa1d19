"""Second-moment normalisation of orthogonalized updates (NVIDIA ``AdaptiveMuon``).

NVIDIA's ``AdaptiveMuon`` follows Newton-Schulz with an Adam-like second moment,
in three flavours (none bias-corrected, as in the reference):

* ``"adamuon"`` (AdaMuon): elementwise ``v <- lerp(v, O^2, 1-beta2)``,
  ``out = O / (sqrt(v) + eps)``.
* ``"normuon"`` (NorMuon): one statistic per row of the ``(out, in)`` view when
  ``out >= in`` (per column otherwise), ``v <- lerp(v, mean(O^2), 1-beta2)``,
  ``out = O * rsqrt(max(v, eps))`` rescaled to ``||O||_F``.
* ``"namo"`` (NAMO): one scalar per matrix tracking the squared Frobenius norm
  of the RAW gradient, ``v <- lerp(v, ||g||_F^2, 1-beta2)``, and
  ``out = ||U||_F / (sqrt(v) + eps) * O`` with ``U`` the momentum output that
  went into the orthogonalizer.

NAMO needs two values from earlier in the chain (the raw gradient and the
pre-orthogonalization update), which an ordinary stage placed after the
orthogonalizer never sees. :func:`scale_by_second_moment` therefore optionally
*wraps* the sub-chain that produces ``O``: pass ``momentum=`` (raw gradient ->
``U``) and ``orthogonalizer=`` (``U`` -> ``O``) and the returned transform runs
``raw -> momentum -> U -> orthogonalizer -> O -> second moment``, keeping both
inner states in its own state. NAMO requires this form; AdaMuon and NorMuon
accept it too (the optimizers always use it so that all three methods share
one state layout) or work as a plain stage after any orthogonalizer.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from ortho_optax import matrix_view
from ortho_optax.validation import check_choice, check_range

SECOND_MOMENT_METHODS = ("adamuon", "normuon", "namo")


class SecondMomentState(NamedTuple):
  """State of :func:`scale_by_second_moment`.

  Attributes:
    inner_state: ``(momentum_state, orthogonalizer_state)`` of the wrapped
      sub-chain, or ``()`` when used as a plain stage.
    nu: the second-moment buffer ("moment2_buffer" in the reference), float32
      (or wider), one leaf per parameter:
      adamuon: the parameter's shape; normuon: the parameter's shape with the
      averaged axes set to 1 (the reduction axes for per-row statistics, the
      output axes for per-column ones; a split output keeps ``num_splits``
      entries there); namo: ``(batch,)``, one scalar per matrix of the view
      (``(1,)`` for a plain 2-D weight).
  """
  inner_state: Any
  nu: optax.Updates


def _stat_dtype(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def _rowwise(shape, dims) -> bool:
  """NorMuon averages over ``in`` (one entry per row) when ``out >= in``."""
  _, n_out, n_in = matrix_view.matrix_shape(shape, dims)
  return n_out >= n_in


def _normuon_buffer_shape(shape, dims):
  dims = matrix_view.validate_dims(dims, shape)
  shape = list(shape)
  if _rowwise(shape, dims):
    for a in dims.reduction_axes:
      shape[a] = 1
  else:
    for i, a in enumerate(dims.output_axes):
      shape[a] = dims.num_splits if i == 0 else 1
  return tuple(shape)


def _frobenius(x):
  """Per-matrix Frobenius norm of a ``(batch, out, in)`` stack, kept dims."""
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True))


def scale_by_second_moment(
    method: str = "adamuon",
    beta2: Any = 0.95,
    eps: Any = 1e-8,
    dimension_numbers: Any = None,
    *,
    momentum: Optional[optax.GradientTransformation] = None,
    orthogonalizer: Optional[optax.GradientTransformation] = None,
) -> optax.GradientTransformation:
  """AdaMuon / NorMuon / NAMO second-moment normalisation.

  Args:
    method: ``"adamuon"``, ``"normuon"`` or ``"namo"`` (see the module docstring).
    beta2: EMA coefficient of the second moment, in ``[0, 1)``.
    eps: AdaMuon: added to ``sqrt(v)``; NorMuon: floor of ``v`` and of the
      rescaling norm; NAMO: added to ``sqrt(v)``.
    dimension_numbers: per-leaf matrix views (NorMuon and NAMO), as accepted by
      :func:`ortho_optax.matrix_view.resolve_dims`.
    momentum: optional transform mapping the raw gradient to ``U`` (e.g.
      :func:`ortho_optax.stages.momentum.ema_momentum`); required for NAMO.
    orthogonalizer: optional transform mapping ``U`` to ``O`` (e.g.
      ``orthogonalize(...)``); required for NAMO.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`SecondMomentState`.
    Without ``momentum``/``orthogonalizer`` it is a plain stage whose input is
    ``O``; with them its input is the raw gradient.

  Raises:
    ValueError: for an unknown ``method``, ``beta2`` outside ``[0, 1)``, a
      negative ``eps``, or NAMO without its inner transforms.

  References:
    C. Si, D. Zhang, W. Shen, "AdaMuon: Adaptive Muon Optimizer", arXiv 2507.11005, 2025.
    Z. Li et al., "NorMuon: Making Muon more efficient and scalable", arXiv 2510.05491,
    2025.
    M. Zhang, Y. Liu, H. Schaeffer, "Adam Improves Muon: Adaptive Moment Estimation with
    Orthogonalized Momentum" (NAMO), arXiv 2602.17080, 2026.
    NVIDIA-NeMo/Emerging-Optimizers (adaptive Muon).
  """
  check_choice("moment2_method", method, SECOND_MOMENT_METHODS)
  matrix_view.check_dimension_numbers(dimension_numbers)
  check_range("beta2", beta2, 0.0, 1.0, high_open=True)
  check_range("eps", eps, 0.0, float("inf"))
  wrapped = momentum is not None or orthogonalizer is not None
  if method == "namo" and (momentum is None or orthogonalizer is None):
    raise ValueError(
        "moment2_method='namo' needs the raw gradient and the pre-orthogonalization "
        "update: pass both momentum= and orthogonalizer= so that "
        "scale_by_second_moment wraps them.")
  momentum = momentum if momentum is not None else optax.identity()
  orthogonalizer = orthogonalizer if orthogonalizer is not None else optax.identity()

  def init_nu(params):
    dims = (matrix_view.resolve_dims(params, dimension_numbers)
            if method != "adamuon" else None)

    # Built from the parameter (zeros_like, a reduction of it) rather than its shape, so
    # the buffer has the parameter's sharding from init on, as the update gives it.
    def one(p, d=None):
      dtype = _stat_dtype(p.dtype)
      if method == "adamuon":
        return jnp.zeros_like(p, dtype)
      if method == "normuon":
        om, _ = matrix_view.to_matrices(jnp.zeros_like(p, dtype), d)
        axis = -1 if _rowwise(p.shape, d) else -2
        _, restore_v = matrix_view.to_matrices(
            jnp.zeros(_normuon_buffer_shape(p.shape, d), dtype), d)
        return restore_v(jnp.mean(om, axis=axis, keepdims=True))
      n_batch, _, _ = matrix_view.matrix_shape(p.shape, d)
      return jnp.zeros((n_batch,), dtype)

    if dims is None:
      return jax.tree.map(one, params)
    return jax.tree.map(one, params, dims)

  def init_fn(params):
    inner = (momentum.init(params), orthogonalizer.init(params)) if wrapped else ()
    return SecondMomentState(inner_state=inner, nu=init_nu(params))

  def update_fn(updates, state, params=None):
    raw = updates
    if wrapped:
      mom_state, orth_state = state.inner_state
      u, mom_state = momentum.update(updates, mom_state, params)
      o, orth_state = orthogonalizer.update(u, orth_state, params)
      inner = (mom_state, orth_state)
    else:
      u, o, inner = updates, updates, ()

    o_leaves, treedef = jax.tree.flatten(o)
    nu_leaves = treedef.flatten_up_to(state.nu)
    if method == "adamuon":
      def one(o, v):
        of = o.astype(v.dtype)
        v = v + (1 - beta2) * (jnp.square(of) - v)
        return (of / (jnp.sqrt(v) + eps)).astype(o.dtype), v
      pairs = [one(*args) for args in zip(o_leaves, nu_leaves)]
    else:
      dims = treedef.flatten_up_to(matrix_view.resolve_dims(o, dimension_numbers))
      if method == "normuon":
        def one(o, v, d):
          om, restore = matrix_view.to_matrices(o.astype(v.dtype), d)
          vm, restore_v = matrix_view.to_matrices(v, d)
          axis = -1 if _rowwise(o.shape, d) else -2
          s = jnp.mean(jnp.square(om), axis=axis, keepdims=True)
          vm = vm + (1 - beta2) * (s - vm)
          out = om * jax.lax.rsqrt(jnp.maximum(vm, eps))
          out = out * (_frobenius(om) / jnp.maximum(_frobenius(out), eps))
          return restore(out).astype(o.dtype), restore_v(vm)
        pairs = [one(*args) for args in zip(o_leaves, nu_leaves, dims)]
      else:  # namo
        def one(o, u, g, v, d):
          om, restore = matrix_view.to_matrices(o.astype(v.dtype), d)
          um, _ = matrix_view.to_matrices(u.astype(v.dtype), d)
          gm, _ = matrix_view.to_matrices(g.astype(v.dtype), d)
          v = v + (1 - beta2) * (jnp.sum(jnp.square(gm), axis=(-2, -1)) - v)
          alpha = _frobenius(um) / (jnp.sqrt(v)[:, None, None] + eps)
          return restore(alpha * om).astype(o.dtype), v
        pairs = [one(*args) for args in zip(o_leaves, treedef.flatten_up_to(u),
                                            treedef.flatten_up_to(raw), nu_leaves, dims)]

    # Flat lists (not a transpose of a pytree of pairs): an empty tree, such as a branch
    # no parameter is routed to, has no leaves to transpose.
    out = treedef.unflatten([p[0] for p in pairs])
    nu = treedef.unflatten([p[1] for p in pairs])
    return out, SecondMomentState(inner_state=inner, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_namo(
    momentum: optax.GradientTransformation,
    orthogonalizer: optax.GradientTransformation,
    beta2: Any = 0.95,
    eps: Any = 1e-8,
    dimension_numbers: Any = None,
) -> optax.GradientTransformation:
  """NAMO scaling around ``momentum -> orthogonalizer`` (shorthand).

  Equivalent to ``scale_by_second_moment("namo", beta2, eps, dimension_numbers,
  momentum=momentum, orthogonalizer=orthogonalizer)``: the input is the raw
  gradient, the output ``||U||_F / (sqrt(v) + eps) * O`` where
  ``v <- beta2 v + (1 - beta2) ||g||_F^2`` (no bias correction), per matrix.

  Args:
    momentum: transform mapping the raw gradient ``g`` to ``U`` (e.g.
      :func:`ortho_optax.stages.momentum.ema_momentum`).
    orthogonalizer: transform mapping ``U`` to ``O`` (e.g. ``orthogonalize(...)``).
    beta2: EMA coefficient of ``||g||_F^2``, in ``[0, 1)`` (default 0.95).
    eps: added to ``sqrt(v)`` (default 1e-8).
    dimension_numbers: per-leaf matrix views, as accepted by
      :func:`ortho_optax.matrix_view.resolve_dims` (``None``: the default views).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`SecondMomentState` whose
    input is the raw gradient (``inner_state`` holds the momentum and orthogonalizer
    states).

  Raises:
    ValueError: for ``beta2`` outside ``[0, 1)`` or a negative ``eps``.

  References:
    M. Zhang, Y. Liu, H. Schaeffer, "Adam Improves Muon: Adaptive Moment Estimation
    with Orthogonalized Momentum", arXiv 2602.17080, 2026; NVIDIA-NeMo/Emerging-Optimizers
    (adaptive Muon, ``moment2_method="namo"``).
  """
  return scale_by_second_moment("namo", beta2, eps, dimension_numbers,
                                momentum=momentum, orthogonalizer=orthogonalizer)
