"""Shared test set-up: 8 fake CPU devices (sharding tests), golden-vector access, GPU skip."""

import os

# Must happen before JAX initialises its backends: sharding tests use 8 host devices.
# Compiling is most of the suite's time; LLVM's optimisation level changes no result beyond
# float32 rounding (what the comparisons allow) and cuts the suite's time by about 30%.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")

import json
import pathlib

import jax
import numpy as np
import pytest

REFERENCE_DIR = pathlib.Path(
    os.environ.get("ORTHO_OPTAX_REFERENCE",
                   pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference"))


def has_gpu() -> bool:
  try:
    return any(d.platform == "gpu" for d in jax.devices())
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  if has_gpu():
    return
  skip = pytest.mark.skip(reason="needs a GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


def load_golden(rel: str):
  """Returns (arrays, meta) of one golden file, or skips when the references are absent."""
  path = REFERENCE_DIR / rel
  if not path.exists():
    pytest.skip(f"golden vectors not found at {path}")
  z = np.load(path)
  meta = json.loads(str(z["__meta__"]))
  return {k: z[k] for k in z.files if k != "__meta__"}, meta


def golden_tolerance(meta, key):
  tol = meta["output_keys"][key]["tolerance"]
  return tol["rtol"], tol["atol"]


def assert_trees_equal(a, b):
  """Same tree structure and bit-identical leaves."""
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def highest_precision():
  """fp32 goldens need true fp32 matmuls."""
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture
def x64():
  """Float64 arrays inside the test (JAX 0.10 and 0.11 spellings)."""
  if hasattr(jax, "enable_x64"):
    ctx = jax.enable_x64(True)
  else:
    from jax.experimental import enable_x64  # JAX 0.10
    ctx = enable_x64()
  with ctx:
    yield
