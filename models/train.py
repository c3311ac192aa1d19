"""Training loop for the GPT: schedule, jitted step, validation, checkpoints, reports.

One training step is a single ``jax.jit`` function over the split, donated state of the
model and an ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` (:class:`DonatedStep`). Batches come from
:class:`ortho_optax.models.data.BatchSampler`, a pure function of ``(seed, step)``, and
checkpoints (orbax) hold the model and optimizer state, so a run resumed from step ``k``
reproduces the losses of an uninterrupted run.

:func:`train` runs one configuration and returns a result dict (also written as
``results.json`` with a loss plot and a Markdown table when ``out_dir`` is set);
:func:`compare` runs several optimizers (and learning-rate multipliers) on the same data
and seed and writes one table.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import sys
import time
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ortho_optax import distributed
from ortho_optax.models import data as data_lib
from ortho_optax.models import gpt
from ortho_optax.models import mesh as mesh_lib
from ortho_optax.models import optimizers as opt_lib

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass
class TrainConfig:
  """One training run.

  Attributes:
    preset: model preset (``tiny``, ``small``, ``medium``).
    model: overrides of :class:`gpt.GPTConfig` fields (e.g. ``{"num_layers": 1}``).
    data: data spec of :func:`data.load_dataset`.
    optimizer: registry name (:data:`optimizers.OPTIMIZERS`).
    lr: peak learning rate of the main branch; ``None`` = the registry's tiny default.
    adam_lr: peak learning rate of the AdamW branch of hybrid optimizers.
    weight_decay: decoupled weight decay of the main branch.
    opt_args: further optimizer keyword arguments.
    steps: training steps.
    batch_size: sequences per step.
    seq_len: tokens per sequence; ``None`` = the preset's.
    warmup_steps: linear warm-up from 0; a float in (0, 1) is a fraction of ``steps``.
    schedule: decay after warm-up: ``cosine``, ``linear`` (both to
      ``final_lr_frac·peak``) or ``constant``.
    final_lr_frac: end of the decay as a fraction of the peak.
    seed: model init and batch order.
    eval_every: validation every this many steps (and at the end); 0 = only at the end.
    eval_batches: validation batches (fixed windows) per evaluation.
    log_every: progress and train-loss logging interval.
    checkpoint_every: orbax checkpoint interval (needs ``out_dir``); 0 = none.
    out_dir: where results.json / loss.png / results.md / checkpoints go.
    resume: continue from the latest checkpoint in ``out_dir``.
    stop_after: stop (after checkpointing) at this step, as if interrupted (tests).
    mesh_data, mesh_fsdp: a ``(data, fsdp)`` device mesh (:mod:`ortho_optax.models.mesh`)
      when either is set (the other fills the devices; ``mesh_fsdp=1`` alone = every
      device on ``data``); ``None`` for both = single device, no mesh.
    ortho_sharding: orthogonalization strategy on a mesh (``gather_whole`` | ``auto``,
      :func:`ortho_optax.distributed.distribute`).
  """

  preset: str = "tiny"
  model: dict = dataclasses.field(default_factory=dict)
  data: str = "embedded"
  optimizer: str = "adamw"
  lr: float | None = None
  adam_lr: float = opt_lib.TINY_ADAM_LR
  weight_decay: float = 0.0
  opt_args: dict = dataclasses.field(default_factory=dict)
  steps: int = 300
  batch_size: int = 32
  seq_len: int | None = None
  warmup_steps: float = 0.05
  schedule: str = "cosine"
  final_lr_frac: float = 0.0
  seed: int = 0
  eval_every: int = 100
  eval_batches: int = 8
  log_every: int = 10
  checkpoint_every: int = 0
  out_dir: str | None = None
  resume: bool = False
  stop_after: int | None = None
  mesh_data: int | None = None
  mesh_fsdp: int | None = None
  ortho_sharding: str = "gather_whole"

  def validate(self) -> None:
    if self.steps < 1:
      raise ValueError(f"steps must be >= 1, got {self.steps}.")
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule={self.schedule!r}; valid choices: {list(SCHEDULES)}.")
    if self.optimizer not in opt_lib.OPTIMIZERS:
      raise ValueError(f"unknown optimizer {self.optimizer!r}; valid choices: "
                       f"{list(opt_lib.OPTIMIZERS)}.")
    if self.warmup_steps < 0:
      raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}.")
    if not 0.0 <= self.final_lr_frac <= 1.0:
      raise ValueError(f"final_lr_frac must lie in [0, 1], got {self.final_lr_frac}.")
    if self.ortho_sharding not in distributed.STRATEGIES:
      raise ValueError(f"ortho_sharding={self.ortho_sharding!r}; valid choices: "
                       f"{list(distributed.STRATEGIES)}.")
    if (self.resume or self.checkpoint_every) and not self.out_dir:
      raise ValueError("checkpoints (--resume / --checkpoint-every) need an output dir.")

  def model_config(self) -> gpt.GPTConfig:
    overrides = dict(self.model)
    if self.seq_len is not None:
      overrides["seq_len"] = self.seq_len
    return gpt.get_config(self.preset, **overrides)

  def peak_lr(self) -> float:
    return opt_lib.default_lr(self.optimizer) if self.lr is None else self.lr


def warmup_steps_of(cfg: TrainConfig) -> int:
  w = cfg.warmup_steps
  return int(round(w * cfg.steps)) if 0 < w < 1 else int(w)


def lr_multiplier(steps: int, warmup: int, kind: str = "cosine", final_frac: float = 0.0):
  """Schedule ``step -> multiplier`` in [0, 1]: linear warm-up then decay.

  Warm-up goes linearly from ``1/warmup`` at step 0 to 1 at ``warmup`` (so the first
  step already moves); the decay reaches ``final_frac`` at ``steps``.
  """
  if kind not in SCHEDULES:
    raise ValueError(f"schedule={kind!r}; valid choices: {list(SCHEDULES)}.")
  decay_steps = max(steps - warmup, 1)

  def fn(step):
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum((step + 1.0) / max(warmup, 1), 1.0) if warmup > 0 else 1.0
    frac = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    if kind == "cosine":
      decay = final_frac + (1 - final_frac) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
    elif kind == "linear":
      decay = 1.0 - (1 - final_frac) * frac
    else:
      decay = 1.0
    return warm * decay

  return fn


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  mult = lr_multiplier(cfg.steps, warmup_steps_of(cfg), cfg.schedule, cfg.final_lr_frac)
  peak, adam_peak = cfg.peak_lr(), cfg.adam_lr
  return opt_lib.build(
      cfg.optimizer, lambda s: peak * mult(s),
      adam_learning_rate=lambda s: adam_peak * mult(s),
      weight_decay=cfg.weight_decay, **cfg.opt_args)


def make_mesh(cfg: TrainConfig):
  """The ``(data, fsdp)`` mesh of ``cfg``, or None (no ``mesh_data`` / ``mesh_fsdp``)."""
  if cfg.mesh_data is None and cfg.mesh_fsdp is None:
    return None
  return mesh_lib.make_mesh(cfg.mesh_data, cfg.mesh_fsdp)


def make_train_step(mesh=None):
  """The jitted step ``(model, optimizer, x, y) -> loss`` (updates both in place).

  With a mesh, the new parameters and optimizer state are constrained to their FSDP
  shardings so they stay sharded from step to step.
  """

  @nnx.jit
  def train_step(model, optimizer, inputs, targets):
    loss, grads = nnx.value_and_grad(gpt.loss_fn)(model, inputs, targets)
    optimizer.update(model, grads)
    if mesh is not None:
      mesh_lib.constrain_nnx(mesh, model, optimizer)
    return loss

  return train_step


class DonatedStep:
  """The training step on the split state of a model and its ``nnx.Optimizer``.

  ``nnx.split`` once, then each call runs one ``jax.jit`` step ``(state, x, y) ->
  (state, loss)`` with the state donated (updated in place on the device, no NNX graph
  traversal per call). This is the step ``benchmarks/bench_gpt.py`` times (its ``split``
  driver; ``nnx.jit`` on the objects measured 2.4% slower at 64k tokens on an H200).
  The objects' own arrays are stale while it runs: :meth:`sync` writes the current state
  back into them (before evaluating or checkpointing). ``step_fn`` is the pure step
  ``(state, inputs, targets) -> (state, loss)`` and ``state`` the current state, for
  tools that compile it another way (a profiler that must not donate).

  Args:
    model: the GPT.
    optimizer: its ``nnx.Optimizer``.
    mesh: optional ``(data, fsdp)`` mesh: the new state is constrained to its FSDP
      shardings so it stays sharded from step to step.
  """

  def __init__(self, model, optimizer, mesh=None):
    self._objects = (model, optimizer)
    graphdef, state = nnx.split(self._objects)
    self.state = _distinct_buffers(state)

    def step(state, inputs, targets):
      m, o = nnx.merge(graphdef, state)
      loss, grads = nnx.value_and_grad(gpt.loss_fn)(m, inputs, targets)
      o.update(m, grads)
      if mesh is not None:
        mesh_lib.constrain_nnx(mesh, m, o)
      return nnx.state((m, o)), loss

    self.step_fn = step
    self._step = jax.jit(step, donate_argnums=0)

  def __call__(self, inputs, targets) -> jax.Array:
    """One step; returns the (device) loss."""
    self.state, loss = self._step(self.state, inputs, targets)
    return loss

  def sync(self) -> None:
    """Points the model's and optimizer's variables at the current state."""
    nnx.update(self._objects, self.state)


def _distinct_buffers(tree):
  """``tree`` with every repeated array (the same object at two leaves, as an optimizer
  state may hold) replaced by a copy: donation rejects a buffer passed twice."""
  seen = set()

  def distinct(x):
    if not isinstance(x, jax.Array):
      return x
    if id(x) in seen:
      return jnp.copy(x)
    seen.add(id(x))
    return x
  return jax.tree.map(distinct, tree)


@nnx.jit
def eval_step(model, inputs, targets):
  return gpt.loss_fn(model, inputs, targets)


def evaluate(model, tokens, batch_size, seq_len, max_batches, mesh=None) -> float:
  losses, weights = [], []
  for x, y in data_lib.eval_batches(tokens, batch_size, seq_len, max_batches):
    xb, yb = (jnp.asarray(x), jnp.asarray(y)) if mesh is None else mesh_lib.put_batch(mesh, x, y)
    losses.append(eval_step(model, xb, yb))
    weights.append(x.shape[0])
  return float(np.average(np.asarray(jax.device_get(losses)), weights=weights))


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------
# The optimizer state of a multi_transform holds MaskedNode / None / EmptyState nodes that
# a checkpoint format need not know about: we save the flat list of array leaves of
# (model state, optimizer state) and restore them into the tree structure of a freshly
# built model and optimizer (same config => same structure).


def _ckpt_dir(out_dir) -> pathlib.Path:
  return pathlib.Path(out_dir).absolute() / "checkpoints"


def save_checkpoint(out_dir, step: int, model, optimizer, history: dict) -> pathlib.Path:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  leaves = jax.tree.leaves((nnx.state(model), nnx.state(optimizer)))
  tree = {f"{i:05d}": np.asarray(jax.device_get(x)) for i, x in enumerate(leaves)}
  path = _ckpt_dir(out_dir) / f"step_{step:08d}"
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, tree, force=True)
  ckptr.wait_until_finished()
  (path.parent / f"step_{step:08d}.json").write_text(json.dumps(history))
  return path


def checkpoint_problem(path) -> str | None:
  """Why the checkpoint directory ``path`` cannot be trusted, or ``None`` if complete.

  A save is complete when orbax finalised the directory (``_CHECKPOINT_METADATA``,
  written last, then the temporary directory is renamed) and the history JSON written
  after it parses. A crash leaves an ``*.orbax-checkpoint-tmp-*`` directory, a step
  directory without its JSON, or a truncated JSON.
  """
  path = pathlib.Path(path)
  if not path.name[5:].isdigit():
    return "an orbax temporary directory of an interrupted save"
  if not (path / "_CHECKPOINT_METADATA").exists():
    return "orbax's _CHECKPOINT_METADATA is missing (unfinished or damaged save)"
  meta = path.parent / f"{path.name}.json"
  if not meta.exists():
    return "its history file is missing (the run stopped while saving)"
  try:
    json.loads(meta.read_text())
  except ValueError:
    return "its history file is truncated"
  return None


def latest_checkpoint(out_dir) -> tuple[int, pathlib.Path] | None:
  """The newest complete checkpoint ``(step, path)``; incomplete ones are skipped with a
  warning (falling back to the previous good one), see :func:`checkpoint_problem`."""
  d = _ckpt_dir(out_dir)
  if not d.is_dir():
    return None
  steps = []
  for p in sorted(d.glob("step_*")):
    if not p.is_dir():
      continue
    problem = checkpoint_problem(p)
    if problem is not None:
      warnings.warn(f"ignoring checkpoint {p}: {problem}; resuming from an earlier one.",
                    RuntimeWarning, stacklevel=2)
      continue
    steps.append(int(p.name[5:]))
  steps.sort()
  return (steps[-1], d / f"step_{steps[-1]:08d}") if steps else None


def restore_checkpoint(path, model, optimizer) -> dict:
  """Restores model and optimizer in place; returns the saved history."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(path)
  state = (nnx.state(model), nnx.state(optimizer))
  leaves, treedef = jax.tree.flatten(state)
  target = {f"{i:05d}": np.zeros(np.shape(x), np.asarray(x).dtype) for i, x in enumerate(leaves)}
  restored = ocp.StandardCheckpointer().restore(path, target)
  if len(restored) != len(leaves):
    raise ValueError(f"checkpoint {path} has {len(restored)} arrays, the model and optimizer "
                     f"have {len(leaves)} (different config?).")
  new = [jnp.asarray(restored[f"{i:05d}"], dtype=np.asarray(x).dtype)
         for i, x in enumerate(leaves)]
  model_state, opt_state = jax.tree.unflatten(treedef, new)
  nnx.update(model, model_state)
  nnx.update(optimizer, opt_state)
  return json.loads(path.parent.joinpath(f"{path.name}.json").read_text())


# ---------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------


class _Progress:
  """tqdm when installed (and enabled), else a line every ``log_every`` steps."""

  def __init__(self, total: int, initial: int, desc: str, enabled: bool = True):
    self.bar = None
    self.enabled = enabled
    self.desc = desc
    if enabled:
      try:
        from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                        file=sys.stderr)
      except ImportError:
        self.bar = None

  def update(self, step: int, n: int, info: dict) -> None:
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.update(n)
      self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                            for k, v in info.items()}, refresh=False)
    else:
      text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in info.items())
      print(f"[{self.desc}] step {step}: {text}", flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


def machine_info() -> dict:
  dev = jax.devices()[0]
  return {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
          "num_devices": jax.device_count(), "cpu_count": os.cpu_count(),
          "platform": platform.platform(), "python": platform.python_version(),
          "jax": jax.__version__, "optax": optax.__version__,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def train(cfg: TrainConfig, dataset: data_lib.Dataset | None = None,
          progress: bool = True) -> dict:
  """Runs one training configuration.

  Args:
    cfg: the run.
    dataset: an already loaded dataset (``compare`` shares one), else ``cfg.data``.
    progress: show a progress bar / progress lines.

  Returns:
    A result dict: ``config``, ``data`` (with sha256), ``train_loss`` [(step, loss)],
    ``val_loss`` [(step, loss)], ``final_val_loss`` (None when the run diverged: then
    ``diverged_at`` is the step of the first non-finite loss), ``timings`` (seconds,
    tokens/s), ``num_params``, ``machine``. Also written to ``out_dir/results.json`` with
    ``loss.png`` and ``results.md`` when ``out_dir`` is set.
  """
  cfg.validate()
  mcfg = cfg.model_config()
  dataset = dataset if dataset is not None else data_lib.load_dataset(cfg.data)
  if dataset.vocab_size > mcfg.vocab_size:
    raise ValueError(f"data vocabulary {dataset.vocab_size} exceeds the model's "
                     f"{mcfg.vocab_size}; choose a preset or --vocab-size that fits.")
  seq_len = mcfg.seq_len
  sampler = data_lib.BatchSampler(dataset.train, cfg.batch_size, seq_len, cfg.seed)
  # Fail early on a too-short validation set.
  next(iter(data_lib.eval_batches(dataset.val, cfg.batch_size, seq_len, 1)))

  model = gpt.GPT(mcfg, rngs=nnx.Rngs(cfg.seed))
  mesh = make_mesh(cfg)
  tx = make_optimizer(cfg)
  if mesh is not None:
    tx = distributed.distribute(tx, mesh, strategy=cfg.ortho_sharding)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  history = {"train_loss": [], "val_loss": [], "step_times": []}
  start = 0
  if cfg.resume:
    found = latest_checkpoint(cfg.out_dir)
    if found is not None:
      start, path = found
      history = restore_checkpoint(path, model, optimizer)
  if mesh is not None:
    mesh_lib.shard_nnx(mesh, model, optimizer)
  train_step = DonatedStep(model, optimizer, mesh)
  end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)

  label = f"{cfg.optimizer} lr={cfg.peak_lr():g}"
  bar = _Progress(cfg.steps, start, label, enabled=progress)
  tokens_per_step = cfg.batch_size * seq_len
  pending: list[tuple[int, jax.Array]] = []
  t_last, last_logged = time.perf_counter(), start
  train_time = 0.0
  diverged_at = None
  for step in range(start, end):
    x, y = sampler(step)
    t0 = time.perf_counter()
    xb, yb = (jnp.asarray(x), jnp.asarray(y)) if mesh is None else mesh_lib.put_batch(mesh, x, y)
    loss = train_step(xb, yb)
    pending.append((step, loss))
    done = step + 1
    if done % cfg.log_every == 0 or done == end or step == start:
      losses = jax.device_get([l for _, l in pending])
      t1 = time.perf_counter()
      for (s, _), l in zip(pending, losses):
        history["train_loss"].append((s, float(l)))
      if step == start:
        history.setdefault("first_step_s", t1 - t0)  # includes compilation
      else:
        history["step_times"].append(((t1 - t_last) / (done - last_logged)))
        train_time += t1 - t_last
      if not all(math.isfinite(float(l)) for l in losses):
        # Diverged: stop here and report it (a sweep goes on with its next run).
        diverged_at = pending[-1][0]
        print(f"[{label}] non-finite loss at step {diverged_at}: stopping this run.",
              file=sys.stderr, flush=True)
        end = done
        break
      n = done - last_logged
      rate = tokens_per_step * n / max(t1 - t_last, 1e-9)
      bar.update(done, n, {"loss": float(losses[-1]), "tok/s": f"{rate:,.0f}"})
      pending, t_last, last_logged = [], time.perf_counter(), done
    evaluating = bool(cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps
    checkpointing = bool(cfg.checkpoint_every and (done % cfg.checkpoint_every == 0
                                                   or done == end))
    if evaluating or checkpointing:
      train_step.sync()
    if evaluating:
      history["val_loss"].append(
          (done, evaluate(model, dataset.val, cfg.batch_size, seq_len, cfg.eval_batches, mesh)))
      t_last = time.perf_counter()  # keep evaluation out of the step timings
    if checkpointing:
      save_checkpoint(cfg.out_dir, done, model, optimizer, history)
      t_last = time.perf_counter()
  bar.close()
  train_step.sync()

  step_times = history["step_times"]
  med = float(np.median(step_times)) if step_times else float("nan")
  result = {
      "config": dataclasses.asdict(cfg) | {"lr": cfg.peak_lr(),
                                            "model_config": dataclasses.asdict(mcfg)},
      "data": dataset.describe(),
      "num_params": gpt.count_params(model),
      "train_loss": history["train_loss"],
      "val_loss": history["val_loss"],
      "final_val_loss": history["val_loss"][-1][1] if history["val_loss"] and
                        history["val_loss"][-1][0] == cfg.steps else None,
      "final_train_loss": _tail_mean(history["train_loss"]),
      "timings": {"first_step_s": history.get("first_step_s"),
                  "median_step_s": med,
                  "tokens_per_s": tokens_per_step / med if step_times else None,
                  "train_s_this_session": train_time},
      "completed_steps": end,
      "diverged_at": diverged_at,
      "machine": machine_info(),
  }
  if cfg.out_dir:
    write_reports(cfg.out_dir, [result], title=f"ortho-optax train: {label}")
  return result


def _tail_mean(points, frac: float = 0.1) -> float | None:
  if not points:
    return None
  k = max(1, int(len(points) * frac))
  return float(np.mean([l for _, l in points[-k:]]))


# ---------------------------------------------------------------------------------------
# Compare
# ---------------------------------------------------------------------------------------


def compare(base: TrainConfig, optimizers: Sequence[str], lr_mults: Sequence[float] = (1.0,),
            lrs: dict[str, float] | None = None, progress: bool = True) -> dict:
  """Trains ``base`` once per optimizer and learning-rate multiplier on the same data.

  Args:
    base: shared configuration (its ``optimizer`` and ``lr`` are replaced per run).
    optimizers: registry names.
    lr_mults: multipliers of each optimizer's base learning rate (a small sweep).
    lrs: base learning rate per optimizer (default: the registry's tiny defaults).
    progress: progress bars.

  Returns:
    ``{"runs": [result, ...], "best": {optimizer: result}}``; written with a table and a
    plot into ``base.out_dir`` when set.
  """
  for name in optimizers:
    opt_lib.resolve(name)  # fail before training anything
  dataset = data_lib.load_dataset(base.data)
  runs = []
  for name in optimizers:
    for mult in lr_mults:
      lr = (lrs or {}).get(name, opt_lib.default_lr(name)) * mult
      cfg = dataclasses.replace(base, optimizer=name, lr=lr, out_dir=None, resume=False,
                                checkpoint_every=0)
      runs.append(train(cfg, dataset, progress=progress))
  best = {}
  for r in runs:
    name = r["config"]["optimizer"]
    key = _sort_key(r)
    if name not in best or key < _sort_key(best[name]):
      best[name] = r
  out = {"runs": runs, "best": best}
  if base.out_dir:
    write_reports(base.out_dir, runs, title="ortho-optax compare", best=best)
  return out


def _sort_key(r):
  v = r["final_val_loss"]
  return v if v is not None and math.isfinite(v) else float("inf")


# ---------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------


def markdown_table(runs: Sequence[dict], best: dict | None = None) -> str:
  """Markdown table: optimizer, lr, val loss, train loss, wall-clock and tokens/s."""
  lines = ["| optimizer | lr | val loss | train loss (last 10%) | train s | tokens/s |",
           "|---|---|---|---|---|---|"]
  best_ids = {id(r) for r in (best or {}).values()}
  rows = sorted(runs, key=lambda r: (_sort_key(r), r["config"]["optimizer"]))
  for r in rows:
    c, t = r["config"], r["timings"]
    val = r["final_val_loss"]
    val_s = f"{val:.4f}" if val is not None else "-"
    if r.get("diverged_at") is not None:
      val_s = f"diverged at step {r['diverged_at']}"
    if id(r) in best_ids and len(runs) > len(best or {}):
      val_s = f"**{val_s}**"
    tl = r["final_train_loss"]
    steps = r["completed_steps"]
    wall = (t["median_step_s"] or 0) * steps
    tps = t["tokens_per_s"]
    lines.append(f"| {c['optimizer']} | {c['lr']:g} | {val_s} | "
                 f"{tl:.4f} | {wall:.1f} | {tps:,.0f} |" if tps else
                 f"| {c['optimizer']} | {c['lr']:g} | {val_s} | {tl:.4f} | - | - |")
  return "\n".join(lines) + "\n"


def plot_losses(runs: Sequence[dict], path, title: str = "") -> None:
  """Train (smoothed) and validation loss curves to a PNG (matplotlib, Agg)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  for r in runs:
    c = r["config"]
    lab = f"{c['optimizer']} lr={c['lr']:g}"
    if r["train_loss"]:
      s, l = np.asarray(r["train_loss"]).T
      k = max(1, len(l) // 50)
      smooth = np.convolve(l, np.ones(k) / k, mode="valid")
      ax1.plot(s[k - 1:], smooth, label=lab)
    if r["val_loss"]:
      s, l = np.asarray(r["val_loss"]).T
      ax2.plot(s, l, marker="o", ms=3, label=lab)
  ax1.set(xlabel="step", ylabel="train loss (nats/token)", title="train (smoothed)")
  ax2.set(xlabel="step", ylabel="validation loss", title="validation")
  for ax in (ax1, ax2):
    ax.grid(alpha=0.3)
  ax2.legend(fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def write_reports(out_dir, runs: Sequence[dict], title: str, best: dict | None = None):
  """Writes results.json, loss.png and results.md into ``out_dir``."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  payload = {"title": title, "runs": list(runs),
             "best": {k: {"lr": v["config"]["lr"], "final_val_loss": v["final_val_loss"]}
                      for k, v in (best or {}).items()}}
  (out / "results.json").write_text(json.dumps(_jsonable(payload), indent=1))
  plot_losses(runs, out / "loss.png", title)
  r0 = runs[0]
  c = r0["config"]
  head = (f"# {title}\n\npreset `{c['preset']}`, data `{r0['data']['name']}` "
          f"(sha256 `{r0['data']['sha256'][:16]}…`), {c['steps']} steps × "
          f"{c['batch_size']}×{c['model_config']['seq_len']} tokens, {c['schedule']} schedule, "
          f"seed {c['seed']}; machine: {r0['machine']['device']} "
          f"({r0['machine']['backend']}), {r0['machine']['date']}\n\n")
  (out / "results.md").write_text(head + markdown_table(runs, best))
