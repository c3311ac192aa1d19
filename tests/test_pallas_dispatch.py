"""``ortho_optax.pallas`` off the GPU: availability, dispatch errors, kernel logic.

The kernel logic (tile schedule of the one-triangle products, mirroring, epilogues,
split-K, padding, AOL) runs here under Mosaic GPU's CPU interpreter on small shapes;
the Hopper lowering and speed are covered by tests/test_pallas_gpu.py on the GPU.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from ortho_optax.newton_schulz import newton_schulz as ns_entry
from ortho_optax import pallas as opl
from ortho_optax.pallas import matmul as mm
from ortho_optax.pallas import ns
from ortho_optax import coefficients as ns_coef

TURBO_AOL = ((3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037))

on_cpu = pytest.mark.skipif(
    any(d.platform == "gpu" for d in jax.devices()), reason="CPU-only behaviour")


def _rel(out, ref):
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert np.all(np.isfinite(out))
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


@on_cpu
def _has_gpu_interpreter() -> bool:
  try:
    import jax.experimental.pallas.mosaic_gpu as plgpu
    return hasattr(plgpu, "force_gpu_interpret_mode")
  except ImportError:
    return False


#: Mosaic GPU's CPU interpreter (``plgpu.force_gpu_interpret_mode``) arrived after JAX 0.10.
needs_interpreter = pytest.mark.skipif(
    not _has_gpu_interpreter(), reason="needs Mosaic GPU's CPU interpreter (JAX >= 0.11)")


def test_is_available_false_on_cpu():
  assert opl.is_available() is False


@on_cpu
def test_pallas_backend_off_gpu_raises_clear_error():
  x = jnp.ones((8, 16), jnp.float32)
  with pytest.raises(RuntimeError, match="pallas"):
    ns_entry(x, backend="pallas")
  with pytest.raises(RuntimeError, match="Hopper"):
    opl.newton_schulz(x.astype(jnp.bfloat16)[None], TURBO_AOL)


@on_cpu
def test_auto_backend_falls_back_to_xla_on_cpu():
  x = jax.random.normal(jax.random.key(0), (16, 32), jnp.float32)
  np.testing.assert_array_equal(
      np.asarray(ns_entry(x, backend="auto")),
      np.asarray(ns_entry(x, backend="xla")))


@on_cpu
def test_uses_kernels_and_newton_schulz_of_transpose_off_gpu():
  from ortho_optax.newton_schulz import newton_schulz_of_transpose, uses_kernels
  assert uses_kernels((48, 768, 768), jnp.float32) is False  # auto: XLA without a GPU
  with pytest.raises(RuntimeError, match="pallas"):
    uses_kernels((48, 768, 768), jnp.float32, backend="pallas")
  y = jax.random.normal(jax.random.key(3), (2, 16, 16), jnp.float32)
  # One step: AOL acts in the first (each step costs the interpreter ~10 s).
  kw = dict(preconditioning="aol", coefficients="turbo_aol", steps=1, eps=1e-6)
  np.testing.assert_array_equal(  # the XLA path: the transposes, nothing else
      np.asarray(newton_schulz_of_transpose(y, **kw)),
      np.asarray(jnp.swapaxes(ns_entry(jnp.swapaxes(y, 1, 2), **kw), 1, 2)))
  with pytest.raises(ValueError, match="preconditioning"):
    newton_schulz_of_transpose(y, preconditioning="svd")


@pytest.mark.parametrize("x,coefficients,match", [
    (jnp.ones((8, 16), jnp.bfloat16), TURBO_AOL, "stack"),
    (jnp.ones((1, 8, 16), jnp.float32), TURBO_AOL, "bfloat16"),
    (jnp.ones((1, 16, 8), jnp.bfloat16), TURBO_AOL, "wide"),
    (jnp.ones((1, 8, 16), jnp.bfloat16), ((1.0, 2.0),), "triples"),
    (jnp.ones((1, 8, 16), jnp.bfloat16), (), "triples"),
])
def test_bad_inputs_raise_value_error(x, coefficients, match):
  with pytest.raises(ValueError, match=match):
    opl.newton_schulz(x, coefficients)


def test_empty_stack_is_returned_unchanged(monkeypatch):
  monkeypatch.setattr(opl, "is_available", lambda: True)
  x = jnp.zeros((0, 8, 16), jnp.bfloat16)
  assert opl.newton_schulz(x, TURBO_AOL).shape == (0, 8, 16)


def test_bad_tiles_raise_value_error():
  x = jnp.ones((1, 384, 256), jnp.bfloat16)
  with pytest.raises(ValueError, match="multiple"):
    mm.matmul(x, x, rhs_transposed=True, upper=True)
  with pytest.raises(ValueError, match="mirror"):
    mm.matmul(x[:, :256], x[:, :256], rhs_transposed=True, upper=True, mirror="nope")


def test_pick_split_fills_the_gpu_for_wide_gram():
  assert mm.pick_split(1, 1024, 1024, 4096, upper=True, sms=132).split_k > 1
  assert mm.pick_split(1, 8192, 8192, 8192, upper=True, sms=132).split_k == 1
  for b, m, n in [(1, 768, 768), (48, 768, 3072), (1, 2048, 8192)]:
    cfg = mm.pick_split(b, m, m, n, upper=True, sms=132)
    assert n % (cfg.split_k * cfg.tile_k) == 0


def test_prefers_kernels_matches_measurements():
  assert not opl.prefers_kernels(1, 768, 768)
  assert not opl.prefers_kernels(1, 3072, 768)
  assert opl.prefers_kernels(1, 1024, 4096)
  assert opl.prefers_kernels(48, 768, 768)
  assert opl.prefers_kernels(1, 8192, 8192)


def test_upper_tile_schedule_covers_the_triangle_once():
  # The in-kernel fold (super-block rows q and C-1-q share a (C+1)-wide row), in numpy.
  for c in range(1, 9):
    seen = []
    for sup in range(c * (c + 1) // 2):
      q, r = divmod(sup, c + 1)
      lo = r < c - q
      seen.append((q, q + r) if lo else (c - 1 - q, r - 1))
    assert sorted(seen) == [(i, j) for i in range(c) for j in range(i, c)]


def _three_products_in_interpreter(seed, batch, m, k, config, gram_config):
  """Gram (mirrored), polynomial (addend + mirror) and apply (addend) GEMMs in Mosaic
  GPU's CPU interpreter with persistent grids smaller than the work, each paired with
  its float32 reference."""
  import jax.experimental.pallas.mosaic_gpu as plgpu
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(k1, (batch, m, k), jnp.bfloat16)
  a = jax.random.normal(k2, (batch, m, m), jnp.float32)
  a = (a + jnp.swapaxes(a, 1, 2)).astype(jnp.bfloat16)
  xf, af = x.astype(jnp.float32), a.astype(jnp.float32)
  with plgpu.force_gpu_interpret_mode():
    gram = mm.matmul(x, x, rhs_transposed=True, upper=True, config=gram_config, grid=2)
    poly = mm.matmul(a, a, a, alpha=-0.7, beta=0.3, rhs_transposed=True, upper=True,
                     config=config, grid=2)
    app = mm.matmul(a, x, x, alpha=1.5, beta=-0.5, config=config, grid=3)
  return [(gram, xf @ jnp.swapaxes(xf, 1, 2)), (poly, 0.3 * af @ af - 0.7 * af),
          (app, -0.5 * af @ xf + 1.5 * xf)]


@needs_interpreter
def test_kernels_in_cpu_interpreter():
  # Gram with split-K (partials + f32 XLA sum); polynomial and apply with the fused
  # in-kernel epilogue (split_k=1); grids smaller than the work (persistent loop).
  pairs = _three_products_in_interpreter(
      1, 1, 512, 256, mm.TuningConfig(max_concurrent_steps=2),
      mm.TuningConfig(max_concurrent_steps=2, split_k=2))
  for out, ref in pairs:
    assert _rel(out, ref) < 1e-2


@needs_interpreter
@pytest.mark.parametrize("variant", [
    dict(epilogue_rows=64, max_concurrent_steps=4),   # banded epilogue, 4 stages
    dict(prefetch_add=True),                          # addend loaded before the MMAs
])
def test_epilogue_variants_in_cpu_interpreter(variant):
  # Every tile of the symmetric products (mirrored bands included) and of the apply GEMM
  # must be written with the right value; a 3×3 grid of tiles with a persistent grid of
  # 2 CTAs covers diagonal, upper and mirrored tiles and CTA reuse of the buffers.
  cfg = mm.TuningConfig(**variant)
  pairs = _three_products_in_interpreter(3, 2, 768, 256, cfg, cfg)
  for out, ref in pairs:
    assert _rel(out, ref) < 1e-2
  for out, ref in pairs[:2]:
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=0.05,
                               atol=0.05 * float(jnp.max(jnp.abs(ref))))


@needs_interpreter
def test_traced_coefficients_in_cpu_interpreter():
  # alpha/beta as traced scalars reach the kernel as a 2-element array at run time.
  import jax.experimental.pallas.mosaic_gpu as plgpu
  k1, k2 = jax.random.split(jax.random.key(4))
  bm = jax.random.normal(k1, (1, 256, 256), jnp.bfloat16)
  x = jax.random.normal(k2, (1, 256, 512), jnp.bfloat16)
  f = jax.jit(lambda a, b: mm.matmul(bm, x, x, alpha=a, beta=b,
                                     config=mm.TuningConfig(max_concurrent_steps=2)))
  with plgpu.force_gpu_interpret_mode():
    out = f(jnp.float32(1.5), jnp.float32(-0.5))
  xf, bf = x.astype(jnp.float32), bm.astype(jnp.float32)
  assert _rel(out, -0.5 * bf @ xf + 1.5 * xf) < 1e-2


def test_bad_epilogue_config_raises():
  x = jnp.zeros((1, 256, 256), jnp.bfloat16)
  with pytest.raises(ValueError, match="epilogue_rows"):
    mm.matmul(x, x, config=mm.TuningConfig(epilogue_rows=96))
  with pytest.raises(ValueError, match="prefetch_add"):
    mm.matmul(x, x, x, config=mm.TuningConfig(epilogue_rows=64, prefetch_add=True))


@needs_interpreter
def test_newton_schulz_in_cpu_interpreter_padded_aol():
  import jax.experimental.pallas.mosaic_gpu as plgpu
  x = jax.random.normal(jax.random.key(2), (1, 130, 300), jnp.float32).astype(jnp.bfloat16)
  with plgpu.force_gpu_interpret_mode():
    out = opl.newton_schulz(x, TURBO_AOL[:1], aol=True, eps=1e-7)
  assert out.shape == x.shape and out.dtype == jnp.bfloat16
  ref = ns.reference(x, TURBO_AOL[:1], aol=True, eps=1e-7)
  ref_bf16 = ns.reference(x, TURBO_AOL[:1], aol=True, eps=1e-7, dtype=jnp.bfloat16)
  assert _rel(out, ref) < max(3 * _rel(ref_bf16, ref), 1e-2)


@needs_interpreter
def test_orthogonalize_on_kernels_keeps_the_output_axis_aol(monkeypatch):
  # On the kernel path square Flax kernels are not transposed: AOL scales the columns of
  # the stored (in, out) matrix (the rows of the (out, in) view) from a column Gram.
  # Each leaf must match the per-leaf (out, in) reference to bf16 accuracy; AOL on the
  # wrong side would be ~5% off (the stored orientation's own AOL).
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from ortho_optax.newton_schulz import newton_schulz
  from ortho_optax.stages.orthogonalize import orthogonalize
  monkeypatch.setattr(opl, "is_available", lambda: True)
  rand = lambda shape, seed: jax.random.normal(jax.random.key(seed), shape, jnp.float32)
  upd = {"q": rand((40, 40), 1), "k": rand((40, 40), 2), "fc": rand((40, 72), 3),
         "proj": rand((72, 40), 4)}
  # One step: AOL acts in the first (each step costs the interpreter ~10 s).
  kw = dict(preconditioning="aol", coefficients="turbo_aol", steps=1, eps=1e-6)
  with plgpu.force_gpu_interpret_mode():
    tx = orthogonalize(backend="pallas", **kw)
    out, _ = tx.update(upd, tx.init(upd))
  for name, x in upd.items():
    want = newton_schulz(x.T, backend="xla", compute_dtype=jnp.float32, **kw).T
    bf16 = newton_schulz(x.T, backend="xla", **kw).T
    assert out[name].dtype == jnp.float32
    assert _rel(out[name], want) < 1.5 * _rel(bf16, want) + 2e-3, name


def test_stack_supports_and_rejects_with_clear_errors():
  from ortho_optax.pallas import stack
  block = stack.StackConfig().block_rows * stack.LANES
  good = [jnp.zeros((2, block // 4, 4), jnp.bfloat16), jnp.zeros((1, block // 4, 4),
                                                                    jnp.bfloat16)]
  assert stack.supports(good)
  assert not stack.supports([])
  assert not stack.supports([good[0], good[1].astype(jnp.float32)])  # mixed dtypes
  assert not stack.supports([good[0], jnp.zeros((1, block // 2, 2), jnp.bfloat16)])
  assert not stack.supports([jnp.zeros((1, 40, 40), jnp.bfloat16)])  # not whole blocks
  with pytest.raises(ValueError, match=r"whole number of 64×256.*\(1, 40, 40\)"):
    stack.concatenate([jnp.zeros((1, 40, 40), jnp.bfloat16)] * 2)


@pytest.mark.parametrize("count", [2, 24, 48])
def test_kernel_stacks_use_tma_copies_for_any_piece_count(monkeypatch, count):
  # Long stacks are copied in chunks by one kernel, so their count does not matter.
  from ortho_optax.orthogonalizers import NewtonSchulzSpec, PallasNewtonSchulz
  from ortho_optax.pallas import stack
  monkeypatch.setattr(opl, "is_available", lambda: True)
  calls = []
  monkeypatch.setattr(stack, "concatenate",
                      lambda ps, **kw: calls.append(len(ps)) or jnp.concatenate(ps))
  orth = PallasNewtonSchulz(NewtonSchulzSpec(((3.0, -3.2, 1.2),), "frobenius", 1e-7,
                                             jnp.bfloat16), forced=True)
  pieces = [jnp.full((1, 128, 128), i, jnp.float32) for i in range(count)]
  out = orth.stack(pieces)
  assert out.on_kernels and out.matrices.dtype == jnp.bfloat16
  assert calls == [count]
  np.testing.assert_array_equal(np.asarray(out.matrices[:, 0, 0], np.float32), np.arange(count))
  assert stack.prefers(pieces)


@needs_interpreter
def test_stack_concatenate_under_vmap_keeps_the_members_apart(monkeypatch):
  # The launches share one buffer without a batch axis; under vmap the stack is XLA's
  # concatenate, batched and unbatched pieces mixed.
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from ortho_optax.pallas import stack
  monkeypatch.setattr(stack, "CHUNK_PIECES", 2)
  cfg = stack.StackConfig(block_rows=32)
  keys = jax.random.split(jax.random.key(7), 3)
  a, b, c = [jax.random.normal(k, (2, n, 32, 256)).astype(jnp.bfloat16)
             for k, n in zip(keys, (1, 2, 1))]
  cat = lambda *ps: stack.concatenate(ps, config=cfg)
  with plgpu.force_gpu_interpret_mode():
    out = jax.jit(jax.vmap(cat))(a, b, c)
    mixed = jax.vmap(cat, in_axes=(0, None, 0))(a, b[0], c)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.concatenate([a, b, c], 1)))
  np.testing.assert_array_equal(
      np.asarray(mixed), np.asarray(jnp.concatenate([a, jnp.stack([b[0]] * 2), c], 1)))


@needs_interpreter
def test_stack_concatenate_launches_one_kernel_per_distinct_chunk(monkeypatch):
  # 7 equal pieces in chunks of 3: launches of 3, 3 and 1 pieces of two kernels (the two
  # full chunks share one: the row they start at is an operand, not a constant, so XLA
  # sees the same kernel twice), every element where jnp.concatenate puts it.
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from ortho_optax.pallas import stack
  monkeypatch.setattr(stack, "CHUNK_PIECES", 3)
  stack._build.cache_clear()
  keys = jax.random.split(jax.random.key(5), 7)
  pieces = [jax.random.normal(k, (2, 32, 256), jnp.float32).astype(jnp.bfloat16)
            for k in keys]
  cfg = stack.StackConfig(block_rows=32)
  with plgpu.force_gpu_interpret_mode():
    jaxpr = jax.make_jaxpr(lambda ps: stack.concatenate(ps, config=cfg))(pieces)
    out = jax.jit(lambda ps: stack.concatenate(ps, config=cfg))(pieces)
  def launches(jaxpr):  # kernel launches, through every sub-jaxpr (jit, custom_vmap)
    names = []
    for e in jaxpr.eqns:
      if e.primitive.name in ("mpmd_map", "core_map", "pallas_call"):
        names.append(e.primitive.name)
        continue
      for v in e.params.values():
        inner = getattr(v, "jaxpr", v)  # a ClosedJaxpr or a Jaxpr
        if hasattr(inner, "eqns"):
          names += launches(inner)
    return names

  assert len(launches(jaxpr.jaxpr)) == 3, jaxpr
  assert stack._build.cache_info().currsize == 2
  np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.concatenate(pieces)))


@needs_interpreter
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("chunk_pieces", [1, 2, 3, 12])
def test_stack_concatenate_in_cpu_interpreter(monkeypatch, dtype, chunk_pieces):
  # Bit-exact concatenation of pieces of different batch sizes, in launches of 1 to 4
  # pieces (each chunk starts at its own row); blocks of 32 rows so the 64-row pieces take
  # two CTAs each.
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from ortho_optax.pallas import stack
  monkeypatch.setattr(stack, "CHUNK_PIECES", chunk_pieces)
  keys = jax.random.split(jax.random.key(3), 4)
  pieces = [jax.random.normal(k, (b, 64, 256), jnp.float32).astype(dtype)
            for k, b in zip(keys, (1, 3, 1, 2))]
  with plgpu.force_gpu_interpret_mode():
    out = jax.jit(lambda ps: stack.concatenate(
        ps, config=stack.StackConfig(block_rows=32)))(pieces)
  assert out.dtype == dtype and out.shape == (7, 64, 256)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.concatenate(pieces)))


@needs_interpreter
def test_orthogonalize_on_kernels_stacks_by_tma_copies(monkeypatch):
  # Leaves of whole 64×256 blocks are stacked by the TMA kernel (square ones as stored,
  # the tall one transposed into the wide stack); the result matches the XLA path.
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from ortho_optax.pallas import stack
  from ortho_optax.stages.orthogonalize import orthogonalize
  monkeypatch.setattr(opl, "is_available", lambda: True)
  calls = []
  real = stack.concatenate
  monkeypatch.setattr(stack, "concatenate",
                      lambda ps, **kw: calls.append(len(ps)) or real(ps, **kw))
  rand = lambda shape, seed: jax.random.normal(jax.random.key(seed), shape, jnp.float32)
  upd = {"q": rand((128, 128), 1), "k": rand((128, 128), 2), "fc": rand((128, 256), 3),
         "proj": rand((256, 128), 4)}
  with plgpu.force_gpu_interpret_mode():  # one step: the stacking is what is tested
    tx = orthogonalize(backend="pallas", steps=1)
    out, _ = tx.update(upd, tx.init(upd))
  assert sorted(calls) == [2, 2]
  tx = orthogonalize(backend="xla", steps=1)
  want, _ = tx.update(upd, tx.init(upd))
  for name in upd:
    assert _rel(out[name], want[name]) < 2e-2, name


def test_lpt_schedule_runs_every_item_once_and_balances():
  costs = [52] * 288 + [16] * 576  # the GPT-2-small Gram tiles: K = 3072 and K = 768
  table, loads = mm.lpt_schedule(costs, 132)
  assert table.shape[0] % 132 == 0
  items = table[table >= 0]
  assert sorted(items.tolist()) == list(range(len(costs)))
  # LPT is within one item of the mean load here; one launch per stack would need
  # 3 waves of 52 + 5 of 16 = 236.
  assert max(loads) <= sum(costs) / 132 + 52 and max(loads) < 236
  rounds = table.reshape(-1, 132)
  for s in range(132):  # CTA s runs slots s, s + 132, ...: its items add up to its load
    assert sum(costs[i] for i in rounds[:, s] if i >= 0) == loads[s]


def test_grouped_matmul_rejects_bad_products():
  x = jnp.zeros((1, 256, 256), jnp.bfloat16)
  with pytest.raises(ValueError, match="at least one"):
    mm.grouped_matmul([])
  with pytest.raises(ValueError, match="share rhs_transposed"):
    mm.grouped_matmul([mm.Product(x, x, rhs_transposed=True), mm.Product(x, x)])
  with pytest.raises(ValueError, match="split_k=1"):
    mm.grouped_matmul([mm.Product(x, x)], config=mm.TuningConfig(split_k=2))
  with pytest.raises(ValueError, match="multiple of the CTA tile"):
    mm.grouped_matmul([mm.Product(x[:, :100], x)])
  with pytest.raises(ValueError, match="one flag per stack"):
    ns.newton_schulz_many([x, x], TURBO_AOL, aol=[True])


@needs_interpreter
def test_grouped_products_in_cpu_interpreter():
  # Three products of different contraction lengths in one launch on a 3-CTA persistent
  # grid (the LPT table interleaves them): each matches its own float32 product.
  import jax.experimental.pallas.mosaic_gpu as plgpu
  keys = jax.random.split(jax.random.key(5), 3)
  x1 = jax.random.normal(keys[0], (2, 256, 256), jnp.float32).astype(jnp.bfloat16)
  x2 = jax.random.normal(keys[1], (1, 256, 768), jnp.float32).astype(jnp.bfloat16)
  b = jax.random.normal(keys[2], (1, 256, 256), jnp.float32).astype(jnp.bfloat16)
  f32 = lambda v: np.asarray(v, np.float32)
  with plgpu.force_gpu_interpret_mode():
    grams = jax.jit(lambda a, c: mm.grouped_matmul(
        [mm.Product(a, a, rhs_transposed=True, upper=True),
         mm.Product(c, c, rhs_transposed=True, upper=True)], grid=3))(x1, x2)
    (applied,) = jax.jit(lambda bb, c: mm.grouped_matmul(
        [mm.Product(bb, c, c, alpha=0.5, beta=2.0)], grid=2))(b, x2)
  for out, x in zip(grams, (x1, x2)):
    ref = np.einsum("bij,bkj->bik", f32(x), f32(x))
    assert _rel(out, ref) < 1e-2
  ref = 2.0 * np.einsum("bij,bjk->bik", f32(b), f32(x2)) + 0.5 * f32(x2)
  assert _rel(applied, ref) < 1e-2


@needs_interpreter
def test_newton_schulz_many_in_cpu_interpreter():
  # Two stacks of different shapes, one with AOL and one Frobenius-normalised, grouped:
  # each matches its own bf16 reference iteration.
  import jax.experimental.pallas.mosaic_gpu as plgpu
  k1, k2 = jax.random.split(jax.random.key(6))
  a = jax.random.normal(k1, (2, 200, 200), jnp.float32)
  b = jax.random.normal(k2, (1, 130, 300), jnp.float32)
  b = b / jnp.linalg.norm(b, axis=(1, 2), keepdims=True)
  xa, xb = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  with plgpu.force_gpu_interpret_mode():
    outs = jax.jit(lambda u, v: ns.newton_schulz_many(
        [u, v], TURBO_AOL, aol=[True, False], eps=1e-7))(xa, xb)
  for out, x, aol in zip(outs, (xa, xb), (True, False)):
    assert out.shape == x.shape and out.dtype == jnp.bfloat16
    ref = ns.reference(x, TURBO_AOL, aol=aol, eps=1e-7)
    ref_bf16 = ns.reference(x, TURBO_AOL, aol=aol, eps=1e-7, dtype=jnp.bfloat16)
    assert _rel(out, ref) < max(3 * _rel(ref_bf16, ref), 1e-2)


def test_one_traced_kernel_per_gemm_shape_across_steps_stacks_and_calls(monkeypatch):
  # Compile time: the coefficients are run-time operands and the kernels are jitted on
  # their static layout, so the 5 steps of a stack trace (and Mosaic compiles) one
  # kernel per GEMM (Gram, polynomial, apply), and later calls with the same shapes,
  # here Aurora's 12-step polar, trace none. Compiled-in coefficients traced 15.
  monkeypatch.setattr(opl, "is_available", lambda: True)
  traced = []
  real = mm._kernel_body

  def counting(problems, *args, **kwargs):
    traced.append(tuple((p.m, p.n, p.k) for p in problems))
    return real(problems, *args, **kwargs)

  monkeypatch.setattr(mm, "_kernel_body", counting)
  muon5 = tuple(tuple(t) for t in ns_coef.resolve_coefficients("muon", 5))
  x = jnp.zeros((2, 256, 512), jnp.bfloat16)
  jax.eval_shape(lambda x: opl.newton_schulz(x, muon5), x)
  assert sorted(traced) == sorted([((256, 256, 512),), ((256, 256, 256),),
                                   ((256, 512, 256),)])
  traced.clear()
  y = jnp.zeros((3, 256, 256), jnp.bfloat16)
  jax.eval_shape(lambda x, y: opl.newton_schulz_many([x, y], muon5, aol=[True, False]), x, y)
  assert len(traced) == 3 and all(len(t) == 2 for t in traced)  # grouped launches
  traced.clear()
  jax.eval_shape(lambda x: ns_entry(x, steps=12, coefficients="aurora", backend="pallas"),
                 x.astype(jnp.float32))
  assert traced == []


def _gram_reference_checks(out, x, triples, aol):
  """``out`` (Gram kernels) against the float32 NS iteration, within 3x the bf16 one's
  error, and close to the bf16 XLA Gram NS (a different summation order)."""
  from ortho_optax.gram_newton_schulz import gram_newton_schulz
  assert out.shape == x.shape and out.dtype == jnp.bfloat16
  ref = ns.reference(x, triples, aol=aol, eps=1e-7)
  ref_bf16 = ns.reference(x, triples, aol=aol, eps=1e-7, dtype=jnp.bfloat16)
  assert _rel(out, ref) < max(3 * _rel(ref_bf16, ref), 1e-2)
  xla = gram_newton_schulz(x, steps=len(triples), coefficients=list(triples), backend="xla",
                           preconditioning="aol" if aol else "frobenius", eps=1e-7)
  assert _rel(out, xla) < 3 * _rel(xla, ref) + 1e-2


@needs_interpreter
def test_gram_newton_schulz_in_cpu_interpreter_padded_aol_cubic_restart():
  # 200 rows pad to 256: both 128-row blocks hold data, so the mirrored lower tiles of the
  # symmetric products matter. restart_every=3 over 4 steps: a segment with a middle step
  # (Q and W in one launch, then R's update), a restart, a one-step segment; step 2 cubic.
  import jax.experimental.pallas.mosaic_gpu as plgpu
  triples = TURBO_AOL[:1] + ((2.0, -1.5, 0.0),) + TURBO_AOL[1:] + TURBO_AOL[1:]
  x = jax.random.normal(jax.random.key(7), (1, 200, 300), jnp.float32).astype(jnp.bfloat16)
  with plgpu.force_gpu_interpret_mode():
    out = opl.gram_newton_schulz(x, triples, restart_every=3, aol=True, eps=1e-7)
  _gram_reference_checks(out, x, triples, aol=True)


@needs_interpreter
def test_gram_newton_schulz_many_in_cpu_interpreter():
  # Two stacks of different shapes, AOL and Frobenius, grouped launches; 3 steps with
  # restart_every=2. Each matches its own reference.
  import jax.experimental.pallas.mosaic_gpu as plgpu
  k1, k2 = jax.random.split(jax.random.key(8))
  a = jax.random.normal(k1, (1, 160, 300), jnp.float32)
  b = jax.random.normal(k2, (2, 60, 250), jnp.float32)
  b = b / jnp.linalg.norm(b, axis=(1, 2), keepdims=True)
  xa, xb = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  triples = TURBO_AOL + TURBO_AOL[:1]
  with plgpu.force_gpu_interpret_mode():
    outs = jax.jit(lambda u, v: opl.gram_newton_schulz_many(
        [u, v], triples, restart_every=2, aol=[True, False], eps=1e-7))(xa, xb)
  for out, x, aol in zip(outs, (xa, xb), (True, False)):
    _gram_reference_checks(out, x, triples, aol)


def _record_implementations(monkeypatch):
  """Pretends to be on a Hopper GPU and records which implementation runs each stack
  (shape as the implementation sees it); the kernels are replaced by identities."""
  import importlib
  from ortho_optax import orthogonalizers
  gns_mod = importlib.import_module("ortho_optax.gram_newton_schulz")  # not the function
  calls = []
  monkeypatch.setattr(opl, "is_available", lambda: True)

  def kernels(name):
    def fake(xs, *args, **kwargs):
      many = isinstance(xs, (list, tuple))
      calls.extend((name, x.shape) for x in (xs if many else [xs]))
      return list(xs) if many else xs
    return fake

  monkeypatch.setattr(opl, "gram_newton_schulz_many", kernels("gram_kernels"))
  monkeypatch.setattr(opl, "newton_schulz_many", kernels("ns_kernels"))
  monkeypatch.setattr(opl, "newton_schulz", kernels("ns_kernels"))
  for module, attr, name in ((gns_mod, "_xla_gram_newton_schulz", "xla_gram"),
                             (orthogonalizers, "_xla_newton_schulz", "xla_ns")):
    real = getattr(module, attr)
    monkeypatch.setattr(module, attr, lambda x, *a, _n=name, _r=real, **k: (
        calls.append((_n, x.shape)), _r(x, *a, **k))[1])
  return calls


@pytest.mark.parametrize("backend, expected", [
    ("auto", {"wide": "gram_kernels", "square": "ns_kernels", "small_wide": "xla_gram",
              "small_square": "xla_ns"}),
    ("pallas", {"wide": "gram_kernels", "square": "ns_kernels", "small_wide": "gram_kernels",
                "small_square": "ns_kernels"}),
    ("xla", {"wide": "xla_gram", "square": "xla_ns", "small_wide": "xla_gram",
             "small_square": "xla_ns"}),
])
def test_gram_orthogonalizer_dispatch(monkeypatch, backend, expected):
  # Wide stacks that prefers_gram picks run Gram NS, square ones standard NS; on the
  # kernels where they take the stack (large enough, or forced), in XLA elsewhere.
  from ortho_optax.stages.orthogonalize import orthogonalize
  calls = _record_implementations(monkeypatch)
  shapes = {"wide": (1024, 4096), "square": (2048, 2048), "small_wide": (64, 256),
            "small_square": (64, 64)}
  upd = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
  tx = orthogonalize("gram_newton_schulz", backend=backend)
  jax.eval_shape(lambda u: tx.update(u, tx.init(u))[0], upd)
  got = {}
  for name, shape in calls:
    key = next(k for k, s in shapes.items() if sorted(shape[-2:]) == sorted(s))
    got[key] = name
  assert got == expected
  assert len(calls) == len(shapes)  # each stack runs once, on one implementation


def test_gram_newton_schulz_function_runs_gram_kernels_on_every_shape(monkeypatch):
  # The plain function is Gram NS whatever the shape: square stacks too.
  from ortho_optax.gram_newton_schulz import gram_newton_schulz
  calls = _record_implementations(monkeypatch)
  jax.eval_shape(lambda x: gram_newton_schulz(x, backend="pallas"),
                 jnp.zeros((2, 256, 256), jnp.float32))
  jax.eval_shape(lambda x: gram_newton_schulz(x, backend="pallas"),
                 jnp.zeros((512, 256), jnp.float32))
  assert calls == [("gram_kernels", (2, 256, 256)), ("gram_kernels", (1, 256, 512))]
