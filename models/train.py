"""The training loop of the GPT (:func:`train`) and the optimizer comparison (:func:`compare`).

:func:`train`, top to bottom: check the configuration, the data and the output folder
(before anything is written); build the model and optimizer; restore the newest
checkpoint when resuming; compile the step (:class:`~ortho_optax.models.step.TrainStep`);
then run the steps. Batches come from a background thread that places them on the device
ahead of use (:class:`~ortho_optax.models.data.Prefetcher`; on a mesh each process reads
from the corpus only the rows of its own devices), and the host reads losses
back only every ``log_every`` steps, one interval late, so it never waits for the step it
has just dispatched. One clock measures the training steps; it is paused (after the
device has caught up) around evaluation and checkpoints. Batches are a pure function of
``(seed, step)`` and checkpoints hold the whole model and optimizer state, so a resumed
run reproduces the uninterrupted one bit for bit.

Checkpoints are :mod:`ortho_optax.models.checkpoints`, results and plots
:mod:`ortho_optax.models.reports`, the configuration and its checks
:mod:`ortho_optax.models.config`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from ortho_optax import distributed
from ortho_optax import validation
from ortho_optax.models import checkpoints as ckpt_lib
from ortho_optax.models import data as data_lib
from ortho_optax.models import gpt
from ortho_optax.models import mesh as mesh_lib
from ortho_optax.models import optimizers as opt_lib
from ortho_optax.models import reports
from ortho_optax.models.config import (  # noqa: F401  (the trainer's public names)
    SCHEDULES,
    TrainConfig,
    field_name,
    lr_multiplier,
    make_optimizer,
    run_record,
    warmup_steps_of,
)
from ortho_optax.models.reports import machine_info, markdown_table, plot_losses, write_reports  # noqa: F401
from ortho_optax.models.step import TrainStep, make_train_step  # noqa: F401

_sort_key = reports.sort_key  # the name benchmarks/tiny_sweep.py uses


def make_mesh(cfg: TrainConfig):
  """The ``(data, fsdp)`` mesh of ``cfg``, or None (no ``mesh_data`` / ``mesh_fsdp``)."""
  if cfg.mesh_data is None and cfg.mesh_fsdp is None:
    return None
  return mesh_lib.make_mesh(cfg.mesh_data, cfg.mesh_fsdp)


def init_model_and_optimizer(cfg: TrainConfig, mesh=None, tx=None):
  """A fresh GPT of ``cfg`` (seeded) and its ``nnx.Optimizer`` (on ``mesh``'s shardings).

  Args:
    cfg: the run.
    mesh: optional mesh: the optimizer is :func:`ortho_optax.distribute`\\ d over it and
      both objects' state moved to their FSDP shardings.
    tx: an optimizer to use instead of ``make_optimizer(cfg)`` (benchmarks).
  """
  model = gpt.GPT(cfg.model_config(), rngs=nnx.Rngs(cfg.seed))
  tx = make_optimizer(cfg) if tx is None else tx
  if mesh is not None and cfg.optimizer in opt_lib.ORTHOGONALIZING:
    tx = distributed.distribute(tx, mesh, strategy=cfg.ortho_sharding)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  if mesh is not None:
    mesh_lib.shard_nnx(mesh, model, optimizer)
  return model, optimizer


def batch_placer(mesh=None) -> Callable:
  """``(inputs, targets) -> device arrays``: sharded by batch on a mesh.

  The batches may be host arrays or lazy :class:`~ortho_optax.models.data.Windows`; on a
  mesh each process reads only the rows of its own devices (:func:`mesh_lib.put_batch`).
  """
  if mesh is None:
    return lambda *arrays: tuple(jax.device_put(np.asarray(a)) for a in arrays)
  return lambda *arrays: mesh_lib.put_batch(mesh, *arrays)


def check_out_dir(cfg: TrainConfig, name: Callable[[str], str] = field_name) -> None:
  """Refuses an output folder that cannot be written (a file in its path, no write
  permission) or that holds another run, unless ``cfg.resume`` continues it."""
  if not cfg.out_dir:
    return
  out = pathlib.Path(cfg.out_dir)
  existing = out
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir():
    raise ValueError(f"{name('out_dir')} {cfg.out_dir}: {existing} is a file, not a folder; "
                     "choose another folder.")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f"{name('out_dir')} {cfg.out_dir}: {existing} is not writable; choose "
                     "another folder.")
  if cfg.resume:
    return
  taken = (["results.json"] if (out / "results.json").exists() else []) + (
      ["checkpoints"] if ckpt_lib.complete_steps(out) else [])
  if taken:
    raise ValueError(f"{name('out_dir')} {cfg.out_dir} already holds a run ({', '.join(taken)}); "
                     f"choose another folder, or {name('resume')} to continue its checkpoints.")


def check_run(cfg: TrainConfig, dataset: data_lib.Dataset,
              name: Callable[[str], str] = field_name) -> tuple[dict, int, dict]:
  """Checks a run against its settings, data, output folder and checkpoint.

  Returns:
    ``(record, start, history)``: the run's :func:`run_record`, the step it starts at
    (that of the checkpoint it resumes, else 0) and the loss history so far.

  Raises:
    ValueError: for a bad setting, data that cannot feed the model, an output folder of
      another run, or (resuming) a missing checkpoint or one of another configuration.
  """
  cfg.validate(name)
  cfg.check_dataset(dataset, name)
  check_out_dir(cfg, name)
  record = run_record(cfg, dataset)
  if not cfg.resume:
    return record, 0, {"train_loss": [], "val_loss": []}
  start, meta = ckpt_lib.resume_point(cfg.out_dir, record, name)
  return record, start, meta["history"]


def evaluate(step: TrainStep, tokens, cfg: TrainConfig, seq_len: int, put) -> float:
  """Mean validation loss over the fixed windows of :func:`data.eval_batches`."""
  losses, weights = [], []
  for x, y in data_lib.eval_windows(tokens, cfg.batch_size, seq_len, cfg.eval_batches):
    losses.append(step.loss(*put(x, y)))
    weights.append(x.shape[0])
  return float(np.average(np.asarray(jax.device_get(losses)), weights=weights))


class Clock:
  """Seconds of training: runs between :meth:`start` and :meth:`pause`."""

  def __init__(self):
    self.seconds = 0.0
    self._since = None

  def start(self) -> None:
    self._since = time.perf_counter()

  def pause(self) -> None:
    if self._since is not None:
      self.seconds += time.perf_counter() - self._since
      self._since = None

  def read(self) -> float:
    return self.seconds + (0.0 if self._since is None else time.perf_counter() - self._since)


class LossLog:
  """The train losses, read from the device every ``log_every`` steps, one interval late.

  :meth:`read` starts the host copies of the newest interval's losses and returns the
  values of the interval before it, which the device finished long ago, so the host never
  waits for the step it has just dispatched; ``read(done, all=True)`` returns everything
  (call it after the device has caught up). Each read also updates the progress bar and
  records the training time per step between reads (:attr:`step_times`).
  """

  def __init__(self, clock: Clock, tokens_per_step: int, bar: "Progress", start: int):
    self._clock, self._tokens, self._bar = clock, tokens_per_step, bar
    self._pending: list = []
    self._in_flight: list = []
    self._last = (start, 0.0)  # (steps read, clock) at the previous read
    self._start = start
    self.step_times: list[float] = []

  def add(self, step: int, loss: jax.Array) -> None:
    self._pending.append((step, loss))

  def read(self, done: int, all: bool = False) -> list[tuple[int, float]]:  # pylint: disable=redefined-builtin
    for _, loss in self._pending:
      loss.copy_to_host_async()
    if all:
      ready, self._in_flight = self._in_flight + self._pending, []
    else:
      ready, self._in_flight = self._in_flight, self._pending
    self._pending = []
    values = jax.device_get([loss for _, loss in ready])
    read = [(s, float(v)) for (s, _), v in zip(ready, values)]
    if read:
      t, (last_steps, last_t) = self._clock.read(), self._last
      steps = read[-1][0] + 1
      if steps > last_steps and last_steps > self._start:  # the first read has warm-up
        self.step_times.append((t - last_t) / (steps - last_steps))
      rate = self._tokens * (steps - last_steps) / max(t - last_t, 1e-9)
      self._last = (steps, t)
      self._bar.update(done, {"loss": read[-1][1], "tok/s": f"{rate:,.0f}"})
    return read


class Progress:
  """tqdm when installed (and enabled), else a line per update."""

  def __init__(self, total: int, initial: int, desc: str, enabled: bool = True):
    self.bar, self.enabled, self.desc = None, enabled, desc
    if enabled:
      try:
        from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                        file=sys.stderr)
      except ImportError:
        self.bar = None

  def update(self, done: int, info: dict) -> None:
    if not self.enabled:
      return
    text = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in info.items()}
    if self.bar is not None:
      self.bar.update(done - self.bar.n)
      self.bar.set_postfix(text, refresh=False)
    else:
      print(f"[{self.desc}] step {done}: " + " ".join(f"{k}={v}" for k, v in text.items()),
            file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def train(cfg: TrainConfig, dataset: data_lib.Dataset | None = None, progress: bool = True,
          name: Callable[[str], str] = field_name) -> dict:
  """Runs one training configuration.

  Args:
    cfg: the run.
    dataset: an already loaded dataset (``compare`` shares one), else ``cfg.data``.
    progress: show a progress bar.
    name: how configuration fields are named in error messages (the command line's flags).

  Returns:
    A result dict: ``config``, ``data`` (with sha256), ``train_loss`` [(step, loss)],
    ``val_loss`` [(step, loss)], ``final_val_loss`` (None when the run diverged: then
    ``diverged_at`` is the step of the first non-finite loss), ``timings`` (see
    :mod:`ortho_optax.models.reports`), ``resumed_from``, ``num_params``, ``machine``.
    Also written to ``out_dir/results.json`` with ``loss.png`` and ``results.md`` when
    ``out_dir`` is set.

  Raises:
    ValueError: for a bad setting, data that cannot feed the model, an output folder of
      another run, or a checkpoint that is missing or of another configuration; always
      before anything is written.
  """
  # 1. Everything that can be wrong is checked before anything is built or written.
  cfg.validate(name)
  dataset = dataset if dataset is not None else data_lib.load_dataset(cfg.data)
  record, start, history = check_run(cfg, dataset, name)
  end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
  results = pathlib.Path(cfg.out_dir) / "results.json" if cfg.out_dir else None
  if cfg.resume and start >= end and results is not None and results.exists():
    # A finished run resumed again: its results (and their timings) are kept as they are.
    print(f"[{cfg.optimizer} lr={cfg.peak_lr():g}] already at step {start} of {end}: "
          f"nothing to train; {results} is kept.", file=sys.stderr, flush=True)
    return json.loads(results.read_text())["runs"][0]

  # 2. Model, optimizer (restored when resuming), compiled step.
  mesh = make_mesh(cfg)
  model, optimizer = init_model_and_optimizer(cfg, mesh)
  label = f"{cfg.optimizer} lr={cfg.peak_lr():g}"
  checkpoints = (ckpt_lib.Checkpoints(cfg.out_dir, cfg.keep_checkpoints, cfg.async_checkpoints)
                 if cfg.checkpoint_every or cfg.resume else None)
  try:
    if start:
      nnx.update((model, optimizer), checkpoints.restore(start, nnx.state((model, optimizer))))
      print(f"[{label}] resumed from step {start} ({checkpoints.directory / str(start)})",
            file=sys.stderr, flush=True)
    seq_len = model.config.seq_len
    sampler = data_lib.BatchSampler(dataset.train, cfg.batch_size, seq_len, cfg.seed)
    put = batch_placer(mesh)
    step = TrainStep(model, optimizer, *put(*sampler.lazy(start)), mesh=mesh)

    # 3. The steps, timed by one clock that evaluation and checkpoints pause. A checkpoint
    # records the training time so far, so that a resumed run reports the whole run's.
    before = history.get("timed", {"train_s": 0.0, "steps": 0})
    clock = Clock()
    timings = {"compile_s": step.compile_s, "eval_s": 0.0, "checkpoint_s": 0.0}
    done, diverged_at = start, None
    with data_lib.Prefetcher(sampler.lazy, range(start, end), put) as batches, \
         Progress(cfg.steps, start, label, enabled=progress) as bar:
      losses = LossLog(clock, cfg.batch_size * seq_len, bar, start)
      clock.start()
      for s in range(start, end):
        losses.add(s, step(*next(batches)))
        done = s + 1
        evaluating = (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps
        checkpointing = cfg.checkpoint_every and (done % cfg.checkpoint_every == 0
                                                  or done == end)
        catch_up = evaluating or checkpointing or done == end
        if done % cfg.log_every and not catch_up:
          continue
        if catch_up:
          step.wait()
        read = losses.read(done, all=catch_up)
        history["train_loss"] += read
        bad = [s_ for s_, l in read if not math.isfinite(l)]
        if bad:  # diverged: report it and stop (a sweep goes on with its next run)
          diverged_at = bad[0]
          print(f"[{label}] non-finite loss at step {diverged_at}: stopping this run.",
                file=sys.stderr, flush=True)
          break
        if evaluating or checkpointing:
          clock.pause()
          t0 = time.perf_counter()
          if evaluating:
            history["val_loss"].append((done, evaluate(step, dataset.val, cfg, seq_len, put)))
          t1 = time.perf_counter()
          if checkpointing:
            history["timed"] = {"train_s": before["train_s"] + clock.seconds,
                                "steps": before["steps"] + done - start}
            checkpoints.save(done, step.state, {"run": record, "history": history})
          timings["eval_s"] += t1 - t0
          timings["checkpoint_s"] += time.perf_counter() - t1
          clock.start()
      step.wait()
      clock.pause()
      history["train_loss"] += losses.read(done, all=True)
  finally:
    if checkpoints is not None:
      checkpoints.close()
  step.write_back()

  # 4. The result.
  steps_run = done - start
  train_s = clock.seconds
  timings.update({
      "train_s": train_s, "steps_timed": steps_run,
      "step_s": train_s / steps_run if steps_run else None,
      "median_step_s": float(np.median(losses.step_times)) if losses.step_times else
                       (train_s / steps_run if steps_run else None),
      "tokens_per_s": cfg.batch_size * seq_len * steps_run / train_s if train_s else None,
      "total_train_s": before["train_s"] + train_s,
      "total_steps_timed": before["steps"] + steps_run})
  val = history["val_loss"]
  result = {
      "config": dataclasses.asdict(cfg) | {"lr": cfg.peak_lr(),
                                            "model_config": dataclasses.asdict(model.config)},
      "data": dataset.describe(),
      "num_params": gpt.count_params(model),
      "train_loss": history["train_loss"],
      "val_loss": val,
      "final_val_loss": val[-1][1] if val and val[-1][0] == cfg.steps else None,
      "final_train_loss": _tail_mean(history["train_loss"]),
      "timings": timings,
      "completed_steps": done,
      "resumed_from": start or None,
      "diverged_at": diverged_at,
      "machine": machine_info(),
  }
  if cfg.out_dir and jax.process_index() == 0:  # one writer when several hosts train
    write_reports(cfg.out_dir, [result], title=f"ortho-optax train: {label}")
  return result


def _tail_mean(points, frac: float = 0.1) -> float | None:
  if not points:
    return None
  k = max(1, int(len(points) * frac))
  return float(np.mean([l for _, l in points[-k:]]))


def sweep_configs(base: TrainConfig, optimizers: Sequence[str], lr_mults: Sequence[float],
                  lrs: dict[str, float] | None = None,
                  name: Callable[[str], str] = field_name) -> list[TrainConfig]:
  """The runs of :func:`compare`, each checked (nothing is trained yet).

  Raises:
    ValueError: for an unknown optimizer, a learning rate or multiplier that is not a
      finite number > 0, or a bad setting of any run.
  """
  if not optimizers:
    raise ValueError(f"{name('optimizer')}: give at least one optimizer.")
  for opt in optimizers:
    validation.check_choice(name("optimizer"), opt, opt_lib.OPTIMIZERS)
  check_no_repeats(name("optimizer"), optimizers)
  for opt, lr in (lrs or {}).items():
    if opt not in opt_lib.OPTIMIZERS:
      raise ValueError(f"{name('lr')} {opt}={lr:g}: {opt!r} is not an optimizer; valid "
                       f"choices: {', '.join(opt_lib.OPTIMIZERS)}.")
    if opt not in optimizers:  # it would be silently unused
      raise ValueError(f"{name('lr')} {opt}={lr:g}: {opt} is not among the optimizers "
                       f"compared ({name('optimizer')} {' '.join(optimizers)}).")
    validation.check_range(f"{name('lr')} {opt}", lr, 0.0, low_open=True)
  if not lr_mults:
    raise ValueError(f"{name('lr_mults')}: give at least one multiplier.")
  for mult in lr_mults:
    validation.check_range(name("lr_mults"), mult, 0.0, low_open=True)
  check_no_repeats(name("lr_mults"), lr_mults)
  cfgs = [dataclasses.replace(base, optimizer=opt, resume=False, checkpoint_every=0,
                              out_dir=None,
                              lr=(lrs or {}).get(opt, opt_lib.default_lr(opt)) * mult)
          for opt in optimizers for mult in lr_mults]
  for c in cfgs:
    c.validate(name)
  return cfgs


def check_no_repeats(flag: str, values: Sequence,
                     why: str = "the same run would train twice") -> None:
  """Raises ``ValueError`` naming the values given more than once, and ``why`` it matters."""
  repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
  if repeated:
    raise ValueError(f"{flag}: {', '.join(repeated)} given more than once ({why}).")


def compare(base: TrainConfig, optimizers: Sequence[str], lr_mults: Sequence[float] = (1.0,),
            lrs: dict[str, float] | None = None, progress: bool = True,
            dataset: data_lib.Dataset | None = None,
            name: Callable[[str], str] = field_name) -> dict:
  """Trains ``base`` once per optimizer and learning-rate multiplier on the same data.

  Args:
    base: shared configuration (its ``optimizer`` and ``lr`` are replaced per run).
    optimizers: registry names.
    lr_mults: multipliers of each optimizer's base learning rate (a small sweep).
    lrs: base learning rate per optimizer (default: the registry's tiny defaults).
    progress: progress bars.
    dataset: an already loaded dataset, else ``base.data``.
    name: how configuration fields are named in error messages.

  Returns:
    ``{"runs": [result, ...], "best": {optimizer: result}}``; written with a table and a
    plot into ``base.out_dir`` when set.
  """
  cfgs = sweep_configs(base, optimizers, lr_mults, lrs, name)
  dataset = dataset if dataset is not None else data_lib.load_dataset(base.data)
  base.check_dataset(dataset, name)
  check_out_dir(dataclasses.replace(base, resume=False), name)
  runs = [train(c, dataset, progress=progress, name=name) for c in cfgs]
  best = {}
  for r in runs:
    opt = r["config"]["optimizer"]
    if opt not in best or reports.sort_key(r) < reports.sort_key(best[opt]):
      best[opt] = r
  if base.out_dir and jax.process_index() == 0:
    write_reports(base.out_dir, runs, title="ortho-optax compare", best=best)
  return {"runs": runs, "best": best}
