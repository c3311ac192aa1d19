"""OAdamW: Newton-Schulz on the raw gradient, then StableAdamW (jeb1399/OAdamW).

Hidden matrices (label ``"ortho"``) are orthogonalized *before* the Adam moments::

  g_hat = NS5(g)        float32, Keller-simple coefficients, X / (||X||_F + 1e-7),
                        recomputed when t % update_proj_gap == 0 (else the cached
                        NS output of an earlier gradient is reused; t = 1 always computes)
  StableAdamW core on g_hat (debiased betas, per-tensor RMS lr clip, decoupled decay)

so the moments are EMAs of orthogonalized gradients and Adam's element-wise
normalisation is applied on top (the final update is not orthogonal; step 1 is
``sign(NS(g))``). Every other float leaf (label ``"adam"``) goes through the same
StableAdamW core without Newton-Schulz: OAdamW has no separate AdamW. So the core runs
once, after the routing, on every trainable leaf; its one step counter is the
reference's per-tensor and per-group counters, which all step together.

Differences from the reference, all deliberate:

* Routing: the reference's auto-grouping orthogonalizes *every* parameter of rank >= 2
  (embeddings included) and crashes on rank > 2. Here the default ``label_fn`` sends
  only hidden matrices to Newton-Schulz (embeddings, heads, norms, biases go to the
  plain core), and rank > 2 leaves work through ``dimension_numbers``.
* The per-group key ``scale`` of the reference is stored but never applied
  (``project_back`` is never called), so it is not a parameter here.
* ``kahan_sum``: ``None`` or ``True`` add :func:`ortho_optax.stages.kahan.kahan_summation`
  (it keeps a compensation buffer only for bf16/fp16 leaves, so it is a no-op for
  float32 ones, as in the reference); ``False`` leaves it out. The reference applies the
  weight decay to ``p`` outside the compensated sum; here the decay is part of the
  compensated update. The reference's Kahan + ``update_proj_gap > 1`` corruption of the
  NS cache is not reproduced.
"""

# No `from __future__ import annotations`: optax (its inject_hyperparams and its test suite)
# reads the learning rate's annotation, optax.ScalarOrSchedule, from the signature.
from typing import Any, Optional

import jax
import optax

from ortho_optax import routing
from ortho_optax import validation
from ortho_optax.optimizers import _common
from ortho_optax.orthogonalizers import NEWTON_SCHULZ_METHODS
from ortho_optax.stages import kahan as kahan_stages
from ortho_optax.stages import stable_adamw as stable_adamw_stages


def oadamw(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 1e-2,
    eps: float = 1e-6,
    decouple_lr: bool = False,
    max_lr: Optional[float] = None,
    kahan_sum: Optional[bool] = None,
    muon: bool = True,
    ns_steps: Optional[int] = None,
    update_proj_gap: Optional[int] = None,
    *,
    compute_dtype: Optional[Any] = "float32",
    label_fn: Any = None,
    dimension_numbers: Any = None,
    backend: str = "auto",
    mu_dtype: Optional[Any] = None,
    orthogonalizer: str = "newton_schulz",
    restart_every: Optional[int] = 2,
) -> optax.GradientTransformation:
  """OAdamW: orthogonalized-gradient StableAdamW.

  Args:
    learning_rate: ``lr >= 0``, a number or a schedule (shared by both branches).
    b1, b2: moment coefficients in ``[0, 1)`` (debiased, see
      :func:`ortho_optax.stages.stable_adamw.stable_adamw`).
    weight_decay: decoupled decay ``>= 0`` scaled by the clipped ``lr_t``.
    eps: ``> 0``; added to ``sqrt(v)`` and squared as the floor of ``v`` in the RMS.
    decouple_lr: fully decoupled decay ``p <- p (1 - (lr_t / max_lr) wd)``.
    max_lr: reference lr of ``decouple_lr`` (``None``: ``learning_rate``; required
      with a schedule).
    kahan_sum: Kahan-compensated updates for bf16/fp16 parameters (``None``: on for
      them, as the reference; float32 leaves never carry a buffer).
    muon: orthogonalize the ``"ortho"`` leaves; ``False`` gives plain StableAdamW
      everywhere.
    ns_steps: Newton-Schulz iterations, an int ``>= 1`` (``None``: 5).
    update_proj_gap: recompute the Newton-Schulz output every ``update_proj_gap``
      steps (an int ``>= 1``; ``None`` or 1: every step). Step counts default to ``None``
      so that a plain ``optax.inject_hyperparams(oadamw)`` keeps them static.
    compute_dtype: dtype of the Newton-Schulz iteration (reference: float32).
    label_fn: routing (:func:`ortho_optax.routing.default_label_fn` when ``None``).
    dimension_numbers: per-leaf :class:`ortho_optax.MatrixDims` (``None``: Flax
      ``(in, out)`` for 2-D leaves); a pytree for the full parameter tree works.
    backend: Newton-Schulz backend (``"auto"``, ``"xla"``, ``"pallas"``).
    mu_dtype: dtype of the moments (``None``: the parameter dtype, as the reference, except
      float16 leaves, whose moments are float32).
    orthogonalizer, restart_every: ``"newton_schulz"`` or ``"gram_newton_schulz"`` and the
      latter's restart period, as in :func:`ortho_optax.optimizers.muon.muon`.

  Returns:
    An ``optax.GradientTransformation``: ``optax.chain`` of the routing (an
    ``optax.multi_transform`` with branches ``"ortho"`` = NS, ``"adam"`` = identity and
    ``"frozen"`` = zero) and the StableAdamW core (+ Kahan) on every trainable leaf.

  References:
    jeb1399/OAdamW ``oadamw.py`` (commit 867bef6) with torch-optimi 0.3.3
    ``StableAdamW``; Wortsman et al., 2023; Jordan et al., "Muon", 2024.
  """
  validation.check_choice("kahan_sum", kahan_sum, (None, True, False))
  validation.check_bool("muon", muon)
  # Checked with muon=False too: a bad name is an error whether or not it is used.
  validation.check_choice("orthogonalizer", orthogonalizer, NEWTON_SCHULZ_METHODS)
  ns_steps = _common.checked_ns_steps(ns_steps)
  update_proj_gap = _common.default_if_none(update_proj_gap, 1)  # every step
  validation.check_static(update_proj_gap=update_proj_gap)

  core = _common.float16_in_float32(stable_adamw_stages.stable_adamw(
      learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
      decouple_lr=decouple_lr, max_lr=max_lr, mu_dtype=mu_dtype))
  if kahan_sum is not False:
    core = optax.chain(core, kahan_stages.kahan_summation())

  if muon:
    ortho_tx = _common.newton_schulz_stage(
        orthogonalizer, restart_every=restart_every, steps=ns_steps, coefficients="muon",
        preconditioning="frobenius",
        eps=1e-7, compute_dtype=validation.check_dtype("compute_dtype", compute_dtype),
        backend=backend,
        update_proj_gap=update_proj_gap,
        dimension_numbers=_common.masked_dimension_numbers(dimension_numbers))
  else:
    ortho_tx = optax.identity()
  # Both branches share one core, after the routing: one set of moments for the whole
  # tree rather than two masked copies (each a full tree that nnx.jit walks every step).
  routed = _common.with_adamw_fallback(
      ortho_tx, adam_tx=optax.identity(), label_fn=label_fn,
      dimension_numbers=dimension_numbers, name="oadamw" if muon else None)
  labels = routing.checked_labels(label_fn, dimension_numbers)
  trainable = lambda params: jax.tree.map(lambda label: label != routing.FROZEN,
                                          labels(params))
  return optax.chain(routed, optax.masked(core, trainable))


__all__ = ["oadamw"]
