"""Turbo-Muon (thib-s/flash-newton-schulz): Muon with AOL preconditioning."""

# No `from __future__ import annotations`: optax (its inject_hyperparams and its test suite)
# reads the learning rate's annotation, optax.ScalarOrSchedule, from the signature.
from typing import Any, Optional

import optax

from ortho_optax import validation
from ortho_optax.optimizers import _common
from ortho_optax.optimizers.muon import muon

#: ``variant -> (coefficients, preconditioning, default ns_steps)``.
TURBO_VARIANTS = {
    "turbo": ("turbo_aol", "aol", 4),
    "standard": ("quintic", "frobenius", 5),
}


@_common.preset_signature(muon, exclude=("coefficients", "preconditioning"))
def turbo_muon(
    learning_rate: optax.ScalarOrSchedule = 0.02,
    momentum: float = 0.95,
    weight_decay: float = 0.0,
    variant: str = "turbo",
    ns_steps: Optional[int] = None,
    nesterov: bool = True,
    eps: float = 1e-6,
    compute_dtype: Any = "bfloat16",
    **muon_kwargs,
) -> optax.GradientTransformation:
  r"""Turbo-Muon: AOL-preconditioned Newton-Schulz saves one iteration.

  :func:`ortho_optax.optimizers.muon.muon` with Turbo-Muon's preconditioning, table and
  defaults. ``variant="turbo"`` (default): Turbo's AOL row scaling
  ``X <- diag(s) X`` with ``s_r = 1/sqrt(max(sum_j |(X X^T)_rj|, eps))`` fused
  into the first step, then the last 4 triples of the Dion quintic table
  (``coefficients="turbo_aol"``). ``variant="standard"``: ``X / (||X||_F + eps)``
  and all 5 Dion triples. Both in bfloat16 with ``eps = 1e-6`` (what the
  reference optimizer passes), Nesterov EMA momentum, update scaled by
  ``sqrt(max(1, out/in))``, then ``p <- p (1 - lr wd) - lr O``
  (``SingleDeviceTurboMuon``; defaults lr 0.02, momentum 0.95, wd 0).

  The ``adam_*`` branch (muon's defaults) reproduces
  ``SingleDeviceTurboMuonWithAuxAdam``'s Adam groups (bias-corrected, ``eps`` outside
  the square root, ``p <- p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)``, i.e.
  ``optax.adamw``), with its defaults lr 3e-4, betas (0.9, 0.95), eps 1e-10, wd 0.

  Differences from the reference, on purpose: a conv kernel ``(out, in, kh, kw)``
  (``MatrixDims((1, 2, 3), (0,))``) is scaled by the factor of the
  ``(out, in*kh*kw)`` matrix it was orthogonalized as, not ``sqrt(max(1, kh/kw))``
  (see :func:`ortho_optax.stages.scale.scale_by_shape`), and a missing gradient is not
  replaced by zeros (JAX gradients always exist).

  Args:
    learning_rate: lr of the orthogonalized branch (number or schedule).
    momentum: EMA coefficient in ``[0, 1)``.
    weight_decay: decoupled decay (>= 0).
    variant: ``"turbo"`` or ``"standard"``.
    ns_steps: Newton-Schulz steps; ``None``: 4 (turbo) / 5 (standard). With
      ``"turbo"`` at most 5 (the quintic table has 5 triples).
    nesterov: Nesterov blend (always on in the reference).
    eps: AOL clamp / Frobenius epsilon.
    compute_dtype: Newton-Schulz dtype (``None``: the update's).
    **muon_kwargs: every other argument of :func:`ortho_optax.optimizers.muon.muon`
      (``scale_mode``, ``adam_*``, ``label_fn``, ``dimension_numbers``, ``backend``,
      ``kahan_sum``, ``orthogonalizer``, ``restart_every``, ...; not ``coefficients`` /
      ``preconditioning``, set by ``variant``), with muon's defaults.

  Returns:
    An ``optax.GradientTransformation``.

  Raises:
    ValueError: for an unknown ``variant``, ``coefficients`` or ``preconditioning`` among
      ``muon_kwargs``, and whatever :func:`muon` rejects.

  References:
    Boissin et al., "Turbo-Muon: Accelerating Orthogonality-Based Optimization with
    Pre-Conditioning", arXiv 2512.04632, 2025; thib-s/flash-newton-schulz.
  """
  validation.check_choice("variant", variant, tuple(TURBO_VARIANTS))
  fixed = sorted({"coefficients", "preconditioning"} & set(muon_kwargs))
  if fixed:
    raise ValueError(f"turbo_muon sets {' and '.join(fixed)} by its variant "
                     f"({', '.join(map(repr, TURBO_VARIANTS))}); for another table or "
                     "preconditioning use ortho_optax.muon.")
  coefficients, preconditioning, default_steps = TURBO_VARIANTS[variant]
  return muon(learning_rate, momentum, nesterov,
              default_steps if ns_steps is None else ns_steps, coefficients,
              preconditioning, weight_decay=weight_decay, eps=eps,
              compute_dtype=compute_dtype, **muon_kwargs)
