"""Pallas Mosaic GPU kernels for Newton–Schulz on Hopper GPUs (``ortho_optax.pallas``).

``is_available()`` says whether the kernels can run here (a Hopper GPU, sm_90, and the
Mosaic GPU Pallas backend); ``newton_schulz(x, coefficients, aol=..., eps=...)`` runs the
quintic iteration on a bf16 ``(batch, m, n)`` stack (m <= n) with one-triangle symmetric
GEMMs and fused epilogues (see :mod:`ortho_optax.pallas.ns` and
:mod:`ortho_optax.pallas.matmul`), ``gram_newton_schulz(x, coefficients, ...)`` the same
polynomial iterated on the ``m × m`` Gram matrix (:mod:`ortho_optax.pallas.gram_ns`).
``ortho_optax.newton_schulz`` / ``ortho_optax.gram_newton_schulz`` with
``backend="pallas"|"auto"`` are the public entry points; this module is their Hopper back
end.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def is_available() -> bool:
  """True when a Hopper GPU (compute capability 9.x) and Mosaic GPU Pallas are usable.

  Never raises: any failure to import or query reports False. The answer is cached.

  Returns:
    ``True`` when the first GPU of ``jax.devices()`` has compute capability 9.x and the
    Mosaic GPU Pallas backend imports, ``False`` otherwise.

  References:
    JAX Pallas Mosaic GPU backend (``jax.experimental.pallas.mosaic_gpu``) and its Hopper
    matmul example, ``jax/experimental/pallas/ops/gpu/hopper_matmul_mgpu.py``.
  """
  try:
    import jax
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
      return False
    cc = str(getattr(gpus[0], "compute_capability", ""))
    if not cc.startswith("9."):  # wgmma is Hopper-only (sm_90a)
      return False
    import jax.experimental.pallas.mosaic_gpu  # noqa: F401
    from jax._src.lib import mosaic_gpu  # noqa: F401  (the compiled Mosaic GPU bindings)
    return True
  except Exception:  # pylint: disable=broad-except
    return False


#: One-triangle flops per NS step (3m²n + m³, times the batch) above which the kernels
#: beat the XLA path on an H200 (measured 2026-11-28: 1×768×768 0.75x, 1×768×3072 0.93x,
#: 1×1024×4096 1.20x, 1×2048×2048 1.40x, 48×768×768 1.95x; see benchmarks/KERNELS_NOTES.md).
MIN_STEP_FLOPS = 1e10


def prefers_kernels(batch: int, m: int, n: int) -> bool:
  """Whether a ``(batch, m, n)`` stack is large enough for the kernels to beat XLA.

  For ``backend="auto"``: small single matrices (e.g. one 768×768) are launch- and
  occupancy-bound in the kernels (few 128×256 tiles for 132 SMs) and faster in XLA.

  Args:
    batch: number of matrices in the stack.
    m, n: matrix dimensions (in either order).

  Returns:
    ``True`` when one Newton–Schulz step of the stack costs at least
    ``MIN_STEP_FLOPS`` (``batch * (3 m² n + m³)`` with ``m <= n``).

  References:
    ``benchmarks/bench_kernels.py`` (kernels against XLA on an H200, 2026-11-28).
  """
  m, n = min(m, n), max(m, n)
  return batch * (3.0 * m * m * n + float(m) ** 3) >= MIN_STEP_FLOPS


def newton_schulz(x, coefficients, *, aol: bool = False, eps: float = 1e-7):
  """Newton–Schulz on a bf16 ``(batch, m, n)`` stack (m <= n) with the Hopper kernels.

  Args:
    x: bf16 stack, already Frobenius-normalised unless ``aol``.
    coefficients: static tuple of ``(a, b, c)`` Python-float triples, one per step.
    aol: Turbo-Muon AOL preconditioning fused into the first step.
    eps: AOL row-sum clamp.

  Returns:
    bf16 ``(batch, m, n)``.

  References:
    K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024,
    https://kellerjordan.github.io/posts/muon/; Boissin et al., "Turbo-Muon",
    arXiv 2512.04632, 2025 and thib-s/flash-newton-schulz (AOL preconditioning).
  """
  from ortho_optax.pallas import ns
  return ns.newton_schulz(x, coefficients, aol=aol, eps=eps)


def newton_schulz_many(xs, coefficients, *, aol=False, eps: float = 1e-7):
  """:func:`newton_schulz` of several bf16 stacks, each GEMM one launch for all of them.

  Args:
    xs: bf16 ``(batch, m, n)`` stacks (m <= n), already Frobenius-normalised unless AOL.
    coefficients: static tuple of ``(a, b, c)`` Python-float triples, one per step.
    aol: one flag per stack (or one for all): Turbo-Muon AOL in the first step.
    eps: AOL row-sum clamp.

  Returns:
    The bf16 results, in order.

  References:
    Boissin et al., "Turbo-Muon", arXiv 2512.04632, 2025 (AOL preconditioning).
  """
  from ortho_optax.pallas import ns
  return ns.newton_schulz_many(xs, coefficients, aol=aol, eps=eps)


def gram_newton_schulz(x, coefficients, *, restart_every=2, aol: bool = False,
                       eps: float = 1e-7):
  """Gram Newton–Schulz on a bf16 ``(batch, m, n)`` stack (m <= n) with the Hopper kernels.

  The steps run on the ``m × m`` Gram matrix with one-triangle symmetric GEMMs (see
  :mod:`ortho_optax.pallas.gram_ns`); the result equals :func:`newton_schulz`'s in exact
  arithmetic, with fewer flops for ``n`` well above ``m``.

  Args:
    x: bf16 stack, already Frobenius-normalised unless ``aol``.
    coefficients: static tuple of ``(a, b, c)`` Python-float triples, one per step.
    restart_every: steps between restarts (``X ← QX``, ``R ← XXᵀ``; ``None``: never).
    aol: Turbo-Muon AOL preconditioning fused into the first Gram matrix.
    eps: AOL row-sum clamp.

  Returns:
    bf16 ``(batch, m, n)``.

  References:
    J. Zhang, N. Amsel, B. Chen, T. Dao, "Gram Newton-Schulz", 2026,
    https://github.com/Dao-AILab/gram-newton-schulz; Boissin et al., "Turbo-Muon",
    arXiv 2512.04632, 2025 (AOL preconditioning).
  """
  from ortho_optax.pallas import gram_ns
  return gram_ns.gram_newton_schulz(x, coefficients, restart_every=restart_every, aol=aol,
                                    eps=eps)


def gram_newton_schulz_many(xs, coefficients, *, restart_every=2, aol=False,
                            eps: float = 1e-7):
  """:func:`gram_newton_schulz` of several bf16 stacks, each GEMM one launch for all.

  Args:
    xs: bf16 ``(batch, m, n)`` stacks (m <= n), already Frobenius-normalised unless AOL.
    coefficients: static tuple of ``(a, b, c)`` Python-float triples, one per step.
    restart_every: steps between restarts (``None``: never).
    aol: one flag per stack (or one for all): Turbo-Muon AOL in the first step.
    eps: AOL row-sum clamp.

  Returns:
    The bf16 results, in order.

  References:
    J. Zhang, N. Amsel, B. Chen, T. Dao, "Gram Newton-Schulz", 2026,
    https://github.com/Dao-AILab/gram-newton-schulz.
  """
  from ortho_optax.pallas import gram_ns
  return gram_ns.gram_newton_schulz_many(xs, coefficients, restart_every=restart_every,
                                         aol=aol, eps=eps)


__all__ = ["gram_newton_schulz", "gram_newton_schulz_many", "is_available", "newton_schulz",
           "newton_schulz_many", "prefers_kernels"]
