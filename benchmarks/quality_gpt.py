"""Do the orthogonalized optimizers train better? Validation loss per step and per second.

The study of issue 19 on one GPU, in blocks that each fit one 10-minute device call: every
optimizer family gets a short learning-rate sweep, then a full run at its best rate, then
a second seed for the best three (and the reference, AdamW); a CPU block merges everything
into a report. The model is the trainer's (``ortho_optax.models``: the same
``TrainConfig``, model, optimizer, schedule, compiled ``TrainStep``, batch sampler,
prefetcher and evaluation as ``ortho-optax train``); the data by default the byte-level
standard-library corpus (``--data stdlib``, :mod:`ortho_optax.models.corpus`), which needs
no download.

Blocks:
  ``--block sweep``: for each of ``--optimizers``, ``--sweep-steps`` steps at every lr of
    its grid (``--lrs NAME=LR,LR,...``, else its centre lr × ``--lr-mults``).
  ``--block full``: ``--steps`` steps at each optimizer's best sweep lr (read from
    ``--lr-from``, or ``--lrs NAME=LR``) for every seed of ``--seeds``. ``--top N`` instead
    of ``--optimizers``: the N optimizers with the lowest final validation loss among the
    finished full runs, plus the reference.
  ``--block report`` (CPU): merges the run files of ``--inputs`` and writes the report.
  ``--plan``: prints the device calls of the whole study with their estimated minutes on
    an H200, from measured step times (``--step-ms``; else the runs already in
    ``--prior``; else ``benchmarks/results/bench_gpt*.json`` and the ratios to AdamW of
    ``bench_user_loop_h200.json``).

Each run writes ``<out>/<block>/<name>.json`` after every evaluation (status
``running``) and once more at its end (``done`` or ``diverged``), so a cut call loses at
most the run in progress. A run is skipped when a finished result of the same settings
(the trainer's ``run_record``, data hash included) is in ``--out`` or ``--prior``: the
same command run again continues where a cut call stopped. ``--budget-s`` starts no run
that its estimated time would carry past that many seconds since the start. A run that
raises is recorded in ``<out>/errors/<name>.json`` and the block goes on (and exits 1);
``<out>/status-<block>.json`` lists the runs that ran, were skipped, failed or are left.

Every run file is the trainer's result dict (``config``, ``data`` with its sha256,
``train_loss`` and ``val_loss`` as ``[step, loss]``, ``final_val_loss``, ``timings``,
``machine``...) plus ``val_seconds`` (training seconds at each validation: the clock of
the training steps, compilation and evaluation excluded), ``corpus`` (the
standard-library corpus' files, sizes and manifest hash), ``study`` (block, optimizer,
lr, seed), ``record`` and ``status``.

The report (``quality_gpt.md``, ``quality_gpt.json``, ``val_vs_steps.png``,
``val_vs_seconds.png``, ``lr_sweep.png``) gives, for each optimizer at its chosen lr
(seeds averaged), the final validation loss, the step and the second at which its curve
first reaches AdamW's final validation loss (linear between evaluations) and their ratios
to AdamW's, the loss at equal wall-clock, and tokens/s; and checks the three goals of the
issue: muon reaches AdamW's final loss in at most 0.7 of AdamW's steps; turbo_muon ends
within 0.01 nats of muon; the order at equal wall-clock is the order at equal steps.

  python benchmarks/quality_gpt.py --plan
  python benchmarks/quality_gpt.py --block sweep --optimizers adamw muon --out $OUT/quality_gpt
  python benchmarks/quality_gpt.py --block full --optimizers adamw muon --out $OUT/quality_gpt
  python benchmarks/quality_gpt.py --block full --top 3 --seeds 1 --out $OUT/quality_gpt
  python benchmarks/quality_gpt.py --block report --out benchmarks/results/quality_gpt
"""

from __future__ import annotations

import argparse
import dataclasses
import glob as globlib
import json
import math
import os
import pathlib
import shlex
import statistics
import sys
import time
import traceback
from typing import Iterable, Sequence

import jax
import numpy as np
from flax import nnx

from ortho_optax.models import config as config_lib
from ortho_optax.models import data as data_lib
from ortho_optax.models import gpt
from ortho_optax.models import optimizers as opt_lib
from ortho_optax.models import reports
from ortho_optax.models import step as step_lib
from ortho_optax.models import train as train_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
#: Where the study's run files are kept between calls (and where the report goes).
RESULTS = "benchmarks/results/quality_gpt"
#: One optimizer per family, in the issue's order.
STUDY_OPTIMIZERS = ("adamw", "muon", "turbo_muon", "normuon", "adamuon", "aurora", "oadamw",
                    "auon")
REFERENCE = "adamw"
#: The sweep's grid: each optimizer's centre lr times these.
GRID_MULTS = (1 / 3, 1.0, 3.0)
#: Centre of the sweep for the GPT-2-small-sized model, per optimizer: the update's scale
#: on 768-to-3072-wide matrices (a starting point for the sweep, which decides).
SMALL_LR_CENTERS = {
    "adamw": 1e-3,  # GPT-3's 125M model: 6e-4 at 0.5M-token batches
    "muon": 0.02,  # Keller's shape scaling sqrt(max(1, out/in)), as on the tiny model
    "turbo_muon": 0.02,
    "aurora": 0.02,
    "normuon": 1e-3,  # update RMS ~1 (spectral scaling): Adam-sized
    # Sign-like update times sqrt(max(out, in)) = 28..55 here (11..22 tiny). Swept on the
    # H200 from 2e-4 down to 7.4e-6 (best, the lowest tried): centred there so the default
    # grid brackets it.
    "adamuon": 7.4e-6,
    "oadamw": 3e-3,  # Adam on the orthogonalized gradient; also embeddings and head
    "auon": 5.5,  # SGD-sized (the momentum itself); the tiny model's, not rescaled
}
#: The issue's goals.
MUON_STEP_RATIO = 0.7
TURBO_GAP_NATS = 0.01
#: Final validation loss above the curve's own minimum by more than this counts as overfitting
#: in the equal-time goal's explanation (nats; about twice the seed spread of muon's runs).
OVERFIT_NATS = 0.01
#: Estimates of the plan where nothing was measured.
DEFAULT_COMPILE_S = 30.0  # step + evaluation compile, model init (bench_user_loop: 6-25 s)
DEFAULT_STARTUP_S = 45.0  # interpreter, JAX and GPU start-up, corpus
DEFAULT_CALL_S = 540.0  # of a 600-second device call (imports and start-up before it)


@dataclasses.dataclass(frozen=True)
class StudyPreset:
  """The study's defaults for one model size (each overridable by a flag)."""

  model_preset: str
  batch_size: int
  sweep_steps: int
  steps: int
  sweep_eval_every: int
  eval_every: int
  eval_batches: int
  lr_centers: dict | None  # None: the trainer's tiny-preset defaults


PRESETS = {
    # GPT-2 small (12 x 768) on the byte-level corpus: 32 x 1024 tokens a step; 1000 steps
    # are 4.4 epochs of CPython 3.12's `stdlib` training side (7.5 MB).
    "small": StudyPreset("small", 32, 250, 1000, 25, 50, 16, SMALL_LR_CENTERS),
    # The trainer's tiny model: CPU checks of the whole pipeline.
    "tiny": StudyPreset("tiny", 16, 40, 80, 10, 10, 4, None),
}


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run of the study."""

  block: str
  optimizer: str
  lr: float
  seed: int

  @property
  def name(self) -> str:
    return f"{self.block}-{self.optimizer}-lr{self.lr:g}-seed{self.seed}"


class Study:
  """The settings shared by every run, from the command line and the preset."""

  def __init__(self, args):
    p = PRESETS[args.preset]

    def given(value, default):  # a flag left out takes the preset's value
      return default if value is None else value

    self.preset = args.preset
    self.model_preset = p.model_preset
    self.data = args.data
    self.batch_size = given(args.batch_size, p.batch_size)
    self.seq_len = args.seq_len
    self.steps = {"sweep": given(args.sweep_steps, p.sweep_steps),
                  "full": given(args.steps, p.steps)}
    self.eval_every = {"sweep": given(args.sweep_eval_every, p.sweep_eval_every),
                       "full": given(args.eval_every, p.eval_every)}
    self.eval_batches = given(args.eval_batches, p.eval_batches)
    self.warmup = args.warmup
    self.adam_lr = args.adam_lr
    self.lr_centers = p.lr_centers
    self.model = {k: v for k, v in (("num_layers", args.num_layers),
                                    ("model_dim", args.model_dim),
                                    ("num_heads", args.num_heads)) if v is not None}

  def center_lr(self, optimizer: str) -> float:
    if self.lr_centers is not None and optimizer in self.lr_centers:
      return self.lr_centers[optimizer]
    return opt_lib.default_lr(optimizer)

  def model_overrides(self, dataset: data_lib.Dataset) -> dict:
    """The preset's model with the vocabulary cut to the data's (a multiple of 64)."""
    preset_vocab = gpt.PRESETS[self.model_preset].vocab_size
    vocab = min(preset_vocab, -(-dataset.vocab_size // 64) * 64)
    return {**self.model, "vocab_size": vocab}

  def config(self, spec: RunSpec, dataset: data_lib.Dataset) -> config_lib.TrainConfig:
    every = self.eval_every[spec.block]
    cfg = config_lib.TrainConfig(
        preset=self.model_preset, model=self.model_overrides(dataset), data=self.data,
        optimizer=spec.optimizer, lr=spec.lr, adam_lr=self.adam_lr,
        steps=self.steps[spec.block], batch_size=self.batch_size, seq_len=self.seq_len,
        warmup_steps=self.warmup, schedule="cosine", seed=spec.seed, eval_every=every,
        eval_batches=self.eval_batches, log_every=every)
    cfg.validate(_flag)
    cfg.check_dataset(dataset, _flag)
    return cfg

  def setup_key(self, dataset: data_lib.Dataset) -> str:
    """:func:`setup_key` of this study's runs."""
    cfg = self.config(RunSpec("full", REFERENCE, self.center_lr(REFERENCE), 0), dataset)
    return setup_key({"config": dataclasses.asdict(cfg) | {
        "model_config": dataclasses.asdict(cfg.model_config())},
                      "data": {"sha256": dataset.sha256}})


def _flag(field: str) -> str:
  return {"steps": "--steps/--sweep-steps", "batch_size": "--batch-size",
          "seq_len": "--seq-len", "eval_every": "--eval-every/--sweep-eval-every",
          "eval_batches": "--eval-batches", "warmup_steps": "--warmup", "adam_lr": "--adam-lr",
          "lr": "--lrs", "num_layers": "--num-layers", "model_dim": "--model-dim",
          "num_heads": "--num-heads", "data": "--data"}.get(field, field)


def corpus_info(spec: str) -> dict | None:
  """The standard-library corpus' description for a ``stdlib[:part]`` data spec, else None."""
  kind, _, part = spec.partition(":")
  if kind != "stdlib":
    return None
  from ortho_optax.models import corpus  # pylint: disable=import-outside-toplevel
  info = corpus.build_stdlib(part or "lib").describe()
  info.pop("skipped")
  return info


# ---------------------------------------------------------------------------------------
# Run files.


def write_json(path: pathlib.Path, payload: dict) -> None:
  """Writes ``payload`` atomically (a cut call never leaves half a file)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(reports.jsonable(payload), indent=1))
  os.replace(tmp, path)


def load_runs(dirs: Iterable[str | os.PathLike]) -> list[dict]:
  """Every run file (``<dir>/<block>/*.json`` with a ``study`` entry) under ``dirs``."""
  runs = []
  for d in dirs:
    for path in sorted(globlib.glob(os.path.join(os.fspath(d), "*", "*.json"))):
      try:
        r = json.loads(pathlib.Path(path).read_text())
      except (OSError, json.JSONDecodeError):
        continue
      if isinstance(r, dict) and "study" in r:
        r["path"] = path
        runs.append(r)
  return runs


def finished(runs: Sequence[dict], spec: RunSpec, record: dict) -> dict | None:
  """The finished run of ``spec`` with exactly ``record``'s settings among ``runs``."""
  for r in runs:
    if (r["study"]["name"] == spec.name and r["status"] in ("done", "diverged")
        and not config_lib.differences(r["record"], reports.jsonable(record))):
      return r
  return None


def setup_key(r: dict) -> str:
  """What every run of one study shares: model, data, batch, schedule, AdamW branch."""
  c = r["config"]
  keep = ("preset", "model_config", "batch_size", "warmup_steps", "schedule",
          "final_lr_frac", "adam_lr", "weight_decay", "opt_args", "eval_batches")
  return json.dumps({**{k: c.get(k) for k in keep}, "data": r["data"]["sha256"]},
                    sort_keys=True)


# ---------------------------------------------------------------------------------------
# Training.


def train_run(cfg: config_lib.TrainConfig, dataset: data_lib.Dataset, spec: RunSpec,
              path: pathlib.Path, corpus: dict | None) -> dict:
  """Trains one run with the trainer's parts, writing ``path`` after every evaluation.

  The loop is the trainer's without checkpoints: the batches come from the prefetcher,
  the host waits for the device only at evaluations (where it also reads the train
  losses), and one clock, paused around evaluations, measures the training steps.

  Returns:
    The run's result (see the module docstring).
  """
  model, optimizer = train_lib.init_model_and_optimizer(cfg)
  seq_len = model.config.seq_len
  sampler = data_lib.BatchSampler(dataset.train, cfg.batch_size, seq_len, cfg.seed)
  put = train_lib.batch_placer()
  step = step_lib.TrainStep(model, optimizer, *put(*sampler(0)))
  tokens = cfg.batch_size * seq_len
  result = {
      "study": dataclasses.asdict(spec) | {"name": spec.name}, "status": "running",
      "record": config_lib.run_record(cfg, dataset),
      "config": dataclasses.asdict(cfg) | {"lr": cfg.peak_lr(),
                                            "model_config": dataclasses.asdict(model.config)},
      "data": dataset.describe(), "corpus": corpus, "num_params": gpt.count_params(model),
      "train_loss": [], "val_loss": [], "val_seconds": [], "final_val_loss": None,
      "final_train_loss": None, "completed_steps": 0, "resumed_from": None,
      "diverged_at": None, "machine": reports.machine_info(),
      "timings": {"compile_s": step.compile_s, "eval_s": 0.0, "train_s": 0.0,
                  "steps_timed": 0, "step_s": None, "median_step_s": None,
                  "tokens_per_s": None}}
  clock = train_lib.Clock()
  pending, interval_s, last = [], [], (0, 0.0)
  label = f"[{spec.block} {spec.optimizer} lr={spec.lr:g} seed {spec.seed}]"
  with data_lib.Prefetcher(sampler, range(cfg.steps), put) as batches:
    clock.start()
    for s in range(cfg.steps):
      pending.append((s, step(*next(batches))))
      done = s + 1
      if done % cfg.eval_every and done != cfg.steps:
        continue
      step.wait()
      clock.pause()
      seconds = clock.seconds
      values = jax.device_get([loss for _, loss in pending])
      read = [(s_, float(v)) for (s_, _), v in zip(pending, values)]
      pending = []
      result["train_loss"] += read
      if last[0]:  # the first interval holds the warm-up
        interval_s.append((seconds - last[1]) / (done - last[0]))
      last = (done, seconds)
      t = result["timings"]
      t.update({"train_s": seconds, "steps_timed": done, "step_s": seconds / done,
                "median_step_s": statistics.median(interval_s) if interval_s else seconds / done,
                "tokens_per_s": tokens * done / seconds if seconds else None})
      result["completed_steps"] = done
      bad = [s_ for s_, loss in read if not math.isfinite(loss)]
      val = None
      if not bad:
        t0 = time.perf_counter()
        val = train_lib.evaluate(step, dataset.val, cfg, seq_len, put)
        t["eval_s"] += time.perf_counter() - t0
      if bad or not math.isfinite(val):
        result["diverged_at"] = bad[0] if bad else done
        print(f"{label} non-finite loss at step {result['diverged_at']}: stopping this run.",
              flush=True)
        break
      result["val_loss"].append((done, val))
      result["val_seconds"].append(seconds)
      print(f"{label} step {done}/{cfg.steps} val {val:.4f} train {read[-1][1]:.4f} "
            f"({seconds:.1f} s, {1e3 * t['median_step_s']:.1f} ms/step)", flush=True)
      write_json(path, result)
      clock.start()
  val = result["val_loss"]
  result["final_val_loss"] = val[-1][1] if val and val[-1][0] == cfg.steps else None
  # The trainer's "last 10%" mean.
  result["final_train_loss"] = train_lib._tail_mean(  # pylint: disable=protected-access
      result["train_loss"])
  result["status"] = "diverged" if result["diverged_at"] is not None else "done"
  write_json(path, result)
  return result


def eval_cost_s(steps: int, eval_every: int, eval_batches: int, step_s: float) -> float:
  """Seconds of a run's evaluations: a forward pass per batch is about a third of a step."""
  evals = steps // eval_every + (steps % eval_every != 0)
  return evals * eval_batches * step_s / 3


def estimate_run_s(cfg: config_lib.TrainConfig, step_s: float, fixed_s: float) -> float:
  """Seconds of one run: ``fixed_s`` (compilation), the steps, the evaluations."""
  return (fixed_s + cfg.steps * step_s
          + eval_cost_s(cfg.steps, cfg.eval_every, cfg.eval_batches, step_s))


def measured_costs(r: dict) -> tuple[float, float] | None:
  """``(step_s, fixed_s)`` of a run file: its median step, and its compilation plus the
  evaluation time beyond :func:`eval_cost_s` (the evaluation's compilation)."""
  t, c = r["timings"], r["config"]
  step_s = t.get("median_step_s")
  if not step_s:
    return None
  evals_s = eval_cost_s(r["completed_steps"], c["eval_every"], c["eval_batches"], step_s)
  return step_s, t["compile_s"] + max(0.0, t["eval_s"] - evals_s)


def run_block(study: Study, specs: Sequence[RunSpec], out: pathlib.Path,
              prior: Sequence[str], budget_s: float | None, start: float,
              dataset: data_lib.Dataset) -> dict:
  """Runs ``specs`` in order, skipping finished ones, within ``budget_s`` of ``start``.

  A run that raises is recorded in ``<out>/errors/<name>.json`` and the block goes on.

  Returns:
    ``{"ran", "skipped", "failed", "left"}``: lists of run names.
  """
  corpus = corpus_info(study.data)
  known = load_runs([*prior, out])
  # Measured (step_s, fixed_s) per optimizer, of this call's and earlier calls' runs of
  # this study; the estimate takes the largest of each.
  measured: dict[str, list[tuple[float, float]]] = {}
  key = study.setup_key(dataset)
  for r in known:
    if setup_key(r) == key and measured_costs(r):
      measured.setdefault(r["study"]["optimizer"], []).append(measured_costs(r))
  status = {"ran": [], "skipped": [], "failed": [], "left": []}
  for i, spec in enumerate(specs):
    cfg = study.config(spec, dataset)
    done = finished(known, spec, config_lib.run_record(cfg, dataset))
    if done is not None:
      print(f"[{spec.name}] finished already ({done['path']}): skipped.", flush=True)
      status["skipped"].append(spec.name)
      continue
    times = measured.get(spec.optimizer) or [x for v in measured.values() for x in v]
    if budget_s is not None and times:
      need = estimate_run_s(cfg, max(x[0] for x in times), max(x[1] for x in times))
      if time.perf_counter() - start + need > budget_s:
        status["left"] = [s.name for s in specs[i:]]
        print(f"--budget-s {budget_s:g}: {spec.name} needs about {need:.0f} s more; left "
              f"for the next call: {', '.join(status['left'])}. Run the same command again "
              "to continue.", flush=True)
        break
    try:
      r = train_run(cfg, dataset, spec, out / spec.block / f"{spec.name}.json", corpus)
    except Exception as e:  # pylint: disable=broad-except
      # One optimizer's failure (a compile error, memory) must not cost the others' runs.
      error = f"{type(e).__name__}: {e}"
      print(f"[{spec.name}] failed: {error}", flush=True)
      write_json(out / "errors" / f"{spec.name}.json",
                 {"run": spec.name, "error": error, "traceback": traceback.format_exc()})
      status["failed"].append(spec.name)
      continue
    if measured_costs(r):
      measured.setdefault(spec.optimizer, []).append(measured_costs(r))
    status["ran"].append(spec.name)
  return status


def parse_lrs(items: Sequence[str]) -> dict[str, list[float]]:
  """``["muon=0.01,0.02", "adamw=1e-3"]`` -> ``{"muon": [0.01, 0.02], "adamw": [0.001]}``."""
  out = {}
  for item in items:
    name, sep, values = item.partition("=")
    if not sep or not values:
      raise ValueError(f"--lrs {item!r} must look like NAME=LR[,LR...], e.g. muon=0.01,0.02.")
    opt_lib.resolve(name)
    try:
      lrs = [float(v) for v in values.split(",")]
    except ValueError:
      raise ValueError(f"--lrs {item!r}: {values!r} is not a list of numbers.") from None
    for lr in lrs:
      if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lrs {item!r}: learning rates must be finite and > 0.")
    out[name] = lrs
  return out


def sweep_specs(study: Study, optimizers: Sequence[str], lrs: dict[str, list[float]],
                mults: Sequence[float]) -> list[RunSpec]:
  return [RunSpec("sweep", opt, lr, 0) for opt in optimizers
          for lr in lrs.get(opt) or [float(f"{study.center_lr(opt) * m:.3g}") for m in mults]]


# ---------------------------------------------------------------------------------------
# Learning rates and rankings from finished runs.


def final_loss(r: dict) -> float:
  v = r.get("final_val_loss")
  return v if r["status"] == "done" and v is not None and math.isfinite(v) else math.inf


def pick_lrs(runs: Sequence[dict]) -> dict[str, dict]:
  """Per optimizer, the sweep lr of the lowest final validation loss.

  Returns:
    ``{optimizer: {"lr", "final_val_loss", "grid": [[lr, loss or None], ...], "edge"}}``;
    ``edge`` is ``"lowest"`` / ``"highest"`` when the best lr is at the end of its grid
    (the sweep should go further that way), else None. Optimizers whose every run
    diverged are left out.
  """
  by_opt: dict[str, dict[float, dict]] = {}
  for r in runs:
    if r["study"]["block"] == "sweep" and r["status"] in ("done", "diverged"):
      by_opt.setdefault(r["study"]["optimizer"], {})[r["study"]["lr"]] = r
  out = {}
  for opt, by_lr in sorted(by_opt.items()):
    grid = sorted(by_lr)
    best = min(grid, key=lambda lr: final_loss(by_lr[lr]))
    if not math.isfinite(final_loss(by_lr[best])):
      continue
    edge = None
    if len(grid) > 1 and best == grid[0]:
      edge = "lowest"
    elif len(grid) > 1 and best == grid[-1]:
      edge = "highest"
    out[opt] = {"lr": best, "final_val_loss": final_loss(by_lr[best]), "edge": edge,
                "grid": [[lr, by_lr[lr]["final_val_loss"] if math.isfinite(final_loss(by_lr[lr]))
                          else None] for lr in grid]}
  return out


def top_optimizers(runs: Sequence[dict], n: int, reference: str = REFERENCE) -> list[str]:
  """The ``n`` optimizers of lowest mean final validation loss among finished full runs,
  then ``reference``."""
  finals: dict[str, list[float]] = {}
  for r in runs:
    if r["study"]["block"] == "full" and r["status"] == "done":
      finals.setdefault(r["study"]["optimizer"], []).append(final_loss(r))
  ranked = sorted((o for o in finals if o != reference), key=lambda o: np.mean(finals[o]))
  if not ranked:
    raise ValueError("--top needs finished full runs (run --block full first).")
  return ranked[:n] + [reference]


# ---------------------------------------------------------------------------------------
# Analysis (pure functions of the curves).


def first_crossing(xs: Sequence[float], ys: Sequence[float], target: float) -> float | None:
  """The first ``x`` at which the piecewise-linear curve ``(xs, ys)`` reaches ``target``
  from above (``y <= target``); ``xs[0]`` when it starts there; None when it never does."""
  for i, (x, y) in enumerate(zip(xs, ys)):
    if y <= target:
      if i == 0:
        return float(x)
      x0, y0 = xs[i - 1], ys[i - 1]
      return float(x0 + (y0 - target) / (y0 - y) * (x - x0))
  return None


def value_at(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
  """The piecewise-linear curve at ``x``; None outside ``[xs[0], xs[-1]]``."""
  if not len(xs) or x < xs[0] or x > xs[-1]:
    return None
  return float(np.interp(x, xs, ys))


@dataclasses.dataclass
class Curve:
  """One optimizer's validation curve at one lr, averaged over its seeds.

  ``steps`` are the evaluation steps every seed has; ``seconds`` and ``loss`` their means.
  """

  optimizer: str
  lr: float
  seeds: list[int]
  steps: np.ndarray
  seconds: np.ndarray
  loss: np.ndarray
  finals: list[float]
  final_train: float | None
  step_ms: float | None
  tokens_per_s: float | None

  @property
  def final(self) -> float:
    return float(np.mean(self.finals))

  @property
  def spread(self) -> float:
    return float(max(self.finals) - min(self.finals))


def mean_curve(runs: Sequence[dict]) -> Curve:
  """The seed average of finished full runs of one optimizer at one lr."""
  common = sorted(set.intersection(*[{s for s, _ in r["val_loss"]} for r in runs]))
  loss, secs = [], []
  for r in runs:
    by_step = {s: (l, t) for (s, l), t in zip(r["val_loss"], r["val_seconds"])}
    loss.append([by_step[s][0] for s in common])
    secs.append([by_step[s][1] for s in common])
  ms = [1e3 * r["timings"]["median_step_s"] for r in runs if r["timings"].get("median_step_s")]
  tps = [r["timings"]["tokens_per_s"] for r in runs if r["timings"].get("tokens_per_s")]
  train = [r["final_train_loss"] for r in runs if r.get("final_train_loss") is not None]
  return Curve(runs[0]["study"]["optimizer"], runs[0]["study"]["lr"],
               sorted(r["study"]["seed"] for r in runs), np.asarray(common, float),
               np.mean(secs, axis=0), np.mean(loss, axis=0), [final_loss(r) for r in runs],
               float(np.mean(train)) if train else None,
               float(np.mean(ms)) if ms else None, float(np.mean(tps)) if tps else None)


def full_curves(runs: Sequence[dict], lrs: dict[str, dict]) -> tuple[dict[str, Curve], list]:
  """Each optimizer's curve at its chosen lr: the sweep's pick when full runs exist at it,
  else the full lr of the lowest mean final loss.

  Returns:
    ``(curves, diverged)``: curves by optimizer, and ``(optimizer, lr, seed, step)`` of
    diverged full runs.
  """
  groups: dict[str, dict[float, list[dict]]] = {}
  diverged = []
  for r in runs:
    if r["study"]["block"] != "full":
      continue
    st = r["study"]
    if r["status"] == "diverged":
      diverged.append((st["optimizer"], st["lr"], st["seed"], r["diverged_at"]))
    elif r["status"] == "done" and math.isfinite(final_loss(r)):
      groups.setdefault(st["optimizer"], {}).setdefault(st["lr"], []).append(r)
  curves = {}
  for opt, by_lr in groups.items():
    pick = lrs.get(opt, {}).get("lr")
    lr = pick if pick in by_lr else min(
        by_lr, key=lambda x: np.mean([final_loss(r) for r in by_lr[x]]))
    curves[opt] = mean_curve(by_lr[lr])
  return curves, diverged


def analyse(curves: dict[str, Curve], reference: str = REFERENCE) -> dict:
  """The report's numbers: per optimizer and the issue's three goals.

  Every ratio is to the reference's own crossing of its final loss (its last step when
  its curve falls all the way). Equal wall-clock: each curve at the training seconds of
  the fastest finished curve.
  """
  ref = curves.get(reference)
  rows = {}
  target = ref.final if ref else None
  ref_steps = first_crossing(ref.steps, ref.loss, target) if ref else None
  ref_secs = first_crossing(ref.seconds, ref.loss, target) if ref else None
  budget = min(c.seconds[-1] for c in curves.values()) if curves else None
  for opt, c in curves.items():
    steps_to = first_crossing(c.steps, c.loss, target) if ref else None
    secs_to = first_crossing(c.seconds, c.loss, target) if ref else None
    rows[opt] = {
        "lr": c.lr, "seeds": c.seeds, "final_val_loss": c.final, "finals": c.finals,
        "seed_spread": c.spread, "final_train_loss": c.final_train,
        "steps": float(c.steps[-1]), "seconds": float(c.seconds[-1]),
        "steps_to_reference": steps_to,
        "step_ratio": steps_to / ref_steps if steps_to is not None and ref_steps else None,
        "seconds_to_reference": secs_to,
        "time_ratio": secs_to / ref_secs if secs_to is not None and ref_secs else None,
        "val_at_equal_time": value_at(c.seconds, c.loss, budget),
        "lowest_val_loss": float(np.min(c.loss)),
        "lowest_val_step": float(c.steps[int(np.argmin(c.loss))]),
        "step_ms": c.step_ms, "tokens_per_s": c.tokens_per_s}
  goals = {"muon_step_ratio": None, "turbo_gap": None, "equal_time_order": None}
  if "muon" in rows and ref:
    ratio = rows["muon"]["step_ratio"]
    goals["muon_step_ratio"] = {"value": ratio, "threshold": MUON_STEP_RATIO,
                                "steps": rows["muon"]["steps_to_reference"],
                                "reference_steps": ref_steps,
                                "passed": ratio is not None and ratio <= MUON_STEP_RATIO}
  if "muon" in rows and "turbo_muon" in rows:
    gap = rows["turbo_muon"]["final_val_loss"] - rows["muon"]["final_val_loss"]
    goals["turbo_gap"] = {"value": gap, "threshold": TURBO_GAP_NATS,
                          "muon_seed_spread": rows["muon"]["seed_spread"],
                          "turbo_seed_spread": rows["turbo_muon"]["seed_spread"],
                          "passed": abs(gap) <= TURBO_GAP_NATS}
  if len(rows) > 1:
    by_steps = sorted(rows, key=lambda o: rows[o]["final_val_loss"])
    # A curve with no evaluation yet at the budget ranks last.
    by_time = sorted(rows, key=lambda o: (rows[o]["val_at_equal_time"] is None,
                                          rows[o]["val_at_equal_time"] or 0.0))
    swaps = [(a, b) for i, a in enumerate(by_steps) for b in by_steps[i + 1:]
             if by_time.index(a) > by_time.index(b)]
    # An optimizer that moves up at equal time while its validation loss ends above its
    # own minimum was read before it began to overfit, not because it is faster.
    rising = sorted({a for pair in swaps for a in pair
                     if by_time.index(a) < by_steps.index(a)
                     and rows[a]["final_val_loss"] - rows[a]["lowest_val_loss"]
                     > OVERFIT_NATS})
    goals["equal_time_order"] = {"budget_s": budget, "order_at_equal_steps": by_steps,
                                 "order_at_equal_time": by_time, "swaps": swaps,
                                 "rising_at_the_end": rising, "passed": not swaps}
  return {"reference": reference, "target": target, "reference_steps_to_target": ref_steps,
          "reference_seconds_to_target": ref_secs, "rows": rows, "goals": goals}


# ---------------------------------------------------------------------------------------
# Report.


def _num(v, fmt: str, none: str = "-") -> str:
  return none if v is None else format(v, fmt)


def report_markdown(summary: dict, curves: dict[str, Curve], lrs: dict, diverged: list,
                    setup: dict | None, ignored: int, unfinished: int = 0) -> str:
  """The Markdown report of :func:`analyse`'s ``summary``."""
  g, rows, ref = summary["goals"], summary["rows"], summary["reference"]
  lines = ["# Do they train better? Validation loss per step and per second\n"]
  if setup:
    c, d, m = setup["config"], setup["data"], setup["machine"]
    mc = c["model_config"]
    corpus = setup.get("corpus") or {}
    tokens = c["batch_size"] * mc["seq_len"]
    epochs = (c["steps"] * tokens / d["train_tokens"]) if d["train_tokens"] else None
    source = (f" (Python {corpus['python']} standard library, {corpus['files']} files, "
              f"manifest sha256 `{corpus['manifest_sha256'][:16]}…`)" if corpus else "")
    lines.append(
        f"Model: `{c['preset']}` preset, {mc['num_layers']} × {mc['model_dim']} (layers × "
        f"width), {mc['num_heads']} heads, vocabulary {mc['vocab_size']}, {setup['num_params']:,} "
        f"parameters. Data: `{d['name']}`{source}: {d['train_tokens']:,} training / "
        f"{d['val_tokens']:,} validation tokens (split by file), sha256 "
        f"`{d['sha256'][:16]}…`. Full runs: {c['steps']} steps × {c['batch_size']} × "
        f"{mc['seq_len']} tokens ({_num(epochs, '.2g')} epochs of the training side), "
        f"warm-up {c['warmup_steps']:g} then cosine to {c['final_lr_frac']:g}; embeddings "
        f"and head on AdamW (lr {c['adam_lr']:g}) in every hybrid optimizer. Validation: "
        f"the same {c['eval_batches']} × {c['batch_size']} windows every time, nats/token. "
        f"Machine: {m['device']} ({m['backend']}), JAX {m['jax']}, {m['date']}.\n")
  lines += ["## The goals\n", "| goal | measured | target | result |", "|---|---|---|---|"]

  def verdict(goal):
    return "not measured" if goal is None else ("**pass**" if goal["passed"] else "**fail**")

  mg = g["muon_step_ratio"]
  lines.append(
      f"| muon reaches {ref}'s final validation loss in at most {MUON_STEP_RATIO:g} of "
      f"{ref}'s steps | "
      + ("-" if mg is None else
         f"{_num(mg['value'], '.3f', 'not reached')} ({_num(mg['steps'], '.0f', '-')} of "
         f"{_num(mg['reference_steps'], '.0f')} steps)")
      + f" | ≤ {MUON_STEP_RATIO:g} | {verdict(mg)} |")
  tg = g["turbo_gap"]
  lines.append(
      f"| turbo_muon ends within {TURBO_GAP_NATS:g} nats of muon | "
      + ("-" if tg is None else
         f"{tg['value']:+.4f} (seed spread: muon {tg['muon_seed_spread']:.4f}, turbo_muon "
         f"{tg['turbo_seed_spread']:.4f})")
      + f" | ≤ {TURBO_GAP_NATS:g} | {verdict(tg)} |")
  og = g["equal_time_order"]
  lines.append(
      "| at equal wall-clock the order is that of equal steps | "
      + ("-" if og is None else
         ("same order" if not og["swaps"] else
          "swapped: " + ", ".join(f"{a} / {b}" for a, b in og["swaps"]))
         + f" (at {og['budget_s']:.1f} s)"
         + "".join(f"; {o}'s validation loss rises from {rows[o]['lowest_val_loss']:.4f} "
                   f"at step {rows[o]['lowest_val_step']:.0f} to "
                   f"{rows[o]['final_val_loss']:.4f} at its end (overfitting), so it ranks "
                   "higher when read earlier" for o in og.get("rising_at_the_end", ())))
      + f" | same order | {verdict(og)} |")
  lines += [
      "", "## Full runs\n",
      f"Each optimizer at its chosen lr, seeds averaged. *Steps / seconds to {ref}'s final* "
      f"are where the curve first reaches {ref}'s final validation loss "
      f"({_num(summary['target'], '.4f')}), and the ratios are to {ref}'s own "
      f"({_num(summary['reference_steps_to_target'], '.0f')} steps, "
      f"{_num(summary['reference_seconds_to_target'], '.1f')} s). *At equal time*: the "
      "validation loss at the training seconds of the fastest run. *Lowest val*: the "
      "curve's minimum and its step (below the final loss where the model overfits).\n",
      f"| optimizer | lr | seeds | val loss | seed spread | lowest val (step) | train loss "
      f"(last 10%) | steps to {ref}'s final | ratio | seconds to {ref}'s final | ratio | "
      "val at equal time | ms / step | tokens / s |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for opt in sorted(rows, key=lambda o: rows[o]["final_val_loss"]):
    r = rows[opt]
    spread = r["seed_spread"] if len(r["seeds"]) > 1 else None
    lines.append(
        f"| {opt} | {r['lr']:.3g} | {', '.join(map(str, r['seeds']))} | "
        f"{r['final_val_loss']:.4f} | {_num(spread, '.4f')} | "
        f"{r['lowest_val_loss']:.4f} ({r['lowest_val_step']:.0f}) | "
        f"{_num(r['final_train_loss'], '.4f')} | "
        f"{_num(r['steps_to_reference'], '.0f', 'not reached')} | {_num(r['step_ratio'], '.3f')} | "
        f"{_num(r['seconds_to_reference'], '.1f', 'not reached')} | "
        f"{_num(r['time_ratio'], '.3f')} | {_num(r['val_at_equal_time'], '.4f')} | "
        f"{_num(r['step_ms'], '.1f')} | {_num(r['tokens_per_s'], ',.0f')} |")
  for opt, lr, seed, at in diverged:
    lines.append(f"| {opt} | {lr:.3g} | {seed} | diverged at step {at} | | | | | | | | | | |")
  if lrs:
    lines += ["", "## Learning-rate sweep\n",
              "Final validation loss of each sweep run (shorter runs, same schedule shape); "
              "the chosen lr in bold. *Edge*: the best lr is the grid's lowest or highest, so "
              "a wider sweep could find a better one.\n",
              "| optimizer | lr: val loss | chosen | edge |", "|---|---|---|---|"]
    for opt, p in lrs.items():
      cells = ", ".join(
          (f"**{lr:.3g}: {_num(v, '.4f', 'diverged')}**" if lr == p["lr"] else
           f"{lr:.3g}: {_num(v, '.4f', 'diverged')}") for lr, v in p["grid"])
      lines.append(f"| {opt} | {cells} | {p['lr']:.3g} | {p['edge'] or '-'} |")
  lines += [
      "", "## How to read it\n",
      f"- Each run follows its own warm-up and cosine schedule over the full length, so at "
      f"an intermediate step its learning rate has not decayed yet: the step at which a curve "
      f"reaches {ref}'s final loss is an upper bound of the steps a run scheduled to end "
      "there would need (the speedrun comparisons retrain at each length).",
      "- Seconds are the training steps' own time on the device (compilation and "
      "evaluation excluded), as measured in each run; the equal-time loss of a slower "
      "optimizer is read before its schedule ends, which counts against it.",
      "- Validation is on whole files that training never saw; the gap to the training "
      "loss shows how much of the corpus the model memorised over the epochs."]
  if ignored:
    lines.append(f"- {ignored} run file(s) of another setup (model, data or batch) were "
                 "left out.")
  if unfinished:
    lines.append(f"- {unfinished} unfinished run file(s) (a call cut in the middle of a run) "
                 "were left out.")
  return "\n".join(lines) + "\n"


def plot_curves(curves: dict[str, Curve], summary: dict, path: pathlib.Path, x: str) -> None:
  """Validation loss against ``x`` (``"steps"`` or ``"seconds"``), the reference's final
  loss dashed, zoomed onto the last 80% of training."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(8, 5))
  order = sorted(curves, key=lambda o: curves[o].final)
  tails = []
  for i, opt in enumerate(order):
    c = curves[opt]
    xs = c.steps if x == "steps" else c.seconds
    ax.plot(xs, c.loss, marker="o", ms=2.5, color=f"C{i % 10}",
            label=f"{opt} lr={c.lr:.3g} ({len(c.seeds)} seed{'s' * (len(c.seeds) > 1)})")
    tails.append(c.loss[xs >= 0.2 * xs[-1]])
  if summary["target"] is not None:
    ax.axhline(summary["target"], color="k", ls="--", lw=0.8,
               label=f"{summary['reference']}'s final loss")
  if tails:
    lo = min(float(t.min()) for t in tails if t.size)
    hi = max(float(t.max()) for t in tails if t.size)
    if hi > lo:
      ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
  ax.set(xlabel="step" if x == "steps" else "training seconds (compilation and evaluation "
         "excluded)", ylabel="validation loss (nats/token)",
         title=f"validation loss against {'steps' if x == 'steps' else 'wall-clock'}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_sweep(lrs: dict, path: pathlib.Path) -> None:
  """Final sweep validation loss against lr (log scale), one line per optimizer."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(8, 5))
  for i, (opt, p) in enumerate(lrs.items()):
    pts = [(lr, v) for lr, v in p["grid"] if v is not None]
    if pts:
      ax.plot(*zip(*pts), marker="o", color=f"C{i % 10}", label=opt)
  ax.set(xscale="log", xlabel="peak learning rate", ylabel="final validation loss",
         title="learning-rate sweep")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def block_report(inputs: Sequence[str], out: pathlib.Path) -> dict:
  """Merges the run files of ``inputs`` and writes the report into ``out``."""
  runs = load_runs(inputs)
  finished_runs = [r for r in runs if r["status"] in ("done", "diverged")]
  if not finished_runs:
    raise ValueError(f"no finished run files under {list(inputs)} (<dir>/sweep/*.json, "
                     "<dir>/full/*.json).")
  # One setup: that of most full runs (else of most runs); the others are left out.
  keys = [setup_key(r) for r in finished_runs if r["study"]["block"] == "full"] or [
      setup_key(r) for r in finished_runs]
  main_key = max(set(keys), key=keys.count)
  same = [r for r in finished_runs if setup_key(r) == main_key]
  lrs = pick_lrs(same)
  curves, diverged = full_curves(same, lrs)
  summary = analyse(curves)
  full = [r for r in same if r["study"]["block"] == "full"]
  setup = (full or same)[0]
  out.mkdir(parents=True, exist_ok=True)
  text = report_markdown(summary, curves, lrs, diverged, setup, len(finished_runs) - len(same),
                         len(runs) - len(finished_runs))
  (out / "quality_gpt.md").write_text(text)
  write_json(out / "quality_gpt.json",
             {"summary": summary, "lrs": lrs, "diverged": diverged,
              "runs": sorted(os.path.relpath(r["path"], out) for r in same)})
  if curves:
    plot_curves(curves, summary, out / "val_vs_steps.png", "steps")
    plot_curves(curves, summary, out / "val_vs_seconds.png", "seconds")
  if lrs:
    plot_sweep(lrs, out / "lr_sweep.png")
  print(text)
  return summary


# ---------------------------------------------------------------------------------------
# Plan.


def bench_step_times(results_dir: pathlib.Path, tokens: int) -> dict[str, tuple[float, str]]:
  """Measured ms per step of ``tokens``-token steps: ``{optimizer: (ms, source)}``.

  The newest ``bench_gpt*.json`` (the trainer's step, driver ``split``, bf16) gives its
  optimizers; ``bench_user_loop_h200.json`` gives every other one as that file's AdamW
  time times the optimizer's ratio to AdamW in the user's loop.
  """
  out: dict[str, tuple[float, str]] = {}
  newest = None
  for path in sorted(results_dir.glob("bench_gpt*.json")):
    try:
      d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
      continue
    rows = [r for r in d.get("results", []) if r.get("tokens_per_step") == tokens
            and r.get("driver", "split") == "split" and r.get("variant", "bf16") == "bf16"
            and r.get("median_ms")]
    date = d.get("machine", {}).get("date") or ""
    if rows and (newest is None or date > newest[0]):
      newest = (date, path.name, rows)
  if newest:
    for r in newest[2]:
      out.setdefault(r["optimizer"], (r["median_ms"], newest[1]))
  user = results_dir / "bench_user_loop_h200.json"
  if user.exists() and REFERENCE in out:
    for r in json.loads(user.read_text()).get("rows", []):
      name = r["optimizer"]
      if name not in out and r.get("vs_adamw") is not None and name in opt_lib.OPTIMIZERS:
        out[name] = (out[REFERENCE][0] * (1 + r["vs_adamw"]),
                     f"{out[REFERENCE][1]} adamw × bench_user_loop_h200.json ratio")
  return out


def plan_step_times(optimizers: Sequence[str], given: Sequence[str], runs: Sequence[dict],
                    tokens: int, results_dir: pathlib.Path) -> dict[str, tuple[float, str]]:
  """ms per step per optimizer: ``--step-ms`` > ``runs`` (of this study) > benchmark files."""
  out: dict[str, tuple[float, str]] = {}
  default = None
  for item in given:
    name, sep, ms = item.rpartition("=")
    if sep:
      out[name] = (float(ms), "--step-ms")
    else:
      default = (float(ms), "--step-ms")
  measured: dict[str, list[float]] = {}
  for r in runs:
    if measured_costs(r):
      measured.setdefault(r["study"]["optimizer"], []).append(1e3 * measured_costs(r)[0])
  bench = bench_step_times(results_dir, tokens)
  for opt in optimizers:
    if opt in out:
      continue
    if default:
      out[opt] = default
    elif opt in measured:
      out[opt] = (statistics.median(measured[opt]), "measured in --prior")
    elif opt in bench:
      out[opt] = bench[opt]
  missing = [o for o in optimizers if o not in out]
  if missing:
    if not out:
      raise ValueError(f"no step time for {missing}: pass --step-ms MS (or NAME=MS).")
    slowest = max(v[0] for v in out.values())
    for o in missing:
      out[o] = (slowest, "not measured: the slowest of the others")
  return out


def plan(args, study: Study, dataset: data_lib.Dataset) -> list[dict]:
  """The device calls of the study's runs not yet finished in ``--prior``, each within
  ``--call-s`` seconds (estimated).

  Returns:
    ``[{"block", "optimizers", "command", "estimate_s", "runs"}]``; also printed.
  """
  optimizers = list(args.optimizers)
  key = study.setup_key(dataset)
  known = [r for r in load_runs(args.prior) if setup_key(r) == key]
  cfg0 = study.config(RunSpec("full", REFERENCE, study.center_lr(REFERENCE), 0), dataset)
  tokens = cfg0.batch_size * cfg0.model_config().seq_len
  # The reference joins every top-N call, whether or not --optimizers names it.
  step_ms = plan_step_times(list(dict.fromkeys([*optimizers, REFERENCE])), args.step_ms,
                            known, tokens, REPO / "benchmarks" / "results")
  fixed: dict[str, list[float]] = {}
  for r in known:
    if measured_costs(r):
      fixed.setdefault(r["study"]["optimizer"], []).append(measured_costs(r)[1])
  lrs = parse_lrs(args.lrs)
  picked = pick_lrs(known)

  def estimate(spec: RunSpec) -> float:
    fixed_s = max(fixed[spec.optimizer]) if spec.optimizer in fixed else args.compile_s
    return estimate_run_s(study.config(spec, dataset), step_ms[spec.optimizer][0] / 1e3,
                          fixed_s)

  def todo(specs: Sequence[RunSpec]) -> list[RunSpec]:
    return [s for s in specs if finished(
        known, s, config_lib.run_record(study.config(s, dataset), dataset)) is None]

  def full_lr(opt: str) -> float:  # the sweep's pick once it is known (--lrs: the grid)
    return picked.get(opt, {"lr": study.center_lr(opt)})["lr"]

  common = study_flags(args)
  calls = []

  def pack(block: str, groups: list[tuple[str, list[RunSpec]]], flags) -> None:
    """Consecutive groups into calls of at most ``--call-s`` (a group is never split)."""
    current, cost = [], args.startup_s
    for opt, specs in groups:
      if not specs:
        continue
      need = sum(estimate(s) for s in specs)
      if current and cost + need > args.call_s:
        calls.append(_call(args, block, current, cost, flags, common))
        current, cost = [], args.startup_s
      current.append((opt, specs))
      cost += need
    if current:
      calls.append(_call(args, block, current, cost, flags, common))

  pack("sweep", [(o, todo(sweep_specs(study, [o], lrs, args.lr_mults))) for o in optimizers],
       lambda opts: _lrs_flag(lrs, opts))
  seeds = sorted(set(args.seeds))
  first, rest = seeds[:1], seeds[1:]
  first_runs = [(o, todo([RunSpec("full", o, full_lr(o), s) for s in first]))
                for o in optimizers]
  pack("full", first_runs, lambda opts: f"--seeds {' '.join(map(str, first))}")
  if rest and args.top:
    if any(specs for _, specs in first_runs):
      # The best are known once those runs are in: estimate with the slowest.
      top = sorted((o for o in optimizers if o != REFERENCE),
                   key=lambda o: -step_ms[o][0])[:args.top] + [REFERENCE]
    else:
      top = top_optimizers(known, args.top)
    specs = todo([RunSpec("full", o, full_lr(o), s) for o in top for s in rest])
    need = sum(estimate(s) for s in specs)
    repeats = math.ceil(need / (args.call_s - args.startup_s))
    command = _command(args, f"--block full --top {args.top} --seeds "
                       f"{' '.join(map(str, rest))}", common)
    for k in range(repeats):  # the same command again continues a call that ran out
      calls.append({"block": "full", "optimizers": [f"top {args.top}", REFERENCE],
                    "runs": (len(specs) if repeats == 1 else
                             f"{len(specs)} (part {k + 1}/{repeats})"),
                    "estimate_s": args.startup_s + need / repeats, "command": command})
  print(plan_text(args, study, dataset, cfg0, step_ms, calls,
                  sum(r["status"] in ("done", "diverged") for r in known)))
  return calls


def _lrs_flag(lrs: dict, optimizers: Sequence[str]) -> str:
  given = [f"{o}={','.join(f'{x:g}' for x in lrs[o])}" for o in optimizers if o in lrs]
  return f"--lrs {' '.join(given)}" if given else ""


def _command(args, block_flags: str, common: str) -> str:
  """One planned call: the block, the study's flags, the output and the time budget.

  The persistent compilation cache lets the runs of one optimizer share the evaluation's
  compiled program, and a seed the step of another seed in the same call.
  """
  parts = ["JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache PYTHONPATH=$PWD python "
           "benchmarks/quality_gpt.py", block_flags, common,
           f"--out $OUT/{pathlib.Path(RESULTS).name}", f"--budget-s {args.call_s:g}"]
  return " ".join(x for x in parts if x)


def _call(args, block: str, groups, cost: float, flags, common: str) -> dict:
  opts = [o for o, _ in groups]
  block_flags = " ".join(x for x in (f"--block {block} --optimizers {' '.join(opts)}",
                                     flags(opts)) if x)
  return {"block": block, "optimizers": opts, "runs": sum(len(ss) for _, ss in groups),
          "estimate_s": cost, "command": _command(args, block_flags, common)}


def study_flags(args) -> str:
  """The study-defining flags that differ from their defaults (for every planned call)."""
  defaults = vars(build_parser().parse_args(["--plan"]))
  flags = []
  for dest, flag in (("preset", "--preset"), ("data", "--data"), ("steps", "--steps"),
                     ("sweep_steps", "--sweep-steps"), ("batch_size", "--batch-size"),
                     ("seq_len", "--seq-len"), ("eval_every", "--eval-every"),
                     ("sweep_eval_every", "--sweep-eval-every"),
                     ("eval_batches", "--eval-batches"), ("warmup", "--warmup"),
                     ("adam_lr", "--adam-lr"), ("num_layers", "--num-layers"),
                     ("model_dim", "--model-dim"), ("num_heads", "--num-heads")):
    value = getattr(args, dest)
    if value != defaults[dest]:
      flags.append(f"{flag} {shlex.quote(str(value))}")
  if args.prior != defaults["prior"]:
    flags.append("--prior " + " ".join(shlex.quote(d) for d in args.prior))
  if list(args.lr_mults) != list(defaults["lr_mults"]):
    flags.append("--lr-mults " + " ".join(f"{m:g}" for m in args.lr_mults))
  return " ".join(flags)


def plan_text(args, study: Study, dataset, cfg0, step_ms, calls, finished_runs: int) -> str:
  mc = cfg0.model_config()
  tokens = cfg0.batch_size * mc.seq_len
  corpus = corpus_info(study.data)
  epochs = {b: study.steps[b] * tokens / dataset.train.size for b in ("sweep", "full")}
  params = gpt.count_params(nnx.eval_shape(lambda: gpt.GPT(mc, rngs=nnx.Rngs(0))))
  lines = [
      f"Study: preset {study.preset} ({mc.num_layers} layers × {mc.model_dim}, vocabulary "
      f"{mc.vocab_size}, {params / 1e6:.1f}M parameters), data {dataset.name} "
      f"({dataset.train.size:,} train / {dataset.val.size:,} validation tokens"
      + (f", Python {corpus['python']} here: the device's Python decides there" if corpus else "")
      + f"), {cfg0.batch_size} × {mc.seq_len} = {tokens:,} tokens a step.",
      f"Sweep: {len(args.optimizers)} optimizers × {len(args.lr_mults)} lrs × "
      f"{study.steps['sweep']} steps ({epochs['sweep']:.1f} epochs). Full: "
      f"{study.steps['full']} steps ({epochs['full']:.1f} epochs), seed "
      f"{min(args.seeds)} for all"
      + (f", then seed(s) {', '.join(map(str, sorted(set(args.seeds))[1:]))} for the top "
         f"{args.top} and {REFERENCE}." if args.top and len(set(args.seeds)) > 1 else "."),
      "Step time (ms) per optimizer: " + "; ".join(
          f"{o} {ms:.1f} ({src})" for o, (ms, src) in step_ms.items()),
      f"Per run: compilation {args.compile_s:g} s unless measured; evaluation "
      f"{study.eval_batches} batches every {study.eval_every['sweep']} (sweep) / "
      f"{study.eval_every['full']} (full) steps. Per call: {args.startup_s:g} s start-up, "
      f"at most {args.call_s:g} s.",
  ]
  if epochs["full"] > 4:
    lines.append(f"Note: {epochs['full']:.1f} epochs of the training side; beyond about 4, "
                 "repeated data is worth less than new data (Muennighoff et al. 2023).")
  lines += ["", f"Finished already in --prior {' '.join(args.prior)}: {finished_runs} run(s) "
            "of this study.",
            "Calls (one per 10-minute device call, run from the repository root; after "
            f"each, copy its files_at/{pathlib.Path(RESULTS).name}/ into {RESULTS}/ so the "
            "next call skips what is done and reads the chosen lrs; a call that ends with "
            "'left for the next call' is run again as it is):"]
  total = 0.0
  for i, c in enumerate(calls, 1):
    total += c["estimate_s"]
    lines.append(f"  {i:2d}. [{c['estimate_s'] / 60:4.1f} min, {c['block']}, {c['runs']} runs] "
                 f"{c['command']}")
  lines.append(f"  {len(calls) + 1:2d}. [CPU] python benchmarks/quality_gpt.py --block report "
               f"--inputs {RESULTS} --out {RESULTS}")
  per_session = max(1, int(args.session_s // args.call_s))
  lines.append(f"Total: {len(calls)} device calls, about {total / 60:.0f} device minutes "
               f"({math.ceil(len(calls) / per_session)} sessions of {args.session_s / 60:.0f} "
               f"minutes at {per_session} calls each).")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="\n".join(__doc__.splitlines()[-5:]))
  what = p.add_mutually_exclusive_group(required=True)
  what.add_argument("--block", choices=("sweep", "full", "report"))
  what.add_argument("--plan", action="store_true",
                    help="print the device calls of the whole study and their minutes")
  g = p.add_argument_group("study")
  g.add_argument("--preset", default="small", choices=sorted(PRESETS))
  g.add_argument("--data", default="stdlib", help="data spec of ortho_optax.models.data")
  g.add_argument("--optimizers", nargs="+", default=list(STUDY_OPTIMIZERS),
                 choices=opt_lib.OPTIMIZERS, metavar="NAME")
  g.add_argument("--lrs", nargs="+", default=[], metavar="NAME=LR[,LR...]",
                 help="sweep: the grid of an optimizer; full: its lr (instead of the sweep's)")
  g.add_argument("--lr-mults", nargs="+", type=float, default=list(GRID_MULTS),
                 help="sweep grid: multipliers of each optimizer's centre lr")
  g.add_argument("--seeds", nargs="+", type=int, default=None,
                 help="full: seeds (default 0); plan: the first for all, the others for --top "
                      "(default 0 1)")
  g.add_argument("--top", type=int, default=None,
                 help=f"full: the N best optimizers of the finished full runs, plus {REFERENCE} "
                      "(plan: default 3)")
  g.add_argument("--steps", type=int, default=None, help="full-run steps (default: preset's)")
  g.add_argument("--sweep-steps", type=int, default=None, help="sweep-run steps")
  g.add_argument("--batch-size", type=int, default=None)
  g.add_argument("--seq-len", type=int, default=None)
  g.add_argument("--eval-every", type=int, default=None, help="full runs")
  g.add_argument("--sweep-eval-every", type=int, default=None)
  g.add_argument("--eval-batches", type=int, default=None)
  g.add_argument("--warmup", type=float, default=0.05)
  g.add_argument("--adam-lr", type=float, default=opt_lib.TINY_ADAM_LR,
                 help="AdamW lr of embeddings and head in the hybrid optimizers")
  g.add_argument("--num-layers", type=int, default=None)
  g.add_argument("--model-dim", type=int, default=None)
  g.add_argument("--num-heads", type=int, default=None)
  g = p.add_argument_group("files and time")
  g.add_argument("--out", default=None, help="where run files (or the report) go")
  g.add_argument("--prior", nargs="*", default=[RESULTS],
                 help="folders of earlier calls' run files (skipped runs, lrs, --top)")
  g.add_argument("--lr-from", nargs="*", default=None,
                 help="full: folders of sweep run files (default: --prior and --out)")
  g.add_argument("--inputs", nargs="*", default=None,
                 help="report: folders of run files (default: --prior)")
  g.add_argument("--budget-s", type=float, default=None,
                 help="start no run that would end more than this many seconds after the "
                      "start (after the imports; estimated from the runs measured so far)")
  g = p.add_argument_group("plan")
  g.add_argument("--step-ms", nargs="*", default=[], metavar="[NAME=]MS",
                 help="ms per step (all, or per optimizer) instead of the measured ones")
  g.add_argument("--compile-s", type=float, default=DEFAULT_COMPILE_S,
                 help="seconds of compilation per run where none was measured")
  g.add_argument("--startup-s", type=float, default=DEFAULT_STARTUP_S)
  g.add_argument("--call-s", type=float, default=DEFAULT_CALL_S,
                 help="seconds of one call (the --budget-s of the planned commands)")
  g.add_argument("--session-s", type=float, default=1800.0)
  return p


def full_specs(args, study: Study, dataset: data_lib.Dataset, out: pathlib.Path,
               lrs: dict[str, list[float]]) -> list[RunSpec]:
  """The runs of ``--block full``: optimizers (``--optimizers`` or ``--top``), each at its
  ``--lrs`` value or best sweep lr of this study's setup, for every seed.

  Raises:
    ValueError: when an optimizer has neither, or ``--lrs`` gives it several.
  """
  key = study.setup_key(dataset)
  known = [r for r in load_runs([*args.prior, out]) if setup_key(r) == key]
  optimizers = top_optimizers(known, args.top) if args.top else list(args.optimizers)
  sweeps = (known if args.lr_from is None else
            [r for r in load_runs(args.lr_from) if setup_key(r) == key])
  picked = pick_lrs(sweeps)
  missing = [o for o in optimizers if o not in lrs and o not in picked]
  if missing:
    where = args.lr_from if args.lr_from is not None else [*args.prior, str(out)]
    raise ValueError(f"no finished sweep run of {missing} with this study's settings in "
                     f"{where}: run --block sweep --optimizers {' '.join(missing)} first, or "
                     "pass --lrs NAME=LR.")
  for o in optimizers:
    if o in lrs and len(lrs[o]) != 1:
      raise ValueError(f"--lrs {o}=...: a full run takes one lr, got {lrs[o]}.")
    if o not in lrs and picked[o]["edge"]:
      print(f"note: {o}'s best sweep lr {picked[o]['lr']:g} is the {picked[o]['edge']} of "
            "its grid; a wider sweep could find a better one.", flush=True)
  return [RunSpec("full", o, lrs[o][0] if o in lrs else picked[o]["lr"], s)
          for o in optimizers for s in args.seeds]


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  start = time.perf_counter()
  try:
    if args.block == "report":
      if not args.out:
        raise ValueError("--block report needs --out (where the report goes).")
      block_report(args.inputs if args.inputs is not None else args.prior,
                   pathlib.Path(args.out))
      return 0
    study = Study(args)
    dataset = data_lib.load_dataset(args.data)
    if args.plan:
      args.seeds = args.seeds or [0, 1]
      args.top = 3 if args.top is None else args.top
      plan(args, study, dataset)
      return 0
    args.seeds = args.seeds or [0]
    if not args.out:
      raise ValueError(f"--block {args.block} needs --out (where the run files go).")
    out = pathlib.Path(args.out)
    lrs = parse_lrs(args.lrs)
    if args.block == "sweep":
      specs = sweep_specs(study, args.optimizers, lrs, args.lr_mults)
    else:
      specs = full_specs(args, study, dataset, out, lrs)
    for spec in specs:  # every setting checked before the first run
      study.config(spec, dataset)
  except (ValueError, FileNotFoundError) as e:
    print(f"quality_gpt: error: {e}", file=sys.stderr)
    return 2
  status = run_block(study, specs, out, args.prior, args.budget_s, start, dataset)
  write_json(out / f"status-{args.block}.json",
             status | {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
                       "elapsed_s": time.perf_counter() - start})
  print(f"{args.block}: {len(status['ran'])} ran, {len(status['skipped'])} finished already, "
        f"{len(status['failed'])} failed, {len(status['left'])} left"
        + (" (run the same command again)" if status["left"] else "") + ".", flush=True)
  return 1 if status["failed"] else 0


if __name__ == "__main__":
  sys.exit(main())
