"""Newton–Schulz kernels vs the XLA path, on one Hopper GPU (one run, one table).

Usage: python benchmarks/bench_kernels.py [--out DIR] [--quick] [--skip-check]
       python benchmarks/bench_kernels.py --profile --skip-check    # the README's table
       python benchmarks/bench_kernels.py --tune --skip-check       # re-tune ns.TUNED

What it does, in order (each stage guarded, so a failure is reported and the rest runs):
1. ceilings: a plain bf16 8192³ ``jnp.matmul`` (TFLOP/s) and a device copy (TB/s);
2. checks: ``ortho_optax.pallas.newton_schulz`` vs an f32 XLA reference on fresh random
   inputs of many shapes (odd, batched), with the allocator poisoned by NaN buffers first
   so an unwritten tile cannot pass; NaN never passes;
3. timings: ``ortho_optax.newton_schulz(backend="pallas")`` vs ``backend="xla"`` for
   AOL + 4 steps (``turbo_aol``) and Frobenius + 5 quintic steps; device time per call is
   the call repeated 20x inside one jitted ``fori_loop`` (output fed back as input),
   wall time / 20 after ``block_until_ready``, warm-up first, median of 5;
4. per-GEMM breakdown (gram / poly / apply) on a few shapes;
5. optimizer level: one ``turbo_muon`` / ``muon`` update on a GPT-2-small tree.
``--profile`` replaces 3: the device time of one call as the sum of its kernels' CUPTI
durations (no host round trips between loop iterations, which inflate small calls), the
kernels' plan (``ns.TUNED``) next to the cost-model plan and XLA, every kernel listed;
it also profiles one optimizer update. ``--tune`` replaces 3 with a per-GEMM sweep of tile
/ epilogue / split-K configs whose winners time the whole call (checked against XLA).
Writes ``bench_kernels.json`` under ``--out`` (default ``$OUT`` or ``.``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

TURBO_AOL = ((3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
             (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012))
QUINTIC = ((4.0848, -6.8946, 2.9270),) + TURBO_AOL

SHAPES = [(1, 768, 768), (1, 768, 3072), (1, 1024, 4096), (1, 2048, 2048),
          (1, 4096, 4096), (1, 2048, 8192), (1, 8192, 8192), (48, 768, 768),
          (24, 768, 3072)]
def parse_shapes(text):
  """``"8192x8192,24x768x3072"`` -> ``[(1, 8192, 8192), (24, 768, 3072)]``."""
  shapes = []
  for item in text.split(","):
    try:
      dims = tuple(int(v) for v in item.split("x"))
    except ValueError:
      dims = ()
    if len(dims) not in (2, 3) or min(dims) < 1:
      raise SystemExit(f"--shapes: {item!r} is not MxN or BxMxN with positive sizes "
                       "(e.g. 8192x8192,24x768x3072)")
    shapes.append(dims if len(dims) == 3 else (1,) + dims)
  return shapes


CHECK_SHAPES = [(1, 256, 256), (1, 1000, 3000), (3, 300, 500), (2, 768, 3072),
                (1, 1024, 4096), (5, 130, 1030), (48, 768, 768), (1, 2048, 2048),
                (1, 4096, 4096), (2, 512, 512)]
REPS = 20


def log(*a):
  print(*a, flush=True)


def build_loop(fn, reps=REPS):
  """``fn`` repeated ``reps`` times in one jitted ``fori_loop`` (output fed back)."""
  def body(_, y):
    return jax.tree.map(lambda new, old: new.astype(old.dtype), fn(y), y)

  @jax.jit
  def loop(x):
    return jax.lax.fori_loop(0, reps, body, x)
  return loop


def _median_time(call, trials, reps):
  """Median seconds per repetition of ``call()`` (which runs ``reps`` repetitions)."""
  jax.block_until_ready(call())  # warm-up
  ts = []
  for _ in range(trials):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    ts.append((time.perf_counter() - t0) / reps)
  return statistics.median(ts), ts


def time_call(fn, x, reps=REPS, trials=5):
  """Median seconds per call of ``fn`` (x -> same-shape array), reps inside one jit."""
  loop = build_loop(fn, reps)
  jax.block_until_ready(loop(x))  # compile
  return _median_time(lambda: loop(x), trials, reps)


def _compile_pool(jobs, workers=None):
  """``(key, lower, args)`` jobs (``lower()`` gives a ``jax.stages.Lowered``): compiled
  and run once on a thread pool. Returns ``{key: (compiled, args)}`` or
  ``{key: exception}``."""
  from concurrent.futures import ThreadPoolExecutor

  def one(job):
    key, lower, args = job
    try:
      compiled = lower().compile()
      jax.block_until_ready(compiled(*args))
      return key, (compiled, args)
    except Exception as ex:  # pylint: disable=broad-except
      return key, ex
  with ThreadPoolExecutor(workers or min(16, os.cpu_count() or 4)) as pool:
    return dict(pool.map(one, jobs))


def precompile(jobs, workers=None):
  """Compiles and warms up the :func:`build_loop` of ``(key, fn, x)`` jobs on a pool.

  Mosaic GPU compilation is CPU-bound and dominates a sweep's time; XLA compiles release
  the GIL, so threads overlap it. Timing happens afterwards, one executable at a time
  (:func:`time_compiled`).
  """
  return _compile_pool([(key, lambda fn=fn, x=x: build_loop(fn).lower(x), (x,))
                        for key, fn, x in jobs], workers)


def time_compiled(entry, trials=5, reps=REPS):
  """Median seconds per call of a :func:`precompile` entry (``reps`` calls per run)."""
  compiled, args = entry
  return _median_time(lambda: compiled(*args), trials, reps)


def _ns_input(b, m, n):
  """The benchmark's bf16 input of one shape (the same for every path and run)."""
  x = jax.random.normal(jax.random.key(b * 7 + m + n), (b, m, n), jnp.float32)
  return x.astype(jnp.bfloat16)


def _derive_speed(row, peak):
  """Speed-up, TFLOP/s and fraction of the floor from a row's ``pallas_ms``/``xla_ms``."""
  if "pallas_ms" in row and "xla_ms" in row:
    row["speedup"] = row["xla_ms"] / row["pallas_ms"]
  if "pallas_ms" in row:
    row["tflops"] = row["flops"] / (row["pallas_ms"] * 1e-3) / 1e12
    row["floor_ms"] = row["flops"] / peak * 1e3
    row["frac_floor"] = row["floor_ms"] / row["pallas_ms"]


def ceilings():
  n = 8192
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (n, n), jnp.bfloat16)
  b = jax.random.normal(k2, (n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: jnp.matmul(a, b))
  jax.block_until_ready(f(a, b))
  ts = []
  for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(10):
      c = f(a, b)
    jax.block_until_ready(c)
    ts.append((time.perf_counter() - t0) / 10)
  t = statistics.median(ts)
  peak = 2 * n ** 3 / t
  x = jax.random.normal(k1, (1 << 28,), jnp.float32)  # 1 GiB
  g = jax.jit(lambda x: x * 1.0001)
  jax.block_until_ready(g(x))
  t0 = time.perf_counter()
  for _ in range(10):
    y = g(x)
  jax.block_until_ready(y)
  bw = 2 * x.nbytes / ((time.perf_counter() - t0) / 10)
  return peak, bw


def ns_flops(batch, m, n, steps):
  """One-triangle flops of ``steps`` NS steps on (batch, m, n), m <= n: 3m²n + m³ each."""
  m, n = min(m, n), max(m, n)
  return batch * steps * (3.0 * m * m * n + m ** 3)


def poison():
  """Fills (and frees) a few GiB with NaN so fresh buffers start as NaN garbage."""
  bufs = [jnp.full((1 << 28,), jnp.nan, jnp.float32) for _ in range(4)]
  jax.block_until_ready(bufs)
  del bufs


def rel_err(out, ref):
  out = np.asarray(out, np.float32)
  ref = np.asarray(ref, np.float32)
  if not np.all(np.isfinite(out)):
    return float("nan")
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def tile_max_err(out, ref, tile=128):
  """Largest per-128×128-tile relative error (an unwritten tile shows up here)."""
  out = np.asarray(out, np.float32)
  ref = np.asarray(ref, np.float32)
  worst = 0.0
  for i in range(0, ref.shape[-2], tile):
    for j in range(0, ref.shape[-1], tile):
      r = ref[..., i:i + tile, j:j + tile]
      o = out[..., i:i + tile, j:j + tile]
      worst = max(worst, float(np.linalg.norm(o - r) / (np.linalg.norm(r) + 1e-30)))
  return worst


def run_checks(results):
  from ortho_optax.pallas import ns
  import ortho_optax.pallas as opl
  rng = np.random.default_rng(int(time.time()))
  rows = []
  for (b, m, n) in CHECK_SHAPES:
    for aol, co in ((True, TURBO_AOL), (False, QUINTIC)):
      key = jax.random.key(int(rng.integers(1 << 30)))
      g = jax.random.normal(key, (b, m, n), jnp.float32)
      if not aol:
        g = g / jnp.linalg.norm(g, axis=(1, 2), keepdims=True)
      x = g.astype(jnp.bfloat16)
      try:
        poison()
        out = jax.block_until_ready(opl.newton_schulz(x, co, aol=aol, eps=1e-7))
        ref = ns.reference(x, co, aol=aol, eps=1e-7)
        ref_bf16 = ns.reference(x, co, aol=aol, eps=1e-7, dtype=jnp.bfloat16)
        e, et = rel_err(out, ref), tile_max_err(out, ref)
        e_xla = rel_err(ref_bf16, ref)
        ok = bool(np.isfinite(e) and e < 3e-2 and et < 6e-2)
        rows.append(dict(shape=[b, m, n], aol=aol, rel_err=e, tile_max=et,
                         xla_bf16_rel_err=e_xla, ok=ok))
        log(f"check {b}x{m}x{n} aol={aol}: rel {e:.2e} (xla bf16 {e_xla:.2e}) "
            f"worst tile {et:.2e} {'OK' if ok else 'FAIL'}")
      except Exception as ex:  # pylint: disable=broad-except
        rows.append(dict(shape=[b, m, n], aol=aol, error=repr(ex)[:2000], ok=False))
        log(f"check {b}x{m}x{n} aol={aol}: ERROR {ex!r}"[:3000])
        traceback.print_exc()
  results["checks"] = rows
  return all(r["ok"] for r in rows)


def _entry():
  try:
    from ortho_optax.newton_schulz import newton_schulz
    return newton_schulz
  except ImportError:
    return None


def _bf16_preconditioned(x, aol):
  """bf16 input of the kernels / jnp chain: Frobenius-normalised unless AOL."""
  xb = x.astype(jnp.bfloat16)
  if aol:
    return xb
  xf = xb.astype(jnp.float32)
  return (xf / (jnp.linalg.norm(xf, axis=(1, 2), keepdims=True) + 1e-7)).astype(jnp.bfloat16)


def ns_fn(backend, aol, direct=False):
  co = TURBO_AOL if aol else QUINTIC
  if direct and backend == "pallas":  # the kernels alone, without the dispatching entry
    import ortho_optax.pallas as opl
    return lambda x: opl.newton_schulz(_bf16_preconditioned(x, aol), co, aol=aol, eps=1e-6)
  if backend == "own_xla":
    from ortho_optax.pallas import ns as pns
    return lambda x: pns.reference(_bf16_preconditioned(x, aol), co, aol=aol,
                                   dtype=jnp.bfloat16)
  kw = (dict(steps=4, coefficients="turbo_aol", preconditioning="aol", eps=1e-6) if aol
        else dict(steps=5, coefficients="quintic", preconditioning="frobenius", eps=1e-7))
  entry = _entry()
  return lambda x: entry(x, backend=backend, **kw)


def run_timings(results, peak, shapes, direct=False, configs=(True, False)):
  has_xla = _entry() is not None and not direct
  xla_backend = "xla" if has_xla else "own_xla"
  rows = []
  for (b, m, n) in shapes:
    x = _ns_input(b, m, n)
    for aol in configs:
      steps = 4 if aol else 5
      row = dict(shape=[b, m, n], config="AOL+4" if aol else "Frob+5",
                 flops=ns_flops(b, m, n, steps))
      for name, backend in (("pallas", "pallas"), ("xla", xla_backend)):
        # If the dispatching entry point fails (it is developed alongside), fall back to
        # the kernels called directly / this script's own jnp chain, and say so.
        fallback = ("pallas", True) if name == "pallas" else ("own_xla", False)
        for attempt, (be, dr) in enumerate(((backend, direct), fallback)):
          try:
            t, ts = time_call(ns_fn(be, aol, dr), x)
            row[name + "_ms"] = t * 1e3
            row[name + "_trials_ms"] = [v * 1e3 for v in ts]
            row[name + "_path"] = be + (" direct" if dr and be == "pallas" else "")
            break
          except Exception as ex:  # pylint: disable=broad-except
            row[name + "_error"] = repr(ex)[:2000]
            log(f"timing {name} ({be}) {b}x{m}x{n} {row['config']}: ERROR {ex!r}"[:3000])
            traceback.print_exc()
            if (be, dr) == fallback:
              break
      _derive_speed(row, peak)
      rows.append(row)
      log(f"timing {b}x{m}x{n} {row['config']}: pallas {row.get('pallas_ms', float('nan')):.3f} "
          f"ms, xla {row.get('xla_ms', float('nan')):.3f} ms")
  results["timings"] = rows
  results["xla_backend"] = xla_backend
  return rows


def run_breakdown(results, shapes):
  """Per-GEMM times (one launch each) for the plan the wrapper would use."""
  from ortho_optax.pallas import matmul as mm, ns
  rows = []
  for (b, m, n) in shapes:
    mp, np_ = mm.round_up(m, ns.PAD), mm.round_up(n, ns.PAD)
    cfg = ns.plan(b, mp, np_)
    x = jax.random.normal(jax.random.key(3), (b, mp, np_), jnp.bfloat16) * 0.01
    a = jax.random.normal(jax.random.key(4), (b, mp, mp), jnp.bfloat16) * 0.01
    row = dict(shape=[b, m, n], plan=str(cfg))
    try:
      for kind, arg in (("gram", x), ("poly", a), ("apply", x)):
        row[kind + "_ms"] = time_call(_gemm_fns(a, kind, getattr(cfg, kind)), arg)[0] * 1e3
      row["xla_gram_ms"] = time_call(
          lambda x: jnp.matmul(x, jnp.swapaxes(x, 1, 2))[:, :, :1].sum() * 0 + x, x)[0] * 1e3
      row["xla_apply_ms"] = time_call(lambda x: 0.5 * x + jnp.matmul(a, x), x)[0] * 1e3
    except Exception as ex:  # pylint: disable=broad-except
      row["error"] = repr(ex)[:2000]
      log(f"breakdown {b}x{m}x{n}: ERROR {ex!r}"[:3000])
      traceback.print_exc()
    rows.append(row)
    log("breakdown", row)
  results["breakdown"] = rows


TUNE_SHAPES = [(1, 1024, 4096), (1, 2048, 2048), (1, 4096, 4096), (1, 8192, 8192),
               (48, 768, 768), (24, 768, 3072)]
TUNE_BASES = {
    "default": dict(),
    "prefetch": dict(prefetch_add=True),
    "banded4": dict(epilogue_rows=64, max_concurrent_steps=4),
    "t64": dict(tile_m=64, tile_n=64, max_concurrent_steps=4),
    "t64_prefetch": dict(tile_m=64, tile_n=64, max_concurrent_steps=4, prefetch_add=True),
}


def _gemm_fns(a, kind, cfg):
  from ortho_optax.pallas import matmul as mm
  if kind == "gram":  # keep the loop carry's shape: x -> x (A is consumed)
    return lambda x: x + 0 * mm.matmul(x, x, rhs_transposed=True, upper=True,
                                       config=cfg)[:, :1, :1]
  if kind == "poly":
    return lambda a_: mm.matmul(a_, a_, a_, alpha=0.5, beta=0.25, rhs_transposed=True,
                                upper=True, config=cfg)
  return lambda x: mm.matmul(a, x, x, alpha=0.5, config=cfg)


def run_tune(results, shapes, peak, configs=(True, False)):
  """Per-GEMM sweep (tile bases × split_k), the winners per shape into ``ns.TUNED``,
  then the whole NS call (library entry, tuned) against the XLA path."""
  import dataclasses
  from ortho_optax.pallas import matmul as mm, ns
  jobs, meta = [], {}
  for (b, m, n) in shapes:
    mp, np_ = mm.round_up(m, ns.PAD), mm.round_up(n, ns.PAD)
    x = jax.random.normal(jax.random.key(5), (b, mp, np_), jnp.bfloat16) * 0.02
    a = jax.random.normal(jax.random.key(6), (b, mp, mp), jnp.bfloat16) * 0.02
    dims = dict(gram=(x, mp, mp, np_, True), poly=(a, mp, mp, mp, True),
                apply=(x, mp, np_, mp, False))
    for kind, (arg, mm_, nn, kk, upper) in dims.items():
      for bname, over in TUNE_BASES.items():
        base = dataclasses.replace(mm.TuningConfig(), **over)
        if kind == "gram" and base.prefetch_add:
          continue  # no addend
        auto = mm.pick_split(b, mm_, nn, kk, upper=upper, base=base).split_k
        items = mm.work_items(b, mm_, nn, upper=upper, config=base) if (
            mm_ % (base.cta_n if upper else base.tile_m) == 0 and nn % base.cta_n == 0) else 0
        # split_k only pays when the output tiles leave SMs idle: try it then only.
        splits = {1, auto} | ({2 * auto} if items * auto < 2 * mm.num_sms() else set())
        for split in sorted(splits):
          if kk % (split * base.tile_k) or kk // split < 2 * base.tile_k or split > 16:
            continue
          if upper and mm_ % base.cta_n or (not upper and (mm_ % base.tile_m or nn % base.cta_n)):
            continue
          cfg = dataclasses.replace(base, split_k=split)
          key = ((b, m, n), kind, bname, split)
          meta[key] = (cfg, mm.flops(b, mm_, nn, kk, upper=upper), auto)
          jobs.append((key, _gemm_fns(a, kind, cfg), arg))
  t0 = time.time()
  compiled = precompile(jobs)
  log(f"tune: {len(jobs)} GEMM configs compiled in {time.time() - t0:.0f} s")
  rows, best = [], {}
  for key, entry in compiled.items():
    shape, kind, bname, split = key
    cfg, fl, auto = meta[key]
    row = dict(shape=list(shape), kind=kind, base=bname, split=split, auto=split == auto,
               config=str(cfg))
    if isinstance(entry, Exception):
      row["error"] = repr(entry)[:500]
    else:
      row["ms"] = time_compiled(entry, trials=3)[0] * 1e3
      row["tflops"] = fl / row["ms"] / 1e9
      if (shape, kind) not in best or row["ms"] < best[(shape, kind)][0]:
        best[(shape, kind)] = (row["ms"], cfg, bname, split)
    rows.append(row)
    log(f"tune {shape} {kind:5} {bname:13} split {split}{'*' if row['auto'] else ' '}: "
        f"{row.get('ms', float('nan')):.4f} ms {row.get('tflops', 0):.0f} TFLOP/s "
        f"{row.get('error', '')[:300]}")
  results["tune_sweep"] = rows
  tuned = {}
  for (b, m, n) in shapes:
    mp, np_ = mm.round_up(m, ns.PAD), mm.round_up(n, ns.PAD)
    picks = {k: best.get(((b, m, n), k)) for k in ("gram", "poly", "apply")}
    if all(picks.values()):
      cfg = ns.NSConfig(gram=picks["gram"][1], poly=picks["poly"][1], apply=picks["apply"][1])
      ns.TUNED[(b, mp, np_)] = cfg
      tuned[f"{b}x{mp}x{np_}"] = {k: dict(base=v[2], split=v[3], ms=v[0], config=str(v[1]))
                                  for k, v in picks.items()}
      default = {k: next((r["ms"] for r in rows if r["shape"] == [b, m, n] and r["kind"] == k
                          and r["base"] == "default" and r["auto"] and "ms" in r), None)
                 for k in picks}
      tuned[f"{b}x{mp}x{np_}"]["default_ms"] = default
      log(f"tuned {b}x{m}x{n}: " + ", ".join(
          f"{k} {v[2]}/split{v[3]} {v[0]:.4f} ms (default {default[k]})"
          for k, v in picks.items()))
  results["tuned"] = tuned
  # The whole call through the library entry (which now picks ns.TUNED) vs XLA.
  jobs = []
  for (b, m, n) in shapes:
    x = _ns_input(b, m, n)
    for aol in configs:
      for backend in ("pallas", "xla"):
        jobs.append((((b, m, n), aol, backend), ns_fn(backend, aol), x))
  t0 = time.time()
  compiled = precompile(jobs)
  log(f"tune: {len(jobs)} NS calls compiled in {time.time() - t0:.0f} s")
  out = {}
  for (shape, aol, backend), entry in compiled.items():
    b, m, n = shape
    row = out.setdefault((shape, aol), dict(
        shape=list(shape), config="AOL+4" if aol else "Frob+5",
        flops=ns_flops(b, m, n, 4 if aol else 5), plan="tuned"))
    if isinstance(entry, Exception):
      row[backend + "_error"] = repr(entry)[:1000]
      continue
    t, ts = time_compiled(entry)
    row[backend + "_ms"], row[backend + "_trials_ms"] = t * 1e3, [v * 1e3 for v in ts]
    row[backend + "_out"] = entry[0](*entry[1])  # 20 calls fed back: near the polar factor
  rows = []
  for row in out.values():
    # Correctness of the tuned kernels: after 20 chained calls both paths sit at the
    # polar factor; an unwritten or wrong tile would show as a large difference.
    if "pallas_out" in row and "xla_out" in row:
      row["loop_rel_err"] = rel_err(row["pallas_out"], row["xla_out"])
      row["ok"] = bool(np.isfinite(row["loop_rel_err"]) and row["loop_rel_err"] < 5e-2)
    row.pop("pallas_out", None)
    row.pop("xla_out", None)
    _derive_speed(row, peak)
    rows.append(row)
    log(f"tuned timing {row['shape']} {row['config']}: pallas {row.get('pallas_ms', float('nan')):.3f}"
        f" ms, xla {row.get('xla_ms', float('nan')):.3f} ms, loop rel err "
        f"{row.get('loop_rel_err', float('nan')):.2e} {'OK' if row.get('ok') else 'CHECK FAILED'}")
  results["timings"] = rows
  results["xla_backend"] = "xla"


def _raise(ex):
  raise ex


def _lower_then_compile(jobs):
  """``(key, fn, args, tuned)`` jobs: lowered one by one (``tuned=False`` with
  ``ns.TUNED`` emptied, i.e. the cost-model plan: a global, so not on the pool), then
  compiled on the pool of :func:`_compile_pool`."""
  from ortho_optax.pallas import ns
  saved = dict(ns.TUNED)
  lowered = []
  for key, fn, args, tuned in jobs:
    ns.TUNED.clear()
    if tuned:
      ns.TUNED.update(saved)
    try:
      low = jax.jit(fn).lower(*args)
      lowered.append((key, lambda low=low: low, args))
    except Exception as ex:  # pylint: disable=broad-except
      lowered.append((key, lambda ex=ex: _raise(ex), args))
  ns.TUNED.clear()
  ns.TUNED.update(saved)
  return _compile_pool(lowered)


def run_profile(results, shapes, peak):
  """Per-kernel device time (CUPTI) of one NS call, kernels (tuned and cost-model plans)
  vs XLA, and of one optimizer update on a GPT-2-small tree."""
  import optax
  import ortho_optax
  from kernel_profile import profile_kernels
  from ortho_optax.pallas import matmul as mm, ns
  jobs = []
  for (b, m, n) in shapes:
    x = _ns_input(b, m, n)
    padded = (b, mm.round_up(m, ns.PAD), mm.round_up(n, ns.PAD))
    for aol in (True, False):
      jobs.append((((b, m, n), aol, "pallas"), ns_fn("pallas", aol), (x,), True))
      jobs.append((((b, m, n), aol, "xla"), ns_fn("xla", aol), (x,), True))
      if padded in ns.TUNED:
        jobs.append((((b, m, n), aol, "pallas_costmodel"), ns_fn("pallas", aol), (x,), False))
  params = gpt2_small_tree(jax.random.key(0))
  grads = jax.tree.map(lambda p: p * 0.5 + 0.001, params)
  label_fn = lambda tree: {k: ("adam" if k in ("wte", "lm_head") else "ortho") for k in tree}
  for opt_name in ("turbo_muon", "muon", "adamw"):
    for backend in (("pallas", "xla") if opt_name != "adamw" else ("-",)):
      tx = (optax.adamw(3e-4) if opt_name == "adamw" else getattr(ortho_optax, opt_name)(
          learning_rate=0.02, backend=backend, label_fn=label_fn))
      state = tx.init(params)
      fn = lambda g, s, tx=tx: tx.update(g, s, params)
      jobs.append(((opt_name, None, backend), fn, (grads, state), True))
  t0 = time.time()
  compiled = _lower_then_compile(jobs)
  log(f"profile: {len(jobs)} programs compiled in {time.time() - t0:.0f} s")
  ns_rows, opt_rows = {}, {}
  for (what, aol, backend), entry in compiled.items():
    if isinstance(what, str):
      row = opt_rows.setdefault(what, dict(optimizer=what))
    else:
      b, m, n = what
      row = ns_rows.setdefault((what, aol), dict(
          shape=list(what), config="AOL+4" if aol else "Frob+5",
          flops=ns_flops(b, m, n, 4 if aol else 5)))
    name = "ms" if backend == "-" else backend + "_ms"
    if isinstance(entry, Exception):
      row[name.replace("_ms", "_error") if name != "ms" else "error"] = repr(entry)[:1000]
      log(f"profile {what} {aol} {backend}: ERROR {entry!r}"[:2000])
      continue
    try:
      _, t, kernels = profile_kernels(entry[0], *entry[1], iterations=7)
    except Exception as ex:  # pylint: disable=broad-except
      row[name.replace("_ms", "_error") if name != "ms" else "error"] = repr(ex)[:1000]
      log(f"profile {what} {backend}: CUPTI ERROR {ex!r}"[:2000])
      continue
    row[name] = t
    row[(backend if backend != "-" else "") + "_kernels"] = kernels[:25]
  for row in ns_rows.values():
    _derive_speed(row, peak)
    log(f"profile {row['shape']} {row['config']}: kernels {row.get('pallas_ms', float('nan')):.3f}"
        f" ms (cost-model plan {row.get('pallas_costmodel_ms', float('nan')):.3f}), xla "
        f"{row.get('xla_ms', float('nan')):.3f} ms, {row.get('speedup', float('nan')):.2f}x")
  for row in opt_rows.values():
    log(f"profile optimizer {row['optimizer']}: " + ", ".join(
        f"{k} {v:.3f}" for k, v in row.items() if k.endswith("ms")))
  results["profile"] = list(ns_rows.values())
  results["profile_optimizer"] = list(opt_rows.values())


def gpt2_small_tree(key):
  shapes = {}
  for i in range(12):
    for name in ("q", "k", "v", "o"):
      shapes[f"h{i}/attn/{name}"] = (768, 768)
    shapes[f"h{i}/mlp/fc"] = (768, 3072)
    shapes[f"h{i}/mlp/proj"] = (3072, 768)
  shapes["wte"] = (50304, 768)
  shapes["lm_head"] = (768, 50304)
  keys = jax.random.split(key, len(shapes))
  return {k: jax.random.normal(kk, s, jnp.float32) * 0.02
          for kk, (k, s) in zip(keys, shapes.items())}


def run_optimizer(results):
  """One optimizer update on a GPT-2-small tree (device time per update), kernels vs XLA,
  next to plain AdamW on the same tree (the part every optimizer pays)."""
  import optax
  import ortho_optax
  params = gpt2_small_tree(jax.random.key(0))
  grads = jax.tree.map(lambda p: p * 0.5 + 0.001, params)
  label_fn = lambda tree: {k: ("adam" if k in ("wte", "lm_head") else "ortho") for k in tree}

  def update_loop(tx):
    state = tx.init(params)

    def step(g):  # g -> g: one update, fed back so the loop cannot be hoisted
      upd, _ = tx.update(g, state, params)
      return jax.tree.map(lambda u, gg: (u + gg).astype(gg.dtype), upd, g)
    return step

  jobs = []
  for opt_name in ("turbo_muon", "muon"):
    for backend in ("pallas", "xla"):
      tx = getattr(ortho_optax, opt_name)(learning_rate=0.02, backend=backend,
                                          label_fn=label_fn)
      jobs.append(((opt_name, backend), update_loop(tx), grads))
  jobs.append((("adamw", "-"), update_loop(optax.adamw(3e-4)), grads))
  compiled = precompile(jobs)
  for key, entry in compiled.items():
    if isinstance(entry, Exception):
      log(f"optimizer {key}: ERROR {entry!r}"[:3000])
  rows = {}
  for (name, backend), entry in compiled.items():
    row = rows.setdefault(name, dict(optimizer=name))
    if isinstance(entry, Exception):
      row[backend + "_error"] = repr(entry)[:2000]
      continue
    t, _ = time_compiled(entry)
    row["ms" if backend == "-" else backend + "_ms"] = t * 1e3
  for row in rows.values():
    if "pallas_ms" in row and "xla_ms" in row:
      row["speedup"] = row["xla_ms"] / row["pallas_ms"]
    log("optimizer", row)
  results["optimizer"] = list(rows.values())


def print_table(results):
  peak = results.get("peak_tflops", float("nan"))
  log(f"\nmatmul peak (bf16 8192^3 jnp): {peak:.0f} TFLOP/s; copy "
      f"{results.get('copy_tbps', float('nan')):.2f} TB/s; XLA path = {results.get('xla_backend')}")
  log(f"{'shape':<16} {'cfg':>6} {'pallas ms':>10} {'xla ms':>8} {'speedup':>7} "
      f"{'TFLOP/s':>7} {'floor ms':>8} {'%floor':>6}")
  for r in results.get("timings", []):
    b, m, n = r["shape"]
    s = f"{m}x{n}" if b == 1 else f"{b}x{m}x{n}"
    f = lambda k, fmt: format(r[k], fmt) if k in r else "ERR"
    log(f"{s:<16} {r['config']:>6} {f('pallas_ms', '10.3f')} {f('xla_ms', '8.3f')} "
        f"{f('speedup', '7.2f')} {f('tflops', '7.0f')} {f('floor_ms', '8.3f')} "
        f"{(format(100 * r['frac_floor'], '6.0f') if 'frac_floor' in r else 'ERR')} "
        f"{r.get('xla_path', '')}")
  t = {(tuple(r["shape"]), r["config"]): r for r in results.get("timings", [])}
  for cfg in ("AOL+4", "Frob+5"):
    a, b = t.get(((48, 768, 768), cfg)), t.get(((24, 768, 3072), cfg))
    if a and b and "pallas_ms" in a and "pallas_ms" in b and "xla_ms" in a and "xla_ms" in b:
      p, x = a["pallas_ms"] + b["pallas_ms"], a["xla_ms"] + b["xla_ms"]
      log(f"GPT-2-small matrix set {cfg}: pallas {p:.3f} ms, xla {x:.3f} ms, {x / p:.2f}x")
  if results.get("profile"):
    log(f"\nper-call device time (CUPTI kernel sum, median of 7), peak {peak:.0f} TFLOP/s")
    log(f"{'shape':<16} {'cfg':>6} {'kernels':>8} {'costmodel':>9} {'xla':>8} {'speedup':>7} "
        f"{'%floor':>6}")
    for r in results["profile"]:
      b, m, n = r["shape"]
      sh = f"{m}x{n}" if b == 1 else f"{b}x{m}x{n}"
      g = lambda k: format(r[k], "8.3f") if k in r else "     ERR"
      log(f"{sh:<16} {r['config']:>6} {g('pallas_ms')} {g('pallas_costmodel_ms'):>9} "
          f"{g('xla_ms')} {format(r['speedup'], '7.2f') if 'speedup' in r else '    ERR'} "
          f"{format(100 * r['frac_floor'], '6.0f') if 'frac_floor' in r else '   ERR'}")
    p = {(tuple(r["shape"]), r["config"]): r for r in results["profile"]}
    for cfg in ("AOL+4", "Frob+5"):
      a, b_ = p.get(((48, 768, 768), cfg)), p.get(((24, 768, 3072), cfg))
      if a and b_ and all(k in a and k in b_ for k in ("pallas_ms", "xla_ms")):
        k_, x_ = a["pallas_ms"] + b_["pallas_ms"], a["xla_ms"] + b_["xla_ms"]
        log(f"GPT-2-small matrix set {cfg} (device time): kernels {k_:.3f} ms, xla {x_:.3f} ms,"
            f" {x_ / k_:.2f}x")
    for r in results.get("profile_optimizer", []):
      log(f"optimizer update {r['optimizer']} (device time): " + ", ".join(
          f"{k[:-3] or 'total'} {v:.3f} ms" for k, v in r.items() if k.endswith("ms")))
  if results.get("stack"):
    log("\nNS stack building (CUPTI device ms, TB/s of read + write; * = not bit-exact)")
    for r in results["stack"]:
      cells = []
      for k in sorted(k[:-3] for k in r if k.endswith("_ms")):
        mark = "" if r.get(k + "_exact", True) else "*"
        cells.append(f"{k} {r[k + '_ms']:.3f} ({r[k + '_tbps']:.2f}){mark}")
      log(f"{r['pieces']}x{r['shape'][0]}x{r['shape'][1]}: " + ", ".join(cells))
  for r in results.get("grouped", []):
    log(f"GPT-2-small set {r['config']} (device ms): one call per stack "
        f"{r.get('separate_ms', float('nan')):.3f} ({r.get('separate_launches')} launches), "
        f"grouped {r.get('grouped_ms', float('nan')):.3f} ({r.get('grouped_launches')} launches)")
  for r in results.get("optimizer", []):
    if "ms" in r:
      log(f"optimizer {r['optimizer']}: {r['ms']:.3f} ms")
      continue
    log(f"optimizer {r['optimizer']}: pallas {r.get('pallas_ms', float('nan')):.3f} ms, "
        f"xla {r.get('xla_ms', float('nan')):.3f} ms, {r.get('speedup', float('nan')):.2f}x")


def run_stack(results):
  """Device time (CUPTI) of building the optimizer's NS stacks of a GPT-2-small tree:
  XLA's concatenate (bf16, and bf16 pairs bitcast to uint32) against
  ``ortho_optax.pallas.stack.concatenate`` (TMA copies) at a few block sizes."""
  from kernel_profile import profile_kernels
  from ortho_optax.pallas import stack

  def u32_concat(pieces):
    as_u32 = [lax.bitcast_convert_type(p.reshape(p.shape[:-1] + (p.shape[-1] // 2, 2)),
                                       jnp.uint32) for p in pieces]
    out = jnp.concatenate(as_u32, axis=0)
    return lax.bitcast_convert_type(out, jnp.bfloat16).reshape(
        (out.shape[0],) + pieces[0].shape[1:])

  variants = {"xla": lambda ps: jnp.concatenate(ps, axis=0), "xla_u32": u32_concat}
  for br in (32, 64, 128):
    variants[f"tma_rows{br}"] = functools.partial(
        stack.concatenate, config=stack.StackConfig(block_rows=br))
  rows = []
  for count, shape in ((48, (768, 768)), (24, (768, 3072))):
    keys = jax.random.split(jax.random.key(1), count)
    pieces = [jax.random.normal(k, (1,) + shape, jnp.float32).astype(jnp.bfloat16)
              for k in keys]
    nbytes = 2 * 2 * count * shape[0] * shape[1]  # read + write
    ref = jnp.concatenate(pieces, axis=0)
    row = dict(pieces=count, shape=list(shape), bytes_moved=nbytes)
    for name, fn in variants.items():
      try:
        f = jax.jit(fn)
        out = f(pieces)
        row[name + "_exact"] = bool(jnp.array_equal(out, ref))
        _, t, kernels = profile_kernels(f, pieces, iterations=7)
        row[name + "_ms"] = t
        row[name + "_tbps"] = nbytes / (t * 1e-3) / 1e12
        row[name + "_kernels"] = kernels[:4]
      except Exception as ex:  # pylint: disable=broad-except
        row[name + "_error"] = repr(ex)[:1000]
        log(f"stack {count}x{shape} {name}: ERROR {ex!r}"[:2000])
    log("stack", {k: v for k, v in row.items() if not k.endswith("kernels")})
    rows.append(row)
  results["stack"] = rows


def run_grouped(results):
  """Device time (CUPTI) of Newton–Schulz on the GPT-2-small set (48×768² and
  24×768×3072): one call per stack against ``ns.newton_schulz_many`` (each GEMM of a
  step one launch for both stacks)."""
  from kernel_profile import profile_kernels
  from ortho_optax.pallas import ns
  xs = [_ns_input(48, 768, 768), _ns_input(24, 768, 3072)]
  rows = []
  for aol, co in ((True, TURBO_AOL), (False, QUINTIC)):
    row = dict(config="AOL+4" if aol else "Frob+5")
    variants = {
        "separate": lambda v, co=co, aol=aol: [ns.newton_schulz(x, co, aol=aol) for x in v],
        "grouped": lambda v, co=co, aol=aol: ns.newton_schulz_many(v, co, aol=aol),
    }
    for name, fn in variants.items():
      try:
        _, t, kernels = profile_kernels(jax.jit(fn), xs, iterations=7)
        row[name + "_ms"] = t
        row[name + "_launches"] = sum(n for _, n, _ in kernels)
      except Exception as ex:  # pylint: disable=broad-except
        row[name + "_error"] = repr(ex)[:1000]
        log(f"grouped {row['config']} {name}: ERROR {ex!r}"[:2000])
    log("grouped", row)
    rows.append(row)
  results["grouped"] = rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  ap.add_argument("--quick", action="store_true", help="fewer shapes")
  ap.add_argument("--skip-check", action="store_true")
  ap.add_argument("--skip-optimizer", action="store_true")
  ap.add_argument("--breakdown", action="store_true")
  ap.add_argument("--skip-timings", action="store_true")
  ap.add_argument("--direct", action="store_true",
                  help="time ortho_optax.pallas.newton_schulz vs this script's jnp chain")
  ap.add_argument("--aol-only", action="store_true")
  ap.add_argument("--shapes", default=None, help="e.g. 8192x8192,24x768x3072")
  ap.add_argument("--profile", action="store_true",
                  help="per-kernel CUPTI device time of one call per --shapes (default "
                       "TUNE_SHAPES) and of one optimizer update (replaces timings)")
  ap.add_argument("--grouped", action="store_true",
                  help="time NS of the GPT-2-small set, grouped vs one call per stack")
  ap.add_argument("--stack", action="store_true",
                  help="time the NS stack concatenation variants (replaces timings)")
  ap.add_argument("--tune", action="store_true",
                  help="per-GEMM sweep on the --shapes (default TUNE_SHAPES), winners into "
                       "ns.TUNED, then the whole call timed with them (replaces timings)")
  args = ap.parse_args()
  results = dict(device=str(jax.devices()[0]), jax=jax.__version__,
                 time=time.strftime("%Y-%m-%d %H:%M:%S"))
  path = os.path.join(args.out, "bench_kernels.json")

  def save():
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w") as f:
      json.dump(results, f, indent=1)

  import ortho_optax.pallas as opl
  results["pallas_available"] = opl.is_available()
  log("device", results["device"], "pallas available", results["pallas_available"])
  peak, bw = ceilings()
  results["peak_tflops"], results["copy_tbps"] = peak / 1e12, bw / 1e12
  log(f"peak {peak / 1e12:.0f} TFLOP/s, copy {bw / 1e12:.2f} TB/s")
  save()
  if not args.skip_check:
    results["checks_ok"] = run_checks(results)
    save()
  shapes = SHAPES if not args.quick else [SHAPES[i] for i in (2, 3, 4, 7, 8)]
  if args.shapes:
    shapes = parse_shapes(args.shapes)
  if args.profile:
    run_profile(results, shapes if args.shapes else TUNE_SHAPES, peak)
    save()
  if args.stack:
    run_stack(results)
    save()
  if args.grouped:
    run_grouped(results)
    save()
  if args.tune:
    run_tune(results, shapes if args.shapes else TUNE_SHAPES, peak,
             configs=(True,) if args.aol_only else (True, False))
    save()
  elif not (args.skip_timings or args.profile or args.stack or args.grouped):
    run_timings(results, peak, shapes, direct=args.direct,
                configs=(True,) if args.aol_only else (True, False))
    save()
  if args.breakdown:
    run_breakdown(results, [(1, 4096, 4096), (1, 1024, 4096), (48, 768, 768)])
    save()
  if not args.skip_optimizer:
    run_optimizer(results)
    save()
  print_table(results)
  save()
  log("wrote", path)


if __name__ == "__main__":
  sys.exit(main())
