"""AuON and HybridAuON (ryyzn9/AuON).

AuON, per hidden matrix (any rank: it is element-wise plus one whole-tensor norm)::

  p <- p (1 - lr wd)                           decay first, on the pre-update p
  m <- lerp(m, g, 1 - mu);  G = lerp(g, m, mu) EMA momentum + Nesterov blend
  [G <- NS5(G)]                                HybridAuON only, ndim >= 2
  r = sqrt(mean(cosh(gamma G / (||G||_F + 1e-7))^2))
  p <- p - lr G / (r + 1e-8)                   skipped when ||G||_F == 0

Since ``G / (r + 1e-8)`` does not depend on ``p``, the decay and the step are returned as
one optax update ``-(lr G / (r + 1e-8) + lr wd p)``. A zero ``G`` gives a zero step
(``r = 1``), which is the reference's skip. ``r`` is within ~2% of 1 for
realistic tensors: AuON *as implemented* is SGD with EMA-Nesterov momentum, decoupled
decay and a small cosh brake; the port computes ``r`` exactly.

Every other parameter (biases, norms, embeddings, head) goes to AdamW (``adam_*``), or to
``adam_tx``: :func:`auon_adam` is the AuON repository's own Adam (epsilon added to the
*uncorrected* ``sqrt(v)``).
"""

# No `from __future__ import annotations`: optax (its inject_hyperparams and its test suite)
# reads the learning rate's annotation, optax.ScalarOrSchedule, from the signature.
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax
from optax import tree_utils as otu

from ortho_optax import orthogonalizers, validation
from ortho_optax.optimizers import _common
from ortho_optax.stages import decay as decay_stages
from ortho_optax.stages import momentum as momentum_stages
from ortho_optax.stages import orthogonalize as orth_stages


def _ndim_at_least_2(tree):
  return jax.tree.map(lambda x: getattr(x, "ndim", 0) >= 2, tree)


def auon(
    learning_rate: optax.ScalarOrSchedule = 0.24,
    momentum: float = 0.95,
    weight_decay: float = 0.0,
    gamma: float = 1.5,
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
  """AuON: EMA-Nesterov momentum with a cosh-norm brake (no orthogonalization).

  Args:
    learning_rate: ``lr >= 0`` of the AuON branch, a number or a schedule.
    momentum: EMA coefficient ``mu`` in ``[0, 1)`` (the reference allows 1, which
      freezes the buffer; it is rejected here).
    weight_decay: decoupled decay ``wd >= 0`` (``p <- p (1 - lr wd)``).
    gamma: the cosh temperature ``>= 0``.
    adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_weight_decay: the AdamW
      branch (non-matrix leaves).
    adam_tx: replaces the AdamW branch (e.g. :func:`auon_adam`, the reference's Adam).
    label_fn: routing (:func:`ortho_optax.routing.default_label_fn` when ``None``).
    dimension_numbers: only for the default routing (a leaf of rank >= 3 with a
      ``MatrixDims`` is a matrix); AuON itself needs no matrix view (its norm is over the
      whole tensor).
    backend: accepted for API uniformity and checked (one of ``"auto"``, ``"xla"``,
      ``"pallas"``); unused, as there is no Newton-Schulz here.
    mu_dtype: dtype of the momentum buffer (``None``: the parameter dtype).

  Returns:
    An ``optax.GradientTransformation`` (an ``optax.multi_transform``).

  References:
    D. Maity, "AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates",
    arXiv 2509.24320, 2025; ryyzn9/AuON ``auon/optimizer.py::AuON``
    (commit bba2e82).
  """
  # Checked like every optimizer's backend (a wrong value is never ignored), then unused.
  validation.check_choice("backend", backend, orthogonalizers.BACKENDS)
  ortho_tx = optax.chain(
      momentum_stages.ema_momentum(momentum, nesterov=True, mu_dtype=mu_dtype),
      orth_stages.scale_by_cosh_norm(gamma),
      decay_stages.scale_by_learning_rate_and_decay(learning_rate, weight_decay, "decoupled"),
  )
  return _common.with_adamw_fallback(
      ortho_tx, adam_learning_rate=adam_learning_rate, adam_b1=adam_b1, adam_b2=adam_b2,
      adam_eps=adam_eps, adam_weight_decay=adam_weight_decay, label_fn=label_fn,
      dimension_numbers=dimension_numbers, adam_tx=adam_tx, name="auon")


def hybrid_auon(
    learning_rate: optax.ScalarOrSchedule = 0.24,
    momentum: float = 0.95,
    weight_decay: float = 0.0,
    gamma: float = 1.5,
    ns_steps: Optional[int] = None,
    *,
    compute_dtype: Optional[Any] = "float32",
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
    orthogonalizer: str = "newton_schulz",
    restart_every: Optional[int] = 2,
) -> optax.GradientTransformation:
  """HybridAuON: AuON with a Newton-Schulz orthogonalization before the cosh brake.

  The Nesterov blend of every leaf of rank >= 2 is orthogonalized by ``ns_steps``
  Keller-simple quintic Newton-Schulz iterations (``(3.4445, -4.7750, 2.0315)``,
  ``X / (||X||_F + 1e-7)`` per matrix of the view, transposed when out > in) and then
  cosh-braked with its whole-tensor norm. Leaves of rank < 2 routed here (with a custom
  ``label_fn``) skip the Newton-Schulz step, as in the reference. No shape-dependent
  learning-rate factor.

  Args:
    learning_rate, momentum, weight_decay, gamma: as :func:`auon`.
    ns_steps: Newton-Schulz iterations, an int >= 1 (``None``: 5).
    compute_dtype: dtype of the Newton-Schulz iteration. The reference runs in the
      parameter dtype (float32), so the default is ``jnp.float32``; ``jnp.bfloat16`` is
      the faster Muon-style choice; ``None`` uses the update dtype.
    adam_*, adam_tx, label_fn, mu_dtype: as :func:`auon`.
    dimension_numbers: per-leaf :class:`ortho_optax.MatrixDims` (``None``: Flax
      ``(in, out)`` for 2-D leaves); a pytree given for the full parameter tree works.
    backend: Newton-Schulz backend, ``"auto"``, ``"xla"`` or ``"pallas"``.
    orthogonalizer, restart_every: ``"newton_schulz"`` or ``"gram_newton_schulz"`` and the
      latter's restart period, as in :func:`ortho_optax.optimizers.muon.muon`.

  Returns:
    An ``optax.GradientTransformation`` (an ``optax.multi_transform``).

  References:
    D. Maity, "AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates",
    arXiv 2509.24320, 2025; ryyzn9/AuON
    ``auon/optimizer.py::HybridAuON`` (commit bba2e82); K. Jordan et al., "Muon", 2024,
    https://kellerjordan.github.io/posts/muon/.
  """
  ns_steps = _common.checked_ns_steps(ns_steps)
  orth = _common.newton_schulz_stage(
      orthogonalizer, restart_every=restart_every, steps=ns_steps, coefficients="muon",
      preconditioning="frobenius", eps=1e-7,
      compute_dtype=validation.check_dtype("compute_dtype", compute_dtype), backend=backend,
      dimension_numbers=_common.masked_dimension_numbers(dimension_numbers))
  ortho_tx = optax.chain(
      momentum_stages.ema_momentum(momentum, nesterov=True, mu_dtype=mu_dtype),
      optax.masked(orth, _ndim_at_least_2),
      orth_stages.scale_by_cosh_norm(gamma),
      decay_stages.scale_by_learning_rate_and_decay(learning_rate, weight_decay, "decoupled"),
  )
  return _common.with_adamw_fallback(
      ortho_tx, adam_learning_rate=adam_learning_rate, adam_b1=adam_b1, adam_b2=adam_b2,
      adam_eps=adam_eps, adam_weight_decay=adam_weight_decay, label_fn=label_fn,
      dimension_numbers=dimension_numbers, adam_tx=adam_tx, name="hybrid_auon")


class AuonAdamState(NamedTuple):
  """State of :func:`auon_adam` (``step``, ``exp_avg``, ``exp_avg_sq``)."""
  count: chex.Array
  mu: optax.Updates
  nu: optax.Updates


def auon_adam(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> optax.GradientTransformation:
  """The AuON repository's Adam: epsilon on the *uncorrected* ``sqrt(v)``.

  ::

    p <- p (1 - lr wd)
    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    p <- p - lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)

  This is Kingma & Ba's "epsilon-hat" placement: ``optax.adamw`` with
  ``eps = eps_hat / sqrt(1 - b2^t)``, a step-dependent epsilon, which optax's ``adamw``
  cannot express. The difference from ``optax.adamw`` matters only while
  ``sqrt(v)`` is comparable to ``eps``. Use it as ``auon(..., adam_tx=auon_adam(...))``.

  Args:
    learning_rate: a number or a schedule.
    b1, b2: moment coefficients in ``[0, 1)``.
    eps: ``>= 0``, added to the uncorrected ``sqrt(v)``.
    weight_decay: decoupled decay ``>= 0``, applied before the step.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`AuonAdamState`.

  References:
    ryyzn9/AuON ``auon/adam.py::Adam``; Kingma & Ba, "Adam", 2015 (Algorithm 1 note).
  """
  validation.check_learning_rate(learning_rate)
  validation.check_range("b1", b1, 0.0, 1.0, high_open=True)
  validation.check_range("b2", b2, 0.0, 1.0, high_open=True)
  validation.check_non_negative("eps", eps)
  validation.check_non_negative("weight_decay", weight_decay)

  def init_fn(params):
    return AuonAdamState(count=jnp.zeros([], jnp.int32), mu=otu.tree_zeros_like(params),
                         nu=otu.tree_zeros_like(params))

  def update_fn(updates, state, params=None):
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    count = optax.safe_int32_increment(state.count)
    t = count.astype(jnp.float32)
    step_size = lr * jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    mu = otu.tree_update_moment(updates, state.mu, b1, 1)
    nu = otu.tree_update_moment_per_elem_norm(updates, state.nu, b2, 2)
    out = jax.tree.map(lambda m, v: -step_size * m / (jnp.sqrt(v) + eps), mu, nu)
    if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
      if params is None:
        raise ValueError(validation.NO_PARAMS)
      out = jax.tree.map(lambda u, p: u - lr * weight_decay * p, out, params)
    out = jax.tree.map(lambda u, g: u.astype(g.dtype), out, updates)
    return out, AuonAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


__all__ = ["AuonAdamState", "auon", "auon_adam", "hybrid_auon"]
