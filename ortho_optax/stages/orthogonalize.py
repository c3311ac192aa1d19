"""The orthogonalization stage: replaces each matrix-shaped update by its (approximate)
polar factor, and AuON's cosh normalisation stage.

``orthogonalize`` reads as group → run → ungroup: it views every leaf as a stack of
PyTorch-oriented ``(batch, out, in)`` matrices (:mod:`ortho_optax.matrix_view`), groups
the stacks of all leaves of the same shape and dtype (for Newton–Schulz, the same shape in
either orientation), has its orthogonalizer (:mod:`ortho_optax.orthogonalizers`, chosen
once when the stage is built) build one stack per group and run all of them in one call,
and restores every leaf's shape and dtype.

References:
  K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024;
  jeb1399/OAdamW (``MuonProjector``, ``update_proj_gap``); tilde-research/aurora-release;
  ryyzn9/AuON.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from ortho_optax import distributed, matrix_view, validation
from ortho_optax.orthogonalizers import METHODS, make_orthogonalizer
from ortho_optax.polar import cosh_normalize

#: ``steps=None`` means this many iterations for the method (Aurora's polar uses 12).
DEFAULT_STEPS = {"newton_schulz": 5, "gram_newton_schulz": 5, "polar": 0, "aurora": 12,
                 "riemannian_aurora": 12}


class OrthogonalizeState(NamedTuple):
  """State of :func:`orthogonalize`.

  Attributes:
    count: number of updates processed so far (int32). The OAdamW step ``t`` of the
      current update is ``count + 1``.
    cache: the last computed output per leaf (a pytree like the updates) when
      ``update_proj_gap > 1``, else ``None``.
  """
  count: jax.Array
  cache: Any


def orthogonalize(
    method: str = "newton_schulz",
    *,
    steps: int | None = None,
    coefficients="muon",
    order: str | None = None,
    preconditioning: str = "frobenius",
    eps: float = 1e-7,
    compute_dtype=jnp.bfloat16,
    backend: str = "auto",
    dimension_numbers=None,
    update_proj_gap: int = 1,
    pp_iterations: int = 2,
    pp_beta: float = 0.5,
    outer_steps: int = 3,
    cg_steps: int = 20,
    riemannian_eta: float = 0.1,
    retraction_steps: int = 2,
    restart_every: int | None = 2,
) -> optax.GradientTransformation:
  """Orthogonalizes every (non-None) update leaf, viewed as a stack of matrices.

  Routing (which leaves are matrices worth orthogonalizing) happens outside: this stage
  processes every leaf it receives, so 1-D leaves need an explicit view or must be
  routed elsewhere (``resolve_dims`` raises a clear error).

  Args:
    method: ``"newton_schulz"`` (:func:`~ortho_optax.newton_schulz.newton_schulz`),
      ``"gram_newton_schulz"`` (the same polynomial iterated on the Gram matrix for wide
      and tall stacks, :func:`~ortho_optax.gram_newton_schulz.gram_newton_schulz`, on
      the Gram kernels of :mod:`ortho_optax.pallas.gram_ns` where the kernels take the
      stack; square stacks keep standard Newton–Schulz),
      ``"polar"`` (exact SVD, :func:`~ortho_optax.polar.polar`), ``"aurora"``
      (leverage-uniform polar, :func:`~ortho_optax.polar.leverage_uniform_polar`) or
      ``"riemannian_aurora"`` (:func:`~ortho_optax.polar.riemannian_balanced_polar`).
    steps: NS steps; ``None`` = the method's default (5 for the Newton–Schulz methods, Aurora's
      12 polar iterations for the Aurora methods; unused by ``polar``).
    coefficients: NS coefficient preset or table (the Newton–Schulz methods; the Aurora
      methods always use Aurora's ``(2, −1.5, 0.5)``).
    order: coefficient order (``None``: the preset's default).
    preconditioning: ``"frobenius"`` | ``"aol"`` | ``"schatten"`` | ``"spectral"``
      (the Newton–Schulz methods).
    eps: NS normalisation epsilon; the row-norm clamp of the Aurora methods.
    compute_dtype: dtype of the iterations (``None``: the update's dtype).
    backend: ``"auto"`` | ``"xla"`` | ``"pallas"``.
    dimension_numbers: per-leaf matrix views, see
      :func:`ortho_optax.matrix_view.resolve_dims` (``None``: Flax ``(in, out)`` for
      2-D leaves and conv kernels, an error otherwise).
    update_proj_gap: OAdamW's projection gap: with per-tensor step ``t`` (starting at 1),
      the output is recomputed when there is no cache yet (``t = 1``) or
      ``t % update_proj_gap == 0``; otherwise the cached output of an earlier gradient
      is returned (stale, as in the reference). 1 recomputes every step.
    pp_iterations, pp_beta: Aurora's leverage balancing.
    outer_steps, cg_steps, riemannian_eta, retraction_steps: Riemannian Aurora.
    restart_every: Gram Newton–Schulz's restart period (``gram_newton_schulz`` only).

  Returns:
    An ``optax.GradientTransformation`` with :class:`OrthogonalizeState`.

  Raises:
    ValueError: at construction for an unknown method / preset / preconditioning / backend
      or out-of-range Python numbers, naming the value and the choices.

  References:
    K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024,
    https://kellerjordan.github.io/posts/muon/; NVIDIA-NeMo/Emerging-Optimizers;
    Boissin et al., "Turbo-Muon", arXiv 2512.04632, 2025; "Aurora: A Leverage-Aware
    Spectral Optimizer", arXiv 2606.27715, 2026 (tilde-research/aurora-release).
  """
  validation.check_choice("method", method, METHODS)
  matrix_view.check_dimension_numbers(dimension_numbers)
  if steps is None:
    steps = DEFAULT_STEPS[method]
  elif method != "polar":
    validation.check_int("steps", steps, minimum=1)
  validation.check_int("update_proj_gap", update_proj_gap, minimum=1)
  orthogonalizer = make_orthogonalizer(
      method, steps=steps, coefficients=coefficients, order=order,
      preconditioning=preconditioning, eps=eps, compute_dtype=compute_dtype, backend=backend,
      pp_iterations=pp_iterations, pp_beta=pp_beta, outer_steps=outer_steps,
      cg_steps=cg_steps, riemannian_eta=riemannian_eta, retraction_steps=retraction_steps,
      restart_every=restart_every)
  use_cache = update_proj_gap > 1

  def orthogonalize_tree(updates):
    leaves, treedef = jax.tree_util.tree_flatten(updates, is_leaf=_is_none)
    dims = treedef.flatten_up_to(matrix_view.resolve_dims(updates, dimension_numbers))
    # Under distribute()'s gather_whole layout each stack is spread over the devices;
    # the orientation tricks stay off there (XLA's CPU all-to-all rejects transposed
    # operands: an HLO verifier error).
    spread = distributed.gathers_whole()
    groups = _group(leaves, dims, orthogonalizer.transpose_invariant and not spread)
    stacks = [orthogonalizer.stack([m.matrices for m in g.members], g.of_transpose)
              for g in groups]
    if spread:
      results = [distributed.orthogonalize_stack(orthogonalizer.run, s.matrices)
                 for s in stacks]
    else:
      results = orthogonalizer.run_many(stacks)
    return jax.tree_util.tree_unflatten(treedef, _ungroup(leaves, groups, results))

  def init_fn(params):
    matrix_view.resolve_dims(params, dimension_numbers)  # fail early on leaves with no view
    cache = None
    if use_cache:
      cache = jax.tree_util.tree_map(jnp.zeros_like, params)
    return OrthogonalizeState(count=jnp.zeros([], jnp.int32), cache=cache)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count) if hasattr(optax, "safe_increment") else (
        state.count + 1)
    if not use_cache:
      return orthogonalize_tree(updates), OrthogonalizeState(count=count, cache=None)
    # OAdamW: t = count (1-based after the increment); recompute when there is no cache
    # yet (t == 1) or t % gap == 0, else return the stale cached output.
    recompute = jnp.logical_or(count == 1, count % update_proj_gap == 0)
    cache_like = jax.tree_util.tree_map(
        lambda u, c: None if u is None else c.astype(u.dtype), updates, state.cache,
        is_leaf=_is_none)
    new = lax.cond(recompute, orthogonalize_tree, lambda u: cache_like, updates)
    # Keep the cache's dtypes fixed (those of init) so the state is loop-carry stable.
    cache = jax.tree_util.tree_map(
        lambda n, c: c if n is None else n.astype(c.dtype), new, state.cache,
        is_leaf=_is_none)
    return new, OrthogonalizeState(count=count, cache=cache)

  return optax.GradientTransformation(init_fn, update_fn)


def _is_none(x):
  return x is None


class _Member(NamedTuple):
  """One leaf's matrices in a group: ``matrices`` as stacked, ``tall`` if they were
  transposed into the group's wide orientation, ``restore`` back to the leaf's shape."""
  index: int
  matrices: jax.Array
  tall: bool
  restore: Any


class _Group(NamedTuple):
  of_transpose: bool
  members: list


def _group(leaves, dims, orient: bool) -> list[_Group]:
  """The leaves' matrix stacks, grouped by ``(rows, cols, dtype, of_transpose)``.

  With ``orient`` (an orientation-free method, Newton–Schulz) a tall stack joins the wide
  stacks of its transposed shape (a GPT's (3072, 768) and (768, 3072) MLP matrices make
  one call: fewer launches and fuller waves for the kernels, identical results), and a
  Flax kernel, the transpose of its ``(out, in)`` view, is taken as stored: a non-square
  one needs no transpose at all, a square one is flagged ``of_transpose`` for the
  orthogonalizer (the kernels orthogonalize it without transposing, XLA transposes the
  whole stack once).
  """
  groups: dict[tuple, _Group] = {}
  for i, (leaf, leaf_dims) in enumerate(zip(leaves, dims)):
    if leaf is None:
      continue
    stored = _stored_view(leaf, leaf_dims) if orient else None
    if stored is not None:
      mats, restore = stored
      flip = mats.shape[1] == mats.shape[2]
    else:
      mats, restore = matrix_view.to_matrices(leaf, leaf_dims)
      flip = False
    tall = orient and mats.shape[1] > mats.shape[2]
    if tall:
      mats = jnp.swapaxes(mats, 1, 2)
    key = mats.shape[1:] + (mats.dtype, flip)
    groups.setdefault(key, _Group(flip, [])).members.append(_Member(i, mats, tall, restore))
  return list(groups.values())


def _ungroup(leaves, groups, results) -> list:
  """The leaves with each member's slice of its group's result, in the leaf's shape and
  dtype."""
  out = list(leaves)
  for group, result in zip(groups, results):
    offset = 0
    for m in group.members:
      part = result[offset:offset + m.matrices.shape[0]]
      offset += m.matrices.shape[0]
      if m.tall:
        part = jnp.swapaxes(part, 1, 2)
      out[m.index] = m.restore(part).astype(leaves[m.index].dtype)
  return out


class ScaleByCoshNormState(NamedTuple):
  """:func:`scale_by_cosh_norm` is stateless."""


def _stored_view(leaf, dims):
  """``(leaf as (batch, in, out) matrices, restore)`` without a copy when the matrix view
  is the transpose of the leaf's two trailing axes (a Flax kernel ``(..., in, out)``);
  ``None`` for any other view."""
  dims = matrix_view.validate_dims(dims, leaf.shape)
  nd = leaf.ndim
  if (nd < 2 or dims.num_splits != 1 or dims.reduction_axes != (nd - 2,)
      or dims.output_axes != (nd - 1,)):
    return None
  shape = leaf.shape
  batch = math.prod(shape[:-2])  # explicit: reshape(-1, ...) fails on empty leaves
  return leaf.reshape((batch,) + shape[-2:]), lambda m: m.reshape(shape)


def scale_by_cosh_norm(gamma: float = 1.5) -> optax.GradientTransformation:
  """AuON's cosh normalisation, per leaf, for leaves of any rank.

  Each leaf ``G`` becomes ``G / (r + 1e-8)`` with ``r = sqrt(mean(cosh(γG/(‖G‖+1e-7))²))``
  (:func:`ortho_optax.polar.cosh_normalize`); an all-zero leaf stays zero (AuON skips
  that parameter's update).

  Args:
    gamma: AuON's γ (>= 0).

  Returns:
    An ``optax.GradientTransformation``.

  References:
    ryyzn9/AuON, ``auon/optimizer.py``.
  """
  validation.check_non_negative("gamma", gamma)

  def init_fn(params):
    del params
    return ScaleByCoshNormState()

  def update_fn(updates, state, params=None):
    del params
    updates = jax.tree_util.tree_map(lambda g: cosh_normalize(g, gamma), updates)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)
