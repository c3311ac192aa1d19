"""Newton–Schulz on bf16 stacks with the Mosaic GPU kernels of :mod:`.matmul`.

Per step ``(a, b, c)`` on the zero-padded stack ``X`` (``(batch, M, N)``, M <= N):

1. ``A = X·Xᵀ``: upper tiles only, mirrored (``upper=True``, right operand transposed);
2. ``B = b·A + c·A·A``: ``A·A = A·Aᵀ`` (A symmetric) as in 1, with ``b·A`` in the
   epilogue; for a cubic step (``c == 0``) this GEMM is skipped;
3. ``X ← a·X + B·X`` (``a·X`` in the epilogue; ``X ← a·X + b·A·X`` when cubic).

With ``aol=True`` the first step first rescales with Turbo-Muon's AOL factors from the
first Gram matrix, ``s = rsqrt(max(rowsum|A|, eps))``, ``X ← diag(s) X`` and
``A ← diag(s) A diag(s)`` (a small XLA reduction and two fused elementwise passes).

Zero padding is exact: zero rows/columns of X stay zero through every step (and AOL maps
a zero row sum to a finite ``1/sqrt(eps)`` times a zero row).

References:
  Jordan et al., *Muon*, 2024; Boissin et al., *Turbo-Muon*, arXiv 2512.04632, 2025.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from ortho_optax.pallas import matmul as mm

#: Matrix dimensions are padded to multiples of this (one CTA tile of 128 × 256).
PAD = 256


@dataclasses.dataclass(frozen=True)
class NSConfig:
  """Per-GEMM tuning configs of one NS call (default: chosen by :func:`plan`).

  ``symmetric``: how the two symmetric products are computed: ``"kernel"`` (upper tiles,
  mirrored in the epilogue), ``"xla"`` (upper tiles, mirrored by an XLA select) or
  ``"full"`` (every tile computed).
  """
  gram: mm.TuningConfig
  poly: mm.TuningConfig
  apply: mm.TuningConfig
  symmetric: str = "kernel"


#: Per-GEMM configs measured fastest for a padded ``(batch, m, n)`` stack on an H200
#: (``python benchmarks/bench_kernels.py --tune``, 2026-11-28, raw sweep in
#: ``benchmarks/results/bench_kernels_h200_tune_run6.json``). Only wins of more than 3%
#: over the default config are kept; :func:`plan`'s cost model covers every other shape.
#: Gains per GEMM: the Gram of a 1024×4096 with the banded epilogue and a 4th stage
#: 0.041 → 0.030 ms, 2048² Gram 0.052 → 0.044 and apply (addend prefetch) 0.051 → 0.047,
#: 4096² polynomial 0.182 → 0.170, 8192² polynomial 0.871 → 0.815 and apply 1.84 → 1.75.
TUNED: dict[tuple[int, int, int], NSConfig] = {
    (1, 1024, 4096): NSConfig(
        gram=mm.TuningConfig(epilogue_rows=64, max_concurrent_steps=4, split_k=4),
        poly=mm.TuningConfig(split_k=4), apply=mm.TuningConfig()),
    (1, 2048, 2048): NSConfig(
        gram=mm.TuningConfig(epilogue_rows=64, max_concurrent_steps=4),
        poly=mm.TuningConfig(), apply=mm.TuningConfig(prefetch_add=True)),
    (1, 4096, 4096): NSConfig(
        gram=mm.TuningConfig(),
        poly=mm.TuningConfig(epilogue_rows=64, max_concurrent_steps=4),
        apply=mm.TuningConfig()),
    (1, 8192, 8192): NSConfig(
        gram=mm.TuningConfig(), poly=mm.TuningConfig(prefetch_add=True),
        apply=mm.TuningConfig(prefetch_add=True)),
}


def plan(batch: int, m: int, n: int, base: mm.TuningConfig | None = None,
         symmetric: str = "kernel") -> NSConfig:
  """Tile/split configs for a padded ``(batch, m, n)`` stack (m <= n, both % PAD == 0).

  A measured entry of :data:`TUNED` wins when no ``base`` is given; otherwise each GEMM
  gets ``base`` with the ``split_k`` of :func:`matmul.pick_split`'s cost model.
  """
  if base is None and symmetric == "kernel" and (batch, m, n) in TUNED:
    return TUNED[(batch, m, n)]
  base = base or mm.TuningConfig()
  upper = symmetric != "full"
  return NSConfig(
      gram=mm.pick_split(batch, m, m, n, upper=upper, base=base),
      poly=mm.pick_split(batch, m, m, m, upper=upper, base=base),
      apply=mm.pick_split(batch, m, n, m, upper=False, base=base),
      symmetric=symmetric,
  )


def _interpreting() -> bool:
  """True inside ``plgpu.force_gpu_interpret_mode()`` (CPU simulation of the kernels)."""
  try:
    from jax._src import config as jax_config
    return jax_config.pallas_tpu_interpret_mode_context_manager.value is not None
  except Exception:  # pylint: disable=broad-except
    return False


def _validate(x, coefficients):
  if x.ndim != 3:
    raise ValueError(f"x must be a (batch, m, n) stack, got shape {x.shape}.")
  if x.dtype != jnp.bfloat16:
    raise ValueError(f"x must be bfloat16, got {x.dtype}.")
  if x.shape[1] > x.shape[2]:
    raise ValueError(f"x must be wide (m <= n); got {x.shape[1:]}: transpose it first.")
  triples = tuple(tuple(float(v) for v in t) for t in coefficients)
  if not triples or any(len(t) != 3 for t in triples):
    raise ValueError(f"coefficients must be a non-empty tuple of (a, b, c) triples, got "
                     f"{coefficients!r}.")
  return triples


def aol_rescale(x, gram, eps):
  """Turbo-Muon AOL: ``(diag(s) X, diag(s) A diag(s))`` with s from A's row sums."""
  g = gram.astype(jnp.float32)
  s = lax.rsqrt(jnp.maximum(jnp.sum(jnp.abs(g), axis=-1), eps))
  x = (s[..., :, None] * x.astype(jnp.float32)).astype(jnp.bfloat16)
  gram = (s[..., :, None] * g * s[..., None, :]).astype(jnp.bfloat16)
  return x, gram


def newton_schulz(x: jax.Array, coefficients: Sequence[Sequence[float]], *,
                  aol: bool = False, eps: float = 1e-7,
                  config: NSConfig | None = None) -> jax.Array:
  """Newton–Schulz steps on a bf16 stack with the Hopper kernels.

  Args:
    x: ``(batch, m, n)`` bf16 with ``m <= n``, already Frobenius-normalised unless
      ``aol`` (then step 1 applies the AOL rescaling).
    coefficients: static tuple of ``(a, b, c)`` Python-float triples, one per step.
    aol: apply Turbo-Muon's AOL preconditioning in the first step.
    eps: AOL row-sum clamp.
    config: per-GEMM tile configs for the padded shape (default: :func:`plan`).

  Returns:
    ``(batch, m, n)`` bf16.
  """
  triples = _validate(x, coefficients)
  from ortho_optax import pallas
  if not (pallas.is_available() or _interpreting()):
    raise RuntimeError(
        "ortho_optax.pallas.newton_schulz needs a Hopper GPU (sm_90) with Mosaic GPU "
        "Pallas; use ortho_optax.newton_schulz(..., backend='xla') elsewhere.")
  batch, m, n = x.shape
  if batch == 0 or m == 0:
    return x
  mp, np_ = mm.round_up(m, PAD), mm.round_up(n, PAD)
  cfg = config or plan(batch, mp, np_)
  X = x
  if (mp, np_) != (m, n):
    X = jnp.pad(x, ((0, 0), (0, mp - m), (0, np_ - n)))
  if aol:
    # aol_rescale (an XLA fusion) reads X after the Gram kernel has: without the barrier
    # XLA fuses X's producer (say, the concatenation that built the stack) into it and
    # computes it twice (measured 0.27 ms for 24×768×3072 on an H200).
    X = lax.optimization_barrier(X)
  upper = cfg.symmetric != "full"
  mirror = "xla" if cfg.symmetric == "xla" else "kernel"
  for step, (a, b, c) in enumerate(triples):
    A = mm.matmul(X, X, rhs_transposed=True, upper=upper, mirror=mirror, config=cfg.gram)
    if step == 0 and aol:
      X, A = aol_rescale(X, A, eps)
    if c == 0.0:  # cubic step: X ← aX + b·A·X
      X = mm.matmul(A, X, X, alpha=a, beta=b, config=cfg.apply)
    else:
      B = mm.matmul(A, A, A, alpha=b, beta=c, rhs_transposed=True, upper=upper,
                    mirror=mirror, config=cfg.poly)
      X = mm.matmul(B, X, X, alpha=a, beta=1.0, config=cfg.apply)
  if (mp, np_) != (m, n):
    X = X[:, :m, :n]
  return X


def aol_flags(aol, count: int) -> list[bool]:
  """One AOL flag per stack of a grouped call: ``aol`` is one flag for all or a sequence.

  Raises:
    ValueError: when a sequence does not have one flag per stack.
  """
  flags = [bool(aol)] * count if isinstance(aol, bool) else [bool(a) for a in aol]
  if len(flags) != count:
    raise ValueError(f"aol needs one flag per stack: {len(flags)} flags, {count} stacks.")
  return flags


def grouped_indices(xs: Sequence[jax.Array]) -> list[int]:
  """Which of several ``(batch, m, n)`` stacks share the grouped launches: all but the
  empty ones and those with a measured plan of their own in :data:`TUNED`, and none when
  fewer than two remain (one stack runs alone)."""
  grouped = []
  for i, x in enumerate(xs):
    batch, m, n = x.shape
    padded = (batch, mm.round_up(m, PAD), mm.round_up(n, PAD))
    if not (batch == 0 or m == 0 or padded in TUNED):
      grouped.append(i)
  return grouped if len(grouped) > 1 else []


def newton_schulz_many(xs: Sequence[jax.Array], coefficients: Sequence[Sequence[float]],
                       *, aol: Sequence[bool] | bool = False, eps: float = 1e-7,
                       config: mm.TuningConfig | None = None) -> list[jax.Array]:
  """:func:`newton_schulz` of several stacks, each GEMM of a step one launch for all.

  A GPT's hidden matrices come in a few shapes (48 768² and 24 768×3072 for GPT-2
  small): run one by one, each stack's symmetric GEMMs leave the SMs part idle in their
  last wave, and a K = 3072 Gram runs 3 waves of 132 SMs for 288 tiles. Grouped
  (:func:`matmul.grouped_matmul`, an LPT schedule over the tiles of all stacks), the
  tiles of all stacks share the waves and each step is 3 launches instead of 3 per stack.
  Stacks with a measured plan in :data:`TUNED` (large single matrices) keep it and run
  alone.

  Args:
    xs: bf16 ``(batch, m, n)`` stacks with ``m <= n``, as for :func:`newton_schulz`.
    coefficients: static ``(a, b, c)`` triples, shared by all stacks.
    aol: per stack (or one for all), AOL preconditioning in the first step.
    eps: AOL row-sum clamp.
    config: tile config of the grouped launches (default ``TuningConfig()``; split-K 1).

  Returns:
    The results, in order.
  """
  xs = list(xs)
  flags = aol_flags(aol, len(xs))
  triples = None
  for x in xs:
    triples = _validate(x, coefficients)
  grouped = grouped_indices(xs)
  outs = [None if i in grouped else newton_schulz(x, coefficients, aol=flags[i], eps=eps)
          for i, x in enumerate(xs)]
  if not grouped:
    return outs
  from ortho_optax import pallas
  if not (pallas.is_available() or _interpreting()):
    raise RuntimeError(
        "ortho_optax.pallas.newton_schulz_many needs a Hopper GPU (sm_90) with Mosaic GPU "
        "Pallas; use ortho_optax.newton_schulz(..., backend='xla') elsewhere.")
  cfg = config or mm.TuningConfig()
  shapes = [xs[i].shape for i in grouped]
  Xs = []
  for i, (batch, m, n) in zip(grouped, shapes):
    X = jnp.pad(xs[i], ((0, 0), (0, mm.round_up(m, PAD) - m), (0, mm.round_up(n, PAD) - n)))
    # As in newton_schulz: the AOL rescale must not rebuild X's producer.
    Xs.append(lax.optimization_barrier(X) if flags[i] else X)
  for step, (a, b, c) in enumerate(triples):
    As = mm.grouped_matmul([mm.Product(X, X, rhs_transposed=True, upper=True) for X in Xs],
                           config=cfg)
    if step == 0:
      for j, i in enumerate(grouped):
        if flags[i]:
          Xs[j], As[j] = aol_rescale(Xs[j], As[j], eps)
    if c == 0.0:  # cubic step: X ← aX + b·A·X
      Xs = mm.grouped_matmul([mm.Product(A, X, X, alpha=a, beta=b) for A, X in zip(As, Xs)],
                             config=cfg)
      continue
    Bs = mm.grouped_matmul([mm.Product(A, A, A, alpha=b, beta=c, rhs_transposed=True,
                                       upper=True) for A in As], config=cfg)
    Xs = mm.grouped_matmul([mm.Product(B, X, X, alpha=a, beta=1.0) for B, X in zip(Bs, Xs)],
                           config=cfg)
  for i, X, (_, m, n) in zip(grouped, Xs, shapes):
    outs[i] = X[:, :m, :n]
  return outs


def reference(x: jax.Array, coefficients, *, aol: bool = False, eps: float = 1e-7,
              dtype=jnp.float32) -> jax.Array:
  """The same iteration in plain ``jnp`` (``dtype`` throughout): the test reference."""
  X = x.astype(dtype)
  hp = lax.Precision.HIGHEST
  for step, (a, b, c) in enumerate(coefficients):
    A = jnp.matmul(X, jnp.swapaxes(X, -1, -2), precision=hp)
    if step == 0 and aol:
      s = lax.rsqrt(jnp.maximum(jnp.sum(jnp.abs(A), axis=-1), eps))
      X = s[..., :, None] * X
      A = s[..., :, None] * A * s[..., None, :]
    B = b * A + c * jnp.matmul(A, A, precision=hp)
    X = a * X + jnp.matmul(B, X, precision=hp)
  return X
