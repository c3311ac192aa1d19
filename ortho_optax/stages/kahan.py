"""Kahan-compensated updates for low-precision (bf16 / fp16) parameters.

A bf16 parameter keeps 8 significant bits, so an update smaller than half an
ulp of the weight is rounded away entirely and small learning rates stall.
Kahan summation keeps the rounding error of every ``p + u`` in a compensation
buffer ``c`` and feeds it back into the next step (as torch-optimi's
``kahan_sum`` used by OAdamW)::

  y = u + c;   p_new = round(p + y);   c = (p + y) - p_new

``kahan_summation()`` is the LAST stage of a chain. Its output is the update
``d = round(p_new - p)`` in the parameter's dtype (optax's convention), and the buffer
keeps what ``optax.apply_updates`` will really apply: ``c = (p + y) - round(p + d)``.
For the small steps Kahan summation is for (``p_new`` within a factor 2 of ``p``),
``p_new - p`` is exact in the parameter's dtype (Sterbenz), so ``p + d`` is ``p_new``
exactly; for a larger step whatever the rounding of ``d`` loses is in ``c`` and applied
later, so nothing is lost either way. Full-precision leaves (float32 and wider) pass
through untouched and carry no buffer.

The buffer assumes the update is applied as ``optax.apply_updates`` does, ``p + d``
rounded to the parameter's dtype.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from ortho_optax.validation import NO_PARAMS, check_dtype

LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class KahanSummationState(NamedTuple):
  """Compensation buffers: a tree with ``None`` for full-precision leaves, or ``None``
  alone when no leaf is low-precision (a tree of ``None`` would cost ``nnx.jit`` a
  Python visit per node on every step)."""
  compensation: Any


def _is_low(x) -> bool:
  return jnp.dtype(x.dtype) in LOW_PRECISION


def _round(x, dtype):
  """``x`` (float32) rounded to ``dtype``'s precision, kept in float32."""
  info = jnp.finfo(dtype)
  return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def kahan_summation(compensation_dtype: Optional[Any] = None) -> optax.GradientTransformation:
  """Compensated summation of updates into low-precision parameters.

  Args:
    compensation_dtype: dtype of the compensation buffer of low-precision
      leaves. ``None`` (default) uses the parameter's dtype, as torch-optimi does
      (half the memory; the buffer holds the rounding error, which is small
      relative to it and fits); ``jnp.float32`` keeps a more exact residual.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`KahanSummationState`.
    It needs ``params`` in ``update``; its updates have the parameters' dtype.

  References:
    Kahan, "Further remarks on reducing truncation errors", CACM 1965.
    Zamirai et al., "Revisiting BFloat16 Training", 2020.
    Warner, torch-optimi (``kahan_sum``), 2023.
  """

  compensation_dtype = check_dtype("compensation_dtype", compensation_dtype)

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    comp = [jnp.zeros(p.shape, p.dtype if compensation_dtype is None else compensation_dtype)
            if _is_low(p) else None
            for p in leaves]
    if all(c is None for c in comp):
      return KahanSummationState(compensation=None)
    return KahanSummationState(compensation=jax.tree.unflatten(treedef, comp))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(NO_PARAMS)
    if state.compensation is None:
      return updates, state
    u_leaves, treedef = jax.tree.flatten(updates)
    p_leaves = treedef.flatten_up_to(params)
    c_leaves = treedef.flatten_up_to(state.compensation)
    out, new_c = [], []
    for u, p, c in zip(u_leaves, p_leaves, c_leaves):
      if c is None:
        out.append(u)
        new_c.append(None)
        continue
      pf = p.astype(jnp.float32)
      exact = pf + (u.astype(jnp.float32) + c.astype(jnp.float32))
      # The update in p's dtype, rounded here so that XLA cannot keep it in float32
      # (excess precision) and apply more than the buffer accounts for.
      delta = _round(_round(exact, p.dtype) - pf, p.dtype)
      applied = _round(pf + delta, p.dtype)  # what optax.apply_updates computes
      out.append(delta.astype(p.dtype))
      new_c.append((exact - applied).astype(c.dtype))
    return (jax.tree.unflatten(treedef, out),
            KahanSummationState(compensation=jax.tree.unflatten(treedef, new_c)))

  return optax.GradientTransformation(init_fn, update_fn)
