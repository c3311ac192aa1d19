"""Gram Newton–Schulz on the Hopper kernels against XLA Gram NS and float32 NS (GPU only).

Inputs are fresh random draws; the allocator is first filled with NaN buffers, so an
unwritten output tile reads as NaN, never as a stale right answer. Errors are
‖out − ref‖/‖ref‖ against the float32 iteration (:func:`ortho_optax.pallas.ns.reference`:
Gram NS equals standard NS in exact arithmetic), bounded by twice the bf16 XLA Gram NS's own.
"""

import numpy as np
import pytest

import _gpu

import jax
import jax.numpy as jnp

import ortho_optax as oo
from ortho_optax import pallas as opl
from ortho_optax.coefficients import resolve_coefficients
from ortho_optax.pallas import ns

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not opl.is_available(), reason="needs a Hopper GPU with Mosaic GPU"),
]

MUON5 = tuple(tuple(float(v) for v in t) for t in resolve_coefficients("muon", 5))
TURBO4 = tuple(tuple(float(v) for v in t) for t in resolve_coefficients("turbo_aol", 4))


def _rel(out, ref):
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert np.all(np.isfinite(out)), "non-finite output (unwritten tile or overflow)"
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _input(shape, aol):
  g = jax.random.normal(_gpu.random_key(), shape, jnp.float32)
  if not aol:
    g = g / jnp.linalg.norm(g, axis=(1, 2), keepdims=True)
  return g.astype(jnp.bfloat16)


def _check(out, x, triples, aol, restart_every):
  assert out.shape == x.shape and out.dtype == jnp.bfloat16
  ref = ns.reference(x, triples, aol=aol, eps=1e-7)
  xla = oo.gram_newton_schulz(x, steps=len(triples), coefficients=list(triples),
                              preconditioning="aol" if aol else "frobenius", eps=1e-7,
                              restart_every=restart_every, backend="xla")
  err, xla_err = _rel(out, ref), _rel(xla, ref)
  assert err < max(2 * xla_err, 1e-2), (err, xla_err)


@pytest.mark.parametrize("restart_every", [2, 3])
@pytest.mark.parametrize("aol", [False, True])
@pytest.mark.parametrize("shape", [(1, 768, 3072), (3, 300, 1000), (1, 1024, 4096),
                                   (1, 2048, 8192)])
def test_gram_kernels_vs_xla_gram(shape, aol, restart_every):
  x = _input(shape, aol)
  triples = TURBO4 if aol else MUON5
  _gpu.poison_allocator()
  out = opl.gram_newton_schulz(x, triples, restart_every=restart_every, aol=aol, eps=1e-7)
  _check(out, x, triples, aol, restart_every)


def test_gram_kernels_many_vs_xla_gram():
  # GPT-2 small's MLP stack and a padded one, grouped launches, AOL on one.
  xs = [_input((24, 768, 3072), False), _input((2, 300, 1000), True)]
  _gpu.poison_allocator()
  outs = jax.jit(lambda a, b: opl.gram_newton_schulz_many(
      [a, b], MUON5, restart_every=2, aol=[False, True], eps=1e-7))(*xs)
  for out, x, aol in zip(outs, xs, (False, True)):
    _check(out, x, MUON5, aol, 2)


def test_muon_with_gram_kernels_follows_muon():
  # The optimizer path: wide and tall leaves on the Gram kernels, the square one on the
  # NS kernels (backend="pallas"), against the same optimizer in XLA.
  keys = jax.random.split(_gpu.random_key(), 4)
  params = {"fc": jax.random.normal(keys[0], (768, 3072)),
            "proj": jax.random.normal(keys[1], (3072, 768)),
            "attn": jax.random.normal(keys[2], (768, 768))}
  grads = jax.tree.map(lambda p: jax.random.normal(keys[3], p.shape), params)
  outs = {}
  for backend in ("pallas", "xla"):
    tx = oo.muon(orthogonalizer="gram_newton_schulz", backend=backend)
    outs[backend], _ = jax.jit(tx.update)(grads, tx.init(params), params)
  f32 = oo.muon(backend="xla", compute_dtype="float32")
  want, _ = jax.jit(f32.update)(grads, f32.init(params), params)
  for k in params:
    err, xla_err = _rel(outs["pallas"][k], want[k]), _rel(outs["xla"][k], want[k])
    assert err < max(2 * xla_err, 1e-2), (k, err, xla_err)
