"""Muon (Keller Jordan; the AuON repository's baseline) and its chain builder.

Every orthogonalized optimizer of this module family is one chain::

  [l2 decay] -> ema_momentum -> orthogonalize -> [second moment] -> scale_by_shape
             -> learning rate + decay

applied to the hidden matrices, with every other parameter sent to AdamW by
:func:`ortho_optax.optimizers._common.with_adamw_fallback`.

``optax.inject_hyperparams`` can drive the floating-point hyperparameters
(``learning_rate``, ``momentum``, ``weight_decay``, ...) of the whole optimizer. Step
counts default to ``None`` (and names and dtypes are strings), so a plain
``optax.inject_hyperparams(muon)(learning_rate=0.02)`` keeps them static; a structural
argument given explicitly (``ns_steps=6``, ``compute_dtype=jnp.float32``) must be named
static, and so must ``restart_every`` with ``orthogonalizer="gram_newton_schulz"`` (its
default, 2, is an int: ``None`` means "never restart")::

  opt = optax.inject_hyperparams(muon, static_args=inject_static_args(muon))(
      learning_rate=0.02, ns_steps=6)
  state.hyperparams["learning_rate"] = 0.01  # later, e.g. from a controller
"""

# No `from __future__ import annotations`: optax (its inject_hyperparams and its test suite)
# reads the learning rate's annotation, optax.ScalarOrSchedule, from the signature.
import inspect
from typing import Any, Callable, Optional

import optax

from ortho_optax import validation
from ortho_optax.optimizers import _common
from ortho_optax.stages.decay import weight_decay_stages
from ortho_optax.stages.kahan import kahan_summation
from ortho_optax.stages.momentum import ema_momentum
from ortho_optax.stages.scale import scale_by_shape


def inject_static_args(factory: Callable[..., Any]) -> tuple[str, ...]:
  """Names of ``factory``'s arguments that ``optax.inject_hyperparams`` must keep static.

  ``inject_hyperparams`` turns every numeric argument into an array and treats every
  callable as a schedule. Step counts (``ns_steps``), dtypes (``compute_dtype`` is a
  callable class), ``label_fn`` and ``dimension_numbers`` must not be, so every
  argument whose default is not a ``float`` is returned.

  Args:
    factory: an optimizer factory such as :func:`muon` (anything ``inspect.signature``
      accepts).

  Returns:
    A tuple of argument names, for ``optax.inject_hyperparams(factory,
    static_args=...)``.

  References:
    ``optax.inject_hyperparams`` (its ``static_args``).
  """
  sig = inspect.signature(factory)
  return tuple(name for name, p in sig.parameters.items()
               if not (isinstance(p.default, float) and not isinstance(p.default, bool)))


def with_kahan(tx: optax.GradientTransformation, kahan_sum: bool) -> optax.GradientTransformation:
  """Appends :func:`ortho_optax.stages.kahan.kahan_summation` to the whole optimizer.

  The compensated sum covers both branches; it keeps buffers for bf16/fp16 leaves only.
  """
  validation.check_bool("kahan_sum", kahan_sum)
  return optax.chain(tx, kahan_summation()) if kahan_sum else tx


def orthogonalized_chain(
    *,
    learning_rate,
    momentum,
    nesterov: bool,
    weight_decay,
    weight_decay_method: str,
    ns_steps: Optional[int],
    coefficients,
    preconditioning: str,
    eps,
    compute_dtype,
    scale_mode: str,
    extra_scale_factor,
    mu_dtype,
    dimension_numbers,
    backend: str,
    bias_correction: bool = False,
    second_moment: Optional[Callable[..., optax.GradientTransformation]] = None,
    orthogonalizer: str = "newton_schulz",
    restart_every: Optional[int] = 2,
) -> optax.GradientTransformation:
  """The orthogonalized branch (no routing), see the module docstring.

  ``orthogonalizer`` names the Newton–Schulz method (:func:`_common.newton_schulz_stage`).
  ``second_moment(momentum_tx, orthogonalize_tx)`` may wrap the momentum and
  orthogonalization stages (NAMO needs both; see
  :func:`ortho_optax.stages.second_moment.scale_by_second_moment`).
  ``dimension_numbers`` must already be usable on a masked sub-tree. Every argument is
  checked by the stage that owns it; ``compute_dtype`` is resolved here
  (:func:`ortho_optax.validation.check_dtype`, so names such as ``"bf16"`` work).
  """
  ns_steps = _common.checked_ns_steps(ns_steps)

  first, last = weight_decay_stages(learning_rate, weight_decay, weight_decay_method)
  momentum_tx = ema_momentum(momentum, nesterov=nesterov, bias_correction=bias_correction,
                             mu_dtype=mu_dtype)
  orth_tx = _common.newton_schulz_stage(
      orthogonalizer, restart_every=restart_every, steps=ns_steps, coefficients=coefficients,
      preconditioning=preconditioning, eps=eps,
      compute_dtype=validation.check_dtype("compute_dtype", compute_dtype), backend=backend,
      dimension_numbers=dimension_numbers)
  if second_moment is None:
    middle = (momentum_tx, orth_tx)
  else:
    middle = (second_moment(momentum_tx, orth_tx),)
  return optax.chain(
      first, *middle,
      scale_by_shape(scale_mode, extra_scale_factor, dimension_numbers),
      last)


def muon(
    learning_rate: optax.ScalarOrSchedule = 0.02,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: Optional[int] = None,
    coefficients: Any = "muon",
    preconditioning: str = "frobenius",
    scale_mode: str = "shape_scaling",
    extra_scale_factor: float = 1.0,
    weight_decay: float = 0.01,
    weight_decay_method: str = "decoupled",
    compute_dtype: Any = "bfloat16",
    eps: float = 1e-7,
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
    bias_correction: bool = False,
    adam_nesterov: bool = False,
    orthogonalizer: str = "newton_schulz",
    restart_every: Optional[int] = 2,
) -> optax.GradientTransformation:
  r"""Muon: Nesterov EMA momentum, Newton-Schulz orthogonalization, shape scaling.

  Defaults are Keller Jordan's Muon as in the AuON repository's baseline
  (``auon/muon.py``): lr 0.02, momentum 0.95 with the Nesterov blend, 5 Newton-Schulz
  steps with the ``(3.4445, -4.7750, 2.0315)`` triple on ``X / (||X||_F + 1e-7)``
  in bfloat16, update scaled by ``sqrt(max(1, out/in))``, decoupled weight
  decay 0.01 (``p <- p (1 - lr wd) - lr sqrt(max(1, out/in)) O``). For each
  matrix, with ``mu = momentum``::

    m <- mu m + (1 - mu) g;   U = (1 - mu) g + mu m  (or m)
    O = NS(U);   p <- p - lr * (scale(out, in) * extra_scale_factor * O) - decay

  Weight matrices (per ``label_fn``, default
  :func:`ortho_optax.routing.default_label_fn`: every real 2-D leaf except embeddings,
  output heads and norms) take this path; everything else goes to AdamW with the
  ``adam_*`` hyperparameters (defaults of Turbo-Muon's auxiliary Adam / modded-nanogpt:
  lr 3e-4, betas (0.9, 0.95), eps 1e-10, no decay).

  ``bias_correction=True, adam_nesterov=True`` (with optax's other defaults) make this
  ``optax.contrib.muon``; the README's "Coming from optax.contrib.muon" gives the whole
  mapping.

  Args:
    learning_rate: lr of the orthogonalized branch; a number or an ``optax.Schedule``.
    momentum: EMA coefficient in ``[0, 1)``.
    nesterov: feed ``(1 - mu) g + mu m`` (True) or ``m`` to Newton-Schulz.
    ns_steps: Newton-Schulz steps, an int >= 1 (``None``: 5). Step counts default to
      ``None`` so that a plain ``optax.inject_hyperparams(muon)`` keeps them static.
    coefficients: preset name of :data:`ortho_optax.coefficients.PRESETS` or a
      sequence of ``(a, b, c)`` triples.
    preconditioning: ``"frobenius"``, ``"spectral"``, ``"aol"`` or ``"schatten"``
      (see :func:`ortho_optax.newton_schulz.newton_schulz`).
    scale_mode: ``"shape_scaling"``, ``"spectral"``, ``"unit_rms_norm"``,
      ``"consistent_rms"`` or ``"none"`` (see :func:`ortho_optax.stages.scale.scale_by_shape`).
    extra_scale_factor: multiplies the shape factor (0.2 with ``"spectral"``
      matches AdamW's update RMS; ``"consistent_rms"`` already includes
      optax.contrib's 0.2, so this multiplies ``0.2 * sqrt(max(out, in))``).
    weight_decay: decay coefficient (>= 0).
    weight_decay_method: ``"decoupled"``, ``"independent"``, ``"l2"`` or ``"palm"``
      (see :mod:`ortho_optax.stages.decay`).
    compute_dtype: dtype of the Newton-Schulz iterations, a dtype or a name such as
      ``"bfloat16"`` / ``"f32"`` (``None``: the update's).
    eps: Frobenius-normalisation epsilon (AOL row-sum clamp for ``"aol"``).
    mu_dtype: dtype of the momentum buffer, a dtype or a name (``None``: the
      parameter's).
    adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_weight_decay: the AdamW
      branch (``optax.adamw``).
    label_fn: parameter routing (``params -> labels "ortho"|"adam"|"frozen"``) or
      a label pytree; ``None`` for the default rules.
    dimension_numbers: matrix views, see :func:`ortho_optax.matrix_view.resolve_dims`
      (``None``: Flax ``(in, out)`` kernels; ``ortho_optax.TORCH_LAYOUT`` for
      PyTorch-layout weights).
    backend: Newton-Schulz backend, ``"auto"``, ``"xla"`` or ``"pallas"``.
    kahan_sum: append Kahan-compensated summation (for bf16/fp16 parameters; a
      no-op for float32 leaves). The updates then need ``params``.
    bias_correction: debias the momentum by ``1 - momentum^t`` (the bias-corrected
      Nesterov form of ``optax.contrib.muon``; off in the seeds), see
      :func:`ortho_optax.stages.momentum.ema_momentum`.
    adam_nesterov: NAdamW in the AdamW branch (``optax.contrib.muon`` uses it when
      ``nesterov=True``).
    orthogonalizer: the Newton-Schulz method, ``"newton_schulz"`` (standard) or
      ``"gram_newton_schulz"``: the same polynomial iterated on the Gram matrix of the
      ``m × n`` matrices where that needs fewer flops (``n >= 3.5m`` at the default
      restart period; square ones keep standard Newton-Schulz), see
      :func:`ortho_optax.gram_newton_schulz.gram_newton_schulz`. The same result in exact
      arithmetic.
    restart_every: Gram Newton-Schulz's restart period (an int >= 1 or ``None``: never;
      unused by ``"newton_schulz"``).

  Returns:
    An ``optax.GradientTransformation`` (an ``optax.multi_transform``, chained with
    the Kahan stage when ``kahan_sum``).

  Raises:
    ValueError: at construction, for a hyperparameter of the wrong type or out of
      range (a schedule is checked at steps 0 and 1) or an unknown name, naming the
      value and the choices.

  References:
    Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024.
    ryyzn9/AuON ``auon/muon.py``; optax ``optax/contrib/_muon.py``; J. Zhang, N. Amsel,
    B. Chen, T. Dao, "Gram Newton-Schulz", 2026 (Dao-AILab/gram-newton-schulz).
  """
  dims = _common.masked_dimension_numbers(dimension_numbers)
  ortho_tx = orthogonalized_chain(
      learning_rate=learning_rate, momentum=momentum, nesterov=nesterov,
      bias_correction=bias_correction, weight_decay=weight_decay,
      weight_decay_method=weight_decay_method, ns_steps=ns_steps, coefficients=coefficients,
      preconditioning=preconditioning, eps=eps, compute_dtype=compute_dtype,
      scale_mode=scale_mode, extra_scale_factor=extra_scale_factor, mu_dtype=mu_dtype,
      dimension_numbers=dims, backend=backend, orthogonalizer=orthogonalizer,
      restart_every=restart_every)
  return with_kahan(_common.with_adamw_fallback(
      ortho_tx, adam_learning_rate=adam_learning_rate, adam_b1=adam_b1, adam_b2=adam_b2,
      adam_eps=adam_eps, adam_weight_decay=adam_weight_decay, adam_nesterov=adam_nesterov,
      label_fn=label_fn, dimension_numbers=dimension_numbers, name="muon"), kahan_sum)
