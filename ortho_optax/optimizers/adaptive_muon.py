"""NVIDIA Emerging-Optimizers' AdaptiveMuon: AdaMuon, NorMuon, NAMO."""

# No `from __future__ import annotations`: optax (its inject_hyperparams and its test suite)
# reads the learning rate's annotation, optax.ScalarOrSchedule, from the signature.
import functools
from typing import Any, Optional

import optax

from ortho_optax.optimizers import _common
from ortho_optax.optimizers.muon import orthogonalized_chain, with_kahan
from ortho_optax.stages.second_moment import scale_by_second_moment


def adaptive_muon(
    learning_rate: optax.ScalarOrSchedule = 3e-4,
    momentum: float = 0.95,
    weight_decay: float = 0.01,
    moment2_method: str = "adamuon",
    beta2: float = 0.95,
    eps: float = 1e-8,
    nesterov: bool = False,
    weight_decay_method: str = "decoupled",
    ns_steps: Optional[int] = None,
    coefficients: Any = "quintic",
    preconditioning: str = "frobenius",
    ns_eps: float = 1e-7,
    compute_dtype: Any = "bfloat16",
    scale_mode: str = "spectral",
    extra_scale_factor: float = 1.0,
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
    orthogonalizer: str = "newton_schulz",
    restart_every: Optional[int] = 2,
) -> optax.GradientTransformation:
  r"""Muon followed by a second-moment normalisation (NVIDIA ``AdaptiveMuon``).

  For each matrix (defaults of NVIDIA's ``Muon``/``AdaptiveMuon``: lr 3e-4,
  momentum 0.95 without Nesterov, decoupled decay 0.01, 5 quintic steps in
  bfloat16, spectral scale ``sqrt(max(out, in))``, beta2 0.95, eps 1e-8)::

    [g <- g + wd p  if l2];  m <- mu m + (1 - mu) g;  U = m (or Nesterov blend)
    O = NS(U);  O~ = second_moment(O)   (adamuon | normuon | namo, no bias correction)
    p <- p - lr * scale(out, in) * extra_scale_factor * O~ - decay

  ``moment2_method`` (see :mod:`ortho_optax.stages.second_moment`):

  * ``"adamuon"``: elementwise ``v <- lerp(v, O^2, 1-beta2)``, ``O / (sqrt(v) + eps)``;
  * ``"normuon"``: per-row (``out >= in``) or per-column mean of ``O^2``, rescaled
    to ``||O||_F``;
  * ``"namo"``: ``v <- lerp(v, ||g||_F^2, 1-beta2)`` of the raw gradient,
    ``O * ||U||_F / (sqrt(v) + eps)``. Incompatible with ``"l2"`` decay (the
    reference raises too: the raw gradient would include the decay term).

  NVIDIA normalises with ``max(||X||_F, 1e-15)``; here ``X / (||X||_F + ns_eps)``
  (``ns_eps=1e-7``, shared with Muon), which differs by a relative ``ns_eps/||X||_F``.

  Args:
    learning_rate: lr of the orthogonalized branch (number or schedule).
    momentum: EMA coefficient in ``[0, 1)``.
    weight_decay: decay coefficient (>= 0).
    moment2_method: ``"adamuon"``, ``"normuon"`` or ``"namo"``.
    beta2: second-moment EMA coefficient in ``[0, 1)``.
    eps: second-moment epsilon.
    nesterov: Nesterov blend (off in the reference).
    weight_decay_method: ``"decoupled"``, ``"independent"``, ``"l2"`` or ``"palm"``.
    ns_steps, coefficients, preconditioning, compute_dtype, backend: Newton-Schulz,
      as in :func:`ortho_optax.optimizers.muon.muon`.
    ns_eps: Newton-Schulz normalisation epsilon.
    scale_mode, extra_scale_factor, mu_dtype: as in :func:`~ortho_optax.optimizers.muon.muon`.
    adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_weight_decay: AdamW branch.
    label_fn, dimension_numbers: routing and matrix views.
    kahan_sum: Kahan-compensated summation for bf16/fp16 parameters (see
      :func:`ortho_optax.optimizers.muon.muon`).
    orthogonalizer, restart_every: ``"newton_schulz"`` or ``"gram_newton_schulz"`` and the
      latter's restart period, as in :func:`ortho_optax.optimizers.muon.muon`.

  Returns:
    An ``optax.GradientTransformation``. The orthogonalized branch's state holds a
    :class:`ortho_optax.stages.second_moment.SecondMomentState` whose ``inner_state``
    is ``(EmaMomentumState, orthogonalize state)``.

  Raises:
    ValueError: for invalid hyperparameters, including ``namo`` with ``l2``.

  References:
    C. Si, D. Zhang, W. Shen, "AdaMuon: Adaptive Muon Optimizer", arXiv 2507.11005, 2025;
    Z. Li et al., "NorMuon: Making Muon more efficient and scalable", arXiv 2510.05491,
    2025; M. Zhang, Y. Liu, H. Schaeffer, "Adam Improves Muon: Adaptive Moment Estimation
    with Orthogonalized Momentum" (NAMO), arXiv 2602.17080, 2026;
    NVIDIA-NeMo/Emerging-Optimizers ``adaptive_muon.py``.
  """
  if moment2_method == "namo" and weight_decay_method == "l2":
    raise ValueError(
        "moment2_method='namo' cannot be combined with weight_decay_method='l2' (NAMO tracks "
        "the raw gradient's norm); use 'decoupled', 'independent' or 'palm'.")
  dims = _common.masked_dimension_numbers(dimension_numbers)

  def second_moment(momentum_tx, orth_tx):
    return scale_by_second_moment(moment2_method, beta2, eps, dims,
                                  momentum=momentum_tx, orthogonalizer=orth_tx)

  ortho_tx = orthogonalized_chain(
      learning_rate=learning_rate, momentum=momentum, nesterov=nesterov,
      weight_decay=weight_decay, weight_decay_method=weight_decay_method, ns_steps=ns_steps,
      coefficients=coefficients, preconditioning=preconditioning, eps=ns_eps,
      compute_dtype=compute_dtype, scale_mode=scale_mode,
      extra_scale_factor=extra_scale_factor, mu_dtype=mu_dtype, dimension_numbers=dims,
      backend=backend, second_moment=second_moment, orthogonalizer=orthogonalizer,
      restart_every=restart_every)
  return with_kahan(_common.with_adamw_fallback(
      ortho_tx, adam_learning_rate=adam_learning_rate, adam_b1=adam_b1, adam_b2=adam_b2,
      adam_eps=adam_eps, adam_weight_decay=adam_weight_decay, label_fn=label_fn,
      dimension_numbers=dimension_numbers, name=f"adaptive_muon({moment2_method!r})"),
      kahan_sum)


_PRESET_DOC = """{summary}

``adaptive_muon(moment2_method={method!r}, ...)`` (a ``functools.partial``): every other
argument and default (NVIDIA's) as :func:`adaptive_muon`.{extra}

Args:
  **kwargs: the arguments of :func:`adaptive_muon` except ``moment2_method``.

Returns:
  An ``optax.GradientTransformation`` whose orthogonalized branch's state holds a
  :class:`ortho_optax.stages.second_moment.SecondMomentState`.

References:
  {references}
  NVIDIA-NeMo/Emerging-Optimizers ``adaptive_muon.py``.
"""


def _preset(method: str, summary: str, references: str, extra: str = ""):
  preset = functools.partial(adaptive_muon, moment2_method=method)
  preset.__doc__ = _PRESET_DOC.format(summary=summary, method=method, extra=extra,
                                      references=references)
  preset.__module__ = __name__
  return preset


adamuon = _preset(
    "adamuon", "AdaMuon: Muon with an elementwise second moment of the orthogonalized update.",
    'C. Si, D. Zhang, W. Shen, "AdaMuon: Adaptive Muon Optimizer", arXiv 2507.11005, 2025;')
normuon = _preset(
    "normuon", "NorMuon: Muon with per-row (per-column for wide matrices) second-moment "
    "normalisation, rescaled to the update's Frobenius norm.",
    'Z. Li et al., "NorMuon: Making Muon more efficient and scalable", arXiv 2510.05491, '
    "2025;")
namo = _preset(
    "namo", "NAMO: Muon scaled by ||U||_F / sqrt(EMA of ||g||_F^2) (norm-adaptive step size).",
    'M. Zhang, Y. Liu, H. Schaeffer, "Adam Improves Muon: Adaptive Moment Estimation with '
    'Orthogonalized Momentum", arXiv 2602.17080, 2026;',
    extra=" ``weight_decay_method=\"l2\"`` is rejected (NAMO tracks the raw gradient's "
    "norm).")
