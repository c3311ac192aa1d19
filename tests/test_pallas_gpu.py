"""Hopper kernels of ``ortho_optax.pallas`` against float32 XLA references (GPU only).

Every check draws fresh random inputs, first fills the allocator with NaN buffers (so
an unwritten output tile reads as NaN garbage, never as a stale right answer), and
compares ‖out − ref‖/‖ref‖ over the whole output and over every 128×128 tile.
"""

import numpy as np
import pytest

import _gpu

import jax
import jax.numpy as jnp

from ortho_optax.newton_schulz import newton_schulz as ns_entry
from ortho_optax import pallas as opl
from ortho_optax.pallas import matmul as mm
from ortho_optax.pallas import ns

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not opl.is_available(), reason="needs a Hopper GPU with Mosaic GPU"),
]

TURBO_AOL = ((3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
             (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012))
QUINTIC = ((4.0848, -6.8946, 2.9270),) + TURBO_AOL


#: Tile/epilogue variants the tuner may pick (benchmarks/bench_kernels.py --tune).
VARIANTS = {
    "default": mm.TuningConfig(),
    "prefetch": mm.TuningConfig(prefetch_add=True),
    "banded4": mm.TuningConfig(epilogue_rows=64, max_concurrent_steps=4),
    "t64": mm.TuningConfig(tile_m=64, tile_n=64, max_concurrent_steps=4),
    "t64_prefetch": mm.TuningConfig(tile_m=64, tile_n=64, max_concurrent_steps=4,
                                    prefetch_add=True),
}


def _errors(out, ref, tile=128):
  out = np.asarray(out, np.float32)
  ref = np.asarray(ref, np.float32)
  assert out.shape == ref.shape
  assert np.all(np.isfinite(out)), "non-finite output (unwritten tile or overflow)"
  total = np.linalg.norm(out - ref) / np.linalg.norm(ref)
  worst = 0.0
  for i in range(0, ref.shape[-2], tile):
    for j in range(0, ref.shape[-1], tile):
      r, o = ref[..., i:i + tile, j:j + tile], out[..., i:i + tile, j:j + tile]
      worst = max(worst, np.linalg.norm(o - r) / (np.linalg.norm(r) + 1e-30))
  return total, worst


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("batch,m,k", [(1, 512, 256), (3, 768, 1024), (1, 1024, 4096)])
def test_gram_upper_mirrored(batch, m, k, split):
  x = jax.random.normal(_gpu.random_key(), (batch, m, k), jnp.bfloat16)
  cfg = mm.TuningConfig(split_k=split)
  _gpu.poison_allocator()
  out = mm.matmul(x, x, rhs_transposed=True, upper=True, config=cfg)
  xf = x.astype(jnp.float32)
  ref = jnp.matmul(xf, jnp.swapaxes(xf, 1, 2), precision="highest")
  total, worst = _errors(out, ref)
  assert total < 1e-2 and worst < 2e-2, (total, worst)


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("batch,m", [(1, 512), (2, 768), (1, 2048)])
def test_symmetric_polynomial(batch, m, split):
  a = jax.random.normal(_gpu.random_key(), (batch, m, m), jnp.float32)
  a = ((a + jnp.swapaxes(a, 1, 2)) / np.sqrt(2 * m)).astype(jnp.bfloat16)
  b, c = -6.3029, 2.6377
  _gpu.poison_allocator()
  out = mm.matmul(a, a, a, alpha=b, beta=c, rhs_transposed=True, upper=True,
                  config=mm.TuningConfig(split_k=split))
  af = a.astype(jnp.float32)
  ref = b * af + c * jnp.matmul(af, af, precision="highest")
  total, worst = _errors(out, ref)
  assert total < 1e-2 and worst < 2e-2, (total, worst)


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("batch,m,n", [(1, 256, 512), (4, 768, 3072), (1, 1024, 4096)])
def test_apply(batch, m, n, split):
  k1, k2 = jax.random.split(_gpu.random_key())
  bm = (jax.random.normal(k1, (batch, m, m), jnp.float32) / np.sqrt(m)).astype(jnp.bfloat16)
  x = jax.random.normal(k2, (batch, m, n), jnp.bfloat16)
  _gpu.poison_allocator()
  out = mm.matmul(bm, x, x, alpha=3.7418, beta=1.0, config=mm.TuningConfig(split_k=split))
  ref = 3.7418 * x.astype(jnp.float32) + jnp.matmul(
      bm.astype(jnp.float32), x.astype(jnp.float32), precision="highest")
  total, worst = _errors(out, ref)
  assert total < 1e-2 and worst < 2e-2, (total, worst)


@pytest.mark.parametrize("aol", [True, False])
@pytest.mark.parametrize("shape", [(1, 256, 256), (1, 1000, 3000), (3, 300, 500),
                                   (16, 768, 768), (1, 2048, 2048)])
def test_newton_schulz_vs_f32_reference(shape, aol):
  g = jax.random.normal(_gpu.random_key(), shape, jnp.float32)
  if not aol:
    g = g / jnp.linalg.norm(g, axis=(1, 2), keepdims=True)
  x = g.astype(jnp.bfloat16)
  co = TURBO_AOL if aol else QUINTIC
  _gpu.poison_allocator()
  out = opl.newton_schulz(x, co, aol=aol, eps=1e-7)
  assert out.shape == x.shape and out.dtype == jnp.bfloat16
  ref = ns.reference(x, co, aol=aol, eps=1e-7)
  ref_bf16 = ns.reference(x, co, aol=aol, eps=1e-7, dtype=jnp.bfloat16)
  total, worst = _errors(out, ref)
  xla_total, _ = _errors(ref_bf16, ref)
  # The kernels round like the bf16 XLA path (bf16 A, B, X; f32 accumulation), so their
  # error against f32 is of the same size.
  assert total < max(3 * xla_total, 1e-2), (total, xla_total)
  assert worst < 6e-2, worst


def test_cubic_step_and_zero_matrix():
  x = jax.random.normal(_gpu.random_key(), (2, 256, 512), jnp.float32)
  x = (x / jnp.linalg.norm(x, axis=(1, 2), keepdims=True)).astype(jnp.bfloat16)
  co = ((1.5, -0.5, 0.0),) * 3
  total, _ = _errors(opl.newton_schulz(x, co), ns.reference(x, co))
  assert total < 1e-2
  z = jnp.zeros((1, 256, 256), jnp.bfloat16)
  for aol in (True, False):
    out = np.asarray(opl.newton_schulz(z, TURBO_AOL, aol=aol), np.float32)
    assert np.all(out == 0.0)


@pytest.mark.parametrize("preconditioning", ["aol", "frobenius"])
@pytest.mark.parametrize("shape", [(768, 3072), (3072, 768), (1000, 300), (2048, 2048)])
def test_auto_and_pallas_match_xla(shape, preconditioning):
  x = jax.random.normal(_gpu.random_key(), shape, jnp.float32)
  kw = (dict(steps=4, coefficients="turbo_aol", preconditioning="aol", eps=1e-6)
        if preconditioning == "aol" else dict(steps=5, coefficients="quintic"))
  auto = np.asarray(ns_entry(x, backend="auto", **kw), np.float32)
  pallas = np.asarray(ns_entry(x, backend="pallas", **kw), np.float32)
  xla = np.asarray(ns_entry(x, backend="xla", **kw), np.float32)
  assert auto.shape == pallas.shape == xla.shape == x.shape
  assert np.all(np.isfinite(pallas))
  # "auto" takes the kernels only for stacks big enough to win (prefers_kernels).
  m, n = sorted(shape[-2:])
  batch = int(np.prod(shape[:-2]))
  np.testing.assert_array_equal(auto, pallas if opl.prefers_kernels(batch, m, n) else xla)
  rel = np.linalg.norm(pallas - xla) / np.linalg.norm(xla)
  assert rel < 3e-2, rel


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_epilogue_and_tile_variants(variant):
  # Gram (mirrored), polynomial (addend + mirror) and apply (addend) on a 3×3 tile grid
  # with two matrices per stack and a persistent grid smaller than the work.
  import dataclasses
  cfg = VARIANTS[variant]
  k1, k2 = jax.random.split(_gpu.random_key())
  x = jax.random.normal(k1, (2, 768, 512), jnp.bfloat16)
  a = jax.random.normal(k2, (2, 768, 768), jnp.float32)
  a = ((a + jnp.swapaxes(a, 1, 2)) / np.sqrt(2 * 768)).astype(jnp.bfloat16)
  xf, af = x.astype(jnp.float32), a.astype(jnp.float32)
  hp = "highest"
  _gpu.poison_allocator()
  gram = mm.matmul(x, x, rhs_transposed=True, upper=True,
                   config=dataclasses.replace(cfg, prefetch_add=False), grid=7)
  poly = mm.matmul(a, a, a, alpha=-6.3029, beta=2.6377, rhs_transposed=True, upper=True,
                   config=cfg, grid=7)
  app = mm.matmul(a, x, x, alpha=3.7418, beta=1.0, config=cfg, grid=7)
  for out, ref in ((gram, jnp.matmul(xf, jnp.swapaxes(xf, 1, 2), precision=hp)),
                   (poly, -6.3029 * af + 2.6377 * jnp.matmul(af, af, precision=hp)),
                   (app, 3.7418 * xf + jnp.matmul(af, xf, precision=hp))):
    total, worst = _errors(out, ref)
    assert total < 1e-2 and worst < 2e-2, (variant, total, worst)


def test_traced_coefficients_match_static():
  k1, k2 = jax.random.split(_gpu.random_key())
  bm = (jax.random.normal(k1, (1, 512, 512), jnp.float32) / np.sqrt(512)).astype(jnp.bfloat16)
  x = jax.random.normal(k2, (1, 512, 1024), jnp.bfloat16)
  static = mm.matmul(bm, x, x, alpha=3.7418, beta=0.5)
  traced = jax.jit(lambda a, b: mm.matmul(bm, x, x, alpha=a, beta=b))(
      jnp.float32(3.7418), jnp.float32(0.5))
  # Same math; constant-folded coefficients may contract into FMAs differently, so allow
  # an occasional 1-ulp bf16 difference (measured: 4 of 524,288 elements).
  s32, t32 = np.asarray(static, np.float32), np.asarray(traced, np.float32)
  np.testing.assert_allclose(t32, s32, rtol=2 ** -7, atol=1e-6)
  assert np.mean(t32 != s32) < 1e-4


@pytest.mark.parametrize("dtype,block_rows", [(jnp.bfloat16, 32), (jnp.bfloat16, 128),
                                              (jnp.float32, 64)])
def test_stack_concatenate_is_exact(dtype, block_rows):
  # The TMA stack of a GPT-2-like set (48 square pieces of mixed batch sizes, then 3
  # wide ones): bit-exact against jnp.concatenate, into a NaN-poisoned allocator.
  from ortho_optax.pallas import stack
  _gpu.poison_allocator()
  cfg = stack.StackConfig(block_rows=block_rows)
  for count, shape in ((48, (768, 768)), (3, (768, 3072))):
    keys = jax.random.split(_gpu.random_key(), count)
    pieces = [jax.random.normal(k, (1 + i % 2,) + shape, jnp.float32).astype(dtype)
              for i, k in enumerate(keys)]
    out = jax.jit(lambda ps: stack.concatenate(ps, config=cfg))(pieces)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.concatenate(pieces)))


def test_stack_concatenate_chunks_and_vmap_are_exact():
  # 26 pieces: launches of 12, 12 and 2 into one buffer; under vmap (an ensemble's
  # update) every member gets its own stack.
  from ortho_optax.pallas import stack
  _gpu.poison_allocator()
  keys = jax.random.split(_gpu.random_key(), 26)
  pieces = [jax.random.normal(k, (2, 1 + i % 3, 768, 768), jnp.float32).astype(jnp.bfloat16)
            for i, k in enumerate(keys)]
  plain = jax.jit(lambda ps: stack.concatenate(ps))([p[0] for p in pieces])
  np.testing.assert_array_equal(np.asarray(plain),
                                np.asarray(jnp.concatenate([p[0] for p in pieces])))
  batched = jax.jit(jax.vmap(stack.concatenate))(pieces)
  np.testing.assert_array_equal(np.asarray(batched),
                                np.asarray(jnp.concatenate(pieces, axis=1)))


@pytest.mark.parametrize("aol", [True, False])
def test_newton_schulz_many_gpt2_set_vs_f32_reference(aol):
  # The GPT-2-small set grouped (one launch per GEMM for both stacks, LPT schedule) plus
  # an odd-shaped stack: each result as accurate as its own bf16 XLA iteration.
  shapes = [(48, 768, 768), (24, 768, 3072), (3, 300, 500)]
  co = TURBO_AOL if aol else QUINTIC
  xs = []
  for shape in shapes:
    g = jax.random.normal(_gpu.random_key(), shape, jnp.float32)
    if not aol:
      g = g / jnp.linalg.norm(g, axis=(1, 2), keepdims=True)
    xs.append(g.astype(jnp.bfloat16))
  _gpu.poison_allocator()
  outs = jax.jit(lambda v: opl.newton_schulz_many(v, co, aol=aol, eps=1e-7))(xs)
  for x, out in zip(xs, outs):
    assert out.shape == x.shape and out.dtype == jnp.bfloat16
    ref = ns.reference(x, co, aol=aol, eps=1e-7)
    ref_bf16 = ns.reference(x, co, aol=aol, eps=1e-7, dtype=jnp.bfloat16)
    total, worst = _errors(out, ref)
    xla_total, _ = _errors(ref_bf16, ref)
    assert total < max(3 * xla_total, 1e-2), (x.shape, total, xla_total)
    assert worst < 6e-2, (x.shape, worst)
