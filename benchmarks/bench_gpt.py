"""Whole-step speed of the ortho-optax GPT on a GPU: tokens/s, MFU, optimizer overhead.

Runs the trainer's own step (:class:`ortho_optax.models.step.TrainStep`: one ahead-of-time
compiled, donated ``jax.jit`` over the flat ``nnx.split`` state) on the model and
optimizer the trainer builds (:func:`ortho_optax.models.train.init_model_and_optimizer`,
i.e. the same optimizer objects, learning-rate schedules included), for the ``small``
preset by default (GPT-2 small with an untied 50304-token head, bf16 compute, cuDNN
attention):

* AdamW at 64 × 1024 tokens/step: tokens/s and MFU, flops ``6·N + 12·L·d·T`` per token
  (N without the embedding table) against 989 TFLOP/s;
* AdamW, ``muon``, ``turbo_muon`` (and ``optax.contrib.muon`` for reference) at
  32 × 1024 tokens/step: step time and cost relative to AdamW.

Every step is compiled first, then all are timed in interleaved rounds (order reversed on
odd rounds). Each compiled step is timed with three kinds of input (``--inputs``), so the
cost of each is seen apart:

* ``fixed``: one device batch, token ids drawn uniformly from the GPT-2 vocabulary,
  reused every step (the benchmark's historical setting);
* ``bytes``: the same with ids in 0..255 (a byte-level corpus: 256 embedding rows get
  every gradient);
* ``trainer``: the trainer's input pipeline, a fresh batch of ``--data`` every step from
  the background prefetcher (:class:`ortho_optax.models.data.Prefetcher`).

  python benchmarks/bench_gpt.py                 # on the GPU, writes $OUT/bench_gpt.json
  python benchmarks/bench_gpt.py --preset tiny --batch64 4 --batch32 2 --steps 3   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ortho_optax.models import data as data_lib
from ortho_optax.models import gpt
from ortho_optax.models import reports
from ortho_optax.models import step as step_lib
from ortho_optax.models import train as train_lib

PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16
INPUTS = ("fixed", "bytes", "trainer")


class StepRunner:
  """One compiled training step (model, optimizer, batch size), ready to be timed.

  Building it compiles the step and runs the warm-up steps; :meth:`time` then times
  consecutive steps, so that several runners can be timed in interleaved rounds (every
  optimizer sees the same GPU clocks and temperature).
  """

  def __init__(self, cfg: train_lib.TrainConfig, opt_name: str, warmup: int,
               dataset: data_lib.Dataset | None):
    self.cfg, self.opt_name, self.batch = cfg, opt_name, cfg.batch_size
    mcfg = cfg.model_config()
    tx = (optax.contrib.muon(learning_rate=0.02, adam_learning_rate=3e-4)
          if opt_name == "optax_contrib_muon" else None)
    model, optimizer = train_lib.init_model_and_optimizer(cfg, tx=tx)
    self.n_params = gpt.count_params(model)
    self.n_no_embed = gpt.count_params(model, exclude_embedding=True)
    rng = np.random.default_rng(0)
    shape = (self.batch, mcfg.seq_len + 1)
    full = jnp.asarray(rng.integers(0, min(mcfg.vocab_size, 50257), shape), jnp.int32)
    byte = jnp.asarray(rng.integers(0, min(mcfg.vocab_size, 256), shape), jnp.int32)
    self.batches = {"fixed": (full[:, :-1], full[:, 1:]), "bytes": (byte[:, :-1], byte[:, 1:])}
    self.sampler = (None if dataset is None else
                    data_lib.BatchSampler(dataset.train, self.batch, mcfg.seq_len, cfg.seed))
    self.step = step_lib.TrainStep(model, optimizer, *self.batches["fixed"])
    self.compile_s = self.step.compile_s
    self.first_loss = float(self.step(*self.batches["fixed"]))
    for _ in range(warmup):
      self.step(*self.batches["fixed"])
    self.step.wait()
    self.last_loss = self.first_loss
    self._next_step = 0

  def time(self, steps: int, inputs: str) -> list[float]:
    """Seconds per step of ``steps`` consecutive steps, dispatched asynchronously as in
    training: a step's time is the interval between consecutive completions (host work
    of step i+1 overlaps device work of step i)."""
    if inputs == "trainer":
      steps_range = range(self._next_step, self._next_step + steps + 1)
      self._next_step += steps + 1
      source = data_lib.Prefetcher(self.sampler, steps_range, train_lib.batch_placer())
    else:
      source = iter([self.batches[inputs]] * (steps + 1))
    times = []
    with_close = getattr(source, "close", lambda: None)
    try:
      pending = self.step(*next(source))
      pending.block_until_ready()
      t_prev = time.perf_counter()
      for _ in range(steps):
        nxt = self.step(*next(source))  # dispatched before the previous step is waited for
        pending.block_until_ready()
        t = time.perf_counter()
        times.append(t - t_prev)
        t_prev, pending = t, nxt
      self.last_loss = float(pending)
    finally:
      with_close()
    return times

  def profile(self) -> dict:
    """CUPTI kernel list of one step."""
    try:
      # CUPTI's measure may call the function more than once: no donation here.
      from kernel_profile import profile_kernels  # pylint: disable=import-outside-toplevel
      _, total, kernels = profile_kernels(jax.jit(self.step.step_fn), self.step.leaves,
                                          *self.batches["fixed"])
      return {"profile_device_ms": total, "profile_kernels": kernels[:30],
              "profile_launches": sum(n for _, n, _ in kernels), "all_kernels": kernels}
    except Exception as e:  # pylint: disable=broad-except
      return {"profile_error": f"{type(e).__name__}: {str(e)[:300]}"}

  def result(self, times: list[float], inputs: str) -> dict:
    mcfg = self.cfg.model_config()
    med = float(np.median(times))
    tokens = self.batch * mcfg.seq_len
    flops = gpt.flops_per_token(mcfg, self.n_no_embed) * tokens
    return {"optimizer": self.opt_name, "inputs": inputs, "batch": self.batch,
            "seq_len": mcfg.seq_len, "tokens_per_step": tokens, "median_ms": med * 1e3,
            "min_ms": float(np.min(times)) * 1e3, "steps_timed": len(times),
            "tokens_per_s": tokens / med, "mfu": flops / med / PEAK_FLOPS,
            "compile_s": self.compile_s, "first_loss": self.first_loss,
            "last_loss": self.last_loss, "params": self.n_params,
            "params_no_embedding": self.n_no_embed}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="small")
  p.add_argument("--batch64", type=int, default=64,
                 help="sequences/step for the MFU run (0: skip it)")
  p.add_argument("--batch32", type=int, default=32, help="sequences/step for the overhead runs")
  p.add_argument("--steps", type=int, default=10, help="timed steps per round")
  p.add_argument("--rounds", type=int, default=3,
                 help="interleaved rounds (every run timed once per round)")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--opts", nargs="+",
                 default=["adamw", "muon", "turbo_muon", "optax_contrib_muon"])
  p.add_argument("--inputs", nargs="+", default=["fixed"], choices=INPUTS,
                 help="input kinds each step is timed with (see the module docstring)")
  p.add_argument("--data", default="embedded", help="the trainer's --data, for --inputs trainer")
  p.add_argument("--schedule-steps", type=int, default=300,
                 help="the --steps of the trainer's lr schedule (only its constants differ)")
  p.add_argument("--fp8-head", action="store_true", help="also time AdamW with the FP8 head")
  p.add_argument("--profile", action="store_true",
                 help="per-kernel CUPTI device time of one step of each run")
  p.add_argument("--all-kernels", action="store_true",
                 help="with --profile: every kernel of each step into bench_gpt_kernels.json")
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  args = p.parse_args(argv)

  cfg0 = train_lib.TrainConfig(preset=args.preset, steps=args.schedule_steps)
  mcfg = cfg0.model_config()
  env = reports.machine_info()
  env["pallas_available"] = _pallas_available()
  env["command"] = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
  print(f"# {env['device']} ({env['backend']}), jax {env['jax']}, preset {args.preset}, "
        f"dtype {mcfg.dtype}, attention {gpt._attention_impl(mcfg)}, pallas "  # pylint: disable=protected-access
        f"{env['pallas_available']}", flush=True)
  dataset = data_lib.load_dataset(args.data) if "trainer" in args.inputs else None
  if dataset is not None:
    env["data"] = dataset.describe()
  results = []
  all_kernels = {}

  def record(r):
    kernels = r.pop("all_kernels", None)
    if args.all_kernels and kernels is not None:
      key = f"{r['optimizer']}_{r['tokens_per_step']}"
      while key in all_kernels:  # e.g. AdamW twice at 32k with --batch64 32
        key += "+"
      all_kernels[key] = kernels
      os.makedirs(args.out, exist_ok=True)
      with open(os.path.join(args.out, "bench_gpt_kernels.json"), "w") as f:
        json.dump(all_kernels, f)
    results.append(r)
    print(f"{r['optimizer']:>20s} {r['inputs']:>7s} {r['tokens_per_step']:>7d} tok "
          f"{r['median_ms']:8.2f} ms  {r['tokens_per_s']:>11,.0f} tok/s  MFU "
          f"{100 * r['mfu']:5.1f}%  (compile {r['compile_s']:.1f}s, loss "
          f"{r['first_loss']:.3f}->{r['last_loss']:.3f})", flush=True)
    _write(args.out, env, results)

  # Most important first: the JSON is rewritten after every run, so a timeout keeps them.
  jobs = [("adamw", args.batch64, "bf16")] if args.batch64 else []
  jobs += [(name, args.batch32, "bf16") for name in args.opts]
  if args.fp8_head and args.batch64:
    jobs.append(("adamw", args.batch64, "fp8"))
  runners = []
  for name, batch, variant in jobs:
    model = {"fp8_head": True} if variant == "fp8" else {}
    cfg = train_lib.TrainConfig(preset=args.preset, optimizer=name if name in
                                train_lib.opt_lib.OPTIMIZERS else "adamw",
                                batch_size=batch, steps=args.schedule_steps, model=model)
    try:
      runners.append((variant, StepRunner(cfg, name, args.warmup, dataset)))
    except Exception as e:  # pylint: disable=broad-except
      print(f"{name} {variant} failed: {type(e).__name__}: {str(e)[:600]}", flush=True)
  # Interleaved rounds: each round times every runner with every input kind, in job
  # order and reversed on odd rounds (the GPU heats up and clocks down as it runs).
  keys = [(i, inputs) for i in range(len(runners)) for inputs in args.inputs]
  times = {k: [] for k in keys}
  for rnd in range(args.rounds):
    for i, inputs in (keys if rnd % 2 == 0 else reversed(keys)):
      times[(i, inputs)] += runners[i][1].time(args.steps, inputs)
    print(f"# round {rnd + 1}/{args.rounds}: " + ", ".join(
        f"{runners[i][1].opt_name}/{runners[i][1].batch}/{inputs} "
        f"{1e3 * np.median(times[(i, inputs)]):.2f}" for i, inputs in keys), flush=True)
  for i, inputs in keys:
    variant, runner = runners[i]
    r = runner.result(times[(i, inputs)], inputs)
    r["variant"] = variant
    if args.profile and inputs == args.inputs[0]:
      r.update(runner.profile())
    record(r)

  print()
  print(table(results))
  for r in results:
    if "profile_kernels" in r:
      print(f"\n{r['optimizer']} {r['tokens_per_step']} tok: one step {r['profile_device_ms']:.2f}"
            f" ms device time, {r.get('profile_launches', '?')} launches; top kernels:")
      for name, n, t in r["profile_kernels"][:12]:
        print(f"  {t:8.3f} ms {n:4d}x {name[:70]}")
  return 0


def _pallas_available() -> bool:
  try:
    from ortho_optax import pallas  # pylint: disable=import-outside-toplevel
    return bool(pallas.is_available())
  except Exception:  # pylint: disable=broad-except
    return False


def table(results) -> str:
  lines = ["| optimizer | inputs | head | tokens/step | ms/step (median) | tokens/s | MFU | vs AdamW |",
           "|---|---|---|---|---|---|---|---|"]
  base = {(r["inputs"], r["tokens_per_step"]): r["median_ms"] for r in results
          if r["optimizer"] == "adamw" and r.get("variant") == "bf16"}
  for r in results:
    b = base.get((r["inputs"], r["tokens_per_step"]))
    rel = f"{100 * (r['median_ms'] / b - 1):+.1f}%" if b and r["optimizer"] != "adamw" else "-"
    lines.append(f"| {r['optimizer']} | {r['inputs']} | {r.get('variant', 'bf16')} | "
                 f"{r['tokens_per_step']:,} | {r['median_ms']:.2f} | {r['tokens_per_s']:,.0f} | "
                 f"{100 * r['mfu']:.1f}% | {rel} |")
  return "\n".join(lines)


def _write(out, env, results):
  path = pathlib.Path(out)
  path.mkdir(parents=True, exist_ok=True)
  (path / "bench_gpt.json").write_text(json.dumps({"machine": env, "peak_flops": PEAK_FLOPS,
                                                   "results": results}, indent=1))


if __name__ == "__main__":
  sys.exit(main())
