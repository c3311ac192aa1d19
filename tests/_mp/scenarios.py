"""What the processes of a loopback job run (``worker.py SCENARIO OUT_DIR``), and the
cases the tests read back.

Every scenario runs in every process after ``jax.distributed.initialize``; only process 0
writes its results to ``OUT_DIR``. The same scenario run as one process with 8 devices
gives the references of a 2-process run.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import ortho_optax as oo
from ortho_optax import distributed


def _write_json(out_dir: pathlib.Path, name: str, payload) -> None:
  if jax.process_index() == 0:
    (out_dir / name).write_text(json.dumps(payload))


def smoke(out_dir: pathlib.Path) -> None:
  """Topology and one reduction across processes (gloo moves the bytes)."""
  mesh = Mesh(np.asarray(jax.devices()), ("x",))
  n = jax.device_count()
  sharding = NamedSharding(mesh, P("x"))
  x = jax.make_array_from_callback((n,), sharding, lambda idx: np.arange(n, dtype=np.float32)[idx])
  total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
  _write_json(out_dir, "smoke.json", {
      "process_count": jax.process_count(),
      "device_count": n,
      "local_device_count": jax.local_device_count(),
      "process_indices": sorted({d.process_index for d in jax.devices()}),
      "sum": float(total.addressable_data(0)),
      "cpu_collectives": jax.config.jax_cpu_collectives_implementation,
  })


# ---------------------------------------------------------------------------------------
# distribute(tx, mesh) with gather_whole across processes
# ---------------------------------------------------------------------------------------

# Most shapes are not divisible by 8 (some not by 2): FSDP shards or replicates them and
# the gather_whole stacks need padding. Two leaves share a shape (one stacked call);
# "bias" and "embedding" go to the AdamW branch.
SHAPES = {
    "l0": {"kernel": (12, 20), "bias": (20,)},
    "l1": {"kernel": (20, 12)},
    "l2": {"kernel": (12, 20)},
    "odd": {"kernel": (7, 9)},
    "sq": {"kernel": (16, 16)},
    "embed": {"embedding": (11, 12)},
}
STEPS = 3


def optimizer(name: str):
  factories = {"muon": oo.muon, "turbo_muon": oo.turbo_muon, "normuon": oo.normuon,
               "aurora": oo.aurora}
  # float32 iterations: distributed and single-device results agree to float32 rounding.
  return factories[name](0.02, backend="xla", compute_dtype=jnp.float32)


#: (optimizer, mesh (data, fsdp), crossed): with 2 processes x 4 devices, the FSDP axis of
#: ``1x8`` spans both processes, and so does each FSDP pair of a crossed ``4x2`` (whose
#: data axis crosses them too): the all-to-alls and all-gathers go between processes.
CASES = [("muon", (4, 2), True), ("turbo_muon", (1, 8), False), ("normuon", (1, 8), False),
         ("aurora", (4, 2), True)]
#: Eight matrices of one shape divisible by 8: on a ``1x8`` mesh each is FSDP-sharded
#: over all devices and the stack of 8 needs no padding, so the all-to-alls are the only
#: way to whole matrices (no replicated stack whose results are all-gathered).
DIVISIBLE_SHAPES = {f"l{i}": {"kernel": (16, 32)} for i in range(8)}


def case_id(name, shape, crossed):
  return f"{name}-{shape[0]}x{shape[1]}{'-crossed' if crossed else ''}"


def tree(seed: int, shapes=None):
  shapes = SHAPES if shapes is None else shapes
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([np.asarray(jax.random.normal(k, s)) for k, s in zip(keys, leaves)])


def make_mesh(shape, crossed: bool = False) -> Mesh:
  """A ``(data, fsdp)`` mesh with Auto axes; ``crossed``: FSDP groups take one device of
  each half of ``jax.devices()`` (one of each process when there are two)."""
  devices = np.asarray(jax.devices())
  if crossed:
    devices = devices.reshape(shape[1], shape[0]).T
  devices = devices.reshape(shape)
  kwargs = {}
  if hasattr(jax.sharding, "AxisType"):
    kwargs["axis_types"] = (jax.sharding.AxisType.Auto,) * 2
  return Mesh(devices, ("data", "fsdp"), **kwargs)


def _put(host_tree, shardings):
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx, x=x: x[idx]),
      host_tree, shardings)


def run_steps(tx, mesh: Mesh | None = None, steps: int = STEPS, shapes=None):
  """``steps`` jitted updates from fixed host params/grads (of :data:`SHAPES` or
  ``shapes``): (params as host arrays, compiled HLO text). With a mesh, params, grads
  and state are FSDP-sharded on it."""

  params = tree(0, shapes)
  grads = [tree(i + 1, shapes) for i in range(steps)]

  def step(g, s, p):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  if mesh is None:
    state = tx.init(params)
    jitted = jax.jit(step)
  else:
    p_sh = distributed.fsdp_shardings(params, mesh)
    s_sh = distributed.fsdp_shardings(jax.eval_shape(tx.init, params), mesh)
    params = _put(params, p_sh)
    grads = [_put(g, p_sh) for g in grads]
    state = jax.jit(tx.init, out_shardings=s_sh)(params)
    jitted = jax.jit(step, in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh))
  compiled = jitted.lower(grads[0], state, params).compile()
  for g in grads:
    params, state = compiled(g, state, params)
  if mesh is not None and jax.process_count() > 1:
    params = multihost_utils.process_allgather(params, tiled=True)
  return jax.tree.map(np.asarray, params), compiled.as_text()


def mesh_processes(mesh: Mesh) -> dict:
  """``{"axis_names", "device_ids", "process_index"}`` of a mesh (JSON-ready)."""
  return {"axis_names": list(mesh.axis_names),
          "device_ids": np.vectorize(lambda d: d.id)(mesh.devices).tolist(),
          "process_index": np.vectorize(lambda d: d.process_index)(mesh.devices).tolist()}


#: The runs of :func:`gather_whole`: (case id, optimizer, mesh shape, crossed, shapes).
RUNS = [(case_id(*c), *c, None) for c in CASES] + [
    ("divisible", "muon", (1, 8), False, DIVISIBLE_SHAPES)]


def gather_whole(out_dir: pathlib.Path) -> None:
  """Every run of :data:`RUNS` with ``distribute(tx, mesh)`` (``gather_whole``) on the
  global mesh: ``params.npz`` (``"<case>/<leaf path>"``), ``<case>.hlo.txt`` and
  ``gather_whole.json`` (the meshes' processes).

  In a job of one process (8 devices) it also writes what the tests compare with: the
  undistributed results (``"<case>/undistributed/<leaf path>"``) and, for the
  ``divisible`` run, the HLO of ``strategy="auto"`` (``divisible-auto.hlo.txt``).
  """
  single = jax.process_count() == 1
  arrays, meta = {}, {"process_count": jax.process_count(), "cases": {}}

  def keep(cid, params):
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
      arrays[f"{cid}/{jax.tree_util.keystr(path)}"] = leaf

  for cid, name, shape, crossed, shapes in RUNS:
    mesh = make_mesh(shape, crossed)
    tx = distributed.distribute(optimizer(name), mesh, strategy="gather_whole")
    params, hlo = run_steps(tx, mesh, shapes=shapes)
    keep(cid, params)
    meta["cases"][cid] = mesh_processes(mesh)
    if jax.process_index() == 0:
      (out_dir / f"{cid}.hlo.txt").write_text(hlo)
    if single:
      keep(f"{cid}/undistributed", run_steps(optimizer(name), shapes=shapes)[0])
      if cid == "divisible":
        auto = distributed.distribute(optimizer(name), mesh, strategy="auto")
        (out_dir / f"{cid}-auto.hlo.txt").write_text(
            run_steps(auto, mesh, steps=1, shapes=shapes)[1])
  if jax.process_index() == 0:
    np.savez(out_dir / "params.npz", **arrays)
  _write_json(out_dir, "gather_whole.json", meta)


def fail_on_process_1(out_dir: pathlib.Path) -> None:
  """Process 1 raises while process 0 waits for it in a collective."""
  del out_dir
  if jax.process_index() == 1:
    raise RuntimeError("scenario failed on purpose")
  mesh = Mesh(np.asarray(jax.devices()), ("x",))
  x = jax.make_array_from_callback((jax.device_count(),), NamedSharding(mesh, P("x")),
                                   lambda idx: np.ones(jax.device_count())[idx])
  jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x).block_until_ready()
