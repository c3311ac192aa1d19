"""Polar factors beyond plain Newton–Schulz: exact SVD polar, Aurora's polar and its
leverage-balanced variants, and AuON's cosh normalisation.

All matrix functions work on the last two axes with any leading batch axes and return
``x.dtype``.

References:
  Aurora: tilde-research/aurora-release (``src/polar.py``, ``src/aurora.py``,
  ``src/riemannian_aurora.py``).
  AuON: ryyzn9/AuON (``auon/optimizer.py``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from ortho_optax import validation
from ortho_optax.newton_schulz import _accum_dtype, _scale_by_pow2, _swap, newton_schulz

#: Aurora's polar normalises by ``‖X‖_F + 1e-7`` (hard-coded in the reference).
AURORA_POLAR_EPS = 1e-7


def _check_matrix(x, name):
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise ValueError(f"{name} needs an array of rank >= 2 (matrices on the last two axes), "
                     f"got shape {x.shape}.")
  return x


def polar(x: jax.Array) -> jax.Array:
  """Exact polar factor ``U Vᵀ`` of each matrix (``x = U Σ Vᵀ``) via an SVD.

  Computed in float32 (float64 for float64 input). Directions whose singular value is
  numerically zero (``σ <= max(m, n) · eps · σ_max``, numpy's rank tolerance) are dropped,
  so the polar factor of a rank-deficient matrix is the partial isometry on its range,
  like the limit of Newton–Schulz; an all-zero matrix maps to zeros.

  Args:
    x: array of rank >= 2.

  Returns:
    An array of ``x``'s shape and dtype.

  References:
    N. J. Higham, "Functions of Matrices: Theory and Computation", SIAM, 2008, ch. 8
    (the polar decomposition).
  """
  x = _check_matrix(x, "polar")
  acc = _accum_dtype(x.dtype)
  u, s, vh = jnp.linalg.svd(x.astype(acc), full_matrices=False)
  tol = max(x.shape[-2:]) * jnp.finfo(acc).eps * s[..., :1]
  keep = (s > tol).astype(acc)
  return jnp.matmul(u * keep[..., None, :], vh,
                    precision=lax.Precision.HIGHEST).astype(x.dtype)


def aurora_polar(x: jax.Array, steps: int = 12, compute_dtype=jnp.bfloat16,
                 backend: str = "auto") -> jax.Array:
  """Aurora's ``polar``: ``X/(‖X‖_F + 1e-7)`` then ``steps`` × ``(2, −1.5, 0.5)``.

  ``p(σ) = 2σ − 1.5σ³ + 0.5σ⁵`` has fixed points 0, 1, √2 and ``p'(1) = 0``; it converges
  quadratically near 1, and singular values below ~2⁻¹² are not brought to 1 in 12 steps.
  The reference always runs in bfloat16 and returns bfloat16; here the iterations run in
  ``compute_dtype`` (``None``: ``x.dtype``) and the result has ``x.dtype``.

  Args:
    x: array of rank >= 2 (rows > cols are transposed internally).
    steps: number of iterations (12 in Aurora).
    compute_dtype: dtype of the iterations.
    backend: see :func:`ortho_optax.newton_schulz.newton_schulz`.

  Returns:
    An array of ``x``'s shape and dtype: the approximate polar factor of each matrix.

  References:
    "Aurora: A Leverage-Aware Spectral Optimizer", arXiv 2606.27715, 2026 (Tilde
    Research); tilde-research/aurora-release ``src/aurora.py``.
  """
  x = _check_matrix(x, "aurora_polar")
  return newton_schulz(x, steps=steps, coefficients="aurora", preconditioning="frobenius",
                       eps=AURORA_POLAR_EPS, compute_dtype=compute_dtype, backend=backend)


def _to_tall(x):
  """Transposes wide matrices so the long side is the rows; returns (y, transposed)."""
  transposed = x.shape[-2] < x.shape[-1]
  return (_swap(x) if transposed else x), transposed


def _row_norm(y):
  """Euclidean norm of each row (keepdims), without overflow or underflow.

  The plain ``sqrt(Σ y²)`` overflows float32 for entries past ~1e19 (a row norm of inf
  makes Aurora's ``D₀ = 1/‖Y_i‖`` zero and the whole update silently zero); such rows
  (and rows whose squares underflow) are rescaled by a power of two near their
  max-abs first (row norms above the dtype's max stay inf). Rows of
  ordinary scale keep the plain formula bit for bit.
  """
  plain = jnp.sqrt(jnp.sum(jnp.square(y), axis=-1, keepdims=True))
  info = jnp.finfo(y.dtype)
  big = jnp.max(jnp.abs(y), axis=-1, keepdims=True, initial=0.0)
  ok = jnp.logical_and(plain >= 16 * jnp.sqrt(info.tiny), plain <= info.max)
  # max|y_i| = m·2^e, m in [0.5, 1): scale by the exact power of two 2^(1-e).
  _, e = jnp.frexp(jnp.where(jnp.logical_and(big > 0, jnp.isfinite(big)), big, 1.0))
  ys = _scale_by_pow2(y, 1 - e)
  scaled = _scale_by_pow2(jnp.sqrt(jnp.sum(jnp.square(ys), axis=-1, keepdims=True)), e - 1)
  return jnp.where(jnp.logical_or(ok, jnp.logical_not(jnp.isfinite(big))), plain, scaled)


def leverage_uniform_polar(
    x: jax.Array,
    *,
    pp_iterations: int = 2,
    pp_beta: float = 0.5,
    eps: float = 1e-7,
    compute_dtype=jnp.bfloat16,
    steps: int = 12,
    backend: str = "auto",
) -> jax.Array:
  """Aurora's leverage-uniform polar factor.

  Square matrices: plain :func:`aurora_polar`. Non-square: work on the tall orientation
  ``Y`` (m × n, m > n) in float32 and find a row scaling ``D`` such that the polar factor
  ``P = polar(D Y)`` has uniform row norms² ``n/m`` (equal leverage): start from
  ``D₀ = 1/max(‖Y_i‖, eps)`` and, between the ``pp_iterations`` polar evaluations, update
  ``D ← D · (n/m / max(‖P_i‖², eps²))^pp_beta``. ``pp_iterations = 1`` is the polar of
  the row-normalised matrix. Unlike the reference (2-D only), leading batch axes are
  supported; each matrix is balanced independently.

  Args:
    x: array of rank >= 2.
    pp_iterations: number of polar evaluations (>= 1).
    pp_beta: damping exponent of the row re-weighting (0.5 = undamped square root).
    eps: clamp for row norms.
    compute_dtype: dtype of the inner Aurora polar iterations.
    steps: Aurora polar iterations per evaluation (12 in the reference).
    backend: see :func:`ortho_optax.newton_schulz.newton_schulz`.

  Returns:
    An array of ``x``'s shape and dtype (the aspect-ratio factor is NOT applied).

  References:
    "Aurora: A Leverage-Aware Spectral Optimizer", arXiv 2606.27715, 2026 (Tilde
    Research); tilde-research/aurora-release ``src/aurora.py``.
  """
  x = _check_matrix(x, "leverage_uniform_polar")
  validation.check_int("pp_iterations", pp_iterations, minimum=1)
  validation.check_positive("pp_beta", pp_beta)
  validation.check_positive("eps", eps)
  if x.shape[-2] == x.shape[-1]:
    return aurora_polar(x, steps=steps, compute_dtype=compute_dtype, backend=backend)
  acc = _accum_dtype(x.dtype)
  return _leverage_uniform_polar_jit(
      x, jnp.asarray(pp_beta, acc), jnp.asarray(eps, acc), pp_iterations=pp_iterations,
      compute_dtype=compute_dtype, steps=steps, backend=backend)


@functools.partial(jax.jit, static_argnames=("pp_iterations", "compute_dtype", "steps",
                                             "backend"))
def _leverage_uniform_polar_jit(x, pp_beta, eps, *, pp_iterations, compute_dtype, steps,
                                backend):
  polar_fn = lambda y: aurora_polar(y, steps=steps, compute_dtype=compute_dtype, backend=backend)
  y, transposed = _to_tall(x)
  m, n = y.shape[-2:]
  acc = _accum_dtype(x.dtype)
  y = y.astype(acc)
  target_row_sq = n / m  # a tall polar factor has ‖·‖_F² = n, spread over m rows
  d = 1.0 / jnp.maximum(_row_norm(y), eps)
  p = None
  for k in range(pp_iterations):
    p = polar_fn(d * y)
    if k < pp_iterations - 1:
      row_sq = jnp.maximum(jnp.sum(jnp.square(p), axis=-1, keepdims=True), eps * eps)
      d = d * (target_row_sq / row_sq) ** pp_beta
  if transposed:
    p = _swap(p)
  return p.astype(x.dtype)


def _hp_matmul(a, b):
  return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)


#: Largest ``batch * m * m`` (elements: 1 GiB in float32, 2 GiB in float64) for which the
#: CG operator of :func:`_solve_row_norm_multipliers` is formed explicitly.
EXPLICIT_CG_OPERATOR_ELEMENTS = 2**28


def explicit_cg_operator(batch: int, m: int, n: int, cg_steps: int) -> bool:
  """Whether the CG of a ``batch`` of tall ``m x n`` matrices forms ``P∘P`` (``m x m``).

  Formed, it costs one ``m x n x m`` product and then a matrix-vector product per CG
  iteration, so the iterations run as a fixed-count loop (no host round trip per
  iteration on a GPU, where a ``while`` loop reads its predicate back every iteration).
  Implicit, every iteration costs two ``m x n x n`` products and the loop exits early.
  Formed when it costs at most the implicit loop run to ``cg_steps`` iterations
  (``m <= 2 cg_steps n``; the early exit is not counted) and fits
  :data:`EXPLICIT_CG_OPERATOR_ELEMENTS`. ``batch`` is the stack of one call: a
  ``jax.vmap`` over the call multiplies the memory without this check seeing it.
  """
  return batch * m * m <= EXPLICIT_CG_OPERATOR_ELEMENTS and m <= 2 * cg_steps * n


def _solve_row_norm_multipliers(u, r, q, cg_steps, explicit):
  """CG for ``(r_eff I − P∘P) λ = q`` with ``P = UUᵀ`` (one matrix).

  ``r_eff = r + max(0, max_i ‖U_i‖⁴ − r + 1e-3)`` regularises the operator. CG starts
  from 0 and stops (as the reference's ``break``s) when ``pᵀAp < 1e-30``, when the
  residual norm² is non-finite, or when ``‖res‖ < 1e-8 · max(‖q‖, 1e-12)``. A
  non-finite solution is replaced by zeros. ``explicit`` (see
  :func:`explicit_cg_operator`) forms ``P∘P`` and runs ``cg_steps`` iterations whose
  updates stop at the first stop condition, which is the early exit's result; otherwise
  ``P`` is never formed and the loop exits early.
  """
  h_sq = jnp.square(jnp.sum(jnp.square(u), axis=-1))
  r_eff = r + jnp.maximum(jnp.max(h_sq) - r + 1e-3, 0.0)

  if explicit:
    pp = jnp.square(_hp_matmul(u, _swap(u)))  # (P∘P)_ij = (U_i · U_j)², (m, m)
    matvec = lambda v: r_eff * v - _hp_matmul(pp, v[:, None])[:, 0]
  else:
    def matvec(v):
      t = _hp_matmul(_swap(u), v[:, None] * u)  # Uᵀ diag(v) U, (n, n)
      return r_eff * v - jnp.sum(_hp_matmul(u, t) * u, axis=-1)

  q_norm = jnp.maximum(jnp.linalg.norm(q), 1e-12)

  def body(state):
    it, sol, res, p, rs_old, stop = state
    ap = matvec(p)
    denom = jnp.sum(p * ap)
    positive = jnp.logical_not(denom < 1e-30)  # NaN proceeds, as in the reference
    proceed = jnp.logical_and(jnp.logical_not(stop), positive)
    alpha = rs_old / jnp.where(proceed, denom, 1.0)
    sol = jnp.where(proceed, sol + alpha * p, sol)
    res = jnp.where(proceed, res - alpha * ap, res)
    rs_new = jnp.sum(res * res)
    stop = jnp.logical_or(stop, jnp.logical_not(positive))
    stop = jnp.logical_or(stop, jnp.logical_not(jnp.isfinite(rs_new)))
    stop = jnp.logical_or(stop, jnp.sqrt(rs_new) < 1e-8 * q_norm)
    p = jnp.where(stop, p, res + (rs_new / jnp.maximum(rs_old, 1e-30)) * p)
    rs_old = jnp.where(stop, rs_old, rs_new)
    return it + 1, sol, res, p, rs_old, stop

  init = (jnp.asarray(0, jnp.int32), jnp.zeros_like(q), q, q, jnp.sum(q * q),
          jnp.asarray(False))
  if explicit:
    _, sol, _, _, _, _ = lax.fori_loop(0, cg_steps, lambda _, st: body(st), init)
  else:
    # The reference's early exit, as a while loop (on a GPU every iteration waits for
    # the host to read the predicate).
    def cond(state):
      it, _, _, _, _, stop = state
      return jnp.logical_and(it < cg_steps, jnp.logical_not(stop))
    _, sol, _, _, _, _ = lax.while_loop(cond, body, init)
  return jnp.where(jnp.all(jnp.isfinite(sol)), sol, jnp.zeros_like(sol))


def _riemannian_balanced_polar_stack(g, outer_steps, cg_steps, riemannian_eta,
                                     retraction_steps, eps, polar_fn, explicit_cg):
  """A stack ``(b, m, n)`` of tall float matrices -> their approximately balanced-Stiefel
  polar factors. Every matrix is independent (its own CG early exits and non-finite
  break); the polar calls take the whole stack, so they run on the kernels where
  :func:`ortho_optax.newton_schulz.newton_schulz` would."""
  _, m, n = g.shape
  r = n / m
  target_row_norm = math.sqrt(r)
  solve = jax.vmap(lambda u, q: _solve_row_norm_multipliers(u, r, q, cg_steps, explicit_cg))
  per_matrix = lambda flag: flag[:, None, None]
  u0 = polar_fn(g)

  def retract(_, y):
    y = y * (target_row_norm / jnp.maximum(_row_norm(y), eps))
    return polar_fn(y)

  def outer(_, carry):
    u, done = carry
    utg = _hp_matmul(_swap(u), g)
    b = 0.5 * (utg + _swap(utg))
    q = jnp.sum(g * u, axis=-1) - jnp.sum(_hp_matmul(u, b) * u, axis=-1)
    q = q - jnp.mean(q, axis=-1, keepdims=True)
    lam = solve(u, q)
    lam = lam - jnp.mean(lam, axis=-1, keepdims=True)
    s = b - _hp_matmul(_swap(u), lam[..., None] * u)
    z = g - _hp_matmul(u, s) - lam[..., None] * u
    # The reference `break`s out of the outer loop when Z is non-finite.
    done = jnp.logical_or(done, jnp.logical_not(jnp.all(jnp.isfinite(z), axis=(-2, -1))))
    y = u + riemannian_eta * jnp.where(per_matrix(done), 0.0, z)
    y = lax.fori_loop(0, retraction_steps, retract, y)
    return jnp.where(per_matrix(done), u, y), done

  u, _ = lax.fori_loop(0, outer_steps, outer, (u0, jnp.zeros(g.shape[:1], bool)))
  return u


def riemannian_balanced_polar(
    x: jax.Array,
    *,
    outer_steps: int = 3,
    cg_steps: int = 20,
    riemannian_eta: float = 0.1,
    retraction_steps: int = 2,
    eps: float = 1e-7,
    compute_dtype=jnp.bfloat16,
    steps: int = 12,
    backend: str = "auto",
) -> jax.Array:
  """Riemannian Aurora's balanced polar factor.

  Approximately solves ``max_U ⟨G, U⟩`` s.t. ``UᵀU = I_n`` and ``‖U_i‖² = n/m`` for a tall
  ``G`` (wide inputs are transposed): from ``U = polar(G)``, ``outer_steps`` Riemannian
  ascent steps whose row-norm Lagrange multipliers come from ``cg_steps`` of CG, each
  followed by ``retraction_steps`` rounds of (row normalisation, Aurora polar). Square
  matrices have no leverage freedom and get :func:`aurora_polar`, as in
  ``riemannian_aurora``. The reference is 2-D only; here the matrices of a stack are
  independent (each keeps its own CG stop) and the polar calls take the whole stack. The
  CG forms ``P∘P`` (a ``batch x m x m`` temporary, up to 1 GiB) where that is cheaper,
  see :func:`explicit_cg_operator`.

  Args:
    x: array of rank >= 2.
    outer_steps: Riemannian ascent steps.
    cg_steps: maximum CG iterations per ascent step.
    riemannian_eta: ascent step size.
    retraction_steps: (row normalisation, polar) rounds per ascent step.
    eps: clamp of row norms.
    compute_dtype: dtype of the inner Aurora polar iterations.
    steps: Aurora polar iterations per evaluation.
    backend: see :func:`ortho_optax.newton_schulz.newton_schulz`.

  Returns:
    An array of ``x``'s shape and dtype (the aspect-ratio factor is NOT applied).

  References:
    "Aurora: A Leverage-Aware Spectral Optimizer", arXiv 2606.27715, 2026 (Tilde
    Research); tilde-research/aurora-release ``src/riemannian_aurora.py``.
  """
  x = _check_matrix(x, "riemannian_balanced_polar")
  validation.check_int("outer_steps", outer_steps, minimum=0)
  validation.check_int("cg_steps", cg_steps, minimum=0)
  validation.check_int("retraction_steps", retraction_steps, minimum=0)
  validation.check_non_negative("riemannian_eta", riemannian_eta)
  validation.check_positive("eps", eps)
  if x.shape[-2] == x.shape[-1]:
    return aurora_polar(x, steps=steps, compute_dtype=compute_dtype, backend=backend)
  if x.size == 0:  # an empty stack or a 0 x n matrix: nothing to balance
    return x
  m, n = max(x.shape[-2:]), min(x.shape[-2:])
  explicit_cg = explicit_cg_operator(math.prod(x.shape[:-2]), m, n, cg_steps)
  return _riemannian_balanced_polar_jit(
      x, jnp.asarray(riemannian_eta, _accum_dtype(x.dtype)),
      jnp.asarray(eps, _accum_dtype(x.dtype)), outer_steps=outer_steps, cg_steps=cg_steps,
      retraction_steps=retraction_steps, compute_dtype=compute_dtype, steps=steps,
      backend=backend, explicit_cg=explicit_cg)


# Jitted so that an eager call compiles once instead of dispatching op by op; inside an
# outer jit this inlines. The step counts, dtypes and the CG form are static, eta and eps
# traced.
@functools.partial(jax.jit, static_argnames=("outer_steps", "cg_steps", "retraction_steps",
                                             "compute_dtype", "steps", "backend",
                                             "explicit_cg"))
def _riemannian_balanced_polar_jit(x, riemannian_eta, eps, *, outer_steps, cg_steps,
                                   retraction_steps, compute_dtype, steps, backend,
                                   explicit_cg):
  polar_fn = lambda y: aurora_polar(y, steps=steps, compute_dtype=compute_dtype, backend=backend)
  y, transposed = _to_tall(x)
  acc = _accum_dtype(x.dtype)
  lead = y.shape[:-2]
  stack = y.astype(acc).reshape((-1,) + y.shape[-2:])
  out = _riemannian_balanced_polar_stack(
      stack, outer_steps, cg_steps, riemannian_eta, retraction_steps, eps,
      lambda v: polar_fn(v).astype(acc), explicit_cg).reshape(lead + y.shape[-2:])
  if transposed:
    out = _swap(out)
  return out.astype(x.dtype)


def cosh_normalize(x: jax.Array, gamma: float = 1.5) -> jax.Array:
  """AuON's cosh normalisation of a whole tensor (any rank): ``G / (r + 1e-8)``.

  ``n = ‖G‖`` over all elements, ``Ĝ = γ G / (n + 1e-7)`` and
  ``r = sqrt(mean(cosh(Ĝ)²))``, so ``1 <= r <= sqrt(1 + sinh²(γ)/N)``: a mild scalar
  brake, not a normalisation to unit norm. When ``n == 0`` AuON
  skips the parameter update, which is returned here as an all-zero update.

  Args:
    x: array of any rank.
    gamma: the γ of AuON (1.5 by default).

  Returns:
    An array of ``x``'s shape and dtype (computed in >= float32).

  References:
    D. Maity, "AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates",
    arXiv 2509.24320, 2025; ryyzn9/AuON ``auon/optimizer.py``.
  """
  x = jnp.asarray(x)
  validation.check_non_negative("gamma", gamma)
  acc = _accum_dtype(x.dtype)
  g = x.astype(acc)
  norm = jnp.sqrt(jnp.sum(jnp.square(g)))
  g_hat = gamma * g / (norm + 1e-7)
  r = jnp.sqrt(jnp.mean(jnp.square(jnp.cosh(g_hat))))
  out = jnp.where(norm == 0, jnp.zeros_like(g), g / (r + 1e-8))
  return out.astype(x.dtype)
