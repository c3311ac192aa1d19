"""Where an orthogonalization runs and how its stacks are built: one object per implementation.

The :func:`~ortho_optax.stages.orthogonalize.orthogonalize` stage groups a tree's matrices
into stacks of equal shape, hands all of them to one orthogonalizer in one call, and
ungroups the results. Everything that depends on the implementation is decided here,
once, when the optimizer is built:

* :class:`XlaNewtonSchulz`: Newton–Schulz in XLA, on any platform, in the requested
  ``compute_dtype``;
* :class:`PallasNewtonSchulz`: the Hopper kernels of :mod:`ortho_optax.pallas` for the
  stacks they win on (bf16, Frobenius or AOL preconditioning, large enough:
  :meth:`PallasNewtonSchulz.takes`); it builds those stacks in bf16 (with TMA copies
  where the pieces are few enough for the copy kernel to compile quickly) and
  runs each Newton–Schulz step of all of them as one grouped launch; the other stacks go
  to its XLA ``fallback``;
* :class:`XlaGramNewtonSchulz` and :class:`PallasGramNewtonSchulz`: the same with Gram
  Newton–Schulz (:mod:`ortho_optax.gram_newton_schulz`) for the stacks where it needs
  fewer flops (:meth:`XlaGramNewtonSchulz.uses_gram`: wide and tall ones) and standard
  Newton–Schulz for the others (square ones), on the Gram kernels
  (:mod:`ortho_optax.pallas.gram_ns`) or the standard ones where the kernels take the
  stack, in XLA elsewhere;
* :class:`MatrixFunction`: a function of one stack (the exact SVD polar, Aurora's
  leverage-balanced polars), in XLA.

Every orthogonalizer has the same three members: ``transpose_invariant`` (whether a tall
stack may be run as its wide transpose, so both orientations of one shape share a
stack), ``stack(pieces, of_transpose)`` and ``run_many(stacks)``.

References:
  K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024;
  Boissin et al., "Turbo-Muon", arXiv 2512.04632, 2025 (AOL preconditioning).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ortho_optax import validation
from ortho_optax.newton_schulz import (PRECONDITIONINGS, SPECTRAL_TOLERANCE, _accum_dtype,
                                       _aol_prescale, _aol_scales, _gram,
                                       _orient_and_precondition, _round_to,
                                       _xla_newton_schulz)
from ortho_optax.coefficients import (UNSTABLE_GROWTH, resolve_coefficients, rounding_growth,
                                      schedule_max)

BACKENDS = ("auto", "xla", "pallas")
#: Preconditionings the kernels implement (the others run on XLA).
KERNEL_PRECONDITIONINGS = ("frobenius", "aol")


class Stack(NamedTuple):
  """A ``(batch, rows, cols)`` stack of matrices, as an orthogonalizer built it.

  Attributes:
    matrices: the stack.
    of_transpose: the stack holds the transposes of the matrices to orthogonalize (square
      Flax kernels ``(in, out)`` whose matrix view is ``(out, in)``).
    on_kernels: built for, and to be run by, the GPU kernels.
  """
  matrices: jax.Array
  of_transpose: bool = False
  on_kernels: bool = False


def _swap(x):
  return jnp.swapaxes(x, -1, -2)


@dataclasses.dataclass(frozen=True)
class NewtonSchulzSpec:
  """What a Newton–Schulz orthogonalizer computes (not where).

  Attributes:
    triples: the ``(a, b, c)`` coefficients of every step, as Python floats.
    preconditioning: one of :data:`ortho_optax.newton_schulz.PRECONDITIONINGS`.
    eps: Frobenius epsilon / AOL row-sum clamp.
    compute_dtype: dtype of the iterations; ``None``: each stack's own dtype.
  """
  triples: tuple
  preconditioning: str
  eps: float
  compute_dtype: np.dtype | None

  def dtype_for(self, dtype) -> np.dtype:
    """The iterations' dtype for a stack of ``dtype``."""
    if self.compute_dtype is not None:
      return jnp.dtype(self.compute_dtype)
    warn_if_rounding_diverges(self.triples, dtype)
    return jnp.dtype(dtype)


def warn_if_rounding_diverges(triples, dtype, remedy: str | None = None) -> None:
  """A ``UserWarning`` where rounding to ``dtype`` makes the schedule ``triples`` diverge
  (:func:`ortho_optax.coefficients.rounding_growth` above
  :data:`ortho_optax.coefficients.UNSTABLE_GROWTH`); ``remedy`` ends the message."""
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    return
  growth = rounding_growth(triples, dtype.name)
  if growth > UNSTABLE_GROWTH:
    steps = f"{len(triples)} step{'s' if len(triples) != 1 else ''}"
    remedy = remedy or ("Iterate in float32 (compute_dtype='float32') or use coefficients "
                        "with a margin above 1, such as 'polar_express'.")
    warnings.warn(
        f"Newton–Schulz coefficients starting {tuple(triples[0])} ({steps}) diverge in "
        f"{dtype.name}: its rounding can raise the singular values they reach by a factor "
        f"of {growth:.3g} over exact arithmetic, so small, low-rank or flat-spectrum "
        f"matrices get results far from orthogonal. {remedy}", UserWarning, stacklevel=4)


def _concatenate(pieces):
  return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=0)


class XlaNewtonSchulz:
  """Newton–Schulz in XLA (the steps unrolled, the coefficient table traced), any platform.

  Args:
    spec: what to compute.
  """
  backend = "xla"
  transpose_invariant = True

  def __init__(self, spec: NewtonSchulzSpec):
    self.spec = spec
    self._cubic = all(t[2] == 0.0 for t in spec.triples)

  def __repr__(self):
    return f"{type(self).__name__}({self.spec})"

  def stack(self, pieces: Sequence[jax.Array], of_transpose: bool = False) -> Stack:
    """One stack of ``pieces`` (``(b_i, rows, cols)`` each)."""
    return Stack(_concatenate(list(pieces)), of_transpose)

  def run(self, x: jax.Array, of_transpose: bool = False) -> jax.Array:
    """Newton–Schulz of every matrix of ``x`` (rank >= 2), of its transposes if
    ``of_transpose``; ``x``'s shape and dtype."""
    if of_transpose:
      # NS commutes with transposition; the barriers keep XLA from sinking the batched
      # transpose into every producer and consumer leaf.
      x = _swap(lax.optimization_barrier(x))
      return lax.optimization_barrier(_swap(self.run(x)))
    cdt = self.spec.dtype_for(x.dtype)
    acc = _accum_dtype(cdt)
    return _xla_newton_schulz(
        x, jnp.asarray(self.spec.triples, acc), jnp.asarray(self.spec.eps, _accum_dtype(x.dtype)),
        preconditioning=self.spec.preconditioning, compute_dtype=cdt, cubic=self._cubic)

  def run_many(self, stacks: Sequence[Stack]) -> list[jax.Array]:
    """The results of ``stacks``, in order, each in its stack's layout and dtype."""
    return [self.run(s.matrices, s.of_transpose) for s in stacks]


class XlaGramNewtonSchulz(XlaNewtonSchulz):
  """Gram Newton–Schulz in XLA (:func:`ortho_optax.gram_newton_schulz.gram_newton_schulz`)
  for the stacks it needs fewer flops on (:meth:`uses_gram`), standard Newton–Schulz for
  the others (square ones).

  Args:
    spec: what to compute (the same polynomial as standard Newton–Schulz).
    restart_every: steps between restarts (``None``: never), see
      :func:`~ortho_optax.gram_newton_schulz.gram_newton_schulz`.
    every_shape: Gram Newton–Schulz for every stack, square ones included (the plain
      function :func:`~ortho_optax.gram_newton_schulz.gram_newton_schulz`).
  """

  def __init__(self, spec: NewtonSchulzSpec, *, restart_every, every_shape: bool = False):
    super().__init__(spec)
    self.restart_every = restart_every
    self.every_shape = every_shape

  def uses_gram(self, shape: Sequence[int]) -> bool:
    """Whether a stack of ``shape`` ``(..., rows, cols)`` runs Gram Newton–Schulz: where
    :func:`~ortho_optax.gram_newton_schulz.prefers_gram` says it needs fewer flops (the
    kernels' one-triangle products change both counts alike), or always with
    ``every_shape``."""
    from ortho_optax.gram_newton_schulz import prefers_gram
    return self.every_shape or prefers_gram(
        shape[-2], shape[-1], steps=len(self.spec.triples), restart_every=self.restart_every,
        cubic=self._cubic)

  def run(self, x: jax.Array, of_transpose: bool = False) -> jax.Array:
    from ortho_optax.gram_newton_schulz import _xla_gram_newton_schulz
    if not self.uses_gram(x.shape):
      return super().run(x, of_transpose)
    if of_transpose:
      x = _swap(lax.optimization_barrier(x))
      return lax.optimization_barrier(_swap(self.run(x)))
    cdt = self.spec.dtype_for(x.dtype)
    return _xla_gram_newton_schulz(
        x, jnp.asarray(self.spec.triples, _accum_dtype(cdt)),
        jnp.asarray(self.spec.eps, _accum_dtype(x.dtype)),
        preconditioning=self.spec.preconditioning, compute_dtype=cdt, cubic=self._cubic,
        restart_every=self.restart_every)


class PallasNewtonSchulz(XlaNewtonSchulz):
  """Newton–Schulz on the Hopper kernels where they win, XLA elsewhere.

  A stack goes to the kernels (:meth:`takes`) when the kernels can run here (a Hopper
  GPU, :func:`ortho_optax.pallas.is_available`), the iterations are bf16, the
  preconditioning is Frobenius or AOL and, unless ``forced``, the stack is large enough
  for the kernels to beat XLA (:func:`ortho_optax.pallas.prefers_kernels`: small single
  matrices are launch-bound). Kernel stacks are built in bf16 from per-leaf bf16 pieces (by
  TMA copies where :func:`ortho_optax.pallas.stack.prefers` says so), and every
  Newton–Schulz step of all of them runs as one grouped launch per GEMM.

  Args:
    spec: what to compute.
    forced: ``backend="pallas"``: every stack the kernels can take goes to them, and it
      is an error if they cannot run here.
    fallback: the orthogonalizer of the stacks the kernels do not take (default
      :class:`XlaNewtonSchulz` of ``spec``).

  Raises:
    RuntimeError: ``forced`` off a Hopper GPU.
    ValueError: ``forced`` with a preconditioning the kernels lack or a ``compute_dtype``
      other than bfloat16 (the kernels iterate in bf16).
  """
  backend = "pallas"

  def __init__(self, spec: NewtonSchulzSpec, *, forced: bool = False,
               fallback: XlaNewtonSchulz | None = None):
    super().__init__(spec)
    self.forced = forced
    self.fallback = XlaNewtonSchulz(spec) if fallback is None else fallback
    if forced:
      if spec.compute_dtype is not None and jnp.dtype(spec.compute_dtype) != jnp.bfloat16:
        raise ValueError(
            f"backend='pallas' iterates in bfloat16, got compute_dtype="
            f"{jnp.dtype(spec.compute_dtype).name!r}; use backend='xla' or 'auto' to iterate "
            f"in it.")
      if spec.compute_dtype is None:  # every stack the kernels take iterates in bf16
        warn_if_rounding_diverges(
            spec.triples, jnp.bfloat16,
            remedy="backend='pallas' iterates in bfloat16: use backend='xla' with "
                   "compute_dtype='float32', or coefficients with a margin above 1, such "
                   "as 'polar_express'.")
      from ortho_optax import pallas  # local: keeps the XLA path free of the GPU module
      if not pallas.is_available():
        raise RuntimeError(
            "backend='pallas' was requested but ortho_optax.pallas.is_available() is False "
            "(needs a Hopper GPU with the Mosaic GPU Pallas backend). Use backend='auto' "
            "or 'xla'.")
      if spec.preconditioning not in KERNEL_PRECONDITIONINGS:
        raise ValueError(
            f"backend='pallas' supports preconditioning {KERNEL_PRECONDITIONINGS}, got "
            f"{spec.preconditioning!r}; use backend='xla' or 'auto'.")

  def takes(self, shape: Sequence[int], dtype) -> bool:
    """Whether a stack of ``shape`` ``(..., rows, cols)`` and ``dtype`` runs on the kernels."""
    from ortho_optax import pallas
    if len(shape) < 2 or not jnp.issubdtype(dtype, jnp.floating):
      return False
    if self.forced:
      return True
    if not (pallas.is_available() and self.spec.dtype_for(dtype) == jnp.bfloat16
            and self.spec.preconditioning in KERNEL_PRECONDITIONINGS):
      return False
    return bool(pallas.prefers_kernels(math.prod(shape[:-2]), shape[-2], shape[-1]))

  def stack(self, pieces: Sequence[jax.Array], of_transpose: bool = False) -> Stack:
    pieces = list(pieces)
    shape = (sum(p.shape[0] for p in pieces),) + tuple(pieces[0].shape[1:])
    if not self.takes(shape, pieces[0].dtype):
      return self.fallback.stack(pieces, of_transpose)
    # Each piece is rounded to bf16 where it is produced (with the momentum, say) and the
    # stack is built in bf16: half the bytes of a float32 one, and the normalisation then
    # reads bf16, as Keller Jordan's G.bfloat16() / ‖G‖ does. The barriers keep XLA from
    # moving the rounding (and the normalisation's reductions) back onto the float32
    # pieces.
    pieces = [lax.optimization_barrier(p.astype(jnp.bfloat16)) for p in pieces]
    return Stack(_tma_concatenate(pieces), of_transpose, on_kernels=True)

  def run(self, x: jax.Array, of_transpose: bool = False) -> jax.Array:
    return self.run_many([Stack(x, of_transpose, self.takes(x.shape, x.dtype))])[0]

  def run_many(self, stacks: Sequence[Stack]) -> list[jax.Array]:
    stacks = list(stacks)
    outs = [None] * len(stacks)
    kernel_idx = [i for i, s in enumerate(stacks) if s.on_kernels]
    for i, s in enumerate(stacks):
      if not s.on_kernels:
        outs[i] = self.fallback.run(s.matrices, s.of_transpose)
    if not kernel_idx:
      return outs
    prepared = [self._kernel_input(stacks[i]) for i in kernel_idx]
    results = self._run_kernels([p[0] for p in prepared], [p[1] for p in prepared])
    for i, (_, _, restore), r in zip(kernel_idx, prepared, results):
      outs[i] = restore(r)
    return outs

  def _run_kernels(self, xs: Sequence[jax.Array], aol: Sequence[bool]) -> list[jax.Array]:
    """The kernels' results for bf16 ``(batch, m, n)`` stacks (m <= n), AOL per stack."""
    from ortho_optax import pallas
    triples, eps = self.spec.triples, self.spec.eps
    if len(xs) == 1:
      return [pallas.newton_schulz(xs[0], triples, aol=aol[0], eps=eps)]
    return pallas.newton_schulz_many(xs, triples, aol=aol, eps=eps)

  def _kernel_input(self, stack: Stack):
    """``(bf16 (batch, m, n) stack with m <= n, AOL in the kernels?, restore)``;
    ``restore`` maps the kernels' result back to the stack's layout and dtype."""
    x, preconditioning, eps = stack.matrices, self.spec.preconditioning, self.spec.eps
    out_dtype, cdt = x.dtype, jnp.dtype(jnp.bfloat16)
    if stack.of_transpose and preconditioning == "aol":
      # AOL scales the rows of X = yᵀ, i.e. the columns of y, by s = rsqrt(rowsum|yᵀy|);
      # after that the first step is a plain NS step on y·diag(s), so the kernels continue
      # on y·diag(s) (one cuBLAS Gram instead of two transposes of the stack). The barrier
      # keeps XLA from fusing y's producer (the stack's concatenation) into both the Gram
      # and the rescale below, building the stack twice.
      acc = _accum_dtype(x.dtype, cdt)
      scaled = lax.optimization_barrier(_aol_prescale(x, cdt))
      s = _aol_scales(_gram(_swap(scaled), acc), eps, acc)  # XXᵀ = yᵀy
      x = _round_to(scaled.astype(acc) * s[..., None, :], cdt)
      preconditioning = None
    # NS commutes with transposition and the Frobenius norm is transpose-invariant: for
    # Frobenius the transposed stack needs no special handling.
    X, transposed = _orient_and_precondition(x, eps, preconditioning, cdt)
    lead = X.shape[:-2]
    kernel_stack = X.astype(jnp.bfloat16).reshape((-1,) + X.shape[-2:])

    def restore(out):
      out = out.reshape(lead + X.shape[-2:])
      return (_swap(out) if transposed else out).astype(out_dtype)
    return kernel_stack, preconditioning == "aol", restore


class PallasGramNewtonSchulz(PallasNewtonSchulz):
  """Gram Newton–Schulz on the Hopper kernels where they win, XLA elsewhere.

  The stacks the kernels take (:meth:`PallasNewtonSchulz.takes`) run Gram Newton–Schulz
  on the Gram kernels (:func:`ortho_optax.pallas.gram_newton_schulz_many`) where
  :meth:`uses_gram` says so (wide and tall stacks) and standard Newton–Schulz on the
  standard kernels otherwise (square stacks: no gain); every other stack goes to the
  :class:`XlaGramNewtonSchulz` fallback, which makes the same Gram-or-standard choice.

  Args:
    spec: what to compute.
    restart_every: steps between restarts (``None``: never).
    forced: as for :class:`PallasNewtonSchulz`.
    every_shape: Gram Newton–Schulz for every stack, as for :class:`XlaGramNewtonSchulz`.

  Raises:
    RuntimeError, ValueError: those of :class:`PallasNewtonSchulz`.
  """

  def __init__(self, spec: NewtonSchulzSpec, *, restart_every, forced: bool = False,
               every_shape: bool = False):
    super().__init__(spec, forced=forced, fallback=XlaGramNewtonSchulz(
        spec, restart_every=restart_every, every_shape=every_shape))
    self.restart_every = restart_every

  def uses_gram(self, shape: Sequence[int]) -> bool:
    """:meth:`XlaGramNewtonSchulz.uses_gram`: one rule for the kernels and XLA."""
    return self.fallback.uses_gram(shape)

  def _run_kernels(self, xs, aol):
    from ortho_optax import pallas
    xs = list(xs)
    gram = [i for i, x in enumerate(xs) if self.uses_gram(x.shape)]
    standard = [i for i in range(len(xs)) if i not in gram]
    outs = [None] * len(xs)
    if gram:
      results = pallas.gram_newton_schulz_many(
          [xs[i] for i in gram], self.spec.triples, restart_every=self.restart_every,
          aol=[aol[i] for i in gram], eps=self.spec.eps)
      for i, r in zip(gram, results):
        outs[i] = r
    if standard:
      results = super()._run_kernels([xs[i] for i in standard], [aol[i] for i in standard])
      for i, r in zip(standard, results):
        outs[i] = r
    return outs


def _tma_concatenate(pieces):
  """``jnp.concatenate(pieces)`` by TMA copies where the copy kernel takes the pieces
  (:func:`ortho_optax.pallas.stack.prefers`; :func:`ortho_optax.pallas.stack.concatenate`
  copies 24 768×3072 bf16 pieces in 0.23 ms on an H200, where XLA's concatenate takes
  0.44 ms)."""
  if len(pieces) == 1:
    return pieces[0]
  from ortho_optax.pallas import stack
  if stack.prefers(pieces):
    return stack.concatenate(pieces)
  return jnp.concatenate(pieces, axis=0)


class MatrixFunction:
  """An orthogonalizer of a function of one stack, ``fn((batch, rows, cols)) -> same``.

  Used for methods that are not orientation-free or not Newton–Schulz (the exact polar,
  Aurora's leverage-balanced polars); ``fn`` makes its own backend choice for any inner
  Newton–Schulz (through an orthogonalizer of its own).

  Args:
    fn: the matrix function.
  """
  backend = "xla"
  transpose_invariant = False

  def __init__(self, fn: Callable[[jax.Array], jax.Array]):
    self.fn = fn

  def stack(self, pieces: Sequence[jax.Array], of_transpose: bool = False) -> Stack:
    return Stack(_concatenate(list(pieces)), of_transpose)

  def run(self, x: jax.Array, of_transpose: bool = False) -> jax.Array:
    if of_transpose:
      x = _swap(lax.optimization_barrier(x))
      return lax.optimization_barrier(_swap(self.fn(x)))
    return self.fn(x)

  def run_many(self, stacks: Sequence[Stack]) -> list[jax.Array]:
    return [self.run(s.matrices, s.of_transpose) for s in stacks]


def check_newton_schulz_args(*, preconditioning, backend, eps, compute_dtype):
  """Validates the arguments every Newton–Schulz entry point shares; returns the
  resolved ``compute_dtype`` (a dtype or ``None``)."""
  validation.check_choice("preconditioning", preconditioning, PRECONDITIONINGS)
  validation.check_choice("backend", backend, BACKENDS)
  validation.check_non_negative("eps", eps)
  return validation.check_dtype("compute_dtype", compute_dtype)


def newton_schulz_orthogonalizer(
    *,
    steps: int = 5,
    coefficients="muon",
    order: str | None = None,
    preconditioning: str = "frobenius",
    eps: float = 1e-7,
    compute_dtype=jnp.bfloat16,
    backend: str = "auto",
) -> XlaNewtonSchulz:
  """The Newton–Schulz orthogonalizer of these arguments (see
  :func:`ortho_optax.newton_schulz.newton_schulz` for their meaning).

  ``backend="xla"`` gives :class:`XlaNewtonSchulz`; ``"auto"`` and ``"pallas"`` give
  :class:`PallasNewtonSchulz` (``"auto"`` falls back to XLA per stack off a Hopper GPU or
  where the kernels would be slower; ``"pallas"`` insists). Availability of the kernels
  is only queried when a stack is built (``"auto"``), so building an optimizer never
  initialises JAX's backends (which would break a later ``jax.distributed.initialize``).

  Returns:
    An orthogonalizer.

  Raises:
    ValueError: for bad arguments, naming the value and the choices.
    RuntimeError: ``backend="pallas"`` off a Hopper GPU.
  """
  spec = _newton_schulz_spec(steps, coefficients, order, preconditioning, eps, compute_dtype,
                             backend)
  if backend == "xla":
    return XlaNewtonSchulz(spec)
  return PallasNewtonSchulz(spec, forced=backend == "pallas")


def _newton_schulz_spec(steps, coefficients, order, preconditioning, eps, compute_dtype,
                        backend) -> NewtonSchulzSpec:
  """The checked :class:`NewtonSchulzSpec` of the orthogonalizer builders' arguments."""
  cdt = check_newton_schulz_args(preconditioning=preconditioning, backend=backend, eps=eps,
                                 compute_dtype=compute_dtype)
  triples = tuple(tuple(float(v) for v in t)
                  for t in resolve_coefficients(coefficients, steps, order))
  eps = float(eps) if validation.is_python_number(eps) else eps
  if preconditioning == "spectral":
    _check_spectral_tolerance(triples, coefficients)
  if cdt is not None:
    warn_if_rounding_diverges(triples, cdt)
  return NewtonSchulzSpec(triples, preconditioning, eps, cdt)


def _check_spectral_tolerance(triples, coefficients) -> None:
  """Spectral preconditioning can leave σ_max a little above 1 (its estimate is a lower
  bound); a schedule that diverges there would return NaN for ordinary matrices."""
  top = schedule_max(triples, SPECTRAL_TOLERANCE)
  if top > 2.0:
    raise ValueError(
        f"preconditioning='spectral' scales by a power-iteration estimate of σ_max that can "
        f"fall short, leaving singular values up to {SPECTRAL_TOLERANCE} to the steps, but "
        f"coefficients={coefficients!r} carry them to {top:.3g} there (they are fitted on "
        f"[0, 1]). Use preconditioning='frobenius' or 'schatten' (upper bounds of σ_max) "
        f"with them, or coefficients such as 'muon' or 'quintic'.")


def gram_newton_schulz_orthogonalizer(
    *,
    steps: int = 5,
    coefficients="muon",
    order: str | None = None,
    preconditioning: str = "frobenius",
    eps: float = 1e-7,
    compute_dtype=jnp.bfloat16,
    backend: str = "auto",
    restart_every: int | None = 2,
    every_shape: bool = False,
) -> XlaGramNewtonSchulz | PallasGramNewtonSchulz:
  """The Gram Newton–Schulz orthogonalizer of these arguments (see
  :func:`ortho_optax.gram_newton_schulz.gram_newton_schulz` for their meaning).

  ``backend="xla"`` gives :class:`XlaGramNewtonSchulz`; ``"auto"`` and ``"pallas"`` give
  :class:`PallasGramNewtonSchulz` (as for :func:`newton_schulz_orthogonalizer`).
  ``every_shape``: Gram Newton–Schulz for square stacks too.

  Returns:
    An orthogonalizer.

  Raises:
    ValueError: for bad arguments, naming the value and the choices.
    RuntimeError: ``backend="pallas"`` off a Hopper GPU.
  """
  from ortho_optax.gram_newton_schulz import _check_restart_every
  _check_restart_every(restart_every)
  spec = _newton_schulz_spec(steps, coefficients, order, preconditioning, eps, compute_dtype,
                             backend)
  if backend == "xla":
    return XlaGramNewtonSchulz(spec, restart_every=restart_every, every_shape=every_shape)
  return PallasGramNewtonSchulz(spec, restart_every=restart_every, forced=backend == "pallas",
                                every_shape=every_shape)


#: Orthogonalization methods of :func:`make_orthogonalizer`.
METHODS = ("newton_schulz", "gram_newton_schulz", "polar", "aurora", "riemannian_aurora")
#: The Newton–Schulz methods, the choices of the optimizers' ``orthogonalizer`` argument.
NEWTON_SCHULZ_METHODS = ("newton_schulz", "gram_newton_schulz")


def make_orthogonalizer(
    method: str = "newton_schulz",
    *,
    steps: int = 5,
    coefficients="muon",
    order: str | None = None,
    preconditioning: str = "frobenius",
    eps: float = 1e-7,
    compute_dtype=jnp.bfloat16,
    backend: str = "auto",
    pp_iterations: int = 2,
    pp_beta: float = 0.5,
    outer_steps: int = 3,
    cg_steps: int = 20,
    riemannian_eta: float = 0.1,
    retraction_steps: int = 2,
    restart_every: int | None = 2,
):
  """The orthogonalizer of ``method`` with these arguments (see
  :func:`ortho_optax.stages.orthogonalize.orthogonalize` for their meaning).

  Returns:
    :func:`newton_schulz_orthogonalizer`'s for ``"newton_schulz"``,
    :func:`gram_newton_schulz_orthogonalizer`'s for ``"gram_newton_schulz"``, else a
    :class:`MatrixFunction` of :func:`ortho_optax.polar.polar`,
    :func:`~ortho_optax.polar.leverage_uniform_polar` or
    :func:`~ortho_optax.polar.riemannian_balanced_polar`.

  Raises:
    ValueError: for a bad argument, naming the value and the choices.
  """
  # Local: ortho_optax.polar runs its inner Newton–Schulz through this module.
  from ortho_optax.polar import leverage_uniform_polar, polar, riemannian_balanced_polar
  validation.check_choice("method", method, METHODS)
  if method == "newton_schulz":
    return newton_schulz_orthogonalizer(
        steps=steps, coefficients=coefficients, order=order,
        preconditioning=preconditioning, eps=eps, compute_dtype=compute_dtype,
        backend=backend)
  if method == "gram_newton_schulz":
    return gram_newton_schulz_orthogonalizer(
        steps=steps, coefficients=coefficients, order=order,
        preconditioning=preconditioning, eps=eps, compute_dtype=compute_dtype,
        backend=backend, restart_every=restart_every)
  cdt = check_newton_schulz_args(preconditioning=preconditioning, backend=backend, eps=eps,
                                 compute_dtype=compute_dtype)
  if method == "polar":
    return MatrixFunction(polar)
  if preconditioning != "frobenius":
    raise ValueError(
        f"preconditioning={preconditioning!r} only applies to method='newton_schulz'; "
        f"Aurora's polar always uses Frobenius normalisation.")
  validation.check_int("steps", steps, minimum=1)
  validation.check_positive("eps", eps)
  if method == "aurora":
    validation.check_int("pp_iterations", pp_iterations, minimum=1)
    validation.check_positive("pp_beta", pp_beta)
    return MatrixFunction(functools.partial(
        leverage_uniform_polar, pp_iterations=pp_iterations, pp_beta=pp_beta,
        eps=eps, compute_dtype=cdt, steps=steps, backend=backend))
  validation.check_int("outer_steps", outer_steps, minimum=0)
  validation.check_int("cg_steps", cg_steps, minimum=0)
  validation.check_int("retraction_steps", retraction_steps, minimum=0)
  validation.check_non_negative("riemannian_eta", riemannian_eta)
  return MatrixFunction(functools.partial(
      riemannian_balanced_polar, outer_steps=outer_steps, cg_steps=cg_steps,
      riemannian_eta=riemannian_eta, retraction_steps=retraction_steps, eps=eps,
      compute_dtype=cdt, steps=steps, backend=backend))


__all__ = [
    "BACKENDS", "KERNEL_PRECONDITIONINGS", "METHODS", "MatrixFunction", "NEWTON_SCHULZ_METHODS",
    "NewtonSchulzSpec", "PallasGramNewtonSchulz", "PallasNewtonSchulz", "Stack",
    "XlaGramNewtonSchulz", "XlaNewtonSchulz", "check_newton_schulz_args",
    "gram_newton_schulz_orthogonalizer", "make_orthogonalizer", "newton_schulz_orthogonalizer",
]
