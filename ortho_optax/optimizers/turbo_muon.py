"""Turbo-Muon (thib-s/flash-newton-schulz, SPEC 2.2-2.3): Muon with AOL preconditioning."""

from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp
import optax

from ortho_optax.optimizers import _common
from ortho_optax.optimizers.muon import muon

TURBO_VARIANTS = ("turbo", "standard")


def turbo_muon(
    learning_rate: optax.ScalarOrSchedule = 0.02,
    momentum: float = 0.95,
    weight_decay: float = 0.0,
    variant: str = "turbo",
    ns_steps: Optional[int] = None,
    nesterov: bool = True,
    eps: float = 1e-6,
    compute_dtype: Any = jnp.bfloat16,
    scale_mode: str = "shape_scaling",
    extra_scale_factor: float = 1.0,
    weight_decay_method: str = "decoupled",
    mu_dtype: Optional[Any] = None,
    adam_learning_rate: optax.ScalarOrSchedule = 3e-4,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-10,
    adam_weight_decay: float = 0.0,
    label_fn: Any = None,
    dimension_numbers: Any = None,
    backend: str = "auto",
    kahan_sum: bool = False,
) -> optax.GradientTransformation:
  r"""Turbo-Muon: AOL-preconditioned Newton-Schulz saves one iteration.

  ``variant="turbo"`` (default): Turbo's AOL row scaling
  ``X <- diag(s) X`` with ``s_r = 1/sqrt(max(sum_j |(X X^T)_rj|, eps))`` fused
  into the first step, then the last 4 triples of the Dion quintic table
  (``coefficients="turbo_aol"``). ``variant="standard"``: ``X / (||X||_F + eps)``
  and all 5 Dion triples. Both in bfloat16 with ``eps = 1e-6`` (what the
  reference optimizer passes), Nesterov EMA momentum, update scaled by
  ``sqrt(max(1, out/in))``, then ``p <- p (1 - lr wd) - lr O``
  (``SingleDeviceTurboMuon``; defaults lr 0.02, momentum 0.95, wd 0).

  The ``adam_*`` branch reproduces ``SingleDeviceTurboMuonWithAuxAdam``'s Adam
  groups (bias-corrected, ``eps`` outside the square root,
  ``p <- p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)``, i.e. ``optax.adamw``),
  with its defaults lr 3e-4, betas (0.9, 0.95), eps 1e-10, wd 0.

  Differences from the reference, on purpose: a conv kernel ``(out, in, kh, kw)``
  (``MatrixDims((1, 2, 3), (0,))``) is scaled by the factor of the
  ``(out, in*kh*kw)`` matrix it was orthogonalized as, not ``sqrt(max(1, kh/kw))``
  (SPEC 2.2 step 5; see :func:`ortho_optax.stages.scale.scale_by_shape`), and a
  missing gradient is not replaced by zeros (JAX gradients always exist).

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
    scale_mode, extra_scale_factor, weight_decay_method, mu_dtype: as in
      :func:`ortho_optax.optimizers.muon.muon`.
    adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_weight_decay: AdamW branch.
    label_fn, dimension_numbers, backend, kahan_sum: as in
      :func:`ortho_optax.optimizers.muon.muon`.

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Boissin et al., "Turbo-Muon: Accelerating Orthogonality-Based Optimization with
    Pre-Conditioning", arXiv 2512.04632, 2025.
  """
  _common.check_choice("variant", variant, TURBO_VARIANTS)
  if ns_steps is None:
    ns_steps = 4 if variant == "turbo" else 5
  if variant == "turbo":
    coefficients, preconditioning = "turbo_aol", "aol"
  else:
    coefficients, preconditioning = "quintic", "frobenius"
  # Turbo-Muon is Muon with its own preconditioning, table and defaults.
  return muon(
      learning_rate=learning_rate, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
      coefficients=coefficients, preconditioning=preconditioning, scale_mode=scale_mode,
      extra_scale_factor=extra_scale_factor, weight_decay=weight_decay,
      weight_decay_method=weight_decay_method, compute_dtype=compute_dtype, eps=eps,
      mu_dtype=mu_dtype, adam_learning_rate=adam_learning_rate, adam_b1=adam_b1,
      adam_b2=adam_b2, adam_eps=adam_eps, adam_weight_decay=adam_weight_decay,
      label_fn=label_fn, dimension_numbers=dimension_numbers, backend=backend,
      kahan_sum=kahan_sum)
