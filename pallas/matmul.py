"""Batched bf16 matmul kernels for Newton–Schulz on Hopper (Pallas Mosaic GPU).

One kernel builder covers the three GEMMs of a quintic Newton–Schulz step
``A = X·Xᵀ``, ``B = b·A + c·A·A``, ``X' = a·X + B·X`` on stacks ``(batch, m, n)``:

* ``rhs_transposed=True`` multiplies by the transpose of the right operand, read as
  ``(n, k)`` tiles and transposed in shared memory by the ``wgmma`` descriptor (no copy);
* ``upper=True`` (symmetric outputs ``X·Xᵀ`` and ``A·A = A·Aᵀ``) computes only the
  128×128 tiles on or above the diagonal and writes each off-diagonal tile twice: at
  ``(i, j)`` and, transposed in registers (``WGMMA -> WGMMA_TRANSPOSED`` layout cast) and
  shared memory, at ``(j, i)``. That halves the flops of the two symmetric products;
* the epilogue forms ``beta·(lhs @ rhs) + alpha·add`` in float32 before the one bf16
  rounding (``add`` is read tile by tile with TMA), so ``b·A`` and ``a·X`` cost no pass;
  ``alpha``/``beta`` are read at run time from a 2-element array, so one compiled kernel
  serves every Newton–Schulz step of a shape;
* ``split_k > 1`` splits the contraction over independent work items (for few output
  tiles and a long contraction, e.g. the Gram of a 1024×4096 matrix) and sums the
  partial products in float32 with XLA, where ``alpha``/``beta``/``add`` then go too.

The structure follows JAX's ``jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu``: a
persistent grid of one CTA per SM loops over work items (``plgpu.nd_loop``); each CTA
runs a warp-specialized pipeline (``plgpu.emit_pipeline_warp_specialized``: one memory
warpgroup issuing TMA copies, two compute warpgroups issuing ``wgmma``), the two compute
warpgroups sharing the left tile and each owning ``tile_n`` columns of the right one.

References:
  JAX, ``jax/experimental/pallas/ops/gpu/hopper_matmul_mgpu.py`` (structure, pipeline).
  Boissin et al., *Turbo-Muon*, arXiv 2512.04632 (symmetric kernels, fused a·X + B·X).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Tile sizes of one kernel launch.

  Attributes:
    tile_m: rows of the output tile of a CTA (both compute warpgroups share them).
    tile_n: columns per compute warpgroup; a CTA covers ``tile_m × 2·tile_n``. With
      ``upper=True`` it must equal ``tile_m`` (square symmetric sub-tiles).
    tile_k: contraction depth of one pipeline stage (64 bf16 = one 128-byte swizzle row).
    max_concurrent_steps: pipeline stages in flight (shared-memory buffers per operand).
    split_k: number of independent contraction chunks (partials summed by XLA).
    grid_tile_width: (full grid only) width of the column bands of the snake order of
      output tiles, so that concurrently running CTAs share operand tiles in L2.
    epilogue_rows: rows of the output staged in shared memory at a time (0: the whole
      ``tile_m``). ``64`` halves the epilogue buffers (32 KB instead of 64 KB for 128×128
      warpgroup tiles), which leaves room for a 4th pipeline stage; the tile is then
      written (and mirrored) in row bands of 64, one TMA store after the other.
    prefetch_add: (whole-tile epilogue only) issue the TMA load of the ``add`` tile before
      the main loop instead of after it, so its latency hides behind the MMAs.
  """
  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 64
  max_concurrent_steps: int = 3
  split_k: int = 1
  grid_tile_width: int = 4
  epilogue_rows: int = 0
  prefetch_add: bool = False

  @property
  def cta_n(self) -> int:
    return 2 * self.tile_n


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


@functools.lru_cache(maxsize=None)
def num_sms() -> int:
  """Streaming multiprocessors of the default device (132 on an H100/H200 SXM)."""
  try:
    return int(jax.devices()[0].core_count)
  except Exception:  # pylint: disable=broad-except
    return 132


def _tiles(m: int, n: int, upper: bool, config: TuningConfig) -> int:
  """CTA output tiles of one ``m × n`` product."""
  if upper:
    c = m // config.cta_n
    return c * (c + 1)  # c(c+1)/2 super-blocks of cta_n × cta_n, two CTA tiles each
  return (m // config.tile_m) * (n // config.cta_n)


def work_items(batch: int, m: int, n: int, *, upper: bool, config: TuningConfig) -> int:
  """Number of CTA work items (output tiles × batch × split_k) of one launch."""
  return batch * config.split_k * _tiles(m, n, upper, config)


def _check(batch, m, n, k, *, upper, config):
  cfg = config
  if upper and (cfg.tile_m != cfg.tile_n or m != n):
    raise ValueError(f"upper=True needs a square output and tile_m == tile_n, got "
                     f"{(m, n)} and {cfg}.")
  if m % (cfg.cta_n if upper else cfg.tile_m) or n % cfg.cta_n:
    raise ValueError(f"output {(m, n)} must be a multiple of the CTA tile of {cfg}.")
  if k % (cfg.split_k * cfg.tile_k):
    raise ValueError(f"contraction {k} must be a multiple of split_k·tile_k of {cfg}.")
  if cfg.tile_k != 64:
    raise ValueError(f"tile_k must be 64 (one 128-byte swizzle row of bf16), got {cfg}.")
  rows = cfg.epilogue_rows or cfg.tile_m
  if rows % 64 or cfg.tile_m % rows:
    raise ValueError(f"epilogue_rows must be 0 or a multiple of 64 dividing tile_m, got {cfg}.")
  if cfg.prefetch_add and rows != cfg.tile_m:
    raise ValueError(f"prefetch_add needs the whole-tile epilogue (epilogue_rows 0), got {cfg}.")


@dataclasses.dataclass(frozen=True)
class _Problem:
  """One product of a launch, as the kernel body sees it: its refs and static shape."""
  lhs: object
  rhs: object
  add: object
  coef: object
  out: object
  batch: int
  m: int
  n: int
  k: int
  upper: bool
  rhs_transposed: bool
  start: int = 0      # first work item of this product in the launch's item numbering


def _kernel_body(problems, schedule_gmem, *, config, slots, mirror=True):
  """Kernel body (Lane semantics) for one or more products sharing a tile config; see
  the module docstring for the math. Work item ``lin`` of the persistent loop is item
  ``schedule[lin]`` (``-1``: idle) when a schedule is given, else item ``lin``; items
  ``[pr.start, pr.start + items)`` belong to product ``pr``."""
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  cfg = config
  tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
  cta_n = cfg.cta_n
  split = cfg.split_k
  transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  rhs_transposed = problems[0].rhs_transposed  # one operand layout per launch (shared SMEM)
  out_dtype = problems[0].out.dtype

  lhs_spec = plgpu.BlockSpec((tm, tk), lambda kk: (0, kk), transforms=transforms)
  if rhs_transposed:
    rhs_spec = plgpu.BlockSpec((cta_n, tk), lambda kk: (0, kk), transforms=transforms)
  else:
    rhs_spec = plgpu.BlockSpec((tk, cta_n), lambda kk: (kk, 0), transforms=transforms)

  def get_pipeline(body, compute_context, k_iters):
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(k_iters,),
        memory_registers=40,
        in_specs=[lhs_spec, rhs_spec],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=cfg.max_concurrent_steps,
        compute_context=compute_context,
    )

  def views(pr, b, s, row0, col0):
    ks = pr.k // split
    kslice = pl.ds(s * ks, ks)
    lhs = pr.lhs.at[b, pl.ds(row0, tm), kslice]
    if rhs_transposed:
      rhs = pr.rhs.at[b, pl.ds(col0, cta_n), kslice]
    else:
      rhs = pr.rhs.at[b, kslice, pl.ds(col0, cta_n)]
    return lhs, rhs

  ignore = lambda *_, **__: None
  er = cfg.epilogue_rows or tm            # rows staged in shared memory per store
  bands = tm // er
  first = problems[0]
  scoped = dict(
      pipeline_allocs=get_pipeline(ignore, ignore, first.k // split // tk).get_allocations(
          *views(first, 0, 0, 0, 0)),
      out_smem=plgpu.SMEM((2, er, tn), out_dtype, transforms=transforms),
  )
  if any(pr.add is not None for pr in problems):
    scoped["add_barrier"] = plgpu.Barrier(num_barriers=2)

  @functools.partial(pl.run_scoped, collective_axes="wg", **scoped)
  def _scope(pipeline_allocs, out_smem, add_barrier=None):
    wg = lax.axis_index("wg")

    def run_item(pr, local):
      """Output tile ``local`` (of this product's items) on this CTA."""
      tiles = _tiles(pr.m, pr.n, pr.upper, cfg)
      k_iters = pr.k // split // tk
      t = lax.rem(local, tiles)
      rest = lax.div(local, tiles)
      s = lax.rem(rest, split)
      b = lax.div(rest, split)
      if pr.upper:
        c_sup = pr.m // cta_n               # super-blocks per side
        # Super-block triangle {(I, J): I <= J < C} folded onto a (C+1)-wide rectangle:
        # row q pairs with row C-1-q (C-q and q+1 tiles), so no sqrt is needed.
        sup = lax.div(t, 2)
        half = lax.rem(t, 2)
        q = lax.div(sup, c_sup + 1)
        r = lax.rem(sup, c_sup + 1)
        lo = r < c_sup - q
        big_i = lax.select(lo, q, c_sup - 1 - q)
        big_j = lax.select(lo, q + r, r - 1)
        i_blk = 2 * big_i + half            # row block (tile_m rows)
        j_cta = big_j                       # column block (cta_n columns)
      else:
        m_iters, n_iters = pr.m // tm, pr.n // cta_n
        i_blk, j_cta = plgpu.planar_snake(
            t, (m_iters, n_iters), 1, min(cfg.grid_tile_width, n_iters))
      row0 = i_blk * tm
      col0 = j_cta * cta_n
      n_blk = j_cta * 2 + wg                # this warpgroup's column block (tile_n cols)
      wg_cols = pl.ds(wg * tn, tn)
      add_gmem, out_gmem = pr.add, pr.out

      def mma_body(_, a_smem, b_smem, acc_ref):
        if rhs_transposed:
          b_view = b_smem.at[wg_cols, :].transpose((1, 0))
        else:
          b_view = b_smem.at[:, wg_cols]
        plgpu.wgmma(acc_ref, a_smem, b_view)
        plgpu.wgmma_wait(0)
        return acc_ref

      def combine(acc, addend):
        if pr.coef is None:  # a split-K partial product: combined by XLA afterwards
          return acc
        scaled = acc * pr.coef[1]
        if addend is None:
          return scaled
        return scaled + addend.astype(jnp.float32) * pr.coef[0]

      def compute_context(eval_pipeline):
        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), jnp.float32))
        def _acc_scope(acc_ref):
          o_smem = out_smem.at[wg]
          col_blk = pl.ds(n_blk * tn, tn)
          prefetch = add_gmem is not None and cfg.prefetch_add
          if prefetch:
            # The previous tile's stores must have read the buffer before the addend
            # lands in it; issued now, the load overlaps this tile's main loop.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            plgpu.copy_gmem_to_smem(add_gmem.at[b, pl.ds(row0, tm), col_blk], o_smem,
                                    add_barrier.at[wg])
          eval_pipeline(acc_ref)
          acc = acc_ref[...]

          # Row bands of `er` rows: f32 epilogue, one bf16 rounding, TMA store.
          bands_out = []
          for h in range(bands):
            rows = pl.ds(row0 + h * er, er)
            acc_h = acc if bands == 1 else acc[h * er:(h + 1) * er, :]
            if not prefetch:
              # The previous TMA store must have read this buffer before reuse.
              plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            addend = None
            if add_gmem is not None:
              if not prefetch:
                plgpu.copy_gmem_to_smem(add_gmem.at[b, rows, col_blk], o_smem,
                                        add_barrier.at[wg])
              plgpu.barrier_wait(add_barrier.at[wg])
              addend = o_smem[...]
            res_h = combine(acc_h, addend).astype(out_dtype)
            bands_out.append(res_h)

            def store(res_h=res_h, rows=rows):
              o_smem[...] = res_h
              plgpu.commit_smem()
              plgpu.copy_smem_to_gmem(o_smem, out_gmem.at[s, b, rows, col_blk])

            if pr.upper:
              pl.when(n_blk >= i_blk)(store)
            else:
              store()
          if not (pr.upper and mirror):
            return

          @pl.when(n_blk > i_blk)
          def _mirror():
            # Tile (i, j) transposed is tile (j, i): band h of the mirror is the
            # transpose of columns [h·er, (h+1)·er) of this tile.
            for h in range(bands):
              cols = slice(h * er, (h + 1) * er)
              if bands == 1:
                part = bands_out[0]
              else:
                part = jnp.concatenate([r[:, cols] for r in bands_out], axis=0)
              plgpu.wait_smem_to_gmem(0, wait_read_only=True)
              o_smem.transpose((1, 0))[...] = plgpu.layout_cast(
                  part, plgpu.Layout.WGMMA_TRANSPOSED)
              plgpu.commit_smem()
              plgpu.copy_smem_to_gmem(
                  o_smem, out_gmem.at[s, b, pl.ds(n_blk * tn + h * er, er),
                                      pl.ds(row0, tm)])

      lhs_view, rhs_view = views(pr, b, s, row0, col0)
      get_pipeline(mma_body, compute_context, k_iters)(
          lhs_view, rhs_view, allocations=pipeline_allocs)

    @plgpu.nd_loop((slots,), collective_axes="sm")
    def _work_loop(loop_info):
      (lin,) = loop_info.index
      if schedule_gmem is None and len(problems) == 1:
        run_item(problems[0], lin)
        return
      item = lin if schedule_gmem is None else schedule_gmem[lin]
      for pr in problems:  # one branch per product (static refs and shapes)
        n_items = work_items(pr.batch, pr.m, pr.n, upper=pr.upper, config=cfg)
        pl.when(jnp.logical_and(item >= pr.start, item < pr.start + n_items))(
            functools.partial(run_item, pr, item - pr.start))

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _plgpu_kernel_args(out_struct):
  """``plgpu.kernel``'s output keyword (``out_shape`` was renamed ``out_type`` after JAX
  0.10) with the default compiler parameters."""
  import jax.experimental.pallas.mosaic_gpu as plgpu
  params = inspect.signature(plgpu.kernel).parameters
  out_kw = "out_type" if "out_type" in params else "out_shape"
  return {out_kw: out_struct, "compiler_params": plgpu.CompilerParams()}


def _plgpu_kernel(body, out_struct, grid):
  import jax.experimental.pallas.mosaic_gpu as plgpu
  return plgpu.kernel(
      body,
      **_plgpu_kernel_args(out_struct),
      grid=(grid,),
      grid_names=("sm",),
      num_threads=3,
      thread_name="wg",
  )


def _coefficients(alpha, beta):
  """``[alpha, beta]`` as a float32 operand of the kernel. The coefficients are always
  read at run time: every step of a Newton–Schulz iteration then runs the same compiled
  kernel (one Mosaic compilation per GEMM shape and config, not one per step)."""
  return jnp.stack([jnp.asarray(alpha, jnp.float32), jnp.asarray(beta, jnp.float32)])


def matmul(lhs, rhs, add=None, *, alpha=1.0, beta=1.0,
           rhs_transposed: bool = False, upper: bool = False,
           config: TuningConfig = TuningConfig(), grid: int | None = None,
           mirror: str = "kernel"):
  """``beta · lhs @ op(rhs) + alpha · add`` on bf16 stacks, rounded to bf16 once.

  Args:
    lhs: ``(batch, m, k)`` bf16.
    rhs: ``(batch, k, n)`` bf16, or ``(batch, n, k)`` with ``rhs_transposed``.
    add: optional ``(batch, m, n)`` bf16 addend.
    alpha, beta: scalars (Python numbers or traced), passed to the kernel as a 2-element
      float32 array, so the compiled kernel does not depend on their values.
    rhs_transposed: multiply by ``rhs`` transposed (its last two axes).
    upper: the product is symmetric (``m == n``): compute the upper tiles, mirror them.
    config: tile sizes; shapes must be multiples of its tiles (see :func:`_check`).
    grid: number of CTAs (default: the SM count, fewer when there is less work).
    mirror: with ``upper``, how the lower tiles are filled: ``"kernel"`` (transposed
      store of each upper tile in the epilogue) or ``"xla"`` (a select pass afterwards;
      a fallback kept for comparison).

  Returns:
    ``(batch, m, n)`` bf16.
  """
  batch, m, k = lhs.shape
  n = rhs.shape[1] if rhs_transposed else rhs.shape[2]
  _check(batch, m, n, k, upper=upper, config=config)
  if mirror not in ("kernel", "xla"):
    raise ValueError(f"mirror must be 'kernel' or 'xla', got {mirror!r}.")
  return _matmul(lhs, rhs, add, _coefficients(alpha, beta), rhs_transposed=rhs_transposed,
                 upper=upper, config=config, grid=grid, mirror=mirror)


# Jitted with the static layout: every call site with the same shapes and config reuses
# one traced (and lowered) kernel instead of tracing the kernel body again.
@functools.partial(jax.jit, static_argnames=("rhs_transposed", "upper", "config", "grid",
                                             "mirror"))
def _matmul(lhs, rhs, add, coef, *, rhs_transposed, upper, config, grid, mirror):
  batch, m, k = lhs.shape
  n = rhs.shape[1] if rhs_transposed else rhs.shape[2]
  split = config.split_k
  # Split partial products are plain; the combination happens in the f32 reduction.
  kernel_add = add if split == 1 else None
  kernel_coef = coef if split == 1 else None
  total = work_items(batch, m, n, upper=upper, config=config)
  grid = min(grid or num_sms(), total)
  out_struct = jax.ShapeDtypeStruct((split, batch, m, n), jnp.bfloat16)
  operands = [lhs, rhs] + [v for v in (kernel_add, kernel_coef) if v is not None]

  def body(*refs):
    lhs_gmem, rhs_gmem, *rest, out_gmem = refs
    add_gmem = rest.pop(0) if kernel_add is not None else None
    coef_gmem = rest.pop(0) if kernel_coef is not None else None
    problem = _Problem(lhs_gmem, rhs_gmem, add_gmem, coef_gmem, out_gmem, batch, m, n, k,
                       upper, rhs_transposed)
    _kernel_body([problem], None, config=config, slots=total, mirror=mirror == "kernel")

  out = _plgpu_kernel(body, out_struct, grid)(*operands)
  if upper and mirror == "xla":
    blk = jnp.arange(m) // config.tile_m
    keep = blk[:, None] <= blk[None, :]
    out = jnp.where(keep, out, jnp.swapaxes(out, -1, -2))

  if split == 1:
    return out[0]
  acc = coef[1] * jnp.sum(out.astype(jnp.float32), axis=0)
  if add is not None:
    acc = acc + coef[0] * add.astype(jnp.float32)
  return acc.astype(jnp.bfloat16)


@dataclasses.dataclass(frozen=True)
class Product:
  """One product ``beta · lhs @ op(rhs) + alpha · add`` of a :func:`grouped_matmul`.

  Attributes mean what :func:`matmul`'s arguments do (``alpha``/``beta`` are read at run
  time).
  """
  lhs: jax.Array
  rhs: jax.Array
  add: jax.Array | None = None
  alpha: float | jax.Array = 1.0
  beta: float | jax.Array = 1.0
  rhs_transposed: bool = False
  upper: bool = False


#: Fixed cost of one work item in the LPT schedule, in k-steps of ``tile_k``
#: (pipeline fill, epilogue and mirror stores; ~3-4 µs against ~0.7 µs per k-step).
ITEM_OVERHEAD_STEPS = 4


def lpt_schedule(costs, sms: int):
  """Slot table of a persistent launch: longest item first onto the least-loaded SM.

  Args:
    costs: cost of every work item, items numbered ``0..len(costs)-1``.
    sms: persistent CTAs; CTA ``s`` runs slots ``s, s + sms, s + 2·sms, …``
      (``plgpu.nd_loop``'s order).

  Returns:
    ``(table, loads)``: int32 numpy array of ``sms × rounds`` slots holding item numbers
    (``-1``: idle), and the per-CTA total cost.
  """
  import heapq
  import numpy as np
  order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
  heap = [(0.0, s) for s in range(sms)]
  lists = [[] for _ in range(sms)]
  for i in order:
    load, s = heapq.heappop(heap)
    lists[s].append(i)
    heapq.heappush(heap, (load + costs[i], s))
  rounds = max(len(l) for l in lists)
  table = np.full((rounds, sms), -1, np.int32)
  for s, items in enumerate(lists):
    table[:len(items), s] = items
  loads = [sum(costs[i] for i in items) for items in lists]
  return table.reshape(-1), loads


def grouped_matmul(products, *, config: TuningConfig = TuningConfig(),
                   grid: int | None = None) -> list:
  """Several independent :func:`matmul` products in one persistent launch.

  The work items (output tiles) of all products are spread over the SMs by
  :func:`lpt_schedule`, so products of different contraction lengths share the waves
  (e.g. the Gram matrices of a 48×768² and a 24×768×3072 stack: 5 + 3 waves of 132 SMs
  in two launches, ~4 waves' worth of time in one).

  Args:
    products: :class:`Product` s sharing ``rhs_transposed`` (one shared-memory layout).
    config: tile sizes (``split_k`` must be 1); every product's shapes must fit them.
    grid: number of CTAs (default: the SM count, fewer when there is less work).

  Returns:
    The products' ``(batch, m, n)`` bf16 results, in order.

  Raises:
    ValueError: for no products, mixed ``rhs_transposed``, split-K or shapes that do not
      fit the tiles.
  """
  products = list(products)
  if not products:
    raise ValueError("grouped_matmul needs at least one Product.")
  if len({p.rhs_transposed for p in products}) != 1:
    raise ValueError("grouped_matmul's products must share rhs_transposed, got "
                     f"{[p.rhs_transposed for p in products]}.")
  if config.split_k != 1:
    raise ValueError(f"grouped_matmul needs split_k=1, got {config}.")
  for p in products:
    batch, m, k = p.lhs.shape
    n = p.rhs.shape[1] if p.rhs_transposed else p.rhs.shape[2]
    _check(batch, m, n, k, upper=p.upper, config=config)
  layout = tuple((p.upper, p.rhs_transposed) for p in products)
  return _grouped_matmul(tuple((p.lhs, p.rhs, p.add) for p in products),
                         tuple(_coefficients(p.alpha, p.beta) for p in products),
                         layout=layout, config=config, grid=grid)


# Jitted with the static layout, as _matmul: one traced kernel per distinct set of shapes.
@functools.partial(jax.jit, static_argnames=("layout", "config", "grid"))
def _grouped_matmul(operand_sets, coefs, *, layout, config, grid):
  statics, costs, operands, out_structs = [], [], [], []
  for (lhs, rhs, add), (upper, rhs_transposed) in zip(operand_sets, layout):
    batch, m, k = lhs.shape
    n = rhs.shape[1] if rhs_transposed else rhs.shape[2]
    items = work_items(batch, m, n, upper=upper, config=config)
    # The product's static fields; the kernel body adds its refs.
    statics.append((add is not None, functools.partial(
        _Problem, batch=batch, m=m, n=n, k=k, upper=upper, rhs_transposed=rhs_transposed,
        start=len(costs))))
    costs += [k // config.tile_k + ITEM_OVERHEAD_STEPS] * items
    operands += [lhs, rhs] + ([add] if add is not None else [])
    out_structs.append(jax.ShapeDtypeStruct((1, batch, m, n), jnp.bfloat16))
  operands += list(coefs)
  grid = min(grid or num_sms(), len(costs))
  table, _ = lpt_schedule(costs, grid)
  operands.append(jnp.asarray(table))
  n_products = len(layout)

  def body(*refs):
    refs = list(refs)
    outs = refs[-n_products:]
    schedule_gmem = refs[-n_products - 1]
    coef_refs = refs[-2 * n_products - 1:-n_products - 1]
    ins = refs[:-2 * n_products - 1]
    problems = []
    for (has_add, problem), coef, out in zip(statics, coef_refs, outs):
      lhs, rhs = ins.pop(0), ins.pop(0)
      add = ins.pop(0) if has_add else None
      problems.append(problem(lhs=lhs, rhs=rhs, add=add, coef=coef, out=out))
    _kernel_body(problems, schedule_gmem, config=config, slots=int(table.shape[0]))

  outs = _plgpu_kernel(body, tuple(out_structs), grid)(*operands)
  return [o[0] for o in outs]


def flops(batch: int, m: int, n: int, k: int, *, upper: bool) -> float:
  """Useful flops of one product (one triangle for symmetric outputs)."""
  f = 2.0 * batch * m * n * k
  return f / 2 if upper else f


def pick_split(batch: int, m: int, n: int, k: int, *, upper: bool,
               base: TuningConfig = TuningConfig(), sms: int | None = None) -> TuningConfig:
  """Chooses ``split_k`` so that the work items fill the SMs without tiny chunks.

  Cost model (seconds, H100/H200 class): waves × per-item time at ~5 TFLOP/s per SM
  with a fixed ~1.5 µs per item (pipeline fill + epilogue), plus, when split, the XLA
  pass that sums the bf16 partials in f32 (~3 TB/s, ~4 µs launch). Powers of two only.
  """
  sms = sms or num_sms()
  tiles = work_items(batch, m, n, upper=upper, config=dataclasses.replace(base, split_k=1))
  per_sm_flops = 5e12
  best, best_cost = 1, None
  s = 1
  while k % (s * base.tile_k) == 0 and k // s >= 4 * base.tile_k and s <= 16:
    waves = math.ceil(tiles * s / sms)
    item = 2.0 * base.tile_m * base.cta_n * (k // s) / per_sm_flops + 1.5e-6
    cost = waves * item
    if s > 1:
      cost += (s + 2) * 2.0 * batch * m * n / 3e12 + 4e-6
    if best_cost is None or cost < best_cost:
      best, best_cost = s, cost
    s *= 2
  return dataclasses.replace(base, split_k=best)
