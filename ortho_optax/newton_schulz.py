"""Quintic Newton–Schulz (NS) orthogonalization on the last two axes.

``newton_schulz(x)`` approximates the polar factor ``U Vᵀ`` of every matrix in ``x``
(``x = U Σ Vᵀ``) by a few odd polynomial steps ``X ← aX + (bA + cA²)X`` with ``A = XXᵀ``,
after a preconditioning that brings every singular value into the polynomials' basin
``(0, ~1]``. It reproduces, with the right arguments, the NS helpers of the seed systems:

======================================  =====================================================
seed                                    call
======================================  =====================================================
AuON / OAdamW / Keller Muon             ``coefficients="muon", eps=1e-7``
Turbo-Muon ``turbo`` (AOL, 4 steps)     ``coefficients="turbo_aol", steps=4,
                                        preconditioning="aol", eps=1e-6``
Turbo-Muon ``standard``                 ``coefficients="quintic", steps=5, eps=1e-6``
NVIDIA Emerging-Optimizers              ``coefficients=<type>, eps=1e-15``
Aurora ``polar``                        ``coefficients="aurora", steps=12``
======================================  =====================================================

The steps are unrolled (the ``(steps, 3)`` coefficient table is traced, so one program
serves every table of a length): in a ``lax.scan`` each step cost more on an H200, the more
the larger the matrix (6 µs at 768², 56–69 µs on GPT-2 small's stacks, 180–200 µs at 8192²:
``benchmarks/bench_xla_ns.py``, ``fold_scan`` against ``fold``). On the CPU each step rounds like
the PyTorch references (``aX + (bA + cA²)X`` combined in float32); on accelerators a bf16
(or float16) step runs as ``(aI + bA + cA²)·X`` with GEMMs that round as they write: one
rounding more and a float32 round trip per GEMM less (:func:`_ns_step`).

References:
  Jordan et al., *Muon: An optimizer for hidden layers in neural networks*, 2024.
  Boissin et al., *Turbo-Muon: Accelerating Orthogonality-Based Optimization with
  Pre-Conditioning*, arXiv 2512.04632, 2025 (AOL preconditioning).
  Amsel et al., *The Polar Express*, arXiv 2505.16932, 2025.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from ortho_optax.coefficients import Coefficients, resolve_coefficients

PRECONDITIONINGS = ("frobenius", "aol", "schatten", "spectral")

#: Power iterations (on the small Gram matrix) used by ``preconditioning="spectral"``.
SPECTRAL_POWER_ITERATIONS = 8
#: The power-iteration estimate of σ_max is a lower bound; it is inflated by this factor
#: so that the scaled σ_max lands at <= ~1/1.05 in the common case and, when the estimate
#: is poor, slightly above 1 (1.042 for a Gaussian 16×64 matrix whose estimate fell 9%
#: short).
SPECTRAL_SAFETY = 1.05
#: The largest scaled σ_max a schedule must bring back for ``preconditioning="spectral"``:
#: the Keller, quintic, AOL, Turbo, DeepSeek-V4, cubic and Aurora tables do from 1.1
#: (muon up to 1.2); Polar Express and CANS, fitted on [0, 1], diverge from 1.05.
SPECTRAL_TOLERANCE = 1.1


def _swap(x):
  return jnp.swapaxes(x, -1, -2)


def _accum_dtype(*dtypes):
  """float32, or float64 when any dtype is float64 (scalars and elementwise math)."""
  dt = jnp.float32
  for d in dtypes:
    dt = jnp.promote_types(dt, d)
  return dt


def _scale_by_pow2(v, k):
  """``v · 2^k`` (``k`` an integer array), exact, in two halves.

  One factor ``2^k`` can be subnormal (|k| > 126 in float32), which XLA on the CPU flushes
  to zero (and ``v / 2^j`` is compiled as ``v · 2^-j``); two factors of ``2^(k/2)`` are
  always normal.
  """
  k = k.astype(jnp.int32)
  half = k // 2
  one = jnp.ones((), v.dtype)
  return (v * jnp.ldexp(one, half)) * jnp.ldexp(one, k - half)


def _matrix_sum(v):
  """``sum(v)`` over the last two axes (keepdims), in two stages.

  A one-pass reduction of a whole matrix per output is a few very long rows, which XLA
  on GPUs runs on a few thread blocks (0.5 ms for a 48×768×768 float32 stack, measured
  on an H200); rows first, then the per-row results, keeps the GPU busy. The barrier
  stops XLA from folding the two reductions back into one.
  """
  rows = lax.optimization_barrier(jnp.sum(v, axis=-1, keepdims=True))
  return jnp.sum(rows, axis=-2, keepdims=True)


def _matrix_max_abs(v):
  """``max|v|`` over the last two axes (keepdims, 0 for empty matrices), in two stages
  like :func:`_matrix_sum`."""
  rows = lax.optimization_barrier(jnp.max(jnp.abs(v), axis=-1, keepdims=True, initial=0.0))
  return jnp.max(rows, axis=-2, keepdims=True, initial=0.0)


def _frobenius_normalize(x, eps, compute_dtype):
  """``X / (‖X‖_F + eps)`` per matrix, the norm accumulated in >= float32.

  The plain sum of squares overflows float32 once entries pass ~1e19 (the norm becomes
  inf and X/inf a silent all-zero update) and underflows below ~1e-19 (a NaN with
  ``eps = 0``). The identity ``X / (‖X‖ + eps) = (X/s) / (‖X/s‖ + eps/s)`` with ``s`` the
  power of two just below ``max|X|`` avoids both, and it is exact: scaling by a power of
  two commutes with every rounding of the sum, the square root and the division, so
  matrices of ordinary scale get the plain formula's result bit for bit, unless some of
  their squares or scaled entries are subnormal (where the plain formula flushes them to
  zero on the CPU). It takes three passes over X. Non-finite inputs still give non-finite
  outputs (NaN is never hidden).
  """
  acc = _accum_dtype(x.dtype, compute_dtype)
  xa = x.astype(acc)
  big = _matrix_max_abs(xa)  # 0 for empty
  # max|X| = m·2^e with m in [0.5, 1): X·2^(1-e) has max in [1, 2).
  _, e = jnp.frexp(jnp.where(jnp.logical_and(big > 0, jnp.isfinite(big)), big, 1.0))
  xs = _scale_by_pow2(xa, 1 - e)
  eps_s = _scale_by_pow2(jnp.full_like(big, eps), 1 - e)
  denom = jnp.sqrt(_matrix_sum(jnp.square(xs))) + eps_s
  # An all-zero matrix with eps = 0 maps to 0; NaN (denom NaN) must stay NaN.
  scaled = jnp.where(denom == 0, 0, xs / jnp.where(denom == 0, 1, denom))
  return _round_to(scaled, compute_dtype)


def _aol_prescale(x, compute_dtype):
  """Scales ``x`` by a power of two so AOL's Gram cannot overflow ``compute_dtype``.

  AOL (``s_r = 1/sqrt(max(Σ_j |A_rj|, eps))``) is invariant to the scale of X except
  through ``eps``, but its Gram ``A = XXᵀ`` (row sums <= m·n·max|X|²) is formed in
  ``compute_dtype``: 1e19 in bf16/f32 or ~100 in float16 overflows to inf and AOL then
  returns NaN. Matrices whose bound exceeds ``max(compute_dtype)/4`` are scaled down by a
  power of two (exact) to just below that bound; all others are untouched (bit for bit).
  """
  acc = _accum_dtype(x.dtype, compute_dtype)
  xa = x.astype(acc)
  m, n = x.shape[-2:]
  limit = math.sqrt(float(jnp.finfo(compute_dtype).max) / (4.0 * max(m * n, 1)))
  big = _matrix_max_abs(xa)  # 0 for empty
  over = jnp.logical_and(big > limit, jnp.isfinite(big))
  # 2^k <= limit / big (k <= 0), computed on logs so nothing overflows.
  k = jnp.floor(jnp.log2(limit) - jnp.log2(jnp.where(over, big, limit)))
  return _round_to(jnp.where(over, _scale_by_pow2(xa, k), xa), compute_dtype)


def _round_to(v, dtype):
  """Rounds ``v`` to ``dtype`` so that XLA cannot skip the rounding.

  XLA may drop a ``convert(f32 -> bf16 -> f32)`` round trip (excess precision), which
  would silently change the bf16 semantics; an explicit ``reduce_precision`` keeps it.
  """
  dtype = jnp.dtype(dtype)
  if v.dtype == dtype:
    return v
  info = jnp.finfo(dtype)
  return lax.reduce_precision(v, exponent_bits=info.nexp, mantissa_bits=info.nmant).astype(dtype)


def _mm(u, v, acc):
  return jnp.matmul(u, v, preferred_element_type=acc)


def _gram(x, acc=None):
  """``XXᵀ`` accumulated in ``acc`` (>= f32) and rounded once to ``x.dtype``."""
  acc = _accum_dtype(x.dtype) if acc is None else acc
  return _round_to(_mm(x, _swap(x), acc), x.dtype)


def _fuses(dtype) -> bool:
  """Whether steps in ``dtype`` take the fused form on accelerators: below float32 only.

  There a float32 product written and reread to be rounded costs a step as much as one of
  its GEMMs. A float32 step has no rounding to save, and its GEMMs may run at reduced
  precision (TF32 on GPUs by default), which would then also touch the dominant ``aX``
  term that the separate form keeps exact.
  """
  return jnp.dtype(dtype).itemsize < 4


def _behind_barrier_on_cpu(x):
  """``x``, behind an optimization barrier on the CPU (for steps below float32).

  XLA's CPU runtime has no GEMM for bf16 operands with a float32 result when a transpose
  is folded into an operand ("Unsupported element type for DotThunk"): XLA folds the
  transpose of a transposed input, such as a stack of one square Flax kernel in its
  ``(out, in)`` view, into the first GEMM. The barrier keeps transposes out of the GEMMs;
  accelerators do not need it.
  """
  if not _fuses(x.dtype):
    return x
  return lax.platform_dependent(x, cpu=lax.optimization_barrier, default=lambda x: x)


def _step_gram(x):
  """``XXᵀ`` rounded once to ``x.dtype``, for the step form :func:`_ns_step` picks: where
  steps fuse, the GEMM writes ``x.dtype`` itself (on accelerators); elsewhere
  :func:`_gram`."""
  if not _fuses(x.dtype):
    return _gram(x)
  return lax.platform_dependent(x, cpu=_gram, default=lambda x: _mm(x, _swap(x), x.dtype))


def _ns_step(x, gram, abc, cubic):
  """One step ``X ← aX + (bA + cA²)X`` given ``A = XXᵀ``, in the form that suits the
  platform and dtype: :func:`_ns_step_fused` on accelerators below float32,
  :func:`_ns_step_separate` otherwise (on the CPU always).

  On a GPU the separate form's float32 product ``(bA + cA²)X``, written and reread to be
  combined with ``aX``, costs more than the bf16 GEMM itself; on the CPU it costs nothing
  of note, and the separate form reproduces the PyTorch references' roundings exactly.
  """
  separate = functools.partial(_ns_step_separate, cubic=cubic)
  if not _fuses(x.dtype):
    return separate(x, gram, abc)
  return lax.platform_dependent(
      x, gram, abc, cpu=separate, default=functools.partial(_ns_step_fused, cubic=cubic))


def _ns_step_separate(x, gram, abc, *, cubic):
  """``X ← aX + (bA + cA²)X`` with each intermediate rounded to ``x.dtype`` once.

  GEMM operands are in ``x.dtype``; products are accumulated in the coefficients' (>= f32)
  dtype, combined there, and each intermediate (``A``, ``bA + cA²``, new ``X``) is rounded
  to ``x.dtype`` once, like PyTorch's fused ``addmm``/``baddbmm`` epilogues. With bf16 on
  the CPU this reproduces NVIDIA's bf16 ("medium") reference bit for bit on the goldens,
  and bf16 never rounds the coefficients themselves.
  """
  dt = x.dtype
  acc = abc.dtype
  a, b, c = abc[0], abc[1], abc[2]
  if cubic:  # c == 0: X ← aX + b·A·X, one GEMM fewer (NVIDIA's cubic path).
    return _round_to(a * x.astype(acc) + b * _mm(gram, x, acc), dt)
  poly = _round_to(b * gram.astype(acc) + c * _mm(gram, gram, acc), dt)
  return _round_to(a * x.astype(acc) + _mm(poly, x, acc), dt)


def _ns_step_fused(x, gram, abc, *, cubic):
  """``X ← (aI + bA + cA²)·X``: the ``aX`` term folded into the polynomial.

  The update is then one GEMM whose (>= f32) accumulation is rounded once, as it is
  written, to ``x.dtype``; the polynomial is accumulated in the coefficients' dtype and
  rounded once. Against :func:`_ns_step_separate` this rounds the polynomial with its
  ``aI`` term: for a quintic that changes the rounding of its diagonal; a cubic's
  ``aI + bA`` is rounded where the separate form rounds no polynomial. At bf16 the result
  stays 2–6× closer to the float32 iteration than an all-bf16 one (optax.contrib's),
  measured by ``benchmarks/bench_xla_ns.py``.
  """
  dt = x.dtype
  acc = abc.dtype
  a, b, c = abc[0], abc[1], abc[2]
  poly = a * jnp.eye(gram.shape[-1], dtype=acc) + b * gram.astype(acc)
  if not cubic:  # a cubic (c == 0) needs no A², one GEMM fewer (NVIDIA's cubic path).
    poly = poly + c * _mm(gram, gram, acc)
  return _mm(_round_to(poly, dt), x, dt)


def _power_sigma_max(gram):
  """Lower-bound estimate of σ_max(X) = sqrt(λ_max(XXᵀ)) by power iteration on the Gram."""
  acc = _accum_dtype(gram.dtype)
  g = gram.astype(acc)
  m = g.shape[-1]
  # A fixed pseudo-random start: almost surely not orthogonal to the top eigenvector
  # (a constant vector can be, e.g. for [[1, -1], [-1, 1]]).
  v0 = jax.random.normal(jax.random.PRNGKey(0), (m,), dtype=acc)
  v = jnp.broadcast_to(v0, g.shape[:-1])

  def body(_, v):
    w = jnp.einsum("...ij,...j->...i", g, v)
    n = jnp.linalg.norm(w, axis=-1, keepdims=True)
    return jnp.where(n > 0, w / jnp.where(n > 0, n, 1), 0)

  v = body(0, v / jnp.linalg.norm(v0))
  v = lax.fori_loop(1, SPECTRAL_POWER_ITERATIONS, body, v)
  lam = jnp.linalg.norm(jnp.einsum("...ij,...j->...i", g, v), axis=-1)
  return jnp.sqrt(lam)[..., None, None]


def _aol_scales(gram, eps, acc):
  """Turbo-Muon's AOL factors ``s_r = 1/sqrt(max(Σ_j |A_rj|, eps))`` of a Gram matrix,
  in ``acc``."""
  rowsum = jnp.sum(jnp.abs(gram.astype(acc)), axis=-1)
  return lax.rsqrt(jnp.maximum(rowsum, eps))


def _precondition_first_step(x, preconditioning, eps):
  """Returns ``(X, A)``: the preconditioned X and its Gram matrix, reusing one GEMM."""
  dt = x.dtype
  acc = _accum_dtype(dt)
  gram = _step_gram(x)
  if preconditioning == "aol":
    # Turbo-Muon's AOL rescaling: s_r = 1/sqrt(max(Σ_j |A_rj|, eps)), X ← diag(s) X and
    # A ← diag(s) A diag(s) (the Gram of the rescaled X, without a second GEMM).
    # ‖diag(s) X‖₂ <= 1 by the AOL bound, so no Frobenius normalisation is needed.
    s = _aol_scales(gram, eps, acc)
    x = _round_to(s[..., :, None] * x.astype(acc), dt)
    gram = _round_to(s[..., :, None] * gram.astype(acc) * s[..., None, :], dt)
    return x, gram
  if preconditioning == "schatten":
    # ‖X‖_S4 = ‖XXᵀ‖_F^(1/2) >= σ_max: a tighter bound than ‖X‖_F, from the same Gram.
    scale = jnp.sqrt(jnp.sqrt(jnp.sum(jnp.square(gram.astype(acc)), axis=(-2, -1),
                                      keepdims=True)))
  elif preconditioning == "spectral":
    # X is already Frobenius-normalised (σ_max <= 1); never scale up past that bound.
    scale = jnp.minimum(SPECTRAL_SAFETY * _power_sigma_max(gram), 1.0)
  else:
    raise AssertionError(preconditioning)
  scale = jnp.where(scale > 0, scale, 1.0)
  x = _round_to(x.astype(acc) / scale, dt)
  gram = _round_to(gram.astype(acc) / jnp.square(scale), dt)
  return x, gram


def _orient_and_precondition(x, eps, preconditioning, compute_dtype):
  """Wide orientation + the elementwise part of the preconditioning (``None``: none,
  ``x`` is already preconditioned), behind :func:`_behind_barrier_on_cpu`."""
  transposed = x.shape[-2] > x.shape[-1]
  if transposed:
    x = _swap(x)
  if preconditioning == "aol":
    x = _aol_prescale(x, compute_dtype)
  elif preconditioning is not None:
    x = _frobenius_normalize(x, eps, compute_dtype)
  return _behind_barrier_on_cpu(x), transposed


def _checked_input(x, name="newton_schulz"):
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise ValueError(
        f"{name} needs an array of rank >= 2 (matrices on the last two axes), got "
        f"shape {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} needs a floating array, got dtype {x.dtype}.")
  return x


def newton_schulz(
    x: jax.Array,
    *,
    steps: int = 5,
    coefficients: Coefficients = "muon",
    order: str | None = None,
    preconditioning: str = "frobenius",
    eps: float = 1e-7,
    compute_dtype=jnp.bfloat16,
    backend: str = "auto",
) -> jax.Array:
  """Approximate polar factor of each matrix of ``x`` by Newton–Schulz iterations.

  Args:
    x: array of rank >= 2; the last two axes are the matrix ``(rows, cols)``, leading
      axes are a batch. Rows > cols are handled by working on the transpose.
    steps: number of NS steps (>= 1).
    coefficients: preset name (see :data:`ortho_optax.coefficients.PRESETS`) or a sequence
      of ``(a, b, c)`` triples.
    order: ``"cycle"`` | ``"repeat_last"`` | ``None`` (preset default), see
      :func:`ortho_optax.coefficients.resolve_coefficients`.
    preconditioning: how the singular values are brought below ~1 before the steps:
      ``"frobenius"``: ``X / (‖X‖_F + eps)`` per matrix (Muon);
      ``"aol"``: Turbo-Muon's AOL row scaling fused into step 1 (no Frobenius, ``eps``
      clamps the Gram row sums);
      ``"schatten"``: Frobenius, then division by ``‖XXᵀ‖_F^(1/2)`` (the Schatten-4 norm,
      >= σ_max) reusing step 1's Gram matrix;
      ``"spectral"``: Frobenius, then division by a power-iteration estimate of σ_max
      times :data:`SPECTRAL_SAFETY` (capped so it never scales up past Frobenius).
    eps: Frobenius normalisation epsilon (added to the norm) / AOL row-sum clamp.
    compute_dtype: dtype of the iterations (``None``: ``x.dtype``; names such as
      ``"bf16"`` or ``"float32"`` are accepted). Norms and scalars are accumulated in
      float32 (float64 for float64 inputs).
    backend: ``"xla"``, ``"pallas"`` (the Mosaic GPU kernels of :mod:`ortho_optax.pallas`;
      RuntimeError if unavailable) or ``"auto"`` (the kernels on a Hopper GPU for bf16
      compute, ``frobenius``/``aol`` preconditioning and a stack large enough for them to
      win, per ``ortho_optax.pallas.prefers_kernels``; XLA otherwise). See
      :mod:`ortho_optax.orthogonalizers`.

  Returns:
    An array of ``x``'s shape and dtype. An all-zero matrix maps to zeros.

  Raises:
    ValueError: for ``x.ndim < 2`` or bad arguments (naming the value and the choices).

  References:
    K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024,
    https://kellerjordan.github.io/posts/muon/; NVIDIA-NeMo/Emerging-Optimizers (coefficient
    sets); Amsel, Persson, Musco, Gower, "The Polar Express", arXiv 2505.16932, 2025;
    Boissin et al., "Turbo-Muon", arXiv 2512.04632, 2025 and thib-s/flash-newton-schulz
    (AOL preconditioning).
  """
  return newton_schulz_many([x], steps=steps, coefficients=coefficients, order=order,
                            preconditioning=preconditioning, eps=eps,
                            compute_dtype=compute_dtype, backend=backend)[0]


def uses_kernels(shape, dtype, *, preconditioning: str = "frobenius",
                 compute_dtype=jnp.bfloat16, backend: str = "auto") -> bool:
  """Whether :func:`newton_schulz` with these arguments runs a stack of ``shape`` and
  ``dtype`` on the Pallas kernels (``True``) or on XLA (``False``).

  Args:
    shape: the stack's shape ``(..., rows, cols)``, either orientation.
    dtype: the stack's dtype.
    preconditioning, compute_dtype, backend: as for :func:`newton_schulz`.

  Returns:
    ``True`` for the kernel path.

  Raises:
    RuntimeError, ValueError: those of ``backend="pallas"`` where the kernels cannot run.
  """
  from ortho_optax import orthogonalizers
  orth = orthogonalizers.newton_schulz_orthogonalizer(
      preconditioning=preconditioning, compute_dtype=compute_dtype, backend=backend)
  shape = tuple(shape[:-2]) + (min(shape[-2:]), max(shape[-2:]))
  return isinstance(orth, orthogonalizers.PallasNewtonSchulz) and orth.takes(shape, dtype)


def newton_schulz_of_transpose(
    y: jax.Array,
    *,
    steps: int = 5,
    coefficients: Coefficients = "muon",
    order: str | None = None,
    preconditioning: str = "frobenius",
    eps: float = 1e-7,
    compute_dtype=jnp.bfloat16,
    backend: str = "auto",
) -> jax.Array:
  """``newton_schulz(yᵀ)ᵀ`` (same arguments), without transposing ``y`` on the kernels.

  Orthogonalizes the matrices whose transposes are stored, e.g. square Flax kernels
  ``(in, out)`` in their ``(out, in)`` view. NS commutes with transposition
  (``Y·p(YᵀY) = p(YYᵀ)·Y``) and the Frobenius norm is transpose-invariant, so with
  Frobenius preconditioning the result is ``newton_schulz(y)``. AOL scales the rows of
  ``X = yᵀ``, the columns of ``y``, by ``s = rsqrt(rowsum|XXᵀ|)`` with ``XXᵀ = yᵀy``;
  after that rescale Turbo-Muon's first step is a plain NS step on ``diag(s)·X``, so the
  kernels continue on ``y·diag(s)`` (one extra Gram matrix, from cuBLAS, instead of two
  transposes of the stack). The XLA path transposes (it reproduces the goldens bit for
  bit that way).

  Args:
    y: array of rank >= 2 holding the transposes of the matrices to orthogonalize.
    steps, coefficients, order, preconditioning, eps, compute_dtype, backend: as for
      :func:`newton_schulz`.

  Returns:
    An array of ``y``'s shape and dtype.

  References:
    Boissin et al., "Turbo-Muon", arXiv 2512.04632, 2025 (AOL preconditioning).
  """
  return newton_schulz_many([y], of_transpose=[True], steps=steps, coefficients=coefficients,
                            order=order, preconditioning=preconditioning, eps=eps,
                            compute_dtype=compute_dtype, backend=backend)[0]


def newton_schulz_many(
    xs,
    *,
    of_transpose=None,
    steps: int = 5,
    coefficients: Coefficients = "muon",
    order: str | None = None,
    preconditioning: str = "frobenius",
    eps: float = 1e-7,
    compute_dtype=jnp.bfloat16,
    backend: str = "auto",
) -> list:
  """:func:`newton_schulz` (or :func:`newton_schulz_of_transpose`) of several arrays.

  The results are those of the one-array calls. On the Pallas kernels the arrays that
  take them share every GEMM launch (:func:`ortho_optax.pallas.newton_schulz_many`):
  a model's few stacks of matrices (a GPT-2's 48 768² and 24 768×3072) then run each
  step's three GEMMs as three launches whose tiles fill the GPU's waves together.

  Args:
    xs: arrays of rank >= 2 (any shapes and dtypes).
    of_transpose: per array, whether it holds the transposes of the matrices to
      orthogonalize (:func:`newton_schulz_of_transpose`); ``None``: none does.
    steps, coefficients, order, preconditioning, eps, compute_dtype, backend: as for
      :func:`newton_schulz`, shared by all arrays.

  Returns:
    A list of arrays of the inputs' shapes and dtypes.

  Raises:
    ValueError: those of :func:`newton_schulz`, or ``of_transpose`` of the wrong length.

  References:
    K. Jordan et al., "Muon", 2024; Boissin et al., "Turbo-Muon", arXiv 2512.04632, 2025.
  """
  from ortho_optax import orthogonalizers
  orth = orthogonalizers.newton_schulz_orthogonalizer(
      steps=steps, coefficients=coefficients, order=order, preconditioning=preconditioning,
      eps=eps, compute_dtype=compute_dtype, backend=backend)
  xs = [_checked_input(x) for x in xs]
  flips = [False] * len(xs) if of_transpose is None else [bool(f) for f in of_transpose]
  if len(flips) != len(xs):
    raise ValueError(f"of_transpose needs one flag per array: {len(flips)} flags, "
                     f"{len(xs)} arrays.")
  # A stack's orientation does not matter to the kernels' predicate (they take the wide
  # orientation): ask about the wide shape.
  stacks = []
  for x, flip in zip(xs, flips):
    wide = x.shape[:-2] + (min(x.shape[-2:]), max(x.shape[-2:]))
    on_kernels = isinstance(orth, orthogonalizers.PallasNewtonSchulz) and orth.takes(
        wide, x.dtype)
    stacks.append(orthogonalizers.Stack(x, flip, on_kernels))
  return orth.run_many(stacks)



@functools.partial(jax.jit, static_argnames=("preconditioning", "compute_dtype", "cubic"))
def _xla_newton_schulz(x, table, eps, *, preconditioning, compute_dtype, cubic):
  out_dtype = x.dtype
  X, transposed = _orient_and_precondition(x, eps, preconditioning, compute_dtype)
  rest = table
  if preconditioning != "frobenius":
    X, gram = _precondition_first_step(X, preconditioning, eps)
    X = _ns_step(X, gram, table[0], cubic)
    rest = table[1:]
  for abc in rest:  # unrolled: see the module docstring
    X = _ns_step(X, _step_gram(X), abc, cubic)
  if transposed:
    X = _swap(X)
  return X.astype(out_dtype)
