"""Property tests (hypothesis) of the orthogonalization functions on awkward inputs.

Random shapes (1×n, n×1, square, very wide / tall, batched, rank-4 leaves with a
``MatrixDims``) and scales from 1e-30 to 1e30, all-zero matrices and matrices with a
single non-zero entry, in float32 and bfloat16. Properties:

* the output is finite and has the input's shape and dtype;
* transposition: ``f(Xᵀ) = f(X)ᵀ`` (to accumulation order for non-square matrices,
  whose orientation is normalised before any arithmetic; within rounding for square ones);
* scale invariance ``f(cX) = f(X)`` wherever ``‖X‖`` dominates ``eps``; below that, the
  exact eps-dominated behaviour (see :func:`_tiny_regime`);
* singular values: Newton–Schulz maps each normalised singular value through the scalar
  composition of its polynomials (checked against a float64 scalar evaluation), which
  lands in each preset's band; the exact ``polar`` is a (partial) isometry.

Shapes come from a small pool so that compiled functions are reused: the whole file runs
in well under 90 s on 2 CPU cores.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ortho_optax import matrix_view
from ortho_optax.coefficients import PRESETS, resolve_coefficients
from ortho_optax.newton_schulz import PRECONDITIONINGS, newton_schulz
from ortho_optax.polar import aurora_polar, leverage_uniform_polar, polar
from ortho_optax.stages.orthogonalize import orthogonalize

PROPS = settings(max_examples=10, deadline=None, derandomize=True, print_blob=False,
                 phases=(Phase.explicit, Phase.generate),  # no slow shrinking
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: Matrix shapes: row / column vectors, square, wide, tall, very wide, batched.
SHAPES = [(1, 7), (7, 1), (1, 1), (5, 5), (8, 8), (3, 12), (12, 3), (2, 64), (64, 2),
          (2, 4, 9), (3, 6, 6)]
#: Overall scales of the input; 0.0 means the all-zero matrix.
SCALES = [1e-30, 1e-20, 1e-12, 1e-4, 1.0, 3.0, 1e4, 1e12, 1e20, 1e30, 0.0]
#: Input patterns: dense Gaussian, or a single non-zero entry.
PATTERNS = ["gaussian", "one_entry"]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

#: Coefficient presets with a step count each can run (cubic5 needs 5, turbo_aol <= 5).
PRESET_STEPS = {"muon": 5, "quintic": 5, "polar_express": 8, "cans": 5, "aol": 4,
                "turbo_aol": 4, "deepseekv4": 10, "cubic5": 5, "aurora": 12}
assert set(PRESET_STEPS) == set(PRESETS)

#: Elementwise tolerance of one Newton–Schulz evaluation against another (max-abs
#: normalised); bf16 iterations round every intermediate to 8 mantissa bits.
TOL = {jnp.float32: 2e-4, jnp.bfloat16: 6e-2}
#: f(Xᵀ) vs f(X)ᵀ for non-square X: both orientations become the same wide matrix before
#: any arithmetic, but the compiled programs differ (the transpose fuses into different
#: GEMMs), so only accumulation order differs.
TRANSPOSE_TOL = {jnp.float32: 5e-6, jnp.bfloat16: 3e-2}


def _make(shape, scale, pattern, seed, dtype=np.float32):
  rng = np.random.default_rng(seed)
  if pattern == "gaussian":
    x = rng.standard_normal(shape)
  else:
    x = np.zeros(shape)
    flat = x.reshape(-1, *shape[-2:])
    for b in range(flat.shape[0]):
      i, j = rng.integers(shape[-2]), rng.integers(shape[-1])
      flat[b, i, j] = rng.choice([-1.0, 1.0]) * (1.0 + rng.random())
    x = flat.reshape(shape)
  return jnp.asarray((x * scale).astype(np.float32), dtype)


def _np(x):
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _fro(x):
  """Per-matrix Frobenius norm in float64 (no overflow for 1e30 inputs)."""
  return np.sqrt(np.sum(np.square(_np(x)), axis=(-2, -1)))


def _maxdiff(a, b):
  return float(np.max(np.abs(_np(a) - _np(b)), initial=0.0))


@functools.lru_cache(maxsize=None)
def _ns(preset, preconditioning, compute_dtype, eps):
  """A jitted Newton–Schulz with the preset's default step count (cached per config)."""
  steps = PRESET_STEPS[preset]
  return jax.jit(functools.partial(
      newton_schulz, steps=steps, coefficients=preset, preconditioning=preconditioning,
      eps=eps, compute_dtype=compute_dtype, backend="xla"))


def _transposed(x):
  return jnp.swapaxes(x, -1, -2)


def _scalar_map(preset, sigma):
  """Float64 image of normalised singular values under the preset's polynomials."""
  s = np.asarray(sigma, np.float64)
  for a, b, c in resolve_coefficients(preset, PRESET_STEPS[preset]):
    s = a * s + b * s ** 3 + c * s ** 5
  return s


def _prod_a(preset):
  return math.prod(t[0] for t in resolve_coefficients(preset, PRESET_STEPS[preset]))


def _eps_dominated(x, eps, preset):
  """True when X/(‖X‖_F+eps) is so small that every NS step acts linearly (σ³ ≪ σ)."""
  return bool(np.all(_fro(x) * abs(_prod_a(preset)) < 1e-6 * eps))


def _tiny_regime(x, preset, preconditioning, eps):
  """The exact output in the eps-dominated regime (‖X‖ ≪ eps), in float64.

  Every NS step is then linear (``X ← aX``: the cubic and quintic terms are below the
  float32 range), so ``f(X) = (Π a_k) · P(X)`` with ``P`` the preconditioning:
  ``X/(‖X‖_F + eps)`` for Frobenius (and for Schatten / spectral, whose second
  normalisation underflows to 0 there and is skipped), and ``X/sqrt(eps)`` for AOL
  (every Gram row sum is below the ``eps`` clamp). This is not scale invariant: eps
  sets the scale below which an update is treated as (almost) zero.
  """
  xd = _np(x)
  if preconditioning == "aol":
    pre = xd / math.sqrt(eps)
  else:
    pre = xd / (_fro(x)[..., None, None] + eps)
  return _prod_a(preset) * pre


# ---------------------------------------------------------------------------------------
# newton_schulz: every preset × every preconditioning
# ---------------------------------------------------------------------------------------

#: Tables fitted on [0, 1] that spectral preconditioning refuses (see
#: :func:`test_spectral_preconditioning_refuses_tables_without_margin`).
SPECTRAL_REFUSED = ("cans", "polar_express")

ns_case = st.tuples(
    st.sampled_from(sorted(PRESETS)), st.sampled_from(PRECONDITIONINGS),
    st.sampled_from(SHAPES), st.sampled_from(SCALES), st.sampled_from(PATTERNS),
    st.sampled_from(sorted(DTYPES)), st.integers(0, 2**16)).filter(
        lambda c: not (c[1] == "spectral" and c[0] in SPECTRAL_REFUSED))


def _wide(xd):
  return xd if xd.shape[-2] <= xd.shape[-1] else np.swapaxes(xd, -1, -2)


def _aol_rowsums(xd):
  """Σ_j |(XXᵀ)_rj| of the wide orientation (what AOL clamps at eps), float64."""
  w = _wide(xd)
  return np.sum(np.abs(w @ np.swapaxes(w, -1, -2)), axis=-1)


def _regime(x, x1, preset, pre, eps):
  """``"scale_free"``, ``"eps_dominated"`` or ``"transition"`` for input ``x``.

  ``scale_free``: ``x`` and its unit-scale twin ``x1`` both dominate eps (relative eps
  effect <= 1e-5), so ``f(x) = f(x1)`` to rounding. ``eps_dominated``: the exact linear
  regime of :func:`_tiny_regime`.
  """
  xd, x1d = _np(x), _np(x1)
  if pre == "aol":
    rs, rs1 = _aol_rowsums(xd), _aol_rowsums(x1d)
    if np.all((rs == 0) | (rs >= 1e5 * eps)) and np.all((rs1 == 0) | (rs1 >= 1e5 * eps)):
      return "scale_free"
    pre_x = xd / math.sqrt(eps)
    if np.all(rs < eps / 10) and abs(_prod_a(preset)) * np.max(_fro(pre_x)) < 1e-4:
      return "eps_dominated"
    return "transition"
  if np.all(_fro(x) >= 1e5 * eps):
    return "scale_free"
  pre_x = xd / (_fro(x)[..., None, None] + eps)
  tiny = abs(_prod_a(preset)) * np.max(_fro(pre_x)) < 1e-4
  if pre in ("schatten", "spectral"):
    # Their second normalisation (from the Gram) only vanishes once XXᵀ underflows.
    tiny = tiny and np.max(_fro(pre_x)) < 1e-20
  return "eps_dominated" if tiny else "transition"


@PROPS
@given(ns_case)
def test_newton_schulz_finite_transpose_and_scale(case):
  preset, pre, shape, scale, pattern, dtype_name, seed = case
  dtype = DTYPES[dtype_name]
  eps = 1e-7
  f = _ns(preset, pre, dtype, eps)
  x = _make(shape, scale, pattern, seed, dtype)
  y = f(x)
  assert y.shape == x.shape and y.dtype == x.dtype
  assert np.all(np.isfinite(_np(y))), (case, y)
  if scale == 0.0:
    assert np.all(_np(y) == 0)
    return
  # Transposition.
  yt = f(_transposed(x))
  if shape[-1] != shape[-2]:
    assert _maxdiff(yt, _transposed(y)) <= TRANSPOSE_TOL[dtype], case
  elif pre != "aol":
    # Square: NS on Xᵀ uses XᵀX instead of XXᵀ; equal up to rounding.
    assert _maxdiff(yt, _transposed(y)) <= TOL[dtype] * 4, case
  # (AOL on a square matrix scales the rows of X resp. of Xᵀ: polar(DX) ≠ polar(XD)ᵀ,
  # so AOL is not transpose-equivariant for square inputs, by design.)
  # Scale: compare with the same matrix at unit scale.
  x1 = _make(shape, 1.0, pattern, seed, dtype)
  y1 = f(x1)
  regime = _regime(x, x1, preset, pre, eps)
  if regime == "scale_free":
    assert _maxdiff(y, y1) <= 2 * TOL[dtype] * max(1.0, float(np.max(np.abs(_np(y1))))), case
  elif regime == "eps_dominated":
    want = _tiny_regime(x, preset, pre, eps)
    np.testing.assert_allclose(_np(y), want, rtol=TOL[dtype],
                               atol=TOL[dtype] * float(np.max(np.abs(want))))
  else:
    # The transition region (‖X‖ ~ eps): finite and never larger than the converged size.
    assert float(np.max(np.abs(_np(y)))) <= 1.5, case


@PROPS
@given(ns_case)
def test_newton_schulz_is_a_descent_direction(case):
  """``⟨f(X), X⟩ > 0``: every preset but ``aol`` keeps each singular value's sign.

  Each composite scalar map is positive on (0, 1] (checked on a float64 grid), except
  NVIDIA's ``aol`` table: its first triple has a root at σ = 0.8837, so a normalised
  singular value above it (a rank-1 or dominated matrix, e.g. the gradient of a
  single example, or any near-orthogonal input under AOL preconditioning) comes out
  with its sign flipped: the update points uphill along that direction.
  """
  preset, pre, shape, scale, pattern, dtype_name, seed = case
  dtype = DTYPES[dtype_name]
  grid = np.linspace(1e-6, 1.0, 20001)
  if preset != "aol":
    assert _scalar_map(preset, grid).min() > 0
  if scale == 0.0:
    return
  x = _make(shape, scale, pattern, seed, dtype)
  y = _ns(preset, pre, dtype, 1e-7)(x)
  inner = np.sum(_np(y) * (_np(x) / scale), axis=(-2, -1))
  rank1 = pattern == "one_entry" or min(shape[-2:]) == 1
  if preset == "aol" and rank1 and _regime(x, x, preset, pre, 1e-7) == "scale_free":
    # σ/‖X‖_F = 1 (and AOL also gives σ = 1): mapped to the scalar map's value at 1 < 0.
    assert _scalar_map("aol", 1.0) < 0
    assert np.all(inner < 0), (case, inner)
  elif preset != "aol":
    assert np.all(inner > 0), (case, inner)


well_case = st.tuples(
    st.sampled_from([(8, 8), (6, 16), (16, 6), (2, 5, 12), (4, 40)]),
    st.sampled_from([1e-20, 1e-3, 1.0, 1e6, 1e25]),
    st.sampled_from(sorted(DTYPES)), st.integers(0, 2**16))


def _well_conditioned(shape, scale, seed, cond=2.0):
  """``U diag(σ) Vᵀ`` with σ spread over ``[1/cond, 1] · scale``."""
  rng = np.random.default_rng(seed)
  *batch, m, n = shape
  k = min(m, n)
  u = np.linalg.qr(rng.standard_normal((*batch, m, k)))[0]
  v = np.linalg.qr(rng.standard_normal((*batch, n, k)))[0]
  s = np.linspace(1.0 / cond, 1.0, k)
  x = (u * s) @ np.swapaxes(v, -1, -2)
  return x * scale


def _well_case_input(case):
  """``(shape, scale, dtype, x)`` of a ``well_case`` draw, x in its dtype."""
  shape, scale, dtype_name, seed = case
  dtype = DTYPES[dtype_name]
  return shape, scale, dtype, jnp.asarray(
      _well_conditioned(shape, scale, seed).astype(np.float32), dtype)


def _svals(x):
  return np.linalg.svd(_np(x), compute_uv=False)


#: Presets whose bf16 iteration tracks the exact scalar map on well-conditioned inputs.
#: ``cans`` is not among them (see :func:`test_cans_in_bfloat16_diverges_on_flat_spectra`)
#: and neither is ``cubic5``, whose map is steep near its interior root (see
#: :func:`test_cubic5_collapses_singular_values_near_0_58`).
BF16_TRACKS_SCALAR_MAP = ("muon", "quintic", "polar_express", "aol", "turbo_aol",
                          "deepseekv4", "aurora")


@PROPS
@given(well_case, st.sampled_from(sorted(PRESETS)))
def test_newton_schulz_singular_values_follow_the_scalar_map(case, preset):
  """Frobenius NS = the scalar polynomial map on each normalised singular value."""
  shape, scale, dtype_name, seed = case
  dtype = DTYPES[dtype_name]
  xd = _well_conditioned(shape, scale, seed)
  x = jnp.asarray(xd.astype(np.float32), dtype)
  # ‖X‖ ≪ eps at 1e-20: use eps = 0 (allowed) there to check the scale range itself.
  eps = 0.0 if scale < 1e-10 else 1e-7
  s_in = _svals(x) / (_fro(x)[..., None] + eps)
  # |·|: a negative value of the map is a singular value with flipped sign (``aol``).
  want = np.sort(np.abs(_scalar_map(preset, s_in)), axis=-1)
  for compute in (jnp.float32, jnp.bfloat16):
    if compute == jnp.bfloat16 and preset not in BF16_TRACKS_SCALAR_MAP:
      continue
    y = _ns(preset, "frobenius", compute, eps)(x)
    got = np.sort(_svals(y), axis=-1)
    tol = 1e-3 if compute == jnp.float32 and dtype == jnp.float32 else 8e-2
    np.testing.assert_allclose(got, want, atol=tol * max(1.0, want.max()))
    # The bands the presets promise for a well-conditioned (cond 2) input.
    if preset == "muon":
      assert 0.6 < got.min() and got.max() < 1.2, got
    if preset in ("polar_express", "deepseekv4", "aurora"):
      assert np.abs(got - 1).max() < (0.02 if compute == jnp.float32 else 0.07), got
    if preset in ("quintic", "turbo_aol"):
      assert 0.9 < got.min() and got.max() < 1.1, got


def test_cans_in_bfloat16_diverges_on_flat_spectra():
  """Known hazard of NVIDIA's ``cans`` table in bfloat16 (the default compute dtype).

  With a flat spectrum of small rank k (an orthogonal 8×8 input: σ/‖X‖_F = 1/√8 ≈ 0.35)
  the first CANS triple overshoots to σ ≈ 1.99, where the later triples are expansive
  (p₂'(2) ≈ 13): in exact arithmetic (and in float32) the trajectory comes back to ~1,
  but bf16 rounding is amplified step after step and the result explodes (σ_max ~ 1e7).
  Use ``compute_dtype=jnp.float32`` with ``coefficients="cans"``.
  """
  q = np.linalg.qr(np.random.default_rng(3).standard_normal((8, 8)))[0]
  s_exact = _scalar_map("cans", np.full(8, 1 / math.sqrt(8)))
  assert abs(s_exact.max() - 1) < 0.05
  s32 = _svals(_ns("cans", "frobenius", jnp.float32, 1e-7)(jnp.asarray(q, jnp.float32)))
  np.testing.assert_allclose(s32, s_exact, atol=1e-3)
  with pytest.warns(UserWarning, match="diverge in bfloat16"):
    s16 = _svals(_ns("cans", "frobenius", jnp.bfloat16, 1e-7)(jnp.asarray(q, jnp.float32)))
  assert np.all(np.isfinite(s16)) and s16.max() > 100, s16


def test_spectral_preconditioning_refuses_tables_without_margin():
  """The power-iteration estimate can fall short of σ_max (9% for this Gaussian 16×64
  matrix, so σ_max ends at 1.042 after the 1.05 safety factor). Polar Express maps 1.042
  to 2.87 and then to inf: that combination is refused when built, and the tables with a
  margin stay finite on the same matrix."""
  import ortho_optax as oo
  from ortho_optax.newton_schulz import SPECTRAL_SAFETY, _gram, _power_sigma_max
  x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 64)), jnp.float32)
  xn = x / jnp.linalg.norm(x)
  est = float(_power_sigma_max(_gram(xn))[0, 0])
  assert SPECTRAL_SAFETY * est < float(np.linalg.svd(np.asarray(xn), compute_uv=False)[0])
  for preset in SPECTRAL_REFUSED:
    with pytest.raises(ValueError, match=rf"preconditioning='spectral'.*'{preset}'.*schatten"):
      oo.muon(learning_rate=0.02, coefficients=preset, preconditioning="spectral")
    with pytest.raises(ValueError, match="preconditioning='spectral'"):
      newton_schulz(x, coefficients=preset, steps=5, preconditioning="spectral")
  for preset in sorted(set(PRESETS) - set(SPECTRAL_REFUSED)):
    y = _ns(preset, "spectral", jnp.float32, 1e-7)(x)
    assert np.all(np.isfinite(_np(y))), preset


def test_a_table_that_diverges_in_its_compute_dtype_warns_when_built():
  """``cans`` has no margin above σ = 1 (p₁(1) ≈ 1.99, p₁'(1) ≈ 26): building it for bf16
  or fp16 iterations warns, naming the remedy, from the optimizer's constructor or, with
  ``compute_dtype=None``, when a bf16 stack is traced. Every other preset, and ``cans`` in
  float32, builds silently."""
  import warnings

  import ortho_optax as oo
  from ortho_optax import orthogonalizers
  from ortho_optax.coefficients import UNSTABLE_GROWTH, rounding_growth

  with pytest.warns(UserWarning, match=r"diverge in bfloat16.*compute_dtype='float32'"):
    oo.muon(learning_rate=0.02, coefficients="cans")
  with pytest.warns(UserWarning, match="diverge in float16"):
    orthogonalizers.newton_schulz_orthogonalizer(coefficients="cans", compute_dtype="float16")
  with pytest.warns(UserWarning, match="diverge in bfloat16"):
    newton_schulz(jnp.ones((4, 4), jnp.bfloat16), coefficients="cans", compute_dtype=None,
                  backend="xla")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    oo.muon(learning_rate=0.02, coefficients="cans", compute_dtype=jnp.float32)
    newton_schulz(jnp.ones((4, 4)), coefficients="cans", compute_dtype=None, backend="xla")
    for preset in sorted(set(PRESETS) - {"cans"}):
      for steps in range(1, 11):
        try:
          table = resolve_coefficients(preset, steps)
        except ValueError:  # cubic5 has 5 steps only, turbo_aol at most 5
          continue
        orthogonalizers.newton_schulz_orthogonalizer(coefficients=preset, steps=steps)
        assert rounding_growth(table, "bfloat16") < 1.05, (preset, steps)
    # Not converged after one step (σ up to 1.99) is not diverging.
    orthogonalizers.newton_schulz_orthogonalizer(coefficients="polar_express", steps=1)
    # A table that overshoots in exact arithmetic too is not blamed on float32 rounding.
    orthogonalizers.newton_schulz_orthogonalizer(coefficients="cans", steps=6, order="cycle",
                                                 compute_dtype="float32")
  assert rounding_growth(resolve_coefficients("cans", 5), "bfloat16") > UNSTABLE_GROWTH
  assert rounding_growth([list(t) for t in resolve_coefficients("cans", 5)],
                         "float32") < 1.05  # any sequence of triples
  # backend="pallas" iterates in bf16: another compute dtype is an error, not ignored.
  with pytest.raises(ValueError, match=r"backend='pallas' iterates in bfloat16.*'float32'"):
    oo.muon(learning_rate=0.02, backend="pallas", compute_dtype="float32")


def test_cubic5_collapses_singular_values_near_0_58():
  """NVIDIA's 5-step cubic table is not monotone. Step 1 peaks at σ* = √(a/3|b|) ≈ 0.5794
  with p₁(σ*) ≈ 1.29997, just below the root √(2.5744/1.4957) ≈ 1.3119 of step 2, so that
  singular value collapses to ≈ 0.06 after two steps and only recovers to ≈ 0.775 after
  five (σ near 1 ends at ≈ 1.0): the map is steep there, which is also why bf16 rounding
  moves it by up to ~0.3. Float32 NS follows the scalar map exactly."""
  (a1, b1, _), (a2, b2, _) = resolve_coefficients("cubic5", 5)[:2]
  star = math.sqrt(a1 / (3 * -b1))
  peak = a1 * star + b1 * star ** 3
  assert abs(star - 0.5794) < 1e-3 and peak < math.sqrt(a2 / -b2)
  assert a2 * peak + b2 * peak ** 3 < 0.07
  final = float(_scalar_map("cubic5", star))
  assert 0.7 < final < 0.8
  # X = diag(σ*, rest) with ‖X‖_F = 1 (eps = 0): NS reproduces the dip.
  rest = math.sqrt(1 - star ** 2)
  x = np.diag([star, rest / math.sqrt(2), rest / math.sqrt(2)]).astype(np.float32)
  y = _np(_ns("cubic5", "frobenius", jnp.float32, 0.0)(jnp.asarray(x)))
  np.testing.assert_allclose(np.diag(y), _scalar_map("cubic5", np.diag(x)), atol=1e-3)


@PROPS
@given(well_case)
def test_aol_turbo_band(case):
  """Turbo-Muon's AOL + 4 ``turbo_aol`` steps: σ of a well-conditioned input near 1."""
  shape, scale, dtype, x = _well_case_input(case)
  y = _ns("turbo_aol", "aol", dtype, 1e-6)(x)
  s = _svals(y)
  if scale < 1e-10:
    # Every Gram row sum is under the eps clamp: the eps regime, not orthogonalized.
    np.testing.assert_allclose(
        _np(y), _tiny_regime(x, "turbo_aol", "aol", 1e-6), rtol=5e-2,
        atol=1e-2 * float(np.max(np.abs(_tiny_regime(x, "turbo_aol", "aol", 1e-6)))))
    return
  assert 0.6 < s.min() and s.max() < 1.25, s


# ---------------------------------------------------------------------------------------
# polar, aurora_polar, leverage_uniform_polar
# ---------------------------------------------------------------------------------------

mat_case = st.tuples(st.sampled_from(SHAPES), st.sampled_from(SCALES),
                     st.sampled_from(PATTERNS), st.integers(0, 2**16))

_polar = jax.jit(polar)


@PROPS
@given(mat_case)
def test_polar_is_a_partial_isometry_at_every_scale(case):
  shape, scale, pattern, seed = case
  x = _make(shape, scale, pattern, seed)
  p = _polar(x)
  pd = _np(p)
  assert p.shape == x.shape and np.all(np.isfinite(pd))
  if scale == 0.0:
    assert np.all(pd == 0)
    return
  # P Pᵀ P = P (orthonormal rows or columns on the range of X), and full-rank Gaussian
  # inputs give orthonormal rows (wide) / columns (tall).
  np.testing.assert_allclose(pd @ np.swapaxes(pd, -1, -2) @ pd, pd, atol=2e-5)
  m, n = shape[-2:]
  if pattern == "gaussian":
    gram = pd @ np.swapaxes(pd, -1, -2) if m <= n else np.swapaxes(pd, -1, -2) @ pd
    np.testing.assert_allclose(gram, np.broadcast_to(np.eye(min(m, n)), gram.shape),
                               atol=2e-5)
  # SVD polar is scale invariant at every scale (no eps) and transpose-equivariant.
  np.testing.assert_allclose(pd, _np(_polar(_make(shape, 1.0, pattern, seed))), atol=2e-5)
  np.testing.assert_allclose(_np(_polar(_transposed(x))), np.swapaxes(pd, -1, -2), atol=2e-5)


@functools.lru_cache(maxsize=None)
def _aurora(kind, dtype):
  if kind == "aurora_polar":
    return jax.jit(functools.partial(aurora_polar, compute_dtype=dtype, backend="xla"))
  return jax.jit(functools.partial(leverage_uniform_polar, compute_dtype=dtype, backend="xla"))


@PROPS
@given(mat_case, st.sampled_from(["aurora_polar", "leverage_uniform_polar"]),
       st.sampled_from(sorted(DTYPES)))
def test_aurora_polars_finite_transpose_and_scale(case, kind, dtype_name):
  shape, scale, pattern, seed = case
  dtype = DTYPES[dtype_name]
  f = _aurora(kind, dtype)
  x = _make(shape, scale, pattern, seed, dtype)
  y = f(x)
  yd = _np(y)
  assert y.shape == x.shape and y.dtype == x.dtype and np.all(np.isfinite(yd)), case
  if scale == 0.0:
    assert np.all(yd == 0)
    return
  if shape[-1] != shape[-2]:
    assert _maxdiff(f(_transposed(x)), _transposed(y)) <= TRANSPOSE_TOL[dtype], case
  else:
    assert _maxdiff(f(_transposed(x)), _transposed(y)) <= TOL[dtype] * 4
  y1 = f(_make(shape, 1.0, pattern, seed, dtype))
  if kind == "aurora_polar":
    big_enough = bool(np.all(_fro(x) >= 1e3 * 1e-7))
  else:
    # Leverage balancing normalises every row first: D₀ = 1/max(‖Y_i‖, eps) on the
    # tall orientation, so every non-zero row must dominate eps.
    y_tall = _np(x) if shape[-2] >= shape[-1] else np.swapaxes(_np(x), -1, -2)
    rows = np.sqrt(np.sum(y_tall ** 2, axis=-1))
    big_enough = bool(np.all((rows == 0) | (rows >= 1e3 * 1e-7)))
  if big_enough:
    assert _maxdiff(y, y1) <= 2 * TOL[dtype], case
  else:
    # eps-dominated: a (much) smaller update than the unit-scale one, never a blow-up.
    assert float(np.max(np.abs(yd))) <= float(np.max(np.abs(_np(y1)))) + TOL[dtype]


@PROPS
@given(well_case)
def test_leverage_uniform_polar_balances_rows(case):
  shape, scale, dtype, x = _well_case_input(case)
  y = _np(_aurora("leverage_uniform_polar", dtype)(x))
  m, n = shape[-2:]
  if scale < 1e-10:
    # Non-square: row norms (1e-20) are under eps: D₀ = 1/eps, the first polar is eps-dominated,
    # but the re-weighting pass divides by max(‖P_i‖², eps²) and undoes most of it: the
    # output is a bounded, non-zero, partially orthogonalized matrix.
    if m == n:
      # Square matrices get plain aurora_polar: its linear eps regime, 2¹² X/(‖X‖+1e-7).
      want = 2.0 ** 12 * _np(x) / (_fro(x)[..., None, None] + 1e-7)
      np.testing.assert_allclose(y, want, rtol=0.05, atol=0.05 * np.abs(want).max())
    else:
      s = _svals(y)
      assert 0.3 < s.min() and s.max() < 1.05, s
    return
  tall = y if m >= n else np.swapaxes(y, -1, -2)
  s = _svals(tall)
  assert np.abs(s - 1).max() < (0.03 if dtype == jnp.float32 else 0.12), s
  if m != n:
    row_sq = np.sum(tall ** 2, axis=-1)
    target = min(m, n) / max(m, n)
    # Two damped passes move the leverage scores toward uniform, from those of the plain
    # polar factor: the largest deviation from min/max ends below 90% of the polar's
    # (at most 85% in 1,500 float32 draws of these shapes; 53% for a (2, 5, 12) draw
    # whose polar deviates by 0.45, where no fixed bound near the target holds).
    x_tall = _np(x) if m >= n else np.swapaxes(_np(x), -1, -2)
    u, _, vt = np.linalg.svd(x_tall, full_matrices=False)
    polar_dev = np.abs(np.sum((u @ vt) ** 2, axis=-1) - target).max()
    tol = 0.01 if dtype == jnp.float32 else 0.05
    assert np.abs(row_sq - target).max() <= 0.9 * polar_dev + tol, (row_sq, polar_dev)


# ---------------------------------------------------------------------------------------
# The orthogonalize stage on rank-4 leaves with MatrixDims
# ---------------------------------------------------------------------------------------

RANK4_DIMS = [
    matrix_view.MatrixDims(reduction_axes=(1,), output_axes=(3,)),
    matrix_view.MatrixDims(reduction_axes=(0, 1), output_axes=(2,)),
    matrix_view.MatrixDims(reduction_axes=(3,), output_axes=(0, 2)),
    matrix_view.MatrixDims(reduction_axes=(2,), output_axes=(3,), num_splits=2),
]
RANK4_SHAPES = [(2, 3, 4, 6), (1, 5, 2, 4), (3, 1, 8, 2)]


def _swap_dims(d):
  return matrix_view.MatrixDims(d.output_axes, d.reduction_axes, 1)


@functools.lru_cache(maxsize=None)
def _stage(method, dims, dtype):
  tx = orthogonalize(method, dimension_numbers=dims, compute_dtype=dtype, backend="xla")
  return tx, jax.jit(lambda u, s: tx.update(u, s)[0])


@PROPS
@given(st.sampled_from(RANK4_SHAPES), st.sampled_from(RANK4_DIMS),
       st.sampled_from(["newton_schulz", "polar", "aurora"]),
       st.sampled_from([1e-25, 1.0, 1e25, 0.0]), st.sampled_from(sorted(DTYPES)),
       st.integers(0, 2**16))
def test_orthogonalize_rank4_matrix_dims(shape, dims, method, scale, dtype_name, seed):
  dtype = DTYPES[dtype_name]
  if math.prod(shape[a] for a in dims.output_axes) % dims.num_splits:
    return  # (rejected by validate_dims; covered in tests/test_matrix_view.py)
  x = {"w": _make(shape, scale, "gaussian", seed, dtype), "none": None}
  tx, upd = _stage(method, dims, dtype)
  state = tx.init(x)
  out = upd(x, state)
  assert out["none"] is None
  y = out["w"]
  assert y.shape == shape and y.dtype == dtype and np.all(np.isfinite(_np(y)))
  # The stage is the matrix function applied to the (batch, out, in) view.
  mats, restore = matrix_view.to_matrices(x["w"], dims)
  fn = {"newton_schulz": lambda m: newton_schulz(m, compute_dtype=dtype, backend="xla"),
        "polar": polar,
        "aurora": lambda m: leverage_uniform_polar(m, compute_dtype=dtype, backend="xla",
                                                   steps=12)}[method]
  assert _maxdiff(y, restore(fn(mats))) <= TRANSPOSE_TOL[dtype]
  if scale == 0.0:
    assert np.all(_np(y) == 0)
    return
  # Swapping the roles of fan-in and fan-out transposes every matrix of the view; the
  # restored leaf is the same (to accumulation order when the matrices are not square).
  if dims.num_splits == 1:
    _, upd_t = _stage(method, _swap_dims(dims), dtype)
    yt = upd_t(x, tx.init(x))["w"]
    m_out, m_in = mats.shape[1:]
    if m_out != m_in:
      assert _maxdiff(yt, y) <= TRANSPOSE_TOL[dtype]
    else:
      assert _maxdiff(yt, y) <= TOL[dtype] * 4
  if scale >= 1.0 or method == "polar":
    y1 = upd({"w": _make(shape, 1.0, "gaussian", seed, dtype), "none": None}, state)["w"]
    assert _maxdiff(y, y1) <= 2 * TOL[dtype]


# ---------------------------------------------------------------------------------------
# Non-finite inputs stay non-finite (never a silent finite update)
# ---------------------------------------------------------------------------------------

NONFINITE_FNS = {
    **{f"newton_schulz_{p}": (lambda p: lambda x: _ns("muon", p, jnp.bfloat16, 1e-7)(x))(p)
       for p in PRECONDITIONINGS},
    "polar": _polar,
    "aurora_polar": lambda x: _aurora("aurora_polar", jnp.bfloat16)(x),
    "leverage_uniform_polar": lambda x: _aurora("leverage_uniform_polar", jnp.bfloat16)(x),
}


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("fn", list(NONFINITE_FNS))
def test_non_finite_entry_gives_non_finite_matrix(fn, value):
  """One NaN/±Inf entry makes that matrix's output non-finite (so ``apply_if_finite`` and
  Aurora's guard see it); the other matrices of the batch are unaffected."""
  x = np.array(_make((2, 5, 8), 1.0, "gaussian", 0))
  x[1, 2, 3] = value
  y = _np(NONFINITE_FNS[fn](jnp.asarray(x)))
  assert np.all(np.isfinite(y[0]))
  assert not np.all(np.isfinite(y[1]))
