"""Device mesh and shardings for the GPT trainer: data parallelism x FSDP.

The mesh has two axes, ``data`` and ``fsdp`` (``make_mesh(data, fsdp)``):

* parameters and optimizer state: FSDP, each array sharded over ``fsdp`` along its
  largest axis that ``fsdp`` divides (replicated when none does, and over ``data``),
  so the per-device memory of both scales as ``1/fsdp``
  (:func:`ortho_optax.distributed.fsdp_spec`);
* batches: the batch axis over ``('data', 'fsdp')`` (every device gets its own
  sequences);
* the orthogonalization of the optimizer: :func:`ortho_optax.distributed.distribute`
  (``"gather_whole"`` by default, ``"auto"`` for XLA's own partitioning).

Several processes (one per host): join the job with
:func:`ortho_optax.distributed.initialize_multiprocess` (the trainer's ``--multihost``)
before anything else touches JAX; every process then builds the same global mesh over
``jax.devices()`` and describes the same global batch, of which :func:`put_batch` reads
only the rows of the process's own devices.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ortho_optax import distributed

AXES = ("data", "fsdp")
#: Axes the batch dimension is split over.
BATCH_AXES = ("data", "fsdp")


def mesh_shape(data: int | None = None, fsdp: int | None = None,
               num_devices: int | None = None) -> tuple[int, int]:
  """``(data, fsdp)`` with the missing size(s) filled in from the device count.

  Default: every device on ``data`` (``fsdp = 1``).

  Raises:
    ValueError: when the sizes are not positive or ``data * fsdp`` is not the device
      count.
  """
  n = jax.device_count() if num_devices is None else num_devices
  for name, v in (("mesh data", data), ("mesh fsdp", fsdp)):
    if v is not None and v < 1:
      raise ValueError(f"{name} size must be >= 1, got {v}.")
  if fsdp is None:
    fsdp = 1 if data is None else max(n // data, 1)
  if data is None:
    data = max(n // fsdp, 1)
  if data * fsdp != n:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but "
                     f"{n} are available; the product must equal the device count.")
  return data, fsdp


def make_mesh(data: int | None = None, fsdp: int | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``Mesh`` with axes ``('data', 'fsdp')`` (Auto axis types: XLA propagates
  shardings through the model; explicit collectives live in ``ortho_optax.distributed``).

  Args:
    data: data-parallel size (default: the devices left after ``fsdp``).
    fsdp: FSDP size (default 1).
    devices: the devices (default: ``jax.devices()``, every host's).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(data, fsdp, len(devices))
  kwargs = {}
  if hasattr(jax.sharding, "AxisType"):
    kwargs["axis_types"] = (jax.sharding.AxisType.Auto,) * len(AXES)
  try:
    return jax.make_mesh(shape, AXES, devices=devices, **kwargs)
  except TypeError:  # older make_mesh without devices= / axis_types=
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def state_shardings(tree, mesh: Mesh):
  """FSDP ``NamedSharding`` for every array leaf of ``tree`` (params or opt state)."""
  return distributed.fsdp_shardings(tree, mesh, fsdp_axes=("fsdp",))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batch axis over ``('data', 'fsdp')``, the others replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def put_batch(mesh: Mesh, *arrays):
  """Places batches on ``mesh``, sharded by batch: one global array per argument.

  Each argument is the same global batch in every process: a host array, or anything
  with ``shape`` and numpy indexing, such as the lazy
  :class:`ortho_optax.models.data.Windows` of a sampler. ``jax.make_array_from_callback``
  indexes it only for the rows of this process's devices, so with lazy windows each
  process reads just its own slice of the batch. Arrays whose batch size the mesh does
  not divide are replicated instead (a short last evaluation batch).
  """
  n = mesh.devices.size
  out = []
  for x in arrays:
    x = x if hasattr(x, "shape") and hasattr(x, "__getitem__") else np.asarray(x)
    sharding = (batch_sharding(mesh, len(x.shape)) if x.shape[0] % n == 0 else
                NamedSharding(mesh, P()))
    out.append(jax.make_array_from_callback(tuple(x.shape), sharding,
                                            lambda idx, x=x: np.asarray(x[idx])))
  return tuple(out)


def shard_tree(tree, mesh: Mesh):
  """``jax.device_put`` of every array leaf with :func:`state_shardings`."""
  return jax.device_put(tree, state_shardings(tree, mesh))


def constrain(tree, mesh: Mesh):
  """``with_sharding_constraint`` to :func:`state_shardings` (inside ``jit``)."""
  return jax.lax.with_sharding_constraint(tree, state_shardings(tree, mesh))


def shard_nnx(mesh: Mesh, *objects) -> None:
  """Moves the state of NNX objects (model, ``nnx.Optimizer``) to FSDP shardings, in place."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  for obj in objects:
    state = nnx.state(obj)
    nnx.update(obj, shard_tree(state, mesh))


def constrain_nnx(mesh: Mesh, *objects) -> None:
  """Inside a jitted step: keeps the NNX objects' state on their FSDP shardings."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  for obj in objects:
    nnx.update(obj, constrain(nnx.state(obj), mesh))


def per_device_bytes(tree) -> tuple[int, int]:
  """``(max bytes on one device, total bytes)`` of the arrays of ``tree``."""
  per_device: dict = {}
  total = 0
  for x in jax.tree.leaves(tree):
    if not hasattr(x, "addressable_shards"):
      continue
    total += x.size * x.dtype.itemsize
    for s in x.addressable_shards:
      per_device[s.device] = per_device.get(s.device, 0) + s.data.size * s.data.dtype.itemsize
  return (max(per_device.values()) if per_device else 0), total


__all__ = ["AXES", "BATCH_AXES", "batch_sharding", "constrain", "constrain_nnx",
           "make_mesh", "mesh_shape", "per_device_bytes",
           "put_batch", "shard_nnx", "shard_tree", "state_shardings"]
