"""Golden vectors of every seed's orthogonalization function, at per-key tolerance.

Goldens use the PyTorch layout; the functions here work on the last two axes (rows =
out), which is that layout already. fp32 goldens run under true-fp32 matmuls.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import golden_tolerance, load_golden
from ortho_optax.newton_schulz import newton_schulz
from ortho_optax.polar import aurora_polar, leverage_uniform_polar


def _x64():
  """A context enabling float64, or None when this JAX has no such context manager."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  try:
    from jax.experimental import enable_x64  # older JAX
  except ImportError:
    return None
  return enable_x64()


def _check_file(rel, fn, dtype=jnp.float32):
  """Runs ``fn(variant, variant_hparams, x)`` on every output key; returns #keys checked."""
  arrays, meta = load_golden(rel)
  variants = meta["hyperparameters"]["variants"]
  failures = []
  for key in meta["output_keys"]:
    _, variant, case = key.split("__")
    x = jnp.asarray(arrays["in__" + case], dtype=dtype)
    got = np.asarray(fn(variant, variants[variant], x))
    want = arrays[key]
    assert got.shape == want.shape, key
    assert got.dtype == want.dtype, (key, got.dtype, want.dtype)
    rtol, atol = golden_tolerance(meta, key)
    if not np.allclose(got, want, rtol=rtol, atol=atol):
      failures.append(f"{key}: max|diff|={np.abs(got - want).max():.3g} (atol {atol:.3g})")
  assert not failures, f"{rel}:\n" + "\n".join(failures)
  return len(meta["output_keys"])


def _keller(compute_dtype):
  return lambda v, h, x: newton_schulz(
      x, steps=h.get("steps", h.get("ns_steps")), coefficients="muon", eps=1e-7,
      compute_dtype=compute_dtype, backend="xla")


@pytest.mark.parametrize("rel", ["auon/zeropower_ns5_fp32.npz", "oadamw/ns5_fp32.npz"])
def test_keller_ns5_fp32(rel, highest_precision):
  # AuON's helper and OAdamW's MuonProjector: Keller quintic x5, X/(‖X‖_F + 1e-7).
  assert _check_file(rel, _keller(jnp.float32)) >= 4


def test_keller_ns5_fp64():
  ctx = _x64()
  if ctx is None:
    pytest.skip("no enable_x64 context manager in this JAX")
  with ctx:
    n = _check_file("auon/zeropower_ns5_fp64.npz", _keller(None), dtype=jnp.float64)
  assert n == 5


def _turbo(compute_dtype):
  def fn(variant, h, x):
    return newton_schulz(
        x, steps=h["iter"], coefficients="turbo_aol",
        preconditioning="aol" if h["precondition"] else "frobenius", eps=h["epsilon"],
        compute_dtype=compute_dtype, backend="xla")
  return fn


def test_turbo_ns_fp32(highest_precision):
  # aol4: AOL rescale fused in step 1 + quintic[-4:]; std5: Frobenius + quintic[-5:].
  assert _check_file("turbo/ns_fp32.npz", _turbo(jnp.float32)) == 12


def test_turbo_ns_fp64():
  ctx = _x64()
  if ctx is None:
    pytest.skip("no enable_x64 context manager in this JAX")
  with ctx:
    assert _check_file("turbo/ns_fp64.npz", _turbo(None), dtype=jnp.float64) == 6


def test_turbo_ns_bf16asis():
  assert _check_file("turbo/ns_bf16asis.npz", _turbo(jnp.bfloat16)) == 12


def _nvidia(compute_dtype):
  def fn(variant, h, x):
    name = {"simple": "muon"}.get(h["coefficient_type"], h["coefficient_type"])
    return newton_schulz(x, steps=h["steps"], coefficients=name, eps=h.get("eps", 1e-15),
                         compute_dtype=compute_dtype, backend="xla")
  return fn


def test_nvidia_ns_fp32_all_presets(highest_precision):
  # 9 variants: simple, quintic (5 and 7 = cycle), polar_express (8 and 10 = repeat_last),
  # cans, aol, deepseekv4, cubic5 -- 5 cases each.
  assert _check_file("eo/ns_fp32.npz", _nvidia(jnp.float32)) == 45


def test_nvidia_ns_bf16medium():
  # "medium": normalise in fp32, iterate in bf16 (rounded after every GEMM epilogue).
  assert _check_file("eo/ns_bf16medium.npz", _nvidia(jnp.bfloat16)) == 5


def test_aurora_polar_fp32(highest_precision):
  fn = lambda v, h, x: aurora_polar(x, steps=h["iterations"], compute_dtype=jnp.float32,
                                    backend="xla")
  assert _check_file("aurora/polar_fp32.npz", fn) == 5


def test_aurora_polar_bf16asis():
  fn = lambda v, h, x: aurora_polar(x, steps=h["iterations"], backend="xla")
  assert _check_file("aurora/polar_bf16asis.npz", fn) == 5


def test_aurora_leverage_polar_fp32(highest_precision):
  # The golden is Aurora's whole update direction for the matrix 0.5*X, including the
  # aspect-ratio factor sqrt(max(1, rows/cols)) (see its __meta__).
  def fn(variant, h, x):
    rows, cols = x.shape[-2:]
    o = leverage_uniform_polar(0.5 * x, pp_iterations=h["pp_iterations"], pp_beta=h["pp_beta"],
                               eps=h["eps"], compute_dtype=jnp.float32, backend="xla")
    return o * np.float32(np.sqrt(max(1.0, rows / cols)))
  assert _check_file("aurora/leverage_polar_fp32.npz", fn) == 12
