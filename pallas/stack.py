"""Concatenation of many arrays along their first axis with TMA copies (Mosaic GPU).

``concatenate(pieces)`` builds the stack that a batched Newton–Schulz call runs on (say,
48 768×768 bf16 momenta of a GPT-2's attention) as a pure copy engine job: every piece
and the output are viewed as ``(rows, LANES)`` row-major matrices, and each CTA moves
one block of ``block_rows`` rows, global → shared → global memory, with two TMA copies.
No element passes through registers, so the copy runs near the memory bandwidth, where
XLA's concatenate of 2-byte elements measured ~0.84 TB/s on an H200 (one element per
thread and per operand).

References:
  JAX, ``jax.experimental.pallas.mosaic_gpu`` (``copy_gmem_to_smem``,
  ``copy_smem_to_gmem``); NVIDIA, *CUDA C++ Programming Guide*, Tensor Memory Accelerator.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

#: Row length of the 2-D view of every piece (elements; the largest TMA box side).
LANES = 256

#: Most pieces one copy kernel takes. A longer stack is copied by several launches, each
#: writing its chunk into one output buffer at a row offset read at run time, so equal
#: chunks share one compiled kernel. The kernel has a branch and a TMA descriptor per
#: piece, and its compile time grows faster than the count: on an H200 (JAX 0.11.2) one
#: kernel of 12 pieces compiled in 0.8–1.0 s and one of 24 in 3.1–4.5 s; two launches of
#: the 12-piece kernel for 24 pieces compile in 1.0–1.1 s.
CHUNK_PIECES = 12


@dataclasses.dataclass(frozen=True)
class StackConfig:
  """Block size of :func:`concatenate`.

  Attributes:
    block_rows: rows of ``LANES`` elements one CTA copies (a 64×256 bf16 block is 32 KB
      of shared memory, so several CTAs share an SM and overlap their copies).
  """
  block_rows: int = 64


def supports(pieces: Sequence[jax.Array], config: StackConfig = StackConfig()) -> bool:
  """Whether :func:`concatenate` takes these pieces: one dtype, equal trailing shapes and
  every piece a whole number of ``block_rows × LANES`` blocks."""
  if not pieces:
    return False
  first = pieces[0]
  block = config.block_rows * LANES
  return all(p.dtype == first.dtype and p.shape[1:] == first.shape[1:] and p.ndim >= 1
             and p.size > 0 and p.size % block == 0 for p in pieces)


def prefers(pieces: Sequence[jax.Array], config: StackConfig = StackConfig()) -> bool:
  """Whether to stack ``pieces`` by :func:`concatenate` rather than XLA's concatenate:
  whenever :func:`supports` takes them (on an H200 the copies take 0.23 ms for 24
  768×3072 bf16 pieces where XLA's concatenate takes 0.44 ms, and 0.24 vs 0.37 ms for
  48 768² ones; ``benchmarks/compile_profile.py``)."""
  return supports(pieces, config)


def concatenate(pieces: Sequence[jax.Array], config: StackConfig = StackConfig()
                ) -> jax.Array:
  """``jnp.concatenate(pieces, axis=0)`` by TMA copies on a Hopper GPU.

  Args:
    pieces: arrays of one dtype and equal trailing shapes, each a whole number of
      ``config.block_rows × LANES`` elements (:func:`supports`).
    config: block size.

  Returns:
    The concatenation along axis 0.

  Under ``jax.vmap`` the pieces are stacked by XLA's concatenate.

  Raises:
    ValueError: for pieces :func:`supports` rejects, naming the shapes and dtypes.
  """
  pieces = list(pieces)
  if not supports(pieces, config):
    raise ValueError(
        "concatenate needs pieces of one dtype and equal trailing shapes, each a whole "
        f"number of {config.block_rows}×{LANES} elements; got "
        f"{[(tuple(p.shape), str(p.dtype)) for p in pieces]}.")
  out_shape = (sum(p.shape[0] for p in pieces),) + pieces[0].shape[1:]
  flat = [p.reshape(p.size // LANES, LANES) for p in pieces]

  @jax.custom_batching.custom_vmap
  def copy(*flat):
    return _copy_in_chunks(flat, config, CHUNK_PIECES)

  @copy.def_vmap
  def _copy_batched(axis_size, in_batched, *flat):
    # The launches share one mutable buffer, which has no batch axis: under vmap every
    # member would write the same rows. XLA's concatenate keeps the members apart.
    flat = [f if b else jnp.broadcast_to(f, (axis_size,) + f.shape)
            for f, b in zip(flat, in_batched)]
    return jnp.concatenate(flat, axis=1), True

  return copy(*flat).reshape(out_shape)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _copy_in_chunks(flat, config: StackConfig, chunk_pieces: int):
  """The ``(rows, LANES)`` pieces ``flat`` stacked, ``chunk_pieces`` (>= 1) per launch."""
  dtype = jnp.dtype(flat[0].dtype)
  # Every launch writes its rows of this one buffer (a mutable array: no copy between).
  out = jax.empty_ref(jax.ShapeDtypeStruct((sum(f.shape[0] for f in flat), LANES), dtype))
  first_row = 0
  for i in range(0, len(flat), chunk_pieces):
    chunk = flat[i:i + chunk_pieces]
    _build(tuple(f.shape[0] for f in chunk), dtype, config)(
        jnp.full((1,), first_row, jnp.int32), *chunk, out)
    first_row += sum(f.shape[0] for f in chunk)
  return jax.freeze(out)


@functools.lru_cache(maxsize=None)
def _build(rows: tuple[int, ...], dtype, config: StackConfig):
  """The kernel that copies pieces of ``rows[i] × LANES`` elements (one CTA per block)
  into an output ref from the row its first operand holds."""
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from ortho_optax.pallas.matmul import _plgpu_kernel_args

  br = config.block_rows
  blocks = [r // br for r in rows]
  starts = [sum(blocks[:i]) for i in range(len(blocks))]
  row_offsets = [sum(rows[:i]) for i in range(len(rows))]

  def body(first_row_gmem, *refs):
    *ins, out = refs
    idx = lax.axis_index("block")
    first_row = first_row_gmem[0]

    @functools.partial(pl.run_scoped, smem=plgpu.SMEM((br, LANES), dtype),
                       barrier=plgpu.Barrier(num_barriers=1))
    def _scope(smem, barrier):
      # One branch per piece (static refs); exactly one is taken by each CTA.
      for src, start, n, off in zip(ins, starts, blocks, row_offsets):
        @pl.when(jnp.logical_and(idx >= start, idx < start + n))
        def _copy(src=src, start=start, off=off):
          t = idx - start
          plgpu.copy_gmem_to_smem(src.at[pl.ds(t * br, br)], smem, barrier.at[0])
          plgpu.barrier_wait(barrier.at[0])
          plgpu.copy_smem_to_gmem(smem, out.at[pl.ds(first_row + off + t * br, br)])
          plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(body, grid=(sum(blocks),), grid_names=("block",),
                      **_plgpu_kernel_args(()))


__all__ = ["CHUNK_PIECES", "LANES", "StackConfig", "concatenate", "prefers", "supports"]
