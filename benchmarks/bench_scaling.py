"""Data-parallel and FSDP scaling of the GPT-2 training step from 1 to N devices.

For every device count ``N`` of ``--sizes`` (default: 1 and every power of two up to the
device count) the training step of :mod:`user_gpt` (``--preset``, GPT-2 small by
default) runs on a mesh ``(data, fsdp)`` over the first ``N`` devices, in two layouts:

* ``dp``: ``data=N, fsdp=1``; parameters and optimizer state replicated;
* ``dp_fsdp``: ``data=N/F, fsdp=F`` (``--fsdp F``, default 2; only where ``N >= 2``, at
  ``N = 1`` it would be ``dp`` again); parameters and optimizer state sharded by
  :func:`ortho_optax.distributed.fsdp_shardings`.

In both the batch axis is split over every device (``(data, fsdp)``, as in ZeRO-3: no two
devices see the same sequence), ``--per-device-batch`` sequences of ``--seq`` tokens
each: weak scaling, the global batch grows as ``N``. The optimizers (rows ``optimizer``
and ``strategy``), at the defaults of ``bench_user_loop.py``:

* ``optax.adamw`` (3e-4) and ``optax.contrib.muon`` (0.02): plain ``jax.jit`` with the
  shardings above, XLA partitions everything;
* ``muon/<s>`` and ``turbo_muon/<s>`` (``ortho_optax.muon``, ``ortho_optax.turbo_muon``)
  wrapped by ``ortho_optax.distribute(tx, mesh, strategy=s)``, ``s`` in ``gather_whole``
  and ``auto``.

Every layer of the model computes in ``--dtype`` (default bfloat16, parameters float32),
and so do the Newton–Schulz iterations of ``muon`` and ``turbo_muon`` (bfloat16 is their
default; ``--dtype float32`` makes every layout agree to float32 rounding, for checks).

The step is a function of the ``nnx.split`` state, ``(params, opt_state, x, y) ->
(params, opt_state, loss)``, jitted with in/out shardings, parameters and optimizer
state donated. The optimizer step alone, ``(grads, opt_state, params) -> (params,
opt_state)``, is jitted the same way on the same shardings and runs on its own copy of
the state (gradients: a fixed full-rank function of the parameters; Newton–Schulz time
does not depend on the values).

Method (that of ``bench_user_loop.py``): the configurations of one ``N`` are compiled
first, in order (``compile_s``: lower + compile of the training step; ``update_compile_s``:
of the optimizer step; ``--compile-workers K`` overlaps K compilations, each then takes
longer than alone); the first step gives ``first_loss``, the second
``loss_after_one_step``. Then one untimed round and ``--rounds`` interleaved rounds (the
order reversed on odd rounds): per configuration 2 warm-up steps, then ``--steps`` steps
with one ``block_until_ready`` at the end, for the training step and then for the
optimizer step; ``ms_per_step`` and ``update_ms`` are medians over the rounds. The
configurations of one ``N`` are resident together; those of the previous ``N`` are
released first. A failure to build, compile or step is recorded in the row's ``error``
and the run goes on.

Derived figures (``fill_derived``):

* ``tokens_per_s = tokens_per_step / step time``, ``tokens_per_step = N x
  per-device batch x seq``;
* ``mfu = 6 x num_params x tokens_per_s / (N x peak)``: ``num_params`` counts every
  parameter (embeddings and head included; attention's ``seq^2`` FLOPs are left out),
  ``peak = --peak-tflops`` (default 989: the dense BF16 tensor-core peak of an
  H100 or H200 SXM);
* ``scaling_efficiency = tokens_per_s / (N x tokens_per_s at N=1)`` of the same
  optimizer and strategy (at ``N = 1`` the layouts coincide, so both layouts are
  compared with the ``dp`` row);
* ``update_speedup = update_ms at N=1 / update_ms`` (with whole matrices per device,
  ``gather_whole`` should approach ``N``);
* ``step_bytes`` / ``update_bytes``: bytes of the collectives of the compiled program,
  per device and per step (``bench_distributed.collective_bytes``: ``max(operand,
  result)`` bytes of every all-gather, all-to-all, reduce-scatter, all-reduce and
  collective-permute, times the trip counts of the loops around it); the mesh as a whole
  moves ``N`` times that.

Output, rewritten after every compile and every round, so that a cut run keeps what it
measured: ``<out>/bench_scaling.json`` (``bench_scaling_<kind>.json`` with
``--kind-name <kind>``) ``{"meta": {...}, "rows": [...]}`` and the same name ``.md``: the
Markdown table, printed last. ``--merge`` keeps the rows of an earlier file of the same
name (same model, batch, peak and device) except those measured again, so that runs of
one ``N`` or a few optimizers each (under a time limit per command, or for a model whose
configurations do not all fit in memory together) still give one table with scaling
efficiencies; ``meta["runs"]`` lists every command that wrote into it.

Launch modes:

* one process with ``N`` local devices (the usual GPU case)::

    python benchmarks/bench_scaling.py --out benchmarks/results --kind-name h200-x8
    python benchmarks/bench_scaling.py --sizes 8 --merge --out benchmarks/results ...

* several processes (one per host, or one per GPU): every process runs the same command
  with ``--multiprocess`` and the variables of
  :func:`ortho_optax.distributed.initialize_multiprocess` (``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; SLURM and Open MPI are detected by JAX).
  Every ``N`` must then be a multiple of the process count ``P``; its mesh takes the
  first ``N/P`` local devices of every process. Process 0 writes the files. E.g. one
  process per GPU on one 8-GPU host::

    for i in $(seq 0 7); do
      CUDA_VISIBLE_DEVICES=$i JAX_COORDINATOR_ADDRESS=127.0.0.1:12355 \\
      JAX_NUM_PROCESSES=8 JAX_PROCESS_ID=$i \\
      python benchmarks/bench_scaling.py --multiprocess --sizes 8 --out $OUT &
    done; wait

* the CPU, with fake devices (a check of the code, not a measurement)::

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
    python benchmarks/bench_scaling.py --preset tiny --per-device-batch 2 --seq 16 \\
      --rounds 1 --steps 1 --out /tmp/scaling

References:
  S. Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter
  Models", 2020 (the data x FSDP layout); A. Chowdhery et al., "PaLM: Scaling Language
  Modeling with Pathways", 2022, Appendix B (model FLOPs utilization, 6N FLOPs per
  token).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import re
import shlex
import statistics
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import ortho_optax
from ortho_optax.models import mesh as mesh_lib

import user_gpt
from bench_distributed import COLLECTIVES, collective_bytes
from bench_user_loop import compiled_footprint_bytes

WARMUP_STEPS = 2
#: Dense BF16 tensor-core peak of an H100 / H200 SXM, TFLOP/s.
H100_H200_BF16_TFLOPS = 989.0
LAYOUTS = ("dp", "dp_fsdp")

#: Name -> (factory of the optimizer at its defaults given the compute dtype of the
#: orthogonalizations, ``distribute`` strategy or None), in table order.
OPTIMIZERS = {
    "optax.adamw": (lambda dtype: optax.adamw(3e-4), None),
    "optax.contrib.muon": (lambda dtype: optax.contrib.muon(0.02), None),
    **{f"{name}/{strategy}": (
        lambda dtype, name=name: ortho_optax.OPTIMIZERS[name](compute_dtype=dtype), strategy)
       for name in ("muon", "turbo_muon") for strategy in ortho_optax.distributed.STRATEGIES},
}
#: Keys of the meta that must agree for ``--merge`` to put two runs' rows in one table.
MERGE_KEYS = ("preset", "model", "num_params", "per_device_batch", "seq", "fsdp",
              "peak_tflops", "device", "backend")
_KIND_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _error(e: BaseException) -> str:
  return f"{type(e).__name__}: {str(e)[:600]}"


def default_sizes(num_devices: int) -> list[int]:
  """1 and every power of two up to ``num_devices``."""
  sizes, n = [], 1
  while n <= num_devices:
    sizes.append(n)
    n *= 2
  return sizes


def mesh_devices(n: int) -> list:
  """The devices of the ``N = n`` mesh: the first ``n / P`` local devices of each of the
  ``P`` processes (the first ``n`` devices in one process)."""
  per_process = n // jax.process_count()
  by_process: dict[int, list] = {}
  for d in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
    by_process.setdefault(d.process_index, []).append(d)
  return [d for p in sorted(by_process) for d in by_process[p][:per_process]]


def put(host_tree, shardings):
  """Host arrays (the same on every process) placed with ``shardings``."""
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx, x=x: x[idx]),
      host_tree, shardings)


def pseudo_gradients(params):
  """A fixed, full-rank, gradient-sized function of the parameters."""
  return jax.tree.map(lambda p: 1e-3 * jnp.sin(1e3 * p + 1.0), params)


def make_train_step(graphdef, rest, tx):
  def loss_of(params, x, y):
    return user_gpt.loss_fn(nnx.merge(graphdef, params, rest), x, y)

  def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_of)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def make_update_step(tx):
  def update_step(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return update_step


@dataclasses.dataclass
class Model:
  """What every configuration shares: the graph, the initial parameters on the host."""
  cfg: user_gpt.Config
  graphdef: object
  rest: object
  host_params: dict
  num_params: int

  @classmethod
  def build(cls, cfg: user_gpt.Config) -> "Model":
    model = user_gpt.GPT(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    host = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
    return cls(cfg, graphdef, rest, host, sum(x.size for x in jax.tree.leaves(host)))


def batch_tokens(cfg: user_gpt.Config, batch: int, seq: int) -> np.ndarray:
  """The fixed ``(batch, seq + 1)`` token ids of a step: inputs ``[:, :-1]``, targets
  ``[:, 1:]``."""
  return np.random.default_rng(0).integers(0, min(cfg.vocab_size, 50257),
                                           (batch, seq + 1)).astype(np.int32)


def new_row(n: int, layout: str, data: int, fsdp: int, name: str, global_batch: int,
            seq: int, skipped: str | None = None) -> dict:
  """The row of one configuration, before anything is measured."""
  optimizer, strategy = name.split("/") if "/" in name else (name, None)
  return {"n": n, "layout": layout, "data": data, "fsdp": fsdp, "optimizer": optimizer,
          "strategy": strategy, "global_batch": global_batch,
          "tokens_per_step": global_batch * seq,
          "compile_s": None, "update_compile_s": None, "peak_mem_gb": None,
          "ms_per_step": None, "round_ms": [], "tokens_per_s": None, "mfu": None,
          "scaling_efficiency": None, "update_ms": None, "update_round_ms": [],
          "update_speedup": None, "step_bytes": None, "update_bytes": None,
          "first_loss": None, "loss_after_one_step": None, "last_loss": None,
          "error": None, "skipped": skipped}


def _bytes(compiled) -> dict:
  counted = collective_bytes(compiled.as_text())
  return {k: counted[k] for k in (*COLLECTIVES, "total", "count", "unknown_trip_loops")}


def _scalar(x) -> float:
  # The loss is replicated; its local copy also exists where the mesh spans processes.
  return float(np.asarray(x.addressable_data(0)))


class Run:
  """One configuration (N, layout, optimizer): its compiled steps, state and row."""

  def __init__(self, model: Model, mesh, n: int, layout: str, name: str, x, y, row: dict):
    self.model, self.mesh, self.n, self.layout, self.name = model, mesh, n, layout, name
    self.x, self.y, self.row = x, y, row
    self.step = self.update = None
    self.params = self.opt_state = self.up_params = self.up_state = self.grads = None

  @property
  def live(self) -> bool:
    return self.step is not None

  def shardings(self, tree):
    if self.layout == "dp":
      replicated = NamedSharding(self.mesh, P())
      return jax.tree.map(lambda _: replicated, tree)
    return ortho_optax.fsdp_shardings(tree, self.mesh)

  def lower(self) -> tuple:
    """Builds the optimizer and both states; returns the lowered training and optimizer
    steps and the seconds each lowering took."""
    factory, strategy = OPTIMIZERS[self.name]
    # The model's compute dtype is the orthogonalizations' (bfloat16: both defaults).
    tx = factory(jnp.dtype(self.model.cfg.dtype))
    if strategy is not None:
      tx = ortho_optax.distribute(tx, self.mesh, strategy=strategy)
    m = self.model
    p_sh = self.shardings(m.host_params)
    s_sh = self.shardings(jax.eval_shape(tx.init, m.host_params))
    b_sh = mesh_lib.batch_sharding(self.mesh)
    init = jax.jit(tx.init, out_shardings=s_sh)
    self.params = put(m.host_params, p_sh)
    self.opt_state = init(self.params)
    self.up_params = put(m.host_params, p_sh)
    self.up_state = init(self.up_params)
    self.grads = jax.jit(pseudo_gradients, out_shardings=p_sh)(self.up_params)
    t0 = time.perf_counter()
    step = jax.jit(
        make_train_step(m.graphdef, m.rest, tx), in_shardings=(p_sh, s_sh, b_sh, b_sh),
        out_shardings=(p_sh, s_sh, NamedSharding(self.mesh, P())), donate_argnums=(0, 1),
    ).lower(self.params, self.opt_state, self.x, self.y)
    t1 = time.perf_counter()
    update = jax.jit(
        make_update_step(tx), in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh),
        donate_argnums=(1, 2),
    ).lower(self.grads, self.up_state, self.up_params)
    return step, update, t1 - t0, time.perf_counter() - t1

  def finish(self, step, update, compile_s: float, update_compile_s: float) -> None:
    """Takes the compiled steps, reads their HLO and memory, runs the first steps."""
    self.step, self.update = step, update
    r = self.row
    r["compile_s"], r["update_compile_s"] = compile_s, update_compile_s
    r["step_bytes"], r["update_bytes"] = _bytes(step), _bytes(update)
    footprint = compiled_footprint_bytes(step)
    r["peak_mem_gb"] = None if footprint is None else footprint / 1e9
    r["first_loss"] = self.train_once()
    r["loss_after_one_step"] = self.train_once()
    self.update_once()
    jax.block_until_ready((self.up_params, self.up_state))

  def train_once(self) -> float:
    self.params, self.opt_state, loss = self.step(self.params, self.opt_state, self.x, self.y)
    return _scalar(loss)

  def update_once(self) -> None:
    self.up_params, self.up_state = self.update(self.grads, self.up_state, self.up_params)

  def _block_ms(self, one_step, outputs, steps: int) -> float:
    for _ in range(WARMUP_STEPS):
      one_step()
    jax.block_until_ready(outputs())
    t0 = time.perf_counter()
    for _ in range(steps):
      one_step()
    jax.block_until_ready(outputs())
    return (time.perf_counter() - t0) / steps * 1e3

  def time_round(self, steps: int, record: bool = True) -> None:
    """One block of training steps, then one of optimizer steps."""
    losses = []

    def train():
      self.params, self.opt_state, loss = self.step(self.params, self.opt_state, self.x,
                                                    self.y)
      losses[:] = [loss]

    ms = self._block_ms(train, lambda: (self.params, self.opt_state, losses), steps)
    update_ms = self._block_ms(self.update_once, lambda: (self.up_params, self.up_state),
                               steps)
    if not record:
      return
    r = self.row
    r["last_loss"] = _scalar(losses[0])
    r["round_ms"].append(ms)
    r["ms_per_step"] = statistics.median(r["round_ms"])
    r["update_round_ms"].append(update_ms)
    r["update_ms"] = statistics.median(r["update_round_ms"])

  def release(self) -> None:
    self.step = self.update = None
    self.params = self.opt_state = self.up_params = self.up_state = self.grads = None


def fill_derived(meta: dict, rows: list[dict]) -> None:
  """tokens_per_s, mfu, scaling_efficiency and update_speedup of every timed row."""
  peak = meta["peak_tflops"] * 1e12
  flops_per_token = 6 * meta["num_params"]
  for r in rows:
    ms = r["ms_per_step"]
    r["tokens_per_s"] = None if ms is None else r["tokens_per_step"] / (ms / 1e3)
    r["mfu"] = (None if ms is None else
                flops_per_token * r["tokens_per_s"] / (r["n"] * peak))
  base = {(r["optimizer"], r["strategy"]): r for r in rows
          if r["n"] == 1 and r["layout"] == "dp"}
  for r in rows:
    b = base.get((r["optimizer"], r["strategy"]))
    r["scaling_efficiency"] = (
        r["tokens_per_s"] / (r["n"] * b["tokens_per_s"])
        if b is not None and r["tokens_per_s"] and b["tokens_per_s"] else None)
    r["update_speedup"] = (b["update_ms"] / r["update_ms"]
                           if b is not None and r["update_ms"] and b["update_ms"] else None)


def _fmt(value, spec: str, scale: float = 1.0) -> str:
  return "–" if value is None else format(value * scale, spec)


def table(meta: dict, rows: list[dict]) -> str:
  runs = "; ".join(f"`{r['command']}` ({r['date']})" for r in meta["runs"])
  lines = [
      f"{meta['num_devices']} x {meta['device']} ({meta['backend']}, {meta['process_count']} "
      f"process(es)), jax {meta['jax']}, preset {meta['preset']} "
      f"({meta['num_params'] / 1e6:.1f}M parameters), {meta['per_device_batch']} x "
      f"{meta['seq']} tokens per device per step (weak scaling), median of "
      f"{meta['rounds']} rounds of {meta['steps']} steps. MFU: 6 x parameters x tokens/s "
      f"/ (N x {meta['peak_tflops']:g} TFLOP/s). Scaling efficiency: tokens/s / (N x "
      "tokens/s of the same optimizer at N=1). Opt. step: the optimizer update alone; "
      "its speed-up is its time at N=1 / its time. MB: collective bytes per device per "
      "step in the compiled HLO (2^20 bytes; the mesh moves N x that). Runs: " + runs,
      "",
      "| N | data x fsdp | optimizer | strategy | ms / step | tokens / s | MFU | "
      "scaling eff. | opt. step ms | opt. step speed-up | step MB | opt. step MB | "
      "compile s | note |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    note = r["error"] or r["skipped"] or ""
    step_mb = None if r["step_bytes"] is None else r["step_bytes"]["total"] / 2**20
    update_mb = None if r["update_bytes"] is None else r["update_bytes"]["total"] / 2**20
    lines.append(
        f"| {r['n']} | {r['data'] or '–'} x {r['fsdp']} | {r['optimizer']} | "
        f"{r['strategy'] or '–'} | {_fmt(r['ms_per_step'], '.2f')} | "
        f"{_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['mfu'], '.1f', 100)}"
        f"{'' if r['mfu'] is None else '%'} | "
        f"{_fmt(r['scaling_efficiency'], '.1f', 100)}"
        f"{'' if r['scaling_efficiency'] is None else '%'} | "
        f"{_fmt(r['update_ms'], '.2f')} | {_fmt(r['update_speedup'], '.2f')} | "
        f"{_fmt(step_mb, '.1f')} | {_fmt(update_mb, '.1f')} | "
        f"{_fmt(r['compile_s'], '.1f')} | "
        f"{note.replace('|', '/').splitlines()[0] if note else ''} |")
  return "\n".join(lines)


def output_paths(out: pathlib.Path, kind_name: str | None) -> tuple[pathlib.Path, ...]:
  stem = "bench_scaling" if kind_name is None else f"bench_scaling_{kind_name}"
  return out / f"{stem}.json", out / f"{stem}.md"


def config_name(row: dict) -> str:
  """The row's key of :data:`OPTIMIZERS` (``muon/gather_whole``, ``optax.adamw``)."""
  return (row["optimizer"] if row["strategy"] is None
          else f"{row['optimizer']}/{row['strategy']}")


def row_key(row: dict) -> tuple:
  return row["n"], row["layout"], config_name(row)


def row_order(row: dict) -> tuple:
  return row["n"], LAYOUTS.index(row["layout"]), list(OPTIMIZERS).index(config_name(row))


def write(paths, meta: dict, rows: list[dict]) -> str:
  """Fills the derived figures and writes both files (process 0 only); returns the
  Markdown table."""
  rows.sort(key=row_order)
  meta["sizes"] = sorted({r["n"] for r in rows})
  fill_derived(meta, rows)
  md = table(meta, rows)
  if jax.process_index() == 0:
    json_path, md_path = paths
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md_path.write_text(md + "\n")
  return md


def merged_rows(json_path: pathlib.Path, meta: dict, measured: set) -> list[dict]:
  """The rows of an earlier file (``--merge``) but those of the configurations measured
  now (``measured``: :func:`row_key` values); adds its runs to ``meta["runs"]``.

  Raises:
    ValueError: when the earlier file measured another model, batch, peak or device.
  """
  if not json_path.exists():
    return []
  earlier = json.loads(json_path.read_text())
  old = earlier["meta"]
  differ = [k for k in MERGE_KEYS if old.get(k) != meta[k]]
  if differ:
    raise ValueError(
        f"--merge: {json_path} was measured with other settings: "
        + ", ".join(f"{k}={old.get(k)!r} (now {meta[k]!r})" for k in differ)
        + "; choose another --out or --kind-name, or run without --merge.")
  meta["runs"] = old["runs"] + meta["runs"]
  return [r for r in earlier["rows"] if row_key(r) not in measured]


def layouts_of(n: int, fsdp: int) -> list[tuple[str, int | None, int, str | None]]:
  """``(layout, data, fsdp, reason skipped or None)`` of the configurations at ``N``
  (``data`` is None where ``fsdp`` does not divide ``N``)."""
  out = [("dp", n, 1, None)]
  if n > 1:
    if n % fsdp:
      out.append(("dp_fsdp", None, fsdp, f"--fsdp {fsdp} does not divide N={n}"))
    else:
      out.append(("dp_fsdp", n // fsdp, fsdp, None))
  return out


def _agree(flag: bool) -> bool:
  """The same decision on every process (process 0's), so that all compile the same."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def _compile(lowered_step, lowered_update) -> tuple:
  """Both compiled steps and the seconds each took (run in a worker thread: XLA's
  compiler releases the GIL)."""
  t0 = time.perf_counter()
  step = lowered_step.compile()
  t1 = time.perf_counter()
  update = lowered_update.compile()
  return step, update, t1 - t0, time.perf_counter() - t1


def compile_all(runs: list[Run], n: int, args, save) -> None:
  """Lowers, compiles and runs the first steps of every run, in order.

  The first configuration compiles alone: the kernels it autotunes (the model's matrix
  products, the same in every configuration) are then in XLA's cache for the others.
  After it, up to ``--compile-workers`` compilations overlap (the next configurations
  lower and compile while the oldest one finishes); the runs are finished in order, so
  that every process of a multi-process job executes the same programs in the same
  order. Failures, non-finite losses and ``--compile-budget`` are recorded in the rows;
  ``save()`` runs after every configuration.
  """
  start = time.perf_counter()
  pending = collections.deque()
  first = True

  def finish_oldest():
    run, lowering_s, future = pending.popleft()
    r = run.row
    tag = f"[N={n} compile {runs.index(run) + 1}/{len(runs)}] {run.layout} {run.name}"
    try:
      step, update, *compile_s = future.result()
      run.finish(step, update, *(a + b for a, b in zip(lowering_s, compile_s)))
      for key in ("first_loss", "loss_after_one_step"):
        if not math.isfinite(r[key]):
          r["error"] = f"{key} is {r[key]}"
    except Exception as e:  # pylint: disable=broad-except
      r["error"] = _error(e)
    if r["error"] is not None:
      run.release()
    print(f"{tag}: " + (r["error"] or (
        f"compile {r['compile_s']:.1f} s + {r['update_compile_s']:.1f} s, loss "
        f"{r['first_loss']:.4f} -> {r['loss_after_one_step']:.4f}, "
        f"{r['step_bytes']['total'] / 2**20:.2f} MB/device/step")), flush=True)
    save()

  with concurrent.futures.ThreadPoolExecutor(args.compile_workers) as pool:
    for run in runs:
      elapsed = time.perf_counter() - start
      if _agree(args.compile_budget is not None and elapsed > args.compile_budget):
        run.row["skipped"] = (f"not compiled: the compile phase of N={n} took "
                              f"{elapsed:.0f} s > --compile-budget {args.compile_budget:g} s")
        print(f"[N={n}] {run.layout} {run.name}: {run.row['skipped']}", flush=True)
        continue
      try:
        step, update, *lowering_s = run.lower()
      except Exception as e:  # pylint: disable=broad-except
        run.row["error"] = _error(e)
        run.release()
        print(f"[N={n}] {run.layout} {run.name}: {run.row['error']}", flush=True)
        continue
      pending.append((run, lowering_s, pool.submit(_compile, step, update)))
      while pending and (first or len(pending) >= args.compile_workers):
        finish_oldest()
      first = False
    while pending:
      finish_oldest()


def measure_size(n: int, model: Model, args, rows: list[dict], save) -> None:
  """Compiles, then times every configuration at ``N = n``; appends their rows."""
  devices = mesh_devices(n)
  seq, batch = args.seq, args.per_device_batch * n
  tokens = batch_tokens(model.cfg, batch, seq)
  runs = []
  for layout, data, fsdp, skipped in layouts_of(n, args.fsdp):
    mesh = None if skipped else mesh_lib.make_mesh(data, fsdp, devices=devices)
    if mesh is not None:
      b_sh = mesh_lib.batch_sharding(mesh)
      x, y = put((tokens[:, :-1], tokens[:, 1:]), (b_sh, b_sh))
    for name in args.optimizers:
      row = new_row(n, layout, data, fsdp, name, batch, seq, skipped)
      rows.append(row)
      if skipped is None:
        runs.append(Run(model, mesh, n, layout, name, x, y, row))
  save()

  compile_all(runs, n, args, save)
  timed = [run for run in runs if run.live]
  # One untimed round first: the GPU idles at a low clock through the compilations.
  for rnd in range(-1, args.rounds):
    for run in (timed if rnd % 2 == 0 else timed[::-1]):
      try:
        run.time_round(args.steps, record=rnd >= 0)
      except Exception as e:  # pylint: disable=broad-except
        run.row["error"] = (f"{'warm-up round' if rnd < 0 else f'timing round {rnd + 1}'}: "
                            f"{_error(e)}")
        run.release()
    timed[:] = [run for run in timed if run.live]
    if rnd < 0:
      continue
    save()
    print(f"[N={n} round {rnd + 1}/{args.rounds}] " + ", ".join(
        f"{run.layout} {run.name} {run.row['round_ms'][-1]:.2f}/"
        f"{run.row['update_round_ms'][-1]:.2f}" for run in timed)
        + " ms (step/optimizer step)", flush=True)
  for run in runs:
    run.release()


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", type=int, nargs="+", metavar="N",
                 help="device counts (default: 1 and every power of two up to the "
                      "device count)")
  p.add_argument("--preset", default="small", choices=sorted(user_gpt.PRESETS))
  p.add_argument("--num-layers", type=int, help="override the preset's layers")
  p.add_argument("--model-dim", type=int, help="override the preset's width")
  p.add_argument("--num-heads", type=int, help="override the preset's heads")
  p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                 help="compute dtype of the model and of the Newton-Schulz iterations of "
                      "muon/turbo_muon (default: the preset's, bfloat16, their default); "
                      "float32 to compare layouts to float32 rounding")
  p.add_argument("--seq", type=int, default=None,
                 help="tokens per sequence (default: the preset's seq_len)")
  p.add_argument("--per-device-batch", type=int, default=32,
                 help="sequences per device per step (global batch = this x N)")
  p.add_argument("--fsdp", type=int, default=2, help="fsdp size of the dp_fsdp layout")
  p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                 choices=list(OPTIMIZERS), metavar="NAME",
                 help=f"subset of: {' '.join(OPTIMIZERS)}")
  p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
  p.add_argument("--steps", type=int, default=10, help="timed steps per round")
  p.add_argument("--peak-tflops", type=float, default=H100_H200_BF16_TFLOPS,
                 help="per-device peak for MFU (default 989: H100/H200 SXM dense BF16)")
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  p.add_argument("--kind-name", help="device kind in the file names: "
                                     "bench_scaling_<kind>.json")
  p.add_argument("--merge", action="store_true",
                 help="keep the rows of an earlier file of the same name, but those "
                      "measured again")
  p.add_argument("--compile-cache", metavar="DIR",
                 help="JAX's persistent compilation cache in DIR (off by default)")
  p.add_argument("--compile-budget", type=float, metavar="SECONDS",
                 help="per N, compile no further configuration once the compile phase "
                      "has taken this long (the rest are recorded as skipped)")
  p.add_argument("--compile-workers", type=int, default=1, metavar="K",
                 help="after the first configuration of each N, compile up to K at a "
                      "time (default 1: each compile_s is that of a compilation alone, "
                      "and on GPUs no two compilations autotune kernels at once)")
  p.add_argument("--multiprocess", action="store_true",
                 help="join a multi-process job first (ortho_optax.distributed."
                      "initialize_multiprocess; JAX_COORDINATOR_ADDRESS, "
                      "JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
  args = p.parse_args(argv)
  for name in ("per_device_batch", "rounds", "steps", "fsdp", "seq", "num_layers",
               "model_dim", "num_heads", "compile_workers"):
    value = getattr(args, name)
    if value is not None and value < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
  if args.fsdp < 2:
    p.error(f"--fsdp must be >= 2 (the dp_fsdp layout), got {args.fsdp}")
  if any(n < 1 for n in args.sizes or ()):
    p.error(f"--sizes must be >= 1, got {args.sizes}")
  for name in ("peak_tflops", "compile_budget"):
    value = getattr(args, name)
    if value is not None and not 0 < value < float("inf"):
      p.error(f"--{name.replace('_', '-')} must be a positive number, got {value}")
  if args.kind_name is not None and not _KIND_NAME.fullmatch(args.kind_name):
    p.error(f"--kind-name must be letters, digits, '.', '_' or '-', got "
            f"{args.kind_name!r}")
  args.optimizers = list(dict.fromkeys(args.optimizers))
  return args, p


def check_sizes(sizes: list[int], num_devices: int, num_processes: int) -> list[int]:
  """Sorted unique sizes, each at most the device count and, with several processes, a
  multiple of the process count.

  Raises:
    ValueError: naming the bad sizes.
  """
  sizes = sorted(set(sizes))
  bad = [n for n in sizes if n > num_devices]
  if bad:
    raise ValueError(f"--sizes {bad}: only {num_devices} devices are available.")
  bad = [n for n in sizes if n % num_processes]
  if bad:
    raise ValueError(f"--sizes {bad}: with {num_processes} processes every N must be a "
                     f"multiple of {num_processes} (each process gives N/{num_processes} "
                     "devices).")
  return sizes


def main(argv=None) -> int:
  args, parser = parse_args(argv)
  command = shlex.join([sys.argv[0] if argv is None else __file__]
                       + (sys.argv[1:] if argv is None else list(argv)))
  if args.multiprocess:
    ortho_optax.distributed.initialize_multiprocess()
  if args.compile_cache:
    jax.config.update("jax_compilation_cache_dir", args.compile_cache)
  try:
    sizes = check_sizes(args.sizes or default_sizes(jax.device_count()),
                        jax.device_count(), jax.process_count())
  except ValueError as e:
    parser.error(str(e))
  overrides = {k: v for k, v in (("num_layers", args.num_layers),
                                 ("model_dim", args.model_dim),
                                 ("num_heads", args.num_heads), ("dtype", args.dtype))
               if v is not None}
  if args.seq is not None:
    overrides["seq_len"] = args.seq
  cfg = user_gpt.get_config(args.preset, **overrides)
  args.seq = cfg.seq_len
  model = Model.build(cfg)
  dev = jax.devices()[0]
  date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  meta = {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
          "num_devices": jax.device_count(), "process_count": jax.process_count(),
          "machine": platform.node(), "platform": platform.platform(),
          "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "ortho_optax": ortho_optax.__version__, "date": date, "command": command,
          "runs": [{"command": command, "date": date, "sizes": sizes}],
          "sizes": sizes, "preset": args.preset, "model": dataclasses.asdict(cfg),
          "num_params": model.num_params, "per_device_batch": args.per_device_batch,
          "seq": args.seq, "fsdp": args.fsdp, "optimizers": args.optimizers,
          "rounds": args.rounds, "steps": args.steps, "warmup_steps": WARMUP_STEPS,
          "peak_tflops": args.peak_tflops,
          "peak_tflops_note": ("per-device peak of the MFU; the default 989 is the dense "
                               "BF16 tensor-core peak of an H100/H200 SXM"),
          "mfu": "6 x num_params x tokens_per_s / (n x peak_tflops x 1e12)",
          "bytes": "per device per step: max(operand, result) bytes of every collective "
                   "of the compiled HLO, x loop trip counts",
          "peak_mem_gb": "compiled training step, per device: arguments + outputs + "
                         "temporaries - aliases (memory_analysis), 1e9 bytes",
          "compile_cache": args.compile_cache, "compile_budget": args.compile_budget,
          "compile_workers": args.compile_workers,
          "status": "starting"}
  paths = output_paths(pathlib.Path(args.out), args.kind_name)
  measured = {(n, layout, name) for n in sizes for layout, *_ in layouts_of(n, args.fsdp)
              for name in args.optimizers}
  # Only process 0 writes, so only its earlier file counts.
  rows = (merged_rows(paths[0], meta, measured)
          if args.merge and jax.process_index() == 0 else [])
  print(f"# {meta['num_devices']} x {meta['device']} ({meta['backend']}, "
        f"{meta['process_count']} process(es)), jax {meta['jax']}, preset {args.preset} "
        f"({model.num_params / 1e6:.1f}M parameters), N in {sizes}, "
        f"{args.per_device_batch} x {args.seq} tokens per device", flush=True)
  save = lambda: write(paths, meta, rows)
  for n in sizes:
    meta["status"] = f"N={n}"
    measure_size(n, model, args, rows, save)
  meta["status"] = "done"
  md = save()
  print()
  print(md, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
