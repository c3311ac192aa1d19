"""Validation loss at equal steps for each optimizer on the tiny GPT (CPU), with a small lr sweep.

Each optimizer is trained at ``base_lr × mult`` for every multiplier (same data, seed,
schedule and AdamW settings for embeddings and head); the summary table lists, per
optimizer, the best learning rate's final validation loss and its wall-clock, then the
whole grid. Results go to ``--out`` (results.json, loss.png, results.md) and the summary
to ``--summary`` (default benchmarks/results/tiny_compare.md).

  python benchmarks/tiny_sweep.py                       # 7 optimizers × 3 lrs × 300 steps
  python benchmarks/tiny_sweep.py --steps 1000 --opt adamw muon --data embedded:prose
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import shlex
import sys
import time

from ortho_optax.models import optimizers as opt_lib
from ortho_optax.models import train as train_lib


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
  args = p.parse_args(argv)

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
                            lrs, progress=False)
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
  summary.write_text("\n".join(lines))
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
