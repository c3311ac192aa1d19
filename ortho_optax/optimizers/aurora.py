"""Aurora and Riemannian Aurora (tilde-research/aurora-release).

Per hidden matrix ``W`` with gradient ``G`` (PyTorch view ``(out, in)`` = ``(r, c)``)::

  m <- lerp(m, G, 1 - mu);  U = lerp(G, m, mu) (nesterov) or m
  O = polar(U)                              square
  O = leverage_uniform_polar(U)             non-square (aurora)
  O = riemannian_balanced_polar(U)          non-square (riemannian_aurora)
  O <- O sqrt(max(1, r / c))
  W <- W (1 - lr wd) - lr O

Non-finite updates. The reference raises ``RuntimeError`` when ``O`` has a non-finite
element. A jitted optax transformation cannot raise, so the orthogonalized branch is
wrapped in :func:`skip_nonfinite_updates`: when any element of the branch's gradient,
output or new state is NaN/Inf (a NaN gradient, an overflow in the polar iteration) the
update of every Aurora matrix is **zero for that step, the branch's state (momentum) is
not advanced**, and the step is counted (``notfinite_count`` consecutive,
``total_notfinite`` overall; see :func:`nonfinite_count`). Nothing is silently written
into the weights or the momentum. (Unlike :func:`optax.apply_if_finite`, which tests
only the incoming gradients, the guard also tests what would be applied and stored.)
Wrap the whole optimizer in ``optax.apply_if_finite`` as well to skip the AdamW branch
on bad gradients too.
"""

# No `from __future__ import annotations`: optax (its inject_hyperparams and its test suite)
# reads the learning rate's annotation, optax.ScalarOrSchedule, from the signature.
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax
from optax import tree_utils as otu

from ortho_optax import validation
from ortho_optax.optimizers import _common
from ortho_optax.stages import decay as decay_stages
from ortho_optax.stages import momentum as momentum_stages
from ortho_optax.stages import orthogonalize as orth_stages
from ortho_optax.stages import scale as scale_stages


class SkipNonFiniteState(NamedTuple):
  """State of :func:`skip_nonfinite_updates`.

  Attributes:
    notfinite_count: consecutive skipped steps (reset by a finite one).
    total_notfinite: all skipped steps.
    inner_state: the wrapped transformation's state (not advanced on skipped steps).
  """
  notfinite_count: chex.Array
  total_notfinite: chex.Array
  inner_state: Any


def skip_nonfinite_updates(
    inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Zeroes a step that would produce a NaN/Inf and keeps the previous inner state.

  Args:
    inner: the transformation to guard.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`SkipNonFiniteState`.
    On a step where any element of the incoming updates, of ``inner``'s output or of
    its new state is not finite, every update is zero, ``inner``'s state is left as it
    was and both counters increase.

  References:
    "Aurora: A Leverage-Aware Spectral Optimizer", arXiv 2606.27715, 2026 (Tilde
    Research); tilde-research/aurora-release (its non-finite step guard);
    ``optax.apply_if_finite``.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    # Two arrays, not one shared: a training step that donates its state
    # (jax.jit(donate_argnums=...)) cannot take the same buffer twice.
    return SkipNonFiniteState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32),
                              inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
    # The incoming gradient, the output and the new state must all be finite: a NaN
    # gradient can come out as a finite (zero) polar factor while poisoning the momentum.
    leaves = [x for x in jax.tree.leaves((updates, new_updates, new_inner))
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves \
        else jnp.array(True)
    new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
    new_inner = otu.tree_where(finite, new_inner, state.inner_state)
    bad = (~finite).astype(jnp.int32)
    return new_updates, SkipNonFiniteState(
        notfinite_count=jnp.where(finite, 0, optax.safe_int32_increment(state.notfinite_count)),
        total_notfinite=state.total_notfinite + bad,
        inner_state=new_inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _aurora_branch(orth, learning_rate, weight_decay, momentum, nesterov, dims, mu_dtype):
  chain = optax.chain(
      momentum_stages.ema_momentum(momentum, nesterov=nesterov, mu_dtype=mu_dtype),
      orth,
      scale_stages.scale_by_shape("shape_scaling", dimension_numbers=dims),
      decay_stages.scale_by_learning_rate_and_decay(learning_rate, weight_decay, "decoupled"),
  )
  return skip_nonfinite_updates(chain)


#: The reference's step counts, taken where the signatures say ``None``: a plain
#: ``optax.inject_hyperparams(aurora)`` then keeps them static (it turns every int it is
#: not told to keep static into an array).
PP_ITERATIONS = 2
RIEMANNIAN_STEPS = dict(outer_steps=3, cg_steps=20, retraction_steps=2)


def aurora(
    learning_rate: optax.ScalarOrSchedule = 0.05,
    weight_decay: float = 0.025,
    momentum: float = 0.95,
    nesterov: bool = True,
    pp_iterations: Optional[int] = None,
    pp_beta: float = 0.5,
    eps: float = 1e-7,
    compute_dtype: Optional[Any] = "bfloat16",
    *,
    adam_learning_rate: optax.ScalarOrSchedule = 3e-4,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-10,
    adam_weight_decay: float = 0.0,
    adam_tx: Optional[optax.GradientTransformation] = None,
    label_fn: Any = None,
    dimension_numbers: Any = None,
    backend: str = "auto",
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  """Aurora: Muon with a leverage-uniform (row-balanced) polar factor.

  Square matrices get the Aurora polar factor (12 quintic steps ``(2, -1.5, 0.5)``);
  non-square ones the polar factor of the row-rebalanced matrix (``pp_iterations``
  passes that push the long side's row norms toward uniform leverage ``n/m``, damped by
  ``pp_beta``). The result is scaled by ``sqrt(max(1, out/in))``.

  Args:
    learning_rate: ``eta >= 0`` (a number) or a schedule.
    weight_decay: decoupled decay ``>= 0``.
    momentum: ``mu`` in ``[0, 1)``.
    nesterov: feed the Nesterov blend (``True``) or the buffer itself.
    pp_iterations: row-balancing passes, an int ``>= 1`` (1 = polar of the
      row-normalised matrix; ``None``: 2, the reference's).
    pp_beta: damping exponent ``> 0`` of the balancing (0.5 = undamped).
    eps: ``> 0``, floors row norms and the Frobenius normalisation.
    compute_dtype: dtype of the polar iteration. ``jnp.bfloat16`` is the published
      behaviour; ``jnp.float32`` reproduces the fp32 reference.
    adam_*, adam_tx, label_fn: the element-wise branch and routing, as in
      :func:`ortho_optax.optimizers.auon.auon`.
    dimension_numbers: per-leaf :class:`ortho_optax.MatrixDims` (``None``: Flax
      ``(in, out)`` for 2-D leaves); a pytree for the full parameter tree works.
    backend: Newton-Schulz backend (``"auto"``, ``"xla"``, ``"pallas"``).
    mu_dtype: dtype of the momentum buffer.

  Returns:
    An ``optax.GradientTransformation`` (an ``optax.multi_transform``). Non-finite
    orthogonalized updates are skipped and counted (see the module docstring).

  References:
    "Aurora: A Leverage-Aware Spectral Optimizer", arXiv 2606.27715, 2026 (Tilde
    Research); tilde-research/aurora-release ``src/aurora.py::aurora`` (commit 3d79a5c).
  """
  pp_iterations = _common.default_if_none(pp_iterations, PP_ITERATIONS)
  validation.check_static(pp_iterations=pp_iterations)
  dims = _common.masked_dimension_numbers(dimension_numbers)
  orth = orth_stages.orthogonalize(
      "aurora", pp_iterations=pp_iterations, pp_beta=pp_beta, eps=eps,
      compute_dtype=validation.check_dtype("compute_dtype", compute_dtype), backend=backend,
      dimension_numbers=dims)
  ortho_tx = _aurora_branch(orth, learning_rate, weight_decay, momentum, nesterov, dims,
                            mu_dtype)
  return _common.with_adamw_fallback(
      ortho_tx, adam_learning_rate=adam_learning_rate, adam_b1=adam_b1, adam_b2=adam_b2,
      adam_eps=adam_eps, adam_weight_decay=adam_weight_decay, label_fn=label_fn,
      dimension_numbers=dimension_numbers, adam_tx=adam_tx, name="aurora")


def riemannian_aurora(
    learning_rate: optax.ScalarOrSchedule = 0.05,
    weight_decay: float = 0.025,
    momentum: float = 0.95,
    nesterov: bool = True,
    outer_steps: Optional[int] = None,
    cg_steps: Optional[int] = None,
    riemannian_eta: float = 0.1,
    retraction_steps: Optional[int] = None,
    eps: float = 1e-7,
    compute_dtype: Optional[Any] = "bfloat16",
    *,
    adam_learning_rate: optax.ScalarOrSchedule = 3e-4,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-10,
    adam_weight_decay: float = 0.0,
    adam_tx: Optional[optax.GradientTransformation] = None,
    label_fn: Any = None,
    dimension_numbers: Any = None,
    backend: str = "auto",
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  """Riemannian Aurora: a balanced-Stiefel ascent instead of the rebalancing passes.

  Square matrices: as :func:`aurora`. Non-square: starting from the polar factor,
  ``outer_steps`` Riemannian ascent steps on the manifold of matrices with orthonormal
  columns and uniform row norms (multipliers from ``cg_steps`` conjugate-gradient
  iterations), each retracted by ``retraction_steps`` row-normalise + polar passes.
  Where it is cheaper (GPT-sized stacks), the CG forms ``P∘P = (UUᵀ)∘(UUᵀ)`` of a stack
  of same-shape tall ``m x n`` matrices once per ascent step: a ``batch x m x m``
  float32 temporary of up to 1 GiB
  (:func:`ortho_optax.polar.explicit_cg_operator`). The reference has no finite check here; this port applies the same skip-and-count
  guard as :func:`aurora`.

  Args:
    learning_rate, weight_decay, momentum, nesterov, eps, compute_dtype: as
      :func:`aurora`.
    outer_steps: ascent steps, an int ``>= 0`` (0: the plain polar factor; ``None``: 3).
    cg_steps: maximum CG iterations, an int ``>= 0`` (``None``: 20).
    riemannian_eta: ascent step size ``>= 0``.
    retraction_steps: retraction passes, an int ``>= 0`` (``None``: 2). The step counts'
      ``None`` defaults are the reference's values (:data:`RIEMANNIAN_STEPS`).
    adam_*, adam_tx, label_fn, dimension_numbers, backend, mu_dtype: as :func:`aurora`.

  Returns:
    An ``optax.GradientTransformation`` (an ``optax.multi_transform``).

  References:
    "Aurora: A Leverage-Aware Spectral Optimizer", arXiv 2606.27715, 2026 (Tilde
    Research); tilde-research/aurora-release ``src/riemannian_aurora.py`` (commit 3d79a5c).
  """
  outer_steps = _common.default_if_none(outer_steps, RIEMANNIAN_STEPS["outer_steps"])
  cg_steps = _common.default_if_none(cg_steps, RIEMANNIAN_STEPS["cg_steps"])
  retraction_steps = _common.default_if_none(retraction_steps,
                                             RIEMANNIAN_STEPS["retraction_steps"])
  validation.check_static(outer_steps=outer_steps, cg_steps=cg_steps,
                          retraction_steps=retraction_steps)
  dims = _common.masked_dimension_numbers(dimension_numbers)
  orth = orth_stages.orthogonalize(
      "riemannian_aurora", outer_steps=outer_steps, cg_steps=cg_steps,
      riemannian_eta=riemannian_eta, retraction_steps=retraction_steps, eps=eps,
      compute_dtype=validation.check_dtype("compute_dtype", compute_dtype), backend=backend,
      dimension_numbers=dims)
  ortho_tx = _aurora_branch(orth, learning_rate, weight_decay, momentum, nesterov, dims,
                            mu_dtype)
  return _common.with_adamw_fallback(
      ortho_tx, adam_learning_rate=adam_learning_rate, adam_b1=adam_b1, adam_b2=adam_b2,
      adam_eps=adam_eps, adam_weight_decay=adam_weight_decay, label_fn=label_fn,
      dimension_numbers=dimension_numbers, adam_tx=adam_tx, name="riemannian_aurora")


def nonfinite_count(state) -> jnp.ndarray:
  """Total number of steps whose Aurora update was skipped as non-finite.

  Args:
    state: the state of :func:`aurora` / :func:`riemannian_aurora`, possibly nested in
      other optax states (an outer ``optax.apply_if_finite`` is not confused with the
      Aurora guard: the guard is looked up inside the ``"ortho"`` branch).

  Returns:
    The int32 ``total_notfinite`` of the Aurora branch's :class:`SkipNonFiniteState`.

  Raises:
    ValueError: when ``state`` holds no :class:`SkipNonFiniteState`.

  References:
    tilde-research/aurora-release (its non-finite step guard).
  """
  branches = [s.inner_states["ortho"] for s in _find_branch_states(state)]
  for subtree in branches or [state]:
    found = otu.tree_get_all_with_path(subtree, "total_notfinite")
    if found:
      return found[0][1]
  raise ValueError("no Aurora finite-guard state (SkipNonFiniteState) found in state.")


def _find_branch_states(tree):
  """``multi_transform`` states (anything with ``inner_states["ortho"]``), depth-first."""
  def is_branch(x):
    inner = getattr(x, "inner_states", None)
    return isinstance(inner, dict) and "ortho" in inner
  return _common.find_states(tree, is_branch)


__all__ = ["SkipNonFiniteState", "aurora", "nonfinite_count", "riemannian_aurora",
           "skip_nonfinite_updates"]
