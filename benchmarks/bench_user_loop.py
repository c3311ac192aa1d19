"""Step time of every optimizer in the training loop a Flax user writes.

The model is :mod:`user_gpt` (GPT-2 small written as a user would, not
``ortho_optax.models``); the loop is the one of the Flax NNX guides, with no
donation and no split state::

  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss

Optimizers at their defaults: ``optax.adamw`` (learning rate 3e-4), ``optax.contrib.muon``
(0.02; by default it orthogonalizes every 2-D parameter, embeddings and head included) and
every entry of ``ortho_optax.OPTIMIZERS`` (``OPTIMIZERS[name]()``, which route hidden
matrices to the orthogonalized chain and the rest to AdamW). Named with ``--optimizers`` only:
``muon/gram`` and ``turbo_muon/gram``, the same with ``orthogonalizer="gram_newton_schulz"``.

Method: every (model, optimizer) pair is built fresh from the same seed and batch. Its
first step is timed wall-clock, compilation included (``compile_s``). Then ``--rounds``
interleaved rounds time all optimizers in turn (order reversed on odd rounds, so none
always runs on the coolest GPU): 2 warm-up steps, then ``--steps`` steps with one
``block_until_ready`` at the end (the objects alive are frozen out of the garbage
collector's passes first, ``gc.freeze``); ``ms_per_step`` is the median over rounds of the block
time divided by ``--steps``. ``vs_adamw`` is ``ms_per_step / adamw's - 1`` (0.05 = 5%
slower). ``peak_mem_gb`` (1e9 bytes) is the compiled step's own footprint from XLA's
``memory_analysis()``: arguments + outputs + temporaries - aliased bytes; the process-wide
``peak_bytes_in_use`` (all optimizers' states are resident together) is in the metadata.

``--skip-on-compile-over S`` leaves out of the timing an optimizer whose first step took
more than S seconds; ``--compile-budget S`` compiles no further optimizer once the compile
phase has taken S seconds, so that a run under a time limit still reaches the timing
rounds. Both are recorded in the row's ``skipped``. A failure to build, compile or step
is recorded in the row's ``error`` and the run goes on.

Output, rewritten after every compile and every round so that a cut run keeps what it
measured:

* ``<out>/bench_user_loop.json``: ``{"meta": {...}, "rows": [row, ...]}``, one row per
  optimizer with keys ``optimizer``, ``tokens_per_step``, ``ms_per_step``, ``vs_adamw``,
  ``compile_s``, ``peak_mem_gb`` (``None`` where not measured), plus ``round_ms``,
  ``first_loss``, ``last_loss``, ``error`` and ``skipped`` (``None`` or the reason);
* ``<out>/bench_user_loop.md``: the same as a Markdown table (also printed last);
* with ``--profile``, ``<out>/bench_user_loop_profile.json``: per optimizer, one step's
  CUPTI kernels (the largest by device time, their sum and the step's total).

  python benchmarks/bench_user_loop.py --out $OUT                    # H200: all 13
  python benchmarks/bench_user_loop.py --optimizers optax.adamw muon turbo_muon --profile
  python benchmarks/bench_user_loop.py --preset tiny --batch 2 --seq 16 --rounds 1 --steps 1
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import pathlib
import platform
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

import ortho_optax
import user_gpt

WARMUP_STEPS = 2
TOP_KERNELS = 25

#: Name -> factory of the optimizer at its defaults, in table order.
OPTIMIZERS = {
    "optax.adamw": lambda: optax.adamw(3e-4),
    "optax.contrib.muon": lambda: optax.contrib.muon(0.02),
    **ortho_optax.OPTIMIZERS,
}
#: Named only (not in the default list): variants of the defaults worth timing side by side.
VARIANTS = {
    "muon/gram": lambda: ortho_optax.muon(orthogonalizer="gram_newton_schulz"),
    "turbo_muon/gram": lambda: ortho_optax.turbo_muon(orthogonalizer="gram_newton_schulz"),
    # The references iterate in float32; bf16 takes the kernels on Hopper.
    "oadamw/bf16": lambda: ortho_optax.oadamw(compute_dtype="bfloat16"),
    "hybrid_auon/bf16": lambda: ortho_optax.hybrid_auon(compute_dtype="bfloat16"),
}
BASELINE = "optax.adamw"


@nnx.jit
def train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(user_gpt.loss_fn)(model, x, y)
  optimizer.update(model, grads)
  return loss


def _error(e: BaseException) -> str:
  return f"{type(e).__name__}: {str(e)[:600]}"


def compiled_footprint_bytes(compiled) -> int | None:
  """Arguments + outputs + temporaries - aliased bytes of a compiled step, or ``None``
  when the backend gives no memory analysis."""
  ma = compiled.memory_analysis()
  if ma is None:
    return None
  return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
             - ma.alias_size_in_bytes)


class Run:
  """One optimizer's model, optimizer state and result row."""

  def __init__(self, name: str, cfg: user_gpt.Config, x, y):
    self.name, self.cfg, self.x, self.y = name, cfg, x, y
    self.row = {"optimizer": name, "tokens_per_step": int(x.size), "ms_per_step": None,
                "vs_adamw": None, "compile_s": None, "peak_mem_gb": None, "round_ms": [],
                "dispatch_ms": None, "round_dispatch_ms": [],
                "first_loss": None, "last_loss": None, "error": None, "skipped": None}
    self.model = self.optimizer = None

  def build_and_compile(self) -> None:
    """Builds the model and optimizer and times the first step."""
    tx = {**OPTIMIZERS, **VARIANTS}[self.name]()
    self.model = user_gpt.GPT(self.cfg, rngs=nnx.Rngs(0))
    self.optimizer = nnx.Optimizer(self.model, tx, wrt=nnx.Param)
    t0 = time.perf_counter()
    loss = self.step()
    loss.block_until_ready()
    self.row["compile_s"] = time.perf_counter() - t0
    self.row["first_loss"] = float(loss)

  def read_footprint(self) -> None:
    """The compiled step's memory footprint into ``peak_mem_gb``."""
    # The step is already compiled: lowering it again hits JAX's in-memory caches.
    footprint = compiled_footprint_bytes(
        train_step.lower(self.model, self.optimizer, self.x, self.y).compile())
    self.row["peak_mem_gb"] = None if footprint is None else footprint / 1e9

  def step(self):
    return train_step(self.model, self.optimizer, self.x, self.y)

  def time_block(self, steps: int, record: bool = True) -> float:
    """Milliseconds per step of ``steps`` steps after the warm-up steps.

    Also records how long the step call takes to return (``dispatch_ms``: the host's
    share; when it reaches the step time, the loop is host-bound, not device-bound).
    """
    for _ in range(WARMUP_STEPS):
      self.step().block_until_ready()
    dispatch = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
      t1 = time.perf_counter()
      loss = self.step()
      dispatch += time.perf_counter() - t1
    loss.block_until_ready()
    ms = (time.perf_counter() - t0) / steps * 1e3
    if not record:
      return ms
    self.row["round_dispatch_ms"].append(dispatch / steps * 1e3)
    self.row["dispatch_ms"] = statistics.median(self.row["round_dispatch_ms"])
    self.row["last_loss"] = float(loss)
    self.row["round_ms"].append(ms)
    self.row["ms_per_step"] = statistics.median(self.row["round_ms"])
    return ms

  def release(self) -> None:
    self.model = self.optimizer = None


def profile_step(run: Run) -> dict:
  """One step's CUPTI kernels: the largest by device time, their sum, the total."""
  try:
    from kernel_profile import profile_kernels  # pylint: disable=import-outside-toplevel

    class CompiledStep(jax.stages.Wrapped):
      # CUPTI's measure jits whatever is not already a jitted callable; the nnx.jit step
      # is one (it must not be traced again inside jax.jit, which would leak its state).
      def __call__(self):
        return run.step()

    _, total_ms, kernels = profile_kernels(CompiledStep())
    top = kernels[:TOP_KERNELS]
    return {"device_ms": total_ms, "launches": sum(n for _, n, _ in kernels),
            "top_kernels_ms": sum(t for _, _, t in top), "top_kernels": top}
  except Exception as e:  # pylint: disable=broad-except
    return {"error": _error(e)}


def process_peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def machine_info() -> dict:
  dev = jax.devices()[0]
  return {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
          "num_devices": jax.device_count(), "platform": platform.platform(),
          "python": platform.python_version(), "jax": jax.__version__,
          "flax": flax.__version__, "optax": optax.__version__,
          "ortho_optax": ortho_optax.__version__}


def fill_ratios(rows: list[dict]) -> None:
  base = next((r["ms_per_step"] for r in rows if r["optimizer"] == BASELINE), None)
  for r in rows:
    r["vs_adamw"] = (r["ms_per_step"] / base - 1
                     if base and r["ms_per_step"] is not None else None)


def table(meta: dict, rows: list[dict]) -> str:
  peak = meta.get("process_peak_bytes_in_use")
  lines = [
      f"{meta['device']}, jax {meta['jax']}, preset {meta['preset']}, "
      f"{meta['batch']} x {meta['seq']} tokens/step, median of {meta['rounds']} rounds of "
      f"{meta['steps']} steps ({meta['date']}). Peak memory: the compiled step's "
      "arguments + outputs + temporaries - aliases (XLA memory_analysis); process-wide "
      "peak_bytes_in_use of the whole run: "
      + ("n/a" if peak is None else f"{peak / 1e9:.2f} GB") + ".",
      "",
      "| optimizer | ms / step | vs optax.adamw | first step (compile) | "
      "peak memory, compiled step (GB) | host ms / step | note |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    ms = "–" if r["ms_per_step"] is None else f"{r['ms_per_step']:.1f}"
    rel = ("–" if r["vs_adamw"] is None or r["optimizer"] == BASELINE
           else f"{100 * r['vs_adamw']:+.1f}%")
    comp = "–" if r["compile_s"] is None else f"{r['compile_s']:.1f} s"
    mem = "–" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.2f}"
    note = r["error"] or r["skipped"] or ""
    host = "–" if r.get("dispatch_ms") is None else f"{r['dispatch_ms']:.1f}"
    lines.append(f"| {r['optimizer']} | {ms} | {rel} | {comp} | {mem} | {host} | "
                 f"{note.replace('|', '/').splitlines()[0] if note else ''} |")
  return "\n".join(lines)


def write(out: pathlib.Path, meta: dict, rows: list[dict]) -> str:
  meta["process_peak_bytes_in_use"] = process_peak_bytes()
  fill_ratios(rows)
  out.mkdir(parents=True, exist_ok=True)
  (out / "bench_user_loop.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
  md = table(meta, rows)
  (out / "bench_user_loop.md").write_text(md + "\n")
  return md


def compile_all(runs: list[Run], args, meta: dict, save) -> list[Run]:
  """Builds and times the first step of every run, in order; returns those to time.

  Failures, non-finite first losses and the compile limits of ``args`` are recorded in
  the rows, a failed memory analysis in ``meta["memory_analysis_errors"]``; ``save()``
  is called after every optimizer.
  """
  timed = []
  start = time.perf_counter()
  for i, run in enumerate(runs):
    r, tag = run.row, f"[compile {i + 1}/{len(runs)}] {run.name}"
    elapsed = time.perf_counter() - start
    if args.compile_budget is not None and elapsed > args.compile_budget:
      r["skipped"] = (f"not compiled: the compile phase took {elapsed:.0f} s > "
                      f"--compile-budget {args.compile_budget:g} s")
      print(f"{tag}: {r['skipped']}", flush=True)
      save()
      continue
    print(f"{tag} ...", flush=True)
    try:
      run.build_and_compile()
      if not np.isfinite(r["first_loss"]):
        r["error"] = f"first loss is {r['first_loss']}"
    except Exception as e:  # pylint: disable=broad-except
      r["error"] = _error(e)
    if r["error"] is None:
      try:
        run.read_footprint()
      except Exception as e:  # pylint: disable=broad-except
        meta.setdefault("memory_analysis_errors", {})[run.name] = _error(e)
        print(f"  {run.name}: no memory analysis: {_error(e)}", flush=True)
    if (r["error"] is None and args.skip_on_compile_over is not None
        and r["compile_s"] > args.skip_on_compile_over):
      r["skipped"] = (f"first step {r['compile_s']:.1f} s > --skip-on-compile-over "
                      f"{args.skip_on_compile_over:g} s")
    if r["error"] is None and r["skipped"] is None:
      timed.append(run)
    else:
      run.release()
    print(f"{tag}: " + (r["error"] or r["skipped"] or (
        f"first step {r['compile_s']:.1f} s, loss {r['first_loss']:.3f}"
        + ("" if r["peak_mem_gb"] is None else f", compiled step {r['peak_mem_gb']:.2f} GB"))),
        flush=True)
    save()
  return timed


def time_rounds(timed: list[Run], args, meta: dict, save) -> None:
  """The interleaved timing rounds; a run that fails is recorded and dropped.

  One untimed round first: the GPU idles at a low clock through the compilations, and
  whichever optimizer were timed first would pay for its ramp-up. Then the objects alive
  (every model and optimizer state of the run) are moved out of the garbage collector's
  reach (``gc.freeze``): a user's loop holds one model, and the collector's full passes
  over all of them landed in random timed blocks (20-55 ms a step on an H200).
  """
  for run in timed:
    run.time_block(args.steps, record=False)
  gc.collect()
  gc.freeze()
  meta["gc"] = "gc.freeze() after the compile phase and the untimed round"
  try:
    for rnd in range(args.rounds):
      meta["status"] = f"timing round {rnd + 1}/{args.rounds}"
      for run in (timed if rnd % 2 == 0 else timed[::-1]):
        try:
          run.time_block(args.steps)
        except Exception as e:  # pylint: disable=broad-except
          run.row["error"] = f"timing round {rnd + 1}: {_error(e)}"
          run.release()
      timed[:] = [run for run in timed if run.model is not None]
      save()
      print(f"[round {rnd + 1}/{args.rounds}] " + ", ".join(
          f"{run.name} {run.row['round_ms'][-1]:.2f}" for run in timed) + " ms/step",
          flush=True)
  finally:
    gc.unfreeze()  # main() also runs in-process (tests, notebooks)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="small", choices=sorted(user_gpt.PRESETS))
  p.add_argument("--batch", type=int, default=32, help="sequences per step")
  p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
  p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
  p.add_argument("--steps", type=int, default=10, help="timed steps per optimizer per round")
  p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                 choices=[*OPTIMIZERS, *VARIANTS], metavar="NAME",
                 help=f"subset of: {' '.join(OPTIMIZERS)} (default: all), or the variants "
                      f"{' '.join(VARIANTS)} (Gram Newton-Schulz)")
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  p.add_argument("--profile", action="store_true",
                 help="after timing, one CUPTI-profiled step per optimizer (GPU)")
  p.add_argument("--compile-cache", metavar="DIR",
                 help="enable JAX's persistent compilation cache in DIR (off by default, "
                      "so that compile_s is a cold compile)")
  p.add_argument("--skip-on-compile-over", type=float, metavar="SECONDS",
                 help="leave out of the timing rounds an optimizer whose first step took "
                      "longer")
  p.add_argument("--compile-budget", type=float, metavar="SECONDS",
                 help="start no further first step once the compile phase has taken this "
                      "long (the rest are recorded as skipped), so that the timing rounds "
                      "still run within a job's time limit")
  args = p.parse_args(argv)
  for name in ("batch", "seq", "rounds", "steps"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  for name in ("skip_on_compile_over", "compile_budget"):
    value = getattr(args, name)
    if value is not None and not 0 < value < float("inf"):
      p.error(f"--{name.replace('_', '-')} must be a positive number of seconds, got {value}")
  args.optimizers = list(dict.fromkeys(args.optimizers))
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  command = shlex.join([sys.argv[0] if argv is None else __file__]
                       + (sys.argv[1:] if argv is None else list(argv)))
  if args.compile_cache:
    jax.config.update("jax_compilation_cache_dir", args.compile_cache)
  out = pathlib.Path(args.out)
  cfg = user_gpt.get_config(args.preset, seq_len=args.seq)
  meta = {**machine_info(),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "command": command, "preset": args.preset, "model": dataclasses.asdict(cfg),
          "batch": args.batch, "seq": args.seq, "rounds": args.rounds, "steps": args.steps,
          "warmup_steps": WARMUP_STEPS, "compile_cache": args.compile_cache,
          "skip_on_compile_over": args.skip_on_compile_over,
          "compile_budget": args.compile_budget,
          "peak_mem_gb": "compiled step: arguments + outputs + temporaries - aliases "
                         "(memory_analysis), 1e9 bytes",
          "status": "compiling", "process_peak_bytes_in_use": None}
  print(f"# {meta['device']} ({meta['backend']}), jax {meta['jax']}, flax {meta['flax']}, "
        f"preset {args.preset}, {args.batch} x {args.seq} tokens/step", flush=True)

  tokens = np.random.default_rng(0).integers(0, min(cfg.vocab_size, 50257),
                                             (args.batch, args.seq + 1))
  x, y = jnp.asarray(tokens[:, :-1], jnp.int32), jnp.asarray(tokens[:, 1:], jnp.int32)
  runs = [Run(name, cfg, x, y) for name in args.optimizers]
  rows = [r.row for r in runs]
  write(out, meta, rows)

  timed = compile_all(runs, args, meta, lambda: write(out, meta, rows))
  time_rounds(timed, args, meta, lambda: write(out, meta, rows))
  if args.profile:
    meta["status"] = "profiling"
    profiles = {}
    for run in timed:
      profiles[run.name] = p = profile_step(run)
      print(f"[profile] {run.name}: " + (p["error"] if "error" in p else
            f"{p['device_ms']:.2f} ms device time, {p['launches']} launches"), flush=True)
      (out / "bench_user_loop_profile.json").write_text(json.dumps(
          {"meta": meta, "profiles": profiles}, indent=1))

  meta["status"] = "done"
  md = write(out, meta, rows)
  print()
  print(md, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
