"""The orthogonalize / scale_by_cosh_norm stages."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ortho_optax.matrix_view import TORCH_LAYOUT, MatrixDims, to_matrices
from ortho_optax.newton_schulz import newton_schulz
from ortho_optax.polar import (cosh_normalize, leverage_uniform_polar, polar,
                               riemannian_balanced_polar)
from ortho_optax import orthogonalizers
from ortho_optax.stages.orthogonalize import (OrthogonalizeState, orthogonalize,
                                              scale_by_cosh_norm)

F32 = dict(compute_dtype=jnp.float32, backend="xla")


def _rand(shape, seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def _ns(mats, **kw):
  return newton_schulz(mats, **{**F32, **kw})


def _per_leaf(x, dims, fn=_ns):
  mats, restore = to_matrices(x, dims)
  return restore(fn(mats)).astype(x.dtype)


def test_grouped_equals_per_leaf_and_groups_calls(monkeypatch):
  calls = []
  real = orthogonalizers.XlaNewtonSchulz.run

  def counting(self, x, of_transpose=False):
    calls.append(x.shape)
    return real(self, x, of_transpose)

  monkeypatch.setattr(orthogonalizers.XlaNewtonSchulz, "run", counting)
  updates = {
      "a": _rand((12, 8), 1),                 # Flax (in, out): matrix (8, 12)
      "b": _rand((12, 8), 2),                 # same shape: grouped with a
      "c": _rand((8, 12), 3),                 # matrix (12, 8): tall, NS groups it transposed
      "d": None,
      "e": _rand((3, 12, 8), 4),              # stacked (layers, in, out): 3 matrices (8, 12)
      "h": _rand((12, 8), 5).astype(jnp.bfloat16),  # other dtype: own group
  }
  dims = {"a": None, "b": None, "c": None, "d": None, "e": MatrixDims((1,), (2,)), "h": None}
  tx = orthogonalize(dimension_numbers=dims, **F32)
  state = tx.init(updates)
  out, state = tx.update(updates, state)
  # a, b, e (5 wide 8x12 matrices) and c (tall 12x8, transposed) make one call.
  assert sorted(calls) == sorted([(6, 8, 12), (1, 8, 12)])
  assert out["d"] is None
  full = {k: None if k == "d" else v for k, v in dims.items()}
  for k in ("a", "b", "c", "e", "h"):
    d = full[k] if full[k] is not None else MatrixDims((0,), (1,))
    want = _per_leaf(updates[k], d)
    assert out[k].dtype == updates[k].dtype and out[k].shape == updates[k].shape
    np.testing.assert_allclose(np.asarray(out[k], np.float32), np.asarray(want, np.float32),
                               atol=1e-5, err_msg=k)
  assert int(state.count) == 1 and state.cache is None


def test_torch_layout_and_transposition():
  x = _rand((6, 10), 6)
  tx = orthogonalize(dimension_numbers=TORCH_LAYOUT, **F32)
  out, _ = tx.update({"w": x}, tx.init({"w": x}))
  np.testing.assert_allclose(out["w"], _ns(x), atol=1e-6)
  # Flax layout of the same weight is its transpose; the result is transposed too.
  tx2 = orthogonalize(**F32)
  out2, _ = tx2.update({"w": x.T}, tx2.init({"w": x.T}))
  np.testing.assert_allclose(out2["w"], out["w"].T, atol=1e-5)


def test_conv_and_split_views():
  conv = _rand((3, 3, 4, 8), 7)  # Flax conv kernel (kh, kw, in, out): matrix (8, 36)
  qkv = _rand((10, 3 * 6), 8)    # fused QKV (in, 3*out): three (6, 10) matrices
  params = {"conv1": {"kernel": conv}, "attn": {"qkv": qkv}}
  dims = lambda p: {"conv1": {"kernel": None},
                    "attn": {"qkv": MatrixDims((0,), (1,), num_splits=3)}}
  tx = orthogonalize(dimension_numbers=dims, **F32)
  out, _ = jax.jit(tx.update)(params, tx.init(params))
  want_conv = _ns(conv.reshape(36, 8).T).T.reshape(3, 3, 4, 8)
  np.testing.assert_allclose(out["conv1"]["kernel"], want_conv, atol=1e-5)
  blocks = [_ns(qkv[:, 6 * i:6 * (i + 1)].T).T for i in range(3)]
  np.testing.assert_allclose(out["attn"]["qkv"], jnp.concatenate(blocks, axis=1), atol=1e-5)


def test_rank3_leaf_without_dims_raises():
  tx = orthogonalize()
  bad = {"stacked": jnp.ones((2, 4, 6))}
  with pytest.raises(ValueError, match="stacked.*no default matrix view"):
    tx.init(bad)
  with pytest.raises(ValueError, match="no default matrix view"):
    tx.update(bad, OrthogonalizeState(count=jnp.zeros([], jnp.int32), cache=None))
  with pytest.raises(ValueError, match="rank 1"):
    tx.init({"bias": jnp.ones(3)})


@pytest.mark.parametrize("gap", [2, 3])
def test_update_proj_gap_caching(gap):
  """OAdamW: per-tensor t starts at 1; recompute when t == 1 or t % gap == 0."""
  grads = [{"w": _rand((6, 10), 10 + t), "n": None} for t in range(1, 8)]
  tx = orthogonalize(dimension_numbers=TORCH_LAYOUT, update_proj_gap=gap, **F32)
  state = tx.init(grads[0])
  update = jax.jit(tx.update)
  source = None
  for t, g in enumerate(grads, start=1):
    out, new_state = update(g, state)
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    state = new_state
    if t == 1 or t % gap == 0:
      source = t
    # Jitted (fused) against eager float32: rounding differs by a few ulps.
    np.testing.assert_allclose(out["w"], _ns(grads[source - 1]["w"]), atol=5e-6,
                               err_msg=f"t={t}")
    assert out["n"] is None
    assert int(state.count) == t


def test_cache_dtype_stable_under_scan():
  params = {"w": jnp.zeros((6, 10), jnp.float32)}
  tx = orthogonalize(dimension_numbers=TORCH_LAYOUT, update_proj_gap=2)
  state = tx.init(params)

  def body(state, g):
    out, state = tx.update({"w": g}, state)
    return state, out["w"]

  state, outs = jax.lax.scan(body, state, _rand((4, 6, 10), 11))
  assert outs.shape == (4, 6, 10) and np.all(np.isfinite(outs))
  np.testing.assert_array_equal(outs[2], outs[1])  # t=3 reuses t=2
  assert state.cache["w"].dtype == jnp.float32


@pytest.mark.parametrize("method, fn", [
    ("polar", lambda m: polar(m)),
    ("aurora", lambda m: leverage_uniform_polar(m, pp_iterations=2, pp_beta=0.5, **F32)),
    ("riemannian_aurora",
     lambda m: riemannian_balanced_polar(m, outer_steps=1, cg_steps=4, **F32)),
])
def test_other_methods(method, fn):
  x = _rand((2, 12, 5), 12)  # two tall matrices of a stacked leaf
  dims = MatrixDims((2,), (1,))
  kw = dict(outer_steps=1, cg_steps=4) if method == "riemannian_aurora" else {}
  tx = orthogonalize(method, dimension_numbers=dims, **kw, **F32)
  out, _ = jax.jit(tx.update)({"w": x}, tx.init({"w": x}))
  np.testing.assert_allclose(out["w"], fn(x), atol=1e-5)


def test_aurora_method_uses_aurora_steps_by_default():
  x = _rand((8, 8), 13)
  tx = orthogonalize("aurora", dimension_numbers=TORCH_LAYOUT, **F32)
  out, _ = tx.update({"w": x}, tx.init({"w": x}))
  want = newton_schulz(x, steps=12, coefficients="aurora", **F32)
  np.testing.assert_allclose(out["w"], want, atol=1e-6)


def test_default_bf16_compute_keeps_update_dtype():
  u = {"w": _rand((16, 8), 14), "v": _rand((16, 8), 15).astype(jnp.bfloat16)}
  tx = orthogonalize()
  out, _ = jax.jit(tx.update)(u, tx.init(u))
  assert out["w"].dtype == jnp.float32 and out["v"].dtype == jnp.bfloat16
  s = np.linalg.svd(np.asarray(out["w"]), compute_uv=False)
  assert 0.5 < s.min() and s.max() < 1.3


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="svd"), "svd.*newton_schulz"),
    (dict(coefficients="bogus"), "bogus"),
    (dict(coefficients="cubic5", steps=4), "cubic5"),
    (dict(steps=0), "steps"),
    (dict(preconditioning="qr"), "qr"),
    (dict(backend="tpu"), "tpu"),
    (dict(update_proj_gap=0), "update_proj_gap"),
    (dict(method="aurora", pp_iterations=0), "pp_iterations"),
    (dict(method="aurora", pp_beta=-1.0), "pp_beta"),
    (dict(method="aurora", preconditioning="aol"), "aol"),
    (dict(method="riemannian_aurora", cg_steps=-1), "cg_steps"),
    (dict(compute_dtype=jnp.int8), "compute_dtype"),
])
def test_construction_validation(kwargs, match):
  kwargs = dict(kwargs)
  method = kwargs.pop("method", "newton_schulz")
  with pytest.raises(ValueError, match=match):
    orthogonalize(method, **kwargs)


def test_chains_with_optax():
  params = {"w": jnp.zeros((8, 6)), "b": jnp.zeros((6,))}
  labels = {"w": "ortho", "b": "adam"}
  tx = optax.multi_transform(
      {"ortho": optax.chain(orthogonalize(**F32), optax.scale(-0.1)), "adam": optax.adam(1e-3)},
      labels)
  state = tx.init(params)
  g = {"w": _rand((8, 6), 16), "b": _rand((6,), 17)}
  upd, state = jax.jit(tx.update)(g, state, params)
  np.testing.assert_allclose(upd["w"], -0.1 * _per_leaf(g["w"], MatrixDims((0,), (1,))),
                             atol=1e-6)


def test_scale_by_cosh_norm():
  u = {"a": _rand((4, 5), 18), "b": _rand((3,), 19), "c": None, "z": jnp.zeros((2, 2, 2))}
  tx = scale_by_cosh_norm(gamma=1.25)
  out, state = jax.jit(tx.update)(u, tx.init(u))
  np.testing.assert_allclose(out["a"], cosh_normalize(u["a"], 1.25), rtol=1e-6)
  np.testing.assert_allclose(out["b"], cosh_normalize(u["b"], 1.25), rtol=1e-6)
  assert out["c"] is None and np.all(np.asarray(out["z"]) == 0)
  with pytest.raises(ValueError, match="gamma"):
    scale_by_cosh_norm(gamma=-1.0)


def test_aol_on_square_flax_kernels_follows_the_output_axis():
  # Stored Flax kernels (in, out) are stacked as stored; AOL on a square one must still
  # scale the rows of the (out, in) view, exactly as the per-leaf torch view does.
  kw = dict(preconditioning="aol", coefficients="turbo_aol", steps=4, eps=1e-6,
            compute_dtype=jnp.float32, backend="xla")
  updates = {"q": _rand((8, 8), 11), "k": _rand((8, 8), 12), "fc": _rand((8, 12), 13)}
  tx = orthogonalize(**kw)
  out, _ = tx.update(updates, tx.init(updates))
  for name, x in updates.items():
    want = newton_schulz(x.T, **kw).T  # the (out, in) view, orthogonalized, back to (in, out)
    np.testing.assert_allclose(out[name], want, atol=1e-6, err_msg=name)
  # and not the stored orientation's AOL (the rows of (in, out)), which differs
  assert not np.allclose(out["q"], newton_schulz(updates["q"], **kw), atol=1e-4)


@pytest.mark.skipif(
    tuple(int(v) for v in jax.__version__.split(".")[:2]) < (0, 11),
    reason="XLA of JAX 0.10 sinks the pinned transpose into every leaf on the CPU (9 "
           "transposes for 8 leaves): slower there, the same values")
def test_square_flax_kernels_cost_one_batched_transpose_each_way():
  # Square (in, out) kernels reach NS in their (out, in) view through one transpose of the
  # whole stack and come back through one: not 2 per leaf (XLA would sink a plain transpose
  # of the concatenation into every operand; the stage pins it).
  import ortho_optax as oo

  def transposes(leaves):
    tree = {f"h{i}/q": _rand((64, 64), 20 + i) for i in range(leaves)}
    tx = oo.muon(learning_rate=0.02, backend="xla", label_fn=lambda t: {k: "ortho" for k in t})
    state = tx.init(tree)
    hlo = jax.jit(lambda g, s: tx.update(g, s, tree)).lower(tree, state).compile().as_text()
    return hlo.count(" transpose(")
  assert transposes(8) == transposes(3) <= 2, (transposes(8), transposes(3))
