"""Distributed orthogonalization and FSDP sharding rules, with JAX's own sharding only.

Newton–Schulz (and every other polar method of the library) needs *whole* matrices: its
Gram products ``X Xᵀ`` contract over a full row. When the optimizer state is sharded
(FSDP: each device holds a slice of every matrix) or replicated (data parallelism: every
device holds every matrix and would repeat the same work), the orthogonalization step is
where a distributed Muon loses time. This module offers two strategies:

``"gather_whole"`` (the default when a mesh is given)
  The orthogonalize stage already stacks the same-shape matrices of all leaves into one
  ``(B, out, in)`` array. The stack is padded to a multiple of the device count ``D``
  and, inside :func:`jax.shard_map`, redistributed so that each device holds
  ``B/D`` *whole* matrices: an ``all_to_all`` over the FSDP axes (slice of every matrix ->
  whole matrices of a ``1/fsdp`` share of the stack), then a local slice over the
  remaining (data-parallel) axes. Each device orthogonalizes its share with the stage's
  own method (so the Pallas kernels are used where available), then the results go back
  the same way (``all_gather`` over the data axes, ``all_to_all`` over FSDP) to the
  original sharding. Per step this moves about ``2 x`` the stack over the FSDP axes and
  one all-gather of the results over the data axes, and no device computes more than
  ``ceil(B/D)`` orthogonalizations. Padding costs up to ``D - 1`` extra matrices per
  shape group in the transfers (GPT-2 small on 8 devices: the two MLP groups of 12 are
  padded to 16, ~22% more bytes). ``communication_dtype=jnp.bfloat16`` halves the
  bytes (lossless for the results of a bf16 Newton–Schulz).

``"auto"``
  Plain ``jit`` with sharded inputs: XLA's SPMD partitioner decides (typically it keeps
  the matrices sharded and all-reduces every Gram product, or gathers each matrix on
  every device and repeats the work). Selectable for comparison. Under pure data
  parallelism it moves no bytes but every device computes every orthogonalization.

Both strategies work on meshes with Auto axes (:func:`ortho_optax.models.mesh.make_mesh`)
and with Explicit axes (recent JAX's default for ``jax.make_mesh``, where an array's
sharding is part of its type). Under Explicit axes the optimizer state keeps its
sharding type from ``init`` to ``update`` (stages that build their state from the
parameters' shapes must give it the parameters' sharding), and ``"auto"`` runs the
update with those axes switched to Auto (``jax.sharding.auto_axes``: XLA partitions the
Gram products as on an Auto mesh), returning the updates and the state with the
shardings they came in with. An optimizer *not* wrapped by :func:`distribute` on
Explicit FSDP-sharded parameters fails in JAX (a matrix product whose contracting
dimension is sharded is ambiguous there): wrap it.

Several processes (one per host, or several on one machine with CPU devices) work the
same way: every process builds the same global mesh over ``jax.devices()`` after
:func:`initialize_multiprocess`, and the collectives above cross the processes.

Design: the strategy is not an argument of every optimizer factory. :func:`distribute`
wraps *any* optimizer of the library (or any chain containing
:func:`ortho_optax.stages.orthogonalize.orthogonalize`) and makes every orthogonalize
stage that runs inside its ``update`` use the strategy::

  mesh = ortho_optax.models.mesh.make_mesh(data=4, fsdp=2)
  tx = ortho_optax.distributed.distribute(ortho_optax.optimizers.muon.muon(0.02), mesh)

The second-moment, momentum, scale and decay stages are elementwise (or row/column
reductions) and stay local under the parameter sharding. The stage asks
:func:`orthogonalize_stack` for each stacked call; outside :func:`distribute` (or the
:func:`orthogonalization_sharding` context manager) it is the identity hook, so the
single-device behaviour is unchanged.

The FSDP rule shared with ``ortho_optax.models.mesh`` (:func:`fsdp_spec`): shard the
largest axis of a parameter that the FSDP size divides (the first such axis on ties),
replicate when none does. For the stacked ``(B, out, in)`` view the stage sees, the
sharded matrix axis is predicted with the same rule on ``(in, out)`` (Flax kernel order),
so for 2-D Flax kernels the declared layout matches the real one and no extra
resharding is needed; any other layout is still correct (XLA reshards before the
``shard_map``), only slower.

References:
  Jordan et al., *Muon*, 2024; Essential AI, *Practical Efficiency of Muon for
  Pretraining* (distributed Muon: gather whole matrices, orthogonalize once, scatter).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import threading
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ortho_optax import validation

STRATEGIES = ("gather_whole", "auto")

try:  # jax >= 0.7 exports shard_map at the top level
  _shard_map = jax.shard_map
except AttributeError:  # pragma: no cover - older JAX
  from jax.experimental.shard_map import shard_map as _shard_map  # type: ignore

_SHARD_MAP_PARAMS = inspect.signature(_shard_map).parameters


def shard_map(f, mesh, in_specs, out_specs):
  """:func:`jax.shard_map` without replication checks, on every JAX this project supports.

  The bodies here use explicit collectives whose replication the checker cannot always
  infer (a local slice by ``axis_index`` followed by an ``all_gather``).
  """
  kwargs = {}
  if "check_vma" in _SHARD_MAP_PARAMS:
    kwargs["check_vma"] = False
  elif "check_rep" in _SHARD_MAP_PARAMS:
    kwargs["check_rep"] = False
  return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **kwargs)


# ---------------------------------------------------------------------------------------
# Several processes
# ---------------------------------------------------------------------------------------

#: Cross-process collectives of JAX's CPU backend that :func:`configure_cpu_collectives`
#: accepts.
CPU_COLLECTIVES = ("gloo", "mpi")
_CPU_COLLECTIVES_ENV = "JAX_CPU_COLLECTIVES_IMPLEMENTATION"


def _backends_initialized() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover - a JAX without it: JAX's own checks remain
    return False
  return bool(getattr(xla_bridge, "backends_are_initialized", lambda: False)())


def configure_cpu_collectives(implementation: str | None = None) -> str:
  """Selects how the CPU devices of different processes exchange data.

  A job of several processes on CPU devices (processes on one machine, as the tests run
  it, or a CPU cluster) needs cross-process collectives in JAX's CPU backend: without
  them the first collective across processes fails. This sets
  ``jax_cpu_collectives_implementation``, which JAX reads when it creates the CPU
  backend, so it must run before anything initialises a backend (before
  ``jax.distributed.initialize``; :func:`initialize_multiprocess` calls it). It does not
  affect GPU or TPU devices.

  Args:
    implementation: ``"gloo"`` (TCP, ships with jaxlib) or ``"mpi"`` (needs an MPI
      library, see JAX's multi-process guide). ``None``: the
      ``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` environment variable when set, else
      ``"gloo"``.

  Returns:
    The implementation selected.

  Raises:
    ValueError: for an implementation (or environment value) not in
      :data:`CPU_COLLECTIVES`.
    RuntimeError: when JAX's backends are already initialised (the setting would be
      ignored).

  References:
    JAX, "Introduction to multi-controller JAX" and the ``jax_cpu_collectives_implementation``
    option, https://docs.jax.dev/en/latest/multi_process.html.
  """
  name = "implementation"
  if implementation is None:
    from_env = os.environ.get(_CPU_COLLECTIVES_ENV)
    implementation, name = (from_env, _CPU_COLLECTIVES_ENV) if from_env else ("gloo", name)
  validation.check_choice(name, implementation, CPU_COLLECTIVES)
  if _backends_initialized():
    if jax.config.jax_cpu_collectives_implementation == implementation:
      return implementation
    raise RuntimeError(
        f"configure_cpu_collectives({implementation!r}) must run before JAX initialises "
        f"its backends (before jax.distributed.initialize and any jax.devices() or "
        f"computation); the CPU backend already uses "
        f"{jax.config.jax_cpu_collectives_implementation!r}.")
  jax.config.update("jax_cpu_collectives_implementation", implementation)
  return implementation


def _int_from_env(value, name: str, env: str):
  if value is not None or not os.environ.get(env):
    return value
  text = os.environ[env]
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"{env}={text!r} (for {name}) is not an integer.") from None


def initialize_multiprocess(coordinator_address: str | None = None,
                            num_processes: int | None = None,
                            process_id: int | None = None, *,
                            initialization_timeout: int = 300,
                            cpu_collectives: str | None = None,
                            **kwargs) -> None:
  """Joins this process to a multi-process JAX job, CPU collectives included.

  ``jax.distributed.initialize`` after :func:`configure_cpu_collectives`, so the same
  call works on GPU hosts and on CPU devices. It must be the first thing that touches
  JAX in the process. Every process then sees the devices of all processes in
  ``jax.devices()`` and builds the same global mesh over them.

  Under SLURM, Open MPI, Kubernetes or Cloud TPU, JAX detects the coordinator, the number
  of processes and this process's id itself. For a manual launch set, on every
  process::

    JAX_COORDINATOR_ADDRESS=<host of process 0>:<port>   # read by JAX
    JAX_NUM_PROCESSES=<N>  JAX_PROCESS_ID=<0..N-1>        # read here

  (e.g. 2 processes on one machine with 4 CPU devices each:
  ``JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4
  JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0`` and
  ``...=1``). Explicit arguments win over the environment.

  Args:
    coordinator_address: ``host:port`` of process 0 (``None``: JAX's detection or
      ``JAX_COORDINATOR_ADDRESS``).
    num_processes: number of processes (``None``: ``JAX_NUM_PROCESSES`` or detection).
    process_id: this process's index (``None``: ``JAX_PROCESS_ID`` or detection).
    initialization_timeout: seconds to wait for all processes to connect (JAX's default
      is 300). When they do not, JAX ends the process itself (a fatal
      ``DEADLINE_EXCEEDED`` log and ``SIGABRT``, not a Python exception).
    cpu_collectives: passed to :func:`configure_cpu_collectives`.
    **kwargs: further arguments of ``jax.distributed.initialize`` (for example
      ``heartbeat_timeout_seconds``, ``local_device_ids``).

  Returns:
    None; afterwards ``jax.process_count()``, ``jax.process_index()`` and
    ``jax.devices()`` describe the whole job.

  Raises:
    ValueError: for a non-integer ``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``, a process
      count < 1, a process id outside ``[0, num_processes)``, a timeout < 1 or unknown
      CPU collectives.
    RuntimeError: from JAX, when its backends are already initialised.

  References:
    ``jax.distributed.initialize``; JAX, "Introduction to multi-controller JAX",
    https://docs.jax.dev/en/latest/multi_process.html.
  """
  num_processes = _int_from_env(num_processes, "num_processes", "JAX_NUM_PROCESSES")
  process_id = _int_from_env(process_id, "process_id", "JAX_PROCESS_ID")
  if num_processes is not None:
    validation.check_int("num_processes", num_processes, 1)
  if process_id is not None:
    validation.check_int("process_id", process_id, 0)
    if num_processes is not None and process_id >= num_processes:
      raise ValueError(f"process_id={process_id} must be < num_processes={num_processes}.")
  validation.check_int("initialization_timeout", initialization_timeout, 1)
  configure_cpu_collectives(cpu_collectives)
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             initialization_timeout=initialization_timeout, **kwargs)


# ---------------------------------------------------------------------------------------
# FSDP sharding rule
# ---------------------------------------------------------------------------------------


def _axes_size(mesh: Mesh, axes: Sequence[str]) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def _spec_entry(axes: tuple[str, ...]):
  return axes[0] if len(axes) == 1 else axes


def fsdp_axis(shape: Sequence[int], size: int) -> int | None:
  """The axis FSDP shards: the largest axis ``size`` divides (first on ties), or None.

  ``None`` (replicate) when ``size <= 1``, for scalars, and when no axis is divisible.
  """
  if size <= 1:
    return None
  best = None
  for i, n in enumerate(shape):
    if n % size == 0 and n >= size and (best is None or n > shape[best]):
      best = i
  return best


def fsdp_spec(shape: Sequence[int], mesh: Mesh, fsdp_axes: Sequence[str] = ("fsdp",)) -> P:
  """The ``PartitionSpec`` of one array under FSDP over ``fsdp_axes`` of ``mesh``.

  Args:
    shape: the array's shape.
    mesh: the device mesh.
    fsdp_axes: mesh axes the array is sharded over (axes missing from the mesh are
      ignored); every other mesh axis replicates it.

  Returns:
    ``P(..., fsdp_axes, ...)`` on the axis chosen by :func:`fsdp_axis`, or ``P()``.
  """
  axes = tuple(a for a in fsdp_axes if a in mesh.axis_names)
  k = fsdp_axis(tuple(shape), _axes_size(mesh, axes)) if axes else None
  if k is None:
    return P()
  spec = [None] * len(shape)
  spec[k] = _spec_entry(axes)
  return P(*spec)


def fsdp_shardings(tree, mesh: Mesh, fsdp_axes: Sequence[str] = ("fsdp",)):
  """A ``NamedSharding`` per array leaf of ``tree`` (parameters or optimizer state).

  The same rule for parameters and their optimizer state (momentum, second moments,
  caches have the parameter's shape), so per-device state memory scales as ``1/fsdp``
  for every divisible leaf; scalars (step counters) and indivisible leaves replicate.
  Non-array leaves (``None``, ``optax.MaskedNode``) are kept as they are.

  Args:
    tree: a pytree of arrays (or of objects with a ``shape``), e.g. the parameters or
      ``tx.init(params)``.
    mesh: the ``jax.sharding.Mesh``.
    fsdp_axes: the mesh axes the leaves are sharded over (default ``("fsdp",)``).

  Returns:
    A pytree of ``tree``'s structure whose array leaves are ``NamedSharding`` objects
    (sharded on the axis chosen by :func:`fsdp_axis`, else replicated).

  References:
    PyTorch FSDP (Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded Data
    Parallel", 2023) for the layout; microsoft/dion (distributed orthogonalization).
  """
  def one(x):
    shape = getattr(x, "shape", None)
    if shape is None:
      return x
    return NamedSharding(mesh, fsdp_spec(shape, mesh, fsdp_axes))

  return jax.tree_util.tree_map(one, tree)


# ---------------------------------------------------------------------------------------
# Distributed orthogonalization
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OrthogonalizationSharding:
  """How the orthogonalize stage distributes its stacked calls.

  Attributes:
    mesh: the device mesh the optimizer state lives on.
    strategy: ``"gather_whole"`` or ``"auto"`` (see the module docstring).
    axis_names: mesh axes the work is split over (default: all of them); axes left out
      compute redundantly.
    fsdp_axes: the subset of ``axis_names`` the matrices are sharded over (FSDP);
      the other axes of ``axis_names`` hold replicas (data parallelism).
    communication_dtype: dtype the matrices travel in (``None``: their own dtype).
  """
  mesh: Mesh
  strategy: str = "gather_whole"
  axis_names: tuple[str, ...] = ()
  fsdp_axes: tuple[str, ...] = ()
  communication_dtype: Any = None

  @property
  def num_workers(self) -> int:
    return _axes_size(self.mesh, self.axis_names)


def make_sharding_config(mesh: Mesh, strategy: str = "gather_whole",
                         axis_names: Sequence[str] | None = None,
                         fsdp_axes: Sequence[str] | None = None,
                         communication_dtype=None) -> OrthogonalizationSharding:
  """Validates the arguments of :func:`distribute` and builds the config.

  Raises:
    ValueError: for an unknown strategy, a mesh that is not a ``jax.sharding.Mesh``, or
      axis names that are not axes of the mesh.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy={strategy!r} is not one of {STRATEGIES}.")
  if not isinstance(mesh, Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
  names = tuple(mesh.axis_names)
  axis_names = names if axis_names is None else tuple(axis_names)
  bad = [a for a in axis_names if a not in names]
  if bad:
    raise ValueError(f"axis_names {bad} are not axes of the mesh {names}.")
  if fsdp_axes is None:
    fsdp_axes = ("fsdp",) if "fsdp" in axis_names else ()
  fsdp_axes = tuple(fsdp_axes)
  bad = [a for a in fsdp_axes if a not in axis_names]
  if bad:
    raise ValueError(f"fsdp_axes {bad} must be among axis_names {axis_names}.")
  if communication_dtype is not None:
    try:
      dt = jnp.dtype(communication_dtype)
    except TypeError:
      dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
      raise ValueError(f"communication_dtype must be a floating dtype or None, got "
                       f"{communication_dtype!r}.")
    communication_dtype = dt
  return OrthogonalizationSharding(mesh, strategy, axis_names, fsdp_axes, communication_dtype)


_ACTIVE = threading.local()


def current_sharding() -> OrthogonalizationSharding | None:
  """The config set by the innermost :func:`orthogonalization_sharding` (or None)."""
  return getattr(_ACTIVE, "config", None)


def gathers_whole() -> bool:
  """Whether the active config spreads stacks over devices (``gather_whole`` on more than
  one worker); otherwise :func:`orthogonalize_stack` is a plain call. Every orthogonalize
  stage asks when it is traced: :func:`distribute` counts the asks."""
  _ACTIVE.asked = getattr(_ACTIVE, "asked", 0) + 1
  config = current_sharding()
  return not (config is None or config.strategy == "auto" or config.num_workers == 1)


@contextlib.contextmanager
def orthogonalization_sharding(mesh: Mesh, strategy: str = "gather_whole",
                               axis_names: Sequence[str] | None = None,
                               fsdp_axes: Sequence[str] | None = None,
                               communication_dtype=None):
  """Context manager: orthogonalize stages *traced* inside it use ``strategy``.

  It acts at trace time: wrap the code that traces the update (``jax.jit`` caches by
  argument shapes, not by this context, so a function first traced outside keeps its
  single-device program). :func:`distribute` is the safe way to use it.
  """
  config = make_sharding_config(mesh, strategy, axis_names, fsdp_axes, communication_dtype)
  previous = current_sharding()
  _ACTIVE.config = config
  try:
    yield config
  finally:
    _ACTIVE.config = previous


def distribute(tx: optax.GradientTransformation, mesh: Mesh, *,
               strategy: str = "gather_whole", axis_names: Sequence[str] | None = None,
               fsdp_axes: Sequence[str] | None = None,
               communication_dtype=None) -> optax.GradientTransformation:
  """Makes every orthogonalize stage inside ``tx`` distribute its work over ``mesh``.

  Works for every optimizer of the library and any chain built from its stages: the
  state, the init and the maths are those of ``tx``; only how the stacked polar calls
  are laid out across devices changes (results agree with the single-device update to
  the rounding of the method's compute dtype).

  Args:
    tx: the optimizer (e.g. ``ortho_optax.optimizers.muon.muon(...)``).
    mesh: the device mesh the parameters / optimizer state are sharded on.
    strategy: ``"gather_whole"`` (whole matrices per device, see the module docstring)
      or ``"auto"`` (XLA's automatic partitioning of the same program; on a mesh with
      Explicit axes the update runs under ``jax.sharding.auto_axes`` and its outputs
      keep the shardings of its inputs).
    axis_names: mesh axes to split the orthogonalizations over (default: all).
    fsdp_axes: axes the parameters are FSDP-sharded over (default ``("fsdp",)`` when the
      mesh has such an axis, else none: pure data parallelism).
    communication_dtype: ``gather_whole`` only: the matrices travel in this dtype
      (``None``: their own, exact). ``jnp.bfloat16`` halves the bytes; the results of
      a bf16 Newton–Schulz are already bf16 values, so only the inputs are rounded
      (before the method's own Frobenius normalisation instead of after), and inputs
      travel only over FSDP axes: with pure data parallelism it is lossless.

  Returns:
    An ``optax.GradientTransformation`` with ``tx``'s state.

  Raises:
    ValueError: for an unknown strategy or axis names not in the mesh.

  References:
    microsoft/dion and NVIDIA-NeMo/Emerging-Optimizers (distributed Muon
    orthogonalization); Liu et al., "Muon is Scalable for LLM Training",
    arXiv 2502.16982, 2025.
  """
  config = make_sharding_config(mesh, strategy, axis_names, fsdp_axes, communication_dtype)
  explicit = explicit_axes(mesh) if strategy == "auto" else ()
  if explicit and not hasattr(jax.sharding, "auto_axes"):
    raise ValueError(
        f"strategy='auto' on mesh axes {explicit} of type Explicit needs "
        f"jax.sharding.auto_axes, which this JAX ({jax.__version__}) lacks: pass "
        f"strategy='gather_whole', or a mesh with axis_types=(AxisType.Auto,) * "
        f"{len(mesh.axis_names)}.")

  def inner_update(updates, state, params, **extra_args):
    previous, asked = current_sharding(), getattr(_ACTIVE, "asked", 0)
    _ACTIVE.config, _ACTIVE.asked = config, 0
    try:
      out = tx.update(updates, state, params, **extra_args)
      if not _ACTIVE.asked:
        warnings.warn(
            "ortho_optax.distribute: the wrapped transformation has no orthogonalize stage "
            "of this library, so the mesh changes nothing in its update; distribute an "
            "ortho_optax optimizer or a chain with ortho_optax.stages.orthogonalize.",
            stacklevel=3)
      return out
    finally:  # an enclosing distribute() counts the asks of this one too
      _ACTIVE.config, _ACTIVE.asked = previous, asked + _ACTIVE.asked

  def update_fn(updates, state, params=None, **extra_args):
    if explicit and _typed_over(explicit, (updates, state, params)):
      # XLA's own partitioning needs Auto axes; the results keep their input types.
      out_sharding = jax.tree_util.tree_map(_sharding_type, (updates, state))
      run = jax.sharding.auto_axes(
          lambda u, s, p: inner_update(u, s, p, **extra_args), axes=explicit,
          out_sharding=out_sharding)
      return run(updates, state, params)
    return inner_update(updates, state, params, **extra_args)

  if isinstance(tx, optax.GradientTransformationExtraArgs):
    return optax.GradientTransformationExtraArgs(tx.init, update_fn)
  return optax.GradientTransformation(tx.init, update_fn)


def explicit_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes of type ``Explicit`` (none on JAX without axis types)."""
  explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
  types = getattr(mesh, "axis_types", None) or ()
  return tuple(a for a, t in zip(mesh.axis_names, types) if explicit is not None
               and t == explicit)


def _sharding_type(x):
  return jax.typeof(x).sharding


def _typed_over(axes: Sequence[str], tree) -> bool:
  """Whether an array of ``tree`` has a sharding type that uses one of ``axes``."""
  for leaf in jax.tree_util.tree_leaves(tree):
    spec = getattr(getattr(jax.typeof(leaf), "sharding", None), "spec", None) or ()
    for entry in spec:
      names = entry if isinstance(entry, tuple) else (entry,)
      if any(n in axes for n in names):
        return True
  return False


def stack_fsdp_axis(shape: Sequence[int], fsdp_size: int) -> int | None:
  """Axis (1 = out, 2 = in) of a ``(B, out, in)`` stack assumed FSDP-sharded, or None.

  The :func:`fsdp_axis` rule applied to the Flax ``(in, out)`` kernel the stack came
  from: the larger of ``in``/``out`` that ``fsdp_size`` divides, ``in`` on ties.
  """
  _, m, n = shape
  k = fsdp_axis((n, m), fsdp_size)
  return None if k is None else (2 if k == 0 else 1)


def orthogonalize_stack(run_method: Callable[[jax.Array], jax.Array],
                        stack: jax.Array) -> jax.Array:
  """``run_method(stack)`` laid out across devices by the active config.

  The hook the orthogonalize stage calls for each ``(B, out, in)`` stack. With no
  active config, or ``strategy="auto"``, it is ``run_method(stack)``.
  """
  if not gathers_whole():
    return run_method(stack)
  return _gather_whole(run_method, stack, current_sharding())


def _gather_whole(run_method, stack, config: OrthogonalizationSharding):
  mesh = config.mesh
  b, m, n = stack.shape
  fsdp_size = _axes_size(mesh, config.fsdp_axes)
  k = stack_fsdp_axis(stack.shape, fsdp_size) if config.fsdp_axes else None
  fsdp_axes = config.fsdp_axes if k is not None else ()
  # Axes over which the stack is replicated; the work is sliced over them locally (axes
  # of size 1 would only add collectives over single devices).
  replica_axes = tuple(a for a in config.axis_names
                       if a not in fsdp_axes and mesh.shape[a] > 1)
  num_workers = config.num_workers
  padded = -(-b // num_workers) * num_workers
  if padded != b:
    # Copies of a real matrix (not zeros): every method stays finite on the padding.
    stack = jnp.concatenate([stack, jnp.broadcast_to(stack[-1:], (padded - b, m, n))], 0)

  spec = [None, None, None]
  if k is not None:
    spec[k] = _spec_entry(fsdp_axes)
  spec = P(*spec)
  num_replicas = _axes_size(mesh, replica_axes)
  wire = config.communication_dtype
  dtype = stack.dtype
  # Inputs travel only over the FSDP axes (replicas slice locally): round them only then.
  wire_in = wire if fsdp_axes else None
  if wire_in is not None:
    stack = _to_wire(stack, wire_in)

  def body(x):
    if fsdp_axes:
      # Slices of every matrix -> whole matrices of 1/fsdp of the stack.
      x = lax.all_to_all(x, _spec_entry(fsdp_axes), 0, k, tiled=True)
    if replica_axes:
      share = x.shape[0] // num_replicas
      idx = lax.axis_index(_spec_entry(replica_axes))
      x = lax.dynamic_slice_in_dim(x, idx * share, share, axis=0)
    y = run_method(x if wire_in is None else _from_wire(x, wire_in).astype(dtype))
    if wire is not None:
      y = _to_wire(y, wire)
    if replica_axes:
      y = lax.all_gather(y, _spec_entry(replica_axes), axis=0, tiled=True)
    if fsdp_axes:
      y = lax.all_to_all(y, _spec_entry(fsdp_axes), k, 0, tiled=True)
    return y

  out = shard_map(body, mesh, in_specs=(spec,), out_specs=spec)(stack)
  if wire is not None:
    out = _from_wire(out, wire).astype(dtype)
  return out[:b] if padded != b else out


# The narrow dtype travels bit-cast to an unsigned integer: XLA's simplifier would
# otherwise fold the f32 -> bf16 -> f32 round trip and move the widening convert in
# front of the collective, sending f32 after all.
def _to_wire(x, wire):
  bits = jnp.dtype(f"uint{8 * jnp.dtype(wire).itemsize}")
  return lax.bitcast_convert_type(x.astype(wire), bits)


def _from_wire(x, wire):
  return lax.bitcast_convert_type(x, wire)


__all__ = [
    "CPU_COLLECTIVES", "STRATEGIES", "OrthogonalizationSharding", "configure_cpu_collectives",
    "current_sharding", "distribute", "explicit_axes", "fsdp_axis", "fsdp_shardings",
    "fsdp_spec", "initialize_multiprocess", "make_sharding_config",
    "orthogonalization_sharding", "orthogonalize_stack", "shard_map", "stack_fsdp_axis",
]
