"""Gram Newton–Schulz vs standard Newton–Schulz, kernels and XLA, bf16, one GPU, one run.

Usage: python benchmarks/bench_gram_ns.py [--out PATH.json|DIR] [--restarts 2[,3,none]]
                                          [--budget-s 220] [--trials 20] [--quick]

For each shape and each configuration (``muon5``: Keller's coefficients, 5 steps,
Frobenius; ``aol4``: Turbo-Muon's ``turbo_aol`` table, 4 steps, AOL), four
implementations through the orthogonalizers the optimizers use
(:mod:`ortho_optax.orthogonalizers`), bf16 compute:

* ``ns_kernels``: standard NS on the Hopper kernels (``backend="pallas"``);
* ``gram_kernels``: Gram NS on the Hopper kernels for the stacks ``prefers_gram`` picks
  (the wide ones here; a square stack of the ``gpt2_small`` group keeps the NS kernels),
  one row per ``restart_every`` of ``--restarts`` (``none``: no restart);
* ``ns_xla``: standard NS in XLA;
* ``gram_xla``: Gram NS in XLA, the same choice of stacks.

Measured per row: ``wall_ms``, one jitted call with ``block_until_ready``, median of
``--trials`` after two warm-up calls (host dispatch included); ``dist_gauss`` /
``dist_ill``, the RMS distance ``‖out − UVᵀ‖_F / sqrt(m)`` of the first
:data:`MEASURED` matrices to their exact polar factor, for a Gaussian input (``UVᵀ`` from a
float64 SVD on the host) and an ill-conditioned one ``U·diag(σ)·Vᵀ`` with σ log-spaced over
3 decades (``UVᵀ`` known); ``speedup``, ``ns_kernels``'s (``ns_xla``'s for the XLA rows)
``wall_ms`` over this row's. Shapes: the issue's wide matrices 768×3072, 1024×4096 and
2048×8192, GPT-2 small's 24×768×3072 MLP stack, and ``gpt2_small``: its two stacks
(48×768² and 24×768×3072) in one call, as the optimizer runs them.

Rows are appended to the JSON (``--out``: a ``.json`` path, or a folder for
``bench_gram_ns.json``; default ``$OUT`` or ``.``) as they finish, so a run cut short keeps
what it measured; shapes past ``--budget-s`` seconds are skipped. The table is printed
last.
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

from ortho_optax import orthogonalizers as orth_lib
from ortho_optax import pallas
from ortho_optax.gram_newton_schulz import (
    gram_newton_schulz_flops,
    newton_schulz_flops,
    prefers_gram,
)

#: name -> stacks ``[(batch, m, n), ...]`` run in one call.
SHAPES = {
    "768x3072": [(1, 768, 3072)],
    "1024x4096": [(1, 1024, 4096)],
    "2048x8192": [(1, 2048, 8192)],
    "24x768x3072": [(24, 768, 3072)],
    "gpt2_small": [(48, 768, 768), (24, 768, 3072)],
}
QUICK_SHAPES = {"32x128": [(1, 32, 128)], "tiny_gpt": [(3, 16, 16), (2, 16, 64)]}
#: name -> (coefficients, steps, preconditioning, eps).
CONFIGS = {
    "muon5": ("muon", 5, "frobenius", 1e-7),
    "aol4": ("turbo_aol", 4, "aol", 1e-6),
}
IMPLEMENTATIONS = ("ns_kernels", "gram_kernels", "ns_xla", "gram_xla")
MEASURED = 2  # matrices of a stack whose distance to the polar factor is measured


def log(*a):
  print(*a, flush=True)


def make_inputs(batch, m, n, seed):
  """``(gaussian, its polar factors, ill-conditioned, its polar factors)``: float32 stacks
  and float64 host polar factors of the first :data:`MEASURED` matrices (the
  ill-conditioned stack is the Gaussian one with those matrices replaced)."""
  rng = np.random.default_rng(seed)
  gauss = rng.standard_normal((batch, m, n), dtype=np.float32)
  k = min(batch, MEASURED)
  u, _, vt = np.linalg.svd(gauss[:k].astype(np.float64), full_matrices=False)
  ill = gauss.copy()
  sigma = np.logspace(0, -3, m)
  ill_polar = []
  for i in range(k):
    uu, _ = np.linalg.qr(rng.standard_normal((m, m)))
    vv, _ = np.linalg.qr(rng.standard_normal((n, m)))
    ill[i] = ((uu * sigma) @ vv.T).astype(np.float32)
    ill_polar.append(uu @ vv.T)
  return jnp.asarray(gauss), u @ vt, jnp.asarray(ill), np.stack(ill_polar)


def distance(out, polar):
  got = np.asarray(out[:polar.shape[0]], np.float64)
  return float(np.sqrt(np.mean(np.sum((got - polar) ** 2, axis=(-2, -1)) / polar.shape[-2])))


def orthogonalizer(impl, config, restart_every):
  coefficients, steps, preconditioning, eps = CONFIGS[config]
  kw = dict(steps=steps, coefficients=coefficients, preconditioning=preconditioning,
            eps=eps, compute_dtype=jnp.bfloat16,
            backend="pallas" if impl.endswith("kernels") else "xla")
  if impl.startswith("gram"):
    return orth_lib.gram_newton_schulz_orthogonalizer(restart_every=restart_every, **kw)
  return orth_lib.newton_schulz_orthogonalizer(**kw)


def jitted(orth):
  """One jitted call running every stack of the list through ``orth``, as the stage does."""
  def run(xs):
    stacks = [orth_lib.Stack(x, False, isinstance(orth, orth_lib.PallasNewtonSchulz)
                             and orth.takes(x.shape, x.dtype)) for x in xs]
    return orth.run_many(stacks)
  return jax.jit(run)


def wall_ms(fn, xs, trials):
  for _ in range(2):
    jax.block_until_ready(fn(xs))
  ts = []
  for _ in range(trials):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(xs))
    ts.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(ts)


def flop_ratio(stacks, config, restart_every):
  """Gram NS's flops over standard NS's (XLA counts), the stacks ``prefers_gram`` leaves
  to standard NS counted as such."""
  steps = CONFIGS[config][1]
  gram = ns = 0
  for batch, m, n in stacks:
    plain = newton_schulz_flops(m, n, steps=steps)
    ns += batch * plain
    gram += batch * (gram_newton_schulz_flops(m, n, steps=steps, restart_every=restart_every)
                     if prefers_gram(m, n, steps=steps, restart_every=restart_every)
                     else plain)
  return gram / ns


def run(shapes, restarts, trials, budget_s, write):
  rows = []
  t_start = time.perf_counter()
  kernels = pallas.is_available()
  cache = {}
  for config in CONFIGS:
    for name, stacks in shapes.items():
      if time.perf_counter() - t_start > budget_s:
        rows.append(dict(shape=name, config=config, skipped=f"past --budget-s {budget_s}"))
        write(rows)
        continue
      t0 = time.perf_counter()
      if name not in cache:  # the host SVDs once per shape, shared by the configs
        cache[name] = [make_inputs(*s, seed=i) for i, s in enumerate(stacks)]
      inputs = cache[name]
      gauss = [g for g, _, _, _ in inputs]
      ill = [x for _, _, x, _ in inputs]
      base = {}
      runs = [(impl, r) for impl in IMPLEMENTATIONS
              for r in (restarts if impl.startswith("gram") else [None])]
      for impl, restart_every in runs:
        row = dict(shape=name, stacks=stacks, config=config, implementation=impl)
        if impl.startswith("gram"):
          row["restart_every"] = restart_every
        if impl.endswith("kernels") and not kernels:
          row["skipped"] = "no Hopper GPU (ortho_optax.pallas.is_available() is False)"
          rows.append(row)
          continue
        try:
          fn = jitted(orthogonalizer(impl, config, restart_every))
          row["wall_ms"] = wall_ms(fn, gauss, trials)
          outs = fn(gauss)
          # The distances of the last stack (the wide one of gpt2_small).
          row["dist_gauss"] = distance(outs[-1], inputs[-1][1])
          row["dist_ill"] = distance(fn(ill)[-1], inputs[-1][3])
        except Exception as ex:  # keep the other rows
          row["error"] = f"{type(ex).__name__}: {ex}"[:400]
        if impl.startswith("gram"):
          row["flop_ratio"] = flop_ratio(stacks, config, restart_every)
        reference = "ns_kernels" if impl.endswith("kernels") else "ns_xla"
        if impl.startswith("ns") and "wall_ms" in row:
          base[impl] = row["wall_ms"]
        if reference in base and "wall_ms" in row:
          row["speedup"] = base[reference] / row["wall_ms"]
        rows.append(row)
        write(rows)
        log(json.dumps(row))
      log(f"# {name} {config} done in {time.perf_counter() - t0:.1f}s")
  return rows


def print_table(rows, meta):
  log(f"\nGram NS vs NS, bf16, {meta['device']} ({meta['seconds']:.0f}s); speedup over the "
      f"standard NS of the same backend")
  head = (f"{'shape':>12} {'config':>6} {'implementation':>14} {'restart':>7} {'wall ms':>8} "
          f"{'speedup':>7} {'flops':>5} {'dist gauss':>10} {'dist ill':>9}")
  log(head)
  log("-" * len(head))
  fmt = lambda v, spec: format("-", ">" + spec.split(".")[0]) if v is None else format(v, spec)
  for r in rows:
    lead = (f"{r['shape']:>12} {r['config']:>6} {r.get('implementation', ''):>14} "
            f"{str(r.get('restart_every', '')):>7}")
    if "skipped" in r or "error" in r:
      log(f"{lead}  {'SKIPPED' if 'skipped' in r else 'ERROR'} {r.get('skipped', r.get('error'))}")
      continue
    log(f"{lead} {fmt(r['wall_ms'], '8.3f')} {fmt(r.get('speedup'), '7.2f')} "
        f"{fmt(r.get('flop_ratio'), '5.2f')} {fmt(r['dist_gauss'], '10.4f')} "
        f"{fmt(r['dist_ill'], '9.4f')}")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=os.environ.get("OUT", "."),
                 help="a .json path, or a folder for bench_gram_ns.json")
  p.add_argument("--restarts", default="2",
                 help="comma-separated restart_every values of the Gram rows, 'none' for none")
  p.add_argument("--trials", type=int, default=20)
  p.add_argument("--budget-s", type=float, default=220.0,
                 help="skip the shapes that would start after this many seconds")
  p.add_argument("--quick", action="store_true", help="tiny shapes (a CPU smoke test)")
  args = p.parse_args()
  path = args.out if args.out.endswith(".json") else os.path.join(args.out, "bench_gram_ns.json")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  restarts = [None if r == "none" else int(r) for r in args.restarts.split(",") if r]
  meta = dict(restarts=restarts, trials=args.trials, configs=CONFIGS,
              device=str(jax.devices()[0].device_kind), jax=jax.__version__)
  t0 = time.perf_counter()

  def write(rows):
    with open(path, "w") as f:
      json.dump(dict(meta=dict(meta, seconds=time.perf_counter() - t0), rows=rows), f,
                indent=1)

  rows = run(QUICK_SHAPES if args.quick else SHAPES, restarts, args.trials,
             args.budget_s, write)
  meta["seconds"] = time.perf_counter() - t0
  write(rows)
  log(f"wrote {path}")
  print_table(rows, meta)


if __name__ == "__main__":
  main()
