"""NVIDIA Emerging-Optimizers' AdaptiveMuon (SPEC 5.5): AdaMuon, NorMuon, NAMO."""

from __future__ import annotations

import inspect
from typing import Any, Optional

import jax.numpy as jnp
import optax

from ortho_optax.optimizers import _common
from ortho_optax.optimizers.muon import orthogonalized_chain, validate_common, with_kahan
from ortho_optax.stages.second_moment import SECOND_MOMENT_METHODS, scale_by_second_moment


def adaptive_muon(
    learning_rate: optax.ScalarOrSchedule = 3e-4,
    momentum: float = 0.95,
    weight_decay: float = 0.01,
    moment2_method: str = "adamuon",
    beta2: float = 0.95,
    eps: float = 1e-8,
    nesterov: bool = False,
    weight_decay_method: str = "decoupled",
    ns_steps: int = 5,
    coefficients: Any = "quintic",
    preconditioning: str = "frobenius",
    ns_eps: float = 1e-7,
    compute_dtype: Any = jnp.bfloat16,
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
  _common.check_choice("moment2_method", moment2_method, SECOND_MOMENT_METHODS)
  if moment2_method == "namo" and weight_decay_method == "l2":
    raise ValueError(
        "moment2_method='namo' cannot be combined with weight_decay_method='l2' (NAMO tracks "
        "the raw gradient's norm); use 'decoupled', 'independent' or 'palm'.")
  _common.check_in_range("beta2", beta2, 0.0, 1.0, high_inclusive=False)
  _common.check_non_negative("eps", eps)
  validate_common(
      learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay,
      weight_decay_method=weight_decay_method, ns_steps=ns_steps, coefficients=coefficients,
      preconditioning=preconditioning, scale_mode=scale_mode,
      extra_scale_factor=extra_scale_factor, eps=ns_eps, backend=backend)
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
      backend=backend, second_moment=second_moment)
  return with_kahan(_common.with_adamw_fallback(
      ortho_tx, adam_learning_rate=adam_learning_rate, adam_b1=adam_b1, adam_b2=adam_b2,
      adam_eps=adam_eps, adam_weight_decay=adam_weight_decay, label_fn=label_fn), kahan_sum)


def _fixed_method(method: str, summary: str):
  """``adaptive_muon`` with ``moment2_method`` fixed, keeping a real signature.

  The signature (``__signature__``) is ``adaptive_muon``'s minus ``moment2_method``,
  so ``optax.inject_hyperparams`` and ``inspect`` see the true arguments.
  """
  sig = inspect.signature(adaptive_muon)
  new_sig = sig.replace(parameters=[
      p for p in sig.parameters.values() if p.name != "moment2_method"])

  def factory(*args, **kwargs) -> optax.GradientTransformation:
    bound = new_sig.bind(*args, **kwargs)
    return adaptive_muon(moment2_method=method, **bound.arguments)

  factory.__signature__ = new_sig
  factory.__name__ = factory.__qualname__ = method
  factory.__doc__ = (
      f"{summary}\n\n  ``adaptive_muon(moment2_method={method!r}, ...)``: same arguments and "
      "defaults (NVIDIA's) as :func:`adaptive_muon`, without ``moment2_method``.\n")
  return factory


adamuon = _fixed_method(
    "adamuon", "AdaMuon: Muon with an elementwise second moment of the orthogonalized update.")
normuon = _fixed_method(
    "normuon", "NorMuon: Muon with per-row (per-column for wide matrices) second-moment "
    "normalisation, rescaled to the update's Frobenius norm.")
namo = _fixed_method(
    "namo", "NAMO: Muon scaled by ||U||_F / sqrt(EMA of ||g||_F^2) (norm-adaptive step size).")

_PRESET_ARGS = """
  Args:
    learning_rate: lr of the orthogonalized branch, a number or schedule (default 3e-4).
    momentum: EMA coefficient in ``[0, 1)`` (default 0.95).
    weight_decay: decay coefficient >= 0 (default 0.01).
    beta2: second-moment EMA coefficient in ``[0, 1)`` (default 0.95).
    eps: second-moment epsilon (default 1e-8).
    nesterov: Nesterov blend (default ``False``, as in the reference).
    weight_decay_method: ``"decoupled"`` (default), ``"independent"``, ``"l2"`` or
      ``"palm"``.{l2_note}
    ns_steps, coefficients, preconditioning, compute_dtype, backend: Newton-Schulz
      (defaults 5, ``"quintic"``, ``"frobenius"``, ``jnp.bfloat16``, ``"auto"``), as in
      :func:`ortho_optax.optimizers.muon.muon`.
    ns_eps: Newton-Schulz normalisation epsilon (default 1e-7).
    scale_mode, extra_scale_factor, mu_dtype: as in :func:`~ortho_optax.optimizers.muon.muon`
      (defaults ``"spectral"``, 1.0, ``None``).
    adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_weight_decay: AdamW branch for
      non-matrix leaves (defaults 3e-4, 0.9, 0.95, 1e-10, 0.0).
    label_fn, dimension_numbers: routing and matrix views (``None``: the defaults).
    kahan_sum: Kahan-compensated summation for bf16/fp16 parameters (default ``False``).

  Returns:
    An ``optax.GradientTransformation``, the same as
    ``adaptive_muon(moment2_method={method!r}, ...)``: the orthogonalized branch's state
    holds a :class:`ortho_optax.stages.second_moment.SecondMomentState`.

  Raises:
    ValueError: for invalid hyperparameters{raises_note}.

  References:
    {references}
    NVIDIA-NeMo/Emerging-Optimizers ``adaptive_muon.py``; K. Jordan et al., "Muon",
    2024, https://kellerjordan.github.io/posts/muon/.
"""


def _preset_doc(tx, references, l2_note="", raises_note=""):
  tx.__doc__ += _PRESET_ARGS.format(method=tx.__name__, references=references,
                                    l2_note=l2_note, raises_note=raises_note)


_preset_doc(adamuon, """C. Si, D. Zhang, W. Shen, "AdaMuon: Adaptive Muon Optimizer",
    arXiv 2507.11005, 2025;""")
_preset_doc(normuon, """Z. Li et al., "NorMuon: Making Muon more efficient and scalable",
    arXiv 2510.05491, 2025;""")
_preset_doc(namo, """M. Zhang, Y. Liu, H. Schaeffer, "Adam Improves Muon: Adaptive Moment
    Estimation with Orthogonalized Momentum", arXiv 2602.17080, 2026;""",
            l2_note=" ``\"l2\"`` is rejected (NAMO tracks the raw gradient's norm).",
            raises_note=", including ``weight_decay_method=\"l2\"``")
