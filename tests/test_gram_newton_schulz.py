"""Gram Newton–Schulz against standard Newton–Schulz (CPU, small shapes)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ortho_optax.gram_newton_schulz import (
    gram_newton_schulz,
    gram_newton_schulz_flops,
    newton_schulz_flops,
    prefers_gram,
)
from ortho_optax.newton_schulz import PRECONDITIONINGS, newton_schulz

F32 = dict(compute_dtype=jnp.float32)


def _rand(shape, seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def _ill_conditioned(m, n, cond, seed=0):
  """An m × n matrix with singular values log-spaced from 1 down to 1/cond."""
  rng = np.random.RandomState(seed)
  u, _ = np.linalg.qr(rng.randn(m, m))
  v, _ = np.linalg.qr(rng.randn(n, m))
  return (u * np.logspace(0, -math.log10(cond), m)) @ v.T


def _distance_to_polar(out, x):
  """RMS distance of ``out`` to the exact polar factor of ``x`` (float64 SVD)."""
  u, _, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
  return np.linalg.norm(np.asarray(out, np.float64) - u @ vt) / math.sqrt(min(x.shape))


# Steps 1..6, every preconditioning, wide / tall / batched, segments of every shape
# (a single segment, length-1 tails, equal segments, restart_every=1 = NS step by step).
_CASES = [
    ("muon", 1, 2, "frobenius", (2, 6, 16)),
    ("quintic", 2, None, "aol", (16, 6)),
    ("polar_express", 3, 2, "schatten", (2, 6, 16)),
    ("cubic5", 5, 2, "spectral", (6, 16)),
    ("aurora", 4, 3, "frobenius", (3, 16, 6)),
    ([(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)], 6, 2, "aol", (2, 6, 16)),
    ("quintic", 6, 4, "aol", (16, 6)),
    ("cans", 5, 1, "schatten", (2, 16, 6)),
    ("turbo_aol", 4, None, "aol", (6, 16)),
]


@pytest.mark.parametrize("coefficients, steps, restart_every, preconditioning, shape", _CASES)
def test_float64_equals_newton_schulz(x64, coefficients, steps, restart_every,
                                      preconditioning, shape):
  x = _rand(shape, seed=steps, dtype=jnp.float64)
  kw = dict(steps=steps, coefficients=coefficients, preconditioning=preconditioning,
            compute_dtype=jnp.float64)
  want = newton_schulz(x, backend="xla", **kw)
  got = gram_newton_schulz(x, restart_every=restart_every, **kw)
  assert got.shape == x.shape and got.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-10)


def test_every_preconditioning_is_covered():
  assert {c[3] for c in _CASES} == set(PRECONDITIONINGS)
  assert {c[1] for c in _CASES} == set(range(1, 7))


@pytest.mark.parametrize("coefficients", ["muon", "quintic", "polar_express"])
def test_float32_close_to_newton_schulz(coefficients):
  x = _rand((2, 12, 40), seed=1)
  want = newton_schulz(x, coefficients=coefficients, backend="xla", **F32)
  got = gram_newton_schulz(x, coefficients=coefficients, **F32)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("coefficients", ["muon", "polar_express"])
def test_bf16_restart_keeps_it_as_accurate_as_newton_schulz(coefficients):
  # In bf16 the Gram iterate R picks up negative eigenvalues of order -2^-9 where X has
  # tiny singular values; r ← r(a + br + cr²)² grows them every step. With the restart
  # Gram NS is as close to the exact polar factor as standard NS; without, it is wrecked.
  x = _ill_conditioned(16, 64, cond=1e3)
  xj = jnp.asarray(x, jnp.float32)
  reference = _distance_to_polar(newton_schulz(xj, coefficients=coefficients, backend="xla"), x)
  restarted = _distance_to_polar(gram_newton_schulz(xj, coefficients=coefficients), x)
  unrestarted = _distance_to_polar(
      gram_newton_schulz(xj, coefficients=coefficients, restart_every=None), x)
  assert restarted <= 1.05 * reference, (restarted, reference)
  assert not unrestarted <= 10 * reference, (unrestarted, reference)  # NaN counts as wrecked


@pytest.mark.parametrize("preconditioning", PRECONDITIONINGS)
def test_scale_invariance(preconditioning):
  x = _rand((10, 24), seed=2)
  f = lambda a: gram_newton_schulz(a, preconditioning=preconditioning, eps=1e-12, **F32)
  np.testing.assert_allclose(f(1e3 * x), f(x), atol=3e-4)
  np.testing.assert_allclose(f(1e-3 * x), f(x), atol=3e-4)


@pytest.mark.parametrize("preconditioning", ["frobenius", "aol"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_zero_input_gives_zeros(preconditioning, dtype):
  z = jnp.zeros((2, 6, 9), dtype)
  out = gram_newton_schulz(z, preconditioning=preconditioning, compute_dtype=dtype)
  assert out.dtype == dtype
  assert np.all(np.asarray(out, np.float32) == 0)


def test_eps_is_passed_through():
  x = _rand((6, 14), seed=3)
  # An eps comparable with ‖X‖_F changes the result; both paths use it the same way.
  for eps in (1e-7, 3.0):
    np.testing.assert_allclose(
        gram_newton_schulz(x, eps=eps, **F32),
        newton_schulz(x, eps=eps, backend="xla", **F32), atol=1e-5)
  assert not np.allclose(gram_newton_schulz(x, eps=3.0, **F32), gram_newton_schulz(x, **F32),
                         atol=1e-3)
  # AOL: eps clamps the Gram row sums, so a zero row stays zero (and finite).
  x = x.at[2].set(0.0)
  out = gram_newton_schulz(x, steps=4, coefficients="turbo_aol", preconditioning="aol",
                           eps=1e-6, **F32)
  assert np.all(np.isfinite(out)) and np.all(np.asarray(out[2]) == 0)


def test_output_dtype_and_compute_dtype():
  x = _rand((6, 10)).astype(jnp.bfloat16)
  assert gram_newton_schulz(x, compute_dtype=jnp.float32).dtype == jnp.bfloat16
  assert gram_newton_schulz(x, compute_dtype=None).dtype == jnp.bfloat16
  assert gram_newton_schulz(x.astype(jnp.float32)).dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(gram_newton_schulz(x, compute_dtype="bf16")),
                                np.asarray(gram_newton_schulz(x, compute_dtype=None)))


def test_jit_and_default_bf16_runs():
  x = _rand((3, 16, 48), seed=4)
  out = jax.jit(gram_newton_schulz)(x)
  s = np.linalg.svd(np.asarray(out[0], np.float64), compute_uv=False)
  assert 0.5 < s.min() and s.max() < 1.3


def _dots(jaxpr):
  """``[(flops, count)]`` of the dot_generals of a jaxpr."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      k = math.prod(eqn.invars[0].aval.shape[d] for d in lc)
      found.append((2 * k * math.prod(eqn.outvars[0].aval.shape), 1))
    if eqn.primitive.name == "cond":  # one branch runs: the platform forms of a step
      branches = [_dots(b.jaxpr) for b in eqn.params["branches"]]
      assert len({sum(f for f, _ in b) for b in branches}) == 1, branches
      found += branches[0]
    for name in ("jaxpr", "call_jaxpr"):
      sub = eqn.params.get(name)
      if sub is not None:
        found += _dots(getattr(sub, "jaxpr", sub))
  return found


@pytest.mark.parametrize("steps, restart_every, coefficients", [
    (5, 2, "muon"), (5, None, "quintic"), (7, 3, "muon"), (5, 1, "cubic5"),
    (4, 3, [(2.5, -1.5, 0.0)]),
])
def test_flop_count_matches_the_program(steps, restart_every, coefficients):
  m, n = 8, 24
  cubic = coefficients != "muon" and coefficients != "quintic"
  x = _rand((n, m))  # tall: the count is that of the wide transpose

  def run(x):
    return gram_newton_schulz(x, steps=steps, coefficients=coefficients, order="cycle",
                              restart_every=restart_every, **F32)
  dots = _dots(jax.make_jaxpr(run)(x).jaxpr)
  assert sum(f for f, _ in dots) == gram_newton_schulz_flops(
      n, m, steps=steps, restart_every=restart_every, cubic=cubic)
  ns = _dots(jax.make_jaxpr(
      lambda x: newton_schulz(x, steps=steps, coefficients=coefficients, order="cycle",
                              backend="xla", **F32))(x).jaxpr)
  assert sum(f for f, _ in ns) == newton_schulz_flops(m, n, steps=steps, cubic=cubic)


def test_steps_are_unrolled():
  """No XLA loop (on a GPU each iteration of one cost time), whatever the segments."""
  x = _rand((8, 24))
  for steps, restart_every in ((7, 3), (13, 3), (5, None), (4, 1)):
    hlo = jax.jit(lambda x: gram_newton_schulz(
        x, steps=steps, restart_every=restart_every, **F32)).lower(x).as_text()
    assert "stablehlo.while" not in hlo, (steps, restart_every)


def test_prefers_gram():
  assert not prefers_gram(768, 768)
  assert not prefers_gram(1024, 1536)  # the flop break-even (n = 1.5m)
  assert prefers_gram(768, 3072) and prefers_gram(3072, 768)
  # 0.8 of standard NS's flops: n >= 3.5m with a restart every 2 steps, 2.5m every 3.
  assert prefers_gram(100, 350) and not prefers_gram(100, 340)
  assert prefers_gram(100, 250, restart_every=3) and not prefers_gram(100, 240, restart_every=3)
  # The rule follows the flop counts: 5 quintic steps, one restart: 60 vs 90 m³ at n = 4m.
  assert gram_newton_schulz_flops(64, 256, steps=5, restart_every=3) * 3 == (
      newton_schulz_flops(64, 256, steps=5) * 2)
  ratio = gram_newton_schulz_flops(64, 64) / newton_schulz_flops(64, 64)
  assert ratio > 1  # square: Gram NS costs more


@pytest.mark.parametrize("kwargs, match", [
    (dict(preconditioning="nope"), "nope.*frobenius"),
    (dict(backend="cuda"), "cuda.*xla"),
    (dict(coefficients="bogus"), "bogus"),
    (dict(steps=0), "steps"),
    (dict(eps=-1.0), "eps"),
    (dict(order="random"), "random"),
    (dict(compute_dtype=jnp.int32), "compute_dtype"),
    (dict(restart_every=0), "restart_every"),
    (dict(restart_every=2.5), "restart_every"),
    (dict(restart_every=True), "restart_every"),
])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    gram_newton_schulz(_rand((4, 6)), **kwargs)


def test_pallas_backend_off_a_hopper_gpu_raises():
  if any(d.platform == "gpu" for d in jax.devices()):
    pytest.skip("CPU-only behaviour")
  with pytest.raises(RuntimeError, match="backend='pallas'.*'xla'"):
    gram_newton_schulz(_rand((4, 6)), backend="pallas")


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="rank >= 2"):
    gram_newton_schulz(jnp.ones((5,)))
  with pytest.raises(ValueError, match="floating"):
    gram_newton_schulz(jnp.ones((4, 6), jnp.int32))


def test_orthogonalize_stage_runs_gram_on_wide_stacks_and_standard_on_square(monkeypatch):
  import importlib
  gns_mod = importlib.import_module("ortho_optax.gram_newton_schulz")
  import ortho_optax as oo
  calls = []
  real = gns_mod._xla_gram_newton_schulz
  monkeypatch.setattr(gns_mod, "_xla_gram_newton_schulz",
                      lambda x, *a, **k: calls.append(x.shape) or real(x, *a, **k))
  keys = jax.random.split(jax.random.key(5), 3)
  upd = {"wide": jax.random.normal(keys[0], (16, 64)),   # Flax (in, out): a 64 x 16 view
         "tall": jax.random.normal(keys[1], (64, 16)),
         "square": jax.random.normal(keys[2], (16, 16))}
  kw = dict(compute_dtype=jnp.float32, backend="xla")
  gram_tx = oo.orthogonalize("gram_newton_schulz", **kw)
  out, _ = gram_tx.update(upd, gram_tx.init(upd))
  ns_tx = oo.orthogonalize("newton_schulz", **kw)
  want, _ = ns_tx.update(upd, ns_tx.init(upd))
  assert calls == [(2, 16, 64)]  # the two rectangular leaves, one wide stack; square: NS
  for k in upd:
    np.testing.assert_allclose(out[k], want[k], atol=1e-5, err_msg=k)
  with pytest.raises(ValueError, match="restart_every"):
    oo.orthogonalize("gram_newton_schulz", restart_every=0)


def _ns_optimizers():
  import ortho_optax as oo
  return {"muon": oo.muon, "turbo_muon": oo.turbo_muon, "adamuon": oo.adamuon,
          "normuon": oo.normuon, "namo": oo.namo, "oadamw": oo.oadamw,
          "hybrid_auon": oo.hybrid_auon}


@pytest.mark.parametrize("name", sorted(_ns_optimizers()))
def test_optimizers_take_gram_newton_schulz(monkeypatch, name):
  # orthogonalizer="gram_newton_schulz" runs Gram NS on the wide and tall matrices (the
  # square one keeps standard NS) and, in float32, follows the default optimizer closely.
  import importlib
  gns_mod = importlib.import_module("ortho_optax.gram_newton_schulz")
  calls = []
  real = gns_mod._xla_gram_newton_schulz
  monkeypatch.setattr(gns_mod, "_xla_gram_newton_schulz",
                      lambda x, *a, **k: calls.append(x.shape) or real(x, *a, **k))
  factory = _ns_optimizers()[name]
  keys = jax.random.split(jax.random.key(9), 4)
  params = {"fc": _rand((16, 64), 1), "proj": _rand((64, 16), 2), "attn": _rand((16, 16), 3),
            "bias": jnp.zeros((16,))}
  kw = dict(compute_dtype="float32", backend="xla")
  txs = [factory(**kw), factory(orthogonalizer="gram_newton_schulz", restart_every=2, **kw)]
  states = [tx.init(params) for tx in txs]
  for step in range(3):
    grads = jax.tree.map(lambda p, k=keys[step]: jax.random.normal(k, p.shape), params)
    ups = []
    for i, tx in enumerate(txs):
      up, states[i] = tx.update(grads, states[i], params)
      ups.append(up)
    for k in params:
      np.testing.assert_allclose(ups[1][k], ups[0][k], rtol=1e-4, atol=1e-6,
                                 err_msg=f"{name} {k} step {step}")
  assert calls and all(sorted(s[-2:]) == [16, 64] for s in calls), calls


@pytest.mark.parametrize("name", sorted(_ns_optimizers()))
def test_optimizers_reject_a_bad_orthogonalizer(name):
  factory = _ns_optimizers()[name]
  with pytest.raises(ValueError, match="orthogonalizer.*'gram_nt'.*'gram_newton_schulz'"):
    factory(orthogonalizer="gram_nt")
  with pytest.raises(ValueError, match="restart_every"):
    factory(orthogonalizer="newton_schulz", restart_every=0)
  if name == "oadamw":
    with pytest.raises(ValueError, match="orthogonalizer"):
      factory(muon=False, orthogonalizer="polar")
