"""Gram Newton–Schulz on bf16 stacks with the Mosaic GPU kernels of :mod:`.matmul`.

The iteration of :mod:`ortho_optax.gram_newton_schulz` on the zero-padded stack ``X``
(``(batch, M, N)``, M <= N), in segments of ``restart_every`` steps; per segment:

1. ``R = X·Xᵀ``: upper tiles only, mirrored (``upper=True``, right operand transposed);
   in the first segment with ``aol=True``, Turbo-Muon's AOL rescaling follows,
   ``X ← diag(s) X``, ``R ← diag(s) R diag(s)`` (:func:`.ns.aol_rescale`);
2. per step ``(a, b, c)``, every product of two symmetric polynomials in ``R`` (they
   commute, so the product is symmetric too) on the upper tiles:

   * ``Z = b·R + c·R·R`` (``b·R`` in the epilogue); cubic (``c == 0``): ``Z = b·R`` is
     not formed, the products below take ``R`` with ``beta = b``;
   * ``Q = a·I + Z`` in the segment's first step (elementwise), ``Q ← a·Q + Q·Z`` after;
   * unless it is the segment's last step, ``W = a·R + R·Z`` and ``R ← a·W + Z·W``
     (``R ← (aI + Z) R (aI + Z)``); the ``Q`` and ``W`` products share a launch;
3. ``X ← Q·X`` (every tile).

``W`` is the one operand read as it is stored rather than transposed: the sandwich
``(aI + Z)·(R·(aI + Z))`` is symmetric whatever rounding did to the commutation of ``R``
and ``Z``, while ``Z·Wᵀ`` is only symmetric where they commute, and in bf16 that error
compounds. Emulated in bf16 (384×1536, σ over 3 to 6 decades, 5 steps, no restart) the
``Z·Wᵀ`` form ended 1.6–8× farther from the polar factor than ``Z·W`` for the muon and Polar
Express tables; with the default restart every 2 steps both match standard NS.

A segment of ``L`` steps costs ``3·M²N`` flops (half a Gram and the full ``Q·X``) and
``M³`` per product of step 2: at ``N = 4M`` and 5 muon steps restarted every 2, about
0.72× the one-triangle flops of :func:`.ns.newton_schulz`.

Zero padding is exact: zero rows/columns of ``X`` give zero rows/columns of ``R``,
``Z`` and ``W``, and the identity of ``Q = a·I + Z`` covers the ``m`` rows of the
matrix only, so ``Q`` is zero there too.

References:
  J. Zhang, N. Amsel, B. Chen, T. Dao, "Gram Newton-Schulz", 2026,
  https://github.com/Dao-AILab/gram-newton-schulz; Jordan et al., *Muon*, 2024;
  Boissin et al., *Turbo-Muon*, arXiv 2512.04632, 2025.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from ortho_optax import validation
from ortho_optax.pallas import matmul as mm
from ortho_optax.pallas import ns

#: Steps between restarts (``X ← QX``, ``R ← XXᵀ``, ``Q ← I``) by default, as
#: :data:`ortho_optax.gram_newton_schulz.DEFAULT_RESTART_EVERY`.
DEFAULT_RESTART_EVERY = 2


def _segments(triples, restart_every):
  """The coefficient triples in runs of ``restart_every`` (``None``: one run)."""
  every = len(triples) if restart_every is None else restart_every
  return [triples[i:i + every] for i in range(0, len(triples), every)]


def _identity(padded: int, m: int):
  """``I`` on the first ``m`` of ``padded`` rows (zero on the padding), float32."""
  return jnp.diag((jnp.arange(padded) < m).astype(jnp.float32))


def _iterate(Xs, sizes, triples, *, restart_every, aol, eps, run):
  """Gram NS of the padded stacks ``Xs`` (real row counts ``sizes``), see the module
  docstring; ``run(products, kind)`` computes a list of :class:`.matmul.Product`
  (``kind`` is ``"gram"``, ``"poly"`` or ``"apply"``, the config it needs)."""
  Xs = list(Xs)
  sym = dict(rhs_transposed=True, upper=True)
  for segment_index, segment in enumerate(_segments(triples, restart_every)):
    Rs = run([mm.Product(X, X, **sym) for X in Xs], "gram")
    if segment_index == 0:
      for j, flag in enumerate(aol):
        if flag:
          Xs[j], Rs[j] = ns.aol_rescale(Xs[j], Rs[j], eps)
    for step, (a, b, c) in enumerate(segment):
      last = step == len(segment) - 1
      if c == 0.0:  # cubic: Z = b·R, folded into the products as (R, beta=b)
        Zs, zb = Rs, b
      else:
        Zs, zb = run([mm.Product(R, R, R, alpha=b, beta=c, **sym) for R in Rs], "poly"), 1.0
      if step == 0:  # Q = a·I + Z
        Qs = [(a * _identity(Z.shape[-1], m) + zb * Z.astype(jnp.float32)).astype(jnp.bfloat16)
              for Z, m in zip(Zs, sizes)]
        products = []
      else:  # Q ← a·Q + Q·Z
        products = [mm.Product(Q, Z, Q, alpha=a, beta=zb, **sym) for Q, Z in zip(Qs, Zs)]
      if not last:  # W = a·R + R·Z, in the same launch
        products += [mm.Product(R, Z, R, alpha=a, beta=zb, **sym) for R, Z in zip(Rs, Zs)]
      outs = run(products, "poly") if products else []
      if step:
        Qs, outs = outs[:len(Xs)], outs[len(Xs):]
      if not last:  # R ← a·W + Z·W, W as computed (see the module docstring)
        Rs = run([mm.Product(Z, W, W, alpha=a, beta=zb, upper=True) for Z, W in zip(Zs, outs)],
                 "poly")
    Xs = run([mm.Product(Q, X) for Q, X in zip(Qs, Xs)], "apply")
  return Xs


def _checked(x, coefficients, restart_every):
  triples = ns._validate(x, coefficients)
  if restart_every is not None:
    validation.check_int("restart_every", restart_every, minimum=1)
  return triples


def _require_kernels(name):
  from ortho_optax import pallas
  if not (pallas.is_available() or ns._interpreting()):
    raise RuntimeError(
        f"ortho_optax.pallas.{name} needs a Hopper GPU (sm_90) with Mosaic GPU Pallas; use "
        f"ortho_optax.gram_newton_schulz(..., backend='xla') elsewhere.")


def _pad(x):
  batch, m, n = x.shape
  mp, np_ = mm.round_up(m, ns.PAD), mm.round_up(n, ns.PAD)
  return x if (mp, np_) == (m, n) else jnp.pad(x, ((0, 0), (0, mp - m), (0, np_ - n)))


def gram_newton_schulz(x: jax.Array, coefficients: Sequence[Sequence[float]], *,
                       restart_every: int | None = DEFAULT_RESTART_EVERY, aol: bool = False,
                       eps: float = 1e-7, config: ns.NSConfig | None = None) -> jax.Array:
  """Gram Newton–Schulz steps on a bf16 stack with the Hopper kernels.

  Args:
    x: ``(batch, m, n)`` bf16 with ``m <= n``, already Frobenius-normalised unless
      ``aol`` (then the first Gram matrix applies the AOL rescaling).
    coefficients: static tuple of ``(a, b, c)`` Python-float triples, one per step.
    restart_every: steps between restarts (``None``: never).
    aol: apply Turbo-Muon's AOL preconditioning in the first step.
    eps: AOL row-sum clamp.
    config: per-GEMM tile configs for the padded shape (default: :func:`.ns.plan`, whose
      ``gram``/``poly``/``apply`` shapes are those of Gram NS's ``XXᵀ``, ``m × m``
      products and ``QX``).

  Returns:
    ``(batch, m, n)`` bf16.
  """
  triples = _checked(x, coefficients, restart_every)
  _require_kernels("gram_newton_schulz")
  batch, m, n = x.shape
  if batch == 0 or m == 0:
    return x
  X = _pad(x)
  cfg = config or ns.plan(*X.shape)
  upper = cfg.symmetric != "full"
  mirror = "xla" if cfg.symmetric == "xla" else "kernel"
  configs = {"gram": cfg.gram, "poly": cfg.poly, "apply": cfg.apply}

  def run(products, kind):
    return [mm.matmul(p.lhs, p.rhs, p.add, alpha=p.alpha, beta=p.beta,
                      rhs_transposed=p.rhs_transposed, upper=p.upper and upper,
                      mirror=mirror, config=configs[kind]) for p in products]

  if aol:
    # As in ns.newton_schulz: the AOL rescale must not rebuild X's producer.
    X = jax.lax.optimization_barrier(X)
  (X,) = _iterate([X], [m], triples, restart_every=restart_every, aol=[aol], eps=eps,
                  run=run)
  return X[:, :m, :n]


def gram_newton_schulz_many(xs: Sequence[jax.Array], coefficients: Sequence[Sequence[float]],
                            *, restart_every: int | None = DEFAULT_RESTART_EVERY,
                            aol: Sequence[bool] | bool = False, eps: float = 1e-7,
                            config: mm.TuningConfig | None = None) -> list[jax.Array]:
  """:func:`gram_newton_schulz` of several stacks, each GEMM one launch for all.

  As :func:`.ns.newton_schulz_many`: the stacks' products of a step share one
  :func:`.matmul.grouped_matmul` launch (an LPT schedule over all their tiles), and
  stacks with a measured plan in :data:`.ns.TUNED` (large single matrices) keep it and
  run alone.

  Args:
    xs: bf16 ``(batch, m, n)`` stacks with ``m <= n``, as for :func:`gram_newton_schulz`.
    coefficients: static ``(a, b, c)`` triples, shared by all stacks.
    restart_every: steps between restarts (``None``: never), shared by all stacks.
    aol: per stack (or one for all), AOL preconditioning in the first step.
    eps: AOL row-sum clamp.
    config: tile config of the grouped launches (default ``TuningConfig()``; split-K 1).

  Returns:
    The results, in order.
  """
  xs = list(xs)
  flags = ns.aol_flags(aol, len(xs))
  triples = None
  for x in xs:
    triples = _checked(x, coefficients, restart_every)
  kw = dict(restart_every=restart_every, eps=eps)
  grouped = ns.grouped_indices(xs)
  outs = [None if i in grouped else gram_newton_schulz(x, triples, aol=flags[i], **kw)
          for i, x in enumerate(xs)]
  if not grouped:
    return outs
  _require_kernels("gram_newton_schulz_many")
  cfg = config or mm.TuningConfig()
  # As in ns.newton_schulz_many: the AOL rescale must not rebuild X's producer.
  Xs = [jax.lax.optimization_barrier(_pad(xs[i])) if flags[i] else _pad(xs[i])
        for i in grouped]
  results = _iterate(Xs, [xs[i].shape[1] for i in grouped], triples,
                     aol=[flags[i] for i in grouped],
                     run=lambda products, kind: mm.grouped_matmul(products, config=cfg), **kw)
  for i, X in zip(grouped, results):
    outs[i] = X[:, :xs[i].shape[1], :xs[i].shape[2]]
  return outs
