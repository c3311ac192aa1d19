"""Distributed orthogonalization and FSDP shardings on 8 fake CPU devices (conftest)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from ortho_optax import distributed
from ortho_optax.models import mesh as mesh_lib
from ortho_optax.optimizers.adaptive_muon import normuon
from ortho_optax.optimizers.aurora import aurora
from ortho_optax.optimizers.muon import muon
from ortho_optax.optimizers.oadamw import oadamw
from ortho_optax.optimizers.turbo_muon import turbo_muon

MESHES = [(8, 1), (4, 2), (1, 8)]
# Shapes chosen so that most are not divisible by 8 (and some not by 2): FSDP replicates
# or shards them, and the gather_whole stacks need padding. Two leaves share a shape
# (one stacked call); "embed" and "bias" go to the AdamW branch.
SHAPES = {
    "l0": {"kernel": (12, 20), "bias": (20,)},
    "l1": {"kernel": (20, 12)},
    "l2": {"kernel": (12, 20)},
    "odd": {"kernel": (7, 9)},
    "sq": {"kernel": (16, 16)},
    "embed": {"embedding": (11, 12)},
}
OPTIMIZERS = {
    "muon": lambda: muon(0.02),
    "turbo_muon": lambda: turbo_muon(0.02),
    "normuon": lambda: normuon(0.02),
    "aurora": lambda: aurora(0.02),
    "oadamw": lambda: oadamw(1e-3, update_proj_gap=2),
}
# Every (optimizer, mesh) pair would be 15 compilations (too slow for CI): muon runs on
# all three meshes, each other optimizer on one, and every mesh sees several optimizers.
CASES = [("muon", m) for m in MESHES] + [
    ("turbo_muon", (4, 2)), ("normuon", (1, 8)), ("aurora", (4, 2)), ("oadamw", (1, 8))]


def _tree(seed):
  leaves, treedef = jax.tree.flatten(SHAPES, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([jax.random.normal(k, s) for k, s in zip(keys, leaves)])


def _mesh(shape):
  return mesh_lib.make_mesh(*shape)


def _run(tx, mesh=None, steps=2):
  """``steps`` jitted updates from fixed params/grads; returns (params, compiled HLO)."""
  params = _tree(0)
  grads = [_tree(i + 1) for i in range(steps)]
  state = tx.init(params)

  def step(g, s, p):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  if mesh is None:
    jitted = jax.jit(step)
  else:
    p_sh, s_sh = mesh_lib.state_shardings(params, mesh), mesh_lib.state_shardings(state, mesh)
    params, state = jax.device_put(params, p_sh), jax.device_put(state, s_sh)
    grads = [jax.device_put(g, p_sh) for g in grads]
    jitted = jax.jit(step, in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh))
  compiled = jitted.lower(grads[0], state, params).compile()
  for g in grads:
    params, state = compiled(g, state, params)
  return params, state, compiled.as_text()


_REFERENCE = {}


def _reference(name):
  if name not in _REFERENCE:
    _REFERENCE[name] = _run(OPTIMIZERS[name]())[0]
  return _REFERENCE[name]


@pytest.mark.parametrize("name,shape", CASES, ids=[f"{n}-{d}x{f}" for n, (d, f) in CASES])
def test_gather_whole_matches_single_device(name, shape):
  mesh = _mesh(shape)
  tx = distributed.distribute(OPTIMIZERS[name](), mesh, strategy="gather_whole")
  params, state, hlo = _run(tx, mesh)
  ref = _reference(name)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6,
                               err_msg=f"{name} {shape} {jax.tree_util.keystr(path)}")
  # The redistribution really happened: whole matrices via all-to-all under FSDP, an
  # all-gather of the results over the data axis.
  if shape[1] > 1:
    assert "all-to-all" in hlo
  if shape[0] > 1:
    assert "all-gather" in hlo
  # Parameters and state stay on their FSDP shardings.
  for p in jax.tree.leaves(params):
    assert p.sharding.spec == distributed.fsdp_spec(p.shape, mesh)
  for s in jax.tree.leaves(state):
    if hasattr(s, "sharding") and s.ndim:
      assert s.sharding.is_equivalent_to(
          jax.sharding.NamedSharding(mesh, distributed.fsdp_spec(s.shape, mesh)), s.ndim)


def test_auto_strategy_matches_single_device():
  mesh = _mesh((4, 2))
  tx = distributed.distribute(muon(0.02, compute_dtype=jnp.float32), mesh, strategy="auto")
  params, _, hlo = _run(tx, mesh, steps=2)
  ref = _run(muon(0.02, compute_dtype=jnp.float32), steps=2)[0]
  assert "all-to-all" not in hlo  # XLA's own partitioning, no shard_map redistribution
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


def test_fsdp_rule_and_state_memory_scales_with_fsdp():
  assert distributed.fsdp_axis((12, 20), 2) == 1
  assert distributed.fsdp_axis((20, 12), 4) == 0
  assert distributed.fsdp_axis((12, 20), 8) is None
  assert distributed.fsdp_axis((16, 16), 8) == 0  # ties: the first axis
  assert distributed.fsdp_axis((), 8) is None
  assert distributed.fsdp_axis((7, 9), 1) is None
  mesh = _mesh((1, 8))
  assert distributed.fsdp_spec((64, 24), mesh) == P("fsdp", None)
  assert distributed.fsdp_spec((7, 9), mesh) == P()
  # A divisible tree: optimizer state (momentum, Adam moments) per device = total / 8.
  params = {"a": {"kernel": jnp.ones((64, 32))}, "b": {"kernel": jnp.ones((32, 128))},
            "embed": {"embedding": jnp.ones((40, 32))}}
  for shape, n in (((1, 8), 8), ((4, 2), 2)):
    mesh = _mesh(shape)
    tx = distributed.distribute(muon(0.02), mesh)
    state = jax.jit(tx.init, out_shardings=mesh_lib.state_shardings(
        jax.eval_shape(tx.init, params), mesh))(params)
    per_device, total = mesh_lib.per_device_bytes(state)
    # Only the scalar step counters are replicated.
    assert total / n <= per_device <= total / n + 64, (shape, per_device, total)
    for leaf in jax.tree.leaves(state):
      if leaf.ndim:
        assert math_prod(leaf.sharding.shard_shape(leaf.shape)) * n == leaf.size


def math_prod(xs):
  out = 1
  for x in xs:
    out *= x
  return out


def test_gpt_training_sharded_matches_unsharded():
  from ortho_optax.models import train as train_lib  # pylint: disable=import-outside-toplevel
  base = train_lib.TrainConfig(
      preset="tiny", model=dict(num_layers=1, model_dim=32, num_heads=2), seq_len=16,
      data="embedded:prose", batch_size=8, steps=2, eval_every=0, eval_batches=1,
      log_every=1, warmup_steps=0, schedule="constant", optimizer="muon")
  ref = train_lib.train(base, progress=False)
  sharded = train_lib.train(dataclasses.replace(base, mesh_data=4, mesh_fsdp=2),
                            progress=False)
  assert len(sharded["train_loss"]) == 2
  np.testing.assert_allclose([l for _, l in sharded["train_loss"]],
                             [l for _, l in ref["train_loss"]], rtol=2e-5)
  np.testing.assert_allclose(sharded["final_val_loss"], ref["final_val_loss"], rtol=2e-5)


def test_bad_arguments_raise():
  mesh = _mesh((4, 2))
  with pytest.raises(ValueError, match="strategy='scatter'"):
    distributed.distribute(muon(0.02), mesh, strategy="scatter")
  with pytest.raises(ValueError, match="not axes of the mesh"):
    distributed.distribute(muon(0.02), mesh, axis_names=("model",))
  with pytest.raises(ValueError, match="must be among axis_names"):
    distributed.distribute(muon(0.02), mesh, axis_names=("data",), fsdp_axes=("fsdp",))
  with pytest.raises(ValueError, match="jax.sharding.Mesh"):
    distributed.distribute(muon(0.02), "mesh")
  with pytest.raises(ValueError, match="product must equal the device count"):
    mesh_lib.make_mesh(3, 2)
  with pytest.raises(ValueError, match="must be >= 1"):
    mesh_lib.mesh_shape(0, None)
  assert mesh_lib.mesh_shape(None, None, 8) == (8, 1)
  assert mesh_lib.mesh_shape(None, 2, 8) == (4, 2)
  assert mesh_lib.mesh_shape(2, None, 8) == (2, 4)
  from ortho_optax.models import train as train_lib  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="ortho_sharding"):
    train_lib.TrainConfig(ortho_sharding="gather").validate()


def test_no_mesh_is_the_identity_hook():
  """Outside distribute() the stage's stacked call is exactly run_method(stack)."""
  x = jnp.arange(6.0).reshape(1, 2, 3)
  assert distributed.current_sharding() is None
  assert distributed.orthogonalize_stack(lambda s: s * 2, x) is not None
  np.testing.assert_array_equal(distributed.orthogonalize_stack(lambda s: s * 2, x), x * 2)
  mesh = _mesh((8, 1))
  with distributed.orthogonalization_sharding(mesh, "auto") as cfg:
    assert distributed.current_sharding() is cfg
  assert distributed.current_sharding() is None


def test_distributing_what_has_no_orthogonalize_stage_warns():
  """The mesh would change nothing: said once per trace, not silently ignored; the
  trainer distributes exactly the optimizers that orthogonalize."""
  import warnings  # pylint: disable=import-outside-toplevel
  from ortho_optax.models import optimizers as opt_lib  # pylint: disable=import-outside-toplevel
  mesh, params = _mesh((8, 1)), {"w": jnp.ones((4, 6)), "b": jnp.ones(4)}
  for name in opt_lib.OPTIMIZERS:
    tx = distributed.distribute(opt_lib.resolve(name)(1e-3), mesh)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      jax.eval_shape(tx.update, params, tx.init(params), params)  # it is said at trace time
    said = any("no orthogonalize stage" in str(w.message) for w in caught)
    assert said == (name not in opt_lib.ORTHOGONALIZING), name
  nested = distributed.distribute(distributed.distribute(muon(0.02), mesh), mesh)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.eval_shape(nested.update, params, nested.init(params), params)


def test_bf16_communication_is_lossless_for_bf16_newton_schulz():
  """Data parallelism: only results travel; a bf16 NS output is exact in bf16."""
  mesh = _mesh((8, 1))
  tx = distributed.distribute(muon(0.02), mesh, communication_dtype=jnp.bfloat16)
  params, _, hlo = _run(tx, mesh)
  gathers = [l for l in hlo.splitlines() if " all-gather(" in l]
  # bf16 travels bit-cast to u16 (so XLA cannot move the widening convert before it).
  assert gathers and all("u16[" in l.split("all-gather(")[0] for l in gathers), gathers
  for a, b in zip(jax.tree.leaves(_reference("muon")), jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="communication_dtype"):
    distributed.distribute(muon(0.02), mesh, communication_dtype=jnp.int8)


def test_gpt_state_stays_fsdp_sharded_through_a_train_step():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from ortho_optax.models import gpt, train as train_lib  # pylint: disable=import-outside-toplevel
  cfg = gpt.get_config("tiny", num_layers=1, model_dim=32, num_heads=2, seq_len=16)
  model = gpt.GPT(cfg, rngs=nnx.Rngs(0))
  mesh = _mesh((1, 8))
  opt = nnx.Optimizer(model, distributed.distribute(muon(0.02), mesh), wrt=nnx.Param)
  mesh_lib.shard_nnx(mesh, model, opt)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 17))
  x, y = mesh_lib.put_batch(mesh, tokens[:, :-1], tokens[:, 1:])
  assert x.sharding.spec == P(("data", "fsdp"), None)
  loss = train_lib.make_train_step(mesh)(model, opt, x, y)
  assert np.isfinite(float(loss))
  for tree in (nnx.state(model), nnx.state(opt)):
    per_device, total = mesh_lib.per_device_bytes(tree)
    # Every matrix here is divisible by 8; only step counters are replicated.
    assert total / 8 <= per_device <= total / 8 + 64, (per_device, total)
  assert model.blocks[0].mlp.fc.kernel[...].sharding.spec == P(None, "fsdp")


def test_bench_counts_collective_bytes_with_loop_trip_counts():
  """The benchmark's HLO reader: loop bodies count per iteration, modules independently."""
  from _mp import hlo  # pylint: disable=import-outside-toplevel
  bench = hlo.load_bench_distributed()
  mesh = _mesh((8, 1))

  def program(trips):
    def body(x):
      def step(_, c):
        return jax.lax.all_gather(c, "data", axis=0, tiled=True)[:c.shape[0]] * 2.0
      return jax.lax.fori_loop(0, trips, step, x)
    f = distributed.shard_map(body, mesh, in_specs=(P("data"),), out_specs=P("data"))
    x = jax.ShapeDtypeStruct((64, 16), jnp.float32)
    return jax.jit(f).lower(x).compile().as_text()

  gathered = 64 * 16 * 4  # the all-gather result on each device, f32
  three, five = program(3), program(5)
  assert bench.collective_bytes(three)["all-gather"] == 3 * gathered
  assert bench.collective_bytes(five)["all-gather"] == 5 * gathered
  assert bench.collective_bytes(three)["all-gather"] == 3 * gathered


# ---------------------------------------------------------------------------------------
# Explicit mesh axes (the sharding is part of an array's type)
# ---------------------------------------------------------------------------------------

HAS_EXPLICIT = all(hasattr(m, n) for m, n in (
    (jax.sharding, "AxisType"), (jax.sharding, "auto_axes"), (jax, "set_mesh"),
    (jax, "typeof")))
explicit_axes_only = pytest.mark.skipif(not HAS_EXPLICIT,
                                        reason="this JAX has no Explicit mesh axes")
# muon's state is momentum-shaped, normuon adds per-row second moments; "auto" runs the
# update under auto_axes (its outputs take the input types, whatever init did).
EXPLICIT_CASES = [("muon", "gather_whole"),
                  ("normuon", "gather_whole"),
                  ("muon", "auto"), ("normuon", "auto")]


def _types(tree):
  return jax.tree.map(jax.typeof, tree)


@explicit_axes_only
@pytest.mark.parametrize("name,strategy", EXPLICIT_CASES)
def test_explicit_axes_keep_state_sharding_types_and_results(name, strategy):
  """On a data x FSDP mesh with Explicit axes: ``init`` (eager and jitted) and every
  ``update`` give the state the same types (shape, dtype and sharding), the parameters
  keep theirs, and the result is the single-device one."""
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  tx = distributed.distribute(OPTIMIZERS[name](), mesh, strategy=strategy)

  def step(g, s, p):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  with jax.set_mesh(mesh):
    shardings = distributed.fsdp_shardings(_tree(0), mesh)
    params = jax.device_put(_tree(0), shardings)
    param_types = _types(params)
    assert any(jax.typeof(p).sharding.spec != P() for p in jax.tree.leaves(params))
    state = tx.init(params)
    state_types = _types(state)
    assert _types(jax.jit(tx.init)(params)) == state_types
    jitted = jax.jit(step)
    for i in range(2):
      params, state = jitted(jax.device_put(_tree(i + 1), shardings), state, params)
      assert _types(state) == state_types, i
      assert _types(params) == param_types, i
  for a, b in zip(jax.tree.leaves(_reference(name)), jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
