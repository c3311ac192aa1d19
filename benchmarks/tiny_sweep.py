"""Validation loss at equal steps for each optimizer on the tiny GPT (CPU), with a small lr sweep.

Each optimizer is trained at ``base_lr × mult`` for every multiplier (same data, seed,
schedule and AdamW settings for embeddings and head); the summary table lists, per
optimizer, the best learning rate's final validation loss and its wall-clock, then the
whole grid. Results go to ``--out`` (results.json, loss.png, results.md) and the summary
to ``--summary`` (default benchmarks/results/tiny_compare.md).

``--equal-time RESULTS_JSON`` compares at equal wall-clock instead: it times one step of
every optimizer of a merged sweep at its best lr, round-robin in this one process (so the
CPU load is the same for all), sets the budget to the reference optimizer's (AdamW's)
time for the sweep's step count, and trains each optimizer for as many steps as fit in
that budget, with its own full warm-up + cosine schedule over those steps. The table goes
into a section of ``--summary`` (kept when the equal-steps part is regenerated) and the
numbers into ``<summary stem>_equal_time.json`` beside it.

  python benchmarks/tiny_sweep.py                       # 7 optimizers × 3 lrs × 300 steps
  python benchmarks/tiny_sweep.py --steps 1000 --opt adamw muon --data embedded:prose
  python benchmarks/tiny_sweep.py --equal-time runs/tiny_compare/results.json --out runs/tiny_equal_time
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import shlex
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ortho_optax.models import data as data_lib
from ortho_optax.models import gpt
from ortho_optax.models import optimizers as opt_lib
from ortho_optax.models import train as train_lib

#: Config fields that must agree between runs that share one table (everything but the
#: optimizer, its lr and bookkeeping such as logging intervals and output dirs).
SETUP_FIELDS = ("preset", "model", "data", "adam_lr", "weight_decay", "opt_args", "steps",
                "batch_size", "seq_len", "warmup_steps", "schedule", "final_lr_frac",
                "seed", "eval_batches")

#: Delimiters of the equal-wall-clock section of the summary (rewritten on its own).
EQUAL_TIME_BEGIN = "<!-- equal-time:begin -->"
EQUAL_TIME_END = "<!-- equal-time:end -->"


def check_same_setup(runs) -> None:
  """Raises ``ValueError`` unless every run has the first run's :data:`SETUP_FIELDS`.

  Args:
    runs: result dicts of :func:`train_lib.train` (their ``config``).
  """
  ref = runs[0]["config"]
  for r in runs[1:]:
    c = r["config"]
    diff = [f"{k}={c.get(k)!r} (first run: {ref.get(k)!r})" for k in SETUP_FIELDS
            if c.get(k) != ref.get(k)]
    if diff:
      raise ValueError(f"run {c['optimizer']} lr={c['lr']:g} differs from the first run in "
                       f"{', '.join(diff)}: merge only runs of one setup.")


def steps_in_budget(budget_s: float, step_s: float) -> int:
  """Whole steps of ``step_s`` seconds that fit in ``budget_s`` seconds (at least one).

  Args:
    budget_s: the time budget.
    step_s: seconds per step (> 0).

  Returns:
    ``floor(budget_s / step_s)``, tolerant to rounding (the reference optimizer, whose
    step time defines the budget, gets exactly its own step count), and at least 1.
  """
  if not step_s > 0 or not math.isfinite(step_s):
    raise ValueError(f"step_s must be a positive finite number of seconds, got {step_s}.")
  if not budget_s >= 0:
    raise ValueError(f"budget_s must be >= 0, got {budget_s}.")
  return max(1, math.floor(budget_s / step_s * (1 + 1e-9)))


def interleaved_step_times(run_steps: dict[str, Callable[[int], None]], rounds: int,
                           steps_per_round: int,
                           clock: Callable[[], float] = time.perf_counter) -> dict[str, dict]:
  """Seconds per step of several trainers timed round-robin under the same load.

  Each round runs ``steps_per_round`` steps of every trainer, one after another, in an
  order rotated by one each round (so no trainer always follows the same neighbour); the
  result per trainer is the median over rounds of its per-step time.

  Args:
    run_steps: name -> function that runs ``n`` training steps and returns when they have
      finished (blocks on the device); compile and warm them up before.
    rounds: timing rounds (odd numbers give a true median).
    steps_per_round: steps per trainer per round.
    clock: seconds counter (tests pass a fake one).

  Returns:
    name -> ``{"median_step_s": float, "round_step_s": [float, ...]}``.
  """
  if rounds < 1 or steps_per_round < 1:
    raise ValueError(f"rounds ({rounds}) and steps_per_round ({steps_per_round}) must be >= 1.")
  names = list(run_steps)
  per_round = {name: [] for name in names}
  for i in range(rounds):
    k = i % len(names)
    for name in names[k:] + names[:k]:
      t0 = clock()
      run_steps[name](steps_per_round)
      per_round[name].append((clock() - t0) / steps_per_round)
  return {name: {"median_step_s": float(np.median(times)), "round_step_s": times}
          for name, times in per_round.items()}


def make_stepper(cfg: train_lib.TrainConfig,
                 dataset: data_lib.Dataset) -> Callable[[int], None]:
  """A fresh model + optimizer of ``cfg`` as ``run(n)``: ``n`` training steps, blocking.

  The steps are those of :func:`train_lib.train` (same batches, jitted step, host-to-device
  copy), so their time is what a training run spends per step outside evaluation.
  """
  mcfg = cfg.model_config()
  model = gpt.GPT(mcfg, rngs=nnx.Rngs(cfg.seed))
  optimizer = nnx.Optimizer(model, train_lib.make_optimizer(cfg), wrt=nnx.Param)
  train_step = train_lib.make_train_step()
  sampler = data_lib.BatchSampler(dataset.train, cfg.batch_size, mcfg.seq_len, cfg.seed)
  count = [0]

  def run(n: int) -> None:
    loss = None
    for _ in range(n):
      x, y = sampler(count[0])
      loss = train_step(model, optimizer, jnp.asarray(x), jnp.asarray(y))
      count[0] += 1
    jax.block_until_ready(loss)

  return run


def splice_section(text: str, section: str) -> str:
  """``text`` with its equal-time block replaced by ``section``.

  Args:
    text: a summary file's contents (may be empty).
    section: the new block, including :data:`EQUAL_TIME_BEGIN` / :data:`EQUAL_TIME_END`.

  Returns:
    The new contents: the old block replaced in place, else ``section`` inserted before a
    ``## Notes`` heading (hand-written notes stay last), else appended.
  """
  begin, end = text.find(EQUAL_TIME_BEGIN), text.find(EQUAL_TIME_END)
  if begin >= 0 and end > begin:
    return text[:begin] + section + text[end + len(EQUAL_TIME_END):]
  notes = text.find("\n## Notes")
  if notes >= 0:
    return text[:notes].rstrip("\n") + "\n\n" + section + "\n\n" + text[notes + 1:]
  return text.rstrip("\n") + "\n\n" + section + "\n"


def setup_config(config: dict) -> train_lib.TrainConfig:
  """The :class:`train_lib.TrainConfig` of a run's ``config`` dict, :data:`SETUP_FIELDS` only."""
  return train_lib.TrainConfig(**{k: config[k] for k in SETUP_FIELDS})


def equal_time(args) -> int:
  """``--equal-time``: val loss of every optimizer of a merged sweep at equal wall-clock.

  Args:
    args: the parsed command line (``equal_time`` = the merged sweep's results.json,
      ``reference``, ``rounds``, ``round_steps``, ``out``, ``summary``).

  Returns:
    0; the trained runs go to ``args.out``, the table and JSON beside ``args.summary``.
  """
  sweep = json.loads(pathlib.Path(args.equal_time).read_text())
  runs = sweep["runs"]
  check_same_setup(runs)
  best = {name: b["lr"] for name, b in sweep["best"].items() if b["final_val_loss"] is not None}
  if args.reference not in best:
    raise ValueError(f"--reference {args.reference!r} is not in the sweep; valid choices: "
                     f"{sorted(best)}.")
  names = [args.reference] + sorted(n for n in best if n != args.reference)
  equal_steps = {n: b["final_val_loss"] for n, b in sweep["best"].items()}
  base = setup_config(runs[0]["config"])
  dataset = data_lib.load_dataset(base.data)

  # 1. Step time of each optimizer at its best lr, all in this process, interleaved.
  steppers = {n: make_stepper(dataclasses.replace(base, optimizer=n, lr=best[n]), dataset)
              for n in names}
  for n in names:  # compile, then warm up
    steppers[n](1)
    steppers[n](args.round_steps)
  load_before = os.getloadavg()
  timing = interleaved_step_times(steppers, args.rounds, args.round_steps)
  load_after = os.getloadavg()
  del steppers
  for n in names:
    print(f"{n:18s} {timing[n]['median_step_s'] * 1e3:7.1f} ms/step", flush=True)

  # 2. Budget = the reference's time for the sweep's steps; 3. train each within it.
  budget = timing[args.reference]["median_step_s"] * base.steps
  results, rows = [], []
  for n in names:
    step_s = timing[n]["median_step_s"]
    steps = steps_in_budget(budget, step_s)
    cfg = dataclasses.replace(base, optimizer=n, lr=best[n], steps=steps,
                              eval_every=max(steps // 10, 1), log_every=max(steps // 10, 1))
    r = train_lib.train(cfg, dataset, progress=False)
    results.append(r)
    rows.append({"optimizer": n, "lr": best[n], "step_ms": step_s * 1e3,
                 "round_step_ms": [t * 1e3 for t in timing[n]["round_step_s"]],
                 "steps": steps, "val_loss": r["final_val_loss"],
                 "val_loss_equal_steps": equal_steps.get(n),
                 "train_s": r["timings"]["median_step_s"] * r["completed_steps"]})
    print(f"{n:18s} lr={best[n]:<8g} {steps:5d} steps val={r['final_val_loss']}", flush=True)
    train_lib.write_reports(args.out, results, "tiny GPT at equal wall-clock")

  # 4. Report: JSON beside the summary and the summary's equal-time section.
  summary = pathlib.Path(args.summary)
  summary.parent.mkdir(parents=True, exist_ok=True)
  payload = {
      "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
      "sweep": str(args.equal_time), "reference": args.reference,
      "reference_steps": base.steps, "budget_s": budget, "rounds": args.rounds,
      "round_steps": args.round_steps, "loadavg_before": load_before,
      "loadavg_after": load_after, "machine": train_lib.machine_info(), "rows": rows}
  json_path = summary.with_name(summary.stem + "_equal_time.json")
  json_path.write_text(json.dumps(payload, indent=1))
  section = equal_time_section(payload, json_path.name)
  old = summary.read_text() if summary.exists() else ""
  summary.write_text(splice_section(old, section))
  print(section)
  return 0


def equal_time_section(payload: dict, json_name: str) -> str:
  """The markdown block of the equal-wall-clock table (between the section markers)."""
  ref, steps = payload["reference"], payload["reference_steps"]
  m = payload["machine"]
  lines = [
      EQUAL_TIME_BEGIN,
      "## Validation loss at equal wall-clock\n",
      f"Command: `{payload['command']}`  ",
      f"Machine: {m['platform']}, {m['cpu_count']} CPUs ({m['backend']}), JAX {m['jax']}; "
      f"{m['date']}. Step times: median over {payload['rounds']} rounds of "
      f"{payload['round_steps']} steps per optimizer, run round-robin in one process after "
      f"compile and warm-up (load average {payload['loadavg_before'][0]:.1f} before, "
      f"{payload['loadavg_after'][0]:.1f} after).  ",
      f"Budget: {ref}'s {steps} steps = {payload['budget_s']:.1f} s. Each optimizer trains "
      f"at its best equal-steps lr for floor(budget / its step time) steps, with its own "
      f"warm-up + cosine schedule over those steps; everything else as above. The last "
      f"column is each training run's own median step time × steps, under whatever load the "
      f"CPU had then (the step counts come from the interleaved timing only). Numbers in "
      f"`{json_name}`.\n",
      "| optimizer | lr | step time ms | rounds min–max ms | steps in budget | "
      f"val loss at equal wall-clock | val loss at {steps} steps | train s (own run) |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for row in sorted(payload["rows"], key=lambda r: (r["val_loss"] is None, r["val_loss"] or 0)):
    v = "diverged" if row["val_loss"] is None else f"{row['val_loss']:.4f}"
    e = "-" if row["val_loss_equal_steps"] is None else f"{row['val_loss_equal_steps']:.4f}"
    spread = f"{min(row['round_step_ms']):.0f}–{max(row['round_step_ms']):.0f}"
    lines.append(f"| {row['optimizer']} | {row['lr']:.3g} | {row['step_ms']:.1f} | {spread} | "
                 f"{row['steps']} | {v} | {e} | {row['train_s']:.1f} |")
  lines.append(EQUAL_TIME_END)
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--opt", nargs="+", default=list(opt_lib.COMPARE_DEFAULT),
                 choices=opt_lib.OPTIMIZERS)
  p.add_argument("--mults", nargs="+", type=float, default=[0.5, 1.0, 2.0])
  p.add_argument("--lr", action="append", default=[], metavar="NAME=LR",
                 help="override a base lr")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--data", default="embedded")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--warmup", type=float, default=0.05)
  p.add_argument("--eval-batches", type=int, default=16)
  p.add_argument("--out", default="runs/tiny_sweep")
  p.add_argument("--summary", default="benchmarks/results/tiny_compare.md")
  p.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                 help="train nothing: build the summary from earlier sweeps' results.json")
  p.add_argument("--equal-time", default=None, metavar="RESULTS_JSON",
                 help="compare at equal wall-clock the best lrs of this (merged) sweep")
  p.add_argument("--reference", default="adamw",
                 help="--equal-time: budget = this optimizer's time for the sweep's steps")
  p.add_argument("--rounds", type=int, default=7, help="--equal-time: timing rounds")
  p.add_argument("--round-steps", type=int, default=30,
                 help="--equal-time: steps per optimizer per timing round")
  args = p.parse_args(argv)
  if args.equal_time:
    return equal_time(args)

  lrs = {}
  for item in args.lr:
    name, _, value = item.partition("=")
    lrs[name] = float(value)
  base = train_lib.TrainConfig(
      preset="tiny", data=args.data, steps=args.steps, batch_size=args.batch_size,
      warmup_steps=args.warmup, schedule="cosine", seed=args.seed,
      eval_every=max(args.steps // 10, 1), eval_batches=args.eval_batches,
      log_every=max(args.steps // 10, 1), out_dir=args.out)
  t0 = time.time()
  runs, best = [], {}
  if args.merge:
    for path in args.merge:
      runs += json.loads(pathlib.Path(path).read_text())["runs"]
    check_same_setup(runs)
    for r in runs:
      name = r["config"]["optimizer"]
      if name not in best or train_lib._sort_key(r) < train_lib._sort_key(best[name]):  # pylint: disable=protected-access
        best[name] = r
    train_lib.write_reports(args.out, runs, "tiny optimizer sweep", best)
    args.steps = runs[0]["config"]["steps"]
    args.batch_size = runs[0]["config"]["batch_size"]
    args.warmup = runs[0]["config"]["warmup_steps"]
    args.seed = runs[0]["config"]["seed"]
    args.eval_batches = runs[0]["config"]["eval_batches"]
    args.mults = sorted({round(r["config"]["lr"] / opt_lib.default_lr(r["config"]["optimizer"]), 3)
                         for r in runs})
  for name in ([] if args.merge else args.opt):
    try:
      opt_lib.resolve(name)
    except ImportError as e:
      print(f"skipping {name}: {e}", file=sys.stderr)
      continue
    out = train_lib.compare(dataclasses.replace(base, out_dir=None), [name], args.mults,
                            {k: v for k, v in lrs.items() if k == name}, progress=False)
    runs += out["runs"]
    best.update(out["best"])
    for r in out["runs"]:
      print(f"{name:18s} lr={r['config']['lr']:<8g} val={r['final_val_loss']}", flush=True)
    # Write after every optimizer so a long sweep leaves partial results.
    train_lib.write_reports(args.out, runs, "tiny optimizer sweep", best)
  total = time.time() - t0
  if args.merge:  # the sum of the merged runs' own step time
    total = sum(r["timings"]["median_step_s"] * r["completed_steps"] for r in runs)

  machine = runs[0]["machine"]
  lines = [
      "# Tiny GPT: validation loss at equal steps (CPU)\n",
      f"Command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`  ",
      f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs ({machine['backend']}), "
      f"JAX {machine['jax']}, optax {machine['optax']}; "
      f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
      f"{total / 60:.1f} min of training (CPU shared with other jobs, so wall-clock "
      "numbers are only comparable within one optimizer's runs).  ",
      f"Model: `tiny` preset (2 layers × 128, 4 heads, seq 64, byte vocab 256), "
      f"{runs[0]['num_params']:,} parameters, f32 on CPU. Data: `{runs[0]['data']['name']}` "
      f"(sha256 `{runs[0]['data']['sha256']}`; {runs[0]['data']['train_tokens']:,} train / "
      f"{runs[0]['data']['val_tokens']:,} validation bytes).  ",
      f"Training: {args.steps} steps × {args.batch_size}×64 tokens, linear warm-up "
      f"{args.warmup:g} then cosine to 0, seed {args.seed}; embeddings and head on AdamW "
      f"(lr {base.adam_lr:g}, β=(0.9, 0.95)) in every hybrid optimizer; no weight decay. "
      f"Validation: {args.eval_batches} fixed batches of the held-out 10%, in nats/byte.\n",
      "## Best learning rate per optimizer\n",
      "| optimizer | lrs tried | best lr | val loss | train loss (last 10%) | "
      "wall-clock s | tokens/s |",
      "|---|---|---|---|---|---|---|",
  ]
  for name, r in sorted(best.items(), key=lambda kv: train_lib._sort_key(kv[1])):  # pylint: disable=protected-access
    t = r["timings"]
    wall = t["median_step_s"] * r["completed_steps"]
    v = r["final_val_loss"]
    if v is None:
      lines.append(f"| {name} | all diverged | - | - | - | - | - |")
      continue
    tried = ", ".join(f"{x['config']['lr']:.3g}" for x in sorted(
        (x for x in runs if x["config"]["optimizer"] == name), key=lambda x: x["config"]["lr"]))
    lines.append(f"| {name} | {tried} | {r['config']['lr']:.3g} | {v:.4f} | "
                 f"{r['final_train_loss']:.4f} | {wall:.1f} | {t['tokens_per_s']:,.0f} |")
  lines += ["", "## All runs\n", train_lib.markdown_table(runs, best)]
  summary = pathlib.Path(args.summary)
  summary.parent.mkdir(parents=True, exist_ok=True)
  text = "\n".join(lines)
  old = summary.read_text() if summary.exists() else ""
  if EQUAL_TIME_BEGIN in old and EQUAL_TIME_END in old:  # keep the equal-time section
    old_section = old[old.find(EQUAL_TIME_BEGIN):old.find(EQUAL_TIME_END) + len(EQUAL_TIME_END)]
    text = splice_section(text, old_section)
  summary.write_text(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
