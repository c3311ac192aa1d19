"""Every optimizer on awkward parameter trees, low-precision dtypes and non-finite gradients.

* dtypes float32 / bfloat16 / float16: updates keep the parameter dtype (OAdamW's Kahan
  path returns float32 updates for half-precision parameters, which ``apply_updates``
  casts back), parameters stay finite, and the state dtypes follow the table of
  :data:`STATE_DTYPE_RULES` (also written into the README);
* trees with ``None`` leaves, empty ``(0, n)`` arrays, scalars and integer leaves (always
  ``"frozen"``: left untouched, whatever the ``label_fn`` says);
* NaN / Inf in one gradient element, with ``optax.apply_if_finite`` (the step is skipped
  and the state is unchanged) and without it (the documented behaviour: the bad leaf's
  update and its state become non-finite and stay so, other leaves are unaffected;
  Aurora's built-in guard skips its matrix step instead).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import assert_trees_equal
import ortho_optax
from ortho_optax.optimizers import aurora as aurora_lib

NAMES = ["muon", "turbo_muon", "auon", "hybrid_auon", "aurora", "riemannian_aurora",
         "adaptive_muon", "normuon", "adamuon", "namo", "oadamw"]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
#: Optimizers with a second-moment stage on the orthogonalized branch (kept in float32).
SECOND_MOMENT = ("adaptive_muon", "normuon", "adamuon", "namo")
#: Optimizers whose matrix branch is wrapped in ``apply_if_finite`` internally.
GUARDED = ("aurora", "riemannian_aurora")


def _factory(name):
  return getattr(ortho_optax, name)


def _params(dtype):
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  return {
      "dense": {"kernel": (0.3 * jax.random.normal(k[0], (6, 4))).astype(dtype),
                "bias": (0.1 * jax.random.normal(k[1], (4,))).astype(dtype)},
      "out_proj": {"kernel": (0.3 * jax.random.normal(k[2], (4, 4))).astype(dtype)},
      "gain": jnp.asarray(1.0, dtype),
  }


def _grads(params, seed, scale):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      (scale * jax.random.normal(k, x.shape)).astype(x.dtype) for k, x in zip(keys, leaves)])


@functools.lru_cache(maxsize=None)
def _opt(name, guard=False):
  tx = _factory(name)()
  if guard:
    tx = optax.apply_if_finite(tx, max_consecutive_errors=5)
  return tx, jax.jit(tx.update)


def _finite(x):
  return bool(jnp.all(jnp.isfinite(jnp.asarray(x, jnp.float32))))


def _float_leaves_with_path(tree):
  return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if jnp.issubdtype(x.dtype, jnp.floating)]


def _state_part(name, path):
  """Which part of the optimizer a state leaf belongs to, from its key path."""
  if name == "oadamw" and (".mu[" in path or ".nu[" in path):
    return "stable_adamw"  # OAdamW's StableAdamW core, behind the routing
  if "compensation" in path:
    return "kahan"
  if "['adam']" in path:
    return "adam"
  if ".nu[" in path:
    return "second_moment"
  if ".mu[" in path:
    return "momentum"
  return "other"


def expected_state_dtype(name, part, dtype):
  """The documented dtype of each part of the state (``mu_dtype=None`` defaults)."""
  if part == "second_moment":
    return jnp.float32  # AdaMuon / NorMuon / NAMO second moments: always float32
  if part in ("adam", "stable_adamw") and dtype == jnp.float16:
    return jnp.float32  # both Adam cores upcast float16 leaves (_common.float16_in_float32)
  return dtype  # momentum, AdamW and StableAdamW (f32/bf16) and Kahan buffers


#: For the README: (part, rule).
STATE_DTYPE_RULES = [
    ("momentum (orthogonalized branch)", "parameter dtype, or `mu_dtype`"),
    ("second moment (adaptive_muon, normuon, adamuon, namo)", "float32 always"),
    ("AdamW branch mu / nu", "parameter dtype; float32 for float16 parameters"),
    ("OAdamW StableAdamW mu / nu", "parameter dtype; float32 for float16 parameters"),
    ("OAdamW Kahan compensation", "parameter dtype"),
]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("name", NAMES)
def test_dtypes_state_dtypes_and_tiny_gradients(name, dtype_name):
  dtype = DTYPES[dtype_name]
  tx, update = _opt(name)
  params = _params(dtype)
  state = tx.init(params)
  # Two ordinary steps, then gradients of 1e-4: (1 - b2)·g² underflows float16.
  for i, scale in enumerate([1e-2, 1e-2, 1e-4]):
    updates, state = update(_grads(params, i, scale), state, params)
    for (path, u), p in zip(_float_leaves_with_path(updates), jax.tree.leaves(params)):
      assert _finite(u), (name, dtype_name, scale, path)
      assert u.dtype == p.dtype, (path, u.dtype)  # Kahan summation (OAdamW's) included
    params = optax.apply_updates(params, updates)
  for leaf in jax.tree.leaves(params):
    assert leaf.dtype == dtype and _finite(leaf)
  parts = set()
  for path, leaf in _float_leaves_with_path(state):
    part = _state_part(name, path)
    parts.add(part)
    assert part != "other", path
    assert leaf.dtype == expected_state_dtype(name, part, dtype), (path, leaf.dtype)
  assert ("second_moment" in parts) == (name in SECOND_MOMENT)
  assert {"momentum", "adam"} <= parts or (name == "oadamw" and "stable_adamw" in parts)


def _awkward_tree():
  k = jax.random.split(jax.random.PRNGKey(1), 2)
  return {
      "dense": {"kernel": 0.3 * jax.random.normal(k[0], (6, 4)), "bias": jnp.zeros((4,))},
      "empty": {"kernel": jnp.zeros((0, 4)), "bias": jnp.zeros((0,))},
      "nothing": None,
      "gain": jnp.float32(1.5),
      "step": jnp.int32(7),
      "token_ids": jnp.arange(5, dtype=jnp.int32),
      "mask": jnp.array([True, False]),
  }


def _awkward_grads(tree, seed=0):
  def one(path, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return jnp.ones_like(x)  # a non-zero "gradient" that must still be ignored
    return 0.1 * jax.random.normal(jax.random.PRNGKey(seed + len(path)), x.shape)
  return jax.tree_util.tree_map_with_path(one, tree)


@pytest.mark.parametrize("labels", ["default", "ints_routed"])
@pytest.mark.parametrize("name", NAMES)
def test_none_empty_scalar_and_integer_leaves(name, labels):
  params = _awkward_tree()
  if labels == "default":
    label_fn = None
  else:
    # A label pytree that (wrongly) routes the integer / bool leaves to the orthogonalized
    # and AdamW branches: they stay frozen anyway.
    label_fn = {"dense": {"kernel": "ortho", "bias": "adam"},
                "empty": {"kernel": "ortho", "bias": "adam"}, "nothing": None,
                "gain": "adam", "step": "ortho", "token_ids": "adam", "mask": "ortho"}
  tx = _factory(name)(label_fn=label_fn)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i in range(2):
    updates, state = update(_awkward_grads(params, i), state, params)
    params = optax.apply_updates(params, updates)
  assert updates["nothing"] is None and params["nothing"] is None
  assert updates["empty"]["kernel"].shape == (0, 4) and params["empty"]["bias"].shape == (0,)
  assert int(params["step"]) == 7 and params["step"].dtype == jnp.int32
  np.testing.assert_array_equal(params["token_ids"], np.arange(5))
  np.testing.assert_array_equal(params["mask"], [True, False])
  assert all(_finite(x) for _, x in _float_leaves_with_path(params))
  assert float(params["gain"]) != 1.5  # the scalar is trained (AdamW branch)
  assert not np.allclose(params["dense"]["kernel"], _awkward_tree()["dense"]["kernel"])


BAD_VALUES = {"nan": jnp.nan, "inf": jnp.inf, "-inf": -jnp.inf}
BAD_LEAVES = {"kernel": ("dense", "kernel"), "bias": ("dense", "bias")}


def _bad_grads(params, where, value, seed=1):
  g = _grads(params, seed, 1e-2)
  outer, inner = BAD_LEAVES[where]
  leaf = g[outer][inner]
  g[outer][inner] = leaf.at[(0,) * leaf.ndim].set(BAD_VALUES[value])
  return g


@pytest.mark.parametrize("value", list(BAD_VALUES))
@pytest.mark.parametrize("where", list(BAD_LEAVES))
@pytest.mark.parametrize("name", NAMES)
def test_non_finite_gradient_with_apply_if_finite(name, where, value):
  tx, update = _opt(name, guard=True)
  params = _params(jnp.float32)
  state = tx.init(params)
  u, state = update(_grads(params, 0, 1e-2), state, params)
  params = optax.apply_updates(params, u)
  u, new_state = update(_bad_grads(params, where, value), state, params)
  for x in jax.tree.leaves(u):
    np.testing.assert_array_equal(np.asarray(x), 0.0)
  assert_trees_equal(new_state.inner_state, state.inner_state)
  assert int(new_state.notfinite_count) == 1 and int(new_state.total_notfinite) == 1
  # The next finite step proceeds normally.
  u, state = update(_grads(params, 2, 1e-2), new_state, params)
  assert all(_finite(x) for x in jax.tree.leaves(u)) and int(state.notfinite_count) == 0


@pytest.mark.parametrize("value", list(BAD_VALUES))
@pytest.mark.parametrize("where", list(BAD_LEAVES))
@pytest.mark.parametrize("name", NAMES)
def test_non_finite_gradient_without_guard(name, where, value):
  """Documented behaviour with no ``apply_if_finite``.

  The leaf that received the bad element gets a non-finite update and non-finite state
  (momentum / Adam moments), which persists on the next finite step: NaN is never turned
  into a silent zero or a finite update. Every other leaf is unaffected (matrices are
  orthogonalized one by one; AdamW is elementwise). Exception: Aurora and Riemannian
  Aurora guard their matrix branch themselves: a bad kernel gradient gives a zero
  update for every Aurora matrix, the branch state is not advanced, and the skip is
  counted (:func:`ortho_optax.optimizers.aurora.nonfinite_count`).
  """
  tx, update = _opt(name)
  params = _params(jnp.float32)
  state0 = tx.init(params)
  u, state = update(_bad_grads(params, where, value), state0, params)
  bad_path = "['dense']['" + where + "']"
  fin = {path: _finite(x) for path, x in _float_leaves_with_path(u)}
  state_fin = {path: _finite(x) for path, x in _float_leaves_with_path(state)}
  if where == "kernel" and name in GUARDED:
    assert all(fin.values()), fin
    for layer in ("dense", "out_proj"):
      np.testing.assert_array_equal(np.asarray(u[layer]["kernel"]), 0.0)
    assert_trees_equal(state.inner_states["ortho"].inner_state.inner_state,
                        state0.inner_states["ortho"].inner_state.inner_state)
    assert int(aurora_lib.nonfinite_count(state)) == 1
    assert all(state_fin.values())
    return
  assert fin == {p: p != bad_path for p in fin}, fin
  poisoned = {p for p, ok in state_fin.items() if not ok}
  assert poisoned and all(p.endswith(bad_path) for p in poisoned), poisoned
  # A finite gradient afterwards does not heal the poisoned leaf.
  u2, _ = update(_grads(params, 3, 1e-2), state, params)
  fin2 = {path: _finite(x) for path, x in _float_leaves_with_path(u2)}
  assert fin2 == {p: p != bad_path for p in fin2}, fin2


def state_dtype_table():
  """Markdown table of the observed state dtypes (for the README), from a real init."""
  rows = ["| optimizer | params float32 | params bfloat16 | params float16 |",
          "|---|---|---|---|"]
  for name in NAMES:
    cells = []
    for dtype in DTYPES.values():
      state = _factory(name)().init(_params(dtype))
      parts = {}
      for path, leaf in _float_leaves_with_path(state):
        parts.setdefault(_state_part(name, path), set()).add(jnp.dtype(leaf.dtype).name)
      cells.append(", ".join(f"{k}: {'/'.join(sorted(v))}" for k, v in sorted(parts.items())))
    rows.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(rows)


ROBUSTNESS_FILES = ("tests/test_properties.py", "tests/test_robustness.py",
                    "tests/test_faults.py")


def count_cases(files=ROBUSTNESS_FILES):
  """Number of bad inputs / faults the robustness files try, per file.

  Every collected test item counts 1, except a hypothesis property, which counts its
  ``max_examples`` (each example is one generated awkward input). Run from the
  repository root: ``python tests/test_robustness.py --count``.
  """
  import pytest  # pylint: disable=import-outside-toplevel

  class Collector:
    items = []

    def pytest_collection_modifyitems(self, items):
      Collector.items = list(items)

  pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *files],
              plugins=[Collector()])
  counts = {}
  for item in Collector.items:
    fn = getattr(item, "function", None)
    settings = getattr(fn, "_hypothesis_internal_use_settings", None)
    n = settings.max_examples if getattr(fn, "is_hypothesis_test", False) else 1
    key = item.nodeid.split("::")[0]
    counts[key] = counts.get(key, 0) + n
  return counts


if __name__ == "__main__":
  import sys
  if "--count" in sys.argv:
    counts = count_cases()
    for k, v in counts.items():
      print(f"{k}: {v}")
    print(f"total: {sum(counts.values())}")
  else:
    print(state_dtype_table())
