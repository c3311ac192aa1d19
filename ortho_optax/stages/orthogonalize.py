"""The orthogonalization stage: replaces each matrix-shaped update by its (approximate)
polar factor, and AuON's cosh normalisation stage.

``orthogonalize`` views every leaf as a stack of PyTorch-oriented ``(batch, out, in)``
matrices (:mod:`ortho_optax.matrix_view`), concatenates the stacks of all leaves with the
same ``(out, in, dtype)`` (for Newton–Schulz, the same shape in either orientation) so each
distinct shape costs one batched call (what the Pallas kernels want), runs the chosen
method and restores every leaf's shape and dtype.

References:
  Jordan et al., *Muon*, 2024; jeb1399/OAdamW (``MuonProjector``, ``update_proj_gap``);
  tilde-research/aurora-release; ryyzn9/AuON. See SPEC.md §1-5.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from ortho_optax import distributed, matrix_view
from ortho_optax.coefficients import resolve_coefficients
from ortho_optax.newton_schulz import (_check_compute_dtype, newton_schulz,
                                       newton_schulz_many, uses_kernels, validate_args)
from ortho_optax.polar import (cosh_normalize, leverage_uniform_polar, polar,
                               riemannian_balanced_polar)

METHODS = ("newton_schulz", "polar", "aurora", "riemannian_aurora")
#: ``steps=None`` means this many iterations for the method (Aurora's polar uses 12).
DEFAULT_STEPS = {"newton_schulz": 5, "polar": 0, "aurora": 12, "riemannian_aurora": 12}


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


def _is_int(v):
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_int(value, name, minimum):
  if isinstance(value, numbers.Number) and (not _is_int(value) or value < minimum):
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _check_real(value, name, minimum=0.0, strict=True):
  if isinstance(value, numbers.Real) and not (value > minimum if strict else value >= minimum):
    raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value!r}.")


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
) -> optax.GradientTransformation:
  """Orthogonalizes every (non-None) update leaf, viewed as a stack of matrices.

  Routing (which leaves are matrices worth orthogonalizing) happens outside: this stage
  processes every leaf it receives, so 1-D leaves need an explicit view or must be
  routed elsewhere (``resolve_dims`` raises a clear error).

  Args:
    method: ``"newton_schulz"`` (:func:`~ortho_optax.newton_schulz.newton_schulz`),
      ``"polar"`` (exact SVD, :func:`~ortho_optax.polar.polar`), ``"aurora"``
      (leverage-uniform polar, :func:`~ortho_optax.polar.leverage_uniform_polar`) or
      ``"riemannian_aurora"`` (:func:`~ortho_optax.polar.riemannian_balanced_polar`).
    steps: NS steps; ``None`` = the method's default (5 for ``newton_schulz``, Aurora's
      12 polar iterations for the Aurora methods; unused by ``polar``).
    coefficients: NS coefficient preset or table (``newton_schulz`` only; the Aurora
      methods always use Aurora's ``(2, −1.5, 0.5)``).
    order: coefficient order (``None``: the preset's default).
    preconditioning: ``"frobenius"`` | ``"aol"`` | ``"schatten"`` | ``"spectral"``
      (``newton_schulz`` only).
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
  if method not in METHODS:
    raise ValueError(f"method={method!r} is not one of {METHODS}.")
  if steps is None:
    steps = DEFAULT_STEPS[method]
  elif method != "polar":
    _check_int(steps, "steps", 1)
  validate_args(preconditioning, backend, eps)
  if compute_dtype is not None:
    _check_compute_dtype(compute_dtype, jnp.float32)
  if method == "newton_schulz":
    resolve_coefficients(coefficients, steps, order)  # raises for bad names / lengths
  if method in ("aurora", "riemannian_aurora") and preconditioning != "frobenius":
    raise ValueError(
        f"preconditioning={preconditioning!r} only applies to method='newton_schulz'; "
        f"Aurora's polar always uses Frobenius normalisation.")
  _check_int(update_proj_gap, "update_proj_gap", 1)
  _check_int(pp_iterations, "pp_iterations", 1)
  _check_real(pp_beta, "pp_beta")
  _check_int(outer_steps, "outer_steps", 0)
  _check_int(cg_steps, "cg_steps", 0)
  _check_real(riemannian_eta, "riemannian_eta", strict=False)
  _check_int(retraction_steps, "retraction_steps", 0)
  if method in ("aurora", "riemannian_aurora"):
    _check_real(eps, "eps")
  use_cache = update_proj_gap > 1

  ns_kwargs = dict(steps=steps, coefficients=coefficients, order=order,
                   preconditioning=preconditioning, eps=eps, compute_dtype=compute_dtype,
                   backend=backend)

  def run_method(stack):
    if method == "newton_schulz":
      return newton_schulz(stack, **ns_kwargs)
    if method == "polar":
      return polar(stack)
    if method == "aurora":
      return leverage_uniform_polar(stack, pp_iterations=pp_iterations, pp_beta=pp_beta,
                                    eps=eps, compute_dtype=compute_dtype, steps=steps,
                                    backend=backend)
    return riemannian_balanced_polar(
        stack, outer_steps=outer_steps, cg_steps=cg_steps, riemannian_eta=riemannian_eta,
        retraction_steps=retraction_steps, eps=eps, compute_dtype=compute_dtype, steps=steps,
        backend=backend)

  def orthogonalize_tree(updates):
    dims_tree = matrix_view.resolve_dims(updates, dimension_numbers)
    is_none = lambda x: x is None
    leaves, treedef = jax.tree_util.tree_flatten(updates, is_leaf=is_none)
    dims_leaves = treedef.flatten_up_to(dims_tree)
    # Group the matrix stacks of all leaves by (out, in, dtype): one batched call each.
    # Newton–Schulz works on the wide orientation anyway (it transposes tall matrices
    # itself), so for it tall stacks are transposed here and grouped with the wide ones
    # of the same shape: a GPT's (3072, 768) and (768, 3072) MLP matrices make one call
    # (fewer launches and fuller waves for the GPU kernels), with identical results.
    # Orientation tricks (below) only without the gather_whole layout: XLA's CPU
    # all-to-all rejects transposed operands there (an HLO verifier error).
    orient = method == "newton_schulz" and not distributed.gathers_whole()
    groups: dict[tuple, list[tuple[int, jax.Array, bool]]] = {}
    restores = {}
    for i, (leaf, dims) in enumerate(zip(leaves, dims_leaves)):
      if leaf is None:
        continue
      stored = _stored_view(leaf, dims) if orient else None
      # A Flax kernel is the transpose of its (out, in) view. NS works on the wide
      # orientation of a non-square matrix, so such a kernel is taken as stored (no
      # transposes, same result bit for bit). Square kernels are stacked as stored; on
      # the kernels NS of their (out, in) view needs no transpose at all
      # (newton_schulz_of_transpose), on XLA the whole stack is transposed once (one
      # batched transpose instead of one per leaf; AOL scales the rows of that view).
      flip = False
      if stored is not None:
        mats, restore = stored
        flip = mats.shape[1] == mats.shape[2]
      else:
        mats, restore = matrix_view.to_matrices(leaf, dims)
      restores[i] = restore
      tall = orient and mats.shape[1] > mats.shape[2]
      rows, cols = sorted(mats.shape[1:]) if tall else mats.shape[1:]
      groups.setdefault((rows, cols, mats.dtype, flip), []).append((i, mats, tall))
    out_leaves = list(leaves)
    results, on_kernels_stacks = {}, []
    for (rows, cols, dtype, flip), members in groups.items():
      sizes = [m.shape[0] for _, m, _ in members]
      on_kernels = orient and uses_kernels(
          (sum(sizes), rows, cols), dtype, preconditioning=preconditioning,
          compute_dtype=compute_dtype, backend=backend)
      pieces = []
      for _, mats, tall in members:
        if on_kernels:
          # The kernels take bf16: each piece is rounded to bf16 where it is produced
          # (with the momentum, say) and the stack is concatenated in bf16 (half the
          # bytes of a float32 one; the normalisation then reads bf16, as Keller Jordan's
          # G.bfloat16() / ‖G‖ does). The barrier keeps XLA from moving the rounding
          # (and the normalisation's reductions) back onto the float32 pieces.
          mats = mats.astype(jnp.bfloat16)
        if tall:
          mats = jnp.swapaxes(mats, 1, 2)
        pieces.append(lax.optimization_barrier(mats) if on_kernels else mats)
      stack = _stack(pieces, on_kernels)
      key = (rows, cols, dtype, flip)
      if on_kernels:
        # All kernel stacks run below in one call: each NS step's GEMMs are then one
        # launch for all of them. A flipped (square, stored as the transpose) stack is
        # orthogonalized in its (out, in) view without being transposed.
        on_kernels_stacks.append((key, stack, flip))
      elif flip:  # the barriers keep XLA from sinking the transpose into every leaf
        stack = jnp.swapaxes(lax.optimization_barrier(stack), 1, 2)
        results[key] = lax.optimization_barrier(jnp.swapaxes(run_method(stack), 1, 2))
      else:
        # Identity unless inside ortho_optax.distributed.distribute (multi-device layout).
        results[key] = distributed.orthogonalize_stack(run_method, stack)
    if on_kernels_stacks:
      keys, stacks, flips = zip(*on_kernels_stacks)
      results.update(zip(keys, newton_schulz_many(stacks, of_transpose=flips, **ns_kwargs)))
    for key, members in groups.items():
      result = results[key]
      offset = 0
      for (i, mats, tall) in members:
        size = mats.shape[0]
        part = result[offset:offset + size]
        if tall:
          part = jnp.swapaxes(part, 1, 2)
        out_leaves[i] = restores[i](part).astype(leaves[i].dtype)
        offset += size
    return jax.tree_util.tree_unflatten(treedef, out_leaves)

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
        is_leaf=lambda x: x is None)
    new = lax.cond(recompute, orthogonalize_tree, lambda u: cache_like, updates)
    # Keep the cache's dtypes fixed (those of init) so the state is loop-carry stable.
    cache = jax.tree_util.tree_map(
        lambda n, c: c if n is None else n.astype(c.dtype), new, state.cache,
        is_leaf=lambda x: x is None)
    return new, OrthogonalizeState(count=count, cache=cache)

  return optax.GradientTransformation(init_fn, update_fn)


def _stack(pieces, on_kernels):
  """``jnp.concatenate(pieces)``; on the kernel path by TMA copies where the pieces allow
  (:func:`ortho_optax.pallas.stack.concatenate`: 4.5x faster than XLA's bf16 concatenate on
  an H200, 0.134 → 0.030 ms for 48×768² and 0.268 → 0.059 ms for 24×768×3072)."""
  if len(pieces) == 1:
    return pieces[0]
  if on_kernels:
    from ortho_optax.pallas import stack  # local: keeps the XLA path free of the GPU module
    if stack.supports(pieces):
      return stack.concatenate(pieces)
  return jnp.concatenate(pieces, axis=0)


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
    ryyzn9/AuON, ``auon/optimizer.py`` (SPEC.md §1.2).
  """
  _check_real(gamma, "gamma", strict=False)

  def init_fn(params):
    del params
    return ScaleByCoshNormState()

  def update_fn(updates, state, params=None):
    del params
    updates = jax.tree_util.tree_map(lambda g: cosh_normalize(g, gamma), updates)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)
