"""Gram Newton–Schulz: the Newton–Schulz polynomial iterated on the small Gram matrix.

Every NS step ``X ← aX + (bA + cA²)X`` with ``A = XXᵀ`` multiplies ``X`` on the left by a
polynomial in ``A``; after ``t`` steps ``X_t = Q_t X_0`` with ``Q_t`` a polynomial in
``R_0 = X_0 X_0ᵀ``, and ``R_t = X_t X_tᵀ = Q_t R_0 Q_t`` (``Q_t`` and ``R_0`` commute and
are symmetric). For a wide ``m × n`` X (``m <= n``) Gram NS therefore forms ``R = XXᵀ``
once and iterates on ``m × m`` matrices only::

    Z = bR + cR²                 # the step's polynomial, c = 0: Z = bR (no GEMM)
    Q ← aQ + QZ                  # Q ← (aI + Z) Q   (first step of a segment: Q = aI + Z)
    RZ = aR + R·Z                # R(aI + Z)
    R ← a·RZ + RZ·Z              # R(aI + Z)², not after a segment's last step

and applies ``Q`` to ``X`` at the end. In exact arithmetic it equals standard NS with the
same coefficients step for step.

**Restarts.** In low precision ``R`` is no longer exactly positive semi-definite: rounding
leaves eigenvalues of order ``-u·‖R‖`` (``u`` the unit roundoff) where ``X`` has tiny
singular values, and the recurrence ``r ← r·(a + br + cr²)²`` multiplies a negative ``r`` by
more than ``a² > 1`` every step (``b < 0``): the error compounds until ``Q`` overflows or
maps those directions far past 1. Standard NS never sees it because it recomputes ``A``
from ``X`` (PSD up to one rounding) at every step. Gram NS therefore restarts every
``restart_every`` steps: ``X ← QX``, ``R ← XXᵀ``, ``Q ← I``, which resets the negative
eigenvalues to one rounding's worth. Upstream restarts once, after step 2 of 5, in
float16; bf16's roundoff is 8× larger. Measured in bf16 on ill-conditioned matrices
(σ log-spaced over 3–9 decades, 64×256 and 128×512): one restart (after step 2 or 3 of 5)
is enough for Keller's and the Dion ``quintic`` tables but leaves Polar Express up to 6×
farther from the polar factor than standard NS, and none at all is 5× to 2·10⁷× farther or
NaN for every table but Aurora's gentle quintic (well-conditioned Gaussian matrices need
no restart); a restart every 2 steps (the default) matched standard NS for
``muon``, ``quintic``, ``polar_express`` (5 and 8 steps), ``cans`` and ``deepseekv4``.

**Flops** per ``m × n`` matrix (``n = r·m``, a ``p×q·q×k`` GEMM = ``2pqk``), ``s`` steps
in ``S`` segments (``S - 1`` restarts), quintic coefficients:

* standard NS: ``s·(4m²n + 2m³)`` (``XXᵀ`` and ``(bA + cA²)X`` are ``m × n``, ``A²`` is ``m³``);
  cubic ``c = 0``: ``s·4m²n``.
* Gram NS: ``4m²n·S`` (the Gram and the final ``QX`` per segment) plus ``2m³·s`` (the ``R²``
  of each step) plus ``6m³·(s - S)`` (``QZ`` and the two GEMMs of the ``R`` update, which
  the first / last step of a segment do without); cubic: no ``R²`` term.

With ``s = 5`` quintic steps that is ``(12r + 22)m³`` at the default ``restart_every=2``
(two restarts) and ``(8r + 28)m³`` at ``restart_every=3`` (one), against ``(20r + 10)m³``:
at ``n = 4m`` (a GPT's MLP) 1.29× / 1.5× fewer flops, at ``n = 8m`` 1.45× / 1.8×; break-even
at ``n = 1.5m`` either way, and at ``n = m`` Gram NS costs 1.1–1.2× MORE: square and nearly
square matrices gain nothing (:func:`prefers_gram` is the dispatcher's rule). The ``m × m``
products are also symmetric (``R``, ``Z``, ``(aI + Z)·RZ``), which kernels that compute one
triangle halve again (:mod:`ortho_optax.pallas.gram_ns`, the Hopper back end of
``backend="pallas"|"auto"``); XLA's dense GEMMs do not.

References:
  J. Zhang, N. Amsel, B. Chen, T. Dao, "Gram Newton-Schulz", 2026,
  https://dao-ailab.github.io/blog/2026/gram-newton-schulz/ and
  https://github.com/Dao-AILab/gram-newton-schulz.
  K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ortho_optax import orthogonalizers, validation
from ortho_optax.coefficients import Coefficients
from ortho_optax.newton_schulz import (
    _checked_input,
    _gram,
    _mm,
    _orient_and_precondition,
    _precondition_first_step,
    _round_to,
    _swap,
)

#: Steps between restarts (``X ← QX``, ``R ← XXᵀ``) by default.
DEFAULT_RESTART_EVERY = 2

#: :func:`prefers_gram` picks Gram NS when its flop count is at most this fraction of
#: standard NS's (the ``m × m`` GEMMs run less efficiently than the ``m × n`` ones).
GRAM_MAX_FLOP_RATIO = 0.8


def _segment_count(steps: int, restart_every) -> int:
  """Number of runs of steps between restarts (restarts + 1)."""
  every = steps if restart_every is None else min(restart_every, steps)
  return -(-steps // every)


def newton_schulz_flops(rows: int, cols: int, *, steps: int = 5, cubic: bool = False) -> int:
  """Flops of standard NS on one ``rows × cols`` matrix (a GEMM ``p×q·q×k`` = ``2pqk``).

  Args:
    rows, cols: the matrix's shape, either orientation.
    steps: number of NS steps.
    cubic: whether the coefficients have ``c = 0`` (no ``A²``).

  Returns:
    ``steps·(4m²n + 2m³)`` (``steps·4m²n`` for cubic), ``m = min``, ``n = max``.

  References:
    K. Jordan et al., "Muon", 2024, https://kellerjordan.github.io/posts/muon/.
  """
  m, n = min(rows, cols), max(rows, cols)
  return steps * (4 * m * m * n + (0 if cubic else 2 * m ** 3))


def gram_newton_schulz_flops(rows: int, cols: int, *, steps: int = 5,
                             restart_every=DEFAULT_RESTART_EVERY, cubic: bool = False) -> int:
  """Flops of Gram NS on one ``rows × cols`` matrix (a GEMM ``p×q·q×k`` = ``2pqk``).

  Args:
    rows, cols: the matrix's shape, either orientation.
    steps: number of NS steps.
    restart_every: as for :func:`gram_newton_schulz`.
    cubic: whether the coefficients have ``c = 0`` (no ``R²``).

  Returns:
    ``4m²n·S + 2m³·steps + 6m³·(steps - S)`` with ``S`` segments between restarts (no
    ``2m³·steps`` term for cubic), ``m = min``, ``n = max``.

  References:
    J. Zhang, N. Amsel, B. Chen, T. Dao, "Gram Newton-Schulz", 2026,
    https://github.com/Dao-AILab/gram-newton-schulz.
  """
  m, n = min(rows, cols), max(rows, cols)
  segments = _segment_count(steps, restart_every)
  square = (0 if cubic else 2 * steps) + 6 * (steps - segments)
  return 4 * m * m * n * segments + square * m ** 3


def prefers_gram(rows: int, cols: int, *, steps: int = 5,
                 restart_every=DEFAULT_RESTART_EVERY, cubic: bool = False) -> bool:
  """Whether Gram NS is worth it over standard NS for a ``rows × cols`` matrix.

  True when :func:`gram_newton_schulz_flops` is at most :data:`GRAM_MAX_FLOP_RATIO` times
  :func:`newton_schulz_flops`: with 5 quintic steps, ``n >= 3.5m`` for ``restart_every=2``
  and ``n >= 2.5m`` for ``restart_every=3`` (``n/m = max/min`` of the shape); square and
  nearly square matrices keep standard NS. The margin covers the ``m × m`` GEMMs' lower
  efficiency and the extra launches; calibrate it with ``benchmarks/bench_gram_ns.py``.

  Args:
    rows, cols: the matrix's shape, either orientation.
    steps, restart_every, cubic: as for :func:`gram_newton_schulz_flops`.

  Returns:
    ``True`` to use Gram NS.

  References:
    J. Zhang, N. Amsel, B. Chen, T. Dao, "Gram Newton-Schulz", 2026,
    https://github.com/Dao-AILab/gram-newton-schulz.
  """
  gram = gram_newton_schulz_flops(rows, cols, steps=steps, restart_every=restart_every,
                                  cubic=cubic)
  return gram <= GRAM_MAX_FLOP_RATIO * newton_schulz_flops(rows, cols, steps=steps, cubic=cubic)


def _check_restart_every(restart_every) -> None:
  if restart_every is not None:
    validation.check_int("restart_every", restart_every, minimum=1)


def gram_newton_schulz(
    x: jax.Array,
    *,
    steps: int = 5,
    coefficients: Coefficients = "muon",
    order: str | None = None,
    preconditioning: str = "frobenius",
    eps: float = 1e-7,
    compute_dtype=jnp.bfloat16,
    restart_every: int | None = DEFAULT_RESTART_EVERY,
    backend: str = "auto",
) -> jax.Array:
  """Approximate polar factor of each matrix of ``x`` by Gram Newton–Schulz iterations.

  The same result as :func:`ortho_optax.newton_schulz` with the same arguments in exact
  arithmetic (and to rounding in float32/float64), with fewer flops on wide or tall
  matrices: the steps run on the ``m × m`` Gram matrix of the ``m × n`` (``m <= n``)
  matrix, see the module docstring and :func:`prefers_gram`.

  Args:
    x: array of rank >= 2; the last two axes are the matrix ``(rows, cols)``, leading
      axes are a batch. Rows > cols are handled by working on the transpose.
    steps: number of NS steps (>= 1).
    coefficients: preset name (see :data:`ortho_optax.coefficients.PRESETS`) or a sequence
      of ``(a, b, c)`` triples.
    order: ``"cycle"`` | ``"repeat_last"`` | ``None`` (preset default), see
      :func:`ortho_optax.coefficients.resolve_coefficients`.
    preconditioning: ``"frobenius"``, ``"aol"``, ``"schatten"`` or ``"spectral"``, as for
      :func:`ortho_optax.newton_schulz`; the non-Frobenius ones reuse the first Gram matrix.
    eps: Frobenius normalisation epsilon (added to the norm) / AOL row-sum clamp.
    compute_dtype: dtype of the iterations (``None``: ``x.dtype``). Every GEMM accumulates
      in float32 (float64 for float64) and its result is rounded to ``compute_dtype`` once.
    restart_every: steps between restarts (``X ← QX``, ``R ← XXᵀ``, ``Q ← I``), which keep
      the iteration stable in low precision; ``None``: never restart (one Gram matrix,
      fewest flops), which is unstable in bf16 on ill-conditioned inputs and even in
      float32 over long schedules (10 ``deepseekv4`` steps). Square and nearly square
      matrices, which the optimizers never send to Gram NS (:func:`prefers_gram`), are
      less stable in bf16 still. On the CPU, with 8-step ``polar_express``, one of 30
      Gaussian bf16 16 × 16 matrices gave a non-finite result at ``restart_every=2``, and
      26 of 40 64 × 64 ones without restarts; 5-step ``muon``, ``polar_express``,
      ``quintic`` and ``cans`` gave none at 2. Use :func:`ortho_optax.newton_schulz` there.
    backend: ``"xla"``, ``"pallas"`` (the Hopper kernels of
      :func:`ortho_optax.pallas.gram_newton_schulz`; RuntimeError if unavailable) or
      ``"auto"`` (the kernels on a Hopper GPU for bf16 compute, ``frobenius``/``aol``
      preconditioning and a stack large enough for them to win, XLA otherwise), as for
      :func:`ortho_optax.newton_schulz`.

  Returns:
    An array of ``x``'s shape and dtype. An all-zero matrix maps to zeros.

  Raises:
    ValueError: for ``x.ndim < 2``, a non-floating ``x`` or bad arguments (naming the value
      and the choices).
    RuntimeError: ``backend="pallas"`` off a Hopper GPU.

  References:
    J. Zhang, N. Amsel, B. Chen, T. Dao, "Gram Newton-Schulz", 2026,
    https://dao-ailab.github.io/blog/2026/gram-newton-schulz/,
    https://github.com/Dao-AILab/gram-newton-schulz; K. Jordan et al., "Muon", 2024,
    https://kellerjordan.github.io/posts/muon/.
  """
  orth = orthogonalizers.gram_newton_schulz_orthogonalizer(
      steps=steps, coefficients=coefficients, order=order, preconditioning=preconditioning,
      eps=eps, compute_dtype=compute_dtype, backend=backend, restart_every=restart_every,
      every_shape=True)
  x = _checked_input(x, "gram_newton_schulz")
  # The kernels' predicate takes the wide orientation, as in newton_schulz_many.
  wide = x.shape[:-2] + (min(x.shape[-2:]), max(x.shape[-2:]))
  on_kernels = (isinstance(orth, orthogonalizers.PallasNewtonSchulz)
                and orth.takes(wide, x.dtype))
  return orth.run_many([orthogonalizers.Stack(x, False, on_kernels)])[0]


def _segment_factor(gram, table, cubic):
  """The factor ``Q`` of ``len(table)`` steps started from an ``X`` whose Gram matrix is
  ``gram``: ``Q·X`` is those steps of standard NS.

  GEMM operands are in ``gram.dtype``; each product is accumulated in the table's (>= f32)
  dtype, combined there with its ``a·M`` term, and rounded once (PyTorch's ``baddbmm``
  epilogues, as in :func:`ortho_optax.newton_schulz`). Every factor is a polynomial in
  ``R``, so they commute and ``M·Z`` stands for ``Z·M`` too.
  """
  dt = gram.dtype
  acc = table.dtype

  def poly(r, abc):
    """``Z = bR + cR²`` (``None`` for cubic tables: ``Z = bR`` is folded into products)."""
    if cubic:
      return None
    return _round_to(abc[1] * r.astype(acc) + abc[2] * _mm(r, r, acc), dt)

  def step(m, r, z, abc):
    """``(aI + Z)·M = a·M + M·Z``, rounded."""
    mz = abc[1] * _mm(m, r, acc) if cubic else _mm(m, z, acc)
    return _round_to(abc[0] * m.astype(acc) + mz, dt)

  def next_gram(r, z, abc):
    """``(aI + Z) R (aI + Z)``: two steps applied to ``R``."""
    return step(step(r, r, z, abc), r, z, abc)

  # First step: Q = aI + Z (no GEMM); the last step skips the update of R.
  r, abc = gram, table[0]
  z = poly(r, abc)
  zr = abc[1] * r.astype(acc) if cubic else z.astype(acc)
  q = _round_to(abc[0] * jnp.eye(r.shape[-1], dtype=acc) + zr, dt)
  if table.shape[0] == 1:
    return q
  r = next_gram(r, z, abc)
  for abc in table[1:-1]:  # unrolled, as ortho_optax.newton_schulz's steps
    z = poly(r, abc)
    q, r = step(q, r, z, abc), next_gram(r, z, abc)
  abc = table[-1]
  return step(q, r, poly(r, abc), abc)


# Jitted like ortho_optax.newton_schulz's XLA path: one compilation per (shape, #steps,
# config), the table and eps traced; inside an outer jit this simply inlines.
@functools.partial(jax.jit, static_argnames=("preconditioning", "compute_dtype", "cubic",
                                             "restart_every"))
def _xla_gram_newton_schulz(x, table, eps, *, preconditioning, compute_dtype, cubic,
                            restart_every):
  """Gram NS of ``x`` (any orientation, batched) with the ``(steps, 3)`` coefficient
  ``table``; ``restart_every`` as for :func:`gram_newton_schulz` (static)."""
  out_dtype = x.dtype
  acc = table.dtype
  X, transposed = _orient_and_precondition(x, eps, preconditioning, compute_dtype)
  if preconditioning == "frobenius":
    gram = _gram(X)
  else:
    X, gram = _precondition_first_step(X, preconditioning, eps)

  def apply(q, X):
    return _round_to(_mm(q, X, acc), X.dtype)

  # The first segment starts from the (preconditioned) first Gram matrix, the others
  # from a fresh XXᵀ. Segments are unrolled, as ortho_optax.newton_schulz's steps (a
  # lax.scan cost time at every iteration on a GPU).
  steps = table.shape[0]
  every = steps if restart_every is None else min(restart_every, steps)
  X = apply(_segment_factor(gram, table[:every], cubic), X)
  for start in range(every, steps, every):
    X = apply(_segment_factor(_gram(X), table[start:start + every], cubic), X)
  if transposed:
    X = _swap(X)
  return X.astype(out_dtype)
