"""Gram Newton–Schulz vs standard Newton–Schulz on XLA, bf16, one GPU (one run, one table).

Usage: python benchmarks/bench_gram_ns.py [--out DIR] [--coefficients quintic] [--steps 5]
                                          [--restarts 2,3] [--quick]

For each shape, ``ortho_optax.newton_schulz(backend="xla")`` and
``ortho_optax.gram_newton_schulz`` (one row per ``restart_every`` of ``--restarts``, ``none``
for no restart) at the same coefficients and steps, bf16 compute:

* ``wall_ms``: one jitted call, ``block_until_ready``, median of 30 after a warm-up (host
  dispatch included);
* ``loop_ms``: 10 calls inside one jitted ``fori_loop`` (output fed back), per call, median
  of 5 (device time without dispatch gaps);
* ``dist_gauss`` / ``dist_ill``: RMS distance ``‖out − UVᵀ‖_F / sqrt(m)`` to the exact polar
  factor, for a Gaussian input (``UVᵀ`` from a float64 SVD on the host) and for an
  ill-conditioned one built as ``U·diag(σ)·Vᵀ`` with σ log-spaced over 3 decades (``UVᵀ``
  known exactly); stacks are measured on their first 4 matrices;
* ``flop_ratio``: Gram NS / standard NS flops (:func:`gram_newton_schulz_flops`) and
  ``prefers_gram``, the dispatcher's rule, for comparison with the measured ``speedup``.

Writes ``bench_gram_ns.json`` under ``--out`` (default ``$OUT`` or ``.``); the table last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ortho_optax.coefficients import resolve_coefficients
from ortho_optax.gram_newton_schulz import (
    gram_newton_schulz,
    gram_newton_schulz_flops,
    newton_schulz_flops,
    prefers_gram,
)
from ortho_optax.newton_schulz import newton_schulz

# (batch, m, n): the issue's wide shapes, GPT-2-small's stacks, and two calibration
# shapes for prefers_gram (n = 2m and square).
SHAPES = [(1, 768, 3072), (1, 1024, 4096), (1, 2048, 8192), (48, 768, 768), (24, 768, 3072),
          (1, 2048, 4096), (1, 2048, 2048)]
QUICK_SHAPES = [(1, 32, 128), (3, 16, 16)]
MEASURED = 4  # matrices of a stack whose distance to the polar factor is measured


def log(*a):
  print(*a, flush=True)


def make_inputs(batch, m, n, seed=0):
  """``(gaussian, its polar factor, ill-conditioned, its polar factor)``, host float64
  polar factors of the first :data:`MEASURED` matrices."""
  rng = np.random.default_rng(seed)
  gauss = rng.standard_normal((batch, m, n), dtype=np.float32)
  k = min(batch, MEASURED)
  u, _, vt = np.linalg.svd(gauss[:k].astype(np.float64), full_matrices=False)
  gauss_polar = u @ vt
  sigma = np.logspace(0, -3, m)
  ill, ill_polar = [], []
  for i in range(batch):
    uu, _ = np.linalg.qr(rng.standard_normal((m, m)))
    vv, _ = np.linalg.qr(rng.standard_normal((n, m)))
    ill.append(((uu * sigma) @ vv.T).astype(np.float32))
    if i < k:
      ill_polar.append(uu @ vv.T)
  return jnp.asarray(gauss), gauss_polar, jnp.asarray(np.stack(ill)), np.stack(ill_polar)


def distance(out, polar):
  got = np.asarray(out[:polar.shape[0]], np.float64)
  return float(np.sqrt(np.mean(np.sum((got - polar) ** 2, axis=(-2, -1)) / polar.shape[-2])))


def wall_ms(fn, x, trials=30):
  jax.block_until_ready(fn(x))
  ts = []
  for _ in range(trials):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(x))
    ts.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(ts)


def loop_ms(fn, x, reps=10, trials=5):
  loop = jax.jit(lambda x: jax.lax.fori_loop(0, reps, lambda _, y: fn(y).astype(y.dtype), x))
  jax.block_until_ready(loop(x))
  ts = []
  for _ in range(trials):
    t0 = time.perf_counter()
    jax.block_until_ready(loop(x))
    ts.append((time.perf_counter() - t0) / reps)
  return 1e3 * statistics.median(ts)


def algorithms(coefficients, steps, restarts):
  """``[(name, 'ns' or restart_every, jitted fn)]``."""
  kw = dict(steps=steps, coefficients=coefficients, compute_dtype=jnp.bfloat16)
  algos = [("newton_schulz", "ns", jax.jit(lambda x: newton_schulz(x, backend="xla", **kw)))]
  for r in restarts:
    algos.append((f"gram(restart_every={r})", r, jax.jit(
        lambda x, r=r: gram_newton_schulz(x, restart_every=r, backend="xla", **kw))))
  return algos


def run(shapes, coefficients, steps, restarts):
  cubic = all(t[2] == 0.0 for t in resolve_coefficients(coefficients, steps))
  rows = []
  for batch, m, n in shapes:
    t0 = time.perf_counter()
    gauss, gauss_polar, ill, ill_polar = make_inputs(batch, m, n)
    base = None
    for name, r, fn in algorithms(coefficients, steps, restarts):
      row = dict(shape=[batch, m, n], algorithm=name)
      try:
        row["wall_ms"] = wall_ms(fn, gauss)
        row["loop_ms"] = loop_ms(fn, gauss)
        row["dist_gauss"] = distance(fn(gauss), gauss_polar)
        row["dist_ill"] = distance(fn(ill), ill_polar)
      except Exception as ex:  # keep the other rows
        row["error"] = f"{type(ex).__name__}: {ex}"[:300]
      if r == "ns":
        base = row
        row["flop_ratio"] = 1.0
      else:
        row["flop_ratio"] = (gram_newton_schulz_flops(m, n, steps=steps, restart_every=r,
                                                      cubic=cubic)
                             / newton_schulz_flops(m, n, steps=steps, cubic=cubic))
        row["prefers_gram"] = prefers_gram(m, n, steps=steps, restart_every=r, cubic=cubic)
        if base and "loop_ms" in base and "loop_ms" in row:
          row["speedup"] = base["loop_ms"] / row["loop_ms"]
      rows.append(row)
      log(json.dumps(row))
    log(f"# {batch}x{m}x{n} done in {time.perf_counter() - t0:.1f}s")
  return rows


def print_table(rows, meta):
  log(f"\nGram NS vs NS, XLA, bf16, {meta['coefficients']} x{meta['steps']} steps, "
      f"{meta['device']}")
  head = (f"{'shape':>16} {'algorithm':>24} {'wall ms':>8} {'loop ms':>8} {'speedup':>7} "
          f"{'flops':>6} {'dist gauss':>10} {'dist ill':>9} {'prefers':>7}")
  log(head)
  log("-" * len(head))
  fmt = lambda v, spec: format("-", ">" + spec.split(".")[0]) if v is None else format(v, spec)
  for r in rows:
    shape = "x".join(map(str, r["shape"]))
    if "error" in r:
      log(f"{shape:>16} {r['algorithm']:>24}  ERROR {r['error']}")
      continue
    log(f"{shape:>16} {r['algorithm']:>24} {fmt(r['wall_ms'], '8.3f')} "
        f"{fmt(r['loop_ms'], '8.3f')} {fmt(r.get('speedup'), '7.2f')} "
        f"{fmt(r['flop_ratio'], '6.2f')} {fmt(r['dist_gauss'], '10.4f')} "
        f"{fmt(r['dist_ill'], '9.4f')} {str(r.get('prefers_gram', '-')):>7}")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  p.add_argument("--coefficients", default="quintic")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--restarts", default="2,3",
                 help="comma-separated restart_every values, 'none' for no restart")
  p.add_argument("--quick", action="store_true", help="tiny shapes (a CPU smoke test)")
  args = p.parse_args()
  restarts = [r if r == "none" else int(r) for r in args.restarts.split(",") if r]
  meta = dict(coefficients=args.coefficients, steps=args.steps, restarts=restarts,
              device=str(jax.devices()[0].device_kind), jax=jax.__version__)
  t0 = time.perf_counter()
  rows = run(QUICK_SHAPES if args.quick else SHAPES, args.coefficients, args.steps,
             [None if r == "none" else r for r in restarts])
  meta["seconds"] = time.perf_counter() - t0
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "bench_gram_ns.json")
  with open(path, "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  log(f"wrote {path} ({meta['seconds']:.0f}s)")
  print_table(rows, meta)


if __name__ == "__main__":
  main()
