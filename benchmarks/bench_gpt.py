"""Whole-step speed of the ortho-optax GPT on a GPU: tokens/s, MFU, optimizer overhead.

Measures (median over ``--rounds`` interleaved rounds of ``--steps`` steps each, after
``--warmup`` warm-up steps) the training step of :mod:`ortho_optax.models.gpt` (``small`` preset = GPT-2
small with an untied 50304-token head, bf16 compute, cuDNN attention):

* AdamW at 64 × 1024 tokens/step: tokens/s and MFU, flops ``6·N + 12·L·d·T`` per token
  (N without the embedding table) against 989 TFLOP/s, as ANCHORS.md does;
* AdamW, ``ortho_optax.muon``, ``ortho_optax.turbo_muon`` (and ``optax.contrib.muon`` for
  reference) at 32 × 1024 tokens/step: step time and cost relative to AdamW.

Two step drivers: ``split`` (the trainer's step, ``train.DonatedStep``: one ``jax.jit``
over the ``nnx.split`` state, donated, no NNX graph traversal per call) and ``nnx`` (one
``nnx.jit`` function over model and ``nnx.Optimizer``, for comparison).

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
from flax import nnx

from ortho_optax.models import gpt
from ortho_optax.models import optimizers as opt_lib
from ortho_optax.models import train as train_lib

PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16, as in ANCHORS.md


def make_tx(name: str) -> optax.GradientTransformation:
  if name == "optax_contrib_muon":
    return optax.contrib.muon(learning_rate=0.02, adam_learning_rate=3e-4)
  return opt_lib.build(name, 0.02 if name != "adamw" else 3e-4, adam_learning_rate=3e-4)


class StepRunner:
  """One compiled training step (model, optimizer, batch, driver), ready to be timed.

  Building it compiles the step and runs the warm-up steps; :meth:`time` then times
  consecutive steps, so that several runners can be timed in interleaved rounds (every
  optimizer sees the same GPU clocks and temperature, instead of the first one timed
  running on a cooler GPU).
  """

  def __init__(self, cfg: gpt.GPTConfig, opt_name: str, batch: int, warmup: int,
               driver: str):
    self.cfg, self.opt_name, self.batch, self.driver = cfg, opt_name, batch, driver
    model = gpt.GPT(cfg, rngs=nnx.Rngs(0))
    self.n_params = gpt.count_params(model)
    self.n_no_embed = gpt.count_params(model, exclude_embedding=True)
    optimizer = nnx.Optimizer(model, make_tx(opt_name), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 50257 if cfg.vocab_size > 50257 else cfg.vocab_size,
                                 (batch, cfg.seq_len + 1)), jnp.int32)
    self.inputs, self.targets = inputs, targets = x[:, :-1], x[:, 1:]
    self.donated = None
    if driver == "nnx":
      step = train_lib.make_train_step()
      self.run = lambda: step(model, optimizer, inputs, targets)
    else:  # the trainer's step
      self.donated = train_lib.DonatedStep(model, optimizer)
      self.run = lambda: self.donated(inputs, targets)
    t0 = time.perf_counter()
    self.first_loss = float(self.run())
    self.compile_s = time.perf_counter() - t0
    for _ in range(warmup):
      self.run().block_until_ready()
    self.last_loss = self.first_loss

  def time(self, steps: int) -> list[float]:
    """Seconds per step of ``steps`` consecutive steps, dispatched asynchronously as in
    training: a step's time is the interval between consecutive completions (host work
    of step i+1 overlaps device work of step i)."""
    times = []
    pending = self.run()
    pending.block_until_ready()
    t_prev = time.perf_counter()
    for _ in range(steps):
      nxt = self.run()  # dispatched before the previous step is waited for
      pending.block_until_ready()
      t = time.perf_counter()
      times.append(t - t_prev)
      t_prev, pending = t, nxt
    self.last_loss = float(pending)
    return times

  def profile(self) -> dict:
    """CUPTI kernel list of one step (split driver only)."""
    if self.donated is None:
      return {}
    try:
      # CUPTI's measure may call the function more than once: no donation here.
      from kernel_profile import profile_kernels  # pylint: disable=import-outside-toplevel
      _, total, kernels = profile_kernels(jax.jit(self.donated.step_fn), self.donated.state,
                                          self.inputs, self.targets)
      return {"profile_device_ms": total, "profile_kernels": kernels[:30],
              "profile_launches": sum(n for _, n, _ in kernels), "all_kernels": kernels}
    except Exception as e:  # pylint: disable=broad-except
      return {"profile_error": f"{type(e).__name__}: {str(e)[:300]}"}

  def result(self, times: list[float]) -> dict:
    med = float(np.median(times))
    tokens = self.batch * self.cfg.seq_len
    flops = gpt.flops_per_token(self.cfg, self.n_no_embed) * tokens
    return {"optimizer": self.opt_name, "driver": self.driver, "batch": self.batch,
            "seq_len": self.cfg.seq_len, "tokens_per_step": tokens, "median_ms": med * 1e3,
            "min_ms": float(np.min(times)) * 1e3, "steps_timed": len(times),
            "tokens_per_s": tokens / med, "mfu": flops / med / PEAK_FLOPS,
            "compile_s": self.compile_s, "first_loss": self.first_loss,
            "last_loss": self.last_loss, "params": self.n_params,
            "params_no_embedding": self.n_no_embed}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="small")
  p.add_argument("--batch64", type=int, default=64, help="sequences/step for the MFU run")
  p.add_argument("--batch32", type=int, default=32, help="sequences/step for the overhead runs")
  p.add_argument("--steps", type=int, default=10, help="timed steps per round")
  p.add_argument("--rounds", type=int, default=3,
                 help="interleaved rounds (every run timed once per round)")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--drivers", nargs="+", default=["split", "nnx"], choices=["split", "nnx"],
                 help="'split' times everything; 'nnx' adds AdamW/Muon through nnx.jit")
  p.add_argument("--opts", nargs="+",
                 default=["adamw", "muon", "turbo_muon", "optax_contrib_muon"])
  p.add_argument("--fp8-head", action="store_true", help="also time AdamW with the FP8 head")
  p.add_argument("--profile", action="store_true",
                 help="per-kernel CUPTI device time of one step of each split-driver run")
  p.add_argument("--all-kernels", action="store_true",
                 help="with --profile: every kernel of each step into bench_gpt_kernels.json")
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  args = p.parse_args(argv)

  cfg = gpt.get_config(args.preset)
  env = train_lib.machine_info()
  env["pallas_available"] = _pallas_available()
  print(f"# {env['device']} ({env['backend']}), jax {env['jax']}, preset {args.preset}, "
        f"dtype {cfg.dtype}, attention {gpt._attention_impl(cfg)}, pallas "  # pylint: disable=protected-access
        f"{env['pallas_available']}", flush=True)
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
    print(f"{r['optimizer']:>20s} {r['driver']:>5s} {r['tokens_per_step']:>7d} tok "
          f"{r['median_ms']:8.2f} ms  {r['tokens_per_s']:>11,.0f} tok/s  MFU "
          f"{100 * r['mfu']:5.1f}%  (compile {r['compile_s']:.1f}s, loss "
          f"{r['first_loss']:.3f}->{r['last_loss']:.3f})", flush=True)
    _write(args.out, env, results)

  # Most important first: the JSON is rewritten after every run, so a timeout keeps them.
  jobs = [("adamw", args.batch64, "split", "bf16")]
  jobs += [(name, args.batch32, "split", "bf16") for name in args.opts
           if name != "optax_contrib_muon"]
  if "nnx" in args.drivers:
    jobs.append(("adamw", args.batch64, "nnx", "bf16"))
  if args.fp8_head:
    jobs.append(("adamw", args.batch64, "split", "fp8"))
  if "nnx" in args.drivers:
    jobs += [(name, args.batch32, "nnx", "bf16") for name in ("adamw", "muon")
             if name in args.opts]
  if "optax_contrib_muon" in args.opts:
    jobs.append(("optax_contrib_muon", args.batch32, "split", "bf16"))
  runners = []
  for name, batch, driver, variant in jobs:
    c = gpt.get_config(args.preset, fp8_head=variant == "fp8")
    try:
      runners.append((variant, StepRunner(c, name, batch, args.warmup, driver)))
    except Exception as e:  # pylint: disable=broad-except
      print(f"{name} {driver} {variant} failed: {type(e).__name__}: {str(e)[:600]}",
            flush=True)
  # Interleaved rounds: each round times every runner once, in job order and reversed
  # on odd rounds (the GPU heats up and clocks down as the run goes on).
  times = [[] for _ in runners]
  for rnd in range(args.rounds):
    order = range(len(runners)) if rnd % 2 == 0 else reversed(range(len(runners)))
    for i in order:
      times[i] += runners[i][1].time(args.steps)
    print(f"# round {rnd + 1}/{args.rounds}: " + ", ".join(
        f"{r.opt_name}/{r.batch} {1e3 * np.median(t):.2f}" for (_, r), t in zip(runners, times)),
        flush=True)
  for (variant, runner), t in zip(runners, times):
    r = runner.result(t)
    r["variant"] = variant
    if args.profile:
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
  lines = ["| optimizer | driver | head | tokens/step | ms/step (median) | tokens/s | MFU | vs AdamW |",
           "|---|---|---|---|---|---|---|---|"]
  base = {(r["driver"], r["tokens_per_step"]): r["median_ms"] for r in results
          if r["optimizer"] == "adamw" and r.get("variant") == "bf16"}
  for r in results:
    b = base.get((r["driver"], r["tokens_per_step"]))
    rel = f"{100 * (r['median_ms'] / b - 1):+.1f}%" if b and r["optimizer"] != "adamw" else "-"
    lines.append(f"| {r['optimizer']} | {r['driver']} | {r.get('variant', 'bf16')} | "
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
