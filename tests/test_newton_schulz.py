"""Unit tests of the coefficient tables and of newton_schulz (CPU, small shapes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ortho_optax import coefficients as coef
from ortho_optax.newton_schulz import PRECONDITIONINGS, newton_schulz

F32 = dict(compute_dtype=jnp.float32, backend="xla")


def _rand(shape, seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def _well_conditioned(m, n, seed=0, lo=0.3, hi=1.0):
  """A matrix with singular values spread in [lo, hi]."""
  rng = np.random.RandomState(seed)
  u, _ = np.linalg.qr(rng.randn(m, min(m, n)))
  v, _ = np.linalg.qr(rng.randn(n, min(m, n)))
  s = np.linspace(lo, hi, min(m, n))
  return jnp.asarray((u * s) @ v.T, jnp.float32)


def _svals(x):
  return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


# ----------------------------------------------------------------------------- coefficients


def test_presets_exact_decimals():
  assert coef.PRESETS["muon"] == ((3.4445, -4.7750, 2.0315),)
  assert coef.PRESETS["quintic"][0] == (4.0848, -6.8946, 2.9270)
  assert coef.PRESETS["quintic"][-1] == (2.8366, -3.0525, 1.2012)
  assert len(coef.PRESETS["polar_express"]) == 8
  assert coef.PRESETS["polar_express"][0] == (8.2051, -22.9019, 16.4607)
  assert coef.PRESETS["polar_express"][-1] == (1.875, -1.25, 0.375)
  assert coef.PRESETS["cans"][0] == (8.4703, -25.1081, 18.6293)
  assert coef.PRESETS["aol"][-1] == (2.7215, -3.0494, 1.3169)
  assert coef.PRESETS["deepseekv4"] == ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2
  assert [t[2] for t in coef.PRESETS["cubic5"]] == [0.0] * 5
  assert coef.PRESETS["cubic5"][0] == (3.3656576, -3.3420992, 0.0)
  assert coef.PRESETS["aurora"] == ((2.0, -1.5, 0.5),)
  # Every preset maps σ = 1 to roughly 1 at its last step (a sanity check of signs).
  for name, table in coef.PRESETS.items():
    a, b, c = table[-1]
    assert 0.6 < a + b + c < 1.3, name


def test_default_orders():
  q = coef.PRESETS["quintic"]
  assert coef.resolve_coefficients("quintic", 7) == q + q[:2]  # cycle
  pe = coef.PRESETS["polar_express"]
  assert coef.resolve_coefficients("polar_express", 10) == pe + (pe[-1],) * 2  # repeat_last
  assert coef.resolve_coefficients("cans", 7)[5:] == (coef.PRESETS["cans"][-1],) * 2
  assert coef.resolve_coefficients("deepseekv4", 12)[-1] == (2.0, -1.5, 0.5)
  assert coef.resolve_coefficients("aol", 6)[4] == coef.PRESETS["aol"][0]
  assert coef.resolve_coefficients("muon", 3) == coef.PRESETS["muon"] * 3
  assert coef.resolve_coefficients("simple", 2) == coef.PRESETS["muon"] * 2  # NVIDIA alias


def test_explicit_order_and_custom_tables():
  q = coef.PRESETS["quintic"]
  assert coef.resolve_coefficients("quintic", 7, order="repeat_last") == q + (q[-1],) * 2
  pe = coef.PRESETS["polar_express"]
  assert coef.resolve_coefficients("polar_express", 9, order="cycle")[8] == pe[0]
  custom = [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]
  assert coef.resolve_coefficients(custom, 3) == ((3.0, -3.2, 1.2), (2.0, -1.5, 0.5),
                                                  (3.0, -3.2, 1.2))
  assert coef.resolve_coefficients(custom, 3, "repeat_last")[-1] == (2.0, -1.5, 0.5)
  assert coef.resolve_coefficients((2, -1.5, 0.5), 2) == ((2.0, -1.5, 0.5),) * 2


def test_turbo_aol_slices_from_the_end():
  q = coef.PRESETS["quintic"]
  assert coef.resolve_coefficients("turbo_aol", 4) == q[1:]
  assert coef.resolve_coefficients("turbo_aol", 5) == q
  assert coef.resolve_coefficients("turbo_aol", 1) == q[-1:]
  with pytest.raises(ValueError, match="turbo_aol"):
    coef.resolve_coefficients("turbo_aol", 6)


@pytest.mark.parametrize("args, match", [
    (("nope", 5), "nope.*muon"),
    (("muon", 0), "steps"),
    (("muon", -2), "steps"),
    (("muon", 2.5), "steps"),
    (("cubic5", 4), "cubic5"),
    (("muon", 5, "sideways"), "sideways.*cycle"),
    (([(1.0, 2.0)], 2), "has 2 entries, not 3"),
    (([], 2), "empty"),
    (([(float("nan"), 1.0, 1.0)], 2), r"triples of finite numbers.*\(nan, 1.0, 1.0\) is not finite"),
    (([(float("inf"), 1.0, 1.0)], 2), "is not finite"),
    ((3, 2), r"preset name \(one of \[.*'muon'.*\]\).*got 3 \(not a sequence\)"),
    (([(1.0, 2.0, "x")], 2), "has a non-number"),
    (({"a": 1}, 2), "a dict"),
])
def test_resolve_coefficients_errors(args, match):
  with pytest.raises(ValueError, match=match):
    coef.resolve_coefficients(*args)


# ----------------------------------------------------------------------------- newton_schulz


@pytest.mark.parametrize("cubic", [False, True])
def test_fused_step_is_the_separate_step(cubic, x64):
  """The accelerators' step ``(aI + bA + cA²)·X`` is the CPU's ``aX + (bA + cA²)X``:
  equal in float64, and in bf16 within a few roundings of it."""
  from ortho_optax.newton_schulz import _gram, _ns_step_fused, _ns_step_separate
  abc = (3.4445, -4.7750, 0.0 if cubic else 2.0315)
  x = _rand((3, 24, 40), dtype=jnp.float64) / 8
  t = jnp.asarray(abc, jnp.float64)
  fused = _ns_step_fused(x, _gram(x), t, cubic=cubic)
  np.testing.assert_allclose(fused, _ns_step_separate(x, _gram(x), t, cubic=cubic),
                             rtol=1e-12, atol=1e-14)
  x = (_rand((3, 24, 40)) / 8).astype(jnp.bfloat16)
  t = jnp.asarray(abc, jnp.float32)
  fused, separate = (np.asarray(f(x, _gram(x), t, cubic=cubic), np.float32)
                     for f in (_ns_step_fused, _ns_step_separate))
  exact = np.asarray(_ns_step_separate(x.astype(jnp.float32), _gram(x.astype(jnp.float32)),
                                       t, cubic=cubic))
  assert np.linalg.norm(fused - exact) < 2 * np.linalg.norm(separate - exact) + 1e-6
  assert np.abs(fused - separate).max() <= 4 * 2.0**-8 * np.abs(exact).max()


@pytest.mark.parametrize("platform, bf16_dots", [("cpu", 0), ("cuda", 2)])
def test_step_form_follows_the_platform(platform, bf16_dots):
  """On the CPU every GEMM accumulates into float32 (the references' roundings); on a GPU
  the Gram and update GEMMs write bf16 themselves (the fused step), ``A²`` float32."""
  import re
  x = jnp.ones((32, 48), jnp.bfloat16)
  fn = jax.jit(lambda x: newton_schulz(x, steps=5, backend="xla"))
  text = fn.trace(x).lower(lowering_platforms=(platform,)).as_text()
  assert len(re.findall(r"dot_general.*-> tensor<[0-9x]*bf16>", text)) == 5 * bf16_dots
  assert len(re.findall(r"dot_general.*-> tensor<[0-9x]*f32>", text)) == 5 * (3 - bf16_dots)


def test_float32_steps_have_one_form_everywhere():
  """Only steps below float32 fuse on accelerators (float32 has no rounding to save)."""
  x = _rand((8, 16))
  assert "platform_index" not in str(jax.make_jaxpr(lambda x: newton_schulz(x, **F32))(x))
  bf16 = dict(F32, compute_dtype=jnp.bfloat16)
  assert "platform_index" in str(jax.make_jaxpr(lambda x: newton_schulz(x, **bf16))(x))


def test_steps_are_unrolled_and_one_program_serves_every_table_of_a_length():
  """No XLA loop (on a GPU each iteration of one cost time); the table is traced."""
  from ortho_optax.newton_schulz import _xla_newton_schulz
  x = _rand((32, 48))
  for steps, coefficients in ((3, "muon"), (9, "quintic")):
    f = jax.jit(lambda x: newton_schulz(x, steps=steps, coefficients=coefficients, **F32))
    hlo = f.lower(x).as_text()
    assert "stablehlo.while" not in hlo
    assert hlo.count("stablehlo.dot_general") == 3 * steps
  newton_schulz(x, steps=5, coefficients="quintic", **F32)
  before = _xla_newton_schulz._cache_size()
  for coefficients in ("polar_express", [(3.0, -3.2, 1.2)] * 5, "muon"):
    newton_schulz(x, steps=5, coefficients=coefficients, order="cycle", **F32)
  assert _xla_newton_schulz._cache_size() == before


@pytest.mark.parametrize("preconditioning", PRECONDITIONINGS)
def test_transpose_equivariance(preconditioning):
  x = _rand((12, 20), seed=1)
  f = jax.jit(lambda a: newton_schulz(a, preconditioning=preconditioning, **F32))
  np.testing.assert_allclose(f(x.T), f(x).T, atol=2e-5)


@pytest.mark.parametrize("preconditioning", PRECONDITIONINGS)
def test_scale_invariance(preconditioning):
  x = _rand((16, 24), seed=2)
  f = jax.jit(lambda a: newton_schulz(a, preconditioning=preconditioning, eps=1e-12, **F32))
  # AOL's row sums are invariant-in-effect to the scale; the others normalise it away.
  np.testing.assert_allclose(f(1e3 * x), f(x), atol=3e-4)
  np.testing.assert_allclose(f(1e-3 * x), f(x), atol=3e-4)


@pytest.mark.parametrize("preconditioning", PRECONDITIONINGS)
def test_batched_equals_per_matrix(preconditioning):
  x = _rand((2, 3, 10, 14), seed=3)
  f = jax.jit(
      lambda a: newton_schulz(a, coefficients="quintic", preconditioning=preconditioning, **F32))
  out = f(x)
  assert out.shape == x.shape
  for i in range(2):
    for j in range(3):
      np.testing.assert_allclose(out[i, j], f(x[i, j]), atol=1e-5)


@pytest.mark.parametrize("preconditioning", PRECONDITIONINGS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_zero_input_gives_zeros(preconditioning, dtype):
  z = jnp.zeros((2, 6, 9), dtype)
  out = newton_schulz(z, preconditioning=preconditioning, compute_dtype=dtype, backend="xla")
  assert out.dtype == dtype
  assert np.all(np.asarray(out, np.float32) == 0)


def test_zero_row_stays_zero_with_aol():
  x = _rand((8, 12), seed=4).at[3].set(0.0)
  out = newton_schulz(x, steps=4, coefficients="turbo_aol", preconditioning="aol", eps=1e-6, **F32)
  assert np.all(np.isfinite(out))
  assert np.all(np.asarray(out[3]) == 0)


def test_output_dtype_follows_input():
  x = _rand((8, 12)).astype(jnp.bfloat16)
  assert newton_schulz(x, compute_dtype=jnp.float32, backend="xla").dtype == jnp.bfloat16
  assert newton_schulz(x.astype(jnp.float32), backend="xla").dtype == jnp.float32
  assert newton_schulz(x, compute_dtype=None, backend="xla").dtype == jnp.bfloat16


def test_muon_singular_value_band():
  # Keller's quintic deliberately does not converge to 1: it lands in roughly (0.6, 1.2).
  x = _well_conditioned(24, 40, lo=0.3, hi=1.0)
  s = _svals(newton_schulz(x, steps=5, coefficients="muon", **F32))
  assert 0.6 < s.min() and s.max() < 1.2, s


def test_polar_express_converges_to_one():
  x = _well_conditioned(24, 40, lo=0.05, hi=1.0)
  s = _svals(newton_schulz(x, steps=8, coefficients="polar_express", **F32))
  np.testing.assert_allclose(s, 1.0, atol=1e-2)


@pytest.mark.parametrize("preconditioning", ["schatten", "spectral"])
def test_tighter_preconditioning_starts_closer_to_one(preconditioning):
  # A flat spectrum: Frobenius normalisation shrinks every σ to ~1/sqrt(rank) while the
  # Schatten-4 / power-iteration bounds keep them near 1, so two steps already land
  # closer to 1, without pushing σ_max past the polynomial's basin. (Aurora's gentle
  # quintic: the aggressive tables are designed for the tiny σ of a Frobenius start.)
  x = _well_conditioned(24, 40, lo=0.5, hi=1.0, seed=5)
  f = lambda p: _svals(newton_schulz(x, steps=2, coefficients="aurora", preconditioning=p,
                                     **F32))
  ref, s = f("frobenius"), f(preconditioning)
  assert s.max() < 1.05
  assert np.abs(s - 1).max() < 0.2 < np.abs(ref - 1).max()


def test_spectral_estimate_is_close_to_sigma_max():
  from ortho_optax.newton_schulz import SPECTRAL_SAFETY, _gram, _power_sigma_max
  x = _well_conditioned(20, 30, lo=0.1, hi=0.7)
  est = float(_power_sigma_max(_gram(x))[0, 0])
  assert 0.6 < est <= 0.7 + 1e-5
  assert SPECTRAL_SAFETY >= 1.0


def test_cubic_coefficients_path():
  x = _rand((10, 16), seed=6)
  out = newton_schulz(x, steps=5, coefficients="cubic5", **F32)
  # Reference: the same steps written out with numpy (c = 0).
  X = np.asarray(x, np.float64)
  X = X / (np.linalg.norm(X) + 1e-7)
  for a, b, _ in coef.PRESETS["cubic5"]:
    X = a * X + b * (X @ X.T) @ X
  np.testing.assert_allclose(out, X, atol=1e-5)


def test_custom_table_matches_numpy():
  x = _rand((9, 7), seed=7)  # tall: transposed internally
  table = [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]
  out = newton_schulz(x, steps=3, coefficients=table, **F32)
  X = np.asarray(x, np.float64).T
  X = X / (np.linalg.norm(X) + 1e-7)
  for a, b, c in [table[0], table[1], table[0]]:
    A = X @ X.T
    X = a * X + (b * A + c * A @ A) @ X
  np.testing.assert_allclose(out, X.T, atol=1e-5)


def test_jit_and_bf16_default_runs():
  x = _rand((4, 16, 32))
  out = jax.jit(newton_schulz)(x)
  assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
  s = _svals(out[0])
  assert 0.5 < s.min() and s.max() < 1.3


@pytest.mark.parametrize("kwargs, match", [
    (dict(preconditioning="nope"), "nope.*frobenius"),
    (dict(backend="cuda"), "cuda.*xla"),
    (dict(coefficients="bogus"), "bogus"),
    (dict(steps=0), "steps"),
    (dict(eps=-1.0), "eps"),
    (dict(order="random"), "random"),
    (dict(compute_dtype=jnp.int32), "compute_dtype"),
])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    newton_schulz(_rand((4, 6)), **kwargs)


def test_rank_one_input_raises():
  with pytest.raises(ValueError, match="rank >= 2"):
    newton_schulz(jnp.ones((5,)))


def test_pallas_backend_unavailable_raises(monkeypatch):
  from ortho_optax import pallas
  monkeypatch.setattr(pallas, "is_available", lambda: False)
  with pytest.raises(RuntimeError, match="pallas"):
    newton_schulz(_rand((4, 6)), backend="pallas")


def test_auto_backend_dispatch(monkeypatch):
  """'auto' calls the kernel only for bf16 + frobenius/aol, with a Frobenius-normalised
  wide bf16 stack; everything else stays on XLA."""
  from ortho_optax import pallas
  calls = []

  def fake_kernel(x, coefficients, *, aol=False, eps=1e-7):
    calls.append((x.shape, x.dtype, coefficients, aol, eps))
    # Stand-in kernel: the XLA path on the already-preconditioned stack.
    return newton_schulz(x, steps=len(coefficients), coefficients=coefficients,
                         preconditioning="aol" if aol else "frobenius", eps=eps if aol else 0.0,
                         compute_dtype=jnp.bfloat16, backend="xla")

  monkeypatch.setattr(pallas, "is_available", lambda: True)
  monkeypatch.setattr(pallas, "newton_schulz", fake_kernel, raising=False)
  prefers = []
  monkeypatch.setattr(pallas, "prefers_kernels",
                      lambda b, m, n: prefers.append((b, m, n)) or True, raising=False)
  x = _rand((2, 3, 10, 6))  # tall, batched
  ref = newton_schulz(x, backend="xla")
  out = newton_schulz(x)  # auto, bf16, frobenius -> kernel
  assert len(calls) == 1
  shape, dtype, coeffs, aol, _ = calls[0]
  assert shape == (6, 6, 10) and dtype == jnp.bfloat16 and not aol
  assert coeffs == coef.resolve_coefficients("muon", 5)
  np.testing.assert_allclose(out, ref, atol=2e-2)
  newton_schulz(x, steps=4, coefficients="turbo_aol", preconditioning="aol")
  assert calls[-1][3] is True and len(calls) == 2
  assert prefers[0] == (6, 6, 10)
  newton_schulz(x, compute_dtype=jnp.float32)  # f32 -> XLA
  newton_schulz(x, preconditioning="schatten")  # unsupported by the kernel -> XLA
  monkeypatch.setattr(pallas, "prefers_kernels", lambda b, m, n: False)
  newton_schulz(x)  # too small for the kernels to win -> XLA under "auto"
  assert len(calls) == 2
  newton_schulz(x, backend="pallas")  # explicit request bypasses the size heuristic
  assert len(calls) == 3


def test_newton_schulz_many_matches_one_array_calls():
  from ortho_optax.newton_schulz import newton_schulz_many, newton_schulz_of_transpose
  keys = jax.random.split(jax.random.key(11), 3)
  xs = [jax.random.normal(keys[0], (3, 16, 16)), jax.random.normal(keys[1], (24, 8)),
        jax.random.normal(keys[2], (8, 24)).astype(jnp.bfloat16)]
  flips = [True, False, True]
  kw = dict(steps=4, coefficients="turbo_aol", preconditioning="aol", eps=1e-6)
  outs = newton_schulz_many(xs, of_transpose=flips, **kw)
  for x, flip, out in zip(xs, flips, outs):
    want = (newton_schulz_of_transpose if flip else newton_schulz)(x, **kw)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))
  with pytest.raises(ValueError, match="one flag per array"):
    newton_schulz_many(xs, of_transpose=[True])
  with pytest.raises(ValueError, match="preconditioning"):
    newton_schulz_many(xs, preconditioning="bogus")


@pytest.mark.parametrize("fn", ["newton_schulz", "gram_newton_schulz"])
@pytest.mark.parametrize("preconditioning", ["frobenius", "schatten"])
def test_a_transposed_bf16_stack_runs_on_the_cpu(fn, preconditioning):
  """A stack of one transposed matrix (e.g. a square Flax kernel in its (out, in) view):
  XLA would fold the transpose into a bf16 GEMM that its CPU runtime cannot run."""
  import ortho_optax
  orth = getattr(ortho_optax, fn)
  y = _rand((40, 16), seed=3)
  kw = dict(preconditioning=preconditioning, backend="xla")
  got = jax.jit(lambda y: orth(jnp.stack([y.T]), **kw))(y)
  want = orth(jnp.asarray(np.ascontiguousarray(np.asarray(y).T))[None], **kw)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
